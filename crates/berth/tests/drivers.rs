//! End-to-end: one `berth up` worker runs Machines with native and with real runc at once,
//! each with the driver its `config.runtime` names, across stop/start, a restart of
//! `berth up` and an update that switches the driver.

mod common;

use std::time::Duration;

use berth_api::{Machine, MachineState};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::json;

const APP: &str = "mixed";
const SCRIPT: &str = "echo \"boot in $(hostname)\"; exec sleep 3600";

fn body(runtime: Option<&str>) -> serde_json::Value {
    let mut config = json!({"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", SCRIPT]}});
    if let Some(runtime) = runtime {
        config["runtime"] = json!(runtime);
    }
    json!({ "config": config })
}

fn create(platform: &Platform, runtime: Option<&str>) -> Machine {
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(body(runtime)),
    );
    assert_eq!(status, 200, "{answer}");
    serde_json::from_value(answer).expect("machine")
}

fn post(platform: &Platform, id: &str, action: &str) -> serde_json::Value {
    let path = format!("/v1/apps/{APP}/machines/{id}/{action}");
    let (status, answer) = platform.call(Method::POST, &path, Some(json!({})));
    assert_eq!(status, 200, "{path}: {answer}");
    answer
}

/// The containers real runc holds for this worker: the Machines runc runs now.
fn runc_containers(platform: &Platform) -> Vec<String> {
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(platform.runc_root())
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    assert!(listed.status.success(), "runc list: {listed:?}");
    let mut ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids
}

/// Whether the Machine's init, by the pid its supervisor recorded, is alive on the host.
fn init_alive(platform: &Platform, id: &str) -> bool {
    let pid_file = platform
        .data_dir
        .path()
        .join("worker/machines")
        .join(id)
        .join("run/init.pid");
    let Ok(pid) = std::fs::read_to_string(pid_file) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    state.is_some_and(|state| state != "Z")
}

/// Waits until the Machine has logged `count` boots.
fn boots(platform: &Platform, id: &str, count: usize) {
    let line = format!("boot in {id}");
    platform.wait_for(
        &format!("{count} boots of {id}"),
        Duration::from_secs(20),
        || platform.logs(APP, id).matches(&line).count() >= count,
    );
}

/// Both Machines run, each under its own driver: runc holds exactly the runc one, and
/// the native one runs without runc.
fn check_drivers(platform: &Platform, on_runc: &str, on_native: &str) {
    for id in [on_runc, on_native] {
        assert_eq!(
            platform.machine(APP, id).state,
            MachineState::Started,
            "{id}"
        );
    }
    assert_eq!(runc_containers(platform), [on_runc.to_owned()]);
    assert!(init_alive(platform, on_native), "{on_native} runs natively");
    assert!(init_alive(platform, on_runc), "{on_runc} runs under runc");
}

// Without the change `config.runtime` was ignored: this platform runs every Machine with
// its one default driver (native), so `runc list` is empty, `GET /v1/workers` has no
// `runtimes`, and the Machine JSON names no driver.
#[test]
fn one_worker_runs_native_and_runc_machines_side_by_side() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", APP]);

    let (status, workers) = platform.call(Method::GET, "/v1/workers", None);
    assert_eq!(status, 200, "{workers}");
    // gvisor is offered beside them where runsc is installed (CI installs it).
    let offered = if std::path::Path::new("/usr/bin/runsc").exists() {
        json!(["gvisor", "native", "runc"])
    } else {
        json!(["native", "runc"])
    };
    assert_eq!(workers[0]["runtimes"], offered, "{workers}");

    let runc = create(&platform, Some("runc"));
    let native = create(&platform, None);
    assert_eq!(runc.config.runtime.as_deref(), Some("runc"));
    // The default of `berth up` without `--runtime`.
    assert_eq!(native.config.runtime.as_deref(), Some("native"));
    boots(&platform, &runc.id, 1);
    boots(&platform, &native.id, 1);
    check_drivers(&platform, &runc.id, &native.id);

    // Stop and start both: each stops under its driver and starts under it again.
    for id in [&runc.id, &native.id] {
        post(&platform, id, "stop");
    }
    assert!(runc_containers(&platform).is_empty(), "runc's run ended");
    assert!(!init_alive(&platform, &native.id));
    for id in [&runc.id, &native.id] {
        assert_eq!(post(&platform, id, "start")["machine"]["state"], "started");
        boots(&platform, id, 2);
    }
    check_drivers(&platform, &runc.id, &native.id);

    // A restart of `berth up` finds each Machine running under its driver, and drives it
    // with that driver afterwards.
    platform.shutdown();
    platform.boot();
    check_drivers(&platform, &runc.id, &native.id);
    for id in [&runc.id, &native.id] {
        assert_eq!(platform.machine(APP, id).config.runtime, {
            if *id == runc.id {
                Some("runc".to_owned())
            } else {
                Some("native".to_owned())
            }
        });
        post(&platform, id, "stop");
    }
    assert!(runc_containers(&platform).is_empty());
    for id in [&runc.id, &native.id] {
        post(&platform, id, "start");
        boots(&platform, id, 3);
    }
    check_drivers(&platform, &runc.id, &native.id);

    // An update switches each to the other driver, as an image change re-lays it out.
    for (id, to) in [(&runc.id, "native"), (&native.id, "runc")] {
        let (status, updated) = platform.call(
            Method::POST,
            &format!("/v1/apps/{APP}/machines/{id}"),
            Some(body(Some(to))),
        );
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["config"]["runtime"], to, "{updated}");
        assert_eq!(updated["state"], "started", "{updated}");
        boots(&platform, id, 4);
    }
    check_drivers(&platform, &native.id, &runc.id);

    // An update that names no driver (Fly's clients) keeps it.
    let (status, kept) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{}", native.id),
        Some(body(None)),
    );
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["config"]["runtime"], "runc", "{kept}");
    boots(&platform, &native.id, 5);
    check_drivers(&platform, &native.id, &runc.id);

    for id in [&runc.id, &native.id] {
        let (status, answer) = platform.call(
            Method::DELETE,
            &format!("/v1/apps/{APP}/machines/{id}?force=true"),
            None,
        );
        assert_eq!(status, 200, "{answer}");
    }
    assert!(runc_containers(&platform).is_empty());
    platform.teardown();
}
