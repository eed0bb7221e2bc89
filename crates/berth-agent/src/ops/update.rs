//! Update: lay out the new image first, record the old config as pending, end the run,
//! replace the bundle, record `stopped`, and start again unless asked not to.

use berth_api::{CloseBasis, EventKind, Machine, MachineState, StopRequest, UpdateMachineRequest};
use berth_core::state::{self, Action, ActionPlan};
use berth_core::validate;
use berth_image::PullScope;

use crate::error::{AgentError, Result};
use crate::exits::exit_info;
use crate::failpoint;
use crate::record::{now_ms, PendingOp, UpdateSnapshot};
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

impl Agent {
    pub(crate) async fn update_op(
        &self,
        id: &str,
        mut request: UpdateMachineRequest,
        scope: PullScope,
    ) -> Result<Machine> {
        validate::validate_config(&request.config)?;
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        let ActionPlan::Proceed(transitional) = state::plan(record.state, Action::Update)? else {
            return Ok(record.to_api());
        };
        // A config that names no driver keeps the Machine's (Fly's clients never name
        // one); another driver is taken like another image: the Machine is laid out for
        // it again. One this worker lacks is refused before anything changes.
        if request.config.runtime.is_none() {
            request.config.runtime = record.config.runtime.clone();
        }
        let driver = self.driver(&request.config)?.clone();
        // Resolve and lay out the new image first; a bad update changes nothing.
        let lease = self.inner.images.lease();
        let (image, pull_events) = self
            .resolve_image(&request.config.image, &lease, &scope)
            .await?;
        let files = crate::files::guest_files(&request.config)?;
        // New mounts' volumes are claimed before anything changes (a refusal changes
        // nothing); removed ones stay the Machine's until the update has ended, so a
        // rollback finds the old attachment as it was.
        let claimed = self
            .claim_volumes(id, &record.app, &mut request.config.mounts)
            .await?;
        // The network was made at create; update keeps the address and the org.
        let spec = match self.machine_spec(&record, &request.config, &image) {
            Ok(spec) => spec,
            Err(error) => {
                self.release_volumes(id, &claimed).await;
                return Err(error.into());
            }
        };
        let was_running = record.state == MachineState::Started;
        let was_suspended = record.state == MachineState::Suspended;
        record.pending = Some(PendingOp::Update {
            previous: Box::new(UpdateSnapshot {
                config: record.config.clone(),
                image_ref: record.image_ref.clone(),
                rootfs: record.rootfs.clone(),
                instance_id: record.instance_id.clone(),
            }),
        });
        self.change_state(&mut record, transitional, Change::quiet())
            .await?;
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
        if was_suspended {
            // The memory belongs to the old config; a rollback leaves the Machine stopped.
            usage.extend(crate::ops::start::memory_gone(&mut record, now_ms()));
            self.discard_memory(id).await?;
        }
        if request.config.rootfs.persist != berth_api::RootfsPersist::Always {
            reset_dir(&layout.upper()).await?;
        }
        if request.config.runtime != record.config.runtime {
            // The old driver's run state goes before the new driver lays the Machine out.
            self.driver_or_default(&record.config)
                .cleanup(&layout)
                .await?;
        }
        driver.prepare(&layout, &spec).await?;
        let new_rootfs = self.rootfs_stack(id, &image);
        self.write_guest_files(id, files, new_rootfs.lowerdirs())
            .await?;
        failpoint::hit("update.after_prepare");
        let now = now_ms();
        record.instance_id =
            berth_core::ids::new_instance_id(u64::try_from(now).unwrap_or_default());
        record.image_ref = Self::image_ref(&image);
        record.rootfs = new_rootfs;
        record.config = request.config;
        record.pending = None;
        self.inner.store.add_events(id, &pull_events).await?;
        let change = Change::event(EventKind::Update, EventSource::User)
            .at(now)
            .usage(&usage)
            .version();
        self.change_state(&mut record, MachineState::Stopped, change)
            .await?;
        failpoint::hit("update.after_record_updated");
        self.release_unmounted(id, &record.app, &record.config.mounts)
            .await;
        drop(lease);
        if !request.skip_launch {
            record.restart_count = 0;
            self.boot(&mut record, EventSource::User).await?;
        }
        Ok(self.api_view(&record))
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
