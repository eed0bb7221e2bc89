//! The per-worker daemon, like flyd: it owns the Machines on its host.
//!
//! Every operation is a short sequence of durable steps. The record in [`store`] is written
//! before the host is touched, and again when the host has done its part, so that an agent
//! killed at any moment can finish or undo what it was doing ([`Agent::open`] runs
//! recovery before serving). Operations on one Machine are serialized by a per-Machine
//! lock; different Machines never wait for each other.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, RwLock as StdRwLock};
use std::time::Duration;

use berth_api::Resources;
use berth_image::{ImagePuller, ImageStore};
use berth_runtime::{MachineLayout, Runtime};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

pub mod bundle;
mod capacity;
mod checks;
pub mod doctor;
mod drivers;
pub mod error;
mod exits;
pub mod failpoint;
pub mod files;
pub mod http;
mod images;
pub mod metering;
mod notices;
mod ops;
pub mod record;
mod recovery;
mod robots;
mod schedules;
pub mod store;
pub mod transfer;
mod transition;
pub mod volumes;
mod worker;

/// The interface to a worker lives in `berth-worker`; these keep its old paths.
pub use berth_worker::{remote, service, WorkerError};
pub use drivers::Drivers;
pub use error::{AgentError, Result};
pub use recovery::boot_marker;
pub use service::{
    CreateOnWorker, EventSource, ExecOnWorker, ImageUsage, LogChunk, MachineNotice, NoticeSnapshot,
    UpdateOnWorker, WorkerListener, WorkerService,
};

// Shared with the doctor, which reuses recovery's pieces.
pub(crate) use exits::unknown_exit;
pub(crate) use ops::stop::KILL_WAIT;
use record::MachineRecord;
use store::{AgentStore, MachineEvent};

/// How long an operation waits for another one on the same Machine before answering
/// "busy" (robots retry; they should not hang).
const LOCK_WAIT: Duration = Duration::from_secs(60);

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
    /// The cluster's join token, which other agents' migration streams ask for; `None`
    /// for an in-process worker, whose peers are in-process too.
    pub join_token: Option<String>,
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
    /// Every driver this worker offers; each Machine runs with the one its config names.
    drivers: Drivers,
    images: Arc<ImageStore>,
    puller: Arc<ImagePuller>,
    machines_root: PathBuf,
    locks: StdMutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// CPUs and memory of every Machine that runs (or is being started), by id. Start
    /// reserves here before it boots, so concurrent starts cannot overcommit the host.
    running: StdMutex<HashMap<String, (u32, u64)>>,
    listener: StdRwLock<Option<Arc<dyn WorkerListener>>>,
    /// Machines whose disk was full when last looked at, so each filling is told once.
    disk_full: StdMutex<HashSet<String>>,
    /// The checks of each running Machine that has them, with their last results.
    checks: StdMutex<HashMap<String, checks::RunChecks>>,
    /// The due time of each scheduled Machine's last scheduled start.
    fired: StdMutex<HashMap<String, i64>>,
    /// When this agent opened: scheduled starts due before are not made up.
    opened_ms: i64,
    /// In-process workers of the same control plane, by name: a migration's source is
    /// reached directly when it is one of them.
    peers: StdRwLock<HashMap<String, std::sync::Weak<dyn WorkerService>>>,
    /// The passes this worker sent of each leaving Machine, newest last, by digest: when
    /// each began and the directories it saw, which a later pass starts from.
    sent_passes: StdMutex<HashMap<String, Vec<ops::migrate::SentPass>>>,
    /// The image passes this worker sent of each leaving volume, newest last: the chunk
    /// hashes a later pass compares with.
    sent_images: StdMutex<HashMap<String, Vec<ops::migrate::SentImage>>>,
    /// The physical extents of checkpoints, by path, for billing shared data once: a
    /// checkpoint is read-only, so its extents never change.
    checkpoint_extents: StdMutex<HashMap<PathBuf, Arc<berth_runtime::extents::ExtentSet>>>,
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
        Agent::open_with_drivers(config, Drivers::from(runtime), puller).await
    }

    /// [`Agent::open_with_puller`] with several drivers: each Machine runs with the one
    /// its `config.runtime` names, and with the default when it names none.
    pub async fn open_with_drivers(
        config: AgentConfig,
        drivers: Drivers,
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
                drivers,
                images,
                puller,
                machines_root,
                locks: StdMutex::new(HashMap::new()),
                running: StdMutex::new(HashMap::new()),
                listener: StdRwLock::new(None),
                disk_full: StdMutex::new(std::collections::HashSet::new()),
                checks: StdMutex::new(HashMap::new()),
                fired: StdMutex::new(HashMap::new()),
                opened_ms: record::now_ms(),
                peers: StdRwLock::new(HashMap::new()),
                sent_passes: StdMutex::new(HashMap::new()),
                sent_images: StdMutex::new(HashMap::new()),
                checkpoint_extents: StdMutex::new(HashMap::new()),
            }),
        };
        agent.name_drivers().await?;
        agent.recover_volumes().await?;
        agent.recover().await?;
        agent.release_orphan_claims().await?;
        agent.rebuild_running().await?;
        agent.spawn_meter();
        agent.spawn_scheduler();
        Ok(agent)
    }

    /// Makes `worker` (an in-process worker of the same control plane) reachable by name
    /// as a migration's source.
    /// Held weakly: peers hold each other.
    pub fn add_peer(&self, name: &str, worker: &Arc<dyn WorkerService>) {
        if let Ok(mut peers) = self.inner.peers.write() {
            peers.insert(name.to_owned(), Arc::downgrade(worker));
        }
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

    pub(crate) async fn lock(&self, id: &str) -> Result<OwnedMutexGuard<()>> {
        self.lock_within(id, LOCK_WAIT).await
    }

    /// Takes a Machine's lock, or answers busy after `wait`.
    pub(crate) async fn lock_within(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<OwnedMutexGuard<()>> {
        tokio::time::timeout(wait, self.lock_of(id)?.lock_owned())
            .await
            .map_err(|_| AgentError::Busy { id: id.to_owned() })
    }

    /// The Machine's lock itself, made on first use.
    pub(crate) fn lock_of(&self, id: &str) -> Result<Arc<AsyncMutex<()>>> {
        let mut locks = self
            .inner
            .locks
            .lock()
            .map_err(|_| AgentError::Internal("lock table poisoned".into()))?;
        Ok(locks.entry(id.to_owned()).or_default().clone())
    }

    /// Whether an operation on `id` holds its lock right now.
    pub(crate) fn operation_running(&self, id: &str) -> bool {
        self.inner
            .locks
            .lock()
            .ok()
            .and_then(|locks| locks.get(id).map(|lock| lock.try_lock().is_err()))
            .unwrap_or(false)
    }

    /// The drivers this worker offers, by name: what it tells the control plane.
    pub fn runtimes(&self) -> Vec<String> {
        self.inner.drivers.names()
    }

    /// The driver that runs the Machine whose config is `config`.
    pub(crate) fn driver(&self, config: &berth_api::MachineConfig) -> Result<&Arc<dyn Runtime>> {
        let name = config
            .runtime
            .as_deref()
            .unwrap_or(self.inner.drivers.default_name());
        self.inner
            .drivers
            .get(name)
            .ok_or_else(|| AgentError::MissingRuntime {
                worker: self.inner.config.name.clone(),
                runtime: name.to_owned(),
            })
    }

    /// For ending and removing runs: the Machine's driver, or the default when this worker
    /// no longer offers it (its program was removed), which still ends the run through
    /// the run directory and removes what every driver leaves, so such a Machine can be
    /// stopped and destroyed.
    pub(crate) fn driver_or_default(&self, config: &berth_api::MachineConfig) -> &Arc<dyn Runtime> {
        self.driver(config).unwrap_or_else(|error| {
            tracing::warn!(%error, "using the default driver");
            self.host_driver()
        })
    }

    /// The driver for host work that is the same under every driver: volumes.
    pub(crate) fn host_driver(&self) -> &Arc<dyn Runtime> {
        self.inner.drivers.default_driver()
    }

    /// Records (once) the driver of each Machine recorded before Machines named theirs:
    /// the default, which is what ran them.
    async fn name_drivers(&self) -> Result<()> {
        let default = self.inner.drivers.default_name();
        for mut record in self.inner.store.list_all().await? {
            let mut named = false;
            if record.config.runtime.is_none() {
                record.config.runtime = Some(default.to_owned());
                named = true;
            }
            if let Some(record::PendingOp::Update { previous }) = &mut record.pending {
                if previous.config.runtime.is_none() {
                    previous.config.runtime = Some(default.to_owned());
                    named = true;
                }
            }
            if named {
                self.inner.store.save(&record, None).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn load(&self, id: &str) -> Result<MachineRecord> {
        self.inner
            .store
            .get(id)
            .await?
            .ok_or_else(|| AgentError::NotFound(id.to_owned()))
    }
}
