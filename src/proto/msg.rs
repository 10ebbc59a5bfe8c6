//! Control-plane messages.

use super::grant::{BlockGrant, BlockId, Endpoint, Secret, WireTransport};

/// Most copies a replicated allocation may ask for.
pub const MAX_COPIES: u8 = 3;
use super::path::{PathError, PoolPath};
use serde::{Deserialize, Serialize};

/// First frame on every control connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`super::PROTOCOL_VERSION`].
    pub version: u32,
    /// Who is connecting.
    pub role: Role,
}

/// Who opened a control connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Role {
    /// A client library instance (a task, a job driver, the CLI).
    Client {
        /// Free-form name for logs and status (host, process).
        name: String,
        /// A token from `farpool token` ([`super::token`]); required when the controller
        /// has a cluster key, ignored otherwise.
        token: Option<String>,
    },
    /// A memory node registering its region.
    MemNode(Register),
    /// A memory node registering with a process identity, so that it can resume its
    /// id and blocks after its connection (or the controller) restarted.
    MemNodeResumable {
        /// The region.
        register: Register,
        /// Random, non-zero, fixed for the life of the memory node process.
        incarnation: u64,
        /// Random per connection: the controller's proof of the cluster key covers it
        /// ([`ControllerMsg::Challenge`]).
        nonce: [u8; 16],
    },
}

/// A memory node's registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Register {
    /// Data-plane address clients use (`host:port` for soft, file path for shm).
    pub data_addr: String,
    /// Transport served.
    pub transport: WireTransport,
    /// Region size in bytes (a multiple of `block_size`).
    pub capacity: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Whether the region is backed by huge pages.
    pub hugepages: bool,
    /// Whether the region is locked in memory.
    pub locked: bool,
}

/// The controller's answer to a client [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// The controller's protocol version.
    pub version: u32,
    /// Lease period in milliseconds: renew well within it.
    pub lease_ms: u64,
}

/// A request or response tagged with the id that pairs them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Request id, echoed in the response.
    pub id: u64,
    /// The message.
    pub body: T,
}

/// Where to place new blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Placement {
    /// Each block on the live node with the most free blocks.
    #[default]
    LeastLoaded,
    /// Blocks of one allocation round-robin across live nodes.
    Spread,
    /// All blocks on one named node.
    Node(u32),
}

/// Client requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Create the path (and its parents) if needed and renew its lease.
    Open {
        /// Path to open.
        path: PoolPath,
    },
    /// Allocate enough blocks for `bytes` to `path` (created if needed).
    Alloc {
        /// Owner path.
        path: PoolPath,
        /// Bytes wanted; rounded up to whole blocks.
        bytes: u64,
        /// Placement policy.
        placement: Placement,
    },
    /// Free blocks owned by `path`.
    Free {
        /// Owner path.
        path: PoolPath,
        /// Blocks to free.
        blocks: Vec<BlockId>,
    },
    /// Grants for the blocks owned by exactly `path`, in allocation order.
    Lookup {
        /// Owner path.
        path: PoolPath,
        /// Whether write access is wanted.
        writable: bool,
    },
    /// Renew the lease of `prefix` and, through it, its whole subtree.
    Renew {
        /// Prefix to renew.
        prefix: PoolPath,
    },
    /// Remove `path` and its subtree, freeing every block in it.
    Remove {
        /// Path to remove.
        path: PoolPath,
    },
    /// Set (or clear) the byte quota of `path` (covers its subtree).
    SetQuota {
        /// Path the quota applies to.
        path: PoolPath,
        /// Limit in bytes; `None` clears it.
        bytes: Option<u64>,
    },
    /// Cluster status: nodes, capacity, usage per path.
    Status,
    /// Pin (or unpin) `path`: a pinned path is never reclaimed by lease expiry (its
    /// blocks stay, and so do its ancestors); it goes only when removed.
    Pin {
        /// The path (must exist, not the root).
        path: PoolPath,
        /// `true` pins, `false` unpins (the lease applies again from then on).
        pinned: bool,
    },
    /// Like [`Request::Alloc`], with `copies` copies of every block, each on a
    /// different memory node (1 = unreplicated).
    AllocReplicated {
        /// Owner path.
        path: PoolPath,
        /// Bytes wanted; rounded up to whole blocks.
        bytes: u64,
        /// Placement policy (for the primary copies; other copies go to the least
        /// loaded other nodes).
        placement: Placement,
        /// Copies per block (1 to [`MAX_COPIES`]).
        copies: u8,
    },
    /// The current grant of one block of `path`: the replica group `group` (from
    /// the block's [`super::grant::Replication`]), or, with `group` 0, the unreplicated `block`.
    /// Fails with [`ControlError::DataLost`] when no copy survives.
    Refresh {
        /// Owner path.
        path: PoolPath,
        /// Replica group id, 0 for an unreplicated block.
        group: u64,
        /// The block (used when `group` is 0).
        block: BlockId,
        /// Whether write access is wanted.
        writable: bool,
    },
    /// Map (or unmap) the object at `path` to a backing path in the persistent tier:
    /// when its lease runs out, the controller flushes it there before freeing it.
    Map {
        /// The object's path (must exist, not the root).
        path: PoolPath,
        /// Where to flush it; `None` removes the mapping.
        backing: Option<Backing>,
    },
    /// Take the fenced lock on `path` (answered with [`Response::Fence`], or
    /// [`ControlError::FenceHeld`] while another holder renews it).
    FenceAcquire {
        /// The path to lock (it need not exist).
        path: PoolPath,
        /// Time to live in milliseconds; renew within it to keep the lock.
        ttl_ms: u64,
    },
    /// Extend the fenced lock held under `token` ([`ControlError::FenceLost`] when it
    /// was taken over or released).
    FenceRenew {
        /// The path locked.
        path: PoolPath,
        /// The holder's token.
        token: u64,
        /// New time to live in milliseconds, from now.
        ttl_ms: u64,
    },
    /// Release the fenced lock held under `token` (no-op when it is not held so).
    FenceRelease {
        /// The path locked.
        path: PoolPath,
        /// The holder's token.
        token: u64,
    },
}

/// A backing path in the persistent tier ([`crate::tier::Tier`]): a tier URL and a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backing {
    /// The tier, as seen by the controller's process: an absolute directory,
    /// `file:///dir` or `s3://bucket/prefix`.
    pub url: String,
    /// The object's key in the tier.
    pub key: String,
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.url, self.key)
    }
}

/// A flush of a mapped path that has not succeeded yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushStatus {
    /// The mapped path.
    pub path: PoolPath,
    /// Where it is flushed to.
    pub backing: Backing,
    /// Attempts that failed so far.
    pub failures: u32,
    /// Why the last attempt failed, if one did.
    pub last_error: Option<String>,
    /// Whether an attempt is running now.
    pub in_flight: bool,
    /// Milliseconds until the next attempt (0 while one runs or is due).
    pub retry_in_ms: u64,
}

/// Controller responses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Done, nothing to return.
    Ok,
    /// Block grants.
    Blocks(Vec<BlockGrant>),
    /// The lease now runs for this long.
    Renewed {
        /// Remaining lease in milliseconds.
        lease_ms: u64,
    },
    /// What a removal freed.
    Removed {
        /// Blocks freed.
        blocks: u64,
        /// Paths removed.
        paths: u64,
    },
    /// Cluster status.
    Status(Box<ClusterStatus>),
    /// A fenced lock was granted.
    Fence {
        /// The token: larger than that of every earlier grant.
        token: u64,
    },
    /// The request failed.
    Error(ControlError),
}

/// Messages from a memory node to the controller (after its `Hello`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NodeMsg {
    /// Periodic liveness and statistics.
    Heartbeat(NodeStats),
    /// These blocks now hold the given (new) epochs; old grants are dead.
    Revoked(Vec<(u32, u32)>),
    /// The node is shutting down cleanly (its data plane is drained): deregister it.
    Leaving,
    /// The answer to [`ControllerMsg::Challenge`]:
    /// [`super::ClusterKey::node_proof`] over both nonces and the node's identity.
    Proof([u8; 16]),
}

/// Messages from the controller to a memory node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControllerMsg {
    /// Registration accepted.
    Registered {
        /// Id assigned to the node.
        node_id: u32,
        /// Key-derivation secret, sent only in development mode (no cluster key); with a
        /// cluster key both sides derive it and this is `None`.
        secret: Option<Secret>,
        /// Heartbeat interval in milliseconds.
        heartbeat_ms: u64,
        /// Epoch every block starts at.
        initial_epoch: u32,
    },
    /// Registration accepted as the return of a known node (same incarnation): the
    /// node keeps its id, region contents and block epochs. Revocations for the
    /// blocks it does not own follow.
    Resumed {
        /// The node's id (unchanged).
        node_id: u32,
        /// As in [`ControllerMsg::Registered`].
        secret: Option<Secret>,
        /// Heartbeat interval in milliseconds.
        heartbeat_ms: u64,
    },
    /// The controller has a cluster key: it proves it holds the key
    /// ([`super::ClusterKey::controller_proof`] over both nonces and the node's
    /// identity) and asks the node to do the same with [`NodeMsg::Proof`].
    Challenge {
        /// The controller's nonce for this connection.
        nonce: [u8; 16],
        /// The controller's proof.
        proof: [u8; 16],
    },
    /// Move these blocks to the given epochs (killing old grants) and confirm with
    /// [`NodeMsg::Revoked`].
    Revoke(Vec<(u32, u32)>),
    /// Registration refused or connection closed by the controller.
    Error(ControlError),
}

/// Data-plane statistics a memory node reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Data-plane connections open now.
    pub connections: u64,
    /// READs served.
    pub ops_read: u64,
    /// WRITEs served.
    pub ops_write: u64,
    /// CAS and FAA served.
    pub ops_atomic: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Operations refused (bounds, keys, epochs).
    pub op_errors: u64,
    /// Connections closed for protocol violations.
    pub protocol_errors: u64,
    /// Resident memory of the node process in KiB (0 if unknown).
    pub rss_kib: u64,
    /// How the data plane enforces grants, where that is worth showing (verbs: the
    /// device and whether memory windows or the region rkey are used); empty otherwise.
    pub isolation: String,
}

/// Status of one memory node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// How to reach it.
    pub endpoint: Endpoint,
    /// Region size.
    pub capacity: u64,
    /// Block size.
    pub block_size: u64,
    /// Blocks in the region.
    pub blocks_total: u64,
    /// Blocks free for allocation.
    pub blocks_free: u64,
    /// Freed blocks waiting for the node to confirm revocation.
    pub blocks_revoking: u64,
    /// Whether the node is alive (heartbeats arriving).
    pub alive: bool,
    /// Milliseconds since the last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Huge-page backed region.
    pub hugepages: bool,
    /// Locked region.
    pub locked: bool,
    /// Last reported statistics.
    pub stats: NodeStats,
}

/// Usage of one path in the namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathUsage {
    /// The path.
    pub path: PoolPath,
    /// Blocks owned directly by the path.
    pub blocks: u64,
    /// Bytes owned by the path and everything below it.
    pub subtree_bytes: u64,
    /// Quota on the subtree, if any.
    pub quota: Option<u64>,
    /// Milliseconds until the lease expires (negative: expired, about to be reclaimed).
    pub lease_remaining_ms: i64,
    /// Pinned: never reclaimed by lease expiry.
    pub pinned: bool,
    /// Mapped: flushed to this backing path when the lease runs out, then freed.
    #[serde(default)]
    pub backing: Option<Backing>,
}

/// Cluster-wide status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Memory nodes.
    pub nodes: Vec<NodeStatus>,
    /// Every path with its usage, in path order.
    pub paths: Vec<PathUsage>,
    /// Total capacity of live nodes.
    pub capacity_bytes: u64,
    /// Bytes allocated.
    pub used_bytes: u64,
    /// Lease period in milliseconds.
    pub lease_ms: u64,
    /// Allocations served since start (blocks).
    pub blocks_allocated_total: u64,
    /// Blocks freed since start (explicitly, by removal, or by lease expiry).
    pub blocks_freed_total: u64,
    /// Blocks reclaimed because a lease expired.
    pub blocks_expired_total: u64,
    /// Replicated blocks with fewer live copies than wanted (being re-replicated,
    /// or waiting for a memory node to copy to).
    pub blocks_degraded: u64,
    /// Blocks whose every copy was on memory nodes that died: their data is gone.
    pub blocks_lost: u64,
    /// Copies re-created by re-replication since start.
    pub replicas_rebuilt_total: u64,
    /// Mapped paths flushed to their backing path and freed since start.
    #[serde(default)]
    pub flushes_total: u64,
    /// Flush attempts that failed since start (each is retried with backoff).
    #[serde(default)]
    pub flush_failures_total: u64,
    /// Flushes that are running, or failed and wait for a retry.
    #[serde(default)]
    pub flushes: Vec<FlushStatus>,
}

/// Why a control request failed. Each variant says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ControlError {
    /// The path is malformed.
    #[error(transparent)]
    BadPath(#[from] PathError),
    /// Nothing lives at the path.
    #[error("no such path '{0}'; create it with open or alloc first")]
    NotFound(PoolPath),
    /// Not enough free blocks on live memory nodes.
    #[error("out of pool memory: {requested} bytes requested, {free} bytes free on live memory nodes; free data or add memory nodes")]
    NoCapacity {
        /// Bytes requested (rounded to blocks).
        requested: u64,
        /// Bytes free.
        free: u64,
    },
    /// The allocation would exceed a quota on the path or one of its ancestors.
    #[error("quota exceeded on '{path}': {used} of {quota} bytes used, {requested} more requested; raise the quota or free data")]
    QuotaExceeded {
        /// Path holding the quota.
        path: PoolPath,
        /// The quota.
        quota: u64,
        /// Bytes in use under it.
        used: u64,
        /// Bytes requested.
        requested: u64,
    },
    /// The block is not owned by the path named.
    #[error(
        "block {block} is not owned by '{path}'; free blocks through the path that allocated them"
    )]
    NotOwner {
        /// The block.
        block: BlockId,
        /// The path named.
        path: PoolPath,
    },
    /// Named node does not exist or is dead.
    #[error("memory node {0} is unknown or dead; pick another node or use automatic placement")]
    NoSuchNode(u32),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: controller speaks {controller}, peer speaks {peer}; run the same farpool version everywhere")]
    VersionMismatch {
        /// Controller's version.
        controller: u32,
        /// Peer's version.
        peer: u32,
    },
    /// The registration was refused.
    #[error("memory node registration refused: {0}")]
    BadRegistration(String),
    /// The request was not valid in this state.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Every copy of the block was on memory nodes that died: the data is gone.
    #[error("data lost: block {block} of '{path}' was on a memory node that died and had no surviving replica; remove '{path}' and recreate the data from its source (allocate with 2 replicas to survive the loss of a memory node)")]
    DataLost {
        /// The owner path.
        path: PoolPath,
        /// The lost block (its first copy).
        block: BlockId,
    },
    /// Fewer live memory nodes with free blocks than copies asked for.
    #[error("{copies} copies per block need {copies} live memory nodes with free blocks, only {nodes} have; add memory nodes or ask for fewer copies")]
    NotEnoughNodes {
        /// Copies asked for.
        copies: u8,
        /// Live nodes with free blocks.
        nodes: u64,
    },
    /// Another client holds the fenced lock.
    #[error("the fenced lock on '{path}' is held by another client; retry in {retry_ms} ms (it expires then unless renewed)")]
    FenceHeld {
        /// The path locked.
        path: PoolPath,
        /// Milliseconds until it expires unless renewed.
        retry_ms: u64,
    },
    /// The fenced lock is no longer held under this token.
    #[error("the fenced lock on '{path}' under token {token} expired and was taken over or released; stop the work it guarded")]
    FenceLost {
        /// The path locked.
        path: PoolPath,
        /// The token that lost it.
        token: u64,
    },
    /// The peer did not authenticate (missing, malformed, forged or expired token;
    /// a memory node without the cluster key). The message says what to do.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// The client's token is for another job than the path names.
    #[error("forbidden: '{path}' is outside job '{job}'; a token for job '{job}' may act only under '/{job}' (use that job's token, or an admin token from `farpool token --admin`)")]
    Forbidden {
        /// The path named.
        path: PoolPath,
        /// The token's job.
        job: String,
    },
    /// The operation needs an admin token (setting quotas, renewing the root).
    #[error("forbidden: {0} needs an admin token (`farpool token --admin`)")]
    AdminOnly(String),
}

/// The identity a memory node proves at registration: its registration and process
/// incarnation, encoded, so a proof for one node cannot register another.
pub fn node_identity(register: &Register, incarnation: u64) -> Vec<u8> {
    let mut id = Vec::with_capacity(64 + register.data_addr.len());
    id.extend_from_slice(register.data_addr.as_bytes());
    id.push(0);
    id.extend_from_slice(&register.capacity.to_le_bytes());
    id.extend_from_slice(&register.block_size.to_le_bytes());
    id.extend_from_slice(&incarnation.to_le_bytes());
    id.push(register.transport as u8);
    id
}
