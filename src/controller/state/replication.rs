//! Replicated allocation, grants of replica groups, lost data and re-replication.
//!
//! A replicated block is a group of copies on distinct memory nodes (see
//! [`super::super::replicas`]). When a node dies, every group with a copy there is
//! marked for repair: a new block on another live node becomes the group's *pending*
//! copy (journaled, listed under the owner path), clients get it in their refreshed
//! grants as a copy to write (never to read), and the I/O layer copies the data into it
//! ([`Effect::Copy`]). Once the copy is verified the pending copy joins the group and
//! the copies on dead nodes are freed. Unreplicated blocks on dead nodes, and groups
//! without a live copy, are *lost*: lookups fail with [`ControlError::DataLost`].

use super::{ControllerState, Effect, Revocations};
use crate::controller::journal::Record;
use crate::controller::namespace::PathId;
use crate::controller::registry::BlockState;
use crate::proto::{BlockGrant, BlockId, ControlError, Placement, PoolPath, Replication};

impl ControllerState {
    /// Takes `count` groups of `copies` blocks for path `id` and answers the grants.
    pub(super) fn alloc_groups(
        &mut self,
        path: &PoolPath,
        id: PathId,
        count: u32,
        copies: u8,
        placement: Placement,
        bs: u64,
    ) -> Result<Vec<BlockGrant>, ControlError> {
        let taken = self
            .registry
            .take_replicated(count, copies, placement, id, bs)?;
        let first = self.replicas.next_id();
        let groups: Vec<(u64, u8, Vec<BlockId>)> = taken
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let members = g
                    .iter()
                    .map(|&(node, index, _)| BlockId { node, index })
                    .collect();
                (first + i as u64, copies, members)
            })
            .collect();
        if self.journal.is_some() {
            self.log(Record::Alloc {
                path: path.clone(),
                blocks: taken.iter().flatten().copied().collect(),
            });
            self.log(Record::Replicas {
                groups: groups.clone(),
            });
        }
        let mut ids = Vec::with_capacity(taken.len() * usize::from(copies));
        for (gid, copies, members) in groups.iter().cloned() {
            ids.extend_from_slice(&members);
            self.replicas
                .insert(gid, copies, members)
                .map_err(ControlError::BadRequest)?;
        }
        self.ns.add_blocks(id, &ids, bs);
        self.blocks_allocated_total += ids.len() as u64;
        groups
            .iter()
            .map(|&(gid, _, _)| self.group_grant(gid, path, true))
            .collect()
    }

    /// The grant of `block` at its current epoch, without replication.
    pub(super) fn block_grant(&self, block: BlockId, writable: bool) -> Option<BlockGrant> {
        let (_, epoch) = self.registry.get(block.node)?.block(block.index)?;
        self.grant(block, epoch, writable)
    }

    /// Whether blocks on node `node` count as lost: it is dead (and not merely not
    /// back yet after a controller restart).
    pub(super) fn is_lost(&self, node: u32) -> bool {
        !self.registry.alive(node) && self.recovery_grace.is_none()
    }

    /// The grant of replica group `gid` (owned by `path`): the first live copy, with
    /// the other live copies and the pending copy attached.
    pub(super) fn group_grant(
        &self,
        gid: u64,
        path: &PoolPath,
        writable: bool,
    ) -> Result<BlockGrant, ControlError> {
        let g = self.replicas.get(gid).ok_or_else(|| {
            ControlError::BadRequest(format!(
                "replica group {gid} of '{path}' does not exist; look the path up again"
            ))
        })?;
        let mut live: Vec<BlockId> = g
            .members
            .iter()
            .copied()
            .filter(|b| !self.is_lost(b.node))
            .collect();
        if live.is_empty() {
            return Err(ControlError::DataLost {
                path: path.clone(),
                block: g
                    .members
                    .first()
                    .copied()
                    .unwrap_or(BlockId { node: 0, index: 0 }),
            });
        }
        // Nodes not back yet after a restart go last: clients try live ones first.
        live.sort_by_key(|b| !self.registry.alive(b.node));
        let missing = || ControlError::BadRequest(format!("block of group {gid} vanished"));
        let mut grant = self.block_grant(live[0], writable).ok_or_else(missing)?;
        let mut others = Vec::with_capacity(live.len());
        for &b in &live[1..] {
            others.push((self.block_grant(b, writable).ok_or_else(missing)?, true));
        }
        if let Some(p) = g.pending {
            others.push((self.block_grant(p, writable).ok_or_else(missing)?, false));
        }
        grant.replication = Some(Box::new(Replication {
            group: gid,
            copies: g.copies,
            origin: g.origin,
            others,
        }));
        Ok(grant)
    }

    /// The current grant of replica group `group` of `path`, or with `group` 0 of the
    /// unreplicated `block`; [`ControlError::DataLost`] when no copy survives.
    pub fn refresh(
        &self,
        path: &PoolPath,
        group: u64,
        block: BlockId,
        writable: bool,
    ) -> Result<BlockGrant, ControlError> {
        let path = super::canonical(path)?;
        let id = self
            .ns
            .find(&path)
            .ok_or_else(|| ControlError::NotFound(path.clone().into_owned()))?;
        let not_owner = |block| ControlError::NotOwner {
            block,
            path: path.clone().into_owned(),
        };
        if group == 0 {
            if !self.owned_by(block, id) {
                return Err(not_owner(block));
            }
            if self.is_lost(block.node) {
                return Err(ControlError::DataLost {
                    path: path.into_owned(),
                    block,
                });
            }
            return self.block_grant(block, writable).ok_or(not_owner(block));
        }
        let members = self.replicas.blocks(group);
        match members.first() {
            Some(&b) if self.owned_by(b, id) => self.group_grant(group, &path, writable),
            Some(&b) => Err(not_owner(b)),
            None => Err(not_owner(block)),
        }
    }

    /// `blocks` with every other copy of the replicated ones added (no duplicates).
    pub(super) fn with_copies(&self, blocks: &[BlockId]) -> Vec<BlockId> {
        let mut out: Vec<BlockId> = Vec::with_capacity(blocks.len());
        let mut seen = std::collections::HashSet::new();
        for &b in blocks {
            match self.replicas.group_of(b) {
                Some(g) => {
                    for c in self.replicas.blocks(g) {
                        if seen.insert(c) {
                            out.push(c);
                        }
                    }
                }
                None => {
                    if seen.insert(b) {
                        out.push(b);
                    }
                }
            }
        }
        out
    }

    /// The path that owns `block`, if any.
    fn owner(&self, block: BlockId) -> Option<PathId> {
        match self.registry.get(block.node)?.block(block.index)? {
            (BlockState::Owned(p), _) => Some(p),
            _ => None,
        }
    }

    /// Node `node` just died: the groups with a copy there need repair.
    pub(super) fn node_died(&mut self, node: u32) {
        let Some(n) = self.registry.get(node) else {
            return;
        };
        let groups: Vec<u64> = n
            .owned_indices()
            .filter_map(|index| self.replicas.group_of(BlockId { node, index }))
            .collect();
        for g in groups {
            self.replicas.want_repair(g);
        }
    }

    /// After the recovery grace: every group with a copy on a dead node needs repair.
    pub(super) fn recovery_scan(&mut self) {
        let groups: Vec<u64> = self
            .replicas
            .iter()
            .filter(|(_, g)| g.members.iter().any(|b| !self.registry.alive(b.node)))
            .map(|(id, _)| id)
            .collect();
        for g in groups {
            self.replicas.want_repair(g);
        }
    }

    /// Starts re-replicating the groups marked for repair where a live copy and a
    /// node to copy to exist; the others wait for the next tick (a node may join).
    /// Groups with no live copy are lost and left alone.
    pub(super) fn start_repairs(&mut self, effects: &mut Vec<Effect>) {
        if self.recovery_grace.is_some() {
            return;
        }
        for gid in self.replicas.take_repairs() {
            let Some(g) = self.replicas.get(gid) else {
                continue;
            };
            if g.pending.is_some() {
                continue;
            }
            let live: Vec<BlockId> = g
                .members
                .iter()
                .copied()
                .filter(|b| self.registry.alive(b.node))
                .collect();
            if live.is_empty() || live.len() >= usize::from(g.copies) {
                continue;
            }
            let exclude: Vec<u32> = g
                .members
                .iter()
                .chain(std::iter::once(&g.origin))
                .map(|b| b.node)
                .collect();
            let Some(owner) = self.owner(live[0]) else {
                continue;
            };
            let Some((node, index, epoch)) = self.registry.take_excluding(&exclude, owner) else {
                tracing::warn!(
                    group = gid,
                    "no live memory node to re-replicate to; waiting"
                );
                self.replicas.want_repair(gid);
                continue;
            };
            let target = BlockId { node, index };
            let Some(path) = self.ns.get(owner).map(|n| n.path.clone()) else {
                continue;
            };
            self.log(Record::RepairStarted {
                path,
                group: gid,
                target: (node, index, epoch),
            });
            if let Err(e) = self.replicas.set_pending(gid, target) {
                tracing::error!(group = gid, "cannot start re-replication: {e}");
                continue;
            }
            let bs = self.registry.block_size().unwrap_or(0);
            self.ns.add_blocks(owner, &[target], bs);
            self.blocks_allocated_total += 1;
            let source = self.block_grant(live[0], false);
            let dest = self.block_grant(target, true);
            if let (Some(source), Some(dest)) = (source, dest) {
                tracing::info!(group = gid, from = %live[0], to = %target, "re-replicating");
                effects.push(Effect::Copy {
                    group: gid,
                    source: Box::new(source),
                    target: Box::new(dest),
                });
            }
        }
    }

    /// Replays [`Record::RepairStarted`].
    pub(super) fn apply_repair_started(
        &mut self,
        path: &PoolPath,
        group: u64,
        (node, index, epoch): (u32, u32, u32),
    ) -> Result<(), String> {
        let id = self
            .ns
            .find(path)
            .ok_or_else(|| format!("repair for unknown path {path}"))?;
        self.registry.assign(node, index, id, epoch)?;
        let target = BlockId { node, index };
        self.replicas.set_pending(group, target)?;
        let bs = self.registry.block_size().unwrap_or(0);
        self.ns.add_blocks(id, &[target], bs);
        Ok(())
    }

    /// The copies to (re)start: one [`Effect::Copy`] per group with a pending copy
    /// (after a restart, copies in flight were lost with the old process).
    pub fn pending_repairs(&self) -> Vec<Effect> {
        let mut out = Vec::new();
        for (gid, g) in self.replicas.iter() {
            let Some(target) = g.pending else { continue };
            let Some(&src) = g.members.iter().find(|b| self.registry.alive(b.node)) else {
                continue;
            };
            if let (Some(source), Some(dest)) =
                (self.block_grant(src, false), self.block_grant(target, true))
            {
                out.push(Effect::Copy {
                    group: gid,
                    source: Box::new(source),
                    target: Box::new(dest),
                });
            }
        }
        out
    }

    /// The copy into `target`, the pending copy of `group`, is complete and verified:
    /// it joins the group and the group's copies on dead nodes are freed. Stale
    /// reports (the group or copy is gone) are ignored. Returns revocations to send.
    pub fn repair_done(&mut self, group: u64, target: BlockId) -> Vec<Effect> {
        if self.replicas.get(group).and_then(|g| g.pending) != Some(target) {
            return Vec::new();
        }
        let Some(owner) = self.owner(target) else {
            return Vec::new();
        };
        self.log(Record::RepairDone { group, target });
        let registry = &self.registry;
        let gone = match self
            .replicas
            .promote(group, target, |b| !registry.alive(b.node))
        {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(group, "cannot complete re-replication: {e}");
                return Vec::new();
            }
        };
        self.replicas_rebuilt_total += 1;
        let bs = self.registry.block_size().unwrap_or(0);
        self.ns.remove_blocks(owner, &gone, bs);
        let pairs: Vec<(PathId, BlockId)> = gone.iter().map(|&b| (owner, b)).collect();
        let mut revs = Revocations::default();
        self.release_all(&pairs, &mut revs);
        let below = self
            .replicas
            .get(group)
            .is_some_and(|g| g.members.len() < usize::from(g.copies));
        if below {
            self.replicas.want_repair(group);
        }
        revs.into_effects()
    }

    /// The copy into `target` failed: the pending copy is freed and the group waits
    /// for the next tick to try again. Stale reports are ignored.
    pub fn repair_failed(&mut self, group: u64, target: BlockId) -> Vec<Effect> {
        if self.replicas.get(group).and_then(|g| g.pending) != Some(target) {
            return Vec::new();
        }
        let Some(owner) = self.owner(target) else {
            return Vec::new();
        };
        self.log(Record::RepairAbandoned { group, target });
        let bs = self.registry.block_size().unwrap_or(0);
        self.ns.remove_blocks(owner, &[target], bs);
        let mut revs = Revocations::default();
        self.release_all(&[(owner, target)], &mut revs);
        self.replicas.want_repair(group);
        revs.into_effects()
    }

    /// Replicated blocks (groups) with fewer live copies than wanted but at least one.
    pub(super) fn degraded_blocks(&self) -> u64 {
        self.replicas
            .iter()
            .filter(|(_, g)| {
                let live = g
                    .members
                    .iter()
                    .filter(|b| self.registry.alive(b.node))
                    .count();
                live > 0 && live < usize::from(g.copies)
            })
            .count() as u64
    }

    /// Blocks whose data is gone: unreplicated blocks on dead nodes and groups without
    /// a live copy.
    pub(super) fn lost_blocks(&self) -> u64 {
        if self.recovery_grace.is_some() {
            return 0;
        }
        let single: u64 = self
            .registry
            .iter()
            .filter(|n| !n.alive)
            .map(|n| {
                n.owned_indices()
                    .filter(|&index| {
                        self.replicas
                            .group_of(BlockId { node: n.id, index })
                            .is_none()
                    })
                    .count() as u64
            })
            .sum();
        let groups = self
            .replicas
            .iter()
            .filter(|(_, g)| g.members.iter().all(|b| !self.registry.alive(b.node)))
            .count() as u64;
        single + groups
    }

    /// Replica invariants, for tests: the copies of a group are on distinct nodes and
    /// owned by one path; no block is in two groups (by construction of the table).
    #[cfg(test)]
    pub(super) fn check_replica_invariants(
        &self,
        owner_of: &std::collections::HashMap<BlockId, PathId>,
    ) -> Result<(), String> {
        for (gid, g) in self.replicas.iter() {
            let copies: Vec<BlockId> = g.members.iter().copied().chain(g.pending).collect();
            let mut nodes: Vec<u32> = copies.iter().map(|b| b.node).collect();
            nodes.sort_unstable();
            nodes.dedup();
            if nodes.len() != copies.len() {
                return Err(format!(
                    "group {gid} has two copies on one node: {copies:?}"
                ));
            }
            let blocks = self.replicas.blocks(gid);
            if g.members.is_empty() {
                return Err(format!("group {gid} has no members"));
            }
            let owners: Vec<Option<&PathId>> = blocks.iter().map(|b| owner_of.get(b)).collect();
            if owners.iter().any(|o| o.is_none() || *o != owners[0]) {
                return Err(format!("group {gid} copies have owners {owners:?}"));
            }
        }
        Ok(())
    }
}
