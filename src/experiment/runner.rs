//! Runs a workload on an embedded pool: every job alone on an unlimited pool (the
//! baseline), then all jobs together under one policy on a pool of fixed capacity.

use super::metrics::{time_weighted, JobResult, PolicyReport, RunMeasurements, Sample};
use super::policy::{Admission, Policy};
use super::spill::SpillTier;
use super::store::{free_outputs, write_output, Backing, Io, Output, Reader, Usage};
use super::workload::{JobSpec, StageSpec, Workload};
use super::ExperimentError;
use crate::client::{Client, ClientError};
use crate::embedded::{EmbeddedConfig, EmbeddedPool};
use crate::proto::ControlError;
use farpool_rdma::TransportKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of an experiment run.
#[derive(Debug, Clone)]
pub struct ExperimentConfig {
    /// Pool capacity shared by all jobs, split over the memory nodes.
    pub capacity: u64,
    /// Block size (also the chunk in which tasks write).
    pub block_size: u64,
    /// Data-plane transport of the embedded pool.
    pub transport: TransportKind,
    /// Number of memory nodes.
    pub nodes: usize,
    /// Seed of the data tasks write (and of the generated workload).
    pub seed: u64,
    /// Interval between memory samples.
    pub sample_interval: Duration,
    /// Directory of the spill tier; `None`: a fresh one under the system temporary
    /// directory, removed afterwards.
    pub spill_dir: Option<PathBuf>,
    /// Flush every spilled object to disk before acknowledging it.
    pub spill_sync: bool,
    /// Memory nodes' heartbeat interval (a node is declared dead after three missed).
    /// Long by default: on a small shared machine a heartbeat delayed by a second must
    /// not get a live node declared dead mid-run; failure detection is not what is
    /// measured. Stopping a pool waits up to one interval per node.
    pub heartbeat: Duration,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            capacity: 256 << 20,
            block_size: 64 << 10,
            transport: TransportKind::Shm,
            nodes: 2,
            seed: 1,
            sample_interval: Duration::from_millis(20),
            spill_dir: None,
            spill_sync: true,
            heartbeat: Duration::from_secs(2),
        }
    }
}

impl ExperimentConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ExperimentError> {
        if !self.block_size.is_power_of_two() || self.block_size < 4096 {
            return Err(ExperimentError::Config(format!(
                "block size {} must be a power of two of at least 4096 (--block-size)",
                self.block_size
            )));
        }
        if self.nodes == 0 {
            return Err(ExperimentError::Config("at least one memory node".into()));
        }
        if self.per_node(self.capacity) < 2 * self.block_size {
            return Err(ExperimentError::Config(format!(
                "capacity {} gives each of the {} memory nodes fewer than two blocks of {} bytes; raise --capacity",
                self.capacity, self.nodes, self.block_size
            )));
        }
        if matches!(self.transport, TransportKind::Verbs) {
            return Err(ExperimentError::Config(
                "the experiment runs an embedded pool on soft or shm (--transport)".into(),
            ));
        }
        Ok(())
    }

    /// Region size per node for a pool of `capacity`, in whole blocks.
    fn per_node(&self, capacity: u64) -> u64 {
        capacity / self.nodes as u64 / self.block_size * self.block_size
    }

    /// The capacity actually used (whole blocks on every node).
    pub fn effective_capacity(&self) -> u64 {
        self.per_node(self.capacity) * self.nodes as u64
    }
}

/// A job's run alone on an unlimited pool.
#[derive(Debug, Clone, PartialEq)]
pub struct AloneRun {
    /// Job id.
    pub job: String,
    /// Completion time, ms.
    pub completion_ms: f64,
    /// Wall time of each stage and of the final collection, ms.
    pub phase_ms: Vec<f64>,
    /// Pool memory the job held, time-weighted over its run (sampled like the
    /// policies' runs): the job's profiled average demand.
    pub mean_allocated: u64,
}

struct Ctx<'a> {
    pool: &'a EmbeddedPool,
    spill: &'a SpillTier,
    usage: &'a Usage,
    admission: &'a Admission,
    cfg: &'a ExperimentConfig,
}

struct JobOutcome {
    wait_ms: f64,
    completion_ms: f64,
    finish: Instant,
    reserved: u64,
    spilled: u64,
    phase_ms: Vec<f64>,
}

fn start_pool(cfg: &ExperimentConfig, capacity: u64) -> Result<EmbeddedPool, ExperimentError> {
    Ok(EmbeddedPool::start(EmbeddedConfig {
        nodes: cfg.nodes,
        capacity: cfg.per_node(capacity).max(cfg.block_size),
        block_size: cfg.block_size,
        transport: cfg.transport,
        // The experiment shares a small machine with its own threads (and, on a
        // developer's machine, with builds): a lease renewal delayed by a second must
        // not get a job's data reclaimed mid-run (see also `heartbeat`).
        heartbeat: cfg.heartbeat,
        lease: Duration::from_secs(30),
        grace: Duration::from_secs(10),
        ..EmbeddedConfig::default()
    })?)
}

fn open_spill(cfg: &ExperimentConfig, tag: &str) -> Result<SpillTier, ExperimentError> {
    match &cfg.spill_dir {
        Some(d) => SpillTier::open(&d.join(tag), true, cfg.spill_sync),
        None => SpillTier::open(&SpillTier::temp_dir(tag), true, cfg.spill_sync),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs every job alone, one after the other, on a pool big enough for any of them
/// (task-level allocation; nothing spills). These are the baselines of the slowdowns.
pub fn run_alone(
    workload: &Workload,
    cfg: &ExperimentConfig,
) -> Result<Vec<AloneRun>, ExperimentError> {
    let block = cfg.block_size;
    // Twice the largest peak plus a file meta block per task: more than any one job
    // can hold at a time.
    let max_peak = workload
        .jobs
        .iter()
        .map(|j| j.peak_demand(block))
        .max()
        .unwrap_or(0);
    let tasks: u64 = workload
        .jobs
        .iter()
        .flat_map(|j| j.stages.iter().map(|s| u64::from(s.tasks)))
        .max()
        .unwrap_or(1);
    let capacity = 2 * max_peak + 4 * (tasks + 4) * block * cfg.nodes as u64;
    let pool = start_pool(cfg, capacity)?;
    let spill = open_spill(cfg, "alone")?;
    let usage = Usage::default();
    let admission = Admission::default();
    let ctx = Ctx {
        pool: &pool,
        spill: &spill,
        usage: &usage,
        admission: &admission,
        cfg,
    };
    let sampler_client = pool
        .client()
        .map_err(|e| ExperimentError::client("connect the memory sampler", e))?;
    let mut runs = Vec::with_capacity(workload.jobs.len());
    for (idx, job) in workload.jobs.iter().enumerate() {
        let start = Instant::now();
        let (out, samples) = while_sampling(&sampler_client, &usage, start, cfg, || {
            run_job(&ctx, idx, job, None)
        });
        let out = out?;
        let mean_allocated = time_weighted(&samples?).mean_allocated.round() as u64;
        if out.spilled > 0 {
            return Err(ExperimentError::Config(format!(
                "job {} spilled {} bytes when running alone on a pool of {capacity} bytes; the baseline must not spill (this is a bug)",
                job.id, out.spilled
            )));
        }
        runs.push(AloneRun {
            job: job.id.clone(),
            completion_ms: out.completion_ms,
            phase_ms: out.phase_ms,
            mean_allocated,
        });
    }
    Ok(runs)
}

/// What each job reserves under `policy` (`None` for task-level allocation): its peak
/// demand (from its stages' sizes), or its average demand: the pool memory it held,
/// time-weighted, when it ran alone (from the stages' sizes weighted by the phases'
/// durations if no profile was measured); at least one block and at most the pool's
/// capacity.
pub fn reservation(
    policy: Policy,
    job: &JobSpec,
    alone: Option<&AloneRun>,
    cfg: &ExperimentConfig,
) -> Option<u64> {
    let block = cfg.block_size;
    let bytes = match policy {
        Policy::Task => return None,
        Policy::JobPeak => job.peak_demand(block),
        Policy::JobAvg => match alone {
            Some(a) if a.mean_allocated > 0 => a.mean_allocated,
            _ => job.average_demand(block, alone.map_or(&[][..], |a| &a.phase_ms)),
        },
    };
    let capacity = cfg.effective_capacity();
    Some(
        bytes
            .div_ceil(block)
            .max(1)
            .saturating_mul(block)
            .min(capacity),
    )
}

/// Runs all jobs of `workload` concurrently, each arriving at its time, under
/// `policy`, on a fresh pool of `cfg.capacity`; slowdowns are against `alone`.
pub fn run_policy(
    workload: &Workload,
    cfg: &ExperimentConfig,
    policy: Policy,
    alone: &[AloneRun],
) -> Result<PolicyReport, ExperimentError> {
    let pool = start_pool(cfg, cfg.capacity)?;
    let spill = open_spill(cfg, policy.name())?;
    let usage = Usage::default();
    let admission = Admission::default();
    let ctx = Ctx {
        pool: &pool,
        spill: &spill,
        usage: &usage,
        admission: &admission,
        cfg,
    };
    let sampler_client = pool
        .client()
        .map_err(|e| ExperimentError::client("connect the memory sampler", e))?;
    let start = Instant::now();
    let (outcomes, samples) = while_sampling(&sampler_client, &usage, start, cfg, || {
        std::thread::scope(|s| {
            let jobs: Vec<_> = workload
                .jobs
                .iter()
                .enumerate()
                .map(|(idx, job)| {
                    let ctx = &ctx;
                    let reserve = reservation(policy, job, alone.get(idx), cfg);
                    s.spawn(move || {
                        let at = start + Duration::from_millis(job.arrival_ms);
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                        run_job(ctx, idx, job, reserve)
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(ExperimentError::Panicked("job driver".into())))
                })
                .collect::<Vec<Result<JobOutcome, ExperimentError>>>()
        })
    });
    let samples = samples?;
    let mut jobs = Vec::with_capacity(outcomes.len());
    let mut last = start;
    for ((idx, job), out) in workload.jobs.iter().enumerate().zip(outcomes) {
        let out = out?;
        last = last.max(out.finish);
        let alone_ms = alone.get(idx).map_or(f64::NAN, |a| a.completion_ms);
        jobs.push(JobResult {
            job: job.id.clone(),
            arrival_ms: job.arrival_ms as f64,
            wait_ms: out.wait_ms,
            completion_ms: out.completion_ms,
            alone_ms,
            slowdown: out.completion_ms / alone_ms,
            reserved_bytes: out.reserved,
            spilled_bytes: out.spilled,
            phase_ms: out.phase_ms,
        });
    }
    let first = workload.jobs.first().map_or(0, |j| j.arrival_ms) as f64;
    Ok(PolicyReport::new(
        policy,
        RunMeasurements {
            jobs,
            samples,
            spilled_bytes: spill.bytes_written(),
            spill_read_bytes: spill.bytes_read(),
            pool_written_bytes: usage.pool_written.load(Ordering::Relaxed),
            verified_bytes: usage.verified.load(Ordering::Relaxed),
            capacity_bytes: cfg.effective_capacity(),
            block_bytes: cfg.block_size,
            makespan_ms: ms(last - start) - first,
        },
    ))
}

/// Samples allocated (from the controller) and used memory until `stop`.
/// Runs `f` while a thread samples the pool's memory use from `start` on; returns
/// what `f` returned and the samples.
fn while_sampling<T>(
    client: &Client,
    usage: &Usage,
    start: Instant,
    cfg: &ExperimentConfig,
    f: impl FnOnce() -> T,
) -> (T, Result<Vec<Sample>, ExperimentError>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| sample_memory(client, usage, &stop, start, cfg));
        let out = f();
        stop.store(true, Ordering::Relaxed);
        let samples = sampler
            .join()
            .unwrap_or_else(|_| Err(ExperimentError::Panicked("memory sampler".into())));
        (out, samples)
    })
}

fn sample_memory(
    client: &Client,
    usage: &Usage,
    stop: &AtomicBool,
    start: Instant,
    cfg: &ExperimentConfig,
) -> Result<Vec<Sample>, ExperimentError> {
    let mut samples = Vec::new();
    loop {
        let done = stop.load(Ordering::Relaxed);
        // Used first: it rises only after blocks are allocated and falls before they
        // are freed, so reading it first keeps used <= allocated in a sample.
        let used = usage.used.load(Ordering::Relaxed);
        let st = client
            .status()
            .map_err(|e| ExperimentError::client("sample pool memory", e))?;
        samples.push(Sample {
            t_ms: ms(start.elapsed()),
            allocated: st.used_bytes,
            used,
        });
        if done {
            return Ok(samples);
        }
        std::thread::sleep(cfg.sample_interval);
    }
}

/// Runs one job from its arrival: reserve (job-level policies), run the stages, read
/// the result, free everything.
fn run_job(
    ctx: &Ctx<'_>,
    idx: usize,
    job: &JobSpec,
    reserve: Option<u64>,
) -> Result<JobOutcome, ExperimentError> {
    let arrived = Instant::now();
    let client = ctx
        .pool
        .client()
        .map_err(|e| ExperimentError::client(format!("connect job {}", job.id), e))?;
    let job_path = format!("/{}", job.id);
    let lease = client
        .lease(&job_path)
        .map_err(|e| ExperimentError::client(format!("lease {job_path}"), e))?;
    let asked = Instant::now();
    let reservation = match reserve {
        Some(bytes) => Some(Arc::new(ctx.admission.reserve(&client, &job_path, bytes)?)),
        None => None,
    };
    let wait_ms = ms(asked.elapsed());
    let backing = match &reservation {
        Some(r) => Backing::Reserved(Arc::clone(r)),
        None => Backing::Task,
    };
    let io = Io {
        client: &client,
        spill: ctx.spill,
        usage: ctx.usage,
        backing: &backing,
        chunk: ctx.cfg.block_size,
        seed: ctx.cfg.seed,
    };
    let mut phase_ms = Vec::with_capacity(job.stages.len() + 1);
    let mut spilled = 0u64;
    let mut prev: Vec<Output> = Vec::new();
    for (s, stage) in job.stages.iter().enumerate() {
        let t0 = Instant::now();
        let outs = run_stage(&io, job, &job_path, idx, s, stage, &prev)?;
        spilled += outs.iter().map(Output::spilled).sum::<u64>();
        if s > 0 {
            // The consumers of stage s - 1 are done: free its outputs.
            free_outputs(&io, &job_path, s - 1, std::mem::take(&mut prev))?;
        }
        prev = outs;
        phase_ms.push(ms(t0.elapsed()));
    }
    // The driver collects the last stage's output.
    let t0 = Instant::now();
    {
        let mut reader = Reader::new(&io);
        for o in &prev {
            reader.read_check(&job.id, o, 0, o.len())?;
        }
    }
    free_outputs(&io, &job_path, job.stages.len().saturating_sub(1), prev)?;
    phase_ms.push(ms(t0.elapsed()));
    let reserved = reservation.as_ref().map_or(0, |r| r.bytes());
    drop(backing);
    if let Some(r) = reservation {
        r.release()?;
        ctx.admission.released();
    }
    drop(lease);
    match client.remove(&job_path) {
        Ok(_) | Err(ClientError::Control(ControlError::NotFound(_))) => {}
        Err(e) => return Err(ExperimentError::client(format!("remove {job_path}"), e)),
    }
    let finish = Instant::now();
    Ok(JobOutcome {
        wait_ms,
        completion_ms: ms(finish - arrived),
        finish,
        reserved,
        spilled,
        phase_ms,
    })
}

/// Runs the tasks of one stage in parallel; task `t` reads slice `t` of every output
/// of the previous stage, computes, and writes its own output.
fn run_stage(
    io: &Io<'_>,
    job: &JobSpec,
    job_path: &str,
    idx: usize,
    s: usize,
    stage: &StageSpec,
    prev: &[Output],
) -> Result<Vec<Output>, ExperimentError> {
    let n = u64::from(stage.tasks);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|t| {
                sc.spawn(move || -> Result<Output, ExperimentError> {
                    let mut reader = Reader::new(io);
                    for o in prev {
                        let len = o.len();
                        reader.read_check(&job.id, o, len * t / n, len * (t + 1) / n)?;
                    }
                    std::thread::sleep(Duration::from_millis(stage.compute_ms));
                    write_output(io, job_path, idx, s, t as usize, stage.bytes_per_task)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ExperimentError::Panicked("task".into())))
            })
            .collect()
    })
}
