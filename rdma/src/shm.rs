//! Same-host shared-memory backend (trusted mode).
//!
//! # Trusted mode only
//!
//! **A process that maps the region file can read and write all of it**, including other
//! tasks' blocks and the access table itself. The access check ([`AccessTable::check`])
//! runs inside the client library: it catches bugs and stale handles (a block freed and
//! reused), not attackers. A mapping cannot be revoked either: a client keeps its
//! mapping after the memory node drops the region. Use this backend only between
//! processes that trust each other (one user, one host); use [`crate::soft`] (or verbs)
//! across trust boundaries. The file is created with mode `0600`, so only the memory
//! node's user can open it.
//!
//! # File layout
//!
//! All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FARPSHM1"` |
//! | 8 | 4 | version ([`SHM_VERSION`]) |
//! | 12 | 4 | access-table entry size (32) |
//! | 16 | 8 | region length |
//! | 24 | 8 | block size |
//! | 32 | 4 | number of blocks |
//! | 36 | 4 | reserved (0) |
//! | 40 | 8 | table offset (4096) |
//! | 48 | 8 | data offset (4096-aligned, after the table) |
//! | 56..4096 | | reserved (0) |
//!
//! The access table follows the header: one 32-byte entry per block (sequence word u32,
//! epoch u32, read-write key u64, read-only key u64, in native byte order, which is
//! little-endian on every supported host). The data area, `region length` bytes, starts
//! at the data offset. The file is built under a temporary name and renamed into place,
//! so a client never sees a half-written header.
//!
//! Operations are memcpy and CPU atomics on the mapping, with the same (RDMA-like)
//! guarantees as [`Region`]: aligned 8-byte atomics are atomic, larger reads and writes
//! may tear.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{Advice, MmapOptions, MmapRaw};

use crate::access::{num_blocks_for, AccessTable, Entry, ENTRY_SIZE};
use crate::error::{Error, OpError, TransportError};
use crate::op::{finish_batch, Op, OpKind, OpStatus};
use crate::region::Region;
use crate::transport::{Transport, TransportKind};

/// Magic bytes at the start of a shared-memory region file.
pub const SHM_MAGIC: [u8; 8] = *b"FARPSHM1";
/// Layout version written and accepted by this build.
pub const SHM_VERSION: u32 = 1;
/// Size of the file header; the access table starts here.
pub const SHM_HEADER_LEN: u64 = 4096;
/// Alignment of the data area.
const DATA_ALIGN: u64 = 4096;

/// The access-table part of a shared mapping (constructed only by this module).
pub(crate) struct SharedTable {
    map: Arc<MmapRaw>,
    offset: usize,
    entries: usize,
}

impl SharedTable {
    /// The entries, as shared references to atomics inside the mapping.
    pub(crate) fn entries(&self) -> &[Entry] {
        // SAFETY: the constructor checked that `offset + entries * ENTRY_SIZE` lies inside
        // the mapping and that `offset` is a multiple of 64 (the mapping base is page
        // aligned), so the pointer is aligned for `Entry` (align 32). `Entry` consists of
        // atomics only, so every bit pattern is valid and shared references to it may be
        // used while other threads or processes modify the memory through atomics. The
        // `Arc` keeps the mapping alive as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(self.offset).cast::<Entry>(),
                self.entries,
            )
        }
    }

    fn new(map: Arc<MmapRaw>, offset: u64, entries: u32) -> Result<SharedTable, TransportError> {
        let bytes = u64::from(entries) * ENTRY_SIZE as u64;
        if offset % 64 != 0 || offset.saturating_add(bytes) > map.len() as u64 {
            return Err(TransportError::Region(format!(
                "access table at {offset} ({entries} entries) does not fit the mapping"
            )));
        }
        Ok(SharedTable {
            map,
            offset: offset as usize,
            entries: entries as usize,
        })
    }
}

/// Decoded file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    region_len: u64,
    block_size: u64,
    num_blocks: u32,
    table_offset: u64,
    data_offset: u64,
}

impl Header {
    fn for_geometry(region_len: u64, block_size: u64) -> Result<Header, TransportError> {
        let num_blocks = num_blocks_for(region_len, block_size)?;
        let table_offset = SHM_HEADER_LEN;
        let table_end = table_offset + u64::from(num_blocks) * ENTRY_SIZE as u64;
        let data_offset = table_end.div_ceil(DATA_ALIGN) * DATA_ALIGN;
        Ok(Header {
            region_len,
            block_size,
            num_blocks,
            table_offset,
            data_offset,
        })
    }

    fn file_len(&self) -> Option<u64> {
        self.data_offset.checked_add(self.region_len)
    }

    fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..8].copy_from_slice(&SHM_MAGIC);
        b[8..12].copy_from_slice(&SHM_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.region_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.block_size.to_le_bytes());
        b[32..36].copy_from_slice(&self.num_blocks.to_le_bytes());
        b[40..48].copy_from_slice(&self.table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.data_offset.to_le_bytes());
        b
    }

    /// Decodes and validates a header against the file length.
    fn decode(b: &[u8; 64], file_len: u64, path: &Path) -> Result<Header, TransportError> {
        let err = |msg: String| TransportError::Region(format!("{}: {msg}", path.display()));
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        if b[0..8] != SHM_MAGIC {
            return Err(err(format!(
                "not a farpool shared-memory region (magic {:02x?}, expected \"FARPSHM1\")",
                &b[0..8]
            )));
        }
        let version = u32_at(8);
        if version != SHM_VERSION {
            return Err(err(format!(
                "region file has layout version {version}, this build reads version {SHM_VERSION}; \
                 run matching farpool versions on the memory node and the client"
            )));
        }
        let entry_size = u32_at(12);
        if entry_size as usize != ENTRY_SIZE {
            return Err(err(format!(
                "access-table entry size is {entry_size}, expected {ENTRY_SIZE}"
            )));
        }
        let h = Header {
            region_len: u64_at(16),
            block_size: u64_at(24),
            num_blocks: u32_at(32),
            table_offset: u64_at(40),
            data_offset: u64_at(48),
        };
        let expect = Header::for_geometry(h.region_len, h.block_size)
            .map_err(|e| err(format!("bad geometry in header: {e}")))?;
        if h != expect {
            return Err(err(format!(
                "inconsistent header {h:?}; expected {expect:?} for this geometry"
            )));
        }
        match h.file_len() {
            Some(need) if need <= file_len => Ok(h),
            need => Err(err(format!(
                "truncated file: {file_len} bytes, the header describes {} bytes",
                need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
            ))),
        }
    }
}

/// Maps the whole of `file` shared, read-write.
fn map_file(file: &File, path: &Path) -> Result<Arc<MmapRaw>, TransportError> {
    let map = MmapOptions::new()
        .map_raw(file)
        .map_err(|e| TransportError::Region(format!("cannot map {}: {e}", path.display())))?;
    Ok(Arc::new(map))
}

/// Builds the region and table views of a validated mapping.
fn views(
    map: &Arc<MmapRaw>,
    h: &Header,
) -> Result<(Arc<Region>, Arc<AccessTable>), TransportError> {
    let region_len = usize::try_from(h.region_len)
        .map_err(|_| TransportError::Region("region too large for this host".into()))?;
    let region = Region::from_shared(map.clone(), h.data_offset as usize, region_len)?;
    let table = SharedTable::new(map.clone(), h.table_offset, h.num_blocks)?;
    let access = AccessTable::from_shared(table, h.region_len, h.block_size)?;
    Ok((Arc::new(region), Arc::new(access)))
}

/// Reserves the file's blocks up front, so that a full tmpfs fails here with an error
/// instead of later with SIGBUS on first touch of a page.
fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "file too large"))?;
    // SAFETY: plain system call on a file descriptor owned by `file` for the duration of
    // the call; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate support: fall back to a sparse file.
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len as u64),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Memory-node side of a shared-memory region: creates the file and owns it.
///
/// The file is removed when the `ShmRegion` is dropped (if it is still the file this
/// value created). Clients that mapped it keep their mapping until they drop their
/// [`ShmTransport`]; the memory is freed when the last mapping goes.
pub struct ShmRegion {
    path: PathBuf,
    dev_ino: (u64, u64),
    region: Arc<Region>,
    access: Arc<AccessTable>,
}

impl ShmRegion {
    /// Creates (replacing any existing file) a region file at `path` (usually under
    /// `/dev/shm`) with `region_len` data bytes cut into `block_size` blocks, all at
    /// epoch 0 with no keys. The file has mode `0600`.
    pub fn create(
        path: &Path,
        region_len: u64,
        block_size: u64,
    ) -> Result<ShmRegion, TransportError> {
        let header = Header::for_geometry(region_len, block_size)?;
        let file_len = header
            .file_len()
            .ok_or_else(|| TransportError::Region("region too large".into()))?;
        let tmp = {
            let mut name = path.as_os_str().to_os_string();
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            name.push(format!(".tmp.{}.{n}", std::process::id()));
            PathBuf::from(name)
        };
        let ctx = |what: &str, e: std::io::Error| {
            TransportError::Region(format!("cannot {what} {}: {e}", tmp.display()))
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ctx("create", e))?;
        let built = (|| {
            preallocate(&file, file_len).map_err(|e| {
                ctx(
                    &format!("allocate {file_len} bytes for (is /dev/shm large enough?)"),
                    e,
                )
            })?;
            let map = map_file(&file, &tmp)?;
            if let Err(e) = map.advise(Advice::HugePage) {
                tracing::debug!(error = %e, "madvise(MADV_HUGEPAGE) on the shm region failed");
            }
            let bytes = header.encode();
            // SAFETY: the mapping is at least `SHM_HEADER_LEN` (> 64) bytes long and
            // nobody else has it mapped yet (the file still has its temporary name).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.as_mut_ptr(), bytes.len()) };
            let (region, access) = views(&map, &header)?;
            std::fs::rename(&tmp, path).map_err(|e| {
                TransportError::Region(format!(
                    "cannot move {} to {}: {e}",
                    tmp.display(),
                    path.display()
                ))
            })?;
            let meta = file.metadata().map_err(|e| ctx("stat", e))?;
            Ok(ShmRegion {
                path: path.to_path_buf(),
                dev_ino: (meta.dev(), meta.ino()),
                region,
                access,
            })
        })();
        if built.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        built
    }

    /// The data area, for the memory node's own use (e.g. serving it over [`crate::soft`]).
    pub fn region(&self) -> Arc<Region> {
        self.region.clone()
    }

    /// The shared access table; [`AccessTable::set`] on it is seen by every client.
    pub fn access(&self) -> Arc<AccessTable> {
        self.access.clone()
    }

    /// Path of the region file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // Remove the file only if it is still ours (not replaced by a newer region).
        if let Ok(meta) = std::fs::metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.dev_ino {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove shm region file");
                }
            }
        }
    }
}

impl std::fmt::Debug for ShmRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmRegion")
            .field("path", &self.path)
            .field("region_len", &self.region.len())
            .field("block_size", &self.access.block_size())
            .finish()
    }
}

/// Client side of a shared-memory region: one-sided operations become memcpy and CPU
/// atomics on a mapping of the region file. Trusted mode (see the module docs).
///
/// Operations of a batch are applied in order, each after [`AccessTable::check`]. The
/// per-operation path takes no lock and allocates nothing.
pub struct ShmTransport {
    region: Arc<Region>,
    access: Arc<AccessTable>,
    max_op_bytes: u64,
    ops_done: AtomicU64,
}

impl ShmTransport {
    /// Maps the region file at `path` and validates its header.
    pub fn open(path: &Path) -> Result<ShmTransport, TransportError> {
        let err = |what: &str, e: std::io::Error| {
            TransportError::Region(format!("cannot {what} {}: {e}", path.display()))
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err("open shared-memory region", e))?;
        let file_len = file.metadata().map_err(|e| err("stat", e))?.len();
        if file_len < SHM_HEADER_LEN {
            return Err(TransportError::Region(format!(
                "{}: truncated file: {file_len} bytes, shorter than the {SHM_HEADER_LEN}-byte header",
                path.display()
            )));
        }
        let map = map_file(&file, path)?;
        let mut raw = [0u8; 64];
        // SAFETY: the mapping covers the whole file, which is at least
        // `SHM_HEADER_LEN` (> 64) bytes; the header is only written before the file is
        // renamed into place, so nothing writes it concurrently.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr(), raw.as_mut_ptr(), raw.len()) };
        let header = Header::decode(&raw, file_len, path)?;
        let (region, access) = views(&map, &header)?;
        Ok(Self::from_parts(region, access))
    }

    /// A transport applying operations directly to an in-process region and table
    /// (for example a memory node embedded in the client process).
    pub fn from_parts(region: Arc<Region>, access: Arc<AccessTable>) -> ShmTransport {
        let max_op_bytes = access.block_size().min(region.len());
        ShmTransport {
            region,
            access,
            max_op_bytes,
            ops_done: AtomicU64::new(0),
        }
    }

    /// The mapped data area.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// The shared access table.
    pub fn access(&self) -> &Arc<AccessTable> {
        &self.access
    }

    /// Number of operations executed (successful or not) through this transport.
    pub fn ops_executed(&self) -> u64 {
        self.ops_done.load(Ordering::Relaxed)
    }

    #[inline]
    fn apply(&self, op: &mut Op<'_>) -> Result<u64, OpError> {
        let len = op.remote_len();
        if len > self.max_op_bytes {
            return Err(OpError::TooLarge {
                len,
                max: self.max_op_bytes,
            });
        }
        let addr = op.remote.addr;
        self.access
            .check(addr, len, op.remote.rkey, op.code().is_write())?;
        match &mut op.kind {
            OpKind::Read(buf) => self.region.read(addr, buf).map(|()| 0),
            OpKind::Write(data) => self.region.write(addr, data).map(|()| 0),
            OpKind::CompareSwap { expected, new } => {
                self.region.compare_swap(addr, *expected, *new)
            }
            OpKind::FetchAdd { add } => self.region.fetch_add(addr, *add),
        }
    }
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn execute(&self, ops: &mut [Op<'_>]) -> Result<(), Error> {
        let run = |op: &mut Op<'_>| match self.apply(op) {
            Ok(v) => {
                op.result = v;
                op.status = OpStatus::Done;
            }
            Err(e) => op.status = OpStatus::Failed(e),
        };
        if self.region.torn_mode() {
            // Batches may complete in any order: exercise that in torn mode.
            ops.iter_mut().rev().for_each(run);
        } else {
            ops.iter_mut().for_each(run);
        }
        self.ops_done.fetch_add(ops.len() as u64, Ordering::Relaxed);
        finish_batch(ops)
    }

    fn max_op_bytes(&self) -> usize {
        usize::try_from(self.max_op_bytes).unwrap_or(usize::MAX)
    }
}

impl std::fmt::Debug for ShmTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmTransport")
            .field("region", &self.region)
            .field("access", &self.access)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{RKey, RemoteAddr};

    fn tmp_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("region")
    }

    #[test]
    fn create_open_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = tmp_path(&dir);
        let node = ShmRegion::create(&path, 8 * 4096, 4096).unwrap();
        assert_eq!(node.path(), path);
        let client = ShmTransport::open(&path).unwrap();
        assert_eq!(client.kind(), TransportKind::Shm);
        assert_eq!(client.max_op_bytes(), 4096);
        node.access().set(2, 1, 42, 43);
        let at = RemoteAddr::new(
            2 * 4096 + 8,
            RKey {
                key: 42,
                epoch: 1,
                expiry: 0,
            },
        );
        client.write(at, b"shared!!").unwrap();
        let mut b = [0u8; 8];
        node.region().read(2 * 4096 + 8, &mut b).unwrap();
        assert_eq!(&b, b"shared!!");
        assert_eq!(
            client.fetch_add(at, 1).unwrap(),
            u64::from_le_bytes(*b"shared!!")
        );
        node.access().set(2, 2, 0, 0);
        assert!(matches!(
            client.read(at, &mut b),
            Err(Error::Op(OpError::StaleEpoch {
                granted: 1,
                current: 2
            }))
        ));
        drop(node);
        assert!(!path.exists());
        // The client's mapping outlives the file.
        let _ = client.read(at, &mut b);
    }

    #[test]
    fn open_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = tmp_path(&dir);
        std::fs::write(&path, b"short").unwrap();
        let e = ShmTransport::open(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let e = ShmTransport::open(&path).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");

        let h = Header::for_geometry(4 * 4096, 4096).unwrap();
        let mut bytes = vec![0u8; 4096 * 2];
        bytes[..64].copy_from_slice(&h.encode());
        std::fs::write(&path, &bytes).unwrap();
        let e = ShmTransport::open(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        bytes[8] = 9;
        std::fs::write(&path, &bytes).unwrap();
        let e = ShmTransport::open(&path).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");

        let e = ShmTransport::open(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot open"), "{e}");
        assert!(ShmRegion::create(&path, 4096 * 3, 4096 * 2).is_err());
    }

    #[test]
    fn replaced_file_is_not_removed_by_old_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = tmp_path(&dir);
        let old = ShmRegion::create(&path, 4096, 4096).unwrap();
        let new = ShmRegion::create(&path, 4096, 4096).unwrap();
        drop(old);
        assert!(path.exists());
        drop(new);
        assert!(!path.exists());
    }
}
