//! Crash safety of `Kv` repartitioning (controller fence + roll-forward): a client
//! that dies at each phase of a split or a merge, a holder that is paused past its
//! fence and wakes up superseded. Embedded pool (controller and memory nodes on
//! 127.0.0.1), also with the memory nodes in torn mode.

mod common;

use farpool::ds::{DsError, FaultAction, FaultPoint, Kv, KvConfig};
use farpool::{Client, EmbeddedPool};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POINTS: [FaultPoint; 6] = [
    FaultPoint::BeforeRoot,
    FaultPoint::AfterLock,
    FaultPoint::AfterFreeze,
    FaultPoint::AfterCopy,
    FaultPoint::BeforePublish,
    FaultPoint::AfterPublish,
];

/// Crash points that leave blocks no map names (until `Kv::scavenge`): a directory
/// block never named by the root, or replaced partitions not yet retired.
fn leaves_garbage(point: FaultPoint) -> bool {
    matches!(point, FaultPoint::BeforeRoot | FaultPoint::AfterPublish)
}

use common::subtree_blocks;

fn pool(torn: bool) -> EmbeddedPool {
    common::small_pool(8 << 20, torn)
}

fn config() -> KvConfig {
    KvConfig {
        split_load: 0.75,
        merge_load: 0.25,
        ..KvConfig::default()
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

fn val(i: usize, round: u32) -> Vec<u8> {
    format!("value-{i}-{round}").into_bytes()
}

/// The table holds exactly `want` (each key once, with its value), and no block is
/// left over from the dead holder (meta, map, directory and one per partition) once
/// `Kv::scavenge` ran; before it, blocks are left over exactly when `garbage`.
fn check(kv: &Kv, client: &Client, path: &str, want: &HashMap<Vec<u8>, Vec<u8>>, garbage: bool) {
    // A run the dead client left that no operation needed yet is finished here.
    kv.settle().expect("settle");
    let parts = kv.partitions().unwrap() as u64;
    let before = subtree_blocks(client, path);
    if garbage {
        assert!(before > 3 + parts, "the crash left no unreachable block");
    } else {
        assert_eq!(before, 3 + parts, "blocks leaked");
    }
    let done = kv.scavenge().expect("scavenge");
    assert_eq!(done.freed, before - (3 + parts), "{done:?}");
    assert_eq!(kv.partitions().unwrap() as u64, parts);
    assert_eq!(subtree_blocks(client, path), 3 + parts, "blocks leaked");
    let entries = kv.entries().expect("entries");
    let keys: HashSet<&Vec<u8>> = entries.iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), entries.len(), "a key is listed twice");
    let got: HashMap<Vec<u8>, Vec<u8>> = entries.into_iter().collect();
    assert_eq!(got.len(), want.len(), "lost or extra keys");
    for (k, v) in want {
        assert_eq!(got.get(k), Some(v), "key {}", String::from_utf8_lossy(k));
        assert_eq!(kv.get(k).unwrap().as_ref(), Some(v));
    }
    // Still a working table: a write after the scavenge lands and reads back.
    kv.upsert(b"after-scavenge", b"v").unwrap();
    assert_eq!(
        kv.get(b"after-scavenge").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert!(kv.remove(b"after-scavenge").unwrap());
}

/// A client dies at `point` of a split; another client's operations on the moving
/// partition wait for the dead holder's fence to expire, then finish its split.
fn crash_mid_split(point: FaultPoint, torn: bool) {
    let pool = pool(torn);
    let (ca, cb) = (pool.client().unwrap(), pool.client().unwrap());
    let task = ca.task("/j/crash").unwrap();
    let _keep = cb.task("/j/crash").unwrap();
    let a = Kv::create(&task, "t", config()).unwrap();
    a.set_fence_ttl(Duration::from_millis(300));
    a.inject_fault(point, FaultAction::Crash);
    let mut want = HashMap::new();
    let mut crashed_on = None;
    for i in 0..400 {
        match a.upsert(&key(i), &val(i, 0)) {
            Ok(()) => {
                want.insert(key(i), val(i, 0));
            }
            Err(DsError::FaultInjected(_)) => {
                crashed_on = Some(i);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let crashed_on = crashed_on.expect("a split happened");
    // The dead client's handle is never used again (its fence is not released).
    std::mem::forget(a);
    let b = Kv::open(&cb, "/j/crash/t").unwrap();
    // The key whose write triggered the split went in (the split runs after it).
    if let Some(v) = b.get(&key(crashed_on)).unwrap() {
        assert_eq!(v, val(crashed_on, 0));
        want.insert(key(crashed_on), v);
    }
    // Every key is rewritten and more are added: the moving partition included.
    for i in 0..crashed_on + 100 {
        b.upsert(&key(i), &val(i, 1)).unwrap();
        want.insert(key(i), val(i, 1));
    }
    let r = b.repartitions();
    assert!(r.splits + r.compactions >= 1, "{r:?}");
    check(&b, &cb, "/j/crash/t", &want, leaves_garbage(point));
}

/// A client dies at `point` of a merge; another client completes it.
fn crash_mid_merge(point: FaultPoint, torn: bool) {
    let pool = pool(torn);
    let (ca, cb) = (pool.client().unwrap(), pool.client().unwrap());
    let task = ca.task("/j/crashm").unwrap();
    let _keep = cb.task("/j/crashm").unwrap();
    let a = Kv::create(&task, "t", config()).unwrap();
    a.set_fence_ttl(Duration::from_millis(300));
    const N: usize = 300;
    let mut want = HashMap::new();
    for i in 0..N {
        a.upsert(&key(i), &val(i, 0)).unwrap();
        want.insert(key(i), val(i, 0));
    }
    assert!(a.partitions().unwrap() >= 4);
    a.inject_fault(point, FaultAction::Crash);
    let mut crashed_on = None;
    for i in 0..N {
        match a.remove(&key(i)) {
            Ok(present) => {
                assert!(present);
                want.remove(&key(i));
            }
            Err(DsError::FaultInjected(_)) => {
                // The remove took effect; the merge after it crashed.
                want.remove(&key(i));
                crashed_on = Some(i);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let crashed_on = crashed_on.expect("a merge happened");
    std::mem::forget(a);
    let b = Kv::open(&cb, "/j/crashm/t").unwrap();
    for i in 0..N {
        let got = b.get(&key(i)).unwrap();
        assert_eq!(got.as_ref(), want.get(&key(i)), "key {i}");
    }
    for i in crashed_on + 1..N - 20 {
        assert!(b.remove(&key(i)).unwrap(), "key {i}");
        want.remove(&key(i));
    }
    check(&b, &cb, "/j/crashm/t", &want, leaves_garbage(point));
}

#[test]
fn a_client_dying_at_each_phase_of_a_split_is_rolled_forward() {
    for point in POINTS {
        crash_mid_split(point, false);
    }
}

#[test]
fn a_client_dying_at_each_phase_of_a_split_is_rolled_forward_in_torn_mode() {
    for point in POINTS {
        crash_mid_split(point, true);
    }
}

#[test]
fn a_client_dying_at_each_phase_of_a_merge_is_rolled_forward() {
    for point in POINTS {
        crash_mid_merge(point, false);
    }
}

#[test]
fn a_client_dying_at_each_phase_of_a_merge_is_rolled_forward_in_torn_mode() {
    for point in POINTS {
        crash_mid_merge(point, true);
    }
}

/// A holder paused past its fence's expiry (after renewing it, before publishing)
/// wakes up superseded: its publishing CAS fails and the other client's split stands.
#[test]
fn a_superseded_holder_cannot_publish() {
    let pool = pool(true);
    let (ca, cb) = (pool.client().unwrap(), pool.client().unwrap());
    let task = ca.task("/j/stale").unwrap();
    let _keep = cb.task("/j/stale").unwrap();
    let a = Arc::new(Kv::create(&task, "t", config()).unwrap());
    a.set_fence_ttl(Duration::from_millis(200));
    a.inject_fault(
        FaultPoint::BeforePublish,
        FaultAction::Pause(Duration::from_secs(8)),
    );
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (a, progress) = (a.clone(), progress.clone());
        std::thread::spawn(move || {
            // Stops after the first repartitioning (the paused one).
            let mut i = 0;
            while a.repartitions().splits + a.repartitions().superseded == 0 && i < 400 {
                a.upsert(&key(i), &val(i, 0)).unwrap();
                i += 1;
                progress.store(i, Ordering::SeqCst);
            }
            i
        })
    };
    let b = Kv::open(&cb, "/j/stale/t").unwrap();
    // Read what the writer has acknowledged until B has taken the paused split over
    // (reads of the frozen partition wait for it). Bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.repartitions().splits + b.repartitions().compactions == 0 {
        assert!(Instant::now() < deadline, "no takeover");
        let n = progress.load(Ordering::SeqCst);
        for i in 0..n {
            assert_eq!(b.get(&key(i)).unwrap(), Some(val(i, 0)), "key {i}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let written = writer.join().unwrap();
    let r = a.repartitions();
    assert_eq!((r.superseded, r.splits), (1, 0), "{r:?}");
    let want: HashMap<Vec<u8>, Vec<u8>> = (0..written).map(|i| (key(i), val(i, 0))).collect();
    check(&b, &cb, "/j/stale/t", &want, false);
    check(&a, &ca, "/j/stale/t", &want, false);
}

/// A holder paused after taking fresh blocks but before naming them in the root,
/// past its fence's expiry, while another client scavenges: the scavenge frees the
/// unnamed directory block and bumps the root, so the holder's root CAS fails when it
/// wakes (it does not run on freed blocks), its writes all land, and nothing leaks.
#[test]
fn a_holder_paused_before_taking_the_root_loses_to_a_scavenge() {
    let pool = pool(true);
    let (ca, cb) = (pool.client().unwrap(), pool.client().unwrap());
    let task = ca.task("/j/scav").unwrap();
    let _keep = cb.task("/j/scav").unwrap();
    let a = Arc::new(Kv::create(&task, "t", config()).unwrap());
    a.set_fence_ttl(Duration::from_millis(200));
    a.upsert(&key(0), &val(0, 0)).unwrap(); // the first partition exists
    let b = Kv::open(&cb, "/j/scav/t").unwrap();
    let base = 3 + b.partitions().unwrap() as u64;
    a.inject_fault(
        FaultPoint::BeforeRoot,
        FaultAction::Pause(Duration::from_secs(2)),
    );
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || {
            for i in 0..400 {
                a.upsert(&key(i), &val(i, 0)).unwrap();
            }
        })
    };
    // The paused holder's directory block is allocated (nothing names it yet).
    let deadline = Instant::now() + Duration::from_secs(60);
    while subtree_blocks(&cb, "/j/scav/t") <= base {
        assert!(Instant::now() < deadline, "the split never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(400)); // past the holder's fence TTL
    let done = b.scavenge().unwrap();
    assert!(done.freed >= 1, "{done:?}");
    writer.join().unwrap();
    let want: HashMap<Vec<u8>, Vec<u8>> = (0..400).map(|i| (key(i), val(i, 0))).collect();
    check(&a, &ca, "/j/scav/t", &want, false);
    check(&b, &cb, "/j/scav/t", &want, false);
}

/// Garbage a dead client left (it died after publishing a split, before retiring the
/// replaced partition) is collected by the other clients' own repartitionings, every
/// 32 of them, without anyone calling `Kv::scavenge`.
#[test]
fn repartitionings_collect_what_a_dead_client_left() {
    let pool = pool(false);
    let (ca, cb) = (pool.client().unwrap(), pool.client().unwrap());
    let task = ca.task("/j/auto").unwrap();
    let _keep = cb.task("/j/auto").unwrap();
    let a = Kv::create(&task, "t", config()).unwrap();
    a.inject_fault(FaultPoint::AfterPublish, FaultAction::Crash);
    let mut crashed = false;
    for i in 0..400 {
        match a.upsert(&key(i), &val(i, 0)) {
            Ok(()) => {}
            Err(DsError::FaultInjected(_)) => {
                crashed = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(crashed, "no split happened");
    std::mem::forget(a);
    let b = Kv::open(&cb, "/j/auto/t").unwrap();
    b.settle().unwrap();
    let leaked = |b: &Kv| subtree_blocks(&cb, "/j/auto/t") - (3 + b.partitions().unwrap() as u64);
    assert!(leaked(&b) > 0, "the crash left nothing to collect");
    let runs = |b: &Kv| {
        let r = b.repartitions();
        r.splits + r.merges + r.compactions
    };
    for round in 0..40 {
        if runs(&b) >= 32 {
            break;
        }
        for i in 0..600 {
            b.upsert(&key(i), &val(i, round)).unwrap();
        }
        for i in 20..600 {
            b.remove(&key(i)).unwrap();
        }
    }
    assert!(runs(&b) >= 32, "{:?}", b.repartitions());
    b.settle().unwrap();
    assert_eq!(leaked(&b), 0, "{:?}", b.repartitions());
    for i in 0..20 {
        assert!(b.get(&key(i)).unwrap().is_some(), "key {i}");
    }
}

/// Pipelined `upsert_many` from concurrent clients in torn mode, with repeated keys in
/// a batch and partitions splitting underneath: the table ends up as if every pair
/// had been upserted in order (per key, the last pair wins).
#[test]
fn upsert_many_matches_in_order_upserts_under_splits_in_torn_mode() {
    let pool = pool(true);
    let c0 = pool.client().unwrap();
    let task = c0.task("/j/many").unwrap();
    let kv = Kv::create(&task, "t", config()).unwrap();
    let threads: Vec<_> = (0..3)
        .map(|t| {
            // The main thread's task keeps the table's lease (a task closes its path
            // when dropped, so the threads take none).
            let client = pool.client().unwrap();
            std::thread::spawn(move || {
                let kv = Kv::open(&client, "/j/many/t").unwrap();
                let mut model = HashMap::new();
                for round in 0..12u32 {
                    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..48usize)
                        .map(|i| {
                            // Every batch repeats some keys: the later pair must win.
                            let k = (i * 7 + round as usize * 31) % 150;
                            let key = format!("{t}-{k}").into_bytes();
                            (key, format!("v{round}-{i}").into_bytes())
                        })
                        .collect();
                    kv.upsert_many(&pairs).unwrap();
                    for (k, v) in pairs {
                        model.insert(k, v);
                    }
                    // Reads in between see this client's latest values.
                    let keys: Vec<&Vec<u8>> = model.keys().collect();
                    let got = kv.get_many(&keys).unwrap();
                    for (k, g) in keys.iter().zip(got) {
                        assert_eq!(g.as_ref(), model.get(*k));
                    }
                }
                model
            })
        })
        .collect();
    let mut want = HashMap::new();
    for t in threads {
        want.extend(t.join().unwrap());
    }
    assert!(kv.partitions().unwrap() > 1, "no split happened");
    check(&kv, &c0, "/j/many/t", &want, false);
}
