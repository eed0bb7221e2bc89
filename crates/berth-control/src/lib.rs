//! The public API server, like flaps: it authenticates callers, keeps apps and the index
//! of which worker holds each Machine, and forwards Machine operations to that worker
//! through [`WorkerService`]. It never touches a host itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use berth_agent::WorkerService;
use berth_api::Health;
use berth_api::{RegisterWorker, WorkerStats};
use berth_core::billing::Prices;
use berth_core::placement::{self, PlacementError, PlacementRequest, Strategy};
use berth_core::{ids, validate};
use berth_image::{ImagePuller, ImageStore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

mod apps;
pub mod error;
pub mod extract;
mod images;
mod machines;
mod registry;
pub mod store;
pub mod usage;
mod workers;

pub use error::ApiError;
use extract::{BearerToken, MAX_JSON_BODY};
pub use images::MAX_IMAGE_ARCHIVE;
use store::{AppRow, ControlStore, MachineIndexRow};

/// The org every install starts with, and the default for new apps.
pub const DEFAULT_ORG: &str = "personal";

pub struct ControlConfig {
    pub data_dir: PathBuf,
    /// The admin bearer token. Only its hash is kept in memory.
    pub admin_token: String,
    /// Agents authenticate with it, and the control plane with them.
    pub join_token: String,
    pub prices: Prices,
}

/// The control plane's shared state.
pub struct ControlPlane {
    store: ControlStore,
    admin_token_hash: [u8; 32],
    workers: workers::Workers,
    join_token: String,
    images: Arc<ImageStore>,
    puller: Arc<ImagePuller>,
    scratch_dir: PathBuf,
    prices: Prices,
    /// One usage ingestion pass at a time (the background one or a query's).
    ingest_lock: tokio::sync::Mutex<()>,
}

pub(crate) type Shared = Arc<ControlPlane>;

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

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
        let store = ControlStore::open(&config.data_dir.join("control.db")).await?;
        store.ensure_org(DEFAULT_ORG, now_ms()).await?;
        usage::migrate(store.pool()).await?;
        let workers = workers::Workers::open(store.pool(), &config.join_token).await?;
        let control = Arc::new(ControlPlane {
            store,
            admin_token_hash: token_hash(&config.admin_token),
            workers,
            join_token: config.join_token,
            images,
            puller,
            scratch_dir,
            prices: config.prices,
            ingest_lock: tokio::sync::Mutex::new(()),
        });
        usage::spawn_ingestion(&control);
        Ok(control)
    }

    pub fn router(self: &Arc<Self>) -> Router {
        // Each area of the API brings its own routes, relative to /v1.
        let json_routes = Router::new()
            .merge(apps::routes())
            .nest("/apps/{app}/machines", machines::routes())
            .merge(images::routes())
            .merge(usage::routes())
            .merge(workers::routes())
            .layer(DefaultBodyLimit::max(MAX_JSON_BODY));
        Router::new()
            .route("/v1/health", get(health))
            .merge(registry::routes())
            .nest("/v1", json_routes.merge(images::upload_routes()))
            .fallback(|| async { ApiError::not_found("route") })
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            ))
            .with_state(self.clone())
    }

    pub(crate) fn authorize(&self, token: &BearerToken) -> Result<(), ApiError> {
        let Some(token) = &token.0 else {
            return Err(ApiError::unauthorized());
        };
        // Compare hashes in constant time: timing says nothing about the token.
        if bool::from(token_hash(token).ct_eq(&self.admin_token_hash)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    /// A worker running in this process (`berth up`); answers its Machine prefix.
    pub async fn add_local_worker(
        &self,
        registration: RegisterWorker,
        service: Arc<dyn WorkerService>,
    ) -> Result<String, ApiError> {
        Ok(self
            .workers
            .register(self.store.pool(), &registration, service, None)
            .await?)
    }

    /// The /64 that a worker of this name gets for its Machines.
    pub async fn worker_prefix(&self, name: &str) -> Result<String, ApiError> {
        Ok(self.workers.prefix(self.store.pool(), name).await?)
    }

    /// A heartbeat from a worker in this process.
    pub fn local_heartbeat(&self, name: &str, stats: WorkerStats) {
        self.workers.heartbeat(name, stats);
    }

    pub(crate) fn worker(&self, name: &str) -> Result<Arc<dyn WorkerService>, ApiError> {
        self.workers
            .service(name)
            .ok_or_else(|| ApiError::internal(format!("worker {name} is not known")))
    }

    /// Placement: decided once, at create; the Machine is pinned to the answer.
    pub(crate) fn place(&self, request: &PlacementRequest) -> Result<String, ApiError> {
        let capacities = self.workers.capacities();
        if capacities.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_workers",
                "no worker has joined the cluster",
            ));
        }
        match placement::place(&capacities, request, Strategy::default()) {
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

    pub(crate) async fn app(&self, name: &str) -> Result<AppRow, ApiError> {
        // Garbage in the path is answered exactly like an app that does not exist.
        if validate::validate_name("app", name).is_err() {
            return Err(ApiError::not_found(format!("app {name:?}")));
        }
        self.store
            .app(name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("app {name}")))
    }

    pub(crate) async fn machine(&self, app: &str, id: &str) -> Result<MachineIndexRow, ApiError> {
        self.app(app).await?;
        if !ids::is_machine_id(id) {
            return Err(ApiError::not_found(format!("machine {id:?}")));
        }
        self.store
            .machine(app, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("machine {id}")))
    }

    pub async fn close(&self) {
        self.store.close().await;
    }
}

/// A bug must still answer in JSON, and must not take the connection's task down with it.
fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("the server hit a bug while handling this request").into_response()
}

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

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
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
