//! Turns a run's samples into bench/results/latest.json (whose top-level keys are a
//! contract), the markdown table and the chart's series.

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::chart::Series;
use crate::harness::{CycleFigures, Sizes};
use crate::peers::{Outcome, PeerTimes};
use crate::stats::{self, number_or_null, ratio, summary, Row};

/// Everything one run measured, before it is summarised.
pub struct RawRun {
    pub host: Value,
    /// Scenario 1; why not, when the local registry could not run.
    pub registry: std::result::Result<Value, String>,
    pub cycles: CycleFigures,
    pub concurrent: Value,
    pub density: Value,
    pub peers: PeerTimes,
}

/// A peer: its section in `peers`, its p50 key, its ratio key, its label, its samples.
struct PeerRow<'a> {
    section: &'static str,
    p50_key: &'static str,
    ratio_key: &'static str,
    label: &'static str,
    outcome: &'a Outcome,
}

fn peer_rows(peers: &PeerTimes) -> [PeerRow<'_>; 8] {
    [
        PeerRow {
            section: "runc_run_d",
            p50_key: "peer_runc_run_p50_ms",
            ratio_key: "ratio_runc_run_over_berth_start",
            label: "peer: `runc run -d`",
            outcome: &peers.runc_run,
        },
        PeerRow {
            section: "runc_create",
            p50_key: "peer_runc_create_p50_ms",
            ratio_key: "ratio_runc_create_over_berth_start",
            label: "peer: `runc create`",
            outcome: &peers.runc_create,
        },
        PeerRow {
            section: "runc_start",
            p50_key: "peer_runc_start_p50_ms",
            ratio_key: "ratio_runc_start_over_berth_start",
            label: "peer: `runc start` (of a created container)",
            outcome: &peers.runc_start,
        },
        PeerRow {
            section: "runc_create_start",
            p50_key: "peer_runc_create_start_p50_ms",
            ratio_key: "ratio_runc_create_start_over_berth_start",
            label: "peer: `runc create` + `runc start`",
            outcome: &peers.runc_create_start,
        },
        PeerRow {
            section: "podman_create",
            p50_key: "peer_podman_create_p50_ms",
            ratio_key: "ratio_podman_create_over_berth_start",
            label: "peer: `podman create`",
            outcome: &peers.podman_create,
        },
        PeerRow {
            section: "podman_start",
            p50_key: "peer_podman_start_p50_ms",
            ratio_key: "ratio_podman_start_over_berth_start",
            label: "peer: `podman start` (of a stopped container)",
            outcome: &peers.podman_start,
        },
        PeerRow {
            section: "podman_run_d",
            p50_key: "peer_podman_run_p50_ms",
            ratio_key: "ratio_podman_run_over_berth_start",
            label: "peer: `podman run -d`",
            outcome: &peers.podman_run,
        },
        PeerRow {
            section: "unshare_floor",
            p50_key: "floor_unshare_p50_ms",
            ratio_key: "ratio_unshare_floor_over_berth_start",
            label: "floor: `unshare` pid+mount+uts+ipc+net, chroot, `/bin/true`",
            outcome: &peers.unshare,
        },
    ]
}

fn outcome_summary(outcome: &Outcome) -> Value {
    match outcome {
        Ok(samples) => summary(samples),
        Err(reason) => json!({"n": 0, "unavailable": reason}),
    }
}

/// The report: detail per scenario and peer, and the contract's top-level keys (null,
/// with the reason under `unavailable`, for what could not be measured).
pub fn assemble(raw: &RawRun, sizes: &Sizes, quick: bool) -> Result<Value> {
    let mut unavailable = Map::new();
    let start = summary(&raw.cycles.starts);
    let stop = summary(&raw.cycles.stops);
    let berth_p50 = start["p50_ms"].as_f64();
    let mut report = json!({
        "date": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        "host": raw.host,
        "quick": quick,
        "sizes": {
            "start_cycles": sizes.start_cycles, "concurrent": sizes.concurrent,
            "density": sizes.density, "peer_runs": sizes.peer_runs,
            "registry_samples": sizes.registry_samples,
        },
        "start": start,
        "start_steps": stats::step_breakdown(&raw.cycles.start_steps),
        "stop": stop,
        "first_start_ms": stats::round(raw.cycles.first_start.as_secs_f64() * 1000.0),
        "concurrent": raw.concurrent,
        "density": raw.density,
        "start_p50_ms": start["p50_ms"],
        "start_p90_ms": start["p90_ms"],
        "start_p99_ms": start["p99_ms"],
        "stop_p50_ms": stop["p50_ms"],
        "concurrent_starts_per_s": raw.concurrent["starts_per_s"],
        "concurrent_start_p99_ms": raw.concurrent["start"]["p99_ms"],
        "stopped_machine_agent_rss_bytes": raw.density["rss_per_stopped_machine_bytes"],
        "stopped_machine_disk_bytes": raw.density["disk_per_stopped_machine_bytes"],
        "density_list_p50_ms": raw.density["list"]["p50_ms"],
        "density_get_p50_ms": raw.density["get"]["p50_ms"],
        "density_start_p50_ms": raw.density["start"]["p50_ms"],
        "wake_p50_ms": null,
    });
    unavailable.insert("wake_p50_ms".into(), json!("the wake scenario did not run"));
    match &raw.registry {
        Ok(registry) => {
            report["create"] = registry.clone();
            report["create_cold_p50_ms"] = registry["cold"]["p50_ms"].clone();
            report["create_warm_p50_ms"] = registry["warm"]["p50_ms"].clone();
            // The asymmetry the product sells: what create pays once over what start
            // pays every time, per image size.
            for (section, key) in [
                ("cold", "ratio_cold_create_over_start"),
                ("cold_large", "ratio_cold_create_64mb_over_start"),
                ("cold_xl", "ratio_cold_create_256mb_over_start"),
            ] {
                report[key] =
                    number_or_null(ratio(registry[section]["p50_ms"].as_f64(), berth_p50));
            }
        }
        Err(reason) => {
            report["create"] = json!({"unavailable": reason});
            for key in ["create_cold_p50_ms", "create_warm_p50_ms"] {
                report[key] = Value::Null;
                unavailable.insert(key.into(), json!(reason));
            }
        }
    }
    let mut peers = Map::new();
    let mut ratios = Map::new();
    for row in peer_rows(&raw.peers) {
        let peer = outcome_summary(row.outcome);
        let p50 = peer["p50_ms"].as_f64();
        if let Err(reason) = row.outcome {
            unavailable.insert(row.p50_key.into(), json!(reason));
        }
        let r = number_or_null(ratio(p50, berth_p50));
        report[row.p50_key] = number_or_null(p50);
        report[row.ratio_key] = r.clone();
        ratios.insert(row.section.into(), r);
        peers.insert(row.section.into(), peer);
    }
    report["peers"] = Value::Object(peers);
    report["ratios_peer_p50_over_berth_start_p50"] = Value::Object(ratios);
    report["unavailable"] = Value::Object(unavailable);
    Ok(report)
}

/// The markdown table printed after a run and pasted into PERFORMANCE.md.
pub fn markdown(report: &Value) -> String {
    let concurrent_label = format!(
        "berth start, {} Machines at once (each start's latency)",
        report["concurrent"]["machines"]
    );
    let density_label = |what: &str| {
        format!(
            "{what} with {} stopped Machines on the worker",
            report["density"]["stopped_machines"]
        )
    };
    let (density_start, density_list, density_get) = (
        density_label("berth start"),
        density_label("`GET` list of the app's Machines"),
        density_label("`GET` one Machine"),
    );
    let mut rows = vec![
        Row {
            label: "**berth start** (API, stop→start loop on one Machine)",
            summary: &report["start"],
            ratio: None,
        },
        Row {
            label: "berth stop (API, SIGKILL)",
            summary: &report["stop"],
            ratio: None,
        },
        Row {
            label: "berth create, cold cache (busybox pulled from a local registry)",
            summary: &report["create"]["cold"],
            ratio: Some(report["ratio_cold_create_over_start"].as_f64()),
        },
        Row {
            label: "berth create, warm cache (tag resolved, layers stored)",
            summary: &report["create"]["warm"],
            ratio: None,
        },
    ];
    if !report["create"]["cold_large"].is_null() {
        rows.push(Row {
            label: "berth create, cold cache, 64 MB image",
            summary: &report["create"]["cold_large"],
            ratio: Some(report["ratio_cold_create_64mb_over_start"].as_f64()),
        });
        rows.push(Row {
            label: "berth create, cold cache, 256 MB image",
            summary: &report["create"]["cold_xl"],
            ratio: Some(report["ratio_cold_create_256mb_over_start"].as_f64()),
        });
    }
    rows.extend([
        Row {
            label: &concurrent_label,
            summary: &report["concurrent"]["start"],
            ratio: None,
        },
        Row {
            label: &density_start,
            summary: &report["density"]["start"],
            ratio: None,
        },
        Row {
            label: &density_list,
            summary: &report["density"]["list"],
            ratio: None,
        },
        Row {
            label: &density_get,
            summary: &report["density"]["get"],
            ratio: None,
        },
    ]);
    for (section, label, ratio_key) in PEER_LABELS {
        rows.push(Row {
            label,
            summary: &report["peers"][*section],
            ratio: Some(report[*ratio_key].as_f64()),
        });
    }
    let mut out = stats::markdown_table(&rows);
    let bytes = |key: &str| match report[key].as_u64() {
        Some(bytes) => format!("{bytes} B ({:.1} KiB)", bytes as f64 / 1024.0),
        None => "not measured".to_owned(),
    };
    let or_reason = |key: &str| match report[key].as_f64() {
        Some(value) => value.to_string(),
        None => format!(
            "not measured: {}",
            report["unavailable"][key].as_str().unwrap_or("unknown")
        ),
    };
    out.push_str(&format!(
        "\n| figure | value |\n| --- | ---: |\n\
         | concurrent starts ({} at once) | {} starts/s |\n\
         | agent RSS per stopped Machine | {} |\n\
         | disk per stopped Machine beyond its writes | {} |\n\
         | wake on request p50 | {} |\n",
        report["concurrent"]["machines"],
        or_reason("concurrent_starts_per_s"),
        bytes("stopped_machine_agent_rss_bytes"),
        bytes("stopped_machine_disk_bytes"),
        or_reason("wake_p50_ms"),
    ));
    out.push_str(&step_table(&report["start_steps"]));
    out
}

/// Goals as [`crate::checkpoints::goals`] and [`crate::gvisor::goals`] make them, a line
/// each, `met` or `MISSED`; a goal without `op` is held to `≤`.
pub fn goal_lines(goals: &[Value]) -> String {
    goals
        .iter()
        .map(|goal| {
            format!(
                "{} {}: {} (goal {} {})\n",
                if goal["met"] == true {
                    "met   "
                } else {
                    "MISSED"
                },
                goal["goal"].as_str().unwrap_or("?"),
                goal["value"],
                goal["op"].as_str().unwrap_or("≤"),
                goal["target"]
            )
        })
        .collect()
}

/// Where a start's time goes, from the `Server-Timing` header of each start.
pub fn step_table(steps: &Value) -> String {
    let Some(rows) = steps.as_array().filter(|rows| !rows.is_empty()) else {
        return String::new();
    };
    let mut out = String::from(
        "\n| start step (Server-Timing) | p50 µs | p90 µs | p99 µs | share of p50 |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        let cell = |key: &str| row[key].as_f64().map_or("".to_owned(), |v| v.to_string());
        let share = row["p50_share"]
            .as_f64()
            .map_or(String::new(), |share| format!("{:.0} %", share * 100.0));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            row["step"].as_str().unwrap_or("?"),
            cell("p50_us"),
            cell("p90_us"),
            cell("p99_us"),
            share
        ));
    }
    out
}

/// The peers' labels and ratio keys, for the table (the report holds their summaries).
const PEER_LABELS: &[(&str, &str, &str)] = &[
    (
        "runc_run_d",
        "peer: `runc run -d`",
        "ratio_runc_run_over_berth_start",
    ),
    (
        "runc_create",
        "peer: `runc create`",
        "ratio_runc_create_over_berth_start",
    ),
    (
        "runc_start",
        "peer: `runc start` (of a created container)",
        "ratio_runc_start_over_berth_start",
    ),
    (
        "runc_create_start",
        "peer: `runc create` + `runc start`",
        "ratio_runc_create_start_over_berth_start",
    ),
    (
        "podman_create",
        "peer: `podman create`",
        "ratio_podman_create_over_berth_start",
    ),
    (
        "podman_start",
        "peer: `podman start` (of a stopped container)",
        "ratio_podman_start_over_berth_start",
    ),
    (
        "podman_run_d",
        "peer: `podman run -d`",
        "ratio_podman_run_over_berth_start",
    ),
    (
        "unshare_floor",
        "floor: `unshare` (5 namespaces, chroot, `/bin/true`)",
        "ratio_unshare_floor_over_berth_start",
    ),
];

pub fn chart_title(report: &Value) -> String {
    format!(
        "start latency: Berth and its peers, {} cores, {}",
        report["host"]["cpus"],
        report["date"]
            .as_str()
            .unwrap_or("")
            .get(..10)
            .unwrap_or("")
    )
}

fn ms(samples: &[Duration]) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect()
}

/// Berth's start and every peer that ran, as the chart's series.
pub fn chart_series(raw: &RawRun) -> Vec<Series> {
    let mut series = vec![Series {
        label: "berth start (API)".into(),
        ms: ms(&raw.cycles.starts),
    }];
    for row in peer_rows(&raw.peers) {
        if row.section == "runc_create" || row.section == "podman_create" {
            continue; // creates, not starts
        }
        if let Ok(samples) = row.outcome {
            series.push(Series {
                label: row.label.replace('`', ""),
                ms: ms(samples),
            });
        }
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_samples(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    fn raw(podman: Outcome) -> RawRun {
        RawRun {
            host: json!({"cpus": 2}),
            registry: Ok(json!({"cold": summary(&ms_samples(&[70, 80])),
                               "warm": summary(&ms_samples(&[8, 9]))})),
            cycles: CycleFigures {
                first_start: Duration::from_millis(30),
                starts: ms_samples(&[4, 5, 6, 5]),
                stops: ms_samples(&[9, 9, 10, 10]),
                start_steps: vec![vec![
                    ("api_request".into(), 20.0),
                    ("init_overlay".into(), 600.0),
                    ("total".into(), 4000.0),
                ]],
            },
            concurrent: json!({"machines": 50, "starts_per_s": 120.0,
                               "start": summary(&ms_samples(&[20, 30]))}),
            density: json!({"stopped_machines": 1010, "rss_per_stopped_machine_bytes": 9000,
                            "disk_per_stopped_machine_bytes": 40000,
                            "list": summary(&ms_samples(&[40])), "get": summary(&ms_samples(&[1])),
                            "start": summary(&ms_samples(&[6]))}),
            peers: PeerTimes {
                runc_run: Ok(ms_samples(&[25, 20, 30])),
                runc_create: Ok(ms_samples(&[20])),
                runc_start: Ok(ms_samples(&[5])),
                runc_create_start: Ok(ms_samples(&[25])),
                podman_create: podman.clone(),
                podman_start: podman.clone(),
                podman_run: podman,
                unshare: Ok(ms_samples(&[3])),
            },
        }
    }

    #[test]
    fn the_contract_keys_are_all_there() {
        let report = assemble(&raw(Ok(ms_samples(&[60, 70, 80]))), &Sizes::quick(), true).unwrap();
        for key in [
            "start_p50_ms",
            "start_p90_ms",
            "start_p99_ms",
            "stop_p50_ms",
            "create_warm_p50_ms",
            "create_cold_p50_ms",
            "peer_runc_run_p50_ms",
            "peer_runc_start_p50_ms",
            "peer_podman_create_p50_ms",
            "peer_podman_start_p50_ms",
            "peer_podman_run_p50_ms",
            "floor_unshare_p50_ms",
            "concurrent_starts_per_s",
            "stopped_machine_agent_rss_bytes",
            "stopped_machine_disk_bytes",
        ] {
            assert!(report[key].is_number(), "{key}: {}", report[key]);
        }
        assert!(report["wake_p50_ms"].is_null());
        assert!(report["unavailable"]["wake_p50_ms"].is_string());
        assert_eq!(report["start_p50_ms"], 5.0);
        assert_eq!(report["peer_runc_run_p50_ms"], 25.0);
        // 25 ms for runc run -d over 5 ms for Berth's start; 70 over 5 for podman start.
        assert_eq!(report["ratio_runc_run_over_berth_start"], 5.0);
        assert_eq!(report["ratio_podman_start_over_berth_start"], 14.0);
        assert_eq!(report["ratio_unshare_floor_over_berth_start"], 0.6);
        assert_eq!(report["create_warm_p50_ms"], 8.0);
        // Cold create p50 (70 ms) over start p50 (5 ms); the large images did not run.
        assert_eq!(report["create_cold_p50_ms"], 70.0);
        assert_eq!(report["ratio_cold_create_over_start"], 14.0);
        assert!(report["ratio_cold_create_64mb_over_start"].is_null());
    }

    #[test]
    fn a_peer_that_could_not_run_is_null_with_its_reason() {
        let report = assemble(
            &raw(Err("podman is not installed".into())),
            &Sizes::quick(),
            true,
        )
        .unwrap();
        for key in [
            "peer_podman_create_p50_ms",
            "peer_podman_start_p50_ms",
            "peer_podman_run_p50_ms",
            "ratio_podman_start_over_berth_start",
        ] {
            assert!(report[key].is_null(), "{key}: {}", report[key]);
        }
        assert_eq!(
            report["unavailable"]["peer_podman_start_p50_ms"],
            "podman is not installed"
        );
        assert_eq!(
            report["peers"]["podman_run_d"]["unavailable"],
            "podman is not installed"
        );
        let table = markdown(&report);
        assert!(
            table.contains("| peer: `podman start` (of a stopped container) | 0 | not measured: podman is not installed | | | – |"),
            "{table}"
        );
        assert!(table.contains("| peer: `runc run -d` | 3 | 25 | 30 | 30 | 5× |"));
        assert!(table.contains("| agent RSS per stopped Machine | 9000 B (8.8 KiB) |"));
        assert!(
            table.contains("| wake on request p50 | not measured: the wake scenario did not run |")
        );
        // The chart draws what ran: Berth, runc run -d, runc start, create+start, unshare.
        let labels: Vec<String> = chart_series(&raw(Err("x".into())))
            .into_iter()
            .map(|s| s.label)
            .collect();
        assert_eq!(labels.len(), 5, "{labels:?}");
    }
}
