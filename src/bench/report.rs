//! Results: the JSON record of one run, the human table, and the markdown tables of
//! `docs/BENCHMARKS.md` rendered from a file of JSON lines.

use super::error::BenchError;
use super::progress::human_rate;
use super::stats::{median, Summary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One measured run, as printed by `farpool bench --json` (one object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRecord {
    /// `farpool`, `redis` or `memcached`; `farpool-kv`, `farpool-queue`,
    /// `farpool-file` or `farpool-log` for the data-structure workloads.
    pub system: String,
    /// The data-structure workload (`kv`, `queue`, `file`, `log`) for farpool and its
    /// peers; absent for raw block operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure: Option<String>,
    /// farpool's data-plane transport (`soft`, `shm`); `null` for peers.
    pub transport: Option<String>,
    /// `read`, `write`, `cas`, `faa` or `alloc`.
    pub op: String,
    /// Bytes per operation (the block size for `alloc`).
    pub size: u64,
    /// Client threads.
    pub clients: usize,
    /// Operations per batch (pipeline depth).
    pub depth: usize,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Payload MiB per second (0 for atomics and allocations).
    pub mib_per_sec: f64,
    /// Median latency, µs (batch latency, recorded once per operation).
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
    /// Successful operations in the measured window.
    #[serde(default)]
    pub ops: u64,
    /// Failed operations in the measured window.
    pub errors: u64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Repeat index, from 1.
    pub run: u32,
    /// Memory node resident memory outside its region with the clients connected, KiB
    /// (self-started memory node, `--report-node-memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_rss_beyond_region_kib: Option<u64>,
    /// Memory node total resident memory as reported by the controller, KiB (running
    /// cluster, `--report-node-memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_rss_kib: Option<u64>,
    /// The first error message, when operations failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Kv gets answered through the clients' location caches (`kv --op get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<KvCacheCounts>,
}

/// What the Kv handles' location caches did over a run (warm-up included), summed over
/// the clients (see `Kv::cache_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvCacheCounts {
    /// Gets answered in one round trip.
    pub hits: u64,
    /// Gets whose cached location failed validation (then two round trips).
    pub fallbacks: u64,
    /// Gets of keys not cached (two round trips).
    pub misses: u64,
}

impl BenchRecord {
    /// A record for `summary`, with numbers rounded to what is meaningful.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        system: &str,
        transport: Option<&str>,
        op: &str,
        size: u64,
        clients: usize,
        depth: usize,
        run: u32,
        summary: &Summary,
    ) -> Self {
        let r = |v: f64, places: i32| {
            let f = 10f64.powi(places);
            (v * f).round() / f
        };
        Self {
            system: system.to_string(),
            structure: None,
            transport: transport.map(str::to_string),
            op: op.to_string(),
            size,
            clients,
            depth,
            ops_per_sec: r(summary.ops_per_sec, 1),
            mib_per_sec: r(summary.mib_per_sec, 3),
            p50_us: r(summary.p50_us, 3),
            p99_us: r(summary.p99_us, 3),
            p999_us: r(summary.p999_us, 3),
            ops: summary.ops,
            errors: summary.errors,
            duration_s: r(summary.duration_s, 3),
            run,
            node_rss_beyond_region_kib: None,
            node_rss_kib: None,
            first_error: None,
            kv_cache: None,
        }
    }

    /// The record as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> Result<String, BenchError> {
        serde_json::to_string(self).map_err(|e| BenchError::Output(e.into()))
    }

    /// `soft`/`shm` for farpool, `-` for peers.
    fn transport_label(&self) -> &str {
        self.transport.as_deref().unwrap_or("-")
    }
}

/// The header of the human-readable result table.
pub fn human_header() -> String {
    format!(
        "{:<13} {:<5} {:<7} {:>8} {:>7} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>3}",
        "system",
        "trans",
        "op",
        "size",
        "clients",
        "depth",
        "ops/s",
        "MiB/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "errors",
        "run"
    )
}

/// One record as a row of the human-readable table, with notes on following lines.
pub fn human_row(r: &BenchRecord) -> String {
    let mut s = format!(
        "{:<13} {:<5} {:<7} {:>8} {:>7} {:>5} {:>10} {:>9.1} {:>9} {:>9} {:>9} {:>7} {:>3}",
        r.system,
        r.transport_label(),
        r.op,
        size_label(r.size),
        r.clients,
        r.depth,
        human_rate(r.ops_per_sec),
        r.mib_per_sec,
        latency_label(r.p50_us),
        latency_label(r.p99_us),
        latency_label(r.p999_us),
        r.errors,
        r.run
    );
    if let Some(kib) = r.node_rss_beyond_region_kib {
        let _ = write!(
            s,
            "\n    memory node: {} resident beyond its region with {} clients connected",
            kib_label(kib),
            r.clients
        );
    }
    if let Some(kib) = r.node_rss_kib {
        let _ = write!(
            s,
            "\n    memory node: {} resident in total (region included)",
            kib_label(kib)
        );
    }
    if let Some(c) = &r.kv_cache {
        let _ = write!(
            s,
            "\n    kv location cache: {} hits, {} fallbacks, {} misses",
            c.hits, c.fallbacks, c.misses
        );
    }
    if let Some(e) = &r.first_error {
        let _ = write!(s, "\n    first error: {e}");
    }
    s
}

/// `4096` → `4 KiB`, `100` → `100 B`.
fn size_label(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = "B";
    for u in UNITS {
        if v >= 1024 && v % 1024 == 0 {
            v /= 1024;
            unit = u;
        } else {
            break;
        }
    }
    format!("{v} {unit}")
}

/// Latency in µs with precision that fits its magnitude.
fn latency_label(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 1000.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

fn kib_label(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Parses JSON lines of [`BenchRecord`]s; blank lines and lines starting with `#` are
/// skipped. `source` names the input in errors.
pub(crate) fn parse_records(jsonl: &str, source: &str) -> Result<Vec<BenchRecord>, BenchError> {
    jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| BenchError::BadRecord {
                path: source.to_string(),
                line: i + 1,
                detail: e.to_string(),
            })
        })
        .collect()
}

/// Renders the markdown tables of `docs/BENCHMARKS.md` from the output of
/// `farpool bench --json` (one [`BenchRecord`] per line, any number of runs).
///
/// Repeated runs of the same configuration are summarised as the median with the
/// min–max range; ratio columns compare medians. The output has three parts: the
/// performance targets, farpool (soft transport) against each peer per operation, and
/// every configuration measured.
pub fn render_markdown(jsonl: &str) -> Result<String, BenchError> {
    render_records(&parse_records(jsonl, "<input>")?)
}

/// Configuration of a run: everything but the measurements.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    system_rank: u8,
    system: String,
    transport: String,
    op_rank: u8,
    op: String,
    size: u64,
    clients: usize,
    depth: usize,
}

impl GroupKey {
    fn of(r: &BenchRecord) -> Self {
        Self {
            system_rank: match r.system.as_str() {
                "farpool" => 0,
                "redis" => 1,
                "memcached" => 2,
                _ => 3,
            },
            system: r.system.clone(),
            transport: r.transport_label().to_string(),
            op_rank: match r.op.as_str() {
                "read" => 0,
                "write" => 1,
                "cas" => 2,
                "faa" => 3,
                "alloc" => 4,
                _ => 5,
            },
            op: match &r.structure {
                Some(s) => format!("{s} {}", r.op),
                None => r.op.clone(),
            },
            size: r.size,
            clients: r.clients,
            depth: r.depth,
        }
    }
}

/// Median and range of one metric over repeated runs.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    runs: usize,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Self> {
        let median = median(values)?;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self {
            median,
            min,
            max,
            runs: values.len(),
        })
    }

    fn cell(&self, fmt: fn(f64) -> String) -> String {
        if self.runs > 1 {
            format!("{} ({}–{})", fmt(self.median), fmt(self.min), fmt(self.max))
        } else {
            fmt(self.median)
        }
    }
}

/// All runs of one configuration.
struct Group<'a> {
    runs: Vec<&'a BenchRecord>,
}

impl Group<'_> {
    fn spread(&self, f: fn(&BenchRecord) -> f64) -> Option<Spread> {
        Spread::of(&self.runs.iter().map(|r| f(r)).collect::<Vec<_>>())
    }
    fn ops(&self) -> Option<Spread> {
        self.spread(|r| r.ops_per_sec)
    }
    fn p50(&self) -> Option<Spread> {
        self.spread(|r| r.p50_us)
    }
    fn errors(&self) -> u64 {
        self.runs.iter().map(|r| r.errors).sum()
    }
    fn node_memory_kib(&self) -> Option<u64> {
        self.runs
            .iter()
            .filter_map(|r| r.node_rss_beyond_region_kib)
            .max()
    }
}

fn rate_cell(s: Option<Spread>) -> String {
    s.map_or_else(|| "—".into(), |s| s.cell(human_rate))
}

fn latency_cell(s: Option<Spread>) -> String {
    s.map_or_else(|| "—".into(), |s| s.cell(latency_label))
}

/// The cell of a measured spread with a unit suffix, or `None` when not measured.
fn measured(s: Option<Spread>, fmt: fn(f64) -> String, unit: &str) -> Option<String> {
    s.map(|s| s.cell(fmt) + unit)
}

fn ratio_cell(num: Option<f64>, den: Option<f64>) -> String {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}×", n / d),
        _ => "—".into(),
    }
}

/// One row of the targets table.
struct Target {
    what: String,
    /// `None`: not measured.
    farpool: Option<String>,
    /// `None`: not measured; `Some("—")`: no peer for this row.
    peer: Option<String>,
    ratio: String,
    goal: &'static str,
    met: Option<bool>,
}

/// Renders the markdown tables for parsed records (see [`render_markdown`]).
pub(crate) fn render_records(records: &[BenchRecord]) -> Result<String, BenchError> {
    let mut groups: BTreeMap<GroupKey, Group<'_>> = BTreeMap::new();
    for r in records {
        groups
            .entry(GroupKey::of(r))
            .or_insert_with(|| Group { runs: Vec::new() })
            .runs
            .push(r);
    }
    let find = |system: &str,
                transport: Option<&str>,
                op: &str,
                size: Option<u64>,
                clients: usize,
                depth: Option<usize>| {
        groups.iter().find_map(|(k, g)| {
            (k.system == system
                && transport.map_or(true, |t| t == k.transport)
                && k.op == op
                && size.map_or(true, |s| s == k.size)
                && k.clients == clients
                && depth.map_or(true, |d| d == k.depth))
            .then_some(g)
        })
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        "_{} runs of {} configurations. Cells are the median over repeated runs with the min–max range in parentheses; ratios compare medians._\n",
        records.len(),
        groups.len()
    );

    // 1. Targets.
    let mut targets = Vec::new();
    {
        let fp = find("farpool", Some("soft"), "read", Some(4096), 1, Some(1));
        let rd = find("redis", None, "read", Some(4096), 1, Some(1));
        let (f, p) = (fp.and_then(Group::p50), rd.and_then(Group::p50));
        targets.push(Target {
            what: "soft 4 KiB READ p50, 1 client, depth 1 (vs Redis GET p50)".into(),
            farpool: measured(f, latency_label, " µs"),
            peer: measured(p, latency_label, " µs"),
            ratio: match (f, p) {
                (Some(f), Some(p)) if p.median > 0.0 => {
                    format!("{:.2}× Redis", f.median / p.median)
                }
                _ => "—".into(),
            },
            goal: "reported",
            met: None,
        });
    }
    for (op, peer_op) in [("read", "GET"), ("write", "SET")] {
        let fp = find("farpool", Some("soft"), op, Some(4096), 4, Some(16)).and_then(Group::ops);
        for (peer, peer_name) in [("redis", "Redis"), ("memcached", "memcached")] {
            let pp = find(peer, None, op, Some(4096), 4, Some(16)).and_then(Group::ops);
            let peer_cmd = if peer == "redis" {
                peer_op.to_string()
            } else {
                peer_op.to_ascii_lowercase()
            };
            targets.push(Target {
                what: format!(
                    "soft 4 KiB {} ops/s, 4 clients, depth 16 (vs {peer_name} {peer_cmd}, pipeline 16)",
                    op.to_ascii_uppercase()
                ),
                farpool: measured(fp, human_rate, ""),
                peer: measured(pp, human_rate, ""),
                ratio: ratio_cell(fp.map(|s| s.median), pp.map(|s| s.median)),
                goal: "≥ 2×",
                met: fp.zip(pp).map(|(f, p)| f.median >= 2.0 * p.median),
            });
        }
    }
    for depth in [1, 16] {
        let fp =
            find("farpool", Some("shm"), "read", Some(4096), 1, Some(depth)).and_then(Group::ops);
        targets.push(Target {
            what: format!("shm 4 KiB READ ops/s, 1 client, depth {depth}"),
            farpool: measured(fp, human_rate, ""),
            peer: Some("—".into()),
            ratio: "—".into(),
            goal: "≥ 1M ops/s",
            met: fp.map(|f| f.median >= 1e6),
        });
    }
    {
        let p50 = find("farpool", None, "alloc", None, 1, None).and_then(Group::p50);
        targets.push(Target {
            what: "controller block allocation p50, 1 client".into(),
            farpool: measured(p50, latency_label, " µs"),
            peer: Some("—".into()),
            ratio: "—".into(),
            goal: "≤ 100 µs",
            met: p50.map(|s| s.median <= 100.0),
        });
        let rate = find("farpool", None, "alloc", None, 4, None).and_then(Group::ops);
        targets.push(Target {
            what: "controller allocations/s, 4 clients (frees batched 16 per request)".into(),
            farpool: measured(rate, human_rate, ""),
            peer: Some("—".into()),
            ratio: "—".into(),
            goal: "≥ 50k/s",
            met: rate.map(|s| s.median >= 50_000.0),
        });
    }
    {
        let kib = groups
            .iter()
            .filter(|(k, _)| k.system == "farpool" && k.clients == 64)
            .filter_map(|(_, g)| g.node_memory_kib())
            .max();
        targets.push(Target {
            what: "memory node memory beyond its region, 64 clients connected (max over runs)"
                .into(),
            farpool: kib.map(kib_label),
            peer: Some("—".into()),
            ratio: "—".into(),
            goal: "< 64 MiB",
            met: kib.map(|k| k < 64 * 1024),
        });
    }
    let _ = writeln!(out, "### Targets\n");
    let _ = writeln!(out, "| measurement | farpool | peer | ratio | goal | met |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
    for t in &targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            t.what,
            t.farpool.as_deref().unwrap_or("not measured"),
            t.peer.as_deref().unwrap_or("not measured"),
            t.ratio,
            t.goal,
            met
        );
    }

    // 2. farpool (soft) against each peer, per operation.
    let peers: Vec<&str> = ["redis", "memcached"]
        .into_iter()
        .filter(|p| groups.keys().any(|k| k.system == *p))
        .collect();
    if !peers.is_empty() {
        let _ = writeln!(out, "\n### farpool (soft transport) vs peers\n");
        for op in ["read", "write", "faa"] {
            let mut shapes: Vec<(u64, usize, usize)> = groups
                .keys()
                .filter(|k| {
                    k.op == op
                        && (peers.contains(&k.system.as_str())
                            || (k.system == "farpool" && k.transport == "soft"))
                })
                .map(|k| (k.size, k.clients, k.depth))
                .collect();
            shapes.sort_unstable();
            shapes.dedup();
            if shapes.is_empty() {
                continue;
            }
            let _ = writeln!(out, "#### {}\n", op.to_ascii_uppercase());
            let mut header =
                "| size | clients | depth | farpool ops/s | farpool p50 µs | farpool p99 µs |"
                    .to_string();
            let mut rule = "|---:|---:|---:|---:|---:|---:|".to_string();
            for p in &peers {
                let _ = write!(header, " {p} ops/s | {p} p50 µs |");
                rule.push_str("---:|---:|");
            }
            for p in &peers {
                let _ = write!(header, " ×{p} |");
                rule.push_str("---:|");
            }
            let _ = writeln!(out, "{header}\n{rule}");
            for (size, clients, depth) in shapes {
                let fp = find(
                    "farpool",
                    Some("soft"),
                    op,
                    Some(size),
                    clients,
                    Some(depth),
                );
                let fops = fp.and_then(Group::ops);
                let mut row = format!(
                    "| {} | {clients} | {depth} | {} | {} | {} |",
                    size_label(size),
                    rate_cell(fops),
                    latency_cell(fp.and_then(Group::p50)),
                    latency_cell(fp.and_then(|g| g.spread(|r| r.p99_us)))
                );
                let mut ratios = String::new();
                for p in &peers {
                    let pg = find(p, None, op, Some(size), clients, Some(depth));
                    let pops = pg.and_then(Group::ops);
                    let _ = write!(
                        row,
                        " {} | {} |",
                        rate_cell(pops),
                        latency_cell(pg.and_then(Group::p50))
                    );
                    let _ = write!(
                        ratios,
                        " {} |",
                        ratio_cell(fops.map(|s| s.median), pops.map(|s| s.median))
                    );
                }
                let _ = writeln!(out, "{row}{ratios}");
            }
            let _ = writeln!(out);
        }
    }

    // 3. Everything measured.
    let _ = writeln!(out, "\n### All configurations\n");
    let _ = writeln!(out, "| system | transport | op | size | clients | depth | runs | ops/s | MiB/s | p50 µs | p99 µs | p99.9 µs | errors | node memory beyond region |");
    let _ = writeln!(
        out,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (k, g) in &groups {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            k.system,
            k.transport,
            k.op,
            size_label(k.size),
            k.clients,
            k.depth,
            g.runs.len(),
            rate_cell(g.ops()),
            g.spread(|r| r.mib_per_sec)
                .map_or_else(|| "—".into(), |s| s.cell(|v| format!("{v:.1}"))),
            latency_cell(g.p50()),
            latency_cell(g.spread(|r| r.p99_us)),
            latency_cell(g.spread(|r| r.p999_us)),
            g.errors(),
            g.node_memory_kib().map_or_else(|| "—".into(), kib_label),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of `(size, clients, depth)` with the given rate, p50 and run index.
    fn rec(
        system: &str,
        transport: Option<&str>,
        op: &str,
        (size, clients, depth): (u64, usize, usize),
        ops: f64,
        p50: f64,
        run: u32,
    ) -> BenchRecord {
        let summary = Summary {
            ops: (ops * 2.0) as u64,
            errors: 0,
            duration_s: 2.0,
            ops_per_sec: ops,
            mib_per_sec: ops * size as f64 / 1048576.0,
            p50_us: p50,
            p99_us: p50 * 2.0,
            p999_us: p50 * 3.0,
        };
        BenchRecord::new(system, transport, op, size, clients, depth, run, &summary)
    }

    #[test]
    fn json_lines_have_the_documented_fields() {
        let mut r = rec(
            "farpool",
            Some("soft"),
            "read",
            (4096, 4, 16),
            123456.789,
            41.23456,
            2,
        );
        r.node_rss_beyond_region_kib = Some(2048);
        let line = r.to_json_line().unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for field in [
            "system",
            "transport",
            "op",
            "size",
            "clients",
            "depth",
            "ops_per_sec",
            "mib_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "errors",
            "duration_s",
            "run",
            "node_rss_beyond_region_kib",
        ] {
            assert!(v.get(field).is_some(), "missing {field} in {line}");
        }
        assert_eq!(v["system"], "farpool");
        assert_eq!(v["transport"], "soft");
        assert_eq!(v["ops_per_sec"], 123456.8);
        assert_eq!(v["p50_us"], 41.235);
        assert!(v.get("first_error").is_none());
        assert!(v.get("node_rss_kib").is_none());

        let peer = rec("redis", None, "read", (4096, 4, 16), 1.0, 1.0, 1);
        let v: serde_json::Value = serde_json::from_str(&peer.to_json_line().unwrap()).unwrap();
        assert!(v["transport"].is_null());
        assert!(v.get("node_rss_beyond_region_kib").is_none());
        let back: BenchRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn human_rows_line_up_and_carry_notes() {
        let mut r = rec(
            "farpool",
            Some("soft"),
            "read",
            (4096, 64, 1),
            50_000.0,
            900.0,
            1,
        );
        r.node_rss_beyond_region_kib = Some(10 * 1024);
        r.first_error = Some("boom".into());
        let row = human_row(&r);
        let first = row.lines().next().unwrap();
        assert_eq!(first.chars().count(), human_header().chars().count());
        assert!(first.contains("4 KiB"));
        assert!(first.contains("50.00k"));
        assert!(row.contains("10.0 MiB resident beyond its region with 64 clients"));
        assert!(row.contains("first error: boom"));
    }

    #[test]
    fn sizes_and_latencies_format() {
        assert_eq!(size_label(64), "64 B");
        assert_eq!(size_label(4096), "4 KiB");
        assert_eq!(size_label(65536), "64 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(1500), "1500 B");
        assert_eq!(latency_label(3.14659), "3.15");
        assert_eq!(latency_label(41.26), "41.3");
        assert_eq!(latency_label(1234.5), "1234");
    }

    fn sample() -> String {
        let mut lines = Vec::new();
        for run in 1..=3 {
            let j = run as f64;
            lines.push(rec(
                "farpool",
                Some("soft"),
                "read",
                (4096, 1, 1),
                20_000.0 + j * 1000.0,
                45.0 + j,
                run,
            ));
            lines.push(rec(
                "redis",
                None,
                "read",
                (4096, 1, 1),
                15_000.0,
                60.0,
                run,
            ));
            lines.push(rec(
                "farpool",
                Some("soft"),
                "read",
                (4096, 4, 16),
                400_000.0 + j,
                150.0,
                run,
            ));
            lines.push(rec(
                "redis",
                None,
                "read",
                (4096, 4, 16),
                180_000.0,
                300.0,
                run,
            ));
            lines.push(rec(
                "memcached",
                None,
                "read",
                (4096, 4, 16),
                250_000.0,
                250.0,
                run,
            ));
            lines.push(rec(
                "farpool",
                Some("soft"),
                "alloc",
                (1 << 20, 1, 1),
                20_000.0,
                48.0,
                run,
            ));
            let mut mem = rec(
                "farpool",
                Some("soft"),
                "read",
                (4096, 64, 1),
                90_000.0,
                700.0,
                run,
            );
            mem.node_rss_beyond_region_kib = Some(20_000 + run as u64);
            lines.push(mem);
        }
        let mut text = String::from("# comment line\n\n");
        for l in lines {
            text.push_str(&l.to_json_line().unwrap());
            text.push('\n');
        }
        text
    }

    #[test]
    fn renders_markdown_tables() {
        let md = render_markdown(&sample()).unwrap();
        assert!(md.starts_with("_21 runs of 7 configurations."), "{md}");
        // Targets: p50 ratio, throughput ratios and goals.
        assert!(md.contains("| soft 4 KiB READ p50, 1 client, depth 1 (vs Redis GET p50) | 47.0 (46.0–48.0) µs | 60.0 (60.0–60.0) µs | 0.78× Redis | reported | — |"), "{md}");
        assert!(md.contains("| soft 4 KiB READ ops/s, 4 clients, depth 16 (vs Redis GET, pipeline 16) | 400.00k (400.00k–400.00k) | 180.00k (180.00k–180.00k) | 2.22× | ≥ 2× | yes |"), "{md}");
        assert!(md.contains("(vs memcached get, pipeline 16) | 400.00k (400.00k–400.00k) | 250.00k (250.00k–250.00k) | 1.60× | ≥ 2× | **no** |"), "{md}");
        assert!(md.contains("| soft 4 KiB WRITE ops/s, 4 clients, depth 16 (vs Redis SET, pipeline 16) | not measured | not measured | — | ≥ 2× | — |"), "{md}");
        assert!(md.contains("| controller block allocation p50, 1 client | 48.0 (48.0–48.0) µs | — | — | ≤ 100 µs | yes |"), "{md}");
        assert!(
            md.contains(
                "| controller allocations/s, 4 clients (frees batched 16 per request) | not measured |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "64 clients connected (max over runs) | 19.5 MiB | — | — | < 64 MiB | yes |"
            ),
            "{md}"
        );
        // Comparison table: both peers, ratios against medians.
        assert!(md.contains("| size | clients | depth | farpool ops/s | farpool p50 µs | farpool p99 µs | redis ops/s | redis p50 µs | memcached ops/s | memcached p50 µs | ×redis | ×memcached |"), "{md}");
        assert!(md.contains("| 4 KiB | 1 | 1 | 22.00k (21.00k–23.00k) | 47.0 (46.0–48.0) | 94.0 (92.0–96.0) | 15.00k (15.00k–15.00k) | 60.0 (60.0–60.0) | — | — | 1.47× | — |"), "{md}");
        assert!(!md.contains("#### WRITE"));
        // Everything, once per configuration.
        assert_eq!(
            md.matches("| farpool | soft | read | 4 KiB |").count(),
            3,
            "{md}"
        );
        assert!(
            md.contains("| farpool | soft | alloc | 1 MiB | 1 | 1 | 3 |"),
            "{md}"
        );
    }

    #[test]
    fn structure_records_round_trip_and_group_apart_from_raw_ops() {
        let mut file = rec("redis", None, "read", (4096, 4, 1), 100.0, 30.0, 1);
        file.structure = Some("file".into());
        let line = file.to_json_line().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["structure"], "file");
        let back: BenchRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, file);
        let raw = rec("redis", None, "read", (4096, 4, 1), 200.0, 20.0, 1);
        let raw_line = raw.to_json_line().unwrap();
        assert!(!raw_line.contains("structure"), "{raw_line}");
        let md = render_markdown(&format!("{line}\n{raw_line}\n")).unwrap();
        assert!(
            md.contains("| redis | - | file read | 4 KiB | 4 | 1 | 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| redis | - | read | 4 KiB | 4 | 1 | 1 |"),
            "{md}"
        );
        let row = human_row(&file);
        assert_eq!(
            row.lines().next().unwrap().chars().count(),
            human_header().chars().count()
        );
    }

    #[test]
    fn rejects_lines_that_are_not_records() {
        let err = render_markdown("{\"system\": \"farpool\"}\n").unwrap_err();
        assert!(
            matches!(err, BenchError::BadRecord { line: 1, .. }),
            "{err}"
        );
        let mut text = sample();
        text.push_str("garbage\n");
        let err = render_markdown(&text).unwrap_err();
        assert!(err.to_string().contains("line 24"), "{err}");
        assert!(render_markdown("")
            .unwrap()
            .contains("_0 runs of 0 configurations."));
    }
}
