//! Many workers: start through `berth server` plus a separate `berth agent` process against
//! the in-process platform in the same run, and create and start with 200 Machines
//! already on one worker.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth_api::{
    CreateMachineRequest, InitConfig, Machine, MachineConfig, StartStopResponse, Worker,
};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use serde_json::{json, Value};

use crate::summary;

/// Kills the processes it holds when dropped, so a failed run leaves none behind.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `sleep 3600`, stopped with SIGKILL: the bench measures stop, not a grace period.
pub(crate) fn sleeper() -> MachineConfig {
    MachineConfig {
        image: "bench/busybox:1".into(),
        init: InitConfig {
            cmd: Some(vec!["/bin/sleep".into(), "3600".into()]),
            entrypoint: None,
            exec: None,
            tty: false,
        },
        stop_config: berth_api::StopConfig {
            signal: Some("SIGKILL".into()),
            timeout: None,
        },
        ..MachineConfig::default()
    }
}

async fn create(client: &Client, app: &str) -> Result<Machine> {
    let request = CreateMachineRequest {
        from_checkpoint: None,
        name: None,
        region: None,
        skip_launch: true,
        skip_secrets: false,
        min_secrets_version: None,
        lease_ttl: None,
        config: sleeper(),
    };
    client
        .post(&format!("/v1/apps/{app}/machines"), &request)
        .await
}

/// `GET machine` latencies: the cleanest view of what the agent hop adds, because the
/// worker does almost nothing for it.
async fn gets(client: &Client, app: &str, id: &str, count: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let clock = Instant::now();
        client
            .get::<Machine>(&format!("/v1/apps/{app}/machines/{id}"))
            .await?;
        times.push(clock.elapsed());
    }
    Ok(times)
}

/// Start p50 over `cycles` stop→start cycles of one Machine.
async fn start_cycles(
    client: &Client,
    app: &str,
    id: &str,
    cycles: usize,
) -> Result<Vec<Duration>> {
    let base = format!("/v1/apps/{app}/machines/{id}");
    let mut starts = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        let clock = Instant::now();
        client
            .post::<_, StartStopResponse>(&format!("{base}/start"), &json!({}))
            .await?;
        starts.push(clock.elapsed());
        client
            .post::<_, StartStopResponse>(&format!("{base}/stop"), &json!({}))
            .await?;
    }
    Ok(starts)
}

pub async fn measure(cycles: usize, in_process: &Client, scratch: &Path) -> Result<Value> {
    let archive = scratch.join("cluster-busybox.tar");
    ImageBuilder::new()
        .layer(busybox_layer(Path::new("/bin/busybox"))?, Compression::Gzip)
        .write_archive(&archive)?;

    // The in-process platform: start, then create and start with 200 Machines on the worker.
    in_process
        .import_archive::<Value>(&archive, "bench/busybox:1")
        .await?;
    in_process
        .post::<_, Value>("/v1/apps", &json!({"app_name": "dense"}))
        .await?;
    let first = create(in_process, "dense").await?;
    let local_starts = start_cycles(in_process, "dense", &first.id, cycles).await?;
    let local_gets = gets(in_process, "dense", &first.id, 300).await?;
    for _ in 0..199 {
        create(in_process, "dense").await?;
    }
    let mut dense_creates = Vec::new();
    let mut last = first.id.clone();
    for _ in 0..20 {
        let clock = Instant::now();
        last = create(in_process, "dense").await?.id;
        dense_creates.push(clock.elapsed());
    }
    let dense_starts = start_cycles(in_process, "dense", &last, cycles).await?;
    let _ = in_process.delete::<Value>("/v1/apps/dense").await;

    // The same through a control plane and an agent in separate processes.
    let fleet = Fleet::start(scratch, "cluster", &["w1"], "error").await?;
    let remote = fleet.client.clone();
    remote
        .import_archive::<Value>(&archive, "bench/busybox:1")
        .await?;
    remote
        .post::<_, Value>("/v1/apps", &json!({"app_name": "remote"}))
        .await?;
    let result = async {
        let machine = create(&remote, "remote").await?;
        let starts = start_cycles(&remote, "remote", &machine.id, cycles).await?;
        let reads = gets(&remote, "remote", &machine.id, 300).await?;
        Ok::<_, anyhow::Error>((starts, reads))
    }
    .await;
    let _ = remote.delete::<Value>("/v1/apps/remote").await;
    fleet.shutdown();
    let (remote_starts, remote_gets) =
        result.context("start through berth server and berth agent")?;

    let local = summary(&local_starts);
    let through_agent = summary(&remote_starts);
    let hop_ms =
        through_agent["p50_ms"].as_f64().unwrap_or(0.0) - local["p50_ms"].as_f64().unwrap_or(0.0);
    let local_read = summary(&local_gets);
    let remote_read = summary(&remote_gets);
    let read_hop_ms = remote_read["p50_ms"].as_f64().unwrap_or(0.0)
        - local_read["p50_ms"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "get_in_process": local_read,
        "get_via_server_and_agent": remote_read,
        "agent_hop_get_p50_ms": (read_hop_ms * 100.0).round() / 100.0,
        "start_in_process": local,
        "start_via_server_and_agent": through_agent,
        "agent_hop_p50_ms": (hop_ms * 100.0).round() / 100.0,
        "create_with_200_machines": summary(&dense_creates),
        "start_with_200_machines": summary(&dense_starts),
    }))
}

async fn reqwest_health(api_url: &str) -> Result<()> {
    let response = reqwest::get(format!("{api_url}/v1/health")).await?;
    if response.status().is_success() {
        Ok(())
    } else {
        bail!("not healthy yet")
    }
}

/// How a [`Fleet`]'s control plane runs.
pub(crate) struct Control {
    /// Every server's `--database` (`None`: each keeps its SQLite file in its data dir).
    pub database: Option<String>,
    /// How many `berth server` replicas (at least one); each agent is given every URL.
    pub replicas: usize,
    /// Every server's `--image-registry`: where imports go when replicas share them.
    pub image_registry: Option<String>,
}

impl Control {
    /// One `berth server` on SQLite, as `berth server` runs by default.
    pub fn single() -> Control {
        Control {
            database: None,
            replicas: 1,
            image_registry: None,
        }
    }
}

/// One `berth server` process of a [`Fleet`], which can be killed and started again.
pub(crate) struct Server {
    pub url: String,
    berth: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    log_level: String,
    child: Option<Child>,
}

impl Server {
    fn spawn(&mut self) -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.child = Some(
            Command::new(&self.berth)
                .args(&self.args)
                .env("BERTH_LOG", &self.log_level)
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()?,
        );
        Ok(())
    }

    async fn wait_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest_health(&self.url).await.is_err() {
            if Instant::now() > deadline {
                bail!("berth server {} did not start", self.url);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// SIGKILL, as a crashed host would go: no shutdown of any kind.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same arguments, and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_healthy().await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `berth server` and named `berth agent` processes from the binary beside this one,
/// each with its own data dir under the scratch dir and its log in `<prefix>-<name>.log`
/// there. `shutdown` (or a drop) kills them; `shutdown` also removes the workers' networks.
pub(crate) struct Fleet {
    processes: Processes,
    /// The `berth server` replicas; `client` talks to the first.
    pub servers: Vec<Server>,
    pub client: Client,
    pub workers: Vec<Worker>,
    /// Each worker's name and data dir.
    agent_dirs: Vec<(String, PathBuf)>,
    logs: Vec<PathBuf>,
}

impl Fleet {
    pub async fn start(scratch: &Path, prefix: &str, names: &[&str], log: &str) -> Result<Fleet> {
        Fleet::start_with(scratch, prefix, names, log, Control::single()).await
    }

    /// The agents join through the first server; the others start once they have joined,
    /// with the first one's admin and join tokens.
    pub async fn start_with(
        scratch: &Path,
        prefix: &str,
        names: &[&str],
        log: &str,
        control: Control,
    ) -> Result<Fleet> {
        let berth = std::env::current_exe()?.with_file_name("berth");
        if !berth.is_file() {
            bail!(
                "{} is missing: build it with cargo build --release -p berth",
                berth.display()
            );
        }
        let mut logs = Vec::new();
        let mut servers = Vec::new();
        for index in 0..control.replicas.max(1) {
            let name = match index {
                0 => "server".to_owned(),
                _ => format!("server-{index}"),
            };
            let port = free_port()?;
            let mut args: Vec<OsString> = vec![
                "server".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}").into(),
                "--data-dir".into(),
                scratch.join(format!("{prefix}-{name}")).into(),
            ];
            if let Some(database) = &control.database {
                args.extend(["--database".into(), database.into()]);
            }
            if let Some(registry) = &control.image_registry {
                args.extend(["--image-registry".into(), registry.into()]);
            }
            let path = scratch.join(format!("{prefix}-{name}.log"));
            logs.push(path.clone());
            servers.push(Server {
                url: format!("http://127.0.0.1:{port}"),
                berth: berth.clone(),
                args,
                log: path,
                log_level: log.to_owned(),
                child: None,
            });
        }
        let server_dir = scratch.join(format!("{prefix}-server"));
        servers[0].spawn()?;
        let api_url = servers[0].url.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server_dir.join("join-token").is_file() || reqwest_health(&api_url).await.is_err() {
            if Instant::now() > deadline {
                bail!("berth server did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let admin = std::fs::read_to_string(server_dir.join("admin-token"))?
            .trim()
            .to_owned();
        let join = std::fs::read_to_string(server_dir.join("join-token"))?
            .trim()
            .to_owned();
        let control_urls = servers
            .iter()
            .map(|server| server.url.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut spawn = |name: &str, args: Vec<OsString>| -> Result<Child> {
            let path = scratch.join(format!("{prefix}-{name}.log"));
            let file = std::fs::File::create(&path)?;
            logs.push(path);
            Ok(Command::new(&berth)
                .args(args)
                .env("BERTH_LOG", log)
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()?)
        };
        let mut processes = Processes(Vec::new());
        let mut agent_dirs = Vec::new();
        for name in names {
            let data_dir = scratch.join(format!("{prefix}-{name}"));
            processes.0.push(spawn(
                name,
                vec![
                    "agent".into(),
                    "--control-url".into(),
                    control_urls.clone().into(),
                    "--join-token".into(),
                    join.clone().into(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", free_port()?).into(),
                    "--data-dir".into(),
                    data_dir.clone().into(),
                    "--name".into(),
                    (*name).into(),
                    "--cpus".into(),
                    "64".into(),
                    "--memory-mb".into(),
                    "65536".into(),
                    "--disk-mb".into(),
                    "1000000".into(),
                ],
            )?);
            agent_dirs.push((name.to_string(), data_dir));
        }
        let client = Client::new(&api_url, &admin)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let workers = loop {
            let workers: Vec<Worker> = client.get("/v1/workers").await?;
            let ready = workers
                .iter()
                .filter(|worker| worker.status == berth_api::WorkerStatus::Ready)
                .count();
            if ready == names.len() {
                break workers;
            }
            if Instant::now() > deadline {
                bail!("{ready} of {} berth agents joined", names.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for (index, server) in servers.iter_mut().enumerate().skip(1) {
            let dir = scratch.join(format!("{prefix}-server-{index}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("admin-token"), &admin)?;
            std::fs::write(dir.join("join-token"), &join)?;
            server.spawn()?;
            server.wait_healthy().await?;
        }
        Ok(Fleet {
            processes,
            servers,
            client,
            workers,
            agent_dirs,
            logs,
        })
    }

    /// Where worker `name` keeps Machine `id`'s files.
    pub fn machine_dir(&self, name: &str, id: &str) -> Option<PathBuf> {
        self.agent_dirs
            .iter()
            .find(|(worker, _)| worker == name)
            .map(|(_, dir)| dir.join("machines").join(id))
    }

    /// Waits until worker `name` has deleted the files of the Machines it removed (it
    /// does so behind its answers), so that the next measurement does not share the disk
    /// with that work.
    pub async fn removals_done(&self, name: &str) -> Result<()> {
        let Some((_, dir)) = self.agent_dirs.iter().find(|(worker, _)| worker == name) else {
            bail!("no worker {name}");
        };
        let removed = dir.join("removed");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::fs::read_dir(&removed).is_ok_and(|mut entries| entries.next().is_some()) {
            if Instant::now() > deadline {
                bail!("{} is still not empty", removed.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The processes' logs, for a reader of a failed run.
    pub fn logs(&self) -> &[PathBuf] {
        &self.logs
    }

    /// Kills the processes, then removes each worker's bridge and nftables tables (the
    /// agents leave them for the next start of the same worker).
    pub fn shutdown(self) {
        let Fleet {
            processes,
            servers,
            workers,
            ..
        } = self;
        drop(servers);
        drop(processes);
        for worker in &workers {
            remove_network(&berth::platform::bridge_name(&worker.machine_prefix));
        }
    }
}

/// Deletes a worker's bridge and the nftables tables named after it.
pub(crate) fn remove_network(bridge: &str) {
    let quiet = |command: &mut Command| {
        let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    quiet(Command::new("ip").args(["link", "delete", bridge]));
    for (family, table) in [
        ("bridge", format!("berth_isolate_{bridge}")),
        ("inet", format!("berth_host_{bridge}")),
    ] {
        quiet(Command::new("nft").args(["delete", "table", family, &table]));
    }
}
