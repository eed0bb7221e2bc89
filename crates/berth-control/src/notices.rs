//! What the control plane hears from its workers: every recorded state change keeps the
//! quota accounting true and wakes the waiters of that Machine. Nothing here polls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use berth_api::MachineState;
use berth_worker::{EventSource, MachineNotice, WorkerListener};
use tokio::sync::watch;

use crate::limits::Share;
use crate::ControlPlane;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub state: MachineState,
    pub instance_id: String,
    /// The event that left the Machine in `state`; `None` when read without one.
    pub event_id: Option<i64>,
}

/// One watch channel per Machine somebody waits on; it lives while they wait.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    by_machine: Mutex<HashMap<String, watch::Sender<Option<Snapshot>>>>,
}

impl Waiters {
    pub(crate) fn subscribe(&self, id: &str) -> watch::Receiver<Option<Snapshot>> {
        let mut map = match self.by_machine.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(id.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    fn publish(&self, id: &str, snapshot: Snapshot) {
        if let Ok(map) = self.by_machine.lock() {
            if let Some(sender) = map.get(id) {
                sender.send_replace(Some(snapshot));
            }
        }
    }

    /// Drops the Machine's channel once nobody waits on it any more.
    pub(crate) fn release(&self, id: &str) {
        if let Ok(mut map) = self.by_machine.lock() {
            if map
                .get(id)
                .is_some_and(|sender| sender.receiver_count() == 0)
            {
                map.remove(id);
            }
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.by_machine
            .lock()
            .map(|map| map.values().map(watch::Sender::receiver_count).sum())
            .unwrap_or(0)
    }
}

pub(crate) struct ControlListener {
    control: Weak<ControlPlane>,
}

impl ControlListener {
    pub(crate) fn new(control: &Arc<ControlPlane>) -> ControlListener {
        ControlListener {
            control: Arc::downgrade(control),
        }
    }
}

impl WorkerListener for ControlListener {
    fn on_event(&self, notice: &MachineNotice) {
        let Some(control) = self.control.upgrade() else {
            return;
        };
        let org = control.org_of_app(&notice.app).unwrap_or_default();
        control.observe_state(
            &org,
            &notice.id,
            notice.state,
            Share {
                cpus: u64::from(notice.cpus),
                memory_mb: u64::from(notice.memory_mb),
            },
            notice.event_id,
        );
        control.waiters.publish(
            &notice.id,
            Snapshot {
                state: notice.state,
                instance_id: notice.instance_id.clone(),
                event_id: notice.event_id,
            },
        );
        // A Machine its worker destroyed by itself (`auto_destroy`) leaves the index as a
        // destroy through the API does: its name and quota slot free up, its leases go.
        if notice.state == MachineState::Destroyed && notice.source == EventSource::System {
            let id = notice.id.clone();
            tokio::spawn(async move {
                if let Err(error) = control.store.delete_machine(&id).await {
                    tracing::warn!(machine = %id, %error, "forgetting an auto-destroyed Machine");
                }
                if let Err(error) = crate::leases::forget(&control, &id).await {
                    tracing::warn!(machine = %id, error = %error.body.message, "forgetting its leases");
                }
            });
        }
    }
}

impl ControlPlane {
    /// How many `wait` calls are parked right now.
    pub fn waiting(&self) -> usize {
        self.waiters.count()
    }
}
