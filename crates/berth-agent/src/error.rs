//! The agent's errors, each with the API status and stable code it maps to.

use berth_api::{ErrorBody, MachineState};
use berth_core::{ConfigError, StateError};
use berth_image::ImageError;
use berth_runtime::RuntimeError;
use berth_worker::error::image_status;
use berth_worker::WorkerError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("machine {0} not found")]
    NotFound(String),
    #[error(transparent)]
    InvalidState(#[from] StateError),
    #[error("machine {id} is busy with another operation; retry shortly")]
    Busy { id: String },
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("machine {id} failed to start: {source}")]
    StartFailed {
        id: String,
        #[source]
        source: RuntimeError,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("local store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("{0}")]
    Internal(String),
    /// A state change the lifecycle table does not allow: a defect in the agent, refused
    /// before anything is written.
    #[error("machine {id} cannot go from {from} to {to}")]
    IllegalTransition {
        id: String,
        from: MachineState,
        to: MachineState,
    },
    /// An error answer from a remote worker, passed on as it came.
    #[error("{}", body.message)]
    Remote { status: u16, body: Box<ErrorBody> },
    #[error("worker {worker} lacks {missing} to start this machine; stopped machines gave theirs back and another may have taken them")]
    InsufficientCapacity {
        worker: String,
        missing: String,
        /// The resources it lacks (`cpus`, `memory_mb`).
        resources: Vec<String>,
    },
    #[error("worker {worker} is unavailable: {reason}")]
    Unavailable { worker: String, reason: String },
    /// The Machine names a driver this worker does not offer.
    #[error("worker {worker} does not offer the runtime {runtime:?}")]
    MissingRuntime { worker: String, runtime: String },
    /// The Machine's driver cannot checkpoint a Machine with its memory.
    #[error("machine {id} runs with the {driver} driver, which cannot suspend a machine (only gvisor can); stop it instead: its files are kept")]
    SuspendUnsupported { id: String, driver: String },
    /// A move carries no checkpoints yet: refused rather than losing them.
    #[error("machine {id} has {count} checkpoints, which cannot move between workers yet; delete them to move it")]
    HasCheckpoints { id: String, count: usize },
    #[error("machine {id} has no checkpoint {checkpoint}")]
    CheckpointNotFound { id: String, checkpoint: String },
    /// The Machine's disk cannot be snapshotted (not a btrfs subvolume).
    #[error("machine {id} cannot be checkpointed: {why}")]
    CheckpointsUnsupported { id: String, why: String },
    /// A checkpoint operation the Machine's state forbids now.
    #[error("machine {id} is {state}: {why}")]
    CheckpointState {
        id: String,
        state: MachineState,
        why: &'static str,
    },
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    /// Whether the disk (or the store's filesystem) is full: the Machine's files or its
    /// record could not be written. Answered as 507 `insufficient_storage`.
    pub fn out_of_space(&self) -> bool {
        match self {
            AgentError::Runtime(RuntimeError::Io { error, .. }) => {
                error.raw_os_error() == Some(libc::ENOSPC)
                    || error.raw_os_error() == Some(libc::EDQUOT)
            }
            // SQLITE_FULL, with or without an extended code.
            AgentError::Store(sqlx::Error::Database(error)) => error
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| code & 0xff == 13),
            AgentError::Store(sqlx::Error::Io(error)) => error.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }

    /// The HTTP status and the JSON body that clients see.
    pub fn to_response(&self) -> (u16, ErrorBody) {
        let mut body = ErrorBody {
            message: self.to_string(),
            ..ErrorBody::default()
        };
        if self.out_of_space() {
            body.error = "insufficient_storage".into();
            return (507, body);
        }
        let status = match self {
            AgentError::NotFound(id) => return WorkerError::NotFound(id.clone()).to_response(),
            AgentError::InvalidState(error) => {
                body.error = "invalid_state".into();
                body.state = Some(error.state());
                if error.is_transient() {
                    body.retry_after_ms = Some(1000);
                }
                409
            }
            AgentError::Busy { id } => return WorkerError::Busy { id: id.clone() }.to_response(),
            AgentError::InvalidConfig(error) => {
                body.error = error.code().into();
                body.field = Some(error.field.clone());
                400
            }
            AgentError::Image(error) => {
                body.error = error.code().into();
                body.retry_after_ms = error.retry_after_ms();
                image_status(error)
            }
            AgentError::StartFailed { .. } => {
                body.error = "start_failed".into();
                body.state = Some(MachineState::Failed);
                422
            }
            // The Machine's open connections, not the platform: a conflict.
            AgentError::Runtime(error @ berth_runtime::RuntimeError::ConnectionsOpen { .. }) => {
                body.error = error.code().into();
                409
            }
            AgentError::Runtime(error) => {
                body.error = error.code().into();
                500
            }
            AgentError::Store(_)
            | AgentError::Internal(_)
            | AgentError::IllegalTransition { .. } => {
                body.error = "internal".into();
                500
            }
            AgentError::Remote { status, body } => {
                return WorkerError::Remote {
                    status: *status,
                    body: body.clone(),
                }
                .to_response()
            }
            AgentError::InsufficientCapacity {
                worker, resources, ..
            } => {
                body.error = "insufficient_capacity".into();
                body.retry_after_ms = Some(5000);
                body.worker = Some(worker.clone());
                body.missing = Some(resources.clone());
                503
            }
            // Placement's answer when no worker offers it; no retry hint, as there.
            AgentError::MissingRuntime { worker, .. } => {
                body.error = "insufficient_capacity".into();
                body.worker = Some(worker.clone());
                body.missing = Some(vec!["runtime".into()]);
                503
            }
            AgentError::SuspendUnsupported { .. } => {
                body.error = "suspend_unsupported".into();
                422
            }
            AgentError::HasCheckpoints { .. } => {
                body.error = "machine_has_checkpoints".into();
                409
            }
            AgentError::CheckpointNotFound { .. } => {
                body.error = "checkpoint_not_found".into();
                404
            }
            AgentError::CheckpointsUnsupported { .. } => {
                body.error = "checkpoints_unsupported".into();
                422
            }
            AgentError::CheckpointState { state, .. } => {
                body.error = "invalid_state".into();
                body.state = Some(*state);
                if !berth_core::state::is_resting(*state) {
                    body.retry_after_ms = Some(1000);
                }
                409
            }
            AgentError::Unavailable { worker, reason } => {
                return WorkerError::Unavailable {
                    worker: worker.clone(),
                    reason: reason.clone(),
                }
                .to_response()
            }
        };
        (status, body)
    }
}

/// What a caller of [`berth_worker::WorkerService`] gets: the cases it acts on by name,
/// the rest as the answer a client sees.
impl From<AgentError> for WorkerError {
    fn from(error: AgentError) -> WorkerError {
        match error {
            AgentError::NotFound(id) => WorkerError::NotFound(id),
            AgentError::Busy { id } => WorkerError::Busy { id },
            AgentError::Unavailable { worker, reason } => {
                WorkerError::Unavailable { worker, reason }
            }
            AgentError::Remote { status, body } => WorkerError::Remote { status, body },
            error => {
                let (status, body) = error.to_response();
                let body = Box::new(body);
                match error {
                    AgentError::StartFailed { id, .. } => WorkerError::StartFailed { id, body },
                    _ => WorkerError::Failed { status, body },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(error: ImageError) -> (u16, String, Option<u64>) {
        let (status, body) = AgentError::from(error).to_response();
        (status, body.error, body.retry_after_ms)
    }

    #[test]
    fn a_full_disk_under_a_machine_answers_insufficient_storage() {
        let full = AgentError::Runtime(RuntimeError::Io {
            context: "write config.json".into(),
            error: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        let (status, body) = full.to_response();
        assert_eq!((status, body.error.as_str()), (507, "insufficient_storage"));
        let other = AgentError::Runtime(RuntimeError::Io {
            context: "write config.json".into(),
            error: std::io::Error::from_raw_os_error(libc::EACCES),
        });
        assert_eq!(other.to_response().0, 500);
    }

    #[test]
    fn image_errors_answer_with_their_status_and_retry_hint() {
        assert_eq!(
            answer(ImageError::InvalidReference {
                reference: "X".into(),
                reason: "uppercase"
            }),
            (400, "invalid_image_ref".into(), None)
        );
        assert_eq!(
            answer(ImageError::NotFound("x".into())),
            (422, "image_not_found".into(), None)
        );
        assert_eq!(
            answer(ImageError::PlatformUnsupported("linux/amd64".into())),
            (422, "image_platform_unsupported".into(), None)
        );
        assert_eq!(
            answer(ImageError::RegistryUnauthorized {
                registry: "r".into(),
                message: "401".into()
            }),
            (422, "registry_unauthorized".into(), None)
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
        assert_eq!(
            answer(ImageError::InsufficientStorage {
                context: "writing".into(),
                source: std::io::Error::from_raw_os_error(28),
            }),
            (507, "insufficient_storage".into(), None)
        );
    }
}
