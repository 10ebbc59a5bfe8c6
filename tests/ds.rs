//! Data structures (`farpool::ds`) on an embedded pool: semantics, concurrency with the
//! memory nodes in torn mode, and proptest state machines against in-memory models.

mod common;

use farpool::ds::{DsError, FaultAction, FaultPoint, File, Kv, KvConfig, Log, Queue, QueueConfig};
use farpool::{EmbeddedConfig, EmbeddedPool};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Smallest blocks the memory node accepts, so structures cross block boundaries fast.
const BS: u64 = common::SMALL_BLOCK;

use common::subtree_blocks;

fn pool(torn: bool) -> EmbeddedPool {
    common::small_pool(8 << 20, torn)
}

#[test]
fn file_reads_writes_seeks_across_blocks() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/s/t").unwrap();
    let f = File::create(&task, "out").unwrap();
    assert_eq!(f.chunk_size(), BS);
    assert!(f.is_empty().unwrap());
    assert_eq!(f.complete_len().unwrap(), Some(0));

    let a: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    assert_eq!(f.append(&a).unwrap(), 0);
    assert_eq!(f.append(b"tail").unwrap(), 5000);
    assert_eq!(f.len().unwrap(), 5004);
    assert_eq!(f.complete_len().unwrap(), Some(5004));

    // Another client sees the same bytes.
    let other = pool.client().unwrap();
    let mut g = File::open(&other, "/j/s/t/out").unwrap();
    let all = g.read_all().unwrap();
    assert_eq!(&all[..5000], &a[..]);
    assert_eq!(&all[5000..], b"tail");

    // Overwrite across the block boundary, then a write past the end leaves zeros.
    g.write_at(4090, &[0xEE; 12]).unwrap();
    g.write_at(9000, b"far").unwrap();
    assert_eq!(f.len().unwrap(), 9003);
    let mut buf = vec![0u8; 20];
    assert_eq!(f.read_at(4085, &mut buf).unwrap(), 20);
    assert_eq!(&buf[..5], &a[4085..4090]);
    assert_eq!(&buf[5..17], &[0xEE; 12]);
    let mut gap = vec![1u8; 100];
    assert_eq!(f.read_at(8800, &mut gap).unwrap(), 100);
    assert!(gap.iter().all(|&b| b == 0), "a gap reads as zeros");

    // std::io: seek, read, write at the cursor.
    assert_eq!(g.seek(SeekFrom::End(-3)).unwrap(), 9000);
    let mut s = String::new();
    g.read_to_string(&mut s).unwrap();
    assert_eq!(s, "far");
    g.seek(SeekFrom::Start(1)).unwrap();
    g.write_all(b"xy").unwrap();
    g.seek(SeekFrom::Current(-3)).unwrap();
    let mut three = [0u8; 3];
    g.read_exact(&mut three).unwrap();
    assert_eq!(three, [0, b'x', b'y']);
    assert!(g.seek(SeekFrom::Current(-100)).is_err());
    assert_eq!(f.read_at(1 << 20, &mut buf).unwrap(), 0, "past the end");

    // Opening a file as a queue, or a missing path, fails clearly.
    assert!(matches!(
        Queue::open(&other, "/j/s/t/out"),
        Err(DsError::WrongKind { .. })
    ));
    assert!(matches!(
        File::open(&other, "/j/s/t/nope"),
        Err(DsError::NotFound { .. })
    ));
    f.destroy().unwrap();
    assert!(matches!(
        File::open(&other, "/j/s/t/out"),
        Err(DsError::NotFound { .. })
    ));
    task.close().unwrap();
}

#[test]
fn concurrent_creators_agree_on_one_file() {
    let pool = pool(false);
    let _lease = pool.client().unwrap().lease("/race").unwrap();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let c = pool.client().unwrap();
            std::thread::spawn(move || {
                let f = File::create_at(&c, "/race/f").unwrap();
                f.append(&[i as u8; 10]).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let c = pool.client().unwrap();
    let f = File::open(&c, "/race/f").unwrap();
    let data = f.read_all().unwrap();
    assert_eq!(data.len(), 40);
    let mut seen: Vec<u8> = data.chunks(10).map(|c| c[0]).collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    // Losing creators gave their meta blocks back: one meta block, one data block.
    assert_eq!(subtree_blocks(&c, "/race/f"), 2);
}

/// A self-checking record: `len u32 | producer u32 | seq u32 | payload | sum u64`.
fn record(p: u32, seq: u32) -> Vec<u8> {
    let len = 1 + (p * 131 + seq * 17) % 300;
    let mut r = Vec::new();
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(&p.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend((0..len).map(|i| (i as u8) ^ (seq as u8) ^ (p as u8).rotate_left(3)));
    let sum: u64 = r.iter().map(|&b| u64::from(b)).sum();
    r.extend_from_slice(&sum.to_le_bytes());
    r
}

/// Parses records; panics on a damaged one. Returns (producer, seq, offset).
fn parse_records(data: &[u8]) -> Vec<(u32, u32, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let w = |o: usize| u32::from_le_bytes(data[at + o..at + o + 4].try_into().unwrap());
        let (len, p, seq) = (w(0), w(4), w(8));
        let expect = record(p, seq);
        assert_eq!(
            len as usize + 20,
            expect.len(),
            "record header at {at} damaged"
        );
        assert_eq!(
            &data[at..at + expect.len()],
            &expect[..],
            "record at {at} damaged"
        );
        out.push((p, seq, at));
        at += expect.len();
    }
    out
}

#[test]
fn concurrent_appends_are_whole_and_complete_len_is_safe_in_torn_mode() {
    let pool = pool(true);
    let owner = pool.client().unwrap();
    let task = owner.task("/j/append").unwrap();
    let _f = File::create(&task, "log").unwrap();
    const PRODUCERS: u32 = 3;
    const EACH: u32 = 40;
    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicUsize::new(0));
    let reader = {
        let c = pool.client().unwrap();
        let (stop, checks) = (stop.clone(), checks.clone());
        std::thread::spawn(move || {
            let f = File::open(&c, "/j/append/log").unwrap();
            loop {
                // One last check after the writers are done (then it must succeed).
                let last = stop.load(Ordering::Relaxed);
                let complete = f.complete_len().unwrap();
                assert!(
                    complete.is_some() || !last,
                    "no writer is in flight any more"
                );
                if let Some(n) = complete {
                    let mut buf = vec![0u8; n as usize];
                    assert_eq!(f.read_at(0, &mut buf).unwrap(), n as usize);
                    parse_records(&buf);
                    checks.fetch_add(1, Ordering::Relaxed);
                }
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let writers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let c = pool.client().unwrap();
            std::thread::spawn(move || {
                let f = File::open(&c, "/j/append/log").unwrap();
                let mut last = None;
                for seq in 0..EACH {
                    let at = f.append(&record(p, seq)).unwrap();
                    assert!(last < Some(at), "one producer's appends are in order");
                    last = Some(at);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let f = File::open(&owner, "/j/append/log").unwrap();
    let n = f.complete_len().unwrap().expect("no writer in flight");
    let data = f.read_all().unwrap();
    assert_eq!(data.len() as u64, n);
    let recs = parse_records(&data);
    let set: HashSet<(u32, u32)> = recs.iter().map(|&(p, s, _)| (p, s)).collect();
    assert_eq!(set.len(), recs.len(), "no record twice");
    assert_eq!(set.len(), (PRODUCERS * EACH) as usize, "every record once");
    assert!(checks.load(Ordering::Relaxed) > 0);
    task.close().unwrap();
}

#[test]
fn queue_is_fifo_grows_and_frees_drained_segments() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/q").unwrap();
    let q = Queue::create(&task, "work", QueueConfig { slot_size: 64 }).unwrap();
    assert_eq!(q.max_item(), 40);
    assert_eq!(q.segment_slots(), (BS - 64) / 64);
    assert!(q.dequeue().unwrap().is_none());
    assert!(matches!(
        q.enqueue(&[0; 41]),
        Err(DsError::ItemTooLarge { len: 41, max: 40 })
    ));
    assert!(matches!(
        Queue::create(&task, "bad", QueueConfig { slot_size: 12 }),
        Err(DsError::Config(_))
    ));

    let n = 5 * q.segment_slots() as usize + 7;
    for i in 0..n {
        q.enqueue(format!("item-{i}").as_bytes()).unwrap();
    }
    // Meta block plus six segments.
    assert_eq!(subtree_blocks(&client, "/j/q/work"), 7);
    let other = Queue::open(&pool.client().unwrap(), "/j/q/work").unwrap();
    for i in 0..n {
        let got = if i % 2 == 0 { &q } else { &other }.dequeue().unwrap();
        assert_eq!(got.as_deref(), Some(format!("item-{i}").as_bytes()));
    }
    assert!(q.dequeue().unwrap().is_none());
    assert!(other.dequeue().unwrap().is_none());
    // The five full segments were freed; the meta block and the last segment remain.
    assert_eq!(subtree_blocks(&client, "/j/q/work"), 2);
    // Still usable after shrinking, from a fresh handle too.
    other.enqueue(b"again").unwrap();
    let fresh = Queue::open(&client, "/j/q/work").unwrap();
    assert_eq!(fresh.dequeue().unwrap().as_deref(), Some(&b"again"[..]));
    q.destroy().unwrap();
    task.close().unwrap();
}

#[test]
fn queue_mpmc_exactly_once_in_order_in_torn_mode() {
    let pool = pool(true);
    let owner = pool.client().unwrap();
    let task = owner.task("/j/mpmc").unwrap();
    let _q = Queue::create(&task, "q", QueueConfig { slot_size: 64 }).unwrap();
    const PRODUCERS: u32 = 3;
    const CONSUMERS: usize = 3;
    const EACH: u32 = 150;
    let total = (PRODUCERS * EACH) as usize;
    let taken = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let c = pool.client().unwrap();
            std::thread::spawn(move || {
                let q = Queue::open(&c, "/j/mpmc/q").unwrap();
                for seq in 0..EACH {
                    let mut item = p.to_le_bytes().to_vec();
                    item.extend_from_slice(&seq.to_le_bytes());
                    item.extend(std::iter::repeat(seq as u8).take((seq % 30) as usize));
                    q.enqueue(&item).unwrap();
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|i| {
            let c = pool.client().unwrap();
            let taken = taken.clone();
            std::thread::spawn(move || {
                let mut q = Queue::open(&c, "/j/mpmc/q").unwrap();
                if i == 0 {
                    // Poison slots of slow producers eagerly: they must retry, not lose.
                    q.set_poll_wait(Duration::ZERO);
                }
                let mut got = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while taken.load(Ordering::SeqCst) < total {
                    assert!(std::time::Instant::now() < deadline, "consumers stalled");
                    // Consumer 1 takes runs of slots; the others one item at a time.
                    let items = if i == 1 {
                        q.dequeue_many(16).unwrap()
                    } else {
                        q.dequeue().unwrap().into_iter().collect()
                    };
                    if items.is_empty() {
                        std::thread::yield_now();
                    }
                    for item in items {
                        let p = u32::from_le_bytes(item[0..4].try_into().unwrap());
                        let seq = u32::from_le_bytes(item[4..8].try_into().unwrap());
                        assert_eq!(item.len(), 8 + (seq % 30) as usize, "item intact");
                        assert!(item[8..].iter().all(|&b| b == seq as u8), "item intact");
                        got.push((p, seq));
                        taken.fetch_add(1, Ordering::SeqCst);
                    }
                }
                got
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let mut all = HashSet::new();
    for c in consumers {
        let got = c.join().unwrap();
        let mut last: HashMap<u32, u32> = HashMap::new();
        for (p, seq) in got {
            if let Some(&prev) = last.get(&p) {
                assert!(seq > prev, "producer {p}: {seq} after {prev}");
            }
            last.insert(p, seq);
            assert!(all.insert((p, seq)), "({p}, {seq}) delivered twice");
        }
    }
    assert_eq!(all.len(), total, "every item delivered");
    let q = Queue::open(&owner, "/j/mpmc/q").unwrap();
    assert!(q.dequeue().unwrap().is_none());
    // Drained segments were freed: the meta block and at most the last two remain.
    let blocks = subtree_blocks(&owner, "/j/mpmc/q");
    assert!(blocks <= 3, "{blocks} blocks left");
    task.close().unwrap();
}

#[derive(Debug, Clone)]
enum FileOp {
    Append(Vec<u8>),
    WriteAt(u64, Vec<u8>),
    Read(u64, usize),
    Reopen,
}

fn file_op() -> impl Strategy<Value = FileOp> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..6000).prop_map(FileOp::Append),
        2 => (0u64..14000, prop::collection::vec(any::<u8>(), 1..3000))
            .prop_map(|(p, d)| FileOp::WriteAt(p, d)),
        3 => (0u64..16000, 0usize..9000).prop_map(|(p, n)| FileOp::Read(p, n)),
        1 => Just(FileOp::Reopen),
    ]
}

#[test]
fn file_matches_a_vec_model() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let _lease = client.lease("/pt").unwrap();
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(PropConfig {
        cases: 24,
        ..PropConfig::default()
    });
    runner
        .run(&prop::collection::vec(file_op(), 1..25), |ops| {
            let path = format!("/pt/f{}", case.fetch_add(1, Ordering::Relaxed));
            let mut f = File::create_at(&client, &path).unwrap();
            let mut model: Vec<u8> = Vec::new();
            for op in ops {
                match op {
                    FileOp::Append(d) => {
                        let at = f.append(&d).unwrap();
                        prop_assert_eq!(at, model.len() as u64);
                        model.extend_from_slice(&d);
                    }
                    FileOp::WriteAt(p, d) => {
                        f.write_at(p, &d).unwrap();
                        let end = p as usize + d.len();
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[p as usize..end].copy_from_slice(&d);
                    }
                    FileOp::Read(p, n) => {
                        let mut buf = vec![0u8; n];
                        let got = f.read_at(p, &mut buf).unwrap();
                        let want = model.len().saturating_sub(p as usize).min(n);
                        prop_assert_eq!(got, want);
                        if want > 0 {
                            prop_assert_eq!(&buf[..got], &model[p as usize..p as usize + got]);
                        }
                    }
                    FileOp::Reopen => f = File::open(&client, &path).unwrap(),
                }
                prop_assert_eq!(f.len().unwrap(), model.len() as u64);
                prop_assert_eq!(f.complete_len().unwrap(), Some(model.len() as u64));
            }
            prop_assert_eq!(f.read_all().unwrap(), model);
            f.destroy().unwrap();
            Ok(())
        })
        .unwrap();
}

#[derive(Debug, Clone)]
enum QueueOp {
    /// Enqueue on handle `h` this many items.
    Enqueue(usize, usize),
    /// Dequeue on handle `h` this many times.
    Dequeue(usize, usize),
    /// Replace handle `h` with a freshly opened one.
    Reopen(usize),
}

fn queue_op() -> impl Strategy<Value = QueueOp> {
    prop_oneof![
        3 => (0usize..3, 1usize..90).prop_map(|(h, n)| QueueOp::Enqueue(h, n)),
        3 => (0usize..3, 1usize..90).prop_map(|(h, n)| QueueOp::Dequeue(h, n)),
        1 => (0usize..3).prop_map(QueueOp::Reopen),
    ]
}

#[test]
fn queue_matches_a_vecdeque_model() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let _lease = client.lease("/pq").unwrap();
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(PropConfig {
        cases: 16,
        ..PropConfig::default()
    });
    runner
        .run(&prop::collection::vec(queue_op(), 1..20), |ops| {
            let path = format!("/pq/q{}", case.fetch_add(1, Ordering::Relaxed));
            let first = Queue::create_at(&client, &path, QueueConfig { slot_size: 64 }).unwrap();
            let slots = first.segment_slots();
            let mut handles = vec![first];
            for _ in 0..2 {
                handles.push(Queue::open(&client, &path).unwrap());
            }
            let mut model = VecDeque::new();
            let mut next = 0u64;
            for op in ops {
                match op {
                    QueueOp::Enqueue(h, n) => {
                        for _ in 0..n {
                            let item = next.to_le_bytes()[..(next % 9) as usize].to_vec();
                            let item = [item, next.to_le_bytes().to_vec()].concat();
                            handles[h].enqueue(&item).unwrap();
                            model.push_back(item);
                            next += 1;
                        }
                    }
                    QueueOp::Dequeue(h, n) => {
                        for _ in 0..n {
                            prop_assert_eq!(handles[h].dequeue().unwrap(), model.pop_front());
                        }
                    }
                    QueueOp::Reopen(h) => handles[h] = Queue::open(&client, &path).unwrap(),
                }
                // Live segments: at most what the model needs plus the partly consumed
                // head and the partly filled tail segment (+ the meta block).
                let blocks = subtree_blocks(&client, &path);
                prop_assert!(
                    blocks <= 3 + model.len() as u64 / slots,
                    "{} blocks for {} items",
                    blocks,
                    model.len()
                );
            }
            Ok(())
        })
        .unwrap();
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

#[test]
fn kv_puts_gets_deletes_across_clients() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/kv").unwrap();
    let kv = Kv::create(&task, "t", KvConfig::default()).unwrap();
    assert_eq!(kv.get(b"a").unwrap(), None);
    kv.upsert(b"a", b"1").unwrap();
    kv.upsert(b"b", b"").unwrap();
    kv.upsert(b"a", b"one").unwrap();
    let other = Kv::open(&pool.client().unwrap(), "/j/kv/t").unwrap();
    assert_eq!(other.get(b"a").unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(other.get(b"b").unwrap().as_deref(), Some(&b""[..]));
    assert!(other.remove(b"a").unwrap());
    assert!(!other.remove(b"a").unwrap());
    assert_eq!(kv.get(b"a").unwrap(), None);
    // Jiffy's vocabulary: put inserts only, update replaces only, upsert does either.
    assert!(kv.put(b"c", b"first").unwrap());
    assert!(!kv.put(b"c", b"second").unwrap());
    assert_eq!(kv.get(b"c").unwrap().as_deref(), Some(&b"first"[..]));
    assert!(kv.update(b"c", b"third").unwrap());
    assert!(!kv.update(b"missing", b"x").unwrap());
    assert!(!kv.exists(b"missing").unwrap());
    assert!(kv.exists(b"c").unwrap());
    kv.upsert_many(&[(b"m1", b"v1"), (b"m2", b"v2")]).unwrap();
    assert_eq!(
        other.get_many(&[&b"m2"[..], b"nope", b"c"]).unwrap(),
        vec![Some(b"v2".to_vec()), None, Some(b"third".to_vec())]
    );
    assert!(matches!(
        Kv::create(
            &task,
            "badcfg",
            KvConfig {
                merge_load: 0.6,
                ..KvConfig::default()
            }
        ),
        Err(DsError::Config(_))
    ));
    assert!(matches!(
        kv.upsert(b"big", &vec![0u8; BS as usize + 1]),
        Err(DsError::ItemTooLarge { .. })
    ));
    assert!(matches!(
        Queue::open(&client, "/j/kv/t"),
        Err(DsError::WrongKind { .. })
    ));
    kv.destroy().unwrap();
    task.close().unwrap();
}

#[test]
fn kv_partitions_split_as_it_grows_and_merge_as_it_shrinks() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/kvgrow").unwrap();
    let config = KvConfig {
        split_load: 0.75,
        merge_load: 0.25,
        ..KvConfig::default()
    };
    let kv = Kv::create(&task, "t", config).unwrap();
    assert_eq!(kv.partitions().unwrap(), 1);
    const N: usize = 400;
    for i in 0..N {
        kv.upsert(&key(i), format!("value-{i}").as_bytes()).unwrap();
    }
    let grown = kv.partitions().unwrap();
    assert!(grown >= 8, "{grown} partitions for {N} keys");
    // Meta block, map block, directory block, one block per partition: replaced
    // partitions and directories were freed.
    assert_eq!(subtree_blocks(&client, "/j/kvgrow/t"), 3 + grown as u64);
    let other = Kv::open(&pool.client().unwrap(), "/j/kvgrow/t").unwrap();
    for i in 0..N {
        assert_eq!(
            other.get(&key(i)).unwrap(),
            Some(format!("value-{i}").into_bytes()),
            "key {i}"
        );
    }
    for i in 0..N - 10 {
        assert!(other.remove(&key(i)).unwrap());
    }
    let shrunk = kv.partitions().unwrap();
    assert!(shrunk < grown / 2, "{shrunk} partitions left of {grown}");
    assert_eq!(subtree_blocks(&client, "/j/kvgrow/t"), 3 + shrunk as u64);
    for i in 0..N {
        let want = (i >= N - 10).then(|| format!("value-{i}").into_bytes());
        assert_eq!(kv.get(&key(i)).unwrap(), want, "key {i}");
    }
    task.close().unwrap();
}

#[test]
fn kv_is_consistent_under_concurrent_writers_and_repartitioning_in_torn_mode() {
    let pool = pool(true);
    let owner = pool.client().unwrap();
    let task = owner.task("/j/kvc").unwrap();
    let config = KvConfig {
        split_load: 0.75,
        merge_load: 0.25,
        ..KvConfig::default()
    };
    let _kv = Kv::create(&task, "t", config).unwrap();
    const WRITERS: usize = 3;
    const KEYS: usize = 60;
    const ROUNDS: u32 = 3;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let c = pool.client().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let kv = Kv::open(&c, "/j/kvc/t").unwrap();
            let mut seen: HashMap<usize, u32> = HashMap::new();
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                for i in (0..WRITERS * KEYS).step_by(7) {
                    if let Some(v) = kv.get(&key(i)).unwrap() {
                        let round = u32::from_le_bytes(v[..4].try_into().unwrap());
                        assert!(v[4..].iter().all(|&b| b == i as u8), "value intact");
                        let last = seen.entry(i).or_insert(0);
                        assert!(
                            round >= *last,
                            "key {i} went back from {} to {round}",
                            *last
                        );
                        *last = round;
                        reads += 1;
                    }
                }
            }
            reads
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let c = pool.client().unwrap();
            std::thread::spawn(move || {
                let kv = Kv::open(&c, "/j/kvc/t").unwrap();
                for round in 1..=ROUNDS {
                    for i in w * KEYS..(w + 1) * KEYS {
                        let mut v = round.to_le_bytes().to_vec();
                        v.extend(std::iter::repeat(i as u8).take(value_len(i)));
                        kv.upsert(&key(i), &v).unwrap();
                    }
                }
                // Delete half of the keys again (merges).
                for i in (w * KEYS..(w + 1) * KEYS).filter(|i| i % 2 == 0) {
                    assert!(kv.remove(&key(i)).unwrap());
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    let kv = Kv::open(&owner, "/j/kvc/t").unwrap();
    for i in 0..WRITERS * KEYS {
        let got = kv.get(&key(i)).unwrap();
        if i % 2 == 0 {
            assert_eq!(got, None, "key {i}");
        } else {
            let v = got.unwrap_or_else(|| panic!("key {i} lost"));
            assert_eq!(u32::from_le_bytes(v[..4].try_into().unwrap()), ROUNDS);
            assert_eq!(v.len(), 4 + value_len(i));
        }
    }
    task.close().unwrap();
}

/// Value sizes of the concurrent Kv test: every tenth value lives in a block of its own.
#[test]
fn kv_in_place_rewrites_are_never_seen_torn() {
    // Same-size values replace a record in place; lock-free readers racing the
    // rewrite (in torn mode, where a READ sees any mix) must see whole values only,
    // and never an older value after a newer one.
    let pool = pool(true);
    let client = pool.client().unwrap();
    let task = client.task("/j/inplace").unwrap();
    let kv = Kv::create(&task, "t", KvConfig::default()).unwrap();
    kv.upsert(b"hot", &[0u8; 300]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Writes start once both readers are reading.
    let ready = Arc::new(std::sync::Barrier::new(3));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let c = pool.client().unwrap();
            let (stop, ready) = (stop.clone(), ready.clone());
            std::thread::spawn(move || {
                let kv = Kv::open(&c, "/j/inplace/t").unwrap();
                let (mut last, mut reads) = (0u8, 0u32);
                ready.wait();
                while reads == 0 || !stop.load(Ordering::Relaxed) {
                    let v = kv.get(b"hot").unwrap().expect("the key is never removed");
                    assert_eq!(v.len(), 300);
                    assert!(v.iter().all(|&b| b == v[0]), "torn value {v:?}");
                    assert!(v[0] >= last, "went back from {last} to {}", v[0]);
                    last = v[0];
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    ready.wait();
    for round in 1..=120u8 {
        kv.upsert(b"hot", &[round; 300]).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(kv.get(b"hot").unwrap(), Some(vec![120u8; 300]));
    // Every rewrite was in place: the record space did not grow by 120 records.
    assert_eq!(kv.repartitions(), Default::default());
}

fn value_len(i: usize) -> usize {
    if i % 10 == 3 {
        600 + i
    } else {
        i % 40
    }
}

#[test]
fn kv_values_up_to_a_block_live_in_blocks_of_their_own() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/kvbig").unwrap();
    let kv = Kv::create(&task, "t", KvConfig::default()).unwrap();
    let blocks = || subtree_blocks(&client, "/j/kvbig/t");
    let base = blocks(); // meta, map, one partition
    let big = |n: usize, b: u8| vec![b; n];
    kv.upsert(b"a", &big(3000, 1)).unwrap();
    assert_eq!(blocks(), base + 1);
    assert_eq!(kv.get(b"a").unwrap(), Some(big(3000, 1)));
    kv.upsert(b"a", &big(BS as usize, 2)).unwrap();
    assert_eq!(blocks(), base + 1, "the replaced value's block was freed");
    assert_eq!(kv.get(b"a").unwrap(), Some(big(BS as usize, 2)));
    assert!(!kv.put(b"a", &big(2000, 3)).unwrap());
    assert_eq!(blocks(), base + 1, "an unused value block is given back");
    assert!(kv.update(b"a", b"small").unwrap());
    assert_eq!(blocks(), base);
    assert_eq!(kv.get(b"a").unwrap().as_deref(), Some(&b"small"[..]));
    kv.upsert(b"b", &big(1000, 4)).unwrap();
    assert!(kv.remove(b"b").unwrap());
    assert_eq!(blocks(), base);
    assert!(matches!(
        kv.upsert(b"c", &big(BS as usize + 1, 5)),
        Err(DsError::ItemTooLarge { .. })
    ));
    assert_eq!(blocks(), base);
    // Remote values move with their records through splits.
    for i in 0..120 {
        kv.upsert(&key(i), &big(if i % 7 == 0 { 900 } else { 10 }, i as u8))
            .unwrap();
    }
    assert!(kv.partitions().unwrap() > 1);
    for i in 0..120 {
        let want = big(if i % 7 == 0 { 900 } else { 10 }, i as u8);
        assert_eq!(kv.get(&key(i)).unwrap(), Some(want), "key {i}");
    }
    task.close().unwrap();
}

#[test]
fn kv_holds_a_one_mib_value() {
    let pool = EmbeddedPool::start(EmbeddedConfig {
        nodes: 1,
        capacity: 16 << 20,
        block_size: 1 << 20,
        ..EmbeddedConfig::default()
    })
    .expect("embedded pool");
    let client = pool.client().unwrap();
    let task = client.task("/j/mib").unwrap();
    let kv = Kv::create(&task, "t", KvConfig::default()).unwrap();
    let value: Vec<u8> = (0..1usize << 20).map(|i| (i % 253) as u8).collect();
    kv.upsert(b"big", &value).unwrap();
    let other = Kv::open(&pool.client().unwrap(), "/j/mib/t").unwrap();
    assert_eq!(other.get(b"big").unwrap(), Some(value));
    task.close().unwrap();
}

#[derive(Debug, Clone)]
enum KvOp {
    Put(usize, usize, u8),
    Get(usize, usize),
    Delete(usize, usize),
    Reopen(usize),
    /// The handle dies inside the bucket's critical section of an upsert (at the
    /// point with this index); the other handle takes its lock over later.
    CrashPut(usize, usize, u8, usize),
    /// The same for a remove.
    CrashDelete(usize, usize, usize),
}

/// Where `KvOp::CrashPut` / `CrashDelete` stop (every upsert reaches all three, a
/// remove of a present key the first and the last).
const CRASH_POINTS: [FaultPoint; 3] = [
    FaultPoint::LockHeld,
    FaultPoint::RecordWritten,
    FaultPoint::SlotsWritten,
];

fn kv_op() -> impl Strategy<Value = KvOp> {
    prop_oneof![
        5 => (0usize..2, 0usize..150, any::<u8>()).prop_map(|(h, k, v)| KvOp::Put(h, k, v)),
        3 => (0usize..2, 0usize..150).prop_map(|(h, k)| KvOp::Get(h, k)),
        3 => (0usize..2, 0usize..150).prop_map(|(h, k)| KvOp::Delete(h, k)),
        1 => (0usize..2).prop_map(KvOp::Reopen),
        1 => (0usize..2, 0usize..150, any::<u8>(), 0usize..3)
            .prop_map(|(h, k, v, p)| KvOp::CrashPut(h, k, v, p)),
        1 => (0usize..2, 0usize..150, 0usize..2).prop_map(|(h, k, p)| KvOp::CrashDelete(h, k, p)),
    ]
}

#[test]
fn kv_matches_a_hashmap_model() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let _lease = client.lease("/pk").unwrap();
    let case = AtomicUsize::new(0);
    // Gets answered from the handles' location caches, over every case.
    let cached_hits = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(PropConfig {
        cases: 12,
        ..PropConfig::default()
    });
    runner
        .run(&prop::collection::vec(kv_op(), 1..200), |ops| {
            let path = format!("/pk/t{}", case.fetch_add(1, Ordering::Relaxed));
            let mut handles = [
                // Low thresholds far apart: many splits and merges per sequence.
                Kv::create_at(
                    &client,
                    &path,
                    KvConfig {
                        split_load: 0.6,
                        merge_load: 0.25,
                        // Crashed handles' locks are taken over after this.
                        lock_timeout: Duration::from_millis(200),
                        ..KvConfig::default()
                    },
                )
                .unwrap(),
                Kv::open(&client, &path).unwrap(),
            ];
            let mut model: HashMap<usize, Vec<u8>> = HashMap::new();
            for op in ops {
                match op {
                    KvOp::Put(h, k, v) => {
                        // Some values are too large for a partition's records.
                        let value = vec![v; if k % 13 == 0 { 700 } else { k % 50 }];
                        handles[h].upsert(&key(k), &value).unwrap();
                        model.insert(k, value);
                    }
                    KvOp::Get(h, k) => {
                        // Repeated, so the second get takes the cached path when the
                        // first one found the key; exists and get_many likewise.
                        for _ in 0..2 {
                            prop_assert_eq!(
                                handles[h].get(&key(k)).unwrap(),
                                model.get(&k).cloned()
                            );
                        }
                        prop_assert_eq!(
                            handles[h].exists(&key(k)).unwrap(),
                            model.contains_key(&k)
                        );
                        let near = [key(k), key(k + 1)];
                        prop_assert_eq!(
                            handles[h].get_many(&near).unwrap(),
                            vec![model.get(&k).cloned(), model.get(&(k + 1)).cloned()]
                        );
                    }
                    KvOp::Delete(h, k) => {
                        prop_assert_eq!(
                            handles[h].remove(&key(k)).unwrap(),
                            model.remove(&k).is_some()
                        );
                    }
                    KvOp::Reopen(h) => {
                        cached_hits.fetch_add(handles[h].cache_stats().hits, Ordering::Relaxed);
                        handles[h] = Kv::open(&client, &path).unwrap()
                    }
                    KvOp::CrashPut(h, k, v, p) => {
                        let value = vec![v; k % 50];
                        handles[h].inject_fault(CRASH_POINTS[p], FaultAction::Crash);
                        match handles[h].upsert(&key(k), &value) {
                            Err(DsError::FaultInjected(_)) => {}
                            other => prop_assert!(false, "expected the crash, got {:?}", other),
                        }
                        // The dead write is whole or absent.
                        let got = handles[1 - h].get(&key(k)).unwrap();
                        prop_assert!(got == model.get(&k).cloned() || got == Some(value));
                        match got {
                            Some(v) => model.insert(k, v),
                            None => model.remove(&k),
                        };
                    }
                    KvOp::CrashDelete(h, k, p) => {
                        // Only a present key reaches the slot write.
                        let at = if model.contains_key(&k) { 2 * p } else { 0 };
                        handles[h].inject_fault(CRASH_POINTS[at], FaultAction::Crash);
                        match handles[h].remove(&key(k)) {
                            Err(DsError::FaultInjected(_)) => {}
                            other => prop_assert!(false, "expected the crash, got {:?}", other),
                        }
                        let got = handles[1 - h].get(&key(k)).unwrap();
                        prop_assert!(got.is_none() || got == model.get(&k).cloned());
                        if got.is_none() {
                            model.remove(&k);
                        }
                    }
                }
            }
            for h in &handles {
                cached_hits.fetch_add(h.cache_stats().hits, Ordering::Relaxed);
            }
            for (k, v) in &model {
                prop_assert_eq!(handles[0].get(&key(*k)).unwrap(), Some(v.clone()));
            }
            Ok(())
        })
        .unwrap();
    assert!(
        cached_hits.load(Ordering::Relaxed) > 0,
        "no get took the cached path"
    );
}

#[test]
fn queue_batches_len_and_front() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/qb").unwrap();
    let q = Queue::create(&task, "q", QueueConfig { slot_size: 64 }).unwrap();
    assert_eq!(q.len().unwrap(), 0);
    assert!(q.is_empty().unwrap());
    assert_eq!(q.front().unwrap(), None);
    assert!(q.dequeue_many(10).unwrap().is_empty());
    let n = 2 * q.segment_slots() as usize + 5;
    let items: Vec<Vec<u8>> = (0..n).map(|i| format!("i{i}").into_bytes()).collect();
    q.enqueue_many(&items).unwrap();
    assert_eq!(q.len().unwrap(), n as u64);
    assert_eq!(q.front().unwrap().as_deref(), Some(&b"i0"[..]));
    assert_eq!(q.len().unwrap(), n as u64, "front does not remove");
    // Runs cross segment boundaries (and free the drained ones).
    let mut got = Vec::new();
    while got.len() < n {
        let run = q.dequeue_many(40).unwrap();
        assert!(!run.is_empty());
        got.extend(run);
        assert_eq!(q.len().unwrap(), (n - got.len()) as u64);
        if got.len() < n {
            assert_eq!(q.front().unwrap(), Some(items[got.len()].clone()));
        }
    }
    assert_eq!(got, items);
    assert_eq!(q.dequeue().unwrap(), None);
    assert_eq!(subtree_blocks(&client, "/j/qb/q"), 2);
    task.close().unwrap();
}

#[test]
fn every_structure_works_over_shm() {
    let pool = EmbeddedPool::start(EmbeddedConfig {
        nodes: 1,
        capacity: 4 << 20,
        block_size: BS,
        transport: farpool_rdma::TransportKind::Shm,
        ..EmbeddedConfig::default()
    })
    .expect("embedded shm pool");
    let client = pool.client().unwrap();
    let task = client.task("/shm/t").unwrap();
    let f = File::create(&task, "f").unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    f.append(&data).unwrap();
    assert_eq!(f.read_all().unwrap(), data);
    let q = Queue::create(&task, "q", QueueConfig { slot_size: 64 }).unwrap();
    for i in 0..200u32 {
        q.enqueue(&i.to_le_bytes()).unwrap();
    }
    for i in 0..200u32 {
        assert_eq!(q.dequeue().unwrap(), Some(i.to_le_bytes().to_vec()));
    }
    let kv = Kv::create(&task, "kv", KvConfig::default()).unwrap();
    for i in 0..300 {
        kv.upsert(&key(i), &[i as u8; 20]).unwrap();
    }
    assert!(kv.partitions().unwrap() > 1);
    for i in 0..300 {
        assert_eq!(kv.get(&key(i)).unwrap(), Some(vec![i as u8; 20]));
    }
    let log = Log::create(&task, "log").unwrap();
    for i in 0..100u32 {
        log.append(&i.to_le_bytes(), &[i % 2]).unwrap();
    }
    let odd = log.scan(0, u64::MAX, &[1]).unwrap();
    assert_eq!(odd.entries.len(), 50);
    task.close().unwrap();
}

#[test]
fn kv_compacts_a_partition_full_of_replaced_values_instead_of_splitting() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/kvcompact").unwrap();
    let kv = Kv::create(&task, "t", KvConfig::default()).unwrap();
    // Few keys, many overwrites: the record space fills with garbage.
    for round in 0..200u32 {
        for i in 0..4 {
            kv.upsert(&key(i), &[round as u8; 300]).unwrap();
        }
    }
    assert_eq!(kv.partitions().unwrap(), 1, "compacted, not split");
    for i in 0..4 {
        assert_eq!(kv.get(&key(i)).unwrap(), Some(vec![199u8; 300]));
    }
    // Meta, map, directory and the one partition.
    assert_eq!(subtree_blocks(&client, "/j/kvcompact/t"), 4);
    task.close().unwrap();
}

#[test]
fn log_appends_scans_by_stream_and_trims() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let task = client.task("/j/log").unwrap();
    let log = Log::create(&task, "l").unwrap();
    let empty = log.scan(0, u64::MAX, &[]).unwrap();
    assert_eq!((empty.entries.len(), empty.next), (0, 0));
    let mut positions = Vec::new();
    for i in 0..200u32 {
        let data = vec![i as u8; (i as usize * 37) % 500];
        let streams = if i % 5 == 0 { vec![0, 1] } else { vec![i % 3] };
        positions.push(log.append(&data, &streams).unwrap());
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let other = Log::open(&pool.client().unwrap(), "/j/log/l").unwrap();
    let all = other.scan(0, u64::MAX, &[]).unwrap();
    assert_eq!(all.entries.len(), 200);
    assert_eq!(all.next, log.end().unwrap());
    for (i, e) in all.entries.iter().enumerate() {
        assert_eq!(e.position, positions[i]);
        assert_eq!(e.data, vec![i as u8; (i * 37) % 500]);
    }
    let ones = other.scan(0, u64::MAX, &[1]).unwrap();
    let want: Vec<u64> = (0..200)
        .filter(|i| i % 5 == 0 || i % 3 == 1)
        .map(|i| positions[i])
        .collect();
    assert_eq!(
        ones.entries.iter().map(|e| e.position).collect::<Vec<_>>(),
        want
    );
    // A window [positions[10], positions[20]).
    let window = other.scan(positions[10], positions[20], &[]).unwrap();
    assert_eq!(window.entries.len(), 10);
    assert_eq!(window.next, positions[20]);

    let before = subtree_blocks(&client, "/j/log/l");
    log.trim(positions[150]).unwrap();
    assert_eq!(log.start().unwrap(), positions[150]);
    assert!(
        subtree_blocks(&client, "/j/log/l") < before,
        "trimmed blocks freed"
    );
    assert!(matches!(
        other.scan(positions[10], u64::MAX, &[]),
        Err(DsError::Trimmed { .. })
    ));
    let rest = other.scan(positions[150], u64::MAX, &[]).unwrap();
    assert_eq!(rest.entries.len(), 50);
    let p = other.append(b"after trim", &[7]).unwrap();
    let last = log.scan(p, u64::MAX, &[7]).unwrap();
    assert_eq!(last.entries[0].data, b"after trim");
    assert!(log.trim(u64::MAX).is_err());
    task.close().unwrap();
}

#[test]
fn log_concurrent_appends_scan_as_complete_prefixes_in_torn_mode() {
    let pool = pool(true);
    let owner = pool.client().unwrap();
    let task = owner.task("/j/logc").unwrap();
    let _log = Log::create(&task, "l").unwrap();
    const P: u32 = 3;
    const EACH: u32 = 60;
    let stop = Arc::new(AtomicBool::new(false));
    let check = |entries: &[farpool::ds::LogEntry]| {
        let mut last: HashMap<u32, u32> = HashMap::new();
        for e in entries {
            let p = u32::from_le_bytes(e.data[0..4].try_into().unwrap());
            let seq = u32::from_le_bytes(e.data[4..8].try_into().unwrap());
            assert_eq!(e.streams, vec![p]);
            assert_eq!(e.data.len(), 8 + (seq as usize * 13) % 200);
            assert!(
                last.get(&p).map_or(true, |&prev| seq == prev + 1),
                "gap or reorder"
            );
            last.insert(p, seq);
        }
    };
    let scanner = {
        let c = pool.client().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let log = Log::open(&c, "/j/logc/l").unwrap();
            let mut scans = 0;
            while !stop.load(Ordering::Relaxed) {
                let s = log.scan(0, u64::MAX, &[]).unwrap();
                check(&s.entries);
                scans += 1;
            }
            scans
        })
    };
    let writers: Vec<_> = (0..P)
        .map(|p| {
            let c = pool.client().unwrap();
            std::thread::spawn(move || {
                let log = Log::open(&c, "/j/logc/l").unwrap();
                for seq in 0..EACH {
                    let mut d = p.to_le_bytes().to_vec();
                    d.extend_from_slice(&seq.to_le_bytes());
                    d.resize(8 + (seq as usize * 13) % 200, seq as u8);
                    log.append(&d, &[p]).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(scanner.join().unwrap() > 0);
    let log = Log::open(&owner, "/j/logc/l").unwrap();
    let all = log.scan(0, u64::MAX, &[]).unwrap();
    assert_eq!(all.entries.len(), (P * EACH) as usize, "every entry once");
    assert_eq!(all.next, log.end().unwrap());
    check(&all.entries);
    task.close().unwrap();
}

#[derive(Debug, Clone)]
enum LogOp {
    Append(Vec<u8>, Vec<u32>),
    /// Scan from entry index a to entry index b (of the model), on a stream filter.
    Scan(usize, usize, Vec<u32>),
    /// Trim to entry index.
    Trim(usize),
}

fn log_op() -> impl Strategy<Value = LogOp> {
    prop_oneof![
        5 => (prop::collection::vec(any::<u8>(), 0..1500), prop::collection::vec(0u32..4, 0..3))
            .prop_map(|(d, s)| LogOp::Append(d, s)),
        3 => (0usize..60, 0usize..60, prop::collection::vec(0u32..4, 0..2))
            .prop_map(|(a, b, s)| LogOp::Scan(a, b, s)),
        1 => (0usize..60).prop_map(LogOp::Trim),
    ]
}

#[test]
fn log_matches_a_vec_model() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let _lease = client.lease("/pl").unwrap();
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(PropConfig {
        cases: 16,
        ..PropConfig::default()
    });
    runner
        .run(&prop::collection::vec(log_op(), 1..60), |ops| {
            let path = format!("/pl/l{}", case.fetch_add(1, Ordering::Relaxed));
            let log = Log::create_at(&client, &path).unwrap();
            // (position, streams, data); entries before `trimmed` are gone.
            let mut model: Vec<(u64, Vec<u32>, Vec<u8>)> = Vec::new();
            let mut trimmed = 0usize;
            for op in ops {
                match op {
                    LogOp::Append(d, s) => {
                        let p = log.append(&d, &s).unwrap();
                        prop_assert!(model.last().map_or(true, |l| l.0 < p));
                        model.push((p, s, d));
                    }
                    LogOp::Scan(a, b, filter) => {
                        let n = model.len();
                        let (a, b) = (a.min(n), b.min(n));
                        let pos = |i: usize| model.get(i).map_or(log.end().unwrap(), |e| e.0);
                        let got = log.scan(pos(a), pos(b), &filter);
                        if a < trimmed {
                            let trimmed_err = matches!(got, Err(DsError::Trimmed { .. }));
                            prop_assert!(trimmed_err, "scan from a trimmed position");
                            continue;
                        }
                        let got = got.unwrap();
                        let want: Vec<_> = model[a..b.max(a)]
                            .iter()
                            .filter(|e| filter.is_empty() || e.1.iter().any(|s| filter.contains(s)))
                            .collect();
                        prop_assert_eq!(got.entries.len(), want.len());
                        for (g, w) in got.entries.iter().zip(want) {
                            prop_assert_eq!(g.position, w.0);
                            prop_assert_eq!(&g.streams, &w.1);
                            prop_assert_eq!(&g.data, &w.2);
                        }
                    }
                    LogOp::Trim(i) => {
                        let i = i.min(model.len());
                        if i >= trimmed {
                            let p = model.get(i).map_or(log.end().unwrap(), |e| e.0);
                            log.trim(p).unwrap();
                            trimmed = i;
                        }
                    }
                }
            }
            log.destroy().unwrap();
            Ok(())
        })
        .unwrap();
}

#[test]
fn every_structure_syncs_dumps_and_loads_through_the_persistent_tier() {
    use farpool::tier::Tier;
    let pool = pool(true);
    let client = pool.client().unwrap();
    let task = client.task("/j/tier").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tier = Tier::open(dir.path().to_str().unwrap()).unwrap();

    // File: several blocks.
    let f = File::create(&task, "f").unwrap();
    let bytes: Vec<u8> = (0..3 * BS as usize + 17).map(|i| (i % 251) as u8).collect();
    f.append(&bytes).unwrap();
    assert!(f.sync(&tier, "f").unwrap() > bytes.len() as u64);
    f.dump(&tier, "f-dumped").unwrap();
    assert!(matches!(
        File::open(&client, "/j/tier/f"),
        Err(DsError::NotFound { .. })
    ));
    let g = File::load(&client, "/j/tier/f2", &tier, "f-dumped").unwrap();
    assert_eq!(g.read_all().unwrap(), bytes);
    // Loading over data is refused; loading another kind is refused.
    assert!(matches!(
        File::load(&client, "/j/tier/f2", &tier, "f"),
        Err(DsError::Exists { .. })
    ));

    // Queue: across segments, some items already taken.
    let q = Queue::create(&task, "q", QueueConfig { slot_size: 64 }).unwrap();
    for i in 0..200u32 {
        q.enqueue(&i.to_le_bytes()).unwrap();
    }
    for _ in 0..50 {
        q.dequeue().unwrap().unwrap();
    }
    q.sync(&tier, "q").unwrap();
    assert_eq!(q.len().unwrap(), 150, "sync takes nothing");
    let q2 = Queue::load(
        &client,
        "/j/tier/q2",
        QueueConfig { slot_size: 64 },
        &tier,
        "q",
    )
    .unwrap();
    for i in 50..200u32 {
        assert_eq!(q2.dequeue().unwrap(), Some(i.to_le_bytes().to_vec()));
    }
    assert_eq!(q2.dequeue().unwrap(), None);

    // Kv: enough keys to split, and a value in a block of its own.
    let config = KvConfig {
        split_load: 0.5,
        merge_load: 0.1,
        ..KvConfig::default()
    };
    let kv = Kv::create(&task, "kv", config).unwrap();
    let mut model = HashMap::new();
    for i in 0..300usize {
        let v = vec![i as u8; i % 50];
        kv.upsert(&key(i), &v).unwrap();
        model.insert(key(i), v);
    }
    let big = vec![7u8; 3 * BS as usize / 4];
    kv.upsert(b"big", &big).unwrap();
    model.insert(b"big".to_vec(), big);
    assert!(kv.partitions().unwrap() > 1);
    let mut got: HashMap<Vec<u8>, Vec<u8>> = kv.entries().unwrap().into_iter().collect();
    assert_eq!(got, model);
    kv.dump(&tier, "kv").unwrap();
    let kv2 = Kv::load(&client, "/j/tier/kv2", config, &tier, "kv").unwrap();
    got = kv2.entries().unwrap().into_iter().collect();
    assert_eq!(got, model);
    assert_eq!(
        kv2.get(b"big").unwrap().map(|v| v.len()),
        Some(3 * BS as usize / 4)
    );
    assert!(matches!(
        Queue::load(&client, "/j/tier/q3", QueueConfig::default(), &tier, "kv"),
        Err(DsError::Snapshot { .. })
    ));

    // Log: trimmed prefix; positions survive.
    let log = Log::create(&task, "log").unwrap();
    let mut positions = Vec::new();
    for i in 0..100u32 {
        positions.push(log.append(&[i as u8; 100], &[i % 3]).unwrap());
    }
    log.trim(positions[40]).unwrap();
    let before = log.scan(positions[40], log.end().unwrap(), &[1]).unwrap();
    log.dump(&tier, "log").unwrap();
    let log2 = Log::load(&client, "/j/tier/log2", &tier, "log").unwrap();
    assert_eq!(log2.start().unwrap(), positions[40]);
    let after = log2.scan(positions[40], log2.end().unwrap(), &[1]).unwrap();
    assert_eq!(after, before);
    assert!(matches!(
        log2.scan(positions[10], positions[20], &[]),
        Err(DsError::Trimmed { .. })
    ));

    // A missing key and a damaged object are typed errors.
    assert!(matches!(
        File::load(&client, "/j/tier/none", &tier, "missing"),
        Err(DsError::Tier(farpool::tier::TierError::NotFound { .. }))
    ));
    std::fs::write(dir.path().join("damaged"), b"FPSNAP01 not really").unwrap();
    assert!(matches!(
        File::load(&client, "/j/tier/none", &tier, "damaged"),
        Err(DsError::Snapshot { .. })
    ));
}

#[test]
fn kv_get_many_matches_get_across_partitions_remote_values_and_writers() {
    let pool = pool(true);
    let client = pool.client().unwrap();
    let task = client.task("/j/many").unwrap();
    let config = KvConfig {
        split_load: 0.5,
        merge_load: 0.1,
        ..KvConfig::default()
    };
    let kv = Kv::create(&task, "t", config).unwrap();
    for i in 0..200usize {
        kv.upsert(&key(i), &vec![i as u8; i % 60]).unwrap();
    }
    kv.upsert(b"big", &vec![9u8; 3 * BS as usize / 4]).unwrap();
    assert!(kv.partitions().unwrap() > 2);
    // A writer rewrites values in place while the batches run.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let c = pool.client().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let kv = Kv::open(&c, "/j/many/t").unwrap();
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                for i in (0..200usize).step_by(5) {
                    let mut v = vec![i as u8; i % 60];
                    if let Some(b) = v.first_mut() {
                        *b = round;
                    }
                    kv.upsert(&key(i), &v).unwrap();
                }
                round = round.wrapping_add(1);
            }
        })
    };
    let mut keys: Vec<Vec<u8>> = (0..220usize).map(key).collect();
    keys.push(b"big".to_vec());
    for _ in 0..5 {
        let got = kv.get_many(&keys).unwrap();
        for (i, v) in got.iter().enumerate().take(220) {
            if i >= 200 {
                assert_eq!(v, &None, "key {i} was never written");
                continue;
            }
            let v = v.as_ref().expect("every written key is there");
            assert_eq!(v.len(), i % 60);
            assert!(v.iter().skip(1).all(|&b| b == i as u8), "key {i}: {v:?}");
        }
        assert_eq!(got[220].as_ref().map(Vec::len), Some(3 * BS as usize / 4));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let quiet = kv.get_many(&keys).unwrap();
    let one: Vec<_> = keys.iter().map(|k| kv.get(k).unwrap()).collect();
    assert_eq!(quiet, one);
}

// ---- Notifications ----

use farpool::ds::{EventKind, Listener, ListenerConfig, Notification};

/// Writers re-read the listener count this often in these tests.
const REFRESH: Duration = Duration::from_millis(10);

fn listener_config() -> ListenerConfig {
    ListenerConfig {
        writer_refresh: REFRESH,
        lease: Duration::from_secs(1),
        housekeeping: Duration::from_millis(20),
        max_poll: Duration::from_millis(2),
    }
}

/// Every event until none comes for `quiet`.
fn drain(l: &mut Listener, quiet: Duration) -> Vec<Notification> {
    let mut out = Vec::new();
    while let Some(n) = l.next(quiet).unwrap() {
        out.push(n);
    }
    out
}

#[test]
fn notify_kv_events_arrive_once_in_order_per_producer_to_every_listener_in_torn_mode() {
    let pool = pool(true);
    let client = pool.client().unwrap();
    let kv = Kv::create_at(&client, "/n/kv", KvConfig::default()).unwrap();
    kv.set_notify_refresh(REFRESH);
    // Before anyone subscribes: never delivered.
    kv.upsert(b"early", b"x").unwrap();
    let mut a = Listener::listen_with(&client, "/n/kv", listener_config()).unwrap();
    let mut b = Listener::listen_with(&pool.client().unwrap(), "/n/kv", listener_config()).unwrap();
    kv.upsert(b"between", b"x").unwrap(); // after listen, before subscribe
    a.subscribe(&[EventKind::Put, EventKind::Remove]).unwrap();
    b.subscribe(&[EventKind::Remove]).unwrap();

    const PRODUCERS: usize = 3;
    const N: usize = 60;
    let handles: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let c = pool.client().unwrap();
            std::thread::spawn(move || {
                let kv = Kv::open(&c, "/n/kv").unwrap();
                kv.set_notify_refresh(REFRESH);
                for i in 0..N {
                    let k = format!("p{p}-{i}");
                    assert!(kv.put(k.as_bytes(), b"v").unwrap());
                    assert!(!kv.put(k.as_bytes(), b"w").unwrap()); // unchanged: no event
                    if i % 3 == 0 {
                        assert!(kv.update(k.as_bytes(), b"u").unwrap());
                        assert!(kv.remove(k.as_bytes()).unwrap());
                        assert!(!kv.remove(k.as_bytes()).unwrap()); // absent: no event
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // What each producer did, in its order.
    let expect = |p: usize, removes_only: bool| -> Vec<(EventKind, Vec<u8>)> {
        let mut v = Vec::new();
        for i in 0..N {
            let k = format!("p{p}-{i}").into_bytes();
            if !removes_only {
                v.push((EventKind::Put, k.clone()));
            }
            if i % 3 == 0 {
                if !removes_only {
                    v.push((EventKind::Put, k.clone()));
                }
                v.push((EventKind::Remove, k));
            }
        }
        v
    };
    for (l, removes_only) in [(&mut a, false), (&mut b, true)] {
        let got = drain(l, Duration::from_millis(300));
        let mut positions: Vec<u64> = got.iter().map(|n| n.position).collect();
        positions.dedup();
        assert_eq!(positions.len(), got.len(), "an event delivered twice");
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "log order");
        assert!(got.iter().all(|n| n.len == n.data.len() as u64));
        for p in 0..PRODUCERS {
            let prefix = format!("p{p}-").into_bytes();
            let mine: Vec<(EventKind, Vec<u8>)> = got
                .iter()
                .filter(|n| n.data.starts_with(&prefix))
                .map(|n| (n.kind, n.data.clone()))
                .collect();
            assert_eq!(mine, expect(p, removes_only), "producer {p}");
        }
        let others = got.iter().filter(|n| !n.data.starts_with(b"p")).count();
        assert_eq!(others, 0, "an event from before subscribe was delivered");
    }
    a.unsubscribe().unwrap();
    assert!(matches!(
        a.next(Duration::ZERO),
        Err(DsError::NotSubscribed { .. })
    ));
}

#[test]
fn notify_queue_enqueues_and_dequeues_and_writers_stop_after_unsubscribe() {
    let pool = pool(true);
    let client = pool.client().unwrap();
    let q = Queue::create_at(&client, "/n/q", QueueConfig { slot_size: 64 }).unwrap();
    q.set_notify_refresh(REFRESH);
    let events = "/n/q/events";
    q.enqueue(b"before").unwrap();
    let mut l = Listener::listen_with(&client, "/n/q", listener_config()).unwrap();
    // Nobody subscribed: operations publish nothing (the event log stays empty).
    let log = Log::open(&client, events).unwrap();
    q.enqueue(b"unheard").unwrap();
    assert_eq!(log.end().unwrap(), 0);

    l.subscribe(&[EventKind::Enqueue, EventKind::Dequeue])
        .unwrap();
    let consumer = Queue::open(&pool.client().unwrap(), "/n/q").unwrap();
    consumer.set_notify_refresh(REFRESH);
    for i in 0..100u32 {
        q.enqueue(&i.to_le_bytes()).unwrap();
    }
    let mut taken = consumer.dequeue_many(3).unwrap(); // "before", "unheard", 0
    while let Some(item) = consumer.dequeue().unwrap() {
        taken.push(item);
    }
    assert_eq!(taken.len(), 102);
    let got = drain(&mut l, Duration::from_millis(300));
    let enq: Vec<Vec<u8>> = got
        .iter()
        .filter(|n| n.kind == EventKind::Enqueue)
        .map(|n| n.data.clone())
        .collect();
    let deq: Vec<Vec<u8>> = got
        .iter()
        .filter(|n| n.kind == EventKind::Dequeue)
        .map(|n| n.data.clone())
        .collect();
    let items: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_le_bytes().to_vec()).collect();
    assert_eq!(enq, items);
    let mut all = vec![b"before".to_vec(), b"unheard".to_vec()];
    all.extend(items);
    assert_eq!(deq, all, "every dequeue, in order, once");

    // Only dequeues from now on.
    l.subscribe(&[EventKind::Dequeue]).unwrap();
    q.enqueue(b"x").unwrap();
    consumer.dequeue().unwrap();
    let got = drain(&mut l, Duration::from_millis(100));
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].kind, &got[0].data[..]),
        (EventKind::Dequeue, &b"x"[..])
    );

    // After unsubscribe and one refresh interval, writers stop publishing.
    l.unsubscribe().unwrap();
    std::thread::sleep(REFRESH * 2);
    let end = log.end().unwrap();
    for i in 0..20u32 {
        q.enqueue(&i.to_le_bytes()).unwrap();
        consumer.dequeue().unwrap();
    }
    assert_eq!(log.end().unwrap(), end, "published with no listener");
}

#[test]
fn notify_log_is_trimmed_as_listeners_advance_and_expired_listeners_are_dropped() {
    let pool = pool(false);
    let client = pool.client().unwrap();
    let kv = Kv::create_at(&client, "/n/t", KvConfig::default()).unwrap();
    kv.set_notify_refresh(REFRESH);
    assert!(matches!(
        Listener::listen(&client, "/n/missing"),
        Err(DsError::NotFound { .. })
    ));
    // (The first listener fixes the table's lease: 1 s here.)
    let _other = Listener::listen_with(&client, "/n/t", listener_config()).unwrap();
    assert!(matches!(
        Listener::listen(&client, "/n/t/listeners"),
        Err(DsError::WrongKind { .. })
    ));

    // A listener that stops calling `next` (as if crashed) and one that keeps up.
    let mut gone = Listener::listen_with(&client, "/n/t", listener_config()).unwrap();
    gone.subscribe(&[EventKind::Put]).unwrap();
    let mut live = Listener::listen_with(&client, "/n/t", listener_config()).unwrap();
    live.subscribe(&[EventKind::Put]).unwrap();
    let mut seen = 0;
    let t0 = std::time::Instant::now();
    for i in 0..600 {
        kv.upsert(format!("key-{i:04}").as_bytes(), b"v").unwrap();
        while live.next(Duration::ZERO).unwrap().is_some() {
            seen += 1;
        }
    }
    seen += drain(&mut live, Duration::from_millis(50)).len();
    assert_eq!(seen, 600);
    let (start, end) = live.log_bounds().unwrap();
    assert!(end > 4 * BS, "600 events span several blocks");
    let took = t0.elapsed();
    println!("600 upserts with a listener keeping up: {took:?}");
    if took < Duration::from_millis(800) {
        // (A slower machine may legitimately have dropped it already.)
        assert_eq!(start, 0, "the silent listener still holds the log");
    }

    // After the lease, the live listener drops the silent one and trims to itself.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(live.next(Duration::from_millis(50)).unwrap().is_none());
    let (start, end) = live.log_bounds().unwrap();
    assert_eq!(start, end, "trimmed up to the live listener's cursor");
    assert!(subtree_blocks(&client, "/n/t/events") <= 2);
    assert!(matches!(
        gone.next(Duration::ZERO),
        Err(DsError::ListenerExpired { .. })
    ));

    // A listener that goes silent with nobody else listening: the writers drop it
    // themselves after the lease, trim, and stop publishing.
    live.unsubscribe().unwrap();
    let mut silent = Listener::listen_with(&client, "/n/t", listener_config()).unwrap();
    silent.subscribe(&[EventKind::Put]).unwrap();
    std::mem::forget(silent);
    let t0 = std::time::Instant::now();
    let mut i = 0;
    while t0.elapsed() < Duration::from_millis(2500) {
        kv.upsert(format!("more-{i}").as_bytes(), b"v").unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let log = Log::open(&client, "/n/t/events").unwrap();
    let end = log.end().unwrap();
    // Trimmed to the end when the writer dropped the listener; a few events follow
    // until its next refresh of the count.
    assert!(
        end > 2 * BS,
        "the writer published while the listener was counted"
    );
    assert!(
        end - log.start().unwrap() < BS,
        "the writer trimmed the silent listener's events"
    );
    assert!(subtree_blocks(&client, "/n/t/events") <= 2);
    kv.upsert(b"last", b"v").unwrap();
    std::thread::sleep(REFRESH * 2);
    kv.upsert(b"last2", b"v").unwrap();
    assert_eq!(
        log.end().unwrap(),
        end,
        "no listener left: nothing published"
    );
}

/// Operations served by the pool's memory nodes so far.
fn node_ops(pool: &EmbeddedPool) -> u64 {
    pool.nodes()
        .iter()
        .map(|n| {
            let s = n.stats();
            s.ops_read + s.ops_write + s.ops_atomic
        })
        .sum()
}

#[test]
fn notify_costs_writers_nothing_per_operation_when_nobody_listens() {
    let pool = EmbeddedPool::start(EmbeddedConfig {
        nodes: 1,
        capacity: 8 << 20,
        block_size: BS,
        ..EmbeddedConfig::default()
    })
    .expect("embedded pool");
    let client = pool.client().unwrap();
    let kv = Kv::create_at(&client, "/n/cost", KvConfig::default()).unwrap();
    let q = Queue::create_at(&client, "/n/costq", QueueConfig { slot_size: 64 }).unwrap();
    // 62 items per round plus one to warm up fill exactly one queue segment (63
    // slots), so every round links and frees segments at the same points.
    assert_eq!(q.segment_slots(), 63);
    for i in 0..62 {
        kv.upsert(&key(i), b"value-00").unwrap();
    }
    // A listener came and went: the count is back to 0.
    let mut l = Listener::listen_with(&client, "/n/cost", listener_config()).unwrap();
    l.subscribe(&[EventKind::Put]).unwrap();
    l.unsubscribe().unwrap();
    let round = |refresh: Duration| -> (u64, Duration) {
        kv.set_notify_refresh(refresh);
        q.set_notify_refresh(refresh);
        kv.upsert(&key(0), b"value-00").unwrap(); // takes the first count read
        q.enqueue(b"warm").unwrap();
        q.dequeue().unwrap();
        let (before, t0) = (node_ops(&pool), std::time::Instant::now());
        for i in 0..62 {
            kv.upsert(&key(i), b"value-01").unwrap(); // in place: same ops each time
        }
        let mid = node_ops(&pool);
        for _ in 0..62 {
            q.enqueue(b"item").unwrap();
            q.dequeue().unwrap();
        }
        println!(
            "kv upserts: {} node operations, queue pairs: {}",
            mid - before,
            node_ops(&pool) - mid
        );
        (node_ops(&pool) - before, t0.elapsed())
    };
    // Refresh never due during the round: the structures' own operations only (a
    // Kv handle's record-space reservation may add one operation to a round).
    let (quiet, _) = round(Duration::from_secs(3600));
    assert!(round(Duration::from_secs(3600)).0.abs_diff(quiet) <= 2);
    // Default refresh: one count read per handle per 50 ms, nothing per operation
    // (one extra per operation would be 186).
    let (ops, took) = round(farpool::ds::DEFAULT_REFRESH);
    let bound = 2 * (took.as_millis() as u64 / 50 + 1) + 2;
    assert!(
        ops <= quiet + bound,
        "{} extra operations in {took:?} (at most {bound})",
        ops.saturating_sub(quiet)
    );
    println!(
        "186 operations: {quiet} node operations with no count refresh, {ops} with the default refresh over {took:?}"
    );
    assert_eq!(
        Log::open(&client, "/n/cost/events").unwrap().end().unwrap(),
        0
    );
}

#[test]
fn notify_file_and_log_appends_carry_their_offsets() {
    let pool = pool(true);
    let client = pool.client().unwrap();
    let f = File::create_at(&client, "/n/f").unwrap();
    f.set_notify_refresh(REFRESH);
    let log = Log::create_at(&client, "/n/log").unwrap();
    log.set_notify_refresh(REFRESH);
    f.append(b"before").unwrap();
    let mut lf = Listener::listen_with(&client, "/n/f", listener_config()).unwrap();
    let mut ll = farpool::ds::listen(&client, "/n/log").unwrap();
    lf.subscribe(&[EventKind::Append]).unwrap();
    // Default writer refresh on the log's listener side: wait long enough anyway.
    ll.subscribe(&[EventKind::Append]).unwrap();
    let big = vec![7u8; 3000];
    let mut offsets = Vec::new();
    for i in 0..20u32 {
        offsets.push(f.append(&i.to_le_bytes()).unwrap());
    }
    let big_at = f.append(&big).unwrap();
    let positions: Vec<u64> = (0..10u32)
        .map(|i| log.append(&i.to_le_bytes(), &[i % 3]).unwrap())
        .collect();
    let got = drain(&mut lf, Duration::from_millis(200));
    assert_eq!(got.len(), 21);
    for (i, n) in got[..20].iter().enumerate() {
        assert_eq!(n.kind, EventKind::Append);
        assert_eq!(n.data, (i as u32).to_le_bytes());
        assert_eq!(n.at, Some(offsets[i]));
    }
    assert_eq!(got[20].at, Some(big_at));
    assert_eq!(
        (got[20].len, got[20].data.len()),
        (3000, 1024),
        "a bounded prefix"
    );
    let got = drain(&mut ll, Duration::from_millis(200));
    let at: Vec<Option<u64>> = got.iter().map(|n| n.at).collect();
    assert_eq!(at, positions.into_iter().map(Some).collect::<Vec<_>>());
    // The event log of an object publishes nothing itself.
    let mut meta = Listener::listen_with(&client, "/n/log/events", listener_config()).unwrap();
    meta.subscribe(&[EventKind::Append]).unwrap();
    log.append(b"one more", &[]).unwrap();
    assert_eq!(
        ll.next(Duration::from_millis(200)).unwrap().unwrap().data,
        b"one more"
    );
    assert!(meta.next(Duration::from_millis(50)).unwrap().is_none());
}
