//! Snapshots of the controller's state and its recovery: rebuilding the state from a
//! snapshot plus the journal records written after it, by replaying them through the
//! same state operations (see `docs/ARCHITECTURE.md`, "Metadata recovery").

use super::*;

impl ControllerState {
    /// The whole metadata (nodes with their block tables, paths with their quotas and
    /// blocks), from which [`ControllerState::recover`] rebuilds this state.
    pub fn snapshot(&self) -> Snapshot {
        let mut paths: Vec<SnapPath> = self
            .ns
            .iter()
            .filter(|&(id, n)| id != ROOT || n.quota.is_some())
            .map(|(_, n)| SnapPath {
                path: n.path.clone(),
                quota: n.quota,
                blocks: n.blocks.clone(),
                pinned: n.pinned,
            })
            .collect();
        paths.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        let mut mappings: Vec<(PoolPath, Backing)> = self
            .ns
            .iter()
            .filter_map(|(_, n)| Some((n.path.clone(), n.backing.clone()?)))
            .collect();
        mappings.sort_unstable();
        Snapshot {
            next_node_id: self.registry.next_id(),
            nodes: self.registry.iter().map(|n| n.snapshot()).collect(),
            paths,
            groups: self
                .replicas
                .iter()
                .map(|(id, g)| SnapGroup {
                    id,
                    copies: g.copies,
                    origin: g.origin,
                    members: g.members.clone(),
                    pending: g.pending,
                })
                .collect(),
            next_group: self.replicas.next_id(),
            mappings,
            next_fence: self.fences.next_token(),
            fences: self.fences.snapshot(),
        }
    }

    /// Rebuilds a state from a snapshot (if any) and the log records written after it,
    /// as of `now`. Every path's lease is re-armed to run from `now`. Memory nodes are
    /// *not* yet declared dead here (see [`ControllerState::finish_recovery`]), so the
    /// result equals the state that wrote the records. Fails with a description of the
    /// first record that does not fit (a damaged or foreign log).
    pub fn recover(
        cfg: StateConfig,
        secret: Secret,
        snapshot: Option<&Snapshot>,
        records: &[Record],
        now: Instant,
    ) -> Result<Self, String> {
        let mut st = Self::new(cfg, secret, now);
        if let Some(snap) = snapshot {
            st.restore(snap, now)?;
        }
        for (i, r) in records.iter().enumerate() {
            st.apply(r, now)
                .map_err(|e| format!("log record {i} ({r:?}) does not apply: {e}"))?;
        }
        st.registry.rebuild_free_lists();
        st.blocks_allocated_total = 0;
        st.blocks_freed_total = 0;
        st.blocks_expired_total = 0;
        Ok(st)
    }

    /// After [`ControllerState::recover`]: every memory node counts as dead until it
    /// re-registers with its incarnation (then [`ControllerState::join_node`] resumes
    /// it and revokes its unowned blocks anew), so nothing is allocated on a node that
    /// may be gone. Each node gets `dead_after` from `now` before a dead node without
    /// data is dropped by [`ControllerState::tick`].
    pub fn finish_recovery(&mut self, now: Instant) {
        // Nodes get two dead-after periods to come back before their blocks count as
        // lost and their replicas are re-created elsewhere.
        self.recovery_grace = Some(later(now, self.cfg.dead_after * 2));
        let ids: Vec<u32> = self.registry.iter().map(|n| n.id).collect();
        for id in ids {
            self.registry.kill(id);
            if let Some(n) = self.registry.get_mut(id) {
                n.last_heartbeat = now;
            }
        }
    }

    fn restore(&mut self, snap: &Snapshot, now: Instant) -> Result<(), String> {
        let deadline = self.lease_deadline(now);
        let mut owners: HashMap<u32, HashMap<u32, PathId>> = HashMap::new();
        let mut ids = Vec::with_capacity(snap.paths.len());
        for p in &snap.paths {
            let id = if p.path.is_root() {
                ROOT
            } else {
                self.ns
                    .ensure(&p.path, deadline)
                    .map_err(|e| e.to_string())?
            };
            self.ns.set_quota(id, p.quota);
            if p.pinned && id != ROOT {
                self.ns.set_pinned(id, true);
            }
            for b in &p.blocks {
                if owners
                    .entry(b.node)
                    .or_default()
                    .insert(b.index, id)
                    .is_some()
                {
                    return Err(format!("block {b} is listed by two paths"));
                }
            }
            ids.push(id);
        }
        for n in &snap.nodes {
            let empty = HashMap::new();
            let o = owners.get(&n.info.id).unwrap_or(&empty);
            self.registry.restore(n, o, now)?;
        }
        if let Some(node) = owners.keys().find(|&&n| self.registry.get(n).is_none()) {
            return Err(format!("paths own blocks of unknown node {node}"));
        }
        for (path, backing) in &snap.mappings {
            let id = self
                .ns
                .find(path)
                .ok_or_else(|| format!("mapped path {path} is not in the snapshot"))?;
            self.ns.set_backing(id, Some(backing.clone()));
        }
        self.registry.bump_next_id(snap.next_node_id);
        self.fences.restore(snap.next_fence, &snap.fences, now);
        let bs = self.registry.block_size().unwrap_or(0);
        for (p, id) in snap.paths.iter().zip(ids) {
            self.ns.add_blocks(id, &p.blocks, bs);
        }
        for g in &snap.groups {
            let mut blocks = vec![g.origin];
            blocks.extend(g.members.iter().copied().filter(|&b| b != g.origin));
            self.replicas.insert(g.id, g.copies, blocks)?;
            if !g.members.contains(&g.origin) {
                // A retired origin: indexed, not a member.
                self.replicas.retire_origin(g.id);
            }
            if let Some(t) = g.pending {
                self.replicas.set_pending(g.id, t)?;
            }
        }
        if snap.next_group > self.replicas.next_id() {
            self.replicas.bump_next_id(snap.next_group);
        }
        Ok(())
    }

    /// Replays one record (journal off, so nothing is logged again).
    fn apply(&mut self, r: &Record, now: Instant) -> Result<(), String> {
        let e = |e: ControlError| e.to_string();
        match r {
            Record::NodeRegistered(info) => self.registry.insert_logged(info, now),
            Record::NodeResumed {
                id,
                data_addr,
                hugepages,
                locked,
            } => self
                .registry
                .resume(*id, data_addr, *hugepages, *locked, now)
                .map(|_| ())
                .ok_or_else(|| format!("unknown node {id}")),
            Record::NodeDead { id } => {
                if self.registry.get(*id).is_none() {
                    return Err(format!("unknown node {id}"));
                }
                self.registry.kill(*id);
                Ok(())
            }
            Record::NodeDropped { id } => {
                // Releases replayed before this record may have dropped it already.
                if self.registry.get(*id).is_some() && !self.registry.drop_if_empty(*id) {
                    return Err(format!("node {id} still holds data"));
                }
                Ok(())
            }
            Record::Opened { path } => self.open(path, now).map_err(e),
            Record::Quota { path, bytes } => self.set_quota(path, *bytes, now).map_err(e),
            Record::Alloc { path, blocks } => {
                let path = canonical(path).map_err(e)?;
                let id = self.open_id(&path, now).map_err(e)?;
                let bs = self
                    .registry
                    .block_size()
                    .ok_or("allocation without memory nodes")?;
                let mut ids = Vec::with_capacity(blocks.len());
                for &(node, index, epoch) in blocks {
                    self.registry.assign(node, index, id, epoch)?;
                    ids.push(BlockId { node, index });
                }
                self.ns.add_blocks(id, &ids, bs);
                Ok(())
            }
            Record::Free { path, blocks } => self.free(path, blocks).map(|_| ()).map_err(e),
            Record::Remove { path } => self.remove(path).map(|_| ()).map_err(e),
            Record::Confirmed { node, blocks } => {
                self.revoked(*node, blocks);
                Ok(())
            }
            Record::Pin { path, pinned } => self.pin(path, *pinned).map_err(e),
            Record::Replicas { groups } => {
                for (id, copies, members) in groups {
                    self.replicas.insert(*id, *copies, members.clone())?;
                }
                Ok(())
            }
            Record::RepairStarted {
                path,
                group,
                target,
            } => self.apply_repair_started(path, *group, *target),
            Record::RepairDone { group, target } => {
                self.repair_done(*group, *target);
                Ok(())
            }
            Record::RepairAbandoned { group, target } => {
                self.repair_failed(*group, *target);
                Ok(())
            }
            Record::Map { path, backing } => self.map(path, backing.clone()).map_err(e),
            Record::Fenced {
                path,
                token,
                ttl_ms,
            } => {
                let ttl =
                    Duration::from_millis(*ttl_ms).min(crate::controller::fence::MAX_FENCE_TTL);
                self.fences.grant(path, *token, ttl, now);
                Ok(())
            }
            Record::Unfenced { path, token } => {
                self.fences.release(path, *token);
                Ok(())
            }
        }
    }
}
