//! The one interface through which Machines on a worker are reached. The HTTP API, the
//! CLI (through the API) and later the proxy's autostart all come through here; a remote
//! worker will implement it over the network.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use berth_api::EventSource;
use berth_api::{
    Checkpoint, CreateVolumeRequest, EventKind, ExecResponse, ImageRef, Machine, MachineConfig,
    MachineEvent, MachineState, MachineVersion, ProcessStat, RestoreCheckpointResponse,
    StartStopResponse, StopRequest, UpdateMachineRequest, UpdateVolumeRequest, UsageRecord, Volume,
    VolumeSnapshot,
};
use berth_image::PullScope;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A state change as the worker recorded it, told to the listener right after the record
/// is durable and in the order the changes happened on each Machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineNotice {
    pub id: String,
    pub app: String,
    /// The event's id in the Machine's history; `None` for destroy, which removes it.
    pub event_id: Option<i64>,
    pub kind: EventKind,
    pub source: EventSource,
    pub state: MachineState,
    pub instance_id: String,
    pub cpus: u32,
    pub memory_mb: u32,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub at_ms: i64,
}

/// The state of every Machine on a worker at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeSnapshot {
    /// The newest event id the snapshot reflects; live notices at or below it are older
    /// than the snapshot and are skipped.
    pub last_event_id: i64,
    pub machines: Vec<MachineNotice>,
}

/// Hears every state change of a worker's Machines. Called inline, so it must be quick
/// and must not call back into the worker.
pub trait WorkerListener: Send + Sync + 'static {
    fn on_event(&self, notice: &MachineNotice);
}

/// A command to run inside a started Machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOnWorker {
    pub cmd: Vec<String>,
    pub stdin: Option<String>,
    pub timeout: Duration,
    /// Cap on stdout and on stderr, each.
    pub max_output_bytes: usize,
}

/// Bytes `start..start + data.len()` of a Machine's whole output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub start: u64,
    pub data: Vec<u8>,
}

/// A create that the control plane has validated and placed on this worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateOnWorker {
    pub id: String,
    pub app: String,
    pub name: String,
    pub config: MachineConfig,
    pub skip_launch: bool,
    /// The org of the Machine's app: on the worker network, a Machine reaches only the
    /// Machines of its own org. Absent from an older control plane: the default group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// Who the image is pulled for: an org token's registry limits and storage quota.
    /// Absent (an older control plane): the operator's, unrestricted.
    #[serde(default)]
    pub pull: PullScope,
    /// The new Machine's disk is a writable snapshot of this checkpoint of another
    /// Machine on this worker (`machine`, `checkpoint`) instead of an empty one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_checkpoint: Option<(String, String)>,
}

/// A volume create that the control plane has validated and placed on this worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateVolumeOnWorker {
    pub id: String,
    pub app: String,
    pub request: CreateVolumeRequest,
}

/// An update as the control plane forwards it, with the pull scope of its caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateOnWorker {
    pub request: UpdateMachineRequest,
    #[serde(default)]
    pub pull: PullScope,
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
    /// The unpacked size of each of `layers` on this worker (0 when unknown).
    #[serde(default)]
    pub layer_bytes: Vec<u64>,
}

#[async_trait]
pub trait WorkerService: Send + Sync + 'static {
    async fn create(&self, request: CreateOnWorker) -> Result<Machine>;
    async fn start(&self, id: &str, source: EventSource) -> Result<StartStopResponse>;
    async fn stop(&self, id: &str, request: StopRequest) -> Result<StartStopResponse>;
    /// Checkpoints the started Machine with its memory into its disk directory and ends
    /// its run (`suspended`); its next start resumes it. A driver that cannot is 422
    /// `suspend_unsupported`.
    async fn suspend(&self, id: &str, source: EventSource) -> Result<StartStopResponse>;
    /// Sends a signal (a name such as `SIGUSR1`) to the started Machine's command; a
    /// Machine that is not started is refused.
    async fn signal(&self, id: &str, signal: &str) -> Result<()>;
    /// Updates the Machine; a new image is pulled within `pull`.
    async fn update(
        &self,
        id: &str,
        request: UpdateMachineRequest,
        pull: PullScope,
    ) -> Result<Machine>;
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
    /// Registers the one listener that hears about every recorded state change.
    fn set_listener(&self, listener: Arc<dyn WorkerListener>);
    /// Every Machine's state now, as notices, for a listener in another process that
    /// (re)connects: it applies these, then the live notices that follow the snapshot.
    async fn notice_snapshot(&self) -> Result<NoticeSnapshot>;
    /// The Machine's recorded events with an id above `since`, oldest first.
    async fn machine_events(&self, id: &str, since: i64, limit: u32) -> Result<Vec<MachineEvent>>;
    /// Runs a command inside the started Machine.
    async fn exec(&self, id: &str, request: ExecOnWorker) -> Result<ExecResponse>;
    /// Cordons (`true`) or uncordons the Machine: a cordoned Machine gets no proxy
    /// traffic and is never autostarted. Recorded (with an event) until changed again.
    async fn cordon(&self, id: &str, cordoned: bool) -> Result<Machine>;
    /// The started Machine's processes, from its pid namespace; a Machine that is not
    /// started is refused (`invalid_state`).
    async fn processes(&self, id: &str) -> Result<Vec<ProcessStat>>;
    /// The Machine's config history, one entry per create and update, newest first.
    async fn versions(&self, id: &str) -> Result<Vec<MachineVersion>>;
    /// Sets (`Some`) or removes (`None`) one metadata key without touching the run.
    async fn set_metadata(&self, id: &str, key: &str, value: Option<String>) -> Result<Machine>;
    /// The Machine's output from position `since` (or the last `max_bytes` when `None`);
    /// with `follow`, keeps sending new output, across stops and starts, until the
    /// receiver is dropped or the Machine is destroyed.
    async fn read_logs(
        &self,
        id: &str,
        since: Option<u64>,
        follow: bool,
        max_bytes: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<LogChunk>>;
    /// Compares the worker's records with its host; with `repair`, removes orphans and
    /// records Machines found dead as stopped.
    async fn doctor(&self, repair: bool) -> Result<berth_api::DoctorReport>;

    /// Makes a volume (a copy of one of this worker's snapshots with `snapshot_id`). A
    /// repeated create of the same id answers the volume it made.
    async fn volume_create(&self, request: CreateVolumeOnWorker) -> Result<Volume>;
    async fn volume_get(&self, id: &str) -> Result<Volume>;
    /// The app's volumes on this worker.
    async fn volume_list(&self, app: &str) -> Result<Vec<Volume>>;
    async fn volume_update(&self, id: &str, request: UpdateVolumeRequest) -> Result<Volume>;
    /// Grows the volume to `size_gb`, online.
    async fn volume_extend(&self, id: &str, size_gb: u32) -> Result<Volume>;
    /// Deletes a volume no Machine holds (refused with `volume_attached` otherwise); the
    /// answer is its last state, `destroyed`.
    async fn volume_delete(&self, id: &str) -> Result<Volume>;
    async fn volume_snapshots(&self, id: &str) -> Result<Vec<VolumeSnapshot>>;
    /// Takes a snapshot of the volume now.
    async fn volume_snapshot(&self, id: &str) -> Result<VolumeSnapshot>;

    /// Takes a checkpoint of the Machine's disk (a running Machine is frozen for the
    /// instant it takes). A disk that cannot be snapshotted is 422
    /// `checkpoints_unsupported`.
    async fn checkpoint_create(&self, id: &str, comment: String) -> Result<Checkpoint>;
    /// The Machine's checkpoints, oldest first.
    async fn checkpoint_list(&self, id: &str) -> Result<Vec<Checkpoint>>;
    async fn checkpoint_delete(&self, id: &str, checkpoint: &str) -> Result<()>;
    /// Makes the Machine's files those of the checkpoint, after an automatic checkpoint of
    /// the files it had; a running Machine is restarted onto them.
    async fn checkpoint_restore(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> Result<RestoreCheckpointResponse>;

    /// Runs one step of moving a Machine to or from this worker.
    async fn migration(&self, step: MigrationStep) -> Result<MigrationAnswer>;
    /// One pass over a leaving Machine's files, for the destination named by its grant.
    async fn migration_stream(&self, id: &str, request: StreamRequest) -> Result<MigrationStream>;
}

/// The bytes of one pass over a Machine's writable layer, from the source worker.
pub type MigrationStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>;

/// Where the destination fetches a Machine's files from: the source worker, by name (an
/// in-process peer) or by its agent URL, with the migration's grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPeer {
    pub worker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// What the destination needs to make the Machine: the source's export (opaque here,
/// the agents' own record shape), the pinned image, and where to fetch the files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateIn {
    pub id: String,
    pub grant: String,
    pub source: MigrationPeer,
    pub export: serde_json::Value,
    #[serde(default)]
    pub pull: PullScope,
}

/// One step of moving a Machine between workers. The control plane runs them in order
/// (begin, receive, [halt, sync], cutover in its own store, commit, finish) and sends
/// `abort` to both sides to roll back anything before the cutover. Every step is
/// idempotent, so a step cut off by a crash is simply sent again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum MigrationStep {
    /// Source: marks the Machine as leaving (no start, stop or update meanwhile) and
    /// answers its export.
    Begin {
        id: String,
        grant: String,
        to_worker: String,
    },
    /// Destination: pulls the image, lays the Machine out (new address) and copies its
    /// files, its volumes' images and their snapshots in a first pass. The Machine and
    /// its volumes are not listed here until commit.
    Receive(Box<MigrateIn>),
    /// Source: stops a running Machine for the final pass (it stays the source's until
    /// the cutover, and abort starts it again). Its volumes are unmounted by the pass
    /// that reads them.
    Halt { id: String, grant: String },
    /// Destination: copies what changed since the last pass (files, and the chunks of
    /// each volume image whose hash changed).
    Sync { id: String, grant: String },
    /// Destination: after the cutover, the Machine and its volumes are this worker's
    /// (volumes mounted first); started if `start`.
    Commit {
        id: String,
        grant: String,
        start: bool,
        from_address: Option<String>,
        /// The control plane's cutover instant: billing here starts then.
        cutover_ms: i64,
    },
    /// Source: after the cutover, removes the Machine's volumes, files, network and
    /// record here; their billing here ends at `cutover_ms`.
    Finish {
        id: String,
        grant: String,
        cutover_ms: i64,
    },
    /// Either side, before the cutover: undoes this worker's part.
    Abort { id: String, grant: String },
    /// Removes a copy of a Machine that lives on another worker now (this worker was
    /// unreachable when it moved or was recreated): its billing here ends.
    Forget { id: String },
    /// Makes a Machine again from its image, stopped, because the worker that held it is
    /// gone for good: a create with a `recreate` event naming the lost worker.
    Recreate {
        request: Box<CreateOnWorker>,
        lost_worker: String,
    },
}

impl MigrationStep {
    pub fn machine_id(&self) -> &str {
        match self {
            MigrationStep::Receive(request) => &request.id,
            MigrationStep::Recreate { request, .. } => &request.id,
            MigrationStep::Begin { id, .. }
            | MigrationStep::Halt { id, .. }
            | MigrationStep::Sync { id, .. }
            | MigrationStep::Commit { id, .. }
            | MigrationStep::Finish { id, .. }
            | MigrationStep::Abort { id, .. }
            | MigrationStep::Forget { id } => id,
        }
    }
}

/// A step's answer; fields a step does not produce are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
    /// Begin: the agents' record of the Machine, passed on to the destination as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<serde_json::Value>,
    /// Begin: whether the Machine was running.
    #[serde(default)]
    pub running: bool,
    /// Receive and sync: the pass's size.
    #[serde(default)]
    pub entries: u64,
    #[serde(default)]
    pub file_bytes: u64,
    #[serde(default)]
    pub stream_bytes: u64,
    /// Halt: when the Machine stopped (ms since the epoch); commit: when it ran again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<i64>,
}

/// Which pass the destination asks the source for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRequest {
    pub grant: String,
    /// Host id of the Machine's root on the destination.
    pub to_base: u32,
    /// The digest of the last pass the destination applied whole: the source sends what
    /// changed since that pass began. Absent, or a pass the source no longer knows (it
    /// restarted): everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_pass: Option<String>,
    /// A pass over this volume's image (one the Machine mounts) instead of its writable
    /// layer; `after_pass` then names the last image pass of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// With `volume`: the image of this snapshot of it, always whole (a snapshot never
    /// changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}
