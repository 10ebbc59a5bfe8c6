//! The decentralized (Wukong) executor. One executor starts at each leaf and walks its
//! static schedule: after a task it keeps one ready child and invokes new executors for
//! the other ready children. A child with several parents is ready for the executor
//! whose arrival claims it ([`FanIn::arrive`](super::FanIn::arrive)). Outputs stay in
//! the executor's memory and are written to the pool only when another executor will
//! read them: before a fan-in arrival (small ones as a record in the job's inline log,
//! large ones as a pool object), or before invoking an executor for a child of a large
//! output. Small outputs travel inside invocations. An executor with a large output
//! runs all its ready children itself (task clustering) instead of invoking executors
//! that would have to read it.
//!
//! An executor that dies (a crash injected with `RuntimeConfig::crash_in`) is retried
//! by the invoker with the same start task and payload, under the same owner id
//! (`start + 1`). The retry walks the same path: a task whose output an earlier attempt
//! already stored for a fan-in is not run again (its mark is read back from the
//! child's flag), arrivals are replays (no double count), its own claims are given
//! back to it, and children it already invoked (the task's invocation word holds its
//! owner id) are not invoked again.

use super::fanin::Arrival;
use super::job::{Event, Job, Launcher, RemoteInvocation, WireHeld};
use super::plan::TaskId;
use super::store::InlineRef;
use super::{CrashSite, DagError};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Fan-in mark of an output stored as a pool object at `<job>/<task>`; any larger mark
/// is `2 + ` a packed [`InlineRef`] (position and length) of a record in the job's
/// inline arena.
pub(crate) const MARK_OBJECT: u64 = 1;
const MARK_INLINE_BASE: u64 = 2;
/// Top bit of a mark that holds the output itself: an output of at most 8 bytes
/// whose 8th byte (if any) is zero (a `u64` below 2^56, say) travels as
/// `MARK_WORD | len << 56 | first 7 bytes`, so a fan-in arrival needs no WRITE and
/// the claimer no READ for it.
const MARK_WORD: u64 = 1 << 63;

/// The mark holding `out` itself, if it fits one (see [`MARK_WORD`]).
pub(crate) fn word_mark(out: &[u8]) -> Option<u64> {
    if out.len() > 8 || out.get(7).is_some_and(|&b| b != 0) {
        return None;
    }
    let mut data = [0u8; 8];
    let n = out.len().min(7);
    data[..n].copy_from_slice(&out[..n]);
    Some(MARK_WORD | (out.len() as u64) << 56 | u64::from_le_bytes(data))
}

/// The output a [`word_mark`] holds.
pub(crate) fn word_bytes(mark: u64) -> Vec<u8> {
    let len = ((mark >> 56) & 0x7f).min(8) as usize;
    let mut data = (mark & ((1 << 56) - 1)).to_le_bytes().to_vec();
    data.truncate(len);
    data
}

/// An output an executor holds, or where in the pool to find it.
#[derive(Debug, Clone)]
enum Held {
    Bytes(Arc<Vec<u8>>),
    Mark(u64),
}

/// How often the invoker retries an executor that died.
pub(crate) const MAX_ATTEMPTS: u32 = 3;

/// Invokes one executor per leaf.
pub(crate) fn start(job: &Arc<Job>) -> Result<(), DagError> {
    for &leaf in job.plan.leaves() {
        invoke(job, leaf, Vec::new(), 0)?;
    }
    Ok(())
}

fn invoke(
    job: &Arc<Job>,
    task: TaskId,
    known: Vec<(TaskId, Held)>,
    attempt: u32,
) -> Result<(), DagError> {
    if attempt == 0 && matches!(job.launcher, Launcher::Threads(_)) && !job.first_start(task) {
        // A retried executor re-sent an invocation its dead attempt had made: the
        // invoker drops it (worker processes: the invoker in `process` does the same).
        return Ok(());
    }
    if let Launcher::Remote(send) = &job.launcher {
        job.counters.invocations.fetch_add(1, Ordering::Relaxed);
        let known = known
            .into_iter()
            .map(|(t, h)| {
                let wire = match h {
                    Held::Bytes(b) => WireHeld::Bytes(b.as_ref().clone()),
                    Held::Mark(m) => WireHeld::Mark(m),
                };
                (t, wire)
            })
            .collect();
        return if send(RemoteInvocation {
            task,
            known,
            attempt,
        }) {
            Ok(())
        } else {
            Err(DagError::ExecutorsGone)
        };
    }
    let j = job.clone();
    job.invoke(move || match run_path(&j, task, known.clone(), attempt) {
        Ok(()) => {}
        Err(DagError::ExecutorKilled { .. }) if attempt + 1 < MAX_ATTEMPTS => {
            // The platform retries a crashed invocation with the same payload.
            j.counters.retries.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = invoke(&j, task, known, attempt + 1) {
                j.fail(e);
            }
        }
        Err(e) => j.fail(e),
    })
}

/// Runs an invocation that came from another process (a worker process's executor).
pub(crate) fn run_remote(job: &Arc<Job>, inv: RemoteInvocation) -> Result<(), DagError> {
    let known = inv
        .known
        .into_iter()
        .map(|(t, w)| {
            let held = match w {
                WireHeld::Bytes(b) => Held::Bytes(Arc::new(b)),
                WireHeld::Mark(m) => Held::Mark(m),
            };
            (t, held)
        })
        .collect();
    run_path(job, inv.task, known, inv.attempt)
}

/// One executor's private state.
struct Executor<'a> {
    job: &'a Arc<Job>,
    held: HashMap<TaskId, Held>,
    /// Marks of outputs this executor already wrote to the pool.
    stored: HashMap<TaskId, u64>,
    /// Tasks whose output this executor knows is a pool object (it stored it, or it
    /// got the object's mark): their consumers release them.
    objects: HashSet<TaskId>,
    /// Consumer edges `(parent, consumer)` to release when the invocation ends (the
    /// consumer's output is not durable: a retry would run it again and read the
    /// parent's object again).
    deferred: Vec<(TaskId, TaskId)>,
}

impl Executor<'_> {
    /// Holds `h` for `t` (unless something is held already) and notes pool objects.
    fn hold(&mut self, t: TaskId, h: Held) {
        if let Held::Mark(MARK_OBJECT) = h {
            self.objects.insert(t);
        }
        self.held.entry(t).or_insert(h);
    }

    /// `t` has consumed its inputs: releases (now if `durable`, else when the
    /// invocation ends) its edge from every parent whose output is a pool object.
    /// `durable`: a retry will not run `t` again (its output is stored for a fan-in,
    /// or it is a sink whose output was sent).
    fn consumed(&mut self, t: TaskId, durable: bool) -> Result<(), DagError> {
        if !self.job.free_early {
            return Ok(());
        }
        let edges: Vec<TaskId> = self
            .job
            .plan
            .parents(t)
            .iter()
            .copied()
            .filter(|p| self.objects.contains(p))
            .collect();
        for p in edges {
            if durable {
                self.release(p, t)?;
            } else {
                self.deferred.push((p, t));
            }
        }
        Ok(())
    }

    /// Releases consumer `c`'s edge from `p`'s pool object; the last consumer frees it.
    fn release(&self, p: TaskId, c: TaskId) -> Result<(), DagError> {
        let children = self.job.plan.children(p);
        if children.len() > 64 {
            return Ok(()); // freed with the job
        }
        let Some(index) = children.iter().position(|&x| x == c) else {
            return Ok(());
        };
        if self.job.fanin.release(p, index, children.len())? {
            self.job.store.free(self.job.plan.name(p))?;
        }
        Ok(())
    }

    /// Releases the edges deferred to the end of the invocation.
    fn release_deferred(&mut self) -> Result<(), DagError> {
        for (p, c) in std::mem::take(&mut self.deferred) {
            self.release(p, c)?;
        }
        Ok(())
    }

    /// Writes the output of `t` to the pool once; returns its mark.
    fn store(&mut self, t: TaskId, out: &[u8]) -> Result<u64, DagError> {
        if let Some(&m) = self.stored.get(&t) {
            return Ok(m);
        }
        let mark = if let Some(m) = word_mark(out) {
            m
        } else if out.len() <= self.job.inline_limit {
            let at = self.job.store.put_inline(out)?;
            let packed = at.pack().ok_or_else(|| DagError::Corrupt {
                job: self.job.store.job().to_string(),
                what: format!(
                    "inline record of {} bytes at {} does not fit a fan-in mark",
                    at.len, at.pos
                ),
            })?;
            MARK_INLINE_BASE + packed
        } else {
            self.job.store.put(self.job.plan.name(t), out)?;
            self.objects.insert(t);
            MARK_OBJECT
        };
        self.stored.insert(t, mark);
        Ok(mark)
    }

    /// Fetches the parents of `t` this executor only knows the marks of.
    fn resolve_parents(&mut self, t: TaskId) -> Result<(), DagError> {
        for &p in self.job.plan.parents(t) {
            if let Some(Held::Mark(m)) = self.held.get(&p) {
                let bytes = self.fetch(p, *m)?;
                self.held.insert(p, Held::Bytes(bytes));
            }
        }
        Ok(())
    }

    fn fetch(&self, t: TaskId, mark: u64) -> Result<Arc<Vec<u8>>, DagError> {
        match mark {
            m if m & MARK_WORD != 0 => Ok(Arc::new(word_bytes(m))),
            MARK_OBJECT => self.job.store.get(self.job.plan.name(t)),
            m => self
                .job
                .store
                .get_inline(InlineRef::unpack(m - MARK_INLINE_BASE)),
        }
    }

    fn bytes(&self, t: TaskId) -> Option<Arc<Vec<u8>>> {
        match self.held.get(&t) {
            Some(Held::Bytes(b)) => Some(b.clone()),
            _ => None,
        }
    }

    /// On a retry: the mark of `t`'s output if an earlier attempt stored it for one of
    /// its fan-in children (then `t` need not run again).
    fn stored_earlier(&mut self, t: TaskId) -> Result<Option<u64>, DagError> {
        let plan = &self.job.plan;
        for &c in plan.children(t) {
            let parents = plan.parents(c);
            if parents.len() < 2 {
                continue;
            }
            let Some(edge) = parents.iter().position(|&p| p == t) else {
                continue;
            };
            let mark = self.job.fanin.mark(c, edge)?;
            if mark != 0 {
                self.stored.insert(t, mark);
                if mark == MARK_OBJECT {
                    self.objects.insert(t);
                }
                return Ok(Some(mark));
            }
        }
        Ok(None)
    }
}

/// One executor: runs `start` and whatever its schedule lets it continue with.
/// `attempt` counts earlier attempts of the same invocation that died.
fn run_path(
    job: &Arc<Job>,
    start: TaskId,
    known: Vec<(TaskId, Held)>,
    attempt: u32,
) -> Result<(), DagError> {
    let plan = &job.plan;
    let owner = start as u64 + 1;
    let mut ex = Executor {
        job,
        held: HashMap::new(),
        stored: HashMap::new(),
        objects: HashSet::new(),
        deferred: Vec::new(),
    };
    for (t, h) in known {
        ex.hold(t, h);
    }
    let mut stack = vec![start];
    while let Some(t) = stack.pop() {
        if job.failed() {
            return Ok(());
        }
        let is_sink = plan.children(t).is_empty();
        if attempt > 0 && is_sink && job.fanin.sink_done(t)? {
            // An earlier attempt ran this sink and its output reached the submitter
            // (it may have died before releasing the sink's inputs).
            ex.consumed(t, true)?;
            continue;
        }
        let recovered = if attempt > 0 {
            ex.stored_earlier(t)?
        } else {
            None
        };
        // The output, or (recovered from an earlier attempt) only its mark.
        let (out, large) = match recovered {
            Some(mark) => {
                ex.held.insert(t, Held::Mark(mark));
                (None, mark == MARK_OBJECT)
            }
            None => {
                ex.resolve_parents(t)?;
                let out = job.execute(t, |p| ex.bytes(p))?;
                if job.crash_now(CrashSite::Task, t, attempt) {
                    // Injected crash: the executor dies mid-task, before any effect
                    // of the task; everything it held is lost.
                    return Err(DagError::ExecutorKilled {
                        task: plan.name(t).to_string(),
                    });
                }
                ex.held.insert(t, Held::Bytes(out.clone()));
                let large = out.len() > job.inline_limit;
                (Some(out), large)
            }
        };
        let children = plan.children(t);
        if children.is_empty() {
            if let Some(out) = out {
                job.send(Event::Sink(t, out));
                // Recorded after the output went out: a retry skips the sink only if
                // the submitter has it (a crash in between re-sends the same value,
                // which the submitter keeps once).
                job.fanin.record_sink(t, owner)?;
            }
            ex.consumed(t, true)?;
            continue;
        }
        let mut ready = Vec::with_capacity(children.len());
        for &c in children {
            let parents = plan.parents(c);
            if parents.len() == 1 {
                ready.push(c);
                continue;
            }
            // Another executor may run the child: the output must be readable first.
            let mark = match &out {
                Some(out) => ex.store(t, out)?,
                None => ex
                    .stored
                    .get(&t)
                    .copied()
                    .ok_or_else(|| DagError::Corrupt {
                        job: job.store.job().to_string(),
                        what: format!("the recovered output of task {t} has no mark"),
                    })?,
            };
            let edge = parents
                .iter()
                .position(|&p| p == t)
                .ok_or_else(|| DagError::Corrupt {
                    job: job.store.job().to_string(),
                    what: format!("task {t} is not a parent of its child {c}"),
                })?;
            // A first attempt is certainly the edge's first arrival: flag CAS, count
            // and flag read go in one batch. A retry replays with the edge CAS first.
            let mut arrival = if attempt == 0 {
                job.fanin.arrive_first(c, edge, mark, owner)?
            } else {
                job.fanin.arrive(c, edge, mark, owner)?
            };
            if job.replay_fan_in {
                if let replayed @ Arrival::Run(_) = job.fanin.arrive(c, edge, mark, owner)? {
                    arrival = replayed;
                }
            }
            if let Arrival::Run(marks) = arrival {
                for (&p, &m) in parents.iter().zip(&marks) {
                    if p != t {
                        ex.hold(p, Held::Mark(m));
                    }
                }
                ready.push(c);
            }
        }
        // With a fan-in flag set, a retry recovers t instead of running it again.
        let durable =
            ex.stored.contains_key(&t) && children.iter().any(|&c| plan.parents(c).len() > 1);
        ex.consumed(t, durable)?;
        let Some((&first, rest)) = ready.split_first() else {
            continue;
        };
        if large && job.cluster {
            // Task clustering: keep the large output here and run every child locally.
            stack.extend(ready.iter().rev());
            continue;
        }
        for &c in rest {
            // A retry must not invoke a child its earlier attempt already invoked. If
            // the word holds this executor's own id, the dead attempt recorded the
            // invocation but may have died before making it: invoke again; the invoker
            // drops a second invocation of the same start task.
            let previous = job.fanin.begin_invoke(c, owner)?;
            if previous != 0 && (previous != owner || attempt == 0) {
                continue;
            }
            if job.crash_now(CrashSite::AfterInvokeRecord, t, attempt) {
                return Err(DagError::ExecutorKilled {
                    task: plan.name(t).to_string(),
                });
            }
            let mut known = Vec::new();
            for &p in plan.parents(c) {
                let held = match ex.held.get(&p).cloned() {
                    Some(Held::Bytes(v)) if v.len() > job.inline_limit => {
                        Held::Mark(ex.store(p, &v)?)
                    }
                    Some(h) => h,
                    None => continue,
                };
                known.push((p, held));
            }
            invoke(job, c, known, 0)?;
        }
        stack.push(first);
    }
    // Nothing of this invocation runs again: release what it deferred.
    ex.release_deferred()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_outputs_round_trip_through_a_mark() {
        for out in [
            vec![],
            vec![1],
            vec![0, 0, 0],
            1234u64.to_le_bytes().to_vec(),
            ((1u64 << 56) - 1).to_le_bytes().to_vec(),
            vec![255; 7],
        ] {
            let m = word_mark(&out).unwrap();
            assert_ne!(m, 0);
            assert!(m & MARK_WORD != 0);
            assert_eq!(word_bytes(m), out);
        }
        // Too long, or an 8th byte that is not zero: not a word mark.
        assert!(word_mark(&[0; 9]).is_none());
        assert!(word_mark(&(1u64 << 56).to_le_bytes()).is_none());
        // Arena marks never set the top bit.
        let biggest = InlineRef {
            pos: (1 << 42) - 1,
            len: crate::dag::store::MAX_INLINE,
        };
        assert!(MARK_INLINE_BASE + biggest.pack().unwrap() < MARK_WORD);
        assert!(InlineRef {
            pos: 1 << 42,
            len: 1
        }
        .pack()
        .is_none());
    }
}
