//! The write path of a [`Kv`]: one attempt of a put/update/upsert or a delete under
//! the bucket lock (lock, peek, read under the lock, write in place or out of place,
//! publish the slots, unlock), and the handle's record space (chunks of a
//! partition's heap). See `docs/DATA_STRUCTURES.md`, "Kv", "put/delete" and "Bucket
//! locks".

use super::*;

impl Kv {
    /// One write attempt in partition `child` (`part`). Four round trips in the common
    /// cases: (1) lock the bucket and peek at it, reserving a chunk of record space for
    /// this handle when its last one is used up; (2) read the bucket under the lock and
    /// the records the peek points at, writing the new record into this handle's space
    /// unless the peek suggests the key is there; (3) rewrite the old record in place
    /// (same size) or point the slot at the new record; (4) unlock.
    pub(super) fn try_write(
        &self,
        part: &BlockHandle,
        child: u64,
        h: u64,
        key: &[u8],
        rec: &[u8],
        mode: Mode,
    ) -> Result<Attempt<Wrote>, DsError> {
        let need = (rec.len() as u64).next_multiple_of(8);
        let b = self.bucket_off(h);
        let mut spot = self.take_space(child, need);
        let chunk = self.chunk_len(need);
        let mut peek = [0u8; BUCKET_BYTES as usize];
        let mine = Held::new();
        let (lock, reserved) = {
            let mut ops = vec![
                part.cas_op(b, UNLOCKED, mine.word)?,
                part.read_op(b, &mut peek)?,
            ];
            if spot.is_none() {
                ops.push(part.faa_op(HEAP, chunk)?);
            }
            let done = part.execute(&mut ops);
            let lock = ops[0].outcome();
            let reserved = ops.get(2).map(|o| o.outcome());
            if let Err(e) = done {
                if lock == Ok(UNLOCKED) {
                    self.abandon(part, b, &mine)?;
                }
                return Err(e.into());
            }
            (lock, reserved)
        };
        if let Some(Ok(start)) = reserved {
            let end = start.saturating_add(chunk);
            if start >= self.heap_start && end <= part.len() {
                self.add_space(child, start + need, end);
                spot = Some(start);
            }
        }
        let grab = self.grab_after(lock, mine, part, b)?;
        let Some(grab) = grab else {
            if let Some(off) = spot {
                self.give_back(child, off, need);
            }
            return Ok(Attempt::Moved);
        };
        let held = grab.held;
        // The bucket is ours: every path below unlocks it (but an injected crash, and a
        // repair handed on).
        let entered = self.enter(part, b, &grab);
        let ours = !matches!(entered, Ok(false));
        let result = match (spot, entered) {
            (_, Err(e)) => Err(e),
            (_, Ok(false)) => Ok(Locked::Expired),
            (None, Ok(true)) => Ok(Locked::Full),
            (Some(off), Ok(true)) => {
                // A peek taken before a takeover may show what the repair dropped.
                let peek = bucket::decode(b, &peek)
                    .filter(|_| !grab.took_over)
                    .map(|p| p.slots);
                self.write_locked(part, b, h, key, (off, rec), mode, peek, &held)
            }
        };
        if matches!(result, Err(DsError::FaultInjected(_))) {
            return result.map(|_| Attempt::Retry);
        }
        if let (
            Some(off),
            Ok(Locked::Unchanged | Locked::Full | Locked::InPlace(_) | Locked::Expired),
        ) = (spot, &result)
        {
            self.give_back(child, off, need);
        }
        let inserted = matches!(result, Ok(Locked::Inserted));
        let count = match ours {
            true => self.unlock(part, b, &held, inserted.then_some(1))?,
            false => 0,
        };
        if let (Some(off), Ok(Locked::Inserted | Locked::Replaced(_))) = (spot, &result) {
            // The slot word this write published (an in-place rewrite keeps the word).
            let word = slot_word(off, need, h);
            self.cache.insert(
                h,
                Location {
                    child,
                    bucket: b,
                    word,
                },
            );
        }
        match result? {
            Locked::Inserted => Ok(Attempt::Done(Wrote::Inserted(count + 1))),
            Locked::Replaced(old) => Ok(Attempt::Done(Wrote::Replaced(old))),
            Locked::InPlace(old) => Ok(Attempt::Done(Wrote::Replaced(old))),
            Locked::Unchanged => Ok(Attempt::Done(Wrote::Unchanged)),
            Locked::Full => Ok(Attempt::Full),
            Locked::Expired => Ok(Attempt::Retry),
        }
    }

    /// Entering bucket `b`'s critical section with `grab`: the injection point right
    /// after the lock, and the repair after a takeover. `false`: the bucket needed a
    /// repair but our lock got too old to WRITE under; the lock was handed on (not ours
    /// to release), retry.
    pub(super) fn enter(
        &self,
        part: &BlockHandle,
        b: u64,
        grab: &lock::Grab,
    ) -> Result<bool, DsError> {
        self.fault(FaultPoint::LockHeld)?;
        if grab.took_over {
            return self.repair(part, b, &grab.held);
        }
        Ok(true)
    }

    /// Bytes of record space a handle reserves at a time for records of `need` bytes.
    pub(super) fn chunk_len(&self, need: u64) -> u64 {
        let space = self.obj.block_len() - self.heap_start;
        need.max((space / 64).min(16 << 10)).next_multiple_of(8)
    }

    /// `need` bytes from this handle's reserved space in partition `child`, if it has
    /// them.
    pub(super) fn take_space(&self, child: u64, need: u64) -> Option<u64> {
        let mut parts = self.parts.lock();
        let p = parts.get_mut(&child)?;
        let (next, end) = p.space;
        (next + need <= end).then(|| {
            p.space.0 = next + need;
            next
        })
    }

    /// Makes `start..end` of partition `child` this handle's reserved space.
    pub(super) fn add_space(&self, child: u64, start: u64, end: u64) {
        if let Some(p) = self.parts.lock().get_mut(&child) {
            p.space = (start, end);
        }
    }

    /// Returns `need` bytes at `off` that no slot points at to this handle's space (if
    /// nothing was taken after them).
    pub(super) fn give_back(&self, child: u64, off: u64, need: u64) {
        if let Some(p) = self.parts.lock().get_mut(&child) {
            if p.space.0 == off + need {
                p.space.0 = off;
            }
        }
    }

    /// Under bucket `b`'s lock: store the record `rec = (spot, bytes)` for `key`, in
    /// place of the key's record when that has the same size, at `spot` otherwise.
    /// `peek` is the bucket as read before the lock was known to be held.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_locked(
        &self,
        part: &BlockHandle,
        b: u64,
        h: u64,
        key: &[u8],
        rec: (u64, &[u8]),
        mode: Mode,
        peek: Option<[u64; SLOTS]>,
        held: &Held,
    ) -> Result<Locked, DsError> {
        let (spot, bytes) = rec;
        let need = (bytes.len() as u64).next_multiple_of(8);
        // Write the record at the spot in the lookup's round trip unless the peek
        // suggests the key is there (then it is most likely rewritten in place).
        let likely_there = peek.is_some_and(|p| !self.candidates(part, h, &p).is_empty());
        let early = (!likely_there && mode != Mode::Update).then_some((spot, bytes));
        let (mut slots, found) = self.locked_lookup(part, b, h, key, early, peek)?;
        let word = slot_word(spot, need, h);
        let old = match found {
            Some((i, old)) => {
                if mode == Mode::Insert {
                    return Ok(Locked::Unchanged);
                }
                let (off, len) = slot_place(slots[i]);
                if len == need {
                    if !self.may_write(held) {
                        return Ok(Locked::Expired);
                    }
                    part.write(off, bytes)?;
                    self.fault(FaultPoint::RecordWritten)?;
                    self.fault(FaultPoint::SlotsWritten)?;
                    return Ok(Locked::InPlace(old.value.remote()));
                }
                slots[i] = word;
                Some(old.value.remote())
            }
            None => {
                if mode == Mode::Update {
                    return Ok(Locked::Unchanged);
                }
                let Some(i) = slots.iter().position(|&s| s == 0) else {
                    return Ok(Locked::Full);
                };
                slots[i] = word;
                None
            }
        };
        if early.is_none() {
            part.write(spot, bytes)?; // into this handle's own record space
        }
        self.fault(FaultPoint::RecordWritten)?;
        if !self.may_write(held) {
            return Ok(Locked::Expired);
        }
        part.write(b + SLOTS_AT, &bucket::encode_body(b, &slots))?;
        self.fault(FaultPoint::SlotsWritten)?;
        Ok(match old {
            Some(remote) => Locked::Replaced(remote),
            None => Locked::Inserted,
        })
    }

    /// Under bucket `b`'s lock: the bucket's slots and the slot holding `key` with its
    /// record. Writes `rec` (offset, bytes) in the same round trip when given, and
    /// reads the records `peek` points at alongside the bucket.
    pub(super) fn locked_lookup(
        &self,
        part: &BlockHandle,
        b: u64,
        h: u64,
        key: &[u8],
        rec: Option<(u64, &[u8])>,
        peek: Option<[u64; SLOTS]>,
    ) -> Result<Lookup, DsError> {
        let mut raw = [0u8; BUCKET_BYTES as usize];
        let guesses: Vec<(usize, u64, u64)> = peek
            .map(|p| self.candidates(part, h, &p))
            .unwrap_or_default();
        let mut bufs: Vec<Vec<u8>> = guesses.iter().map(|c| vec![0u8; c.2 as usize]).collect();
        {
            let max = part.transport().max_op_bytes().max(1);
            let mut ops = Vec::with_capacity(2 + guesses.len());
            if let Some((off, bytes)) = rec {
                for (i, chunk) in bytes.chunks(max).enumerate() {
                    ops.push(part.write_op(off + (i * max) as u64, chunk)?);
                }
            }
            ops.push(part.read_op(b, &mut raw)?);
            for (c, buf) in guesses.iter().zip(bufs.iter_mut()) {
                ops.push(part.read_op(c.1, buf)?);
            }
            part.execute(&mut ops)?;
        }
        let Some(now) = bucket::decode(b, &raw) else {
            return Err(self.corrupt(format!(
                "bucket at offset {b} fails its checksum under its lock"
            )));
        };
        let slots = now.slots;
        // Records the peek read are valid where the slot still holds the same word:
        // only lock holders change records that slots point at, and we hold the lock.
        let still = |i: usize| peek.is_some_and(|p| p[i] == slots[i]);
        for (c, buf) in guesses.iter().zip(bufs) {
            if !still(c.0) {
                continue;
            }
            if let Decoded::Record(r) = decode(&buf) {
                if r.key == key {
                    return Ok((slots, Some((c.0, r))));
                }
            }
        }
        let all_seen = self
            .candidates(part, h, &slots)
            .iter()
            .all(|c| still(c.0) && guesses.iter().any(|g| g.0 == c.0));
        if all_seen {
            return Ok((slots, None));
        }
        match self.find(part, h, key, &slots)? {
            Found::Key(i, r) => Ok((slots, Some((i, r)))),
            Found::Absent => Ok((slots, None)),
            Found::Torn => Err(self.corrupt(format!(
                "a record of bucket at offset {b} fails its checksum under the bucket's lock"
            ))),
        }
    }

    /// Deletes; `Some(count)` when the key was there.
    pub(super) fn try_delete(
        &self,
        part: &BlockHandle,
        h: u64,
        key: &[u8],
    ) -> Result<Attempt<Option<Removed>>, DsError> {
        let b = self.bucket_off(h);
        let mut peek = [0u8; BUCKET_BYTES as usize];
        let mine = Held::new();
        let lock = {
            let mut ops = [
                part.cas_op(b, UNLOCKED, mine.word)?,
                part.read_op(b, &mut peek)?,
            ];
            let done = part.execute(&mut ops);
            let lock = ops[0].outcome();
            if let Err(e) = done {
                if lock == Ok(UNLOCKED) {
                    self.abandon(part, b, &mine)?;
                }
                return Err(e.into());
            }
            lock
        };
        let grab = self.grab_after(lock, mine, part, b)?;
        let Some(grab) = grab else {
            return Ok(Attempt::Moved);
        };
        let held = grab.held;
        let entered = self.enter(part, b, &grab);
        let ours = !matches!(entered, Ok(false));
        let result = match entered {
            Err(e) => Err(e),
            Ok(false) => Ok(Deleted::Expired),
            Ok(true) => {
                let peek = bucket::decode(b, &peek)
                    .filter(|_| !grab.took_over)
                    .map(|p| p.slots);
                self.delete_locked(part, b, h, key, peek, &held)
            }
        };
        if matches!(result, Err(DsError::FaultInjected(_))) {
            return result.map(|_| Attempt::Retry);
        }
        let removed = matches!(result, Ok(Deleted::Gone(_)));
        let count = match ours {
            true => self.unlock(part, b, &held, removed.then_some(u64::MAX))?,
            false => 0,
        };
        match result? {
            Deleted::Gone(old) => Ok(Attempt::Done(Some(Removed {
                count: count.wrapping_sub(1),
                old,
            }))),
            Deleted::Absent => Ok(Attempt::Done(None)),
            Deleted::Expired => Ok(Attempt::Retry),
        }
    }

    /// Whether the holder of `held` may still WRITE under it (less than half the lock
    /// timeout since it took the lock); counts the refusals.
    pub(super) fn may_write(&self, held: &Held) -> bool {
        let fresh = held.fresh(self.lock_timeout_ms);
        if !fresh {
            self.expired_hold();
        }
        fresh
    }

    /// Under bucket `b`'s lock: removes `key` if it is there.
    pub(super) fn delete_locked(
        &self,
        part: &BlockHandle,
        b: u64,
        h: u64,
        key: &[u8],
        peek: Option<[u64; SLOTS]>,
        held: &Held,
    ) -> Result<Deleted, DsError> {
        let (mut slots, found) = self.locked_lookup(part, b, h, key, None, peek)?;
        match found {
            Some((i, old)) => {
                if !self.may_write(held) {
                    return Ok(Deleted::Expired);
                }
                slots[i] = 0;
                part.write(b + SLOTS_AT, &bucket::encode_body(b, &slots))?;
                self.fault(FaultPoint::SlotsWritten)?;
                Ok(Deleted::Gone(old.value.remote()))
            }
            None => Ok(Deleted::Absent),
        }
    }
}
