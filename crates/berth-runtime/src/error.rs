use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while running a Machine on the host.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A host operation (file, mount, namespace, process) failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// runc or the shim refused to run the Machine; `message` carries runc's own words.
    #[error("runc failed for machine {id}: {message}")]
    Runc { id: String, message: String },
    #[error("machine {id} did not start within {timeout:?}")]
    StartTimeout { id: String, timeout: Duration },
    /// start was called before prepare wrote the bundle.
    #[error("machine {id} is not prepared: {} is missing", path.display())]
    NotPrepared { id: String, path: PathBuf },
    #[error("invalid spec for machine {id}: {message}")]
    InvalidSpec { id: String, message: String },
    /// A netlink request for the Machine network failed; `source` carries the errno.
    #[error("{context}: {source}")]
    Network {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The worker's network configuration (bridge name, prefix) cannot be used.
    #[error("invalid network configuration: {0}")]
    InvalidNetwork(String),
    /// A documented option that this build does not implement.
    #[error("{0} is not supported yet")]
    NotSupported(String),
    #[error("internal runtime error: {0}")]
    Internal(String),
}

impl RuntimeError {
    /// Stable code for the API layer.
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::Io { .. } | RuntimeError::Internal(_) => "internal",
            RuntimeError::Runc { .. } => "runtime_failed",
            RuntimeError::StartTimeout { .. } => "start_timeout",
            RuntimeError::NotPrepared { .. } => "not_prepared",
            RuntimeError::InvalidSpec { .. } => "invalid_spec",
            RuntimeError::Network { .. } => "network_failed",
            RuntimeError::InvalidNetwork(_) => "invalid_network",
            RuntimeError::NotSupported(_) => "not_supported",
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> RuntimeError {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to `io::Result`s in one call.
pub(crate) trait IoContext<T> {
    fn ctx<F: FnOnce() -> String>(self, context: F) -> Result<T, RuntimeError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, context: F) -> Result<T, RuntimeError> {
        self.map_err(|e| RuntimeError::io(context(), e))
    }
}
