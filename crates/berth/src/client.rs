//! A small typed client for the Berth API, used by the CLI and the demo.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use berth_api::{ErrorBody, ImagePullEvent, ImagePullRequest};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::endpoints::Endpoints;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// One URL per replica of the API.
    endpoints: Arc<Endpoints>,
    token: String,
    lease_nonce: Option<String>,
}

/// An error answer from the API, kept whole so callers can match on the code.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.body.error,
            self.status.as_u16(),
            self.body.message
        )?;
        if let Some(field) = &self.body.field {
            write!(f, " [field {field}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiFailure {}

impl Client {
    /// A client for `api_url`, with `token` or else the one in `<data_dir>/admin-token`.
    pub fn connect(api_url: &str, token: Option<&str>, data_dir: &Path) -> Result<Client> {
        let token = match token {
            Some(token) => token.to_owned(),
            None => {
                let path = data_dir.join("admin-token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("no BERTH_TOKEN given and cannot read {}", path.display())
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Client::new(api_url, &token)
    }

    /// A client for `base`: one URL, or several comma-separated (replicas of the API).
    pub fn new(base: &str, token: &str) -> Result<Client> {
        let http = reqwest::Client::builder().build()?;
        let endpoints = Endpoints::parse(base).context("the API URL")?;
        Ok(Client {
            http,
            endpoints: Arc::new(endpoints),
            token: token.to_owned(),
            lease_nonce: None,
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The replica the next call goes to first: the one that answered last.
    pub fn current_url(&self) -> &str {
        self.endpoints.current()
    }

    /// Sends the nonce in `fly-machine-lease-nonce` (Fly's header) on every call, for
    /// Machines under a lease.
    pub fn with_lease_nonce(mut self, nonce: Option<String>) -> Client {
        self.lease_nonce = nonce;
        self
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.endpoints.first()))
            .bearer_auth(&self.token);
        match &self.lease_nonce {
            Some(nonce) => request.header(berth_api::LEASE_NONCE_HEADER, nonce),
            None => request,
        }
    }

    /// Sends to a replica that answers, and when the API answers 429 waits as long as it
    /// says and tries again: a refused call did nothing, so any call may be retried.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        const ATTEMPTS: usize = 8;
        let request = request.build().context("building the request")?;
        for _ in 1..ATTEMPTS {
            let Some(attempt) = request.try_clone() else {
                break;
            };
            let response = self
                .endpoints
                .send(&self.http, attempt)
                .await
                .with_context(|| self.unreachable())?;
            if response.status() != StatusCode::TOO_MANY_REQUESTS {
                return Ok(response);
            }
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|text| text.parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 60);
            tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
        }
        self.send_once(request).await
    }

    /// Sends once (to a replica that answers), 429 included.
    async fn send_once(&self, request: reqwest::Request) -> Result<reqwest::Response> {
        self.endpoints
            .send(&self.http, request)
            .await
            .with_context(|| self.unreachable())
    }

    /// A GET whose answer is read as it arrives (log following).
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response> {
        let request = self.request(Method::GET, path);
        let response = self.send(request).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        Self::finish::<serde_json::Value>(response)
            .await
            .and_then(|_| bail!("unexpected answer"))
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let request = self.request(Method::PUT, path).json(body);
        let response = self.send(request).await?;
        Self::finish(response).await
    }

    async fn finish<T: DeserializeOwned>(response: reqwest::Response) -> Result<T> {
        let status = response.status();
        let bytes = response.bytes().await.context("reading the API's answer")?;
        if status.is_success() {
            let body = if bytes.is_empty() {
                b"null".as_slice()
            } else {
                &bytes
            };
            return serde_json::from_slice(body)
                .with_context(|| format!("decoding the API's answer ({status})"));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ApiFailure { status, body }.into()),
            Err(_) => bail!(
                "the API answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let request = self.request(Method::GET, path);
        let response = self.send(request).await?;
        Self::finish(response).await
    }

    /// A raw GET with an `Accept` header, for non-JSON answers such as CSV.
    pub async fn get_with_accept(&self, path: &str, accept: &str) -> Result<Vec<u8>> {
        let request = self
            .request(Method::GET, path)
            .header(reqwest::header::ACCEPT, accept)
            .build()
            .context("building the request")?;
        let response = self.send_once(request).await?;
        if response.status().is_success() {
            return Ok(response.bytes().await?.to_vec());
        }
        Self::finish::<serde_json::Value>(response)
            .await
            .map(|_| Vec::new())
    }

    pub async fn get_text(&self, path: &str) -> Result<Vec<u8>> {
        let request = self.request(Method::GET, path);
        let response = self.send(request).await?;
        if response.status().is_success() {
            return Ok(response.bytes().await?.to_vec());
        }
        Self::finish::<serde_json::Value>(response)
            .await
            .map(|_| Vec::new())
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let request = self.request(Method::POST, path).json(body);
        let response = self.send(request).await?;
        Self::finish(response).await
    }

    /// A POST whose answer's headers matter too (`Server-Timing` of start).
    pub async fn post_with_headers<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(T, reqwest::header::HeaderMap)> {
        let request = self.request(Method::POST, path).json(body);
        let response = self.send(request).await?;
        let headers = response.headers().clone();
        Ok((Self::finish(response).await?, headers))
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let request = self.request(Method::DELETE, path);
        let response = self.send(request).await?;
        Self::finish(response).await
    }

    /// Uploads an OCI archive file to `POST /v1/images/import`.
    pub async fn import_archive<T: DeserializeOwned>(
        &self,
        archive: &Path,
        name: &str,
    ) -> Result<T> {
        let file = tokio::fs::File::open(archive)
            .await
            .with_context(|| format!("open {}", archive.display()))?;
        let length = file.metadata().await?.len();
        let body = reqwest::Body::wrap_stream(file_chunks(file));
        let request = self
            .request(Method::POST, "/v1/images/import")
            .query(&[("name", name)])
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(body);
        let response = self.send(request).await?;
        Self::finish(response).await
    }

    /// `POST /v1/images/pull`, calling `on_event` for each progress line as it arrives.
    /// A last `error` line becomes an [`ApiFailure`].
    pub async fn pull_image(
        &self,
        image: &str,
        mut on_event: impl FnMut(&ImagePullEvent),
    ) -> Result<ImagePullEvent> {
        use futures::StreamExt;
        let request = self
            .request(Method::POST, "/v1/images/pull")
            .json(&ImagePullRequest {
                image: image.to_owned(),
            })
            .build()
            .context("building the request")?;
        let response = self.send_once(request).await?;
        if !response.status().is_success() {
            return Self::finish(response).await;
        }
        let mut stream = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut last = None;
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.context("reading pull progress")?);
            while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: ImagePullEvent =
                    serde_json::from_slice(&line).context("decoding a pull progress line")?;
                on_event(&event);
                last = Some(event);
            }
        }
        let last = last.context("the pull answered no progress at all")?;
        match last.status.as_str() {
            "done" => Ok(last),
            "error" => Err(ApiFailure {
                status: StatusCode::OK,
                body: ErrorBody {
                    error: last.error.clone().unwrap_or_else(|| "internal".to_owned()),
                    message: last.message.clone().unwrap_or_default(),
                    retry_after_ms: last.retry_after_ms,
                    ..ErrorBody::default()
                },
            }
            .into()),
            other => bail!("the pull stopped after a {other:?} event"),
        }
    }

    fn unreachable(&self) -> String {
        format!(
            "cannot reach the Berth API at {} (is `berth up` running?)",
            self.endpoints.all().join(", ")
        )
    }
}

/// Streams a file in chunks, so large archives never sit in memory.
fn file_chunks(file: tokio::fs::File) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 256 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(buffer), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    })
}

pub fn is_api_error(error: &anyhow::Error, code: &str) -> bool {
    error
        .downcast_ref::<ApiFailure>()
        .is_some_and(|failure| failure.body.error == code)
}
