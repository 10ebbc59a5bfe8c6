//! Malformed, truncated, oversized and random bytes on every port a farpool process
//! listens on — the controller's control and metrics ports, a memory node's data and
//! metrics ports, and a DAG worker's `--listen` port — get an error or a disconnect,
//! never a crash or a hang, and every server keeps serving well-behaved peers, also
//! while a stalled half-frame connection stays open on each port.

mod common;

use common::{eventually, spawn, spawn_with_metrics};
use farpool::dag::process::{WorkerConfig, WorkerPool};
use farpool::dag::workloads::{TreeSpec, WorkloadSpec};
use farpool::dag::Scheduler;
use farpool::metrics::scrape;
use farpool::Client;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// The bad inputs sent to every port.
fn bad_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = vec![
        ("empty", Vec::new()),
        ("oversized length", {
            let mut b = vec![0xFF; 8];
            b.extend(random_bytes(9, 56));
            b
        }),
        ("truncated frame", {
            let mut b = 100u32.to_le_bytes().to_vec();
            b.extend(random_bytes(10, 10));
            b
        }),
        ("huge http request line", {
            let mut b = b"GET /".to_vec();
            b.resize(b.len() + (1 << 20), b'a');
            b
        }),
        ("http garbage", b"BREW /metrics HTCPCP/1.0\r\n\r\n".to_vec()),
    ];
    for (i, len) in [1usize, 7, 64, 4096, 65536].into_iter().enumerate() {
        v.push(("random", random_bytes(1000 + i as u64, len)));
    }
    v
}

/// Sends `data` to `addr`, closes the sending side and waits for the server to answer
/// and close, or to reset: a server that does neither within the bound hangs.
fn send_and_expect_close(addr: &str, what: &str, data: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr} ({what}): {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may close while we still write (that is a disconnect too).
    let _ = s.write_all(data);
    let _ = s.shutdown(Shutdown::Write);
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "{addr} ({what}): neither closed nor reset after {:?}",
                    start.elapsed()
                )
            }
            Err(_) => return, // reset: a disconnect
        }
    }
}

#[test]
fn bad_bytes_on_every_port_leave_every_server_serving() {
    let (ctl, ctl_metrics) = spawn_with_metrics(&[
        "controller",
        "--listen",
        "127.0.0.1:0",
        "--heartbeat-ms",
        "100",
        "--missed-heartbeats",
        "20",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let (node, node_metrics) = spawn_with_metrics(&[
        "memnode",
        "--controller",
        &ctl.addr,
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "16MiB",
        "--block-size",
        "64KiB",
        "--no-lock",
        "--no-hugepages",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let worker = spawn(&[
        "worker",
        "--controller",
        &ctl.addr,
        "--listen",
        "127.0.0.1:0",
    ]);
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        client
            .status()
            .map(|s| !s.nodes.is_empty())
            .unwrap_or(false)
    }));
    // Data another client wrote before the attack, checked after it.
    let task = client.task("/victim/t").unwrap();
    let blocks = task.alloc(64 << 10).unwrap();
    blocks[0].write(0, b"still here").unwrap();

    let ports = [
        ("controller control", ctl.addr.clone()),
        ("controller metrics", ctl_metrics.clone()),
        ("memnode data", node.addr.clone()),
        ("memnode metrics", node_metrics.clone()),
        ("worker", worker.addr.clone()),
    ];
    for (port, addr) in &ports {
        for (what, data) in bad_inputs() {
            send_and_expect_close(addr, &format!("{port}: {what}"), &data);
        }
    }

    // A stalled half frame stays open on every port while the others are served.
    let stalled: Vec<TcpStream> = ports
        .iter()
        .map(|(_, addr)| {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&64u32.to_le_bytes());
            s
        })
        .collect();

    let mut got = [0u8; 10];
    blocks[0].read(0, &mut got).unwrap();
    assert_eq!(&got, b"still here");
    let other = client.task("/other/t").unwrap();
    let fresh = other.alloc(64 << 10).unwrap();
    fresh[0].write(0, &[5u8; 4096]).unwrap();
    let mut back = vec![0u8; 4096];
    fresh[0].read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 5));
    for addr in [&ctl_metrics, &node_metrics] {
        let text = scrape(addr, Duration::from_secs(5)).unwrap();
        assert!(text.contains("farpool_"), "{addr}: {text}");
    }
    let mut pool = WorkerPool::new(WorkerConfig {
        bin: common::bin().into(),
        controller: ctl.addr.clone(),
        workers: 2,
        inline_limit: 4096,
        cluster_large_outputs: true,
        crash_in: None,
        crash_site: Default::default(),
        free_intermediates: true,
        remote: vec![worker.addr.clone()],
    })
    .unwrap();
    let spec = WorkloadSpec::Tr(TreeSpec {
        leaves: 16,
        ..TreeSpec::default()
    });
    let w = spec.build().unwrap();
    let out = pool.run(&client, spec, Scheduler::Wukong).unwrap();
    let check = w.check(&out).unwrap();
    assert!(check.correct, "{}", check.detail);
    drop(stalled);
}
