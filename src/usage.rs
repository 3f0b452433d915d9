//! The usage ledger: viewer-minutes per room per KST day (UTC+9, no daylight saving).
//!
//! Every subscriber session on this node holds a guard from [`UsageMeter`] while it lives. The
//! [`Ledger`] (sans-IO: times in, records out) counts each open session's time up to the last
//! flush and splits it at KST midnights, so a session from 23:59 to 00:01 KST gives one minute
//! to each day. A flush task ([`run_flusher`]) adds what was counted to the replicated ledger in
//! the store every `--usage-flush-ms`. Each flush is numbered (`run`: the meter's start, `seq`:
//! the flush); one that fails is kept and sent again first, unchanged, and the state machine
//! applies a node's numbered add once, so a flush whose outcome was unknown (a timeout after it
//! committed) is neither lost nor counted twice. Meanwhile new time gathers in the ledger
//! (bounded). `GET /admin/v1/usage?day=` reads the store, so
//! any node answers for the whole cluster.

use crate::clock::{kst_day, next_kst_midnight};
use mediamesh_actors::ports::{UsageGuard, ViewerUsage};
use mediamesh_actors::{RoomId, SessionId};
use mediamesh_cluster::{Store, StoreError, UsageRecord};
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

/// A numbered flush the store has not confirmed.
#[derive(Debug)]
struct Unsent {
    seq: u64,
    records: Vec<UsageRecord>,
    keep_from_day: String,
}

/// The node's meter: the [`ViewerUsage`] port the rooms use, over one [`Ledger`].
pub struct UsageMeter {
    ledger: Mutex<Ledger>,
    /// Added to the wall clock (tests move the meter's clock to a KST midnight).
    clock_offset_ms: i64,
    /// The meter's start (ms since the Unix epoch): its flushes' `run`.
    run: u64,
    /// The last flush number given.
    seq: AtomicU64,
    /// A flush that failed, sent again (unchanged) before anything new.
    unsent: Mutex<Option<Unsent>>,
    /// Records added to the store, and flushes that failed.
    pub flushed: AtomicU64,
    pub flush_failures: AtomicU64,
}

impl UsageMeter {
    pub fn new(clock_offset_ms: i64) -> Arc<UsageMeter> {
        Arc::new(UsageMeter {
            ledger: Mutex::new(Ledger::default()),
            clock_offset_ms,
            run: Self::clock_ms(clock_offset_ms),
            seq: AtomicU64::new(0),
            unsent: Mutex::new(None),
            flushed: AtomicU64::new(0),
            flush_failures: AtomicU64::new(0),
        })
    }

    /// The meter's clock: ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        Self::clock_ms(self.clock_offset_ms)
    }

    fn clock_ms(offset_ms: i64) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        wall.saturating_add(offset_ms).max(0) as u64
    }

    /// Viewer sessions being counted now.
    pub fn open_sessions(&self) -> usize {
        self.ledger.lock().open_sessions()
    }

    /// (day, room) pairs dropped because the store stayed unavailable too long.
    pub fn dropped(&self) -> u64 {
        self.ledger.lock().dropped
    }

    /// Writes what was counted to the store: first a flush that failed before (unchanged, so
    /// the store counts it once however often it is sent), then what was counted since, as a
    /// new numbered flush. Answers the records written.
    pub async fn flush(&self, store: &Store) -> Result<usize, StoreError> {
        let mut written = 0;
        let unsent = self.unsent.lock().take();
        if let Some(unsent) = unsent {
            written += self.send(store, unsent).await?;
        }
        let now = self.now_ms();
        let records = self.ledger.lock().take(now);
        if records.is_empty() {
            return Ok(written);
        }
        let flush = Unsent {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            records,
            keep_from_day: kst_day(now.saturating_sub(RETENTION_DAYS * 86_400_000)),
        };
        Ok(written + self.send(store, flush).await?)
    }

    /// Sends one numbered flush; keeps it to send again when the store failed (its outcome
    /// may be unknown), drops it when the store refused its content (it never will take it).
    async fn send(&self, store: &Store, flush: Unsent) -> Result<usize, StoreError> {
        let count = flush.records.len();
        let sent = store
            .add_usage(self.run, flush.seq, &flush.records, &flush.keep_from_day)
            .await;
        match sent {
            Ok(()) => {
                self.flushed.fetch_add(count as u64, Ordering::Relaxed);
                Ok(count)
            }
            Err(error) => {
                self.flush_failures.fetch_add(1, Ordering::Relaxed);
                if matches!(error, StoreError::InvalidInput(_)) {
                    self.ledger.lock().dropped += count as u64;
                } else {
                    *self.unsent.lock() = Some(flush);
                }
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

    /// A flush whose outcome was lost (it committed, the answer timed out) is sent again
    /// unchanged before anything new, and the store counts it once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_sent_again_after_a_lost_answer_counts_once() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut config = mediamesh_cluster::StoreConfig::new("solo", dir.path(), "usage-test-secret");
        config.tick_ms = 20;
        let store = mediamesh_cluster::server::start(config, listener, std::future::pending())
            .await
            .expect("store");
        tokio::time::timeout(Duration::from_secs(10), store.wait_ready())
            .await
            .expect("ready in time")
            .expect("ready");
        // Fixed at 2026-11-22 23:59 KST: the records fall on one day.
        let meter = UsageMeter::new(BEFORE_MIDNIGHT as i64 - UsageMeter::clock_ms(0) as i64);
        let day = kst_day(meter.now_ms());
        let stored = || async {
            let records = store
                .usage(&day, mediamesh_cluster::Consistency::Linearizable)
                .await
                .expect("read");
            records
                .iter()
                .fold((0, 0), |(ms, n), r| (ms + r.viewer_ms, n + r.sessions))
        };
        meter.ledger.lock().start("s", "live", meter.now_ms() - MINUTE);
        meter.ledger.lock().end("s", meter.now_ms());
        // The first flush commits, but its answer is lost: it is left as unsent.
        let records = meter.ledger.lock().take(meter.now_ms());
        let lost = Unsent {
            seq: meter.seq.fetch_add(1, Ordering::Relaxed) + 1,
            records,
            keep_from_day: "2026-01-01".into(),
        };
        store
            .add_usage(meter.run, lost.seq, &lost.records, &lost.keep_from_day)
            .await
            .expect("committed");
        *meter.unsent.lock() = Some(lost);
        let first = stored().await;
        assert!(first.0 >= MINUTE && first.1 == 1, "{first:?}");
        // The next flush sends it again, then what was counted since.
        meter.ledger.lock().start("t", "live", meter.now_ms());
        meter.ledger.lock().end("t", meter.now_ms() + 30_000);
        let written = meter.flush(&store).await.expect("flushed");
        assert_eq!(written, 2, "the resend and the new flush");
        assert!(meter.unsent.lock().is_none());
        let second = stored().await;
        assert_eq!(second.1, 2, "the first session once, the second once: {second:?}");
        assert!(
            second.0 >= first.0 + 30_000 && second.0 < 2 * first.0,
            "the resent minute once: {first:?} then {second:?}"
        );
    }
}
