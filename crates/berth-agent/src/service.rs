//! The one interface through which Machines on a worker are reached. The HTTP API, the
//! CLI (through the API) and later the proxy's autostart all come through here; a remote
//! worker will implement it over the network.

use async_trait::async_trait;
use berth_api::{
    ImageRef, Machine, MachineConfig, StartStopResponse, StopRequest, UpdateMachineRequest,
    UsageRecord,
};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Who asked for a state change. Recorded with every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    User,
    RestartPolicy,
    System,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::User => "user",
            EventSource::RestartPolicy => "restart_policy",
            EventSource::System => "system",
        }
    }
}

/// A create that the control plane has validated and placed on this worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateOnWorker {
    pub id: String,
    pub app: String,
    pub name: String,
    pub config: MachineConfig,
    pub skip_launch: bool,
}

/// One Machine's hold on images: what garbage collection must keep and what
/// `GET /v1/images` reports as "machines using it".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUsage {
    pub machine_id: String,
    pub app: String,
    pub image: ImageRef,
    /// Layer blob digests of the Machine's rootfs, bottom first.
    pub layers: Vec<String>,
}

#[async_trait]
pub trait WorkerService: Send + Sync + 'static {
    async fn create(&self, request: CreateOnWorker) -> Result<Machine>;
    async fn start(&self, id: &str, source: EventSource) -> Result<StartStopResponse>;
    async fn stop(&self, id: &str, request: StopRequest) -> Result<StartStopResponse>;
    async fn update(&self, id: &str, request: UpdateMachineRequest) -> Result<Machine>;
    async fn destroy(&self, id: &str, force: bool) -> Result<()>;
    async fn get(&self, id: &str) -> Result<Machine>;
    async fn list(&self, app: &str) -> Result<Vec<Machine>>;
    /// The usage journal after `after_seq`, oldest first, at most `limit` entries. The
    /// caller acknowledges by asking for what follows; nothing is lost if it asks again.
    async fn usage_since(&self, after_seq: u64, limit: u32) -> Result<Vec<UsageRecord>>;
    /// The tail of the Machine's captured stdout and stderr.
    async fn logs(&self, id: &str, max_bytes: u64) -> Result<Vec<u8>>;
    /// Every image every Machine on this worker holds (running or stopped, plus the image
    /// an unfinished update would roll back to).
    async fn image_usage(&self) -> Result<Vec<ImageUsage>>;
}
