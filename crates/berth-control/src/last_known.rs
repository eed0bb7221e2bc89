//! The last known state of each Machine, answered while its worker is unreachable. It is
//! remembered after every change; one background task writes it to the store, so a start
//! or stop does not wait for that write. Reads look at the unwritten entries first, so
//! they never see an older state than the newest change. A crash can lose the newest
//! entries, which only makes the cache older, never wrong about which worker holds what.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use crate::store::ControlStore;

type Pending = Arc<Mutex<HashMap<String, (u64, String)>>>;

pub(crate) struct LastKnown {
    /// id → (change number, JSON) not yet in the store.
    pending: Pending,
    wake: Arc<Notify>,
    changes: std::sync::atomic::AtomicU64,
    _writer: AbortOnDropHandle<()>,
}

impl LastKnown {
    pub(crate) fn start(store: ControlStore) -> LastKnown {
        let pending: Pending = Arc::default();
        let wake = Arc::new(Notify::new());
        let writer = {
            let (pending, wake) = (pending.clone(), wake.clone());
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    write_pending(&store, &pending).await;
                }
            })
        };
        LastKnown {
            pending,
            wake,
            changes: Default::default(),
            _writer: AbortOnDropHandle::new(writer),
        }
    }

    pub(crate) fn remember(&self, id: &str, json: String) {
        let change = self
            .changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id.to_owned(), (change, json));
        }
        self.wake.notify_one();
    }

    pub(crate) async fn get(
        &self,
        store: &ControlStore,
        id: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        let unwritten = self
            .pending
            .lock()
            .ok()
            .and_then(|pending| pending.get(id).map(|(_, json)| json.clone()));
        match unwritten {
            Some(json) => Ok(Some(json)),
            None => store.last_known_machine(id).await,
        }
    }

    /// Writes what is pending now (at shutdown).
    pub(crate) async fn flush(&self, store: &ControlStore) {
        write_pending(store, &self.pending).await;
    }
}

async fn write_pending(store: &ControlStore, pending: &Pending) {
    let batch: Vec<(String, u64, String)> = match pending.lock() {
        Ok(pending) => pending
            .iter()
            .map(|(id, (change, json))| (id.clone(), *change, json.clone()))
            .collect(),
        Err(_) => return,
    };
    for (id, change, json) in batch {
        if let Err(error) = store.remember_machine(&id, &json).await {
            tracing::warn!(machine = %id, %error, "caching the machine's last known state");
        }
        // Keep it pending if it changed again meanwhile: the next pass writes that one.
        if let Ok(mut pending) = pending.lock() {
            if pending
                .get(&id)
                .is_some_and(|(latest, _)| *latest == change)
            {
                pending.remove(&id);
            }
        }
    }
}
