//! Command-line options of `farpool bench` and their validation into a [`Plan`].

use super::error::BenchError;
use std::path::PathBuf;
use std::time::Duration;

/// Largest number of slots (distinct offsets or keys) one client cycles through.
///
/// Bounds the time spent pre-populating peer servers with small values; with 64 B
/// values and 1 MiB blocks a client would otherwise need 16 Ki keys, with 8 B atomics
/// 128 Ki.
pub const MAX_SLOTS: u64 = 16 * 1024;

/// Options of `farpool bench`.
///
/// Without `--controller` the harness starts its own controller and one memory node as
/// child processes on 127.0.0.1 and stops them when it ends.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// What to measure: raw one-sided operations on blocks (`raw`, the default) or a
    /// data structure (`kv`, `queue`, `file`, `log`).
    #[arg(value_enum, default_value_t = Workload::Raw)]
    pub workload: Workload,

    /// Controller of a running cluster to measure (host:port). Without it, a controller
    /// and a memory node are started as child processes on 127.0.0.1.
    #[arg(long, value_name = "ADDR")]
    pub controller: Option<String>,

    /// Data-plane transport of the self-started memory node.
    #[arg(long, value_enum, default_value_t = BenchTransport::Soft)]
    pub transport: BenchTransport,

    /// Operation to measure. raw: read|write|cas|faa|alloc (default read); kv: get|put
    /// (default get); queue: enqueue|dequeue (default enqueue); file: append|read
    /// (default read); log: append|scan (default append).
    #[arg(long, value_enum)]
    pub op: Option<BenchOp>,

    /// Bytes per READ/WRITE (e.g. 64, 4KiB, 64KiB). Atomics always use 8 bytes.
    /// Default: 4 KiB for read and write, 8 for cas and faa.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: Option<u64>,

    /// Client threads, each with its own connection (default 1; 4 with --verify).
    #[arg(long)]
    pub clients: Option<usize>,

    /// Operations per batch (pipeline depth) per client.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,

    /// Measured time per run (e.g. 5, 1.5, 500ms, 10s).
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    pub duration: Duration,

    /// Warm-up time per run, excluded from the results.
    #[arg(long, value_name = "SECS", default_value = "1s", value_parser = parse_duration_arg)]
    pub warmup: Duration,

    /// Repeat each measurement N times and report every run.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub repeat: u32,

    /// Block size of the self-started memory node; also the smallest working set per
    /// client. Default 1 MiB; 64 KiB with --verify (smaller partitions and segments
    /// repartition more often).
    #[arg(long, value_parser = parse_size_arg)]
    pub block_size: Option<u64>,

    /// Region size of the self-started memory node.
    #[arg(long, default_value = "256MiB", value_parser = parse_size_arg)]
    pub capacity: u64,

    /// The farpool binary used to start the controller and memory node
    /// (default: this executable).
    #[arg(long, value_name = "PATH")]
    pub farpool_bin: Option<PathBuf>,

    /// Measure only the peers given with --peer.
    #[arg(long)]
    pub no_farpool: bool,

    /// Also run the workload against a peer server: `redis=HOST:PORT` or
    /// `memcached=HOST:PORT`. Repeatable.
    #[arg(long = "peer", value_name = "SYSTEM=ADDR", value_parser = parse_peer_arg)]
    pub peers: Vec<PeerSpec>,

    /// After each farpool run, report the memory node's resident memory beyond its
    /// region, measured while the clients are still connected.
    #[arg(long)]
    pub report_node_memory: bool,

    /// Print one JSON object per line per result instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Never draw the progress display (it is only drawn when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,

    /// Instead of measuring, run concurrent clients through many splits and merges of a
    /// `kv` or `queue` with low thresholds for --duration, check every acknowledged
    /// write, print `lost=N duplicated=N reordered=N splits=N merges=N` and fail when
    /// anything was lost, duplicated or reordered.
    #[arg(long)]
    pub verify: bool,

    /// Render the markdown tables for docs/BENCHMARKS.md from FILE (output of
    /// `--json`, one object per line) to stdout, and run nothing.
    #[arg(long, value_name = "FILE")]
    pub render: Option<PathBuf>,

    /// A benchmark with options of its own: `farpool bench dag ...`.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
}

/// Benchmarks with options of their own.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// DAG workloads (tree reduction, GEMM, TSQR) with the Wukong and central
    /// schedulers; see `farpool bench dag --help`.
    Dag(Box<super::dag::DagBenchArgs>),
}

impl BenchArgs {
    /// The block size of the self-started memory node: `--block-size`, or its default
    /// (1 MiB; 64 KiB with `--verify`).
    pub fn block_size(&self) -> u64 {
        self.block_size
            .unwrap_or(if self.verify { 64 << 10 } else { 1 << 20 })
    }
}

/// The operation a benchmark measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum BenchOp {
    /// One-sided READ (Redis GET, memcached get).
    Read,
    /// One-sided WRITE (Redis SET, memcached set).
    Write,
    /// 8-byte compare-and-swap (no peer equivalent).
    Cas,
    /// 8-byte fetch-and-add (Redis INCRBY, memcached incr).
    Faa,
    /// Controller block allocation: one block per operation; held blocks are freed 16 at a time.
    Alloc,
    /// Kv `get` of a pre-populated key (Redis GET).
    Get,
    /// Kv `upsert` of an existing key (Redis SET).
    Put,
    /// Queue `enqueue`, each followed by an untimed `dequeue` (Redis RPUSH, then LPOP).
    Enqueue,
    /// Queue `dequeue`, each preceded by an untimed `enqueue` (Redis LPOP, after RPUSH).
    Dequeue,
    /// File or log append; a client starts a new file (log) each block (Redis APPEND).
    Append,
    /// Log `scan` of one pre-written entry (no peer).
    Scan,
}

impl BenchOp {
    /// Lowercase name as used on the command line and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Cas => "cas",
            Self::Faa => "faa",
            Self::Alloc => "alloc",
            Self::Get => "get",
            Self::Put => "put",
            Self::Enqueue => "enqueue",
            Self::Dequeue => "dequeue",
            Self::Append => "append",
            Self::Scan => "scan",
        }
    }

    /// Whether the operation is an 8-byte atomic.
    pub fn is_atomic(self) -> bool {
        matches!(self, Self::Cas | Self::Faa)
    }

    /// Whether the operation moves `size` payload bytes (counted in MiB/s).
    pub fn moves_payload(self) -> bool {
        !matches!(self, Self::Cas | Self::Faa | Self::Alloc)
    }
}

/// What `farpool bench` measures: raw block operations or one data structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Workload {
    /// One-sided READ/WRITE/CAS/FAA on blocks, or controller allocations.
    #[default]
    Raw,
    /// The Kv hash table (`farpool::ds::Kv`): get / put.
    Kv,
    /// The Queue FIFO (`farpool::ds::Queue`): enqueue / dequeue.
    Queue,
    /// The File byte stream (`farpool::ds::File`): read / append.
    File,
    /// The shared Log (`farpool::ds::Log`): append / scan.
    Log,
}

impl Workload {
    /// Lowercase name as used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Kv => "kv",
            Self::Queue => "queue",
            Self::File => "file",
            Self::Log => "log",
        }
    }

    /// The operations this workload accepts; the first is the default.
    pub fn ops(self) -> &'static [BenchOp] {
        match self {
            Self::Raw => &[
                BenchOp::Read,
                BenchOp::Write,
                BenchOp::Cas,
                BenchOp::Faa,
                BenchOp::Alloc,
            ],
            Self::Kv => &[BenchOp::Get, BenchOp::Put],
            Self::Queue => &[BenchOp::Enqueue, BenchOp::Dequeue],
            Self::File => &[BenchOp::Read, BenchOp::Append],
            Self::Log => &[BenchOp::Append, BenchOp::Scan],
        }
    }

    /// The `system` name of farpool's results: `farpool` for raw, `farpool-kv` etc.
    pub fn farpool_system(self) -> &'static str {
        match self {
            Self::Raw => "farpool",
            Self::Kv => "farpool-kv",
            Self::Queue => "farpool-queue",
            Self::File => "farpool-file",
            Self::Log => "farpool-log",
        }
    }

    /// Whether this is a data structure (not raw block operations).
    pub fn is_structure(self) -> bool {
        self != Self::Raw
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for BenchOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport of the self-started memory node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum BenchTransport {
    /// One-sided operations over TCP.
    Soft,
    /// Same-host shared memory.
    Shm,
    /// RDMA verbs (a build with `--features verbs`; the device comes from
    /// `FARPOOL_RDMA_DEVICE` / `FARPOOL_GID_INDEX`, else the first one).
    Verbs,
}

impl BenchTransport {
    /// Lowercase name (`soft`, `shm`, `verbs`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Soft => "soft",
            Self::Shm => "shm",
            Self::Verbs => "verbs",
        }
    }
}

impl From<BenchTransport> for farpool_rdma::TransportKind {
    fn from(t: BenchTransport) -> Self {
        match t {
            BenchTransport::Soft => Self::Soft,
            BenchTransport::Shm => Self::Shm,
            BenchTransport::Verbs => Self::Verbs,
        }
    }
}

/// A peer key-value server to compare against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// Redis, spoken to in RESP (GET/SET/INCRBY).
    Redis,
    /// memcached, spoken to in its text protocol (get/set/incr).
    Memcached,
}

impl PeerKind {
    /// Lowercase name, as used in `--peer` and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Memcached => "memcached",
        }
    }

    /// Why `op` of `workload` cannot be compared on this peer, or `None` when it can.
    pub fn unsupported_reason(self, workload: Workload, op: BenchOp) -> Option<&'static str> {
        if self == Self::Memcached && workload.is_structure() {
            return Some("the data-structure workloads compare against Redis commands only");
        }
        match (self, op) {
            (_, BenchOp::Read | BenchOp::Write | BenchOp::Faa) => None,
            (Self::Redis, BenchOp::Get | BenchOp::Put | BenchOp::Enqueue | BenchOp::Dequeue) => {
                None
            }
            (Self::Redis, BenchOp::Append) if workload == Workload::File => None,
            (_, BenchOp::Append | BenchOp::Scan) => {
                Some("a shared log with positions and streams has no comparable Redis command")
            }
            (Self::Redis, BenchOp::Cas) => Some(
                "Redis has no single-command compare-and-swap on a word (WATCH/MULTI or a Lua script are not comparable)",
            ),
            (Self::Memcached, BenchOp::Cas) => Some(
                "memcached's cas needs a gets round trip for its token, which is not comparable to one CAS",
            ),
            (_, BenchOp::Alloc) => Some("block allocation is a farpool controller operation"),
            (Self::Memcached, _) => Some("memcached has no comparable command"),
        }
    }
}

/// A `--peer SYSTEM=ADDR` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Which server.
    pub kind: PeerKind,
    /// `host:port`.
    pub addr: String,
}

impl std::str::FromStr for PeerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (system, addr) = s.split_once('=').ok_or_else(|| {
            format!("'{s}' is not SYSTEM=ADDR; write e.g. redis=127.0.0.1:6379 or memcached=127.0.0.1:11211")
        })?;
        let kind = match system.trim().to_ascii_lowercase().as_str() {
            "redis" => PeerKind::Redis,
            "memcached" | "memcache" => PeerKind::Memcached,
            other => {
                return Err(format!(
                    "unknown peer system '{other}'; supported are redis and memcached"
                ))
            }
        };
        let addr = addr.trim();
        if addr.is_empty() || !addr.contains(':') {
            return Err(format!(
                "peer address '{addr}' must be HOST:PORT, e.g. 127.0.0.1:6379"
            ));
        }
        Ok(Self {
            kind,
            addr: addr.to_string(),
        })
    }
}

fn parse_peer_arg(s: &str) -> Result<PeerSpec, String> {
    s.parse()
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::size::parse_size(s)
}

/// Parses a duration: plain seconds (`5`, `1.5`) or with a unit (`500ms`, `2s`, `1m`).
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration; write e.g. 5, 1.5, 500ms, 10s or 1m"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        other => {
            return Err(format!(
                "unknown duration unit '{other}' in '{s}'; use ms, s or m"
            ))
        }
    };
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("duration '{s}' is out of range"))
}

/// Validated parameters of one benchmark configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Raw block operations or a data structure.
    pub workload: Workload,
    /// Operation.
    pub op: BenchOp,
    /// Bytes per operation (8 for atomics; the block size for `alloc`, filled in once
    /// known).
    pub size: u64,
    /// Client threads.
    pub clients: usize,
    /// Operations per batch.
    pub depth: usize,
    /// Measured time.
    pub duration: Duration,
    /// Warm-up time.
    pub warmup: Duration,
    /// Distinct slots (offsets / keys) per client.
    pub slots: u64,
}

impl Plan {
    /// Checks `args` and derives the workload shape.
    ///
    /// Each client cycles through `slots` size-aligned slots: enough for one block
    /// (`--block-size`) and at least `depth` of them, so the operations of a batch always
    /// touch distinct slots; at most [`MAX_SLOTS`].
    pub fn from_args(args: &BenchArgs) -> Result<Self, BenchError> {
        let workload = args.workload;
        let clients = args.clients.unwrap_or(if args.verify { 4 } else { 1 });
        if clients == 0 {
            return Err(BenchError::Args("--clients must be at least 1".into()));
        }
        if args.depth == 0 {
            return Err(BenchError::Args("--depth must be at least 1".into()));
        }
        let op = args.op.unwrap_or(workload.ops()[0]);
        if !workload.ops().contains(&op) {
            let names: Vec<&str> = workload.ops().iter().map(|o| o.as_str()).collect();
            return Err(BenchError::Args(format!(
                "--op {op} is not a {workload} operation; use one of {}",
                names.join(", ")
            )));
        }
        let batched = workload == Workload::Kv && matches!(op, BenchOp::Get | BenchOp::Put);
        if workload.is_structure() && args.depth != 1 && !batched {
            return Err(BenchError::Args(format!(
                "the {workload} benchmark with --op {op} issues one operation at a time per client (only kv get and put have batched APIs, Kv::get_many and Kv::upsert_many); use --depth 1 and more --clients"
            )));
        }
        if args.verify && !matches!(workload, Workload::Kv | Workload::Queue) {
            return Err(BenchError::Args(format!(
                "--verify checks the structures that split and merge: run `farpool bench kv --verify` or `farpool bench queue --verify`, not {workload}"
            )));
        }
        if args.verify && !args.peers.is_empty() {
            return Err(BenchError::Args(
                "--verify checks farpool only; drop --peer".into(),
            ));
        }
        if args.verify && args.no_farpool {
            return Err(BenchError::Args(
                "--verify checks farpool; drop --no-farpool".into(),
            ));
        }
        if args.repeat == 0 {
            return Err(BenchError::Args("--repeat must be at least 1".into()));
        }
        if args.duration.is_zero() {
            return Err(BenchError::Args("--duration must be longer than 0".into()));
        }
        if args.no_farpool && args.peers.is_empty() {
            return Err(BenchError::Args(
                "--no-farpool leaves nothing to measure; add --peer redis=ADDR or --peer memcached=ADDR".into(),
            ));
        }
        if args.no_farpool && args.report_node_memory {
            return Err(BenchError::Args(
                "--report-node-memory measures farpool's memory node; drop --no-farpool".into(),
            ));
        }
        if args.block_size() == 0 {
            return Err(BenchError::Args(
                "--block-size must be larger than 0".into(),
            ));
        }
        let size = match (op, args.size) {
            (op, Some(s)) if op.is_atomic() && s != 8 => {
                return Err(BenchError::Args(format!(
                    "--op {op} works on 8-byte words; omit --size or pass --size 8"
                )))
            }
            (op, _) if op.is_atomic() => 8,
            (BenchOp::Alloc, Some(_)) => {
                return Err(BenchError::Args(
                    "--op alloc allocates one block at a time; set the block size with --block-size instead of --size".into(),
                ))
            }
            (BenchOp::Alloc, None) => args.block_size(),
            (_, Some(0)) => return Err(BenchError::Args("--size must be larger than 0".into())),
            (_, Some(s)) => s,
            (_, None) => 4096,
        };
        if op == BenchOp::Alloc && args.depth != 1 {
            return Err(BenchError::Args(
                "--op alloc issues one allocation at a time per client; use --depth 1".into(),
            ));
        }
        if op.moves_payload() && size > args.block_size() && args.controller.is_none() {
            return Err(BenchError::Args(format!(
                "--size {size} is larger than --block-size {}; an operation must fit in one block, raise --block-size",
                args.block_size()
            )));
        }
        let depth = args.depth as u64;
        if depth > MAX_SLOTS {
            return Err(BenchError::Args(format!(
                "--depth {depth} is larger than the {MAX_SLOTS} slots a client cycles through; lower it"
            )));
        }
        let slots = (args.block_size() / size).max(depth).clamp(1, MAX_SLOTS);
        let plan = Self {
            workload,
            op,
            size,
            clients,
            depth: args.depth,
            duration: args.duration,
            warmup: args.warmup,
            slots,
        };
        if args.controller.is_none() && !args.no_farpool {
            let needed = plan.bytes_per_client_upper_bound(args.block_size()) * clients as u64;
            if needed > args.capacity {
                return Err(BenchError::Args(format!(
                    "{} clients need about {} of pool memory but --capacity is {}; raise --capacity",
                    clients,
                    crate::size::format_size(needed),
                    crate::size::format_size(args.capacity)
                )));
            }
        }
        Ok(plan)
    }

    /// Upper bound of the pool memory one client allocates with blocks of `block_size`.
    pub fn bytes_per_client_upper_bound(&self, block_size: u64) -> u64 {
        if self.op == BenchOp::Alloc {
            return crate::bench::farpool_load::ALLOC_FREE_BATCH as u64 * block_size;
        }
        if self.workload.is_structure() {
            // Out-of-place records, half-full partitions after splits, directories and
            // a file or log being replaced: a generous bound.
            let data = (self.slots * self.size).div_ceil(block_size).max(1) * block_size;
            return data * 4 + 4 * block_size;
        }
        let per_block = (block_size / self.size).max(1);
        self.slots.div_ceil(per_block) * block_size
    }

    /// Payload bytes per operation counted in MiB/s (0 for atomics and allocations).
    pub fn payload_bytes(&self) -> u64 {
        if self.op.moves_payload() {
            self.size
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let mut v = vec!["farpool-bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().bench
    }

    #[test]
    fn defaults_and_plan() {
        let a = parse(&[]);
        assert_eq!(a.workload, Workload::Raw);
        assert_eq!(a.op, None);
        assert_eq!(a.transport, BenchTransport::Soft);
        assert_eq!(a.duration, Duration::from_secs(5));
        assert_eq!(a.warmup, Duration::from_secs(1));
        let p = Plan::from_args(&a).unwrap();
        assert_eq!(p.op, BenchOp::Read);
        assert_eq!(p.clients, 1);
        assert_eq!(p.size, 4096);
        assert_eq!(p.slots, 256);
        assert_eq!(p.payload_bytes(), 4096);
    }

    #[test]
    fn atomics_are_eight_bytes() {
        let p = Plan::from_args(&parse(&["--op", "faa"])).unwrap();
        assert_eq!(p.size, 8);
        assert_eq!(p.slots, MAX_SLOTS);
        assert_eq!(p.payload_bytes(), 0);
        assert!(Plan::from_args(&parse(&["--op", "cas", "--size", "16"])).is_err());
        assert!(Plan::from_args(&parse(&["--op", "cas", "--size", "8"])).is_ok());
    }

    #[test]
    fn slots_cover_the_depth() {
        let p = Plan::from_args(&parse(&["--size", "64KiB", "--depth", "32"])).unwrap();
        assert_eq!(p.slots, 32);
        assert_eq!(p.bytes_per_client_upper_bound(1 << 20), 2 << 20);
    }

    #[test]
    fn rejects_bad_combinations() {
        assert!(Plan::from_args(&parse(&["--clients", "0"])).is_err());
        assert!(Plan::from_args(&parse(&["--depth", "0"])).is_err());
        assert!(Plan::from_args(&parse(&["--no-farpool"])).is_err());
        assert!(Plan::from_args(&parse(&["--op", "alloc", "--depth", "4"])).is_err());
        assert!(Plan::from_args(&parse(&["--size", "2MiB"])).is_err());
        assert!(Plan::from_args(&parse(&["--clients", "1000"])).is_err());
        assert!(Plan::from_args(&parse(&["--block-size", "3000"])).is_err());
        assert!(Plan::from_args(&parse(&["--block-size", "1KiB"])).is_err());
    }

    #[test]
    fn parses_peers_and_durations() {
        let a = parse(&[
            "--peer",
            "redis=127.0.0.1:6399",
            "--peer",
            "memcached=127.0.0.1:11299",
            "--duration",
            "1.5",
            "--warmup",
            "250ms",
        ]);
        assert_eq!(a.peers.len(), 2);
        assert_eq!(a.peers[0].kind, PeerKind::Redis);
        assert_eq!(a.peers[1].addr, "127.0.0.1:11299");
        assert_eq!(a.duration, Duration::from_millis(1500));
        assert_eq!(a.warmup, Duration::from_millis(250));
        assert!("mongo=1:2".parse::<PeerSpec>().is_err());
        assert!("redis".parse::<PeerSpec>().is_err());
        assert!("redis=localhost".parse::<PeerSpec>().is_err());
        assert!(parse_duration_arg("5 parsecs").is_err());
        assert!(parse_duration_arg("-1").is_err());
        assert_eq!(parse_duration_arg("1m").unwrap(), Duration::from_secs(60));
    }

    #[test]
    fn peers_skip_what_they_cannot_compare() {
        use Workload::*;
        assert!(PeerKind::Redis
            .unsupported_reason(Raw, BenchOp::Cas)
            .is_some());
        assert!(PeerKind::Memcached
            .unsupported_reason(Raw, BenchOp::Alloc)
            .is_some());
        assert!(PeerKind::Memcached
            .unsupported_reason(Raw, BenchOp::Faa)
            .is_none());
        for (w, op) in [
            (Kv, BenchOp::Get),
            (Kv, BenchOp::Put),
            (Queue, BenchOp::Enqueue),
            (Queue, BenchOp::Dequeue),
            (File, BenchOp::Append),
            (File, BenchOp::Read),
        ] {
            assert!(
                PeerKind::Redis.unsupported_reason(w, op).is_none(),
                "{w} {op}"
            );
            assert!(PeerKind::Memcached.unsupported_reason(w, op).is_some());
        }
        assert!(PeerKind::Redis
            .unsupported_reason(Log, BenchOp::Append)
            .is_some());
        assert!(PeerKind::Redis
            .unsupported_reason(Log, BenchOp::Scan)
            .is_some());
    }

    #[test]
    fn structure_workloads_parse_and_validate() {
        let a = parse(&["kv"]);
        assert_eq!(a.workload, Workload::Kv);
        let p = Plan::from_args(&a).unwrap();
        assert_eq!(
            (p.workload, p.op, p.size),
            (Workload::Kv, BenchOp::Get, 4096)
        );
        let p = Plan::from_args(&parse(&["queue", "--op", "dequeue", "--clients", "4"])).unwrap();
        assert_eq!((p.op, p.clients, p.depth), (BenchOp::Dequeue, 4, 1));
        assert_eq!(
            Plan::from_args(&parse(&["file"])).unwrap().op,
            BenchOp::Read
        );
        assert_eq!(
            Plan::from_args(&parse(&["log"])).unwrap().op,
            BenchOp::Append
        );
        assert_eq!(
            Plan::from_args(&parse(&["raw", "--op", "faa"]))
                .unwrap()
                .size,
            8
        );
        // Operations of another workload, pipelining, and --verify where it does not apply.
        for bad in [
            &["kv", "--op", "read"][..],
            &["queue", "--op", "get"],
            &["--op", "get"],
            &["log", "--op", "read"],
            &["queue", "--depth", "4"],
            &["file", "--verify"],
            &["raw", "--verify"],
            &["kv", "--verify", "--peer", "redis=127.0.0.1:6379"],
        ] {
            let err = Plan::from_args(&parse(bad)).unwrap_err();
            assert!(matches!(err, BenchError::Args(_)), "{bad:?}: {err}");
        }
        let err = Plan::from_args(&parse(&["queue", "--depth", "4"])).unwrap_err();
        assert!(err.to_string().contains("--depth 1"), "{err}");
        // kv put is batched too (Kv::upsert_many).
        let p = Plan::from_args(&parse(&["kv", "--op", "put", "--depth", "8"])).unwrap();
        assert_eq!((p.op, p.depth), (BenchOp::Put, 8));
        // kv get is batched (Kv::get_many).
        let p = Plan::from_args(&parse(&["kv", "--depth", "16"])).unwrap();
        assert_eq!((p.op, p.depth), (BenchOp::Get, 16));
        let p = Plan::from_args(&parse(&["kv", "--verify"])).unwrap();
        assert_eq!(p.clients, 4);
        assert_eq!(Workload::Queue.farpool_system(), "farpool-queue");
        assert!(clap_names_match());
    }

    /// The command-line names of the workloads are their `as_str` names.
    fn clap_names_match() -> bool {
        use clap::ValueEnum;
        Workload::value_variants().iter().all(|w| {
            w.to_possible_value()
                .is_some_and(|v| v.get_name() == w.as_str())
        }) && BenchOp::value_variants().iter().all(|o| {
            o.to_possible_value()
                .is_some_and(|v| v.get_name() == o.as_str())
        })
    }
}
