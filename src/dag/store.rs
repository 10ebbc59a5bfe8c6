//! Task outputs in the pool, under the job's lease. A large output gets a [`File`] of
//! its own at `<job>/<task>`; a small one that another executor must read (a fan-in
//! parent's) is appended as a `[len u64][bytes]` record to the job's shared inline log
//! at `<job>/@inline`, whose position the fan-in flag carries. Small outputs otherwise
//! never reach the pool: they travel inside invocations (Wukong) or scheduler messages
//! (centralized).

use super::DagError;
use crate::client::Client;
use crate::ds::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Name of the inline log under the job path (task names may not start with '@').
pub(crate) const INLINE_LOG: &str = "@inline";

/// Where task outputs of one job live, and how many bytes moved through the pool.
#[derive(Debug)]
pub(crate) struct OutputStore {
    client: Client,
    job: String,
    inline: OnceLock<File>,
    written: AtomicU64,
    read: AtomicU64,
}

impl OutputStore {
    pub(crate) fn new(client: Client, job: String) -> Self {
        Self {
            client,
            job,
            inline: OnceLock::new(),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
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
        let file = File::create_at(&self.client, &self.path(task))?;
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

    fn inline_log(&self) -> Result<&File, DagError> {
        if let Some(f) = self.inline.get() {
            return Ok(f);
        }
        let f = File::create_at(&self.client, &self.path(INLINE_LOG))?;
        Ok(self.inline.get_or_init(|| f))
    }

    /// Appends a small output to the job's inline log; returns its position.
    pub(crate) fn put_inline(&self, bytes: &[u8]) -> Result<u64, DagError> {
        let mut record = Vec::with_capacity(8 + bytes.len());
        record.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        record.extend_from_slice(bytes);
        let pos = self.inline_log()?.append(&record)?;
        self.written
            .fetch_add(record.len() as u64, Ordering::Relaxed);
        Ok(pos)
    }

    /// Reads the inline record at `pos`.
    pub(crate) fn get_inline(&self, pos: u64) -> Result<Arc<Vec<u8>>, DagError> {
        let log = self.inline_log()?;
        let corrupt = |what: String| DagError::Corrupt {
            job: self.job.clone(),
            what,
        };
        let mut len = [0u8; 8];
        if log.read_at(pos, &mut len)? < 8 {
            return Err(corrupt(format!(
                "inline record at {pos} is past the log's end"
            )));
        }
        let len = usize::try_from(u64::from_le_bytes(len))
            .map_err(|_| corrupt(format!("inline record at {pos} has an impossible length")))?;
        let mut bytes = vec![0u8; len];
        if log.read_at(pos + 8, &mut bytes)? < len {
            return Err(corrupt(format!("inline record at {pos} is cut short")));
        }
        self.read.fetch_add(8 + len as u64, Ordering::Relaxed);
        Ok(Arc::new(bytes))
    }

    pub(crate) fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}
