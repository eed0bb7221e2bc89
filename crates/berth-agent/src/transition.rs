//! Where a Machine's state is written.

use berth_api::{MachineState, UsageRecord};
use berth_core::state;

use crate::error::Result;
use crate::record::{now_ms, MachineRecord};
use crate::service::EventSource;
use crate::store::MachineEvent;
use crate::Agent;

impl Agent {
    pub(crate) async fn save_event(
        &self,
        record: &MachineRecord,
        kind: &str,
        source: EventSource,
        reason: Option<&str>,
    ) -> Result<()> {
        self.save_transition(record, kind, source, reason, &[])
            .await
    }

    /// Saves a state change with its event and its usage journal entries, atomically.
    pub(crate) async fn save_transition(
        &self,
        record: &MachineRecord,
        kind: &str,
        source: EventSource,
        reason: Option<&str>,
        usage: &[UsageRecord],
    ) -> Result<()> {
        let event = MachineEvent {
            kind: kind.to_owned(),
            source: source.as_str().to_owned(),
            state: record.state.as_str().to_owned(),
            exit_code: record.last_exit.as_ref().and_then(|exit| exit.exit_code),
            reason: reason.map(str::to_owned),
            at_ms: record.updated_at_ms,
        };
        let event_id = self
            .inner
            .store
            .save_full(record, Some(&event), usage)
            .await?;
        self.release_unless_running(record);
        self.notify(record, &event, event_id);
        Ok(())
    }

    /// A Machine that no longer runs gives its CPUs and memory back.
    pub(crate) fn release_unless_running(&self, record: &MachineRecord) {
        if !matches!(record.state, MachineState::Starting | MachineState::Started) {
            self.release(&record.id);
        }
    }

    pub(crate) async fn set_state(
        &self,
        record: &mut MachineRecord,
        state: MachineState,
    ) -> Result<()> {
        debug_assert!(
            state::can_transition(record.state, state),
            "{} -> {state}",
            record.state
        );
        record.state = state;
        record.updated_at_ms = now_ms();
        self.inner.store.save(record, None).await?;
        self.release_unless_running(record);
        Ok(())
    }
}
