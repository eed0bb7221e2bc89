//! The control plane's images, served read-only over the OCI distribution protocol
//! (`/v2/…`), so agents pull them at create exactly as they pull from any registry. Only
//! holders of the join token may pull (HTTP Basic with the token as password, or Bearer).

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Shared;

fn registry_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"berth\""),
        );
    }
    response
}

/// The presented secret: a Bearer token, or the password of Basic credentials.
fn presented_secret(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_owned())
}

fn authorized(control: &Shared, headers: &HeaderMap) -> bool {
    let Some(secret) = presented_secret(headers) else {
        return false;
    };
    let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let expected: [u8; 32] = Sha256::digest(control.join_token.as_bytes()).into();
    bool::from(presented.ct_eq(&expected))
}

async fn base(State(control): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&control, &headers) {
        return registry_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "the join token is required",
        );
    }
    (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response()
}

fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

async fn content(
    State(control): State<Shared>,
    method: Method,
    headers: HeaderMap,
    UrlPath(rest): UrlPath<String>,
) -> Response {
    if !authorized(&control, &headers) {
        return registry_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "the join token is required",
        );
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return manifest(&control, &method, name, reference).await;
    }
    if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        return blob(&control, &method, digest, "application/octet-stream").await;
    }
    registry_error(
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
        "unknown registry path",
    )
}

async fn manifest(control: &Shared, method: &Method, name: &str, reference: &str) -> Response {
    let digest = if is_digest(reference) {
        reference.to_owned()
    } else {
        let images = control.images.clone();
        let full = format!("{name}:{reference}");
        match tokio::task::spawn_blocking(move || images.resolve(&full)).await {
            Ok(Ok(resolved)) => resolved.manifest_digest,
            _ => {
                return registry_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "no such manifest",
                )
            }
        }
    };
    let Some(path) = blob_path(control, &digest) else {
        return registry_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "no such manifest",
        );
    };
    let Ok(bytes) = tokio::fs::read(&path).await else {
        return registry_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "no such manifest",
        );
    };
    let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|manifest| manifest["mediaType"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned());
    let length = bytes.len();
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    respond(body, &media_type, &digest, length as u64)
}

fn blob_path(control: &Shared, digest: &str) -> Option<std::path::PathBuf> {
    if !is_digest(digest) {
        return None;
    }
    let hex = digest.strip_prefix("sha256:")?;
    Some(control.images.root().join("blobs").join("sha256").join(hex))
}

async fn blob(control: &Shared, method: &Method, digest: &str, media_type: &str) -> Response {
    let Some(path) = blob_path(control, digest) else {
        return registry_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "no such blob");
    };
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return registry_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "no such blob");
    };
    let Ok(metadata) = file.metadata().await else {
        return registry_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "no such blob");
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::new(file))
    };
    respond(body, media_type, digest, metadata.len())
}

fn respond(body: Body, media_type: &str, digest: &str, length: u64) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(media_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(digest) {
        headers.insert("docker-content-digest", value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// Routes at the root (`/v2/…`), outside the JSON API.
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v2/", get(base))
        .route("/v2/{*rest}", get(content))
}
