//! Opt-in host settings for a host that runs Berth and little else.

use anyhow::{Context, Result};

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// `--expedite-rcu`: makes the kernel's RCU grace periods expedited, host-wide. Each start
/// moves init into the Machine's cgroup v1 hierarchies, and that move waits for a grace
/// period; on a busy host a normal one takes up to tens of milliseconds, which is start's
/// p99 (docs/PERFORMANCE.md). Expedited ones finish in microseconds, at the price of an
/// interrupt on every CPU for each, so it is the operator's choice, and stays set after
/// Berth exits.
pub fn expedite_rcu() -> Result<()> {
    let before =
        std::fs::read_to_string(RCU_EXPEDITED).with_context(|| format!("read {RCU_EXPEDITED}"))?;
    if before.trim() != "1" {
        std::fs::write(RCU_EXPEDITED, "1").with_context(|| format!("write {RCU_EXPEDITED}"))?;
        tracing::info!("set {RCU_EXPEDITED} to 1 (was {})", before.trim());
    }
    Ok(())
}
