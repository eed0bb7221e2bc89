//! Where a Machine's state is written. Every change goes through [`Agent::change_state`],
//! which refuses an edge that berth-core's lifecycle table does not have
//! ([`MachineRecord::enter`]) before anything is written.

use berth_api::{EventKind, MachineState, UsageRecord};

use crate::error::Result;
use crate::record::{now_ms, MachineRecord};
use crate::service::EventSource;
use crate::store::MachineEvent;
use crate::Agent;

/// What a state change records beside the new state: when, the event that tells it (none
/// for the transitional states an operation passes through), and the usage it bills.
pub(crate) struct Change<'a> {
    at_ms: i64,
    event: Option<(EventKind, EventSource, Option<&'a str>)>,
    usage: &'a [UsageRecord],
    /// The change gives the Machine a new config (create, update): recorded in its
    /// version history in the same transaction.
    version: bool,
}

impl<'a> Change<'a> {
    /// Entering a transitional state, now, with no event.
    pub(crate) fn quiet() -> Self {
        Change {
            at_ms: now_ms(),
            event: None,
            usage: &[],
            version: false,
        }
    }

    /// A change told by an event of `kind` from `source`, now.
    pub(crate) fn event(kind: EventKind, source: EventSource) -> Self {
        Change {
            event: Some((kind, source, None)),
            ..Change::quiet()
        }
    }

    pub(crate) fn reason(mut self, reason: &'a str) -> Self {
        if let Some((_, _, slot)) = &mut self.event {
            *slot = Some(reason);
        }
        self
    }

    pub(crate) fn usage(mut self, usage: &'a [UsageRecord]) -> Self {
        self.usage = usage;
        self
    }

    pub(crate) fn at(mut self, at_ms: i64) -> Self {
        self.at_ms = at_ms;
        self
    }

    /// Records the record's config (and `instance_id`) as a new version.
    pub(crate) fn version(mut self) -> Self {
        self.version = true;
        self
    }
}

impl Agent {
    /// The one write of a Machine's state: checks the edge, then saves the record with its
    /// event and usage journal entries atomically, gives back the host's share of a
    /// Machine that no longer runs, and tells the listener.
    pub(crate) async fn change_state(
        &self,
        record: &mut MachineRecord,
        to: MachineState,
        change: Change<'_>,
    ) -> Result<()> {
        record.enter(to, change.at_ms)?;
        self.save_in_state(record, change).await
    }

    /// Saves the record in the state it is in, with the change's event and usage: create's
    /// first event (the record was written `created`, pending, before the host was
    /// touched), and the second half of [`Agent::change_state`].
    pub(crate) async fn save_in_state(
        &self,
        record: &MachineRecord,
        change: Change<'_>,
    ) -> Result<()> {
        let event = change.event.map(|(kind, source, reason)| MachineEvent {
            kind,
            source,
            state: record.state,
            exit_code: record.last_exit.as_ref().and_then(|exit| exit.exit_code),
            reason: reason.map(str::to_owned),
            at_ms: record.updated_at_ms,
        });
        let event_id = self
            .inner
            .store
            .save_versioned(record, event.as_ref(), change.usage, change.version)
            .await?;
        self.release_unless_running(record);
        if record.state != MachineState::Started {
            self.end_checks(&record.id);
        }
        if let Some(event) = &event {
            self.notify(record, event, event_id);
        }
        Ok(())
    }

    /// A Machine that no longer runs gives its CPUs and memory back (a suspending one still
    /// holds them until its checkpoint ends the run).
    fn release_unless_running(&self, record: &MachineRecord) {
        if !matches!(
            record.state,
            MachineState::Starting | MachineState::Started | MachineState::Suspending
        ) {
            self.release(&record.id);
        }
    }
}
