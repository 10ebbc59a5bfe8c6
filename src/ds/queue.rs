//! `Queue`: a multi-producer multi-consumer FIFO over linear segments of slots.

use super::notify::{EventKind, Publisher};
use super::object::{Entry, Object};
use super::{is_stale, DsError};
use crate::client::{BlockHandle, Client, ClientError, Task};
use crate::proto::PoolPath;
use parking_lot::Mutex;
use siphasher::sip::SipHasher13;
use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"FPQUEUE1");
// Meta words.
const SLOT_SIZE: u64 = 8;
const SLOTS: u64 = 16;
const HEAD_HINT: u64 = 24;
const TAIL_HINT: u64 = 32;
// Segment words.
const ENQ: u64 = 0;
const DEQ: u64 = 8;
const DONE: u64 = 16;
const SEG_HEADER: u64 = 64;
// Slot layout: state word, then `len: u32`, 4 zero bytes, checksum, payload.
const SLOT_HEADER: u64 = 24;
const EMPTY: u64 = 0;
const READY: u64 = 1;
const POISONED: u64 = 2;
/// How long a consumer waits for the record of a published slot to land.
const READY_WAIT: Duration = Duration::from_secs(5);
/// Smallest slot: header plus 8 payload bytes.
const MIN_SLOT: u64 = SLOT_HEADER + 8;

/// Settings of a new queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Bytes per slot, including a 24-byte header: items up to `slot_size - 24` bytes
    /// fit. A multiple of 8, at least 32. Segments hold `(block size - 64) / slot_size`
    /// slots.
    pub slot_size: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { slot_size: 256 }
    }
}

/// A FIFO queue in the pool, shared by every client that opens it (any number of
/// producers and consumers, in any processes).
///
/// Every enqueued item is dequeued exactly once; items of one producer (one thread
/// enqueueing one after the other) are dequeued in the order it enqueued them. The
/// queue grows by linking a segment (one block) when the last one is full and shrinks
/// by freeing each segment once all its items were consumed.
///
/// A `Queue` handle may be shared by threads (`&self` methods); it caches where the
/// head and tail are.
pub struct Queue {
    obj: Object,
    slot_size: u64,
    slots: u64,
    segs: Mutex<HashMap<u64, BlockHandle>>,
    head: AtomicU64,
    tail: AtomicU64,
    poll: Duration,
    /// One more than the highest segment number this handle found linked.
    seen_segments: AtomicU64,
    /// Segments this handle freed.
    freed_segments: AtomicU64,
    /// Publishes enqueues and dequeues to listeners.
    notify: Publisher,
}

/// How far a queue grew and shrank, as seen by one [`Queue`] handle (see
/// [`Queue::segments`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSegments {
    /// Segments `0..linked` were linked (by any client) when this handle last used the
    /// newest of them: take the maximum over handles.
    pub linked: u64,
    /// Segments this handle freed after their last item was taken: sum over handles.
    pub freed: u64,
}

/// What a segment number refers to.
enum Seg {
    /// Not linked yet.
    Empty,
    /// Freed: move on.
    Freed,
    /// Live.
    Live(BlockHandle),
}

impl Queue {
    /// Creates the queue `name` under the task's path (or opens it if it exists).
    pub fn create(task: &Task, name: &str, config: QueueConfig) -> Result<Queue, DsError> {
        Self::create_at(task.client(), task.path().join(name)?.as_str(), config)
    }

    /// Creates the queue at the absolute `path` (or opens it if it exists; then the
    /// existing queue's configuration applies).
    pub fn create_at(client: &Client, path: &str, config: QueueConfig) -> Result<Queue, DsError> {
        let path = PoolPath::parse(path)?;
        let s = config.slot_size;
        if s < MIN_SLOT || s % 8 != 0 {
            return Err(DsError::Config(format!(
                "queue slot size {s} must be a multiple of 8 and at least {MIN_SLOT}"
            )));
        }
        let obj = Object::create(client, path, "queue", MAGIC, "s", |len| {
            let slots = len.saturating_sub(SEG_HEADER) / s;
            if slots < 2 {
                return Err(DsError::Config(format!(
                    "queue slot size {s} leaves fewer than 2 slots in a block of {len} bytes; use smaller slots"
                )));
            }
            Ok(vec![(SLOT_SIZE, s), (SLOTS, slots)])
        })?;
        Self::from_object(obj)
    }

    /// Opens the queue at `path`.
    pub fn open(client: &Client, path: &str) -> Result<Queue, DsError> {
        let path = PoolPath::parse(path)?;
        let obj = Object::open(client, path, "queue", MAGIC, "s")?;
        Self::from_object(obj)
    }

    fn from_object(obj: Object) -> Result<Queue, DsError> {
        let slot_size = obj.word(SLOT_SIZE)?;
        let slots = obj.word(SLOTS)?;
        let fits = slot_size >= MIN_SLOT
            && slot_size % 8 == 0
            && slots >= 2
            && slots
                .checked_mul(slot_size)
                .and_then(|b| b.checked_add(SEG_HEADER))
                .is_some_and(|b| b <= obj.block_len());
        if !fits {
            return Err(DsError::Corrupt {
                path: obj.path().clone(),
                what: format!(
                    "{slots} slots of {slot_size} bytes in blocks of {} bytes",
                    obj.block_len()
                ),
            });
        }
        let head = obj.word(HEAD_HINT)?;
        let tail = obj.word(TAIL_HINT)?.max(head);
        Ok(Queue {
            notify: Publisher::new(&obj, obj.client()),
            obj,
            slot_size,
            slots,
            segs: Mutex::new(HashMap::new()),
            head: AtomicU64::new(head),
            tail: AtomicU64::new(tail),
            poll: Duration::from_millis(2),
            seen_segments: AtomicU64::new(0),
            freed_segments: AtomicU64::new(0),
        })
    }

    /// How many segments were linked (up to the newest this handle used) and how many
    /// this handle freed: the queue's growth and shrinkage, for monitoring and tests.
    pub fn segments(&self) -> QueueSegments {
        QueueSegments {
            linked: self.seen_segments.load(Ordering::Relaxed),
            freed: self.freed_segments.load(Ordering::Relaxed),
        }
    }

    /// The queue's path.
    pub fn path(&self) -> &PoolPath {
        self.obj.path()
    }

    /// Largest item in bytes.
    pub fn max_item(&self) -> usize {
        (self.slot_size - SLOT_HEADER) as usize
    }

    /// Slots per segment.
    pub fn segment_slots(&self) -> u64 {
        self.slots
    }

    /// How long a consumer waits for a slow producer (one that took a slot's ticket but
    /// has not published it yet) before poisoning the slot, which makes the producer
    /// retry in another slot. Default 2 ms. Shorter waits poison more often (costing
    /// producers retries); no item is lost either way. Applies to this handle only.
    pub fn set_poll_wait(&mut self, wait: Duration) {
        self.poll = wait;
    }

    /// Appends `item` at the tail.
    pub fn enqueue(&self, item: &[u8]) -> Result<(), DsError> {
        self.enqueue_one(item)?;
        self.notify.publish(EventKind::Enqueue, item)
    }

    /// How often this handle re-reads whether anyone listens to the queue (default
    /// [`super::DEFAULT_REFRESH`]); listeners must be configured with at least the
    /// longest interval of any writer ([`super::ListenerConfig::writer_refresh`]).
    pub fn set_notify_refresh(&self, refresh: Duration) {
        self.notify.set_refresh(refresh);
    }

    fn enqueue_one(&self, item: &[u8]) -> Result<(), DsError> {
        if item.len() > self.max_item() {
            return Err(DsError::ItemTooLarge {
                len: item.len(),
                max: self.max_item(),
            });
        }
        let mut k = self.tail.load(Ordering::Relaxed);
        loop {
            let seg = match self.segment(k, true)? {
                Seg::Live(h) => h,
                Seg::Freed | Seg::Empty => {
                    k += 1;
                    continue;
                }
            };
            match self.try_enqueue(&seg, k, item) {
                Ok(Some(true)) => {
                    self.tail.fetch_max(k, Ordering::Relaxed);
                    return Ok(());
                }
                // Our slot was poisoned: take another ticket in the same segment.
                Ok(Some(false)) => {}
                // The segment is full.
                Ok(None) => k += 1,
                Err(e) if is_stale(&e) => {
                    // Freed: every slot of it was resolved, ours included (poisoned).
                    self.forget(k);
                    k += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One attempt in segment `k`: `None` when it is full, `Some(false)` when the slot
    /// was poisoned, `Some(true)` when the item is in. Two round trips: take a ticket;
    /// write the record and publish it together. The publish may land before the
    /// record (operations of a batch are unordered), so a consumer that finds a slot
    /// ready but its checksum wrong reads it again until the record lands.
    fn try_enqueue(
        &self,
        seg: &BlockHandle,
        k: u64,
        item: &[u8],
    ) -> Result<Option<bool>, ClientError> {
        let i = seg.faa(ENQ, 1)?;
        if i >= self.slots {
            return Ok(None);
        }
        let off = self.slot_off(i);
        let mut rec = Vec::with_capacity(16 + item.len());
        rec.extend_from_slice(&(item.len() as u32).to_le_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&checksum(k, i, item).to_le_bytes());
        rec.extend_from_slice(item);
        let mut ops = [seg.write_op(off + 8, &rec)?, seg.cas_op(off, EMPTY, READY)?];
        seg.execute(&mut ops)?;
        Ok(Some(ops[1].result == EMPTY))
    }

    /// Appends `items` in order (as consecutive [`Queue::enqueue`] calls: the items of
    /// one call keep their order, and so do the calls of one producer).
    pub fn enqueue_many<T: AsRef<[u8]>>(&self, items: &[T]) -> Result<(), DsError> {
        if let Some(big) = items.iter().find(|i| i.as_ref().len() > self.max_item()) {
            return Err(DsError::ItemTooLarge {
                len: big.as_ref().len(),
                max: self.max_item(),
            });
        }
        for item in items {
            self.enqueue(item.as_ref())?;
        }
        Ok(())
    }

    /// Removes and returns up to `max` items from the head, in queue order: one
    /// fetch-and-add takes a run of slots and one batch reads them. Fewer (or none)
    /// when the queue holds fewer.
    pub fn dequeue_many(&self, max: usize) -> Result<Vec<Vec<u8>>, DsError> {
        let mut out = Vec::new();
        let mut k = self.head.load(Ordering::Relaxed);
        while out.len() < max {
            let seg = match self.segment(k, false)? {
                Seg::Empty => break,
                Seg::Freed => {
                    k += 1;
                    self.head.fetch_max(k, Ordering::Relaxed);
                    continue;
                }
                Seg::Live(h) => h,
            };
            match self.try_dequeue_run(&seg, k, max - out.len(), &mut out) {
                Ok(Step::Empty) => break,
                Ok(Step::Next) => {
                    k += 1;
                    self.head.fetch_max(k, Ordering::Relaxed);
                }
                Ok(Step::Retry | Step::Item(_)) => {}
                Err(DsError::Client(e)) if is_stale(&e) => {
                    self.forget(k);
                    k += 1;
                    self.head.fetch_max(k, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        for item in &out {
            self.notify.publish(EventKind::Dequeue, item)?;
        }
        Ok(out)
    }

    /// Reads the segment's enqueue and dequeue counters in one round trip (FAA of 0).
    /// `Err(step)` when there is nothing to take here: the segment is used up
    /// ([`Step::Next`]) or has no item yet ([`Step::Empty`]).
    fn counters(&self, seg: &BlockHandle) -> Result<Result<(u64, u64), Step>, DsError> {
        let mut ops = [seg.faa_op(ENQ, 0)?, seg.faa_op(DEQ, 0)?];
        seg.execute(&mut ops)?;
        let (enq, deq) = (ops[0].result, ops[1].result);
        if deq >= self.slots {
            return Ok(Err(Step::Next));
        }
        if deq >= enq {
            return Ok(Err(Step::Empty));
        }
        Ok(Ok((enq, deq)))
    }

    /// Takes a run of up to `want` tickets in segment `k` and appends their items.
    fn try_dequeue_run(
        &self,
        seg: &BlockHandle,
        k: u64,
        want: usize,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<Step, DsError> {
        let (enq, deq) = match self.counters(seg)? {
            Ok(c) => c,
            Err(step) => return Ok(step),
        };
        let m = (want as u64).min(enq.min(self.slots) - deq).clamp(1, 64);
        // Take the tickets and, in the same round trip, read the slots they name if no
        // other consumer takes tickets meanwhile (tickets start at `deq` then).
        let rec = (self.slot_size - 8) as usize;
        let guess: Vec<u64> = (deq..(deq + m).min(self.slots)).collect();
        let mut bufs = vec![0u8; rec * guess.len()];
        let mut states = vec![EMPTY; guess.len()];
        let first = {
            let mut batch = Vec::with_capacity(1 + 2 * guess.len());
            batch.push(seg.faa_op(DEQ, m)?);
            for (&i, buf) in guess.iter().zip(bufs.chunks_mut(rec)) {
                batch.push(seg.faa_op(self.slot_off(i), 0)?);
                batch.push(seg.read_op(self.slot_off(i) + 8, buf)?);
            }
            seg.execute(&mut batch)?;
            for (j, st) in states.iter_mut().enumerate() {
                *st = batch[1 + 2 * j].result;
            }
            batch[0].result
        };
        let tickets: Vec<u64> = (first..first + m).filter(|&i| i < self.slots).collect();
        if tickets.is_empty() {
            return Ok(Step::Next);
        }
        if first != deq {
            // Raced another consumer: read the slots our tickets name.
            let mut batch = Vec::with_capacity(2 * tickets.len());
            bufs = vec![0u8; rec * tickets.len()];
            states = vec![EMPTY; tickets.len()];
            for (&i, buf) in tickets.iter().zip(bufs.chunks_mut(rec)) {
                batch.push(seg.faa_op(self.slot_off(i), 0)?);
                batch.push(seg.read_op(self.slot_off(i) + 8, buf)?);
            }
            seg.execute(&mut batch)?;
            for (j, st) in states.iter_mut().enumerate() {
                *st = batch[2 * j].result;
            }
        }
        for (j, &i) in tickets.iter().enumerate() {
            let fast = (states[j] == READY)
                .then(|| self.decode(k, i, &bufs[j * rec..(j + 1) * rec]))
                .flatten();
            match fast {
                Some(item) => out.push(item),
                None => {
                    if let Some(item) = self.resolve(seg, k, i)? {
                        out.push(item);
                    }
                }
            }
        }
        let n = tickets.len() as u64;
        let done = seg.faa(DONE, n)?;
        if done + n == self.slots {
            self.forget(k);
            self.obj.retire(k, seg.id())?;
            self.freed_segments.fetch_add(1, Ordering::Relaxed);
            self.obj.raise(HEAD_HINT, k + 1)?;
        }
        Ok(Step::Retry)
    }

    /// Copies of every published item not yet taken, head first, without removing
    /// any (for snapshots to the persistent tier). Under concurrent producers and
    /// consumers, items published or taken during the call may or may not be in it.
    pub fn items(&self) -> Result<Vec<Vec<u8>>, DsError> {
        let mut out = Vec::new();
        let mut k = self.obj.word(HEAD_HINT)?;
        loop {
            let seg = match self.segment(k, false)? {
                Seg::Empty => return Ok(out),
                Seg::Freed => {
                    k += 1;
                    continue;
                }
                Seg::Live(h) => h,
            };
            match self.segment_items(&seg, k, &mut out) {
                Ok(true) => k += 1,
                Ok(false) => return Ok(out),
                Err(DsError::Client(e)) if is_stale(&e) => {
                    // Drained and freed meanwhile: its items were all taken.
                    self.forget(k);
                    k += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends segment `k`'s untaken published items to `out`; `true` when later
    /// segments may hold more.
    fn segment_items(
        &self,
        seg: &BlockHandle,
        k: u64,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<bool, DsError> {
        let mut ops = [seg.faa_op(ENQ, 0)?, seg.faa_op(DEQ, 0)?];
        seg.execute(&mut ops)?;
        let (enq, deq) = (ops[0].result, ops[1].result);
        let rec = (self.slot_size - 8) as usize;
        let slots: Vec<u64> = (deq.min(self.slots)..enq.min(self.slots)).collect();
        let mut bufs = vec![0u8; rec * slots.len()];
        let mut states = vec![EMPTY; slots.len()];
        for (run, bufs) in slots.chunks(64).zip(bufs.chunks_mut(64 * rec)) {
            let mut batch = Vec::with_capacity(2 * run.len());
            for (&i, buf) in run.iter().zip(bufs.chunks_mut(rec)) {
                batch.push(seg.faa_op(self.slot_off(i), 0)?);
                batch.push(seg.read_op(self.slot_off(i) + 8, buf)?);
            }
            seg.execute(&mut batch)?;
            let base = (run[0] - slots[0]) as usize;
            for j in 0..run.len() {
                states[base + j] = batch[2 * j].result;
            }
        }
        for (j, &i) in slots.iter().enumerate() {
            if states[j] != READY {
                continue; // being published (not acknowledged yet), or poisoned
            }
            let buf = &mut bufs[j * rec..(j + 1) * rec];
            match self.decode(k, i, buf) {
                Some(item) => out.push(item),
                None => out.push(self.read_ready(seg, k, i, buf)?),
            }
        }
        Ok(enq >= self.slots)
    }

    /// A copy of the item at the head without removing it (`None` when empty). Under
    /// concurrent consumers it may be gone by the time it is returned.
    pub fn front(&self) -> Result<Option<Vec<u8>>, DsError> {
        let mut k = self.head.load(Ordering::Relaxed);
        loop {
            let seg = match self.segment(k, false)? {
                Seg::Empty => return Ok(None),
                Seg::Freed => {
                    k += 1;
                    continue;
                }
                Seg::Live(h) => h,
            };
            match self.peek(&seg, k) {
                Ok(Step::Item(item)) => return Ok(Some(item)),
                Ok(Step::Empty) => return Ok(None),
                Ok(Step::Next | Step::Retry) => k += 1,
                Err(DsError::Client(e)) if is_stale(&e) => k += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The first published, untaken item of segment `k` (`Next`: look further on).
    fn peek(&self, seg: &BlockHandle, k: u64) -> Result<Step, DsError> {
        let mut ops = [seg.faa_op(ENQ, 0)?, seg.faa_op(DEQ, 0)?];
        seg.execute(&mut ops)?;
        let (enq, deq) = (ops[0].result, ops[1].result);
        let mut buf = vec![0u8; (self.slot_size - 8) as usize];
        for i in deq..enq.min(self.slots) {
            let off = self.slot_off(i);
            let deadline = Instant::now() + self.poll;
            loop {
                match seg.faa(off, 0)? {
                    READY => return self.read_ready(seg, k, i, &mut buf).map(Step::Item),
                    // A producer is publishing: wait for it a little, as a consumer would.
                    EMPTY if Instant::now() < deadline => std::thread::yield_now(),
                    // Poisoned, or a slow producer a consumer will poison: skip.
                    _ => break,
                }
            }
        }
        if enq >= self.slots {
            // Everything else is in later segments.
            return Ok(Step::Next);
        }
        Ok(Step::Empty)
    }

    /// The item of slot `i` of segment `k`, known to be published: READs until its
    /// record has landed (bounded by [`READY_WAIT`]; a record that never validates is
    /// reported as damaged, never skipped).
    fn read_ready(
        &self,
        seg: &BlockHandle,
        k: u64,
        i: u64,
        buf: &mut [u8],
    ) -> Result<Vec<u8>, DsError> {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            seg.read(self.slot_off(i) + 8, buf)?;
            if let Some(item) = self.decode(k, i, buf) {
                return Ok(item);
            }
            if Instant::now() > deadline {
                return Err(self.corrupt_slot(k, i));
            }
            std::thread::yield_now();
        }
    }

    fn corrupt_slot(&self, k: u64, i: u64) -> DsError {
        DsError::Corrupt {
            path: self.obj.path().clone(),
            what: format!(
                "slot {i} of segment {k} is published but its record has failed its checksum for {} s",
                READY_WAIT.as_secs()
            ),
        }
    }

    /// Items in the queue: published or being published, not yet taken. Exact when
    /// no one enqueues or dequeues meanwhile; a snapshot otherwise.
    pub fn len(&self) -> Result<u64, DsError> {
        let mut total = 0u64;
        let mut k = self.obj.word(HEAD_HINT)?;
        while k < self.obj.entries() {
            match self.segment(k, false)? {
                Seg::Empty => break,
                Seg::Freed => {}
                Seg::Live(seg) => {
                    let mut ops = [seg.faa_op(ENQ, 0)?, seg.faa_op(DEQ, 0)?];
                    match seg.execute(&mut ops) {
                        Ok(()) => {
                            let n = self.slots;
                            total += ops[0].result.min(n).saturating_sub(ops[1].result.min(n));
                        }
                        Err(e) if is_stale(&e) => self.forget(k),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            k += 1;
        }
        Ok(total)
    }

    /// Whether [`Queue::len`] is 0.
    pub fn is_empty(&self) -> Result<bool, DsError> {
        Ok(self.len()? == 0)
    }

    /// Removes and returns the item at the head, or `None` when the queue is empty.
    /// Three round trips when uncontended: the counters; the ticket with a speculative
    /// read of the slot it most likely names; the count of resolved slots.
    pub fn dequeue(&self) -> Result<Option<Vec<u8>>, DsError> {
        Ok(self.dequeue_many(1)?.pop())
    }

    /// Takes slot `i` of segment `k`: the item, or `None` after poisoning it.
    fn resolve(&self, seg: &BlockHandle, k: u64, i: u64) -> Result<Option<Vec<u8>>, DsError> {
        let off = self.slot_off(i);
        let mut buf = vec![0u8; (self.slot_size - 8) as usize];
        let deadline = Instant::now() + self.poll;
        loop {
            // Speculative: the READ may run before or after the state read.
            let state = {
                let mut ops = [seg.faa_op(off, 0)?, seg.read_op(off + 8, &mut buf)?];
                seg.execute(&mut ops)?;
                ops[0].result
            };
            match state {
                READY => {
                    if let Some(item) = self.decode(k, i, &buf) {
                        return Ok(Some(item));
                    }
                    // Published, but the READ ran before the producer's WRITE landed
                    // (they share a round trip, unordered): it lands shortly.
                    return self.read_ready(seg, k, i, &mut buf).map(Some);
                }
                EMPTY if Instant::now() < deadline => std::thread::yield_now(),
                EMPTY => {
                    // The producer holding this ticket is slow or gone: poison the slot
                    // (it will retry elsewhere) unless it publishes first.
                    if seg.cas(off, EMPTY, POISONED)? == EMPTY {
                        return Ok(None);
                    }
                }
                other => {
                    return Err(DsError::Corrupt {
                        path: self.obj.path().clone(),
                        what: format!("slot {i} of segment {k} has state {other}"),
                    })
                }
            }
        }
    }

    /// The item in a slot record, if the record is complete.
    fn decode(&self, k: u64, i: u64, rec: &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(rec.get(0..4)?.try_into().ok()?) as usize;
        let sum = u64::from_le_bytes(rec.get(8..16)?.try_into().ok()?);
        let item = rec.get(16..16 + len)?;
        (checksum(k, i, item) == sum).then(|| item.to_vec())
    }

    fn slot_off(&self, i: u64) -> u64 {
        SEG_HEADER + i * self.slot_size
    }

    /// Segment `k`: cached, or looked up in the directory (linked when `link`).
    fn segment(&self, k: u64, link: bool) -> Result<Seg, DsError> {
        if let Some(h) = self.segs.lock().get(&k) {
            return Ok(Seg::Live(h.clone()));
        }
        let handle = match self.obj.entry(k)? {
            Entry::Freed => return Ok(Seg::Freed),
            Entry::Empty if !link => return Ok(Seg::Empty),
            Entry::Empty => {
                let h = self.obj.link(k)?;
                if h.is_some() {
                    self.obj.raise(TAIL_HINT, k)?;
                }
                h
            }
            Entry::Linked(id) => self.obj.child_handle(k, id)?,
        };
        Ok(match handle {
            Some(h) => {
                self.seen_segments.fetch_max(k + 1, Ordering::Relaxed);
                let mut segs = self.segs.lock();
                // Drop handles of segments behind both ends.
                let low = self
                    .head
                    .load(Ordering::Relaxed)
                    .min(self.tail.load(Ordering::Relaxed));
                segs.retain(|&s, _| s >= low);
                segs.insert(k, h.clone());
                Seg::Live(h)
            }
            None => Seg::Freed,
        })
    }

    fn forget(&self, k: u64) {
        self.segs.lock().remove(&k);
    }

    /// Removes the queue and frees its blocks. Other clients' handles stop working.
    pub fn destroy(self) -> Result<(), DsError> {
        self.obj.destroy()
    }
}

/// Outcome of one dequeue attempt in a segment.
enum Step {
    Item(Vec<u8>),
    Empty,
    Retry,
    Next,
}

/// Checksum of an item in slot `i` of segment `k`; never 0, so a zeroed slot never
/// validates, and position-keyed, so a record never validates elsewhere.
fn checksum(k: u64, i: u64, item: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(k ^ 0x6661_7270_6f6f_6c71, i);
    h.write_u64(item.len() as u64);
    h.write(item);
    h.finish().max(1)
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("path", self.obj.path())
            .field("slot_size", &self.slot_size)
            .field("slots", &self.slots)
            .finish()
    }
}
