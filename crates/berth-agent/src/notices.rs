//! Notices of every recorded state change, told to the one listener (the control plane)
//! right after the record is durable, and the snapshot a reconnecting listener starts from.

use std::sync::Arc;

use berth_api::{EventKind, EventSource, MachineState};

use crate::error::Result;
use crate::record::MachineRecord;
use crate::service::{MachineNotice, NoticeSnapshot, WorkerListener};
use crate::store;
use crate::Agent;

impl Agent {
    /// Registers the one listener; a later one replaces it.
    pub(crate) fn listen(&self, listener: Arc<dyn WorkerListener>) {
        if let Ok(mut slot) = self.inner.listener.write() {
            *slot = Some(listener);
        }
    }

    fn listener(&self) -> Option<std::sync::Arc<dyn crate::WorkerListener>> {
        self.inner
            .listener
            .read()
            .ok()
            .and_then(|slot| slot.clone())
    }

    pub(crate) fn notify(
        &self,
        record: &MachineRecord,
        event: &store::MachineEvent,
        event_id: Option<i64>,
    ) {
        let Some(listener) = self.listener() else {
            return;
        };
        listener.on_event(&notice_of(record, event, event_id));
    }

    /// The id of the newest event is read before the records, so a change racing the
    /// snapshot is either in it or among the live notices after it.
    pub(crate) async fn snapshot_notices(&self) -> Result<NoticeSnapshot> {
        let last_event_id = self.inner.store.last_event_id().await?;
        let records = self.inner.store.list_all().await?;
        let machines = records
            .iter()
            .map(|record| {
                let event = store::MachineEvent {
                    kind: EventKind::Snapshot,
                    source: EventSource::System,
                    state: record.state,
                    exit_code: None,
                    reason: None,
                    at_ms: record.updated_at_ms,
                };
                notice_of(record, &event, None)
            })
            .collect();
        Ok(NoticeSnapshot {
            last_event_id,
            machines,
        })
    }

    pub(crate) fn notify_destroyed(&self, record: &MachineRecord, source: EventSource) {
        let event = store::MachineEvent {
            kind: EventKind::Destroy,
            source,
            state: MachineState::Destroyed,
            exit_code: None,
            reason: None,
            at_ms: record.updated_at_ms,
        };
        self.notify(record, &event, None);
    }
}

fn notice_of(
    record: &MachineRecord,
    event: &store::MachineEvent,
    event_id: Option<i64>,
) -> MachineNotice {
    MachineNotice {
        id: record.id.clone(),
        app: record.app.clone(),
        event_id,
        kind: event.kind,
        source: event.source,
        state: record.state,
        instance_id: record.instance_id.clone(),
        cpus: record.config.guest.cpus,
        memory_mb: record.config.guest.memory_mb,
        exit_code: event.exit_code,
        reason: event.reason.clone(),
        at_ms: event.at_ms,
    }
}
