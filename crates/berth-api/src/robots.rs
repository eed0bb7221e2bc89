//! What programs driving Machines use: leases, events, wait, exec, metadata and logs.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ApiDuration, MachineState};

/// The header that carries a lease's nonce on mutating calls: Fly's name, which Berth's
/// own clients send.
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";
/// Berth's earlier name for [`LEASE_NONCE_HEADER`], still read (deprecated, kept for one
/// release). A call may send either; sending both with different nonces is refused.
pub const BERTH_LEASE_NONCE_HEADER: &str = "berth-lease-nonce";
/// The header that makes create, start, stop and destroy safe to retry.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// `true` refuses request fields Berth does not know (400 `invalid_config` naming the
/// field) instead of ignoring them and saying so.
pub const STRICT_HEADER: &str = "berth-strict";
/// On an answer: what of the request was ignored, as `ignored_field=<path>` items joined
/// by `, ` (the same as the body's `warnings`).
pub const WARNINGS_HEADER: &str = "berth-warnings";

/// Something of a request that Berth accepted without acting on it. Answers carry a list
/// of them as `warnings` (beside their own fields) and in the `berth-warnings` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldWarning {
    /// A stable code: `ignored_field` (a field Berth does not know, kept out of its
    /// validation as Fly's server does).
    pub code: String,
    /// The field's path, such as `config.guest.gpus` or `config.services[0].ports`.
    pub field: String,
    pub message: String,
}

impl FieldWarning {
    pub fn ignored(field: impl Into<String>) -> FieldWarning {
        let field = field.into();
        FieldWarning {
            code: "ignored_field".to_owned(),
            message: format!("{field}: not a field Berth knows; ignored"),
            field,
        }
    }
}
/// The `status` of a lease answer that succeeded, as Fly writes it.
pub const LEASE_STATUS_SUCCESS: &str = "success";

/// `POST /v1/apps/{app}/machines/{id}/lease` (Fly's `CreateLeaseRequest`). The TTL may
/// come as `?ttl=` instead, as fly-go sends it. Unknown fields are ignored and told, as
/// in every body Fly's clients send.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct LeaseRequest {
    /// Seconds the lease lasts unless refreshed (default 30, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A lease, with Fly's fields (`data` of a [`LeaseResponse`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    /// 32 lower-case hex digits; send it as `fly-machine-lease-nonce` while the lease is
    /// held.
    pub nonce: String,
    /// When the lease ends, in Unix seconds.
    pub expires_at: i64,
    /// The token that holds the lease: its name, or `admin`.
    pub owner: String,
    #[serde(default)]
    pub description: String,
    /// Changes whenever the lease is taken or refreshed.
    #[serde(default)]
    pub version: String,
}

/// The answer of `POST` and `GET .../lease`, in Fly's envelope. The top-level `nonce`,
/// `expires_at` (RFC 3339), `owner` and `description` are Berth's earlier answer,
/// deprecated and kept for one release: read `data` instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    /// `success`.
    pub status: String,
    pub data: Lease,
    /// Deprecated alias of `data.nonce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Deprecated: `data.expires_at` as RFC 3339 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Deprecated alias of `data.owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Deprecated alias of `data.description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What `data` of a released lease holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseReleased {
    pub ok: bool,
}

/// The answer of `DELETE .../lease`, in Fly's envelope; the top-level `ok` is Berth's
/// earlier answer, deprecated and kept for one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseLeaseResponse {
    /// `success`.
    pub status: String,
    pub data: LeaseReleased,
    /// Deprecated alias of `data.ok`.
    #[serde(default)]
    pub ok: bool,
}

/// What an event of a Machine records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Create,
    /// A milestone of the image pull that create or update made.
    Pull,
    Start,
    StartFailed,
    Stop,
    /// A run ended by itself (or with the host).
    Exit,
    Update,
    /// Recovery undid an update that did not finish.
    UpdateRolledBack,
    /// Recovery settled a Machine left in a transitional state.
    Recovered,
    DiskQuotaExceeded,
    /// Told to listeners only: the record and its events are gone.
    Destroy,
    /// Told to listeners only: a Machine's state in a snapshot.
    Snapshot,
    /// The Machine was cordoned: no traffic, no autostart.
    Cordon,
    /// The Machine was uncordoned.
    Uncordon,
    /// The Machine moved to another worker; the reason names the old and new address.
    Migrate,
    /// An admin made the Machine again from its image on another worker: its files were
    /// lost with the worker that held them.
    Recreate,
    /// The Machine was checkpointed with its memory and no longer runs.
    Suspend,
    /// A start went on from the Machine's memory image.
    Resume,
    /// A suspended Machine's memory image was missing or damaged: the start booted it
    /// fresh from its disk; the reason says what was wrong.
    MemoryLost,
    /// A checkpoint of the Machine's disk was taken; the reason names it.
    Checkpoint,
    /// The Machine's files were restored from a checkpoint; the reason names it and the
    /// automatic checkpoint that undoes it.
    Restore,
}

wire_names!(EventKind {
    Create => "create",
    Pull => "pull",
    Start => "start",
    StartFailed => "start_failed",
    Stop => "stop",
    Exit => "exit",
    Update => "update",
    UpdateRolledBack => "update_rolled_back",
    Recovered => "recovered",
    DiskQuotaExceeded => "disk_quota_exceeded",
    Destroy => "destroy",
    Snapshot => "snapshot",
    Cordon => "cordon",
    Uncordon => "uncordon",
    Migrate => "migrate",
    Recreate => "recreate",
    Suspend => "suspend",
    Resume => "resume",
    MemoryLost => "memory_lost",
    Checkpoint => "checkpoint",
    Restore => "restore",
});

impl EventKind {
    /// The event's `type` as Fly names it: `launch` for a create; the other kinds Fly
    /// has keep their names, and those only Berth has (`pull`, `start_failed`,
    /// `update_rolled_back`, `recovered`, `disk_quota_exceeded`) keep Berth's.
    pub fn fly_type(self) -> &'static str {
        match self {
            EventKind::Create => "launch",
            other => other.as_str(),
        }
    }

    /// Reads a `type` in Fly's names or Berth's.
    pub fn parse_type(text: &str) -> Option<EventKind> {
        match text {
            "launch" => Some(EventKind::Create),
            other => EventKind::parse(other),
        }
    }
}

/// `type` of an event answer: Fly's name of its [`EventKind`].
mod fly_type {
    use super::EventKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kind: &EventKind, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(kind.fly_type())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<EventKind, D::Error> {
        let text = String::deserialize(deserializer)?;
        EventKind::parse_type(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown event type {text:?}")))
    }
}

/// Who asked for a state change. Recorded with every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    User,
    RestartPolicy,
    /// The proxy woke the Machine for a request.
    Autostart,
    /// The proxy stopped an idle Machine.
    Autostop,
    System,
    /// The control plane started a standby: a Machine it stands by for is on a worker
    /// that stayed unreachable.
    Standby,
}

wire_names!(EventSource {
    User => "user",
    RestartPolicy => "restart_policy",
    Autostart => "autostart",
    Autostop => "autostop",
    System => "system",
    Standby => "standby",
});

impl EventSource {
    /// Fly's name for who caused an event, as its clients read `source`.
    pub fn fly_source(self) -> FlyEventSource {
        match self {
            EventSource::User => FlyEventSource::User,
            EventSource::Autostart | EventSource::Autostop => FlyEventSource::Proxy,
            EventSource::RestartPolicy | EventSource::System | EventSource::Standby => {
                FlyEventSource::Flyd
            }
        }
    }
}

/// Fly's `source` of an event: a client's request (`user`), the proxy waking or stopping
/// the Machine (`proxy`), or the platform by itself (`flyd`: restarts, exits, recovery,
/// standbys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlyEventSource {
    User,
    Flyd,
    Proxy,
}

wire_names!(FlyEventSource {
    User => "user",
    Flyd => "flyd",
    Proxy => "proxy",
});

impl From<crate::ChangeSource> for EventSource {
    fn from(source: crate::ChangeSource) -> Self {
        match source {
            crate::ChangeSource::User => EventSource::User,
            crate::ChangeSource::Autostart => EventSource::Autostart,
            crate::ChangeSource::Autostop => EventSource::Autostop,
        }
    }
}

/// One recorded state change of a Machine, as a worker tells it to the control plane
/// (clients get [`MachineEventAnswer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineEvent {
    /// Increases with every event; page with `?since=<id>`.
    pub id: i64,
    pub kind: EventKind,
    pub source: EventSource,
    /// The state the Machine was left in.
    pub state: MachineState,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// For exits and stops: `exited`, `killed` or `oom_killed` (and a few recovery
    /// reasons such as `max_retries_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One event of a Machine as `GET .../events` answers it: Fly's `MachineEvent` fields,
/// Berth's `exit_code` and `reason`, and Berth's earlier names `kind` and `state`
/// (deprecated aliases of `type` and `status`, kept for one release). `type` is Fly's
/// name of the event (`launch` for a create, see [`EventKind::fly_type`]); `kind` keeps
/// Berth's (`create`). `source` is Fly's ([`FlyEventSource`]); `berth_source` keeps
/// Berth's finer name (`restart_policy`, `autostart`, `standby`...) for one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineEventAnswer {
    /// Fly's string id: the decimal of the increasing number `?since=` pages with.
    pub id: String,
    #[serde(rename = "type", with = "fly_type")]
    #[schema(value_type = String)]
    pub kind: EventKind,
    /// The state the Machine was left in.
    pub status: MachineState,
    pub source: FlyEventSource,
    /// Berth's name of the source, finer than Fly's (deprecated, kept for one release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub berth_source: Option<EventSource>,
    /// Unix milliseconds.
    pub timestamp: i64,
    /// For exits and stops that ended a run: Fly's `request.exit_event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<EventRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// For exits and stops: `exited`, `killed` or `oom_killed` (and a few recovery
    /// reasons such as `max_retries_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Deprecated alias of `type`.
    #[serde(rename = "kind", default, skip_serializing_if = "Option::is_none")]
    pub deprecated_kind: Option<EventKind>,
    /// Deprecated alias of `status`.
    #[serde(rename = "state", default, skip_serializing_if = "Option::is_none")]
    pub deprecated_state: Option<MachineState>,
}

/// Fly's `request` of an event: what ended a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventRequest {
    pub exit_event: ExitEvent,
}

/// Fly's `exit_event`, with the fields Berth knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitEvent {
    /// Absent when the run ended without one (killed for memory, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    /// The user (or autostop) asked for the stop.
    pub requested_stop: bool,
}

impl MachineEventAnswer {
    /// The answer for a worker's event; `at_ms` is its time in Unix milliseconds.
    pub fn new(event: MachineEvent, at_ms: i64) -> MachineEventAnswer {
        let ended = event.kind == EventKind::Exit || event.exit_code.is_some();
        let request = ended.then(|| EventRequest {
            exit_event: ExitEvent {
                exit_code: event.exit_code,
                oom_killed: event.reason.as_deref() == Some("oom_killed"),
                requested_stop: event.kind == EventKind::Stop,
            },
        });
        MachineEventAnswer {
            id: event.id.to_string(),
            kind: event.kind,
            status: event.state,
            source: event.source.fly_source(),
            berth_source: Some(event.source),
            timestamp: at_ms,
            request,
            exit_code: event.exit_code,
            reason: event.reason,
            deprecated_kind: Some(event.kind),
            deprecated_state: Some(event.state),
        }
    }
}

/// The answer to `GET .../wait` once the state is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WaitResponse {
    pub ok: bool,
    pub state: MachineState,
    /// Fly's name of the Machine's version (its `instance_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Berth's earlier name of `version`, kept for one release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

/// `POST /v1/apps/{app}/machines/{id}/exec`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecRequest {
    /// The program and its arguments. Also read as Fly sends it: as `command`, or as one
    /// string (split at whitespace, without quoting; send a list for arguments with
    /// spaces). Send one of `cmd` and `command`.
    #[serde(alias = "command", deserialize_with = "args_or_line")]
    #[schema(value_type = Vec<String>)]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds or a duration string; default 30 s, at most 10 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ApiDuration>,
}

/// A list of arguments, or Fly's one-string command line split at whitespace.
fn args_or_line<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        Args(Vec<String>),
        Line(String),
    }
    match Wire::deserialize(deserializer) {
        Ok(Wire::Args(args)) => Ok(args),
        Ok(Wire::Line(line)) => Ok(line.split_whitespace().map(str::to_owned).collect()),
        Err(_) => Err(serde::de::Error::custom(
            "expected a list of strings or a command line string",
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    /// `null` when the process was killed for running past its timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Output past the server's cap was dropped.
    pub truncated: bool,
    pub timed_out: bool,
}

/// `POST /v1/apps/{app}/machines/{id}/metadata/{key}` (Fly's `{value}`; unknown fields
/// are ignored and told).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SetMetadataRequest {
    pub value: String,
}

/// One line of `GET .../logs?format=ndjson`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// Position of the line's first byte in the Machine's whole output.
    pub position: u64,
    /// Position after this line: pass it as `since` to continue from here.
    pub next: u64,
    pub line: String,
}
