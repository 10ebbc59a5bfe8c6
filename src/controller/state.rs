//! The controller's state machine: registry, namespace, allocation, leases.
//!
//! Pure logic, no I/O: every operation takes the current time and returns its result
//! plus the [`Effect`]s the I/O layer must carry out (revocations to send to memory
//! nodes, node connections to close). This keeps the protocol testable without sockets.
//!
//! # Freeing and epochs
//! Freeing a block bumps its epoch and parks it in a *revoking* state; the memory node
//! is told the new epoch ([`Effect::Revoke`]) and the block returns to the free list
//! only when the node confirms exactly that epoch ([`ControllerState::revoked`]). A
//! block is therefore never handed to a new owner while a grant for an older epoch
//! could still be honoured by its node.

mod flush;

pub use flush::MAX_FLUSH_BACKOFF;

use super::fence::Fences;
use super::journal::{Record, SnapGroup, SnapPath, Snapshot};
use super::namespace::{later, Namespace, PathId, Reclaimed, ROOT};
use super::registry::{Registry, Released};
use super::replicas::ReplicaTable;
use crate::proto::{
    derive_key, Backing, BlockGrant, BlockId, ClusterStatus, ControlError, NodeStats, NodeStatus,
    PathError, Placement, PoolPath, Register, Request, Response, Secret, WireTransport,
};
use farpool_rdma::access::grant_mac;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

mod recovery;
mod replication;

/// Most blocks one allocation may ask for (keeps responses well inside a frame).
pub const MAX_BLOCKS_PER_ALLOC: u64 = 65_536;

/// Timing parameters of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateConfig {
    /// Lease period granted by open, alloc and renew.
    pub lease: Duration,
    /// How long past its effective deadline an expired path survives before reclaim.
    pub grace: Duration,
    /// A live node without a heartbeat for this long is declared dead.
    pub dead_after: Duration,
    /// Wait before retrying a failed flush of a mapped path; doubles with every
    /// further failure, up to [`MAX_FLUSH_BACKOFF`].
    pub flush_retry: Duration,
    /// Lifetime of a soft-transport grant (rounded up to whole seconds).
    pub grant_ttl: Duration,
}

/// The expiry of a grant issued now with lifetime `ttl`: seconds since the Unix epoch,
/// rounded up, at least one second ahead.
pub(crate) fn grant_expiry(ttl: Duration) -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = now.saturating_add(ttl);
    let secs = at.as_secs() + u64::from(at.subsec_nanos() > 0);
    u32::try_from(secs.max(now.as_secs() + 1)).unwrap_or(u32::MAX)
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            dead_after: Duration::from_millis(1500),
            flush_retry: Duration::from_secs(1),
            grant_ttl: Duration::from_secs(10),
        }
    }
}

/// Something the I/O layer must do after a state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send [`crate::proto::ControllerMsg::Revoke`] with these `(index, new_epoch)`
    /// pairs to memory node `node`.
    Revoke {
        /// Memory node id.
        node: u32,
        /// Blocks and their new epochs.
        blocks: Vec<(u32, u32)>,
    },
    /// Memory node `node` was declared dead: close its connection.
    NodeDead {
        /// Memory node id.
        node: u32,
    },
    /// Re-replication: copy block `source` into `target` (the pending copy of
    /// replica group `group`), then report with [`ControllerState::repair_done`] or
    /// [`ControllerState::repair_failed`].
    Copy {
        /// Replica group id.
        group: u64,
        /// A live, in-sync copy to read (read-only grant).
        source: Box<BlockGrant>,
        /// The new copy to fill (read-write grant).
        target: Box<BlockGrant>,
    },
    /// The lease of mapped path `path` ran out: write the object there to `backing`,
    /// then report with [`ControllerState::flush_done`] and `token`.
    Flush {
        /// The object's path.
        path: PoolPath,
        /// Where to write it.
        backing: Backing,
        /// Names this attempt in [`ControllerState::flush_done`].
        token: u64,
        /// Whether paths below `path` own blocks (a raw, non-object path can then not
        /// be flushed).
        has_children: bool,
    },
}

/// What [`ControllerState::remove`] took away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removal {
    /// Blocks freed.
    pub blocks: u64,
    /// Paths removed.
    pub paths: u64,
}

/// The controller's complete in-memory state.
#[derive(Debug)]
pub struct ControllerState {
    cfg: StateConfig,
    secret: Secret,
    registry: Registry,
    ns: Namespace,
    blocks_allocated_total: u64,
    blocks_freed_total: u64,
    blocks_expired_total: u64,
    /// Replica groups.
    replicas: ReplicaTable,
    /// Copies re-created since start.
    replicas_rebuilt_total: u64,
    /// After a recovery, until when memory nodes that have not come back yet count as
    /// "not yet back" rather than lost (no lost data reported, no re-replication).
    recovery_grace: Option<Instant>,
    /// Fenced locks.
    fences: Fences,
    /// Metadata changes not yet taken by the I/O layer; `None`: not journaling.
    journal: Option<Vec<Record>>,
    /// Flushes of mapped paths running or waiting for a retry, by path.
    flushes: BTreeMap<PoolPath, flush::FlushJob>,
    /// Names the next flush attempt.
    next_flush_token: u64,
    flushes_total: u64,
    flush_failures_total: u64,
}

/// What [`ControllerState::join_node`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The node's id.
    pub id: u32,
    /// Whether a known node came back with its blocks (rather than a fresh node).
    pub resumed: bool,
    /// Revocations to send the node once it is linked.
    pub effects: Vec<Effect>,
}

/// Re-validates a path that may have been deserialized from the network without
/// going through [`PoolPath::parse`], normalising it if needed.
fn canonical(path: &PoolPath) -> Result<Cow<'_, PoolPath>, ControlError> {
    let parsed = PoolPath::parse(path.as_str())?;
    Ok(if parsed == *path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(parsed)
    })
}

/// Collects revocations per node during one operation.
#[derive(Default)]
struct Revocations(BTreeMap<u32, Vec<(u32, u32)>>);

impl Revocations {
    fn into_effects(self) -> Vec<Effect> {
        self.0
            .into_iter()
            .map(|(node, blocks)| Effect::Revoke { node, blocks })
            .collect()
    }
}

impl ControllerState {
    /// A state with no nodes and an empty namespace.
    pub fn new(cfg: StateConfig, secret: Secret, now: Instant) -> Self {
        Self {
            cfg,
            secret,
            registry: Registry::new(),
            ns: Namespace::new(now),
            blocks_allocated_total: 0,
            blocks_freed_total: 0,
            blocks_expired_total: 0,
            replicas: ReplicaTable::default(),
            replicas_rebuilt_total: 0,
            recovery_grace: None,
            fences: Fences::new(),
            journal: None,
            flushes: BTreeMap::new(),
            next_flush_token: 1,
            flushes_total: 0,
            flush_failures_total: 0,
        }
    }

    // ----- metadata journal ---------------------------------------------------------

    /// Starts recording every metadata change as a [`Record`] for
    /// [`ControllerState::take_journal`].
    pub fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
    }

    /// The metadata changes since the last call, in order (empty when not journaling).
    pub fn take_journal(&mut self) -> Vec<Record> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn log(&mut self, record: Record) {
        if let Some(j) = self.journal.as_mut() {
            j.push(record);
        }
    }

    /// The cluster secret shared with memory nodes.
    pub fn secret(&self) -> Secret {
        self.secret
    }

    /// The timing configuration.
    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    /// The lease period in milliseconds.
    pub fn lease_ms(&self) -> u64 {
        u64::try_from(self.cfg.lease.as_millis()).unwrap_or(u64::MAX)
    }

    // ----- memory nodes -------------------------------------------------------------

    /// Validates a memory node's registration and assigns it a fresh id (ids are never
    /// reused). All its blocks start free at [`super::INITIAL_EPOCH`].
    pub fn register_node(&mut self, reg: &Register, now: Instant) -> Result<u32, ControlError> {
        self.join_node(reg, 0, now).map(|j| j.id)
    }

    /// Registers a memory node whose process identity is `incarnation` (0: none).
    ///
    /// A node already known under the same non-zero incarnation is the same process
    /// coming back (after its connection or the controller restarted): if it is dead
    /// it is *resumed* with its id, its owned blocks and their epochs, and every block
    /// it does not own is revoked anew before it can be handed out again (grants the
    /// controller stopped tracking while it was away die). Its region must be the same;
    /// a node still marked alive is refused until its old connection is noticed closed.
    /// Anything else registers afresh with a new id and all blocks free.
    pub fn join_node(
        &mut self,
        reg: &Register,
        incarnation: u64,
        now: Instant,
    ) -> Result<Joined, ControlError> {
        if let Some(id) = self.registry.by_incarnation(incarnation) {
            let Some(n) = self.registry.get(id) else {
                return Err(ControlError::BadRegistration(format!(
                    "node {id} vanished; register again"
                )));
            };
            if n.capacity != reg.capacity
                || n.block_size != reg.block_size
                || n.endpoint.transport != reg.transport
            {
                return Err(ControlError::BadRegistration(format!(
                    "node {id} comes back with another region ({} bytes in blocks of {}, was {} in blocks of {}); restart the memory node so it registers afresh",
                    reg.capacity, reg.block_size, n.capacity, n.block_size
                )));
            }
            if n.alive {
                return Err(ControlError::BadRegistration(format!(
                    "node {id} is still connected on another session; retry once the controller noticed it closed (within the dead-after period)"
                )));
            }
            let blocks = self
                .registry
                .resume(id, &reg.data_addr, reg.hugepages, reg.locked, now)
                .unwrap_or_default();
            self.log(Record::NodeResumed {
                id,
                data_addr: reg.data_addr.clone(),
                hugepages: reg.hugepages,
                locked: reg.locked,
            });
            let effects = if blocks.is_empty() {
                Vec::new()
            } else {
                vec![Effect::Revoke { node: id, blocks }]
            };
            return Ok(Joined {
                id,
                resumed: true,
                effects,
            });
        }
        let id = self.registry.register(reg, incarnation, now)?;
        if self.journal.is_some() {
            if let Some(n) = self.registry.get(id) {
                let info = n.info();
                self.log(Record::NodeRegistered(info));
            }
        }
        Ok(Joined {
            id,
            resumed: false,
            effects: Vec::new(),
        })
    }

    /// Records a heartbeat. Fails with [`ControlError::NoSuchNode`] if the node is
    /// unknown or was declared dead (a dead node must register again).
    pub fn heartbeat(
        &mut self,
        node: u32,
        stats: NodeStats,
        now: Instant,
    ) -> Result<(), ControlError> {
        match self.registry.get_mut(node) {
            Some(n) if n.alive => {
                n.last_heartbeat = now;
                n.stats = stats;
                Ok(())
            }
            _ => Err(ControlError::NoSuchNode(node)),
        }
    }

    /// The node's connection closed: it is dead from now on. Its owned blocks stay
    /// listed until freed: replicated ones are re-replicated (the returned
    /// [`Effect::Copy`]s), unreplicated ones are reported lost
    /// ([`ControlError::DataLost`]); once they are all freed the node is dropped from
    /// the registry.
    pub fn node_lost(&mut self, node: u32) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.registry.kill(node) {
            tracing::warn!(node, "memory node lost; its blocks stay listed until freed");
            self.log(Record::NodeDead { id: node });
            self.node_died(node);
            self.start_repairs(&mut effects);
        }
        if self.registry.drop_if_empty(node) {
            self.log(Record::NodeDropped { id: node });
        }
        effects
    }

    /// The node confirmed that blocks now hold the given epochs. Blocks revoking at
    /// exactly that epoch return to the free list; anything else is ignored. Returns
    /// how many blocks became free.
    pub fn revoked(&mut self, node: u32, confirmed: &[(u32, u32)]) -> usize {
        let n = self.registry.confirm(node, confirmed);
        if n > 0 {
            self.log(Record::Confirmed {
                node,
                blocks: confirmed.to_vec(),
            });
        }
        n
    }

    // ----- namespace ----------------------------------------------------------------

    fn lease_deadline(&self, now: Instant) -> Instant {
        later(now, self.cfg.lease)
    }

    /// Creates `path` and its parents if needed and renews its lease.
    pub fn open(&mut self, path: &PoolPath, now: Instant) -> Result<(), ControlError> {
        let path = canonical(path)?;
        let new = self.ns.find(&path).is_none();
        self.open_id(&path, now)?;
        if new {
            self.log(Record::Opened {
                path: path.into_owned(),
            });
        }
        Ok(())
    }

    fn open_id(&mut self, path: &PoolPath, now: Instant) -> Result<PathId, ControlError> {
        let deadline = self.lease_deadline(now);
        let id = self.ns.ensure(path, deadline)?;
        self.ns.renew(id, deadline);
        Ok(id)
    }

    /// Allocates whole blocks covering `bytes` to `path` (created and renewed), all or
    /// nothing: quotas on the path and its ancestors and free capacity are checked
    /// before any block is taken.
    pub fn alloc(
        &mut self,
        path: &PoolPath,
        bytes: u64,
        placement: Placement,
        now: Instant,
    ) -> Result<Vec<BlockGrant>, ControlError> {
        self.alloc_copies(path, bytes, placement, 1, now)
    }

    /// Like [`ControllerState::alloc`], with `copies` copies of every block on
    /// distinct live memory nodes (quotas count every copy). The grants are those of
    /// the primary copies, each carrying its [`crate::proto::Replication`].
    pub fn alloc_copies(
        &mut self,
        path: &PoolPath,
        bytes: u64,
        placement: Placement,
        copies: u8,
        now: Instant,
    ) -> Result<Vec<BlockGrant>, ControlError> {
        if copies == 0 || copies > crate::proto::MAX_COPIES {
            return Err(ControlError::BadRequest(format!(
                "{copies} copies asked for; ask for 1 to {}",
                crate::proto::MAX_COPIES
            )));
        }
        let path = canonical(path)?;
        if path.is_root() {
            return Err(PathError::Root.into());
        }
        if bytes == 0 {
            return Err(ControlError::BadRequest(
                "allocation of 0 bytes; ask for at least one byte".into(),
            ));
        }
        let Some(bs) = self.registry.block_size() else {
            return Err(ControlError::NoCapacity {
                requested: bytes,
                free: 0,
            });
        };
        let count = bytes.div_ceil(bs);
        if count > MAX_BLOCKS_PER_ALLOC {
            return Err(ControlError::BadRequest(format!(
                "allocation of {bytes} bytes needs {count} blocks of {bs} bytes; at most {MAX_BLOCKS_PER_ALLOC} blocks per request, allocate in several requests"
            )));
        }
        let requested = count * bs * u64::from(copies);
        let new = self.ns.find(&path).is_none();
        let id = self.open_id(&path, now)?;
        if new {
            self.log(Record::Opened {
                path: path.clone().into_owned(),
            });
        }
        self.ns.check_quota(id, requested)?;
        if copies > 1 {
            // count <= MAX_BLOCKS_PER_ALLOC fits in u32.
            return self.alloc_groups(&path, id, count as u32, copies, placement, bs);
        }
        // count <= MAX_BLOCKS_PER_ALLOC fits in u32.
        let taken = self.registry.take(count as u32, placement, id, bs)?;
        let mut ids = Vec::with_capacity(taken.len());
        let mut grants = Vec::with_capacity(taken.len());
        if self.journal.is_some() {
            self.log(Record::Alloc {
                path: path.clone().into_owned(),
                blocks: taken.clone(),
            });
        }
        for (node, index, epoch) in taken {
            let block = BlockId { node, index };
            ids.push(block);
            if let Some(g) = self.grant(block, epoch, true) {
                grants.push(g);
            }
        }
        self.ns.add_blocks(id, &ids, bs);
        self.blocks_allocated_total += count;
        Ok(grants)
    }

    fn grant(&self, block: BlockId, epoch: u32, writable: bool) -> Option<BlockGrant> {
        let node = self.registry.get(block.node)?;
        let block_key = derive_key(&self.secret, block.node, block.index, epoch, writable);
        // Soft grants are capabilities (MAC over the expiry); shm is a trusted mode and
        // verbs use memory windows, so they get the block key and no expiry.
        let (key, expiry) = match node.endpoint.transport {
            WireTransport::Soft => {
                let expiry = grant_expiry(self.cfg.grant_ttl);
                (grant_mac(block_key, expiry), expiry)
            }
            WireTransport::Shm | WireTransport::Verbs => (block_key, 0),
        };
        Some(BlockGrant {
            block,
            endpoint: node.endpoint.clone(),
            offset: u64::from(block.index) * node.block_size,
            len: node.block_size,
            epoch,
            key,
            writable,
            replication: None,
            expiry,
        })
    }

    /// Frees `blocks`, each of which must be owned by exactly `path`. Each block's
    /// epoch is bumped and the returned effects revoke the old epoch on its node.
    pub fn free(
        &mut self,
        path: &PoolPath,
        blocks: &[BlockId],
    ) -> Result<Vec<Effect>, ControlError> {
        let path = canonical(path)?;
        let not_owner = |block: BlockId| ControlError::NotOwner {
            block,
            path: path.clone().into_owned(),
        };
        let Some(id) = self.ns.find(&path) else {
            return match blocks.first() {
                Some(&b) => Err(not_owner(b)),
                None => Err(ControlError::NotFound(path.into_owned())),
            };
        };
        for &b in blocks {
            if !self.owned_by(b, id) {
                return Err(not_owner(b));
            }
        }
        if blocks.len() > 1 {
            let mut seen = HashSet::with_capacity(blocks.len());
            if let Some(&dup) = blocks.iter().find(|b| !seen.insert(**b)) {
                return Err(ControlError::BadRequest(format!(
                    "block {dup} is listed twice in one free request"
                )));
            }
        }
        let logged = blocks;
        // Freeing any copy of a replicated block frees all its copies.
        let expanded = self.with_copies(blocks);
        let blocks: &[BlockId] = &expanded;
        let bs = self.registry.block_size().unwrap_or(0);
        if self.journal.is_some() {
            self.log(Record::Free {
                path: path.clone().into_owned(),
                blocks: logged.to_vec(),
            });
        }
        self.ns.remove_blocks(id, blocks, bs);
        let mut revs = Revocations::default();
        let pairs: Vec<(PathId, BlockId)> = blocks.iter().map(|&b| (id, b)).collect();
        self.release_all(&pairs, &mut revs);
        Ok(revs.into_effects())
    }

    fn owned_by(&self, block: BlockId, id: PathId) -> bool {
        self.registry
            .get(block.node)
            .and_then(|n| n.block(block.index))
            .is_some_and(|(s, _)| s == super::registry::BlockState::Owned(id))
    }

    /// Releases blocks already detached from the namespace.
    fn release_all(&mut self, blocks: &[(PathId, BlockId)], revs: &mut Revocations) {
        let mut touched_dead = false;
        for &(owner, b) in blocks {
            self.replicas.forget(b);
            match self.registry.release(b.node, b.index, owner) {
                Some(Released::Revoking { new_epoch }) => {
                    revs.0.entry(b.node).or_default().push((b.index, new_epoch));
                }
                Some(Released::Dropped) => touched_dead = true,
                Some(Released::Retired) => {
                    tracing::warn!(block = %b, "block epochs exhausted; block retired");
                }
                None => {
                    tracing::error!(block = %b, owner, "freed block was not owned by its path");
                    continue;
                }
            }
            self.blocks_freed_total += 1;
        }
        if touched_dead {
            for node in self.registry.drop_empty_dead() {
                tracing::info!(node, "dead memory node holds no more blocks; dropped");
                self.log(Record::NodeDropped { id: node });
            }
        }
    }

    /// Grants for the blocks owned by exactly `path`, in allocation order.
    pub fn lookup(&self, path: &PoolPath, writable: bool) -> Result<Vec<BlockGrant>, ControlError> {
        let path = canonical(path)?;
        let node = self
            .ns
            .find(&path)
            .and_then(|id| self.ns.get(id))
            .ok_or_else(|| ControlError::NotFound(path.clone().into_owned()))?;
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(node.blocks.len());
        for &b in &node.blocks {
            match self.replicas.group_of(b) {
                // A group appears where its first listed copy is, so block order
                // survives re-replication.
                Some(g) => {
                    if seen.insert(g) {
                        out.push(self.group_grant(g, &path, writable)?);
                    }
                }
                None => {
                    if self.is_lost(b.node) {
                        return Err(ControlError::DataLost {
                            path: path.into_owned(),
                            block: b,
                        });
                    }
                    if let Some(g) = self.block_grant(b, writable) {
                        out.push(g);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Renews the lease of `prefix` (and through it its subtree); returns the lease
    /// period in milliseconds.
    pub fn renew(&mut self, prefix: &PoolPath, now: Instant) -> Result<u64, ControlError> {
        let prefix = canonical(prefix)?;
        let id = self
            .ns
            .find(&prefix)
            .ok_or_else(|| ControlError::NotFound(prefix.clone().into_owned()))?;
        self.ns.renew(id, self.lease_deadline(now));
        Ok(self.lease_ms())
    }

    /// Removes `path` and its subtree, freeing (revoking) every block in it.
    pub fn remove(&mut self, path: &PoolPath) -> Result<(Removal, Vec<Effect>), ControlError> {
        let path = canonical(path)?;
        if path.is_root() {
            return Err(ControlError::BadRequest(
                "refusing to remove '/'; remove job paths one by one".into(),
            ));
        }
        let id = self
            .ns
            .find(&path)
            .ok_or_else(|| ControlError::NotFound(path.clone().into_owned()))?;
        let mut gone = Reclaimed::default();
        self.ns.remove_subtree(id, &mut gone);
        self.log(Record::Remove {
            path: path.clone().into_owned(),
        });
        self.forget_removed_flushes();
        let mut revs = Revocations::default();
        self.release_all(&gone.blocks, &mut revs);
        Ok((
            Removal {
                blocks: gone.blocks.len() as u64,
                paths: gone.paths,
            },
            revs.into_effects(),
        ))
    }

    /// Sets or clears the byte quota of `path` (created if needed).
    pub fn set_quota(
        &mut self,
        path: &PoolPath,
        bytes: Option<u64>,
        now: Instant,
    ) -> Result<(), ControlError> {
        let path = canonical(path)?;
        let id = if path.is_root() {
            ROOT
        } else {
            self.ns.ensure(&path, self.lease_deadline(now))?
        };
        self.ns.set_quota(id, bytes);
        self.log(Record::Quota {
            path: path.into_owned(),
            bytes,
        });
        Ok(())
    }

    /// Pins or unpins `path` (which must exist and not be the root). A pinned path is
    /// never reclaimed by lease expiry: it keeps its blocks (and its ancestors stay,
    /// as for any live path) until it is removed or unpinned. Paths below it are not
    /// pinned by it.
    pub fn pin(&mut self, path: &PoolPath, pinned: bool) -> Result<(), ControlError> {
        let path = canonical(path)?;
        if path.is_root() {
            return Err(ControlError::BadRequest(
                "the root cannot be pinned; pin job paths".into(),
            ));
        }
        let id = self
            .ns
            .find(&path)
            .ok_or_else(|| ControlError::NotFound(path.clone().into_owned()))?;
        self.ns.set_pinned(id, pinned);
        self.log(Record::Pin {
            path: path.into_owned(),
            pinned,
        });
        Ok(())
    }

    // ----- fenced locks -------------------------------------------------------------

    /// Grants the fenced lock on `path` (see [`super::fence`]); journaled.
    pub fn fence_acquire(
        &mut self,
        path: &PoolPath,
        ttl_ms: u64,
        now: Instant,
    ) -> Result<u64, ControlError> {
        let path = canonical(path)?.into_owned();
        let token = self.fences.acquire(&path, ttl_ms, now)?;
        self.log(Record::Fenced {
            path,
            token,
            ttl_ms,
        });
        Ok(token)
    }

    /// Releases the fenced lock on `path` held under `token`; journaled when it was.
    pub fn fence_release(&mut self, path: &PoolPath, token: u64) -> Result<(), ControlError> {
        let path = canonical(path)?.into_owned();
        if self.fences.release(&path, token) {
            self.log(Record::Unfenced { path, token });
        }
        Ok(())
    }

    // ----- time ---------------------------------------------------------------------

    /// Periodic work: declares nodes without heartbeats dead and reclaims expired paths.
    pub fn tick(&mut self, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        for node in self.registry.overdue(now, self.cfg.dead_after) {
            tracing::warn!(node, "memory node missed its heartbeats; declared dead");
            self.registry.kill(node);
            self.log(Record::NodeDead { id: node });
            effects.push(Effect::NodeDead { node });
            self.node_died(node);
        }
        if self.recovery_grace.is_some_and(|t| now >= t) {
            self.recovery_grace = None;
            self.recovery_scan();
            // Copies in flight when the controller stopped start again, now that the
            // nodes that are coming back are back.
            effects.extend(self.pending_repairs());
        }
        self.start_repairs(&mut effects);
        for node in self.registry.drop_empty_dead() {
            tracing::info!(node, "dead memory node holds no blocks; dropped");
            self.log(Record::NodeDropped { id: node });
        }
        for (path, token) in self.fences.expire(now) {
            self.log(Record::Unfenced { path, token });
        }
        let mut gone = Reclaimed::default();
        self.ns.expire(now, self.cfg.grace, &mut gone);
        for path in std::mem::take(&mut gone.roots) {
            self.log(Record::Remove { path });
        }
        self.queue_flushes(&gone.flush_due, now);
        effects.extend(self.start_flushes(now));
        if gone.paths > 0 {
            tracing::info!(
                paths = gone.paths,
                blocks = gone.blocks.len(),
                "leases expired; reclaimed"
            );
            self.blocks_expired_total += gone.blocks.len() as u64;
            let mut revs = Revocations::default();
            self.release_all(&gone.blocks, &mut revs);
            effects.extend(revs.into_effects());
        }
        effects
    }

    // ----- status and dispatch ------------------------------------------------------

    /// Nodes, every path's usage in path order, totals and counters.
    pub fn status(&self, now: Instant) -> ClusterStatus {
        let nodes: Vec<NodeStatus> = self
            .registry
            .iter()
            .map(|n| NodeStatus {
                endpoint: n.endpoint.clone(),
                capacity: n.capacity,
                block_size: n.block_size,
                blocks_total: n.blocks_total(),
                blocks_free: n.free_blocks(),
                blocks_revoking: n.revoking_blocks(),
                alive: n.alive,
                last_heartbeat_ms: u64::try_from(
                    now.saturating_duration_since(n.last_heartbeat).as_millis(),
                )
                .unwrap_or(u64::MAX),
                hugepages: n.hugepages,
                locked: n.locked,
                stats: n.stats.clone(),
            })
            .collect();
        ClusterStatus {
            capacity_bytes: self
                .registry
                .iter()
                .filter(|n| n.alive)
                .map(|n| n.capacity)
                .sum(),
            used_bytes: self.ns.get(ROOT).map_or(0, |r| r.subtree_bytes),
            nodes,
            paths: self.ns.usage(now),
            lease_ms: self.lease_ms(),
            blocks_allocated_total: self.blocks_allocated_total,
            blocks_freed_total: self.blocks_freed_total,
            blocks_expired_total: self.blocks_expired_total,
            blocks_degraded: self.degraded_blocks(),
            blocks_lost: self.lost_blocks(),
            replicas_rebuilt_total: self.replicas_rebuilt_total,
            flushes_total: self.flushes_total,
            flush_failures_total: self.flush_failures_total,
            flushes: self.flush_status(now),
        }
    }

    /// Serves one client request.
    pub fn handle(&mut self, req: Request, now: Instant) -> (Response, Vec<Effect>) {
        let r = match req {
            Request::Open { path } => self.open(&path, now).map(|()| (Response::Ok, vec![])),
            Request::Alloc {
                path,
                bytes,
                placement,
            } => self
                .alloc(&path, bytes, placement, now)
                .map(|g| (Response::Blocks(g), vec![])),
            Request::AllocReplicated {
                path,
                bytes,
                placement,
                copies,
            } => self
                .alloc_copies(&path, bytes, placement, copies, now)
                .map(|g| (Response::Blocks(g), vec![])),
            Request::Refresh {
                path,
                group,
                block,
                writable,
            } => self
                .refresh(&path, group, block, writable)
                .map(|g| (Response::Blocks(vec![g]), vec![])),
            Request::Free { path, blocks } => self.free(&path, &blocks).map(|e| (Response::Ok, e)),
            Request::Lookup { path, writable } => self
                .lookup(&path, writable)
                .map(|g| (Response::Blocks(g), vec![])),
            Request::Renew { prefix } => self
                .renew(&prefix, now)
                .map(|lease_ms| (Response::Renewed { lease_ms }, vec![])),
            Request::Remove { path } => self.remove(&path).map(|(r, e)| {
                (
                    Response::Removed {
                        blocks: r.blocks,
                        paths: r.paths,
                    },
                    e,
                )
            }),
            Request::SetQuota { path, bytes } => self
                .set_quota(&path, bytes, now)
                .map(|()| (Response::Ok, vec![])),
            Request::Status => Ok((Response::Status(Box::new(self.status(now))), vec![])),
            Request::Pin { path, pinned } => {
                self.pin(&path, pinned).map(|()| (Response::Ok, vec![]))
            }
            Request::Map { path, backing } => {
                self.map(&path, backing).map(|()| (Response::Ok, vec![]))
            }
            Request::FenceAcquire { path, ttl_ms } => self
                .fence_acquire(&path, ttl_ms, now)
                .map(|token| (Response::Fence { token }, vec![])),
            Request::FenceRenew {
                path,
                token,
                ttl_ms,
            } => canonical(&path)
                .and_then(|p| self.fences.renew(&p, token, ttl_ms, now))
                .map(|()| (Response::Fence { token }, vec![])),
            Request::FenceRelease { path, token } => self
                .fence_release(&path, token)
                .map(|()| (Response::Ok, vec![])),
        };
        r.unwrap_or_else(|e| (Response::Error(e), vec![]))
    }

    /// Checks every structural invariant; used by tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        use super::registry::BlockState;
        use std::collections::HashMap;
        let bs = self.registry.block_size().unwrap_or(0);
        let mut owner_of: HashMap<BlockId, PathId> = HashMap::new();
        for (id, node) in self.ns.iter() {
            for &b in &node.blocks {
                if owner_of.insert(b, id).is_some() {
                    return Err(format!("block {b} listed twice"));
                }
                match self.registry.get(b.node).and_then(|n| n.block(b.index)) {
                    Some((BlockState::Owned(o), _)) if o == id => {}
                    other => return Err(format!("block {b} listed under {id} but is {other:?}")),
                }
            }
            let below: u64 = self
                .ns
                .children(id)
                .iter()
                .map(|&c| self.ns.get(c).map_or(0, |c| c.subtree_bytes))
                .sum();
            let own = node.blocks.len() as u64 * bs;
            if node.subtree_bytes != own + below {
                return Err(format!(
                    "{}: subtree_bytes {} != own {own} + children {below}",
                    node.path, node.subtree_bytes
                ));
            }
        }
        for n in self.registry.iter() {
            let owned = owner_of.keys().filter(|b| b.node == n.id).count() as u64;
            if owned != n.owned_blocks() {
                return Err(format!(
                    "node {}: {owned} listed, {} owned",
                    n.id,
                    n.owned_blocks()
                ));
            }
            let sum = n.free_blocks() + n.owned_blocks() + n.revoking_blocks() + n.retired_blocks();
            if sum != n.blocks_total() {
                return Err(format!(
                    "node {}: block states sum to {sum} of {}",
                    n.id,
                    n.blocks_total()
                ));
            }
            if !n.alive && n.revoking_blocks() > 0 {
                return Err(format!("dead node {} has revoking blocks", n.id));
            }
        }
        self.check_replica_invariants(&owner_of)
    }

    /// The registry, for tests.
    #[cfg(test)]
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }
}
