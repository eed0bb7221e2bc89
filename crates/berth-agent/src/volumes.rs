//! Volumes on this worker: the record (the source of truth, like a Machine's), its
//! operations, and attaching one to a Machine.
//!
//! Each operation writes its intent before touching the host (`pending`), so an agent
//! killed halfway finishes or undoes it at its next start ([`Agent::recover_volumes`]):
//! a create is removed, an extend is finished, a delete is finished. A volume is
//! attached to at most one Machine: the claim is made under the volume's lock, and the
//! Machine's create or destroy is what makes and ends it.

use std::path::PathBuf;

use berth_api::MachineState;
use berth_api::{
    CreateVolumeRequest, ErrorBody, MachineMount, UpdateVolumeRequest, Volume, VolumeSnapshot,
    DEFAULT_VOLUME_SIZE_GB,
};
use berth_runtime::volume::{VolumeKey, VolumeLayout, VolumeMount};
use berth_runtime::RuntimeError;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{AgentError, Result};
use crate::failpoint;
use crate::metering;
use crate::record::{format_ms, now_ms};
use crate::service::CreateVolumeOnWorker;
use crate::Agent;

pub(crate) const GIB: u64 = 1 << 30;
/// The largest volume Fly makes, in GB.
pub const MAX_VOLUME_SIZE_GB: u32 = 500;

/// An operation on the volume that has not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumePending {
    Create,
    Extend,
    Delete,
    /// Arriving with a moving Machine: an image being copied, never mounted; commit
    /// mounts it, abort removes it.
    MigrateIn,
    /// Leaving with its Machine: unmounted for the last pass, removed at finish, mounted
    /// again at abort.
    MigrateOut,
}

impl VolumePending {
    pub fn is_migration(self) -> bool {
        matches!(self, VolumePending::MigrateIn | VolumePending::MigrateOut)
    }
}

/// A volume as the agent records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub app: String,
    pub name: String,
    pub region: String,
    pub size_gb: u32,
    pub created_at_ms: i64,
    pub snapshot_retention: u32,
    pub auto_backup_enabled: bool,
    /// The Machine that holds the volume.
    pub attached_machine: Option<String>,
    pub pending: Option<VolumePending>,
    /// Arriving: the digest of the last image pass applied whole, which the next pass
    /// starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_pass: Option<String>,
    /// An encrypted volume's key (none: not encrypted). Kept here, in the agent's store,
    /// not beside the image; sent only to the worker the volume moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<VolumeKey>,
    /// Moving on its own (no Machine holds it, as in a drain): the move's grant, which
    /// its Machine's record holds otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_grant: Option<String>,
}

/// A snapshot as the agent records it; its image is `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub volume_id: String,
    pub size: u64,
    pub digest: String,
    pub created_at_ms: i64,
    pub path: PathBuf,
}

impl SnapshotRecord {
    fn to_api(&self, retention_days: u32) -> VolumeSnapshot {
        VolumeSnapshot {
            id: self.id.clone(),
            size: self.size,
            digest: self.digest.clone(),
            created_at: format_ms(self.created_at_ms),
            status: "created".into(),
            retention_days: Some(retention_days),
        }
    }
}

/// A refusal of a volume operation, with its stable code.
pub(crate) fn refuse(status: u16, code: &str, message: String, field: Option<&str>) -> AgentError {
    AgentError::Remote {
        status,
        body: Box::new(ErrorBody {
            error: code.into(),
            message,
            field: field.map(Into::into),
            ..ErrorBody::default()
        }),
    }
}

pub(crate) fn not_found(id: &str) -> AgentError {
    refuse(
        404,
        "volume_not_found",
        format!("volume {id} not found"),
        None,
    )
}

/// Refuses an operation on a volume that is moving with its Machine.
pub(crate) fn refuse_if_moving(record: &VolumeRecord) -> Result<()> {
    if record.pending.is_some_and(VolumePending::is_migration) {
        let mut error = refuse(
            409,
            "machine_migrating",
            match &record.attached_machine {
                Some(machine) => format!(
                    "volume {} is moving between workers with machine {machine}; retry once the move ends",
                    record.id
                ),
                None => format!(
                    "volume {} is moving between workers; retry once the move ends",
                    record.id
                ),
            },
            None,
        );
        if let AgentError::Remote { body, .. } = &mut error {
            body.retry_after_ms = Some(1000);
        }
        return Err(error);
    }
    Ok(())
}

pub(crate) fn attached(id: &str, machine: &str) -> AgentError {
    refuse(
        409,
        "volume_attached",
        format!("volume {id} is attached to machine {machine}; destroy that machine first"),
        None,
    )
}

impl Agent {
    pub fn volumes_root(&self) -> PathBuf {
        self.inner.config.data_dir.join("volumes")
    }

    pub fn volume_layout(&self, id: &str) -> VolumeLayout {
        VolumeLayout::new(&self.volumes_root(), id)
    }

    /// The volume's layout with its key: for every step that mounts it.
    pub(crate) fn keyed_layout(&self, record: &VolumeRecord) -> VolumeLayout {
        self.volume_layout(&record.id).with_key(record.key.clone())
    }

    pub(crate) fn snapshots_dir(&self, id: &str) -> PathBuf {
        self.volume_layout(id).dir.join("snapshots")
    }

    async fn load_volume(&self, id: &str) -> Result<VolumeRecord> {
        self.inner
            .store
            .volume(id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    /// The volume's JSON, with the filesystem's own counts.
    async fn volume_json(&self, record: &VolumeRecord, state: &str) -> Result<Volume> {
        let stats = if state == "destroyed" {
            Default::default()
        } else {
            self.host_driver()
                .volume_stats(&self.volume_layout(&record.id))
                .await
                .unwrap_or_default()
        };
        Ok(Volume {
            id: record.id.clone(),
            name: record.name.clone(),
            state: state.into(),
            size_gb: record.size_gb,
            region: record.region.clone(),
            zone: self.inner.config.name.clone(),
            encrypted: record.key.is_some(),
            attached_machine_id: record.attached_machine.clone(),
            attached_alloc_id: None,
            created_at: format_ms(record.created_at_ms),
            host_dedication_id: String::new(),
            snapshot_retention: record.snapshot_retention,
            auto_backup_enabled: record.auto_backup_enabled,
            fstype: "ext4".into(),
            block_size: stats.block_size,
            blocks: stats.blocks,
            blocks_free: stats.blocks_free,
            blocks_avail: stats.blocks_avail,
            host_status: Some("ok".into()),
        })
    }

    pub(crate) async fn volume_create_op(&self, request: CreateVolumeOnWorker) -> Result<Volume> {
        let CreateVolumeOnWorker { id, app, request } = request;
        let mut size_gb = check_create(&request)?;
        // Fly encrypts a volume unless told not to.
        let encrypted = request.encrypted.unwrap_or(true);
        let _guard = self.lock(&id).await?;
        if let Some(existing) = self.inner.store.volume(&id).await? {
            if existing.app == app && existing.name == request.name && existing.pending.is_none() {
                return self.volume_json(&existing, "created").await;
            }
            return Err(AgentError::Internal(format!(
                "volume id {id} is already taken"
            )));
        }
        // A fork copies its source under the source's lock, so no extend, snapshot or move
        // of the source runs meanwhile.
        let (source, _source_guard) = match &request.source_volume_id {
            Some(source) => {
                let guard = self.lock(source).await?;
                let record = self.fork_source(source, &app).await?;
                // At least the source's size: its filesystem fills it.
                size_gb = match request.size_gb {
                    Some(asked) => asked.max(record.size_gb),
                    None => record.size_gb,
                };
                (Some(record), Some(guard))
            }
            None => (None, None),
        };
        // A restore or a fork is a copy of an image encrypted with its volume's key, which
        // it keeps (a new key would mean encrypting every block again).
        let (from, key) = match &request.snapshot_id {
            _ if source.is_some() => (None, source.as_ref().and_then(|s| s.key.clone())),
            Some(snapshot) => {
                let record = self.inner.store.snapshot(snapshot).await?.ok_or_else(|| {
                    refuse(
                        404,
                        "snapshot_not_found",
                        format!("snapshot {snapshot} not found on this worker"),
                        Some("snapshot_id"),
                    )
                })?;
                let source = self.load_volume(&record.volume_id).await?;
                (Some(record.path), source.key)
            }
            None if encrypted => (
                None,
                Some(VolumeKey::generate().map_err(|error| {
                    AgentError::Internal(format!("make a volume key: {error}"))
                })?),
            ),
            None => (None, None),
        };
        let mut record = VolumeRecord {
            id: id.clone(),
            app,
            name: request.name.clone(),
            region: self.inner.config.region.clone(),
            size_gb,
            created_at_ms: now_ms(),
            snapshot_retention: request.snapshot_retention.unwrap_or(5),
            auto_backup_enabled: request.auto_backup_enabled.unwrap_or(false),
            attached_machine: None,
            pending: Some(VolumePending::Create),
            copied_pass: None,
            key,
            move_grant: None,
        };
        self.inner.store.save_volume(&record).await?;
        failpoint::hit("volume_create.after_record");
        let layout = self.keyed_layout(&record);
        let made = match &source {
            Some(source) => {
                self.host_driver()
                    .volume_fork(
                        &self.keyed_layout(source),
                        &layout,
                        u64::from(size_gb) * GIB,
                    )
                    .await
            }
            None => {
                self.host_driver()
                    .volume_create(&layout, u64::from(size_gb) * GIB, from)
                    .await
            }
        };
        if let Err(error) = made {
            // The runtime removed what it made; the record goes too.
            self.inner.store.delete_volume(&id).await?;
            return Err(error.into());
        }
        failpoint::hit("volume_create.after_host");
        record.pending = None;
        // Billing starts in the same transaction that makes the volume exist.
        let usage = metering::volume_created(&record, now_ms());
        self.inner
            .store
            .save_volume_with_usage(&record, &[usage])
            .await?;
        info!(volume = %id, size_gb, "volume created");
        self.volume_json(&record, "created").await
    }

    /// The volume a fork copies: the app's, settled, and not moving.
    async fn fork_source(&self, id: &str, app: &str) -> Result<VolumeRecord> {
        let record = self.inner.store.volume(id).await?;
        let Some(record) = record.filter(|record| {
            record.app == app
                && !matches!(
                    record.pending,
                    Some(VolumePending::Create | VolumePending::Delete | VolumePending::MigrateIn)
                )
        }) else {
            return Err(refuse(
                404,
                "volume_not_found",
                format!("volume {id} not found in app {app} on this worker"),
                Some("source_volume_id"),
            ));
        };
        refuse_if_moving(&record)?;
        Ok(record)
    }

    pub(crate) async fn volume_get_op(&self, id: &str) -> Result<Volume> {
        let record = self.load_volume(id).await?;
        if record.pending == Some(VolumePending::MigrateIn) {
            return Err(not_found(id));
        }
        self.volume_json(&record, state_of(&record)).await
    }

    pub(crate) async fn volume_list_op(&self, app: &str) -> Result<Vec<Volume>> {
        let mut out = Vec::new();
        for record in self.inner.store.volumes_of(Some(app)).await? {
            // An arriving copy is the source's volume until the cutover.
            if record.pending == Some(VolumePending::MigrateIn) {
                continue;
            }
            out.push(self.volume_json(&record, state_of(&record)).await?);
        }
        Ok(out)
    }

    pub(crate) async fn volume_update_op(
        &self,
        id: &str,
        request: UpdateVolumeRequest,
    ) -> Result<Volume> {
        let _guard = self.lock(id).await?;
        let mut record = self.load_volume(id).await?;
        refuse_if_moving(&record)?;
        if let Some(days) = request.snapshot_retention {
            record.snapshot_retention = days;
        }
        if let Some(enabled) = request.auto_backup_enabled {
            record.auto_backup_enabled = enabled;
        }
        self.inner.store.save_volume(&record).await?;
        self.volume_json(&record, state_of(&record)).await
    }

    pub(crate) async fn volume_extend_op(&self, id: &str, size_gb: u32) -> Result<Volume> {
        let _guard = self.lock(id).await?;
        let mut record = self.load_volume(id).await?;
        refuse_if_moving(&record)?;
        if size_gb <= record.size_gb || size_gb > MAX_VOLUME_SIZE_GB {
            return Err(refuse(
                400,
                "invalid_config",
                format!(
                    "size_gb must be more than the volume's {} and at most {MAX_VOLUME_SIZE_GB}",
                    record.size_gb
                ),
                Some("size_gb"),
            ));
        }
        // Unmounting to grow is only safe with no Machine running on it.
        let offline_ok = match &record.attached_machine {
            Some(machine) => match self.inner.store.get(machine).await? {
                Some(holder) => !matches!(
                    holder.state,
                    MachineState::Starting | MachineState::Started | MachineState::Stopping
                ),
                None => true,
            },
            None => true,
        };
        // The new size first: a crash before the host is done is finished by recovery,
        // and growing is repeatable.
        let old_size = record.size_gb;
        record.size_gb = size_gb;
        record.pending = Some(VolumePending::Extend);
        self.inner.store.save_volume(&record).await?;
        failpoint::hit("volume_extend.after_record");
        if let Err(error) = self.finish_extend(&mut record, offline_ok).await {
            let in_use = matches!(
                &error,
                AgentError::Runtime(RuntimeError::Io { error, .. })
                    if error.kind() == std::io::ErrorKind::PermissionDenied
            );
            if !in_use {
                return Err(error);
            }
            // Nothing changed but the image's length: the volume keeps its size.
            record.size_gb = old_size;
            record.pending = None;
            self.inner.store.save_volume(&record).await?;
            return Err(refuse(
                409,
                "volume_in_use",
                format!(
                    "{error}; stop machine {} and extend again",
                    record.attached_machine.as_deref().unwrap_or("?")
                ),
                None,
            ));
        }
        self.volume_json(&record, "created").await
    }

    async fn finish_extend(&self, record: &mut VolumeRecord, offline_ok: bool) -> Result<()> {
        self.host_driver()
            .volume_extend(
                &self.keyed_layout(record),
                u64::from(record.size_gb) * GIB,
                offline_ok,
            )
            .await?;
        failpoint::hit("volume_extend.after_host");
        record.pending = None;
        // The new size is billed from the write that ends the extend (here or in
        // recovery), so it is journaled once.
        let usage = metering::volume_extended(record, now_ms());
        self.inner
            .store
            .save_volume_with_usage(record, &[usage])
            .await
    }

    pub(crate) async fn volume_delete_op(&self, id: &str) -> Result<Volume> {
        let _guard = self.lock(id).await?;
        let mut record = self.load_volume(id).await?;
        if let Some(machine) = &record.attached_machine {
            return Err(attached(id, machine));
        }
        refuse_if_moving(&record)?;
        record.pending = Some(VolumePending::Delete);
        self.inner.store.save_volume(&record).await?;
        failpoint::hit("volume_delete.after_record");
        self.finish_delete(&record).await?;
        info!(volume = %id, "volume deleted");
        record.pending = None;
        self.volume_json(&record, "destroyed").await
    }

    async fn finish_delete(&self, record: &VolumeRecord) -> Result<()> {
        self.host_driver()
            .volume_remove(&self.volume_layout(&record.id))
            .await?;
        failpoint::hit("volume_delete.after_host");
        let usage = metering::volume_deleted(record, now_ms());
        self.inner
            .store
            .delete_volume_with_usage(&record.id, &[usage])
            .await
    }

    pub(crate) async fn volume_snapshots_op(&self, id: &str) -> Result<Vec<VolumeSnapshot>> {
        let record = self.load_volume(id).await?;
        Ok(self
            .inner
            .store
            .snapshots_of(id)
            .await?
            .iter()
            .map(|snapshot| snapshot.to_api(record.snapshot_retention))
            .collect())
    }

    pub(crate) async fn volume_snapshot_op(&self, id: &str) -> Result<VolumeSnapshot> {
        let _guard = self.lock(id).await?;
        let record = self.load_volume(id).await?;
        refuse_if_moving(&record)?;
        let snapshot_id = berth_core::ids::new_snapshot_id();
        let dir = self.snapshots_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Internal(format!("create {}: {e}", dir.display())))?;
        // Written under a temporary name and renamed once recorded, so a crash leaves
        // only a `.tmp` file, which recovery removes.
        let tmp = dir.join(format!("{snapshot_id}.tmp"));
        let path = dir.join(format!("{snapshot_id}.img"));
        let image = self
            .host_driver()
            .volume_snapshot(&self.volume_layout(id), tmp.clone())
            .await?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| AgentError::Internal(format!("rename {}: {e}", tmp.display())))?;
        let snapshot = SnapshotRecord {
            id: snapshot_id,
            volume_id: id.to_owned(),
            size: image.bytes,
            digest: image.digest,
            created_at_ms: now_ms(),
            path,
        };
        if let Err(error) = self.inner.store.save_snapshot(&snapshot).await {
            let _ = std::fs::remove_file(&snapshot.path);
            return Err(error);
        }
        Ok(snapshot.to_api(record.snapshot_retention))
    }

    /// Removes the snapshots older than their volume's `snapshot_retention` days at
    /// `now_ms` (the clock is the caller's: a periodic sweep passes the time, tests any
    /// time), image first, then record, so a crash between the two leaves a record whose
    /// missing image the next sweep forgets. A volume in the middle of an operation waits
    /// for the next sweep. Answers the snapshots removed.
    pub async fn sweep_snapshots(&self, now_ms: i64) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for volume in self.inner.store.volumes_of(None).await? {
            if volume.pending.is_some() {
                continue;
            }
            let _guard = self.lock(&volume.id).await?;
            let snapshots = self.inner.store.snapshots_of(&volume.id).await?;
            for snapshot in expired(&snapshots, volume.snapshot_retention, now_ms) {
                match std::fs::remove_file(&snapshot.path) {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        warn!(snapshot = %snapshot.id, %error, "removing an expired snapshot");
                        continue;
                    }
                    _ => {}
                }
                self.inner.store.delete_snapshot(&snapshot.id).await?;
                info!(volume = %volume.id, snapshot = %snapshot.id, "snapshot past its retention removed");
                removed.push(snapshot.id.clone());
            }
        }
        Ok(removed)
    }

    /// Claims the Machine's volumes for it (create): each must exist, belong to the app and
    /// be free (or already its own, for a retried create). Sets each mount's `encrypted`
    /// to the volume's; answers what the bundle mounts.
    pub(crate) async fn attach_volumes(
        &self,
        machine: &str,
        app: &str,
        mounts: &mut [MachineMount],
    ) -> Result<Vec<VolumeMount>> {
        self.claim_volumes(machine, app, mounts).await?;
        Ok(self.volume_mounts(mounts))
    }

    /// Claims each mount's volume for the Machine (create, and an update's new mounts)
    /// and sets the mount's `encrypted` to the volume's; answers the volumes it newly
    /// claimed. A refusal releases those again, and only those.
    pub(crate) async fn claim_volumes(
        &self,
        machine: &str,
        app: &str,
        mounts: &mut [MachineMount],
    ) -> Result<Vec<String>> {
        let mut claimed: Vec<String> = Vec::new();
        for (index, mount) in mounts.iter_mut().enumerate() {
            let result = self.claim(machine, app, &mount.volume, index).await;
            match result {
                Ok((encrypted, newly)) => {
                    if newly {
                        claimed.push(mount.volume.clone());
                    }
                    mount.encrypted = encrypted;
                }
                Err(error) => {
                    self.release_volumes(machine, &claimed).await;
                    return Err(error);
                }
            }
        }
        Ok(claimed)
    }

    /// Releases the volumes the Machine holds that `mounts` does not name: an update's
    /// removed mounts once it has ended, or the new ones claimed for an update that was
    /// rolled back.
    pub(crate) async fn release_unmounted(
        &self,
        machine: &str,
        app: &str,
        mounts: &[MachineMount],
    ) {
        let held = match self.inner.store.volumes_of(Some(app)).await {
            Ok(volumes) => volumes,
            Err(error) => {
                warn!(%machine, %error, "listing volumes to release; recovery releases them");
                return;
            }
        };
        let unmounted: Vec<String> = held
            .into_iter()
            .filter(|volume| volume.attached_machine.as_deref() == Some(machine))
            .filter(|volume| !mounts.iter().any(|mount| mount.volume == volume.id))
            .map(|volume| volume.id)
            .collect();
        self.release_volumes(machine, &unmounted).await;
    }

    /// Attaches the volume to the Machine; answers whether it is encrypted and whether
    /// this call attached it (not the Machine's already).
    async fn claim(
        &self,
        machine: &str,
        app: &str,
        volume: &str,
        index: usize,
    ) -> Result<(bool, bool)> {
        let _guard = self.lock(volume).await?;
        let field = format!("config.mounts[{index}].volume");
        let mut record = match self.inner.store.volume(volume).await? {
            Some(record) if record.app == app && record.pending.is_none() => record,
            _ => {
                return Err(refuse(
                    404,
                    "volume_not_found",
                    format!("volume {volume} not found in app {app}"),
                    Some(&field),
                ))
            }
        };
        let encrypted = record.key.is_some();
        match &record.attached_machine {
            Some(holder) if holder == machine => Ok((encrypted, false)),
            Some(holder) => Err(attached(volume, holder)),
            None => {
                record.attached_machine = Some(machine.to_owned());
                self.inner.store.save_volume(&record).await?;
                Ok((encrypted, true))
            }
        }
    }

    /// Where the Machine's (already claimed) volumes are mounted from (an encrypted one's
    /// data directory, as its mount's `encrypted` says): for create, update and its
    /// rollback, which write `config.json`.
    pub(crate) fn volume_mounts(&self, mounts: &[MachineMount]) -> Vec<VolumeMount> {
        mounts
            .iter()
            .map(|mount| VolumeMount {
                source: self
                    .volume_layout(&mount.volume)
                    .machine_source(mount.encrypted),
                destination: mount.path.clone(),
            })
            .collect()
    }

    /// Ends the Machine's hold on these volumes (destroy, or a create that failed).
    pub(crate) async fn release_volumes(&self, machine: &str, volumes: &[String]) {
        for volume in volumes {
            let released = async {
                let _guard = self.lock(volume).await?;
                if let Some(mut record) = self.inner.store.volume(volume).await? {
                    if record.attached_machine.as_deref() == Some(machine) {
                        record.attached_machine = None;
                        self.inner.store.save_volume(&record).await?;
                    }
                }
                Ok::<_, AgentError>(())
            }
            .await;
            if let Err(error) = released {
                warn!(%machine, %volume, %error, "releasing a volume; recovery releases it");
            }
        }
    }

    /// Before the Machines' recovery (which may start Machines): finishes or undoes
    /// unfinished volume operations and mounts every volume (after a host restart none
    /// is).
    pub(crate) async fn recover_volumes(&self) -> Result<()> {
        for mut record in self.inner.store.volumes_of(None).await? {
            let layout = self.keyed_layout(&record);
            match record.pending {
                Some(VolumePending::Create) => {
                    self.host_driver().volume_remove(&layout).await?;
                    self.inner.store.delete_volume(&record.id).await?;
                    info!(volume = %record.id, "removed a volume whose create did not finish");
                    continue;
                }
                Some(VolumePending::Delete) => {
                    self.finish_delete(&record).await?;
                    continue;
                }
                Some(VolumePending::Extend) => {
                    // Before any Machine starts: the filesystem may be unmounted to grow.
                    self.host_driver().volume_mount(&layout).await?;
                    self.finish_extend(&mut record, true).await?;
                }
                // The move's owner (the control plane) commits or aborts it; a copy that
                // is still arriving is never mounted before then.
                Some(VolumePending::MigrateIn) => continue,
                // Its files went at the move's finish, cut off before the record did: the
                // finish sent again forgets it.
                Some(VolumePending::MigrateOut) if !layout.dir.exists() => continue,
                // Mounted as any other: abort needs it so, finish removes it, and a later
                // pass unmounts it again before reading.
                Some(VolumePending::MigrateOut) | None => {
                    self.host_driver().volume_mount(&layout).await?
                }
            }
            // Snapshots whose copy was cut short.
            if let Ok(entries) = std::fs::read_dir(self.snapshots_dir(&record.id)) {
                for entry in entries.flatten() {
                    if entry.path().extension().is_some_and(|ext| ext == "tmp") {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        Ok(())
    }
}

impl Agent {
    /// After the Machines' recovery: releases volumes held by Machines that no longer
    /// exist (a create rolled back, a destroy that crashed before its release) or that
    /// no longer mount them (an update that crashed before releasing its removed mounts,
    /// or after claiming new ones but before recording itself).
    pub(crate) async fn release_orphan_claims(&self) -> Result<()> {
        for mut record in self.inner.store.volumes_of(None).await? {
            if let Some(machine) = &record.attached_machine {
                let holder = self.inner.store.get(machine).await?;
                let mounted = holder.is_some_and(|holder| {
                    holder
                        .config
                        .mounts
                        .iter()
                        .any(|mount| mount.volume == record.id)
                });
                if !mounted {
                    info!(volume = %record.id, %machine, "released a volume of a machine that is gone or no longer mounts it");
                    record.attached_machine = None;
                    self.inner.store.save_volume(&record).await?;
                }
            }
        }
        Ok(())
    }
}

const DAY_MS: i64 = 24 * 3600 * 1000;

/// The snapshots `retention_days` old or older at `now_ms`.
fn expired(snapshots: &[SnapshotRecord], retention_days: u32, now_ms: i64) -> Vec<&SnapshotRecord> {
    let keep_ms = i64::from(retention_days).saturating_mul(DAY_MS);
    snapshots
        .iter()
        .filter(|snapshot| snapshot.created_at_ms.saturating_add(keep_ms) <= now_ms)
        .collect()
}

fn state_of(record: &VolumeRecord) -> &'static str {
    match record.pending {
        Some(VolumePending::Create) => "creating",
        Some(VolumePending::Extend) => "extending",
        Some(VolumePending::Delete) => "destroying",
        Some(VolumePending::MigrateIn) => "migrating",
        // Still the volume of its Machine, in use here until the cutover.
        Some(VolumePending::MigrateOut) | None => "created",
    }
}

/// The size a create asks for, or why it cannot be honoured.
fn check_create(request: &CreateVolumeRequest) -> Result<u32> {
    berth_core::validate::validate_name("name", &request.name)?;
    let size_gb = request.size_gb.unwrap_or(DEFAULT_VOLUME_SIZE_GB);
    if size_gb == 0 || size_gb > MAX_VOLUME_SIZE_GB {
        return Err(refuse(
            400,
            "invalid_config",
            format!("size_gb must be from 1 to {MAX_VOLUME_SIZE_GB}"),
            Some("size_gb"),
        ));
    }
    if request
        .fstype
        .as_deref()
        .is_some_and(|fstype| fstype != "ext4")
    {
        return Err(refuse(
            422,
            "unsupported",
            "only ext4 volumes are supported".into(),
            Some("fstype"),
        ));
    }
    if request.source_volume_id.is_some() && request.snapshot_id.is_some() {
        return Err(refuse(
            400,
            "invalid_config",
            "a volume is made from a snapshot or from another volume, not both".into(),
            Some("source_volume_id"),
        ));
    }
    Ok(size_gb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, created_at_ms: i64) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            volume_id: "vol_1".into(),
            size: 0,
            digest: String::new(),
            created_at_ms,
            path: PathBuf::from(id),
        }
    }

    #[test]
    fn a_snapshot_expires_once_its_retention_has_passed() {
        let taken = 1_000_000;
        let snapshots = [snapshot("old", taken), snapshot("new", taken + DAY_MS)];
        let ids = |now: i64, days: u32| -> Vec<String> {
            expired(&snapshots, days, now)
                .iter()
                .map(|s| s.id.clone())
                .collect()
        };
        // Fly's default, 5 days: kept until exactly 5 days have passed.
        assert_eq!(ids(taken + 5 * DAY_MS - 1, 5), Vec::<String>::new());
        assert_eq!(ids(taken + 5 * DAY_MS, 5), ["old"]);
        assert_eq!(ids(taken + 6 * DAY_MS, 5), ["old", "new"]);
        // A longer retention keeps them longer.
        assert_eq!(ids(taken + 6 * DAY_MS, 30), Vec::<String>::new());
        assert_eq!(ids(i64::MAX, u32::MAX), ["old", "new"]);
    }
}
