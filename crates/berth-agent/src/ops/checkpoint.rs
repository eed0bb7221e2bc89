//! Checkpoints of a Machine's disk ([`berth_runtime::checkpoint`]): take, list, delete and
//! restore, and the disk of a fork.
//!
//! A checkpoint is its read-only snapshot `checkpoints/<cp>` plus its record
//! `checkpoints/<cp>.json`, written after the snapshot. A snapshot without a record (a
//! crash between the two) is half-made and deleted; so is a record whose snapshot is gone.
//! Every operation settles that first, under the Machine's lock, and so does recovery.
//! `checkpoints/head` names the checkpoint the Machine's files descend from, the next
//! checkpoint's `parent`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use berth_api::{
    Checkpoint, EventKind, MachineState, RestoreCheckpointResponse, MAX_CHECKPOINT_COMMENT,
};
use berth_core::ConfigError;
use berth_runtime::extents::{self, ExtentSet};
use berth_runtime::{
    checkpoint, remove_file_if_exists, write_atomic, write_replace, MachineLayout,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{AgentError, Result};
use crate::failpoint;
use crate::record::{format_ms, now_ms, MachineRecord};
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

const HEAD_FILE: &str = "head";
/// In a fork's directory: [`ForkedFrom`].
const FORKED_FROM_FILE: &str = "forked_from";

/// What the agent keeps of a checkpoint beside its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CheckpointRecord {
    id: String,
    created_at_ms: i64,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    auto: bool,
    /// On an undo checkpoint: the checkpoint its restore made the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restore_of: Option<String>,
}

/// The caller's part of [`checkpoint::restore`]: the undo's record before the disk becomes
/// it, the head before the new disk takes its place.
struct RestoreSteps<'a> {
    layout: &'a MachineLayout,
    undo: &'a CheckpointRecord,
}

impl checkpoint::RestoreSteps for RestoreSteps<'_> {
    fn before_undo(&mut self) -> io::Result<()> {
        failpoint::hit("restore.after_stage");
        write_record(self.layout, self.undo)?;
        failpoint::hit("restore.after_undo_record");
        Ok(())
    }

    fn before_swap_in(&mut self) -> io::Result<()> {
        failpoint::hit("restore.after_undo_checkpoint");
        match &self.undo.restore_of {
            Some(target) => write_head(self.layout, target),
            None => Ok(()),
        }
    }
}

impl Agent {
    pub(crate) async fn checkpoint_create_op(
        &self,
        id: &str,
        comment: String,
    ) -> Result<Checkpoint> {
        if comment.len() > MAX_CHECKPOINT_COMMENT {
            return Err(ConfigError {
                field: "comment".into(),
                message: format!("is longer than {MAX_CHECKPOINT_COMMENT} bytes"),
            }
            .into());
        }
        let _guard = self.lock(id).await?;
        let record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        let layout = self.checkpointable(&record).await?;
        let taken = self.take_checkpoint(&record, &layout, comment).await?;
        let reason = format!("checkpoint {}", taken.id);
        self.save_in_state(
            &record,
            Change::event(EventKind::Checkpoint, EventSource::User).reason(&reason),
        )
        .await?;
        self.journal_checkpoint_bytes_soon(id);
        self.checkpoint_view(&layout, &taken).await
    }

    pub(crate) async fn checkpoint_list_op(&self, id: &str) -> Result<Vec<Checkpoint>> {
        let _guard = self.lock(id).await?;
        // An unknown Machine is 404, one that cannot have checkpoints has none.
        self.load(id).await?;
        self.checkpoint_list_unlocked(id).await
    }

    /// The Machine's checkpoints, for a caller that holds its lock.
    pub(crate) async fn checkpoint_list_unlocked(&self, id: &str) -> Result<Vec<Checkpoint>> {
        let layout = self.layout(id);
        if checkpoint::unsupported(&layout).is_some() {
            return Ok(Vec::new());
        }
        let records = {
            let layout = layout.clone();
            blocking(move || settle(&layout)).await?
        };
        let mut out = Vec::with_capacity(records.len());
        for record in &records {
            out.push(self.checkpoint_view(&layout, record).await?);
        }
        Ok(out)
    }

    pub(crate) async fn checkpoint_delete_op(&self, id: &str, checkpoint_id: &str) -> Result<()> {
        let _guard = self.lock(id).await?;
        let record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        let layout = self.layout(id);
        let cp = checkpoint_id.to_owned();
        let found = blocking(move || {
            let records = settle(&layout)?;
            if !records.iter().any(|record| record.id == cp) {
                return Ok(false);
            }
            // The record goes first: a crash after it leaves a snapshot without one, which
            // the next settle deletes.
            remove_file_if_exists(&record_path(&layout, &cp))?;
            checkpoint::delete(&layout, &cp)?;
            Ok(true)
        })
        .await?;
        if found {
            self.journal_checkpoint_bytes_soon(id);
            Ok(())
        } else {
            Err(self.no_checkpoint(id, checkpoint_id))
        }
    }

    /// Makes the Machine's files those of `checkpoint_id`, after an automatic checkpoint
    /// of the files it has. A started Machine is stopped (with its stop config) for the
    /// exchange and started again.
    pub(crate) async fn checkpoint_restore_op(
        &self,
        id: &str,
        checkpoint_id: &str,
    ) -> Result<RestoreCheckpointResponse> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        let layout = self.checkpointable(&record).await?;
        let target = {
            let layout = layout.clone();
            blocking(move || settle(&layout)).await?
        }
        .into_iter()
        .find(|record| record.id == checkpoint_id)
        .ok_or_else(|| self.no_checkpoint(id, checkpoint_id))?;
        let running = match record.state {
            MachineState::Started => true,
            MachineState::Created | MachineState::Stopped | MachineState::Failed => false,
            state => {
                return Err(AgentError::CheckpointState {
                    id: id.to_owned(),
                    state,
                    why: "only a created, stopped, failed or started Machine can be restored (stop a suspended one first)",
                })
            }
        };
        if running {
            let (signal, timeout) =
                Self::stop_parameters(&record, &berth_api::StopRequest::default())?;
            self.change_state(&mut record, MachineState::Stopping, Change::quiet())
                .await?;
            let exit = self.halt(&mut record, signal, timeout).await?;
            self.record_stopped(
                &mut record,
                &exit,
                berth_api::CloseBasis::Observed,
                (EventKind::Stop, EventSource::User),
                Some("restore"),
            )
            .await?;
        }
        // The undo is the old disk itself, renamed into the checkpoints: no second snapshot.
        let undo = CheckpointRecord {
            id: berth_core::ids::new_checkpoint_id(),
            created_at_ms: now_ms(),
            comment: format!("before restore of {checkpoint_id}"),
            parent: None,
            auto: true,
            restore_of: Some(target.id.clone()),
        };
        let undo = {
            let layout = layout.clone();
            let source = layout.checkpoint(&target.id);
            let limit = self
                .disk_quota(&record)
                .map(|_| crate::machine_disk_mb(&record.config.guest));
            blocking(move || {
                let mut undo = undo;
                undo.parent = read_head(&layout)?;
                let mut steps = RestoreSteps {
                    layout: &layout,
                    undo: &undo,
                };
                if let Err(error) =
                    checkpoint::restore(&layout, &source, &undo.id, limit, &mut steps)
                {
                    // A record written before the failure has no snapshot: settle drops it.
                    settle(&layout)?;
                    return Err(error);
                }
                failpoint::hit("restore.after_exchange");
                Ok(undo)
            })
            .await?
        };
        // The flag change commits a transaction of its own: off the request path. Nothing
        // writes the undo meanwhile, a delete of it makes this fail harmlessly, and
        // recovery seals what a crash left writable.
        let undo_path = layout.checkpoint(&undo.id);
        let machine = id.to_owned();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = checkpoint::seal(&undo_path) {
                if undo_path.exists() {
                    warn!(%machine, %error, "sealing the undo checkpoint");
                }
            }
        });
        let reason = format!("restored {checkpoint_id}; {} undoes it", undo.id);
        self.save_in_state(
            &record,
            Change::event(EventKind::Restore, EventSource::User).reason(&reason),
        )
        .await?;
        info!(machine = %id, checkpoint = %checkpoint_id, undo = %undo.id, running, "restored");
        self.journal_checkpoint_bytes_soon(id);
        if running {
            self.boot(&mut record, EventSource::User).await?;
        }
        Ok(RestoreCheckpointResponse {
            restored: checkpoint_id.to_owned(),
            undo: self.checkpoint_view(&layout, &undo).await?,
            restarted: running,
            machine: self.api_view(&record),
        })
    }

    /// The path of `checkpoint_id` of Machine `source` for a fork's disk, once it is
    /// known to be whole. The source's lock is held only for the look-up: the snapshot
    /// is read-only, and a delete meanwhile makes the fork's snapshot fail cleanly.
    pub(crate) async fn checkpoint_for_fork(
        &self,
        source: &str,
        checkpoint_id: &str,
    ) -> Result<std::path::PathBuf> {
        let _guard = self.lock(source).await?;
        let record = self.load(source).await?;
        let layout = self.checkpointable(&record).await?;
        let path = layout.checkpoint(checkpoint_id);
        let records = blocking(move || settle(&layout)).await?;
        if records.iter().any(|record| record.id == checkpoint_id) {
            Ok(path)
        } else {
            Err(self.no_checkpoint(source, checkpoint_id))
        }
    }

    /// A fork's disk: the new Machine's (made empty by prepare) is replaced by a writable
    /// snapshot of `source`, and its files move from the source's host ids into its own.
    pub(crate) async fn fork_disk(&self, record: &MachineRecord, source: PathBuf) -> Result<()> {
        let layout = self.layout(&record.id);
        let limit = self
            .disk_quota(record)
            .map(|_| crate::machine_disk_mb(&record.config.guest));
        let started = Instant::now();
        let rebased = blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let own = fs::metadata(layout.upper())?.uid();
            let theirs = fs::metadata(source.join("upper"))?.uid();
            write_forked_from(&layout, &source)?;
            checkpoint::replace_disk(&layout, &source, limit)?;
            failpoint::hit("fork.after_exchange");
            let upper = fs::canonicalize(layout.upper())?;
            berth_runtime::userns::rebase_tree(&upper, theirs, own)
        })
        .await?;
        info!(machine = %record.id, rebased, ms = started.elapsed().as_millis() as u64, "forked disk");
        Ok(())
    }

    /// Settles what a crash left of the Machine's checkpoints (recovery, before anything
    /// else touches the Machine): half-made ones go, and a Machine the crash left frozen
    /// runs on.
    pub(crate) async fn recover_checkpoints(&self, record: &MachineRecord) {
        let id = &record.id;
        let layout = self.layout(id);
        if !berth_runtime::quota::has_quota_layout(&layout) {
            return;
        }
        if matches!(record.state, MachineState::Started | MachineState::Stopping) {
            // Thawing what is not frozen changes nothing; a driver's complaint about it
            // is not worth a warning.
            let _ = self
                .driver_or_default(&record.config)
                .freeze(&layout, false)
                .await;
        }
        let settled = blocking(move || {
            // A restore cut off after its undo is finished, before anything needs the disk.
            let finished = checkpoint::recover(&layout)?;
            let records = settle(&layout)?;
            if finished {
                if let Some(target) = records.iter().rev().find_map(|r| r.restore_of.as_ref()) {
                    write_head(&layout, target)?;
                }
                warn!(machine = %layout.id, "finished a restore a crash had cut off");
            }
            // An undo is sealed after its restore: a crash in between left it writable.
            for record in &records {
                checkpoint::seal(&layout.checkpoint(&record.id))?;
            }
            Ok(())
        })
        .await;
        if let Err(error) = settled {
            warn!(machine = %id, %error, "settling the checkpoints");
        }
    }

    /// Journals, off the request path, the bytes billed to the Machine's checkpoints.
    pub(crate) fn journal_checkpoint_bytes_soon(&self, id: &str) {
        let agent = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            if let Err(error) = agent.journal_checkpoint_bytes(&id).await {
                warn!(machine = %id, %error, "journaling checkpoint storage");
            }
        });
    }

    /// Journals the bytes billed to the Machine's checkpoints when they changed: the data
    /// its checkpoints hold and neither its disk nor the checkpoint it was forked from
    /// does (that one is billed to its own Machine). Shared data is billed once. Measured
    /// outside the Machine's lock (a walk of its files), journaled under it.
    pub(crate) async fn journal_checkpoint_bytes(&self, id: &str) -> Result<()> {
        let layout = self.layout(id);
        if checkpoint::unsupported(&layout).is_some() {
            return Ok(());
        }
        let names = {
            let layout = layout.clone();
            blocking(move || checkpoint::list(&layout)).await?
        };
        // Deleted checkpoints leave the cache here, once per measurement.
        self.inner
            .checkpoint_extents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|path, _| path.exists());
        let mut held = ExtentSet::default();
        for name in &names {
            held = held.union(&*self.checkpoint_extents(layout.checkpoint(name)).await?);
        }
        let mut elsewhere = match self.forked_from(&layout) {
            Some(source) => (*self.checkpoint_extents(source).await?).clone(),
            None => ExtentSet::default(),
        };
        if held.len_bytes() > 0 {
            let upper = layout.upper();
            let disk =
                blocking(move || extents::physical_extents(&fs::canonicalize(upper)?)).await?;
            elsewhere = elsewhere.union(&disk);
        }
        let bytes = held.bytes_outside(&elsewhere);
        let _guard = self.lock(id).await?;
        let Some(mut record) = self.inner.store.get(id).await? else {
            return Ok(());
        };
        if record.pending.is_some()
            || record.state == MachineState::Destroying
            || bytes == record.checkpoint_bytes
        {
            return Ok(());
        }
        let usage = crate::metering::checkpoint_storage(&mut record, now_ms(), bytes);
        self.inner
            .store
            .save_with_usage(&record, None, &[usage])
            .await
    }

    /// The bytes billed to the Machine's disk: what `du` counts of its upperdir, less the
    /// extents it still shares with the checkpoint it was forked from.
    pub(crate) async fn billed_disk_bytes(&self, id: &str) -> Result<u64> {
        let layout = self.layout(id);
        let shared = match self.forked_from(&layout) {
            Some(source) => self.checkpoint_extents(source).await?,
            None => Arc::new(ExtentSet::default()),
        };
        let upper = layout.upper();
        blocking(move || {
            // With a disk quota the upperdir is a link into the disk's subvolume.
            let upper = fs::canonicalize(upper)?;
            extents::usage_outside(&upper, &shared)
        })
        .await
    }

    /// The extents of a checkpoint's files, from the cache: a checkpoint never changes.
    async fn checkpoint_extents(&self, path: PathBuf) -> Result<Arc<ExtentSet>> {
        let cached = self
            .inner
            .checkpoint_extents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&path)
            .cloned();
        if let Some(set) = cached {
            return Ok(set);
        }
        let upper = path.join("upper");
        let set = Arc::new(blocking(move || extents::physical_extents(&upper)).await?);
        self.inner
            .checkpoint_extents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path, set.clone());
        Ok(set)
    }

    /// The checkpoint the Machine was forked from, while it is on this worker.
    fn forked_from(&self, layout: &MachineLayout) -> Option<PathBuf> {
        let bytes = fs::read(layout.dir.join(FORKED_FROM_FILE)).ok()?;
        let from: ForkedFrom = serde_json::from_slice(&bytes).ok()?;
        let path = self.layout(&from.machine).checkpoint(&from.checkpoint);
        path.is_dir().then_some(path)
    }

    /// The Machine's layout, if its disk can be checkpointed.
    async fn checkpointable(&self, record: &MachineRecord) -> Result<MachineLayout> {
        let layout = self.layout(&record.id);
        match checkpoint::unsupported(&layout) {
            None => Ok(layout),
            Some(why) => Err(AgentError::CheckpointsUnsupported {
                id: record.id.clone(),
                why,
            }),
        }
    }

    /// Takes a checkpoint of a Machine whose lock the caller holds. A running Machine is
    /// frozen for the instant of the snapshot, so that no write is caught halfway.
    async fn take_checkpoint(
        &self,
        record: &MachineRecord,
        layout: &MachineLayout,
        comment: String,
    ) -> Result<CheckpointRecord> {
        let freeze = match record.state {
            MachineState::Started => true,
            MachineState::Created
            | MachineState::Stopped
            | MachineState::Failed
            | MachineState::Suspended => false,
            state => {
                return Err(AgentError::CheckpointState {
                    id: record.id.clone(),
                    state,
                    why: "a checkpoint waits until the Machine's operation ends",
                })
            }
        };
        let driver = self.driver_or_default(&record.config).clone();
        if freeze {
            match driver.freeze(layout, true).await {
                Err(error @ berth_runtime::RuntimeError::Unsupported { .. }) => {
                    return Err(AgentError::CheckpointsUnsupported {
                        id: record.id.clone(),
                        why: format!("{error} while it runs (stop it first)"),
                    })
                }
                other => other?,
            }
        }
        let taken = {
            let layout = layout.clone();
            blocking(move || {
                settle(&layout)?;
                let parent = read_head(&layout)?;
                let id = berth_core::ids::new_checkpoint_id();
                checkpoint::take(&layout, &id)?;
                failpoint::hit("checkpoint.after_snapshot");
                let record = CheckpointRecord {
                    id,
                    created_at_ms: now_ms(),
                    comment,
                    parent,
                    auto: false,
                    restore_of: None,
                };
                write_record(&layout, &record)?;
                failpoint::hit("checkpoint.after_record");
                write_head(&layout, &record.id)?;
                Ok(record)
            })
            .await
        };
        if freeze {
            // Thawed whatever happened: a Machine left frozen would hang its robot.
            if let Err(error) = driver.freeze(layout, false).await {
                warn!(machine = %record.id, %error, "thawing after a checkpoint");
                return Err(error.into());
            }
        }
        taken
    }

    async fn checkpoint_view(
        &self,
        layout: &MachineLayout,
        record: &CheckpointRecord,
    ) -> Result<Checkpoint> {
        let quota = self
            .host_driver()
            .host_config()
            .and_then(|host| host.disk_quota.clone());
        let path = layout.checkpoint(&record.id);
        let sizes = match quota {
            Some(quota) => blocking(move || checkpoint::sizes(&quota, &path)).await?,
            None => None,
        };
        let (size_bytes, exclusive_bytes) = sizes.unwrap_or_default();
        Ok(Checkpoint {
            id: record.id.clone(),
            created_at: format_ms(record.created_at_ms),
            comment: record.comment.clone(),
            size_bytes,
            exclusive_bytes,
            parent: record.parent.clone(),
            auto: record.auto,
        })
    }

    fn disk_quota(&self, record: &MachineRecord) -> Option<berth_runtime::quota::DiskQuota> {
        self.driver_or_default(&record.config)
            .host_config()
            .and_then(|host| host.disk_quota.clone())
    }

    fn no_checkpoint(&self, id: &str, checkpoint_id: &str) -> AgentError {
        AgentError::CheckpointNotFound {
            id: id.to_owned(),
            checkpoint: checkpoint_id.to_owned(),
        }
    }
}

/// What a crash left half-made of the Machine's checkpoints, for the doctor: each path
/// and what is wrong with it. Reads only.
pub(crate) fn half_made(layout: &MachineLayout) -> Vec<(std::path::PathBuf, String)> {
    let mut found = Vec::new();
    if checkpoint::unsupported(layout).is_some() {
        return found;
    }
    let swap = layout.dir.join("disk.swap");
    if swap.exists() {
        found.push((
            swap,
            "a restore's or fork's disk was left beside the disk".into(),
        ));
    }
    let snapshots = checkpoint::list(layout).unwrap_or_default();
    for name in &snapshots {
        if !matches!(read_record(layout, name), Ok(Some(record)) if record.id == *name) {
            found.push((
                layout.checkpoint(name),
                "a checkpoint snapshot without its record".into(),
            ));
        }
    }
    if let Ok(entries) = fs::read_dir(layout.checkpoints()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if !snapshots.iter().any(|snapshot| snapshot == id) {
                    found.push((
                        entry.path(),
                        "a checkpoint record without its snapshot".into(),
                    ));
                }
            }
        }
    }
    found
}

/// Deletes half-made checkpoints (a snapshot without a record, a record without a
/// snapshot) and answers the whole ones, oldest first.
fn settle(layout: &MachineLayout) -> io::Result<Vec<CheckpointRecord>> {
    let snapshots = checkpoint::list(layout)?;
    let mut records = Vec::new();
    for name in &snapshots {
        match read_record(layout, name)? {
            Some(record) if record.id == *name => records.push(record),
            _ => {
                warn!(machine = %layout.id, checkpoint = %name, "deleting a half-made checkpoint");
                checkpoint::delete(layout, name)?;
            }
        }
    }
    if let Ok(entries) = fs::read_dir(layout.checkpoints()) {
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if !snapshots.iter().any(|snapshot| snapshot == id) {
                    remove_file_if_exists(&layout.checkpoints().join(&name))?;
                }
            } else if name.ends_with(".tmp") {
                remove_file_if_exists(&layout.checkpoints().join(&name))?;
            }
        }
    }
    records.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(records)
}

fn record_path(layout: &MachineLayout, id: &str) -> std::path::PathBuf {
    layout.checkpoints().join(format!("{id}.json"))
}

fn read_record(layout: &MachineLayout, id: &str) -> io::Result<Option<CheckpointRecord>> {
    match fs::read(record_path(layout, id)) {
        // A record that does not parse was cut off by a crash: as good as none.
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_record(layout: &MachineLayout, record: &CheckpointRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
    write_atomic(&record_path(layout, &record.id), &bytes)
}

fn read_head(layout: &MachineLayout) -> io::Result<Option<String>> {
    match fs::read_to_string(layout.checkpoints().join(HEAD_FILE)) {
        Ok(text) => {
            let id = text.trim().to_owned();
            // A parent deleted since is no parent.
            Ok((!id.is_empty() && layout.checkpoint(&id).exists()).then_some(id))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where a fork's disk came from: the checkpoint whose extents it shares, so that they
/// are billed to that checkpoint's Machine only.
#[derive(Debug, Serialize, Deserialize)]
struct ForkedFrom {
    machine: String,
    checkpoint: String,
}

fn write_forked_from(layout: &MachineLayout, source: &Path) -> io::Result<()> {
    // `source` is `…/machines/<machine>/checkpoints/<checkpoint>`.
    let name = |path: Option<&Path>| {
        path.and_then(Path::file_name)
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| io::Error::other(format!("{} is no checkpoint", source.display())))
    };
    let from = ForkedFrom {
        checkpoint: name(Some(source))?,
        machine: name(source.parent().and_then(Path::parent))?,
    };
    let bytes = serde_json::to_vec(&from).map_err(io::Error::other)?;
    // Without an fsync: in a directory that saw a rename in the running transaction (the
    // config prepare wrote) btrfs makes an fsync commit the whole transaction, 6 ms on a
    // fork. A power cut before the next commit may lose the file, and the fork is then
    // billed for the data it shares as well: over, never under.
    write_replace(&layout.dir.join(FORKED_FROM_FILE), &bytes, false)
}

/// Without an fsync: the head only names the next checkpoint's parent, and a power loss
/// that takes it back to an older one saves a disk flush per checkpoint and restore.
fn write_head(layout: &MachineLayout, id: &str) -> io::Result<()> {
    fs::create_dir_all(layout.checkpoints())?;
    write_replace(&layout.checkpoints().join(HEAD_FILE), id.as_bytes(), false)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| AgentError::Internal(format!("checkpoint task: {error}")))?
        .map_err(|error| {
            AgentError::Runtime(berth_runtime::RuntimeError::Io {
                context: "checkpoint".into(),
                error,
            })
        })
}
