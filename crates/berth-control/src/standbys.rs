//! Fly's standby Machines: `config.standbys` lists the Machines (of the same app) a
//! Machine stands by for. It is placed on another worker than theirs where one fits, and
//! when a started Machine's worker has sent no heartbeat for [`ControlConfig::standby_after`]
//! the control plane starts that Machine's stopped standbys, with the event source
//! `standby`.
//!
//! Replicas on one database share the `standby_starts` claims: one row per standby and
//! outage (the dead worker and its last heartbeat), taken with one insert, so one
//! replica starts a standby once per outage. A claim that was not marked done is taken
//! over after [`CLAIM_EXPIRY_MS`] (its replica died in the middle).
//!
//! [`ControlConfig::standby_after`]: crate::ControlConfig::standby_after

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use berth_api::{Machine, MachineState};
use berth_worker::EventSource;
use sqlx::{AnyPool, Row};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::workers::HEARTBEAT_GRACE;
use crate::{now_ms, ControlPlane};

/// The default of `--standby-after-secs`.
pub const DEFAULT_STANDBY_AFTER: Duration = Duration::from_secs(30);

/// How often a replica looks for workers gone long enough.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A claim not marked done after this long is another replica's that died mid-start.
const CLAIM_EXPIRY_MS: i64 = 60_000;

/// Most Machines one Machine may stand by for.
const MAX_STANDBYS: usize = 16;

pub(crate) const SCHEMA: &[&str] = &[
    // Machine `standby_id` stands by for `target_id` (its `config.standbys`).
    "CREATE TABLE IF NOT EXISTS standbys (
        standby_id TEXT NOT NULL,
        target_id TEXT NOT NULL,
        app TEXT NOT NULL,
        PRIMARY KEY (standby_id, target_id)
    )",
    "CREATE INDEX IF NOT EXISTS standbys_by_target ON standbys(target_id)",
    "CREATE TABLE IF NOT EXISTS standby_starts (
        standby_id TEXT NOT NULL,
        outage TEXT NOT NULL,
        claimed_at_ms INTEGER NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (standby_id, outage)
    )",
];

/// The delay may not be shorter than the heartbeat grace: a worker is reachable until then.
pub fn check_delay(delay: Duration) -> Result<(), String> {
    if delay < HEARTBEAT_GRACE {
        return Err(format!(
            "must be at least {}s, the time after which a silent worker is unreachable",
            HEARTBEAT_GRACE.as_secs()
        ));
    }
    Ok(())
}

fn invalid(message: String) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_standbys",
        message,
    )
}

impl ControlPlane {
    /// Checks `config.standbys` of Machine `own` (`None` at create): ids of other Machines
    /// of `app`, each once. Answers the workers of those Machines.
    pub(crate) async fn standby_targets(
        &self,
        app: &str,
        own: Option<&str>,
        standbys: &[String],
    ) -> Result<Vec<String>, ApiError> {
        if standbys.len() > MAX_STANDBYS {
            return Err(invalid(format!(
                "config.standbys lists {} Machines; at most {MAX_STANDBYS}",
                standbys.len()
            )));
        }
        let mut workers = Vec::new();
        for (index, id) in standbys.iter().enumerate() {
            if standbys[..index].contains(id) {
                return Err(invalid(format!("config.standbys lists {id} twice")));
            }
            if own == Some(id.as_str()) {
                return Err(invalid(format!(
                    "config.standbys: Machine {id} cannot stand by for itself"
                )));
            }
            let Some(row) = self.store.machine(app, id).await? else {
                return Err(invalid(format!(
                    "config.standbys: {id} is not a Machine of app {app}"
                )));
            };
            if !workers.contains(&row.worker) {
                workers.push(row.worker);
            }
        }
        Ok(workers)
    }

    /// Records what Machine `id` stands by for, replacing what it stood by for before.
    pub(crate) async fn record_standbys(
        &self,
        app: &str,
        id: &str,
        standbys: &[String],
    ) -> Result<(), ApiError> {
        let mut transaction = self.store.pool().begin().await?;
        sqlx::query("DELETE FROM standbys WHERE standby_id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        for target in standbys {
            sqlx::query("INSERT INTO standbys (standby_id, target_id, app) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(target)
                .bind(app)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// One look: the standbys of started Machines on workers silent for `after`.
    async fn watch_standbys(&self, after: Duration) -> Result<(), ApiError> {
        let now = now_ms();
        let silent_since = now - i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let gone = sqlx::query(
            "SELECT name, heartbeat_ms FROM workers
             WHERE url IS NOT NULL AND heartbeat_ms IS NOT NULL AND heartbeat_ms < $1",
        )
        .bind(silent_since)
        .fetch_all(self.store.pool())
        .await?;
        for worker in gone {
            let name: String = worker.get(0);
            let heartbeat_ms: i64 = worker.get(1);
            let pairs = sqlx::query(
                "SELECT s.standby_id, s.target_id, s.app FROM standbys s
                 JOIN machines m ON m.id = s.target_id WHERE m.worker = $1
                 ORDER BY s.standby_id, s.target_id",
            )
            .bind(&name)
            .fetch_all(self.store.pool())
            .await?;
            let outage = format!("{name}@{heartbeat_ms}");
            for pair in pairs {
                let standby: String = pair.get(0);
                let target: String = pair.get(1);
                let app: String = pair.get(2);
                if !self.was_started(&target).await? {
                    continue;
                }
                if let Err(error) = self
                    .start_standby(&app, &standby, &target, &name, &outage, now)
                    .await
                {
                    warn!(%standby, %target, worker = %name, error = %error.body.message, "standby not started");
                }
            }
        }
        Ok(())
    }

    /// The Machine was `started` when its worker was last heard from: as its notices said
    /// (an exit of its own included), else as last answered through the API.
    async fn was_started(&self, id: &str) -> Result<bool, ApiError> {
        if let crate::quota::Admission::Shared(_) = &self.admission {
            let row = sqlx::query("SELECT running, state_event FROM machines WHERE id = $1")
                .bind(id)
                .fetch_optional(self.store.pool())
                .await?;
            if let Some(row) = row {
                let noticed: Option<i64> = row.get(1);
                if noticed.is_some() {
                    return Ok(row.get::<i64, _>(0) == 1);
                }
            }
        } else if !self.usage.running(id) {
            // This process follows every notice of a worker it reaches.
            return Ok(false);
        }
        let last = self.last_known.get(&self.store, id).await?;
        Ok(last
            .and_then(|json| serde_json::from_str::<Machine>(&json).ok())
            .is_some_and(|machine| machine.state == MachineState::Started))
    }

    /// Starts `standby` once for this outage, unless it runs already.
    async fn start_standby(
        &self,
        app: &str,
        standby: &str,
        target: &str,
        dead_worker: &str,
        outage: &str,
        now: i64,
    ) -> Result<(), ApiError> {
        let Some(row) = self.store.machine(app, standby).await? else {
            return Ok(());
        };
        if row.worker == dead_worker {
            return Ok(());
        }
        let pool = self.store.pool();
        if !claim(pool, standby, outage, now).await? {
            return Ok(());
        }
        let result = self.start_claimed(app, &row, target, dead_worker).await;
        // The standby's worker (or the database) cannot be reached now: a later look
        // tries again.
        let retry =
            matches!(&result, Err(error) if error.status == StatusCode::SERVICE_UNAVAILABLE);
        settle(pool, standby, outage, !retry).await?;
        result
    }

    async fn start_claimed(
        &self,
        app: &str,
        row: &crate::store::MachineIndexRow,
        target: &str,
        dead_worker: &str,
    ) -> Result<(), ApiError> {
        let current = self.worker(&row.worker)?.get(&row.id).await?;
        if !matches!(
            current.state,
            MachineState::Stopped | MachineState::Created | MachineState::Suspended
        ) {
            return Ok(());
        }
        let app_row = self
            .store
            .app(app)
            .await?
            .ok_or_else(|| ApiError::not_found("app"))?;
        let mut timing = crate::timing::ServerTiming::since(None);
        self.start_admitted(&app_row, row, EventSource::Standby, &mut timing)
            .await?;
        info!(
            standby = %row.id,
            %target,
            worker = %dead_worker,
            "started a standby: the worker of a Machine it stands by for is unreachable"
        );
        Ok(())
    }
}

/// Takes the start of `standby` for `outage`: true for one caller, on every replica, until
/// [`settle`] gives it back (or it expires unsettled).
async fn claim(pool: &AnyPool, standby: &str, outage: &str, now: i64) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO standby_starts (standby_id, outage, claimed_at_ms) VALUES ($1, $2, $3)
         ON CONFLICT (standby_id, outage) DO UPDATE SET claimed_at_ms = $3
         WHERE standby_starts.done = 0 AND standby_starts.claimed_at_ms < $4",
    )
    .bind(standby)
    .bind(outage)
    .bind(now)
    .bind(now - CLAIM_EXPIRY_MS)
    .execute(pool)
    .await?;
    Ok(claimed.rows_affected() > 0)
}

/// Ends a claim: `done` keeps it for good, else it is given back for a later look.
async fn settle(
    pool: &AnyPool,
    standby: &str,
    outage: &str,
    done: bool,
) -> Result<(), sqlx::Error> {
    let statement = if done {
        "UPDATE standby_starts SET done = 1 WHERE standby_id = $1 AND outage = $2"
    } else {
        "DELETE FROM standby_starts WHERE standby_id = $1 AND outage = $2"
    };
    sqlx::query(statement)
        .bind(standby)
        .bind(outage)
        .execute(pool)
        .await?;
    Ok(())
}

/// Watches for workers gone long enough, on every replica (claims keep starts single).
pub(crate) fn spawn_watcher(control: &Arc<ControlPlane>, after: Duration) {
    let weak = Arc::downgrade(control);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(control) = weak.upgrade() else {
                return;
            };
            if let Err(error) = control.watch_standbys(after).await {
                warn!(error = %error.body.message, "standby watch");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool() -> AnyPool {
        crate::store::install_drivers();
        // One connection: each in-memory connection is a database of its own.
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("pool");
        crate::store::upgrade_sqlite(&pool).await.expect("schema");
        pool
    }

    #[tokio::test]
    async fn a_standby_is_claimed_once_per_outage() {
        let pool = pool().await;
        let now = 1_000_000;
        assert!(claim(&pool, "s1", "w1@5", now).await.unwrap());
        // Another replica's look, a moment later: taken.
        assert!(!claim(&pool, "s1", "w1@5", now + 1000).await.unwrap());
        // Other standbys and later outages are claims of their own.
        assert!(claim(&pool, "s2", "w1@5", now).await.unwrap());
        assert!(claim(&pool, "s1", "w1@9", now).await.unwrap());
        // Done: never again for that outage, however late.
        settle(&pool, "s1", "w1@5", true).await.unwrap();
        assert!(!claim(&pool, "s1", "w1@5", now + 10 * CLAIM_EXPIRY_MS)
            .await
            .unwrap());
        // Given back: the next look takes it.
        settle(&pool, "s2", "w1@5", false).await.unwrap();
        assert!(claim(&pool, "s2", "w1@5", now + 1000).await.unwrap());
        // Unsettled (its replica died): taken over once it has expired, not before.
        assert!(!claim(&pool, "s1", "w1@9", now + CLAIM_EXPIRY_MS - 1)
            .await
            .unwrap());
        assert!(claim(&pool, "s1", "w1@9", now + CLAIM_EXPIRY_MS + 1)
            .await
            .unwrap());
    }
}
