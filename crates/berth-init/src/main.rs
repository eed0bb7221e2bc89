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
//! Two settings come in its environment, and the commands do not see them:
//! `BERTH_INIT_TTY=1` runs each command on a pseudo-terminal of the Machine's devpts, whose
//! output init copies to its stdout; `BERTH_INIT_PROCESSES` (see [`decode_processes`])
//! lists several commands, each with its own environment and ids, to run in place of
//! PROGRAM: every signal goes to each, and the first to exit is init's status.
//!
//! It has no dependencies: berth-runtime's build script compiles this one file with
//! `rustc` into a static executable that runs in any image, with or without a libc.

#![cfg_attr(not(test), no_main)]
// Unit tests run the loop alone; the C `main` that reaches the rest is not built for them.
#![cfg_attr(test, allow(dead_code, unused_imports))]

use std::ffi::{c_int, CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
    // Alone, this flag is an exec into a running Machine, never its PID 1: a command line
    // always has a PROGRAM and an ARGV0.
    if args.len() == 1 && args[0] == TCP_PROBE {
        return tcp_probe();
    }
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
    // Init's own settings ride in its environment; the commands do not see them.
    let tty = std::env::var_os(TTY_VAR).is_some_and(|value| value == "1");
    let list = std::env::var_os(PROCESSES_VAR);
    let own = tty || list.is_some();
    let processes = match list {
        None => single(invocation).map(|mut process| {
            // The environment without init's settings.
            process.env = own.then(Vec::new);
            vec![process]
        }),
        Some(list) => decode_processes(list.as_bytes()),
    };
    let processes = match processes {
        Some(processes) if !processes.is_empty() => processes,
        _ => {
            eprintln!("berth-init: an argument holds a NUL byte, or {PROCESSES_VAR} is malformed");
            return USAGE;
        }
    };
    let base: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(key, _)| key != TTY_VAR && key != PROCESSES_VAR)
        .collect();
    let mut children = Vec::with_capacity(processes.len());
    let mut copiers = Vec::new();
    for process in &processes {
        let env = process.env.as_ref().map(|extra| environment(&base, extra));
        let spawned = match (tty, process.ids) {
            (false, None) => sys::spawn(&process.program, &process.argv, env.as_deref()),
            (tty, ids) => sys::fork_exec(&process.program, &process.argv, env.as_deref(), ids, tty),
        };
        match spawned {
            Ok((pid, master)) => {
                children.push(pid);
                copiers.extend(master);
            }
            Err(e) => {
                eprintln!(
                    "berth-init: exec {}: {e}",
                    process.program.to_string_lossy()
                );
                // The ones already started end with init, as the Machine does.
                for &pid in &children {
                    sys::Host::kill(pid, sys::SIGTERM);
                }
                return if e.kind() == std::io::ErrorKind::NotFound {
                    NOT_FOUND
                } else {
                    NOT_EXECUTABLE
                };
            }
        }
    }
    // Threads only once every fork is done: a fork copies only the calling thread.
    let copying = sys::copy_terminals(copiers);
    let code = supervise(&mut sys::Host { signals }, &children);
    copying.finish(DRAIN);
    code
}

/// `berth-init --tcp-connections`: prints how many TCP endpoints of the Machine's network
/// are neither listening nor closed. gVisor's checkpoint cannot save such an endpoint
/// and its sandbox dies trying, so the driver asks before it suspends.
const TCP_PROBE: &str = "--tcp-connections";

fn tcp_probe() -> i32 {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => count += connected_rows(&text),
            // A Machine without IPv6 has no tcp6 table.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                eprintln!("berth-init: read {table}: {e}");
                return 1;
            }
        }
    }
    println!("{count}");
    0
}

/// Rows of a /proc/net/tcp table whose state (the fourth field) is neither LISTEN (0A)
/// nor CLOSE (07).
fn connected_rows(table: &str) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|row| {
            row.split_whitespace()
                .nth(3)
                .is_some_and(|state| state != "0A" && state != "07")
        })
        .count()
}

/// Set to `1`: each command runs on a pseudo-terminal of the Machine's devpts.
const TTY_VAR: &str = "BERTH_INIT_TTY";
/// The Machine's `config.processes`, encoded by the runtime (see [`decode_processes`]).
const PROCESSES_VAR: &str = "BERTH_INIT_PROCESSES";
/// How long the other commands get after the first one exits, as a stop's timeout.
const GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a terminal's last output is waited for after the commands are gone (another
/// process of the Machine may keep the terminal open).
const DRAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// One command init starts.
#[derive(Debug, PartialEq, Eq)]
struct Process {
    /// Looked up in `PATH` when it has no `/`.
    program: CString,
    argv: Vec<CString>,
    /// `KEY=VALUE` entries over init's environment; `None`: init's as it is.
    env: Option<Vec<(OsString, OsString)>>,
    /// Uid and gid to run as; `None`: init's own.
    ids: Option<(u32, u32)>,
}

/// The one command of the command line: PROGRAM, with ARGV0 and the ARGs as its argv.
fn single(invocation: Invocation) -> Option<Process> {
    let mut argv = Vec::with_capacity(invocation.args.len() + 1);
    for arg in std::iter::once(invocation.argv0).chain(invocation.args) {
        argv.push(CString::new(arg.into_vec()).ok()?);
    }
    Some(Process {
        program: CString::new(invocation.program.into_vec()).ok()?,
        argv,
        env: None,
        ids: None,
    })
}

/// `BERTH_INIT_PROCESSES`: netstrings (`LEN:BYTES,`), for each process in turn: uid, gid
/// (both empty for init's own), the number of arguments, the arguments, the number of
/// environment entries, the entries (`KEY=VALUE`). `None` when malformed.
fn decode_processes(bytes: &[u8]) -> Option<Vec<Process>> {
    let mut fields = Netstrings(bytes);
    let mut processes = Vec::new();
    while !fields.0.is_empty() {
        let uid = fields.next()?;
        let gid = fields.next()?;
        let ids = match (uid, gid) {
            (b"", b"") => None,
            (uid, gid) => Some((number(uid)?, number(gid)?)),
        };
        let argc = number(fields.next()?)?;
        let mut argv = Vec::new();
        for _ in 0..argc {
            argv.push(CString::new(fields.next()?).ok()?);
        }
        if argv.is_empty() {
            return None;
        }
        let envc = number(fields.next()?)?;
        let mut env = Vec::new();
        for _ in 0..envc {
            let entry = fields.next()?;
            let at = entry.iter().position(|&byte| byte == b'=')?;
            env.push((
                OsString::from_vec(entry[..at].to_vec()),
                OsString::from_vec(entry[at + 1..].to_vec()),
            ));
        }
        processes.push(Process {
            program: argv[0].clone(),
            argv,
            env: Some(env),
            ids,
        });
    }
    Some(processes)
}

fn number(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

struct Netstrings<'a>(&'a [u8]);

impl<'a> Netstrings<'a> {
    fn next(&mut self) -> Option<&'a [u8]> {
        let colon = self.0.iter().position(|&byte| byte == b':')?;
        let len: usize = std::str::from_utf8(&self.0[..colon]).ok()?.parse().ok()?;
        let rest = &self.0[colon + 1..];
        let field = rest.get(..len)?;
        if rest.get(len) != Some(&b',') {
            return None;
        }
        self.0 = &rest[len + 1..];
        Some(field)
    }
}

/// `base` with `extra` over it (a key of `extra` replaces the same key of `base`), as
/// `KEY=VALUE` C strings; entries holding a NUL byte cannot be passed and are left out.
fn environment(base: &[(OsString, OsString)], extra: &[(OsString, OsString)]) -> Vec<CString> {
    base.iter()
        .filter(|(key, _)| !extra.iter().any(|(other, _)| other == key))
        .chain(extra)
        .filter_map(|(key, value)| {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            CString::new(entry).ok()
        })
        .collect()
}

/// What the loop asks of the kernel; the tests script it.
trait Os {
    /// One exited child and its status, without blocking; `None` when none is waiting.
    fn reap(&mut self) -> Option<(i32, ExitStatus)>;
    /// Blocks until a signal is pending and takes it; `None` once `deadline` has passed.
    fn next_signal(&mut self, deadline: Option<std::time::Instant>) -> Option<i32>;
    /// Sends `signal` to `pid`; a child already gone is not an error.
    fn forward(&mut self, pid: i32, signal: i32);
}

/// Reaps and forwards until the commands in `children` are gone; returns init's exit code:
/// that of the first command to exit. Every signal init gets goes to each command still
/// running. Once one command has exited the others get SIGTERM and [`GRACE`] to exit;
/// init's exit then ends whatever is left of the Machine.
fn supervise(os: &mut impl Os, children: &[i32]) -> i32 {
    let mut running = children.to_vec();
    let mut first: Option<i32> = None;
    let mut deadline = None;
    loop {
        while let Some((pid, status)) = os.reap() {
            let Some(at) = running.iter().position(|&child| child == pid) else {
                continue;
            };
            running.swap_remove(at);
            if first.is_none() {
                first = Some(exit_code(status));
                deadline = Some(std::time::Instant::now() + GRACE);
                for &other in &running {
                    os.forward(other, sys::SIGTERM);
                }
            }
        }
        if let (Some(code), true) = (first, running.is_empty()) {
            return code;
        }
        match os.next_signal(deadline) {
            None => return first.unwrap_or(NOT_EXECUTABLE),
            Some(sys::SIGCHLD) => {}
            Some(signal) => {
                for &child in &running {
                    os.forward(child, signal);
                }
            }
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
    use std::ffi::{c_char, c_int, c_long, c_short, c_uint, c_ulong, c_void, CStr, CString};
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::ExitStatus;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

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
    pub const SIGTERM: c_int = 15;
    const EAGAIN: c_int = 11;
    const O_RDWR: c_int = 2;
    const O_NOCTTY: c_int = 0o400;
    const O_CLOEXEC: c_int = 0o2000000;
    /// The same on every architecture allowed above.
    const TIOCSCTTY: c_ulong = 0x540E;
    /// `c_oflag`'s "newline becomes CR NL" bit.
    const ONLCR: u32 = 0o4;
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
        fn sigtimedwait(set: *const SigSet, info: *mut c_void, timeout: *const TimeSpec) -> c_int;
        fn fork() -> c_int;
        fn setsid() -> c_int;
        fn open(path: *const c_char, flags: c_int, ...) -> c_int;
        fn close(fd: c_int) -> c_int;
        fn dup2(old: c_int, new: c_int) -> c_int;
        fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
        fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
        fn read(fd: c_int, buf: *mut c_void, count: usize) -> isize;
        fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
        fn setgroups(size: usize, list: *const c_uint) -> c_int;
        fn setgid(gid: c_uint) -> c_int;
        fn setuid(uid: c_uint) -> c_int;
        fn execvpe(
            file: *const c_char,
            argv: *const *const c_char,
            envp: *const *const c_char,
        ) -> c_int;
        fn _exit(code: c_int) -> !;
        fn __errno_location() -> *mut c_int;
        fn unlockpt(fd: c_int) -> c_int;
        fn ptsname_r(fd: c_int, buf: *mut c_char, len: usize) -> c_int;
        fn tcgetattr(fd: c_int, termios: *mut Termios) -> c_int;
        fn tcsetattr(fd: c_int, when: c_int, termios: *const Termios) -> c_int;
    }

    #[repr(C)]
    struct TimeSpec {
        seconds: c_long,
        nanoseconds: c_long,
    }

    /// glibc's `struct termios` (60 bytes on the generic ABI); `c_oflag` is the second
    /// word. Only ever filled by `tcgetattr`.
    #[repr(C)]
    struct Termios([u32; 16]);

    /// glibc's `posix_spawnattr_t` is 336 bytes and musl's 336 too; room to spare, and
    /// only ever touched through the functions above.
    #[repr(C, align(8))]
    struct SpawnAttr([u8; 512]);

    /// NUL-terminated pointers to `strings`, for a C array argument.
    fn pointers(strings: &[CString]) -> Vec<*const c_char> {
        let mut pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        pointers
    }

    /// Starts `program` (looked up in `PATH` without a `/`) with `argv` and `env` (init's
    /// environment when `None`), with no signal blocked. `posix_spawnp` clones with
    /// `CLONE_VM | CLONE_VFORK`: no copy of init's page tables, and its errors come back
    /// directly.
    pub fn spawn(
        program: &CStr,
        argv: &[CString],
        env: Option<&[CString]>,
    ) -> io::Result<(c_int, Option<OwnedFd>)> {
        let argv = pointers(argv);
        let env = env.map(pointers);
        let empty = SigSet([0; 16]);
        let mut attr = SpawnAttr([0; 512]);
        let mut pid: c_int = 0;
        // SAFETY: `attr` is initialized before use and destroyed once; `program`, the
        // NUL-terminated `argv` and `env` (into strings alive across the call) and
        // `environ` are valid C strings and arrays for the call's duration; `pid` is a
        // valid local.
        let error = unsafe {
            let envp = env.as_ref().map_or(environ, |env| env.as_ptr());
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
                    argv.as_ptr(),
                    envp,
                );
            }
            posix_spawnattr_destroy(&mut attr);
            error
        };
        match error {
            0 => Ok((pid, None)),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    /// Like [`spawn`], with what `posix_spawn` cannot do: with `tty`, the command runs on
    /// a new pseudo-terminal of the Machine's devpts, as the leader of its own session
    /// with the terminal as its controlling one and as its stdin, stdout and stderr (the
    /// master is returned, to copy its output); with `ids`, as that uid and gid with no
    /// supplementary groups. An exec that fails comes back as its errno, through a
    /// close-on-exec pipe.
    pub fn fork_exec(
        program: &CStr,
        argv: &[CString],
        env: Option<&[CString]>,
        ids: Option<(u32, u32)>,
        tty: bool,
    ) -> io::Result<(c_int, Option<OwnedFd>)> {
        let terminal = if tty { Some(open_terminal()?) } else { None };
        let argv = pointers(argv);
        let env = env.map(pointers);
        let mut ends: [c_int; 2] = [-1, -1];
        // SAFETY: pipe2 writes two descriptors into `ends`, a valid local array.
        if unsafe { pipe2(ends.as_mut_ptr(), O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors owned by nothing else.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let empty = SigSet([0; 16]);
        // SAFETY: init has one thread here (terminal copiers start after every fork), and
        // the child makes only async-signal-safe calls on memory prepared before the fork
        // (C strings, pointer arrays, the mask), then execs or `_exit`s.
        let pid = unsafe { fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see the fork above; every pointer outlives the child's use of it.
            unsafe {
                let envp = env.as_ref().map_or(environ, |env| env.as_ptr());
                let slave = terminal.as_ref().map(|(_, path)| path.as_ptr());
                child(
                    program.as_ptr(),
                    argv.as_ptr(),
                    envp,
                    ids,
                    slave,
                    writer.as_raw_fd(),
                    &empty,
                )
            }
        }
        drop(writer);
        let mut errno = [0u8; 4];
        let mut got = 0;
        while got < errno.len() {
            // SAFETY: reads into the unread rest of `errno`, a valid local buffer.
            let n = unsafe {
                read(
                    reader.as_raw_fd(),
                    errno[got..].as_mut_ptr().cast(),
                    errno.len() - got,
                )
            };
            if n <= 0 {
                break;
            }
            got += n as usize;
        }
        if got == errno.len() {
            let mut status = 0;
            // SAFETY: waitpid writes only to `status`, a valid local.
            unsafe { waitpid(pid, &mut status, 0) };
            return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
        }
        Ok((pid, terminal.map(|(master, _)| master)))
    }

    /// The forked child's part of [`fork_exec`]. Never returns.
    ///
    /// # Safety
    /// Only in a child just forked from a single-threaded init, with valid C strings and
    /// NUL-terminated pointer arrays.
    unsafe fn child(
        program: *const c_char,
        argv: *const *const c_char,
        envp: *const *const c_char,
        ids: Option<(u32, u32)>,
        slave: Option<*const c_char>,
        report: c_int,
        empty: &SigSet,
    ) -> ! {
        // SAFETY: the caller's contract; every call is async-signal-safe.
        unsafe {
            let fail = || -> ! {
                let errno = (*__errno_location()).to_ne_bytes();
                write(report, errno.as_ptr().cast(), errno.len());
                _exit(NOT_EXECUTABLE_CODE)
            };
            if let Some(slave) = slave {
                // A new session has no controlling terminal; Linux makes the first one it
                // opens it. TIOCSCTTY asks again for kernels that do not (a no-op where
                // it already is; gVisor refuses it, and its terminal stays stdio only).
                if setsid() < 0 {
                    fail();
                }
                let fd = open(slave, O_RDWR);
                if fd < 0 {
                    fail();
                }
                ioctl(fd, TIOCSCTTY, 0 as c_ulong);
                for target in 0..3 {
                    if dup2(fd, target) < 0 {
                        fail();
                    }
                }
                if fd > 2 {
                    close(fd);
                }
            }
            if let Some((uid, gid)) = ids {
                if setgroups(0, std::ptr::null()) != 0 || setgid(gid) != 0 || setuid(uid) != 0 {
                    fail();
                }
            }
            if sigprocmask(SIG_SETMASK, empty, std::ptr::null_mut()) != 0 {
                fail();
            }
            execvpe(program, argv, envp);
            fail()
        }
    }

    /// Exit code of a child whose exec failed (its errno goes to init, which reports it).
    const NOT_EXECUTABLE_CODE: c_int = 126;

    /// A new pseudo-terminal of the Machine's own devpts instance: its master and the
    /// slave's path. Newlines are written as they are (no CR added), so the log reads as
    /// it does without a terminal.
    fn open_terminal() -> io::Result<(OwnedFd, CString)> {
        let flags = O_RDWR | O_NOCTTY | O_CLOEXEC;
        // SAFETY: open reads a NUL-terminated path; the result is checked.
        let mut fd = unsafe { open(c"/dev/pts/ptmx".as_ptr(), flags) };
        if fd < 0 {
            // SAFETY: as above.
            fd = unsafe { open(c"/dev/ptmx".as_ptr(), flags) };
        }
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut path = [0u8; 64];
        // SAFETY: both take the open master; ptsname_r writes at most `path.len()` bytes
        // into `path`, NUL included.
        let named = unsafe {
            unlockpt(master.as_raw_fd()) == 0
                && ptsname_r(master.as_raw_fd(), path.as_mut_ptr().cast(), path.len()) == 0
        };
        if !named {
            return Err(io::Error::last_os_error());
        }
        let path = CStr::from_bytes_until_nul(&path)
            .map_err(|_| io::Error::from_raw_os_error(EAGAIN))?
            .to_owned();
        let mut termios = Termios([0; 16]);
        // SAFETY: tcgetattr fills a buffer larger than glibc's termios; tcsetattr reads it.
        unsafe {
            if tcgetattr(master.as_raw_fd(), &mut termios) == 0 {
                termios.0[1] &= !ONLCR;
                tcsetattr(master.as_raw_fd(), 0, &termios);
            }
        }
        Ok((master, path))
    }

    /// Threads that copy each terminal's output to init's stdout (the Machine's log).
    pub struct Copying {
        done: mpsc::Receiver<()>,
        count: usize,
    }

    pub fn copy_terminals(masters: Vec<OwnedFd>) -> Copying {
        let (sender, done) = mpsc::channel();
        let mut count = 0;
        for master in masters {
            let sender = sender.clone();
            let copier = std::thread::Builder::new()
                .name("copier".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    copy(master);
                    let _ = sender.send(());
                });
            match copier {
                Ok(_) => count += 1,
                Err(e) => eprintln!("berth-init: terminal copier: {e}"),
            }
        }
        Copying { done, count }
    }

    /// Until the terminal is closed by every process (EIO) or the log cannot be written.
    fn copy(master: OwnedFd) {
        use std::io::{Read, Write};
        let mut terminal = std::fs::File::from(master);
        let mut buffer = [0u8; 4096];
        loop {
            let n = match terminal.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut out = io::stdout().lock();
            if out
                .write_all(&buffer[..n])
                .and_then(|()| out.flush())
                .is_err()
            {
                return;
            }
        }
    }

    impl Copying {
        /// Waits at most `limit` for every copier to finish.
        pub fn finish(self, limit: Duration) {
            let deadline = Instant::now() + limit;
            for _ in 0..self.count {
                let left = deadline.saturating_duration_since(Instant::now());
                if self.done.recv_timeout(left).is_err() {
                    return;
                }
            }
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

    impl Host {
        /// kill(2); a process already gone is not an error.
        pub fn kill(pid: c_int, signal: c_int) {
            // SAFETY: kill(2) takes plain integers.
            unsafe { kill(pid, signal) };
        }
    }

    impl super::Os for Host {
        fn reap(&mut self) -> Option<(i32, ExitStatus)> {
            let mut status: c_int = 0;
            // SAFETY: waitpid writes only to `status`, a valid local.
            let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
            (pid > 0).then(|| (pid, ExitStatus::from_raw(status)))
        }

        fn next_signal(&mut self, deadline: Option<Instant>) -> Option<i32> {
            let mut signal: c_int = 0;
            let error = match deadline {
                // SAFETY: sigwait reads the set and writes only to `signal`, a valid local.
                None => unsafe { sigwait(&self.signals, &mut signal) },
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let timeout = TimeSpec {
                        seconds: left.as_secs() as c_long,
                        nanoseconds: left.subsec_nanos() as c_long,
                    };
                    // SAFETY: reads the set and the timeout, both valid locals; no info.
                    signal = unsafe { sigtimedwait(&self.signals, std::ptr::null_mut(), &timeout) };
                    if signal >= 0 {
                        0
                    } else if io::Error::last_os_error().raw_os_error() == Some(EAGAIN) {
                        return None;
                    } else {
                        -1
                    }
                }
            };
            if error != 0 {
                // Not expected with a valid set; reap again rather than spin on an error.
                std::thread::sleep(Duration::from_millis(10));
                return Some(SIGCHLD);
            }
            Some(signal)
        }

        fn forward(&mut self, pid: i32, signal: i32) {
            Host::kill(pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tcp_probe_counts_every_endpoint_but_listening_and_closed_ones() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0
   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0
   2: 0100007F:9C40 0100007F:0050 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0
   3: 00000000:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 1 0
";
        // The established pair's one side and a TIME_WAIT; not the listener, not CLOSE.
        assert_eq!(connected_rows(table), 2);
        assert_eq!(connected_rows(table.lines().next().unwrap_or("")), 0);
    }

    use std::collections::VecDeque;
    use std::ffi::CStr;

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
        /// Whether each wait had a deadline.
        deadlines: Vec<bool>,
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

        fn next_signal(&mut self, deadline: Option<std::time::Instant>) -> Option<i32> {
            self.deadlines.push(deadline.is_some());
            let signal = self.signals.pop_front();
            if signal.is_none() {
                assert!(deadline.is_some(), "init waited past the script");
            }
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
        assert_eq!(supervise(&mut os, &[CHILD]), 128 + SIGTERM);
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
        assert_eq!(supervise(&mut os, &[CHILD]), 7);
        assert_eq!(os.reaped, [71, 72, 73, 74, CHILD]);
        assert!(os.forwarded.is_empty(), "SIGCHLD is init's own");
    }

    #[test]
    fn a_command_gone_before_any_signal_ends_init_at_once() {
        let mut os = Script::new(vec![vec![(CHILD, exited(0))]], vec![]);
        assert_eq!(supervise(&mut os, &[CHILD]), 0);
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

    const OTHER: i32 = 41;

    #[test]
    fn every_signal_goes_to_every_process_and_the_first_exit_ends_the_machine() {
        let mut os = Script::new(
            vec![
                vec![],
                vec![],
                vec![(OTHER, exited(3))],
                vec![(CHILD, killed_by(SIGTERM))],
            ],
            vec![SIGUSR1, libc_sigchld(), libc_sigchld()],
        );
        assert_eq!(
            supervise(&mut os, &[CHILD, OTHER]),
            3,
            "the first exit's code"
        );
        assert_eq!(
            os.forwarded,
            [(CHILD, SIGUSR1), (OTHER, SIGUSR1), (CHILD, SIGTERM)],
            "the signal to both, then SIGTERM to the one left"
        );
        assert_eq!(
            os.deadlines,
            [false, false, true],
            "a grace only after the first exit"
        );
    }

    #[test]
    fn a_stop_signal_reaches_each_process_and_the_first_death_is_the_code() {
        let mut os = Script::new(
            vec![
                vec![],
                vec![(CHILD, killed_by(SIGTERM)), (OTHER, exited(0))],
            ],
            vec![SIGTERM],
        );
        assert_eq!(supervise(&mut os, &[CHILD, OTHER]), 128 + SIGTERM);
        assert_eq!(os.forwarded[..2], [(CHILD, SIGTERM), (OTHER, SIGTERM)]);
    }

    #[test]
    fn processes_that_outlive_the_grace_are_left_to_init_s_exit() {
        let mut os = Script::new(vec![vec![(CHILD, exited(0))]], vec![]);
        // OTHER never exits: the wait with a deadline ends without a signal.
        assert_eq!(supervise(&mut os, &[CHILD, OTHER]), 0);
        assert_eq!(os.forwarded, [(OTHER, SIGTERM)]);
        assert_eq!(os.deadlines, [true]);
    }

    fn netstrings(fields: &[&str]) -> Vec<u8> {
        fields
            .iter()
            .flat_map(|field| format!("{}:{field},", field.len()).into_bytes())
            .collect()
    }

    #[test]
    fn the_process_list_decodes_each_process_with_its_ids_and_environment() {
        let bytes = netstrings(&[
            "",
            "",
            "2",
            "sh",
            "-c: ,x",
            "1",
            "A=b=c", // init's ids
            "1000",
            "100",
            "1",
            "/bin/worker",
            "0",
        ]);
        let processes = decode_processes(&bytes).unwrap();
        assert_eq!(processes.len(), 2);
        assert_eq!(processes[0].program.as_bytes(), b"sh");
        assert_eq!(
            processes[0].argv,
            [c"sh".to_owned(), c"-c: ,x".to_owned()],
            "separators inside a field are data"
        );
        assert_eq!(processes[0].ids, None);
        assert_eq!(processes[0].env, Some(vec![("A".into(), "b=c".into())]));
        assert_eq!(processes[1].ids, Some((1000, 100)));
        assert_eq!(processes[1].env, Some(vec![]));
    }

    #[test]
    fn a_malformed_process_list_is_refused() {
        for bad in [
            &b"3:abc"[..],              // no comma
            b"9:abc,",                  // too short
            b"0:,0:,0:,0:,",            // a process without a command
            b"0:,0:,1:1,2:sh,1:0,1:A,", // an entry without '='
            b"0:,1:x,1:1,2:sh,1:0,",    // a gid without a uid
            b"0:,0:,1:2,2:sh,1:0,",     // fewer arguments than said
        ] {
            assert_eq!(
                decode_processes(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_process_environment_overrides_init_s() {
        let base = vec![("PATH".into(), "/bin".into()), ("A".into(), "1".into())];
        let extra = vec![("A".into(), "2".into()), ("B".into(), "3".into())];
        assert_eq!(
            environment(&base, &extra),
            [c"PATH=/bin", c"A=2", c"B=3"].map(CStr::to_owned)
        );
    }

    fn libc_sigchld() -> i32 {
        sys::SIGCHLD
    }
}
