//! What the runc driver does to run the Machine's init (`crate::machine_init`): runc
//! execs `process.args` itself, so `config.json` names the memfd the shim passes as fd 3
//! (`runc create --preserve-fds 1`), and the command's program is looked up in the
//! mounted rootfs before the start, as runc did when it exec'd the command itself.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use oci_spec::runtime::Spec;
use serde::Deserialize;

use crate::error::{IoContext, RuntimeError};
use crate::machine_init::{command, RUNC_INIT};

const RUNC_INIT_FD: RawFd = 3;

/// `process.args` for runc: init first, then the program for it to look up, then the
/// command's argv.
fn runc_args(command: &[String]) -> Vec<String> {
    let mut args = Vec::with_capacity(command.len() + 2);
    args.push(RUNC_INIT.to_owned());
    args.extend(command.first().cloned());
    args.extend(command.iter().cloned());
    args
}

/// The part of `config.json` a runc start looks at.
#[derive(Debug, Default, Deserialize)]
struct Head {
    #[serde(default)]
    process: HeadProcess,
}

#[derive(Debug, Default, Deserialize)]
struct HeadProcess {
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cwd: String,
}

impl Head {
    fn runs_init(&self) -> bool {
        self.process
            .args
            .first()
            .is_some_and(|first| first == RUNC_INIT)
    }
}

/// `config.json` as runc needs it: `None` when it already runs init, else the rewritten
/// text.
pub(crate) fn runc_config(json: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let head: Head = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if head.runs_init() {
        return Ok(None);
    }
    rewrite_for_runc(json).map(Some)
}

fn rewrite_for_runc(json: &[u8]) -> Result<Vec<u8>, String> {
    let mut spec: Spec = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let mut process = spec.process().clone().ok_or("config has no process")?;
    let command = process.args().clone().unwrap_or_default();
    process.set_args(Some(runc_args(&command)));
    spec.set_process(Some(process));
    serde_json::to_vec(&spec).map_err(|e| e.to_string())
}

/// Before a runc start, with the Machine's rootfs mounted at `rootfs`: looks the
/// command's program up in it, as runc did when it exec'd the command itself, so that a
/// missing program still fails the start; then rewrites a `config.json` written without
/// init (before Berth had one, or by the native driver) so that runc runs it.
pub(crate) fn before_runc_start(
    id: &str,
    config: &Path,
    rootfs: &Path,
) -> Result<(), RuntimeError> {
    let internal = |message: String| {
        RuntimeError::Internal(format!(
            "config of machine {id} at {}: {message}",
            config.display()
        ))
    };
    let json = std::fs::read(config).ctx(|| format!("read {}", config.display()))?;
    let head: Head = serde_json::from_slice(&json).map_err(|e| internal(e.to_string()))?;
    let process = &head.process;
    let program = command(&process.args)
        .first()
        .ok_or_else(|| internal("no args".into()))?;
    let root = rustix::fs::open(
        rootfs,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(io::Error::from)
    .ctx(|| format!("open {}", rootfs.display()))?;
    find_in_root(root.as_fd(), program, &process.env, &process.cwd).map_err(|message| {
        RuntimeError::Start {
            driver: "runc",
            id: id.to_owned(),
            message,
        }
    })?;
    if !head.runs_init() {
        let json = rewrite_for_runc(&json).map_err(internal)?;
        crate::util::write_atomic(config, &json).ctx(|| format!("write {}", config.display()))?;
    }
    Ok(())
}

/// As runc's lookup: a name without '/' in `env`'s PATH, anything else from `cwd`; an
/// executable regular file, resolved inside `root` (symlinks cannot lead out).
fn find_in_root(root: BorrowedFd<'_>, name: &str, env: &[String], cwd: &str) -> Result<(), String> {
    let cwd = Path::new(if cwd.is_empty() { "/" } else { cwd });
    let executable = |candidate: &Path| {
        rustix::fs::openat2(
            root,
            candidate,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            rustix::fs::ResolveFlags::IN_ROOT,
        )
        .and_then(|fd| rustix::fs::fstat(&fd))
        .is_ok_and(|stat| {
            rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
                && stat.st_mode & 0o111 != 0
        })
    };
    if name.contains('/') {
        return if executable(&cwd.join(name)) {
            Ok(())
        } else {
            Err(format!(
                "exec {name:?}: no executable file there in the machine"
            ))
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    if path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .any(|dir| executable(&cwd.join(dir).join(name)))
    {
        return Ok(());
    }
    Err(format!("executable file {name:?} not found in $PATH"))
}

/// Makes `init` fd 3 of the runc that `command` starts, for `--preserve-fds 1`. `init`
/// must stay open until the command has been spawned.
pub(crate) fn pass_to_runc(command: &mut Command, init: BorrowedFd<'_>) {
    let fd = init.as_raw_fd();
    // SAFETY: the hook calls only fcntl(2) and dup2(2), which are async-signal-safe, on
    // a descriptor the parent keeps open until the spawn has returned.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set.
            let done = if fd == RUNC_INIT_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, RUNC_INIT_FD)
            };
            if done < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What `runc create` needs to pass init on.
pub(crate) const RUNC_CREATE_ARGS: [&str; 2] = ["--preserve-fds", "1"];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn runc_runs_init_and_the_command_survives_a_round_trip() {
        let command = strings(&["sh", "-c", "exit 3"]);
        let args = runc_args(&command);
        assert_eq!(args, strings(&[RUNC_INIT, "sh", "sh", "-c", "exit 3"]));
        assert_eq!(crate::machine_init::command(&args), command.as_slice());
        // A plain command is the command, whatever it is.
        assert_eq!(crate::machine_init::command(&command), command.as_slice());
        let odd = strings(&[RUNC_INIT]);
        assert_eq!(crate::machine_init::command(&odd), odd.as_slice());
    }

    #[test]
    fn an_old_config_is_rewritten_once() {
        let spec = oci_spec::runtime::Spec::default();
        let plain = serde_json::to_vec(&spec).unwrap();
        let rewritten = runc_config(&plain).unwrap().expect("rewritten");
        let parsed: Spec = serde_json::from_slice(&rewritten).unwrap();
        let args = parsed.process().as_ref().unwrap().args().clone().unwrap();
        assert_eq!(args[0], RUNC_INIT);
        assert_eq!(crate::machine_init::command(&args), &["sh".to_owned()]);
        assert_eq!(runc_config(&rewritten).unwrap(), None, "already runs init");
    }

    #[test]
    fn programs_are_found_inside_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("work")).unwrap();
        for (name, mode) in [
            ("bin/tool", 0o755),
            ("bin/data", 0o644),
            ("work/run", 0o700),
        ] {
            fs::write(root.join(name), b"").unwrap();
            fs::set_permissions(root.join(name), fs::Permissions::from_mode(mode)).unwrap();
        }
        // Absolute links resolve inside the root, not on the host.
        std::os::unix::fs::symlink("/bin", root.join("usr-bin")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("bin/escape")).unwrap();
        let fd = rustix::fs::open(
            root,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let find = |name: &str, env: &[&str], cwd: &str| {
            find_in_root(fd.as_fd(), name, &strings(env), cwd)
        };
        assert!(find("tool", &[], "/").is_ok(), "default PATH");
        assert!(find("tool", &["PATH=/nowhere:/usr-bin"], "/").is_ok());
        assert!(find("tool", &["PATH=/nowhere"], "/").is_err());
        assert!(find("data", &[], "/").is_err(), "not executable");
        assert!(
            find("escape", &[], "/").is_err(),
            "followed out of the root"
        );
        assert!(find("/bin/tool", &[], "/").is_ok());
        assert!(find("./run", &[], "/work").is_ok());
        assert!(find("run", &["PATH=."], "/work").is_ok());
        let missing = find("/no/such/binary", &[], "/").unwrap_err();
        assert!(missing.contains("/no/such/binary"), "{missing}");
        let missing = find("nope", &[], "/").unwrap_err();
        assert!(missing.contains("\"nope\" not found"), "{missing}");
    }
}
