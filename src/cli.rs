//! The `farpool` command line: `controller`, `memnode`, `demo`, `bench`, `status`,
//! `experiment`, `worker`.

use crate::controller::{Controller, ControllerConfig};
use crate::memnode::{MemNode, MemNodeConfig};
use crate::size::{format_size, parse_size};
use clap::{CommandFactory, Parser, Subcommand};
use farpool_rdma::TransportKind;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// farpool: an elastic far-memory pool for serverless analytics.
#[derive(Debug, Parser)]
#[command(name = "farpool", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (metadata, allocation, leases).
    Controller(ControllerArgs),
    /// Run a memory node serving one-sided operations on its region.
    Memnode(MemNodeArgs),
    /// Run a small word-count job on an embedded pool and show allocation and reclamation.
    Demo(crate::demo::DemoArgs),
    /// Measure the pool (and peers such as Redis and memcached) under load.
    Bench(crate::bench::BenchArgs),
    /// Show memory nodes, capacity, and usage per job and task.
    Status(StatusArgs),
    /// Run an experiment on an embedded pool (`elasticity`: task- versus job-level
    /// allocation).
    Experiment(crate::experiment::ExperimentArgs),
    /// Run a DAG executor process (started by an invoker, `farpool::dag::process`;
    /// reads invocations on stdin, answers on stdout).
    Worker(WorkerArgs),
    /// Run many verifying clients with mixed operations against a pool for a set time
    /// and print `ops=N errors=N lost=N rss_start_kib=N rss_end_kib=N` (see
    /// scripts/soak.sh).
    Soak(crate::soak::SoakArgs),
    /// Write a fresh random cluster key (32 hex digits) to a new file or stdout.
    Keygen(crate::keys::KeygenArgs),
    /// Print a client token for a job (or an admin token), signed with the cluster key;
    /// clients pass it in FARPOOL_TOKEN.
    Token(crate::keys::TokenArgs),
}

/// `farpool worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Controller address.
    #[arg(long, env = "FARPOOL_CONTROLLER")]
    pub controller: String,
    /// Serve invokers over TCP on this address (host:port; port 0 picks one, printed
    /// as `listening <addr>`) instead of over standard input/output. Every connection
    /// is one function instance. No authentication: use it on the cluster network.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `farpool controller`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// Address to listen on for clients and memory nodes.
    #[arg(long, default_value = "127.0.0.1:7070", env = "FARPOOL_LISTEN")]
    pub listen: String,
    /// Directory for the controller's persistent state (the cluster key and the
    /// metadata log it recovers from after a restart).
    #[arg(long, env = "FARPOOL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Lease period in seconds.
    #[arg(long, default_value_t = 10.0, env = "FARPOOL_LEASE_SECS")]
    pub lease_secs: f64,
    /// Grace period after a lease lapses, in seconds, before data is reclaimed.
    #[arg(long, default_value_t = 2.0, env = "FARPOOL_GRACE_SECS")]
    pub grace_secs: f64,
    /// Heartbeat interval asked of memory nodes, in milliseconds.
    #[arg(long, default_value_t = 500, env = "FARPOOL_HEARTBEAT_MS")]
    pub heartbeat_ms: u64,
    /// Heartbeats a node may miss before it is declared dead.
    #[arg(long, default_value_t = 3, env = "FARPOOL_MISSED_HEARTBEATS")]
    pub missed_heartbeats: u32,
    /// Shut down when standard input closes (used by `farpool bench`, so the processes
    /// it starts never outlive it).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
    /// Longest time a free waits for memory nodes to confirm its revocations, in
    /// milliseconds (0: answer at once).
    #[arg(long, default_value_t = 5000, env = "FARPOOL_REVOKE_WAIT_MS")]
    pub revoke_wait_ms: u64,
    /// Wait before retrying a failed flush of a mapped path to its backing path, in
    /// milliseconds (doubles with each further failure, up to 5 minutes).
    #[arg(long, default_value_t = 1000, env = "FARPOOL_FLUSH_RETRY_MS")]
    pub flush_retry_ms: u64,
    /// Sync the metadata log to disk at most every this many milliseconds (0: before
    /// every answer, so a machine crash loses nothing acknowledged).
    #[arg(long, default_value_t = 0, env = "FARPOOL_LOG_FSYNC_MS")]
    pub log_fsync_ms: u64,
    /// Start a new metadata generation (snapshot plus empty log) after this many
    /// log records.
    #[arg(long, default_value_t = 100_000, env = "FARPOOL_SNAPSHOT_EVERY")]
    pub snapshot_every: u64,
    /// Cluster key file (32 hex digits, from `farpool keygen`); else the
    /// FARPOOL_CLUSTER_KEY variable. With a key, memory nodes must prove they hold it
    /// and clients need a token; without one the controller runs in development mode.
    #[arg(long, value_name = "PATH", env = "FARPOOL_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Lifetime of a soft-transport grant in seconds (default: the lease period);
    /// clients fetch fresh grants transparently when theirs expire.
    #[arg(long, env = "FARPOOL_GRANT_TTL_SECS")]
    pub grant_ttl_secs: Option<f64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the
    /// bound address is printed as `metrics <addr>` after the `listening` line).
    #[arg(long, value_name = "ADDR", env = "FARPOOL_METRICS")]
    pub metrics: Option<String>,
    /// TOML file with options in its `[controller]` table (flags and FARPOOL_* variables win
    /// over it; see docs/OPERATIONS.md).
    #[arg(long, value_name = "FILE", env = "FARPOOL_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `farpool memnode`.
#[derive(Debug, clap::Args)]
pub struct MemNodeArgs {
    /// Controller address.
    #[arg(long, env = "FARPOOL_CONTROLLER")]
    pub controller: String,
    /// Data-plane listen address (soft transport).
    #[arg(long, default_value = "127.0.0.1:0", env = "FARPOOL_MEMNODE_LISTEN")]
    pub listen: String,
    /// Address advertised to clients, if different from the bound one (e.g. behind NAT).
    #[arg(long, env = "FARPOOL_ADVERTISE")]
    pub advertise: Option<String>,
    /// Region size, e.g. 4GiB.
    #[arg(long, value_parser = parse_size, env = "FARPOOL_CAPACITY")]
    pub capacity: u64,
    /// Block size, a power of two of at least 4 KiB.
    #[arg(long, default_value = "1MiB", value_parser = parse_size, env = "FARPOOL_BLOCK_SIZE")]
    pub block_size: u64,
    /// Data-plane transport: soft (TCP), shm (same host, trusted) or verbs (RDMA; needs a
    /// build with `--features verbs`). verbs listens on --listen for queue-pair setup.
    #[arg(long, default_value = "soft", env = "FARPOOL_TRANSPORT")]
    pub transport: TransportKind,
    /// RDMA device for --transport verbs (see `ibv_devices`); default: the first one.
    #[arg(long, env = "FARPOOL_RDMA_DEVICE")]
    pub rdma_device: Option<String>,
    /// GID index for --transport verbs (RoCE; see `show_gids`); default: the first RoCE v2
    /// GID holding an IPv4 address.
    #[arg(long, env = "FARPOOL_GID_INDEX")]
    pub gid_index: Option<u32>,
    /// --transport verbs: serve every block with the region's rkey (trusted mode) even
    /// where the device has memory windows (by default each grant is a window).
    #[arg(long, env = "FARPOOL_NO_MEMORY_WINDOWS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_memory_windows: bool,
    /// Cluster key file, the same as the controller's (else FARPOOL_CLUSTER_KEY).
    #[arg(long, value_name = "PATH", env = "FARPOOL_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Directory for the shm region file.
    #[arg(long, default_value = "/dev/shm", env = "FARPOOL_SHM_DIR")]
    pub shm_dir: PathBuf,
    /// Don't try huge pages.
    #[arg(long, env = "FARPOOL_NO_HUGEPAGES", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_hugepages: bool,
    /// Don't try to lock the region in memory.
    #[arg(long, env = "FARPOOL_NO_LOCK", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_lock: bool,
    /// On SIGTERM or Ctrl-C, how long to let data-plane connections finish the
    /// operations they already received before closing them, in milliseconds.
    #[arg(long, default_value_t = 5000, env = "FARPOOL_DRAIN_MS")]
    pub drain_ms: u64,
    /// Shut down when standard input closes (used by `farpool bench`, so the processes
    /// it starts never outlive it).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the
    /// bound address is printed as `metrics <addr>` after the `listening` line).
    #[arg(long, value_name = "ADDR", env = "FARPOOL_MEMNODE_METRICS")]
    pub metrics: Option<String>,
    /// TOML file with options in its `[memnode]` table (flags and FARPOOL_* variables win
    /// over it; see docs/OPERATIONS.md).
    #[arg(long, value_name = "FILE", env = "FARPOOL_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `farpool status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Controller address.
    #[arg(long, default_value = "127.0.0.1:7070", env = "FARPOOL_CONTROLLER")]
    pub controller: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Client token (`farpool token`), needed when the controller has a cluster key.
    #[arg(long, env = "FARPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Announces a ready server on stdout as `listening <addr>` (the bench harness and
/// scripts wait for this line).
fn announce(addr: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening {addr}");
    let _ = out.flush();
}

/// Announces the metrics endpoint on stdout as `metrics <addr>`, after the
/// `listening` line.
fn announce_metrics(addr: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "metrics {addr}");
    let _ = out.flush();
}

/// Blocks until standard input reaches end of file (or fails).
fn wait_for_stdin_eof() {
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
}

fn secs(v: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("{what} must be a non-negative number of seconds"))
}

/// Entry point of the `farpool` binary.
pub fn main() -> ExitCode {
    let cli = match crate::config::expand_args(&Cli::command(), std::env::args_os().collect()) {
        Ok(argv) => Cli::parse_from(argv),
        Err(e) => {
            eprintln!("farpool: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = match cli.command {
        Command::Controller(a) => {
            init_logging("info");
            run_controller(a)
        }
        Command::Memnode(a) => {
            init_logging("info");
            run_memnode(a)
        }
        Command::Demo(a) => {
            // The embedded nodes' shutdown is routine here; keep the output to the job.
            init_logging("error");
            crate::demo::run(a).map_err(|e| e.to_string())
        }
        Command::Bench(a) => {
            init_logging("warn");
            crate::bench::run(a).map_err(|e| e.to_string())
        }
        Command::Status(a) => {
            init_logging("warn");
            run_status(a)
        }
        Command::Experiment(a) => {
            init_logging("error");
            crate::experiment::run(a).map_err(|e| e.to_string())
        }
        Command::Worker(a) => {
            init_logging("warn");
            match &a.listen {
                Some(listen) => crate::dag::process::serve_tcp(&a.controller, listen),
                None => crate::dag::process::serve_stdio(&a.controller),
            }
            .map_err(|e| e.to_string())
        }
        Command::Soak(a) => {
            init_logging("warn");
            run_soak(&a)
        }
        Command::Keygen(a) => crate::keys::keygen(&a).map_err(|e| e.to_string()),
        Command::Token(a) => crate::keys::issue(&a)
            .map(|t| println!("{t}"))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("farpool: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_controller(a: ControllerArgs) -> Result<(), String> {
    let heartbeat = Duration::from_millis(a.heartbeat_ms.max(10));
    let config = ControllerConfig {
        listen: a.listen,
        data_dir: a.data_dir,
        lease: secs(a.lease_secs, "--lease-secs")?,
        grace: secs(a.grace_secs, "--grace-secs")?,
        heartbeat,
        dead_after: heartbeat * a.missed_heartbeats.max(1),
        revoke_wait: Duration::from_millis(a.revoke_wait_ms),
        flush_retry: Duration::from_millis(a.flush_retry_ms),
        fsync_interval: Duration::from_millis(a.log_fsync_ms),
        snapshot_every: a.snapshot_every,
        cluster_key: crate::proto::ClusterKey::configured(a.cluster_key_file.as_deref())
            .map_err(|e| e.to_string())?,
        grant_ttl: a
            .grant_ttl_secs
            .map(|s| secs(s, "--grant-ttl-secs"))
            .transpose()?,
    };
    let c = Controller::start(config).map_err(|e| e.to_string())?;
    let metrics = match &a.metrics {
        Some(addr) => Some(c.serve_metrics(addr).map_err(|e| e.to_string())?),
        None => None,
    };
    announce(&c.local_addr().to_string());
    if let Some(m) = metrics {
        announce_metrics(&m.to_string());
    }
    if a.exit_with_stdin {
        wait_for_stdin_eof();
        c.shutdown();
        return Ok(());
    }
    c.wait().map_err(|e| e.to_string())
}

fn run_memnode(a: MemNodeArgs) -> Result<(), String> {
    let node = MemNode::start(MemNodeConfig {
        controller: a.controller,
        listen: a.listen,
        advertise: a.advertise,
        capacity: a.capacity,
        block_size: a.block_size,
        transport: a.transport,
        shm_dir: a.shm_dir,
        hugepages: !a.no_hugepages,
        lock: !a.no_lock,
        rdma_device: a.rdma_device,
        gid_index: a.gid_index,
        memory_windows: !a.no_memory_windows,
        cluster_key: crate::proto::ClusterKey::configured(a.cluster_key_file.as_deref())
            .map_err(|e| e.to_string())?,
        ..MemNodeConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let metrics = match &a.metrics {
        Some(addr) => Some(node.serve_metrics(addr).map_err(|e| e.to_string())?),
        None => None,
    };
    announce(node.data_addr());
    if let Some(m) = &metrics {
        announce_metrics(&m.local_addr().to_string());
    }
    if a.exit_with_stdin {
        wait_for_stdin_eof();
        node.shutdown();
        return Ok(());
    }
    node.run_until_signal(Duration::from_millis(a.drain_ms))
        .map_err(|e| e.to_string())
}

fn run_soak(a: &crate::soak::SoakArgs) -> Result<(), String> {
    let report = crate::soak::run(a).map_err(|e| e.to_string())?;
    println!("{report}");
    if report.errors > 0 || report.lost > 0 {
        return Err(crate::soak::SoakError::Failed {
            errors: report.errors,
            lost: report.lost,
        }
        .to_string());
    }
    Ok(())
}

fn run_status(a: StatusArgs) -> Result<(), String> {
    let mut config = crate::ClientConfig::default();
    if a.token.is_some() {
        config.token = a.token.clone();
    }
    let client = crate::Client::connect_with(&a.controller, config).map_err(|e| e.to_string())?;
    let st = client.status().map_err(|e| e.to_string())?;
    if a.json {
        let s = serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?;
        println!("{s}");
        return Ok(());
    }
    print!("{}", render_status(&st));
    Ok(())
}

/// Renders a cluster status as text tables.
pub fn render_status(st: &crate::proto::ClusterStatus) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "capacity {}  used {}  lease {} ms  blocks allocated {} freed {} expired {}  flushed {} flush failures {}",
        format_size(st.capacity_bytes),
        format_size(st.used_bytes),
        st.lease_ms,
        st.blocks_allocated_total,
        st.blocks_freed_total,
        st.blocks_expired_total,
        st.flushes_total,
        st.flush_failures_total
    );
    let _ = writeln!(
        o,
        "replication: degraded {}  lost {}  copies rebuilt {}",
        st.blocks_degraded, st.blocks_lost, st.replicas_rebuilt_total
    );
    if st.blocks_lost > 0 {
        let _ = writeln!(
            o,
            "  {} block(s) lost with their memory nodes; their paths answer DataLost: remove them and recreate the data",
            st.blocks_lost
        );
    }
    let _ = writeln!(o, "\nNODES");
    let _ = writeln!(
        o,
        "{:>4}  {:<5}  {:<28} {:>10} {:>9} {:>7} {:>7}  {:<5} {:>8}",
        "id", "xport", "address", "capacity", "block", "free", "revoke", "alive", "rss"
    );
    for n in &st.nodes {
        let _ = writeln!(
            o,
            "{:>4}  {:<5}  {:<28} {:>10} {:>9} {:>7} {:>7}  {:<5} {:>8}",
            n.endpoint.node,
            format!("{:?}", n.endpoint.transport).to_lowercase(),
            n.endpoint.addr,
            format_size(n.capacity),
            format_size(n.block_size),
            n.blocks_free,
            n.blocks_revoking,
            if n.alive { "yes" } else { "DEAD" },
            format_size(n.stats.rss_kib * 1024),
        );
    }
    for n in st.nodes.iter().filter(|n| !n.stats.isolation.is_empty()) {
        let _ = writeln!(o, "{:>4}  {}", n.endpoint.node, n.stats.isolation);
    }
    let _ = writeln!(o, "\nUSAGE (per job, stage, task)");
    let _ = writeln!(
        o,
        "{:<48} {:>7} {:>10} {:>10} {:>9}  mapped to",
        "path", "blocks", "subtree", "quota", "lease"
    );
    for p in &st.paths {
        let depth = p.path.components().count().saturating_sub(1);
        let name = format!(
            "{}{}",
            "  ".repeat(depth),
            p.path.components().last().unwrap_or("/")
        );
        let _ = writeln!(
            o,
            "{:<48} {:>7} {:>10} {:>10} {:>9}  {}",
            name,
            p.blocks,
            format_size(p.subtree_bytes),
            p.quota.map(format_size).unwrap_or_else(|| "-".into()),
            if p.pinned {
                "pinned".to_string()
            } else {
                format!("{:.1}s", p.lease_remaining_ms as f64 / 1000.0)
            },
            p.backing
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "-".into()),
        );
    }
    if !st.flushes.is_empty() {
        let _ = writeln!(o, "\nFLUSHES (mapped paths whose lease ran out)");
        for f in &st.flushes {
            let state = if f.in_flight {
                "running".to_string()
            } else {
                format!("retry in {:.1}s", f.retry_in_ms as f64 / 1000.0)
            };
            let _ = writeln!(
                o,
                "{}  -> {}  {}  failures {}{}",
                f.path,
                f.backing,
                state,
                f.failures,
                f.last_error
                    .as_deref()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    o
}
