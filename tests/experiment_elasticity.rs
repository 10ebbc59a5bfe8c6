//! `farpool experiment elasticity` on a tiny workload: all three policies run on a pool
//! too small for the jobs' peaks together, every byte written is read back and checked,
//! task-level allocation stays within capacity, job-avg spills and job-peak does not,
//! and the command line prints one JSON object per policy. No timing assertions.

use farpool::experiment::{run_elasticity, ExperimentConfig, JobSpec, Policy, StageSpec, Workload};
use std::process::Command;
use std::time::Duration;

fn stage(name: &str, tasks: u32, bytes_per_task: u64) -> StageSpec {
    StageSpec {
        name: name.into(),
        tasks,
        bytes_per_task,
        compute_ms: 0,
    }
}

fn tiny() -> Workload {
    let job = |id: &str, arrival_ms: u64, scale: u64| JobSpec {
        id: id.into(),
        arrival_ms,
        stages: vec![
            stage("map", 3, 40_000 * scale + 123),
            stage("shuffle", 2, 30_000 * scale + 7),
            stage("reduce", 1, 5_000 * scale),
        ],
    };
    Workload {
        jobs: vec![job("a", 0, 4), job("b", 0, 3), job("c", 20, 2)],
    }
}

fn config() -> ExperimentConfig {
    ExperimentConfig {
        capacity: 1 << 20,
        block_size: 16 << 10,
        sample_interval: Duration::from_millis(5),
        seed: 42,
        // Short, so that stopping the four pools is quick.
        heartbeat: Duration::from_millis(200),
        ..ExperimentConfig::default()
    }
}

#[test]
fn all_policies_read_back_every_byte_within_capacity() {
    let w = tiny();
    let cfg = config();
    // Every job fits the pool alone, but not all together.
    let peaks: Vec<u64> = w
        .jobs
        .iter()
        .map(|j| j.peak_demand(cfg.block_size))
        .collect();
    assert!(
        peaks.iter().all(|&p| p <= cfg.effective_capacity()),
        "{peaks:?}"
    );
    assert!(peaks.iter().sum::<u64>() > cfg.effective_capacity());
    let written: u64 = w
        .jobs
        .iter()
        .flat_map(|j| j.stages.iter().map(|s| s.output_bytes()))
        .sum();

    let r = run_elasticity(&w, &cfg, &Policy::ALL, false).expect("experiment runs");
    assert_eq!(r.alone.len(), 3);
    assert_eq!(r.policies.len(), 3);
    for p in &r.policies {
        // Each stage's output is read exactly once in full (by the next stage or the
        // driver), and every byte read was checked.
        assert_eq!(p.verified_bytes, written, "{}", p.policy);
        assert_eq!(
            p.pool_written_bytes + p.spilled_bytes,
            written,
            "{}",
            p.policy
        );
        assert_eq!(p.spill_read_bytes, p.spilled_bytes, "{}", p.policy);
        assert!(p.peak_allocated_bytes <= p.capacity_bytes, "{}", p.policy);
        assert!(
            p.samples.iter().all(|s| s.allocated <= p.capacity_bytes),
            "{}",
            p.policy
        );
        assert_eq!(p.jobs.len(), 3);
        assert!(p
            .jobs
            .iter()
            .all(|j| j.slowdown.is_finite() && j.slowdown > 0.0));
        assert!((0.0..=1.0).contains(&p.idle_fraction), "{}", p.policy);
        assert!(!p.samples.is_empty());
    }
    let by = |pol: Policy| {
        r.policies
            .iter()
            .find(|p| p.policy == pol)
            .expect("policy ran")
    };
    assert_eq!(
        by(Policy::JobPeak).spilled_bytes,
        0,
        "peak reservations never spill"
    );
    assert!(
        by(Policy::JobAvg).spilled_bytes > 0,
        "average reservations overflow"
    );
    assert!(by(Policy::JobPeak)
        .jobs
        .iter()
        .all(|j| j.reserved_bytes > 0));
    assert!(by(Policy::Task).jobs.iter().all(|j| j.reserved_bytes == 0));
}

#[test]
fn command_line_replays_a_trace_and_prints_json_per_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(&trace, tiny().to_trace().expect("encode trace")).expect("write trace");
    let out = Command::new(env!("CARGO_BIN_EXE_farpool"))
        .args(["experiment", "elasticity", "--json", "--no-files"])
        .args([
            "--capacity",
            "1MiB",
            "--block-size",
            "16KiB",
            "--sample-ms",
            "5",
            "--heartbeat-ms",
            "200",
        ])
        .arg("--trace")
        .arg(&trace)
        .output()
        .expect("run the farpool binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objs: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    let names: Vec<&str> = objs.iter().filter_map(|o| o["policy"].as_str()).collect();
    assert_eq!(names, ["job-peak", "job-avg", "task"]);
    for o in &objs {
        for k in [
            "median_slowdown",
            "p95_slowdown",
            "idle_fraction",
            "spilled_bytes",
        ] {
            assert!(o[k].is_number(), "{k} missing in {o}");
        }
    }
    // A malformed trace is refused with the line named.
    std::fs::write(&trace, "{\"job\":\"x\"}\n").expect("write trace");
    let out = Command::new(env!("CARGO_BIN_EXE_farpool"))
        .args(["experiment", "elasticity", "--no-files", "--trace"])
        .arg(&trace)
        .output()
        .expect("run the farpool binary");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
}
