//! berth-init's terminal (`init.tty`) and process list (`config.processes`) on the real
//! drivers. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use berth_runtime::{init_environment, ExitRecord, InitProcess};
use common::{Driver, Fixture};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

/// What the command says of its stdio, controlling terminal and environment.
const PROBE: &str = "if [ -t 1 ]; then echo out=tty; else echo out=pipe; fi; \
     if [ -t 0 ]; then echo in=tty; else echo in=other; fi; \
     if ( : > /dev/tty ) 2>/dev/null; then echo ctty=yes; else echo ctty=no; fi; \
     echo name=$(/bin/busybox tty); \
     echo dev=$(/bin/busybox stat -c %d /dev/pts/0 2>/dev/null); \
     echo settings=$(/bin/busybox env | grep -c BERTH_INIT); \
     echo done; exit 7";

async fn run(f: &Fixture, args: &[&str], env: Vec<String>) -> (ExitRecord, String) {
    let mut spec = f.spec(args);
    spec.env.extend(env);
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    let record = f
        .runtime
        .wait_exit(&f.layout, WAIT)
        .await
        .unwrap()
        .expect("the Machine exited");
    f.runtime.cleanup(&f.layout).await.unwrap();
    (record, f.logs())
}

fn line<'a>(logs: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    logs.lines()
        .rev()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key} in {logs:?}"))
}

async fn a_terminal_only_when_asked(driver: Driver) {
    let f = Fixture::of(driver, "tty");
    let (record, logs) = run(&f, &["sh", "-c", PROBE], vec![]).await;
    assert_eq!(record.exit_code, Some(7));
    assert_eq!(line(&logs, "out"), "pipe", "{logs}");
    assert_eq!(line(&logs, "ctty"), "no", "{logs}");
    assert_eq!(line(&logs, "name"), "not a tty", "{logs}");

    let (record, logs) = run(&f, &["sh", "-c", PROBE], init_environment(true, &[])).await;
    // Exit codes as without a terminal; the output reaches the log whole, every line
    // as written (no CR added by the terminal).
    assert_eq!(record.exit_code, Some(7), "{logs}");
    assert_eq!(line(&logs, "out"), "tty", "{logs}");
    assert_eq!(line(&logs, "in"), "tty", "{logs}");
    if driver != Driver::Gvisor {
        assert_eq!(
            line(&logs, "ctty"),
            "yes",
            "its controlling terminal: {logs}"
        );
    }
    // Under gVisor (Debian's runsc) the terminal is the command's stdio but not its
    // controlling terminal: the Sentry gives none on open and refuses TIOCSCTTY (EINVAL).
    assert_eq!(line(&logs, "name"), "/dev/pts/0", "{logs}");
    assert_eq!(
        line(&logs, "settings"),
        "0",
        "init's settings are its own: {logs}"
    );
    assert!(logs.contains("done\n") && !logs.contains('\r'), "{logs:?}");

    // Stop's signal reaches the command on its terminal, and is its death as before.
    let mut spec = f.spec(&["sh", "-c", "echo up; exec sleep 1000"]);
    spec.env.extend(init_environment(true, &[]));
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    f.wait_logs("up", Duration::from_secs(10));
    let t = Instant::now();
    f.runtime.signal(&f.layout, libc::SIGTERM).await.unwrap();
    let record = f.runtime.wait_exit(&f.layout, WAIT).await.unwrap().unwrap();
    assert_eq!(record.exit_code, Some(128 + libc::SIGTERM));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    f.runtime.cleanup(&f.layout).await.unwrap();
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

/// Attack: a Machine's terminal must be of its own devpts instance, never one of the
/// host's (which would let it read or type into a host terminal). With a host pty open,
/// the Machine's /dev/pts lists none of the host's, and its /dev/pts/0 is on another
/// filesystem than the host's /dev/pts. Seen to fail with runc's `config.json`
/// bind-mounting the host's /dev/pts in place of a new devpts: the listing then held the
/// host's ptys, and with a terminal init could not even open the host's ptmx (mode 000).
async fn the_terminal_is_of_the_machine_s_own_devpts(driver: Driver) {
    let f = Fixture::of(driver, "ttyown");
    let _host_pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ptmx")
        .expect("a host pty");
    let host_ptys: Vec<String> = std::fs::read_dir("/dev/pts")
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "ptmx")
        .collect();
    assert!(!host_ptys.is_empty());
    let listing = "echo list=$(ls /dev/pts)";
    let (_, logs) = run(&f, &["sh", "-c", listing], vec![]).await;
    assert_eq!(
        line(&logs, "list"),
        "ptmx",
        "host ptys {host_ptys:?} seen: {logs}"
    );
    let (_, logs) = run(&f, &["sh", "-c", listing], init_environment(true, &[])).await;
    assert_eq!(line(&logs, "list"), "0 ptmx", "{logs}");

    let (_, logs) = run(&f, &["sh", "-c", PROBE], init_environment(true, &[])).await;
    let inside: u64 = line(&logs, "dev").parse().expect("a device number");
    let host = std::fs::metadata("/dev/pts").unwrap().dev();
    assert_ne!(
        inside, host,
        "the Machine's pty is on the host's devpts: {logs}"
    );
    f.runtime.remove(&f.layout).await.unwrap();
}

fn process(script: &str, env: &[(&str, &str)], ids: Option<(u32, u32)>) -> InitProcess {
    InitProcess {
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ids,
    }
}

async fn processes_run_together_and_the_first_exit_stops_the_machine(driver: Driver) {
    let f = Fixture::of(driver, "procs");
    let long = process(
        "echo long=$ROLE:$(id -u):$GREETING:$(/bin/busybox env | grep -c BERTH_INIT); \
         exec sleep 1000",
        &[("ROLE", "a")],
        None,
    );
    let short = process(
        "echo short=$ROLE:$(id -u):$(id -g); sleep 0.5; exit 3",
        &[("ROLE", "b"), ("GREETING", "own")],
        Some((1000, 1001)),
    );
    let t = Instant::now();
    let (record, logs) = run(&f, &["sh"], init_environment(false, &[long, short])).await;
    // The first to exit decides the Machine's code; the other had SIGTERM, not the grace.
    assert_eq!(record.exit_code, Some(3), "{logs}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(
        line(&logs, "long"),
        "a:0:hi:0",
        "the Machine's env, the process's over it"
    );
    assert_eq!(line(&logs, "short"), "b:1000:1001", "its own user: {logs}");

    // Stop's signal goes to each process init started.
    let trap = |name: &str| {
        process(
            &format!(
                "trap 'echo {name}=term; exit 0' TERM; echo {name}=up; \
                 while true; do sleep 0.1; done"
            ),
            &[],
            None,
        )
    };
    let mut spec = f.spec(&["sh"]);
    spec.env
        .extend(init_environment(false, &[trap("one"), trap("two")]));
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    f.wait_logs("one=up", Duration::from_secs(10));
    f.wait_logs("two=up", Duration::from_secs(10));
    f.runtime.signal(&f.layout, libc::SIGTERM).await.unwrap();
    let record = f.runtime.wait_exit(&f.layout, WAIT).await.unwrap().unwrap();
    let logs = f.logs();
    assert_eq!(record.exit_code, Some(0), "{logs}");
    assert_eq!(
        (line(&logs, "one"), line(&logs, "two")),
        ("term", "term"),
        "{logs}"
    );
    f.runtime.cleanup(&f.layout).await.unwrap();

    // A process that cannot start fails the Machine as a missing command does.
    let missing = InitProcess {
        args: vec!["/no/such".into()],
        env: vec![],
        ids: None,
    };
    let (record, logs) = run(
        &f,
        &["sh"],
        init_environment(false, &[process("sleep 1000", &[], None), missing]),
    )
    .await;
    assert_eq!(record.exit_code, Some(127), "{logs}");
    assert!(logs.contains("berth-init: exec /no/such"), "{logs}");
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

both_drivers!(
    a_terminal_only_when_asked,
    the_terminal_is_of_the_machine_s_own_devpts,
    processes_run_together_and_the_first_exit_stops_the_machine,
);

gvisor_driver!(
    a_terminal_only_when_asked,
    processes_run_together_and_the_first_exit_stops_the_machine,
);
