//! A harness that runs the real `berth` binary (`berth up`) as root on a temp data dir
//! and a free loopback port, and cleans the host up after itself.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_api::Machine;
use berth_image::build::{busybox_layer, Compression, ImageBuilder, LayerBuilder};
use serde_json::Value;

pub mod cluster;
#[path = "../../../berth-control/tests/common/postgres.rs"]
pub mod postgres;
pub mod replicas;

pub const BERTH: &str = env!("CARGO_BIN_EXE_berth");

pub struct Platform {
    pub data_dir: tempfile::TempDir,
    pub api_url: String,
    /// The wake-on-request proxy of this `berth up`, on its own free port.
    pub proxy_url: String,
    pub token: String,
    process: Option<Child>,
    http: reqwest::blocking::Client,
    /// The worker bridges this platform made, removed at teardown.
    bridges: Vec<String>,
    /// Extra `berth up` flags, kept across reboots.
    up_args: Vec<String>,
    /// The data dir is a filesystem of this platform's own (a size-limited tmpfs, or a
    /// loop-mounted btrfs), unmounted last.
    small_disk: bool,
    /// The image file of a loop-mounted data dir, deleted after it is unmounted.
    _backing: Option<tempfile::TempDir>,
    /// Where its control plane keeps its state, as a URL to read it with.
    pub control_store: String,
}

/// `--database` for a control plane of this run, and the URL to read its store with: a
/// fresh database in this test binary's private PostgreSQL when `BERTH_TEST_DATABASE` is
/// `postgres`, else the SQLite file in `data_dir` (read-only).
pub fn control_database(data_dir: &Path) -> (Vec<String>, String) {
    if !postgres::postgres_selected() {
        let file = data_dir.join("control.db");
        return (Vec::new(), format!("sqlite://{}?mode=ro", file.display()));
    }
    // Its own thread and runtime: callers may be inside an async test.
    let url = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(postgres::fresh_database())
    })
    .join()
    .expect("a fresh database");
    (vec!["--database".to_owned(), url.clone()], url)
}

/// The rows of `sql` (with `$N` placeholders bound to `binds`) in a control plane's store,
/// read on SQLite and PostgreSQL alike.
pub fn control_store_rows<T: Send + 'static>(
    url: &str,
    sql: &str,
    binds: &[&str],
    read: impl Fn(&sqlx::any::AnyRow) -> T + Send + 'static,
) -> Vec<T> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    let binds: Vec<String> = binds.iter().map(|bind| bind.to_string()).collect();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                sqlx::any::install_default_drivers();
                let pool = sqlx::any::AnyPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("open the control store");
                let mut query = sqlx::query(&sql);
                for bind in binds {
                    query = query.bind(bind);
                }
                let rows = query
                    .fetch_all(&pool)
                    .await
                    .expect("query the control store");
                pool.close().await;
                rows.iter().map(read).collect()
            })
    })
    .join()
    .expect("control store query")
}

/// A free loopback port below the kernel's ephemeral range (see the testkit's).
pub fn free_port() -> u16 {
    berth_testkit::free_port().expect("a free loopback port")
}

impl Platform {
    pub fn start() -> Platform {
        Platform::start_with(&[])
    }

    /// `berth up` with extra flags (such as `--registry-auth FILE`).
    pub fn start_with(up_args: &[&str]) -> Platform {
        Platform::start_with_env(up_args, &[])
    }

    /// `berth up` with extra flags and environment (such as `BERTH_FAILPOINTS`).
    pub fn start_with_env(up_args: &[&str], env: &[(&str, &str)]) -> Platform {
        let data_dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("temp data dir");
        let api_url = format!("http://127.0.0.1:{}", free_port());
        let proxy_listen = format!("127.0.0.1:{}", free_port());
        let mut up_args: Vec<String> = up_args.iter().map(|arg| arg.to_string()).collect();
        if !up_args.iter().any(|arg| arg == "--proxy-listen") {
            up_args.extend(["--proxy-listen".to_owned(), proxy_listen.clone()]);
        }
        let (database_args, control_store) = control_database(data_dir.path());
        up_args.extend(database_args);
        let mut platform = Platform {
            data_dir,
            api_url,
            proxy_url: format!("http://{proxy_listen}"),
            token: String::new(),
            process: None,
            bridges: Vec::new(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            up_args,
            small_disk: false,
            _backing: None,
            control_store,
        };
        platform.boot_with_env(env);
        platform
    }

    /// `berth up` whose data dir is a tmpfs of `size` (such as `"32m"`): a disk that fills.
    pub fn start_on_small_disk(size: &str) -> Platform {
        let data_dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("temp data dir");
        nix::mount::mount(
            Some("tmpfs"),
            data_dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount a small tmpfs");
        // Placement reserves 1 GiB per Machine; let the disk itself say when it is full.
        Platform::boot_on_own_fs(data_dir, None, &["--worker-disk-mb", "100000"])
    }

    /// `berth up` on `data_dir`, a filesystem of this platform's own (unmounted last), with
    /// `up_args`; `backing` holds the filesystem's image, if it has one.
    fn boot_on_own_fs(
        data_dir: tempfile::TempDir,
        backing: Option<tempfile::TempDir>,
        up_args: &[&str],
    ) -> Platform {
        let proxy_listen = format!("127.0.0.1:{}", free_port());
        let (database_args, control_store) = control_database(data_dir.path());
        let mut platform = Platform {
            data_dir,
            api_url: format!("http://127.0.0.1:{}", free_port()),
            proxy_url: format!("http://{proxy_listen}"),
            token: String::new(),
            process: None,
            bridges: Vec::new(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            up_args: up_args
                .iter()
                .map(|arg| arg.to_string())
                .chain(["--proxy-listen".into(), proxy_listen])
                .chain(database_args)
                .collect(),
            small_disk: true,
            _backing: backing,
            control_store,
        };
        platform.boot();
        platform
    }

    /// `berth up` whose data dir is a btrfs filesystem on a loop device (`size`, such as
    /// `"2G"`, sparse) with quotas enabled: each Machine's disk is a subvolume, with a
    /// quota, and can be checkpointed.
    pub fn start_on_btrfs(size: &str, up_args: &[&str]) -> Platform {
        let data_dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("temp data dir");
        let backing = tempfile::Builder::new()
            .prefix("berth-e2e-img-")
            .tempdir()
            .expect("temp image dir");
        let image = backing.path().join("data.img");
        let run = |command: &mut Command| {
            let out = command.output().expect("run");
            assert!(
                out.status.success(),
                "{command:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("truncate").args(["-s", size]).arg(&image));
        run(Command::new("mkfs.btrfs").arg("-q").arg(&image));
        // `-o loop` attaches the device with autoclear: it goes with the last unmount.
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(data_dir.path()));
        run(Command::new("btrfs")
            .args(["quota", "enable"])
            .arg(data_dir.path()));
        Platform::boot_on_own_fs(data_dir, Some(backing), up_args)
    }

    /// Starts `berth up` on the same data dir and port, and waits for health and the token.
    pub fn boot(&mut self) {
        self.boot_with_env(&[]);
    }

    /// Waits for a `berth up` that is expected to die by itself (a failpoint).
    pub fn wait_exit(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.wait();
        }
    }

    pub fn boot_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.process.is_none(), "already running");
        let listen = self.api_url.trim_start_matches("http://").to_owned();
        let log =
            std::fs::File::create(self.data_dir.path().join("berth-up.log")).expect("log file");
        let child = Command::new(BERTH)
            .args(["up", "--data-dir"])
            .arg(self.data_dir.path())
            .args(["--api-listen", &listen])
            .args(&self.up_args)
            .env("BERTH_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn berth up");
        self.process = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = self.http.get(format!("{}/v1/health", self.api_url)).send() {
                if response.status().is_success() {
                    break;
                }
            }
            if let Some(child) = self.process.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("berth up exited with {status}: {}", self.server_log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "berth up did not become healthy: {}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.token = std::fs::read_to_string(self.data_dir.path().join("admin-token"))
            .expect("admin token file")
            .trim()
            .to_owned();
        let (_, workers) = self.call(reqwest::Method::GET, "/v1/workers", None);
        for worker in workers.as_array().cloned().unwrap_or_default() {
            if let Some(prefix) = worker["machine_prefix"].as_str() {
                let bridge = berth::platform::bridge_name(prefix);
                if !self.bridges.contains(&bridge) {
                    self.bridges.push(bridge);
                }
            }
        }
    }

    /// SIGTERM, like an operator's Ctrl-C, then wait for a clean exit.
    pub fn shutdown(&mut self) {
        if let Some(mut child) = self.process.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.success(),
                        "berth up exited with {status}: {}",
                        self.server_log()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("berth up did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// kill -9, like a crash.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The pid of the running `berth up`, for killing it from another thread.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("berth-up.log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BERTH)
            .args(args)
            .env("BERTH_API_URL", &self.api_url)
            .env("BERTH_TOKEN", &self.token)
            .output()
            .expect("run berth")
    }

    /// Runs the CLI and insists it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "berth {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.api_url))
            .bearer_auth(&self.token)
    }

    /// Sends a JSON request; returns status and parsed body (Null when empty).
    pub fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().expect("send request");
        let status = response.status().as_u16();
        let text = response.text().expect("response body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub fn machine(&self, app: &str, id: &str) -> Machine {
        let (status, body) = self.call(
            reqwest::Method::GET,
            &format!("/v1/apps/{app}/machines/{id}"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("machine json")
    }

    pub fn logs(&self, app: &str, id: &str) -> String {
        let response = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/apps/{app}/machines/{id}/logs"),
            )
            .send()
            .expect("logs");
        assert_eq!(response.status().as_u16(), 200);
        response.text().expect("logs text")
    }

    /// Polls until `check` holds, up to `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Imports an image built in code, through the CLI.
    pub fn import(&self, image: ImageBuilder, name: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = dir.path().join("layout");
        image.write_layout(&layout).expect("write layout");
        self.cli_ok(&[
            "image",
            "import",
            layout.to_str().expect("utf-8"),
            "--name",
            name,
        ])
    }

    pub fn runc_root(&self) -> PathBuf {
        self.data_dir.path().join("worker/runc")
    }
}

pub fn busybox_image() -> ImageBuilder {
    ImageBuilder::new().layer(
        busybox_layer(Path::new("/bin/busybox")).expect("busybox layer"),
        Compression::Gzip,
    )
}

/// busybox plus one more layer holding `files`.
pub fn busybox_image_with(files: &[(&str, &str)]) -> ImageBuilder {
    let mut extra = LayerBuilder::new();
    for (path, contents) in files {
        extra = extra.file(path, contents.as_bytes(), 0o644);
    }
    busybox_image().layer(extra, Compression::Gzip)
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
        .filter(|mount_point| mount_point.starts_with(&prefix))
        .collect()
}

fn runc_containers(root: &Path) -> Vec<String> {
    let output = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "-q"])
        .output();
    match output {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect(),
        Err(_) => Vec::new(),
    }
}

impl Platform {
    /// Destroys every app (and so every Machine) through the API, stops `berth up`, and
    /// asserts the host holds nothing of this platform any more.
    pub fn teardown(mut self) {
        if self.process.is_some() {
            let (_, apps) = self.call(reqwest::Method::GET, "/v1/apps", None);
            for app in apps["apps"].as_array().cloned().unwrap_or_default() {
                let name = app["name"].as_str().unwrap_or_default().to_owned();
                let (status, body) =
                    self.call(reqwest::Method::DELETE, &format!("/v1/apps/{name}"), None);
                assert!(status < 300, "destroy app {name}: {status} {body}");
            }
            self.shutdown();
        }
        let data_dir = self.data_dir.path().to_string_lossy().into_owned();
        let mounts: Vec<String> = mounts_under(self.data_dir.path())
            .into_iter()
            .filter(|mount| !(self.small_disk && *mount == data_dir))
            .collect();
        let containers = runc_containers(&self.runc_root());
        self.force_clean();
        assert!(
            mounts.is_empty(),
            "mounts left behind: {mounts:?}\n{}",
            self.server_log()
        );
        assert!(
            containers.is_empty(),
            "runc containers left behind: {containers:?}"
        );
    }

    /// Last-resort cleanup so a failing test does not leak into the next one.
    fn force_clean(&mut self) {
        self.crash();
        for id in runc_containers(&self.runc_root()) {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(self.runc_root())
                .args(["delete", "--force", &id])
                .status();
        }
        let mut mounts = mounts_under(self.data_dir.path());
        mounts.sort_by_key(|mount| std::cmp::Reverse(mount.len()));
        for mount in mounts {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for bridge in &self.bridges {
            delete_bridge(bridge);
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.force_clean();
    }
}

/// Deletes a worker bridge and its nftables filter tables (which outlive the link).
pub fn delete_bridge(bridge: &str) {
    let _ = Command::new("ip")
        .args(["link", "delete", bridge])
        .stderr(Stdio::null())
        .status();
    let suffix: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    for table in [
        ["bridge".to_owned(), format!("berth_isolate_{suffix}")],
        ["inet".to_owned(), format!("berth_host_{suffix}")],
    ] {
        let _ = Command::new("nft")
            .args(["delete", "table"])
            .args(&table)
            .stderr(Stdio::null())
            .status();
    }
}
