//! The workers of a cluster: registration (with the join token), heartbeats, cordon, and
//! what placement knows of each. In-process workers (`berth up`) and remote agents
//! (`berth agent`) look the same from here: each is a `WorkerService`.
//!
//! The `workers` table is the truth, shared by every replica of the control plane: a
//! heartbeat, a cordon or a registration through one replica is written there, and each
//! replica reads it back every [`REFRESH_INTERVAL`] into its own view (which worker
//! services it holds and follows). Placement reads the table itself, and takes a worker's
//! room in one transaction on the worker's row, so two replicas never both take its last
//! room.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use berth_api::{RegisterWorker, Resources, Worker, WorkerRegistered, WorkerStats};
use berth_core::placement::{self, PlacementRequest, Strategy, WorkerCapacity};
use berth_worker::{RemoteWorker, WorkerService};
use sha2::{Digest, Sha256};
use sqlx::{AnyPool, Row};
use subtle::ConstantTimeEq;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::{format_ms, now_ms, ControlPlane, Shared};

/// A worker that has not heartbeaten for this long takes no new Machines and shows as
/// unreachable.
pub const HEARTBEAT_GRACE: Duration = Duration::from_secs(10);

/// How often a replica reads the `workers` table back: workers registered, cordoned or
/// heartbeaten through another replica show here within this (placement itself reads the
/// table, so it never waits for it).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A placement whose replica stopped refreshing it for this long is a dead replica's and
/// no longer counts.
const PLACEMENT_EXPIRY_MS: i64 = 30_000;

/// How many times a first registration retries when another took the same ordinal.
const ORDINAL_RETRIES: usize = 8;

#[derive(Clone)]
pub(crate) struct WorkerEntry {
    pub service: Arc<dyn WorkerService>,
    pub region: String,
    pub url: Option<String>,
    pub capacity: Resources,
    pub cordoned: bool,
    pub machine_prefix: String,
    pub last_heartbeat_ms: Option<i64>,
    pub stats: WorkerStats,
    /// The drivers it offers, as it registered them.
    pub runtimes: Vec<String>,
}

/// A heartbeat this long after a create ended surely counts its Machine (its stats are
/// read when it is sent, and the create ended on the worker before it ended here).
const HEARTBEAT_COUNTS_AFTER_MS: i64 = 1000;

impl WorkerEntry {
    fn healthy(&self, now: i64) -> bool {
        healthy(self.url.is_some(), self.last_heartbeat_ms, now)
    }
}

fn healthy(remote: bool, last_heartbeat_ms: Option<i64>, now: i64) -> bool {
    // An in-process worker cannot be unreachable.
    !remote || last_heartbeat_ms.is_some_and(|at| now - at <= HEARTBEAT_GRACE.as_millis() as i64)
}

pub(crate) struct Workers {
    entries: RwLock<BTreeMap<String, WorkerEntry>>,
    join_token_hash: [u8; 32],
    join_token: String,
    cluster_prefix: String,
    /// This process among the replicas: its placements carry it.
    replica: String,
    /// Placements of this process whose creates run: refreshed while they do.
    running_placements: Arc<AtomicUsize>,
    /// Workers learned from the table whose Machines this replica has not adopted yet.
    unadopted: std::sync::Mutex<Vec<(String, Arc<dyn WorkerService>)>>,
}

pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS workers (
        name TEXT PRIMARY KEY NOT NULL,
        ordinal INTEGER NOT NULL UNIQUE,
        region TEXT NOT NULL,
        url TEXT,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        disk_mb INTEGER NOT NULL,
        cordoned INTEGER NOT NULL DEFAULT 0,
        heartbeat_ms INTEGER,
        used_cpus INTEGER NOT NULL DEFAULT 0,
        used_memory_mb INTEGER NOT NULL DEFAULT 0,
        used_disk_mb INTEGER NOT NULL DEFAULT 0,
        machine_count INTEGER NOT NULL DEFAULT 0,
        running_count INTEGER NOT NULL DEFAULT 0,
        runtimes TEXT NOT NULL DEFAULT ''
    )",
    "CREATE TABLE IF NOT EXISTS cluster (id INTEGER PRIMARY KEY CHECK (id = 1), ula_prefix TEXT NOT NULL)",
    // What one create (or move) placed on a worker, counted until a heartbeat that follows
    // its end; `touched_at_ms` is refreshed by the process running it.
    "CREATE TABLE IF NOT EXISTS placements (
        machine_id TEXT PRIMARY KEY NOT NULL,
        worker TEXT NOT NULL,
        replica TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        disk_mb INTEGER NOT NULL,
        starts INTEGER NOT NULL,
        touched_at_ms INTEGER NOT NULL,
        ended_at_ms INTEGER
    )",
    "CREATE INDEX IF NOT EXISTS placements_by_worker ON placements(worker)",
];

/// The `workers` columns added after the table was first made, for older SQLite files.
pub(crate) const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("heartbeat_ms", "INTEGER"),
    ("used_cpus", "INTEGER NOT NULL DEFAULT 0"),
    ("used_memory_mb", "INTEGER NOT NULL DEFAULT 0"),
    ("used_disk_mb", "INTEGER NOT NULL DEFAULT 0"),
    ("machine_count", "INTEGER NOT NULL DEFAULT 0"),
    ("running_count", "INTEGER NOT NULL DEFAULT 0"),
    // Comma-separated driver names; empty for a worker that registered before drivers
    // were reported (it takes only Machines that name none).
    ("runtimes", "TEXT NOT NULL DEFAULT ''"),
];

/// One row of `workers`, selected by [`WORKER_COLUMNS`].
struct WorkerRow {
    name: String,
    ordinal: i64,
    region: String,
    url: Option<String>,
    capacity: Resources,
    cordoned: bool,
    heartbeat_ms: Option<i64>,
    stats: WorkerStats,
    runtimes: Vec<String>,
}

const WORKER_COLUMNS: &str = "name, ordinal, region, url, cpus, memory_mb, disk_mb, cordoned, \
    heartbeat_ms, used_cpus, used_memory_mb, used_disk_mb, machine_count, running_count, \
    runtimes";

/// The `runtimes` column: driver names are plain words, so a comma list is enough.
fn runtimes_column(runtimes: &[String]) -> String {
    runtimes.join(",")
}

fn runtimes_of(column: &str) -> Vec<String> {
    column
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

fn unsigned(row: &sqlx::any::AnyRow, index: usize) -> u64 {
    u64::try_from(row.get::<i64, _>(index)).unwrap_or(0)
}

fn worker_row(row: &sqlx::any::AnyRow) -> WorkerRow {
    WorkerRow {
        name: row.get(0),
        ordinal: row.get(1),
        region: row.get(2),
        url: row.get(3),
        capacity: Resources {
            cpus: u32::try_from(row.get::<i64, _>(4)).unwrap_or_default(),
            memory_mb: unsigned(row, 5),
            disk_mb: unsigned(row, 6),
        },
        cordoned: row.get::<i64, _>(7) != 0,
        heartbeat_ms: row.get(8),
        stats: WorkerStats {
            used: Resources {
                cpus: u32::try_from(row.get::<i64, _>(9)).unwrap_or_default(),
                memory_mb: unsigned(row, 10),
                disk_mb: unsigned(row, 11),
            },
            machines: unsigned(row, 12),
            running: unsigned(row, 13),
        },
        runtimes: runtimes_of(&row.get::<String, _>(14)),
    }
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What placements a worker's heartbeats may not count yet add to its last report.
#[derive(Debug, Default, Clone, Copy)]
struct Placed {
    cpus: u64,
    memory_mb: u64,
    disk_mb: u64,
}

/// The sum of the live placements on each worker (or on `only`).
const PLACED_SQL: &str = "SELECT worker, CAST(COALESCE(SUM(CASE WHEN starts = 1 THEN cpus ELSE 0 END), 0) AS BIGINT),
    CAST(COALESCE(SUM(CASE WHEN starts = 1 THEN memory_mb ELSE 0 END), 0) AS BIGINT),
    CAST(COALESCE(SUM(disk_mb), 0) AS BIGINT)
    FROM placements WHERE (ended_at_ms IS NOT NULL OR touched_at_ms > $1) AND ($2 = '' OR worker = $2)
    GROUP BY worker";

fn capacity_of(row: &WorkerRow, placed: Placed, now: i64) -> WorkerCapacity {
    WorkerCapacity {
        name: row.name.clone(),
        region: row.region.clone(),
        cordoned: row.cordoned,
        healthy: healthy(row.url.is_some(), row.heartbeat_ms, now),
        cpus: row.capacity.cpus,
        memory_mb: row.capacity.memory_mb,
        disk_mb: row.capacity.disk_mb,
        running_cpus: row
            .stats
            .used
            .cpus
            .saturating_add(u32::try_from(placed.cpus).unwrap_or(u32::MAX)),
        running_memory_mb: row.stats.used.memory_mb.saturating_add(placed.memory_mb),
        used_disk_mb: row.stats.used.disk_mb.saturating_add(placed.disk_mb),
        runtimes: row.runtimes.clone(),
    }
}

/// What a create (or a move) places on a worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement<'a> {
    pub machine_id: &'a str,
    pub size: Resources,
    /// It will run (counts CPUs and memory, not just disk).
    pub starts: bool,
}

/// A create's (or a move's) room on a worker, held in the `placements` table while it
/// runs. Dropped without [`PlacementHold::create_ended`] (the call was cancelled), it
/// counts as a create that made its Machine: the worker's next heartbeat says.
pub(crate) struct PlacementHold {
    pool: AnyPool,
    machine_id: String,
    running: Arc<AtomicUsize>,
    ended: bool,
}

impl PlacementHold {
    fn end(&mut self) {
        if !std::mem::replace(&mut self.ended, true) {
            let _ = self
                .running
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| {
                    count.checked_sub(1)
                });
        }
    }

    /// The create ended: if it made the Machine, the worker's next heartbeat counts it;
    /// if not, nothing is left to count.
    pub(crate) async fn create_ended(mut self, made: bool) -> Result<(), sqlx::Error> {
        self.end();
        let query = if made {
            sqlx::query("UPDATE placements SET ended_at_ms = $2 WHERE machine_id = $1")
                .bind(&self.machine_id)
                .bind(now_ms())
        } else {
            sqlx::query("DELETE FROM placements WHERE machine_id = $1").bind(&self.machine_id)
        };
        query.execute(&self.pool).await?;
        Ok(())
    }
}

impl Drop for PlacementHold {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.end();
        let (pool, machine_id) = (self.pool.clone(), std::mem::take(&mut self.machine_id));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let ended = sqlx::query(
                    "UPDATE placements SET ended_at_ms = $2 WHERE machine_id = $1 AND ended_at_ms IS NULL",
                )
                .bind(&machine_id)
                .bind(now_ms())
                .execute(&pool)
                .await;
                if let Err(error) = ended {
                    tracing::warn!(machine = %machine_id, %error, "ending a cancelled create's placement");
                }
            });
        }
    }
}

/// The cluster's random ULA /48 (RFC 4193), made once and kept.
async fn cluster_prefix(pool: &AnyPool) -> Result<String, sqlx::Error> {
    if let Some(row) = sqlx::query("SELECT ula_prefix FROM cluster WHERE id = 1")
        .fetch_optional(pool)
        .await?
    {
        return Ok(row.get(0));
    }
    let random: [u8; 5] = rand::random();
    let prefix = format!(
        "fd{:02x}:{:02x}{:02x}:{:02x}{:02x}",
        random[0], random[1], random[2], random[3], random[4]
    );
    sqlx::query("INSERT INTO cluster (id, ula_prefix) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
        .bind(&prefix)
        .execute(pool)
        .await?;
    let row = sqlx::query("SELECT ula_prefix FROM cluster WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(row.get(0))
}

impl Workers {
    pub(crate) async fn open(pool: &AnyPool, join_token: &str) -> Result<Workers, sqlx::Error> {
        let cluster_prefix = cluster_prefix(pool).await?;
        let workers = Workers {
            entries: RwLock::new(BTreeMap::new()),
            join_token_hash: Sha256::digest(join_token.as_bytes()).into(),
            join_token: join_token.to_owned(),
            cluster_prefix,
            replica: hex::encode(rand::random::<[u8; 8]>()),
            running_placements: Arc::default(),
            unadopted: std::sync::Mutex::default(),
        };
        // Remote workers known from before a restart (or through another replica):
        // reachable as soon as they heartbeat; their Machines stay pinned to them meanwhile.
        workers.refresh(pool).await?;
        Ok(workers)
    }

    fn prefix_for(&self, ordinal: i64) -> String {
        format!("{}:{:04x}::/64", self.cluster_prefix, ordinal & 0xffff)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, WorkerEntry>> {
        self.entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, WorkerEntry>> {
        self.entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the `workers` table into this replica's view: answers the remote workers it
    /// did not know (registered through another replica, or before a restart, or learned
    /// by placement since the last refresh), whose Machines the caller adopts. Also keeps this replica's running placements alive and
    /// drops dead replicas' ones.
    pub(crate) async fn refresh(
        &self,
        pool: &AnyPool,
    ) -> Result<Vec<(String, Arc<dyn WorkerService>)>, sqlx::Error> {
        let now = now_ms();
        if self.running_placements.load(Ordering::Relaxed) > 0 {
            sqlx::query(
                "UPDATE placements SET touched_at_ms = $1 WHERE replica = $2 AND ended_at_ms IS NULL",
            )
            .bind(now)
            .bind(&self.replica)
            .execute(pool)
            .await?;
        }
        let rows = sqlx::query(&format!("SELECT {WORKER_COLUMNS} FROM workers"))
            .fetch_all(pool)
            .await?;
        let rows: Vec<WorkerRow> = rows.iter().map(worker_row).collect();
        self.learn(&rows);
        let mut entries = self.write();
        for row in rows {
            if let Some(entry) = entries.get_mut(&row.name) {
                if entry.url != row.url {
                    continue;
                }
                entry.region = row.region;
                entry.capacity = row.capacity;
                entry.cordoned = row.cordoned;
                entry.runtimes = row.runtimes;
                // The newest heartbeat any replica recorded, with its report.
                if row.heartbeat_ms > entry.last_heartbeat_ms {
                    entry.last_heartbeat_ms = row.heartbeat_ms;
                    entry.stats = row.stats;
                }
            }
        }
        drop(entries);
        Ok(self.take_unadopted())
    }

    /// Adds the remote workers of `rows` this replica does not hold (joined through
    /// another replica, or before a restart, or again with a new URL); they wait in
    /// `unadopted` until the caller adopts them.
    fn learn(&self, rows: &[WorkerRow]) {
        let mut entries = self.write();
        for row in rows {
            // A name reserved for a worker that has not joined yet, or an in-process
            // worker, which only its own process serves.
            let Some(url) = &row.url else { continue };
            if entries
                .get(&row.name)
                .is_some_and(|entry| entry.url.as_ref() == Some(url))
            {
                continue;
            }
            let Ok(service) = RemoteWorker::new(&row.name, url, &self.join_token) else {
                continue;
            };
            let service: Arc<dyn WorkerService> = Arc::new(service);
            entries.insert(
                row.name.clone(),
                WorkerEntry {
                    service: service.clone(),
                    region: row.region.clone(),
                    url: Some(url.clone()),
                    capacity: row.capacity,
                    cordoned: row.cordoned,
                    machine_prefix: self.prefix_for(row.ordinal),
                    last_heartbeat_ms: row.heartbeat_ms,
                    stats: row.stats,
                    runtimes: row.runtimes.clone(),
                },
            );
            self.unadopted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((row.name.clone(), service));
        }
    }

    fn take_unadopted(&self) -> Vec<(String, Arc<dyn WorkerService>)> {
        std::mem::take(
            &mut *self
                .unadopted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Inserts a worker's row with the next free ordinal, or runs `upsert` (which does the
    /// same with `ON CONFLICT`). Two first registrations at once may pick the same
    /// ordinal: the one that loses retries with the next.
    async fn insert_with_ordinal<'q>(
        pool: &AnyPool,
        query: impl Fn() -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<(), sqlx::Error> {
        let mut attempt = 0;
        loop {
            match query().execute(pool).await {
                Ok(_) => return Ok(()),
                Err(sqlx::Error::Database(error))
                    if error.is_unique_violation() && attempt < ORDINAL_RETRIES =>
                {
                    attempt += 1;
                    // Spread the retries of many joining at once.
                    let pause = rand::random::<u64>() % (5 * attempt as u64) + 1;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The Machine prefix a worker of this name has, or will have when it registers.
    pub(crate) async fn prefix(&self, pool: &AnyPool, name: &str) -> Result<String, sqlx::Error> {
        Workers::insert_with_ordinal(pool, || {
            sqlx::query(
                "INSERT INTO workers (name, ordinal, region, url, cpus, memory_mb, disk_mb)
                 VALUES ($1, (SELECT COALESCE(MAX(ordinal), 0) + 1 FROM workers), '', NULL, 0, 0, 0)
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
        })
        .await?;
        let row = sqlx::query("SELECT ordinal FROM workers WHERE name = $1")
            .bind(name)
            .fetch_one(pool)
            .await?;
        Ok(self.prefix_for(row.get(0)))
    }

    /// Records a worker (new or returning) and answers with its Machine prefix.
    pub(crate) async fn register(
        &self,
        pool: &AnyPool,
        request: &RegisterWorker,
        service: Arc<dyn WorkerService>,
        url: Option<String>,
    ) -> Result<String, sqlx::Error> {
        let remote = url.is_some();
        // A remote worker is ready at its first heartbeat, which it sends once its own API
        // serves; an in-process one is ready now.
        let heartbeat_ms = if remote { None } else { Some(now_ms()) };
        Workers::insert_with_ordinal(pool, || {
            sqlx::query(
                "INSERT INTO workers (name, ordinal, region, url, cpus, memory_mb, disk_mb, heartbeat_ms, runtimes)
                 VALUES ($1, (SELECT COALESCE(MAX(ordinal), 0) + 1 FROM workers), $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT(name) DO UPDATE SET region = $2, url = $3, cpus = $4, memory_mb = $5,
                 disk_mb = $6, heartbeat_ms = COALESCE($7, workers.heartbeat_ms), runtimes = $8",
            )
            .bind(&request.name)
            .bind(&request.region)
            .bind(&url)
            .bind(i64::from(request.capacity.cpus))
            .bind(signed(request.capacity.memory_mb))
            .bind(signed(request.capacity.disk_mb))
            .bind(heartbeat_ms)
            .bind(runtimes_column(&request.runtimes))
        })
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE name = $1"
        ))
        .bind(&request.name)
        .fetch_one(pool)
        .await?;
        let row = worker_row(&row);
        let prefix = self.prefix_for(row.ordinal);
        let mut entries = self.write();
        let previous = entries.get(&request.name).cloned();
        entries.insert(
            request.name.clone(),
            WorkerEntry {
                service,
                region: request.region.clone(),
                url,
                capacity: request.capacity,
                cordoned: row.cordoned,
                machine_prefix: prefix.clone(),
                last_heartbeat_ms: heartbeat_ms
                    .or(previous.as_ref().and_then(|entry| entry.last_heartbeat_ms)),
                stats: previous.map(|entry| entry.stats).unwrap_or(row.stats),
                runtimes: row.runtimes,
            },
        );
        Ok(prefix)
    }

    /// Records a heartbeat (through any replica) in the table, and drops the placements
    /// it surely counts: those whose creates ended a while before it.
    /// Answers whether the worker is known.
    pub(crate) async fn heartbeat(
        &self,
        pool: &AnyPool,
        name: &str,
        stats: WorkerStats,
    ) -> Result<bool, sqlx::Error> {
        let now = now_ms();
        let mut transaction = pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE workers SET heartbeat_ms = $1, used_cpus = $2, used_memory_mb = $3,
             used_disk_mb = $4, machine_count = $5, running_count = $6 WHERE name = $7",
        )
        .bind(now)
        .bind(i64::from(stats.used.cpus))
        .bind(signed(stats.used.memory_mb))
        .bind(signed(stats.used.disk_mb))
        .bind(signed(stats.machines))
        .bind(signed(stats.running))
        .bind(name)
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        // Creates that ended a while ago are in these stats now; running ones not.
        sqlx::query("DELETE FROM placements WHERE worker = $1 AND ended_at_ms <= $2")
            .bind(name)
            .bind(now - HEARTBEAT_COUNTS_AFTER_MS)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        if let Some(entry) = self.write().get_mut(name) {
            entry.last_heartbeat_ms = Some(now);
            entry.stats = stats;
        }
        Ok(true)
    }

    /// One worker as the API shows it (without its drain).
    pub(crate) fn view(&self, name: &str) -> Option<Worker> {
        let entries = self.read();
        entries
            .get(name)
            .map(|entry| self.to_api(name, entry, now_ms()))
    }

    /// A remote worker's agent URL; `None` for an in-process one.
    pub(crate) fn url(&self, name: &str) -> Option<String> {
        self.read().get(name).and_then(|entry| entry.url.clone())
    }

    pub(crate) fn service(&self, name: &str) -> Option<Arc<dyn WorkerService>> {
        self.read().get(name).map(|entry| entry.service.clone())
    }

    pub(crate) fn all(&self) -> Vec<(String, Arc<dyn WorkerService>)> {
        self.read()
            .iter()
            .map(|(name, entry)| (name.clone(), entry.service.clone()))
            .collect()
    }

    /// The live placements on each worker (or on `only`).
    async fn placed<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
        executor: E,
        only: &str,
        now: i64,
    ) -> Result<BTreeMap<String, Placed>, sqlx::Error> {
        let rows = sqlx::query(PLACED_SQL)
            .bind(now - PLACEMENT_EXPIRY_MS)
            .bind(only)
            .fetch_all(executor)
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                (
                    row.get::<String, _>(0),
                    Placed {
                        cpus: unsigned(row, 1),
                        memory_mb: unsigned(row, 2),
                        disk_mb: unsigned(row, 3),
                    },
                )
            })
            .collect())
    }

    /// What placement sees: the table as every replica wrote it (cordons, heartbeats and
    /// reports), and the placements of creates still running anywhere, for the workers
    /// this replica can reach.
    pub(crate) async fn capacities(
        &self,
        pool: &AnyPool,
    ) -> Result<Vec<WorkerCapacity>, sqlx::Error> {
        let now = now_ms();
        let rows = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY name"
        ))
        .fetch_all(pool)
        .await?;
        let placed = Workers::placed(pool, "", now).await?;
        let rows: Vec<WorkerRow> = rows.iter().map(worker_row).collect();
        // A worker that joined through another replica a moment ago is placed on at once;
        // the next refresh adopts it.
        self.learn(&rows);
        let entries = self.read();
        Ok(rows
            .into_iter()
            .filter(|row| {
                entries
                    .get(&row.name)
                    .is_some_and(|entry| entry.url == row.url)
            })
            .map(|row| {
                let placed = placed.get(&row.name).copied().unwrap_or_default();
                capacity_of(&row, placed, now)
            })
            .collect())
    }

    /// Takes room on `worker` for `placement` if the worker still has it, in one
    /// transaction on the worker's row: placements on one worker are serialized (the
    /// first statement writes the row, which locks it on PostgreSQL and takes SQLite's one
    /// write lock), so two replicas never both take its last room. Answers the hold when
    /// it fit: the room counts until [`PlacementHold::create_ended`] and a heartbeat that
    /// follows.
    pub(crate) async fn reserve(
        &self,
        pool: &AnyPool,
        worker: &str,
        request: &PlacementRequest,
        strategy: Strategy,
        placement: Placement<'_>,
    ) -> Result<Option<PlacementHold>, sqlx::Error> {
        let now = now_ms();
        let mut transaction = pool.begin().await?;
        let locked = sqlx::query("UPDATE workers SET cordoned = cordoned WHERE name = $1")
            .bind(worker)
            .execute(&mut *transaction)
            .await?;
        if locked.rows_affected() == 0 {
            return Ok(None);
        }
        sqlx::query(
            "DELETE FROM placements WHERE worker = $1 AND ended_at_ms IS NULL AND touched_at_ms <= $2",
        )
        .bind(worker)
        .bind(now - PLACEMENT_EXPIRY_MS)
        .execute(&mut *transaction)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE name = $1"
        ))
        .bind(worker)
        .fetch_one(&mut *transaction)
        .await?;
        let row = worker_row(&row);
        let placed = Workers::placed(&mut *transaction, worker, now).await?;
        let capacity = capacity_of(&row, placed.get(worker).copied().unwrap_or_default(), now);
        let only = PlacementRequest {
            worker: Some(worker.to_owned()),
            ..request.clone()
        };
        if placement::place(std::slice::from_ref(&capacity), &only, strategy).is_err() {
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO placements (machine_id, worker, replica, cpus, memory_mb, disk_mb, starts, touched_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (machine_id) DO UPDATE SET worker = $2, replica = $3, cpus = $4,
             memory_mb = $5, disk_mb = $6, starts = $7, touched_at_ms = $8, ended_at_ms = NULL",
        )
        .bind(placement.machine_id)
        .bind(worker)
        .bind(&self.replica)
        .bind(i64::from(placement.size.cpus))
        .bind(signed(placement.size.memory_mb))
        .bind(signed(placement.size.disk_mb))
        .bind(i64::from(placement.starts))
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        self.running_placements.fetch_add(1, Ordering::Relaxed);
        Ok(Some(PlacementHold {
            pool: pool.clone(),
            machine_id: placement.machine_id.to_owned(),
            running: self.running_placements.clone(),
            ended: false,
        }))
    }

    fn check_join_token(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if bool::from(hash.ct_eq(&self.join_token_hash)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    fn to_api(&self, name: &str, entry: &WorkerEntry, now: i64) -> Worker {
        Worker {
            name: name.to_owned(),
            region: entry.region.clone(),
            status: if entry.healthy(now) {
                berth_api::WorkerStatus::Ready
            } else {
                berth_api::WorkerStatus::Unreachable
            },
            cordoned: entry.cordoned,
            capacity: entry.capacity,
            used: entry.stats.used,
            machines: entry.stats.machines,
            running: entry.stats.running,
            machine_prefix: entry.machine_prefix.clone(),
            runtimes: entry.runtimes.clone(),
            last_heartbeat: entry.last_heartbeat_ms.map(format_ms),
            drain: None,
        }
    }
}

/// A caller holding the join token (an agent). Checked from the headers alone, before
/// any body is read: a stranger learns nothing about what a body should hold.
struct JoinTokenHolder;

impl axum::extract::FromRequestParts<Shared> for JoinTokenHolder {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        control: &Shared,
    ) -> Result<Self, ApiError> {
        control.workers.check_join_token(&parts.headers)?;
        Ok(JoinTokenHolder)
    }
}

async fn register(
    State(control): State<Shared>,
    _agent: JoinTokenHolder,
    ApiJson(request): ApiJson<RegisterWorker>,
) -> Result<Json<WorkerRegistered>, ApiError> {
    control.register_worker(request).await
}

/// Agents must be reached on loopback or the cluster's own addresses; anything else is a
/// typo or an attempt to point the control plane somewhere it should not go.
fn reqwest_url(url: &str) -> Result<String, ApiError> {
    let valid = url.starts_with("http://") || url.starts_with("https://");
    if !valid || url.len() > 512 {
        return Err(ApiError::invalid_config(
            "url",
            "url must be an http(s) URL",
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

async fn heartbeat(
    State(control): State<Shared>,
    _agent: JoinTokenHolder,
    UrlPath(name): UrlPath<String>,
    ApiJson(stats): ApiJson<WorkerStats>,
) -> Result<StatusCode, ApiError> {
    control.worker_heartbeat(&name, stats).await
}

#[utoipa::path(get, path = "/workers", tag = "workers",
    responses((status = 200, body = Vec<Worker>), (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn list(
    State(control): State<Shared>,
    principal: Principal,
) -> Result<Json<Vec<Worker>>, ApiError> {
    control.list_workers(&principal).await
}

#[utoipa::path(post, path = "/workers/{name}/cordon", tag = "workers", params(("name" = String, Path)),
    responses((status = 200, body = Worker), (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn cordon(
    State(control): State<Shared>,
    principal: Principal,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Worker>, ApiError> {
    control.set_cordon(&principal, &name, true).await
}

#[utoipa::path(post, path = "/workers/{name}/uncordon", tag = "workers", params(("name" = String, Path)),
    responses((status = 200, body = Worker), (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn uncordon(
    State(control): State<Shared>,
    principal: Principal,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Worker>, ApiError> {
    control.set_cordon(&principal, &name, false).await
}

impl ControlPlane {
    /// Admits an agent that holds the join token, and adopts its Machines once it answers.
    async fn register_worker(
        self: &Arc<Self>,
        request: RegisterWorker,
    ) -> Result<Json<WorkerRegistered>, ApiError> {
        berth_core::validate::validate_name("name", &request.name)?;
        berth_core::validate::validate_region(&request.region)?;
        let url = reqwest_url(&request.url)?;
        let service =
            RemoteWorker::new(&request.name, &url, &self.join_token).map_err(ApiError::from)?;
        let service: Arc<dyn WorkerService> = Arc::new(service);
        let machine_prefix = self
            .workers
            .register(self.store.pool(), &request, service.clone(), Some(url))
            .await?;
        // Adopting lists the worker's Machines through its API, which it serves only after
        // it has joined: do it once it answers, without holding up the join.
        let adopting = self.clone();
        let name = request.name.clone();
        tokio::spawn(async move {
            for _ in 0..120 {
                if service.list("").await.is_ok() {
                    adopting.adopt_worker(&name, service).await;
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            tracing::warn!("a joined worker never answered; its machines count toward quotas from their next change");
        });
        tracing::info!(worker = %request.name, region = %request.region, "worker registered");
        Ok(Json(WorkerRegistered { machine_prefix }))
    }

    /// A heartbeat from an agent in another process, through this replica or any other.
    async fn worker_heartbeat(
        self: &Arc<Self>,
        name: &str,
        stats: WorkerStats,
    ) -> Result<StatusCode, ApiError> {
        // Only a worker that joined with a URL heartbeats over HTTP.
        if !self
            .workers
            .heartbeat(self.store.pool(), name, stats)
            .await?
        {
            // The control plane forgot it (a new data dir): the agent registers again.
            return Err(ApiError::not_found(format!("worker {name}")));
        }
        if self.workers.service(name).is_none() {
            // It joined through another replica a moment ago: follow it now.
            self.refresh_workers().await?;
        }
        Ok(StatusCode::NO_CONTENT)
    }

    /// Reads the workers every replica recorded, and adopts those this one did not know.
    pub(crate) async fn refresh_workers(self: &Arc<Self>) -> Result<(), sqlx::Error> {
        for (name, service) in self.workers.refresh(self.store.pool()).await? {
            tracing::info!(worker = %name, "worker learned from the shared store");
            self.adopt_worker(&name, service).await;
        }
        Ok(())
    }

    async fn list_workers(&self, principal: &Principal) -> Result<Json<Vec<Worker>>, ApiError> {
        principal.require_admin()?;
        let mut drains = self.drains().await?;
        let now = now_ms();
        let entries = self.workers.read();
        Ok(Json(
            entries
                .iter()
                .map(|(name, entry)| {
                    let mut worker = self.workers.to_api(name, entry, now);
                    worker.drain = drains.remove(name);
                    worker
                })
                .collect(),
        ))
    }

    /// Cordons a worker (no new Machines are placed there) or lifts that.
    async fn set_cordon(
        &self,
        principal: &Principal,
        name: &str,
        cordoned: bool,
    ) -> Result<Json<Worker>, ApiError> {
        principal.require_admin()?;
        self.set_worker_cordon(name, cordoned).await?;
        self.worker_view(name).await.map(Json)
    }

    /// Records the cordon and applies it to placement.
    pub(crate) async fn set_worker_cordon(
        &self,
        name: &str,
        cordoned: bool,
    ) -> Result<(), ApiError> {
        let updated = sqlx::query("UPDATE workers SET cordoned = $1 WHERE name = $2")
            .bind(i64::from(cordoned))
            .bind(name)
            .execute(self.store.pool())
            .await?;
        let mut entries = self.workers.write();
        let Some(entry) = entries.get_mut(name) else {
            return Err(ApiError::not_found(format!("worker {name:?}")));
        };
        if updated.rows_affected() == 0 && entry.url.is_some() {
            return Err(ApiError::not_found(format!("worker {name:?}")));
        }
        // Placement reads the table, so every replica honours it at once; their views of
        // the workers show it within a refresh.
        entry.cordoned = cordoned;
        Ok(())
    }
}

/// Reads the `workers` table back every [`REFRESH_INTERVAL`] while the control plane
/// lives: membership, cordons and heartbeats recorded through other replicas.
pub(crate) fn spawn_refresh(control: &Arc<ControlPlane>) {
    let weak = Arc::downgrade(control);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(control) = weak.upgrade() else {
                return;
            };
            if let Err(error) = control.refresh_workers().await {
                tracing::debug!(%error, "reading the workers back");
            }
        }
    });
}

/// Agents joining the cluster: authenticated with the join token, not part of the public
/// API description.
pub(crate) fn internal_routes() -> Router<Shared> {
    Router::new()
        .route("/v1/internal/workers/register", post(register))
        .route("/v1/internal/workers/{name}/heartbeat", post(heartbeat))
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::extract::MAX_JSON_BODY,
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn workers_with_one(name: &str, cpus: u32) -> (Workers, AnyPool) {
        crate::store::install_drivers();
        // One connection: each in-memory connection is a database of its own.
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        crate::store::upgrade_sqlite(&pool).await.unwrap();
        let workers = Workers::open(&pool, "join").await.unwrap();
        let request = RegisterWorker {
            name: name.to_owned(),
            region: "local".to_owned(),
            // Never called: the test only counts.
            url: "http://127.0.0.1:9".to_owned(),
            capacity: Resources {
                cpus,
                memory_mb: 4096,
                disk_mb: 100_000,
            },
            runtimes: vec!["native".to_owned()],
        };
        let service = Arc::new(RemoteWorker::new(name, &request.url, "join").unwrap());
        workers
            .register(&pool, &request, service, Some(request.url.clone()))
            .await
            .unwrap();
        (workers, pool)
    }

    async fn running_cpus(workers: &Workers, pool: &AnyPool) -> u32 {
        workers.capacities(pool).await.unwrap()[0].running_cpus
    }

    fn request(size: Resources) -> PlacementRequest {
        PlacementRequest {
            region: None,
            worker: None,
            cpus: size.cpus,
            memory_mb: size.memory_mb,
            disk_mb: size.disk_mb,
            runtime: None,
        }
    }

    async fn reserve(
        workers: &Workers,
        pool: &AnyPool,
        machine_id: &str,
        size: Resources,
    ) -> Option<PlacementHold> {
        let placement = Placement {
            machine_id,
            size,
            starts: true,
        };
        workers
            .reserve(pool, "w1", &request(size), Strategy::Spread, placement)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_heartbeat_during_a_create_does_not_forget_its_placement() {
        let (workers, pool) = workers_with_one("w1", 4).await;
        let size = Resources {
            cpus: 2,
            memory_mb: 256,
            disk_mb: 1024,
        };
        // The worker must be healthy to take a placement.
        assert!(workers
            .heartbeat(&pool, "w1", WorkerStats::default())
            .await
            .unwrap());
        let m1 = reserve(&workers, &pool, "m1", size).await.expect("room");
        assert_eq!(running_cpus(&workers, &pool).await, 2);
        // Sent before the create finished: it does not count m1 yet.
        assert!(workers
            .heartbeat(&pool, "w1", WorkerStats::default())
            .await
            .unwrap());
        assert_eq!(
            running_cpus(&workers, &pool).await,
            2,
            "still counted while the create runs"
        );
        m1.create_ended(true).await.unwrap();
        let with_m1 = WorkerStats {
            used: size,
            machines: 1,
            running: 1,
        };
        // A heartbeat right after may predate the Machine: keep counting once.
        assert!(workers.heartbeat(&pool, "w1", with_m1).await.unwrap());
        assert_eq!(running_cpus(&workers, &pool).await, 4);
        // One a while later counts it itself.
        sqlx::query("UPDATE placements SET ended_at_ms = ended_at_ms - 5000")
            .execute(&pool)
            .await
            .unwrap();
        assert!(workers.heartbeat(&pool, "w1", with_m1).await.unwrap());
        assert_eq!(running_cpus(&workers, &pool).await, 2);
    }

    #[tokio::test]
    async fn a_create_that_made_nothing_gives_its_placement_back() {
        let (workers, pool) = workers_with_one("w1", 4).await;
        let size = Resources {
            cpus: 1,
            memory_mb: 256,
            disk_mb: 1024,
        };
        workers
            .heartbeat(&pool, "w1", WorkerStats::default())
            .await
            .unwrap();
        let m1 = reserve(&workers, &pool, "m1", size).await.expect("room");
        m1.create_ended(false).await.unwrap();
        assert_eq!(running_cpus(&workers, &pool).await, 0);
        assert_eq!(workers.capacities(&pool).await.unwrap()[0].used_disk_mb, 0);
    }

    #[tokio::test]
    async fn a_reservation_is_refused_once_the_worker_is_full_and_a_dead_ones_expires() {
        let (workers, pool) = workers_with_one("w1", 4).await;
        workers
            .heartbeat(&pool, "w1", WorkerStats::default())
            .await
            .unwrap();
        let size = Resources {
            cpus: 2,
            memory_mb: 256,
            disk_mb: 1024,
        };
        let _m1 = reserve(&workers, &pool, "m1", size).await.expect("room");
        let m2 = reserve(&workers, &pool, "m2", size).await.expect("room");
        assert!(
            reserve(&workers, &pool, "m3", size).await.is_none(),
            "4 CPUs taken"
        );
        // A replica that stopped refreshing its placement (it died) frees the room.
        sqlx::query(
            "UPDATE placements SET touched_at_ms = touched_at_ms - $1 WHERE machine_id = 'm1'",
        )
        .bind(PLACEMENT_EXPIRY_MS + 1)
        .execute(&pool)
        .await
        .unwrap();
        let _m3 = reserve(&workers, &pool, "m3", size).await.expect("room");
        // A cordoned worker takes nothing.
        sqlx::query("UPDATE workers SET cordoned = 1")
            .execute(&pool)
            .await
            .unwrap();
        m2.create_ended(false).await.unwrap();
        assert!(reserve(&workers, &pool, "m4", size).await.is_none());
    }

    #[tokio::test]
    async fn a_cancelled_creates_placement_ends_and_is_no_longer_kept_alive() {
        let (workers, pool) = workers_with_one("w1", 4).await;
        workers
            .heartbeat(&pool, "w1", WorkerStats::default())
            .await
            .unwrap();
        let size = Resources {
            cpus: 1,
            memory_mb: 256,
            disk_mb: 1024,
        };
        let hold = reserve(&workers, &pool, "m1", size).await.expect("room");
        assert_eq!(workers.running_placements.load(Ordering::Relaxed), 1);
        // The create's future is dropped (its client went away) before it ended.
        drop(hold);
        assert_eq!(workers.running_placements.load(Ordering::Relaxed), 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let ended: Option<i64> =
                sqlx::query_scalar("SELECT ended_at_ms FROM placements WHERE machine_id = 'm1'")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if ended.is_some() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Counted as made until a heartbeat a while after says what the worker has.
        assert_eq!(running_cpus(&workers, &pool).await, 1);
        sqlx::query("UPDATE placements SET ended_at_ms = ended_at_ms - 5000")
            .execute(&pool)
            .await
            .unwrap();
        workers
            .heartbeat(&pool, "w1", WorkerStats::default())
            .await
            .unwrap();
        assert_eq!(running_cpus(&workers, &pool).await, 0);
    }
}
