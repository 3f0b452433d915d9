//! Benchmarks only (hidden flags): synthetic viewers that report a playback position through
//! the store's real viewer batcher ([`Store::upsert_viewer`], what signal sessions call), so a
//! soak can offer the store the write load of many viewers without clients or HTTP in front.
//!
//! `--synthetic-viewers N` starts N viewers on this node once it is ready; each writes its
//! state every `--synthetic-report-ms`, the writes spread evenly over the period. After
//! `--synthetic-warmup-ms`, the next `--synthetic-duration-ms` are measured; then the node stops
//! offering and writes one JSON summary to `--synthetic-out` (offered, committed, failed, commit
//! latency percentiles in milliseconds). Writes in flight are capped at
//! [`SYNTHETIC_IN_FLIGHT_MAX`]; an update that finds the cap reached counts as not offered
//! (`skipped`), so the summary shows when the store cannot keep up.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mediamesh_cluster::{NodeId, RoomId, Store, ViewerId, ViewerState};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// Synthetic writes in flight on one node, at most.
pub const SYNTHETIC_IN_FLIGHT_MAX: usize = 12_000;
/// The driver issues a slice of each period's writes this often.
const SLICE_MS: u64 = 10;

/// What the soak asks for.
#[derive(Clone, Debug)]
pub struct SyntheticConfig {
    /// Viewers on this node.
    pub viewers: usize,
    /// Each viewer writes once per this period.
    pub report_ms: u64,
    /// Not measured at first.
    pub warmup_ms: u64,
    /// Measured for this long, then the driver stops.
    pub duration_ms: u64,
    /// Where the summary goes.
    pub out: PathBuf,
}

#[derive(Default)]
struct Counts {
    offered: AtomicU64,
    committed: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

fn viewer_state(node: &NodeId, index: usize, position_ms: u64) -> ViewerState {
    ViewerState {
        viewer: ViewerId::new(format!("soak-{node}-{index}")),
        room: RoomId::new(format!("soak-room-{}", index % 100)),
        node: node.clone(),
        session: format!("soak-session-{node}-{index}"),
        display_name: String::new(),
        position_ms,
        subscriptions: vec!["video".into(), "audio".into()],
        layers: [("video".to_string(), "h".to_string())].into(),
        updated_at_ms: 0,
        expires_at_ms: 0,
        revision: 0,
        generation: 1,
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

/// Runs the synthetic viewers until the measured window ends, then writes the summary.
pub async fn run(store: Store, config: SyntheticConfig) {
    if let Err(e) = tokio::time::timeout(Duration::from_secs(60), store.wait_ready()).await {
        tracing::error!("synthetic viewers: the store is not ready: {e}");
        return;
    }
    let node = store.node_id().clone();
    let counts = Arc::new(Counts::default());
    let permits = Arc::new(Semaphore::new(SYNTHETIC_IN_FLIGHT_MAX));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let warmup_end = started + Duration::from_millis(config.warmup_ms);
    let end = warmup_end + Duration::from_millis(config.duration_ms);
    let slices_per_period = (config.report_ms / SLICE_MS).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(SLICE_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut slice: u64 = 0;
    let mut cpu_at_measure: Option<(Instant, f64)> = None;
    while Instant::now() < end {
        ticker.tick().await;
        if !measuring.load(Ordering::Relaxed) && Instant::now() >= warmup_end {
            measuring.store(true, Ordering::Relaxed);
            cpu_at_measure = Some((Instant::now(), crate::metrics::process_cpu_seconds()));
        }
        let phase = (slice % slices_per_period) as usize;
        slice += 1;
        let per_slice = config.viewers.div_ceil(slices_per_period as usize);
        let from = phase * per_slice;
        let to = ((phase + 1) * per_slice).min(config.viewers);
        for index in from..to {
            let measured = measuring.load(Ordering::Relaxed);
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                if measured {
                    counts.skipped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            if measured {
                counts.offered.fetch_add(1, Ordering::Relaxed);
            }
            let state = viewer_state(&node, index, slice * SLICE_MS);
            let store = store.clone();
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                let t0 = Instant::now();
                let result = store.upsert_viewer(state).await;
                let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                if measured {
                    match result {
                        Ok(_) => {
                            counts.committed.fetch_add(1, Ordering::Relaxed);
                            counts.latencies_us.lock().push(us);
                        }
                        Err(_) => {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                drop(permit);
            });
        }
    }
    // Let the writes of the window finish.
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        permits.acquire_many(SYNTHETIC_IN_FLIGHT_MAX as u32),
    )
    .await;
    let (cpu_cores, rss_bytes) = match cpu_at_measure {
        Some((at, cpu)) => (
            (crate::metrics::process_cpu_seconds() - cpu) / at.elapsed().as_secs_f64().max(1e-3),
            crate::metrics::process_resident_bytes(),
        ),
        None => (0.0, crate::metrics::process_resident_bytes()),
    };
    let mut latencies = std::mem::take(&mut *counts.latencies_us.lock());
    latencies.sort_unstable();
    let summary = serde_json::json!({
        "node": node.as_str(),
        "viewers": config.viewers,
        "report_ms": config.report_ms,
        "duration_ms": config.duration_ms,
        "offered": counts.offered.load(Ordering::Relaxed),
        "committed": counts.committed.load(Ordering::Relaxed),
        "failed": counts.failed.load(Ordering::Relaxed),
        "skipped": counts.skipped.load(Ordering::Relaxed),
        "commit_ms": {
            "p50": percentile(&latencies, 50.0),
            "p99": percentile(&latencies, 99.0),
            "max": latencies.last().map_or(0.0, |&us| f64::from(us) / 1000.0),
        },
        "cpu_cores": cpu_cores,
        "rss_bytes": rss_bytes,
        "written_at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    });
    let text = format!("{summary}\n");
    if let Err(e) = std::fs::write(&config.out, text) {
        tracing::error!(path = %config.out.display(), "synthetic viewers: writing the summary failed: {e}");
    }
}
