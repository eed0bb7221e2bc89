//! Usage metering end to end: billed running time matches what a client measured, stopped
//! time bills nothing, and crashes neither lose nor double an interval.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_api::{Machine, MachineState, UsageReport};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::json;

/// Billed time may differ from what the client saw by the API's own latency on each end.
const TOLERANCE_MS: f64 = 20.0;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn create_stopped(platform: &Platform, app: &str) -> Machine {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(
            json!({"skip_launch": true, "config": {"image": "demo/busybox:1",
            "init": {"cmd": ["sleep", "3600"]}, "guest": {"cpus": 2, "memory_mb": 512},
            "stop_config": {"signal": "SIGKILL"}}}),
        ),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("machine")
}

fn usage(platform: &Platform, from_ms: i64, to_ms: i64, group_by: &str) -> UsageReport {
    let (status, body) = platform.call(
        Method::GET,
        &format!("/v1/orgs/personal/usage?from={from_ms}&to={to_ms}&group_by={group_by}"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("usage report")
}

fn billed_ms(platform: &Platform, from_ms: i64, to_ms: i64) -> f64 {
    usage(platform, from_ms, to_ms, "machine")
        .total
        .running_seconds
        * 1000.0
}

/// (start sent, start answered, stop sent, stop answered), client clock.
type Run = (i64, i64, i64, i64);

fn run_once(platform: &Platform, base: &str, run_for: Duration) -> Run {
    let start_sent = now_ms();
    let (status, body) = platform.call(Method::POST, &format!("{base}/start"), None);
    assert_eq!(status, 200, "{body}");
    let start_done = now_ms();
    std::thread::sleep(run_for);
    let stop_sent = now_ms();
    let (status, body) = platform.call(Method::POST, &format!("{base}/stop"), None);
    assert_eq!(status, 200, "{body}");
    (start_sent, start_done, stop_sent, now_ms())
}

fn assert_billed_within(billed: f64, run: Run) {
    let (start_sent, start_done, stop_sent, stop_done) = run;
    let shortest = (stop_sent - start_done) as f64 - TOLERANCE_MS;
    let longest = (stop_done - start_sent) as f64 + TOLERANCE_MS;
    assert!(
        (shortest..=longest).contains(&billed),
        "billed {billed} ms, client saw {shortest}..{longest} ms"
    );
}

/// (kind, basis) of each journal entry of a Machine, as ingested by the control plane.
fn ledger(platform: &Platform, machine: &str) -> Vec<(String, Option<String>)> {
    common::control_store_rows(
        &platform.control_store,
        "SELECT kind, basis FROM usage_ledger WHERE machine_id = $1 ORDER BY seq",
        &[machine],
        |row| {
            use sqlx::Row;
            (row.get(0), row.get(1))
        },
    )
}

fn count(entries: &[(String, Option<String>)], kind: &str) -> usize {
    entries.iter().filter(|(entry, _)| entry == kind).count()
}

#[test]
fn billed_running_time_matches_what_the_client_saw() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "meter"]);
    let machine = create_stopped(&platform, "meter");
    let base = format!("/v1/apps/meter/machines/{}", machine.id);
    let seed = now_ms() as u64;
    println!("seed {seed}");
    let mut state = seed;
    let mut runs = Vec::new();
    for _ in 0..5 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let run_for = Duration::from_millis(100 + (state >> 33) % 400);
        runs.push(run_once(&platform, &base, run_for));
        std::thread::sleep(Duration::from_millis(50 + (state >> 40) % 200));
    }
    for (index, run) in runs.iter().enumerate() {
        // Each run on its own, in a window around it.
        let window_end = runs
            .get(index + 1)
            .map(|next| next.0)
            .unwrap_or_else(now_ms);
        assert_billed_within(billed_ms(&platform, run.0 - 1, window_end), *run);
        // Stopped time bills no compute.
        let report = usage(&platform, run.3, window_end, "machine");
        assert_eq!(
            report.total.running_seconds, 0.0,
            "stopped time was billed: {report:?}"
        );
        assert_eq!(report.total.cpu_seconds, 0.0);
    }
    // Summed over the whole series, CPU and memory follow the guest size.
    let report = usage(&platform, runs[0].0 - 1, now_ms(), "machine");
    let total = report.total;
    assert!(
        (total.cpu_seconds - 2.0 * total.running_seconds).abs() < 1e-3,
        "{total:?}"
    );
    assert!(
        (total.memory_gb_seconds - 0.5 * total.running_seconds).abs() < 1e-3,
        "{total:?}"
    );
    assert!(total.cost > 0.0);
    let by_app = usage(&platform, runs[0].0 - 1, now_ms(), "app");
    assert_eq!(by_app.rows.len(), 1);
    assert_eq!(by_app.rows[0].app.as_deref(), Some("meter"));
    let csv = platform
        .request(
            Method::GET,
            &format!(
                "/v1/orgs/personal/usage?from={}&group_by=day",
                runs[0].0 - 1
            ),
        )
        .header("accept", "text/csv")
        .send()
        .expect("csv")
        .text()
        .expect("csv text");
    assert!(
        csv.starts_with(
            "day,running_seconds,cpu_seconds,memory_gb_seconds,storage_gb_hours,cost\n"
        ),
        "{csv}"
    );
    let entries = ledger(&platform, &machine.id);
    assert_eq!(count(&entries, "run_start"), 5);
    assert_eq!(count(&entries, "run_stop"), 5);
    assert!(
        count(&entries, "storage") >= 5,
        "storage is measured at every stop: {entries:?}"
    );
    let (status, _) = platform.call(Method::GET, "/v1/orgs/personal/usage?group_by=week", None);
    assert_eq!(status, 400);
    let (status, _) = platform.call(Method::GET, "/v1/orgs/nobody/usage", None);
    assert_eq!(status, 404);
    platform.teardown();
}

#[test]
fn a_crash_of_the_agent_neither_splits_nor_loses_a_running_interval() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "crashy"]);
    let machine = create_stopped(&platform, "crashy");
    let base = format!("/v1/apps/crashy/machines/{}", machine.id);
    let start_sent = now_ms();
    let (status, body) = platform.call(Method::POST, &format!("{base}/start"), None);
    assert_eq!(status, 200, "{body}");
    let start_done = now_ms();
    std::thread::sleep(Duration::from_millis(300));
    platform.crash();
    std::thread::sleep(Duration::from_millis(500));
    platform.boot();
    assert_eq!(
        platform.machine("crashy", &machine.id).state,
        MachineState::Started
    );
    std::thread::sleep(Duration::from_millis(200));
    let stop_sent = now_ms();
    let (status, body) = platform.call(Method::POST, &format!("{base}/stop"), None);
    assert_eq!(status, 200, "{body}");
    let run = (start_sent, start_done, stop_sent, now_ms());
    assert_billed_within(billed_ms(&platform, start_sent - 1, now_ms()), run);
    let entries = ledger(&platform, &machine.id);
    assert_eq!(
        (count(&entries, "run_start"), count(&entries, "run_stop")),
        (1, 1),
        "{entries:?}"
    );
    platform.teardown();
}

#[test]
fn a_machine_that_died_while_the_agent_was_down_is_closed_at_the_best_known_time() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "dead"]);
    let with_exit = create_stopped(&platform, "dead");
    let without_exit = create_stopped(&platform, "dead");
    for machine in [&with_exit, &without_exit] {
        let (status, body) = platform.call(
            Method::POST,
            &format!("/v1/apps/dead/machines/{}/start", machine.id),
            None,
        );
        assert_eq!(status, 200, "{body}");
    }
    platform.crash();
    let run_dir = |id: &str| {
        platform
            .data_dir
            .path()
            .join("worker/machines")
            .join(id)
            .join("run")
    };
    let pid_in = |file: std::path::PathBuf| -> i32 {
        std::fs::read_to_string(&file)
            .expect("pid file")
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .expect("pid")
    };
    // One dies with its shim watching, which records the exit time.
    let init = pid_in(run_dir(&with_exit.id).join("init.pid"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill init");
    // The other dies with its shim, so nothing records when.
    let shim = pid_in(run_dir(&without_exit.id).join("shim.pid"));
    let init = pid_in(run_dir(&without_exit.id).join("init.pid"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill shim");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill init");
    std::thread::sleep(Duration::from_millis(300));
    platform.boot();
    for machine in [&with_exit, &without_exit] {
        platform.wait_for(
            "the dead machine to be stopped",
            Duration::from_secs(10),
            || platform.machine("dead", &machine.id).state == MachineState::Stopped,
        );
    }
    usage(&platform, 0, now_ms(), "machine");
    let closing = |id: &str| {
        ledger(&platform, id)
            .into_iter()
            .filter(|(kind, _)| kind == "run_stop")
            .map(|(_, basis)| basis)
            .collect::<Vec<_>>()
    };
    assert_eq!(closing(&with_exit.id), vec![Some("exit_time".to_string())]);
    assert_eq!(
        closing(&without_exit.id),
        vec![Some("last_liveness".to_string())]
    );
    platform.teardown();
}

#[cfg(feature = "failpoints")]
#[test]
fn a_crash_between_the_runtime_start_and_the_journal_write_loses_no_time() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "failpoint"]);
    let machine = create_stopped(&platform, "failpoint");
    platform.shutdown();
    platform.boot_with_env(&[("BERTH_FAILPOINTS", "start.after_runtime_start")]);
    let start_sent = now_ms();
    let response = platform
        .request(
            Method::POST,
            &format!("/v1/apps/failpoint/machines/{}/start", machine.id),
        )
        .send();
    assert!(response.is_err(), "the agent died before answering");
    platform.wait_exit();
    platform.boot();
    let recovered = platform.machine("failpoint", &machine.id);
    assert_eq!(
        recovered.state,
        MachineState::Started,
        "the Machine did start"
    );
    std::thread::sleep(Duration::from_millis(200));
    let stop_sent = now_ms();
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/failpoint/machines/{}/stop", machine.id),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let stop_done = now_ms();
    // The run is billed from when the process started, which /proc knows to 10 ms.
    let billed = billed_ms(&platform, start_sent - 1, now_ms());
    assert!(
        billed >= (stop_sent - start_sent) as f64 - TOLERANCE_MS - 10.0,
        "billed {billed}"
    );
    assert!(
        billed <= (stop_done - start_sent) as f64 + TOLERANCE_MS,
        "billed {billed}"
    );
    let entries = ledger(&platform, &machine.id);
    assert_eq!(
        (count(&entries, "run_start"), count(&entries, "run_stop")),
        (1, 1),
        "{entries:?}"
    );
    platform.teardown();
}
