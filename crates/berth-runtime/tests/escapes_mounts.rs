//! Attacks on how Machines get their mounts: hostile images with symlinks where the
//! driver mounts, masks or makes devices (runc's advisories on symlinked mount
//! destinations, CVE-2021-30465 and CVE-2019-19921, and masked paths, CVE-2025-31133).
//! Real drivers, real overlayfs. Needs root.
//!
//! No test here changes a host kernel setting, even when the protection is gone: the
//! Machines only open sysctl files for appending, which writes nothing, and a redirected
//! mount proves itself by creating a directory under a temp dir of the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_runtime::{RuntimeError, Status};
use common::{Driver, Fixture};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";

/// Run by each Machine: reports every sysctl and sysrq file it could open for writing
/// (opening for append writes nothing), what /proc is, and its own mount table.
const PROBE: &str = "for p in /proc/sys/kernel/core_pattern /proc/sys/kernel/panic \
     /proc/sys/vm/overcommit_memory /proc/sysrq-trigger /hostproc/sys/kernel/core_pattern; do \
       if [ -e $p ] && (: >> $p) 2>/dev/null; then echo WRITABLE $p; fi; \
     done; \
     echo MOUNTS; cat /proc/self/mountinfo; echo PROBED";

/// Replaces `name` in the image layer with a symlink to `target`.
fn plant_symlink(f: &Fixture, name: &str, target: impl AsRef<Path>) {
    let path = f.lower.join(name);
    if path.is_dir() {
        fs::remove_dir_all(&path).unwrap();
    }
    symlink(target, &path).unwrap();
}

/// A relative symlink target from `from` (a path in the image) that climbs out of the
/// rootfs on the host to `host_path`.
fn climbing_target(from: &str, host_path: &Path) -> PathBuf {
    let depth = from.trim_matches('/').split('/').count() - 1;
    let mut up = PathBuf::new();
    for _ in 0..depth + 32 {
        up.push("..");
    }
    up.join(host_path.strip_prefix("/").unwrap())
}

/// Starts the Machine with `script`; the start error, or, when it ran, its logs.
async fn start_probe(f: &Fixture, script: &str) -> Result<String, RuntimeError> {
    f.runtime
        .prepare(&f.layout, &f.spec(&["sh", "-c", script]))
        .await
        .unwrap();
    start_prepared(f).await
}

async fn start_prepared(f: &Fixture) -> Result<String, RuntimeError> {
    f.runtime.start(&f.layout, &f.lowerdirs()).await?;
    f.runtime.wait_exit(&f.layout, WAIT).await.unwrap().unwrap();
    f.runtime.cleanup(&f.layout).await.unwrap();
    Ok(f.logs())
}

/// A refused start leaves nothing: not running, no mounts, no runc container.
async fn assert_refused_cleanly(f: &Fixture, started: Result<String, RuntimeError>, what: &str) {
    let err = match started {
        Ok(logs) => panic!("the hostile image started; the Machine said:\n{logs}"),
        Err(err) => err,
    };
    let message = err.to_string();
    eprintln!("{:?} start error: {message}", f.driver);
    assert_eq!(err.code(), "runtime_failed", "{message}");
    assert!(message.contains(what), "{message}");
    assert_eq!(
        f.runtime.status(&f.layout).await.unwrap(),
        Status::NotRunning
    );
    assert!(!f.logs().contains("PROBED"), "{}", f.logs());
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

/// Finding 1 of the issue, as reported: `proc -> ../rootfs/hostproc` made the native
/// init mount the Machine's procfs at `/hostproc`, unmasked and with `/proc/sys`
/// writable, so the Machine could write the host's `kernel.core_pattern`.
///
/// Proved able to fail: with `mount_in_rootfs` back to joining the destination onto
/// the rootfs path (commit 34edac3), the start succeeded and the Machine printed
/// `WRITABLE /hostproc/sys/kernel/core_pattern` (it only opened it for appending).
#[tokio::test]
async fn proc_symlinked_inside_the_rootfs_is_refused() {
    let f = Fixture::of(Driver::Native, "procln");
    // From the host's rootfs path, the link names the image's own `/hostproc`.
    fs::create_dir(f.lower.join("hostproc")).unwrap();
    plant_symlink(&f, "proc", "../rootfs/hostproc");
    let before = fs::read_to_string(CORE_PATTERN).unwrap();
    let started = start_probe(&f, PROBE).await;
    if let Ok(logs) = &started {
        assert!(!logs.contains("WRITABLE"), "{logs}");
    }
    assert_eq!(fs::read_to_string(CORE_PATTERN).unwrap(), before);
    assert_refused_cleanly(&f, started, "mount destination /proc: is a symlink").await;
}

/// Symlinks at `/proc`, `/sys` and `/dev` that point out of the rootfs to a host
/// directory, absolute or climbing with `..`: both drivers refuse to start, and nothing
/// is made in the host directory they name.
///
/// Proved able to fail: with the join-and-follow `mount_in_rootfs` of commit 34edac3,
/// every native case started ("the hostile image started"): the kernel filesystems were
/// mounted on the host directory (in the Machine's mount namespace, then dropped with
/// the old root), and the Machine ran with no /proc, its masks silently skipped. For
/// runc (1.1.5) without `check_kernel_mount_points`, `/proc` and `/sys` were refused by
/// runc itself, but with `/dev` symlinked runc created `fd`, `stdin`, `stdout`,
/// `stderr` and `ptmx` symlinks in the host directory ("host directory ... was
/// written", 5 entries).
async fn destinations_symlinked_out_of_the_rootfs(driver: Driver) {
    for destination in ["proc", "sys", "dev"] {
        for absolute in [true, false] {
            let f = Fixture::of(driver, &format!("ln{destination}"));
            let host = tempfile::tempdir().unwrap();
            let target = host.path().join("target");
            fs::create_dir(&target).unwrap();
            let link = if absolute {
                target.clone()
            } else {
                climbing_target(destination, &target)
            };
            plant_symlink(&f, destination, &link);
            let started = start_probe(&f, PROBE).await;
            assert_eq!(
                fs::read_dir(&target).unwrap().count(),
                0,
                "{driver:?} {destination} -> {}: host directory {} was written",
                link.display(),
                target.display()
            );
            let what = format!("mount destination /{destination}: is a symlink");
            assert_refused_cleanly(&f, started, &what).await;
        }
    }
}

#[tokio::test]
async fn native_destinations_symlinked_out_of_the_rootfs() {
    destinations_symlinked_out_of_the_rootfs(Driver::Native).await
}

#[tokio::test]
async fn runc_destinations_symlinked_out_of_the_rootfs() {
    destinations_symlinked_out_of_the_rootfs(Driver::Runc).await
}

/// `/dev/pts`, `/dev/shm` and `/dev/mqueue` symlinked out of the rootfs in the image:
/// the Machine's `/dev` is a fresh tmpfs mounted on the image's `/dev` directory, so the
/// mounts below it land in that tmpfs, inside. The resolver itself is attacked with the
/// same symlinks without the tmpfs in `native::inroot`'s unit tests; this checks the
/// driver keeps covering the image's `/dev`.
///
/// Proved able to fail: with the `/dev` tmpfs mount taken out of the spec, the start
/// failed on the planted symlinks instead of mounting inside (`mount destination
/// /dev/pts: is a symlink in the image, not a directory; refused`). On commit 34edac3
/// it passes: this case was covered by the tmpfs before as well.
#[tokio::test]
async fn dev_subdirectories_symlinked_out_stay_inside() {
    let f = Fixture::of(Driver::Native, "devsub");
    let host = tempfile::tempdir().unwrap();
    for name in ["pts", "shm", "mqueue"] {
        let target = host.path().join(name);
        symlink(&target, f.lower.join("dev").join(name)).unwrap();
    }
    let logs = start_probe(&f, PROBE).await.unwrap();
    assert!(logs.contains("PROBED"), "{logs}");
    let mounts = mount_table(&logs);
    for (point, fstype) in [
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
    ] {
        assert!(
            mounts.contains(&(point.to_owned(), fstype.to_owned())),
            "{point} {fstype} missing in {mounts:?}"
        );
    }
    assert_eq!(fs::read_dir(host.path()).unwrap().count(), 0);
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

/// Mount points and filesystem types of a mountinfo the Machine printed.
fn mount_table(logs: &str) -> Vec<(String, String)> {
    logs.lines()
        .skip_while(|l| *l != "MOUNTS")
        .filter_map(|line| {
            let (fields, after) = line.split_once(" - ")?;
            let point = fields.split_whitespace().nth(4)?;
            Some((
                point.to_owned(),
                after.split_whitespace().next()?.to_owned(),
            ))
        })
        .collect()
}

/// The baseline the symlinks above try to get around: in a plain image, `/proc/sys` and
/// `/proc/sysrq-trigger` are read-only and the host's `core_pattern` stays as it was.
///
/// Proved able to fail: with `readonly_path` skipped for /proc, the Machine printed
/// `WRITABLE` for core_pattern, panic and overcommit_memory (it only opened them, so
/// nothing was written).
async fn proc_sys_is_read_only(driver: Driver) {
    let f = Fixture::of(driver, "procro");
    let before = fs::read_to_string(CORE_PATTERN).unwrap();
    let logs = start_probe(&f, PROBE).await.unwrap();
    assert!(logs.contains("PROBED"), "{logs}");
    assert!(!logs.contains("WRITABLE"), "{logs}");
    assert_eq!(fs::read_to_string(CORE_PATTERN).unwrap(), before);
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

#[tokio::test]
async fn native_proc_sys_is_read_only() {
    proc_sys_is_read_only(Driver::Native).await
}

#[tokio::test]
async fn runc_proc_sys_is_read_only() {
    proc_sys_is_read_only(Driver::Runc).await
}

/// Adds masked or read-only paths to the prepared `config.json`.
fn add_paths(f: &Fixture, key: &str, paths: &[&str]) {
    let path = f.layout.config_json();
    let mut config: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let list = config["linux"][key].as_array_mut().unwrap();
    list.extend(paths.iter().map(|p| serde_json::Value::from(*p)));
    fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
}

/// A masked path that the image made a symlink (CVE-2025-31133 turned the mask's
/// source into one; here its target is): the mask must not land on what the link names.
/// The native driver refuses the start.
///
/// Proved able to fail: with the `symlink_metadata` + path `mount` of commit 34edac3,
/// the start succeeded and the bind went through the link, masking the file it names
/// (`/etc/secret` read back empty) while `/etc/masked` was never masked itself.
#[tokio::test]
async fn masked_path_that_is_a_symlink_is_refused() {
    for (link, target) in [("etc/masked", "/etc/secret"), ("masked-dir", "/www")] {
        let f = Fixture::of(Driver::Native, "maskln");
        fs::write(f.lower.join("etc/secret"), "image secret\n").unwrap();
        symlink(target, f.lower.join(link)).unwrap();
        f.runtime
            .prepare(
                &f.layout,
                &f.spec(&["sh", "-c", "cat /etc/secret; ls /www; echo PROBED"]),
            )
            .await
            .unwrap();
        add_paths(&f, "maskedPaths", &[&format!("/{link}")]);
        let started = start_prepared(&f).await;
        let what = format!("mask /{link}: has a symlink; refused");
        assert_refused_cleanly(&f, started, &what).await;
    }
}

/// A read-only path that the image made a symlink is refused too: bound through the
/// link, the read-only mount would protect what the link names, not the path.
///
/// Proved able to fail: with the path-based `readonly_path` of commit 34edac3 the start
/// succeeded and `/www` (the link's target) turned read-only instead.
#[tokio::test]
async fn readonly_path_that_is_a_symlink_is_refused() {
    let f = Fixture::of(Driver::Native, "roln");
    symlink("/www", f.lower.join("ro-link")).unwrap();
    f.runtime
        .prepare(
            &f.layout,
            &f.spec(&["sh", "-c", "touch /www/x; echo PROBED"]),
        )
        .await
        .unwrap();
    add_paths(&f, "readonlyPaths", &["/ro-link", "/missing/is/skipped"]);
    let started = start_prepared(&f).await;
    assert_refused_cleanly(
        &f,
        started,
        "make read-only /ro-link: has a symlink; refused",
    )
    .await;
}

/// A Machine's mount table shows no host paths of Berth's data dir: the overlay's layers
/// are handed to the kernel as detached mounts, by descriptor (issue 13, low finding).
///
/// Proved able to fail: with `overlay::mount_options` on the paths (commit 34edac3), the
/// Machine's mountinfo held `lowerdir=/tmp/berth-rt-…/lower,upperdir=…/upper`.
async fn mountinfo_hides_host_paths(driver: Driver) {
    let f = Fixture::of(driver, "mntinfo");
    let logs = start_probe(&f, PROBE).await.unwrap();
    assert!(logs.contains("PROBED"), "{logs}");
    let root_line = logs
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no / in {logs}"));
    assert!(
        root_line.contains("lowerdir+=/,upperdir=/upper,"),
        "{root_line}"
    );
    let host = fs::canonicalize(f.tmp.path()).unwrap();
    assert!(!logs.contains(host.to_str().unwrap()), "{logs}");
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

#[tokio::test]
async fn native_mountinfo_hides_host_paths() {
    mountinfo_hides_host_paths(Driver::Native).await
}

#[tokio::test]
async fn runc_mountinfo_hides_host_paths() {
    mountinfo_hides_host_paths(Driver::Runc).await
}

/// Not a check: the median of each init step over many starts, to compare the cost of
/// the mount steps before and after a change. Run with
/// `cargo test -p berth-runtime --test escapes_mounts -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement"]
async fn mount_step_times() {
    let f = Fixture::of(Driver::Native, "mtiming");
    // Five layers, as a typical image has.
    let mut lowerdirs = vec![f.lower.clone()];
    for i in 0..4 {
        let dir = f.tmp.path().join(format!("layer{i}"));
        fs::create_dir_all(dir.join(format!("etc/l{i}"))).unwrap();
        lowerdirs.push(dir);
    }
    f.runtime
        .prepare(&f.layout, &f.spec(&["true"]))
        .await
        .unwrap();
    const RUNS: usize = 200;
    let mut samples: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for _ in 0..RUNS {
        let started = f.runtime.start(&f.layout, &lowerdirs).await.unwrap();
        for step in started.steps.iter() {
            samples.entry(step.step.clone()).or_default().push(step.us);
        }
        f.runtime.wait_exit(&f.layout, WAIT).await.unwrap();
        f.runtime.cleanup(&f.layout).await.unwrap();
    }
    let total: Vec<u64> = (0..RUNS)
        .map(|i| samples.values().map(|v| v[i]).sum())
        .collect();
    samples.insert("TOTAL".into(), total);
    for (step, mut us) in samples {
        us.sort_unstable();
        eprintln!(
            "{step:>22}: p50 {:>6} us  p90 {:>6} us",
            us[us.len() / 2],
            us[us.len() * 9 / 10]
        );
    }
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}
