//! Memory-node registry: regions, per-block epochs and owners, free lists, liveness.
//!
//! Block metadata is materialised lazily: a node's region starts as `blocks_total`
//! untouched blocks (free, at [`INITIAL_EPOCH`]); a block gets an entry in the node's
//! block table the first time it is handed out. Registration is therefore O(1) however
//! large the region, and metadata grows with the blocks actually used.

use super::journal::{NodeInfo, SnapBlock, SnapNode};
use super::namespace::PathId;
use crate::proto::{ControlError, Endpoint, NodeStats, Register};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Epoch every block of a freshly registered node starts at.
pub const INITIAL_EPOCH: u32 = 1;

/// Smallest block size a memory node may register (bytes).
pub const MIN_BLOCK_SIZE: u64 = 4096;

/// Longest data-plane address accepted at registration (bytes).
const MAX_DATA_ADDR: usize = 4096;

/// Owner sentinels packed into [`Block::owner`]; path ids stay below them.
const FREE: u32 = u32::MAX;
const REVOKING: u32 = u32::MAX - 1;
const RETIRED: u32 = u32::MAX - 2;
/// Path ids must be below this value.
pub(crate) const MAX_PATH_ID: u32 = RETIRED;

/// Where a block stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// On the free list (or never handed out).
    Free,
    /// Owned by a path.
    Owned(PathId),
    /// Freed, new epoch sent to the node, confirmation pending.
    Revoking,
    /// Its epoch space is exhausted; it is never handed out again.
    Retired,
}

/// Packed per-block metadata (8 bytes).
#[derive(Debug, Clone, Copy)]
struct Block {
    epoch: u32,
    owner: u32,
}

impl Block {
    fn state(self) -> BlockState {
        match self.owner {
            FREE => BlockState::Free,
            REVOKING => BlockState::Revoking,
            RETIRED => BlockState::Retired,
            p => BlockState::Owned(p),
        }
    }
}

/// A block taken for an owner: `(node, index, epoch)`.
pub(crate) type Taken = (u32, u32, u32);

/// What releasing an owned block did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    /// The block moved to a new epoch and waits for the node's confirmation.
    Revoking {
        /// The new epoch to send to the node.
        new_epoch: u32,
    },
    /// The node is dead: the block went straight back to the (unused) free list.
    Dropped,
    /// The epoch space is exhausted: the block is retired for good.
    Retired,
}

/// One registered memory node.
#[derive(Debug)]
pub(crate) struct MemNode {
    /// Node id.
    pub id: u32,
    /// Data-plane endpoint handed to clients in grants.
    pub endpoint: Endpoint,
    /// Region size in bytes.
    pub capacity: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Huge-page backed.
    pub hugepages: bool,
    /// Locked in memory.
    pub locked: bool,
    /// Heartbeats arriving and connection open. A dead node comes back only when the
    /// same process (incarnation) resumes it.
    pub alive: bool,
    /// When the last heartbeat (or the registration) arrived.
    pub last_heartbeat: Instant,
    /// Last reported statistics.
    pub stats: NodeStats,
    /// Random identity of the node process (0: cannot resume); see [`Registry::resume`].
    pub incarnation: u64,
    blocks_total: u32,
    /// Block table; index `i` exists once block `i` was handed out at least once.
    blocks: Vec<Block>,
    /// Recycled free blocks (stack). Untouched blocks are `blocks.len()..blocks_total`.
    free: Vec<u32>,
    owned: u64,
    revoking: u64,
    retired: u64,
}

impl MemNode {
    /// Blocks in the region.
    pub fn blocks_total(&self) -> u64 {
        u64::from(self.blocks_total)
    }

    /// Blocks available for allocation (recycled plus untouched).
    pub fn free_blocks(&self) -> u64 {
        self.free.len() as u64 + (u64::from(self.blocks_total) - self.blocks.len() as u64)
    }

    /// Indices of the blocks owned by paths.
    pub fn owned_indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b.state(), BlockState::Owned(_)))
            // Block tables are bounded by `blocks_total`, a u32.
            .map(|(i, _)| i as u32)
    }

    /// Blocks owned by paths.
    #[cfg(test)]
    pub fn owned_blocks(&self) -> u64 {
        self.owned
    }

    /// Blocks waiting for a revocation confirmation.
    pub fn revoking_blocks(&self) -> u64 {
        self.revoking
    }

    /// Blocks whose epochs are exhausted.
    #[cfg(test)]
    pub fn retired_blocks(&self) -> u64 {
        self.retired
    }

    /// Whether no block on the node is owned or being revoked.
    pub fn holds_no_data(&self) -> bool {
        self.owned == 0 && self.revoking == 0
    }

    /// State and epoch of block `index`, `None` if out of range.
    pub fn block(&self, index: u32) -> Option<(BlockState, u32)> {
        if index >= self.blocks_total {
            return None;
        }
        Some(match self.blocks.get(index as usize) {
            Some(b) => (b.state(), b.epoch),
            None => (BlockState::Free, INITIAL_EPOCH),
        })
    }

    /// Hands out one free block to `owner`: `(index, epoch)`.
    fn take(&mut self, owner: PathId) -> Option<(u32, u32)> {
        debug_assert!(owner < MAX_PATH_ID);
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.blocks.len()).ok()?;
                if i >= self.blocks_total {
                    return None;
                }
                self.blocks.push(Block {
                    epoch: INITIAL_EPOCH,
                    owner: FREE,
                });
                i
            }
        };
        let b = &mut self.blocks[index as usize];
        debug_assert_eq!(b.owner, FREE);
        b.owner = owner;
        self.owned += 1;
        Some((index, b.epoch))
    }

    /// Gives block `index` at `epoch` to `owner` (log replay). Fails if the block is
    /// out of range, not free, or at another epoch. The free list is left stale (it may
    /// still name the block): replay ends with [`Registry::rebuild_free_lists`], which
    /// keeps replay linear instead of searching the free list per block.
    fn assign(&mut self, index: u32, owner: PathId, epoch: u32) -> Result<(), String> {
        if index >= self.blocks_total || owner >= MAX_PATH_ID {
            return Err(format!("block {index} of node {} is out of range", self.id));
        }
        while self.blocks.len() <= index as usize {
            let i = self.blocks.len() as u32;
            self.blocks.push(Block {
                epoch: INITIAL_EPOCH,
                owner: FREE,
            });
            if i != index {
                self.free.push(i);
            }
        }
        let b = &mut self.blocks[index as usize];
        if b.owner != FREE || b.epoch != epoch {
            return Err(format!(
                "block {index} of node {} is {:?} at epoch {}, not free at epoch {epoch}",
                self.id,
                b.state(),
                b.epoch
            ));
        }
        b.owner = owner;
        self.owned += 1;
        Ok(())
    }

    /// The node's registration as logged.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id,
            incarnation: self.incarnation,
            data_addr: self.endpoint.addr.clone(),
            transport: self.endpoint.transport,
            capacity: self.capacity,
            block_size: self.block_size,
            hugepages: self.hugepages,
            locked: self.locked,
        }
    }

    /// The node as stored in a snapshot.
    pub fn snapshot(&self) -> SnapNode {
        SnapNode {
            info: self.info(),
            alive: self.alive,
            blocks: self
                .blocks
                .iter()
                .map(|b| {
                    let s = match b.state() {
                        BlockState::Free => SnapBlock::Free,
                        BlockState::Owned(_) => SnapBlock::Owned,
                        BlockState::Revoking => SnapBlock::Revoking,
                        BlockState::Retired => SnapBlock::Retired,
                    };
                    (b.epoch, s)
                })
                .collect(),
        }
    }

    /// Brings a dead node back: alive again, and every block it does not own is moved
    /// to revoking (at its current epoch) so that grants the controller may have
    /// stopped tracking while the node was unreachable are killed before the block is
    /// handed out again. Returns the `(index, epoch)` revocations to send.
    fn resume(&mut self, now: Instant) -> Vec<(u32, u32)> {
        self.alive = true;
        self.last_heartbeat = now;
        let mut revoke = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if b.owner == FREE {
                b.owner = REVOKING;
                self.revoking += 1;
            }
            if b.owner == REVOKING {
                // Block tables are bounded by `blocks_total`, a u32.
                revoke.push((i as u32, b.epoch));
            }
        }
        self.free.clear();
        revoke
    }

    /// Releases block `index` owned by `owner`: bumps its epoch and either starts a
    /// revocation (live node) or drops it straight to the free list (dead node).
    /// `None` if the block is not owned by `owner`.
    fn release(&mut self, index: u32, owner: PathId) -> Option<Released> {
        let alive = self.alive;
        let b = self.blocks.get_mut(index as usize)?;
        if b.owner != owner || owner >= MAX_PATH_ID {
            return None;
        }
        self.owned -= 1;
        let Some(new_epoch) = b.epoch.checked_add(1) else {
            b.owner = RETIRED;
            self.retired += 1;
            return Some(Released::Retired);
        };
        b.epoch = new_epoch;
        if alive {
            b.owner = REVOKING;
            self.revoking += 1;
            Some(Released::Revoking { new_epoch })
        } else {
            b.owner = FREE;
            self.free.push(index);
            Some(Released::Dropped)
        }
    }

    /// The node confirmed block `index` is at `epoch`. Returns whether the block went
    /// back to the free list (stale or unexpected confirmations are ignored).
    fn confirm(&mut self, index: u32, epoch: u32) -> bool {
        match self.blocks.get_mut(index as usize) {
            Some(b) if b.owner == REVOKING && b.epoch == epoch => {
                b.owner = FREE;
                self.revoking -= 1;
                self.free.push(index);
                true
            }
            _ => false,
        }
    }

    /// Marks the node dead. Pending revocations will never be confirmed; the blocks
    /// return to the free list (which a dead node never allocates from).
    fn kill(&mut self) {
        if !self.alive {
            return;
        }
        self.alive = false;
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if b.owner == REVOKING {
                b.owner = FREE;
                // Block tables are bounded by `blocks_total`, a u32.
                self.free.push(i as u32);
            }
        }
        self.revoking = 0;
    }
}

/// Validates a registration; returns the number of blocks.
pub(crate) fn validate_register(
    reg: &Register,
    cluster_block_size: Option<u64>,
) -> Result<u32, ControlError> {
    let bad = |m: String| Err(ControlError::BadRegistration(m));
    let bs = reg.block_size;
    if bs < MIN_BLOCK_SIZE || !bs.is_power_of_two() {
        return bad(format!(
            "block size {bs} must be a power of two of at least {MIN_BLOCK_SIZE} bytes"
        ));
    }
    if reg.capacity < bs {
        return bad(format!(
            "capacity {} is smaller than one block of {bs} bytes",
            reg.capacity
        ));
    }
    if reg.capacity % bs != 0 {
        return bad(format!(
            "capacity {} is not a multiple of the block size {bs}",
            reg.capacity
        ));
    }
    let Ok(blocks) = u32::try_from(reg.capacity / bs) else {
        return bad(format!(
            "region of {} bytes has more than {} blocks of {bs} bytes; use larger blocks",
            reg.capacity,
            u32::MAX
        ));
    };
    if let Some(cbs) = cluster_block_size {
        if cbs != bs {
            return bad(format!(
                "block size {bs} differs from the cluster's {cbs}; run every memory node with the same block size"
            ));
        }
    }
    if reg.data_addr.trim().is_empty() || reg.data_addr.len() > MAX_DATA_ADDR {
        return bad(format!(
            "data-plane address must be non-empty and at most {MAX_DATA_ADDR} bytes"
        ));
    }
    Ok(blocks)
}

/// All memory nodes, by id (ids are never reused).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    nodes: BTreeMap<u32, MemNode>,
    next_id: u32,
    spread_cursor: u32,
}

impl Registry {
    /// An empty registry; the first node gets id 1.
    pub fn new() -> Self {
        Self {
            nodes: BTreeMap::new(),
            next_id: 1,
            spread_cursor: 0,
        }
    }

    /// The block size shared by every registered node, if any node is registered.
    pub fn block_size(&self) -> Option<u64> {
        self.nodes.values().next().map(|n| n.block_size)
    }

    /// Validates and registers a node with process identity `incarnation` (0: none),
    /// returning its fresh id.
    pub fn register(
        &mut self,
        reg: &Register,
        incarnation: u64,
        now: Instant,
    ) -> Result<u32, ControlError> {
        let blocks_total = validate_register(reg, self.block_size())?;
        let id = self.next_id;
        let Some(next) = id.checked_add(1) else {
            return Err(ControlError::BadRegistration(
                "memory node ids exhausted; restart the controller".into(),
            ));
        };
        self.next_id = next;
        self.nodes.insert(
            id,
            MemNode {
                id,
                endpoint: Endpoint {
                    node: id,
                    transport: reg.transport,
                    addr: reg.data_addr.clone(),
                },
                capacity: reg.capacity,
                block_size: reg.block_size,
                hugepages: reg.hugepages,
                locked: reg.locked,
                alive: true,
                last_heartbeat: now,
                stats: NodeStats::default(),
                incarnation,
                blocks_total,
                blocks: Vec::new(),
                free: Vec::new(),
                owned: 0,
                revoking: 0,
                retired: 0,
            },
        );
        Ok(id)
    }

    /// Registers a node from the log with the id it had (log replay).
    pub fn insert_logged(&mut self, info: &NodeInfo, now: Instant) -> Result<(), String> {
        if self.nodes.contains_key(&info.id) || info.id < self.next_id {
            return Err(format!("node id {} registered twice", info.id));
        }
        let reg = Register {
            data_addr: info.data_addr.clone(),
            transport: info.transport,
            capacity: info.capacity,
            block_size: info.block_size,
            hugepages: info.hugepages,
            locked: info.locked,
        };
        self.next_id = info.id;
        let id = self
            .register(&reg, info.incarnation, now)
            .map_err(|e| e.to_string())?;
        debug_assert_eq!(id, info.id);
        Ok(())
    }

    /// Restores a node from a snapshot; `owners` maps each owned block index to its
    /// path. Every block the snapshot says is owned must appear in `owners` and no other.
    pub fn restore(
        &mut self,
        snap: &SnapNode,
        owners: &HashMap<u32, PathId>,
        now: Instant,
    ) -> Result<(), String> {
        let info = &snap.info;
        self.insert_logged(info, now)?;
        let node = self
            .nodes
            .get_mut(&info.id)
            .ok_or_else(|| format!("node {} vanished during restore", info.id))?;
        if snap.blocks.len() > node.blocks_total as usize {
            return Err(format!(
                "node {} lists {} blocks but has {}",
                info.id,
                snap.blocks.len(),
                node.blocks_total
            ));
        }
        node.alive = snap.alive;
        for (i, &(epoch, state)) in snap.blocks.iter().enumerate() {
            let index = i as u32;
            let owner = match state {
                SnapBlock::Free => {
                    node.free.push(index);
                    FREE
                }
                SnapBlock::Revoking => {
                    node.revoking += 1;
                    REVOKING
                }
                SnapBlock::Retired => {
                    node.retired += 1;
                    RETIRED
                }
                SnapBlock::Owned => {
                    let owner = owners.get(&index).copied().ok_or_else(|| {
                        format!("block {index} of node {} is owned by no path", info.id)
                    })?;
                    node.owned += 1;
                    owner
                }
            };
            node.blocks.push(Block { epoch, owner });
        }
        if node.owned != owners.len() as u64 {
            return Err(format!(
                "paths list {} blocks of node {} that are not owned",
                owners.len() as u64 - node.owned,
                info.id
            ));
        }
        Ok(())
    }

    /// Gives block `index` of `node` at `epoch` to `owner` (log replay).
    pub fn assign(
        &mut self,
        node: u32,
        index: u32,
        owner: PathId,
        epoch: u32,
    ) -> Result<(), String> {
        self.nodes
            .get_mut(&node)
            .ok_or_else(|| format!("allocation on unknown node {node}"))?
            .assign(index, owner, epoch)
    }

    /// Recomputes every node's free list from its block table (after log replay).
    pub fn rebuild_free_lists(&mut self) {
        for n in self.nodes.values_mut() {
            // Highest index first in the stack, so the lowest is handed out first.
            n.free = (0..n.blocks.len() as u32)
                .rev()
                .filter(|&i| n.blocks[i as usize].owner == FREE)
                .collect();
        }
    }

    /// The id of the node registered with `incarnation`, if any (0 never matches).
    pub fn by_incarnation(&self, incarnation: u64) -> Option<u32> {
        if incarnation == 0 {
            return None;
        }
        self.nodes
            .values()
            .find(|n| n.incarnation == incarnation)
            .map(|n| n.id)
    }

    /// Brings dead node `id` back with a new data address; returns the revocations to
    /// send it, `None` if the node is unknown.
    pub fn resume(
        &mut self,
        id: u32,
        data_addr: &str,
        hugepages: bool,
        locked: bool,
        now: Instant,
    ) -> Option<Vec<(u32, u32)>> {
        let node = self.nodes.get_mut(&id)?;
        node.endpoint.addr = data_addr.to_string();
        node.hugepages = hugepages;
        node.locked = locked;
        Some(node.resume(now))
    }

    /// Id the next registering node gets.
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Sets the id the next registering node gets (never lowers it).
    pub fn bump_next_id(&mut self, next: u32) {
        self.next_id = self.next_id.max(next);
    }

    /// The node with `id`, dead or alive.
    pub fn get(&self, id: u32) -> Option<&MemNode> {
        self.nodes.get(&id)
    }

    /// The node with `id`, mutable.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut MemNode> {
        self.nodes.get_mut(&id)
    }

    /// Every node in id order.
    pub fn iter(&self) -> impl Iterator<Item = &MemNode> {
        self.nodes.values()
    }

    /// Free blocks on live nodes.
    pub fn live_free_blocks(&self) -> u64 {
        self.nodes
            .values()
            .filter(|n| n.alive)
            .map(MemNode::free_blocks)
            .sum()
    }

    /// Marks `id` dead; returns whether it was alive.
    pub fn kill(&mut self, id: u32) -> bool {
        match self.nodes.get_mut(&id) {
            Some(n) if n.alive => {
                n.kill();
                true
            }
            _ => false,
        }
    }

    /// Drops `id` if it is dead and holds no data; returns whether it was dropped.
    pub fn drop_if_empty(&mut self, id: u32) -> bool {
        let droppable = self
            .nodes
            .get(&id)
            .is_some_and(|n| !n.alive && n.holds_no_data());
        if droppable {
            self.nodes.remove(&id);
        }
        droppable
    }

    /// Drops every dead node that holds no data; returns their ids.
    pub fn drop_empty_dead(&mut self) -> Vec<u32> {
        let ids: Vec<u32> = self
            .nodes
            .values()
            .filter(|n| !n.alive && n.holds_no_data())
            .map(|n| n.id)
            .collect();
        for id in &ids {
            self.nodes.remove(id);
        }
        ids
    }

    /// Live nodes whose last heartbeat is at least `dead_after` old.
    pub fn overdue(&self, now: Instant, dead_after: std::time::Duration) -> Vec<u32> {
        self.nodes
            .values()
            .filter(|n| n.alive && now.saturating_duration_since(n.last_heartbeat) >= dead_after)
            .map(|n| n.id)
            .collect()
    }

    /// Takes `count` blocks for `owner` according to `placement`, all or nothing.
    /// Returns `(node, index, epoch)` per block.
    pub fn take(
        &mut self,
        count: u32,
        placement: crate::proto::Placement,
        owner: PathId,
        block_size: u64,
    ) -> Result<Vec<(u32, u32, u32)>, ControlError> {
        use crate::proto::Placement;
        let requested = u64::from(count) * block_size;
        let mut out = Vec::with_capacity(count as usize);
        match placement {
            Placement::Node(id) => {
                let node = match self.nodes.get_mut(&id) {
                    Some(n) if n.alive => n,
                    _ => return Err(ControlError::NoSuchNode(id)),
                };
                let free = node.free_blocks();
                if free < u64::from(count) {
                    return Err(ControlError::NoCapacity {
                        requested,
                        free: free * block_size,
                    });
                }
                for _ in 0..count {
                    let (index, epoch) = node.take(owner).ok_or_else(internal)?;
                    out.push((id, index, epoch));
                }
            }
            Placement::LeastLoaded | Placement::Spread => {
                let free = self.live_free_blocks();
                if free < u64::from(count) {
                    return Err(ControlError::NoCapacity {
                        requested,
                        free: free * block_size,
                    });
                }
                // Live nodes with their free counts; few nodes, so a small vector.
                let mut cands: Vec<(u32, u64)> = self
                    .nodes
                    .values()
                    .filter(|n| n.alive && n.free_blocks() > 0)
                    .map(|n| (n.id, n.free_blocks()))
                    .collect();
                for _ in 0..count {
                    let slot = if placement == Placement::Spread {
                        self.next_spread(&cands)
                    } else {
                        most_free(&cands)
                    }
                    .ok_or_else(internal)?;
                    let id = cands[slot].0;
                    let node = self.nodes.get_mut(&id).ok_or_else(internal)?;
                    let (index, epoch) = node.take(owner).ok_or_else(internal)?;
                    out.push((id, index, epoch));
                    cands[slot].1 -= 1;
                    if cands[slot].1 == 0 {
                        cands.remove(slot);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Takes `count` groups of `copies` blocks for `owner`, the copies of each group on
    /// distinct live nodes, all or nothing. The first copy of each group follows
    /// `placement`; the others go to the live nodes with the most free blocks among
    /// those the group does not use yet. Returns `(node, index, epoch)` per block,
    /// group after group.
    pub fn take_replicated(
        &mut self,
        count: u32,
        copies: u8,
        placement: crate::proto::Placement,
        owner: PathId,
        block_size: u64,
    ) -> Result<Vec<Vec<Taken>>, ControlError> {
        use crate::proto::Placement;
        let total = u64::from(count) * u64::from(copies);
        let free = self.live_free_blocks();
        if free < total {
            return Err(ControlError::NoCapacity {
                requested: total * block_size,
                free: free * block_size,
            });
        }
        let mut cands: Vec<(u32, u64)> = self
            .nodes
            .values()
            .filter(|n| n.alive && n.free_blocks() > 0)
            .map(|n| (n.id, n.free_blocks()))
            .collect();
        if (cands.len() as u64) < u64::from(copies) {
            return Err(ControlError::NotEnoughNodes {
                copies,
                nodes: cands.len() as u64,
            });
        }
        // Plan on the candidate counts first, so a failure takes nothing.
        let mut plan: Vec<Vec<u32>> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut nodes: Vec<u32> = Vec::with_capacity(usize::from(copies));
            for copy in 0..copies {
                let usable: Vec<(u32, u64)> = cands
                    .iter()
                    .copied()
                    .filter(|&(id, f)| f > 0 && !nodes.contains(&id))
                    .collect();
                let pick = match (copy, placement) {
                    (0, Placement::Node(id)) => usable
                        .iter()
                        .find(|&&(n, _)| n == id)
                        .map(|&(n, _)| n)
                        .ok_or(ControlError::NoSuchNode(id))?,
                    (0, Placement::Spread) => {
                        let slot = self.next_spread(&usable);
                        slot.map(|s| usable[s].0)
                            .ok_or(ControlError::NotEnoughNodes {
                                copies,
                                nodes: usable.len() as u64,
                            })?
                    }
                    _ => most_free(&usable).map(|s| usable[s].0).ok_or(
                        ControlError::NotEnoughNodes {
                            copies,
                            nodes: (nodes.len() + usable.len()) as u64,
                        },
                    )?,
                };
                if let Some(c) = cands.iter_mut().find(|c| c.0 == pick) {
                    c.1 -= 1;
                }
                nodes.push(pick);
            }
            plan.push(nodes);
        }
        let mut out = Vec::with_capacity(plan.len());
        for nodes in plan {
            let mut group = Vec::with_capacity(nodes.len());
            for id in nodes {
                let node = self.nodes.get_mut(&id).ok_or_else(internal)?;
                let (index, epoch) = node.take(owner).ok_or_else(internal)?;
                group.push((id, index, epoch));
            }
            out.push(group);
        }
        Ok(out)
    }

    /// Takes one block for `owner` on the live node with the most free blocks that is
    /// not in `exclude`; `None` if there is none.
    pub fn take_excluding(&mut self, exclude: &[u32], owner: PathId) -> Option<(u32, u32, u32)> {
        let cands: Vec<(u32, u64)> = self
            .nodes
            .values()
            .filter(|n| n.alive && n.free_blocks() > 0 && !exclude.contains(&n.id))
            .map(|n| (n.id, n.free_blocks()))
            .collect();
        let id = cands[most_free(&cands)?].0;
        let (index, epoch) = self.nodes.get_mut(&id)?.take(owner)?;
        Some((id, index, epoch))
    }

    /// Whether node `id` is registered and alive.
    pub fn alive(&self, id: u32) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.alive)
    }

    /// Picks the first candidate with an id after the spread cursor (wrapping) and
    /// advances the cursor, so consecutive allocations rotate across nodes.
    fn next_spread(&mut self, cands: &[(u32, u64)]) -> Option<usize> {
        let slot = cands
            .iter()
            .position(|&(id, _)| id > self.spread_cursor)
            .or(if cands.is_empty() { None } else { Some(0) })?;
        self.spread_cursor = cands[slot].0;
        Some(slot)
    }

    /// Releases block `index` of `node` owned by `owner`.
    pub fn release(&mut self, node: u32, index: u32, owner: PathId) -> Option<Released> {
        self.nodes.get_mut(&node)?.release(index, owner)
    }

    /// Applies a node's revocation confirmations; returns how many blocks became free.
    pub fn confirm(&mut self, node: u32, confirmed: &[(u32, u32)]) -> usize {
        match self.nodes.get_mut(&node) {
            Some(n) => confirmed
                .iter()
                .filter(|&&(index, epoch)| n.confirm(index, epoch))
                .count(),
            None => 0,
        }
    }
}

/// Most free blocks wins; ties go to the lowest node id (candidates are in id order).
fn most_free(cands: &[(u32, u64)]) -> Option<usize> {
    cands
        .iter()
        .enumerate()
        .max_by(|(_, a), (_, b)| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
}

fn internal() -> ControlError {
    ControlError::BadRequest("internal allocator inconsistency; please report this".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{grant::WireTransport, Placement};

    fn reg(capacity: u64, block_size: u64) -> Register {
        Register {
            data_addr: "127.0.0.1:9000".into(),
            transport: WireTransport::Soft,
            capacity,
            block_size,
            hugepages: false,
            locked: false,
        }
    }

    #[test]
    fn validation_refuses_bad_regions() {
        for (c, b) in [
            (8192, 1024),
            (8192, 6000),
            (4096, 8192),
            (12288 + 1, 4096),
            (0, 4096),
        ] {
            assert!(
                matches!(
                    validate_register(&reg(c, b), None),
                    Err(ControlError::BadRegistration(_))
                ),
                "{c}/{b}"
            );
        }
        let huge = (u64::from(u32::MAX) + 1) * 4096;
        assert!(validate_register(&reg(huge, 4096), None).is_err());
        assert_eq!(validate_register(&reg(1 << 20, 4096), None), Ok(256));
        assert!(validate_register(&reg(1 << 20, 8192), Some(4096)).is_err());
        let mut r = reg(1 << 20, 4096);
        r.data_addr = " ".into();
        assert!(validate_register(&r, None).is_err());
    }

    #[test]
    fn ids_are_never_reused_and_registration_is_lazy() {
        let now = Instant::now();
        let mut r = Registry::new();
        // A region with the maximal block count registers instantly.
        let a = r
            .register(&reg(u64::from(u32::MAX) * 4096, 4096), 0, now)
            .unwrap();
        assert_eq!(r.get(a).unwrap().free_blocks(), u64::from(u32::MAX));
        assert!(r.kill(a));
        assert!(r.drop_if_empty(a));
        let b = r.register(&reg(1 << 20, 4096), 0, now).unwrap();
        assert!(b > a);
    }

    #[test]
    fn release_and_confirm_cycle() {
        let now = Instant::now();
        let mut r = Registry::new();
        let n = r.register(&reg(2 * 4096, 4096), 0, now).unwrap();
        let got = r.take(2, Placement::Node(n), 5, 4096).unwrap();
        assert_eq!(got, vec![(n, 0, 1), (n, 1, 1)]);
        assert!(r.take(1, Placement::Node(n), 5, 4096).is_err());
        assert_eq!(r.release(n, 0, 6), None, "wrong owner");
        assert_eq!(
            r.release(n, 0, 5),
            Some(Released::Revoking { new_epoch: 2 })
        );
        assert_eq!(r.release(n, 0, 5), None, "already released");
        assert_eq!(r.confirm(n, &[(0, 1)]), 0, "stale epoch ignored");
        assert_eq!(r.get(n).unwrap().free_blocks(), 0);
        assert_eq!(r.confirm(n, &[(0, 2), (0, 2), (99, 2)]), 1);
        assert_eq!(
            r.take(1, Placement::Node(n), 7, 4096).unwrap(),
            vec![(n, 0, 2)]
        );
    }
}
