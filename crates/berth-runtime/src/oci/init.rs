//! How the Machine's init (`crate::machine_init`) gets into a container the OCI runtime
//! program starts, and what the driver checks before the start:
//! - runc execs `process.args` itself, so `config.json` names the memfd the shim passes as
//!   fd 3 (`runc create --preserve-fds 1`);
//! - runsc (gVisor) passes no descriptors into its sandbox, so `config.json` bind-mounts
//!   a read-only host copy of init at [`GVISOR_INIT`], on the sandbox's own `/dev`
//!   (a tmpfs inside gVisor: nothing is written to the Machine's disk). runsc also
//!   cannot join a user namespace by path (its Go process is multithreaded, and
//!   setns(2) into a user namespace wants a single thread), so its `config.json` names
//!   the user namespace by its id map only: runsc makes one with the same map for its
//!   gofer, which then sees the Machine's files with the ids the Machine has.
//!
//! Either way the command's program is looked up in the mounted rootfs before the start,
//! as runc did when it exec'd the command itself.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::runtime::{LinuxNamespaceType, LinuxSyscall, MountBuilder, Spec};
use serde::Deserialize;

use crate::error::{IoContext, RuntimeError};
use crate::machine_init::{command, GVISOR_INIT, RUNC_INIT};

const RUNC_INIT_FD: RawFd = 3;

/// What gVisor itself needs of a Machine's host pids cgroup, on top of the Machine's own
/// limit: the sandbox's and gofer's threads (about 25 idle) and, on the ptrace platform,
/// one stub process per address space with a thread per Sentry thread that ran in it.
/// runsc applies `linux.resources.pids` to the host cgroup of all of them, and a bare
/// limit of 50 failed the first clone inside the sandbox with EAGAIN.
pub(crate) const GVISOR_PIDS_HEADROOM: i64 = 64;

// The seccomp profile's clone3 rule answers ENOSYS, so that libcs fall back to clone,
// whose flags the profile can see. runsc (20221219) answers every errno rule with EPERM,
// ignoring `errnoRet`: berth-init's posix_spawn then failed with EPERM instead of falling
// back. gVisor has no clone3 and answers ENOSYS itself, so its configs go without the
// rule (and get it back when they return to runc).

/// How a driver's container runs the Machine's init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InitPassing {
    /// runc: the memfd the shim passes as fd 3.
    Fd3,
    /// runsc: this host file, bind-mounted read-only at [`GVISOR_INIT`].
    Mounted(PathBuf),
}

impl InitPassing {
    /// The path `process.args[0]` names.
    fn path(&self) -> &'static str {
        match self {
            InitPassing::Fd3 => RUNC_INIT,
            InitPassing::Mounted(_) => GVISOR_INIT,
        }
    }

    /// `config.json` as the driver needs it: `None` when it already runs this init, else
    /// the rewritten text.
    pub(crate) fn config(&self, json: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let head: Head = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        if head.runs_init(self) {
            return Ok(None);
        }
        self.rewrite(json, None).map(Some)
    }

    /// `userns`: the Machine's pinned user namespace, for runc to join a config written
    /// for runsc (which names it by its map only).
    fn rewrite(&self, json: &[u8], userns: Option<&Path>) -> Result<Vec<u8>, String> {
        let mut spec: Spec = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut process = spec.process().clone().ok_or("config has no process")?;
        let args = process.args().clone().unwrap_or_default();
        process.set_args(Some(init_args(self.path(), command(&args))));
        spec.set_process(Some(process));
        // Another driver's init mount, if any, goes; this one's comes in.
        let mut mounts: Vec<_> = spec
            .mounts()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.destination() != Path::new(GVISOR_INIT))
            .collect();
        if let InitPassing::Mounted(source) = self {
            mounts.push(
                MountBuilder::default()
                    .destination(GVISOR_INIT)
                    .typ("bind")
                    .source(source)
                    .options(
                        ["bind", "ro", "nosuid", "nodev"]
                            .map(str::to_owned)
                            .to_vec(),
                    )
                    .build()
                    .map_err(|e| e.to_string())?,
            );
        }
        let was_gvisor = spec
            .mounts()
            .iter()
            .flatten()
            .any(|m| m.destination() == Path::new(GVISOR_INIT));
        spec.set_mounts(Some(mounts));
        if let Some(mut linux) = spec.linux().clone() {
            let headroom = match (self, was_gvisor) {
                (InitPassing::Mounted(_), false) => GVISOR_PIDS_HEADROOM,
                (InitPassing::Fd3, true) => -GVISOR_PIDS_HEADROOM,
                _ => 0,
            };
            if let Some(mut resources) = linux.resources().clone() {
                if let Some(mut pids) = *resources.pids() {
                    if pids.limit() > 0 && headroom != 0 {
                        pids.set_limit((pids.limit() + headroom).max(1));
                        resources.set_pids(Some(pids));
                        linux.set_resources(Some(resources));
                    }
                }
            }
            if let Some(mut seccomp) = linux.seccomp().clone() {
                let mut syscalls = seccomp.syscalls().clone().unwrap_or_default();
                let clone3 = |s: &LinuxSyscall| s.names().as_slice() == ["clone3"];
                match (self, was_gvisor) {
                    (InitPassing::Mounted(_), false) => syscalls.retain(|s| !clone3(s)),
                    (InitPassing::Fd3, true) if !syscalls.iter().any(clone3) => {
                        let profile =
                            crate::seccomp::default_profile().map_err(|e| e.to_string())?;
                        syscalls.extend(
                            profile
                                .syscalls()
                                .iter()
                                .flatten()
                                .filter(|s| clone3(s))
                                .cloned(),
                        );
                    }
                    _ => {}
                }
                seccomp.set_syscalls(Some(syscalls));
                linux.set_seccomp(Some(seccomp));
            }
            let namespaces = linux.namespaces().clone().map(|namespaces| {
                namespaces
                    .into_iter()
                    .map(|mut ns| {
                        if ns.typ() == LinuxNamespaceType::User {
                            match self {
                                InitPassing::Mounted(_) => {
                                    ns.set_path(None);
                                }
                                InitPassing::Fd3 if ns.path().is_none() => {
                                    ns.set_path(userns.map(Path::to_path_buf));
                                }
                                InitPassing::Fd3 => {}
                            }
                        }
                        ns
                    })
                    .collect()
            });
            linux.set_namespaces(namespaces);
            spec.set_linux(Some(linux));
        }
        serde_json::to_vec(&spec).map_err(|e| e.to_string())
    }
}

/// `process.args` for a driver's init: init first, then the program for it to look up,
/// then the command's argv.
fn init_args(init: &str, command: &[String]) -> Vec<String> {
    let mut args = Vec::with_capacity(command.len() + 2);
    args.push(init.to_owned());
    args.extend(command.first().cloned());
    args.extend(command.iter().cloned());
    args
}

/// The part of `config.json` a start looks at.
#[derive(Debug, Default, Deserialize)]
struct Head {
    #[serde(default)]
    process: HeadProcess,
    #[serde(default)]
    mounts: Vec<HeadMount>,
    #[serde(default)]
    linux: HeadLinux,
}

#[derive(Debug, Default, Deserialize)]
struct HeadLinux {
    #[serde(default)]
    namespaces: Vec<HeadNamespace>,
}

#[derive(Debug, Default, Deserialize)]
struct HeadNamespace {
    #[serde(default, rename = "type")]
    typ: String,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct HeadMount {
    #[serde(default)]
    destination: String,
    #[serde(default)]
    source: Option<PathBuf>,
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
    fn runs_init(&self, passing: &InitPassing) -> bool {
        let first = self.process.args.first();
        if first.map(String::as_str) != Some(passing.path()) {
            return false;
        }
        let user_by_path = self
            .linux
            .namespaces
            .iter()
            .filter(|ns| ns.typ == "user")
            .all(|ns| ns.path.is_some());
        match passing {
            InitPassing::Fd3 => user_by_path,
            InitPassing::Mounted(source) => {
                self.mounts.iter().any(|m| {
                    m.destination == GVISOR_INIT && m.source.as_deref() == Some(source.as_path())
                }) && !self
                    .linux
                    .namespaces
                    .iter()
                    .any(|ns| ns.typ == "user" && ns.path.is_some())
            }
        }
    }
}

/// Before a start, with the Machine's rootfs mounted at `rootfs`: looks the command's
/// program up in it, as runc did when it exec'd the command itself, so that a missing
/// program still fails the start; then rewrites a `config.json` written without this
/// driver's init (before Berth had one, or by another driver) so that it runs it.
pub(crate) fn before_start(
    driver: &'static str,
    passing: &InitPassing,
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
            driver,
            id: id.to_owned(),
            message,
        }
    })?;
    if !head.runs_init(passing) {
        let userns = config
            .parent()
            .and_then(Path::parent)
            .map(|machine| machine.join("userns"));
        let json = passing
            .rewrite(&json, userns.as_deref())
            .map_err(internal)?;
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
        let args = init_args(RUNC_INIT, &command);
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
        let rewritten = InitPassing::Fd3.config(&plain).unwrap().expect("rewritten");
        let parsed: Spec = serde_json::from_slice(&rewritten).unwrap();
        let args = parsed.process().as_ref().unwrap().args().clone().unwrap();
        assert_eq!(args[0], RUNC_INIT);
        assert_eq!(crate::machine_init::command(&args), &["sh".to_owned()]);
        assert_eq!(
            InitPassing::Fd3.config(&rewritten).unwrap(),
            None,
            "already runs init"
        );
    }

    #[test]
    fn gvisor_configs_get_pids_headroom_and_no_clone3_rule_and_give_both_back() {
        let mut spec = oci_spec::runtime::Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        let pids = oci_spec::runtime::LinuxPidsBuilder::default()
            .limit(50)
            .build()
            .unwrap();
        let resources = oci_spec::runtime::LinuxResourcesBuilder::default()
            .pids(pids)
            .build()
            .unwrap();
        linux.set_resources(Some(resources));
        linux.set_seccomp(Some(crate::seccomp::default_profile().unwrap()));
        spec.set_linux(Some(linux));
        let looks = |json: &[u8]| {
            let spec: Spec = serde_json::from_slice(json).unwrap();
            let linux = spec.linux().clone().unwrap();
            let limit = linux.resources().clone().unwrap().pids().unwrap().limit();
            let clone3 = linux
                .seccomp()
                .clone()
                .unwrap()
                .syscalls()
                .clone()
                .unwrap()
                .iter()
                .filter(|s| s.names().as_slice() == ["clone3"])
                .map(|s| s.errno_ret())
                .collect::<Vec<_>>();
            (limit, clone3)
        };
        let enosys = vec![Some(libc::ENOSYS as u32)];
        let runc = InitPassing::Fd3
            .config(&serde_json::to_vec(&spec).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(looks(&runc), (50, enosys.clone()));
        let mounted = InitPassing::Mounted("/i/berth-init".into());
        let gvisor = mounted.config(&runc).unwrap().unwrap();
        assert_eq!(looks(&gvisor), (50 + GVISOR_PIDS_HEADROOM, vec![]));
        // Another gVisor init file changes neither again.
        let elsewhere = InitPassing::Mounted("/elsewhere/berth-init".into());
        let moved = elsewhere.config(&gvisor).unwrap().unwrap();
        assert_eq!(looks(&moved), (50 + GVISOR_PIDS_HEADROOM, vec![]));
        let back = InitPassing::Fd3.rewrite(&moved, None).unwrap();
        assert_eq!(looks(&back), (50, enosys));
    }

    #[test]
    fn a_config_moves_between_the_runc_and_gvisor_inits() {
        let mounted = InitPassing::Mounted("/var/lib/berth/gvisor-init/berth-init".into());
        let mut spec = oci_spec::runtime::Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        let userns = oci_spec::runtime::LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::User)
            .path("/m/userns")
            .build()
            .unwrap();
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        namespaces.push(userns);
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        let user_path = |spec: &Spec| {
            spec.linux()
                .as_ref()
                .unwrap()
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .find(|ns| ns.typ() == LinuxNamespaceType::User)
                .unwrap()
                .path()
                .clone()
        };
        let plain = serde_json::to_vec(&spec).unwrap();
        let runc = InitPassing::Fd3.config(&plain).unwrap().unwrap();
        let gvisor = mounted
            .config(&runc)
            .unwrap()
            .expect("rewritten for gvisor");
        let parsed: Spec = serde_json::from_slice(&gvisor).unwrap();
        let args = parsed.process().as_ref().unwrap().args().clone().unwrap();
        assert_eq!(args, strings(&[GVISOR_INIT, "sh", "sh"]));
        let init_mounts: Vec<_> = parsed
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|m| m.destination() == Path::new(GVISOR_INIT))
            .collect();
        assert_eq!(init_mounts.len(), 1);
        let options = init_mounts[0].options().clone().unwrap();
        assert!(options.contains(&"ro".to_owned()), "{options:?}");
        // runsc gets the user namespace by its map, not by path.
        assert_eq!(user_path(&parsed), None);
        assert_eq!(mounted.config(&gvisor).unwrap(), None, "already runs init");
        // Another init file (a moved state dir) is rewritten; back to runc drops the
        // mount.
        let elsewhere = InitPassing::Mounted("/elsewhere/berth-init".into());
        assert!(elsewhere.config(&gvisor).unwrap().is_some());
        let back = InitPassing::Fd3
            .rewrite(&gvisor, Some(Path::new("/m/userns")))
            .unwrap();
        let parsed: Spec = serde_json::from_slice(&back).unwrap();
        assert_eq!(user_path(&parsed), Some(PathBuf::from("/m/userns")));
        assert_eq!(InitPassing::Fd3.config(&back).unwrap(), None);
        assert_eq!(
            parsed.process().as_ref().unwrap().args().clone().unwrap(),
            strings(&[RUNC_INIT, "sh", "sh"])
        );
        assert!(!parsed
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new(GVISOR_INIT)));
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
