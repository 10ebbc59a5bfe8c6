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
//! Workers on other hosts: with [`WorkerConfig::remote`] the invoker connects to
//! `farpool worker --listen ADDR` processes over TCP instead of starting local ones;
//! every connection is one function instance. A connection that breaks (the worker
//! died) has its invocation retried on another connection, and the invoker reconnects,
//! trying every address in turn; it goes on with fewer connections while some
//! addresses are unreachable.
//!
//! Messages ([`super::wire`]) are length-prefixed bincode frames, on the worker's
//! standard input/output or its TCP connection.

use super::central::Readers;
use super::fanin::FanIn;
use super::job::RemoteInvocation;
use super::plan::{Plan, TaskId};
use super::runtime::{JobOutput, JobStats, Scheduler};
use super::store::OutputStore;
use super::wire::{read_frame, write_frame, Delta, FromWorker, JobSpec, TaskMsg, ToWorker};
use super::workloads::WorkloadSpec;
use super::{wukong, CrashSite, DagError};
use crate::client::Client;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

pub use super::worker::{serve_stdio, serve_tcp};

/// How long the invoker waits for a TCP connection to a remote worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Where in that task the worker aborts.
    pub crash_site: CrashSite,
    /// Free pool objects when their last consumer is done
    /// ([`RuntimeConfig::free_intermediates`](super::RuntimeConfig::free_intermediates)).
    pub free_intermediates: bool,
    /// Addresses (`host:port`) of `farpool worker --listen` processes. When set, the
    /// invoker opens `workers` TCP connections spread over them instead of starting
    /// local processes (`bin` is unused).
    pub remote: Vec<String>,
}

/// How the invoker reaches a worker.
enum Link {
    /// A child process over pipes.
    Local(Child),
    /// A TCP connection to a remote worker.
    Remote { addr: String, stream: TcpStream },
}

struct Worker {
    /// Unique over the pool's life (a restarted worker gets a new one).
    id: u64,
    link: Link,
    input: Box<dyn Write + Send>,
    /// What it runs.
    busy: Option<Work>,
}

impl Worker {
    /// Stops the worker: kills a local process, closes a connection.
    fn stop(mut self) {
        match &mut self.link {
            Link::Local(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Link::Remote { stream, .. } => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
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
    /// The remote address the next connection tries first.
    next_addr: usize,
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
            next_addr: 0,
        })
    }

    /// Starts a worker: a local process, or a connection to the first remote address
    /// (round robin) that answers.
    fn spawn(&mut self) -> Result<Worker, DagError> {
        if self.config.remote.is_empty() {
            return self.spawn_local();
        }
        let mut failures = Vec::new();
        for _ in 0..self.config.remote.len() {
            let addr = self.config.remote[self.next_addr % self.config.remote.len()].clone();
            self.next_addr = self.next_addr.wrapping_add(1);
            match connect(&addr) {
                Ok(stream) => {
                    let reader = stream.try_clone().map_err(|e| {
                        DagError::Worker(format!("cannot clone the connection to {addr}: {e}"))
                    })?;
                    let writer = stream.try_clone().map_err(|e| {
                        DagError::Worker(format!("cannot clone the connection to {addr}: {e}"))
                    })?;
                    return self.attach(
                        Link::Remote { addr, stream },
                        Box::new(BufWriter::new(writer)),
                        Box::new(reader),
                    );
                }
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
        }
        Err(DagError::Worker(format!(
            "no remote worker reachable ({}); start `farpool worker --listen ADDR` there or fix --worker-addrs",
            failures.join("; ")
        )))
    }

    /// Starts workers until there are `workers` of them; with remote workers, goes on
    /// with fewer while at least one is reachable.
    fn fill(&mut self) -> Result<(), DagError> {
        while self.workers.len() < self.config.workers {
            match self.spawn() {
                Ok(w) => self.workers.push(w),
                Err(e) if self.workers.is_empty() || self.config.remote.is_empty() => {
                    return Err(e)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "going on with fewer worker connections");
                    break;
                }
            }
        }
        Ok(())
    }

    fn spawn_local(&mut self) -> Result<Worker, DagError> {
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
        self.attach(Link::Local(child), Box::new(stdin), Box::new(stdout))
    }

    /// A worker over `link` with a thread that forwards what it sends.
    fn attach(
        &mut self,
        link: Link,
        input: Box<dyn Write + Send>,
        output: Box<dyn Read + Send>,
    ) -> Result<Worker, DagError> {
        let id = self.next_worker;
        self.next_worker += 1;
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name(format!("dag-worker-{id}"))
            .spawn(move || {
                let mut input = BufReader::new(output);
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
            link,
            input,
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
                None => self.workers.remove(slot).stop(),
            }
        }
        // Workers still busy after the deadline are stuck: stop them (the next job
        // starts new ones).
        let mut i = 0;
        while i < self.workers.len() {
            if self.workers[i].busy.is_some() {
                self.workers.remove(i).stop();
            } else {
                i += 1;
            }
        }
    }

    /// Changes the fault injection of later jobs ([`WorkerConfig::crash_in`]).
    pub fn set_crash_in(&mut self, task: Option<String>) {
        self.config.crash_in = task;
    }

    /// Changes where later jobs' injected crash happens ([`WorkerConfig::crash_site`]).
    pub fn set_crash_site(&mut self, site: CrashSite) {
        self.config.crash_site = site;
    }

    /// Workers (processes or connections) alive now.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether no worker process runs (before the first job).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Process ids of the local workers (to kill one from outside, for example).
    pub fn pids(&self) -> Vec<u32> {
        self.workers
            .iter()
            .filter_map(|w| match &w.link {
                Link::Local(c) => Some(c.id()),
                Link::Remote { .. } => None,
            })
            .collect()
    }

    /// Addresses of the remote workers connected now, one per connection.
    pub fn remote_addrs(&self) -> Vec<String> {
        self.workers
            .iter()
            .filter_map(|w| match &w.link {
                Link::Local(_) => None,
                Link::Remote { addr, .. } => Some(addr.clone()),
            })
            .collect()
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
            let _ = write_frame(&mut w.input, &ToWorker::EndJob(n));
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
            crash_site: self.config.crash_site,
            counters: fanin.is_some(),
            free_early: self.config.free_intermediates,
        };
        self.fill()?;
        for w in &mut self.workers {
            // A worker that cannot be written to has died: its reader reports it.
            let _ = write_frame(&mut w.input, &ToWorker::Job(spec.clone()));
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
        // Start tasks of the invocations accepted: a retried executor may re-send an
        // invocation its dead attempt had made (see `Job::first_start`); drop it.
        let mut invoked: HashSet<TaskId> = plan.leaves().iter().copied().collect();
        let mut sinks: HashMap<TaskId, Vec<u8>> = HashMap::new();
        // Centralized scheduler state: parents still running, small outputs held.
        let mut remaining: Vec<usize> = (0..plan.len()).map(|t| plan.parents(t).len()).collect();
        let mut inline: HashMap<TaskId, Vec<u8>> = HashMap::new();
        let mut readers = Readers::new(plan);
        let store = OutputStore::new(job_task.client().clone(), path.to_string());
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
                let _ = write_frame(&mut w.input, &msg);
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
                    if invoked.insert(inv.task) {
                        pending.push_back(Work::Invoke(inv));
                        outstanding += 1;
                    } else {
                        // Counted by the worker; this one is dropped.
                        stats.invocations = stats.invocations.saturating_sub(1);
                    }
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
                    match out {
                        Some(out) if plan.children(task).is_empty() => {
                            sinks.insert(task, out);
                        }
                        Some(out) => {
                            inline.insert(task, out);
                        }
                        None => readers.object(task),
                    }
                    if self.config.free_intermediates {
                        for p in readers.finished(plan, task) {
                            store.free(plan.name(p))?;
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
                    // The worker died: retry what it was running, then restart one
                    // (or reconnect).
                    let dead = self.workers.remove(slot);
                    let work = {
                        let mut dead = dead;
                        let work = dead.busy.take();
                        dead.stop();
                        work
                    };
                    if let Some(work) = work {
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
                    match self.spawn() {
                        Ok(mut w) => {
                            let _ = write_frame(&mut w.input, &ToWorker::Job(spec.clone()));
                            self.workers.push(w);
                        }
                        Err(e) if self.workers.is_empty() => return Err(e),
                        Err(e) => {
                            tracing::warn!(error = %e, "a worker died; going on with fewer");
                        }
                    }
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
                objects_freed: stats.objects_freed + store.objects_freed(),
            },
        ))
    }
}

impl Drop for WorkerPool {
    /// Closes every worker's input (it exits) and reaps it.
    fn drop(&mut self) {
        for w in self.workers.drain(..) {
            let Worker { link, input, .. } = w;
            drop(input);
            match link {
                Link::Local(mut child) => {
                    if child.wait().is_err() {
                        let _ = child.kill();
                    }
                }
                Link::Remote { stream, .. } => {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
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

/// A TCP connection to a remote worker at `addr`.
fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the address resolved to nothing")))
}
