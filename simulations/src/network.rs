//! The simulated network between nodes: latency by region (about 10 ms one way between Seoul
//! and Busan, about 1 ms inside a region, both jittered, so messages reorder naturally), and the
//! faults the world switches on and off:
//!
//! - **loss**: each raft message is dropped, duplicated or delayed extra with given
//!   probabilities (the raft transport sends batches that may be lost). The other messages are
//!   unary RPCs over a reliable stream: a "lost" one is retransmitted (delayed by
//!   [`RETRANSMIT_DELAY_MS`] and more), never duplicated;
//! - **partitions**: a blocked directed link drops everything sent on it (a region split, one
//!   node isolated, or a node isolated from all but one peer);
//! - **clogging** (FoundationDB's swizzle-clogging): a clogged link holds what is sent on it and
//!   releases it, in order, when unclogged. The world clogs links one by one and unclogs them in
//!   random order.
//!
//! Messages already in flight when a link is blocked still arrive (they left before).
//! Everything is bounded: [`LINK_IN_FLIGHT_MAX`] per link in flight, [`LINK_HELD_MAX`] held on
//! a clogged link; beyond that messages are dropped and counted.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::Rng;
use rand::rngs::StdRng;

use crate::config::{
    CROSS_REGION_JITTER_MS, CROSS_REGION_LATENCY_MS, IN_REGION_JITTER_MS, IN_REGION_LATENCY_MS, LINK_HELD_MAX,
    LINK_IN_FLIGHT_MAX,
};
use crate::message::{NodeIndex, Payload};

/// Extra delay, at least, of an RPC message the loss model "dropped" (TCP retransmits it).
pub const RETRANSMIT_DELAY_MS: u64 = 200;

/// Per-message fault probabilities, in parts per million.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    /// Dropped.
    pub drop_ppm: u32,
    /// Delivered twice.
    pub duplicate_ppm: u32,
    /// Delayed by up to `reorder_delay_ms` more.
    pub reorder_ppm: u32,
    /// The most extra delay of a reordered message.
    pub reorder_delay_ms: u64,
}

/// Counters of what the network did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages sent.
    pub sent: u64,
    /// Dropped on a blocked link.
    pub dropped_partition: u64,
    /// Raft messages dropped by loss.
    pub dropped_loss: u64,
    /// RPC messages delayed by a retransmission instead.
    pub retransmitted: u64,
    /// Dropped because a link's in-flight or held queue was full.
    pub dropped_full: u64,
    /// Delivered twice.
    pub duplicated: u64,
    /// Held on a clogged link.
    pub held: u64,
}

/// Why a message did not go out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The link is blocked by a partition.
    Partition,
    /// Random loss.
    Loss,
    /// The link's queue is full.
    Full,
}

/// What happened to one sent message.
#[derive(Debug)]
pub enum Route {
    /// Deliver after each of these delays (two for a duplicate).
    Deliver(Vec<u64>),
    /// Held on a clogged link until it is unclogged.
    Held,
    /// Dropped.
    Dropped(DropReason),
}

/// The network between `n` nodes.
pub struct Network {
    regions: Vec<String>,
    blocked: BTreeSet<(NodeIndex, NodeIndex)>,
    clogged: BTreeMap<(NodeIndex, NodeIndex), VecDeque<Payload>>,
    in_flight: BTreeMap<(NodeIndex, NodeIndex), usize>,
    loss: Loss,
    /// What the network did so far.
    pub stats: NetStats,
}

impl Network {
    /// A healthy network between nodes in `regions` (one entry per node).
    pub fn new(regions: Vec<String>) -> Self {
        Network {
            regions,
            blocked: BTreeSet::new(),
            clogged: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            loss: Loss::default(),
            stats: NetStats::default(),
        }
    }

    /// One-way latency of a message from `from` to `to`, jittered.
    pub fn latency_ms(&self, from: NodeIndex, to: NodeIndex, rng: &mut StdRng) -> u64 {
        one_way_ms(self.regions[from] == self.regions[to], IN_REGION_LATENCY_MS, rng)
    }

    /// Routes one message; the caller schedules the deliveries and calls [`Self::delivered`]
    /// for each.
    pub fn send(&mut self, from: NodeIndex, to: NodeIndex, payload: &Payload, rng: &mut StdRng) -> Route {
        self.stats.sent += 1;
        if self.blocked.contains(&(from, to)) {
            self.stats.dropped_partition += 1;
            return Route::Dropped(DropReason::Partition);
        }
        if let Some(held) = self.clogged.get_mut(&(from, to)) {
            if held.len() >= LINK_HELD_MAX {
                self.stats.dropped_full += 1;
                return Route::Dropped(DropReason::Full);
            }
            self.stats.held += 1;
            held.push_back(payload.clone());
            return Route::Held;
        }
        self.route_open_link(from, to, matches!(payload, Payload::Raft(_)), rng)
    }

    fn route_open_link(&mut self, from: NodeIndex, to: NodeIndex, lossy: bool, rng: &mut StdRng) -> Route {
        let in_flight = self.in_flight.entry((from, to)).or_insert(0);
        if *in_flight >= LINK_IN_FLIGHT_MAX {
            self.stats.dropped_full += 1;
            return Route::Dropped(DropReason::Full);
        }
        let loss = self.loss;
        let mut base = self.latency_ms(from, to, rng);
        if loss.drop_ppm > 0 && rng.random_range(0..1_000_000) < loss.drop_ppm {
            if lossy {
                self.stats.dropped_loss += 1;
                return Route::Dropped(DropReason::Loss);
            }
            self.stats.retransmitted += 1;
            base += RETRANSMIT_DELAY_MS + rng.random_range(0..=4 * RETRANSMIT_DELAY_MS);
        }
        let mut delays = Vec::with_capacity(2);
        let extra = if loss.reorder_ppm > 0 && rng.random_range(0..1_000_000) < loss.reorder_ppm {
            rng.random_range(0..=loss.reorder_delay_ms)
        } else {
            0
        };
        delays.push(base + extra);
        if lossy && loss.duplicate_ppm > 0 && rng.random_range(0..1_000_000) < loss.duplicate_ppm {
            self.stats.duplicated += 1;
            delays.push(base + rng.random_range(0..=loss.reorder_delay_ms.max(5)));
        }
        let in_flight = self.in_flight.entry((from, to)).or_insert(0);
        *in_flight += delays.len();
        Route::Deliver(delays)
    }

    /// A message scheduled by [`Self::send`] arrived (or was discarded at a down node).
    pub fn delivered(&mut self, from: NodeIndex, to: NodeIndex) {
        if let Some(n) = self.in_flight.get_mut(&(from, to)) {
            *n = n.saturating_sub(1);
        }
    }

    /// Sets the loss model (zero: a clean network).
    pub fn set_loss(&mut self, loss: Loss) {
        self.loss = loss;
    }

    /// Blocks the directed link `from → to`.
    pub fn block(&mut self, from: NodeIndex, to: NodeIndex) {
        self.blocked.insert((from, to));
    }

    /// Removes every partition.
    pub fn unblock_all(&mut self) {
        self.blocked.clear();
    }

    /// Clogs the directed link `from → to`: what is sent on it is held.
    pub fn clog(&mut self, from: NodeIndex, to: NodeIndex) {
        self.clogged.entry((from, to)).or_default();
    }

    /// Unclogs `from → to`; returns the held messages, oldest first, each with its delay.
    pub fn unclog(&mut self, from: NodeIndex, to: NodeIndex, rng: &mut StdRng) -> Vec<(u64, Payload)> {
        let Some(held) = self.clogged.remove(&(from, to)) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(held.len());
        let mut last = 0;
        for payload in held {
            // Held messages leave in order: never before the previous one.
            let delay = self.latency_ms(from, to, rng).max(last);
            last = delay;
            *self.in_flight.entry((from, to)).or_insert(0) += 1;
            out.push((delay, payload));
        }
        out
    }

    /// The clogged links, in order.
    pub fn clogged_links(&self) -> Vec<(NodeIndex, NodeIndex)> {
        self.clogged.keys().copied().collect()
    }
}

/// One-way latency on a link: `in_region_ms` (nodes, or a client and its region's node) or
/// the Seoul–Busan latency, plus jitter.
pub fn one_way_ms(same_region: bool, in_region_ms: u64, rng: &mut StdRng) -> u64 {
    if same_region {
        in_region_ms + rng.random_range(0..=IN_REGION_JITTER_MS)
    } else {
        CROSS_REGION_LATENCY_MS + rng.random_range(0..=CROSS_REGION_JITTER_MS)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn ping() -> Payload {
        Payload::Watch { room: "r".into() }
    }

    #[test]
    fn latency_partitions_and_clogs() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut net = Network::new(vec!["seoul".into(), "seoul".into(), "busan".into()]);
        match net.send(0, 1, &ping(), &mut rng) {
            Route::Deliver(d) => assert!(d[0] <= IN_REGION_LATENCY_MS + IN_REGION_JITTER_MS),
            other => panic!("{other:?}"),
        }
        match net.send(0, 2, &ping(), &mut rng) {
            Route::Deliver(d) => assert!(d[0] >= CROSS_REGION_LATENCY_MS),
            other => panic!("{other:?}"),
        }
        net.block(0, 2);
        assert!(matches!(
            net.send(0, 2, &ping(), &mut rng),
            Route::Dropped(DropReason::Partition)
        ));
        assert!(
            matches!(net.send(2, 0, &ping(), &mut rng), Route::Deliver(_)),
            "one way"
        );
        net.unblock_all();
        net.clog(1, 2);
        assert!(matches!(net.send(1, 2, &ping(), &mut rng), Route::Held));
        assert!(matches!(net.send(1, 2, &ping(), &mut rng), Route::Held));
        let released = net.unclog(1, 2, &mut rng);
        assert_eq!(released.len(), 2);
        assert!(released[0].0 <= released[1].0, "held messages keep their order");
        assert!(net.unclog(1, 2, &mut rng).is_empty());
    }

    #[test]
    fn loss_drops_and_duplicates() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut net = Network::new(vec!["seoul".into(), "seoul".into()]);
        net.set_loss(Loss {
            drop_ppm: 500_000,
            duplicate_ppm: 500_000,
            reorder_ppm: 0,
            reorder_delay_ms: 0,
        });
        let mut dropped = 0;
        let mut doubled = 0;
        let raft = Payload::Raft(Box::default());
        for _ in 0..1000 {
            match net.send(0, 1, &raft, &mut rng) {
                Route::Dropped(DropReason::Loss) => dropped += 1,
                Route::Deliver(d) if d.len() == 2 => doubled += 1,
                _ => {}
            }
        }
        assert!((300..700).contains(&dropped), "{dropped}");
        assert!(doubled > 100, "{doubled}");
        assert_eq!(net.stats.dropped_loss, dropped);
        // An RPC is never lost or duplicated: a "drop" is a retransmission delay.
        for _ in 0..200 {
            match net.send(0, 1, &ping(), &mut rng) {
                Route::Deliver(d) => assert_eq!(d.len(), 1),
                other => panic!("{other:?}"),
            }
        }
        assert!(net.stats.retransmitted > 50);
    }
}
