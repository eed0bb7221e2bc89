//! Several replicas of `berth server`: the CLI's `BERTH_API_URL` and the agent's
//! `--control-url` take a comma-separated list of base URLs, and a call that cannot reach
//! one replica is sent to the next.
//!
//! A call is tried again elsewhere only when doing so cannot do its work twice: the
//! connection was never made (nothing was sent), or the method is idempotent, or the call
//! carries an `Idempotency-Key` (the replicas share the key's first answer).

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Result};
use reqwest::{Method, Request};

#[derive(Debug)]
pub struct Endpoints {
    bases: Vec<String>,
    /// The replica that answered last: tried first.
    current: AtomicUsize,
}

impl Endpoints {
    /// Reads `http(s)://host:port[,http(s)://host:port…]`.
    pub fn parse(list: &str) -> Result<Endpoints> {
        let mut bases = Vec::new();
        for base in list
            .split(',')
            .map(str::trim)
            .filter(|base| !base.is_empty())
        {
            let parsed = reqwest::Url::parse(base)
                .map_err(|error| anyhow::anyhow!("{base:?} is not a URL: {error}"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                bail!("{base:?} must be http(s)://HOST:PORT");
            }
            if parsed.query().is_some() || parsed.fragment().is_some() {
                bail!("{base:?} must have no query or fragment");
            }
            bases.push(base.trim_end_matches('/').to_owned());
        }
        if bases.is_empty() {
            bail!("no URL given");
        }
        Ok(Endpoints {
            bases,
            current: AtomicUsize::new(0),
        })
    }

    /// The first URL listed: what requests are built against before [`Endpoints::send`]
    /// points them at a replica.
    pub fn first(&self) -> &str {
        &self.bases[0]
    }

    /// Every URL, as listed.
    pub fn all(&self) -> &[String] {
        &self.bases
    }

    /// The replica tried first now.
    pub fn current(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Sends `request` (built against [`Endpoints::first`]) to the replica that answered
    /// last, then to each other in turn while the failure allows it.
    pub async fn send(
        &self,
        http: &reqwest::Client,
        request: Request,
    ) -> reqwest::Result<reqwest::Response> {
        let repeatable = may_repeat(&request);
        self.send_to_any(http, request, repeatable).await
    }

    /// [`Endpoints::send`] for a call the caller knows may be sent twice (a heartbeat).
    pub async fn send_repeatable(
        &self,
        http: &reqwest::Client,
        request: Request,
    ) -> reqwest::Result<reqwest::Response> {
        self.send_to_any(http, request, true).await
    }

    async fn send_to_any(
        &self,
        http: &reqwest::Client,
        request: Request,
        retriable: bool,
    ) -> reqwest::Result<reqwest::Response> {
        let count = self.bases.len();
        let start = self.current.load(Ordering::Relaxed) % count;
        let mut attempt = request;
        let mut step = 0;
        loop {
            let index = (start + step) % count;
            let spare = attempt.try_clone();
            self.point_at(&mut attempt, index);
            match http.execute(attempt).await {
                Ok(response) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(response);
                }
                Err(error) => {
                    step += 1;
                    let again = (error.is_connect() || retriable) && step < count;
                    match (again, spare) {
                        (true, Some(next)) => attempt = next,
                        _ => return Err(error),
                    }
                }
            }
        }
    }

    /// Rewrites a URL built against the first base to the same path on base `index`.
    fn point_at(&self, request: &mut Request, index: usize) {
        if index == 0 {
            return;
        }
        let url = request.url().as_str();
        let Some(rest) = url.strip_prefix(self.bases[0].as_str()) else {
            return;
        };
        if let Ok(moved) = reqwest::Url::parse(&format!("{}{rest}", self.bases[index])) {
            *request.url_mut() = moved;
        }
    }
}

/// Whether sending `request` twice does its work once.
fn may_repeat(request: &Request) -> bool {
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    ) || request.headers().contains_key("idempotency-key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_read_and_checked() {
        let endpoints = Endpoints::parse(" http://127.0.0.1:1/ ,https://a.example:2").unwrap();
        assert_eq!(
            endpoints.all(),
            ["http://127.0.0.1:1", "https://a.example:2"]
        );
        for bad in ["", " , ", "ftp://x:1", "127.0.0.1:4280", "http://x:1/?a=b"] {
            assert!(Endpoints::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_request_is_pointed_at_another_replica_with_its_path_and_query() {
        let endpoints = Endpoints::parse("http://127.0.0.1:1,http://127.0.0.2:2").unwrap();
        let mut request = reqwest::Client::new()
            .get(format!("{}/v1/apps?x=1", endpoints.first()))
            .build()
            .unwrap();
        endpoints.point_at(&mut request, 1);
        assert_eq!(request.url().as_str(), "http://127.0.0.2:2/v1/apps?x=1");
    }

    #[test]
    fn only_calls_that_cannot_act_twice_repeat_after_sending() {
        let client = reqwest::Client::new();
        let get = client.get("http://h:1/").build().unwrap();
        let post = client.post("http://h:1/").build().unwrap();
        let keyed = client
            .post("http://h:1/")
            .header("Idempotency-Key", "k")
            .build()
            .unwrap();
        assert!(may_repeat(&get));
        assert!(!may_repeat(&post));
        assert!(may_repeat(&keyed));
    }

    /// A replica that is down (nothing listens) is skipped, the one that answers is kept
    /// for the next call, and a POST is sent on when the first connection never opened.
    #[tokio::test]
    async fn a_call_fails_over_to_the_replica_that_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/v1/health", axum::routing::post(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let dead = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap()
        };
        let endpoints = Endpoints::parse(&format!("http://{dead},http://{live}")).unwrap();
        let http = reqwest::Client::new();
        let request = http
            .post(format!("{}/v1/health", endpoints.first()))
            .build()
            .unwrap();
        let response = endpoints.send(&http, request).await.unwrap();
        assert_eq!(response.text().await.unwrap(), "ok");
        assert_eq!(endpoints.current(), format!("http://{live}"));
    }
}
