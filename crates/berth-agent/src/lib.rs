//! The per-worker daemon, like flyd: it owns the Machines on its host.
//!
//! Every operation is a short sequence of durable steps. The record in [`store`] is written
//! before the host is touched, and again when the host has done its part, so that an agent
//! killed at any moment can finish or undo what it was doing ([`Agent::open`] runs
//! recovery before serving). Operations on one Machine are serialized by a per-Machine
//! lock; different Machines never wait for each other.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, RwLock as StdRwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_api::{
    CloseBasis, ExitInfo, ImageRef, Machine, MachineState, Resources, StartStopResponse,
    StepTiming, StopRequest, UpdateMachineRequest, UsageRecord, WorkerStats,
};
use berth_core::restart::{self, RestartDecision};
use berth_core::state::{self, Action, ActionPlan};
use berth_core::validate;
use berth_image::{
    ImagePuller, ImageStore, Lease, PullEvent, PullScope, PullStatus, ResolvedImage,
};
use berth_runtime::timing::{micros, StepTimes};
use berth_runtime::{ExitRecord, MachineLayout, Runtime, Status};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tracing::{info, warn};

pub mod bundle;
pub mod doctor;
pub mod error;
pub mod failpoint;
pub mod http;
pub mod metering;
pub mod record;
mod robots;
pub mod store;

use berth_worker::Result as WorkerResult;
/// The interface to a worker lives in `berth-worker`; these keep its old paths.
pub use berth_worker::{remote, service, WorkerError};
pub use error::{AgentError, Result};
pub use service::{
    CreateOnWorker, EventSource, ExecOnWorker, ImageUsage, LogChunk, MachineNotice, NoticeSnapshot,
    UpdateOnWorker, WorkerListener, WorkerService,
};

use record::{now_ms, LayerRef, MachineRecord, PendingOp, RootfsStack, UpdateSnapshot};
use store::{AgentStore, MachineEvent};

/// How long an operation waits for another one on the same Machine before answering
/// "busy" (robots retry; they should not hang).
const LOCK_WAIT: Duration = Duration::from_secs(60);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGKILL, how long to wait for the kernel to tear the process down.
const KILL_WAIT: Duration = Duration::from_secs(10);
const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
/// Storage is measured at least this often (and at every stop).
const STORAGE_SAMPLE_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Holds `agent.db` and `machines/`.
    pub data_dir: PathBuf,
    /// The worker's name in the cluster.
    pub name: String,
    pub region: String,
    pub pids_limit: i64,
    /// What this host offers to Machines. Start refuses to run past it.
    pub capacity: Resources,
    /// The worker's /64 for Machine addresses; `None` gives Machines loopback only.
    pub machine_prefix: Option<berth_runtime::network::Ipv6Net>,
}

/// A Machine's address: its worker's /64 with the Machine id as the interface part, so
/// addresses never collide and need no allocation table. The leading 0x01 keeps it clear
/// of the gateway (::1).
pub fn machine_address(
    prefix: &berth_runtime::network::Ipv6Net,
    machine_id: &str,
) -> Option<std::net::Ipv6Addr> {
    let id = u64::from_str_radix(machine_id, 16).ok()? & 0x00ff_ffff_ffff_ffff;
    let network = u128::from(prefix.network());
    Some(std::net::Ipv6Addr::from(
        network | u128::from(0x0100_0000_0000_0000 | id),
    ))
}

pub use berth_core::placement::{machine_disk_mb, MACHINE_DISK_MB};

#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    config: AgentConfig,
    store: AgentStore,
    runtime: Arc<dyn Runtime>,
    images: Arc<ImageStore>,
    puller: Arc<ImagePuller>,
    machines_root: PathBuf,
    locks: StdMutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// CPUs and memory of every Machine that runs (or is being started), by id. Start
    /// reserves here before it boots, so concurrent starts cannot overcommit the host.
    running: StdMutex<HashMap<String, (u32, u64)>>,
    listener: StdRwLock<Option<Arc<dyn WorkerListener>>>,
    /// Machines whose disk was full when last looked at, so each filling is told once.
    disk_full: StdMutex<std::collections::HashSet<String>>,
}

impl Agent {
    /// Opens the local store, reconciles every Machine with the host, and resumes watching
    /// the running ones.
    pub async fn open(
        config: AgentConfig,
        runtime: Arc<dyn Runtime>,
        images: Arc<ImageStore>,
    ) -> Result<Agent> {
        let puller = Arc::new(ImagePuller::new(images, Default::default()));
        Agent::open_with_puller(config, runtime, puller).await
    }

    /// [`Agent::open`] with a puller that knows the registries (credentials, insecure
    /// hosts, a default registry). Share the puller with whatever else pulls, so one blob
    /// is downloaded once.
    pub async fn open_with_puller(
        config: AgentConfig,
        runtime: Arc<dyn Runtime>,
        puller: Arc<ImagePuller>,
    ) -> Result<Agent> {
        let images = puller.store().clone();
        let machines_root = config.data_dir.join("machines");
        std::fs::create_dir_all(&machines_root).map_err(|error| {
            AgentError::Internal(format!("create {}: {error}", machines_root.display()))
        })?;
        let store = AgentStore::open(&config.data_dir.join("agent.db")).await?;
        let agent = Agent {
            inner: Arc::new(Inner {
                config,
                store,
                runtime,
                images,
                puller,
                machines_root,
                locks: StdMutex::new(HashMap::new()),
                running: StdMutex::new(HashMap::new()),
                listener: StdRwLock::new(None),
                disk_full: StdMutex::new(std::collections::HashSet::new()),
            }),
        };
        agent.recover().await?;
        agent.rebuild_running().await?;
        agent.spawn_meter();
        Ok(agent)
    }

    /// Background metering: a liveness record every few seconds (the best-known time of a
    /// death nobody saw) and a storage measurement of every Machine each minute.
    fn spawn_meter(&self) {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
            let mut storage = tokio::time::interval(STORAGE_SAMPLE_INTERVAL);
            loop {
                tokio::select! {
                    _ = liveness.tick() => {
                        if let Err(error) = agent.inner.store.record_liveness(now_ms()).await {
                            warn!(%error, "recording liveness");
                        }
                    }
                    _ = storage.tick() => agent.sample_storage().await,
                }
            }
        });
    }

    /// Measures every Machine's upperdir and journals the sizes that changed.
    pub async fn sample_storage(&self) {
        let records = match self.inner.store.list_all().await {
            Ok(records) => records,
            Err(error) => {
                warn!(%error, "listing machines for storage sampling");
                return;
            }
        };
        for record in records {
            self.check_disk_quota(&record).await;
            let Some(bytes) = self.measure_upper(&record.id).await else {
                continue;
            };
            if bytes == record.storage_bytes {
                continue;
            }
            let result = async {
                let _guard = self.lock(&record.id).await?;
                // Measured outside the lock; the record may have changed meanwhile.
                let Some(mut current) = self.inner.store.get(&record.id).await? else {
                    return Ok(());
                };
                if current.pending.is_some() || current.state == MachineState::Destroying {
                    return Ok(());
                }
                let usage = metering::storage(&mut current, now_ms(), bytes);
                self.inner
                    .store
                    .save_with_usage(&current, None, &[usage])
                    .await
            }
            .await;
            if let Err(error) = result {
                warn!(machine = %record.id, %error, "journaling a storage measurement");
            }
        }
    }

    async fn rebuild_running(&self) -> Result<()> {
        let records = self.inner.store.list_all().await?;
        let mut running = self.running_table()?;
        running.clear();
        for record in records
            .iter()
            .filter(|record| record.state == MachineState::Started)
        {
            running.insert(
                record.id.clone(),
                (
                    record.config.guest.cpus,
                    u64::from(record.config.guest.memory_mb),
                ),
            );
        }
        Ok(())
    }

    fn running_table(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, (u32, u64)>>> {
        self.inner
            .running
            .lock()
            .map_err(|_| AgentError::Internal("running table poisoned".into()))
    }

    /// Reserves the Machine's CPUs and memory on this host, or says what is missing.
    fn reserve(&self, record: &MachineRecord) -> Result<()> {
        let capacity = self.inner.config.capacity;
        let mut running = self.running_table()?;
        let (used_cpus, used_memory) = running
            .iter()
            .filter(|(id, _)| **id != record.id)
            .fold((0u32, 0u64), |(cpus, memory), (_, (c, m))| {
                (cpus + c, memory + m)
            });
        let want_cpus = record.config.guest.cpus;
        let want_memory = u64::from(record.config.guest.memory_mb);
        let mut missing = Vec::new();
        let mut resources = Vec::new();
        if used_cpus + want_cpus > capacity.cpus {
            resources.push("cpus".to_owned());
            missing.push(format!(
                "{} CPUs (free {})",
                want_cpus,
                capacity.cpus.saturating_sub(used_cpus)
            ));
        }
        if used_memory + want_memory > capacity.memory_mb {
            resources.push("memory_mb".to_owned());
            missing.push(format!(
                "{want_memory} MB of memory (free {} MB)",
                capacity.memory_mb.saturating_sub(used_memory)
            ));
        }
        if !missing.is_empty() {
            return Err(AgentError::InsufficientCapacity {
                worker: self.inner.config.name.clone(),
                missing: missing.join(" and "),
                resources,
            });
        }
        running.insert(record.id.clone(), (want_cpus, want_memory));
        Ok(())
    }

    fn release(&self, id: &str) {
        if let Ok(mut running) = self.inner.running.lock() {
            running.remove(id);
        }
    }

    /// What the heartbeat reports.
    pub async fn stats(&self) -> Result<WorkerStats> {
        let machines = self.inner.store.count().await?;
        let disk_mb = self.inner.store.disk_mb(MACHINE_DISK_MB).await?;
        let running = self.running_table()?;
        let (cpus, memory_mb) = running
            .values()
            .fold((0u32, 0u64), |(cpus, memory), (c, m)| {
                (cpus + c, memory + m)
            });
        Ok(WorkerStats {
            used: Resources {
                cpus,
                memory_mb,
                disk_mb,
            },
            machines,
            running: running.len() as u64,
        })
    }

    pub fn store(&self) -> &AgentStore {
        &self.inner.store
    }

    pub fn layout(&self, id: &str) -> MachineLayout {
        MachineLayout::new(&self.inner.machines_root, id)
    }

    pub async fn events(&self, id: &str) -> Result<Vec<MachineEvent>> {
        self.inner.store.events(id).await
    }

    async fn lock(&self, id: &str) -> Result<OwnedMutexGuard<()>> {
        self.lock_within(id, LOCK_WAIT).await
    }

    /// Takes a Machine's lock, or answers busy after `wait`.
    async fn lock_within(&self, id: &str, wait: Duration) -> Result<OwnedMutexGuard<()>> {
        tokio::time::timeout(wait, self.lock_of(id)?.lock_owned())
            .await
            .map_err(|_| AgentError::Busy { id: id.to_owned() })
    }

    /// The Machine's lock itself, made on first use.
    fn lock_of(&self, id: &str) -> Result<Arc<AsyncMutex<()>>> {
        let mut locks = self
            .inner
            .locks
            .lock()
            .map_err(|_| AgentError::Internal("lock table poisoned".into()))?;
        Ok(locks.entry(id.to_owned()).or_default().clone())
    }

    /// Whether an operation on `id` holds its lock right now.
    fn operation_running(&self, id: &str) -> bool {
        self.inner
            .locks
            .lock()
            .ok()
            .and_then(|locks| locks.get(id).map(|lock| lock.try_lock().is_err()))
            .unwrap_or(false)
    }

    async fn load(&self, id: &str) -> Result<MachineRecord> {
        self.inner
            .store
            .get(id)
            .await?
            .ok_or_else(|| AgentError::NotFound(id.to_owned()))
    }

    /// Resolves an image for create or update, pulling it when it names a registry. The
    /// lease keeps its layers from garbage collection until the caller has recorded the
    /// Machine; the returned events are the pull's milestones, for the Machine's history.
    async fn resolve_image(
        &self,
        name: &str,
        lease: &Lease,
        scope: &PullScope,
    ) -> Result<(ResolvedImage, Vec<MachineEvent>)> {
        let milestones = Arc::new(StdMutex::new(Vec::new()));
        let sink = milestones.clone();
        let progress: berth_image::Progress = Arc::new(move |event: PullEvent| {
            if let Some(reason) = pull_milestone(&event) {
                if let Ok(mut list) = sink.lock() {
                    list.push((reason, now_ms()));
                }
            }
        });
        let image = self
            .inner
            .puller
            .resolve_scoped(name, lease, progress, scope)
            .await?;
        let events = milestones
            .lock()
            .map(|list| list.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, at_ms)| MachineEvent {
                kind: "pull".to_owned(),
                source: EventSource::System.as_str().to_owned(),
                state: MachineState::Created.as_str().to_owned(),
                exit_code: None,
                reason: Some(reason),
                at_ms,
            })
            .collect();
        Ok((image, events))
    }

    /// The puller that create and update use.
    pub fn puller(&self) -> &Arc<ImagePuller> {
        &self.inner.puller
    }

    fn image_ref(image: &ResolvedImage) -> ImageRef {
        ImageRef {
            name: image.reference.name(),
            repository: match &image.reference.registry {
                Some(registry) => format!("{registry}/{}", image.reference.repository),
                None => image.reference.repository.clone(),
            },
            tag: image.reference.tag.clone(),
            digest: image.manifest_digest.clone(),
        }
    }

    fn rootfs_stack(&self, id: &str, image: &ResolvedImage) -> RootfsStack {
        RootfsStack {
            image_layers: image
                .layer_digests
                .iter()
                .zip(&image.layer_dirs)
                .map(|(digest, dir)| LayerRef {
                    digest: digest.clone(),
                    dir: dir.clone(),
                })
                .collect(),
            frozen_layers: Vec::new(),
            upper: self.layout(id).upper(),
        }
    }

    async fn save_event(
        &self,
        record: &MachineRecord,
        kind: &str,
        source: EventSource,
        reason: Option<&str>,
    ) -> Result<()> {
        self.save_transition(record, kind, source, reason, &[])
            .await
    }

    /// Saves a state change with its event and its usage journal entries, atomically.
    async fn save_transition(
        &self,
        record: &MachineRecord,
        kind: &str,
        source: EventSource,
        reason: Option<&str>,
        usage: &[UsageRecord],
    ) -> Result<()> {
        let event = MachineEvent {
            kind: kind.to_owned(),
            source: source.as_str().to_owned(),
            state: record.state.as_str().to_owned(),
            exit_code: record.last_exit.as_ref().and_then(|exit| exit.exit_code),
            reason: reason.map(str::to_owned),
            at_ms: record.updated_at_ms,
        };
        let event_id = self
            .inner
            .store
            .save_full(record, Some(&event), usage)
            .await?;
        self.release_unless_running(record);
        self.notify(record, &event, event_id);
        Ok(())
    }

    /// A Machine that no longer runs gives its CPUs and memory back.
    fn release_unless_running(&self, record: &MachineRecord) {
        if !matches!(record.state, MachineState::Starting | MachineState::Started) {
            self.release(&record.id);
        }
    }

    async fn set_state(&self, record: &mut MachineRecord, state: MachineState) -> Result<()> {
        debug_assert!(
            state::can_transition(record.state, state),
            "{} -> {state}",
            record.state
        );
        record.state = state;
        record.updated_at_ms = now_ms();
        self.inner.store.save(record, None).await?;
        self.release_unless_running(record);
        Ok(())
    }

    /// Boots a Machine whose lock the caller holds. Only runtime work: the rootfs stack and
    /// the bundle were laid out at create.
    /// Starts the Machine's init; returns where the time went.
    async fn boot(&self, record: &mut MachineRecord, source: EventSource) -> Result<StepTimes> {
        let mut steps = StepTimes::new();
        let mut mark = Instant::now();
        self.reserve(record)?;
        record.run_generation += 1;
        record.restart_due_ms = None;
        self.set_state(record, MachineState::Starting).await?;
        steps.lap("agent_store_starting", &mut mark);
        failpoint::hit("start.after_starting");
        let layout = self.layout(&record.id);
        match self
            .inner
            .runtime
            .start(&layout, &record.rootfs.lowerdirs())
            .await
        {
            Ok(started) => {
                let runtime_us = micros(mark.elapsed());
                let inside_us = started.steps.total_us();
                steps.append(started.steps);
                // Hops to blocking threads and back, inside the runtime's start.
                steps.record("runtime_other", runtime_us.saturating_sub(inside_us));
                mark = Instant::now();
                failpoint::hit("start.after_runtime_start");
                record.state = MachineState::Started;
                record.updated_at_ms = started.started_at_ms;
                let usage = metering::open_run(record, started.started_at_ms);
                self.save_transition(record, "start", source, None, &[usage])
                    .await?;
                steps.lap("agent_store_started", &mut mark);
                failpoint::hit("start.after_record_started");
                self.watch(record.id.clone(), record.run_generation);
                Ok(steps)
            }
            Err(error) => {
                self.release(&record.id);
                if let Err(cleanup_error) = self.inner.runtime.cleanup(&layout).await {
                    warn!(machine = %record.id, %cleanup_error, "cleanup after a failed start");
                }
                record.state = MachineState::Failed;
                record.updated_at_ms = now_ms();
                record.last_exit = Some(ExitInfo {
                    exit_code: None,
                    signal: None,
                    oom_killed: false,
                    reason: "start_failed".into(),
                    exited_at: record::format_ms(record.updated_at_ms),
                });
                self.save_event(record, "start_failed", source, Some(&error.to_string()))
                    .await?;
                Err(AgentError::StartFailed {
                    id: record.id.clone(),
                    source: error,
                })
            }
        }
    }

    /// Waits in the background for the current run to end by itself.
    fn watch(&self, id: String, generation: u64) {
        let agent = self.clone();
        tokio::spawn(async move {
            let layout = agent.layout(&id);
            let exit = agent.inner.runtime.wait_exit(&layout, None).await;
            if let Err(error) = agent.on_exit(&id, generation, exit).await {
                warn!(machine = %id, %error, "handling a machine exit");
            }
        });
    }

    async fn on_exit(
        &self,
        id: &str,
        generation: u64,
        exit: std::result::Result<Option<ExitRecord>, berth_runtime::RuntimeError>,
    ) -> Result<()> {
        let _guard = self.lock(id).await?;
        let Some(mut record) = self.inner.store.get(id).await? else {
            return Ok(());
        };
        // A stop, update or destroy already dealt with this run.
        if record.run_generation != generation || record.state != MachineState::Started {
            return Ok(());
        }
        let exit = match exit {
            Ok(Some(exit)) => exit,
            Ok(None) => return Ok(()),
            Err(error) => {
                warn!(machine = %id, %error, "waiting for exit failed; checking the host");
                match self.inner.runtime.status(&self.layout(id)).await? {
                    Status::Running { .. } => {
                        self.watch(id.to_owned(), generation);
                        return Ok(());
                    }
                    Status::Exited(exit) => exit,
                    Status::NotRunning => unknown_exit(),
                }
            }
        };
        self.finish_exit(&mut record, exit, EventSource::System, CloseBasis::Observed)
            .await
    }

    /// Records an exit nobody asked for, then applies the restart policy.
    async fn finish_exit(
        &self,
        record: &mut MachineRecord,
        exit: ExitRecord,
        source: EventSource,
        basis: CloseBasis,
    ) -> Result<()> {
        self.inner.runtime.cleanup(&self.layout(&record.id)).await?;
        let usage = self.stop_usage(record, exit.exited_at_ms, basis).await;
        let mut info = exit_info(&exit);
        info!(machine = %record.id, reason = info.reason, code = ?exit.exit_code, "machine exited");
        let decision =
            restart::decide(&record.config.restart, exit.exit_code, record.restart_count);
        if decision == RestartDecision::RetriesExhausted {
            // The policy gave up: that, not the last exit's kind, is why it stays stopped.
            info.reason = "max_retries_exceeded".to_owned();
        }
        let event_reason = info.reason.clone();
        record.last_exit = Some(info);
        record.state = MachineState::Stopped;
        record.updated_at_ms = now_ms();
        record.restart_due_ms = match decision {
            RestartDecision::RestartAfter(delay) => Some(
                record
                    .updated_at_ms
                    .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            ),
            _ => None,
        };
        self.save_transition(record, "exit", source, Some(&event_reason), &usage)
            .await?;
        if let RestartDecision::RestartAfter(delay) = decision {
            self.schedule_restart(record.id.clone(), record.run_generation, delay);
        }
        Ok(())
    }

    fn schedule_restart(&self, id: String, generation: u64, delay: Duration) {
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = async {
                let _guard = agent.lock(&id).await?;
                let Some(mut record) = agent.inner.store.get(&id).await? else {
                    return Ok(());
                };
                // The user acted in the meantime: their wish wins.
                if record.run_generation != generation || record.state != MachineState::Stopped {
                    return Ok(());
                }
                record.restart_count += 1;
                agent
                    .boot(&mut record, EventSource::RestartPolicy)
                    .await
                    .map(drop)
            }
            .await;
            if let Err(error) = result {
                warn!(machine = %id, %error, "restart by policy failed");
            }
        });
    }

    /// The journal entries of a run's end: the run closes, and the upperdir is measured
    /// (storage is measured at every stop).
    async fn stop_usage(
        &self,
        record: &mut MachineRecord,
        at_ms: i64,
        basis: CloseBasis,
    ) -> Vec<UsageRecord> {
        let mut usage: Vec<UsageRecord> = metering::close_run(record, at_ms, basis)
            .into_iter()
            .collect();
        if let Some(bytes) = self.measure_upper(&record.id).await {
            usage.push(metering::storage(record, at_ms, bytes));
        }
        self.check_disk_quota(record).await;
        usage
    }

    /// Records a `disk_quota_exceeded` event when the Machine's disk is full, once per
    /// time it fills up (this process remembers which are full). Called at every run's
    /// end and by the periodic storage sample, never on start: the filesystem enforces
    /// the quota, this only tells.
    async fn check_disk_quota(&self, record: &MachineRecord) {
        let layout = self.layout(&record.id);
        let usage = match self.inner.runtime.disk_usage(&layout).await {
            Ok(usage) => usage,
            Err(error) => {
                warn!(machine = %record.id, %error, "reading the disk quota");
                return;
            }
        };
        let full = usage.filter(|usage| usage.is_full());
        let newly_full = match self.inner.disk_full.lock() {
            Ok(mut set) if full.is_some() => set.insert(record.id.clone()),
            Ok(mut set) => {
                set.remove(&record.id);
                false
            }
            Err(_) => false,
        };
        let Some(usage) = full.filter(|_| newly_full) else {
            return;
        };
        let event = MachineEvent {
            kind: "disk_quota_exceeded".to_owned(),
            source: EventSource::System.as_str().to_owned(),
            state: record.state.as_str().to_owned(),
            exit_code: None,
            reason: Some(format!(
                "the disk is full: {} of {} MiB used",
                usage.used_bytes >> 20,
                usage.limit_bytes >> 20
            )),
            at_ms: now_ms(),
        };
        warn!(machine = %record.id, used = usage.used_bytes, limit = usage.limit_bytes, "disk quota exceeded");
        if let Err(error) = self.inner.store.add_events(&record.id, &[event]).await {
            warn!(machine = %record.id, %error, "recording the disk quota event");
        }
    }

    async fn measure_upper(&self, id: &str) -> Option<u64> {
        let upper = self.layout(id).upper();
        let measured = tokio::task::spawn_blocking(move || metering::disk_usage(&upper)).await;
        match measured {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(error)) => {
                warn!(machine = %id, %error, "measuring the upperdir");
                None
            }
            Err(_) => None,
        }
    }

    /// Stops a running Machine whose lock the caller holds: signal, grace period, SIGKILL.
    async fn halt(
        &self,
        record: &mut MachineRecord,
        signal: i32,
        timeout: Duration,
    ) -> Result<ExitRecord> {
        let layout = self.layout(&record.id);
        let runtime = &self.inner.runtime;
        runtime.signal(&layout, signal).await?;
        let exit = match runtime.wait_exit(&layout, Some(timeout)).await? {
            Some(exit) => exit,
            None => {
                runtime.signal(&layout, berth_core::signal::SIGKILL).await?;
                runtime
                    .wait_exit(&layout, Some(KILL_WAIT))
                    .await?
                    .unwrap_or_else(unknown_exit)
            }
        };
        runtime.cleanup(&layout).await?;
        Ok(exit)
    }

    /// Whether the host restarted since the agent last opened: the kernel's boot id
    /// changed, or, while records say Machines run, the agent's marker in `/run` is gone
    /// (what a reboot does to a tmpfs `/run`) or so is the runtime's state dir.
    async fn host_restarted(&self) -> Result<bool> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let previous = self.inner.store.swap_boot_id(&boot_id).await?;
        if previous.is_some_and(|previous| previous != boot_id) {
            return Ok(true);
        }
        let running: Vec<String> = self
            .inner
            .store
            .list_all()
            .await?
            .into_iter()
            .filter(|record| {
                matches!(
                    record.state,
                    MachineState::Starting | MachineState::Started | MachineState::Stopping
                )
            })
            .map(|record| record.id)
            .collect();
        let marker = boot_marker(&self.inner.config.data_dir);
        let marker_missing = !marker.exists();
        if let Some(dir) = marker.parent() {
            if let Err(error) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&marker, &boot_id))
            {
                warn!(%error, marker = %marker.display(), "writing the boot marker");
            }
        }
        // The runtime's state dir (runc's root) goes with the host's run state: gone, or
        // under runc holding none of the runs on record, the runs went with the host.
        let state_dir = self.inner.config.data_dir.join("runc");
        let state_lost = if !state_dir.exists() {
            true
        } else if self.inner.runtime.name() == "runc" {
            !running.iter().any(|id| state_dir.join(id).exists())
        } else {
            false
        };
        if let Err(error) = std::fs::create_dir_all(&state_dir) {
            warn!(%error, dir = %state_dir.display(), "making the runtime state dir");
        }
        Ok(!running.is_empty() && (marker_missing || state_lost))
    }

    /// Brings every record and the host back into agreement after a restart of the agent.
    async fn recover(&self) -> Result<()> {
        // Read before anything new is recorded: the agent's last sign of life before it died.
        let last_alive = self.inner.store.last_liveness().await?;
        let host_restarted = self.host_restarted().await?;
        if host_restarted {
            info!("the host restarted since the agent last ran");
        }
        for mut record in self.inner.store.list_all().await? {
            let id = record.id.clone();
            if host_restarted && record.pending.is_none() {
                if let Err(error) = self.recover_after_host_restart(&mut record).await {
                    warn!(machine = %id, %error, "recovery failed; the machine is left as recorded");
                }
                continue;
            }
            if let Err(error) = self
                .recover_one(&mut record, last_alive, "agent_restart")
                .await
            {
                warn!(machine = %id, %error, "recovery failed; the machine is left as recorded");
            }
            // Puts back the port's filter if the table lost it (an upgrade from a build
            // without one, a flushed ruleset); otherwise changes nothing.
            if let Err(error) = self.restore_network_if_kept(&record).await {
                warn!(machine = %id, %error, "restoring the machine's network failed");
            }
        }
        Ok(())
    }

    /// Settles one record on a resting state from what the host shows; `why` is the reason
    /// its events carry (`agent_restart`, `operation_failed`, `doctor_repair`).
    async fn recover_one(
        &self,
        record: &mut MachineRecord,
        last_alive: Option<i64>,
        why: &str,
    ) -> Result<()> {
        let layout = self.layout(&record.id);
        let runtime = &self.inner.runtime;
        match record.pending.take() {
            Some(PendingOp::Create) => {
                info!(machine = %record.id, "rolling back an unfinished create");
                runtime.remove(&layout).await?;
                return self.inner.store.delete(&record.id).await;
            }
            Some(PendingOp::Update { previous }) => {
                info!(machine = %record.id, "rolling back an unfinished update");
                let mut usage = Vec::new();
                if let Status::Running { .. } = runtime.status(&layout).await? {
                    let exit = self
                        .halt(record, berth_core::signal::SIGKILL, KILL_WAIT)
                        .await?;
                    usage = self
                        .stop_usage(record, exit.exited_at_ms, CloseBasis::Observed)
                        .await;
                } else {
                    runtime.cleanup(&layout).await?;
                    usage.extend(metering::close_run(record, now_ms(), CloseBasis::Observed));
                }
                let image = self.resolve_digest(&previous.image_ref.digest).await?;
                let mut spec = bundle::bundle_spec(
                    &record.id,
                    &previous.config,
                    &image.config,
                    &image.layer_dirs,
                    self.inner.config.pids_limit,
                )?;
                spec.private_ip = record.private_ip;
                spec.org = record.org.clone();
                runtime.prepare(&layout, &spec).await?;
                record.config = previous.config;
                record.image_ref = previous.image_ref;
                record.rootfs = previous.rootfs;
                record.instance_id = previous.instance_id;
                record.state = MachineState::Stopped;
                record.updated_at_ms = now_ms();
                return self
                    .save_transition(
                        record,
                        "update_rolled_back",
                        EventSource::System,
                        Some(why),
                        &usage,
                    )
                    .await;
            }
            None => {}
        }
        match record.state {
            MachineState::Destroying => {
                runtime.remove(&layout).await?;
                let usage = metering::destroyed(record, now_ms());
                self.inner.store.delete_with_usage(&record.id, &usage).await
            }
            MachineState::Starting | MachineState::Started | MachineState::Stopping => {
                match runtime.status(&layout).await? {
                    Status::Running { .. } if record.state == MachineState::Stopping => {
                        let exit = self
                            .halt(record, berth_core::signal::SIGKILL, KILL_WAIT)
                            .await?;
                        let usage = self
                            .stop_usage(record, exit.exited_at_ms, CloseBasis::Observed)
                            .await;
                        record.last_exit = Some(exit_info(&exit));
                        record.state = MachineState::Stopped;
                        record.updated_at_ms = now_ms();
                        self.save_transition(record, "stop", EventSource::System, Some(why), &usage)
                            .await
                    }
                    Status::Running { pid } => {
                        if record.state == MachineState::Starting {
                            // Died between the runtime's start and the journal write: the
                            // run began when the process did.
                            let started_at =
                                metering::process_start_ms(pid).unwrap_or(record.updated_at_ms);
                            record.state = MachineState::Started;
                            record.updated_at_ms = now_ms();
                            let usage: Vec<UsageRecord> = (!record.run_open)
                                .then(|| metering::open_run(record, started_at))
                                .into_iter()
                                .collect();
                            self.save_transition(
                                record,
                                "start",
                                EventSource::System,
                                Some(why),
                                &usage,
                            )
                            .await?;
                        }
                        info!(machine = %record.id, "found running again");
                        self.watch(record.id.clone(), record.run_generation);
                        Ok(())
                    }
                    status @ (Status::Exited(_) | Status::NotRunning)
                        if record.state == MachineState::Stopping =>
                    {
                        // The user's stop got past ending the process: finish it. A stop the
                        // user asked for never brings in the restart policy.
                        let (exit, basis) = match status {
                            Status::Exited(exit) => (exit, CloseBasis::ExitTime),
                            _ => {
                                let mut exit = unknown_exit();
                                exit.exited_at_ms = last_alive
                                    .unwrap_or(record.updated_at_ms)
                                    .max(record.updated_at_ms);
                                (exit, CloseBasis::LastLiveness)
                            }
                        };
                        runtime.cleanup(&layout).await?;
                        let usage = self.stop_usage(record, exit.exited_at_ms, basis).await;
                        record.last_exit = Some(exit_info(&exit));
                        record.state = MachineState::Stopped;
                        record.updated_at_ms = now_ms();
                        self.save_transition(record, "stop", EventSource::System, Some(why), &usage)
                            .await
                    }
                    Status::Exited(exit) => {
                        self.settle_unjournaled_start(record).await?;
                        record.state = MachineState::Started;
                        self.finish_exit(record, exit, EventSource::System, CloseBasis::ExitTime)
                            .await
                    }
                    Status::NotRunning => {
                        self.settle_unjournaled_start(record).await?;
                        // Nothing recorded when it died: the agent's last sign of life is the
                        // best-known end of the run.
                        let mut exit = unknown_exit();
                        exit.exited_at_ms = last_alive.unwrap_or(exit.exited_at_ms);
                        record.state = MachineState::Started;
                        self.finish_exit(
                            record,
                            exit,
                            EventSource::System,
                            CloseBasis::LastLiveness,
                        )
                        .await
                    }
                }
            }
            MachineState::Replacing => {
                // An update without a pending record cannot happen; settle on stopped.
                runtime.cleanup(&layout).await?;
                let usage: Vec<UsageRecord> =
                    metering::close_run(record, now_ms(), CloseBasis::Observed)
                        .into_iter()
                        .collect();
                record.state = MachineState::Stopped;
                record.updated_at_ms = now_ms();
                self.save_transition(record, "recovered", EventSource::System, Some(why), &usage)
                    .await
            }
            MachineState::Stopped => {
                // A policy restart was waiting out its back-off when the agent went away.
                if let Some(due) = record.restart_due_ms {
                    let wait = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                    info!(machine = %record.id, wait_ms = wait, "resuming a pending restart");
                    self.schedule_restart(
                        record.id.clone(),
                        record.run_generation,
                        Duration::from_millis(wait),
                    );
                }
                Ok(())
            }
            MachineState::Created | MachineState::Failed | MachineState::Destroyed => Ok(()),
        }
    }

    /// After a host restart nothing of a run survives: a Machine that ran is recorded
    /// `stopped` (source `system`, reason `host_restart`), and one whose restart policy is
    /// `always` is started again. Other states recover as usual.
    async fn recover_after_host_restart(&self, record: &mut MachineRecord) -> Result<()> {
        let ran = matches!(
            record.state,
            MachineState::Starting | MachineState::Started | MachineState::Stopping
        );
        if !ran {
            let last_alive = self.inner.store.last_liveness().await?;
            self.recover_one(record, last_alive, "agent_restart")
                .await?;
            return self.restore_network_if_kept(record).await;
        }
        let layout = self.layout(&record.id);
        if let Status::Running { .. } = self.inner.runtime.status(&layout).await? {
            // Not a restart for this Machine after all: it runs.
            let last_alive = self.inner.store.last_liveness().await?;
            return self.recover_one(record, last_alive, "agent_restart").await;
        }
        self.settle_unjournaled_start(record).await?;
        self.inner.runtime.cleanup(&layout).await?;
        // The run ended with the host; the agent's last sign of life is the best-known
        // time, and no later than now.
        let ended_at = self
            .inner
            .store
            .last_liveness()
            .await?
            .unwrap_or_else(now_ms)
            .max(record.updated_at_ms);
        let usage = self
            .stop_usage(record, ended_at, CloseBasis::LastLiveness)
            .await;
        record.last_exit = Some(ExitInfo {
            exit_code: None,
            signal: None,
            oom_killed: false,
            reason: "host_restart".into(),
            exited_at: record::format_ms(ended_at),
        });
        record.state = MachineState::Stopped;
        record.updated_at_ms = now_ms();
        self.save_transition(
            record,
            "exit",
            EventSource::System,
            Some("host_restart"),
            &usage,
        )
        .await?;
        self.restore_network_if_kept(record).await?;
        if record.config.restart.policy == berth_api::RestartPolicy::Always {
            self.schedule_restart(record.id.clone(), record.run_generation, Duration::ZERO);
        }
        Ok(())
    }

    /// A reboot unpins every network namespace: a Machine that still exists gets its
    /// network back now, so it is whole while stopped, not only from its next start.
    async fn restore_network_if_kept(&self, record: &MachineRecord) -> Result<()> {
        if self.inner.store.get(&record.id).await?.is_none() {
            return Ok(());
        }
        self.inner
            .runtime
            .restore_network(&self.layout(&record.id))
            .await?;
        Ok(())
    }

    /// A run that died while still `starting` was never journaled; it ran from when the
    /// start was recorded, so open it there before it is closed.
    async fn settle_unjournaled_start(&self, record: &mut MachineRecord) -> Result<()> {
        if record.state == MachineState::Starting && !record.run_open {
            let usage = metering::open_run(record, record.updated_at_ms);
            self.inner
                .store
                .save_with_usage(record, None, &[usage])
                .await?;
        }
        Ok(())
    }

    async fn resolve_digest(&self, digest: &str) -> Result<ResolvedImage> {
        let images = self.inner.images.clone();
        let digest = digest.to_owned();
        tokio::task::spawn_blocking(move || images.resolve_digest(&digest))
            .await
            .map_err(|error| AgentError::Internal(format!("image resolution task: {error}")))?
            .map_err(AgentError::from)
    }

    fn stop_parameters(record: &MachineRecord, request: &StopRequest) -> Result<(i32, Duration)> {
        let signal_name = request
            .signal
            .as_deref()
            .or(record.config.stop_config.signal.as_deref());
        let signal = match signal_name {
            Some(name) => validate::validate_signal("signal", name)?,
            None => berth_core::signal::SIGTERM,
        };
        let timeout = request
            .timeout
            .or(record.config.stop_config.timeout)
            .map(|timeout| timeout.as_duration())
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        validate::validate_stop_timeout("timeout", timeout)?;
        Ok((signal, timeout))
    }
}

fn unknown_exit() -> ExitRecord {
    ExitRecord {
        exit_code: None,
        signal: None,
        oom_killed: false,
        exited_at_ms: now_ms(),
    }
}

fn exit_info(exit: &ExitRecord) -> ExitInfo {
    let reason = if exit.oom_killed {
        "oom_killed"
    } else if exit.signal.is_some() {
        "killed"
    } else {
        "exited"
    };
    ExitInfo {
        exit_code: exit.exit_code,
        signal: exit.signal,
        oom_killed: exit.oom_killed,
        reason: reason.into(),
        exited_at: record::format_ms(exit.exited_at_ms),
    }
}

/// The bodies of the state-changing operations; the trait's methods run them detached.
impl Agent {
    async fn create_op(&self, request: CreateOnWorker) -> Result<Machine> {
        validate::validate_name("name", &request.name)?;
        validate::validate_config(&request.config)?;
        let _guard = self.lock(&request.id).await?;
        // A retried create (the answer was lost on the network) finds its own Machine.
        if let Some(existing) = self.inner.store.get(&request.id).await? {
            if existing.app == request.app && existing.name == request.name {
                return Ok(existing.to_api());
            }
            return Err(AgentError::Internal(format!(
                "machine id {} is already taken",
                request.id
            )));
        }
        // The slow part, before anything is recorded: a missing image leaves no trace. The
        // lease holds the layers until the record that references them is written.
        let lease = self.inner.images.lease();
        let (image, pull_events) = self
            .resolve_image(&request.config.image, &lease, &request.pull)
            .await?;
        let spec = bundle::bundle_spec(
            &request.id,
            &request.config,
            &image.config,
            &image.layer_dirs,
            self.inner.config.pids_limit,
        )?;
        let now = now_ms();
        let mut record = MachineRecord {
            id: request.id.clone(),
            app: request.app,
            name: request.name,
            region: self.inner.config.region.clone(),
            state: MachineState::Created,
            instance_id: berth_core::ids::new_instance_id(u64::try_from(now).unwrap_or_default()),
            config: request.config,
            image_ref: Self::image_ref(&image),
            rootfs: self.rootfs_stack(&request.id, &image),
            created_at_ms: now,
            updated_at_ms: now,
            last_exit: None,
            restart_count: 0,
            run_generation: 0,
            pending: Some(PendingOp::Create),
            run_open: false,
            storage_bytes: 0,
            private_ip: self
                .inner
                .config
                .machine_prefix
                .as_ref()
                .and_then(|prefix| machine_address(prefix, &request.id)),
            restart_due_ms: None,
            org: request.org,
        };
        let mut spec = spec;
        spec.private_ip = record.private_ip;
        spec.org = record.org.clone();
        self.inner.store.save(&record, None).await?;
        failpoint::hit("create.after_record");
        let layout = self.layout(&record.id);
        if let Err(error) = self.inner.runtime.prepare(&layout, &spec).await {
            if let Err(remove_error) = self.inner.runtime.remove(&layout).await {
                warn!(machine = %record.id, %remove_error, "removing a half-created machine");
            }
            self.inner.store.delete(&record.id).await?;
            return Err(error.into());
        }
        failpoint::hit("create.after_prepare");
        record.pending = None;
        self.inner
            .store
            .add_events(&record.id, &pull_events)
            .await?;
        let usage = metering::created(&record);
        self.save_transition(&record, "create", EventSource::User, None, &[usage])
            .await?;
        failpoint::hit("create.after_record_created");
        drop(lease);
        if !request.skip_launch {
            self.boot(&mut record, EventSource::User).await?;
        }
        Ok(record.to_api())
    }

    async fn start_op(&self, id: &str, source: EventSource) -> Result<StartStopResponse> {
        let mut mark = Instant::now();
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let mut steps = StepTimes::new();
        steps.lap("agent_lock_load", &mut mark);
        let previous_state = record.state;
        match state::plan(record.state, Action::Start)? {
            ActionPlan::AlreadyDone => Ok(StartStopResponse {
                previous_state,
                machine: record.to_api(),
                note: Some("machine was already started".into()),
                timings: Vec::new(),
            }),
            ActionPlan::Proceed(_) => {
                if source == EventSource::User {
                    record.restart_count = 0;
                }
                steps.append(self.boot(&mut record, source).await?);
                Ok(StartStopResponse {
                    previous_state,
                    machine: record.to_api(),
                    note: None,
                    timings: steps
                        .into_iter()
                        .map(|s| StepTiming {
                            step: s.step,
                            us: s.us,
                        })
                        .collect(),
                })
            }
        }
    }

    async fn stop_op(&self, id: &str, request: StopRequest) -> Result<StartStopResponse> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let (signal, timeout) = Self::stop_parameters(&record, &request)?;
        let previous_state = record.state;
        match state::plan(record.state, Action::Stop)? {
            ActionPlan::AlreadyDone => Ok(StartStopResponse {
                previous_state,
                machine: record.to_api(),
                note: Some(format!("machine was already {previous_state}")),
                timings: Vec::new(),
            }),
            ActionPlan::Proceed(transitional) => {
                self.set_state(&mut record, transitional).await?;
                failpoint::hit("stop.after_stopping");
                let exit = self.halt(&mut record, signal, timeout).await?;
                failpoint::hit("stop.after_halt");
                let usage = self
                    .stop_usage(&mut record, exit.exited_at_ms, CloseBasis::Observed)
                    .await;
                record.last_exit = Some(exit_info(&exit));
                record.state = MachineState::Stopped;
                record.updated_at_ms = now_ms();
                let reason = exit_info(&exit).reason;
                let source = request.source.map_or(EventSource::User, EventSource::from);
                self.save_transition(&record, "stop", source, Some(&reason), &usage)
                    .await?;
                failpoint::hit("stop.after_record_stopped");
                Ok(StartStopResponse {
                    previous_state,
                    machine: record.to_api(),
                    note: None,
                    timings: Vec::new(),
                })
            }
        }
    }

    async fn update_op(
        &self,
        id: &str,
        request: UpdateMachineRequest,
        scope: PullScope,
    ) -> Result<Machine> {
        validate::validate_config(&request.config)?;
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let ActionPlan::Proceed(transitional) = state::plan(record.state, Action::Update)? else {
            return Ok(record.to_api());
        };
        // Resolve and lay out the new image first; a bad update changes nothing.
        let lease = self.inner.images.lease();
        let (image, pull_events) = self
            .resolve_image(&request.config.image, &lease, &scope)
            .await?;
        let mut spec = bundle::bundle_spec(
            id,
            &request.config,
            &image.config,
            &image.layer_dirs,
            self.inner.config.pids_limit,
        )?;
        // The network was made at create; update keeps the address and the org.
        spec.private_ip = record.private_ip;
        spec.org = record.org.clone();
        let was_running = record.state == MachineState::Started;
        record.pending = Some(PendingOp::Update {
            previous: Box::new(UpdateSnapshot {
                config: record.config.clone(),
                image_ref: record.image_ref.clone(),
                rootfs: record.rootfs.clone(),
                instance_id: record.instance_id.clone(),
            }),
        });
        self.set_state(&mut record, transitional).await?;
        failpoint::hit("update.after_record_pending");
        let layout = self.layout(id);
        let mut usage = Vec::new();
        if was_running {
            let (signal, timeout) = Self::stop_parameters(&record, &StopRequest::default())?;
            let exit = self.halt(&mut record, signal, timeout).await?;
            usage = self
                .stop_usage(&mut record, exit.exited_at_ms, CloseBasis::Observed)
                .await;
            record.last_exit = Some(exit_info(&exit));
            failpoint::hit("update.after_halt");
        }
        if request.config.rootfs == berth_api::RootfsPersistence::Ephemeral {
            reset_dir(&layout.upper()).await?;
        }
        self.inner.runtime.prepare(&layout, &spec).await?;
        failpoint::hit("update.after_prepare");
        let now = now_ms();
        record.instance_id =
            berth_core::ids::new_instance_id(u64::try_from(now).unwrap_or_default());
        record.image_ref = Self::image_ref(&image);
        record.rootfs = self.rootfs_stack(id, &image);
        record.config = request.config;
        record.pending = None;
        record.state = MachineState::Stopped;
        record.updated_at_ms = now;
        self.inner.store.add_events(id, &pull_events).await?;
        self.save_transition(&record, "update", EventSource::User, None, &usage)
            .await?;
        failpoint::hit("update.after_record_updated");
        drop(lease);
        if !request.skip_launch {
            record.restart_count = 0;
            self.boot(&mut record, EventSource::User).await?;
        }
        Ok(record.to_api())
    }

    async fn destroy_op(&self, id: &str, force: bool) -> Result<()> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let ActionPlan::Proceed(transitional) =
            state::plan(record.state, Action::Destroy { force })?
        else {
            return Ok(());
        };
        self.set_state(&mut record, transitional).await?;
        failpoint::hit("destroy.after_record_destroying");
        self.inner.runtime.remove(&self.layout(id)).await?;
        failpoint::hit("destroy.after_remove");
        let usage = metering::destroyed(&mut record, now_ms());
        self.inner.store.delete_with_usage(id, &usage).await?;
        failpoint::hit("destroy.after_record_deleted");
        if let Ok(mut locks) = self.inner.locks.lock() {
            locks.remove(id);
        }
        record.state = MachineState::Destroyed;
        record.updated_at_ms = now_ms();
        self.notify_destroyed(&record);
        info!(machine = %id, "destroyed");
        Ok(())
    }
}

impl Agent {
    /// An operation that failed halfway (a full disk, a runtime error) must not leave its
    /// Machine in a transitional state that refuses every later action until the agent
    /// restarts: settle it now, as a restart would, from what the host shows. Refusals that
    /// changed nothing (not found, wrong state, busy, bad input) are passed straight on.
    async fn settle_if_failed<T>(&self, id: &str, result: Result<T>) -> Result<T> {
        let Err(error) = &result else {
            return result;
        };
        if matches!(
            error,
            AgentError::NotFound(_)
                | AgentError::InvalidState(_)
                | AgentError::Busy { .. }
                | AgentError::InvalidConfig(_)
                | AgentError::InsufficientCapacity { .. }
                | AgentError::Unavailable { .. }
                | AgentError::Remote { .. }
        ) {
            return result;
        }
        if let Err(settle_error) = self.settle(id).await {
            warn!(machine = %id, %settle_error, "settling after a failed operation");
        }
        result
    }

    async fn settle(&self, id: &str) -> Result<()> {
        // Someone else acting on it now settles it by acting; don't queue behind them.
        let Ok(_guard) = self.lock_of(id)?.try_lock_owned() else {
            return Ok(());
        };
        let Some(mut record) = self.inner.store.get(id).await? else {
            return Ok(());
        };
        if state::is_resting(record.state) && record.pending.is_none() {
            return Ok(());
        }
        info!(machine = %id, state = %record.state, "settling after a failed operation");
        self.recover_one(&mut record, None, "operation_failed")
            .await
    }
}

/// The agent's marker in `/run` (a tmpfs a reboot empties), one per data dir.
pub fn boot_marker(data_dir: &std::path::Path) -> PathBuf {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let digest = sha2::Sha256::digest(data_dir.as_os_str().as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from("/run/berth").join(format!("agent-{name}"))
}

/// Runs an operation to its end even when its caller goes away (a client that hangs up,
/// a control plane that dies): a future dropped halfway would leave the record in a
/// transitional state with nothing running it. A retry waits on the Machine's lock and
/// finds the finished result.
async fn detached<T: Send + 'static>(
    operation: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(operation)
        .await
        .map_err(|error| AgentError::Internal(format!("operation task: {error}")))?
}

#[async_trait]
impl WorkerService for Agent {
    async fn create(&self, request: CreateOnWorker) -> WorkerResult<Machine> {
        let agent = self.clone();
        detached(async move {
            let id = request.id.clone();
            let result = agent.create_op(request).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn start(&self, id: &str, source: EventSource) -> WorkerResult<StartStopResponse> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.start_op(&id, source).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn stop(&self, id: &str, request: StopRequest) -> WorkerResult<StartStopResponse> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.stop_op(&id, request).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn update(
        &self,
        id: &str,
        request: UpdateMachineRequest,
        pull: PullScope,
    ) -> WorkerResult<Machine> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.update_op(&id, request, pull).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn destroy(&self, id: &str, force: bool) -> WorkerResult<()> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.destroy_op(&id, force).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn get(&self, id: &str) -> WorkerResult<Machine> {
        match self.load(id).await {
            // A create of this id still running (its caller may have given up on it) is
            // neither the absence the control plane forgets an index entry for, nor a
            // Machine yet: it may still roll back.
            Err(AgentError::NotFound(_)) if self.operation_running(id) => {
                Err(WorkerError::Busy { id: id.to_owned() })
            }
            Ok(record)
                if record.pending == Some(PendingOp::Create) && self.operation_running(id) =>
            {
                Err(WorkerError::Busy { id: id.to_owned() })
            }
            other => Ok(other?.to_api()),
        }
    }

    async fn list(&self, app: &str) -> WorkerResult<Vec<Machine>> {
        Ok(self
            .inner
            .store
            .list_app(app)
            .await?
            .iter()
            .map(MachineRecord::to_api)
            .collect())
    }

    async fn usage_since(&self, after_seq: u64, limit: u32) -> WorkerResult<Vec<UsageRecord>> {
        Ok(self.inner.store.usage_since(after_seq, limit).await?)
    }

    async fn logs(&self, id: &str, max_bytes: u64) -> WorkerResult<Vec<u8>> {
        self.load(id).await?;
        let layout = self.layout(id);
        tokio::task::spawn_blocking(move || berth_runtime::logs::read_logs(&layout, max_bytes))
            .await
            .map_err(|error| AgentError::Internal(format!("log reader task: {error}")))?
            .map_err(|error| AgentError::Internal(format!("read logs of {id}: {error}")).into())
    }

    async fn image_usage(&self) -> WorkerResult<Vec<ImageUsage>> {
        let mut usage = Vec::new();
        for record in self.inner.store.list_all().await? {
            let layers = |stack: &RootfsStack| {
                stack
                    .image_layers
                    .iter()
                    .map(|layer| layer.digest.clone())
                    .collect::<Vec<_>>()
            };
            let images = &self.inner.images;
            let sizes = |layers: &[String]| {
                layers
                    .iter()
                    .map(|digest| images.layer_size(digest).ok().flatten().unwrap_or(0))
                    .collect::<Vec<u64>>()
            };
            if let Some(PendingOp::Update { previous }) = &record.pending {
                usage.push(ImageUsage {
                    machine_id: record.id.clone(),
                    app: record.app.clone(),
                    image: previous.image_ref.clone(),
                    layer_bytes: sizes(&layers(&previous.rootfs)),
                    layers: layers(&previous.rootfs),
                });
            }
            usage.push(ImageUsage {
                machine_id: record.id.clone(),
                app: record.app.clone(),
                image: record.image_ref.clone(),
                layer_bytes: sizes(&layers(&record.rootfs)),
                layers: layers(&record.rootfs),
            });
        }
        Ok(usage)
    }

    fn set_listener(&self, listener: Arc<dyn WorkerListener>) {
        if let Ok(mut slot) = self.inner.listener.write() {
            *slot = Some(listener);
        }
    }

    async fn notice_snapshot(&self) -> WorkerResult<NoticeSnapshot> {
        Ok(self.snapshot_notices().await?)
    }

    async fn machine_events(
        &self,
        id: &str,
        since: i64,
        limit: u32,
    ) -> WorkerResult<Vec<berth_api::MachineEvent>> {
        Ok(self.event_page(id, since, limit).await?)
    }

    async fn exec(&self, id: &str, request: ExecOnWorker) -> WorkerResult<berth_api::ExecResponse> {
        Ok(self.exec_in(id, request).await?)
    }

    async fn set_metadata(
        &self,
        id: &str,
        key: &str,
        value: Option<String>,
    ) -> WorkerResult<Machine> {
        Ok(self.change_metadata(id, key, value).await?)
    }

    async fn read_logs(
        &self,
        id: &str,
        since: Option<u64>,
        follow: bool,
        max_bytes: u64,
    ) -> WorkerResult<tokio::sync::mpsc::Receiver<LogChunk>> {
        Ok(self.stream_logs(id, since, follow, max_bytes).await?)
    }

    async fn doctor(&self, repair: bool) -> WorkerResult<berth_api::DoctorReport> {
        Ok(self.run_doctor(repair).await?)
    }
}

/// The pull steps worth a line in a Machine's history.
fn pull_milestone(event: &PullEvent) -> Option<String> {
    let layer = event.layer.as_deref().unwrap_or("");
    match event.status {
        PullStatus::Resolved => Some(format!("resolved; {} bytes of layers", event.bytes_total)),
        PullStatus::Exists => Some(format!("layer {layer} already stored")),
        PullStatus::Downloaded => Some(format!(
            "layer {layer} downloaded ({} bytes)",
            event.bytes_total
        )),
        PullStatus::Done => Some("image stored".to_owned()),
        PullStatus::Waiting | PullStatus::Downloading | PullStatus::Unpacked => None,
    }
}

/// Empties a directory by renaming it aside first, so a crash never leaves it half-deleted.
async fn reset_dir(dir: &std::path::Path) -> Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        // A Machine with a disk quota links its upperdir into its quota subvolume: empty
        // the directory there, or a fresh one here would have no quota.
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let aside = dir.with_extension("discard");
        if aside.exists() {
            std::fs::remove_dir_all(&aside)?;
        }
        if dir.exists() {
            std::fs::rename(&dir, &aside)?;
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::remove_dir_all(&aside).or_else(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(error)
            }
        })
    })
    .await
    .map_err(|error| AgentError::Internal(format!("reset task: {error}")))?
    .map_err(|error| AgentError::Internal(format!("reset upperdir: {error}")))
}
