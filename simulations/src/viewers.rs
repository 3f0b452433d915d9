//! Viewer churn: [`CLIENTS`](crate::config::CLIENTS) clients, each a signal-channel client (the SDK's `Client`) that
//! joins a room through some node, reports its playback position, drops its connection and
//! resumes (often inside the resume window, sometimes well after it), follows `moved`, and now
//! and then leaves for good. Their acknowledged writes and judged resumes are what the
//! `acked-write-lost` and `resume-*` checkers hold the cluster to.
//!
//! A client's behaviour is a small state machine driven by replies from nodes, a single wake-up
//! timer (invalidated by a token when the state changes) and the world's RNG.

use mediamesh_cluster::types::ViewerState;
use mediamesh_cluster::{RoomId, ViewerId};
use rand::Rng;
use rand::rngs::StdRng;

use crate::checkers::Observation;
use crate::config::{CLIENT_REQUEST_TIMEOUT_MS, RESUME_WINDOW_MS};
use crate::message::{ClientId, ClientReply, ClientRequest, NodeIndex, ResumeOutcome};

/// Where a client is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientState {
    /// Not connected; the next wake-up joins (or resumes).
    Idle,
    /// A join is in flight at `node`.
    Joining { node: NodeIndex, request: u64 },
    /// Watching through `node`; `report` is a position write in flight.
    Watching { node: NodeIndex, report: Option<u64> },
    /// A leave is in flight at `node`.
    Leaving { node: NodeIndex, request: u64 },
}

/// What a client asks the world to do.
// Moved once into the world.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ClientEffect {
    /// Send a request to a node.
    Send { node: NodeIndex, request: ClientRequest },
    /// Wake the client at `at_ms` (with this token).
    Wake { at_ms: u64, token: u64 },
    /// Tell the checkers.
    Observe(Observation),
}

/// The world's view of the nodes a client may pick from.
pub struct NodeChoice<'a> {
    /// Region of each node.
    pub regions: &'a [String],
}

/// One viewer client.
#[derive(Debug)]
pub struct Client {
    /// Its id.
    pub id: ClientId,
    /// Its region (it prefers nodes there).
    pub region: String,
    /// The room it watches.
    pub room: RoomId,
    /// Where it is.
    pub state: ClientState,
    /// The viewer it is (and resumes as), with its latest acknowledged state.
    viewer: Option<ViewerId>,
    acked: Option<ViewerState>,
    generation: u32,
    next_request: u64,
    position_ms: u64,
    /// Where a `moved` told it to go.
    moved_to: Option<NodeIndex>,
    /// The node that failed it last (avoided on the next attempt).
    avoid: Option<NodeIndex>,
    /// The current wake-up's token.
    pub token: u64,
}

impl Client {
    /// A client in `region` that will join `room` when first woken.
    pub fn new(id: ClientId, region: String, room: RoomId) -> Self {
        Client {
            id,
            region,
            room,
            state: ClientState::Idle,
            viewer: None,
            acked: None,
            generation: 0,
            next_request: 0,
            position_ms: 0,
            moved_to: None,
            avoid: None,
            token: 0,
        }
    }

    /// The node it is connected to (joined or joining), if any.
    pub fn node(&self) -> Option<NodeIndex> {
        match self.state {
            ClientState::Idle => None,
            ClientState::Joining { node, .. }
            | ClientState::Watching { node, .. }
            | ClientState::Leaving { node, .. } => Some(node),
        }
    }

    /// Whether it is watching its room through `node`.
    pub fn watching(&self) -> Option<NodeIndex> {
        match self.state {
            ClientState::Watching { node, .. } => Some(node),
            _ => None,
        }
    }

    fn wake(&mut self, now_ms: u64, delay_ms: u64, out: &mut Vec<ClientEffect>) {
        self.token += 1;
        out.push(ClientEffect::Wake {
            at_ms: now_ms + delay_ms,
            token: self.token,
        });
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn pick_node(&mut self, choice: &NodeChoice<'_>, rng: &mut StdRng) -> NodeIndex {
        if let Some(to) = self.moved_to.take() {
            return to;
        }
        let local: Vec<NodeIndex> = (0..choice.regions.len())
            .filter(|&i| choice.regions[i] == self.region && Some(i) != self.avoid)
            .collect();
        let any: Vec<NodeIndex> = (0..choice.regions.len()).filter(|&i| Some(i) != self.avoid).collect();
        let pool = if !local.is_empty() && rng.random_bool(0.7) {
            local
        } else {
            any
        };
        // The pool is never empty: there are at least three nodes and one is avoided.
        pool[rng.random_range(0..pool.len())]
    }

    /// Goes idle and wakes after `delay_ms` to join again.
    fn idle(&mut self, now_ms: u64, delay_ms: u64, out: &mut Vec<ClientEffect>) {
        self.state = ClientState::Idle;
        self.wake(now_ms, delay_ms, out);
    }

    /// The wake-up with `token` fired.
    pub fn on_wake(
        &mut self,
        now_ms: u64,
        token: u64,
        choice: &NodeChoice<'_>,
        rng: &mut StdRng,
        out: &mut Vec<ClientEffect>,
    ) {
        if token != self.token {
            return;
        }
        match self.state.clone() {
            ClientState::Idle => {
                if self.viewer.is_none() && rng.random_bool(0.2) {
                    self.room = RoomId::new(format!("room-{}", rng.random_range(0..crate::config::ROOMS)));
                }
                let node = self.pick_node(choice, rng);
                self.generation += 1;
                let request = self.request_id();
                let fresh = ViewerId::new(format!("c{}-g{}", self.id, self.generation));
                out.push(ClientEffect::Send {
                    node,
                    request: ClientRequest::Join {
                        request,
                        room: self.room.clone(),
                        resume: self.viewer.clone(),
                        fresh,
                    },
                });
                self.state = ClientState::Joining { node, request };
                self.wake(now_ms, CLIENT_REQUEST_TIMEOUT_MS, out);
            }
            ClientState::Joining { node, .. } | ClientState::Leaving { node, .. } => {
                // No answer in time: give up on this node.
                self.avoid = Some(node);
                if let Some(viewer) = self.viewer.clone() {
                    out.push(ClientEffect::Send {
                        node,
                        request: ClientRequest::Disconnect { viewer },
                    });
                }
                if matches!(self.state, ClientState::Leaving { .. }) {
                    self.forget_viewer();
                }
                let delay = rng.random_range(300..=1_500);
                self.idle(now_ms, delay, out);
            }
            ClientState::Watching { node, report } => {
                let Some(viewer) = self.viewer.clone() else {
                    self.idle(now_ms, 100, out);
                    return;
                };
                if report.is_some() {
                    // The write did not come back: the connection is gone; resume elsewhere.
                    self.avoid = Some(node);
                    out.push(ClientEffect::Send {
                        node,
                        request: ClientRequest::Disconnect { viewer },
                    });
                    let delay = rng.random_range(200..=1_000);
                    self.idle(now_ms, delay, out);
                    return;
                }
                let roll = rng.random_range(0..100);
                if roll < 85 {
                    self.position_ms += rng.random_range(500..=3_000);
                    let request = self.request_id();
                    out.push(ClientEffect::Send {
                        node,
                        request: ClientRequest::Position {
                            request,
                            viewer,
                            position_ms: self.position_ms,
                        },
                    });
                    self.state = ClientState::Watching {
                        node,
                        report: Some(request),
                    };
                    self.wake(now_ms, CLIENT_REQUEST_TIMEOUT_MS, out);
                } else if roll < 93 {
                    // The connection drops; resume inside the window, or well after it.
                    out.push(ClientEffect::Send {
                        node,
                        request: ClientRequest::Disconnect { viewer },
                    });
                    let delay = if rng.random_bool(0.65) {
                        rng.random_range(200..=RESUME_WINDOW_MS - 1_000)
                    } else {
                        rng.random_range(RESUME_WINDOW_MS + 1_000..=20_000)
                    };
                    self.idle(now_ms, delay, out);
                } else if roll < 97 {
                    let request = self.request_id();
                    out.push(ClientEffect::Send {
                        node,
                        request: ClientRequest::Leave { request, viewer },
                    });
                    self.state = ClientState::Leaving { node, request };
                    self.wake(now_ms, CLIENT_REQUEST_TIMEOUT_MS, out);
                } else {
                    let delay = rng.random_range(1_000..=3_000);
                    self.wake(now_ms, delay, out);
                }
            }
        }
    }

    fn forget_viewer(&mut self) {
        self.viewer = None;
        self.acked = None;
        self.position_ms = 0;
    }

    /// A reply or notice from `from`.
    pub fn on_reply(
        &mut self,
        now_ms: u64,
        from: NodeIndex,
        reply: ClientReply,
        rng: &mut StdRng,
        out: &mut Vec<ClientEffect>,
    ) {
        match (self.state.clone(), reply) {
            (
                ClientState::Joining { node, request },
                ClientReply::Joined {
                    request: r,
                    acked,
                    resume,
                    read_clock_ms,
                },
            ) if node == from && r == request => {
                if let Some(viewer) = &self.viewer
                    && resume != ResumeOutcome::Fresh
                {
                    out.push(ClientEffect::Observe(Observation::ResumeJudged {
                        client: self.id,
                        viewer: viewer.clone(),
                        acked: self.acked.clone(),
                        outcome: resume,
                        read_clock_ms,
                    }));
                }
                if self.viewer.as_ref() != Some(&acked.viewer) {
                    self.forget_viewer();
                }
                self.viewer = Some(acked.viewer.clone());
                self.position_ms = self.position_ms.max(acked.position_ms);
                self.record_ack(acked, out);
                self.avoid = None;
                self.state = ClientState::Watching { node, report: None };
                let delay = rng.random_range(1_000..=3_000);
                self.wake(now_ms, delay, out);
            }
            (ClientState::Joining { node, request }, ClientReply::JoinFailed { request: r, .. })
                if node == from && r == request =>
            {
                self.avoid = Some(node);
                let delay = rng.random_range(300..=1_500);
                self.idle(now_ms, delay, out);
            }
            (
                ClientState::Watching {
                    node,
                    report: Some(request),
                },
                ClientReply::PositionAcked { request: r, acked },
            ) if node == from && r == request => {
                self.record_ack(acked, out);
                self.state = ClientState::Watching { node, report: None };
                let delay = rng.random_range(1_000..=3_000);
                self.wake(now_ms, delay, out);
            }
            (
                ClientState::Watching {
                    node,
                    report: Some(request),
                },
                ClientReply::PositionFailed { request: r, .. },
            ) if node == from && r == request => {
                // The session is gone or the store failed: resume (possibly elsewhere).
                if let Some(viewer) = self.viewer.clone() {
                    out.push(ClientEffect::Send {
                        node,
                        request: ClientRequest::Disconnect { viewer },
                    });
                }
                let delay = rng.random_range(200..=1_000);
                self.idle(now_ms, delay, out);
            }
            // A move can overtake the join's answer: follow it (the answer is then stale).
            (
                ClientState::Watching { node, .. } | ClientState::Joining { node, .. },
                ClientReply::Moved { viewer, to },
            ) if node == from && self.viewer.as_ref() == Some(&viewer) => {
                self.moved_to = Some(to);
                let delay = rng.random_range(50..=500);
                self.idle(now_ms, delay, out);
            }
            (ClientState::Watching { node, .. }, ClientReply::Closed { viewer })
                if node == from && self.viewer.as_ref() == Some(&viewer) =>
            {
                self.avoid = Some(node);
                let delay = rng.random_range(200..=1_000);
                self.idle(now_ms, delay, out);
            }
            (ClientState::Leaving { node, request }, ClientReply::Left { request: r, .. })
                if node == from && r == request =>
            {
                self.forget_viewer();
                let delay = rng.random_range(500..=3_000);
                self.idle(now_ms, delay, out);
            }
            _ => {} // stale
        }
    }

    fn record_ack(&mut self, acked: ViewerState, out: &mut Vec<ClientEffect>) {
        out.push(ClientEffect::Observe(Observation::Acked {
            client: self.id,
            state: acked.clone(),
        }));
        if self.acked.as_ref().is_none_or(|a| a.revision < acked.revision) {
            self.acked = Some(acked);
        }
    }

    /// The node it talks to went down (or refused the connection).
    pub fn on_connection_lost(&mut self, now_ms: u64, node: NodeIndex, rng: &mut StdRng, out: &mut Vec<ClientEffect>) {
        if self.node() != Some(node) {
            return;
        }
        if matches!(self.state, ClientState::Leaving { .. }) {
            self.forget_viewer();
        }
        self.avoid = Some(node);
        let delay = rng.random_range(100..=2_000);
        self.idle(now_ms, delay, out);
    }
}
