//! Property test: random operation sequences against the state machine keep its
//! invariants.
//!
//! Checked after every step: no block is owned twice; per node, free + owned +
//! revoking (+ retired) = total; every path's `subtree_bytes` equals the bytes of the
//! blocks at and below it; block epochs never decrease; a block is never handed out
//! while a revocation for it is pending, and every re-grant carries a strictly newer
//! epoch and its matching key.
//!
//! The state journals every change while it runs; at the end, replaying the whole
//! journal, and replaying its second half on a snapshot taken halfway, must both
//! reproduce the state exactly (`ControllerState::snapshot` equality).

use super::journal::{Record, Snapshot};
use super::state::{ControllerState, Effect, StateConfig};
use crate::proto::grant::WireTransport;
use crate::proto::{derive_key, BlockId, ControlError, Placement, PoolPath, Register, Secret};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const BS: u64 = 4096;
const SECRET: Secret = Secret([3; 16]);
const PATHS: [&str; 7] = ["/a", "/a/x", "/a/x/1", "/a/x/2", "/a/y", "/b", "/b/z"];

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        path: usize,
        blocks: u64,
        placement: u8,
    },
    Free {
        path: usize,
        pick: u8,
    },
    FreeWrong {
        path: usize,
        other: usize,
    },
    Confirm {
        pick: usize,
        stale: bool,
    },
    Remove {
        path: usize,
    },
    Renew {
        path: usize,
    },
    Tick {
        advance_ms: u64,
    },
    Heartbeats,
    Lose {
        node: usize,
    },
    Resume {
        node: usize,
    },
    Quota {
        path: usize,
        blocks: Option<u64>,
    },
    Pin {
        path: usize,
        pinned: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let path = 0..PATHS.len();
    prop_oneof![
        4 => (path.clone(), 1u64..5, 0u8..6).prop_map(|(path, blocks, placement)| Op::Alloc {
            path,
            blocks,
            placement
        }),
        3 => (path.clone(), any::<u8>()).prop_map(|(path, pick)| Op::Free { path, pick }),
        1 => (path.clone(), path.clone()).prop_map(|(path, other)| Op::FreeWrong { path, other }),
        3 => (any::<usize>(), prop::bool::weighted(0.2))
            .prop_map(|(pick, stale)| Op::Confirm { pick, stale }),
        1 => path.clone().prop_map(|path| Op::Remove { path }),
        2 => path.clone().prop_map(|path| Op::Renew { path }),
        2 => (0u64..8000).prop_map(|advance_ms| Op::Tick { advance_ms }),
        2 => Just(Op::Heartbeats),
        1 => (0usize..3).prop_map(|node| Op::Lose { node }),
        1 => (0usize..3).prop_map(|node| Op::Resume { node }),
        1 => (path.clone(), prop::option::of(0u64..12)).prop_map(|(path, blocks)| Op::Quota { path, blocks }),
        1 => (path, any::<bool>()).prop_map(|(path, pinned)| Op::Pin { path, pinned }),
    ]
}

/// What the test has observed, to check history-dependent properties.
struct Model {
    /// Revocations sent and not yet confirmed: (node, index, new epoch).
    pending: Vec<(u32, u32, u32)>,
    /// Highest epoch seen per block (grants and revocations).
    epochs: HashMap<BlockId, u32>,
    /// Epoch of the latest grant per block.
    granted: HashMap<BlockId, u32>,
}

impl Model {
    fn absorb(&mut self, effects: &[Effect]) -> Result<(), TestCaseError> {
        for e in effects {
            if let Effect::Revoke { node, blocks } = e {
                for &(index, epoch) in blocks {
                    let id = BlockId { node: *node, index };
                    let prev = self.epochs.insert(id, epoch).unwrap_or(0);
                    prop_assert!(epoch > prev, "revocation epoch {epoch} after {prev}");
                    self.pending.push((*node, index, epoch));
                }
            }
        }
        Ok(())
    }
}

fn node_reg(blocks: u64) -> Register {
    Register {
        data_addr: "mem:1".into(),
        transport: WireTransport::Shm,
        capacity: blocks * BS,
        block_size: BS,
        hugepages: false,
        locked: false,
    }
}

fn run(nodes: Vec<u64>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let mut now = t0;
    let cfg = StateConfig {
        lease: Duration::from_secs(10),
        grace: Duration::from_secs(2),
        dead_after: Duration::from_secs(3600),
        grant_ttl: Duration::from_secs(10),
    };
    let mut st = ControllerState::new(cfg, SECRET, t0);
    st.enable_journal();
    let ids: Vec<u32> = nodes
        .iter()
        .enumerate()
        .map(|(i, &n)| st.join_node(&node_reg(n), i as u64 + 1, t0).map(|j| j.id))
        .collect::<Result<_, _>>()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut log: Vec<Record> = st.take_journal();
    let half = ops.len() / 2;
    let mut mid: Option<(Snapshot, usize)> = None;
    let mut model = Model {
        pending: Vec::new(),
        epochs: HashMap::new(),
        granted: HashMap::new(),
    };
    let path = |i: usize| PoolPath::parse(PATHS[i % PATHS.len()]).unwrap();

    for (step, op) in ops.into_iter().enumerate() {
        if step == half {
            mid = Some((st.snapshot(), log.len()));
        }
        match op {
            Op::Alloc {
                path: pi,
                blocks,
                placement,
            } => {
                let placement = match placement {
                    0 | 1 => Placement::LeastLoaded,
                    2 | 3 => Placement::Spread,
                    n => Placement::Node(ids[usize::from(n) % ids.len()]),
                };
                let before = st.status(now).used_bytes;
                match st.alloc(&path(pi), blocks * BS, placement, now) {
                    Ok(grants) => {
                        prop_assert_eq!(grants.len() as u64, blocks);
                        for g in grants {
                            let pending = model
                                .pending
                                .iter()
                                .any(|&(n, i, _)| n == g.block.node && i == g.block.index);
                            prop_assert!(!pending, "{} handed out while revoking", g.block);
                            if let Some(&prev) = model.granted.get(&g.block) {
                                prop_assert!(g.epoch > prev, "re-grant without new epoch");
                            }
                            prop_assert_eq!(
                                g.key,
                                derive_key(&SECRET, g.block.node, g.block.index, g.epoch, true)
                            );
                            model.granted.insert(g.block, g.epoch);
                            let seen = model.epochs.entry(g.block).or_insert(g.epoch);
                            prop_assert!(g.epoch >= *seen);
                            *seen = g.epoch;
                        }
                    }
                    Err(
                        ControlError::NoCapacity { .. }
                        | ControlError::NoSuchNode(_)
                        | ControlError::QuotaExceeded { .. },
                    ) => {
                        prop_assert_eq!(st.status(now).used_bytes, before, "all or nothing");
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("alloc: {e}"))),
                }
            }
            Op::Free { path: pi, pick } => {
                let Ok(owned) = st.lookup(&path(pi), true) else {
                    continue;
                };
                let chosen: Vec<BlockId> = owned
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| pick & (1 << (i % 8)) != 0)
                    .map(|(_, g)| g.block)
                    .collect();
                let effects = st
                    .free(&path(pi), &chosen)
                    .map_err(|e| TestCaseError::fail(format!("free: {e}")))?;
                model.absorb(&effects)?;
            }
            Op::FreeWrong { path: pi, other } => {
                if path(pi) == path(other) {
                    continue;
                }
                let Ok(owned) = st.lookup(&path(pi), true) else {
                    continue;
                };
                if let Some(g) = owned.first() {
                    let r = st.free(&path(other), &[g.block]);
                    let is_not_owner = matches!(r, Err(ControlError::NotOwner { .. }));
                    prop_assert!(is_not_owner, "{:?}", r);
                }
            }
            Op::Confirm { pick, stale } => {
                if model.pending.is_empty() {
                    continue;
                }
                let i = pick % model.pending.len();
                let (node, index, epoch) = model.pending[i];
                if stale {
                    prop_assert_eq!(st.revoked(node, &[(index, epoch - 1)]), 0);
                } else {
                    model.pending.swap_remove(i);
                    let live = st.registry().get(node).is_some_and(|n| n.alive);
                    let freed = st.revoked(node, &[(index, epoch)]);
                    prop_assert_eq!(freed, usize::from(live));
                }
            }
            Op::Remove { path: pi } => match st.remove(&path(pi)) {
                Ok((_, effects)) => model.absorb(&effects)?,
                Err(ControlError::NotFound(_)) => {}
                Err(e) => return Err(TestCaseError::fail(format!("remove: {e}"))),
            },
            Op::Renew { path: pi } => {
                let _ = st.renew(&path(pi), now);
            }
            Op::Tick { advance_ms } => {
                now += Duration::from_millis(advance_ms);
                let effects = st.tick(now);
                model.absorb(&effects)?;
            }
            Op::Heartbeats => {
                for &n in &ids {
                    let _ = st.heartbeat(n, Default::default(), now);
                }
            }
            Op::Lose { node } => {
                let n = ids[node % ids.len()];
                st.node_lost(n);
                // A dead node's pending revocations are void.
                model.pending.retain(|&(pn, _, _)| pn != n);
            }
            Op::Resume { node } => {
                let i = node % nodes.len();
                if let Ok(j) = st.join_node(&node_reg(nodes[i]), i as u64 + 1, now) {
                    for e in &j.effects {
                        if let Effect::Revoke { node, blocks } = e {
                            prop_assert!(j.resumed);
                            for &(index, epoch) in blocks {
                                let id = BlockId { node: *node, index };
                                let prev = model.epochs.insert(id, epoch).unwrap_or(0);
                                prop_assert!(epoch >= prev, "resume revokes at an older epoch");
                                model.pending.push((*node, index, epoch));
                            }
                        }
                    }
                }
            }
            Op::Pin { path: pi, pinned } => match st.pin(&path(pi), pinned) {
                Ok(()) | Err(ControlError::NotFound(_)) => {}
                Err(e) => return Err(TestCaseError::fail(format!("pin: {e}"))),
            },
            Op::Quota { path: pi, blocks } => {
                st.set_quota(&path(pi), blocks.map(|b| b * BS), now)
                    .map_err(|e| TestCaseError::fail(format!("quota: {e}")))?;
            }
        }
        log.extend(st.take_journal());
        st.check_invariants().map_err(TestCaseError::fail)?;
        // Epochs never decrease.
        for (&b, &e) in &model.epochs {
            if let Some((_, now_epoch)) = st.registry().get(b.node).and_then(|n| n.block(b.index)) {
                prop_assert!(
                    now_epoch >= e,
                    "epoch of {} went from {} to {}",
                    b,
                    e,
                    now_epoch
                );
            }
        }
        // Every pending revocation is still revoking at that epoch.
        let pending: HashSet<_> = model.pending.iter().collect();
        for &&(n, i, e) in &pending {
            let state = st.registry().get(n).and_then(|node| node.block(i));
            prop_assert!(
                matches!(state, Some((super::registry::BlockState::Revoking, ep)) if ep == e),
                "n{}/b{} should be revoking at {}: {:?}",
                n,
                i,
                e,
                state
            );
        }
    }
    // Replaying the journal reproduces the state, from scratch and from a snapshot.
    let want = st.snapshot();
    let replayed = ControllerState::recover(cfg, SECRET, None, &log, now)
        .map_err(|e| TestCaseError::fail(format!("replay: {e}")))?;
    replayed.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(
        &replayed.snapshot(),
        &want,
        "replay of {} records",
        log.len()
    );
    if let Some((snap, at)) = mid {
        let resumed = ControllerState::recover(cfg, SECRET, Some(&snap), &log[at..], now)
            .map_err(|e| TestCaseError::fail(format!("snapshot + replay: {e}")))?;
        resumed.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert_eq!(&resumed.snapshot(), &want, "snapshot + replay");
    }
    // Quiesce: confirm everything, expire everything; the pool must be empty again.
    for (n, i, e) in std::mem::take(&mut model.pending) {
        st.revoked(n, &[(i, e)]);
    }
    for pi in 0..PATHS.len() {
        let _ = st.pin(&path(pi), false);
    }
    now += Duration::from_secs(60);
    st.tick(now);
    let status = st.status(now);
    prop_assert!(status.paths.is_empty());
    prop_assert_eq!(status.used_bytes, 0);
    prop_assert_eq!(
        status.blocks_allocated_total,
        status.blocks_freed_total,
        "every allocated block was freed"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn allocator_invariants_hold(
        nodes in prop::collection::vec(1u64..7, 1..=3),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run(nodes, ops)?;
    }
}
