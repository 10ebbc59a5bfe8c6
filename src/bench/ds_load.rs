//! The farpool side of the data-structure benchmarks (`farpool bench kv|queue|file|log`):
//! one client connection and one structure handle per client thread.
//!
//! * kv: one table shared by all clients; each client gets or upserts its own
//!   pre-populated keys `c{client}:{slot}`.
//! * queue: one queue shared by all clients; `enqueue` is timed and followed by an
//!   untimed `dequeue` (and `dequeue` is preceded by an untimed `enqueue`), so the queue
//!   stays short and the pool never fills.
//! * file: a file per client; `read` reads a random pre-written `size` slice, `append`
//!   appends `size` bytes and replaces the file (untimed) once it holds a block.
//! * log: a log per client; `append` appends one `size` entry to stream 0 (replacing the
//!   log, untimed, once it holds a block), `scan` scans one pre-written entry.

use super::args::{BenchOp, Plan, Workload};
use super::error::BenchError;
use super::load::{BatchOutcome, Connection};
use crate::client::Client;
use crate::ds::{DsError, File, Kv, KvConfig, Log, Queue, QueueConfig};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of a queue slot's header (items up to `slot_size - 24` bytes fit).
const QUEUE_SLOT_HEADER: u64 = 24;

/// Bytes of a log entry's header beyond its data, an upper bound used to size the
/// pre-written log.
const LOG_ENTRY_OVERHEAD: u64 = 64;

/// The structure a client works on.
enum Handle {
    Kv(Box<Kv>),
    Queue(Queue),
    File(File),
    Log(Log),
}

/// One benchmark client of a data structure.
pub(crate) struct DsConn {
    client: Client,
    handle: Option<Handle>,
    /// Path of the structure.
    path: String,
    /// Whether this client removes the structure after the run (the shared ones are
    /// removed by client 0).
    owner: bool,
    op: BenchOp,
    size: u64,
    /// Bytes a file or log may grow to before it is replaced.
    limit: u64,
    /// Kv keys of this client, one per slot.
    keys: Vec<Vec<u8>>,
    /// Pre-written log entries, one per slot: where each starts and ends.
    positions: Vec<(u64, u64)>,
    /// Bytes appended to the current file or log.
    appended: u64,
    value: Vec<u8>,
    buf: Vec<u8>,
    /// Where the Kv handle's cache counts are summed when the connection finishes.
    cache_counts: Arc<Mutex<super::report::KvCacheCounts>>,
}

fn ds(during: impl Into<String>) -> impl FnOnce(DsError) -> BenchError {
    let during = during.into();
    move |source| BenchError::Structure { during, source }
}

impl DsConn {
    /// Connects client `client` to the controller at `addr` and opens (or creates) its
    /// structure under `base`, pre-populating what the operation reads.
    pub(crate) fn connect(
        addr: &str,
        base: &str,
        client_index: usize,
        plan: &Plan,
        cache_counts: Arc<Mutex<super::report::KvCacheCounts>>,
    ) -> Result<Self, BenchError> {
        let client = Client::connect(addr).map_err(|e| {
            BenchError::client(format!("connecting to the controller at {addr}"), e)
        })?;
        let size = plan.size;
        let size_usize = usize::try_from(size)
            .map_err(|_| BenchError::Args(format!("--size {size} does not fit in memory")))?;
        let slots = usize::try_from(plan.slots).unwrap_or(usize::MAX);
        let value = super::payload(size);
        let (path, owner) = match plan.workload {
            Workload::Kv | Workload::Queue => {
                (format!("{base}/{}", plan.workload), client_index == 0)
            }
            _ => (format!("{base}/{}{client_index}", plan.workload), true),
        };
        let mut conn = Self {
            client,
            handle: None,
            path,
            owner,
            op: plan.op,
            size,
            limit: 0,
            keys: Vec::new(),
            positions: Vec::new(),
            appended: 0,
            value,
            buf: vec![0; size_usize],
            cache_counts,
        };
        let handle = match plan.workload {
            Workload::Kv => {
                let config = KvConfig {
                    expected_record: size + 32,
                    ..KvConfig::default()
                };
                let kv = Kv::create_at(&conn.client, &conn.path, config)
                    .map_err(ds(format!("creating the table {}", conn.path)))?;
                conn.keys = (0..slots)
                    .map(|s| format!("c{client_index}:{s}").into_bytes())
                    .collect();
                for k in &conn.keys {
                    kv.upsert(k, &conn.value)
                        .map_err(ds("pre-populating the table"))?;
                }
                Handle::Kv(Box::new(kv))
            }
            Workload::Queue => {
                let slot_size = (size + QUEUE_SLOT_HEADER).next_multiple_of(8);
                let q = Queue::create_at(&conn.client, &conn.path, QueueConfig { slot_size })
                    .map_err(ds(format!("creating the queue {}", conn.path)))?;
                Handle::Queue(q)
            }
            Workload::File => {
                let f = conn.new_file()?;
                conn.limit = (plan.slots * size).max(size);
                if plan.op == BenchOp::Read {
                    for _ in 0..slots {
                        f.append(&conn.value).map_err(ds("pre-writing the file"))?;
                    }
                }
                Handle::File(f)
            }
            Workload::Log => {
                let log = conn.new_log()?;
                conn.limit = (plan.slots * (size + LOG_ENTRY_OVERHEAD)).max(size);
                if plan.op == BenchOp::Scan {
                    let mut starts = Vec::with_capacity(slots);
                    for _ in 0..slots {
                        let pos = log
                            .append(&conn.value, &[0])
                            .map_err(ds("pre-writing the log"))?;
                        starts.push(pos);
                    }
                    let end = log.end().map_err(ds("reading the log's end"))?;
                    let ends = starts.iter().skip(1).copied().chain([end]);
                    conn.positions = starts.iter().copied().zip(ends).collect();
                }
                Handle::Log(log)
            }
            Workload::Raw => {
                return Err(BenchError::Args(
                    "raw block operations are measured by DataConn, not on structures".into(),
                ))
            }
        };
        conn.handle = Some(handle);
        Ok(conn)
    }

    fn new_file(&self) -> Result<File, BenchError> {
        File::create_at(&self.client, &self.path)
            .map_err(ds(format!("creating the file {}", self.path)))
    }

    fn new_log(&self) -> Result<Log, BenchError> {
        Log::create_at(&self.client, &self.path)
            .map_err(ds(format!("creating the log {}", self.path)))
    }

    /// Replaces the file or log once it holds `limit` bytes.
    fn roll_over(&mut self) -> Result<(), BenchError> {
        if self.appended < self.limit {
            return Ok(());
        }
        self.appended = 0;
        let next = match self.handle.take() {
            Some(Handle::File(f)) => {
                f.destroy().map_err(ds("removing a full file"))?;
                Handle::File(self.new_file()?)
            }
            Some(Handle::Log(l)) => {
                l.destroy().map_err(ds("removing a full log"))?;
                Handle::Log(self.new_log()?)
            }
            other => {
                self.handle = other;
                return Ok(());
            }
        };
        self.handle = Some(next);
        Ok(())
    }

    /// Runs the operation on `slot`; returns the latency to record when only part of
    /// the work is timed.
    fn one(&mut self, slot: usize) -> Result<Option<Duration>, String> {
        let Some(handle) = &self.handle else {
            return Err("the structure was removed".into());
        };
        let key = |s: usize| {
            self.keys
                .get(s)
                .ok_or_else(|| format!("slot {s} is out of range"))
        };
        match (handle, self.op) {
            (Handle::Kv(kv), BenchOp::Get) => match kv.get(key(slot)?) {
                Ok(Some(v)) if v.len() as u64 == self.size => Ok(None),
                Ok(Some(v)) => Err(format!(
                    "get returned {} bytes instead of {}",
                    v.len(),
                    self.size
                )),
                Ok(None) => Err("get found no value for a pre-populated key".into()),
                Err(e) => Err(format!("get: {e}")),
            },
            (Handle::Kv(kv), BenchOp::Put) => kv
                .upsert(key(slot)?, &self.value)
                .map(|()| None)
                .map_err(|e| format!("upsert: {e}")),
            (Handle::Queue(q), BenchOp::Enqueue | BenchOp::Dequeue) => {
                let t0 = Instant::now();
                q.enqueue(&self.value)
                    .map_err(|e| format!("enqueue: {e}"))?;
                let t1 = Instant::now();
                match q.dequeue() {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err("dequeue found the queue empty after an enqueue".into()),
                    Err(e) => return Err(format!("dequeue: {e}")),
                }
                Ok(Some(if self.op == BenchOp::Enqueue {
                    t1 - t0
                } else {
                    t1.elapsed()
                }))
            }
            (Handle::File(f), BenchOp::Read) => {
                let pos = slot as u64 * self.size;
                match f.read_at(pos, &mut self.buf) {
                    Ok(n) if n == self.buf.len() => Ok(None),
                    Ok(n) => Err(format!(
                        "read {n} bytes instead of {} at {pos}",
                        self.buf.len()
                    )),
                    Err(e) => Err(format!("read: {e}")),
                }
            }
            (Handle::File(f), BenchOp::Append) => {
                let t0 = Instant::now();
                f.append(&self.value).map_err(|e| format!("append: {e}"))?;
                let took = t0.elapsed();
                self.appended += self.size;
                Ok(Some(took))
            }
            (Handle::Log(l), BenchOp::Append) => {
                let t0 = Instant::now();
                l.append(&self.value, &[0])
                    .map_err(|e| format!("append: {e}"))?;
                let took = t0.elapsed();
                self.appended += self.size + LOG_ENTRY_OVERHEAD;
                Ok(Some(took))
            }
            (Handle::Log(l), BenchOp::Scan) => {
                let (pos, end) = *self
                    .positions
                    .get(slot)
                    .ok_or_else(|| format!("slot {slot} is out of range"))?;
                match l.scan(pos, end, &[]) {
                    Ok(s) if s.entries.len() == 1 => Ok(None),
                    Ok(s) => Err(format!(
                        "scan at {pos} found {} entries instead of 1",
                        s.entries.len()
                    )),
                    Err(e) => Err(format!("scan: {e}")),
                }
            }
            (_, op) => Err(format!("--op {op} does not apply to this structure")),
        }
    }
}

impl Connection for DsConn {
    fn run_batch(&mut self, slots: &[usize]) -> Result<BatchOutcome, BenchError> {
        let mut outcome = BatchOutcome::default();
        if let (Some(Handle::Kv(kv)), BenchOp::Get, true) = (&self.handle, self.op, slots.len() > 1)
        {
            // One Kv::get_many per batch (the Redis peer pipelines the same GETs).
            let started = Instant::now();
            let keys: Vec<&Vec<u8>> = slots.iter().filter_map(|&s| self.keys.get(s)).collect();
            match kv.get_many(&keys) {
                Ok(values) => {
                    for v in values {
                        if v.map(|v| v.len() as u64) != Some(self.size) {
                            outcome
                                .fail(|| "get_many returned a missing or wrong-sized value".into());
                        }
                    }
                }
                Err(e) => {
                    for _ in slots {
                        outcome.fail(|| format!("get_many: {e}"));
                    }
                }
            }
            outcome.latency = Some(started.elapsed());
            return Ok(outcome);
        }
        if let (Some(Handle::Kv(kv)), BenchOp::Put, true) = (&self.handle, self.op, slots.len() > 1)
        {
            // One pipelined Kv::upsert_many per batch (the Redis peer pipelines SETs).
            let started = Instant::now();
            let pairs: Vec<(&Vec<u8>, &Vec<u8>)> = slots
                .iter()
                .filter_map(|&s| self.keys.get(s))
                .map(|k| (k, &self.value))
                .collect();
            if let Err(e) = kv.upsert_many(&pairs) {
                for _ in slots {
                    outcome.fail(|| format!("upsert_many: {e}"));
                }
            }
            outcome.latency = Some(started.elapsed());
            return Ok(outcome);
        }
        let mut timed = Duration::ZERO;
        let started = Instant::now();
        for &s in slots {
            match self.one(s) {
                Ok(part) => timed += part.unwrap_or_default(),
                Err(msg) => {
                    outcome.fail(|| msg);
                }
            }
        }
        // Untimed work (the dequeue after an enqueue, replacing a full file) is left
        // out of the latency; everything else is the batch's wall time.
        let spent = started.elapsed();
        self.roll_over()?;
        outcome.latency = Some(if timed > Duration::ZERO { timed } else { spent });
        Ok(outcome)
    }

    fn finish(mut self) -> Result<(), BenchError> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        if let Handle::Kv(kv) = &handle {
            let s = kv.cache_stats();
            let mut c = self.cache_counts.lock();
            c.hits += s.hits;
            c.fallbacks += s.fallbacks;
            c.misses += s.misses;
        }
        if !self.owner {
            return Ok(());
        }
        let removed = match handle {
            Handle::Kv(h) => (*h).destroy(),
            Handle::Queue(h) => h.destroy(),
            Handle::File(h) => h.destroy(),
            Handle::Log(h) => h.destroy(),
        };
        removed.map_err(ds(format!("removing {}", self.path)))
    }
}
