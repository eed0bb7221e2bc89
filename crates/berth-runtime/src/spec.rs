//! The OCI bundle's `config.json`, built from a [`BundleSpec`].
//!
//! The seccomp section is [`crate::seccomp::default_profile`], which both drivers apply.

use std::collections::{HashMap, HashSet};
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::error::{IoContext, RuntimeError};
use crate::userns::IdRange;
use crate::{util, BundleSpec, MachineLayout};

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Docker's default for containers; capped by the host's hard limit.
const NOFILE_LIMIT: u64 = 1_048_576;
const CPU_PERIOD_US: u64 = 100_000;
/// Where `config.json` keeps the Machine's private address, so a start that must rebuild
/// the network after a host reboot finds it without the agent.
pub const PRIVATE_IP_ANNOTATION: &str = "berth.private-ip";
/// Where `config.json` keeps the Machine's org, whose Machines it may reach on the worker
/// network (absent: the default group).
pub const ORG_ANNOTATION: &str = "berth.org";

/// Docker's default capability set, without CAP_NET_RAW (raw and packet sockets: forged
/// frames, which the bridge filter drops anyway). [`BundleSpec::net_raw`] gives it back.
pub const DEFAULT_CAPABILITIES: [Capability; 13] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Docker's default masked paths.
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's default read-only paths.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The cgroup of a Machine, relative to the cgroup of the runc that creates it.
pub fn cgroups_path(machine_id: &str) -> PathBuf {
    PathBuf::from(format!("berth/{machine_id}"))
}

/// Whether `id` is usable as a runc container id, a cgroup name and a hostname.
pub fn valid_machine_id(id: &str) -> bool {
    // Starting alphanumeric keeps it from reading as a flag or a relative path.
    id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Builds the runtime spec. `rootfs` is the absolute overlay mountpoint and `netns` the
/// persistent network namespace file, which the Machine joins instead of making its own.
pub fn build(spec: &BundleSpec, rootfs: &Path, netns: &Path) -> Result<Spec, RuntimeError> {
    let id = &spec.machine_id;
    let invalid = |message: String| RuntimeError::InvalidSpec {
        id: id.clone(),
        message,
    };
    if !valid_machine_id(id) {
        return Err(invalid(format!(
            "machine id {id:?} must be 1-63 of [A-Za-z0-9_.-], starting alphanumeric"
        )));
    }
    if spec.args.is_empty() {
        return Err(invalid("args must not be empty".into()));
    }
    if !spec.cwd.starts_with('/') {
        return Err(invalid(format!("cwd {:?} must be absolute", spec.cwd)));
    }
    if !rootfs.is_absolute() || !netns.is_absolute() {
        return Err(invalid("rootfs and netns paths must be absolute".into()));
    }
    let oci = |e: oci_spec::OciSpecError| invalid(e.to_string());

    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_owned());
    }
    let mut caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    if spec.net_raw {
        caps.insert(Capability::NetRaw);
    }
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        // The builder would otherwise fill these from oci-spec's own defaults.
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(oci)?;
    let nofile = nofile_limit();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(spec.uid)
                .gid(spec.gid)
                .build()
                .map_err(oci)?,
        )
        .args(spec.args.clone())
        .env(env)
        .cwd(&spec.cwd)
        .capabilities(capabilities)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(nofile)
            .soft(nofile)
            .build()
            .map_err(oci)?])
        .no_new_privileges(true)
        .build()
        .map_err(oci)?;

    let namespaces = [
        (LinuxNamespaceType::Pid, None),
        (LinuxNamespaceType::Mount, None),
        (LinuxNamespaceType::Uts, None),
        (LinuxNamespaceType::Ipc, None),
        (LinuxNamespaceType::Network, Some(netns)),
    ]
    .into_iter()
    .map(|(typ, path)| {
        let builder = LinuxNamespaceBuilder::default().typ(typ);
        match path {
            Some(path) => builder.path(path).build(),
            None => builder.build(),
        }
    })
    .collect::<Result<Vec<_>, _>>()
    .map_err(oci)?;

    let memory_bytes = i64::from(spec.memory_mb) * 1024 * 1024;
    let mut memory = LinuxMemoryBuilder::default();
    if spec.memory_mb > 0 {
        memory = memory.limit(memory_bytes);
        // memory+swap equal to memory: no swap. Skipped where the kernel has no swap
        // accounting, as runc would fail writing the missing file.
        if swap_accounting_available() {
            memory = memory.swap(memory_bytes);
        }
    }
    let mut cpu = LinuxCpuBuilder::default();
    if spec.cpus > 0 {
        cpu = cpu
            .quota(i64::from(spec.cpus) * CPU_PERIOD_US as i64)
            .period(CPU_PERIOD_US);
    }
    let mut resources = LinuxResourcesBuilder::default()
        // Deny every device; runc appends its default allow-list (null, zero, tty, ...).
        .devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(oci)?])
        .memory(memory.build().map_err(oci)?)
        .cpu(cpu.build().map_err(oci)?);
    if spec.pids_limit > 0 {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(spec.pids_limit)
                .build()
                .map_err(oci)?,
        );
    }

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(oci)?)
        .cgroups_path(cgroups_path(id))
        .seccomp(crate::seccomp::default_profile().map_err(oci)?)
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(oci)?;

    let mut builder = SpecBuilder::default();
    let mut annotations = HashMap::new();
    if let Some(address) = spec.private_ip {
        annotations.insert(PRIVATE_IP_ANNOTATION.to_owned(), address.to_string());
    }
    if let Some(org) = &spec.org {
        annotations.insert(ORG_ANNOTATION.to_owned(), org.clone());
    }
    if !spec.volumes.is_empty() {
        for volume in &spec.volumes {
            if !volume.destination.starts_with('/') || volume.destination == "/" {
                return Err(invalid(format!(
                    "volume path {:?} must be absolute and not /",
                    volume.destination
                )));
            }
        }
        let json = serde_json::to_string(&spec.volumes)
            .map_err(|e| RuntimeError::Internal(format!("volume mounts: {e}")))?;
        annotations.insert(crate::volume::VOLUMES_ANNOTATION.to_owned(), json);
    }
    if !annotations.is_empty() {
        builder = builder.annotations(annotations);
    }
    builder
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(rootfs)
                .readonly(false)
                .build()
                .map_err(oci)?,
        )
        .mounts(default_mounts().map_err(oci)?)
        .process(process)
        .hostname(id.clone())
        .linux(linux)
        .build()
        .map_err(oci)
}

/// Builds the spec for `layout` and writes it atomically to `layout.config_json()`.
pub fn write_bundle(
    layout: &MachineLayout,
    spec: &BundleSpec,
    ids: IdRange,
) -> Result<(), RuntimeError> {
    let json = render(layout, spec, ids)?;
    let path = layout.config_json();
    util::write_atomic(&path, &json).ctx(|| format!("write {}", path.display()))
}

/// The `config.json` bytes for `layout`, in the user namespace of `ids`; validates the
/// spec without touching the host.
pub fn render(
    layout: &MachineLayout,
    spec: &BundleSpec,
    ids: IdRange,
) -> Result<Vec<u8>, RuntimeError> {
    if spec.machine_id != layout.id {
        return Err(RuntimeError::InvalidSpec {
            id: layout.id.clone(),
            message: format!("spec is for machine {:?}", spec.machine_id),
        });
    }
    let mut oci = build(spec, &layout.rootfs(), &layout.netns())?;
    set_user_namespace(&mut oci, ids, &layout.userns())?;
    // Compact: every start reads it, and every stopped Machine keeps it on disk.
    serde_json::to_vec(&oci)
        .map_err(|e| RuntimeError::Internal(format!("serialize config for {}: {e}", layout.id)))
}

/// Puts the Machine in its pinned user namespace (`userns`), with the map of `ids` that
/// runc checks against the namespace and native init reads for its mount options.
pub fn set_user_namespace(oci: &mut Spec, ids: IdRange, userns: &Path) -> Result<(), RuntimeError> {
    let invalid =
        |e: oci_spec::OciSpecError| RuntimeError::Internal(format!("user namespace: {e}"));
    let mut linux = oci.linux().clone().unwrap_or_default();
    let mut namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .iter()
        .flatten()
        .filter(|n| n.typ() != LinuxNamespaceType::User)
        .cloned()
        .collect();
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::User)
            .path(userns)
            .build()
            .map_err(invalid)?,
    );
    let map = LinuxIdMappingBuilder::default()
        .container_id(0u32)
        .host_id(ids.base)
        .size(crate::userns::RANGE_SIZE)
        .build()
        .map_err(invalid)?;
    linux
        .set_namespaces(Some(namespaces))
        .set_uid_mappings(Some(vec![map]))
        .set_gid_mappings(Some(vec![map]));
    oci.set_linux(Some(linux));
    Ok(())
}

/// The host ids of a prepared Machine, read from its bundle; `None` when it has no
/// bundle (a runtime that keeps no files) or no map.
pub fn machine_id_range(layout: &crate::MachineLayout) -> Option<IdRange> {
    let oci = Spec::load(layout.config_json()).ok()?;
    id_range(&oci)
}

/// The Machine's host ids, from the map in its spec; `None` for a Machine made before
/// user namespaces.
pub fn id_range(oci: &Spec) -> Option<IdRange> {
    let linux = oci.linux().as_ref()?;
    let uid = linux.uid_mappings().as_ref()?.first()?;
    let gid = linux.gid_mappings().as_ref()?.first()?;
    (uid.container_id() == 0
        && uid.size() == crate::userns::RANGE_SIZE
        && uid.host_id() == gid.host_id()
        && gid.size() == uid.size())
    .then_some(IdRange {
        base: uid.host_id(),
    })
}

/// What a written `config.json` records of the Machine's network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedNetwork {
    pub private_ip: Option<Ipv6Addr>,
    pub org: Option<String>,
}

/// The private address recorded in a written `config.json`, if any.
pub fn read_private_ip(config_json: &Path) -> Result<Option<Ipv6Addr>, RuntimeError> {
    Ok(read_network(config_json)?.private_ip)
}

/// The private address and org recorded in a written `config.json`.
pub fn read_network(config_json: &Path) -> Result<RecordedNetwork, RuntimeError> {
    let text = std::fs::read(config_json).ctx(|| format!("read {}", config_json.display()))?;
    let spec: Spec = serde_json::from_slice(&text)
        .map_err(|e| RuntimeError::Internal(format!("parse {}: {e}", config_json.display())))?;
    let annotations = spec.annotations().as_ref();
    let private_ip = annotations
        .and_then(|a| a.get(PRIVATE_IP_ANNOTATION))
        .map(|text| {
            text.parse().map_err(|e| {
                RuntimeError::Internal(format!(
                    "bad {PRIVATE_IP_ANNOTATION} {text:?} in {}: {e}",
                    config_json.display()
                ))
            })
        })
        .transpose()?;
    let org = annotations.and_then(|a| a.get(ORG_ANNOTATION)).cloned();
    Ok(RecordedNetwork { private_ip, org })
}

/// Docker's default mounts.
fn default_mounts() -> Result<Vec<Mount>, oci_spec::OciSpecError> {
    let mount = |dest: &str, typ: &str, source: &str, options: &[&str]| {
        MountBuilder::default()
            .destination(dest)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .build()
    };
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
    ])
}

/// The NOFILE limit for the Machine: never above this host's hard limit, since raising it
/// needs CAP_SYS_RESOURCE, which runc may not have.
fn nofile_limit() -> u64 {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    hard.map_or(NOFILE_LIMIT, |h| h.min(NOFILE_LIMIT))
}

/// cgroup v1 needs `memory.memsw.*` (swap accounting) to limit swap; v2 always has it.
fn swap_accounting_available() -> bool {
    let v1_memory = Path::new("/sys/fs/cgroup/memory");
    if v1_memory.exists() {
        v1_memory.join("memory.memsw.limit_in_bytes").exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BundleSpec {
        BundleSpec {
            machine_id: "m1".into(),
            args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["FOO=bar".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            cpus: 2,
            memory_mb: 64,
            pids_limit: 100,
            disk_mb: None,
            private_ip: None,
            org: None,
            net_raw: false,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn builds_expected_config() {
        let spec = build(&sample(), Path::new("/m/rootfs"), Path::new("/m/netns")).unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["hostname"], "m1");
        assert_eq!(v["root"]["path"], "/m/rootfs");
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(v["process"]["env"][1], DEFAULT_PATH);
        assert_eq!(
            v["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            13
        );
        let bounding = v["process"]["capabilities"]["bounding"].to_string();
        assert!(!bounding.contains("CAP_NET_RAW"), "{bounding}");
        let mut raw = sample();
        raw.net_raw = true;
        let with = build(&raw, Path::new("/m/rootfs"), Path::new("/m/netns")).unwrap();
        let with = serde_json::to_value(&with).unwrap();
        for set in ["bounding", "effective", "permitted"] {
            assert!(with["process"]["capabilities"][set]
                .to_string()
                .contains("CAP_NET_RAW"));
        }
        assert_eq!(
            v["process"]["capabilities"]["ambient"],
            serde_json::json!([])
        );
        assert_eq!(
            v["process"]["capabilities"]["inheritable"],
            serde_json::json!([])
        );
        let nofile = v["process"]["rlimits"][0]["hard"].as_u64().unwrap();
        let host = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        assert!(host.is_none_or(|h| nofile <= h));
        assert_eq!(v["linux"]["cgroupsPath"], "berth/m1");
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 64 * 1024 * 1024);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(v["linux"]["resources"]["cpu"]["period"], 100_000);
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], 100);
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 5);
        let net = ns.iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(net["path"], "/m/netns");
        assert!(ns
            .iter()
            .all(|n| n["type"] != "user" && n["type"] != "cgroup"));
        assert_eq!(
            v["linux"]["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        let mounts: Vec<_> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            mounts,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/sys",
                "/sys/fs/cgroup",
                "/dev/mqueue",
                "/dev/shm"
            ]
        );
    }

    #[test]
    fn rejects_bad_input() {
        let mut s = sample();
        s.machine_id = "a/b".into();
        let err = build(&s, Path::new("/r"), Path::new("/n")).unwrap_err();
        assert_eq!(err.code(), "invalid_spec");
        for bad in ["", "-rf", ".x", "a b", &"a".repeat(64)] {
            assert!(!valid_machine_id(bad), "{bad:?}");
        }
        assert!(valid_machine_id("m1.web_2-x"));
        let mut s = sample();
        s.args.clear();
        assert!(build(&s, Path::new("/r"), Path::new("/n")).is_err());
        let mut s = sample();
        s.cwd = "rel".into();
        assert!(build(&s, Path::new("/r"), Path::new("/n")).is_err());
    }

    #[test]
    fn writes_config_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let layout = MachineLayout::new(dir.path(), "m1");
        std::fs::create_dir_all(layout.bundle()).unwrap();
        write_bundle(&layout, &sample(), IdRange { base: 1 << 28 }).unwrap();
        let text = std::fs::read_to_string(layout.config_json()).unwrap();
        let back: Spec = serde_json::from_str(&text).unwrap();
        assert_eq!(back.hostname().as_deref(), Some("m1"));
        assert_eq!(read_private_ip(&layout.config_json()).unwrap(), None);

        let mut spec = sample();
        spec.private_ip = Some("fd00:1:2:3::2a".parse().unwrap());
        write_bundle(&layout, &spec, IdRange { base: 1 << 28 }).unwrap();
        let back = Spec::load(layout.config_json()).unwrap();
        assert_eq!(id_range(&back), Some(IdRange { base: 1 << 28 }));
        let user = back
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        assert!(user.iter().any(|n| n.typ() == LinuxNamespaceType::User
            && n.path().as_deref() == Some(layout.userns().as_path())));
        assert_eq!(
            read_private_ip(&layout.config_json()).unwrap(),
            spec.private_ip
        );
        // The org travels with it, for a rebuild after a reboot.
        assert_eq!(read_network(&layout.config_json()).unwrap().org, None);
        spec.org = Some("acme".into());
        write_bundle(&layout, &spec, IdRange { base: 1 << 28 }).unwrap();
        assert_eq!(
            read_network(&layout.config_json()).unwrap(),
            RecordedNetwork {
                private_ip: spec.private_ip,
                org: Some("acme".into()),
            }
        );
    }
}
