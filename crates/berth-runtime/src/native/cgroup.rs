//! The Machine's cgroups, made and limited at create so start only joins them.
//!
//! Laid out like runc's cgroupfs driver with the relative `cgroupsPath` of the spec:
//! `<hierarchy's mount>/<this process's cgroup>/berth/<id>`, one directory per v1
//! hierarchy it joins, plus one on the unified (v2) hierarchy, which becomes the root of
//! the Machine's cgroup namespace and which init is born into (see [`clone_into`]).
//!
//! Each limited controller (memory, cpu, pids) is used where the host has it: on its v1
//! hierarchy when one is mounted, else on the unified one when its root lists it (a
//! pure v2 host: `memory.max`, `cpu.max`, `pids.max`, and an eBPF device filter in place
//! of v1's `devices.allow`, see [`super::devices`]). On a hybrid host the unified
//! hierarchy usually has no controllers and only holds the Machines.

mod v2;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::devices;
use crate::host::cgroup::{agent_base, AGENT_LEAF};
pub(crate) use v2::{clone_into, clone_into_unsupported};

/// v1 controllers a Machine joins: the limited ones (memory, cpu, pids, devices) and
/// cpuacct for its CPU time. Each join is a cgroup migration that costs tens of µs on
/// the start path, so freezer and blkio, which Berth neither uses nor limits, are left out.
const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "devices"];
/// v1 controllers Machines made by earlier versions also joined.
const RETIRED: [&str; 2] = ["freezer", "blkio"];
/// The controllers a Machine's limits need, on one hierarchy or the other.
const LIMITED: [&str; 3] = ["memory", "cpu", "pids"];
const CPU_PERIOD_US: u64 = 100_000;
/// How often remove retries a cgroup that is still busy, 10 ms apart.
const REMOVE_TRIES: u32 = 100;

/// Where the Machines' cgroups go: one parent directory per hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoots {
    /// v1 hierarchies: (their controllers, `…/berth` directory).
    v1: Vec<(String, PathBuf)>,
    /// The unified hierarchy, when mounted.
    v2: Option<V2Root>,
    /// The `…/berth` directories of the v1 hierarchies Machines no longer join (earlier
    /// versions joined freezer and blkio too): remove still cleans them.
    retired: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct V2Root {
    mount: PathBuf,
    /// This process's cgroup there (the parent of [`AGENT_LEAF`] when it is in that).
    own: PathBuf,
    /// Limited controllers that no v1 hierarchy has and the v2 root lists.
    controllers: Vec<&'static str>,
    /// No v1 devices controller: the device rules are an eBPF filter here.
    device_filter: bool,
}

impl V2Root {
    fn berth(&self) -> PathBuf {
        self.own.join("berth")
    }
}

/// Freezes or thaws every process in the v2 cgroup `dir` with `cgroup.freeze` (a core
/// file of every v2 cgroup, no controller needed), and waits until `cgroup.events` says
/// it is done: only then is no process of it between two instructions of a write.
/// Blocking, up to a second.
pub(crate) fn freeze(dir: &Path, frozen: bool) -> io::Result<()> {
    fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    for _ in 0..1000 {
        let events = fs::read_to_string(dir.join("cgroup.events"))?;
        if events.lines().any(|line| line == want) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{} did not report {want:?} within a second", dir.display()),
    ))
}

/// A cgroup file system in `/proc/self/mountinfo`.
#[derive(Debug)]
struct CgroupMount {
    point: PathBuf,
    /// The cgroup the mount shows at its mount point ("/" but in a container).
    root: String,
    /// v1: the controllers (and `name=`) of its options; v2: none.
    controllers: Vec<String>,
    unified: bool,
}

fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, after) = line.split_once(" - ")?;
            let mut after = after.split_whitespace();
            let fstype = after.next()?;
            let options = after.nth(1).unwrap_or_default();
            let mut fields = fields.split_whitespace();
            let root = fields.nth(3)?;
            let point = fields.next()?;
            let unified = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                point: PathBuf::from(super::spawner::unescape_mountinfo(point)),
                root: root.to_owned(),
                controllers: if unified {
                    Vec::new()
                } else {
                    options.split(',').map(str::to_owned).collect()
                },
                unified,
            })
        })
        .collect()
}

/// `path` (from `/proc/self/cgroup`) below the mount's root, relative.
fn below_root(path: &str, root: &str) -> PathBuf {
    let path = path
        .strip_prefix(root.trim_end_matches('/'))
        .unwrap_or(path);
    PathBuf::from(path.trim_start_matches('/'))
}

impl CgroupRoots {
    /// Beside this process's own cgroups, as runc does for a relative path. Fails only
    /// when no hierarchy has one of memory, cpu and pids. On a v2 host it enables those
    /// controllers for Berth's cgroups, moving this process into [`AGENT_LEAF`] if needed.
    pub fn discover() -> io::Result<CgroupRoots> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let roots = CgroupRoots::from_host(&mountinfo, &own)?;
        roots.enable_v2_controllers(std::process::id())?;
        Ok(roots)
    }

    /// From the texts of `/proc/self/mountinfo` and `/proc/self/cgroup`, and the v2 root's
    /// `cgroup.controllers`. Changes nothing.
    fn from_host(mountinfo: &str, proc_cgroup: &str) -> io::Result<CgroupRoots> {
        let mounts = cgroup_mounts(mountinfo);
        let mut v1 = Vec::new();
        let mut retired = Vec::new();
        let mut v2 = None;
        for line in proc_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if controllers.is_empty() {
                if let Some(mount) = mounts.iter().find(|m| m.unified) {
                    let own = mount.point.join(below_root(agent_base(path), &mount.root));
                    v2 = Some(V2Root {
                        mount: mount.point.clone(),
                        own,
                        controllers: Vec::new(),
                        device_filter: false,
                    });
                }
                continue;
            }
            let names: Vec<&str> = controllers.split(',').collect();
            let Some(mount) = mounts
                .iter()
                .find(|m| !m.unified && names.iter().all(|n| m.controllers.iter().any(|c| c == n)))
            else {
                continue;
            };
            let dir = mount
                .point
                .join(below_root(path, &mount.root))
                .join("berth");
            if names.iter().any(|c| CONTROLLERS.contains(c)) {
                v1.push((controllers.to_owned(), dir));
            } else if names.iter().any(|c| RETIRED.contains(c)) {
                retired.push(dir);
            }
        }
        let mut roots = CgroupRoots { v1, v2, retired };
        let in_v2_root = match &roots.v2 {
            Some(v2) => v2::listed(&v2.mount, "cgroup.controllers")?,
            None => Vec::new(),
        };
        let mut on_v2 = Vec::new();
        for needed in LIMITED {
            if roots.v1_dir_of(needed).is_some() {
                continue;
            }
            if roots.v2.is_none() || !in_v2_root.iter().any(|c| c == needed) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the native runtime needs the cgroup {needed} controller, and this                          host has it on no cgroup hierarchy (neither a v1 mount nor the                          v2 root's cgroup.controllers); use --runtime runc"
                    ),
                ));
            }
            on_v2.push(needed);
        }
        let v1_devices = roots.v1_dir_of("devices").is_some();
        if let Some(v2) = roots.v2.as_mut() {
            v2.controllers = on_v2;
            v2.device_filter = !v1_devices;
        }
        Ok(roots)
    }

    /// On a v2 host, the subtree_control dance: see [`v2::enable_controllers`].
    fn enable_v2_controllers(&self, pid: u32) -> io::Result<()> {
        match &self.v2 {
            Some(v2) if !v2.controllers.is_empty() => {
                v2::enable_controllers(&v2.mount, &v2.own, &v2.controllers, pid).map(drop)
            }
            _ => Ok(()),
        }
    }

    fn v1_dir_of(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == controller))
            .map(|(_, p)| p.as_path())
    }

    /// The Machine's cgroup directories: the v1 ones, then the v2 one.
    pub fn machine_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.v1
            .iter()
            .map(|(_, p)| p.join(id))
            .chain(self.v2_dir(id))
            .collect()
    }

    /// The Machine's cgroup on the unified hierarchy: init is born into it.
    pub fn v2_dir(&self, id: &str) -> Option<PathBuf> {
        self.v2.as_ref().map(|v2| v2.berth().join(id))
    }

    /// The `cgroup.procs` files init writes to join its v1 cgroups.
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        self.v1
            .iter()
            .map(|(_, p)| p.join(id).join("cgroup.procs"))
            .collect()
    }

    /// Makes the Machine's cgroups and writes its limits; again on update.
    pub fn prepare(&self, id: &str, resources: Option<&LinuxResources>) -> io::Result<()> {
        self.prepare_files(id, resources)?;
        if let (Some(v2), Some(dir)) = (&self.v2, self.v2_dir(id)) {
            if v2.device_filter {
                devices::attach(&dir, &devices::default_rules()?)
                    .map_err(|e| annotate(e, "device filter of", &dir))?;
            }
        }
        Ok(())
    }

    /// [`CgroupRoots::prepare`] but the device filter: the directories and limit files.
    fn prepare_files(&self, id: &str, resources: Option<&LinuxResources>) -> io::Result<()> {
        for dir in self.machine_dirs(id) {
            fs::create_dir_all(&dir).map_err(|e| annotate(e, "create", &dir))?;
        }
        let dir = |controller: &str| self.v1_dir_of(controller).map(|p| p.join(id));
        let memory = resources.and_then(|r| r.memory().as_ref());
        if let Some(mem) = dir("memory") {
            let limit = memory.and_then(|m| m.limit()).unwrap_or(-1);
            let swap = memory.and_then(|m| m.swap()).unwrap_or(-1);
            let memsw = mem.join("memory.memsw.limit_in_bytes");
            let limit_file = mem.join("memory.limit_in_bytes");
            // memsw must stay >= the limit: raise memsw first when the limit grows.
            if write(&limit_file, &limit.to_string()).is_err() && memsw.exists() {
                write(&memsw, &swap.to_string())?;
                write(&limit_file, &limit.to_string())?;
            } else if memsw.exists() {
                write(&memsw, &swap.to_string())?;
            }
        }
        if let Some(cpu) = dir("cpu") {
            let cpu_limits = resources.and_then(|r| r.cpu().as_ref());
            let period = cpu_limits.and_then(|c| c.period()).unwrap_or(CPU_PERIOD_US);
            let quota = cpu_limits.and_then(|c| c.quota()).unwrap_or(-1);
            write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        if let Some(pids) = dir("pids") {
            let limit = resources
                .and_then(|r| r.pids().as_ref())
                .map(|p| p.limit())
                .filter(|l| *l > 0)
                .map_or_else(|| "max".to_owned(), |l| l.to_string());
            write(&pids.join("pids.max"), &limit)?;
        }
        if let Some(devices) = dir("devices") {
            write(&devices.join("devices.deny"), "a")?;
            for rule in devices::DEFAULT_ALLOWED {
                write(&devices.join("devices.allow"), rule)?;
            }
        }
        if let (Some(v2), Some(dir)) = (&self.v2, self.v2_dir(id)) {
            v2::write_limits(&dir, &v2.controllers, resources)?;
        }
        Ok(())
    }

    /// Removes the Machine's cgroups; they must hold no process. Missing is success.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let retired = self.retired.iter().map(|parent| parent.join(id));
        for dir in self.machine_dirs(id).into_iter().chain(retired) {
            let mut tries = 0;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // The last processes of a killed Machine may still be leaving.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < REMOVE_TRIES => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    // This copy's run has ended, so processes still inside belong to the
                    // Machine's other copy on this host (a move between two workers of one
                    // host shares the path): the cgroup is that copy's now.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && has_processes(&dir) => {
                        break;
                    }
                    Err(e) => return Err(annotate(e, "remove", &dir)),
                }
            }
        }
        Ok(())
    }
}

/// Whether the cgroup holds a process.
fn has_processes(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| !procs.trim().is_empty())
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| annotate(e, &format!("write {value:?} to"), path))
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// This process's cgroup on the unified hierarchy of this host, for tests that make real
/// v2 cgroups.
#[cfg(test)]
pub(crate) fn own_v2_dir_for_tests() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let mount = cgroup_mounts(&mountinfo).into_iter().find(|m| m.unified)?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.point.join(below_root(path, &mount.root)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    };

    /// A mountinfo text with the cgroup file systems mounted below `root`, as a hybrid
    /// host mounts them below /sys/fs/cgroup (one line per `(dir, type, options)`).
    fn mountinfo(root: &Path, mounts: &[(&str, &str, &str)]) -> String {
        let mut text = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n".to_owned();
        for (n, (dir, fstype, options)) in mounts.iter().enumerate() {
            text += &format!(
                "{} 31 0:{} / {} rw,nosuid,nodev,noexec,relatime shared:{n} - {fstype} {fstype} {options}\n",
                40 + n,
                30 + n,
                root.join(dir).display(),
            );
        }
        text
    }

    fn hybrid(root: &Path) -> String {
        mountinfo(
            root,
            &[
                ("cpu", "cgroup", "rw,cpu"),
                ("cpuset", "cgroup", "rw,cpuset"),
                ("memory", "cgroup", "rw,memory"),
                ("pids", "cgroup", "rw,pids"),
                ("freezer", "cgroup", "rw,freezer"),
                ("blkio", "cgroup", "rw,blkio"),
                ("unified", "cgroup2", "rw"),
            ],
        )
    }

    #[test]
    fn places_machines_beside_own_cgroups() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["memory", "cpu", "pids", "unified", "cpuset"] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        fs::write(tmp.path().join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        let text = "8:pids:/\n4:memory:/agent/x\n3:cpuset:/\n1:cpu:/\n0::/\n";
        let roots = CgroupRoots::from_host(&hybrid(tmp.path()), text).unwrap();
        assert_eq!(
            roots.machine_dirs("m1"),
            [
                tmp.path().join("pids/berth/m1"),
                tmp.path().join("memory/agent/x/berth/m1"),
                tmp.path().join("cpu/berth/m1"),
                tmp.path().join("unified/berth/m1"),
            ]
        );
        assert_eq!(
            roots.v1_dir_of("memory"),
            Some(tmp.path().join("memory/agent/x/berth").as_path())
        );
        // Every limit is on v1: init joins those, and is born into the unified one.
        assert_eq!(roots.procs_files("m1").len(), 3);
        assert_eq!(
            roots.v2_dir("m1"),
            Some(tmp.path().join("unified/berth/m1"))
        );
        let v2 = roots.v2.as_ref().unwrap();
        assert!(v2.controllers.is_empty() && v2.device_filter);
    }

    #[test]
    fn remove_also_cleans_hierarchies_machines_no_longer_join() {
        let tmp = tempfile::tempdir().unwrap();
        for d in [
            "memory/berth/m1",
            "freezer/berth/m1",
            "blkio/berth/m2",
            "cpu",
            "pids",
        ] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let text = "9:freezer:/
8:blkio:/
4:memory:/
1:cpu:/
8:pids:/
";
        let roots = CgroupRoots::from_host(&hybrid(tmp.path()), text).unwrap();
        assert_eq!(
            roots.machine_dirs("m1"),
            [
                tmp.path().join("memory/berth/m1"),
                tmp.path().join("cpu/berth/m1"),
                tmp.path().join("pids/berth/m1"),
            ]
        );
        roots.remove("m1").unwrap();
        assert!(!tmp.path().join("memory/berth/m1").exists());
        assert!(!tmp.path().join("freezer/berth/m1").exists());
        assert!(tmp.path().join("blkio/berth/m2").exists());
    }

    /// A pure v2 host as systemd lays it out: the agent in its service's cgroup, which
    /// holds it; the root lists the controllers and enables some for its children.
    fn pure_v2(root: &Path, own_procs: &str) -> (String, PathBuf) {
        let service = root.join("system.slice/berth.service");
        // The kernel fills a new cgroup with its files; a fake needs them made first.
        fs::create_dir_all(service.join("berth")).unwrap();
        fs::write(service.join("berth/cgroup.subtree_control"), "").unwrap();
        let all = "cpuset cpu io memory hugetlb pids rdma misc\n";
        for (dir, controllers, subtree) in [
            (root.to_path_buf(), all, "cpu memory pids\n"),
            (
                root.join("system.slice"),
                "cpu memory pids\n",
                "memory pids\n",
            ),
            (service.clone(), "memory pids\n", "\n"),
        ] {
            fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
            fs::write(dir.join("cgroup.subtree_control"), subtree).unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
        }
        for dir in [root.join("system.slice"), service.clone()] {
            fs::write(dir.join("cgroup.type"), "domain\n").unwrap();
        }
        fs::write(service.join("cgroup.procs"), own_procs).unwrap();
        let text = format!(
            "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
             30 22 0:26 / {} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 \
             rw,nsdelegate,memory_recursiveprot\n",
            root.display()
        );
        (text, service)
    }

    fn read(path: PathBuf) -> String {
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn on_a_pure_v2_host_every_limit_is_on_the_unified_hierarchy() {
        let tmp = tempfile::tempdir().unwrap();
        let (text, service) = pure_v2(tmp.path(), "812\n");
        let roots = CgroupRoots::from_host(&text, "0::/system.slice/berth.service\n").unwrap();
        assert_eq!(roots.machine_dirs("m1"), [service.join("berth/m1")]);
        assert!(roots.procs_files("m1").is_empty(), "init joins nothing");
        assert_eq!(roots.v2_dir("m1"), Some(service.join("berth/m1")));
        let v2 = roots.v2.as_ref().unwrap();
        assert_eq!(v2.controllers, ["memory", "cpu", "pids"]);
        assert!(v2.device_filter);
        // Found again from inside the leaf it moves into.
        let again = CgroupRoots::from_host(
            &text,
            &format!("0::/system.slice/berth.service/{AGENT_LEAF}\n"),
        )
        .unwrap();
        assert_eq!(again, roots);
    }

    #[test]
    fn the_subtree_control_dance_moves_the_agent_into_a_leaf() {
        let tmp = tempfile::tempdir().unwrap();
        let (text, service) = pure_v2(tmp.path(), "812\n813\n");
        let roots = CgroupRoots::from_host(&text, "0::/system.slice/berth.service\n").unwrap();
        // A fake cgroupfs: a written file holds what was written last.
        roots.enable_v2_controllers(812).unwrap();
        assert_eq!(read(service.join(AGENT_LEAF).join("cgroup.procs")), "812");
        // The root already had all three; system.slice lacked cpu; the service and
        // Berth's own cgroup had none.
        assert_eq!(
            read(tmp.path().join("cgroup.subtree_control")),
            "cpu memory pids\n"
        );
        assert_eq!(
            read(tmp.path().join("system.slice/cgroup.subtree_control")),
            "+cpu"
        );
        assert_eq!(
            read(service.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        assert_eq!(
            read(service.join("berth/cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
    }

    #[test]
    fn no_move_when_the_controllers_are_enabled_or_the_cgroup_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let (text, service) = pure_v2(tmp.path(), "");
        let roots = CgroupRoots::from_host(&text, "0::/system.slice/berth.service\n").unwrap();
        roots.enable_v2_controllers(812).unwrap();
        assert!(!service.join(AGENT_LEAF).exists());
        assert_eq!(
            read(service.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        // Enabled already (a second agent start): nothing is written, nobody moves.
        fs::write(service.join("cgroup.procs"), "900\n").unwrap();
        for dir in [service.clone(), service.join("berth")] {
            fs::write(dir.join("cgroup.subtree_control"), "memory cpu pids\n").unwrap();
        }
        fs::write(
            tmp.path().join("system.slice/cgroup.subtree_control"),
            "cpu memory pids\n",
        )
        .unwrap();
        roots.enable_v2_controllers(900).unwrap();
        assert!(!service.join(AGENT_LEAF).exists());
        assert_eq!(
            read(service.join("cgroup.subtree_control")),
            "memory cpu pids\n"
        );
    }

    fn resources(memory: i64, swap: i64, quota: i64, pids: i64) -> LinuxResources {
        LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(memory)
                    .swap(swap)
                    .build()
                    .unwrap(),
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(quota)
                    .period(100_000u64)
                    .build()
                    .unwrap(),
            )
            .pids(LinuxPidsBuilder::default().limit(pids).build().unwrap())
            .build()
            .unwrap()
    }

    #[test]
    fn writes_v2_limit_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (text, service) = pure_v2(tmp.path(), "");
        let roots = CgroupRoots::from_host(&text, "0::/system.slice/berth.service\n").unwrap();
        let dir = service.join("berth/m1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("memory.swap.max"), "max\n").unwrap();
        let mib = 1 << 20;
        let limits = resources(64 * mib, 64 * mib, 50_000, 50);
        roots.prepare_files("m1", Some(&limits)).unwrap();
        assert_eq!(read(dir.join("memory.max")), (64 * mib).to_string());
        assert_eq!(read(dir.join("memory.swap.max")), "0");
        assert_eq!(read(dir.join("cpu.max")), "50000 100000");
        assert_eq!(read(dir.join("pids.max")), "50");
        // Update: 32 MiB of swap on top; no CPU cap, no pids limit.
        roots
            .prepare_files("m1", Some(&resources(64 * mib, 96 * mib, -1, 0)))
            .unwrap();
        assert_eq!(read(dir.join("memory.swap.max")), (32 * mib).to_string());
        assert_eq!(read(dir.join("cpu.max")), "max 100000");
        assert_eq!(read(dir.join("pids.max")), "max");
        // No limits at all.
        roots.prepare_files("m1", None).unwrap();
        assert_eq!(read(dir.join("memory.max")), "max");
        assert_eq!(read(dir.join("memory.swap.max")), "max");
        // Less memory+swap than memory is a spec error, not a silent cap.
        assert!(v2::limit_values(&["memory"], Some(&resources(64, 32, 1, 1))).is_err());
        // Without swap accounting there is no memory.swap.max to write.
        fs::remove_file(dir.join("memory.swap.max")).unwrap();
        roots.prepare_files("m1", Some(&limits)).unwrap();
        assert!(!dir.join("memory.swap.max").exists());
    }

    #[test]
    fn on_a_mixed_host_each_controller_is_where_it_is_mounted() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["memory", "cpu,cpuacct", "unified"] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        // No v1 pids and no v1 devices: the root of the unified hierarchy has pids.
        fs::write(
            tmp.path().join("unified/cgroup.controllers"),
            "pids hugetlb\n",
        )
        .unwrap();
        let text = mountinfo(
            tmp.path(),
            &[
                ("cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
                ("memory", "cgroup", "rw,memory"),
                ("unified", "cgroup2", "rw"),
            ],
        );
        let roots = CgroupRoots::from_host(&text, "4:memory:/\n2:cpu,cpuacct:/a\n0::/a\n").unwrap();
        assert_eq!(
            roots.machine_dirs("m1"),
            [
                tmp.path().join("memory/berth/m1"),
                tmp.path().join("cpu,cpuacct/a/berth/m1"),
                tmp.path().join("unified/a/berth/m1"),
            ]
        );
        let v2 = roots.v2.as_ref().unwrap();
        assert_eq!(v2.controllers, ["pids"]);
        assert!(v2.device_filter);
        let limits = v2::limit_values(&v2.controllers, Some(&resources(1, 1, 1, 7))).unwrap();
        assert_eq!(limits, [("pids.max", "7".to_owned())]);
    }

    #[test]
    fn refuses_a_host_without_a_needed_controller_and_names_it() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["memory", "cpu", "unified"] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        fs::write(tmp.path().join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        let text = mountinfo(
            tmp.path(),
            &[
                ("cpu", "cgroup", "rw,cpu"),
                ("memory", "cgroup", "rw,memory"),
                ("unified", "cgroup2", "rw"),
            ],
        );
        let e = CgroupRoots::from_host(&text, "4:memory:/\n1:cpu:/\n0::/\n").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("cgroup pids controller"), "{e}");
    }

    #[test]
    fn the_agent_leaf_stands_for_its_parent() {
        assert_eq!(
            agent_base("/system.slice/berth.service/berth-agent"),
            "/system.slice/berth.service"
        );
        assert_eq!(agent_base("/berth-agent"), "/");
        assert_eq!(
            agent_base("/system.slice/x-berth-agent"),
            "/system.slice/x-berth-agent"
        );
        assert_eq!(agent_base("/"), "/");
    }

    #[test]
    fn mounts_of_a_container_show_a_cgroup_below_their_root() {
        let text = "40 31 0:30 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                    41 31 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                    42 22 0:4 / /proc rw - proc proc rw\n";
        let mounts = cgroup_mounts(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].controllers, ["rw", "memory"]);
        assert!(!mounts[0].unified && mounts[1].unified);
        assert_eq!(below_root("/docker/abc/x", &mounts[0].root), Path::new("x"));
        assert_eq!(below_root("/", &mounts[1].root), Path::new(""));
    }
}
