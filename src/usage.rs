//! The usage ledger: viewer-minutes per room per KST day (UTC+9, no daylight saving).
//!
//! Every subscriber session on this node holds a guard from [`UsageMeter`] while it lives. The
//! [`Ledger`] (sans-IO: times in, records out) counts each open session's time up to the last
//! flush and splits it at KST midnights, so a session from 23:59 to 00:01 KST gives one minute
//! to each day. A flush task ([`run_flusher`]) adds what was counted to the replicated ledger in
//! the store every `--usage-flush-ms`; a failed add goes back into the ledger (bounded), so
//! nothing is lost while the store has no leader. `GET /admin/v1/usage?day=` reads the store, so
//! any node answers for the whole cluster.

use crate::clock::{kst_day, next_kst_midnight};
use mediamesh_actors::ports::{UsageGuard, ViewerUsage};
use mediamesh_actors::{RoomId, SessionId};
use mediamesh_cluster::{Store, UsageRecord};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Days kept in the replicated ledger.
pub const RETENTION_DAYS: u64 = 400;
/// Most (day, room) pairs waiting for the store; beyond it the oldest days are dropped and
/// counted (only while the store has been unavailable for long).
pub const PENDING_MAX: usize = 100_000;

#[derive(Debug)]
struct Open {
    room: String,
    /// Time counted up to here.
    counted_to_ms: u64,
    /// The last KST day this session was counted as a session of.
    day: String,
}

/// Viewer time per (day, room) not yet in the store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub viewer_ms: u64,
    pub sessions: u64,
}

/// Open viewer sessions and the time counted but not yet written. Pure: every call takes the
/// time (ms since the Unix epoch).
#[derive(Debug, Default)]
pub struct Ledger {
    open: HashMap<String, Open>,
    pending: BTreeMap<(String, String), Pending>,
    /// (day, room) pairs dropped because `pending` was full.
    pub dropped: u64,
}

impl Ledger {
    /// A viewer session started (a session already open keeps its start).
    pub fn start(&mut self, session: &str, room: &str, now_ms: u64) {
        if self.open.contains_key(session) {
            return;
        }
        let day = kst_day(now_ms);
        self.add((day.clone(), room.to_string()), 0, 1);
        self.open.insert(
            session.to_string(),
            Open {
                room: room.to_string(),
                counted_to_ms: now_ms,
                day,
            },
        );
    }

    /// A viewer session ended: its time up to `now_ms` is counted.
    pub fn end(&mut self, session: &str, now_ms: u64) {
        if let Some(mut open) = self.open.remove(session) {
            self.count(&mut open, now_ms);
        }
    }

    /// Open sessions.
    pub fn open_sessions(&self) -> usize {
        self.open.len()
    }

    /// Counts every open session up to `now_ms` and takes everything counted, as store records.
    pub fn take(&mut self, now_ms: u64) -> Vec<UsageRecord> {
        let mut open = std::mem::take(&mut self.open);
        for session in open.values_mut() {
            self.count(session, now_ms);
        }
        self.open = open;
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((day, room), p)| UsageRecord {
                day,
                room: mediamesh_cluster::RoomId::new(room),
                viewer_ms: p.viewer_ms,
                sessions: p.sessions,
            })
            .collect()
    }

    /// Puts records the store did not take back, to be sent with the next flush.
    pub fn restore(&mut self, records: Vec<UsageRecord>) {
        for r in records {
            self.add((r.day, r.room.as_str().to_string()), r.viewer_ms, r.sessions);
        }
    }

    fn count(&mut self, open: &mut Open, now_ms: u64) {
        while open.counted_to_ms < now_ms {
            let until = next_kst_midnight(open.counted_to_ms).min(now_ms);
            let day = kst_day(open.counted_to_ms);
            let new_day = day != open.day;
            self.add(
                (day.clone(), open.room.clone()),
                until - open.counted_to_ms,
                u64::from(new_day),
            );
            open.day = day;
            open.counted_to_ms = until;
        }
    }

    fn add(&mut self, key: (String, String), viewer_ms: u64, sessions: u64) {
        if !self.pending.contains_key(&key) && self.pending.len() >= PENDING_MAX {
            // Full: the oldest day goes first (it is the least likely to still be read).
            if let Some(oldest) = self.pending.keys().next().cloned() {
                self.pending.remove(&oldest);
                self.dropped += 1;
            }
        }
        let entry = self.pending.entry(key).or_default();
        entry.viewer_ms = entry.viewer_ms.saturating_add(viewer_ms);
        entry.sessions = entry.sessions.saturating_add(sessions);
    }
}

/// The node's meter: the [`ViewerUsage`] port the rooms use, over one [`Ledger`].
pub struct UsageMeter {
    ledger: Mutex<Ledger>,
    /// Added to the wall clock (tests move the meter's clock to a KST midnight).
    clock_offset_ms: i64,
    /// Records added to the store, and flushes that failed.
    pub flushed: AtomicU64,
    pub flush_failures: AtomicU64,
}

impl UsageMeter {
    pub fn new(clock_offset_ms: i64) -> Arc<UsageMeter> {
        Arc::new(UsageMeter {
            ledger: Mutex::new(Ledger::default()),
            clock_offset_ms,
            flushed: AtomicU64::new(0),
            flush_failures: AtomicU64::new(0),
        })
    }

    /// The meter's clock: ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        wall.saturating_add(self.clock_offset_ms).max(0) as u64
    }

    /// Viewer sessions being counted now.
    pub fn open_sessions(&self) -> usize {
        self.ledger.lock().open_sessions()
    }

    /// (day, room) pairs dropped because the store stayed unavailable too long.
    pub fn dropped(&self) -> u64 {
        self.ledger.lock().dropped
    }

    /// Writes what was counted to the store (all of it back into the ledger on failure).
    pub async fn flush(&self, store: &Store) -> Result<usize, mediamesh_cluster::StoreError> {
        let now = self.now_ms();
        let records = self.ledger.lock().take(now);
        if records.is_empty() {
            return Ok(0);
        }
        let keep_from = kst_day(now.saturating_sub(RETENTION_DAYS * 86_400_000));
        let count = records.len();
        match store.add_usage(records.clone(), keep_from).await {
            Ok(()) => {
                self.flushed.fetch_add(count as u64, Ordering::Relaxed);
                Ok(count)
            }
            Err(error) => {
                self.flush_failures.fetch_add(1, Ordering::Relaxed);
                self.ledger.lock().restore(records);
                Err(error)
            }
        }
    }
}

/// The meter's Prometheus families, mirrored at scrape time.
pub struct UsageMetrics {
    meter: Arc<UsageMeter>,
    metered: prometheus::IntGauge,
    flushed: prometheus::IntCounter,
    failures: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
}

impl UsageMetrics {
    pub fn new(registry: &prometheus::Registry, meter: Arc<UsageMeter>) -> Self {
        use crate::metrics::{counter, gauge};
        UsageMetrics {
            metered: gauge(
                registry,
                "mediamesh_usage_metered_sessions",
                "Viewer sessions whose time the usage ledger counts now",
            ),
            flushed: counter(
                registry,
                "mediamesh_usage_records_flushed_total",
                "Usage records (room and KST day) added to the replicated ledger",
            ),
            failures: counter(
                registry,
                "mediamesh_usage_flush_failures_total",
                "Usage flushes the store refused (their time is kept for the next flush)",
            ),
            dropped: counter(
                registry,
                "mediamesh_usage_dropped_total",
                "Usage records dropped because too many waited for the store",
            ),
            meter,
        }
    }

    pub fn sync(&self) {
        use crate::metrics::Metrics;
        self.metered.set(self.meter.open_sessions() as i64);
        Metrics::sync_counter(&self.flushed, self.meter.flushed.load(Ordering::Relaxed));
        Metrics::sync_counter(&self.failures, self.meter.flush_failures.load(Ordering::Relaxed));
        Metrics::sync_counter(&self.dropped, self.meter.dropped());
    }
}

struct Counted {
    meter: Arc<UsageMeter>,
    session: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let now = self.meter.now_ms();
        self.meter.ledger.lock().end(&self.session, now);
    }
}

/// The port the rooms hold: `begin` opens a session's count, dropping the guard ends it.
pub struct MeterPort(pub Arc<UsageMeter>);

impl ViewerUsage for MeterPort {
    fn begin(&self, room: &RoomId, session: &SessionId) -> UsageGuard {
        let now = self.0.now_ms();
        self.0.ledger.lock().start(session.as_str(), room.as_str(), now);
        Box::new(Counted {
            meter: Arc::clone(&self.0),
            session: session.as_str().to_string(),
        })
    }
}

/// Flushes the meter every `every` until `stop` resolves, then once more.
pub async fn run_flusher(meter: Arc<UsageMeter>, store: Store, every: Duration, stop: impl Future<Output = ()>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        if let Err(error) = meter.flush(&store).await {
            tracing::debug!(%error, "usage flush failed; kept for the next one");
        }
    }
    if let Err(error) = meter.flush(&store).await {
        tracing::warn!(%error, "last usage flush failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-22 23:59:00 KST (14:59:00 UTC).
    const BEFORE_MIDNIGHT: u64 = 1_795_359_540_000;
    const MINUTE: u64 = 60_000;

    fn by_day(records: &[UsageRecord]) -> Vec<(&str, &str, u64, u64)> {
        records
            .iter()
            .map(|r| (r.day.as_str(), r.room.as_str(), r.viewer_ms, r.sessions))
            .collect()
    }

    #[test]
    fn a_session_across_kst_midnight_splits_its_minutes() {
        assert_eq!(crate::clock::rfc3339_ms(BEFORE_MIDNIGHT), "2026-11-22T14:59:00.000Z");
        let mut ledger = Ledger::default();
        ledger.start("s1", "live", BEFORE_MIDNIGHT);
        ledger.end("s1", BEFORE_MIDNIGHT + 2 * MINUTE);
        let records = ledger.take(BEFORE_MIDNIGHT + 3 * MINUTE);
        assert_eq!(
            by_day(&records),
            [("2026-11-22", "live", MINUTE, 1), ("2026-11-23", "live", MINUTE, 1)]
        );
        assert!(ledger.take(BEFORE_MIDNIGHT + 4 * MINUTE).is_empty(), "taken once");
    }

    #[test]
    fn open_sessions_are_counted_at_each_take_and_sessions_once_per_day() {
        let mut ledger = Ledger::default();
        ledger.start("s1", "live", BEFORE_MIDNIGHT - 10 * MINUTE);
        ledger.start("s2", "live", BEFORE_MIDNIGHT - MINUTE);
        ledger.start("s2", "live", BEFORE_MIDNIGHT); // the same session again: no new count
        let first = ledger.take(BEFORE_MIDNIGHT);
        assert_eq!(by_day(&first), [("2026-11-22", "live", 11 * MINUTE, 2)]);
        let second = ledger.take(BEFORE_MIDNIGHT + 30_000);
        assert_eq!(by_day(&second), [("2026-11-22", "live", 2 * 30_000, 0)]);
        ledger.end("s2", BEFORE_MIDNIGHT + 90_000);
        let third = ledger.take(BEFORE_MIDNIGHT + 120_000);
        assert_eq!(
            by_day(&third),
            [
                ("2026-11-22", "live", 2 * 30_000, 0),
                ("2026-11-23", "live", 30_000 + 60_000, 2)
            ]
        );
        assert_eq!(ledger.open_sessions(), 1);
    }

    #[test]
    fn a_day_long_session_counts_every_day_it_touches() {
        let mut ledger = Ledger::default();
        ledger.start("s", "r", BEFORE_MIDNIGHT);
        let records = ledger.take(BEFORE_MIDNIGHT + MINUTE + 2 * 86_400_000);
        assert_eq!(
            by_day(&records),
            [
                ("2026-11-22", "r", MINUTE, 1),
                ("2026-11-23", "r", 86_400_000, 1),
                ("2026-11-24", "r", 86_400_000, 1),
            ]
        );
    }

    #[test]
    fn restored_records_add_to_what_comes_next() {
        let mut ledger = Ledger::default();
        ledger.start("s", "r", BEFORE_MIDNIGHT - 2 * MINUTE);
        let failed = ledger.take(BEFORE_MIDNIGHT - MINUTE);
        ledger.restore(failed);
        let records = ledger.take(BEFORE_MIDNIGHT);
        assert_eq!(by_day(&records), [("2026-11-22", "r", 2 * MINUTE, 1)]);
    }
}
