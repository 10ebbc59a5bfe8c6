//! Breakable bucket locks: a LOCKED word carries its holder's stamp (acquisition time
//! and a random nonce), a lock whose stamp is older than the table's lock timeout is
//! taken over, and the new holder repairs what the old one may have left half-written.
//!
//! Lock word: the state in the lowest byte ([`UNLOCKED`] 0, [`LOCKED`] 1, [`FROZEN`] 2;
//! states differ in that byte only, so a torn READ still shows a state); a LOCKED word
//! holds `ms << 24 | nonce << 8 | 1`, `ms` the holder's wall clock in milliseconds
//! modulo 2^40 (forced odd, so never 0) and `nonce` 16 random bits. Unlock is
//! `CAS(lock, my_word, 0)`.
//!
//! Holder discipline (fencing without storage support): a holder checks, before each
//! WRITE other clients can see (the slots and checksum, an in-place record rewrite),
//! that less than half the lock timeout has passed since it acquired the lock (its own
//! monotonic clock). A taker waits for the full timeout by its own wall clock. So with
//! clocks that differ by less than half the timeout, minus the time a WRITE can stay in
//! flight, no write of an old holder lands after a takeover. See
//! `docs/DATA_STRUCTURES.md` ("Bucket locks") for the argument.

use super::bucket::{self, BODY_BYTES, BUCKET_BYTES, FROZEN, LOCKED, SLOTS, SLOTS_AT, UNLOCKED};
use super::record::{decode, record_len, Decoded, REC_HEADER};
use super::{fingerprint, hash, slot_place, Kv, HEAP};
use crate::client::BlockHandle;
use crate::ds::DsError;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default lock timeout of a table (also for tables created before it was stored).
pub(super) const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// Smallest and largest lock timeouts a table accepts, in ms.
pub(super) const LOCK_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 2..=3_600_000;
/// Bits of the stamp's millisecond clock (wraps every 34 years).
const MS_BITS: u32 = 40;
const MS_MASK: u64 = (1 << MS_BITS) - 1;

/// The wall clock in milliseconds since the Unix epoch (0 before it).
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The LOCKED word stamped with `now_ms` and `nonce`.
pub(super) fn lock_word(now_ms: u64, nonce: u64) -> u64 {
    let ms = (now_ms & MS_MASK) | 1;
    ms << 24 | (nonce & 0xFFFF) << 8 | LOCKED
}

/// Whether `word` is a LOCKED word whose stamp is at least `timeout_ms` old at
/// `now_ms`. A stamp in the future (another clock ahead of ours) is not expired; a
/// LOCKED word without a stamp (written by a client before stamps) always is.
pub(super) fn expired(word: u64, now_ms: u64, timeout_ms: u64) -> bool {
    if bucket::state(word) != LOCKED {
        return false;
    }
    let ms = word >> 24;
    if ms == 0 {
        return true;
    }
    let age = (now_ms & MS_MASK).wrapping_sub(ms) & MS_MASK;
    age < 1 << (MS_BITS - 1) && age >= timeout_ms
}

/// A bucket lock as acquired (or attempted): the word written and when.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    /// The LOCKED word this holder wrote.
    pub word: u64,
    /// When (taken before the stamp, so the holder's age is never underestimated).
    pub since: Instant,
}

impl Held {
    /// A fresh, unique lock word for one acquisition attempt.
    pub fn new() -> Held {
        let since = Instant::now();
        Held {
            word: lock_word(now_ms(), rand::random()),
            since,
        }
    }

    /// Whether the holder may still WRITE (less than half of `timeout_ms` held).
    pub fn fresh(&self, timeout_ms: u64) -> bool {
        self.since.elapsed() < Duration::from_millis(timeout_ms / 2)
    }
}

/// A lock taken by [`Kv::lock`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Grab {
    /// Our lock.
    pub held: Held,
    /// Taken over from an expired holder: the bucket must be repaired first.
    pub took_over: bool,
}

/// What one [`Kv`] handle did with bucket locks (see [`Kv::lock_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvLockStats {
    /// Bucket locks taken over from a holder whose stamp was older than the table's
    /// lock timeout (a writer that died or stalled inside the bucket).
    pub takeovers: u64,
    /// Buckets rewritten after a takeover because their slots and checksum were torn
    /// or a slot pointed at a damaged record.
    pub repairs: u64,
    /// Slots such repairs dropped (a torn slot word, or a record torn by a dead
    /// holder's in-place rewrite: that key is lost).
    pub dropped: u64,
    /// Operations abandoned and retried because this handle had held the bucket for
    /// half the lock timeout before a WRITE (it stalled; nothing was written).
    pub expired: u64,
    /// Unlocks that found the lock taken over (the operation's WRITEs had completed
    /// before half the timeout, so it stands).
    pub overtaken: u64,
}

/// Counters behind [`KvLockStats`].
#[derive(Debug, Default)]
pub(super) struct LockCounters {
    takeovers: AtomicU64,
    repairs: AtomicU64,
    dropped: AtomicU64,
    expired: AtomicU64,
    overtaken: AtomicU64,
}

impl LockCounters {
    fn snapshot(&self) -> KvLockStats {
        KvLockStats {
            takeovers: self.takeovers.load(Ordering::Relaxed),
            repairs: self.repairs.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            overtaken: self.overtaken.load(Ordering::Relaxed),
        }
    }
}

/// A repaired bucket body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Repair {
    /// The slots to keep (dropped ones zeroed).
    pub slots: [u64; SLOTS],
    /// Indexes of the slots dropped.
    pub dropped: Vec<usize>,
    /// Whether the body must be rewritten (torn, or slots dropped).
    pub write: bool,
}

/// Plans the repair of a bucket body taken over from an expired holder.
///
/// `slots` are the slot words as read (maybe torn, when `body_ok` is false),
/// `records[i]` the bytes slot `i` points at (`None` when outside the record heap) and
/// `mine(h)` whether keys of hash `h` belong to this bucket. A slot is kept when its
/// bytes decode as a record (checksum valid) whose key belongs here, whose fingerprint
/// and length match the slot word, and whose key no earlier kept slot holds.
pub(super) fn plan_repair(
    body_ok: bool,
    slots: &[u64; SLOTS],
    records: &[Option<Vec<u8>>],
    mine: impl Fn(u64) -> bool,
) -> Repair {
    let mut out = [0u64; SLOTS];
    let mut dropped = Vec::new();
    let mut keys: HashSet<Vec<u8>> = HashSet::new();
    for (i, &s) in slots.iter().enumerate() {
        if s == 0 {
            continue;
        }
        let (_, len) = slot_place(s);
        let keep = match records.get(i).and_then(Option::as_ref).map(|b| decode(b)) {
            Some(Decoded::Record(r)) => {
                let h = hash(&r.key);
                fingerprint(h) == (s >> 48) & 0x7FFF
                    && (record_len(&r) as u64).next_multiple_of(8) == len
                    && mine(h)
                    && keys.insert(r.key)
            }
            _ => false,
        };
        if keep {
            out[i] = s;
        } else {
            dropped.push(i);
        }
    }
    Repair {
        write: !body_ok || !dropped.is_empty(),
        slots: out,
        dropped,
    }
}

/// Fuzzing entry for the repair planner: `data` is a bucket (128 bytes, at offset 64
/// of its partition) followed by the partition's record bytes from offset 192. Any bytes
/// must plan without panicking; the plan keeps a subset of the slots, each key at most
/// once, and planning the repaired body again changes nothing.
#[doc(hidden)]
pub fn fuzz_repair(data: &[u8]) {
    fuzz_plan(data);
}

/// [`fuzz_repair`]'s work: the slots as read and the checked plan, if `data` holds a
/// bucket.
fn fuzz_plan(data: &[u8]) -> Option<([u64; SLOTS], Repair)> {
    let (raw, _) = data.split_first_chunk::<{ BUCKET_BYTES as usize }>()?;
    let at = 64u64;
    let heap_start = at + BUCKET_BYTES;
    let slots = bucket::raw_slots(raw);
    let read = |s: &[u64; SLOTS]| -> Vec<Option<Vec<u8>>> {
        s.iter()
            .map(|&w| {
                let (off, len) = slot_place(w);
                let start = usize::try_from(off.checked_sub(heap_start)?).ok()?;
                let end = start.checked_add(usize::try_from(len).ok()?)?;
                let from = BUCKET_BYTES as usize;
                (w != 0 && len >= REC_HEADER as u64)
                    .then(|| data.get(from + start..from + end).map(<[u8]>::to_vec))
                    .flatten()
            })
            .collect()
    };
    let body_ok = bucket::decode(at, raw).is_some();
    let plan = plan_repair(body_ok, &slots, &read(&slots), |_| true);
    for (i, &s) in plan.slots.iter().enumerate() {
        assert!(s == 0 || s == slots[i]);
        assert_eq!(s == 0 && slots[i] != 0, plan.dropped.contains(&i));
    }
    let again = plan_repair(true, &plan.slots, &read(&plan.slots), |_| true);
    assert_eq!(again.slots, plan.slots);
    assert!(!again.write);
    Some((slots, plan))
}

impl Kv {
    /// Lock statistics of this handle: takeovers of expired bucket locks, repairs,
    /// dropped slots, abandoned and overtaken critical sections.
    pub fn lock_stats(&self) -> KvLockStats {
        self.locks.snapshot()
    }

    /// The table's bucket lock timeout (fixed at creation; [`super::KvConfig`]).
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(self.lock_timeout_ms)
    }

    /// The lock of bucket `b` after an attempt's first round trip, whose
    /// `CAS(lock, UNLOCKED, mine)` found `seen`: ours when it was free, `None` when the
    /// bucket is frozen, otherwise waited for (and taken over once expired) by
    /// [`Kv::lock`].
    pub(super) fn grab_after(
        &self,
        seen: Result<u64, farpool_rdma::OpError>,
        mine: Held,
        part: &BlockHandle,
        b: u64,
    ) -> Result<Option<Grab>, DsError> {
        match seen {
            Ok(UNLOCKED) => Ok(Some(Grab {
                held: mine,
                took_over: false,
            })),
            Ok(FROZEN) => Ok(None),
            _ => self.lock(part, b),
        }
    }

    /// Takes bucket `b`'s writer lock, taking it over from a holder whose stamp is
    /// older than the lock timeout; `None` when the bucket is frozen.
    pub(super) fn lock(&self, part: &BlockHandle, b: u64) -> Result<Option<Grab>, DsError> {
        let deadline = Instant::now() + super::REPARTITION_WAIT + self.lock_timeout();
        let mut spins = 0u32;
        loop {
            let held = Held::new();
            let seen = part.cas(b, UNLOCKED, held.word)?;
            if seen == UNLOCKED {
                return Ok(Some(Grab {
                    held,
                    took_over: false,
                }));
            }
            if seen == FROZEN {
                return Ok(None);
            }
            if expired(seen, now_ms(), self.lock_timeout_ms) {
                if let Some(held) = self.take_over(part, b, seen)? {
                    return Ok(Some(Grab {
                        held,
                        took_over: true,
                    }));
                }
                continue;
            }
            if Instant::now() > deadline {
                return Err(self.corrupt(format!(
                    "bucket at offset {b} stayed locked for longer than the lock timeout ({} ms) plus 10 s, and its holder's stamp ({seen:#x}) is not older than the timeout by this client's clock; check that the clients' clocks are in sync (NTP)",
                    self.lock_timeout_ms
                )));
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// `CAS(lock, seen, ours)` on an expired lock word; our lock when it succeeded.
    pub(super) fn take_over(
        &self,
        part: &BlockHandle,
        b: u64,
        seen: u64,
    ) -> Result<Option<Held>, DsError> {
        let held = Held::new();
        if part.cas(b, seen, held.word)? != seen {
            return Ok(None);
        }
        self.locks.takeovers.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            path = %self.obj.path(),
            block = %part.id(),
            bucket = b,
            stamp = format_args!("{seen:#x}"),
            timeout_ms = self.lock_timeout_ms,
            "took over an expired Kv bucket lock (its holder died or stalled)"
        );
        Ok(Some(held))
    }

    /// Releases bucket `b`'s lock `held` and, in the same round trip, adds `delta` to
    /// the partition's key count (both after the slot update completed). Returns the
    /// count before the addition (0 without a delta). A lock taken over meanwhile is
    /// counted ([`KvLockStats::overtaken`]): our WRITEs completed while we held it.
    pub(super) fn unlock(
        &self,
        part: &BlockHandle,
        b: u64,
        held: &Held,
        delta: Option<u64>,
    ) -> Result<u64, DsError> {
        let (seen, count) = match delta {
            None => (part.cas(b, held.word, UNLOCKED)?, 0),
            Some(d) => {
                let mut ops = [
                    part.cas_op(b, held.word, UNLOCKED)?,
                    part.faa_op(super::COUNT, d)?,
                ];
                part.execute(&mut ops)?;
                (ops[0].result, ops[1].result)
            }
        };
        if seen != held.word {
            self.overtaken(b, seen);
        }
        Ok(count)
    }

    /// Counts (and logs) an unlock that found the lock no longer ours.
    pub(super) fn overtaken(&self, b: u64, seen: u64) {
        self.locks.overtaken.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            path = %self.obj.path(),
            bucket = b,
            now = format_args!("{seen:#x}"),
            "a Kv bucket lock was taken over before its holder released it"
        );
    }

    /// Counts an operation abandoned because its lock is too old to WRITE under.
    pub(super) fn expired_hold(&self) {
        self.locks.expired.fetch_add(1, Ordering::Relaxed);
    }

    /// Releases a lock whose critical section was abandoned (nothing written).
    pub(super) fn abandon(&self, part: &BlockHandle, b: u64, held: &Held) -> Result<(), DsError> {
        self.unlock(part, b, held, None).map(|_| ())
    }

    /// For a reader whose READ of bucket `b` (`raw`) failed its checksum: when the
    /// bucket's lock has expired (its holder died mid-WRITE), take it over, repair the
    /// bucket and release it.
    pub(super) fn repair_abandoned(
        &self,
        part: &BlockHandle,
        b: u64,
        raw: &[u8; BUCKET_BYTES as usize],
    ) -> Result<(), DsError> {
        let mut w = [0u8; 8];
        w.copy_from_slice(&raw[..8]);
        let seen = u64::from_le_bytes(w);
        if !expired(seen, now_ms(), self.lock_timeout_ms) {
            return Ok(());
        }
        // A torn READ of the lock word fails the CAS: nothing happens.
        if let Some(held) = self.take_over(part, b, seen)? {
            if self.repair(part, b, &held)? {
                self.abandon(part, b, &held)?;
            }
        }
        Ok(())
    }

    /// After a takeover of bucket `b`: makes its slots and checksum consistent again
    /// (see [`plan_repair`]). `false` when the bucket needs a repair but our lock got
    /// too old to WRITE: nothing is written and the lock is handed on (set to the
    /// stampless LOCKED word, which the next client takes over at once and repairs), so
    /// it is no longer ours and the caller must not unlock it.
    pub(super) fn repair(&self, part: &BlockHandle, b: u64, held: &Held) -> Result<bool, DsError> {
        let mut raw = [0u8; BUCKET_BYTES as usize];
        let heap_end = {
            let mut ops = [part.read_op(b, &mut raw)?, part.faa_op(HEAP, 0)?];
            part.execute(&mut ops)?;
            ops[1].result.clamp(self.heap_start, part.len())
        };
        let slots = bucket::raw_slots(&raw);
        let body_ok = bucket::decode(b, &raw).is_some();
        let mut records: Vec<Option<Vec<u8>>> = vec![None; SLOTS];
        let mut places = Vec::new();
        for (i, &s) in slots.iter().enumerate() {
            let (off, len) = slot_place(s);
            if s != 0
                && off >= self.heap_start
                && len >= REC_HEADER as u64
                && off.saturating_add(len) <= heap_end
            {
                places.push((i, off));
                records[i] = Some(vec![0u8; len as usize]);
            }
        }
        {
            let mut ops = Vec::with_capacity(places.len());
            let mut bufs: Vec<(&(usize, u64), &mut Vec<u8>)> =
                places.iter().zip(records.iter_mut().flatten()).collect();
            for (p, buf) in bufs.iter_mut() {
                ops.push(part.read_op(p.1, buf)?);
            }
            if !ops.is_empty() {
                part.execute(&mut ops)?;
            }
        }
        let plan = plan_repair(body_ok, &slots, &records, |h| self.bucket_off(h) == b);
        if !plan.write {
            return Ok(true);
        }
        if !held.fresh(self.lock_timeout_ms) {
            self.expired_hold();
            // Never unlock a torn bucket: a writer taking it from UNLOCKED would find it
            // failing its checksum under its lock.
            part.cas(b, held.word, LOCKED)?;
            return Ok(false);
        }
        let body: [u8; BODY_BYTES] = bucket::encode_body(b, &plan.slots);
        part.write(b + SLOTS_AT, &body)?;
        self.locks.repairs.fetch_add(1, Ordering::Relaxed);
        self.locks
            .dropped
            .fetch_add(plan.dropped.len() as u64, Ordering::Relaxed);
        tracing::warn!(
            path = %self.obj.path(),
            block = %part.id(),
            bucket = b,
            torn_body = !body_ok,
            dropped_slots = ?plan.dropped,
            "repaired a Kv bucket left half-written by a lock holder that died"
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{encode, Value};
    use super::super::slot_word;
    use super::*;

    #[test]
    fn stamps_expire_after_the_timeout_only() {
        let now = 1_800_000_000_123;
        let w = lock_word(now, 0xBEEF);
        assert_eq!(bucket::state(w), LOCKED);
        assert_ne!(w, LOCKED);
        assert!(!expired(w, now, 2000));
        assert!(!expired(w, now + 1998, 2000));
        assert!(expired(w, now + 2001, 2000));
        // A stamp ahead of our clock (skew) is not expired; nor are other states.
        assert!(!expired(w, now - 5000, 2000));
        assert!(!expired(UNLOCKED, now, 2000));
        assert!(!expired(FROZEN, now, 2000));
        // A stampless LOCKED word (an older client) is.
        assert!(expired(LOCKED, now, 2000));
        // Wrapping of the 40-bit clock.
        let w = lock_word(MS_MASK - 1, 1);
        assert!(expired(w, MS_MASK + 3000, 2000));
        assert!(!expired(w, MS_MASK + 100, 2000));
        // Distinct nonces give distinct words at the same time.
        assert_ne!(lock_word(now, 1), lock_word(now, 2));
    }

    /// A body half-overwritten at byte granularity is rebuilt: slots whose record is
    /// valid, belongs to the bucket and matches the slot word are kept, others dropped.
    #[test]
    fn a_torn_body_is_repaired() {
        let b = 64u64;
        let heap_start = 192u64;
        let mut heap: Vec<u8> = Vec::new();
        let mut place = |key: &[u8], val: &[u8]| -> u64 {
            let rec = encode(key, &Value::Inline(val.to_vec())).unwrap();
            let off = heap_start + heap.len() as u64;
            let need = (rec.len() as u64).next_multiple_of(8);
            heap.extend_from_slice(&rec);
            heap.resize(heap.len() + (need as usize - rec.len()), 0);
            slot_word(off, need, hash(key))
        };
        let a = place(b"alpha", b"1");
        let c = place(b"gamma", b"3");
        let c2 = place(b"gamma", b"33");
        let d = place(b"delta", b"4");
        let mut old = [0u64; SLOTS];
        old[0] = a;
        old[2] = c;
        let mut new = old;
        new[2] = c2;
        new[5] = d;
        let read = |s: &[u64; SLOTS]| -> Vec<Option<Vec<u8>>> {
            s.iter()
                .map(|&w| {
                    let (off, len) = slot_place(w);
                    let start = off.checked_sub(heap_start)? as usize;
                    (w != 0)
                        .then(|| heap.get(start..start + len as usize).map(<[u8]>::to_vec))
                        .flatten()
                })
                .collect()
        };
        // Whole bodies: nothing to do.
        for s in [&old, &new] {
            let plan = plan_repair(true, s, &read(s), |_| true);
            assert!(!plan.write);
            assert_eq!(&plan.slots, s);
        }
        let ob = bucket::encode_body(b, &old);
        let nb = bucket::encode_body(b, &new);
        for cut in 0..BODY_BYTES {
            let mut torn = ob;
            torn[cut..].copy_from_slice(&nb[cut..]);
            let mut raw = [0u8; BUCKET_BYTES as usize];
            raw[8..].copy_from_slice(&torn);
            let slots = bucket::raw_slots(&raw);
            let ok = bucket::decode(b, &raw).is_some();
            let plan = plan_repair(ok, &slots, &read(&slots), |_| true);
            // Every kept slot is an old or new one; alpha always survives; gamma is
            // there once (old or new value); no key twice.
            for (i, &s) in plan.slots.iter().enumerate() {
                assert!(s == 0 || s == old[i] || s == new[i], "cut {cut} slot {i}");
            }
            assert_eq!(plan.slots[0], a, "cut {cut}");
            assert!(plan.slots[2] == c || plan.slots[2] == c2, "cut {cut}");
            let again = plan_repair(true, &plan.slots, &read(&plan.slots), |_| true);
            assert!(!again.write, "cut {cut}");
            if !ok {
                assert!(plan.write);
            }
        }
        // A key that does not belong to the bucket, a duplicate key, a slot outside
        // the heap and a torn record are dropped.
        let mut bad = old;
        bad[3] = a; // alpha twice
        bad[4] = slot_word(heap_start + 4096, 32, hash(b"zeta"));
        bad[6] = d;
        let mut recs = read(&bad);
        if let Some(Some(r)) = recs.get_mut(2) {
            r[20] ^= 0xFF; // gamma's record torn by an in-place rewrite
        }
        let not_delta = |h: u64| h != hash(b"delta");
        let plan = plan_repair(true, &bad, &recs, not_delta);
        assert_eq!(plan.dropped, vec![2, 3, 4, 6]);
        assert_eq!(plan.slots[0], a);
        assert!(plan.write);
    }

    /// Fuzz seeds: a bucket at offset 64 with three records, whole and torn.
    fn seeds() -> Vec<Vec<u8>> {
        let heap_start = 64 + BUCKET_BYTES;
        let mut heap = Vec::new();
        let mut slots = [0u64; SLOTS];
        for (i, k) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
            let rec = encode(k, &Value::Inline(vec![i as u8; 9])).unwrap();
            let need = (rec.len() as u64).next_multiple_of(8);
            slots[2 * i] = slot_word(heap_start + heap.len() as u64, need, hash(k));
            heap.extend_from_slice(&rec);
            heap.resize(heap.len() + (need as usize - rec.len()), 0);
        }
        let whole = {
            let mut d = vec![0u8; 8];
            d.extend_from_slice(&bucket::encode_body(64, &slots));
            d.extend_from_slice(&heap);
            d
        };
        let mut torn = whole.clone();
        torn[8 + 8 * 2 + 3] ^= 0x5A; // a slot word cut by a torn body WRITE
        torn[BUCKET_BYTES as usize + 20] ^= 0x01; // a record cut by an in-place rewrite
        vec![whole, torn]
    }

    /// The committed fuzz seed corpus for the repair planner is current.
    /// `FARPOOL_WRITE_CORPUS=1 cargo test -p farpool kv::lock` regenerates it.
    #[test]
    fn repair_seed_corpus_is_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/kv_repair");
        for (n, seed) in seeds().iter().enumerate() {
            fuzz_repair(seed);
            let path = dir.join(format!("seed{n}"));
            if std::env::var_os("FARPOOL_WRITE_CORPUS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, seed).unwrap();
            }
            assert_eq!(&std::fs::read(&path).unwrap(), seed, "{}", path.display());
        }
        // The whole seed needs no repair; the torn one drops the cut slot and the
        // slot of the cut record.
        let (_, whole) = fuzz_plan(&seeds()[0]).unwrap();
        assert!(!whole.write && whole.dropped.is_empty());
        let (_, torn) = fuzz_plan(&seeds()[1]).unwrap();
        assert!(torn.write);
        assert_eq!(torn.dropped, vec![0, 2]);
    }

    #[test]
    fn fuzz_entry_accepts_anything() {
        fuzz_repair(&[]);
        fuzz_repair(&[0xAB; 300]);
        let mut data = vec![0u8; 128];
        data[8..].copy_from_slice(&bucket::encode_body(64, &[0; SLOTS]));
        fuzz_repair(&data);
    }
}
