//! An HTTP proxy on loopback in front of a registry. It counts blob GETs per digest and
//! can misbehave on purpose: flip a byte of every blob it serves, pause a blob download
//! part way (so a test can kill the registry mid-pull), or demand a bearer token that
//! only its own token endpoint hands out (the distribution spec's token flow).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use base64::Engine as _;
use futures::StreamExt;

/// How the proxy misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Flip one byte of every blob body.
    CorruptBlobs,
    /// Stop forwarding a blob body once this many bytes went through, until
    /// [`Proxy::resume`]. Only the first blob download pauses.
    PauseBlobAfter(u64),
}

struct TokenGate {
    user: String,
    password: String,
    token: String,
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    fault: Mutex<Fault>,
    blob_gets: Mutex<HashMap<String, usize>>,
    paused: tokio::sync::watch::Sender<bool>,
    resumed: tokio::sync::watch::Sender<bool>,
    gate: Option<TokenGate>,
    addr: SocketAddr,
}

/// A running proxy; stops on drop.
pub struct Proxy {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Proxy {
    /// A pass-through proxy to the registry at `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Result<Proxy> {
        Proxy::launch(upstream, None)
    }

    /// A proxy that answers 401 with a `Bearer` challenge unless the request carries the
    /// token its `/token` endpoint gives for `user`/`password` (basic auth).
    pub fn start_token_gate(upstream: &str, user: &str, password: &str) -> Result<Proxy> {
        let token = format!("berth-test-token-{}", rand_suffix());
        Proxy::launch(
            upstream,
            Some(TokenGate {
                user: user.to_string(),
                password: password.to_string(),
                token,
            }),
        )
    }

    fn launch(upstream: &str, gate: Option<TokenGate>) -> Result<Proxy> {
        // Its own runtime, so sync and async tests alike can use it.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        // Bound here, made async inside the runtime: this may run inside another runtime.
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let shared = Arc::new(Shared {
            upstream: format!("http://{upstream}"),
            client,
            fault: Mutex::new(Fault::None),
            blob_gets: Mutex::new(HashMap::new()),
            paused: tokio::sync::watch::channel(false).0,
            resumed: tokio::sync::watch::channel(false).0,
            gate,
            addr,
        });
        let router = axum::Router::new()
            .fallback(forward)
            .with_state(shared.clone());
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                return;
            };
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stop.await;
                })
                .await;
        });
        Ok(Proxy {
            shared,
            runtime: Some(runtime),
            shutdown: Some(shutdown),
        })
    }

    /// `127.0.0.1:<port>`, to use as the registry host in references.
    pub fn host(&self) -> String {
        self.shared.addr.to_string()
    }

    /// Changes how it misbehaves from the next request on.
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.shared.fault) = fault;
    }

    /// Blob GETs forwarded so far, per digest.
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        lock(&self.shared.blob_gets).clone()
    }

    /// Blob GETs forwarded so far, in all.
    pub fn total_blob_gets(&self) -> usize {
        lock(&self.shared.blob_gets).values().sum()
    }

    /// Blocks until a blob download is paused (see [`Fault::PauseBlobAfter`]); false after
    /// `limit`. Call from a thread that is not running async code.
    pub fn wait_paused(&self, limit: Duration) -> bool {
        let mut paused = self.shared.paused.subscribe();
        let Some(runtime) = self.runtime.as_ref() else {
            return false;
        };
        runtime.block_on(async {
            tokio::time::timeout(limit, paused.wait_for(|p| *p))
                .await
                .is_ok_and(|r| r.is_ok())
        })
    }

    /// Lets a paused download go on.
    pub fn resume(&self) {
        self.shared.resumed.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.resume();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            // Works from async code too; the server task ends with the runtime.
            runtime.shutdown_background();
        }
    }
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(text.to_string()));
    *response.status_mut() = status;
    response
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request<Body>) -> Response<Body> {
    let path = request.uri().path().to_string();
    if let Some(gate) = &shared.gate {
        if path == "/token" {
            return match basic_credentials(request.headers()) {
                Some((user, password)) if user == gate.user && password == gate.password => {
                    let body = serde_json::json!({"token": gate.token, "expires_in": 300});
                    let mut response = Response::new(Body::from(body.to_string()));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    response
                }
                _ => plain(StatusCode::UNAUTHORIZED, "bad credentials"),
            };
        }
        let expected = format!("Bearer {}", gate.token);
        let authorized = request
            .headers()
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        if !authorized {
            let mut response = plain(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
            let challenge = format!(
                r#"Bearer realm="http://{}/token",service="berth-test""#,
                shared.addr
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            return response;
        }
    }

    let blob_digest = (request.method() == Method::GET)
        .then(|| path.split_once("/blobs/").map(|(_, d)| d.to_string()))
        .flatten();
    if let Some(digest) = &blob_digest {
        *lock(&shared.blob_gets).entry(digest.clone()).or_default() += 1;
    }
    let fault = if blob_digest.is_some() {
        *lock(&shared.fault)
    } else {
        Fault::None
    };

    let target = format!(
        "{}{}",
        shared.upstream,
        request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let method = request.method().clone();
    let mut headers = request.headers().clone();
    headers.remove(header::HOST);
    if shared.gate.is_some() {
        headers.remove(header::AUTHORIZATION);
    }
    let body = match axum::body::to_bytes(request.into_body(), 1 << 30).await {
        Ok(body) => body,
        Err(_) => return plain(StatusCode::BAD_REQUEST, "unreadable request body"),
    };
    let upstream = match shared
        .client
        .request(method, target)
        .headers(headers)
        .body(body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(_) => return plain(StatusCode::BAD_GATEWAY, "the registry is not answering"),
    };

    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if name != header::TRANSFER_ENCODING && name != header::CONNECTION {
            response = response.header(name, value);
        }
    }
    let stream = upstream.bytes_stream();
    let state = BodyState {
        stream: Box::pin(stream),
        sent: 0,
        paused_once: false,
        corrupted: false,
        ended: false,
        fault,
        shared: shared.clone(),
    };
    let body = futures::stream::unfold(state, |mut state| async move {
        if state.ended {
            return None;
        }
        if let Fault::PauseBlobAfter(after) = state.fault {
            let first = !*state.shared.paused.borrow();
            if !state.paused_once && state.sent >= after && first {
                state.paused_once = true;
                state.shared.paused.send_replace(true);
                let mut resumed = state.shared.resumed.subscribe();
                let _ = resumed.wait_for(|r| *r).await;
            }
        }
        match state.stream.next().await {
            Some(Ok(chunk)) => {
                let mut chunk = chunk.to_vec();
                if state.fault == Fault::CorruptBlobs && !state.corrupted && !chunk.is_empty() {
                    let at = chunk.len() / 2;
                    chunk[at] ^= 0x5a;
                    state.corrupted = true;
                }
                state.sent += chunk.len() as u64;
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), state))
            }
            Some(Err(error)) => {
                state.ended = true;
                Some((Err(std::io::Error::other(error)), state))
            }
            None => None,
        }
    });
    response
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| plain(StatusCode::BAD_GATEWAY, "bad upstream response"))
}

type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

struct BodyState {
    stream: ByteStream,
    sent: u64,
    paused_once: bool,
    corrupted: bool,
    ended: bool,
    fault: Fault,
    shared: Arc<Shared>,
}
