//! Versioned bincode envelopes: one version byte, then bincode 2 (standard config) with a size
//! limit on every decode. Used for state machine records, raft entry payloads, forwarded
//! proposals and snapshots.

use bincode::config::{Configuration, Limit, standard};
use bincode::{Decode, Encode};

/// Version byte of every envelope this crate writes.
pub const ENVELOPE_VERSION: u8 = 1;

/// Largest state machine record (one node, room, viewer, setting), in bytes.
pub const RECORD_BYTES_MAX: usize = 64 * 1024;
/// Largest raft entry payload (one coalesced batch of commands), in bytes.
pub const ENTRY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest snapshot of the state machine, in bytes.
pub const SNAPSHOT_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Why an envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty input")]
    Empty,
    #[error("unknown envelope version {0}")]
    Version(u8),
    #[error("{len} bytes is more than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
}

fn config<const N: usize>() -> Configuration<bincode::config::BigEndian, bincode::config::Varint, Limit<N>> {
    standard().with_big_endian().with_limit::<N>()
}

/// Encodes `value` behind the version byte.
pub fn encode<T: Encode>(value: &T) -> Vec<u8> {
    encode_versioned(ENVELOPE_VERSION, value)
}

/// Encodes `value` behind `version`, for shapes whose version moved past
/// [`ENVELOPE_VERSION`] (each such shape names its own constant).
pub fn encode_versioned<T: Encode>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Encoding into a Vec cannot fail for the plain data types of this crate (no custom
    // encoders that error), and the size limit only applies to decoding.
    let body = bincode::encode_to_vec(value, standard().with_big_endian())
        .expect("encoding plain data into a Vec does not fail");
    out.extend_from_slice(&body);
    out
}

/// The length of [`encode`]'s output for `value`, without encoding it into memory.
pub fn encoded_len<T: Encode>(value: &T) -> usize {
    let mut size = bincode::enc::write::SizeWriter::default();
    // Writing into a size counter cannot fail for the plain data types of this crate.
    bincode::encode_into_writer(value, &mut size, standard().with_big_endian())
        .expect("encoding plain data into a size counter does not fail");
    1 + size.bytes_written
}

/// Decodes an envelope written by [`encode`], refusing more than `N` bytes.
pub fn decode<T: Decode<()>, const N: usize>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_versions::<T, N>(bytes, &[ENVELOPE_VERSION])
}

/// Decodes an envelope of any of `versions` whose bodies decode as the same `T` (a shape whose
/// newer version only added enum variants, so the older bytes still decode).
pub fn decode_versions<T: Decode<()>, const N: usize>(bytes: &[u8], versions: &[u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if !versions.contains(&version) {
        return Err(DecodeError::Version(version));
    }
    if bytes.len() > N {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: N,
        });
    }
    let (value, used) =
        bincode::decode_from_slice(body, config::<N>()).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(DecodeError::Trailing(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let v: Vec<String> = vec!["a".into(), "bc".into()];
        let bytes = encode(&v);
        assert_eq!(encoded_len(&v), bytes.len());
        assert_eq!(decode::<Vec<String>, 1024>(&bytes).unwrap(), v);
        assert_eq!(decode::<Vec<String>, 1024>(&[]), Err(DecodeError::Empty));
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert_eq!(
            decode::<Vec<String>, 1024>(&wrong_version),
            Err(DecodeError::Version(9))
        );
        assert!(matches!(
            decode::<Vec<String>, 4>(&bytes),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(decode::<Vec<String>, 1024>(&bytes[..bytes.len() - 1]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode::<Vec<String>, 1024>(&trailing), Err(DecodeError::Trailing(1)));
        // A length prefix that claims far more than the input must not allocate or panic.
        let hostile = [ENVELOPE_VERSION, 0xFC, 0xFF, 0xFF, 0xFF, 0x7F];
        assert!(decode::<Vec<String>, 1024>(&hostile).is_err());
    }
}
