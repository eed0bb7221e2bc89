//! Shapes of the agent's HTTP API (`/agent/v1/...`) that are not arguments of
//! [`crate::WorkerService`] itself: the server in the agent and [`crate::RemoteWorker`]
//! both use these, so the two cannot drift apart.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::service::{EventSource, MachineNotice, NoticeSnapshot};

/// A blank line this often tells the follower of `/agent/v1/notices` the stream is alive.
pub const NOTICE_KEEPALIVE: Duration = Duration::from_secs(10);

/// One line of `GET /agent/v1/notices` (NDJSON): first the snapshot, then every notice
/// recorded after it. Blank lines are keepalives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeLine {
    Snapshot(NoticeSnapshot),
    Notice(MachineNotice),
}

/// The body of `POST /agent/v1/machines/{id}/metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataChange {
    pub key: String,
    pub value: Option<String>,
}

/// The body of `POST /agent/v1/machines/{id}/start` and `…/suspend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartBody {
    pub source: EventSource,
}
