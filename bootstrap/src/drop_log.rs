//! Messages the provisioner drops or refuses as garbage (unreadable
//! requests, hellos that do not check out, forged lifecycle events),
//! counted per kind and logged at most once per kind per interval. A
//! device's burst of 2,000 bad messages costs the log a line or two, not
//! 2,000, and the counts still reach the operator: in the line after each
//! quiet interval, and in the provisioner's last line.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

/// What was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropKind {
    /// An enrollment request that does not decode, or is not signed by the key it names.
    Request,
    /// A hello whose credential does not decode, verify, or name its sender.
    Hello,
    /// A lifecycle event that is malformed or names another device.
    Lifecycle,
}

impl DropKind {
    pub const ALL: [DropKind; 3] = [DropKind::Request, DropKind::Hello, DropKind::Lifecycle];

    pub fn as_str(self) -> &'static str {
        match self {
            DropKind::Request => "enrollment request",
            DropKind::Hello => "hello",
            DropKind::Lifecycle => "lifecycle event",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    total: u64,
    /// Dropped since the last line about this kind.
    quiet: u64,
    last_line: Option<Instant>,
}

/// Per-kind drop counters with a log budget of one line per kind per `interval`.
#[derive(Debug)]
pub struct DropLog {
    interval: Duration,
    counters: Mutex<[Counter; 3]>,
}

impl DropLog {
    pub fn new(interval: Duration) -> DropLog {
        DropLog { interval, counters: Mutex::default() }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn with<T>(&self, f: impl FnOnce(&mut [Counter; 3]) -> T) -> T {
        // A panic elsewhere while holding the lock leaves plain counters: still usable.
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c)
    }

    /// Counts one drop. `Some(n)`: log this one now, saying that `n` more
    /// were dropped without a line since the last one; `None`: stay quiet.
    pub fn count(&self, kind: DropKind, now: Instant) -> Option<u64> {
        self.with(|c| {
            let c = &mut c[kind.index()];
            c.total += 1;
            let due = c.last_line.is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
            if !due {
                c.quiet += 1;
                return None;
            }
            c.last_line = Some(now);
            Some(std::mem::take(&mut c.quiet))
        })
    }

    /// Counts one drop and logs it if the budget allows.
    pub fn note(&self, kind: DropKind, device: &str, why: &dyn std::fmt::Display) {
        if let Some(earlier) = self.count(kind, Instant::now()) {
            warn!(
                device = %device,
                error = %why,
                quiet_drops = earlier,
                "dropped a bad {} (at most one such line per {} s)",
                kind.as_str(),
                self.interval.as_secs()
            );
        }
    }

    /// The kinds with drops not yet logged: (kind, not logged, total). Each
    /// counts as logged now.
    pub fn take_quiet(&self, now: Instant) -> Vec<(DropKind, u64, u64)> {
        self.with(|c| {
            DropKind::ALL
                .iter()
                .filter_map(|&k| {
                    let c = &mut c[k.index()];
                    if c.quiet == 0 {
                        return None;
                    }
                    c.last_line = Some(now);
                    Some((k, std::mem::take(&mut c.quiet), c.total))
                })
                .collect()
        })
    }

    /// Logs one line per kind with drops not yet logged.
    pub fn summary(&self) {
        for (kind, quiet, total) in self.take_quiet(Instant::now()) {
            warn!(dropped = quiet, total, "dropped {quiet} more bad {}s without a line", kind.as_str());
        }
    }

    /// Every drop since start, per kind.
    pub fn totals(&self) -> [(DropKind, u64); 3] {
        self.with(|c| DropKind::ALL.map(|k| (k, c[k.index()].total)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_drops_earns_one_line_per_kind_per_interval_and_keeps_count() {
        let log = DropLog::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let lines = (0..2000).filter(|_| log.count(DropKind::Hello, t0).is_some()).count();
        assert_eq!(lines, 1);
        // Another kind has its own budget.
        assert_eq!(log.count(DropKind::Lifecycle, t0), Some(0));
        // The quiet ones come out in the summary, once.
        assert_eq!(log.take_quiet(t0), vec![(DropKind::Hello, 1999, 2000)]);
        assert!(log.take_quiet(t0).is_empty());
        // After the interval the next drop is logged again.
        assert_eq!(log.count(DropKind::Hello, t0 + Duration::from_secs(30)), None);
        assert_eq!(log.count(DropKind::Hello, t0 + Duration::from_secs(61)), Some(1));
        assert_eq!(log.totals(), [(DropKind::Request, 0), (DropKind::Hello, 2002), (DropKind::Lifecycle, 1)]);
    }
}
