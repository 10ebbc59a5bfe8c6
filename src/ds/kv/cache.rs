//! The location cache of a [`Kv`] handle: where a key's record was last seen, so that a
//! `get` can READ the key's bucket and its record in one round trip instead of two.
//!
//! An entry maps a key's 64-bit hash to the partition (child index) it was routed to,
//! the bucket's offset and the slot word last seen for the key there (which names the
//! record's offset and length). Entries are filled by every operation that learns a
//! key's slot word (a get that found the record, a write that published it) and dropped
//! by removes and by failed validations. Nothing in the cache is trusted: the fast path
//! accepts a record only after the bucket READ in the same round trip shows that the
//! slot still holds the cached word (see [`validate`] and `docs/DATA_STRUCTURES.md`,
//! "Kv", *Cached gets*).
//!
//! The table is bounded: [`SHARDS`] shards under their own `parking_lot` mutex, each a
//! set-associative array of [`WAYS`]-entry sets, allocated on first use. A full set
//! evicts round robin, so inserting never allocates beyond the configured capacity.

use super::bucket::{self, Bucket, BUCKET_BYTES, FROZEN};
use super::record::{decode, Decoded, Value};
use super::{slot_place, Kv};
use crate::client::BlockHandle;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Entries a new handle's location cache holds (see [`Kv::set_cache_capacity`]).
pub const DEFAULT_CACHE_CAPACITY: usize = 65_536;
/// Independently locked parts of the cache.
const SHARDS: usize = 16;
/// Entries per set (a key can live in any way of its set).
const WAYS: usize = 4;

/// Where a key's record was last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    /// The partition (child index of the table) the key was routed to.
    pub child: u64,
    /// Offset of the key's bucket in that partition.
    pub bucket: u64,
    /// The slot word the bucket held for the key (record offset and length).
    pub word: u64,
}

/// What the cache of a [`Kv`] handle did so far (see [`Kv::cache_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCacheStats {
    /// Lookups answered by the one-round-trip path.
    pub hits: u64,
    /// Lookups whose cached location failed validation (or whose READs failed), which
    /// then took the two-round-trip path.
    pub fallbacks: u64,
    /// Lookups of keys the cache did not hold.
    pub misses: u64,
    /// Entries held now.
    pub entries: u64,
    /// Most entries the cache holds.
    pub capacity: u64,
}

/// One shard: `sets * WAYS` entries (empty until the first insert), and the way the
/// next eviction in a full set takes.
#[derive(Default)]
struct Shard {
    entries: Vec<Option<(u64, Location)>>,
    hand: usize,
}

/// A bounded map from key hashes to [`Location`]s.
pub(super) struct LocationCache {
    shards: Vec<Mutex<Shard>>,
    /// Entries per shard (a multiple of [`WAYS`]); 0 disables the cache.
    per_shard: AtomicUsize,
    hits: AtomicU64,
    fallbacks: AtomicU64,
    misses: AtomicU64,
}

impl LocationCache {
    /// A cache of at most `capacity` entries, rounded up to a multiple of
    /// `SHARDS * WAYS` (64); 0 disables it.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: AtomicUsize::new(per_shard(capacity)),
            hits: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Changes the capacity (rounded as in [`LocationCache::new`]); drops every entry.
    pub fn set_capacity(&self, capacity: usize) {
        self.per_shard.store(per_shard(capacity), Ordering::Relaxed);
        for s in &self.shards {
            *s.lock() = Shard::default();
        }
    }

    /// Most entries the cache holds.
    pub fn capacity(&self) -> usize {
        self.per_shard.load(Ordering::Relaxed) * SHARDS
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().entries.iter().filter(|e| e.is_some()).count())
            .sum()
    }

    /// The location cached for hash `h`.
    pub fn get(&self, h: u64) -> Option<Location> {
        let shard = self.shards[shard_of(h)].lock();
        let set = set_of(h, shard.entries.len())?;
        shard.entries[set]
            .iter()
            .flatten()
            .find(|(k, _)| *k == h)
            .map(|&(_, loc)| loc)
    }

    /// Caches `loc` for hash `h`, replacing the key's entry, else taking a free way of
    /// its set, else evicting one (round robin).
    pub fn insert(&self, h: u64, loc: Location) {
        let per = self.per_shard.load(Ordering::Relaxed);
        if per == 0 {
            return;
        }
        let mut shard = self.shards[shard_of(h)].lock();
        if shard.entries.len() != per {
            shard.entries = vec![None; per];
        }
        let Some(set) = set_of(h, per) else {
            return;
        };
        let start = set.start;
        let ways = &mut shard.entries[set];
        let way = ways
            .iter()
            .position(|e| e.is_some_and(|(k, _)| k == h))
            .or_else(|| ways.iter().position(Option::is_none));
        let way = match way {
            Some(w) => w,
            None => {
                shard.hand = (shard.hand + 1) % WAYS;
                shard.hand
            }
        };
        shard.entries[start + way] = Some((h, loc));
    }

    /// Drops the entry of hash `h`.
    pub fn remove(&self, h: u64) {
        self.remove_where(h, |_| true);
    }

    /// Drops the entry of hash `h` if it still is `loc` (a newer one filled meanwhile
    /// stays).
    pub fn remove_if(&self, h: u64, loc: Location) {
        self.remove_where(h, |l| l == loc);
    }

    fn remove_where(&self, h: u64, keep_unless: impl Fn(Location) -> bool) {
        let mut shard = self.shards[shard_of(h)].lock();
        let Some(set) = set_of(h, shard.entries.len()) else {
            return;
        };
        for e in &mut shard.entries[set] {
            if e.is_some_and(|(k, l)| k == h && keep_unless(l)) {
                *e = None;
            }
        }
    }

    /// Counts a lookup answered in one round trip.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a lookup whose cached location did not hold up.
    pub fn fallback(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a lookup of a key not cached.
    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters and the current size.
    pub fn stats(&self) -> KvCacheStats {
        KvCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.len() as u64,
            capacity: self.capacity() as u64,
        }
    }
}

/// Entries per shard for a total `capacity`.
fn per_shard(capacity: usize) -> usize {
    capacity.div_ceil(SHARDS).next_multiple_of(WAYS)
}

fn shard_of(h: u64) -> usize {
    // Bits 48..52: independent of the low bits that pick the bucket and of the top bits
    // that pick the partition, so keys of one bucket spread over shards too.
    ((h >> 48) as usize) % SHARDS
}

/// The entries of `h`'s set in a shard of `len` entries.
fn set_of(h: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let sets = len / WAYS;
    if sets == 0 {
        return None;
    }
    let set = (h.rotate_left(20) % sets as u64) as usize;
    Some(set * WAYS..set * WAYS + WAYS)
}

/// Why a cached location was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reject {
    /// The bucket READ failed its checksum (it raced a writer's rewrite of the slots).
    TornBucket,
    /// The bucket is frozen: its partition is being replaced.
    Frozen,
    /// No slot of the bucket holds the cached word any more (the key was updated out
    /// of place, removed, or moved).
    Moved,
    /// The record READ failed its checksum (an in-place rewrite was in progress).
    TornRecord,
    /// The record holds another key (a 64-bit hash collision).
    OtherKey,
}

/// Checks a bucket and a record READ together (in any order) against the cached
/// location `loc` of `key`; the record's value when every check passes:
/// the bucket validates, is not frozen and holds `loc.word` in some slot; the record
/// validates and holds `key`. Pure: the I/O is in [`Kv::cached_lookup`].
pub(super) fn validate(
    loc: Location,
    bucket_raw: &[u8; BUCKET_BYTES as usize],
    record_raw: &[u8],
    key: &[u8],
) -> Result<Value, Reject> {
    let Some(Bucket { lock, slots }) = bucket::decode(loc.bucket, bucket_raw) else {
        return Err(Reject::TornBucket);
    };
    if lock == FROZEN {
        return Err(Reject::Frozen);
    }
    if !slots.contains(&loc.word) {
        return Err(Reject::Moved);
    }
    match decode(record_raw) {
        Decoded::Record(r) if r.key == key => Ok(r.value),
        Decoded::Record(_) => Err(Reject::OtherKey),
        Decoded::Bad => Err(Reject::TornRecord),
    }
}

/// What the one-round-trip path made of a key.
pub(super) enum Cached {
    /// The key's value (or its reference), validated.
    Hit(Value),
    /// Not cached, or the cached location did not hold up: take the normal path.
    Miss,
}

/// A key the batched fast path reads: its index, hash, location, partition and the
/// record's offset and length there.
pub(super) struct Probe {
    pub at: usize,
    pub h: u64,
    pub loc: Location,
    pub part: BlockHandle,
    pub rec: (u64, usize),
}

impl Kv {
    /// The partition `loc` names if it is still where this handle's map routes `h`
    /// and this handle has it open (no extra round trip); `None` otherwise.
    fn cached_part(&self, h: u64, loc: Location) -> Option<BlockHandle> {
        let route = self.route(h).ok()?;
        if route.child != loc.child {
            return None;
        }
        self.parts.lock().get(&loc.child).map(|p| p.handle.clone())
    }

    /// The record's offset and length `loc` names, if they lie in `part`'s record
    /// space.
    fn record_place(&self, part: &BlockHandle, loc: Location) -> Option<(u64, usize)> {
        let (off, len) = slot_place(loc.word);
        (off >= self.heap_start && off + len <= part.len() && len > 0)
            .then_some((off, len as usize))
    }

    /// One round trip: READ the key's bucket and its cached record together and accept
    /// the record only as [`validate`] says. Counts hits, misses and fallbacks, and
    /// drops a location that did not hold up; never fails (any error sends the caller
    /// to the normal path, which reports it).
    pub(super) fn cached_lookup(&self, h: u64, key: &[u8]) -> Cached {
        let Some(loc) = self.cache.get(h) else {
            self.cache.miss();
            return Cached::Miss;
        };
        let Some((part, (off, len))) = self
            .cached_part(h, loc)
            .and_then(|p| self.record_place(&p, loc).map(|r| (p, r)))
        else {
            self.reject(h, loc);
            return Cached::Miss;
        };
        let mut raw = [0u8; BUCKET_BYTES as usize];
        let mut rec = vec![0u8; len];
        let read = (|| {
            let mut ops = [
                part.read_op(loc.bucket, &mut raw)?,
                part.read_op(off, &mut rec)?,
            ];
            part.execute(&mut ops)
        })();
        match read.ok().map(|()| validate(loc, &raw, &rec, key)) {
            Some(Ok(value)) => {
                self.cache.hit();
                Cached::Hit(value)
            }
            _ => {
                self.reject(h, loc);
                Cached::Miss
            }
        }
    }

    /// A cached location that did not hold up: dropped, counted.
    pub(super) fn reject(&self, h: u64, loc: Location) {
        self.cache.remove_if(h, loc);
        self.cache.fallback();
    }

    /// The batched form of [`Kv::cached_lookup`] for [`Kv::get_many`]: one batch of
    /// bucket and record READs (one round trip per memory node) for every key of
    /// `keys` that is cached and not answered yet in `out`. Hits are written to `out`
    /// as `Some(value)`; remote values are resolved; everything else is left `None`.
    pub(super) fn cached_many<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        hashes: &[u64],
        out: &mut [Option<Option<Vec<u8>>>],
    ) -> Result<(), super::DsError> {
        let mut probes = Vec::new();
        for (at, &h) in hashes.iter().enumerate() {
            let Some(loc) = self.cache.get(h) else {
                self.cache.miss();
                continue;
            };
            let place = self
                .cached_part(h, loc)
                .and_then(|p| self.record_place(&p, loc).map(|r| (p, r)));
            match place {
                Some((part, rec)) => probes.push(Probe {
                    at,
                    h,
                    loc,
                    part,
                    rec,
                }),
                None => self.reject(h, loc),
            }
        }
        if probes.is_empty() {
            return Ok(());
        }
        probes.sort_by_key(|p| p.part.transport_key());
        let mut raws = vec![[0u8; BUCKET_BYTES as usize]; probes.len()];
        let mut recs: Vec<Vec<u8>> = probes.iter().map(|p| vec![0u8; p.rec.1]).collect();
        let mut fine = vec![false; probes.len()];
        {
            let handles: Vec<&BlockHandle> =
                probes.iter().flat_map(|p| [&p.part, &p.part]).collect();
            let mut ops = Vec::with_capacity(2 * probes.len());
            for ((p, raw), rec) in probes.iter().zip(raws.iter_mut()).zip(recs.iter_mut()) {
                ops.push(p.part.read_op(p.loc.bucket, raw)?);
                ops.push(p.part.read_op(p.rec.0, rec)?);
            }
            if let Ok(runs) = BlockHandle::execute_many(&handles, &mut ops) {
                for (start, end, result) in runs {
                    if result.is_ok() {
                        fine[start / 2..end.div_ceil(2)]
                            .iter_mut()
                            .for_each(|f| *f = true);
                    }
                }
            }
        }
        for (j, p) in probes.iter().enumerate() {
            let key = keys[p.at].as_ref();
            let checked = fine[j]
                .then(|| validate(p.loc, &raws[j], &recs[j], key))
                .and_then(Result::ok);
            let Some(value) = checked else {
                self.reject(p.h, p.loc);
                continue;
            };
            self.cache.hit();
            if let super::Attempt::Done(v) = self.resolve(value)? {
                out[p.at] = Some(v);
            }
        }
        Ok(())
    }
}

/// Bytes of a fuzz input's head: child, bucket offset and slot word (8 bytes each),
/// then one byte of key length.
const FUZZ_HEAD: usize = 25;

/// A fuzz input taken apart: a location, a key, a bucket image and record bytes.
type FuzzParts<'a> = (Location, &'a [u8], [u8; BUCKET_BYTES as usize], &'a [u8]);

/// Splits a fuzz input into a location, a key, a bucket image and record bytes.
fn fuzz_parts(data: &[u8]) -> Option<FuzzParts<'_>> {
    let head = data.get(..FUZZ_HEAD)?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&head[8 * i..8 * i + 8]);
        u64::from_le_bytes(w)
    };
    let loc = Location {
        child: word(0),
        bucket: word(1),
        word: word(2),
    };
    let rest = &data[FUZZ_HEAD..];
    let klen = usize::from(head[24]).min(rest.len());
    let (key, rest) = rest.split_at(klen);
    let raw: [u8; BUCKET_BYTES as usize] = rest.get(..BUCKET_BYTES as usize)?.try_into().ok()?;
    Some((loc, key, raw, &rest[BUCKET_BYTES as usize..]))
}

/// Fuzzing entry point: a cached location, a key, a bucket image and record bytes
/// (see `fuzz_parts`) through [`validate`]. Any bytes must be accepted or rejected
/// without a panic, and an accepted record must be one the bucket really points at:
/// the bucket decodes, is not frozen, holds the word, and the record holds the key.
/// Panics only on a validation bug.
pub fn fuzz_validate(data: &[u8]) {
    let Some((loc, key, raw, rec)) = fuzz_parts(data) else {
        return;
    };
    if let Ok(value) = validate(loc, &raw, rec, key) {
        let b = bucket::decode(loc.bucket, &raw).expect("accepted bucket decodes");
        assert!(b.lock != FROZEN && b.slots.contains(&loc.word));
        match decode(rec) {
            Decoded::Record(r) => assert!(r.key == key && r.value == value),
            Decoded::Bad => panic!("accepted a record that does not decode"),
        }
    }
}

/// Hash of `key` as the cache and the table use it (for tests).
#[cfg(test)]
fn key_hash(key: &[u8]) -> u64 {
    super::hash(key)
}

#[cfg(test)]
mod tests {
    use super::super::bucket::{LOCKED, SLOTS, UNLOCKED};
    use super::super::record::encode;
    use super::*;

    fn loc(i: u64) -> Location {
        Location {
            child: 1,
            bucket: 64 + 128 * (i % 7),
            word: i + 1,
        }
    }

    #[test]
    fn holds_what_was_inserted_until_removed() {
        let c = LocationCache::new(1024);
        for i in 0..100u64 {
            c.insert(key_hash(&i.to_le_bytes()), loc(i));
        }
        let held = (0..100u64)
            .filter(|i| c.get(key_hash(&i.to_le_bytes())) == Some(loc(*i)))
            .count();
        // 100 keys in 256 sets of 4 ways: a set overflowing is possible but rare.
        assert!(held >= 95, "only {held} of 100 held");
        let h = key_hash(b"x");
        c.insert(h, loc(1));
        c.insert(h, loc(2));
        assert_eq!(c.get(h), Some(loc(2)), "an insert replaces the key's entry");
        c.remove_if(h, loc(1));
        assert_eq!(
            c.get(h),
            Some(loc(2)),
            "a stale location does not drop a newer one"
        );
        c.remove_if(h, loc(2));
        assert_eq!(c.get(h), None);
        c.insert(h, loc(3));
        c.remove(h);
        assert_eq!(c.get(h), None);
    }

    #[test]
    fn stays_within_its_capacity_and_evicts() {
        for cap in [0usize, 1, 64, 100, 1000] {
            let c = LocationCache::new(cap);
            assert!(c.capacity() >= cap && c.capacity() < cap + SHARDS * WAYS);
            for i in 0..5000u64 {
                c.insert(key_hash(&i.to_le_bytes()), loc(i));
            }
            assert!(c.len() <= c.capacity(), "cap {cap}: {} entries", c.len());
            if cap > 0 {
                // Full, and the latest key is there (evicting another).
                assert_eq!(c.len(), c.capacity(), "cap {cap}");
                assert_eq!(c.get(key_hash(&4999u64.to_le_bytes())), Some(loc(4999)));
            }
        }
        let c = LocationCache::new(64);
        c.insert(1, loc(1));
        c.set_capacity(0);
        assert_eq!((c.get(1), c.len(), c.capacity()), (None, 0, 0));
        c.insert(1, loc(1));
        assert_eq!(c.get(1), None, "a disabled cache holds nothing");
    }

    #[test]
    fn concurrent_inserts_and_removes_keep_entries_whole() {
        let c = std::sync::Arc::new(LocationCache::new(256));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let h = key_hash(&(i % 300).to_le_bytes());
                        let l = Location {
                            child: h,
                            bucket: h ^ t,
                            word: !h,
                        };
                        if i % 5 == 0 {
                            c.remove(h);
                        } else {
                            c.insert(h, l);
                        }
                        if let Some(got) = c.get(h) {
                            assert_eq!((got.child, got.word), (h, !h));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(c.len() <= c.capacity());
    }

    #[test]
    fn validate_seed_corpus_is_accepted_and_rejected_as_expected() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/kv_cached");
        let at = 64 + 128;
        let l = Location {
            child: 3,
            bucket: at,
            word: 0x1234_0008_0000_0100,
        };
        let mut slots = [0u64; SLOTS];
        slots[2] = l.word;
        let rec = encode(b"key", &Value::Inline(b"value".to_vec())).unwrap();
        // Valid; frozen; slot moved.
        let mut moved = slots;
        moved[2] += 1;
        let seeds = [
            (bucket::image(at, UNLOCKED, &slots), true),
            (bucket::image(at, FROZEN, &slots), false),
            (bucket::image(at, UNLOCKED, &moved), false),
        ];
        for (n, (raw, ok)) in seeds.iter().enumerate() {
            let mut bytes = Vec::new();
            for w in [l.child, l.bucket, l.word] {
                bytes.extend(w.to_le_bytes());
            }
            bytes.push(3);
            bytes.extend(b"key");
            bytes.extend(raw);
            bytes.extend(&rec);
            let path = dir.join(format!("seed{n}"));
            if std::env::var_os("FARPOOL_WRITE_CORPUS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let on_disk = std::fs::read(&path).unwrap();
            let (loc, key, raw, rec) = fuzz_parts(&on_disk).unwrap();
            assert_eq!(validate(loc, &raw, rec, key).is_ok(), *ok, "seed{n}");
            fuzz_validate(&on_disk);
        }
    }

    #[test]
    fn validation_accepts_only_a_current_slot_and_a_whole_record_of_the_key() {
        let at = 64 + 128;
        let l = Location {
            child: 3,
            bucket: at,
            word: 0x1234_0008_0000_0100,
        };
        let mut slots = [0u64; SLOTS];
        slots[5] = l.word;
        let rec = encode(b"k", &Value::Inline(b"v1".to_vec())).unwrap();
        let good = bucket::image(at, UNLOCKED, &slots);
        assert_eq!(
            validate(l, &good, &rec, b"k"),
            Ok(Value::Inline(b"v1".to_vec()))
        );
        // A bucket held by a writer is fine (the record checksum covers its rewrites).
        let held = bucket::image(at, LOCKED, &slots);
        assert!(validate(l, &held, &rec, b"k").is_ok());
        let frozen = bucket::image(at, FROZEN, &slots);
        assert_eq!(validate(l, &frozen, &rec, b"k"), Err(Reject::Frozen));
        let mut moved = slots;
        moved[5] = l.word + 1;
        let moved = bucket::image(at, UNLOCKED, &moved);
        assert_eq!(validate(l, &moved, &rec, b"k"), Err(Reject::Moved));
        let mut torn = good;
        torn[8 + 5 * 8] ^= 1;
        assert_eq!(validate(l, &torn, &rec, b"k"), Err(Reject::TornBucket));
        // The same bytes at another bucket's offset do not validate.
        let elsewhere = Location {
            bucket: at + 128,
            ..l
        };
        assert_eq!(
            validate(elsewhere, &good, &rec, b"k"),
            Err(Reject::TornBucket)
        );
        let mut bad = rec.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xFF;
        assert_eq!(validate(l, &good, &bad, b"k"), Err(Reject::TornRecord));
        assert_eq!(validate(l, &good, &rec, b"other"), Err(Reject::OtherKey));
        // Every mix of two same-size images of the record is rejected or one of them.
        let rec2 = encode(b"k", &Value::Inline(b"v2".to_vec())).unwrap();
        for cut in 1..rec.len() {
            let mut mix = rec.clone();
            mix[cut..].copy_from_slice(&rec2[cut..]);
            match validate(l, &good, &mix, b"k") {
                Ok(Value::Inline(v)) => assert!(v == b"v1" || v == b"v2", "cut {cut}"),
                Ok(other) => panic!("cut {cut}: {other:?}"),
                Err(e) => assert_eq!(e, Reject::TornRecord, "cut {cut}"),
            }
        }
    }
}
