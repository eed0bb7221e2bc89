//! API errors: every failure leaves the server as JSON with a stable code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_api::ErrorBody;
use berth_core::ConfigError;
use berth_worker::WorkerError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Boxed: errors travel in every `Result` of the server.
    pub body: Box<ErrorBody>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: Box::new(ErrorBody {
                error: code.to_owned(),
                message: message.into(),
                ..ErrorBody::default()
            }),
        }
    }

    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn invalid_config(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        let mut error = ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", message);
        error.body.field = Some(field.into());
        error
    }

    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        tracing::error!(%message, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message.to_string(),
        )
    }
}

impl From<ConfigError> for ApiError {
    fn from(error: ConfigError) -> ApiError {
        let mut api = ApiError::invalid_config(error.field.clone(), error.to_string());
        api.body.error = error.code().to_owned();
        api
    }
}

impl From<WorkerError> for ApiError {
    fn from(error: WorkerError) -> ApiError {
        let (status, body) = error.to_response();
        if status >= 500 {
            tracing::error!(%error, "worker error");
        }
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: Box::new(body),
        }
    }
}

impl From<berth_image::ImageError> for ApiError {
    fn from(error: berth_image::ImageError) -> ApiError {
        WorkerError::from(error).into()
    }
}

/// The retry hint of `store_unavailable`: about how long a pool takes to reconnect.
const STORE_RETRY_AFTER_MS: u64 = 1000;

/// Whether the database could not be reached or dropped the connection, rather than
/// refusing the statement: the pool timing out (connecting included), I/O errors, a
/// closed pool, and PostgreSQL's connection and shutdown classes (08, 57P0x) and its
/// statement timeout (57014).
fn store_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P0") || code == "57014"
        }),
        _ => false,
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        // SQLITE_FULL (with or without an extended code): the disk is full, which the
        // operator can fix and the client may retry later.
        let full = match &error {
            sqlx::Error::Database(database) => database
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| code & 0xff == 13),
            sqlx::Error::Io(io) => io.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        };
        if full {
            return ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                format!("the control plane's disk is full: {error}"),
            );
        }
        if store_unreachable(&error) {
            tracing::warn!(%error, "the control store is unreachable");
            let mut api = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the control plane's database is unreachable: {error}"),
            );
            api.body.retry_after_ms = Some(STORE_RETRY_AFTER_MS);
            return api;
        }
        ApiError::internal(format!("control store: {error}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.body.retry_after_ms;
        let status = self.status;
        let mut response = (status, Json(*self.body)).into_response();
        // The unread rest of an oversized body makes the connection unusable; say so, or a
        // client may send its next request down a connection the server is closing.
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(millis) = retry_after {
            let seconds = millis.div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
