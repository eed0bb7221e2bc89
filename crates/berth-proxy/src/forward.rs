//! Sending a request to the Machine its ticket names, over a pooled keep-alive client,
//! and streaming the answer back (or splicing an upgraded connection).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, StatusCode, Uri};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::Limited;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::error::ProxyError;
use crate::fleet::Ticket;

pub(crate) type Client = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// The client's address, put on each request by the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// Past one SYN retransmission (1 s), short of the second (3 s).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector)
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the headers that belong to one connection, including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

fn add_forwarded(headers: &mut HeaderMap, client: Option<SocketAddr>) {
    let Some(client) = client else {
        return;
    };
    let ip = client.ip();
    let xff = match headers
        .get("x-forwarded-for")
        .and_then(|value| value.to_str().ok())
    {
        Some(earlier) => format!("{earlier}, {ip}"),
        None => ip.to_string(),
    };
    let node = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .filter(|host| !host.contains(['"', '\\']))
        .map(|host| format!(";host=\"{host}\""))
        .unwrap_or_default();
    let element = format!("for={node};proto=http{host}");
    let forwarded = match headers
        .get(header::FORWARDED)
        .and_then(|value| value.to_str().ok())
    {
        Some(earlier) => format!("{earlier}, {element}"),
        None => element,
    };
    for (name, value) in [
        (HeaderName::from_static("x-forwarded-for"), xff),
        (
            HeaderName::from_static("x-forwarded-proto"),
            "http".to_owned(),
        ),
        (header::FORWARDED, forwarded),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// Whether the connect failed by timing out (rather than being refused).
fn connect_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        cause = error.source();
    }
    false
}

/// Whether `error` or anything it came from is an `E`.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<E>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// What became of a forward: an answer for the client, or a request without a body that
/// the Machine refused to connect for (or, idempotent, closed the connection on with no
/// answer), given back to be sent elsewhere.
pub(crate) enum Forwarded {
    Answer(Response<Body>),
    Refused(Request<Body>),
}

/// A copy of a bodiless request, to send again if the Machine refuses the connection
/// (it was stopped behind the proxy's back, say): nothing of it reached the Machine.
fn replayable(request: &Request<Body>) -> Option<Request<Body>> {
    use hyper::body::Body as _;
    if !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version())
        .body(Body::empty())
        .ok()?;
    *copy.headers_mut() = request.headers().clone();
    if let Some(client) = request.extensions().get::<ClientAddr>().copied() {
        copy.extensions_mut().insert(client);
    }
    if let Some(app) = request.extensions().get::<crate::AppName>().cloned() {
        copy.extensions_mut().insert(app);
    }
    Some(copy)
}

pub(crate) async fn forward(
    client: &Client,
    ticket: Ticket,
    mut request: Request<Body>,
    max_body_bytes: usize,
) -> Forwarded {
    let client_addr = request.extensions().get::<ClientAddr>().map(|addr| addr.0);
    let upgrade = upgrade_of(request.headers());
    let mut replay = if upgrade.is_none() {
        replayable(&request)
    } else {
        None
    };
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();
    let uri = match Uri::try_from(format!("http://{}{path}", ticket.address)) {
        Ok(uri) => uri,
        Err(_) => {
            return Forwarded::Answer(
                ProxyError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "unusable request path",
                )
                .into_response(),
            )
        }
    };
    parts.uri = uri;
    parts.version = axum::http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    add_forwarded(&mut parts.headers, client_addr);
    parts.extensions = Default::default();
    let body = Body::new(Limited::new(body, max_body_bytes));
    let mut response = match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(error) => {
            if error.is_connect() && connect_timed_out(&error) {
                // Not gone but swamped: its listen queue is full and the SYN was dropped.
                // Marking it unreachable would turn every request for a second into a 502.
                tracing::debug!(machine = %ticket.machine(), "connecting to the Machine timed out");
                return Forwarded::Answer(
                    ProxyError::machine_busy(ticket.machine()).into_response(),
                );
            }
            if error.is_connect() {
                ticket.unreachable();
                tracing::warn!(machine = %ticket.machine(), %error, "Machine refused the connection");
                if let Some(request) = replay.take() {
                    return Forwarded::Refused(request);
                }
                return Forwarded::Answer(
                    ProxyError::machine_unreachable(ticket.machine()).into_response(),
                );
            }
            if caused_by::<http_body_util::LengthLimitError>(&error) {
                return Forwarded::Answer(
                    ProxyError::payload_too_large(max_body_bytes).into_response(),
                );
            }
            // Only the client's body gives an axum error: it ended early or was garbled.
            if caused_by::<axum::Error>(&error) {
                return Forwarded::Answer(
                    ProxyError::new(
                        StatusCode::BAD_REQUEST,
                        "malformed_request",
                        "the request body ended early or was malformed",
                    )
                    .into_response(),
                );
            }
            // Sent, then the connection closed with no answer: the Machine went away
            // mid-request (stopped or moved). A bodiless idempotent request may be sent
            // again (RFC 9110, 9.2.2), after the app's Machines are read again.
            if let Some(request) = replay.take().filter(|copy| copy.method().is_idempotent()) {
                ticket.unreachable();
                tracing::debug!(machine = %ticket.machine(), ?error, "no answer; sending the request again");
                return Forwarded::Refused(request);
            }
            tracing::debug!(machine = %ticket.machine(), ?error, "forwarding failed");
            return Forwarded::Answer(
                ProxyError::new(
                    StatusCode::BAD_GATEWAY,
                    "machine_error",
                    "the Machine closed the connection before answering",
                )
                .retry_after(Duration::from_secs(1))
                .into_response(),
            );
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_upgrade {
            let machine_side = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                // The ticket lives as long as the spliced connection: it is not idle.
                let _ticket = ticket;
                match futures::future::try_join(client_side, machine_side).await {
                    Ok((client_io, machine_io)) => {
                        let mut client_io = TokioIo::new(client_io);
                        let mut machine_io = TokioIo::new(machine_io);
                        let _ =
                            tokio::io::copy_bidirectional(&mut client_io, &mut machine_io).await;
                    }
                    Err(error) => tracing::debug!(%error, "upgrade failed"),
                }
            });
            let (parts, _) = response.into_parts();
            return Forwarded::Answer(Response::from_parts(parts, Body::empty()));
        }
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Forwarded::Answer(Response::from_parts(
        parts,
        Body::new(TicketBody {
            inner: body,
            ticket: Some(ticket),
        }),
    ))
}

/// The Machine's response body, holding the request's ticket until the last byte (or
/// until the client goes away), so a streaming response keeps its Machine busy.
struct TicketBody {
    inner: Incoming,
    ticket: Option<Ticket>,
}

impl hyper::body::Body for TicketBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.ticket = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
