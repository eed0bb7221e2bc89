//! The proxy's view of each app's Machines: picking one for a request (least outstanding
//! requests, soft and hard limits), waking one (one start per app at a time), and
//! stopping idle ones. All timing uses tokio time, so tests run it on paused time.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::StatusCode;
use berth_api::{AutostopMode, MachineState};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::platform::{MachineView, Platform, PlatformError};
use crate::ProxyConfig;

/// Unknown hosts are remembered for this long, so garbage costs no API call each.
const MISSING_TTL: Duration = Duration::from_millis(200);
const MAX_MISSING: usize = 10_000;
/// The youngest view worth reading again before answering that no Machine can serve.
const RECHECK_FLOOR: Duration = Duration::from_millis(200);
/// How long a Machine seen started but refusing is waited for before the app's Machines
/// are read again (it may have moved).
const UNREACHABLE_RECHECK: Duration = Duration::from_millis(500);
/// How often a waking Machine's port is tried.
const PORT_POLL: Duration = Duration::from_millis(2);
/// How many apps discovery reads at once.
const DISCOVERY_CONCURRENCY: usize = 8;

/// Returns once `address` accepts a connection; the caller bounds the wait.
async fn port_open(address: SocketAddr) {
    while tokio::net::TcpStream::connect(address).await.is_err() {
        tokio::time::sleep(PORT_POLL).await;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WakeFailure {
    pub code: String,
    pub message: String,
    pub retry_after: Duration,
}

impl From<WakeFailure> for ProxyError {
    fn from(failure: WakeFailure) -> ProxyError {
        ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            &failure.code,
            failure.message,
        )
        .retry_after(failure.retry_after)
    }
}

impl From<PlatformError> for WakeFailure {
    fn from(error: PlatformError) -> WakeFailure {
        WakeFailure {
            retry_after: error.retry_after.unwrap_or(Duration::from_secs(1)),
            code: error.code,
            message: error.message,
        }
    }
}

type SharedWake = Shared<BoxFuture<'static, Result<(), WakeFailure>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    Waking,
    Stopping,
}

/// How a usable Machine ranks for the next request, lowest first: failing readiness
/// checks, then tickets held.
type Rank = (bool, u32);

struct Slot {
    view: MachineView,
    in_flight: u32,
    idle_since: Instant,
    /// A start or stop the proxy itself has under way; the API's state is not trusted
    /// until it ends.
    transition: Option<Transition>,
    /// When the proxy's own last start or stop of it ended: a list asked for before then
    /// is older news about its state.
    settled_at: Option<Instant>,
    /// When the proxy first saw it started by someone else (the API): its server may
    /// still be coming up, so a refused connection then means "wait", not "gone".
    seen_started_at: Option<Instant>,
    /// Refused a connection: no traffic until then.
    unreachable_until: Option<Instant>,
    gauge: Gauge,
}

impl Slot {
    fn usable(&self, now: Instant) -> Option<(SocketAddr, u32, u32)> {
        let service = self.view.service.as_ref()?;
        let address = self.view.address?;
        let ready = self.view.state == MachineState::Started
            && !self.view.cordoned
            && self.transition.is_none()
            && self.unreachable_until.is_none_or(|until| until <= now);
        ready.then(|| {
            (
                SocketAddr::new(address, service.internal_port),
                service.concurrency.soft_limit,
                service.concurrency.hard_limit,
            )
        })
    }

    fn wakeable(&self) -> bool {
        self.transition.is_none()
            && !self.view.cordoned
            && matches!(
                self.view.state,
                MachineState::Stopped | MachineState::Created
            )
            && self.view.address.is_some()
            && self
                .view
                .service
                .as_ref()
                .is_some_and(|service| service.autostart)
    }

    fn autostartable(&self) -> bool {
        !self.view.cordoned
            && self
                .view
                .service
                .as_ref()
                .is_some_and(|service| service.autostart)
    }
}

struct AppInner {
    slots: BTreeMap<String, Slot>,
    refreshed_at: Option<Instant>,
    wake: Option<SharedWake>,
}

pub(crate) struct AppState {
    name: String,
    inner: Mutex<AppInner>,
    /// Rung when room may have appeared: a request ended, a wake or a stop finished.
    capacity: Notify,
    /// Rung when a Machine's traffic or state changed, for the autostop timer.
    activity: Notify,
    refreshing: AtomicBool,
    closed: AtomicBool,
}

impl AppState {
    fn lock(&self) -> MutexGuard<'_, AppInner> {
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn rung(&self) {
        self.capacity.notify_waiters();
        self.activity.notify_waiters();
    }
}

/// A request's place on one Machine. While it lives, the Machine counts the request as
/// in flight (and is not idle); it lives until the response body ends or an upgraded
/// connection closes.
pub(crate) struct Ticket {
    app: Arc<AppState>,
    machine: String,
    pub address: SocketAddr,
    backoff: Duration,
}

impl Ticket {
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The Machine refused the connection: keep traffic away for a while and look again.
    pub fn unreachable(&self) {
        let mut inner = self.app.lock();
        if let Some(slot) = inner.slots.get_mut(&self.machine) {
            slot.unreachable_until = Some(Instant::now() + self.backoff);
        }
        inner.refreshed_at = None;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.app.lock();
        if let Some(slot) = inner.slots.get_mut(&self.machine) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
            slot.gauge.dec();
            if slot.in_flight == 0 {
                slot.idle_since = Instant::now();
            }
        }
        drop(inner);
        self.app.rung();
    }
}

enum Pick {
    Go(Ticket, bool),
    Wake,
    Full,
    /// A Machine is stopping or starting: look again when it has.
    Settling,
    Unreachable(String),
    Nothing,
}

pub(crate) struct Fleet {
    platform: Arc<dyn Platform>,
    config: ProxyConfig,
    pub metrics: Arc<Metrics>,
    apps: Mutex<HashMap<String, Arc<AppState>>>,
    missing: Mutex<HashMap<String, Instant>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Fleet {
    pub fn new(platform: Arc<dyn Platform>, config: ProxyConfig, metrics: Arc<Metrics>) -> Fleet {
        Fleet {
            platform,
            config,
            metrics,
            apps: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    #[cfg(test)]
    pub fn knows(&self, app: &str) -> bool {
        locked(&self.apps).contains_key(app)
    }

    /// The app's state, loading it from the platform the first time.
    async fn app(self: &Arc<Self>, name: &str) -> Result<Arc<AppState>, ProxyError> {
        if let Some(app) = locked(&self.apps).get(name) {
            return Ok(app.clone());
        }
        let now = Instant::now();
        if locked(&self.missing)
            .get(name)
            .is_some_and(|at| now.duration_since(*at) < MISSING_TTL)
        {
            return Err(ProxyError::unknown_app(name));
        }
        let Some(views) = self.platform.machines(name).await.map_err(platform_down)? else {
            let mut missing = locked(&self.missing);
            if missing.len() >= MAX_MISSING {
                missing.clear();
            }
            missing.insert(name.to_owned(), now);
            return Err(ProxyError::unknown_app(name));
        };
        let mut apps = locked(&self.apps);
        if let Some(app) = apps.get(name) {
            return Ok(app.clone());
        }
        let app = Arc::new(AppState {
            name: name.to_owned(),
            inner: Mutex::new(AppInner {
                slots: BTreeMap::new(),
                refreshed_at: None,
                wake: None,
            }),
            capacity: Notify::new(),
            activity: Notify::new(),
            refreshing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        self.merge(&app, views, now);
        apps.insert(name.to_owned(), app.clone());
        drop(apps);
        tokio::spawn(autostop_loop(Arc::downgrade(self), app.clone()));
        Ok(app)
    }

    /// Takes the platform's list (asked for at `asked_at`) as the truth, except for
    /// Machines the proxy is starting or stopping itself, or finished starting or stopping
    /// after the list was asked for.
    fn merge(&self, app: &AppState, views: Vec<MachineView>, asked_at: Instant) {
        let now = Instant::now();
        let mut inner = app.lock();
        inner
            .slots
            .retain(|id, _| views.iter().any(|view| &view.id == id));
        for view in views {
            match inner.slots.get_mut(&view.id) {
                Some(slot) => {
                    // A mark is for the address that refused: a Machine found at another
                    // (moved to another worker) is tried there at once.
                    let port = |view: &MachineView| {
                        view.service.as_ref().map(|service| service.internal_port)
                    };
                    if slot.view.address != view.address || port(&slot.view) != port(&view) {
                        slot.unreachable_until = None;
                    }
                    let newer_here = slot.settled_at.is_some_and(|at| at > asked_at);
                    if slot.transition.is_none() && !newer_here {
                        if slot.view.state != MachineState::Started
                            && view.state == MachineState::Started
                        {
                            slot.idle_since = now;
                            slot.seen_started_at = Some(now);
                        }
                        slot.view = view;
                    } else {
                        slot.view.service = view.service;
                        slot.view.address = view.address;
                    }
                }
                None => {
                    let gauge = self.metrics.in_flight_of(&app.name, &view.id);
                    // Started a moment ago (by the API, say): its server may still be coming
                    // up. One that has run for longer, or for an unknown time, is not.
                    let seen_started_at = match view.changed_ago {
                        Some(ago) if view.state == MachineState::Started => now.checked_sub(ago),
                        _ => None,
                    };
                    inner.slots.insert(
                        view.id.clone(),
                        Slot {
                            view,
                            in_flight: 0,
                            idle_since: now,
                            transition: None,
                            settled_at: None,
                            seen_started_at,
                            unreachable_until: None,
                            gauge,
                        },
                    );
                }
            }
        }
        inner.refreshed_at = Some(now);
        drop(inner);
        app.rung();
    }

    async fn refresh(&self, app: &Arc<AppState>) -> Result<(), ProxyError> {
        let asked_at = Instant::now();
        match self
            .platform
            .machines(&app.name)
            .await
            .map_err(platform_down)?
        {
            Some(views) => {
                self.merge(app, views, asked_at);
                Ok(())
            }
            None => {
                self.forget(app);
                Err(ProxyError::unknown_app(&app.name))
            }
        }
    }

    fn forget(&self, app: &Arc<AppState>) {
        locked(&self.apps).remove(&app.name);
        app.closed.store(true, Ordering::SeqCst);
        app.rung();
    }

    fn refresh_in_background(self: &Arc<Self>, app: &Arc<AppState>) {
        if app.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let fleet = self.clone();
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(error) = fleet.refresh(&app).await {
                tracing::debug!(app = %app.name, error = %error.message, "refreshing the app's Machines");
            }
            app.refreshing.store(false, Ordering::SeqCst);
        });
    }

    fn pick(&self, app: &Arc<AppState>, now: Instant) -> Pick {
        let mut inner = app.lock();
        let waking = inner.wake.is_some();
        let wakeable = inner.slots.values().any(Slot::wakeable);
        // Machines whose readiness checks pass first, then the fewest tickets.
        let mut best: Option<(&String, Rank, SocketAddr, u32, u32)> = None;
        for (id, slot) in &inner.slots {
            if let Some((address, soft, hard)) = slot.usable(now) {
                let rank = (slot.view.failing_checks, slot.in_flight);
                if best.is_none_or(|(_, best_rank, ..)| rank < best_rank) {
                    best = Some((id, rank, address, soft, hard));
                }
            }
        }
        let Some((id, (_, in_flight), address, soft, hard)) = best else {
            if wakeable || waking {
                return Pick::Wake;
            }
            // On its way down (to be woken after) or up (started by someone else: the API,
            // a move's commit): wait for it to arrive.
            let settling = inner.slots.values().any(|slot| {
                slot.autostartable()
                    && (slot.transition == Some(Transition::Stopping)
                        || matches!(
                            slot.view.state,
                            MachineState::Stopping | MachineState::Starting
                        ))
            });
            if settling {
                return Pick::Settling;
            }
            return match inner.slots.iter().find(|(_, slot)| {
                slot.view.state == MachineState::Started && slot.unreachable_until.is_some()
            }) {
                Some((id, _)) => Pick::Unreachable(id.clone()),
                None => Pick::Nothing,
            };
        };
        if in_flight >= hard {
            return if wakeable || waking {
                Pick::Wake
            } else {
                Pick::Full
            };
        }
        let wake_more = in_flight >= soft && wakeable && !waking;
        let id = id.clone();
        if let Some(slot) = inner.slots.get_mut(&id) {
            slot.in_flight += 1;
            slot.gauge.inc();
        }
        Pick::Go(
            Ticket {
                app: app.clone(),
                machine: id,
                address,
                backoff: self.config.unreachable_backoff,
            },
            wake_more,
        )
    }

    /// A place on one of the app's Machines, waking one if none has room.
    pub async fn admit(self: &Arc<Self>, app_name: &str) -> Result<Ticket, ProxyError> {
        let app = self.app(app_name).await?;
        let began = Instant::now();
        let wake_deadline = began + self.config.wake_timeout;
        let mut full_since: Option<Instant> = None;
        let mut refreshed = false;
        loop {
            let now = Instant::now();
            let room = app.capacity.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let refreshed_at = app.lock().refreshed_at;
            let older_than =
                |age: Duration| refreshed_at.is_none_or(|at| now.duration_since(at) >= age);
            let stale = older_than(self.config.view_ttl);
            let pick = self.pick(&app, now);
            // Nothing to send to may only mean the view predates a Machine just created or
            // started by someone else: look again before refusing (a short floor keeps a
            // storm at an empty app from becoming a storm at the API).
            let worth_refreshing = match &pick {
                Pick::Nothing | Pick::Unreachable(_) | Pick::Settling => older_than(RECHECK_FLOOR),
                _ => stale,
            };
            match pick {
                Pick::Go(ticket, wake_more) => {
                    if wake_more {
                        drop(self.wake(&app));
                    }
                    if stale {
                        self.refresh_in_background(&app);
                    }
                    return Ok(ticket);
                }
                _ if worth_refreshing && !refreshed => {
                    refreshed = true;
                    self.refresh(&app).await?;
                }
                Pick::Wake => {
                    let wake = self.wake(&app);
                    match tokio::time::timeout_at(wake_deadline, wake).await {
                        Err(_) => return Err(ProxyError::wake_timeout(self.config.wake_timeout)),
                        Ok(Err(failure)) => return Err(failure.into()),
                        Ok(Ok(())) => {}
                    }
                }
                Pick::Full => {
                    let since = *full_since.get_or_insert(now);
                    let give_up = since + self.config.queue_timeout;
                    if now >= give_up || tokio::time::timeout_at(give_up, room).await.is_err() {
                        return Err(ProxyError::over_capacity());
                    }
                }
                Pick::Settling => {
                    // In slices: only the proxy's own stops ring `room`; a start by someone
                    // else, or a move, shows only in the app's Machines read again.
                    let slice = (Instant::now() + RECHECK_FLOOR).min(wake_deadline);
                    if tokio::time::timeout_at(slice, room).await.is_err() {
                        refreshed = false;
                    }
                }
                Pick::Unreachable(machine) => {
                    // Started through the API a moment ago: its server is still coming up.
                    // Wait for its port as a wake would, within the same deadline.
                    let Some(address) = self.coming_up(&app, &machine, now) else {
                        return Err(ProxyError::machine_unreachable(&machine));
                    };
                    // In slices, looking at the app again between them: a Machine that
                    // moved meanwhile answers at its new address, never at this one.
                    let slice = (Instant::now() + UNREACHABLE_RECHECK).min(wake_deadline);
                    if tokio::time::timeout_at(slice, port_open(address))
                        .await
                        .is_ok()
                    {
                        if let Some(slot) = app.lock().slots.get_mut(&machine) {
                            slot.unreachable_until = None;
                        }
                    } else {
                        refreshed = false;
                    }
                }
                Pick::Nothing => return Err(ProxyError::no_machine_available()),
            }
            if Instant::now() >= wake_deadline {
                return Err(ProxyError::wake_timeout(self.config.wake_timeout));
            }
        }
    }

    /// The address of a Machine that refused a connection within the wake timeout of
    /// being seen started by someone else: one whose server may still be starting.
    fn coming_up(&self, app: &AppState, machine: &str, now: Instant) -> Option<SocketAddr> {
        let inner = app.lock();
        let slot = inner.slots.get(machine)?;
        let seen = slot.seen_started_at?;
        if now.duration_since(seen) >= self.config.wake_timeout {
            return None;
        }
        let port = slot.view.service.as_ref()?.internal_port;
        Some(SocketAddr::new(slot.view.address?, port))
    }

    /// The app's one wake under way, or a new one. The start runs in its own task so a
    /// client that leaves does not cancel it for the others.
    fn wake(self: &Arc<Self>, app: &Arc<AppState>) -> SharedWake {
        let mut inner = app.lock();
        if let Some(wake) = &inner.wake {
            return wake.clone();
        }
        let task = tokio::spawn(wake_task(self.clone(), app.clone()));
        let wake = async move {
            task.await.unwrap_or_else(|_| {
                Err(WakeFailure {
                    code: "internal".into(),
                    message: "the wake task ended abnormally".into(),
                    retry_after: Duration::from_secs(1),
                })
            })
        }
        .boxed()
        .shared();
        inner.wake = Some(wake.clone());
        wake
    }

    async fn wake_one(&self, app: &Arc<AppState>) -> Result<(), WakeFailure> {
        let id = {
            let mut inner = app.lock();
            let Some((id, slot)) = inner.slots.iter_mut().find(|(_, slot)| slot.wakeable()) else {
                return Err(WakeFailure {
                    code: "no_machine_available".into(),
                    message: "the app has no stopped Machine with autostart".into(),
                    retry_after: Duration::from_secs(5),
                });
            };
            slot.transition = Some(Transition::Waking);
            id.clone()
        };
        if let Err(error) = self.platform.start(&app.name, &id).await {
            let mut inner = app.lock();
            if let Some(slot) = inner.slots.get_mut(&id) {
                slot.transition = None;
            }
            inner.refreshed_at = None;
            return Err(error.into());
        }
        // The start may have waited for a move to another worker: the address is the one
        // the platform gives now, read again between slices while the port stays shut.
        loop {
            let address = {
                let inner = app.lock();
                let Some(slot) = inner.slots.get(&id) else {
                    break;
                };
                let port = slot
                    .view
                    .service
                    .as_ref()
                    .map_or(0, |service| service.internal_port);
                let ip = slot
                    .view
                    .address
                    .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
                SocketAddr::new(ip, port)
            };
            if tokio::time::timeout(UNREACHABLE_RECHECK, port_open(address))
                .await
                .is_ok()
            {
                break;
            }
            if let Err(error) = self.refresh(app).await {
                tracing::debug!(app = %app.name, error = %error.message, "reading a waking Machine's address");
            }
        }
        let mut inner = app.lock();
        if let Some(slot) = inner.slots.get_mut(&id) {
            slot.transition = None;
            slot.view.state = MachineState::Started;
            slot.idle_since = Instant::now();
            slot.settled_at = Some(slot.idle_since);
            slot.unreachable_until = None;
        }
        Ok(())
    }

    async fn stop_idle(self: Arc<Self>, app: Arc<AppState>, id: String) {
        let result = self.platform.stop(&app.name, &id).await;
        let mut inner = app.lock();
        if let Some(slot) = inner.slots.get_mut(&id) {
            slot.transition = None;
            match &result {
                Ok(()) => {
                    slot.view.state = MachineState::Stopped;
                    slot.settled_at = Some(Instant::now());
                }
                // Try again after another idle period.
                Err(_) => slot.idle_since = Instant::now(),
            }
        }
        if result.is_err() {
            inner.refreshed_at = None;
        }
        drop(inner);
        match result {
            Ok(()) => {
                self.metrics.autostops.inc();
                tracing::info!(app = %app.name, machine = %id, "stopped an idle Machine");
            }
            Err(error) => {
                tracing::warn!(app = %app.name, machine = %id, %error, "autostop failed");
            }
        }
        app.rung();
    }

    /// Reads the platform's apps and their Machines, so that idle timers and
    /// `min_machines_running` also apply to Machines no request has gone to (started
    /// through the API, or before the proxy). An app gone from the list is read once more
    /// and forgotten when that confirms it.
    pub async fn discover(self: &Arc<Self>) -> Result<(), PlatformError> {
        let names = self.platform.apps().await?;
        let now = Instant::now();
        let known: Vec<Arc<AppState>> = locked(&self.apps).values().cloned().collect();
        let stale: Vec<Arc<AppState>> = known
            .into_iter()
            .filter(|app| {
                !names.contains(&app.name)
                    || app
                        .lock()
                        .refreshed_at
                        .is_none_or(|at| now.duration_since(at) >= self.config.view_ttl)
            })
            .collect();
        let new: Vec<String> = {
            let apps = locked(&self.apps);
            names
                .into_iter()
                .filter(|name| !apps.contains_key(name))
                .collect()
        };
        let mut jobs: Vec<BoxFuture<'static, Result<(), (String, ProxyError)>>> = Vec::new();
        for app in stale {
            let fleet = self.clone();
            jobs.push(
                async move {
                    let result = fleet.refresh(&app).await;
                    result.map_err(|error| (app.name.clone(), error))
                }
                .boxed(),
            );
        }
        for name in new {
            let fleet = self.clone();
            jobs.push(
                async move {
                    let result = fleet.app(&name).await.map(drop);
                    result.map_err(|error| (name, error))
                }
                .boxed(),
            );
        }
        let results: Vec<_> = futures::stream::iter(jobs)
            .buffer_unordered(DISCOVERY_CONCURRENCY)
            .collect()
            .await;
        for (app, error) in results.into_iter().filter_map(Result::err) {
            tracing::debug!(%app, error = %error.message, "discovering the app's Machines");
        }
        Ok(())
    }

    /// Machines to stop now, and when to look next.
    fn autostop_plan(&self, app: &AppState, now: Instant) -> (Vec<String>, Option<Instant>) {
        let mut inner = app.lock();
        let mut running = inner
            .slots
            .values()
            .filter(|slot| slot.view.state == MachineState::Started && slot.transition.is_none())
            .count();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, slot) in inner.slots.iter_mut() {
            let Some(service) = &slot.view.service else {
                continue;
            };
            if service.autostop != AutostopMode::Stop
                || slot.view.state != MachineState::Started
                || slot.transition.is_some()
                || slot.in_flight > 0
            {
                continue;
            }
            let deadline =
                slot.idle_since + Duration::from_secs(u64::from(service.autostop_idle_seconds));
            if deadline > now {
                next = Some(next.map_or(deadline, |next| next.min(deadline)));
            } else if running > service.min_machines_running as usize {
                slot.transition = Some(Transition::Stopping);
                running -= 1;
                due.push(id.clone());
            }
        }
        (due, next)
    }
}

fn platform_down(error: PlatformError) -> ProxyError {
    if error.code == "platform_unreachable" {
        ProxyError::new(StatusCode::BAD_GATEWAY, &error.code, error.message)
            .retry_after(error.retry_after.unwrap_or(Duration::from_secs(1)))
    } else {
        ProxyError::new(StatusCode::BAD_GATEWAY, "platform_error", error.to_string())
            .retry_after(Duration::from_secs(1))
    }
}

async fn wake_task(fleet: Arc<Fleet>, app: Arc<AppState>) -> Result<(), WakeFailure> {
    let began = Instant::now();
    let timeout = fleet.config.wake_timeout;
    let result = match tokio::time::timeout(timeout, fleet.wake_one(&app)).await {
        Ok(result) => result,
        Err(_) => {
            // Whatever was waking is the API's again to tell.
            let mut inner = app.lock();
            for slot in inner.slots.values_mut() {
                if slot.transition == Some(Transition::Waking) {
                    slot.transition = None;
                }
            }
            inner.refreshed_at = None;
            Err(WakeFailure {
                code: "wake_timeout".into(),
                message: format!(
                    "the Machine's port did not accept connections within {} ms",
                    timeout.as_millis()
                ),
                retry_after: Duration::from_secs(1),
            })
        }
    };
    let label = result.as_ref().map_or_else(|f| f.code.as_str(), |()| "ok");
    fleet.metrics.wake_finished(label, began.elapsed());
    match &result {
        Ok(()) => {
            tracing::info!(app = %app.name, took_ms = began.elapsed().as_millis() as u64, "woke a Machine")
        }
        Err(failure) => tracing::warn!(app = %app.name, code = %failure.code, "wake failed"),
    }
    app.lock().wake = None;
    app.rung();
    result
}

/// Stops each Machine whose idle time is up, at that moment, for as long as the app is
/// known. Wakes on every change of traffic or state to look again.
async fn autostop_loop(fleet: std::sync::Weak<Fleet>, app: Arc<AppState>) {
    loop {
        if app.closed.load(Ordering::SeqCst) {
            return;
        }
        let changed = app.activity.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let Some(strong) = fleet.upgrade() else {
            return;
        };
        let (due, next) = strong.autostop_plan(&app, Instant::now());
        for id in due {
            tokio::spawn(strong.clone().stop_idle(app.clone(), id));
        }
        drop(strong);
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut changed => {}
                }
            }
            None => changed.await,
        }
    }
}

/// Discovers the platform's apps every `interval` for as long as the fleet lives.
pub(crate) async fn discovery_loop(fleet: std::sync::Weak<Fleet>, interval: Duration) {
    loop {
        let Some(strong) = fleet.upgrade() else {
            return;
        };
        if let Err(error) = strong.discover().await {
            tracing::warn!(%error, "listing the platform's apps");
        }
        drop(strong);
        tokio::time::sleep(interval).await;
    }
}
