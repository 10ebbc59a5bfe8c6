//! Unit tests of replicated allocation, lost data and re-replication in the
//! controller state machine (no sockets).

use super::journal::Record;
use super::state::{ControllerState, Effect, StateConfig};
use crate::proto::grant::WireTransport;
use crate::proto::{BlockId, ControlError, Placement, PoolPath, Register, Secret};
use std::time::{Duration, Instant};

const BS: u64 = 4096;
const SECRET: Secret = Secret([9; 16]);

fn p(s: &str) -> PoolPath {
    PoolPath::parse(s).unwrap()
}

fn cfg() -> StateConfig {
    StateConfig {
        lease: Duration::from_secs(10),
        grace: Duration::from_secs(2),
        dead_after: Duration::from_millis(1500),
        ..StateConfig::default()
    }
}

fn setup(nodes: &[u64]) -> (ControllerState, Instant, Vec<u32>) {
    let t0 = Instant::now();
    let mut st = ControllerState::new(cfg(), SECRET, t0);
    st.enable_journal();
    let ids = nodes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let reg = Register {
                data_addr: format!("10.0.0.{i}:9000"),
                transport: WireTransport::Soft,
                capacity: n * BS,
                block_size: BS,
                hugepages: false,
                locked: false,
            };
            st.join_node(&reg, i as u64 + 1, t0).unwrap().id
        })
        .collect();
    (st, t0, ids)
}

fn copies(effects: &[Effect]) -> Vec<(u64, BlockId, BlockId)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Copy {
                group,
                source,
                target,
            } => Some((*group, source.block, target.block)),
            _ => None,
        })
        .collect()
}

#[test]
fn replicated_alloc_places_copies_on_distinct_nodes() {
    let (mut st, t0, ids) = setup(&[4, 4, 4]);
    let grants = st
        .alloc_copies(&p("/j/t"), 3 * BS, Placement::Node(ids[1]), 2, t0)
        .unwrap();
    assert_eq!(grants.len(), 3);
    for g in &grants {
        assert_eq!(g.block.node, ids[1], "primary follows the placement");
        let r = g.replication.as_ref().unwrap();
        assert_eq!(r.copies, 2);
        assert_eq!(r.others.len(), 1);
        assert_ne!(r.others[0].0.block.node, g.block.node);
        assert!(r.others[0].1, "in sync");
    }
    // Quotas and usage count every copy.
    let s = st.status(t0);
    assert_eq!(s.used_bytes, 6 * BS);
    assert_eq!(s.blocks_degraded, 0);
    // The lookup answers the groups in allocation order, each once.
    let looked = st.lookup(&p("/j/t"), true).unwrap();
    assert_eq!(looked, grants);
    st.check_invariants().unwrap();

    // Not enough nodes: typed error, nothing taken.
    assert!(matches!(
        st.alloc_copies(&p("/j/u"), BS, Placement::LeastLoaded, 4, t0),
        Err(ControlError::BadRequest(_))
    ));
    let (mut two, t0, _) = setup(&[4, 4]);
    assert_eq!(
        two.alloc_copies(&p("/j/u"), BS, Placement::LeastLoaded, 3, t0),
        Err(ControlError::NotEnoughNodes {
            copies: 3,
            nodes: 2
        })
    );
    // Capacity runs out on one node: all or nothing.
    two.alloc_copies(&p("/j/a"), 4 * BS, Placement::LeastLoaded, 2, t0)
        .unwrap();
    assert!(two
        .alloc_copies(&p("/j/b"), BS, Placement::LeastLoaded, 2, t0)
        .is_err());
    assert_eq!(two.status(t0).used_bytes, 8 * BS);
    two.check_invariants().unwrap();
}

#[test]
fn freeing_one_copy_frees_the_group() {
    let (mut st, t0, _) = setup(&[4, 4]);
    let g = st
        .alloc_copies(&p("/j/t"), BS, Placement::LeastLoaded, 2, t0)
        .unwrap();
    let effects = st.free(&p("/j/t"), &[g[0].block]).unwrap();
    let revoked: usize = effects
        .iter()
        .map(|e| match e {
            Effect::Revoke { blocks, .. } => blocks.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(revoked, 2);
    assert_eq!(st.status(t0).used_bytes, 0);
    st.check_invariants().unwrap();
}

#[test]
fn node_loss_loses_unreplicated_and_repairs_replicated() {
    let (mut st, t0, ids) = setup(&[4, 4, 4]);
    let rep = st
        .alloc_copies(&p("/a/r"), BS, Placement::Node(ids[0]), 2, t0)
        .unwrap();
    let single = st
        .alloc(&p("/b/s"), BS, Placement::Node(ids[0]), t0)
        .unwrap();
    let other = st
        .alloc(&p("/c/s"), BS, Placement::Node(ids[2]), t0)
        .unwrap();
    let secondary = rep[0].replication.as_ref().unwrap().others[0].0.block;

    let effects = st.node_lost(ids[0]);
    let started = copies(&effects);
    assert_eq!(started.len(), 1);
    let (group, source, target) = started[0];
    assert_eq!(source, secondary, "copies from the surviving copy");
    assert!(target.node != ids[0] && target.node != secondary.node);

    // Unreplicated block on the dead node: lost, typed, in lookups and refreshes.
    assert_eq!(
        st.lookup(&p("/b/s"), true),
        Err(ControlError::DataLost {
            path: p("/b/s"),
            block: single[0].block
        })
    );
    assert!(matches!(
        st.refresh(&p("/b/s"), 0, single[0].block, true),
        Err(ControlError::DataLost { .. })
    ));
    // Others are unaffected.
    assert_eq!(st.lookup(&p("/c/s"), true).unwrap(), other);
    // The replicated block is served by the survivor, with the pending copy attached
    // as not in sync; status shows it degraded.
    let g = st.lookup(&p("/a/r"), true).unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].block, secondary);
    let r = g[0].replication.as_ref().unwrap();
    assert_eq!(r.group, group);
    assert_eq!(r.others.len(), 1);
    assert_eq!(r.others[0].0.block, target);
    assert!(!r.others[0].1);
    assert_eq!(
        st.refresh(&p("/a/r"), group, g[0].block, true).unwrap(),
        g[0]
    );
    let s = st.status(t0);
    assert_eq!((s.blocks_degraded, s.blocks_lost), (1, 1));
    st.check_invariants().unwrap();

    // A stale report is ignored; the right one completes the repair and frees the
    // dead copy.
    assert!(st.repair_done(group, single[0].block).is_empty());
    st.repair_done(group, target);
    let g = st.lookup(&p("/a/r"), true).unwrap();
    assert_eq!(g[0].block, secondary);
    let r = g[0].replication.as_ref().unwrap();
    assert_eq!(r.others.len(), 1);
    assert_eq!(r.others[0].0.block, target);
    assert!(r.others[0].1);
    let s = st.status(t0);
    assert_eq!((s.blocks_degraded, s.blocks_lost), (0, 1));
    assert_eq!(s.replicas_rebuilt_total, 1);
    st.check_invariants().unwrap();

    // Lose the original secondary too: the re-created copy carries on.
    let effects = st.node_lost(secondary.node);
    assert!(copies(&effects).is_empty(), "no third node to copy to");
    let g = st.lookup(&p("/a/r"), true).unwrap();
    assert_eq!(g[0].block, target);
    assert_eq!(st.status(t0).blocks_degraded, 1);
    // Losing the last copy makes the group lost.
    st.node_lost(target.node);
    assert!(matches!(
        st.lookup(&p("/a/r"), true),
        Err(ControlError::DataLost { .. })
    ));
    assert_eq!(st.status(t0).blocks_lost, 3);
    st.check_invariants().unwrap();
}

#[test]
fn failed_copy_is_retried_on_the_next_tick_and_a_new_node_is_used() {
    let (mut st, t0, ids) = setup(&[4, 4]);
    let rep = st
        .alloc_copies(&p("/a/r"), BS, Placement::Node(ids[0]), 2, t0)
        .unwrap();
    // Two nodes only: nothing to copy to, the group waits.
    assert!(copies(&st.node_lost(ids[0])).is_empty());
    assert_eq!(st.status(t0).blocks_degraded, 1);
    let reg = Register {
        data_addr: "10.0.0.9:9000".into(),
        transport: WireTransport::Soft,
        capacity: 4 * BS,
        block_size: BS,
        hugepages: false,
        locked: false,
    };
    let third = st.join_node(&reg, 99, t0).unwrap().id;
    let started = copies(&st.tick(t0));
    assert_eq!(started.len(), 1);
    let (group, _, target) = started[0];
    assert_eq!(target.node, third);
    // The copy fails: the target is freed, the next tick starts again.
    let effects = st.repair_failed(group, target);
    assert!(matches!(effects[..], [Effect::Revoke { .. }]));
    assert!(st.lookup(&p("/a/r"), true).unwrap()[0]
        .replication
        .as_ref()
        .unwrap()
        .others
        .is_empty());
    st.revoked(third, &[(target.index, 2)]);
    let again = copies(&st.tick(t0));
    assert_eq!(again.len(), 1);
    st.repair_done(again[0].0, again[0].2);
    assert_eq!(st.status(t0).blocks_degraded, 0);
    assert_ne!(st.lookup(&p("/a/r"), true).unwrap()[0].block, rep[0].block);
    st.check_invariants().unwrap();
}

#[test]
fn replication_survives_replay_and_restarts_copies() {
    let (mut st, t0, ids) = setup(&[4, 4, 4]);
    let mut log: Vec<Record> = st.take_journal();
    st.alloc_copies(&p("/a/r"), 2 * BS, Placement::Node(ids[0]), 2, t0)
        .unwrap();
    st.alloc(&p("/b/s"), BS, Placement::Node(ids[0]), t0)
        .unwrap();
    let started = copies(&st.node_lost(ids[0]));
    assert_eq!(started.len(), 2);
    st.repair_done(started[0].0, started[0].2);
    log.extend(st.take_journal());
    let want = st.snapshot();
    let mut back = ControllerState::recover(cfg(), SECRET, None, &log, t0).unwrap();
    back.check_invariants().unwrap();
    assert_eq!(back.snapshot(), want);
    // The copy still in flight is restarted from the log.
    let restart = copies(&back.pending_repairs());
    assert_eq!(restart.len(), 1);
    assert_eq!((restart[0].0, restart[0].2), (started[1].0, started[1].2));
    // From a snapshot as well.
    let snap = st.snapshot();
    let from_snap = ControllerState::recover(cfg(), SECRET, Some(&snap), &[], t0).unwrap();
    assert_eq!(from_snap.snapshot(), want);
    // While nodes may still come back after a restart nothing counts as lost.
    back.finish_recovery(t0);
    assert!(back.lookup(&p("/b/s"), true).is_ok());
    assert_eq!(back.status(t0).blocks_lost, 0);
    // After the grace, the dead node's data is lost, and the copy that was in flight
    // starts again (its source node came back).
    let reg = Register {
        data_addr: "10.0.0.1:9000".into(),
        transport: WireTransport::Soft,
        capacity: 4 * BS,
        block_size: BS,
        hugepages: false,
        locked: false,
    };
    for (i, &id) in ids.iter().enumerate().skip(1) {
        let mut r = reg.clone();
        r.data_addr = format!("10.0.0.{i}:9000");
        assert_eq!(back.join_node(&r, i as u64 + 1, t0).unwrap().id, id);
    }
    let later = t0 + Duration::from_secs(4);
    for &id in &ids[1..] {
        back.heartbeat(id, Default::default(), later).unwrap();
    }
    let effects = back.tick(later);
    let again = copies(&effects);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].0, again[0].2), (started[1].0, started[1].2));
    assert!(matches!(
        back.lookup(&p("/b/s"), true),
        Err(ControlError::DataLost { .. })
    ));
}
