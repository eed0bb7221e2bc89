//! What the native driver does between fork and execve, in the Machine's future init
//! (and, for exec, in the joined process): the same steps and order as runc's init, read
//! from the same `config.json`.
//!
//! Everything here runs in a freshly forked child of a single-threaded process, so it may
//! allocate; it never returns into the caller's code on success (execve replaces it).

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use oci_spec::runtime::{Mount, Process, Spec};
use rustix::fs::{FileType, OFlags, ResolveFlags};

use super::syscall::Syscall;
use crate::inroot;
use crate::overlay::OverlayLayers;
use crate::seccomp;
use crate::timing::{micros, StepTimes};
use crate::userns::IdRange;

/// A step that failed, in words for the start error.
pub(crate) type StepResult<T> = Result<T, String>;

fn step<E: std::fmt::Display>(what: impl FnOnce() -> String) -> impl FnOnce(E) -> String {
    move |e| format!("{}: {e}", what())
}

/// Where the Machine's rootfs comes from and which host resources it joins.
pub(crate) struct InitPlan<'a> {
    pub spec: &'a Spec,
    /// The image layers (idmapped), upper and work dirs, opened by the supervisor.
    pub layers: &'a OverlayLayers,
    pub rootfs: &'a Path,
    /// The Machine's network namespace, opened by the supervisor.
    pub netns: BorrowedFd<'a>,
    /// The Machine's user namespace, opened by the supervisor: its layers are idmapped
    /// through it, and init enters it last.
    pub userns: BorrowedFd<'a>,
    /// `cgroup.procs` files of the Machine's v1 cgroups, prepared at create (init is born
    /// into its v2 one).
    pub cgroup_procs: &'a [PathBuf],
    /// The sealed memfd of `berth-init` (see [`crate::machine_init`]), made once by the
    /// spawner: what init execs, with the Machine's command as its child.
    pub init: BorrowedFd<'a>,
    /// The Machine's volumes: detached clones idmapped through its user namespace, made by
    /// the supervisor, each with its path inside the Machine.
    pub volumes: &'a [(OwnedFd, String)],
}

/// Character devices every Machine gets, as runc makes them.
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Marks the end of each step between fork and execve, as microseconds since the fork,
/// and hands them to the supervisor through a close-on-exec pipe just before execve.
pub(crate) struct InitClock<'a> {
    since: Instant,
    marks: Vec<(&'static str, u64)>,
    out: Option<BorrowedFd<'a>>,
}

impl<'a> InitClock<'a> {
    pub(crate) fn new(since: Instant, out: BorrowedFd<'a>) -> InitClock<'a> {
        InitClock {
            since,
            marks: Vec::with_capacity(16),
            out: Some(out),
        }
    }

    /// For exec into a running Machine, where nobody reads the marks.
    pub(crate) fn off() -> InitClock<'static> {
        InitClock {
            since: Instant::now(),
            marks: Vec::new(),
            out: None,
        }
    }

    fn mark(&mut self, step: &'static str) {
        if self.out.is_some() {
            self.marks.push((step, micros(self.since.elapsed())));
        }
    }

    /// One short write (under PIPE_BUF, into an empty pipe), so it never blocks.
    fn send(&self) {
        let Some(out) = self.out else { return };
        let line: String = self
            .marks
            .iter()
            .map(|(step, us)| format!("{step}={us} "))
            .collect();
        let _ = rustix::io::write(out, line.as_bytes());
    }
}

/// The marks an [`InitClock`] sent, as the time each step took, in order.
pub(crate) fn parse_marks(text: &str) -> StepTimes {
    let mut steps = StepTimes::new();
    let mut previous = 0;
    for (step, us) in text
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .filter_map(|(step, us)| Some((step, us.parse::<u64>().ok()?)))
    {
        steps.record(step, us.saturating_sub(previous));
        previous = us;
    }
    steps
}

/// Sets up the Machine's world and execs its init, `berth-init`, which runs the Machine's
/// command. Only returns on failure.
pub(crate) fn run_init(
    sys: &impl Syscall,
    plan: &InitPlan<'_>,
    stdout: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
    clock: &mut InitClock<'_>,
) -> StepResult<Infallible> {
    let spec = plan.spec;
    let process = spec.process().as_ref().ok_or("config has no process")?;
    // Device nodes and mount points get exactly the modes asked for.
    sys.umask(rustix::fs::Mode::empty());
    join_cgroups(sys, plan.cgroup_procs)?;
    clock.mark("init_cgroups");
    sys.setns(plan.netns, CloneFlags::CLONE_NEWNET)
        .map_err(step(|| "join network namespace".into()))?;
    clock.mark("init_netns");
    // The cgroup namespace is made after joining the cgroups, so they are its root.
    sys.unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(step(|| "unshare namespaces".into()))?;
    // Nothing mounted from here on propagates to the host: the overlay lives and dies
    // with the Machine's mount namespace.
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
    .map_err(step(|| "make mounts private".into()))?;
    clock.mark("init_unshare");
    // Mounts below go through /proc/self/fd of the host's /proc until pivot_root.
    inroot::check_procfs().map_err(step(|| "host /proc".into()))?;
    let ids = crate::spec::id_range(spec).ok_or("config has no user namespace map")?;
    sys.mount_overlay(plan.layers, plan.rootfs)
        .map_err(step(|| "mount the rootfs".into()))?;
    // Opened after the mount: the fd is the overlay's root, which the Machine's image
    // fills; everything below is looked up under it, inside it.
    let root = sys
        .open(
            plan.rootfs,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .map_err(step(|| "open rootfs".into()))?;
    clock.mark("init_overlay");
    for (mount, path) in plan.volumes {
        let target = inroot::mount_target(root.as_fd(), Path::new(path), Some(ids.base))?;
        sys.attach_mount(mount.as_fd(), target.as_fd())
            .map_err(step(|| format!("mount volume on {path}")))?;
    }
    if !plan.volumes.is_empty() {
        clock.mark("init_volumes");
    }
    for mount in spec.mounts().iter().flatten() {
        mount_in_rootfs(sys, root.as_fd(), mount, ids)?;
    }
    let null = make_devices(sys, root.as_fd())?;
    clock.mark("init_mounts");
    enter_rootfs(sys, root.as_fd())?;
    drop(root);
    clock.mark("init_pivot_root");
    if let Some(linux) = spec.linux() {
        let masked = linux.masked_paths().iter().flatten();
        let readonly = linux.readonly_paths().iter().flatten();
        if masked.clone().chain(readonly.clone()).next().is_some() {
            // The Machine's own /proc now, mounted above on a checked fd.
            inroot::check_procfs().map_err(step(|| "machine /proc".into()))?;
            let root = sys
                .open(
                    Path::new("/"),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                )
                .map_err(step(|| "open /".into()))?;
            for path in masked {
                mask_path(sys, root.as_fd(), path, null.as_fd())?;
            }
            for path in readonly {
                readonly_path(sys, root.as_fd(), path)?;
            }
        }
    }
    if let Some(hostname) = spec.hostname() {
        sys.sethostname(hostname)
            .map_err(step(|| "set hostname".into()))?;
    }
    sys.umask(rustix::fs::Mode::from_raw_mode(0o022));
    clock.mark("init_masks");
    // Last of the host's privileges: from here on, root is the Machine's own ids, with
    // capabilities only over what its user namespace owns.
    sys.setns(plan.userns, CloneFlags::CLONE_NEWUSER)
        .map_err(step(|| "join user namespace".into()))?;
    clock.mark("init_userns");
    // A runc Machine's config.json (after a switch of drivers) names init first.
    let command = crate::machine_init::command(process.args().as_deref().unwrap_or_default());
    let io = Stdio {
        // The null device checked in make_devices, not whatever /dev/null names by then.
        stdin: Some(null.as_fd()),
        stdout,
        stderr,
    };
    exec_command(sys, spec, process, command, io, clock, Some(plan.init))
}

/// The descriptors a started process gets as 0, 1 and 2.
struct Stdio<'a> {
    stdin: Option<BorrowedFd<'a>>,
    stdout: BorrowedFd<'a>,
    stderr: BorrowedFd<'a>,
}

/// Rlimits, stdio, user, capabilities, no_new_privs, seccomp, then cwd and the program
/// lookup, then execve: the part init and exec share. Only returns on failure.
///
/// Nothing here opens a path before the process has its final credentials and filter:
/// the Machine may have swapped any file (a FIFO for /dev/null), so cwd and PATH are only
/// looked up as the spec's user under seccomp, and cwd refuses magic links (a
/// `/proc/self/fd/N` of a host descriptor, CVE-2024-21626). `stdin: None` keeps fd 0 as
/// the caller set it up on the host. The caller has closed every descriptor the
/// Machine must not reach; those it keeps are close-on-exec.
pub(crate) fn exec_process(
    sys: &impl Syscall,
    spec: &Spec,
    process: &Process,
    stdin: Option<BorrowedFd<'_>>,
    stdout: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
    clock: &mut InitClock<'_>,
) -> StepResult<Infallible> {
    let command = process.args().as_deref().unwrap_or_default();
    let io = Stdio {
        stdin,
        stdout,
        stderr,
    };
    exec_command(sys, spec, process, command, io, clock, None)
}

/// [`exec_process`] of `command`; with `init`, execs that (`berth-init`) instead, with the
/// program found for `command` and its argv, so that the command runs as init's child.
fn exec_command(
    sys: &impl Syscall,
    spec: &Spec,
    process: &Process,
    command: &[String],
    io: Stdio<'_>,
    clock: &mut InitClock<'_>,
    init: Option<BorrowedFd<'_>>,
) -> StepResult<Infallible> {
    let Stdio {
        stdin,
        stdout,
        stderr,
    } = io;
    for rlimit in process.rlimits().iter().flatten() {
        let resource = rlimit_resource(&rlimit.typ().to_string())?;
        let limit = libc::rlimit {
            rlim_cur: rlimit.soft(),
            rlim_max: rlimit.hard(),
        };
        sys.setrlimit(resource, limit)
            .map_err(step(|| format!("set rlimit {}", rlimit.typ())))?;
    }
    let programs = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => seccomp::compile_or_reuse(profile).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    clock.mark("init_seccomp_compile");
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(step(|| "args".into()))?;
    let env: Vec<CString> = process
        .env()
        .iter()
        .flatten()
        .map(|e| CString::new(e.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(step(|| "env".into()))?;
    let first = command.first().ok_or("no args")?;

    // Signals the supervisor ignores must not stay ignored in the Machine.
    for signal in [libc::SIGHUP, libc::SIGPIPE, libc::SIGCHLD] {
        sys.reset_signal(signal);
    }
    if let Some(stdin) = stdin {
        sys.dup2(stdin.as_raw_fd(), 0)
            .map_err(step(|| "set up fd 0".into()))?;
    }
    for (from, to) in [(stdout.as_raw_fd(), 1), (stderr.as_raw_fd(), 2)] {
        sys.dup2(from, to)
            .map_err(step(|| format!("set up fd {to}")))?;
    }
    // A credential change resets the parent-death signal (and may make the process
    // dumpable again): note them now, restore them after.
    let death_signal = sys
        .parent_death_signal()
        .map_err(step(|| "read parent-death signal".into()))?;
    let parent = sys.getppid();
    set_user_and_capabilities(sys, process)?;
    if process.no_new_privileges() == Some(true) {
        sys.set_no_new_privs()
            .map_err(step(|| "set no_new_privs".into()))?;
    }
    stay_private(sys, death_signal, parent)?;
    clock.mark("init_credentials");
    // From here on only allowed syscalls run; the profile allows the lookups and execve.
    for program in &programs {
        sys.apply_seccomp(program)
            .map_err(step(|| "apply seccomp".into()))?;
    }
    clock.mark("init_seccomp_apply");
    enter_cwd(sys, process.cwd())?;
    let program = find_program(first, process.env().as_deref().unwrap_or_default())?;
    clock.mark("init_program");
    clock.send();
    let Some(init) = init else {
        let e = sys.execve(&program, &args, &env);
        return Err(format!("exec {}: {e}", program.to_string_lossy()));
    };
    let argv = crate::machine_init::native_argv(&program, &args);
    // Blocked from here on, so none sent before init blocks them itself is lost (PID 1
    // drops a signal it has no handler for). Init inherits the mask; its command does not.
    sys.block_signals()
        .map_err(step(|| "block signals".into()))?;
    let e = sys.fexecve(init, &argv, &env);
    Err(format!(
        "exec berth-init for {}: {e}",
        program.to_string_lossy()
    ))
}

/// Not dumpable until execve (no ptrace, no /proc/<pid>/{mem,environ,fd,exe} for the
/// Machine), and the parent-death signal the caller set, again after the credential
/// change; then the parent must still be the one it was, or the signal came too late.
fn stay_private(
    sys: &impl Syscall,
    death_signal: Option<rustix::process::Signal>,
    parent: Option<rustix::process::Pid>,
) -> StepResult<()> {
    sys.set_not_dumpable()
        .map_err(step(|| "make the process not dumpable".into()))?;
    if death_signal.is_some() {
        sys.set_parent_death_signal(death_signal)
            .map_err(step(|| "set the parent-death signal".into()))?;
        if sys.getppid() != parent {
            return Err("the parent exited".into());
        }
    }
    Ok(())
}

/// chdir to the spec's cwd, resolved without magic links, so a `/proc/self/fd/N` cwd can
/// not lead out of the Machine through a descriptor.
fn enter_cwd(sys: &impl Syscall, cwd: &Path) -> StepResult<()> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::openat2(
        rustix::fs::CWD,
        cwd,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(step(|| format!("open cwd {}", cwd.display())))?;
    sys.fchdir(dir.as_fd())
        .map_err(step(|| format!("chdir {}", cwd.display())))
}

/// Moves this process into each prepared cgroup.
fn join_cgroups(sys: &impl Syscall, procs: &[PathBuf]) -> StepResult<()> {
    for file in procs {
        sys.join_cgroup(file)
            .map_err(step(|| format!("join cgroup {}", file.display())))?;
    }
    Ok(())
}

/// runc's option words: flags, or data for the filesystem.
fn mount_flags(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let flag = match option.as_str() {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "noatime" => MsFlags::MS_NOATIME,
            "rw" => MsFlags::empty(),
            _ => {
                data.push(option.as_str());
                continue;
            }
        };
        flags |= flag;
    }
    (flags, data.join(","))
}

/// Mounts one `config.json` mount onto its destination, opened inside the rootfs.
fn mount_in_rootfs(
    sys: &impl Syscall,
    root: BorrowedFd<'_>,
    mount: &Mount,
    ids: IdRange,
) -> StepResult<()> {
    let destination = mount.destination();
    let target = inroot::mount_target(root, destination, Some(ids.base))?;
    let typ = mount.typ().as_deref().unwrap_or("none");
    let options = owned_by_machine(typ, mount.options().as_deref().unwrap_or_default(), ids)?;
    let (flags, data) = mount_flags(&options);
    // A cgroup2 view of the Machine's own cgroup namespace: its cgroup is the root.
    let (typ, source) = match typ {
        "cgroup" => ("cgroup2", "cgroup2"),
        other => (
            other,
            mount
                .source()
                .as_deref()
                .and_then(|s| s.to_str())
                .unwrap_or(other),
        ),
    };
    let data = (!data.is_empty()).then_some(data.as_str());
    sys.mount(
        Some(Path::new(source)),
        &inroot::fd_path(target.as_fd()),
        Some(typ),
        flags,
        data,
    )
    .map_err(step(|| format!("mount {typ} on {}", destination.display())))
}

/// Init mounts as host root, so a tmpfs or devpts would belong to host root, not to the
/// Machine's: give them the Machine's ids (runc, mounting inside the user namespace, gets
/// the same by default). Ids in the options are the Machine's, mapped to the host's.
fn owned_by_machine(typ: &str, options: &[String], ids: IdRange) -> StepResult<Vec<String>> {
    if !matches!(typ, "tmpfs" | "devpts") {
        return Ok(options.to_vec());
    }
    let mut out = Vec::with_capacity(options.len() + 2);
    let (mut uid, mut gid) = (false, false);
    for option in options {
        let mapped = match option.split_once('=') {
            Some((key @ ("uid" | "gid"), value)) => {
                let id = value
                    .parse::<u32>()
                    .ok()
                    .and_then(|id| ids.to_host(id))
                    .ok_or_else(|| format!("{typ} option {option} is outside the machine's ids"))?;
                uid |= key == "uid";
                gid |= key == "gid";
                format!("{key}={id}")
            }
            _ => option.clone(),
        };
        out.push(mapped);
    }
    if typ == "tmpfs" {
        if !uid {
            out.push(format!("uid={}", ids.base));
        }
        if !gid {
            out.push(format!("gid={}", ids.base));
        }
    }
    Ok(out)
}

/// Makes the device nodes in the rootfs's `/dev` (which must be a directory inside it,
/// no symlink on the way) and returns `/dev/null`, opened and checked to be the null
/// device, for masks and init's stdin.
fn make_devices(sys: &impl Syscall, root: BorrowedFd<'_>) -> StepResult<OwnedFd> {
    let dev = inroot::open(
        root,
        Path::new("/dev"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        ResolveFlags::NO_SYMLINKS,
    )
    .map_err(step(|| "open /dev inside the rootfs".into()))?;
    for (name, major, minor) in DEVICES {
        sys.mknodat(
            dev.as_fd(),
            name,
            FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(major, minor),
        )
        .map_err(step(|| format!("mknod /dev/{name}")))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        sys.symlinkat(target, dev.as_fd(), link)
            .map_err(step(|| format!("link /dev/{link}")))?;
    }
    let null = rustix::fs::openat(
        &dev,
        "null",
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(step(|| "open /dev/null".into()))?;
    let stat = sys
        .fstat(null.as_fd())
        .map_err(step(|| "stat /dev/null".into()))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::CharacterDevice
        || stat.st_rdev != rustix::fs::makedev(1, 3)
    {
        return Err("/dev/null is not the null device".into());
    }
    Ok(null)
}

/// pivot_root into the rootfs and drop the host's mounts from view.
fn enter_rootfs(sys: &impl Syscall, root: BorrowedFd<'_>) -> StepResult<()> {
    let here = Path::new(".");
    sys.fchdir(root).map_err(step(|| "chdir rootfs".into()))?;
    // pivot_root(".", ".") stacks the old root under the new one; unmounting "." then
    // removes it, with no directory left for it inside the Machine.
    sys.pivot_root(here, here)
        .map_err(step(|| "pivot_root".into()))?;
    sys.mount(None, here, None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)
        .map_err(step(|| "make old root a slave".into()))?;
    sys.umount2(here, MntFlags::MNT_DETACH)
        .map_err(step(|| "detach old root".into()))?;
    sys.chdir(Path::new("/")).map_err(step(|| "chdir /".into()))
}

/// As runc: the null device over files, an empty read-only tmpfs over directories. A
/// missing path is skipped; one with a symlink in it, or that cannot be masked, fails
/// the start.
fn mask_path(
    sys: &impl Syscall,
    root: BorrowedFd<'_>,
    path: &str,
    null: BorrowedFd<'_>,
) -> StepResult<()> {
    let found =
        inroot::existing_no_symlinks(root, Path::new(path)).map_err(|e| format!("mask {e}"))?;
    let Some(fd) = found else {
        return Ok(());
    };
    let stat = sys
        .fstat(fd.as_fd())
        .map_err(step(|| format!("stat {path}")))?;
    let target = inroot::fd_path(fd.as_fd());
    let result = if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
        sys.mount(
            Some(Path::new("tmpfs")),
            &target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        )
    } else {
        sys.mount(
            Some(&inroot::fd_path(null)),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )
    };
    result.map_err(step(|| format!("mask {path}")))
}

/// A read-only bind of `path` onto itself; missing is skipped, a symlink fails the start.
fn readonly_path(sys: &impl Syscall, root: BorrowedFd<'_>, path: &str) -> StepResult<()> {
    let found = || {
        inroot::existing_no_symlinks(root, Path::new(path))
            .map_err(|e| format!("make read-only {e}"))
    };
    let Some(fd) = found()? else {
        return Ok(());
    };
    let target = inroot::fd_path(fd.as_fd());
    sys.mount(
        Some(&target),
        &target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(step(|| format!("bind {path}")))?;
    // The remount must name the new bind mount's root: look the path up again, which
    // now ends on it (the first fd is on the mount below).
    let Some(fd) = found()? else {
        return Err(format!("{path} went away after its bind"));
    };
    let target = inroot::fd_path(fd.as_fd());
    sys.mount(
        Some(&target),
        &target,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
    .map_err(step(|| format!("make {path} read-only")))
}

fn rlimit_resource(name: &str) -> StepResult<libc::__rlimit_resource_t> {
    Ok(match name {
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        other => return Err(format!("unsupported rlimit {other}")),
    })
}

/// Bounding set first (needs CAP_SETPCAP), then the ids with capabilities kept across
/// setuid, then exactly the spec's sets.
fn set_user_and_capabilities(sys: &impl Syscall, process: &Process) -> StepResult<()> {
    let caps = process.capabilities().as_ref();
    let set =
        |list: Option<&HashSet<oci_spec::runtime::Capability>>| -> StepResult<caps::CapsHashSet> {
            list.into_iter()
                .flatten()
                .map(|c| {
                    let name = serde_json::to_value(c)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    caps::Capability::from_str(&name).map_err(step(|| format!("capability {name}")))
                })
                .collect()
        };
    let bounding = set(caps.and_then(|c| c.bounding().as_ref()))?;
    for cap in caps::all() {
        if !bounding.contains(&cap) && sys.has_cap(caps::CapSet::Bounding, cap).unwrap_or(false) {
            sys.drop_cap(caps::CapSet::Bounding, cap)
                .map_err(step(|| format!("drop {cap} from the bounding set")))?;
        }
    }
    let user = process.user();
    sys.set_keep_capabilities(true)
        .map_err(step(|| "keep capabilities".into()))?;
    let groups: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    sys.setgroups(&groups)
        .map_err(step(|| "setgroups".into()))?;
    sys.setresgid(nix::unistd::Gid::from_raw(user.gid()))
        .map_err(step(|| "setgid".into()))?;
    sys.setresuid(nix::unistd::Uid::from_raw(user.uid()))
        .map_err(step(|| "setuid".into()))?;
    sys.set_keep_capabilities(false)
        .map_err(step(|| "keep capabilities".into()))?;
    let permitted = set(caps.and_then(|c| c.permitted().as_ref()))?;
    let effective = set(caps.and_then(|c| c.effective().as_ref()))?;
    let inheritable = set(caps.and_then(|c| c.inheritable().as_ref()))?;
    let ambient = set(caps.and_then(|c| c.ambient().as_ref()))?;
    // Effective must stay a subset of permitted at every step.
    sys.set_caps(
        caps::CapSet::Effective,
        &effective.intersection(&permitted).copied().collect(),
    )
    .map_err(step(|| "set effective capabilities".into()))?;
    sys.set_caps(caps::CapSet::Permitted, &permitted)
        .map_err(step(|| "set permitted capabilities".into()))?;
    sys.set_caps(caps::CapSet::Inheritable, &inheritable)
        .map_err(step(|| "set inheritable capabilities".into()))?;
    sys.set_caps(caps::CapSet::Effective, &effective)
        .map_err(step(|| "set effective capabilities".into()))?;
    sys.set_caps(caps::CapSet::Ambient, &ambient)
        .map_err(step(|| "set ambient capabilities".into()))?;
    Ok(())
}

/// As runc: a name without '/' is looked up in the spec's PATH, inside the Machine; any
/// name must be an executable file, so that a wrong one fails the start (init, which
/// runs it, could only exit).
fn find_program(name: &str, env: &[String]) -> StepResult<CString> {
    let executable = |candidate: &Path| {
        fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = Path::new(name);
        if !executable(path) {
            return Err(format!("exec {name:?}: no executable file there"));
        }
        return CString::new(path.as_os_str().as_bytes()).map_err(step(|| "program path".into()));
    }
    let found = {
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| executable(candidate))
    };
    let found = found.ok_or_else(|| format!("executable file {name:?} not found in $PATH"))?;
    CString::new(found.as_os_str().as_bytes()).map_err(step(|| "program path".into()))
}

/// Writes a failure for the supervisor to read, then ends the child without running any
/// of the parent's exit code.
pub(crate) fn fail(errors: &OwnedFd, message: &str) -> ! {
    let _ = rustix::io::write(errors, message.as_bytes());
    // SAFETY: _exit ends the process at once; nothing of the forked parent runs.
    unsafe { libc::_exit(127) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use caps::Capability as Cap;

    use super::*;
    use crate::native::syscall::recording::{Call, RecordingSyscall};

    /// The Machine's first host id.
    const BASE: u32 = 200_000;

    /// A rootfs with some of Docker's masked and read-only paths (the others are missing,
    /// so skipped), and the spec Berth writes for a Machine running `app -v`.
    struct Fixture {
        _dir: tempfile::TempDir,
        host: PathBuf,
        rootfs: PathBuf,
        spec: Spec,
        layers: OverlayLayers,
        netns: OwnedFd,
        userns: OwnedFd,
        init: OwnedFd,
        out: OwnedFd,
        cgroup_procs: Vec<PathBuf>,
        volumes: Vec<(OwnedFd, String)>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let host = fs::canonicalize(dir.path()).unwrap();
            let rootfs = host.join("rootfs");
            for dir in ["proc/acpi", "proc/sys", "sys/firmware", "dev"] {
                fs::create_dir_all(rootfs.join(dir)).unwrap();
            }
            for file in ["proc/kcore", "proc/sysrq-trigger"] {
                fs::write(rootfs.join(file), "").unwrap();
            }
            // The command is looked up in PATH; in a test that is on the host.
            let bin = host.join("bin");
            fs::create_dir(&bin).unwrap();
            fs::write(bin.join("app"), "").unwrap();
            fs::set_permissions(bin.join("app"), fs::Permissions::from_mode(0o755)).unwrap();
            let bundle = crate::BundleSpec {
                machine_id: "m1".into(),
                args: vec!["app".into(), "-v".into()],
                env: vec![format!("PATH={}", bin.display()), "FOO=bar".into()],
                cwd: "/".into(),
                uid: 1000,
                gid: 1000,
                cpus: 1,
                memory_mb: 64,
                pids_limit: 100,
                disk_mb: None,
                private_ip: None,
                org: None,
                net_raw: false,
                volumes: Vec::new(),
            };
            let mut spec = crate::spec::build(&bundle, &rootfs, &host.join("netns")).unwrap();
            crate::spec::set_user_namespace(&mut spec, IdRange { base: BASE }, &host.join("ns"))
                .unwrap();
            let file = |name: &str| OwnedFd::from(fs::File::create(host.join(name)).unwrap());
            Fixture {
                layers: OverlayLayers::unmounted(&host).unwrap(),
                netns: file("netns"),
                userns: file("userns"),
                init: file("berth-init"),
                out: file("out"),
                cgroup_procs: vec![host.join("cgroup.procs")],
                volumes: Vec::new(),
                spec,
                rootfs,
                host,
                _dir: dir,
            }
        }

        fn recorder(&self) -> RecordingSyscall {
            RecordingSyscall::new(&self.rootfs)
        }

        /// Runs init's setup; it ends in the exec, which the recorder fails.
        fn run(&self, sys: &RecordingSyscall) -> String {
            let plan = InitPlan {
                spec: &self.spec,
                layers: &self.layers,
                rootfs: &self.rootfs,
                netns: self.netns.as_fd(),
                userns: self.userns.as_fd(),
                cgroup_procs: &self.cgroup_procs,
                init: self.init.as_fd(),
                volumes: &self.volumes,
            };
            let out = self.out.as_fd();
            match run_init(sys, &plan, out, out, &mut InitClock::off()) {
                Err(message) => message,
                Ok(never) => match never {},
            }
        }

        fn on_host(&self, name: &str) -> String {
            format!("host:{}", self.host.join(name).display())
        }
    }

    fn summaries(calls: &[Call]) -> Vec<String> {
        let mut trace: Vec<String> = calls.iter().map(Call::summary).collect();
        trace.dedup();
        trace
    }

    fn mounts_on(calls: &[Call], on: &str) -> Vec<Call> {
        calls
            .iter()
            .filter(|c| matches!(c, Call::Mount { target, .. } if target == on))
            .cloned()
            .collect()
    }

    fn mount(source: &str, target: &str, fstype: Option<&str>, flags: MsFlags) -> Call {
        Call::Mount {
            source: Some(source.into()),
            target: target.into(),
            fstype: fstype.map(Into::into),
            flags,
            data: None,
        }
    }

    #[test]
    fn setup_runs_in_runcs_order_and_ends_in_the_exec_of_init() {
        let f = Fixture::new();
        let sys = f.recorder();
        f.run(&sys);
        let expected = [
            "Umask",
            "JoinCgroup",
            "setns net",
            "Unshare",
            "mount host:/",
            "mount_overlay /",
            // config.json's mounts, in its order, before the devices and pivot_root.
            "mount /proc",
            "mount /dev",
            "mount /dev/pts",
            "mount /sys",
            "mount /sys/fs/cgroup",
            "mount /dev/mqueue",
            "mount /dev/shm",
            "Mknod",
            "Symlink",
            "fchdir /",
            "PivotRoot",
            "mount .",
            "Umount2",
            "chdir /",
            // Masks and read-only paths after pivot_root; missing ones are skipped.
            "mount /proc/acpi",
            "mount /proc/kcore",
            "mount /sys/firmware",
            "mount /proc/sys",
            "remount /proc/sys",
            "mount /proc/sysrq-trigger",
            "remount /proc/sysrq-trigger",
            // The user namespace after the hostname, before ids and capabilities.
            "Sethostname",
            "Umask",
            "setns user",
            "Setrlimit",
            "ResetSignal",
            "Dup2",
            "DropCap",
            "KeepCapabilities",
            "Setgroups",
            "Setresgid",
            "Setresuid",
            "KeepCapabilities",
            "SetCaps",
            // no_new_privs and seccomp last; then only the cwd and the exec.
            "NoNewPrivs",
            "NotDumpable",
            "SetParentDeathSignal",
            "Seccomp",
            // The cwd is looked up outside the seam, so on the host in a test.
            "fchdir host:/",
            "BlockSignals",
            "Fexecve",
        ];
        assert_eq!(summaries(&sys.calls()), expected);
    }

    #[test]
    fn volumes_are_attached_on_the_overlay_at_their_paths_inside_it() {
        let mut f = Fixture::new();
        let volume = OwnedFd::from(fs::File::create(f.host.join("volume")).unwrap());
        f.volumes = vec![(volume, "/data/db".into())];
        let sys = f.recorder();
        f.run(&sys);
        let trace = summaries(&sys.calls());
        let at = |call: &str| {
            trace
                .iter()
                .position(|c| c == call)
                .unwrap_or_else(|| panic!("{call} missing from {trace:?}"))
        };
        // After the overlay (it mounts onto it), before config.json's mounts.
        assert!(
            at("mount_overlay /") < at("attach_mount /data/db"),
            "{trace:?}"
        );
        assert!(at("attach_mount /data/db") < at("mount /proc"), "{trace:?}");
        // The path is made inside the rootfs, as for every mount destination.
        assert!(f.rootfs.join("data/db").is_dir());
    }

    #[test]
    fn mounts_take_the_configs_flags_and_the_machines_ids() {
        let f = Fixture::new();
        let sys = f.recorder();
        f.run(&sys);
        let calls = sys.calls();
        let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
        assert_eq!(calls[0], Call::Umask(0));
        assert_eq!(
            calls[1],
            Call::JoinCgroup(f.host.join("cgroup.procs").display().to_string())
        );
        assert_eq!(
            calls[2],
            Call::Setns(f.on_host("netns"), CloneFlags::CLONE_NEWNET)
        );
        assert_eq!(
            calls[3],
            Call::Unshare(
                CloneFlags::CLONE_NEWNS
                    | CloneFlags::CLONE_NEWUTS
                    | CloneFlags::CLONE_NEWIPC
                    | CloneFlags::CLONE_NEWCGROUP
            )
        );
        assert_eq!(
            calls[4],
            Call::Mount {
                source: None,
                target: "host:/".into(),
                fstype: None,
                flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                data: None,
            }
        );
        assert_eq!(calls[5], Call::MountOverlay("/".into()));
        let with_data = |call: Call, data: &str| match call {
            Call::Mount {
                source,
                target,
                fstype,
                flags,
                data: _,
            } => Call::Mount {
                source,
                target,
                fstype,
                flags,
                data: Some(data.into()),
            },
            other => other,
        };
        let tmpfs_ids = format!("uid={BASE},gid={BASE}");
        let expected = [
            mount("proc", "/proc", Some("proc"), nosuid_noexec_nodev),
            with_data(
                mount(
                    "tmpfs",
                    "/dev",
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
                ),
                &format!("mode=755,size=65536k,{tmpfs_ids}"),
            ),
            // devpts's gid is the Machine's 5, mapped; devpts gets no uid added.
            with_data(
                mount(
                    "devpts",
                    "/dev/pts",
                    Some("devpts"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                ),
                &format!("newinstance,ptmxmode=0666,mode=0620,gid={}", BASE + 5),
            ),
            mount(
                "sysfs",
                "/sys",
                Some("sysfs"),
                nosuid_noexec_nodev | MsFlags::MS_RDONLY,
            ),
            // The Machine's own cgroup namespace, as cgroup2.
            mount(
                "cgroup2",
                "/sys/fs/cgroup",
                Some("cgroup2"),
                nosuid_noexec_nodev | MsFlags::MS_RELATIME | MsFlags::MS_RDONLY,
            ),
            mount("mqueue", "/dev/mqueue", Some("mqueue"), nosuid_noexec_nodev),
            with_data(
                mount("shm", "/dev/shm", Some("tmpfs"), nosuid_noexec_nodev),
                &format!("mode=1777,size=65536k,{tmpfs_ids}"),
            ),
        ];
        assert_eq!(calls[6..6 + expected.len()], expected);
        // Each destination was made inside the rootfs, where the mount went.
        assert!(f.rootfs.join("dev/mqueue").is_dir());
        assert!(f.rootfs.join("sys/fs/cgroup").is_dir());
        assert_eq!(
            sys.calls()
                .iter()
                .filter(|c| **c == Call::Sethostname("m1".into()))
                .count(),
            1
        );
    }

    #[test]
    fn devices_are_runcs_and_masks_bind_the_checked_null() {
        let f = Fixture::new();
        let sys = f.recorder();
        f.run(&sys);
        let calls = sys.calls();
        let made: Vec<Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::Mknod { .. }))
            .cloned()
            .collect();
        let char_device = |name: &str, major, minor| Call::Mknod {
            path: format!("/dev/{name}"),
            kind: FileType::CharacterDevice,
            mode: 0o666,
            dev: rustix::fs::makedev(major, minor),
        };
        assert_eq!(
            made,
            [
                char_device("null", 1, 3),
                char_device("zero", 1, 5),
                char_device("full", 1, 7),
                char_device("random", 1, 8),
                char_device("urandom", 1, 9),
                char_device("tty", 5, 0),
            ]
        );
        assert!(calls.contains(&Call::Symlink {
            target: "/proc/self/fd".into(),
            link: "/dev/fd".into(),
        }));
        // A file is masked by the null device made above, a directory by an empty tmpfs.
        assert_eq!(
            mounts_on(&calls, "/proc/kcore"),
            [mount("/dev/null", "/proc/kcore", None, MsFlags::MS_BIND)]
        );
        assert_eq!(
            mounts_on(&calls, "/proc/acpi"),
            [mount(
                "tmpfs",
                "/proc/acpi",
                Some("tmpfs"),
                MsFlags::MS_RDONLY
            )]
        );
        assert_eq!(
            mounts_on(&calls, "/proc/sys"),
            [
                mount(
                    "/proc/sys",
                    "/proc/sys",
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC
                ),
                mount(
                    "/proc/sys",
                    "/proc/sys",
                    None,
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC
                ),
            ]
        );
        assert!(mounts_on(&calls, "/proc/keys").is_empty());
        // Init's stdin is that null device too; its stdout and stderr the ones passed.
        let dup2: Vec<Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::Dup2(..)))
            .cloned()
            .collect();
        let out = f.on_host("out");
        assert_eq!(
            dup2,
            [
                Call::Dup2("/dev/null".into(), 0),
                Call::Dup2(out.clone(), 1),
                Call::Dup2(out, 2),
            ]
        );
    }

    #[test]
    fn credentials_are_the_specs_and_init_is_execed_by_descriptor() {
        let f = Fixture::new();
        let sys = f.recorder();
        let error = f.run(&sys);
        let calls = sys.calls();
        let process = f.spec.process().as_ref().unwrap();
        let nofile = process.rlimits().as_ref().unwrap()[0].hard();
        assert!(calls.contains(&Call::Setrlimit {
            resource: libc::RLIMIT_NOFILE,
            soft: nofile,
            hard: nofile,
        }));
        let kept: caps::CapsHashSet = [
            Cap::CAP_CHOWN,
            Cap::CAP_DAC_OVERRIDE,
            Cap::CAP_FSETID,
            Cap::CAP_FOWNER,
            Cap::CAP_MKNOD,
            Cap::CAP_SETGID,
            Cap::CAP_SETUID,
            Cap::CAP_SETFCAP,
            Cap::CAP_SETPCAP,
            Cap::CAP_NET_BIND_SERVICE,
            Cap::CAP_SYS_CHROOT,
            Cap::CAP_KILL,
            Cap::CAP_AUDIT_WRITE,
        ]
        .into_iter()
        .collect();
        let dropped: caps::CapsHashSet = calls
            .iter()
            .filter_map(|c| match c {
                Call::DropCap("bounding", cap) => Some(*cap),
                _ => None,
            })
            .collect();
        assert_eq!(dropped, caps::all().difference(&kept).copied().collect());
        let ids_and_sets: Vec<Call> = calls
            .iter()
            .skip_while(|c| !matches!(c, Call::KeepCapabilities(true)))
            .take_while(|c| !matches!(c, Call::NoNewPrivs))
            .cloned()
            .collect();
        let none = caps::CapsHashSet::new();
        assert_eq!(
            ids_and_sets,
            [
                Call::KeepCapabilities(true),
                Call::Setgroups(vec![]),
                Call::Setresgid(1000),
                Call::Setresuid(1000),
                Call::KeepCapabilities(false),
                Call::SetCaps("effective", kept.clone()),
                Call::SetCaps("permitted", kept.clone()),
                Call::SetCaps("inheritable", none.clone()),
                Call::SetCaps("effective", kept),
                Call::SetCaps("ambient", none),
            ]
        );
        // The parent-death signal a credential change cleared, set again after it.
        assert!(calls.contains(&Call::SetParentDeathSignal(Some(
            rustix::process::Signal::Kill
        ))));
        let profile = f.spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        let programs: Vec<Call> = seccomp::compile(profile)
            .unwrap()
            .iter()
            .map(|p| Call::Seccomp(p.len()))
            .collect();
        let applied: Vec<Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::Seccomp(_)))
            .cloned()
            .collect();
        assert!(!programs.is_empty());
        assert_eq!(applied, programs);
        // berth-init, from its descriptor, with the program found in PATH and its argv.
        let program = f.host.join("bin/app").display().to_string();
        let env = process.env().clone().unwrap();
        assert_eq!(
            calls.last(),
            Some(&Call::Fexecve {
                program: f.on_host("berth-init"),
                argv: vec![
                    "berth-init".into(),
                    program.clone(),
                    "app".into(),
                    "-v".into()
                ],
                env,
            })
        );
        assert_eq!(
            error,
            format!("exec berth-init for {program}: {}", nix::Error::ENOEXEC)
        );
    }

    #[test]
    fn exec_into_a_machine_keeps_its_stdin_and_execs_the_command_itself() {
        let f = Fixture::new();
        let sys = f.recorder();
        let process = f.spec.process().as_ref().unwrap();
        let out = f.out.as_fd();
        let Err(error) = exec_process(
            &sys,
            &f.spec,
            process,
            None,
            out,
            out,
            &mut InitClock::off(),
        );
        let calls = sys.calls();
        assert!(!calls.iter().any(|c| matches!(
            c,
            Call::Mount { .. } | Call::Setns(..) | Call::Dup2(_, 0) | Call::BlockSignals
        )));
        let program = f.host.join("bin/app").display().to_string();
        assert!(
            matches!(calls.last(), Some(Call::Execve { program: p, argv, .. })
                if *p == program && *argv == ["app", "-v"]),
            "{calls:?}"
        );
        assert_eq!(error, format!("exec {program}: {}", nix::Error::ENOEXEC));
    }

    #[test]
    fn a_failing_call_stops_the_setup_and_names_the_step() {
        type Which = fn(&Call) -> bool;
        let cases: [(Which, String); 11] = [
            (|c| matches!(c, Call::JoinCgroup(_)), "join cgroup".into()),
            (
                |c| matches!(c, Call::MountOverlay(_)),
                "mount the rootfs".into(),
            ),
            (
                |c| matches!(c, Call::Mount { target, .. } if target == "/dev/pts"),
                format!("mount devpts on /dev/pts: {}", nix::Error::EPERM),
            ),
            (
                |c| matches!(c, Call::Mknod { path, .. } if path == "/dev/null"),
                "mknod /dev/null".into(),
            ),
            (|c| matches!(c, Call::PivotRoot(..)), "pivot_root".into()),
            (
                |c| matches!(c, Call::Mount { target, .. } if target == "/proc/kcore"),
                format!("mask /proc/kcore: {}", nix::Error::EPERM),
            ),
            (
                |c| matches!(c, Call::Mount { flags, .. } if flags.contains(MsFlags::MS_REMOUNT)),
                "make /proc/sys read-only".into(),
            ),
            (
                |c| matches!(c, Call::Setns(_, kind) if *kind == CloneFlags::CLONE_NEWUSER),
                "join user namespace".into(),
            ),
            (|c| matches!(c, Call::Setresuid(_)), "setuid".into()),
            (|c| matches!(c, Call::NoNewPrivs), "set no_new_privs".into()),
            (|c| matches!(c, Call::Seccomp(_)), "apply seccomp".into()),
        ];
        for (which, message) in cases {
            let f = Fixture::new();
            let sys = f.recorder().failing(which, libc::EPERM);
            let error = f.run(&sys);
            assert!(error.starts_with(&message), "{error:?} for {message:?}");
            // Nothing after the failed call.
            let calls = sys.calls();
            let failed = calls.iter().position(which).unwrap();
            assert_eq!(failed, calls.len() - 1, "{message}: {calls:?}");
        }
    }

    #[test]
    fn a_symlinked_masked_path_fails_the_start_before_the_hostname() {
        let f = Fixture::new();
        fs::remove_file(f.rootfs.join("proc/kcore")).unwrap();
        symlink("/etc/passwd", f.rootfs.join("proc/kcore")).unwrap();
        let sys = f.recorder();
        let error = f.run(&sys);
        assert_eq!(error, "mask /proc/kcore: has a symlink; refused");
        let calls = sys.calls();
        assert!(mounts_on(&calls, "/proc/kcore").is_empty());
        assert_eq!(
            calls.last().map(Call::summary).as_deref(),
            Some("mount /proc/acpi")
        );
    }
}
