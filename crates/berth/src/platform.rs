//! Wiring: the image store, the runc runtime, one agent and the control plane, in one
//! process. Used by `berth up` and by the bench harness, so both run the same thing.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use berth_agent::{Agent, AgentConfig, WorkerService};
use berth_control::{ControlConfig, ControlPlane};
use berth_image::{ImageStore, UnpackLimits};
use berth_runtime::runc::{RuncConfig, RuncRuntime};

/// The name of the one in-process worker.
pub const LOCAL_WORKER: &str = "local";

#[derive(Debug, Clone)]
pub struct PlatformOptions {
    pub data_dir: PathBuf,
    pub runc_binary: PathBuf,
    /// Program and leading arguments that run the shim.
    pub shim_command: Vec<OsString>,
    pub region: String,
    pub log_max_bytes: u64,
    pub pids_limit: i64,
    /// Cap on each of exec's stdout and stderr; the control plane's default when `None`.
    pub exec_max_output_bytes: Option<usize>,
    /// Changes to the built-in default quotas and rate limits of every org.
    pub default_limits: Option<berth_api::SetOrgLimitsRequest>,
}

pub struct LocalPlatform {
    pub data_dir: PathBuf,
    pub admin_token: String,
    pub agent: Agent,
    pub control: Arc<ControlPlane>,
}

impl LocalPlatform {
    pub async fn open(options: PlatformOptions) -> Result<LocalPlatform> {
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("create {}", options.data_dir.display()))?;
        let data_dir = options.data_dir.canonicalize()?;
        let token_path = data_dir.join("admin-token");
        let admin_token = berth_control::load_or_create_admin_token(&token_path)
            .with_context(|| format!("write {}", token_path.display()))?;
        let images = Arc::new(ImageStore::open(
            &data_dir.join("images"),
            UnpackLimits::default(),
        )?);
        let runtime = Arc::new(RuncRuntime::new(RuncConfig {
            runc_binary: options.runc_binary,
            runc_root: data_dir.join("runc"),
            shim_command: options.shim_command,
            log_max_bytes: options.log_max_bytes,
            start_timeout: Duration::from_secs(30),
        }));
        let agent = Agent::open(
            AgentConfig {
                data_dir: data_dir.join("worker"),
                region: options.region,
                pids_limit: options.pids_limit,
            },
            runtime,
            images.clone(),
        )
        .await?;
        let mut workers: BTreeMap<String, Arc<dyn WorkerService>> = BTreeMap::new();
        workers.insert(LOCAL_WORKER.to_owned(), Arc::new(agent.clone()));
        let mut control_config = ControlConfig::new(data_dir.clone(), admin_token.clone());
        if let Some(bytes) = options.exec_max_output_bytes {
            control_config.exec_max_output_bytes = bytes;
        }
        if let Some(changes) = &options.default_limits {
            control_config.default_limits =
                berth_control::limits::effective(&control_config.default_limits, changes);
        }
        let control = ControlPlane::open(control_config, workers, images)
            .await
            .map_err(|error| anyhow!("opening the control plane: {}", error.body.message))?;
        Ok(LocalPlatform {
            data_dir,
            admin_token,
            agent,
            control,
        })
    }

    pub async fn close(&self) {
        self.control.close().await;
        self.agent.store().close().await;
    }
}

/// Finds a program on PATH (and in the sbin directories, where Debian puts runc).
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
