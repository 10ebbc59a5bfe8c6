//! Replicated block handles: which copies a handle writes and reads, refreshing that
//! set from the controller when a copy fails, and the operations themselves.
//!
//! - WRITE goes to every copy, the primary (first live copy) first, and completes
//!   once all of them acknowledged it.
//! - READ goes to the primary; on a connection error the handle refreshes its grant
//!   (the controller then names another live copy as primary) and reads there.
//! - CAS and FAA execute on the primary only (so they are linearizable while it
//!   lives); the resulting word is then mirrored to the other copies by reading it
//!   back from the primary, writing it to the others and re-reading the primary until
//!   it did not change in between. See docs/OPERATIONS.md ("Replication") for what this
//!   does and does not guarantee when the primary dies.

use super::{Client, ClientError, ClientInner};
use crate::proto::{BlockGrant, BlockId, PoolPath, Request, Response};
use farpool_rdma::{Op, OpError, OpKind, OpStatus, Transport};
use parking_lot::RwLock;
use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How long a handle waits for the controller to replace a failed copy.
const FAILOVER_WAIT: Duration = Duration::from_secs(15);
/// Pause between refreshes while waiting for the controller.
const FAILOVER_POLL: Duration = Duration::from_millis(50);
/// Mirror rounds of an atomic word before giving up (each round is one read, one
/// write per copy and one read).
const MAX_MIRROR_ROUNDS: usize = 100_000;

/// One copy of a replicated block.
pub(crate) struct Copy {
    pub grant: BlockGrant,
    pub transport: Arc<dyn Transport>,
}

/// The copies a handle currently uses; `copies[0]` is the primary.
pub(crate) struct View {
    pub copies: Vec<Copy>,
    /// Copies wanted.
    pub wanted: u8,
}

impl View {
    fn primary(&self) -> &Copy {
        &self.copies[0]
    }

    /// Fewer copies than wanted and none being filled: the controller may add one at
    /// any moment, so writers refresh before each write.
    fn degraded(&self) -> bool {
        self.copies.len() < usize::from(self.wanted)
    }

    /// Whether a copy's grant (soft capabilities expire) runs out within a second:
    /// such a view is refreshed before use, so mirroring never meets an expired grant.
    fn expiring(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.copies
            .iter()
            .any(|c| c.grant.expiry != 0 && u64::from(c.grant.expiry) <= now + 1)
    }
}

/// Whether `op` was refused because its grant expired (the node did not apply it).
fn expired(op: &Op<'_>) -> bool {
    matches!(op.status, OpStatus::Failed(OpError::GrantExpired { .. }))
}

/// What a handle needs to ask the controller about its block.
pub(crate) struct HandleCtx {
    client: Weak<ClientInner>,
    path: PoolPath,
    block: BlockId,
    group: u64,
    writable: bool,
    view: RwLock<Option<Arc<View>>>,
}

impl HandleCtx {
    /// Context for a handle of `grant` (owned by `path`), with its copies connected.
    pub(crate) fn new(
        client: &Client,
        path: &PoolPath,
        grant: &BlockGrant,
        primary: &Arc<dyn Transport>,
    ) -> Result<Self, ClientError> {
        let view = match &grant.replication {
            Some(_) => Some(Arc::new(view_of(client, grant, Some(primary.clone()))?)),
            None => None,
        };
        Ok(Self {
            client: Arc::downgrade(&client.inner),
            path: path.clone(),
            block: grant.block,
            group: grant.replication.as_ref().map_or(0, |r| r.group),
            writable: grant.writable,
            view: RwLock::new(view),
        })
    }

    /// Whether the block is replicated.
    pub(crate) fn replicated(&self) -> bool {
        self.group != 0
    }

    fn client(&self) -> Option<Client> {
        self.client
            .upgrade()
            .map(|inner| Client { inner, copies: 1 })
    }

    fn view(&self) -> Option<Arc<View>> {
        self.view.read().clone()
    }

    /// Asks the controller for the block's current grant; fails with
    /// `DataLost` when no copy survives.
    fn refresh(&self) -> Result<Arc<View>, ClientError> {
        let client = self.client().ok_or_else(|| {
            ClientError::Protocol("the client of this block handle is gone".into())
        })?;
        let resp = client.request(Request::Refresh {
            path: self.path.clone(),
            group: self.group,
            block: self.block,
            writable: self.writable,
        })?;
        let grant = match resp {
            Response::Blocks(mut g) if g.len() == 1 => g.remove(0),
            other => return Err(ClientError::unexpected(&other)),
        };
        let view = Arc::new(view_of(&client, &grant, None)?);
        if self.replicated() {
            *self.view.write() = Some(view.clone());
        }
        Ok(view)
    }

    /// After a connection error on an unreplicated block: the typed `DataLost` error
    /// if the controller says its node is dead, else `err` itself.
    pub(crate) fn lost_or(&self, err: ClientError) -> ClientError {
        if !is_connection(&err) {
            return err;
        }
        match self.refresh() {
            Err(lost @ ClientError::Control(crate::proto::ControlError::DataLost { .. })) => lost,
            _ => err,
        }
    }

    /// Refreshes until copy `failed` is no longer part of the grant (the controller
    /// declared its node dead), for at most [`FAILOVER_WAIT`].
    fn refresh_without(&self, failed: BlockId, err: ClientError) -> Result<Arc<View>, ClientError> {
        let deadline = Instant::now() + FAILOVER_WAIT;
        loop {
            let view = self.refresh()?;
            if view.copies.iter().all(|c| c.grant.block != failed) {
                return Ok(view);
            }
            if Instant::now() >= deadline {
                return Err(err);
            }
            std::thread::sleep(FAILOVER_POLL);
        }
    }

    /// Runs `ops` (built against `orig`, the grant the handle was made with) on the
    /// replicated block: see the module docs.
    pub(crate) fn execute(&self, orig: &BlockGrant, ops: &mut [Op<'_>]) -> Result<(), ClientError> {
        let rel: Vec<u64> = ops.iter().map(|o| o.remote.addr - orig.offset).collect();
        let mutates = ops.iter().any(|o| !matches!(o.kind, OpKind::Read(_)));
        let mut view = match self.view() {
            Some(v) if !(v.expiring() || mutates && v.degraded()) => v,
            _ => self.refresh()?,
        };
        let mut failovers = 0;
        let outcome = loop {
            let p = view.primary();
            for (o, &r) in ops.iter_mut().zip(&rel) {
                o.remote = p.grant.remote(r);
                o.status = OpStatus::Pending;
            }
            match p.transport.execute(ops) {
                Err(e) if is_connection_rdma(&e) && failovers < 3 => {
                    failovers += 1;
                    let failed = p.grant.block;
                    view = self.refresh_without(failed, e.into())?;
                }
                Err(_) if ops.iter().any(expired) => {
                    // Clocks disagreed with the early refresh: re-run only the refused
                    // operations (not applied) under a fresh grant.
                    view = self.refresh()?;
                    let p = view.primary();
                    for (o, &r) in ops.iter_mut().zip(&rel) {
                        if expired(o) {
                            o.remote = p.grant.remote(r);
                            o.status = OpStatus::Pending;
                            // The outcome is in the op's status, summarised below.
                            let _ = p.transport.execute(std::slice::from_mut(o));
                        }
                    }
                    break farpool_rdma::finish_batch(ops);
                }
                r => break r,
            }
        };
        let mirrored = if mutates {
            self.mirror(view, ops, &rel)
        } else {
            Ok(())
        };
        for (o, &r) in ops.iter_mut().zip(&rel) {
            o.remote = orig.remote(r);
        }
        outcome?;
        mirrored
    }

    /// Mirrors the completed WRITEs and atomics of `ops` from the primary of `view`
    /// to the other copies.
    fn mirror(&self, mut view: Arc<View>, ops: &[Op<'_>], rel: &[u64]) -> Result<(), ClientError> {
        let primary = view.primary().grant.block;
        let writes: Vec<(u64, &[u8])> = ops
            .iter()
            .zip(rel)
            .filter(|(o, _)| o.status == OpStatus::Done)
            .filter_map(|(o, &r)| match o.kind {
                OpKind::Write(d) => Some((r, d)),
                _ => None,
            })
            .collect();
        let mut words: Vec<u64> = ops
            .iter()
            .zip(rel)
            .filter(|(o, _)| o.status == OpStatus::Done)
            .filter(|(o, _)| !matches!(o.kind, OpKind::Read(_) | OpKind::Write(_)))
            .map(|(_, &r)| r)
            .collect();
        words.sort_unstable();
        words.dedup();
        if !writes.is_empty() {
            let mut done: HashSet<BlockId> = HashSet::from([primary]);
            'copies: loop {
                for c in &view.copies {
                    if done.contains(&c.grant.block) {
                        continue;
                    }
                    let mut wops: Vec<Op<'_>> = writes
                        .iter()
                        .map(|&(r, d)| Op::write(c.grant.remote(r), d))
                        .collect();
                    match c.transport.execute(&mut wops) {
                        Ok(()) => {
                            done.insert(c.grant.block);
                        }
                        Err(e) if is_connection_rdma(&e) => {
                            let failed = c.grant.block;
                            view = self.refresh_without(failed, e.into())?;
                            continue 'copies;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                break;
            }
        }
        if !words.is_empty() {
            self.mirror_words(view, primary, &words)?;
        }
        Ok(())
    }

    /// Copies atomic words from the primary to the other copies until a re-read of
    /// the primary shows each word unchanged since it was copied.
    fn mirror_words(
        &self,
        mut view: Arc<View>,
        primary: BlockId,
        words: &[u64],
    ) -> Result<(), ClientError> {
        let mut left: Vec<u64> = words.to_vec();
        let mut vals = vec![[0u8; 8]; left.len()];
        let mut again = vec![[0u8; 8]; left.len()];
        for _ in 0..MAX_MIRROR_ROUNDS {
            if view.primary().grant.block != primary {
                // The primary that ran the atomic died before its result reached the
                // other copies: the operation may be lost.
                return Err(ClientError::Protocol(format!(
                    "the primary copy {primary} failed before an atomic's result was replicated; the atomic may not have taken effect, read the word and retry"
                )));
            }
            read_words(view.primary(), &left, &mut vals)?;
            let mut wrote_all = true;
            for c in &view.copies[1..] {
                let mut wops: Vec<Op<'_>> = left
                    .iter()
                    .zip(&vals)
                    .map(|(&r, v)| Op::write(c.grant.remote(r), v))
                    .collect();
                if let Err(e) = c.transport.execute(&mut wops) {
                    if !is_connection_rdma(&e) {
                        return Err(e.into());
                    }
                    let failed = c.grant.block;
                    view = self.refresh_without(failed, e.into())?;
                    wrote_all = false;
                    break;
                }
            }
            if !wrote_all {
                continue;
            }
            read_words(view.primary(), &left, &mut again)?;
            let mut keep = Vec::new();
            let mut keep_vals = Vec::new();
            for ((&r, v), a) in left.iter().zip(&vals).zip(&again) {
                if v != a {
                    keep.push(r);
                    keep_vals.push(*a);
                }
            }
            if keep.is_empty() {
                return Ok(());
            }
            left = keep;
            vals = keep_vals;
            again = vec![[0u8; 8]; left.len()];
        }
        Err(ClientError::Protocol(format!(
            "atomic words of block {primary} kept changing through {MAX_MIRROR_ROUNDS} mirror rounds"
        )))
    }
}

/// Reads the 8-byte words at `offsets` of copy `c` into `out`.
fn read_words(c: &Copy, offsets: &[u64], out: &mut [[u8; 8]]) -> Result<(), ClientError> {
    let mut ops: Vec<Op<'_>> = offsets
        .iter()
        .zip(out.iter_mut())
        .map(|(&r, buf)| Op::read(c.grant.remote(r), buf))
        .collect();
    c.transport.execute(&mut ops)?;
    Ok(())
}

/// The copies named by `grant` (primary first), connected.
fn view_of(
    client: &Client,
    grant: &BlockGrant,
    primary: Option<Arc<dyn Transport>>,
) -> Result<View, ClientError> {
    let data = &client.inner.data;
    let primary = match primary {
        Some(t) => t,
        None => data.transport(&grant.endpoint)?,
    };
    let mut base = grant.clone();
    let repl = base.replication.take();
    let mut copies = vec![Copy {
        grant: base,
        transport: primary,
    }];
    let mut wanted = 1;
    if let Some(r) = repl {
        wanted = r.copies;
        // Copies being filled by re-replication (not in sync) are written like the
        // others; reads only ever go to the primary, which is always in sync.
        for (g, _in_sync) in r.others {
            // A copy whose node cannot be reached now is skipped: the controller
            // replaces it once it declares the node dead.
            match data.transport(&g.endpoint) {
                Ok(t) => copies.push(Copy {
                    grant: g,
                    transport: t,
                }),
                Err(e) => tracing::debug!(block = %g.block, "copy unreachable: {e}"),
            }
        }
    }
    Ok(View { copies, wanted })
}

/// Whether `e` is a broken connection (the node may be dead), not a refused op.
pub(crate) fn is_connection(e: &ClientError) -> bool {
    match e {
        ClientError::Transport(e) => is_connection_rdma(e),
        ClientError::Node { .. } => true,
        _ => false,
    }
}

fn is_connection_rdma(e: &farpool_rdma::Error) -> bool {
    matches!(e, farpool_rdma::Error::Transport(_))
}
