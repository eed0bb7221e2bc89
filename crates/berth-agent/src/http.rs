//! The agent's own HTTP API: `WorkerService` over HTTP/JSON for a control plane in another
//! process, authenticated with the cluster's join token. [`berth_worker::RemoteWorker`]
//! is its client.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use berth_api::{ErrorBody, StopRequest};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::broadcast;

use berth_worker::wire::{MetadataChange, NoticeLine, StartBody, NOTICE_KEEPALIVE};
use berth_worker::{
    CreateOnWorker, ExecOnWorker, MachineNotice, UpdateOnWorker, WorkerError, WorkerListener,
    WorkerService,
};

/// The largest request body a control plane sends (a Machine config).
const MAX_BODY: usize = 1024 * 1024;
/// Notices kept for a slow follower; one that falls further behind is cut off and
/// starts over from a snapshot.
const NOTICE_BUFFER: usize = 4096;

struct AgentHttp {
    worker: Arc<dyn WorkerService>,
    join_token_hash: [u8; 32],
    notices: broadcast::Sender<MachineNotice>,
}

/// Fans the worker's notices out to every follower of `/agent/v1/notices`.
struct NoticeFanout(broadcast::Sender<MachineNotice>);

impl WorkerListener for NoticeFanout {
    fn on_event(&self, notice: &MachineNotice) {
        // No follower connected is fine: it gets a snapshot when it comes.
        let _ = self.0.send(notice.clone());
    }
}

type Shared = Arc<AgentHttp>;

struct Failure(WorkerError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, body) = self.0.to_response();
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(body),
        )
            .into_response()
    }
}

impl From<WorkerError> for Failure {
    fn from(error: WorkerError) -> Failure {
        Failure(error)
    }
}

fn unauthorized() -> Response {
    let body = ErrorBody {
        error: "unauthorized".into(),
        message: "the join token is required".into(),
        state: None,
        field: None,
        retry_after_ms: None,
        ..ErrorBody::default()
    };
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

fn authorized(http: &AgentHttp, headers: &HeaderMap) -> bool {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    bool::from(hash.ct_eq(&http.join_token_hash))
}

/// The router a worker serves to its control plane. It becomes the worker's listener, so
/// that the control plane can follow state changes over `/agent/v1/notices`.
pub fn router(worker: Arc<dyn WorkerService>, join_token: &str) -> Router {
    let (notices, _) = broadcast::channel(NOTICE_BUFFER);
    worker.set_listener(Arc::new(NoticeFanout(notices.clone())));
    let state = Arc::new(AgentHttp {
        worker,
        join_token_hash: Sha256::digest(join_token.as_bytes()).into(),
        notices,
    });
    let authenticated = Router::new()
        .route("/agent/v1/machines", get(list).post(create))
        .route("/agent/v1/machines/{id}", get(get_machine).delete(destroy))
        .route("/agent/v1/machines/{id}/start", post(start))
        .route("/agent/v1/machines/{id}/stop", post(stop))
        .route("/agent/v1/machines/{id}/suspend", post(suspend))
        .route("/agent/v1/machines/{id}/signal", post(signal))
        .route("/agent/v1/machines/{id}/update", post(update))
        .route("/agent/v1/machines/{id}/logs", get(logs))
        .route("/agent/v1/usage", get(usage))
        .route("/agent/v1/images/usage", get(image_usage))
        .route("/agent/v1/doctor", get(doctor_check).post(doctor_repair))
        .route("/agent/v1/machines/{id}/events", get(events))
        .route("/agent/v1/machines/{id}/exec", post(exec))
        .route("/agent/v1/machines/{id}/metadata", post(metadata))
        .route("/agent/v1/machines/{id}/cordon", post(cordon))
        .route("/agent/v1/machines/{id}/uncordon", post(uncordon))
        .route("/agent/v1/machines/{id}/ps", get(processes))
        .route("/agent/v1/machines/{id}/versions", get(versions))
        .route("/agent/v1/machines/{id}/log-chunks", get(log_chunks))
        .route(
            "/agent/v1/machines/{id}/checkpoints",
            get(checkpoint_list).post(checkpoint_create),
        )
        .route(
            "/agent/v1/machines/{id}/checkpoints/{cp}",
            axum::routing::delete(checkpoint_delete),
        )
        .route(
            "/agent/v1/machines/{id}/checkpoints/{cp}/restore",
            post(checkpoint_restore),
        )
        .route("/agent/v1/migrations", post(migration))
        .route("/agent/v1/migrations/{id}/stream", post(migration_stream))
        .route("/agent/v1/notices", get(follow_notices))
        .route("/agent/v1/notices/snapshot", get(notice_snapshot))
        .route("/agent/v1/volumes", get(volume_list).post(volume_create))
        .route(
            "/agent/v1/volumes/{id}",
            get(volume_get).put(volume_update).delete(volume_delete),
        )
        .route("/agent/v1/volumes/{id}/extend", put(volume_extend))
        .route(
            "/agent/v1/volumes/{id}/snapshots",
            get(volume_snapshots).post(volume_snapshot),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_join_token,
        ));
    Router::new()
        .route("/agent/v1/health", get(|| async { "ok" }))
        .merge(authenticated)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn require_join_token(
    State(http): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if authorized(&http, request.headers()) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

async fn create(
    State(http): State<Shared>,
    Json(request): Json<CreateOnWorker>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.create(request).await?).into_response())
}

async fn checkpoint_create(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(request): Json<berth_api::CreateCheckpointRequest>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.checkpoint_create(&id, request.comment).await?).into_response())
}

async fn checkpoint_list(
    State(http): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.checkpoint_list(&id).await?).into_response())
}

async fn checkpoint_delete(
    State(http): State<Shared>,
    Path((id, cp)): Path<(String, String)>,
) -> Result<Response, Failure> {
    http.worker.checkpoint_delete(&id, &cp).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn checkpoint_restore(
    State(http): State<Shared>,
    Path((id, cp)): Path<(String, String)>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.checkpoint_restore(&id, &cp).await?).into_response())
}

async fn migration(
    State(http): State<Shared>,
    Json(step): Json<berth_worker::MigrationStep>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.migration(step).await?).into_response())
}

/// A pass over a leaving Machine's files, for the destination holding its grant.
async fn migration_stream(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(request): Json<berth_worker::StreamRequest>,
) -> Result<Response, Failure> {
    let stream = http.worker.migration_stream(&id, request).await?;
    Ok(axum::body::Body::from_stream(stream).into_response())
}

async fn volume_create(
    State(http): State<Shared>,
    Json(request): Json<berth_worker::CreateVolumeOnWorker>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_create(request).await?).into_response())
}

async fn volume_list(
    State(http): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_list(&query.app).await?).into_response())
}

async fn volume_get(
    State(http): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_get(&id).await?).into_response())
}

async fn volume_update(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<berth_api::UpdateVolumeRequest>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_update(&id, body).await?).into_response())
}

async fn volume_extend(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<berth_api::ExtendVolumeRequest>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_extend(&id, body.size_gb).await?).into_response())
}

async fn volume_delete(
    State(http): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_delete(&id).await?).into_response())
}

async fn volume_snapshots(
    State(http): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_snapshots(&id).await?).into_response())
}

async fn volume_snapshot(
    State(http): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.volume_snapshot(&id).await?).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    app: String,
}

async fn list(
    State(http): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.list(&query.app).await?).into_response())
}

async fn get_machine(
    State(http): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.get(&id).await?).into_response())
}

async fn start(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<StartBody>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.start(&id, body.source).await?).into_response())
}

async fn suspend(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<StartBody>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.suspend(&id, body.source).await?).into_response())
}

async fn stop(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<StopRequest>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.stop(&id, body).await?).into_response())
}

async fn signal(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<berth_api::SignalRequest>,
) -> Result<Response, Failure> {
    http.worker.signal(&id, &body.signal).await?;
    Ok(Json(berth_api::OkResponse { ok: true }).into_response())
}

async fn update(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<UpdateOnWorker>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.update(&id, body.request, body.pull).await?).into_response())
}

#[derive(Deserialize)]
struct DestroyQuery {
    #[serde(default)]
    force: bool,
}

async fn destroy(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<DestroyQuery>,
) -> Result<Response, Failure> {
    http.worker.destroy(&id, query.force).await?;
    Ok(Json(serde_json::json!({"ok": true})).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    max_bytes: u64,
}

async fn logs(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, Failure> {
    let bytes = http.worker.logs(&id, query.max_bytes).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[derive(Deserialize)]
struct UsageQuery {
    after: u64,
    limit: u32,
}

async fn usage(
    State(http): State<Shared>,
    Query(query): Query<UsageQuery>,
) -> Result<Response, Failure> {
    Ok(Json(
        http.worker
            .usage_since(query.after, query.limit.min(10_000))
            .await?,
    )
    .into_response())
}

async fn image_usage(State(http): State<Shared>) -> Result<Response, Failure> {
    Ok(Json(http.worker.image_usage().await?).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    since: i64,
    limit: u32,
}

async fn events(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, Failure> {
    Ok(Json(
        http.worker
            .machine_events(&id, query.since, query.limit)
            .await?,
    )
    .into_response())
}

async fn exec(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(request): Json<ExecOnWorker>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.exec(&id, request).await?).into_response())
}

async fn metadata(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Json(change): Json<MetadataChange>,
) -> Result<Response, Failure> {
    Ok(Json(
        http.worker
            .set_metadata(&id, &change.key, change.value)
            .await?,
    )
    .into_response())
}

async fn cordon(State(http): State<Shared>, Path(id): Path<String>) -> Result<Response, Failure> {
    Ok(Json(http.worker.cordon(&id, true).await?).into_response())
}

async fn uncordon(State(http): State<Shared>, Path(id): Path<String>) -> Result<Response, Failure> {
    Ok(Json(http.worker.cordon(&id, false).await?).into_response())
}

async fn processes(
    State(http): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    Ok(Json(http.worker.processes(&id).await?).into_response())
}

async fn versions(State(http): State<Shared>, Path(id): Path<String>) -> Result<Response, Failure> {
    Ok(Json(http.worker.versions(&id).await?).into_response())
}

#[derive(Deserialize)]
struct ChunkQuery {
    since: Option<u64>,
    max_bytes: u64,
}

/// The output available now, without following: a remote control plane follows by asking
/// again from where the last chunk ended.
async fn log_chunks(
    State(http): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<ChunkQuery>,
) -> Result<Response, Failure> {
    let mut receiver = http
        .worker
        .read_logs(&id, query.since, false, query.max_bytes)
        .await?;
    let mut chunks = Vec::new();
    while let Some(chunk) = receiver.recv().await {
        chunks.push(chunk);
    }
    Ok(Json(chunks).into_response())
}

async fn notice_snapshot(State(http): State<Shared>) -> Result<Response, Failure> {
    Ok(Json(http.worker.notice_snapshot().await?).into_response())
}

fn ndjson_line(line: &NoticeLine) -> Bytes {
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Streams the snapshot, then live notices, until the follower disconnects or falls
/// behind by more than [`NOTICE_BUFFER`] (it then reconnects for a fresh snapshot).
async fn follow_notices(State(http): State<Shared>) -> Result<Response, Failure> {
    // Subscribe before the snapshot, so nothing between the two is missed.
    let live = http.notices.subscribe();
    let snapshot = http.worker.notice_snapshot().await?;
    let after = snapshot.last_event_id;
    let first = ndjson_line(&NoticeLine::Snapshot(snapshot));
    let start = tokio::time::Instant::now() + NOTICE_KEEPALIVE;
    let keepalive = tokio::time::interval_at(start, NOTICE_KEEPALIVE);
    let rest = futures::stream::unfold(
        (live, keepalive),
        move |(mut live, mut keepalive)| async move {
            loop {
                tokio::select! {
                    received = live.recv() => match received {
                        // Already reflected in the snapshot.
                        Ok(notice) if notice.event_id.is_some_and(|id| id <= after) => continue,
                        Ok(notice) => {
                            let line = ndjson_line(&NoticeLine::Notice(notice));
                            return Some((Ok::<_, Infallible>(line), (live, keepalive)));
                        }
                        Err(_) => return None,
                    },
                    _ = keepalive.tick() => {
                        return Some((Ok(Bytes::from_static(b"\n")), (live, keepalive)));
                    }
                }
            }
        },
    );
    let stream = futures::stream::once(async move { Ok::<_, Infallible>(first) }).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn doctor_check(State(http): State<Shared>) -> Result<Response, Failure> {
    Ok(Json(http.worker.doctor(false).await?).into_response())
}

async fn doctor_repair(State(http): State<Shared>) -> Result<Response, Failure> {
    Ok(Json(http.worker.doctor(true).await?).into_response())
}
