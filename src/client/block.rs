//! Block handles: one-sided operations on one granted block.

use super::replica::HandleCtx;
use super::{Client, ClientError, ClientInner};
use crate::proto::{BlockGrant, BlockId, PoolPath, Request, Response};
use farpool_rdma::{Op, OpError, OpStatus, Transport};
use parking_lot::RwLock;
use std::sync::{Arc, Weak};

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
///
/// Grants on the soft transport expire ([`BlockGrant::expiry`]). When the memory node
/// answers [`OpError::GrantExpired`], the handle looks its owner path up again, takes
/// the fresh grant for the same block and epoch, and retries the refused operations
/// (which the node did not apply); clones share the refreshed grant. A block freed in
/// the meantime keeps failing with its original error.
#[derive(Clone)]
pub struct BlockHandle {
    grant: Arc<GrantSlot>,
    transport: Arc<dyn Transport>,
    ctx: Option<Arc<HandleCtx>>,
}

/// The current grant of a handle and where to get a fresh one.
struct GrantSlot {
    /// The first grant: its block, epoch, offset, length and rights never change (a
    /// refresh only replaces key and expiry), so reading them takes no lock.
    fixed: BlockGrant,
    current: RwLock<Arc<BlockGrant>>,
    source: Option<GrantSource>,
}

/// Where a handle's grant came from: the owner path, looked up again on expiry.
pub(crate) struct GrantSource {
    /// The client that asked (weak: handles do not keep a client alive).
    pub(crate) client: Weak<ClientInner>,
    /// The block's owner path.
    pub(crate) path: PoolPath,
}

/// Whether `op` was refused because its grant expired.
fn expired(op: &Op<'_>) -> bool {
    matches!(op.status, OpStatus::Failed(OpError::GrantExpired { .. }))
}

impl BlockHandle {
    pub(crate) fn new(
        grant: BlockGrant,
        transport: Arc<dyn Transport>,
        source: Option<GrantSource>,
    ) -> Self {
        Self {
            grant: Arc::new(GrantSlot {
                fixed: grant.clone(),
                current: RwLock::new(Arc::new(grant)),
                source,
            }),
            transport,
            ctx: None,
        }
    }

    pub(crate) fn with_ctx(
        grant: BlockGrant,
        transport: Arc<dyn Transport>,
        ctx: HandleCtx,
        source: Option<GrantSource>,
    ) -> Self {
        let mut h = Self::new(grant, transport, source);
        h.ctx = Some(Arc::new(ctx));
        h
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

    /// A fresh grant to replace the one whose key was `failed_key`: the current one if
    /// another thread already refreshed it, else one looked up from the owner path.
    /// `None` when there is no fresher grant (the block was freed, the client is gone,
    /// or the handle has no owner path).
    fn fresh_grant(&self, failed_key: u64) -> Result<Option<Arc<BlockGrant>>, ClientError> {
        let cur = self.grant.current.read().clone();
        if cur.key != failed_key {
            return Ok(Some(cur));
        }
        let Some(src) = &self.grant.source else {
            return Ok(None);
        };
        let Some(inner) = src.client.upgrade() else {
            return Ok(None);
        };
        let client = Client { inner, copies: 1 };
        let grants = match client.request(Request::Lookup {
            path: src.path.clone(),
            writable: cur.writable,
        })? {
            Response::Blocks(g) => g,
            other => return Err(ClientError::unexpected(&other)),
        };
        let Some(g) = grants
            .into_iter()
            .find(|g| g.block == cur.block && g.epoch == cur.epoch)
        else {
            return Ok(None);
        };
        let g = Arc::new(g);
        *self.grant.current.write() = g.clone();
        Ok(Some(g))
    }

    /// After a batch on this handle's transport: re-runs, one by one under a fresh
    /// grant, the operations refused as expired, then summarises the batch.
    fn retry_expired(&self, ops: &mut [Op<'_>]) -> Result<(), ClientError> {
        let mut fresh: Option<Arc<BlockGrant>> = None;
        for op in ops.iter_mut().filter(|op| expired(op)) {
            let g = match &fresh {
                Some(g) => g.clone(),
                None => match self.fresh_grant(op.remote.rkey.key)? {
                    Some(g) => fresh.insert(g).clone(),
                    None => break,
                },
            };
            op.remote.rkey = g.remote(0).rkey;
            op.status = OpStatus::Pending;
            // The batch result is in the op's status, summarised below.
            let _ = self.transport.execute(std::slice::from_mut(op));
        }
        farpool_rdma::finish_batch(ops)?;
        Ok(())
    }

    /// After a batch of operations built with `handles[i]`'s `*_op` methods and run on
    /// their transports directly: re-runs, each under a fresh grant from its own handle,
    /// the operations refused with [`OpError::GrantExpired`] (which the memory node did
    /// not apply), leaving the others as they are; then summarises the batch like
    /// [`farpool_rdma::finish_batch`].
    pub fn retry_expired_many(
        handles: &[&BlockHandle],
        ops: &mut [Op<'_>],
    ) -> Result<(), ClientError> {
        for (h, op) in handles.iter().zip(ops.iter_mut()) {
            if expired(op) {
                // The outcome is in the op's status, summarised below.
                let _ = h.retry_expired(std::slice::from_mut(op));
            }
        }
        farpool_rdma::finish_batch(ops)?;
        Ok(())
    }

    /// Runs one single-operation call, retrying it once under a fresh grant if it was
    /// refused as expired (the memory node did not apply it).
    fn once<T>(
        &self,
        mut f: impl FnMut(farpool_rdma::RemoteAddr) -> Result<T, farpool_rdma::Error>,
        offset: u64,
    ) -> Result<T, ClientError> {
        let remote = self.grant.current.read().remote(offset);
        match f(remote) {
            Err(farpool_rdma::Error::Op(OpError::GrantExpired { .. })) => {
                match self.fresh_grant(remote.rkey.key)? {
                    Some(g) => Ok(f(g.remote(offset))?),
                    None => Ok(f(remote)?),
                }
            }
            r => Ok(r?),
        }
    }

    /// The current grant's remote address of block byte `offset`.
    fn remote(&self, offset: u64) -> farpool_rdma::RemoteAddr {
        self.grant.current.read().remote(offset)
    }

    /// Whether `op` lies inside this block and names its epoch.
    fn owns(&self, op: &Op<'_>) -> bool {
        let g = &self.grant.fixed;
        op.remote.addr >= g.offset
            && op.remote.addr.saturating_add(op.remote_len()) <= g.offset + g.len
            && op.remote.rkey.epoch == g.epoch
    }

    /// Block length in bytes.
    pub fn len(&self) -> u64 {
        self.grant.fixed.len
    }

    /// Whether the block has zero length (never, for granted blocks).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block's identity. For a replicated block this is its first copy at
    /// allocation, which stays its name (in frees, in ids stored in the pool) after
    /// that copy was lost and replaced; [`BlockHandle::grant`] names the copy the
    /// grant was issued for.
    pub fn id(&self) -> BlockId {
        match &self.grant.fixed.replication {
            Some(r) => r.origin,
            None => self.grant.fixed.block,
        }
    }

    /// The grant behind this handle now (replaced when it expires and is refreshed).
    pub fn grant(&self) -> Arc<BlockGrant> {
        self.grant.current.read().clone()
    }

    /// Whether writes and atomics are allowed.
    pub fn writable(&self) -> bool {
        self.grant.fixed.writable
    }

    /// The transport to the block's memory node.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let block_len = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= block_len => Ok(()),
            _ => Err(ClientError::OutOfBounds {
                offset,
                len,
                block_len,
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
        Ok(Op::read(self.remote(offset), buf))
    }

    /// A WRITE of `data` at `offset`, for [`BlockHandle::execute`].
    pub fn write_op<'a>(&self, offset: u64, data: &'a [u8]) -> Result<Op<'a>, ClientError> {
        self.check(offset, data.len() as u64)?;
        Ok(Op::write(self.remote(offset), data))
    }

    /// A compare-and-swap of the u64 at `offset`, for [`BlockHandle::execute`].
    pub fn cas_op(&self, offset: u64, expected: u64, new: u64) -> Result<Op<'static>, ClientError> {
        self.check_atomic(offset)?;
        Ok(Op::compare_swap(self.remote(offset), expected, new))
    }

    /// A fetch-and-add on the u64 at `offset`, for [`BlockHandle::execute`].
    pub fn faa_op(&self, offset: u64, add: u64) -> Result<Op<'static>, ClientError> {
        self.check_atomic(offset)?;
        Ok(Op::fetch_add(self.remote(offset), add))
    }

    /// Runs a batch of operations built with this handle's `*_op` methods with one
    /// round trip (all outstanding together). On failure each operation's status says
    /// whether it completed.
    pub fn execute(&self, ops: &mut [Op<'_>]) -> Result<(), ClientError> {
        if let Some(index) = ops.iter().position(|op| !self.owns(op)) {
            return Err(ClientError::ForeignOp { index });
        }
        self.run(ops)
    }

    /// Runs validated operations: on every copy for a replicated block.
    fn run(&self, ops: &mut [Op<'_>]) -> Result<(), ClientError> {
        match self.repl() {
            Some(r) => r.execute(&self.grant.fixed, ops),
            None => match self.transport.execute(ops) {
                Ok(()) => Ok(()),
                Err(_) if ops.iter().any(expired) => self.retry_expired(ops),
                Err(e) => Err(self.fail(e)),
            },
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
            if !h.owns(op) {
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
                        handles[i].grant.fixed.block != h.grant.fixed.block
                    } else {
                        !Arc::ptr_eq(&handles[i].transport, t)
                    }
                })
                .unwrap_or(ops.len());
            let outcome = if h.replicated() {
                h.run(&mut ops[start..end])
            } else {
                match t.execute(&mut ops[start..end]) {
                    Ok(()) => Ok(()),
                    Err(_) if ops[start..end].iter().any(expired) => {
                        Self::retry_expired_many(&handles[start..end], &mut ops[start..end])
                    }
                    Err(e) => Err(h.fail(e)),
                }
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
                .once(|r| self.transport.read(r, buf), offset)
                .map_err(|e| self.fail(e));
        }
        let mut ops: Vec<Op<'_>> = buf
            .chunks_mut(max)
            .enumerate()
            .map(|(i, c)| Op::read(self.remote(offset + (i * max) as u64), c))
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
                .once(|r| self.transport.write(r, data), offset)
                .map_err(|e| self.fail(e));
        }
        let mut ops: Vec<Op<'_>> = data
            .chunks(max)
            .enumerate()
            .map(|(i, c)| Op::write(self.remote(offset + (i * max) as u64), c))
            .collect();
        self.run(&mut ops)
    }

    /// Compare-and-swap on the u64 at `offset` (8-byte aligned); returns the value found.
    pub fn cas(&self, offset: u64, expected: u64, new: u64) -> Result<u64, ClientError> {
        self.check_atomic(offset)?;
        if self.repl().is_some() {
            let mut ops = [Op::compare_swap(
                self.grant.fixed.remote(offset),
                expected,
                new,
            )];
            self.run(&mut ops)?;
            return Ok(ops[0].result);
        }
        self.once(|r| self.transport.compare_swap(r, expected, new), offset)
            .map_err(|e| self.fail(e))
    }

    /// Fetch-and-add on the u64 at `offset` (8-byte aligned); returns the old value.
    pub fn faa(&self, offset: u64, add: u64) -> Result<u64, ClientError> {
        self.check_atomic(offset)?;
        if self.repl().is_some() {
            let mut ops = [Op::fetch_add(self.grant.fixed.remote(offset), add)];
            self.run(&mut ops)?;
            return Ok(ops[0].result);
        }
        self.once(|r| self.transport.fetch_add(r, add), offset)
            .map_err(|e| self.fail(e))
    }
}

impl std::fmt::Debug for BlockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.grant.fixed;
        f.debug_struct("BlockHandle")
            .field("block", &g.block)
            .field("epoch", &g.epoch)
            .field("len", &g.len)
            .field("writable", &g.writable)
            .finish()
    }
}
