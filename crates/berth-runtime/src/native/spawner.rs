//! The per-worker spawner: a zygote started once per runtime (`berth shim spawner
//! --socket PATH`), single-threaded, that keeps one spare supervisor forked ahead of
//! time instead of exec'ing a binary per start.
//!
//! The spare has done the set-up every supervisor shares and waits in `accept`. Per start
//! the runtime connects to the socket and sends one JSON [`StartRequest`] line; the spare
//! takes it, tells the spawner (which forks the next spare), and becomes the Machine's
//! supervisor (the shim's job: its own session, stdio to the capped log, the exit record):
//! it makes a new pid namespace, forks the Machine's init and reports on the connection
//! once init has called execve (a close-on-exec pipe says so), or why it could not. The
//! spawner exits when its stdin (held open by the runtime) closes, and a spare that has
//! not taken a start dies with it; Machines and their supervisors outlive it.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sched::CloneFlags;
use rustix::event::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};

use super::cgroup;
use super::init::{self, InitPlan};
use super::syscall::LinuxSyscall;
use crate::host::run_dir::INIT_PID_FILE;
use crate::overlay::OverlayLayers;
use crate::supervisor::{self, Report, Supervisor, SupervisorArgs};
use crate::timing::{micros, StepTimes};
use crate::{seccomp, util, MachineLayout};

/// First argument of the shim command that makes it the spawner.
pub const SPAWNER_ARG: &str = "spawner";
/// What the spawner prints on stdout once it listens.
pub const READY_LINE: &str = "ready";

/// One start, as the runtime asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    pub id: String,
    /// The Machine's directory (see [`MachineLayout`]).
    pub dir: PathBuf,
    /// Image layers, bottom first.
    pub lowerdirs: Vec<PathBuf>,
    /// `cgroup.procs` files of the v1 cgroups init joins.
    pub cgroup_procs: Vec<PathBuf>,
    /// The Machine's cgroup on the unified hierarchy, which init is born into.
    #[serde(default)]
    pub cgroup_v2: Option<PathBuf>,
    pub log_max_bytes: u64,
}

/// `berth shim spawner --socket PATH`: serves until stdin closes.
pub fn main_with_args(args: Vec<OsString>) -> i32 {
    let socket = match args.as_slice() {
        [flag, path] if flag == "--socket" => PathBuf::from(path),
        _ => {
            eprintln!("berth-shim spawner: usage: spawner --socket PATH");
            return 2;
        }
    };
    match serve(&socket) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("berth-shim spawner: {e}");
            1
        }
    }
}

fn serve(socket: &Path) -> io::Result<()> {
    // A fresh exec: anything above stdio was leaked by the agent (no close-on-exec), and
    // spares, supervisors and Machines would all inherit it.
    crate::helper::close_fds_except(&[]).map_err(io::Error::other)?;
    // Spares and supervisors are reaped by the kernel: the spawner never waits for them.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGCHLD,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }?;
    // Machines inherit it compiled, instead of compiling it on every start.
    seccomp::precompile_default().map_err(io::Error::other)?;
    // Every Machine's init, inherited by every spare and supervisor.
    let init = crate::machine_init::sealed_memfd()?;
    util::remove_file_if_exists(socket)?;
    let listener = UnixListener::bind(socket)?;
    let (host_root, host_mnt) = isolate_mounts()?;
    {
        use std::io::Write;
        let mut out = io::stdout();
        writeln!(out, "{READY_LINE}")?;
        out.flush()?;
    }
    let stdin = io::stdin();
    loop {
        let spare = fork_spare(&listener, host_root.as_fd(), host_mnt.as_fd(), init.as_fd())?;
        // Wait until the spare has taken a start (or died), or the runtime went away.
        let (taken, runtime_gone) = loop {
            let mut fds = [
                PollFd::new(&spare.taken, PollFlags::IN),
                PollFd::new(&stdin, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, -1) {
                Ok(_) => break (!fds[0].revents().is_empty(), !fds[1].revents().is_empty()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if runtime_gone {
            // EOF or error on stdin: the spare (still waiting) and the spawner go.
            let _ = nix::sys::signal::kill(spare.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = util::remove_file_if_exists(socket);
            return Ok(());
        }
        if taken {
            let mut byte = [0u8; 1];
            if !matches!(rustix::io::read(&spare.taken, &mut byte), Ok(1)) {
                // It died without taking a start; don't spin if that keeps happening.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// A supervisor forked ahead of its start: it has done the set-up every Machine shares
/// and waits in `accept` for the next start request. The fork and that set-up are off
/// the start path; the spawner forks the next spare once this one says it took a start.
struct Spare {
    pid: nix::unistd::Pid,
    /// One byte arrives when the spare has accepted a start; EOF when it died.
    taken: OwnedFd,
}

/// Moves the spawner into a private copy of the host's mount namespace without the
/// network namespace pins (one nsfs bind mount per Machine). Every start copies the mount
/// table of the namespace it is forked in (init's `unshare(CLONE_NEWNS)`), and with a
/// thousand stopped Machines on the host their pins alone made start milliseconds slower.
/// Pins made later stay out too (the copy is private); supervisors open them through the
/// returned handle on the host's root, whose lookups cross the host's mounts.
fn isolate_mounts() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::fs::{Mode, OFlags};
    let host_root = rustix::fs::open(
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // Volumes are mounted on the host, after this copy is made: a start clones them from
    // the host's namespace (see `clone_volumes`).
    let host_mnt = rustix::fs::open(
        "/proc/self/ns/mnt",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    for target in nsfs_mount_points(&mountinfo) {
        // Only this private copy loses them; the host keeps every pin.
        let _ = nix::mount::umount2(target.as_path(), nix::mount::MntFlags::MNT_DETACH);
    }
    // A copy of a volume's mount would keep its filesystem and loop device alive after
    // the worker unmounts it (volume delete) for as long as any supervisor lives.
    for target in volume_mount_points(&mountinfo, &crate::volume::volume_devices()) {
        let _ = nix::mount::umount2(target.as_path(), nix::mount::MntFlags::MNT_DETACH);
    }
    Ok((host_root, host_mnt))
}

/// Mount points of volumes in a mountinfo text: a worker's ([`crate::volume::
/// VOLUME_MOUNT_DIR`]) and any other mount of a volume's device, such as the clone on a
/// running runc Machine's rootfs (`devices`, `major:minor`).
fn volume_mount_points(mountinfo: &str, devices: &[String]) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let point = PathBuf::from(unescape_mountinfo(fields.nth(1)?));
            let named =
                point.file_name() == Some(std::ffi::OsStr::new(crate::volume::VOLUME_MOUNT_DIR));
            (named || devices.iter().any(|d| d == device)).then_some(point)
        })
        .collect()
}

/// Detached clones of the Machine's volumes, idmapped through its user namespace. The
/// volumes are mounted in the host's mount namespace, so the clones are made there (a
/// mount is cloned only from the caller's own namespace) and the supervisor goes back.
fn clone_volumes(
    volumes: &[crate::volume::VolumeMount],
    host_mnt: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
) -> Result<Vec<(OwnedFd, String)>, String> {
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let own = rustix::fs::open(
        "/proc/self/ns/mnt",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("open own mount namespace: {e}"))?;
    rustix::thread::move_into_link_name_space(
        host_mnt,
        Some(rustix::thread::LinkNameSpaceType::Mount),
    )
    .map_err(|e| format!("enter the host's mount namespace: {e}"))?;
    let clones: Result<Vec<OwnedFd>, String> = volumes
        .iter()
        .map(|volume| {
            crate::volume::clone_mount(&volume.source).map_err(|e| format!("volume: {e}"))
        })
        .collect();
    rustix::thread::move_into_link_name_space(
        own.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Mount),
    )
    .map_err(|e| format!("leave the host's mount namespace: {e}"))?;
    clones?
        .into_iter()
        .zip(volumes)
        .map(|(clone, volume)| {
            crate::overlay::idmap_mount(clone.as_fd(), userns)
                .map_err(|e| format!("idmap volume {}: {e}", volume.source.display()))?;
            Ok((clone, volume.destination.clone()))
        })
        .collect()
}

/// Mount points of `nsfs` mounts in a `/proc/<pid>/mountinfo` text.
fn nsfs_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (fstype == "nsfs").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
pub(crate) fn unescape_mountinfo(field: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], escaped) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

fn fork_spare(
    listener: &UnixListener,
    host_root: BorrowedFd<'_>,
    host_mnt: BorrowedFd<'_>,
    init: BorrowedFd<'_>,
) -> io::Result<Spare> {
    let (taken_r, taken_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let spawner = nix::unistd::getpid();
    // SAFETY: the spawner is single-threaded, so the child may run any code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Spare {
            pid: child,
            taken: taken_r,
        }),
        nix::unistd::ForkResult::Child => {
            drop(taken_r);
            let code = run_spare(listener, taken_w, spawner, host_root, host_mnt, init);
            // SAFETY: _exit ends the forked child without the spawner's exit paths.
            unsafe { libc::_exit(code) }
        }
    }
}

/// The spare's life: set up, take one start, then become that Machine's supervisor.
fn run_spare(
    listener: &UnixListener,
    taken: OwnedFd,
    spawner: nix::unistd::Pid,
    host_root: BorrowedFd<'_>,
    host_mnt: BorrowedFd<'_>,
    init: BorrowedFd<'_>,
) -> i32 {
    // Until it takes a start, a spare dies with the spawner; then it must outlive it.
    if rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::Kill))
        .is_err()
        || nix::unistd::getppid() != spawner
    {
        return 1;
    }
    let identity = nix::unistd::setsid()
        .map_err(io::Error::from)
        .and_then(|_| {
            supervisor::prepare_process(&[
                listener.as_raw_fd(),
                taken.as_raw_fd(),
                host_root.as_raw_fd(),
                host_mnt.as_raw_fd(),
            ])
        })
        .and_then(|()| supervisor::own_identity());
    let Ok(identity) = identity else {
        return 1;
    };
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return 1,
        }
    };
    if rustix::io::write(&taken, &[1]).is_err()
        || rustix::process::set_parent_process_death_signal(None).is_err()
    {
        supervisor::report(
            conn.as_fd(),
            &Report::failed("the spawner went away during the start"),
        );
        return 1;
    }
    drop(taken);
    // SAFETY: closes this process's copy of the listener, which it never uses again.
    unsafe { libc::close(listener.as_raw_fd()) };
    match read_request(&conn) {
        Ok(request) => supervise(
            request,
            OwnedFd::from(conn),
            identity,
            host_root,
            host_mnt,
            init,
        ),
        Err(e) => {
            supervisor::report(
                conn.as_fd(),
                &Report::failed(format!("bad start request: {e}")),
            );
            1
        }
    }
}

fn read_request(conn: &UnixStream) -> io::Result<StartRequest> {
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    serde_json::from_str(line.trim()).map_err(io::Error::other)
}

/// The supervisor: returns its exit code.
fn supervise(
    request: StartRequest,
    conn: OwnedFd,
    identity: (u32, u64),
    host_root: BorrowedFd<'_>,
    host_mnt: BorrowedFd<'_>,
    init: BorrowedFd<'_>,
) -> i32 {
    let layout = MachineLayout {
        id: request.id.clone(),
        dir: request.dir.clone(),
    };
    let fail = |message: String| {
        supervisor::report(conn.as_fd(), &Report::failed(message));
        1
    };
    let opts = SupervisorArgs {
        id: request.id.clone(),
        run_dir: layout.run_dir(),
        log_dir: layout.log_dir(),
        log_max_bytes: request.log_max_bytes,
    };
    let mut mark = Instant::now();
    let mut steps = StepTimes::new();
    let mut supervisor = match Supervisor::for_machine(&opts, identity) {
        Ok(s) => s,
        Err(e) => return fail(format!("shim setup for {}: {e}", request.id)),
    };
    steps.lap("supervisor_setup", &mut mark);
    let started = start_init(
        &request,
        &layout,
        &mut supervisor,
        &mut steps,
        host_root,
        host_mnt,
        init,
    );
    // SAFETY: this process's inherited copy of the spawner's handle; nothing here uses it
    // again, and a supervisor has no business holding the host's root.
    unsafe { libc::close(host_root.as_raw_fd()) };
    // SAFETY: as for host_root: the host's mount namespace, used only before the fork.
    unsafe { libc::close(host_mnt.as_raw_fd()) };
    // SAFETY: as for host_root: init has exec'd it (or failed), nothing here uses it again.
    unsafe { libc::close(init.as_raw_fd()) };
    match started {
        Ok((pid, layers)) => {
            let oom = supervisor::OomCounter::for_process(pid);
            supervisor::report(conn.as_fd(), &Report::started(pid, steps));
            drop(conn);
            supervisor.supervise(supervisor::InitProcess { pid, oom });
            // Torn down only now, with the Machine gone: see `OverlayLayers`.
            drop(layers);
            0
        }
        Err(message) => fail(message),
    }
}

/// Forks the Machine's init into a new pid namespace; returns its host pid once it has
/// called execve.
fn start_init(
    request: &StartRequest,
    layout: &MachineLayout,
    supervisor: &mut Supervisor,
    steps: &mut StepTimes,
    host_root: BorrowedFd<'_>,
    host_mnt: BorrowedFd<'_>,
    init: BorrowedFd<'_>,
) -> Result<(u32, OverlayLayers), String> {
    let mut mark = Instant::now();
    let id = &request.id;
    let config = layout.config_json();
    let text = std::fs::read(&config).map_err(|e| format!("read {}: {e}", config.display()))?;
    let spec: oci_spec::runtime::Spec =
        serde_json::from_slice(&text).map_err(|e| format!("parse {}: {e}", config.display()))?;
    let (stdout_w, stderr_w) = supervisor
        .take_child_stdio()
        .ok_or_else(|| "shim stdio already used".to_owned())?;
    steps.lap("config_read", &mut mark);
    // Children forked from here on start a new pid namespace: init is its pid 1.
    nix::sched::unshare(CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("new pid namespace for {id}: {e}"))?;
    let (errors_r, errors_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    let (marks_r, marks_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    let rootfs = layout.rootfs();
    // Through the host's root: the pin is a mount the spawner's namespace does not have.
    let netns_path = layout.netns();
    let netns = rustix::fs::openat(
        host_root,
        netns_path.strip_prefix("/").unwrap_or(&netns_path),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("open network namespace {}: {e}", netns_path.display()))?;
    let userns_path = layout.userns();
    let userns = rustix::fs::openat(
        host_root,
        userns_path.strip_prefix("/").unwrap_or(&userns_path),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("open user namespace {}: {e}", userns_path.display()))?;
    steps.lap("pid_namespace", &mut mark);
    let layers = OverlayLayers::open(
        &request.lowerdirs,
        &layout.upper(),
        &layout.work(),
        userns.as_fd(),
    )
    .map_err(|e| format!("open the layers of {id}: {e}"))?;
    steps.lap("overlay_layers", &mut mark);
    let volume_mounts = crate::volume::mounts_of(&spec)?;
    let volumes = clone_volumes(&volume_mounts, host_mnt, userns.as_fd())?;
    if !volumes.is_empty() {
        steps.lap("volumes", &mut mark);
    }
    let plan = InitPlan {
        spec: &spec,
        layers: &layers,
        rootfs: &rootfs,
        netns: netns.as_fd(),
        userns: userns.as_fd(),
        cgroup_procs: &request.cgroup_procs,
        init,
        volumes: &volumes,
    };
    let v2_cgroup = request
        .cgroup_v2
        .as_ref()
        .map(|dir| {
            rustix::fs::open(
                dir,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| format!("open cgroup {}: {e}", dir.display()))
        })
        .transpose()?;
    steps.lap("cgroup_open", &mut mark);
    let (forked, born_in_v2) = fork_init(v2_cgroup.as_ref().map(|fd| fd.as_fd()))
        .map_err(|e| format!("fork init of {id}: {e}"))?;
    let pid = match forked {
        nix::unistd::ForkResult::Child => {
            if !born_in_v2 {
                if let Some(dir) = &request.cgroup_v2 {
                    let procs = dir.join("cgroup.procs");
                    if let Err(e) = std::fs::write(&procs, b"0") {
                        init::fail(&errors_w, &format!("join cgroup {}: {e}", procs.display()));
                    }
                }
            }
            // Init keeps only what it uses: no connection to the agent, no handle on the
            // host's root that a `/proc/self/fd/N` path could lead to. Those it keeps are
            // close-on-exec: pipes, the network and user namespaces, and berth-init.
            let keep = [
                errors_w.as_raw_fd(),
                marks_w.as_raw_fd(),
                stdout_w.as_raw_fd(),
                stderr_w.as_raw_fd(),
                netns.as_raw_fd(),
                userns.as_raw_fd(),
                init.as_raw_fd(),
            ]
            .into_iter()
            .chain(layers.raw_fds())
            .chain(volumes.iter().map(|(fd, _)| fd.as_raw_fd()))
            .collect::<Vec<_>>();
            if let Err(e) = crate::helper::close_fds_except(&keep) {
                init::fail(&errors_w, &format!("close descriptors: {e}"));
            }
            let mut clock = init::InitClock::new(mark, marks_w.as_fd());
            let failure = match init::run_init(
                &LinuxSyscall,
                &plan,
                stdout_w.as_fd(),
                stderr_w.as_fd(),
                &mut clock,
            ) {
                Err(message) => message,
                Ok(never) => match never {},
            };
            init::fail(&errors_w, &failure)
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    // Only init may hold the write ends: EOF on them means the Machine is gone.
    drop(errors_w);
    drop(marks_w);
    drop(stdout_w);
    drop(stderr_w);
    let mut message = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match rustix::io::read(&errors_r, &mut buf) {
            Ok(0) => break,
            Ok(n) => message.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                message.extend_from_slice(format!("read init status: {e}").as_bytes());
                break;
            }
        }
    }
    let since_fork = mark.elapsed();
    if !message.is_empty() {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(format!(
            "start machine {id}: {}",
            String::from_utf8_lossy(&message)
        ));
    }
    let init_steps = init::parse_marks(&read_to_end(&marks_r));
    let until_exec = init_steps.total_us();
    steps.append(init_steps);
    // From init's last mark to the supervisor seeing execve close the pipe.
    steps.record("execve", micros(since_fork).saturating_sub(until_exec));
    mark = Instant::now();
    let pid = u32::try_from(pid.as_raw()).map_err(|e| format!("init pid: {e}"))?;
    // Written for status and signal, like runc's --pid-file. No fsync: start path.
    let pid_file = layout.run_dir().join(INIT_PID_FILE);
    if let Err(e) = util::write_replace(&pid_file, format!("{pid}\n").as_bytes(), false) {
        // Unrecorded, the Machine could not be signalled: take it down now.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        return Err(format!("write {}: {e}", pid_file.display()));
    }
    steps.lap("pid_file", &mut mark);
    Ok((pid, layers))
}

/// Forks init, into its v2 cgroup when there is one (`CLONE_INTO_CGROUP`): it never runs
/// anywhere else, and no migration is needed. True when it was born there; false after
/// a plain fork (no v2 cgroup, or a kernel before 5.7), when the child joins it itself.
fn fork_init(v2_cgroup: Option<BorrowedFd<'_>>) -> nix::Result<(nix::unistd::ForkResult, bool)> {
    if let Some(dir) = v2_cgroup {
        // SAFETY: the supervisor is single-threaded (forked from the single-threaded
        // spawner), so the child may run any code; init calls no pthread function that
        // reads the thread id glibc caches (see `clone_into`).
        match unsafe { cgroup::clone_into(dir) } {
            Ok(None) => return Ok((nix::unistd::ForkResult::Child, true)),
            Ok(Some(child)) => return Ok((nix::unistd::ForkResult::Parent { child }, true)),
            Err(e) if cgroup::clone_into_unsupported(&e) => {}
            Err(e) => {
                return Err(nix::errno::Errno::from_raw(
                    e.raw_os_error().unwrap_or(libc::EIO),
                ))
            }
        }
    }
    // SAFETY: the supervisor is single-threaded (forked from the single-threaded spawner).
    unsafe { nix::unistd::fork() }.map(|forked| (forked, false))
}

/// What the (already closed) writer left in a pipe; empty on any error.
fn read_to_end(pipe: &OwnedFd) -> String {
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match rustix::io::read(pipe, &mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_volume_mounts_by_name_and_by_device() {
        let mountinfo = "\
36 35 7:3 / /d/worker/volumes/vol_a/berth-volume-fs rw - ext4 /dev/loop3 rw
37 35 7:4 / /d/worker/machines/m1/rootfs/data rw - ext4 /dev/loop4 rw
38 35 7:5 / /mnt/other rw - ext4 /dev/loop5 rw
39 35 0:22 / /d/worker/machines/m1/rootfs rw - overlay overlay rw
";
        assert_eq!(
            volume_mount_points(mountinfo, &["7:4".to_owned()]),
            [
                PathBuf::from("/d/worker/volumes/vol_a/berth-volume-fs"),
                PathBuf::from("/d/worker/machines/m1/rootfs/data"),
            ]
        );
    }

    #[test]
    fn finds_nsfs_mount_points_and_unescapes_them() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
301 22 0:4 net:[4026532571] /work/data/machines/a/netns rw shared:1 - nsfs nsfs rw
302 22 0:4 net:[4026532572] /work/my\\040data/b/netns rw - nsfs nsfs rw
303 22 0:55 / /work/data/machines/a/rootfs rw - overlay overlay rw,lowerdir=/x
";
        assert_eq!(
            nsfs_mount_points(mountinfo),
            [
                PathBuf::from("/work/data/machines/a/netns"),
                PathBuf::from("/work/my data/b/netns"),
            ]
        );
        assert_eq!(unescape_mountinfo("a\\134b\\"), OsString::from("a\\b\\"));
    }
}
