//! Start: reserve the host's share, record `starting`, start the init, record `started`
//! with the run's opening in the usage journal, and watch the run.

use std::time::Instant;

use berth_api::{EventKind, ExitInfo, MachineState, StartStopResponse, StepTiming};
use berth_core::state::{self, Action, ActionPlan};
use berth_runtime::timing::{micros, StepTimes};
use tracing::warn;

use crate::error::{AgentError, Result};
use crate::failpoint;
use crate::metering;
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
            }),
            ActionPlan::Proceed(_) => {
                if source == EventSource::User {
                    record.restart_count = 0;
                }
                steps.append(self.boot(&mut record, source).await?);
                Ok(StartStopResponse {
                    previous_state,
                    machine: self.api_view(&record),
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
        steps.lap("agent_store_starting", &mut mark);
        failpoint::hit("start.after_starting");
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
                Ok(steps)
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
