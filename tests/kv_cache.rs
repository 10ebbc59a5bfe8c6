//! One-round-trip `Kv` gets through the handle's location cache: readers with a warm
//! cache race writers that rewrite values in place, replace them with values of other
//! sizes, remove and re-insert keys, and split and merge partitions. Embedded pool
//! (controller and memory nodes on 127.0.0.1, soft transport), plain and torn mode, and
//! once against controller and memory-node processes.
//!
//! Every get must return `None` (only for keys that are removed at times) or a whole
//! value written for that key, never older than a write the reader already saw
//! acknowledged (writers publish each key's last acknowledged round in an atomic the
//! reader loads before its get) or a value it already read.

mod common;

use farpool::ds::{DsError, FaultAction, FaultPoint, Kv, KvConfig};
use farpool::{Client, EmbeddedPool};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier};

const WRITERS: usize = 3;
const KEYS: usize = 48;
const ROUNDS: u32 = 16;
const READERS: usize = 2;

fn pool(torn: bool) -> EmbeddedPool {
    common::small_pool(16 << 20, torn)
}

fn key(i: usize) -> Vec<u8> {
    format!("cached-{i}").into_bytes()
}

/// Keys that are never removed once written: a reader must always find them.
fn stays(i: usize) -> bool {
    i % 5 == 1
}

/// Length of key `i`'s value in `round`: odd keys keep one size (rewritten in place),
/// even keys change size every round (rewritten out of place).
fn value_len(i: usize, round: u32) -> usize {
    let base = 8 + (i % 7) * 4;
    if i % 2 == 0 {
        base + (round as usize % 3) * 8
    } else {
        base
    }
}

fn value(i: usize, round: u32) -> Vec<u8> {
    let mut v = round.to_le_bytes().to_vec();
    v.extend((i as u32).to_le_bytes());
    v.extend(std::iter::repeat((i as u32 + round) as u8).take(value_len(i, round)));
    v
}

/// The round a value read for key `i` was written in, checking it is whole and belongs
/// to key `i`.
fn round_of(i: usize, v: &[u8]) -> u32 {
    assert!(v.len() >= 8, "key {i}: value of {} bytes", v.len());
    let round = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    let owner = u32::from_le_bytes([v[4], v[5], v[6], v[7]]);
    assert_eq!(owner as usize, i, "key {i} returned key {owner}'s value");
    assert_eq!(
        v,
        value(i, round),
        "key {i}: not a value written in round {round}"
    );
    round
}

/// Checks one read of key `i`: `acked` was loaded before the read started.
fn check(i: usize, got: Option<&[u8]>, acked: u32, last: &mut [u32]) {
    match got {
        Some(v) => {
            let round = round_of(i, v);
            assert!(
                round >= acked,
                "key {i}: read round {round} after round {acked} was acknowledged"
            );
            assert!(
                round >= last[i],
                "key {i}: went back from round {} to {round}",
                last[i]
            );
            last[i] = round;
        }
        None => assert!(
            !(stays(i) && acked > 0),
            "key {i} (never removed, round {acked} acknowledged) not found"
        ),
    }
}

/// The race, with clients from `connect`; `expected_record` sizes the partitions so
/// that the keys split and merge them whatever the block size.
fn race(connect: impl Fn() -> Client, expected_record: u64, label: &str) {
    let owner = connect();
    let task = owner.task("/j/kvcache").unwrap();
    // Low thresholds: the table splits while the keys go in and merges when most are
    // removed again, every round.
    let config = KvConfig {
        split_load: 0.5,
        merge_load: 0.24,
        expected_record,
        ..KvConfig::default()
    };
    let _kv = Kv::create(&task, "t", config).unwrap();
    let n = WRITERS * KEYS;
    let acked: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(WRITERS + READERS));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let c = connect();
            let (acked, stop, start) = (acked.clone(), stop.clone(), start.clone());
            std::thread::spawn(move || {
                let kv = Kv::open(&c, "/j/kvcache/t").unwrap();
                let mut last = vec![0u32; n];
                start.wait();
                let mut passes = 0u32;
                while passes < 2 || !stop.load(Ordering::SeqCst) {
                    passes += 1;
                    for i in (r..n).step_by(READERS) {
                        // Twice: the second get of a found key takes the fast path.
                        for _ in 0..2 {
                            let a = acked[i].load(Ordering::SeqCst);
                            let got = kv.get(&key(i)).unwrap();
                            check(i, got.as_deref(), a, &mut last);
                        }
                        let a = acked[i].load(Ordering::SeqCst);
                        if stays(i) && a > 0 {
                            assert!(kv.exists(&key(i)).unwrap(), "key {i} lost (exists)");
                        }
                    }
                    // A batched get of every key (cached ones in one round trip).
                    let before: Vec<u32> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
                    let keys: Vec<Vec<u8>> = (0..n).map(key).collect();
                    for (i, got) in kv.get_many(&keys).unwrap().into_iter().enumerate() {
                        check(i, got.as_deref(), before[i], &mut last);
                    }
                }
                kv.cache_stats()
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let c = connect();
            let (acked, start) = (acked.clone(), start.clone());
            std::thread::spawn(move || {
                let kv = Kv::open(&c, "/j/kvcache/t").unwrap();
                let mine = w * KEYS..(w + 1) * KEYS;
                start.wait();
                for round in 1..=ROUNDS {
                    if round % 3 == 0 {
                        // Pipelined: the batch fills the writer's cache too.
                        let pairs: Vec<(Vec<u8>, Vec<u8>)> =
                            mine.clone().map(|i| (key(i), value(i, round))).collect();
                        kv.upsert_many(&pairs).unwrap();
                        for i in mine.clone() {
                            acked[i].store(round, Ordering::SeqCst);
                        }
                    } else {
                        for i in mine.clone() {
                            kv.upsert(&key(i), &value(i, round)).unwrap();
                            acked[i].store(round, Ordering::SeqCst);
                            // The writer's own cache: its next get is one round trip.
                            let got = kv.get(&key(i)).unwrap();
                            assert_eq!(got, Some(value(i, round)), "writer's own read");
                        }
                    }
                    if round < ROUNDS {
                        // Most keys go again (merges), to be re-inserted next round.
                        for i in mine.clone().filter(|&i| !stays(i)) {
                            assert!(kv.remove(&key(i)).unwrap(), "key {i} was there");
                            assert_eq!(kv.get(&key(i)).unwrap(), None, "key {i} removed");
                        }
                    }
                }
                kv.repartitions()
            })
        })
        .collect();
    let mut splits = 0;
    let mut merges = 0;
    for w in writers {
        let r = w.join().unwrap();
        splits += r.splits;
        merges += r.merges;
    }
    stop.store(true, Ordering::SeqCst);
    let (mut hits, mut fallbacks) = (0, 0);
    for r in readers {
        let stats = r.join().unwrap();
        assert!(stats.entries <= stats.capacity);
        hits += stats.hits;
        fallbacks += stats.fallbacks;
    }
    eprintln!("{label}: splits={splits} merges={merges} reader hits={hits} fallbacks={fallbacks}");
    assert!(splits > 0 && merges > 0, "splits {splits}, merges {merges}");
    assert!(hits > 0, "no get took the cached path");
    let kv = Kv::open(&owner, "/j/kvcache/t").unwrap();
    for i in 0..n {
        assert_eq!(kv.get(&key(i)).unwrap(), Some(value(i, ROUNDS)), "key {i}");
    }
    task.close().unwrap();
}

#[test]
fn cached_gets_race_in_place_and_resized_updates_removes_and_repartitioning() {
    let pool = pool(false);
    race(|| pool.client().unwrap(), 64, "embedded");
}

#[test]
fn cached_gets_race_writers_and_repartitioning_in_torn_mode() {
    let pool = pool(true);
    race(|| pool.client().unwrap(), 64, "embedded, torn");
}

#[test]
fn cached_gets_race_writers_and_repartitioning_on_separate_processes() {
    let ctl = common::controller();
    let _node = common::memnode(&ctl.addr, "16MiB", "soft");
    let client = Client::connect(&ctl.addr).unwrap();
    assert!(common::eventually(
        std::time::Duration::from_secs(5),
        || client.status().is_ok_and(|s| s.nodes.len() == 1)
    ));
    // 64 KiB blocks: large expected records make partitions of 4 buckets.
    race(|| Client::connect(&ctl.addr).unwrap(), 1024, "processes");
}

#[test]
fn cached_locations_are_used_refreshed_and_dropped() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/kvcache-stats").unwrap();
    let kv = Kv::create(&task, "t", KvConfig::default()).unwrap();
    let other = Kv::open(&client, "/j/kvcache-stats/t").unwrap();
    kv.upsert(b"a", b"one").unwrap();
    // The writer cached the slot word it published: its get is a hit.
    assert_eq!(kv.get(b"a").unwrap(), Some(b"one".to_vec()));
    assert_eq!(kv.cache_stats().hits, 1);
    // Another handle misses once, then hits.
    assert_eq!(other.get(b"a").unwrap(), Some(b"one".to_vec()));
    assert_eq!(other.get(b"a").unwrap(), Some(b"one".to_vec()));
    let s = other.cache_stats();
    assert_eq!((s.misses, s.hits, s.fallbacks), (1, 1, 0));
    // A same-size rewrite keeps the slot word: still a hit, with the new value.
    kv.upsert(b"a", b"two").unwrap();
    assert_eq!(other.get(b"a").unwrap(), Some(b"two".to_vec()));
    assert_eq!(other.cache_stats().hits, 2);
    // A value of another size moves the record: the cached word fails validation,
    // the get falls back and refreshes the entry.
    kv.upsert(b"a", b"three!!!!!!!!!!!!").unwrap();
    assert_eq!(
        other.get(b"a").unwrap(),
        Some(b"three!!!!!!!!!!!!".to_vec())
    );
    assert_eq!(other.cache_stats().fallbacks, 1);
    assert!(other.exists(b"a").unwrap());
    assert_eq!(other.cache_stats().hits, 3);
    // Removed by another handle: validation fails, the normal path says absent.
    kv.remove(b"a").unwrap();
    assert_eq!(kv.cache_stats().entries, 0, "a remove drops the entry");
    assert_eq!(other.get(b"a").unwrap(), None);
    assert!(!other.exists(b"a").unwrap());
    assert_eq!(other.cache_stats().fallbacks, 2);
    assert_eq!(other.cache_stats().entries, 0);
    // Re-inserted elsewhere: found again.
    kv.upsert(b"a", b"four").unwrap();
    assert_eq!(
        other.get_many(&[b"a", b"b"]).unwrap(),
        vec![Some(b"four".to_vec()), None]
    );
    assert_eq!(
        other.get_many(&[b"a"]).unwrap(),
        vec![Some(b"four".to_vec())]
    );
    assert_eq!(other.cache_stats().hits, 4);
    // A disabled cache answers the same, always through the bucket.
    other.set_cache_capacity(0);
    assert_eq!(other.get(b"a").unwrap(), Some(b"four".to_vec()));
    let s = other.cache_stats();
    assert_eq!((s.hits, s.entries, s.capacity), (4, 0, 0));
    task.close().unwrap();
}

#[test]
fn a_bounded_cache_evicts_and_still_answers_every_key() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/kvcache-bound").unwrap();
    let kv = Kv::create(&task, "t", KvConfig::default()).unwrap();
    kv.set_cache_capacity(64);
    let keys: Vec<Vec<u8>> = (0..300).map(key).collect();
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = keys.iter().map(|k| (k.clone(), k.clone())).collect();
    kv.upsert_many(&pairs).unwrap();
    for k in &keys {
        // Twice: the first get may miss (evicted), the second finds the entry.
        for _ in 0..2 {
            assert_eq!(kv.get(k).unwrap().as_deref(), Some(k.as_slice()));
        }
    }
    let s = kv.cache_stats();
    assert!(s.entries <= s.capacity && s.capacity == 64, "{s:?}");
    assert!(s.misses > 0 && s.hits > 0, "{s:?}");
    task.close().unwrap();
}

/// A handle whose map and cache still name a partition that was replaced (frozen,
/// published elsewhere, not retired yet: its splitter crashed right after publishing)
/// must not answer from the frozen copy once the key was written in the new partition.
fn frozen_partition(torn: bool) {
    let pool = pool(torn);
    let client = pool.client().unwrap();
    let task = client.task("/j/kvcache-frozen").unwrap();
    let config = KvConfig {
        split_load: 0.5,
        merge_load: 0.2,
        ..KvConfig::default()
    };
    let a = Kv::create(&task, "t", config).unwrap();
    a.upsert(b"k", b"old-value").unwrap();
    assert_eq!(a.get(b"k").unwrap().as_deref(), Some(&b"old-value"[..]));
    let b = Kv::open(&client, "/j/kvcache-frozen/t").unwrap();
    assert_eq!(b.partitions().unwrap(), 1);
    b.inject_fault(FaultPoint::AfterPublish, FaultAction::Crash);
    let mut i = 0;
    loop {
        match b.upsert(&key(i), b"filler") {
            Ok(()) => i += 1,
            Err(DsError::FaultInjected(_)) => break,
            Err(e) => panic!("upsert {i}: {e}"),
        }
        assert!(i < 10_000, "no split");
    }
    let c = Kv::open(&client, "/j/kvcache-frozen/t").unwrap();
    assert_eq!(c.partitions().unwrap(), 2);
    c.upsert(b"k", b"new-value").unwrap();
    let hits = a.cache_stats().hits;
    assert_eq!(a.get(b"k").unwrap().as_deref(), Some(&b"new-value"[..]));
    let s = a.cache_stats();
    assert_eq!((s.hits, s.fallbacks), (hits, 1), "{s:?}");
    task.close().unwrap();
}

#[test]
fn a_cached_location_in_a_frozen_replaced_partition_is_not_used() {
    frozen_partition(false);
}

#[test]
fn a_cached_location_in_a_frozen_replaced_partition_is_not_used_in_torn_mode() {
    frozen_partition(true);
}
