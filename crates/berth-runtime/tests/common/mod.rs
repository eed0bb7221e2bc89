//! Test fixtures: a busybox image layer, a throwaway Machine root and a guard that leaves
//! no mounts, runc containers or directories behind, even when a test fails.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use berth_runtime::runc::{RuncConfig, RuncRuntime};
use berth_runtime::{logs, netns, overlay, BundleSpec, MachineLayout};

pub const RUNC: &str = "/usr/sbin/runc";
pub const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "sleep", "ls", "ps", "hostname", "wc", "id", "mkdir", "touch", "httpd",
    "grep", "tail", "head", "test", "readlink", "true", "false", "dd", "seq", "nc", "wget", "ip",
];
pub const INDEX_HTML: &str = "hello from berth\n";

/// One test's world: a temp dir holding the image layer, the machines root and a runc
/// root of its own.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub lower: PathBuf,
    pub machines: PathBuf,
    pub runc_root: PathBuf,
    pub layout: MachineLayout,
    pub runtime: RuncRuntime,
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
            tmp,
            lower,
            machines,
            runc_root,
            layout,
            runtime: RuncRuntime::new(config),
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
            private_ip: None,
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

    /// Mount points below this fixture's temp dir.
    pub fn mounts(&self) -> Vec<String> {
        mounts_under(self.tmp.path())
    }

    pub fn assert_no_leaks(&self) {
        assert_eq!(self.mounts(), Vec::<String>::new(), "mounts left behind");
        assert_eq!(self.runc_list(), "", "runc containers left behind");
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
    }
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
