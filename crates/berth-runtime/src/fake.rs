//! An in-memory [`Runtime`] for the agent's unit tests.
//!
//! It records every call as a string (`"prepare m1"`, `"start m1"`, `"signal m1 15"`, ...),
//! can be told to fail the next start, and lets a test end a running Machine with an exit
//! code, which wakes `wait_exit`. SIGKILL always ends a running Machine; SIGTERM and
//! SIGINT do too unless [`FakeRuntime::set_ignore_term`] is on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use std::sync::Arc;

use tokio::sync::{watch, Mutex, OwnedRwLockWriteGuard, RwLock};

use crate::exec::{CappedBuffer, ExecOutput, ExecSpec};
use crate::{util, BundleSpec, ExitRecord, MachineLayout, Runtime, RuntimeError, Started, Status};

#[derive(Debug)]
pub struct FakeRuntime {
    state: Mutex<FakeState>,
    /// Bumped on every Machine state change; `wait_exit` watches it.
    changed: watch::Sender<u64>,
    /// Every prepare takes it for reading: a test holding it for writing keeps creates
    /// in the middle.
    prepares: Arc<RwLock<()>>,
}

#[derive(Debug, Default)]
struct FakeState {
    calls: Vec<String>,
    fail_next_start: Option<String>,
    fail_next_cleanup: Option<String>,
    ignore_term: bool,
    next_pid: u32,
    machines: HashMap<String, FakeMachine>,
    disk_usage: HashMap<String, crate::quota::DiskUsage>,
    /// Each volume's size in bytes and whether it is mounted.
    volumes: HashMap<String, (u64, bool)>,
}

#[derive(Debug, Clone)]
struct FakeMachine {
    spec: Option<BundleSpec>,
    lowerdirs: Vec<PathBuf>,
    status: Status,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        FakeRuntime::new()
    }
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        FakeRuntime {
            state: Mutex::new(FakeState {
                next_pid: 1000,
                ..FakeState::default()
            }),
            changed: watch::channel(0).0,
            prepares: Arc::default(),
        }
    }

    /// Holds every prepare (so every create) at its start until the guard drops.
    pub async fn hold_prepares(&self) -> OwnedRwLockWriteGuard<()> {
        self.prepares.clone().write_owned().await
    }

    /// Every call so far, oldest first.
    pub async fn calls(&self) -> Vec<String> {
        self.state.lock().await.calls.clone()
    }

    pub async fn clear_calls(&self) {
        self.state.lock().await.calls.clear();
    }

    /// The next start fails with a start error carrying `message`.
    pub async fn fail_next_start(&self, message: impl Into<String>) {
        self.state.lock().await.fail_next_start = Some(message.into());
    }

    /// The next cleanup fails with a cleanup error carrying `message` (after the
    /// Machine's process is gone): an operation that fails halfway.
    pub async fn fail_next_cleanup(&self, message: impl Into<String>) {
        self.state.lock().await.fail_next_cleanup = Some(message.into());
    }

    /// When on, SIGTERM and SIGINT are recorded but do not end the Machine.
    pub async fn set_ignore_term(&self, ignore: bool) {
        self.state.lock().await.ignore_term = ignore;
    }

    /// Ends a running Machine with `code`. Returns false if it was not running.
    pub async fn exit(&self, id: &str, code: i32) -> bool {
        self.finish(id, Some(code), None, false).await
    }

    /// Ends a running Machine as if the kernel's OOM killer had killed it.
    pub async fn oom_kill(&self, id: &str) -> bool {
        self.finish(id, None, Some(libc::SIGKILL), true).await
    }

    /// The spec last given to prepare.
    pub async fn spec(&self, id: &str) -> Option<BundleSpec> {
        self.state
            .lock()
            .await
            .machines
            .get(id)
            .and_then(|m| m.spec.clone())
    }

    /// The lowerdirs of the last start.
    pub async fn lowerdirs(&self, id: &str) -> Option<Vec<PathBuf>> {
        self.state
            .lock()
            .await
            .machines
            .get(id)
            .map(|m| m.lowerdirs.clone())
    }

    /// What [`Runtime::disk_usage`] answers for the Machine from now on.
    pub async fn set_disk_usage(&self, id: &str, usage: crate::quota::DiskUsage) {
        self.state
            .lock()
            .await
            .disk_usage
            .insert(id.to_owned(), usage);
    }

    /// A volume's size in bytes, while it exists.
    pub async fn volume_size(&self, id: &str) -> Option<u64> {
        self.state
            .lock()
            .await
            .volumes
            .get(id)
            .map(|(size, _)| *size)
    }

    /// Forgets that a volume is mounted, as a host restart would.
    pub async fn unmount_volume(&self, id: &str) {
        if let Some(volume) = self.state.lock().await.volumes.get_mut(id) {
            volume.1 = false;
        }
    }

    /// Whether the Machine exists (prepared and not removed).
    pub async fn exists(&self, id: &str) -> bool {
        self.state.lock().await.machines.contains_key(id)
    }

    async fn finish(&self, id: &str, code: Option<i32>, signal: Option<i32>, oom: bool) -> bool {
        let mut state = self.state.lock().await;
        let ended = match state.machines.get_mut(id) {
            Some(m) if matches!(m.status, Status::Running { .. }) => {
                m.status = Status::Exited(ExitRecord {
                    exit_code: code,
                    signal,
                    oom_killed: oom,
                    exited_at_ms: util::now_ms(),
                });
                true
            }
            _ => false,
        };
        drop(state);
        if ended {
            self.changed.send_modify(|v| *v += 1);
        }
        ended
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn prepare(&self, layout: &MachineLayout, spec: &BundleSpec) -> Result<(), RuntimeError> {
        let _pass = self.prepares.read().await;
        let mut state = self.state.lock().await;
        state.calls.push(format!("prepare {}", layout.id));
        let machine = state
            .machines
            .entry(layout.id.clone())
            .or_insert(FakeMachine {
                spec: None,
                lowerdirs: Vec::new(),
                status: Status::NotRunning,
            });
        machine.spec = Some(spec.clone());
        Ok(())
    }

    async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<Started, RuntimeError> {
        let mut state = self.state.lock().await;
        state.calls.push(format!("start {}", layout.id));
        if let Some(message) = state.fail_next_start.take() {
            return Err(RuntimeError::Start {
                driver: "fake",
                id: layout.id.clone(),
                message,
            });
        }
        let pid = state.next_pid;
        state.next_pid += 2;
        let Some(machine) = state.machines.get_mut(&layout.id) else {
            return Err(RuntimeError::NotPrepared {
                id: layout.id.clone(),
                path: layout.config_json(),
            });
        };
        if matches!(machine.status, Status::Running { .. }) {
            return Err(RuntimeError::Start {
                driver: "fake",
                id: layout.id.clone(),
                message: "machine is already running".into(),
            });
        }
        machine.status = Status::Running { pid };
        machine.lowerdirs = lowerdirs.to_vec();
        drop(state);
        self.changed.send_modify(|v| *v += 1);
        Ok(Started {
            pid,
            shim_pid: pid + 1,
            started_at_ms: util::now_ms(),
            steps: crate::timing::StepTimes::new(),
        })
    }

    async fn signal(&self, layout: &MachineLayout, signal: i32) -> Result<(), RuntimeError> {
        let ignore_term = {
            let mut state = self.state.lock().await;
            state.calls.push(format!("signal {} {signal}", layout.id));
            state.ignore_term
        };
        let ends = signal == libc::SIGKILL
            || (!ignore_term && (signal == libc::SIGTERM || signal == libc::SIGINT));
        if ends {
            self.finish(&layout.id, None, Some(signal), false).await;
        }
        Ok(())
    }

    async fn wait_exit(
        &self,
        layout: &MachineLayout,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitRecord>, RuntimeError> {
        let mut changes = self.changed.subscribe();
        let wait = async {
            loop {
                {
                    let state = self.state.lock().await;
                    match state.machines.get(&layout.id).map(|m| m.status) {
                        Some(Status::Exited(record)) => return record,
                        Some(Status::Running { .. }) => {}
                        // Like the real runtime: nothing to wait for is an unknown exit.
                        Some(Status::NotRunning) | None => {
                            return ExitRecord {
                                exit_code: None,
                                signal: None,
                                oom_killed: false,
                                exited_at_ms: util::now_ms(),
                            }
                        }
                    }
                }
                if changes.changed().await.is_err() {
                    // The sender lives in self, so this cannot happen while self exists.
                    std::future::pending::<()>().await;
                }
            }
        };
        {
            let mut state = self.state.lock().await;
            state.calls.push(format!("wait_exit {}", layout.id));
        }
        match timeout {
            Some(t) => Ok(tokio::time::timeout(t, wait).await.ok()),
            None => Ok(Some(wait.await)),
        }
    }

    async fn cleanup(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().await;
        state.calls.push(format!("cleanup {}", layout.id));
        if let Some(m) = state.machines.get_mut(&layout.id) {
            m.status = Status::NotRunning;
        }
        let failure = state.fail_next_cleanup.take();
        drop(state);
        self.changed.send_modify(|v| *v += 1);
        match failure {
            Some(message) => Err(RuntimeError::Cleanup {
                driver: "fake",
                id: layout.id.clone(),
                message,
            }),
            None => Ok(()),
        }
    }

    async fn disk_usage(
        &self,
        layout: &MachineLayout,
    ) -> Result<Option<crate::quota::DiskUsage>, RuntimeError> {
        Ok(self.state.lock().await.disk_usage.get(&layout.id).copied())
    }

    async fn status(&self, layout: &MachineLayout) -> Result<Status, RuntimeError> {
        let state = self.state.lock().await;
        Ok(state
            .machines
            .get(&layout.id)
            .map_or(Status::NotRunning, |m| m.status))
    }

    /// A running Machine has one process: its command as pid 1.
    async fn processes(
        &self,
        layout: &MachineLayout,
    ) -> Result<Option<Vec<crate::host::procs::MachineProcess>>, RuntimeError> {
        let state = self.state.lock().await;
        let Some(machine) = state.machines.get(&layout.id) else {
            return Ok(None);
        };
        if !matches!(machine.status, Status::Running { .. }) {
            return Ok(None);
        }
        let command = machine
            .spec
            .as_ref()
            .map(|spec| spec.args.join(" "))
            .unwrap_or_default();
        Ok(Some(vec![crate::host::procs::MachineProcess {
            pid: 1,
            command,
            cpu_ms: 0,
            rss_bytes: 0,
            started_at_ms: u64::try_from(util::now_ms()).unwrap_or_default(),
            listening: Vec::new(),
        }]))
    }

    /// A tiny command set: `echo ARGS`, `cat` (stdin back), `sleep SECONDS`, `exit CODE`,
    /// `yes` (endless output, cut by the cap); anything else exits 127.
    async fn exec(
        &self,
        layout: &MachineLayout,
        spec: &ExecSpec,
    ) -> Result<ExecOutput, RuntimeError> {
        {
            let mut state = self.state.lock().await;
            state
                .calls
                .push(format!("exec {} {}", layout.id, spec.cmd.join(" ")));
            let running = state
                .machines
                .get(&layout.id)
                .is_some_and(|m| matches!(m.status, Status::Running { .. }));
            if !running {
                return Err(RuntimeError::NotRunning {
                    id: layout.id.clone(),
                });
            }
        }
        let (program, args) = spec
            .cmd
            .split_first()
            .ok_or_else(|| RuntimeError::InvalidSpec {
                id: layout.id.clone(),
                message: "exec needs a command".into(),
            })?;
        let mut stdout = CappedBuffer::default();
        let mut stderr = CappedBuffer::default();
        let cap = spec.max_output_bytes;
        let mut exit_code = Some(0);
        match program.as_str() {
            "echo" => stdout.push(format!("{}\n", args.join(" ")).as_bytes(), cap),
            "cat" => stdout.push(spec.stdin.as_deref().unwrap_or_default(), cap),
            "yes" => {
                let line = b"y\n".repeat(cap / 2 + 1);
                stdout.push(&line, cap);
            }
            "sleep" => {
                let seconds: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(0.0);
                let nap = Duration::from_secs_f64(seconds.clamp(0.0, 86_400.0));
                if tokio::time::timeout(spec.timeout, tokio::time::sleep(nap))
                    .await
                    .is_err()
                {
                    return Ok(ExecOutput {
                        exit_code: None,
                        timed_out: true,
                        ..ExecOutput::default()
                    });
                }
            }
            "exit" => exit_code = Some(args.first().and_then(|a| a.parse().ok()).unwrap_or(1)),
            other => {
                stderr.push(format!("{other}: not found\n").as_bytes(), cap);
                exit_code = Some(127);
            }
        }
        Ok(ExecOutput {
            exit_code,
            truncated: stdout.truncated || stderr.truncated,
            stdout: stdout.data,
            stderr: stderr.data,
            timed_out: false,
        })
    }

    async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().await;
        state.calls.push(format!("remove {}", layout.id));
        state.machines.remove(&layout.id);
        drop(state);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    // Volumes are plain directories here (with their image file, so the doctor's view of
    // the host matches), sized in memory.
    async fn volume_create(
        &self,
        layout: &crate::volume::VolumeLayout,
        size_bytes: u64,
        from: Option<PathBuf>,
    ) -> Result<(), RuntimeError> {
        let io = |error| RuntimeError::Io {
            context: format!("create volume {}", layout.id),
            error,
        };
        std::fs::create_dir_all(layout.mount_point()).map_err(io)?;
        match &from {
            Some(snapshot) => std::fs::copy(snapshot, layout.image()).map(|_| ()),
            None => std::fs::write(layout.image(), b""),
        }
        .map_err(io)?;
        let mut state = self.state.lock().await;
        state
            .calls
            .push(format!("volume_create {} {size_bytes}", layout.id));
        state.volumes.insert(layout.id.clone(), (size_bytes, true));
        Ok(())
    }

    async fn volume_fork(
        &self,
        source: &crate::volume::VolumeLayout,
        layout: &crate::volume::VolumeLayout,
        size_bytes: u64,
    ) -> Result<(), RuntimeError> {
        let io = |error| RuntimeError::Io {
            context: format!("fork volume {}", layout.id),
            error,
        };
        std::fs::create_dir_all(layout.mount_point()).map_err(io)?;
        std::fs::copy(source.image(), layout.image()).map_err(io)?;
        let mut state = self.state.lock().await;
        state.calls.push(format!(
            "volume_fork {} {} {size_bytes}",
            source.id, layout.id
        ));
        let size = state
            .volumes
            .get(&source.id)
            .map_or(0, |v| v.0)
            .max(size_bytes);
        state.volumes.insert(layout.id.clone(), (size, true));
        Ok(())
    }

    async fn volume_mount(&self, layout: &crate::volume::VolumeLayout) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().await;
        state.calls.push(format!("volume_mount {}", layout.id));
        // An image that arrived with a moving Machine is this runtime's once mounted.
        if !state.volumes.contains_key(&layout.id) {
            if let Ok(meta) = std::fs::metadata(layout.image()) {
                state.volumes.insert(layout.id.clone(), (meta.len(), false));
            }
        }
        match state.volumes.get_mut(&layout.id) {
            Some(volume) => {
                volume.1 = true;
                Ok(())
            }
            None => Err(RuntimeError::Io {
                context: format!("mount volume {}", layout.id),
                error: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
    }

    async fn volume_release(
        &self,
        layout: &crate::volume::VolumeLayout,
    ) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().await;
        state.calls.push(format!("volume_release {}", layout.id));
        if let Some(volume) = state.volumes.get_mut(&layout.id) {
            volume.1 = false;
        }
        Ok(())
    }

    async fn volume_mounted(
        &self,
        layout: &crate::volume::VolumeLayout,
    ) -> Result<bool, RuntimeError> {
        let state = self.state.lock().await;
        Ok(state.volumes.get(&layout.id).is_some_and(|v| v.1))
    }

    async fn volume_extend(
        &self,
        layout: &crate::volume::VolumeLayout,
        size_bytes: u64,
        _offline_ok: bool,
    ) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().await;
        state
            .calls
            .push(format!("volume_extend {} {size_bytes}", layout.id));
        if let Some(volume) = state.volumes.get_mut(&layout.id) {
            volume.0 = volume.0.max(size_bytes);
        }
        Ok(())
    }

    async fn volume_stats(
        &self,
        layout: &crate::volume::VolumeLayout,
    ) -> Result<crate::volume::VolumeStats, RuntimeError> {
        let state = self.state.lock().await;
        let size = state.volumes.get(&layout.id).map_or(0, |v| v.0);
        Ok(crate::volume::VolumeStats {
            block_size: 4096,
            blocks: size / 4096,
            blocks_free: size / 4096,
            blocks_avail: size / 4096,
        })
    }

    async fn volume_snapshot(
        &self,
        layout: &crate::volume::VolumeLayout,
        to: PathBuf,
    ) -> Result<crate::volume::SnapshotImage, RuntimeError> {
        std::fs::copy(layout.image(), &to).map_err(|error| RuntimeError::Io {
            context: format!("snapshot volume {}", layout.id),
            error,
        })?;
        let mut state = self.state.lock().await;
        state.calls.push(format!("volume_snapshot {}", layout.id));
        Ok(crate::volume::SnapshotImage {
            bytes: 0,
            digest: format!("sha256:{:064x}", 0),
        })
    }

    async fn volume_remove(
        &self,
        layout: &crate::volume::VolumeLayout,
    ) -> Result<(), RuntimeError> {
        match std::fs::remove_dir_all(&layout.dir) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::Io {
                    context: format!("remove volume {}", layout.id),
                    error,
                })
            }
            _ => {}
        }
        let mut state = self.state.lock().await;
        state.calls.push(format!("volume_remove {}", layout.id));
        state.volumes.remove(&layout.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    fn spec(id: &str) -> BundleSpec {
        BundleSpec {
            machine_id: id.into(),
            args: vec!["/bin/app".into()],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            cpus: 1,
            memory_mb: 128,
            pids_limit: 64,
            disk_mb: None,
            private_ip: None,
            org: None,
            net_raw: false,
            volumes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn records_calls_and_exits() {
        let rt = Arc::new(FakeRuntime::new());
        let layout = MachineLayout::new(Path::new("/m"), "m1");
        rt.prepare(&layout, &spec("m1")).await.unwrap();
        let started = rt.start(&layout, &[PathBuf::from("/l")]).await.unwrap();
        assert_eq!(
            rt.status(&layout).await.unwrap(),
            Status::Running { pid: started.pid }
        );
        assert_eq!(
            rt.wait_exit(&layout, Some(Duration::from_millis(10)))
                .await
                .unwrap(),
            None
        );

        let waiter = {
            let rt = rt.clone();
            let layout = layout.clone();
            tokio::spawn(async move { rt.wait_exit(&layout, None).await })
        };
        tokio::task::yield_now().await;
        assert!(rt.exit("m1", 3).await);
        let record = waiter.await.unwrap().unwrap().unwrap();
        assert_eq!(record.exit_code, Some(3));
        assert!(matches!(
            rt.status(&layout).await.unwrap(),
            Status::Exited(_)
        ));
        rt.cleanup(&layout).await.unwrap();
        assert_eq!(rt.status(&layout).await.unwrap(), Status::NotRunning);
        rt.remove(&layout).await.unwrap();
        assert!(!rt.exists("m1").await);
        let calls = rt.calls().await;
        assert_eq!(calls[..2], ["prepare m1".to_owned(), "start m1".to_owned()]);
        assert_eq!(calls.last().map(String::as_str), Some("remove m1"));
    }

    #[tokio::test]
    async fn fails_next_start_and_handles_signals() {
        let rt = FakeRuntime::new();
        let layout = MachineLayout::new(Path::new("/m"), "m2");
        rt.prepare(&layout, &spec("m2")).await.unwrap();
        rt.fail_next_start("exec failed").await;
        let err = rt.start(&layout, &[]).await.unwrap_err();
        assert_eq!(err.code(), "runtime_failed");
        rt.start(&layout, &[]).await.unwrap();

        rt.set_ignore_term(true).await;
        rt.signal(&layout, libc::SIGTERM).await.unwrap();
        assert!(matches!(
            rt.status(&layout).await.unwrap(),
            Status::Running { .. }
        ));
        rt.signal(&layout, libc::SIGKILL).await.unwrap();
        let record = rt.wait_exit(&layout, None).await.unwrap().unwrap();
        assert_eq!(record.signal, Some(libc::SIGKILL));
        assert!(rt.calls().await.contains(&"signal m2 15".to_owned()));
    }
}
