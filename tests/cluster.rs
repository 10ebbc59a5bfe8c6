//! End-to-end tests against real controller and memory-node processes on 127.0.0.1.

mod common;

use common::{controller, eventually, memnode};
use farpool::proto::ControlError;
use farpool::{Client, ClientError, Placement};
use farpool_rdma::soft::SoftTransport;
use farpool_rdma::{OpError, RKey, RemoteAddr, Transport};
use std::time::Duration;

const BS: u64 = 64 << 10;

fn live_nodes(c: &Client) -> usize {
    c.status()
        .map(|s| s.nodes.iter().filter(|n| n.alive).count())
        .unwrap_or(0)
}

fn op_error(e: &ClientError) -> Option<&OpError> {
    match e {
        ClientError::Transport(farpool_rdma::Error::Op(op)) => Some(op),
        ClientError::Transport(farpool_rdma::Error::Partial { error, .. }) => Some(error),
        _ => None,
    }
}

#[test]
fn blocks_span_nodes_and_serve_every_operation() {
    let ctl = controller();
    let _n1 = memnode(&ctl.addr, "4MiB", "soft");
    let _n2 = memnode(&ctl.addr, "4MiB", "soft");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 2));

    let task = client.task("/job1/map/t0").unwrap();
    let blocks = task.alloc_with(4 * BS, Placement::Spread).unwrap();
    assert_eq!(blocks.len(), 4);
    let nodes: std::collections::HashSet<u32> = blocks.iter().map(|b| b.id().node).collect();
    assert_eq!(nodes.len(), 2, "spread placement uses both nodes");

    for (i, b) in blocks.iter().enumerate() {
        let data = vec![i as u8 + 1; 1000];
        b.write(100, &data).unwrap();
        let mut back = vec![0u8; 1000];
        b.read(100, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(b.faa(0, 5).unwrap(), 0);
        assert_eq!(b.faa(0, 5).unwrap(), 5);
        assert_eq!(b.cas(0, 10, 42).unwrap(), 10);
        assert_eq!(
            b.cas(0, 10, 43).unwrap(),
            42,
            "failed CAS returns the current value"
        );
    }

    // Usage is accounted per task and summed up the tree.
    let st = client.status().unwrap();
    let usage = |p: &str| {
        st.paths
            .iter()
            .find(|u| u.path.as_str() == p)
            .map(|u| u.subtree_bytes)
    };
    assert_eq!(usage("/job1/map/t0"), Some(4 * BS));
    assert_eq!(usage("/job1"), Some(4 * BS));
    assert_eq!(st.used_bytes, 4 * BS);

    task.close().unwrap();
    assert!(eventually(Duration::from_secs(5), || client
        .status()
        .unwrap()
        .used_bytes
        == 0));
}

#[test]
fn stale_handle_fails_and_next_owner_sees_zeroes() {
    let ctl = controller();
    let _n = memnode(&ctl.addr, "128KiB", "soft"); // two blocks only
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));

    let a = client.task("/jobA/s/t").unwrap();
    let blocks = a.alloc(2 * BS).unwrap();
    blocks[0].write(0, b"secret of task A").unwrap();
    let stale = blocks[0].clone();
    a.free(blocks).unwrap();

    // free() returns only once the node applied the new epoch: from then on the
    // stale handle fails with a typed error instead of reading anything.
    let mut buf = [0u8; 16];
    let err = stale.read(0, &mut buf).unwrap_err();
    assert!(
        matches!(op_error(&err), Some(OpError::StaleEpoch { .. })),
        "{err}"
    );
    let err = stale.write(0, b"overwrite").unwrap_err();
    assert!(
        matches!(op_error(&err), Some(OpError::StaleEpoch { .. })),
        "{err}"
    );

    // Another job gets the same memory back, zeroed, under a new epoch.
    let b = client.task("/jobB/s/t").unwrap();
    let fresh = eventually(Duration::from_secs(5), || b.alloc(2 * BS).is_ok());
    assert!(fresh, "blocks come back after revocation");
    let mine = b.blocks().unwrap();
    for h in &mine {
        let mut buf = [0xffu8; 16];
        h.read(0, &mut buf).unwrap();
        assert_eq!(
            buf, [0u8; 16],
            "a new owner never sees the previous owner's bytes"
        );
    }
    assert!(stale.read(0, &mut buf).is_err());
}

#[test]
fn forged_keys_and_out_of_range_addresses_are_refused() {
    let ctl = controller();
    let _n = memnode(&ctl.addr, "1MiB", "soft");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let victim = client.task("/victim/s/t").unwrap();
    let vb = victim.alloc(BS).unwrap().remove(0);
    vb.write(0, b"victim data").unwrap();

    let attacker = client.task("/attacker/s/t").unwrap();
    let ab = attacker.alloc(BS).unwrap().remove(0);
    let raw = SoftTransport::connect(&ab.grant().endpoint.addr).unwrap();

    // Attacker's own key on the victim's block: denied.
    let own = RKey {
        key: ab.grant().key,
        epoch: ab.grant().epoch,
        expiry: ab.grant().expiry,
    };
    let mut buf = [0u8; 11];
    let e = raw
        .read(RemoteAddr::new(vb.grant().offset, own), &mut buf)
        .unwrap_err();
    assert!(
        matches!(
            e,
            farpool_rdma::Error::Op(OpError::OutOfBounds { .. })
                | farpool_rdma::Error::Op(OpError::AccessDenied)
        ),
        "{e}"
    );
    // Guessed keys with the right epoch: denied.
    for guess in [1u64, 0, u64::MAX, vb.grant().key ^ 1] {
        let k = RKey {
            key: guess,
            epoch: vb.grant().epoch,
            expiry: vb.grant().expiry,
        };
        let e = raw
            .write(RemoteAddr::new(vb.grant().offset, k), b"pwned")
            .unwrap_err();
        assert!(
            matches!(e, farpool_rdma::Error::Op(OpError::AccessDenied)),
            "{e}"
        );
    }
    // Past the region end and misaligned atomics: typed errors.
    let e = raw
        .read(RemoteAddr::new(1 << 40, own), &mut buf)
        .unwrap_err();
    assert!(
        matches!(e, farpool_rdma::Error::Op(OpError::OutOfBounds { .. })),
        "{e}"
    );
    let e = raw
        .fetch_add(RemoteAddr::new(ab.grant().offset + 3, own), 1)
        .unwrap_err();
    assert!(
        matches!(e, farpool_rdma::Error::Op(OpError::Misaligned { .. })),
        "{e}"
    );
    // Client-side bounds checks catch the same mistakes before the wire.
    assert!(matches!(
        ab.read(BS - 4, &mut buf),
        Err(ClientError::OutOfBounds { .. })
    ));
    assert!(matches!(ab.faa(4, 1), Err(ClientError::Misaligned(4))));

    // A read-only grant cannot write.
    let ro = client.open_blocks("/victim/s/t", false).unwrap().remove(0);
    let e = ro.write(0, b"x").unwrap_err();
    assert!(matches!(op_error(&e), Some(OpError::ReadOnly)), "{e}");

    // The victim's data is intact and its handle still works.
    let mut back = [0u8; 11];
    vb.read(0, &mut back).unwrap();
    assert_eq!(&back, b"victim data");
}

#[test]
fn quotas_bound_a_job_and_usage_sums_up() {
    let ctl = controller();
    let _n = memnode(&ctl.addr, "2MiB", "soft");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    client.set_quota("/q", Some(3 * BS)).unwrap();
    let t1 = client.task("/q/s/t1").unwrap();
    let t2 = client.task("/q/s/t2").unwrap();
    t1.alloc(2 * BS).unwrap();
    let err = t2.alloc(2 * BS).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Control(ControlError::QuotaExceeded { .. })
        ),
        "{err}"
    );
    t2.alloc(BS).unwrap();
    // Out of capacity is all-or-nothing and says how much is free.
    let big = client.task("/big/s/t").unwrap();
    let err = big.alloc(1 << 30).unwrap_err();
    assert!(
        matches!(err, ClientError::Control(ControlError::NoCapacity { .. })),
        "{err}"
    );
    let st = client.status().unwrap();
    assert_eq!(st.used_bytes, 3 * BS);
}

#[test]
fn expired_leases_reclaim_blocks_of_vanished_tasks() {
    let ctl = controller();
    let _n = memnode(&ctl.addr, "1MiB", "soft");
    let observer = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&observer) == 1));
    let stale;
    {
        // A task whose process "crashes": nobody closes it or renews its lease.
        let crashed = Client::connect(&ctl.addr).unwrap();
        let task = crashed.task("/crashy/s/t").unwrap();
        let b = task.alloc(BS).unwrap();
        b[0].write(0, b"orphan").unwrap();
        stale = b[0].clone();
        // Stop renewing without freeing, then vanish.
        task.finish().unwrap();
    }
    // A task that keeps renewing survives the same period.
    let alive_client = Client::connect(&ctl.addr).unwrap();
    let alive = alive_client.task("/steady/s/t").unwrap();
    let kept = alive.alloc(BS).unwrap().remove(0);
    kept.write(0, b"kept").unwrap();

    assert!(
        eventually(Duration::from_secs(10), || {
            let st = observer.status().unwrap();
            !st.paths
                .iter()
                .any(|p| p.path.as_str().starts_with("/crashy"))
        }),
        "expired path is reclaimed"
    );
    let mut buf = [0u8; 6];
    let err = stale.read(0, &mut buf).unwrap_err();
    assert!(
        matches!(op_error(&err), Some(OpError::StaleEpoch { .. })),
        "{err}"
    );
    let mut back = [0u8; 4];
    kept.read(0, &mut back).unwrap();
    assert_eq!(&back, b"kept");
    assert!(observer.status().unwrap().blocks_expired_total >= 1);
}

#[test]
fn dead_memory_node_is_detected_and_avoided() {
    let ctl = controller();
    let mut n1 = memnode(&ctl.addr, "1MiB", "soft");
    let _n2 = memnode(&ctl.addr, "1MiB", "soft");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 2));
    let st = client.status().unwrap();
    let dead_addr = n1.addr.clone();
    let dead_id = st
        .nodes
        .iter()
        .find(|n| n.endpoint.addr == dead_addr)
        .unwrap()
        .endpoint
        .node;
    n1.kill();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let task = client.task("/after/s/t").unwrap();
    let blocks = task.alloc(4 * BS).unwrap();
    assert!(blocks.iter().all(|b| b.id().node != dead_id));
    blocks[0].write(0, b"ok").unwrap();
}

#[test]
fn shm_transport_serves_same_host_clients() {
    let ctl = controller();
    let _n = memnode(&ctl.addr, "1MiB", "shm");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let task = client.task("/shm/s/t").unwrap();
    let b = task.alloc(BS).unwrap().remove(0);
    b.write(8, b"over shm").unwrap();
    let mut buf = [0u8; 8];
    b.read(8, &mut buf).unwrap();
    assert_eq!(&buf, b"over shm");
    assert_eq!(b.faa(0, 3).unwrap(), 0);
    let stale = b.clone();
    task.free(vec![b]).unwrap();
    let err = stale.read(8, &mut buf).unwrap_err();
    assert!(
        matches!(op_error(&err), Some(OpError::StaleEpoch { .. })),
        "{err}"
    );
}

#[test]
fn status_command_prints_json_and_tables() {
    let ctl = controller();
    let _n = memnode(&ctl.addr, "1MiB", "soft");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let t = client.task("/wc/map/m0").unwrap();
    t.alloc(BS).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["status", "--controller", &ctl.addr, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["used_bytes"], serde_json::json!(BS));
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1);
    let out = std::process::Command::new(common::bin())
        .args(["status", "--controller", &ctl.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NODES") && text.contains("m0"), "{text}");
}

#[test]
fn demo_runs_and_exits_zero() {
    let out = std::process::Command::new(common::bin())
        .args(["demo", "--words", "20000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all memory reclaimed"), "{text}");
}

#[test]
fn malformed_frames_close_only_the_offending_connection() {
    use std::io::{Read, Write};
    let ctl = controller();
    let node = memnode(&ctl.addr, "1MiB", "soft");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let t = client.task("/good/s/t").unwrap();
    let b = t.alloc(BS).unwrap().remove(0);
    b.write(0, b"intact").unwrap();

    // Control plane: garbage, an oversized length, a truncated frame.
    for junk in [
        &b"\x05\x00\x00\x00garbage-garbage"[..],
        &u32::MAX.to_le_bytes()[..],
        &b"\x40\x00\x00\x00\x01"[..],
    ] {
        let mut s = std::net::TcpStream::connect(&ctl.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(junk).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // closed by the controller
    }
    // Data plane: garbage and an unknown preamble.
    for junk in [&[0xffu8; 64][..], &b"FARPSOFT\x63\x00\x00\x00"[..]] {
        let mut s = std::net::TcpStream::connect(&node.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(junk).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // Everyone else carries on.
    let mut back = [0u8; 6];
    b.read(0, &mut back).unwrap();
    assert_eq!(&back, b"intact");
    assert_eq!(live_nodes(&client), 1);
    t.alloc(BS).unwrap();
}
