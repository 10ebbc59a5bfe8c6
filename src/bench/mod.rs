//! `farpool bench`: closed-loop benchmarks of a farpool cluster, side by side with
//! Redis and memcached.
//!
//! Each client is a thread with its own connection that issues batches of `--depth`
//! operations on distinct random slots and waits for the whole batch; the batch latency
//! is recorded once per operation. Peers run the same loop through minimal hand-written
//! protocol clients (one flush per batch), so the comparison measures the servers and
//! not client libraries.
//!
//! Without `--controller`, the harness starts a controller and one memory node as child
//! processes on 127.0.0.1 and stops them when it ends. Results go to stdout as a table,
//! or as one JSON object per line with `--json`; `--render FILE` turns such a file into
//! the markdown tables of `docs/BENCHMARKS.md`.
//!
//! `farpool bench kv|queue|file|log` measures a data structure of [`crate::ds`] the
//! same way (depth 1), against the comparable Redis commands; `--verify` instead runs
//! concurrent clients through many splits and merges and checks every acknowledged
//! write (see [`verify`]).
//!
//! ```text
//! farpool bench --op read --size 4KiB --clients 4 --depth 16 --duration 5 \
//!     --peer redis=127.0.0.1:6379 --peer memcached=127.0.0.1:11211
//! farpool bench kv --op put --clients 4 --peer redis=127.0.0.1:6379
//! farpool bench queue --verify --duration 15
//! ```

mod args;
mod cluster;
mod dag;
mod ds_load;
mod error;
mod farpool_load;
mod load;
mod memcache;
mod memory;
mod progress;
mod report;
mod resp;
mod stats;
mod verify;
mod wire;

pub use args::{
    BenchArgs, BenchCommand, BenchOp, BenchTransport, PeerKind, PeerSpec, Plan, Workload, MAX_SLOTS,
};
pub use dag::{DagBenchArgs, DagRecord, DagWorkload, SchedulerChoice};
pub use error::BenchError;
pub use memory::{measure as measure_node_memory, NodeMemory};
pub use report::{human_header, human_row, render_markdown, BenchRecord};
pub use stats::{LatencyHistogram, Summary, Tally};
pub use verify::VerifyReport;

use cluster::LocalCluster;
use ds_load::DsConn;
use farpool_load::{AllocConn, DataConn};
use load::{run_load, RunSpec};
use memcache::MemcachedConn;
use resp::RedisConn;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long to wait for a self-started memory node to register with its controller.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the benchmark described by `args` and prints its results to stdout.
///
/// With `--render FILE` it only renders the markdown tables of `FILE` and runs nothing.
pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    if let Some(BenchCommand::Dag(dag_args)) = &args.command {
        return dag::run(dag_args);
    }
    if let Some(path) = &args.render {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::File {
            path: path.clone(),
            source,
        })?;
        let records = report::parse_records(&text, &path.display().to_string())?;
        let md = report::render_records(&records)?;
        let mut out = std::io::stdout().lock();
        out.write_all(md.as_bytes())
            .and_then(|()| out.flush())
            .map_err(BenchError::Output)?;
        return Ok(());
    }

    let plan = Plan::from_args(&args)?;
    let peers: Vec<&PeerSpec> = args
        .peers
        .iter()
        .filter(
            |p| match p.kind.unsupported_reason(plan.workload, plan.op) {
                Some(why) => {
                    eprintln!(
                        "note: not running {} --op {} on {}: {why}",
                        plan.workload,
                        plan.op,
                        p.kind.as_str()
                    );
                    false
                }
                None => true,
            },
        )
        .collect();

    // Fail before the first (possibly long) farpool run when a peer is unreachable.
    for p in &peers {
        wire::Wire::connect(p.kind.as_str(), &p.addr)?;
    }

    let mut cluster = None;
    let controller = if args.no_farpool {
        None
    } else if let Some(addr) = &args.controller {
        Some(addr.clone())
    } else {
        let bin = match &args.farpool_bin {
            Some(b) => b.clone(),
            None => cluster::default_bin()?,
        };
        let mut c = LocalCluster::start(&bin, args.transport, args.capacity, args.block_size())?;
        wait_for_memory_node(&mut c)?;
        let addr = c.controller_addr().to_string();
        cluster = Some(c);
        Some(addr)
    };
    let transport = match (&controller, &args.controller) {
        (None, _) => None,
        (Some(addr), Some(_)) => remote_transport(addr)?,
        (Some(_), None) => Some(args.transport.as_str()),
    };

    let run_id = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    if args.verify {
        let Some(addr) = &controller else {
            return Err(BenchError::Args(
                "--verify needs a farpool cluster; drop --no-farpool".into(),
            ));
        };
        let report = verify::run(addr, &plan, &format!("/bench/{run_id}/verify"))?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{report}")
            .and_then(|()| out.flush())
            .map_err(BenchError::Output)?;
        return report.check();
    }
    let mut printer = Printer::new(args.json);
    for run in 1..=args.repeat {
        if let Some(addr) = &controller {
            if let Some(c) = cluster.as_mut() {
                c.check_alive()?;
            }
            let target = FarpoolTarget {
                addr,
                transport,
                run_id: format!("{run_id}-r{run}"),
                memnode_pid: cluster.as_ref().map(LocalCluster::memnode_pid),
            };
            let rec = run_farpool(&args, &plan, &target, run)?;
            printer.emit(&rec)?;
        }
        for peer in &peers {
            let rec = run_peer(&args, &plan, peer, run)?;
            printer.emit(&rec)?;
        }
    }
    Ok(())
}

/// Waits until the self-started cluster's controller reports a live memory node.
fn wait_for_memory_node(cluster: &mut LocalCluster) -> Result<(), BenchError> {
    let addr = cluster.controller_addr().to_string();
    let client = crate::client::Client::connect(&addr)
        .map_err(|e| BenchError::client(format!("connecting to the controller at {addr}"), e))?;
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    loop {
        let status = client
            .status()
            .map_err(|e| BenchError::client("asking the controller for its status", e))?;
        if status.nodes.iter().any(|n| n.alive) {
            return Ok(());
        }
        cluster.check_alive()?;
        if Instant::now() >= deadline {
            return Err(BenchError::NotRegistered {
                secs: REGISTER_TIMEOUT.as_secs(),
                stderr: cluster.memnode_stderr(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The data-plane transport of a running cluster's first live memory node.
fn remote_transport(addr: &str) -> Result<Option<&'static str>, BenchError> {
    let status = crate::client::Client::connect(addr)
        .and_then(|c| c.status())
        .map_err(|e| {
            BenchError::client(format!("asking the controller at {addr} for its status"), e)
        })?;
    Ok(status
        .nodes
        .iter()
        .find(|n| n.alive)
        .map(|n| farpool_rdma::TransportKind::from(n.endpoint.transport).as_str()))
}

/// Where the farpool workload runs.
struct FarpoolTarget<'a> {
    addr: &'a str,
    /// The memory node's transport (`soft`, `shm`), when known.
    transport: Option<&'static str>,
    run_id: String,
    /// The self-started memory node, whose memory can be read from /proc.
    memnode_pid: Option<u32>,
}

/// What `--report-node-memory` measured.
#[derive(Default)]
struct MemorySample {
    beyond_region_kib: Option<u64>,
    total_kib: Option<u64>,
}

fn run_farpool(
    args: &BenchArgs,
    plan: &Plan,
    target: &FarpoolTarget<'_>,
    run: u32,
) -> Result<BenchRecord, BenchError> {
    let system = plan.workload.farpool_system();
    let spec = RunSpec {
        plan,
        system,
        label: label(system, plan, run, args.repeat),
        progress: !args.no_progress,
    };
    let sample = || -> Result<MemorySample, BenchError> {
        if !args.report_node_memory {
            return Ok(MemorySample::default());
        }
        match target.memnode_pid {
            Some(pid) => Ok(MemorySample {
                beyond_region_kib: Some(memory::measure(pid)?.beyond_region_kib()),
                total_kib: None,
            }),
            None => {
                let status = crate::client::Client::connect(target.addr)
                    .and_then(|c| c.status())
                    .map_err(|e| BenchError::client("asking the controller for node memory", e))?;
                Ok(MemorySample {
                    beyond_region_kib: None,
                    total_kib: status.nodes.iter().map(|n| n.stats.rss_kib).max(),
                })
            }
        }
    };
    let path = |i: usize| format!("/bench/{}/c{i}", target.run_id);
    let block_len = AtomicU64::new(0);
    let cache_counts =
        std::sync::Arc::new(parking_lot::Mutex::new(report::KvCacheCounts::default()));
    let (tally, mem) = if plan.workload.is_structure() {
        let base = format!("/bench/{}", target.run_id);
        run_load(
            &spec,
            |i| DsConn::connect(target.addr, &base, i, plan, cache_counts.clone()),
            sample,
        )?
    } else if plan.op == BenchOp::Alloc {
        run_load(
            &spec,
            |i| AllocConn::connect(target.addr, &path(i), &block_len),
            sample,
        )?
    } else {
        run_load(
            &spec,
            |i| DataConn::connect(target.addr, &path(i), plan),
            sample,
        )?
    };
    let size = match block_len.load(Ordering::Relaxed) {
        0 => plan.size,
        len => len,
    };
    let mut rec = BenchRecord::new(
        system,
        target.transport,
        plan.op.as_str(),
        size,
        plan.clients,
        plan.depth,
        run,
        &tally.summary(plan.payload_bytes()),
    );
    rec.structure = structure_of(plan);
    rec.node_rss_beyond_region_kib = mem.beyond_region_kib;
    rec.node_rss_kib = mem.total_kib;
    rec.first_error = tally.first_error;
    if plan.workload == Workload::Kv && plan.op == BenchOp::Get {
        rec.kv_cache = Some(*cache_counts.lock());
    }
    Ok(rec)
}

fn run_peer(
    args: &BenchArgs,
    plan: &Plan,
    peer: &PeerSpec,
    run: u32,
) -> Result<BenchRecord, BenchError> {
    let system = peer.kind.as_str();
    let spec = RunSpec {
        plan,
        system,
        label: label(system, plan, run, args.repeat),
        progress: !args.no_progress,
    };
    let (tally, ()) = match peer.kind {
        PeerKind::Redis => run_load(
            &spec,
            |i| RedisConn::connect(&peer.addr, i, plan),
            || Ok(()),
        )?,
        PeerKind::Memcached => run_load(
            &spec,
            |i| MemcachedConn::connect(&peer.addr, i, plan),
            || Ok(()),
        )?,
    };
    let mut rec = BenchRecord::new(
        system,
        None,
        plan.op.as_str(),
        plan.size,
        plan.clients,
        plan.depth,
        run,
        &tally.summary(plan.payload_bytes()),
    );
    rec.structure = structure_of(plan);
    rec.first_error = tally.first_error;
    Ok(rec)
}

/// The `structure` field of a record of `plan`.
fn structure_of(plan: &Plan) -> Option<String> {
    plan.workload
        .is_structure()
        .then(|| plan.workload.as_str().to_string())
}

/// Progress label such as `farpool read 4 KiB c4 d16 [2/3]` (`redis kv get ...` for a
/// peer of a structure).
fn label(system: &str, plan: &Plan, run: u32, repeat: u32) -> String {
    let workload = if plan.workload.is_structure() && !system.starts_with("farpool") {
        format!(" {}", plan.workload)
    } else {
        String::new()
    };
    let mut s = format!(
        "{system}{workload} {} {} c{} d{}",
        plan.op,
        crate::size::format_size(plan.size),
        plan.clients,
        plan.depth
    );
    if repeat > 1 {
        s.push_str(&format!(" [{run}/{repeat}]"));
    }
    s
}

/// The bytes written by WRITE / SET and stored for READ / GET: a printable pattern.
pub(crate) fn payload(size: u64) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Prints results as they complete: a table, or JSON lines.
struct Printer {
    json: bool,
    header_done: bool,
}

impl Printer {
    fn new(json: bool) -> Self {
        Self {
            json,
            header_done: false,
        }
    }

    fn emit(&mut self, rec: &BenchRecord) -> Result<(), BenchError> {
        let mut out = std::io::stdout().lock();
        let result = if self.json {
            writeln!(out, "{}", rec.to_json_line()?)
        } else {
            let header = if self.header_done {
                Ok(())
            } else {
                self.header_done = true;
                writeln!(out, "{}", human_header())
            };
            header.and_then(|()| writeln!(out, "{}", human_row(rec)))
        };
        result
            .and_then(|()| out.flush())
            .map_err(BenchError::Output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_printable_and_sized() {
        let p = payload(100);
        assert_eq!(p.len(), 100);
        assert!(p.iter().all(u8::is_ascii_lowercase));
    }

    #[test]
    fn labels_name_the_run() {
        let mut plan = Plan {
            workload: Workload::Raw,
            op: BenchOp::Read,
            size: 4096,
            clients: 4,
            depth: 16,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            slots: 256,
        };
        assert_eq!(
            label("redis", &plan, 2, 3),
            "redis read 4.0 KiB c4 d16 [2/3]"
        );
        assert_eq!(label("redis", &plan, 1, 1), "redis read 4.0 KiB c4 d16");
        plan.workload = Workload::Queue;
        plan.op = BenchOp::Enqueue;
        plan.depth = 1;
        assert_eq!(
            label("redis", &plan, 1, 1),
            "redis queue enqueue 4.0 KiB c4 d1"
        );
        assert_eq!(
            label("farpool-queue", &plan, 1, 1),
            "farpool-queue enqueue 4.0 KiB c4 d1"
        );
    }
}
