//! Typed errors of the transport layer.
//!
//! Two levels, as on an RDMA NIC: an [`OpError`] is the completion status of one
//! operation (the connection stays usable), a [`TransportError`] means the connection
//! itself failed (every operation still in flight on it completes with
//! [`OpError::Aborted`]).

use std::io;

/// Why one one-sided operation failed. The connection stays usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The operation touches bytes outside the region or outside the granted block.
    #[error("address range {addr:#x}+{len} is outside the granted range {start:#x}..{end:#x}; check the offset and length against the block handle")]
    OutOfBounds {
        /// First byte the operation named.
        addr: u64,
        /// Length the operation named.
        len: u64,
        /// Start of the range the operation may touch.
        start: u64,
        /// End (exclusive) of the range the operation may touch.
        end: u64,
    },
    /// An atomic (CAS/FAA) at an address that is not 8-byte aligned.
    #[error("atomic operation at {addr:#x} is not 8-byte aligned; atomics need 8-byte aligned addresses")]
    Misaligned {
        /// The misaligned address.
        addr: u64,
    },
    /// The remote key does not match any grant for this block (wrong or guessed key).
    #[error("access denied: the remote key does not match the grant for this block; ask the controller for a fresh grant")]
    AccessDenied,
    /// The grant names an older epoch of the block: the block was freed (and possibly
    /// handed to another task) since the grant was issued.
    #[error("stale grant: block epoch is {current}, grant names epoch {granted}; the block was freed, re-open the object")]
    StaleEpoch {
        /// Epoch named by the operation.
        granted: u32,
        /// Epoch the memory node holds now.
        current: u32,
    },
    /// The grant's lifetime ended (soft transport with capabilities): the MAC may be
    /// valid, but the memory node no longer honours it.
    #[error("grant expired at {expiry} (memory node clock {now}, seconds since the Unix epoch); fetch a fresh grant from the controller (lookup) and retry")]
    GrantExpired {
        /// Expiry the grant carried.
        expiry: u32,
        /// The memory node's clock when it refused the operation.
        now: u32,
    },
    /// A write or atomic under a read-only grant.
    #[error("write under a read-only grant; open the block with write access")]
    ReadOnly,
    /// The operation is larger than the transport accepts in one piece.
    #[error("operation of {len} bytes exceeds the maximum of {max} bytes per operation; split it")]
    TooLarge {
        /// Requested length.
        len: u64,
        /// Largest length accepted.
        max: u64,
    },
    /// The remote side did not recognise the operation code.
    #[error("unknown operation code {0}; the memory node speaks a different protocol version")]
    UnknownOp(u8),
    /// The connection failed before this operation completed; its effect is unknown.
    #[error(
        "aborted: the connection failed before the operation completed; its effect is unknown"
    )]
    Aborted,
    /// The operation was not executed because the batch was rejected as a whole.
    #[error("not executed: {0}")]
    NotExecuted(String),
    /// The RDMA device completed the operation with an error status other than a remote
    /// access error (which is [`OpError::AccessDenied`]); the queue pair was re-created.
    #[error("the RDMA device failed the operation: {0}")]
    Device(String),
}

/// Why a connection (or its setup) failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Could not connect to the remote endpoint.
    #[error("cannot connect to memory node at {addr}: {source}; is the memory node running and reachable?")]
    Connect {
        /// The address that was dialled.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An I/O error on an established connection.
    #[error("transport I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("connection closed by the memory node")]
    Closed,
    /// The peer sent something that violates the wire protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A region could not be created, mapped or opened.
    #[error("region error: {0}")]
    Region(String),
    /// The RDMA verbs backend could not find, open or use a device, or set up a queue pair.
    #[error(transparent)]
    Verbs(#[from] VerbsError),
}

/// Why the RDMA verbs backend could not be set up or used. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// This binary was built without the `verbs` cargo feature.
    #[error("this build has no RDMA verbs support; rebuild with `--features verbs` (after scripts/setup-rdma.sh) or use --transport soft")]
    NotBuilt,
    /// libibverbs found no RDMA device at all.
    #[error("no RDMA device found (libibverbs lists none); load a driver (for Soft-RoCE: `modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0`), check `ibv_devices`, or use --transport soft")]
    NoDevice,
    /// The requested device name is not in the device list.
    #[error("RDMA device '{name}' not found; available: {available}; pick one with --rdma-device")]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// The devices that exist, comma-separated.
        available: String,
    },
    /// The port is not ACTIVE.
    #[error("port {port} of RDMA device '{device}' is {state}, not ACTIVE; bring the link up (`ip link set <netdev> up`, check `ibv_devinfo`) or choose another device")]
    PortDown {
        /// Device name.
        device: String,
        /// Port number (1-based).
        port: u8,
        /// Its state as reported by the device.
        state: String,
    },
    /// No usable GID at the requested (or any) index.
    #[error("RDMA device '{device}' port {port} has no usable GID{detail}; assign an IP address to its network interface or pass --gid-index (see `show_gids` or `ibv_devinfo -v`)")]
    NoGid {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// Extra detail (which index was asked for).
        detail: String,
    },
    /// A verbs call failed.
    #[error("RDMA {what} failed: {source}{hint}")]
    Call {
        /// What was being done.
        what: &'static str,
        /// The error libibverbs reported.
        #[source]
        source: io::Error,
        /// What to check (may be empty).
        hint: &'static str,
    },
    /// The queue-pair connection handshake over TCP failed or the peer sent nonsense.
    #[error("RDMA connection handshake with {peer} failed: {detail}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// What went wrong.
        detail: String,
    },
    /// Completions did not arrive in time: the peer or the fabric is gone.
    #[error("no RDMA completion within {waited:?} for a window of {window} operations (batch indices {first}..={last}, {completions} completions seen); the memory node or the path to it is gone; the queue pair will be re-created on the next call")]
    Timeout {
        /// How long the transport waited.
        waited: std::time::Duration,
        /// Operations in the window that did not complete.
        window: usize,
        /// Batch index of the window's first operation.
        first: usize,
        /// Batch index of its last (signaled) operation.
        last: usize,
        /// Successful completions polled meanwhile (normally 0: only the last is signaled).
        completions: usize,
    },
    /// The queue pair failed as a whole (an error completion for the connection).
    #[error("RDMA queue pair failed: {0}; it will be re-created on the next call")]
    QueuePair(String),
}

/// The result of executing a batch (or a single operation).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One operation failed (single-operation helpers).
    #[error(transparent)]
    Op(#[from] OpError),
    /// The connection failed; operations without a status completed as [`OpError::Aborted`].
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Some operations of a batch failed; the others completed. Each operation's
    /// [`crate::Op::status`] says which.
    #[error("{failed} of {total} operations in the batch failed; first failure at index {index}: {error}")]
    Partial {
        /// Number of failed operations.
        failed: usize,
        /// Number of operations in the batch.
        total: usize,
        /// Index of the first failed operation.
        index: usize,
        /// Its error.
        error: OpError,
    },
}
