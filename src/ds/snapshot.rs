//! The byte format of data structures in the persistent tier (what `sync` and `dump`
//! write and `load` reads).
//!
//! `"FPSNAP01" | kind u8 | body | checksum u64`, little-endian. Bodies:
//! - file (1): `len u64 | bytes`;
//! - queue (2): `count u64 | (len u32 | item)*`, head first;
//! - kv (3): `count u64 | (klen u32 | vlen u32 | key | value)*`;
//! - log (4): `start u64 | len u64 | bytes` (the log's bytes from its first untrimmed
//!   position, so entries keep their positions).
//!
//! The checksum (SipHash-1-3 of everything before it) rejects truncated or damaged
//! objects before anything is loaded.

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

const MAGIC: &[u8; 8] = b"FPSNAP01";

/// A data structure's contents, as stored in the persistent tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshot {
    /// A [`super::File`]'s bytes.
    File(Vec<u8>),
    /// A [`super::Queue`]'s items, head first.
    Queue(Vec<Vec<u8>>),
    /// A [`super::Kv`]'s pairs, in no particular order.
    Kv(Vec<(Vec<u8>, Vec<u8>)>),
    /// A [`super::Log`]'s bytes from position `start` on.
    Log {
        /// The first untrimmed position.
        start: u64,
        /// The log's bytes from `start` to the end of its last complete entry.
        bytes: Vec<u8>,
    },
}

/// Why bytes from the persistent tier are not a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Not a farpool snapshot at all.
    #[error("not a farpool snapshot (bad magic); was it written by sync/dump?")]
    Magic,
    /// The checksum does not match: truncated or damaged.
    #[error("snapshot is truncated or damaged (checksum mismatch); sync or dump it again")]
    Checksum,
    /// The kind byte is unknown.
    #[error("unknown snapshot kind {0}; written by a newer farpool?")]
    Kind(u8),
    /// The body does not parse.
    #[error("malformed snapshot body: {0}")]
    Body(&'static str),
    /// It is a snapshot of another kind of structure.
    #[error("the snapshot holds a {found}, not a {wanted}; load it with the type that wrote it")]
    WrongKind {
        /// What the caller wanted.
        wanted: &'static str,
        /// What the snapshot holds.
        found: &'static str,
    },
}

fn sum(bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6670_736e_6170_7368, 0x6f74_2121_2121_2121);
    h.write(bytes);
    h.finish()
}

impl Snapshot {
    /// What kind of structure this is a snapshot of.
    pub fn kind(&self) -> &'static str {
        match self {
            Snapshot::File(_) => "file",
            Snapshot::Queue(_) => "queue",
            Snapshot::Kv(_) => "kv table",
            Snapshot::Log { .. } => "log",
        }
    }

    /// The bytes to store.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        let u32le = |out: &mut Vec<u8>, n: usize| out.extend_from_slice(&(n as u32).to_le_bytes());
        let u64le = |out: &mut Vec<u8>, n: u64| out.extend_from_slice(&n.to_le_bytes());
        match self {
            Snapshot::File(b) => {
                out.push(1);
                u64le(&mut out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Snapshot::Queue(items) => {
                out.push(2);
                u64le(&mut out, items.len() as u64);
                for i in items {
                    u32le(&mut out, i.len());
                    out.extend_from_slice(i);
                }
            }
            Snapshot::Kv(pairs) => {
                out.push(3);
                u64le(&mut out, pairs.len() as u64);
                for (k, v) in pairs {
                    u32le(&mut out, k.len());
                    u32le(&mut out, v.len());
                    out.extend_from_slice(k);
                    out.extend_from_slice(v);
                }
            }
            Snapshot::Log { start, bytes } => {
                out.push(4);
                u64le(&mut out, *start);
                u64le(&mut out, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
        }
        let s = sum(&out);
        out.extend_from_slice(&s.to_le_bytes());
        out
    }

    /// Parses stored bytes (any input: never panics, allocates at most about the
    /// input's size).
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        if bytes.len() < MAGIC.len() + 1 + 8 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        let mut stored = [0u8; 8];
        stored.copy_from_slice(tail);
        if sum(body) != u64::from_le_bytes(stored) {
            return Err(SnapshotError::Checksum);
        }
        let mut r = Reader { b: &body[9..] };
        let snap = match body[8] {
            1 => {
                let n = r.len64()?;
                Snapshot::File(r.take(n)?.to_vec())
            }
            2 => {
                let count = r.u64()?;
                let mut items = Vec::new();
                for _ in 0..count {
                    let n = r.u32()? as usize;
                    items.push(r.take(n)?.to_vec());
                }
                Snapshot::Queue(items)
            }
            3 => {
                let count = r.u64()?;
                let mut pairs = Vec::new();
                for _ in 0..count {
                    let (k, v) = (r.u32()? as usize, r.u32()? as usize);
                    let key = r.take(k)?.to_vec();
                    pairs.push((key, r.take(v)?.to_vec()));
                }
                Snapshot::Kv(pairs)
            }
            4 => {
                let start = r.u64()?;
                let n = r.len64()?;
                Snapshot::Log {
                    start,
                    bytes: r.take(n)?.to_vec(),
                }
            }
            k => return Err(SnapshotError::Kind(k)),
        };
        if !r.b.is_empty() {
            return Err(SnapshotError::Body("bytes after the last entry"));
        }
        Ok(snap)
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if n > self.b.len() {
            return Err(SnapshotError::Body("an entry runs past the end"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut w = [0u8; 4];
        w.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(w))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut w = [0u8; 8];
        w.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(w))
    }

    fn len64(&mut self) -> Result<usize, SnapshotError> {
        usize::try_from(self.u64()?).map_err(|_| SnapshotError::Body("length beyond memory"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Snapshot> {
        vec![
            Snapshot::File(b"hello".to_vec()),
            Snapshot::File(vec![]),
            Snapshot::Queue(vec![b"a".to_vec(), vec![], vec![9; 300]]),
            Snapshot::Kv(vec![(b"k".to_vec(), b"v".to_vec()), (vec![], vec![1; 70])]),
            Snapshot::Log {
                start: 4096,
                bytes: vec![3; 100],
            },
        ]
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        for s in samples() {
            let bytes = s.encode();
            assert_eq!(Snapshot::decode(&bytes), Ok(s.clone()));
            for cut in 0..bytes.len() {
                assert!(
                    Snapshot::decode(&bytes[..cut]).is_err(),
                    "truncated at {cut}"
                );
            }
            let mut bad = bytes.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x40;
            assert!(Snapshot::decode(&bad).is_err());
        }
        assert_eq!(
            Snapshot::decode(b"garbage!garbage!"),
            Err(SnapshotError::Magic)
        );
    }

    #[test]
    fn writes_the_seed_corpus_when_asked() {
        // FARPOOL_WRITE_CORPUS=1 regenerates fuzz/corpus/snapshot from the samples.
        if std::env::var_os("FARPOOL_WRITE_CORPUS").is_none() {
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/snapshot");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in samples().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s.encode()).unwrap();
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Snapshot::decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let s = sum(&framed);
            framed.extend_from_slice(&s.to_le_bytes());
            let _ = Snapshot::decode(&framed);
        }
    }
}
