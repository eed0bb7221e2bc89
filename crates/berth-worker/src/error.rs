//! What a worker answers when an operation does not succeed. The cases a caller acts on
//! are variants of their own; everything else is carried as the status and JSON body a
//! client is answered with, which is all the control plane does with it.

use berth_api::{ErrorBody, MachineState};
use berth_image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("machine {0} not found")]
    NotFound(String),
    #[error("machine {id} is busy with another operation; retry shortly")]
    Busy { id: String },
    /// The start failed and the worker left the Machine `failed`: it exists.
    #[error("{}", body.message)]
    StartFailed { id: String, body: Box<ErrorBody> },
    #[error("worker {worker} is unavailable: {reason}")]
    Unavailable { worker: String, reason: String },
    /// An error answer from a remote worker, passed on as it came.
    #[error("{}", body.message)]
    Remote { status: u16, body: Box<ErrorBody> },
    /// Any other refusal or failure, as the worker answers it.
    #[error("{}", body.message)]
    Failed { status: u16, body: Box<ErrorBody> },
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    /// A failure inside the worker (or its client) that the caller cannot act on.
    pub fn internal(message: impl Into<String>) -> WorkerError {
        WorkerError::Failed {
            status: 500,
            body: Box::new(ErrorBody {
                error: "internal".into(),
                message: message.into(),
                ..ErrorBody::default()
            }),
        }
    }

    /// The HTTP status and the JSON body that clients see.
    pub fn to_response(&self) -> (u16, ErrorBody) {
        let mut body = ErrorBody {
            message: self.to_string(),
            ..ErrorBody::default()
        };
        let status = match self {
            WorkerError::NotFound(_) => {
                body.error = "not_found".into();
                404
            }
            WorkerError::Busy { .. } => {
                body.error = "invalid_state".into();
                body.retry_after_ms = Some(1000);
                409
            }
            WorkerError::StartFailed { body: failed, .. } => {
                body = (**failed).clone();
                422
            }
            WorkerError::Unavailable { worker, .. } => {
                body.worker = Some(worker.clone());
                body.error = "worker_unavailable".into();
                body.retry_after_ms = Some(2000);
                503
            }
            WorkerError::Remote {
                status,
                body: answered,
            }
            | WorkerError::Failed {
                status,
                body: answered,
            } => {
                body = (**answered).clone();
                *status
            }
        };
        (status, body)
    }

    /// The answer to a start that failed on the host; the Machine is left `failed`.
    pub fn start_failed(id: &str, message: String) -> WorkerError {
        WorkerError::StartFailed {
            id: id.to_owned(),
            body: Box::new(ErrorBody {
                error: "start_failed".into(),
                message,
                state: Some(MachineState::Failed),
                ..ErrorBody::default()
            }),
        }
    }
}

/// The status an image error is answered with; its code and retry hint are its own.
pub fn image_status(error: &ImageError) -> u16 {
    match error.code() {
        "invalid_image_ref" => 400,
        "registry_not_allowed" => 403,
        "insufficient_storage" => 507,
        "registry_unreachable" => 503,
        "internal" => 500,
        _ => 422,
    }
}

impl From<ImageError> for WorkerError {
    fn from(error: ImageError) -> WorkerError {
        WorkerError::Failed {
            status: image_status(&error),
            body: Box::new(ErrorBody {
                error: error.code().into(),
                message: error.to_string(),
                retry_after_ms: error.retry_after_ms(),
                ..ErrorBody::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_case_answers_with_its_stable_code() {
        let answer = |error: WorkerError| {
            let (status, body) = error.to_response();
            (status, body.error, body.retry_after_ms)
        };
        assert_eq!(
            answer(WorkerError::NotFound("m".into())),
            (404, "not_found".into(), None)
        );
        assert_eq!(
            answer(WorkerError::Busy { id: "m".into() }),
            (409, "invalid_state".into(), Some(1000))
        );
        assert_eq!(
            answer(WorkerError::Unavailable {
                worker: "w".into(),
                reason: "refused".into()
            }),
            (503, "worker_unavailable".into(), Some(2000))
        );
        let failed = WorkerError::start_failed("m", "machine m failed to start: no".into());
        assert_eq!(failed.to_string(), "machine m failed to start: no");
        let (status, body) = failed.to_response();
        assert_eq!(
            (status, body.error.as_str(), body.state),
            (422, "start_failed", Some(MachineState::Failed))
        );
        assert_eq!(
            answer(WorkerError::internal("broken")),
            (500, "internal".into(), None)
        );
    }

    #[test]
    fn image_errors_answer_with_their_status_and_retry_hint() {
        let answer = |error: ImageError| {
            let (status, body) = WorkerError::from(error).to_response();
            (status, body.error, body.retry_after_ms)
        };
        assert_eq!(
            answer(ImageError::NotFound("x".into())),
            (422, "image_not_found".into(), None)
        );
        assert_eq!(
            answer(ImageError::RegistryUnreachable {
                registry: "r".into(),
                message: "refused".into()
            }),
            (
                503,
                "registry_unreachable".into(),
                Some(berth_image::REGISTRY_RETRY_AFTER_MS)
            )
        );
    }
}
