//! Where start and create are admitted against an org's Machine quotas.
//!
//! On SQLite the control plane is one process: its [`Usage`] table in memory, under one
//! lock, decides, as it always has. On PostgreSQL several replicas admit at once, so the
//! database decides: a start claims its Machine's index row (`claim_ms`) in one statement
//! that takes the org's advisory lock and counts the org's started Machines
//! (`berth_claim_start`, one round trip); a create counts and inserts under the same lock.
//! The workers' notices, which every replica follows, keep each row's `running` in step
//! (ordered by event id, so a late replica cannot undo a newer notice), and a `started`
//! notice ends the claim. A claim whose replica died lapses after [`CLAIM_LIFETIME_MS`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_api::{MachineState, Quotas};
use sqlx::Row;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::limits::{self, Share};
use crate::store::{Backend, ControlStore, Inserted, MachineIndexRow};
use crate::ControlPlane;

/// How long an unconfirmed start claim counts: far longer than any start takes, short
/// enough that a replica that died mid-start frees its slot soon.
pub(crate) const CLAIM_LIFETIME_MS: i64 = 60_000;

/// A start's (or a launching create's) hold on its org's quota, until the worker's notice
/// takes over. Dropped without [`StartClaim::keep`] (the start failed, or was cancelled),
/// it gives the hold back.
pub(crate) enum StartClaim {
    /// The in-memory reservation; dropping it releases it.
    Local(#[allow(dead_code)] limits::Reservation),
    Shared {
        store: ControlStore,
        machine: String,
        kept: bool,
    },
    /// A create that does not launch holds nothing.
    Nothing,
}

impl StartClaim {
    /// The start went through: the worker's `started` notice ends a shared claim (ending
    /// it here could leave the Machine uncounted until that notice lands).
    pub(crate) fn keep(mut self) {
        if let StartClaim::Shared { kept, .. } = &mut self {
            *kept = true;
        }
    }
}

impl Drop for StartClaim {
    fn drop(&mut self) {
        let StartClaim::Shared {
            store,
            machine,
            kept: false,
        } = self
        else {
            return;
        };
        let (store, machine) = (store.clone(), std::mem::take(machine));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Off the answer's path; if it never lands the claim lapses by itself.
        runtime.spawn(async move {
            if let Err(error) = sqlx::query("UPDATE machines SET claim_ms = NULL WHERE id = $1")
                .bind(&machine)
                .execute(store.pool())
                .await
            {
                tracing::warn!(%machine, %error, "giving back a start's quota claim");
            }
        });
    }
}

/// One Machine's state as its worker reported it, for the shared `running` column.
#[derive(Debug, Clone)]
struct Observed {
    running: bool,
    event_id: Option<i64>,
}

/// Writes the workers' notices into the index rows, one at a time and newest first per
/// Machine, so a burst (a notice stream's snapshot on reconnecting) cannot take the pool.
pub(crate) struct StateWriter {
    pending: Arc<Mutex<HashMap<String, Observed>>>,
    /// What this replica last heard of each Machine: only a change is written (its own
    /// notice stream is in order; the other replicas write the same changes).
    heard: Arc<Mutex<HashMap<String, bool>>>,
    wake: mpsc::UnboundedSender<()>,
}

impl StateWriter {
    fn start(store: ControlStore) -> StateWriter {
        let pending: Arc<Mutex<HashMap<String, Observed>>> = Arc::default();
        let (wake, mut woken) = mpsc::unbounded_channel::<()>();
        let heard: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
        let (queue, forget) = (pending.clone(), heard.clone());
        tokio::spawn(async move {
            while woken.recv().await.is_some() {
                let batch: Vec<(String, Observed)> = match queue.lock() {
                    Ok(mut queue) => queue.drain().collect(),
                    Err(poisoned) => poisoned.into_inner().drain().collect(),
                };
                for (machine, observed) in batch {
                    if let Err(error) = write_observed(&store, &machine, &observed).await {
                        tracing::warn!(%machine, %error, "recording a Machine's state for quotas");
                        // The next notice of it is written, changed or not.
                        if let Ok(mut heard) = forget.lock() {
                            heard.remove(&machine);
                        }
                    }
                }
            }
        });
        StateWriter {
            pending,
            heard,
            wake,
        }
    }

    fn push(&self, machine: &str, observed: Observed, destroyed: bool) {
        {
            let mut heard = match self.heard.lock() {
                Ok(heard) => heard,
                Err(poisoned) => poisoned.into_inner(),
            };
            let unchanged = heard.get(machine) == Some(&observed.running);
            if destroyed {
                heard.remove(machine);
            } else {
                heard.insert(machine.to_owned(), observed.running);
            }
            if unchanged {
                return;
            }
        }
        let mut queue = match self.pending.lock() {
            Ok(queue) => queue,
            Err(poisoned) => poisoned.into_inner(),
        };
        let newer = queue
            .get(machine)
            .is_none_or(|queued| queued.event_id <= observed.event_id);
        if newer {
            queue.insert(machine.to_owned(), observed);
        }
        drop(queue);
        let _ = self.wake.send(());
    }
}

/// Applies one notice: a notice older than the row's last is skipped (another replica
/// wrote a newer one); `started` ends the start's claim.
async fn write_observed(
    store: &ControlStore,
    machine: &str,
    observed: &Observed,
) -> Result<(), sqlx::Error> {
    let running = i64::from(observed.running);
    match observed.event_id {
        Some(event_id) => {
            sqlx::query(
                "UPDATE machines SET running = $1, state_event = $2,
                 claim_ms = CASE WHEN $1 = 1 THEN NULL ELSE claim_ms END
                 WHERE id = $3 AND (state_event IS NULL OR state_event < $2)",
            )
            .bind(running)
            .bind(event_id)
            .bind(machine)
            .execute(store.pool())
            .await?;
        }
        // Read from a listing, without an event: it stands unless a notice came first.
        None => {
            sqlx::query("UPDATE machines SET running = $1 WHERE id = $2 AND state_event IS NULL")
                .bind(running)
                .bind(machine)
                .execute(store.pool())
                .await?;
        }
    }
    Ok(())
}

/// The admission of starts and creates: this process's memory, or the shared database.
pub(crate) enum Admission {
    Local,
    Shared(StateWriter),
}

impl Admission {
    pub(crate) fn new(store: &ControlStore) -> Admission {
        match store.backend() {
            Backend::Sqlite => Admission::Local,
            Backend::Postgres => Admission::Shared(StateWriter::start(store.clone())),
        }
    }
}

fn refused(quota: &str, row: &sqlx::any::AnyRow) -> ApiError {
    let limit = u64::try_from(row.get::<i64, _>(1)).unwrap_or(0);
    let current = u64::try_from(row.get::<i64, _>(2)).unwrap_or(0);
    limits::exceeded(quota, limit, current)
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl ControlPlane {
    /// A worker's word on a Machine's state: the quota view of this replica, and on a
    /// shared store the Machine's row.
    pub(crate) fn observe_state(
        &self,
        org: &str,
        machine: &str,
        state: MachineState,
        share: Share,
        event_id: Option<i64>,
    ) {
        self.usage.observe(org, machine, state, share);
        if let Admission::Shared(writer) = &self.admission {
            writer.push(
                machine,
                Observed {
                    running: state == MachineState::Started,
                    event_id,
                },
                state == MachineState::Destroyed,
            );
        }
    }

    /// Checks that `machine` may start with `share` within `quotas` and holds its place
    /// until the worker reports it started.
    pub(crate) async fn claim_start(
        &self,
        org: &str,
        machine: &str,
        share: Share,
        quotas: &Quotas,
    ) -> Result<StartClaim, ApiError> {
        if matches!(self.admission, Admission::Local) {
            return Ok(StartClaim::Local(
                self.usage.reserve(org, machine, share, quotas)?,
            ));
        }
        let now = crate::now_ms();
        let row = sqlx::query(
            "SELECT quota, limit_value, current_value FROM berth_claim_start($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(org)
        .bind(machine)
        .bind(signed(share.cpus))
        .bind(signed(share.memory_mb))
        .bind(now)
        .bind(now - CLAIM_LIFETIME_MS)
        .bind(signed(quotas.max_started_machines))
        .bind(signed(quotas.max_cpus))
        .bind(signed(quotas.max_memory_mb))
        .fetch_one(self.store.pool())
        .await?;
        let quota: String = row.get(0);
        if !quota.is_empty() {
            return Err(refused(&quota, &row));
        }
        Ok(StartClaim::Shared {
            store: self.store.clone(),
            machine: machine.to_owned(),
            kept: false,
        })
    }

    /// Indexes a new Machine within the org's `max_machines`, and, when it launches,
    /// claims its start: no two creates can both take the last slot, on any replica.
    pub(crate) async fn admit_create(
        &self,
        org: &str,
        row: &MachineIndexRow,
        launch: Option<Share>,
        quotas: &Quotas,
    ) -> Result<StartClaim, ApiError> {
        let already = || {
            ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "already_exists",
                format!("app {} already has a machine named {}", row.app, row.name),
            )
        };
        if matches!(self.admission, Admission::Local) {
            // The count and the insert happen under the org's lock.
            let _org = self.lock_org(org).await;
            let machines = self.store.count_org_machines(org).await?;
            if machines >= quotas.max_machines {
                return Err(limits::exceeded(
                    "max_machines",
                    quotas.max_machines,
                    machines,
                ));
            }
            let claim = match launch {
                Some(share) => StartClaim::Local(self.usage.reserve(org, &row.id, share, quotas)?),
                None => StartClaim::Nothing,
            };
            if self.store.insert_machine(row).await? == Inserted::AlreadyExists {
                return Err(already());
            }
            return Ok(claim);
        }
        let mut transaction = self.store.pool().begin().await?;
        sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtextextended('berth-org:' || $1, 0))) AS locked")
            .bind(org)
            .execute(&mut *transaction)
            .await?;
        let machines: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM machines JOIN apps ON machines.app = apps.name WHERE apps.org_slug = $1",
        )
        .bind(org)
        .fetch_one(&mut *transaction)
        .await?;
        let machines = u64::try_from(machines).unwrap_or(0);
        if machines >= quotas.max_machines {
            return Err(limits::exceeded(
                "max_machines",
                quotas.max_machines,
                machines,
            ));
        }
        if ControlStore::insert_machine_in(&mut transaction, row).await? == Inserted::AlreadyExists
        {
            return Err(already());
        }
        let claim = match launch {
            None => StartClaim::Nothing,
            Some(share) => {
                let now = crate::now_ms();
                // The same lock again (held already): the started quotas and the claim.
                let claimed = sqlx::query(
                    "SELECT quota, limit_value, current_value FROM berth_claim_start($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(org)
                .bind(&row.id)
                .bind(signed(share.cpus))
                .bind(signed(share.memory_mb))
                .bind(now)
                .bind(now - CLAIM_LIFETIME_MS)
                .bind(signed(quotas.max_started_machines))
                .bind(signed(quotas.max_cpus))
                .bind(signed(quotas.max_memory_mb))
                .fetch_one(&mut *transaction)
                .await?;
                let quota: String = claimed.get(0);
                if !quota.is_empty() {
                    return Err(refused(&quota, &claimed));
                }
                StartClaim::Shared {
                    store: self.store.clone(),
                    machine: row.id.clone(),
                    kept: false,
                }
            }
        };
        transaction.commit().await?;
        Ok(claim)
    }
}
