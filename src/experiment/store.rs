//! Where a task's intermediate output lives: pool blocks (a task's own elastic file,
//! or blocks of its job's reservation) or, when those run out, the spill tier.

use super::data::{self, StreamKey};
use super::policy::{is_no_capacity, Reservation};
use super::spill::SpillTier;
use super::ExperimentError;
use crate::client::{BlockHandle, Client};
use crate::ds::{DsError, File};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a job's tasks put their output.
pub(crate) enum Backing {
    /// Task-level: each task allocates an elastic file of its own.
    Task,
    /// Job-level: blocks of the job's reservation.
    Reserved(Arc<Reservation>),
}

/// Counters shared by every job of a run.
#[derive(Default)]
pub(crate) struct Usage {
    /// Bytes of live intermediate data held in the pool.
    pub used: AtomicU64,
    /// Bytes written to the pool.
    pub pool_written: AtomicU64,
    /// Bytes checked after reading them back.
    pub verified: AtomicU64,
}

/// Everything a task needs to store and fetch data.
pub(crate) struct Io<'a> {
    pub client: &'a Client,
    pub spill: &'a SpillTier,
    pub usage: &'a Usage,
    pub backing: &'a Backing,
    /// Bytes per chunk: the pool's block size.
    pub chunk: u64,
    pub seed: u64,
}

enum Loc {
    /// At this position of the output's file.
    File(u64),
    /// In this reserved block, from offset 0.
    Block(BlockHandle),
    /// At this offset of the output's spilled object.
    Spill(u64),
}

struct Chunk {
    start: u64,
    len: u64,
    loc: Loc,
}

/// One task's output: where each chunk went.
pub(crate) struct Output {
    job: usize,
    stage: usize,
    task: usize,
    len: u64,
    chunks: Vec<Chunk>,
    file: Option<String>,
    spill_key: Option<String>,
    pool_bytes: u64,
    spilled: u64,
}

impl Output {
    /// Bytes written.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bytes that went to the spill tier.
    pub(crate) fn spilled(&self) -> u64 {
        self.spilled
    }
}

/// Writes `len` bytes of the stream of (`job`, `stage`, `task`) as the task's output.
/// `job_path` is the job's pool path (`/j03`), `job_key` its name in the spill tier.
pub(crate) fn write_output(
    io: &Io<'_>,
    job_path: &str,
    job: usize,
    stage: usize,
    task: usize,
    len: u64,
) -> Result<Output, ExperimentError> {
    let key = StreamKey::new(io.seed, job, stage, task);
    let task_path = format!("{job_path}/s{stage}/t{task}");
    // Task-level: the task's own path under the job, kept after the task ends (the
    // job's lease keeps it) until the consumers are done.
    let (pool_task, file) = match io.backing {
        Backing::Task => {
            let t = io
                .client
                .task(&task_path)
                .map_err(|e| ExperimentError::client(format!("open task {task_path}"), e))?;
            let f = match File::create(&t, "out") {
                Ok(f) => Some(f),
                Err(DsError::Client(e)) if is_no_capacity(&e) => None,
                Err(e) => return Err(ExperimentError::ds(format!("create {task_path}/out"), e)),
            };
            (Some(t), f)
        }
        Backing::Reserved(_) => (None, None),
    };
    let mut out = Output {
        job,
        stage,
        task,
        len,
        chunks: Vec::new(),
        file: file.as_ref().map(|f| f.path().to_string()),
        spill_key: None,
        pool_bytes: 0,
        spilled: 0,
    };
    let mut spill_buf: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; io.chunk as usize];
    let mut start = 0u64;
    while start < len {
        let n = (len - start).min(io.chunk);
        let piece = &mut buf[..n as usize];
        data::fill(key, start, piece);
        let loc = match (io.backing, &file) {
            (Backing::Task, Some(f)) => match f.append(piece) {
                Ok(pos) => Some(Loc::File(pos)),
                Err(DsError::Client(e)) if is_no_capacity(&e) => None,
                Err(e) => return Err(ExperimentError::ds(format!("append to {task_path}/out"), e)),
            },
            (Backing::Task, None) => None,
            (Backing::Reserved(r), _) => match r.take() {
                Some(b) => {
                    b.write(0, piece).map_err(|e| {
                        ExperimentError::client(format!("write reserved block for {task_path}"), e)
                    })?;
                    Some(Loc::Block(b))
                }
                None => None,
            },
        };
        let loc = match loc {
            Some(l) => {
                out.pool_bytes += n;
                io.usage.used.fetch_add(n, Ordering::Relaxed);
                io.usage.pool_written.fetch_add(n, Ordering::Relaxed);
                l
            }
            None => {
                let at = spill_buf.len() as u64;
                spill_buf.extend_from_slice(piece);
                out.spilled += n;
                Loc::Spill(at)
            }
        };
        out.chunks.push(Chunk { start, len: n, loc });
        start += n;
    }
    if !spill_buf.is_empty() {
        let k = format!("{}/s{stage}/t{task}", job_path.trim_start_matches('/'));
        io.spill.put(&k, spill_buf)?;
        out.spill_key = Some(k);
    }
    if let Some(t) = pool_task {
        t.finish()
            .map_err(|e| ExperimentError::client(format!("finish task {task_path}"), e))?;
    }
    Ok(out)
}

/// Reads bytes `[start, start + buf.len())` of several outputs, checking every byte.
/// Keeps the files it opened in `files` (one consumer's cache).
pub(crate) struct Reader<'a> {
    io: &'a Io<'a>,
    files: HashMap<String, File>,
    scratch: Vec<u8>,
}

impl<'a> Reader<'a> {
    /// A reader for one consumer.
    pub(crate) fn new(io: &'a Io<'a>) -> Self {
        Reader {
            io,
            files: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Reads `[start, end)` of `out` in pieces of at most one chunk and checks them.
    pub(crate) fn read_check(
        &mut self,
        job_id: &str,
        out: &Output,
        start: u64,
        end: u64,
    ) -> Result<(), ExperimentError> {
        let key = StreamKey::new(self.io.seed, out.job, out.stage, out.task);
        let mut buf = vec![0u8; self.io.chunk as usize];
        let end = end.min(out.len);
        // Chunks are contiguous and of equal size but the last one.
        let first = (start / self.io.chunk.max(1)) as usize;
        for c in out.chunks.iter().skip(first) {
            if c.start >= end {
                break;
            }
            let lo = start.max(c.start);
            let hi = end.min(c.start + c.len);
            if lo >= hi {
                continue;
            }
            let off = lo - c.start;
            let piece = &mut buf[..(hi - lo) as usize];
            match &c.loc {
                Loc::File(pos) => {
                    let path = out.file.as_deref().unwrap_or_default();
                    if !self.files.contains_key(path) {
                        let f = File::open(self.io.client, path)
                            .map_err(|e| ExperimentError::ds(format!("open {path}"), e))?;
                        self.files.insert(path.to_string(), f);
                    }
                    let f = self.files.get(path).ok_or_else(|| {
                        ExperimentError::Config(format!("file {path} vanished from the cache"))
                    })?;
                    let got = f
                        .read_at(pos + off, piece)
                        .map_err(|e| ExperimentError::ds(format!("read {path}"), e))?;
                    if got != piece.len() {
                        return Err(verify_error(job_id, out, lo + got as u64));
                    }
                }
                Loc::Block(b) => b.read(off, piece).map_err(|e| {
                    ExperimentError::client(format!("read reserved block of {job_id}"), e)
                })?,
                Loc::Spill(at) => {
                    let k = out.spill_key.as_deref().unwrap_or_default();
                    self.io.spill.read(k, at + off, piece)?;
                }
            }
            if let Some(bad) = data::check(key, lo, piece, &mut self.scratch) {
                return Err(verify_error(job_id, out, bad));
            }
            self.io
                .usage
                .verified
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn verify_error(job_id: &str, out: &Output, offset: u64) -> ExperimentError {
    ExperimentError::Verify {
        job: job_id.into(),
        stage: out.stage,
        task: out.task,
        offset,
    }
}

/// Frees the outputs of one stage once its consumers are done: pool memory goes back
/// to the pool (task-level) or to the job's reservation (job-level), spilled objects
/// are deleted.
pub(crate) fn free_outputs(
    io: &Io<'_>,
    job_path: &str,
    stage: usize,
    outputs: Vec<Output>,
) -> Result<(), ExperimentError> {
    let pool: u64 = outputs.iter().map(|o| o.pool_bytes).sum();
    // Used memory drops before the blocks are freed, so used never exceeds allocated.
    io.usage.used.fetch_sub(pool, Ordering::Relaxed);
    for o in &outputs {
        if let Some(k) = &o.spill_key {
            io.spill.delete(k)?;
        }
    }
    match io.backing {
        Backing::Task => {
            let path = format!("{job_path}/s{stage}");
            match io.client.remove(&path) {
                Ok(_) => {}
                // Nothing of this stage was in the pool.
                Err(crate::client::ClientError::Control(crate::proto::ControlError::NotFound(
                    _,
                ))) => {}
                Err(e) => return Err(ExperimentError::client(format!("free {path}"), e)),
            }
        }
        Backing::Reserved(r) => {
            r.give_back(outputs.into_iter().flat_map(|o| {
                o.chunks.into_iter().filter_map(|c| match c.loc {
                    Loc::Block(b) => Some(b),
                    _ => None,
                })
            }));
        }
    }
    Ok(())
}
