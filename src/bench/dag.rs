//! `farpool bench dag`: runs a DAG workload (tree reduction, blocked GEMM, TSQR) with
//! the decentralized (Wukong) scheduler, the centralized baseline, or both in turn on
//! the same executors and the same pool, and prints one record per run (a table row,
//! or one JSON object per line with `--json`).
//!
//! Fields: `overhead_us_per_task` is `(makespan x workers - task compute) / tasks`,
//! where task compute is the time measured inside task functions; `bytes_moved` is
//! pool bytes written plus read; `ideal_bytes` is what a storage-based execution moves
//! (every task-produced input written once and read once per reader); `correct` is the
//! check of the sink outputs against a direct computation.
//!
//! With `--processes` the executors are `farpool worker` processes started and reused
//! by the bench's invoker ([`crate::dag::process`]); otherwise threads.
//!
//! ```text
//! farpool bench dag --workload tr --scheduler both --task-ms 1 --workers 4 --repeat 3 --json
//! farpool bench dag --workload tr --processes --json
//! farpool bench dag --workload gemm --json
//! ```

use super::args::BenchTransport;
use super::cluster::{default_bin, LocalCluster};
use super::error::BenchError;
use crate::dag::process::{WorkerConfig, WorkerPool};
use crate::dag::workloads::{GemmSpec, TaskWork, TreeSpec, TsqrSpec, Workload, WorkloadSpec};
use crate::dag::{DagRuntime, RuntimeConfig, Scheduler};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Options of `farpool bench dag`.
#[derive(Debug, Clone, clap::Args)]
pub struct DagBenchArgs {
    /// Workload: tree reduction (tr), blocked GEMM (gemm) or TSQR (tsqr).
    #[arg(long, value_enum, default_value_t = DagWorkload::Tr)]
    pub workload: DagWorkload,

    /// Scheduler: wukong (decentralized), central (baseline) or both, one after the
    /// other in every repetition.
    #[arg(long, value_enum, default_value_t = SchedulerChoice::Both)]
    pub scheduler: SchedulerChoice,

    /// Extra time every task takes, in milliseconds (tree reduction: 0, 1, 10).
    #[arg(long, default_value_t = 0.0)]
    pub task_ms: f64,

    /// Spin on the CPU for --task-ms instead of sleeping.
    #[arg(long)]
    pub busy: bool,

    /// Executors: threads, or worker processes with --processes.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,

    /// Run the executors as `farpool worker` processes started (and reused) by the
    /// bench's invoker, instead of threads of the bench process.
    #[arg(long)]
    pub processes: bool,

    /// Run the executors on `farpool worker --listen ADDR` processes (other hosts)
    /// at these addresses, over TCP: --workers connections spread over them
    /// (implies --processes; needs --controller, the cluster those workers use).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub worker_addrs: Vec<String>,

    /// Tree reduction leaves.
    #[arg(long, default_value_t = 1024)]
    pub leaves: u64,

    /// GEMM: matrix side (default 2048); TSQR: rows (default 262144).
    #[arg(long)]
    pub size: Option<usize>,

    /// GEMM: block side (default 512); TSQR: rows per chunk (default 8192).
    #[arg(long)]
    pub block: Option<usize>,

    /// TSQR: columns.
    #[arg(long, default_value_t = 128)]
    pub cols: usize,

    /// Outputs up to this many bytes travel inline (invocations, scheduler messages,
    /// the job's inline arena); larger ones become pool objects.
    #[arg(long, default_value = "4KiB", value_parser = crate::size::parse_size)]
    pub inline_limit: u64,

    /// Wukong: invoke executors for the other ready children of a large output (they
    /// read it from the pool) instead of running them all in the executor that holds
    /// it (task clustering, the default).
    #[arg(long)]
    pub no_clustering: bool,

    /// Keep every task's pool object until the job ends instead of freeing it when
    /// its last consumer is done (to measure `peak_pool_bytes` both ways).
    #[arg(long)]
    pub keep_intermediates: bool,

    /// Repeat each measurement N times and report every run.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub repeat: u32,

    /// Controller of a running cluster (host:port). Without it, a controller and a
    /// memory node are started as child processes on 127.0.0.1.
    #[arg(long, value_name = "ADDR")]
    pub controller: Option<String>,

    /// Data-plane transport of the self-started memory node.
    #[arg(long, value_enum, default_value_t = BenchTransport::Soft)]
    pub transport: BenchTransport,

    /// Region size of the self-started memory node.
    #[arg(long, default_value = "1GiB", value_parser = crate::size::parse_size)]
    pub capacity: u64,

    /// Block size of the self-started memory node.
    #[arg(long, default_value = "1MiB", value_parser = crate::size::parse_size)]
    pub block_size: u64,

    /// The farpool binary used to start the controller and memory node
    /// (default: this executable).
    #[arg(long, value_name = "PATH")]
    pub farpool_bin: Option<PathBuf>,

    /// Print one JSON object per line per run instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A DAG benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagWorkload {
    /// Tree reduction.
    Tr,
    /// Blocked matrix multiplication.
    Gemm,
    /// Tall-skinny QR.
    Tsqr,
}

/// Which schedulers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerChoice {
    /// Decentralized only.
    Wukong,
    /// Centralized baseline only.
    Central,
    /// Both, one after the other in every repetition.
    Both,
}

impl SchedulerChoice {
    fn schedulers(self) -> &'static [Scheduler] {
        match self {
            Self::Wukong => &[Scheduler::Wukong],
            Self::Central => &[Scheduler::Central],
            Self::Both => &[Scheduler::Wukong, Scheduler::Central],
        }
    }
}

/// One run of `farpool bench dag`.
#[derive(Debug, Clone, Serialize)]
pub struct DagRecord {
    /// `tr`, `gemm` or `tsqr`.
    pub workload: &'static str,
    /// `wukong` or `central`.
    pub scheduler: &'static str,
    /// The memory node's transport, when known.
    pub transport: Option<&'static str>,
    /// Repetition (1-based).
    pub run: u32,
    /// Tasks in the graph.
    pub tasks: u64,
    /// Task function calls.
    pub tasks_run: u64,
    /// Extra time per task (tree reduction), in milliseconds.
    pub task_ms: f64,
    /// Whether that time was spent spinning.
    pub busy: bool,
    /// Executors (threads or worker processes).
    pub executors: usize,
    /// `threads` or `processes`.
    pub executor_kind: &'static str,
    /// Executor invocations (Wukong) or dispatches (central).
    pub invocations: u64,
    /// Submission to the last sink output.
    pub makespan_ms: f64,
    /// Time inside task functions, summed over executors.
    pub compute_ms: f64,
    /// `(makespan x executors - compute) / tasks`.
    pub overhead_us_per_task: f64,
    /// Pool bytes written plus read.
    pub bytes_moved: u64,
    /// Pool bytes written.
    pub bytes_written: u64,
    /// Pool bytes read.
    pub bytes_read: u64,
    /// What a storage-based execution moves: task-produced inputs written once and
    /// read once per reader.
    pub ideal_bytes: u64,
    /// `bytes_moved / ideal_bytes`.
    pub moved_vs_ideal: f64,
    /// Pool operations on fan-in counters.
    pub counter_ops: u64,
    /// Highest pool usage during the run above the usage before it, in bytes:
    /// the controller's allocated bytes sampled every 5 ms (a shorter peak can be
    /// missed).
    pub peak_pool_bytes: u64,
    /// Pool objects freed before the job's end (their last consumer was done).
    pub objects_freed: u64,
    /// Whether intermediate outputs were freed early (not `--keep-intermediates`).
    pub free_intermediates: bool,
    /// Whether the sink outputs match the direct computation.
    pub correct: bool,
    /// What the check compared.
    pub check: String,
}

fn scheduler_name(s: Scheduler) -> &'static str {
    match s {
        Scheduler::Wukong => "wukong",
        Scheduler::Central => "central",
    }
}

fn spec(args: &DagBenchArgs) -> Result<WorkloadSpec, BenchError> {
    if !args.task_ms.is_finite() || args.task_ms < 0.0 {
        return Err(BenchError::Args(format!(
            "--task-ms must be a non-negative number, not {}",
            args.task_ms
        )));
    }
    let work = TaskWork {
        time: Duration::from_secs_f64(args.task_ms / 1e3),
        busy: args.busy,
    };
    Ok(match args.workload {
        DagWorkload::Tr => WorkloadSpec::Tr(TreeSpec {
            leaves: args.leaves,
            work,
        }),
        DagWorkload::Gemm => {
            let d = GemmSpec::default();
            WorkloadSpec::Gemm(GemmSpec {
                n: args.size.unwrap_or(d.n),
                block: args.block.unwrap_or(d.block),
                work,
                ..d
            })
        }
        DagWorkload::Tsqr => {
            let d = TsqrSpec::default();
            WorkloadSpec::Tsqr(TsqrSpec {
                rows: args.size.unwrap_or(d.rows),
                chunk: args.block.unwrap_or(d.chunk),
                cols: args.cols,
                work,
                ..d
            })
        }
    })
}

fn workload(args: &DagBenchArgs) -> Result<Workload, BenchError> {
    spec(args)?
        .build()
        .map_err(|e| BenchError::Args(e.to_string()))
}

/// Where the executors run.
enum Executors {
    Threads(DagRuntime),
    Processes(Box<WorkerPool>, crate::client::Client),
}

/// Runs `farpool bench dag` and prints its records to stdout.
pub fn run(args: &DagBenchArgs) -> Result<(), BenchError> {
    if args.workers == 0 {
        return Err(BenchError::Args("--workers must be at least 1".into()));
    }
    let inline_limit = usize::try_from(args.inline_limit)
        .map_err(|_| BenchError::Args("--inline-limit is too large".into()))?;
    let work = workload(args)?;
    let mut cluster = None;
    let (addr, transport) = match &args.controller {
        Some(addr) => (addr.clone(), super::remote_transport(addr)?),
        None => {
            let bin = match &args.farpool_bin {
                Some(b) => b.clone(),
                None => default_bin()?,
            };
            let mut c = LocalCluster::start(&bin, args.transport, args.capacity, args.block_size)?;
            super::wait_for_memory_node(&mut c)?;
            let addr = c.controller_addr().to_string();
            cluster = Some(c);
            (addr, Some(args.transport.as_str()))
        }
    };
    let client = crate::client::Client::connect(&addr)
        .map_err(|e| BenchError::client(format!("connecting to the controller at {addr}"), e))?;
    let sampler = crate::client::Client::connect(&addr)
        .map_err(|e| BenchError::client(format!("connecting to the controller at {addr}"), e))?;
    if !args.worker_addrs.is_empty() && args.controller.is_none() {
        return Err(BenchError::Args(
            "--worker-addrs needs --controller: the remote workers must use the same cluster as the bench".into(),
        ));
    }
    let mut executors = if args.processes || !args.worker_addrs.is_empty() {
        let bin = match &args.farpool_bin {
            Some(b) => b.clone(),
            None => default_bin()?,
        };
        let pool = WorkerPool::new(WorkerConfig {
            bin,
            controller: addr.clone(),
            workers: args.workers,
            inline_limit,
            cluster_large_outputs: !args.no_clustering,
            free_intermediates: !args.keep_intermediates,
            crash_in: None,
            crash_site: Default::default(),
            remote: args.worker_addrs.clone(),
        })
        .map_err(|e| BenchError::Args(e.to_string()))?;
        Executors::Processes(Box::new(pool), client)
    } else {
        Executors::Threads(
            DagRuntime::new(
                client,
                work.registry().clone(),
                RuntimeConfig {
                    executors: args.workers,
                    inline_limit,
                    job_prefix: "bench-dag".to_string(),
                    cluster_large_outputs: !args.no_clustering,
                    free_intermediates: !args.keep_intermediates,
                    ..RuntimeConfig::default()
                },
            )
            .map_err(|e| BenchError::Args(e.to_string()))?,
        )
    };
    let workload_spec = spec(args)?;
    let mut header = false;
    for run in 1..=args.repeat {
        for &scheduler in args.scheduler.schedulers() {
            if let Some(c) = cluster.as_mut() {
                c.check_alive()?;
            }
            let rec = run_once(
                &mut executors,
                &sampler,
                &work,
                workload_spec,
                scheduler,
                args,
                transport,
                run,
            )?;
            let mut out = std::io::stdout().lock();
            let line = if args.json {
                serde_json::to_string(&rec)
                    .map_err(|e| BenchError::Args(format!("cannot encode a record as JSON: {e}")))?
            } else {
                let mut s = String::new();
                if !header {
                    header = true;
                    s.push_str(&human_header());
                    s.push('\n');
                }
                s.push_str(&human_row(&rec));
                s
            };
            writeln!(out, "{line}")
                .and_then(|()| out.flush())
                .map_err(BenchError::Output)?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_once(
    executors: &mut Executors,
    sampler: &crate::client::Client,
    work: &Workload,
    workload_spec: WorkloadSpec,
    scheduler: Scheduler,
    args: &DagBenchArgs,
    transport: Option<&'static str>,
    run: u32,
) -> Result<DagRecord, BenchError> {
    let dag_err = |e: crate::dag::DagError| BenchError::Dag {
        workload: work.name(),
        scheduler: scheduler_name(scheduler),
        source: e,
    };
    let ((out, kind), peak) = while_sampling(sampler, || match executors {
        Executors::Threads(runtime) => (runtime.run(work.graph(), scheduler), "threads"),
        Executors::Processes(pool, client) => {
            (pool.run(client, workload_spec, scheduler), "processes")
        }
    })?;
    let out = out.map_err(dag_err)?;
    let check = work.check(&out).map_err(dag_err)?;
    let s = out.stats();
    let makespan = s.makespan.as_secs_f64();
    let compute = s.compute.as_secs_f64();
    let moved = s.bytes_written + s.bytes_read;
    let overhead = s.overhead_us_per_task(args.workers);
    Ok(DagRecord {
        workload: work.name(),
        scheduler: scheduler_name(scheduler),
        transport,
        run,
        tasks: s.tasks,
        tasks_run: s.tasks_run,
        task_ms: args.task_ms,
        busy: args.busy,
        executors: args.workers,
        executor_kind: kind,
        invocations: s.invocations,
        makespan_ms: makespan * 1e3,
        compute_ms: compute * 1e3,
        overhead_us_per_task: overhead,
        bytes_moved: moved,
        bytes_written: s.bytes_written,
        bytes_read: s.bytes_read,
        ideal_bytes: s.ideal_bytes,
        moved_vs_ideal: if s.ideal_bytes == 0 {
            0.0
        } else {
            moved as f64 / s.ideal_bytes as f64
        },
        counter_ops: s.counter_ops,
        peak_pool_bytes: peak,
        objects_freed: s.objects_freed,
        free_intermediates: !args.keep_intermediates,
        correct: check.correct,
        check: check.detail,
    })
}

/// Runs `f` while a thread samples the pool's allocated bytes every 5 ms; returns
/// what `f` returned and the highest sample above the one taken before `f` started.
fn while_sampling<T>(
    client: &crate::client::Client,
    f: impl FnOnce() -> T,
) -> Result<(T, u64), BenchError> {
    let used = || {
        client
            .status()
            .map(|s| s.used_bytes)
            .map_err(|e| BenchError::client("sampling the pool's usage".to_string(), e))
    };
    let base = used()?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = base;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(used()?);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok::<u64, BenchError>(peak)
        });
        let out = f();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().map_err(|_| BenchError::WorkerPanicked)??;
        Ok((out, peak.saturating_sub(base)))
    })
}

fn human_header() -> String {
    format!(
        "{:<5} {:<8} {:>3} {:>6} {:>7} {:>4} {:>11} {:>11} {:>10} {:>12} {:>12} {:>7} {:>8} {:>7}",
        "work",
        "sched",
        "run",
        "tasks",
        "task_ms",
        "exec",
        "makespan_ms",
        "compute_ms",
        "us/task",
        "moved",
        "ideal",
        "moved/i",
        "counter",
        "correct"
    )
}

fn human_row(r: &DagRecord) -> String {
    format!(
        "{:<5} {:<8} {:>3} {:>6} {:>7} {:>4} {:>11.2} {:>11.2} {:>10.1} {:>12} {:>12} {:>7.2} {:>8} {:>7}",
        r.workload,
        r.scheduler,
        r.run,
        r.tasks,
        format!("{}{}", r.task_ms, if r.busy { "b" } else { "" }),
        format!(
            "{}{}",
            r.executors,
            if r.executor_kind == "processes" { "p" } else { "t" }
        ),
        r.makespan_ms,
        r.compute_ms,
        r.overhead_us_per_task,
        r.bytes_moved,
        r.ideal_bytes,
        r.moved_vs_ideal,
        r.counter_ops,
        r.correct
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{BenchArgs, BenchCommand, Workload};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut v = vec!["farpool-bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.bench)
    }

    #[test]
    fn dag_subcommand_parses_beside_the_plain_bench() {
        let a = parse(&[
            "dag",
            "--workload",
            "gemm",
            "--scheduler",
            "central",
            "--task-ms",
            "1",
            "--busy",
            "--workers",
            "8",
            "--no-clustering",
            "--processes",
            "--json",
        ])
        .unwrap();
        let Some(BenchCommand::Dag(d)) = a.command else {
            panic!("dag subcommand expected");
        };
        assert_eq!(d.workload, DagWorkload::Gemm);
        assert_eq!(d.scheduler, SchedulerChoice::Central);
        assert_eq!(d.task_ms, 1.0);
        assert!(d.busy && d.json);
        assert_eq!(d.workers, 8);
        assert!(d.no_clustering && d.processes);
        assert_eq!(d.scheduler.schedulers(), &[Scheduler::Central]);
        let d = match parse(&["dag"]).unwrap().command {
            Some(BenchCommand::Dag(d)) => d,
            None => panic!("dag subcommand expected"),
        };
        assert_eq!(d.workload, DagWorkload::Tr);
        assert_eq!(d.scheduler.schedulers().len(), 2);
        // The plain bench still takes its positional workload.
        let a = parse(&["kv", "--op", "get"]).unwrap();
        assert_eq!(a.workload, Workload::Kv);
        assert!(a.command.is_none());
        assert!(parse(&["dag", "--workload", "nope"]).is_err());
    }

    #[test]
    fn bad_options_are_rejected() {
        let mut d = match parse(&["dag"]).unwrap().command {
            Some(BenchCommand::Dag(d)) => *d,
            None => panic!("dag subcommand expected"),
        };
        assert!(workload(&d).is_ok());
        d.task_ms = -1.0;
        assert!(matches!(workload(&d), Err(BenchError::Args(_))));
        d.task_ms = 0.0;
        d.workload = DagWorkload::Gemm;
        d.size = Some(100);
        d.block = Some(64);
        assert!(matches!(workload(&d), Err(BenchError::Args(_))));
        d.workers = 0;
        assert!(matches!(run(&d), Err(BenchError::Args(_))));
    }

    #[test]
    fn rows_render() {
        let r = DagRecord {
            workload: "tr",
            scheduler: "wukong",
            transport: Some("soft"),
            run: 1,
            tasks: 3,
            tasks_run: 3,
            task_ms: 1.0,
            busy: true,
            executors: 2,
            executor_kind: "threads",
            invocations: 2,
            makespan_ms: 2.5,
            compute_ms: 3.0,
            overhead_us_per_task: 666.7,
            bytes_moved: 10,
            bytes_written: 5,
            bytes_read: 5,
            ideal_bytes: 20,
            moved_vs_ideal: 0.5,
            counter_ops: 4,
            peak_pool_bytes: 4096,
            objects_freed: 1,
            free_intermediates: true,
            correct: true,
            check: "sum 6".into(),
        };
        assert!(human_row(&r).contains("1b"));
        assert_eq!(
            human_header().split_whitespace().count(),
            human_row(&r).split_whitespace().count()
        );
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        for key in [
            "workload",
            "scheduler",
            "makespan_ms",
            "overhead_us_per_task",
            "bytes_moved",
            "ideal_bytes",
            "counter_ops",
            "peak_pool_bytes",
            "executors",
            "correct",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}
