//! Rendering an experiment's results: markdown tables for people, JSON lines for
//! machines.

use super::metrics::PolicyReport;
use super::runner::AloneRun;
use super::workload::Workload;
use super::ExperimentError;
use crate::size::format_size;
use serde::Serialize;
use std::fmt::Write as _;

/// One JSON line: a policy's report with the run's settings.
#[derive(Serialize)]
struct JsonLine<'a> {
    experiment: &'static str,
    seed: u64,
    transport: &'a str,
    jobs_count: usize,
    #[serde(flatten)]
    report: &'a PolicyReport,
}

/// One JSON object per policy, one per line.
pub fn json_lines(
    reports: &[PolicyReport],
    seed: u64,
    transport: &str,
) -> Result<String, ExperimentError> {
    let mut out = String::new();
    for r in reports {
        let line = serde_json::to_string(&JsonLine {
            experiment: "elasticity",
            seed,
            transport,
            jobs_count: r.jobs.len(),
            report: r,
        })
        .map_err(|e| ExperimentError::Config(format!("cannot encode results as JSON: {e}")))?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// A short description of the workload: jobs, data, demands.
pub fn workload_summary(w: &Workload, block: u64, capacity: u64) -> String {
    let peaks: Vec<u64> = w.jobs.iter().map(|j| j.peak_demand(block)).collect();
    let data: u64 = w
        .jobs
        .iter()
        .flat_map(|j| j.stages.iter().map(|s| s.output_bytes()))
        .sum();
    let last = w.jobs.last().map_or(0, |j| j.arrival_ms);
    format!(
        "{} jobs arriving over {:.1} s; {} of intermediate data; job peaks {} to {} (sum {}); pool capacity {}",
        w.jobs.len(),
        last as f64 / 1000.0,
        format_size(data),
        format_size(peaks.iter().copied().min().unwrap_or(0)),
        format_size(peaks.iter().copied().max().unwrap_or(0)),
        format_size(peaks.iter().sum()),
        format_size(capacity),
    )
}

/// Markdown tables: the policies side by side, then every job.
pub fn markdown(reports: &[PolicyReport], alone: &[AloneRun]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| policy | median slowdown | p95 slowdown | idle memory | spilled | mean wait | mean allocated | mean used | peak allocated | makespan |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        let _ = writeln!(
            o,
            "| {} | {:.2}x | {:.2}x | {:.1}% | {} | {:.0} ms | {} | {} | {} | {:.1} s |",
            r.policy,
            r.median_slowdown,
            r.p95_slowdown,
            r.idle_fraction * 100.0,
            format_size(r.spilled_bytes),
            r.mean_wait_ms,
            format_size(r.mean_allocated_bytes),
            format_size(r.mean_used_bytes),
            format_size(r.peak_allocated_bytes),
            r.makespan_ms / 1000.0,
        );
    }
    let _ = writeln!(o);
    let _ = write!(o, "| job | arrival | alone |");
    for r in reports {
        let _ = write!(o, " {} |", r.policy);
    }
    let _ = writeln!(o);
    let _ = write!(o, "|---|---:|---:|");
    for _ in reports {
        let _ = write!(o, "---:|");
    }
    let _ = writeln!(o);
    for (i, a) in alone.iter().enumerate() {
        let arrival = reports
            .first()
            .and_then(|r| r.jobs.get(i))
            .map_or(0.0, |j| j.arrival_ms);
        let _ = write!(
            o,
            "| {} | {:.1} s | {:.2} s |",
            a.job,
            arrival / 1000.0,
            a.completion_ms / 1000.0
        );
        for r in reports {
            match r.jobs.get(i) {
                Some(j) => {
                    let _ = write!(
                        o,
                        " {:.2} s ({:.2}x{}{}) |",
                        j.completion_ms / 1000.0,
                        j.slowdown,
                        if j.wait_ms >= 10.0 {
                            format!(", waited {:.2} s", j.wait_ms / 1000.0)
                        } else {
                            String::new()
                        },
                        if j.spilled_bytes > 0 {
                            format!(", spilled {}", format_size(j.spilled_bytes))
                        } else {
                            String::new()
                        }
                    );
                }
                None => {
                    let _ = write!(o, " - |");
                }
            }
        }
        let _ = writeln!(o);
    }
    o
}
