//! Attacks on the exec and supervisor path, against the real drivers: a Machine that
//! waits for the next exec and goes after the helper that enters it, host descriptors
//! leaking into a Machine (CVE-2024-21626), a `/dev/null` swapped for a FIFO, a forged
//! exec pid file, and a helper that outlives the agent that started it. Needs root.
//!
//! Each test notes how it was seen to fail: on the commit before the fix (34edac3), or
//! with the one protection it checks reverted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_runtime::exec::{ExecOutput, ExecSpec};
use berth_runtime::{BundleSpec, Started};
use common::{Driver, Fixture};

async fn start(f: &Fixture, spec: BundleSpec) -> Started {
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap()
}

async fn exec(f: &Fixture, cmd: &[&str], timeout: Duration) -> ExecOutput {
    f.runtime
        .exec(
            &f.layout,
            &ExecSpec {
                cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                stdin: None,
                timeout,
                max_output_bytes: 1 << 16,
            },
        )
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value after `prefix` on the first line that has it.
fn field<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in:\n{out}"))
        .trim()
}

/// Descriptor numbers in an `ls /proc/self/fd` listing (one per line).
fn fd_numbers(out: &str, start: &str, end: &str) -> Vec<u32> {
    let from = out
        .find(start)
        .unwrap_or_else(|| panic!("no {start}:\n{out}"))
        + start.len();
    let to = out[from..].find(end).unwrap() + from;
    out[from..to]
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn pid_ns(pid: u32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat[stat.rfind(')').unwrap() + 1..]
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Host pids whose command line is exactly `argv`, in the pid namespace of `init`.
fn find_in_machine(init: u32, argv: &[&str]) -> Vec<u32> {
    let ns = pid_ns(init);
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| fs::read(format!("/proc/{pid}/cmdline")).ok().as_deref() == Some(&wanted))
        .filter(|&pid| pid_ns(pid) == ns)
        .collect()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A symlink chain in the image that makes each lookup of a name in `/slow/b` walk about
/// 78,000 path components (39 links of 2,000 `./` each), and a PATH of `entries` of
/// them before `/bin`: every PATH lookup of the exec'd command then takes a while, inside
/// the Machine, with nothing the helper could skip.
fn slow_path(f: &Fixture, entries: usize) -> String {
    let slow = f.lower.join("slow");
    fs::create_dir_all(&slow).unwrap();
    symlink(format!("{}.", "./".repeat(2000)), slow.join("a")).unwrap();
    symlink(format!("{}a", "a/".repeat(37)), slow.join("b")).unwrap();
    format!("PATH={}/bin", "/slow/b:".repeat(entries))
}

/// 1. A Machine process waits for the exec helper to show up in its `/proc` and reads
///    what a same-uid process may read of a dumpable one: `environ` (the agent's
///    environment), `maps`, the `exe` link and its contents (the host binary; the
///    CVE-2019-5736 overwrite starts from there), and the `fd` links (host descriptors).
///    It also swaps `/dev/null` for a FIFO, which stalled the helper before the fix; a
///    PATH that is slow to search keeps the helper in view after it.
///
/// Seen failing: at 34edac3 the native helper stalled on the FIFO with the spec's
/// capabilities and the attacker logged `LEAK <pid> environ exe=… maps exe-open fd`.
/// With the fix but without the two PR_SET_DUMPABLE calls (nsexec's first action and
/// `stay_private`), the slow PATH window showed the same leaks.
async fn exec_helper_is_not_dumpable(driver: Driver) {
    let f = Fixture::of(driver, "dumpable");
    let path = slow_path(&f, 150);
    let attacker = r#"export PATH=/bin
/bin/busybox rm -f /dev/null && /bin/busybox mkfifo /dev/null
echo ready
seen=" "
while true; do
  for d in /proc/[0-9]*; do
    c=$(cat $d/comm 2>/tmp/err) || continue
    case "$c" in berth*|runc*) ;; *) continue ;; esac
    p=${d#/proc/}
    case "$seen" in *" $p "*) ;; *) seen="$seen$p "; echo "seen $p $c" ;; esac
    r=""
    cat $d/environ >/tmp/o 2>&1 && r="$r environ"
    readlink $d/exe >/tmp/o 2>&1 && r="$r exe=$(cat /tmp/o)"
    cat $d/maps >/tmp/o 2>&1 && r="$r maps"
    head -c 1 $d/exe >/tmp/o 2>&1 && r="$r exe-open"
    ls -l $d/fd/ 2>/tmp/err | grep -q -- '->' && r="$r fd"
    # Only if it was still the helper after the reads: once it has exec'd, the
    # process is the Machine's own command and may be read.
    [ -n "$r" ] && [ "$(cat $d/comm 2>/tmp/err)" = "$c" ] && echo "LEAK $p$r"
  done
done"#;
    let mut spec = f.spec(&["/bin/sh", "-c", attacker]);
    spec.env.push(path);
    start(&f, spec).await;
    f.wait_logs("ready\n", Duration::from_secs(10));
    let t0 = Instant::now();
    let out = exec(&f, &["true"], Duration::from_secs(30)).await;
    let took = t0.elapsed();
    // Let the attacker finish its round.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = f.logs();
    assert!(!logs.contains("LEAK"), "after {took:?}:\n{logs}");
    // The attack had its chance: the helper was in view, waiting. (PID 1 is the Machine's
    // init, `berth-init`, which must not leak either.)
    assert!(
        logs.lines()
            .any(|l| l.starts_with("seen ") && !l.starts_with("seen 1 ")),
        "after {took:?}:\n{logs}"
    );
    assert_eq!(
        (out.exit_code, out.timed_out),
        (Some(0), false),
        "{out:?} {}",
        text(&out.stderr)
    );
    f.runtime.remove(&f.layout).await.unwrap();
}

/// A directory of the host opened without close-on-exec, as a careless host program
/// might hold one; closed when dropped.
struct LeakedDir(i32);

impl LeakedDir {
    fn open(dir: &Path) -> LeakedDir {
        let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: open(2) of a valid C string; the descriptor is closed on drop.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        assert!(fd > 2, "open {}", dir.display());
        LeakedDir(fd)
    }
}

impl Drop for LeakedDir {
    fn drop(&mut self) {
        // SAFETY: the descriptor this guard opened.
        unsafe { libc::close(self.0) };
    }
}

/// 2. Leaked host descriptors (CVE-2024-21626): the agent holds a host directory without
///    close-on-exec. Neither the Machine's init nor an exec'd command may have any
///    descriptor but stdio (and `ls`'s own), nor reach the directory through
///    `/proc/self/fd/N`.
///
/// Seen failing: at 34edac3 the native exec listed the leaked descriptor and read the
/// host's secret through it (`secret=host-only`). Init was already clean there (the
/// supervisor closes inherited descriptors); it is checked all the same.
async fn no_host_descriptor_reaches_a_machine(driver: Driver) {
    let f = Fixture::of(driver, "fds");
    let host_dir = f.tmp.path().join("host-only");
    fs::create_dir_all(&host_dir).unwrap();
    fs::write(host_dir.join("secret"), "host-only\n").unwrap();
    let leaked = LeakedDir::open(&host_dir);
    let probe = format!(
        "echo fds-start; ls /proc/self/fd; echo fds-end; \
         echo \"secret=$(cat /proc/self/fd/{n}/secret 2>&1)\"; \
         for n in 3 4 5 6 7 8 9 10 11 12; do cat /proc/self/fd/$n/secret 2>/dev/null; done; \
         echo probed",
        n = leaked.0
    );
    start(
        &f,
        f.spec(&["sh", "-c", &format!("{probe}; exec sleep 1000")]),
    )
    .await;
    let logs = f.wait_logs("probed\n", Duration::from_secs(10));
    let out = exec(&f, &["sh", "-c", &probe], Duration::from_secs(10)).await;
    let out = text(&out.stdout);
    drop(leaked);
    for (who, seen) in [("init", &logs), ("exec", &out)] {
        assert_eq!(
            fd_numbers(seen, "fds-start", "fds-end"),
            [0, 1, 2, 3],
            "{who} holds more than stdio:\n{seen}"
        );
        assert!(!seen.contains("secret=host-only"), "{who}:\n{seen}");
        assert!(!seen.contains("host-only\n"), "{who}:\n{seen}");
    }
    f.runtime.remove(&f.layout).await.unwrap();
}

/// 2b. The image's working directory as `/proc/self/fd/N` (the CVE-2024-21626 route): if
///     init (or the exec helper) still held a descriptor of the host when it changed
///     into its cwd, the Machine would start with its cwd on the host. Tried for every
///     small N; the start is refused or the cwd is inside the Machine.
///
/// Seen failing: at 34edac3 native init kept the spawner's handle on the host's root
/// until execve, and the Machine with cwd `/proc/self/fd/N` for that N listed the host's
/// root (`hostroot=yes`).
async fn cwd_cannot_lead_out_through_a_descriptor(driver: Driver) {
    let f = Fixture::of(driver, "cwd");
    // A path only the host's root has below it.
    let marker = f.lower.canonicalize().unwrap();
    let marker = marker.strip_prefix("/").unwrap().display().to_string();
    for n in 3..=12 {
        let layout = f.another_layout(&format!("cwd{n}"));
        let mut spec = f.spec_for(
            &layout,
            &[
                "/bin/sh",
                "-c",
                &format!(
                    "if test -e ./{marker}/bin/busybox; then echo hostroot=yes; \
                     else echo hostroot=no; fi; echo checked"
                ),
            ],
        );
        spec.cwd = format!("/proc/self/fd/{n}");
        f.runtime.prepare(&layout, &spec).await.unwrap();
        match f.runtime.start(&layout, &f.lowerdirs()).await {
            Err(_) => {}
            Ok(_) => {
                let logs = f.wait_logs_of(&layout, "checked\n", Duration::from_secs(10));
                assert!(logs.contains("hostroot=no"), "cwd fd {n}:\n{logs}");
            }
        }
        f.runtime.remove(&layout).await.unwrap();
    }
}

/// 3. The Machine replaces `/dev/null` with a FIFO before an exec: the exec must still
///    complete, and its command must run under seccomp (a user namespace needs no
///    capability, so only the filter refuses `unshare -U`).
///
/// Seen failing: at 34edac3 the native helper opened the Machine's `/dev/null` before
/// seccomp and blocked on the FIFO until the exec timed out (`timed_out: true`), with
/// the spec's capabilities and no filter yet, where a ptrace could have skipped
/// `seccomp(2)`.
async fn fifo_dev_null_does_not_stall_exec(driver: Driver) {
    let f = Fixture::of(driver, "fifo");
    let script = "/bin/busybox rm -f /dev/null && /bin/busybox mkfifo /dev/null; \
                  echo ready; exec sleep 1000";
    start(&f, f.spec(&["sh", "-c", script])).await;
    f.wait_logs("ready\n", Duration::from_secs(10));
    let out = exec(
        &f,
        &[
            "sh",
            "-c",
            "test -p /dev/null && echo fifo=yes || echo fifo=no; unshare -U true; \
             echo userns=$?; grep Seccomp: /proc/self/status",
        ],
        Duration::from_secs(5),
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, Some(0), "{stdout} {}", text(&out.stderr));
    // With runc in a user namespace /dev/null is a bind mount of the host's device, which
    // root inside cannot remove: the attack stops earlier. Natively it must have run.
    if driver == Driver::Native {
        assert_eq!(field(&stdout, "fifo="), "yes", "{stdout}");
    }
    assert_ne!(field(&stdout, "userns="), "0", "{stdout}");
    assert_eq!(field(&stdout, "Seccomp:"), "2", "{stdout}");
    f.runtime.remove(&f.layout).await.unwrap();
}

/// 4. The runc driver kills a timed-out exec by the pid runc wrote to its pid file. The
///    file is in the host run directory, out of a Machine's reach; the test plays an
///    attacker that could write it anyway and points it at a host process. The timeout
///    must kill the exec'd command, and only it.
///
/// Seen failing: at 34edac3 the forged pid was SIGKILLed (the sacrificial `sleep`
/// ended with signal 9).
#[tokio::test]
async fn runc_forged_exec_pid_file_kills_nothing_else() {
    let f = Fixture::of(Driver::Runc, "pidfile");
    let started = start(&f, f.spec(&["sleep", "1000"])).await;
    let mut victim = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let run_dir = f.layout.run_dir();
    let victim_pid = victim.id();
    let forger = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for entry in fs::read_dir(&run_dir).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let written = fs::read_to_string(entry.path()).unwrap_or_default();
                if name.starts_with("exec-") && name.ends_with(".pid") && !written.is_empty() {
                    let forged = run_dir.join("forged.tmp");
                    fs::write(&forged, format!("{victim_pid}\n")).unwrap();
                    fs::rename(&forged, entry.path()).unwrap();
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    });
    let out = exec(&f, &["sleep", "4243"], Duration::from_millis(1500)).await;
    assert!(forger.join().unwrap(), "the pid file never showed up");
    assert!(out.timed_out && out.exit_code.is_none(), "{out:?}");
    assert_eq!(
        victim.try_wait().unwrap(),
        None,
        "the host process was killed"
    );
    assert_eq!(
        find_in_machine(started.pid, &["sleep", "4243"]),
        Vec::<u32>::new(),
        "the timed-out command still runs"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
    f.runtime.remove(&f.layout).await.unwrap();
}

/// Runs one long exec for `exec_helper_dies_with_its_agent`, as the agent would, then
/// waits to be killed.
#[tokio::test]
#[ignore = "helper run in a child process"]
async fn helper_exec_forever() {
    let Some(dir) = std::env::var_os("BERTH_HELPER_MACHINES") else {
        return;
    };
    let id = std::env::var("BERTH_HELPER_ID").unwrap();
    let runc_root = std::env::var_os("BERTH_HELPER_RUNC_ROOT").unwrap();
    let runtime = common::make_runtime(
        Driver::from_env(),
        &common::runtime_config(Path::new(&runc_root)),
    );
    let layout = berth_runtime::MachineLayout::new(Path::new(&dir), &id);
    let _ = runtime
        .exec(
            &layout,
            &ExecSpec {
                cmd: vec!["sleep".into(), "4242".into()],
                stdin: None,
                timeout: Duration::from_secs(600),
                max_output_bytes: 1024,
            },
        )
        .await;
}

/// 5. The agent is SIGKILLed during a long exec: the helpers (natively `nsexec`; with
///    runc the guard and the `runc exec` under it) and the command must go with it, not
///    run on unwatched until their timeout (or forever).
///
/// Seen failing: at 34edac3 `sleep 4242` was still running 2 s after the agent's
/// kill -9 ("the exec'd command outlived the agent"): nothing watched the agent. With
/// runc, at 40b5aaf (before the exec guard; the agent ran `runc exec` itself) the same:
/// `runc exec` and its `sleep 4242` both outlived the agent. A guard that killed only
/// runc on the agent's death (not the command's pidfd it holds) failed the same way: a
/// killed `runc exec` leaves its command running.
async fn exec_helper_dies_with_its_agent(driver: Driver) {
    let f = Fixture::of(driver, "orphan");
    let started = start(&f, f.spec(&["sleep", "1000"])).await;
    let mut agent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_exec_forever",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BERTH_HELPER_MACHINES", &f.machines)
        .env("BERTH_HELPER_ID", f.id())
        .env("BERTH_HELPER_RUNC_ROOT", &f.runc_root)
        .env("BERTH_HELPER_DRIVER", driver.name())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let command = loop {
        if let Some(&pid) = find_in_machine(started.pid, &["sleep", "4242"]).first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "the exec never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Every process between the agent and the command.
    let mut helpers = Vec::new();
    let mut pid = command;
    loop {
        pid = ppid(pid).unwrap();
        if pid == agent.id() {
            break;
        }
        assert_ne!(pid, started.pid, "the command's parent is a helper");
        assert!(pid > 1, "the command is not under the agent");
        helpers.push(pid);
    }
    // Natively `nsexec`; with runc, `runc exec` under its guard.
    let expected = if driver == Driver::Runc { 2 } else { 1 };
    assert_eq!(helpers.len(), expected, "helpers {helpers:?}");
    agent.kill().unwrap();
    agent.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while (alive(command) || helpers.iter().any(|&h| alive(h))) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(command), "the exec'd command outlived the agent");
    for helper in helpers {
        assert!(!alive(helper), "the helper {helper} outlived the agent");
    }
    f.runtime.remove(&f.layout).await.unwrap();
}

macro_rules! drivers {
    ($($module:ident($driver:ident): [$($case:ident),* $(,)?]),* $(,)?) => {
        $(
            mod $module {
                $(
                    #[tokio::test]
                    async fn $case() {
                        super::$case(super::Driver::$driver).await
                    }
                )*
            }
        )*
    };
}

drivers!(
    native(Native): [
        exec_helper_is_not_dumpable,
        no_host_descriptor_reaches_a_machine,
        cwd_cannot_lead_out_through_a_descriptor,
        fifo_dev_null_does_not_stall_exec,
        exec_helper_dies_with_its_agent,
    ],
    runc(Runc): [
        exec_helper_is_not_dumpable,
        no_host_descriptor_reaches_a_machine,
        cwd_cannot_lead_out_through_a_descriptor,
        fifo_dev_null_does_not_stall_exec,
        exec_helper_dies_with_its_agent,
    ],
);
