//! `/v1/apps/{app}/machines`: the Machine lifecycle, forwarded to the pinned worker, with
//! quotas, rate limits, leases and idempotency keys checked at the edge.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use berth_api::{
    ApiDuration, CreateMachineRequest, DestroyResponse, ErrorBody, HostStatus, Machine,
    MachineConfig, MachineState, MachineVersion, MigrateMachineRequest, MigrateMachineResponse,
    OkResponse, ProcessStat, RecreateMachineRequest, RestartPolicy, RootfsPersist, SignalRequest,
    StartRequest, StartStopResponse, StopRequest, SuspendRequest, UpdateMachineRequest,
};
use berth_core::{ids, validate};
use berth_worker::{CreateOnWorker, WorkerService};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use crate::apps::ignore_not_found;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery, OptionalJson, Preconditions};
use crate::idempotency::{self, IdempotencyKey};
use crate::leases::{self, LeaseNonce};
use crate::limits::{Action, Share};
use crate::store::{AppRow, MachineIndexRow, MachineSize};
use crate::timing::{Arrived, ServerTiming, SERVER_TIMING};
use crate::workers::Placement;
use crate::{ControlPlane, Shared};
use berth_api::Resources;
use berth_core::placement::{machine_disk_mb, PlacementRequest};
use berth_worker::WorkerError;

fn share(config: &berth_api::MachineConfig) -> Share {
    MachineSize::of(&config.guest).into()
}

impl From<MachineSize> for Share {
    fn from(size: MachineSize) -> Share {
        Share {
            cpus: u64::from(size.cpus),
            memory_mb: u64::from(size.memory_mb),
        }
    }
}

#[utoipa::path(post, path = "/apps/{app}/machines", tag = "machines",
    params(("app" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body = CreateMachineRequest,
    responses((status = 200, body = Machine, headers(("berth-warnings" = String, description = "the body's ignored fields as `ignored_field=<path>` items; the JSON answer lists them in `warnings` (FieldWarning)"))),
              (status = 422, body = ErrorBody, description = "`invalid_standbys`: `config.standbys` names something other than other Machines of the app"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn create_machine(
    State(control): State<Shared>,
    principal: Principal,
    key: Option<IdempotencyKey>,
    ApiPath(app): ApiPath<String>,
    ApiJson(request): ApiJson<CreateMachineRequest>,
) -> Result<Response, ApiError> {
    control
        .create_machine(&principal, key.as_ref(), &app, request)
        .await
}

/// Fly's defaults, written into the config so it shows them: the restart policy
/// `on-failure` with 10 retries when none is named, and `rootfs.size_gb` as the disk
/// when `guest.disk_mb` is unset. `rootfs.persist: never` is refused: Berth keeps a
/// Machine's files across stop and start.
pub(crate) fn apply_fly_defaults(config: &mut MachineConfig) -> Result<(), ApiError> {
    if config.restart.policy == RestartPolicy::OnFailure && config.restart.max_retries.is_none() {
        config.restart.max_retries = Some(berth_core::restart::DEFAULT_MAX_RETRIES);
    }
    if config.rootfs.persist == RootfsPersist::Never {
        return Err(ApiError::invalid_config(
            "config.rootfs.persist",
            "never is not supported: a Machine keeps its files across stop and start; \
             use restart (fresh at each update) or always",
        ));
    }
    if let Some(size_gb) = config.rootfs.size_gb {
        let disk_mb = u32::try_from(size_gb.saturating_mul(1024))
            .map_err(|_| ApiError::invalid_config("config.rootfs.size_gb", "too large"))?;
        match config.guest.disk_mb {
            None => config.guest.disk_mb = Some(disk_mb),
            Some(given) if given != disk_mb => {
                return Err(ApiError::invalid_config(
                    "config.rootfs.size_gb",
                    format!("{size_gb} GB disagrees with config.guest.disk_mb ({given} MiB)"),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The list's filters, as Fly's clients send them, and Berth's `metadata.<key>`. Only
/// describes them: they are read by hand from the pairs ([`ListFilter`]), since `state`
/// may repeat.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct ListQuery {
    /// Only Machines whose metadata has this key with this value; may be repeated with
    /// other keys.
    #[param(rename = "metadata.{key}")]
    metadata: Option<String>,
    /// Only Machines in this region.
    region: Option<String>,
    /// Only Machines in these states: comma-separated, repeatable (`created`, `started`,
    /// `stopped`, `suspended`, or any other Machine state).
    #[param(style = Form, explode)]
    state: Vec<String>,
    /// Also Machines destroyed in the last 48 hours (Berth keeps their last JSON that long),
    /// in state `destroyed`.
    include_deleted: Option<bool>,
    /// Leave out `config`, `checks`, `events`, `host_status` (and `worker_status`) and
    /// `nonce` of each Machine.
    summary: Option<bool>,
}

struct ListFilter {
    metadata: BTreeMap<String, String>,
    region: Option<String>,
    states: Option<Vec<MachineState>>,
    include_deleted: bool,
    summary: bool,
}

impl ListFilter {
    fn parse(pairs: Vec<(String, String)>) -> Result<ListFilter, ApiError> {
        let mut filter = ListFilter {
            metadata: BTreeMap::new(),
            region: None,
            states: None,
            include_deleted: false,
            summary: false,
        };
        let flag = |name: &str, value: &str| match value {
            "true" | "1" => Ok(true),
            "false" | "0" | "" => Ok(false),
            _ => Err(ApiError::invalid_config(name, "true or false")),
        };
        for (name, value) in pairs {
            match name.as_str() {
                "region" => filter.region = Some(value),
                "state" => {
                    let states = filter.states.get_or_insert_with(Vec::new);
                    for text in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        match MachineState::parse(text) {
                            Some(state) => states.push(state),
                            None => {
                                return Err(ApiError::invalid_config(
                                    "state",
                                    format!("unknown state {text:?}"),
                                ))
                            }
                        }
                    }
                }
                "include_deleted" => filter.include_deleted = flag("include_deleted", &value)?,
                "summary" => filter.summary = flag("summary", &value)?,
                other => {
                    let Some(key) = other.strip_prefix("metadata.") else {
                        return Err(ApiError::invalid_config(
                            other,
                            format!(
                                "unknown query parameter {other:?}; filter with region, state, \
                                 include_deleted, summary or metadata.<key>=<value>"
                            ),
                        ));
                    };
                    filter.metadata.insert(key.to_owned(), value);
                }
            }
        }
        Ok(filter)
    }

    fn keeps(&self, machine: &Machine) -> bool {
        self.region
            .as_ref()
            .is_none_or(|region| machine.region == *region)
            && self
                .states
                .as_ref()
                .is_none_or(|states| states.contains(&machine.state))
            && self
                .metadata
                .iter()
                .all(|(key, value)| machine.config.metadata.get(key) == Some(value))
    }
}

/// Fly's summary of a Machine: its JSON without the heavy parts.
fn summary(machine: &Machine) -> Result<serde_json::Value, ApiError> {
    let mut value = serde_json::to_value(machine).map_err(ApiError::internal)?;
    if let Some(object) = value.as_object_mut() {
        for key in [
            "config",
            "checks",
            "events",
            "host_status",
            "worker_status",
            "nonce",
        ] {
            object.remove(key);
        }
    }
    Ok(value)
}

#[utoipa::path(get, path = "/apps/{app}/machines", tag = "machines",
    params(("app" = String, Path), ListQuery),
    responses((status = 200, body = Vec<Machine>, description = "with `summary=true`, each Machine without `config`, `checks`, `events`, `host_status` and `nonce`"), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_machines(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(app): ApiPath<String>,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let filter = ListFilter::parse(pairs)?;
    let machines = control.list_machines(&principal, &app, &filter).await?;
    if filter.summary {
        let summaries = machines
            .iter()
            .map(summary)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Json(summaries).into_response());
    }
    Ok(Json(machines).into_response())
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Machine), (status = "default", body = ErrorBody)))]
pub(crate) async fn get_machine(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Machine>, ApiError> {
    control.get_machine(&principal, &app, &id).await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`"),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    request_body = UpdateMachineRequest,
    responses((status = 200, body = Machine, headers(("berth-warnings" = String, description = "the body's ignored fields as `ignored_field=<path>` items; the JSON answer lists them in `warnings` (FieldWarning)"))),
              (status = 422, body = ErrorBody, description = "`invalid_standbys`: `config.standbys` names the Machine itself or something other than other Machines of the app"),
              (status = 409, body = ErrorBody, description = "a new mount's volume is held by another Machine (`volume_attached`) or on another worker (`volume_on_other_worker`)"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn update_machine(
    State(control): State<Shared>,
    principal: Principal,
    nonce: Option<LeaseNonce>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<UpdateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    control
        .update_machine(&principal, nonce.as_ref(), &app, &id, request)
        .await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/start", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`"),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body(content = Option<StartRequest>),
    responses((status = 200, body = StartStopResponse, headers(("berth-warnings" = String, description = "the body's ignored fields as `ignored_field=<path>` items; the JSON answer lists them in `warnings` (FieldWarning)"))), (status = "default", body = ErrorBody)))]
pub(crate) async fn start_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    arrived: Option<Extension<Arrived>>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<StartRequest>,
) -> Result<Response, ApiError> {
    let timing = ServerTiming::since(arrived.map(|Extension(Arrived(at))| at));
    control
        .start_machine(&pre, &app, &id, request, timing)
        .await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/stop", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`"),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body(content = Option<StopRequest>),
    responses((status = 200, body = StartStopResponse, headers(("berth-warnings" = String, description = "the body's ignored fields as `ignored_field=<path>` items; the JSON answer lists them in `warnings` (FieldWarning)"))), (status = "default", body = ErrorBody)))]
pub(crate) async fn stop_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<StopRequest>,
) -> Result<Response, ApiError> {
    control.stop_machine(&pre, &app, &id, request).await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/signal", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    request_body = SignalRequest,
    responses((status = 200, body = OkResponse),
              (status = 409, body = ErrorBody, description = "`invalid_state`: the Machine is not started"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn signal_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<SignalRequest>,
) -> Result<Json<OkResponse>, ApiError> {
    control
        .signal_machine(&pre, &app, &id, &request.signal)
        .await
}

/// Fly's restart parameters: how the stop half ends the run.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct RestartQuery {
    /// The stop's grace period as a Go duration (`"10s"`); unset or zero: the Machine's
    /// `stop_config`.
    timeout: Option<String>,
    /// The stop's signal (`SIGTERM` when unset and the Machine names none).
    signal: Option<String>,
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/restart", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), RestartQuery,
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    responses((status = 200, body = OkResponse, description = "stopped (a stop event) and started again (a start event)"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn restart_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<RestartQuery>,
) -> Result<Json<OkResponse>, ApiError> {
    control.restart_machine(&pre, &app, &id, query).await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/migrate", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body(content = Option<MigrateMachineRequest>),
    responses((status = 200, body = MigrateMachineResponse, description = "the Machine on its new worker; a running Machine runs there"),
              (status = 409, body = ErrorBody, description = "`machine_migrating`: another move of it runs; `invalid_state`: it is in a transitional state"),
              (status = 503, body = ErrorBody, description = "`insufficient_capacity`: no other worker fits it"),
              (status = 507, body = ErrorBody, description = "`insufficient_storage`: the destination's disk filled; the Machine stays whole where it was"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn migrate_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<MigrateMachineRequest>,
) -> Result<Response, ApiError> {
    control.migrate_machine(&pre, &app, &id, request).await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/recreate", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    request_body = RecreateMachineRequest,
    responses((status = 200, body = Machine, description = "made again, stopped, on another worker; a `recreate` event says its files were lost"),
              (status = 409, body = ErrorBody, description = "`state_would_be_lost`: lose_state is not true; `worker_available`: its worker answers, so migrate it instead; `volume_on_lost_worker`: it mounts volumes, which were lost with the worker"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn recreate_machine(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<RecreateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    control
        .recreate_machine(&principal, &app, &id, request)
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/suspend", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`"),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    request_body(content = Option<SuspendRequest>),
    responses((status = 200, body = StartStopResponse, description = "suspended (a `suspend` event): checkpointed with its memory and processes into its worker's disk, its CPU and memory freed; its next start resumes it. A suspended Machine answers with a `note`"),
              (status = 409, body = ErrorBody, description = "`invalid_state`: it is not started (a retry hint while in a transitional state)"),
              (status = 422, body = ErrorBody, description = "`suspend_unsupported`: its driver cannot suspend a Machine (only `gvisor` can); the message names the driver"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn suspend_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<SuspendRequest>,
) -> Result<Response, ApiError> {
    control.suspend_machine(&pre, &app, &id, request).await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/cordon", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    responses((status = 200, body = OkResponse, description = "cordoned (`cordoned: true` in the Machine JSON, a `cordon` event): the proxy sends it no traffic and never autostarts it; kept across stop, start and restarts"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn cordon_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<OkResponse>, ApiError> {
    control.cordon_machine(&pre, &app, &id, true).await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/uncordon", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    responses((status = 200, body = OkResponse, description = "uncordoned (an `uncordon` event): traffic and autostart again"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn uncordon_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<OkResponse>, ApiError> {
    control.cordon_machine(&pre, &app, &id, false).await
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/ps", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Vec<ProcessStat>, description = "the processes in the Machine's pid namespace, by pid"),
              (status = 409, body = ErrorBody, description = "`invalid_state`: the Machine is not started"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn machine_processes(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Vec<ProcessStat>>, ApiError> {
    control.check_rate(&principal, Action::Read, None).await?;
    let (_, row) = control.machine(&principal, &app, &id).await?;
    Ok(Json(control.worker(&row.worker)?.processes(&id).await?))
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/versions", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Vec<MachineVersion>, description = "the Machine's configs, one per create and update, newest first"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn machine_versions(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Vec<MachineVersion>>, ApiError> {
    control.check_rate(&principal, Action::Read, None).await?;
    let (_, row) = control.machine(&principal, &app, &id).await?;
    Ok(Json(control.worker(&row.worker)?.versions(&id).await?))
}

#[derive(Debug, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DestroyQuery {
    /// Berth's earlier name for `kill` (deprecated, kept for one release).
    #[serde(default)]
    force: bool,
    /// Destroy even a started Machine (Fly's name).
    #[serde(default)]
    kill: bool,
    /// Admin: forget a Machine whose worker is unavailable (its files are lost with it).
    /// Its copy there is destroyed if the worker comes back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    lose_state: bool,
}

#[utoipa::path(delete, path = "/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), DestroyQuery,
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)"),
           ("idempotency-key" = Option<String>, Header, description = "makes a retry return the first answer")),
    responses((status = 200, body = DestroyResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn destroy_machine(
    State(control): State<Shared>,
    pre: Preconditions,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<DestroyQuery>,
) -> Response {
    control.destroy_machine(&pre, &app, &id, query).await
}

impl ControlPlane {
    /// Validates, places and indexes a new Machine, then has its worker make it.
    pub(crate) async fn create_machine(
        &self,
        principal: &Principal,
        key: Option<&IdempotencyKey>,
        app: &str,
        mut request: CreateMachineRequest,
    ) -> Result<Response, ApiError> {
        let app_row = self.app(principal, app).await?;
        self.check_rate(principal, Action::Create, None).await?;
        apply_fly_defaults(&mut request.config)?;
        leases::check_create_ttl(request.lease_ttl)?;
        validate::validate_create(&request)?;
        let avoid = self
            .standby_targets(app, None, &request.config.standbys)
            .await?;
        let fork = self
            .fork_source(principal, &app_row, request.from_checkpoint.as_ref())
            .await?;
        let operation = format!("create {app}");
        Ok(
            idempotency::once(self, principal, key, &operation, request, {
                |request, keyed_id| async move {
                    let id = keyed_id.unwrap_or_else(ids::new_machine_id);
                    let lease_ttl = request.lease_ttl;
                    let result = match crate::images::pull_scope(self, principal, &app_row.org_slug)
                        .await
                    {
                        Ok(pull) => {
                            create(self, &app_row, request, id, pull, &avoid, fork.as_ref()).await
                        }
                        Err(error) => Err(error),
                    };
                    let result = match (result, lease_ttl) {
                        (Ok(mut machine), Some(ttl)) => {
                            leases::grant_on_create(self, principal, &machine.id, ttl)
                                .await
                                .map(|nonce| {
                                    machine.nonce = Some(nonce);
                                    machine
                                })
                        }
                        (result, _) => result,
                    };
                    result.map(Json).into_response()
                }
            })
            .await,
        )
    }

    /// The app's Machines, from their workers (or as last known, for a worker that is
    /// down), with the destroyed ones Berth still remembers when asked.
    async fn list_machines(
        &self,
        principal: &Principal,
        app: &str,
        filter: &ListFilter,
    ) -> Result<Vec<Machine>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        self.app(principal, app).await?;
        let rows = self.store.machines(app).await?;
        let mut workers: Vec<&str> = rows.iter().map(|row| row.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        let mut machines = Vec::with_capacity(rows.len());
        for worker in workers {
            match self.worker(worker)?.list(app).await {
                Ok(listed) => {
                    for machine in listed {
                        machines.push(answered_by(machine, worker));
                    }
                }
                // A worker that is down does not hide its Machines: show what was last known.
                Err(WorkerError::Unavailable { .. }) => {
                    for row in rows.iter().filter(|row| row.worker == worker) {
                        if let Some(machine) = last_known(self, &row.id, worker).await? {
                            machines.push(machine);
                        }
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
        // Past a move's cutover the destination holds the Machine but lists it only once
        // the move commits there: it is asked for that one Machine, so that the list
        // never loses a Machine in the middle of a move.
        for row in &rows {
            if machines.iter().any(|machine| machine.id == row.id)
                || !self.move_recorded(&row.id).await
            {
                continue;
            }
            if let Ok(machine) = self.worker(&row.worker)?.get(&row.id).await {
                machines.push(answered_by(machine, &row.worker));
            }
        }
        if filter.include_deleted {
            for json in self
                .store
                .destroyed_machines(app, self.clock.now_ms())
                .await?
            {
                if let Ok(machine) = serde_json::from_str::<Machine>(&json) {
                    machines.push(machine);
                }
            }
        }
        machines.retain(|machine| filter.keeps(machine));
        machines.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(machines)
    }

    /// One Machine, from its worker (or as last known, when the worker is down).
    pub(crate) async fn get_machine(
        &self,
        principal: &Principal,
        app: &str,
        id: &str,
    ) -> Result<Json<Machine>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let (_, row) = self.machine(principal, app, id).await?;
        match self.worker(&row.worker)?.get(id).await {
            Ok(machine) => Ok(Json(answered_by(machine, &row.worker))),
            Err(error @ WorkerError::Unavailable { .. }) => {
                match last_known(self, id, &row.worker).await? {
                    Some(machine) => Ok(Json(machine)),
                    None => Err(error.into()),
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Replaces the config, within the quota, on the pinned worker.
    pub(crate) async fn update_machine(
        &self,
        principal: &Principal,
        nonce: Option<&LeaseNonce>,
        app: &str,
        id: &str,
        mut request: UpdateMachineRequest,
    ) -> Result<Json<Machine>, ApiError> {
        self.moves.settled(id).await?;
        let (app_row, row) = self.machine(principal, app, id).await?;
        self.check_rate(principal, Action::Update, Some(id)).await?;
        leases::check(self, id, nonce).await?;
        apply_fly_defaults(&mut request.config)?;
        validate::validate_config(&request.config)?;
        self.standby_targets(app, Some(id), &request.config.standbys)
            .await?;
        let standbys = request.config.standbys.clone();
        // A new driver must be one the Machine's worker offers; the worker says so.
        validate::validate_runtime(&request.config)?;
        // A Machine stays on its worker: the volumes it mounts must be there.
        self.check_mounts_on(&app_row.name, &request.config.mounts, &row.worker)
            .await?;
        let org = &app_row.org_slug;
        let _reservation = if request.skip_launch {
            None
        } else {
            let quotas = self.limits_of(org).quotas;
            Some(
                self.usage
                    .reserve(org, id, share(&request.config), &quotas)?,
            )
        };
        let mut pull = crate::images::pull_scope(self, principal, org).await?;
        pull.source = self.pull_source(&request.config.image).await?;
        let updated = self.worker(&row.worker)?.update(id, request, pull).await;
        // Start counts the size the worker now has; after a failed update it is not known
        // here, and the next start asks.
        let size = updated
            .as_ref()
            .ok()
            .map(|machine| MachineSize::of(&machine.config.guest));
        self.store.set_machine_size(id, size).await?;
        let updated = updated?;
        self.record_standbys(app, id, &standbys).await?;
        Ok(Json(seen(self, updated, &row.worker).await))
    }

    /// Starts a Machine on its worker, within the quota, recording each step in `timing`.
    pub(crate) async fn start_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        request: StartRequest,
        mut timing: ServerTiming,
    ) -> Result<Response, ApiError> {
        let source = pre.source(request.source)?;
        let operation = operation(Action::Start, app, id);
        let lap = &mut timing;
        let mut response = idempotency::once(
            self,
            &pre.principal,
            pre.key.as_ref(),
            &operation,
            request,
            {
                |_, _| async move {
                    let result = async {
                        let (app_row, row) = admit(self, pre, app, id, Action::Start).await?;
                        lap.lap("api_prologue");
                        let answer = self.start_admitted(&app_row, &row, source, lap).await?;
                        Ok::<_, ApiError>(Json(answer))
                    }
                    .await;
                    result.into_response()
                }
            },
        )
        .await;
        timing.lap("api_answer");
        if let Some(value) = timing.header_value() {
            response.headers_mut().insert(SERVER_TIMING.clone(), value);
        }
        Ok(response)
    }

    /// Starts an admitted Machine on its worker within the org's quota.
    pub(crate) async fn start_admitted(
        &self,
        app_row: &AppRow,
        row: &MachineIndexRow,
        source: berth_worker::EventSource,
        lap: &mut ServerTiming,
    ) -> Result<StartStopResponse, ApiError> {
        let id = row.id.as_str();
        let worker = self.worker(&row.worker)?;
        let size = match row.size {
            Some(size) => size,
            None => {
                let size = self.size_from_worker(&worker, id).await?;
                lap.lap("api_machine_get");
                size
            }
        };
        let org = &app_row.org_slug;
        let quotas = self.limits_of(org).quotas;
        let claim = self.claim_start(org, id, size.into(), &quotas).await?;
        lap.lap("api_quota");
        let mut answer = worker.start(id, source).await?;
        claim.keep();
        lap.worker(std::mem::take(&mut answer.timings));
        answer.machine = seen(self, answer.machine, &row.worker).await;
        lap.lap("api_cache");
        Ok(answer)
    }

    /// Moves a Machine to another worker, under the same admission as start and stop.
    pub(crate) async fn migrate_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        request: MigrateMachineRequest,
    ) -> Result<Response, ApiError> {
        let operation = format!("migrate {app}/{id}");
        Ok(self
            .once_admitted(pre, (app, id), &operation, Action::Update, request, {
                |request, app_row, row| async move {
                    self.migrate_admitted(&app_row, &row, request).await
                }
            })
            .await)
    }

    /// Stops a Machine on its worker.
    pub(crate) async fn stop_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        mut request: StopRequest,
    ) -> Result<Response, ApiError> {
        pre.source(request.source)?;
        // Fly's clients always send a timeout, "0s" when none was set, and Fly reads zero
        // as unset: the Machine's `stop_config` (or the default) applies. SIGKILL is the
        // way to stop at once.
        if request
            .timeout
            .is_some_and(|timeout| timeout.as_duration().is_zero())
        {
            request.timeout = None;
        }
        let operation = operation(Action::Stop, app, id);
        Ok(self
            .once_admitted(pre, (app, id), &operation, Action::Stop, request, {
                |request, _, row| async move {
                    let mut answer = self.worker(&row.worker)?.stop(id, request).await?;
                    answer.machine = seen(self, answer.machine, &row.worker).await;
                    Ok(answer)
                }
            })
            .await)
    }

    /// Suspends a started Machine on its worker, under the rules of stop: leases,
    /// idempotency keys, the stop rate limit, and `source` from the admin only.
    pub(crate) async fn suspend_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        request: SuspendRequest,
    ) -> Result<Response, ApiError> {
        let source = pre.source(request.source)?;
        let operation = format!("suspend {app}/{id}");
        Ok(self
            .once_admitted(pre, (app, id), &operation, Action::Stop, request, {
                |_, _, row| async move {
                    let mut answer = self.worker(&row.worker)?.suspend(id, source).await?;
                    answer.machine = seen(self, answer.machine, &row.worker).await;
                    Ok(answer)
                }
            })
            .await)
    }

    /// Sends a signal to a started Machine's command.
    pub(crate) async fn signal_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        signal: &str,
    ) -> Result<Json<OkResponse>, ApiError> {
        validate::validate_signal("signal", signal)?;
        let (_, row) = admit(self, pre, app, id, Action::Stop).await?;
        self.worker(&row.worker)?.signal(id, signal).await?;
        Ok(Json(OkResponse { ok: true }))
    }

    /// Cordons or uncordons a Machine on its worker.
    pub(crate) async fn cordon_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        cordoned: bool,
    ) -> Result<Json<OkResponse>, ApiError> {
        let (_, row) = admit(self, pre, app, id, Action::Update).await?;
        let machine = self.worker(&row.worker)?.cordon(id, cordoned).await?;
        seen(self, machine, &row.worker).await;
        Ok(Json(OkResponse { ok: true }))
    }

    /// Stops a Machine (with the asked signal and grace period) and starts it again: two
    /// ordinary events in its history. A stopped Machine is just started.
    pub(crate) async fn restart_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        query: RestartQuery,
    ) -> Result<Json<OkResponse>, ApiError> {
        let timeout = match query.timeout.as_deref() {
            Some(text) => Some(
                ApiDuration::parse(text)
                    .map_err(|message| ApiError::invalid_config("timeout", message))?,
            ),
            None => None,
        }
        // Zero is unset, as for stop: the Machine's `stop_config` applies.
        .filter(|timeout| !timeout.as_duration().is_zero());
        if let Some(signal) = query.signal.as_deref() {
            validate::validate_signal("signal", signal)?;
        }
        let (app_row, row) = admit(self, pre, app, id, Action::Stop).await?;
        self.check_rate(&pre.principal, Action::Start, Some(id))
            .await?;
        let stop = StopRequest {
            signal: query.signal,
            timeout,
            ..StopRequest::default()
        };
        let stopped = self.worker(&row.worker)?.stop(id, stop).await?;
        seen(self, stopped.machine, &row.worker).await;
        let mut lap = ServerTiming::since(None);
        self.start_admitted(&app_row, &row, berth_worker::EventSource::User, &mut lap)
            .await?;
        Ok(Json(OkResponse { ok: true }))
    }

    /// Destroys a Machine on its worker and forgets it here.
    pub(crate) async fn destroy_machine(
        &self,
        pre: &Preconditions,
        app: &str,
        id: &str,
        query: DestroyQuery,
    ) -> Response {
        let operation = operation(Action::Destroy, app, id);
        self.once_admitted(pre, (app, id), &operation, Action::Destroy, query, {
            |query, _, row| async move {
                if query.lose_state {
                    self.forget_on_lost_worker(&pre.principal, &row.worker, id, "machine")
                        .await?;
                } else {
                    self.worker(&row.worker)?
                        .destroy(id, query.force || query.kill)
                        .await
                        .or_else(ignore_not_found)?;
                }
                self.bury(&row).await?;
                leases::forget(self, id).await?;
                Ok(DestroyResponse { ok: true })
            }
        })
        .await
    }

    /// Runs `call` on an admitted Machine once per idempotency key: a retry with the same
    /// key gets the first call's answer. `call`'s answer is sent as JSON.
    async fn once_admitted<Request, Call, Answer, Body>(
        &self,
        pre: &Preconditions,
        (app, id): (&str, &str),
        operation: &str,
        action: Action,
        request: Request,
        call: Call,
    ) -> Response
    where
        Request: Serialize,
        Call: FnOnce(Request, AppRow, MachineIndexRow) -> Answer,
        Answer: Future<Output = Result<Body, ApiError>>,
        Body: Serialize,
    {
        idempotency::once(
            self,
            &pre.principal,
            pre.key.as_ref(),
            operation,
            request,
            |request, _| async move {
                let result = async {
                    let (app_row, row) = admit(self, pre, app, id, action).await?;
                    call(request, app_row, row).await
                }
                .await;
                result.map(Json).into_response()
            },
        )
        .await
    }
}

impl ControlPlane {
    /// Forgets a destroyed Machine's index entry, keeping its last known JSON (state
    /// `destroyed`) for `include_deleted`. A Machine never seen whole leaves no tombstone.
    async fn bury(&self, row: &MachineIndexRow) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let last = self.last_known.get(&self.store, &row.id).await?;
        self.record_standbys(&row.app, &row.id, &[]).await?;
        let Some(mut machine) = last.and_then(|json| serde_json::from_str::<Machine>(&json).ok())
        else {
            self.store.delete_machine(&row.id).await?;
            return Ok(());
        };
        machine.state = MachineState::Destroyed;
        machine.updated_at = crate::format_ms(now);
        machine.worker = Some(row.worker.clone());
        machine.worker_status = None;
        machine.host_status = None;
        machine.events.clear();
        machine.nonce = None;
        let json = serde_json::to_string(&machine).map_err(ApiError::internal)?;
        self.store
            .bury_machine(&row.id, &row.app, &json, now)
            .await?;
        Ok(())
    }

    /// The size of a Machine indexed before sizes were kept: asked of its worker once,
    /// then kept in the index for every later start.
    async fn size_from_worker(
        &self,
        worker: &Arc<dyn WorkerService>,
        id: &str,
    ) -> Result<MachineSize, ApiError> {
        let machine = worker.get(id).await?;
        let size = MachineSize::of(&machine.config.guest);
        self.store.set_machine_size(id, Some(size)).await?;
        Ok(size)
    }
}

async fn create(
    control: &ControlPlane,
    app: &AppRow,
    request: CreateMachineRequest,
    id: String,
    mut pull: berth_image::PullScope,
    standby_targets_on: &[String],
    fork: Option<&crate::checkpoints::ForkSource>,
) -> Result<Machine, ApiError> {
    let from_checkpoint = fork.map(|fork| (fork.machine.clone(), fork.checkpoint.clone()));
    // An imported image in the shared registry: pinned to the digest its name has now.
    pull.source = control.pull_source(&request.config.image).await?;
    // A keyed create retried after the control plane died in the middle of it: the
    // Machine is already indexed (and pinned); ask its worker again, which answers a
    // repeated create of an id with the Machine it has, or makes it if it rolled back.
    if let Some(row) = control.store.machine(&app.name, &id).await? {
        let worker = control.worker(&row.worker)?;
        let created = worker
            .create(CreateOnWorker {
                from_checkpoint: from_checkpoint.clone(),
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
    let standbys = request.config.standbys.clone();
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| format!("machine-{id}"));
    let placement = PlacementRequest {
        region: request.region.clone(),
        // A Machine with volumes lives where they are.
        worker: fork_worker(
            fork,
            control
                .volumes_worker(&app.name, &request.config.mounts)
                .await?,
        )?,
        cpus: request.config.guest.cpus,
        memory_mb: u64::from(request.config.guest.memory_mb),
        disk_mb: machine_disk_mb(&request.config.guest),
        runtime: request.config.runtime.clone(),
    };
    let size = Resources {
        cpus: placement.cpus,
        memory_mb: placement.memory_mb,
        disk_mb: placement.disk_mb,
    };
    // The worker's room is taken first, in the store: no other create, here or on another
    // replica, can take it meanwhile.
    let (worker_name, hold) = control
        .place_reserved(
            &placement,
            Placement {
                machine_id: &id,
                size,
                starts: !request.skip_launch,
            },
            // A standby goes elsewhere than the Machines it stands by for, where it fits.
            standby_targets_on,
        )
        .await?;
    let row = MachineIndexRow {
        id: id.clone(),
        app: app.name.clone(),
        name: name.clone(),
        worker: worker_name.clone(),
        size: Some(MachineSize::of(&request.config.guest)),
    };
    let launch = (!request.skip_launch).then(|| share(&request.config));
    let admitted = async {
        let claim = control.admit_create(org, &row, launch, &quotas).await?;
        crate::usage::record_owner(control.store.pool(), &id, &app.name, org).await?;
        Ok::<_, ApiError>(claim)
    }
    .await;
    let claim = match admitted {
        Ok(claim) => claim,
        Err(error) => {
            hold.create_ended(false).await?;
            return Err(error);
        }
    };
    let worker = control.worker(&worker_name)?;
    let created = worker
        .create(CreateOnWorker {
            from_checkpoint,
            id: id.clone(),
            app: app.name.clone(),
            name,
            config: request.config,
            skip_launch: request.skip_launch,
            org: Some(org.clone()),
            pull,
        })
        .await;
    match &created {
        Ok(_) => claim.keep(),
        Err(_) => drop(claim),
    }
    let made = match &created {
        Ok(_) | Err(WorkerError::StartFailed { .. }) => true,
        Err(_) => !crate::reconcile::worker_lacks(&worker, &id).await,
    };
    hold.create_ended(made).await?;
    match created {
        Ok(machine) => {
            control.record_standbys(&app.name, &id, &standbys).await?;
            Ok(seen(control, machine, &worker_name).await)
        }
        // The Machine exists in `failed`; the client may inspect, update or destroy it.
        Err(error @ WorkerError::StartFailed { .. }) => Err(error.into()),
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

/// Start, stop and destroy, once their key is taken (a retried destroy must get its first
/// answer, not a 404): lookup, rate limit, lease.
pub(crate) async fn admit(
    control: &ControlPlane,
    pre: &Preconditions,
    app: &str,
    id: &str,
    action: Action,
) -> Result<(AppRow, MachineIndexRow), ApiError> {
    // A move of the Machine ends first; the lookup then finds its new worker.
    control.moves.settled(id).await?;
    // The lease is read beside the lookup; it is judged in the same order as before.
    let (machine, lease) = tokio::join!(
        control.machine(&pre.principal, app, id),
        leases::current(control, id)
    );
    let (app_row, row) = machine?;
    control.check_rate(&pre.principal, action, Some(id)).await?;
    leases::check_against(control, lease, pre.nonce.as_ref())?;
    Ok((app_row, row))
}

fn operation(action: Action, app: &str, id: &str) -> String {
    format!("{} {app}/{id}", action.as_str())
}

/// The worker a Machine must go to: its fork's source's, where the checkpoint is, or its
/// volumes'; both must agree.
fn fork_worker(
    fork: Option<&crate::checkpoints::ForkSource>,
    volumes: Option<String>,
) -> Result<Option<String>, ApiError> {
    match (fork, volumes) {
        (Some(fork), Some(volumes)) if fork.worker != volumes => {
            let mut error = ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_fork",
                format!(
                    "the checkpoint is on worker {} and the volumes on {volumes}: a fork lives where its checkpoint is",
                    fork.worker
                ),
            );
            error.body.field = Some("config.mounts".into());
            Err(error)
        }
        (Some(fork), _) => Ok(Some(fork.worker.clone())),
        (None, volumes) => Ok(volumes),
    }
}

/// Marks a Machine answered by its worker with the worker's name and status.
fn answered_by(mut machine: Machine, worker: &str) -> Machine {
    machine.worker = Some(worker.to_owned());
    machine.worker_status = Some(berth_api::MachineWorkerStatus::Ok);
    machine.host_status = Some(HostStatus::Ok);
    machine
}

/// After a change (create, update, start, stop): marks the answer, and remembers it as the
/// last known state for when that worker is down (written in the background). Reads only
/// mark, so GET and list cost no write.
pub(crate) async fn seen(control: &ControlPlane, machine: Machine, worker: &str) -> Machine {
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
    machine.host_status = Some(HostStatus::Unreachable);
    Ok(Some(machine))
}
