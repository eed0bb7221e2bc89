//! Destroy: record `destroying`, remove everything of the Machine from the host, then
//! delete its record with the journal's last entry.

use berth_api::MachineState;
use berth_core::state::{self, Action, ActionPlan};
use tracing::info;

use crate::error::Result;
use crate::failpoint;
use crate::metering;
use crate::record::now_ms;
use crate::transition::Change;
use crate::Agent;

impl Agent {
    pub(crate) async fn destroy_op(&self, id: &str, force: bool) -> Result<()> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let ActionPlan::Proceed(transitional) =
            state::plan(record.state, Action::Destroy { force })?
        else {
            return Ok(());
        };
        self.change_state(&mut record, transitional, Change::quiet())
            .await?;
        failpoint::hit("destroy.after_record_destroying");
        self.inner.runtime.remove(&self.layout(id)).await?;
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
        // Nothing is left to write: the record is gone. The listener still hears it.
        record.enter(MachineState::Destroyed, now_ms())?;
        self.notify_destroyed(&record);
        info!(machine = %id, "destroyed");
        Ok(())
    }
}
