//! How long splitting a full 8 MiB Kv partition takes, and what it does to the
//! latency of gets on *other* partitions while it runs.
//!
//! `cargo bench --bench kv_split` (plain `main`, not criterion: each measurement
//! needs a freshly filled partition). An embedded pool (controller and two memory
//! nodes in this process, soft transport over 127.0.0.1, 8 MiB blocks) holds a table
//! of 1 KiB values. For each round: fill the table until it has split once (two
//! partitions), then keep inserting keys that land in the first partition, timing every
//! put; the put that splits it is the split's duration. Meanwhile a reader thread gets
//! keys of the *other* partition in a loop; its latencies are split into those that
//! overlapped the split and the rest. Prints one JSON object per round and a summary;
//! `FARPOOL_SPLIT_ROUNDS` sets the rounds (default 5).

use farpool::ds::{Kv, KvConfig};
use farpool::embedded::{EmbeddedConfig, EmbeddedPool};
use farpool_rdma::TransportKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: u64 = 8 << 20;
const VALUE: usize = 1024;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` lists benchmarks: there are none to list
    }
    let rounds: usize = std::env::var("FARPOOL_SPLIT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let pool = EmbeddedPool::start(EmbeddedConfig {
        nodes: 2,
        capacity: 256 << 20,
        block_size: BLOCK,
        transport: TransportKind::Soft,
        ..EmbeddedConfig::default()
    })?;
    let client = pool.client()?;
    let mut split_ms = Vec::new();
    let (mut p99_during, mut p99_normal) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let task = client.task(&format!("/bench/kvsplit/r{round}"))?;
        // Many small buckets, so the record space (not one unlucky bucket) fills
        // first: the partition that splits holds close to 8 MiB of records.
        let config = KvConfig {
            expected_record: 160,
            ..KvConfig::default()
        };
        let kv = Kv::create(&task, "t", config)?;
        let value = vec![0x5au8; VALUE];
        let mut next = 0u64;
        let key = |i: u64| format!("k{round}:{i}").into_bytes();
        // Grow until the first split: two partitions.
        while kv.repartitions().splits == 0 {
            kv.upsert(&key(next), &value)?;
            next += 1;
        }
        let target = kv.partition_of(&key(0))?;
        let others: Vec<Vec<u8>> = (0..next)
            .map(key)
            .filter(|k| kv.partition_of(k).map(|p| p != target).unwrap_or(false))
            .take(200)
            .collect();
        // The reader: gets on the other partition, each stamped with when it ran.
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
        let reader = {
            let (c, stop, samples) = (pool.client()?, stop.clone(), samples.clone());
            let path = kv.path().to_string();
            std::thread::spawn(move || -> Result<(), farpool::ds::DsError> {
                let kv = Kv::open(&c, &path)?;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    kv.get(&others[i % others.len()])?;
                    samples
                        .lock()
                        .map_err(|_| farpool::ds::DsError::Config("poisoned".into()))?
                        .push((t0, Instant::now()));
                    i += 1;
                }
                Ok(())
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let before = kv.repartitions().splits;
        let mut in_target = (0..next)
            .filter(|&i| {
                kv.partition_of(&key(i))
                    .map(|p| p == target)
                    .unwrap_or(false)
            })
            .count();
        let mut window = None;
        while window.is_none() {
            let k = key(next);
            next += 1;
            if kv.partition_of(&k)? != target {
                continue;
            }
            let t0 = Instant::now();
            kv.upsert(&k, &value)?;
            let t1 = Instant::now();
            in_target += 1;
            if kv.repartitions().splits > before {
                window = Some((t0, t1));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        reader.join().map_err(|_| "reader panicked")??;
        let (t0, t1) = window.ok_or("no split")?;
        let all = samples.lock().map_err(|_| "poisoned")?.clone();
        let us = |(a, b): &(Instant, Instant)| b.duration_since(*a).as_secs_f64() * 1e6;
        let mut during: Vec<f64> = all
            .iter()
            .filter(|(a, b)| *b >= t0 && *a <= t1)
            .map(us)
            .collect();
        let mut normal: Vec<f64> = all
            .iter()
            .filter(|(a, b)| *b < t0 || *a > t1)
            .map(us)
            .collect();
        during.sort_by(f64::total_cmp);
        normal.sort_by(f64::total_cmp);
        let ms = t1.duration_since(t0).as_secs_f64() * 1e3;
        println!(
            "{{\"round\":{round},\"split_ms\":{ms:.2},\"keys_in_partition\":{in_target},\"record_mib\":{:.2},\"gets_during\":{},\"p50_during_us\":{:.1},\"p99_during_us\":{:.1},\"gets_normal\":{},\"p50_normal_us\":{:.1},\"p99_normal_us\":{:.1}}}",
            in_target as f64 * (VALUE + 32) as f64 / f64::from(1 << 20),
            during.len(),
            percentile(&during, 0.5),
            percentile(&during, 0.99),
            normal.len(),
            percentile(&normal, 0.5),
            percentile(&normal, 0.99),
        );
        split_ms.push(ms);
        p99_during.push(percentile(&during, 0.99));
        p99_normal.push(percentile(&normal, 0.99));
        kv.destroy()?;
        task.close()?;
    }
    split_ms.sort_by(f64::total_cmp);
    let ratio: Vec<f64> = p99_during
        .iter()
        .zip(&p99_normal)
        .map(|(d, n)| d / n)
        .collect();
    let mut r = ratio.clone();
    r.sort_by(f64::total_cmp);
    println!(
        "split of a full 8 MiB partition: median {:.1} ms (min {:.1}, max {:.1}); p99 get latency on the other partition during/normal: median {:.2}x (min {:.2}, max {:.2})",
        percentile(&split_ms, 0.5),
        split_ms[0],
        split_ms[split_ms.len() - 1],
        percentile(&r, 0.5),
        r[0],
        r[r.len() - 1]
    );
    Ok(())
}
