//! `config.checks`: Fly's named top-level health checks, and their status in a Machine's
//! JSON. The agent runs them while the Machine runs; the proxy sends no new traffic to a
//! Machine whose readiness checks fail while another one passes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiDuration;

/// One check, under its name in `config.checks` (Fly's `MachineCheck`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct MachineCheck {
    /// `tcp`: the port accepts a connection; `http`: a request to it answers 2xx or 3xx.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind_of_check: Option<CheckType>,
    /// The port inside the Machine, often a service's `internal_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `informational` (Fly's default: shown, nothing more) or `readiness` (a failing
    /// Machine gets no new traffic from the proxy while another one passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    /// Between two runs of the check (default 15s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<ApiDuration>,
    /// How long one run may take before it fails (default 2s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ApiDuration>,
    /// How long after the Machine starts the first run waits (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<ApiDuration>,
    /// HTTP checks: the method (default `GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP checks: the path and query (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP checks: `http` (default) or `https`: the same request over TLS, the server's
    /// certificate verified against the worker's CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<CheckProtocol>,
    /// HTTPS checks: take any certificate (the handshake's signatures are still checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_skip_verify: Option<bool>,
    /// HTTPS checks: the name sent as SNI and `Host` and the certificate is verified for;
    /// unset, the Machine's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// HTTP checks: headers sent with the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<CheckHeader>,
}

impl MachineCheck {
    pub const DEFAULT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);
    pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
    pub const DEFAULT_GRACE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

    pub fn interval(&self) -> std::time::Duration {
        self.interval
            .map_or(Self::DEFAULT_INTERVAL, ApiDuration::as_duration)
    }

    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
            .map_or(Self::DEFAULT_TIMEOUT, ApiDuration::as_duration)
    }

    pub fn grace_period(&self) -> std::time::Duration {
        self.grace_period
            .map_or(Self::DEFAULT_GRACE_PERIOD, ApiDuration::as_duration)
    }

    /// Whether a failure of this check takes the Machine out of the proxy's rotation.
    pub fn gates_traffic(&self) -> bool {
        self.kind == Some(CheckKind::Readiness)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckType {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Informational,
    Readiness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckProtocol {
    Http,
    Https,
}

/// A header of an HTTP check: a name and its values (Fly's `MachineHTTPHeader`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct CheckHeader {
    pub name: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// A check's last result, in a Machine's `checks` (Fly's `MachineCheckStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckStatus {
    pub name: String,
    pub status: CheckState,
    /// What the last run saw, or why it has not run.
    #[serde(default)]
    pub output: String,
    /// When the status was last set (RFC 3339); absent before the first run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// Consul's three states, as Fly reports them. A check that has not run yet is `critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckState {
    Passing,
    Warning,
    Critical,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fly_check_fields() {
        let check: MachineCheck = serde_json::from_str(
            r#"{"type":"http","port":8080,"kind":"readiness","interval":"15s","timeout":"2s",
                "grace_period":"1s","method":"GET","path":"/health","protocol":"http",
                "tls_skip_verify":false,"headers":[{"name":"X-A","values":["1","2"]}]}"#,
        )
        .expect("parses");
        assert_eq!(check.kind_of_check, Some(CheckType::Http));
        assert_eq!(check.port, Some(8080));
        assert!(check.gates_traffic());
        assert_eq!(check.interval(), std::time::Duration::from_secs(15));
        assert_eq!(check.headers[0].values, ["1", "2"]);
        let text = serde_json::to_string(&check).expect("encode");
        assert!(text.contains(r#""type":"http""#), "{text}");
        assert!(serde_json::from_str::<MachineCheck>(r#"{"type":"udp"}"#).is_err());
        let informational: MachineCheck =
            serde_json::from_str(r#"{"type":"tcp","port":1}"#).expect("parses");
        assert!(!informational.gates_traffic());
        assert_eq!(informational.timeout(), MachineCheck::DEFAULT_TIMEOUT);
    }

    #[test]
    fn statuses_use_consul_names() {
        let status = CheckStatus {
            name: "web".into(),
            status: CheckState::Passing,
            output: "200 OK".into(),
            updated_at: None,
        };
        assert_eq!(
            serde_json::to_string(&status).expect("encode"),
            r#"{"name":"web","status":"passing","output":"200 OK"}"#
        );
    }
}
