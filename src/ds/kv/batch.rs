//! Batched operations of [`Kv`]: many keys per round trip.

use super::bucket::{self, BUCKET_BYTES, FROZEN, LOCKED, SLOTS, SLOTS_AT, UNLOCKED};
use super::lock::{self, Held};
use super::record::{decode, encode, Decoded, Value, REC_HEADER};
use super::repart::FaultPoint;
use super::{hash, slot_place, slot_word, Kv, Location, COUNT, HEAP};
use crate::client::BlockHandle;
use crate::ds::notify::EventKind;
use crate::ds::DsError;
use farpool_rdma::Op;

/// One key of a batched get, as far as the batch got with it.
struct Probe {
    /// Index of the key in the caller's slice.
    at: usize,
    h: u64,
    /// The partition (child index) the key was routed to.
    child: u64,
    part: BlockHandle,
    /// Bucket offset.
    b: u64,
}

impl Kv {
    /// The values of `keys`, in order. Keys whose location this handle caches are read
    /// first, bucket and record together, in one round trip per memory node; the rest
    /// (and cached ones that did not validate) take two round trips per memory node for
    /// the whole batch (every key's bucket, then every matching record) instead of two
    /// per key; keys whose partition is moving, whose record is being rewritten, or
    /// whose value lives in a block of its own are then looked up one by one with
    /// [`Kv::get`].
    /// Each value is linearizable on its own, as with `get`; the batch is not atomic.
    pub fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Vec<u8>>>, DsError> {
        let mut out: Vec<Option<Option<Vec<u8>>>> = vec![None; keys.len()];
        let hashes: Vec<u64> = keys.iter().map(|k| hash(k.as_ref())).collect();
        // Round trip 0: bucket and record of every key whose location is cached.
        self.cached_many(keys, &hashes, &mut out)?;
        let mut probes = Vec::with_capacity(keys.len());
        for (at, &h) in hashes.iter().enumerate() {
            if out[at].is_some() {
                continue;
            }
            let route = self.route(h)?;
            if let Some(part) = self.partition(route.child)? {
                let b = self.bucket_off(h);
                let child = route.child;
                probes.push(Probe {
                    at,
                    h,
                    child,
                    part,
                    b,
                });
            }
        }
        probes.sort_by_key(|p| p.part.transport_key());
        // Round trip 1: every bucket.
        let mut ok = vec![false; probes.len()];
        let mut raws = vec![[0u8; BUCKET_BYTES as usize]; probes.len()];
        {
            let handles: Vec<&BlockHandle> = probes.iter().map(|p| &p.part).collect();
            let mut ops = Vec::with_capacity(probes.len());
            for (p, raw) in probes.iter().zip(raws.iter_mut()) {
                ops.push(p.part.read_op(p.b, raw)?);
            }
            for (start, end, result) in BlockHandle::execute_many(&handles, &mut ops)? {
                if result.is_ok() {
                    ok[start..end].iter_mut().for_each(|o| *o = true);
                }
            }
        }
        // Round trip 2: the records whose fingerprint matches.
        let mut reads: Vec<(usize, u64, Vec<u8>)> = Vec::new(); // (probe, slot word, buf)
        for (j, p) in probes.iter().enumerate() {
            if !ok[j] {
                continue;
            }
            // Frozen (moving) or torn (being rewritten) buckets: one by one below.
            let Some(bk) = bucket::decode(p.b, &raws[j]).filter(|bk| bk.lock != FROZEN) else {
                continue;
            };
            let cands = self.candidates(&p.part, p.h, &bk.slots);
            if cands.is_empty() {
                out[p.at] = Some(None);
            }
            for (slot, _, len) in cands {
                reads.push((j, bk.slots[slot], vec![0u8; len as usize]));
            }
        }
        if !reads.is_empty() {
            let handles: Vec<&BlockHandle> = reads.iter().map(|r| &probes[r.0].part).collect();
            let mut ops = Vec::with_capacity(reads.len());
            for (r, h) in reads.iter_mut().zip(&handles) {
                ops.push(h.read_op(slot_place(r.1).0, &mut r.2)?);
            }
            let mut done = vec![false; ops.len()];
            for (start, end, result) in BlockHandle::execute_many(&handles, &mut ops)? {
                if result.is_ok() {
                    done[start..end].iter_mut().for_each(|d| *d = true);
                }
            }
            drop(ops);
            // Per probe: the key's record, a torn candidate (retry alone), or absent.
            let mut verdict: Vec<Option<Verdict>> = (0..probes.len()).map(|_| None).collect();
            for ((j, word, buf), fine) in reads.into_iter().zip(done) {
                let key = keys[probes[j].at].as_ref();
                let v = verdict[j].get_or_insert(Verdict::Absent);
                if matches!(v, Verdict::Found(_)) {
                    continue;
                }
                if !fine {
                    *v = Verdict::Alone;
                    continue;
                }
                match decode(&buf) {
                    Decoded::Record(r) if r.key == key => {
                        let p = &probes[j];
                        let (child, bucket) = (p.child, p.b);
                        let loc = Location {
                            child,
                            bucket,
                            word,
                        };
                        self.cache.insert(p.h, loc);
                        *v = Verdict::Found(r.value)
                    }
                    Decoded::Record(_) => {}
                    Decoded::Bad => *v = Verdict::Alone,
                }
            }
            for (j, v) in verdict.into_iter().enumerate() {
                match v {
                    Some(Verdict::Found(Value::Inline(bytes))) => {
                        out[probes[j].at] = Some(Some(bytes))
                    }
                    Some(Verdict::Absent) => out[probes[j].at] = Some(None),
                    // Remote values, torn records: one by one.
                    Some(Verdict::Found(Value::Remote { .. }) | Verdict::Alone) | None => {}
                }
            }
        }
        keys.iter()
            .zip(out)
            .map(|(k, v)| match v {
                Some(v) => Ok(v),
                None => self.get(k.as_ref()),
            })
            .collect()
    }
}

/// What the batch learned about one key.
enum Verdict {
    Found(Value),
    Absent,
    /// Look it up on its own.
    Alone,
}

/// One key of a pipelined upsert being written this round.
struct Pending {
    /// Index of the pair in the caller's slice.
    at: usize,
    h: u64,
    child: u64,
    part: BlockHandle,
    /// Bucket offset.
    b: u64,
    /// The encoded record.
    rec: Vec<u8>,
    /// The bucket's slots, read under its lock.
    slots: [u64; SLOTS],
    /// Where the record goes, whether it rewrites the key's record in place, and
    /// whether it inserts a key.
    spot: Option<(u64, bool, bool)>,
}

/// Runs `ops` (built with `handles`) in one round trip per memory node; the outcome of
/// each op (`None`: it did not complete).
fn run(handles: &[&BlockHandle], ops: &mut [Op<'_>]) -> Result<Vec<Option<u64>>, DsError> {
    BlockHandle::execute_many(handles, ops)?;
    Ok(ops.iter().map(|o| o.outcome().ok()).collect())
}

impl Kv {
    /// Upserts every pair. Pipelined across keys in different buckets: each round locks
    /// one bucket per pending key (keys sharing a bucket go in later rounds, in order,
    /// so the last pair of a key wins) with one batch of CASes, then reads the buckets,
    /// the candidate records, writes the records, then the slots, then unlocks: about
    /// six round trips per memory node for the whole round instead of four per key.
    /// A bucket held by another writer is retried next round (after this round's locks
    /// are released, so batches never wait while holding locks and cannot deadlock);
    /// keys whose partition is moving or full, or whose value needs a block of its own,
    /// go through [`Kv::upsert`] one by one. Each write is linearizable on its own, as
    /// with `upsert`; the batch is not atomic, and pairs of different keys take effect
    /// in no particular order.
    pub fn upsert_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        pairs: &[(K, V)],
    ) -> Result<(), DsError> {
        let inline_max = self.inline_max();
        let mut alone = Vec::new();
        // Per key, in order: the pairs still to write.
        let mut queue: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
        if pairs
            .iter()
            .any(|(k, v)| REC_HEADER + k.as_ref().len() + v.as_ref().len() > inline_max)
        {
            // Values in blocks of their own: one by one, in order.
            return pairs
                .iter()
                .try_for_each(|(k, v)| self.upsert(k.as_ref(), v.as_ref()));
        }
        queue.extend(0..pairs.len());
        // Keys some pair of which goes one by one: their later pairs follow it there,
        // so the last pair of a key still wins.
        let mut alone_keys: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        let mut splits = Vec::new();
        // Bounded in time, not rounds: a bucket held by a writer that died stays
        // locked until its stamp expires (then it is taken over one by one).
        let patience = super::REPARTITION_WAIT + self.lock_timeout();
        let mut progress = std::time::Instant::now();
        while !queue.is_empty() {
            if progress.elapsed() > patience {
                return Err(self.corrupt(format!(
                    "a pipelined upsert made no progress for {patience:?}: its buckets stayed locked without their stamps expiring; check that the clients' clocks are in sync (NTP)"
                )));
            }
            // One key per bucket this round; the rest wait, in order.
            let mut taken = std::collections::HashSet::new();
            let mut round = Vec::new();
            let mut later = std::collections::VecDeque::new();
            for at in queue.drain(..) {
                let (k, v) = (pairs[at].0.as_ref(), pairs[at].1.as_ref());
                if alone_keys.contains(k) {
                    alone.push(at);
                    continue;
                }
                let h = hash(k);
                let route = self.route(h)?;
                let Some(part) = self.partition(route.child)? else {
                    alone_keys.insert(k);
                    alone.push(at);
                    continue;
                };
                let b = self.bucket_off(h);
                if !taken.insert((route.child, b)) {
                    later.push_back(at);
                    continue;
                }
                round.push(Pending {
                    at,
                    h,
                    child: route.child,
                    part,
                    b,
                    rec: encode(k, &Value::Inline(v.to_vec()))?,
                    slots: [0; SLOTS],
                    spot: None,
                });
            }
            round.sort_by_key(|p| p.part.transport_key());
            let (done, retry, moved) = self.upsert_round(pairs, &mut round, &mut splits)?;
            if done.is_empty() && moved.is_empty() {
                std::thread::yield_now(); // every bucket was held by other writers
            } else {
                progress = std::time::Instant::now();
            }
            // Keys that lost their bucket to another writer go first next round.
            let mut next: std::collections::VecDeque<usize> = retry.into();
            next.extend(later);
            queue = next;
            for at in moved {
                alone_keys.insert(pairs[at].0.as_ref());
                alone.push(at);
            }
        }
        alone.sort_unstable();
        for at in alone {
            self.upsert(pairs[at].0.as_ref(), pairs[at].1.as_ref())?;
        }
        for route in splits {
            self.split(route)?;
        }
        Ok(())
    }

    /// One pipelined round; returns the pairs written, those to retry (bucket held by
    /// another writer) and those to write one by one (partition moving or full).
    #[allow(clippy::type_complexity)]
    fn upsert_round<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        pairs: &[(K, V)],
        round: &mut Vec<Pending>,
        splits: &mut Vec<super::Route>,
    ) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>), DsError> {
        let (mut retry, mut moved) = (Vec::new(), Vec::new());
        // 1. Lock every bucket (one stamped word for the round: each bucket's lock
        // word is still unique to this acquisition).
        let mine = Held::new();
        let locked = {
            let handles: Vec<&BlockHandle> = round.iter().map(|p| &p.part).collect();
            let mut ops = round
                .iter()
                .map(|p| p.part.cas_op(p.b, UNLOCKED, mine.word))
                .collect::<Result<Vec<_>, _>>()?;
            run(&handles, &mut ops)?
        };
        let now = lock::now_ms();
        let mut held = Vec::with_capacity(round.len());
        for (p, got) in round.drain(..).zip(locked) {
            match got {
                Some(UNLOCKED) => held.push(p),
                // Held by a writer that died or stalled: one by one, which takes the
                // lock over and repairs the bucket.
                Some(w) if lock::expired(w, now, self.lock_timeout_ms) => moved.push(p.at),
                // Held by another writer: next round.
                Some(w) if bucket::state(w) == LOCKED => retry.push(p.at),
                // Moving, or gone (a stale map): one by one, which reloads the map.
                _ => moved.push(p.at),
            }
        }
        let result = self.upsert_locked(pairs, &mut held, &mine);
        if let Err(DsError::FaultInjected(at)) = result {
            return Err(DsError::FaultInjected(at)); // as a crashed client: no unlock
        }
        let completed = matches!(result, Ok(true));
        // 6. Unlock every bucket held, adding inserted keys to the partition counts.
        let unlocked = {
            let handles: Vec<&BlockHandle> = held.iter().flat_map(|p| [&p.part, &p.part]).collect();
            let mut ops = Vec::with_capacity(2 * held.len());
            for p in &held {
                let inserted = matches!(p.spot, Some((_, _, true))) && completed;
                ops.push(p.part.cas_op(p.b, mine.word, UNLOCKED)?);
                ops.push(p.part.faa_op(COUNT, u64::from(inserted))?);
            }
            run(&handles, &mut ops)?
        };
        result?;
        if !completed {
            // We stalled holding the locks: nothing visible was written; all again.
            retry.extend(held.iter().map(|p| p.at));
            for (p, pair) in held.iter().zip(unlocked.chunks(2)) {
                if let Some(w) = pair[0].filter(|&w| w != mine.word) {
                    self.overtaken(p.b, w);
                }
            }
            return Ok((Vec::new(), retry, moved));
        }
        let mut done = Vec::new();
        for (p, pair) in held.iter().zip(unlocked.chunks(2)) {
            match pair[0] {
                Some(w) if w == mine.word => {}
                // Taken over after our WRITEs completed (under half the timeout).
                Some(w) => self.overtaken(p.b, w),
                None => {
                    return Err(self.corrupt(format!(
                        "the unlock of bucket at offset {} in a pipelined upsert failed",
                        p.b
                    )))
                }
            }
            match p.spot {
                Some((off, in_place, inserted)) => {
                    done.push(p.at);
                    if !in_place {
                        // The slot word this round published.
                        let need = (p.rec.len() as u64).next_multiple_of(8);
                        let word = slot_word(off, need, p.h);
                        let (child, bucket) = (p.child, p.b);
                        self.cache.insert(
                            p.h,
                            Location {
                                child,
                                bucket,
                                word,
                            },
                        );
                    }
                    self.notify
                        .publish(EventKind::Put, pairs[p.at].0.as_ref())?;
                    if inserted && pair[1].is_some_and(|c| c + 1 >= self.split_at) {
                        if let Ok(route) = self.route(p.h) {
                            if route.child == p.child && !splits.contains(&route) {
                                splits.push(route);
                            }
                        }
                    }
                }
                None => moved.push(p.at), // bucket or record space full
            }
        }
        Ok((done, retry, moved))
    }

    /// Steps 2-5 of a pipelined round, every bucket in `held` locked by us with `mine`:
    /// read the buckets, read the candidate records, write the records, write the
    /// slots. A key left without a spot (full bucket or record space) is written one by
    /// one later. `false`: our locks got too old to WRITE under before a WRITE others
    /// can see (the round is abandoned and retried).
    fn upsert_locked<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        pairs: &[(K, V)],
        held: &mut [Pending],
        mine: &Held,
    ) -> Result<bool, DsError> {
        if held.is_empty() {
            return Ok(true);
        }
        self.fault(FaultPoint::LockHeld)?;
        // 2. Read every bucket (stable: we hold its lock).
        let mut raws = vec![[0u8; BUCKET_BYTES as usize]; held.len()];
        {
            let handles: Vec<&BlockHandle> = held.iter().map(|p| &p.part).collect();
            let mut ops = Vec::with_capacity(held.len());
            for (p, raw) in held.iter().zip(raws.iter_mut()) {
                ops.push(p.part.read_op(p.b, raw)?);
            }
            BlockHandle::execute_many(&handles, &mut ops)?;
            for (i, o) in ops.iter().enumerate() {
                if let Err(e) = o.outcome() {
                    return Err(self.corrupt(format!("bucket read {i} of a batch failed: {e}")));
                }
            }
        }
        for (p, raw) in held.iter_mut().zip(&raws) {
            let Some(bk) = bucket::decode(p.b, raw) else {
                return Err(self.corrupt(format!(
                    "bucket at offset {} fails its checksum under its lock",
                    p.b
                )));
            };
            p.slots = bk.slots;
        }
        // 3. Read the records whose fingerprint matches.
        let mut cands: Vec<(usize, usize, u64, Vec<u8>)> = Vec::new(); // (pending, slot, off, buf)
        for (j, p) in held.iter().enumerate() {
            for (slot, off, len) in self.candidates(&p.part, p.h, &p.slots) {
                cands.push((j, slot, off, vec![0u8; len as usize]));
            }
        }
        let mut found: Vec<Option<(usize, u64)>> = vec![None; held.len()]; // (slot, len)
        if !cands.is_empty() {
            let handles: Vec<&BlockHandle> = cands.iter().map(|c| &held[c.0].part).collect();
            let mut ops = Vec::with_capacity(cands.len());
            for (c, h) in cands.iter_mut().zip(&handles) {
                ops.push(h.read_op(c.2, &mut c.3)?);
            }
            BlockHandle::execute_many(&handles, &mut ops)?;
            let ok: Vec<bool> = ops.iter().map(|o| o.outcome().is_ok()).collect();
            drop(ops);
            for ((j, slot, _, buf), fine) in cands.into_iter().zip(ok) {
                if !fine {
                    return Err(self.corrupt("a record read of a batch failed".into()));
                }
                let key = pairs[held[j].at].0.as_ref();
                match decode(&buf) {
                    Decoded::Record(r) if r.key == key => {
                        found[j] = Some((slot, slot_place(held[j].slots[slot]).1))
                    }
                    Decoded::Record(_) => {}
                    Decoded::Bad => {
                        return Err(self
                            .corrupt("a record fails its checksum under its bucket's lock".into()))
                    }
                }
            }
        }
        // 4. Pick each record's place: in place (same size), or new record space.
        for (p, f) in held.iter_mut().zip(&found) {
            let need = (p.rec.len() as u64).next_multiple_of(8);
            match *f {
                Some((slot, len)) if len == need => {
                    p.spot = Some((slot_place(p.slots[slot]).0, true, false));
                }
                _ => {
                    if f.is_none() && p.slots.iter().all(|&s| s != 0) {
                        continue; // bucket full: one by one (splits)
                    }
                    let spot = match self.take_space(p.child, need) {
                        Some(off) => Some(off),
                        None => {
                            let chunk = self.chunk_len(need);
                            let start = p.part.faa(HEAP, chunk)?;
                            let end = start.saturating_add(chunk);
                            (start >= self.heap_start && end <= p.part.len()).then(|| {
                                self.add_space(p.child, start + need, end);
                                start
                            })
                        }
                    };
                    let Some(off) = spot else {
                        continue; // record space full: one by one (splits)
                    };
                    let word = slot_word(off, need, p.h);
                    match *f {
                        Some((slot, _)) => p.slots[slot] = word,
                        None => {
                            if let Some(s) = p.slots.iter_mut().find(|s| **s == 0) {
                                *s = word;
                            }
                        }
                    }
                    p.spot = Some((off, false, f.is_none()));
                }
            }
        }
        // Write the records (before any slot names them). In-place rewrites are
        // visible to others: only while our locks are fresh.
        if !self.may_write(mine) {
            return Ok(false);
        }
        {
            let writing: Vec<&Pending> = held.iter().filter(|p| p.spot.is_some()).collect();
            let handles: Vec<&BlockHandle> = writing.iter().map(|p| &p.part).collect();
            let mut ops = Vec::with_capacity(writing.len());
            for p in &writing {
                if let Some((off, _, _)) = p.spot {
                    ops.push(p.part.write_op(off, &p.rec)?);
                }
            }
            if run(&handles, &mut ops)?.iter().any(Option::is_none) {
                return Err(self.corrupt("a record write of a batch failed".into()));
            }
        }
        self.fault(FaultPoint::RecordWritten)?;
        // 5. Point the slots at the new records (in-place rewrites need nothing more).
        let bodies: Vec<(usize, [u8; bucket::BODY_BYTES])> = held
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.spot, Some((_, false, _))))
            .map(|(j, p)| (j, bucket::encode_body(p.b, &p.slots)))
            .collect();
        if !bodies.is_empty() {
            if !self.may_write(mine) {
                return Ok(false);
            }
            let handles: Vec<&BlockHandle> = bodies.iter().map(|(j, _)| &held[*j].part).collect();
            let mut ops = Vec::with_capacity(bodies.len());
            for ((j, body), h) in bodies.iter().zip(&handles) {
                ops.push(h.write_op(held[*j].b + SLOTS_AT, body)?);
            }
            if run(&handles, &mut ops)?.iter().any(Option::is_none) {
                return Err(self.corrupt("a slot write of a batch failed".into()));
            }
        }
        self.fault(FaultPoint::SlotsWritten)?;
        Ok(true)
    }
}
