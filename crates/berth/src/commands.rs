//! The API-driving subcommands: `berth app`, `berth machine`, `berth image`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use berth_api::{
    ApiDuration, App, CreateAppRequest, CreateMachineRequest, DestroyResponse, GuestConfig,
    ImagePruneResponse, ImageSummary, InitConfig, ListAppsResponse, Machine, MachineConfig,
    MachineMount, MachineVersion, ProcessStat, RestartConfig, RestartPolicy, StartStopResponse,
    StopRequest, UpdateMachineRequest,
};
use clap::{Args, Subcommand, ValueEnum};

use crate::ApiArgs;
use berth::client::Client;

impl ApiArgs {
    pub fn client(&self) -> Result<Client> {
        Ok(
            Client::connect(&self.api_url, self.token.as_deref(), &self.data_dir)?
                .with_lease_nonce(self.lease_nonce.clone()),
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Create an app.
    Create {
        name: String,
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List apps.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one app.
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Destroy an app and every Machine in it.
    Destroy {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RestartArg {
    No,
    OnFailure,
    Always,
}

/// The config flags shared by create and update.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Image reference, e.g. demo/busybox:1.
    #[arg(long)]
    image: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    #[arg(long, default_value_t = 256)]
    memory_mb: u32,
    /// The Machine's disk in MiB (`guest.disk_mb`); the platform default when absent.
    #[arg(long)]
    disk_mb: Option<u32>,
    /// Environment variables, KEY=VALUE; may be repeated.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Replace the image's entrypoint (one argument; use -- cmd for the rest).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Restart policy; absent: on-failure with 10 retries (Fly's default).
    #[arg(long, value_enum)]
    restart: Option<RestartArg>,
    #[arg(long)]
    max_retries: Option<u32>,
    /// Signal sent by stop (default SIGTERM).
    #[arg(long)]
    stop_signal: Option<String>,
    /// How long stop waits before SIGKILL, e.g. 5s.
    #[arg(long)]
    stop_timeout: Option<String>,
    /// Metadata, KEY=VALUE; may be repeated.
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// Start from an empty writable layer on update.
    #[arg(long)]
    ephemeral_rootfs: bool,
    /// A service for the proxy, as JSON in Fly's shape, e.g.
    /// '{"internal_port":8080,"autostop":"stop","autostop_idle_seconds":60}'; may be repeated.
    #[arg(long = "service", value_name = "JSON")]
    services: Vec<String>,
    /// Give the Machine CAP_NET_RAW (raw and packet sockets); off by default.
    #[arg(long)]
    net_raw: bool,
    /// Attach a volume, VOLUME_ID:/path; may be repeated. An update keeps the Machine's
    /// mounts when none is given (they cannot change).
    #[arg(long = "volume", value_name = "VOLUME_ID:/PATH")]
    volumes: Vec<String>,
    /// The command, after `--`.
    #[arg(last = true)]
    cmd: Vec<String>,
}

impl ConfigArgs {
    fn into_config(self) -> Result<MachineConfig> {
        Ok(MachineConfig {
            image: self.image,
            init: InitConfig {
                cmd: (!self.cmd.is_empty()).then_some(self.cmd),
                entrypoint: self.entrypoint.map(|entrypoint| vec![entrypoint]),
                exec: None,
                tty: false,
            },
            env: pairs("--env", &self.env)?,
            guest: GuestConfig {
                cpus: self.cpus,
                memory_mb: self.memory_mb,
                disk_mb: self.disk_mb,
                cpu_kind: None,
            },
            restart: RestartConfig {
                policy: match self.restart {
                    // Fly's default, as the API applies to a config without `restart`.
                    None => RestartPolicy::default(),
                    Some(RestartArg::No) => RestartPolicy::No,
                    Some(RestartArg::OnFailure) => RestartPolicy::OnFailure,
                    Some(RestartArg::Always) => RestartPolicy::Always,
                },
                max_retries: self.max_retries,
            },
            stop_config: berth_api::StopConfig {
                signal: self.stop_signal,
                timeout: self
                    .stop_timeout
                    .map(|text| ApiDuration::parse(&text).map_err(anyhow::Error::msg))
                    .transpose()?,
            },
            metadata: pairs("--metadata", &self.metadata)?,
            rootfs: berth_api::RootfsConfig {
                persist: if self.ephemeral_rootfs {
                    berth_api::RootfsPersist::Restart
                } else {
                    berth_api::RootfsPersist::Always
                },
                size_gb: None,
            },
            services: self
                .services
                .iter()
                .map(|text| {
                    serde_json::from_str(text)
                        .with_context(|| format!("--service {text:?} is not a service"))
                })
                .collect::<Result<_>>()?,
            sandbox: berth_api::SandboxConfig {
                net_raw: self.net_raw,
            },
            mounts: self
                .volumes
                .iter()
                .map(|entry| match entry.split_once(':') {
                    Some((volume, path)) => Ok(MachineMount {
                        volume: volume.to_owned(),
                        path: path.to_owned(),
                        ..MachineMount::default()
                    }),
                    None => bail!("--volume takes VOLUME_ID:/path, got {entry:?}"),
                })
                .collect::<Result<_>>()?,
            ..MachineConfig::default()
        })
    }
}

fn pairs(flag: &str, entries: &[String]) -> Result<BTreeMap<String, String>> {
    entries
        .iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
            None => bail!("{flag} takes KEY=VALUE, got {entry:?}"),
        })
        .collect()
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Create a Machine (and start it, unless --skip-launch).
    Create {
        #[arg(long)]
        app: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        skip_launch: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List an app's Machines.
    List {
        #[arg(long)]
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one Machine as JSON.
    Show {
        #[arg(long)]
        app: String,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Start {
        #[arg(long)]
        app: String,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Stop {
        #[arg(long)]
        app: String,
        id: String,
        #[arg(long)]
        signal: Option<String>,
        /// e.g. 10s
        #[arg(long)]
        timeout: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Checkpoint a started Machine with its memory into its worker's disk and free its
    /// CPU and memory; `start` resumes it. Only gVisor Machines can (`config.runtime`).
    Suspend {
        #[arg(long)]
        app: String,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replace a Machine's config (a new image is resolved now).
    Update {
        #[arg(long)]
        app: String,
        id: String,
        #[arg(long)]
        skip_launch: bool,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the Machine's captured stdout and stderr.
    Logs {
        /// The Machine's app; found by the Machine's id when not given.
        #[arg(long, env = "BERTH_APP")]
        app: Option<String>,
        id: String,
        /// Keep printing new output as it comes, across stops and starts.
        #[arg(short, long)]
        follow: bool,
        /// Start at this position of the output (an ndjson line's `next`).
        #[arg(long)]
        since: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run a command inside the started Machine: `berth machine exec <id> -- cmd args`.
    Exec(crate::robots::ExecArgs),
    /// Wait until the Machine is started, stopped or destroyed.
    Wait(crate::robots::WaitArgs),
    /// The Machine's state changes.
    Events(crate::robots::EventsArgs),
    /// Read and change the Machine's metadata.
    #[command(subcommand)]
    Metadata(crate::robots::MetadataCommand),
    /// Take, show and release the Machine's lease.
    #[command(subcommand)]
    Lease(crate::robots::LeaseCommand),
    /// Keep the proxy's traffic and autostart away from the Machine.
    Cordon {
        #[arg(long)]
        app: String,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Move the Machine, its files and its history to another worker. A running Machine
    /// runs there afterwards, after a short stop.
    Migrate {
        /// The Machine's app; looked up from the id when absent.
        #[arg(long)]
        app: Option<String>,
        id: String,
        /// The worker to move to; placement picks one when absent.
        #[arg(long = "to")]
        to_worker: Option<String>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Let the proxy route to the Machine again.
    Uncordon {
        #[arg(long)]
        app: String,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The processes of a started Machine, as its pid namespace sees them.
    Ps {
        #[arg(long)]
        app: String,
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Checkpoints of the Machine's files: create, list, rm, restore.
    #[command(subcommand)]
    Checkpoint(crate::checkpoint_cmd::CheckpointCommand),
    /// A new Machine with the files of a checkpoint of this one, taken now.
    Fork {
        #[arg(long, env = "BERTH_APP")]
        app: String,
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Another app of the same org for the new Machine.
        #[arg(long)]
        to_app: Option<String>,
        #[arg(long)]
        skip_launch: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The Machine's config history, newest first.
    Versions {
        #[arg(long)]
        app: String,
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    Destroy {
        #[arg(long)]
        app: String,
        id: String,
        /// Destroy even if it is running.
        #[arg(long)]
        force: bool,
        /// Admin: forget a Machine whose worker is unavailable (its files are lost); its
        /// copy there is destroyed if the worker comes back.
        #[arg(long)]
        lose_state: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an OCI image layout directory or an OCI archive (.tar).
    Import {
        path: PathBuf,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pull an image from a registry, e.g. 127.0.0.1:5000/team/web:1.4.
    Pull {
        reference: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List images: name, digest, size and the Machines using each.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a tag and whatever only it reached. Machines keep the digest they resolved.
    Rm {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove every image and layer that no Machine, running or stopped, references.
    Prune {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

pub async fn app(command: AppCommand) -> Result<()> {
    match command {
        AppCommand::Create { name, org, api } => {
            let app: App = api
                .client()?
                .post(
                    "/v1/apps",
                    &CreateAppRequest {
                        app_name: name,
                        org_slug: org,
                    },
                )
                .await?;
            println!("created app {} in org {}", app.name, app.organization.slug);
        }
        AppCommand::List { json, api } => {
            let listed: ListAppsResponse = api.client()?.get("/v1/apps").await?;
            if json {
                return print_json(&listed);
            }
            println!("{:<32} {:<16} {:>8}  CREATED", "NAME", "ORG", "MACHINES");
            for app in listed.apps {
                println!(
                    "{:<32} {:<16} {:>8}  {}",
                    app.name, app.organization.slug, app.machine_count, app.created_at
                );
            }
        }
        AppCommand::Show { name, api } => {
            let app: App = api.client()?.get(&format!("/v1/apps/{name}")).await?;
            print_json(&app)?;
        }
        AppCommand::Destroy { name, api } => {
            api.client()?
                .delete::<serde_json::Value>(&format!("/v1/apps/{name}"))
                .await?;
            println!("destroyed app {name}");
        }
    }
    Ok(())
}

fn print_machines(machines: &[Machine]) {
    println!(
        "{:<16} {:<24} {:<10} {:<24} {:<10} CREATED",
        "ID", "NAME", "STATE", "IMAGE", "REGION"
    );
    for machine in machines {
        println!(
            "{:<16} {:<24} {:<10} {:<24} {:<10} {}",
            machine.id,
            machine.name,
            machine.state,
            machine.image_ref.name,
            machine.region,
            machine.created_at
        );
    }
}

pub async fn machine(command: MachineCommand) -> Result<()> {
    match command {
        MachineCommand::Create {
            app,
            name,
            region,
            skip_launch,
            json,
            config,
            api,
        } => {
            let request = CreateMachineRequest {
                from_checkpoint: None,
                name,
                region,
                skip_launch,
                config: config.into_config()?,
                skip_secrets: false,
                min_secrets_version: None,
                lease_ttl: None,
            };
            let started = std::time::Instant::now();
            let machine: Machine = api
                .client()?
                .post(&format!("/v1/apps/{app}/machines"), &request)
                .await?;
            if json {
                return print_json(&machine);
            }
            println!("{}", machine.id);
            eprintln!(
                "machine {} is {} ({} ms)",
                machine.id,
                machine.state,
                started.elapsed().as_millis()
            );
        }
        MachineCommand::List { app, json, api } => {
            let machines: Vec<Machine> = api
                .client()?
                .get(&format!("/v1/apps/{app}/machines"))
                .await?;
            if json {
                return print_json(&machines);
            }
            print_machines(&machines);
        }
        MachineCommand::Show { app, id, api } => {
            let machine: Machine = api
                .client()?
                .get(&format!("/v1/apps/{app}/machines/{id}"))
                .await?;
            print_json(&machine)?;
        }
        MachineCommand::Start { app, id, api } => {
            let started = std::time::Instant::now();
            let answer: StartStopResponse = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/start"),
                    &serde_json::json!({}),
                )
                .await?;
            report(&answer, started.elapsed());
        }
        MachineCommand::Stop {
            app,
            id,
            signal,
            timeout,
            api,
        } => {
            let timeout = timeout
                .map(|text| ApiDuration::parse(&text).map_err(anyhow::Error::msg))
                .transpose()?;
            let started = std::time::Instant::now();
            let answer: StartStopResponse = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/stop"),
                    &StopRequest {
                        id: None,
                        signal,
                        timeout,
                        source: None,
                    },
                )
                .await?;
            report(&answer, started.elapsed());
        }
        MachineCommand::Suspend { app, id, api } => {
            let started = std::time::Instant::now();
            let answer: StartStopResponse = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/suspend"),
                    &serde_json::json!({}),
                )
                .await?;
            report(&answer, started.elapsed());
        }
        MachineCommand::Update {
            app,
            id,
            skip_launch,
            config,
            api,
        } => {
            let client = api.client()?;
            let mut config = config.into_config()?;
            if config.mounts.is_empty() {
                let current: Machine = client.get(&format!("/v1/apps/{app}/machines/{id}")).await?;
                config.mounts = current.config.mounts;
            }
            let request = UpdateMachineRequest {
                config,
                skip_launch,
                skip_secrets: false,
                min_secrets_version: None,
            };
            let machine: Machine = client
                .post(&format!("/v1/apps/{app}/machines/{id}"), &request)
                .await?;
            println!(
                "machine {} is {} (instance {})",
                machine.id, machine.state, machine.instance_id
            );
        }
        MachineCommand::Logs {
            app,
            id,
            follow,
            since,
            api,
        } => {
            let client = api.client()?;
            let app = crate::robots::resolve_app(&client, app, &id).await?;
            crate::robots::logs(&client, &app, &id, follow, since).await?
        }
        MachineCommand::Exec(args) => crate::robots::exec(args).await?,
        MachineCommand::Wait(args) => crate::robots::wait(args).await?,
        MachineCommand::Events(args) => crate::robots::events(args).await?,
        MachineCommand::Metadata(command) => crate::robots::metadata(command).await?,
        MachineCommand::Lease(command) => crate::robots::lease(command).await?,
        MachineCommand::Cordon { app, id, api } => {
            let _: serde_json::Value = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/cordon"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("machine {id} is cordoned");
        }
        MachineCommand::Migrate {
            app,
            id,
            to_worker,
            json,
            api,
        } => {
            let client = api.client()?;
            let app = crate::robots::resolve_app(&client, app, &id).await?;
            let answer: berth_api::MigrateMachineResponse = client
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/migrate"),
                    &berth_api::MigrateMachineRequest { to_worker },
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let downtime = answer
                    .downtime_ms
                    .map(|ms| format!(", down for {ms} ms"))
                    .unwrap_or_default();
                println!(
                    "machine {id} moved from {} to {} ({} bytes in {} pass(es), {} ms{downtime}); private_ip {}",
                    answer.from_worker,
                    answer.to_worker,
                    answer.bytes_moved,
                    answer.passes,
                    answer.duration_ms,
                    answer.machine.private_ip.as_deref().unwrap_or("none"),
                );
            }
        }
        MachineCommand::Uncordon { app, id, api } => {
            let _: serde_json::Value = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/uncordon"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("machine {id} is uncordoned");
        }
        MachineCommand::Ps { app, id, json, api } => {
            let processes: Vec<ProcessStat> = api
                .client()?
                .get(&format!("/v1/apps/{app}/machines/{id}/ps"))
                .await?;
            if json {
                return print_json(&processes);
            }
            println!(
                "{:>7} {:>9} {:>9} {:<22} COMMAND",
                "PID", "RSS_KB", "CPU_MS", "LISTEN"
            );
            for process in processes {
                let listen: Vec<&str> = process
                    .listen_sockets
                    .iter()
                    .map(|socket| socket.address.as_str())
                    .collect();
                println!(
                    "{:>7} {:>9} {:>9} {:<22} {}",
                    process.pid,
                    process.rss / 1024,
                    process.cpu,
                    listen.join(","),
                    // One line per process, however the command was spelled.
                    process.command.replace(char::is_control, " ")
                );
            }
        }
        MachineCommand::Checkpoint(command) => crate::checkpoint_cmd::checkpoint(command).await?,
        MachineCommand::Fork {
            app,
            id,
            name,
            to_app,
            skip_launch,
            api,
        } => crate::checkpoint_cmd::fork(app, id, name, to_app, skip_launch, api).await?,
        MachineCommand::Versions { app, id, json, api } => {
            let versions: Vec<MachineVersion> = api
                .client()?
                .get(&format!("/v1/apps/{app}/machines/{id}/versions"))
                .await?;
            if json {
                return print_json(&versions);
            }
            println!("{:<26} {:<26} IMAGE", "VERSION", "CREATED");
            for version in versions {
                println!(
                    "{:<26} {:<26} {}",
                    version.version, version.created_at, version.user_config.image
                );
            }
        }
        MachineCommand::Destroy {
            app,
            id,
            force,
            lose_state,
            api,
        } => {
            let _: DestroyResponse = api
                .client()?
                .delete(&format!(
                    "/v1/apps/{app}/machines/{id}?kill={force}&lose_state={lose_state}"
                ))
                .await?;
            println!("destroyed machine {id}");
        }
    }
    Ok(())
}

fn report(answer: &StartStopResponse, elapsed: std::time::Duration) {
    let machine = &answer.machine;
    let change = format!(
        "{} -> {} ({:.1} ms){}",
        answer.previous_state,
        machine.state,
        elapsed.as_secs_f64() * 1000.0,
        if answer.resumed {
            ", resumed from memory"
        } else {
            ""
        }
    );
    match &answer.note {
        Some(note) if answer.previous_state == machine.state => println!("{}: {note}", machine.id),
        Some(note) => println!("{}: {change}: {note}", machine.id),
        None => println!("{}: {change}", machine.id),
    }
}

pub async fn image(command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Import { path, name, api } => {
            let client = api.client()?;
            let summary = import(&client, &path, &name).await?;
            println!(
                "imported {} {} ({} layers, {} bytes)",
                summary.name, summary.digest, summary.layers, summary.size_bytes
            );
        }
        ImageCommand::Pull { reference, api } => {
            let client = api.client()?;
            let done = crate::pull_progress::pull(&client, &reference).await?;
            println!(
                "pulled {} {}",
                done.image.unwrap_or(reference),
                done.digest.unwrap_or_default()
            );
        }
        ImageCommand::List { json, api } => {
            let images: Vec<ImageSummary> = api.client()?.get("/v1/images").await?;
            if json {
                return print_json(&images);
            }
            // Whole digests: scripts match them against `image_ref.digest`.
            // SIZE is what was downloaded; UNPACKED what the layers take on disk.
            println!(
                "{:<40} {:<71} {:>6} {:>12} {:>12} MACHINES",
                "NAME", "DIGEST", "LAYERS", "SIZE", "UNPACKED"
            );
            for image in images {
                let machines = if image.machines.is_empty() {
                    "-".to_owned()
                } else {
                    image.machines.join(",")
                };
                println!(
                    "{:<40} {:<71} {:>6} {:>12} {:>12} {machines}",
                    image.name, image.digest, image.layers, image.size_bytes, image.unpacked_bytes
                );
            }
        }
        ImageCommand::Prune { json, api } => {
            let report: ImagePruneResponse = api
                .client()?
                .post("/v1/images/prune", &serde_json::json!({}))
                .await?;
            if json {
                return print_json(&report);
            }
            for name in &report.images {
                println!("removed {name}");
            }
            println!(
                "pruned {} images, {} layers, {} blobs ({} bytes)",
                report.images.len(),
                report.layers,
                report.blobs,
                report.bytes
            );
        }
        ImageCommand::Rm { name, api } => {
            let client = api.client()?;
            client
                .delete::<serde_json::Value>(&format!("/v1/images?name={}", encode_query(&name)))
                .await?;
            println!("removed {name}");
        }
    }
    Ok(())
}

/// Uploads a layout directory (tarred on the fly into a temp file) or an archive.
pub async fn import(client: &Client, path: &Path, name: &str) -> Result<ImageSummary> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if metadata.is_dir() {
        let archive = tempfile::NamedTempFile::new()?;
        let source = path.to_owned();
        let target = archive.reopen()?;
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut builder = tar::Builder::new(target);
            builder.follow_symlinks(false);
            builder.append_dir_all(".", &source)?;
            builder.into_inner()?.sync_all()?;
            Ok(())
        })
        .await??;
        client.import_archive(archive.path(), name).await
    } else {
        client.import_archive(path, name).await
    }
}

pub fn encode_query(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
