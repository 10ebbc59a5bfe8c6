//! Executors as processes: `farpool worker --controller ADDR` processes stand in for
//! serverless function instances. A [`WorkerPool`] (the invoker) starts them, reuses
//! them across invocations and jobs, hands each invocation to an idle one, restarts
//! one that died and retries the invocation it was running. Workers run the Wukong
//! executor over the same pool as the submitter: fan-in counters, the inline arena and
//! pool objects are shared through the pool; invocations they make, sink outputs and
//! statistics come back to the invoker over the worker's standard output.
//!
//! Task functions are code, so a worker must have them: `farpool worker` knows the
//! built-in workloads and rebuilds a job's graph and functions from its
//! [`WorkloadSpec`]. Both schedulers run on worker processes: Wukong invocations (the
//! worker runs a path and resolves fan-ins in the pool), or single tasks dispatched by
//! the centralized scheduler in the invoker (small outputs come back to it and go out
//! with the next dispatch, large ones go through pool objects).
//!
//! Messages are bincode frames with a 4-byte little-endian length, on the worker's
//! standard input (invoker to worker) and standard output (worker to invoker).

use super::fanin::FanIn;
use super::job::{Counters, Event, Job, Launcher, RemoteInvocation};
use super::plan::{Plan, TaskId};
use super::runtime::{JobOutput, JobStats, Scheduler};
use super::store::OutputStore;
use super::workloads::WorkloadSpec;
use super::{wukong, DagError};
use crate::client::Client;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest frame accepted (a 2 MiB matrix block travels inside an invocation at most).
const MAX_FRAME: usize = 256 << 20;

/// What a worker needs to join a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobSpec {
    id: u64,
    path: String,
    workload: WorkloadSpec,
    inline_limit: usize,
    cluster: bool,
    crash_in: Option<String>,
    /// Wukong jobs have fan-in counters in the pool; centralized ones do not.
    counters: bool,
}

/// One task dispatched by the centralized scheduler, with the small outputs of its
/// parents (large ones are pool objects).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskMsg {
    task: TaskId,
    inputs: Vec<(TaskId, Vec<u8>)>,
    attempt: u32,
}

#[derive(Debug, Serialize, Deserialize)]
enum ToWorker {
    Job(JobSpec),
    Invoke { job: u64, inv: RemoteInvocation },
    Run { job: u64, task: TaskMsg },
    EndJob(u64),
}

/// What one invocation did, as counted by the worker.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Delta {
    tasks_run: u64,
    invocations: u64,
    compute_ns: u64,
    ideal_bytes: u64,
    bytes_written: u64,
    bytes_read: u64,
    counter_ops: u64,
}

impl Delta {
    fn since(&self, before: &Delta) -> Delta {
        Delta {
            tasks_run: self.tasks_run - before.tasks_run,
            invocations: self.invocations - before.invocations,
            compute_ns: self.compute_ns - before.compute_ns,
            ideal_bytes: self.ideal_bytes - before.ideal_bytes,
            bytes_written: self.bytes_written - before.bytes_written,
            bytes_read: self.bytes_read - before.bytes_read,
            counter_ops: self.counter_ops - before.counter_ops,
        }
    }

    fn add(&mut self, d: &Delta) {
        self.tasks_run += d.tasks_run;
        self.invocations += d.invocations;
        self.compute_ns += d.compute_ns;
        self.ideal_bytes += d.ideal_bytes;
        self.bytes_written += d.bytes_written;
        self.bytes_read += d.bytes_read;
        self.counter_ops += d.counter_ops;
    }
}

/// Runs one centrally dispatched task: parents' small outputs come with it, large ones
/// are read from the pool; a large output is written to the pool unless it is a sink.
fn run_task(job: &Arc<Job>, msg: &TaskMsg) -> Result<Option<Vec<u8>>, DagError> {
    let inputs: HashMap<TaskId, Arc<Vec<u8>>> = msg
        .inputs
        .iter()
        .map(|(t, b)| (*t, Arc::new(b.clone())))
        .collect();
    let out = job.execute(msg.task, |p| inputs.get(&p).cloned())?;
    if job.crash_now(msg.task, msg.attempt) {
        std::process::abort();
    }
    let is_sink = job.plan.children(msg.task).is_empty();
    if is_sink || out.len() <= job.inline_limit {
        Ok(Some(out.as_ref().clone()))
    } else {
        job.store.put(job.plan.name(msg.task), &out)?;
        Ok(None)
    }
}

/// Every request that runs something (`Invoke`, `Run`) ends with exactly one `Done` or
/// `TaskDone`; `Failed` comes before it when something went wrong.
#[derive(Debug, Serialize, Deserialize)]
enum FromWorker {
    Invoke {
        job: u64,
        inv: RemoteInvocation,
    },
    Sink {
        job: u64,
        task: TaskId,
        out: Vec<u8>,
    },
    Failed {
        job: u64,
        message: String,
    },
    Done {
        job: u64,
        delta: Delta,
    },
    /// A centrally dispatched task finished: small (or sink) outputs come along,
    /// large ones are pool objects.
    TaskDone {
        job: u64,
        task: TaskId,
        out: Option<Vec<u8>>,
        delta: Delta,
    },
}

fn write_frame<T: Serialize>(out: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let bytes = bincode::serialize(msg).map_err(std::io::Error::other)?;
    let len =
        u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("frame larger than 4 GiB"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&bytes)?;
    out.flush()
}

/// The next frame, or `None` at end of stream.
fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is larger than {MAX_FRAME}"
        )));
    }
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf)?;
    bincode::deserialize(&buf)
        .map(Some)
        .map_err(std::io::Error::other)
}

type Out = Arc<Mutex<std::io::Stdout>>;

fn send(out: &Out, msg: &FromWorker) -> Result<(), DagError> {
    write_frame(&mut *out.lock(), msg)
        .map_err(|e| DagError::Worker(format!("cannot write to the invoker: {e}")))
}

/// Reports that a request for `job` failed with `message`.
fn send_failed(out: &Out, job: u64, message: String) -> Result<(), DagError> {
    send(out, &FromWorker::Failed { job, message })
}

/// Reports that a request for `job` failed, then ends it (every run request ends with
/// one `Done` or `TaskDone`).
fn send_failed_done(out: &Out, job: u64, message: String, delta: Delta) -> Result<(), DagError> {
    send_failed(out, job, message)?;
    send(out, &FromWorker::Done { job, delta })
}

struct WorkerJob {
    job: Arc<Job>,
    events: Receiver<Event>,
}

impl WorkerJob {
    fn snapshot(&self) -> Delta {
        let c = &self.job.counters;
        Delta {
            tasks_run: c.tasks_run.load(Ordering::Relaxed),
            invocations: c.invocations.load(Ordering::Relaxed),
            compute_ns: c.compute_ns.load(Ordering::Relaxed),
            ideal_bytes: c.ideal_bytes.load(Ordering::Relaxed),
            bytes_written: self.job.store.bytes_written(),
            bytes_read: self.job.store.bytes_read(),
            counter_ops: self.job.fanin.ops(),
        }
    }
}

fn join_job(client: &Client, spec: &JobSpec, out: &Out) -> Result<WorkerJob, DagError> {
    let workload = spec.workload.build()?;
    let registry = Arc::new(workload.registry().clone());
    let plan = Arc::new(Plan::new(workload.graph(), &registry)?);
    let fanin = Arc::new(if spec.counters {
        FanIn::open(client, &spec.path, &plan)?
    } else {
        FanIn::empty(spec.path.clone())
    });
    let store = Arc::new(OutputStore::new(client.clone(), spec.path.clone()));
    let crash_task = match &spec.crash_in {
        None => None,
        Some(name) => Some(plan.id(name).ok_or_else(|| {
            DagError::Config(format!(
                "crash_in names task '{name}', which is not in the graph"
            ))
        })?),
    };
    let (tx, rx) = channel();
    let id = spec.id;
    let invoke_out = out.clone();
    let job = Arc::new(Job {
        plan,
        registry,
        store,
        fanin,
        counters: Arc::new(Counters::default()),
        launcher: Launcher::Remote(Box::new(move |inv| {
            send(&invoke_out, &FromWorker::Invoke { job: id, inv }).is_ok()
        })),
        inline_limit: spec.inline_limit,
        cluster: spec.cluster,
        replay_fan_in: false,
        events: tx,
        failed: Default::default(),
        crash_task,
        crashed: Default::default(),
    });
    Ok(WorkerJob { job, events: rx })
}

/// `farpool worker`: serves invocations read from standard input until it closes.
/// One invocation at a time, like a function instance. A crash injected with
/// `crash_in` kills the process (abort) in the middle of the task.
pub fn serve_stdio(controller: &str) -> Result<(), DagError> {
    let client = Client::connect(controller)?;
    let out: Out = Arc::new(Mutex::new(std::io::stdout()));
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut jobs: HashMap<u64, WorkerJob> = HashMap::new();
    loop {
        let msg: ToWorker = match read_frame(&mut input) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(DagError::Worker(format!(
                    "bad message from the invoker: {e}"
                )))
            }
        };
        match msg {
            ToWorker::Job(spec) => match join_job(&client, &spec, &out) {
                Ok(j) => {
                    jobs.insert(spec.id, j);
                }
                Err(e) => send_failed(&out, spec.id, e.to_string())?,
            },
            ToWorker::EndJob(id) => {
                jobs.remove(&id);
            }
            ToWorker::Run { job, task } => {
                let Some(wj) = jobs.get(&job) else {
                    let message = "task for a job this worker has not joined".into();
                    send_failed_done(&out, job, message, Delta::default())?;
                    continue;
                };
                let before = wj.snapshot();
                match run_task(&wj.job, &task) {
                    Ok(result) => send(
                        &out,
                        &FromWorker::TaskDone {
                            job,
                            task: task.task,
                            out: result,
                            delta: wj.snapshot().since(&before),
                        },
                    )?,
                    Err(e) => {
                        let delta = wj.snapshot().since(&before);
                        send_failed_done(&out, job, e.to_string(), delta)?;
                    }
                }
            }
            ToWorker::Invoke { job, inv } => {
                let Some(wj) = jobs.get(&job) else {
                    let message = "invocation for a job this worker has not joined".into();
                    send_failed_done(&out, job, message, Delta::default())?;
                    continue;
                };
                let before = wj.snapshot();
                let result = wukong::run_remote(&wj.job, inv);
                if let Err(DagError::ExecutorKilled { .. }) = result {
                    // Injected crash: die like a killed function instance.
                    std::process::abort();
                }
                while let Ok(event) = wj.events.try_recv() {
                    let msg = match event {
                        Event::Sink(task, bytes) | Event::Done(task, Some(bytes)) => {
                            FromWorker::Sink {
                                job,
                                task,
                                out: bytes.as_ref().clone(),
                            }
                        }
                        Event::Done(_, None) => continue,
                        Event::Failed(e) => FromWorker::Failed {
                            job,
                            message: e.to_string(),
                        },
                    };
                    send(&out, &msg)?;
                }
                let delta = wj.snapshot().since(&before);
                match result {
                    Err(e) => send_failed_done(&out, job, e.to_string(), delta)?,
                    Ok(_) => send(&out, &FromWorker::Done { job, delta })?,
                }
            }
        }
    }
}

/// Settings of a [`WorkerPool`].
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The farpool binary to run as `farpool worker`.
    pub bin: PathBuf,
    /// Controller address the workers connect to.
    pub controller: String,
    /// Worker processes.
    pub workers: usize,
    /// Outputs up to this many bytes travel inline.
    pub inline_limit: usize,
    /// Task clustering for large outputs.
    pub cluster_large_outputs: bool,
    /// Fault injection: the worker that first runs this task aborts in the middle of
    /// it; the invoker restarts a worker and retries the invocation.
    pub crash_in: Option<String>,
}

struct Worker {
    /// Unique over the pool's life (a restarted worker gets a new one).
    id: u64,
    child: Child,
    stdin: ChildStdin,
    /// What it runs.
    busy: Option<Work>,
}

type Message = (u64, Option<FromWorker>);

/// A unit of work for one worker.
#[derive(Debug, Clone)]
enum Work {
    /// A Wukong executor invocation.
    Invoke(RemoteInvocation),
    /// One task dispatched by the centralized scheduler.
    Task(TaskMsg),
}

impl Work {
    fn task(&self) -> TaskId {
        match self {
            Work::Invoke(i) => i.task,
            Work::Task(t) => t.task,
        }
    }

    fn retried(mut self) -> (Work, u32) {
        let attempt = match &mut self {
            Work::Invoke(i) => &mut i.attempt,
            Work::Task(t) => &mut t.attempt,
        };
        *attempt += 1;
        let a = *attempt;
        (self, a)
    }

    fn message(&self, job: u64) -> ToWorker {
        match self {
            Work::Invoke(inv) => ToWorker::Invoke {
                job,
                inv: inv.clone(),
            },
            Work::Task(task) => ToWorker::Run {
                job,
                task: task.clone(),
            },
        }
    }
}

/// The invoker of worker processes: starts `workers` of them on first use, reuses
/// them for every invocation and job, and restarts one that dies.
pub struct WorkerPool {
    config: WorkerConfig,
    workers: Vec<Worker>,
    next_worker: u64,
    tx: Sender<Message>,
    rx: Receiver<Message>,
    next_job: AtomicU64,
}

impl WorkerPool {
    /// A pool that starts its processes when the first job runs.
    pub fn new(config: WorkerConfig) -> Result<WorkerPool, DagError> {
        if config.workers == 0 {
            return Err(DagError::Config("workers must be at least 1".into()));
        }
        let (tx, rx) = channel();
        Ok(WorkerPool {
            config,
            workers: Vec::new(),
            next_worker: 0,
            tx,
            rx,
            next_job: AtomicU64::new(0),
        })
    }

    fn spawn(&mut self) -> Result<Worker, DagError> {
        let mut child = Command::new(&self.config.bin)
            .args(["worker", "--controller", &self.config.controller])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                DagError::Worker(format!(
                    "cannot start {} worker: {e}; set WorkerConfig::bin to the farpool binary",
                    self.config.bin.display()
                ))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DagError::Worker("worker started without pipes".into()));
        };
        let id = self.next_worker;
        self.next_worker += 1;
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name(format!("dag-worker-{id}"))
            .spawn(move || {
                let mut input = BufReader::new(stdout);
                loop {
                    match read_frame::<FromWorker>(&mut input) {
                        Ok(Some(msg)) => {
                            if tx.send((id, Some(msg))).is_err() {
                                return;
                            }
                        }
                        Ok(None) | Err(_) => {
                            let _ = tx.send((id, None));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| DagError::Worker(format!("cannot start a reader thread: {e}")))?;
        Ok(Worker {
            id,
            child,
            stdin,
            busy: None,
        })
    }

    /// After a failed job: waits (up to a minute) until every worker has finished what
    /// it was given, so the next job starts with idle workers; replaces workers that
    /// died or did not finish.
    fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.workers.iter().any(|w| w.busy.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match self.rx.recv_timeout(left) {
                Ok(m) => m,
                Err(_) => break,
            };
            let Some(slot) = self.workers.iter().position(|w| w.id == msg.0) else {
                continue;
            };
            match msg.1 {
                Some(FromWorker::Done { .. } | FromWorker::TaskDone { .. }) => {
                    self.workers[slot].busy = None;
                }
                Some(_) => {}
                None => {
                    let mut dead = self.workers.remove(slot);
                    let _ = dead.child.kill();
                    let _ = dead.child.wait();
                }
            }
        }
        // Workers still busy after the deadline are stuck: stop them (the next job
        // starts new ones).
        let mut i = 0;
        while i < self.workers.len() {
            if self.workers[i].busy.is_some() {
                let mut w = self.workers.remove(i);
                let _ = w.child.kill();
                let _ = w.child.wait();
            } else {
                i += 1;
            }
        }
    }

    /// Changes the fault injection of later jobs ([`WorkerConfig::crash_in`]).
    pub fn set_crash_in(&mut self, task: Option<String>) {
        self.config.crash_in = task;
    }

    /// Worker processes alive now.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether no worker process runs (before the first job).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Process ids of the workers (to kill one from outside, for example).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    /// Runs `spec` as one job with `scheduler` on the worker processes and returns its
    /// sink outputs. `client` creates and frees the job's pool objects.
    pub fn run(
        &mut self,
        client: &Client,
        spec: WorkloadSpec,
        scheduler: Scheduler,
    ) -> Result<JobOutput, DagError> {
        let workload = spec.build()?;
        let plan = Plan::new(workload.graph(), workload.registry())?;
        let n = self.next_job.fetch_add(1, Ordering::Relaxed);
        let path = format!("/dagw-{}-{n}", std::process::id());
        let job_task = client.task(&path)?;
        let started = Instant::now();
        let result = self.run_job(&job_task, &plan, spec, scheduler, n, &path, started);
        if result.is_err() {
            self.drain();
        }
        for w in &mut self.workers {
            let _ = write_frame(&mut w.stdin, &ToWorker::EndJob(n));
        }
        if let Err(e) = job_task.close() {
            tracing::warn!(job = %path, error = %e, "could not free the job's pool objects; its lease will reclaim them");
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn run_job(
        &mut self,
        job_task: &crate::client::Task,
        plan: &Plan,
        workload: WorkloadSpec,
        scheduler: Scheduler,
        id: u64,
        path: &str,
        started: Instant,
    ) -> Result<JobOutput, DagError> {
        let fanin = match scheduler {
            Scheduler::Wukong => Some(FanIn::create(job_task, plan)?),
            Scheduler::Central => None,
        };
        let spec = JobSpec {
            id,
            path: path.to_string(),
            workload,
            inline_limit: self.config.inline_limit,
            cluster: self.config.cluster_large_outputs,
            crash_in: self.config.crash_in.clone(),
            counters: fanin.is_some(),
        };
        while self.workers.len() < self.config.workers {
            let w = self.spawn()?;
            self.workers.push(w);
        }
        for w in &mut self.workers {
            write_frame(&mut w.stdin, &ToWorker::Job(spec.clone()))
                .map_err(|e| DagError::Worker(format!("cannot reach worker {}: {e}", w.id)))?;
        }
        let mut pending: VecDeque<Work> = plan
            .leaves()
            .iter()
            .map(|&task| match scheduler {
                Scheduler::Wukong => Work::Invoke(RemoteInvocation {
                    task,
                    known: Vec::new(),
                    attempt: 0,
                }),
                Scheduler::Central => Work::Task(TaskMsg {
                    task,
                    inputs: Vec::new(),
                    attempt: 0,
                }),
            })
            .collect();
        let mut stats = Delta {
            invocations: pending.len() as u64,
            ..Delta::default()
        };
        let mut retries = 0u64;
        let mut outstanding = pending.len();
        let mut sinks: HashMap<TaskId, Vec<u8>> = HashMap::new();
        // Centralized scheduler state: parents still running, small outputs held.
        let mut remaining: Vec<usize> = (0..plan.len()).map(|t| plan.parents(t).len()).collect();
        let mut inline: HashMap<TaskId, Vec<u8>> = HashMap::new();
        while outstanding > 0 {
            for w in &mut self.workers {
                if w.busy.is_some() {
                    continue;
                }
                let Some(work) = pending.pop_front() else {
                    break;
                };
                let msg = work.message(id);
                w.busy = Some(work);
                // A worker that cannot be written to has died: its reader reports it.
                let _ = write_frame(&mut w.stdin, &msg);
            }
            let (wid, msg) = self
                .rx
                .recv_timeout(Duration::from_secs(600))
                .map_err(|_| DagError::Worker("no worker made progress for 600 s".into()))?;
            let Some(slot) = self.workers.iter().position(|w| w.id == wid) else {
                continue; // a worker already replaced
            };
            match msg {
                Some(FromWorker::Invoke { job, inv }) if job == id => {
                    pending.push_back(Work::Invoke(inv));
                    outstanding += 1;
                }
                Some(FromWorker::Sink { job, task, out }) if job == id => {
                    sinks.insert(task, out);
                }
                Some(FromWorker::Failed { job, message }) if job == id => {
                    return Err(DagError::Worker(message));
                }
                Some(FromWorker::Done { job, delta }) if job == id => {
                    self.workers[slot].busy = None;
                    outstanding -= 1;
                    stats.add(&delta);
                }
                Some(FromWorker::TaskDone {
                    job,
                    task,
                    out,
                    delta,
                }) if job == id => {
                    self.workers[slot].busy = None;
                    outstanding -= 1;
                    stats.add(&delta);
                    if let Some(out) = out {
                        if plan.children(task).is_empty() {
                            sinks.insert(task, out);
                        } else {
                            inline.insert(task, out);
                        }
                    }
                    for &c in plan.children(task) {
                        remaining[c] -= 1;
                        if remaining[c] == 0 {
                            let inputs = plan
                                .parents(c)
                                .iter()
                                .filter_map(|p| inline.get(p).map(|v| (*p, v.clone())))
                                .collect();
                            pending.push_back(Work::Task(TaskMsg {
                                task: c,
                                inputs,
                                attempt: 0,
                            }));
                            stats.invocations += 1;
                            outstanding += 1;
                        }
                    }
                }
                Some(FromWorker::Done { .. } | FromWorker::TaskDone { .. }) => {
                    // The end of work of an earlier job that failed.
                    self.workers[slot].busy = None;
                }
                Some(_) => {} // a message of an earlier job
                None => {
                    // The worker died: restart one and retry what it was running.
                    let mut dead = self.workers.remove(slot);
                    let _ = dead.child.kill();
                    let _ = dead.child.wait();
                    if let Some(work) = dead.busy.take() {
                        let task = work.task();
                        let (work, attempt) = work.retried();
                        if attempt >= wukong::MAX_ATTEMPTS {
                            return Err(DagError::ExecutorKilled {
                                task: plan.name(task).to_string(),
                            });
                        }
                        retries += 1;
                        stats.invocations += 1;
                        pending.push_front(work);
                    }
                    let mut w = self.spawn()?;
                    write_frame(&mut w.stdin, &ToWorker::Job(spec.clone())).map_err(|e| {
                        DagError::Worker(format!("cannot reach worker {}: {e}", w.id))
                    })?;
                    self.workers.push(w);
                }
            }
        }
        let makespan = started.elapsed();
        if let Some(&t) = plan.sinks().iter().find(|t| !sinks.contains_key(t)) {
            return Err(DagError::Stalled(plan.name(t).to_string()));
        }
        let fan_in_count = match &fanin {
            Some(f) => f.total_count()?,
            None => 0,
        };
        let outputs = sinks
            .into_iter()
            .map(|(t, out)| (plan.name(t).to_string(), out))
            .collect();
        Ok(JobOutput::new(
            outputs,
            JobStats {
                tasks: plan.len() as u64,
                tasks_run: stats.tasks_run,
                invocations: stats.invocations,
                counter_ops: stats.counter_ops,
                bytes_written: stats.bytes_written,
                bytes_read: stats.bytes_read,
                makespan,
                compute: Duration::from_nanos(stats.compute_ns),
                ideal_bytes: stats.ideal_bytes,
                retries,
                fan_in_count,
            },
        ))
    }
}

impl Drop for WorkerPool {
    /// Closes every worker's input (it exits) and reaps it.
    fn drop(&mut self) {
        for mut w in self.workers.drain(..) {
            drop(w.stdin);
            if w.child.wait().is_err() {
                let _ = w.child.kill();
            }
        }
    }
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("config", &self.config)
            .field("workers", &self.workers.len())
            .finish()
    }
}
