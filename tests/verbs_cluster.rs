//! End to end over RDMA verbs: a controller, two memory nodes started with
//! `--transport verbs`, and a client, all on one RDMA device (Soft-RoCE in
//! `scripts/softroce-test.sh`). Without the `verbs` feature: a memory node asked for
//! verbs exits non-zero and says how to get it.

mod common;

#[cfg(feature = "verbs")]
mod with_device {
    use super::common::{eventually, spawn, Proc};
    use farpool::{Client, Placement};
    use std::time::Duration;

    const BS: u64 = 64 << 10;

    /// Whether there is a device to test on; panics instead when the caller insists.
    fn have_device() -> bool {
        if !farpool_rdma::verbs::device_names().is_empty() {
            return true;
        }
        assert_ne!(
            std::env::var("FARPOOL_VERBS_REQUIRE").as_deref(),
            Ok("1"),
            "no RDMA device, and FARPOOL_VERBS_REQUIRE=1"
        );
        eprintln!("skipped: no RDMA device (scripts/softroce-test.sh runs this on Soft-RoCE)");
        false
    }

    /// A controller that tolerates slow heartbeats: under software emulation (the
    /// Soft-RoCE VM on a busy host) a node can miss several 100 ms heartbeats in a row,
    /// and a node declared dead would skew placement.
    fn controller() -> Proc {
        spawn(&[
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--lease-secs",
            "1",
            "--grace-secs",
            "0.5",
            "--heartbeat-ms",
            "200",
            "--missed-heartbeats",
            "50",
        ])
    }

    fn verbs_node(ctl: &str, capacity: &str) -> Proc {
        spawn(&[
            "memnode",
            "--controller",
            ctl,
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            capacity,
            "--block-size",
            "64KiB",
            "--transport",
            "verbs",
            "--no-lock",
            "--no-hugepages",
        ])
    }

    fn live_nodes(c: &Client) -> usize {
        c.status()
            .map(|s| s.nodes.iter().filter(|n| n.alive).count())
            .unwrap_or(0)
    }

    #[test]
    fn two_verbs_nodes_serve_every_operation() {
        if !have_device() {
            return;
        }
        let ctl = controller();
        let _n1 = verbs_node(&ctl.addr, "4MiB");
        let _n2 = verbs_node(&ctl.addr, "4MiB");
        let client = Client::connect(&ctl.addr).unwrap();
        assert!(eventually(Duration::from_secs(10), || live_nodes(&client) == 2));
        let st = client.status().unwrap();
        assert!(st
            .nodes
            .iter()
            .all(|n| format!("{:?}", n.endpoint.transport) == "Verbs"));

        let task = client.task("/verbs/map/t0").unwrap();
        let blocks = task.alloc_with(4 * BS, Placement::Spread).unwrap();
        let nodes: std::collections::HashSet<u32> = blocks.iter().map(|b| b.id().node).collect();
        assert_eq!(nodes.len(), 2, "spread placement uses both nodes");
        for (i, b) in blocks.iter().enumerate() {
            let data: Vec<u8> = (0..20_000u32).map(|j| (j as u8) ^ (i as u8)).collect();
            b.write(100, &data).unwrap();
            let mut back = vec![0u8; data.len()];
            b.read(100, &mut back).unwrap();
            assert!(back == data, "block {i}");
            assert_eq!(b.faa(0, 5).unwrap(), 0);
            assert_eq!(b.faa(0, 5).unwrap(), 5);
            assert_eq!(b.cas(0, 10, 42).unwrap(), 10);
            assert_eq!(b.cas(0, 10, 43).unwrap(), 42);
        }
        task.close().unwrap();
    }

    /// Issue 4's "every structure works over verbs": File, Queue, Kv (through splits
    /// and merges, with a value in a block of its own) and Log, with two clients at a
    /// time, over two verbs memory nodes. Every acknowledged item is checked.
    #[test]
    fn every_data_structure_works_over_verbs() {
        use farpool::ds::{File, Kv, KvConfig, Log, Queue, QueueConfig};
        use std::collections::HashMap;
        use std::io::{Seek, SeekFrom};
        if !have_device() {
            return;
        }
        let ctl = controller();
        let _n1 = verbs_node(&ctl.addr, "8MiB");
        let _n2 = verbs_node(&ctl.addr, "8MiB");
        let client = Client::connect(&ctl.addr).unwrap();
        let other = Client::connect(&ctl.addr).unwrap();
        assert!(eventually(Duration::from_secs(10), || live_nodes(&client) == 2));
        let task = client.task("/verbs/ds/t").unwrap();
        let _keep = other.task("/verbs/ds/t").unwrap();

        // File: appends across blocks, positional writes, seek and read back.
        let f = File::create(&task, "f").unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(30_000) {
            f.append(chunk).unwrap();
        }
        f.write_at(70_000, b"verbs").unwrap();
        let mut want = data.clone();
        want[70_000..70_005].copy_from_slice(b"verbs");
        let g = File::open(&other, "/verbs/ds/t/f").unwrap();
        assert_eq!(g.len().unwrap(), data.len() as u64);
        assert!(g.read_all().unwrap() == want, "file contents");
        let mut h = File::open(&other, "/verbs/ds/t/f").unwrap();
        assert_eq!(h.seek(SeekFrom::End(-5)).unwrap(), data.len() as u64 - 5);

        // Queue: two producers, two consumers, segments linked and freed.
        let q = Queue::create(&task, "q", QueueConfig { slot_size: 64 }).unwrap();
        let q2 = Queue::open(&other, "/verbs/ds/t/q").unwrap();
        const ITEMS: u32 = 1500;
        std::thread::scope(|s| {
            for (p, queue) in [(0u32, &q), (1, &q2)] {
                s.spawn(move || {
                    for i in 0..ITEMS {
                        let mut item = p.to_le_bytes().to_vec();
                        item.extend_from_slice(&i.to_le_bytes());
                        queue.enqueue(&item).unwrap();
                    }
                });
            }
        });
        let mut next = [0u32; 2];
        let mut got = 0;
        while let Some(item) = if got % 2 == 0 { &q } else { &q2 }.dequeue().unwrap() {
            let p = u32::from_le_bytes(item[0..4].try_into().unwrap()) as usize;
            let i = u32::from_le_bytes(item[4..8].try_into().unwrap());
            assert_eq!(i, next[p], "producer {p}: lost, duplicated or out of order");
            next[p] += 1;
            got += 1;
        }
        assert_eq!(next, [ITEMS, ITEMS]);
        let segs = q.segments();
        assert!(segs.linked > 1, "the queue never grew: {segs:?}");

        // Kv: two clients grow the table through splits, one big value lives in a
        // block of its own, then removals merge partitions again.
        let config = KvConfig {
            split_load: 0.5,
            merge_load: 0.2,
            ..KvConfig::default()
        };
        let kv = Kv::create(&task, "kv", config).unwrap();
        let kv2 = Kv::open(&other, "/verbs/ds/t/kv").unwrap();
        let key = |c: usize, i: usize| format!("c{c}-key-{i}").into_bytes();
        let val = |c: usize, i: usize| format!("value {i} of client {c}").repeat(4).into_bytes();
        const KEYS: usize = 600;
        std::thread::scope(|s| {
            for (c, t) in [(0, &kv), (1, &kv2)] {
                s.spawn(move || {
                    for i in 0..KEYS {
                        t.upsert(&key(c, i), &val(c, i)).unwrap();
                    }
                });
            }
        });
        let big: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        assert!(kv.put(b"big", &big).unwrap());
        assert!(kv.update(&key(0, 1), b"updated").unwrap());
        let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for c in 0..2 {
            for i in 0..KEYS {
                model.insert(key(c, i), val(c, i));
            }
        }
        model.insert(key(0, 1), b"updated".to_vec());
        model.insert(b"big".to_vec(), big.clone());
        let grown = kv2.partitions().unwrap();
        assert!(grown > 2, "no split over verbs: {grown} partitions");
        for (k, v) in &model {
            assert_eq!(
                kv2.get(k).unwrap().as_ref(),
                Some(v),
                "{}",
                String::from_utf8_lossy(k)
            );
        }
        for c in 0..2 {
            for i in 20..KEYS {
                assert!(kv.remove(&key(c, i)).unwrap());
                model.remove(&key(c, i));
            }
        }
        let entries: HashMap<Vec<u8>, Vec<u8>> = kv2.entries().unwrap().into_iter().collect();
        assert!(entries == model, "table contents after removals");
        let r = kv.repartitions();
        let r2 = kv2.repartitions();
        assert!(
            r.merges + r2.merges > 0,
            "no merge over verbs: {r:?} {r2:?}"
        );
        assert!(kv2.partitions().unwrap() < grown);

        // Log: appends to streams from two clients, filtered scans, trim.
        let log = Log::create(&task, "log").unwrap();
        let log2 = Log::open(&other, "/verbs/ds/t/log").unwrap();
        let mut positions = Vec::new();
        for i in 0..200u32 {
            let (l, stream) = if i % 2 == 0 { (&log, 1) } else { (&log2, 2) };
            positions.push(l.append(&i.to_le_bytes(), &[stream]).unwrap());
        }
        let end = log.end().unwrap();
        let odd = log2.scan(0, end, &[2]).unwrap();
        assert_eq!(odd.entries.len(), 100);
        for (e, i) in odd.entries.iter().zip((1..200u32).step_by(2)) {
            assert_eq!(e.data, i.to_le_bytes(), "entry at {}", e.position);
            assert_eq!(e.position, positions[i as usize]);
        }
        log.trim(positions[100]).unwrap();
        let rest = log2.scan(log2.start().unwrap(), end, &[]).unwrap();
        assert_eq!(rest.entries.len(), 100);
        assert_eq!(rest.entries[0].data, 100u32.to_le_bytes());
        task.close().unwrap();
    }

    #[test]
    fn next_owner_sees_zeroes_on_verbs() {
        if !have_device() {
            return;
        }
        let ctl = controller();
        let _n = verbs_node(&ctl.addr, "128KiB"); // two blocks
        let client = Client::connect(&ctl.addr).unwrap();
        assert!(eventually(Duration::from_secs(10), || live_nodes(&client) == 1));
        let a = client.task("/jobA/s/t").unwrap();
        let blocks = a.alloc(2 * BS).unwrap();
        // Written by the RDMA device, which the memory node does not see: the node must
        // scrub the whole block, not just a tracked prefix.
        blocks[0].write(BS - 16, b"secret of task A").unwrap();
        blocks[1].write(0, b"secret of task A").unwrap();
        a.free(blocks).unwrap();

        let b = client.task("/jobB/s/t").unwrap();
        assert!(eventually(Duration::from_secs(5), || b
            .alloc(2 * BS)
            .is_ok()));
        for h in b.blocks().unwrap() {
            let mut head = [0xffu8; 16];
            let mut tail = [0xffu8; 16];
            h.read(0, &mut head).unwrap();
            h.read(BS - 16, &mut tail).unwrap();
            assert_eq!((head, tail), ([0u8; 16], [0u8; 16]));
        }
    }
}

#[cfg(not(feature = "verbs"))]
#[test]
fn verbs_memnode_without_the_feature_exits_nonzero_and_says_why() {
    let out = std::process::Command::new(common::bin())
        .args([
            "memnode",
            "--controller",
            "127.0.0.1:9",
            "--capacity",
            "1MiB",
            "--transport",
            "verbs",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features verbs"), "{err}");
}
