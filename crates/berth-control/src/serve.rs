//! Serving a router over HTTP/1.1 with limits that hold before any auth runs: a time
//! limit on request heads (which also closes idle kept-alive connections), a cap on open
//! connections per client address and in all. Connections over a cap get one 503 in the
//! API's JSON error shape and are closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use berth_api::ErrorBody;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connection limits for [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// How long a connection may take to send a complete request head, counted from the
    /// moment it waits for one: a new connection, or a kept-alive one after its last
    /// answer. So it is also the idle keep-alive timeout.
    pub header_timeout: Duration,
    /// Open connections from one client (an IPv4 address, or an IPv6 /64); `None` for no
    /// cap (behind a reverse proxy every client has the proxy's address).
    pub max_connections_per_client: Option<usize>,
    /// Open connections in all.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> ServeLimits {
        ServeLimits {
            header_timeout: Duration::from_secs(10),
            max_connections_per_client: Some(128),
            max_connections: 1024,
        }
    }
}

/// How long a refused connection has to send its request head before it is dropped, and
/// how many may be answered at once (past that they are dropped without an answer).
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REFUSALS: usize = 64;
/// The retry hint a refused connection gets.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown`, then waits for open connections to
/// finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let counts = Arc::new(Counts::default());
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accepting an API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let admitted = match counts.admit(peer.ip(), &limits) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, refusal).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "API connection ended");
            }
            drop(admitted);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Which cap a connection is over.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    PerClient(usize),
    Total(usize),
}

/// Open connections, in all and per client.
#[derive(Default)]
struct Counts {
    open: Mutex<(usize, HashMap<ClientKey, usize>)>,
}

/// A client's address for the per-client cap: one IPv6 host usually holds a whole /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    V6Prefix(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.into()),
                None => ClientKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl Counts {
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ServeLimits) -> Result<Admitted, Refusal> {
        let key = ClientKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_client) = &mut *open;
        if *total >= limits.max_connections {
            return Err(Refusal::Total(limits.max_connections));
        }
        let mine = per_client.entry(key).or_insert(0);
        if let Some(cap) = limits.max_connections_per_client {
            if *mine >= cap {
                if *mine == 0 {
                    per_client.remove(&key);
                }
                return Err(Refusal::PerClient(cap));
            }
        }
        *mine += 1;
        *total += 1;
        Ok(Admitted {
            counts: self.clone(),
            key,
        })
    }
}

/// One admitted connection; dropping it frees its place.
struct Admitted {
    counts: Arc<Counts>,
    key: ClientKey,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_client) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(mine) = per_client.get_mut(&self.key) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                per_client.remove(&self.key);
            }
        }
    }
}

/// Reads the connection's first request head (so the client is not reset mid-request)
/// and answers it with a 503, closing the connection.
async fn refuse(stream: TcpStream, refusal: Refusal) {
    let message = match refusal {
        Refusal::PerClient(cap) => {
            format!("this client already has {cap} open connections to the API")
        }
        Refusal::Total(cap) => format!("the API already has {cap} open connections"),
    };
    let body = ErrorBody {
        error: "too_many_connections".to_owned(),
        message,
        retry_after_ms: Some(RETRY_AFTER.as_millis() as u64),
        ..ErrorBody::default()
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let service = hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
        let mut response =
            Response::new(http_body_util::Full::new(bytes::Bytes::from(body.clone())));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(RETRY_AFTER.as_secs()),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        std::future::ready(Ok::<_, std::convert::Infallible>(response))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // The body, if any, is not read; the whole exchange has one deadline.
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT * 2, connection).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_client: usize, total: usize) -> ServeLimits {
        ServeLimits {
            header_timeout: Duration::from_secs(1),
            max_connections_per_client: Some(per_client),
            max_connections: total,
        }
    }

    #[test]
    fn caps_count_per_client_and_in_all_and_free_on_drop() {
        let counts = Arc::new(Counts::default());
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let limits = limits(2, 3);
        let a = counts.admit(one, &limits).unwrap();
        let _b = counts.admit(one, &limits).unwrap();
        assert!(matches!(
            counts.admit(one, &limits),
            Err(Refusal::PerClient(2))
        ));
        let _c = counts.admit(two, &limits).unwrap();
        assert!(matches!(counts.admit(two, &limits), Err(Refusal::Total(3))));
        drop(a);
        let _d = counts.admit(one, &limits).unwrap();
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "fd00:1:2:3::1".parse().unwrap();
        let b: IpAddr = "fd00:1:2:3:ffff::9".parse().unwrap();
        let c: IpAddr = "fd00:1:2:4::1".parse().unwrap();
        assert_eq!(ClientKey::of(a), ClientKey::of(b));
        assert_ne!(ClientKey::of(a), ClientKey::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            ClientKey::of(mapped),
            ClientKey::of("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn no_per_client_cap_leaves_only_the_total() {
        let counts = Arc::new(Counts::default());
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let limits = ServeLimits {
            max_connections_per_client: None,
            ..limits(1, 2)
        };
        let _a = counts.admit(one, &limits).unwrap();
        let _b = counts.admit(one, &limits).unwrap();
        assert!(matches!(counts.admit(one, &limits), Err(Refusal::Total(2))));
    }
}
