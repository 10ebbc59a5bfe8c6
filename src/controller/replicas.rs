//! Replica groups: blocks that hold copies of the same data on different memory nodes.
//!
//! Every copy is an ordinary block owned by the object's path (listed in the
//! namespace, so quotas, freeing, removal and lease expiry treat copies like any
//! block). A group ties the copies together: `members` are the copies that hold the
//! data (the first live one is the primary), `pending` is a new copy being filled by
//! re-replication. Groups are identified by an id that stays the same while copies
//! come and go, so clients refresh their grant by group id.

use crate::proto::BlockId;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One replica group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    /// Copies wanted.
    pub copies: u8,
    /// The group's stable identity (its first copy at allocation). It stays owned by
    /// the path (and in the block index) after it left `members`, until the group is
    /// freed, so its id is never handed to another block while clients may name it.
    pub origin: BlockId,
    /// Copies that hold the data, in order (the first live one is the primary).
    pub members: Vec<BlockId>,
    /// A copy being filled by re-replication (written by clients, never read).
    pub pending: Option<BlockId>,
}

/// All replica groups, with the reverse index from block to group.
#[derive(Debug, Default)]
pub(crate) struct ReplicaTable {
    groups: BTreeMap<u64, Group>,
    of: HashMap<BlockId, u64>,
    next: u64,
    /// Groups to re-replicate (a copy died and no pending copy exists yet).
    needs_repair: BTreeSet<u64>,
}

impl ReplicaTable {
    /// Id the next group gets (ids start at 1; 0 means "unreplicated" on the wire).
    pub fn next_id(&self) -> u64 {
        self.next.max(1)
    }

    /// Makes the next group id at least `next` (snapshot restore).
    pub fn bump_next_id(&mut self, next: u64) {
        self.next = self.next.max(next);
    }

    /// Adds group `id` with `members`; fails if the id or a block is taken.
    pub fn insert(&mut self, id: u64, copies: u8, members: Vec<BlockId>) -> Result<(), String> {
        if id == 0 || self.groups.contains_key(&id) {
            return Err(format!("replica group {id} defined twice"));
        }
        if let Some(b) = members.iter().find(|b| self.of.contains_key(b)) {
            return Err(format!("block {b} is in two replica groups"));
        }
        for &b in &members {
            self.of.insert(b, id);
        }
        let origin = *members
            .first()
            .ok_or_else(|| format!("replica group {id} has no blocks"))?;
        self.groups.insert(
            id,
            Group {
                copies,
                origin,
                members,
                pending: None,
            },
        );
        self.next = self.next.max(id + 1).max(1);
        Ok(())
    }

    /// The group `block` belongs to (as member or pending copy).
    pub fn group_of(&self, block: BlockId) -> Option<u64> {
        self.of.get(&block).copied()
    }

    /// Group `id`.
    pub fn get(&self, id: u64) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// Every group, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Group)> {
        self.groups.iter().map(|(&id, g)| (id, g))
    }

    /// Every block of group `id`: members, pending copy, and the origin when it is
    /// no longer a member.
    pub fn blocks(&self, id: u64) -> Vec<BlockId> {
        self.groups.get(&id).map_or_else(Vec::new, |g| {
            let retired = (!g.members.contains(&g.origin)).then_some(g.origin);
            retired
                .into_iter()
                .chain(g.members.iter().copied())
                .chain(g.pending)
                .collect()
        })
    }

    /// Takes the origin of group `id` out of its members, keeping it indexed
    /// (snapshot restore of a group whose first copy was lost and replaced).
    pub fn retire_origin(&mut self, id: u64) {
        if let Some(g) = self.groups.get_mut(&id) {
            let origin = g.origin;
            g.members.retain(|&b| b != origin);
        }
    }

    /// Starts filling `target` as a new copy of group `id`.
    pub fn set_pending(&mut self, id: u64, target: BlockId) -> Result<(), String> {
        let g = self
            .groups
            .get_mut(&id)
            .ok_or_else(|| format!("unknown replica group {id}"))?;
        if g.pending.is_some() || self.of.contains_key(&target) {
            return Err(format!("replica group {id} is already being repaired"));
        }
        g.pending = Some(target);
        self.of.insert(target, id);
        self.needs_repair.remove(&id);
        Ok(())
    }

    /// The pending copy `target` of group `id` is in sync: it becomes a member, and
    /// the members `dead` says are gone leave the group. Returns those members, except
    /// the origin, which stays owned (and indexed) until the group is freed.
    pub fn promote(
        &mut self,
        id: u64,
        target: BlockId,
        dead: impl Fn(BlockId) -> bool,
    ) -> Result<Vec<BlockId>, String> {
        let g = self
            .groups
            .get_mut(&id)
            .ok_or_else(|| format!("unknown replica group {id}"))?;
        if g.pending != Some(target) {
            return Err(format!(
                "block {target} is not the pending copy of group {id}"
            ));
        }
        g.pending = None;
        let gone: Vec<BlockId> = g.members.iter().copied().filter(|&b| dead(b)).collect();
        g.members.retain(|&b| !dead(b));
        g.members.push(target);
        let origin = g.origin;
        let gone: Vec<BlockId> = gone.into_iter().filter(|&b| b != origin).collect();
        for b in &gone {
            self.of.remove(b);
        }
        Ok(gone)
    }

    /// Removes `block` from its group (freed); a group left empty disappears.
    pub fn forget(&mut self, block: BlockId) {
        let Some(id) = self.of.remove(&block) else {
            return;
        };
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.members.retain(|&b| b != block);
        if g.pending == Some(block) {
            g.pending = None;
        }
        let origin_held = self.of.get(&g.origin) == Some(&id);
        if g.members.is_empty() && g.pending.is_none() && !origin_held {
            self.groups.remove(&id);
            self.needs_repair.remove(&id);
        }
    }

    /// Marks group `id` for re-replication.
    pub fn want_repair(&mut self, id: u64) {
        if self.groups.contains_key(&id) {
            self.needs_repair.insert(id);
        }
    }

    /// Takes the groups marked for re-replication.
    pub fn take_repairs(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.needs_repair).into_iter().collect()
    }

    /// Groups marked for re-replication.
    #[cfg(test)]
    pub fn repairs_waiting(&self) -> usize {
        self.needs_repair.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(node: u32, index: u32) -> BlockId {
        BlockId { node, index }
    }

    #[test]
    fn groups_track_members_pending_and_forget() {
        let mut t = ReplicaTable::default();
        assert_eq!(t.next_id(), 1);
        t.insert(1, 2, vec![b(1, 0), b(2, 0)]).unwrap();
        assert!(t.insert(1, 2, vec![b(3, 0)]).is_err(), "id reused");
        assert!(t.insert(2, 2, vec![b(1, 0)]).is_err(), "block reused");
        assert_eq!(t.next_id(), 2);
        assert_eq!(t.group_of(b(2, 0)), Some(1));
        t.want_repair(1);
        assert_eq!(t.repairs_waiting(), 1);
        t.set_pending(1, b(3, 0)).unwrap();
        assert_eq!(t.repairs_waiting(), 0);
        assert!(t.set_pending(1, b(3, 1)).is_err(), "one repair at a time");
        assert_eq!(t.blocks(1), vec![b(1, 0), b(2, 0), b(3, 0)]);
        assert!(t.promote(1, b(3, 1), |_| false).is_err());
        // The origin (first copy) stays indexed when it dies.
        let gone = t.promote(1, b(3, 0), |x| x.node == 1).unwrap();
        assert!(gone.is_empty());
        assert_eq!(t.get(1).unwrap().members, vec![b(2, 0), b(3, 0)]);
        assert_eq!(t.group_of(b(1, 0)), Some(1));
        assert_eq!(t.blocks(1), vec![b(1, 0), b(2, 0), b(3, 0)]);
        // Another member that dies leaves for good.
        t.set_pending(1, b(4, 0)).unwrap();
        let gone = t.promote(1, b(4, 0), |x| x.node == 2).unwrap();
        assert_eq!(gone, vec![b(2, 0)]);
        assert_eq!(t.group_of(b(2, 0)), None);
        t.forget(b(3, 0));
        t.forget(b(4, 0));
        assert!(t.get(1).is_some(), "origin still held");
        t.forget(b(1, 0));
        assert!(t.get(1).is_none(), "empty group dropped");
    }
}
