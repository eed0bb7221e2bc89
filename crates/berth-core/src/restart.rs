//! The restart policy: whether an exit that nobody asked for leads to another boot, and
//! after how long. Backoff doubles from 1 s up to 60 s, so a crash-looping Machine costs
//! the host almost nothing.

use std::time::Duration;

use berth_api::{RestartConfig, RestartPolicy};

/// Retries allowed under `on-failure` when the config names none (Fly's default).
pub const DEFAULT_MAX_RETRIES: u32 = 10;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Boot again after this delay.
    RestartAfter(Duration),
    /// Stay stopped.
    StayStopped,
    /// Stay stopped because the retries ran out.
    RetriesExhausted,
}

/// Decides what follows an exit the user did not ask for. `restarts_so_far` counts the
/// restarts since the user last started the Machine.
pub fn decide(
    config: &RestartConfig,
    exit_code: Option<i32>,
    restarts_so_far: u32,
) -> RestartDecision {
    let failed = exit_code != Some(0);
    match config.policy {
        RestartPolicy::No => RestartDecision::StayStopped,
        RestartPolicy::OnFailure if !failed => RestartDecision::StayStopped,
        RestartPolicy::OnFailure => {
            let limit = config.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
            if restarts_so_far >= limit {
                RestartDecision::RetriesExhausted
            } else {
                RestartDecision::RestartAfter(backoff(restarts_so_far))
            }
        }
        RestartPolicy::Always => match config.max_retries {
            Some(limit) if restarts_so_far >= limit => RestartDecision::RetriesExhausted,
            _ => RestartDecision::RestartAfter(backoff(restarts_so_far)),
        },
    }
}

/// 1 s, 2 s, 4 s, … capped at 60 s.
pub fn backoff(restarts_so_far: u32) -> Duration {
    let factor = 1u32
        .checked_shl(restarts_so_far.min(16))
        .unwrap_or(u32::MAX);
    FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(policy: RestartPolicy, max_retries: Option<u32>) -> RestartConfig {
        RestartConfig {
            policy,
            max_retries,
        }
    }

    #[test]
    fn no_never_restarts() {
        assert_eq!(
            decide(&config(RestartPolicy::No, None), Some(1), 0),
            RestartDecision::StayStopped
        );
    }

    #[test]
    fn on_failure_restarts_failures_until_the_limit() {
        let policy = config(RestartPolicy::OnFailure, Some(2));
        assert_eq!(decide(&policy, Some(0), 0), RestartDecision::StayStopped);
        assert_eq!(
            decide(&policy, Some(1), 0),
            RestartDecision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&policy, None, 1),
            RestartDecision::RestartAfter(Duration::from_secs(2))
        );
        assert_eq!(
            decide(&policy, Some(1), 2),
            RestartDecision::RetriesExhausted
        );
    }

    #[test]
    fn always_restarts_clean_exits_too() {
        let policy = config(RestartPolicy::Always, None);
        assert!(matches!(
            decide(&policy, Some(0), 50),
            RestartDecision::RestartAfter(_)
        ));
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(10), Duration::from_secs(60));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
    }
}
