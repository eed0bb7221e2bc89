//! The Berth domain, free of I/O: ids, config validation, the Machine state table, crash
//! recovery's decisions and the restart policy. Everything here is decided from its
//! arguments alone, so it is tested exhaustively without a host.

pub mod billing;
pub mod failpoint;
pub mod ids;
pub mod placement;
pub mod recovery;
pub mod restart;
pub mod schedule;
pub mod signal;
pub mod state;
pub mod validate;

pub use state::{Action, ActionPlan, StateError};
pub use validate::ConfigError;
