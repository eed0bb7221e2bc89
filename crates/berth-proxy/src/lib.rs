//! The wake-on-request proxy. It routes HTTP by host name (`<app>.<domain>`) to the app's
//! started Machines, starts a stopped one when a request finds no room, and stops
//! Machines that have been idle for their `autostop_idle_seconds`.
//!
//! The request path is a stack of tower layers, outermost first:
//! `count` (metrics by status) → `limit` (head and declared body sizes, malformed
//! requests, all answered in JSON) → `route` (host → app, `/metrics`) →
//! `admit` (least outstanding requests, soft and hard limits, the wake, the queue) →
//! `forward` (the pooled client; the request's ticket rides on the response body and
//! on upgraded connections, which is what idle tracking counts).

mod error;
mod fleet;
mod forward;
pub mod metrics;
pub mod platform;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::task::AbortOnDropHandle;
use tower::ServiceExt;

pub use error::ProxyError;
pub use metrics::Metrics;
pub use platform::{HttpPlatform, MachineView, Platform, PlatformError};

use fleet::{Fleet, Ticket};
use forward::{ClientAddr, Forwarded};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Apps are served at `<app>.<domain>`.
    pub domain: String,
    /// How long a request waits for a Machine to start and accept connections.
    pub wake_timeout: Duration,
    /// How long a request waits for room when every Machine is at its hard limit.
    pub queue_timeout: Duration,
    /// How old the view of an app's Machines may be before it is read again.
    pub view_ttl: Duration,
    /// How often the platform's apps and Machines are read, so Machines that get no
    /// traffic through the proxy are stopped when idle too.
    pub discovery_interval: Duration,
    /// How long a Machine that refused a connection gets no traffic.
    pub unreachable_backoff: Duration,
    /// The request line and headers together; more gets 431 `headers_too_large`.
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            domain: "localhost".into(),
            wake_timeout: Duration::from_secs(10),
            queue_timeout: Duration::from_secs(2),
            view_ttl: Duration::from_secs(2),
            discovery_interval: Duration::from_secs(5),
            unreachable_backoff: Duration::from_secs(1),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024 * 1024,
        }
    }
}

/// hyper's read buffer is this many times `max_header_bytes`, and at least hyper's minimum.
const HYPER_BUFFER_FACTOR: usize = 8;
const MIN_HYPER_BUFFER: usize = 8192;

/// The proxy: cheap to clone, one per process.
#[derive(Clone)]
pub struct Proxy {
    fleet: Arc<Fleet>,
    client: forward::Client,
}

/// The app a request is for, found by `route`.
#[derive(Debug, Clone)]
struct AppName(String);

/// The request's place on a Machine, made by `admit` and taken by `forward`. Extensions
/// must be `Clone`, a ticket must not be: hence the cell.
#[derive(Clone)]
struct TicketCell(Arc<Mutex<Option<Ticket>>>);

impl Proxy {
    pub fn new(platform: Arc<dyn Platform>, config: ProxyConfig) -> Proxy {
        let metrics = Arc::new(Metrics::new());
        Proxy {
            fleet: Arc::new(Fleet::new(platform, config, metrics)),
            client: forward::client(),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.fleet.metrics.clone()
    }

    pub fn config(&self) -> &ProxyConfig {
        self.fleet.config()
    }

    /// The layered service, for `serve` or for tests.
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(forward_to_machine)
            .layer(middleware::from_fn_with_state(self.clone(), admit))
            .layer(middleware::from_fn_with_state(self.clone(), route))
            .layer(middleware::from_fn_with_state(self.clone(), limit))
            .layer(middleware::from_fn_with_state(self.clone(), count))
            .with_state(self.clone())
    }

    /// Serves HTTP/1.1 with keep-alive and upgrades on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let router = self.router();
        let _discovery = AbortOnDropHandle::new(tokio::spawn(fleet::discovery_loop(
            Arc::downgrade(&self.fleet),
            self.config().discovery_interval,
        )));
        // hyper's hard limit, past which it answers a bodiless 431 itself; `limit` answers
        // in JSON below it.
        let read_buffer = self
            .config()
            .max_header_bytes
            .saturating_mul(HYPER_BUFFER_FACTOR)
            .max(MIN_HYPER_BUFFER);
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(%error, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            let service = router.clone().map_request(move |mut request: Request<_>| {
                request.extensions_mut().insert(ClientAddr(peer));
                request
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .max_buf_size(read_buffer)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .with_upgrades();
                if let Err(error) = connection.await {
                    tracing::debug!(%peer, %error, "client connection ended");
                }
            });
        }
    }
}

/// Metrics layer: counts every answer by status.
async fn count(State(proxy): State<Proxy>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    proxy
        .fleet
        .metrics
        .requests
        .get_or_create(&metrics::StatusLabels {
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// The app named by the host, when it is `<app>.<domain>` with a one-label app.
fn app_of_host(host: &str, domain: &str) -> Option<String> {
    if host.starts_with('[') {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let app = name.strip_suffix(&format!(".{}", domain.to_ascii_lowercase()))?;
    let valid = !app.is_empty()
        && app.len() <= 63
        && app
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then(|| app.to_owned())
}

/// The request line and headers as they came on the wire, give or take a few bytes.
fn head_bytes(request: &Request) -> usize {
    let target = request.uri().authority().map_or(0, |a| a.as_str().len())
        + request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len());
    let line = request.method().as_str().len() + target + " HTTP/1.1\r\n".len();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": \r\n".len() + value.len())
        .sum();
    line + fields + "\r\n".len()
}

/// Limits layer: answers in JSON before anything costs a Machine. hyper's own read buffer
/// is several times `max_header_bytes`, so most oversized heads reach this layer and get
/// `headers_too_large` here rather than hyper's bodiless 431.
async fn limit(State(proxy): State<Proxy>, request: Request, next: Next) -> Response {
    let config = proxy.config();
    let head = head_bytes(&request);
    if head > config.max_header_bytes {
        return ProxyError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request line and headers are {head} bytes; the proxy takes at most {}",
                config.max_header_bytes
            ),
        )
        .into_response();
    }
    if request.headers().get_all(header::HOST).iter().count() > 1 {
        return ProxyError::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            "the request has more than one Host header",
        )
        .into_response();
    }
    if request.method() == Method::CONNECT {
        let mut response = ProxyError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the proxy does not tunnel CONNECT; send requests to <app>.<domain>",
        )
        .into_response();
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),
        );
        return response;
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > config.max_body_bytes as u64) {
        return ProxyError::payload_too_large(config.max_body_bytes).into_response();
    }
    next.run(request).await
}

/// Routing layer: host → app; `/metrics` on any other host.
async fn route(State(proxy): State<Proxy>, mut request: Request, next: Next) -> Response {
    if let Some(host) = request.headers().get(header::HOST) {
        if host.to_str().is_err() {
            return ProxyError::new(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                "the Host header is not plain text",
            )
            .into_response();
        }
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            request
                .uri()
                .authority()
                .map(|authority| authority.to_string())
        });
    let Some(host) = host else {
        return ProxyError::new(
            StatusCode::BAD_REQUEST,
            "missing_host",
            "the request names no Host; apps are served at <app>.<domain>",
        )
        .into_response();
    };
    let Some(app) = app_of_host(&host, &proxy.config().domain) else {
        if request.uri().path() == "/metrics" {
            return metrics_response(&proxy);
        }
        return ProxyError::unknown_app(&host).into_response();
    };
    request.extensions_mut().insert(AppName(app));
    next.run(request).await
}

fn metrics_response(proxy: &Proxy) -> Response {
    let mut response = proxy.fleet.metrics.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Wake and concurrency layer: a place on the least busy started Machine under its
/// limits, or a wake, or a short queue, or a 503 that says why.
async fn admit(State(proxy): State<Proxy>, mut request: Request, next: Next) -> Response {
    let Some(AppName(app)) = request.extensions().get::<AppName>().cloned() else {
        return ProxyError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no app routed",
        )
        .into_response();
    };
    match proxy.fleet.admit(&app).await {
        Ok(ticket) => {
            request
                .extensions_mut()
                .insert(TicketCell(Arc::new(Mutex::new(Some(ticket)))));
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

async fn forward_to_machine(State(proxy): State<Proxy>, request: Request<Body>) -> Response {
    let ticket = request
        .extensions()
        .get::<TicketCell>()
        .and_then(|cell| match cell.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        });
    let Some(ticket) = ticket else {
        return ProxyError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no Machine admitted",
        )
        .into_response();
    };
    let max_body = proxy.config().max_body_bytes;
    let request = match forward::forward(&proxy.client, ticket, request, max_body).await {
        Forwarded::Answer(response) => return response,
        Forwarded::Refused(request) => request,
    };
    // Once more, on another Machine or a woken one: the refusing Machine is marked and
    // the app's Machines are read again first.
    let Some(AppName(app)) = request.extensions().get::<AppName>().cloned() else {
        return ProxyError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no app routed",
        )
        .into_response();
    };
    match proxy.fleet.admit(&app).await {
        Ok(ticket) => match forward::forward(&proxy.client, ticket, request, max_body).await {
            Forwarded::Answer(response) => response,
            Forwarded::Refused(_) => ProxyError::new(
                StatusCode::BAD_GATEWAY,
                "machine_unreachable",
                format!("two Machines of app {app} refused the connection"),
            )
            .retry_after(Duration::from_secs(1))
            .into_response(),
        },
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
mod tests;
