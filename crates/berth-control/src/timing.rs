//! The `Server-Timing` header of start: where one call's time went, from the moment the
//! router saw the request to the answer, with the worker's own steps in between. The
//! bench reads it to break start down; a client sees it as a standard header.

use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use berth_api::StepTiming;

pub(crate) static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// When the router first saw the request (after hyper parsed its head).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrived(pub Instant);

/// Middleware: stamps every request with its arrival.
pub(crate) async fn stamp_arrival(mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(Arrived(Instant::now()));
    next.run(request).await
}

/// Steps of one call, in order.
pub(crate) struct ServerTiming {
    started: Instant,
    mark: Instant,
    steps: Vec<StepTiming>,
}

impl ServerTiming {
    /// Starts at the request's arrival; the time until now is routing, auth and the body.
    pub(crate) fn since(arrived: Option<Instant>) -> ServerTiming {
        let now = Instant::now();
        let started = arrived.unwrap_or(now);
        let mut timing = ServerTiming {
            started,
            mark: started,
            steps: Vec::new(),
        };
        timing.lap("api_request");
        timing
    }

    pub(crate) fn lap(&mut self, step: &str) {
        let now = Instant::now();
        self.steps.push(StepTiming {
            step: step.to_owned(),
            us: micros(now.duration_since(self.mark)),
        });
        self.mark = now;
    }

    /// The worker's steps of a call that took from the last mark until now; what they do
    /// not account for is the hop to the worker and back.
    pub(crate) fn worker(&mut self, steps: Vec<StepTiming>) {
        let now = Instant::now();
        let call_us = micros(now.duration_since(self.mark));
        let inside_us: u64 = steps.iter().map(|s| s.us).sum();
        self.steps.push(StepTiming {
            step: "worker_hop".into(),
            us: call_us.saturating_sub(inside_us),
        });
        self.steps.extend(steps);
        self.mark = now;
    }

    /// `name;dur=ms` entries (the header's unit is milliseconds), then the total.
    pub(crate) fn header_value(&self) -> Option<HeaderValue> {
        let mut value: Vec<String> = self
            .steps
            .iter()
            .map(|s| format!("{};dur={:.3}", s.step, s.us as f64 / 1000.0))
            .collect();
        let total_us = micros(self.mark.duration_since(self.started));
        value.push(format!("total;dur={:.3}", total_us as f64 / 1000.0));
        HeaderValue::from_str(&value.join(", ")).ok()
    }
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_steps_in_order_then_the_total() {
        let mut timing = ServerTiming::since(None);
        timing.lap("api_prologue");
        timing.worker(vec![StepTiming {
            step: "agent_lock_load".into(),
            us: 0,
        }]);
        let value = timing.header_value().expect("valid header");
        let text = value.to_str().expect("ascii");
        let names: Vec<&str> = text
            .split(", ")
            .map(|entry| entry.split(';').next().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "api_request",
                "api_prologue",
                "worker_hop",
                "agent_lock_load",
                "total"
            ]
        );
        assert!(text.contains("agent_lock_load;dur=0.000"), "{text}");
    }
}
