//! The per-node viewer batcher: viewer-state writes of this node coalesce into `UpsertViewers`
//! proposals (last write per viewer wins, never over a newer generation), proposed at once when
//! none is in flight and lingering `viewer_batch_ms` while some are.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Store, ViewerReply, ViewerUpdate, outcome_error};
use crate::command::{Command, Outcome, VIEWERS_PER_UPSERT_MAX};
use crate::error::StoreError;
use crate::ids::ViewerId;
use crate::types::ViewerState;

/// Viewer-update proposals one node has in flight at once.
pub const VIEWER_BATCHES_IN_FLIGHT_MAX: usize = 4;

impl Store {
    /// Coalesces viewer updates into `UpsertViewers` proposals. An update that finds no batch
    /// in flight is proposed at once (with whatever else is already queued), so a lone writer
    /// pays no batching delay; while batches are in flight, updates linger up to the configured
    /// window and coalesce (last write per viewer wins), up to `VIEWER_BATCHES_IN_FLIGHT_MAX`
    /// proposals at a time.
    pub(super) async fn run_viewer_batcher(&self, mut rx: mpsc::Receiver<ViewerUpdate>) {
        let window = Duration::from_millis(self.shared.config.viewer_batch_ms);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(VIEWER_BATCHES_IN_FLIGHT_MAX));
        loop {
            let first = tokio::select! {
                _ = self.shared.shutdown.cancelled() => return,
                first = rx.recv() => match first { Some(u) => u, None => return },
            };
            let mut pending: BTreeMap<ViewerId, (ViewerState, Vec<ViewerReply>)> = BTreeMap::new();
            let add = |u: ViewerUpdate, pending: &mut BTreeMap<_, (ViewerState, Vec<_>)>| {
                let entry = pending
                    .entry(u.state.viewer.clone())
                    .or_insert_with(|| (u.state.clone(), Vec::new()));
                // Last write per viewer wins, but never over a newer generation (a resume).
                if u.state.generation >= entry.0.generation {
                    entry.0 = u.state;
                }
                entry.1.push(u.reply);
            };
            add(first, &mut pending);
            // Whatever is queued already joins for free.
            while pending.len() < VIEWERS_PER_UPSERT_MAX {
                match rx.try_recv() {
                    Ok(u) => add(u, &mut pending),
                    Err(_) => break,
                }
            }
            let busy = in_flight.available_permits() < VIEWER_BATCHES_IN_FLIGHT_MAX;
            if busy && !window.is_zero() {
                let window_end = Instant::now() + window;
                while pending.len() < VIEWERS_PER_UPSERT_MAX {
                    tokio::select! {
                        _ = tokio::time::sleep_until(window_end) => break,
                        next = rx.recv() => match next { Some(u) => add(u, &mut pending), None => break },
                    }
                }
            }
            // Wait for a free slot; updates arriving meanwhile join this batch.
            let permit = loop {
                tokio::select! {
                    permit = Arc::clone(&in_flight).acquire_owned() => match permit {
                        Ok(permit) => break permit,
                        Err(_) => return, // the semaphore is never closed
                    },
                    next = rx.recv(), if pending.len() < VIEWERS_PER_UPSERT_MAX => match next {
                        Some(u) => add(u, &mut pending),
                        None => return,
                    },
                    _ = self.shared.shutdown.cancelled() => return,
                }
            };
            let store = self.clone();
            tokio::spawn(async move {
                store.propose_viewer_batch(pending).await;
                drop(permit);
            });
        }
    }

    async fn propose_viewer_batch(&self, pending: BTreeMap<ViewerId, (ViewerState, Vec<ViewerReply>)>) {
        let (viewers, replies): (Vec<ViewerState>, Vec<Vec<ViewerReply>>) = pending.into_values().unzip();
        let sent = viewers.clone();
        let result = self
            .propose(vec![Command::UpsertViewers { viewers }], self.deadline())
            .await
            .and_then(|mut outcomes| {
                let outcome = outcomes
                    .pop()
                    .ok_or_else(|| StoreError::Rejected("no outcome".into()))?;
                if !matches!(outcome, Outcome::Viewers(_) | Outcome::Upserted { .. }) {
                    return Err(outcome_error(outcome));
                }
                match outcome.stored_viewers(sent) {
                    Some(stored) if stored.len() == replies.len() => Ok(stored),
                    _ => Err(StoreError::Rejected(
                        "the store answered another number of viewers".into(),
                    )),
                }
            });
        match result {
            Ok(stored) => {
                for (state, replies) in stored.into_iter().zip(replies) {
                    for reply in replies {
                        let _ = reply.send(Ok(state.clone()));
                    }
                }
            }
            Err(e) => {
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
