//! What the host holds that looks like a worker's Machines, for `berth doctor`: the
//! knowledge of where each driver leaves things (directories, mounts, veths, cgroups,
//! runc's containers) lives here and in the drivers, not in the doctor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::blocking;
use crate::error::RuntimeError;
use crate::network::HOST_LINK_PREFIX;
use crate::overlay;

/// Host objects by Machine id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInventory {
    /// Directories under `machines/`.
    pub dirs: BTreeSet<String>,
    /// Mount points under `machines/<id>/` (the rootfs overlay, the namespace pins).
    pub mounts: BTreeMap<String, Vec<PathBuf>>,
    /// Containers in the driver's container state (runc's state dir); none for drivers
    /// that keep no such state.
    pub containers: BTreeSet<String>,
    /// Host veth link names, by the Machine id in their alias.
    pub veths: BTreeMap<String, String>,
    /// The Machine's cgroup directories (one per hierarchy).
    pub cgroups: BTreeMap<String, Vec<PathBuf>>,
}

impl HostInventory {
    /// Every id that has anything on the host.
    pub fn ids(&self) -> BTreeSet<String> {
        let mut ids = self.dirs.clone();
        ids.extend(self.mounts.keys().cloned());
        ids.extend(self.containers.iter().cloned());
        ids.extend(self.veths.keys().cloned());
        ids.extend(self.cgroups.keys().cloned());
        ids
    }

    /// Lists the host off the async threads; see [`HostInventory::scan`].
    pub(crate) async fn list(
        machines_root: &Path,
        known: &BTreeSet<String>,
        container_state: Option<&Path>,
    ) -> Result<HostInventory, RuntimeError> {
        let (root, known) = (machines_root.to_owned(), known.clone());
        let state = container_state.map(Path::to_owned);
        blocking(move || Ok(HostInventory::scan(&root, &known, state.as_deref()))).await
    }

    /// Lists the host. `known` are ids the worker has held (records and journal): veths
    /// and cgroups are host-wide, and only those of known ids are the worker's.
    /// `container_state` is the driver's own state dir, a directory per container
    /// (runc's root). Blocking.
    pub(crate) fn scan(
        machines_root: &Path,
        known: &BTreeSet<String>,
        container_state: Option<&Path>,
    ) -> HostInventory {
        let mut host = HostInventory {
            dirs: dir_names(machines_root),
            containers: container_state.map(dir_names).unwrap_or_default(),
            ..HostInventory::default()
        };
        // mountinfo shows canonical paths.
        let canonical =
            std::fs::canonicalize(machines_root).unwrap_or_else(|_| machines_root.to_owned());
        let root = format!("{}/", canonical.display());
        if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
            for mount_point in overlay::mount_points(&mountinfo) {
                let Some(rest) = mount_point.strip_prefix(&root) else {
                    continue;
                };
                let mut parts = rest.splitn(2, '/');
                let id = parts.next().unwrap_or_default().to_owned();
                let within = parts.next().unwrap_or_default();
                host.mounts
                    .entry(id.clone())
                    .or_default()
                    .push(machines_root.join(&id).join(within));
            }
        }
        let mut known = known.clone();
        known.extend(host.dirs.iter().cloned());
        known.extend(host.containers.iter().cloned());
        known.extend(host.mounts.keys().cloned());
        for link in dir_names(Path::new("/sys/class/net")) {
            if !link.starts_with(HOST_LINK_PREFIX) {
                continue;
            }
            let alias = std::fs::read_to_string(format!("/sys/class/net/{link}/ifalias"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            if known.contains(&alias) {
                host.veths.insert(alias, link);
            }
        }
        let bases = cgroup_bases();
        for id in &known {
            let dirs: Vec<PathBuf> = bases
                .iter()
                .map(|base| base.join("berth").join(id))
                .filter(|dir| dir.is_dir())
                .collect();
            if !dirs.is_empty() {
                host.cgroups.insert(id.clone(), dirs);
            }
        }
        host
    }
}

/// The names of the directories in `dir`; none when it cannot be read.
fn dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup directory of this process in every hierarchy: both drivers put a
/// Machine's cgroup (`berth/<id>`) below the cgroup of the process that starts it.
fn cgroup_bases() -> Vec<PathBuf> {
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    let sys = Path::new("/sys/fs/cgroup");
    let mut bases = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next(), fields.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let mount = if controllers.is_empty() {
            // cgroup v2: on its own at /sys/fs/cgroup, or at .../unified in hybrid mode.
            if sys.join("unified").is_dir() {
                sys.join("unified")
            } else {
                sys.to_owned()
            }
        } else {
            let name = controllers.trim_start_matches("name=");
            let joined = sys.join(name);
            if joined.is_dir() {
                joined
            } else {
                sys.join(name.split(',').next().unwrap_or(name))
            }
        };
        // On a v2 host the native driver may have moved the agent into a leaf.
        let path = if controllers.is_empty() {
            super::cgroup::agent_base(path)
        } else {
            path
        };
        let base = mount.join(path.trim_start_matches('/'));
        if !bases.contains(&base) {
            bases.push(base);
        }
    }
    bases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_bases_are_below_sys_fs_cgroup() {
        for base in cgroup_bases() {
            assert!(base.starts_with("/sys/fs/cgroup"), "{}", base.display());
        }
    }

    #[test]
    fn scan_finds_dirs_mounts_and_the_drivers_containers() {
        let tmp = tempfile::tempdir().unwrap();
        let machines = tmp.path().join("machines");
        std::fs::create_dir_all(machines.join("m1/rootfs")).unwrap();
        std::fs::create_dir_all(machines.join("m2")).unwrap();
        std::fs::write(machines.join("not-a-dir"), "").unwrap();
        let rootfs = machines.join("m1/rootfs");
        nix::mount::mount(
            Some("tmpfs"),
            &rootfs,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let runc_root = tmp.path().join("runc");
        std::fs::create_dir_all(runc_root.join("m3")).unwrap();
        let host = HostInventory::scan(&machines, &BTreeSet::new(), Some(&runc_root));
        let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
        assert_eq!(host.dirs, BTreeSet::from(["m1".into(), "m2".into()]));
        assert_eq!(host.mounts.get("m1"), Some(&vec![rootfs.clone()]));
        assert_eq!(host.containers, BTreeSet::from(["m3".into()]));
        assert_eq!(
            host.ids(),
            BTreeSet::from(["m1".into(), "m2".into(), "m3".into()])
        );
    }
}
