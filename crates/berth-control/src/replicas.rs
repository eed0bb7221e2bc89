//! The control plane processes sharing one database. Each picks an id when it starts and
//! stamps its row in `replicas` every [`HEARTBEAT`]; one seen within [`LIVE_MS`] is live.
//! What a replica began (an idempotent call, a move) is taken over by another only once
//! the first is no longer live, and the rate limits are split between the live ones.
//! Liveness compares the replicas' wall clocks, so their hosts keep time (NTP): a skew
//! adds to or takes from [`LIVE_MS`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyPool;

use crate::ControlPlane;

pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS replicas (
        id TEXT PRIMARY KEY NOT NULL,
        seen_ms INTEGER NOT NULL
    )"];

/// How often a replica stamps its row.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica not seen for this long is taken for dead: several missed heartbeats, so a
/// slow database round trip does not make a working replica look gone.
pub(crate) const LIVE_MS: i64 = 5000;
/// Rows of replicas gone this long are dropped.
const FORGET_MS: i64 = 24 * 3600 * 1000;

/// SQL for "the replica in column `column` is not live"; `$cutoff` is the bind index of
/// [`Replicas::cutoff`]. A `NULL` replica (a row from before replicas were recorded) is
/// not live.
pub(crate) fn not_live(column: &str, cutoff: usize) -> String {
    format!(
        "({column} IS NULL OR {column} NOT IN (SELECT id FROM replicas WHERE seen_ms >= ${cutoff}))"
    )
}

/// This replica: its id and how many replicas were live at its last heartbeat.
pub(crate) struct Replicas {
    id: String,
    live: AtomicUsize,
}

impl Replicas {
    /// Picks this replica's id and stamps its first row. `sole`: no other process can
    /// share the database (a SQLite file), so the rows of earlier runs are dropped rather
    /// than counted as live for their last seconds.
    pub(crate) async fn join(pool: &AnyPool, sole: bool) -> Result<Replicas, sqlx::Error> {
        let replicas = Replicas {
            id: hex::encode(rand::random::<[u8; 8]>()),
            live: AtomicUsize::new(1),
        };
        if sole {
            sqlx::query("DELETE FROM replicas").execute(pool).await?;
        }
        replicas.beat(pool).await?;
        Ok(replicas)
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Replicas live at the last heartbeat, this one included (so at least 1).
    pub(crate) fn live_count(&self) -> usize {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// The oldest `seen_ms` of a live replica, now.
    pub(crate) fn cutoff() -> i64 {
        crate::now_ms().saturating_sub(LIVE_MS)
    }

    /// Stamps this replica's row and counts the live ones.
    pub(crate) async fn beat(&self, pool: &AnyPool) -> Result<(), sqlx::Error> {
        let now = crate::now_ms();
        sqlx::query(
            "INSERT INTO replicas (id, seen_ms) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET seen_ms = excluded.seen_ms",
        )
        .bind(&self.id)
        .bind(now)
        .execute(pool)
        .await?;
        let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM replicas WHERE seen_ms >= $1")
            .bind(now.saturating_sub(LIVE_MS))
            .fetch_one(pool)
            .await?;
        self.live
            .store(usize::try_from(live).unwrap_or(1).max(1), Ordering::Relaxed);
        sqlx::query("DELETE FROM replicas WHERE seen_ms < $1")
            .bind(now.saturating_sub(FORGET_MS))
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Drops this replica's row, so that what it began is taken over at once rather
    /// than after [`LIVE_MS`].
    pub(crate) async fn leave(&self, pool: &AnyPool) {
        if let Err(error) = sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(&self.id)
            .execute(pool)
            .await
        {
            tracing::warn!(%error, "removing this replica's row");
        }
    }
}

/// Stamps this replica's row every [`HEARTBEAT`] for as long as the control plane lives.
pub(crate) fn spawn_heartbeat(control: &Arc<ControlPlane>) {
    let weak = Arc::downgrade(control);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(control) = weak.upgrade() else {
                return;
            };
            if control.store.pool().is_closed() {
                return;
            }
            if let Err(error) = control.replicas.beat(control.store.pool()).await {
                tracing::warn!(%error, "stamping this replica's row");
            }
        }
    });
}
