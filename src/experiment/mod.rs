//! `farpool experiment`: experiments that back farpool's design claims with real pool
//! operations.
//!
//! `farpool experiment elasticity` (issue 7) replays concurrent multi-stage analytics
//! jobs (map, shuffle, reduce) whose intermediate data varies by stage and by job, and
//! compares three ways of handing out pool memory on the same capacity and workload:
//! job-level reservation of the peak demand, of the average demand (overflow spills to
//! a persistent tier on local disk), and farpool's task-level allocation (see
//! [`Policy`]). Tasks really write and read every byte through an embedded pool or the
//! spill tier, and every byte read is checked.
//!
//! ```text
//! farpool experiment elasticity                      # standard workload, seed 1
//! farpool experiment elasticity --seed 2 --json      # one JSON object per policy
//! farpool experiment elasticity --trace jobs.jsonl   # replay a trace
//! ```
//!
//! Files: [`workload`] (distributions and trace format), [`data`] (the bytes tasks
//! write), [`spill`] (the object-store spill tier), [`policy`] (the policies and
//! admission), [`store`] (where outputs live), [`runner`] (jobs, stages, sampling),
//! [`metrics`], [`report`], [`plot`].

pub mod data;
mod error;
pub mod metrics;
pub mod plot;
pub mod policy;
pub mod report;
pub mod runner;
pub mod spill;
mod store;
pub mod workload;

pub use error::ExperimentError;
pub use metrics::{JobResult, PolicyReport, Sample};
pub use policy::Policy;
pub use runner::{run_alone, run_policy, AloneRun, ExperimentConfig};
pub use workload::{generate, GeneratorParams, JobSpec, StageSpec, Workload};

use crate::size::parse_size;
use clap::Subcommand;
use farpool_rdma::TransportKind;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `farpool experiment`.
#[derive(Debug, clap::Args)]
pub struct ExperimentArgs {
    /// Which experiment.
    #[command(subcommand)]
    pub which: ExperimentKind,
}

/// The experiments.
#[derive(Debug, Subcommand)]
pub enum ExperimentKind {
    /// Task-level versus job-level allocation on concurrent multi-stage jobs (issue 7).
    Elasticity(ElasticityArgs),
}

/// `farpool experiment elasticity`.
#[derive(Debug, clap::Args)]
pub struct ElasticityArgs {
    /// Seed of the generated workload and of the data tasks write.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object per policy (one per line) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Replay this trace (JSON lines, one job per line; see docs/BENCHMARKS.md) instead
    /// of generating a workload.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Directory for the plots, the workload's trace and the JSON results.
    #[arg(long, default_value = "docs/bench")]
    pub out: PathBuf,
    /// Write nothing to --out.
    #[arg(long)]
    pub no_files: bool,
    /// Jobs in the generated workload.
    #[arg(long, default_value_t = 16)]
    pub jobs: usize,
    /// Pool capacity shared by all jobs (split over two memory nodes).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub capacity: u64,
    /// Block size of the pool, and the chunk in which tasks write.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub block_size: u64,
    /// Data-plane transport of the embedded pool: shm or soft.
    #[arg(long, default_value = "shm")]
    pub transport: TransportKind,
    /// Directory for the spill tier (default: a fresh directory under the system's
    /// temporary directory; removed afterwards either way).
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
    /// Don't fsync spilled objects (a tier that acknowledges writes before they are
    /// durable).
    #[arg(long)]
    pub no_spill_sync: bool,
    /// Interval between memory samples, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub sample_ms: u64,
    /// Heartbeat interval of the embedded memory nodes, in milliseconds (a node missing
    /// three is declared dead; keep it long on a busy machine).
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_ms: u64,
}

/// The results of an elasticity experiment.
#[derive(Debug, Clone)]
pub struct ExperimentReport {
    /// Every job alone on an unlimited pool.
    pub alone: Vec<AloneRun>,
    /// Every policy's run.
    pub policies: Vec<PolicyReport>,
}

/// Runs every job alone, then the whole workload under each of `policies`.
/// With `progress`, says on stderr what it is doing.
pub fn run_elasticity(
    workload: &Workload,
    cfg: &ExperimentConfig,
    policies: &[Policy],
    progress: bool,
) -> Result<ExperimentReport, ExperimentError> {
    cfg.validate()?;
    let say = |what: String| {
        if progress {
            eprintln!("farpool experiment: {what}");
        }
    };
    let t0 = Instant::now();
    say(format!(
        "running each of {} jobs alone on an unlimited pool",
        workload.jobs.len()
    ));
    let alone = run_alone(workload, cfg)?;
    let mut reports = Vec::with_capacity(policies.len());
    for &p in policies {
        say(format!(
            "{:.0} s: running all jobs under {p}",
            t0.elapsed().as_secs_f64()
        ));
        reports.push(run_policy(workload, cfg, p, &alone)?);
    }
    say(format!("done in {:.0} s", t0.elapsed().as_secs_f64()));
    Ok(ExperimentReport {
        alone,
        policies: reports,
    })
}

/// Runs `farpool experiment ...` and prints its results to stdout.
pub fn run(args: ExperimentArgs) -> Result<(), ExperimentError> {
    match args.which {
        ExperimentKind::Elasticity(a) => elasticity(a),
    }
}

fn elasticity(a: ElasticityArgs) -> Result<(), ExperimentError> {
    let workload = match &a.trace {
        Some(p) => Workload::read_trace(p)?,
        None => generate(&GeneratorParams::standard(a.jobs), a.seed)?,
    };
    let cfg = ExperimentConfig {
        capacity: a.capacity,
        block_size: a.block_size,
        transport: a.transport,
        seed: a.seed,
        sample_interval: Duration::from_millis(a.sample_ms.max(1)),
        spill_dir: a.spill_dir.clone(),
        spill_sync: !a.no_spill_sync,
        heartbeat: Duration::from_millis(a.heartbeat_ms.max(10)),
        ..ExperimentConfig::default()
    };
    cfg.validate()?;
    let summary = report::workload_summary(&workload, cfg.block_size, cfg.effective_capacity());
    eprintln!("farpool experiment: {summary}");
    let result = run_elasticity(&workload, &cfg, &Policy::ALL, true)?;
    let json = report::json_lines(&result.policies, a.seed, a.transport.as_str())?;
    if !a.no_files {
        let write = |name: &str, text: &str| {
            let path = a.out.join(name);
            std::fs::write(&path, text).map_err(|source| ExperimentError::Io {
                context: "cannot write",
                path,
                source,
            })
        };
        let plots = plot::write_plots(&a.out, &result.policies)?;
        write("elasticity-trace.jsonl", &workload.to_trace()?)?;
        write("elasticity.jsonl", &json)?;
        for p in plots {
            eprintln!("farpool experiment: wrote {}", p.display());
        }
    }
    let mut out = std::io::stdout().lock();
    let text = if a.json {
        json
    } else {
        format!(
            "{summary}; block {}, transport {}, seed {}\n\n{}",
            crate::size::format_size(cfg.block_size),
            a.transport.as_str(),
            a.seed,
            report::markdown(&result.policies, &result.alone)
        )
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(ExperimentError::Output)
}
