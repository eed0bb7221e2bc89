//! The unified (v2) hierarchy: the limit files of the controllers that live there,
//! enabling those controllers for Berth's cgroups, and forking straight into a cgroup.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::{annotate, write, AGENT_LEAF, CPU_PERIOD_US};

/// `(file, value)` for each limit of a Machine on the v2 hierarchy, for the `controllers`
/// (of memory, cpu, pids) that live there. Swap is the spec's memory+swap total, as v1's
/// `memory.memsw.limit_in_bytes`; v2's `memory.swap.max` is the swap alone.
pub(super) fn limit_values(
    controllers: &[&str],
    resources: Option<&LinuxResources>,
) -> io::Result<Vec<(&'static str, String)>> {
    let unlimited = |v: i64| v < 0;
    let mut out = Vec::new();
    if controllers.contains(&"memory") {
        let memory = resources.and_then(|r| r.memory().as_ref());
        let limit = memory.and_then(|m| m.limit()).unwrap_or(-1);
        let total = memory.and_then(|m| m.swap()).unwrap_or(-1);
        out.push((
            "memory.max",
            if unlimited(limit) {
                "max".to_owned()
            } else {
                limit.to_string()
            },
        ));
        let swap = if unlimited(limit) || unlimited(total) {
            "max".to_owned()
        } else if total >= limit {
            (total - limit).to_string()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("memory+swap limit {total} is below the memory limit {limit}"),
            ));
        };
        out.push(("memory.swap.max", swap));
    }
    if controllers.contains(&"cpu") {
        let cpu = resources.and_then(|r| r.cpu().as_ref());
        let period = cpu.and_then(|c| c.period()).unwrap_or(CPU_PERIOD_US);
        let quota = cpu
            .and_then(|c| c.quota())
            .filter(|q| *q > 0)
            .map_or_else(|| "max".to_owned(), |q| q.to_string());
        out.push(("cpu.max", format!("{quota} {period}")));
    }
    if controllers.contains(&"pids") {
        let limit = resources
            .and_then(|r| r.pids().as_ref())
            .map(|p| p.limit())
            .filter(|l| *l > 0)
            .map_or_else(|| "max".to_owned(), |l| l.to_string());
        out.push(("pids.max", limit));
    }
    Ok(out)
}

/// Writes the limits into the Machine's v2 cgroup `dir`. `memory.swap.max` is absent on
/// a kernel without swap accounting, as v1's `memsw` files are: then swap is not limited.
pub(super) fn write_limits(
    dir: &Path,
    controllers: &[&str],
    resources: Option<&LinuxResources>,
) -> io::Result<()> {
    for (file, value) in limit_values(controllers, resources)? {
        let path = dir.join(file);
        if file == "memory.swap.max" && !path.exists() {
            continue;
        }
        write(&path, &value)?;
    }
    Ok(())
}

/// The controllers named in a `cgroup.controllers` or `cgroup.subtree_control` file.
pub(super) fn listed(dir: &Path, file: &str) -> io::Result<Vec<String>> {
    let path = dir.join(file);
    let text = fs::read_to_string(&path).map_err(|e| annotate(e, "read", &path))?;
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

/// Adds the `wanted` controllers missing from `dir`'s `cgroup.subtree_control`.
fn enable_in(dir: &Path, wanted: &[&str]) -> io::Result<()> {
    let present = listed(dir, "cgroup.subtree_control")?;
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !present.iter().any(|p| p == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&dir.join("cgroup.subtree_control"), &missing.join(" "))
}

/// Makes the `wanted` controllers available to `<own>/berth/<id>`: enabled in the
/// subtree of every cgroup from the hierarchy's root down to `<own>/berth`.
///
/// A cgroup other than the root may not both hold processes and hand controllers to its
/// children, and `own`, where this process was started, usually holds it (and maybe its
/// threads): then this process first moves itself into the leaf `<own>/berth-agent`.
/// Processes of others in `own` make the write fail with EBUSY: the error says so.
pub(super) fn enable_controllers(
    mount: &Path,
    own: &Path,
    wanted: &[&str],
    pid: u32,
) -> io::Result<PathBuf> {
    let mut dir = mount.to_path_buf();
    let below = own.strip_prefix(mount).map_err(|_| {
        io::Error::other(format!(
            "{} is not below {}",
            own.display(),
            mount.display()
        ))
    })?;
    for part in below.components() {
        enable_in(&dir, wanted)?;
        dir.push(part);
    }
    let present = listed(own, "cgroup.subtree_control")?;
    let needs_enabling = wanted.iter().any(|c| !present.iter().any(|p| p == c));
    // The root has no cgroup.type, and is the one cgroup exempt from the rule.
    let is_root = !own.join("cgroup.type").exists();
    if needs_enabling && !is_root && !listed(own, "cgroup.procs")?.is_empty() {
        let leaf = own.join(AGENT_LEAF);
        fs::create_dir_all(&leaf).map_err(|e| annotate(e, "create", &leaf))?;
        write(&leaf.join("cgroup.procs"), &pid.to_string())?;
    }
    enable_in(own, wanted).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            io::Error::new(
                e.kind(),
                format!(
                    "{e}: the cgroup still holds processes other than this one; run Berth \
                     in a cgroup of its own (with systemd: Delegate=yes and \
                     DelegateSubgroup={AGENT_LEAF})"
                ),
            )
        } else {
            e
        }
    })?;
    let berth = own.join("berth");
    fs::create_dir_all(&berth).map_err(|e| annotate(e, "create", &berth))?;
    enable_in(&berth, wanted)?;
    Ok(berth)
}

/// From the kernel's uapi `linux/sched.h` (libc's constant is an i32 that overflows).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of the kernel's uapi `linux/sched.h`, up to `cgroup` (version 2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// fork(2), with the child born in the v2 cgroup `cgroup` (`clone3` with
/// `CLONE_INTO_CGROUP`, Linux 5.7): no migration of the child afterwards. `Ok(None)` in
/// the child, the child's pid in the parent.
///
/// # Safety
/// As for fork: in the child of a multi-threaded process only async-signal-safe calls
/// are allowed. And unlike glibc's fork, the raw syscall leaves the child's cached thread
/// id (in glibc's thread descriptor) at the parent's; glibc reads it only for pthread
/// calls aimed at other threads, robust and error-checking mutexes, none of which the
/// child may use (signals to itself, raise and abort, ask the kernel for the tid).
pub(crate) unsafe fn clone_into(cgroup: BorrowedFd<'_>) -> io::Result<Option<nix::unistd::Pid>> {
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed; with no stack given the
    // child runs on a copy of this stack, returning from the syscall as after a fork.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        0 => Ok(None),
        pid if pid > 0 => Ok(Some(nix::unistd::Pid::from_raw(pid as i32))),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Whether a `clone_into` error means the kernel lacks clone3 or `CLONE_INTO_CGROUP`
/// (before 5.3 and 5.7), so a plain fork and a write to `cgroup.procs` must do.
pub(crate) fn clone_into_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EINVAL)
    )
}
