//! Suspend: record `suspending`, have the driver checkpoint the run with its memory into
//! the Machine's directory (which ends the run), and record `suspended` with the run's end
//! and the memory image counted as storage in the usage journal. A start resumes it
//! ([`Agent::boot`]); stop, update and destroy discard the image.
//!
//! The image is `<machine dir>/memory`, written whole by the driver (into `memory.partial`,
//! then renamed with its manifest) or not at all. It exists only while the record says
//! `suspended`, or for a moment around a suspend or resume; recovery discards it
//! everywhere else ([`berth_core::recovery::keeps_memory_image`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use berth_api::{CloseBasis, EventKind, MachineState, StartStopResponse, StepTiming, UsageRecord};
use berth_core::state::{self, Action, ActionPlan};
use berth_runtime::timing::StepTimes;
use berth_runtime::MachineLayout;
use tracing::info;

use crate::error::{AgentError, Result};
use crate::failpoint;
use crate::metering;
use crate::record::{now_ms, MachineRecord};
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

impl Agent {
    pub(crate) async fn suspend_op(
        &self,
        id: &str,
        source: EventSource,
    ) -> Result<StartStopResponse> {
        let mut mark = Instant::now();
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        let driver = self.driver(&record.config)?.clone();
        // Before the state: a Machine whose driver cannot suspend never will, whatever
        // state it is in.
        if !driver.can_suspend() {
            return Err(AgentError::SuspendUnsupported {
                id: id.to_owned(),
                driver: driver.name().to_owned(),
            });
        }
        let previous_state = record.state;
        let mut steps = StepTimes::new();
        steps.lap("agent_lock_load", &mut mark);
        if state::plan(record.state, Action::Suspend)? == ActionPlan::AlreadyDone {
            return Ok(StartStopResponse {
                previous_state,
                machine: self.api_view(&record),
                note: Some("machine was already suspended".into()),
                timings: Vec::new(),
                resumed: false,
            });
        }
        self.change_state(&mut record, MachineState::Suspending, Change::quiet())
            .await?;
        steps.lap("agent_store_suspending", &mut mark);
        failpoint::hit("suspend.after_suspending");
        let layout = self.layout(id);
        // A checkpoint that failed with the run going on (refused for open connections,
        // say) leaves the Machine `started` at once. A crash here, or a run that ended,
        // is settled by recovery and the exit watcher from what the host shows.
        if let Err(error) = driver.suspend(&layout, &layout.memory_image()).await {
            if matches!(
                driver.status(&layout).await,
                Ok(berth_runtime::Status::Running { .. })
            ) {
                self.change_state(&mut record, MachineState::Started, Change::quiet())
                    .await?;
            }
            return Err(error.into());
        }
        steps.lap("runtime_checkpoint", &mut mark);
        failpoint::hit("suspend.after_checkpoint");
        let at = now_ms();
        let usage = self
            .suspended_usage(&mut record, &layout, at, CloseBasis::Observed)
            .await;
        steps.lap("agent_measure", &mut mark);
        let change = Change::event(EventKind::Suspend, source)
            .at(at)
            .usage(&usage);
        self.change_state(&mut record, MachineState::Suspended, change)
            .await?;
        steps.lap("agent_store_suspended", &mut mark);
        failpoint::hit("suspend.after_record_suspended");
        info!(machine = %id, memory_bytes = record.memory_bytes, "suspended");
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
            resumed: false,
        })
    }

    /// The journal entries of a run that ended in a checkpoint at `at_ms`: the run closes,
    /// and storage is the upperdir plus the memory image (kept in `memory_bytes`, so a
    /// resume or discard takes it off without measuring again).
    pub(crate) async fn suspended_usage(
        &self,
        record: &mut MachineRecord,
        layout: &MachineLayout,
        at_ms: i64,
        basis: CloseBasis,
    ) -> Vec<UsageRecord> {
        let mut usage: Vec<UsageRecord> = metering::close_run(record, at_ms, basis)
            .into_iter()
            .collect();
        let image = layout.memory_image();
        let memory = tokio::task::spawn_blocking(move || metering::disk_usage(&image))
            .await
            .ok()
            .and_then(std::result::Result::ok)
            .unwrap_or_default();
        record.memory_bytes = memory;
        let upper = self.measure_upper(&record.id).await;
        let stored = upper.map_or(record.storage_bytes, |upper| upper.saturating_add(memory));
        usage.push(metering::storage(record, at_ms, stored));
        usage
    }

    /// Removes the Machine's memory image (and any half-written one). The caller journals
    /// its bytes off the Machine's storage with its change first
    /// ([`crate::ops::start::memory_gone`]). Idempotent.
    pub(crate) async fn discard_memory(&self, id: &str) -> Result<()> {
        let image = self.layout(id).memory_image();
        tokio::task::spawn_blocking(move || remove_memory_image(&image))
            .await
            .map_err(|error| AgentError::Internal(format!("discard task: {error}")))?
            .map_err(|error| AgentError::Internal(format!("discard the memory image: {error}")))
    }
}

/// A half-written image of `image`, as the driver names it.
pub(crate) fn partial_image(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    image.with_file_name(name)
}

/// Whether a sealed image (one whose manifest was written last) is there. Only a resume
/// checks it whole.
pub(crate) fn memory_image_sealed(image: &Path) -> bool {
    image
        .join(berth_runtime::gvisor::image::MANIFEST_FILE)
        .is_file()
}

/// Whether anything of a memory image, whole or half-written, is there.
pub(crate) fn memory_image_present(image: &Path) -> bool {
    image.exists() || partial_image(image).exists()
}

fn remove_memory_image(image: &Path) -> std::io::Result<()> {
    for dir in [partial_image(image), image.to_path_buf()] {
        match std::fs::remove_dir_all(&dir) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_sealed_only_with_its_manifest_and_removal_takes_both_halves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("memory");
        assert!(!memory_image_present(&image) && !memory_image_sealed(&image));
        std::fs::create_dir_all(partial_image(&image)).expect("partial");
        assert_eq!(partial_image(&image), dir.path().join("memory.partial"));
        assert!(memory_image_present(&image) && !memory_image_sealed(&image));
        std::fs::create_dir_all(&image).expect("image");
        std::fs::write(image.join("checkpoint.img"), b"pages").expect("write");
        assert!(!memory_image_sealed(&image), "no manifest yet");
        std::fs::write(image.join("manifest.json"), b"{}").expect("write");
        assert!(memory_image_sealed(&image));
        remove_memory_image(&image).expect("remove");
        assert!(!memory_image_present(&image));
        remove_memory_image(&image).expect("idempotent");
    }
}
