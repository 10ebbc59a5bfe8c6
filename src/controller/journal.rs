//! The controller's metadata log format: records, snapshots and their framing.
//!
//! Pure logic, no file I/O (that lives in `store`), so the format is unit-tested and
//! fuzzed on byte slices.
//!
//! # Layout
//! A log file and a snapshot file both start with an 8-byte magic that names the file
//! kind and format version, followed by frames:
//!
//! ```text
//! [len: u32 LE][crc32 of payload: u32 LE][payload: len bytes, bincode]
//! ```
//!
//! A log holds one [`Record`] per frame; a snapshot holds exactly one [`Snapshot`].
//!
//! # Torn tails and corruption
//! Records are appended with one `write` each, so a `kill -9` leaves at most one
//! incomplete frame at the end (and a machine crash may leave garbage or zeros past the
//! last synced byte). [`decode_log`] therefore stops at the first frame that is
//! incomplete, zero-length, fails its checksum *and is the last frame in the file*, or
//! is followed only by zero bytes: that is a torn tail, reported with the offset to
//! truncate at. A frame that fails its checksum or does not decode while complete
//! frames follow it is corruption in the middle of the log: that is an error, because
//! dropping it would silently lose acknowledged metadata.

use crate::proto::grant::WireTransport;
use crate::proto::{Backing, BlockId, PoolPath};
use bincode::Options;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Magic at the start of a log file (format version in the last byte).
pub const LOG_MAGIC: [u8; 8] = *b"FPLOG\0\0\x01";
/// Magic at the start of a snapshot file (format version in the last byte).
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"FPSNAP\0\x02";
/// Magic of format 1 snapshots (no replica groups, no mappings), still read.
pub const SNAPSHOT_MAGIC_V1: [u8; 8] = *b"FPSNAP\0\x01";
/// Frame header: length and checksum.
pub const FRAME_HEADER: usize = 8;
/// Largest record payload accepted (a snapshot may be larger, see
/// [`MAX_SNAPSHOT`]).
pub const MAX_RECORD: usize = 16 << 20;
/// Largest snapshot payload accepted.
pub const MAX_SNAPSHOT: usize = 1 << 30;

/// A memory node's registration as kept in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id (never reused).
    pub id: u32,
    /// Random identity of the memory node process; a node that re-registers with the
    /// same incarnation keeps its blocks. 0: the node cannot resume.
    pub incarnation: u64,
    /// Data-plane address.
    pub data_addr: String,
    /// Transport served.
    pub transport: WireTransport,
    /// Region size in bytes.
    pub capacity: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Huge-page backed.
    pub hugepages: bool,
    /// Locked in memory.
    pub locked: bool,
}

/// One metadata change. Replaying the records of a log, in order, on the snapshot
/// that precedes it reproduces the controller's metadata (leases excepted: they are
/// re-armed at recovery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A memory node registered and got a fresh id; its blocks start free.
    NodeRegistered(NodeInfo),
    /// A known memory node came back (same incarnation): it is alive again and its
    /// free blocks are being revoked anew (see `Registry::resume`).
    NodeResumed {
        /// Node id.
        id: u32,
        /// Data-plane address it now serves on.
        data_addr: String,
        /// Huge-page backed.
        hugepages: bool,
        /// Locked in memory.
        locked: bool,
    },
    /// A memory node was declared dead.
    NodeDead {
        /// Node id.
        id: u32,
    },
    /// A dead memory node holding no data was dropped from the registry.
    NodeDropped {
        /// Node id.
        id: u32,
    },
    /// A path was created (with its missing parents).
    Opened {
        /// The path.
        path: PoolPath,
    },
    /// A quota was set or cleared (the path is created if missing).
    Quota {
        /// The path.
        path: PoolPath,
        /// The limit; `None` clears it.
        bytes: Option<u64>,
    },
    /// Blocks were allocated to a path (created if missing).
    Alloc {
        /// Owner path.
        path: PoolPath,
        /// `(node, index, epoch)` of each block, in allocation order.
        blocks: Vec<(u32, u32, u32)>,
    },
    /// Blocks owned by a path were freed (epochs bumped).
    Free {
        /// Owner path.
        path: PoolPath,
        /// The blocks.
        blocks: Vec<BlockId>,
    },
    /// A path and its subtree were removed (explicitly or by lease expiry).
    Remove {
        /// The path.
        path: PoolPath,
    },
    /// A memory node confirmed revocations.
    Confirmed {
        /// Node id.
        node: u32,
        /// `(index, epoch)` pairs confirmed.
        blocks: Vec<(u32, u32)>,
    },
    /// A path was pinned or unpinned.
    Pin {
        /// The path.
        path: PoolPath,
        /// Pinned or not.
        pinned: bool,
    },
    /// The blocks of the preceding [`Record::Alloc`] form replica groups.
    Replicas {
        /// `(group id, copies wanted, members)` per group.
        groups: Vec<(u64, u8, Vec<BlockId>)>,
    },
    /// Re-replication of a group started: `target` was given to `path` as the
    /// group's pending copy.
    RepairStarted {
        /// Owner path.
        path: PoolPath,
        /// Replica group id.
        group: u64,
        /// `(node, index, epoch)` of the new copy.
        target: (u32, u32, u32),
    },
    /// The pending copy of a group is in sync: it became a member and the group's
    /// members on dead nodes were freed.
    RepairDone {
        /// Replica group id.
        group: u64,
        /// The new copy.
        target: BlockId,
    },
    /// Re-replication of a group failed: its pending copy was freed.
    RepairAbandoned {
        /// Replica group id.
        group: u64,
        /// The freed copy.
        target: BlockId,
    },
    /// A path was mapped to a backing path in the persistent tier, or unmapped.
    Map {
        /// The path.
        path: PoolPath,
        /// Where it is flushed at lease expiry; `None`: unmapped.
        backing: Option<Backing>,
    },
    /// A fenced lock on a path was granted (see `controller::fence`).
    Fenced {
        /// The path locked.
        path: PoolPath,
        /// Its token (larger than every earlier grant's).
        token: u64,
        /// Time to live in milliseconds (re-armed from recovery).
        ttl_ms: u64,
    },
    /// A fenced lock was released by its holder (or dropped after it expired).
    Unfenced {
        /// The path.
        path: PoolPath,
        /// The token released.
        token: u64,
    },
}

/// One replica group in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapGroup {
    /// Group id.
    pub id: u64,
    /// Copies wanted.
    pub copies: u8,
    /// The group's stable identity (first copy at allocation).
    pub origin: BlockId,
    /// Copies holding the data.
    pub members: Vec<BlockId>,
    /// Copy being filled by re-replication.
    pub pending: Option<BlockId>,
}

/// One held fenced lock in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapFence {
    /// The path locked.
    pub path: PoolPath,
    /// The holder's token.
    pub token: u64,
    /// Its time to live in milliseconds.
    pub ttl_ms: u64,
}

/// State of one block in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapBlock {
    /// Free.
    Free,
    /// Owned by the path that lists it.
    Owned,
    /// Revocation pending.
    Revoking,
    /// Epochs exhausted.
    Retired,
}

/// One memory node in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapNode {
    /// Registration.
    pub info: NodeInfo,
    /// Whether it was alive.
    pub alive: bool,
    /// `(epoch, state)` of every block handed out at least once, by index.
    pub blocks: Vec<(u32, SnapBlock)>,
}

/// One path in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapPath {
    /// The path.
    pub path: PoolPath,
    /// Its quota.
    pub quota: Option<u64>,
    /// Blocks it owns, in allocation order.
    pub blocks: Vec<BlockId>,
    /// Never reclaimed by lease expiry.
    pub pinned: bool,
}

/// The whole metadata at one point: what a log generation starts from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Id the next registering node gets.
    pub next_node_id: u32,
    /// Nodes in id order.
    pub nodes: Vec<SnapNode>,
    /// Paths (root included when it has a quota) in path order, so parents come
    /// before children.
    pub paths: Vec<SnapPath>,
    /// Replica groups, by id.
    pub groups: Vec<SnapGroup>,
    /// Id the next replica group gets.
    pub next_group: u64,
    /// Mapped paths with their backing paths, in path order.
    pub mappings: Vec<(PoolPath, Backing)>,
    /// Token the next fenced lock gets.
    pub next_fence: u64,
    /// Fenced locks held, in path order.
    pub fences: Vec<SnapFence>,
}

/// A snapshot in format 1 ([`SNAPSHOT_MAGIC_V1`]), written before replica groups,
/// mappings and fenced locks existed: decoded with none of them.
#[derive(Deserialize)]
struct SnapshotV1 {
    next_node_id: u32,
    nodes: Vec<SnapNode>,
    paths: Vec<SnapPath>,
}

impl From<SnapshotV1> for Snapshot {
    fn from(v: SnapshotV1) -> Self {
        Snapshot {
            next_node_id: v.next_node_id,
            nodes: v.nodes,
            paths: v.paths,
            groups: Vec::new(),
            next_group: 1,
            mappings: Vec::new(),
            next_fence: 1,
            fences: Vec::new(),
        }
    }
}

/// Why log or snapshot bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file does not start with the expected magic.
    #[error("not a farpool {kind} file (bad magic or unsupported format version); move it out of the data directory or use the farpool version that wrote it")]
    BadMagic {
        /// "log" or "snapshot".
        kind: &'static str,
    },
    /// A complete frame in the middle of the file is damaged.
    #[error("metadata {kind} is corrupt at byte {offset}: {reason}; restore the data directory from a backup, or move it aside to start with empty metadata")]
    Corrupt {
        /// "log" or "snapshot".
        kind: &'static str,
        /// Offset of the damaged frame.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A record or snapshot could not be encoded.
    #[error("cannot encode metadata: {0}")]
    Encode(String),
}

/// What [`decode_log`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedLog {
    /// Every intact record, in order.
    pub records: Vec<Record>,
    /// Length of the intact prefix (magic included): truncate the file here.
    pub valid_len: u64,
    /// Bytes of torn tail dropped after `valid_len` (0: none).
    pub torn_bytes: u64,
}

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit as u64)
}

/// Encodes `value` as one frame (header included).
fn encode_frame<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, FormatError> {
    let payload = options(limit)
        .serialize(value)
        .map_err(|e| FormatError::Encode(e.to_string()))?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= limit)
        .ok_or_else(|| FormatError::Encode(format!("{} bytes is too large", payload.len())))?;
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Encodes one record as a log frame.
pub fn encode_record(record: &Record) -> Result<Vec<u8>, FormatError> {
    encode_frame(record, MAX_RECORD)
}

/// Encodes a whole snapshot file (magic and one frame).
pub fn encode_snapshot(snapshot: &Snapshot) -> Result<Vec<u8>, FormatError> {
    let mut out = SNAPSHOT_MAGIC.to_vec();
    out.extend(encode_frame(snapshot, MAX_SNAPSHOT)?);
    Ok(out)
}

/// One frame read from `bytes` at `at`.
enum Frame<'a> {
    /// A frame whose checksum matches.
    Intact { payload: &'a [u8], next: usize },
    /// The frame runs past the end of the bytes.
    Incomplete,
    /// Length zero or above the limit.
    BadLength(u32),
    /// Checksum mismatch; the frame ends at `next`.
    BadChecksum { next: usize },
}

fn read_frame(bytes: &[u8], at: usize, limit: usize) -> Frame<'_> {
    let Some(header) = bytes.get(at..at + FRAME_HEADER) else {
        return Frame::Incomplete;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len as usize > limit {
        return Frame::BadLength(len);
    }
    let start = at + FRAME_HEADER;
    let Some(payload) = bytes.get(start..start + len as usize) else {
        return Frame::Incomplete;
    };
    let next = start + len as usize;
    if crc32fast::hash(payload) != crc {
        return Frame::BadChecksum { next };
    }
    Frame::Intact { payload, next }
}

fn decode_payload<T: DeserializeOwned>(payload: &[u8], limit: usize) -> Result<T, String> {
    options(limit)
        .reject_trailing_bytes()
        .deserialize(payload)
        .map_err(|e| e.to_string())
}

/// Decodes a whole log file. Empty bytes are an empty log (a file created but never
/// written). A torn tail is reported in [`DecodedLog::torn_bytes`], corruption before
/// the tail is an error.
pub fn decode_log(bytes: &[u8]) -> Result<DecodedLog, FormatError> {
    const KIND: &str = "log";
    if bytes.is_empty() {
        return Ok(DecodedLog {
            records: Vec::new(),
            valid_len: 0,
            torn_bytes: 0,
        });
    }
    if bytes.len() < LOG_MAGIC.len() {
        // The magic itself was torn: nothing was ever logged after it.
        return if LOG_MAGIC.starts_with(bytes) || bytes.iter().all(|&b| b == 0) {
            Ok(DecodedLog {
                records: Vec::new(),
                valid_len: 0,
                torn_bytes: bytes.len() as u64,
            })
        } else {
            Err(FormatError::BadMagic { kind: KIND })
        };
    }
    if bytes[..LOG_MAGIC.len()] != LOG_MAGIC {
        return Err(FormatError::BadMagic { kind: KIND });
    }
    let mut records = Vec::new();
    let mut at = LOG_MAGIC.len();
    let corrupt = |offset: usize, reason: String| FormatError::Corrupt {
        kind: KIND,
        offset: offset as u64,
        reason,
    };
    while at < bytes.len() {
        let torn = match read_frame(bytes, at, MAX_RECORD) {
            Frame::Intact { payload, next } => {
                match decode_payload::<Record>(payload, MAX_RECORD) {
                    Ok(r) => {
                        records.push(r);
                        at = next;
                        continue;
                    }
                    Err(e) => return Err(corrupt(at, format!("record does not decode: {e}"))),
                }
            }
            Frame::Incomplete => true,
            Frame::BadLength(len) => {
                if bytes[at..].iter().all(|&b| b == 0) {
                    true
                } else {
                    return Err(corrupt(at, format!("frame length {len} is out of range")));
                }
            }
            Frame::BadChecksum { next } => {
                if next == bytes.len() || bytes[next..].iter().all(|&b| b == 0) {
                    true
                } else {
                    return Err(corrupt(at, "checksum mismatch".into()));
                }
            }
        };
        debug_assert!(torn);
        return Ok(DecodedLog {
            records,
            valid_len: at as u64,
            torn_bytes: (bytes.len() - at) as u64,
        });
    }
    Ok(DecodedLog {
        records,
        valid_len: at as u64,
        torn_bytes: 0,
    })
}

/// Decodes a snapshot file. Snapshots are written to a temporary file and renamed
/// into place only once complete and synced, so any damage is an error.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, FormatError> {
    const KIND: &str = "snapshot";
    let v1 = match bytes.get(..SNAPSHOT_MAGIC.len()) {
        Some(m) if m == &SNAPSHOT_MAGIC[..] => false,
        Some(m) if m == &SNAPSHOT_MAGIC_V1[..] => true,
        _ => return Err(FormatError::BadMagic { kind: KIND }),
    };
    let at = SNAPSHOT_MAGIC.len();
    let corrupt = |reason: String| FormatError::Corrupt {
        kind: KIND,
        offset: at as u64,
        reason,
    };
    match read_frame(bytes, at, MAX_SNAPSHOT) {
        Frame::Intact { payload, next } if next == bytes.len() => if v1 {
            decode_payload::<SnapshotV1>(payload, MAX_SNAPSHOT).map(Snapshot::from)
        } else {
            decode_payload(payload, MAX_SNAPSHOT)
        }
        .map_err(corrupt),
        Frame::Intact { .. } => Err(corrupt("trailing bytes after the snapshot".into())),
        Frame::Incomplete => Err(corrupt("truncated".into())),
        Frame::BadLength(len) => Err(corrupt(format!("frame length {len} is out of range"))),
        Frame::BadChecksum { .. } => Err(corrupt("checksum mismatch".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PoolPath {
        PoolPath::parse(s).unwrap()
    }

    fn sample() -> Vec<Record> {
        vec![
            Record::NodeRegistered(NodeInfo {
                id: 1,
                incarnation: 42,
                data_addr: "127.0.0.1:9000".into(),
                transport: WireTransport::Soft,
                capacity: 1 << 20,
                block_size: 4096,
                hugepages: false,
                locked: true,
            }),
            Record::Opened { path: p("/job") },
            Record::Alloc {
                path: p("/job/a"),
                blocks: vec![(1, 0, 1), (1, 1, 1)],
            },
            Record::Free {
                path: p("/job/a"),
                blocks: vec![BlockId { node: 1, index: 0 }],
            },
            Record::Confirmed {
                node: 1,
                blocks: vec![(0, 2)],
            },
            Record::Quota {
                path: p("/job"),
                bytes: Some(1 << 20),
            },
            Record::Remove { path: p("/job") },
            Record::NodeDead { id: 1 },
            Record::NodeDropped { id: 1 },
            Record::Pin {
                path: p("/job"),
                pinned: true,
            },
            Record::Map {
                path: p("/job"),
                backing: Some(Backing {
                    url: "/var/lib/farpool/tier".into(),
                    key: "job/kv".into(),
                }),
            },
            Record::Map {
                path: p("/job"),
                backing: None,
            },
            Record::Fenced {
                path: p("/job/kv"),
                token: 7,
                ttl_ms: 2000,
            },
            Record::Unfenced {
                path: p("/job/kv"),
                token: 7,
            },
        ]
    }

    /// Records of a replicated allocation and its repair after a node loss.
    fn replica_sample() -> Vec<Record> {
        let b = |node, index| BlockId { node, index };
        vec![
            Record::Alloc {
                path: p("/job/r"),
                blocks: vec![(1, 0, 1), (2, 0, 1)],
            },
            Record::Replicas {
                groups: vec![(1, 2, vec![b(1, 0), b(2, 0)])],
            },
            Record::NodeDead { id: 1 },
            Record::RepairStarted {
                path: p("/job/r"),
                group: 1,
                target: (3, 0, 1),
            },
            Record::RepairAbandoned {
                group: 1,
                target: b(3, 0),
            },
            Record::RepairStarted {
                path: p("/job/r"),
                group: 1,
                target: (3, 1, 1),
            },
            Record::RepairDone {
                group: 1,
                target: b(3, 1),
            },
        ]
    }

    pub(crate) fn log_bytes(records: &[Record]) -> Vec<u8> {
        let mut out = LOG_MAGIC.to_vec();
        for r in records {
            out.extend(encode_record(r).unwrap());
        }
        out
    }

    #[test]
    fn round_trip() {
        let recs = sample();
        let bytes = log_bytes(&recs);
        let d = decode_log(&bytes).unwrap();
        assert_eq!(d.records, recs);
        assert_eq!(d.valid_len, bytes.len() as u64);
        assert_eq!(d.torn_bytes, 0);
        assert_eq!(decode_log(&[]).unwrap().records, vec![]);
        assert_eq!(decode_log(&LOG_MAGIC).unwrap().records, vec![]);
    }

    #[test]
    fn every_torn_tail_is_truncated_to_the_last_whole_record() {
        let recs = sample();
        let bytes = log_bytes(&recs);
        // Frame boundaries.
        let mut ends = vec![LOG_MAGIC.len()];
        for r in &recs {
            ends.push(ends.last().unwrap() + encode_record(r).unwrap().len());
        }
        for cut in 0..bytes.len() {
            let d = decode_log(&bytes[..cut]).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            let whole = ends.iter().filter(|&&e| e <= cut).count().saturating_sub(1);
            assert_eq!(d.records, recs[..whole], "cut {cut}");
            let valid = if cut < LOG_MAGIC.len() {
                0
            } else {
                ends[whole]
            };
            assert_eq!(d.valid_len, valid as u64, "cut {cut}");
            assert_eq!(d.torn_bytes, (cut - valid) as u64, "cut {cut}");
        }
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let recs = sample();
        let mut bytes = log_bytes(&recs);
        let len = bytes.len();
        bytes.extend([0u8; 4096]);
        let d = decode_log(&bytes).unwrap();
        assert_eq!(d.records, recs);
        assert_eq!(d.valid_len, len as u64);
        assert_eq!(d.torn_bytes, 4096);
    }

    #[test]
    fn bad_checksum_in_last_frame_is_torn_but_in_the_middle_is_corrupt() {
        let recs = sample();
        let mut bytes = log_bytes(&recs);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let d = decode_log(&bytes).unwrap();
        assert_eq!(d.records, recs[..recs.len() - 1]);
        assert!(d.torn_bytes > 0);

        let mut bytes = log_bytes(&recs);
        // Flip a payload byte of the second record.
        let at = LOG_MAGIC.len() + encode_record(&recs[0]).unwrap().len() + FRAME_HEADER;
        bytes[at] ^= 0x01;
        let err = decode_log(&bytes).unwrap_err();
        assert!(
            matches!(err, FormatError::Corrupt { kind: "log", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("move it aside"), "{err}");
    }

    #[test]
    fn bad_magic_and_garbage_are_errors() {
        assert!(matches!(
            decode_log(b"NOTALOG!xxxx"),
            Err(FormatError::BadMagic { .. })
        ));
        assert!(matches!(
            decode_log(b"xyz"),
            Err(FormatError::BadMagic { .. })
        ));
        let mut bytes = LOG_MAGIC.to_vec();
        bytes.extend([0xff; 64]);
        assert!(decode_log(&bytes).is_err());
        // A checksum-valid frame that is not a record.
        let mut bytes = LOG_MAGIC.to_vec();
        bytes.extend(encode_frame(&u8::MAX, MAX_RECORD).unwrap());
        bytes.extend(encode_record(&sample()[1]).unwrap());
        assert!(matches!(
            decode_log(&bytes),
            Err(FormatError::Corrupt { .. })
        ));
    }

    #[test]
    fn snapshot_round_trip_and_damage() {
        let snap = Snapshot {
            next_node_id: 3,
            nodes: vec![SnapNode {
                info: NodeInfo {
                    id: 2,
                    incarnation: 7,
                    data_addr: "a".into(),
                    transport: WireTransport::Shm,
                    capacity: 8192,
                    block_size: 4096,
                    hugepages: true,
                    locked: false,
                },
                alive: true,
                blocks: vec![(1, SnapBlock::Owned), (3, SnapBlock::Revoking)],
            }],
            paths: vec![SnapPath {
                path: p("/j"),
                quota: Some(4096),
                blocks: vec![BlockId { node: 2, index: 0 }],
                pinned: true,
            }],
            groups: vec![SnapGroup {
                id: 4,
                copies: 2,
                origin: BlockId { node: 1, index: 0 },
                members: vec![BlockId { node: 2, index: 0 }],
                pending: Some(BlockId { node: 3, index: 5 }),
            }],
            next_group: 5,
            mappings: vec![(
                p("/j"),
                Backing {
                    url: "s3://b/x".into(),
                    key: "k".into(),
                },
            )],
            next_fence: 9,
            fences: vec![SnapFence {
                path: p("/j/kv"),
                token: 8,
                ttl_ms: 2000,
            }],
        };
        let bytes = encode_snapshot(&snap).unwrap();
        assert_eq!(decode_snapshot(&bytes).unwrap(), snap);
        // A format-1 snapshot (before replica groups, mappings and fences) still decodes.
        #[derive(Serialize)]
        struct V1<'a> {
            next_node_id: u32,
            nodes: &'a [SnapNode],
            paths: &'a [SnapPath],
        }
        let mut v1 = SNAPSHOT_MAGIC_V1.to_vec();
        v1.extend(
            encode_frame(
                &V1 {
                    next_node_id: snap.next_node_id,
                    nodes: &snap.nodes,
                    paths: &snap.paths,
                },
                MAX_SNAPSHOT,
            )
            .unwrap(),
        );
        let old = decode_snapshot(&v1).unwrap();
        assert_eq!(old.paths, snap.paths);
        assert!(old.mappings.is_empty() && old.groups.is_empty() && old.fences.is_empty());
        assert_eq!(old.next_fence, 1);
        for cut in 0..bytes.len() {
            assert!(decode_snapshot(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_snapshot(&bad).is_err());
        let mut long = bytes;
        long.push(0);
        assert!(decode_snapshot(&long).is_err());
    }

    /// The committed fuzz seed corpus for the log decoder stays decodable.
    /// `FARPOOL_WRITE_CORPUS=1 cargo test -p farpool journal_seed_corpus` regenerates it.
    #[test]
    fn journal_seed_corpus_decodes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/metadata_log");
        let recs = sample();
        let whole = log_bytes(&recs);
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            ("log-whole", whole.clone()),
            ("log-torn", whole[..whole.len() - 3].to_vec()),
            ("log-empty", LOG_MAGIC.to_vec()),
            ("log-replicas", log_bytes(&replica_sample())),
        ];
        let snapshot = Snapshot {
            next_node_id: 2,
            nodes: Vec::new(),
            paths: vec![SnapPath {
                path: p("/job/kv"),
                quota: None,
                blocks: Vec::new(),
                pinned: false,
            }],
            next_fence: 1,
            fences: Vec::new(),
            groups: Vec::new(),
            next_group: 1,
            mappings: vec![(
                p("/job/kv"),
                Backing {
                    url: "/var/lib/farpool/tier".into(),
                    key: "job/kv".into(),
                },
            )],
        };
        let snapshots: Vec<(&str, Vec<u8>)> =
            vec![("snapshot-mapped", encode_snapshot(&snapshot).unwrap())];
        for (name, bytes) in seeds.into_iter().chain(snapshots) {
            let file = dir.join(name);
            if std::env::var_os("FARPOOL_WRITE_CORPUS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&file, &bytes).unwrap();
            }
            let stored = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let ok = if name.starts_with("snapshot") {
                decode_snapshot(&stored).is_ok()
            } else {
                decode_log(&stored).is_ok()
            };
            assert!(ok, "{name}");
        }
    }
}
