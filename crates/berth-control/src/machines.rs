//! `/v1/apps/{app}/machines`: the Machine lifecycle, forwarded to the pinned worker, with
//! quotas, rate limits, leases and idempotency keys checked at the edge.

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use berth_agent::{CreateOnWorker, EventSource};
use berth_api::{
    ChangeSource, CreateMachineRequest, DestroyResponse, ErrorBody, Machine, StartRequest,
    StartStopResponse, StopRequest, UpdateMachineRequest,
};
use berth_core::{ids, validate};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use crate::apps::ignore_not_found;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery, OptionalJson};
use crate::idempotency::{self, Begin};
use crate::leases;
use crate::limits::{self, Action, Share};
use crate::store::{AppRow, Inserted, MachineIndexRow};
use crate::timing::{Arrived, ServerTiming, SERVER_TIMING};
use crate::{ControlPlane, Shared};
use berth_agent::{machine_disk_mb, AgentError};
use berth_api::Resources;
use berth_core::placement::PlacementRequest;

fn share(config: &berth_api::MachineConfig) -> Share {
    Share {
        cpus: u64::from(config.guest.cpus),
        memory_mb: u64::from(config.guest.memory_mb),
    }
}

#[utoipa::path(post, path = "/apps/{app}/machines", tag = "machines",
    params(("app" = String, Path),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body = CreateMachineRequest,
    responses((status = 200, body = Machine), (status = "default", body = ErrorBody)))]
pub(crate) async fn create_machine(
    State(control): State<Shared>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath(app): ApiPath<String>,
    ApiJson(request): ApiJson<CreateMachineRequest>,
) -> Result<Response, ApiError> {
    let app_row = control.app(&principal, &app).await?;
    control.check_rate(&principal, Action::Create, None).await?;
    validate::validate_create(&request)?;
    let claim = match idempotency::begin(
        &control,
        &principal,
        &headers,
        &format!("create {app}"),
        &request,
    )
    .await?
    {
        Begin::Replay(response) => return Ok(response),
        Begin::Proceed(claim) => claim,
    };
    let id = claim
        .as_ref()
        .map(idempotency::Claim::machine_id)
        .unwrap_or_else(ids::new_machine_id);
    let result = match crate::images::pull_scope(&control, &principal, &app_row.org_slug).await {
        Ok(pull) => create(&control, &app_row, request, id, pull).await,
        Err(error) => Err(error),
    };
    Ok(idempotency::finish(claim, result.map(Json).into_response()).await)
}

async fn create(
    control: &ControlPlane,
    app: &AppRow,
    request: CreateMachineRequest,
    id: String,
    pull: berth_image::PullScope,
) -> Result<Machine, ApiError> {
    // A keyed create retried after the control plane died in the middle of it: the
    // Machine is already indexed (and pinned); ask its worker again, which answers a
    // repeated create of an id with the Machine it has, or makes it if it rolled back.
    if let Some(row) = control.store.machine(&app.name, &id).await? {
        let worker = control.worker(&row.worker)?;
        let created = worker
            .create(CreateOnWorker {
                id: id.clone(),
                app: app.name.clone(),
                name: row.name.clone(),
                config: request.config,
                skip_launch: request.skip_launch,
                org: Some(app.org_slug.clone()),
                pull,
            })
            .await;
        return match created {
            Ok(machine) => Ok(seen(control, machine, &row.worker).await),
            Err(error) => Err(error.into()),
        };
    }
    let org = &app.org_slug;
    let quotas = control.limits_of(org).quotas;
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| format!("machine-{id}"));
    let placement = PlacementRequest {
        region: request.region.clone(),
        cpus: request.config.guest.cpus,
        memory_mb: u64::from(request.config.guest.memory_mb),
        disk_mb: machine_disk_mb(&request.config.guest),
    };
    let worker_name = control.place(&placement)?;
    let reservation = {
        // The count and the insert happen under the org's lock: no two creates can both
        // take the last slot.
        let _org = control.lock_org(org).await;
        let machines = control.store.count_org_machines(org).await?;
        if machines >= quotas.max_machines {
            return Err(limits::exceeded(
                "max_machines",
                quotas.max_machines,
                machines,
            ));
        }
        let reservation = if request.skip_launch {
            None
        } else {
            Some(
                control
                    .usage
                    .reserve(org, &id, share(&request.config), &quotas)?,
            )
        };
        let row = MachineIndexRow {
            id: id.clone(),
            app: app.name.clone(),
            name: name.clone(),
            worker: worker_name.clone(),
        };
        if control.store.insert_machine(&row).await? == Inserted::AlreadyExists {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("app {} already has a machine named {name}", app.name),
            ));
        }
        reservation
    };
    crate::usage::record_owner(control.store.pool(), &id, &app.name, org).await?;
    let size = Resources {
        cpus: placement.cpus,
        memory_mb: placement.memory_mb,
        disk_mb: placement.disk_mb,
    };
    control
        .workers
        .reserve(&worker_name, &id, size, !request.skip_launch);
    let worker = control.worker(&worker_name)?;
    let created = worker
        .create(CreateOnWorker {
            id: id.clone(),
            app: app.name.clone(),
            name,
            config: request.config,
            skip_launch: request.skip_launch,
            org: Some(org.clone()),
            pull,
        })
        .await;
    drop(reservation);
    let made = match &created {
        Ok(_) | Err(berth_agent::AgentError::StartFailed { .. }) => true,
        Err(_) => !crate::reconcile::worker_lacks(&worker, &id).await,
    };
    control.workers.create_ended(&worker_name, &id, made);
    match created {
        Ok(machine) => Ok(seen(control, machine, &worker_name).await),
        // The Machine exists in `failed`; the client may inspect, update or destroy it.
        Err(error @ berth_agent::AgentError::StartFailed { .. }) => Err(error.into()),
        Err(error) => {
            // The worker may have recorded the Machine before failing (its CPU taken by
            // the time it booted, say): only an id it does not have leaves the index.
            if !made {
                control.store.delete_machine(&id).await?;
            }
            Err(error.into())
        }
    }
}

/// `?metadata.<key>=<value>` filters; nothing else is taken.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only Machines whose metadata has this key with this value; may be repeated with
    /// other keys.
    #[serde(rename = "metadata.{key}")]
    #[param(rename = "metadata.{key}")]
    #[allow(dead_code)]
    metadata: Option<String>,
}

#[utoipa::path(get, path = "/apps/{app}/machines", tag = "machines",
    params(("app" = String, Path), ListQuery),
    responses((status = 200, body = Vec<Machine>), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_machines(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(app): ApiPath<String>,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
) -> Result<Json<Vec<Machine>>, ApiError> {
    control.check_rate(&principal, Action::Read, None).await?;
    let mut filters = BTreeMap::new();
    for (name, value) in query {
        let Some(key) = name.strip_prefix("metadata.") else {
            return Err(ApiError::invalid_config(
                name.clone(),
                format!("unknown query parameter {name:?}; filter with metadata.<key>=<value>"),
            ));
        };
        filters.insert(key.to_owned(), value);
    }
    control.app(&principal, &app).await?;
    let rows = control.store.machines(&app).await?;
    let mut workers: Vec<&str> = rows.iter().map(|row| row.worker.as_str()).collect();
    workers.sort_unstable();
    workers.dedup();
    let mut machines = Vec::with_capacity(rows.len());
    for worker in workers {
        match control.worker(worker)?.list(&app).await {
            Ok(listed) => {
                for machine in listed {
                    machines.push(answered_by(machine, worker));
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
    machines.retain(|machine| {
        filters
            .iter()
            .all(|(key, value)| machine.config.metadata.get(key) == Some(value))
    });
    machines.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(Json(machines))
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Machine), (status = "default", body = ErrorBody)))]
pub(crate) async fn get_machine(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Machine>, ApiError> {
    control.check_rate(&principal, Action::Read, None).await?;
    let (_, row) = control.machine(&principal, &app, &id).await?;
    match control.worker(&row.worker)?.get(&id).await {
        Ok(machine) => Ok(Json(answered_by(machine, &row.worker))),
        Err(error @ AgentError::Unavailable { .. }) => {
            match last_known(&control, &id, &row.worker).await? {
                Some(machine) => Ok(Json(machine)),
                None => Err(error.into()),
            }
        }
        Err(error) => Err(error.into()),
    }
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-lease-nonce" = Option<String>, Header, description = "needed while a lease is held")),
    request_body = UpdateMachineRequest,
    responses((status = 200, body = Machine), (status = "default", body = ErrorBody)))]
pub(crate) async fn update_machine(
    State(control): State<Shared>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<UpdateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    let (app_row, row) = control.machine(&principal, &app, &id).await?;
    control
        .check_rate(&principal, Action::Update, Some(&id))
        .await?;
    leases::check(&control, &id, &headers).await?;
    validate::validate_config(&request.config)?;
    let org = &app_row.org_slug;
    let _reservation = if request.skip_launch {
        None
    } else {
        let quotas = control.limits_of(org).quotas;
        Some(
            control
                .usage
                .reserve(org, &id, share(&request.config), &quotas)?,
        )
    };
    let pull = crate::images::pull_scope(&control, &principal, org).await?;
    let machine = control
        .worker(&row.worker)?
        .update(&id, request, pull)
        .await?;
    Ok(Json(seen(&control, machine, &row.worker).await))
}

/// Only the operator (the proxy runs with the admin token) may record a start or stop as
/// something other than the caller's own.
fn check_source(principal: &Principal, source: Option<ChangeSource>) -> Result<(), ApiError> {
    match source {
        None | Some(ChangeSource::User) => Ok(()),
        Some(_) => principal.require_admin(),
    }
}

/// The common prologue of start, stop and destroy: lookup, rate limit, lease, key.
async fn prologue(
    control: &Shared,
    principal: &Principal,
    headers: &HeaderMap,
    app: &str,
    id: &str,
    action: Action,
    request: &impl Serialize,
) -> Result<Result<(AppRow, MachineIndexRow, Option<idempotency::Claim>), Response>, ApiError> {
    // The key first: a retried destroy must get its first answer, not a 404.
    let operation = format!("{} {app}/{id}", action.as_str());
    let claim = match idempotency::begin(control, principal, headers, &operation, request).await? {
        Begin::Replay(response) => return Ok(Err(response)),
        Begin::Proceed(claim) => claim,
    };
    // The lease is read beside the lookup; it is judged in the same order as before.
    let (machine, lease) = tokio::join!(
        control.machine(principal, app, id),
        leases::current(control, id)
    );
    let (app_row, row) = machine?;
    control.check_rate(principal, action, Some(id)).await?;
    leases::check_against(control, lease, headers)?;
    Ok(Ok((app_row, row, claim)))
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/start", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body(content = Option<StartRequest>),
    responses((status = 200, body = StartStopResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn start_machine(
    State(control): State<Shared>,
    principal: Principal,
    headers: HeaderMap,
    arrived: Option<Extension<Arrived>>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<StartRequest>,
) -> Result<Response, ApiError> {
    let mut timing = ServerTiming::since(arrived.map(|Extension(Arrived(at))| at));
    check_source(&principal, request.source)?;
    let (app_row, row, claim) = match prologue(
        &control,
        &principal,
        &headers,
        &app,
        &id,
        Action::Start,
        &request,
    )
    .await?
    {
        Ok(parts) => parts,
        Err(replay) => return Ok(replay),
    };
    timing.lap("api_prologue");
    let result = async {
        let worker = control.worker(&row.worker)?;
        let machine = worker.get(&id).await?;
        timing.lap("api_machine_get");
        let org = &app_row.org_slug;
        let quotas = control.limits_of(org).quotas;
        let _reservation = control
            .usage
            .reserve(org, &id, share(&machine.config), &quotas)?;
        let source = request.source.map_or(EventSource::User, EventSource::from);
        timing.lap("api_quota");
        let mut answer = worker.start(&id, source).await?;
        timing.worker(std::mem::take(&mut answer.timings));
        answer.machine = seen(&control, answer.machine, &row.worker).await;
        timing.lap("api_cache");
        Ok::<_, ApiError>(Json(answer))
    }
    .await;
    let mut response = idempotency::finish(claim, result.into_response()).await;
    timing.lap("api_answer");
    if let Some(value) = timing.header_value() {
        response.headers_mut().insert(SERVER_TIMING.clone(), value);
    }
    Ok(response)
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/stop", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body(content = Option<StopRequest>),
    responses((status = 200, body = StartStopResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn stop_machine(
    State(control): State<Shared>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<StopRequest>,
) -> Result<Response, ApiError> {
    check_source(&principal, request.source)?;
    let (_, row, claim) = match prologue(
        &control,
        &principal,
        &headers,
        &app,
        &id,
        Action::Stop,
        &request,
    )
    .await?
    {
        Ok(parts) => parts,
        Err(replay) => return Ok(replay),
    };
    let result = async {
        let mut answer = control.worker(&row.worker)?.stop(&id, request).await?;
        answer.machine = seen(&control, answer.machine, &row.worker).await;
        Ok::<_, ApiError>(Json(answer))
    }
    .await;
    Ok(idempotency::finish(claim, result.into_response()).await)
}

#[derive(Debug, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DestroyQuery {
    /// Destroy even a started Machine.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), DestroyQuery,
           ("berth-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    responses((status = 200, body = DestroyResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn destroy_machine(
    State(control): State<Shared>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<DestroyQuery>,
) -> Result<Response, ApiError> {
    let (_, row, claim) = match prologue(
        &control,
        &principal,
        &headers,
        &app,
        &id,
        Action::Destroy,
        &query,
    )
    .await?
    {
        Ok(parts) => parts,
        Err(replay) => return Ok(replay),
    };
    let result = async {
        control
            .worker(&row.worker)?
            .destroy(&id, query.force)
            .await
            .or_else(ignore_not_found)?;
        control.store.delete_machine(&id).await?;
        leases::forget(&control, &id).await?;
        Ok::<_, ApiError>(Json(DestroyResponse { ok: true }))
    }
    .await;
    Ok(idempotency::finish(claim, result.into_response()).await)
}

/// Marks a Machine answered by its worker with the worker's name and status.
fn answered_by(mut machine: Machine, worker: &str) -> Machine {
    machine.worker = Some(worker.to_owned());
    machine.worker_status = Some(berth_api::MachineWorkerStatus::Ok);
    machine
}

/// After a change (create, update, start, stop): marks the answer, and remembers it as the
/// last known state for when that worker is down (written in the background). Reads only
/// mark, so GET and list cost no write.
async fn seen(control: &ControlPlane, machine: Machine, worker: &str) -> Machine {
    let machine = answered_by(machine, worker);
    if let Ok(json) = serde_json::to_string(&machine) {
        control.last_known.remember(&machine.id, json);
    }
    machine
}

async fn last_known(
    control: &ControlPlane,
    id: &str,
    worker: &str,
) -> Result<Option<Machine>, ApiError> {
    let Some(json) = control.last_known.get(&control.store, id).await? else {
        return Ok(None);
    };
    let Ok(mut machine) = serde_json::from_str::<Machine>(&json) else {
        return Ok(None);
    };
    machine.worker = Some(worker.to_owned());
    machine.worker_status = Some(berth_api::MachineWorkerStatus::Unreachable);
    Ok(Some(machine))
}
