//! The pure maths of the report: percentiles, ratios to the peers and the markdown table.
//! No I/O here, so the unit tests cover all of it.

use std::time::Duration;

use serde_json::{json, Value};

/// Milliseconds rounded to two decimals, as every figure in the report is.
pub fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Samples in milliseconds, sorted ascending.
pub fn sorted_ms(samples: &[Duration]) -> Vec<f64> {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// The `p`th percentile (0 < p ≤ 100) of ascending samples by nearest rank, so every
/// figure reported is one that was actually measured. `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.saturating_sub(1).min(sorted.len() - 1)])
}

/// `n`, p50, p90, p99, min and max in milliseconds; only `n: 0` for no samples.
pub fn summary(samples: &[Duration]) -> Value {
    let ms = sorted_ms(samples);
    let (Some(&min), Some(&max)) = (ms.first(), ms.last()) else {
        return json!({"n": 0});
    };
    let rank = |p: f64| percentile(&ms, p).map(round);
    json!({"n": ms.len(), "p50_ms": rank(50.0), "p90_ms": rank(90.0), "p99_ms": rank(99.0),
           "min_ms": round(min), "max_ms": round(max)})
}

/// How many times faster Berth is than a peer: the peer's figure over Berth's, from the
/// same run. `None` when either is missing or Berth's is not positive.
pub fn ratio(peer_ms: Option<f64>, berth_ms: Option<f64>) -> Option<f64> {
    match (peer_ms, berth_ms) {
        (Some(peer), Some(berth)) if berth > 0.0 && peer.is_finite() => Some(round(peer / berth)),
        _ => None,
    }
}

/// A JSON number or null for a missing figure.
pub fn number_or_null(value: Option<f64>) -> Value {
    value.map_or(Value::Null, |v| json!(v))
}

/// One row of the markdown table: a label and a summary (`n: 0` or with `unavailable`
/// when the row could not be measured).
pub struct Row<'a> {
    pub label: &'a str,
    pub summary: &'a Value,
    /// This row's p50 over Berth's start p50, when the row is a peer's start.
    pub ratio: Option<Option<f64>>,
}

fn cell(value: &Value) -> String {
    match value.as_f64() {
        Some(number) => format!("{number}"),
        None => "–".to_owned(),
    }
}

/// The markdown table printed after a run and pasted into PERFORMANCE.md.
pub fn markdown_table(rows: &[Row<'_>]) -> String {
    let mut out = String::from(
        "| operation | n | p50 ms | p90 ms | p99 ms | p50 / berth start p50 |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        let ratio = match row.ratio {
            None => String::new(),
            Some(Some(ratio)) => format!("{ratio}×"),
            Some(None) => "–".to_owned(),
        };
        let n = row.summary["n"].as_u64().unwrap_or(0);
        if let Some(reason) = row.summary["unavailable"].as_str() {
            out.push_str(&format!(
                "| {} | 0 | not measured: {reason} | | | {ratio} |\n",
                row.label
            ));
            continue;
        }
        out.push_str(&format!(
            "| {} | {n} | {} | {} | {} | {ratio} |\n",
            row.label,
            cell(&row.summary["p50_ms"]),
            cell(&row.summary["p90_ms"]),
            cell(&row.summary["p99_ms"]),
        ));
    }
    out
}

/// The steps of one `Server-Timing` header (`name;dur=ms, ...`), in microseconds.
pub fn parse_server_timing(value: &str) -> Vec<(String, f64)> {
    value
        .split(',')
        .filter_map(|entry| {
            let mut parts = entry.trim().split(';');
            let name = parts.next()?.trim();
            let ms = parts
                .find_map(|param| param.trim().strip_prefix("dur="))?
                .parse::<f64>()
                .ok()?;
            (!name.is_empty()).then(|| (name.to_owned(), ms * 1000.0))
        })
        .collect()
}

/// Per step, in the order steps first appear: p50, p90 and p99 in microseconds over the
/// samples that have it, and the p50's share of the summed p50s (without `total`).
pub fn step_breakdown(samples: &[Vec<(String, f64)>]) -> Value {
    let mut order: Vec<&str> = Vec::new();
    for sample in samples {
        for (step, _) in sample {
            if !order.contains(&step.as_str()) {
                order.push(step);
            }
        }
    }
    let rows: Vec<(&str, Vec<f64>)> = order
        .iter()
        .map(|step| {
            let mut us: Vec<f64> = samples
                .iter()
                .flat_map(|sample| sample.iter().filter(|(s, _)| s == step).map(|(_, us)| *us))
                .collect();
            us.sort_by(f64::total_cmp);
            (*step, us)
        })
        .collect();
    let p50 = |us: &[f64]| percentile(us, 50.0).unwrap_or(0.0);
    let summed: f64 = rows
        .iter()
        .filter(|(step, _)| *step != "total")
        .map(|(_, us)| p50(us))
        .sum();
    Value::Array(
        rows.iter()
            .map(|(step, us)| {
                let rank = |p: f64| percentile(us, p).map(|v| v.round());
                json!({"step": step, "n": us.len(), "p50_us": rank(50.0),
                       "p90_us": rank(90.0), "p99_us": rank(99.0),
                       "p50_share": (*step != "total" && summed > 0.0)
                           .then(|| round(p50(us) / summed))})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(50.0));
        assert_eq!(percentile(&sorted, 90.0), Some(90.0));
        assert_eq!(percentile(&sorted, 99.0), Some(99.0));
        assert_eq!(percentile(&sorted, 100.0), Some(100.0));
        // Ten samples: p99 is the largest, p50 the fifth.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_and_rounds() {
        let value = summary(&ms(&[30, 10, 20]));
        assert_eq!(value["n"], 3);
        assert_eq!(value["p50_ms"], 20.0);
        assert_eq!(value["p99_ms"], 30.0);
        assert_eq!(value["min_ms"], 10.0);
        assert_eq!(value["max_ms"], 30.0);
        let odd = summary(&[Duration::from_micros(1_234_567)]);
        assert_eq!(odd["p50_ms"], 1234.57);
        assert_eq!(summary(&[]), json!({"n": 0}));
    }

    #[test]
    fn ratios_are_peer_over_berth_and_missing_when_a_side_is() {
        assert_eq!(ratio(Some(90.0), Some(4.5)), Some(20.0));
        assert_eq!(ratio(Some(1.0), Some(3.0)), Some(0.33));
        assert_eq!(ratio(None, Some(3.0)), None);
        assert_eq!(ratio(Some(3.0), None), None);
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
    }

    #[test]
    fn table_shows_figures_ratios_and_reasons() {
        let berth = summary(&ms(&[4, 5, 6]));
        let podman = json!({"n": 0, "unavailable": "podman is not installed"});
        let runc = summary(&ms(&[20, 22, 24]));
        let table = markdown_table(&[
            Row {
                label: "berth start",
                summary: &berth,
                ratio: None,
            },
            Row {
                label: "runc run -d",
                summary: &runc,
                ratio: Some(ratio(Some(22.0), Some(5.0))),
            },
            Row {
                label: "podman start",
                summary: &podman,
                ratio: Some(None),
            },
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[2], "| berth start | 3 | 5 | 6 | 6 |  |");
        assert_eq!(lines[3], "| runc run -d | 3 | 22 | 24 | 24 | 4.4× |");
        assert_eq!(
            lines[4],
            "| podman start | 0 | not measured: podman is not installed | | | – |"
        );
    }

    #[test]
    fn server_timing_is_parsed_into_microseconds_in_order() {
        let steps = parse_server_timing("api_request;dur=0.012, init_overlay;dur=1.5, total;dur=2");
        assert_eq!(
            steps,
            [
                ("api_request".to_owned(), 12.0),
                ("init_overlay".to_owned(), 1500.0),
                ("total".to_owned(), 2000.0)
            ]
        );
        assert!(parse_server_timing("garbage, ;dur=1, x;nodur").is_empty());
    }

    #[test]
    fn breakdown_keeps_first_seen_order_and_shares_exclude_total() {
        let sample = |a: f64, b: f64| {
            vec![
                ("a".to_owned(), a),
                ("b".to_owned(), b),
                ("total".to_owned(), a + b),
            ]
        };
        let table = step_breakdown(&[
            sample(100.0, 300.0),
            sample(100.0, 300.0),
            sample(200.0, 600.0),
        ]);
        let steps: Vec<&str> = table
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|row| row["step"].as_str())
            .collect();
        assert_eq!(steps, ["a", "b", "total"]);
        assert_eq!(table[0]["p50_us"], json!(100.0));
        assert_eq!(table[0]["p50_share"], json!(0.25));
        assert_eq!(table[1]["p99_us"], json!(600.0));
        assert!(table[2]["p50_share"].is_null());
    }
}
