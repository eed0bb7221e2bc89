//! Migration, this worker's half of it. The control plane runs the steps and owns the
//! outcome: before its cutover record the Machine is the source's, and `abort` undoes
//! either side; after it the Machine is the destination's, and `commit` and `finish`
//! complete it. Every step is idempotent, so a step cut off by a crash is sent again.
//!
//! | step | side | what it records |
//! | --- | --- | --- |
//! | begin | source | `pending: migrate_out` on the Machine and on each volume it mounts |
//! | receive | destination | a record with `pending: migrate_in`, before the layout; then the first pass; each volume recorded `migrate_in` before its image (and snapshots) arrive |
//! | halt | source | `stopped` (a running Machine), `halted` in the mark |
//! | sync | destination | a pass of what changed since the last one began; per volume, the chunks whose hash changed |
//! | commit | destination | volumes mounted and billed from the cutover, then the mark cleared, a `migrate` event, storage billed from the cutover |
//! | finish | source | volumes removed with `migrated_out`, then the record deleted with `migrated_out` at the cutover |
//! | abort | either | destination: volumes, then everything else removed; source: volumes mounted again, the mark cleared, a halted Machine started |
//!
//! A volume image is read only while nothing writes it: a pass over the volume of a
//! Machine that does not run first releases it (unmounted, its loop device gone), so the
//! last pass, after the halt, sends a still image. Passes while the Machine runs are
//! fuzzy, and only save the last one work.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;

use berth_api::{CloseBasis, EventKind, MachineState};
use berth_worker::{
    MigrateIn, MigrationAnswer, MigrationPeer, MigrationStep, MigrationStream, StreamRequest,
    WorkerService,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::error::{AgentError, Result};
use crate::failpoint;
use crate::metering;
use crate::record::{now_ms, MachineRecord, PendingOp};
use crate::service::EventSource;
use crate::store::MachineEvent;
use crate::transfer;
use crate::transition::Change;
use crate::volumes::{refuse, SnapshotRecord, VolumePending, VolumeRecord};
use crate::{machine_address, Agent};

/// What the source hands the destination through the control plane: the record and its
/// history, as this agent keeps them.
#[derive(Debug, Serialize, Deserialize)]
struct MachineExport {
    record: MachineRecord,
    events: Vec<MachineEvent>,
    /// (version, config JSON, time), oldest first.
    versions: Vec<(String, String, i64)>,
    /// The volumes the Machine mounts, and their snapshots (the source's paths).
    #[serde(default)]
    volumes: Vec<VolumeRecord>,
    #[serde(default)]
    snapshots: Vec<SnapshotRecord>,
}

/// An image pass this worker sent of a leaving volume.
#[derive(Debug, Clone)]
pub(crate) struct SentImage {
    digest: String,
    hashes: Vec<transfer::ChunkHash>,
}

/// A pass this worker sent: what a later pass of the same move starts from.
#[derive(Debug, Clone)]
pub(crate) struct SentPass {
    digest: String,
    started_at: transfer::Timespec,
    dirs: transfer::DirIndex,
}

/// Bytes handed to the HTTP body at a time.
const CHUNK: usize = 256 * 1024;

fn grant_matches(held: &str, offered: &str) -> bool {
    bool::from(held.as_bytes().ct_eq(offered.as_bytes()))
}

fn wrong_grant(id: &str) -> AgentError {
    let what = if berth_core::ids::has_id_shape(id, "vol_") {
        "volume"
    } else {
        "machine"
    };
    refuse(
        409,
        "migration_conflict",
        format!("{what} {id} is not in the migration this grant names"),
        None,
    )
}

fn transfer_error(error: transfer::TransferError) -> AgentError {
    if error.out_of_space() {
        AgentError::Runtime(berth_runtime::RuntimeError::Io {
            context: "receiving the machine's files".into(),
            error: std::io::Error::from_raw_os_error(libc::ENOSPC),
        })
    } else {
        refuse(
            502,
            error.code(),
            format!("copying the machine's files: {error}"),
            None,
        )
    }
}

/// A peer's error, as this worker answers it.
fn peer_error(error: berth_worker::WorkerError) -> AgentError {
    match error {
        berth_worker::WorkerError::Unavailable { worker, reason } => {
            AgentError::Unavailable { worker, reason }
        }
        other => {
            let (status, body) = other.to_response();
            AgentError::Remote {
                status,
                body: Box::new(body),
            }
        }
    }
}

/// Sends what is written to it down a channel, in chunks: the blocking exporter's side of
/// an HTTP body.
struct ChannelWriter {
    sender: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buffer: Vec<u8>,
    failpoint: &'static str,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        failpoint::hit(self.failpoint);
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Runs `send` on a blocking thread, its output the stream's body; an error ends the
/// body with it (so the destination sees a failed pass, never a short one).
fn stream_from<F>(point: &'static str, label: String, send: F) -> MigrationStream
where
    F: FnOnce(&mut ChannelWriter) -> std::result::Result<(), transfer::TransferError>
        + Send
        + 'static,
{
    let (sender, mut receiver) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter {
            sender: sender.clone(),
            buffer: Vec::with_capacity(CHUNK),
            failpoint: point,
        };
        let sent = send(&mut writer)
            .map_err(|error| std::io::Error::other(error.to_string()))
            .and_then(|()| writer.flush());
        if let Err(error) = sent {
            warn!(machine = %label, %error, "sending a pass");
            let _ = sender.blocking_send(Err(error));
        }
    });
    Box::pin(futures::stream::poll_fn(move |context| {
        receiver.poll_recv(context)
    }))
}

/// Which image a volume pass copies.
struct ImageOf<'a> {
    volume: &'a str,
    snapshot: Option<&'a str>,
    /// The last pass applied whole (a later pass of the volume's own image).
    after_pass: Option<&'a str>,
}

impl Agent {
    pub(crate) async fn migration_op(&self, step: MigrationStep) -> Result<MigrationAnswer> {
        if let Some(id) = lone_volume(&step) {
            return self.lone_volume_step(&id, step).await;
        }
        match step {
            MigrationStep::Begin {
                id,
                grant,
                to_worker,
            } => self.migrate_begin(&id, grant, to_worker).await,
            MigrationStep::Receive(request) => self.migrate_receive(*request).await,
            MigrationStep::Halt { id, grant } => self.migrate_halt(&id, &grant).await,
            MigrationStep::Sync { id, grant } => self.migrate_sync(&id, &grant).await,
            MigrationStep::Commit {
                id,
                grant,
                start,
                from_address,
                cutover_ms,
            } => {
                self.migrate_commit(&id, &grant, start, from_address, cutover_ms)
                    .await
            }
            MigrationStep::Finish {
                id,
                grant,
                cutover_ms,
            } => self.migrate_finish(&id, &grant, cutover_ms).await,
            MigrationStep::Abort { id, grant } => self.migrate_abort(&id, &grant).await,
            MigrationStep::Recreate {
                request,
                lost_worker,
            } => self.recreate(*request, &lost_worker).await,
            MigrationStep::Forget { id } => self.forget_copy(&id).await,
        }
    }

    /// A create, then the event that says the Machine's files were lost.
    async fn recreate(
        &self,
        mut request: berth_worker::CreateOnWorker,
        lost_worker: &str,
    ) -> Result<MigrationAnswer> {
        request.skip_launch = true;
        let id = request.id.clone();
        self.create_op(request).await?;
        let _guard = self.lock(&id).await?;
        let record = self.load(&id).await?;
        let reason =
            format!("made again from its image; its files were lost with worker {lost_worker}");
        let change = Change::event(EventKind::Recreate, EventSource::System).reason(&reason);
        self.save_in_state(&record, change).await?;
        // Its volumes were made again empty here (by the control plane, before this
        // create claimed them): one event for each says its data was lost.
        for mount in &record.config.mounts {
            let name = self
                .inner
                .store
                .volume(&mount.volume)
                .await?
                .map(|volume| volume.name)
                .unwrap_or_default();
            let reason = format!(
                "volume {} ({name}) at {} made again empty on this worker; its data and snapshots were lost with worker {lost_worker}",
                mount.volume, mount.path
            );
            let change = Change::event(EventKind::Recreate, EventSource::System).reason(&reason);
            self.save_in_state(&record, change).await?;
        }
        Ok(MigrationAnswer {
            machine: Some(self.api_view(&record)),
            ..MigrationAnswer::default()
        })
    }

    /// Refuses an operation on a Machine that is half of a move.
    pub(crate) fn refuse_if_moving(record: &MachineRecord) -> Result<()> {
        if record.pending.as_ref().is_some_and(PendingOp::is_migration) {
            return Err(refuse(
                409,
                "machine_migrating",
                format!(
                    "machine {} is moving between workers; retry once the move ends",
                    record.id
                ),
                None,
            ));
        }
        Ok(())
    }

    async fn migrate_begin(
        &self,
        id: &str,
        grant: String,
        to_worker: String,
    ) -> Result<MigrationAnswer> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        match &record.pending {
            Some(PendingOp::MigrateOut { grant: held, .. }) if grant_matches(held, &grant) => {}
            Some(_) => return Err(AgentError::Busy { id: id.to_owned() }),
            None => {
                if !matches!(
                    record.state,
                    MachineState::Created | MachineState::Stopped | MachineState::Started
                ) {
                    return Err(AgentError::InvalidState(
                        berth_core::state::StateError::Invalid {
                            verb: "migrate",
                            state: record.state,
                        },
                    ));
                }
                // The transfer carries the writable layer, not its snapshots.
                let checkpoints = self.checkpoint_list_unlocked(id).await?;
                if !checkpoints.is_empty() {
                    return Err(AgentError::HasCheckpoints {
                        id: id.to_owned(),
                        count: checkpoints.len(),
                    });
                }
                record.pending = Some(PendingOp::MigrateOut {
                    grant,
                    to_worker,
                    halted: false,
                });
                self.inner.store.save(&record, None).await?;
            }
        }
        let (volumes, snapshots) = self.mark_volumes_leaving(&record).await?;
        failpoint::hit("migrate.after_begin");
        let running = record.state == MachineState::Started;
        let export = MachineExport {
            volumes,
            snapshots,
            events: self.inner.store.events(id).await?,
            versions: {
                let mut versions = self.inner.store.versions(id).await?;
                versions.reverse();
                versions
            },
            record,
        };
        let export = serde_json::to_value(&export)
            .map_err(|error| AgentError::Internal(format!("encode the export: {error}")))?;
        Ok(MigrationAnswer {
            export: Some(export),
            running,
            ..MigrationAnswer::default()
        })
    }

    /// One pass over the leaving Machine's writable layer, for the holder of its grant.
    pub(crate) async fn migration_stream_op(
        &self,
        id: &str,
        request: StreamRequest,
    ) -> Result<MigrationStream> {
        if berth_core::ids::has_id_shape(id, "vol_") {
            return self.lone_volume_stream(id, request).await;
        }
        let record = self.load(id).await?;
        match &record.pending {
            Some(PendingOp::MigrateOut { grant, .. }) if grant_matches(grant, &request.grant) => {}
            _ => return Err(wrong_grant(id)),
        }
        if let Some(volume) = request.volume.clone() {
            return self.image_stream(&record, &volume, request).await;
        }
        let layout = self.layout(id);
        let from_base =
            berth_runtime::spec::machine_id_range(&layout).map_or(0, |range| range.base);
        let previous = request.after_pass.as_ref().and_then(|digest| {
            self.inner.sent_passes.lock().ok().and_then(|sent| {
                sent.get(id)
                    .and_then(|passes| passes.iter().find(|pass| &pass.digest == digest))
                    .cloned()
            })
        });
        let pass = transfer::ExportPass {
            changed_since: previous.as_ref().map(|pass| pass.started_at),
            known_dirs: previous.map(|pass| pass.dirs),
            from_base,
            to_base: request.to_base,
            mount_points: record
                .config
                .mounts
                .iter()
                .map(|mount| mount.path.trim_matches('/').as_bytes().to_vec())
                .collect(),
        };
        let upper = layout.upper();
        let machine = id.to_owned();
        let agent = self.clone();
        Ok(stream_from(
            "migrate.source_mid_stream",
            machine.clone(),
            move |writer| {
                let summary = transfer::export(&upper, &pass, writer)?;
                agent.remember_pass(&machine, summary);
                Ok(())
            },
        ))
    }

    /// One pass over the image of a volume the leaving Machine mounts, or of one of its
    /// snapshots.
    async fn image_stream(
        &self,
        record: &MachineRecord,
        volume: &str,
        request: StreamRequest,
    ) -> Result<MigrationStream> {
        if !record
            .config
            .mounts
            .iter()
            .any(|mount| mount.volume == volume)
        {
            return Err(wrong_grant(&record.id));
        }
        let label = format!("{} volume {volume}", record.id);
        // Nothing but the Machine writes its volume: stopped, the volume is unmounted and
        // the image still (and whole, its filesystem cleanly closed).
        let still = record.state != MachineState::Started;
        self.send_image(&record.id, volume, label, request, still)
            .await
    }

    /// A pass over a leaving volume's image (released first when `still`), or over one
    /// of its snapshots; `owner` is what the move is keyed by.
    async fn send_image(
        &self,
        owner: &str,
        volume: &str,
        label: String,
        request: StreamRequest,
        still: bool,
    ) -> Result<MigrationStream> {
        if let Some(snapshot) = &request.snapshot {
            let found = self
                .inner
                .store
                .snapshot(snapshot)
                .await?
                .filter(|found| found.volume_id == volume)
                .ok_or_else(|| wrong_grant(owner))?;
            // Never changes: sent whole, once.
            return Ok(stream_from(
                "migrate.source_volume_mid_stream",
                label,
                move |writer| transfer::export_image(&found.path, None, writer).map(|_| ()),
            ));
        }
        let layout = self.volume_layout(volume);
        {
            let _guard = self.lock(volume).await?;
            match self.inner.store.volume(volume).await? {
                Some(found) if found.pending == Some(VolumePending::MigrateOut) => {}
                _ => return Err(wrong_grant(owner)),
            }
            if still {
                self.host_driver().volume_release(&layout).await?;
            }
        }
        let previous = request.after_pass.as_ref().and_then(|digest| {
            self.inner.sent_images.lock().ok().and_then(|sent| {
                sent.get(volume)
                    .and_then(|passes| passes.iter().find(|pass| &pass.digest == digest))
                    .map(|pass| pass.hashes.clone())
            })
        });
        let agent = self.clone();
        let volume = volume.to_owned();
        Ok(stream_from(
            "migrate.source_volume_mid_stream",
            label,
            move |writer| {
                let pass = transfer::export_image(&layout.image(), previous.as_deref(), writer)?;
                if let Ok(mut sent) = agent.inner.sent_images.lock() {
                    let passes = sent.entry(volume).or_default();
                    passes.push(SentImage {
                        digest: pass.digest,
                        hashes: pass.hashes,
                    });
                    if passes.len() > 2 {
                        passes.remove(0);
                    }
                }
                Ok(())
            },
        ))
    }

    /// Keeps what a later pass of the Machine starts from (the last two passes: the
    /// destination names the last it applied whole).
    fn remember_pass(&self, id: &str, summary: transfer::PassSummary) {
        if let Ok(mut sent) = self.inner.sent_passes.lock() {
            let passes = sent.entry(id.to_owned()).or_default();
            passes.push(SentPass {
                digest: summary.digest,
                started_at: summary.started_at,
                dirs: summary.dirs,
            });
            if passes.len() > 2 {
                passes.remove(0);
            }
        }
    }

    /// Forgets the passes sent of a Machine (and its volumes) that is no longer leaving.
    fn forget_passes(&self, record: &MachineRecord) {
        if let Ok(mut sent) = self.inner.sent_passes.lock() {
            sent.remove(&record.id);
        }
        if let Ok(mut sent) = self.inner.sent_images.lock() {
            for mount in &record.config.mounts {
                sent.remove(&mount.volume);
            }
        }
    }

    /// The worker that holds a Machine's source: an in-process peer, or its agent over HTTP
    /// with the join token.
    fn peer(&self, source: &MigrationPeer) -> Result<std::sync::Arc<dyn WorkerService>> {
        if let Some(peer) = self
            .inner
            .peers
            .read()
            .ok()
            .and_then(|peers| peers.get(&source.worker).and_then(std::sync::Weak::upgrade))
        {
            return Ok(peer);
        }
        let (Some(url), Some(token)) = (&source.url, &self.inner.config.join_token) else {
            return Err(AgentError::Unavailable {
                worker: source.worker.clone(),
                reason: "no way to reach it from this worker".into(),
            });
        };
        let remote =
            berth_worker::RemoteWorker::new(&source.worker, url, token).map_err(peer_error)?;
        Ok(std::sync::Arc::new(remote))
    }

    /// Fetches one pass from the source into the Machine's upperdir; answers its summary.
    async fn copy_pass(
        &self,
        id: &str,
        grant: &str,
        source: &MigrationPeer,
        after_pass: Option<String>,
    ) -> Result<transfer::PassSummary> {
        let layout = self.layout(id);
        let to_base = berth_runtime::spec::machine_id_range(&layout).map_or(0, |range| range.base);
        let request = StreamRequest {
            grant: grant.to_owned(),
            to_base,
            after_pass,
            volume: None,
            snapshot: None,
        };
        let upper = layout.upper();
        self.receive_pass(
            id,
            source,
            request,
            "migrate.dest_mid_stream",
            move |input| transfer::import(&upper, input),
        )
        .await
    }

    /// Fetches one pass of a volume's image (or of its snapshot's, whole) into `to`.
    async fn copy_image(
        &self,
        id: &str,
        grant: &str,
        source: &MigrationPeer,
        image: ImageOf<'_>,
        to: std::path::PathBuf,
    ) -> Result<transfer::ImagePass> {
        let request = StreamRequest {
            grant: grant.to_owned(),
            to_base: 0,
            after_pass: image.after_pass.map(str::to_owned),
            volume: Some(image.volume.to_owned()),
            snapshot: image.snapshot.map(str::to_owned),
        };
        self.receive_pass(
            id,
            source,
            request,
            "migrate.dest_volume_mid_stream",
            move |input| transfer::import_image(&to, input),
        )
        .await
    }

    /// Asks the source for a pass and applies it with `apply` on a blocking thread.
    async fn receive_pass<T, F>(
        &self,
        id: &str,
        source: &MigrationPeer,
        request: StreamRequest,
        point: &'static str,
        apply: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(
                tokio_util::io::SyncIoBridge<tokio_util::io::StreamReader<MigrationStream, Bytes>>,
            ) -> std::result::Result<T, transfer::TransferError>
            + Send
            + 'static,
    {
        let stream = self
            .peer(source)?
            .migration_stream(id, request)
            .await
            .map_err(peer_error)?;
        let mut first = true;
        let stream: MigrationStream = Box::pin(futures::StreamExt::inspect(stream, move |_| {
            if std::mem::take(&mut first) {
                failpoint::hit(point);
            }
        }));
        let reader = tokio_util::io::StreamReader::new(stream);
        tokio::task::spawn_blocking(move || apply(tokio_util::io::SyncIoBridge::new(reader)))
            .await
            .map_err(|error| AgentError::Internal(format!("receive task: {error}")))?
            .map_err(transfer_error)
    }

    async fn migrate_receive(&self, request: MigrateIn) -> Result<MigrationAnswer> {
        let id = request.id.clone();
        let _guard = self.lock(&id).await?;
        let export: MachineExport = serde_json::from_value(request.export)
            .map_err(|error| AgentError::Internal(format!("decode the export: {error}")))?;
        if export.record.id != id {
            return Err(AgentError::Internal(
                "the export is of another machine".into(),
            ));
        }
        if let Some(existing) = self.inner.store.get(&id).await? {
            match &existing.pending {
                // A receive sent again (its answer was lost, or this agent died in it):
                // start over from a clean slate.
                Some(PendingOp::MigrateIn { grant, .. })
                    if grant_matches(grant, &request.grant) =>
                {
                    self.remove_arrival(&existing).await?;
                }
                _ => {
                    return Err(refuse(
                        409,
                        "migration_conflict",
                        format!("machine {id} already exists on this worker"),
                        None,
                    ))
                }
            }
        }
        for volume in &export.volumes {
            if self.inner.store.volume(&volume.id).await?.is_some() {
                return Err(refuse(
                    409,
                    "migration_conflict",
                    format!("volume {} already exists on this worker", volume.id),
                    None,
                ));
            }
        }
        // It keeps its driver: one this worker lacks is refused before anything is done.
        let driver = self.driver(&export.record.config)?.clone();
        self.inner.store.refill_reserve().await?;
        // The pinned image, by digest: the normal pull path, skipping layers held here.
        let pinned = format!(
            "{}@{}",
            export.record.image_ref.repository, export.record.image_ref.digest
        );
        let lease = self.inner.images.lease();
        let (image, _) = self.resolve_image(&pinned, &lease, &request.pull).await?;
        if image.manifest_digest != export.record.image_ref.digest {
            return Err(AgentError::Internal(format!(
                "the registry answered {} for {pinned}",
                image.manifest_digest
            )));
        }
        let source_record = export.record;
        let now = now_ms();
        // Never started stays so; anything else arrives stopped (commit boots it if it ran).
        let state = if source_record.state == MachineState::Created {
            MachineState::Created
        } else {
            MachineState::Stopped
        };
        let record = MachineRecord {
            region: self.inner.config.region.clone(),
            state,
            rootfs: self.rootfs_stack(&id, &image),
            updated_at_ms: now,
            run_generation: 0,
            pending: Some(PendingOp::MigrateIn {
                grant: request.grant.clone(),
                source: request.source.clone(),
                copied_pass: None,
            }),
            run_open: false,
            private_ip: self
                .inner
                .config
                .machine_prefix
                .as_ref()
                .and_then(|prefix| machine_address(prefix, &id)),
            restart_due_ms: None,
            ..source_record
        };
        let mut record = record;
        record
            .config
            .runtime
            .get_or_insert_with(|| self.inner.drivers.default_name().to_owned());
        let spec = self.machine_spec(&record, &record.config, &image)?;
        // Recorded before the host is touched, so a crash leaves a mark the control plane
        // rolls back through abort.
        self.inner.store.save(&record, None).await?;
        let received = async {
            self.inner.store.add_events(&id, &export.events).await?;
            self.inner.store.add_versions(&id, &export.versions).await?;
            driver.prepare(&self.layout(&id), &spec).await?;
            failpoint::hit("migrate.after_receive_prepare");
            let summary = self
                .copy_pass(&id, &request.grant, &request.source, None)
                .await?;
            let mut copied = self
                .stage_volumes(
                    &id,
                    Some(&record),
                    &request.grant,
                    &request.source,
                    &export.volumes,
                    &export.snapshots,
                )
                .await?;
            copied.add_tree(&summary);
            Ok::<_, AgentError>((summary, copied))
        }
        .await;
        let (summary, copied) = match received {
            Ok(received) => received,
            Err(error) => {
                if let Err(remove_error) = self.remove_arrival(&record).await {
                    warn!(machine = %id, %remove_error, "removing a failed arrival");
                }
                return Err(error);
            }
        };
        record.pending = Some(PendingOp::MigrateIn {
            grant: request.grant,
            source: request.source,
            copied_pass: Some(summary.digest.clone()),
        });
        self.inner.store.save(&record, None).await?;
        failpoint::hit("migrate.after_receive");
        drop(lease);
        Ok(copied.answer())
    }

    /// Removes the Machine from this worker (host and record), its run and storage billed
    /// here until `at_ms`, for a Machine that lives on another worker now.
    async fn remove_departed(
        &self,
        _guard: tokio::sync::OwnedMutexGuard<()>,
        mut record: MachineRecord,
        at_ms: i64,
    ) -> Result<()> {
        let id = record.id.clone();
        let layout = self.layout(&id);
        let driver = self.driver_or_default(&record.config).clone();
        if matches!(
            driver.status(&layout).await?,
            berth_runtime::Status::Running { .. }
        ) {
            let (signal, _) = Self::stop_parameters(&record, &berth_api::StopRequest::default())?;
            self.halt(&mut record, signal, std::time::Duration::ZERO)
                .await?;
        }
        driver.remove(&layout).await?;
        failpoint::hit("migrate.after_source_remove");
        self.remove_departed_volumes(&record, at_ms).await?;
        let mut usage = Vec::new();
        if let Some(close) = metering::close_run(&mut record, at_ms, CloseBasis::Observed) {
            usage.push(close);
        }
        let mut out = metering::created(&record);
        out.kind = berth_api::UsageKind::MigratedOut;
        out.at_ms = at_ms;
        usage.push(out);
        self.inner.store.delete_with_usage(&id, &usage).await?;
        self.forget_passes(&record);
        self.end_checks(&id);
        self.forget_schedule(&id);
        if let Ok(mut locks) = self.inner.locks.lock() {
            locks.remove(&id);
        }
        Ok(())
    }

    /// Removes an arrival that will not become this worker's Machine.
    async fn remove_arrival(&self, record: &MachineRecord) -> Result<()> {
        self.remove_arriving_volumes(record).await?;
        self.driver_or_default(&record.config)
            .remove(&self.layout(&record.id))
            .await?;
        self.inner.store.delete_rollback(&record.id).await
    }

    async fn migrate_sync(&self, id: &str, grant: &str) -> Result<MigrationAnswer> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let Some(PendingOp::MigrateIn {
            grant: held,
            source,
            copied_pass,
        }) = record.pending.clone()
        else {
            return Err(wrong_grant(id));
        };
        if !grant_matches(&held, grant) {
            return Err(wrong_grant(id));
        }
        let summary = self.copy_pass(id, grant, &source, copied_pass).await?;
        let mut copied = self.sync_volumes(&record, grant, &source).await?;
        copied.add_tree(&summary);
        record.pending = Some(PendingOp::MigrateIn {
            grant: held,
            source,
            copied_pass: Some(summary.digest.clone()),
        });
        self.inner.store.save(&record, None).await?;
        failpoint::hit("migrate.after_sync");
        Ok(copied.answer())
    }

    async fn migrate_halt(&self, id: &str, grant: &str) -> Result<MigrationAnswer> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let Some(PendingOp::MigrateOut {
            grant: held,
            to_worker,
            halted,
        }) = record.pending.clone()
        else {
            return Err(wrong_grant(id));
        };
        if !grant_matches(&held, grant) {
            return Err(wrong_grant(id));
        }
        if record.state == MachineState::Started {
            let (signal, timeout) =
                Self::stop_parameters(&record, &berth_api::StopRequest::default())?;
            record.enter(MachineState::Stopping, now_ms())?;
            self.inner.store.save(&record, None).await?;
            let exit = self.halt(&mut record, signal, timeout).await?;
            record.pending = Some(PendingOp::MigrateOut {
                grant: held,
                to_worker,
                halted: true,
            });
            self.record_stopped(
                &mut record,
                &exit,
                CloseBasis::Observed,
                (EventKind::Stop, EventSource::System),
                Some("migration"),
            )
            .await?;
            failpoint::hit("migrate.after_halt");
            return Ok(MigrationAnswer {
                at_ms: Some(exit.exited_at_ms),
                running: true,
                ..MigrationAnswer::default()
            });
        }
        Ok(MigrationAnswer {
            at_ms: Some(record.updated_at_ms),
            running: halted,
            ..MigrationAnswer::default()
        })
    }

    async fn migrate_commit(
        &self,
        id: &str,
        grant: &str,
        start: bool,
        from_address: Option<String>,
        cutover_ms: i64,
    ) -> Result<MigrationAnswer> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        match &record.pending {
            Some(PendingOp::MigrateIn { grant: held, .. }) if grant_matches(held, grant) => {}
            // Committed already: a commit sent again finds the Machine as it left it.
            None => {
                return Ok(MigrationAnswer {
                    machine: Some(self.api_view(&record)),
                    ..MigrationAnswer::default()
                })
            }
            Some(_) => return Err(wrong_grant(id)),
        }
        self.adopt_volumes(&record, cutover_ms).await?;
        record.pending = None;
        record.updated_at_ms = cutover_ms.max(record.updated_at_ms);
        let reason = format!(
            "moved to this worker ({}); private_ip {} -> {}",
            self.inner.config.name,
            from_address.as_deref().unwrap_or("none"),
            record
                .private_ip
                .map_or_else(|| "none".to_owned(), |address| address.to_string())
        );
        let usage = [{
            let mut created = metering::created(&record);
            created.at_ms = cutover_ms;
            created.storage_bytes = record.storage_bytes;
            created
        }];
        let change = Change::event(EventKind::Migrate, EventSource::System)
            .reason(&reason)
            .usage(&usage);
        self.save_in_state(&record, change).await?;
        failpoint::hit("migrate.after_commit");
        info!(machine = %id, "moved here");
        let mut answer = MigrationAnswer::default();
        if start {
            self.boot(&mut record, EventSource::System).await?;
            answer.at_ms = Some(now_ms());
        }
        answer.machine = Some(self.api_view(&record));
        Ok(answer)
    }

    /// Removes this worker's copy of a Machine that lives elsewhere, ending its billing
    /// here as a move does.
    async fn forget_copy(&self, id: &str) -> Result<MigrationAnswer> {
        let guard = self.lock(id).await?;
        let Some(record) = self.inner.store.get(id).await? else {
            return Ok(MigrationAnswer::default());
        };
        self.remove_departed(guard, record, now_ms()).await?;
        info!(machine = %id, "removed a copy that lives on another worker");
        Ok(MigrationAnswer::default())
    }

    async fn migrate_finish(
        &self,
        id: &str,
        grant: &str,
        cutover_ms: i64,
    ) -> Result<MigrationAnswer> {
        let guard = self.lock(id).await?;
        let Some(record) = self.inner.store.get(id).await? else {
            return Ok(MigrationAnswer::default());
        };
        match &record.pending {
            Some(PendingOp::MigrateOut { grant: held, .. }) if grant_matches(held, grant) => {}
            _ => return Err(wrong_grant(id)),
        }
        self.remove_departed(guard, record, cutover_ms).await?;
        info!(machine = %id, "moved away");
        Ok(MigrationAnswer::default())
    }

    async fn migrate_abort(&self, id: &str, grant: &str) -> Result<MigrationAnswer> {
        let _guard = self.lock(id).await?;
        let Some(mut record) = self.inner.store.get(id).await? else {
            return Ok(MigrationAnswer::default());
        };
        match record.pending.clone() {
            Some(PendingOp::MigrateIn { grant: held, .. }) if grant_matches(&held, grant) => {
                self.remove_arrival(&record).await?;
                info!(machine = %id, "arrival rolled back");
                Ok(MigrationAnswer::default())
            }
            Some(PendingOp::MigrateOut {
                grant: held,
                halted,
                ..
            }) if grant_matches(&held, grant) => {
                self.keep_volumes(&record).await?;
                record.pending = None;
                self.inner.store.save(&record, None).await?;
                self.forget_passes(&record);
                let mut answer = MigrationAnswer::default();
                if halted && record.state == MachineState::Stopped {
                    self.boot(&mut record, EventSource::System).await?;
                    answer.running = true;
                }
                answer.machine = Some(self.api_view(&record));
                info!(machine = %id, "departure rolled back");
                Ok(answer)
            }
            // Not this migration's: an abort sent again after the outcome, or a stale one.
            _ => Ok(MigrationAnswer::default()),
        }
    }
}

/// A move's volumes: on the source, marked leaving and later removed or mounted again; on
/// the destination, staged (never mounted), then mounted at commit or removed at abort.
impl Agent {
    /// Begin: marks each volume the Machine mounts as leaving; answers their records and
    /// snapshots for the destination.
    async fn mark_volumes_leaving(
        &self,
        record: &MachineRecord,
    ) -> Result<(Vec<VolumeRecord>, Vec<SnapshotRecord>)> {
        let (mut volumes, mut snapshots) = (Vec::new(), Vec::new());
        for mount in &record.config.mounts {
            let _guard = self.lock(&mount.volume).await?;
            let mut volume = self
                .inner
                .store
                .volume(&mount.volume)
                .await?
                .filter(|volume| volume.attached_machine.as_deref() == Some(record.id.as_str()))
                .ok_or_else(|| crate::volumes::not_found(&mount.volume))?;
            match volume.pending {
                Some(VolumePending::MigrateOut) => {}
                None => {
                    volume.pending = Some(VolumePending::MigrateOut);
                    self.inner.store.save_volume(&volume).await?;
                }
                // An extend or delete of it has not finished.
                Some(_) => return Err(AgentError::Busy { id: volume.id }),
            }
            snapshots.extend(self.inner.store.snapshots_of(&volume.id).await?);
            volumes.push(volume);
        }
        Ok((volumes, snapshots))
    }

    /// The Machine's volumes on this worker that are in `pending` for it.
    async fn volumes_in(
        &self,
        record: &MachineRecord,
        pending: Option<VolumePending>,
    ) -> Result<Vec<VolumeRecord>> {
        let mut found = Vec::new();
        for mount in &record.config.mounts {
            if let Some(volume) = self.inner.store.volume(&mount.volume).await? {
                if volume.attached_machine.as_deref() == Some(record.id.as_str())
                    && (pending.is_none() || volume.pending == pending)
                {
                    found.push(volume);
                }
            }
        }
        Ok(found)
    }

    /// Receive: records each volume as arriving, then copies its image and snapshots.
    ///
    /// `owner` is what the move is keyed by: the Machine that holds the volumes, or a
    /// volume moving on its own (then `holder` is None and the volume keeps the grant).
    async fn stage_volumes(
        &self,
        owner: &str,
        holder: Option<&MachineRecord>,
        grant: &str,
        source: &MigrationPeer,
        volumes: &[VolumeRecord],
        snapshots: &[SnapshotRecord],
    ) -> Result<Copied> {
        let mut copied = Copied::default();
        for volume in volumes {
            let mut staged = VolumeRecord {
                // A volume lives in its worker's region, as its Machine now does.
                region: self.inner.config.region.clone(),
                attached_machine: holder.map(|record| record.id.clone()),
                pending: Some(VolumePending::MigrateIn),
                copied_pass: None,
                move_grant: holder.is_none().then(|| grant.to_owned()),
                ..volume.clone()
            };
            // Recorded before its directory exists, so abort finds whatever was made.
            self.inner.store.save_volume(&staged).await?;
            let layout = self.volume_layout(&staged.id);
            let snapshot_dir = self.snapshots_dir(&staged.id);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&snapshot_dir)
                .map_err(|error| {
                    AgentError::Internal(format!("create {}: {error}", snapshot_dir.display()))
                })?;
            let image = ImageOf {
                volume: &staged.id,
                snapshot: None,
                after_pass: None,
            };
            let pass = self
                .copy_image(owner, grant, source, image, layout.image())
                .await?;
            copied.add_image(&pass);
            staged.copied_pass = Some(pass.digest);
            self.inner.store.save_volume(&staged).await?;
            for snapshot in snapshots.iter().filter(|s| s.volume_id == staged.id) {
                let path = snapshot_dir.join(format!("{}.img", snapshot.id));
                let image = ImageOf {
                    volume: &staged.id,
                    snapshot: Some(&snapshot.id),
                    after_pass: None,
                };
                let pass = self
                    .copy_image(owner, grant, source, image, path.clone())
                    .await?;
                copied.add_image(&pass);
                self.inner
                    .store
                    .save_snapshot(&SnapshotRecord {
                        path,
                        ..snapshot.clone()
                    })
                    .await?;
            }
        }
        Ok(copied)
    }

    /// Sync: each arriving volume's chunks that changed since its last pass.
    async fn sync_volumes(
        &self,
        record: &MachineRecord,
        grant: &str,
        source: &MigrationPeer,
    ) -> Result<Copied> {
        let mut copied = Copied::default();
        for mut volume in self
            .volumes_in(record, Some(VolumePending::MigrateIn))
            .await?
        {
            let image = ImageOf {
                volume: &volume.id,
                snapshot: None,
                after_pass: volume.copied_pass.as_deref(),
            };
            let to = self.volume_layout(&volume.id).image();
            let pass = self
                .copy_image(&record.id, grant, source, image, to)
                .await?;
            copied.add_image(&pass);
            volume.copied_pass = Some(pass.digest);
            self.inner.store.save_volume(&volume).await?;
        }
        Ok(copied)
    }

    /// Commit: each arriving volume mounted, and billed here from the cutover. Before the
    /// Machine's commit, which a commit sent again skips.
    async fn adopt_volumes(&self, record: &MachineRecord, cutover_ms: i64) -> Result<()> {
        for mut volume in self
            .volumes_in(record, Some(VolumePending::MigrateIn))
            .await?
        {
            let _guard = self.lock(&volume.id).await?;
            self.adopt_volume(&mut volume, cutover_ms).await?;
        }
        failpoint::hit("migrate.after_commit_volumes");
        Ok(())
    }

    /// Commit of one arrived volume, under its lock: mounted (an encrypted one with the
    /// key its record came with), no longer pending, and billed here from the cutover.
    async fn adopt_volume(&self, volume: &mut VolumeRecord, cutover_ms: i64) -> Result<()> {
        self.host_driver()
            .volume_mount(&self.keyed_layout(volume))
            .await?;
        volume.pending = None;
        volume.copied_pass = None;
        volume.move_grant = None;
        let usage = metering::volume_created(volume, cutover_ms);
        self.inner
            .store
            .save_volume_with_usage(volume, &[usage])
            .await
    }

    /// Finish (and forget): the Machine's volumes here removed, their billing here ended
    /// at `at_ms`.
    async fn remove_departed_volumes(&self, record: &MachineRecord, at_ms: i64) -> Result<()> {
        for volume in self.volumes_in(record, None).await? {
            let _guard = self.lock(&volume.id).await?;
            self.host_driver()
                .volume_remove(&self.volume_layout(&volume.id))
                .await?;
            let usage = metering::volume_migrated_out(&volume, at_ms);
            self.inner
                .store
                .delete_volume_with_usage(&volume.id, &[usage])
                .await?;
            info!(machine = %record.id, volume = %volume.id, "volume moved away");
        }
        failpoint::hit("migrate.after_source_volume_remove");
        Ok(())
    }

    /// Abort on the destination: the arriving volumes removed (never billed here).
    async fn remove_arriving_volumes(&self, record: &MachineRecord) -> Result<()> {
        for volume in self
            .volumes_in(record, Some(VolumePending::MigrateIn))
            .await?
        {
            let _guard = self.lock(&volume.id).await?;
            self.host_driver()
                .volume_remove(&self.volume_layout(&volume.id))
                .await?;
            self.inner.store.delete_volume(&volume.id).await?;
        }
        Ok(())
    }

    /// Abort on the source: each leaving volume mounted again and unmarked, before the
    /// Machine's mark goes (so a Machine free to start has its volumes).
    async fn keep_volumes(&self, record: &MachineRecord) -> Result<()> {
        for mut volume in self
            .volumes_in(record, Some(VolumePending::MigrateOut))
            .await?
        {
            let _guard = self.lock(&volume.id).await?;
            self.host_driver()
                .volume_mount(&self.keyed_layout(&volume))
                .await?;
            volume.pending = None;
            self.inner.store.save_volume(&volume).await?;
        }
        Ok(())
    }
}

/// What the source of a volume moving on its own hands the destination.
#[derive(Debug, Serialize, Deserialize)]
struct VolumeExport {
    volume: VolumeRecord,
    snapshots: Vec<SnapshotRecord>,
}

/// The volume a step names, when it is a volume moving on its own (no Machine holds it):
/// the same steps as a Machine's move, keyed by the volume's id.
fn lone_volume(step: &MigrationStep) -> Option<String> {
    let id = match step {
        MigrationStep::Begin { id, .. }
        | MigrationStep::Commit { id, .. }
        | MigrationStep::Finish { id, .. }
        | MigrationStep::Abort { id, .. } => id,
        MigrationStep::Receive(request) => &request.id,
        _ => return None,
    };
    berth_core::ids::has_id_shape(id, "vol_").then(|| id.clone())
}

/// A volume no Machine holds, moving on its own (a drain empties a worker of them too).
/// Its record keeps the grant; there is one pass, of a still image (nothing writes it),
/// and its snapshots. The steps and their records are a Machine's volume's:
///
/// | step | side | what it records |
/// | --- | --- | --- |
/// | begin | source | `pending: migrate_out` and the grant; the volume unmounted |
/// | receive | destination | `migrate_in` and the grant before its directory; the image and snapshots |
/// | commit | destination | mounted, `created` in the journal at the cutover |
/// | finish | source | removed, `migrated_out` at the cutover |
/// | abort | either | destination: removed; source: mounted again, unmarked |
impl Agent {
    async fn lone_volume_step(&self, id: &str, step: MigrationStep) -> Result<MigrationAnswer> {
        let _guard = self.lock(id).await?;
        let found = self.inner.store.volume(id).await?;
        let held = |grant: &str| {
            found.as_ref().is_some_and(|volume| {
                volume
                    .move_grant
                    .as_deref()
                    .is_some_and(|held| grant_matches(held, grant))
            })
        };
        let pending = found.as_ref().and_then(|volume| volume.pending);
        match step {
            MigrationStep::Begin { grant, .. } => {
                let ours = held(&grant);
                let mut volume = found.ok_or_else(|| crate::volumes::not_found(id))?;
                if let Some(machine) = &volume.attached_machine {
                    // It moves with its Machine.
                    return Err(crate::volumes::attached(id, machine));
                }
                match volume.pending {
                    Some(VolumePending::MigrateOut) if ours => {}
                    None => {
                        volume.pending = Some(VolumePending::MigrateOut);
                        volume.move_grant = Some(grant);
                        self.inner.store.save_volume(&volume).await?;
                    }
                    Some(VolumePending::MigrateOut | VolumePending::MigrateIn) => {
                        crate::volumes::refuse_if_moving(&volume)?
                    }
                    Some(_) => return Err(AgentError::Busy { id: id.to_owned() }),
                }
                failpoint::hit("migrate.after_begin");
                let export = VolumeExport {
                    snapshots: self.inner.store.snapshots_of(id).await?,
                    volume,
                };
                let export = serde_json::to_value(&export)
                    .map_err(|error| AgentError::Internal(format!("encode the export: {error}")))?;
                Ok(MigrationAnswer {
                    export: Some(export),
                    ..MigrationAnswer::default()
                })
            }
            MigrationStep::Receive(request) => {
                let export: VolumeExport = serde_json::from_value(request.export)
                    .map_err(|error| AgentError::Internal(format!("decode the export: {error}")))?;
                if export.volume.id != id || export.volume.attached_machine.is_some() {
                    return Err(AgentError::Internal(
                        "the export is of another volume".into(),
                    ));
                }
                let ours = held(&request.grant);
                if let Some(existing) = found {
                    if existing.pending != Some(VolumePending::MigrateIn) || !ours {
                        return Err(refuse(
                            409,
                            "migration_conflict",
                            format!("volume {id} already exists on this worker"),
                            None,
                        ));
                    }
                    // A receive sent again: start over from a clean slate.
                    self.remove_lone_arrival(&existing).await?;
                }
                let staged = self
                    .stage_volumes(
                        id,
                        None,
                        &request.grant,
                        &request.source,
                        std::slice::from_ref(&export.volume),
                        &export.snapshots,
                    )
                    .await;
                let copied = match staged {
                    Ok(copied) => copied,
                    Err(error) => {
                        if let Some(arrived) = self.inner.store.volume(id).await? {
                            if let Err(remove_error) = self.remove_lone_arrival(&arrived).await {
                                warn!(volume = %id, %remove_error, "removing a failed arrival");
                            }
                        }
                        return Err(error);
                    }
                };
                failpoint::hit("migrate.after_receive");
                Ok(copied.answer())
            }
            MigrationStep::Commit {
                grant, cutover_ms, ..
            } => {
                let ours = held(&grant);
                match (found, pending) {
                    (Some(mut volume), Some(VolumePending::MigrateIn)) if ours => {
                        self.adopt_volume(&mut volume, cutover_ms).await?;
                        failpoint::hit("migrate.after_commit_volumes");
                        info!(volume = %id, "volume moved here");
                        Ok(MigrationAnswer::default())
                    }
                    // Committed already: a commit sent again.
                    (Some(volume), None) if volume.move_grant.is_none() => {
                        Ok(MigrationAnswer::default())
                    }
                    _ => Err(wrong_grant(id)),
                }
            }
            MigrationStep::Finish {
                grant, cutover_ms, ..
            } => match (held(&grant), found, pending) {
                // Finished already.
                (_, None, _) => Ok(MigrationAnswer::default()),
                (true, Some(volume), Some(VolumePending::MigrateOut)) => {
                    self.host_driver()
                        .volume_remove(&self.volume_layout(id))
                        .await?;
                    failpoint::hit("migrate.after_source_volume_remove");
                    let usage = metering::volume_migrated_out(&volume, cutover_ms);
                    self.inner
                        .store
                        .delete_volume_with_usage(id, &[usage])
                        .await?;
                    self.forget_image_passes(id);
                    info!(volume = %id, "volume moved away");
                    Ok(MigrationAnswer::default())
                }
                _ => Err(wrong_grant(id)),
            },
            MigrationStep::Abort { grant, .. } => match (held(&grant), found, pending) {
                (true, Some(volume), Some(VolumePending::MigrateIn)) => {
                    self.remove_lone_arrival(&volume).await?;
                    info!(volume = %id, "arrival rolled back");
                    Ok(MigrationAnswer::default())
                }
                (true, Some(mut volume), Some(VolumePending::MigrateOut)) => {
                    self.host_driver()
                        .volume_mount(&self.keyed_layout(&volume))
                        .await?;
                    volume.pending = None;
                    volume.move_grant = None;
                    self.inner.store.save_volume(&volume).await?;
                    self.forget_image_passes(id);
                    info!(volume = %id, "departure rolled back");
                    Ok(MigrationAnswer::default())
                }
                // Not this move's: an abort sent again after the outcome, or a stale one.
                _ => Ok(MigrationAnswer::default()),
            },
            _ => Err(wrong_grant(id)),
        }
    }

    /// The one pass of a volume moving on its own, or of one of its snapshots, for the
    /// holder of its grant.
    async fn lone_volume_stream(
        &self,
        id: &str,
        request: StreamRequest,
    ) -> Result<MigrationStream> {
        let leaving = self.inner.store.volume(id).await?.is_some_and(|volume| {
            volume.pending == Some(VolumePending::MigrateOut)
                && volume.attached_machine.is_none()
                && volume
                    .move_grant
                    .as_deref()
                    .is_some_and(|held| grant_matches(held, &request.grant))
        });
        if !leaving || request.volume.as_deref() != Some(id) {
            return Err(wrong_grant(id));
        }
        self.send_image(id, id, format!("volume {id}"), request, true)
            .await
    }

    /// Abort of an arriving volume (or a receive begun again): its files and record go.
    async fn remove_lone_arrival(&self, volume: &VolumeRecord) -> Result<()> {
        self.host_driver()
            .volume_remove(&self.volume_layout(&volume.id))
            .await?;
        self.inner.store.delete_volume(&volume.id).await
    }

    fn forget_image_passes(&self, volume: &str) {
        if let Ok(mut sent) = self.inner.sent_images.lock() {
            sent.remove(volume);
        }
    }
}

/// What a step's passes moved.
#[derive(Debug, Default)]
struct Copied {
    entries: u64,
    file_bytes: u64,
    stream_bytes: u64,
}

impl Copied {
    fn add_image(&mut self, pass: &transfer::ImagePass) {
        self.entries += pass.chunks;
        self.file_bytes += pass.data_bytes;
        self.stream_bytes += pass.stream_bytes;
    }

    fn add_tree(&mut self, pass: &transfer::PassSummary) {
        self.entries += pass.entries;
        self.file_bytes += pass.file_bytes;
        self.stream_bytes += pass.stream_bytes;
    }

    fn answer(&self) -> MigrationAnswer {
        MigrationAnswer {
            entries: self.entries,
            file_bytes: self.file_bytes,
            stream_bytes: self.stream_bytes,
            ..MigrationAnswer::default()
        }
    }
}
