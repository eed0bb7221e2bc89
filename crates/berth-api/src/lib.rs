//! Wire types of the Berth public API.
//!
//! Field names follow the Fly Machines API (`/v1/apps/{app}/machines/...`) so that
//! clients written for that shape need few changes. This crate does no I/O: it is
//! shared by the server, the CLI and the tests.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Names a unit enum's variants as they appear on the wire and in databases: `ALL`,
/// `as_str`, `parse` and a `Display` that pads (for tables). The names must be serde's
/// (`snake_case`); each enum's tests check that they are.
macro_rules! wire_names {
    ($type:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $type {
            pub const ALL: &'static [$type] = &[$($type::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($type::$variant => $name),+
                }
            }

            pub fn parse(text: &str) -> Option<$type> {
                Self::ALL.iter().copied().find(|value| value.as_str() == text)
            }
        }

        impl std::fmt::Display for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

mod checkpoints;
mod checks;
mod doctor;
mod duration;
mod machines;
mod robots;
mod services;
mod tenancy;
mod volumes;

pub use checkpoints::*;
pub use checks::*;
pub use doctor::*;
pub use duration::ApiDuration;
pub use machines::*;
pub use robots::*;
pub use services::*;
pub use tenancy::*;
pub use volumes::*;

/// The lifecycle states of a Machine, as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    Created,
    Starting,
    Started,
    Stopping,
    Stopped,
    Replacing,
    Destroying,
    Destroyed,
    Failed,
    /// Its memory is being checkpointed to disk (Fly's name).
    Suspending,
    /// Checkpointed to disk with its memory and processes; nothing of it runs, and a
    /// start resumes it (Fly's name).
    Suspended,
}

impl MachineState {
    pub const ALL: [MachineState; 11] = [
        MachineState::Created,
        MachineState::Starting,
        MachineState::Started,
        MachineState::Stopping,
        MachineState::Stopped,
        MachineState::Replacing,
        MachineState::Destroying,
        MachineState::Destroyed,
        MachineState::Failed,
        MachineState::Suspending,
        MachineState::Suspended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Starting => "starting",
            MachineState::Started => "started",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Replacing => "replacing",
            MachineState::Destroying => "destroying",
            MachineState::Destroyed => "destroyed",
            MachineState::Failed => "failed",
            MachineState::Suspending => "suspending",
            MachineState::Suspended => "suspended",
        }
    }

    pub fn parse(text: &str) -> Option<MachineState> {
        MachineState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad, not write_str, so table widths apply.
        f.pad(self.as_str())
    }
}

/// `POST /v1/apps`, Fly's `CreateAppRequest`. Fields Berth does not know (Fly's
/// `network` and `enable_subdomains`) are ignored and listed in `warnings`, or refused
/// under `berth-strict: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateAppRequest {
    pub app_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_slug: Option<String>,
}

/// The org an app belongs to, as Fly's app JSON nests it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppOrganization {
    pub name: String,
    pub slug: String,
}

/// An app, with Fly's fields (`organization`, `volume_count`, `network`) and Berth's own
/// (`created_at`). `org_slug` is Berth's earlier name for `organization.slug`, deprecated
/// and kept for one release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct App {
    pub id: String,
    pub name: String,
    pub organization: AppOrganization,
    pub status: String,
    pub machine_count: u64,
    /// Always 0 until Berth has volumes.
    #[serde(default)]
    pub volume_count: u64,
    /// The app's private network: `default`.
    #[serde(default)]
    pub network: String,
    pub created_at: String,
    /// Deprecated alias of `organization.slug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_slug: Option<String>,
}

/// `GET /v1/apps`, in Fly's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ListAppsResponse {
    pub total_apps: u64,
    pub apps: Vec<App>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    No,
    /// Restart after a non-zero exit, up to `max_retries` times (10 unless given). Fly's
    /// default, and Berth's: create and update write it into a config that names no
    /// policy.
    #[default]
    OnFailure,
    /// Restart after any exit that the user did not ask for.
    Always,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct RestartConfig {
    #[serde(default)]
    pub policy: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct StopConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ApiDuration>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct InitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Fly's: the whole command line, in place of the image's entrypoint and cmd and of
    /// `entrypoint` and `cmd` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// Run the command on a pseudo-terminal of the Machine's own devpts (its stdin,
    /// stdout and stderr, and its controlling terminal); what it writes to it goes to the
    /// Machine's log as without one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
}

/// One of `config.processes` (Fly's `MachineProcess`): a command berth-init starts beside
/// the others, in place of the Machine's own. Each field falls back on the Machine's:
/// `exec` replaces the whole command line; otherwise `entrypoint` and `cmd` follow
/// Docker's rules over the Machine's `init` and the image. Fly's `secrets`,
/// `ignore_app_secrets` and `env_from` are not read (listed in `warnings`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct MachineProcess {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Set over the Machine's `env` for this process only (`null` is none, as fly-go
    /// sends it).
    #[serde(
        default,
        deserialize_with = "null_as_empty_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// `uid[:gid]` or a name from the image's /etc/passwd; absent or empty: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn null_as_empty_map<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<BTreeMap<String, String>>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestConfig {
    #[serde(default = "GuestConfig::default_cpus")]
    pub cpus: u32,
    #[serde(default = "GuestConfig::default_memory_mb")]
    pub memory_mb: u32,
    /// Berth's own field: the Machine's disk (its writable layer) in MiB, enforced by
    /// the worker's filesystem where it supports quotas. Absent: the platform default
    /// (1024). Fly's nearest is `rootfs.size_gb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u32>,
    /// Fly's `shared` or `performance`, kept as given. Berth has one kind: the Machine's
    /// `cpus` are a cgroup CPU limit on the worker's cores, which is Fly's `shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_kind: Option<String>,
}

impl GuestConfig {
    fn default_cpus() -> u32 {
        1
    }
    fn default_memory_mb() -> u32 {
        256
    }
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            cpus: Self::default_cpus(),
            memory_mb: Self::default_memory_mb(),
            disk_mb: None,
            cpu_kind: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct MachineConfig {
    pub image: String,
    #[serde(default)]
    pub init: InitConfig,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub guest: GuestConfig,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default)]
    pub stop_config: StopConfig,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Fly's object; Berth's earlier strings `"persistent"` and `"ephemeral"` are still
    /// read (deprecated, for one release).
    #[serde(default)]
    pub rootfs: RootfsConfig,
    /// Ports the proxy routes the app's traffic to, with autostart and autostop settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<MachineService>,
    /// Berth's own sandbox settings.
    #[serde(default, skip_serializing_if = "SandboxConfig::is_default")]
    pub sandbox: SandboxConfig,
    /// Fly's named health checks, run by the worker while the Machine runs; their results
    /// are the Machine's `checks`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, MachineCheck>,
    /// Destroy the Machine once it has exited by itself and its restart policy does not
    /// start it again (Fly's `auto_destroy`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_destroy: bool,
    /// Commands berth-init runs together in place of the Machine's command (Fly's
    /// `processes`): stop's signal goes to each, and the first to exit stops the Machine
    /// with its exit code (the others get SIGTERM and 5 s), which the restart policy then
    /// reads as it reads the command's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<MachineProcess>,
    /// Files written into the Machine's disk at create and at every update.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<MachineFile>,
    /// The Machine's resolver: written as its `/etc/resolv.conf` at create and update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// Start the Machine once every period, counted from its creation (Fly's `schedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Volumes to attach (at most one Machine holds a volume at a time). Fixed at create.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MachineMount>,
    /// The driver that runs the Machine: `"native"`, `"runc"` or `"gvisor"`. Placement
    /// picks only workers that offer it. Absent at create: the worker's default driver
    /// (`native` unless it was started with another), which the Machine then keeps; absent
    /// at update: the Machine keeps its driver. The Machine's JSON always names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Fly's `standbys`: ids of Machines of the same app this one stands by for. It is
    /// placed on another worker than theirs where one fits, and the control plane starts
    /// it when the worker of one of them that was started stays unreachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standbys: Vec<String>,
}

/// How often a scheduled Machine is started: one period after its creation, then once a
/// period. A Machine still running when its time comes is left to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Hourly,
    Daily,
    Weekly,
    /// Calendar months: the same day of the month (the last one, in a shorter month).
    Monthly,
}

/// A file of `config.files` (Fly's `File`). Fly's `secret_name` is not read: Berth keeps
/// no secrets (it is listed in `warnings`, and such a file is not written).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct MachineFile {
    /// Where in the Machine: an absolute path without `.` or `..`.
    pub guest_path: String,
    /// The contents, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_value: Option<String>,
    /// Permission bits as chmod(2) takes them (a JSON number, so 0644 is 420); 0 or absent:
    /// 0644. The file belongs to the Machine's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `config.dns` (Fly's `DNSConfig`): what the Machine's `/etc/resolv.conf` says. Fly's
/// `skip_registration`, `dns_forward_rules` and host names are not read (Berth runs no
/// DNS of its own); they are listed in `warnings`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct DnsConfig {
    /// IP addresses, at most 3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Search domains, at most 6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub searches: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<DnsOption>,
}

/// One `options` entry of resolv.conf: `name` or `name:value`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct DnsOption {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl DnsConfig {
    /// The resolv.conf it makes, or `None` when it says nothing (the image's file stays).
    pub fn resolv_conf(&self) -> Option<String> {
        if self.nameservers.is_empty() && self.searches.is_empty() && self.options.is_empty() {
            return None;
        }
        let mut text = String::new();
        for server in &self.nameservers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        if !self.searches.is_empty() {
            text.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        if !self.options.is_empty() {
            let options: Vec<String> = self
                .options
                .iter()
                .map(|option| match &option.value {
                    Some(value) if !value.is_empty() => format!("{}:{value}", option.name),
                    _ => option.name.clone(),
                })
                .collect();
            text.push_str(&format!("options {}\n", options.join(" ")));
        }
        Some(text)
    }
}

/// Relaxations of the sandbox a Machine may ask for; all off by default.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct SandboxConfig {
    /// CAP_NET_RAW: raw and packet sockets (ping without the ping group, packet
    /// capture). The worker's bridge filter still drops frames with another Machine's MAC
    /// or address, so tenants stay apart with it.
    #[serde(default)]
    pub net_raw: bool,
}

impl SandboxConfig {
    pub fn is_default(&self) -> bool {
        *self == SandboxConfig::default()
    }
}

/// `POST /v1/apps/{app}/machines`, Fly's `LaunchMachineInput`.
///
/// Fields Berth does not know are ignored and listed in the answer's `warnings` (with
/// `Berth-Strict: true`, refused), as in every Machine request body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateMachineRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default)]
    pub skip_launch: bool,
    pub config: MachineConfig,
    /// Fly's: its clients always send it. Berth keeps no app secrets, so skipping them is
    /// what happens anyway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_secrets: bool,
    /// Fly's: Berth keeps no app secrets, so any version is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_secrets_version: Option<u64>,
    /// Seconds: take a lease on the new Machine for its creator, whose nonce the answer
    /// carries as `nonce` (1 to 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<u64>,
    /// Berth's: the new Machine starts with the files of a checkpoint of another Machine
    /// of the same org, on that Machine's worker, instead of an empty writable layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_checkpoint: Option<FromCheckpoint>,
}

/// `POST /v1/apps/{app}/machines/{id}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateMachineRequest {
    pub config: MachineConfig,
    #[serde(default)]
    pub skip_launch: bool,
    /// As in create.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_secrets: bool,
    /// As in create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_secrets_version: Option<u64>,
}

/// `POST /v1/apps/{app}/machines/{id}/stop`
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct StopRequest {
    /// Fly's clients repeat the Machine's id here; the path names the Machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A name such as `SIGTERM` (Fly's spelling) or `TERM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ApiDuration>,
    /// Who the stop is recorded as coming from; only the admin token may set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ChangeSource>,
}

/// `POST /v1/apps/{app}/machines/{id}/suspend` (the body is optional).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct SuspendRequest {
    /// Who the suspend is recorded as coming from; only the admin token may set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ChangeSource>,
}

/// `POST /v1/apps/{app}/machines/{id}/signal`
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct SignalRequest {
    /// A name such as `SIGUSR1` (Fly's spelling) or `USR1`.
    pub signal: String,
}

/// The answer of a lifecycle call that has nothing more to say (signal, restart), as Fly
/// answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OkResponse {
    pub ok: bool,
}

/// `POST /v1/apps/{app}/machines/{id}/start` (the body is optional).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct StartRequest {
    /// Who the start is recorded as coming from; only the admin token may set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ChangeSource>,
}

/// The source a start or stop is recorded with in the Machine's events. The proxy starts
/// and stops through the same API as everyone else and names itself here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeSource {
    #[default]
    User,
    Autostart,
    Autostop,
}

/// The image a Machine runs, resolved at create or update time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRef {
    /// The name the user gave, as stored (for example `demo/busybox:1`).
    pub name: String,
    /// The registry's host (and port), as Fly names it; absent for an image imported
    /// into the server's store without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The manifest digest the name resolved to; a Machine never runs anything else.
    pub digest: String,
    /// The image config's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// How the Machine's last run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// `exited` (with the command's exit code, 128 + N when signal N ended it, as after a
    /// stop's SIGTERM), `killed` (the Machine's init killed, as by a stop's SIGKILL) or
    /// `oom_killed`.
    pub reason: String,
    pub exited_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    pub region: String,
    pub instance_id: String,
    /// Always present, except in a list with `summary=true`.
    #[schema(required = false)]
    pub config: MachineConfig,
    pub image_ref: ImageRef,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// How many times the restart policy has restarted this run.
    #[serde(default)]
    pub restart_count: u32,
    /// The Machine's IPv6 address on its worker's network (a ULA), made at create and kept
    /// across stop and start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// The worker that holds the Machine's disk; set at create, kept until destroy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Deprecated alias of `host_status` (Berth's earlier name, kept for one release):
    /// `ok`, or `unreachable` when the worker is down and this is the last known state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_status: Option<MachineWorkerStatus>,
    /// The last result of each of `config.checks`, by name (Fly's shape).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckStatus>,
    /// Fly's: `ok`, or `unreachable` when the worker is down and this is the last known
    /// state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_status: Option<HostStatus>,
    /// A cordoned Machine gets no traffic from the proxy and is never autostarted; it
    /// survives stop, start and restarts of the agent until uncordoned.
    #[serde(default)]
    pub cordoned: bool,
    /// The Machine's newest events, newest first (GET and list, not `summary`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<MachineEventAnswer>,
    /// The nonce of the lease a create with `lease_ttl` took; only on that answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// Whether a Machine's answer came from its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MachineWorkerStatus {
    /// The worker answered.
    Ok,
    /// The worker is down: this is the Machine's last known state.
    Unreachable,
}

wire_names!(MachineWorkerStatus {
    Ok => "ok",
    Unreachable => "unreachable",
});

/// `POST /v1/apps/{app}/machines/{id}/migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateMachineRequest {
    /// The worker to move to; placement picks one when absent, as at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_worker: Option<String>,
}

/// The answer to a migration: the Machine on its new worker, and what the move cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrateMachineResponse {
    pub machine: Machine,
    pub from_worker: String,
    pub to_worker: String,
    /// Bytes of file content copied, over every pass.
    pub bytes_moved: u64,
    /// Bytes on the wire (compressed), over every pass.
    pub bytes_sent: u64,
    /// Copy passes: 1 for a stopped Machine, 2 or more for a running one.
    pub passes: u32,
    /// From the request's start to the Machine on its new worker.
    pub duration_ms: u64,
    /// A running Machine: from the stop on the old worker to init running on the new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

/// The answer to start and stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StartStopResponse {
    pub previous_state: MachineState,
    pub machine: Machine,
    /// Set when the call changed nothing because the Machine was already there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Where a start's time went on the worker, step by step. The public API moves it
    /// into the `Server-Timing` header, so clients see it only there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timings: Vec<StepTiming>,
    /// A start of a suspended Machine that went on from its memory image (`true`); absent
    /// for any other start, and for one whose image was lost (the `note` says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

/// One step of an operation and how long it took, in microseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StepTiming {
    pub step: String,
    pub us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DestroyResponse {
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageSummary {
    pub name: String,
    pub digest: String,
    /// Sum of the compressed layer sizes (what a pull downloads).
    pub size_bytes: u64,
    /// Sum of the unpacked layer sizes (what the layers take on disk, in 4 KiB blocks);
    /// layers not unpacked on the server count 0.
    #[serde(default)]
    pub unpacked_bytes: u64,
    pub layers: usize,
    /// Ids of the Machines (running or stopped) whose image is this digest.
    #[serde(default)]
    pub machines: Vec<String>,
}

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagePullRequest {
    /// A full reference: `[registry[:port]/]repository[:tag][@sha256:<hex>]`.
    pub image: String,
}

/// One NDJSON line of `POST /v1/images/pull`.
///
/// `status` is `resolved` (first line; `digest`, `bytes_total` of all layers), then per
/// layer `exists`, `waiting`, `downloading`, `downloaded`, `unpacked` (with `layer`,
/// `bytes_done`, `bytes_total`), and last either `done` (with `image` and `digest`) or
/// `error` (with `error`, `message` and, when retrying can help, `retry_after_ms`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImagePullEvent {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// What `POST /v1/images/prune` and `DELETE /v1/images?name=` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImagePruneResponse {
    /// Tags removed.
    pub images: Vec<String>,
    /// Blobs removed (manifests, configs, layers).
    pub blobs: usize,
    /// Unpacked layers removed.
    pub layers: usize,
    /// Bytes of the blobs removed.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// Every API error has this body. `error` is a stable code that clients can match on.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    /// For `invalid_state`: the state that refused the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MachineState>,
    /// For `invalid_config`: the path of the offending field, such as `config.guest.cpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// When retrying can succeed: how long to wait first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// For `quota_exceeded`: which quota (`max_machines`, `max_started_machines`,
    /// `max_cpus`, `max_memory_mb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    /// For `quota_exceeded`: the quota's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// For `quota_exceeded`: the org's use of it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    /// For `insufficient_capacity` and `worker_unavailable` at start or stop: the worker
    /// the Machine is pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// For `insufficient_capacity`: what the worker lacks, among `cpus`, `memory_mb` and
    /// `disk_mb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each wire name is serde's, `parse` and `Display` agree with it, and the names are
    /// exactly these (the wire and the agent's database hold them).
    fn assert_wire_names<T>(all: &[T], as_str: fn(T) -> &'static str, names: &[&str])
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + Serialize,
        T: serde::de::DeserializeOwned,
    {
        let listed: Vec<&str> = all.iter().map(|value| as_str(*value)).collect();
        assert_eq!(listed, names);
        for &value in all {
            let json = serde_json::to_string(&value).expect("encode");
            assert_eq!(json, format!("\"{}\"", as_str(value)));
            assert_eq!(serde_json::from_str::<T>(&json).expect("decode"), value);
            assert_eq!(value.to_string(), as_str(value));
        }
    }

    #[test]
    fn event_kinds_and_sources_keep_their_wire_names() {
        assert_wire_names(
            EventKind::ALL,
            EventKind::as_str,
            &[
                "create",
                "pull",
                "start",
                "start_failed",
                "stop",
                "exit",
                "update",
                "update_rolled_back",
                "recovered",
                "disk_quota_exceeded",
                "destroy",
                "snapshot",
                "cordon",
                "uncordon",
                "migrate",
                "recreate",
                "suspend",
                "resume",
                "memory_lost",
                "checkpoint",
                "restore",
            ],
        );
        for &kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(EventKind::parse_type(kind.fly_type()), Some(kind));
            assert_eq!(EventKind::parse_type(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::Create.fly_type(), "launch");
        assert_wire_names(
            EventSource::ALL,
            EventSource::as_str,
            &[
                "user",
                "restart_policy",
                "autostart",
                "autostop",
                "system",
                "standby",
            ],
        );
        for &source in EventSource::ALL {
            assert_eq!(EventSource::parse(source.as_str()), Some(source));
        }
        assert_eq!(EventSource::parse("proxy"), None);
        // Fly's names for them: a client's, the proxy's, or the platform's own.
        assert_wire_names(
            FlyEventSource::ALL,
            FlyEventSource::as_str,
            &["user", "flyd", "proxy"],
        );
        let fly: Vec<&str> = EventSource::ALL
            .iter()
            .map(|source| source.fly_source().as_str())
            .collect();
        assert_eq!(fly, ["user", "flyd", "proxy", "proxy", "flyd", "flyd"]);
        assert_eq!(format!("{:<6}|", EventSource::User), "user  |");
    }

    #[test]
    fn worker_statuses_keep_their_wire_names() {
        assert_wire_names(
            WorkerStatus::ALL,
            WorkerStatus::as_str,
            &["ready", "unreachable"],
        );
        assert_wire_names(
            MachineWorkerStatus::ALL,
            MachineWorkerStatus::as_str,
            &["ok", "unreachable"],
        );
    }

    #[test]
    fn an_event_reads_and_writes_as_before() {
        let text = r#"{"id":7,"kind":"start_failed","source":"restart_policy","state":"failed","timestamp":"t","reason":"x"}"#;
        let event: MachineEvent = serde_json::from_str(text).expect("decode");
        assert_eq!(
            (event.kind, event.source),
            (EventKind::StartFailed, EventSource::RestartPolicy)
        );
        assert_eq!(serde_json::to_string(&event).expect("encode"), text);
    }

    /// Unknown fields are left to the API's parser, which lists them as warnings or, in
    /// strict mode, refuses them; the types themselves skip them, as Fly's server does.
    #[test]
    fn unknown_fields_are_skipped_by_the_types() {
        let text = r#"{"config":{"image":"a"},"bogus":1}"#;
        assert!(serde_json::from_str::<CreateMachineRequest>(text).is_ok());
        let text = r#"{"config":{"image":"a","guest":{"cpus":1,"gpus":2}}}"#;
        assert!(serde_json::from_str::<CreateMachineRequest>(text).is_ok());
        let text = r#"{"config":{"image":"a","guest":{"cpus":"1"}}}"#;
        assert!(serde_json::from_str::<CreateMachineRequest>(text).is_err());
    }

    #[test]
    fn exec_reads_fly_spellings() {
        let read = |text: &str| serde_json::from_str::<ExecRequest>(text).map(|r| r.cmd);
        let args = vec!["ls".to_owned(), "-l".to_owned()];
        assert_eq!(read(r#"{"cmd":["ls","-l"]}"#).expect("list"), args);
        assert_eq!(read(r#"{"command":["ls","-l"]}"#).expect("alias"), args);
        assert_eq!(read(r#"{"cmd":"ls  -l"}"#).expect("line"), args);
        assert!(read(r#"{"cmd":["ls"],"command":["ls"]}"#).is_err());
        assert!(read(r#"{"cmd":7}"#).is_err());
    }

    #[test]
    fn defaults_fill_a_minimal_create() {
        let request: CreateMachineRequest =
            serde_json::from_str(r#"{"config":{"image":"demo/busybox:1"}}"#).expect("parses");
        assert_eq!(
            request.config.guest,
            GuestConfig {
                cpus: 1,
                memory_mb: 256,
                disk_mb: None,
                cpu_kind: None,
            }
        );
        assert_eq!(request.config.restart.policy, RestartPolicy::OnFailure);
        assert!(!request.skip_launch);
    }

    #[test]
    fn states_round_trip_through_text() {
        for state in MachineState::ALL {
            assert_eq!(MachineState::parse(state.as_str()), Some(state));
            let json = serde_json::to_string(&state).expect("serializes");
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
    }

    #[test]
    fn restart_policy_uses_fly_spelling() {
        let config: RestartConfig =
            serde_json::from_str(r#"{"policy":"on-failure","max_retries":3}"#).expect("parses");
        assert_eq!(config.policy, RestartPolicy::OnFailure);
    }
}

/// What a usage journal record says happened to a Machine or a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageKind {
    /// The Machine exists from now on; its storage starts being billed (at 0 bytes).
    /// A volume's storage starts being billed at its provisioned size.
    Created,
    /// The Machine's init started running: compute billing starts.
    RunStart,
    /// The Machine stopped running: compute billing stops.
    RunStop,
    /// A measurement of the Machine's own writable layer, in bytes; for a volume, its
    /// new provisioned size after an extend.
    Storage,
    /// The Machine (or volume) is gone: all billing of it ends.
    Destroyed,
    /// The Machine left this worker for another, whose journal bills it from the same
    /// instant: its billing on this worker ends.
    MigratedOut,
    /// A measurement of the bytes the Machine's checkpoints hold and neither its disk nor
    /// the checkpoint it was forked from does, billed as storage from now on. Data a
    /// checkpoint shares with forks is billed here once, not to the forks.
    CheckpointStorage,
}

/// How the end time of a run was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloseBasis {
    /// The agent saw the stop happen.
    Observed,
    /// The Machine died while the agent was down; the shim recorded the exit time.
    ExitTime,
    /// The Machine died while the agent was down and nothing recorded when: the agent's
    /// last liveness record is the best-known time.
    LastLiveness,
}

/// One entry of a worker's append-only usage journal. `(worker, seq)` identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageRecord {
    pub seq: u64,
    /// The Machine's id, or a volume's `vol_` id: a volume's entries are only
    /// `created`, `storage` and `destroyed`, with no CPU or memory.
    pub machine_id: String,
    pub app: String,
    pub kind: UsageKind,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub cpus: u32,
    pub memory_mb: u32,
    pub storage_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<CloseBasis>,
}

/// One row of `GET /v1/orgs/{org}/usage`. Exactly one of `machine`, `volume`, `app` or
/// `day` is set, by `group_by`: with `machine`, a volume's storage is a row of its own
/// with `volume` set; with `app` and `day` it is summed into the app's or day's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageRow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The volume's id (`vol_…`), billed by its provisioned size while it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub running_seconds: f64,
    pub cpu_seconds: f64,
    pub memory_gb_seconds: f64,
    pub storage_gb_hours: f64,
    /// Checkpoints: the bytes only they hold (data the Machine has since changed or
    /// deleted), at the storage price. Data a checkpoint shares with its Machine or a
    /// fork is in `storage_gb_hours`, billed there.
    #[serde(default)]
    pub checkpoint_storage_gb_hours: f64,
    pub cost: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    pub org: String,
    /// RFC 3339.
    pub from: String,
    pub to: String,
    pub group_by: String,
    pub rows: Vec<UsageRow>,
    pub total: UsageRow,
}

/// A worker's size, or how much of it is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
}

/// What a worker reports with every heartbeat. CPU and memory count running Machines;
/// disk counts every Machine that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct WorkerStats {
    pub used: Resources,
    pub machines: u64,
    pub running: u64,
}

/// `POST /v1/internal/workers/register`, sent by an agent with the join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterWorker {
    pub name: String,
    pub region: String,
    /// Where the control plane reaches the agent's own API.
    pub url: String,
    pub capacity: Resources,
    /// The drivers the worker runs Machines with (`config.runtime` names one). Absent
    /// from an agent of an older release: such a worker takes only Machines that name
    /// none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtimes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerRegistered {
    /// The worker's IPv6 /64 for its Machines, from the cluster's ULA /48.
    pub machine_prefix: String,
}

/// `GET /v1/workers`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Worker {
    pub name: String,
    pub region: String,
    pub status: WorkerStatus,
    pub cordoned: bool,
    pub capacity: Resources,
    pub used: Resources,
    pub machines: u64,
    pub running: u64,
    pub machine_prefix: String,
    /// The drivers the worker offers, by name, as it reported them when it registered.
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// `null` until the worker's first heartbeat (and again after a control plane restart).
    #[serde(default)]
    pub last_heartbeat: Option<String>,
    /// The worker's last drain, while it runs and after it ended; absent when it was
    /// never drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainProgress>,
}

/// Where a drain stands: every Machine the worker held when it began is left, moving,
/// moved or failed, and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainProgress {
    pub state: DrainState,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Machines the worker held when the drain began.
    pub total: u64,
    pub left: u64,
    pub moving: u64,
    pub moved: u64,
    /// Machines that could not move, each with the error it met. They stay where they are.
    /// Volumes that could not move are listed here too, by `volume`.
    pub failed: Vec<DrainFailure>,
    /// The volumes no Machine took along: counted once the Machines have moved, then
    /// each moved on its own. Absent while none was counted.
    #[serde(default, skip_serializing_if = "DrainVolumes::is_empty")]
    pub volumes: DrainVolumes,
}

/// A drain's volumes that no Machine held: left, moving and moved. One that cannot move
/// is in the drain's `failed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainVolumes {
    pub total: u64,
    pub left: u64,
    pub moving: u64,
    pub moved: u64,
}

impl DrainVolumes {
    pub fn is_empty(&self) -> bool {
        *self == DrainVolumes::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DrainState {
    Draining,
    /// The worker holds no Machine and no volume.
    Drained,
    /// Every Machine and volume was tried; some could not move (see `failed`).
    Incomplete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainFailure {
    /// The Machine that could not move; empty for a volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine: String,
    /// The volume that could not move (one no Machine held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    pub app: String,
    /// The error code the move ended with, such as `insufficient_capacity`.
    pub error: String,
    pub message: String,
}

/// `POST /v1/apps/{app}/machines/{id}/recreate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecreateMachineRequest {
    /// Must be `true`: the Machine's files are lost with its worker, and this says the
    /// caller knows.
    #[serde(default)]
    pub lose_state: bool,
    /// The worker to make it on; placement picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_worker: Option<String>,
}

/// Whether a worker keeps up its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStatus {
    Ready,
    /// No heartbeat within the timeout.
    Unreachable,
}

wire_names!(WorkerStatus {
    Ready => "ready",
    Unreachable => "unreachable",
});
