//! `GET /v1/workers/{name}/doctor`: how a worker's records and its host disagree.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What kind of disagreement a finding is. Stable names: scripts match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A Machine record without its upperdir.
    MissingUpperdir,
    /// A Machine record without its bundle's `config.json`.
    MissingBundle,
    /// A Machine record without a pinned network namespace.
    MissingNetns,
    /// A layer a Machine's rootfs stack names is not in the layer store.
    MissingLayer,
    /// Recorded `started`, but its init process is not alive.
    StartedNotRunning,
    /// Recorded as not running, but its init process is alive.
    StoppedButRunning,
    /// Recorded as not running, but its rootfs is still mounted.
    StrayMount,
    /// Recorded as not running, but runc still has its container.
    StrayContainer,
    /// Recorded as not running, but its cgroup is still there.
    StrayCgroup,
    /// A Machine directory (upperdir, bundle, netns) with no record.
    OrphanMachineDir,
    /// An overlay or netns mount under the worker's Machines with no record.
    OrphanMount,
    /// A runc container with no record.
    OrphanContainer,
    /// A Machine veth with no record.
    OrphanVeth,
    /// A Machine cgroup with no record.
    OrphanCgroup,
    /// A volume directory (image, mount) with no record.
    OrphanVolume,
    /// A volume whose filesystem is not mounted on the worker.
    VolumeNotMounted,
    /// A record left in the middle of an operation that nothing is running.
    UnfinishedOperation,
    /// A memory image (whole or half-written) of a Machine that is not suspended: stale,
    /// never to be resumed.
    OrphanMemoryImage,
    /// A suspended Machine without a sealed memory image: its next start boots it fresh
    /// from its disk.
    MissingMemoryImage,
    /// A checkpoint snapshot without its record, a record without its snapshot, or a
    /// restore's or fork's leftover `disk.swap`: what a crash left of a checkpoint
    /// operation.
    HalfMadeCheckpoint,
    /// The usage journal skips sequence numbers.
    JournalGap,
    /// The usage journal repeats an entry (a run opened or closed twice, a Machine
    /// created or destroyed twice).
    JournalDuplicate,
    /// A run that ended has no closing record, or the record and the journal disagree on
    /// whether a run is open.
    JournalUnclosedRun,
}

/// One difference between the records and the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DoctorFinding {
    pub kind: FindingKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// The host object concerned (a path, a link name, a cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    pub message: String,
    /// Set when `repair` fixed it.
    #[serde(default)]
    pub repaired: bool,
}

/// One worker's check. `findings` empty means the records and the host agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DoctorReport {
    pub worker: String,
    /// Machine records checked.
    pub machines: u64,
    /// Machines busy with an operation during the check, so not checked.
    #[serde(default)]
    pub busy: Vec<String>,
    pub findings: Vec<DoctorFinding>,
    /// Whether this was a repair run.
    #[serde(default)]
    pub repair: bool,
}

impl DoctorReport {
    /// Findings that are still there (a repair run fixes some of them).
    pub fn unresolved(&self) -> impl Iterator<Item = &DoctorFinding> {
        self.findings.iter().filter(|finding| !finding.repaired)
    }
}
