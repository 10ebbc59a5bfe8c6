//! Breakable `Kv` bucket locks: a client that dies inside a bucket's critical section
//! (after the lock, after the record write, after the slot write; for put, update,
//! remove and the pipelined upsert) does not block the bucket for good: another client
//! takes the lock over once its stamp is older than the table's lock timeout, repairs
//! the bucket, and every acknowledged key is still there once with its value. A holder
//! that stalls past the timeout does not overwrite the newer holder's work. Embedded
//! pool (controller and memory nodes on 127.0.0.1), plain and torn mode.

mod common;

use farpool::ds::{DsError, FaultAction, FaultPoint, Kv, KvConfig};
use farpool::{Client, EmbeddedPool};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TIMEOUT: Duration = Duration::from_millis(300);

fn pool(torn: bool) -> EmbeddedPool {
    common::small_pool(8 << 20, torn)
}

/// Three buckets per partition, a short lock timeout.
fn config() -> KvConfig {
    KvConfig {
        lock_timeout: TIMEOUT,
        ..KvConfig::default()
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

fn val(i: usize, round: u32) -> Vec<u8> {
    format!("value-{i}-{round}").into_bytes()
}

/// `n` keys (from index `from` on) that share the bucket of `target`.
fn same_bucket(kv: &Kv, target: &[u8], from: usize, n: usize) -> Vec<usize> {
    let at = kv.bucket_of(target).unwrap();
    (from..)
        .filter(|&i| kv.bucket_of(&key(i)).unwrap() == at)
        .take(n)
        .collect()
}

/// `n` keys (from index `from` on) in the partition of `target` but not its bucket.
fn other_buckets(kv: &Kv, target: &[u8], from: usize, n: usize) -> Vec<usize> {
    let (part, b) = kv.bucket_of(target).unwrap();
    (from..)
        .filter(|&i| {
            let (p, c) = kv.bucket_of(&key(i)).unwrap();
            p == part && c != b
        })
        .take(n)
        .collect()
}

/// The table holds exactly `want`, each key once, plus optionally the keys of
/// `maybe` (each either with `want`'s value, absent, or with the value given).
fn check(kv: &Kv, want: &HashMap<Vec<u8>, Vec<u8>>) {
    kv.settle().expect("settle");
    let entries = kv.entries().expect("entries");
    let keys: HashSet<&Vec<u8>> = entries.iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), entries.len(), "a key is listed twice");
    let got: HashMap<Vec<u8>, Vec<u8>> = entries.into_iter().collect();
    for (k, v) in want {
        assert_eq!(got.get(k), Some(v), "key {}", String::from_utf8_lossy(k));
        assert_eq!(kv.get(k).unwrap().as_ref(), Some(v));
    }
    assert_eq!(got.len(), want.len(), "lost or extra keys");
}

/// What the dying client was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Insert a new key (record out of place).
    Put,
    /// Replace a value by one of the same size (record rewritten in place).
    UpdateInPlace,
    /// Replace a value by a longer one (new record, slot repointed).
    UpdateResized,
    /// Remove a key.
    Remove,
    /// Pipelined upsert of a new key and two present ones in other buckets.
    UpsertMany,
}

/// Client A fills a partition, then dies at `point` inside the bucket critical section
/// of `op`. Client B then writes the same bucket (taking the lock over), every
/// acknowledged key is there once, A's in-flight op is whole or absent, and a split of
/// that partition completes.
fn crash_in_critical_section(pool: &EmbeddedPool, name: &str, op: Op, point: FaultPoint) {
    let (ca, cb): (Client, Client) = (pool.client().unwrap(), pool.client().unwrap());
    let path = format!("/j/lock/{name}");
    let _keep = cb.task("/j/lock").unwrap();
    let a = Kv::create_at(&ca, &path, config()).unwrap();
    assert_eq!(a.lock_timeout(), TIMEOUT);
    let mut want = HashMap::new();
    for i in 0..10 {
        a.upsert(&key(i), &val(i, 0)).unwrap();
        want.insert(key(i), val(i, 0));
    }
    assert_eq!(a.partitions().unwrap(), 1, "no split yet");
    // The key the op is about, and the values it may leave.
    let (target, old, new): (usize, Option<Vec<u8>>, Option<Vec<u8>>) = match op {
        Op::Put | Op::UpsertMany => (100, None, Some(val(100, 1))),
        Op::UpdateInPlace => (3, Some(val(3, 0)), Some(val(3, 1))),
        Op::UpdateResized => (3, Some(val(3, 0)), Some(b"a much longer value".to_vec())),
        Op::Remove => (3, Some(val(3, 0)), None),
    };
    let others = other_buckets(&a, &key(target), 0, 2)
        .into_iter()
        .filter(|i| *i < 10)
        .collect::<Vec<_>>();
    a.inject_fault(point, FaultAction::Crash);
    let out = match op {
        Op::Put => a.put(&key(target), new.as_ref().unwrap()).map(|_| ()),
        Op::UpdateInPlace | Op::UpdateResized => {
            a.update(&key(target), new.as_ref().unwrap()).map(|_| ())
        }
        Op::Remove => a.remove(&key(target)).map(|_| ()),
        Op::UpsertMany => {
            let mut pairs = vec![(key(target), new.clone().unwrap())];
            pairs.extend(others.iter().map(|&i| (key(i), val(i, 7))));
            a.upsert_many(&pairs)
        }
    };
    match out {
        Err(DsError::FaultInjected(_)) => {}
        other => panic!("{op:?} at {point:?}: expected the injected crash, got {other:?}"),
    }
    // A is dead: never used again, its lock never released.
    std::mem::forget(a);
    let b = Kv::open(&cb, &path).unwrap();
    // The in-flight op is whole or absent.
    let now = b.get(&key(target)).unwrap();
    assert!(now == old || now == new, "{op:?} at {point:?}: {now:?}");
    match now {
        Some(v) => want.insert(key(target), v),
        None => want.remove(&key(target)),
    };
    if op == Op::UpsertMany {
        // Pairs of other buckets may have gone in, whole, before the crash.
        for &i in &others {
            let v = b.get(&key(i)).unwrap().unwrap();
            assert!(v == val(i, 0) || v == val(i, 7), "key {i}: {v:?}");
            want.insert(key(i), v);
        }
    }
    // B writes the dead client's bucket: a new key and the target key.
    let fresh = same_bucket(&b, &key(target), 200, 1)[0];
    assert!(b.put(&key(fresh), &val(fresh, 2)).unwrap());
    want.insert(key(fresh), val(fresh, 2));
    b.upsert(&key(target), &val(target, 3)).unwrap();
    want.insert(key(target), val(target, 3));
    let stats = b.lock_stats();
    assert!(
        stats.takeovers >= 1,
        "{op:?} at {point:?}: B never took the lock over: {stats:?}"
    );
    check(&b, &want);
    // The partition splits (its buckets are frozen, the taken-over one included).
    for i in 300..340 {
        b.upsert(&key(i), &val(i, 4)).unwrap();
        want.insert(key(i), val(i, 4));
    }
    let r = b.repartitions();
    assert!(r.splits + r.compactions >= 1, "{op:?} at {point:?}: {r:?}");
    check(&b, &want);
}

fn every_crash(torn: bool) {
    let pool = pool(torn);
    let cases: [(Op, &[FaultPoint]); 5] = [
        (
            Op::Put,
            &[
                FaultPoint::LockHeld,
                FaultPoint::RecordWritten,
                FaultPoint::SlotsWritten,
            ],
        ),
        (
            Op::UpdateInPlace,
            &[
                FaultPoint::LockHeld,
                FaultPoint::RecordWritten,
                FaultPoint::SlotsWritten,
            ],
        ),
        (
            Op::UpdateResized,
            &[
                FaultPoint::LockHeld,
                FaultPoint::RecordWritten,
                FaultPoint::SlotsWritten,
            ],
        ),
        (
            Op::Remove,
            &[FaultPoint::LockHeld, FaultPoint::SlotsWritten],
        ),
        (
            Op::UpsertMany,
            &[
                FaultPoint::LockHeld,
                FaultPoint::RecordWritten,
                FaultPoint::SlotsWritten,
            ],
        ),
    ];
    for (op, points) in cases {
        for &point in points {
            crash_in_critical_section(&pool, &format!("{op:?}-{point:?}"), op, point);
        }
    }
}

#[test]
fn a_writer_dying_inside_a_bucket_does_not_block_it() {
    every_crash(false);
}

#[test]
fn a_writer_dying_inside_a_bucket_does_not_block_it_in_torn_mode() {
    every_crash(true);
}

/// A client dies holding a bucket lock; nobody writes that bucket, but a split of its
/// partition must freeze it: the freeze takes the expired lock over and repairs it.
fn freeze_takes_over(torn: bool) {
    let pool = pool(torn);
    let (ca, cb) = (pool.client().unwrap(), pool.client().unwrap());
    let _keep = cb.task("/j/lockf").unwrap();
    let a = Kv::create_at(&ca, "/j/lockf/t", config()).unwrap();
    let mut want = HashMap::new();
    for i in 0..6 {
        a.upsert(&key(i), &val(i, 0)).unwrap();
        want.insert(key(i), val(i, 0));
    }
    a.inject_fault(FaultPoint::RecordWritten, FaultAction::Crash);
    assert!(matches!(
        a.upsert(&key(0), b"replaced by a longer value"),
        Err(DsError::FaultInjected(_))
    ));
    std::mem::forget(a);
    let b = Kv::open(&cb, "/j/lockf/t").unwrap();
    // Fill the partition's other buckets until it splits.
    let before = b.partitions().unwrap();
    for i in other_buckets(&b, &key(0), 1000, 40) {
        b.upsert(&key(i), &val(i, 1)).unwrap();
        want.insert(key(i), val(i, 1));
        if b.partitions().unwrap() > before {
            break;
        }
    }
    assert!(b.partitions().unwrap() > before, "the partition split");
    assert!(b.lock_stats().takeovers >= 1, "{:?}", b.lock_stats());
    check(&b, &want);
}

#[test]
fn a_split_freezes_a_bucket_whose_holder_died() {
    freeze_takes_over(false);
}

#[test]
fn a_split_freezes_a_bucket_whose_holder_died_in_torn_mode() {
    freeze_takes_over(true);
}

/// A holder pauses past the lock timeout after writing its record and before
/// pointing the slots at it; another client takes the bucket over and inserts a key.
/// The holder wakes up, must not write its stale slots (that would drop the other
/// key), and retries: both keys end up there.
fn stalled_holder(torn: bool, many: bool) {
    let pool = pool(torn);
    let (ca, cb) = (pool.client().unwrap(), pool.client().unwrap());
    let _keep = cb.task("/j/stall").unwrap();
    let a = Kv::create_at(&ca, "/j/stall/t", config()).unwrap();
    let b = Kv::open(&cb, "/j/stall/t").unwrap();
    let mut want = HashMap::new();
    for i in 0..4 {
        a.upsert(&key(i), &val(i, 0)).unwrap();
        want.insert(key(i), val(i, 0));
    }
    let mine = same_bucket(&a, &key(0), 100, 2);
    let (ka, kb) = (mine[0], mine[1]);
    a.inject_fault(FaultPoint::RecordWritten, FaultAction::Pause(TIMEOUT * 4));
    std::thread::scope(|s| {
        let stalled = s.spawn(|| {
            if many {
                a.upsert_many(&[(key(ka), val(ka, 1))])
            } else {
                a.upsert(&key(ka), &val(ka, 1))
            }
        });
        // Let A take the lock and reach its pause (the takeover below waits for the
        // lock timeout anyway).
        std::thread::sleep(TIMEOUT / 2);
        assert!(b.put(&key(kb), &val(kb, 2)).unwrap());
        stalled.join().unwrap().unwrap();
    });
    want.insert(key(ka), val(ka, 1));
    want.insert(key(kb), val(kb, 2));
    check(&b, &want);
    let (sa, sb) = (a.lock_stats(), b.lock_stats());
    assert!(sb.takeovers >= 1, "{sb:?}");
    assert!(
        sa.expired >= 1,
        "the stalled holder went on writing: {sa:?}"
    );
}

#[test]
fn a_stalled_holder_does_not_overwrite_the_new_holder() {
    stalled_holder(false, false);
}

#[test]
fn a_stalled_holder_does_not_overwrite_the_new_holder_in_torn_mode() {
    stalled_holder(true, false);
}

#[test]
fn a_stalled_pipelined_upsert_does_not_overwrite_the_new_holder() {
    stalled_holder(false, true);
    stalled_holder(true, true);
}

fn le(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn word(bytes: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap())
}

/// A bucket left as a dead holder could leave it on shm or verbs, written directly:
/// an expired lock word, a torn slot body (a garbage slot word, a bad checksum) and a
/// record torn by an in-place rewrite. The next writer takes the lock over, keeps the
/// intact keys, drops the garbage slot and the torn record's key (see "Bucket locks"
/// in docs/DATA_STRUCTURES.md), and the bucket validates again. Torn again, a reader
/// repairs it.
#[test]
fn a_torn_bucket_is_repaired_after_a_takeover() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let _keep = client.task("/j/torn").unwrap();
    let kv = Kv::create_at(&client, "/j/torn/t", config()).unwrap();
    let ks = same_bucket(&kv, &key(0), 0, 4);
    let mut want = HashMap::new();
    for &i in &ks {
        kv.upsert(&key(i), &val(i, 0)).unwrap();
        want.insert(key(i), val(i, 0));
    }
    let (child, b) = kv.bucket_of(&key(ks[0])).unwrap();
    let blocks = client
        .open_blocks(&format!("/j/torn/t/p{child}"), true)
        .unwrap();
    let part = &blocks[0];
    let mut raw = [0u8; 128];
    part.read(b, &mut raw).unwrap();
    let slots: Vec<u64> = (1..15).map(|i| word(&raw, i)).collect();
    let used: Vec<usize> = (0..14).filter(|&i| slots[i] != 0).collect();
    assert_eq!(used.len(), 4);
    // Tear the record of one key (as an in-place rewrite cut short would).
    let victim = (0..4)
        .find(|&j| {
            let s = slots[used[j]];
            let off = (s & 0xFFFF_FFFF) * 8;
            let mut rec = vec![0u8; (((s >> 32) & 0xFFFF) * 8) as usize];
            part.read(off, &mut rec).unwrap();
            let k = &rec[16..16 + rec[0] as usize];
            k == key(ks[1]).as_slice()
        })
        .expect("the victim's slot");
    let s = slots[used[victim]];
    let off = (s & 0xFFFF_FFFF) * 8;
    part.write(off + 16, b"XX").unwrap();
    want.remove(&key(ks[1]));
    // A garbage slot word in a free slot, a checksum that no longer matches, and a
    // lock word stamped a minute ago.
    let free = (0..14).find(|&i| slots[i] == 0).unwrap();
    part.write(b + 8 + 8 * free as u64, &le(&[0x1234_0004_0000_0fff]))
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let stale = (((now - 60_000) & ((1 << 40) - 1)) | 1) << 24 | 0x4200 | 1;
    part.write(b, &le(&[stale])).unwrap();
    // Readers see a bucket that fails its checksum; the next writer repairs it.
    let other = Kv::open(&client, "/j/torn/t").unwrap();
    let fresh = same_bucket(&other, &key(0), 500, 1)[0];
    assert!(other.put(&key(fresh), &val(fresh, 1)).unwrap());
    want.insert(key(fresh), val(fresh, 1));
    let st = other.lock_stats();
    assert_eq!((st.takeovers, st.repairs, st.dropped), (1, 1, 2), "{st:?}");
    check(&other, &want);
    // Torn again (a garbage slot word, an expired lock): this time a reader finds the
    // bucket failing its checksum, takes the lock over and repairs it.
    let mut raw = [0u8; 128];
    part.read(b, &mut raw).unwrap();
    let free = (1..15).find(|&i| word(&raw, i) == 0).unwrap();
    part.write(b + 8 * free as u64, &le(&[0x0042_0003_0000_0abc]))
        .unwrap();
    part.write(b, &le(&[stale])).unwrap();
    let reader = Kv::open(&client, "/j/torn/t").unwrap();
    assert_eq!(reader.get(&key(ks[0])).unwrap(), Some(val(ks[0], 0)));
    let st = reader.lock_stats();
    assert_eq!((st.takeovers, st.repairs, st.dropped), (1, 1, 1), "{st:?}");
    check(&other, &want);
    // The legacy stampless LOCKED word (1) is taken over at once.
    part.write(b, &le(&[1])).unwrap();
    other.upsert(&key(fresh), &val(fresh, 2)).unwrap();
    want.insert(key(fresh), val(fresh, 2));
    assert_eq!(other.lock_stats().takeovers, 2);
    check(&other, &want);
}

/// The lock timeout is stored in the table: a handle opened later applies the
/// creator's, and a bad one is refused.
#[test]
fn the_lock_timeout_is_a_table_parameter() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let _keep = client.task("/j/cfg").unwrap();
    let kv = Kv::create_at(&client, "/j/cfg/t", config()).unwrap();
    assert_eq!(
        Kv::open(&client, "/j/cfg/t").unwrap().lock_timeout(),
        TIMEOUT
    );
    let dflt = Kv::create_at(&client, "/j/cfg/d", KvConfig::default()).unwrap();
    assert_eq!(dflt.lock_timeout(), Duration::from_secs(2));
    let bad = Kv::create_at(
        &client,
        "/j/cfg/bad",
        KvConfig {
            lock_timeout: Duration::from_millis(1),
            ..KvConfig::default()
        },
    );
    assert!(matches!(bad, Err(DsError::Config(_))), "{bad:?}");
    drop(kv);
}
