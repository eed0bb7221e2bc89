//! The seccomp profile against a process inside a real Machine, on both drivers: io_uring,
//! socket families outside the ordinary five (also with the family's high bits set, which
//! the kernel drops), and `personality` flags. Needs root.
//!
//! Proved able to fail: with `default_profile` back at its state before these rules
//! (commit 34edac3: no io_uring entries, no socket, socketpair or personality rules), the
//! probe printed `io_uring_setup=ok`, `socket_vsock=ok`, `socket_vsock_high_bits=ok`,
//! `socket_xdp=ok` and `personality_read_implies_exec=ok` on both drivers, and both
//! tests failed. This host has no AF_ALG: unfiltered it answers EAFNOSUPPORT (97), the
//! filter EPERM, so that line still tells them apart, as does `socketpair_vsock` (95).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Driver, Fixture};

const EPERM: &str = "errno:1";

/// The probe, compiled once per test process as a static binary with plain `rustc`.
fn probe() -> &'static Path {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probes/seccomp_probe.rs");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("seccomp-probe-{}", std::process::id()));
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let built = Command::new(rustc)
            .args([
                "--edition",
                "2021",
                "-O",
                "-C",
                "target-feature=+crt-static",
                "-o",
            ])
            .arg(&out)
            .arg(&source)
            .output()
            .expect("run rustc");
        assert!(
            built.status.success(),
            "building the probe: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        out
    })
}

async fn hostile_syscalls_are_refused(driver: Driver) {
    let f = Fixture::of(driver, "seccomp");
    fs::copy(probe(), f.lower.join("bin/seccomp-probe")).unwrap();
    f.runtime
        .prepare(&f.layout, &f.spec(&["/bin/seccomp-probe"]))
        .await
        .unwrap();
    // What runc is given is what the native driver compiles.
    let config = fs::read_to_string(f.layout.config_json()).unwrap();
    assert!(config.contains("io_uring_setup"), "{config}");
    assert!(config.contains("\"socket\""), "{config}");
    assert!(config.contains("\"personality\""), "{config}");

    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    let logs = f.wait_logs("done", Duration::from_secs(20));
    let result = |name: &str| -> String {
        logs.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in:\n{logs}"))
            .trim()
            .to_owned()
    };
    for (name, expected) in [
        ("io_uring_setup", EPERM),
        ("io_uring_enter", EPERM),
        ("io_uring_register", EPERM),
        ("socket_vsock", EPERM),
        ("socket_vsock_high_bits", EPERM),
        ("socket_alg", EPERM),
        ("socket_xdp", EPERM),
        ("socketpair_vsock", EPERM),
        ("personality_read_implies_exec", EPERM),
        ("personality_addr_no_randomize", EPERM),
        ("socket_unix", "ok"),
        ("socket_inet", "ok"),
        ("socket_inet6", "ok"),
        ("socket_netlink", "ok"),
        ("socketpair_unix", "ok"),
        ("personality_query", "ok"),
        ("personality_linux", "ok"),
    ] {
        assert_eq!(
            result(name),
            expected,
            "{name} on {}:\n{logs}",
            driver.name()
        );
    }
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

#[tokio::test]
async fn runc_refuses_hostile_syscalls() {
    hostile_syscalls_are_refused(Driver::Runc).await
}

#[tokio::test]
async fn native_refuses_hostile_syscalls() {
    hostile_syscalls_are_refused(Driver::Native).await
}
