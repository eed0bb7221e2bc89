//! Volumes, in the shapes of Fly's `/v1/apps/{app}/volumes` API: a filesystem of a fixed
//! size on one worker, attached to at most one Machine at a time through
//! `config.mounts`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Fly's default size when a create names none, in GB (GiB here).
pub const DEFAULT_VOLUME_SIZE_GB: u32 = 3;

/// One volume, as Fly's `Volume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub id: String,
    pub name: String,
    /// `created`; `destroyed` in the answer of a delete.
    pub state: String,
    /// Size in GB (GiB: 2^30 bytes each), as the filesystem enforces it.
    pub size_gb: u32,
    pub region: String,
    /// Fly's hardware zone: the volume's worker here.
    pub zone: String,
    /// Whether the volume's data is encrypted on the worker's disk (ext4 encryption with a
    /// key per volume); Fly's default.
    pub encrypted: bool,
    /// The Machine the volume is attached to, if any.
    pub attached_machine_id: Option<String>,
    /// Fly's Nomad allocation: always null.
    pub attached_alloc_id: Option<String>,
    pub created_at: String,
    /// Fly's dedicated hosts: always empty.
    #[serde(default)]
    pub host_dedication_id: String,
    /// Days snapshots are kept (default 5, as on Fly); the worker removes older ones
    /// within an hour of their expiry, and all of them with the volume.
    pub snapshot_retention: u32,
    /// Daily snapshots: recorded, not taken (see the compatibility table).
    pub auto_backup_enabled: bool,
    /// `ext4`.
    pub fstype: String,
    /// The filesystem's block size and counts, as `statfs` reports them.
    pub block_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    /// `ok`, or `unreachable` when the worker is down and this is the last known state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_status: Option<String>,
}

/// `POST /v1/apps/{app}/volumes`, Fly's `CreateVolumeRequest`. `fstype: raw` is refused
/// with 422 naming the field; hints about placement (`require_unique_zone`, `compute`, `compute_image`) are
/// accepted and ignored.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateVolumeRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Size in GB (GiB); default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u32>,
    /// Absent or true: the volume is encrypted (Fly's default); false: it is not. A
    /// restore is encrypted as its snapshot's volume was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_unique_zone: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_backup_enabled: Option<bool>,
    /// `ext4` (the default); `raw` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// Restore: the new volume starts as a copy of this snapshot, on its worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Fly's fork: the new volume starts as a copy of this volume's data at one instant,
    /// on its worker, at least its size, encrypted with its key when it is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_id: Option<String>,
    /// Fly's placement hint for the Machine to come: ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub compute: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_image: Option<String>,
}

/// `PUT /v1/apps/{app}/volumes/{id}`, Fly's `UpdateVolumeRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateVolumeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_backup_enabled: Option<bool>,
}

/// `PUT /v1/apps/{app}/volumes/{id}/extend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtendVolumeRequest {
    /// The new size in GB (GiB); must be larger than the current one.
    pub size_gb: u32,
}

/// The answer of extend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtendVolumeResponse {
    pub volume: Volume,
    /// Always false: the filesystem grows while mounted, under a running Machine too.
    pub needs_restart: bool,
}

/// One snapshot of a volume, as Fly's `VolumeSnapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSnapshot {
    pub id: String,
    /// Bytes of data in the snapshot (holes of the image not counted).
    pub size: u64,
    /// `sha256:<hex>` of the snapshot image.
    pub digest: String,
    pub created_at: String,
    /// `created`.
    pub status: String,
    pub retention_days: Option<u32>,
}

/// One entry of `config.mounts`, Fly's `MachineMount`: the volume and where it appears in
/// the Machine. Fly's auto-extend fields are kept and not acted on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct MachineMount {
    /// The volume's id (`vol_…`).
    pub volume: String,
    /// An absolute path inside the Machine.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether the volume is encrypted: set from the volume, whatever the client sends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extend_threshold_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_size_gb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb_limit: Option<u32>,
}
