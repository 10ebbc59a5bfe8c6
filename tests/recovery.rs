//! Controller recovery with real processes on 127.0.0.1: `kill -9` the controller in
//! the middle of allocations, restart it on the same data directory and address, and
//! check that memory nodes resume with their blocks, clients carry on by themselves,
//! acknowledged allocations survived, no block is owned twice and none leaks.

mod common;

use common::{eventually, memnode, spawn, Proc};
use farpool::proto::BlockId;
use farpool::Client;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BS: u64 = 64 << 10;

fn controller_at(listen: &str, data_dir: &Path) -> Proc {
    spawn(&[
        "controller",
        "--listen",
        listen,
        "--data-dir",
        data_dir.to_str().expect("utf-8 temp path"),
        // Roll over often, so recovery goes through snapshots taken while running.
        "--snapshot-every",
        "16",
        "--lease-secs",
        "3",
        "--grace-secs",
        "1",
        "--heartbeat-ms",
        "100",
        "--missed-heartbeats",
        "5",
    ])
}

/// Nodes alive and their (free, revoking, total) block counts.
fn node_counts(c: &Client) -> Option<Vec<(bool, u64, u64, u64)>> {
    c.status().ok().map(|s| {
        s.nodes
            .iter()
            .map(|n| (n.alive, n.blocks_free, n.blocks_revoking, n.blocks_total))
            .collect()
    })
}

fn live_nodes(c: &Client) -> usize {
    node_counts(c).map_or(0, |n| n.iter().filter(|n| n.0).count())
}

#[test]
fn kill9_controller_during_allocations_loses_nothing_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller_at("127.0.0.1:0", dir.path());
    let addr = ctl.addr.clone();
    let _n1 = memnode(&addr, "16MiB", "soft");
    let _n2 = memnode(&addr, "16MiB", "soft");
    let client = Client::connect(&addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 2));

    // Data written before the crash.
    let keep = client.task("/job/keep").unwrap();
    let kept = keep.alloc(3 * BS).unwrap();
    for (i, b) in kept.iter().enumerate() {
        b.write(0, &[i as u8 + 1; 4096]).unwrap();
    }
    client.set_quota("/job", Some(1000 * BS)).unwrap();

    // Allocators running through the crash; they record every acknowledged block.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, Vec<BlockId>>>> = Arc::default();
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            let acked = acked.clone();
            std::thread::spawn(move || {
                let path = format!("/job/w{w}");
                let task = client.task(&path).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(blocks) = task.alloc(BS) {
                        let ids = blocks.iter().map(|b| b.id());
                        acked
                            .lock()
                            .unwrap()
                            .entry(path.clone())
                            .or_default()
                            .extend(ids);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                task
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(300));
    // kill -9 (SIGKILL) in the middle of the allocations.
    ctl.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _ctl = controller_at(&addr, dir.path());
    // Clients reconnect by themselves; memory nodes resume with their blocks.
    assert!(
        eventually(Duration::from_secs(10), || live_nodes(&client) == 2),
        "memory nodes re-registered: {:?}",
        node_counts(&client)
    );
    let total_before = acked.lock().unwrap().values().map(Vec::len).sum::<usize>();
    assert!(
        eventually(Duration::from_secs(10), || acked
            .lock()
            .unwrap()
            .values()
            .map(Vec::len)
            .sum::<usize>()
            > total_before + 3),
        "allocations carry on after the restart"
    );
    stop.store(true, Ordering::Relaxed);
    let tasks: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();

    // Data written before the crash is still there, through old and new handles.
    let reopened = client.open_blocks("/job/keep", false).unwrap();
    assert_eq!(
        reopened.iter().map(|b| b.id()).collect::<Vec<_>>(),
        kept.iter().map(|b| b.id()).collect::<Vec<_>>()
    );
    for (i, (old, new)) in kept.iter().zip(&reopened).enumerate() {
        let mut buf = vec![0u8; 4096];
        new.read(0, &mut buf).unwrap();
        assert_eq!(buf, vec![i as u8 + 1; 4096], "block {i} after restart");
        old.read(0, &mut buf).unwrap();
        assert_eq!(buf, vec![i as u8 + 1; 4096], "old handle {i}");
    }

    // Every acknowledged allocation is owned by its path, and no block twice.
    let status = client.status().unwrap();
    let mut owner: HashMap<BlockId, String> = HashMap::new();
    for u in status.paths.iter().filter(|u| u.blocks > 0) {
        for b in client.open_blocks(u.path.as_str(), false).unwrap() {
            if let Some(other) = owner.insert(b.id(), u.path.to_string()) {
                panic!("block {} owned by {other} and {}", b.id(), u.path);
            }
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.values().map(Vec::len).sum::<usize>() > 0);
    for (path, ids) in &acked {
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{path} was handed a block twice");
        for id in ids {
            assert_eq!(
                owner.get(id).map(String::as_str),
                Some(path.as_str()),
                "acknowledged block {id} of {path} after recovery"
            );
        }
    }
    let quota = status.paths.iter().find(|u| u.path.as_str() == "/job");
    assert_eq!(
        quota.and_then(|u| u.quota),
        Some(1000 * BS),
        "quota recovered"
    );

    // Nothing leaks: removing the job returns every block to the free pool.
    drop(tasks);
    drop(keep);
    client.remove("/job").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            node_counts(&client).is_some_and(|n| {
                n.len() == 2
                    && n.iter()
                        .all(|&(alive, free, rev, total)| alive && rev == 0 && free == total)
            })
        }),
        "all capacity back: {:?}",
        node_counts(&client)
    );
    assert_eq!(client.status().unwrap().used_bytes, 0);

    // The log rolled over to new snapshot generations while running (2 starts alone
    // make 2 generations), and only the current generation is kept.
    let snapshots: Vec<u64> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("snapshot.")?.parse().ok()
        })
        .collect();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert!(snapshots[0] > 2, "generation {snapshots:?}");
}

#[test]
fn restart_with_an_empty_data_dir_starts_empty_and_nodes_rejoin_fresh() {
    // A controller without recoverable metadata for the node: the node re-registers
    // under a new id with a scrubbed region, so nothing of the old data is readable.
    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut ctl = controller_at("127.0.0.1:0", dir1.path());
    let addr = ctl.addr.clone();
    let _n = memnode(&addr, "1MiB", "soft");
    let client = Client::connect(&addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let t = client.task("/a/t").unwrap();
    let b = t.alloc(BS).unwrap().remove(0);
    b.write(0, b"old life").unwrap();
    ctl.kill();
    let _ctl = controller_at(&addr, dir2.path());
    assert!(eventually(Duration::from_secs(10), || live_nodes(&client) == 1));
    let st = client.status().unwrap();
    assert!(st.paths.is_empty(), "{:?}", st.paths);
    assert_eq!(st.nodes.len(), 1);
    // The old grant stops working (once the node has processed its new
    // registration), and the new owner reads zeroes.
    let mut buf = [0xffu8; 8];
    assert!(
        eventually(Duration::from_secs(5), || b.read(0, &mut buf).is_err()),
        "old grant revoked"
    );
    let t2 = client.task("/b/t").unwrap();
    let fresh = t2.alloc(BS).unwrap().remove(0);
    assert_eq!(fresh.id().node, st.nodes[0].endpoint.node);
    assert!(eventually(Duration::from_secs(5), || fresh
        .read(0, &mut buf)
        .is_ok()));
    assert_eq!(buf, [0u8; 8]);
}
