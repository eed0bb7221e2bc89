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
