//! One running job: what both schedulers share (plan, functions, output store,
//! fan-in counters, executor invoker, event channel to the submitter, statistics).

use super::executor::Invoker;
use super::fanin::FanIn;
use super::graph::Registry;
use super::plan::{Plan, Source, TaskId};
use super::store::OutputStore;
use super::typed::Inputs;
use super::{CrashSite, DagError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

/// What executors tell the submitter.
pub(crate) enum Event {
    /// A sink finished with this output.
    Sink(TaskId, Arc<Vec<u8>>),
    /// (Centralized) a task finished; small outputs come along, large ones are in the
    /// pool.
    Done(TaskId, Option<Arc<Vec<u8>>>),
    /// The job failed.
    Failed(DagError),
}

/// An invocation that crosses a process boundary (see [`super::process`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RemoteInvocation {
    /// The task the new executor starts at.
    pub task: TaskId,
    /// Parent outputs (or their marks) travelling with the invocation.
    pub known: Vec<(TaskId, WireHeld)>,
    /// Earlier attempts of this invocation that died.
    pub attempt: u32,
}

/// A parent output inside an invocation: the bytes, or where they are in the pool.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) enum WireHeld {
    Bytes(Vec<u8>),
    Mark(u64),
}

/// How a job starts executors.
pub(crate) enum Launcher {
    /// Threads of this process's executor pool.
    Threads(Invoker),
    /// Worker processes: the function hands the invocation to the invoker; false if
    /// it is gone.
    Remote(Box<dyn Fn(RemoteInvocation) -> bool + Send + Sync>),
}

/// Sends a sink output out of the process; false if the receiver is gone.
pub(crate) type SinkHook = Box<dyn Fn(TaskId, &[u8]) -> bool + Send + Sync>;

/// Per-job counts shared by the executors and the submitter.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub tasks_run: AtomicU64,
    pub invocations: AtomicU64,
    /// Nanoseconds spent inside task functions.
    pub compute_ns: AtomicU64,
    /// Bytes a storage-based execution would move: every output that another task
    /// reads, written once and read once per reader.
    pub ideal_bytes: AtomicU64,
    /// Invocations retried after their executor died.
    pub retries: AtomicU64,
}

pub(crate) struct Job {
    pub plan: Arc<Plan>,
    pub registry: Arc<Registry>,
    pub store: Arc<OutputStore>,
    pub fanin: Arc<FanIn>,
    pub counters: Arc<Counters>,
    pub launcher: Launcher,
    pub inline_limit: usize,
    pub cluster: bool,
    pub replay_fan_in: bool,
    pub events: Sender<Event>,
    pub failed: AtomicBool,
    /// Fault injection: the first executor to run this task dies in the middle of it.
    pub crash_task: Option<TaskId>,
    /// Where in that task the injected crash happens.
    pub crash_site: CrashSite,
    pub crashed: AtomicBool,
    /// Worker processes: sends a sink's output to the invoker at once (before the
    /// executor goes on), instead of with the invocation's other events at its end.
    pub sink_hook: Option<SinkHook>,
    /// Free a task's pool object once all its consumers are done with it (else with
    /// the job).
    pub free_early: bool,
    /// Start tasks of the invocations made so far (thread executors): the invoker
    /// drops a second invocation of the same start task (see [`Job::first_start`]).
    started: Vec<AtomicBool>,
}

impl Job {
    /// A job with fresh counters.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        plan: Arc<Plan>,
        registry: Arc<Registry>,
        store: Arc<OutputStore>,
        fanin: Arc<FanIn>,
        launcher: Launcher,
        inline_limit: usize,
        cluster: bool,
        events: Sender<Event>,
        crash_task: Option<TaskId>,
        crash_site: CrashSite,
    ) -> Job {
        let started = (0..plan.len()).map(|_| AtomicBool::new(false)).collect();
        Job {
            plan,
            registry,
            store,
            fanin,
            counters: Arc::new(Counters::default()),
            launcher,
            inline_limit,
            cluster,
            replay_fan_in: false,
            events,
            failed: AtomicBool::new(false),
            crash_task,
            crash_site,
            crashed: AtomicBool::new(false),
            sink_hook: None,
            free_early: true,
            started,
        }
    }

    /// Whether no invocation starting at `t` was made yet in this job (and records
    /// one). Every task starts at most one invocation in a job (a leaf, or the child a
    /// single executor hands off), so a second one is a retried executor re-sending an
    /// invocation its dead attempt may already have made: the invoker drops it (an
    /// idempotency key of (job, start task)).
    pub(crate) fn first_start(&self, t: TaskId) -> bool {
        self.started
            .get(t)
            .map(|s| !s.swap(true, Ordering::Relaxed))
            .unwrap_or(false)
    }

    /// Whether the job already failed (executors stop at their next task).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Whether the executor that just ran `t` must die now (injected crash; once per
    /// job).
    pub(crate) fn crash_now(&self, site: CrashSite, t: TaskId, attempt: u32) -> bool {
        attempt == 0
            && self.crash_site == site
            && self.crash_task == Some(t)
            && !self.crashed.swap(true, Ordering::Relaxed)
    }

    /// Reports the first failure; later ones are dropped.
    pub(crate) fn fail(&self, e: DagError) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            // The submitter may have given up already; nothing else to tell.
            let _ = self.events.send(Event::Failed(e));
        }
    }

    pub(crate) fn send(&self, event: Event) {
        if let (Event::Sink(t, out), Some(hook)) = (&event, &self.sink_hook) {
            if hook(*t, out) {
                return;
            }
        }
        // A closed channel means the submitter gave up (the job failed).
        let _ = self.events.send(event);
    }

    /// Queues `work` on a free executor thread.
    pub(crate) fn invoke(&self, work: impl FnOnce() + Send + 'static) -> Result<(), DagError> {
        self.counters.invocations.fetch_add(1, Ordering::Relaxed);
        let started = match &self.launcher {
            Launcher::Threads(invoker) => invoker.invoke(work),
            Launcher::Remote(_) => {
                return Err(DagError::Config(
                    "this scheduler cannot run on worker processes".to_string(),
                ))
            }
        };
        if started {
            Ok(())
        } else {
            Err(DagError::ExecutorsGone)
        }
    }

    /// Runs task `t`: gathers its inputs (from `local` where present, else from the
    /// pool) and calls its function, turning errors and panics into
    /// [`DagError::TaskFailed`].
    pub(crate) fn execute(
        &self,
        t: TaskId,
        local: impl Fn(TaskId) -> Option<Arc<Vec<u8>>>,
    ) -> Result<Arc<Vec<u8>>, DagError> {
        let task = &self.plan.tasks[t];
        let mut inputs = Inputs::default();
        for (name, source) in &task.inputs {
            let value = match source {
                Source::Const(bytes) => bytes.clone(),
                Source::Parent(edge) => {
                    let p = task.parents[*edge];
                    match local(p) {
                        Some(v) => v,
                        None => self.store.get(self.plan.name(p))?,
                    }
                }
            };
            inputs.insert(name.clone(), value);
        }
        let function =
            self.registry
                .get(&task.function)
                .ok_or_else(|| DagError::UnknownFunction {
                    task: task.name.clone(),
                    function: task.function.clone(),
                })?;
        self.counters.tasks_run.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| function(&inputs)));
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counters.compute_ns.fetch_add(ns, Ordering::Relaxed);
        match result {
            Ok(Ok(out)) => {
                let readers = task.children.len() as u64;
                if readers > 0 {
                    self.counters
                        .ideal_bytes
                        .fetch_add(out.len() as u64 * (1 + readers), Ordering::Relaxed);
                }
                Ok(Arc::new(out))
            }
            Ok(Err(e)) => Err(DagError::TaskFailed {
                task: task.name.clone(),
                message: e.0,
            }),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the function panicked".to_string());
                Err(DagError::TaskFailed {
                    task: task.name.clone(),
                    message: format!("panicked: {message}"),
                })
            }
        }
    }
}
