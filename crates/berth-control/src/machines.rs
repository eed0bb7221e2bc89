//! `/v1/apps/{app}/machines`: the Machine lifecycle, forwarded to the pinned worker.

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_agent::{CreateOnWorker, EventSource};
use berth_api::{
    CreateMachineRequest, DestroyResponse, Machine, StartStopResponse, StopRequest,
    UpdateMachineRequest,
};
use berth_core::{ids, validate};
use serde::Deserialize;

use crate::apps::ignore_not_found;
use crate::error::ApiError;
use crate::extract::{ApiJson, BearerToken, OptionalJson};
use crate::store::{Inserted, MachineIndexRow};
use crate::{ControlPlane, Shared};
use berth_agent::{AgentError, MACHINE_DISK_MB};
use berth_api::Resources;
use berth_core::placement::PlacementRequest;

const DEFAULT_LOG_BYTES: u64 = 1024 * 1024;
const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;

async fn create_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath(app): UrlPath<String>,
    ApiJson(request): ApiJson<CreateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    control.authorize(&token)?;
    let app_row = control.app(&app).await?;
    validate::validate_create(&request)?;
    let id = ids::new_machine_id();
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| format!("machine-{id}"));
    let placement = PlacementRequest {
        region: request.region.clone(),
        cpus: request.config.guest.cpus,
        memory_mb: u64::from(request.config.guest.memory_mb),
        disk_mb: MACHINE_DISK_MB,
    };
    let worker_name = control.place(&placement)?;
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
    crate::usage::record_owner(control.store.pool(), &id, &app, &app_row.org_slug).await?;
    let worker = control.worker(&worker_name)?;
    let size = Resources {
        cpus: placement.cpus,
        memory_mb: placement.memory_mb,
        disk_mb: placement.disk_mb,
    };
    control
        .workers
        .reserve(&worker_name, size, !request.skip_launch);
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
        Ok(machine) => Ok(Json(seen(&control, machine, &worker_name).await)),
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
        match control.worker(worker)?.list(&app).await {
            Ok(listed) => {
                for machine in listed {
                    machines.push(seen(&control, machine, worker).await);
                }
            }
            // A worker that is down does not hide its Machines: show what was last known.
            Err(AgentError::Unavailable { .. }) => {
                for row in rows.iter().filter(|row| row.worker == worker) {
                    if let Some(machine) = last_known(&control, &row.id, worker).await? {
                        machines.push(machine);
                    }
                }
            }
            Err(error) => return Err(error.into()),
        }
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
    match control.worker(&row.worker)?.get(&id).await {
        Ok(machine) => Ok(Json(seen(&control, machine, &row.worker).await)),
        Err(error @ AgentError::Unavailable { .. }) => {
            match last_known(&control, &id, &row.worker).await? {
                Some(machine) => Ok(Json(machine)),
                None => Err(error.into()),
            }
        }
        Err(error) => Err(error.into()),
    }
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
    let machine = control.worker(&row.worker)?.update(&id, request).await?;
    Ok(Json(seen(&control, machine, &row.worker).await))
}

async fn start_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
) -> Result<Json<StartStopResponse>, ApiError> {
    control.authorize(&token)?;
    let row = control.machine(&app, &id).await?;
    let mut answer = control
        .worker(&row.worker)?
        .start(&id, EventSource::User)
        .await?;
    answer.machine = seen(&control, answer.machine, &row.worker).await;
    Ok(Json(answer))
}

async fn stop_machine(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath((app, id)): UrlPath<(String, String)>,
    OptionalJson(request): OptionalJson<StopRequest>,
) -> Result<Json<StartStopResponse>, ApiError> {
    control.authorize(&token)?;
    let row = control.machine(&app, &id).await?;
    let mut answer = control.worker(&row.worker)?.stop(&id, request).await?;
    answer.machine = seen(&control, answer.machine, &row.worker).await;
    Ok(Json(answer))
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

/// Marks a Machine answered by its worker with the worker's name, and remembers it as the
/// last known state for when that worker is down.
async fn seen(control: &ControlPlane, mut machine: Machine, worker: &str) -> Machine {
    machine.worker = Some(worker.to_owned());
    machine.worker_status = Some("ok".into());
    if let Ok(json) = serde_json::to_string(&machine) {
        if let Err(error) = control.store.remember_machine(&machine.id, &json).await {
            tracing::warn!(machine = %machine.id, %error, "caching the machine's last known state");
        }
    }
    machine
}

async fn last_known(
    control: &ControlPlane,
    id: &str,
    worker: &str,
) -> Result<Option<Machine>, ApiError> {
    let Some(json) = control.store.last_known_machine(id).await? else {
        return Ok(None);
    };
    let Ok(mut machine) = serde_json::from_str::<Machine>(&json) else {
        return Ok(None);
    };
    machine.worker = Some(worker.to_owned());
    machine.worker_status = Some("unreachable".into());
    Ok(Some(machine))
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(list_machines).post(create_machine))
        .route(
            "/{id}",
            get(get_machine)
                .post(update_machine)
                .delete(destroy_machine),
        )
        .route("/{id}/start", post(start_machine))
        .route("/{id}/stop", post(stop_machine))
        .route("/{id}/logs", get(machine_logs))
}
