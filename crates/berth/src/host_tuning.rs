//! Kernel settings a worker host runs Berth better with, set by `berth up` and
//! `berth agent` unless told not to (as kubelet tunes the kernel settings it relies on).

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// Makes the kernel's RCU grace periods expedited, host-wide. Each start moves init into
/// the Machine's cgroup v1 hierarchies, and that move waits for a grace period: a normal
/// one takes several scheduler ticks, which made a start 15-30 ms instead of ~5
/// (docs/PERFORMANCE.md). Expedited ones finish in microseconds, at the price of an
/// interrupt on every CPU for each. It stays set after Berth exits; `--no-expedite-rcu`
/// leaves the host alone. A host where it cannot be set (no such file, read-only sysfs)
/// runs Berth all the same, with a warning.
pub fn expedite_rcu() {
    match std::fs::read_to_string(RCU_EXPEDITED) {
        Ok(before) if before.trim() == "1" => {}
        Ok(before) => match std::fs::write(RCU_EXPEDITED, "1") {
            Ok(()) => tracing::info!(
                "set {RCU_EXPEDITED} to 1 (was {}); --no-expedite-rcu leaves it alone",
                before.trim()
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot set {RCU_EXPEDITED}; starts will be slower")
            }
        },
        Err(error) => tracing::warn!(%error, "cannot read {RCU_EXPEDITED}; starts may be slower"),
    }
}
