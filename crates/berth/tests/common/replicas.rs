//! Two `berth server` replicas on one private PostgreSQL, sharing the admin and join
//! tokens (the same files in each data dir) and a private `docker-registry` (with basic
//! auth) for imported images, and `berth agent`s given both URLs. Replica B starts once
//! the agents have joined through A, so it finds them in the store.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use super::cluster::{free_port, Process};
use super::BERTH;

use super::postgres;

pub struct Replica {
    pub url: String,
    pub args: Vec<String>,
    pub process: Process,
}

pub struct Replicas {
    pub dir: tempfile::TempDir,
    pub database: postgres::Cluster,
    /// Where imports are pushed and agents pull them from (`--image-registry`).
    pub registry: berth_testkit::Registry,
    pub a: Replica,
    pub b: Replica,
    pub agents: Vec<super::cluster::Agent>,
    pub token: String,
    pub http: reqwest::blocking::Client,
}

/// A reply: status, body, and whether it was a replay of a first answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub replayed: bool,
}

fn write_token(dir: &Path, name: &str, token: &str) {
    std::fs::create_dir_all(dir).expect("data dir");
    std::fs::write(dir.join(name), token).expect("token file");
}

impl Replicas {
    /// Two replicas, the agents `names` (8 CPUs, 4 GiB each), busybox imported through
    /// A as `demo/busybox:1` (into the shared registry), and the app `fleet`.
    pub fn start(names: &[&str]) -> Replicas {
        let database = postgres::Cluster::start();
        let url = database.url("postgres");
        let dir = tempfile::Builder::new()
            .prefix("berth-replicas-")
            .tempdir()
            .expect("tempdir");
        let registry = berth_testkit::Registry::start_with_htpasswd("berth", "registry-secret")
            .expect("registry");
        let registry_auth = dir.path().join("registry-auth.json");
        std::fs::write(
            &registry_auth,
            json!({"auths": {registry.host(): {"username": "berth", "password": "registry-secret"}}})
                .to_string(),
        )
        .expect("auth file");
        let shared_registry: Vec<String> = vec![
            "--image-registry".into(),
            registry.host(),
            "--image-registry-auth".into(),
            registry_auth.display().to_string(),
        ];
        let token = format!("berth_{}", hex_token());
        let join = format!("join_{}", hex_token());
        // No idle connections kept: the API closes idle ones, and a request sent on one it
        // has just closed fails without an answer (replica A is alive then).
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let spawn = |name: &str| {
            let data_dir = dir.path().join(name);
            write_token(&data_dir, "admin-token", &token);
            write_token(&data_dir, "join-token", &join);
            let port = free_port();
            let args: Vec<String> = vec![
                "server".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--database".into(),
                url.clone(),
            ]
            .into_iter()
            .chain(shared_registry.iter().cloned())
            .collect();
            let process = Process::spawn(&args, dir.path().join(format!("{name}.log")));
            let replica = Replica {
                url: format!("http://127.0.0.1:{port}"),
                args,
                process,
            };
            wait_healthy(&http, &replica);
            replica
        };
        let a = spawn("server-a");
        let b_port = free_port();
        let b_url = format!("http://127.0.0.1:{b_port}");
        let mut agents = Vec::new();
        for name in names {
            let data_dir = dir.path().join(name);
            let args: Vec<String> = vec![
                "agent".into(),
                "--control-url".into(),
                format!("{},{b_url}", a.url),
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
                "8".into(),
                "--memory-mb".into(),
                "4096".into(),
                "--disk-mb".into(),
                "100000".into(),
            ];
            let process = Process::spawn(&args, dir.path().join(format!("{name}.log")));
            agents.push(super::cluster::Agent {
                name: name.to_string(),
                args,
                data_dir,
                process,
            });
        }
        let mut replicas = Replicas {
            dir,
            database,
            registry,
            b: Replica {
                url: b_url.clone(),
                args: Vec::new(),
                process: Process {
                    child: None,
                    log: std::path::PathBuf::new(),
                },
            },
            a,
            agents,
            token,
            http,
        };
        replicas.wait_for("every worker to join through A", || {
            let (status, body) = replicas.call(&replicas.a.url, Method::GET, "/v1/workers", None);
            status == 200
                && body.as_array().is_some_and(|workers| {
                    workers.len() == names.len()
                        && workers.iter().all(|worker| worker["status"] == "ready")
                })
        });
        // B on the port the agents already know.
        let data_dir = replicas.dir.path().join("server-b");
        write_token(&data_dir, "admin-token", &replicas.token);
        write_token(&data_dir, "join-token", &join);
        let args: Vec<String> = vec![
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{b_port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--database".into(),
            url,
        ]
        .into_iter()
        .chain(shared_registry)
        .collect();
        replicas.b = Replica {
            url: b_url,
            process: Process::spawn(&args, replicas.dir.path().join("server-b.log")),
            args,
        };
        wait_healthy(&replicas.http, &replicas.b);
        let layout = tempfile::tempdir().expect("tempdir");
        super::busybox_image()
            .write_layout(&layout.path().join("img"))
            .expect("layout");
        replicas.import(
            &replicas.a.url,
            &layout.path().join("img"),
            "demo/busybox:1",
        );
        let (status, body) = replicas.call(
            &replicas.a.url,
            Method::POST,
            "/v1/apps",
            Some(json!({"app_name": "fleet"})),
        );
        assert_eq!(status, 201, "{body}");
        replicas
    }

    /// `berth image import DIR --name NAME` through `base`.
    pub fn import(&self, base: &str, layout: &Path, name: &str) {
        let output = Command::new(BERTH)
            .args(["image", "import"])
            .arg(layout)
            .args(["--name", name])
            .env("BERTH_API_URL", base)
            .env("BERTH_TOKEN", &self.token)
            .output()
            .expect("import");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn call(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let reply = self
            .send(base, method, path, &[], body)
            .unwrap_or_else(|error| panic!("{base}{path}: {error}"));
        (reply.status, reply.body)
    }

    /// One request; `Err` when no answer came (the replica is down).
    pub fn send(
        &self,
        base: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Reply, reqwest::Error> {
        let mut request = self
            .http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&self.token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send()?;
        let status = response.status().as_u16();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let text = response.text()?;
        Ok(Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
            replayed,
        })
    }

    pub fn wait_for(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
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
        let mut all = format!(
            "--- replica A\n{}\n--- replica B\n{}",
            self.a.process.log(),
            self.b.process.log()
        );
        for agent in &self.agents {
            all.push_str(&format!("\n--- {}\n{}", agent.name, agent.process.log()));
        }
        all
    }

    /// The doctor's reports for every worker, through `base`, asserting no findings.
    pub fn assert_doctor_clean(&self, base: &str, when: &str) {
        for agent in &self.agents {
            let (status, body) = self.call(
                base,
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

    /// Destroys every Machine through whichever replica answers, then stops everything.
    pub fn teardown(mut self) {
        let base = if self.a.process.child.is_some() {
            self.a.url.clone()
        } else {
            self.b.url.clone()
        };
        let (_, workers) = self.call(&base, Method::GET, "/v1/workers", None);
        let bridges: Vec<String> = workers
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|worker| worker["machine_prefix"].as_str().map(str::to_owned))
            .map(|prefix| berth::platform::bridge_name(&prefix))
            .collect();
        let (_, machines) = self.call(&base, Method::GET, "/v1/apps/fleet/machines", None);
        for machine in machines.as_array().cloned().unwrap_or_default() {
            let id = machine["id"].as_str().unwrap_or_default().to_owned();
            let (status, body) = self.call(
                &base,
                Method::DELETE,
                &format!("/v1/apps/fleet/machines/{id}?kill=true"),
                None,
            );
            assert!(status < 300, "destroy {id}: {status} {body}");
        }
        for agent in &mut self.agents {
            agent.process.kill();
        }
        self.a.process.kill();
        self.b.process.kill();
        for bridge in bridges {
            super::delete_bridge(&bridge);
        }
    }
}

fn wait_healthy(http: &reqwest::blocking::Client, replica: &Replica) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{}/v1/health", replica.url))
        .send()
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "replica {} did not start: {}",
            replica.url,
            replica.process.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hex_token() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
