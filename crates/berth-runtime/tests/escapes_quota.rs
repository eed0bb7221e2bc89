//! Attack: fill the worker's disk from inside a Machine (issue 13, finding 4: `dd` wrote
//! 3 GiB where placement had counted 1 GiB). Each Machine's writable layer is a btrfs
//! subvolume with a qgroup limit, so the filesystem stops the writer at its quota.
//!
//! Each test makes its own btrfs filesystem on a loop device with quotas enabled, runs
//! Machines on it with real drivers, and unmounts it (the loop device goes with it).
//!
//! Proof that the test can fail: the control Machine below runs on the same filesystem
//! through a runtime without `disk_quota`, and its 200 MiB `dd` succeeds. With the quota
//! step disabled in `prepare` (`prepare_disk_quota` returning early, the layout assert
//! skipped), the quota'd Machine's `dd` wrote all 200 MiB too ("200+0 records out",
//! `dd-exit=0`) and the test failed on "dd was not stopped by the quota".

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use berth_runtime::native::NativeRuntime;
use berth_runtime::quota::{self, DiskQuota, QuotaMode, QuotaSupport};
use berth_runtime::runc::{RuncConfig, RuncRuntime};
use berth_runtime::{overlay, BundleSpec, MachineLayout, Runtime};
use common::Driver;

const WAIT: Option<Duration> = Some(Duration::from_secs(60));
const MIB: u64 = 1 << 20;

/// A btrfs filesystem on a loop device, quotas on, mounted below a temp dir.
struct QuotaFs {
    tmp: tempfile::TempDir,
    mnt: PathBuf,
    machines: Vec<MachineLayout>,
    runtimes: Vec<Arc<dyn Runtime>>,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl QuotaFs {
    fn new() -> QuotaFs {
        let tmp = tempfile::Builder::new()
            .prefix("berth-quota-")
            .tempdir()
            .unwrap();
        let img = tmp.path().join("disk.img");
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        // Sparse: it takes only what is written.
        fs::File::create(&img).unwrap().set_len(512 * MIB).unwrap();
        // mkfs.btrfs comes from btrfs-progs (scripts/install-deps.sh).
        run(Command::new("mkfs.btrfs").arg("-q").arg(&img));
        // `-o loop` attaches the device with autoclear: it goes at unmount.
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        let fs = QuotaFs {
            tmp,
            mnt,
            machines: Vec::new(),
            runtimes: Vec::new(),
        };
        run(Command::new("btrfs").args(["quota", "enable"]).arg(&fs.mnt));
        fs::create_dir_all(fs.machines_root()).unwrap();
        common::build_lowerdir(&fs.lower());
        fs
    }

    fn machines_root(&self) -> PathBuf {
        self.mnt.join("machines")
    }

    fn lower(&self) -> PathBuf {
        self.mnt.join("lower")
    }

    fn runtime(&mut self, driver: Driver, quota: Option<DiskQuota>) -> Arc<dyn Runtime> {
        let mut config: RuncConfig = common::runtime_config(&self.tmp.path().join("runc"));
        config.host.disk_quota = quota;
        let runtime: Arc<dyn Runtime> = match driver {
            Driver::Runc => Arc::new(RuncRuntime::new(config)),
            Driver::Native => {
                let mut native = common::native_config(&config);
                native.host.disk_quota = config.host.disk_quota.clone();
                Arc::new(NativeRuntime::new(native).unwrap())
            }
            Driver::Gvisor => {
                let mut gvisor = common::gvisor_config(&config);
                gvisor.host.disk_quota = config.host.disk_quota.clone();
                Arc::new(berth_runtime::gvisor::GvisorRuntime::new(gvisor).unwrap())
            }
        };
        self.runtimes.push(runtime.clone());
        runtime
    }

    fn layout(&mut self, name: &str) -> MachineLayout {
        let layout = MachineLayout::new(&self.machines_root(), &common::unique_id(name));
        self.machines.push(layout.clone());
        layout
    }
}

impl Drop for QuotaFs {
    fn drop(&mut self) {
        // Whatever a failed test left running, removed by the drivers themselves (on a
        // thread of its own: this may run inside the test's tokio runtime).
        let machines = self.machines.clone();
        let runtimes = self.runtimes.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            for layout in &machines {
                for runtime in &runtimes {
                    let _ = rt.block_on(runtime.remove(layout));
                }
            }
        })
        .join();
        for m in common::mounts_under(self.tmp.path()).iter().rev() {
            let _ = overlay::unmount(Path::new(m));
        }
    }
}

fn spec(layout: &MachineLayout, disk_mb: Option<u64>, script: &str) -> BundleSpec {
    BundleSpec {
        machine_id: layout.id.clone(),
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        cpus: 1,
        memory_mb: 128,
        pids_limit: 50,
        disk_mb,
        private_ip: None,
        org: None,
        net_raw: false,
        volumes: Vec::new(),
    }
}

/// Writes `mib` MiB to /big and says how dd ended.
fn dd_script(mib: u64) -> String {
    format!("dd if=/dev/zero of=/big bs=1M count={mib} 2>&1; echo dd-exit=$?; sync")
}

async fn run_to_exit(runtime: &dyn Runtime, layout: &MachineLayout, lower: &Path) -> String {
    runtime.start(layout, &[lower.to_path_buf()]).await.unwrap();
    runtime.wait_exit(layout, WAIT).await.unwrap().unwrap();
    runtime.cleanup(layout).await.unwrap();
    String::from_utf8_lossy(&berth_runtime::logs::read_logs(layout, 1 << 20).unwrap()).into_owned()
}

fn size_of(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

async fn dd_past_the_quota(driver: Driver) {
    let mut qfs = QuotaFs::new();
    let support = QuotaSupport::detect(&qfs.machines_root(), QuotaMode::Require).unwrap();
    let quota = support.enforced().cloned().expect("quotas enforced");
    let limited = qfs.runtime(driver, Some(quota));
    let unlimited = qfs.runtime(driver, None);
    let lower = qfs.lower();

    // The control: no quota, so the same dd writes all 200 MiB on this filesystem.
    let open = qfs.layout("open");
    let t0 = std::time::Instant::now();
    unlimited
        .prepare(&open, &spec(&open, Some(64), &dd_script(200)))
        .await
        .unwrap();
    eprintln!("prepare without a disk quota: {:?}", t0.elapsed());
    let logs = run_to_exit(&*unlimited, &open, &lower).await;
    assert!(logs.contains("dd-exit=0"), "control dd failed: {logs}");
    assert_eq!(size_of(&open.upper().join("big")), 200 * MIB);
    unlimited.remove(&open).await.unwrap();

    // The attack: 200 MiB into a 64 MiB disk.
    let victim = qfs.layout("filler");
    let t0 = std::time::Instant::now();
    limited
        .prepare(&victim, &spec(&victim, Some(64), &dd_script(200)))
        .await
        .unwrap();
    eprintln!("prepare with a disk quota: {:?}", t0.elapsed());
    assert!(quota::has_quota_layout(&victim));
    let logs = run_to_exit(&*limited, &victim, &lower).await;
    assert!(
        logs.contains("Disk quota exceeded") && logs.contains("dd-exit=1"),
        "dd was not stopped by the quota: {logs}"
    );
    let written = size_of(&victim.upper().join("big"));
    assert!(
        (32 * MIB..=64 * MIB).contains(&written),
        "wrote {written} bytes"
    );
    // The filesystem itself had room: the quota stopped dd, not a full disk.
    let stat = nix::sys::statvfs::statvfs(&qfs.mnt).unwrap();
    let free = stat.blocks_available() * stat.fragment_size();
    assert!(free > 200 * MIB, "only {free} bytes free on the test fs");
    let usage = limited.disk_usage(&victim).await.unwrap().expect("a quota");
    assert_eq!(usage.limit_bytes, 64 * MIB);
    assert!(usage.is_full(), "{usage:?}");

    // A neighbour on the same filesystem is unaffected.
    let neighbour = qfs.layout("neighbour");
    limited
        .prepare(&neighbour, &spec(&neighbour, Some(256), &dd_script(100)))
        .await
        .unwrap();
    let logs = run_to_exit(&*limited, &neighbour, &lower).await;
    assert!(logs.contains("dd-exit=0"), "neighbour's dd failed: {logs}");
    assert_eq!(size_of(&neighbour.upper().join("big")), 100 * MIB);
    let usage = limited.disk_usage(&neighbour).await.unwrap().unwrap();
    assert!(!usage.is_full(), "{usage:?}");

    // Update with a bigger disk: prepare again raises the limit, keeping the files, and
    // the Machine can write more.
    limited
        .prepare(
            &victim,
            &spec(
                &victim,
                Some(160),
                "dd if=/dev/zero of=/more bs=1M count=64 2>&1; echo dd-exit=$?; sync",
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        limited
            .disk_usage(&victim)
            .await
            .unwrap()
            .unwrap()
            .limit_bytes,
        160 * MIB
    );
    let logs = run_to_exit(&*limited, &victim, &lower).await;
    assert!(logs.contains("dd-exit=0"), "dd after update failed: {logs}");
    assert_eq!(size_of(&victim.upper().join("big")), written);

    // Destroy removes the subvolume and its limit.
    for layout in [&victim, &neighbour] {
        limited.remove(layout).await.unwrap();
        assert!(!layout.dir.exists());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn native_machine_cannot_write_past_its_disk_quota() {
    dd_past_the_quota(Driver::Native).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runc_machine_cannot_write_past_its_disk_quota() {
    dd_past_the_quota(Driver::Runc).await;
}

/// Where the data dir cannot enforce quotas (the suite's temp dirs: ext4 without project
/// quotas), `require` refuses and `auto` says why it does not enforce.
#[test]
fn unsupported_filesystem_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    if DiskQuota::probe(tmp.path()).is_ok() {
        return;
    }
    let refused = QuotaSupport::detect(tmp.path(), QuotaMode::Require).unwrap_err();
    assert!(refused.contains("cannot enforce disk quotas"), "{refused}");
    match QuotaSupport::detect(tmp.path(), QuotaMode::Auto).unwrap() {
        QuotaSupport::NotEnforced(why) => assert!(why.contains("btrfs"), "{why}"),
        QuotaSupport::Enforced(_) => panic!("enforced on {}", tmp.path().display()),
    }
}
