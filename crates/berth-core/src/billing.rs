//! Billing maths: from usage journal records to intervals, and from intervals clipped to
//! a window to billed quantities and cost.
//!
//! Quantities are kept as integers (milliseconds, MiB·ms, byte·ms) until the very end, so
//! sums are exact and independent of order.

use std::collections::BTreeMap;

use berth_api::{UsageKind, UsageRecord};

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;
const MIB_PER_GIB: f64 = 1024.0;
const BYTES_PER_GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Hours in a billing month (365 × 24 / 12), the usual divisor for GB-month prices.
pub const HOURS_PER_MONTH: f64 = 730.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalKind {
    Run {
        cpus: u32,
        memory_mb: u32,
    },
    Storage {
        bytes: u64,
    },
    /// The bytes only the Machine's checkpoints hold.
    CheckpointStorage {
        bytes: u64,
    },
}

/// A span of billable existence. `end_ms` is `None` while it is still open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub machine_id: String,
    pub app: String,
    pub kind: IntervalKind,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
}

#[derive(Debug, Default, Clone)]
struct OpenSpans {
    app: String,
    run: Option<(i64, u32, u32)>,
    storage: Option<(i64, u64)>,
    checkpoints: Option<(i64, u64)>,
}

/// Turns records into intervals. Records must come in journal order (by `seq`) for each
/// worker. A Machine that moves has spans on each worker it was on, kept apart (the
/// source's end and the destination's start may arrive in either order); the source's
/// journal ends them with `migrated_out` at the instant the destination's begin.
#[derive(Debug, Default, Clone)]
pub struct Meter {
    open: BTreeMap<(String, String), OpenSpans>,
    closed: Vec<Interval>,
}

impl Meter {
    pub fn new() -> Meter {
        Meter::default()
    }

    /// Applies a record of the only worker (or of unnamed workers).
    pub fn apply(&mut self, record: &UsageRecord) {
        self.apply_on("", record);
    }

    /// Applies a record from `worker`'s journal.
    pub fn apply_on(&mut self, worker: &str, record: &UsageRecord) {
        let key = (worker.to_owned(), record.machine_id.clone());
        let spans = self.open.entry(key.clone()).or_default();
        spans.app.clone_from(&record.app);
        let at = record.at_ms;
        let mut closed: Vec<(IntervalKind, i64, i64)> = Vec::new();
        let close_run = |spans: &mut OpenSpans, closed: &mut Vec<(IntervalKind, i64, i64)>| {
            if let Some((start, cpus, memory_mb)) = spans.run.take() {
                closed.push((IntervalKind::Run { cpus, memory_mb }, start, at.max(start)));
            }
        };
        let close_storage = |spans: &mut OpenSpans, closed: &mut Vec<(IntervalKind, i64, i64)>| {
            if let Some((start, bytes)) = spans.storage.take() {
                closed.push((IntervalKind::Storage { bytes }, start, at.max(start)));
            }
        };
        let close_checkpoints =
            |spans: &mut OpenSpans, closed: &mut Vec<(IntervalKind, i64, i64)>| {
                if let Some((start, bytes)) = spans.checkpoints.take() {
                    closed.push((
                        IntervalKind::CheckpointStorage { bytes },
                        start,
                        at.max(start),
                    ));
                }
            };
        match record.kind {
            UsageKind::Created => {
                close_storage(spans, &mut closed);
                spans.storage = Some((at, record.storage_bytes));
            }
            UsageKind::RunStart => {
                // A start while a run is open cannot come from a correct journal; never bill
                // the same time twice, so the old run ends here.
                close_run(spans, &mut closed);
                spans.run = Some((at, record.cpus, record.memory_mb));
            }
            UsageKind::RunStop => close_run(spans, &mut closed),
            UsageKind::Storage => {
                close_storage(spans, &mut closed);
                spans.storage = Some((at, record.storage_bytes));
            }
            UsageKind::CheckpointStorage => {
                close_checkpoints(spans, &mut closed);
                spans.checkpoints = Some((at, record.storage_bytes));
            }
            UsageKind::Destroyed | UsageKind::MigratedOut => {
                close_run(spans, &mut closed);
                close_storage(spans, &mut closed);
                close_checkpoints(spans, &mut closed);
            }
        }
        let app = spans.app.clone();
        if matches!(record.kind, UsageKind::Destroyed | UsageKind::MigratedOut) {
            self.open.remove(&key);
        }
        self.closed
            .extend(closed.into_iter().map(|(kind, start_ms, end_ms)| Interval {
                machine_id: record.machine_id.clone(),
                app: app.clone(),
                kind,
                start_ms,
                end_ms: Some(end_ms),
            }));
    }

    /// Every interval: the closed ones, then those still open.
    pub fn intervals(&self) -> Vec<Interval> {
        let mut all = self.closed.clone();
        for ((_, machine_id), spans) in &self.open {
            if let Some((start_ms, cpus, memory_mb)) = spans.run {
                all.push(Interval {
                    machine_id: machine_id.clone(),
                    app: spans.app.clone(),
                    kind: IntervalKind::Run { cpus, memory_mb },
                    start_ms,
                    end_ms: None,
                });
            }
            if let Some((start_ms, bytes)) = spans.storage {
                all.push(Interval {
                    machine_id: machine_id.clone(),
                    app: spans.app.clone(),
                    kind: IntervalKind::Storage { bytes },
                    start_ms,
                    end_ms: None,
                });
            }
            if let Some((start_ms, bytes)) = spans.checkpoints {
                all.push(Interval {
                    machine_id: machine_id.clone(),
                    app: spans.app.clone(),
                    kind: IntervalKind::CheckpointStorage { bytes },
                    start_ms,
                    end_ms: None,
                });
            }
        }
        all
    }
}

/// The half-open query window `[from_ms, to_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_ms: i64,
    pub to_ms: i64,
}

impl Window {
    /// The part of `[start, end)` inside the window; an open end counts until `now_ms`.
    pub fn clip(&self, start_ms: i64, end_ms: Option<i64>, now_ms: i64) -> Option<(i64, i64)> {
        let end = end_ms.unwrap_or(now_ms).min(self.to_ms);
        let start = start_ms.max(self.from_ms);
        (end > start).then_some((start, end))
    }
}

/// Exact integer totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantities {
    pub running_ms: i64,
    /// vCPUs × ms.
    pub cpu_ms: i128,
    /// MiB × ms.
    pub memory_mib_ms: i128,
    /// bytes × ms.
    pub storage_byte_ms: i128,
    /// bytes × ms, of checkpoints.
    pub checkpoint_byte_ms: i128,
}

impl Quantities {
    pub fn add_span(&mut self, kind: IntervalKind, start_ms: i64, end_ms: i64) {
        let span = end_ms - start_ms;
        match kind {
            IntervalKind::Run { cpus, memory_mb } => {
                self.running_ms += span;
                self.cpu_ms += i128::from(cpus) * i128::from(span);
                self.memory_mib_ms += i128::from(memory_mb) * i128::from(span);
            }
            IntervalKind::Storage { bytes } => {
                self.storage_byte_ms += i128::from(bytes) * i128::from(span);
            }
            IntervalKind::CheckpointStorage { bytes } => {
                self.checkpoint_byte_ms += i128::from(bytes) * i128::from(span);
            }
        }
    }

    pub fn merge(&mut self, other: &Quantities) {
        self.running_ms += other.running_ms;
        self.cpu_ms += other.cpu_ms;
        self.memory_mib_ms += other.memory_mib_ms;
        self.storage_byte_ms += other.storage_byte_ms;
        self.checkpoint_byte_ms += other.checkpoint_byte_ms;
    }

    pub fn running_seconds(&self) -> f64 {
        self.running_ms as f64 / 1000.0
    }
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_ms as f64 / 1000.0
    }
    pub fn memory_gb_seconds(&self) -> f64 {
        self.memory_mib_ms as f64 / MIB_PER_GIB / 1000.0
    }
    pub fn storage_gb_hours(&self) -> f64 {
        self.storage_byte_ms as f64 / BYTES_PER_GIB / 3_600_000.0
    }
    pub fn checkpoint_storage_gb_hours(&self) -> f64 {
        self.checkpoint_byte_ms as f64 / BYTES_PER_GIB / 3_600_000.0
    }
}

/// Prices in the operator's currency. GB means GiB throughout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    pub per_vcpu_second: f64,
    pub per_gb_second: f64,
    pub per_gb_month_storage: f64,
}

impl Default for Prices {
    /// About $0.029 per vCPU-hour, $0.0072 per GB-hour of memory and $0.15 per GB-month
    /// of disk: the order of magnitude of public per-second cloud pricing.
    fn default() -> Self {
        Prices {
            per_vcpu_second: 0.000_008,
            per_gb_second: 0.000_002,
            per_gb_month_storage: 0.15,
        }
    }
}

impl Prices {
    pub fn cost(&self, quantities: &Quantities) -> f64 {
        quantities.cpu_seconds() * self.per_vcpu_second
            + quantities.memory_gb_seconds() * self.per_gb_second
            + (quantities.storage_gb_hours() + quantities.checkpoint_storage_gb_hours())
                * self.per_gb_month_storage
                / HOURS_PER_MONTH
    }
}

/// Splits `[start, end)` at UTC midnights: `(day index since the epoch, start, end)`.
pub fn split_by_day(start_ms: i64, end_ms: i64) -> Vec<(i64, i64, i64)> {
    let mut pieces = Vec::new();
    let mut cursor = start_ms;
    while cursor < end_ms {
        let day = cursor.div_euclid(DAY_MS);
        let day_end = ((day + 1) * DAY_MS).min(end_ms);
        pieces.push((day, cursor, day_end));
        cursor = day_end;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::CloseBasis;
    use proptest::prelude::*;

    fn record(seq: u64, kind: UsageKind, at_ms: i64) -> UsageRecord {
        UsageRecord {
            seq,
            machine_id: "m1".into(),
            app: "a".into(),
            kind,
            at_ms,
            cpus: 2,
            memory_mb: 512,
            storage_bytes: if kind == UsageKind::Storage {
                1 << 30
            } else {
                0
            },
            basis: (kind == UsageKind::RunStop).then_some(CloseBasis::Observed),
        }
    }

    fn totals(records: &[UsageRecord], window: Window, now_ms: i64) -> Quantities {
        let mut meter = Meter::new();
        records.iter().for_each(|r| meter.apply(r));
        let mut quantities = Quantities::default();
        for interval in meter.intervals() {
            if let Some((start, end)) = window.clip(interval.start_ms, interval.end_ms, now_ms) {
                quantities.add_span(interval.kind, start, end);
            }
        }
        quantities
    }

    #[test]
    fn runs_bill_compute_and_stopped_time_bills_none() {
        let records = [
            record(1, UsageKind::Created, 0),
            record(2, UsageKind::RunStart, 1_000),
            record(3, UsageKind::RunStop, 3_500),
            record(4, UsageKind::RunStart, 10_000),
            record(5, UsageKind::RunStop, 10_250),
        ];
        let all = Window {
            from_ms: 0,
            to_ms: 100_000,
        };
        let quantities = totals(&records, all, 100_000);
        assert_eq!(quantities.running_ms, 2_750);
        assert_eq!(quantities.cpu_ms, 5_500);
        assert!((quantities.memory_gb_seconds() - 2.75 * 0.5).abs() < 1e-9);
        // The stopped gap between 3.5 s and 10 s bills nothing.
        let gap = Window {
            from_ms: 3_500,
            to_ms: 10_000,
        };
        assert_eq!(totals(&records, gap, 100_000).running_ms, 0);
    }

    #[test]
    fn the_window_cuts_intervals_at_its_edges_exactly() {
        let records = [
            record(1, UsageKind::RunStart, 1_000),
            record(2, UsageKind::RunStop, 5_000),
        ];
        assert_eq!(
            totals(
                &records,
                Window {
                    from_ms: 2_000,
                    to_ms: 3_000
                },
                9_000
            )
            .running_ms,
            1_000
        );
        assert_eq!(
            totals(
                &records,
                Window {
                    from_ms: 0,
                    to_ms: 1_001
                },
                9_000
            )
            .running_ms,
            1
        );
        // An open run counts until now.
        let open = [record(1, UsageKind::RunStart, 1_000)];
        assert_eq!(
            totals(
                &open,
                Window {
                    from_ms: 0,
                    to_ms: 50_000
                },
                4_000
            )
            .running_ms,
            3_000
        );
    }

    #[test]
    fn storage_is_billed_while_the_machine_exists() {
        let records = [
            record(1, UsageKind::Created, 0),
            record(2, UsageKind::Storage, 3_600_000),
            record(3, UsageKind::Destroyed, 7_200_000),
        ];
        let quantities = totals(
            &records,
            Window {
                from_ms: 0,
                to_ms: 10 * 3_600_000,
            },
            10 * 3_600_000,
        );
        assert!(
            (quantities.storage_gb_hours() - 1.0).abs() < 1e-9,
            "{}",
            quantities.storage_gb_hours()
        );
    }

    #[test]
    fn checkpoints_are_billed_apart_from_the_disk_and_end_with_the_machine() {
        let mut checkpoints = record(3, UsageKind::CheckpointStorage, 3_600_000);
        checkpoints.storage_bytes = 2 << 30;
        let mut none = record(4, UsageKind::CheckpointStorage, 5_400_000);
        none.storage_bytes = 0;
        let records = [
            record(1, UsageKind::Created, 0),
            record(2, UsageKind::Storage, 0),
            checkpoints,
            none,
            record(5, UsageKind::Destroyed, 7_200_000),
        ];
        let quantities = totals(
            &records,
            Window {
                from_ms: 0,
                to_ms: 10 * 3_600_000,
            },
            10 * 3_600_000,
        );
        // 2 GiB for half an hour; the disk's 1 GiB for two hours, counted apart.
        assert!((quantities.checkpoint_storage_gb_hours() - 1.0).abs() < 1e-9);
        assert!((quantities.storage_gb_hours() - 2.0).abs() < 1e-9);
        let prices = Prices::default();
        let expected = 3.0 * prices.per_gb_month_storage / HOURS_PER_MONTH;
        assert!((prices.cost(&quantities) - expected).abs() < 1e-12);
    }

    #[test]
    fn days_split_at_utc_midnight() {
        assert_eq!(
            split_by_day(DAY_MS - 10, DAY_MS + 5),
            vec![(0, DAY_MS - 10, DAY_MS), (1, DAY_MS, DAY_MS + 5)]
        );
        assert!(split_by_day(5, 5).is_empty());
    }

    #[test]
    fn cost_uses_every_price() {
        let mut quantities = Quantities::default();
        quantities.add_span(
            IntervalKind::Run {
                cpus: 1,
                memory_mb: 1024,
            },
            0,
            1_000,
        );
        let prices = Prices {
            per_vcpu_second: 1.0,
            per_gb_second: 10.0,
            per_gb_month_storage: 0.0,
        };
        assert!((prices.cost(&quantities) - 11.0).abs() < 1e-9);
    }

    proptest! {
        /// Splitting a window into pieces never changes the total: edges cut exactly, with
        /// nothing lost or counted twice.
        #[test]
        fn windows_add_up(starts in proptest::collection::vec((0i64..1_000_000, 1i64..50_000), 1..20), cut in 0i64..1_100_000) {
            let mut records = Vec::new();
            let mut at = 0;
            for (seq, (gap, run)) in starts.iter().enumerate() {
                at += gap;
                records.push(record(seq as u64 * 2, UsageKind::RunStart, at));
                at += run;
                records.push(record(seq as u64 * 2 + 1, UsageKind::RunStop, at));
            }
            let whole = totals(&records, Window { from_ms: 0, to_ms: i64::MAX }, at);
            let left = totals(&records, Window { from_ms: 0, to_ms: cut }, at);
            let right = totals(&records, Window { from_ms: cut, to_ms: i64::MAX }, at);
            prop_assert_eq!(whole.running_ms, left.running_ms + right.running_ms);
            let expected: i64 = starts.iter().map(|(_, run)| run).sum();
            prop_assert_eq!(whole.running_ms, expected);
        }
    }
}
