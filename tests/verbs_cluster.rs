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
