//! Destroy: record `destroying`, remove everything of the Machine from the host, then
//! delete its record with the journal's last entry.

use berth_api::MachineState;
use berth_core::state::{self, Action, ActionPlan};
use tracing::info;

use crate::error::Result;
use crate::failpoint;
use crate::metering;
use crate::record::now_ms;
use crate::service::EventSource;
use crate::transition::Change;
use crate::Agent;

impl Agent {
    pub(crate) async fn destroy_op(&self, id: &str, force: bool) -> Result<()> {
        let guard = self.lock(id).await?;
        let record = self.load(id).await?;
        Self::refuse_if_moving(&record)?;
        self.destroy_locked(guard, record, force, EventSource::User)
            .await
    }

    /// Destroys a stopped Machine still in run `generation`, as the system (`auto_destroy`).
    pub(crate) async fn destroy_if(&self, id: &str, generation: u64) -> Result<()> {
        let guard = self.lock(id).await?;
        let Some(record) = self.inner.store.get(id).await? else {
            return Ok(());
        };
        if record.run_generation != generation || record.state != MachineState::Stopped {
            return Ok(());
        }
        info!(machine = %id, "exited with auto_destroy: destroying");
        self.destroy_locked(guard, record, false, EventSource::System)
            .await
    }

    async fn destroy_locked(
        &self,
        _guard: tokio::sync::OwnedMutexGuard<()>,
        mut record: crate::record::MachineRecord,
        force: bool,
        source: EventSource,
    ) -> Result<()> {
        let id = record.id.clone();
        let id = id.as_str();
        let ActionPlan::Proceed(transitional) =
            state::plan(record.state, Action::Destroy { force })?
        else {
            return Ok(());
        };
        self.change_state(&mut record, transitional, Change::quiet())
            .await?;
        failpoint::hit("destroy.after_record_destroying");
        self.driver_or_default(&record.config)
            .remove(&self.layout(id))
            .await?;
        failpoint::hit("destroy.after_remove");
        let usage = metering::destroyed(&mut record, now_ms());
        self.inner.store.delete_with_usage(id, &usage).await?;
        failpoint::hit("destroy.after_record_deleted");
        // The volumes stay, free for another Machine. A crash before this is settled by
        // recovery, which releases claims of Machines that are gone.
        let volumes: Vec<String> = record
            .config
            .mounts
            .iter()
            .map(|mount| mount.volume.clone())
            .collect();
        self.release_volumes(id, &volumes).await;
        if let Ok(mut locks) = self.inner.locks.lock() {
            locks.remove(id);
        }
        self.forget_schedule(id);
        // Nothing is left to write: the record is gone. The listener still hears it.
        record.enter(MachineState::Destroyed, now_ms())?;
        self.notify_destroyed(&record, source);
        info!(machine = %id, "destroyed");
        Ok(())
    }
}
