//! The mesh's timings and retry bounds, named once: the node's tasks (`src/mesh/`,
//! `src/directory.rs`, the room actor's fence through the directory port) and the simulator's
//! control plane (`simulations/src/control.rs`, `simulations/src/config.rs`) both read them
//! from here, so the simulated node waits exactly as long as the shipped one.
//!
//! Milliseconds (`u64`) because the sans-IO cores count time that way; the async shells turn
//! them into `Duration`s where they sleep.

/// A hosted room checks this often that the directory still names this node under its epoch
/// (the fence): a stale host demotes itself within one interval of hearing from the cluster.
pub const FENCE_INTERVAL_MS: u64 = 500;

/// Reads of the directory, each followed by a compare-and-set, before a placement that keeps
/// losing races to concurrent writers gives up (the caller sees an error and may retry).
pub const PLACE_ATTEMPTS_MAX: usize = 3;

/// A migration's flip whose outcome is unknown (timeout, no leader, transport) is proposed
/// again this often: a leader election takes about a second, so 250 ms retries find the new
/// leader quickly without flooding a store that is still electing.
pub const FLIP_RETRY_MS: u64 = 250;
/// ... until this long after the first proposal; then the migration gives up with the epoch
/// this replica shows (the fence and the relays put the room right if the flip applied later).
/// Four store request deadlines: a flip survives a couple of elections.
pub const FLIP_OUTCOME_DEADLINE_MS: u64 = 20_000;

/// The migration target must hold the room's tracks within this long, or the migration is
/// called off.
pub const HANDOFF_TIMEOUT_MS: u64 = 5_000;
/// The target answers a handoff this long before [`HANDOFF_TIMEOUT_MS`] ends, so its answer
/// (even a refusal) reaches the source before the source gives up.
pub const HANDOFF_ANSWER_MARGIN_MS: u64 = 500;
/// After the flip, the room's clients have this long to leave the source before the migration
/// counts as done anyway.
pub const CLIENTS_DEADLINE_MS: u64 = 15_000;
/// A room made for a handoff stays open this long waiting for its clients.
pub const HANDOFF_HOLD_MS: u64 = 20_000;
/// A running migration looks at its room this often.
pub const MIGRATION_POLL_MS: u64 = 50;
/// A drain looks at its rooms this often (twice the migration poll: it starts migrations, it
/// does not watch them).
pub const DRAIN_POLL_MS: u64 = 2 * MIGRATION_POLL_MS;
/// A unary mesh call (promote) gives up after this long.
pub const CALL_TIMEOUT_MS: u64 = 10_000;

/// The leader's failover loop never ticks faster than this, however short the heartbeat
/// interval (a test setting): each tick reads every node's registration.
pub const FAILOVER_TICK_MIN_MS: u64 = 20;

/// How often the leader's failover loop looks at the heartbeats: four times per heartbeat
/// interval, so a node is declared dead within a quarter interval of its deadline.
pub const fn failover_tick_ms(heartbeat_interval_ms: u64) -> u64 {
    let tick = heartbeat_interval_ms / 4;
    if tick > FAILOVER_TICK_MIN_MS {
        tick
    } else {
        FAILOVER_TICK_MIN_MS
    }
}

// A handoff's answer leaves room before the timeout, and a flip is retried before it gives up.
const _: () = assert!(HANDOFF_ANSWER_MARGIN_MS < HANDOFF_TIMEOUT_MS);
const _: () = assert!(FLIP_RETRY_MS < FLIP_OUTCOME_DEADLINE_MS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failover_tick_is_a_quarter_heartbeat_with_a_floor() {
        assert_eq!(failover_tick_ms(500), 125);
        assert_eq!(failover_tick_ms(40), FAILOVER_TICK_MIN_MS);
        assert_eq!(failover_tick_ms(0), FAILOVER_TICK_MIN_MS);
    }
}
