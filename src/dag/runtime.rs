//! The runtime: submits graphs as jobs with either scheduler and collects sink outputs.

use super::executor::ExecutorPool;
use super::fanin::FanIn;
use super::graph::{Graph, Registry};
use super::job::{Event, Job, Launcher};
use super::plan::{Plan, TaskId};
use super::store::OutputStore;
use super::typed::decode;
use super::{central, wukong, DagError};
use crate::client::Client;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which scheduler runs a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scheduler {
    /// Decentralized: executors schedule themselves, fan-ins resolve through counters
    /// in the pool.
    #[default]
    Wukong,
    /// Centralized baseline: one scheduler dispatches every ready task.
    Central,
}

impl std::str::FromStr for Scheduler {
    type Err = DagError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wukong" => Ok(Scheduler::Wukong),
            "central" => Ok(Scheduler::Central),
            other => Err(DagError::Config(format!(
                "unknown scheduler '{other}'; use 'wukong' or 'central'"
            ))),
        }
    }
}

/// Where an injected crash (`RuntimeConfig::crash_in`) kills the executor.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum CrashSite {
    /// After the task's function ran, before any of its effects.
    #[default]
    Task,
    /// Wukong: after the task's effects, right after its executor recorded in the
    /// pool that it invokes a child (the invocation word's CAS) and before it invoked
    /// it.
    AfterInvokeRecord,
}

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Executor threads.
    pub executors: usize,
    /// Outputs up to this many bytes travel inside invocations and scheduler messages;
    /// larger ones go through pool objects.
    pub inline_limit: usize,
    /// Wukong: an executor with a large output runs all its ready children itself.
    pub cluster_large_outputs: bool,
    /// Jobs run under the pool path `/<job_prefix>-<pid>-<n>`.
    pub job_prefix: String,
    /// Fault injection for tests: every fan-in arrival is issued twice, as by an
    /// executor retried after its arrival. Results must not change.
    pub replay_fan_in: bool,
    /// Fault injection for tests: the first executor to run the task of this name dies
    /// in the middle of it (after its function ran, before any of its effects) and is
    /// retried by the invoker. Results must not change; no counter may count twice.
    pub crash_in: Option<String>,
    /// Where in that task the injected crash happens.
    pub crash_site: CrashSite,
    /// Free every task's pool object as soon as all its consumers are done with it
    /// (Wukong: consumer bits in the pool, the last consumer frees; centralized: the
    /// scheduler frees it when the last consumer finished). Off: outputs are freed
    /// with the job.
    pub free_intermediates: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            executors: 4,
            inline_limit: 4096,
            cluster_large_outputs: true,
            job_prefix: "dag".to_string(),
            replay_fan_in: false,
            crash_in: None,
            crash_site: CrashSite::Task,
            free_intermediates: true,
        }
    }
}

/// What a job did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobStats {
    /// Tasks in the graph.
    pub tasks: u64,
    /// Task function calls (equals `tasks` unless something ran twice).
    pub tasks_run: u64,
    /// Executor invocations (Wukong) or dispatches (centralized).
    pub invocations: u64,
    /// Pool operations on fan-in counters.
    pub counter_ops: u64,
    /// Output bytes written to pool objects.
    pub bytes_written: u64,
    /// Output bytes read from pool objects.
    pub bytes_read: u64,
    /// Submission to the last sink output.
    pub makespan: Duration,
    /// Time spent inside task functions, summed over all executors.
    pub compute: Duration,
    /// Bytes a storage-based execution moves through the pool: every output another
    /// task reads, written once and read once per reader (the inputs plus outputs of
    /// the tasks; compare with `bytes_written + bytes_read`).
    pub ideal_bytes: u64,
    /// Invocations retried after their executor died.
    pub retries: u64,
    /// Wukong: the sum of all fan-in counters at the end of the job. Equals the
    /// plan's fan-in edges when every parent counted itself exactly once.
    pub fan_in_count: u64,
    /// Pool objects (large outputs) freed before the job's end, when their last
    /// consumer was done.
    pub objects_freed: u64,
}

impl JobStats {
    /// Scheduling overhead per task in microseconds with `workers` executors:
    /// `(makespan x workers - task compute) / tasks`.
    pub fn overhead_us_per_task(&self, workers: usize) -> f64 {
        let busy = self.makespan.as_secs_f64() * workers as f64 - self.compute.as_secs_f64();
        busy / self.tasks.max(1) as f64 * 1e6
    }
}

/// The sink outputs of a job, by task name, and its statistics.
#[derive(Debug, Clone)]
pub struct JobOutput {
    outputs: HashMap<String, Vec<u8>>,
    stats: JobStats,
}

impl JobOutput {
    pub(crate) fn new(outputs: HashMap<String, Vec<u8>>, stats: JobStats) -> Self {
        Self { outputs, stats }
    }

    /// The raw output of sink `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8], DagError> {
        self.outputs
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| DagError::NoSuchOutput(name.to_string()))
    }

    /// The output of sink `name` decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, DagError> {
        decode(self.bytes(name)?)
    }

    /// All sink outputs by task name.
    pub fn outputs(&self) -> &HashMap<String, Vec<u8>> {
        &self.outputs
    }

    /// What the job did.
    pub fn stats(&self) -> &JobStats {
        &self.stats
    }
}

/// Runs graphs over a pool on a set of executor threads.
pub struct DagRuntime {
    client: Client,
    registry: Arc<Registry>,
    executors: ExecutorPool,
    config: RuntimeConfig,
    next_job: AtomicU64,
}

impl DagRuntime {
    /// A runtime over `client`'s pool with the task functions of `registry`.
    pub fn new(
        client: Client,
        registry: Registry,
        config: RuntimeConfig,
    ) -> Result<DagRuntime, DagError> {
        if config.executors == 0 {
            return Err(DagError::Config("executors must be at least 1".to_string()));
        }
        if config.inline_limit > super::store::MAX_INLINE {
            return Err(DagError::Config(format!(
                "inline_limit {} is above the largest inline record, {} bytes; larger outputs go through pool objects anyway",
                config.inline_limit,
                super::store::MAX_INLINE
            )));
        }
        let executors = ExecutorPool::new(config.executors)
            .map_err(|e| DagError::Config(format!("cannot start executor threads: {e}")))?;
        Ok(DagRuntime {
            client,
            registry: Arc::new(registry),
            executors,
            config,
            next_job: AtomicU64::new(0),
        })
    }

    /// Validates `graph` against this runtime's functions.
    pub fn plan(&self, graph: &Graph) -> Result<Plan, DagError> {
        Plan::new(graph, &self.registry)
    }

    /// Runs `graph` as one job with `scheduler` and returns its sink outputs. The job's
    /// pool objects are freed when it ends, whether it succeeded or not.
    pub fn run(&self, graph: &Graph, scheduler: Scheduler) -> Result<JobOutput, DagError> {
        let plan = Arc::new(self.plan(graph)?);
        let n = self.next_job.fetch_add(1, Ordering::Relaxed);
        let path = format!("/{}-{}-{n}", self.config.job_prefix, std::process::id());
        let job_task = self.client.task(&path)?;
        let started = Instant::now();
        let result = self.run_job(&job_task, plan.clone(), scheduler, started);
        if let Err(e) = job_task.close() {
            tracing::warn!(job = %path, error = %e, "could not free the job's pool objects; its lease will reclaim them");
        }
        result
    }

    fn run_job(
        &self,
        job_task: &crate::client::Task,
        plan: Arc<Plan>,
        scheduler: Scheduler,
        started: Instant,
    ) -> Result<JobOutput, DagError> {
        let fanin = Arc::new(match scheduler {
            Scheduler::Wukong => FanIn::create(job_task, &plan)?,
            Scheduler::Central => FanIn::empty(job_task.path().to_string()),
        });
        let store = Arc::new(OutputStore::new(
            self.client.clone(),
            job_task.path().to_string(),
        ));
        let invoker = self.executors.invoker().ok_or(DagError::ExecutorsGone)?;
        let (tx, rx) = channel();
        let crash_task = match &self.config.crash_in {
            None => None,
            Some(name) => Some(plan.id(name).ok_or_else(|| {
                DagError::Config(format!(
                    "crash_in names task '{name}', which is not in the graph"
                ))
            })?),
        };
        let mut job = Job::new(
            plan.clone(),
            self.registry.clone(),
            store.clone(),
            fanin.clone(),
            Launcher::Threads(invoker),
            self.config.inline_limit,
            self.config.cluster_large_outputs,
            tx,
            crash_task,
            self.config.crash_site,
        );
        job.replay_fan_in = self.config.replay_fan_in;
        job.free_early = self.config.free_intermediates;
        let counters = job.counters.clone();
        let job = Arc::new(job);
        let sinks = match scheduler {
            Scheduler::Central => central::run(&job, &rx)?,
            Scheduler::Wukong => {
                wukong::start(&job)?;
                // Executors hold the job (and its event sender) while they run: the
                // channel closes when the last one ends.
                drop(job);
                collect_sinks(&plan, &rx)?
            }
        };
        let makespan = started.elapsed();
        let fan_in_count = match scheduler {
            Scheduler::Wukong => fanin.total_count()?,
            Scheduler::Central => 0,
        };
        let mut outputs = HashMap::with_capacity(sinks.len());
        for (t, out) in sinks {
            outputs.insert(plan.name(t).to_string(), out.as_ref().clone());
        }
        Ok(JobOutput {
            outputs,
            stats: JobStats {
                tasks: plan.len() as u64,
                tasks_run: counters.tasks_run.load(Ordering::Relaxed),
                invocations: counters.invocations.load(Ordering::Relaxed),
                counter_ops: fanin.ops(),
                bytes_written: store.bytes_written(),
                bytes_read: store.bytes_read(),
                makespan,
                compute: Duration::from_nanos(counters.compute_ns.load(Ordering::Relaxed)),
                ideal_bytes: counters.ideal_bytes.load(Ordering::Relaxed),
                retries: counters.retries.load(Ordering::Relaxed),
                fan_in_count,
                objects_freed: store.objects_freed(),
            },
        })
    }
}

/// Wukong: sink outputs until every executor has ended (or the first failure).
fn collect_sinks(
    plan: &Plan,
    events: &Receiver<Event>,
) -> Result<HashMap<TaskId, Arc<Vec<u8>>>, DagError> {
    let mut sinks = HashMap::new();
    while let Ok(event) = events.recv() {
        match event {
            Event::Sink(t, out) | Event::Done(t, Some(out)) => {
                sinks.insert(t, out);
            }
            Event::Done(_, None) => {}
            Event::Failed(e) => return Err(e),
        }
    }
    match plan.sinks().iter().find(|t| !sinks.contains_key(t)) {
        None => Ok(sinks),
        Some(&t) => Err(DagError::Stalled(plan.name(t).to_string())),
    }
}

impl std::fmt::Debug for DagRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DagRuntime")
            .field("registry", &self.registry)
            .field("executors", &self.executors.len())
            .field("config", &self.config)
            .finish()
    }
}
