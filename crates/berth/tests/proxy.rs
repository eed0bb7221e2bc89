//! The wake-on-request proxy end to end: busybox httpd Machines behind the proxy that
//! `berth up` runs, reached by host name on the proxy's own free port.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use berth_api::{Machine, MachineEvent, MachineState};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

/// busybox httpd on 8080 with a page naming the Machine and a CGI script that streams
/// one line a second for four seconds.
const HTTPD: &str = "mkdir -p /www/cgi-bin; echo hello-from-$(hostname) > /www/index.html; \
    printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nfor i in 1 2 3 4; do echo tick $i; sleep 1; done\\n' \
      > /www/cgi-bin/slow; chmod +x /www/cgi-bin/slow; \
    trap 'kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; wait $pid";

fn service(idle_seconds: u32, min_running: u32, soft: u32, hard: u32) -> Value {
    json!({"internal_port": 8080, "protocol": "tcp", "autostart": true, "autostop": "stop",
           "autostop_idle_seconds": idle_seconds, "min_machines_running": min_running,
           "concurrency": {"type": "requests", "soft_limit": soft, "hard_limit": hard}})
}

fn create(platform: &Platform, app: &str, services: Value) -> Machine {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(
            json!({"config": {"image": "demo/busybox:1", "guest": {"cpus": 1, "memory_mb": 64},
                               "init": {"cmd": ["/bin/sh", "-c", HTTPD]},
                               "services": services}}),
        ),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("machine")
}

fn stop(platform: &Platform, app: &str, id: &str) {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines/{id}/stop"),
        Some(json!({})),
    );
    assert_eq!(status, 200, "{body}");
}

fn events(platform: &Platform, app: &str, id: &str) -> Vec<MachineEvent> {
    let (status, body) = platform.call(
        Method::GET,
        &format!("/v1/apps/{app}/machines/{id}/events"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("events")
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// GET `path` through the proxy for `<app>.localhost`.
fn via_proxy(
    platform: &Platform,
    client: &reqwest::blocking::Client,
    app: &str,
    path: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let response = client
        .get(format!("{}{path}", platform.proxy_url))
        .header("host", format!("{app}.localhost"))
        .send()
        .expect("proxy answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().expect("body"))
}

fn state(platform: &Platform, app: &str, id: &str) -> MachineState {
    platform.machine(app, id).state
}

#[test]
fn a_stopped_app_wakes_on_its_first_request_and_stops_when_idle() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "web"]);
    let machine = create(&platform, "web", json!([service(2, 0, 20, 25)]));
    stop(&platform, "web", &machine.id);

    let client = client();
    let (status, _, body) = via_proxy(&platform, &client, "web", "/");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("hello-from-{}", machine.id)),
        "{body}"
    );
    assert_eq!(state(&platform, "web", &machine.id), MachineState::Started);
    let start = events(&platform, "web", &machine.id)
        .into_iter()
        .rev()
        .find(|event| event.kind == "start")
        .expect("a start event");
    assert_eq!(start.source, "autostart");

    // Warm now: answered without a start.
    let (status, _, _) = via_proxy(&platform, &client, "web", "/");
    assert_eq!(status, 200);

    platform.wait_for("the idle Machine to stop", Duration::from_secs(15), || {
        state(&platform, "web", &machine.id) == MachineState::Stopped
    });
    let stop = events(&platform, "web", &machine.id)
        .into_iter()
        .rev()
        .find(|event| event.kind == "stop")
        .expect("a stop event");
    assert_eq!(stop.source, "autostop");

    // And it wakes again.
    let (status, _, body) = via_proxy(&platform, &client, "web", "/");
    assert_eq!(status, 200, "{body}");

    let metrics = client
        .get(format!("{}/metrics", platform.proxy_url))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    assert!(
        metrics.contains("berth_proxy_wakes_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("berth_proxy_autostops_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("berth_proxy_wake_seconds_count 2"),
        "{metrics}"
    );
    platform.teardown();
}

#[test]
fn fifty_concurrent_requests_to_a_stopped_app_start_one_machine() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "burst"]);
    // Room for all fifty on one Machine, so one start is the right answer.
    let machines: Vec<Machine> = (0..2)
        .map(|_| create(&platform, "burst", json!([service(300, 0, 100, 100)])))
        .collect();
    for machine in &machines {
        stop(&platform, "burst", &machine.id);
    }
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                scope.spawn(|| {
                    let client = client();
                    via_proxy(&platform, &client, "burst", "/").0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("thread"))
            .collect()
    });
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    let autostarts: usize = machines
        .iter()
        .map(|machine| {
            events(&platform, "burst", &machine.id)
                .iter()
                .filter(|event| event.kind == "start" && event.source == "autostart")
                .count()
        })
        .sum();
    assert_eq!(autostarts, 1, "fifty requests, one start");
    platform.teardown();
}

#[test]
fn a_slow_streaming_response_keeps_its_machine_running() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "stream"]);
    let machine = create(&platform, "stream", json!([service(1, 0, 20, 25)]));
    stop(&platform, "stream", &machine.id);

    let client = client();
    let began = Instant::now();
    let (status, _, body) = via_proxy(&platform, &client, "stream", "/cgi-bin/slow");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tick 4"), "the whole stream arrived: {body}");
    assert!(
        began.elapsed() >= Duration::from_secs(3),
        "it streamed for longer than the idle time"
    );
    let stops_during_stream = events(&platform, "stream", &machine.id)
        .iter()
        .filter(|event| event.kind == "stop" && event.source == "autostop")
        .count();
    assert_eq!(stops_during_stream, 0, "not stopped while streaming");
    platform.wait_for("the idle Machine to stop", Duration::from_secs(15), || {
        state(&platform, "stream", &machine.id) == MachineState::Stopped
    });
    platform.teardown();
}

#[test]
fn min_machines_running_keeps_one_running() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "floor"]);
    let machines: Vec<Machine> = (0..2)
        .map(|_| create(&platform, "floor", json!([service(1, 1, 20, 25)])))
        .collect();
    let client = client();
    let (status, _, _) = via_proxy(&platform, &client, "floor", "/");
    assert_eq!(status, 200);
    let started = || {
        machines
            .iter()
            .filter(|machine| state(&platform, "floor", &machine.id) == MachineState::Started)
            .count()
    };
    platform.wait_for("one idle Machine to stop", Duration::from_secs(15), || {
        started() == 1
    });
    // Several idle periods later, the last one still runs.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(started(), 1);
    platform.teardown();
}

#[test]
fn a_wake_that_fails_gives_503_with_the_reason() {
    let platform = Platform::start_with(&["--wake-timeout", "2s"]);
    platform.import(busybox_image(), "demo/busybox:1");
    // An org that may run one Machine, already running one (without a service).
    let (status, body) = platform.call(
        Method::POST,
        "/v1/orgs",
        Some(json!({"slug": "tight", "quotas": {"max_started_machines": 1}})),
    );
    assert!(status < 300, "{body}");
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps",
        Some(json!({"app_name": "tight", "org_slug": "tight"})),
    );
    assert!(status < 300, "{body}");
    create(&platform, "tight", json!([]));
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/tight/machines",
        Some(json!({"skip_launch": true,
                    "config": {"image": "demo/busybox:1", "guest": {"cpus": 1, "memory_mb": 64},
                               "init": {"cmd": ["/bin/sh", "-c", HTTPD]},
                               "services": [service(60, 0, 20, 25)]}})),
    );
    assert_eq!(status, 200, "{body}");
    let woken: Machine = serde_json::from_value(body).expect("machine");
    let client = client();
    let (status, headers, body) = via_proxy(&platform, &client, "tight", "/");
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert_eq!(state(&platform, "tight", &woken.id), MachineState::Created);

    // Only the operator's token may record a start as the proxy's.
    let (status, body) = platform.call(
        Method::POST,
        "/v1/tokens",
        Some(json!({"org_slug": "tight", "name": "bot"})),
    );
    assert!(status < 300, "{body}");
    let org_token = body["token"].as_str().expect("token").to_owned();
    for (action, source) in [("start", "autostart"), ("stop", "autostop")] {
        let response = client
            .post(format!(
                "{}/v1/apps/tight/machines/{}/{action}",
                platform.api_url, woken.id
            ))
            .bearer_auth(&org_token)
            .json(&json!({ "source": source }))
            .send()
            .expect("answer");
        assert_eq!(
            response.status().as_u16(),
            403,
            "{action} with source {source}"
        );
    }

    // A Machine whose port never opens: the wake times out.
    platform.cli_ok(&["app", "create", "mute"]);
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/mute/machines",
        Some(json!({"config": {"image": "demo/busybox:1", "guest": {"cpus": 1, "memory_mb": 64},
                               "init": {"cmd": ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]},
                               "services": [service(60, 0, 20, 25)]}})),
    );
    assert_eq!(status, 200, "{body}");
    let mute: Machine = serde_json::from_value(body).expect("machine");
    stop(&platform, "mute", &mute.id);
    let (status, headers, body) = via_proxy(&platform, &client, "mute", "/");
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["error"], "wake_timeout", "{body}");
    platform.teardown();
}

/// Sends raw bytes to the proxy and returns the status line of its answer.
fn raw(platform: &Platform, request: &[u8]) -> String {
    let address = platform.proxy_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The proxy may answer and close before reading everything; that is fine.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn unknown_hosts_oversized_headers_and_malformed_requests_get_clean_errors() {
    let platform = Platform::start();
    let client = client();
    let (status, headers, body) = via_proxy(&platform, &client, "nosuchapp", "/");
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["error"], "app_not_found");
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.contains("nosuchapp")));

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let status_line = raw(&platform, huge.as_bytes());
    assert!(status_line.contains(" 431 "), "{status_line:?}");

    let status_line = raw(&platform, b"NONSENSE\x01\x02 / HTTP/9.9\r\n\r\n");
    assert!(status_line.contains(" 400 "), "{status_line:?}");

    let status_line = raw(&platform, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(status_line.contains(" 400 "), "no Host: {status_line:?}");

    // The proxy still serves after all that.
    let (status, _, _) = via_proxy(&platform, &client, "nosuchapp", "/");
    assert_eq!(status, 404);
    platform.teardown();
}
