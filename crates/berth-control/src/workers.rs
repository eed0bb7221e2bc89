//! The workers of a cluster: registration (with the join token), heartbeats, cordon, and
//! what placement knows of each. In-process workers (`berth up`) and remote agents
//! (`berth agent`) look the same from here: each is a `WorkerService`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use berth_api::{RegisterWorker, Resources, Worker, WorkerRegistered, WorkerStats};
use berth_core::placement::WorkerCapacity;
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
    /// Placements whose Machines the worker's heartbeats may not count yet.
    pub reservations: Vec<Reservation>,
}

/// What one create placed on a worker, counted until a heartbeat that follows it.
#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    machine_id: String,
    size: Resources,
    starts: bool,
    /// When the create ended (ms); `None` while it runs.
    ended_at_ms: Option<i64>,
}

/// A heartbeat this long after a create ended surely counts its Machine (its stats are
/// read when it is sent, and the create ended on the worker before it ended here).
const HEARTBEAT_COUNTS_AFTER_MS: i64 = 1000;

impl WorkerEntry {
    /// Running and total use: the worker's last report plus placements it may not count.
    fn used(&self) -> Resources {
        let mut used = self.stats.used;
        for reservation in &self.reservations {
            used.disk_mb += reservation.size.disk_mb;
            if reservation.starts {
                used.cpus += reservation.size.cpus;
                used.memory_mb += reservation.size.memory_mb;
            }
        }
        used
    }

    fn healthy(&self, now: i64) -> bool {
        // An in-process worker cannot be unreachable.
        self.url.is_none()
            || self
                .last_heartbeat_ms
                .is_some_and(|at| now - at <= HEARTBEAT_GRACE.as_millis() as i64)
    }
}

pub(crate) struct Workers {
    entries: RwLock<BTreeMap<String, WorkerEntry>>,
    join_token_hash: [u8; 32],
    cluster_prefix: String,
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
        cordoned INTEGER NOT NULL DEFAULT 0
    )",
    "CREATE TABLE IF NOT EXISTS cluster (id INTEGER PRIMARY KEY CHECK (id = 1), ula_prefix TEXT NOT NULL)",
];

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
            cluster_prefix,
        };
        // Remote workers known from before a restart: reachable again as soon as they
        // heartbeat; their Machines stay pinned to them meanwhile.
        let rows = sqlx::query("SELECT name, ordinal, region, url, cpus, memory_mb, disk_mb, cordoned FROM workers WHERE url IS NOT NULL")
            .fetch_all(pool)
            .await?;
        for row in rows {
            let name: String = row.get(0);
            let url: String = row.get(3);
            let Ok(service) = RemoteWorker::new(&name, &url, join_token) else {
                continue;
            };
            let entry = WorkerEntry {
                service: Arc::new(service),
                region: row.get(2),
                url: Some(url),
                capacity: Resources {
                    cpus: u32::try_from(row.get::<i64, _>(4)).unwrap_or_default(),
                    memory_mb: row.get::<i64, _>(5) as u64,
                    disk_mb: row.get::<i64, _>(6) as u64,
                },
                cordoned: row.get::<i64, _>(7) != 0,
                machine_prefix: workers.prefix_for(row.get(1)),
                last_heartbeat_ms: None,
                stats: WorkerStats::default(),
                reservations: Vec::new(),
            };
            workers.write().insert(name, entry);
        }
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

    /// The Machine prefix a worker of this name has, or will have when it registers.
    pub(crate) async fn prefix(&self, pool: &AnyPool, name: &str) -> Result<String, sqlx::Error> {
        sqlx::query(
            "INSERT INTO workers (name, ordinal, region, url, cpus, memory_mb, disk_mb)
             VALUES ($1, (SELECT COALESCE(MAX(ordinal), 0) + 1 FROM workers), '', NULL, 0, 0, 0)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(pool)
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
        sqlx::query(
            "INSERT INTO workers (name, ordinal, region, url, cpus, memory_mb, disk_mb)
             VALUES ($1, (SELECT COALESCE(MAX(ordinal), 0) + 1 FROM workers), $2, $3, $4, $5, $6)
             ON CONFLICT(name) DO UPDATE SET region = $2, url = $3, cpus = $4, memory_mb = $5, disk_mb = $6",
        )
        .bind(&request.name)
        .bind(&request.region)
        .bind(&url)
        .bind(i64::from(request.capacity.cpus))
        .bind(i64::try_from(request.capacity.memory_mb).unwrap_or(i64::MAX))
        .bind(i64::try_from(request.capacity.disk_mb).unwrap_or(i64::MAX))
        .execute(pool)
        .await?;
        let row = sqlx::query("SELECT ordinal, cordoned FROM workers WHERE name = $1")
            .bind(&request.name)
            .fetch_one(pool)
            .await?;
        let prefix = self.prefix_for(row.get(0));
        let mut entries = self.write();
        let previous = entries.get(&request.name).cloned();
        entries.insert(
            request.name.clone(),
            WorkerEntry {
                service,
                region: request.region.clone(),
                url,
                capacity: request.capacity,
                cordoned: row.get::<i64, _>(1) != 0,
                machine_prefix: prefix.clone(),
                // A remote worker is ready at its first heartbeat, which it sends once its own
                // API serves; an in-process one is ready now.
                last_heartbeat_ms: if remote { None } else { Some(now_ms()) },
                stats: previous
                    .as_ref()
                    .map(|entry| entry.stats)
                    .unwrap_or_default(),
                reservations: previous.map(|entry| entry.reservations).unwrap_or_default(),
            },
        );
        Ok(prefix)
    }

    pub(crate) fn heartbeat(&self, name: &str, stats: WorkerStats) -> bool {
        match self.write().get_mut(name) {
            Some(entry) => {
                let now = now_ms();
                entry.last_heartbeat_ms = Some(now);
                entry.stats = stats;
                // Creates that ended a while ago are in these stats now; running ones not.
                entry.reservations.retain(|reservation| {
                    reservation
                        .ended_at_ms
                        .is_none_or(|ended| now - ended < HEARTBEAT_COUNTS_AFTER_MS)
                });
                true
            }
            None => false,
        }
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

    /// What placement sees.
    pub(crate) fn capacities(&self) -> Vec<WorkerCapacity> {
        let now = now_ms();
        self.read()
            .iter()
            .map(|(name, entry)| {
                let used = entry.used();
                WorkerCapacity {
                    name: name.clone(),
                    region: entry.region.clone(),
                    cordoned: entry.cordoned,
                    healthy: entry.healthy(now),
                    cpus: entry.capacity.cpus,
                    memory_mb: entry.capacity.memory_mb,
                    disk_mb: entry.capacity.disk_mb,
                    running_cpus: used.cpus,
                    running_memory_mb: used.memory_mb,
                    used_disk_mb: used.disk_mb,
                }
            })
            .collect()
    }

    /// Counts a placement while its create runs, and until a heartbeat that follows it
    /// (heartbeats in between report the worker without it).
    pub(crate) fn reserve(&self, name: &str, machine_id: &str, size: Resources, starts: bool) {
        if let Some(entry) = self.write().get_mut(name) {
            entry.reservations.push(Reservation {
                machine_id: machine_id.to_owned(),
                size,
                starts,
                ended_at_ms: None,
            });
        }
    }

    /// The create of `machine_id` ended: if it made the Machine, the worker's next
    /// heartbeat counts it; if not, nothing is left to count.
    pub(crate) fn create_ended(&self, name: &str, machine_id: &str, made: bool) {
        if let Some(entry) = self.write().get_mut(name) {
            if made {
                let now = now_ms();
                for reservation in &mut entry.reservations {
                    if reservation.machine_id == machine_id {
                        reservation.ended_at_ms = Some(now);
                    }
                }
            } else {
                entry
                    .reservations
                    .retain(|reservation| reservation.machine_id != machine_id);
            }
        }
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
    control.worker_heartbeat(&name, stats)
}

#[utoipa::path(get, path = "/workers", tag = "workers",
    responses((status = 200, body = Vec<Worker>), (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn list(
    State(control): State<Shared>,
    principal: Principal,
) -> Result<Json<Vec<Worker>>, ApiError> {
    control.list_workers(&principal)
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

    /// A heartbeat from an agent in another process.
    fn worker_heartbeat(&self, name: &str, stats: WorkerStats) -> Result<StatusCode, ApiError> {
        if self.workers.heartbeat(name, stats) {
            Ok(StatusCode::NO_CONTENT)
        } else {
            // The control plane forgot it (a new data dir): the agent registers again.
            Err(ApiError::not_found(format!("worker {name}")))
        }
    }

    fn list_workers(&self, principal: &Principal) -> Result<Json<Vec<Worker>>, ApiError> {
        principal.require_admin()?;
        let now = now_ms();
        let entries = self.workers.read();
        Ok(Json(
            entries
                .iter()
                .map(|(name, entry)| {
                    let mut worker = self.workers.to_api(name, entry, now);
                    worker.drain = self.drains.get(name);
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
        self.worker_view(name).map(Json)
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
        entry.cordoned = cordoned;
        Ok(())
    }
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
        };
        let service = Arc::new(RemoteWorker::new(name, &request.url, "join").unwrap());
        workers
            .register(&pool, &request, service, Some(request.url.clone()))
            .await
            .unwrap();
        (workers, pool)
    }

    fn running_cpus(workers: &Workers) -> u32 {
        workers.capacities()[0].running_cpus
    }

    #[tokio::test]
    async fn a_heartbeat_during_a_create_does_not_forget_its_placement() {
        let (workers, _pool) = workers_with_one("w1", 4).await;
        let size = Resources {
            cpus: 2,
            memory_mb: 256,
            disk_mb: 1024,
        };
        workers.reserve("w1", "m1", size, true);
        assert_eq!(running_cpus(&workers), 2);
        // Sent before the create finished: it does not count m1 yet.
        assert!(workers.heartbeat("w1", WorkerStats::default()));
        assert_eq!(
            running_cpus(&workers),
            2,
            "still counted while the create runs"
        );
        workers.create_ended("w1", "m1", true);
        let with_m1 = WorkerStats {
            used: size,
            machines: 1,
            running: 1,
        };
        // A heartbeat right after may predate the Machine: keep counting once.
        assert!(workers.heartbeat("w1", with_m1));
        assert_eq!(running_cpus(&workers), 4);
        // One a while later counts it itself.
        if let Some(entry) = workers.write().get_mut("w1") {
            for reservation in &mut entry.reservations {
                reservation.ended_at_ms = reservation.ended_at_ms.map(|at| at - 5_000);
            }
        }
        assert!(workers.heartbeat("w1", with_m1));
        assert_eq!(running_cpus(&workers), 2);
    }

    #[tokio::test]
    async fn a_create_that_made_nothing_gives_its_placement_back() {
        let (workers, _pool) = workers_with_one("w1", 4).await;
        let size = Resources {
            cpus: 1,
            memory_mb: 256,
            disk_mb: 1024,
        };
        workers.reserve("w1", "m1", size, true);
        workers.create_ended("w1", "m1", false);
        assert_eq!(running_cpus(&workers), 0);
        assert_eq!(workers.capacities()[0].used_disk_mb, 0);
    }
}
