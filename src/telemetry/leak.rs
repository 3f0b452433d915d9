//! The leak signal: live tokio tasks that active spans do not explain.
//!
//! Work in mediamesh runs inside spans (a request, a signal session, a peer connection), and
//! its tasks end with it. So whenever the node comes back to the same number of open spans it
//! should come back to about the same number of tasks. The detector remembers the fewest tasks
//! ever seen at each span count; the excess of the tasks now over that minimum is the signal.
//! Without a leak it returns to ~0 after every burst; with one it grows burst after burst.

use parking_lot::Mutex;
use std::collections::BTreeMap;

/// Distinct span counts remembered; beyond it the nearest lower one is used.
const SPAN_COUNTS_MAX: usize = 4_096;

#[derive(Debug, Default)]
pub struct LeakDetector {
    fewest_tasks: Mutex<BTreeMap<i64, i64>>,
}

impl LeakDetector {
    /// Records a sample and returns the excess tasks (≥ 0).
    pub fn observe(&self, active_spans: i64, live_tasks: i64) -> i64 {
        let mut fewest = self.fewest_tasks.lock();
        if fewest.len() >= SPAN_COUNTS_MAX && !fewest.contains_key(&active_spans) {
            // Full: judge against the nearest remembered count below, without remembering.
            let below = fewest.range(..active_spans).next_back().map_or(live_tasks, |(_, &t)| t);
            return (live_tasks - below).max(0);
        }
        // A span count not seen before sets its own baseline.
        let fewest_here = fewest.entry(active_spans).or_insert(live_tasks);
        *fewest_here = (*fewest_here).min(live_tasks);
        let baseline = *fewest_here;
        (live_tasks - baseline).max(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_to_zero_without_a_leak_and_grows_with_one() {
        let detector = LeakDetector::default();
        // Idle, then bursts of 100 sessions (5 tasks each) that end cleanly.
        assert_eq!(detector.observe(0, 20), 0);
        for _ in 0..3 {
            assert_eq!(detector.observe(100, 520), 0);
            assert_eq!(detector.observe(0, 20), 0);
        }
        // Now every burst leaves 30 tasks behind.
        let mut tasks = 20;
        let mut excess = Vec::new();
        for _ in 0..3 {
            detector.observe(100, tasks + 500);
            tasks += 30;
            excess.push(detector.observe(0, tasks));
        }
        assert_eq!(excess, vec![30, 60, 90]);
    }
}
