//! The proxy's logic against a fake platform. Idle timing runs on paused tokio time;
//! wakes and forwarding use real loopback listeners.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use berth_api::{AutostopMode, MachineService, MachineState, ServiceConcurrency};
use http_body_util::BodyExt;

use super::*;

#[derive(Default)]
struct FakePlatform {
    machines: Mutex<BTreeMap<String, MachineView>>,
    starts: AtomicUsize,
    stops: Mutex<Vec<String>>,
    refuse_start: Mutex<Option<PlatformError>>,
    /// A start that waited for a move: the Machine answers on this port afterwards.
    start_moves_to: Mutex<Option<u16>>,
    /// The app "web" was deleted.
    gone: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Platform for FakePlatform {
    async fn apps(&self) -> Result<Vec<String>, PlatformError> {
        if self.gone.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        Ok(vec!["web".to_owned()])
    }

    async fn machines(&self, app: &str) -> Result<Option<Vec<MachineView>>, PlatformError> {
        if app != "web" || self.gone.load(Ordering::SeqCst) {
            return Ok(None);
        }
        Ok(Some(
            self.machines
                .lock()
                .expect("fake lock")
                .values()
                .cloned()
                .collect(),
        ))
    }

    async fn start(&self, _app: &str, id: &str) -> Result<(), PlatformError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        // A start takes a moment, so concurrent requests meet the wake under way.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(error) = self.refuse_start.lock().expect("fake lock").clone() {
            return Err(error);
        }
        let moved_to = *self.start_moves_to.lock().expect("fake lock");
        if let Some(machine) = self.machines.lock().expect("fake lock").get_mut(id) {
            machine.state = MachineState::Started;
            if let (Some(port), Some(service)) = (moved_to, machine.service.as_mut()) {
                service.internal_port = port;
            }
        }
        Ok(())
    }

    async fn stop(&self, _app: &str, id: &str) -> Result<(), PlatformError> {
        self.stops.lock().expect("fake lock").push(id.to_owned());
        if let Some(machine) = self.machines.lock().expect("fake lock").get_mut(id) {
            machine.state = MachineState::Stopped;
        }
        Ok(())
    }
}

impl FakePlatform {
    fn with(machines: Vec<MachineView>) -> Arc<FakePlatform> {
        let platform = FakePlatform::default();
        {
            let mut map = platform.machines.lock().expect("fake lock");
            for machine in machines {
                map.insert(machine.id.clone(), machine);
            }
        }
        Arc::new(platform)
    }

    fn stops(&self) -> Vec<String> {
        self.stops.lock().expect("fake lock").clone()
    }
}

fn service(port: u16, idle_seconds: u32, min_running: u32) -> MachineService {
    MachineService {
        internal_port: port,
        protocol: Default::default(),
        autostart: true,
        autostop: AutostopMode::Stop,
        autostop_idle_seconds: idle_seconds,
        min_machines_running: min_running,
        concurrency: ServiceConcurrency::default(),
        ports: None,
        checks: None,
        force_instance_key: None,
    }
}

fn machine(id: &str, state: MachineState, service: MachineService) -> MachineView {
    MachineView {
        id: id.to_owned(),
        state,
        address: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        service: Some(service),
        changed_ago: None,
        failing_checks: false,
        cordoned: false,
    }
}

fn cordoned(mut view: MachineView) -> MachineView {
    view.cordoned = true;
    view
}

fn fleet(platform: Arc<FakePlatform>) -> Arc<Fleet> {
    Arc::new(Fleet::new(
        platform,
        ProxyConfig::default(),
        Arc::new(Metrics::new()),
    ))
}

/// Lets spawned tasks run without moving paused time.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_machine_stops_exactly_when_its_idle_time_is_up() {
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(1, 60, 0),
    )]);
    let fleet = fleet(platform.clone());
    drop(fleet.admit("web").await.expect("admitted"));
    tokio::time::sleep(Duration::from_millis(59_900)).await;
    settle().await;
    assert!(platform.stops().is_empty(), "stopped before its idle time");
    tokio::time::sleep(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(platform.stops(), vec!["m1".to_owned()]);
    assert_eq!(fleet.metrics.autostops.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_keeps_its_machine_running() {
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(1, 10, 0),
    )]);
    let fleet = fleet(platform.clone());
    // A long poll or an open WebSocket holds its ticket for minutes.
    let ticket = fleet.admit("web").await.expect("admitted");
    tokio::time::sleep(Duration::from_secs(120)).await;
    settle().await;
    assert!(platform.stops().is_empty(), "stopped while busy");
    drop(ticket);
    tokio::time::sleep(Duration::from_secs(9)).await;
    settle().await;
    assert!(
        platform.stops().is_empty(),
        "idle time counts from the last request"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(platform.stops(), vec!["m1".to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn min_machines_running_keeps_that_many_started() {
    let platform = FakePlatform::with(vec![
        machine("m1", MachineState::Started, service(1, 5, 1)),
        machine("m2", MachineState::Started, service(2, 5, 1)),
    ]);
    let fleet = fleet(platform.clone());
    drop(fleet.admit("web").await.expect("admitted"));
    tokio::time::sleep(Duration::from_secs(60)).await;
    settle().await;
    assert_eq!(platform.stops().len(), 1, "one stays running");
}

#[tokio::test(start_paused = true)]
async fn discovery_stops_idle_machines_that_never_had_a_request() {
    let platform = FakePlatform::with(vec![
        machine("m1", MachineState::Started, service(1, 62, 0)),
        machine("m2", MachineState::Stopped, service(2, 62, 0)),
    ]);
    let fleet = fleet(platform.clone());
    let discovery = tokio::spawn(fleet::discovery_loop(
        Arc::downgrade(&fleet),
        Duration::from_secs(5),
    ));
    // Found at once, at t=0, and idle from then.
    tokio::time::sleep(Duration::from_millis(61_900)).await;
    settle().await;
    assert!(platform.stops().is_empty(), "stopped before its idle time");
    tokio::time::sleep(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(platform.stops(), vec!["m1".to_owned()]);

    // m2 is started through the API at t=62.1; the pass at t=65 sees it.
    if let Some(m2) = platform.machines.lock().expect("fake lock").get_mut("m2") {
        m2.state = MachineState::Started;
    }
    tokio::time::sleep(Duration::from_millis(64_800)).await;
    settle().await;
    assert_eq!(platform.stops().len(), 1, "m2 stopped before 65 + 62 s");
    tokio::time::sleep(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(platform.stops(), vec!["m1".to_owned(), "m2".to_owned()]);
    assert_eq!(fleet.metrics.autostops.get(), 2);
    discovery.abort();
}

#[tokio::test(start_paused = true)]
async fn discovery_respects_min_machines_running() {
    let platform = FakePlatform::with(vec![
        machine("m1", MachineState::Started, service(1, 5, 1)),
        machine("m2", MachineState::Started, service(2, 5, 1)),
    ]);
    let fleet = fleet(platform.clone());
    let discovery = tokio::spawn(fleet::discovery_loop(
        Arc::downgrade(&fleet),
        Duration::from_secs(5),
    ));
    tokio::time::sleep(Duration::from_secs(120)).await;
    settle().await;
    assert_eq!(platform.stops().len(), 1, "one stays running");
    discovery.abort();
}

#[tokio::test(start_paused = true)]
async fn discovery_forgets_apps_gone_from_the_platform() {
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(1, 60, 0),
    )]);
    let fleet = fleet(platform.clone());
    fleet.discover().await.expect("discovered");
    assert!(fleet.knows("web"));
    platform.gone.store(true, Ordering::SeqCst);
    fleet.discover().await.expect("discovered");
    assert!(!fleet.knows("web"), "a deleted app is forgotten");
    tokio::time::sleep(Duration::from_secs(120)).await;
    settle().await;
    assert!(
        platform.stops().is_empty(),
        "nothing stopped for a gone app"
    );
}

#[tokio::test(start_paused = true)]
async fn machines_without_autostop_are_left_alone() {
    let mut keep = service(1, 5, 0);
    keep.autostop = AutostopMode::Off;
    let platform = FakePlatform::with(vec![machine("m1", MachineState::Started, keep)]);
    let fleet = fleet(platform.clone());
    drop(fleet.admit("web").await.expect("admitted"));
    tokio::time::sleep(Duration::from_secs(600)).await;
    settle().await;
    assert!(platform.stops().is_empty());
}

#[tokio::test(start_paused = true)]
async fn above_the_hard_limit_requests_queue_then_get_over_capacity() {
    let mut tight = service(1, 60, 0);
    tight.concurrency = ServiceConcurrency {
        kind: Default::default(),
        soft_limit: 1,
        hard_limit: 2,
    };
    let platform = FakePlatform::with(vec![machine("m1", MachineState::Started, tight)]);
    let fleet = fleet(platform.clone());
    let first = fleet.admit("web").await.expect("first");
    let _second = fleet.admit("web").await.expect("second, above soft");
    // The third waits; when the first ends, it gets the place.
    let waiting = tokio::spawn({
        let fleet = fleet.clone();
        async move { fleet.admit("web").await }
    });
    settle().await;
    drop(first);
    let _third = waiting
        .await
        .expect("task")
        .expect("queued request got room");
    let refused = fleet.admit("web").await.err().expect("over capacity");
    assert_eq!(refused.code, "over_capacity");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.retry_after.is_some());
}

#[tokio::test]
async fn fifty_requests_for_a_stopped_app_start_one_machine() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut roomy = service(port, 60, 0);
    roomy.concurrency.soft_limit = 100;
    roomy.concurrency.hard_limit = 100;
    let platform = FakePlatform::with(vec![
        machine("m1", MachineState::Stopped, roomy.clone()),
        machine("m2", MachineState::Stopped, roomy),
    ]);
    let fleet = fleet(platform.clone());
    let admits = (0..50).map(|_| {
        let fleet = fleet.clone();
        async move { fleet.admit("web").await }
    });
    let tickets = futures::future::join_all(admits).await;
    assert!(tickets.iter().all(Result::is_ok), "every request admitted");
    assert_eq!(platform.starts.load(Ordering::SeqCst), 1, "one start");
    assert!(tickets
        .iter()
        .flatten()
        .all(|ticket| ticket.machine() == tickets[0].as_ref().map_or("", |t| t.machine())));
}

#[tokio::test]
async fn a_failed_wake_answers_503_with_the_reason() {
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Stopped,
        service(1, 60, 0),
    )]);
    *platform.refuse_start.lock().expect("fake lock") = Some(PlatformError {
        code: "insufficient_capacity".into(),
        message: "worker w1 has no memory left".into(),
        retry_after: Some(Duration::from_secs(3)),
    });
    let fleet = fleet(platform.clone());
    let refused = fleet.admit("web").await.err().expect("refused");
    assert_eq!(refused.code, "insufficient_capacity");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.retry_after, Some(Duration::from_secs(3)));
}

#[tokio::test(start_paused = true)]
async fn a_port_that_never_opens_is_a_wake_timeout() {
    // Nothing listens on port 1 of loopback: connects are refused at once.
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Stopped,
        service(1, 60, 0),
    )]);
    let fleet = fleet(platform.clone());
    let refused = fleet.admit("web").await.err().expect("refused");
    assert_eq!(refused.code, "wake_timeout");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn hosts_map_to_apps() {
    assert_eq!(
        app_of_host("web.localhost", "localhost"),
        Some("web".into())
    );
    assert_eq!(
        app_of_host("Web.LocalHost:8080", "localhost"),
        Some("web".into())
    );
    assert_eq!(
        app_of_host("web.localhost.", "localhost"),
        Some("web".into())
    );
    assert_eq!(app_of_host("localhost", "localhost"), None);
    assert_eq!(app_of_host("a.b.localhost", "localhost"), None);
    assert_eq!(app_of_host("web.example.com", "localhost"), None);
    assert_eq!(app_of_host("[::1]:8080", "localhost"), None);
    assert_eq!(app_of_host("web.localhost:x", "localhost"), None);
}

async fn call(router: Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let response = router.oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

use axum::http::HeaderMap;

#[tokio::test]
async fn forwarding_sets_forwarded_headers_and_strips_hop_by_hop_ones() {
    // The Machine: echoes the headers it got.
    let backend = Router::new().fallback(|headers: HeaderMap| async move {
        let mut names: Vec<String> = headers
            .iter()
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap_or("?")))
            .collect();
        names.sort();
        names.join("\n")
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move { axum::serve(listener, backend).await });
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(port, 60, 0),
    )]);
    let proxy = Proxy::new(platform, ProxyConfig::default());
    let mut request = Request::builder()
        .uri("/hello?x=1")
        .header("host", "web.localhost:8080")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "drop me")
        .header("proxy-authorization", "Basic Zm9v")
        .header("x-forwarded-for", "10.0.0.9")
        .body(Body::empty())
        .expect("request");
    request
        .extensions_mut()
        .insert(ClientAddr("127.0.0.7:5555".parse().expect("addr")));
    let (status, _, body) = call(proxy.router(), request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("x-forwarded-for=10.0.0.9, 127.0.0.7"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto=http"), "{body}");
    assert!(
        body.contains("forwarded=for=127.0.0.7;proto=http;host=\"web.localhost:8080\""),
        "{body}"
    );
    assert!(body.contains("host=web.localhost:8080"), "{body}");
    assert!(!body.contains("x-secret"), "{body}");
    assert!(!body.contains("proxy-authorization"), "{body}");
    let metrics = proxy.metrics().encode();
    assert!(
        metrics.contains("berth_proxy_requests_total{status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("berth_proxy_in_flight{app=\"web\",machine=\"m1\"} 0"),
        "{metrics}"
    );
    server.abort();
}

#[tokio::test]
async fn unknown_apps_and_hosts_get_404_with_a_json_body() {
    let proxy = Proxy::new(FakePlatform::with(Vec::new()), ProxyConfig::default());
    for host in ["nope.localhost", "example.com", "a.b.localhost"] {
        let request = Request::builder()
            .uri("/")
            .header("host", host)
            .body(Body::empty())
            .expect("request");
        let (status, headers, body) = call(proxy.router(), request).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{host}");
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["error"], "app_not_found");
    }
    let request = Request::builder()
        .uri("/metrics")
        .header("host", "127.0.0.1:8080")
        .body(Body::empty())
        .expect("request");
    let (status, _, body) = call(proxy.router(), request).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("berth_proxy_requests_total{status=\"404\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE berth_proxy_wake_seconds histogram"),
        "{body}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_502_machine_unreachable() {
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(1, 60, 0),
    )]);
    let proxy = Proxy::new(platform, ProxyConfig::default());
    let request = || {
        Request::builder()
            .uri("/")
            .header("host", "web.localhost")
            .body(Body::empty())
            .expect("request")
    };
    let (status, headers, body) = call(proxy.router(), request()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("machine_unreachable"), "{body}");
    assert!(headers.contains_key("retry-after"));
    // Marked: the next request is not sent to it again at once.
    let (status, _, body) = call(proxy.router(), request()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("machine_unreachable"), "{body}");
}

/// A Machine that reads a request and closes the connection without answering, as one
/// stopped for a move does; the Machine is found at a new port meanwhile.
async fn closing_backend() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            drop(stream);
        }
    });
    (port, task)
}

/// Removing the replay in `forward` (answering `machine_error` for every request) fails
/// the GET half of this test.
#[tokio::test]
async fn a_get_the_machine_dropped_unanswered_is_sent_again_and_a_post_is_not() {
    let (closing, closing_task) = closing_backend().await;
    let answering = Router::new().fallback(|| async { "moved and answering" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let new_port = listener.local_addr().expect("addr").port();
    let answering_task = tokio::spawn(async move { axum::serve(listener, answering).await });
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(closing, 60, 0),
    )]);
    let proxy = Proxy::new(platform.clone(), ProxyConfig::default());
    let request = |method: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri("/")
            .header("host", "web.localhost")
            .body(Body::from(body))
            .expect("request")
    };
    // A POST with a body may have been acted on: its failure is the client's to see.
    let (status, _, body) = call(proxy.router(), request("POST", "x")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("machine_error"), "{body}");
    // The Machine moves: the platform names its new port, while the proxy's view still
    // names the old one, where the first forward of the GET gets no answer.
    platform.machines.lock().expect("fake lock").insert(
        "m1".to_owned(),
        machine("m1", MachineState::Started, service(new_port, 60, 0)),
    );
    let (status, _, body) = call(proxy.router(), request("GET", "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "moved and answering");
    closing_task.abort();
    answering_task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_machine_whose_listen_queue_is_full_is_busy_not_unreachable() {
    // A listener that never accepts, its queue filled: further SYNs are dropped.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let address = socket.local_addr().expect("addr");
    let _listener = socket.listen(1).expect("listen");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let connect = tokio::net::TcpStream::connect(address);
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(100), connect).await {
            fillers.push(stream);
        }
    }
    assert!(!fillers.is_empty(), "the queue took some connections");
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(address.port(), 60, 0),
    )]);
    let proxy = Proxy::new(platform, ProxyConfig::default());
    for _ in 0..2 {
        let request = Request::builder()
            .uri("/")
            .header("host", "web.localhost")
            .body(Body::empty())
            .expect("request");
        let (status, headers, body) = call(proxy.router(), request).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("machine_busy"), "{body}");
        assert!(headers.contains_key("retry-after"));
    }
}

#[tokio::test]
async fn declared_oversized_bodies_get_413() {
    let proxy = Proxy::new(FakePlatform::with(Vec::new()), ProxyConfig::default());
    let request = Request::builder()
        .method("POST")
        .uri("/")
        .header("host", "web.localhost")
        .header("content-length", (1u64 << 40).to_string())
        .body(Body::empty())
        .expect("request");
    let (status, _, body) = call(proxy.router(), request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body.contains("payload_too_large"));
}

/// A Machine that answers `Upgrade: echo` with 101 and then echoes bytes.
async fn echo_upgrade_backend() -> (u16, tokio::task::JoinHandle<()>) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    service_fn(|mut request: Request<hyper::body::Incoming>| async move {
                        let upgrade = hyper::upgrade::on(&mut request);
                        tokio::spawn(async move {
                            if let Ok(upgraded) = upgrade.await {
                                let (mut reader, mut writer) =
                                    tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                            }
                        });
                        Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header("connection", "upgrade")
                            .header("upgrade", "echo")
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn upgraded_connections_pass_through_and_keep_the_machine_busy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (port, backend) = echo_upgrade_backend().await;
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(port, 60, 0),
    )]);
    let proxy = Proxy::new(platform, ProxyConfig::default());
    let metrics = proxy.metrics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr");
    let server = tokio::spawn(proxy.serve(listener, std::future::pending()));

    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            b"GET /socket HTTP/1.1\r\nHost: web.localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("read head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    stream.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"ping");
    let in_flight = || metrics.in_flight_of("web", "m1").get();
    assert_eq!(in_flight(), 1, "an open upgraded connection is in flight");
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while in_flight() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection was released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.abort();
    backend.abort();
}

#[tokio::test]
async fn oversized_heads_duplicate_hosts_and_connect_get_json_errors() {
    let proxy = Proxy::new(FakePlatform::with(Vec::new()), ProxyConfig::default());
    let limit = proxy.config().max_header_bytes;
    let cases = [
        (
            Request::builder()
                .uri("/")
                .header("host", "web.localhost")
                .header("x-big", "a".repeat(limit))
                .body(Body::empty()),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
        ),
        (
            Request::builder()
                .uri("/")
                .header("host", "web.localhost")
                .header("host", "other.localhost")
                .body(Body::empty()),
            StatusCode::BAD_REQUEST,
            "malformed_request",
        ),
        (
            Request::builder()
                .method("CONNECT")
                .uri("web.localhost:443")
                .header("host", "web.localhost:443")
                .body(Body::empty()),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Request::builder()
                .uri("/")
                .header(
                    "host",
                    HeaderValue::from_bytes(b"web\xff.localhost").expect("bytes"),
                )
                .body(Body::empty()),
            StatusCode::BAD_REQUEST,
            "malformed_request",
        ),
    ];
    for (request, status, code) in cases {
        let (got, headers, body) = call(proxy.router(), request.expect("request")).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["error"], code, "{body}");
    }
    // Just under the limit still goes on (to a 404: there is no such app).
    let request = Request::builder()
        .uri("/")
        .header("host", "nope.localhost")
        .header("x-big", "a".repeat(limit - 100))
        .body(Body::empty())
        .expect("request");
    let (status, _, body) = call(proxy.router(), request).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn broken_and_undeclared_oversized_bodies_get_json_errors() {
    let backend =
        Router::new().fallback(|body: axum::body::Bytes| async move { body.len().to_string() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move { axum::serve(listener, backend).await });
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Started,
        service(port, 60, 0),
    )]);
    let config = ProxyConfig {
        max_body_bytes: 1024,
        ..ProxyConfig::default()
    };
    let proxy = Proxy::new(platform, config);
    let chunks = |items: Vec<Result<&'static [u8], std::io::Error>>| {
        Body::from_stream(futures::stream::iter(items))
    };
    let cases = [
        (
            chunks(vec![Ok(&[b'x'; 800]), Ok(&[b'x'; 800])]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            chunks(vec![
                Ok(b"partial"),
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the client went away",
                )),
            ]),
            StatusCode::BAD_REQUEST,
            "malformed_request",
        ),
    ];
    for (body, status, code) in cases {
        let request = Request::builder()
            .method("POST")
            .uri("/upload")
            .header("host", "web.localhost")
            .body(body)
            .expect("request");
        let (got, _, body) = call(proxy.router(), request).await;
        assert_eq!(got, status, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["error"], code, "{body}");
    }
    // A body within the limit goes through.
    let request = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "web.localhost")
        .body(chunks(vec![Ok(&[b'x'; 600]), Ok(&[b'x'; 400])]))
        .expect("request");
    let (status, _, body) = call(proxy.router(), request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "1000");
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn a_machine_created_after_the_app_was_seen_gets_the_next_request() {
    let platform = FakePlatform::with(Vec::new());
    let fleet = fleet(platform.clone());
    let Err(refused) = fleet.admit("web").await else {
        panic!("admitted with no machine");
    };
    assert_eq!(refused.code, "no_machine_available");
    // Created (and started) through the API a moment later, well inside the view's
    // lifetime: the proxy looks again rather than answering from its old view.
    platform.machines.lock().expect("fake lock").insert(
        "m1".to_owned(),
        machine("m1", MachineState::Started, service(1, 60, 0)),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ticket = fleet.admit("web").await.expect("admitted");
    assert_eq!(ticket.machine(), "m1");
}

#[tokio::test]
async fn a_machine_started_through_the_api_gets_time_for_its_server_to_come_up() {
    // A free port, not listened on yet: the Machine's server is still starting.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let mut just_started = machine("m1", MachineState::Started, service(port, 60, 0));
    just_started.changed_ago = Some(Duration::from_millis(5));
    let platform = FakePlatform::with(vec![just_started]);
    let fleet = fleet(platform.clone());
    // The first forward was refused, as a connection to a server not yet listening is.
    let ticket = fleet.admit("web").await.expect("admitted");
    ticket.unreachable();
    drop(ticket);
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        // Hold it open until the proxy has connected.
        let _ = listener.accept().await;
    });
    let ticket = fleet
        .admit("web")
        .await
        .unwrap_or_else(|error| panic!("refused: {}", error.code));
    assert_eq!(ticket.machine(), "m1");
    assert_eq!(
        platform.starts.load(Ordering::SeqCst),
        0,
        "no start was needed"
    );
    server.await.expect("server task");
}

/// Checked against the proxy from before: it waited the whole wake timeout on the
/// address it had first seen, and answered `wake_timeout` (503).
#[tokio::test]
async fn a_machine_that_moves_while_its_old_address_is_waited_on_is_found_at_the_new_one() {
    // The old address: a free port no one listens on (the source worker, halted).
    let old = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let mut just_started = machine("m1", MachineState::Started, service(old, 60, 0));
    just_started.changed_ago = Some(Duration::from_millis(5));
    let platform = FakePlatform::with(vec![just_started]);
    let fleet = fleet(platform.clone());
    let ticket = fleet.admit("web").await.expect("admitted");
    ticket.unreachable();
    drop(ticket);
    // The move commits: the platform now has it at a new address, which answers.
    let new = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let new_port = new.local_addr().expect("addr").port();
    let moved = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        platform.machines.lock().expect("fake lock").insert(
            "m1".into(),
            machine("m1", MachineState::Started, service(new_port, 60, 0)),
        );
        new
    });
    let began = std::time::Instant::now();
    let ticket = fleet
        .admit("web")
        .await
        .unwrap_or_else(|error| panic!("refused: {}", error.code));
    assert_eq!(ticket.machine(), "m1");
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "found within a recheck or two, not the wake timeout: {:?}",
        began.elapsed()
    );
    drop(moved.await.expect("mover"));
}

/// Checked against the proxy from before: the wake waited on the address read before
/// the start, which the move had left, and answered `wake_timeout` (503).
#[tokio::test]
async fn a_wake_whose_start_waited_for_a_move_finds_the_machine_at_its_new_address() {
    let old = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Stopped,
        service(old, 60, 0),
    )]);
    let new = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    *platform.start_moves_to.lock().expect("fake lock") =
        Some(new.local_addr().expect("addr").port());
    let fleet = fleet(platform.clone());
    let began = std::time::Instant::now();
    let ticket = fleet
        .admit("web")
        .await
        .unwrap_or_else(|error| panic!("refused: {}", error.code));
    assert_eq!(ticket.machine(), "m1");
    assert_eq!(
        ticket.address.port(),
        new.local_addr().expect("addr").port()
    );
    assert_eq!(platform.starts.load(Ordering::SeqCst), 1);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "found within a recheck or two, not the wake timeout: {:?}",
        began.elapsed()
    );
}

/// Checked against the proxy from before: it waited for a signal that only its own
/// traffic gives, for the whole wake timeout, and answered `wake_timeout` (503).
#[tokio::test]
async fn a_machine_seen_stopping_then_started_elsewhere_gets_the_request() {
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Stopping,
        service(1, 60, 0),
    )]);
    let fleet = fleet(platform.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mover = {
        let platform = platform.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            platform.machines.lock().expect("fake lock").insert(
                "m1".into(),
                machine("m1", MachineState::Started, service(port, 60, 0)),
            );
        })
    };
    let began = std::time::Instant::now();
    let ticket = fleet
        .admit("web")
        .await
        .unwrap_or_else(|error| panic!("refused: {}", error.code));
    assert_eq!(ticket.address.port(), port);
    assert_eq!(
        platform.starts.load(Ordering::SeqCst),
        0,
        "no wake was needed"
    );
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "seen within a recheck or two: {:?}",
        began.elapsed()
    );
    mover.await.expect("mover");
}

/// Checked against the proxy from before: a Machine seen `starting` (a move's commit
/// booting it) was neither usable nor wakeable, and the request got 503
/// `no_machine_available`.
#[tokio::test]
async fn a_machine_seen_starting_gets_the_request_once_it_has_started() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let platform = FakePlatform::with(vec![machine(
        "m1",
        MachineState::Starting,
        service(port, 60, 0),
    )]);
    let fleet = fleet(platform.clone());
    let started = {
        let platform = platform.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if let Some(machine) = platform.machines.lock().expect("fake lock").get_mut("m1") {
                machine.state = MachineState::Started;
            }
        })
    };
    let ticket = fleet
        .admit("web")
        .await
        .unwrap_or_else(|error| panic!("refused: {}", error.code));
    assert_eq!(ticket.machine(), "m1");
    assert_eq!(
        platform.starts.load(Ordering::SeqCst),
        0,
        "someone else started it"
    );
    started.await.expect("starter");
}

#[tokio::test(start_paused = true)]
async fn a_machine_failing_its_checks_gets_no_traffic_while_another_passes() {
    let mut failing = machine("m1", MachineState::Started, service(1, 600, 0));
    failing.failing_checks = true;
    let platform = FakePlatform::with(vec![
        failing,
        machine("m2", MachineState::Started, service(2, 600, 0)),
    ]);
    let fleet = fleet(platform.clone());
    // m1 has fewer tickets, and would be picked by load alone.
    let mut tickets = Vec::new();
    for _ in 0..5 {
        let ticket = fleet.admit("web").await.expect("admitted");
        assert_eq!(ticket.machine(), "m2", "a failing Machine got traffic");
        tickets.push(ticket);
    }
    // Its checks pass again (seen at the next refresh): it takes traffic again.
    if let Some(m1) = platform.machines.lock().expect("fake lock").get_mut("m1") {
        m1.failing_checks = false;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.admit("web").await.expect("refresh");
    settle().await;
    let ticket = fleet.admit("web").await.expect("admitted");
    assert_eq!(ticket.machine(), "m1");
}

#[tokio::test(start_paused = true)]
async fn a_machine_failing_its_checks_still_serves_when_it_is_the_only_one() {
    let mut failing = machine("m1", MachineState::Started, service(1, 600, 0));
    failing.failing_checks = true;
    let platform = FakePlatform::with(vec![failing]);
    let fleet = fleet(platform.clone());
    let ticket = fleet.admit("web").await.expect("admitted");
    assert_eq!(ticket.machine(), "m1");
    assert_eq!(platform.starts.load(Ordering::SeqCst), 0);
}

#[test]
fn only_critical_readiness_checks_count_as_failing() {
    let machine_with = |kind: &str, status: &str| -> berth_api::Machine {
        serde_json::from_value(serde_json::json!({
            "id": "m1", "name": "m1", "state": "started", "region": "r", "instance_id": "i",
            "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
            "image_ref": {"name": "x", "repository": "x", "digest": "sha256:0"},
            "config": {"image": "x", "checks": {"web": {"type": "tcp", "port": 1, "kind": kind}}},
            "checks": [{"name": "web", "status": status, "output": ""}]
        }))
        .expect("a machine")
    };
    let failing =
        |kind, status| MachineView::from_machine(&machine_with(kind, status)).failing_checks;
    assert!(failing("readiness", "critical"));
    assert!(!failing("readiness", "passing"));
    assert!(!failing("readiness", "warning"));
    assert!(!failing("informational", "critical"));
}

#[tokio::test(start_paused = true)]
async fn a_cordoned_machine_gets_no_traffic() {
    // m1 is cordoned and idle; m2 takes every request, even past its soft limit.
    let platform = FakePlatform::with(vec![
        cordoned(machine("m1", MachineState::Started, service(1, 600, 0))),
        machine("m2", MachineState::Started, service(2, 600, 0)),
    ]);
    let fleet = fleet(platform.clone());
    let mut tickets = Vec::new();
    for _ in 0..3 {
        let ticket = fleet.admit("web").await.expect("admitted");
        assert_eq!(ticket.machine(), "m2");
        tickets.push(ticket);
    }
    // Uncordoned through the API: the next view sends it traffic again.
    if let Some(m1) = platform.machines.lock().expect("fake lock").get_mut("m1") {
        m1.cordoned = false;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // This request may still go by the old view; it refreshes the view behind itself.
    tickets.push(fleet.admit("web").await.expect("admitted"));
    settle().await;
    let ticket = fleet.admit("web").await.expect("admitted");
    assert_eq!(ticket.machine(), "m1", "the least busy, now uncordoned");
}

#[tokio::test(start_paused = true)]
async fn a_cordoned_machine_is_never_autostarted() {
    let platform = FakePlatform::with(vec![cordoned(machine(
        "m1",
        MachineState::Stopped,
        service(1, 60, 0),
    ))]);
    let fleet = fleet(platform.clone());
    let Err(refused) = fleet.admit("web").await else {
        panic!("admitted to a cordoned machine");
    };
    assert_eq!(refused.code, "no_machine_available");
    assert_eq!(platform.starts.load(Ordering::SeqCst), 0, "not woken");
}
