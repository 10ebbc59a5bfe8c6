//! Task outputs in the pool, under the job's lease. A large output gets a [`File`] of
//! its own at `<job>/<task>`; a small one that another executor must read (a fan-in
//! parent's) is written as a record into the job's shared inline arena at
//! `<job>/@inline`, whose position and length the fan-in mark carries. Small outputs
//! otherwise never reach the pool: they travel inside invocations (Wukong) or
//! scheduler messages (centralized).
//!
//! The arena is a [`File`]; each process reserves it in chunks of [`ARENA_CHUNK`]
//! bytes (one fetch-and-add per chunk) and fills a chunk with plain WRITEs, so writing
//! a record costs one round trip and reading it (position and length are in the mark)
//! one more. Records are published by the fan-in flag CAS that carries their mark,
//! which is issued after the WRITE completed, never by the file's committed word.

use super::DagError;
use crate::client::Client;
use crate::ds::File;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Name of the inline arena under the job path (task names may not start with '@').
pub(crate) const INLINE_LOG: &str = "@inline";

/// Bytes of the inline arena a process reserves at a time.
pub(crate) const ARENA_CHUNK: u64 = 64 << 10;

/// Bits of an inline mark that hold the record's length (the rest hold its position).
pub(crate) const LEN_BITS: u32 = 20;

/// Largest inline record a mark can describe.
pub(crate) const MAX_INLINE: usize = (1 << LEN_BITS) - 1;

/// Where an inline record is: its arena position and length, packed in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InlineRef {
    pub pos: u64,
    pub len: usize,
}

impl InlineRef {
    /// The record packed as `pos << LEN_BITS | len` (below 2^62, so that the marks
    /// built on it never set the top bit, which tags outputs held in the mark itself);
    /// `None` if it does not fit.
    pub(crate) fn pack(self) -> Option<u64> {
        if self.len > MAX_INLINE || self.pos >= 1 << (64 - LEN_BITS - 2) {
            return None;
        }
        Some(self.pos << LEN_BITS | self.len as u64)
    }

    /// The inverse of [`InlineRef::pack`].
    pub(crate) fn unpack(word: u64) -> InlineRef {
        InlineRef {
            pos: word >> LEN_BITS,
            len: (word & ((1 << LEN_BITS) - 1)) as usize,
        }
    }
}

/// Where task outputs of one job live, and how many bytes moved through the pool.
#[derive(Debug)]
pub(crate) struct OutputStore {
    client: Client,
    job: String,
    inline: OnceLock<File>,
    /// This process's unfilled part of its last arena chunk: `[next, end)`.
    arena: Mutex<(u64, u64)>,
    written: AtomicU64,
    read: AtomicU64,
    freed: AtomicU64,
}

impl OutputStore {
    pub(crate) fn new(client: Client, job: String) -> Self {
        Self {
            client,
            job,
            inline: OnceLock::new(),
            arena: Mutex::new((0, 0)),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            freed: AtomicU64::new(0),
        }
    }

    /// The job's pool path.
    pub(crate) fn job(&self) -> &str {
        &self.job
    }

    fn path(&self, task: &str) -> String {
        format!("{}/{}", self.job, task)
    }

    /// Writes the output of `task`. Called once per task (the writer keeps track).
    pub(crate) fn put(&self, task: &str, bytes: &[u8]) -> Result<(), DagError> {
        let path = self.path(task);
        let mut file = File::create_at(&self.client, &path)?;
        if !file.is_empty()? {
            // A killed attempt of the same task left a partial output: start over.
            file.destroy()?;
            file = File::create_at(&self.client, &path)?;
        }
        file.append(bytes)?;
        self.written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the output of `task`, which must have been written before the reader
    /// learned it was ready (a fan-in flag or a scheduler message orders the two).
    pub(crate) fn get(&self, task: &str) -> Result<Arc<Vec<u8>>, DagError> {
        let file = File::open(&self.client, &self.path(task))?;
        let bytes = file.read_all()?;
        self.read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(Arc::new(bytes))
    }

    /// Frees the pool object holding the output of `task` (its last reader is done).
    /// Freeing one that is already gone (a retried last reader) is not an error.
    pub(crate) fn free(&self, task: &str) -> Result<(), DagError> {
        match File::open(&self.client, &self.path(task)) {
            Ok(file) => {
                file.destroy()?;
                self.freed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(crate::ds::DsError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Pool objects this process freed before the job's end.
    pub(crate) fn objects_freed(&self) -> u64 {
        self.freed.load(Ordering::Relaxed)
    }

    fn inline_log(&self) -> Result<&File, DagError> {
        if let Some(f) = self.inline.get() {
            return Ok(f);
        }
        let f = File::create_at(&self.client, &self.path(INLINE_LOG))?;
        Ok(self.inline.get_or_init(|| f))
    }

    /// Writes a small output into this process's part of the inline arena; returns
    /// where it is. One WRITE, plus one fetch-and-add when a new chunk is needed.
    pub(crate) fn put_inline(&self, bytes: &[u8]) -> Result<InlineRef, DagError> {
        let log = self.inline_log()?;
        let len = bytes.len() as u64;
        let pos = {
            let mut arena = self.arena.lock();
            if arena.1 - arena.0 < len {
                let n = len.max(ARENA_CHUNK);
                let start = log.reserve(n)?;
                *arena = (start, start + n);
            }
            let pos = arena.0;
            arena.0 += len;
            pos
        };
        log.write_reserved(pos, bytes)?;
        self.written.fetch_add(len, Ordering::Relaxed);
        Ok(InlineRef {
            pos,
            len: bytes.len(),
        })
    }

    /// Reads the inline record `at`.
    pub(crate) fn get_inline(&self, at: InlineRef) -> Result<Arc<Vec<u8>>, DagError> {
        let log = self.inline_log()?;
        let mut bytes = vec![0u8; at.len];
        if log.read_at(at.pos, &mut bytes)? < at.len {
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!(
                    "inline record of {} bytes at {} is past the arena's end",
                    at.len, at.pos
                ),
            });
        }
        self.read.fetch_add(at.len as u64, Ordering::Relaxed);
        Ok(Arc::new(bytes))
    }

    pub(crate) fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}
