//! `berth-init PROGRAM ARGV0 [ARG...]`: PID 1 of every Machine.
//!
//! A process that is PID 1 of its pid namespace gets no signal it has not installed a
//! handler for, so a shell or `httpd -f` as a Machine's command would ignore the stop
//! signal and every stop would end in SIGKILL after the timeout. This init runs the
//! command as its child instead: it blocks every signal, starts PROGRAM (looked up in
//! `PATH` when it has no `/`) with ARGV0 and the ARGs as its argv, forwards every signal
//! it receives to it, reaps whatever orphan the kernel hands it, and exits with the
//! command's status once the command is gone: its exit code, or 128 + N when a signal N
//! ended it, as a shell reports it. Its own exit then ends the rest of the namespace.
//!
//! It has no dependencies: berth-runtime's build script compiles this one file with
//! `rustc` into a static executable that runs in any image, with or without a libc.

#![cfg_attr(not(test), no_main)]
// Unit tests run the loop alone; the C `main` that reaches the rest is not built for them.
#![cfg_attr(test, allow(dead_code, unused_imports))]

use std::ffi::{c_int, CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Exit code when the command could not be started: not found, as a shell says it.
const NOT_FOUND: i32 = 127;
/// Exit code when the command was found but could not be executed.
const NOT_EXECUTABLE: i32 = 126;
/// Exit code of a call without a command.
const USAGE: i32 = 2;

/// C's `main`, not Rust's: init runs on every start, and std's own start-up (its stack
/// guard probe reads `/proc/self/maps`, its signal handlers) is work init does not need.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main() -> c_int {
    // std reads the arguments from the C runtime's start-up call, without its own `main`.
    run(std::env::args_os().skip(1).collect())
}

/// What init was asked to run.
#[derive(Debug, PartialEq, Eq)]
struct Invocation {
    program: OsString,
    argv0: OsString,
    args: Vec<OsString>,
}

/// `PROGRAM ARGV0 [ARG...]`, the arguments after init's own name.
fn parse(args: Vec<OsString>) -> Option<Invocation> {
    let mut args = args.into_iter();
    let program = args.next()?;
    let argv0 = args.next()?;
    Some(Invocation {
        program,
        argv0,
        args: args.collect(),
    })
}

fn run(args: Vec<OsString>) -> i32 {
    // First, so that no signal sent from now on is lost: unblocked, one sent to PID 1
    // without a handler would be dropped.
    let signals = match sys::block_all_signals() {
        Ok(set) => set,
        Err(e) => {
            eprintln!("berth-init: block signals: {e}");
            return NOT_EXECUTABLE;
        }
    };
    let Some(invocation) = parse(args) else {
        eprintln!("berth-init: usage: berth-init PROGRAM ARGV0 [ARG...]");
        return USAGE;
    };
    // Whatever descriptor init was started through (runc passes it as fd 3) is not the
    // command's to keep.
    sys::close_descriptors_from(3);
    // Orphans come to PID 1 anyway; as a subreaper they also do where init is not PID 1.
    let _ = sys::become_subreaper();
    // Started from a descriptor, it would be named after its number in `ps`.
    let _ = sys::set_name(c"berth-init");
    // Berth's, not the Machine's: its memory, descriptors and executable are not for the
    // Machine's processes to read or trace. The command is dumpable again after its exec.
    let _ = sys::set_not_dumpable();
    let argv: Result<Vec<CString>, _> = std::iter::once(&invocation.argv0)
        .chain(&invocation.args)
        .map(|arg| CString::new(arg.as_bytes()))
        .collect();
    let (program, argv) = match (CString::new(invocation.program.as_bytes()), argv) {
        (Ok(program), Ok(argv)) => (program, argv),
        _ => {
            eprintln!("berth-init: an argument holds a NUL byte");
            return USAGE;
        }
    };
    let child = match sys::spawn(&program, &argv) {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!("berth-init: exec {}: {e}", program.to_string_lossy());
            return if e.kind() == std::io::ErrorKind::NotFound {
                NOT_FOUND
            } else {
                NOT_EXECUTABLE
            };
        }
    };
    supervise(&mut sys::Host { signals }, child)
}

/// What the loop asks of the kernel; the tests script it.
trait Os {
    /// One exited child and its status, without blocking; `None` when none is waiting.
    fn reap(&mut self) -> Option<(i32, ExitStatus)>;
    /// Blocks until a signal is pending and takes it.
    fn next_signal(&mut self) -> i32;
    /// Sends `signal` to `pid`; a child already gone is not an error.
    fn forward(&mut self, pid: i32, signal: i32);
}

/// Reaps and forwards until `child` has exited; returns init's exit code.
fn supervise(os: &mut impl Os, child: i32) -> i32 {
    loop {
        while let Some((pid, status)) = os.reap() {
            if pid == child {
                return exit_code(status);
            }
        }
        let signal = os.next_signal();
        if signal != sys::SIGCHLD {
            os.forward(child, signal);
        }
    }
}

/// The command's exit code, or 128 + the signal that ended it.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        // waitpid without WUNTRACED reports only ends.
        (None, None) => NOT_EXECUTABLE,
    }
}

/// The few libc calls std does not offer, declared by hand: this file is compiled alone,
/// without the libc crate.
mod sys {
    use std::ffi::{c_char, c_int, c_short, c_uint, c_ulong, c_void, CStr, CString};
    use std::io;
    use std::process::ExitStatus;

    use std::os::unix::process::ExitStatusExt;

    // Signal numbers and `how` values of the generic Linux ABI (x86_64, arm64, riscv64
    // and most others; not mips, sparc, alpha or parisc).
    #[cfg(not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "x86",
        target_arch = "arm",
        target_arch = "powerpc64",
        target_arch = "s390x"
    )))]
    compile_error!("berth-init knows the signal numbers of the generic Linux ABI only");

    pub const SIGCHLD: c_int = 17;
    const SIG_SETMASK: c_int = 2;
    const WNOHANG: c_int = 1;
    const PR_SET_DUMPABLE: c_int = 4;
    const PR_SET_NAME: c_int = 15;
    const PR_SET_CHILD_SUBREAPER: c_int = 36;
    const POSIX_SPAWN_SETSIGMASK: c_short = 0x08;

    /// `sigset_t` of glibc and musl: 1024 bits on Linux.
    #[repr(C)]
    pub struct SigSet([u64; 16]);

    extern "C" {
        fn sigfillset(set: *mut SigSet) -> c_int;
        fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
        fn sigwait(set: *const SigSet, signal: *mut c_int) -> c_int;
        fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
        fn kill(pid: c_int, signal: c_int) -> c_int;
        fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int;
        fn prctl(option: c_int, ...) -> c_int;
        fn posix_spawnattr_init(attr: *mut SpawnAttr) -> c_int;
        fn posix_spawnattr_destroy(attr: *mut SpawnAttr) -> c_int;
        fn posix_spawnattr_setflags(attr: *mut SpawnAttr, flags: c_short) -> c_int;
        fn posix_spawnattr_setsigmask(attr: *mut SpawnAttr, mask: *const SigSet) -> c_int;
        fn posix_spawnp(
            pid: *mut c_int,
            file: *const c_char,
            file_actions: *const c_void,
            attr: *const SpawnAttr,
            argv: *const *const c_char,
            envp: *const *const c_char,
        ) -> c_int;
        static environ: *const *const c_char;
    }

    /// glibc's `posix_spawnattr_t` is 336 bytes and musl's 336 too; room to spare, and
    /// only ever touched through the functions above.
    #[repr(C, align(8))]
    struct SpawnAttr([u8; 512]);

    /// Starts `program` (looked up in `PATH` without a `/`) with `argv` and init's
    /// environment, with no signal blocked. `posix_spawnp` clones with `CLONE_VM |
    /// CLONE_VFORK`: no copy of init's page tables, and its errors come back directly.
    pub fn spawn(program: &CStr, argv: &[CString]) -> io::Result<c_int> {
        let mut pointers: Vec<*const c_char> = argv.iter().map(|arg| arg.as_ptr()).collect();
        pointers.push(std::ptr::null());
        let empty = SigSet([0; 16]);
        let mut attr = SpawnAttr([0; 512]);
        let mut pid: c_int = 0;
        // SAFETY: `attr` is initialized before use and destroyed once; `program`, the
        // NUL-terminated `pointers` (into `argv`, alive across the call) and `environ`
        // are valid C strings and arrays for the call's duration; `pid` is a valid local.
        let error = unsafe {
            let mut error = posix_spawnattr_init(&mut attr);
            if error == 0 {
                error = posix_spawnattr_setsigmask(&mut attr, &empty);
            }
            if error == 0 {
                error = posix_spawnattr_setflags(&mut attr, POSIX_SPAWN_SETSIGMASK);
            }
            if error == 0 {
                error = posix_spawnp(
                    &mut pid,
                    program.as_ptr(),
                    std::ptr::null(),
                    &attr,
                    pointers.as_ptr(),
                    environ,
                );
            }
            posix_spawnattr_destroy(&mut attr);
            error
        };
        match error {
            0 => Ok(pid),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    /// Blocks every signal that can be blocked; returns the set, for `sigwait`.
    pub fn block_all_signals() -> io::Result<SigSet> {
        let mut set = SigSet([0; 16]);
        // SAFETY: both calls only read or write `set`, a valid sigset_t-sized local.
        let failed = unsafe {
            sigfillset(&mut set) != 0 || sigprocmask(SIG_SETMASK, &set, std::ptr::null_mut()) != 0
        };
        if failed {
            return Err(io::Error::last_os_error());
        }
        Ok(set)
    }

    pub fn close_descriptors_from(first: c_uint) {
        // SAFETY: closes descriptors no Rust object in this process owns: init opens none
        // of its own before this.
        unsafe { close_range(first, c_uint::MAX, 0) };
    }

    pub fn become_subreaper() -> io::Result<()> {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and touches no memory.
        if unsafe { prctl(PR_SET_CHILD_SUBREAPER, 1 as c_ulong) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn set_not_dumpable() -> io::Result<()> {
        // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory.
        if unsafe { prctl(PR_SET_DUMPABLE, 0 as c_ulong) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn set_name(name: &CStr) -> io::Result<()> {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string, which `name` is.
        if unsafe { prctl(PR_SET_NAME, name.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The kernel, for [`super::supervise`].
    pub struct Host {
        pub signals: SigSet,
    }

    impl super::Os for Host {
        fn reap(&mut self) -> Option<(i32, ExitStatus)> {
            let mut status: c_int = 0;
            // SAFETY: waitpid writes only to `status`, a valid local.
            let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
            (pid > 0).then(|| (pid, ExitStatus::from_raw(status)))
        }

        fn next_signal(&mut self) -> i32 {
            let mut signal: c_int = 0;
            // SAFETY: sigwait reads the set and writes only to `signal`, a valid local.
            if unsafe { sigwait(&self.signals, &mut signal) } != 0 {
                // Not expected with a valid set; reap again rather than spin on an error.
                std::thread::sleep(std::time::Duration::from_millis(10));
                return SIGCHLD;
            }
            signal
        }

        fn forward(&mut self, pid: i32, signal: i32) {
            // SAFETY: kill(2) takes plain integers.
            unsafe { kill(pid, signal) };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::VecDeque;

    const CHILD: i32 = 40;
    const SIGTERM: i32 = 15;
    const SIGUSR1: i32 = 10;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn killed_by(signal: i32) -> ExitStatus {
        ExitStatus::from_raw(signal)
    }

    /// The kernel as a script: each signal taken makes the next batch of exits reapable.
    #[derive(Default)]
    struct Script {
        /// Exits reapable before the first signal, then after each signal in turn.
        exits: VecDeque<Vec<(i32, ExitStatus)>>,
        reapable: VecDeque<(i32, ExitStatus)>,
        signals: VecDeque<i32>,
        forwarded: Vec<(i32, i32)>,
        reaped: Vec<i32>,
    }

    impl Script {
        fn new(exits: Vec<Vec<(i32, ExitStatus)>>, signals: Vec<i32>) -> Script {
            let mut script = Script {
                exits: exits.into(),
                signals: signals.into(),
                ..Script::default()
            };
            script.next_batch();
            script
        }

        fn next_batch(&mut self) {
            if let Some(batch) = self.exits.pop_front() {
                self.reapable.extend(batch);
            }
        }
    }

    impl Os for Script {
        fn reap(&mut self) -> Option<(i32, ExitStatus)> {
            let exit = self.reapable.pop_front()?;
            self.reaped.push(exit.0);
            Some(exit)
        }

        fn next_signal(&mut self) -> i32 {
            let signal = self
                .signals
                .pop_front()
                .expect("init waited past the script");
            self.next_batch();
            signal
        }

        fn forward(&mut self, pid: i32, signal: i32) {
            self.forwarded.push((pid, signal));
        }
    }

    #[test]
    fn forwards_signals_and_reports_a_signal_death_as_the_shell_does() {
        let mut os = Script::new(
            vec![vec![], vec![], vec![(CHILD, killed_by(SIGTERM))]],
            vec![SIGUSR1, SIGTERM, libc_sigchld()],
        );
        assert_eq!(supervise(&mut os, CHILD), 128 + SIGTERM);
        assert_eq!(os.forwarded, [(CHILD, SIGUSR1), (CHILD, SIGTERM)]);
    }

    #[test]
    fn reaps_orphans_and_exits_only_with_the_command() {
        let mut os = Script::new(
            vec![
                vec![(71, exited(0)), (72, killed_by(9))],
                vec![(73, exited(1))],
                vec![(74, exited(0)), (CHILD, exited(7))],
            ],
            vec![libc_sigchld(), libc_sigchld()],
        );
        assert_eq!(supervise(&mut os, CHILD), 7);
        assert_eq!(os.reaped, [71, 72, 73, 74, CHILD]);
        assert!(os.forwarded.is_empty(), "SIGCHLD is init's own");
    }

    #[test]
    fn a_command_gone_before_any_signal_ends_init_at_once() {
        let mut os = Script::new(vec![vec![(CHILD, exited(0))]], vec![]);
        assert_eq!(supervise(&mut os, CHILD), 0);
    }

    #[test]
    fn exit_codes_are_passed_through_and_signals_become_128_plus_n() {
        assert_eq!(exit_code(exited(0)), 0);
        assert_eq!(exit_code(exited(7)), 7);
        assert_eq!(exit_code(exited(255)), 255);
        assert_eq!(exit_code(killed_by(9)), 137);
        assert_eq!(exit_code(killed_by(SIGUSR1)), 138);
        // A core dump (0x80) does not change the signal.
        assert_eq!(exit_code(ExitStatus::from_raw(0x80 | 11)), 139);
    }

    #[test]
    fn the_command_line_is_program_argv0_and_args() {
        let os = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            parse(os(&["/bin/sh", "sh", "-c", "exit 3"])),
            Some(Invocation {
                program: "/bin/sh".into(),
                argv0: "sh".into(),
                args: os(&["-c", "exit 3"]),
            })
        );
        assert_eq!(parse(os(&["httpd", "httpd"])).map(|i| i.args), Some(vec![]));
        assert_eq!(parse(os(&["only-program"])), None);
        assert_eq!(parse(vec![]), None);
    }

    fn libc_sigchld() -> i32 {
        sys::SIGCHLD
    }
}
