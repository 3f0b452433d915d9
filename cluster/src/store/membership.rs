//! Membership as the store runs it: the leader's side of a `Join` (register, add as a learner,
//! answer the peers), incoming raft batches, this node's registration, and the lifecycle task
//! (join with backoff, register until the state machine holds what it announces, heartbeats).

use std::time::Duration;

use mediamesh_proto::cluster::v1 as pb;
use raft::eraftpb::{ConfChangeType, Message};

use super::{FORWARDED_METADATA_KEY, Input, Store, forward_error, outcome_error, status_from_error};
use crate::command::{Command, Outcome};
use crate::driver::conf_change;
use crate::error::StoreError;
use crate::ids::{NodeId, raft_id_for};
use crate::types::NodeRegistration;

impl Store {
    /// Handles a `Join`: on the leader, registers the node, adds it as a learner (removing a
    /// wiped member first), and answers the peers; elsewhere forwards once to the leader.
    pub(crate) async fn handle_join(
        &self,
        request: pb::JoinRequest,
        forwarded: bool,
    ) -> Result<pb::JoinResponse, tonic::Status> {
        let registration = NodeRegistration {
            id: NodeId::new(request.node_id.clone()),
            region: request.region.clone(),
            cluster_addr: request.cluster_addr.clone(),
            http_url: request.http_url.clone(),
            grpc_url: request.grpc_url.clone(),
            capacity: request.capacity,
            // The join request does not carry these; the node's registration loop writes its
            // full registration once it is a member.
            media_ip: String::new(),
            media_ports: (0, 0),
            turn_addr: String::new(),
        };
        registration.validate().map_err(tonic::Status::invalid_argument)?;
        let raft_id = raft_id_for(&registration.id);
        if raft_id != request.raft_id {
            return Err(tonic::Status::invalid_argument(format!(
                "raft id of {} is {raft_id}",
                registration.id
            )));
        }
        let view = self.shared.view.borrow().clone();
        if view.leader != self.shared.raft_id {
            if forwarded || view.leader == 0 {
                return Err(tonic::Status::unavailable("no leader here"));
            }
            let mut client = self
                .client_for_raft_id(view.leader)
                .map_err(|_| tonic::Status::unavailable("leader unreachable"))?;
            let mut forward = tonic::Request::new(request);
            forward
                .metadata_mut()
                .insert(FORWARDED_METADATA_KEY, tonic::metadata::MetadataValue::from_static("1"));
            return client.join(forward).await.map(|r| r.into_inner());
        }
        let deadline = self.deadline();
        self.shared.peers.set(raft_id, &registration.cluster_addr);
        match self.propose(vec![Command::RegisterNode(registration)], deadline).await {
            Ok(mut outcomes) => match outcomes.pop() {
                Some(Outcome::Node(_)) => {}
                Some(other) => return Err(status_from_error(outcome_error(other))),
                None => return Err(tonic::Status::internal("no outcome")),
            },
            Err(e) => return Err(status_from_error(e)),
        }
        let member = view.voters.contains(&raft_id) || view.learners.contains(&raft_id);
        if member && request.fresh {
            // Its log and votes are gone: it must not count in quorums until it has caught up.
            self.conf_change(conf_change(ConfChangeType::RemoveNode, raft_id), deadline)
                .await
                .map_err(status_from_error)?;
        }
        if !member || request.fresh {
            self.conf_change(conf_change(ConfChangeType::AddLearnerNode, raft_id), deadline)
                .await
                .map_err(status_from_error)?;
        }
        let peers = self
            .shared
            .peers
            .all()
            .into_iter()
            .map(|(raft_id, addr)| pb::Peer { raft_id, addr })
            .collect();
        Ok(pb::JoinResponse {
            peers,
            leader_raft_id: self.shared.raft_id,
        })
    }

    /// Records the sender's address of an incoming raft batch and hands the messages to the
    /// replica (dropping them when it is overloaded: raft retransmits).
    pub(crate) fn deliver_raft(&self, from: u64, from_addr: &str, messages: Vec<Message>) -> Result<(), tonic::Status> {
        if from != self.shared.raft_id {
            self.shared.peers.set(from, from_addr);
        }
        self.shared
            .inputs
            .try_send(Input::Raft(messages))
            .map_err(|_| tonic::Status::resource_exhausted("replica input queue is full"))
    }

    /// Our raft id, for the server's checks.
    pub(crate) fn self_raft_id(&self) -> u64 {
        self.shared.raft_id
    }

    pub(crate) fn count_refused(&self) {
        self.shared
            .metrics
            .refused_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn registration(&self) -> NodeRegistration {
        let c = &self.shared.config;
        NodeRegistration {
            id: self.shared.node_id.clone(),
            region: c.region.clone(),
            cluster_addr: self.shared.advertise_cluster.clone(),
            http_url: c.http_url.clone(),
            grpc_url: c.grpc_url.clone(),
            capacity: c.capacity,
            media_ip: c.media_ip.clone(),
            media_ports: c.media_ports,
            turn_addr: c.turn_addr.clone(),
        }
    }

    pub(super) async fn run_lifecycle(&self, fresh: bool) {
        let mut backoff = Backoff::new();
        if fresh && !self.shared.config.join.is_empty() {
            'join: loop {
                for addr in self.shared.config.join.clone() {
                    match self.join_via(&addr).await {
                        Ok(()) => break 'join,
                        Err(e) => tracing::info!(%addr, "join attempt failed: {e}"),
                    }
                    backoff.wait().await;
                }
            }
            tracing::info!(node = %self.shared.node_id, "joined the cluster");
        }
        // Register (or update the registration) until the state machine holds what we announce.
        let mine = self.registration();
        let mut backoff = Backoff::new();
        loop {
            let registered = self
                .shared
                .sm
                .read()
                .nodes()
                .get(&self.shared.node_id)
                .map(|n| n.registration.clone());
            if registered.as_ref() == Some(&mine) {
                break;
            }
            if self.shared.view.borrow().leader != 0
                && let Err(e) = self.register_node(mine.clone()).await
            {
                tracing::debug!("registration failed: {e}");
            }
            backoff.wait().await;
        }
        let interval_ms = self.shared.config.heartbeat_interval_ms;
        if interval_ms == 0 {
            return;
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let load = self.shared.last_load.lock().clone();
            if let Err(e) = self.heartbeat(load).await {
                tracing::debug!("heartbeat failed: {e}");
            }
        }
    }

    async fn join_via(&self, addr: &str) -> Result<(), StoreError> {
        let mut client = self.client_for(addr)?;
        let r = self.registration();
        let mut request = tonic::Request::new(pb::JoinRequest {
            node_id: r.id.0.clone(),
            raft_id: self.shared.raft_id,
            region: r.region,
            cluster_addr: r.cluster_addr,
            http_url: r.http_url,
            grpc_url: r.grpc_url,
            capacity: r.capacity,
            fresh: true,
        });
        request.set_timeout(Duration::from_millis(self.shared.config.request_timeout_ms));
        let response = client
            .join(request)
            .await
            .map_err(|s| forward_error(s, self.shared.config.request_timeout_ms))?
            .into_inner();
        for peer in response.peers {
            if peer.raft_id != self.shared.raft_id {
                self.shared.peers.set(peer.raft_id, &peer.addr);
            }
        }
        Ok(())
    }
}

struct Backoff {
    next_ms: u64,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next_ms: 50 }
    }
    async fn wait(&mut self) {
        use rand::Rng;
        let jitter = rand::rng().random_range(0..=self.next_ms / 2);
        tokio::time::sleep(Duration::from_millis(self.next_ms + jitter)).await;
        self.next_ms = (self.next_ms * 2).min(2_000);
    }
}
