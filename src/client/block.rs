//! Block handles: one-sided operations on one granted block.

use super::replica::HandleCtx;
use super::ClientError;
use crate::proto::{BlockGrant, BlockId};
use farpool_rdma::{Op, Transport};
use std::sync::Arc;

/// One connection's share of [`BlockHandle::execute_many`]: operations
/// `start..end` and how their batch went.
pub type BatchRun = (usize, usize, Result<(), ClientError>);

/// A granted block: where it lives, its epoch and key, and the connection to its
/// memory node. Offsets are relative to the block start; every access is checked
/// against the block length here and again by the memory node.
///
/// A replicated block (allocated with several copies) writes every copy and reads
/// one, failing over to another copy when a memory node is lost (see
/// docs/OPERATIONS.md, "Replication"). Operations are always built against the grant
/// the handle was made with; the handle maps them onto the copies. An operation on an
/// unreplicated block whose memory node died fails with
/// [`crate::proto::ControlError::DataLost`].
#[derive(Clone)]
pub struct BlockHandle {
    grant: Arc<BlockGrant>,
    transport: Arc<dyn Transport>,
    ctx: Option<Arc<HandleCtx>>,
}

impl BlockHandle {
    pub(crate) fn new(grant: BlockGrant, transport: Arc<dyn Transport>) -> Self {
        Self {
            grant: Arc::new(grant),
            transport,
            ctx: None,
        }
    }

    pub(crate) fn with_ctx(
        grant: BlockGrant,
        transport: Arc<dyn Transport>,
        ctx: HandleCtx,
    ) -> Self {
        Self {
            grant: Arc::new(grant),
            transport,
            ctx: Some(Arc::new(ctx)),
        }
    }

    /// Whether the block has several copies.
    pub fn replicated(&self) -> bool {
        self.repl().is_some()
    }

    fn repl(&self) -> Option<&HandleCtx> {
        self.ctx.as_deref().filter(|c| c.replicated())
    }

    /// Maps a data-plane failure of an unreplicated block to `DataLost` when its
    /// memory node is dead.
    fn fail(&self, e: impl Into<ClientError>) -> ClientError {
        let e = e.into();
        match &self.ctx {
            Some(c) => c.lost_or(e),
            None => e,
        }
    }

    /// Block length in bytes.
    pub fn len(&self) -> u64 {
        self.grant.len
    }

    /// Whether the block has zero length (never, for granted blocks).
    pub fn is_empty(&self) -> bool {
        self.grant.len == 0
    }

    /// The block's identity. For a replicated block this is its first copy at
    /// allocation, which stays its name (in frees, in ids stored in the pool) after
    /// that copy was lost and replaced; [`BlockHandle::grant`] names the copy the
    /// grant was issued for.
    pub fn id(&self) -> BlockId {
        match &self.grant.replication {
            Some(r) => r.origin,
            None => self.grant.block,
        }
    }

    /// The grant behind this handle.
    pub fn grant(&self) -> &BlockGrant {
        &self.grant
    }

    /// Whether writes and atomics are allowed.
    pub fn writable(&self) -> bool {
        self.grant.writable
    }

    /// The transport to the block's memory node.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.grant.len => Ok(()),
            _ => Err(ClientError::OutOfBounds {
                offset,
                len,
                block_len: self.grant.len,
            }),
        }
    }

    fn check_atomic(&self, offset: u64) -> Result<(), ClientError> {
        self.check(offset, 8)?;
        if offset % 8 != 0 {
            return Err(ClientError::Misaligned(offset));
        }
        Ok(())
    }

    /// A READ of `buf.len()` bytes at `offset`, for [`BlockHandle::execute`].
    pub fn read_op<'a>(&self, offset: u64, buf: &'a mut [u8]) -> Result<Op<'a>, ClientError> {
        self.check(offset, buf.len() as u64)?;
        Ok(Op::read(self.grant.remote(offset), buf))
    }

    /// A WRITE of `data` at `offset`, for [`BlockHandle::execute`].
    pub fn write_op<'a>(&self, offset: u64, data: &'a [u8]) -> Result<Op<'a>, ClientError> {
        self.check(offset, data.len() as u64)?;
        Ok(Op::write(self.grant.remote(offset), data))
    }

    /// A compare-and-swap of the u64 at `offset`, for [`BlockHandle::execute`].
    pub fn cas_op(&self, offset: u64, expected: u64, new: u64) -> Result<Op<'static>, ClientError> {
        self.check_atomic(offset)?;
        Ok(Op::compare_swap(self.grant.remote(offset), expected, new))
    }

    /// A fetch-and-add on the u64 at `offset`, for [`BlockHandle::execute`].
    pub fn faa_op(&self, offset: u64, add: u64) -> Result<Op<'static>, ClientError> {
        self.check_atomic(offset)?;
        Ok(Op::fetch_add(self.grant.remote(offset), add))
    }

    /// Runs a batch of operations built with this handle's `*_op` methods with one
    /// round trip (all outstanding together). On failure each operation's status says
    /// whether it completed.
    pub fn execute(&self, ops: &mut [Op<'_>]) -> Result<(), ClientError> {
        let lo = self.grant.offset;
        let hi = lo + self.grant.len;
        for (index, op) in ops.iter().enumerate() {
            let in_block = op.remote.addr >= lo
                && op.remote.addr.saturating_add(op.remote_len()) <= hi
                && op.remote.rkey.key == self.grant.key;
            if !in_block {
                return Err(ClientError::ForeignOp { index });
            }
        }
        self.run(ops)
    }

    /// Runs validated operations: on every copy for a replicated block.
    fn run(&self, ops: &mut [Op<'_>]) -> Result<(), ClientError> {
        match self.repl() {
            Some(r) => r.execute(&self.grant, ops),
            None => self.transport.execute(ops).map_err(|e| self.fail(e)),
        }
    }

    /// Runs `ops[i]`, built with `handles[i]`'s `*_op` methods, with one batch per
    /// memory-node connection: operations on blocks that share a transport go out
    /// together (one round trip), connections are served one after the other. Returns
    /// one result per connection run, in order, as `(first op, end, outcome)`; each
    /// operation's status says whether it completed.
    pub fn execute_many(
        handles: &[&BlockHandle],
        ops: &mut [Op<'_>],
    ) -> Result<Vec<BatchRun>, ClientError> {
        if handles.len() != ops.len() {
            return Err(ClientError::ForeignOp {
                index: handles.len().min(ops.len()),
            });
        }
        for (index, (h, op)) in handles.iter().zip(ops.iter()).enumerate() {
            let lo = h.grant.offset;
            let in_block = op.remote.addr >= lo
                && op.remote.addr.saturating_add(op.remote_len()) <= lo + h.grant.len
                && op.remote.rkey.key == h.grant.key;
            if !in_block {
                return Err(ClientError::ForeignOp { index });
            }
        }
        let mut runs = Vec::new();
        let mut start = 0;
        while start < ops.len() {
            let h = handles[start];
            let t = &h.transport;
            // A replicated block runs alone (its operations fan out to its copies).
            let end = (start..ops.len())
                .find(|&i| {
                    if h.replicated() || handles[i].replicated() {
                        handles[i].grant.block != h.grant.block
                    } else {
                        !Arc::ptr_eq(&handles[i].transport, t)
                    }
                })
                .unwrap_or(ops.len());
            let outcome = if h.replicated() {
                h.run(&mut ops[start..end])
            } else {
                t.execute(&mut ops[start..end]).map_err(|e| h.fail(e))
            };
            runs.push((start, end, outcome));
            start = end;
        }
        Ok(runs)
    }

    /// A key that orders handles by their memory-node connection, for grouping
    /// operations before [`BlockHandle::execute_many`].
    pub fn transport_key(&self) -> usize {
        Arc::as_ptr(&self.transport) as *const () as usize
    }

    /// Reads `buf.len()` bytes at `offset`. Large reads are split into pieces the
    /// transport accepts and issued as one batch.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check(offset, buf.len() as u64)?;
        let max = self.transport.max_op_bytes().max(1);
        if buf.len() <= max && self.repl().is_none() {
            return self
                .transport
                .read(self.grant.remote(offset), buf)
                .map_err(|e| self.fail(e));
        }
        let mut ops: Vec<Op<'_>> = buf
            .chunks_mut(max)
            .enumerate()
            .map(|(i, c)| Op::read(self.grant.remote(offset + (i * max) as u64), c))
            .collect();
        self.run(&mut ops)
    }

    /// Writes `data` at `offset` (split like [`BlockHandle::read`]). Writes larger than
    /// 8 bytes are not atomic: a concurrent reader may see them torn.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.check(offset, data.len() as u64)?;
        let max = self.transport.max_op_bytes().max(1);
        if data.len() <= max && self.repl().is_none() {
            return self
                .transport
                .write(self.grant.remote(offset), data)
                .map_err(|e| self.fail(e));
        }
        let mut ops: Vec<Op<'_>> = data
            .chunks(max)
            .enumerate()
            .map(|(i, c)| Op::write(self.grant.remote(offset + (i * max) as u64), c))
            .collect();
        self.run(&mut ops)
    }

    /// Compare-and-swap on the u64 at `offset` (8-byte aligned); returns the value found.
    pub fn cas(&self, offset: u64, expected: u64, new: u64) -> Result<u64, ClientError> {
        self.check_atomic(offset)?;
        if self.repl().is_some() {
            let mut ops = [Op::compare_swap(self.grant.remote(offset), expected, new)];
            self.run(&mut ops)?;
            return Ok(ops[0].result);
        }
        self.transport
            .compare_swap(self.grant.remote(offset), expected, new)
            .map_err(|e| self.fail(e))
    }

    /// Fetch-and-add on the u64 at `offset` (8-byte aligned); returns the old value.
    pub fn faa(&self, offset: u64, add: u64) -> Result<u64, ClientError> {
        self.check_atomic(offset)?;
        if self.repl().is_some() {
            let mut ops = [Op::fetch_add(self.grant.remote(offset), add)];
            self.run(&mut ops)?;
            return Ok(ops[0].result);
        }
        self.transport
            .fetch_add(self.grant.remote(offset), add)
            .map_err(|e| self.fail(e))
    }
}

impl std::fmt::Debug for BlockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHandle")
            .field("block", &self.grant.block)
            .field("epoch", &self.grant.epoch)
            .field("len", &self.grant.len)
            .field("writable", &self.grant.writable)
            .finish()
    }
}
