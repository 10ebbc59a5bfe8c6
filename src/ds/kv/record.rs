//! Key-value records as stored in a partition's record space.
//!
//! `klen u32 (REMOTE bit for a remote value) | vlen u32 | checksum u64 | key | value or
//! reference`. The checksum covers the two length words, the key and the payload: a
//! record is rewritten in place when a value of the same size replaces it, so a lock-free
//! reader may see it torn and must be able to tell.

use super::super::DsError;
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Bytes of a record's header.
pub(super) const REC_HEADER: usize = 16;
/// Bit of the record's key-length word marking a remote value.
const REMOTE: u32 = 1 << 31;
/// Bytes of a remote value's reference in a record.
pub(super) const REMOTE_REF: usize = 32;
/// Largest record (a slot word counts 8-byte units in 16 bits).
pub(super) const MAX_RECORD: usize = 0xFFFF * 8;

/// A decoded key-value record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    /// The key.
    pub key: Vec<u8>,
    /// The value, or where it is.
    pub value: Value,
}

/// A record's value: in the record, or in a block of its own at `<path>/v<nonce>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Value {
    /// The value itself.
    Inline(Vec<u8>),
    /// A reference to the value's own block.
    Remote {
        /// Names the value's child path.
        nonce: u64,
        /// The value block's id ([`crate::ds::encode_id`]).
        block: u64,
        /// Value length.
        len: u64,
        /// Checksum of the value (keyed by the nonce): a READ racing the block's
        /// revocation may see zeroes without an error, and must not be accepted.
        sum: u64,
    },
}

impl Value {
    /// The nonce of a remote value.
    pub fn remote(&self) -> Option<u64> {
        match self {
            Value::Remote { nonce, .. } => Some(*nonce),
            Value::Inline(_) => None,
        }
    }
}

/// What a READ of a record's bytes held.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decoded {
    /// A whole record.
    Record(Record),
    /// Bytes that are not a record, or a record caught while being rewritten.
    Bad,
}

/// Bytes of `r` encoded.
pub(super) fn record_len(r: &Record) -> usize {
    REC_HEADER
        + r.key.len()
        + match &r.value {
            Value::Inline(v) => v.len(),
            Value::Remote { .. } => REMOTE_REF,
        }
}

fn sum(words: &[u8], key: &[u8], payload: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x7265_636f_7264_7375, 0x6d6b_7661_6c75_6521);
    h.write(words);
    h.write(key);
    h.write(payload);
    h.finish()
}

/// Encodes a record.
pub(super) fn encode(key: &[u8], value: &Value) -> Result<Vec<u8>, DsError> {
    let payload: Vec<u8> = match value {
        Value::Inline(v) => v.clone(),
        Value::Remote {
            nonce,
            block,
            len,
            sum,
        } => [nonce, block, len, sum]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect(),
    };
    let total = REC_HEADER + key.len() + payload.len();
    let too_large = || DsError::ItemTooLarge {
        len: total,
        max: MAX_RECORD,
    };
    let k = u32::try_from(key.len())
        .ok()
        .filter(|&k| k < REMOTE)
        .ok_or_else(too_large)?;
    let v = u32::try_from(payload.len()).map_err(|_| too_large())?;
    if total.next_multiple_of(8) > MAX_RECORD {
        return Err(too_large());
    }
    let flag = if value.remote().is_some() { REMOTE } else { 0 };
    let mut words = [0u8; 8];
    words[..4].copy_from_slice(&(k | flag).to_le_bytes());
    words[4..].copy_from_slice(&v.to_le_bytes());
    let mut r = Vec::with_capacity(total);
    r.extend_from_slice(&words);
    r.extend_from_slice(&sum(&words, key, &payload).to_le_bytes());
    r.extend_from_slice(key);
    r.extend_from_slice(&payload);
    Ok(r)
}

/// Decodes the bytes of one record (trailing bytes are ignored).
pub(super) fn decode(rec: &[u8]) -> Decoded {
    match try_decode(rec) {
        Some(r) => Decoded::Record(r),
        None => Decoded::Bad,
    }
}

fn try_decode(rec: &[u8]) -> Option<Record> {
    let words = rec.get(0..8)?;
    let kw = u32::from_le_bytes(words[..4].try_into().ok()?);
    let k = (kw & !REMOTE) as usize;
    let v = u32::from_le_bytes(words[4..].try_into().ok()?) as usize;
    let stored = u64::from_le_bytes(rec.get(8..16)?.try_into().ok()?);
    let key = rec.get(REC_HEADER..REC_HEADER.checked_add(k)?)?;
    let payload = rec.get(REC_HEADER + k..(REC_HEADER + k).checked_add(v)?)?;
    if sum(words, key, payload) != stored {
        return None;
    }
    let value = if kw & REMOTE == 0 {
        Value::Inline(payload.to_vec())
    } else {
        if payload.len() != REMOTE_REF {
            return None;
        }
        let w = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                payload.get(8 * i..8 * i + 8)?.try_into().ok()?,
            ))
        };
        Value::Remote {
            nonce: w(0)?,
            block: w(1)?,
            len: w(2)?,
            sum: w(3)?,
        }
    };
    Some(Record {
        key: key.to_vec(),
        value,
    })
}

/// The child path of a remote value.
pub(super) fn value_name(nonce: u64) -> String {
    format!("v{nonce:016x}")
}

/// Checksum of a remote value (never 0).
pub(super) fn value_sum(nonce: u64, value: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(nonce, 0x7661_6c75_6573_756d);
    h.write(value);
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_copies_are_rejected() {
        let a = encode(b"key", &Value::Inline(vec![1; 40])).unwrap();
        let b = encode(b"key", &Value::Inline(vec![2; 40])).unwrap();
        assert_eq!(a.len(), b.len());
        let Decoded::Record(r) = decode(&a) else {
            panic!("a whole record must decode")
        };
        assert_eq!(r.key, b"key");
        assert_eq!(r.value, Value::Inline(vec![1; 40]));
        for cut in 1..a.len() {
            let mut torn = a.clone();
            torn[cut..].copy_from_slice(&b[cut..]);
            if torn != a && torn != b {
                assert_eq!(decode(&torn), Decoded::Bad, "cut {cut}");
            }
        }
        let remote = Value::Remote {
            nonce: 1,
            block: 2,
            len: 3,
            sum: 4,
        };
        let c = encode(b"k", &remote).unwrap();
        assert_eq!(
            decode(&c),
            Decoded::Record(Record {
                key: b"k".to_vec(),
                value: remote
            })
        );
        assert_eq!(decode(&c[..c.len() - 1]), Decoded::Bad);
        assert_eq!(decode(&[0u8; 16]), Decoded::Bad);
    }
}
