//! What a run measured: per-job times, memory over time, and their summaries.

use super::policy::Policy;
use serde::Serialize;

/// One sample of the pool's memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the start of the run.
    pub t_ms: f64,
    /// Bytes allocated in the pool (the controller's count of granted blocks).
    pub allocated: u64,
    /// Bytes of live intermediate data held in the pool.
    pub used: u64,
}

/// One job's result under one policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobResult {
    /// Job id.
    pub job: String,
    /// Arrival, ms after the start of the run.
    pub arrival_ms: f64,
    /// Time from arrival until the job's reservation was granted (0 for `task`).
    pub wait_ms: f64,
    /// Time from arrival until the job finished.
    pub completion_ms: f64,
    /// Completion time of the same job alone on an unlimited pool.
    pub alone_ms: f64,
    /// `completion_ms / alone_ms`.
    pub slowdown: f64,
    /// Bytes reserved (job-level policies).
    pub reserved_bytes: u64,
    /// Bytes the job spilled to the persistent tier.
    pub spilled_bytes: u64,
    /// Wall time of each stage and of the final collection, ms.
    #[serde(skip)]
    pub phase_ms: Vec<f64>,
}

/// Everything one policy's run measured, with summaries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyReport {
    /// The policy.
    pub policy: Policy,
    /// Median of the jobs' slowdowns.
    pub median_slowdown: f64,
    /// 95th percentile (nearest rank) of the jobs' slowdowns.
    pub p95_slowdown: f64,
    /// Mean of the jobs' slowdowns.
    pub mean_slowdown: f64,
    /// Largest slowdown.
    pub max_slowdown: f64,
    /// Allocated-but-unused memory over allocated memory, time-weighted over the run.
    pub idle_fraction: f64,
    /// Bytes spilled to the persistent tier.
    pub spilled_bytes: u64,
    /// Bytes read back from the persistent tier.
    pub spill_read_bytes: u64,
    /// Bytes written to pool memory.
    pub pool_written_bytes: u64,
    /// Bytes read back and checked (all of them, from the pool or the spill tier).
    pub verified_bytes: u64,
    /// Mean of the jobs' waits for a reservation, ms.
    pub mean_wait_ms: f64,
    /// Time-weighted mean of allocated memory.
    pub mean_allocated_bytes: u64,
    /// Time-weighted mean of used memory.
    pub mean_used_bytes: u64,
    /// Largest allocated memory sampled.
    pub peak_allocated_bytes: u64,
    /// Pool capacity.
    pub capacity_bytes: u64,
    /// Block size.
    pub block_bytes: u64,
    /// From the first arrival to the last job's end, ms.
    pub makespan_ms: f64,
    /// Per-job results.
    pub jobs: Vec<JobResult>,
    /// Memory samples.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// Raw measurements of one run, before summarising.
#[derive(Debug, Clone, Default)]
pub struct RunMeasurements {
    /// Per-job results.
    pub jobs: Vec<JobResult>,
    /// Memory samples.
    pub samples: Vec<Sample>,
    /// Bytes spilled.
    pub spilled_bytes: u64,
    /// Bytes read back from the spill tier.
    pub spill_read_bytes: u64,
    /// Bytes written to the pool.
    pub pool_written_bytes: u64,
    /// Bytes verified.
    pub verified_bytes: u64,
    /// Pool capacity.
    pub capacity_bytes: u64,
    /// Block size.
    pub block_bytes: u64,
    /// Makespan, ms.
    pub makespan_ms: f64,
}

impl PolicyReport {
    /// Summarises a run.
    pub fn new(policy: Policy, m: RunMeasurements) -> PolicyReport {
        let mut slow: Vec<f64> = m.jobs.iter().map(|j| j.slowdown).collect();
        slow.sort_by(f64::total_cmp);
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let waits: Vec<f64> = m.jobs.iter().map(|j| j.wait_ms).collect();
        let tw = time_weighted(&m.samples);
        PolicyReport {
            policy,
            median_slowdown: percentile(&slow, 0.5),
            p95_slowdown: percentile(&slow, 0.95),
            mean_slowdown: mean(&slow),
            max_slowdown: slow.last().copied().unwrap_or(0.0),
            idle_fraction: tw.idle_fraction,
            spilled_bytes: m.spilled_bytes,
            spill_read_bytes: m.spill_read_bytes,
            pool_written_bytes: m.pool_written_bytes,
            verified_bytes: m.verified_bytes,
            mean_wait_ms: mean(&waits),
            mean_allocated_bytes: tw.mean_allocated.round() as u64,
            mean_used_bytes: tw.mean_used.round() as u64,
            peak_allocated_bytes: m.samples.iter().map(|s| s.allocated).max().unwrap_or(0),
            capacity_bytes: m.capacity_bytes,
            block_bytes: m.block_bytes,
            makespan_ms: m.makespan_ms,
            jobs: m.jobs,
            samples: m.samples,
        }
    }
}

/// Nearest-rank percentile of sorted values (`q` in (0, 1]); 0 for no values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Time-weighted summaries of memory samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeWeighted {
    /// ∫ (allocated − used)⁺ dt / ∫ allocated dt (0 if nothing was allocated).
    pub idle_fraction: f64,
    /// Mean allocated bytes.
    pub mean_allocated: f64,
    /// Mean used bytes.
    pub mean_used: f64,
}

/// Integrates samples as a step function (each sample holds until the next).
pub fn time_weighted(samples: &[Sample]) -> TimeWeighted {
    let (mut alloc, mut used, mut idle, mut total) = (0.0, 0.0, 0.0, 0.0);
    for w in samples.windows(2) {
        let dt = (w[1].t_ms - w[0].t_ms).max(0.0);
        let a = w[0].allocated as f64;
        let u = (w[0].used as f64).min(a);
        alloc += a * dt;
        used += u * dt;
        idle += (a - u) * dt;
        total += dt;
    }
    TimeWeighted {
        idle_fraction: if alloc > 0.0 { idle / alloc } else { 0.0 },
        mean_allocated: if total > 0.0 { alloc / total } else { 0.0 },
        mean_used: if total > 0.0 { used / total } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiment_percentiles_and_idle() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.95), 4.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        let s = |t, a, u| Sample {
            t_ms: t,
            allocated: a,
            used: u,
        };
        let tw = time_weighted(&[s(0.0, 100, 25), s(1.0, 100, 100), s(3.0, 0, 0)]);
        // ∫alloc = 100 + 200 = 300, ∫idle = 75 + 0.
        assert!((tw.idle_fraction - 0.25).abs() < 1e-9);
        assert!((tw.mean_allocated - 100.0).abs() < 1e-9);
    }
}
