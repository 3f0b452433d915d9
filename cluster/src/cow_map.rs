//! [`CowMap`]: an ordered map split into a fixed number of shards, each behind an `Arc`, so a
//! clone of the whole map costs [`SHARDS`] reference counts and a later write copies only the
//! one shard it touches (copy-on-write by shard). The state machine keeps its large tables in
//! it: a snapshot freezes the state with a clone and is encoded off the apply path while apply
//! goes on, paying at most one shard copy per shard it writes until the encoder lets go.
//!
//! A key's shard is the FNV-1a hash of its bytes ([`ShardKey`]), fixed forever: the iteration
//! order (shard by shard, each in key order) is the same on every replica and every build, so
//! encodings and digests of equal maps are equal. The bincode encoding is the one bincode gives
//! a `BTreeMap` (length, then key/value pairs), so a map encoded as a `BTreeMap` decodes as a
//! `CowMap` and the other way round; only the order of the pairs differs.

use std::collections::BTreeMap;
use std::sync::Arc;

use bincode::de::Decoder;
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};

/// Shards per map. More shards make a copy-on-write copy smaller and a clone dearer.
pub const SHARDS: usize = 64;

/// A key that knows the bytes its shard is chosen by.
pub trait ShardKey {
    /// Stable bytes of the key (the same on every replica and build).
    fn shard_bytes(&self) -> &[u8];
}

impl ShardKey for String {
    fn shard_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

fn shard_of(bytes: &[u8]) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % SHARDS as u64) as usize
}

/// The sharded copy-on-write map.
#[derive(Clone, Debug)]
pub struct CowMap<K, V> {
    shards: Vec<Arc<BTreeMap<K, V>>>,
    len: usize,
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        CowMap {
            shards: (0..SHARDS).map(|_| Arc::new(BTreeMap::new())).collect(),
            len: 0,
        }
    }
}

impl<K: Ord + Clone + ShardKey, V: Clone> CowMap<K, V> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.shards[shard_of(key.shard_bytes())].get(key)
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key`, to change in place (copies the key's shard if a clone shares it).
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let shard = &mut self.shards[shard_of(key.shard_bytes())];
        if !shard.contains_key(key) {
            return None;
        }
        Arc::make_mut(shard).get_mut(key)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = Arc::make_mut(&mut self.shards[shard_of(key.shard_bytes())]);
        let old = shard.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let shard = &mut self.shards[shard_of(key.shard_bytes())];
        if !shard.contains_key(key) {
            return None;
        }
        let old = Arc::make_mut(shard).remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Entries, shard by shard, each shard in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// Values, in [`Self::iter`]'s order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

impl<K: Ord + Clone + ShardKey, V: Clone> std::ops::Index<&K> for CowMap<K, V> {
    type Output = V;

    /// The value of `key`. Panics when it is missing, as `BTreeMap`'s index does.
    fn index(&self, key: &K) -> &V {
        self.get(key).expect("key present in CowMap")
    }
}

impl<K: Ord + Clone + ShardKey, V: Clone + PartialEq> PartialEq for CowMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.shards.iter().zip(&other.shards).all(|(a, b)| a == b)
    }
}

impl<K: Ord + Clone + ShardKey, V: Clone> FromIterator<(K, V)> for CowMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = CowMap::default();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

impl<K: Encode, V: Encode> Encode for CowMap<K, V> {
    fn encode<E: Encoder>(&self, encoder: &mut E) -> Result<(), EncodeError> {
        (self.len as u64).encode(encoder)?;
        for shard in &self.shards {
            for (k, v) in shard.iter() {
                k.encode(encoder)?;
                v.encode(encoder)?;
            }
        }
        Ok(())
    }
}

impl<Context, K, V> Decode<Context> for CowMap<K, V>
where
    K: Decode<Context> + Ord + Clone + ShardKey,
    V: Decode<Context> + Clone,
{
    fn decode<D: Decoder<Context = Context>>(decoder: &mut D) -> Result<Self, DecodeError> {
        let len = u64::decode(decoder)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::OutsideUsizeRange(len))?;
        // The decoder's limit bounds what a hostile length can make us allocate.
        decoder.claim_container_read::<(K, V)>(len)?;
        let mut map = CowMap::default();
        for _ in 0..len {
            decoder.unclaim_bytes_read(std::mem::size_of::<(K, V)>());
            let key = K::decode(decoder)?;
            let value = V::decode(decoder)?;
            if map.insert(key, value).is_some() {
                return Err(DecodeError::Other("duplicate key in a map"));
            }
        }
        Ok(map)
    }
}

impl<'de, Context, K, V> bincode::BorrowDecode<'de, Context> for CowMap<K, V>
where
    K: Decode<Context> + Ord + Clone + ShardKey,
    V: Decode<Context> + Clone,
{
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, DecodeError> {
        <Self as Decode<Context>>::decode(decoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(n: usize) -> CowMap<String, u64> {
        (0..n).map(|i| (format!("k{i}"), i as u64)).collect()
    }

    #[test]
    fn a_clone_is_frozen_while_the_original_changes() {
        let mut map = map_of(1000);
        let frozen = map.clone();
        map.insert("k1".into(), 99);
        map.remove(&"k2".to_string());
        map.insert("new".into(), 7);
        *map.get_mut(&"k3".to_string()).expect("present") = 33;
        assert_eq!(frozen.get(&"k1".to_string()), Some(&1));
        assert_eq!(frozen.get(&"k2".to_string()), Some(&2));
        assert_eq!(frozen.get(&"k3".to_string()), Some(&3));
        assert!(!frozen.contains_key(&"new".to_string()));
        assert_eq!((frozen.len(), map.len()), (1000, 1000));
        assert_eq!(map.get(&"k1".to_string()), Some(&99));
        // Shards the writes did not touch are still shared.
        let shared = map
            .shards
            .iter()
            .zip(&frozen.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(shared >= SHARDS - 4, "{shared} shards shared");
    }

    #[test]
    fn encodes_as_a_btree_map_does_and_refuses_duplicates() {
        let config = bincode::config::standard();
        let map = map_of(300);
        let btree: BTreeMap<String, u64> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let from_btree = bincode::encode_to_vec(&btree, config).expect("encodes");
        let (decoded, _): (CowMap<String, u64>, usize) =
            bincode::decode_from_slice(&from_btree, config).expect("a BTreeMap's bytes decode");
        assert_eq!(decoded, map);
        let ours = bincode::encode_to_vec(&map, config).expect("encodes");
        assert_eq!(ours.len(), from_btree.len());
        let (back, _): (BTreeMap<String, u64>, usize) =
            bincode::decode_from_slice(&ours, config).expect("ours decode as a BTreeMap");
        assert_eq!(back, btree);
        // Two equal maps built in different orders encode alike.
        let pairs: Vec<(String, u64)> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let reversed: CowMap<String, u64> = pairs.into_iter().rev().collect();
        assert_eq!(bincode::encode_to_vec(&reversed, config).expect("encodes"), ours);
        let duplicate = bincode::encode_to_vec((2u64, ("a", 1u64), ("a", 2u64)), config).expect("encodes");
        assert!(bincode::decode_from_slice::<CowMap<String, u64>, _>(&duplicate, config).is_err());
    }
}
