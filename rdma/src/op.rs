//! One-sided operations and their remote addresses.

use crate::error::OpError;

/// Remote key of a grant: which block epoch and which secret key the operation presents.
///
/// On the soft and shm transports the memory node checks `key` against the key it derived
/// for the block's current `epoch`; on verbs `key` carries the memory-window rkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RKey {
    /// The secret key (never 0 for a valid grant).
    pub key: u64,
    /// The block epoch the grant was issued for.
    pub epoch: u32,
    /// When the grant expires, in seconds since the Unix epoch (0: never). A soft-transport
    /// memory node that verifies capabilities checks `key` as a MAC over this value too,
    /// so it cannot be extended by the holder. Other transports ignore it.
    pub expiry: u32,
}

/// Address of a one-sided operation on a memory node's region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteAddr {
    /// Byte offset inside the memory node's region.
    pub addr: u64,
    /// Key presented for the access check.
    pub rkey: RKey,
}

impl RemoteAddr {
    /// A remote address `addr` accessed under `rkey`.
    pub fn new(addr: u64, rkey: RKey) -> Self {
        Self { addr, rkey }
    }

    /// The same key, `delta` bytes further on.
    pub fn offset(self, delta: u64) -> Self {
        Self {
            addr: self.addr + delta,
            rkey: self.rkey,
        }
    }
}

/// What an operation does.
#[derive(Debug)]
pub enum OpKind<'a> {
    /// Copy `buf.len()` remote bytes into `buf`.
    Read(&'a mut [u8]),
    /// Copy `data` to the remote address.
    Write(&'a [u8]),
    /// Atomically replace the remote u64 with `new` if it equals `expected`.
    /// [`Op::result`] receives the value found.
    CompareSwap {
        /// Value the remote word must hold.
        expected: u64,
        /// Value to store when it does.
        new: u64,
    },
    /// Atomically add `add` (wrapping) to the remote u64. [`Op::result`] receives the old value.
    FetchAdd {
        /// Amount to add.
        add: u64,
    },
}

/// Operation code, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// READ.
    Read = 1,
    /// WRITE.
    Write = 2,
    /// Compare-and-swap on a u64.
    CompareSwap = 3,
    /// Fetch-and-add on a u64.
    FetchAdd = 4,
}

impl OpCode {
    /// Decodes a wire operation code.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Read),
            2 => Some(Self::Write),
            3 => Some(Self::CompareSwap),
            4 => Some(Self::FetchAdd),
            _ => None,
        }
    }

    /// Whether the operation modifies remote memory.
    pub fn is_write(self) -> bool {
        !matches!(self, Self::Read)
    }
}

/// Completion state of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OpStatus {
    /// Not completed yet.
    #[default]
    Pending,
    /// Completed successfully.
    Done,
    /// Completed with an error.
    Failed(OpError),
}

/// One one-sided operation: what, where, and (after execution) its outcome.
#[derive(Debug)]
pub struct Op<'a> {
    /// What the operation does.
    pub kind: OpKind<'a>,
    /// Where it does it.
    pub remote: RemoteAddr,
    /// For atomics: the value the remote word held before the operation.
    pub result: u64,
    /// Completion state, set by the transport.
    pub status: OpStatus,
}

impl<'a> Op<'a> {
    /// READ `buf.len()` bytes from `remote` into `buf`.
    pub fn read(remote: RemoteAddr, buf: &'a mut [u8]) -> Self {
        Self::new(OpKind::Read(buf), remote)
    }

    /// WRITE `data` to `remote`.
    pub fn write(remote: RemoteAddr, data: &'a [u8]) -> Self {
        Self::new(OpKind::Write(data), remote)
    }

    /// Compare-and-swap the u64 at `remote`.
    pub fn compare_swap(remote: RemoteAddr, expected: u64, new: u64) -> Self {
        Self::new(OpKind::CompareSwap { expected, new }, remote)
    }

    /// Fetch-and-add to the u64 at `remote`.
    pub fn fetch_add(remote: RemoteAddr, add: u64) -> Self {
        Self::new(OpKind::FetchAdd { add }, remote)
    }

    fn new(kind: OpKind<'a>, remote: RemoteAddr) -> Self {
        Self {
            kind,
            remote,
            result: 0,
            status: OpStatus::Pending,
        }
    }

    /// The wire operation code.
    pub fn code(&self) -> OpCode {
        match self.kind {
            OpKind::Read(_) => OpCode::Read,
            OpKind::Write(_) => OpCode::Write,
            OpKind::CompareSwap { .. } => OpCode::CompareSwap,
            OpKind::FetchAdd { .. } => OpCode::FetchAdd,
        }
    }

    /// Bytes the operation touches remotely.
    pub fn remote_len(&self) -> u64 {
        match &self.kind {
            OpKind::Read(b) => b.len() as u64,
            OpKind::Write(d) => d.len() as u64,
            OpKind::CompareSwap { .. } | OpKind::FetchAdd { .. } => 8,
        }
    }

    /// The outcome: `Ok(result)` (the old value for atomics, 0 otherwise) or the error.
    /// A still-pending operation reports [`OpError::Aborted`].
    pub fn outcome(&self) -> Result<u64, OpError> {
        match &self.status {
            OpStatus::Done => Ok(self.result),
            OpStatus::Failed(e) => Err(e.clone()),
            OpStatus::Pending => Err(OpError::Aborted),
        }
    }
}

/// Sets the outcome of every operation in `ops` and summarises the batch.
///
/// Operations still [`OpStatus::Pending`] are marked [`OpError::Aborted`]. Returns
/// [`crate::Error::Partial`] when at least one failed.
pub fn finish_batch(ops: &mut [Op<'_>]) -> Result<(), crate::Error> {
    let total = ops.len();
    let mut failed = 0;
    let mut first: Option<(usize, OpError)> = None;
    for (i, op) in ops.iter_mut().enumerate() {
        if op.status == OpStatus::Pending {
            op.status = OpStatus::Failed(OpError::Aborted);
        }
        if let OpStatus::Failed(e) = &op.status {
            failed += 1;
            if first.is_none() {
                first = Some((i, e.clone()));
            }
        }
    }
    match first {
        None => Ok(()),
        Some((index, error)) => Err(crate::Error::Partial {
            failed,
            total,
            index,
            error,
        }),
    }
}
