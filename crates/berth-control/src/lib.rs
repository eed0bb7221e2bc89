//! The public API server, like flaps: it authenticates callers, keeps orgs, tokens, apps
//! and the index of which worker holds each Machine, enforces quotas, rate limits and
//! leases, and forwards Machine operations to that worker through [`WorkerService`]. It
//! never touches a host itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use berth_api::{OrgLimits, RegisterWorker, SetOrgLimitsRequest, WorkerStats};
use berth_core::billing::Prices;
use berth_core::placement::{self, PlacementError, PlacementRequest, Strategy, WorkerCapacity};
use berth_core::{ids, validate};
use berth_image::{ImagePuller, ImageStore};
use berth_worker::WorkerService;
use tokio::sync::Mutex as AsyncMutex;

mod apps;
pub mod auth;
mod caches;
mod checkpoints;
pub mod clock;
mod doctor;
mod drain;
pub mod error;
pub mod extract;
mod idempotency;
mod images;
mod last_known;
mod leases;
pub mod limits;
mod machines;
pub mod migrate;
mod notices;
pub mod openapi;
mod quota;
mod reconcile;
mod registry;
mod replicas;
mod robots;
pub mod serve;
pub mod shared_images;
pub mod standbys;
pub mod store;
mod tenancy;
mod timing;
pub mod usage;
mod volumes;
mod warnings;
mod workers;

pub use auth::Principal;
pub use clock::ApiClock;
pub use error::ApiError;
pub use images::MAX_IMAGE_ARCHIVE;
use limits::{Action, RateLimiters, Usage};
use store::{AppRow, ControlStore, MachineIndexRow};

/// The org every install starts with, and the default for apps the admin creates.
pub const DEFAULT_ORG: &str = "personal";
/// The longest a refused (429) call is held before it is answered.
const MAX_TARPIT_MS: u64 = 1000;
/// The default cap on each of exec's stdout and stderr.
pub const DEFAULT_EXEC_OUTPUT_BYTES: usize = 1024 * 1024;

pub struct ControlConfig {
    pub data_dir: PathBuf,
    /// Where orgs, tokens, apps and the Machine index are kept; `None`: the SQLite file
    /// `control.db` in `data_dir`.
    pub database: Option<store::Database>,
    /// The admin bearer token. Only its hash is kept in memory.
    pub admin_token: String,
    /// Agents authenticate with it, and the control plane with them.
    pub join_token: String,
    pub prices: Prices,
    /// Quotas and rate limits of orgs that set none of their own.
    pub default_limits: OrgLimits,
    /// Cap on each of exec's stdout and stderr.
    pub exec_max_output_bytes: usize,
    pub clock: ApiClock,
    /// How create picks a worker among those that fit.
    pub placement: Strategy,
    /// The registry imported images are pushed to and agents pull them from, so that
    /// several replicas share them; `None`: this process's own image store.
    pub image_registry: Option<shared_images::SharedRegistry>,
    /// This process is the only control plane on its database, whatever the backend
    /// (`berth up`, which also runs the workers): an earlier run's claims are abandoned
    /// at start and its images may stay on its own disk. A SQLite file is always so.
    pub sole: bool,
    /// How long a worker sends no heartbeat before the standbys of its started Machines
    /// are started elsewhere (at least the heartbeat grace).
    pub standby_after: Duration,
}

impl ControlConfig {
    pub fn new(data_dir: PathBuf, admin_token: String, join_token: String) -> ControlConfig {
        ControlConfig {
            data_dir,
            database: None,
            admin_token,
            join_token,
            prices: Prices::default(),
            default_limits: limits::default_limits(),
            exec_max_output_bytes: DEFAULT_EXEC_OUTPUT_BYTES,
            clock: ApiClock::system(),
            placement: Strategy::default(),
            image_registry: None,
            sole: false,
            standby_after: standbys::DEFAULT_STANDBY_AFTER,
        }
    }
}

/// The control plane's shared state.
pub struct ControlPlane {
    store: ControlStore,
    last_known: last_known::LastKnown,
    admin_token_hash: [u8; 32],
    workers: workers::Workers,
    join_token: String,
    images: Arc<ImageStore>,
    puller: Arc<ImagePuller>,
    scratch_dir: PathBuf,
    /// Where imports go and agents pull them from, when replicas share them.
    shared_registry: Option<shared_images::SharedRegistry>,
    /// The only control plane on its database (see [`ControlConfig::sole`]).
    sole: bool,
    prices: Prices,
    placement: Strategy,
    /// One usage ingestion pass at a time (the background one or a query's).
    ingest_lock: tokio::sync::Mutex<()>,
    clock: ApiClock,
    tokens: auth::TokenCache,
    default_limits: OrgLimits,
    overrides: RwLock<HashMap<String, SetOrgLimitsRequest>>,
    rate_limiters: RateLimiters,
    /// This replica, and how many share the database.
    replicas: replicas::Replicas,
    usage: Arc<Usage>,
    /// Who admits starts and creates against quotas: this process, or the shared store.
    admission: quota::Admission,
    /// app → org, for the workers' notices, which name only the app.
    app_orgs: RwLock<HashMap<String, String>>,
    org_locks: StdMutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    waiters: notices::Waiters,
    /// Machines being moved between workers by this process.
    moves: migrate::Moves,
    /// Each worker's last drain.
    drains: drain::Drains,
    exec_max_output_bytes: usize,
    openapi_json: OnceLock<String>,
}

pub(crate) type Shared = Arc<ControlPlane>;

impl ControlPlane {
    pub async fn open(
        config: ControlConfig,
        images: Arc<ImageStore>,
    ) -> Result<Arc<ControlPlane>, ApiError> {
        let puller = Arc::new(ImagePuller::new(images, Default::default()));
        ControlPlane::open_with_puller(config, puller).await
    }

    /// [`ControlPlane::open`] with the puller the workers use, so `POST /v1/images/pull`
    /// and creates share downloads and registry settings.
    pub async fn open_with_puller(
        config: ControlConfig,
        puller: Arc<ImagePuller>,
    ) -> Result<Arc<ControlPlane>, ApiError> {
        let images = puller.store().clone();
        let scratch_dir = config.data_dir.join("uploads");
        std::fs::create_dir_all(&scratch_dir).map_err(ApiError::internal)?;
        let database = config
            .database
            .clone()
            .unwrap_or_else(|| store::Database::in_data_dir(&config.data_dir));
        let store = ControlStore::connect(&database).await?;
        store.ensure_org(DEFAULT_ORG, config.clock.now_ms()).await?;
        let workers = workers::Workers::open(store.pool(), &config.join_token).await?;
        let sole = config.sole || store.backend() == store::Backend::Sqlite;
        let standby_after = config.standby_after;
        if !sole && config.image_registry.is_none() {
            tracing::warn!(
                "the control store is PostgreSQL but no --image-registry is set: images \
                 cannot be imported (409 image_store_not_shared), since other replicas \
                 could not serve them"
            );
        }
        let replicas = replicas::Replicas::join(store.pool(), sole).await?;
        if sole {
            idempotency::abandon_unfinished(store.pool()).await?;
        }
        let tokens = auth::TokenCache::load(store.pool()).await?;
        let overrides = tenancy::load_overrides(store.pool()).await?;
        let apps = store.apps().await?;
        let app_orgs = apps
            .iter()
            .map(|app| (app.name.clone(), app.org_slug.clone()))
            .collect();
        let admission = quota::Admission::new(&store);
        let control = Arc::new(ControlPlane {
            last_known: last_known::LastKnown::start(store.clone()),
            store,
            admin_token_hash: auth::sha256(&config.admin_token),
            workers,
            join_token: config.join_token,
            images,
            puller,
            scratch_dir,
            shared_registry: config.image_registry,
            sole,
            prices: config.prices,
            placement: config.placement,
            ingest_lock: tokio::sync::Mutex::new(()),
            rate_limiters: RateLimiters::new(config.clock.clone()),
            replicas,
            clock: config.clock,
            tokens,
            default_limits: config.default_limits,
            overrides: RwLock::new(overrides),
            usage: Arc::new(Usage::default()),
            admission,
            app_orgs: RwLock::new(app_orgs),
            org_locks: StdMutex::new(HashMap::new()),
            waiters: notices::Waiters::default(),
            moves: migrate::Moves::default(),
            drains: drain::Drains::default(),
            exec_max_output_bytes: config.exec_max_output_bytes,
            openapi_json: OnceLock::new(),
        });
        for (name, worker) in control.workers.all() {
            control.adopt_worker(&name, worker).await;
        }
        let weak = Arc::downgrade(&control);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(control) = weak.upgrade() else {
                    return;
                };
                control.rate_limiters.prune();
                drop(control);
            }
        });
        replicas::spawn_heartbeat(&control);
        caches::spawn_listener(&control, &database);
        usage::spawn_ingestion(&control);
        migrate::spawn_settling(&control);
        workers::spawn_refresh(&control);
        standbys::spawn_watcher(&control, standby_after);
        Ok(control)
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let (router, openapi) = openapi::api_router().split_for_parts();
        let _ = self
            .openapi_json
            .set(serde_json::to_string(&openapi).unwrap_or_default());
        router
            // The cluster's own protocol, not the public API: agents joining, and the
            // images they pull.
            .merge(workers::internal_routes())
            .merge(registry::routes())
            .fallback(|| async { ApiError::not_found("route") })
            .method_not_allowed_fallback(|| async {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "this route does not take that method",
                )
            })
            .layer(axum::middleware::from_fn(warnings::collect))
            .layer(axum::middleware::from_fn(timing::stamp_arrival))
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            ))
            .with_state(self.clone())
    }

    /// The OpenAPI description of every route, as JSON.
    pub fn openapi(&self) -> utoipa::openapi::OpenApi {
        openapi::api_router().split_for_parts().1
    }

    pub fn clock(&self) -> &ApiClock {
        &self.clock
    }

    /// A worker running in this process (`berth up`); answers its Machine prefix.
    pub async fn add_local_worker(
        self: &Arc<Self>,
        registration: RegisterWorker,
        service: Arc<dyn WorkerService>,
    ) -> Result<String, ApiError> {
        let prefix = self
            .workers
            .register(self.store.pool(), &registration, service.clone(), None)
            .await?;
        self.adopt_worker(&registration.name, service).await;
        Ok(prefix)
    }

    /// Listens to a worker's state changes and counts what already runs there against
    /// its orgs' quotas: the workers hold the truth.
    /// Also forgets index entries of Machines the worker positively does not have (a
    /// create rolled back by the worker's recovery).
    pub(crate) async fn adopt_worker(self: &Arc<Self>, name: &str, worker: Arc<dyn WorkerService>) {
        worker.set_listener(Arc::new(notices::ControlListener::new(self)));
        self.remove_lost_copies(name, &worker).await;
        let apps = match self.store.apps().await {
            Ok(apps) => apps,
            Err(error) => {
                tracing::warn!(%error, "listing apps to count a worker's machines");
                return;
            }
        };
        for app in &apps {
            let Ok(machines) = worker.list(&app.name).await else {
                continue;
            };
            reconcile::forget_lost(self, name, &worker, &app.name, &machines).await;
            reconcile::remove_stale(self, name, &worker, &app.name, &machines).await;
            for machine in machines {
                self.observe_state(
                    &app.org_slug,
                    &machine.id,
                    machine.state,
                    limits::Share {
                        cpus: u64::from(machine.config.guest.cpus),
                        memory_mb: u64::from(machine.config.guest.memory_mb),
                    },
                    None,
                );
            }
        }
    }

    /// The /64 that a worker of this name gets for its Machines.
    pub async fn worker_prefix(&self, name: &str) -> Result<String, ApiError> {
        Ok(self.workers.prefix(self.store.pool(), name).await?)
    }

    /// A heartbeat from a worker in this process.
    pub async fn local_heartbeat(&self, name: &str, stats: WorkerStats) -> Result<(), ApiError> {
        self.workers
            .heartbeat(self.store.pool(), name, stats)
            .await?;
        Ok(())
    }

    pub(crate) fn worker(&self, name: &str) -> Result<Arc<dyn WorkerService>, ApiError> {
        self.workers
            .service(name)
            .ok_or_else(|| ApiError::internal(format!("worker {name} is not known")))
    }

    /// Placement: decided once, at create; the Machine is pinned to the answer.
    pub(crate) async fn place(&self, request: &PlacementRequest) -> Result<String, ApiError> {
        let capacities = self.workers.capacities(self.store.pool()).await?;
        self.place_among(capacities, request)
    }

    /// Placement that takes the room it found: a worker another replica filled meanwhile
    /// is left out and placement runs again among the others.
    pub(crate) async fn place_reserved(
        &self,
        request: &PlacementRequest,
        placement: workers::Placement<'_>,
        avoid: &[String],
    ) -> Result<(String, workers::PlacementHold), ApiError> {
        let mut full: Vec<String> = Vec::new();
        loop {
            let mut capacities = self.workers.capacities(self.store.pool()).await?;
            if !full.is_empty() && !capacities.is_empty() {
                capacities.retain(|worker| !full.contains(&worker.name));
                if capacities.is_empty() {
                    return Err(no_room(request));
                }
            }
            let preferred: Vec<WorkerCapacity> = capacities
                .iter()
                .filter(|worker| !avoid.contains(&worker.name))
                .cloned()
                .collect();
            let chosen = if preferred.is_empty() || preferred.len() == capacities.len() {
                self.place_among(capacities, request)?
            } else {
                self.place_among(preferred, request)
                    .or_else(|_| self.place_among(capacities, request))?
            };
            if let Some(hold) = self
                .workers
                .reserve(
                    self.store.pool(),
                    &chosen,
                    request,
                    self.placement,
                    placement,
                )
                .await?
            {
                return Ok((chosen, hold));
            }
            full.push(chosen);
        }
    }

    /// Placement among `capacities` (all workers, or all but a Machine's own).
    pub(crate) fn place_among(
        &self,
        capacities: Vec<WorkerCapacity>,
        request: &PlacementRequest,
    ) -> Result<String, ApiError> {
        if capacities.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_workers",
                "no worker has joined the cluster",
            ));
        }
        match placement::place(&capacities, request, self.placement) {
            Ok(worker) => Ok(worker.name.clone()),
            Err(error @ PlacementError::NoWorkerInRegion(_)) => {
                let mut api = ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_region",
                    error.to_string(),
                );
                api.body.field = Some("region".into());
                Err(api)
            }
            // No retry hint: a driver is installed on a worker, not freed by a Machine.
            Err(error @ PlacementError::NoWorkerWithRuntime(_)) => {
                let mut api = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "insufficient_capacity",
                    error.to_string(),
                );
                api.body.missing = Some(vec!["runtime".into()]);
                Err(api)
            }
            Err(error) => {
                let mut api = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "insufficient_capacity",
                    error.to_string(),
                );
                api.body.retry_after_ms = Some(5000);
                Err(api)
            }
        }
    }

    /// The limits in force for `org`.
    pub(crate) fn limits_of(&self, org: &str) -> OrgLimits {
        let overrides = self
            .overrides
            .read()
            .ok()
            .and_then(|map| map.get(org).copied())
            .unwrap_or_default();
        limits::effective(&self.default_limits, &overrides)
    }

    /// Counts one call against the caller's rate limit. A refused call is answered only
    /// after a pause of up to a second: a client that ignores `Retry-After` and asks again
    /// at once is slowed to a few calls per second per connection, so its flood costs the
    /// server, and everyone else, almost nothing. Well-behaved clients wait anyway.
    pub(crate) async fn check_rate(
        &self,
        principal: &Principal,
        action: Action,
        machine: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(org) = principal.org() else {
            return Ok(());
        };
        let limits = self.limits_of(org);
        let rates = limits::per_replica(&limits.rate_limits, self.replicas.live_count());
        let refused = self.rate_limiters.check(principal, &rates, action, machine);
        if let Err(error) = &refused {
            let wait = error.body.retry_after_ms.unwrap_or(0).min(MAX_TARPIT_MS);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        refused
    }

    /// Serializes the quota checks of one org that need the store (Machine counts).
    pub(crate) async fn lock_org(&self, org: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = match self.org_locks.lock() {
                Ok(locks) => locks,
                Err(poisoned) => poisoned.into_inner(),
            };
            locks.entry(org.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    pub(crate) fn remember_app(&self, app: &str, org: &str) {
        if let Ok(mut map) = self.app_orgs.write() {
            map.insert(app.to_owned(), org.to_owned());
        }
    }

    pub(crate) fn forget_app(&self, app: &str) {
        if let Ok(mut map) = self.app_orgs.write() {
            map.remove(app);
        }
    }

    pub(crate) fn org_of_app(&self, app: &str) -> Option<String> {
        self.app_orgs.read().ok()?.get(app).cloned()
    }

    /// An app the caller may see. Another org's app is answered exactly like a missing one.
    pub(crate) async fn app(&self, principal: &Principal, name: &str) -> Result<AppRow, ApiError> {
        // Garbage in the path is answered exactly like an app that does not exist.
        if validate::validate_name("app", name).is_err() {
            return Err(ApiError::not_found(format!("app {name:?}")));
        }
        self.store
            .app(name)
            .await?
            .filter(|row| principal.can_see(&row.org_slug))
            .ok_or_else(|| ApiError::not_found(format!("app {name}")))
    }

    pub(crate) async fn machine(
        &self,
        principal: &Principal,
        app: &str,
        id: &str,
    ) -> Result<(AppRow, MachineIndexRow), ApiError> {
        if validate::validate_name("app", app).is_err() || !ids::is_machine_id(id) {
            let _app = self.app(principal, app).await?;
            return Err(ApiError::not_found(format!("machine {id:?}")));
        }
        // Both reads at once: this is on the path of every start and stop.
        let (app_row, row) = tokio::join!(self.store.app(app), self.store.machine(app, id));
        let app_row = app_row?
            .filter(|row| principal.can_see(&row.org_slug))
            .ok_or_else(|| ApiError::not_found(format!("app {app}")))?;
        let row = row?.ok_or_else(|| ApiError::not_found(format!("machine {id}")))?;
        Ok((app_row, row))
    }

    /// The control store, for tools and tests that read or adjust it directly.
    pub fn store(&self) -> &ControlStore {
        &self.store
    }

    pub async fn close(&self) {
        self.last_known.flush(&self.store).await;
        self.replicas.leave(self.store.pool()).await;
        self.store.close().await;
    }
}

/// Every worker that could take `request` was filled by other placements meanwhile.
fn no_room(request: &PlacementRequest) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "insufficient_capacity",
        format!(
            "no worker has room for {} CPUs and {} MB now",
            request.cpus, request.memory_mb
        ),
    );
    error.body.retry_after_ms = Some(5000);
    error
}

/// A bug must still answer in JSON, and must not take the connection's task down with it.
fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("the server hit a bug while handling this request").into_response()
}

/// Wall-clock milliseconds, for what is not part of the API's controllable clock
/// (heartbeats, usage windows).
pub(crate) fn now_ms() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|moment| {
            moment
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Reads the admin token from `path`, or makes a new random one there (mode 0600).
pub fn load_or_create_admin_token(path: &Path) -> std::io::Result<String> {
    load_or_create_token(path, "berth")
}

/// Reads a secret token from `path`, or makes a new random one there (mode 0600).
pub fn load_or_create_token(path: &Path, prefix: &str) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let token = format!("{prefix}_{}", hex::encode(rand::random::<[u8; 32]>()));
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    Ok(token)
}
