//! `File`: a byte stream over a chain of blocks, shared by every client that opens it.

use super::notify::{EventKind, Publisher};
use super::object::{Entry, Object};
use super::DsError;
use crate::client::{BlockHandle, Client, Task};
use crate::proto::PoolPath;
use parking_lot::Mutex;
use std::io::{self, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"FPFILE01");
/// Data bytes per data block (the meta block's length).
const CHUNK: u64 = 8;
/// Bytes reserved (appends, writes past the end).
const TAIL: u64 = 16;
/// Bytes whose write has completed.
const COMMITTED: u64 = 24;

/// A file in the pool: a byte stream over a chain of blocks at `<path>/b<k>`.
///
/// Any number of clients may open the same file. [`File::append`] is atomic with
/// respect to other appends (each gets its own range, reserved with a fetch-and-add);
/// [`File::write_at`] overwrites like a shared-memory write (concurrent overlapping
/// writes or reads may tear). The file grows block by block as data arrives.
///
/// `File` also implements [`std::io::Read`], [`std::io::Write`] (at the cursor, not
/// appending) and [`std::io::Seek`] with a cursor of its own.
pub struct File {
    obj: Object,
    chunk: u64,
    blocks: Mutex<Vec<Option<BlockHandle>>>,
    /// The largest tail this handle has seen: the tail never shrinks, so reads and
    /// writes inside it need not read the tail again.
    seen: AtomicU64,
    pos: u64,
    /// Publishes appends to listeners (`None` for the event logs of notifications).
    notify: Option<Publisher>,
}

impl File {
    /// Creates the file `name` under the task's path (or opens it if it exists). It is
    /// freed with the task unless the task is finished with [`Task::finish`].
    pub fn create(task: &Task, name: &str) -> Result<File, DsError> {
        Self::create_at(task.client(), task.path().join(name)?.as_str())
    }

    /// Creates the file at the absolute `path` (or opens it if it exists). Its lease
    /// is that of the path's nearest renewed ancestor.
    pub fn create_at(client: &Client, path: &str) -> Result<File, DsError> {
        Self::create_kind(client, path, "file", MAGIC)
    }

    /// Opens the file at `path`.
    pub fn open(client: &Client, path: &str) -> Result<File, DsError> {
        Self::open_kind(client, path, "file", MAGIC)
    }

    /// A byte stream for another object kind built on it (the shared log).
    pub(crate) fn create_kind(
        client: &Client,
        path: &str,
        kind: &'static str,
        magic: u64,
    ) -> Result<File, DsError> {
        let path = PoolPath::parse(path)?;
        let obj = Object::create(client, path, kind, magic, "b", |len| Ok(vec![(CHUNK, len)]))?;
        Self::from_object(obj)
    }

    /// Opens a byte stream of another object kind.
    pub(crate) fn open_kind(
        client: &Client,
        path: &str,
        kind: &'static str,
        magic: u64,
    ) -> Result<File, DsError> {
        let path = PoolPath::parse(path)?;
        let obj = Object::open(client, path, kind, magic, "b")?;
        Self::from_object(obj)
    }

    /// The object behind the stream.
    pub(crate) fn object(&self) -> &Object {
        &self.obj
    }

    /// Frees data block `k` (a trimmed log prefix). Readers of it then see zeros or
    /// `StaleEpoch`.
    pub(crate) fn retire_block(&self, k: u64) -> Result<(), DsError> {
        if let Ok(idx) = usize::try_from(k) {
            if let Some(slot) = self.blocks.lock().get_mut(idx) {
                *slot = None;
            }
        }
        match self.obj.entry(k)? {
            Entry::Linked(id) => self.obj.retire(k, id),
            Entry::Empty | Entry::Freed => Ok(()),
        }
    }

    /// Drops cached block handles (after a `StaleEpoch`).
    pub(crate) fn forget_blocks(&self) {
        self.blocks.lock().clear();
    }

    fn from_object(obj: Object) -> Result<File, DsError> {
        let len = obj.block_len();
        let chunk = obj.word(CHUNK)?;
        if chunk == 0 || chunk > len {
            return Err(DsError::Corrupt {
                path: obj.path().clone(),
                what: format!("chunk size {chunk} for a meta block of {len} bytes"),
            });
        }
        Ok(File {
            chunk,
            blocks: Mutex::new(Vec::new()),
            seen: AtomicU64::new(0),
            pos: 0,
            notify: Some(Publisher::new(&obj, obj.client())),
            obj,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &PoolPath {
        self.obj.path()
    }

    /// Data bytes per block.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Bytes reserved so far: the end of the last append or write. Bytes reserved by
    /// writers still in flight may not be written yet (see [`File::complete_len`]).
    pub fn len(&self) -> Result<u64, DsError> {
        let tail = self.obj.word(TAIL)?;
        self.saw(tail);
        Ok(tail)
    }

    fn saw(&self, tail: u64) {
        self.seen.fetch_max(tail, Ordering::Relaxed);
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> Result<bool, DsError> {
        Ok(self.len()? == 0)
    }

    /// `Some(n)` when `[0, n)` is completely written and `n` is the length (no writer
    /// was in flight at the moment of the check); `None` while writers are in flight.
    pub fn complete_len(&self) -> Result<Option<u64>, DsError> {
        // Committed first, then the tail: see docs/DATA_STRUCTURES.md for why equal
        // values prove the prefix complete.
        let committed = self.obj.word(COMMITTED)?;
        let tail = self.obj.word(TAIL)?;
        Ok((committed == tail).then_some(tail))
    }

    /// Appends `data` atomically with respect to other appends; returns the offset it
    /// was written at.
    pub fn append(&self, data: &[u8]) -> Result<u64, DsError> {
        let pos = self.reserve(data.len() as u64)?;
        self.commit_reserved(pos, data)?;
        self.publish_append(data, pos)?;
        Ok(pos)
    }

    /// How often this handle re-reads whether anyone listens to the file (default
    /// [`super::DEFAULT_REFRESH`]); listeners must be configured with at least the
    /// longest interval of any writer ([`super::ListenerConfig::writer_refresh`]).
    pub fn set_notify_refresh(&self, refresh: Duration) {
        if let Some(n) = &self.notify {
            n.set_refresh(refresh);
        }
    }

    /// Publishes a completed append of `data` at `pos` (an Append event) to listeners.
    pub(crate) fn publish_append(&self, data: &[u8], pos: u64) -> Result<(), DsError> {
        match &self.notify {
            Some(n) => n.publish_at(EventKind::Append, data, Some(pos)),
            None => Ok(()),
        }
    }

    /// This handle, publishing nothing (for the event logs of notifications).
    pub(crate) fn quiet(mut self) -> File {
        self.notify = None;
        self
    }

    /// Reserves `n` bytes at the end; returns where they start.
    pub(crate) fn reserve(&self, n: u64) -> Result<u64, DsError> {
        let pos = self.obj.meta().faa(TAIL, n)?;
        let end = pos.checked_add(n).ok_or_else(|| self.too_long(pos, n))?;
        self.saw(end);
        Ok(pos)
    }

    /// Writes `data` into the range [`File::reserve`] returned, then publishes it.
    pub(crate) fn commit_reserved(&self, pos: u64, data: &[u8]) -> Result<(), DsError> {
        self.write_pieces(pos, data)?;
        // Publish only after the data is written (never in the same batch).
        self.obj.meta().faa(COMMITTED, data.len() as u64)?;
        Ok(())
    }

    /// Writes `data` into a range [`File::reserve`] returned without publishing it in
    /// the committed word: for owners that publish positions some other way (the DAG
    /// executor's fan-in flags), so [`File::complete_len`] of such a file stays `None`.
    pub(crate) fn write_reserved(&self, pos: u64, data: &[u8]) -> Result<(), DsError> {
        self.write_pieces(pos, data)
    }

    /// Writes `data` at `pos`, extending the file if it ends past the current length
    /// (a gap reads as zeros).
    pub fn write_at(&self, pos: u64, data: &[u8]) -> Result<(), DsError> {
        let n = data.len() as u64;
        let end = pos.checked_add(n).ok_or_else(|| self.too_long(pos, n))?;
        // Raise the tail to `end`, counting the bytes this call added.
        let mut added = 0;
        let mut cur = self.seen.load(Ordering::Relaxed);
        if cur < end {
            cur = self.len()?;
        }
        while cur < end {
            let found = self.obj.meta().cas(TAIL, cur, end)?;
            if found == cur {
                added = end - cur;
                break;
            }
            cur = found;
        }
        self.saw(end);
        self.write_pieces(pos, data)?;
        if added > 0 {
            self.obj.meta().faa(COMMITTED, added)?;
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `pos`; returns how many (0 at or past the end).
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<usize, DsError> {
        let want = pos.saturating_add(buf.len() as u64);
        let len = match self.seen.load(Ordering::Relaxed) {
            seen if seen >= want => seen,
            _ => self.len()?,
        };
        if pos >= len {
            return Ok(0);
        }
        let n = (len - pos).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let mut done = 0usize;
        while done < n {
            let at = pos + done as u64;
            let k = at / self.chunk;
            let off = at % self.chunk;
            let piece = ((self.chunk - off) as usize).min(n - done);
            let out = &mut buf[done..done + piece];
            match self.block(k, false)? {
                Some(b) => b.read(off, out)?,
                // Reserved but no block linked yet: nothing was written there.
                None => out.fill(0),
            }
            done += piece;
        }
        Ok(n)
    }

    /// Reads the whole file (up to [`File::len`]).
    pub fn read_all(&self) -> Result<Vec<u8>, DsError> {
        let len = usize::try_from(self.len()?).map_err(|_| DsError::Config(
            "the file is larger than this machine's address space; read it in pieces with read_at".into(),
        ))?;
        let mut buf = vec![0u8; len];
        let n = self.read_at(0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Removes the file and frees its blocks. Other clients' handles stop working.
    pub fn destroy(self) -> Result<(), DsError> {
        self.obj.destroy()
    }

    fn too_long(&self, pos: u64, n: u64) -> DsError {
        DsError::Config(format!(
            "writing {n} bytes at offset {pos} of '{}' overflows a 64-bit file offset",
            self.obj.path()
        ))
    }

    fn write_pieces(&self, pos: u64, data: &[u8]) -> Result<(), DsError> {
        let mut done = 0usize;
        while done < data.len() {
            let at = pos + done as u64;
            let k = at / self.chunk;
            let off = at % self.chunk;
            let piece = ((self.chunk - off) as usize).min(data.len() - done);
            let b = self.block(k, true)?.ok_or_else(|| DsError::Corrupt {
                path: self.obj.path().clone(),
                what: format!("data block {k} was freed while the file exists"),
            })?;
            b.write(off, &data[done..done + piece])?;
            done += piece;
        }
        Ok(())
    }

    /// The handle of data block `k`, linking it when `create` (else `None` if unlinked).
    fn block(&self, k: u64, create: bool) -> Result<Option<BlockHandle>, DsError> {
        let idx = usize::try_from(k).map_err(|_| DsError::DirectoryFull {
            path: self.obj.path().clone(),
            entries: self.obj.entries(),
        })?;
        if let Some(Some(b)) = self.blocks.lock().get(idx) {
            return Ok(Some(b.clone()));
        }
        let handle = if create {
            self.obj.link(k)?
        } else {
            match self.obj.entry(k)? {
                Entry::Linked(id) => self.obj.child_handle(k, id)?,
                Entry::Empty | Entry::Freed => None,
            }
        };
        if let Some(b) = &handle {
            let mut blocks = self.blocks.lock();
            if blocks.len() <= idx {
                blocks.resize(idx + 1, None);
            }
            blocks[idx] = Some(b.clone());
        }
        Ok(handle)
    }
}

fn io_err(e: DsError) -> io::Error {
    io::Error::other(e)
}

impl io::Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(self.pos, buf).map_err(io_err)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_at(self.pos, buf).map_err(io_err)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write has completed at the memory node when `write` returns.
        Ok(())
    }
}

impl io::Seek for File {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let (base, delta) = match to {
            SeekFrom::Start(p) => {
                self.pos = p;
                return Ok(p);
            }
            SeekFrom::End(d) => (self.len().map_err(io_err)?, d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        match base.checked_add_signed(delta) {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("path", self.obj.path())
            .field("chunk", &self.chunk)
            .field("pos", &self.pos)
            .finish()
    }
}
