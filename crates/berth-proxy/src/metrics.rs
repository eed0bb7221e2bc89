//! The proxy's Prometheus metrics, served as text at `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WakeLabels {
    /// `ok` or the failure's code.
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MachineLabels {
    pub app: String,
    pub machine: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<StatusLabels, Counter>,
    pub wakes: Family<WakeLabels, Counter>,
    pub wake_seconds: Histogram,
    pub autostops: Counter,
    pub in_flight: Family<MachineLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth_proxy");
        let requests = Family::<StatusLabels, Counter>::default();
        registry.register("requests", "Requests answered, by status", requests.clone());
        let wakes = Family::<WakeLabels, Counter>::default();
        registry.register(
            "wakes",
            "Machine starts the proxy made for requests, by result",
            wakes.clone(),
        );
        // 2 ms to about 16 s.
        let wake_seconds = Histogram::new(exponential_buckets(0.002, 2.0, 14));
        registry.register(
            "wake_seconds",
            "From the start call to the Machine's port accepting",
            wake_seconds.clone(),
        );
        let autostops = Counter::default();
        registry.register(
            "autostops",
            "Idle Machines the proxy stopped",
            autostops.clone(),
        );
        let in_flight = Family::<MachineLabels, Gauge>::default();
        registry.register(
            "in_flight",
            "Requests and upgraded connections open, per Machine",
            in_flight.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            requests,
            wakes,
            wake_seconds,
            autostops,
            in_flight,
        }
    }

    pub fn wake_finished(&self, result: &str, took: Duration) {
        self.wakes
            .get_or_create(&WakeLabels {
                result: result.to_owned(),
            })
            .inc();
        if result == "ok" {
            self.wake_seconds.observe(took.as_secs_f64());
        }
    }

    pub fn in_flight_of(&self, app: &str, machine: &str) -> Gauge {
        self.in_flight
            .get_or_create(&MachineLabels {
                app: app.to_owned(),
                machine: machine.to_owned(),
            })
            .clone()
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = match self.registry.lock() {
            Ok(registry) => registry,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::warn!(%error, "encoding metrics");
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
