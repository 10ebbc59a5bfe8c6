//! The worker side of `farpool worker`: a function instance that serves invocations
//! from an invoker, one at a time, over its standard input/output (a local process
//! started by [`super::process::WorkerPool`]) or over TCP connections
//! (`farpool worker --listen ADDR`, a worker on another host: every accepted
//! connection is one function instance with its own jobs).
//!
//! A worker joins a job from its [`WorkloadSpec`](super::workloads::WorkloadSpec)
//! (task functions are code, deployed with the worker), runs Wukong invocations or
//! centrally dispatched tasks over the shared pool, and sends back the invocations it
//! makes, sink outputs, failures and per-invocation statistics. A crash injected with
//! `crash_in` kills the whole process (abort), like a killed function instance.

use super::fanin::FanIn;
use super::job::{Event, Job, Launcher};
use super::plan::{Plan, TaskId};
use super::store::OutputStore;
use super::wire::{read_frame, write_frame, Delta, FromWorker, JobSpec, TaskMsg, ToWorker};
use super::{wukong, CrashSite, DagError};
use crate::client::Client;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

/// Runs one centrally dispatched task: parents' small outputs come with it, large ones
/// are read from the pool; a large output is written to the pool unless it is a sink.
fn run_task(job: &Arc<Job>, msg: &TaskMsg) -> Result<Option<Vec<u8>>, DagError> {
    let inputs: HashMap<TaskId, Arc<Vec<u8>>> = msg
        .inputs
        .iter()
        .map(|(t, b)| (*t, Arc::new(b.clone())))
        .collect();
    let out = job.execute(msg.task, |p| inputs.get(&p).cloned())?;
    if job.crash_now(CrashSite::Task, msg.task, msg.attempt) {
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

/// The stream back to the invoker, shared by the serving loop and the job's launcher.
type Out = Arc<Mutex<Box<dyn Write + Send>>>;

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
            objects_freed: self.job.store.objects_freed(),
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
    let sink_out = out.clone();
    let mut job = Job::new(
        plan,
        registry,
        store,
        fanin,
        Launcher::Remote(Box::new(move |inv| {
            send(&invoke_out, &FromWorker::Invoke { job: id, inv }).is_ok()
        })),
        spec.inline_limit,
        spec.cluster,
        tx,
        crash_task,
        spec.crash_site,
    );
    job.free_early = spec.free_early;
    job.sink_hook = Some(Box::new(move |task, bytes| {
        let msg = FromWorker::Sink {
            job: id,
            task,
            out: bytes.to_vec(),
        };
        send(&sink_out, &msg).is_ok()
    }));
    Ok(WorkerJob {
        job: Arc::new(job),
        events: rx,
    })
}

/// Serves one invoker on `input`/`output` until `input` ends. One invocation at a
/// time, like a function instance.
pub(crate) fn serve(
    client: &Client,
    input: impl Read,
    output: Box<dyn Write + Send>,
) -> Result<(), DagError> {
    let out: Out = Arc::new(Mutex::new(output));
    let mut input = BufReader::new(input);
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
            ToWorker::Job(spec) => match join_job(client, &spec, &out) {
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

/// `farpool worker`: serves invocations read from standard input until it closes.
pub fn serve_stdio(controller: &str) -> Result<(), DagError> {
    let client = Client::connect(controller)?;
    serve(
        &client,
        std::io::stdin().lock(),
        Box::new(std::io::stdout()),
    )
}

/// `farpool worker --listen ADDR`: accepts invokers over TCP and serves every
/// connection as one function instance (a thread each), until the process is killed.
/// Prints `listening <addr>` on standard output once bound. The port has no
/// authentication: expose it only on the cluster's network.
pub fn serve_tcp(controller: &str, listen: &str) -> Result<(), DagError> {
    let client = Client::connect(controller)?;
    let listener = TcpListener::bind(listen)
        .map_err(|e| DagError::Worker(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DagError::Worker(format!("cannot read the bound address: {e}")))?;
    {
        let mut stdout = std::io::stdout().lock();
        // The announcement is for whoever started the worker; it may not listen.
        let _ = writeln!(stdout, "listening {addr}");
        let _ = stdout.flush();
    }
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an invoker failed");
                continue;
            }
        };
        let client = client.clone();
        let spawned = std::thread::Builder::new()
            .name("dag-worker-conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(e) = serve_conn(&client, stream) {
                    tracing::warn!(%peer, error = %e, "invoker connection ended with an error");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread for an invoker connection");
        }
    }
    Ok(())
}

fn serve_conn(client: &Client, stream: TcpStream) -> Result<(), DagError> {
    stream
        .set_nodelay(true)
        .map_err(|e| DagError::Worker(format!("cannot set TCP_NODELAY: {e}")))?;
    let reader = stream
        .try_clone()
        .map_err(|e| DagError::Worker(format!("cannot clone the connection: {e}")))?;
    serve(client, reader, Box::new(BufWriter::new(stream)))
}
