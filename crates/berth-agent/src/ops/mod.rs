//! The state-changing operations, one module each. Each is a short sequence of durable
//! steps with a failpoint after every one (see [`crate::failpoint`]).

use crate::error::{AgentError, Result};

pub mod checkpoint;
pub mod create;
pub mod destroy;
pub mod migrate;
pub mod start;
pub mod stop;
pub mod suspend;
pub mod update;

/// Runs an operation to its end even when its caller goes away (a client that hangs up,
/// a control plane that dies): a future dropped halfway would leave the record in a
/// transitional state with nothing running it. A retry waits on the Machine's lock and
/// finds the finished result.
pub(crate) async fn detached<T: Send + 'static>(
    operation: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(operation)
        .await
        .map_err(|error| AgentError::Internal(format!("operation task: {error}")))?
}
