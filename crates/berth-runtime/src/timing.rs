//! Where an operation's time went: named steps in order, in microseconds. Start fills
//! one in on every call (a few `Instant::now()` reads), so the API can answer with a
//! `Server-Timing` header and the bench can break start down without a profiler.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One named step and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTime {
    pub step: String,
    pub us: u64,
}

/// Steps in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepTimes(Vec<StepTime>);

impl StepTimes {
    pub fn new() -> StepTimes {
        StepTimes::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn record(&mut self, step: impl Into<String>, us: u64) {
        self.0.push(StepTime {
            step: step.into(),
            us,
        });
    }

    /// Records the time since `mark` as `step` and moves `mark` to now.
    pub fn lap(&mut self, step: impl Into<String>, mark: &mut Instant) {
        let now = Instant::now();
        self.record(step, micros(now.duration_since(*mark)));
        *mark = now;
    }

    pub fn append(&mut self, other: StepTimes) {
        self.0.extend(other.0);
    }

    pub fn iter(&self) -> impl Iterator<Item = &StepTime> {
        self.0.iter()
    }

    pub fn total_us(&self) -> u64 {
        self.0.iter().map(|s| s.us).sum()
    }
}

impl IntoIterator for StepTimes {
    type Item = StepTime;
    type IntoIter = std::vec::IntoIter<StepTime>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Whole microseconds, saturating.
pub fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_are_recorded_in_order_and_move_the_mark() {
        let mut times = StepTimes::new();
        let mut mark = Instant::now();
        let first_mark = mark;
        times.lap("first", &mut mark);
        assert!(mark >= first_mark);
        times.record("second", 7);
        let names: Vec<_> = times.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
        assert_eq!(times.iter().nth(1).map(|s| s.us), Some(7));
        let json = serde_json::to_string(&times).expect("encode");
        assert!(json.starts_with("[{\"step\":\"first\""), "{json}");
        let back: StepTimes = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, times);
    }
}
