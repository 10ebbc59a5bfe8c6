//! `Kv`: a hash table over one-sided operations whose partitions split and merge.

mod batch;
mod bucket;
mod cache;
mod lock;
mod record;
mod repart;
mod root;
mod scan;
mod scavenge;
mod write;

pub use cache::{fuzz_validate as fuzz_cached_validate, KvCacheStats, DEFAULT_CACHE_CAPACITY};
pub use lock::{fuzz_repair, KvLockStats};
pub use repart::{FaultAction, FaultPoint};
pub use root::fuzz_intent;
pub use scavenge::KvScavenged;

use super::notify::{EventKind, Publisher};
use super::object::{Entry, Object};
use super::{decode_id, encode_id, is_stale, DsError};
use crate::client::{BlockHandle, Client, ClientError, Task};
use crate::proto::PoolPath;
use bucket::{Bucket, BUCKET_BYTES, FROZEN, SLOTS, SLOTS_AT, UNLOCKED};
use cache::{Cached, Location, LocationCache};
use lock::Held;
use parking_lot::{Mutex, RwLock};
use record::{
    decode, encode, value_name, value_sum, Decoded, Record, Value, REC_HEADER, REMOTE_REF,
};
use siphasher::sip::SipHasher13;
use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"FPKVTAB3");
// Meta words.
const BUCKETS: u64 = 8;
const GMAX: u64 = 16;
/// Next unused child index for partitions and directory blocks (FAA).
const NEXT: u64 = 24;
/// Split threshold, in thousandths of a partition's slots.
const SPLIT_PERMILLE: u64 = 32;
/// Merge threshold, in thousandths of a partition's slots.
const MERGE_PERMILLE: u64 = 40;
/// Bucket lock timeout in ms (0 in tables created before it: the default).
const LOCK_TIMEOUT_MS: u64 = 48;
/// Largest directory: 2^10 partitions.
const MAX_G: u32 = 10;
// Map block (child 0): the root word (see `root.rs`); directory blocks: an intent,
// then 2^G entries `child << 8 | depth` from `MAP_HEADER`.
const MAP_HEADER: u64 = repart::DIR_ENTRIES;
// Partition blocks.
const HEAP: u64 = 0;
const COUNT: u64 = 8;
const PART_HEADER: u64 = 64;
use repart::REPARTITION_WAIT;

/// Settings of a new hash table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvConfig {
    /// Expected bytes per key-value record (key + value + 8), used to divide each
    /// partition block between buckets (7 slots each) and record space.
    pub expected_record: u64,
    /// A partition splits when this fraction of its slots is used (or a bucket or its
    /// record space is full). In `(0, 1]`; default 0.95.
    pub split_load: f64,
    /// A partition merges with its buddy when both together use at most this fraction
    /// of one partition's slots. In `[0, split_load / 2)`; default 0.05.
    pub merge_load: f64,
    /// How long a bucket lock may be held before other writers take it over (its
    /// holder is presumed dead) and repair the bucket; a holder stops writing after
    /// half of it. Fixed at creation so every client applies the same one; clients'
    /// clocks must differ by less than half of it (NTP). 2 ms to 1 h; default 2 s.
    pub lock_timeout: Duration,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            expected_record: 64,
            split_load: 0.95,
            merge_load: 0.05,
            lock_timeout: lock::DEFAULT_LOCK_TIMEOUT,
        }
    }
}

/// Repartitionings one [`Kv`] handle carried out (see [`Kv::repartitions`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvRepartitions {
    /// Partitions split in two.
    pub splits: u64,
    /// Pairs of buddy partitions merged into one.
    pub merges: u64,
    /// Partitions rewritten to reclaim record space left by replaced values (or
    /// copied in place because a merge did not fit or a split had no level left).
    pub compactions: u64,
    /// Repartitionings this handle started and found taken over by a client with a
    /// newer fence token (its work was discarded, the other client's published).
    pub superseded: u64,
}

/// What a write does when the key is present or absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only when absent.
    Insert,
    /// Only when present.
    Update,
    /// Either way.
    Upsert,
}

/// What a remove did.
struct Removed {
    /// Keys left in the partition.
    count: u64,
    /// The removed value's nonce, if it was remote.
    old: Option<u64>,
}

/// What a delete did under the bucket lock.
enum Deleted {
    /// The key was there and is gone (its value was remote under this nonce).
    Gone(Option<u64>),
    Absent,
    /// Our lock got too old to WRITE under (we stalled); nothing was written.
    Expired,
}

/// What a write did under the bucket lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locked {
    Inserted,
    /// Replaced a value (remote in the block named by this nonce), pointing the slot
    /// at a new record.
    Replaced(Option<u64>),
    /// Replaced a value by rewriting its record in place (same size; the old value was
    /// remote in the block named by this nonce).
    InPlace(Option<u64>),
    Unchanged,
    /// The bucket has no free slot.
    Full,
    /// Our lock got too old to WRITE under (we stalled); nothing was written.
    Expired,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrote {
    /// A new key went in; the partition now holds this many keys.
    Inserted(u64),
    /// The value was replaced (the old one was remote under this nonce).
    Replaced(Option<u64>),
    /// Nothing changed (the mode did not allow it).
    Unchanged,
}

/// A hash table in the pool, shared by every client that opens it.
///
/// Keys hash to partitions (one block each) through a directory of up to 1024
/// entries; a partition splits in two when its load passes [`KvConfig::split_load`]
/// (or a bucket or its record space is full), and merges with its buddy when both
/// together are below [`KvConfig::merge_load`]. Reads take no lock and two round trips,
/// or one when the handle's location cache knows where the key's record is (the bucket
/// and the record are then READ together and the record is accepted only if the bucket
/// still points at it); writers lock one bucket (a CAS) and update records out of place.
///
/// Linearizable: every `get` returns the value of the latest `put`/`delete` of that
/// key that completed before it started, or of one concurrent with it.
pub struct Kv {
    obj: Object,
    map_block: BlockHandle,
    g: u32,
    buckets: u64,
    heap_start: u64,
    split_at: u64,
    merge_at: u64,
    map: RwLock<Map>,
    parts: Mutex<HashMap<u64, CachedPart>>,
    splits: AtomicU64,
    merges: AtomicU64,
    compactions: AtomicU64,
    superseded: AtomicU64,
    /// The table's bucket lock timeout, in ms.
    lock_timeout_ms: u64,
    /// Takeovers, repairs and other bucket lock events of this handle.
    locks: lock::LockCounters,
    /// Time to live of the repartitioning fence this handle asks for, in ms.
    fence_ttl_ms: AtomicU64,
    /// Fault-injection point armed by a test.
    fault: Mutex<Option<(FaultPoint, FaultAction)>>,
    /// Whether a fault was ever armed (spares the fast path the mutex).
    fault_armed: AtomicBool,
    /// Publishes puts and removes to listeners.
    notify: Publisher,
    /// Where keys' records were last seen, for one-round-trip gets.
    cache: LocationCache,
}

/// A partition this handle has used: its block, and record space this handle
/// reserved in it and has not used yet (`next..end`).
struct CachedPart {
    handle: BlockHandle,
    space: (u64, u64),
}

impl CachedPart {
    fn new(handle: BlockHandle) -> Self {
        Self {
            handle,
            space: (0, 0),
        }
    }
}

/// A cached copy of the partition directory.
#[derive(Debug, Clone, Default)]
struct Map {
    version: u64,
    entries: Vec<u64>,
}

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    child: u64,
    depth: u32,
    prefix: u64,
    version: u64,
}

/// Bound on immediate retries of one operation (each follows a concurrent change).
const MAX_RETRIES: u32 = 10_000;

/// What looking a key up among a bucket's slots found.
enum Found {
    /// The key, in this slot, with its record.
    Key(usize, Record),
    /// The key is not there.
    Absent,
    /// A candidate record failed its checksum: it is being rewritten (or damaged).
    Torn,
}

/// A bucket's slots as read under its lock, and the slot holding the key looked up
/// (with its record), if any.
type Lookup = ([u64; SLOTS], Option<(usize, Record)>);

/// Outcome of one attempt against a partition.
enum Attempt<T> {
    Done(T),
    /// The partition is being replaced: reload the map.
    Moved,
    /// The partition (or the key's bucket) is full: split it.
    Full,
    /// Something changed underneath (a remote value was replaced): try again.
    Retry,
}

impl Kv {
    /// Creates the table `name` under the task's path (or opens it if it exists).
    pub fn create(task: &Task, name: &str, config: KvConfig) -> Result<Kv, DsError> {
        Self::create_at(task.client(), task.path().join(name)?.as_str(), config)
    }

    /// Creates the table at the absolute `path` (or opens it if it exists; then the
    /// existing table's configuration applies).
    pub fn create_at(client: &Client, path: &str, config: KvConfig) -> Result<Kv, DsError> {
        let path = PoolPath::parse(path)?;
        let rec = config.expected_record.max(16);
        let (split, merge) = (config.split_load, config.merge_load);
        if !(split > 0.0 && split <= 1.0 && merge >= 0.0 && merge < split / 2.0) {
            return Err(DsError::Config(format!(
                "split_load {split} must be in (0, 1] and merge_load {merge} in [0, split_load / 2)"
            )));
        }
        let split = (split * 1000.0).round() as u64;
        let merge = (merge * 1000.0).round() as u64;
        let timeout = u64::try_from(config.lock_timeout.as_millis()).unwrap_or(u64::MAX);
        if !lock::LOCK_TIMEOUT_RANGE.contains(&timeout) {
            return Err(DsError::Config(format!(
                "lock_timeout {:?} must be between 2 ms and 1 h",
                config.lock_timeout
            )));
        }
        let obj = Object::create(client, path, "kv table", MAGIC, "p", |len| {
            let buckets = len.saturating_sub(PART_HEADER) / (BUCKET_BYTES + SLOTS as u64 * rec);
            if buckets < 1 {
                return Err(DsError::Config(format!(
                    "a block of {len} bytes cannot hold a bucket and records of {rec} bytes; use a smaller expected_record"
                )));
            }
            let g = ((len.saturating_sub(MAP_HEADER) / 8).max(1).ilog2()).min(MAX_G);
            Ok(vec![
                (BUCKETS, buckets),
                (GMAX, u64::from(g)),
                (SPLIT_PERMILLE, split),
                (MERGE_PERMILLE, merge),
                (LOCK_TIMEOUT_MS, timeout),
            ])
        })?;
        Self::from_object(obj)
    }

    /// Opens the table at `path`.
    pub fn open(client: &Client, path: &str) -> Result<Kv, DsError> {
        let path = PoolPath::parse(path)?;
        let obj = Object::open(client, path, "kv table", MAGIC, "p")?;
        Self::from_object(obj)
    }

    fn from_object(obj: Object) -> Result<Kv, DsError> {
        let buckets = obj.word(BUCKETS)?;
        let g = obj.word(GMAX)?;
        let (split, merge) = (obj.word(SPLIT_PERMILLE)?, obj.word(MERGE_PERMILLE)?);
        let lock_timeout_ms = match obj.word(LOCK_TIMEOUT_MS)? {
            0 => lock::DEFAULT_LOCK_TIMEOUT.as_millis() as u64,
            t if lock::LOCK_TIMEOUT_RANGE.contains(&t) => t,
            t => {
                return Err(DsError::Corrupt {
                    path: obj.path().clone(),
                    what: format!("lock timeout {t} ms"),
                })
            }
        };
        let len = obj.block_len();
        if split == 0 || split > 1000 || merge * 2 >= split {
            return Err(DsError::Corrupt {
                path: obj.path().clone(),
                what: format!("split threshold {split}‰, merge threshold {merge}‰"),
            });
        }
        let heap_start = buckets
            .checked_mul(BUCKET_BYTES)
            .and_then(|b| b.checked_add(PART_HEADER))
            .filter(|&h| h < len && buckets > 0);
        let (Some(heap_start), true) = (
            heap_start,
            (1..=u64::from(MAX_G)).contains(&g) && MAP_HEADER + (8 << g) <= len,
        ) else {
            return Err(DsError::Corrupt {
                path: obj.path().clone(),
                what: format!("{buckets} buckets, directory depth {g}, blocks of {len} bytes"),
            });
        };
        let Some(map_block) = obj.link(0)? else {
            return Err(DsError::Corrupt {
                path: obj.path().clone(),
                what: "the partition map block was freed".into(),
            });
        };
        let kv = Kv {
            notify: Publisher::new(&obj, obj.client()),
            obj,
            map_block,
            g: g as u32,
            buckets,
            heap_start,
            split_at: (buckets * SLOTS as u64 * split / 1000).max(1),
            merge_at: buckets * SLOTS as u64 * merge / 1000,
            map: RwLock::new(Map::default()),
            parts: Mutex::new(HashMap::new()),
            splits: AtomicU64::new(0),
            merges: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            lock_timeout_ms,
            locks: lock::LockCounters::default(),
            fence_ttl_ms: AtomicU64::new(repart::FENCE_TTL.as_millis() as u64),
            fault: Mutex::new(None),
            cache: LocationCache::new(DEFAULT_CACHE_CAPACITY),
            fault_armed: AtomicBool::new(false),
        };
        kv.reload()?;
        Ok(kv)
    }

    /// The table's path.
    pub fn path(&self) -> &PoolPath {
        self.obj.path()
    }

    /// The splits, merges and compactions this handle published (not other handles'
    /// or other clients'): sum them over every handle to count a table's
    /// repartitionings.
    pub fn repartitions(&self) -> KvRepartitions {
        KvRepartitions {
            splits: self.splits.load(Ordering::Relaxed),
            merges: self.merges.load(Ordering::Relaxed),
            compactions: self.compactions.load(Ordering::Relaxed),
            superseded: self.superseded.load(Ordering::Relaxed),
        }
    }

    /// How long the controller fence this handle takes to repartition lasts unless
    /// renewed (default 2 s). When the handle's client dies mid-repartition, other
    /// clients take the work over after this long.
    pub fn set_fence_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.fence_ttl_ms.store(ms, Ordering::Relaxed);
    }

    /// Arms a fault for this handle's next repartitioning or bucket critical section
    /// that reaches `at`: stop there as a crashed client would (no unlock, no fence
    /// release), or pause. For crash-safety tests.
    pub fn inject_fault(&self, at: FaultPoint, action: FaultAction) {
        *self.fault.lock() = Some((at, action));
        self.fault_armed.store(true, Ordering::Relaxed);
    }

    /// Number of partitions in the current map.
    pub fn partitions(&self) -> Result<usize, DsError> {
        self.reload()?;
        let map = self.map.read();
        let mut kids: Vec<u64> = map.entries.iter().map(|e| e >> 8).collect();
        kids.sort_unstable();
        kids.dedup();
        Ok(kids.len())
    }

    /// Which partition (a child index of the table, stable until that partition is
    /// split, merged or compacted) holds `key`, as this handle's map says. For
    /// diagnostics and benchmarks that must aim at one partition.
    pub fn partition_of(&self, key: &[u8]) -> Result<u64, DsError> {
        Ok(self.route(hash(key))?.child)
    }

    /// Which partition (as [`Kv::partition_of`]) and which bucket (its byte offset in
    /// the partition block) hold `key`, as this handle's map says. For diagnostics and
    /// tests that must aim at one bucket.
    pub fn bucket_of(&self, key: &[u8]) -> Result<(u64, u64), DsError> {
        let h = hash(key);
        Ok((self.route(h)?.child, self.bucket_off(h)))
    }

    /// The value stored under `key`. One round trip when this handle's location cache
    /// knows where the key's record is and the record is still there (see
    /// [`Kv::cache_stats`]), two otherwise.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DsError> {
        let h = hash(key);
        if let Cached::Hit(value) = self.cached_lookup(h, key) {
            if let Attempt::Done(v) = self.resolve(value)? {
                return Ok(v);
            }
        }
        self.get_uncached(h, key)
    }

    /// `get` through the bucket (two round trips), refreshing the location cache.
    fn get_uncached(&self, h: u64, key: &[u8]) -> Result<Option<Vec<u8>>, DsError> {
        self.retry(h, |part, child| self.try_get(part, child, h, key))
    }

    /// Whether `key` is present (one round trip when the location cache knows the
    /// key's record; a value in a block of its own is not fetched then).
    pub fn exists(&self, key: &[u8]) -> Result<bool, DsError> {
        let h = hash(key);
        if let Cached::Hit(_) = self.cached_lookup(h, key) {
            return Ok(true);
        }
        Ok(self.get_uncached(h, key)?.is_some())
    }

    /// How many gets of this handle were answered in one round trip from its location
    /// cache, fell back to two after a failed validation, or missed the cache.
    pub fn cache_stats(&self) -> KvCacheStats {
        self.cache.stats()
    }

    /// Sets how many key locations this handle caches (default
    /// [`DEFAULT_CACHE_CAPACITY`], rounded up to a multiple of 64; 0 turns the cache
    /// off). Drops the cached entries.
    pub fn set_cache_capacity(&self, entries: usize) {
        self.cache.set_capacity(entries);
    }

    /// Inserts `key` with `value` if it is absent; returns whether it did (an
    /// existing value is left alone).
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<bool, DsError> {
        Ok(self.write(key, value, Mode::Insert)? != Wrote::Unchanged)
    }

    /// Replaces the value of `key` if it is present; returns whether it did.
    pub fn update(&self, key: &[u8], value: &[u8]) -> Result<bool, DsError> {
        Ok(self.write(key, value, Mode::Update)? != Wrote::Unchanged)
    }

    /// Stores `value` under `key`, inserting or replacing.
    pub fn upsert(&self, key: &[u8], value: &[u8]) -> Result<(), DsError> {
        self.write(key, value, Mode::Upsert).map(|_| ())
    }

    /// How often this handle re-reads whether anyone listens to the table (default
    /// [`super::DEFAULT_REFRESH`]); listeners must be configured with at least the
    /// longest interval of any writer ([`super::ListenerConfig::writer_refresh`]).
    pub fn set_notify_refresh(&self, refresh: Duration) {
        self.notify.set_refresh(refresh);
    }

    /// A write, then (when it changed the table) its Put event.
    fn write(&self, key: &[u8], value: &[u8], mode: Mode) -> Result<Wrote, DsError> {
        let h = hash(key);
        let inline_max = self.inline_max();
        if REC_HEADER + key.len() + REMOTE_REF > inline_max {
            return Err(DsError::ItemTooLarge {
                len: key.len(),
                max: inline_max - REC_HEADER - REMOTE_REF,
            });
        }
        let val = if REC_HEADER + key.len() + value.len() <= inline_max {
            Value::Inline(value.to_vec())
        } else {
            self.store_value(value)?
        };
        let ours = val.remote();
        let rec = encode(key, &val)?;
        let wrote = match self.retry(h, |part, child| {
            self.try_write(part, child, h, key, &rec, mode)
        }) {
            Ok(w) => w,
            Err(e) => {
                // Best effort: the value block is reclaimed with the table anyway.
                let _ = self.drop_value(ours);
                return Err(e);
            }
        };
        // The write is complete here; the clean-up and split after it do not change
        // what it did, so its event is published even when they fail.
        let after = match wrote {
            Wrote::Inserted(count) if count >= self.split_at => {
                self.route(h).and_then(|route| self.split(route))
            }
            Wrote::Inserted(_) => Ok(()),
            Wrote::Replaced(old) => self.drop_value(old),
            Wrote::Unchanged => self.drop_value(ours),
        };
        if wrote != Wrote::Unchanged {
            self.notify.publish(EventKind::Put, key)?;
        }
        after?;
        Ok(wrote)
    }

    /// Largest record kept in a partition; larger values get a block of their own.
    fn inline_max(&self) -> usize {
        (((self.obj.block_len() - self.heap_start) / 8) as usize).max(64)
    }

    /// Writes `value` to a block of its own (before any record points at it).
    fn store_value(&self, value: &[u8]) -> Result<Value, DsError> {
        if value.len() as u64 > self.obj.block_len() {
            return Err(DsError::ItemTooLarge {
                len: value.len(),
                max: self.obj.block_len() as usize,
            });
        }
        let nonce = rand::random::<u64>();
        let block = self
            .obj
            .alloc_named(&value_name(nonce), value.len() as u64)?;
        if let Err(e) = block.write(0, value) {
            let _ = self.drop_value(Some(nonce));
            return Err(e.into());
        }
        Ok(Value::Remote {
            nonce,
            block: encode_id(block.id()),
            len: value.len() as u64,
            sum: value_sum(nonce, value),
        })
    }

    /// Removes `key`; returns whether it was present.
    pub fn remove(&self, key: &[u8]) -> Result<bool, DsError> {
        let h = hash(key);
        let removed = self.retry(h, |part, _| self.try_delete(part, h, key));
        self.cache.remove(h);
        let removed = removed?;
        match removed {
            Some(Removed { count, old }) => {
                // Removed; the clean-up and merge after it do not change that, so the
                // event is published even when they fail.
                let after = self.drop_value(old).and_then(|()| {
                    if count <= self.merge_at {
                        let route = self.route(h)?;
                        self.merge(route)?;
                    }
                    Ok(())
                });
                self.notify.publish(EventKind::Remove, key)?;
                after?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Removes the table and frees its blocks. Other clients' handles stop working.
    pub fn destroy(self) -> Result<(), DsError> {
        self.obj.destroy()
    }

    /// Runs `op` against the partition of hash `h`, reloading the map and splitting
    /// as the attempts ask.
    fn retry<T>(
        &self,
        h: u64,
        op: impl Fn(&BlockHandle, u64) -> Result<Attempt<T>, DsError>,
    ) -> Result<T, DsError> {
        let mut retries = 0u32;
        loop {
            let route = self.route(h)?;
            let Some(part) = self.partition(route.child)? else {
                self.reload_after(route.version)?;
                continue;
            };
            match op(&part, route.child) {
                Ok(Attempt::Done(v)) => return Ok(v),
                Ok(Attempt::Moved) => self.reload_after(route.version)?,
                Ok(Attempt::Full) => self.split(route)?,
                Ok(Attempt::Retry) => {
                    retries += 1;
                    if retries > MAX_RETRIES {
                        return Err(self
                            .corrupt("a record or value block keeps failing its checksum".into()));
                    }
                }
                Err(DsError::Client(e)) if is_stale(&e) => {
                    self.parts.lock().remove(&route.child);
                    self.reload_after(route.version)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_get(
        &self,
        part: &BlockHandle,
        child: u64,
        h: u64,
        key: &[u8],
    ) -> Result<Attempt<Option<Vec<u8>>>, DsError> {
        let b = self.bucket_off(h);
        let bucket = self.read_bucket(part, b)?;
        if bucket.lock == FROZEN {
            return Ok(Attempt::Moved);
        }
        match self.find(part, h, key, &bucket.slots)? {
            Found::Absent => Ok(Attempt::Done(None)),
            Found::Key(i, rec) => {
                let word = bucket.slots[i];
                self.cache.insert(
                    h,
                    Location {
                        child,
                        bucket: b,
                        word,
                    },
                );
                self.resolve(rec.value)
            }
            Found::Torn => Ok(Attempt::Retry),
        }
    }

    /// The value a record holds: inline, or fetched from its own block (`Retry` when
    /// that block was replaced meanwhile).
    fn resolve(&self, value: Value) -> Result<Attempt<Option<Vec<u8>>>, DsError> {
        match value {
            Value::Inline(v) => Ok(Attempt::Done(Some(v))),
            Value::Remote {
                nonce,
                block,
                len,
                sum,
            } => Ok(match self.fetch(nonce, block, len, sum)? {
                Some(v) => Attempt::Done(Some(v)),
                None => Attempt::Retry,
            }),
        }
    }

    /// Reads bucket `b` without a lock: one READ, repeated while it races a writer
    /// (its checksum does not match). Bounded: a bucket that never validates is
    /// reported as damaged.
    fn read_bucket(&self, part: &BlockHandle, b: u64) -> Result<Bucket, DsError> {
        let deadline = Instant::now() + REPARTITION_WAIT + self.lock_timeout();
        loop {
            let mut buf = [0u8; BUCKET_BYTES as usize];
            part.read(b, &mut buf)?;
            if let Some(bucket) = bucket::decode(b, &buf) {
                return Ok(bucket);
            }
            // Torn for good by a writer that died on shm or verbs: repair it.
            self.repair_abandoned(part, b, &buf)?;
            if Instant::now() > deadline {
                return Err(self.corrupt(format!(
                    "bucket at offset {b} has failed its checksum for over 10 s"
                )));
            }
            std::thread::yield_now();
        }
    }

    /// Reads a remote value; `None` when its block is gone (replaced meanwhile).
    fn fetch(
        &self,
        nonce: u64,
        block: u64,
        len: u64,
        sum: u64,
    ) -> Result<Option<Vec<u8>>, DsError> {
        let Some(h) = self
            .obj
            .lookup_named(&value_name(nonce), decode_id(block))?
        else {
            return Ok(None);
        };
        let len =
            usize::try_from(len).map_err(|_| self.corrupt(format!("value of {len} bytes")))?;
        let mut buf = vec![0u8; len];
        match h.read(0, &mut buf) {
            Ok(()) => Ok((value_sum(nonce, &buf) == sum).then_some(buf)),
            Err(e) if is_stale(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Frees a remote value's block (after nothing points at it any more).
    fn drop_value(&self, nonce: Option<u64>) -> Result<(), DsError> {
        match nonce {
            Some(n) => self.obj.remove_named(&value_name(n)),
            None => Ok(()),
        }
    }

    /// The slot holding `key` among `slots`, with its record. Records change only
    /// under their bucket's lock (rewritten in place with a checksum), so a lock-free
    /// reader may find one torn and must look again.
    fn find(
        &self,
        part: &BlockHandle,
        h: u64,
        key: &[u8],
        slots: &[u64],
    ) -> Result<Found, ClientError> {
        let cands = self.candidates(part, h, slots);
        if cands.is_empty() {
            return Ok(Found::Absent);
        }
        let mut bufs: Vec<Vec<u8>> = cands.iter().map(|c| vec![0u8; c.2 as usize]).collect();
        let mut ops = cands
            .iter()
            .zip(bufs.iter_mut())
            .map(|(c, buf)| part.read_op(c.1, buf))
            .collect::<Result<Vec<_>, _>>()?;
        part.execute(&mut ops)?;
        drop(ops);
        let mut torn = false;
        for (c, buf) in cands.iter().zip(bufs) {
            match decode(&buf) {
                Decoded::Record(rec) if rec.key == key => return Ok(Found::Key(c.0, rec)),
                Decoded::Record(_) => {}
                Decoded::Bad => torn = true,
            }
        }
        Ok(if torn { Found::Torn } else { Found::Absent })
    }

    /// The slots among `slots` whose fingerprint matches hash `h`, as
    /// `(slot, record offset, record length)`.
    fn candidates(&self, part: &BlockHandle, h: u64, slots: &[u64]) -> Vec<(usize, u64, u64)> {
        let fp = fingerprint(h);
        slots
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s != 0 && (s >> 48) & 0x7FFF == fp)
            .map(|(i, &s)| {
                let (off, len) = slot_place(s);
                (i, off, len)
            })
            .filter(|&(_, off, len)| off >= self.heap_start && off + len <= part.len())
            .collect()
    }

    fn bucket_off(&self, h: u64) -> u64 {
        PART_HEADER + ((h & 0xFFFF_FFFF) % self.buckets) * BUCKET_BYTES
    }

    fn route(&self, h: u64) -> Result<Route, DsError> {
        let map = self.map.read();
        let e = (h >> (64 - self.g)) as usize;
        let word = map.entries.get(e).copied().unwrap_or(0);
        let depth = (word & 0xFF) as u32;
        if word >> 8 == 0 || depth > self.g {
            return Err(self.corrupt(format!("directory entry {e} is {word:#x}")));
        }
        Ok(Route {
            child: word >> 8,
            depth,
            prefix: if depth == 0 { 0 } else { h >> (64 - depth) },
            version: map.version,
        })
    }

    fn partition(&self, child: u64) -> Result<Option<BlockHandle>, DsError> {
        if let Some(p) = self.parts.lock().get(&child) {
            return Ok(Some(p.handle.clone()));
        }
        let handle = match self.obj.entry(child)? {
            Entry::Linked(id) => self.obj.child_handle(child, id)?,
            Entry::Empty | Entry::Freed => None,
        };
        if let Some(p) = &handle {
            self.parts
                .lock()
                .entry(child)
                .or_insert_with(|| CachedPart::new(p.clone()));
        }
        Ok(handle)
    }

    fn corrupt(&self, what: String) -> DsError {
        DsError::Corrupt {
            path: self.obj.path().clone(),
            what,
        }
    }

    fn stuck(&self) -> DsError {
        DsError::Corrupt {
            path: self.obj.path().clone(),
            what: "the partition map has been locked for repartitioning for over 10 s; the client doing it probably crashed (recreate the table)".into(),
        }
    }
}

fn hash(key: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6661_7270_6f6f_6c6b, 0x7620_6861_7368_2121);
    h.write(key);
    h.finish()
}

fn fingerprint(h: u64) -> u64 {
    (h >> 32) & 0x7FFF
}

/// Offset and length of the record slot word `s` points at.
fn slot_place(s: u64) -> (u64, u64) {
    ((s & 0xFFFF_FFFF) * 8, ((s >> 32) & 0xFFFF) * 8)
}

/// A slot pointing at the record at `off` of `len` bytes (both multiples of 8).
fn slot_word(off: u64, len: u64, h: u64) -> u64 {
    (fingerprint(h) << 48) | ((len / 8) << 32) | (off / 8)
}

/// The little-endian 64-bit words of `bytes`, as READ from a block (whole words only).
fn le_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_le_bytes(w)
    })
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("path", self.obj.path())
            .field("buckets", &self.buckets)
            .field("max_depth", &self.g)
            .finish()
    }
}
