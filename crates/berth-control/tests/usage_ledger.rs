//! The usage ledger against real SQLite: whatever the delivery schedule (batches of any
//! size, repeats, replays of old batches, a crash between ingesting and acknowledging),
//! the ingested ledger equals the journal, and the stored intervals equal the ones the
//! billing maths derives from the journal directly. Two replicas pulling at once, or one
//! dying mid-pass, change nothing either.

use berth_api::{CloseBasis, UsageKind, UsageRecord};
use berth_control::store::ControlStore;
use berth_control::usage::{self, StoredInterval};
use berth_core::billing::{Meter, Window};
use proptest::prelude::*;
use sqlx::Row;

#[path = "common/postgres.rs"]
mod postgres;

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

/// Records who owns each Machine and volume of the journal.
async fn record_owners(store: &ControlStore) {
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
}

async fn deliver(journal: Vec<UsageRecord>, schedule: Vec<(usize, bool, bool)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ControlStore::connect(&postgres::test_database(dir.path()).await)
        .await
        .expect("store");
    record_owners(&store).await;
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
    check_ledger(&store, &journal).await;
    store.close().await;
}

/// Two replicas pull the same worker's journal at once, each `(size, size, dies_after)` a
/// round: both passes run together, pulling up to their size, and when `dies_after` is
/// set the first replica's pass is dropped that many microseconds in (a replica killed
/// mid-pass: its transaction rolls back, its lock goes with its session).
async fn deliver_racing(journal: Vec<UsageRecord>, schedule: Vec<(usize, usize, Option<u64>)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = postgres::test_database(dir.path()).await;
    let first = ControlStore::connect(&database).await.expect("first");
    let second = ControlStore::connect(&database).await.expect("second");
    record_owners(&first).await;
    let pull = |size: usize| {
        let journal = &journal;
        move |after: u64| async move {
            let after = usize::try_from(after).unwrap_or(usize::MAX);
            Ok(journal
                .get(after..journal.len().min(after.saturating_add(size)))
                .unwrap_or_default()
                .to_vec())
        }
    };
    let mut schedule = schedule.into_iter().cycle();
    loop {
        let before = usage::cursor(first.pool(), "w1").await.expect("cursor");
        if before as usize >= journal.len() {
            break;
        }
        let (one, two, dies_after) = schedule.next().unwrap_or((1, 1, None));
        let first_pass = usage::ingest_pass(&first, "w1", pull(one));
        let second_pass = usage::ingest_pass(&second, "w1", pull(two));
        match dies_after {
            Some(micros) => {
                let dying =
                    tokio::time::timeout(std::time::Duration::from_micros(micros), first_pass);
                let (_, survived) = tokio::join!(dying, second_pass);
                survived.expect("second pass");
            }
            None => {
                let (a, b) = tokio::join!(first_pass, second_pass);
                a.expect("first pass");
                b.expect("second pass");
            }
        }
        if usage::cursor(first.pool(), "w1").await.expect("cursor") == before {
            // Neither got through this round (one died holding the lock): a plain pass.
            usage::ingest_pass(&second, "w1", pull(1))
                .await
                .expect("plain pass");
        }
    }
    check_ledger(&first, &journal).await;
    first.close().await;
    second.close().await;
}

/// The ledger equals `journal`, and its intervals and sums equal the billing maths'.
async fn check_ledger(store: &ControlStore, journal: &[UsageRecord]) {
    let ledger = ledger_rows(store).await;
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
    let derived = expected_intervals(journal);
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
    for (id, byte_ms) in volume_byte_ms(journal, end) {
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

    /// Replicas racing for one worker's journal, and replicas dying mid-pass, lose and
    /// double nothing.
    #[test]
    fn two_replicas_racing_and_dying_ingest_the_journal_exactly_once(
        journal in journal_strategy(),
        schedule in proptest::collection::vec(
            (1usize..8, 1usize..8, proptest::option::of(0u64..3_000)),
            1..10,
        ),
    ) {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime").block_on(deliver_racing(journal, schedule));
    }
}

/// Journals of two workers for Machines that move between them, as a correct pair of
/// agents writes them: the source closes the run at the halt and ends the Machine there
/// with `migrated_out` at the cutover; the destination starts it with `created` at the
/// same instant and opens a run when it boots it.
fn moving_journals() -> impl Strategy<Value = [Vec<UsageRecord>; 2]> {
    proptest::collection::vec(
        (0usize..MACHINES, 0u8..6, 1i64..5_000, 0u64..1_000_000),
        1..60,
    )
    .prop_map(|steps| {
        let mut journals: [Vec<UsageRecord>; 2] = [Vec::new(), Vec::new()];
        let mut now = 1_000_000i64;
        // Per Machine: (created, running, its worker)
        let mut machines = [(false, false, 0usize); MACHINES];
        for (machine, action, gap, bytes) in steps {
            now += gap;
            let (created, running, worker) = &mut machines[machine];
            let mut push = |on: usize, kind: UsageKind, at_ms: i64, storage_bytes: u64| {
                let journal = &mut journals[on];
                journal.push(UsageRecord {
                    seq: journal.len() as u64 + 1,
                    machine_id: subject_id(machine),
                    app: format!("app{}", machine % 2),
                    kind,
                    at_ms,
                    cpus: 1 + machine as u32,
                    memory_mb: 256,
                    storage_bytes,
                    basis: (kind == UsageKind::RunStop).then_some(CloseBasis::Observed),
                });
            };
            if !*created {
                *created = true;
                push(*worker, UsageKind::Created, now, 0);
                continue;
            }
            match action {
                0 | 1 if !*running => {
                    *running = true;
                    push(*worker, UsageKind::RunStart, now, 0);
                }
                0 | 1 => {
                    *running = false;
                    push(*worker, UsageKind::RunStop, now, 0);
                }
                2 | 3 => push(*worker, UsageKind::Storage, now, bytes),
                _ => {
                    let was_running = *running;
                    if was_running {
                        push(*worker, UsageKind::RunStop, now, 0);
                    }
                    push(*worker, UsageKind::MigratedOut, now, 0);
                    *worker = 1 - *worker;
                    push(*worker, UsageKind::Created, now, bytes);
                    if was_running {
                        // Down from the halt to the boot on the destination: not billed.
                        now += gap / 10 + 1;
                        push(*worker, UsageKind::RunStart, now, 0);
                    }
                }
            }
        }
        journals
    })
}

fn sorted(mut intervals: Vec<StoredInterval>) -> Vec<StoredInterval> {
    intervals.sort_by_key(|interval| {
        (
            interval.machine_id.clone(),
            interval.start_ms,
            format!("{:?}", interval.kind),
        )
    });
    intervals
}

/// Two workers' journals delivered in any interleaving (with lost acknowledgements): the
/// SQL intervals equal the billing maths, no time of a Machine is billed twice, and its
/// storage is billed without a gap across its moves. (Closing intervals by Machine alone,
/// without the worker, fails this: a source's `migrated_out` that arrives after the
/// destination's `created` closes the destination's span.)
async fn deliver_moves(journals: [Vec<UsageRecord>; 2], schedule: Vec<(bool, usize, bool)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ControlStore::connect(&postgres::test_database(dir.path()).await)
        .await
        .expect("store");
    for machine in 0..MACHINES {
        usage::record_owner(
            store.pool(),
            &subject_id(machine),
            &format!("app{}", machine % 2),
            "org",
        )
        .await
        .expect("owner");
    }
    let names = ["w1", "w2"];
    let mut schedule = schedule.into_iter().cycle();
    loop {
        let mut cursors = [0usize; 2];
        for (index, name) in names.iter().enumerate() {
            cursors[index] = usage::cursor(store.pool(), name).await.expect("cursor") as usize;
        }
        let pending: Vec<usize> = (0..2)
            .filter(|&index| cursors[index] < journals[index].len())
            .collect();
        if pending.is_empty() {
            break;
        }
        let (second, size, lose_ack) = schedule.next().unwrap_or((false, 1, false));
        let index = if pending.len() == 2 {
            usize::from(second)
        } else {
            pending[0]
        };
        let journal = &journals[index];
        let batch = journal[cursors[index]..journal.len().min(cursors[index] + size)].to_vec();
        if lose_ack {
            usage::ingest(store.pool(), names[index], &batch)
                .await
                .expect("first send");
        }
        usage::ingest(store.pool(), names[index], &batch)
            .await
            .expect("ingest");
    }
    let mut meter = Meter::new();
    for (index, name) in names.iter().enumerate() {
        journals[index]
            .iter()
            .for_each(|record| meter.apply_on(name, record));
    }
    let derived = sorted(
        meter
            .intervals()
            .into_iter()
            .map(|interval| StoredInterval {
                app: interval.app,
                machine_id: interval.machine_id,
                kind: interval.kind,
                start_ms: interval.start_ms,
                end_ms: interval.end_ms,
            })
            .collect(),
    );
    let stored = sorted(
        usage::intervals(
            store.pool(),
            Some("org"),
            Window {
                from_ms: 0,
                to_ms: i64::MAX,
            },
        )
        .await
        .expect("intervals"),
    );
    assert_eq!(stored, derived, "SQL intervals equal the billing maths");
    for machine in 0..MACHINES {
        let id = subject_id(machine);
        for storage in [false, true] {
            let spans: Vec<&StoredInterval> = stored
                .iter()
                .filter(|interval| {
                    interval.machine_id == id
                        && matches!(
                            interval.kind,
                            berth_core::billing::IntervalKind::Storage { .. }
                        ) == storage
                })
                .collect();
            for pair in spans.windows(2) {
                let end = pair[0].end_ms.expect("only the last span is open");
                assert!(end <= pair[1].start_ms, "{id}: billed twice: {pair:?}");
                if storage {
                    assert_eq!(end, pair[1].start_ms, "{id}: storage not billed: {pair:?}");
                }
            }
        }
    }
    store.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn machines_moving_between_workers_are_billed_once_and_without_gaps(
        journals in moving_journals(),
        schedule in proptest::collection::vec((any::<bool>(), 1usize..8, any::<bool>()), 1..10),
    ) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(deliver_moves(journals, schedule));
    }
}
