//! A node's viewer sessions (the signal session's store-facing part, `src/signal/`) and the
//! store's viewer batcher (`Store::run_viewer_batcher`).
//!
//! - **Join**: with a resume token, a linearizable read of the viewer state; taken back when it
//!   is at most [`RESUME_WINDOW_MS`] old by this node's clock, else (or when the read fails, as
//!   `resume_state` does) a fresh session. Then the room is located (`get_or_create`), the
//!   session opens and its state is written; the join is answered once that write commits, so
//!   the client's acknowledged state is a committed one.
//!   Every write carries the session's generation (`Joined::generation`): 0 for a new session,
//!   one more than the state it took over for a resume; the state machine ignores a write of
//!   an older generation, so a late write of the session the viewer left never puts an older
//!   state back, and one of the same generation only from the session whose write committed
//!   first (`ViewerState::accepts`). A writer answered with another session's state lost the
//!   viewer (`persist_viewer`): its waiter fails and its session ends, without a final write.
//! - **Position**: a write of the session's state (batched).
//! - **Disconnect**, **moved**, **closed**: the session ends and writes its state once more
//!   (a fresh stamp: the window counts from the drop); the state stays for a resume.
//! - **Leave**: the session ends and its state is deleted.
//!
//! The batcher coalesces updates per viewer (last write wins, but never over a higher
//! generation; every writer gets the stored state), proposes at once when nothing is in flight, lingers [`VIEWER_BATCH_MS`] otherwise,
//! and keeps at most [`VIEWER_BATCHES_IN_FLIGHT_MAX`] proposals in flight.

use std::collections::BTreeMap;

use mediamesh_cluster::command::{Command, VIEWERS_PER_UPSERT_MAX};
use mediamesh_cluster::types::ViewerState;
use mediamesh_cluster::{RoomId, ViewerId};

use crate::config::{RESUME_WINDOW_MS, VIEWER_BATCH_MS, VIEWER_BATCHES_IN_FLIGHT_MAX, VIEWER_UPDATES_MAX};
use crate::control::RoomWaiter;
use crate::message::{ClientId, ClientReply, ClientRequest, NodeIndex, ResumeOutcome};
use crate::node::{Ctx, Effect, Live, NodeTimer, OpResult, Purpose};

/// One viewer session on this node.
#[derive(Clone, Debug)]
pub struct Session {
    /// The client.
    pub client: ClientId,
    /// The room watched.
    pub room: RoomId,
    /// Session name (changes with every session of the viewer).
    pub session: String,
    /// Last position reported.
    pub position_ms: u64,
    /// The generation its writes carry: 0 for a new viewer, the resumed state's + 1.
    pub generation: u64,
}

/// The writes of one viewer in a batch: the writing session's name and who waits, each.
pub type Writers = Vec<(String, Waiter)>;

/// Who waits for a viewer write.
#[derive(Clone, Debug)]
pub enum Waiter {
    /// A join, answered once its first write commits.
    Join { join: u64 },
    /// A position report.
    Position { client: ClientId, request: u64 },
    /// The write a session makes as it ends (nobody waits for it).
    Final,
}

#[derive(Debug)]
struct Join {
    client: ClientId,
    request: u64,
    room: RoomId,
    resume: Option<ViewerId>,
    fresh: ViewerId,
    outcome: ResumeOutcome,
    read_clock_ms: u64,
}

/// The sessions and the batcher of one node.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Open sessions, by viewer.
    pub by_viewer: BTreeMap<ViewerId, Session>,
    queue: BTreeMap<ViewerId, (ViewerState, Writers)>,
    queued_since_ms: Option<u64>,
    window_timer_at_ms: Option<u64>,
    in_flight: usize,
    joins: BTreeMap<u64, Join>,
    next_join: u64,
    sessions_opened: u64,
}

impl Sessions {
    /// Sessions watching `room`.
    pub fn in_room(&self, room: &RoomId) -> usize {
        self.by_viewer.values().filter(|s| s.room == *room).count()
    }
}

impl Live {
    /// A client's request.
    pub fn on_client(&mut self, ctx: &mut Ctx<'_>, client: ClientId, request: ClientRequest) {
        match request {
            ClientRequest::Join {
                request,
                room,
                resume,
                fresh,
            } => {
                let id = self.sessions.next_join;
                self.sessions.next_join += 1;
                let clock = self.clock_ms(ctx);
                self.sessions.joins.insert(
                    id,
                    Join {
                        client,
                        request,
                        room: room.clone(),
                        resume: resume.clone(),
                        fresh,
                        outcome: ResumeOutcome::Fresh,
                        read_clock_ms: clock,
                    },
                );
                if resume.is_some() {
                    self.read(ctx, Purpose::ResumeRead { join: id });
                } else {
                    self.ensure_room(ctx, room, RoomWaiter::Join { join: id });
                }
            }
            ClientRequest::Position {
                request,
                viewer,
                position_ms,
            } => {
                let Some(session) = self.sessions.by_viewer.get_mut(&viewer).filter(|s| s.client == client) else {
                    ctx.reply(
                        client,
                        ClientReply::PositionFailed {
                            request,
                            reason: "no such session here".into(),
                        },
                    );
                    return;
                };
                session.position_ms = position_ms;
                let session = session.clone();
                let state = self.viewer_state(ctx, &viewer, &session);
                self.enqueue_viewer(ctx, state, Waiter::Position { client, request });
            }
            ClientRequest::Disconnect { viewer } => {
                if self.sessions.by_viewer.get(&viewer).is_some_and(|s| s.client == client) {
                    self.end_session(ctx, &viewer);
                }
            }
            ClientRequest::Leave { request, viewer } => {
                if self.sessions.by_viewer.get(&viewer).is_some_and(|s| s.client == client) {
                    self.sessions.by_viewer.remove(&viewer);
                }
                self.propose(
                    ctx,
                    vec![Command::DeleteViewer { viewer }],
                    Purpose::DeleteViewer { client, request },
                );
            }
        }
    }

    /// The resume read finished: judge the state by this node's clock (`resume_state`).
    pub(crate) fn resume_read_done(&mut self, ctx: &mut Ctx<'_>, join: u64, result: OpResult) {
        let clock = self.clock_ms(ctx);
        let Some(j) = self.sessions.joins.get_mut(&join) else {
            return;
        };
        j.read_clock_ms = clock;
        j.outcome = match (result, &j.resume) {
            (Err(e), _) => ResumeOutcome::Unreadable(e.to_string()),
            (Ok(_), None) => ResumeOutcome::Fresh,
            (Ok(_), Some(viewer)) => match self.core.state().read().viewers().get(viewer) {
                Some(state) if clock.saturating_sub(state.updated_at_ms) <= RESUME_WINDOW_MS => {
                    ResumeOutcome::Resumed(state.clone())
                }
                other => ResumeOutcome::Expired(other.cloned()),
            },
        };
        let room = j.room.clone();
        self.ensure_room(ctx, room, RoomWaiter::Join { join });
    }

    /// The join's room is ready here (or could not be located).
    pub(crate) fn join_room_ready(&mut self, ctx: &mut Ctx<'_>, join: u64, result: Result<(), String>) {
        let Some(j) = self.sessions.joins.get(&join) else {
            return;
        };
        if let Err(reason) = result {
            let (client, request) = (j.client, j.request);
            self.sessions.joins.remove(&join);
            ctx.reply(client, ClientReply::JoinFailed { request, reason });
            return;
        }
        let (viewer, position_ms, generation) = match &j.outcome {
            ResumeOutcome::Resumed(state) => (
                state.viewer.clone(),
                state.position_ms,
                state.generation.saturating_add(1),
            ),
            _ => (j.fresh.clone(), 0, 0),
        };
        self.sessions.sessions_opened += 1;
        let session = Session {
            client: j.client,
            room: j.room.clone(),
            session: format!("s{}-{}-{}", self.me, self.incarnation, self.sessions.sessions_opened),
            position_ms,
            generation,
        };
        self.sessions.by_viewer.insert(viewer.clone(), session.clone());
        let state = self.viewer_state(ctx, &viewer, &session);
        self.enqueue_viewer(ctx, state, Waiter::Join { join });
    }

    /// Ends a session that may resume: its state is written once more, now, so the resume
    /// window counts from the drop (`Session::end` for a dropped or moved session).
    fn end_session(&mut self, ctx: &mut Ctx<'_>, viewer: &ViewerId) -> Option<Session> {
        let session = self.sessions.by_viewer.remove(viewer)?;
        let state = self.viewer_state(ctx, viewer, &session);
        self.enqueue_viewer(ctx, state, Waiter::Final);
        Some(session)
    }

    fn viewer_state(&self, ctx: &Ctx<'_>, viewer: &ViewerId, session: &Session) -> ViewerState {
        ViewerState {
            viewer: viewer.clone(),
            room: session.room.clone(),
            node: self.node_id().clone(),
            session: session.session.clone(),
            display_name: String::new(),
            position_ms: session.position_ms,
            subscriptions: vec!["video".into()],
            layers: BTreeMap::new(),
            // The store stamps the update when it is submitted.
            updated_at_ms: self.clock_ms(ctx),
            expires_at_ms: 0,
            revision: 0,
            generation: session.generation,
        }
    }

    fn enqueue_viewer(&mut self, ctx: &mut Ctx<'_>, state: ViewerState, waiter: Waiter) {
        let queued = self.sessions.queue.contains_key(&state.viewer);
        if !queued && self.sessions.queue.len() >= VIEWER_UPDATES_MAX {
            self.viewer_write_failed(ctx, waiter, "overloaded: viewer update queue".into());
            return;
        }
        let entry = self
            .sessions
            .queue
            .entry(state.viewer.clone())
            .or_insert_with(|| (state.clone(), Vec::new()));
        entry.1.push((state.session.clone(), waiter));
        // Last write per viewer wins, but never over a newer generation (a resume).
        if state.generation >= entry.0.generation {
            entry.0 = state;
        }
        if self.sessions.queued_since_ms.is_none() {
            self.sessions.queued_since_ms = Some(ctx.now_ms);
        }
        self.flush_viewer_batch(ctx);
    }

    /// Proposes queued viewer updates when the batcher's rules allow.
    pub(crate) fn flush_viewer_batch(&mut self, ctx: &mut Ctx<'_>) {
        let Some(since) = self.sessions.queued_since_ms else {
            return;
        };
        if self.sessions.in_flight >= VIEWER_BATCHES_IN_FLIGHT_MAX {
            return; // flushed when a batch completes
        }
        let window_end = since + VIEWER_BATCH_MS;
        if self.sessions.in_flight > 0 && ctx.now_ms < window_end {
            if self.sessions.window_timer_at_ms != Some(window_end) {
                self.sessions.window_timer_at_ms = Some(window_end);
                ctx.out.push(Effect::Timer {
                    at_ms: window_end,
                    timer: NodeTimer::BatchWindow,
                });
            }
            return;
        }
        let mut states = Vec::new();
        let mut waiters = Vec::new();
        while states.len() < VIEWERS_PER_UPSERT_MAX {
            let Some((viewer, (state, ws))) = self.sessions.queue.pop_first() else {
                break;
            };
            states.push(state);
            waiters.push((viewer, ws));
        }
        self.sessions.queued_since_ms = (!self.sessions.queue.is_empty()).then_some(ctx.now_ms);
        self.sessions.in_flight += 1;
        let sent = states.clone();
        self.propose(
            ctx,
            vec![Command::UpsertViewers { viewers: states }],
            Purpose::ViewerBatch { waiters, sent },
        );
    }

    /// A viewer batch committed (or failed). A writer the store answers with another
    /// session's state lost the viewer (`persist_viewer`): a resume took it over, or it was a
    /// resume that lost the claim to another resume of the same state. Its session ends here
    /// without a final write, and its waiter fails, so a client still there resumes again.
    pub(crate) fn viewer_batch_done(
        &mut self,
        ctx: &mut Ctx<'_>,
        waiters: Vec<(ViewerId, Writers)>,
        sent: Vec<ViewerState>,
        result: OpResult,
    ) {
        self.sessions.in_flight = self.sessions.in_flight.saturating_sub(1);
        let stored: Result<BTreeMap<ViewerId, ViewerState>, String> = match result {
            Ok(mut outcomes) => match outcomes.pop().and_then(|o| o.stored_viewers(sent)) {
                Some(states) => Ok(states.into_iter().map(|s| (s.viewer.clone(), s)).collect()),
                None => Err("unexpected outcome".to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        for (viewer, ws) in waiters {
            for (session, waiter) in ws {
                match stored.as_ref().map(|s| s.get(&viewer)) {
                    Ok(Some(state)) if state.session == session => self.viewer_write_acked(ctx, waiter, state.clone()),
                    Ok(Some(_)) => {
                        if self
                            .sessions
                            .by_viewer
                            .get(&viewer)
                            .is_some_and(|s| s.session == session)
                        {
                            self.sessions.by_viewer.remove(&viewer);
                        }
                        self.viewer_write_failed(ctx, waiter, "taken over by another session".into());
                    }
                    Ok(None) => self.viewer_write_failed(ctx, waiter, "no stored state".into()),
                    Err(e) => self.viewer_write_failed(ctx, waiter, e.clone()),
                }
            }
        }
        self.flush_viewer_batch(ctx);
    }

    fn viewer_write_acked(&mut self, ctx: &mut Ctx<'_>, waiter: Waiter, state: ViewerState) {
        match waiter {
            Waiter::Position { client, request } => {
                ctx.reply(client, ClientReply::PositionAcked { request, acked: state })
            }
            Waiter::Final => {}
            Waiter::Join { join } => {
                if let Some(j) = self.sessions.joins.remove(&join) {
                    ctx.reply(
                        j.client,
                        ClientReply::Joined {
                            request: j.request,
                            acked: state,
                            resume: j.outcome,
                            read_clock_ms: j.read_clock_ms,
                        },
                    );
                }
            }
        }
    }

    fn viewer_write_failed(&mut self, ctx: &mut Ctx<'_>, waiter: Waiter, reason: String) {
        match waiter {
            Waiter::Position { client, request } => ctx.reply(client, ClientReply::PositionFailed { request, reason }),
            Waiter::Final => {}
            Waiter::Join { join } => {
                if let Some(j) = self.sessions.joins.remove(&join) {
                    // The session does not count as joined: the client retries.
                    let viewer = match &j.outcome {
                        ResumeOutcome::Resumed(state) => state.viewer.clone(),
                        _ => j.fresh.clone(),
                    };
                    if self
                        .sessions
                        .by_viewer
                        .get(&viewer)
                        .is_some_and(|s| s.client == j.client)
                    {
                        self.sessions.by_viewer.remove(&viewer);
                    }
                    ctx.reply(
                        j.client,
                        ClientReply::JoinFailed {
                            request: j.request,
                            reason,
                        },
                    );
                }
            }
        }
    }

    /// Tells every session of `room` to move to `to` and ends them here.
    pub(crate) fn move_sessions(&mut self, ctx: &mut Ctx<'_>, room: &RoomId, to: NodeIndex) {
        let moving: Vec<ViewerId> = self
            .sessions
            .by_viewer
            .iter()
            .filter(|(_, s)| s.room == *room)
            .map(|(v, _)| v.clone())
            .collect();
        for viewer in moving {
            if let Some(session) = self.end_session(ctx, &viewer) {
                ctx.reply(session.client, ClientReply::Moved { viewer, to });
            }
        }
    }

    /// Ends every session here (a drain's deadline).
    pub(crate) fn close_sessions(&mut self, ctx: &mut Ctx<'_>) {
        let viewers: Vec<ViewerId> = self.sessions.by_viewer.keys().cloned().collect();
        for viewer in viewers {
            if let Some(session) = self.end_session(ctx, &viewer) {
                ctx.reply(session.client, ClientReply::Closed { viewer });
            }
        }
    }
}
