//! Quotas and rate limits, per org.
//!
//! Rate limits are GCRA (the `governor` crate) per token and action, and per Machine for
//! the actions on one Machine. Quotas count what an org holds; the started-resource count
//! lives here, fed by the workers' notices, and a start reserves its share under one lock
//! before the worker is asked, so concurrent starts can never pass a quota together.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use berth_api::{
    MachineState, OrgLimits, OrgUsage, Quotas, RateLimit, RateLimitOverrides, RateLimits,
    SetOrgLimitsRequest,
};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::auth::Principal;
use crate::clock::ApiClock;
use crate::error::ApiError;

pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS org_limits (
        slug TEXT PRIMARY KEY NOT NULL REFERENCES orgs(slug),
        overrides TEXT NOT NULL
    )"];

/// The server's defaults, like Fly's: one mutating call per second per Machine with a
/// burst of three, five reads per second with a burst of ten.
pub fn default_limits() -> OrgLimits {
    let mutate = RateLimit {
        per_second: 1.0,
        burst: 3,
    };
    OrgLimits {
        quotas: Quotas {
            max_machines: 1000,
            max_started_machines: 100,
            max_cpus: 256,
            max_memory_mb: 256 * 1024,
            // 20 GiB: a few dozen typical images (100 MiB to 1 GiB unpacked each), or
            // one large ML image.
            max_image_storage_mb: 20 * 1024,
            max_volumes: 1000,
            // 10 TiB: room for many volumes of Fly's default 1 GB and some large ones.
            max_volume_gb: 10 * 1024,
        },
        rate_limits: RateLimits {
            create: mutate,
            start: mutate,
            stop: mutate,
            update: mutate,
            destroy: mutate,
            exec: mutate,
            read: RateLimit {
                per_second: 5.0,
                burst: 10,
            },
        },
    }
}

/// The most a rate may be set to; past this a limit means nothing.
const MAX_RATE: f64 = 1_000_000.0;
/// The largest burst; like [`MAX_RATE`], past it a limit means nothing.
const MAX_BURST: u32 = 1_000_000;
/// The largest Machine counts an org may be allowed.
pub const MAX_MACHINES: u64 = 1_000_000;
/// The largest sum of `guest.cpus` an org may be allowed (2^20).
pub const MAX_CPUS: u64 = 1 << 20;
/// The largest sum of `guest.memory_mb` an org may be allowed: 1 PiB in MB.
pub const MAX_MEMORY_MB: u64 = 1 << 30;

/// `overrides` over `defaults`.
pub fn effective(defaults: &OrgLimits, overrides: &SetOrgLimitsRequest) -> OrgLimits {
    let q = &overrides.quotas;
    let r = &overrides.rate_limits;
    let d = &defaults.rate_limits;
    OrgLimits {
        quotas: Quotas {
            max_machines: q.max_machines.unwrap_or(defaults.quotas.max_machines),
            max_started_machines: q
                .max_started_machines
                .unwrap_or(defaults.quotas.max_started_machines),
            max_cpus: q.max_cpus.unwrap_or(defaults.quotas.max_cpus),
            max_memory_mb: q.max_memory_mb.unwrap_or(defaults.quotas.max_memory_mb),
            max_image_storage_mb: q
                .max_image_storage_mb
                .unwrap_or(defaults.quotas.max_image_storage_mb),
            max_volumes: q.max_volumes.unwrap_or(defaults.quotas.max_volumes),
            max_volume_gb: q.max_volume_gb.unwrap_or(defaults.quotas.max_volume_gb),
        },
        rate_limits: RateLimits {
            create: r.create.unwrap_or(d.create),
            start: r.start.unwrap_or(d.start),
            stop: r.stop.unwrap_or(d.stop),
            update: r.update.unwrap_or(d.update),
            destroy: r.destroy.unwrap_or(d.destroy),
            exec: r.exec.unwrap_or(d.exec),
            read: r.read.unwrap_or(d.read),
        },
    }
}

/// The largest image storage quota: one EiB, so that it still fits in bytes.
pub const MAX_IMAGE_STORAGE_MB: u64 = 1 << 40;
/// The largest volume storage quota: one EiB in GB, so that it still fits in bytes.
pub const MAX_VOLUME_GB: u64 = 1 << 30;

/// Refuses limits outside sane ranges, naming the field: quotas above their maximum
/// (zero is allowed, it freezes an org), rates that are not finite and positive, bursts
/// of zero. Checked before anything is stored.
pub fn validate_limits(overrides: &SetOrgLimitsRequest) -> Result<(), ApiError> {
    let q = &overrides.quotas;
    let quotas = [
        ("max_machines", q.max_machines, MAX_MACHINES),
        ("max_started_machines", q.max_started_machines, MAX_MACHINES),
        ("max_cpus", q.max_cpus, MAX_CPUS),
        ("max_memory_mb", q.max_memory_mb, MAX_MEMORY_MB),
        (
            "max_image_storage_mb",
            q.max_image_storage_mb,
            MAX_IMAGE_STORAGE_MB,
        ),
        ("max_volumes", q.max_volumes, MAX_MACHINES),
        ("max_volume_gb", q.max_volume_gb, MAX_VOLUME_GB),
    ];
    for (name, value, max) in quotas {
        if value.is_some_and(|value| value > max) {
            return Err(ApiError::invalid_config(
                format!("quotas.{name}"),
                format!("quotas.{name} must be 0 to {max}"),
            ));
        }
    }
    validate_rates(&overrides.rate_limits)
}

fn validate_rates(overrides: &RateLimitOverrides) -> Result<(), ApiError> {
    let all = [
        ("create", overrides.create),
        ("start", overrides.start),
        ("stop", overrides.stop),
        ("update", overrides.update),
        ("destroy", overrides.destroy),
        ("exec", overrides.exec),
        ("read", overrides.read),
    ];
    for (name, limit) in all {
        let Some(limit) = limit else { continue };
        if !(limit.per_second.is_finite() && limit.per_second > 0.0 && limit.per_second <= MAX_RATE)
        {
            return Err(ApiError::invalid_config(
                format!("rate_limits.{name}.per_second"),
                format!("rate_limits.{name}.per_second must be above 0 and at most {MAX_RATE}"),
            ));
        }
        if limit.burst == 0 || limit.burst > MAX_BURST {
            return Err(ApiError::invalid_config(
                format!("rate_limits.{name}.burst"),
                format!("rate_limits.{name}.burst must be 1 to {MAX_BURST}"),
            ));
        }
    }
    Ok(())
}

/// The actions that each have their own limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Start,
    Stop,
    Update,
    Destroy,
    Exec,
    Read,
}

impl Action {
    const ALL: [Action; 7] = [
        Action::Create,
        Action::Start,
        Action::Stop,
        Action::Update,
        Action::Destroy,
        Action::Exec,
        Action::Read,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Update => "update",
            Action::Destroy => "destroy",
            Action::Exec => "exec",
            Action::Read => "read",
        }
    }

    fn limit(self, limits: &RateLimits) -> RateLimit {
        match self {
            Action::Create => limits.create,
            Action::Start => limits.start,
            Action::Stop => limits.stop,
            Action::Update => limits.update,
            Action::Destroy => limits.destroy,
            Action::Exec => limits.exec,
            Action::Read => limits.read,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LimitKey {
    token_id: String,
    machine: Option<String>,
}

type Limiter =
    RateLimiter<LimitKey, DashMapStateStore<LimitKey>, ApiClock, NoOpMiddleware<Duration>>;

struct OrgLimiters {
    limits: RateLimits,
    by_action: HashMap<Action, Limiter>,
}

fn quota(limit: RateLimit) -> Quota {
    let period = Duration::from_secs_f64(1.0 / limit.per_second.clamp(1e-6, MAX_RATE));
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

/// One replica's share of `limits` when `replicas` are live: each keeps its own buckets
/// with the rate and the burst divided between them (a burst of at least 1). Calls to all
/// replicas together never pass the org's limit (while the count holds and the burst is
/// at least the count); a client whose calls a load balancer spreads unevenly can be
/// refused early, once it reaches `limit / replicas` on the busiest replica. A change in
/// the count rebuilds the buckets full.
pub(crate) fn per_replica(limits: &RateLimits, replicas: usize) -> RateLimits {
    if replicas <= 1 {
        return *limits;
    }
    let share = |limit: RateLimit| RateLimit {
        per_second: limit.per_second / replicas as f64,
        burst: (limit.burst / u32::try_from(replicas).unwrap_or(u32::MAX)).max(1),
    };
    RateLimits {
        create: share(limits.create),
        start: share(limits.start),
        stop: share(limits.stop),
        update: share(limits.update),
        destroy: share(limits.destroy),
        exec: share(limits.exec),
        read: share(limits.read),
    }
}

/// The rate limiters of every org, rebuilt when an org's limits change.
pub(crate) struct RateLimiters {
    clock: ApiClock,
    by_org: RwLock<HashMap<String, Arc<OrgLimiters>>>,
}

impl RateLimiters {
    pub(crate) fn new(clock: ApiClock) -> RateLimiters {
        RateLimiters {
            clock,
            by_org: RwLock::new(HashMap::new()),
        }
    }

    fn for_org(&self, org: &str, limits: &RateLimits) -> Arc<OrgLimiters> {
        if let Some(found) = self
            .by_org
            .read()
            .ok()
            .and_then(|map| map.get(org).cloned())
        {
            if found.limits == *limits {
                return found;
            }
        }
        let built = Arc::new(OrgLimiters {
            limits: *limits,
            by_action: Action::ALL
                .into_iter()
                .map(|action| {
                    let limiter = RateLimiter::dashmap_with_clock(
                        quota(action.limit(limits)),
                        self.clock.clone(),
                    );
                    (action, limiter)
                })
                .collect(),
        });
        if let Ok(mut map) = self.by_org.write() {
            match map.get(org) {
                Some(current) if current.limits == *limits => return current.clone(),
                _ => {
                    map.insert(org.to_owned(), built.clone());
                }
            }
        }
        built
    }

    /// Counts one `action` by `principal` (on `machine`); 429 when over the limit. The
    /// admin is never limited.
    pub(crate) fn check(
        &self,
        principal: &Principal,
        limits: &RateLimits,
        action: Action,
        machine: Option<&str>,
    ) -> Result<(), ApiError> {
        let Principal::Org { slug, token_id, .. } = principal else {
            return Ok(());
        };
        let limiters = self.for_org(slug, limits);
        let Some(limiter) = limiters.by_action.get(&action) else {
            return Ok(());
        };
        let key = LimitKey {
            token_id: token_id.clone(),
            machine: machine.map(str::to_owned),
        };
        match limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.clock));
                let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
                let mut error = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "too many {} calls for this token; retry in {millis} ms",
                        action.as_str()
                    ),
                );
                error.body.retry_after_ms = Some(millis);
                Err(error)
            }
        }
    }

    /// Forgets keys idle long enough to be full again, so memory stays bounded.
    pub(crate) fn prune(&self) {
        let all: Vec<Arc<OrgLimiters>> = self
            .by_org
            .read()
            .map(|map| map.values().cloned().collect())
            .unwrap_or_default();
        for limiters in all {
            for limiter in limiters.by_action.values() {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }
}

/// The resources a started Machine holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Share {
    pub cpus: u64,
    pub memory_mb: u64,
}

#[derive(Debug)]
struct Entry {
    org: String,
    share: Share,
    /// The worker says it is started.
    running: bool,
    /// Starts in flight that reserved this Machine's share.
    reservations: u32,
}

impl Entry {
    fn counted(&self) -> bool {
        self.running || self.reservations > 0
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    started: u64,
    cpus: u64,
    memory_mb: u64,
}

impl Totals {
    fn add(&mut self, share: Share) {
        self.started += 1;
        self.cpus += share.cpus;
        self.memory_mb += share.memory_mb;
    }
    fn remove(&mut self, share: Share) {
        self.started = self.started.saturating_sub(1);
        self.cpus = self.cpus.saturating_sub(share.cpus);
        self.memory_mb = self.memory_mb.saturating_sub(share.memory_mb);
    }
}

#[derive(Debug, Default)]
struct UsageState {
    machines: HashMap<String, Entry>,
    totals: HashMap<String, Totals>,
}

impl UsageState {
    /// Applies `change` to one entry, keeping the org's totals in step.
    fn change(&mut self, id: &str, change: impl FnOnce(&mut Entry)) {
        let Some(entry) = self.machines.get_mut(id) else {
            return;
        };
        let before = (entry.counted(), entry.share, entry.org.clone());
        change(entry);
        let after = (entry.counted(), entry.share, entry.org.clone());
        let forget = !entry.counted() && !entry.running;
        if before.0 {
            self.totals.entry(before.2).or_default().remove(before.1);
        }
        if after.0 {
            self.totals.entry(after.2).or_default().add(after.1);
        }
        if forget {
            self.machines.remove(id);
        }
    }
}

/// Started Machines and their resources, per org.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    state: Mutex<UsageState>,
}

/// A start's claim on its org's quota; dropping it gives the claim back (the worker's
/// notice of the start keeps the Machine counted from then on).
pub(crate) struct Reservation {
    usage: Arc<Usage>,
    machine: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut state) = self.usage.state.lock() {
            state.change(&self.machine, |entry| {
                entry.reservations = entry.reservations.saturating_sub(1);
            });
        }
    }
}

pub(crate) fn exceeded(quota: &str, limit: u64, current: u64) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::FORBIDDEN,
        "quota_exceeded",
        format!("the org's quota {quota} is {limit} and {current} is in use"),
    );
    error.body.quota = Some(quota.to_owned());
    error.body.limit = Some(limit);
    error.body.current = Some(current);
    error
}

impl Usage {
    /// Checks that `machine` may run with `share` within `quotas` and reserves it, in one
    /// step under one lock.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        org: &str,
        machine: &str,
        share: Share,
        quotas: &Quotas,
    ) -> Result<Reservation, ApiError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| ApiError::internal("usage table poisoned"))?;
        let totals = state.totals.get(org).copied().unwrap_or_default();
        let held = state
            .machines
            .get(machine)
            .filter(|entry| entry.counted())
            .map(|entry| entry.share);
        let mut after = totals;
        if let Some(held) = held {
            after.remove(held);
        }
        after.add(share);
        if after.started > quotas.max_started_machines {
            return Err(exceeded(
                "max_started_machines",
                quotas.max_started_machines,
                totals.started,
            ));
        }
        if after.cpus > quotas.max_cpus {
            return Err(exceeded("max_cpus", quotas.max_cpus, totals.cpus));
        }
        if after.memory_mb > quotas.max_memory_mb {
            return Err(exceeded(
                "max_memory_mb",
                quotas.max_memory_mb,
                totals.memory_mb,
            ));
        }
        state.machines.entry(machine.to_owned()).or_insert(Entry {
            org: org.to_owned(),
            share,
            running: false,
            reservations: 0,
        });
        state.change(machine, |entry| {
            entry.reservations += 1;
            entry.share = share;
            org.clone_into(&mut entry.org);
        });
        Ok(Reservation {
            usage: self.clone(),
            machine: machine.to_owned(),
        })
    }

    /// A worker's word on a Machine's state.
    pub(crate) fn observe(&self, org: &str, machine: &str, state: MachineState, share: Share) {
        let Ok(mut table) = self.state.lock() else {
            return;
        };
        let running = state == MachineState::Started;
        if running && !table.machines.contains_key(machine) {
            table.machines.insert(
                machine.to_owned(),
                Entry {
                    org: org.to_owned(),
                    share,
                    running: false,
                    reservations: 0,
                },
            );
        }
        table.change(machine, |entry| {
            entry.running = running;
            entry.share = share;
        });
    }

    /// The worker last said the Machine is started (as far as this process heard).
    pub(crate) fn running(&self, machine: &str) -> bool {
        self.state.lock().is_ok_and(|table| {
            table
                .machines
                .get(machine)
                .is_some_and(|entry| entry.running)
        })
    }

    pub(crate) fn of_org(&self, org: &str) -> OrgUsage {
        let totals = self
            .state
            .lock()
            .ok()
            .and_then(|state| state.totals.get(org).copied())
            .unwrap_or_default();
        OrgUsage {
            machines: 0,
            started_machines: totals.started,
            cpus: totals.cpus,
            memory_mb: totals.memory_mb,
            volumes: 0,
            volume_gb: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(started: u64) -> Quotas {
        Quotas {
            max_machines: 100,
            max_started_machines: started,
            max_cpus: 8,
            max_memory_mb: 1024,
            max_image_storage_mb: 1024,
            max_volumes: 10,
            max_volume_gb: 10,
        }
    }

    #[test]
    fn limits_outside_their_ranges_are_refused_with_the_field() {
        let with = |quotas: serde_json::Value| -> SetOrgLimitsRequest {
            serde_json::from_value(serde_json::json!({ "quotas": quotas })).expect("parses")
        };
        for (quotas, field) in [
            (
                serde_json::json!({"max_machines": 9_223_372_036_854_775_808u64}),
                "quotas.max_machines",
            ),
            (
                serde_json::json!({"max_started_machines": MAX_MACHINES + 1}),
                "quotas.max_started_machines",
            ),
            (
                serde_json::json!({"max_cpus": MAX_CPUS + 1}),
                "quotas.max_cpus",
            ),
            (
                serde_json::json!({"max_memory_mb": u64::MAX}),
                "quotas.max_memory_mb",
            ),
        ] {
            let error = validate_limits(&with(quotas)).expect_err(field);
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert_eq!(error.body.error, "invalid_config");
            assert_eq!(error.body.field.as_deref(), Some(field));
        }
        let mut burst = SetOrgLimitsRequest::default();
        burst.rate_limits.exec = Some(RateLimit {
            per_second: 1.0,
            burst: MAX_BURST + 1,
        });
        let error = validate_limits(&burst).expect_err("burst");
        assert_eq!(error.body.field.as_deref(), Some("rate_limits.exec.burst"));
        let mut rate = SetOrgLimitsRequest::default();
        rate.rate_limits.read = Some(RateLimit {
            per_second: f64::NAN,
            burst: 1,
        });
        let error = validate_limits(&rate).expect_err("rate");
        assert_eq!(
            error.body.field.as_deref(),
            Some("rate_limits.read.per_second")
        );
        // The bounds themselves, and zero quotas (a frozen org), are fine.
        validate_limits(&with(serde_json::json!({
            "max_machines": MAX_MACHINES,
            "max_started_machines": 0,
            "max_cpus": MAX_CPUS,
            "max_memory_mb": MAX_MEMORY_MB,
        })))
        .expect("in range");
    }

    #[test]
    fn reservations_count_until_released_or_confirmed() {
        let usage = Arc::new(Usage::default());
        let share = Share {
            cpus: 1,
            memory_mb: 256,
        };
        let first = usage.reserve("o", "m1", share, &quotas(1)).expect("room");
        let refused = usage
            .reserve("o", "m2", share, &quotas(1))
            .err()
            .expect("full");
        assert_eq!(refused.body.quota.as_deref(), Some("max_started_machines"));
        assert_eq!(
            (refused.body.limit, refused.body.current),
            (Some(1), Some(1))
        );
        // Starting the same Machine again is no new use.
        drop(
            usage
                .reserve("o", "m1", share, &quotas(1))
                .expect("same machine"),
        );
        usage.observe("o", "m1", MachineState::Started, share);
        drop(first);
        assert_eq!(usage.of_org("o").started_machines, 1);
        usage.observe("o", "m1", MachineState::Stopped, share);
        assert_eq!(usage.of_org("o").started_machines, 0);
        let big = Share {
            cpus: 9,
            memory_mb: 16,
        };
        let refused = usage
            .reserve("o", "m2", big, &quotas(5))
            .err()
            .expect("cpus");
        assert_eq!(refused.body.quota.as_deref(), Some("max_cpus"));
        drop(usage.reserve("o", "m2", share, &quotas(5)).expect("room"));
        assert_eq!(usage.of_org("o"), OrgUsage::default());
    }
}
