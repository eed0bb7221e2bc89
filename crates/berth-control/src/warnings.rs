//! What a request asked for that Berth ignored (fields it does not know, as Fly's server
//! ignores them): collected while the body is parsed, and told in the answer's `warnings`
//! and its `berth-warnings` header.

use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use berth_api::{FieldWarning, WARNINGS_HEADER};

use crate::error::ApiError;

/// The largest answer the warnings are written into; bigger ones keep only the header.
const MAX_REWRITTEN_BODY: usize = 4 * 1024 * 1024;
const MAX_REWRITTEN_HINT: u64 = 4 * 1024 * 1024;

/// The request's warnings, shared between the body extractors and [`collect`].
#[derive(Clone, Default)]
pub(crate) struct Warnings(Arc<Mutex<Vec<FieldWarning>>>);

impl Warnings {
    pub fn push(&self, warning: FieldWarning) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(warning);
    }

    fn take(&self) -> Vec<FieldWarning> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Gives every request a place for its warnings and adds them to the answer.
pub(crate) async fn collect(mut request: Request, next: Next) -> Response {
    let warnings = Warnings::default();
    request.extensions_mut().insert(warnings.clone());
    let response = next.run(request).await;
    let list = warnings.take();
    if list.is_empty() {
        return response;
    }
    attach(response, list).await
}

async fn attach(response: Response, list: Vec<FieldWarning>) -> Response {
    let (mut parts, body) = response.into_parts();
    // Paths are the client's own keys: ones a header cannot carry are in the body only.
    let items: Vec<String> = list
        .iter()
        .map(|warning| format!("{}={}", warning.code, warning.field))
        .filter(|item| HeaderValue::from_str(item).is_ok())
        .collect();
    if let Ok(value) = HeaderValue::from_str(&items.join(", ")) {
        parts.headers.insert(WARNINGS_HEADER, value);
    }
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    let small = HttpBody::size_hint(&body)
        .upper()
        .is_some_and(|size| size <= MAX_REWRITTEN_HINT);
    if !json || !small {
        return Response::from_parts(parts, body);
    }
    let bytes = match axum::body::to_bytes(body, MAX_REWRITTEN_BODY).await {
        Ok(bytes) => bytes,
        Err(error) => return ApiError::internal(format!("answer body: {error}")).into_response(),
    };
    let rewritten = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.insert(
                "warnings".to_owned(),
                serde_json::to_value(&list).unwrap_or_default(),
            );
            serde_json::to_vec(&object).ok()
        }
        _ => None,
    };
    match rewritten {
        Some(rewritten) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(rewritten))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}
