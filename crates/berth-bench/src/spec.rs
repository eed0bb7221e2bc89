//! The targets of docs/SPECIFICATION.md and `--check`: which of a run's figures miss them.
//! A unit test keeps this table and the document's in step.

use serde_json::Value;

/// Which side of the limit a figure must be on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    AtMost,
    AtLeast,
}

impl Bound {
    pub fn symbol(self) -> &'static str {
        match self {
            Bound::AtMost => "≤",
            Bound::AtLeast => "≥",
        }
    }
}

/// One target: a key of the report, its bound and its limit.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// A top-level key of bench/results/latest.json.
    pub key: &'static str,
    pub bound: Bound,
    pub limit: f64,
}

pub const TARGETS: &[Target] = &[
    Target {
        key: "start_p50_ms",
        bound: Bound::AtMost,
        limit: 5.0,
    },
    Target {
        key: "start_p99_ms",
        bound: Bound::AtMost,
        limit: 15.0,
    },
    Target {
        key: "ratio_podman_start_over_berth_start",
        bound: Bound::AtLeast,
        limit: 10.0,
    },
    Target {
        key: "ratio_runc_run_over_berth_start",
        bound: Bound::AtLeast,
        limit: 4.0,
    },
    Target {
        key: "create_warm_p50_ms",
        bound: Bound::AtMost,
        limit: 100.0,
    },
    Target {
        key: "stopped_machine_agent_rss_bytes",
        bound: Bound::AtMost,
        limit: 16_384.0,
    },
    Target {
        key: "stopped_machine_disk_bytes",
        bound: Bound::AtMost,
        limit: 65_536.0,
    },
];

/// The targets `--migrate-only --check` holds a run to.
pub const MIGRATE_TARGETS: &[Target] = &[
    Target {
        key: "ratio_migrate_over_tar_pipe",
        bound: Bound::AtLeast,
        limit: 0.8,
    },
    Target {
        key: "migrate_running_downtime_ms",
        bound: Bound::AtMost,
        limit: 200.0,
    },
];

/// What `--check` found for one target.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub key: &'static str,
    /// The run's figure; `None` when the run did not measure it (a miss too).
    pub value: Option<f64>,
    pub met: bool,
    pub line: String,
}

/// Every target against the report. A figure that is missing or null misses its target:
/// a run that could not measure something has not shown that it meets it.
pub fn evaluate(report: &Value, targets: &[Target]) -> Vec<Verdict> {
    targets
        .iter()
        .map(|target| {
            let value = report[target.key].as_f64();
            let met = match (value, target.bound) {
                (Some(v), Bound::AtMost) => v <= target.limit,
                (Some(v), Bound::AtLeast) => v >= target.limit,
                (None, _) => false,
            };
            let shown = value.map_or_else(|| "not measured".to_owned(), |v| v.to_string());
            let line = format!(
                "{} {}: {shown} (target {} {})",
                if met { "met   " } else { "MISSED" },
                target.key,
                target.bound.symbol(),
                target.limit
            );
            Verdict {
                key: target.key,
                value,
                met,
                line,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_run_within_every_target_passes() {
        let report = json!({
            "start_p50_ms": 4.2, "start_p99_ms": 15.0,
            "ratio_podman_start_over_berth_start": 16.0, "ratio_runc_run_over_berth_start": 5.1,
            "create_warm_p50_ms": 8.0,
            "stopped_machine_agent_rss_bytes": 9000, "stopped_machine_disk_bytes": 65536,
        });
        let verdicts = evaluate(&report, TARGETS);
        assert_eq!(verdicts.len(), TARGETS.len());
        assert!(verdicts.iter().all(|v| v.met), "{verdicts:?}");
    }

    #[test]
    fn a_slow_start_and_a_missing_peer_miss() {
        let report = json!({
            "start_p50_ms": 33.1, "start_p99_ms": 14.0,
            "ratio_podman_start_over_berth_start": null, "ratio_runc_run_over_berth_start": 0.75,
            "create_warm_p50_ms": 8.0,
            "stopped_machine_agent_rss_bytes": 9000,
        });
        let missed: Vec<&str> = evaluate(&report, TARGETS)
            .into_iter()
            .filter(|v| !v.met)
            .map(|v| v.key)
            .collect();
        assert_eq!(
            missed,
            [
                "start_p50_ms",
                "ratio_podman_start_over_berth_start",
                "ratio_runc_run_over_berth_start",
                "stopped_machine_disk_bytes",
            ]
        );
        let line = &evaluate(&report, TARGETS)[0].line;
        assert_eq!(line, "MISSED start_p50_ms: 33.1 (target ≤ 5)");
    }

    #[test]
    fn a_slow_move_misses_and_a_short_downtime_meets() {
        let report =
            json!({"ratio_migrate_over_tar_pipe": 0.7, "migrate_running_downtime_ms": 150});
        let verdicts = evaluate(&report, MIGRATE_TARGETS);
        let met: Vec<(&str, bool)> = verdicts.iter().map(|v| (v.key, v.met)).collect();
        assert_eq!(
            met,
            [
                ("ratio_migrate_over_tar_pipe", false),
                ("migrate_running_downtime_ms", true)
            ]
        );
        assert_eq!(
            verdicts[0].line,
            "MISSED ratio_migrate_over_tar_pipe: 0.7 (target ≥ 0.8)"
        );
    }

    /// docs/SPECIFICATION.md lists the same targets as the code checks, row by row.
    #[test]
    fn the_specification_lists_exactly_these_targets() {
        let doc = include_str!("../../../docs/SPECIFICATION.md");
        let rows: Vec<(String, String, f64)> = doc
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                // | `key` | ≤ 5 | ...
                let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                let (symbol, limit) = cells.get(2)?.split_once(' ')?;
                let limit: f64 = limit.replace(',', "").parse().ok()?;
                Some((key.to_owned(), symbol.to_owned(), limit))
            })
            .collect();
        let expected: Vec<(String, String, f64)> = TARGETS
            .iter()
            .chain(MIGRATE_TARGETS)
            .map(|t| (t.key.to_owned(), t.bound.symbol().to_owned(), t.limit))
            .collect();
        assert_eq!(rows, expected);
    }
}
