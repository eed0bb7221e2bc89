//! How Machines on a worker are reached, apart from the worker itself: the
//! [`WorkerService`] trait, the shapes it and the agent's HTTP API exchange, and
//! [`RemoteWorker`], the client of a worker in another process. The agent implements and
//! serves the trait; the control plane only calls it, so it needs nothing of the agent's
//! store, runtime or host code.

pub mod error;
pub mod remote;
pub mod service;
pub mod wire;

pub use error::{Result, WorkerError};
pub use remote::RemoteWorker;
pub use service::{
    CreateOnWorker, CreateVolumeOnWorker, EventSource, ExecOnWorker, ImageUsage, LogChunk,
    MachineNotice, MigrateIn, MigrationAnswer, MigrationPeer, MigrationStep, MigrationStream,
    NoticeSnapshot, StreamRequest, UpdateOnWorker, WorkerListener, WorkerService,
};
