//! `config.schedule`: the agent starts each scheduled Machine once a period, as its
//! restart policy starts it after a crash (the control plane hears of the start through
//! the usual notice). A Machine still running when its time comes is left to run. Starts
//! that fell due while the agent was down are not made up.

use std::time::Duration;

use berth_api::MachineState;
use berth_core::schedule;
use tracing::{info, warn};

use crate::error::Result;
use crate::record::now_ms;
use crate::service::{EventSource, WorkerService};
use crate::Agent;

/// The longest the scheduler sleeps: a Machine created meanwhile waits at most this long
/// past its first due time.
const LONGEST_SLEEP: Duration = Duration::from_secs(30);

impl Agent {
    pub(crate) fn spawn_scheduler(&self) {
        let agent = self.clone();
        tokio::spawn(async move {
            loop {
                let next = match agent.run_schedules_at(now_ms()).await {
                    Ok(next) => next,
                    Err(error) => {
                        warn!(%error, "starting scheduled machines");
                        None
                    }
                };
                let sleep = next
                    .map(|due| Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0)))
                    .map_or(LONGEST_SLEEP, |until| until.min(LONGEST_SLEEP));
                tokio::time::sleep(sleep.max(Duration::from_millis(10))).await;
            }
        });
    }

    pub(crate) fn forget_schedule(&self, id: &str) {
        if let Ok(mut fired) = self.inner.fired.lock() {
            fired.remove(id);
        }
    }

    /// Starts every scheduled Machine whose start fell due after its last one and at or
    /// before `now_ms`; answers when the next one is due. The agent's own loop passes the
    /// wall clock; tests pass any time.
    pub async fn run_schedules_at(&self, now_ms: i64) -> Result<Option<i64>> {
        let mut next: Option<i64> = None;
        for record in self.inner.store.list_all().await? {
            let Some(kind) = record.config.schedule else {
                continue;
            };
            let created = record.created_at_ms;
            let due = schedule::last_due_ms(kind, created, now_ms);
            let following = match due {
                None => schedule::nth_start_ms(kind, created, 1),
                Some(due) => {
                    let k = (1..)
                        .find(|k| schedule::nth_start_ms(kind, created, *k) > due)
                        .unwrap_or(1);
                    schedule::nth_start_ms(kind, created, k)
                }
            };
            next = Some(next.map_or(following, |next| next.min(following)));
            let Some(due) = due else {
                continue;
            };
            let fresh = match self.inner.fired.lock() {
                Ok(mut fired) => {
                    let last = fired
                        .get(&record.id)
                        .copied()
                        .unwrap_or(self.inner.opened_ms);
                    if due > last {
                        fired.insert(record.id.clone(), due);
                    }
                    due > last
                }
                Err(_) => false,
            };
            let resting = matches!(
                record.state,
                MachineState::Created | MachineState::Stopped | MachineState::Failed
            );
            if fresh && resting {
                info!(machine = %record.id, schedule = ?kind, "starting on schedule");
                if let Err(error) = self.start(&record.id, EventSource::System).await {
                    warn!(machine = %record.id, %error, "scheduled start failed");
                }
            }
        }
        Ok(next)
    }
}
