//! Attacks on the API before and around auth: slow request heads, idle connections held
//! open, connection floods from one address and from many, and absurd org limits.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use berth_control::serve::{serve, ServeLimits};
use common::{assert_error, Harness};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Serves the harness's control plane with `limits` on a new loopback port.
async fn serve_with(harness: &Harness, limits: ServeLimits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = harness.control.router();
    tokio::spawn(serve(listener, router, limits, std::future::pending()));
    addr
}

/// A connection to `server` from the loopback address `from` (any of 127/8 is local).
async fn connect_from(from: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    socket.connect(server).await.expect("connect")
}

/// Sends one `GET path` with `Connection: close` and reads the whole answer: status,
/// headers (lower-cased) and body.
async fn get(stream: &mut TcpStream, path: &str, token: &str) -> (u16, String, Value) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: berth\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers and closes")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// Waits for the server to close `stream`, answering how long that took (or `None` if it
/// stayed open for `limit`).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let began = Instant::now();
    let mut buf = [0u8; 4096];
    while began.elapsed() < limit {
        match tokio::time::timeout(limit - began.elapsed(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(began.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
    None
}

// Proved able to fail: with `serve` passing `header_read_timeout(None)` (as `axum::serve`
// before it, which sets no timer), the trickling connection was still open after 5 s, and
// (run alone) the idle kept-alive one too; each assert failed.
#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed_after_the_header_timeout() {
    let harness = Harness::start().await;
    let timeout = Duration::from_millis(500);
    let server = serve_with(
        &harness,
        ServeLimits {
            header_timeout: timeout,
            ..ServeLimits::default()
        },
    )
    .await;

    // Slowloris: a request head that never ends, one header line every 100 ms.
    let mut slow = TcpStream::connect(server).await.expect("connect");
    slow.write_all(b"GET /v1/apps HTTP/1.1\r\nHost: berth\r\n")
        .await
        .expect("write");
    let (mut reader, mut writer) = slow.into_split();
    let trickle = tokio::spawn(async move {
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let began = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a trickled request head kept its connection open for 5 s"
    );
    assert!(
        began.elapsed() < timeout * 4,
        "closed only after {:?}",
        began.elapsed()
    );
    trickle.abort();

    // Idle keep-alive: one full request, then nothing.
    let mut idle = TcpStream::connect(server).await.expect("connect");
    idle.write_all(
        format!(
            "GET /v1/apps HTTP/1.1\r\nHost: berth\r\nAuthorization: Bearer {}\r\n\r\n",
            harness.admin
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.expect("an answer");
    assert_eq!(&first, b"HTTP/1.1 200");
    let closed = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(
        closed.is_some_and(|after| after < timeout * 4),
        "an idle kept-alive connection was still open: {closed:?}"
    );

    // A connection that does send its head in time is served.
    let mut prompt = TcpStream::connect(server).await.expect("connect");
    let (status, _, body) = get(&mut prompt, "/v1/apps", &harness.admin).await;
    assert_eq!(status, 200, "{body}");
}

// Proved able to fail: with `serve` admitting under unlimited caps, the third connection
// from 127.0.0.1 was served (200 with the app list) instead of refused.
#[tokio::test]
async fn connections_past_the_per_client_and_total_caps_get_503_json() {
    let harness = Harness::start().await;
    let server = serve_with(
        &harness,
        ServeLimits {
            header_timeout: Duration::from_secs(30),
            max_connections_per_client: Some(2),
            max_connections: 3,
        },
    )
    .await;

    // Two silent connections from one address fill its share.
    let held_one = connect_from("127.0.0.1", server).await;
    let _held_two = connect_from("127.0.0.1", server).await;
    let mut third = connect_from("127.0.0.1", server).await;
    let (status, head, body) = get(&mut third, "/v1/apps", &harness.admin).await;
    assert_error(&(status, body.clone()), 503, "too_many_connections");
    assert_eq!(body["retry_after_ms"], 1000, "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");

    // Another address still gets in, until the total is reached.
    let _held_other = connect_from("127.0.0.2", server).await;
    let mut over = connect_from("127.0.0.3", server).await;
    let (status, _, body) = get(&mut over, "/v1/apps", &harness.admin).await;
    assert_error(&(status, body.clone()), 503, "too_many_connections");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains('3')),
        "{body}"
    );

    // Closing a connection frees its place (once the server has seen it close).
    drop(held_one);
    let began = Instant::now();
    loop {
        let mut again = connect_from("127.0.0.1", server).await;
        let (status, _, body) = get(&mut again, "/v1/apps", &harness.admin).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "the freed place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn normal_clients_keep_alive_and_make_many_calls() {
    let harness = Harness::start().await;
    let server = serve_with(&harness, ServeLimits::default()).await;
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let reply = client
            .get(format!("http://{server}/v1/apps"))
            .bearer_auth(&harness.admin)
            .send()
            .await
            .expect("send");
        assert_eq!(reply.status(), 200);
    }
}

// Proved able to fail: with `validate_limits` reduced to the rate checks it replaced,
// the org was created (201) with `max_machines` 2^63 and the PUT stored `max_cpus` 2^63.
#[tokio::test]
async fn out_of_range_org_limits_are_refused_and_nothing_is_stored() {
    let harness = Harness::start().await;
    let huge = 9_223_372_036_854_775_808u64;
    for (quotas, field) in [
        (json!({"max_machines": huge}), "quotas.max_machines"),
        (json!({"max_memory_mb": u64::MAX}), "quotas.max_memory_mb"),
        (json!({"max_cpus": -1}), "quotas.max_cpus"),
    ] {
        let reply = harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/orgs",
                Some(json!({"slug": "acme", "quotas": quotas})),
            )
            .await;
        assert_error(&reply, 400, "invalid_config");
        assert_eq!(reply.1["field"], field, "{}", reply.1);
        assert_error(
            &harness
                .call(&harness.admin, Method::GET, "/v1/orgs/acme", None)
                .await,
            404,
            "not_found",
        );
    }

    harness.org("acme", json!({})).await;
    let reply = harness
        .call(
            &harness.admin,
            Method::PUT,
            "/v1/orgs/acme/limits",
            Some(json!({"quotas": {"max_cpus": huge}, "rate_limits": {}})),
        )
        .await;
    assert_error(&reply, 400, "invalid_config");
    assert_eq!(reply.1["field"], "quotas.max_cpus", "{}", reply.1);
    let (status, org) = harness
        .call(&harness.admin, Method::GET, "/v1/orgs/acme", None)
        .await;
    assert_eq!(status, 200, "{org}");
    assert_eq!(org["overrides"], json!({"quotas": {}, "rate_limits": {}}));
    assert_eq!(org["limits"]["quotas"]["max_cpus"], 256);
}
