//! Create-time work every driver shares: the Machine's directories, its host ids, its
//! user and network namespaces (plugged into the worker network), its disk quota and the
//! bundle's `config.json`; and the checks every start makes first.

use std::fs;
use std::sync::Arc;
use std::time::Instant;

use oci_spec::runtime::Spec;

use super::run_dir::RunDir;
use super::{blocking, HostConfig};
use crate::error::{IoContext, RuntimeError};
use crate::network::WorkerNetwork;
use crate::quota::DiskQuota;
use crate::timing::micros;
use crate::userns::{self, IdRange, IdRegistry};
use crate::{spec, util, BundleSpec, MachineLayout};

/// `Runtime::prepare` for every driver. `driver_step` runs (blocking) once the
/// directories and namespaces exist, with the rendered OCI spec: what the driver makes of
/// its own at create (the native driver's cgroups). `finish_config` turns the rendered
/// `config.json` into the driver's own form (runc's runs the Machine's init).
pub(crate) async fn prepare<F, C>(
    host: &HostConfig,
    layout: &MachineLayout,
    spec: &BundleSpec,
    driver_step: F,
    finish_config: C,
) -> Result<(), RuntimeError>
where
    F: FnOnce(&MachineLayout, &Spec) -> Result<(), RuntimeError> + Send + 'static,
    C: FnOnce(&str, Vec<u8>) -> Result<Vec<u8>, RuntimeError>,
{
    let id = layout.id.clone();
    let network = machine_network(host.network.as_ref(), &id, spec.private_ip)?;
    // Fails on a bad spec before anything is made on the host.
    let oci = spec::build(spec, &layout.rootfs(), &layout.netns())?;
    let t0 = Instant::now();
    let ids = {
        let layout = layout.clone();
        let registry = host.id_registry.clone();
        let quota = host.disk_quota.clone();
        let disk_mb = spec.disk_mb;
        blocking(move || {
            prepare_disk_quota(quota.as_ref(), &layout, disk_mb)?;
            let ids = make_dirs_and_namespaces(&layout, &registry)?;
            driver_step(&layout, &oci)?;
            Ok(ids)
        })
        .await?
    };
    let config = finish_config(&id, spec::render(layout, spec, ids)?)?;
    let netns_done = t0.elapsed();
    if let Some((network, address)) = network {
        network
            .attach(&id, &layout.netns(), address, spec.org.as_deref())
            .await?;
    }
    let netns_us = netns_done.as_micros();
    let attach_us = (t0.elapsed() - netns_done).as_micros();
    // Written last: a config.json means the Machine is fully prepared.
    let path = layout.config_json();
    blocking(move || {
        util::write_atomic(&path, &config).ctx(|| format!("write {}", path.display()))
    })
    .await?;
    tracing::debug!(machine = %id, netns_us, attach_us, "machine prepared");
    Ok(())
}

/// The worker network and address a Machine is attached with: the address must be one
/// the network can give, and an address without a network is refused.
pub(crate) fn machine_network<'a>(
    network: Option<&'a Arc<WorkerNetwork>>,
    id: &str,
    private_ip: Option<std::net::Ipv6Addr>,
) -> Result<Option<(&'a Arc<WorkerNetwork>, std::net::Ipv6Addr)>, RuntimeError> {
    match (network, private_ip) {
        (Some(network), Some(address)) => {
            network.check_address(id, address)?;
            Ok(Some((network, address)))
        }
        (None, Some(address)) => Err(RuntimeError::InvalidSpec {
            id: id.to_owned(),
            message: format!("private address {address} given, but this runtime has no network"),
        }),
        (_, None) => Ok(None),
    }
}

/// The Machine's quota subvolume with its limit, before the directories are made (the
/// upper and work links must come first). Blocking.
pub(crate) fn prepare_disk_quota(
    quota: Option<&DiskQuota>,
    layout: &MachineLayout,
    disk_mb: Option<u64>,
) -> Result<(), RuntimeError> {
    let (Some(quota), Some(disk_mb)) = (quota, disk_mb) else {
        return Ok(());
    };
    let id = &layout.id;
    let t0 = Instant::now();
    let limited = quota
        .prepare(layout, disk_mb)
        .ctx(|| format!("disk quota of machine {id}"))?;
    if limited {
        tracing::debug!(machine = %id, disk_mb, quota_us = micros(t0.elapsed()), "disk quota set");
    } else {
        tracing::warn!(machine = %id, "machine predates disk quotas: its disk has no limit");
    }
    Ok(())
}

/// The Machine's directories, its host ids and its user and network namespaces (`lo`
/// up). Blocking.
pub(crate) fn make_dirs_and_namespaces(
    layout: &MachineLayout,
    registry: &IdRegistry,
) -> Result<IdRange, RuntimeError> {
    let id = &layout.id;
    for dir in [
        layout.upper(),
        layout.work(),
        layout.rootfs(),
        layout.bundle(),
        layout.run_dir(),
        layout.log_dir(),
    ] {
        fs::create_dir_all(&dir).ctx(|| format!("create {} for machine {id}", dir.display()))?;
    }
    userns::prepare(layout, registry)
}

/// The checks every start makes first, all cheap syscalls: prepared, not running. Then
/// the run's stale state goes (`stale_state`, blocking: the runc driver deletes a
/// container left by a crash), the namespaces are pinned again if a host reboot unpinned
/// them, and the last run's files go. True when the namespaces had to be made again.
pub(crate) fn before_start(
    layout: &MachineLayout,
    registry: &IdRegistry,
    stale_state: impl FnOnce() -> Result<(), RuntimeError>,
) -> Result<bool, RuntimeError> {
    let id = &layout.id;
    let config = layout.config_json();
    if !config.exists() {
        return Err(RuntimeError::NotPrepared {
            id: id.clone(),
            path: config,
        });
    }
    let run = RunDir::of(layout);
    if let Some(shim_pid) = run.live_shim()? {
        return Err(RuntimeError::AlreadyRunning {
            id: id.clone(),
            shim_pid,
        });
    }
    stale_state()?;
    // Only a host reboot unpins the namespaces made at create; make them again then.
    let repinned = userns::ensure(layout, registry)?;
    run.clear_last_run()?;
    Ok(repinned)
}
