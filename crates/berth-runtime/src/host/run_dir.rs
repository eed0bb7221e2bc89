//! A Machine's run directory (`run/` of its layout): the files through which every
//! driver finds a run again, also from a later agent process. The supervisor writes them;
//! status, signal, wait and recovery read them here.
//!
//! - `shim.pid`: `<pid> <start time>` of the supervisor, so a recycled pid is never
//!   mistaken for it;
//! - `init.pid`: the Machine's init, written once it runs (by the supervisor, or by runc's
//!   `--pid-file`);
//! - `exit.json`: how init ended ([`ExitRecord`]), written by the supervisor that reaped
//!   it.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::blocking;
use super::process::{pidfd_open, pidfd_send_signal, wait_pidfd};
use crate::error::{IoContext, RuntimeError};
use crate::{util, ExitRecord, MachineLayout, Status};

pub const SHIM_PID_FILE: &str = "shim.pid";
pub const INIT_PID_FILE: &str = "init.pid";
pub const EXIT_FILE: &str = "exit.json";

/// The run directory of one Machine and the files in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

/// The Machine's init, checked to be the live supervisor's child while `pidfd` was held.
pub(crate) struct LiveInit {
    pub(crate) pid: u32,
    /// Clock ticks since boot, from `/proc/<pid>/stat`.
    pub(crate) start_time: u64,
    pub(crate) pidfd: OwnedFd,
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> RunDir {
        RunDir { path: path.into() }
    }

    pub fn of(layout: &MachineLayout) -> RunDir {
        RunDir::new(layout.run_dir())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn init_pid_file(&self) -> PathBuf {
        self.path.join(INIT_PID_FILE)
    }

    /// Records this supervisor as `pid` with its start time. No fsync: the file means
    /// nothing after a reboot, and this is on the start path.
    pub(crate) fn write_shim_pid(&self, (pid, start): (u32, u64)) -> io::Result<()> {
        let line = format!("{pid} {start}\n");
        util::write_replace(&self.path.join(SHIM_PID_FILE), line.as_bytes(), false)
    }

    pub(crate) fn write_exit(&self, record: &ExitRecord) -> io::Result<()> {
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        util::write_atomic(&self.path.join(EXIT_FILE), &json)
    }

    /// `<pid> <start time>` of the supervisor, as recorded (it may be gone).
    pub(crate) fn read_shim_pid(&self) -> io::Result<Option<(u32, u64)>> {
        let text = match fs::read_to_string(self.path.join(SHIM_PID_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next()) {
            (Some(Ok(pid)), Some(Ok(start))) => Ok(u32::try_from(pid).ok().map(|p| (p, start))),
            _ => Ok(None),
        }
    }

    pub(crate) fn read_init_pid(&self) -> io::Result<Option<u32>> {
        read_pid_file(&self.init_pid_file())
    }

    pub(crate) fn read_exit(&self) -> io::Result<Option<ExitRecord>> {
        match fs::read(self.path.join(EXIT_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The pid of the recorded supervisor, if that very process is still alive.
    pub(crate) fn live_shim(&self) -> Result<Option<u32>, RuntimeError> {
        let recorded = self
            .read_shim_pid()
            .ctx(|| format!("read shim pid in {}", self.path.display()))?;
        Ok(recorded.and_then(|(pid, start)| util::is_same_live_process(pid, start).then_some(pid)))
    }

    /// The Machine's init, if it runs as the live supervisor's child. The pidfd is opened
    /// before the check, so the pid cannot be another process that took it later.
    pub(crate) fn live_init(&self) -> Result<Option<LiveInit>, RuntimeError> {
        let Some(shim_pid) = self.live_shim()? else {
            return Ok(None);
        };
        let init_file = self.init_pid_file();
        let Some(pid) = self
            .read_init_pid()
            .ctx(|| format!("read {}", init_file.display()))?
        else {
            return Ok(None);
        };
        let Some(pidfd) = pidfd_open(pid).ctx(|| format!("pidfd of init {pid}"))? else {
            return Ok(None);
        };
        Ok(
            match util::proc_stat(pid).ctx(|| format!("stat init {pid}"))? {
                Some(st) if st.ppid == shim_pid && st.state != 'Z' => Some(LiveInit {
                    pid,
                    start_time: st.start_time,
                    pidfd,
                }),
                _ => None,
            },
        )
    }

    /// Before a start: the last run's exit record and init pid go.
    pub(crate) fn clear_last_run(&self) -> Result<(), RuntimeError> {
        for name in [EXIT_FILE, INIT_PID_FILE] {
            let path = self.path.join(name);
            util::remove_file_if_exists(&path).ctx(|| format!("remove {}", path.display()))?;
        }
        Ok(())
    }

    /// The whole directory, once nothing writes to it any more.
    pub(crate) fn remove(&self) -> Result<(), RuntimeError> {
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(RuntimeError::io(
                format!("remove {}", self.path.display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}

/// A pid file as runc's `--pid-file` writes it; `None` when missing or not a pid.
pub(crate) fn read_pid_file(path: &Path) -> io::Result<Option<u32>> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends `signal` to the Machine's init. A Machine that is not running is not an error.
pub(crate) async fn signal_init(layout: &MachineLayout, signal: i32) -> Result<(), RuntimeError> {
    let run = RunDir::of(layout);
    let id = layout.id.clone();
    blocking(move || {
        let Some(init) = run.live_init()? else {
            return Ok(());
        };
        match pidfd_send_signal(&init.pidfd, signal) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other.ctx(|| format!("send signal {signal} to machine {id}")),
        }
    })
    .await
}

/// Waits for the Machine's supervisor to exit and reads its exit record.
pub(crate) async fn wait_for_exit(
    layout: &MachineLayout,
    timeout: Option<Duration>,
) -> Result<Option<ExitRecord>, RuntimeError> {
    let run = RunDir::of(layout);
    let id = &layout.id;
    let shim = match run
        .read_shim_pid()
        .ctx(|| format!("read shim pid of machine {id}"))?
    {
        Some((pid, start)) => {
            let fd = pidfd_open(pid).ctx(|| format!("pidfd of machine {id} shim"))?;
            // Checked after opening the pidfd, so the pid cannot change underneath.
            fd.filter(|_| util::is_same_live_process(pid, start))
        }
        None => None,
    };
    if let Some(fd) = shim {
        let exited = wait_pidfd(fd, timeout)
            .await
            .ctx(|| format!("wait for shim of machine {id}"))?;
        if !exited {
            return Ok(None);
        }
    }
    let record = run
        .read_exit()
        .ctx(|| format!("read exit record of machine {id}"))?
        .unwrap_or(ExitRecord {
            exit_code: None,
            signal: None,
            oom_killed: false,
            exited_at_ms: util::now_ms(),
        });
    Ok(Some(record))
}

/// What the run directory and /proc say about the Machine.
pub(crate) async fn read_status(layout: &MachineLayout) -> Result<Status, RuntimeError> {
    let run = RunDir::of(layout);
    let id = layout.id.clone();
    blocking(move || {
        if let Some(record) = run
            .read_exit()
            .ctx(|| format!("read exit record of machine {id}"))?
        {
            return Ok(Status::Exited(record));
        }
        Ok(match run.live_init()? {
            Some(init) => Status::Running { pid: init.pid },
            None => Status::NotRunning,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_a_dead_shim_is_not_live() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        assert_eq!(run.read_shim_pid().unwrap(), None);
        assert_eq!(run.read_init_pid().unwrap(), None);
        assert_eq!(run.read_exit().unwrap(), None);

        let me = std::process::id();
        let start = util::proc_stat(me).unwrap().unwrap().start_time;
        run.write_shim_pid((me, start)).unwrap();
        assert_eq!(run.read_shim_pid().unwrap(), Some((me, start)));
        assert_eq!(run.live_shim().unwrap(), Some(me));
        // The same pid with another start time is another process.
        run.write_shim_pid((me, start + 1)).unwrap();
        assert_eq!(run.live_shim().unwrap(), None);

        fs::write(run.init_pid_file(), "42\n").unwrap();
        assert_eq!(run.read_init_pid().unwrap(), Some(42));
        let record = ExitRecord {
            exit_code: Some(3),
            signal: None,
            oom_killed: false,
            exited_at_ms: 7,
        };
        run.write_exit(&record).unwrap();
        assert_eq!(run.read_exit().unwrap(), Some(record));
        run.clear_last_run().unwrap();
        assert_eq!(run.read_exit().unwrap(), None);
        assert_eq!(run.read_init_pid().unwrap(), None);
        assert_eq!(run.read_shim_pid().unwrap(), Some((me, start + 1)));
    }

    #[test]
    fn init_not_the_shims_child_is_not_live() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let me = std::process::id();
        let start = util::proc_stat(me).unwrap().unwrap().start_time;
        run.write_shim_pid((me, start)).unwrap();
        // This process's parent is alive but is not this process's child.
        let parent = std::os::unix::process::parent_id();
        fs::write(run.init_pid_file(), parent.to_string()).unwrap();
        assert!(run.live_init().unwrap().is_none());
        // A real child of this process is.
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        fs::write(run.init_pid_file(), child.id().to_string()).unwrap();
        let init = run.live_init().unwrap().expect("the child is live");
        assert_eq!(init.pid, child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(run.live_init().unwrap().is_none());
    }
}
