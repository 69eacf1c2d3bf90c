//! Deadlines of the data plane, as PyTorch's NCCL watchdog: a collective or transfer that makes
//! no progress within `cluster.collective_timeout_secs` (plus one second per 10 MB it moves)
//! is this worker's failure, naming the collective and the peer. Heartbeats only prove that a
//! peer's process is alive; this catches one that is alive but stalled inside a collective.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Bandwidth every transfer is granted on top of the base deadline: far below any real link,
/// so a large buffer is never cut off for its size alone.
const MIN_BYTES_PER_SEC: f64 = 10e6;

#[derive(Debug, Clone, Copy)]
pub struct Watchdog {
    base: Duration,
}

impl Watchdog {
    /// `secs` from the config (checked there: finite and bounded).
    pub fn new(secs: f64) -> Self {
        Self {
            base: Duration::from_secs_f64(secs),
        }
    }

    /// How long an operation moving `bytes` may wait.
    pub fn deadline(&self, bytes: usize) -> Duration {
        self.base + Duration::from_secs_f64(bytes as f64 / MIN_BYTES_PER_SEC)
    }
}

/// The environment variable of the fault the watchdog's test injects: `all-reduce:N` makes this
/// process's N-th all-reduce (counted from 1) stall forever while its heartbeats go on.
pub const STALL_FAULT: &str = "FSMERGE_FAULT_STALL";

/// Stall here if `STALL_FAULT` names this `op` and its count has come; a no-op otherwise.
pub fn stall_if_injected(op: &str) {
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let v = std::env::var(STALL_FAULT).ok()?;
        let (op, n) = v.rsplit_once(':')?;
        Some((op.to_string(), n.parse().ok()?))
    });
    let Some((fault_op, n)) = at else { return };
    if fault_op != op {
        return;
    }
    if CALLS.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        tracing::warn!("{STALL_FAULT}: stalling in {op} #{n} (an injected fault)");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_grows_with_the_bytes() {
        let w = Watchdog::new(5.0);
        assert_eq!(w.deadline(0), Duration::from_secs(5));
        assert_eq!(w.deadline(100_000_000), Duration::from_secs(15));
    }
}
