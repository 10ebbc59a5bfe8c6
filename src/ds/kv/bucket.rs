//! A hash bucket's 128 bytes: a lock word, [`SLOTS`] slot words and a checksum word.
//!
//! Only the holder of a bucket's lock changes its slots, and it rewrites the slots and
//! the checksum with one WRITE. Readers take no lock: they READ the 128 bytes in one
//! operation and accept them only when the checksum matches the slots, so a READ that
//! raced a writer (and saw a mix of old and new bytes at any granularity, as RDMA
//! allows) is detected and repeated. The lock word's states differ in their lowest byte
//! only, so even a torn read of it yields one of the states; a LOCKED word carries its
//! holder's stamp in the other bytes (see `lock.rs`).

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Bytes of a bucket.
pub(super) const BUCKET_BYTES: u64 = 128;
/// Slot words per bucket.
pub(super) const SLOTS: usize = 14;
/// Offset of the first slot word within a bucket (after the lock word).
pub(super) const SLOTS_AT: u64 = 8;
/// Bytes of the slot words and the checksum, rewritten together by a lock holder.
pub(super) const BODY_BYTES: usize = SLOTS * 8 + 8;
/// Lock word: free.
pub(super) const UNLOCKED: u64 = 0;
/// Lock word state (lowest byte): a writer holds the bucket; the other bytes are the
/// holder's stamp (`lock.rs`).
pub(super) const LOCKED: u64 = 1;
/// Lock word: the partition is being repartitioned; writers must reload the map.
pub(super) const FROZEN: u64 = 2;

/// The state of lock word `word` ([`UNLOCKED`], [`LOCKED`] or [`FROZEN`]): its lowest
/// byte, which a torn READ of the word still shows whole.
pub(super) fn state(word: u64) -> u64 {
    word & 0xFF
}

/// A bucket as read: its lock state and slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bucket {
    /// The lock word's state ([`UNLOCKED`], [`LOCKED`] or [`FROZEN`]; the holder's
    /// stamp is left out).
    pub lock: u64,
    /// The slot words (0: empty).
    pub slots: [u64; SLOTS],
}

/// Checksum of the slots of the bucket at offset `at` of its partition. Keyed by the
/// offset, so a bucket's bytes copied elsewhere do not validate.
pub(super) fn checksum(at: u64, slots: &[u64; SLOTS]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6275_636b_6574_7375, at);
    for s in slots {
        h.write_u64(*s);
    }
    h.finish()
}

fn word(bytes: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
    u64::from_le_bytes(w)
}

/// The slot words of a bucket's bytes as they are (not validated).
pub(super) fn raw_slots(bytes: &[u8; BUCKET_BYTES as usize]) -> [u64; SLOTS] {
    let mut slots = [0u64; SLOTS];
    for (i, s) in slots.iter_mut().enumerate() {
        *s = word(bytes, 1 + i);
    }
    slots
}

/// Decodes the 128 bytes of the bucket at offset `at`; `None` when the checksum does not
/// match (the READ raced a writer, or the bucket is damaged).
pub(super) fn decode(at: u64, bytes: &[u8; BUCKET_BYTES as usize]) -> Option<Bucket> {
    let slots = raw_slots(bytes);
    (word(bytes, 1 + SLOTS) == checksum(at, &slots)).then_some(Bucket {
        lock: state(word(bytes, 0)),
        slots,
    })
}

/// The slot words and checksum of the bucket at `at`, as written at `at + SLOTS_AT`.
pub(super) fn encode_body(at: u64, slots: &[u64; SLOTS]) -> [u8; BODY_BYTES] {
    let mut out = [0u8; BODY_BYTES];
    for (i, s) in slots.iter().enumerate() {
        out[8 * i..8 * i + 8].copy_from_slice(&s.to_le_bytes());
    }
    out[8 * SLOTS..].copy_from_slice(&checksum(at, slots).to_le_bytes());
    out
}

/// A whole bucket image at `at`: lock word `lock`, then `slots` and their checksum
/// (for tests that build buckets by hand).
#[cfg(test)]
pub(super) fn image(at: u64, lock: u64, slots: &[u64; SLOTS]) -> [u8; BUCKET_BYTES as usize] {
    let mut b = [0u8; BUCKET_BYTES as usize];
    b[..8].copy_from_slice(&lock.to_le_bytes());
    b[8..].copy_from_slice(&encode_body(at, slots));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_detection() {
        let mut old = [0u64; SLOTS];
        old[1] = 7;
        old[3] = 9;
        let mut new = old;
        new[4] = 0x0123_4567_89ab_cdef;
        let a = image(128, UNLOCKED, &old);
        let b = image(128, 0x1234_5678_9a01, &new);
        assert_eq!(
            decode(128, &a),
            Some(Bucket {
                lock: UNLOCKED,
                slots: old
            })
        );
        assert_eq!(decode(128, &b).map(|b| b.slots), Some(new));
        assert_eq!(
            decode(128, &b).map(|b| b.lock),
            Some(LOCKED),
            "the stamp is left out"
        );
        // Every mix of the two at 1-byte granularity that is neither of them fails.
        for cut in 9..BUCKET_BYTES as usize {
            let mut torn = a;
            torn[cut..].copy_from_slice(&b[cut..]);
            match decode(128, &torn) {
                None => {}
                Some(x) => assert!(x.slots == old || x.slots == new, "cut {cut}"),
            }
            let mut torn = b;
            torn[cut..].copy_from_slice(&a[cut..]);
            if let Some(x) = decode(128, &torn) {
                assert!(x.slots == old || x.slots == new, "cut {cut}");
            }
        }
        // The same bytes at another offset do not validate.
        assert_eq!(decode(192, &a), None);
    }
}
