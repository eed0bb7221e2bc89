//! Escape suite: user namespaces. Root in a Machine must be an unprivileged host id of
//! that Machine's own, on both drivers. Real runc, overlayfs and namespaces; needs root.
//!
//! How these were shown to fail without the protection: on the commit before user
//! namespaces (34edac3), init's host uid was 0, the planted `/rootshell` was a setuid
//! binary owned by host root in the upperdir, and two Machines shared uid 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use berth_runtime::spec;
use berth_runtime::userns::{self, RANGE_SIZE};
use common::{Driver, Fixture};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// The host uid and gid (real ids) of a process.
fn host_ids(pid: u32) -> (u32, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

const PLANT: &str = "cp /bin/busybox /rootshell && chmod 4755 /rootshell && \
                     echo uid=$(id -u) && cat /proc/self/uid_map && echo planted && sleep 30";

/// The attack: root in the Machine plants a setuid-root shell on its disk, hoping the
/// host (or a later tenant of the same uid) runs it as root. With user namespaces the
/// file is owned by the Machine's unprivileged host id, and two Machines never share one.
async fn root_is_an_unprivileged_host_id_of_its_own(driver: Driver) {
    let f = Fixture::of(driver, "userns");
    let other = f.another_layout("userns2");
    f.runtime
        .prepare(&f.layout, &f.spec(&["sh", "-c", PLANT]))
        .await
        .unwrap();
    f.runtime
        .prepare(&other, &f.spec_for(&other, &["sh", "-c", PLANT]))
        .await
        .unwrap();
    let first = f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    let second = f.runtime.start(&other, &f.lowerdirs()).await.unwrap();
    let logs = f.wait_logs("planted", Duration::from_secs(10));
    f.wait_logs_of(&other, "planted", Duration::from_secs(10));
    assert!(logs.contains("uid=0"), "root inside: {logs}");

    let (uid, gid) = host_ids(first.pid);
    let (uid2, _) = host_ids(second.pid);
    assert!(uid >= userns::FIRST_BASE, "host uid of root inside: {uid}");
    assert_eq!(uid, gid);
    assert!(
        uid.abs_diff(uid2) >= RANGE_SIZE,
        "ranges overlap: {uid} and {uid2}"
    );
    // The map inside names exactly this range.
    assert!(
        logs.contains(&format!("0 {uid} {RANGE_SIZE}")) || {
            let normalized: Vec<&str> = logs.split_whitespace().collect();
            normalized
                .windows(3)
                .any(|w| w == ["0", &uid.to_string(), &RANGE_SIZE.to_string()])
        }
    );

    let planted = fs::metadata(f.layout.upper().join("rootshell")).unwrap();
    assert_eq!(
        planted.uid(),
        uid,
        "the planted shell is the Machine's, not host root's"
    );
    assert_ne!(planted.uid(), 0);
    assert_eq!(planted.permissions().mode() & 0o4000, 0o4000);

    for layout in [&f.layout, &other] {
        f.runtime.signal(layout, libc::SIGKILL).await.unwrap();
        f.runtime
            .wait_exit(layout, Some(Duration::from_secs(10)))
            .await
            .unwrap();
        f.runtime.cleanup(layout).await.unwrap();
        f.runtime.remove(layout).await.unwrap();
    }
    f.assert_no_leaks();
}

/// A Machine made before user namespaces: its upperdir holds ids as root inside made
/// them (host root), and its config.json has no map. Its first start moves it into ids of
/// its own, and it still sees its files as it left them.
async fn a_machine_from_before_user_namespaces_moves_into_its_own_ids(driver: Driver) {
    let f = Fixture::of(driver, "legacy");
    let script = "stat -c 'owner=%u:%g' /data/mine /data/app; \
                  test -u /data/suid && echo suid-kept; \
                  echo more > /data/mine && echo wrote";
    f.runtime
        .prepare(&f.layout, &f.spec(&["sh", "-c", script]))
        .await
        .unwrap();
    // Make it look like an old Machine: no map, no user namespace, unshifted files.
    let config = f.layout.config_json();
    let mut oci = Spec::load(&config).unwrap();
    let mut linux = oci.linux().clone().unwrap();
    let namespaces: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::User)
        .collect();
    linux
        .set_namespaces(Some(namespaces))
        .set_uid_mappings(None)
        .set_gid_mappings(None);
    oci.set_linux(Some(linux));
    oci.save(&config).unwrap();
    userns::remove_pin(&f.layout.userns()).unwrap();
    let upper = f.layout.upper();
    std::os::unix::fs::lchown(&upper, Some(0), Some(0)).unwrap();
    let data = upper.join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("mine"), "old\n").unwrap();
    fs::write(data.join("app"), "app\n").unwrap();
    std::os::unix::fs::lchown(data.join("app"), Some(1000), Some(1000)).unwrap();
    fs::write(data.join("suid"), "x").unwrap();
    fs::set_permissions(data.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();

    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    f.runtime
        .wait_exit(&f.layout, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    let logs = f.logs();
    assert!(logs.contains("owner=0:0"), "{logs}");
    assert!(logs.contains("owner=1000:1000"), "{logs}");
    assert!(logs.contains("suid-kept"), "{logs}");
    assert!(logs.contains("wrote"), "{logs}");

    let ids = spec::id_range(&Spec::load(&config).unwrap()).expect("config has a map");
    assert_eq!(fs::metadata(data.join("mine")).unwrap().uid(), ids.base);
    assert_eq!(
        fs::metadata(data.join("app")).unwrap().uid(),
        ids.base + 1000
    );
    let suid = fs::metadata(data.join("suid")).unwrap();
    assert_eq!(suid.uid(), ids.base);
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755);
    assert!(userns::is_pinned(&f.layout.userns()));

    f.runtime.cleanup(&f.layout).await.unwrap();
    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

both_drivers!(
    root_is_an_unprivileged_host_id_of_its_own,
    a_machine_from_before_user_namespaces_moves_into_its_own_ids,
);

/// Creates run at once in one process (the agent's), each forking a child to make its
/// namespaces. A child forked by one create inherits the others' pipes (and any lock
/// another thread holds), so a protocol that waits for an end of file deadlocks.
///
/// Seen failing: with the first version, which waited for EOF, every run here hung with
/// pairs of children each waiting for a pipe the other held (and so did the chaos and
/// cluster suites, with the registry's flock held by such a child).
#[test]
fn namespaces_made_at_once_in_one_process_do_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let threads = 8;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads));
    let (done, finished) = std::sync::mpsc::channel();
    for n in 0..threads {
        let (barrier, done) = (barrier.clone(), done.clone());
        let (user, net) = (
            dir.path().join(format!("user{n}")),
            dir.path().join(format!("net{n}")),
        );
        std::thread::spawn(move || {
            let range = userns::IdRange {
                base: userns::FIRST_BASE + (userns::SLOTS - 1 - n as u32) * RANGE_SIZE,
            };
            barrier.wait();
            let result = (0..5).try_for_each(|_| userns::create_pins(range, &user, &net));
            let _ = done.send((user, net, result.map_err(|e| e.to_string())));
        });
    }
    for _ in 0..threads {
        let (user, net, result) = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("every thread finished: no deadlock");
        result.unwrap();
        assert!(userns::is_pinned(&user) && userns::is_pinned(&net));
        userns::remove_pin(&user).unwrap();
        userns::remove_pin(&net).unwrap();
    }
}
