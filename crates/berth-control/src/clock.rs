//! The control plane's clock: wall time for what clients see (lease expiry, token
//! expiry), a monotonic reading for the rate limiters. Tests swap in a manual clock and
//! move it by hand, so time-based rules are checked without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ApiClock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
enum Inner {
    System { started: Instant },
    Manual { start_ms: i64, now_ms: AtomicI64 },
}

impl Default for ApiClock {
    fn default() -> Self {
        ApiClock::system()
    }
}

impl ApiClock {
    pub fn system() -> ApiClock {
        ApiClock {
            inner: Arc::new(Inner::System {
                started: Instant::now(),
            }),
        }
    }

    /// A clock that stands still until [`ApiClock::advance`] moves it.
    pub fn manual() -> ApiClock {
        let now = system_now_ms();
        ApiClock {
            inner: Arc::new(Inner::Manual {
                start_ms: now,
                now_ms: AtomicI64::new(now),
            }),
        }
    }

    /// Moves a manual clock forward; a system clock ignores it.
    pub fn advance(&self, by: Duration) {
        if let Inner::Manual { now_ms, .. } = &*self.inner {
            let millis = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            now_ms.fetch_add(millis, Ordering::SeqCst);
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &*self.inner {
            Inner::System { .. } => system_now_ms(),
            Inner::Manual { now_ms, .. } => now_ms.load(Ordering::SeqCst),
        }
    }

    /// Monotonic time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        match &*self.inner {
            Inner::System { started } => started.elapsed(),
            Inner::Manual { start_ms, now_ms } => Duration::from_millis(
                u64::try_from(now_ms.load(Ordering::SeqCst) - start_ms).unwrap_or(0),
            ),
        }
    }
}

impl governor::clock::Clock for ApiClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.elapsed()
    }
}

fn system_now_ms() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}
