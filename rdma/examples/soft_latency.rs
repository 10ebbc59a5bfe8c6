//! Loopback latency and throughput probe for the soft transport.
//!
//! `cargo run --release -p farpool-rdma --example soft_latency -- [clients] [depth] [secs]`
//!
//! Starts a [`SoftServer`] in-process, measures depth-1 4 KiB READ/WRITE latency
//! percentiles from one client, then aggregate 4 KiB READ throughput from `clients`
//! threads each keeping `depth` operations in flight (one batch of `depth` at a time).
//!
//! It does so twice per round, for two rounds: with plain block keys
//! ([`GrantCheck::Keys`]) and with capabilities ([`GrantCheck::Capabilities`], a MAC
//! over an expiry checked on every operation, what farpool memory nodes run), so the
//! cost of verifying capabilities shows in one run on one machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use farpool_rdma::access::{grant_mac, unix_now_secs};
use farpool_rdma::soft::{
    GrantCheck, SoftClientConfig, SoftServer, SoftServerConfig, SoftTransport,
};
use farpool_rdma::{AccessTable, Op, RKey, Region, RegionOptions, RemoteAddr, Transport};

const BLOCK: u64 = 1 << 20;
const REGION: u64 = 16 * BLOCK;
const KEY: RKey = RKey {
    key: 0x1A7E,
    epoch: 0,
    expiry: 0,
};

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    format!(
        "p50 {:.1} us  p90 {:.1} us  p99 {:.1} us",
        p(0.5),
        p(0.9),
        p(0.99)
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let clients = args.first().copied().unwrap_or(4);
    let depth = args.get(1).copied().unwrap_or(16);
    let secs = args.get(2).copied().unwrap_or(3) as u64;

    let opts = RegionOptions {
        hugepages: true,
        lock: false,
    };
    let region = Arc::new(Region::anonymous(REGION as usize, opts)?);
    let access = Arc::new(AccessTable::new(REGION, BLOCK)?);
    for b in 0..access.num_blocks() {
        access.set(b, KEY.epoch, KEY.key, 0);
    }
    region.write(0, &vec![1u8; REGION as usize])?;
    for round in 1..=2 {
        for grants in [GrantCheck::Keys, GrantCheck::Capabilities] {
            println!("round {round}, {grants:?}:");
            let key = match grants {
                GrantCheck::Keys => KEY,
                GrantCheck::Capabilities => {
                    let expiry = unix_now_secs().saturating_add(3600);
                    RKey {
                        key: grant_mac(KEY.key, expiry),
                        epoch: KEY.epoch,
                        expiry,
                    }
                }
            };
            let config = SoftServerConfig {
                grants,
                ..SoftServerConfig::default()
            };
            run(&region, &access, config, key, clients, depth, secs)?;
        }
    }
    Ok(())
}

fn run(
    region: &Arc<Region>,
    access: &Arc<AccessTable>,
    config: SoftServerConfig,
    key: RKey,
    clients: usize,
    depth: usize,
    secs: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let server = SoftServer::bind("127.0.0.1:0", region.clone(), access.clone(), config)?;
    let addr = server.local_addr().to_string();
    let cfg = SoftClientConfig {
        max_connections: clients.max(1),
        ..Default::default()
    };
    let t = SoftTransport::connect_with(&addr, cfg)?;

    let mut buf = vec![0u8; 4096];
    let data = vec![7u8; 4096];
    for (name, is_read) in [("read 4 KiB", true), ("write 4 KiB", false)] {
        let mut lat = Vec::with_capacity(20_000);
        for i in 0..20_000u64 {
            let at = RemoteAddr::new((i % 4000) * 4096, key);
            let start = Instant::now();
            if is_read {
                t.read(at, &mut buf)?;
            } else {
                t.write(at, &data)?;
            }
            lat.push(start.elapsed());
        }
        println!("depth 1, {name}: {}", percentiles(lat));
    }

    let deadline = Instant::now() + Duration::from_secs(secs);
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let t = &t;
                s.spawn(move || {
                    let mut bufs = vec![vec![0u8; 4096]; depth];
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let mut ops: Vec<Op> = bufs
                            .iter_mut()
                            .enumerate()
                            .map(|(i, b)| {
                                let slot = (c * depth + i) as u64 % 4000;
                                Op::read(RemoteAddr::new(slot * 4096, key), b)
                            })
                            .collect();
                        if t.execute(&mut ops).is_err() {
                            break;
                        }
                        n += depth as u64;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    println!(
        "{clients} clients x depth {depth}, read 4 KiB: {:.0} ops/s",
        total as f64 / secs as f64
    );
    Ok(())
}
