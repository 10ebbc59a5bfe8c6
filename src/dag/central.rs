//! The centralized baseline: one scheduler (the submitting thread) tracks in-degrees
//! in its own memory and dispatches each ready task to the same executor pool. Small
//! outputs come back to the scheduler and go out with the next dispatch (as in Dask);
//! large ones go through the same pool objects as in the Wukong executor.

use super::job::{Event, Job};
use super::plan::TaskId;
use super::DagError;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// Runs the whole job; returns the sink outputs.
pub(crate) fn run(
    job: &Arc<Job>,
    events: &Receiver<Event>,
) -> Result<HashMap<TaskId, Arc<Vec<u8>>>, DagError> {
    let plan = &job.plan;
    let mut remaining: Vec<usize> = (0..plan.len()).map(|t| plan.parents(t).len()).collect();
    let mut inline: HashMap<TaskId, Arc<Vec<u8>>> = HashMap::new();
    let mut sinks = HashMap::new();
    let mut readers = Readers::new(plan);
    for &leaf in plan.leaves() {
        dispatch(job, leaf, Vec::new())?;
    }
    let mut done = 0;
    while done < plan.len() {
        let event = events.recv().map_err(|_| DagError::ExecutorsGone)?;
        let (t, out) = match event {
            Event::Done(t, out) => (t, out),
            Event::Failed(e) => return Err(e),
            Event::Sink(t, out) => (t, Some(out)),
        };
        done += 1;
        match out {
            Some(out) if plan.children(t).is_empty() => {
                sinks.insert(t, out);
            }
            Some(out) => {
                inline.insert(t, out);
            }
            None => readers.object(t),
        }
        if job.free_early {
            for p in readers.finished(plan, t) {
                job.store.free(plan.name(p))?;
            }
        }
        for &c in plan.children(t) {
            remaining[c] -= 1;
            if remaining[c] == 0 {
                let known = plan
                    .parents(c)
                    .iter()
                    .filter_map(|p| inline.get(p).map(|v| (*p, v.clone())))
                    .collect();
                dispatch(job, c, known)?;
            }
        }
    }
    Ok(sinks)
}

/// The centralized scheduler's count of consumers still to finish per pool object:
/// a task's object is freed when its last consumer finished (a crashed dispatch is
/// retried before it counts as finished, so nothing frees an input still needed).
pub(crate) struct Readers {
    left: Vec<usize>,
    objects: Vec<bool>,
}

impl Readers {
    pub(crate) fn new(plan: &super::plan::Plan) -> Readers {
        Readers {
            left: (0..plan.len()).map(|t| plan.children(t).len()).collect(),
            objects: vec![false; plan.len()],
        }
    }

    /// `t`'s output is a pool object.
    pub(crate) fn object(&mut self, t: TaskId) {
        if let Some(o) = self.objects.get_mut(t) {
            *o = true;
        }
    }

    /// `t` finished: the objects of its parents it was the last consumer of.
    pub(crate) fn finished(&mut self, plan: &super::plan::Plan, t: TaskId) -> Vec<TaskId> {
        let mut free = Vec::new();
        for &p in plan.parents(t) {
            self.left[p] -= 1;
            if self.left[p] == 0 && self.objects[p] {
                free.push(p);
            }
        }
        free
    }
}

fn dispatch(
    job: &Arc<Job>,
    task: TaskId,
    known: Vec<(TaskId, Arc<Vec<u8>>)>,
) -> Result<(), DagError> {
    let j = job.clone();
    job.invoke(move || {
        let result = j.execute(task, |p| {
            known.iter().find(|(k, _)| *k == p).map(|(_, v)| v.clone())
        });
        let out = match result {
            Ok(out) => out,
            Err(e) => return j.fail(e),
        };
        if j.crash_now(super::CrashSite::Task, task, 0) {
            // Injected crash: this executor died mid-task; the scheduler dispatches
            // the task again.
            j.counters.retries.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = dispatch(&j, task, known) {
                j.fail(e);
            }
            return;
        }
        let is_sink = j.plan.children(task).is_empty();
        if is_sink || out.len() <= j.inline_limit {
            j.send(Event::Done(task, Some(out)));
        } else {
            match j.store.put(j.plan.name(task), &out) {
                Ok(()) => j.send(Event::Done(task, None)),
                Err(e) => j.fail(e),
            }
        }
    })
}
