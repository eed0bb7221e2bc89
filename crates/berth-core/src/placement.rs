//! Placement: which worker a new Machine lives on. Decided once, at create; start never
//! asks again. Pure: the control plane passes in what it knows of each worker.

/// Disk of a Machine whose config names none (`guest.disk_mb`), for placement, capacity
/// and its quota.
pub const MACHINE_DISK_MB: u64 = 1024;

/// The disk a Machine may fill: what placement counts and the filesystem enforces.
pub fn machine_disk_mb(guest: &berth_api::GuestConfig) -> u64 {
    guest.disk_mb.map_or(MACHINE_DISK_MB, u64::from)
}

/// What the control plane knows of one worker when it places a Machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCapacity {
    pub name: String,
    pub region: String,
    /// A cordoned worker takes no new Machines.
    pub cordoned: bool,
    /// A worker that missed its heartbeats takes no new Machines.
    pub healthy: bool,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// CPU and memory count only for Machines that are running.
    pub running_cpus: u32,
    pub running_memory_mb: u64,
    /// Disk counts for every Machine that exists.
    pub used_disk_mb: u64,
    /// The drivers the worker runs Machines with.
    pub runtimes: Vec<String>,
}

impl WorkerCapacity {
    fn free_cpus(&self) -> u32 {
        self.cpus.saturating_sub(self.running_cpus)
    }
    fn free_memory_mb(&self) -> u64 {
        self.memory_mb.saturating_sub(self.running_memory_mb)
    }
    fn free_disk_mb(&self) -> u64 {
        self.disk_mb.saturating_sub(self.used_disk_mb)
    }

    /// Whether a Machine of this size can run here now.
    pub fn fits(&self, request: &PlacementRequest) -> bool {
        self.free_cpus() >= request.cpus
            && self.free_memory_mb() >= request.memory_mb
            && self.free_disk_mb() >= request.disk_mb
    }

    /// How empty the worker would be after taking the request: the free share of CPU,
    /// memory and disk, in thousandths each, added up. Every dimension counts, so a
    /// worker that holds more stopped Machines (disk) is fuller even when CPU ties.
    fn headroom_after(&self, request: &PlacementRequest) -> u64 {
        let share = |free: u64, total: u64| (free * 1000).checked_div(total).unwrap_or(0);
        let cpu = share(
            u64::from(self.free_cpus() - request.cpus),
            u64::from(self.cpus),
        );
        let memory = share(self.free_memory_mb() - request.memory_mb, self.memory_mb);
        let disk = share(self.free_disk_mb() - request.disk_mb, self.disk_mb);
        cpu + memory + disk
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementRequest {
    pub region: Option<String>,
    /// Only this worker (the one holding the Machine's volumes).
    pub worker: Option<String>,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// Only workers that offer this driver (`config.runtime`); any worker when `None`.
    pub runtime: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The emptiest worker: failures and noisy neighbours touch fewer Machines.
    #[default]
    Spread,
    /// The fullest worker that fits: keeps whole workers free for large Machines.
    Binpack,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no worker serves region {0:?}")]
    NoWorkerInRegion(String),
    #[error("no worker offers the runtime {0:?}")]
    NoWorkerWithRuntime(String),
    #[error("no worker can take the machine: every candidate is cordoned or unhealthy")]
    NoSchedulableWorker,
    #[error("no worker has {cpus} free CPUs, {memory_mb} MB of free memory and {disk_mb} MB of free disk")]
    InsufficientCapacity {
        cpus: u32,
        memory_mb: u64,
        disk_mb: u64,
    },
}

/// Filters by region, driver, cordon, health and free capacity, then scores by the
/// strategy. Ties go to the worker whose name sorts first, so placement is deterministic.
pub fn place<'a>(
    workers: &'a [WorkerCapacity],
    request: &PlacementRequest,
    strategy: Strategy,
) -> Result<&'a WorkerCapacity, PlacementError> {
    let in_region: Vec<&WorkerCapacity> = workers
        .iter()
        .filter(|worker| {
            request
                .worker
                .as_ref()
                .is_none_or(|only| &worker.name == only)
        })
        .filter(|worker| {
            request
                .region
                .as_ref()
                .is_none_or(|region| &worker.region == region)
        })
        .collect();
    if in_region.is_empty() {
        if let Some(region) = &request.region {
            return Err(PlacementError::NoWorkerInRegion(region.clone()));
        }
    }
    let offering: Vec<&WorkerCapacity> = in_region
        .into_iter()
        .filter(|worker| {
            request
                .runtime
                .as_ref()
                .is_none_or(|runtime| worker.runtimes.contains(runtime))
        })
        .collect();
    if let (true, Some(runtime)) = (offering.is_empty(), &request.runtime) {
        return Err(PlacementError::NoWorkerWithRuntime(runtime.clone()));
    }
    let schedulable: Vec<&WorkerCapacity> = offering
        .into_iter()
        .filter(|worker| worker.healthy && !worker.cordoned)
        .collect();
    if schedulable.is_empty() {
        return Err(PlacementError::NoSchedulableWorker);
    }
    let fitting = schedulable
        .into_iter()
        .filter(|worker| worker.fits(request));
    let best = match strategy {
        Strategy::Spread => fitting.max_by(|a, b| {
            a.headroom_after(request)
                .cmp(&b.headroom_after(request))
                .then_with(|| b.name.cmp(&a.name))
        }),
        Strategy::Binpack => fitting.min_by(|a, b| {
            a.headroom_after(request)
                .cmp(&b.headroom_after(request))
                .then_with(|| a.name.cmp(&b.name))
        }),
    };
    best.ok_or(PlacementError::InsufficientCapacity {
        cpus: request.cpus,
        memory_mb: request.memory_mb,
        disk_mb: request.disk_mb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest, Strategy as _};

    fn worker(name: &str, region: &str, running_cpus: u32) -> WorkerCapacity {
        WorkerCapacity {
            name: name.into(),
            region: region.into(),
            cordoned: false,
            healthy: true,
            cpus: 8,
            memory_mb: 8192,
            disk_mb: 100_000,
            running_cpus,
            running_memory_mb: u64::from(running_cpus) * 512,
            used_disk_mb: 0,
            runtimes: vec!["native".into(), "runc".into()],
        }
    }

    fn request(cpus: u32) -> PlacementRequest {
        PlacementRequest {
            region: None,
            worker: None,
            cpus,
            memory_mb: 256,
            disk_mb: 100,
            runtime: None,
        }
    }

    #[test]
    fn a_pinned_request_goes_to_its_worker_or_nowhere() {
        let workers = [worker("a", "r", 0), worker("b", "r", 7)];
        let pinned = |name: &str, cpus| PlacementRequest {
            worker: Some(name.into()),
            ..request(cpus)
        };
        // Spread would pick `a`; the volume's worker is `b`.
        assert_eq!(
            place(&workers, &pinned("b", 1), Strategy::Spread).map(|w| w.name.as_str()),
            Ok("b")
        );
        assert!(matches!(
            place(&workers, &pinned("b", 2), Strategy::Spread),
            Err(PlacementError::InsufficientCapacity { .. })
        ));
        assert!(place(&workers, &pinned("gone", 1), Strategy::Spread).is_err());
    }

    #[test]
    fn spread_picks_the_emptiest_and_binpack_the_fullest() {
        let workers = [
            worker("a", "r", 6),
            worker("b", "r", 1),
            worker("c", "r", 3),
        ];
        assert_eq!(
            place(&workers, &request(1), Strategy::Spread).map(|w| w.name.as_str()),
            Ok("b")
        );
        assert_eq!(
            place(&workers, &request(1), Strategy::Binpack).map(|w| w.name.as_str()),
            Ok("a")
        );
    }

    #[test]
    fn region_cordon_and_capacity_filter() {
        let mut workers = vec![
            worker("a", "ams", 0),
            worker("b", "ord", 0),
            worker("c", "ord", 8),
        ];
        let mut in_ord = request(1);
        in_ord.region = Some("ord".into());
        assert_eq!(
            place(&workers, &in_ord, Strategy::Spread).map(|w| w.name.as_str()),
            Ok("b")
        );
        workers[1].cordoned = true;
        assert!(matches!(
            place(&workers, &in_ord, Strategy::Spread),
            Err(PlacementError::InsufficientCapacity { .. })
        ));
        in_ord.region = Some("syd".into());
        assert_eq!(
            place(&workers, &in_ord, Strategy::Spread),
            Err(PlacementError::NoWorkerInRegion("syd".into()))
        );
        workers[0].healthy = false;
        workers[2].cordoned = true;
        assert_eq!(
            place(&workers, &request(1), Strategy::Spread),
            Err(PlacementError::NoSchedulableWorker)
        );
    }

    #[test]
    fn only_workers_offering_the_runtime_are_picked() {
        let mut gvisor = worker("b", "r", 7);
        gvisor.runtimes.push("gvisor".into());
        let workers = [worker("a", "r", 0), gvisor];
        let wants = |runtime: &str| PlacementRequest {
            runtime: Some(runtime.into()),
            ..request(1)
        };
        // Spread would pick `a`; only `b` offers gvisor.
        assert_eq!(
            place(&workers, &wants("gvisor"), Strategy::Spread).map(|w| w.name.as_str()),
            Ok("b")
        );
        assert_eq!(
            place(&workers, &wants("runc"), Strategy::Spread).map(|w| w.name.as_str()),
            Ok("a")
        );
        assert_eq!(
            place(&workers, &wants("kata"), Strategy::Spread),
            Err(PlacementError::NoWorkerWithRuntime("kata".into()))
        );
        // A worker that reported no drivers (an older agent) takes only Machines that
        // name none.
        let mut old = worker("c", "r", 0);
        old.runtimes.clear();
        let old = [old];
        assert!(place(&old, &request(1), Strategy::Spread).is_ok());
        assert_eq!(
            place(&old, &wants("native"), Strategy::Spread),
            Err(PlacementError::NoWorkerWithRuntime("native".into()))
        );
        // The one worker offering it is full: capacity, not the driver, is what lacks.
        let mut full = workers.clone();
        full[1].running_cpus = full[1].cpus;
        assert!(matches!(
            place(&full, &wants("gvisor"), Strategy::Spread),
            Err(PlacementError::InsufficientCapacity { .. })
        ));
    }

    #[test]
    fn stopped_machines_hold_disk_but_no_cpu() {
        let mut full_disk = worker("a", "r", 0);
        full_disk.used_disk_mb = full_disk.disk_mb;
        let workers = [full_disk, worker("b", "r", 7)];
        assert_eq!(
            place(&workers, &request(1), Strategy::Spread).map(|w| w.name.as_str()),
            Ok("b")
        );
    }

    fn arbitrary_worker() -> impl proptest::strategy::Strategy<Value = WorkerCapacity> {
        (
            0u8..5,
            0u8..2,
            any::<bool>(),
            any::<bool>(),
            0u32..16,
            0u32..20,
            0u64..20_000,
            0u64..20_000,
            0u64..20_000,
            0u64..20_000,
            0u8..4,
        )
            .prop_map(
                |(
                    name,
                    region,
                    cordoned,
                    healthy,
                    cpus,
                    running_cpus,
                    memory_mb,
                    running_memory_mb,
                    disk_mb,
                    used_disk_mb,
                    offers,
                )| {
                    WorkerCapacity {
                        name: format!("w{name}"),
                        region: format!("r{region}"),
                        cordoned,
                        healthy,
                        cpus,
                        memory_mb,
                        disk_mb,
                        running_cpus,
                        running_memory_mb,
                        used_disk_mb,
                        // Bit 0: native, bit 1: runc.
                        runtimes: [(1, "native"), (2, "runc")]
                            .into_iter()
                            .filter(|(bit, _)| offers & bit != 0)
                            .map(|(_, name)| name.to_owned())
                            .collect(),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn a_placement_always_fits_and_is_found_when_possible(
            workers in proptest::collection::vec(arbitrary_worker(), 0..8),
            cpus in 1u32..8, memory_mb in 1u64..4_000, disk_mb in 0u64..4_000,
            region in proptest::option::of(0u8..3), binpack in any::<bool>(),
            runtime in proptest::option::of(proptest::sample::select(vec!["native", "runc"])),
        ) {
            let request = PlacementRequest { region: region.map(|r| format!("r{r}")), worker: None, cpus, memory_mb, disk_mb, runtime: runtime.map(str::to_owned) };
            let strategy = if binpack { Strategy::Binpack } else { Strategy::Spread };
            let candidates: Vec<&WorkerCapacity> = workers.iter()
                .filter(|w| request.region.as_ref().is_none_or(|r| &w.region == r))
                .filter(|w| request.runtime.as_ref().is_none_or(|r| w.runtimes.contains(r)))
                .filter(|w| w.healthy && !w.cordoned && w.fits(&request))
                .collect();
            match place(&workers, &request, strategy) {
                Ok(chosen) => {
                    prop_assert!(candidates.iter().any(|c| std::ptr::eq(*c, chosen)));
                    let score = chosen.headroom_after(&request);
                    for other in &candidates {
                        let other_score = other.headroom_after(&request);
                        match strategy {
                            Strategy::Spread => prop_assert!(score >= other_score),
                            Strategy::Binpack => prop_assert!(score <= other_score),
                        }
                    }
                    // Deterministic: the same input gives the same answer.
                    prop_assert_eq!(place(&workers, &request, strategy).map(|w| w.name.clone()), Ok(chosen.name.clone()));
                }
                Err(_) => prop_assert!(candidates.is_empty()),
            }
        }
    }
}
