//! Many workers, end to end: one `berth server` and three `berth agent` processes from the
//! built binary, each with its own data dir and capacity.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_api::{DoctorReport, Machine, MachineState, MachineWorkerStatus, Worker, WorkerStatus};
use common::{busybox_image, BERTH};
use reqwest::Method;
use serde_json::{json, Value};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    fn spawn(args: &[String], log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BERTH)
            .args(args)
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

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Agent {
    name: String,
    args: Vec<String>,
    data_dir: PathBuf,
    process: Process,
}

struct Cluster {
    dir: tempfile::TempDir,
    api_url: String,
    token: String,
    join_token: String,
    server_args: Vec<String>,
    server: Process,
    agents: Vec<Agent>,
    http: reqwest::blocking::Client,
}

impl Cluster {
    fn start(capacities: &[(&str, u32, u64)]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("berth-cluster-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let server_dir = dir.path().join("server");
        let server_args: Vec<String> = vec![
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            server_dir.display().to_string(),
        ];
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

    fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
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

    fn workers(&self) -> Vec<Worker> {
        let (status, body) = self.call(Method::GET, "/v1/workers", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("workers")
    }

    fn machine(&self, id: &str) -> Machine {
        let (status, body) = self.call(Method::GET, &format!("/v1/apps/fleet/machines/{id}"), None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("machine")
    }

    fn wait_for(&self, what: &str, mut check: impl FnMut() -> bool) {
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

    fn logs(&self) -> String {
        let mut all = format!("--- server\n{}", self.server.log());
        for agent in &self.agents {
            all.push_str(&format!("\n--- {}\n{}", agent.name, agent.process.log()));
        }
        all
    }

    fn create(&self, body: Value) -> (u16, Value) {
        self.call(Method::POST, "/v1/apps/fleet/machines", Some(body))
    }

    fn agent(&mut self, name: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|agent| agent.name == name)
            .expect("agent")
    }

    /// SIGKILLs the control plane and starts it again on the same data dir and port.
    fn restart_server(&mut self) {
        self.server.kill();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        let log = self.dir.path().join(format!("server-{stamp}.log"));
        self.server = Process::spawn(&self.server_args, log);
        self.wait_for("the control plane to answer again", || {
            self.http
                .get(format!("{}/v1/health", self.api_url))
                .send()
                .is_ok_and(|response| response.status().is_success())
        });
    }

    fn restart_agent(&mut self, name: &str) {
        let log = self.dir.path().join(format!("{name}-restarted.log"));
        let agent = self.agent(name);
        agent.process.kill();
        agent.process = Process::spawn(&agent.args, log);
    }

    /// Destroys every Machine through the API, then stops everything and checks the hosts.
    fn teardown(mut self) {
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
        for agent in &mut self.agents {
            agent.process.kill();
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let prefix = agent.data_dir.display().to_string();
            assert!(!mountinfo.contains(&prefix), "mounts left under {prefix}");
        }
        self.server.kill();
        for bridge in bridges {
            common::delete_bridge(&bridge);
        }
    }
}

fn sleeper(extra: Value) -> Value {
    let mut body = json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
        "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"}}});
    if let (Some(target), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            target.insert(key.clone(), value.clone());
        }
    }
    body
}

#[test]
fn placement_pinning_capacity_and_failures_across_processes() {
    let mut cluster = Cluster::start(&[("w1", 4, 4096), ("w2", 4, 4096), ("w3", 4, 4096)]);
    let layout = tempfile::tempdir().expect("tempdir");
    busybox_image()
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
    let (status, body) = cluster.call(Method::POST, "/v1/apps", Some(json!({"app_name": "fleet"})));
    assert_eq!(status, 201, "{body}");

    // Twenty creates spread across the workers (each agent pulls the image from the
    // control plane's registry).
    let mut machines = Vec::new();
    for _ in 0..20 {
        let (status, body) = cluster.create(sleeper(json!({"skip_launch": true})));
        assert_eq!(status, 200, "{body}\n{}", cluster.logs());
        machines.push(serde_json::from_value::<Machine>(body).expect("machine"));
    }
    for name in ["w1", "w2", "w3"] {
        let count = machines
            .iter()
            .filter(|machine| machine.worker.as_deref() == Some(name))
            .count();
        assert!(
            count >= 3,
            "spread placement gave {name} only {count} of 20"
        );
    }

    // Stop/start cycles keep every pin.
    for machine in machines
        .iter()
        .filter(|machine| machine.worker.as_deref() != Some("w3"))
        .take(6)
    {
        for _ in 0..2 {
            let (status, body) = cluster.call(
                Method::POST,
                &format!("/v1/apps/fleet/machines/{}/start", machine.id),
                None,
            );
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["machine"]["worker"], json!(machine.worker));
            let (status, body) = cluster.call(
                Method::POST,
                &format!("/v1/apps/fleet/machines/{}/stop", machine.id),
                None,
            );
            assert_eq!(status, 200, "{body}");
        }
    }

    // A cordoned worker takes no new Machines: with w1 and w2 cordoned, creates land on w3.
    for name in ["w1", "w2"] {
        let (status, body) =
            cluster.call(Method::POST, &format!("/v1/workers/{name}/cordon"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["cordoned"], true);
    }
    let mut on_w3 = Vec::new();
    for _ in 0..3 {
        let (status, body) = cluster.create(sleeper(json!({"skip_launch": true,
            "config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
                       "guest": {"cpus": 2, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"}}})));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["worker"], "w3",
            "cordoned workers take no new machines: {body}"
        );
        on_w3.push(serde_json::from_value::<Machine>(body).expect("machine"));
    }
    // w3 has 4 CPUs: two 2-CPU Machines fill it, and a third pinned there cannot start.
    for machine in &on_w3[..2] {
        let (status, body) = cluster.call(
            Method::POST,
            &format!("/v1/apps/fleet/machines/{}/start", machine.id),
            None,
        );
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{}/start", on_w3[2].id),
        None,
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "insufficient_capacity");
    assert_eq!(body["worker"], "w3", "{body}");
    assert_eq!(body["missing"], json!(["cpus"]), "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|message| message.contains("w3")),
        "{body}"
    );
    assert!(body["retry_after_ms"].is_u64(), "{body}");

    // Start never places again: w1 is cordoned, yet a Machine pinned there starts there.
    let pinned_to_w1 = machines
        .iter()
        .find(|machine| machine.worker.as_deref() == Some("w1"))
        .cloned()
        .expect("one on w1");
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{}/start", pinned_to_w1.id),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["machine"]["worker"], "w1");
    for name in ["w1", "w2"] {
        cluster.call(Method::POST, &format!("/v1/workers/{name}/uncordon"), None);
    }

    // A killed agent: its Machines answer worker_unavailable and show as unreachable;
    // others are unaffected; after a restart they come back, still pinned and running.
    let running_on_w3 = on_w3[0].id.clone();
    cluster.agent("w3").process.kill();
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{running_on_w3}/stop"),
        None,
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "worker_unavailable");
    assert_eq!(body["worker"], "w3", "{body}");
    let seen = cluster.machine(&running_on_w3);
    assert_eq!(seen.worker_status, Some(MachineWorkerStatus::Unreachable));
    assert_eq!(seen.state, MachineState::Started, "the last known state");
    let (status, body) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{}", pinned_to_w1.id),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["worker_status"], "ok");
    cluster.wait_for("w3 to be marked unreachable", || {
        cluster
            .workers()
            .iter()
            .any(|worker| worker.name == "w3" && worker.status == WorkerStatus::Unreachable)
    });
    // The doctor still checks the other workers, and fails for the one it could not.
    let doctor = Command::new(BERTH)
        .args(["doctor", "--json"])
        .env("BERTH_API_URL", &cluster.api_url)
        .env("BERTH_TOKEN", &cluster.token)
        .output()
        .expect("doctor");
    let stderr = String::from_utf8_lossy(&doctor.stderr);
    assert!(!doctor.status.success(), "doctor passed with w3 down");
    assert!(stderr.contains("worker w3: not checked"), "{stderr}");
    let reports: Vec<DoctorReport> = serde_json::from_slice(&doctor.stdout).expect("reports");
    let mut checked: Vec<&str> = reports
        .iter()
        .map(|report| report.worker.as_str())
        .collect();
    checked.sort_unstable();
    assert_eq!(checked, ["w1", "w2"], "{stderr}");
    assert!(
        reports.iter().all(|report| report.findings.is_empty()),
        "{reports:#?}"
    );
    cluster.restart_agent("w3");
    cluster.wait_for("w3 to be ready again", || {
        cluster
            .workers()
            .iter()
            .any(|worker| worker.name == "w3" && worker.status == WorkerStatus::Ready)
    });
    cluster.wait_for("the control plane to reach w3's machines again", || {
        cluster.machine(&running_on_w3).worker_status == Some(MachineWorkerStatus::Ok)
    });
    let back = cluster.machine(&running_on_w3);
    assert_eq!(
        (back.state, back.worker.as_deref()),
        (MachineState::Started, Some("w3")),
        "still pinned and still running after the agent restarted"
    );
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{running_on_w3}/stop"),
        None,
    );
    assert_eq!(status, 200, "{body}");

    // A remote Machine that exits by itself: the agent's notice reaches the control plane
    // (over the restarted agent's new notice stream), so wait returns without polling.
    let (status, body) = cluster.create(json!({"config": {"image": "demo/busybox:1",
        "init": {"cmd": ["sh", "-c", "sleep 1; exit 3"]}, "restart": {"policy": "no"},
        "guest": {"cpus": 1, "memory_mb": 64}}}));
    assert_eq!(status, 200, "{body}");
    let exits = body["id"].as_str().expect("id").to_owned();
    let (status, body) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{exits}/wait?state=stopped&timeout=30"),
        None,
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.logs());
    assert_eq!(body["ok"], true, "{body}");
    let (status, body) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{exits}/events"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.to_string().contains("\"exit_code\":3"),
        "the exit is recorded: {body}"
    );
    cluster.teardown();
}

/// One client's keyed creates, retried with the same key across connection failures and
/// 5xx answers (the control plane may be dead or just restarted). Answers the ids.
fn keyed_creates(api_url: &str, token: &str, client: usize, count: usize) -> Vec<String> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut ids = Vec::new();
    for n in 0..count {
        let key = format!("client-{client}-create-{n}");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            assert!(Instant::now() < deadline, "create {key} never succeeded");
            let response = http
                .post(format!("{api_url}/v1/apps/fleet/machines"))
                .bearer_auth(token)
                .header("Idempotency-Key", &key)
                .json(&sleeper(json!({})))
                .send();
            match response {
                Ok(response) if response.status().is_success() => {
                    let machine: Machine = response.json().expect("machine");
                    assert_eq!(machine.state, MachineState::Started, "{key}: {machine:?}");
                    ids.push(machine.id);
                    break;
                }
                // Every refusal is a clean JSON error; only these are worth retrying.
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body: Value = response.json().expect("a JSON error body");
                    assert!(body["error"].is_string(), "{status} {body}");
                    assert!(
                        status >= 500 || status == 409 || status == 429,
                        "{key}: {status} {body}"
                    );
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    ids
}

#[test]
fn a_control_plane_killed_alone_mid_creates_recovers_one_view_with_its_agents() {
    let mut cluster = Cluster::start(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let layout = tempfile::tempdir().expect("tempdir");
    busybox_image()
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
    let (status, body) = cluster.call(Method::POST, "/v1/apps", Some(json!({"app_name": "fleet"})));
    assert_eq!(status, 201, "{body}");

    // Three clients create (and so start) Machines while the control plane is SIGKILLed
    // twice and restarted on the same data dir; the agents keep running throughout.
    let clients: Vec<_> = (0..3)
        .map(|client| {
            let (api_url, token) = (cluster.api_url.clone(), cluster.token.clone());
            std::thread::spawn(move || keyed_creates(&api_url, &token, client, 5))
        })
        .collect();
    for pause in [600, 900] {
        std::thread::sleep(Duration::from_millis(pause));
        cluster.restart_server();
    }
    let mut created: Vec<String> = clients
        .into_iter()
        .flat_map(|client| client.join().expect("client thread"))
        .collect();
    created.sort();
    let before = created.len();
    created.dedup();
    assert_eq!(created.len(), before, "two keys answered one Machine");
    assert_eq!(created.len(), 15);

    // Nothing was created twice, and the control plane's view is every agent's view.
    let (status, body) = cluster.call(Method::GET, "/v1/apps/fleet/machines", None);
    assert_eq!(status, 200, "{body}");
    let listed: Vec<Machine> = serde_json::from_value(body).expect("machines");
    let mut listed_ids: Vec<String> = listed.iter().map(|machine| machine.id.clone()).collect();
    listed_ids.sort();
    assert_eq!(
        listed_ids, created,
        "the API lists exactly what the clients created"
    );
    let mut on_agents = Vec::new();
    for agent in &cluster.agents {
        let listen = agent
            .args
            .iter()
            .skip_while(|arg| *arg != "--listen")
            .nth(1)
            .expect("the agent's --listen");
        let machines: Vec<Machine> = cluster
            .http
            .get(format!("http://{listen}/agent/v1/machines?app=fleet"))
            .bearer_auth(&cluster.join_token)
            .send()
            .expect("ask the agent")
            .json()
            .expect("the agent's machines");
        for machine in machines {
            let seen = listed
                .iter()
                .find(|listed| listed.id == machine.id)
                .unwrap_or_else(|| {
                    panic!("{} is on {} but not in the API", machine.id, agent.name)
                });
            assert_eq!(seen.worker.as_deref(), Some(agent.name.as_str()));
            assert_eq!(seen.state, machine.state, "{}", machine.id);
            on_agents.push(machine.id);
        }
    }
    on_agents.sort();
    assert_eq!(on_agents, created, "every agent's Machines, and only those");
    let doctor = Command::new(BERTH)
        .arg("doctor")
        .env("BERTH_API_URL", &cluster.api_url)
        .env("BERTH_TOKEN", &cluster.token)
        .output()
        .expect("doctor");
    assert!(
        doctor.status.success(),
        "doctor: {}{}",
        String::from_utf8_lossy(&doctor.stdout),
        String::from_utf8_lossy(&doctor.stderr)
    );
    cluster.teardown();
}
