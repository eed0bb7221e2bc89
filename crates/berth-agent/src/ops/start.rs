//! Start: reserve the host's share, record `starting`, start the init, record `started`
//! with the run's opening in the usage journal, and watch the run. A suspended Machine is
//! resumed from its memory image instead (`resume` event, `resumed` in the answer), or,
//! when the image cannot be resumed, booted fresh after a `memory_lost` event.

use std::sync::Arc;
use std::time::Instant;

use berth_api::{EventKind, ExitInfo, MachineState, StartStopResponse, StepTiming, UsageRecord};
use berth_core::state::{self, Action, ActionPlan};
use berth_runtime::timing::{micros, StepTimes};
use berth_runtime::Runtime;
use tracing::warn;

use crate::error::{AgentError, Result};
use crate::failpoint;
use crate::metering;
use crate::ops::suspend::memory_image_present;
use crate::record::{self, now_ms, MachineRecord};
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

impl Agent {
    pub(crate) async fn start_op(
        &self,
        id: &str,
        source: EventSource,
    ) -> Result<StartStopResponse> {
        let mut mark = Instant::now();
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        let mut steps = StepTimes::new();
        steps.lap("agent_lock_load", &mut mark);
        let previous_state = record.state;
        match state::plan(record.state, Action::Start)? {
            ActionPlan::AlreadyDone => Ok(StartStopResponse {
                previous_state,
                machine: self.api_view(&record),
                note: Some("machine was already started".into()),
                timings: Vec::new(),
                resumed: false,
            }),
            ActionPlan::Proceed(_) => {
                if source == EventSource::User {
                    record.restart_count = 0;
                }
                let (boot_steps, resumed, note) = if previous_state == MachineState::Suspended {
                    let (boot_steps, lost) = self.resume(&mut record, source).await?;
                    let note = lost.map(|why| {
                        format!(
                            "the memory image could not be resumed ({why}); booted fresh from disk"
                        )
                    });
                    (boot_steps, note.is_none(), note)
                } else {
                    (self.boot(&mut record, source).await?, false, None)
                };
                steps.append(boot_steps);
                Ok(StartStopResponse {
                    previous_state,
                    machine: self.api_view(&record),
                    note,
                    timings: steps
                        .into_iter()
                        .map(|s| StepTiming {
                            step: s.step,
                            us: s.us,
                        })
                        .collect(),
                    resumed,
                })
            }
        }
    }

    /// Boots a Machine whose lock the caller holds. Only runtime work: the rootfs stack and
    /// the bundle were laid out at create.
    /// Starts the Machine's init; returns where the time went.
    pub(crate) async fn boot(
        &self,
        record: &mut MachineRecord,
        source: EventSource,
    ) -> Result<StepTimes> {
        let mut steps = StepTimes::new();
        let mut mark = Instant::now();
        // Before anything is reserved or recorded: a driver gone from this worker (runsc
        // uninstalled) leaves the Machine as it was.
        let driver = self.driver(&record.config)?.clone();
        self.enter_starting(record).await?;
        steps.lap("agent_store_starting", &mut mark);
        failpoint::hit("start.after_starting");
        self.launch(record, source, &driver, &mut steps, mark)
            .await?;
        Ok(steps)
    }

    /// Starts a suspended Machine whose lock the caller holds from its memory image. One
    /// whose image is missing or damaged, or that the driver fails to restore, boots fresh
    /// from its disk instead, after a `memory_lost` event; the answer then says why.
    async fn resume(
        &self,
        record: &mut MachineRecord,
        source: EventSource,
    ) -> Result<(StepTimes, Option<String>)> {
        let mut steps = StepTimes::new();
        let mut mark = Instant::now();
        let driver = self.driver(&record.config)?.clone();
        self.enter_starting(record).await?;
        steps.lap("agent_store_starting", &mut mark);
        failpoint::hit("resume.after_starting");
        let layout = self.layout(&record.id);
        let image = layout.memory_image();
        let resumed = driver
            .resume(&layout, &record.rootfs.lowerdirs(), &image)
            .await;
        let error = match resumed {
            Ok(started) => {
                let runtime_us = micros(mark.elapsed());
                let inside_us = started.steps.total_us();
                steps.append(started.steps);
                steps.record("runtime_other", runtime_us.saturating_sub(inside_us));
                mark = Instant::now();
                failpoint::hit("resume.after_runtime_resume");
                // The driver removed the image once the Machine ran; whatever it could
                // not remove goes now, so no later start resumes a past run.
                if memory_image_present(&image) {
                    self.discard_memory(&record.id).await?;
                }
                let mut usage = vec![metering::open_run(record, started.started_at_ms)];
                usage.extend(memory_gone(record, started.started_at_ms));
                let change = Change::event(EventKind::Resume, source)
                    .at(started.started_at_ms)
                    .usage(&usage);
                self.change_state(record, MachineState::Started, change)
                    .await?;
                steps.lap("agent_store_started", &mut mark);
                failpoint::hit("resume.after_record_started");
                self.watch(record);
                self.run_checks(record);
                return Ok((steps, None));
            }
            Err(error) => error,
        };
        // Nothing of the restore may run beside the fresh boot.
        if let Err(cleanup_error) = driver.cleanup(&layout).await {
            warn!(machine = %record.id, %cleanup_error, "cleanup after a failed resume");
        }
        let why = error.to_string();
        warn!(machine = %record.id, %why, "the memory image cannot be resumed; booting fresh");
        let at = now_ms();
        let usage: Vec<UsageRecord> = memory_gone(record, at).into_iter().collect();
        let change = Change::event(EventKind::MemoryLost, source)
            .at(at)
            .reason(&why)
            .usage(&usage);
        self.save_in_state(record, change).await?;
        self.discard_memory(&record.id).await?;
        steps.lap("agent_memory_lost", &mut mark);
        self.launch(record, source, &driver, &mut steps, mark)
            .await?;
        Ok((steps, Some(why)))
    }

    /// Reserves the host's share and records `starting` for a new run.
    async fn enter_starting(&self, record: &mut MachineRecord) -> Result<()> {
        self.reserve(record)?;
        record.run_generation += 1;
        record.restart_due_ms = None;
        if let Err(error) = self
            .change_state(record, MachineState::Starting, Change::quiet())
            .await
        {
            self.release(&record.id);
            return Err(error);
        }
        Ok(())
    }

    /// The runtime's start of a Machine recorded `starting`, and its outcome recorded:
    /// `started` and watched, or `failed` and cleaned up.
    async fn launch(
        &self,
        record: &mut MachineRecord,
        source: EventSource,
        driver: &Arc<dyn Runtime>,
        steps: &mut StepTimes,
        mut mark: Instant,
    ) -> Result<()> {
        let layout = self.layout(&record.id);
        match driver.start(&layout, &record.rootfs.lowerdirs()).await {
            Ok(started) => {
                let runtime_us = micros(mark.elapsed());
                let inside_us = started.steps.total_us();
                steps.append(started.steps);
                // Hops to blocking threads and back, inside the runtime's start.
                steps.record("runtime_other", runtime_us.saturating_sub(inside_us));
                mark = Instant::now();
                failpoint::hit("start.after_runtime_start");
                let usage = [metering::open_run(record, started.started_at_ms)];
                let change = Change::event(EventKind::Start, source)
                    .at(started.started_at_ms)
                    .usage(&usage);
                self.change_state(record, MachineState::Started, change)
                    .await?;
                steps.lap("agent_store_started", &mut mark);
                failpoint::hit("start.after_record_started");
                self.watch(record);
                self.run_checks(record);
                Ok(())
            }
            Err(error) => {
                self.release(&record.id);
                if let Err(cleanup_error) = driver.cleanup(&layout).await {
                    warn!(machine = %record.id, %cleanup_error, "cleanup after a failed start");
                }
                let now = now_ms();
                record.last_exit = Some(ExitInfo {
                    exit_code: None,
                    signal: None,
                    oom_killed: false,
                    reason: "start_failed".into(),
                    exited_at: record::format_ms(now),
                });
                let reason = error.to_string();
                let change = Change::event(EventKind::StartFailed, source)
                    .at(now)
                    .reason(&reason);
                self.change_state(record, MachineState::Failed, change)
                    .await?;
                Err(AgentError::StartFailed {
                    id: record.id.clone(),
                    source: error,
                })
            }
        }
    }
}

/// The memory image's bytes come off the Machine's storage: its bookkeeping, for the
/// journal entry written with the change that ends the image.
pub(crate) fn memory_gone(record: &mut MachineRecord, at_ms: i64) -> Option<UsageRecord> {
    if record.memory_bytes == 0 {
        return None;
    }
    let bytes = record.storage_bytes.saturating_sub(record.memory_bytes);
    record.memory_bytes = 0;
    Some(metering::storage(record, at_ms, bytes))
}
