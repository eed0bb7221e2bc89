//! End-to-end, with real runc: orgs and tokens from the CLI, exec inside a Machine's
//! namespaces and cgroup, logs followed across stop and start, events with exit reasons.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{busybox_image, Platform, BERTH};
use reqwest::Method;
use serde_json::{json, Value};

/// Runs the CLI as the holder of `token`.
fn cli_as(platform: &Platform, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(BERTH)
        .args(args)
        .env("BERTH_API_URL", &platform.api_url)
        .env("BERTH_TOKEN", token)
        .output()
        .expect("run berth")
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn an_org_token_execs_follows_logs_and_reads_events() {
    let limits = tempfile::NamedTempFile::new().expect("limits file");
    std::fs::write(
        limits.path(),
        r#"{"rate_limits": {"read": {"per_second": 20, "burst": 40}}}"#,
    )
    .expect("write limits");
    let limits_path = limits.path().to_str().expect("utf-8");
    let platform = Platform::start_with(&[
        "--exec-max-output-bytes",
        "1000",
        "--default-limits",
        limits_path,
    ]);
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&[
        "org",
        "create",
        "acme",
        "--name",
        "Acme Corp",
        "--max-started-machines",
        "5",
        "--rate",
        "exec=50/50",
    ]);
    let token = platform
        .cli_ok(&["token", "create", "--org", "acme", "--name", "ci-bot"])
        .trim()
        .to_owned();
    assert!(token.starts_with("bt_"), "{token}");
    // The server's defaults come from --default-limits; the org's own flags win.
    let org: Value = serde_json::from_str(&platform.cli_ok(&["org", "show", "acme"])).expect("org");
    assert_eq!(org["name"], "Acme Corp");
    assert_eq!(org["limits"]["rate_limits"]["read"]["burst"], 40);
    assert_eq!(org["limits"]["rate_limits"]["exec"]["burst"], 50);
    assert_eq!(org["limits"]["rate_limits"]["start"]["burst"], 3);
    assert_eq!(org["limits"]["quotas"]["max_started_machines"], 5);
    let listed = platform.cli_ok(&["token", "list", "--org", "acme"]);
    assert!(
        listed.contains("ci-bot") && !listed.contains(&token),
        "{listed}"
    );

    let ok = |args: &[&str]| {
        let output = cli_as(&platform, &token, args);
        assert!(
            output.status.success(),
            "berth {args:?}: {}{}",
            String::from_utf8_lossy(&output.stderr),
            platform.server_log()
        );
        stdout(&output)
    };
    ok(&["app", "create", "work"]);
    let id = ok(&[
        "machine",
        "create",
        "--app",
        "work",
        "--image",
        "demo/busybox:1",
        "--",
        "/bin/sh",
        "-c",
        "echo booted; exec sleep 3600",
    ])
    .trim()
    .to_owned();

    // Exec runs inside the Machine: its hostname, its cgroup, its files.
    assert_eq!(
        ok(&["machine", "exec", &id, "--", "echo", "hello"]),
        "hello\n"
    );
    assert_eq!(ok(&["machine", "exec", &id, "--", "hostname"]).trim(), id);
    let own_cgroup = ok(&["machine", "exec", &id, "--", "cat", "/proc/self/cgroup"]);
    let init_cgroup = ok(&["machine", "exec", &id, "--", "cat", "/proc/1/cgroup"]);
    assert_eq!(own_cgroup, init_cgroup);
    // runc shows the host path (it names the Machine); the native driver gives the
    // Machine a cgroup namespace rooted at its own cgroups, so every line reads "/".
    assert!(
        own_cgroup.contains(&id) || own_cgroup.lines().all(|l| l.ends_with(":/")),
        "{own_cgroup}"
    );
    ok(&[
        "machine",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo kept > /marker",
    ]);
    assert_eq!(
        ok(&["machine", "exec", &id, "--", "cat", "/marker"]),
        "kept\n"
    );
    assert_eq!(
        ok(&["machine", "exec", &id, "--stdin", "fed", "--", "cat"]),
        "fed"
    );
    let failed = cli_as(
        &platform,
        &token,
        &[
            "machine",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo oops >&2; exit 3",
        ],
    );
    assert_eq!(failed.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&failed.stderr), "oops\n");

    let exec = |body: Value| {
        let response = platform
            .request(Method::POST, &format!("/v1/apps/work/machines/{id}/exec"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .expect("exec");
        assert_eq!(response.status().as_u16(), 200);
        response.json::<Value>().expect("json")
    };
    let big = exec(json!({"cmd": ["sh", "-c", "yes | head -c 5000"]}));
    assert_eq!(big["stdout"].as_str().map(str::len), Some(1000));
    assert_eq!(big["truncated"], true);
    assert_eq!(big["exit_code"], 0);
    let slow = exec(json!({"cmd": ["sleep", "77"], "timeout": "1s"}));
    assert_eq!(slow["exit_code"], Value::Null);
    assert_eq!(slow["timed_out"], true);
    let processes = ok(&["machine", "exec", &id, "--", "ps"]);
    assert!(
        !processes.contains("sleep 77"),
        "the timed-out process was killed:\n{processes}"
    );

    // logs -f keeps printing across a stop and a start.
    let mut follower = Command::new(BERTH)
        .args(["machine", "logs", "-f", &id])
        .env("BERTH_API_URL", &platform.api_url)
        .env("BERTH_TOKEN", &token)
        .stdout(Stdio::piped())
        .spawn()
        .expect("logs -f");
    let mut lines = BufReader::new(follower.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "booted");
    ok(&["machine", "stop", "--app", "work", &id]);
    ok(&["machine", "start", "--app", "work", &id]);
    assert_eq!(lines.next().expect("a line").expect("read"), "booted");
    let _ = follower.kill();
    let _ = follower.wait();

    // Events carry sources, exit codes and reasons. `sleep` handles no signal, but it is
    // not PID 1: Berth's init forwards SIGTERM to it, so the stop is quick and graceful,
    // not a SIGKILL after the 5 s timeout.
    let stopping = std::time::Instant::now();
    ok(&["machine", "stop", "--app", "work", &id]);
    let stop_took = stopping.elapsed();
    assert!(
        stop_took < std::time::Duration::from_secs(4),
        "{stop_took:?}"
    );
    ok(&[
        "machine",
        "update",
        "--app",
        "work",
        &id,
        "--image",
        "demo/busybox:1",
        "--restart",
        "no",
        "--",
        "/bin/sh",
        "-c",
        "exit 3",
    ]);
    ok(&[
        "machine",
        "wait",
        &id,
        "--state",
        "stopped",
        "--timeout",
        "30",
    ]);
    let events: Vec<Value> =
        serde_json::from_str(&ok(&["machine", "events", &id, "--json"])).expect("events");
    let stop = events
        .iter()
        .find(|e| e["type"] == "stop")
        .expect("a stop event");
    assert_eq!(
        (
            stop["source"].clone(),
            stop["reason"].clone(),
            stop["exit_code"].clone()
        ),
        (json!("user"), json!("exited"), json!(128 + 15))
    );
    let exit = events
        .iter()
        .rev()
        .find(|e| e["type"] == "exit")
        .expect("an exit event");
    assert_eq!(
        (exit["reason"].clone(), exit["exit_code"].clone()),
        (json!("exited"), json!(3))
    );
    assert_eq!(exit["source"], "flyd");
    assert_eq!(exit["berth_source"], "system");
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["id"].as_str().and_then(|id| id.parse().ok()).expect("id"))
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");

    // Metadata and leases from the CLI.
    ok(&["machine", "metadata", "set", &id, "role", "worker"]);
    assert!(ok(&["machine", "metadata", "get", &id]).contains("\"role\": \"worker\""));
    let nonce = ok(&["machine", "lease", "acquire", &id, "--ttl", "60"])
        .trim()
        .to_owned();
    let refused = cli_as(
        &platform,
        &token,
        &["machine", "start", "--app", "work", &id],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("lease_held"));
    // The CLI shows Fly's shape and sends the nonce in Fly's header.
    let shown: Value =
        serde_json::from_str(&ok(&["machine", "lease", "show", &id])).expect("lease json");
    assert_eq!(shown["status"], "success");
    assert_eq!(shown["data"]["nonce"], nonce.as_str());
    assert!(shown["data"]["expires_at"].is_i64(), "{shown}");
    ok(&[
        "machine",
        "start",
        "--app",
        "work",
        &id,
        "--lease-nonce",
        &nonce,
    ]);
    ok(&["machine", "lease", "release", &id, "--lease-nonce", &nonce]);

    // A revoked token is refused like any unknown one.
    let tokens: Vec<Value> =
        serde_json::from_str(&platform.cli_ok(&["token", "list", "--org", "acme", "--json"]))
            .expect("json");
    let token_id = tokens[0]["id"].as_str().expect("id");
    platform.cli_ok(&["token", "revoke", token_id]);
    let denied = cli_as(&platform, &token, &["app", "list"]);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("unauthorized"));
    std::thread::sleep(Duration::from_millis(10));
    platform.teardown();
}
