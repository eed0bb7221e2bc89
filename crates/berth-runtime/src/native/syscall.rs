//! The calls native init makes on the host and on itself between fork and execve, behind
//! one trait, so that its order and arguments can be tested without forking a Machine
//! (youki's `Syscall` is the model).
//!
//! Init is generic over [`Syscall`] and the start path passes [`LinuxSyscall`], a unit
//! struct whose methods are the plain calls: no allocation, no dispatch at run time.
//! Each method keeps the error type of the library it wraps, so start errors read as
//! before. Lookups that only read (inside the rootfs, under a descriptor) stay outside
//! the trait and run for real in tests too; `open`, `fstat` are here because pivot_root
//! and mknod change what they see.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use caps::errors::CapsError;
use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};
use rustix::fs::{Dev, FileType, Mode, OFlags, Stat};
use rustix::process::{Pid, Signal};
use seccompiler::BpfProgram;

use crate::overlay::OverlayLayers;

/// What init does to the host and to itself. See [`LinuxSyscall`] for what each does.
pub(crate) trait Syscall {
    fn umask(&self, mode: Mode);
    /// Moves this process into the cgroup whose `cgroup.procs` is `procs`.
    fn join_cgroup(&self, procs: &Path) -> io::Result<()>;
    fn setns(&self, namespace: BorrowedFd<'_>, kind: CloneFlags) -> nix::Result<()>;
    fn unshare(&self, flags: CloneFlags) -> nix::Result<()>;
    fn sethostname(&self, name: &str) -> nix::Result<()>;

    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    /// Makes the Machine's overlay of `layers` and mounts it at `target`.
    fn mount_overlay(&self, layers: &OverlayLayers, target: &Path) -> io::Result<()>;
    /// Attaches a detached mount (a volume's idmapped clone) onto the directory `target`.
    fn attach_mount(&self, mount: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()>;
    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()>;
    fn fchdir(&self, dir: BorrowedFd<'_>) -> rustix::io::Result<()>;
    fn chdir(&self, path: &Path) -> nix::Result<()>;

    /// Opens `path` as this process sees it; pivot_root changes what an absolute path
    /// names.
    fn open(&self, path: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd>;
    fn fstat(&self, fd: BorrowedFd<'_>) -> rustix::io::Result<Stat>;
    fn mknodat(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        kind: FileType,
        mode: Mode,
        dev: Dev,
    ) -> rustix::io::Result<()>;
    fn symlinkat(&self, target: &str, dir: BorrowedFd<'_>, link: &str) -> rustix::io::Result<()>;

    fn setrlimit(&self, resource: libc::__rlimit_resource_t, limit: libc::rlimit)
        -> io::Result<()>;
    /// Back to the default action, for a signal the supervisor ignores.
    fn reset_signal(&self, signal: libc::c_int);
    fn dup2(&self, from: RawFd, to: RawFd) -> nix::Result<()>;
    fn parent_death_signal(&self) -> rustix::io::Result<Option<Signal>>;
    fn set_parent_death_signal(&self, signal: Option<Signal>) -> rustix::io::Result<()>;
    fn getppid(&self) -> Option<Pid>;
    fn has_cap(&self, set: CapSet, cap: Capability) -> Result<bool, CapsError>;
    fn drop_cap(&self, set: CapSet, cap: Capability) -> Result<(), CapsError>;
    fn set_caps(&self, set: CapSet, caps: &CapsHashSet) -> Result<(), CapsError>;
    fn set_keep_capabilities(&self, keep: bool) -> rustix::io::Result<()>;
    fn setgroups(&self, groups: &[Gid]) -> nix::Result<()>;
    /// Real, effective and saved gid.
    fn setresgid(&self, gid: Gid) -> nix::Result<()>;
    /// Real, effective and saved uid.
    fn setresuid(&self, uid: Uid) -> nix::Result<()>;
    fn set_no_new_privs(&self) -> rustix::io::Result<()>;
    fn set_not_dumpable(&self) -> rustix::io::Result<()>;
    fn apply_seccomp(&self, program: &BpfProgram) -> Result<(), seccompiler::Error>;
    /// Blocks every signal.
    fn block_signals(&self) -> nix::Result<()>;
    fn execve(&self, program: &CStr, argv: &[CString], env: &[CString]) -> nix::Error;
    fn fexecve(&self, program: BorrowedFd<'_>, argv: &[CString], env: &[CString]) -> nix::Error;
}

/// The real calls.
pub(crate) struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn umask(&self, mode: Mode) {
        rustix::process::umask(mode);
    }

    fn join_cgroup(&self, procs: &Path) -> io::Result<()> {
        std::fs::write(procs, b"0")
    }

    fn setns(&self, namespace: BorrowedFd<'_>, kind: CloneFlags) -> nix::Result<()> {
        nix::sched::setns(namespace, kind)
    }

    fn unshare(&self, flags: CloneFlags) -> nix::Result<()> {
        nix::sched::unshare(flags)
    }

    fn sethostname(&self, name: &str) -> nix::Result<()> {
        nix::unistd::sethostname(name)
    }

    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn mount_overlay(&self, layers: &OverlayLayers, target: &Path) -> io::Result<()> {
        layers.mount(target)
    }

    fn attach_mount(&self, mount: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
        crate::volume::attach(mount, target)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        nix::mount::umount2(target, flags)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()> {
        nix::unistd::pivot_root(new_root, put_old)
    }

    fn fchdir(&self, dir: BorrowedFd<'_>) -> rustix::io::Result<()> {
        rustix::process::fchdir(dir)
    }

    fn chdir(&self, path: &Path) -> nix::Result<()> {
        nix::unistd::chdir(path)
    }

    fn open(&self, path: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        rustix::fs::open(path, flags, Mode::empty())
    }

    fn fstat(&self, fd: BorrowedFd<'_>) -> rustix::io::Result<Stat> {
        rustix::fs::fstat(fd)
    }

    fn mknodat(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        kind: FileType,
        mode: Mode,
        dev: Dev,
    ) -> rustix::io::Result<()> {
        rustix::fs::mknodat(dir, name, kind, mode, dev)
    }

    fn symlinkat(&self, target: &str, dir: BorrowedFd<'_>, link: &str) -> rustix::io::Result<()> {
        rustix::fs::symlinkat(target, dir, link)
    }

    fn setrlimit(
        &self,
        resource: libc::__rlimit_resource_t,
        limit: libc::rlimit,
    ) -> io::Result<()> {
        // SAFETY: setrlimit reads a valid rlimit struct.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn reset_signal(&self, signal: libc::c_int) {
        // SAFETY: SIG_DFL installs no handler code.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }

    fn dup2(&self, from: RawFd, to: RawFd) -> nix::Result<()> {
        nix::unistd::dup2(from, to).map(drop)
    }

    fn parent_death_signal(&self) -> rustix::io::Result<Option<Signal>> {
        rustix::process::parent_process_death_signal()
    }

    fn set_parent_death_signal(&self, signal: Option<Signal>) -> rustix::io::Result<()> {
        rustix::process::set_parent_process_death_signal(signal)
    }

    fn getppid(&self) -> Option<Pid> {
        rustix::process::getppid()
    }

    fn has_cap(&self, set: CapSet, cap: Capability) -> Result<bool, CapsError> {
        caps::has_cap(None, set, cap)
    }

    fn drop_cap(&self, set: CapSet, cap: Capability) -> Result<(), CapsError> {
        caps::drop(None, set, cap)
    }

    fn set_caps(&self, set: CapSet, caps: &CapsHashSet) -> Result<(), CapsError> {
        caps::set(None, set, caps)
    }

    fn set_keep_capabilities(&self, keep: bool) -> rustix::io::Result<()> {
        rustix::thread::set_keep_capabilities(keep)
    }

    fn setgroups(&self, groups: &[Gid]) -> nix::Result<()> {
        nix::unistd::setgroups(groups)
    }

    fn setresgid(&self, gid: Gid) -> nix::Result<()> {
        nix::unistd::setresgid(gid, gid, gid)
    }

    fn setresuid(&self, uid: Uid) -> nix::Result<()> {
        nix::unistd::setresuid(uid, uid, uid)
    }

    fn set_no_new_privs(&self) -> rustix::io::Result<()> {
        rustix::thread::set_no_new_privs(true)
    }

    fn set_not_dumpable(&self) -> rustix::io::Result<()> {
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    }

    fn apply_seccomp(&self, program: &BpfProgram) -> Result<(), seccompiler::Error> {
        seccompiler::apply_filter(program)
    }

    fn block_signals(&self) -> nix::Result<()> {
        nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&nix::sys::signal::SigSet::all()),
            None,
        )
    }

    fn execve(&self, program: &CStr, argv: &[CString], env: &[CString]) -> nix::Error {
        let Err(e) = nix::unistd::execve(program, argv, env);
        e
    }

    fn fexecve(&self, program: BorrowedFd<'_>, argv: &[CString], env: &[CString]) -> nix::Error {
        let Err(e) = nix::unistd::fexecve(program.as_raw_fd(), argv, env);
        e
    }
}

/// A [`Syscall`] for unit tests: records every call that acts, answers the ones that
/// only read, and fails the calls it is told to.
///
/// Paths are recorded as the Machine sees them: `/proc/self/fd/N` is resolved, the
/// rootfs given is `/`, and anything else on the host reads `host:/...`. Nothing is mounted; pivot_root is followed so that `open("/")`
/// lands in the rootfs, and a device node is made as an empty file that `fstat` reports
/// as the device asked for. Exec cannot replace a test, so it records and fails.
#[cfg(test)]
pub(crate) mod recording {
    use std::cell::RefCell;
    use std::ffi::{CStr, CString};
    use std::io;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
    use std::path::{Path, PathBuf};

    use caps::errors::CapsError;
    use caps::{CapSet, Capability, CapsHashSet};
    use nix::mount::{MntFlags, MsFlags};
    use nix::sched::CloneFlags;
    use nix::unistd::{Gid, Uid};
    use rustix::fs::{AtFlags, Dev, FileType, Mode, OFlags, Stat};
    use rustix::process::{Pid, Signal};
    use seccompiler::BpfProgram;

    use super::Syscall;
    use crate::overlay::OverlayLayers;

    /// One recorded call, its arguments as the Machine sees them.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) enum Call {
        Umask(u32),
        JoinCgroup(String),
        Setns(String, CloneFlags),
        Unshare(CloneFlags),
        Sethostname(String),
        Mount {
            source: Option<String>,
            target: String,
            fstype: Option<String>,
            flags: MsFlags,
            data: Option<String>,
        },
        MountOverlay(String),
        AttachMount(String),
        Umount2(String, MntFlags),
        PivotRoot(String, String),
        Fchdir(String),
        Chdir(String),
        Mknod {
            path: String,
            kind: FileType,
            mode: u32,
            dev: Dev,
        },
        Symlink {
            target: String,
            link: String,
        },
        Setrlimit {
            resource: libc::__rlimit_resource_t,
            soft: u64,
            hard: u64,
        },
        ResetSignal(libc::c_int),
        Dup2(String, RawFd),
        SetParentDeathSignal(Option<Signal>),
        DropCap(&'static str, Capability),
        SetCaps(&'static str, CapsHashSet),
        KeepCapabilities(bool),
        Setgroups(Vec<u32>),
        Setresgid(u32),
        Setresuid(u32),
        NoNewPrivs,
        NotDumpable,
        Seccomp(usize),
        BlockSignals,
        Execve {
            program: String,
            argv: Vec<String>,
            env: Vec<String>,
        },
        Fexecve {
            program: String,
            argv: Vec<String>,
            env: Vec<String>,
        },
    }

    impl Call {
        /// The call in a few words, for comparing whole sequences.
        pub(crate) fn summary(&self) -> String {
            match self {
                Call::Setns(_, kind) if *kind == CloneFlags::CLONE_NEWNET => "setns net".into(),
                Call::Setns(_, kind) if *kind == CloneFlags::CLONE_NEWUSER => "setns user".into(),
                Call::Mount { target, flags, .. } if flags.contains(MsFlags::MS_REMOUNT) => {
                    format!("remount {target}")
                }
                Call::Mount { target, .. } => format!("mount {target}"),
                Call::MountOverlay(target) => format!("mount_overlay {target}"),
                Call::AttachMount(target) => format!("attach_mount {target}"),
                Call::Fchdir(path) => format!("fchdir {path}"),
                Call::Chdir(path) => format!("chdir {path}"),
                other => {
                    let debug = format!("{other:?}");
                    let end = debug.find([' ', '(', '{']).unwrap_or(debug.len());
                    debug[..end].to_owned()
                }
            }
        }
    }

    type Predicate = Box<dyn Fn(&Call) -> bool>;

    #[derive(Default)]
    struct World {
        /// What the process's cwd is on the host, followed through fchdir and chdir.
        cwd: PathBuf,
        /// Set by pivot_root: where `/` now is on the host.
        root: Option<PathBuf>,
        /// Device nodes made as files: (st_dev, st_ino) of the file, kind, device.
        nodes: Vec<((u64, u64), FileType, Dev)>,
    }

    pub(crate) struct RecordingSyscall {
        rootfs: PathBuf,
        calls: RefCell<Vec<Call>>,
        fail: Option<(Predicate, i32)>,
        world: RefCell<World>,
    }

    impl RecordingSyscall {
        /// `rootfs` must be canonical, as `/proc/self/fd` links are.
        pub(crate) fn new(rootfs: &Path) -> RecordingSyscall {
            RecordingSyscall {
                rootfs: rootfs.to_path_buf(),
                calls: RefCell::new(Vec::new()),
                fail: None,
                world: RefCell::new(World::default()),
            }
        }

        /// Every call that `which` matches fails with `errno` (after it is recorded).
        pub(crate) fn failing(
            mut self,
            which: impl Fn(&Call) -> bool + 'static,
            errno: i32,
        ) -> RecordingSyscall {
            self.fail = Some((Box::new(which), errno));
            self
        }

        pub(crate) fn calls(&self) -> Vec<Call> {
            self.calls.borrow().clone()
        }

        fn record(&self, call: Call) -> Result<(), i32> {
            let errno = self
                .fail
                .as_ref()
                .filter(|(which, _)| which(&call))
                .map(|(_, errno)| *errno);
            self.calls.borrow_mut().push(call);
            errno.map_or(Ok(()), Err)
        }

        /// What `path` names on the host: `/proc/self/fd/N` resolved.
        fn host_path(path: &Path) -> PathBuf {
            if path.starts_with("/proc/self/fd") {
                if let Ok(target) = std::fs::read_link(path) {
                    return target;
                }
            }
            path.to_path_buf()
        }

        /// `path` as the Machine sees it when it is in the rootfs (`/...`), `host:/...`
        /// when it is elsewhere, as given when it is relative (a mount source word).
        fn view(&self, path: &Path) -> String {
            let host = Self::host_path(path);
            match host.strip_prefix(&self.rootfs) {
                Ok(rest) => Path::new("/").join(rest).display().to_string(),
                Err(_) if host.is_absolute() => format!("host:{}", host.display()),
                Err(_) => host.display().to_string(),
            }
        }

        fn fd_view(&self, fd: BorrowedFd<'_>) -> String {
            self.view(&crate::inroot::fd_path(fd))
        }

        fn strings(list: &[CString]) -> Vec<String> {
            list.iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        }
    }

    fn nix_err(errno: i32) -> nix::Error {
        nix::Error::from_raw(errno)
    }

    fn rustix_err(errno: i32) -> rustix::io::Errno {
        rustix::io::Errno::from_raw_os_error(errno)
    }

    fn set_name(set: CapSet) -> &'static str {
        match set {
            CapSet::Ambient => "ambient",
            CapSet::Bounding => "bounding",
            CapSet::Effective => "effective",
            CapSet::Inheritable => "inheritable",
            CapSet::Permitted => "permitted",
        }
    }

    impl Syscall for RecordingSyscall {
        fn umask(&self, mode: Mode) {
            // A umask cannot fail.
            let _ = self.record(Call::Umask(mode.bits()));
        }

        fn join_cgroup(&self, procs: &Path) -> io::Result<()> {
            self.record(Call::JoinCgroup(procs.display().to_string()))
                .map_err(io::Error::from_raw_os_error)
        }

        fn setns(&self, namespace: BorrowedFd<'_>, kind: CloneFlags) -> nix::Result<()> {
            self.record(Call::Setns(self.fd_view(namespace), kind))
                .map_err(nix_err)
        }

        fn unshare(&self, flags: CloneFlags) -> nix::Result<()> {
            self.record(Call::Unshare(flags)).map_err(nix_err)
        }

        fn sethostname(&self, name: &str) -> nix::Result<()> {
            self.record(Call::Sethostname(name.to_owned()))
                .map_err(nix_err)
        }

        fn mount(
            &self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> nix::Result<()> {
            self.record(Call::Mount {
                source: source.map(|s| self.view(s)),
                target: self.view(target),
                fstype: fstype.map(str::to_owned),
                flags,
                data: data.map(str::to_owned),
            })
            .map_err(nix_err)
        }

        fn mount_overlay(&self, _layers: &OverlayLayers, target: &Path) -> io::Result<()> {
            self.record(Call::MountOverlay(self.view(target)))
                .map_err(io::Error::from_raw_os_error)
        }

        fn attach_mount(&self, _mount: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
            self.record(Call::AttachMount(self.fd_view(target)))
                .map_err(io::Error::from_raw_os_error)
        }

        fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
            self.record(Call::Umount2(self.view(target), flags))
                .map_err(nix_err)
        }

        fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()> {
            self.record(Call::PivotRoot(self.view(new_root), self.view(put_old)))
                .map_err(nix_err)?;
            let mut world = self.world.borrow_mut();
            let root = match new_root {
                here if here == Path::new(".") => world.cwd.clone(),
                other => world.cwd.join(other),
            };
            world.root = Some(root);
            Ok(())
        }

        fn fchdir(&self, dir: BorrowedFd<'_>) -> rustix::io::Result<()> {
            self.record(Call::Fchdir(self.fd_view(dir)))
                .map_err(rustix_err)?;
            self.world.borrow_mut().cwd = Self::host_path(&crate::inroot::fd_path(dir));
            Ok(())
        }

        fn chdir(&self, path: &Path) -> nix::Result<()> {
            self.record(Call::Chdir(path.display().to_string()))
                .map_err(nix_err)?;
            let mut world = self.world.borrow_mut();
            let base = match (&world.root, path.strip_prefix("/")) {
                (Some(root), Ok(rest)) => root.join(rest),
                _ => world.cwd.join(path),
            };
            world.cwd = base;
            Ok(())
        }

        fn open(&self, path: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
            let world = self.world.borrow();
            let host = match (&world.root, path.strip_prefix("/")) {
                (Some(root), Ok(rest)) => root.join(rest),
                _ => path.to_path_buf(),
            };
            rustix::fs::open(host, flags, Mode::empty())
        }

        fn fstat(&self, fd: BorrowedFd<'_>) -> rustix::io::Result<Stat> {
            let mut stat = rustix::fs::fstat(fd)?;
            let id = (stat.st_dev, stat.st_ino);
            if let Some((_, kind, dev)) = self.world.borrow().nodes.iter().find(|n| n.0 == id) {
                stat.st_mode = (stat.st_mode & !libc::S_IFMT) | kind.as_raw_mode();
                stat.st_rdev = *dev;
            }
            Ok(stat)
        }

        fn mknodat(
            &self,
            dir: BorrowedFd<'_>,
            name: &str,
            kind: FileType,
            mode: Mode,
            dev: Dev,
        ) -> rustix::io::Result<()> {
            let path = Path::new(&self.fd_view(dir)).join(name);
            self.record(Call::Mknod {
                path: path.display().to_string(),
                kind,
                mode: mode.bits(),
                dev,
            })
            .map_err(rustix_err)?;
            rustix::fs::mknodat(dir, name, FileType::RegularFile, mode, 0)?;
            let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            self.world
                .borrow_mut()
                .nodes
                .push(((stat.st_dev, stat.st_ino), kind, dev));
            Ok(())
        }

        fn symlinkat(
            &self,
            target: &str,
            dir: BorrowedFd<'_>,
            link: &str,
        ) -> rustix::io::Result<()> {
            let link = Path::new(&self.fd_view(dir)).join(link);
            self.record(Call::Symlink {
                target: target.to_owned(),
                link: link.display().to_string(),
            })
            .map_err(rustix_err)
        }

        fn setrlimit(
            &self,
            resource: libc::__rlimit_resource_t,
            limit: libc::rlimit,
        ) -> io::Result<()> {
            self.record(Call::Setrlimit {
                resource,
                soft: limit.rlim_cur,
                hard: limit.rlim_max,
            })
            .map_err(io::Error::from_raw_os_error)
        }

        fn reset_signal(&self, signal: libc::c_int) {
            let _ = self.record(Call::ResetSignal(signal));
        }

        fn dup2(&self, from: RawFd, to: RawFd) -> nix::Result<()> {
            // SAFETY: the caller holds `from` open for the call.
            let from = unsafe { BorrowedFd::borrow_raw(from) };
            self.record(Call::Dup2(self.fd_view(from.as_fd()), to))
                .map_err(nix_err)
        }

        fn parent_death_signal(&self) -> rustix::io::Result<Option<Signal>> {
            // As the spawner leaves it.
            Ok(Some(Signal::Kill))
        }

        fn set_parent_death_signal(&self, signal: Option<Signal>) -> rustix::io::Result<()> {
            self.record(Call::SetParentDeathSignal(signal))
                .map_err(rustix_err)
        }

        fn getppid(&self) -> Option<Pid> {
            Pid::from_raw(1)
        }

        fn has_cap(&self, _set: CapSet, _cap: Capability) -> Result<bool, CapsError> {
            // Host root: every capability in every set.
            Ok(true)
        }

        fn drop_cap(&self, set: CapSet, cap: Capability) -> Result<(), CapsError> {
            self.record(Call::DropCap(set_name(set), cap))
                .map_err(|e| CapsError::from(format!("errno {e}")))
        }

        fn set_caps(&self, set: CapSet, caps: &CapsHashSet) -> Result<(), CapsError> {
            self.record(Call::SetCaps(set_name(set), caps.clone()))
                .map_err(|e| CapsError::from(format!("errno {e}")))
        }

        fn set_keep_capabilities(&self, keep: bool) -> rustix::io::Result<()> {
            self.record(Call::KeepCapabilities(keep))
                .map_err(rustix_err)
        }

        fn setgroups(&self, groups: &[Gid]) -> nix::Result<()> {
            self.record(Call::Setgroups(groups.iter().map(|g| g.as_raw()).collect()))
                .map_err(nix_err)
        }

        fn setresgid(&self, gid: Gid) -> nix::Result<()> {
            self.record(Call::Setresgid(gid.as_raw())).map_err(nix_err)
        }

        fn setresuid(&self, uid: Uid) -> nix::Result<()> {
            self.record(Call::Setresuid(uid.as_raw())).map_err(nix_err)
        }

        fn set_no_new_privs(&self) -> rustix::io::Result<()> {
            self.record(Call::NoNewPrivs).map_err(rustix_err)
        }

        fn set_not_dumpable(&self) -> rustix::io::Result<()> {
            self.record(Call::NotDumpable).map_err(rustix_err)
        }

        fn apply_seccomp(&self, program: &BpfProgram) -> Result<(), seccompiler::Error> {
            self.record(Call::Seccomp(program.len()))
                .map_err(|e| seccompiler::Error::Seccomp(io::Error::from_raw_os_error(e)))
        }

        fn block_signals(&self) -> nix::Result<()> {
            self.record(Call::BlockSignals).map_err(nix_err)
        }

        fn execve(&self, program: &CStr, argv: &[CString], env: &[CString]) -> nix::Error {
            let call = Call::Execve {
                program: program.to_string_lossy().into_owned(),
                argv: Self::strings(argv),
                env: Self::strings(env),
            };
            nix_err(self.record(call).err().unwrap_or(libc::ENOEXEC))
        }

        fn fexecve(
            &self,
            program: BorrowedFd<'_>,
            argv: &[CString],
            env: &[CString],
        ) -> nix::Error {
            let call = Call::Fexecve {
                program: self.fd_view(program),
                argv: Self::strings(argv),
                env: Self::strings(env),
            };
            nix_err(self.record(call).err().unwrap_or(libc::ENOEXEC))
        }
    }
}
