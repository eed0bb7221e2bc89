//! Fly's Machine config fields that need a real Machine, end to end under `berth up`:
//! `checks` run by the worker against busybox httpd Machines and read by the proxy, and
//! `auto_destroy` on a command that ends, `processes` and `init.tty` run by berth-init.

mod common;

use std::time::Duration;

use berth_api::{CheckState, Machine, MachineState};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

/// httpd in the background (busybox's daemonizes without `-f`), and a sleep as the
/// Machine's main process, so the server can be killed while the Machine runs on.
const HTTPD: &str = "mkdir -p /www; echo hello-from-$(hostname) > /www/index.html; \
    echo ok > /www/health; httpd -p 8080 -h /www; exec sleep 3600";

fn create(platform: &Platform, app: &str, config: Value) -> Machine {
    let mut body = json!({"config": {"image": "demo/busybox:1",
                                      "guest": {"cpus": 1, "memory_mb": 64}}});
    if let (Some(target), Value::Object(extra)) = (body["config"].as_object_mut(), config) {
        target.extend(extra);
    }
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(body),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("machine")
}

fn check_state(platform: &Platform, app: &str, id: &str) -> Option<(CheckState, String)> {
    let machine = platform.machine(app, id);
    let check = machine.checks.iter().find(|check| check.name == "web")?;
    check
        .updated_at
        .as_ref()
        .map(|_| (check.status, check.output.clone()))
}

fn wait_check(platform: &Platform, app: &str, id: &str, want: CheckState) -> String {
    let mut output = String::new();
    platform.wait_for(
        &format!("{id}'s check to be {want:?}"),
        Duration::from_secs(20),
        || match check_state(platform, app, id) {
            Some((state, seen)) if state == want => {
                output = seen;
                true
            }
            _ => false,
        },
    );
    output
}

fn via_proxy(platform: &Platform, client: &reqwest::blocking::Client, app: &str) -> String {
    let response = client
        .get(format!("{}/", platform.proxy_url))
        .header("host", format!("{app}.localhost"))
        .send()
        .expect("proxy answers");
    assert_eq!(response.status().as_u16(), 200);
    response.text().expect("body")
}

#[test]
fn an_http_check_passes_then_fails_and_the_proxy_sends_no_traffic_to_a_failing_machine() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "chk"]);
    let config = json!({
        "init": {"cmd": ["/bin/sh", "-c", HTTPD]},
        "services": [{"internal_port": 8080, "protocol": "tcp", "autostart": true,
                      "autostop": "off"}],
        "checks": {"web": {"type": "http", "port": 8080, "path": "/health", "method": "GET",
                           "kind": "readiness", "interval": "1s", "timeout": "1s",
                           "grace_period": "0s"}}
    });
    let mut machines = [
        create(&platform, "chk", config.clone()),
        create(&platform, "chk", config),
    ];
    // Between idle Machines the proxy picks the first by id: the one to fail is that one,
    // so only the checks can send the traffic elsewhere.
    machines.sort_by(|a, b| a.id.cmp(&b.id));
    let [sick, well] = machines;
    for machine in [&sick, &well] {
        let output = wait_check(&platform, "chk", &machine.id, CheckState::Passing);
        assert!(output.contains("200 OK"), "{output}");
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let body = via_proxy(&platform, &client, "chk");
    assert!(body.contains(&format!("hello-from-{}", sick.id)), "{body}");

    // Its health page goes: the check fails, the server still answers everything else.
    let exec = |id: &str, script: &str| {
        let (status, body) = platform.call(
            Method::POST,
            &format!("/v1/apps/chk/machines/{id}/exec"),
            Some(json!({"command": ["/bin/sh", "-c", script], "timeout": 10})),
        );
        assert_eq!(status, 200, "{body}");
    };
    exec(&sick.id, "rm /www/health");
    let output = wait_check(&platform, "chk", &sick.id, CheckState::Critical);
    assert!(output.contains("404"), "{output}");
    assert_eq!(
        check_state(&platform, "chk", &well.id).map(|(state, _)| state),
        Some(CheckState::Passing)
    );
    // The proxy's view is at most 2 s old: once it has seen the failure, every request
    // goes to the Machine that passes.
    std::thread::sleep(Duration::from_millis(2500));
    via_proxy(&platform, &client, "chk");
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..10 {
        let body = via_proxy(&platform, &client, "chk");
        assert!(body.contains(&format!("hello-from-{}", well.id)), "{body}");
    }

    // Healthy again: it gets traffic again.
    exec(&sick.id, "echo ok > /www/health");
    wait_check(&platform, "chk", &sick.id, CheckState::Passing);
    platform.wait_for(
        "the proxy to route to it again",
        Duration::from_secs(10),
        || via_proxy(&platform, &client, "chk").contains(&format!("hello-from-{}", sick.id)),
    );

    // The server stops while the Machine runs on: the check fails to connect.
    exec(&sick.id, "killall httpd");
    let output = wait_check(&platform, "chk", &sick.id, CheckState::Critical);
    assert!(output.contains("connect"), "{output}");
    assert_eq!(platform.machine("chk", &sick.id).state.as_str(), "started");

    // Stopped, the Machine's checks are listed, not run.
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/chk/machines/{}/stop", well.id),
        Some(json!({})),
    );
    assert_eq!(status, 200, "{body}");
    let stopped = platform.machine("chk", &well.id);
    assert_eq!(stopped.checks.len(), 1);
    assert_eq!(stopped.checks[0].status, CheckState::Critical);
    assert!(stopped.checks[0].output.contains("not running"));
    platform.teardown();
}

#[test]
fn auto_destroy_removes_a_machine_whose_command_ended() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "once"]);
    let machine = create(
        &platform,
        "once",
        json!({"init": {"cmd": ["/bin/sh", "-c", "echo done"]}, "auto_destroy": true}),
    );
    platform.wait_for(
        "the Machine to be destroyed",
        Duration::from_secs(20),
        || {
            let (status, _) = platform.call(
                Method::GET,
                &format!("/v1/apps/once/machines/{}", machine.id),
                None,
            );
            status == 404
        },
    );
    let (_, listed) = platform.call(Method::GET, "/v1/apps/once/machines", None);
    assert_eq!(listed, json!([]), "{listed}");
    let machines_dir = platform.data_dir.path().join("worker/machines");
    assert!(
        !machines_dir.join(&machine.id).exists(),
        "its directory is removed"
    );
    platform.teardown();
}

#[test]
fn files_dns_and_exec_are_what_the_machine_sees() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "cfg"]);
    // What the Machine sees: its file's contents, owner (its own root) and mode, its
    // resolv.conf, and that exec replaced the command.
    let script = "cat /etc/app/conf; stat -c 'owner=%u mode=%a' /etc/app/conf; \
                  cat /etc/resolv.conf; echo exec-ran; exec sleep 3600";
    let machine = create(
        &platform,
        "cfg",
        json!({
            "init": {"cmd": ["/bin/false"], "exec": ["/bin/sh", "-c", script]},
            "files": [{"guest_path": "/etc/app/conf", "raw_value": "c2VjcmV0LXZhbHVlCg==",
                       "mode": 384}],
            "dns": {"nameservers": ["fd00::53"], "searches": ["corp.internal"]}
        }),
    );
    platform.wait_for("the Machine's output", Duration::from_secs(20), || {
        platform.logs("cfg", &machine.id).contains("exec-ran")
    });
    let logs = platform.logs("cfg", &machine.id);
    assert!(logs.contains("secret-value"), "{logs}");
    assert!(logs.contains("owner=0 mode=600"), "{logs}");
    assert!(logs.contains("nameserver fd00::53"), "{logs}");
    assert!(logs.contains("search corp.internal"), "{logs}");
    // On the host, the file belongs to the Machine's own id range, not to host root.
    let on_host = platform
        .data_dir
        .path()
        .join("worker/machines")
        .join(&machine.id)
        .join("upper/etc/app/conf");
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&on_host).expect("stat"));
    assert!(uid >= 0x1000_0000, "owned by host uid {uid}");
    platform.teardown();
}

#[test]
fn a_hostile_image_cannot_make_the_worker_write_outside_the_machine() {
    let platform = Platform::start();
    let outside = tempfile::tempdir().expect("outside");
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "untouched").expect("victim");
    let outside_dir = outside.path().to_str().expect("utf-8");
    // The image points /conf at a host directory and /etc/passwd at a host file.
    let hostile = busybox_image().layer(
        berth_image::build::LayerBuilder::new()
            .symlink("conf", outside_dir)
            .symlink("escape", "../../../../../../../../..")
            .symlink("etc/passwd", victim.to_str().expect("utf-8")),
        berth_image::build::Compression::Gzip,
    );
    platform.import(hostile, "demo/hostile:1");
    platform.cli_ok(&["app", "create", "evil"]);
    for path in ["/conf/victim", "/escape/tmp/x"] {
        let (status, body) = platform.call(
            Method::POST,
            "/v1/apps/evil/machines",
            Some(json!({"config": {"image": "demo/hostile:1",
                                    "init": {"cmd": ["sleep", "3600"]},
                                    "files": [{"guest_path": path, "raw_value": "b3duZWQ="}]}})),
        );
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["field"], "config.files[0].guest_path", "{body}");
    }
    // At the file itself the link is shadowed in the Machine's own layer.
    let machine = {
        let (status, body) = platform.call(
            Method::POST,
            "/v1/apps/evil/machines",
            Some(json!({"config": {"image": "demo/hostile:1",
                                    "init": {"cmd": ["sleep", "3600"]},
                                    "files": [{"guest_path": "/etc/passwd",
                                               "raw_value": "b3duZWQ="}]}})),
        );
        assert_eq!(status, 200, "{body}");
        body
    };
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched"
    );
    assert_eq!(std::fs::read_dir(outside.path()).expect("list").count(), 1);
    let (_, listed) = platform.call(Method::GET, "/v1/apps/evil/machines", None);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], machine["id"]);
    platform.teardown();
}

#[test]
fn processes_run_on_terminals_and_the_first_exit_is_what_the_restart_policy_reads() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "procs"]);
    // A long-running process and one that fails after a moment, both on terminals; the
    // second's `secrets` is Fly's and not Berth's (warned).
    let body = json!({"config": {
        "image": "demo/busybox:1",
        "guest": {"cpus": 1, "memory_mb": 64},
        "init": {"tty": true},
        "restart": {"policy": "on-failure", "max_retries": 1},
        "processes": [
            {"exec": ["/bin/sh", "-c", "[ -t 1 ] && echo web-tty=$ROLE; exec sleep 3600"],
             "env": {"ROLE": "web"}},
            {"cmd": ["/bin/sh", "-c", "echo worker-run; sleep 1; exit 3"], "env": null,
             "secrets": [{"env_var": "TOKEN", "name": "token"}]}
        ]
    }});
    let (status, reply) = platform.call(Method::POST, "/v1/apps/procs/machines", Some(body));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["warnings"][0]["field"], "config.processes[1].secrets",
        "{reply}"
    );
    let machine: Machine = serde_json::from_value(reply).expect("machine");
    // The worker's exit (3) stops the Machine and ends the web process; on-failure starts
    // it once more, and after the second failure it stays stopped.
    platform.wait_for("one restart, then stopped", Duration::from_secs(30), || {
        let now = platform.machine("procs", &machine.id);
        now.restart_count == 1 && now.state == MachineState::Stopped
    });
    let stopped = platform.machine("procs", &machine.id);
    assert_eq!(stopped.last_exit.expect("exit recorded").exit_code, Some(3));
    let logs = platform.logs("procs", &machine.id);
    assert_eq!(logs.matches("worker-run").count(), 2, "{logs}");
    assert_eq!(logs.matches("web-tty=web").count(), 2, "{logs}");
    platform.teardown();
}
