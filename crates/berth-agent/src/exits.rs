//! Runs that end by themselves: the watcher that waits for each run's exit, the exit's
//! record and usage, and the restart policy's answer to it.

use std::time::Duration;

use berth_api::{CloseBasis, EventKind, ExitInfo, MachineState, UsageRecord};
use berth_core::restart::{self, RestartDecision};
use berth_runtime::{ExitRecord, Status};
use tracing::{info, warn};

use crate::error::Result;
use crate::metering;
use crate::record::{self, now_ms, MachineRecord};
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

impl Agent {
    /// Waits in the background for the current run of `record` to end by itself.
    pub(crate) fn watch(&self, record: &MachineRecord) {
        let agent = self.clone();
        let (id, generation) = (record.id.clone(), record.run_generation);
        let driver = self.driver_or_default(&record.config).clone();
        tokio::spawn(async move {
            let layout = agent.layout(&id);
            let exit = driver.wait_exit(&layout, None).await;
            if let Err(error) = agent.on_exit(&id, generation, exit).await {
                warn!(machine = %id, %error, "handling a machine exit");
            }
        });
    }

    pub(crate) async fn on_exit(
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
                match self
                    .driver_or_default(&record.config)
                    .status(&self.layout(id))
                    .await?
                {
                    Status::Running { .. } => {
                        self.watch(&record);
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
    pub(crate) async fn finish_exit(
        &self,
        record: &mut MachineRecord,
        exit: ExitRecord,
        source: EventSource,
        basis: CloseBasis,
    ) -> Result<()> {
        self.driver_or_default(&record.config)
            .cleanup(&self.layout(&record.id))
            .await?;
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
        let now = now_ms();
        record.restart_due_ms = match decision {
            RestartDecision::RestartAfter(delay) => {
                Some(now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)))
            }
            _ => None,
        };
        let change = Change::event(EventKind::Exit, source)
            .at(now)
            .reason(&event_reason)
            .usage(&usage);
        self.change_state(record, MachineState::Stopped, change)
            .await?;
        if let RestartDecision::RestartAfter(delay) = decision {
            self.schedule_restart(record.id.clone(), record.run_generation, delay);
        } else if record.config.auto_destroy {
            self.auto_destroy(record.id.clone(), record.run_generation);
        }
        Ok(())
    }

    /// `auto_destroy`: the run ended by itself and no restart follows, so the Machine goes
    /// the way of any destroy, once the exit's lock is let go. A start or update that came
    /// first wins (the run generation moved on, or the Machine is no longer stopped).
    pub(crate) fn auto_destroy(&self, id: String, generation: u64) {
        let agent = self.clone();
        tokio::spawn(async move {
            let result = agent.destroy_if(&id, generation).await;
            if let Err(error) = result {
                warn!(machine = %id, %error, "auto_destroy failed");
            }
        });
    }

    pub(crate) fn schedule_restart(&self, id: String, generation: u64, delay: Duration) {
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

    /// Records `stopped` after a run ended that no restart policy follows: the run's
    /// usage, `last_exit`, and the event of `kind` from `source` (with `reason`, or the
    /// exit's own reason).
    pub(crate) async fn record_stopped(
        &self,
        record: &mut MachineRecord,
        exit: &ExitRecord,
        basis: CloseBasis,
        (kind, source): (EventKind, EventSource),
        reason: Option<&str>,
    ) -> Result<()> {
        let usage = self.stop_usage(record, exit.exited_at_ms, basis).await;
        let info = exit_info(exit);
        let reason = reason.map_or_else(|| info.reason.clone(), str::to_owned);
        record.last_exit = Some(info);
        let change = Change::event(kind, source).reason(&reason).usage(&usage);
        self.change_state(record, MachineState::Stopped, change)
            .await
    }

    /// The journal entries of a run's end: the run closes, and the upperdir is measured
    /// (storage is measured at every stop; a memory image still there counts too).
    pub(crate) async fn stop_usage(
        &self,
        record: &mut MachineRecord,
        at_ms: i64,
        basis: CloseBasis,
    ) -> Vec<UsageRecord> {
        let mut usage: Vec<UsageRecord> = metering::close_run(record, at_ms, basis)
            .into_iter()
            .collect();
        if let Some(bytes) = self.measure_upper(&record.id).await {
            let stored = bytes.saturating_add(record.memory_bytes);
            usage.push(metering::storage(record, at_ms, stored));
        }
        self.check_disk_quota(record).await;
        usage
    }
}

pub(crate) fn unknown_exit() -> ExitRecord {
    ExitRecord {
        exit_code: None,
        signal: None,
        oom_killed: false,
        exited_at_ms: now_ms(),
    }
}

pub(crate) fn exit_info(exit: &ExitRecord) -> ExitInfo {
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
