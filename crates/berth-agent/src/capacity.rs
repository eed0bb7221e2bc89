//! What the host gives its Machines and what they take: CPUs and memory reserved by start
//! and given back when a run ends, the heartbeat's totals, and disk use, measured in the
//! background and at every stop and told once when a Machine's disk fills up.

use std::collections::HashMap;
use std::time::Duration;

use berth_api::{EventKind, MachineState, Resources, WorkerStats};
use tracing::warn;

use crate::error::{AgentError, Result};
use crate::metering;
use crate::record::{now_ms, MachineRecord};
use crate::service::EventSource;
use crate::store::MachineEvent;
use crate::{Agent, MACHINE_DISK_MB};

const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);

/// Storage is measured at least this often (and at every stop).
const STORAGE_SAMPLE_INTERVAL: Duration = Duration::from_secs(60);

/// Snapshots past their volume's retention are removed at least this often.
const SNAPSHOT_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

impl Agent {
    /// Background metering: a liveness record every few seconds (the best-known time of a
    /// death nobody saw) and a storage measurement of every Machine each minute.
    pub(crate) fn spawn_meter(&self) {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
            let mut storage = tokio::time::interval(STORAGE_SAMPLE_INTERVAL);
            let mut snapshots = tokio::time::interval(SNAPSHOT_SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = snapshots.tick() => {
                        if let Err(error) = agent.sweep_snapshots(now_ms()).await {
                            warn!(%error, "removing snapshots past their retention");
                        }
                    }
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

    /// Measures every Machine's upperdir (plus a suspended one's memory image) and journals
    /// the sizes that changed.
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
            if self.layout(&record.id).checkpoints().is_dir() {
                if let Err(error) = self.journal_checkpoint_bytes(&record.id).await {
                    warn!(machine = %record.id, %error, "journaling checkpoint storage");
                }
            }
            let Some(upper) = self.measure_upper(&record.id).await else {
                continue;
            };
            // A suspended Machine's memory image is storage too.
            if upper.saturating_add(record.memory_bytes) == record.storage_bytes {
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
                let bytes = upper.saturating_add(current.memory_bytes);
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

    pub(crate) async fn rebuild_running(&self) -> Result<()> {
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

    pub(crate) fn running_table(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<String, (u32, u64)>>> {
        self.inner
            .running
            .lock()
            .map_err(|_| AgentError::Internal("running table poisoned".into()))
    }

    /// Reserves the Machine's CPUs and memory on this host, or says what is missing.
    pub(crate) fn reserve(&self, record: &MachineRecord) -> Result<()> {
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

    pub(crate) fn release(&self, id: &str) {
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

    /// Records a `disk_quota_exceeded` event when the Machine's disk is full, once per
    /// time it fills up (this process remembers which are full). Called at every run's
    /// end and by the periodic storage sample, never on start: the filesystem enforces
    /// the quota, this only tells.
    pub(crate) async fn check_disk_quota(&self, record: &MachineRecord) {
        let layout = self.layout(&record.id);
        let driver = self.driver_or_default(&record.config);
        let usage = match driver.disk_usage(&layout).await {
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
            kind: EventKind::DiskQuotaExceeded,
            source: EventSource::System,
            state: record.state,
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

    pub(crate) async fn measure_upper(&self, id: &str) -> Option<u64> {
        match self.billed_disk_bytes(id).await {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                warn!(machine = %id, %error, "measuring the upperdir");
                None
            }
        }
    }
}
