//! Graceful shutdown on SIGTERM with real processes on 127.0.0.1: a memory node drains
//! its data plane and deregisters; a controller flushes its metadata log and exits 0,
//! and a restart on the same data directory has everything it acknowledged (paths,
//! quotas, pins, blocks and data).

mod common;

use common::{eventually, memnode, spawn, Proc};
use farpool::Client;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: u64 = 64 << 10;

fn controller_at(listen: &str, data_dir: &Path) -> Proc {
    spawn(&[
        "controller",
        "--listen",
        listen,
        "--data-dir",
        data_dir.to_str().expect("utf-8 temp path"),
        "--heartbeat-ms",
        "100",
        // Dead only after 5 s of silence: a faster "dead" proves deregistration.
        "--missed-heartbeats",
        "50",
    ])
}

fn sigterm(p: &Proc) {
    let ok = Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM {}", p.pid());
}

/// Waits for the process to exit; returns whether it exited with status 0.
fn exits_cleanly(p: &mut Proc, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn live_nodes(c: &Client) -> usize {
    c.status()
        .map(|s| s.nodes.iter().filter(|n| n.alive).count())
        .unwrap_or(0)
}

#[test]
fn sigterm_drains_a_memory_node_and_deregisters_it() {
    let dir = tempfile::tempdir().unwrap();
    let _ctl = controller_at("127.0.0.1:0", dir.path());
    let mut node = memnode(&_ctl.addr, "1MiB", "soft");
    let client = Client::connect(&_ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let task = client.task("/j/t").unwrap();
    let block = task.alloc(BS).unwrap().remove(0);

    // A client hammering the node while it drains: every operation either completes
    // correctly or fails; none returns wrong data.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let worker = {
        let (block, stop, done) = (block.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let data = i.to_le_bytes();
                if block.write(8, &data).is_err() {
                    return;
                }
                let mut back = [0u8; 8];
                match block.read(8, &mut back) {
                    Ok(()) => assert_eq!(back, data, "read back after write {i}"),
                    Err(_) => return,
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    assert!(eventually(Duration::from_secs(5), || done
        .load(Ordering::Relaxed)
        > 20));

    let t0 = Instant::now();
    sigterm(&node);
    assert!(
        exits_cleanly(&mut node, Duration::from_secs(10)),
        "memory node exits 0 after SIGTERM"
    );
    // Deregistered: dead long before 50 missed heartbeats (5 s).
    assert!(
        eventually(Duration::from_secs(2), || live_nodes(&client) == 0),
        "node deregistered"
    );
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    worker.join().expect("no wrong data while draining");
    assert!(block.write(0, b"x").is_err(), "the node is gone");
}

#[test]
fn sigterm_flushes_the_controller_log_and_a_restart_has_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller_at("127.0.0.1:0", dir.path());
    let addr = ctl.addr.clone();
    let _node = memnode(&addr, "1MiB", "soft");
    let client = Client::connect(&addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || live_nodes(&client) == 1));
    let lease = client.lease("/job").unwrap();
    let task = client.task("/job/t").unwrap();
    let blocks = task.alloc(3 * BS).unwrap();
    blocks[2].write(0, b"survives").unwrap();
    client.set_quota("/job", Some(10 * BS)).unwrap();
    client.pin("/job/t", true).unwrap();

    sigterm(&ctl);
    assert!(
        exits_cleanly(&mut ctl, Duration::from_secs(10)),
        "controller exits 0 after SIGTERM"
    );
    let _ctl = controller_at(&addr, dir.path());
    assert!(eventually(Duration::from_secs(10), || live_nodes(&client) == 1));
    let st = client.status().unwrap();
    let job = st.paths.iter().find(|u| u.path.as_str() == "/job").unwrap();
    assert_eq!(job.quota, Some(10 * BS));
    assert_eq!(job.subtree_bytes, 3 * BS);
    let t = st
        .paths
        .iter()
        .find(|u| u.path.as_str() == "/job/t")
        .unwrap();
    assert!(t.pinned, "pin recovered");
    assert!(t.lease_remaining_ms > 0, "lease re-armed");
    let again = client.open_blocks("/job/t", false).unwrap();
    let mut buf = [0u8; 8];
    again[2].read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"survives");
    drop(task);
    drop(lease);
}
