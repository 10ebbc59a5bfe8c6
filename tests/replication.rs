//! Replication with real processes on 127.0.0.1: three memory nodes, a job with a
//! 2-copy object, a job with an unreplicated object on the node that dies, and a job
//! on a surviving node. `kill -9` one memory node: the replicated data stays readable
//! (byte-identical, atomics included) and is re-replicated; the unreplicated object
//! reports `DataLost`; the other job is unaffected. Then the *other* original copy's
//! node is killed too and the data is still readable from the re-created copy.

mod common;

use common::{controller, eventually, memnode, Proc};
use farpool::proto::{ClusterStatus, ControlError, Placement};
use farpool::{BlockHandle, Client, ClientError};
use std::time::Duration;

const BS: u64 = 64 << 10;
const WAIT: Duration = Duration::from_secs(30);

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn status(c: &Client) -> ClusterStatus {
    c.status().expect("status")
}

fn read_all(h: &BlockHandle) -> Vec<u8> {
    let mut buf = vec![0; h.len() as usize];
    h.read(0, &mut buf).expect("read replicated block");
    buf
}

fn is_lost(r: Result<impl std::fmt::Debug, ClientError>, path: &str) {
    match r {
        Err(ClientError::Control(ControlError::DataLost { path: p, .. })) => {
            assert_eq!(p.as_str(), path)
        }
        other => panic!("expected DataLost for {path}, got {other:?}"),
    }
}

/// A controller, three soft memory nodes of `capacity` and a client that saw them
/// all alive.
fn three_nodes(capacity: &str) -> (Proc, Vec<Proc>, Client) {
    let ctl = controller();
    let nodes: Vec<Proc> = (0..3)
        .map(|_| memnode(&ctl.addr, capacity, "soft"))
        .collect();
    let c = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(WAIT, || c.status().is_ok_and(|s| s
        .nodes
        .iter()
        .filter(|n| n.alive)
        .count()
        == 3)));
    (ctl, nodes, c)
}

#[test]
fn kill9_memory_node_replicated_survive_unreplicated_lost_others_unaffected() {
    let (_ctl, mut nodes, c) = three_nodes("4MiB");
    let st = status(&c);
    let ids: Vec<u32> = nodes
        .iter()
        .map(|p| {
            st.nodes
                .iter()
                .find(|n| n.endpoint.addr == p.addr)
                .map(|n| n.endpoint.node)
                .unwrap_or_else(|| panic!("memory node at {} not in status", p.addr))
        })
        .collect();

    // Three copies fit on three nodes; more than supported is refused.
    let probe = c.task("/probe/t").unwrap();
    let three = probe
        .alloc_replicated(BS, Placement::LeastLoaded, 3)
        .unwrap();
    assert_eq!(
        three[0].grant().replication.as_ref().unwrap().others.len(),
        2
    );
    assert!(matches!(
        probe.alloc_replicated(BS, Placement::LeastLoaded, 9),
        Err(ClientError::Control(ControlError::BadRequest(_)))
    ));
    probe.close().unwrap();

    // Job A: two blocks with 2 copies each, primaries on the node that will die.
    let ja = c.task("/ja/t").unwrap();
    let rep = ja
        .alloc_replicated(2 * BS, Placement::Node(ids[0]), 2)
        .unwrap();
    assert_eq!(rep.len(), 2);
    let mut data: Vec<Vec<u8>> = Vec::new();
    for (i, h) in rep.iter().enumerate() {
        assert!(h.replicated());
        assert_eq!(h.id().node, ids[0]);
        let grant = h.grant();
        let others = &grant.replication.as_ref().unwrap().others;
        assert_eq!(others.len(), 1);
        assert_ne!(others[0].0.block.node, ids[0], "copies on distinct nodes");
        let mut d = pattern(i as u8, h.len() as usize);
        let n = d.len();
        d[n - 8..].fill(0);
        h.write(0, &d).unwrap();
        data.push(d);
    }
    // An atomic counter in the last word of block 0.
    let word = BS - 8;
    for k in 0..10u64 {
        assert_eq!(rep[0].faa(word, 1).unwrap(), k);
    }
    assert_eq!(rep[0].cas(word, 10, 12).unwrap(), 10);
    let n = data[0].len();
    data[0][n - 8..].copy_from_slice(&12u64.to_le_bytes());
    for (h, d) in rep.iter().zip(&data) {
        assert_eq!(&read_all(h), d);
    }
    let original_secondary = rep[0].grant().replication.as_ref().unwrap().others[0]
        .0
        .block
        .node;

    // Job B: unreplicated, on the node that will die.
    let jb = c.task("/jb/t").unwrap();
    let doomed = jb.alloc_with(BS, Placement::Node(ids[0])).unwrap();
    doomed[0].write(0, b"doomed").unwrap();

    // Job C: unreplicated, on a node that survives the first kill.
    let survivor = ids
        .iter()
        .copied()
        .find(|&n| n != ids[0] && n != original_secondary)
        .unwrap_or(ids[1]);
    let jc = c.task("/jc/t").unwrap();
    let safe = jc.alloc_with(BS, Placement::Node(survivor)).unwrap();
    let cdata = pattern(77, BS as usize);
    safe[0].write(0, &cdata).unwrap();

    // kill -9 the primaries' node.
    nodes[0].kill();

    // Replicated data stays readable, byte-identical (the reads fail over).
    for (h, d) in rep.iter().zip(&data) {
        assert_eq!(&read_all(h), d, "replicated block after the primary died");
    }
    // Writes keep working while degraded or repairing.
    rep[1].write(100, b"written after the failure").unwrap();
    data[1][100..125].copy_from_slice(b"written after the failure");
    assert_eq!(rep[0].faa(word, 1).unwrap(), 12);
    data[0][n - 8..].copy_from_slice(&13u64.to_le_bytes());

    // Re-replicated: no degraded block left, two copies rebuilt.
    assert!(
        eventually(WAIT, || {
            let s = status(&c);
            s.blocks_degraded == 0 && s.replicas_rebuilt_total >= 2
        }),
        "re-replication did not finish: {:?}",
        status(&c)
    );
    // The unreplicated object on the dead node is lost, with a typed error, through
    // a lookup and through its old handle; status counts it.
    is_lost(c.open_blocks("/jb/t", true), "/jb/t");
    let mut buf = [0u8; 6];
    is_lost(doomed[0].read(0, &mut buf), "/jb/t");
    assert_eq!(status(&c).blocks_lost, 1);
    // Two live nodes cannot hold three copies.
    let probe = c.task("/probe/t2").unwrap();
    assert!(matches!(
        probe.alloc_replicated(BS, Placement::LeastLoaded, 3),
        Err(ClientError::Control(ControlError::NotEnoughNodes {
            copies: 3,
            nodes: 2
        }))
    ));
    probe.close().unwrap();
    // Job C is unaffected.
    let mut got = vec![0; cdata.len()];
    safe[0].read(0, &mut got).unwrap();
    assert_eq!(got, cdata);
    let fresh = c.open_blocks("/jc/t", false).unwrap();
    fresh[0].read(0, &mut got).unwrap();
    assert_eq!(got, cdata);

    // Fresh handles of the replicated object see the data too.
    let reopened = c.open_blocks("/ja/t", false).unwrap();
    assert_eq!(reopened.len(), 2);
    for ((h, d), old) in reopened.iter().zip(&data).zip(&rep) {
        assert_eq!(h.id(), old.id(), "a replicated block keeps its id");
        assert!(h.grant().block.node != ids[0], "served by a live copy");
        assert_eq!(&read_all(h), d);
    }

    // Kill the other original copy's node: the re-created copies carry the data.
    let idx = ids.iter().position(|&n| n == original_secondary).unwrap();
    nodes[idx].kill();
    for (h, d) in rep.iter().zip(&data) {
        assert_eq!(&read_all(h), d, "after losing both original copies");
    }
    drop(ja);
    drop(jc);
}

#[test]
fn replicated_data_structures_survive_a_memory_node_kill9() {
    use farpool::ds::{File, Kv, KvConfig};
    let (_ctl, mut nodes, c) = three_nodes("8MiB");
    let _lease = c.lease("/ds").unwrap();
    let rc = c.with_copies(2);
    let file = File::create_at(&rc, "/ds/file").unwrap();
    let bytes = pattern(5, 3 * BS as usize + 1000);
    file.append(&bytes).unwrap();
    let got = file.read_all().unwrap();
    assert!(
        got == bytes,
        "file differs ({} vs {} bytes)",
        got.len(),
        bytes.len()
    );
    let kv = Kv::create_at(&rc, "/ds/kv", KvConfig::default()).unwrap();
    for k in 0..200u32 {
        kv.put(&k.to_le_bytes(), &pattern(k as u8, 100)).unwrap();
    }
    // Every block of both objects has two copies.
    let st = status(&c);
    assert_eq!(st.blocks_degraded, 0);
    for h in c.open_blocks("/ds/file", false).unwrap() {
        assert!(h.replicated());
    }
    // Kill the node holding the file's meta block (its primary).
    let meta_node = c.open_blocks("/ds/file", false).unwrap()[0].id().node;
    let victim = nodes
        .iter()
        .position(|p| {
            st.nodes
                .iter()
                .any(|n| n.endpoint.node == meta_node && n.endpoint.addr == p.addr)
        })
        .unwrap();
    nodes[victim].kill();
    let got = file.read_all().unwrap();
    assert!(got == bytes, "file differs after the kill");
    for k in 0..200u32 {
        assert_eq!(
            kv.get(&k.to_le_bytes()).unwrap(),
            Some(pattern(k as u8, 100)),
            "key {k}"
        );
    }
    // Both keep working and are re-replicated.
    file.append(b"tail").unwrap();
    kv.put(b"new", b"value").unwrap();
    assert!(
        eventually(WAIT, || status(&c).blocks_degraded == 0),
        "re-replication did not finish: {:?}",
        status(&c)
    );
    let reopened = File::open(&c, "/ds/file").unwrap();
    let mut want = bytes.clone();
    want.extend_from_slice(b"tail");
    let got = reopened.read_all().unwrap();
    assert!(
        got == want,
        "reopened file differs ({} vs {} bytes)",
        got.len(),
        want.len()
    );
    assert_eq!(kv.get(b"new").unwrap(), Some(b"value".to_vec()));
}
