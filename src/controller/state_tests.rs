//! Unit tests of the controller state machine (no sockets).

use super::state::{ControllerState, Effect, Removal, StateConfig};
use crate::proto::grant::WireTransport;
use crate::proto::{
    derive_key, BlockGrant, BlockId, ControlError, PathError, Placement, PoolPath, Register,
    Request, Response, Secret,
};
use farpool_rdma::access::grant_mac;
use std::time::{Duration, Instant};

const BS: u64 = 4096;
const SECRET: Secret = Secret([7; 16]);

fn p(s: &str) -> PoolPath {
    PoolPath::parse(s).unwrap()
}

fn reg(blocks: u64) -> Register {
    Register {
        data_addr: "10.0.0.1:9000".into(),
        transport: WireTransport::Soft,
        capacity: blocks * BS,
        block_size: BS,
        hugepages: false,
        locked: true,
    }
}

/// Grants for the same blocks, epochs, places and rights, each a valid capability (keys
/// differ when the grants were issued in different seconds: later expiry, later MAC).
fn assert_same_grants(a: &[BlockGrant], b: &[BlockGrant]) {
    let strip = |g: &BlockGrant| {
        let block_key = derive_key(&SECRET, g.block.node, g.block.index, g.epoch, g.writable);
        assert_eq!(g.key, grant_mac(block_key, g.expiry), "{g:?}");
        (
            g.block,
            g.endpoint.clone(),
            g.offset,
            g.len,
            g.epoch,
            g.writable,
        )
    };
    assert_eq!(
        a.iter().map(strip).collect::<Vec<_>>(),
        b.iter().map(strip).collect::<Vec<_>>()
    );
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A state with nodes of the given block counts, registered at `t0`.
fn setup(nodes: &[u64]) -> (ControllerState, Instant, Vec<u32>) {
    let t0 = Instant::now();
    let mut st = ControllerState::new(
        StateConfig {
            lease: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            dead_after: ms(1500),
            ..StateConfig::default()
        },
        SECRET,
        t0,
    );
    let ids = nodes
        .iter()
        .map(|&n| st.register_node(&reg(n), t0).unwrap())
        .collect();
    (st, t0, ids)
}

fn free_on(st: &ControllerState, node: u32, now: Instant) -> u64 {
    st.status(now)
        .nodes
        .iter()
        .find(|n| n.endpoint.node == node)
        .map(|n| n.blocks_free)
        .unwrap()
}

/// Heartbeats every live node, then ticks.
fn beat_and_tick(st: &mut ControllerState, now: Instant) -> Vec<Effect> {
    let nodes: Vec<u32> = st
        .status(now)
        .nodes
        .iter()
        .map(|n| n.endpoint.node)
        .collect();
    for n in nodes {
        let _ = st.heartbeat(n, Default::default(), now);
    }
    st.tick(now)
}

fn block_ids(grants: &[BlockGrant]) -> Vec<BlockId> {
    grants.iter().map(|g| g.block).collect()
}

fn usage(st: &ControllerState, now: Instant, path: &str) -> Option<(u64, u64)> {
    st.status(now)
        .paths
        .iter()
        .find(|u| u.path.as_str() == path)
        .map(|u| (u.blocks, u.subtree_bytes))
}

#[test]
fn usage_is_summed_up_the_tree_and_remove_frees_subtrees() {
    let (mut st, t0, _) = setup(&[16]);
    st.alloc(&p("/j/s/t1"), 2 * BS, Placement::default(), t0)
        .unwrap();
    st.alloc(&p("/j/s/t2"), 1, Placement::default(), t0)
        .unwrap();
    st.alloc(&p("/j"), BS, Placement::default(), t0).unwrap();
    st.check_invariants().unwrap();

    let status = st.status(t0);
    let order: Vec<&str> = status.paths.iter().map(|u| u.path.as_str()).collect();
    assert_eq!(order, ["/j", "/j/s", "/j/s/t1", "/j/s/t2"]);
    assert_eq!(usage(&st, t0, "/j"), Some((1, 4 * BS)));
    assert_eq!(usage(&st, t0, "/j/s"), Some((0, 3 * BS)));
    assert_eq!(usage(&st, t0, "/j/s/t1"), Some((2, 2 * BS)));
    assert_eq!(status.used_bytes, 4 * BS);
    assert_eq!(status.blocks_allocated_total, 4);
    assert_eq!(status.capacity_bytes, 16 * BS);

    let (removed, effects) = st.remove(&p("/j/s")).unwrap();
    assert_eq!(
        removed,
        Removal {
            blocks: 3,
            paths: 3
        }
    );
    let revoked: usize = effects
        .iter()
        .map(|e| match e {
            Effect::Revoke { blocks, .. } => blocks.len(),
            Effect::NodeDead { .. } | Effect::Copy { .. } | Effect::Flush { .. } => 0,
        })
        .sum();
    assert_eq!(revoked, 3);
    assert_eq!(usage(&st, t0, "/j"), Some((1, BS)));
    assert_eq!(usage(&st, t0, "/j/s"), None);
    assert_eq!(st.status(t0).blocks_freed_total, 3);
    st.check_invariants().unwrap();

    assert!(matches!(
        st.remove(&PoolPath::root()),
        Err(ControlError::BadRequest(_))
    ));
    assert_eq!(
        st.remove(&p("/nope")),
        Err(ControlError::NotFound(p("/nope")))
    );
    // open creates paths without blocks.
    st.open(&p("/k/l"), t0).unwrap();
    assert_eq!(usage(&st, t0, "/k/l"), Some((0, 0)));
}

#[test]
fn quotas_apply_to_the_path_and_every_ancestor() {
    let (mut st, t0, ids) = setup(&[16]);
    st.set_quota(&p("/j"), Some(3 * BS), t0).unwrap();
    assert_eq!(st.status(t0).paths[0].quota, Some(3 * BS));
    st.alloc(&p("/j/a"), 2 * BS, Placement::default(), t0)
        .unwrap();
    let before = free_on(&st, ids[0], t0);
    let err = st
        .alloc(&p("/j/b/c"), 2 * BS, Placement::default(), t0)
        .unwrap_err();
    assert_eq!(
        err,
        ControlError::QuotaExceeded {
            path: p("/j"),
            quota: 3 * BS,
            used: 2 * BS,
            requested: 2 * BS,
        }
    );
    assert_eq!(free_on(&st, ids[0], t0), before, "nothing taken");
    // A quota on the task itself.
    st.set_quota(&p("/j/b/c"), Some(0), t0).unwrap();
    assert!(matches!(
        st.alloc(&p("/j/b/c"), 1, Placement::default(), t0),
        Err(ControlError::QuotaExceeded { path, .. }) if path == p("/j/b/c")
    ));
    st.set_quota(&p("/j/b/c"), None, t0).unwrap();
    st.alloc(&p("/j/b/c"), 1, Placement::default(), t0).unwrap();
    st.set_quota(&p("/j"), None, t0).unwrap();
    st.alloc(&p("/j/b/c"), 4 * BS, Placement::default(), t0)
        .unwrap();
    st.check_invariants().unwrap();
}

#[test]
fn allocation_is_all_or_nothing_and_validated() {
    let (mut st, t0, ids) = setup(&[4, 4]);
    let err = st
        .alloc(&p("/j/t"), 9 * BS, Placement::default(), t0)
        .unwrap_err();
    assert_eq!(
        err,
        ControlError::NoCapacity {
            requested: 9 * BS,
            free: 8 * BS
        }
    );
    assert_eq!(free_on(&st, ids[0], t0) + free_on(&st, ids[1], t0), 8);
    assert_eq!(st.status(t0).blocks_allocated_total, 0);
    let grants = st
        .alloc(&p("/j/t"), 7 * BS + 1, Placement::default(), t0)
        .unwrap();
    assert_eq!(grants.len(), 8, "rounded up to whole blocks");
    assert!(grants.iter().all(|g| g.len == BS && g.writable));
    assert_eq!(
        st.alloc(&p("/j/t"), 1, Placement::default(), t0),
        Err(ControlError::NoCapacity {
            requested: BS,
            free: 0
        })
    );
    assert!(matches!(
        st.alloc(&p("/j/t"), 0, Placement::default(), t0),
        Err(ControlError::BadRequest(_))
    ));
    assert!(matches!(
        st.alloc(&p("/j/t"), u64::MAX, Placement::default(), t0),
        Err(ControlError::BadRequest(_))
    ));
    assert_eq!(
        st.alloc(&PoolPath::root(), 1, Placement::default(), t0),
        Err(ControlError::BadPath(PathError::Root))
    );
    let (mut empty, t0, _) = setup(&[]);
    assert!(matches!(
        empty.alloc(&p("/j"), 1, Placement::default(), t0),
        Err(ControlError::NoCapacity { free: 0, .. })
    ));
}

#[test]
fn grants_carry_endpoint_offset_and_key() {
    let (mut st, t0, ids) = setup(&[4]);
    let g = st
        .alloc(&p("/j"), 3 * BS, Placement::default(), t0)
        .unwrap();
    for (i, g) in g.iter().enumerate() {
        assert_eq!(g.block.node, ids[0]);
        assert_eq!(g.offset, u64::from(g.block.index) * BS);
        assert_eq!(g.block.index as usize, i);
        assert_eq!(g.epoch, super::INITIAL_EPOCH);
        assert_eq!(g.endpoint.addr, "10.0.0.1:9000");
        assert_eq!(g.endpoint.node, ids[0]);
        // Soft grants are capabilities: a MAC of the block key over an expiry.
        assert!(g.expiry > 0);
        let block_key = derive_key(&SECRET, ids[0], g.block.index, 1, true);
        assert_eq!(g.key, grant_mac(block_key, g.expiry));
    }
}

#[test]
fn placement_policies() {
    // Least loaded: always the node with most free blocks, ties to the lowest id.
    let (mut st, t0, ids) = setup(&[4, 8]);
    let g = st.alloc(&p("/a"), BS, Placement::LeastLoaded, t0).unwrap();
    assert_eq!(g[0].block.node, ids[1]);
    st.alloc(&p("/a"), 5 * BS, Placement::LeastLoaded, t0)
        .unwrap();
    assert_eq!(free_on(&st, ids[0], t0), 3);
    assert_eq!(free_on(&st, ids[1], t0), 3);

    // Spread: round robin across live nodes with free blocks, continuing across calls.
    let (mut st, t0, ids) = setup(&[4, 4, 4]);
    let g = st.alloc(&p("/s"), 6 * BS, Placement::Spread, t0).unwrap();
    let nodes: Vec<u32> = g.iter().map(|g| g.block.node).collect();
    assert_eq!(nodes, [ids[0], ids[1], ids[2], ids[0], ids[1], ids[2]]);
    let g = st.alloc(&p("/s"), BS, Placement::Spread, t0).unwrap();
    assert_eq!(g[0].block.node, ids[0]);
    // Spread skips full nodes.
    st.alloc(&p("/s"), 2 * BS, Placement::Node(ids[1]), t0)
        .unwrap();
    let g = st.alloc(&p("/s"), 3 * BS, Placement::Spread, t0).unwrap();
    assert!(g.iter().all(|g| g.block.node != ids[1]));

    // Named node.
    let (mut st, t0, ids) = setup(&[4, 4]);
    let g = st
        .alloc(&p("/n"), 3 * BS, Placement::Node(ids[1]), t0)
        .unwrap();
    assert!(g.iter().all(|g| g.block.node == ids[1]));
    assert_eq!(
        st.alloc(&p("/n"), 2 * BS, Placement::Node(ids[1]), t0),
        Err(ControlError::NoCapacity {
            requested: 2 * BS,
            free: BS
        })
    );
    assert_eq!(
        st.alloc(&p("/n"), BS, Placement::Node(99), t0),
        Err(ControlError::NoSuchNode(99))
    );
    st.node_lost(ids[0]);
    assert_eq!(
        st.alloc(&p("/n"), BS, Placement::Node(ids[0]), t0),
        Err(ControlError::NoSuchNode(ids[0]))
    );
    st.check_invariants().unwrap();
}

#[test]
fn freed_blocks_are_reused_only_after_revocation_is_confirmed() {
    let (mut st, t0, ids) = setup(&[1]);
    let n = ids[0];
    let first = st.alloc(&p("/a"), BS, Placement::default(), t0).unwrap();
    let old = first[0].clone();
    let effects = st.free(&p("/a"), &block_ids(&first)).unwrap();
    assert_eq!(
        effects,
        vec![Effect::Revoke {
            node: n,
            blocks: vec![(old.block.index, old.epoch + 1)]
        }]
    );
    let status = st.status(t0);
    assert_eq!(status.nodes[0].blocks_revoking, 1);
    assert_eq!(status.nodes[0].blocks_free, 0);
    assert_eq!(status.blocks_freed_total, 1);
    assert_eq!(usage(&st, t0, "/a"), Some((0, 0)));

    // Not reallocated while revoking.
    assert!(matches!(
        st.alloc(&p("/b"), BS, Placement::default(), t0),
        Err(ControlError::NoCapacity { free: 0, .. })
    ));
    // A confirmation for a stale epoch (or another block) changes nothing.
    assert_eq!(st.revoked(n, &[(old.block.index, old.epoch), (5, 2)]), 0);
    assert!(st.alloc(&p("/b"), BS, Placement::default(), t0).is_err());
    // Confirmations from other nodes are ignored.
    assert_eq!(st.revoked(n + 1, &[(old.block.index, old.epoch + 1)]), 0);

    assert_eq!(st.revoked(n, &[(old.block.index, old.epoch + 1)]), 1);
    let new = st.alloc(&p("/b"), BS, Placement::default(), t0).unwrap();
    assert_eq!(new[0].block, old.block);
    assert_eq!(new[0].epoch, old.epoch + 1);
    assert_ne!(new[0].key, old.key);
    assert_eq!(
        new[0].key,
        grant_mac(
            derive_key(&SECRET, n, old.block.index, old.epoch + 1, true),
            new[0].expiry
        )
    );
    // A duplicate confirmation after reuse does nothing.
    assert_eq!(st.revoked(n, &[(old.block.index, old.epoch + 1)]), 0);
    st.check_invariants().unwrap();
}

#[test]
fn only_the_owning_path_may_free() {
    let (mut st, t0, ids) = setup(&[8]);
    let a = block_ids(
        &st.alloc(&p("/j/a"), 2 * BS, Placement::default(), t0)
            .unwrap(),
    );
    st.open(&p("/j/b"), t0).unwrap();
    let not_owner = |block, path: &str| ControlError::NotOwner {
        block,
        path: p(path),
    };
    assert_eq!(st.free(&p("/j/b"), &a[..1]), Err(not_owner(a[0], "/j/b")));
    assert_eq!(st.free(&p("/j"), &a[..1]), Err(not_owner(a[0], "/j")));
    assert_eq!(st.free(&p("/zz"), &a[..1]), Err(not_owner(a[0], "/zz")));
    let bogus = BlockId {
        node: ids[0],
        index: 7,
    };
    let unknown_node = BlockId { node: 42, index: 0 };
    assert_eq!(
        st.free(&p("/j/a"), &[a[0], bogus]),
        Err(not_owner(bogus, "/j/a")),
        "one bad block refuses the whole request"
    );
    assert_eq!(
        st.free(&p("/j/a"), &[unknown_node]),
        Err(not_owner(unknown_node, "/j/a"))
    );
    assert!(matches!(
        st.free(&p("/j/a"), &[a[0], a[0]]),
        Err(ControlError::BadRequest(_))
    ));
    assert_eq!(usage(&st, t0, "/j/a"), Some((2, 2 * BS)), "nothing freed");
    assert_eq!(st.free(&p("/j/a"), &[]), Ok(vec![]));
    st.free(&p("/j/a"), &a).unwrap();
    assert_eq!(st.free(&p("/j/a"), &a[..1]), Err(not_owner(a[0], "/j/a")));
    st.check_invariants().unwrap();
}

#[test]
fn lookup_returns_rw_or_ro_grants_in_allocation_order() {
    let (mut st, t0, ids) = setup(&[4, 4]);
    let mut all = st.alloc(&p("/t"), 2 * BS, Placement::Spread, t0).unwrap();
    all.extend(st.alloc(&p("/t"), BS, Placement::Node(ids[0]), t0).unwrap());
    // Same blocks and epochs (keys may differ: a later expiry is a later MAC).
    let again = st.lookup(&p("/t"), true).unwrap();
    assert_eq!(block_ids(&again), block_ids(&all));
    assert!(again.iter().zip(&all).all(|(a, b)| a.epoch == b.epoch));
    let ro = st.lookup(&p("/t"), false).unwrap();
    assert_eq!(block_ids(&ro), block_ids(&all));
    for (r, w) in ro.iter().zip(&all) {
        assert!(!r.writable);
        assert_ne!(r.key, w.key);
        assert_eq!(
            r.key,
            grant_mac(
                derive_key(&SECRET, r.block.node, r.block.index, r.epoch, false),
                r.expiry
            )
        );
    }
    st.free(&p("/t"), &[all[0].block]).unwrap();
    assert_eq!(
        block_ids(&st.lookup(&p("/t"), true).unwrap()),
        block_ids(&all[1..])
    );
    assert_eq!(
        st.lookup(&p("/none"), true),
        Err(ControlError::NotFound(p("/none")))
    );
    st.open(&p("/empty"), t0).unwrap();
    assert_eq!(st.lookup(&p("/empty"), false), Ok(vec![]));
}

#[test]
fn renewing_a_prefix_keeps_descendants_and_expiry_reclaims() {
    let (mut st, t0, ids) = setup(&[8]);
    st.alloc(&p("/j/s/t"), 2 * BS, Placement::default(), t0)
        .unwrap();
    st.alloc(&p("/k"), BS, Placement::default(), t0).unwrap();
    assert_eq!(st.renew(&p("/j"), t0 + ms(8000)), Ok(10_000));
    assert_eq!(
        st.renew(&p("/nope"), t0),
        Err(ControlError::NotFound(p("/nope")))
    );

    // /k: deadline t0+10 s, reclaimed after the 2 s grace.
    assert!(beat_and_tick(&mut st, t0 + ms(11_000)).is_empty());
    assert!(usage(&st, t0, "/k").is_some());
    let effects = beat_and_tick(&mut st, t0 + ms(12_500));
    assert_eq!(
        effects,
        vec![Effect::Revoke {
            node: ids[0],
            blocks: vec![(2, 2)]
        }]
    );
    assert!(usage(&st, t0, "/k").is_none());
    // /j/s/t lives on through /j (deadline t0+18 s).
    assert!(beat_and_tick(&mut st, t0 + ms(19_000)).is_empty());
    let now = t0 + ms(19_000);
    let remaining = st
        .status(now)
        .paths
        .iter()
        .find(|u| u.path.as_str() == "/j/s/t")
        .map(|u| u.lease_remaining_ms)
        .unwrap();
    assert_eq!(remaining, -1000, "expired, within grace");
    let effects = beat_and_tick(&mut st, t0 + ms(20_500));
    assert_eq!(effects.len(), 1);
    let status = st.status(t0 + ms(20_500));
    assert!(status.paths.is_empty());
    assert_eq!(status.blocks_expired_total, 3);
    assert_eq!(status.blocks_freed_total, 3);
    assert_eq!(status.used_bytes, 0);
    st.check_invariants().unwrap();
}

#[test]
fn a_live_task_keeps_its_expired_ancestors() {
    let (mut st, t0, _) = setup(&[8]);
    st.alloc(&p("/j"), BS, Placement::default(), t0).unwrap();
    st.alloc(&p("/j/t"), BS, Placement::default(), t0).unwrap();
    let mut now = t0;
    for _ in 0..5 {
        now += ms(5000);
        st.renew(&p("/j/t"), now).unwrap();
        assert!(beat_and_tick(&mut st, now).is_empty());
    }
    assert_eq!(usage(&st, now, "/j"), Some((1, 2 * BS)));
    // Once the task stops renewing, task and job go together.
    now += ms(12_001);
    assert_eq!(beat_and_tick(&mut st, now).len(), 1);
    assert!(st.status(now).paths.is_empty());
    assert_eq!(st.status(now).blocks_expired_total, 2);
}

#[test]
fn nodes_die_by_missed_heartbeats_and_are_dropped_when_empty() {
    let (mut st, t0, ids) = setup(&[4, 4]);
    let (a, b) = (ids[0], ids[1]);
    st.heartbeat(a, Default::default(), t0 + ms(1000)).unwrap();
    assert!(st.tick(t0 + ms(1400)).is_empty());
    assert_eq!(st.tick(t0 + ms(1600)), vec![Effect::NodeDead { node: b }]);
    // b held nothing: gone from the registry; a is alive.
    let status = st.status(t0 + ms(1600));
    assert_eq!(status.nodes.len(), 1);
    assert!(status.nodes[0].alive);
    assert_eq!(status.nodes[0].last_heartbeat_ms, 600);
    assert_eq!(
        st.heartbeat(b, Default::default(), t0 + ms(1700)),
        Err(ControlError::NoSuchNode(b))
    );
    // A new registration gets a fresh id.
    let c = st.register_node(&reg(4), t0 + ms(1700)).unwrap();
    assert!(c > b);
}

#[test]
fn a_dead_node_keeps_its_blocks_listed_until_freed() {
    let (mut st, t0, ids) = setup(&[4, 4]);
    let (a, b) = (ids[0], ids[1]);
    let on_b = st.alloc(&p("/t"), 2 * BS, Placement::Node(b), t0).unwrap();
    let pending = st.alloc(&p("/u"), BS, Placement::Node(b), t0).unwrap();
    st.free(&p("/u"), &block_ids(&pending)).unwrap();
    st.node_lost(b);
    st.check_invariants().unwrap();

    let status = st.status(t0);
    let nb = status.nodes.iter().find(|n| n.endpoint.node == b).unwrap();
    assert!(!nb.alive);
    assert_eq!(nb.blocks_revoking, 0, "pending revocations dropped");
    assert_eq!(status.capacity_bytes, 4 * BS, "only live capacity");
    assert_eq!(status.used_bytes, 2 * BS);
    // The dead node's unreplicated blocks are reported lost, never silently replaced.
    assert_eq!(
        st.lookup(&p("/t"), true),
        Err(ControlError::DataLost {
            path: p("/t"),
            block: on_b[0].block
        })
    );
    assert_eq!(st.status(t0).blocks_lost, 2);
    // Placement avoids it.
    let g = st
        .alloc(&p("/v"), 4 * BS, Placement::default(), t0)
        .unwrap();
    assert!(g.iter().all(|g| g.block.node == a));
    assert!(matches!(
        st.alloc(&p("/v"), BS, Placement::Spread, t0),
        Err(ControlError::NoCapacity { free: 0, .. })
    ));
    assert_eq!(
        st.heartbeat(b, Default::default(), t0),
        Err(ControlError::NoSuchNode(b))
    );
    // Freeing a dead node's block sends no revocation.
    assert_eq!(st.free(&p("/t"), &[on_b[0].block]), Ok(vec![]));
    assert_eq!(st.status(t0).nodes.len(), 2);
    let (removed, effects) = st.remove(&p("/t")).unwrap();
    assert_eq!(removed.blocks, 1);
    assert!(effects.is_empty());
    assert_eq!(st.status(t0).nodes.len(), 1, "empty dead node dropped");
    st.check_invariants().unwrap();
}

#[test]
fn losing_a_node_with_pending_revocations_drops_it() {
    let (mut st, t0, ids) = setup(&[2]);
    let g = st.alloc(&p("/t"), BS, Placement::default(), t0).unwrap();
    st.free(&p("/t"), &block_ids(&g)).unwrap();
    st.node_lost(ids[0]);
    assert!(st.status(t0).nodes.is_empty());
    assert_eq!(st.revoked(ids[0], &[(0, 2)]), 0);
}

#[test]
fn bad_registrations_are_refused() {
    let (mut st, t0, _) = setup(&[4]);
    let mut r = reg(4);
    r.block_size = 2048;
    r.capacity = 8192;
    assert!(matches!(
        st.register_node(&r, t0),
        Err(ControlError::BadRegistration(_))
    ));
    let mut r = reg(4);
    r.block_size = 2 * BS;
    assert!(
        matches!(st.register_node(&r, t0), Err(ControlError::BadRegistration(m)) if m.contains("same block size"))
    );
    let mut r = reg(4);
    r.capacity += 1;
    assert!(st.register_node(&r, t0).is_err());
    let mut r = reg(4);
    r.capacity = 0;
    assert!(st.register_node(&r, t0).is_err());
    assert_eq!(st.status(t0).nodes.len(), 1);
}

#[test]
fn requests_are_dispatched_to_responses() {
    let (mut st, t0, _) = setup(&[4]);
    let (r, e) = st.handle(Request::Open { path: p("/j") }, t0);
    assert!(matches!(r, Response::Ok) && e.is_empty());
    let (r, _) = st.handle(
        Request::Alloc {
            path: p("/j/t"),
            bytes: 2 * BS,
            placement: Placement::default(),
        },
        t0,
    );
    let Response::Blocks(g) = r else {
        panic!("{r:?}")
    };
    let (r, e) = st.handle(
        Request::Free {
            path: p("/j/t"),
            blocks: vec![g[0].block],
        },
        t0,
    );
    assert!(matches!(r, Response::Ok));
    assert_eq!(e.len(), 1);
    let (r, _) = st.handle(
        Request::Lookup {
            path: p("/j/t"),
            writable: false,
        },
        t0,
    );
    assert!(matches!(r, Response::Blocks(g) if g.len() == 1));
    let (r, _) = st.handle(Request::Renew { prefix: p("/j") }, t0);
    assert!(matches!(r, Response::Renewed { lease_ms: 10_000 }));
    let (r, _) = st.handle(
        Request::SetQuota {
            path: p("/j"),
            bytes: Some(1),
        },
        t0,
    );
    assert!(matches!(r, Response::Ok));
    let (r, _) = st.handle(Request::Status, t0);
    assert!(matches!(r, Response::Status(s) if s.paths.len() == 2));
    let (r, e) = st.handle(Request::Remove { path: p("/j") }, t0);
    assert!(matches!(
        r,
        Response::Removed {
            blocks: 1,
            paths: 2
        }
    ));
    assert_eq!(e.len(), 1);
    let (r, _) = st.handle(Request::Remove { path: p("/j") }, t0);
    assert!(matches!(r, Response::Error(ControlError::NotFound(_))));
}

#[test]
fn paths_from_the_wire_are_validated_and_normalised() {
    let (mut st, t0, _) = setup(&[4]);
    let raw = |s: &str| -> Result<PoolPath, crate::proto::frame::FrameError> {
        let bytes = crate::proto::frame::encode(&s.to_string()).unwrap();
        crate::proto::frame::decode(&bytes[4..])
    };
    // Malformed paths never reach the state machine.
    assert!(raw("/a/../b").is_err());
    assert!(raw("").is_err());
    assert!(raw("relative").is_err());
    // The root cannot own blocks.
    assert_eq!(
        st.alloc(&raw("//").unwrap(), 1, Placement::default(), t0),
        Err(ControlError::BadPath(PathError::Root))
    );
    // A non-canonical spelling names the same path.
    let g = st
        .alloc(&raw("/a/b/").unwrap(), 1, Placement::default(), t0)
        .unwrap();
    assert_same_grants(&st.lookup(&p("/a/b"), true).unwrap(), &g);
    st.free(&raw("/a/b/").unwrap(), &block_ids(&g)).unwrap();
    assert!(st.renew(&raw("/a/").unwrap(), t0).is_ok());
    assert!(st.remove(&raw("/a/").unwrap()).is_ok());
    assert!(st.status(t0).paths.is_empty());
    st.check_invariants().unwrap();
}

/// Recovery: the journal rebuilds ownership, epochs and quotas; recovered nodes are
/// dead (nothing is allocated on them) until the same incarnation re-registers, which
/// resumes them with their owned blocks and revokes every other touched block anew.
#[test]
fn recovery_resumes_nodes_by_incarnation() {
    let t0 = Instant::now();
    let cfg = StateConfig {
        lease: Duration::from_secs(10),
        grace: Duration::from_secs(2),
        dead_after: ms(1500),
        ..StateConfig::default()
    };
    let mut st = ControllerState::new(cfg, SECRET, t0);
    st.enable_journal();
    let a = st.join_node(&reg(8), 11, t0).unwrap();
    let b = st.join_node(&reg(8), 22, t0).unwrap();
    assert!(!a.resumed && !b.resumed);
    let kept = st
        .alloc(&p("/j/keep"), 2 * BS, Placement::Node(a.id), t0)
        .unwrap();
    let gone = st
        .alloc(&p("/j/gone"), BS, Placement::Node(a.id), t0)
        .unwrap();
    st.set_quota(&p("/j"), Some(6 * BS), t0).unwrap();
    // Freed and revoking when the controller dies.
    st.free(&p("/j/gone"), &block_ids(&gone)).unwrap();
    let log = st.take_journal();

    let t1 = t0 + ms(500);
    let mut rec = ControllerState::recover(cfg, SECRET, None, &log, t1).unwrap();
    assert_eq!(rec.snapshot(), st.snapshot());
    rec.finish_recovery(t1);
    rec.check_invariants().unwrap();
    // Same grants (epochs and keys) for the surviving data; quotas kept.
    let grants = rec.lookup(&p("/j/keep"), true).unwrap();
    assert_same_grants(&grants, &kept);
    assert!(matches!(
        rec.alloc(&p("/other"), BS, Placement::default(), t1),
        Err(ControlError::NoCapacity { .. })
    ));
    // A different incarnation is a new node, not node a.
    let c = rec.join_node(&reg(8), 33, t1).unwrap();
    assert!(!c.resumed && c.id > b.id);
    // A different region under a's identity is refused.
    assert!(rec.join_node(&reg(4), 11, t1).is_err());
    // a comes back: its freed block is revoked again at its new epoch.
    let back = rec.join_node(&reg(8), 11, t1).unwrap();
    assert!(back.resumed);
    assert_eq!(back.id, a.id);
    let freed = gone[0].block;
    assert_eq!(
        back.effects,
        vec![Effect::Revoke {
            node: a.id,
            blocks: vec![(freed.index, gone[0].epoch + 1)]
        }]
    );
    // Alive again: a second registration under the same identity is refused.
    assert!(rec.join_node(&reg(8), 11, t1).is_err());
    assert_eq!(rec.revoked(a.id, &[(freed.index, gone[0].epoch + 1)]), 1);
    rec.check_invariants().unwrap();
    // The quota still holds: 2 blocks used of 6.
    assert!(matches!(
        rec.alloc(&p("/j/y"), 5 * BS, Placement::Node(a.id), t1),
        Err(ControlError::QuotaExceeded { .. })
    ));
    let more = rec
        .alloc(&p("/j/y"), 4 * BS, Placement::Node(a.id), t1)
        .unwrap();
    let mut owned: Vec<BlockId> = block_ids(&kept);
    owned.extend(block_ids(&more));
    owned.sort_unstable_by_key(|b| b.index);
    owned.dedup();
    assert_eq!(owned.len(), 6, "no block owned twice");
    // Node b never came back: once dead_after passes it is dropped (it holds nothing).
    let t2 = t1 + ms(1600);
    rec.heartbeat(a.id, Default::default(), t2).unwrap();
    rec.tick(t2);
    assert!(rec.status(t2).nodes.iter().all(|n| n.endpoint.node != b.id));
}

#[test]
fn pinned_paths_survive_lease_expiry_and_unpinning_lets_them_go() {
    let (mut st, t0, _) = setup(&[8]);
    st.alloc(&p("/j/keep"), BS, Placement::default(), t0)
        .unwrap();
    st.alloc(&p("/j/drop"), BS, Placement::default(), t0)
        .unwrap();
    st.pin(&p("/j/keep"), true).unwrap();
    assert!(matches!(
        st.pin(&p("/"), true),
        Err(ControlError::BadRequest(_))
    ));
    assert!(matches!(
        st.pin(&p("/nope"), true),
        Err(ControlError::NotFound(_))
    ));
    // Past lease (10 s) plus grace (2 s) without renewal.
    let t1 = t0 + Duration::from_secs(13);
    beat_and_tick(&mut st, t1);
    st.check_invariants().unwrap();
    assert_eq!(
        usage(&st, t1, "/j/keep"),
        Some((1, BS)),
        "pinned data stays"
    );
    assert_eq!(usage(&st, t1, "/j/drop"), None, "the rest is freed");
    assert_eq!(usage(&st, t1, "/j"), Some((0, BS)), "ancestors stay");
    let status = st.status(t1);
    let keep = status.paths.iter().find(|u| u.path.as_str() == "/j/keep");
    assert!(keep.is_some_and(|u| u.pinned && u.lease_remaining_ms < 0));
    st.pin(&p("/j/keep"), false).unwrap();
    beat_and_tick(&mut st, t1 + ms(1));
    st.check_invariants().unwrap();
    assert!(st.status(t1).paths.is_empty());
    assert_eq!(st.status(t1).used_bytes, 0);
}

/// Fenced locks survive a controller restart, from the journal alone and from a
/// snapshot plus the journal after it: a held lock stays held (re-armed for its TTL),
/// a released one is free, and no token is ever handed out twice.
#[test]
fn fences_are_replayed_from_journal_and_snapshot() {
    let t0 = Instant::now();
    let cfg = StateConfig::default();
    let mut st = ControllerState::new(cfg, SECRET, t0);
    st.enable_journal();
    let fence = |st: &mut ControllerState, path: &str, now| match st.handle(
        Request::FenceAcquire {
            path: p(path),
            ttl_ms: 1000,
        },
        now,
    ) {
        (Response::Fence { token }, _) => Ok(token),
        (Response::Error(e), _) => Err(e),
        (r, _) => panic!("{r:?}"),
    };
    let held = fence(&mut st, "/j/kv", t0).unwrap();
    let released = fence(&mut st, "/j/other", t0).unwrap();
    assert!(released > held);
    st.fence_release(&p("/j/other"), released).unwrap();
    let snap = st.snapshot();
    let first = st.take_journal();
    // After the snapshot: one more grant.
    let late = fence(&mut st, "/j/late", t0).unwrap();
    let second = st.take_journal();

    let t1 = t0 + ms(5000); // every TTL has run out on the old clock
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    for mut rec in [
        ControllerState::recover(cfg, SECRET, None, &all, t1).unwrap(),
        ControllerState::recover(cfg, SECRET, Some(&snap), &second, t1).unwrap(),
    ] {
        assert_eq!(rec.snapshot(), st.snapshot());
        // Held ones are held again from the restart; the released one is free.
        assert!(matches!(
            fence(&mut rec, "/j/kv", t1),
            Err(ControlError::FenceHeld { .. })
        ));
        assert!(matches!(
            fence(&mut rec, "/j/late", t1),
            Err(ControlError::FenceHeld { .. })
        ));
        let again = fence(&mut rec, "/j/other", t1).unwrap();
        assert!(again > late, "token {again} reused (last was {late})");
        // The holder keeps its lock by renewing it.
        assert!(matches!(
            rec.handle(
                Request::FenceRenew {
                    path: p("/j/kv"),
                    token: held,
                    ttl_ms: 1000
                },
                t1
            ),
            (Response::Fence { .. }, _)
        ));
        // Expired: taken over with a larger token; the old holder cannot renew.
        let next = fence(&mut rec, "/j/kv", t1 + ms(1001)).unwrap();
        assert!(next > again);
        assert!(matches!(
            rec.handle(
                Request::FenceRenew {
                    path: p("/j/kv"),
                    token: held,
                    ttl_ms: 1000
                },
                t1 + ms(1001)
            ),
            (Response::Error(ControlError::FenceLost { .. }), _)
        ));
    }
}
