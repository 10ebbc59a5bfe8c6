//! A memory node's region: one large mapping that one-sided operations act on.
//!
//! A [`Region`] is treated like device memory: it is only ever touched through raw
//! pointers ([`std::ptr::copy_nonoverlapping`] for READ and WRITE, [`AtomicU64`] for
//! CAS and FAA). No `&[u8]` or `&mut [u8]` is ever created over region memory, because
//! other threads (or, for shared-memory regions, other processes) write it concurrently.
//!
//! # Semantics (the same as RDMA RC, and no more)
//!
//! - Aligned 8-byte [`Region::compare_swap`] and [`Region::fetch_add`] are atomic with
//!   respect to each other (sequentially consistent).
//! - [`Region::read`] and [`Region::write`] are plain copies. A read that races with a
//!   write to the same bytes may observe any mix of old and new bytes ("torn"), at any
//!   granularity. Callers that need consistent multi-byte snapshots must detect tearing
//!   themselves (version words, checksums), exactly as they would over RDMA.
//! - Atomic values are little-endian `u64`s in memory, so a WRITE of `x.to_le_bytes()`
//!   followed by a FAA sees `x`. On little-endian hosts (x86-64, aarch64) this is the
//!   native layout; on big-endian hosts the atomics convert.
//!
//! # Torn mode (for tests)
//!
//! A plain copy of a few KiB usually *looks* atomic on a CPU, so code that wrongly
//! relies on atomic READ/WRITE passes its tests and breaks on a real NIC.
//! [`Region::set_torn_mode`] makes every READ and WRITE on this region copy in small
//! pieces (1 to 64 bytes, sometimes back to front) with thread yields in between, so
//! torn reads show up in tests. It applies to every backend that goes through this
//! `Region`: the soft server's region, and an shm client's mapping (whose
//! [`crate::shm::ShmTransport`] then also runs each batch in reverse order, which the
//! transport contract allows). Atomics are unaffected.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{Advice, MmapOptions, MmapRaw};

use crate::error::{OpError, TransportError};

/// Size of a transparent/explicit huge page on x86-64 and aarch64 (2 MiB).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// How to back an anonymous region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionOptions {
    /// Try explicit 2 MiB huge pages (`MAP_HUGETLB`) first, when the length is a multiple
    /// of 2 MiB; otherwise (or when none are reserved) use normal pages and ask for
    /// transparent huge pages with `madvise(MADV_HUGEPAGE)`.
    pub hugepages: bool,
    /// Pin the region in RAM with `mlock`, so far memory is never swapped out. Failure
    /// (usually `RLIMIT_MEMLOCK`) is logged and tolerated.
    pub lock: bool,
}

impl Default for RegionOptions {
    fn default() -> Self {
        Self {
            hugepages: true,
            lock: true,
        }
    }
}

/// What keeps the region's memory mapped.
enum Backing {
    /// A private anonymous mapping owned by this region.
    Anonymous(#[allow(dead_code)] MmapRaw),
    /// Part of a shared file mapping (shared memory); the `Arc` keeps it mapped.
    Shared(#[allow(dead_code)] Arc<MmapRaw>),
}

/// One contiguous range of memory that one-sided operations are applied to.
///
/// All operations take `&self` and are safe to call from many threads at once; see the
/// module documentation for what concurrent operations observe.
pub struct Region {
    ptr: *mut u8,
    len: u64,
    huge: bool,
    locked: bool,
    torn: AtomicBool,
    _backing: Backing,
}

// SAFETY: `Region` owns (or shares, through an `Arc`) a mapping that stays valid until
// it is dropped. The memory is only accessed through raw-pointer copies and atomics,
// never through references, so sharing the pointer between threads creates no aliasing
// references; races between plain copies are the documented RDMA-like tearing.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: every method takes `&self` and touches memory only through raw
// pointers and atomics.
unsafe impl Sync for Region {}

impl Region {
    /// Maps an anonymous, zero-filled region of `len` bytes.
    ///
    /// The mapping is private to this process (threads share it; there is no `fork`
    /// sharing to preserve). With `opts.hugepages`, explicit 2 MiB pages are tried first
    /// when `len` is a multiple of 2 MiB, falling back to normal pages plus
    /// `MADV_HUGEPAGE`. With `opts.lock`, the region is `mlock`ed; when that fails (most
    /// often because `RLIMIT_MEMLOCK` is small) a warning explains how to raise the limit
    /// and the region stays unlocked.
    pub fn anonymous(len: usize, opts: RegionOptions) -> Result<Region, TransportError> {
        if len == 0 {
            return Err(TransportError::Region(
                "region length must be greater than zero".into(),
            ));
        }
        let mut huge = false;
        let mut map: Option<MmapRaw> = None;
        if opts.hugepages && len % HUGE_PAGE_SIZE == 0 {
            match MmapOptions::new().len(len).huge(Some(21)).map_anon() {
                Ok(m) => {
                    huge = true;
                    map = Some(MmapRaw::from(m));
                }
                Err(e) => tracing::debug!(
                    len,
                    error = %e,
                    "no explicit 2 MiB huge pages (vm.nr_hugepages); using normal pages"
                ),
            }
        }
        let map = match map {
            Some(m) => m,
            None => {
                let m = MmapOptions::new().len(len).map_anon().map_err(|e| {
                    TransportError::Region(format!(
                        "cannot map an anonymous region of {len} bytes: {e}"
                    ))
                })?;
                if opts.hugepages {
                    if let Err(e) = m.advise(Advice::HugePage) {
                        tracing::debug!(error = %e, "madvise(MADV_HUGEPAGE) failed; using normal pages");
                    }
                }
                MmapRaw::from(m)
            }
        };
        let mut locked = false;
        if opts.lock {
            match map.lock() {
                Ok(()) => locked = true,
                Err(e) => tracing::warn!(
                    len,
                    error = %e,
                    "cannot mlock the region, so it may be swapped out; raise the locked-memory \
                     limit (`ulimit -l unlimited` in the shell, `LimitMEMLOCK=infinity` in a \
                     systemd unit, or memlock in /etc/security/limits.conf)"
                ),
            }
        }
        Ok(Region {
            ptr: map.as_mut_ptr(),
            len: len as u64,
            huge,
            locked,
            torn: AtomicBool::new(false),
            _backing: Backing::Anonymous(map),
        })
    }

    /// A region over `len` bytes at `offset` of a shared mapping (used by [`crate::shm`]).
    ///
    /// `offset` must be a multiple of 8 (so that 8-aligned region offsets are 8-aligned
    /// addresses) and the range must lie inside the mapping.
    pub(crate) fn from_shared(
        map: Arc<MmapRaw>,
        offset: usize,
        len: usize,
    ) -> Result<Region, TransportError> {
        let end = offset.checked_add(len);
        if offset % 8 != 0 || end.map_or(true, |end| end > map.len()) {
            return Err(TransportError::Region(format!(
                "data area {offset}+{len} does not fit an {}-byte mapping",
                map.len()
            )));
        }
        // SAFETY: `offset + len <= map.len()` was checked above, so the resulting pointer
        // stays inside (or one past the end of) the mapping, which the `Arc` keeps alive.
        let ptr = unsafe { map.as_mut_ptr().add(offset) };
        Ok(Region {
            ptr,
            len: len as u64,
            huge: false,
            locked: false,
            torn: AtomicBool::new(false),
            _backing: Backing::Shared(map),
        })
    }

    /// Address of the first byte, for registering the region with an RDMA device.
    /// Region memory must only be accessed through raw pointers or atomics.
    #[cfg(feature = "verbs")]
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never true for a constructed region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the region is backed by explicit 2 MiB huge pages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// Whether the region is pinned in RAM (`mlock` succeeded).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Turns torn mode on or off (see the module documentation). Meant for tests: it
    /// makes READ and WRITE much slower.
    pub fn set_torn_mode(&self, on: bool) {
        self.torn.store(on, Ordering::Relaxed);
    }

    /// Whether torn mode is on.
    pub fn torn_mode(&self) -> bool {
        self.torn.load(Ordering::Relaxed)
    }

    /// Checks that `off..off+len` lies inside the region and returns `off` as `usize`.
    #[inline]
    fn bounds(&self, off: u64, len: u64) -> Result<usize, OpError> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(off as usize),
            _ => Err(OpError::OutOfBounds {
                addr: off,
                len,
                start: 0,
                end: self.len,
            }),
        }
    }

    /// The atomic word at `off`, after bounds and alignment checks.
    #[inline]
    fn atomic(&self, off: u64) -> Result<&AtomicU64, OpError> {
        let at = self.bounds(off, 8)?;
        if off % 8 != 0 {
            return Err(OpError::Misaligned { addr: off });
        }
        // SAFETY: `at + 8 <= len` (checked by `bounds`), the mapping base is page aligned
        // and `off` is a multiple of 8, so the pointer is valid and 8-byte aligned for
        // the lifetime of `&self`. All concurrent accesses to region memory go through
        // raw pointers or atomics (never references), which is what `from_ptr` requires;
        // a plain WRITE racing with an atomic is the documented RDMA-like behaviour (the
        // atomic sees old or new bytes).
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.add(at).cast::<u64>()) })
    }

    /// Copies `buf.len()` bytes at `off` into `buf`.
    ///
    /// May observe a concurrent write torn (see the module documentation).
    #[inline]
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), OpError> {
        let at = self.bounds(off, buf.len() as u64)?;
        let dst = buf.as_mut_ptr();
        if self.torn.load(Ordering::Relaxed) {
            torn_pieces(off, buf.len(), |i, n| {
                // SAFETY: `torn_pieces` yields ranges inside `0..buf.len()`, and
                // `at..at + buf.len()` lies inside the mapping (checked by `bounds`);
                // the buffers are distinct, so the ranges do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at + i), dst.add(i), n) }
            });
            return Ok(());
        }
        // SAFETY: `at..at + buf.len()` lies inside the mapping (checked by `bounds`); the
        // destination is a distinct local buffer, so the ranges do not overlap. No
        // reference to region memory is created.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), dst, buf.len()) };
        Ok(())
    }

    /// Copies `data` to `off`.
    ///
    /// Not atomic: a concurrent reader may observe part of it (see the module
    /// documentation).
    #[inline]
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), OpError> {
        let at = self.bounds(off, data.len() as u64)?;
        let src = data.as_ptr();
        if self.torn.load(Ordering::Relaxed) {
            torn_pieces(off, data.len(), |i, n| {
                // SAFETY: `torn_pieces` yields ranges inside `0..data.len()`, and
                // `at..at + data.len()` lies inside the writable mapping (checked by
                // `bounds`); the buffers are distinct, so the ranges do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(src.add(i), self.ptr.add(at + i), n) }
            });
            return Ok(());
        }
        // SAFETY: `at..at + data.len()` lies inside the writable mapping (checked by
        // `bounds`); the source is a distinct local buffer, so the ranges do not overlap.
        // No reference to region memory is created.
        unsafe { std::ptr::copy_nonoverlapping(src, self.ptr.add(at), data.len()) };
        Ok(())
    }

    /// Atomically replaces the little-endian u64 at `off` with `new` if it equals
    /// `expected`. Returns the value found (equal to `expected` on success).
    #[inline]
    pub fn compare_swap(&self, off: u64, expected: u64, new: u64) -> Result<u64, OpError> {
        let word = self.atomic(off)?;
        let found = match word.compare_exchange(
            expected.to_le(),
            new.to_le(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(v) | Err(v) => v,
        };
        Ok(u64::from_le(found))
    }

    /// Atomically adds `add` (wrapping) to the little-endian u64 at `off`. Returns the
    /// previous value.
    #[inline]
    pub fn fetch_add(&self, off: u64, add: u64) -> Result<u64, OpError> {
        let word = self.atomic(off)?;
        if cfg!(target_endian = "little") {
            return Ok(word.fetch_add(add, Ordering::SeqCst));
        }
        let mut cur = word.load(Ordering::SeqCst);
        loop {
            let next = u64::from_le(cur).wrapping_add(add).to_le();
            match word.compare_exchange_weak(cur, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(u64::from_le(cur)),
                Err(v) => cur = v,
            }
        }
    }
}

/// Cuts `0..len` into pieces of 1 to 64 bytes, visited front to back or back to front,
/// calling `copy(start, len)` for each and yielding the thread now and then.
fn torn_pieces(seed: u64, len: usize, mut copy: impl FnMut(usize, usize)) {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut x = (seed ^ len as u64 ^ call.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let backwards = next() & 1 == 1;
    let mut done = 0usize;
    while done < len {
        let n = ((next() % 64) as usize + 1).min(len - done);
        let start = if backwards { len - done - n } else { done };
        copy(start, n);
        done += n;
        if next() % 4 == 0 {
            std::thread::yield_now();
        }
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.len)
            .field("huge", &self.huge)
            .field("locked", &self.locked)
            .field("torn_mode", &self.torn_mode())
            .field(
                "backing",
                &match self._backing {
                    Backing::Anonymous(_) => "anonymous",
                    Backing::Shared(_) => "shared",
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Region {
        Region::anonymous(
            64 * 1024,
            RegionOptions {
                hugepages: false,
                lock: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn zeroed_and_round_trips() {
        let r = small();
        assert_eq!(r.len(), 64 * 1024);
        assert!(!r.is_empty());
        let mut buf = [1u8; 16];
        r.read(100, &mut buf).unwrap();
        assert_eq!(buf, [0; 16]);
        r.write(100, b"hello far memory").unwrap();
        r.read(100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello far memory");
    }

    #[test]
    fn bounds_checked() {
        let r = small();
        let end = r.len();
        let mut buf = [0u8; 8];
        assert!(r.read(end - 8, &mut buf).is_ok());
        assert_eq!(
            r.read(end - 7, &mut buf),
            Err(OpError::OutOfBounds {
                addr: end - 7,
                len: 8,
                start: 0,
                end
            })
        );
        assert!(r.write(u64::MAX, b"x").is_err());
        assert!(r.read(end, &mut []).is_ok());
        assert!(r.read(end + 1, &mut []).is_err());
        assert!(r.fetch_add(end, 1).is_err());
    }

    #[test]
    fn atomics() {
        let r = small();
        assert_eq!(r.fetch_add(8, 5).unwrap(), 0);
        assert_eq!(r.fetch_add(8, u64::MAX).unwrap(), 5);
        assert_eq!(r.compare_swap(8, 3, 9).unwrap(), 4);
        assert_eq!(r.compare_swap(8, 4, 9).unwrap(), 4);
        let mut b = [0u8; 8];
        r.read(8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 9);
        r.write(16, &77u64.to_le_bytes()).unwrap();
        assert_eq!(r.fetch_add(16, 1).unwrap(), 77);
        assert_eq!(r.fetch_add(12, 1), Err(OpError::Misaligned { addr: 12 }));
        assert_eq!(
            r.compare_swap(3, 0, 1),
            Err(OpError::Misaligned { addr: 3 })
        );
    }

    #[test]
    fn concurrent_fetch_add() {
        let r = Arc::new(small());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        r.fetch_add(0, 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.fetch_add(0, 0).unwrap(), 40_000);
    }

    #[test]
    fn torn_mode_copies_everything_and_tears() {
        let r = Arc::new(small());
        r.set_torn_mode(true);
        assert!(r.torn_mode());
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        r.write(5, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        r.read(5, &mut back).unwrap();
        assert_eq!(back, data);
        // A reader racing a writer that flips 4 KiB between all-0 and all-1 sees a mix.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    r.write(0, &[i; 4096]).unwrap();
                    i ^= 1;
                }
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut torn = false;
        let mut buf = [0u8; 4096];
        while !torn && std::time::Instant::now() < deadline {
            r.read(0, &mut buf).unwrap();
            torn = buf.iter().any(|&b| b != buf[0]);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(torn, "torn mode never produced a torn read");
        r.set_torn_mode(false);
    }

    #[test]
    fn huge_and_locked_fall_back() {
        // Whatever the host offers, creation succeeds (falling back where needed).
        let r = Region::anonymous(HUGE_PAGE_SIZE, RegionOptions::default()).unwrap();
        r.write(HUGE_PAGE_SIZE as u64 - 4, b"tail").unwrap();
        assert!(Region::anonymous(0, RegionOptions::default()).is_err());
    }
}
