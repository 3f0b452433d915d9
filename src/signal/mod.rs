//! Signaling: one session per client channel, the same code behind the WebSocket (`ws`, JSON
//! frames) and gRPC (`grpc`, protobuf) transports. A transport decodes frames into [`Inbound`]
//! items, runs [`session::run`], and writes what comes out; the session owns every rule.

pub mod grpc;
pub mod resume;
pub mod session;
pub mod ws;

use crate::auth::TokenKeys;
use mediamesh_actors::RoomRegistry;
use mediamesh_proto::signal::v1::ClientMessage;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest signal frame accepted (JSON text or protobuf), in bytes. An SDP offer with simulcast
/// and many candidates is ~10 KiB.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Bound of each direction's queue between a transport and its session.
pub const QUEUE_MAX: usize = 64;
/// The WebSocket transport pings this often; clients are asked to send something at least once
/// per idle timeout.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// One decoded item from a transport.
#[derive(Debug)]
pub enum Inbound {
    Message(ClientMessage),
    /// Not a message: bad JSON or protobuf, a field of the wrong type, a binary WebSocket frame.
    /// `id` is the message's id when it could be read, else 0.
    Malformed {
        id: u64,
        reason: String,
    },
    /// A well-formed message of a type this node does not know.
    Unknown {
        id: u64,
        kind: String,
    },
    /// A frame over [`FRAME_BYTES_MAX`]; the transport cannot go on after it.
    TooLarge,
    /// Proof of life without a message (a WebSocket pong).
    Heartbeat,
}

/// Which transport a session came in on (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Grpc,
}

/// Every error code a session sends (see `signal.proto`); metrics count them by code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotJoined,
    AlreadyJoined,
    OutOfOrder,
    UnknownMessage,
    TooLarge,
    NotFound,
    RoomFull,
    NodeFull,
    IdleTimeout,
    Replaced,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotJoined,
        ErrorCode::AlreadyJoined,
        ErrorCode::OutOfOrder,
        ErrorCode::UnknownMessage,
        ErrorCode::TooLarge,
        ErrorCode::NotFound,
        ErrorCode::RoomFull,
        ErrorCode::NodeFull,
        ErrorCode::IdleTimeout,
        ErrorCode::Replaced,
        ErrorCode::Internal,
    ];

    /// The code as clients see it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::UnknownMessage => "unknown_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::NodeFull => "node_full",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Internal => "internal",
        }
    }
}

/// How a join carrying a resume token ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// The viewer got its session back.
    Resumed = 0,
    /// The token was good but the session was outside the resume window: a new session.
    Expired = 1,
    /// The token was invalid or for another room or identity.
    Refused = 2,
}

impl ResumeOutcome {
    pub const ALL: [ResumeOutcome; 3] = [ResumeOutcome::Resumed, ResumeOutcome::Expired, ResumeOutcome::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            ResumeOutcome::Resumed => "resumed",
            ResumeOutcome::Expired => "expired",
            ResumeOutcome::Refused => "refused",
        }
    }
}

/// Counters of the signal sessions, read by the metrics at scrape time.
#[derive(Debug, Default)]
pub struct SignalStats {
    pub websocket_sessions: AtomicI64,
    pub grpc_sessions: AtomicI64,
    /// Resume attempts, indexed by `ResumeOutcome as usize`.
    pub resume_outcomes: [AtomicU64; ResumeOutcome::ALL.len()],
    /// Error replies, indexed by `ErrorCode as usize`.
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
}

impl SignalStats {
    pub(crate) fn count_resume(&self, outcome: ResumeOutcome) {
        self.resume_outcomes[outcome as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Signal sessions open now, both transports.
    pub fn open_sessions(&self) -> usize {
        let open = self.websocket_sessions.load(Ordering::Relaxed) + self.grpc_sessions.load(Ordering::Relaxed);
        usize::try_from(open).unwrap_or(0)
    }

    fn sessions(&self, transport: Transport) -> &AtomicI64 {
        match transport {
            Transport::WebSocket => &self.websocket_sessions,
            Transport::Grpc => &self.grpc_sessions,
        }
    }

    fn error(&self, code: ErrorCode) {
        self.errors[code as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything a session needs from the node.
pub struct SignalContext {
    pub node_id: String,
    pub keys: TokenKeys,
    pub resume: resume::ResumeKeys,
    pub rooms: Arc<RoomRegistry>,
    pub store: mediamesh_cluster::Store,
    pub idle_timeout: Duration,
    pub resume_window: Duration,
    /// The public gRPC address, as told to clients that ask for the gRPC mode.
    pub grpc_url: String,
    /// Live sessions by viewer session id; a resume elsewhere on this node cancels the old one.
    live: Mutex<HashMap<String, Registration>>,
    generation: AtomicU64,
    pub stats: Arc<SignalStats>,
    /// Open sessions, both transports, and their limit.
    open: Arc<AtomicUsize>,
    pub sessions_max: usize,
    /// The TURN relay whose ICE servers `joined` carries (None: `--turn off`).
    pub turn: Option<mediamesh_actors::turn::TurnHandle>,
    /// `--mask-names`: display names with Hangul are stored masked.
    pub mask_names: bool,
}

/// Why a resume token was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ResumeRefused {
    /// Well-formed and signed, but for another room or identity.
    #[error("the resume token is for another room or identity")]
    Mismatch,
    /// Malformed, or not signed by this cluster.
    #[error("{0}")]
    Invalid(String),
}

impl SignalContext {
    /// Checks a resume token for `room` and `identity`, and gives back the viewer's stored state
    /// when it was updated within the resume window (`None`: too old or gone, a new session).
    /// Every outcome is counted in `mediamesh_viewer_resumes_total`.
    pub async fn resume_state(
        &self,
        token: &str,
        room: &str,
        identity: &str,
    ) -> Result<Option<mediamesh_cluster::ViewerState>, ResumeRefused> {
        let claims = match self.resume.verify(token) {
            Ok(claims) => claims,
            Err(reason) => {
                self.stats.count_resume(ResumeOutcome::Refused);
                return Err(ResumeRefused::Invalid(reason.to_string()));
            }
        };
        if claims.room != room || claims.identity != identity {
            self.stats.count_resume(ResumeOutcome::Refused);
            return Err(ResumeRefused::Mismatch);
        }
        let id = mediamesh_cluster::ViewerId::new(claims.viewer);
        let state = match self
            .store
            .viewer(&id, mediamesh_cluster::Consistency::Linearizable)
            .await
        {
            Ok(Some(state)) => {
                let age_ms = session::now_ms().saturating_sub(state.updated_at_ms);
                (age_ms <= self.resume_window.as_millis() as u64).then_some(state)
            }
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "viewer state not readable; a new session instead of a resume");
                None
            }
        };
        self.stats.count_resume(if state.is_some() {
            ResumeOutcome::Resumed
        } else {
            ResumeOutcome::Expired
        });
        Ok(state)
    }

    /// The other available nodes' HTTP base URLs, `region`'s first: where a client goes when
    /// this node cannot be reached.
    pub fn alternates(&self, region: Option<&str>) -> Vec<String> {
        let nodes = self.store.nodes();
        let mut nodes: Vec<_> = nodes
            .iter()
            .filter(|n| n.id.as_str() != self.node_id && n.state == mediamesh_cluster::NodeState::Alive)
            .collect();
        nodes.sort_by_key(|n| (region.is_some_and(|r| !n.region.eq_ignore_ascii_case(r)), n.id.clone()));
        nodes.into_iter().map(|n| n.http_url.clone()).collect()
    }
}

/// A place among the node's signal sessions; given back on drop.
pub struct Admission {
    open: Arc<AtomicUsize>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A live session's entry: cancelled when a resume takes the viewer id over.
#[derive(Clone)]
struct Registration {
    generation: u64,
    cancelled: CancellationToken,
}

impl SignalContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: String,
        keys: TokenKeys,
        cluster_secret: &str,
        rooms: Arc<RoomRegistry>,
        store: mediamesh_cluster::Store,
        idle_timeout: Duration,
        resume_window: Duration,
        grpc_url: String,
        sessions_max: usize,
        turn: Option<mediamesh_actors::turn::TurnHandle>,
        mask_names: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            keys,
            resume: resume::ResumeKeys::new(cluster_secret),
            rooms,
            store,
            idle_timeout,
            resume_window,
            grpc_url,
            live: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            stats: Arc::default(),
            open: Arc::default(),
            sessions_max,
            turn,
            mask_names,
        })
    }

    /// Takes a place for a new session, or `None` at the limit (the transport refuses it).
    pub fn admit(&self) -> Option<Admission> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.sessions_max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission {
                open: Arc::clone(&self.open),
            })
    }

    /// Registers a live session, cancelling one that held the same viewer id.
    fn register(&self, viewer: &str) -> Registration {
        let registration = Registration {
            generation: self.generation.fetch_add(1, Ordering::Relaxed),
            cancelled: CancellationToken::new(),
        };
        let previous = self.live.lock().insert(viewer.to_string(), registration.clone());
        if let Some(previous) = previous {
            previous.cancelled.cancel();
        }
        registration
    }

    /// Forgets a live session unless another one has taken its viewer id since.
    fn unregister(&self, viewer: &str, registration: &Registration) {
        let mut live = self.live.lock();
        if live
            .get(viewer)
            .is_some_and(|r| r.generation == registration.generation)
        {
            live.remove(viewer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn error_codes_index_their_counters_and_are_distinct() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, index, "{code:?}");
        }
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
