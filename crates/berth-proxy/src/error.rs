//! The proxy's own answers: JSON `{"error", "message", "retry_after_ms"?}` like the API's.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_api::ErrorBody;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ProxyError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ProxyError {
        ProxyError {
            status,
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, wait: Duration) -> ProxyError {
        self.retry_after = Some(wait);
        self
    }

    pub fn unknown_app(host: &str) -> ProxyError {
        ProxyError::new(
            StatusCode::NOT_FOUND,
            "app_not_found",
            format!("no app is served at {host:?}"),
        )
    }

    pub fn payload_too_large(max_body_bytes: usize) -> ProxyError {
        ProxyError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are at most {max_body_bytes} bytes"),
        )
    }

    pub fn wake_timeout(timeout: Duration) -> ProxyError {
        ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "wake_timeout",
            format!(
                "no Machine of the app accepted connections within {} ms",
                timeout.as_millis()
            ),
        )
        .retry_after(Duration::from_secs(1))
    }

    pub fn over_capacity() -> ProxyError {
        ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
            "every Machine of the app is at its hard limit and none can be started",
        )
        .retry_after(Duration::from_secs(1))
    }

    pub fn no_machine_available() -> ProxyError {
        ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_machine_available",
            "the app has no started Machine with a service and none it may start",
        )
        .retry_after(Duration::from_secs(5))
    }

    pub fn machine_busy(machine: &str) -> ProxyError {
        ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "machine_busy",
            format!(
                "Machine {machine} did not accept the connection within {} s; it is taking no more",
                crate::forward::CONNECT_TIMEOUT.as_secs()
            ),
        )
        .retry_after(Duration::from_secs(1))
    }

    pub fn machine_unreachable(machine: &str) -> ProxyError {
        ProxyError::new(
            StatusCode::BAD_GATEWAY,
            "machine_unreachable",
            format!("Machine {machine} refused the connection"),
        )
        .retry_after(Duration::from_secs(1))
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
            retry_after_ms: self
                .retry_after
                .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            ..ErrorBody::default()
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, at least one, as the header wants.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
