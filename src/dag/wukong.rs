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

use super::fanin::Arrival;
use super::job::{Event, Job};
use super::plan::TaskId;
use super::DagError;
use std::collections::HashMap;
use std::sync::Arc;

/// Fan-in mark of an output stored as a pool object at `<job>/<task>`; any larger mark
/// is `2 + position` of a record in the job's inline log.
pub(crate) const MARK_OBJECT: u64 = 1;
const MARK_INLINE_BASE: u64 = 2;

/// An output an executor holds, or where in the pool to find it.
#[derive(Debug, Clone)]
enum Held {
    Bytes(Arc<Vec<u8>>),
    Mark(u64),
}

/// Invokes one executor per leaf.
pub(crate) fn start(job: &Arc<Job>) -> Result<(), DagError> {
    for &leaf in job.plan.leaves() {
        invoke(job, leaf, Vec::new())?;
    }
    Ok(())
}

fn invoke(job: &Arc<Job>, task: TaskId, known: Vec<(TaskId, Held)>) -> Result<(), DagError> {
    let j = job.clone();
    job.invoke(move || {
        if let Err(e) = run_path(&j, task, known) {
            j.fail(e);
        }
    })
}

/// One executor's private state.
struct Executor<'a> {
    job: &'a Arc<Job>,
    held: HashMap<TaskId, Held>,
    /// Marks of outputs this executor already wrote to the pool.
    stored: HashMap<TaskId, u64>,
}

impl Executor<'_> {
    /// Writes the output of `t` to the pool once; returns its mark.
    fn store(&mut self, t: TaskId, out: &[u8]) -> Result<u64, DagError> {
        if let Some(&m) = self.stored.get(&t) {
            return Ok(m);
        }
        let mark = if out.len() <= self.job.inline_limit {
            MARK_INLINE_BASE + self.job.store.put_inline(out)?
        } else {
            self.job.store.put(self.job.plan.name(t), out)?;
            MARK_OBJECT
        };
        self.stored.insert(t, mark);
        Ok(mark)
    }

    /// Fetches the parents of `t` this executor only knows the marks of.
    fn resolve_parents(&mut self, t: TaskId) -> Result<(), DagError> {
        for &p in self.job.plan.parents(t) {
            let bytes = match self.held.get(&p) {
                Some(Held::Mark(MARK_OBJECT)) => self.job.store.get(self.job.plan.name(p))?,
                Some(Held::Mark(m)) => self.job.store.get_inline(m - MARK_INLINE_BASE)?,
                _ => continue,
            };
            self.held.insert(p, Held::Bytes(bytes));
        }
        Ok(())
    }

    fn bytes(&self, t: TaskId) -> Option<Arc<Vec<u8>>> {
        match self.held.get(&t) {
            Some(Held::Bytes(b)) => Some(b.clone()),
            _ => None,
        }
    }
}

/// One executor: runs `start` and whatever its schedule lets it continue with.
fn run_path(job: &Arc<Job>, start: TaskId, known: Vec<(TaskId, Held)>) -> Result<(), DagError> {
    let plan = &job.plan;
    let mut ex = Executor {
        job,
        held: known.into_iter().collect(),
        stored: HashMap::new(),
    };
    let mut stack = vec![start];
    while let Some(t) = stack.pop() {
        if job.failed() {
            return Ok(());
        }
        ex.resolve_parents(t)?;
        let out = job.execute(t, |p| ex.bytes(p))?;
        ex.held.insert(t, Held::Bytes(out.clone()));
        let children = plan.children(t);
        if children.is_empty() {
            job.send(Event::Sink(t, out));
            continue;
        }
        let large = out.len() > job.inline_limit;
        let mut ready = Vec::with_capacity(children.len());
        for &c in children {
            let parents = plan.parents(c);
            if parents.len() == 1 {
                ready.push(c);
                continue;
            }
            // Another executor may run the child: the output must be readable first.
            let mark = ex.store(t, &out)?;
            let edge = parents
                .iter()
                .position(|&p| p == t)
                .ok_or_else(|| DagError::Corrupt {
                    job: job.store.job().to_string(),
                    what: format!("task {t} is not a parent of its child {c}"),
                })?;
            let mut arrival = job.fanin.arrive(c, edge, mark)?;
            if job.replay_fan_in {
                if let replayed @ Arrival::Run(_) = job.fanin.arrive(c, edge, mark)? {
                    arrival = replayed;
                }
            }
            if let Arrival::Run(marks) = arrival {
                for (&p, &m) in parents.iter().zip(&marks) {
                    if p != t {
                        ex.held.entry(p).or_insert(Held::Mark(m));
                    }
                }
                ready.push(c);
            }
        }
        let Some((&first, rest)) = ready.split_first() else {
            continue;
        };
        if large && job.cluster {
            // Task clustering: keep the large output here and run every child locally.
            stack.extend(ready.iter().rev());
            continue;
        }
        for &c in rest {
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
            invoke(job, c, known)?;
        }
        stack.push(first);
    }
    Ok(())
}
