//! How the proxy reaches the platform: list an app's Machines, start one, stop one. The
//! HTTP implementation goes through the public API, so leases, quotas, rate limits and
//! metering apply to the proxy exactly as to anyone else.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use berth_api::{
    ChangeSource, CheckState, ErrorBody, ListAppsResponse, Machine, MachineCheck, MachineService,
    MachineState, StartRequest, StopRequest,
};

/// What the proxy needs to know about one Machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineView {
    pub id: String,
    pub state: MachineState,
    pub address: Option<IpAddr>,
    /// The Machine's first service; Machines without one get no traffic.
    pub service: Option<MachineService>,
    /// How long ago its state last changed (by its `updated_at`), when known.
    pub changed_ago: Option<std::time::Duration>,
    /// A readiness check of its `config.checks` is `critical`: it gets no new traffic
    /// while another Machine can take it.
    pub failing_checks: bool,
    /// Cordoned: no traffic and no autostart, whatever its service says.
    pub cordoned: bool,
}

impl MachineView {
    pub fn from_machine(machine: &Machine) -> MachineView {
        let changed_ago = time::OffsetDateTime::parse(
            &machine.updated_at,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()
        .and_then(|at| std::time::Duration::try_from(time::OffsetDateTime::now_utc() - at).ok());
        MachineView {
            id: machine.id.clone(),
            state: machine.state,
            address: machine.private_ip.as_deref().and_then(|ip| ip.parse().ok()),
            service: machine.config.services.first().cloned(),
            changed_ago,
            failing_checks: failing_checks(machine),
            cordoned: machine.cordoned,
        }
    }
}

/// Whether one of the Machine's readiness checks fails (informational ones only inform).
fn failing_checks(machine: &Machine) -> bool {
    machine.checks.iter().any(|status| {
        status.status == CheckState::Critical
            && machine
                .config
                .checks
                .get(&status.name)
                .is_some_and(MachineCheck::gates_traffic)
    })
}

/// A refusal or failure from the platform, with the API's stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PlatformError {
    pub code: String,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl PlatformError {
    pub fn new(code: &str, message: impl Into<String>) -> PlatformError {
        PlatformError {
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
        }
    }
}

#[async_trait]
pub trait Platform: Send + Sync + 'static {
    /// The names of every app the proxy may serve.
    async fn apps(&self) -> Result<Vec<String>, PlatformError>;
    /// The app's Machines; `None` when there is no such app.
    async fn machines(&self, app: &str) -> Result<Option<Vec<MachineView>>, PlatformError>;
    /// Starts the Machine, recorded with source `autostart`; returns once it runs.
    async fn start(&self, app: &str, id: &str) -> Result<(), PlatformError>;
    /// Stops the Machine, recorded with source `autostop`; returns once it is stopped.
    async fn stop(&self, app: &str, id: &str) -> Result<(), PlatformError>;
}

/// The platform through its HTTP API, with the admin token (only the admin may record
/// `autostart` and `autostop`).
pub struct HttpPlatform {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// Start and stop wait for the Machine; a stop may take its whole stop timeout.
const LIFECYCLE_DEADLINE: Duration = Duration::from_secs(320);
const READ_DEADLINE: Duration = Duration::from_secs(10);

impl HttpPlatform {
    pub fn new(api_url: &str, token: &str) -> Result<HttpPlatform, PlatformError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Below the API's header timeout, which closes idle connections.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .map_err(|error| PlatformError::new("internal", error.to_string()))?;
        Ok(HttpPlatform {
            base: api_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
        })
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        deadline: Duration,
    ) -> Result<reqwest::Response, PlatformError> {
        let response = request
            .bearer_auth(&self.token)
            .timeout(deadline)
            .send()
            .await
            .map_err(|error| PlatformError {
                code: "platform_unreachable".into(),
                message: format!("the Berth API did not answer: {error}"),
                retry_after: Some(Duration::from_secs(1)),
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Option<ErrorBody> = response.json().await.ok();
        Err(match body {
            Some(body) => PlatformError {
                code: body.error,
                message: body.message,
                retry_after: body.retry_after_ms.map(Duration::from_millis),
            },
            None => PlatformError::new("internal", format!("the Berth API answered {status}")),
        })
    }

    fn machine_url(&self, app: &str, id: &str, action: &str) -> String {
        format!("{}/v1/apps/{app}/machines/{id}/{action}", self.base)
    }
}

#[async_trait]
impl Platform for HttpPlatform {
    async fn apps(&self) -> Result<Vec<String>, PlatformError> {
        let request = self.http.get(format!("{}/v1/apps", self.base));
        let listed: ListAppsResponse = self
            .send(request, READ_DEADLINE)
            .await?
            .json()
            .await
            .map_err(|error| {
                PlatformError::new("internal", format!("an app list that is not JSON: {error}"))
            })?;
        Ok(listed.apps.into_iter().map(|app| app.name).collect())
    }

    async fn machines(&self, app: &str) -> Result<Option<Vec<MachineView>>, PlatformError> {
        let request = self
            .http
            .get(format!("{}/v1/apps/{app}/machines", self.base));
        let machines: Vec<Machine> = match self.send(request, READ_DEADLINE).await {
            Ok(response) => response.json().await.map_err(|error| {
                PlatformError::new(
                    "internal",
                    format!("a Machine list that is not JSON: {error}"),
                )
            })?,
            Err(error) if error.code == "not_found" => return Ok(None),
            Err(error) => return Err(error),
        };
        Ok(Some(
            machines.iter().map(MachineView::from_machine).collect(),
        ))
    }

    async fn start(&self, app: &str, id: &str) -> Result<(), PlatformError> {
        let body = StartRequest {
            source: Some(ChangeSource::Autostart),
        };
        let request = self
            .http
            .post(self.machine_url(app, id, "start"))
            .json(&body);
        self.send(request, LIFECYCLE_DEADLINE).await.map(drop)
    }

    async fn stop(&self, app: &str, id: &str) -> Result<(), PlatformError> {
        let body = StopRequest {
            source: Some(ChangeSource::Autostop),
            ..StopRequest::default()
        };
        let request = self
            .http
            .post(self.machine_url(app, id, "stop"))
            .json(&body);
        self.send(request, LIFECYCLE_DEADLINE).await.map(drop)
    }
}
