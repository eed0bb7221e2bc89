//! Bringing records and the host back into agreement: at every open of the agent, after
//! an operation that failed halfway, and for the doctor's repair.

use std::path::PathBuf;
use std::time::Duration;

use berth_api::{CloseBasis, EventKind, ExitInfo, MachineState, RestartPolicy, UsageRecord};
use berth_core::recovery::{self, HostFacts, Pending, Process, RecordFacts, Step};
use berth_core::state;
use berth_runtime::Status;
use tracing::{info, warn};

use crate::error::{AgentError, Result};
use crate::exits::unknown_exit;
use crate::metering;
use crate::ops::start::memory_gone;
use crate::ops::stop::KILL_WAIT;
use crate::ops::suspend::{memory_image_present, memory_image_sealed};
use crate::record::{self, now_ms, MachineRecord, PendingOp, UpdateSnapshot};
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

impl Agent {
    /// Whether the host restarted since the agent last opened: the kernel's boot id
    /// changed, or, while records say Machines run, the agent's marker in `/run` is gone
    /// (what a reboot does to a tmpfs `/run`) or so is the runtime's state dir.
    pub(crate) async fn host_restarted(&self) -> Result<bool> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let previous = self.inner.store.swap_boot_id(&boot_id).await?;
        if previous.is_some_and(|previous| previous != boot_id) {
            return Ok(true);
        }
        let running: Vec<MachineRecord> = self
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
        // holding none of the runs on record that runc runs, the runs went with the host.
        // runsc keeps its sandboxes' state in its own root the same way.
        let state_dir = self.inner.config.data_dir.join("runc");
        let runs_of = |driver: &str| -> Vec<&MachineRecord> {
            running
                .iter()
                .filter(|record| self.driver_or_default(&record.config).name() == driver)
                .collect()
        };
        let under_runc = runs_of("runc");
        let runc_lost = !state_dir.exists()
            || (!under_runc.is_empty()
                && !under_runc
                    .iter()
                    .any(|record| state_dir.join(&record.id).exists()));
        let runsc_root = self.inner.config.data_dir.join("runsc");
        let under_gvisor = runs_of("gvisor");
        let gvisor_lost = !under_gvisor.is_empty()
            && !under_gvisor
                .iter()
                .any(|record| sandbox_state_kept(&runsc_root, &record.id));
        let state_lost = runc_lost || gvisor_lost;
        if let Err(error) = std::fs::create_dir_all(&state_dir) {
            warn!(%error, dir = %state_dir.display(), "making the runtime state dir");
        }
        Ok(!running.is_empty() && (marker_missing || state_lost))
    }

    /// Brings every record and the host back into agreement after a restart of the agent.
    pub(crate) async fn recover(&self) -> Result<()> {
        // Read before anything new is recorded: the agent's last sign of life before it died.
        let last_alive = self.inner.store.last_liveness().await?;
        let host_restarted = self.host_restarted().await?;
        if host_restarted {
            info!("the host restarted since the agent last ran");
        }
        for mut record in self.inner.store.list_all().await? {
            let id = record.id.clone();
            self.recover_checkpoints(&record).await;
            // Half of a move: the control plane settles it (abort or finish). The run of a
            // Machine still leaving is recovered as any run, and the mark is kept.
            let migration = record.pending.clone().filter(PendingOp::is_migration);
            if migration.is_some()
                && !matches!(
                    record.state,
                    MachineState::Starting | MachineState::Started | MachineState::Stopping
                )
            {
                if let Err(error) = self.restore_network_if_kept(&record).await {
                    warn!(machine = %id, %error, "restoring the machine's network failed");
                }
                continue;
            }
            let recovered = self
                .recover_record(&mut record, last_alive, "agent_restart", host_restarted)
                .await;
            if let Some(pending) = migration {
                if let Err(error) = self.keep_pending(&id, pending).await {
                    warn!(machine = %id, %error, "keeping the migration mark");
                }
            }
            match recovered {
                // Restored its network itself, before a restart by policy could begin.
                Ok(Step::StoppedByHostRestart { .. }) => continue,
                Ok(_) => {}
                Err(error) => {
                    warn!(machine = %id, %error, "recovery failed; the machine is left as recorded");
                }
            }
            // A reboot unpins every network namespace; otherwise this puts back the port's
            // filter if the table lost it (an upgrade from a build without one, a flushed
            // ruleset), or changes nothing.
            if let Err(error) = self.restore_network_if_kept(&record).await {
                warn!(machine = %id, %error, "restoring the machine's network failed");
            }
        }
        Ok(())
    }

    /// Puts a migration mark back on a record that recovery rewrote.
    async fn keep_pending(&self, id: &str, pending: PendingOp) -> Result<()> {
        if let Some(mut record) = self.inner.store.get(id).await? {
            record.pending = Some(pending);
            self.inner.store.save(&record, None).await?;
        }
        Ok(())
    }

    /// Settles one record on a resting state from what the host shows; `why` is the reason
    /// its events carry (`agent_restart`, `operation_failed`, `doctor_repair`).
    pub(crate) async fn recover_one(
        &self,
        record: &mut MachineRecord,
        last_alive: Option<i64>,
        why: &str,
    ) -> Result<()> {
        self.recover_record(record, last_alive, why, false)
            .await
            .map(drop)
    }

    /// Carries out the step [`recovery::plan`] decides for the record; answers the step.
    async fn recover_record(
        &self,
        record: &mut MachineRecord,
        last_alive: Option<i64>,
        why: &str,
        host_restarted: bool,
    ) -> Result<Step> {
        let layout = self.layout(&record.id);
        let runtime = self.driver_or_default(&record.config).clone();
        let pending = record.pending.take();
        let facts = RecordFacts {
            state: record.state,
            pending: match pending {
                None => Pending::None,
                Some(PendingOp::Create) => Pending::Create,
                Some(PendingOp::Update { .. }) => Pending::Update,
                // Recovery only settles the run; the caller keeps the mark.
                Some(PendingOp::MigrateOut { .. } | PendingOp::MigrateIn { .. }) => Pending::None,
            },
            restart_always: record.config.restart.policy == RestartPolicy::Always,
            restart_due: record.restart_due_ms.is_some(),
        };
        let status = if recovery::reads_process(facts) {
            runtime.status(&layout).await?
        } else {
            Status::NotRunning
        };
        let process = match status {
            Status::Running { .. } => Process::Running,
            Status::Exited(_) => Process::Exited,
            Status::NotRunning => Process::Gone,
        };
        let image = layout.memory_image();
        let host = HostFacts {
            restarted: host_restarted,
            process,
            memory_image: memory_image_sealed(&image),
        };
        let step = recovery::plan(facts, host);
        let image_left = memory_image_present(&image) || record.memory_bytes > 0;
        match step {
            Step::RollBackCreate => {
                info!(machine = %record.id, "rolling back an unfinished create");
                runtime.remove(&layout).await?;
                self.inner.store.delete(&record.id).await?;
            }
            Step::RollBackUpdate { kill } => {
                let Some(PendingOp::Update { previous }) = pending else {
                    return Err(AgentError::Internal(
                        "an update to roll back without its snapshot".into(),
                    ));
                };
                self.roll_back_update(record, *previous, kill, why).await?;
            }
            Step::Adopt { record_start } => {
                if record_start {
                    // Died between the runtime's start and the journal write: the run began
                    // when the process did.
                    let started_at = match status {
                        Status::Running { pid } => metering::process_start_ms(pid),
                        _ => None,
                    }
                    .unwrap_or(record.updated_at_ms);
                    let usage: Vec<UsageRecord> = (!record.run_open)
                        .then(|| metering::open_run(record, started_at))
                        .into_iter()
                        .collect();
                    let change = Change::event(EventKind::Start, EventSource::System)
                        .reason(why)
                        .usage(&usage);
                    self.change_state(record, MachineState::Started, change)
                        .await?;
                }
                info!(machine = %record.id, "found running again");
                self.watch(record);
                self.run_checks(record);
            }
            Step::RecordExit => {
                self.settle_unjournaled_start(record).await?;
                let (exit, basis) = match status {
                    Status::Exited(exit) => (exit, CloseBasis::ExitTime),
                    _ => {
                        // Nothing recorded when it died: the agent's last sign of life is
                        // the best-known end of the run.
                        let mut exit = unknown_exit();
                        exit.exited_at_ms = last_alive.unwrap_or(exit.exited_at_ms);
                        (exit, CloseBasis::LastLiveness)
                    }
                };
                self.finish_exit(record, exit, EventSource::System, basis)
                    .await?;
            }
            Step::KillAndStop => {
                let exit = self
                    .halt(record, berth_core::signal::SIGKILL, KILL_WAIT)
                    .await?;
                let stop = (EventKind::Stop, EventSource::System);
                self.record_stopped(record, &exit, CloseBasis::Observed, stop, Some(why))
                    .await?;
            }
            Step::FinishStop => {
                // The user's stop got past ending the process: finish it. A stop the user
                // asked for never brings in the restart policy.
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
                let stop = (EventKind::Stop, EventSource::System);
                self.record_stopped(record, &exit, basis, stop, Some(why))
                    .await?;
            }
            Step::FinishDestroy => {
                runtime.remove(&layout).await?;
                let usage = metering::destroyed(record, now_ms());
                self.inner
                    .store
                    .delete_with_usage(&record.id, &usage)
                    .await?;
            }
            Step::SettleStopped => {
                runtime.cleanup(&layout).await?;
                let usage: Vec<UsageRecord> =
                    metering::close_run(record, now_ms(), CloseBasis::Observed)
                        .into_iter()
                        .collect();
                let change = Change::event(EventKind::Recovered, EventSource::System)
                    .reason(why)
                    .usage(&usage);
                self.change_state(record, MachineState::Stopped, change)
                    .await?;
            }
            Step::ResumeRestart => {
                // A policy restart was waiting out its back-off when the agent went away.
                let due = record.restart_due_ms.unwrap_or_default();
                let wait = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                info!(machine = %record.id, wait_ms = wait, "resuming a pending restart");
                self.schedule_restart(
                    record.id.clone(),
                    record.run_generation,
                    Duration::from_millis(wait),
                );
            }
            Step::StoppedByHostRestart { restart } => {
                self.stop_after_host_restart(record, last_alive, restart)
                    .await?;
            }
            Step::CancelSuspend => {
                // The checkpoint never ended the run: it goes on, still billed.
                let change = Change::event(EventKind::Recovered, EventSource::System).reason(why);
                self.change_state(record, MachineState::Started, change)
                    .await?;
                info!(machine = %record.id, "a suspend did not finish; running on");
                self.watch(record);
                self.run_checks(record);
            }
            Step::FinishSuspend => {
                runtime.cleanup(&layout).await?;
                // The image was sealed when the run ended: its time is the run's end.
                let ended_at = sealed_at(&image)
                    .or(last_alive)
                    .unwrap_or_else(now_ms)
                    .max(record.updated_at_ms);
                let basis = CloseBasis::ExitTime;
                let usage = self.suspended_usage(record, &layout, ended_at, basis).await;
                let change = Change::event(EventKind::Suspend, EventSource::System)
                    .reason(why)
                    .usage(&usage);
                self.change_state(record, MachineState::Suspended, change)
                    .await?;
            }
            Step::SuspendLost => {
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
                let lost = (EventKind::MemoryLost, EventSource::System);
                let reason = format!("{why}: the suspend left no whole memory image");
                self.record_stopped(record, &exit, basis, lost, Some(&reason))
                    .await?;
            }
            Step::BackToSuspended => {
                runtime.cleanup(&layout).await?;
                let change = Change::event(EventKind::Recovered, EventSource::System).reason(why);
                self.change_state(record, MachineState::Suspended, change)
                    .await?;
            }
            Step::Nothing => {}
        }
        let deleted = matches!(step, Step::RollBackCreate | Step::FinishDestroy);
        if image_left && !deleted && !recovery::keeps_memory_image(facts, step) {
            // Stale: the Machine ran on from it, or will boot fresh.
            info!(machine = %record.id, "discarding a memory image left behind");
            let usage: Vec<UsageRecord> = memory_gone(record, now_ms()).into_iter().collect();
            self.discard_memory(&record.id).await?;
            if !usage.is_empty() {
                self.inner
                    .store
                    .save_with_usage(record, None, &usage)
                    .await?;
            }
        }
        Ok(step)
    }

    /// Ends the run if `kill`, lays the old config's bundle out again and records the
    /// Machine `stopped` with what it had before the update.
    async fn roll_back_update(
        &self,
        record: &mut MachineRecord,
        previous: UpdateSnapshot,
        kill: bool,
        why: &str,
    ) -> Result<()> {
        info!(machine = %record.id, "rolling back an unfinished update");
        let layout = self.layout(&record.id);
        // The record keeps the old config until the update ends, so this is the driver the
        // Machine had before (and the one its run, if any, was started with).
        let runtime = self.driver_or_default(&previous.config).clone();
        let mut usage = Vec::new();
        if kill {
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
        let spec = self.machine_spec(record, &previous.config, &image)?;
        runtime.prepare(&layout, &spec).await?;
        record.config = previous.config;
        record.image_ref = previous.image_ref;
        record.rootfs = previous.rootfs;
        record.instance_id = previous.instance_id;
        let change = Change::event(EventKind::UpdateRolledBack, EventSource::System)
            .reason(why)
            .usage(&usage);
        self.change_state(record, MachineState::Stopped, change)
            .await?;
        // Volumes claimed for the new mounts go back; the old ones were never released.
        self.release_unmounted(&record.id, &record.app, &record.config.mounts)
            .await;
        Ok(())
    }

    /// After a host restart nothing of a run survives: the Machine is recorded `stopped`
    /// (source `system`, reason `host_restart`), gets its network back, and is started
    /// again if `restart`.
    async fn stop_after_host_restart(
        &self,
        record: &mut MachineRecord,
        last_alive: Option<i64>,
        restart: bool,
    ) -> Result<()> {
        self.settle_unjournaled_start(record).await?;
        self.driver_or_default(&record.config)
            .cleanup(&self.layout(&record.id))
            .await?;
        // The run ended with the host; the agent's last sign of life is the best-known
        // time, and no later than now.
        let ended_at = last_alive.unwrap_or_else(now_ms).max(record.updated_at_ms);
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
        let change = Change::event(EventKind::Exit, EventSource::System)
            .reason("host_restart")
            .usage(&usage);
        self.change_state(record, MachineState::Stopped, change)
            .await?;
        self.restore_network_if_kept(record).await?;
        if restart {
            self.schedule_restart(record.id.clone(), record.run_generation, Duration::ZERO);
        }
        Ok(())
    }

    /// A reboot unpins every network namespace: a Machine that still exists gets its
    /// network back now, so it is whole while stopped, not only from its next start.
    pub(crate) async fn restore_network_if_kept(&self, record: &MachineRecord) -> Result<()> {
        if self.inner.store.get(&record.id).await?.is_none() {
            return Ok(());
        }
        self.driver_or_default(&record.config)
            .restore_network(&self.layout(&record.id))
            .await?;
        Ok(())
    }

    /// A run that died while still `starting` was never journaled; it ran from when the
    /// start was recorded, so open it there before it is closed.
    pub(crate) async fn settle_unjournaled_start(&self, record: &mut MachineRecord) -> Result<()> {
        if record.state == MachineState::Starting && !record.run_open {
            let usage = metering::open_run(record, record.updated_at_ms);
            self.inner
                .store
                .save_with_usage(record, None, &[usage])
                .await?;
        }
        Ok(())
    }

    /// An operation that failed halfway (a full disk, a runtime error) must not leave its
    /// Machine in a transitional state that refuses every later action until the agent
    /// restarts: settle it now, as a restart would, from what the host shows. Refusals that
    /// changed nothing (not found, wrong state, busy, bad input) are passed straight on.
    pub(crate) async fn settle_if_failed<T>(&self, id: &str, result: Result<T>) -> Result<T> {
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
                | AgentError::MissingRuntime { .. }
                | AgentError::SuspendUnsupported { .. }
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

    pub(crate) async fn settle(&self, id: &str) -> Result<()> {
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

/// Whether runsc's root holds the state of the Machine's sandbox
/// (`<id>_sandbox:<id>.state`).
fn sandbox_state_kept(runsc_root: &std::path::Path, id: &str) -> bool {
    let prefix = format!("{id}_sandbox:");
    std::fs::read_dir(runsc_root).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
    })
}

/// When the memory image was sealed: its manifest is written last.
fn sealed_at(image: &std::path::Path) -> Option<i64> {
    let modified = std::fs::metadata(image.join(berth_runtime::gvisor::image::MANIFEST_FILE))
        .and_then(|metadata| metadata.modified())
        .ok()?;
    let since = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// The agent's marker in `/run` (a tmpfs a reboot empties), one per data dir.
pub fn boot_marker(data_dir: &std::path::Path) -> PathBuf {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let digest = sha2::Sha256::digest(data_dir.as_os_str().as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from("/run/berth").join(format!("agent-{name}"))
}
