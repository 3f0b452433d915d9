//! A node's durable raft storage in memory: the log, hard state, conf state and the last
//! snapshot (with the state machine's bytes), shared between the replica and the node so it
//! survives a simulated crash.
//!
//! Why not `raft::storage::MemStorage`: its `snapshot()` carries no data (a follower installing
//! it would get an empty state machine) and compacting it loses the term at the compaction
//! point. This keeps what `mediamesh_cluster::storage::SledStorage` keeps and answers raft by
//! the same rules (`storage::rules`: range and term checks, snapshots, the `snapshot_wanted`
//! signal), so log compaction and snapshot catch-up run as in production.
//!
//! Every write is durable at once: the simulator processes one raft Ready inside one event,
//! so a crash (which happens between events) never sees half of it. As in the node, raft's
//! configuration starts from the snapshot's, and a restarted core applies the changes after it
//! again.

use std::cell::RefCell;
use std::rc::Rc;

use mediamesh_cluster::StoreError;
use mediamesh_cluster::storage::{LogStore, rules};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};

#[derive(Default)]
struct Core {
    hard_state: HardState,
    /// Last snapshot; its index is the compaction point.
    snapshot: Snapshot,
    /// Entries after the snapshot, in order, without gaps.
    entries: Vec<Entry>,
    snapshot_wanted: bool,
}

impl Core {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }
    fn first_index(&self) -> u64 {
        self.snapshot_index() + 1
    }
    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.snapshot_index(), |e| e.index)
    }
    /// The configuration raft starts from: the snapshot's, as `SledStorage` answers.
    fn conf_state(&self) -> &ConfState {
        self.snapshot.get_metadata().get_conf_state()
    }
}

/// The durable raft storage of one simulated node. Cheap to clone (shared core).
#[derive(Clone, Default)]
pub struct SimStorage {
    core: Rc<RefCell<Core>>,
}

/// A storage operation the simulator's shell got wrong (a bug in the shell, not an input).
#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StorageBug(pub String);

impl SimStorage {
    /// A storage holding `snapshot` (the bootstrap snapshot every node starts from).
    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let storage = SimStorage::default();
        storage.apply_snapshot(&snapshot);
        storage
    }

    /// Replaces the log with a snapshot received from the leader (or the bootstrap one).
    pub fn apply_snapshot(&self, snapshot: &Snapshot) {
        let mut core = self.core.borrow_mut();
        let meta = snapshot.get_metadata();
        core.hard_state.term = core.hard_state.term.max(meta.term);
        core.hard_state.commit = meta.index;
        core.entries.clear();
        core.snapshot = snapshot.clone();
    }

    /// Appends entries from a Ready, replacing any conflicting suffix.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StorageBug> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut core = self.core.borrow_mut();
        if first.index <= core.snapshot_index() || first.index > core.last_index() + 1 {
            return Err(StorageBug(format!(
                "append at {} to a log of [{}, {}]",
                first.index,
                core.first_index(),
                core.last_index()
            )));
        }
        let keep = (first.index - core.first_index()) as usize;
        core.entries.truncate(keep);
        core.entries.extend_from_slice(entries);
        Ok(())
    }

    /// What a restart sees: no snapshot asked for yet (as `Disk::open` starts).
    pub fn reopen(&self) {
        self.core.borrow_mut().snapshot_wanted = false;
    }

    /// The state machine bytes of the last snapshot.
    pub fn snapshot_data(&self) -> Vec<u8> {
        self.core.borrow().snapshot.get_data().to_vec()
    }

    /// Records a snapshot of the applied state at `index` and drops the log up to it.
    pub fn compact_to(&self, index: u64, term: u64, conf_state: &ConfState, data: Vec<u8>) -> Result<(), StorageBug> {
        let mut core = self.core.borrow_mut();
        if index <= core.snapshot_index() {
            return Ok(());
        }
        if index > core.last_index() {
            return Err(StorageBug(format!(
                "compaction at {index} beyond the log end {}",
                core.last_index()
            )));
        }
        let snapshot = rules::snapshot_at(index, term, conf_state, data);
        let drop = (index - core.snapshot_index()) as usize;
        core.entries.drain(..drop);
        core.snapshot = snapshot;
        core.snapshot_wanted = false;
        Ok(())
    }

    /// Index of the last entry (or of the snapshot when the log is empty).
    pub fn last_index(&self) -> u64 {
        self.core.borrow().last_index()
    }
}

fn storage_bug(e: StorageBug) -> StoreError {
    StoreError::Storage(e.to_string())
}

impl LogStore for SimStorage {
    fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        SimStorage::append(self, entries).map_err(storage_bug)
    }

    fn set_hard_state(&self, hard_state: &HardState) -> Result<(), StoreError> {
        self.core.borrow_mut().hard_state = hard_state.clone();
        Ok(())
    }

    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.apply_snapshot(snapshot);
        Ok(())
    }

    fn compact(&self, index: u64, term: u64, conf_state: &ConfState, data: Vec<u8>) -> Result<(), StoreError> {
        self.compact_to(index, term, conf_state, data).map_err(storage_bug)
    }

    fn snapshot_index(&self) -> u64 {
        self.core.borrow().snapshot_index()
    }

    fn snapshot_wanted(&self) -> bool {
        self.core.borrow().snapshot_wanted
    }
}

impl raft::Storage for SimStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.core.borrow();
        Ok(RaftState::new(core.hard_state.clone(), core.conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.core.borrow();
        rules::check_range(core.first_index(), core.last_index(), low, high)?;
        let from = (low - core.first_index()) as usize;
        let to = (high - core.first_index()) as usize;
        let mut entries = core.entries[from..to].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let core = self.core.borrow();
        if let Some(term) = rules::snapshot_term(&core.snapshot, core.last_index(), index)? {
            return Ok(term);
        }
        Ok(core.entries[(index - core.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.core.borrow().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.core.borrow().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let core = &mut *self.core.borrow_mut();
        rules::serve_snapshot(&core.snapshot, &mut core.snapshot_wanted, request_index, to)
    }
}

#[cfg(test)]
mod tests {
    use raft::{Storage, StorageError};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn bootstrap() -> SimStorage {
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 1;
        snapshot.mut_metadata().term = 1;
        snapshot
            .mut_metadata()
            .set_conf_state(ConfState::from((vec![1, 2], vec![])));
        SimStorage::from_snapshot(snapshot)
    }

    #[test]
    fn append_truncates_conflicts_and_compaction_keeps_the_boundary_term() {
        let s = bootstrap();
        assert_eq!(
            (Storage::first_index(&s).unwrap(), Storage::last_index(&s).unwrap()),
            (2, 1)
        );
        s.append(&[entry(2, 1), entry(3, 1), entry(4, 1)]).unwrap();
        s.append(&[entry(3, 2)]).unwrap();
        assert_eq!(Storage::last_index(&s).unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert!(s.append(&[entry(9, 2)]).is_err(), "a gap is a shell bug");
        s.compact_to(2, 1, &ConfState::from((vec![1, 2], vec![])), vec![7])
            .unwrap();
        assert_eq!(s.term(2).unwrap(), 1, "the compaction point keeps its term");
        assert!(matches!(
            s.entries(2, 3, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.entries(3, 4, None, GetEntriesContext::empty(false)).unwrap().len(), 1);
        let snap = s.snapshot(2, 1).unwrap();
        assert_eq!(snap.get_data(), &[7]);
        assert!(s.snapshot(3, 1).is_err());
        assert!(s.snapshot_wanted());
        assert!(s.snapshot(2, 9).is_err(), "a peer outside the configuration");
    }
}
