//! End-to-end: the `berth` binary, real runc, overlayfs and namespaces.

mod common;

use std::time::Duration;

use berth_api::{Machine, MachineState};
use common::{busybox_image, busybox_image_with, Platform};
use reqwest::Method;
use serde_json::json;

fn create(platform: &Platform, app: &str, body: serde_json::Value) -> Machine {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(body),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("machine")
}

/// A start's `Server-Timing`: every layer's steps, in order, each with a duration, and
/// a total no smaller than the API's own first step.
fn check_start_steps(header: &str) {
    let steps: Vec<(&str, f64)> = header
        .split(", ")
        .map(|entry| {
            let (name, duration) = entry.split_once(";dur=").expect("name;dur=ms");
            (name, duration.parse().expect("milliseconds"))
        })
        .collect();
    let names: Vec<&str> = steps.iter().map(|(name, _)| *name).collect();
    let position = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no {name} in {header}"))
    };
    let order = [
        "api_request",
        "worker_hop",
        "agent_store_starting",
        "spawner_hop",
        "init_cgroups",
        "init_overlay",
        "init_seccomp_apply",
        "execve",
        "agent_store_started",
        "total",
    ];
    let positions: Vec<usize> = order.iter().map(|name| position(name)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{header}");
    let total = steps[position("total")].1;
    let summed: f64 = steps[..position("total")].iter().map(|(_, ms)| ms).sum();
    assert!(total > 0.0 && summed <= total + 0.05, "{header}");
}

fn post(platform: &Platform, path: &str) -> serde_json::Value {
    let (status, body) = platform.call(Method::POST, path, Some(json!({})));
    assert_eq!(status, 200, "{path}: {body}");
    body
}

#[test]
fn the_cli_drives_a_whole_lifecycle() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "myapp"]);
    let id = platform
        .cli_ok(&[
            "machine",
            "create",
            "--app",
            "myapp",
            "--image",
            "demo/busybox:1",
            "--",
            "/bin/sh",
            "-c",
            "echo booted; sleep 3600",
        ])
        .trim()
        .to_owned();
    assert_eq!(platform.machine("myapp", &id).state, MachineState::Started);

    let table = platform.cli_ok(&["machine", "list", "--app", "myapp"]);
    assert!(table.contains(&id) && table.contains("started"), "{table}");
    let listed: Vec<Machine> =
        serde_json::from_str(&platform.cli_ok(&["machine", "list", "--app", "myapp", "--json"]))
            .expect("json list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].image_ref.name, "demo/busybox:1");
    assert!(listed[0].image_ref.digest.starts_with("sha256:"));

    platform.wait_for("the boot line in the logs", Duration::from_secs(10), || {
        platform
            .cli_ok(&["machine", "logs", "--app", "myapp", &id])
            .contains("booted")
    });
    platform.cli_ok(&["machine", "stop", "--app", "myapp", &id]);
    assert_eq!(platform.machine("myapp", &id).state, MachineState::Stopped);
    platform.cli_ok(&["machine", "start", "--app", "myapp", &id]);
    assert_eq!(platform.machine("myapp", &id).state, MachineState::Started);
    platform.wait_for("a second boot line", Duration::from_secs(10), || {
        platform
            .cli_ok(&["machine", "logs", "--app", "myapp", &id])
            .matches("booted")
            .count()
            == 2
    });
    let refused = platform.cli(&["machine", "destroy", "--app", "myapp", &id]);
    assert!(
        !refused.status.success(),
        "destroying a started machine needs --force"
    );
    platform.cli_ok(&["machine", "destroy", "--app", "myapp", &id, "--force"]);
    let (status, body) = platform.call(Method::GET, &format!("/v1/apps/myapp/machines/{id}"), None);
    assert_eq!(status, 404, "{body}");
    assert!(
        !platform
            .data_dir
            .path()
            .join("worker/machines")
            .join(&id)
            .exists(),
        "destroy removes the machine's files"
    );
    platform.teardown();
}

#[test]
fn files_survive_stop_start_and_a_restart_of_berth_up() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "keep"]);
    let counter =
        "echo boot >> /data-boots; echo \"boots=$(wc -l < /data-boots)\"; exec sleep 3600";
    let machine = create(
        &platform,
        "keep",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", counter]}}}),
    );
    let base = format!("/v1/apps/keep/machines/{}", machine.id);
    let expect_boots = |platform: &Platform, count: usize| {
        platform.wait_for(&format!("boots={count}"), Duration::from_secs(10), || {
            platform
                .logs("keep", &machine.id)
                .contains(&format!("boots={count}"))
        });
    };
    expect_boots(&platform, 1);
    for boots in 2..=3 {
        let stopped = post(&platform, &format!("{base}/stop"));
        assert_eq!(stopped["previous_state"], "started");
        assert_eq!(stopped["machine"]["state"], "stopped");
        let response = platform
            .request(Method::POST, &format!("{base}/start"))
            .json(&json!({}))
            .send()
            .expect("start");
        assert_eq!(response.status().as_u16(), 200);
        let timing = response
            .headers()
            .get("server-timing")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .expect("start answers with a Server-Timing header");
        let started: serde_json::Value = response.json().expect("start body");
        assert_eq!(started["previous_state"], "stopped");
        assert_eq!(started["machine"]["state"], "started");
        assert!(
            started.get("timings").is_none(),
            "the steps travel in the header only: {started}"
        );
        check_start_steps(&timing);
        expect_boots(&platform, boots);
    }

    // A graceful restart of the platform must not touch running Machines.
    let before = platform.machine("keep", &machine.id);
    platform.shutdown();
    // The Machine's init, by the pid its supervisor recorded, is still running.
    let run_dir = platform
        .data_dir
        .path()
        .join("worker/machines")
        .join(&machine.id)
        .join("run");
    let init_pid = std::fs::read_to_string(run_dir.join("init.pid")).expect("init.pid");
    let stat =
        std::fs::read_to_string(format!("/proc/{}/stat", init_pid.trim())).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("gone");
    assert!(
        !stat.is_empty() && state != "Z",
        "machine must keep running while berth is down: {state}"
    );
    platform.boot();
    let after = platform.machine("keep", &machine.id);
    assert_eq!(after.state, MachineState::Started);
    assert_eq!(after.instance_id, before.instance_id);

    // A crash (kill -9) must not either; and it can still be stopped afterwards.
    platform.crash();
    platform.boot();
    assert_eq!(
        platform.machine("keep", &machine.id).state,
        MachineState::Started
    );
    post(&platform, &format!("{base}/stop"));
    post(&platform, &format!("{base}/start"));
    expect_boots(&platform, 4);
    platform.teardown();
}

#[test]
fn start_needs_no_image_tag_and_runs_the_content_resolved_at_create() {
    let platform = Platform::start();
    platform.import(busybox_image_with(&[("msg", "first")]), "demo/msg:1");
    platform.cli_ok(&["app", "create", "pin"]);
    let machine = create(
        &platform,
        "pin",
        json!({"config": {"image": "demo/msg:1", "init": {"cmd": ["/bin/sh", "-c", "echo msg=$(cat /msg); exec sleep 3600"]}}}),
    );
    let base = format!("/v1/apps/pin/machines/{}", machine.id);
    let first_digest = machine.image_ref.digest.clone();

    // New content under the same tag: start keeps running what create resolved.
    platform.import(busybox_image_with(&[("msg", "second")]), "demo/msg:1");
    post(&platform, &format!("{base}/stop"));
    post(&platform, &format!("{base}/start"));
    platform.wait_for(
        "two boots of the old content",
        Duration::from_secs(10),
        || {
            platform
                .logs("pin", &machine.id)
                .matches("msg=first")
                .count()
                == 2
        },
    );
    assert!(!platform.logs("pin", &machine.id).contains("msg=second"));

    // Deleting the tag does not break start either.
    // (The reference may also go in the path: `DELETE /v1/images/demo/msg:1`.)
    let (status, body) = platform.call(Method::DELETE, "/v1/images/demo/msg:1", None);
    assert_eq!(status, 204, "{body}");
    let (_, images) = platform.call(Method::GET, "/v1/images", None);
    assert!(
        !images
            .as_array()
            .into_iter()
            .flatten()
            .any(|image| image["name"] == "demo/msg:1"),
        "{images}"
    );
    post(&platform, &format!("{base}/stop"));
    post(&platform, &format!("{base}/start"));
    platform.wait_for("a third boot", Duration::from_secs(10), || {
        platform
            .logs("pin", &machine.id)
            .matches("msg=first")
            .count()
            == 3
    });

    // Only update picks up new content, with a new instance id.
    platform.import(busybox_image_with(&[("msg", "third")]), "demo/msg:1");
    let (status, body) = platform.call(
        Method::POST,
        &base,
        Some(json!({"config": {"image": "demo/msg:1", "init": {"cmd": ["/bin/sh", "-c", "echo msg=$(cat /msg); exec sleep 3600"]}}})),
    );
    assert_eq!(status, 200, "{body}");
    let updated: Machine = serde_json::from_value(body).expect("machine");
    assert_eq!(updated.state, MachineState::Started);
    assert_ne!(updated.instance_id, machine.instance_id);
    assert_ne!(updated.image_ref.digest, first_digest);
    platform.wait_for("the updated content", Duration::from_secs(10), || {
        platform.logs("pin", &machine.id).contains("msg=third")
    });
    platform.teardown();
}

#[test]
fn update_keeps_the_upperdir_unless_ephemeral() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "upd"]);
    let script = "echo x >> /state; echo lines=$(wc -l < /state); exec sleep 3600";
    let config = json!({"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", script]}});
    let machine = create(&platform, "upd", json!({ "config": config }));
    let base = format!("/v1/apps/upd/machines/{}", machine.id);
    platform.wait_for("lines=1", Duration::from_secs(10), || {
        platform.logs("upd", &machine.id).contains("lines=1")
    });
    let (status, body) = platform.call(Method::POST, &base, Some(json!({ "config": config })));
    assert_eq!(status, 200, "{body}");
    platform.wait_for("lines=2 after update", Duration::from_secs(10), || {
        platform.logs("upd", &machine.id).contains("lines=2")
    });
    let mut ephemeral = config.clone();
    ephemeral["rootfs"] = json!("ephemeral");
    let (status, body) = platform.call(Method::POST, &base, Some(json!({ "config": ephemeral })));
    assert_eq!(status, 200, "{body}");
    platform.wait_for("a fresh upperdir", Duration::from_secs(10), || {
        platform.logs("upd", &machine.id).matches("lines=1").count() == 2
    });
    platform.teardown();
}

#[test]
fn exits_are_detected_and_the_restart_policy_applies() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "exits"]);
    let quitter = create(
        &platform,
        "exits",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", "exit 3"]},
                      "restart": {"policy": "no"}}}),
    );
    platform.wait_for("the exit to be noticed", Duration::from_secs(10), || {
        platform.machine("exits", &quitter.id).state == MachineState::Stopped
    });
    let exit = platform
        .machine("exits", &quitter.id)
        .last_exit
        .expect("exit recorded");
    assert_eq!(exit.exit_code, Some(3));
    assert_eq!(exit.reason, "exited");
    assert!(!exit.exited_at.is_empty());

    let flaky = create(
        &platform,
        "exits",
        json!({"config": {"image": "demo/busybox:1",
                          "init": {"cmd": ["/bin/sh", "-c", "echo run; exit 1"]},
                          "restart": {"policy": "on-failure", "max_retries": 2}}}),
    );
    // Backoff is 1 s then 2 s: three runs in total, then it stays stopped.
    platform.wait_for("two restarts", Duration::from_secs(20), || {
        let machine = platform.machine("exits", &flaky.id);
        machine.restart_count == 2 && machine.state == MachineState::Stopped
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(platform.logs("exits", &flaky.id).matches("run").count(), 3);
    assert_eq!(
        platform.machine("exits", &flaky.id).state,
        MachineState::Stopped
    );
    platform.teardown();
}

#[test]
fn signal_and_restart_reach_the_machines_command() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "sig"]);
    // The shell traps USR1 and TERM; `sleep` in the background keeps `wait` interruptible.
    let script = "trap 'echo got-usr1' USR1; trap 'echo got-term; exit 0' TERM; \
                  echo ready; while true; do sleep 1 & wait $!; done";
    let machine = create(
        &platform,
        "sig",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", script]}}}),
    );
    platform.wait_for("the trap", Duration::from_secs(10), || {
        platform.logs("sig", &machine.id).contains("ready")
    });
    let base = format!("/v1/apps/sig/machines/{}", machine.id);
    let (status, body) = platform.call(
        Method::POST,
        &format!("{base}/signal"),
        Some(json!({"signal": "SIGUSR1"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true, "{body}");
    platform.wait_for("the signal", Duration::from_secs(10), || {
        platform.logs("sig", &machine.id).contains("got-usr1")
    });
    assert_eq!(
        platform.machine("sig", &machine.id).state,
        MachineState::Started
    );

    // Restart: the command gets the stop signal, exits, and runs again.
    let (status, body) = platform.call(Method::POST, &format!("{base}/restart?timeout=5s"), None);
    assert_eq!(status, 200, "{body}");
    let logs = platform.logs("sig", &machine.id);
    assert!(logs.contains("got-term"), "{logs}");
    platform.wait_for("the second run", Duration::from_secs(10), || {
        platform.logs("sig", &machine.id).matches("ready").count() == 2
    });
    assert_eq!(
        platform.machine("sig", &machine.id).state,
        MachineState::Started
    );

    post(&platform, &format!("{base}/stop"));
    let (status, body) = platform.call(
        Method::POST,
        &format!("{base}/signal"),
        Some(json!({"signal": "SIGUSR1"})),
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "invalid_state", "{body}");
    platform.teardown();
}

#[test]
fn a_machine_sees_neither_host_files_nor_host_processes() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "iso"]);
    let marker = platform.data_dir.path().join("host-only-marker");
    std::fs::write(&marker, "secret").expect("marker");
    let script = format!(
        "echo procs=$(ls /proc | grep -c '^[0-9]'); \
         test -e {marker} && echo marker=visible || echo marker=hidden; \
         echo host=$(hostname); echo pid1=$(cat /proc/1/comm); \
         grep -q NoNewPrivs:.*1 /proc/self/status && echo nnp=on; exec sleep 3600",
        marker = marker.display()
    );
    let machine = create(
        &platform,
        "iso",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", script]},
                          "guest": {"cpus": 1, "memory_mb": 64}}}),
    );
    platform.wait_for("the report", Duration::from_secs(10), || {
        platform.logs("iso", &machine.id).contains("pid1=")
    });
    let logs = platform.logs("iso", &machine.id);
    assert!(logs.contains("marker=hidden"), "{logs}");
    assert!(logs.contains(&format!("host={}", machine.id)), "{logs}");
    assert!(logs.contains("nnp=on"), "{logs}");
    let procs: usize = logs
        .lines()
        .find_map(|line| line.strip_prefix("procs="))
        .and_then(|count| count.trim().parse().ok())
        .expect("process count");
    // berth-init, the shell, and the shell's pipeline (a subshell, ls, grep).
    assert!(
        procs <= 5,
        "a machine sees only its own processes, saw {procs}: {logs}"
    );
    assert!(logs.contains("pid1=berth-init"), "{logs}");
    platform.teardown();
}

#[test]
fn a_machine_is_reachable_at_its_private_address_across_stop_and_start() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "net"]);
    let script = "mkdir -p /www; echo hello-from-$(hostname) > /www/index.html; \
                  trap 'kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; wait $pid";
    let machine = create(
        &platform,
        "net",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", script]}}}),
    );
    let address: std::net::Ipv6Addr = machine
        .private_ip
        .as_deref()
        .expect("a private address")
        .parse()
        .expect("ipv6");
    assert!(
        address.segments()[0] & 0xfe00 == 0xfc00,
        "a ULA address: {address}"
    );
    let fetch = || -> Option<String> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        client
            .get(format!("http://[{address}]:8080/"))
            .send()
            .ok()?
            .text()
            .ok()
    };
    let expected = format!("hello-from-{}", machine.id);
    platform.wait_for(
        "the page at the private address",
        Duration::from_secs(10),
        || fetch().is_some_and(|page| page.contains(&expected)),
    );
    let base = format!("/v1/apps/net/machines/{}", machine.id);
    post(&platform, &format!("{base}/stop"));
    post(&platform, &format!("{base}/start"));
    assert_eq!(
        platform.machine("net", &machine.id).private_ip,
        machine.private_ip,
        "the address survives stop/start"
    );
    platform.wait_for(
        "the page again after stop/start",
        Duration::from_secs(10),
        || fetch().is_some_and(|page| page.contains(&expected)),
    );
    platform.teardown();
}

#[test]
fn the_runc_runtime_still_runs_machines() {
    let platform = Platform::start_with(&["--runtime", "runc"]);
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "classic"]);
    let script = "echo \"boot in $(hostname)\"; exec sleep 3600";
    let machine = create(
        &platform,
        "classic",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["/bin/sh", "-c", script]}}}),
    );
    let booted = format!("boot in {}", machine.id);
    platform.wait_for("first boot", Duration::from_secs(10), || {
        platform.logs("classic", &machine.id).contains(&booted)
    });
    // runc, not the spawner, holds the container.
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(platform.runc_root())
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), machine.id);
    let base = format!("/v1/apps/classic/machines/{}", machine.id);
    post(&platform, &format!("{base}/stop"));
    let started = post(&platform, &format!("{base}/start"));
    assert_eq!(started["machine"]["state"], "started");
    platform.wait_for("second boot", Duration::from_secs(10), || {
        platform
            .logs("classic", &machine.id)
            .matches(&booted)
            .count()
            == 2
    });
    platform.teardown();
}

/// `berth up --workers N` runs N in-process workers; `--placement` picks among them.
#[test]
fn in_process_workers_take_machines_by_the_chosen_placement() {
    for (strategy, expect_one_worker) in [("spread", false), ("binpack", true)] {
        let platform = Platform::start_with(&["--workers", "3", "--placement", strategy]);
        platform.import(busybox_image(), "demo/busybox:1");
        platform.cli_ok(&["app", "create", "placed"]);
        let mut workers: Vec<String> = (0..3)
            .map(|_| {
                let machine = create(
                    &platform,
                    "placed",
                    json!({"skip_launch": true, "config": {"image": "demo/busybox:1",
                        "init": {"cmd": ["sleep", "3600"]}}}),
                );
                machine.worker.expect("pinned to a worker")
            })
            .collect();
        workers.sort();
        workers.dedup();
        let expected = if expect_one_worker { 1 } else { 3 };
        assert_eq!(workers.len(), expected, "{strategy}: {workers:?}");
        platform.teardown();
    }
}
