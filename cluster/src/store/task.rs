//! The replica task: the tokio + sled shell around [`ReplicaCore`]. It feeds the core its inputs
//! (raft messages, ticks, callers' operations, forwarded proposals, delivery reports), carries
//! out its outputs (sends, one flush per turn on a blocking thread, forwards to the leader,
//! snapshot encoding on a blocking thread, answers) and publishes the raft view. It decides
//! nothing itself: every rule lives in the core, which the simulator drives too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mediamesh_proto::cluster::v1 as pb;
use raft::eraftpb::ConfState;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Input, Shared, View, forward_failure, now_ms};
use crate::codec::{self, ENTRY_BYTES_MAX};
use crate::command::{ForwardedCommands, ForwardedOutcome};
use crate::error::StoreError;
use crate::replica::{Clock, ForwardResult, OpId, OpResult, Output, ReplicaCore};
use crate::storage::{Disk, LogStore, SledStorage};
use crate::transport::{DeliveryReport, RaftSender};

/// Inputs the replica task takes in one turn before it works on them.
const INPUTS_PER_TURN_MAX: usize = 1024;

/// A caller waiting for its operation.
pub(super) struct Waiter {
    pub(super) reply: oneshot::Sender<OpResult>,
    /// The `store.commit` span (ends with the answer).
    pub(super) span: tracing::Span,
    /// The caller's span (a forward to the leader continues it there).
    pub(super) caller: tracing::Span,
    pub(super) submitted: Instant,
}

/// A built snapshot coming back from the encoding thread.
struct Built {
    index: u64,
    term: u64,
    conf_state: ConfState,
    data: Vec<u8>,
}

pub(super) struct ReplicaTask {
    shared: Arc<Shared>,
    core: ReplicaCore<SledStorage>,
    disk: Disk,
    sender: RaftSender,
    /// Monotonic time zero of the core's `now_ms`.
    epoch: Instant,
    waiters: HashMap<OpId, Waiter>,
    /// Forwarded proposals held here (the leader): their RPC answers.
    forwarded: HashMap<u64, (oneshot::Sender<ForwardResult>, tracing::Span)>,
    next_forwarded: u64,
    compact_waiters: Vec<oneshot::Sender<Result<u64, StoreError>>>,
    /// Encoded snapshots come back on this channel (one at a time: the core asks for the next
    /// only after the last one is built).
    built_tx: mpsc::Sender<Built>,
    built_rx: mpsc::Receiver<Built>,
    ticks: u64,
}

impl ReplicaTask {
    pub(super) fn new(shared: Arc<Shared>, core: ReplicaCore<SledStorage>, disk: Disk, sender: RaftSender) -> Self {
        let (built_tx, built_rx) = mpsc::channel(1);
        ReplicaTask {
            shared,
            core,
            disk,
            sender,
            epoch: Instant::now(),
            waiters: HashMap::new(),
            forwarded: HashMap::new(),
            next_forwarded: 0,
            compact_waiters: Vec::new(),
            built_tx,
            built_rx,
            ticks: 0,
        }
    }

    fn clock(&self) -> Clock {
        Clock {
            now_ms: self.epoch.elapsed().as_millis() as u64,
            wall_ms: now_ms(),
        }
    }

    fn to_core_ms(&self, deadline: Instant) -> u64 {
        deadline.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub(super) async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut reports: mpsc::Receiver<DeliveryReport>,
        token: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.shared.config.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Apply the committed log after the snapshot before anything else (a restart).
        if let Err(e) = self.turn().await {
            tracing::error!(node = %self.shared.node_id, "replica stopped on a storage error: {e}");
            token.cancel();
            return;
        }
        loop {
            let retry_at = self
                .core
                .next_retry_ms()
                .map(|ms| self.epoch + Duration::from_millis(ms));
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                _ = ticker.tick() => self.on_tick(),
                Some(built) = self.built_rx.recv() => self.on_built(built),
                Some(report) = reports.recv() => self.on_report(report),
                Some(input) = inputs.recv() => {
                    self.on_input(input);
                    for _ in 0..INPUTS_PER_TURN_MAX {
                        match inputs.try_recv() {
                            Ok(input) => self.on_input(input),
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
            }
            if let Err(e) = self.turn().await {
                tracing::error!(node = %self.shared.node_id, "replica stopped on a storage error: {e}");
                break;
            }
        }
        if let Err(e) = self.disk.flush().await {
            tracing::error!("final flush failed: {e}");
        }
        token.cancel();
    }

    /// Advances the core until raft has no Ready left, with one flush per round.
    async fn turn(&mut self) -> Result<(), StoreError> {
        loop {
            let persist = self.core.advance(self.clock())?;
            self.dispatch();
            let Some(persist) = persist else { break };
            if persist.sync {
                self.disk.flush().await?;
            }
            self.core.on_persisted(persist);
            self.dispatch();
        }
        self.publish_view();
        Ok(())
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let clock = self.clock();
        self.core.tick(clock);
        if self.ticks.is_multiple_of(20) {
            // Callers that gave up (their deadline passed on their side).
            let gone: Vec<OpId> = self
                .waiters
                .iter()
                .filter(|(_, w)| w.reply.is_closed())
                .map(|(op, _)| *op)
                .collect();
            for op in gone {
                self.waiters.remove(&op);
                self.core.abandon(op);
            }
        }
    }

    fn on_report(&mut self, report: DeliveryReport) {
        match report {
            DeliveryReport::Snapshot { to, delivered } => self.core.report_snapshot(to, delivered),
            DeliveryReport::Unreachable { to } => self.core.report_unreachable(to),
        }
    }

    fn on_built(&mut self, built: Built) {
        let result = self
            .core
            .on_snapshot_built(built.index, built.term, &built.conf_state, built.data)
            .map(|()| self.core.storage().snapshot_index());
        match &result {
            Ok(index) => tracing::info!(node = %self.shared.node_id, index, "compacted the log"),
            Err(e) => tracing::error!(node = %self.shared.node_id, "compaction failed: {e}"),
        }
        for waiter in self.compact_waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    fn on_input(&mut self, input: Input) {
        let now = self.clock().now_ms;
        match input {
            Input::Raft(messages) => {
                for m in messages {
                    self.core.step(m);
                }
            }
            Input::Submit {
                op,
                kind,
                deadline,
                retry,
                reply,
                span,
            } => {
                // A `store.commit` span only where the entry is proposed: a read commits nothing,
                // and a follower's proposal commits under the leader's span (its
                // `store.forwarded_propose`).
                let commit = if span.is_none() || matches!(kind, crate::replica::OpKind::Read) || !self.core.is_leader()
                {
                    tracing::Span::none()
                } else {
                    tracing::info_span!(parent: &span, "store.commit", raft.index = tracing::field::Empty)
                };
                self.waiters.insert(
                    op,
                    Waiter {
                        reply,
                        span: commit,
                        caller: span,
                        submitted: Instant::now(),
                    },
                );
                let deadline_ms = self.to_core_ms(deadline);
                self.core.submit(now, op, kind, deadline_ms, retry);
            }
            Input::Forwarded { commands, reply, span } => {
                let request = self.next_forwarded;
                self.next_forwarded += 1;
                let commit = tracing::info_span!(parent: &span, "store.commit", raft.index = tracing::field::Empty);
                self.forwarded.insert(request, (reply, commit));
                // Forwarded requests are answered to this task's own id; `from` is not needed.
                self.core.on_forwarded(now, 0, request, commands);
            }
            Input::ForwardReply { op, result } => self.core.on_forward_reply(now, op, result),
            Input::Compact { reply } => {
                if self.core.request_snapshot() {
                    self.compact_waiters.push(reply);
                } else {
                    let _ = reply.send(Ok(self.core.storage().snapshot_index()));
                }
            }
            Input::TransferLeader { to } => self.core.transfer_leader(to),
        }
    }

    fn dispatch(&mut self) {
        for output in self.core.take_outputs() {
            match output {
                Output::Send(messages) => self.sender.send(messages),
                Output::Forward {
                    to,
                    request,
                    commands,
                    deadline_ms,
                } => self.forward(to, request, commands, deadline_ms),
                Output::ForwardReply {
                    request, result, index, ..
                } => {
                    if let Some((reply, span)) = self.forwarded.remove(&request) {
                        if let Some(index) = index {
                            span.record("raft.index", i64::try_from(index).unwrap_or(i64::MAX));
                        }
                        let _ = reply.send(result);
                    }
                }
                Output::Done { op, result, index } => {
                    if let Some(waiter) = self.waiters.remove(&op) {
                        if let Some(index) = index {
                            waiter
                                .span
                                .record("raft.index", i64::try_from(index).unwrap_or(i64::MAX));
                            self.shared
                                .store_metrics
                                .commit_seconds
                                .observe(waiter.submitted.elapsed().as_secs_f64());
                        }
                        let _ = waiter.reply.send(result);
                    }
                }
                Output::LeaderChanged { leader } => {
                    let metrics = &self.shared.store_metrics;
                    metrics.leader_changes.inc();
                    metrics.is_leader.set(i64::from(leader == self.shared.raft_id));
                }
                Output::PeerAddress { raft_id, cluster_addr } => self.shared.peers.set(raft_id, &cluster_addr),
                Output::BuildSnapshot {
                    index,
                    term,
                    conf_state,
                    state,
                } => {
                    let built = self.built_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let data = state.encode_snapshot();
                        drop(state);
                        let _ = built.blocking_send(Built {
                            index,
                            term,
                            conf_state,
                            data,
                        });
                    });
                }
                Output::SnapshotInstalled { index } => {
                    tracing::info!(node = %self.shared.node_id, index, "installed snapshot")
                }
                Output::Proposed { .. } | Output::Applied { .. } => {}
                Output::Warning(warning) => tracing::warn!(node = %self.shared.node_id, "{warning}"),
                Output::Refused(why) => tracing::debug!(node = %self.shared.node_id, "{why}"),
            }
        }
    }

    /// Forwards `commands` to the leader on a task of its own; the answer comes back as an input.
    fn forward(&self, to: u64, request: OpId, commands: Vec<crate::command::Command>, deadline_ms: u64) {
        let store = super::Store {
            shared: self.shared.clone(),
        };
        let deadline = self.epoch + Duration::from_millis(deadline_ms);
        let span = self
            .waiters
            .get(&request)
            .map_or_else(tracing::Span::none, |w| w.caller.clone());
        tokio::spawn(async move {
            let result = store.call_leader(to, commands, deadline).instrument(span).await;
            let _ = store
                .shared
                .inputs
                .send(Input::ForwardReply { op: request, result })
                .await;
        });
    }

    fn publish_view(&mut self) {
        let status = self.core.status();
        let view = View {
            leader: status.leader,
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            role: status.role,
            voters: status.voters,
            learners: status.learners,
            snapshot_index: self.core.storage().snapshot_index(),
        };
        self.shared.view.send_if_modified(|current| {
            if *current == view {
                false
            } else {
                *current = view;
                true
            }
        });
    }
}

impl super::Store {
    /// The forwarding call itself: the `Propose` RPC to the leader, its answer as the core
    /// takes it. A refused connection or a fault-blocked peer means nothing was sent (the core
    /// may try again); a failure after sending is a failure (the proposal may have applied).
    async fn call_leader(
        &self,
        leader: u64,
        commands: Vec<crate::command::Command>,
        deadline: Instant,
    ) -> ForwardResult {
        let timeout_ms = self.shared.config.request_timeout_ms;
        let mut client = match self.client_for_raft_id(leader) {
            Ok(client) => client,
            Err(None) => return ForwardResult::NotLeader,
            Err(Some(e)) => return ForwardResult::Failed(e.to_string()),
        };
        // The commands' shape did not change: envelope version 1, as every build reads it.
        let body = codec::encode(&ForwardedCommands { commands });
        let mut request = tonic::Request::new(pb::ProposeRequest { commands: body });
        crate::trace_context::inject_current(request.metadata_mut());
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout_at(deadline, client.propose(request)).await {
            Err(_) => ForwardResult::Failed(StoreError::Timeout(timeout_ms).to_string()),
            Ok(Err(status)) => forward_failure(status, timeout_ms),
            Ok(Ok(response)) => match crate::command::decode_forwarded_outcome(&response.into_inner().results) {
                Ok(ForwardedOutcome::Applied(outcomes)) => ForwardResult::Applied(outcomes),
                Ok(ForwardedOutcome::Failed(message)) => ForwardResult::Failed(message),
                Err(e) => ForwardResult::Failed(format!("bad answer from leader: {e}")),
            },
        }
    }
}

/// Encodes the leader's answer to a forwarded proposal.
pub(super) fn encode_forward_result(result: ForwardResult) -> Result<Vec<u8>, tonic::Status> {
    let outcome = match result {
        ForwardResult::Applied(outcomes) => ForwardedOutcome::Applied(outcomes),
        ForwardResult::NotLeader => return Err(tonic::Status::failed_precondition(super::NOT_LEADER)),
        ForwardResult::Failed(message) => ForwardedOutcome::Failed(message),
    };
    Ok(codec::encode_versioned(crate::command::FORWARD_VERSION, &outcome))
}

/// Decodes a forwarded proposal's body.
pub(super) fn decode_forwarded(body: &[u8]) -> Result<ForwardedCommands, codec::DecodeError> {
    codec::decode::<_, ENTRY_BYTES_MAX>(body)
}
