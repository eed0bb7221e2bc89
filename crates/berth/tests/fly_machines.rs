//! Fly's per-Machine routes end to end on the real runtime: `ps` reads a busybox
//! Machine's own pid namespace, and a cordon survives a restart of `berth up` and keeps
//! the proxy from sending the Machine traffic or waking it.

mod common;

use std::time::Duration;

use berth_api::{Machine, MachineState, ProcessStat};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

/// busybox httpd on 8080 beside a `sleep` with an argument no other process has.
fn httpd_and(marker: &str) -> String {
    format!(
        "mkdir -p /www; echo hello > /www/index.html; httpd -f -p 8080 -h /www & \
         sleep {marker} & trap 'exit 0' TERM; wait"
    )
}

fn create(platform: &Platform, app: &str, cmd: &str, services: Value) -> Machine {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(
            json!({"config": {"image": "demo/busybox:1", "guest": {"cpus": 1, "memory_mb": 64},
                               "init": {"cmd": ["/bin/sh", "-c", cmd]},
                               "restart": {"policy": "no"},
                               "services": services}}),
        ),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("machine")
}

fn post(platform: &Platform, path: &str) -> Value {
    let (status, body) = platform.call(Method::POST, path, Some(json!({})));
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn processes(platform: &Platform, app: &str, id: &str) -> (u16, Value) {
    platform.call(
        Method::GET,
        &format!("/v1/apps/{app}/machines/{id}/ps"),
        None,
    )
}

#[test]
fn ps_lists_the_machine_s_own_processes_as_its_pid_namespace_sees_them() {
    ps_of(Platform::start());
}

#[test]
fn ps_reads_a_runc_machine_the_same_way() {
    ps_of(Platform::start_with(&["--runtime", "runc"]));
}

fn ps_of(platform: Platform) {
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "procs"]);
    let mine = create(&platform, "procs", &httpd_and("4242"), json!([]));
    let other = create(&platform, "procs", &httpd_and("4343"), json!([]));

    let mut listed: Vec<ProcessStat> = Vec::new();
    platform.wait_for("httpd and sleep to run", Duration::from_secs(20), || {
        let (status, body) = processes(&platform, "procs", &mine.id);
        assert_eq!(status, 200, "{body}");
        listed = serde_json::from_value(body).expect("Fly's ProcessStat list");
        let httpd_listens = listed.iter().any(|p| {
            p.command.contains("httpd")
                && p.listen_sockets
                    .iter()
                    .any(|socket| socket.address.ends_with(":8080"))
        });
        httpd_listens && listed.iter().any(|p| p.command == "sleep 4242")
    });
    // Pids as the Machine sees them: its init is 1, and everything is small.
    assert_eq!(listed[0].pid, 1, "{listed:?}");
    assert!(listed.iter().all(|p| p.pid < 100), "{listed:?}");
    let sleep = listed
        .iter()
        .find(|p| p.command == "sleep 4242")
        .expect("the sleep");
    assert!(
        sleep.rss > 0 && sleep.stime > 1_600_000_000_000,
        "{sleep:?}"
    );
    // Only this Machine's: the other one's sleep is not listed.
    assert!(
        !listed.iter().any(|p| p.command.contains("4343")),
        "{listed:?}"
    );

    // The CLI prints the same list, and the Machine's one config version.
    let table = platform.cli_ok(&["machine", "ps", "--app", "procs", &mine.id]);
    assert!(
        table
            .lines()
            .any(|line| line.trim_start().starts_with("1 ")),
        "{table}"
    );
    assert!(
        table.lines().any(|line| line.ends_with("sleep 4242")),
        "{table}"
    );
    let versions: Vec<Value> = serde_json::from_str(
        &platform.cli_ok(&["machine", "versions", "--app", "procs", &mine.id, "--json"]),
    )
    .expect("versions");
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0]["version"], json!(mine.instance_id));

    // A stopped Machine has no processes: the answer says why.
    post(
        &platform,
        &format!("/v1/apps/procs/machines/{}/stop", other.id),
    );
    let (status, body) = processes(&platform, "procs", &other.id);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "invalid_state");
    assert_eq!(body["state"], "stopped");
    platform.teardown();
}

#[test]
fn a_cordoned_machine_outlives_a_restart_and_gets_no_proxy_traffic() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "cord"]);
    let service = json!([{"internal_port": 8080, "protocol": "tcp", "autostart": true,
                          "autostop": "stop", "autostop_idle_seconds": 600}]);
    let machine = create(&platform, "cord", &httpd_and("5151"), service);
    let base = format!("/v1/apps/cord/machines/{}", machine.id);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let proxy_url = platform.proxy_url.clone();
    let via_proxy = || {
        let response = client
            .get(format!("{proxy_url}/"))
            .header("host", "cord.localhost")
            .send()
            .expect("proxy answers");
        let status = response.status().as_u16();
        (status, response.text().unwrap_or_default())
    };
    platform.wait_for("httpd to answer", Duration::from_secs(20), || {
        via_proxy().0 == 200
    });

    platform.cli_ok(&["machine", "cordon", "--app", "cord", &machine.id]);
    post(&platform, &format!("{base}/stop"));
    platform.crash();
    platform.boot();
    let after = platform.machine("cord", &machine.id);
    assert!(after.cordoned, "kept across a restart of berth");
    assert_eq!(after.state, MachineState::Stopped);

    // The proxy neither sends it the request nor wakes it.
    let (status, body) = via_proxy();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no_machine_available"), "{body}");
    assert_eq!(
        platform.machine("cord", &machine.id).state,
        MachineState::Stopped
    );

    // Uncordoned, the next request wakes it (the proxy reads the app again within 2 s).
    platform.cli_ok(&["machine", "uncordon", "--app", "cord", &machine.id]);
    platform.wait_for("a woken machine to answer", Duration::from_secs(30), || {
        via_proxy().0 == 200
    });
    assert_eq!(
        platform.machine("cord", &machine.id).state,
        MachineState::Started
    );
    platform.teardown();
}
