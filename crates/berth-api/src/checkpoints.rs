//! Checkpoints of a Machine's disk: `…/machines/{id}/checkpoints`, their restore, and
//! forks (`from_checkpoint` at create, `…/machines/{id}/fork`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest `comment` a checkpoint keeps, in bytes.
pub const MAX_CHECKPOINT_COMMENT: usize = 1024;

/// One checkpoint of a Machine's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    /// `cp_` and 16 lowercase letters or digits.
    pub id: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(default)]
    pub comment: String,
    /// Bytes of the Machine's writable layer the checkpoint holds, shared with the
    /// Machine and other checkpoints (from the filesystem's accounting; 0 where the
    /// filesystem keeps none, and up to a transaction commit late).
    pub size_bytes: u64,
    /// Bytes only this checkpoint holds: what deleting it frees, and what it is billed.
    #[serde(default)]
    pub exclusive_bytes: u64,
    /// The checkpoint the Machine's files came from when this one was taken (the last one
    /// taken or restored before it), if any still exists.
    #[serde(default)]
    pub parent: Option<String>,
    /// Taken by a restore, so that the restore can be undone.
    #[serde(default)]
    pub auto: bool,
}

/// `POST …/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpointRequest {
    #[serde(default)]
    pub comment: String,
}

/// The answer of `POST …/checkpoints/{cp}/restore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestoreCheckpointResponse {
    /// The checkpoint whose files the Machine now has.
    pub restored: String,
    /// The automatic checkpoint of the files the Machine had: restoring it undoes this.
    pub undo: Checkpoint,
    /// The Machine was running: it was stopped, restored and started again.
    pub restarted: bool,
    pub machine: crate::Machine,
}

/// `from_checkpoint` of a create: the new Machine starts with the files of another
/// Machine's checkpoint (of the same org).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FromCheckpoint {
    /// The Machine the checkpoint belongs to.
    pub machine: String,
    pub checkpoint: String,
    /// The app of `machine` when it is not the app of the new Machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}
