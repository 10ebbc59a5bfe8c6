//! Data structures built on one-sided operations: [`File`], [`Queue`], [`Kv`] and
//! the shared [`Log`].
//!
//! They live at pool paths and are shared by every client that opens the path; all
//! coordination happens through 8-byte CAS/FAA on memory-node blocks, plus the
//! controller for allocating and freeing blocks. Nothing relies on more than RDMA
//! promises (large READ/WRITE may tear, batches complete in any order); see
//! `docs/DATA_STRUCTURES.md` for the layouts and the concurrency arguments.
//!
//! ```no_run
//! # fn main() -> Result<(), farpool::ds::DsError> {
//! use farpool::ds::{File, Queue, QueueConfig};
//! let client = farpool::Client::connect("127.0.0.1:7070")?;
//! let task = client.task("/job/map/m0")?;
//! let file = File::create(&task, "out")?;
//! file.append(b"hello")?;
//! let queue = Queue::create(&task, "work", QueueConfig::default())?;
//! queue.enqueue(b"item")?;
//! // Another client, elsewhere:
//! let q = Queue::open(&client, "/job/map/m0/work")?;
//! assert_eq!(q.dequeue()?.as_deref(), Some(&b"item"[..]));
//! # Ok(()) }
//! ```

mod file;
mod kv;
mod log;
mod mapped;
mod notify;
mod object;
mod persist;
mod queue;
mod snapshot;

pub use file::File;
pub use kv::{
    fuzz_cached_validate as fuzz_kv_cached, fuzz_intent as fuzz_kv_intent,
    fuzz_repair as fuzz_kv_repair, FaultAction, FaultPoint, Kv, KvCacheStats, KvConfig,
    KvLockStats, KvRepartitions, KvScavenged, DEFAULT_CACHE_CAPACITY as DEFAULT_KV_CACHE_CAPACITY,
};
pub use log::{Log, LogEntry, Scan, MAX_STREAMS};
pub use mapped::{kind_at, sync_any, ObjectFlags, ObjectKind};
pub use notify::{
    listen, EventKind, Listener, ListenerConfig, Notification, DEFAULT_REFRESH, EVENT_DATA_MAX,
    MAX_LISTENERS,
};
pub use queue::{Queue, QueueConfig, QueueSegments};
pub use snapshot::{Snapshot, SnapshotError};

use crate::client::ClientError;
use crate::proto::{BlockId, PathError, PoolPath};

/// Why a data-structure operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DsError {
    /// A control or data-plane call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A path is malformed.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A test armed a fault that stopped the operation as a crash would (see
    /// [`kv::FaultPoint`]); never returned otherwise.
    #[error("fault injected at {0}: the operation stopped as if its client had crashed")]
    FaultInjected(String),
    /// Nothing (or nothing finished) lives at the path.
    #[error(
        "no {kind} at '{path}'; create it first (File::create, Queue::create) or check the path"
    )]
    NotFound {
        /// What was looked for.
        kind: &'static str,
        /// The path.
        path: PoolPath,
    },
    /// The path holds another kind of object, or memory that is not a farpool object.
    #[error("'{path}' is not a {kind} (magic word {found:#018x}); open it with the type that created it")]
    WrongKind {
        /// What was expected.
        kind: &'static str,
        /// The path.
        path: PoolPath,
        /// The magic word found.
        found: u64,
    },
    /// The object's block directory is full.
    #[error("'{path}' has used all {entries} entries of its block directory; create a new object, or use a larger block size (the directory lives in one block)")]
    DirectoryFull {
        /// The object.
        path: PoolPath,
        /// Directory entries.
        entries: u64,
    },
    /// The controller granted a block of an unexpected size.
    #[error("'{path}' needs blocks of at least {needed} bytes, the pool granted {granted}; all memory nodes of a pool should use one block size")]
    BlockSize {
        /// The object.
        path: PoolPath,
        /// Bytes needed per block.
        needed: u64,
        /// Bytes granted.
        granted: u64,
    },
    /// A queue item does not fit a slot.
    #[error("item of {len} bytes does not fit the queue's slots ({max} bytes at most); create the queue with a larger QueueConfig::slot_size")]
    ItemTooLarge {
        /// Item length.
        len: usize,
        /// Largest item.
        max: usize,
    },
    /// The log position was trimmed.
    #[error("position {position} of log '{path}' was trimmed; the log now starts at {start}")]
    Trimmed {
        /// The log.
        path: PoolPath,
        /// The position asked for.
        position: u64,
        /// The first position still held.
        start: u64,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The persistent tier failed.
    #[error(transparent)]
    Tier(#[from] crate::tier::TierError),
    /// What the persistent tier holds is not a usable snapshot.
    #[error("loading '{key}' from the persistent tier: {source}")]
    Snapshot {
        /// The object's key in the tier.
        key: String,
        /// What is wrong with it.
        #[source]
        source: SnapshotError,
    },
    /// `load` into a path that already holds data.
    #[error(
        "'{path}' already holds a {kind} with data; remove it first or load under another path"
    )]
    Exists {
        /// What is there.
        kind: &'static str,
        /// The path.
        path: PoolPath,
    },
    /// An operation completed, but its notification event could not be published.
    #[error("the operation on '{path}' completed, but its notification could not be published ({source}); listeners may miss this event, do not repeat the operation")]
    NotPublished {
        /// The object.
        path: PoolPath,
        /// Why publishing failed.
        #[source]
        source: Box<DsError>,
    },
    /// The listener went without a heartbeat for longer than the lease and was dropped.
    #[error("the listener on '{path}' was dropped after {lease:?} without a heartbeat (call next more often); subscribe again, events in between are lost")]
    ListenerExpired {
        /// The object.
        path: PoolPath,
        /// The lease of the object's listeners.
        lease: std::time::Duration,
    },
    /// Every listener slot of the object is taken.
    #[error("'{path}' already has {max} listeners; unsubscribe one, or share a listener")]
    TooManyListeners {
        /// The object.
        path: PoolPath,
        /// Most listeners at a time.
        max: u64,
    },
    /// `next` on a listener that is not subscribed.
    #[error("the listener on '{path}' is not subscribed; call subscribe first")]
    NotSubscribed {
        /// The object.
        path: PoolPath,
    },
    /// Remote memory does not hold what the layout says it must.
    #[error("'{path}' is corrupt: {what}; it was probably overwritten through raw block handles, recreate it")]
    Corrupt {
        /// The object.
        path: PoolPath,
        /// What is wrong.
        what: String,
    },
}

/// Whether `e` says the block was freed since its grant (a newer epoch exists).
pub(crate) fn is_stale(e: &ClientError) -> bool {
    use farpool_rdma::{Error, OpError};
    matches!(
        e,
        ClientError::Transport(
            Error::Op(OpError::StaleEpoch { .. })
                | Error::Partial {
                    error: OpError::StaleEpoch { .. },
                    ..
                }
        )
    )
}

/// A block id as a directory word: `node << 32 | index` (node ids start at 1).
pub(crate) fn encode_id(id: BlockId) -> u64 {
    (u64::from(id.node) << 32) | u64::from(id.index)
}

/// The block id in a directory word.
pub(crate) fn decode_id(w: u64) -> BlockId {
    BlockId {
        node: (w >> 32) as u32,
        index: w as u32,
    }
}
