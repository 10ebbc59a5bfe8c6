//! `farpool bench kv|queue --verify`: concurrent clients drive a structure through many
//! splits and merges (segment links and frees for the queue) and every acknowledged
//! write is checked.
//!
//! * kv: a table with low split and merge thresholds. Each client owns the keys
//!   `v{client}:{k}` and keeps a model of them; it cycles between growing its live set
//!   with upserts (replacing some values) and shrinking it with removes, so the table
//!   splits on the way up and merges on the way down. Every `get`, the answer of every
//!   `remove`, and a final read of every key are compared with the model: a missing
//!   acknowledged value is *lost*, a removed key that is present again (or a remove
//!   that finds an absent key) is *duplicated*, and a value other than the last one
//!   written is *reordered*. Splits and merges are those the clients' handles
//!   published ([`crate::ds::Kv::repartitions`]).
//! * queue: half the clients produce items tagged `(producer, seq)`, the others
//!   consume them; every acknowledged item must be dequeued exactly once and each
//!   producer's items in order. Splits are segments linked, merges segments freed
//!   ([`crate::ds::Queue::segments`]).

use super::args::{Plan, Workload};
use super::error::BenchError;
use crate::client::Client;
use crate::ds::{DsError, Kv, KvConfig, Queue, QueueConfig};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Split threshold of the verified table: with the default 64 KiB blocks a partition
/// splits at about 130 keys.
const KV_SPLIT_LOAD: f64 = 0.15;
/// Merge threshold of the verified table (buddies together at most ~45 keys).
const KV_MERGE_LOAD: f64 = 0.05;
/// Keys each client grows its live set to before shrinking it again.
const KV_KEYS_PER_CLIENT: u64 = 600;
/// Live keys a client shrinks to before growing again.
const KV_LOW_WATER: u64 = 20;
/// Slot size of the verified queue: a 24-byte header and a 16-byte item.
const QUEUE_SLOT: u64 = 40;
/// Items a producer may be ahead of all consumers (bounds the queue's memory).
const QUEUE_MAX_BACKLOG: u64 = 50_000;
/// How long consumers keep draining without progress once producers stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a verification run found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Acknowledged writes (values, items) missing afterwards.
    pub lost: u64,
    /// Items delivered more than once, or removed keys that came back.
    pub duplicated: u64,
    /// Items out of their producer's order, or values other than the last written.
    pub reordered: u64,
    /// Partition splits (kv) or segments linked (queue).
    pub splits: u64,
    /// Partition merges (kv) or segments freed (queue).
    pub merges: u64,
}

impl VerifyReport {
    /// `Ok` when nothing was lost, duplicated or reordered.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.lost + self.duplicated + self.reordered == 0 {
            Ok(())
        } else {
            Err(BenchError::VerifyFailed {
                lost: self.lost,
                duplicated: self.duplicated,
                reordered: self.reordered,
            })
        }
    }

    fn add(&mut self, other: &VerifyReport) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.splits += other.splits;
        self.merges += other.merges;
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lost={} duplicated={} reordered={} splits={} merges={}",
            self.lost, self.duplicated, self.reordered, self.splits, self.merges
        )
    }
}

fn ds(during: impl Into<String>) -> impl FnOnce(DsError) -> BenchError {
    let during = during.into();
    move |source| BenchError::Structure { during, source }
}

fn connect(addr: &str) -> Result<Client, BenchError> {
    Client::connect(addr)
        .map_err(|e| BenchError::client(format!("connecting to the controller at {addr}"), e))
}

/// Runs the verification of `plan.workload` at `path` on the controller at `addr`
/// for `plan.duration` with `plan.clients` clients.
pub(crate) fn run(addr: &str, plan: &Plan, path: &str) -> Result<VerifyReport, BenchError> {
    match plan.workload {
        Workload::Kv => verify_kv(addr, plan, path),
        Workload::Queue => verify_queue(addr, plan, path),
        w => Err(BenchError::Args(format!(
            "--verify checks kv and queue, not {w}"
        ))),
    }
}

/// Joins scoped workers, keeping the first error.
fn join_all<T>(
    handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T, BenchError>>>,
) -> Result<Vec<T>, BenchError> {
    let mut out = Vec::with_capacity(handles.len());
    let mut first = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(_) => {
                first.get_or_insert(BenchError::WorkerPanicked);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Grow and shrink phases shared by the kv clients: the last client to reach the
/// phase's target starts the next one.
struct Phases {
    phase: AtomicU64,
    arrived: AtomicU64,
    clients: u64,
}

impl Phases {
    fn new(clients: u64) -> Self {
        Self {
            phase: AtomicU64::new(0),
            arrived: AtomicU64::new(0),
            clients,
        }
    }

    fn current(&self) -> u64 {
        self.phase.load(Ordering::SeqCst)
    }

    /// Records that one client reached the target of `phase`.
    fn arrive(&self, phase: u64) {
        if self.arrived.fetch_add(1, Ordering::SeqCst) + 1 == self.clients {
            self.arrived.store(0, Ordering::SeqCst);
            self.phase.store(phase + 1, Ordering::SeqCst);
        }
    }
}

/// The value of `key` after its `version`-th write by `client`.
fn kv_value(client: usize, key: u64, version: u64) -> Vec<u8> {
    format!("{client}/{key}/{version}").into_bytes()
}

/// How a value read back compares with the model.
fn classify(expected: Option<&[u8]>, found: Option<&[u8]>) -> VerifyReport {
    let mut r = VerifyReport::default();
    match (expected, found) {
        (Some(_), None) => r.lost = 1,
        (None, Some(_)) => r.duplicated = 1,
        (Some(e), Some(f)) if e != f => r.reordered = 1,
        _ => {}
    }
    r
}

fn verify_kv(addr: &str, plan: &Plan, path: &str) -> Result<VerifyReport, BenchError> {
    let owner = connect(addr)?;
    let config = KvConfig {
        split_load: KV_SPLIT_LOAD,
        merge_load: KV_MERGE_LOAD,
        ..KvConfig::default()
    };
    let table = Kv::create_at(&owner, path, config).map_err(ds(format!("creating {path}")))?;
    let deadline = Instant::now() + plan.duration;
    let stop = AtomicBool::new(false);
    let phases = Phases::new(plan.clients as u64);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..plan.clients)
            .map(|client| {
                let (stop, phases) = (&stop, &phases);
                s.spawn(move || {
                    let r = kv_client(addr, path, client, deadline, stop, phases);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        join_all(handles)
    });
    let results = results?;
    let mut report = VerifyReport::default();
    for r in &results {
        report.add(r);
    }
    table.destroy().map_err(ds(format!("removing {path}")))?;
    Ok(report)
}

/// One kv client: grow and shrink its live keys until `deadline`, then check all.
fn kv_client(
    addr: &str,
    path: &str,
    client: usize,
    deadline: Instant,
    stop: &AtomicBool,
    phases: &Phases,
) -> Result<VerifyReport, BenchError> {
    let c = connect(addr)?;
    let kv = Kv::open(&c, path).map_err(ds(format!("opening {path}")))?;
    let mut rng = rand::thread_rng();
    let key = |k: u64| format!("v{client}:{k}").into_bytes();
    // The model: key -> (value, writes so far); `live` lists the present keys.
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut versions: HashMap<u64, u64> = HashMap::new();
    let mut live: Vec<u64> = Vec::new();
    let mut report = VerifyReport::default();
    let mut phase = 0;
    let mut arrived = false;
    let io = |what: &'static str| ds(format!("{what} in table {path}"));
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let now = phases.current();
        if now != phase {
            (phase, arrived) = (now, false);
        }
        // Even phases grow, odd ones shrink; all clients switch together, so the
        // table as a whole grows (splits) and shrinks (merges).
        let growing = phase % 2 == 0;
        let reached = if growing {
            live.len() as u64 >= KV_KEYS_PER_CLIENT
        } else {
            live.len() as u64 <= KV_LOW_WATER
        };
        if reached && !arrived {
            phases.arrive(phase);
            arrived = true;
        }
        let roll: u32 = rng.gen_range(0..100);
        if roll < 15 || arrived {
            // Read back a key (present or not) and compare.
            let k = rng.gen_range(0..KV_KEYS_PER_CLIENT);
            let found = kv.get(&key(k)).map_err(io("get"))?;
            report.add(&classify(
                model.get(&k).map(Vec::as_slice),
                found.as_deref(),
            ));
        } else if growing {
            // Mostly new keys, sometimes a replacement of a live one.
            let k = if roll < 25 && !live.is_empty() {
                live[rng.gen_range(0..live.len())]
            } else {
                rng.gen_range(0..KV_KEYS_PER_CLIENT)
            };
            let v = versions.entry(k).or_insert(0);
            *v += 1;
            let value = kv_value(client, k, *v);
            kv.upsert(&key(k), &value).map_err(io("upsert"))?;
            if model.insert(k, value).is_none() {
                live.push(k);
            }
        } else if !live.is_empty() {
            let i = rng.gen_range(0..live.len());
            let k = live.swap_remove(i);
            let was = kv.remove(&key(k)).map_err(io("remove"))?;
            if !was {
                report.lost += 1;
            }
            model.remove(&k);
            // A remove of an absent key must say so.
            let k2 = rng.gen_range(0..KV_KEYS_PER_CLIENT);
            if !model.contains_key(&k2) && kv.remove(&key(k2)).map_err(io("remove"))? {
                report.duplicated += 1;
            }
        }
    }
    // Final check of every key this client ever touched.
    for k in 0..KV_KEYS_PER_CLIENT {
        let found = kv.get(&key(k)).map_err(io("get"))?;
        report.add(&classify(
            model.get(&k).map(Vec::as_slice),
            found.as_deref(),
        ));
    }
    let r = kv.repartitions();
    report.splits = r.splits;
    report.merges = r.merges;
    Ok(report)
}

/// An item: producer and sequence number, little-endian.
fn item(producer: u64, seq: u64) -> [u8; 16] {
    let mut b = [0; 16];
    b[..8].copy_from_slice(&producer.to_le_bytes());
    b[8..].copy_from_slice(&seq.to_le_bytes());
    b
}

/// The `(producer, seq)` of an item, or `None` when it is not one of ours.
fn parse_item(b: &[u8]) -> Option<(u64, u64)> {
    let p: [u8; 8] = b.get(..8)?.try_into().ok()?;
    let s: [u8; 8] = b.get(8..16)?.try_into().ok()?;
    (b.len() == 16).then(|| (u64::from_le_bytes(p), u64::from_le_bytes(s)))
}

/// What the queue's consumers saw.
#[derive(Default)]
struct Consumed {
    /// Per producer, the sequence numbers taken (in the order taken).
    taken: HashMap<u64, Vec<u64>>,
    reordered: u64,
    /// Items that are not `(producer, seq)` of a known producer.
    foreign: u64,
}

fn verify_queue(addr: &str, plan: &Plan, path: &str) -> Result<VerifyReport, BenchError> {
    if plan.clients < 2 {
        return Err(BenchError::Args(
            "queue --verify needs a producer and a consumer; use --clients 2 or more".into(),
        ));
    }
    let producers = (plan.clients / 2) as u64;
    let consumers = plan.clients - producers as usize;
    let owner = connect(addr)?;
    let q = Queue::create_at(
        &owner,
        path,
        QueueConfig {
            slot_size: QUEUE_SLOT,
        },
    )
    .map_err(ds(format!("creating {path}")))?;
    let deadline = Instant::now() + plan.duration;
    let produced = AtomicU64::new(0);
    let consumed = AtomicU64::new(0);
    let producing = AtomicU64::new(producers);
    let failed = AtomicBool::new(false);
    let (sent, got) = std::thread::scope(|s| {
        let prod: Vec<_> = (0..producers)
            .map(|p| {
                let (produced, consumed, producing, failed) =
                    (&produced, &consumed, &producing, &failed);
                s.spawn(move || {
                    let r = (|| {
                        let c = connect(addr)?;
                        let q = Queue::open(&c, path).map_err(ds(format!("opening {path}")))?;
                        let mut seq = 0u64;
                        while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                            let backlog = produced
                                .load(Ordering::Relaxed)
                                .saturating_sub(consumed.load(Ordering::Relaxed));
                            if backlog > QUEUE_MAX_BACKLOG {
                                std::thread::yield_now();
                                continue;
                            }
                            q.enqueue(&item(p, seq)).map_err(ds("enqueue"))?;
                            seq += 1;
                            produced.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((seq, q.segments()))
                    })();
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    producing.fetch_sub(1, Ordering::Release);
                    r
                })
            })
            .collect();
        let cons: Vec<_> = (0..consumers)
            .map(|_| {
                let (produced, consumed, producing, failed) =
                    (&produced, &consumed, &producing, &failed);
                s.spawn(move || {
                    let r = (|| {
                        let c = connect(addr)?;
                        let q = Queue::open(&c, path).map_err(ds(format!("opening {path}")))?;
                        let mut seen = Consumed::default();
                        let mut last: HashMap<u64, u64> = HashMap::new();
                        let mut idle_since: Option<Instant> = None;
                        loop {
                            if failed.load(Ordering::Relaxed) {
                                break;
                            }
                            let done = producing.load(Ordering::Acquire) == 0;
                            if done
                                && consumed.load(Ordering::Relaxed)
                                    >= produced.load(Ordering::Relaxed)
                            {
                                break;
                            }
                            let items = q.dequeue_many(16).map_err(ds("dequeue"))?;
                            if items.is_empty() {
                                if done {
                                    let since = *idle_since.get_or_insert_with(Instant::now);
                                    if since.elapsed() > DRAIN_TIMEOUT {
                                        break; // the rest is lost
                                    }
                                }
                                std::thread::yield_now();
                                continue;
                            }
                            idle_since = None;
                            consumed.fetch_add(items.len() as u64, Ordering::Relaxed);
                            for it in items {
                                match parse_item(&it) {
                                    Some((p, seq)) if p < producers => {
                                        if last.get(&p).is_some_and(|&prev| seq <= prev) {
                                            seen.reordered += 1;
                                        }
                                        last.insert(p, seq);
                                        seen.taken.entry(p).or_default().push(seq);
                                    }
                                    _ => seen.foreign += 1,
                                }
                            }
                        }
                        Ok((seen, q.segments()))
                    })();
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        (join_all(prod), join_all(cons))
    });
    let (sent, got) = (sent?, got?);
    let mut report = VerifyReport::default();
    let mut linked = 0;
    let mut counts: Vec<Vec<u32>> = sent
        .iter()
        .map(|(n, seg)| {
            linked = linked.max(seg.linked);
            report.merges += seg.freed;
            vec![0u32; usize::try_from(*n).unwrap_or(0)]
        })
        .collect();
    for (c, seg) in &got {
        linked = linked.max(seg.linked);
        report.merges += seg.freed;
        report.reordered += c.reordered;
        report.duplicated += c.foreign;
        for (p, seqs) in &c.taken {
            let Some(per) = usize::try_from(*p).ok().and_then(|p| counts.get_mut(p)) else {
                continue;
            };
            for &seq in seqs {
                match usize::try_from(seq).ok().and_then(|s| per.get_mut(s)) {
                    Some(n) => *n += 1,
                    // Never acknowledged as sent: delivered from nowhere.
                    None => report.duplicated += 1,
                }
            }
        }
    }
    for n in counts.iter().flatten() {
        match n {
            0 => report.lost += 1,
            1 => {}
            more => report.duplicated += u64::from(more - 1),
        }
    }
    // The first segment exists from the start; each later one is a growth step.
    report.splits = linked.saturating_sub(1);
    q.destroy().map_err(ds(format!("removing {path}")))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_the_documented_line_and_checks() {
        let mut r = VerifyReport {
            splits: 60,
            merges: 55,
            ..VerifyReport::default()
        };
        assert_eq!(
            r.to_string(),
            "lost=0 duplicated=0 reordered=0 splits=60 merges=55"
        );
        assert!(r.check().is_ok());
        r.reordered = 2;
        let err = r.check().unwrap_err();
        assert!(matches!(err, BenchError::VerifyFailed { reordered: 2, .. }));
        assert!(err.to_string().contains("reordered=2"), "{err}");
    }

    #[test]
    fn classifies_reads_against_the_model() {
        assert_eq!(classify(Some(b"a"), None).lost, 1);
        assert_eq!(classify(None, Some(b"a")).duplicated, 1);
        assert_eq!(classify(Some(b"a"), Some(b"b")).reordered, 1);
        assert_eq!(classify(Some(b"a"), Some(b"a")), VerifyReport::default());
        assert_eq!(classify(None, None), VerifyReport::default());
    }

    #[test]
    fn items_round_trip() {
        assert_eq!(parse_item(&item(3, 77)), Some((3, 77)));
        assert_eq!(parse_item(b"short"), None);
        assert_eq!(parse_item(&[0; 17]), None);
        assert_ne!(kv_value(0, 1, 2), kv_value(0, 1, 3));
    }
}
