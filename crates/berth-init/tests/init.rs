//! The built `berth-init` with real processes: exit codes, signal deaths, forwarding and
//! reaping. Needs `/bin/sh` and `sleep` on the host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const INIT: &str = env!("CARGO_BIN_EXE_berth-init");

fn init(args: &[&str]) -> Command {
    let mut command = Command::new(INIT);
    command.args(args);
    command
}

fn code(args: &[&str]) -> Option<i32> {
    init(args).status().unwrap().code()
}

/// Waits for `child` at most `limit`; `None` if it is still running then.
fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn children(pid: u32) -> Vec<(u32, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    text.split_whitespace()
        .map(|child| {
            let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].trim_start().chars().next())
                .unwrap_or('?');
            (child.parse().unwrap(), state)
        })
        .collect()
}

#[test]
fn exit_codes_and_signal_deaths_are_reported_as_a_shell_does() {
    assert_eq!(code(&["/bin/sh", "sh", "-c", "exit 7"]), Some(7));
    assert_eq!(code(&["/bin/sh", "sh", "-c", "exit 0"]), Some(0));
    assert_eq!(code(&["sh", "sh", "-c", "kill -USR1 $$"]), Some(128 + 10));
    assert_eq!(code(&["sh", "sh", "-c", "kill -KILL $$"]), Some(128 + 9));
    assert_eq!(code(&["no-such-program-here", "x"]), Some(127));
    assert_eq!(code(&["/etc/passwd", "x"]), Some(126));
    assert_eq!(code(&["sh"]), Some(2), "a call without argv0");
}

#[test]
fn argv0_and_arguments_reach_the_command() {
    let out = init(&[
        "/bin/sh",
        "my-name",
        "-c",
        "cat /proc/$$/cmdline",
        "zero",
        "one",
    ])
    .output()
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "my-name\0-c\0cat /proc/$$/cmdline\0zero\0one\0"
    );
}

#[test]
fn the_command_starts_with_no_signal_blocked_and_no_descriptor_above_2() {
    let out = init(&[
        "/bin/sh",
        "sh",
        "-c",
        "grep SigBlk /proc/self/status; ls /proc/self/fd",
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    // 0, 1, 2 and the directory ls reads.
    let fds: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(fds.len(), 4, "{text}");
}

#[test]
fn a_stop_signal_is_forwarded_and_ends_a_command_that_ignores_nothing() {
    let mut child = init(&["sleep", "sleep", "1000"]).spawn().unwrap();
    // Until its command runs, init has one child: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while children(child.id()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    send_signal(child.id(), 15);
    let status = wait_within(&mut child, Duration::from_secs(5)).expect("init ended");
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(status.signal(), None);
}

#[test]
fn orphans_are_reaped_while_the_command_runs() {
    // The inner shell exits at once, leaving `sleep 0.2` to init (a subreaper).
    let mut child = init(&["sh", "sh", "-c", "sh -c 'sleep 0.2 &'; sleep 2"])
        .spawn()
        .unwrap();
    let mut adopted = false;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let now = children(child.id());
        adopted |= now.len() > 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = children(child.id());
    assert!(adopted, "the orphan never came to init");
    assert_eq!(left.len(), 1, "only the command is left: {left:?}");
    assert!(left.iter().all(|(_, state)| *state != 'Z'), "{left:?}");
    let status = wait_within(&mut child, Duration::from_secs(5)).expect("init ended");
    assert_eq!(status.code(), Some(0));
}

fn send_signal(pid: u32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}
