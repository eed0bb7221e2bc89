//! `berth`: runs the platform (`berth up`) and drives it through the API.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

mod checkpoint_cmd;
mod cluster;
mod commands;
mod demo;
mod doctor_cmd;
mod host_tuning;
mod proxy_cmd;
mod pull_progress;
mod robots;
mod up;
mod usage_cmd;
mod volume_cmd;
mod worker_cmd;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/berth";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:4280";

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Machines that are created once and started in milliseconds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole platform in one process: API, control plane and a worker.
    Up(Box<up::UpArgs>),
    /// Run only the control plane; workers join it with `berth agent`.
    Server(cluster::ServerArgs),
    /// Run one worker that joins a control plane.
    Agent(cluster::AgentArgs),
    /// Run the wake-on-request proxy against an API (`berth up` runs one itself).
    Proxy(proxy_cmd::ProxyArgs),
    /// Apps group Machines.
    #[command(subcommand)]
    App(commands::AppCommand),
    /// Create, start, stop and inspect Machines.
    #[command(subcommand)]
    Machine(Box<commands::MachineCommand>),
    /// Pull, import, list and prune images.
    #[command(subcommand)]
    Image(commands::ImageCommand),
    /// Volumes: persistent disks on one worker that outlive Machines.
    #[command(subcommand)]
    Volume(volume_cmd::VolumeCommand),
    /// What an org was billed for: running time, CPU, memory and storage.
    Usage(usage_cmd::UsageArgs),
    /// Orgs, their quotas and rate limits (admin).
    #[command(subcommand)]
    Org(robots::OrgCommand),
    /// API tokens of orgs (admin).
    #[command(subcommand)]
    Token(robots::TokenCommand),
    /// The cluster's workers: list, cordon, drain (admin).
    #[command(subcommand)]
    Worker(worker_cmd::WorkerCommand),
    /// Check every worker's records against its host; exits non-zero on findings.
    Doctor(doctor_cmd::DoctorArgs),
    /// The per-Machine supervisor. Started by the worker, not by people.
    #[command(hide = true)]
    Shim(ShimArgs),
}

#[derive(Debug, Args)]
struct ShimArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

/// Where the CLI finds the API: `BERTH_API_URL` and `BERTH_TOKEN`, else the defaults.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The API base URL; several, comma-separated, are replicas tried in turn.
    #[arg(long, env = "BERTH_API_URL", default_value = "http://127.0.0.1:4280")]
    pub api_url: String,
    /// The bearer token; read from <data dir>/admin-token when not given.
    #[arg(long, env = "BERTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where to look for the admin token file when no token is given.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The nonce of a lease you hold, sent on every call.
    #[arg(long, env = "BERTH_LEASE_NONCE", hide_env_values = true)]
    pub lease_nonce: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        // The shim runs before any runtime or logging exists: it must stay tiny.
        Command::Shim(args) => berth_runtime::shim::main_with_args(args.args),
        command => match run(command) {
            Ok(()) => 0,
            Err(error) => match error.downcast_ref::<robots::ExitWith>() {
                // A command's own exit status (machine exec), not a failure of berth.
                Some(robots::ExitWith(code)) => *code,
                None => {
                    eprintln!("error: {error:#}");
                    1
                }
            },
        },
    };
    std::process::exit(code);
}

fn run(command: Command) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Up(args) => up::run(*args).await,
            Command::Server(args) => cluster::server(args).await,
            Command::Agent(args) => cluster::agent(args).await,
            Command::Proxy(args) => proxy_cmd::run(args).await,
            Command::App(command) => commands::app(command).await,
            Command::Machine(command) => commands::machine(*command).await,
            Command::Image(command) => commands::image(command).await,
            Command::Volume(command) => volume_cmd::volume(command).await,
            Command::Usage(args) => usage_cmd::run(args).await,
            Command::Org(command) => robots::org(command).await,
            Command::Token(command) => robots::token(command).await,
            Command::Worker(command) => worker_cmd::worker(command).await,
            Command::Doctor(args) => doctor_cmd::run(args).await,
            Command::Shim(_) => Ok(()),
        }
    })
}
