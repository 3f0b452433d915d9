//! Where a new room goes: a pure choice over the candidates' reported load.
//!
//! A candidate's *score* is its load relative to the thresholds: `max(cpu / cpu_max,
//! connections / (capacity * connections_ratio_max))`, so `1.0` is "at a threshold". A candidate is
//! *under* the thresholds when both its cpu and its connections are strictly below them.
//!
//! [`choose`] picks, among available candidates, in three tiers:
//!
//! 1. the preferred region (case-insensitive), under the thresholds;
//! 2. any region, under the thresholds;
//! 3. nobody is under: the preferred region if any candidate is available there, else everyone.
//!
//! Within a tier: lowest score, then fewest rooms, then smallest id, so the choice is the same on
//! every node and in every simulation run.
//!
//! Load comes from peers' heartbeats, so nothing here trusts it: a NaN cpu counts as overloaded,
//! a negative one as idle, a zero capacity as one.

use std::cmp::Ordering;

use crate::ids::NodeId;
use crate::types::{Membership, NodeState, NodeStatus};

/// Longest region id, in bytes.
pub const REGION_BYTES_MAX: usize = 64;

/// When a node counts as loaded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// Most cpu a node should run at, as a fraction of its cores (0..1). Default 0.85.
    pub cpu_max: f32,
    /// Most connections a node should hold, as a fraction of its capacity. Default 0.9.
    pub connections_ratio_max: f32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            cpu_max: 0.85,
            connections_ratio_max: 0.9,
        }
    }
}

/// A node that could host a room, with its last reported load.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Node id.
    pub id: NodeId,
    /// Region it runs in.
    pub region: String,
    /// Alive and not draining.
    pub available: bool,
    /// CPU use as a fraction of the node's cores (0..1).
    pub cpu: f32,
    /// Open media connections.
    pub connections: u64,
    /// Capacity in connections (0 is treated as 1).
    pub capacity: u32,
    /// Rooms hosted.
    pub rooms: u64,
}

impl Candidate {
    /// CPU as scored: NaN counts as infinitely loaded, negatives as zero.
    fn cpu_sanitized(&self) -> f32 {
        if self.cpu.is_nan() {
            f32::INFINITY
        } else {
            self.cpu.max(0.0)
        }
    }

    /// Connections the thresholds allow (capacity 0 is treated as 1), as f64 to keep u64 counts exact
    /// enough.
    fn connections_allowed(&self, t: &Thresholds) -> f64 {
        f64::from(self.capacity.max(1)) * f64::from(t.connections_ratio_max)
    }

    /// Whether both cpu and connections are strictly below the thresholds.
    pub fn under(&self, t: &Thresholds) -> bool {
        // A NaN cpu or threshold compares false: not under.
        self.cpu < t.cpu_max && (self.connections as f64) < self.connections_allowed(t)
    }

    /// Load relative to the thresholds: `max(cpu / cpu_max, connections / (capacity * ratio))`;
    /// 1.0 is at a threshold. Never NaN; non-positive thresholds make any load score huge.
    pub fn score(&self, t: &Thresholds) -> f32 {
        let cpu_max = if t.cpu_max > 0.0 { t.cpu_max } else { f32::MIN_POSITIVE };
        let cpu_score = self.cpu_sanitized() / cpu_max;
        let allowed = self.connections_allowed(t);
        let allowed = if allowed > 0.0 { allowed } else { f64::MIN_POSITIVE };
        let connections_score = (self.connections as f64 / allowed) as f32;
        let score = cpu_score.max(connections_score);
        if score.is_nan() { f32::INFINITY } else { score }
    }
}

/// Orders two candidates by (score, rooms, id): the first is the better host.
pub(crate) fn compare_load(a: &Candidate, b: &Candidate, t: &Thresholds) -> Ordering {
    a.score(t)
        .total_cmp(&b.score(t))
        .then(a.rooms.cmp(&b.rooms))
        .then_with(|| a.id.cmp(&b.id))
}

/// Whether `candidate` is in `region` (case-insensitive).
pub(crate) fn in_region(candidate: &Candidate, region: &str) -> bool {
    candidate.region.eq_ignore_ascii_case(region)
}

/// The index of the best host among the candidates `eligible` accepts, by the tiers of [`choose`].
/// Shared by failover and drain, which adjust the chosen candidate's room count between choices.
pub(crate) fn choose_index(
    candidates: &[Candidate],
    preferred_region: Option<&str>,
    t: &Thresholds,
    eligible: impl Fn(&Candidate) -> bool,
) -> Option<usize> {
    let available: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].available && eligible(&candidates[i]))
        .collect();
    let preferred = |i: &usize| preferred_region.is_some_and(|region| in_region(&candidates[*i], region));
    let under = |i: &usize| candidates[*i].under(t);
    let best = |tier: Vec<usize>| {
        tier.into_iter()
            .min_by(|&a, &b| compare_load(&candidates[a], &candidates[b], t))
    };

    let tier_1: Vec<usize> = available.iter().copied().filter(|i| preferred(i) && under(i)).collect();
    if !tier_1.is_empty() {
        return best(tier_1);
    }
    let tier_2: Vec<usize> = available.iter().copied().filter(under).collect();
    if !tier_2.is_empty() {
        return best(tier_2);
    }
    let tier_3_preferred: Vec<usize> = available.iter().copied().filter(preferred).collect();
    if !tier_3_preferred.is_empty() {
        return best(tier_3_preferred);
    }
    best(available)
}

/// The node a new room should go to, or `None` when no candidate is available. See the module
/// docs for the tiers and tie-breaks.
pub fn choose(candidates: &[Candidate], preferred_region: Option<&str>, t: &Thresholds) -> Option<NodeId> {
    choose_index(candidates, preferred_region, t, |_| true).map(|i| candidates[i].id.clone())
}

/// The placement candidates among `nodes` (the store's view of the registered nodes): each
/// with its last reported load, available when alive (not dead, not draining) and in the raft
/// configuration (a voter or a learner: a node that left is not). Used by every placement: the
/// directory's, failover's and the drain's, on the node and in the simulator.
pub fn candidates(nodes: &[NodeStatus]) -> Vec<Candidate> {
    nodes
        .iter()
        .map(|n| {
            let load = n.last_load.clone().unwrap_or_default();
            Candidate {
                id: n.id.clone(),
                region: n.region.clone(),
                available: n.state == NodeState::Alive && n.membership != Membership::None,
                cpu: load.cpu,
                connections: load.connections,
                capacity: n.capacity,
                rooms: load.rooms,
            }
        })
        .collect()
}

/// Whether `region` is a valid region id: 1 to [`REGION_BYTES_MAX`] of `[A-Za-z0-9_.-]`.
pub fn is_valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= REGION_BYTES_MAX
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The region a client prefers, from sources in priority order (the edge passes
/// `x-region-preference`, `x-korean-region`, the token's claim, then the node's own region): the
/// first value that, trimmed, is a valid region id, lowercased. Empty and invalid values are
/// skipped, so a malformed header does not hide the next source.
pub fn region_preference(headers: &[Option<&str>]) -> Option<String> {
    headers
        .iter()
        .flatten()
        .map(|value| value.trim())
        .find(|value| is_valid_region(value))
        .map(str::to_ascii_lowercase)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A candidate with the given load; capacity 100, available.
    pub(crate) fn candidate(id: &str, region: &str, cpu: f32, connections: u64, rooms: u64) -> Candidate {
        Candidate {
            id: NodeId::from(id),
            region: region.to_string(),
            available: true,
            cpu,
            connections,
            capacity: 100,
            rooms,
        }
    }

    /// A registered node as the store reports it: alive, a voter, idle, last heard at 1.
    pub(crate) fn status(id: &str, region: &str) -> NodeStatus {
        NodeStatus {
            id: NodeId::from(id),
            raft_id: 0,
            region: region.to_string(),
            cluster_addr: String::new(),
            http_url: String::new(),
            grpc_url: String::new(),
            capacity: 100,
            media_ip: String::new(),
            media_ports: (0, 0),
            turn_addr: String::new(),
            state: NodeState::Alive,
            membership: Membership::Voter,
            last_load: None,
            last_heartbeat_ms: 1,
        }
    }

    #[test]
    fn candidates_are_alive_members_with_their_load() {
        let mut loaded = status("loaded", "seoul");
        loaded.last_load = Some(crate::types::NodeLoad {
            cpu: 0.5,
            connections: 7,
            rooms: 2,
            egress_bps: 0,
        });
        let mut dead = status("dead", "seoul");
        dead.state = NodeState::Dead;
        let mut draining = status("draining", "seoul");
        draining.state = NodeState::Draining;
        let mut left = status("left", "seoul");
        left.membership = Membership::None;
        let mut learner = status("learner", "busan");
        learner.membership = Membership::Learner;
        let found = candidates(&[loaded, dead, draining, left, learner]);
        let available: Vec<(&str, bool)> = found.iter().map(|c| (c.id.as_str(), c.available)).collect();
        assert_eq!(
            available,
            vec![
                ("loaded", true),
                ("dead", false),
                ("draining", false),
                ("left", false),
                ("learner", true)
            ]
        );
        assert_eq!((found[0].cpu, found[0].connections, found[0].rooms), (0.5, 7, 2));
        assert_eq!((found[4].cpu, found[4].connections, found[4].rooms), (0.0, 0, 0));
    }

    fn pick(candidates: &[Candidate], region: Option<&str>) -> Option<String> {
        choose(candidates, region, &Thresholds::default()).map(|id| id.0)
    }

    #[test]
    fn thresholds_default() {
        let t = Thresholds::default();
        assert_eq!(t.cpu_max, 0.85);
        assert_eq!(t.connections_ratio_max, 0.9);
    }

    #[test]
    fn score_is_the_larger_ratio() {
        let t = Thresholds {
            cpu_max: 0.5,
            connections_ratio_max: 0.5,
        };
        // cpu 0.25/0.5 = 0.5; connections 40/(100*0.5) = 0.8.
        assert_eq!(candidate("a", "r", 0.25, 40, 0).score(&t), 0.8);
        // cpu 0.4/0.5 = 0.8; connections 10/50 = 0.2.
        assert_eq!(candidate("a", "r", 0.4, 10, 0).score(&t), 0.8);
        assert_eq!(candidate("a", "r", 0.0, 0, 0).score(&t), 0.0);
    }

    #[test]
    fn capacity_zero_counts_as_one() {
        let t = Thresholds {
            cpu_max: 1.0,
            connections_ratio_max: 1.0,
        };
        let mut c = candidate("a", "r", 0.0, 3, 0);
        c.capacity = 0;
        assert_eq!(c.score(&t), 3.0);
        assert!(!c.under(&t));
        c.connections = 0;
        assert!(c.under(&t));
    }

    #[test]
    fn under_is_strict_on_both_thresholds() {
        let t = Thresholds {
            cpu_max: 0.5,
            connections_ratio_max: 0.5,
        };
        assert!(candidate("a", "r", 0.49, 49, 0).under(&t));
        assert!(!candidate("a", "r", 0.5, 0, 0).under(&t), "cpu at the threshold");
        assert!(
            !candidate("a", "r", 0.0, 50, 0).under(&t),
            "connections at the threshold"
        );
    }

    #[test]
    fn untrusted_load_is_sanitized() {
        let t = Thresholds::default();
        let nan = candidate("a", "r", f32::NAN, 0, 0);
        assert!(!nan.under(&t));
        assert_eq!(nan.score(&t), f32::INFINITY);
        let negative = candidate("a", "r", -3.0, 0, 0);
        assert_eq!(negative.score(&t), 0.0);
        // Broken thresholds never yield NaN.
        let zero = Thresholds {
            cpu_max: 0.0,
            connections_ratio_max: 0.0,
        };
        let idle = candidate("a", "r", 0.0, 0, 0);
        assert_eq!(idle.score(&zero), 0.0);
        assert!(!idle.under(&zero));
        assert!(candidate("a", "r", 0.1, 1, 0).score(&zero) > 1e6);
        let nan_t = Thresholds {
            cpu_max: f32::NAN,
            connections_ratio_max: f32::NAN,
        };
        assert!(!idle.score(&nan_t).is_nan());
    }

    #[test]
    fn none_only_when_no_one_is_available() {
        assert_eq!(pick(&[], Some("seoul")), None);
        let mut a = candidate("a", "seoul", 0.1, 0, 0);
        a.available = false;
        assert_eq!(pick(std::slice::from_ref(&a), Some("seoul")), None);
        // Overloaded but available still gets a room.
        let b = candidate("b", "busan", 5.0, 1_000, 0);
        assert_eq!(pick(&[a, b], Some("seoul")).as_deref(), Some("b"));
    }

    #[test]
    fn unavailable_candidates_are_never_chosen() {
        let mut idle = candidate("a", "seoul", 0.0, 0, 0);
        idle.available = false;
        let busy = candidate("b", "seoul", 0.7, 10, 9);
        assert_eq!(pick(&[idle, busy], Some("seoul")).as_deref(), Some("b"));
    }

    #[test]
    fn tier_1_preferred_region_under_thresholds_wins_over_lower_score_elsewhere() {
        let candidates = [
            candidate("busan-1", "busan", 0.1, 0, 0),
            candidate("seoul-1", "seoul", 0.6, 10, 5),
        ];
        assert_eq!(pick(&candidates, Some("seoul")).as_deref(), Some("seoul-1"));
        // Case-insensitive.
        assert_eq!(pick(&candidates, Some("SeOuL")).as_deref(), Some("seoul-1"));
        // No preference: the lowest score.
        assert_eq!(pick(&candidates, None).as_deref(), Some("busan-1"));
    }

    #[test]
    fn tier_2_any_region_when_preferred_is_loaded() {
        let candidates = [
            candidate("seoul-1", "seoul", 0.9, 0, 0),
            candidate("busan-1", "busan", 0.5, 0, 0),
            candidate("jeju-1", "jeju", 0.3, 0, 0),
        ];
        assert_eq!(pick(&candidates, Some("seoul")).as_deref(), Some("jeju-1"));
        // An unknown region behaves like no preference.
        assert_eq!(pick(&candidates, Some("tokyo")).as_deref(), Some("jeju-1"));
    }

    #[test]
    fn tier_3_preferred_region_when_no_one_is_under() {
        let candidates = [
            candidate("seoul-1", "seoul", 0.99, 0, 0),
            candidate("seoul-2", "seoul", 0.95, 0, 0),
            candidate("busan-1", "busan", 0.86, 0, 0),
        ];
        assert_eq!(pick(&candidates, Some("seoul")).as_deref(), Some("seoul-2"));
        // Nobody in the preferred region: lowest overall.
        assert_eq!(pick(&candidates, Some("jeju")).as_deref(), Some("busan-1"));
        assert_eq!(pick(&candidates, None).as_deref(), Some("busan-1"));
    }

    #[test]
    fn tier_3_ignores_unavailable_preferred_nodes() {
        let mut seoul = candidate("seoul-1", "seoul", 0.9, 0, 0);
        seoul.available = false;
        let busan = candidate("busan-1", "busan", 0.95, 0, 0);
        assert_eq!(pick(&[seoul, busan], Some("seoul")).as_deref(), Some("busan-1"));
    }

    #[test]
    fn ties_break_by_rooms_then_id() {
        let candidates = [
            candidate("c", "seoul", 0.5, 0, 2),
            candidate("b", "seoul", 0.5, 0, 1),
            candidate("a", "seoul", 0.5, 0, 1),
        ];
        assert_eq!(pick(&candidates, Some("seoul")).as_deref(), Some("a"));
        let mut reversed = candidates.clone();
        reversed.reverse();
        assert_eq!(
            pick(&reversed, Some("seoul")).as_deref(),
            Some("a"),
            "input order does not matter"
        );
        let fewer_rooms = [candidate("a", "seoul", 0.5, 0, 3), candidate("z", "seoul", 0.5, 0, 0)];
        assert_eq!(pick(&fewer_rooms, None).as_deref(), Some("z"));
    }

    #[test]
    fn score_beats_rooms() {
        let candidates = [candidate("a", "seoul", 0.5, 0, 0), candidate("b", "seoul", 0.4, 0, 50)];
        assert_eq!(pick(&candidates, None).as_deref(), Some("b"));
    }

    #[test]
    fn connections_count_toward_the_score() {
        // Same cpu; b holds 80 of 100 connections (score 0.89), a holds 10 (score ~0.11).
        let candidates = [candidate("b", "seoul", 0.1, 80, 0), candidate("a", "seoul", 0.1, 10, 0)];
        assert_eq!(pick(&candidates, None).as_deref(), Some("a"));
        // a over its connections threshold: not under, so b (under) wins even at higher cpu.
        let candidates = [candidate("a", "seoul", 0.1, 95, 0), candidate("b", "seoul", 0.8, 0, 0)];
        assert_eq!(pick(&candidates, None).as_deref(), Some("b"));
    }

    #[test]
    fn choose_index_respects_eligibility() {
        let candidates = [candidate("a", "seoul", 0.1, 0, 0), candidate("b", "seoul", 0.2, 0, 0)];
        let t = Thresholds::default();
        assert_eq!(choose_index(&candidates, None, &t, |c| c.id.as_str() != "a"), Some(1));
        assert_eq!(choose_index(&candidates, None, &t, |_| false), None);
    }

    #[test]
    fn region_preference_takes_the_first_valid_value() {
        assert_eq!(region_preference(&[]), None);
        assert_eq!(region_preference(&[None, None]), None);
        assert_eq!(
            region_preference(&[None, Some("  Seoul "), Some("busan")]).as_deref(),
            Some("seoul")
        );
        assert_eq!(
            region_preference(&[Some(""), Some("   "), Some("busan")]).as_deref(),
            Some("busan")
        );
        assert_eq!(
            region_preference(&[Some("ap-northeast_2.a")]).as_deref(),
            Some("ap-northeast_2.a")
        );
    }

    #[test]
    fn region_preference_skips_invalid_values() {
        assert_eq!(
            region_preference(&[Some("seoul;drop"), Some("busan")]).as_deref(),
            Some("busan")
        );
        assert_eq!(
            region_preference(&[Some("서울"), Some("jeju")]).as_deref(),
            Some("jeju")
        );
        assert_eq!(region_preference(&[Some("a b")]), None);
        let longest = "r".repeat(REGION_BYTES_MAX);
        let too_long = "r".repeat(REGION_BYTES_MAX + 1);
        assert_eq!(region_preference(&[Some(&too_long), None]), None);
        assert_eq!(
            region_preference(&[Some(&too_long), Some(&longest)]),
            Some(longest.clone())
        );
    }

    #[test]
    fn is_valid_region_bounds() {
        assert!(!is_valid_region(""));
        assert!(is_valid_region("a"));
        assert!(is_valid_region(&"a".repeat(REGION_BYTES_MAX)));
        assert!(!is_valid_region(&"a".repeat(REGION_BYTES_MAX + 1)));
        assert!(!is_valid_region("seoul/1"));
    }
}
