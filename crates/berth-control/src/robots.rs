//! What programs need besides the lifecycle: wait, events, exec, metadata and logs.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_api::{
    ErrorBody, ExecRequest, ExecResponse, LogLine, MachineEventAnswer, MachineState,
    SetMetadataRequest, WaitResponse,
};
use berth_worker::{ExecOnWorker, LogChunk, WorkerError};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::leases::{self, LeaseNonce};
use crate::limits::Action;
use crate::notices::Snapshot;
use crate::{ControlPlane, Shared};

const MAX_WAIT_S: u64 = 60;
const DEFAULT_EVENTS: u32 = 100;
const MAX_EVENTS: u32 = 1000;
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_LOG_BYTES: u64 = 1024 * 1024;
const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// How many recorded events a wait with `from_event_id` looks through.
const MAX_WAIT_EVENTS: u32 = 1000;
/// A partial line longer than this goes out in ndjson without waiting for its newline.
const MAX_PENDING_LINE: usize = 16 * 1024;

/// What `?state=` may name: Fly's wait states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WaitState {
    Started,
    Stopped,
    /// Checkpointed with its memory (`suspended`).
    Suspended,
    Destroyed,
    Failed,
    /// No operation in flight: any state but `starting`, `stopping`, `replacing`,
    /// `destroying` and `suspending`.
    Settled,
}

impl WaitState {
    const ALL: [WaitState; 6] = [
        WaitState::Started,
        WaitState::Stopped,
        WaitState::Suspended,
        WaitState::Destroyed,
        WaitState::Failed,
        WaitState::Settled,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WaitState::Started => "started",
            WaitState::Stopped => "stopped",
            WaitState::Suspended => "suspended",
            WaitState::Destroyed => "destroyed",
            WaitState::Failed => "failed",
            WaitState::Settled => "settled",
        }
    }

    fn parse(text: &str) -> Option<WaitState> {
        WaitState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    fn reached_by(self, state: MachineState) -> bool {
        match self {
            WaitState::Started => state == MachineState::Started,
            WaitState::Stopped => state == MachineState::Stopped,
            WaitState::Suspended => state == MachineState::Suspended,
            WaitState::Destroyed => state == MachineState::Destroyed,
            WaitState::Failed => state == MachineState::Failed,
            WaitState::Settled => !matches!(
                state,
                MachineState::Starting
                    | MachineState::Stopping
                    | MachineState::Replacing
                    | MachineState::Destroying
                    | MachineState::Suspending
            ),
        }
    }
}

/// `GET .../wait`'s query, as Fly's clients send it. Read by hand from the pairs, since
/// `state` may repeat.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    /// Any of `started` (the default), `stopped`, `suspended`, `destroyed`, `failed` and
    /// `settled` (no operation in flight); repeat it to wait for whichever comes first.
    #[param(style = Form, explode, inline)]
    state: Vec<WaitState>,
    /// Seconds, at most 60 (the default).
    timeout: Option<u64>,
    /// Only this version of the Machine (its `instance_id`) counts.
    version: Option<String>,
    /// Deprecated: Berth's earlier name of `version`, still read for one release.
    instance_id: Option<String>,
    /// An event id (from `GET …/events` or the Machine's `events`): only a state reached
    /// by a later event counts, so a wait does not answer for a change it already saw.
    from_event_id: Option<String>,
}

impl WaitQuery {
    fn parse(pairs: Vec<(String, String)>) -> Result<WaitQuery, ApiError> {
        let mut query = WaitQuery::default();
        for (key, value) in pairs {
            match key.as_str() {
                "state" => query.state.push(WaitState::parse(&value).ok_or_else(|| {
                    ApiError::invalid_config(
                        "state",
                        format!(
                            "unknown state {value:?}: one of started, stopped, suspended, \
                             destroyed, failed, settled"
                        ),
                    )
                })?),
                "timeout" => {
                    let seconds = value.parse().map_err(|_| {
                        ApiError::invalid_config("timeout", "a whole number of seconds")
                    })?;
                    once(&mut query.timeout, "timeout", seconds)?;
                }
                "version" => once(&mut query.version, "version", value)?,
                "instance_id" => once(&mut query.instance_id, "instance_id", value)?,
                "from_event_id" => once(&mut query.from_event_id, "from_event_id", value)?,
                other => {
                    return Err(ApiError::invalid_config(
                        other,
                        format!("unknown query parameter {other:?}"),
                    ))
                }
            }
        }
        Ok(query)
    }

    /// The version asked for, by either name.
    fn version(&self) -> Result<Option<&String>, ApiError> {
        match (&self.version, &self.instance_id) {
            (Some(version), Some(instance)) if version != instance => Err(
                ApiError::invalid_config("version", "version and instance_id name two versions"),
            ),
            (version, instance) => Ok(version.as_ref().or(instance.as_ref())),
        }
    }

    /// `from_event_id` as the number Berth's event ids are.
    fn after_event(&self) -> Result<Option<i64>, ApiError> {
        self.from_event_id
            .as_deref()
            .map(|text| {
                text.parse::<i64>().map_err(|_| {
                    ApiError::invalid_config(
                        "from_event_id",
                        format!("{text:?} is not an event id of this Machine"),
                    )
                })
            })
            .transpose()
    }
}

fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), ApiError> {
    if slot.replace(value).is_some() {
        return Err(ApiError::invalid_config(
            name,
            format!("{name} is given twice"),
        ));
    }
    Ok(())
}

/// Keeps a waiter registered while it waits, and unregisters it however the wait ends.
struct Waiting {
    control: Arc<ControlPlane>,
    id: String,
    receiver: Option<watch::Receiver<Option<Snapshot>>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.receiver = None;
        self.control.waiters.release(&self.id);
    }
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/wait", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), WaitQuery),
    responses((status = 200, body = WaitResponse),
              (status = 408, description = "the state was not reached in time", body = ErrorBody),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn wait_machine(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<WaitResponse>, ApiError> {
    let query = WaitQuery::parse(pairs)?;
    control.wait_machine(&principal, &app, &id, query).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only events with an id above this one.
    since: Option<i64>,
    /// At most this many (default 100, at most 1000).
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/events", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), EventsQuery),
    responses((status = 200, body = Vec<MachineEventAnswer>), (status = "default", body = ErrorBody)))]
pub(crate) async fn machine_events(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<Vec<MachineEventAnswer>>, ApiError> {
    control.machine_events(&principal, &app, &id, query).await
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/exec", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`"),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    request_body = ExecRequest,
    responses((status = 200, body = ExecResponse, headers(("berth-warnings" = String, description = "the body's ignored fields as `ignored_field=<path>` items; the JSON answer lists them in `warnings` (FieldWarning)"))), (status = "default", body = ErrorBody)))]
pub(crate) async fn exec_machine(
    State(control): State<Shared>,
    principal: Principal,
    nonce: Option<LeaseNonce>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> Result<Json<ExecResponse>, ApiError> {
    control
        .exec_machine(&principal, nonce.as_ref(), &app, &id, request)
        .await
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/metadata", tag = "metadata",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = BTreeMap<String, String>), (status = "default", body = ErrorBody)))]
pub(crate) async fn get_metadata(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<BTreeMap<String, String>>, ApiError> {
    control.get_metadata(&principal, &app, &id).await
}

fn check_key(key: &str) -> Result<(), ApiError> {
    let valid = !key.is_empty()
        && key.len() <= berth_core::validate::MAX_METADATA_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if valid && key != "." && key != ".." {
        Ok(())
    } else {
        Err(ApiError::invalid_config(
            "key",
            "metadata keys are 1 to 64 letters, digits, '_', '-' or '.'",
        ))
    }
}

#[utoipa::path(post, path = "/apps/{app}/machines/{id}/metadata/{key}", tag = "metadata",
    params(("app" = String, Path), ("id" = String, Path), ("key" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    request_body = SetMetadataRequest,
    responses((status = 204, description = "set"), (status = "default", body = ErrorBody)))]
pub(crate) async fn set_metadata(
    State(control): State<Shared>,
    principal: Principal,
    nonce: Option<LeaseNonce>,
    ApiPath((app, id, key)): ApiPath<(String, String, String)>,
    ApiJson(request): ApiJson<SetMetadataRequest>,
) -> Result<StatusCode, ApiError> {
    control
        .set_metadata(
            &principal,
            nonce.as_ref(),
            &app,
            &id,
            &key,
            Some(request.value),
        )
        .await
}

#[utoipa::path(delete, path = "/apps/{app}/machines/{id}/metadata/{key}", tag = "metadata",
    params(("app" = String, Path), ("id" = String, Path), ("key" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "needed while a lease is held"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (kept for one release)")),
    responses((status = 204, description = "gone"), (status = "default", body = ErrorBody)))]
pub(crate) async fn delete_metadata(
    State(control): State<Shared>,
    principal: Principal,
    nonce: Option<LeaseNonce>,
    ApiPath((app, id, key)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    control
        .set_metadata(&principal, nonce.as_ref(), &app, &id, &key, None)
        .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    Text,
    Ndjson,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogsQuery {
    /// Without `since`: how much of the tail to send first (default 1 MiB).
    max_bytes: Option<u64>,
    /// Keep the response open and send new output as it comes, across stops and starts.
    follow: Option<bool>,
    /// A position in the Machine's output (an ndjson line's `next`) to continue from.
    since: Option<u64>,
    /// `text` (default) or `ndjson`.
    format: Option<LogFormat>,
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/logs", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), LogsQuery),
    responses((status = 200, description = "text/plain, or application/x-ndjson of LogLine", body = String),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn machine_logs(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let chunks = control.machine_logs(&principal, &app, &id, &query).await?;
    Ok(logs_response(
        query.format.unwrap_or(LogFormat::Text),
        chunks,
    ))
}

/// The Machine's output in the format asked for, streamed as it comes.
fn logs_response(format: LogFormat, chunks: mpsc::Receiver<LogChunk>) -> Response {
    let (content_type, body) = match format {
        LogFormat::Text => ("text/plain; charset=utf-8", raw_body(chunks)),
        LogFormat::Ndjson => ("application/x-ndjson", ndjson_body(chunks)),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

impl ControlPlane {
    /// Waits, up to the query's timeout, for a Machine to reach a state.
    pub(crate) async fn wait_machine(
        self: &Arc<Self>,
        principal: &Principal,
        app: &str,
        id: &str,
        query: WaitQuery,
    ) -> Result<Json<WaitResponse>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let timeout = query.timeout.unwrap_or(MAX_WAIT_S);
        if timeout > MAX_WAIT_S {
            return Err(ApiError::invalid_config(
                "timeout",
                format!("at most {MAX_WAIT_S} seconds"),
            ));
        }
        let targets = if query.state.is_empty() {
            vec![WaitState::Started]
        } else {
            query.state.clone()
        };
        let wanted_version = query.version()?;
        let after_event = query.after_event()?;
        let (_, row) = self.machine(principal, app, id).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        // Subscribe before reading the state, so no change can slip between the two.
        let mut waiting = Waiting {
            control: self.clone(),
            id: id.to_owned(),
            receiver: Some(self.waiters.subscribe(id)),
        };
        let worker = self.worker(&row.worker)?;
        let mut seen = match worker.get(id).await {
            Ok(machine) => Snapshot {
                state: machine.state,
                instance_id: machine.instance_id,
                event_id: None,
            },
            Err(WorkerError::NotFound(_)) => Snapshot {
                state: MachineState::Destroyed,
                instance_id: String::new(),
                event_id: None,
            },
            Err(error) => return Err(error.into()),
        };
        // With `from_event_id`, a state counts only when an event after that one reached
        // it: first among the events already recorded, then among those to come.
        if let Some(after) = after_event.filter(|_| seen.state != MachineState::Destroyed) {
            let recorded = match worker.machine_events(id, after, MAX_WAIT_EVENTS).await {
                Ok(events) => events,
                Err(WorkerError::NotFound(_)) => Vec::new(),
                Err(error) => return Err(error.into()),
            };
            if let Some(event) = recorded
                .iter()
                .find(|event| targets.iter().any(|target| target.reached_by(event.state)))
            {
                seen = Snapshot {
                    state: event.state,
                    instance_id: seen.instance_id,
                    event_id: Some(event.id),
                };
            }
        }
        loop {
            let version_matches = wanted_version.is_none_or(|wanted| {
                *wanted == seen.instance_id || seen.state == MachineState::Destroyed
            });
            let after_matches = after_event.is_none_or(|after| {
                seen.event_id.is_some_and(|event| event > after)
                    || seen.state == MachineState::Destroyed
            });
            let reached = targets.iter().any(|target| target.reached_by(seen.state));
            if reached && version_matches && after_matches {
                let version = (!seen.instance_id.is_empty()).then_some(seen.instance_id);
                return Ok(Json(WaitResponse {
                    ok: true,
                    state: seen.state,
                    instance_id: version.clone(),
                    version,
                }));
            }
            if seen.state == MachineState::Destroyed {
                return Err(ApiError::not_found(format!("machine {id}")));
            }
            let Some(receiver) = waiting.receiver.as_mut() else {
                return Err(ApiError::internal("wait lost its channel"));
            };
            match tokio::time::timeout_at(deadline, receiver.changed()).await {
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!(
                            "machine {id} did not reach {} within {timeout} s",
                            targets
                                .iter()
                                .map(|target| target.as_str())
                                .collect::<Vec<_>>()
                                .join(" or ")
                        ),
                    ))
                }
                Ok(Err(_)) => return Err(ApiError::internal("the wait channel closed")),
                Ok(Ok(())) => {
                    if let Some(snapshot) = receiver.borrow_and_update().clone() {
                        seen = snapshot;
                    }
                }
            }
        }
    }

    /// A Machine's events, from its worker.
    pub(crate) async fn machine_events(
        &self,
        principal: &Principal,
        app: &str,
        id: &str,
        query: EventsQuery,
    ) -> Result<Json<Vec<MachineEventAnswer>>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let limit = query.limit.unwrap_or(DEFAULT_EVENTS);
        if !(1..=MAX_EVENTS).contains(&limit) {
            return Err(ApiError::invalid_config(
                "limit",
                format!("must be 1 to {MAX_EVENTS}"),
            ));
        }
        let (_, row) = self.machine(principal, app, id).await?;
        let events = self
            .worker(&row.worker)?
            .machine_events(id, query.since.unwrap_or(0).max(0), limit)
            .await?;
        events
            .into_iter()
            .map(|event| {
                let at_ms = parse_ms(&event.timestamp).ok_or_else(|| {
                    ApiError::internal(format!("event {} has no readable time", event.id))
                })?;
                Ok(MachineEventAnswer::new(event, at_ms))
            })
            .collect::<Result<Vec<_>, ApiError>>()
            .map(Json)
    }

    /// Runs a command in a started Machine, on its worker, with output capped.
    pub(crate) async fn exec_machine(
        &self,
        principal: &Principal,
        nonce: Option<&LeaseNonce>,
        app: &str,
        id: &str,
        request: ExecRequest,
    ) -> Result<Json<ExecResponse>, ApiError> {
        let (_, row) = self.machine(principal, app, id).await?;
        self.check_rate(principal, Action::Exec, Some(id)).await?;
        leases::check(self, id, nonce).await?;
        if request.cmd.is_empty() || request.cmd[0].is_empty() {
            return Err(ApiError::invalid_config("cmd", "needs a program to run"));
        }
        if request.cmd.len() > berth_core::validate::MAX_ARGS {
            return Err(ApiError::invalid_config("cmd", "too many arguments"));
        }
        for (index, arg) in request.cmd.iter().enumerate() {
            if arg.contains('\0') || arg.len() > berth_core::validate::MAX_ARG_LEN {
                return Err(ApiError::invalid_config(
                    format!("cmd[{index}]"),
                    "arguments are at most 16 KiB, without NUL",
                ));
            }
        }
        let timeout = request
            .timeout
            .map(|timeout| timeout.as_duration())
            .unwrap_or(DEFAULT_EXEC_TIMEOUT);
        if timeout.is_zero() || timeout > MAX_EXEC_TIMEOUT {
            return Err(ApiError::invalid_config(
                "timeout",
                "must be above 0 and at most 600 s",
            ));
        }
        let answer = self
            .worker(&row.worker)?
            .exec(
                id,
                ExecOnWorker {
                    cmd: request.cmd,
                    stdin: request.stdin,
                    timeout,
                    max_output_bytes: self.exec_max_output_bytes,
                },
            )
            .await?;
        Ok(Json(answer))
    }

    /// A Machine's metadata, from its worker.
    pub(crate) async fn get_metadata(
        &self,
        principal: &Principal,
        app: &str,
        id: &str,
    ) -> Result<Json<BTreeMap<String, String>>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let (_, row) = self.machine(principal, app, id).await?;
        Ok(Json(
            self.worker(&row.worker)?.get(id).await?.config.metadata,
        ))
    }

    /// Sets one metadata key of a Machine (`Some`), or removes it (`None`).
    pub(crate) async fn set_metadata(
        &self,
        principal: &Principal,
        nonce: Option<&LeaseNonce>,
        app: &str,
        id: &str,
        key: &str,
        value: Option<String>,
    ) -> Result<StatusCode, ApiError> {
        let (_, row) = self.machine(principal, app, id).await?;
        self.check_rate(principal, Action::Update, Some(id)).await?;
        leases::check(self, id, nonce).await?;
        check_key(key)?;
        self.worker(&row.worker)?
            .set_metadata(id, key, value)
            .await?;
        Ok(StatusCode::NO_CONTENT)
    }

    /// A Machine's output from its worker, as it comes when following.
    pub(crate) async fn machine_logs(
        &self,
        principal: &Principal,
        app: &str,
        id: &str,
        query: &LogsQuery,
    ) -> Result<mpsc::Receiver<LogChunk>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let (_, row) = self.machine(principal, app, id).await?;
        let max_bytes = query
            .max_bytes
            .unwrap_or(DEFAULT_LOG_BYTES)
            .min(MAX_LOG_BYTES);
        let follow = query.follow.unwrap_or(false);
        Ok(self
            .worker(&row.worker)?
            .read_logs(id, query.since, follow, max_bytes)
            .await?)
    }
}

fn raw_body(chunks: mpsc::Receiver<LogChunk>) -> Body {
    let stream = futures::stream::unfold(chunks, |mut chunks| async move {
        let chunk = chunks.recv().await?;
        Some((Ok::<_, Infallible>(chunk.data), chunks))
    });
    Body::from_stream(stream)
}

/// Splits chunks into lines, one JSON object each, with their positions.
fn ndjson_body(mut chunks: mpsc::Receiver<LogChunk>) -> Body {
    let (lines, receiver) = mpsc::channel::<Vec<u8>>(8);
    tokio::spawn(async move {
        let mut pending: Vec<u8> = Vec::new();
        let mut pending_start = 0u64;
        let encode = |start: u64, bytes: &[u8]| {
            let line = LogLine {
                position: start,
                next: start + bytes.len() as u64,
                line: String::from_utf8_lossy(bytes.strip_suffix(b"\n").unwrap_or(bytes))
                    .into_owned(),
            };
            let mut json = serde_json::to_vec(&line).unwrap_or_default();
            json.push(b'\n');
            json
        };
        while let Some(chunk) = chunks.recv().await {
            if pending.is_empty() {
                pending_start = chunk.start;
            }
            pending.extend_from_slice(&chunk.data);
            let mut out = Vec::new();
            let mut consumed = 0;
            while let Some(end) = pending[consumed..].iter().position(|b| *b == b'\n') {
                let line_end = consumed + end + 1;
                out.extend(encode(
                    pending_start + consumed as u64,
                    &pending[consumed..line_end],
                ));
                consumed = line_end;
            }
            if pending.len() - consumed > MAX_PENDING_LINE {
                out.extend(encode(
                    pending_start + consumed as u64,
                    &pending[consumed..],
                ));
                consumed = pending.len();
            }
            pending.drain(..consumed);
            pending_start += consumed as u64;
            if !out.is_empty() && lines.send(out).await.is_err() {
                return;
            }
        }
        if !pending.is_empty() {
            let _ = lines.send(encode(pending_start, &pending)).await;
        }
    });
    raw_lines(receiver)
}

fn raw_lines(receiver: mpsc::Receiver<Vec<u8>>) -> Body {
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let bytes = receiver.recv().await?;
        Some((Ok::<_, Infallible>(bytes), receiver))
    });
    Body::from_stream(stream)
}

/// Unix milliseconds of an RFC 3339 time, as workers write event times.
fn parse_ms(text: &str) -> Option<i64> {
    let moment =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(moment.unix_timestamp_nanos() / 1_000_000).ok()
}
