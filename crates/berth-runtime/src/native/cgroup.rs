//! The Machine's cgroups, made and limited at create so start only joins them.
//!
//! Laid out like runc's cgroupfs driver with the relative `cgroupsPath` of the spec:
//! `<controller mount>/<this process's cgroup>/berth/<id>`, one directory per v1
//! controller, plus the unified (v2) hierarchy, which becomes the root of the Machine's
//! cgroup namespace.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// v1 controllers a Machine joins: the limited ones (memory, cpu, pids, devices) and
/// cpuacct for its CPU time. Each join is a cgroup migration that costs tens of µs on
/// the start path, so freezer and blkio, which Berth neither uses nor limits, are left out.
const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "devices"];
/// v1 controllers Machines made by earlier versions also joined.
const RETIRED: [&str; 2] = ["freezer", "blkio"];
const CPU_PERIOD_US: u64 = 100_000;
/// How often remove retries a cgroup that is still busy, 10 ms apart.
const REMOVE_TRIES: u32 = 100;
/// runc's default device rules: deny all, then these (and mknod of anything).
const ALLOWED_DEVICES: [&str; 10] = [
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

/// Where the Machines' cgroups go: one parent directory per hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoots {
    /// (controllers of the hierarchy, `…/berth` directory).
    parents: Vec<(String, PathBuf)>,
    /// The `…/berth` directories of the v1 hierarchies Machines no longer join (earlier
    /// versions joined freezer and blkio too): remove still cleans them.
    retired: Vec<PathBuf>,
}

impl CgroupRoots {
    /// From `/proc/self/cgroup`: beside this process's own cgroups, as runc does for a
    /// relative path. Needs the v1 memory, cpu and pids controllers (a hybrid or v1 host).
    pub fn discover() -> io::Result<CgroupRoots> {
        let text = fs::read_to_string("/proc/self/cgroup")?;
        let roots = CgroupRoots::from_proc(&text, Path::new(CGROUP_ROOT));
        for needed in ["memory", "cpu", "pids"] {
            if roots.dir_of(needed).is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the native runtime needs the cgroup v1 {needed} controller \
                         (a hybrid cgroup host); use --runtime runc"
                    ),
                ));
            }
        }
        Ok(roots)
    }

    fn from_proc(proc_cgroup: &str, root: &Path) -> CgroupRoots {
        let mut parents = Vec::new();
        let mut retired = Vec::new();
        for line in proc_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let path = path.trim_start_matches('/');
            if controllers.is_empty() {
                let unified = root.join("unified");
                if unified.join("cgroup.procs").exists() {
                    parents.push((String::new(), unified.join(path).join("berth")));
                }
            } else if controllers.split(',').any(|c| CONTROLLERS.contains(&c)) {
                let mount = root.join(controllers);
                if mount.exists() {
                    parents.push((controllers.to_owned(), mount.join(path).join("berth")));
                }
            } else if controllers.split(',').any(|c| RETIRED.contains(&c)) {
                let mount = root.join(controllers);
                if mount.exists() {
                    retired.push(mount.join(path).join("berth"));
                }
            }
        }
        CgroupRoots { parents, retired }
    }

    fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.parents
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == controller))
            .map(|(_, p)| p.as_path())
    }

    /// The Machine's cgroup directories.
    pub fn machine_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.parents.iter().map(|(_, p)| p.join(id)).collect()
    }

    /// The files start writes to join them.
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        self.machine_dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Makes the Machine's cgroups and writes its limits; again on update.
    pub fn prepare(&self, id: &str, resources: Option<&LinuxResources>) -> io::Result<()> {
        for dir in self.machine_dirs(id) {
            fs::create_dir_all(&dir).map_err(|e| annotate(e, "create", &dir))?;
        }
        let dir = |controller: &str| self.dir_of(controller).map(|p| p.join(id));
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
            for rule in ALLOWED_DEVICES {
                write(&devices.join("devices.allow"), rule)?;
            }
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
                    Err(e) => return Err(annotate(e, "remove", &dir)),
                }
            }
        }
        Ok(())
    }
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| annotate(e, &format!("write {value:?} to"), path))
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_machines_beside_own_cgroups() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["memory", "cpu", "pids", "unified", "cpuset"] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        fs::write(tmp.path().join("unified/cgroup.procs"), "").unwrap();
        let text = "8:pids:/\n4:memory:/agent/x\n3:cpuset:/\n1:cpu:/\n0::/\n";
        let roots = CgroupRoots::from_proc(text, tmp.path());
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
            roots.dir_of("memory"),
            Some(tmp.path().join("memory/agent/x/berth").as_path())
        );
    }

    #[test]
    fn remove_also_cleans_hierarchies_machines_no_longer_join() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["memory/berth/m1", "freezer/berth/m1", "blkio/berth/m2"] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let text = "9:freezer:/
8:blkio:/
4:memory:/
";
        let roots = CgroupRoots::from_proc(text, tmp.path());
        assert_eq!(
            roots.machine_dirs("m1"),
            [tmp.path().join("memory/berth/m1")]
        );
        roots.remove("m1").unwrap();
        assert!(!tmp.path().join("memory/berth/m1").exists());
        assert!(!tmp.path().join("freezer/berth/m1").exists());
        assert!(tmp.path().join("blkio/berth/m2").exists());
    }
}
