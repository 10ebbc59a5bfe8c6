//! Repartitioning of a [`Kv`] (first partition, splits, compactions, merges),
//! coordinated by a controller fence and crash-safe: whoever needs the map after a
//! holder died rolls its repartitioning forward.
//!
//! One run, holding the fence token `T` (see `docs/DATA_STRUCTURES.md`, "Kv"):
//! 1. read the root; a root with a larger token means we were superseded; a busy
//!    root with a smaller one is a dead (expired) holder's run, which we redo; an idle
//!    root is checked against what we want (the map may have moved on);
//! 2. take fresh children (FAA `next`): a directory block `D` and up to two partitions;
//!    write the intent into `D`;
//! 3. `CAS(root, seen, busy(T, D))`: the run is ours (AfterLock). A redone run's
//!    fresh blocks are freed now (they were never visible);
//! 4. freeze the old partitions (idempotent; never undone) (AfterFreeze), read them,
//!    write their live records into the fresh partitions (AfterCopy), write `D`'s
//!    directory;
//! 5. `CAS(root, busy(T, D), idle(T, D))` publishes (BeforePublish); a holder whose
//!    token was superseded fails here, having written only blocks no one uses;
//! 6. retire the old partitions and the old directory block.

use super::bucket::{self, BUCKET_BYTES, FROZEN, SLOTS, SLOTS_AT, UNLOCKED};
use super::lock;
use super::record::{decode, encode, record_len, Decoded, Record};
use super::root::{Intent, Kind, Root, INTENT_BYTES, MAX_DIR, MAX_TOKEN};
use super::{hash, slot_word, Kv, Map, Route, COUNT, HEAP, PART_HEADER};
use crate::client::{BlockHandle, ClientError};
use crate::ds::object::Entry;
use crate::ds::{is_stale, DsError};
use crate::proto::{ControlError, Request, Response};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Every this many repartitionings published by a handle, it also frees the table's
/// blocks no map names (see [`Kv::scavenge`]) while it still holds the fence.
const SCAVENGE_EVERY: u64 = 32;
/// Word 0 of the map block: the root.
pub(super) const ROOT: u64 = 0;
/// Offset of the entries in a directory block (after the intent).
pub(super) const DIR_ENTRIES: u64 = 64;
/// Default time to live of the repartitioning fence.
pub(super) const FENCE_TTL: Duration = Duration::from_secs(2);
/// How long to wait for another client's repartitioning before reporting it stuck.
pub(super) const REPARTITION_WAIT: Duration = Duration::from_secs(10);
/// How often a client waiting for a repartitioning asks for the fence (to take over
/// from a holder that died).
const RECOVER_EVERY: Duration = Duration::from_millis(100);

/// A place in a repartitioning, or in a bucket's critical section, where a
/// fault-injection test stops the handle ([`Kv::inject_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The intent is written into a fresh directory block; the root does not name it
    /// yet (a crash here leaves that block unreachable until [`Kv::scavenge`]).
    BeforeRoot,
    /// A write, delete or pipelined upsert round holds its bucket lock(s), nothing
    /// written yet.
    LockHeld,
    /// The new record is written (out of place, slots not yet pointing at it), or an
    /// old one rewritten in place; the lock is held.
    RecordWritten,
    /// The slots and checksum are written (or the in-place rewrite done); only the
    /// unlock is left.
    SlotsWritten,
    /// The root names the run (busy), nothing is frozen yet.
    AfterLock,
    /// The old partitions are frozen.
    AfterFreeze,
    /// The fresh partitions are written, the new directory is not.
    AfterCopy,
    /// Everything is written, the fence renewed; only the publishing CAS is left.
    BeforePublish,
    /// Published (the root is idle and names the new directory); the old partitions,
    /// still FROZEN, are not retired yet (a crash here leaves them unreachable until
    /// [`Kv::scavenge`]).
    AfterPublish,
}

/// What a fault-injection test does at a [`FaultPoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Stop there as a crashed client would: no clean-up, no fence release (the
    /// operation returns [`DsError::FaultInjected`]).
    Crash,
    /// Sleep there (as a paused client), then go on.
    Pause(Duration),
}

/// What a client asks a run to do.
#[derive(Debug, Clone, Copy)]
pub(super) enum Want {
    /// Create the first partition.
    Init,
    /// Split (or compact) the partition at the route.
    Split(Route),
    /// Merge the partition at the route with its buddy.
    Merge(Route),
    /// Only finish a dead holder's run, if there is one.
    Recover,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ran {
    /// Nothing to do (the map moved on).
    Nothing,
    /// Another client holds the fence or changed the root first.
    Busy,
    /// Our token was superseded: another client finished (or will finish) the work.
    Superseded,
    /// Published.
    Published,
}

/// What the fresh partitions of a run hold.
enum Outcome {
    Init,
    Split,
    Compacted,
    Merged,
    /// A merge whose union did not fit: each partition compacted in place.
    Unmerged,
}

impl Kv {
    // ----- the fence ----------------------------------------------------------------

    fn fence_ttl_ms(&self) -> u64 {
        self.fence_ttl_ms.load(Ordering::Relaxed)
    }

    /// The fence token, or `None` while another client holds the fence.
    pub(super) fn fence_acquire(&self) -> Result<Option<u64>, DsError> {
        let req = Request::FenceAcquire {
            path: self.obj.path().clone(),
            ttl_ms: self.fence_ttl_ms(),
        };
        match self.obj.client().request(req) {
            Ok(Response::Fence { token }) => Ok(Some(token)),
            Ok(other) => Err(ClientError::Protocol(format!("{other:?} to a fence request")).into()),
            Err(ClientError::Control(ControlError::FenceHeld { .. })) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renews fence `token` for another TTL; `false` when it was lost (another
    /// client acquired the fence since).
    pub(super) fn fence_renew(&self, token: u64) -> Result<bool, DsError> {
        let req = Request::FenceRenew {
            path: self.obj.path().clone(),
            token,
            ttl_ms: self.fence_ttl_ms(),
        };
        match self.obj.client().request(req) {
            Ok(_) => Ok(true),
            Err(ClientError::Control(ControlError::FenceLost { .. })) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn fence_release(&self, token: u64) -> Result<(), DsError> {
        let req = Request::FenceRelease {
            path: self.obj.path().clone(),
            token,
        };
        self.obj.client().request(req)?;
        Ok(())
    }

    /// Stops or pauses here when a test armed a fault for `at`.
    pub(super) fn fault(&self, at: FaultPoint) -> Result<(), DsError> {
        if !self.fault_armed.load(Ordering::Relaxed) {
            return Ok(()); // the common case: no lock taken
        }
        let armed = *self.fault.lock();
        match armed {
            Some((p, FaultAction::Crash)) if p == at => {
                *self.fault.lock() = None;
                Err(DsError::FaultInjected(format!("{at:?}")))
            }
            Some((p, FaultAction::Pause(d))) if p == at => {
                *self.fault.lock() = None;
                std::thread::sleep(d);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    // ----- reading the map ----------------------------------------------------------

    /// The intent at the head of directory block `dir`.
    fn read_intent(&self, dir: u64) -> Result<Option<Intent>, DsError> {
        let Some(block) = self.partition(dir)? else {
            return Ok(None);
        };
        let mut buf = [0u8; INTENT_BYTES];
        match block.read(0, &mut buf) {
            Ok(()) => Ok(Intent::decode(dir, &buf)),
            Err(e) if is_stale(&e) => {
                self.parts.lock().remove(&dir);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The entries of directory block `dir`; `None` when it is gone.
    pub(super) fn read_dir(&self, dir: u64) -> Result<Option<Vec<u64>>, DsError> {
        let Some(block) = self.partition(dir)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; 8usize << self.g];
        match block.read(DIR_ENTRIES, &mut buf) {
            Ok(()) => Ok(Some(super::le_words(&buf).collect())),
            Err(e) if is_stale(&e) => {
                self.parts.lock().remove(&dir);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the map: the root, the directory in force (named by the root, or by the
    /// intent of the run in progress), the root again; kept when both roots are equal
    /// (the directory in force is retired only after the root changes). Creates the
    /// first partition, or finishes a dead holder's run, when there is no directory.
    pub(super) fn reload(&self) -> Result<(), DsError> {
        let deadline = Instant::now() + REPARTITION_WAIT;
        let mut recover_at = Instant::now();
        loop {
            let r1 = self.map_block.faa(ROOT, 0)?;
            let live = match Root::decode(r1) {
                None => None,
                Some(r) if !r.busy => Some(r.dir),
                Some(r) => self
                    .read_intent(r.dir)?
                    .map(|i| i.prev_dir)
                    .filter(|&d| d > 0),
            };
            if let Some(dir) = live {
                if let Some(entries) = self.read_dir(dir)? {
                    if self.map_block.faa(ROOT, 0)? == r1 {
                        *self.map.write() = Map {
                            version: dir,
                            entries,
                        };
                        return Ok(());
                    }
                }
            } else if Instant::now() >= recover_at {
                // No directory yet: create it, or finish the run that creates it.
                recover_at = Instant::now() + RECOVER_EVERY;
                let want = if r1 == 0 { Want::Init } else { Want::Recover };
                if self.repartition(want)? == Ran::Published {
                    continue;
                }
            }
            if Instant::now() > deadline {
                return Err(self.stuck());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Reloads the map until it is newer than `seen` (the partition we used is being
    /// replaced), taking over the run when its holder's fence expires. Bounded.
    pub(super) fn reload_after(&self, seen: u64) -> Result<(), DsError> {
        let start = Instant::now();
        let mut recover_at = start + RECOVER_EVERY;
        loop {
            self.reload()?;
            if self.map.read().version != seen {
                return Ok(());
            }
            let now = Instant::now();
            if now > start + REPARTITION_WAIT {
                return Err(self.stuck());
            }
            if now >= recover_at {
                recover_at = now + RECOVER_EVERY;
                self.repartition(Want::Recover)?;
                continue;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Finishes a repartitioning left in progress by a client that died (once its
    /// fence expires) and waits for one in progress to be published. Operations do
    /// this on their own when they need the moving partitions; this is for tools and
    /// tests that want the table settled. Bounded by the repartitioning wait (10 s).
    pub fn settle(&self) -> Result<(), DsError> {
        let deadline = Instant::now() + REPARTITION_WAIT;
        loop {
            let root = Root::decode(self.map_block.faa(ROOT, 0)?);
            if root.is_some_and(|r| !r.busy) {
                return self.reload();
            }
            if Instant::now() > deadline {
                return Err(self.stuck());
            }
            let want = if root.is_none() {
                Want::Init
            } else {
                Want::Recover
            };
            if self.repartition(want)? != Ran::Published {
                std::thread::sleep(RECOVER_EVERY);
            }
        }
    }

    // ----- runs ---------------------------------------------------------------------

    /// Splits the partition at `route` in two, or compacts it when its live records
    /// use little of it (if it still is what `route` says).
    pub(super) fn split(&self, route: Route) -> Result<(), DsError> {
        let deadline = Instant::now() + REPARTITION_WAIT;
        loop {
            if self.repartition(Want::Split(route))? != Ran::Busy {
                return self.reload();
            }
            // Another client holds the fence, maybe for a run elsewhere that publishes
            // nothing: ask again until the map moves (then the caller routes anew) or
            // the fence is ours (which also takes over from a dead holder). Bounded.
            self.reload()?;
            if self.map.read().version != route.version {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.stuck());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Merges the partition at `route` with its buddy when both are small enough.
    pub(super) fn merge(&self, route: Route) -> Result<(), DsError> {
        if route.depth == 0 {
            return Ok(());
        }
        // Cheap checks on the cached map and the key counts first (no controller
        // call): most removes do not merge.
        let buddy = {
            let map = self.map.read();
            let theirs = self.range(route.depth, route.prefix ^ 1);
            map.entries.get(theirs.start).copied().unwrap_or(0)
        };
        if (buddy & 0xFF) as u32 != route.depth || buddy >> 8 == route.child {
            return Ok(());
        }
        if let (Some(p), Some(q)) = (self.partition(route.child)?, self.partition(buddy >> 8)?) {
            match (p.faa(COUNT, 0), q.faa(COUNT, 0)) {
                (Ok(a), Ok(b)) if a.wrapping_add(b) > self.merge_at => return Ok(()),
                // Moved meanwhile: the next remove looks again.
                (Err(e), _) | (_, Err(e)) if is_stale(&e) => return Ok(()),
                (Err(e), _) | (_, Err(e)) => return Err(e.into()),
                _ => {}
            }
        }
        match self.repartition(Want::Merge(route))? {
            Ran::Published => self.reload(),
            // Someone else is repartitioning; merging can wait.
            _ => Ok(()),
        }
    }

    /// Takes the fence and does one run; releases the fence after it (but not after
    /// an injected crash, which must look like a dead client).
    pub(super) fn repartition(&self, want: Want) -> Result<Ran, DsError> {
        let Some(token) = self.fence_acquire()? else {
            return Ok(Ran::Busy);
        };
        let out = self.run(want, token);
        if !matches!(out, Err(DsError::FaultInjected(_))) {
            // Best effort: an unreleased fence only delays the next run by its TTL.
            let _ = self.fence_release(token);
        }
        if out.as_ref().is_ok_and(|r| *r == Ran::Superseded) {
            self.superseded.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    fn run(&self, want: Want, token: u64) -> Result<Ran, DsError> {
        let started = Instant::now();
        if token > MAX_TOKEN {
            return Err(self.corrupt(format!(
                "fence token {token} does not fit the root word; restart the controller with a fresh data directory"
            )));
        }
        let raw = self.map_block.faa(ROOT, 0)?;
        let root = Root::decode(raw);
        if root.is_some_and(|r| r.token >= token) {
            return Ok(Ran::Superseded);
        }
        let (plan, discard) = match root {
            None => match want {
                Want::Init => (
                    Intent {
                        kind: Kind::Init,
                        prev_dir: 0,
                        old: [0, 0],
                        depth: 0,
                        prefix: 0,
                        new: [0, 0],
                    },
                    vec![],
                ),
                _ => return Ok(Ran::Nothing),
            },
            Some(r) if r.busy => {
                // A dead holder's run (its fence expired, we hold a larger token):
                // redo it with fresh blocks, freeing the ones it wrote.
                let Some(prev) = self.read_intent(r.dir)? else {
                    return Err(self.corrupt(format!(
                        "directory block {} named by the root holds no intent",
                        r.dir
                    )));
                };
                (prev, vec![prev.new[0], prev.new[1], r.dir])
            }
            Some(r) => {
                let Some(entries) = self.read_dir(r.dir)? else {
                    return Ok(Ran::Nothing); // replaced meanwhile
                };
                match self.plan(want, r.dir, &entries)? {
                    Some(i) => (i, vec![]),
                    None => return Ok(Ran::Nothing),
                }
            }
        };
        let n = self.obj.meta().faa(super::NEXT, 3)?.max(1);
        if n + 2 > MAX_DIR {
            return Err(self.corrupt(format!("child index {n} does not fit the root word")));
        }
        let dir = n;
        let intent = Intent {
            new: [n + 1, if plan.kind == Kind::Init { 0 } else { n + 2 }],
            ..plan
        };
        let dblock = self.link_new(dir)?;
        dblock.write(0, &intent.encode(dir))?;
        let busy = self.root_word(dir, token, true)?;
        self.fault(FaultPoint::BeforeRoot)?;
        if self.map_block.cas(ROOT, raw, busy)? != raw {
            self.discard(dir)?;
            return Ok(Ran::Busy);
        }
        let idle = self.root_word(dir, token, false)?;
        let out = match self.own(&intent, &dblock, discard, token, (busy, idle), started) {
            // A failure after another client took the run over (it freed our blocks):
            // that client publishes; ours is discarded.
            Err(e)
                if !matches!(e, DsError::FaultInjected(_))
                    && ![busy, idle].contains(&self.map_block.faa(ROOT, 0)?) =>
            {
                Ok(Ran::Superseded)
            }
            r => r,
        };
        if out.as_ref().is_ok_and(|r| *r == Ran::Published) {
            let runs = self.splits.load(Ordering::Relaxed)
                + self.merges.load(Ordering::Relaxed)
                + self.compactions.load(Ordering::Relaxed);
            if runs % SCAVENGE_EVERY == 0 {
                // Still holding the fence, and our token is in the root (stale holders
                // cannot take it): collect what dead clients left. Best effort.
                if let Err(e) = self.collect_unreachable(dir, token) {
                    tracing::debug!(table = %self.obj.path(), error = %e, "scavenging after a repartitioning failed");
                }
            }
        }
        out
    }

    /// The rest of a run once the root names it (`busy`): free what a dead holder
    /// wrote, freeze, copy, write the directory, publish (`busy` → `idle`), retire.
    fn own(
        &self,
        intent: &Intent,
        dblock: &BlockHandle,
        discard: Vec<u64>,
        token: u64,
        (busy, idle): (u64, u64),
        started: Instant,
    ) -> Result<Ran, DsError> {
        self.fault(FaultPoint::AfterLock)?;
        for c in discard.into_iter().filter(|&c| c != 0) {
            self.discard(c)?;
        }
        let mut olds = Vec::new();
        for &o in intent.old.iter().filter(|&&o| o != 0) {
            let Some(part) = self.partition(o)? else {
                return Err(self.corrupt(format!(
                    "partition {o} being repartitioned was freed before the new map was published"
                )));
            };
            self.freeze(&part)?;
            olds.push((o, part));
        }
        self.fault(FaultPoint::AfterFreeze)?;
        let mut entries = if intent.prev_dir > 0 {
            self.read_dir(intent.prev_dir)?.ok_or_else(|| {
                self.corrupt("the directory in force was freed during a repartitioning".into())
            })?
        } else {
            vec![0; 1 << self.g]
        };
        let (outcome, full) = self.copy(intent, &olds, &mut entries)?;
        self.fault(FaultPoint::AfterCopy)?;
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        dblock.write(DIR_ENTRIES, &bytes)?;
        if started.elapsed() > Duration::from_millis(self.fence_ttl_ms() / 3) {
            // Liveness only: the CAS below is what keeps a superseded holder out.
            if !self.fence_renew(token)? {
                return Ok(Ran::Superseded);
            }
        }
        self.fault(FaultPoint::BeforePublish)?;
        if self.map_block.cas(ROOT, busy, idle)? != busy {
            return Ok(Ran::Superseded);
        }
        match outcome {
            Outcome::Split => self.splits.fetch_add(1, Ordering::Relaxed),
            Outcome::Compacted | Outcome::Unmerged => {
                self.compactions.fetch_add(1, Ordering::Relaxed)
            }
            Outcome::Merged => self.merges.fetch_add(1, Ordering::Relaxed),
            Outcome::Init => 0,
        };
        self.fault(FaultPoint::AfterPublish)?;
        // Nothing names the old partitions and directory any more.
        for (child, part) in olds {
            self.parts.lock().remove(&child);
            self.obj.retire(child, part.id())?;
        }
        if intent.prev_dir > 0 {
            self.discard(intent.prev_dir)?;
        }
        match full {
            Some(e) => Err(e),
            None => Ok(Ran::Published),
        }
    }

    pub(super) fn root_word(&self, dir: u64, token: u64, busy: bool) -> Result<u64, DsError> {
        Root { dir, token, busy }
            .encode()
            .ok_or_else(|| self.corrupt(format!("root word for directory {dir}, token {token}")))
    }

    /// Frees child `k` if linked, and marks it so it is never linked again.
    pub(super) fn discard(&self, k: u64) -> Result<(), DsError> {
        self.parts.lock().remove(&k);
        match self.obj.entry(k)? {
            Entry::Linked(id) => self.obj.retire(k, id),
            Entry::Empty => {
                if self.obj.kill_empty(k)? {
                    Ok(())
                } else {
                    self.discard(k) // linked meanwhile
                }
            }
            Entry::Freed => Ok(()),
        }
    }

    /// The run `want` asks for, if the directory `dir` (idle, in force) still
    /// warrants it.
    fn plan(&self, want: Want, dir: u64, entries: &[u64]) -> Result<Option<Intent>, DsError> {
        let intent = |kind, route: Route, old| Intent {
            kind,
            prev_dir: dir,
            old,
            depth: route.depth,
            prefix: route.prefix,
            new: [0, 0],
        };
        Ok(match want {
            Want::Init | Want::Recover => None,
            Want::Split(route) => {
                let word = route.child << 8 | u64::from(route.depth);
                let range = self.range(route.depth, route.prefix);
                entries[range]
                    .iter()
                    .all(|&e| e == word)
                    .then(|| intent(Kind::Split, route, [route.child, 0]))
            }
            Want::Merge(route) => {
                let word = route.child << 8 | u64::from(route.depth);
                let (mine, theirs) = (
                    self.range(route.depth, route.prefix),
                    self.range(route.depth, route.prefix ^ 1),
                );
                let buddy = entries[theirs.start];
                if entries[mine].iter().any(|&e| e != word)
                    || entries[theirs].iter().any(|&e| e != buddy)
                    || (buddy & 0xFF) as u32 != route.depth
                {
                    return Ok(None); // the buddy is split further, or the map changed
                }
                let (Some(p), Some(q)) =
                    (self.partition(route.child)?, self.partition(buddy >> 8)?)
                else {
                    return Ok(None);
                };
                let total = p.faa(COUNT, 0)?.wrapping_add(q.faa(COUNT, 0)?);
                (total <= self.merge_at)
                    .then(|| intent(Kind::Merge, route, [route.child, buddy >> 8]))
            }
        })
    }

    /// Writes the fresh partitions of `intent` from the frozen `olds` and updates the
    /// directory `entries`. Also returns the error to report after publishing when a
    /// partition at the deepest level is full (it is compacted instead).
    fn copy(
        &self,
        intent: &Intent,
        olds: &[(u64, BlockHandle)],
        entries: &mut [u64],
    ) -> Result<(Outcome, Option<DsError>), DsError> {
        let [a, b] = intent.new;
        let depth = intent.depth;
        let mut set = |range: std::ops::Range<usize>, child: u64, depth: u32| {
            entries[range]
                .iter_mut()
                .for_each(|e| *e = child << 8 | u64::from(depth));
        };
        match intent.kind {
            Kind::Init => {
                self.write_partition(&self.link_new(a)?, &[])?;
                set(0..1 << self.g, a, 0);
                Ok((Outcome::Init, None))
            }
            Kind::Split => {
                let records = self.collect(&olds[0].1)?;
                let range = self.range(depth, intent.prefix);
                let deepest = depth >= self.g;
                if self.roomy(&records) || deepest {
                    // The record space filled up with replaced values: compact into one
                    // fresh partition at the same place instead of splitting.
                    self.write_partition(&self.link_new(a)?, &records)?;
                    set(range, a, depth);
                    let full = (deepest && !self.roomy(&records)).then(|| {
                        DsError::Config(format!(
                            "'{}' is full: a partition at the deepest split level ({}) ran out of room; use a larger block size or a larger expected_record",
                            self.obj.path(),
                            self.g
                        ))
                    });
                    return Ok((Outcome::Compacted, full));
                }
                let bit = 63 - depth;
                let (ones, zeros): (Vec<_>, Vec<_>) =
                    records.into_iter().partition(|(h, _)| h >> bit & 1 == 1);
                self.write_partition(&self.link_new(a)?, &zeros)?;
                self.write_partition(&self.link_new(b)?, &ones)?;
                let half = range.start + range.len() / 2;
                set(range.start..half, a, depth + 1);
                set(half..range.end, b, depth + 1);
                Ok((Outcome::Split, None))
            }
            Kind::Merge => {
                let p = self.collect(&olds[0].1)?;
                let q = self.collect(&olds[1].1)?;
                let mut union = p.clone();
                union.extend(q.iter().cloned());
                if self.fits(&union) {
                    self.write_partition(&self.link_new(a)?, &union)?;
                    set(self.range(depth - 1, intent.prefix >> 1), a, depth - 1);
                    return Ok((Outcome::Merged, None));
                }
                // Too many keys in one bucket: keep both, compacted (the old ones
                // stay frozen for good, so they are replaced either way).
                self.write_partition(&self.link_new(a)?, &p)?;
                self.write_partition(&self.link_new(b)?, &q)?;
                set(self.range(depth, intent.prefix), a, depth);
                set(self.range(depth, intent.prefix ^ 1), b, depth);
                Ok((Outcome::Unmerged, None))
            }
        }
    }

    /// Directory entries covered by the partition `prefix` at `depth`.
    pub(super) fn range(&self, depth: u32, prefix: u64) -> std::ops::Range<usize> {
        let shift = self.g - depth;
        let start = (prefix << shift) as usize;
        start..start + (1usize << shift)
    }

    /// Locks every bucket of `part` for good: writers then reload the map. Waits for
    /// writers inside a bucket; a bucket whose lock expired (its holder died) is taken
    /// over, repaired and frozen. A bucket already frozen stays so.
    fn freeze(&self, part: &BlockHandle) -> Result<(), DsError> {
        let mut pending: Vec<u64> = (0..self.buckets).collect();
        let deadline = Instant::now() + REPARTITION_WAIT + self.lock_timeout();
        while !pending.is_empty() {
            let mut left = Vec::new();
            for chunk in pending.chunks(256) {
                let mut ops = chunk
                    .iter()
                    .map(|&b| part.cas_op(PART_HEADER + b * BUCKET_BYTES, UNLOCKED, FROZEN))
                    .collect::<Result<Vec<_>, _>>()?;
                part.execute(&mut ops)?;
                let seen: Vec<u64> = ops.iter().map(|op| op.result).collect();
                drop(ops);
                for (w, &b) in seen.into_iter().zip(chunk) {
                    if w == UNLOCKED || w == FROZEN {
                        continue;
                    }
                    let at = PART_HEADER + b * BUCKET_BYTES;
                    if lock::expired(w, lock::now_ms(), self.lock_timeout_ms)
                        && self.take_over_frozen(part, at, w)?
                    {
                        continue;
                    }
                    left.push(b); // a writer holds the bucket: retry
                }
            }
            if !left.is_empty() {
                if Instant::now() > deadline {
                    return Err(self.corrupt(format!(
                        "a bucket lock was held for longer than the lock timeout ({} ms) plus 10 s without its stamp expiring by this client's clock; check that the clients' clocks are in sync (NTP)",
                        self.lock_timeout_ms
                    )));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            pending = left;
        }
        Ok(())
    }

    /// Takes over the expired lock word `seen` of the bucket at `at`, repairs the bucket
    /// and freezes it; `false` when another client took the lock first (or we stalled).
    fn take_over_frozen(&self, part: &BlockHandle, at: u64, seen: u64) -> Result<bool, DsError> {
        let Some(held) = self.take_over(part, at, seen)? else {
            return Ok(false);
        };
        if !self.repair(part, at, &held)? {
            return Ok(false); // handed on unrepaired (we stalled): someone else repairs
        }
        Ok(part.cas(at, held.word, FROZEN)? == held.word)
    }

    /// Every record of a frozen partition, with its key's hash.
    pub(super) fn collect(&self, part: &BlockHandle) -> Result<Vec<(u64, Record)>, DsError> {
        let heap_end = part.faa(HEAP, 0)?.clamp(self.heap_start, part.len());
        let mut image = vec![0u8; heap_end as usize];
        part.read(0, &mut image)?;
        let mut out = Vec::new();
        for b in 0..self.buckets {
            for i in 0..SLOTS as u64 {
                let at = (PART_HEADER + b * BUCKET_BYTES + SLOTS_AT + 8 * i) as usize;
                let s = u64::from_le_bytes(image[at..at + 8].try_into().unwrap_or([0; 8]));
                if s == 0 {
                    continue;
                }
                let (off, len) = super::slot_place(s);
                let rec = image
                    .get(off as usize..(off + len) as usize)
                    .filter(|_| off >= self.heap_start)
                    .and_then(|bytes| match decode(bytes) {
                        Decoded::Record(r) => Some(r),
                        Decoded::Bad => None,
                    })
                    .ok_or_else(|| {
                        self.corrupt(format!("slot {i} of bucket {b} points at no record"))
                    })?;
                out.push((hash(&rec.key), rec));
            }
        }
        Ok(out)
    }

    /// Whether `records` fit one partition with room to spare: no bucket full, at most
    /// half the record space, fewer keys than the split threshold.
    fn roomy(&self, records: &[(u64, Record)]) -> bool {
        let mut per_bucket = vec![0usize; self.buckets as usize];
        let mut heap = 0;
        for (h, r) in records {
            per_bucket[((h & 0xFFFF_FFFF) % self.buckets) as usize] += 1;
            heap += (record_len(r) as u64).next_multiple_of(8);
        }
        per_bucket.iter().all(|&n| n < SLOTS)
            && heap <= (self.obj.block_len() - self.heap_start) / 2
            && (records.len() as u64) < self.split_at
    }

    /// Whether `records` fit one partition.
    fn fits(&self, records: &[(u64, Record)]) -> bool {
        let mut per_bucket = vec![0usize; self.buckets as usize];
        let mut heap = self.heap_start;
        for (h, r) in records {
            let b = ((h & 0xFFFF_FFFF) % self.buckets) as usize;
            per_bucket[b] += 1;
            heap += (record_len(r) as u64).next_multiple_of(8);
        }
        per_bucket.iter().all(|&n| n <= SLOTS) && heap <= self.obj.block_len()
    }

    /// Writes a fresh partition holding `records` (all fit: a split only halves a
    /// partition's buckets and records; a merge checks [`Kv::fits`] first; a
    /// compaction drops only garbage).
    fn write_partition(
        &self,
        part: &BlockHandle,
        records: &[(u64, Record)],
    ) -> Result<(), DsError> {
        let mut image = vec![0u8; self.heap_start as usize];
        let mut slots = vec![[0u64; SLOTS]; self.buckets as usize];
        for (h, r) in records {
            let bi = ((h & 0xFFFF_FFFF) % self.buckets) as usize;
            let rec = encode(&r.key, &r.value)?;
            let off = image.len() as u64;
            let need = (rec.len() as u64).next_multiple_of(8);
            image.extend_from_slice(&rec);
            image.resize((off + need) as usize, 0);
            let slot = slots[bi]
                .iter_mut()
                .find(|s| **s == 0)
                .ok_or_else(|| self.corrupt(format!("bucket {bi} overflows while rebuilding")))?;
            *slot = slot_word(off, need, *h);
        }
        if image.len() as u64 > part.len() {
            return Err(self.corrupt("records overflow a partition while rebuilding".into()));
        }
        // Every bucket gets its checksum, the empty ones too.
        for (bi, s) in slots.iter().enumerate() {
            let b = PART_HEADER + bi as u64 * BUCKET_BYTES;
            let at = (b + SLOTS_AT) as usize;
            image[at..at + bucket::BODY_BYTES].copy_from_slice(&bucket::encode_body(b, s));
        }
        let heap = image.len() as u64;
        image[HEAP as usize..HEAP as usize + 8].copy_from_slice(&heap.to_le_bytes());
        image[COUNT as usize..COUNT as usize + 8]
            .copy_from_slice(&(records.len() as u64).to_le_bytes());
        // Not visible to anyone until a published directory points at it.
        part.write(0, &image)?;
        Ok(())
    }

    pub(super) fn link_new(&self, child: u64) -> Result<BlockHandle, DsError> {
        match self.obj.link(child)? {
            Some(p) => {
                self.parts
                    .lock()
                    .insert(child, super::CachedPart::new(p.clone()));
                Ok(p)
            }
            None => Err(self.corrupt(format!(
                "new child {child} was freed before use (a newer fence holder took this repartitioning over)"
            ))),
        }
    }
}
