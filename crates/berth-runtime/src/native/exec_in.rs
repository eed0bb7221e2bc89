//! `berth shim nsexec`: runs a command inside a running Machine for the native driver,
//! as `runc exec` does for runc. A fresh single-threaded process joins the init's
//! cgroups and namespaces (mount last, since paths are host paths until then), forks
//! into its pid namespace, and the child applies the spec's user, capabilities,
//! no_new_privs and seccomp before execve. The parent writes the child's pid to the pid
//! file and exits with the child's status.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

use super::init;

pub const NSEXEC_ARG: &str = "nsexec";

/// `nsexec --pid PID --config FILE --pid-file FILE -- CMD...`.
pub(crate) struct NsexecArgs {
    pid: u32,
    config: PathBuf,
    pid_file: PathBuf,
    cmd: Vec<String>,
}

impl NsexecArgs {
    fn parse(args: Vec<OsString>) -> Result<NsexecArgs, String> {
        let mut pid = None;
        let mut config = None;
        let mut pid_file = None;
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            if flag == "--" {
                break;
            }
            let value = it
                .next()
                .ok_or_else(|| format!("missing value for {flag:?}"))?;
            match flag.to_str() {
                Some("--pid") => {
                    pid = value.to_str().and_then(|v| v.parse().ok());
                }
                Some("--config") => config = Some(PathBuf::from(value)),
                Some("--pid-file") => pid_file = Some(PathBuf::from(value)),
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        let cmd = it
            .map(|a| {
                a.into_string()
                    .map_err(|a| format!("non-utf8 argument {a:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cmd.is_empty() {
            return Err("no command".into());
        }
        Ok(NsexecArgs {
            pid: pid.ok_or("missing --pid")?,
            config: config.ok_or("missing --config")?,
            pid_file: pid_file.ok_or("missing --pid-file")?,
            cmd,
        })
    }

    pub(crate) fn to_args(
        pid: u32,
        config: &Path,
        pid_file: &Path,
        cmd: &[String],
    ) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![
            NSEXEC_ARG.into(),
            "--pid".into(),
            pid.to_string().into(),
            "--config".into(),
            config.into(),
            "--pid-file".into(),
            pid_file.into(),
            "--".into(),
        ];
        out.extend(cmd.iter().map(OsString::from));
        out
    }
}

pub fn main_with_args(args: Vec<OsString>) -> i32 {
    let args = match NsexecArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-shim nsexec: {e}");
            return 2;
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth-shim nsexec: {e}");
            126
        }
    }
}

fn run(args: &NsexecArgs) -> Result<i32, String> {
    let text =
        fs::read(&args.config).map_err(|e| format!("read {}: {e}", args.config.display()))?;
    let mut spec: oci_spec::runtime::Spec =
        serde_json::from_slice(&text).map_err(|e| format!("parse config: {e}"))?;
    let mut process = spec.process().clone().ok_or("config has no process")?;
    process.set_args(Some(args.cmd.clone()));
    spec.set_process(Some(process.clone()));

    let proc_dir = PathBuf::from(format!("/proc/{}", args.pid));
    let cgroups = fs::read_to_string(proc_dir.join("cgroup"))
        .map_err(|e| format!("the machine's init is gone: {e}"))?;
    // Opened while host paths still resolve.
    let namespaces: Vec<(File, CloneFlags)> = [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
        // Last: joining the others needs the host's privileges, which this one ends.
        ("user", CloneFlags::CLONE_NEWUSER),
    ]
    .into_iter()
    .map(|(name, flag)| {
        File::open(proc_dir.join("ns").join(name))
            .map(|f| (f, flag))
            .map_err(|e| format!("open {name} namespace: {e}"))
    })
    .collect::<Result<_, _>>()?;
    let mut pid_file = File::create(&args.pid_file).map_err(|e| format!("create pid file: {e}"))?;
    for file in cgroup_procs_files(&cgroups) {
        fs::write(&file, b"0").map_err(|e| format!("join cgroup {}: {e}", file.display()))?;
    }
    for (file, flag) in &namespaces {
        nix::sched::setns(file.as_fd(), *flag).map_err(|e| format!("setns {flag:?}: {e}"))?;
    }
    drop(namespaces);
    // SAFETY: this process is single-threaded (a fresh exec), so the child may run any
    // code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: fds 0-2 are this process's stdio and stay open until exec.
            let (stdin, stdout, stderr) = unsafe {
                (
                    BorrowedFd::borrow_raw(0),
                    BorrowedFd::borrow_raw(1),
                    BorrowedFd::borrow_raw(2),
                )
            };
            let message = match init::exec_process(
                &spec,
                &process,
                Some(stdin),
                stdout,
                stderr,
                &mut init::InitClock::off(),
            ) {
                Err(message) => message,
                Ok(never) => match never {},
            };
            eprintln!("berth-shim nsexec: {message}");
            // SAFETY: ends the forked child without running the parent's exit paths.
            unsafe { libc::_exit(126) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = writeln!(pid_file, "{child}");
            drop(pid_file);
            loop {
                match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, signal, _)) => {
                        return Ok(128 + signal as i32)
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("wait: {e}")),
                }
            }
        }
        Err(e) => Err(format!("fork: {e}")),
    }
}

/// Host `cgroup.procs` files of the cgroups in a `/proc/<pid>/cgroup` text.
fn cgroup_procs_files(proc_cgroup: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_start_matches('/');
            if controllers.starts_with("name=") {
                return None;
            }
            let dir = if controllers.is_empty() {
                let unified = root.join("unified");
                if unified.exists() {
                    unified.join(path)
                } else {
                    root.join(path)
                }
            } else {
                root.join(controllers).join(path)
            };
            let file = dir.join("cgroup.procs");
            file.exists().then_some(file)
        })
        .collect()
}
