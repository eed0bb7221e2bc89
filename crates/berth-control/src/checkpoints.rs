//! Checkpoints of a Machine's disk, their restore, and forks: routed to the Machine's
//! worker, which holds the snapshots ([`berth_worker::WorkerService::checkpoint_create`]).
//! A fork is made on the worker of its source, where the checkpoint is.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use berth_api::{
    Checkpoint, CreateCheckpointRequest, CreateMachineRequest, ErrorBody, FromCheckpoint, Machine,
    OkResponse, RestoreCheckpointResponse,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiPath, OptionalJson, Preconditions};
use crate::limits::Action;
use crate::machines::{admit, seen};
use crate::store::AppRow;
use crate::{ControlPlane, Shared};

/// `POST …/machines/{id}/fork`: a new Machine with a checkpoint of this one's files,
/// taken now, and its config (without its volumes and standbys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkMachineRequest {
    /// The new Machine's name; `machine-<id>` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Another app of the same org to make the fork in.
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub skip_launch: bool,
    /// The comment of the checkpoint the fork starts from.
    #[serde(default)]
    pub comment: Option<String>,
}

/// Where a fork's files come from: the checkpoint's Machine and worker.
#[derive(Debug, Clone)]
pub(crate) struct ForkSource {
    pub machine: String,
    pub checkpoint: String,
    pub worker: String,
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/checkpoints", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held")),
    request_body(content = Option<CreateCheckpointRequest>),
    responses((status = 200, body = Checkpoint, description = "taken: a read-only snapshot of the Machine's files, in constant time; a running Machine is frozen for the instant it takes and runs on (a `checkpoint` event)"),
              (status = 404, body = ErrorBody, description = "`not_found`: no such Machine"),
              (status = 409, body = ErrorBody, description = "`invalid_state`: an operation of the Machine is under way (with a retry hint)"),
              (status = 422, body = ErrorBody, description = "`checkpoints_unsupported`: the Machine's disk is not a btrfs subvolume (its worker's data dir is not btrfs with quotas, or it was made before)"),
              (status = 507, body = ErrorBody, description = "`insufficient_storage`: no room for the snapshot; nothing is left half-made"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn create_checkpoint(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<CreateCheckpointRequest>,
) -> Result<Json<Checkpoint>, ApiError> {
    let (_, row) = admit(&control, &pre, &app, &id, Action::Update).await?;
    let checkpoint = control
        .worker(&row.worker)?
        .checkpoint_create(&id, request.comment)
        .await?;
    Ok(Json(checkpoint))
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/checkpoints", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Vec<Checkpoint>, description = "oldest first; none for a Machine whose disk cannot be checkpointed"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn list_checkpoints(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Vec<Checkpoint>>, ApiError> {
    let (_, row) = control.machine(&principal, &app, &id).await?;
    control
        .check_rate(&principal, Action::Read, Some(&id))
        .await?;
    Ok(Json(
        control.worker(&row.worker)?.checkpoint_list(&id).await?,
    ))
}

#[utoipa::path(delete, path = "/apps/{app}/machines/{id}/checkpoints/{checkpoint}", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path), ("checkpoint" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held")),
    responses((status = 200, body = OkResponse, description = "deleted; forks made from it keep their files"),
              (status = 404, body = ErrorBody, description = "`checkpoint_not_found`"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn delete_checkpoint(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id, checkpoint)): ApiPath<(String, String, String)>,
) -> Result<Json<OkResponse>, ApiError> {
    let (_, row) = admit(&control, &pre, &app, &id, Action::Update).await?;
    control
        .worker(&row.worker)?
        .checkpoint_delete(&id, &checkpoint)
        .await?;
    Ok(Json(OkResponse { ok: true }))
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/checkpoints/{checkpoint}/restore", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path), ("checkpoint" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held")),
    responses((status = 200, body = RestoreCheckpointResponse, description = "the Machine's files are the checkpoint's; `undo` is the automatic checkpoint of the files it had. A started Machine was stopped (with its stop config) and started again on them: `restarted`. A `restore` event says both"),
              (status = 404, body = ErrorBody, description = "`checkpoint_not_found`"),
              (status = 409, body = ErrorBody, description = "`invalid_state`: suspended (stop it first), or an operation is under way"),
              (status = 422, body = ErrorBody, description = "`checkpoints_unsupported`"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn restore_checkpoint(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id, checkpoint)): ApiPath<(String, String, String)>,
) -> Result<Json<RestoreCheckpointResponse>, ApiError> {
    let (_, row) = admit(&control, &pre, &app, &id, Action::Update).await?;
    let mut answer = control
        .worker(&row.worker)?
        .checkpoint_restore(&id, &checkpoint)
        .await?;
    answer.machine = seen(&control, answer.machine, &row.worker).await;
    Ok(Json(answer))
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/fork", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path)),
    request_body(content = Option<ForkMachineRequest>),
    responses((status = 200, body = Machine, description = "a new Machine on the source's worker with the files of a checkpoint taken now and the source's config (without volumes and standbys); independent of the source from then on"),
              (status = 422, body = ErrorBody, description = "`checkpoints_unsupported`"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn fork_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<ForkMachineRequest>,
) -> Result<Response, ApiError> {
    let (_, row) = admit(&control, &pre, &app, &id, Action::Create).await?;
    let worker = control.worker(&row.worker)?;
    let source = worker.get(&id).await?;
    let comment = request.comment.unwrap_or_else(|| "fork".to_owned());
    let checkpoint = worker.checkpoint_create(&id, comment).await?;
    let mut config = source.config;
    config.mounts.clear();
    config.standbys.clear();
    let create = CreateMachineRequest {
        name: request.name,
        region: None,
        skip_launch: request.skip_launch,
        config,
        skip_secrets: false,
        min_secrets_version: None,
        lease_ttl: None,
        from_checkpoint: Some(FromCheckpoint {
            machine: id.clone(),
            checkpoint: checkpoint.id,
            app: Some(app.clone()),
        }),
    };
    let target = request.app.unwrap_or(app);
    control
        .create_machine(&pre.principal, pre.key.as_ref(), &target, create)
        .await
}

impl ControlPlane {
    /// The Machine and worker a create's `from_checkpoint` names, if the caller may read
    /// it and it belongs to the org of the new Machine's app.
    pub(crate) async fn fork_source(
        &self,
        principal: &Principal,
        app: &AppRow,
        from: Option<&FromCheckpoint>,
    ) -> Result<Option<ForkSource>, ApiError> {
        let Some(from) = from else {
            return Ok(None);
        };
        let source_app = from.app.as_deref().unwrap_or(&app.name);
        let (source_app, row) = self
            .machine(principal, source_app, &from.machine)
            .await
            .map_err(|mut error| {
                error.body.field = Some("from_checkpoint.machine".into());
                error
            })?;
        if source_app.org_slug != app.org_slug {
            let mut error = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_fork",
                format!(
                    "machine {} belongs to org {}, not to {}, the org of app {}",
                    from.machine, source_app.org_slug, app.org_slug, app.name
                ),
            );
            error.body.field = Some("from_checkpoint.machine".into());
            return Err(error);
        }
        Ok(Some(ForkSource {
            machine: row.id,
            checkpoint: from.checkpoint.clone(),
            worker: row.worker,
        }))
    }
}
