//! `Runtime::freeze`, which a checkpoint of a running Machine's disk relies on: while
//! frozen, none of the Machine's processes runs (a counter writing to its log stands
//! still); thawed, they run on where they were, with their memory. Against all three
//! drivers (cgroup v2's `cgroup.freeze` for native, `runc pause`, `runsc pause`).
//!
//! Proof that the test can fail: with `freeze` answering `Ok(())` without touching the
//! Machine, the counter went on counting across the frozen window and the test failed on
//! "counted while frozen".

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_runtime::Status;
use common::{Driver, Fixture};

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo \"count $i\"; sleep 0.02; done";

fn last_count(logs: &str) -> u64 {
    logs.lines()
        .rev()
        .find_map(|line| line.strip_prefix("count ")?.trim().parse().ok())
        .unwrap_or(0)
}

async fn frozen_processes_stand_still(driver: Driver) {
    let f = Fixture::of(driver, "freeze");
    f.runtime
        .prepare(&f.layout, &f.spec(&["sh", "-c", COUNTER]))
        .await
        .unwrap();
    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    f.wait_logs("count 5", Duration::from_secs(30));

    f.runtime.freeze(&f.layout, true).await.unwrap();
    // Output the counter wrote just before the freeze may still be on its way to the log.
    std::thread::sleep(Duration::from_millis(300));
    let at_freeze = last_count(&f.logs());
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(last_count(&f.logs()), at_freeze, "counted while frozen");
    assert!(matches!(
        f.runtime.status(&f.layout).await.unwrap(),
        Status::Running { .. }
    ));

    f.runtime.freeze(&f.layout, false).await.unwrap();
    let next = format!("count {}", at_freeze + 5);
    let logs = f.wait_logs(&next, Duration::from_secs(30));
    // It went on from where it stood: no restart from 1.
    assert_eq!(logs.matches("count 1\n").count(), 1, "{logs}");
    f.runtime.signal(&f.layout, 9).await.unwrap();
    f.runtime
        .wait_exit(&f.layout, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    f.runtime.cleanup(&f.layout).await.unwrap();
    f.runtime.remove(&f.layout).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn native_freeze_stops_every_process_until_thawed() {
    frozen_processes_stand_still(Driver::Native).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runc_freeze_stops_every_process_until_thawed() {
    frozen_processes_stand_still(Driver::Runc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_freeze_stops_every_process_until_thawed() {
    if common::runsc_available() {
        frozen_processes_stand_still(Driver::Gvisor).await;
    }
}
