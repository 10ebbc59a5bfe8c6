//! Stress tests of `farpool::ds` at the issue's scale: 4+ concurrent clients, 200k
//! keys and 1M queue items across many splits, merges, segment links and frees.
//! Ignored by default (minutes in release mode); run with
//!
//! ```text
//! cargo test --release --test ds_stress -- --ignored --nocapture
//! ```
//!
//! `FARPOOL_STRESS_SCALE=0.05` (for example) shrinks the sizes for a quick run.

use farpool::ds::{Kv, KvConfig, Queue, QueueConfig};
use farpool::{EmbeddedConfig, EmbeddedPool};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("FARPOOL_STRESS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(1)
}

fn pool(block_size: u64, capacity: u64) -> EmbeddedPool {
    EmbeddedPool::start(EmbeddedConfig {
        nodes: 2,
        capacity,
        block_size,
        ..EmbeddedConfig::default()
    })
    .expect("embedded pool")
}

#[test]
#[ignore = "stress test: minutes in release mode"]
fn queue_one_million_items_four_producers_four_consumers() {
    // 64 KiB blocks of 64-byte slots: ~1000 items per segment, so ~1000 segments are
    // linked and freed over the run.
    let pool = pool(64 << 10, 128 << 20);
    let owner = pool.client().unwrap();
    let task = owner.task("/stress/q").unwrap();
    let _q = Queue::create(&task, "q", QueueConfig { slot_size: 64 }).unwrap();
    const P: u64 = 4;
    const C: usize = 4;
    let each = scaled(250_000) as u64;
    let total = (P * each) as usize;
    let taken = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let producers: Vec<_> = (0..P)
        .map(|p| {
            let c = pool.client().unwrap();
            std::thread::spawn(move || {
                let q = Queue::open(&c, "/stress/q/q").unwrap();
                for seq in 0..each {
                    let mut item = p.to_le_bytes().to_vec();
                    item.extend_from_slice(&seq.to_le_bytes());
                    q.enqueue(&item).unwrap();
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..C)
        .map(|i| {
            let c = pool.client().unwrap();
            let taken = taken.clone();
            std::thread::spawn(move || {
                let q = Queue::open(&c, "/stress/q/q").unwrap();
                let mut last: HashMap<u64, u64> = HashMap::new();
                let (mut got, mut reordered) = (Vec::new(), 0usize);
                while taken.load(Ordering::SeqCst) < total {
                    let items = if i % 2 == 0 {
                        q.dequeue_many(32).unwrap()
                    } else {
                        q.dequeue().unwrap().into_iter().collect()
                    };
                    if items.is_empty() {
                        std::thread::yield_now();
                    }
                    for item in items {
                        let p = u64::from_le_bytes(item[0..8].try_into().unwrap());
                        let seq = u64::from_le_bytes(item[8..16].try_into().unwrap());
                        if last.get(&p).is_some_and(|&prev| seq <= prev) {
                            reordered += 1;
                        }
                        last.insert(p, seq);
                        got.push((p, seq));
                        taken.fetch_add(1, Ordering::SeqCst);
                    }
                }
                (got, reordered)
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let mut seen = vec![vec![0u8; each as usize]; P as usize];
    let mut reordered = 0;
    for c in consumers {
        let (got, r) = c.join().unwrap();
        reordered += r;
        for (p, seq) in got {
            seen[p as usize][seq as usize] += 1;
        }
    }
    let lost = seen.iter().flatten().filter(|&&n| n == 0).count();
    let duplicated = seen.iter().flatten().filter(|&&n| n > 1).count();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "queue: {total} items in {secs:.1}s ({:.0} items/s): lost={lost} duplicated={duplicated} reordered={reordered}",
        total as f64 / secs
    );
    assert_eq!((lost, duplicated, reordered), (0, 0, 0));
    task.close().unwrap();
}

#[test]
#[ignore = "stress test: minutes in release mode"]
fn kv_two_hundred_thousand_keys_four_clients_through_splits_and_merges() {
    // 64 KiB partitions of ~128 buckets: 200k keys need a few hundred partitions.
    let pool = pool(64 << 10, 256 << 20);
    let owner = pool.client().unwrap();
    let task = owner.task("/stress/kv").unwrap();
    let config = KvConfig {
        split_load: 0.8,
        merge_load: 0.2,
        ..KvConfig::default()
    };
    let kv = Kv::create(&task, "t", config).unwrap();
    const W: usize = 4;
    let keys = scaled(200_000) / W * W;
    let per = keys / W;
    let value = |i: usize, round: u32| {
        let mut v = round.to_le_bytes().to_vec();
        v.extend(std::iter::repeat(i as u8).take(8 + i % 24));
        v
    };
    let key = |i: usize| format!("k{i:08}").into_bytes();
    let start = Instant::now();
    let phase = |name: &str, f: &(dyn Fn(usize, &Kv) + Sync)| {
        std::thread::scope(|s| {
            for w in 0..W {
                let c = pool.client().unwrap();
                s.spawn(move || {
                    let kv = Kv::open(&c, "/stress/kv/t").unwrap();
                    f(w, &kv);
                });
            }
        });
        println!(
            "kv {name}: done at {:.1}s, {} partitions",
            start.elapsed().as_secs_f64(),
            kv.partitions().unwrap()
        );
    };
    // Grow: every key, twice (the second round replaces).
    phase("insert", &|w, kv| {
        for round in 1..=2 {
            for i in w * per..(w + 1) * per {
                kv.upsert(&key(i), &value(i, round)).unwrap();
            }
        }
    });
    let grown = kv.partitions().unwrap();
    // Shrink: remove all but every 16th key (merges), then check everything.
    phase("remove", &|w, kv| {
        for i in (w * per..(w + 1) * per).filter(|i| i % 16 != 0) {
            assert!(kv.remove(&key(i)).unwrap(), "key {i} lost before removal");
        }
    });
    let shrunk = kv.partitions().unwrap();
    let (mut lost, mut wrong) = (0, 0);
    for i in 0..keys {
        let got = kv.get(&key(i)).unwrap();
        let want = (i % 16 == 0).then(|| value(i, 2));
        if got != want {
            if want.is_some() && got.is_none() {
                lost += 1;
            } else {
                wrong += 1;
            }
        }
    }
    println!(
        "kv: {keys} keys, {grown} partitions at the peak, {shrunk} after removals, {:.1}s: lost={lost} wrong={wrong}",
        start.elapsed().as_secs_f64()
    );
    assert_eq!((lost, wrong), (0, 0));
    assert!(shrunk < grown, "partitions merged");
    task.close().unwrap();
}
