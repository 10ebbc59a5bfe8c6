//! The words that coordinate a [`super::Kv`]'s repartitionings: the root word of the
//! map block and the intent record at the head of each directory block.
//!
//! Pure encoding, no I/O, so it is unit-tested and fuzzed on byte slices.
//!
//! * **Root** (word 0 of the map block): `dir << 32 | token << 1 | busy`. `dir` is the
//!   child index of the directory block in force (its entries are immutable once
//!   published), `token` the controller fence token of the last client that changed
//!   it, `busy` whether a repartitioning is in progress (then `dir` names the *new*
//!   directory block being prepared, whose intent names the directory in force). The
//!   word only ever moves to a larger token or, under the same token, from busy to
//!   idle, and every directory block has a fresh child index, so it never repeats.
//! * **Intent** (the first 64 bytes of a directory block): what the repartitioning
//!   that block belongs to does (`kind`, the partitions it replaces, where they sit in
//!   the directory, the fresh children it fills, the directory it replaces), with a
//!   checksum keyed by the block's child index. Written completely before the root
//!   names the block, never changed afterwards.

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Bytes of an encoded intent.
pub const INTENT_BYTES: usize = 64;
/// Largest fence token the root word holds.
pub const MAX_TOKEN: u64 = (1 << 31) - 1;
/// Largest directory child index the root word holds.
pub const MAX_DIR: u64 = u32::MAX as u64;
/// Magic in the top bytes of an intent's first word.
const INTENT_MAGIC: u64 = u64::from_le_bytes(*b"\0\0\0\0KVIN") & !0xFF_FFFF;

/// The root word, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Root {
    /// Child index of the directory block (published, or being prepared when busy).
    pub dir: u64,
    /// Fence token of the last client that changed the word.
    pub token: u64,
    /// A repartitioning is in progress.
    pub busy: bool,
}

impl Root {
    /// Decodes a root word; `None` for 0 (no directory yet).
    pub fn decode(w: u64) -> Option<Root> {
        (w != 0).then_some(Root {
            dir: w >> 32,
            token: (w >> 1) & MAX_TOKEN,
            busy: w & 1 == 1,
        })
    }

    /// Encodes; `None` when a field is out of range (a token past [`MAX_TOKEN`]).
    pub fn encode(&self) -> Option<u64> {
        (self.dir <= MAX_DIR && self.token <= MAX_TOKEN && self.dir > 0)
            .then_some(self.dir << 32 | self.token << 1 | u64::from(self.busy))
    }
}

/// What a repartitioning does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Creates the first partition (no old partitions, no directory before).
    Init,
    /// Replaces one partition (at `depth`, `prefix`) by two children one level deeper,
    /// or (when its live records use little of it) by one compacted copy.
    Split,
    /// Replaces a partition and its buddy (both at `depth`, `prefix` the first one's)
    /// by one partition a level up, or (when the union does not fit one partition) by
    /// a compacted copy of each.
    Merge,
}

/// A repartitioning in progress, as recorded at the head of its directory block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    /// What it does.
    pub kind: Kind,
    /// The directory block it replaces (0 for [`Kind::Init`]).
    pub prev_dir: u64,
    /// The partitions it replaces (0: none).
    pub old: [u64; 2],
    /// Depth of the old partitions.
    pub depth: u32,
    /// Hash prefix of the first old partition at `depth`.
    pub prefix: u64,
    /// Fresh children it fills (0: none).
    pub new: [u64; 2],
}

fn checksum(dir: u64, words: &[u64]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6b76_696e_7465_6e74, dir);
    for w in words {
        h.write_u64(*w);
    }
    h.finish()
}

impl Intent {
    /// The 64 bytes of this intent in directory block `dir`.
    pub fn encode(&self, dir: u64) -> [u8; INTENT_BYTES] {
        let kind = match self.kind {
            Kind::Init => 1,
            Kind::Split => 2,
            Kind::Merge => 3,
        };
        let mut w = [0u64; 8];
        w[0] = INTENT_MAGIC | kind;
        w[1] = self.prev_dir;
        w[2] = self.old[0];
        w[3] = self.old[1];
        w[4] = u64::from(self.depth);
        w[5] = self.prefix;
        w[6] = self.new[0] | self.new[1] << 32;
        w[7] = checksum(dir, &w[..7]);
        let mut out = [0u8; INTENT_BYTES];
        for (i, x) in w.iter().enumerate() {
            out[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
        }
        out
    }

    /// Decodes the head of directory block `dir`; `None` when it is not a whole,
    /// consistent intent (never written, damaged, or copied from another block).
    pub fn decode(dir: u64, bytes: &[u8]) -> Option<Intent> {
        let bytes = bytes.get(..INTENT_BYTES)?;
        let mut w = [0u64; 8];
        for (i, x) in w.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            *x = u64::from_le_bytes(b);
        }
        if w[0] & !0xFF != INTENT_MAGIC || w[7] != checksum(dir, &w[..7]) {
            return None;
        }
        let kind = match w[0] & 0xFF {
            1 => Kind::Init,
            2 => Kind::Split,
            3 => Kind::Merge,
            _ => return None,
        };
        let depth = u32::try_from(w[4]).ok().filter(|&d| d <= 63)?;
        let intent = Intent {
            kind,
            prev_dir: w[1],
            old: [w[2], w[3]],
            depth,
            prefix: w[5],
            new: [w[6] & 0xFFFF_FFFF, w[6] >> 32],
        };
        let sane = match kind {
            Kind::Init => intent.prev_dir == 0 && intent.old == [0, 0] && depth == 0,
            Kind::Split => intent.prev_dir > 0 && intent.old[0] > 0 && intent.old[1] == 0,
            Kind::Merge => intent.prev_dir > 0 && depth > 0 && intent.old.iter().all(|&o| o > 0),
        };
        (sane && (depth == 0 || intent.prefix >> depth == 0)).then_some(intent)
    }
}

/// Fuzzing entry point: decodes `data` (a directory child index in the first 8 bytes,
/// then intent bytes) and checks that whatever decodes re-encodes to itself. Panics
/// only on a decoder bug.
pub fn fuzz_intent(data: &[u8]) {
    let Some((dir, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let dir = u64::from_le_bytes(*dir);
    if let Some(i) = Intent::decode(dir, rest) {
        assert_eq!(Intent::decode(dir, &i.encode(dir)), Some(i));
        assert_eq!(&i.encode(dir)[..], &rest[..INTENT_BYTES]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_round_trip() {
        for r in [
            Root {
                dir: 1,
                token: 0,
                busy: false,
            },
            Root {
                dir: MAX_DIR,
                token: MAX_TOKEN,
                busy: true,
            },
        ] {
            assert_eq!(Root::decode(r.encode().unwrap()), Some(r));
        }
        assert_eq!(Root::decode(0), None);
        let big = Root {
            dir: 1,
            token: MAX_TOKEN + 1,
            busy: false,
        };
        assert_eq!(big.encode(), None);
    }

    #[test]
    fn intent_round_trip_and_damage() {
        let i = Intent {
            kind: Kind::Merge,
            prev_dir: 9,
            old: [4, 5],
            depth: 3,
            prefix: 6,
            new: [11, 12],
        };
        let bytes = i.encode(10);
        assert_eq!(Intent::decode(10, &bytes), Some(i));
        // Keyed by the block: the same bytes elsewhere do not validate.
        assert_eq!(Intent::decode(11, &bytes), None);
        for at in 0..INTENT_BYTES {
            let mut bad = bytes;
            bad[at] ^= 0x10;
            assert_eq!(Intent::decode(10, &bad), None, "byte {at}");
        }
        assert_eq!(Intent::decode(10, &[0u8; INTENT_BYTES]), None);
        assert_eq!(Intent::decode(10, &bytes[..63]), None);
    }

    /// The committed fuzz seed corpus for the intent decoder stays decodable.
    /// `FARPOOL_WRITE_CORPUS=1 cargo test -p farpool kv::root` regenerates it.
    #[test]
    fn intent_seed_corpus_decodes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/kv_intent");
        let seeds = [
            Intent {
                kind: Kind::Init,
                prev_dir: 0,
                old: [0, 0],
                depth: 0,
                prefix: 0,
                new: [2, 0],
            },
            Intent {
                kind: Kind::Split,
                prev_dir: 1,
                old: [2, 0],
                depth: 0,
                prefix: 0,
                new: [4, 5],
            },
        ];
        for (n, s) in seeds.iter().enumerate() {
            // The fuzz target decodes with the child index in the first 8 bytes.
            let mut bytes = 7u64.to_le_bytes().to_vec();
            bytes.extend_from_slice(&s.encode(7));
            let path = dir.join(format!("seed{n}"));
            if std::env::var_os("FARPOOL_WRITE_CORPUS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(Intent::decode(7, &on_disk[8..]), Some(*s));
        }
    }
}
