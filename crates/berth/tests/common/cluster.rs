//! A cluster of separate processes for end-to-end tests: one `berth server` and
//! `berth agent`s from the built binary, each with its own data dir and capacity.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_api::{Machine, Worker, WorkerStatus};
use reqwest::Method;
use serde_json::{json, Value};

pub use super::free_port;
use super::BERTH;

pub struct Process {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(args: &[String], log: PathBuf) -> Process {
        Process::spawn_with_env(args, log, &[])
    }

    pub fn spawn_with_env(args: &[String], log: PathBuf, env: &[(&str, &str)]) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BERTH)
            .args(args)
            .envs(env.iter().copied())
            .env("BERTH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone"))
            .stderr(file)
            .spawn()
            .expect("spawn berth");
        Process {
            child: Some(child),
            log,
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Agent {
    pub name: String,
    pub args: Vec<String>,
    pub data_dir: PathBuf,
    pub process: Process,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub api_url: String,
    pub token: String,
    pub join_token: String,
    pub server_args: Vec<String>,
    pub server: Process,
    pub agents: Vec<Agent>,
    pub http: reqwest::blocking::Client,
    /// Where the server keeps its state, as a URL to read it with.
    pub control_store: String,
    /// On PostgreSQL, the registry imports go to (the server refuses them without one).
    pub image_registry: Option<berth_testkit::Registry>,
}

impl Cluster {
    pub fn start(capacities: &[(&str, u32, u64)]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("berth-cluster-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let server_dir = dir.path().join("server");
        let (mut database_args, control_store) = super::control_database(&server_dir);
        let image_registry = (!database_args.is_empty()).then(|| {
            let registry = berth_testkit::Registry::start().expect("image registry");
            database_args.extend(["--image-registry".to_owned(), registry.host()]);
            registry
        });
        let server_args: Vec<String> = [
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            server_dir.display().to_string(),
        ]
        .into_iter()
        .chain(database_args)
        .collect();
        let server = Process::spawn(&server_args, dir.path().join("server.log"));
        let api_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http
            .get(format!("{api_url}/v1/health"))
            .send()
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let token = std::fs::read_to_string(server_dir.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_owned();
        let join = std::fs::read_to_string(server_dir.join("join-token"))
            .expect("join token")
            .trim()
            .to_owned();
        let mut cluster = Cluster {
            dir,
            api_url,
            token,
            join_token: join.clone(),
            server_args,
            server,
            agents: Vec::new(),
            http,
            control_store,
            image_registry,
        };
        for (name, cpus, memory_mb) in capacities {
            let data_dir = cluster.dir.path().join(name);
            let args: Vec<String> = vec![
                "agent".into(),
                "--control-url".into(),
                cluster.api_url.clone(),
                "--join-token".into(),
                join.clone(),
                "--listen".into(),
                format!("127.0.0.1:{}", free_port()),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--name".into(),
                name.to_string(),
                "--region".into(),
                "local".into(),
                "--cpus".into(),
                cpus.to_string(),
                "--memory-mb".into(),
                memory_mb.to_string(),
                "--disk-mb".into(),
                "100000".into(),
            ];
            let process = Process::spawn(&args, cluster.dir.path().join(format!("{name}.log")));
            cluster.agents.push(Agent {
                name: name.to_string(),
                args,
                data_dir,
                process,
            });
        }
        cluster.wait_for("every worker to be ready", || {
            let workers = cluster.workers();
            workers.len() == capacities.len()
                && workers
                    .iter()
                    .all(|worker| worker.status == WorkerStatus::Ready)
        });
        cluster
    }

    pub fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.api_url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().expect("send");
        let status = response.status().as_u16();
        let text = response.text().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn workers(&self) -> Vec<Worker> {
        let (status, body) = self.call(Method::GET, "/v1/workers", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("workers")
    }

    pub fn machine(&self, id: &str) -> Machine {
        let (status, body) = self.call(Method::GET, &format!("/v1/apps/fleet/machines/{id}"), None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("machine")
    }

    pub fn wait_for(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        let mut all = format!("--- server\n{}", self.server.log());
        for agent in &self.agents {
            all.push_str(&format!("\n--- {}\n{}", agent.name, agent.process.log()));
        }
        all
    }

    pub fn create(&self, body: Value) -> (u16, Value) {
        self.call(Method::POST, "/v1/apps/fleet/machines", Some(body))
    }

    pub fn agent(&mut self, name: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|agent| agent.name == name)
            .expect("agent")
    }

    /// SIGKILLs the control plane and starts it again on the same data dir and port.
    pub fn restart_server(&mut self) {
        self.restart_server_with_env(&[]);
    }

    pub fn restart_agent(&mut self, name: &str) {
        self.restart_agent_with_env(name, &[]);
    }

    /// SIGKILLs the agent and starts it again on the same data dir and port, with `env`.
    pub fn restart_agent_with_env(&mut self, name: &str, env: &[(&str, &str)]) {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        let log = self.dir.path().join(format!("{name}-{stamp}.log"));
        let agent = self.agent(name);
        agent.process.kill();
        agent.process = Process::spawn_with_env(&agent.args, log, env);
    }

    /// SIGKILLs the control plane and starts it again on the same data dir and port,
    /// with `env`.
    pub fn restart_server_with_env(&mut self, env: &[(&str, &str)]) {
        self.server.kill();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        let log = self.dir.path().join(format!("server-{stamp}.log"));
        self.server = Process::spawn_with_env(&self.server_args, log, env);
        self.wait_for("the control plane to answer again", || {
            self.http
                .get(format!("{}/v1/health", self.api_url))
                .send()
                .is_ok_and(|response| response.status().is_success())
        });
    }

    /// Destroys every Machine through the API, then stops everything and checks the hosts.
    pub fn teardown(mut self) {
        let bridges: Vec<String> = self
            .workers()
            .iter()
            .map(|worker| berth::platform::bridge_name(&worker.machine_prefix))
            .collect();
        let (_, machines) = self.call(Method::GET, "/v1/apps/fleet/machines", None);
        for machine in machines.as_array().cloned().unwrap_or_default() {
            let id = machine["id"].as_str().unwrap_or_default().to_owned();
            let (status, body) = self.call(
                Method::DELETE,
                &format!("/v1/apps/fleet/machines/{id}?kill=true"),
                None,
            );
            assert!(status < 300, "destroy {id}: {status} {body}");
        }
        // Then the volumes they held (their loop mounts are checked below).
        let (_, volumes) = self.call(Method::GET, "/v1/apps/fleet/volumes", None);
        for volume in volumes.as_array().cloned().unwrap_or_default() {
            let id = volume["id"].as_str().unwrap_or_default().to_owned();
            let (status, body) = self.call(
                Method::DELETE,
                &format!("/v1/apps/fleet/volumes/{id}"),
                None,
            );
            assert!(status < 300, "delete {id}: {status} {body}");
        }
        for agent in &mut self.agents {
            agent.process.kill();
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let prefix = agent.data_dir.display().to_string();
            assert!(!mountinfo.contains(&prefix), "mounts left under {prefix}");
        }
        self.server.kill();
        for bridge in bridges {
            super::delete_bridge(&bridge);
        }
    }
}

pub fn sleeper(extra: Value) -> Value {
    let mut body = json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
        "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"}}});
    if let (Some(target), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            target.insert(key.clone(), value.clone());
        }
    }
    body
}

impl Cluster {
    /// A cluster with busybox imported as `demo/busybox:1` and the app `fleet`.
    pub fn with_fleet(capacities: &[(&str, u32, u64)]) -> Cluster {
        let cluster = Cluster::start(capacities);
        let layout = tempfile::tempdir().expect("tempdir");
        super::busybox_image()
            .write_layout(&layout.path().join("img"))
            .expect("layout");
        let output = Command::new(BERTH)
            .args(["image", "import"])
            .arg(layout.path().join("img"))
            .args(["--name", "demo/busybox:1"])
            .env("BERTH_API_URL", &cluster.api_url)
            .env("BERTH_TOKEN", &cluster.token)
            .output()
            .expect("import");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (status, body) =
            cluster.call(Method::POST, "/v1/apps", Some(json!({"app_name": "fleet"})));
        assert_eq!(status, 201, "{body}");
        cluster
    }

    /// Runs `sh -c script` in a started Machine; answers its stdout, asserting exit 0.
    pub fn sh(&self, id: &str, script: &str) -> String {
        let (status, body) = self.call(
            Method::POST,
            &format!("/v1/apps/fleet/machines/{id}/exec"),
            Some(json!({"cmd": ["sh", "-c", script], "timeout": 60})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["exit_code"], 0, "{script}: {body}");
        body["stdout"].as_str().unwrap_or_default().to_owned()
    }

    /// The directory of worker `name`'s volume `id`.
    pub fn volume_dir(&self, worker: &str, id: &str) -> PathBuf {
        self.agents
            .iter()
            .find(|agent| agent.name == worker)
            .expect("agent")
            .data_dir
            .join("volumes")
            .join(id)
    }

    /// The directory of worker `name`'s Machine `id`.
    pub fn machine_dir(&self, worker: &str, id: &str) -> PathBuf {
        self.agents
            .iter()
            .find(|agent| agent.name == worker)
            .expect("agent")
            .data_dir
            .join("machines")
            .join(id)
    }

    /// Cordons (`true`) or uncordons a worker.
    pub fn cordon(&self, worker: &str, cordoned: bool) {
        let verb = if cordoned { "cordon" } else { "uncordon" };
        let (status, body) = self.call(Method::POST, &format!("/v1/workers/{worker}/{verb}"), None);
        assert_eq!(status, 200, "{body}");
    }

    /// The doctor's reports for every worker, asserting no findings.
    pub fn assert_doctor_clean(&self, when: &str) {
        for agent in &self.agents {
            let (status, body) = self.call(
                Method::GET,
                &format!("/v1/workers/{}/doctor", agent.name),
                None,
            );
            assert_eq!(status, 200, "{body}");
            let findings = body["findings"].as_array().cloned().unwrap_or_default();
            assert!(
                findings.is_empty(),
                "doctor on {} {when}: {body}\n{}",
                agent.name,
                self.logs()
            );
        }
    }
}
