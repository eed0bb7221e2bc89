//! The usage ledger against real SQLite: whatever the delivery schedule (batches of any
//! size, repeats, replays of old batches, a crash between ingesting and acknowledging),
//! the ingested ledger equals the journal, and the stored intervals equal the ones the
//! billing maths derives from the journal directly.

use berth_api::{CloseBasis, UsageKind, UsageRecord};
use berth_control::store::ControlStore;
use berth_control::usage::{self, StoredInterval};
use berth_core::billing::{Meter, Window};
use proptest::prelude::*;
use sqlx::Row;

const MACHINES: usize = 3;
const VOLUMES: usize = 2;

/// The journal's id of Machine or volume `index`: the last ones are volumes.
fn subject_id(index: usize) -> String {
    if index < MACHINES {
        format!("0000000000000{index}")
    } else {
        format!("vol_000000000000000{index}")
    }
}

/// A journal that a correct agent could write: per Machine, created, then runs and
/// storage samples, maybe destroyed; per volume, created at its size, extends to larger
/// sizes, maybe deleted.
fn journal_strategy() -> impl Strategy<Value = Vec<UsageRecord>> {
    proptest::collection::vec(
        (
            0usize..MACHINES + VOLUMES,
            0u8..5,
            1i64..5_000,
            0u64..1_000_000,
        ),
        1..60,
    )
    .prop_map(|steps| {
        let mut journal = Vec::new();
        let mut now = 1_000_000i64;
        // Per machine or volume: (created, running, destroyed)
        let mut machines = [(false, false, false); MACHINES + VOLUMES];
        // Each volume's provisioned size.
        let mut sizes = [0u64; MACHINES + VOLUMES];
        for (machine, action, gap, bytes) in steps {
            now += gap;
            let (created, running, destroyed) = &mut machines[machine];
            if *destroyed {
                continue;
            }
            if machine >= MACHINES {
                let kind = match action {
                    _ if !*created => {
                        *created = true;
                        sizes[machine] = (1 + bytes % 4) << 30;
                        UsageKind::Created
                    }
                    0..=3 => {
                        sizes[machine] += (1 + bytes % 4) << 30;
                        UsageKind::Storage
                    }
                    _ => {
                        *destroyed = true;
                        UsageKind::Destroyed
                    }
                };
                journal.push(UsageRecord {
                    seq: journal.len() as u64 + 1,
                    machine_id: subject_id(machine),
                    app: format!("app{}", machine % 2),
                    kind,
                    at_ms: now,
                    cpus: 0,
                    memory_mb: 0,
                    storage_bytes: sizes[machine],
                    basis: None,
                });
                continue;
            }
            let kind = if !*created {
                *created = true;
                UsageKind::Created
            } else {
                match action {
                    0 | 1 if !*running => {
                        *running = true;
                        UsageKind::RunStart
                    }
                    0 | 1 => {
                        *running = false;
                        UsageKind::RunStop
                    }
                    2 | 3 => UsageKind::Storage,
                    _ => {
                        *destroyed = true;
                        *running = false;
                        UsageKind::Destroyed
                    }
                }
            };
            journal.push(UsageRecord {
                seq: journal.len() as u64 + 1,
                machine_id: subject_id(machine),
                app: format!("app{}", machine % 2),
                kind,
                at_ms: now,
                cpus: 1 + machine as u32,
                memory_mb: 256,
                storage_bytes: if kind == UsageKind::Storage { bytes } else { 0 },
                basis: (kind == UsageKind::RunStop).then_some(CloseBasis::Observed),
            });
        }
        journal
    })
}

/// Each volume's provisioned byte-milliseconds up to `now`, straight from the journal:
/// what its life must be billed, once.
fn volume_byte_ms(journal: &[UsageRecord], now: i64) -> std::collections::BTreeMap<String, i128> {
    let mut open: std::collections::BTreeMap<String, (i64, u64)> = Default::default();
    let mut billed: std::collections::BTreeMap<String, i128> = Default::default();
    for record in journal.iter().filter(|r| r.machine_id.starts_with("vol_")) {
        if let Some((since, bytes)) = open.remove(&record.machine_id) {
            *billed.entry(record.machine_id.clone()).or_default() +=
                i128::from(record.at_ms - since) * i128::from(bytes);
        }
        if record.kind != UsageKind::Destroyed {
            open.insert(
                record.machine_id.clone(),
                (record.at_ms, record.storage_bytes),
            );
        }
    }
    for (id, (since, bytes)) in open {
        *billed.entry(id).or_default() += i128::from(now - since) * i128::from(bytes);
    }
    billed
}

async fn ledger_rows(store: &ControlStore) -> Vec<(i64, String, String, i64)> {
    sqlx::query("SELECT seq, machine_id, kind, at_ms FROM usage_ledger ORDER BY seq")
        .fetch_all(store.pool())
        .await
        .expect("ledger")
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

fn expected_intervals(journal: &[UsageRecord]) -> Vec<StoredInterval> {
    let mut meter = Meter::new();
    journal.iter().for_each(|record| meter.apply(record));
    let mut intervals: Vec<StoredInterval> = meter
        .intervals()
        .into_iter()
        .map(|interval| StoredInterval {
            app: interval.app,
            machine_id: interval.machine_id,
            kind: interval.kind,
            start_ms: interval.start_ms,
            end_ms: interval.end_ms,
        })
        .collect();
    intervals.sort_by_key(|interval| {
        (
            interval.machine_id.clone(),
            interval.start_ms,
            format!("{:?}", interval.kind),
        )
    });
    intervals
}

async fn deliver(journal: Vec<UsageRecord>, schedule: Vec<(usize, bool, bool)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ControlStore::open(&dir.path().join("control.db"))
        .await
        .expect("store");
    usage::migrate(store.pool()).await.expect("migrate");
    for machine in 0..MACHINES + VOLUMES {
        usage::record_owner(
            store.pool(),
            &subject_id(machine),
            &format!("app{}", machine % 2),
            "org",
        )
        .await
        .expect("owner");
    }
    let mut schedule = schedule.into_iter().cycle();
    let mut delivered_batches: Vec<Vec<UsageRecord>> = Vec::new();
    loop {
        let cursor = usage::cursor(store.pool(), "w1").await.expect("cursor") as usize;
        if cursor >= journal.len() {
            break;
        }
        let (size, replay_old, lose_ack) = schedule.next().unwrap_or((1, false, false));
        let batch: Vec<UsageRecord> = journal[cursor..journal.len().min(cursor + size)].to_vec();
        if replay_old {
            // A late duplicate of something already ingested.
            if let Some(old) = delivered_batches.first() {
                usage::ingest(store.pool(), "w1", old)
                    .await
                    .expect("replay");
            }
        }
        if lose_ack {
            // The sender never hears back and sends the same batch again.
            usage::ingest(store.pool(), "w1", &batch)
                .await
                .expect("first send");
        }
        usage::ingest(store.pool(), "w1", &batch)
            .await
            .expect("ingest");
        delivered_batches.push(batch);
    }
    let ledger = ledger_rows(&store).await;
    let expected: Vec<(i64, String, String, i64)> = journal
        .iter()
        .map(|record| {
            let kind = serde_json::to_value(record.kind).expect("kind");
            (
                record.seq as i64,
                record.machine_id.clone(),
                kind.as_str().unwrap_or_default().to_owned(),
                record.at_ms,
            )
        })
        .collect();
    assert_eq!(ledger, expected, "the ledger equals the journal");
    let mut stored = usage::intervals(
        store.pool(),
        Some("org"),
        Window {
            from_ms: 0,
            to_ms: i64::MAX,
        },
    )
    .await
    .expect("intervals");
    stored.sort_by_key(|interval| {
        (
            interval.machine_id.clone(),
            interval.start_ms,
            format!("{:?}", interval.kind),
        )
    });
    let derived = expected_intervals(&journal);
    assert_eq!(stored, derived, "SQL intervals equal the billing maths");

    // Each volume's whole life is billed once at its provisioned sizes, whatever the
    // retries, as its own row keyed by its id.
    let end = journal
        .last()
        .map_or(2_000_000, |record| record.at_ms + 1_000);
    let whole = Window {
        from_ms: 0,
        to_ms: end,
    };
    let by_subject = usage::aggregate(store.pool(), "org", whole, end, usage::GroupBy::Machine)
        .await
        .expect("aggregate");
    for (id, byte_ms) in volume_byte_ms(&journal, end) {
        let row = by_subject[&id];
        assert!(
            (row.storage_byte_ms - byte_ms).abs() <= 1024,
            "{id}: billed {} of {byte_ms}",
            row.storage_byte_ms
        );
        assert_eq!((row.running_ms, row.cpu_ms), (0, 0), "{id}");
    }

    // The SQL sums for machine and app equal the sums over the intervals, for a window
    // that cuts some of them.
    let now = journal
        .last()
        .map(|record| record.at_ms + 1_000)
        .unwrap_or(2_000_000);
    let window = Window {
        from_ms: 1_000_000 + (now - 1_000_000) / 3,
        to_ms: now - 500,
    };
    let all = usage::intervals(store.pool(), Some("org"), window)
        .await
        .expect("intervals");
    for group_by in [usage::GroupBy::Machine, usage::GroupBy::App] {
        let expected = usage::report_rows(&all, window, now, group_by);
        let summed = usage::aggregate(store.pool(), "org", window, now, group_by)
            .await
            .expect("aggregate");
        assert_eq!(
            summed.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        for (key, quantities) in &summed {
            let want = expected[key];
            assert_eq!(
                (
                    quantities.running_ms,
                    quantities.cpu_ms,
                    quantities.memory_mib_ms
                ),
                (want.running_ms, want.cpu_ms, want.memory_mib_ms),
                "{group_by:?} {key}"
            );
            assert!(
                (quantities.storage_byte_ms - want.storage_byte_ms).abs() <= 1024,
                "{group_by:?} {key}"
            );
        }
    }
    store.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn any_delivery_schedule_ingests_the_journal_exactly_once(
        journal in journal_strategy(),
        schedule in proptest::collection::vec((1usize..8, any::<bool>(), any::<bool>()), 1..10),
    ) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(deliver(journal, schedule));
    }
}
