//! `farpool soak`: many clients run mixed operations against a running pool for a set
//! time and verify every acknowledged write, then report one line
//! `ops=N errors=N lost=N rss_start_kib=N rss_end_kib=N`.
//!
//! Each client owns a task `/soak/c<i>` with raw blocks, a [`Kv`], a [`Queue`] and a
//! [`File`], and keeps a shadow copy of what it wrote: raw block bytes, the value of
//! every key, the sequence numbers of queued items and the offsets of appended file
//! records. Every read is checked against the shadow, and everything is checked once
//! more at the end. An operation that fails counts as an error; a read that does not
//! return what was acknowledged counts as lost. Blocks are freed and allocated, and
//! files destroyed and created, as the run goes, so memory use stays bounded.
//!
//! Memory is measured as the summed resident set of the processes named by
//! `--watch-pid` (the controller and memory nodes started by `scripts/soak.sh`): once
//! after every client finished its setup, and once at the end.

use crate::client::{BlockHandle, Client, ClientError, Task};
use crate::ds::{DsError, File, Kv, KvConfig, Queue, QueueConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// `farpool soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Controller address.
    #[arg(long, default_value = "127.0.0.1:7070", env = "FARPOOL_CONTROLLER")]
    pub controller: String,
    /// Concurrent clients, each with its own control connection and task.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long to run the load, in seconds (setup and the final check come on top).
    #[arg(long, default_value_t = 600.0)]
    pub duration: f64,
    /// Processes whose resident memory is reported (repeat the flag for several).
    #[arg(long)]
    pub watch_pid: Vec<u32>,
    /// Seed of the operation mix (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Before starting, wait up to 60 s until this many memory nodes are alive.
    #[arg(long, default_value_t = 1)]
    pub wait_nodes: usize,
}

/// Why the soak could not run, or what it found.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// Nonsensical arguments.
    #[error("invalid soak settings: {0}")]
    Config(String),
    /// The pool never had enough live memory nodes.
    #[error("the controller at {addr} did not report {want} live memory nodes within 60 s ({got}); start memory nodes or check their logs")]
    NoNodes {
        /// The controller.
        addr: String,
        /// Nodes waited for.
        want: usize,
        /// What was seen last.
        got: String,
    },
    /// A client thread could not be started.
    #[error("cannot start a soak client thread: {0}; lower --clients or raise the thread limit")]
    Thread(#[source] std::io::Error),
    /// The run saw failed operations or lost data.
    #[error("the soak saw {errors} failed operations and {lost} lost items; the log above names the first ones")]
    Failed {
        /// Failed operations.
        errors: u64,
        /// Acknowledged data not read back.
        lost: u64,
    },
}

/// What a soak run measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SoakReport {
    /// Operations performed (each verified read counts as one).
    pub ops: u64,
    /// Operations that returned an error.
    pub errors: u64,
    /// Acknowledged writes that did not read back.
    pub lost: u64,
    /// Summed resident KiB of the watched processes after setup.
    pub rss_start_kib: u64,
    /// Summed resident KiB of the watched processes at the end.
    pub rss_end_kib: u64,
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ops={} errors={} lost={} rss_start_kib={} rss_end_kib={}",
            self.ops, self.errors, self.lost, self.rss_start_kib, self.rss_end_kib
        )
    }
}

/// Shared tallies.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    errors: AtomicU64,
    lost: AtomicU64,
}

/// How many failures are described on stderr (the rest are only counted).
const MAX_REPORTED: u64 = 20;

impl Tally {
    fn op(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, client: usize, what: &str, e: &dyn std::fmt::Display) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        if n < MAX_REPORTED {
            eprintln!("soak: client {client}: {what} failed: {e}");
        }
    }

    fn lost(&self, client: usize, what: &str) {
        let n = self.lost.fetch_add(1, Ordering::Relaxed);
        if n < MAX_REPORTED {
            eprintln!("soak: client {client}: LOST: {what}");
        }
    }
}

/// Summed `VmRSS` of `pids` in KiB (processes that are gone count 0).
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Waits until the controller at `addr` reports `want` live memory nodes.
fn wait_for_nodes(addr: &str, want: usize) -> Result<(), SoakError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = String::from("no answer yet");
    while Instant::now() < deadline {
        match Client::connect(addr).and_then(|c| c.status()) {
            Ok(st) => {
                let alive = st.nodes.iter().filter(|n| n.alive).count();
                if alive >= want {
                    return Ok(());
                }
                got = format!("{alive} alive");
            }
            Err(e) => got = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(SoakError::NoNodes {
        addr: addr.to_string(),
        want,
        got,
    })
}

/// Runs the soak and returns what it measured (whether or not it saw failures).
pub fn run(a: &SoakArgs) -> Result<SoakReport, SoakError> {
    if a.clients == 0 {
        return Err(SoakError::Config("--clients must be at least 1".into()));
    }
    let duration = Duration::try_from_secs_f64(a.duration).map_err(|_| {
        SoakError::Config("--duration must be a non-negative number of seconds".into())
    })?;
    wait_for_nodes(&a.controller, a.wait_nodes)?;
    let seed = a.seed.unwrap_or_else(rand::random);
    let tally = Arc::new(Tally::default());
    let ready = Arc::new(Barrier::new(a.clients + 1));
    let start = Arc::new(parking_lot::Mutex::new(None::<Instant>));
    let go = Arc::new(Barrier::new(a.clients + 1));
    let mut threads = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let (tally, ready, go, start) = (tally.clone(), ready.clone(), go.clone(), start.clone());
        let addr = a.controller.clone();
        let rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let t = std::thread::Builder::new()
            .name(format!("soak-{i}"))
            .spawn(move || {
                let worker = Worker::setup(i, &addr, rng, &tally);
                ready.wait();
                go.wait();
                let deadline = start.lock().unwrap_or_else(Instant::now) + duration;
                if let Some(mut w) = worker {
                    while Instant::now() < deadline {
                        w.step();
                    }
                    w.finish();
                }
            })
            .map_err(SoakError::Thread)?;
        threads.push(t);
    }
    ready.wait();
    let rss_start_kib = rss_kib(&a.watch_pid);
    *start.lock() = Some(Instant::now());
    go.wait();
    for t in threads {
        if t.join().is_err() {
            tally.error(usize::MAX, "client thread", &"panicked");
        }
    }
    let rss_end_kib = rss_kib(&a.watch_pid);
    Ok(SoakReport {
        ops: tally.ops.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        lost: tally.lost.load(Ordering::Relaxed),
        rss_start_kib,
        rss_end_kib,
    })
}

/// Keys per client's Kv.
const KEYS: u32 = 128;
/// File records per file before it is checked whole and replaced.
const FILE_RECORDS: usize = 200;
/// Items queued at most before the client only dequeues.
const QUEUE_DEPTH: u64 = 64;
/// Largest raw write.
const MAX_WRITE: usize = 4096;

/// One client's objects and its shadow of their contents.
struct Worker<'a> {
    id: usize,
    rng: StdRng,
    tally: &'a Tally,
    task: Task,
    /// Raw blocks and their expected bytes.
    blocks: Vec<(BlockHandle, Vec<u8>)>,
    kv: Kv,
    /// Expected values of present keys.
    kv_values: HashMap<u32, Vec<u8>>,
    /// Keys whose state an error left unknown.
    kv_unknown: HashSet<u32>,
    queue: Queue,
    /// Sequence numbers of the next item to enqueue and to dequeue.
    q_in: u64,
    q_out: u64,
    /// Whether an error left the queue's contents unknown.
    q_unknown: bool,
    file: Option<File>,
    file_gen: u64,
    /// Offsets and sequence numbers of records appended to `file`.
    records: Vec<(u64, u64)>,
    file_seq: u64,
}

fn queue_item(seq: u64) -> Vec<u8> {
    let mut v = seq.to_le_bytes().to_vec();
    v.extend((0..seq % 50).map(|i| (seq.wrapping_mul(31).wrapping_add(i)) as u8));
    v
}

fn file_record(seq: u64) -> Vec<u8> {
    let mut v = seq.to_le_bytes().to_vec();
    v.extend((seq ^ 0x5a5a_5a5a_5a5a_5a5a).to_le_bytes());
    v.extend((0..seq % 100).map(|i| (seq.wrapping_mul(17).wrapping_add(i)) as u8));
    v
}

impl<'a> Worker<'a> {
    fn setup(id: usize, addr: &str, rng: StdRng, tally: &'a Tally) -> Option<Worker<'a>> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            tally.error(id, what, e);
            None
        };
        let client = match Client::connect(addr) {
            Ok(c) => c,
            Err(e) => return fail("connect", &e),
        };
        let task = match client.task(&format!("/soak/c{id}")) {
            Ok(t) => t,
            Err(e) => return fail("open task", &e),
        };
        let kv = match Kv::create(&task, "kv", KvConfig::default()) {
            Ok(k) => k,
            Err(e) => return fail("create kv", &e),
        };
        let queue = match Queue::create(&task, "queue", QueueConfig { slot_size: 128 }) {
            Ok(q) => q,
            Err(e) => return fail("create queue", &e),
        };
        let mut w = Worker {
            id,
            rng,
            tally,
            task,
            blocks: Vec::new(),
            kv,
            kv_values: HashMap::new(),
            kv_unknown: HashSet::new(),
            queue,
            q_in: 0,
            q_out: 0,
            q_unknown: false,
            file: None,
            file_gen: 0,
            records: Vec::new(),
            file_seq: 0,
        };
        w.new_file();
        w.alloc_block();
        w.alloc_block();
        Some(w)
    }

    fn err(&self, what: &str, e: &dyn std::fmt::Display) {
        self.tally.error(self.id, what, e);
    }

    /// One random operation.
    fn step(&mut self) {
        let pick = self.rng.gen_range(0..100);
        match pick {
            0..=19 => self.block_write(),
            20..=34 => self.block_read(),
            35..=39 => self.block_cas(),
            40..=44 => self.block_faa(),
            45..=47 => self.realloc(),
            48..=59 => self.kv_put(),
            60..=69 => self.kv_get(),
            70..=71 => self.kv_remove(),
            72..=84 => self.queue_op(),
            _ => self.file_op(),
        }
    }

    // ---- raw blocks ----

    fn alloc_block(&mut self) {
        self.tally.op();
        match self.task.alloc(1) {
            Ok(mut got) => {
                for h in got.drain(..) {
                    let len = usize::try_from(h.len()).unwrap_or(0);
                    // A new owner sees zeroes, never the previous owner's bytes.
                    let mut buf = vec![0xffu8; len];
                    self.tally.op();
                    match h.read(0, &mut buf) {
                        Ok(()) => {
                            if buf.iter().any(|&b| b != 0) {
                                self.tally
                                    .lost(self.id, "a newly allocated block is not zeroed");
                            }
                        }
                        Err(e) => self.err("read new block", &e),
                    }
                    self.blocks.push((h, vec![0u8; len]));
                }
            }
            Err(e) => self.err("alloc", &e),
        }
    }

    /// Re-reads block `i` into its shadow after an error left it unknown; drops the
    /// block if that fails too.
    fn resync(&mut self, i: usize) {
        let (h, shadow) = &mut self.blocks[i];
        if h.read(0, shadow).is_err() {
            self.blocks.swap_remove(i);
        }
    }

    fn pick_block(&mut self) -> Option<usize> {
        if self.blocks.is_empty() {
            self.alloc_block();
        }
        if self.blocks.is_empty() {
            return None;
        }
        Some(self.rng.gen_range(0..self.blocks.len()))
    }

    fn block_write(&mut self) {
        let Some(i) = self.pick_block() else { return };
        let len = self.blocks[i].1.len();
        let n = self.rng.gen_range(1..=MAX_WRITE.min(len));
        let off = self.rng.gen_range(0..=len - n);
        let data: Vec<u8> = (0..n).map(|_| self.rng.gen()).collect();
        self.tally.op();
        match self.blocks[i].0.write(off as u64, &data) {
            Ok(()) => self.blocks[i].1[off..off + n].copy_from_slice(&data),
            Err(e) => {
                self.err("block write", &e);
                self.resync(i);
            }
        }
    }

    fn block_read(&mut self) {
        let Some(i) = self.pick_block() else { return };
        let len = self.blocks[i].1.len();
        let n = self.rng.gen_range(1..=MAX_WRITE.min(len));
        let off = self.rng.gen_range(0..=len - n);
        let mut buf = vec![0u8; n];
        self.tally.op();
        match self.blocks[i].0.read(off as u64, &mut buf) {
            Ok(()) => {
                if buf[..] != self.blocks[i].1[off..off + n] {
                    self.tally.lost(
                        self.id,
                        &format!(
                            "block {:?} bytes {off}..{} differ from what was written",
                            self.blocks[i].0.id(),
                            off + n
                        ),
                    );
                    self.resync(i);
                }
            }
            Err(e) => self.err("block read", &e),
        }
    }

    fn word(&mut self, i: usize) -> (u64, u64) {
        let words = self.blocks[i].1.len() / 8;
        let off = self.rng.gen_range(0..words) * 8;
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.blocks[i].1[off..off + 8]);
        (off as u64, u64::from_le_bytes(w))
    }

    fn set_word(&mut self, i: usize, off: u64, v: u64) {
        let off = off as usize;
        self.blocks[i].1[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn block_cas(&mut self) {
        let Some(i) = self.pick_block() else { return };
        let (off, cur) = self.word(i);
        // Half the time a CAS that must fail (wrong expected value).
        let expected = if self.rng.gen() {
            cur
        } else {
            cur.wrapping_add(1)
        };
        let new: u64 = self.rng.gen();
        self.tally.op();
        match self.blocks[i].0.cas(off, expected, new) {
            Ok(old) => {
                if old != cur {
                    self.tally
                        .lost(self.id, &format!("CAS saw {old:#x}, {cur:#x} was written"));
                    self.set_word(i, off, old);
                }
                if old == expected {
                    self.set_word(i, off, new);
                }
            }
            Err(e) => {
                self.err("cas", &e);
                self.resync(i);
            }
        }
    }

    fn block_faa(&mut self) {
        let Some(i) = self.pick_block() else { return };
        let (off, cur) = self.word(i);
        let add = self.rng.gen_range(1..1000u64);
        self.tally.op();
        match self.blocks[i].0.faa(off, add) {
            Ok(old) => {
                if old != cur {
                    self.tally
                        .lost(self.id, &format!("FAA saw {old:#x}, {cur:#x} was written"));
                }
                self.set_word(i, off, old.wrapping_add(add));
            }
            Err(e) => {
                self.err("faa", &e);
                self.resync(i);
            }
        }
    }

    /// Checks a block whole against its shadow.
    fn verify_block(&mut self, i: usize) {
        let (h, shadow) = &self.blocks[i];
        let mut buf = vec![0u8; shadow.len()];
        self.tally.op();
        match h.read(0, &mut buf) {
            Ok(()) => {
                if &buf != shadow {
                    self.tally.lost(
                        self.id,
                        &format!("block {:?} differs from what was written", h.id()),
                    );
                }
            }
            Err(e) => self.err("block read", &e),
        }
    }

    /// Frees a random block (checked whole first) or allocates one, keeping 1 to 4.
    fn realloc(&mut self) {
        if self.blocks.len() < 4 && (self.blocks.len() <= 1 || self.rng.gen()) {
            self.alloc_block();
            return;
        }
        let i = self.rng.gen_range(0..self.blocks.len());
        self.verify_block(i);
        let (h, _) = self.blocks.swap_remove(i);
        self.tally.op();
        if let Err(e) = self.task.free(vec![h]) {
            self.err("free", &e);
        }
    }

    // ---- kv ----

    fn kv_put(&mut self) {
        let k = self.rng.gen_range(0..KEYS);
        let key = format!("key-{k}");
        let len = self.rng.gen_range(1..48);
        let value: Vec<u8> = (0..len).map(|_| self.rng.gen()).collect();
        self.tally.op();
        match self.kv.upsert(key.as_bytes(), &value) {
            Ok(()) => {
                self.kv_unknown.remove(&k);
                self.kv_values.insert(k, value);
            }
            Err(e) => {
                self.err("kv upsert", &e);
                self.kv_values.remove(&k);
                self.kv_unknown.insert(k);
            }
        }
    }

    fn kv_check(&mut self, k: u32) {
        if self.kv_unknown.contains(&k) {
            return;
        }
        let key = format!("key-{k}");
        self.tally.op();
        match self.kv.get(key.as_bytes()) {
            Ok(got) => {
                if got.as_ref() != self.kv_values.get(&k) {
                    self.tally.lost(
                        self.id,
                        &format!(
                            "kv {key}: got {:?}, expected {:?}",
                            got.as_ref().map(Vec::len),
                            self.kv_values.get(&k).map(Vec::len)
                        ),
                    );
                    self.kv_unknown.insert(k);
                }
            }
            Err(e) => self.err("kv get", &e),
        }
    }

    fn kv_get(&mut self) {
        let k = self.rng.gen_range(0..KEYS);
        self.kv_check(k);
    }

    fn kv_remove(&mut self) {
        let k = self.rng.gen_range(0..KEYS);
        let key = format!("key-{k}");
        self.tally.op();
        match self.kv.remove(key.as_bytes()) {
            Ok(existed) => {
                let expected = self.kv_values.remove(&k).is_some();
                if !self.kv_unknown.remove(&k) && existed != expected {
                    self.tally.lost(
                        self.id,
                        &format!("kv remove {key}: existed {existed}, expected {expected}"),
                    );
                }
            }
            Err(e) => {
                self.err("kv remove", &e);
                self.kv_values.remove(&k);
                self.kv_unknown.insert(k);
            }
        }
    }

    // ---- queue ----

    fn dequeue_one(&mut self) {
        self.tally.op();
        match self.queue.dequeue() {
            Ok(got) => {
                if self.q_unknown {
                    if got.is_none() {
                        // Drained: known again.
                        self.q_unknown = false;
                        self.q_out = self.q_in;
                    }
                    return;
                }
                let want = (self.q_out < self.q_in).then(|| queue_item(self.q_out));
                if got != want {
                    self.tally.lost(
                        self.id,
                        &format!(
                            "queue: dequeued {:?}, expected item {}",
                            got.as_ref().and_then(|v| v.get(..8)),
                            self.q_out
                        ),
                    );
                    self.q_unknown = true;
                } else if want.is_some() {
                    self.q_out += 1;
                }
            }
            Err(e) => {
                self.err("dequeue", &e);
                self.q_unknown = true;
            }
        }
    }

    fn queue_op(&mut self) {
        let depth = self.q_in - self.q_out;
        if depth < QUEUE_DEPTH && self.rng.gen_bool(0.55) {
            let item = queue_item(self.q_in);
            self.tally.op();
            match self.queue.enqueue(&item) {
                Ok(()) => self.q_in += 1,
                Err(e) => {
                    self.err("enqueue", &e);
                    self.q_unknown = true;
                }
            }
        } else {
            self.dequeue_one();
        }
    }

    // ---- file ----

    fn new_file(&mut self) {
        self.file_gen += 1;
        self.records.clear();
        self.tally.op();
        match File::create(&self.task, &format!("file{}", self.file_gen)) {
            Ok(f) => self.file = Some(f),
            Err(e) => {
                self.err("create file", &e);
                self.file = None;
            }
        }
    }

    fn check_record(&self, f: &File, off: u64, seq: u64) -> Result<bool, DsError> {
        let want = file_record(seq);
        let mut buf = vec![0u8; want.len()];
        let n = f.read_at(off, &mut buf)?;
        Ok(n == want.len() && buf == want)
    }

    /// Checks every record of the file, destroys it and starts the next one.
    fn rotate_file(&mut self) {
        if let Some(f) = self.file.take() {
            self.tally.op();
            match f.read_all() {
                Ok(all) => {
                    for &(off, seq) in &self.records {
                        let want = file_record(seq);
                        let got = usize::try_from(off)
                            .ok()
                            .and_then(|o| all.get(o..o + want.len()));
                        if got != Some(&want[..]) {
                            self.tally
                                .lost(self.id, &format!("file record {seq} at {off} differs"));
                        }
                    }
                }
                Err(e) => self.err("read file", &e),
            }
            self.tally.op();
            if let Err(e) = f.destroy() {
                self.err("destroy file", &e);
            }
        }
        self.new_file();
    }

    fn file_op(&mut self) {
        if self.file.is_none() || self.records.len() >= FILE_RECORDS {
            self.rotate_file();
        }
        let Some(f) = self.file.as_ref() else { return };
        if self.records.is_empty() || self.rng.gen_bool(0.6) {
            let seq = self.file_seq;
            self.file_seq += 1;
            self.tally.op();
            match f.append(&file_record(seq)) {
                Ok(off) => self.records.push((off, seq)),
                Err(e) => self.err("file append", &e),
            }
        } else {
            let (off, seq) = self.records[self.rng.gen_range(0..self.records.len())];
            self.tally.op();
            match self.check_record(f, off, seq) {
                Ok(true) => {}
                Ok(false) => self
                    .tally
                    .lost(self.id, &format!("file record {seq} at {off} differs")),
                Err(e) => self.err("file read", &e),
            }
        }
    }

    /// Checks everything once more, then frees it all.
    fn finish(mut self) {
        for i in 0..self.blocks.len() {
            self.verify_block(i);
        }
        for k in 0..KEYS {
            self.kv_check(k);
        }
        while !self.q_unknown && self.q_out < self.q_in {
            self.dequeue_one();
        }
        self.rotate_file();
        let result: Result<(), ClientError> = self.task.close();
        if let Err(e) = result {
            self.tally.error(self.id, "close task", &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_line_has_the_agreed_shape() {
        let r = SoakReport {
            ops: 5,
            errors: 0,
            lost: 1,
            rss_start_kib: 10,
            rss_end_kib: 11,
        };
        assert_eq!(
            r.to_string(),
            "ops=5 errors=0 lost=1 rss_start_kib=10 rss_end_kib=11"
        );
        assert!(rss_kib(&[std::process::id()]) > 0);
        assert_eq!(rss_kib(&[999_999_999]), 0);
    }

    #[test]
    fn soak_against_an_embedded_pool_finds_nothing_wrong() {
        let pool = crate::EmbeddedPool::start(crate::EmbeddedConfig::default()).unwrap();
        let args = SoakArgs {
            controller: pool.addr().to_string(),
            clients: 3,
            duration: 0.5,
            watch_pid: vec![std::process::id()],
            seed: Some(7),
            wait_nodes: 2,
        };
        let r = run(&args).unwrap();
        assert_eq!((r.errors, r.lost), (0, 0), "{r}");
        assert!(r.ops > 100, "{r}");
        assert!(r.rss_start_kib > 0);
    }
}
