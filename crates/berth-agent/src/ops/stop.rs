//! Stop: record `stopping`, signal, wait out the grace period, SIGKILL, and record
//! `stopped` with the run's end; of a suspended Machine, discard its memory image. [`Agent::halt`] is also how update and recovery end a run.

use std::time::Duration;

use berth_api::{CloseBasis, EventKind, MachineState, StartStopResponse, StopRequest, UsageRecord};
use berth_core::state::{self, Action, ActionPlan};
use berth_core::validate;
use berth_runtime::ExitRecord;

use crate::error::Result;
use crate::exits::unknown_exit;
use crate::failpoint;
use crate::ops::start::memory_gone;
use crate::record::{now_ms, MachineRecord};
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// After SIGKILL, how long to wait for the kernel to tear the process down.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);

impl Agent {
    pub(crate) async fn stop_op(
        &self,
        id: &str,
        request: StopRequest,
    ) -> Result<StartStopResponse> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        let (signal, timeout) = Self::stop_parameters(&record, &request)?;
        let previous_state = record.state;
        match state::plan(record.state, Action::Stop)? {
            ActionPlan::AlreadyDone => Ok(StartStopResponse {
                previous_state,
                machine: self.api_view(&record),
                note: Some(format!("machine was already {previous_state}")),
                timings: Vec::new(),
                resumed: false,
            }),
            ActionPlan::Proceed(_) if previous_state == MachineState::Suspended => {
                self.stop_suspended(&mut record, &request).await?;
                Ok(StartStopResponse {
                    previous_state,
                    machine: self.api_view(&record),
                    note: Some("the memory image was discarded".into()),
                    timings: Vec::new(),
                    resumed: false,
                })
            }
            ActionPlan::Proceed(transitional) => {
                self.change_state(&mut record, transitional, Change::quiet())
                    .await?;
                failpoint::hit("stop.after_stopping");
                let exit = self.halt(&mut record, signal, timeout).await?;
                failpoint::hit("stop.after_halt");
                let source = request.source.map_or(EventSource::User, EventSource::from);
                self.record_stopped(
                    &mut record,
                    &exit,
                    CloseBasis::Observed,
                    (EventKind::Stop, source),
                    None,
                )
                .await?;
                failpoint::hit("stop.after_record_stopped");
                Ok(StartStopResponse {
                    previous_state,
                    machine: self.api_view(&record),
                    note: None,
                    timings: Vec::new(),
                    resumed: false,
                })
            }
        }
    }

    /// Stop of a suspended Machine: nothing runs to signal; its memory image goes, and
    /// with it the image's bytes from its storage. Recorded `stopping` first, so a crash
    /// before the end finishes the stop (and recovery discards what is left).
    async fn stop_suspended(
        &self,
        record: &mut MachineRecord,
        request: &StopRequest,
    ) -> Result<()> {
        self.change_state(record, MachineState::Stopping, Change::quiet())
            .await?;
        failpoint::hit("stop.after_stopping");
        self.discard_memory(&record.id).await?;
        failpoint::hit("stop.after_halt");
        let at = now_ms();
        let usage: Vec<UsageRecord> = memory_gone(record, at).into_iter().collect();
        let source = request.source.map_or(EventSource::User, EventSource::from);
        let change = Change::event(EventKind::Stop, source)
            .at(at)
            .reason("memory_discarded")
            .usage(&usage);
        self.change_state(record, MachineState::Stopped, change)
            .await?;
        failpoint::hit("stop.after_record_stopped");
        Ok(())
    }

    /// Stops a running Machine whose lock the caller holds: signal, grace period, SIGKILL.
    pub(crate) async fn halt(
        &self,
        record: &mut MachineRecord,
        signal: i32,
        timeout: Duration,
    ) -> Result<ExitRecord> {
        let layout = self.layout(&record.id);
        let runtime = self.driver_or_default(&record.config);
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

    pub(crate) fn stop_parameters(
        record: &MachineRecord,
        request: &StopRequest,
    ) -> Result<(i32, Duration)> {
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
