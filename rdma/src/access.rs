//! Per-block access keys and epochs: the software equivalent of RDMA memory windows.
//!
//! A region is cut into blocks of `block_size` bytes. Each block has an epoch and two
//! keys, one granting read-write access and one read-only. A key of 0 means "no grant".
//! An operation passes when it lies inside one block, names that block's current epoch,
//! and presents one of its keys (the read-write key for writes and atomics).
//!
//! # Consistency
//!
//! Each entry is guarded by a sequence lock: [`AccessTable::set`] makes the sequence odd,
//! stores the keys and the epoch, and makes it even again; [`AccessTable::check`] reads
//! the sequence, the fields, and the sequence again, and retries when it changed. A
//! check therefore always sees one consistent `(epoch, key_rw, key_ro)` triple, never a
//! new epoch with old keys or the reverse, and it takes no lock (readers never write the
//! entry, which matters when the table lives in a shared-memory file mapped read-write by
//! clients).
//!
//! A check and the operation it admits are not one atomic step: an operation whose
//! check passed just before a concurrent `set` may still be applied just after it, as an
//! RDMA operation already executing when a memory window is invalidated. A memory node
//! that frees a block should therefore not rely on the bump being instantaneous for
//! operations already in flight.

use siphasher::sip::SipHasher24;
use std::hash::Hasher;
use std::hint;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{OpError, TransportError};
use crate::op::RKey;

/// Size in bytes of one table entry, in memory and in the shared-memory file.
pub(crate) const ENTRY_SIZE: usize = 32;

/// Spins before a reader gives up on an entry whose writer never finished (only
/// possible when a memory node process died inside `set` on a shared-memory table).
const MAX_READ_SPINS: u32 = 1 << 20;

/// One block's grant state. All fields are atomics, so the all-zero bit pattern (a
/// fresh file) is a valid entry: epoch 0, no keys.
#[repr(C, align(32))]
#[derive(Default)]
pub(crate) struct Entry {
    /// Sequence lock word: odd while a `set` is in progress.
    seq: AtomicU32,
    /// Current epoch of the block.
    epoch: AtomicU32,
    /// Key granting read-write access (0: none).
    key_rw: AtomicU64,
    /// Key granting read-only access (0: none).
    key_ro: AtomicU64,
    /// High-water mark of bytes written into the block (block-relative end offset of
    /// the furthest write or atomic that passed the check) since it was last scrubbed.
    /// Lets the memory node zero only what a previous owner could have written.
    written: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Entry>() == ENTRY_SIZE);

impl Entry {
    /// A consistent snapshot `(epoch, key_rw, key_ro)`, or `None` when a writer appears
    /// to have died mid-update.
    #[inline]
    fn snapshot(&self) -> Option<(u32, u64, u64)> {
        for spins in 0..MAX_READ_SPINS {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let epoch = self.epoch.load(Ordering::Relaxed);
                let key_rw = self.key_rw.load(Ordering::Relaxed);
                let key_ro = self.key_ro.load(Ordering::Relaxed);
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s1 {
                    return Some((epoch, key_rw, key_ro));
                }
            }
            if spins > 64 {
                std::thread::yield_now();
            } else {
                hint::spin_loop();
            }
        }
        None
    }

    fn store(&self, epoch: u32, key_rw: u64, key_ro: u64) {
        // Take the write side: move the sequence from even to odd.
        let mut s = self.seq.load(Ordering::Relaxed);
        loop {
            if s & 1 == 0 {
                match self.seq.compare_exchange_weak(
                    s,
                    s.wrapping_add(1),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(cur) => s = cur,
                }
            } else {
                hint::spin_loop();
                s = self.seq.load(Ordering::Relaxed);
            }
        }
        // Keep the field stores after the odd sequence store for readers.
        fence(Ordering::Release);
        self.key_rw.store(key_rw, Ordering::Relaxed);
        self.key_ro.store(key_ro, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Raises the written high-water mark to `end` (block-relative).
    #[inline]
    fn note_written(&self, end: u64) {
        // Most writes land below the mark already: skip the read-modify-write then.
        if self.written.load(Ordering::Relaxed) < end {
            self.written.fetch_max(end, Ordering::AcqRel);
        }
    }
}

/// Where the entries live.
enum Storage {
    /// Private to this process.
    Heap(Box<[Entry]>),
    /// Inside a shared-memory file (see [`crate::shm`]).
    Shared(crate::shm::SharedTable),
}

/// A function told the index of a block whose grant [`AccessTable::set`] just changed.
pub type GrantListener = dyn Fn(u32) + Send + Sync;

/// Names a listener added with [`AccessTable::subscribe`], for
/// [`AccessTable::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

/// Epochs and keys of every block of a region. `Send + Sync`; all methods take `&self`.
pub struct AccessTable {
    storage: Storage,
    region_len: u64,
    block_size: u64,
    num_blocks: u32,
    /// Called after every `set` (data planes whose device enforces grants itself, such as
    /// RDMA memory windows, revoke there).
    listeners: parking_lot::RwLock<Vec<(u64, Arc<GrantListener>)>>,
    next_listener: AtomicU64,
}

/// Checks the geometry and returns the number of blocks.
pub(crate) fn num_blocks_for(region_len: u64, block_size: u64) -> Result<u32, TransportError> {
    if block_size == 0 || region_len == 0 {
        return Err(TransportError::Region(format!(
            "region length ({region_len}) and block size ({block_size}) must be nonzero"
        )));
    }
    if region_len % block_size != 0 {
        return Err(TransportError::Region(format!(
            "region length {region_len} is not a multiple of the block size {block_size}"
        )));
    }
    u32::try_from(region_len / block_size).map_err(|_| {
        TransportError::Region(format!(
            "{} blocks of {block_size} bytes is more than the 2^32-1 a table can index; use larger blocks",
            region_len / block_size
        ))
    })
}

impl AccessTable {
    /// A table for a region of `region_len` bytes cut into blocks of `block_size` bytes,
    /// every block at epoch 0 with no keys (nothing accessible).
    ///
    /// `block_size` must be nonzero and divide `region_len`, and there may be at most
    /// `u32::MAX` blocks.
    pub fn new(region_len: u64, block_size: u64) -> Result<AccessTable, TransportError> {
        let num_blocks = num_blocks_for(region_len, block_size)?;
        let entries: Box<[Entry]> = (0..num_blocks).map(|_| Entry::default()).collect();
        Ok(AccessTable {
            storage: Storage::Heap(entries),
            region_len,
            block_size,
            num_blocks,
            listeners: Default::default(),
            next_listener: AtomicU64::new(0),
        })
    }

    /// A table whose entries live in a shared-memory mapping.
    pub(crate) fn from_shared(
        table: crate::shm::SharedTable,
        region_len: u64,
        block_size: u64,
    ) -> Result<AccessTable, TransportError> {
        let num_blocks = num_blocks_for(region_len, block_size)?;
        if table.entries().len() != num_blocks as usize {
            return Err(TransportError::Region(format!(
                "shared access table has {} entries, expected {num_blocks}",
                table.entries().len()
            )));
        }
        Ok(AccessTable {
            storage: Storage::Shared(table),
            region_len,
            block_size,
            num_blocks,
            listeners: Default::default(),
            next_listener: AtomicU64::new(0),
        })
    }

    #[inline]
    fn entries(&self) -> &[Entry] {
        match &self.storage {
            Storage::Heap(e) => e,
            Storage::Shared(t) => t.entries(),
        }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    /// Length of the region the table covers.
    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    /// The block containing byte `addr`, or `None` past the end of the region.
    pub fn block_of(&self, addr: u64) -> Option<u32> {
        if addr < self.region_len {
            Some((addr / self.block_size) as u32)
        } else {
            None
        }
    }

    /// Publishes a block's epoch and keys (0 = no grant) as one consistent update.
    ///
    /// Typical use: on grant, `set(b, epoch, rw, ro)`; on free, `set(b, epoch + 1, 0, 0)`,
    /// which makes every outstanding grant fail with [`OpError::StaleEpoch`].
    ///
    /// # Panics
    ///
    /// If `block >= self.num_blocks()` (a bug in the caller's block accounting).
    ///
    /// Listeners added with [`AccessTable::subscribe`] run after the update, on this
    /// thread, before `set` returns: when it returns, a device that enforces grants
    /// itself has revoked what the update took away.
    pub fn set(&self, block: u32, epoch: u32, key_rw: u64, key_ro: u64) {
        self.entries()[block as usize].store(epoch, key_rw, key_ro);
        let listeners = self.listeners.read();
        for (_, f) in listeners.iter() {
            f(block);
        }
    }

    /// Adds `f`, called with the block index after every [`AccessTable::set`] (on the
    /// calling thread; `f` must not call `subscribe` or `unsubscribe`).
    pub fn subscribe(&self, f: Arc<GrantListener>) -> ListenerId {
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        self.listeners.write().push((id, f));
        ListenerId(id)
    }

    /// Removes a listener added with [`AccessTable::subscribe`] (no effect if it is gone).
    pub fn unsubscribe(&self, id: ListenerId) {
        self.listeners.write().retain(|(i, _)| *i != id.0);
    }

    /// The current epoch of `block`.
    ///
    /// # Panics
    ///
    /// If `block >= self.num_blocks()`.
    pub fn epoch(&self, block: u32) -> u32 {
        self.entries()[block as usize]
            .snapshot()
            .map_or(0, |(epoch, _, _)| epoch)
    }

    /// Returns and resets the written high-water mark of `block`: the block-relative
    /// length that may hold data written since the last call (0 when nothing was
    /// written). Every write or atomic that passes [`AccessTable::check`] raises it.
    /// The memory node scrubs `[0, mark)` when a block changes owner.
    ///
    /// # Panics
    /// If `block >= num_blocks()`.
    pub fn take_written(&self, block: u32) -> u64 {
        self.entries()[block as usize]
            .written
            .swap(0, Ordering::AcqRel)
    }

    /// Checks an operation on `addr..addr+len` presenting `rkey`; `write` is true for
    /// WRITE and atomics.
    ///
    /// The range must lie inside exactly one block ([`OpError::OutOfBounds`] names that
    /// block's bounds, or the region's when `addr` is past its end); zero-length ranges
    /// pass when `addr` is inside a block. Then, in order: an epoch other than the
    /// block's current one gives [`OpError::StaleEpoch`]; a key that is 0 or matches
    /// neither grant gives [`OpError::AccessDenied`]; the read-only key on a write gives
    /// [`OpError::ReadOnly`].
    #[inline]
    pub fn check(&self, addr: u64, len: u64, rkey: RKey, write: bool) -> Result<(), OpError> {
        let (block, start) = block_bounds(addr, len, self.region_len, self.block_size)?;
        let Some((epoch, key_rw, key_ro)) = self.entries()[block as usize].snapshot() else {
            return Err(OpError::AccessDenied);
        };
        if rkey.epoch != epoch {
            return Err(OpError::StaleEpoch {
                granted: rkey.epoch,
                current: epoch,
            });
        }
        if rkey.key == 0 {
            return Err(OpError::AccessDenied);
        }
        if rkey.key == key_rw {
            if write {
                self.entries()[block as usize].note_written(addr - start + len);
            }
            return Ok(());
        }
        if rkey.key == key_ro {
            return if write {
                Err(OpError::ReadOnly)
            } else {
                Ok(())
            };
        }
        Err(OpError::AccessDenied)
    }

    /// Like [`AccessTable::check`], but `rkey.key` must be a capability MAC
    /// ([`grant_mac`]) of one of the block's keys over `rkey.expiry`, and the grant must
    /// not have expired at `now` (seconds since the Unix epoch; `expiry` 0 never expires).
    ///
    /// Order of the checks: bounds, epoch ([`OpError::StaleEpoch`]), MAC
    /// ([`OpError::AccessDenied`], or [`OpError::ReadOnly`] for a write under the
    /// read-only MAC), then expiry ([`OpError::GrantExpired`]), so a forged grant
    /// never learns whether it would have been expired. Costs one SipHash per
    /// operation under the read-write key, two under the read-only key.
    #[inline]
    pub fn check_grant(
        &self,
        addr: u64,
        len: u64,
        rkey: RKey,
        write: bool,
        now: u32,
    ) -> Result<(), OpError> {
        let (block, start) = block_bounds(addr, len, self.region_len, self.block_size)?;
        let entry = &self.entries()[block as usize];
        let Some((epoch, key_rw, key_ro)) = entry.snapshot() else {
            return Err(OpError::AccessDenied);
        };
        if rkey.epoch != epoch {
            return Err(OpError::StaleEpoch {
                granted: rkey.epoch,
                current: epoch,
            });
        }
        let expired = || rkey.expiry != 0 && now >= rkey.expiry;
        if key_rw != 0 && rkey.key == grant_mac(key_rw, rkey.expiry) {
            if expired() {
                return Err(OpError::GrantExpired {
                    expiry: rkey.expiry,
                    now,
                });
            }
            if write {
                entry.note_written(addr - start + len);
            }
            return Ok(());
        }
        if key_ro != 0 && rkey.key == grant_mac(key_ro, rkey.expiry) {
            if write {
                return Err(OpError::ReadOnly);
            }
            if expired() {
                return Err(OpError::GrantExpired {
                    expiry: rkey.expiry,
                    now,
                });
            }
            return Ok(());
        }
        Err(OpError::AccessDenied)
    }
}

/// The capability MAC of a grant: a keyed SipHash-2-4 under the block key (one of the
/// two keys [`AccessTable::set`] stores, which already binds node, block, epoch and
/// rights) over the grant's `expiry`. Never 0.
///
/// The controller hands clients this MAC, never the block key, so a client can neither
/// extend a grant's lifetime, nor upgrade its rights, nor move it to another block or
/// epoch: each changes the key the memory node recomputes.
#[inline]
pub fn grant_mac(block_key: u64, expiry: u32) -> u64 {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&block_key.to_le_bytes());
    k[8..].copy_from_slice(&(block_key ^ GRANT_MAC_TWEAK).to_le_bytes());
    let mut h = SipHasher24::new_with_key(&k);
    h.write_u32(expiry);
    match h.finish() {
        0 => 1,
        m => m,
    }
}

/// Fills the second half of the MAC key, so the two halves differ.
const GRANT_MAC_TWEAK: u64 = 0x6661_7270_6f6f_6c21;

/// Seconds since the Unix epoch, as grants carry them (saturating; 0 if the clock is
/// before 1970).
pub fn unix_now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Checks that `addr..addr+len` lies inside one block of a region of `region_len` bytes
/// cut into `block_size`-byte blocks, and returns that block's index and start. The
/// error names the block's bounds, or the region's when `addr` is past its end.
#[inline]
pub fn block_bounds(
    addr: u64,
    len: u64,
    region_len: u64,
    block_size: u64,
) -> Result<(u64, u64), OpError> {
    if addr >= region_len {
        return Err(OpError::OutOfBounds {
            addr,
            len,
            start: 0,
            end: region_len,
        });
    }
    let block = addr / block_size;
    let start = block * block_size;
    let end = start + block_size;
    if len > end - addr {
        return Err(OpError::OutOfBounds {
            addr,
            len,
            start,
            end,
        });
    }
    Ok((block, start))
}

impl std::fmt::Debug for AccessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessTable")
            .field("region_len", &self.region_len)
            .field("block_size", &self.block_size)
            .field("num_blocks", &self.num_blocks)
            .field(
                "storage",
                &match self.storage {
                    Storage::Heap(_) => "heap",
                    Storage::Shared(_) => "shared",
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const BS: u64 = 4096;

    fn key(key: u64, epoch: u32) -> RKey {
        RKey {
            key,
            epoch,
            expiry: 0,
        }
    }

    fn cap(block_key: u64, epoch: u32, expiry: u32) -> RKey {
        RKey {
            key: grant_mac(block_key, expiry),
            epoch,
            expiry,
        }
    }

    #[test]
    fn capabilities_bind_key_epoch_rights_and_expiry() {
        let t = AccessTable::new(4 * BS, BS).unwrap();
        t.set(1, 3, 0xAA, 0xBB);
        t.set(2, 3, 0xCC, 0xDD);
        let a = BS + 64;
        let now = 1_000;
        assert_eq!(t.check_grant(a, 8, cap(0xAA, 3, 2_000), true, now), Ok(()));
        assert_eq!(t.check_grant(a, 8, cap(0xBB, 3, 2_000), false, now), Ok(()));
        assert_eq!(t.check_grant(a, 8, cap(0xAA, 3, 0), true, now), Ok(()));
        // Rights: the read-only MAC does not write.
        assert_eq!(
            t.check_grant(a, 8, cap(0xBB, 3, 2_000), true, now),
            Err(OpError::ReadOnly)
        );
        // The raw block key is not a capability.
        assert_eq!(
            t.check_grant(a, 8, key(0xAA, 3), false, now),
            Err(OpError::AccessDenied)
        );
        // Extending the expiry breaks the MAC.
        let mut longer = cap(0xAA, 3, 2_000);
        longer.expiry = 3_000;
        assert_eq!(
            t.check_grant(a, 8, longer, false, now),
            Err(OpError::AccessDenied)
        );
        // Another block's capability does not open this one (range widened).
        assert_eq!(
            t.check_grant(a, 8, cap(0xCC, 3, 2_000), false, now),
            Err(OpError::AccessDenied)
        );
        // Expired: typed, for both rights.
        for k in [0xAA, 0xBB] {
            assert_eq!(
                t.check_grant(a, 8, cap(k, 3, 2_000), false, 2_000),
                Err(OpError::GrantExpired {
                    expiry: 2_000,
                    now: 2_000
                })
            );
        }
        // Other epoch after a bump.
        t.set(1, 4, 0xEE, 0xFF);
        assert_eq!(
            t.check_grant(a, 8, cap(0xAA, 3, 2_000), false, now),
            Err(OpError::StaleEpoch {
                granted: 3,
                current: 4
            })
        );
        // A revoked block (keys 0) accepts no MAC, even of key 0.
        t.set(1, 5, 0, 0);
        assert_eq!(
            t.check_grant(a, 8, cap(0, 5, 0), false, now),
            Err(OpError::AccessDenied)
        );
    }

    #[test]
    fn grant_macs_differ_by_key_and_expiry() {
        let m = grant_mac(7, 100);
        assert_ne!(m, grant_mac(8, 100));
        assert_ne!(m, grant_mac(7, 101));
        assert_eq!(m, grant_mac(7, 100));
        assert_ne!(m, 0);
    }

    #[test]
    fn geometry() {
        let t = AccessTable::new(16 * BS, BS).unwrap();
        assert_eq!(t.num_blocks(), 16);
        assert_eq!(t.block_size(), BS);
        assert_eq!(t.region_len(), 16 * BS);
        assert_eq!(t.block_of(BS + 1), Some(1));
        assert_eq!(t.block_of(16 * BS), None);
        assert!(AccessTable::new(16 * BS, 0).is_err());
        assert!(AccessTable::new(0, BS).is_err());
        assert!(AccessTable::new(16 * BS + 1, BS).is_err());
        assert!(AccessTable::new(1 << 44, 1).is_err());
    }

    #[test]
    fn listeners_see_every_set_until_unsubscribed() {
        let t = AccessTable::new(4 * BS, BS).unwrap();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let t2 = Arc::new(t);
        let table = t2.clone();
        let id = t2.subscribe(Arc::new(move |block| {
            // The update is visible to the listener.
            s2.lock().push((block, table.epoch(block)));
        }));
        t2.set(1, 5, 0xAA, 0);
        t2.set(3, 2, 0, 0);
        t2.unsubscribe(id);
        t2.set(2, 9, 0, 0);
        assert_eq!(*seen.lock(), [(1, 5), (3, 2)]);
    }

    #[test]
    fn nothing_granted_initially() {
        let t = AccessTable::new(4 * BS, BS).unwrap();
        assert_eq!(t.epoch(2), 0);
        assert_eq!(
            t.check(2 * BS, 8, key(0, 0), false),
            Err(OpError::AccessDenied)
        );
        assert_eq!(
            t.check(2 * BS, 8, key(5, 0), false),
            Err(OpError::AccessDenied)
        );
    }

    #[test]
    fn keys_and_epochs() {
        let t = AccessTable::new(4 * BS, BS).unwrap();
        t.set(1, 3, 0xAA, 0xBB);
        assert_eq!(t.epoch(1), 3);
        let a = BS + 100;
        assert_eq!(t.check(a, 100, key(0xAA, 3), true), Ok(()));
        assert_eq!(t.check(a, 100, key(0xAA, 3), false), Ok(()));
        assert_eq!(t.check(a, 100, key(0xBB, 3), false), Ok(()));
        assert_eq!(t.check(a, 100, key(0xBB, 3), true), Err(OpError::ReadOnly));
        assert_eq!(
            t.check(a, 100, key(0xCC, 3), false),
            Err(OpError::AccessDenied)
        );
        assert_eq!(
            t.check(a, 100, key(0xAA, 2), false),
            Err(OpError::StaleEpoch {
                granted: 2,
                current: 3
            })
        );
        // Key of another block does not open this one.
        t.set(2, 3, 0xDD, 0);
        assert_eq!(
            t.check(a, 1, key(0xDD, 3), false),
            Err(OpError::AccessDenied)
        );
        // Revocation.
        t.set(1, 4, 0, 0);
        assert_eq!(
            t.check(a, 1, key(0xAA, 3), false),
            Err(OpError::StaleEpoch {
                granted: 3,
                current: 4
            })
        );
        assert_eq!(t.check(a, 1, key(0, 4), false), Err(OpError::AccessDenied));
    }

    #[test]
    fn bounds() {
        let t = AccessTable::new(4 * BS, BS).unwrap();
        t.set(3, 0, 1, 0);
        let k = key(1, 0);
        assert_eq!(t.check(3 * BS, BS, k, true), Ok(()));
        assert_eq!(t.check(4 * BS - 1, 1, k, true), Ok(()));
        assert_eq!(t.check(4 * BS - 1, 0, k, true), Ok(()));
        assert_eq!(
            t.check(4 * BS - 1, 2, k, true),
            Err(OpError::OutOfBounds {
                addr: 4 * BS - 1,
                len: 2,
                start: 3 * BS,
                end: 4 * BS
            })
        );
        assert_eq!(
            t.check(4 * BS, 0, k, true),
            Err(OpError::OutOfBounds {
                addr: 4 * BS,
                len: 0,
                start: 0,
                end: 4 * BS
            })
        );
        assert!(t.check(u64::MAX, u64::MAX, k, false).is_err());
        assert!(t.check(3 * BS + 8, u64::MAX, k, false).is_err());
        // Crossing into the next block is refused even with both blocks granted.
        t.set(2, 0, 1, 0);
        assert_eq!(
            t.check(3 * BS - 4, 8, k, false),
            Err(OpError::OutOfBounds {
                addr: 3 * BS - 4,
                len: 8,
                start: 2 * BS,
                end: 3 * BS
            })
        );
    }

    #[test]
    fn concurrent_set_and_check_see_consistent_pairs() {
        // Each epoch e is granted with key e * 7 + 1: a checker must never see a
        // snapshot where a key belongs to another epoch.
        let t = Arc::new(AccessTable::new(BS, BS).unwrap());
        let writer = {
            let t = t.clone();
            std::thread::spawn(move || {
                for e in 1..50_000u32 {
                    t.set(0, e, u64::from(e) * 7 + 1, u64::from(e) * 7 + 2);
                }
            })
        };
        let mut seen = 0;
        while !writer.is_finished() {
            let (e, rw, ro) = t.entries()[0].snapshot().unwrap();
            if e != 0 {
                assert_eq!(rw, u64::from(e) * 7 + 1);
                assert_eq!(ro, u64::from(e) * 7 + 2);
                seen += 1;
            }
        }
        writer.join().unwrap();
        assert!(seen > 0 || t.epoch(0) == 49_999);
    }

    #[test]
    fn written_mark_tracks_the_furthest_write_only() {
        let t = AccessTable::new(4 * 4096, 4096).unwrap();
        t.set(1, 3, 11, 12);
        assert_eq!(t.take_written(1), 0);
        t.check(4096 + 10, 0, key(11, 3), false).unwrap();
        t.check(4096 + 100, 50, key(12, 3), false).unwrap();
        assert_eq!(t.take_written(1), 0, "reads leave no mark");
        t.check(4096 + 100, 50, key(11, 3), true).unwrap();
        t.check(4096 + 8, 8, key(11, 3), true).unwrap();
        assert!(t.check(4096 + 1000, 8, key(12, 3), true).is_err());
        assert_eq!(t.take_written(1), 150);
        assert_eq!(t.take_written(1), 0, "taking resets the mark");
        assert_eq!(t.take_written(0), 0);
    }
}
