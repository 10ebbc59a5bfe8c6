//! The controller's Prometheus metrics: request counts and latencies kept here, the
//! rest read from the state's own status (allocation counters, capacity and usage per
//! node, node health, paths and leases) and from the metadata log, so nothing is
//! counted twice.

use crate::metrics::{Exposition, Histogram, MetricType, LATENCY_BUCKETS};
use crate::proto::{ClusterStatus, Request, Response};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Request kinds, in the order of the counters below.
const KINDS: [&str; 12] = [
    "open",
    "alloc",
    "free",
    "lookup",
    "renew",
    "remove",
    "set_quota",
    "status",
    "pin",
    "refresh",
    "map",
    "fence",
];

/// The metric name of a request's kind (an index into [`KINDS`]).
pub(crate) fn kind_of(req: &Request) -> usize {
    match req {
        Request::Open { .. } => 0,
        Request::Alloc { .. } | Request::AllocReplicated { .. } => 1,
        Request::Free { .. } => 2,
        Request::Lookup { .. } => 3,
        Request::Renew { .. } => 4,
        Request::Remove { .. } => 5,
        Request::SetQuota { .. } => 6,
        Request::Status => 7,
        Request::Pin { .. } => 8,
        Request::Refresh { .. } => 9,
        Request::Map { .. } => 10,
        Request::FenceAcquire { .. }
        | Request::FenceRenew { .. }
        | Request::FenceRelease { .. } => 11,
    }
}

/// Counters the controller's server keeps for metrics.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    requests: [AtomicU64; KINDS.len()],
    errors: [AtomicU64; KINDS.len()],
    latency: [Histogram; KINDS.len()],
    /// Metadata log records appended since start.
    pub log_records: AtomicU64,
    /// Snapshots (log generations) written since start.
    pub log_snapshots: AtomicU64,
    /// Clients, requests and memory nodes refused by authentication or scope.
    pub auth_refused: AtomicU64,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            errors: Default::default(),
            latency: std::array::from_fn(|_| Histogram::new(LATENCY_BUCKETS)),
            log_records: AtomicU64::new(0),
            log_snapshots: AtomicU64::new(0),
            auth_refused: AtomicU64::new(0),
        }
    }
}

impl ServerMetrics {
    /// Records one answered request of `kind` that took `took` (including the wait for
    /// its revocations).
    pub fn request(&self, kind: usize, response: &Response, took: Duration) {
        let (Some(n), Some(h)) = (self.requests.get(kind), self.latency.get(kind)) else {
            return;
        };
        n.fetch_add(1, Ordering::Relaxed);
        h.observe(took);
        if matches!(response, Response::Error(_)) {
            if let Some(e) = self.errors.get(kind) {
                e.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Renders everything: these counters, `status`, and whether a metadata log is kept.
    pub fn render(&self, st: &ClusterStatus, logging: bool) -> String {
        use MetricType::*;
        let mut e = Exposition::new();
        e.family(
            "farpool_controller_requests_total",
            Counter,
            "Client requests answered, by kind.",
        );
        for (k, n) in KINDS.iter().zip(&self.requests) {
            let v = n.load(Ordering::Relaxed) as f64;
            e.sample("farpool_controller_requests_total", &[("kind", k)], v);
        }
        e.family(
            "farpool_controller_request_errors_total",
            Counter,
            "Client requests answered with an error, by kind.",
        );
        for (k, n) in KINDS.iter().zip(&self.errors) {
            let v = n.load(Ordering::Relaxed) as f64;
            e.sample("farpool_controller_request_errors_total", &[("kind", k)], v);
        }
        e.family(
            "farpool_controller_request_duration_seconds",
            Histogram,
            "Time from reading a client request to having its answer, including the wait for memory nodes to confirm revocations.",
        );
        for (k, h) in KINDS.iter().zip(&self.latency) {
            e.histogram(
                "farpool_controller_request_duration_seconds",
                &[("kind", k)],
                h,
            );
        }
        e.single(
            "farpool_controller_blocks_allocated_total",
            Counter,
            "Blocks allocated since start.",
            st.blocks_allocated_total as f64,
        );
        e.single(
            "farpool_controller_blocks_freed_total",
            Counter,
            "Blocks freed since start (explicitly, by removal or by lease expiry).",
            st.blocks_freed_total as f64,
        );
        e.single(
            "farpool_controller_blocks_expired_total",
            Counter,
            "Blocks reclaimed because their lease lapsed.",
            st.blocks_expired_total as f64,
        );
        e.single(
            "farpool_controller_blocks_degraded",
            Gauge,
            "Replicated blocks with fewer live copies than wanted (being re-replicated or waiting for a node).",
            st.blocks_degraded as f64,
        );
        e.single(
            "farpool_controller_blocks_lost",
            Gauge,
            "Blocks whose every copy was on memory nodes that died.",
            st.blocks_lost as f64,
        );
        e.single(
            "farpool_controller_replicas_rebuilt_total",
            Counter,
            "Copies re-created by re-replication since start.",
            st.replicas_rebuilt_total as f64,
        );
        e.single(
            "farpool_controller_flushes_total",
            Counter,
            "Mapped paths flushed to their backing path and freed since start.",
            st.flushes_total as f64,
        );
        e.single(
            "farpool_controller_flush_failures_total",
            Counter,
            "Flush attempts of mapped paths that failed (the data stays; retried with backoff).",
            st.flush_failures_total as f64,
        );
        e.single(
            "farpool_controller_flushes_pending",
            Gauge,
            "Mapped paths whose lease ran out and whose flush is running or waiting for a retry.",
            st.flushes.len() as f64,
        );
        e.single(
            "farpool_controller_capacity_bytes",
            Gauge,
            "Total capacity of live memory nodes.",
            st.capacity_bytes as f64,
        );
        e.single(
            "farpool_controller_used_bytes",
            Gauge,
            "Bytes allocated.",
            st.used_bytes as f64,
        );
        e.single(
            "farpool_controller_lease_seconds",
            Gauge,
            "Lease period granted by open, alloc and renew.",
            st.lease_ms as f64 / 1000.0,
        );
        let alive = st.nodes.iter().filter(|n| n.alive).count();
        e.family(
            "farpool_controller_nodes",
            Gauge,
            "Memory nodes known, by health.",
        );
        e.sample(
            "farpool_controller_nodes",
            &[("state", "alive")],
            alive as f64,
        );
        e.sample(
            "farpool_controller_nodes",
            &[("state", "dead")],
            (st.nodes.len() - alive) as f64,
        );
        type Field = fn(&crate::proto::NodeStatus) -> f64;
        let per_node: [(&str, &str, Field); 5] = [
            (
                "farpool_controller_node_alive",
                "1 if the memory node is alive (heartbeats arriving), 0 if dead.",
                |n| f64::from(u8::from(n.alive)),
            ),
            (
                "farpool_controller_node_capacity_bytes",
                "Region size of the memory node.",
                |n| n.capacity as f64,
            ),
            (
                "farpool_controller_node_used_bytes",
                "Bytes of the memory node's blocks not free for allocation (owned or being revoked).",
                |n| (n.blocks_total.saturating_sub(n.blocks_free) * n.block_size) as f64,
            ),
            (
                "farpool_controller_node_blocks_free",
                "Blocks of the memory node free for allocation.",
                |n| n.blocks_free as f64,
            ),
            (
                "farpool_controller_node_blocks_revoking",
                "Freed blocks waiting for the memory node to confirm revocation.",
                |n| n.blocks_revoking as f64,
            ),
        ];
        for (name, help, f) in per_node {
            e.family(name, Gauge, help);
            for n in &st.nodes {
                let id = n.endpoint.node.to_string();
                e.sample(name, &[("node", &id), ("addr", &n.endpoint.addr)], f(n));
            }
        }
        let pinned = st.paths.iter().filter(|p| p.pinned).count();
        let active = st
            .paths
            .iter()
            .filter(|p| !p.pinned && p.lease_remaining_ms > 0)
            .count();
        e.single(
            "farpool_controller_paths",
            Gauge,
            "Paths in the namespace.",
            st.paths.len() as f64,
        );
        e.family(
            "farpool_controller_leases",
            Gauge,
            "Paths by lease state: active (lease running), lapsed (in the grace period, about to be reclaimed), pinned (no lease).",
        );
        e.sample(
            "farpool_controller_leases",
            &[("state", "active")],
            active as f64,
        );
        e.sample(
            "farpool_controller_leases",
            &[("state", "lapsed")],
            (st.paths.len() - active - pinned) as f64,
        );
        e.sample(
            "farpool_controller_leases",
            &[("state", "pinned")],
            pinned as f64,
        );
        e.single(
            "farpool_controller_metadata_log_enabled",
            Gauge,
            "1 if the controller keeps a metadata log (--data-dir), else 0.",
            f64::from(u8::from(logging)),
        );
        e.single(
            "farpool_controller_metadata_log_records_total",
            Counter,
            "Metadata log records appended since start.",
            self.log_records.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "farpool_controller_metadata_snapshots_total",
            Counter,
            "Metadata snapshots (new log generations) written since start, including the one at start.",
            self.log_snapshots.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "farpool_controller_auth_refused_total",
            Counter,
            "Client connections, client requests and memory-node registrations refused by authentication (token, cluster key) or job scope.",
            self.auth_refused.load(Ordering::Relaxed) as f64,
        );
        e.finish()
    }
}
