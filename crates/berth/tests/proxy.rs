//! The wake-on-request proxy end to end: busybox httpd Machines behind the proxy that
//! `berth up` runs, reached by host name on the proxy's own free port.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_api::{
    EventKind, EventSource, FlyEventSource, Machine, MachineEventAnswer, MachineState,
};
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

fn events(platform: &Platform, app: &str, id: &str) -> Vec<MachineEventAnswer> {
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
        .find(|event| event.kind == EventKind::Start)
        .expect("a start event");
    assert_eq!(start.berth_source, Some(EventSource::Autostart));
    assert_eq!(start.source, FlyEventSource::Proxy);

    // Warm now: answered without a start.
    let (status, _, _) = via_proxy(&platform, &client, "web", "/");
    assert_eq!(status, 200);

    platform.wait_for("the idle Machine to stop", Duration::from_secs(15), || {
        state(&platform, "web", &machine.id) == MachineState::Stopped
    });
    let stop = events(&platform, "web", &machine.id)
        .into_iter()
        .rev()
        .find(|event| event.kind == EventKind::Stop)
        .expect("a stop event");
    assert_eq!(stop.berth_source, Some(EventSource::Autostop));
    assert_eq!(stop.source, FlyEventSource::Proxy);

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
                .filter(|event| {
                    event.kind == EventKind::Start
                        && event.berth_source == Some(EventSource::Autostart)
                })
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
        .filter(|event| {
            event.kind == EventKind::Stop && event.berth_source == Some(EventSource::Autostop)
        })
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
    raw_answer(platform, request)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Sends raw bytes to the proxy and returns its whole answer.
fn raw_answer(platform: &Platform, request: &[u8]) -> String {
    let address = platform.proxy_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The proxy may answer and close before reading everything; that is fine.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status line, the lowercased headers and the JSON body of a raw answer.
fn json_answer(answer: &str) -> (String, String, Value) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    let body = serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON body: {answer:?}"));
    (status_line, head.to_ascii_lowercase(), body)
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
    let (status_line, head, body) = json_answer(&raw_answer(&platform, huge.as_bytes()));
    assert!(status_line.contains(" 431 "), "{status_line:?}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(body["error"], "headers_too_large", "{body}");

    // Past hyper's own buffer (eight times the limit) hyper answers 431 itself.
    let enormous = format!(
        "GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let status_line = raw(&platform, enormous.as_bytes());
    assert!(status_line.contains(" 431 "), "{status_line:?}");

    // A request line hyper cannot parse never reaches the proxy's layers: a bare 400.
    let status_line = raw(&platform, b"NONSENSE\x01\x02 / HTTP/9.9\r\n\r\n");
    assert!(status_line.contains(" 400 "), "{status_line:?}");

    for (request, status, code) in [
        (
            &b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
            " 400 ",
            "missing_host",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a.localhost\r\nHost: b.localhost\r\nConnection: close\r\n\r\n",
            " 400 ",
            "malformed_request",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\xff.localhost\r\nConnection: close\r\n\r\n",
            " 400 ",
            "malformed_request",
        ),
        (
            b"CONNECT web.localhost:443 HTTP/1.1\r\nHost: web.localhost:443\r\nConnection: close\r\n\r\n",
            " 405 ",
            "method_not_allowed",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 999999999999\r\nConnection: close\r\n\r\n",
            " 413 ",
            "payload_too_large",
        ),
    ] {
        let (status_line, head, body) = json_answer(&raw_answer(&platform, request));
        assert!(status_line.contains(status), "{code}: {status_line:?}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert_eq!(body["error"], code, "{body}");
    }

    // The proxy still serves after all that.
    let (status, _, _) = via_proxy(&platform, &client, "nosuchapp", "/");
    assert_eq!(status, 404);
    platform.teardown();
}

#[test]
fn a_machine_started_through_the_api_without_traffic_is_autostopped() {
    let platform = Platform::start_with(&["--discovery-interval", "1s"]);
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "quiet"]);
    // Created and started through the API; no request ever goes through the proxy.
    let machine = create(&platform, "quiet", json!([service(2, 0, 20, 25)]));
    assert_eq!(
        state(&platform, "quiet", &machine.id),
        MachineState::Started
    );
    platform.wait_for("the idle Machine to stop", Duration::from_secs(20), || {
        state(&platform, "quiet", &machine.id) == MachineState::Stopped
    });
    let stop = events(&platform, "quiet", &machine.id)
        .into_iter()
        .rev()
        .find(|event| event.kind == EventKind::Stop)
        .expect("a stop event");
    assert_eq!(stop.berth_source, Some(EventSource::Autostop));
    assert_eq!(stop.source, FlyEventSource::Proxy);

    // Started again through the API, it is found again and stopped again.
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/quiet/machines/{}/start", machine.id),
        Some(json!({})),
    );
    assert_eq!(status, 200, "{body}");
    platform.wait_for(
        "the idle Machine to stop again",
        Duration::from_secs(20),
        || state(&platform, "quiet", &machine.id) == MachineState::Stopped,
    );
    let autostops = events(&platform, "quiet", &machine.id)
        .iter()
        .filter(|event| {
            event.kind == EventKind::Stop && event.berth_source == Some(EventSource::Autostop)
        })
        .count();
    assert_eq!(autostops, 2);
    platform.teardown();
}

/// A WebSocket server in busybox: `nc -ll -e` runs this per connection with the socket
/// on stdin and stdout. It answers the handshake (RFC 6455's accept key) and then echoes.
const WEBSOCKET_ECHO: &str = r#"cr=$(printf '\r')
key=
while read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  case "$line" in
    [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=${line#*:}; key=${key# };;
  esac
done
[ -n "$key" ] || exit 0
accept=$(printf '%s' "${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11" | busybox sha1sum \
  | busybox cut -d' ' -f1 | busybox xxd -r -p | busybox base64)
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' "$accept"
exec cat
"#;

fn autostops(platform: &Platform, app: &str, id: &str) -> usize {
    events(platform, app, id)
        .iter()
        .filter(|event| {
            event.kind == EventKind::Stop && event.berth_source == Some(EventSource::Autostop)
        })
        .count()
}

#[test]
fn a_websocket_through_the_proxy_echoes_and_keeps_its_machine_running() {
    let platform = Platform::start();
    platform.import(
        common::busybox_image_with(&[("ws.sh", WEBSOCKET_ECHO)]),
        "demo/ws:1",
    );
    platform.cli_ok(&["app", "create", "ws"]);
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/ws/machines",
        Some(json!({"config": {"image": "demo/ws:1", "guest": {"cpus": 1, "memory_mb": 64},
            "init": {"cmd": ["/bin/sh", "-c",
                "trap 'kill $pid; exit 0' TERM; nc -ll -p 8080 -e /bin/sh /ws.sh & pid=$!; wait $pid"]},
            "services": [service(2, 0, 20, 25)]}})),
    );
    assert_eq!(status, 200, "{body}");
    let machine: Machine = serde_json::from_value(body).expect("machine");
    stop(&platform, "ws", &machine.id);

    // The upgrade wakes the stopped Machine, and the handshake comes back through.
    let address = platform.proxy_url.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(address).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    socket
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.localhost\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .expect("send the handshake");
    let mut reader = BufReader::new(socket.try_clone().expect("clone"));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read the handshake");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push(line.trim_end().to_ascii_lowercase());
    }
    assert!(head[0].starts_with("http/1.1 101"), "{head:?}");
    assert!(head.contains(&"upgrade: websocket".to_owned()), "{head:?}");
    // The key of RFC 6455's own example.
    assert!(
        head.contains(&"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=".to_owned()),
        "{head:?}"
    );
    let echo = |reader: &mut BufReader<std::net::TcpStream>,
                socket: &mut std::net::TcpStream,
                text: &str| {
        socket
            .write_all(format!("{text}\n").as_bytes())
            .expect("send");
        let mut line = String::new();
        reader.read_line(&mut line).expect("echo");
        assert_eq!(line, format!("{text}\n"));
    };
    echo(&mut reader, &mut socket, "ping");
    let stops_before = autostops(&platform, "ws", &machine.id);

    // Open for well past the idle time: the Machine keeps running.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(state(&platform, "ws", &machine.id), MachineState::Started);
    assert_eq!(autostops(&platform, "ws", &machine.id), stops_before);
    echo(&mut reader, &mut socket, "still here");

    // Closed, it is idle, and stopped.
    drop(reader);
    drop(socket);
    platform.wait_for("the idle Machine to stop", Duration::from_secs(15), || {
        state(&platform, "ws", &machine.id) == MachineState::Stopped
    });
    assert_eq!(autostops(&platform, "ws", &machine.id), stops_before + 1);
    platform.teardown();
}

/// A `berth proxy` process of its own, killed when dropped.
struct ProxyProcess(std::process::Child);

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn berth_proxy_on_its_own_wakes_a_machine() {
    let platform = Platform::start_with(&["--no-proxy"]);
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "solo"]);
    let machine = create(&platform, "solo", json!([service(2, 0, 20, 25)]));
    stop(&platform, "solo", &machine.id);
    assert!(
        std::net::TcpStream::connect(platform.proxy_url.trim_start_matches("http://")).is_err(),
        "berth up --no-proxy runs no proxy"
    );

    let listen = platform.proxy_url.trim_start_matches("http://").to_owned();
    let mut child = Command::new(common::BERTH)
        .args(["proxy", "--listen", &listen, "--api-url", &platform.api_url])
        .env("BERTH_TOKEN", &platform.token)
        .env("BERTH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn berth proxy");
    let stdout = child.stdout.take().expect("stdout");
    let _proxy = ProxyProcess(child);
    let mut banner = String::new();
    // Kept open to the end, so the proxy never writes to a closed pipe.
    let mut stdout = BufReader::new(stdout);
    stdout.read_line(&mut banner).expect("the proxy's banner");
    assert!(banner.contains(&listen), "{banner}");

    let client = client();
    let (status, _, body) = via_proxy(&platform, &client, "solo", "/");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("hello-from-{}", machine.id)),
        "{body}"
    );
    let start = events(&platform, "solo", &machine.id)
        .into_iter()
        .rev()
        .find(|event| event.kind == EventKind::Start)
        .expect("a start event");
    assert_eq!(start.berth_source, Some(EventSource::Autostart));
    assert_eq!(start.source, FlyEventSource::Proxy);
    platform.wait_for("the idle Machine to stop", Duration::from_secs(15), || {
        state(&platform, "solo", &machine.id) == MachineState::Stopped
    });
    assert_eq!(autostops(&platform, "solo", &machine.id), 1);
    platform.teardown();
}
