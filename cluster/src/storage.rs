//! sled storage of one replica, data directory format 2: the raft log, hard state and the last
//! snapshot in the `raft` tree, implementing [`raft::Storage`] and the [`LogStore`] writes the
//! replica core makes. The state machine lives in memory: it is the last snapshot's data plus
//! the log after it, applied again on start.
//!
//! Writes here only reach sled's page cache; the shell flushes (`Disk::flush`, run on a blocking
//! thread) before it sends messages that depend on them or reports them persisted to raft.
//! Opening checks every record and reports the first bad one by tree and key.
//!
//! # Format versions
//!
//! The `format` key of the `raft` tree holds [`DATA_FORMAT`]. Format 1 (before it had the key)
//! also kept every state machine record in `sm_*` trees, written after each apply; such a
//! directory is upgraded on open: its records become a snapshot at their applied index, the log
//! up to it is dropped, and the `sm_*` trees go. A directory of a newer format is refused with a
//! message naming both versions. Log entries and snapshot data carry the codec's version byte.

use std::sync::Arc;

use parking_lot::RwLock;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::{StoreError, printable_key};
use crate::state_machine::{SmTree, StateMachine};

const RAFT_TREE: &str = "raft";
const KEY_HARD_STATE: &[u8] = b"hs";
/// Format 1 only: the conf state written with each apply (format 2 keeps it in the snapshot).
const KEY_CONF_STATE: &[u8] = b"cs";
const KEY_SNAPSHOT: &[u8] = b"snap";
const KEY_FORMAT: &[u8] = b"format";
const ENTRY_PREFIX: u8 = b'e';

/// The data directory format this build writes.
pub const DATA_FORMAT: u8 = 2;

/// Index and term of the snapshot a brand-new cluster starts from. Starting at a non-zero index
/// means a joining node (empty log) always catches up by snapshot first, so it learns the
/// configuration the first node was created with.
pub const BOOTSTRAP_INDEX: u64 = 1;
/// See [`BOOTSTRAP_INDEX`].
pub const BOOTSTRAP_TERM: u64 = 1;

fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = ENTRY_PREFIX;
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn entry_index(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != ENTRY_PREFIX {
        return None;
    }
    let mut index = [0u8; 8];
    index.copy_from_slice(&key[1..]);
    Some(u64::from_be_bytes(index))
}

/// The writes the replica core makes to its log storage, besides what [`raft::Storage`] reads.
/// They need not be durable when they return: the shell flushes before it reports a Ready
/// persisted. Implemented by [`SledStorage`] and by the simulator's in-memory storage.
pub trait LogStore: raft::Storage {
    /// Appends entries from a Ready, replacing any conflicting suffix.
    fn append(&self, entries: &[Entry]) -> Result<(), StoreError>;
    /// Saves the hard state. (The configuration is not saved on its own: raft holds the
    /// applied one, the snapshot persists it, and a restart applies the changes after the
    /// snapshot again; so raft's initial configuration is always the snapshot's.)
    fn set_hard_state(&self, hard_state: &HardState) -> Result<(), StoreError>;
    /// Replaces the log with a snapshot received from the leader.
    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError>;
    /// Records a snapshot of the applied state at `index` (configuration `conf_state`) and
    /// drops the log up to it. A snapshot at or below the current one is ignored.
    fn compact(&self, index: u64, term: u64, conf_state: &ConfState, data: Vec<u8>) -> Result<(), StoreError>;
    /// Index of the last snapshot (the compaction point).
    fn snapshot_index(&self) -> u64;
    /// True when raft asked for a newer snapshot than the one stored (take one).
    fn snapshot_wanted(&self) -> bool;
}

/// The rules of [`raft::Storage`] that depend only on the last snapshot and the log's bounds,
/// shared by [`SledStorage`] and the simulator's in-memory storage so both answer raft alike.
pub mod rules {
    use raft::StorageError;
    use raft::eraftpb::{ConfState, Snapshot, SnapshotMetadata};

    /// Checks that entries `low..high` are in a log holding `first_index..=last_index`.
    pub fn check_range(first_index: u64, last_index: u64, low: u64, high: u64) -> raft::Result<()> {
        if low < first_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last_index + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(())
    }

    /// The term of `index`: `Some` when `snapshot` is at that index (the compaction point
    /// keeps its term), `None` when the log holds it (the caller reads it there); an error
    /// outside the log.
    pub fn snapshot_term(snapshot: &Snapshot, last_index: u64, index: u64) -> raft::Result<Option<u64>> {
        let meta = snapshot.get_metadata();
        if index == meta.index {
            return Ok(Some(meta.term));
        }
        if index <= meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(None)
    }

    /// A snapshot of the applied state `data` at `index` and `term`, under `conf_state`.
    pub fn snapshot_at(index: u64, term: u64, conf_state: &ConfState, data: Vec<u8>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf_state.clone());
        snapshot.set_metadata(meta);
        snapshot.set_data(data.into());
        snapshot
    }

    /// raft's `Storage::snapshot`: the stored snapshot when it is at least `request_index` and
    /// its configuration holds the peer `to` (a peer only accepts such a one); else "not yet",
    /// and `wanted` is set so the shell takes a new snapshot.
    pub fn serve_snapshot(
        snapshot: &Snapshot,
        wanted: &mut bool,
        request_index: u64,
        to: u64,
    ) -> raft::Result<Snapshot> {
        let meta = snapshot.get_metadata();
        let conf = meta.get_conf_state();
        let includes_peer = conf.voters.contains(&to) || conf.learners.contains(&to);
        if meta.index < request_index || !includes_peer {
            *wanted = true;
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snapshot.clone())
    }
}

fn storage_error(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

fn corrupt(tree: &str, key: &[u8], reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        tree: tree.to_string(),
        key: printable_key(key),
        reason: reason.to_string(),
    }
}

fn encode_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

struct Core {
    hard_state: HardState,
    /// Last snapshot (metadata and state machine data); its index is the compaction point.
    snapshot: Snapshot,
    last_index: u64,
    /// Set when raft asked for a snapshot we could not give (too old, or taken before the
    /// requesting peer joined the configuration); the shell then takes a new one.
    snapshot_wanted: bool,
}

impl Core {
    fn first_index(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    /// The configuration raft starts from: the snapshot's (see [`LogStore::set_hard_state`]).
    fn conf_state(&self) -> &ConfState {
        self.snapshot.get_metadata().get_conf_state()
    }
}

/// The sled database of one replica.
#[derive(Clone)]
pub struct Disk {
    db: sled::Db,
    raft: sled::Tree,
}

/// [`raft::Storage`] over the `raft` tree. Cheap to clone (shared core).
#[derive(Clone)]
pub struct SledStorage {
    raft: sled::Tree,
    core: Arc<RwLock<Core>>,
}

impl Disk {
    /// Opens (or creates) the database in `dir`, upgrading a format-1 directory, checks every
    /// record and returns the raft storage and the state machine of its last snapshot (the
    /// replica applies the committed log after it again).
    pub fn open(dir: &std::path::Path) -> Result<(Disk, SledStorage, StateMachine), StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| StoreError::Storage(format!("opening {}: {e}", dir.display())))?;
        let raft = db.open_tree(RAFT_TREE)?;
        let disk = Disk { db, raft };
        match disk.raft.get(KEY_FORMAT)? {
            Some(v) if v.as_ref() == [DATA_FORMAT] => {}
            Some(v) => {
                let found = v.first().map_or("unreadable".to_string(), |b| b.to_string());
                return Err(StoreError::Config(format!(
                    "data directory {} has format {found}; this build reads formats 1 and {DATA_FORMAT}: \
                     run the mediamesh version that wrote it, or start this node with an empty data \
                     directory so it catches up from the cluster",
                    dir.display()
                )));
            }
            None => disk.upgrade_from_format_1()?,
        }
        let storage = disk.load_raft()?;
        let state_machine = {
            let core = storage.core.read();
            if core.snapshot.get_metadata().index == 0 {
                StateMachine::default()
            } else {
                StateMachine::decode_snapshot(core.snapshot.get_data())
                    .map_err(|e| corrupt(RAFT_TREE, KEY_SNAPSHOT, format!("snapshot data: {e}")))?
            }
        };
        Ok((disk, storage, state_machine))
    }

    /// Format 1 → 2 (see the module doc). A brand-new directory only gets the format key.
    fn upgrade_from_format_1(&self) -> Result<(), StoreError> {
        let mut records = Vec::new();
        for tree in SmTree::ALL {
            if !self
                .db
                .tree_names()
                .iter()
                .any(|n| n.as_ref() == tree.name().as_bytes())
            {
                continue;
            }
            for item in self.db.open_tree(tree.name())?.iter() {
                let (key, value) = item?;
                records.push((tree, key.to_vec(), value.to_vec()));
            }
        }
        if records.is_empty() {
            if !self.raft.is_empty() {
                return Err(corrupt(
                    RAFT_TREE,
                    KEY_FORMAT,
                    "a log without a format or state records",
                ));
            }
            self.raft.insert(KEY_FORMAT, &[DATA_FORMAT])?;
            self.flush_blocking()?;
            return Ok(());
        }
        let sm =
            StateMachine::from_records(records).map_err(|(tree, key, reason)| corrupt(tree.name(), &key, reason))?;
        let conf_state = match self.raft.get(KEY_CONF_STATE)? {
            Some(v) => ConfState::parse_from_bytes(&v).map_err(|e| corrupt(RAFT_TREE, KEY_CONF_STATE, e))?,
            None => ConfState::default(),
        };
        let applied = sm.applied();
        let snapshot = rules::snapshot_at(applied.index, applied.term, &conf_state, sm.encode_snapshot());
        let mut batch = sled::Batch::default();
        for item in self.raft.range(entry_key(0)..=entry_key(applied.index)) {
            let (key, _) = item?;
            batch.remove(key);
        }
        batch.insert(KEY_SNAPSHOT, snapshot.write_to_bytes().map_err(encode_error)?);
        batch.remove(KEY_CONF_STATE);
        batch.insert(KEY_FORMAT, &[DATA_FORMAT]);
        self.raft.apply_batch(batch)?;
        self.flush_blocking()?;
        for tree in SmTree::ALL {
            self.db.drop_tree(tree.name())?;
        }
        self.flush_blocking()?;
        tracing::info!(
            index = applied.index,
            viewers = sm.viewers().len(),
            "upgraded the data directory from format 1 to {DATA_FORMAT}"
        );
        Ok(())
    }

    fn load_raft(&self) -> Result<SledStorage, StoreError> {
        let hard_state = match self.raft.get(KEY_HARD_STATE)? {
            Some(v) => HardState::parse_from_bytes(&v).map_err(|e| corrupt(RAFT_TREE, KEY_HARD_STATE, e))?,
            None => HardState::default(),
        };
        let snapshot = match self.raft.get(KEY_SNAPSHOT)? {
            Some(v) => Snapshot::parse_from_bytes(&v).map_err(|e| corrupt(RAFT_TREE, KEY_SNAPSHOT, e))?,
            None => Snapshot::default(),
        };
        let snapshot_index = snapshot.get_metadata().index;
        let mut last_index = snapshot_index;
        for item in self.raft.range(entry_key(0)..=entry_key(u64::MAX)) {
            let (key, value) = item?;
            let index = entry_index(&key).ok_or_else(|| corrupt(RAFT_TREE, &key, "not an entry key"))?;
            let entry = Entry::parse_from_bytes(&value).map_err(|e| corrupt(RAFT_TREE, &key, e))?;
            if entry.index != index {
                return Err(corrupt(RAFT_TREE, &key, format!("entry claims index {}", entry.index)));
            }
            if index != last_index + 1 {
                return Err(corrupt(
                    RAFT_TREE,
                    &key,
                    format!("log gap: expected index {}", last_index + 1),
                ));
            }
            last_index = index;
        }
        for item in self.raft.iter() {
            let (key, _) = item?;
            if entry_index(&key).is_none() && ![KEY_HARD_STATE, KEY_SNAPSHOT, KEY_FORMAT].contains(&key.as_ref()) {
                return Err(corrupt(RAFT_TREE, &key, "unknown key"));
            }
        }
        if hard_state.commit > last_index {
            return Err(corrupt(
                RAFT_TREE,
                KEY_HARD_STATE,
                format!("commit {} beyond last index {last_index}", hard_state.commit),
            ));
        }
        Ok(SledStorage {
            raft: self.raft.clone(),
            core: Arc::new(RwLock::new(Core {
                hard_state,
                snapshot,
                last_index,
                snapshot_wanted: false,
            })),
        })
    }

    /// Flushes everything written so far to disk. Blocking: call it on a blocking thread.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Flushes on tokio's blocking pool, off the async threads.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let disk = self.clone();
        tokio::task::spawn_blocking(move || disk.flush_blocking())
            .await
            .map_err(|e| StoreError::Storage(format!("flush task: {e}")))?
    }

    /// Creates a brand-new single-voter cluster: a snapshot at [`BOOTSTRAP_INDEX`] whose conf
    /// state has `raft_id` as the only voter, holding an empty state machine.
    pub fn bootstrap(&self, storage: &SledStorage, raft_id: u64, sm: &mut StateMachine) -> Result<(), StoreError> {
        sm.apply_empty(BOOTSTRAP_INDEX, BOOTSTRAP_TERM);
        let conf_state = ConfState::from((vec![raft_id], Vec::<u64>::new()));
        let snapshot = rules::snapshot_at(BOOTSTRAP_INDEX, BOOTSTRAP_TERM, &conf_state, sm.encode_snapshot());
        storage.install_snapshot(&snapshot)
    }
}

impl SledStorage {
    /// True when the storage holds no configuration (a node that must join).
    pub fn is_empty(&self) -> bool {
        let core = self.core.read();
        core.conf_state().voters.is_empty() && core.conf_state().learners.is_empty() && core.last_index == 0
    }
}

impl LogStore for SledStorage {
    fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut core = self.core.write();
        // raft only hands us entries that follow our snapshot; anything else is a bug.
        assert!(
            first.index > core.snapshot.get_metadata().index,
            "append before the snapshot"
        );
        assert!(first.index <= core.last_index + 1, "append leaves a gap");
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = entry.write_to_bytes().map_err(encode_error)?;
            batch.insert(&entry_key(entry.index), bytes);
        }
        let new_last = entries.last().map_or(core.last_index, |e| e.index);
        for stale in new_last + 1..=core.last_index {
            batch.remove(&entry_key(stale));
        }
        self.raft.apply_batch(batch)?;
        core.last_index = new_last;
        Ok(())
    }

    fn set_hard_state(&self, hard_state: &HardState) -> Result<(), StoreError> {
        let bytes = hard_state.write_to_bytes().map_err(encode_error)?;
        self.raft.insert(KEY_HARD_STATE, bytes)?;
        self.core.write().hard_state = hard_state.clone();
        Ok(())
    }

    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let meta = snapshot.get_metadata();
        let mut core = self.core.write();
        let mut hard_state = core.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = meta.index;
        let mut batch = sled::Batch::default();
        for item in self.raft.range(entry_key(0)..=entry_key(u64::MAX)) {
            let (key, _) = item?;
            batch.remove(key);
        }
        batch.insert(KEY_SNAPSHOT, snapshot.write_to_bytes().map_err(encode_error)?);
        batch.insert(KEY_HARD_STATE, hard_state.write_to_bytes().map_err(encode_error)?);
        batch.insert(KEY_FORMAT, &[DATA_FORMAT]);
        self.raft.apply_batch(batch)?;
        core.snapshot = snapshot.clone();
        core.hard_state = hard_state;
        core.last_index = meta.index;
        Ok(())
    }

    fn compact(&self, index: u64, term: u64, conf_state: &ConfState, data: Vec<u8>) -> Result<(), StoreError> {
        let mut core = self.core.write();
        if index <= core.snapshot.get_metadata().index {
            return Ok(());
        }
        assert!(index <= core.last_index, "compaction beyond the log");
        let snapshot = rules::snapshot_at(index, term, conf_state, data);
        let bytes = snapshot.write_to_bytes().map_err(encode_error)?;
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SNAPSHOT, bytes);
        for compacted in core.first_index()..=index {
            batch.remove(&entry_key(compacted));
        }
        self.raft.apply_batch(batch)?;
        core.snapshot = snapshot;
        core.snapshot_wanted = false;
        Ok(())
    }

    fn snapshot_index(&self) -> u64 {
        self.core.read().snapshot.get_metadata().index
    }

    fn snapshot_wanted(&self) -> bool {
        self.core.read().snapshot_wanted
    }
}

impl raft::Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.core.read();
        Ok(RaftState::new(core.hard_state.clone(), core.conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.core.read();
        rules::check_range(core.first_index(), core.last_index, low, high)?;
        let mut entries = Vec::with_capacity((high - low) as usize);
        for item in self.raft.range(entry_key(low)..entry_key(high)) {
            let (_, value) = item.map_err(storage_error)?;
            entries.push(Entry::parse_from_bytes(&value).map_err(storage_error)?);
        }
        if entries.len() as u64 != high - low {
            return Err(storage_error(format!("log entries {low}..{high} missing")));
        }
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let core = self.core.read();
        if let Some(term) = rules::snapshot_term(&core.snapshot, core.last_index, index)? {
            return Ok(term);
        }
        let value = self
            .raft
            .get(entry_key(index))
            .map_err(storage_error)?
            .ok_or_else(|| storage_error(format!("log entry {index} missing")))?;
        Ok(Entry::parse_from_bytes(&value).map_err(storage_error)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.core.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        let core = self.core.read();
        Ok(core.last_index.max(core.snapshot.get_metadata().index))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let core = &mut *self.core.write();
        rules::serve_snapshot(&core.snapshot, &mut core.snapshot_wanted, request_index, to)
    }
}
