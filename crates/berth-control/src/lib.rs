//! The public API server, like flaps: it authenticates callers, keeps apps and the index
//! of which worker holds each Machine, and forwards Machine operations to that worker
//! through [`WorkerService`]. It never touches a host itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_agent::{CreateOnWorker, EventSource, WorkerService};
use berth_api::{
    App, CreateAppRequest, CreateMachineRequest, DestroyResponse, Health, ImageSummary, Machine,
    StartStopResponse, StopRequest, UpdateMachineRequest,
};
use berth_core::{ids, validate};
use berth_image::ImageStore;
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;

pub mod error;
pub mod extract;
pub mod store;

pub use error::ApiError;
use extract::{ApiJson, BearerToken, OptionalJson, MAX_JSON_BODY};
use store::{AppRow, ControlStore, Inserted, MachineIndexRow};

/// The org every install starts with, and the default for new apps.
pub const DEFAULT_ORG: &str = "personal";
/// The largest image archive `POST /v1/images/import` accepts.
pub const MAX_IMAGE_ARCHIVE: u64 = 8 * 1024 * 1024 * 1024;
const DEFAULT_LOG_BYTES: u64 = 1024 * 1024;
const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;

pub struct ControlConfig {
    pub data_dir: PathBuf,
    /// The admin bearer token. Only its hash is kept in memory.
    pub admin_token: String,
}

/// The control plane's shared state.
pub struct ControlPlane {
    store: ControlStore,
    admin_token_hash: [u8; 32],
    workers: BTreeMap<String, Arc<dyn WorkerService>>,
    images: Arc<ImageStore>,
    scratch_dir: PathBuf,
}

type Shared = Arc<ControlPlane>;

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ControlPlane {
    pub async fn open(
        config: ControlConfig,
        workers: BTreeMap<String, Arc<dyn WorkerService>>,
        images: Arc<ImageStore>,
    ) -> Result<Arc<ControlPlane>, ApiError> {
        let scratch_dir = config.data_dir.join("uploads");
        std::fs::create_dir_all(&scratch_dir).map_err(ApiError::internal)?;
        let store = ControlStore::open(&config.data_dir.join("control.db")).await?;
        store.ensure_org(DEFAULT_ORG, now_ms()).await?;
        Ok(Arc::new(ControlPlane {
            store,
            admin_token_hash: token_hash(&config.admin_token),
            workers,
            images,
            scratch_dir,
        }))
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let machines = Router::new()
            .route("/", get(list_machines).post(create_machine))
            .route(
                "/{id}",
                get(get_machine)
                    .post(update_machine)
                    .delete(destroy_machine),
            )
            .route("/{id}/start", post(start_machine))
            .route("/{id}/stop", post(stop_machine))
            .route("/{id}/logs", get(machine_logs));
        let json_routes = Router::new()
            .route("/apps", get(list_apps).post(create_app))
            .route("/apps/{app}", get(get_app).delete(delete_app))
            .nest("/apps/{app}/machines", machines)
            .route("/images", get(list_images).delete(delete_image))
            .layer(DefaultBodyLimit::max(MAX_JSON_BODY));
        let upload_routes = Router::new()
            .route("/images/import", post(import_image))
            .layer(DefaultBodyLimit::disable());
        Router::new()
            .route("/v1/health", get(health))
            .nest("/v1", json_routes.merge(upload_routes))
            .fallback(|| async { ApiError::not_found("route") })
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            ))
            .with_state(self.clone())
    }

    fn authorize(&self, token: &BearerToken) -> Result<(), ApiError> {
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

    fn worker(&self, name: &str) -> Result<&Arc<dyn WorkerService>, ApiError> {
        self.workers
            .get(name)
            .ok_or_else(|| ApiError::internal(format!("worker {name} is not known")))
    }

    /// Placement. With one worker per process for now, the choice is the first worker; the
    /// Machine is pinned to it from here on.
    fn place(&self) -> Result<String, ApiError> {
        self.workers.keys().next().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_workers",
                "no worker is available",
            )
        })
    }

    async fn app(&self, name: &str) -> Result<AppRow, ApiError> {
        // Garbage in the path is answered exactly like an app that does not exist.
        if validate::validate_name("app", name).is_err() {
            return Err(ApiError::not_found(format!("app {name:?}")));
        }
        self.store
            .app(name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("app {name}")))
    }

    async fn machine(&self, app: &str, id: &str) -> Result<MachineIndexRow, ApiError> {
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

fn now_ms() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

fn format_ms(ms: i64) -> String {
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

async fn app_json(control: &ControlPlane, row: AppRow) -> Result<App, ApiError> {
    let machine_count = control.store.machines(&row.name).await?.len() as u64;
    Ok(App {
        id: row.id,
        name: row.name,
        org_slug: row.org_slug,
        status: "deployed".into(),
        machine_count,
        created_at: format_ms(row.created_at_ms),
    })
}

async fn create_app(
    State(control): State<Shared>,
    token: BearerToken,
    ApiJson(request): ApiJson<CreateAppRequest>,
) -> Result<(StatusCode, Json<App>), ApiError> {
    control.authorize(&token)?;
    validate::validate_name("app_name", &request.app_name)?;
    let org_slug = request.org_slug.unwrap_or_else(|| DEFAULT_ORG.to_owned());
    if !control.store.org_exists(&org_slug).await? {
        return Err(ApiError::not_found(format!("org {org_slug:?}")));
    }
    let row = AppRow {
        id: ids::new_app_id(),
        name: request.app_name,
        org_slug,
        created_at_ms: now_ms(),
    };
    if control.store.insert_app(&row).await? == Inserted::AlreadyExists {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("an app named {} already exists", row.name),
        ));
    }
    Ok((StatusCode::CREATED, Json(app_json(&control, row).await?)))
}

async fn list_apps(
    State(control): State<Shared>,
    token: BearerToken,
) -> Result<Json<Vec<App>>, ApiError> {
    control.authorize(&token)?;
    let mut apps = Vec::new();
    for row in control.store.apps().await? {
        apps.push(app_json(&control, row).await?);
    }
    Ok(Json(apps))
}

async fn get_app(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath(app): UrlPath<String>,
) -> Result<Json<App>, ApiError> {
    control.authorize(&token)?;
    let row = control.app(&app).await?;
    Ok(Json(app_json(&control, row).await?))
}

/// Deleting an app destroys its Machines first, like Fly's.
async fn delete_app(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath(app): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    control.authorize(&token)?;
    control.app(&app).await?;
    for machine in control.store.machines(&app).await? {
        control
            .worker(&machine.worker)?
            .destroy(&machine.id, true)
            .await
            .or_else(ignore_not_found)?;
        control.store.delete_machine(&machine.id).await?;
    }
    control.store.delete_app(&app).await?;
    Ok(StatusCode::ACCEPTED)
}

fn ignore_not_found(error: berth_agent::AgentError) -> Result<(), ApiError> {
    match error {
        berth_agent::AgentError::NotFound(_) => Ok(()),
        other => Err(other.into()),
    }
}

async fn create_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath(app): UrlPath<String>,
    ApiJson(request): ApiJson<CreateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    control.authorize(&token)?;
    control.app(&app).await?;
    validate::validate_create(&request)?;
    let id = ids::new_machine_id();
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| format!("machine-{id}"));
    let worker_name = control.place()?;
    let row = MachineIndexRow {
        id: id.clone(),
        app: app.clone(),
        name: name.clone(),
        worker: worker_name.clone(),
    };
    if control.store.insert_machine(&row).await? == Inserted::AlreadyExists {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("app {app} already has a machine named {name}"),
        ));
    }
    let worker = control.worker(&worker_name)?;
    let created = worker
        .create(CreateOnWorker {
            id: id.clone(),
            app,
            name,
            config: request.config,
            skip_launch: request.skip_launch,
        })
        .await;
    match created {
        Ok(machine) => Ok(Json(machine)),
        // The Machine exists in `failed`; the client may inspect, update or destroy it.
        Err(error @ berth_agent::AgentError::StartFailed { .. }) => Err(error.into()),
        Err(error) => {
            control.store.delete_machine(&id).await?;
            Err(error.into())
        }
    }
}

async fn list_machines(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath(app): UrlPath<String>,
) -> Result<Json<Vec<Machine>>, ApiError> {
    control.authorize(&token)?;
    control.app(&app).await?;
    let rows = control.store.machines(&app).await?;
    let mut workers: Vec<&str> = rows.iter().map(|row| row.worker.as_str()).collect();
    workers.sort_unstable();
    workers.dedup();
    let mut machines = Vec::with_capacity(rows.len());
    for worker in workers {
        machines.extend(control.worker(worker)?.list(&app).await?);
    }
    machines.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(Json(machines))
}

async fn get_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
) -> Result<Json<Machine>, ApiError> {
    control.authorize(&token)?;
    let row = control.machine(&app, &id).await?;
    Ok(Json(control.worker(&row.worker)?.get(&id).await?))
}

async fn update_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
    ApiJson(request): ApiJson<UpdateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    control.authorize(&token)?;
    let row = control.machine(&app, &id).await?;
    validate::validate_config(&request.config)?;
    Ok(Json(
        control.worker(&row.worker)?.update(&id, request).await?,
    ))
}

async fn start_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
) -> Result<Json<StartStopResponse>, ApiError> {
    control.authorize(&token)?;
    let row = control.machine(&app, &id).await?;
    Ok(Json(
        control
            .worker(&row.worker)?
            .start(&id, EventSource::User)
            .await?,
    ))
}

async fn stop_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
    OptionalJson(request): OptionalJson<StopRequest>,
) -> Result<Json<StartStopResponse>, ApiError> {
    control.authorize(&token)?;
    let row = control.machine(&app, &id).await?;
    Ok(Json(control.worker(&row.worker)?.stop(&id, request).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyQuery {
    #[serde(default)]
    force: bool,
}

async fn destroy_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
    query: Result<Query<DestroyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DestroyResponse>, ApiError> {
    control.authorize(&token)?;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_config("force", rejection.body_text()))?;
    let row = control.machine(&app, &id).await?;
    control
        .worker(&row.worker)?
        .destroy(&id, query.force)
        .await
        .or_else(ignore_not_found)?;
    control.store.delete_machine(&id).await?;
    Ok(Json(DestroyResponse { ok: true }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    max_bytes: Option<u64>,
}

async fn machine_logs(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    control.authorize(&token)?;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_config("max_bytes", rejection.body_text()))?;
    let row = control.machine(&app, &id).await?;
    let max_bytes = query
        .max_bytes
        .unwrap_or(DEFAULT_LOG_BYTES)
        .min(MAX_LOG_BYTES);
    let bytes = control.worker(&row.worker)?.logs(&id, max_bytes).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageQuery {
    name: String,
}

/// `POST /v1/images/import?name=…` with an OCI archive (a tar of an OCI image layout) as
/// the body. The body is streamed to disk, never held in memory.
async fn import_image(
    State(control): State<Shared>,
    token: BearerToken,
    query: Result<Query<ImageQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
) -> Result<Json<ImageSummary>, ApiError> {
    control.authorize(&token)?;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_config("name", rejection.body_text()))?;
    berth_image::ImageReference::parse(&query.name).map_err(|error| {
        let mut api = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_image_ref",
            error.to_string(),
        );
        api.body.field = Some("name".into());
        api
    })?;
    let upload = tempfile::Builder::new()
        .prefix("import-")
        .tempfile_in(&control.scratch_dir)
        .map_err(ApiError::internal)?;
    let mut file = tokio::fs::File::from_std(upload.reopen().map_err(ApiError::internal)?);
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_image",
                format!("reading the upload: {error}"),
            )
        })?;
        written += chunk.len() as u64;
        if written > MAX_IMAGE_ARCHIVE {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("image archives are limited to {MAX_IMAGE_ARCHIVE} bytes"),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|error| storage_error(&error))?;
    }
    file.flush().await.map_err(|error| storage_error(&error))?;
    let images = control.images.clone();
    let name = query.name.clone();
    let upload_path = upload.path().to_owned();
    let resolved = tokio::task::spawn_blocking(move || images.import(&upload_path, &name))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)?;
    drop(upload);
    Ok(Json(ImageSummary {
        name: resolved.reference.name(),
        digest: resolved.manifest_digest,
        size_bytes: resolved.size_bytes,
        layers: resolved.layer_dirs.len(),
    }))
}

fn storage_error(error: &std::io::Error) -> ApiError {
    if error.raw_os_error() == Some(libc::ENOSPC) {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            "no space left for the upload",
        )
    } else {
        ApiError::internal(format!("writing the upload: {error}"))
    }
}

async fn list_images(
    State(control): State<Shared>,
    token: BearerToken,
) -> Result<Json<Vec<ImageSummary>>, ApiError> {
    control.authorize(&token)?;
    let images = control.images.clone();
    let infos = tokio::task::spawn_blocking(move || images.list())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)?;
    Ok(Json(
        infos
            .into_iter()
            .map(|info| ImageSummary {
                name: info.name,
                digest: info.digest,
                size_bytes: info.size_bytes,
                layers: info.layers,
            })
            .collect(),
    ))
}

/// `DELETE /v1/images?name=…` removes a tag. Machines keep their resolved digest, so
/// nothing that exists stops working.
async fn delete_image(
    State(control): State<Shared>,
    token: BearerToken,
    query: Result<Query<ImageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    control.authorize(&token)?;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_config("name", rejection.body_text()))?;
    let images = control.images.clone();
    tokio::task::spawn_blocking(move || images.untag(&query.name))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reads the admin token from `path`, or makes a new random one there (mode 0600).
pub fn load_or_create_admin_token(path: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let token = format!("berth_{}", hex::encode(rand::random::<[u8; 32]>()));
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
