//! The transport trait: one API for one-sided operations on a remote region.

use crate::buf::LocalBuf;
use crate::error::{Error, TransportError};
use crate::op::{Op, RemoteAddr};

/// Which backend a transport is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// One-sided operations carried over TCP to the memory node's engine.
    Soft,
    /// Same-host shared mapping; operations are memcpy and CPU atomics. Trusted mode.
    Shm,
    /// RDMA verbs (RC queue pairs).
    Verbs,
}

impl TransportKind {
    /// Short lowercase name (`soft`, `shm`, `verbs`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Soft => "soft",
            Self::Shm => "shm",
            Self::Verbs => "verbs",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "soft" => Ok(Self::Soft),
            "shm" => Ok(Self::Shm),
            "verbs" => Ok(Self::Verbs),
            other => Err(format!(
                "unknown transport '{other}'; expected soft, shm or verbs"
            )),
        }
    }
}

/// A connection to one memory node's region, able to run one-sided operations.
///
/// Implementations are `Send + Sync`: several threads may issue batches on the same
/// transport; each batch runs as a unit (all of its operations are outstanding together,
/// as with one doorbell on an RDMA queue pair).
///
/// Semantics promised by every backend, and no more (the same as RDMA RC):
/// - 8-byte aligned CAS and FAA are atomic with respect to each other.
/// - READ and WRITE larger than 8 bytes are not atomic; a concurrent WRITE may be seen torn.
/// - Operations of one batch may complete in any order.
pub trait Transport: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> TransportKind;

    /// Runs every operation in `ops` and sets each one's status.
    ///
    /// Returns `Ok(())` when all succeeded, [`Error::Partial`] when some failed (their
    /// [`Op::status`] tells which), and [`Error::Transport`] when the connection failed
    /// (operations without a status are then marked [`crate::OpError::Aborted`]).
    fn execute(&self, ops: &mut [Op<'_>]) -> Result<(), Error>;

    /// Largest READ or WRITE accepted in one operation.
    fn max_op_bytes(&self) -> usize;

    /// A local buffer suitable for zero-copy operations on this transport (registered
    /// memory on RDMA). Any `&mut [u8]` works as an operation buffer; buffers from here
    /// avoid a bounce copy on backends that need registration.
    fn alloc_buf(&self, len: usize) -> Result<LocalBuf, TransportError> {
        Ok(LocalBuf::new(len))
    }

    /// READ `buf.len()` bytes at `remote`.
    fn read(&self, remote: RemoteAddr, buf: &mut [u8]) -> Result<(), Error> {
        let mut ops = [Op::read(remote, buf)];
        self.execute(&mut ops).map_err(single)
    }

    /// WRITE `data` at `remote`.
    fn write(&self, remote: RemoteAddr, data: &[u8]) -> Result<(), Error> {
        let mut ops = [Op::write(remote, data)];
        self.execute(&mut ops).map_err(single)
    }

    /// Compare-and-swap the u64 at `remote`; returns the value found there.
    fn compare_swap(&self, remote: RemoteAddr, expected: u64, new: u64) -> Result<u64, Error> {
        let mut ops = [Op::compare_swap(remote, expected, new)];
        self.execute(&mut ops).map_err(single)?;
        Ok(ops[0].result)
    }

    /// Fetch-and-add on the u64 at `remote`; returns the previous value.
    fn fetch_add(&self, remote: RemoteAddr, add: u64) -> Result<u64, Error> {
        let mut ops = [Op::fetch_add(remote, add)];
        self.execute(&mut ops).map_err(single)?;
        Ok(ops[0].result)
    }
}

/// Turns a one-operation batch's `Partial` into the operation's own error.
fn single(e: Error) -> Error {
    match e {
        Error::Partial { error, .. } => Error::Op(error),
        other => other,
    }
}
