//! `config.services`: what the proxy routes to a Machine, and when it may start and stop
//! it (Fly's shape).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One service of a Machine: a TCP port inside it that the proxy sends its app's HTTP
/// traffic to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineService {
    pub internal_port: u16,
    #[serde(default)]
    pub protocol: ServiceProtocol,
    /// Start this Machine when a request finds no started Machine with room for it.
    #[serde(default = "MachineService::default_autostart")]
    pub autostart: bool,
    /// `stop`: stop this Machine after `autostop_idle_seconds` without traffic; `off`: never.
    #[serde(default)]
    pub autostop: AutostopMode,
    #[serde(default = "MachineService::default_idle_seconds")]
    pub autostop_idle_seconds: u32,
    /// Autostop never leaves fewer than this many of the app's Machines started.
    #[serde(default)]
    pub min_machines_running: u32,
    #[serde(default)]
    pub concurrency: ServiceConcurrency,
    /// Fly's public `ports` and health `checks`, accepted so Fly-shaped configs work and
    /// kept as given. The proxy routes by host name on its own port and uses neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub ports: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checks: Option<serde_json::Value>,
    /// Fly's instance pinning, which its clients always send (mostly `null`); kept as
    /// given, unused by the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_instance_key: Option<String>,
}

impl MachineService {
    fn default_autostart() -> bool {
        true
    }
    pub const DEFAULT_IDLE_SECONDS: u32 = 60;
    fn default_idle_seconds() -> u32 {
        Self::DEFAULT_IDLE_SECONDS
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServiceProtocol {
    #[default]
    Tcp,
}

/// Also read as Fly writes it: `true` is `stop`, `false` is `off`, and `suspend` (which
/// Berth has not got) falls back to `stop`, as Fly's does for Machines that cannot suspend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", try_from = "AutostopWire")]
pub enum AutostopMode {
    #[default]
    Off,
    Stop,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AutostopWire {
    Flag(bool),
    Name(String),
}

impl TryFrom<AutostopWire> for AutostopMode {
    type Error = String;

    fn try_from(wire: AutostopWire) -> Result<Self, String> {
        match wire {
            AutostopWire::Flag(true) => Ok(AutostopMode::Stop),
            AutostopWire::Flag(false) => Ok(AutostopMode::Off),
            AutostopWire::Name(name) => match name.as_str() {
                "stop" | "suspend" => Ok(AutostopMode::Stop),
                "off" => Ok(AutostopMode::Off),
                other => Err(format!(
                    "unknown autostop {other:?}: expected \"off\", \"stop\", true or false"
                )),
            },
        }
    }
}

/// What counts towards the limits: requests in flight, or open connections (an upgraded
/// connection counts as one request until it closes, so both behave the same for HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConcurrencyType {
    #[default]
    Requests,
    Connections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceConcurrency {
    #[serde(default, rename = "type")]
    pub kind: ConcurrencyType,
    /// Above this, the proxy prefers another Machine and wakes one if it can.
    #[serde(default = "ServiceConcurrency::default_soft")]
    pub soft_limit: u32,
    /// Never more than this in flight on one Machine; more wait briefly, then get 503.
    #[serde(default = "ServiceConcurrency::default_hard")]
    pub hard_limit: u32,
}

impl ServiceConcurrency {
    fn default_soft() -> u32 {
        20
    }
    fn default_hard() -> u32 {
        25
    }
}

impl Default for ServiceConcurrency {
    fn default() -> Self {
        ServiceConcurrency {
            kind: ConcurrencyType::Requests,
            soft_limit: Self::default_soft(),
            hard_limit: Self::default_hard(),
        }
    }
}
