use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while running a Machine on the host.
///
/// Variants say what failed, not which driver was running; `driver` says that where it
/// matters. A variant either shows its cause in its message or returns it from
/// `source()`, never both, so a reporter that walks the chain says each thing once.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A host operation (file, mount, namespace, process) failed; `error` carries the
    /// errno and is part of the message.
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
    /// The driver could not start the Machine; `message` carries the driver's own words
    /// (runc's, or the supervisor's).
    #[error("{driver} could not start machine {id}: {message}")]
    Start {
        driver: &'static str,
        id: String,
        message: String,
    },
    /// Start found the Machine's supervisor still alive.
    #[error("machine {id} is already running (shim pid {shim_pid})")]
    AlreadyRunning { id: String, shim_pid: u32 },
    /// An operation that needs the Machine running found it stopped.
    #[error("machine {id} is not running")]
    NotRunning { id: String },
    /// The driver could not clear a run's state; `message` carries its own words.
    #[error("{driver} could not clean up machine {id}: {message}")]
    Cleanup {
        driver: &'static str,
        id: String,
        message: String,
    },
    #[error("machine {id} did not start within {timeout:?}")]
    StartTimeout { id: String, timeout: Duration },
    /// start was called before prepare wrote the bundle.
    #[error("machine {id} is not prepared: {} is missing", path.display())]
    NotPrepared { id: String, path: PathBuf },
    #[error("invalid spec for machine {id}: {message}")]
    InvalidSpec { id: String, message: String },
    /// A netlink request for the Machine network failed; `error` carries the errno and
    /// is part of the message.
    #[error("{context}: {error}")]
    Network { context: String, error: io::Error },
    /// The worker's network configuration (bridge name, prefix) cannot be used.
    #[error("invalid network configuration: {0}")]
    InvalidNetwork(String),
    /// Freezing or thawing the Machine's processes failed; `message` carries the
    /// freezer's own words.
    #[error("could not freeze or thaw machine {id}: {message}")]
    Freeze { id: String, message: String },
    /// The driver cannot do this at all (suspend and resume on runc or native, whose
    /// checkpointing, CRIU, fails on these kernels).
    #[error("the {driver} driver cannot {what} a machine")]
    Unsupported {
        driver: &'static str,
        what: &'static str,
    },
    /// The driver's checkpoint of a running Machine failed; `message` carries its own
    /// words. No image was left behind.
    #[error("{driver} could not checkpoint machine {id}: {message}")]
    Checkpoint {
        driver: &'static str,
        id: String,
        message: String,
    },
    /// The checkpoint failed because the Machine had TCP connections open, or closed less
    /// than a minute ago (in TIME_WAIT): this runsc saves no connected endpoint, and its
    /// sandbox ends in the attempt. The Machine's files are kept; its memory is not.
    #[error("{driver} could not checkpoint machine {id}: it had TCP connections open (or closed under 60 s ago, in TIME_WAIT), which this runsc cannot save, and its sandbox ended in the attempt; its files are kept")]
    ConnectionsOpen { driver: &'static str, id: String },
    /// A memory image that must not be resumed: missing, half-written, or failing its
    /// integrity check. Nothing was started; the Machine can boot fresh from its disk.
    #[error("memory image of machine {id} at {} cannot be resumed: {message}", path.display())]
    MemoryImage {
        id: String,
        path: PathBuf,
        message: String,
    },
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
            RuntimeError::Start { .. }
            | RuntimeError::AlreadyRunning { .. }
            | RuntimeError::NotRunning { .. }
            | RuntimeError::Cleanup { .. }
            | RuntimeError::Freeze { .. } => "runtime_failed",
            RuntimeError::StartTimeout { .. } => "start_timeout",
            RuntimeError::NotPrepared { .. } => "not_prepared",
            RuntimeError::InvalidSpec { .. } => "invalid_spec",
            RuntimeError::Network { .. } => "network_failed",
            RuntimeError::InvalidNetwork(_) => "invalid_network",
            RuntimeError::NotSupported(_) => "not_supported",
            RuntimeError::Unsupported { what, .. } => match *what {
                "suspend" | "resume" => "suspend_unsupported",
                _ => "unsupported",
            },
            RuntimeError::Checkpoint { .. } => "runtime_failed",
            RuntimeError::ConnectionsOpen { .. } => "suspend_connections_open",
            RuntimeError::MemoryImage { .. } => "memory_image_unusable",
        }
    }

    pub(crate) fn io(context: impl Into<String>, error: io::Error) -> RuntimeError {
        RuntimeError::Io {
            context: context.into(),
            error,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    /// Each message says its cause once: shown in the message, or given as the source.
    #[test]
    fn no_message_repeats_its_source() {
        let errno = || io::Error::from_raw_os_error(libc::ENOSPC);
        let errors = [
            RuntimeError::io("write config.json", errno()),
            RuntimeError::Network {
                context: "add veth".into(),
                error: errno(),
            },
            RuntimeError::Start {
                driver: "native",
                id: "m1".into(),
                message: "exec failed".into(),
            },
        ];
        for error in errors {
            let mut text = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                assert!(!text.contains(&cause_text), "{text} repeats {cause_text}");
                text = cause_text;
                source = cause.source();
            }
        }
        assert_eq!(
            RuntimeError::io("write config.json", errno()).to_string(),
            format!("write config.json: {}", errno())
        );
    }

    #[test]
    fn suspend_errors_name_the_driver_and_have_codes_of_their_own() {
        let unsupported = RuntimeError::Unsupported {
            driver: "runc",
            what: "suspend",
        };
        assert_eq!(unsupported.code(), "suspend_unsupported");
        assert!(unsupported.to_string().contains("runc"), "{unsupported}");
        let image = RuntimeError::MemoryImage {
            id: "m1".into(),
            path: "/m/memory".into(),
            message: "no manifest".into(),
        };
        assert_eq!(image.code(), "memory_image_unusable");
        assert_ne!(image.code(), unsupported.code());
    }
}
