//! Test fixtures: a busybox image layer, a throwaway Machine root and a guard that leaves
//! no mounts, runc containers or directories behind, even when a test fails.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use berth_runtime::gvisor::{GvisorConfig, GvisorRuntime};
use berth_runtime::native::cgroup::CgroupRoots;
use berth_runtime::native::{NativeConfig, NativeRuntime};
use berth_runtime::runc::{RuncConfig, RuncRuntime};
use berth_runtime::{logs, netns, overlay, BundleSpec, MachineLayout, Runtime};

pub const RUNC: &str = "/usr/sbin/runc";
pub const RUNSC: &str = "/usr/bin/runsc";
pub const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "sleep", "ls", "ps", "hostname", "wc", "id", "mkdir", "touch", "httpd",
    "grep", "tail", "head", "test", "readlink", "true", "false", "dd", "seq", "nc", "wget", "ip",
    "unshare", "mount",
];
pub const INDEX_HTML: &str = "hello from berth\n";

/// Which driver a test runs against; the isolation suite runs against all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Runc,
    Native,
    Gvisor,
}

impl Driver {
    /// The driver a helper process was told to use.
    pub fn from_env() -> Driver {
        match std::env::var("BERTH_HELPER_DRIVER").as_deref() {
            Ok("native") => Driver::Native,
            Ok("gvisor") => Driver::Gvisor,
            _ => Driver::Runc,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::Runc => "runc",
            Driver::Native => "native",
            Driver::Gvisor => "gvisor",
        }
    }

    /// Whether a runc-like program (runc, runsc) mounts the rootfs on the host and keeps
    /// container state under its root.
    pub fn has_container_state(self) -> bool {
        matches!(self, Driver::Runc | Driver::Gvisor)
    }
}

/// Whether the gVisor tests can run here: runsc is installed. Without it they say why
/// and pass, unless `BERTH_REQUIRE_RUNSC` is set (CI installs runsc), where its absence
/// fails them.
pub fn runsc_available() -> bool {
    if Path::new(RUNSC).exists() {
        return true;
    }
    assert!(
        std::env::var_os("BERTH_REQUIRE_RUNSC").is_none(),
        "BERTH_REQUIRE_RUNSC is set but {RUNSC} is missing"
    );
    eprintln!("SKIPPED: {RUNSC} is not installed (Debian's runsc package); not a gVisor test run");
    false
}

/// The runtime of `driver`, configured like `config` (native and gvisor take its shim,
/// log cap, start timeout and network).
pub fn make_runtime(driver: Driver, config: &RuncConfig) -> Arc<dyn Runtime> {
    match driver {
        Driver::Runc => Arc::new(RuncRuntime::new(config.clone())),
        Driver::Native => Arc::new(NativeRuntime::new(native_config(config)).unwrap()),
        Driver::Gvisor => Arc::new(GvisorRuntime::new(gvisor_config(config)).unwrap()),
    }
}

/// runsc's root and init file next to the fixture's runc root.
pub fn gvisor_config(config: &RuncConfig) -> GvisorConfig {
    let dir = config.runc_root.parent().unwrap_or(Path::new("/"));
    let mut gvisor = GvisorConfig::new(config.shim_command.clone());
    gvisor.runsc_binary = RUNSC.into();
    gvisor.runsc_root = dir.join("runsc");
    gvisor.init_path = dir.join("gvisor-init").join("berth-init");
    gvisor.log_max_bytes = config.log_max_bytes;
    gvisor.start_timeout = config.start_timeout;
    gvisor.host.network = config.host.network.clone();
    // runsc's own debug logs, for a failure inside the sandbox.
    gvisor.debug_log_dir = std::env::var_os("BERTH_TEST_RUNSC_DEBUG").map(PathBuf::from);
    gvisor
}

pub fn native_config(config: &RuncConfig) -> NativeConfig {
    let state_dir = config
        .runc_root
        .parent()
        .unwrap_or(Path::new("/"))
        .join("native");
    let mut native = NativeConfig::new(config.shim_command.clone(), state_dir);
    native.log_max_bytes = config.log_max_bytes;
    native.start_timeout = config.start_timeout;
    native.host.network = config.host.network.clone();
    native
}

/// One test's world: a temp dir holding the image layer, the machines root and a runc
/// root of its own.
pub struct Fixture {
    pub driver: Driver,
    /// The runc driver's configuration, also the source of the native one's.
    pub config: RuncConfig,
    pub tmp: tempfile::TempDir,
    pub lower: PathBuf,
    pub machines: PathBuf,
    pub runc_root: PathBuf,
    pub layout: MachineLayout,
    pub runtime: Arc<dyn Runtime>,
    /// More Machines of the same worker, cleaned up like `layout`.
    extra: std::sync::Mutex<Vec<MachineLayout>>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A machine id unique across tests and test processes.
pub fn unique_id(name: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("t{}-{n}-{name}", std::process::id())
}

impl Fixture {
    pub fn new(name: &str) -> Fixture {
        Fixture::with_config(name, |_| {})
    }

    pub fn with_config(name: &str, tweak: impl FnOnce(&mut RuncConfig)) -> Fixture {
        Fixture::of_with_config(Driver::Runc, name, tweak)
    }

    pub fn of(driver: Driver, name: &str) -> Fixture {
        Fixture::of_with_config(driver, name, |_| {})
    }

    pub fn of_with_config(
        driver: Driver,
        name: &str,
        tweak: impl FnOnce(&mut RuncConfig),
    ) -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("berth-rt-")
            .tempdir()
            .unwrap();
        let lower = tmp.path().join("lower");
        build_lowerdir(&lower);
        let machines = tmp.path().join("machines");
        let runc_root = tmp.path().join("runc");
        fs::create_dir_all(&machines).unwrap();
        let mut config = runtime_config(&runc_root);
        tweak(&mut config);
        let layout = MachineLayout::new(&machines, &unique_id(name));
        Fixture {
            driver,
            runtime: make_runtime(driver, &config),
            config,
            tmp,
            lower,
            machines,
            runc_root,
            layout,
            extra: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Another Machine next to `layout`, with the same runtime and cleanup.
    pub fn another_layout(&self, name: &str) -> MachineLayout {
        let layout = MachineLayout::new(&self.machines, &unique_id(name));
        self.extra.lock().unwrap().push(layout.clone());
        layout
    }

    /// `spec` for any Machine of this fixture.
    pub fn spec_for(&self, layout: &MachineLayout, args: &[&str]) -> BundleSpec {
        BundleSpec {
            machine_id: layout.id.clone(),
            ..self.spec(args)
        }
    }

    pub fn logs_of(&self, layout: &MachineLayout) -> String {
        String::from_utf8_lossy(&logs::read_logs(layout, 1 << 20).unwrap()).into_owned()
    }

    /// Waits until the logs of `layout` contain `needle`; returns them.
    pub fn wait_logs_of(&self, layout: &MachineLayout, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs_of(layout);
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} in logs of {}:\n{logs}",
                layout.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn id(&self) -> &str {
        &self.layout.id
    }

    pub fn spec(&self, args: &[&str]) -> BundleSpec {
        BundleSpec {
            machine_id: self.layout.id.clone(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: vec!["GREETING=hi".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            cpus: 1,
            memory_mb: 64,
            pids_limit: 50,
            disk_mb: None,
            private_ip: None,
            org: None,
            net_raw: false,
            volumes: Vec::new(),
        }
    }

    pub fn lowerdirs(&self) -> Vec<PathBuf> {
        vec![self.lower.clone()]
    }

    pub fn logs(&self) -> String {
        self.logs_of(&self.layout)
    }

    /// Waits until the logs contain `needle`; returns them.
    pub fn wait_logs(&self, needle: &str, timeout: Duration) -> String {
        self.wait_logs_of(&self.layout, needle, timeout)
    }

    /// Containers runc knows about under this fixture's root.
    pub fn runc_list(&self) -> String {
        let out = Command::new(RUNC)
            .arg("--root")
            .arg(&self.runc_root)
            .args(["list", "-q"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "runc list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Sandboxes runsc knows about under this fixture's root (empty without runsc).
    pub fn runsc_list(&self) -> String {
        let root = self.runc_root.parent().unwrap().join("runsc");
        if !root.exists() {
            return String::new();
        }
        let out = Command::new(RUNSC)
            .arg("--root")
            .arg(&root)
            .args(["list", "--quiet"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "runsc list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Mount points below this fixture's temp dir.
    pub fn mounts(&self) -> Vec<String> {
        mounts_under(self.tmp.path())
    }

    pub fn assert_no_leaks(&self) {
        assert_eq!(self.mounts(), Vec::<String>::new(), "mounts left behind");
        assert_eq!(self.runc_list(), "", "runc containers left behind");
        assert_eq!(self.runsc_list(), "", "runsc sandboxes left behind");
    }

    /// runc (or runsc) knows the Machine while its container exists; the native driver
    /// never uses either, so for it the lists are always empty.
    pub fn assert_runc_lists(&self, listed: bool) {
        let expected = |driver| {
            if listed && self.driver == driver {
                self.id()
            } else {
                ""
            }
        };
        assert_eq!(self.runc_list(), expected(Driver::Runc));
        assert_eq!(self.runsc_list(), expected(Driver::Gvisor));
    }

    /// runc and runsc mount the rootfs on the host while a container exists; the native
    /// driver mounts it only inside the Machine's own mount namespace.
    pub fn assert_rootfs_on_host(&self, mounted: bool) {
        let expected = mounted && self.driver.has_container_state();
        assert_eq!(
            overlay::is_mount_point(&self.layout.rootfs()).unwrap(),
            expected,
            "rootfs mounted on the host ({:?})",
            self.driver
        );
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Kill and delete whatever the test left, without trusting the code under test.
        let mut layouts = vec![self.layout.clone()];
        if let Ok(extra) = self.extra.lock() {
            layouts.extend(extra.iter().cloned());
        }
        for layout in &layouts {
            self.kill_and_unmount(layout);
        }
        for m in mounts_under(self.tmp.path()).iter().rev() {
            let _ = overlay::unmount(Path::new(m));
        }
        // TempDir removes the files once nothing is mounted below it.
    }
}

impl Fixture {
    fn kill_and_unmount(&self, layout: &MachineLayout) {
        let _ = Command::new(RUNC)
            .arg("--root")
            .arg(&self.runc_root)
            .args(["delete", "--force", &layout.id])
            .output();
        if self.driver == Driver::Gvisor {
            let _ = Command::new(RUNSC)
                .arg("--root")
                .arg(self.runc_root.parent().unwrap().join("runsc"))
                .args(["delete", "--force", &layout.id])
                .output();
        }
        // A native Machine's init is not the fixture's runc's: kill it (and with it its
        // pid namespace) by its pid file, then its cgroups can go.
        if let Ok(text) = fs::read_to_string(layout.run_dir().join("init.pid")) {
            if let (Ok(pid), Ok(shim)) = (
                text.trim().parse::<i32>(),
                fs::read_to_string(layout.run_dir().join("shim.pid")),
            ) {
                let shim_pid = shim.split_whitespace().next().unwrap_or("");
                if self.driver != Driver::Runc && proc_ppid(pid).as_deref() == Some(shim_pid) {
                    // SAFETY: plain kill(2) of the Machine init (or sandbox) this fixture
                    // started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Ok(text) = fs::read_to_string(layout.run_dir().join("shim.pid")) {
            if let Some(pid) = text
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
            {
                let start = text.split_whitespace().nth(1).unwrap_or("");
                if proc_start_time(pid).as_deref() == Some(start) {
                    // SAFETY: plain kill(2) of the shim this fixture started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = overlay::unmount(&layout.rootfs());
        let _ = netns::remove(&layout.netns());
        if self.driver == Driver::Native {
            if let Ok(roots) = CgroupRoots::discover() {
                for _ in 0..50 {
                    if roots.remove(&layout.id).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat[stat.rfind(')').unwrap() + 1..]
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn proc_ppid(pid: i32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1).map(str::to_owned)
}

fn proc_start_time(pid: i32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_owned)
}

pub fn runtime_config(runc_root: &Path) -> RuncConfig {
    // BERTH_TEST_SHIM (space separated) runs the suite against another shim entry point,
    // e.g. "/path/to/berth shim".
    let shim = match std::env::var("BERTH_TEST_SHIM") {
        Ok(cmd) => cmd.split_whitespace().map(Into::into).collect(),
        Err(_) => vec![env!("CARGO_BIN_EXE_berth-shim").into()],
    };
    let mut config = RuncConfig::new(shim);
    config.runc_binary = RUNC.into();
    config.runc_root = runc_root.to_path_buf();
    config.start_timeout = Duration::from_secs(20);
    config
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    overlay::mount_points(&info)
        .filter(|p| Path::new(p).starts_with(&dir))
        .collect()
}

/// A one-layer image: static busybox with applet links and the usual empty dirs.
pub fn build_lowerdir(lower: &Path) {
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "www", "root"] {
        fs::create_dir_all(lower.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", lower.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        symlink("busybox", lower.join("bin").join(applet)).unwrap();
    }
    fs::write(lower.join("www/index.html"), INDEX_HTML).unwrap();
    fs::write(lower.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(lower.join("etc/group"), "root:x:0:\n").unwrap();
}

/// Deletes host links by name, without trusting the code under test: plain rtnetlink on
/// a runtime of its own, on a thread of its own (callable from a Drop in async tests).
pub fn delete_links(names: Vec<String>) {
    use futures::TryStreamExt;
    let bridges: Vec<String> = names
        .iter()
        .filter(|name| name.starts_with("bz"))
        .cloned()
        .collect();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(connection);
            for name in names.iter().rev() {
                let found = handle
                    .link()
                    .get()
                    .match_name(name.clone())
                    .execute()
                    .try_next()
                    .await;
                if let Ok(Some(link)) = found {
                    let _ = handle.link().del(link.header.index).execute().await;
                }
            }
        });
    })
    .join();
    // A worker bridge's filter tables outlive its link (the network's teardown deletes
    // both; tests that drop only the link delete them here).
    for bridge in &bridges {
        for (family, table) in [("bridge", "berth_isolate"), ("inet", "berth_host")] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", family, &format!("{table}_{bridge}")])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Runs each named `async fn(Driver)` under gVisor, as `gvisor::name`, or says why it
/// cannot (no runsc).
#[macro_export]
macro_rules! gvisor_driver {
    ($($case:ident),* $(,)?) => {
        mod gvisor {
            $(
                #[tokio::test]
                async fn $case() {
                    if super::common::runsc_available() {
                        super::$case(super::Driver::Gvisor).await
                    }
                }
            )*
        }
    };
}

/// Runs each named `async fn(Driver)` once per driver, as `runc::name` and `native::name`.
#[macro_export]
macro_rules! both_drivers {
    ($($case:ident),* $(,)?) => {
        mod runc {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Driver::Runc).await
                }
            )*
        }
        mod native {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Driver::Native).await
                }
            )*
        }
    };
}
