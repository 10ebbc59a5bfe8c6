//! Fan-in counters in pool blocks: one counter region per job.
//!
//! Every task with more than one parent gets a region of 8-byte words inside one block:
//!
//! ```text
//! [ counter | claim | flag(edge 0) | flag(edge 1) | ... ]
//! ```
//!
//! A parent arriving on edge `e` first sets `flag(e)` with CAS 0 -> mark, where the
//! nonzero mark says where the parent's output is (see `docs/DAG.md`). Only the CAS
//! winner adds 1 to `counter` with FAA, so a retried (replayed) arrival never counts
//! twice. The FAA is issued in one batch with a READ of all the child's flags. The
//! arrival that sees the counter reach the number of parents, or sees every flag set,
//! claims the child with CAS `claim` 0 -> 1, and the claimer runs it. The flags are the
//! ground truth and the counter the fast path: if an executor dies between its flag CAS
//! and its FAA, the counter stays short, but the last flag setter still sees every flag
//! set; a replay of an arrival whose flag is already set reads the flags and claims if
//! they are all set. The claim CAS lets only one of them run the child; it travels in
//! one batch with atomic reads of every flag (the marks the child needs).
//!
//! A task with exactly two parents (a **pair**: every fan-in of a tree reduction and
//! of TSQR) is claimed without a second round trip: each arrival's batch also carries
//! `CAS claim 0 -> edge + 1` and an atomic read of the other edge's flag. The claim
//! word then records which edge arrived first, once and for ever; the arrival of the
//! *other* edge runs the child. Every arrival of an edge (a first attempt or any
//! replay) reads the same word and reaches the same decision, so the child runs from
//! one edge only, and a retry of its claimer gets the claim back.

use super::plan::{Plan, TaskId};
use super::DagError;
use crate::client::{BlockHandle, Client, Task};
use std::sync::atomic::{AtomicU64, Ordering};

/// What an arrival at a fan-in means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Every parent has arrived and this caller claimed the child: it must run it.
    /// Holds every edge's mark, in the order of the child's parents.
    Run(Vec<u64>),
    /// Other parents have not arrived yet, or another arrival claimed the child.
    Wait,
}

#[derive(Debug, Clone, Copy)]
struct Region {
    block: usize,
    offset: u64,
    parents: u64,
}

const COUNTER: u64 = 0;
const CLAIM: u64 = 8;
const FLAGS: u64 = 16;
/// How long a claimer waits for a flag whose count already landed.
const FLAG_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes of per-task words: invocation, sink done, release bits.
const TASK_WORDS: u64 = 24;
/// Parents of a fan-in claimed by the first-edge record ([`FanIn::arrive_pair`]).
const PAIR: u64 = 2;

/// What the claim word of a pair says to an arrival on `edge` (0 or 1): `Some(true)`
/// if the other edge recorded itself first (this arrival runs the child),
/// `Some(false)` if this edge did or nobody had (it waits), `None` for a value no
/// arrival writes.
fn pair_decision(claim: u64, edge: usize) -> Option<bool> {
    let own = edge as u64 + 1;
    match claim {
        0 => Some(false),
        c if c == own => Some(false),
        c if c == 3 - own => Some(true),
        _ => None,
    }
}

/// The fan-in counters of one job, in blocks owned by the job's pool path.
#[derive(Debug)]
pub struct FanIn {
    job: String,
    blocks: Vec<BlockHandle>,
    regions: Vec<Option<Region>>,
    /// Every task's invocation word: (block, offset).
    starts: Vec<(usize, u64)>,
    ops: AtomicU64,
}

impl FanIn {
    /// Allocates zeroed counter blocks under `job`'s path: a region for every fan-in
    /// of `plan` and an invocation word for every task.
    pub fn create(job: &Task, plan: &Plan) -> Result<FanIn, DagError> {
        let mut blocks = job.alloc(1)?;
        let block_len = blocks.first().map(|b| b.len()).unwrap_or(0);
        let (regions, starts, count) = layout(plan, block_len)?;
        if count > 1 {
            blocks.extend(job.alloc((count - 1) as u64 * block_len)?);
        }
        Self::from_parts(&job.path().to_string(), blocks, count, regions, starts)
    }

    /// The counters of a job another process created with [`FanIn::create`] at
    /// `job` (a worker process joining the job).
    pub fn open(client: &Client, job: &str, plan: &Plan) -> Result<FanIn, DagError> {
        let blocks = client.open_blocks(job, true)?;
        let block_len = blocks.first().map(|b| b.len()).unwrap_or(0);
        let (regions, starts, count) = layout(plan, block_len)?;
        Self::from_parts(job, blocks, count, regions, starts)
    }

    fn from_parts(
        job: &str,
        blocks: Vec<BlockHandle>,
        count: usize,
        regions: Vec<Option<Region>>,
        starts: Vec<(usize, u64)>,
    ) -> Result<FanIn, DagError> {
        if blocks.len() < count {
            return Err(DagError::Corrupt {
                job: job.to_string(),
                what: format!(
                    "the job needs {count} counter blocks, the pool has {}",
                    blocks.len()
                ),
            });
        }
        Ok(FanIn {
            job: job.to_string(),
            blocks,
            regions,
            starts,
            ops: AtomicU64::new(0),
        })
    }

    /// Counters for a job without fan-ins in the pool (the centralized scheduler
    /// counts in its own memory).
    pub(crate) fn empty(job: String) -> FanIn {
        FanIn {
            job,
            blocks: Vec::new(),
            regions: Vec::new(),
            starts: Vec::new(),
            ops: AtomicU64::new(0),
        }
    }

    /// Checks an arrival's arguments and finds its child's region, block and the
    /// offset of the flag word of parent `edge`.
    fn edge(
        &self,
        child: TaskId,
        edge: usize,
        mark: u64,
        owner: u64,
    ) -> Result<(Region, &BlockHandle, u64), DagError> {
        if mark == 0 || owner == 0 {
            return Err(DagError::Config(
                "fan-in marks and owners must be nonzero (0 means 'not arrived')".to_string(),
            ));
        }
        let (region, block) = self.region(child)?;
        if edge as u64 >= region.parents {
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!("edge {edge} of a task with {} parents", region.parents),
            });
        }
        Ok((region, block, region.offset + FLAGS + 8 * edge as u64))
    }

    fn region(&self, child: TaskId) -> Result<(Region, &BlockHandle), DagError> {
        let region =
            self.regions
                .get(child)
                .copied()
                .flatten()
                .ok_or_else(|| DagError::Corrupt {
                    job: self.job.clone(),
                    what: format!("task {child} has no fan-in counter"),
                })?;
        let block = self
            .blocks
            .get(region.block)
            .ok_or_else(|| DagError::Corrupt {
                job: self.job.clone(),
                what: format!("counter block {} is missing", region.block),
            })?;
        Ok((region, block))
    }

    /// Records that the parent on `edge` (its index in the child's parents) finished,
    /// leaving `mark` (nonzero) in its flag, and says whether the caller must run
    /// `child`. `owner` (nonzero) names the calling executor; a retry of an executor
    /// uses the same owner. Safe to call again for the same edge (a retried executor):
    /// the counter is not incremented twice, the first mark stays, and the child is
    /// claimed by one owner only (a retry of the claimer gets its claim back). A child
    /// with two parents is decided by its first-edge record instead of the counter
    /// (`arrive_pair`): the other edge's arrivals, and only they, run it.
    pub fn arrive(
        &self,
        child: TaskId,
        edge: usize,
        mark: u64,
        owner: u64,
    ) -> Result<Arrival, DagError> {
        let (region, block, flag) = self.edge(child, edge, mark, owner)?;
        if region.parents == PAIR {
            return self.arrive_pair(child, region, block, edge, mark, false);
        }
        let mut flags = vec![0u8; 8 * region.parents as usize];
        let first = block.cas(flag, 0, mark)? == 0;
        let mut complete = false;
        if first {
            let before = {
                let mut ops = [
                    block.faa_op(region.offset + COUNTER, 1)?,
                    block.read_op(region.offset + FLAGS, &mut flags)?,
                ];
                block.execute(&mut ops)?;
                ops[0].result
            };
            self.ops.fetch_add(3, Ordering::Relaxed);
            if before >= region.parents {
                return Err(DagError::Corrupt {
                    job: self.job.clone(),
                    what: format!(
                        "counter of task {child} passed its {} parents",
                        region.parents
                    ),
                });
            }
            complete = before + 1 == region.parents;
        } else {
            block.read(region.offset + FLAGS, &mut flags)?;
            self.ops.fetch_add(2, Ordering::Relaxed);
        }
        // Flags are set once by CAS and never change. A READ may tear a word being
        // CASed, but any nonzero byte means that CAS has landed.
        complete = complete || flags.chunks_exact(8).all(|w| w.iter().any(|&b| b != 0));
        if !complete {
            return Ok(Arrival::Wait);
        }
        self.claim(block, region, owner)
    }

    /// [`FanIn::arrive`] for an arrival known to be the first on its edge (the first
    /// attempt of the executor that ran the parent: no earlier attempt can have set
    /// the flag). The flag CAS, the counter FAA and the flag READ go out in one batch,
    /// one round trip instead of two. Only the FAA that completes the count (or a
    /// READ that sees every flag) goes on to claim; the claim re-reads marks whose
    /// CAS is still in flight. A flag found already set means the caller broke the
    /// precondition: the extra count is taken back and the arrival is reported as
    /// corrupt. A child with two parents is decided in the same batch (`arrive_pair`):
    /// one round trip for the claimer too.
    pub fn arrive_first(
        &self,
        child: TaskId,
        edge: usize,
        mark: u64,
        owner: u64,
    ) -> Result<Arrival, DagError> {
        let (region, block, flag) = self.edge(child, edge, mark, owner)?;
        if region.parents == PAIR {
            return self.arrive_pair(child, region, block, edge, mark, true);
        }
        let mut flags = vec![0u8; 8 * region.parents as usize];
        let (was, before) = {
            let mut ops = [
                block.cas_op(flag, 0, mark)?,
                block.faa_op(region.offset + COUNTER, 1)?,
                block.read_op(region.offset + FLAGS, &mut flags)?,
            ];
            block.execute(&mut ops)?;
            (ops[0].result, ops[1].result)
        };
        self.ops.fetch_add(3, Ordering::Relaxed);
        if was != 0 {
            block.faa(region.offset + COUNTER, u64::MAX)?;
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!("a first arrival at task {child} found edge {edge} already set"),
            });
        }
        if before >= region.parents {
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!(
                    "counter of task {child} passed its {} parents",
                    region.parents
                ),
            });
        }
        let complete = before + 1 == region.parents
            || flags.chunks_exact(8).all(|w| w.iter().any(|&b| b != 0));
        if !complete {
            return Ok(Arrival::Wait);
        }
        self.claim(block, region, owner)
    }

    /// An arrival at a two-parent fan-in (a pair) on `edge`, in one round trip for a
    /// first attempt (`first`): one batch of
    ///
    /// - `CAS flag(edge): 0 -> mark` (the edge and where its output is),
    /// - `FAA counter += 1` (bookkeeping only: `total_count` checks every edge
    ///   counted once),
    /// - `CAS claim: 0 -> edge + 1` (the first edge to get here writes its number),
    /// - `CAS flag(other): 0 -> 0` (an atomic read of the other edge's mark).
    ///
    /// The claim word decides: 0 or `edge + 1` before the CAS means this edge came
    /// first (wait for the other), `other + 1` means the other edge came first and
    /// this arrival runs the child. The word is written once, so every arrival of
    /// the same edge, first attempt or replay, reads the same answer: exactly one
    /// edge runs the child, and a retry of its executor gets the claim back.
    ///
    /// A replay (`first` false) sets its flag alone first and counts only if that
    /// CAS won (the earlier attempt never set it), so it never counts twice; then it
    /// sends the claim CAS and the read in one batch.
    fn arrive_pair(
        &self,
        child: TaskId,
        region: Region,
        block: &BlockHandle,
        edge: usize,
        mark: u64,
        first: bool,
    ) -> Result<Arrival, DagError> {
        let flag = region.offset + FLAGS + 8 * edge as u64;
        let other = 1 - edge;
        let other_flag = region.offset + FLAGS + 8 * other as u64;
        let tag = edge as u64 + 1;
        let (was, counted) = if first {
            (0, true)
        } else {
            self.ops.fetch_add(1, Ordering::Relaxed);
            let was = block.cas(flag, 0, mark)?;
            (was, was == 0)
        };
        let mut ops = Vec::with_capacity(4);
        if first {
            ops.push(block.cas_op(flag, 0, mark)?);
        }
        if counted {
            ops.push(block.faa_op(region.offset + COUNTER, 1)?);
        }
        ops.push(block.cas_op(region.offset + CLAIM, 0, tag)?);
        ops.push(block.cas_op(other_flag, 0, 0)?);
        block.execute(&mut ops)?;
        self.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        let results: Vec<u64> = ops.iter().map(|op| op.result).collect();
        drop(ops);
        let (was, results) = if first {
            (results[0], &results[1..])
        } else {
            (was, &results[..])
        };
        let (before, results) = if counted {
            (Some(results[0]), &results[1..])
        } else {
            (None, results)
        };
        let (claim, other_mark) = (results[0], results[1]);
        if first && was != 0 {
            block.faa(region.offset + COUNTER, u64::MAX)?;
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!("a first arrival at task {child} found edge {edge} already set"),
            });
        }
        if before.is_some_and(|b| b >= PAIR) {
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!("counter of task {child} passed its {PAIR} parents"),
            });
        }
        match pair_decision(claim, edge) {
            None => Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!("the claim word of task {child} holds {claim}"),
            }),
            Some(false) => Ok(Arrival::Wait),
            Some(true) => {
                let own = if was != 0 { was } else { mark };
                // The other edge's claim CAS landed, but its flag CAS travels in the
                // same batch and may not have: re-read it until it is set.
                let other_mark = if other_mark != 0 {
                    other_mark
                } else {
                    self.await_flag(block, other_flag, other)?
                };
                let mut marks = vec![0u64; 2];
                marks[edge] = own;
                marks[other] = other_mark;
                Ok(Arrival::Run(marks))
            }
        }
    }

    /// Re-reads the flag at `offset` (edge `edge`) atomically until it is set; bounded
    /// by [`FLAG_WAIT`], then the state is reported as corrupt.
    fn await_flag(&self, block: &BlockHandle, offset: u64, edge: usize) -> Result<u64, DagError> {
        let deadline = std::time::Instant::now() + FLAG_WAIT;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(DagError::Corrupt {
                    job: self.job.clone(),
                    what: format!(
                        "a claimed fan-in's edge {edge} never arrived within {FLAG_WAIT:?}"
                    ),
                });
            }
            std::thread::yield_now();
            self.ops.fetch_add(1, Ordering::Relaxed);
            let m = block.cas(offset, 0, 0)?;
            if m != 0 {
                return Ok(m);
            }
        }
    }

    /// Claims a complete fan-in with `CAS claim 0 -> owner` and, in the same batch,
    /// reads every edge's mark atomically (`CAS 0 -> 0` returns the word unchanged).
    /// Every flag CAS has landed before the batch is issued (the caller saw them all
    /// set). A claim already held by `owner` (an earlier attempt of the same executor)
    /// counts as won.
    fn claim(&self, block: &BlockHandle, region: Region, owner: u64) -> Result<Arrival, DagError> {
        let mut ops = Vec::with_capacity(1 + region.parents as usize);
        ops.push(block.cas_op(region.offset + CLAIM, 0, owner)?);
        for e in 0..region.parents {
            ops.push(block.cas_op(region.offset + FLAGS + 8 * e, 0, 0)?);
        }
        block.execute(&mut ops)?;
        self.ops.fetch_add(1 + region.parents, Ordering::Relaxed);
        if ops[0].result != 0 && ops[0].result != owner {
            return Ok(Arrival::Wait);
        }
        let mut marks: Vec<u64> = ops[1..].iter().map(|op| op.result).collect();
        drop(ops);
        // A parent's flag CAS travels in one batch with its count (`arrive_first`):
        // a count can land before the flag. The flag is on its way; re-read it.
        for (e, m) in marks.iter_mut().enumerate() {
            if *m == 0 {
                *m = self.await_flag(block, region.offset + FLAGS + 8 * e as u64, e)?;
            }
        }
        Ok(Arrival::Run(marks))
    }

    /// The mark the parent on `edge` of `child` left, read atomically; 0 if it has not
    /// arrived. A retried executor uses it to find outputs its earlier attempt already
    /// stored instead of running their tasks again.
    pub fn mark(&self, child: TaskId, edge: usize) -> Result<u64, DagError> {
        let (region, block) = self.region(child)?;
        if edge as u64 >= region.parents {
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!("edge {edge} of a task with {} parents", region.parents),
            });
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
        Ok(block.cas(region.offset + FLAGS + 8 * edge as u64, 0, 0)?)
    }

    /// Records that `owner` invokes an executor for `task` (`CAS 0 -> owner` on the
    /// task's invocation word) and returns the word before: 0 if this is the first
    /// record (the caller must invoke), `owner` if an earlier attempt of the same
    /// executor recorded it (it may have died before invoking), another id if another
    /// executor did.
    pub fn begin_invoke(&self, task: TaskId, owner: u64) -> Result<u64, DagError> {
        let (block, offset) = self.word(task, 0)?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        Ok(block.cas(offset, 0, owner)?)
    }

    /// Whether an earlier attempt ran sink `task` and sent its output
    /// ([`FanIn::record_sink`]). One atomic read.
    pub fn sink_done(&self, task: TaskId) -> Result<bool, DagError> {
        let (block, offset) = self.word(task, 8)?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        Ok(block.cas(offset, 0, 0)? != 0)
    }

    /// Records that `owner` sent the output of sink `task` to the submitter.
    pub fn record_sink(&self, task: TaskId, owner: u64) -> Result<(), DagError> {
        let (block, offset) = self.word(task, 8)?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        block.cas(offset, 0, owner)?;
        Ok(())
    }

    /// Records that the consumer at `index` in `task`'s children no longer needs
    /// `task`'s pool object, by setting bit `index` of `task`'s release word with
    /// CAS (the edge CAS: a retried consumer sets the same bit again and counts
    /// nothing twice; the population count is the number of consumers done). True if
    /// the caller must free the object: it set the last bit, or it is a replay that
    /// finds every bit set (the last releaser may have died before freeing).
    /// `children` must be at most 64; wider outputs are freed with the job.
    pub fn release(&self, task: TaskId, index: usize, children: usize) -> Result<bool, DagError> {
        if index >= children || children > 64 {
            return Err(DagError::Corrupt {
                job: self.job.clone(),
                what: format!("release of consumer {index} of a task with {children} children"),
            });
        }
        let (block, offset) = self.word(task, 16)?;
        let bit = 1u64 << index;
        let full = if children == 64 {
            u64::MAX
        } else {
            (1u64 << children) - 1
        };
        // Most releases find the word they guess (0 for the first consumer).
        let mut guess = 0u64;
        loop {
            self.ops.fetch_add(1, Ordering::Relaxed);
            let seen = block.cas(offset, guess, guess | bit)?;
            if seen == guess {
                return Ok(guess | bit == full);
            }
            if seen & bit != 0 {
                return Ok(seen == full);
            }
            guess = seen;
        }
    }

    /// The block and offset of word `at` (0: invocation, 8: sink done, 16: release
    /// bits) of `task`.
    fn word(&self, task: TaskId, at: u64) -> Result<(&BlockHandle, u64), DagError> {
        let &(b, offset) = self.starts.get(task).ok_or_else(|| DagError::Corrupt {
            job: self.job.clone(),
            what: format!("task {task} has no invocation word"),
        })?;
        let block = self.blocks.get(b).ok_or_else(|| DagError::Corrupt {
            job: self.job.clone(),
            what: format!("counter block {b} is missing"),
        })?;
        Ok((block, offset + at))
    }

    /// The sum of every fan-in counter: equals the number of fan-in edges after a job
    /// in which every parent counted itself exactly once.
    pub fn total_count(&self) -> Result<u64, DagError> {
        let mut total = 0u64;
        for (b, block) in self.blocks.iter().enumerate() {
            let offsets: Vec<u64> = self
                .regions
                .iter()
                .flatten()
                .filter(|r| r.block == b)
                .map(|r| r.offset + COUNTER)
                .collect();
            if offsets.is_empty() {
                continue;
            }
            let mut words = vec![[0u8; 8]; offsets.len()];
            let mut ops = offsets
                .iter()
                .zip(words.iter_mut())
                .map(|(&off, w)| block.read_op(off, &mut w[..]))
                .collect::<Result<Vec<_>, _>>()?;
            block.execute(&mut ops)?;
            drop(ops);
            total += words.iter().map(|w| u64::from_le_bytes(*w)).sum::<u64>();
        }
        Ok(total)
    }

    /// The counter of `child`: how many distinct parents have counted themselves.
    pub fn count(&self, child: TaskId) -> Result<u64, DagError> {
        let (region, block) = self.region(child)?;
        let mut word = [0u8; 8];
        block.read(region.offset + COUNTER, &mut word)?;
        Ok(u64::from_le_bytes(word))
    }

    /// Pool operations (CAS, FAA, READ) issued so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }
}

/// Where every fan-in region and invocation word of `plan` lies in blocks of
/// `block_len` bytes: fan-in regions first, then one word per task. Returns the
/// regions, the words and the number of blocks.
#[allow(clippy::type_complexity)]
fn layout(
    plan: &Plan,
    block_len: u64,
) -> Result<(Vec<Option<Region>>, Vec<(usize, u64)>, usize), DagError> {
    let mut regions = vec![None; plan.len()];
    let mut starts = Vec::with_capacity(plan.len());
    let (mut block, mut offset) = (0usize, 0u64);
    for (t, slot) in regions.iter_mut().enumerate() {
        let parents = plan.parents(t).len() as u64;
        if parents < 2 {
            continue;
        }
        let size = FLAGS + 8 * parents;
        if size > block_len {
            return Err(DagError::FanInTooWide {
                task: plan.name(t).to_string(),
                parents: parents as usize,
                block_len,
            });
        }
        if offset + size > block_len {
            block += 1;
            offset = 0;
        }
        *slot = Some(Region {
            block,
            offset,
            parents,
        });
        offset += size;
    }
    // Per task: its invocation word, its sink-done word and its release bits.
    for _ in 0..plan.len() {
        if offset + TASK_WORDS > block_len {
            block += 1;
            offset = 0;
        }
        starts.push((block, offset));
        offset += TASK_WORDS;
    }
    Ok((regions, starts, block + 1))
}
