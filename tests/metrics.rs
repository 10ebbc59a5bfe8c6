//! `--metrics`: real controller and memory-node processes serve Prometheus text that
//! moves with the operations clients perform.

mod common;

use common::{eventually, spawn_with_metrics, spawn_with_metrics_env};
use farpool::metrics::{sample_value, scrape};
use farpool::Client;
use farpool_rdma::soft::SoftTransport;
use farpool_rdma::{RKey, RemoteAddr, Transport};
use std::time::Duration;

const BS: u64 = 64 << 10;

fn value(addr: &str, series: &str) -> f64 {
    let text = scrape(addr, Duration::from_secs(5)).expect("scrape");
    sample_value(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn controller_and_memnode_metrics_move_with_operations() {
    let (ctl, ctl_metrics) = spawn_with_metrics(&[
        "controller",
        "--listen",
        "127.0.0.1:0",
        "--heartbeat-ms",
        "100",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let (_node, node_metrics) = spawn_with_metrics(&[
        "memnode",
        "--controller",
        &ctl.addr,
        "--capacity",
        "1MiB",
        "--block-size",
        "64KiB",
        "--no-lock",
        "--no-hugepages",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        value(&ctl_metrics, "farpool_controller_nodes{state=\"alive\"}") == 1.0
    }));
    assert_eq!(
        value(&node_metrics, "farpool_memnode_region_bytes"),
        (1 << 20) as f64
    );
    assert_eq!(
        value(&node_metrics, "farpool_memnode_ops_total{op=\"write\"}"),
        0.0
    );

    let task = client.task("/job/m/t").unwrap();
    let blocks = task.alloc(2 * BS).unwrap();
    let b = blocks[0].clone();
    b.write(0, &[7u8; 1000]).unwrap();
    let mut back = [0u8; 1000];
    b.read(0, &mut back).unwrap();
    b.faa(1024, 1).unwrap();
    b.cas(1024, 1, 2).unwrap();
    // A guessed key is refused and counted as such.
    let raw = SoftTransport::connect(&b.grant().endpoint.addr).unwrap();
    let forged = RKey {
        key: b.grant().key ^ 1,
        epoch: b.grant().epoch,
        expiry: b.grant().expiry,
    };
    assert!(raw
        .write(RemoteAddr::new(b.grant().offset, forged), b"x")
        .is_err());

    // Operation counters fold in per batch; poll until they show.
    assert!(eventually(Duration::from_secs(5), || {
        value(&node_metrics, "farpool_memnode_ops_total{op=\"write\"}") >= 1.0
            && value(
                &node_metrics,
                "farpool_memnode_grants_refused_total{reason=\"bad_key\"}",
            ) >= 1.0
    }));
    assert!(value(&node_metrics, "farpool_memnode_ops_total{op=\"read\"}") >= 1.0);
    assert!(value(&node_metrics, "farpool_memnode_ops_total{op=\"cas\"}") >= 1.0);
    assert!(value(&node_metrics, "farpool_memnode_ops_total{op=\"faa\"}") >= 1.0);
    assert!(value(&node_metrics, "farpool_memnode_bytes_total{op=\"write\"}") >= 1000.0);
    assert!(value(&node_metrics, "farpool_memnode_bytes_total{op=\"read\"}") >= 1000.0);
    assert!(value(&node_metrics, "farpool_memnode_connections") >= 1.0);

    assert_eq!(
        value(&ctl_metrics, "farpool_controller_blocks_allocated_total"),
        2.0
    );
    assert_eq!(
        value(&ctl_metrics, "farpool_controller_used_bytes"),
        (2 * BS) as f64
    );
    assert!(
        value(
            &ctl_metrics,
            "farpool_controller_requests_total{kind=\"alloc\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &ctl_metrics,
            "farpool_controller_request_duration_seconds_count{kind=\"alloc\"}"
        ) >= 1.0
    );
    assert!(value(&ctl_metrics, "farpool_controller_leases{state=\"active\"}") >= 1.0);

    // Outside the region: refused as out of bounds.
    let own = RKey {
        key: b.grant().key,
        epoch: b.grant().epoch,
        expiry: b.grant().expiry,
    };
    let mut one = [0u8; 1];
    assert!(raw.read(RemoteAddr::new(1 << 40, own), &mut one).is_err());
    let stale = b.clone();
    task.free(blocks).unwrap();
    // A handle kept past free names the old epoch: refused as stale.
    assert!(stale.read(0, &mut one).is_err());
    assert!(eventually(Duration::from_secs(5), || {
        value(
            &node_metrics,
            "farpool_memnode_grants_refused_total{reason=\"stale_epoch\"}",
        ) >= 1.0
            && value(
                &node_metrics,
                "farpool_memnode_grants_refused_total{reason=\"out_of_bounds\"}",
            ) >= 1.0
    }));
    assert_eq!(
        value(&ctl_metrics, "farpool_controller_blocks_freed_total"),
        2.0
    );
    assert!(eventually(Duration::from_secs(5), || {
        value(&ctl_metrics, "farpool_controller_used_bytes") == 0.0
    }));
    // The document is well formed: every sample belongs to a declared family.
    let text = scrape(&ctl_metrics, Duration::from_secs(5)).unwrap();
    let mut families = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.insert(rest.split(' ').next().unwrap().to_string());
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| families.contains(*b)))
                .unwrap_or(name);
            assert!(line.starts_with('#') || families.contains(base), "{line}");
        }
    }
}

#[test]
fn config_file_and_environment_reach_the_processes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("farpool.toml");
    std::fs::write(
        &file,
        "[controller]\nlisten = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nlease_secs = 3\ngrace_secs = 1\n\n\
         [memnode]\ncapacity = \"512KiB\"\nblock_size = \"64KiB\"\nno_lock = true\nno_hugepages = true\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    // The file sets the lease to 3 s, the environment to 7 s: the environment wins.
    let (ctl, ctl_metrics) = spawn_with_metrics_env(
        &["controller", "--config", file],
        &[("FARPOOL_LEASE_SECS", "7")],
    );
    assert_eq!(value(&ctl_metrics, "farpool_controller_lease_seconds"), 7.0);
    // The memory node takes its capacity from the file, its controller from the
    // environment and its metrics address from a flag.
    let (_node, node_metrics) = spawn_with_metrics_env(
        &["memnode", "--metrics", "127.0.0.1:0"],
        &[("FARPOOL_CONFIG", file), ("FARPOOL_CONTROLLER", &ctl.addr)],
    );
    assert_eq!(
        value(&node_metrics, "farpool_memnode_region_bytes"),
        (512 << 10) as f64
    );
    assert!(eventually(Duration::from_secs(5), || {
        value(&ctl_metrics, "farpool_controller_capacity_bytes") == (512 << 10) as f64
    }));
    let client = Client::connect(&ctl.addr).unwrap();
    assert_eq!(client.lease_period(), Duration::from_secs(7));
}
