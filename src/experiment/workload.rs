//! Workloads: concurrent multi-stage jobs, generated from documented distributions with
//! a seed, or read from a trace file.
//!
//! # Trace format
//!
//! JSON lines, one job per line (blank lines and lines starting with `#` are skipped):
//!
//! ```text
//! {"job":"j00","arrival_ms":0,"stages":[
//!   {"name":"map","tasks":6,"bytes_per_task":8388608,"compute_ms":270},
//!   {"name":"shuffle","tasks":4,"bytes_per_task":6291456,"compute_ms":390},
//!   {"name":"reduce","tasks":2,"bytes_per_task":1048576,"compute_ms":220}]}
//! ```
//!
//! (one line in a real file). Stage `s` has `tasks` tasks; each writes `bytes_per_task`
//! bytes of intermediate data. Task `t` of stage `s > 0` reads the `t`-th of `tasks`
//! equal slices of *every* output of stage `s - 1` (an all-to-all shuffle); the job's
//! driver reads the last stage's output. `compute_ms` is the time a task spends
//! computing, apart from its pool and spill I/O (the experiment sleeps that long: the
//! function's compute would run on its own serverless worker, not on the two cores
//! that run the pool). Job ids use letters, digits, `-` and `_`.
//!
//! # Generated workloads
//!
//! [`GeneratorParams::standard`] documents the distributions; [`generate`] draws from
//! them with a seeded ChaCha generator (`rand::rngs::StdRng`), so a seed names a
//! workload on every platform.

use super::ExperimentError;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One stage of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Name (`map`, `shuffle`, `reduce`, ...), for reports only.
    pub name: String,
    /// Number of tasks.
    pub tasks: u32,
    /// Bytes of intermediate data each task writes.
    pub bytes_per_task: u64,
    /// Compute time of each task, apart from its I/O, in milliseconds.
    pub compute_ms: u64,
}

impl StageSpec {
    /// Bytes the whole stage writes.
    pub fn output_bytes(&self) -> u64 {
        u64::from(self.tasks) * self.bytes_per_task
    }
}

/// One job: an arrival time and a chain of stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job id (letters, digits, `-`, `_`).
    #[serde(rename = "job")]
    pub id: String,
    /// Arrival, in milliseconds after the start of the run.
    pub arrival_ms: u64,
    /// Stages, in order.
    pub stages: Vec<StageSpec>,
}

impl JobSpec {
    /// Bytes of pool memory the job holds while stage `s` runs (stage `s - 1`'s output
    /// being read, stage `s`'s being written), each task's output rounded up to whole
    /// blocks of `block` bytes. Index `stages.len()` is the driver collecting the last
    /// stage's output.
    pub fn stage_demand(&self, s: usize, block: u64) -> u64 {
        let out = |i: usize| -> u64 {
            self.stages.get(i).map_or(0, |st| {
                u64::from(st.tasks) * st.bytes_per_task.div_ceil(block.max(1)) * block
            })
        };
        let prev = if s == 0 { 0 } else { out(s - 1) };
        prev + out(s)
    }

    /// The job's peak demand: the largest [`JobSpec::stage_demand`].
    pub fn peak_demand(&self, block: u64) -> u64 {
        (0..=self.stages.len())
            .map(|s| self.stage_demand(s, block))
            .max()
            .unwrap_or(0)
    }

    /// The job's average demand over its run, weighting each phase's demand by its
    /// duration (`durations[s]` for stage `s`, `durations[stages.len()]` for the final
    /// collection), as a profile of the job running alone gives them.
    pub fn average_demand(&self, block: u64, durations: &[f64]) -> u64 {
        let total: f64 = durations.iter().sum();
        if total <= 0.0 {
            let n = self.stages.len() + 1;
            let sum: u64 = (0..n).map(|s| self.stage_demand(s, block)).sum();
            return sum / n as u64;
        }
        let weighted: f64 = durations
            .iter()
            .enumerate()
            .map(|(s, d)| self.stage_demand(s, block) as f64 * d)
            .sum();
        (weighted / total).round() as u64
    }
}

/// A workload: jobs in order of arrival.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    /// The jobs, sorted by arrival.
    pub jobs: Vec<JobSpec>,
}

/// Largest number of stages per job in a trace.
pub const MAX_STAGES: usize = 16;
/// Largest number of tasks per stage in a trace (each runs as a thread).
pub const MAX_TASKS: u32 = 64;
/// Latest arrival in a trace, in milliseconds (one hour).
pub const MAX_ARRIVAL_MS: u64 = 3_600_000;
/// Largest intermediate output of one task in a trace.
pub const MAX_TASK_BYTES: u64 = 1 << 30;

impl Workload {
    /// Parses a trace (see the module documentation); `name` is used in errors.
    pub fn parse_trace(text: &str, name: &str) -> Result<Workload, ExperimentError> {
        let mut jobs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let job: JobSpec = serde_json::from_str(t).map_err(|e| ExperimentError::Trace {
                source_name: name.into(),
                line: i + 1,
                what: format!("not a job object: {e}"),
            })?;
            jobs.push((i + 1, job));
        }
        let w = Workload {
            jobs: jobs.iter().map(|(_, j)| j.clone()).collect(),
        };
        for (line, job) in &jobs {
            validate_job(job).map_err(|what| ExperimentError::Trace {
                source_name: name.into(),
                line: *line,
                what,
            })?;
        }
        w.finish(name)
    }

    /// Reads and parses a trace file.
    pub fn read_trace(path: &std::path::Path) -> Result<Workload, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentError::TraceRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_trace(&text, &path.display().to_string())
    }

    /// The workload as trace lines (the format [`Workload::parse_trace`] reads).
    pub fn to_trace(&self) -> Result<String, ExperimentError> {
        let mut out = String::from(
            "# farpool experiment elasticity trace: one job per line (docs/BENCHMARKS.md, issue 7)\n",
        );
        for j in &self.jobs {
            let line = serde_json::to_string(j).map_err(|e| {
                ExperimentError::Config(format!("cannot encode job {} as JSON: {e}", j.id))
            })?;
            out.push_str(&line);
            out.push('\n');
        }
        Ok(out)
    }

    /// Sorts by arrival and checks that the workload is non-empty with unique ids.
    fn finish(mut self, name: &str) -> Result<Workload, ExperimentError> {
        if self.jobs.is_empty() {
            return Err(ExperimentError::Trace {
                source_name: name.into(),
                line: 0,
                what: "no jobs".into(),
            });
        }
        self.jobs.sort_by_key(|j| j.arrival_ms);
        let mut ids: Vec<&str> = self.jobs.iter().map(|j| j.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ExperimentError::Trace {
                source_name: name.into(),
                line: 0,
                what: format!("job id '{}' appears more than once", w[0]),
            });
        }
        Ok(self)
    }
}

fn validate_job(job: &JobSpec) -> Result<(), String> {
    let id_ok = !job.id.is_empty()
        && job.id.len() <= 64
        && job
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return Err(format!(
            "job id '{}' must be 1 to 64 letters, digits, '-' or '_'",
            job.id
        ));
    }
    if job.arrival_ms > MAX_ARRIVAL_MS {
        return Err(format!(
            "job '{}' arrives at {} ms; give at most {MAX_ARRIVAL_MS} (one hour)",
            job.id, job.arrival_ms
        ));
    }
    if job.stages.is_empty() || job.stages.len() > MAX_STAGES {
        return Err(format!(
            "job '{}' has {} stages; give 1 to {MAX_STAGES}",
            job.id,
            job.stages.len()
        ));
    }
    for (s, st) in job.stages.iter().enumerate() {
        if st.tasks == 0 || st.tasks > MAX_TASKS {
            return Err(format!(
                "job '{}' stage {s} has {} tasks; give 1 to {MAX_TASKS}",
                job.id, st.tasks
            ));
        }
        if st.bytes_per_task == 0 || st.bytes_per_task > MAX_TASK_BYTES {
            return Err(format!(
                "job '{}' stage {s} writes {} bytes per task; give 1 to {MAX_TASK_BYTES}",
                job.id, st.bytes_per_task
            ));
        }
        if st.compute_ms > 600_000 {
            return Err(format!(
                "job '{}' stage {s} computes {} ms per task; give at most 600000",
                job.id, st.compute_ms
            ));
        }
    }
    Ok(())
}

/// The distributions a workload is drawn from.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorParams {
    /// Number of jobs.
    pub jobs: usize,
    /// Mean time between arrivals (exponential, so arrivals are Poisson), ms.
    pub mean_interarrival_ms: f64,
    /// Median of the job's total map output (log-normal), bytes.
    pub map_bytes_median: f64,
    /// Sigma of the log of the job's total map output.
    pub map_bytes_sigma: f64,
    /// Clamp of the job's total map output, bytes.
    pub map_bytes_range: (f64, f64),
    /// Map tasks per job (uniform, inclusive).
    pub map_tasks: (u32, u32),
    /// Shuffle tasks per job (uniform, inclusive).
    pub shuffle_tasks: (u32, u32),
    /// Reduce tasks per job (uniform, inclusive).
    pub reduce_tasks: (u32, u32),
    /// Shuffle output as a fraction of map output (uniform).
    pub shuffle_ratio: (f64, f64),
    /// Reduce output as a fraction of shuffle output (uniform).
    pub reduce_ratio: (f64, f64),
    /// Fixed compute time of every task, ms.
    pub compute_base_ms: f64,
    /// Rate at which a task's function processes the bytes it reads and writes, in
    /// bytes per second (so compute = base + (read + written) / rate).
    pub compute_bytes_per_sec: f64,
}

impl GeneratorParams {
    /// The standard workload of `farpool experiment elasticity` with `jobs` jobs:
    ///
    /// - arrivals: Poisson, mean 0.6 s apart;
    /// - a job's total map output: log-normal, median 40 MiB, sigma 0.7, clamped to
    ///   [8 MiB, 160 MiB]; spread over 4 to 8 map tasks;
    /// - shuffle: 2 to 8 tasks writing 0.2x to 1.2x of the map output in total;
    /// - reduce: 1 to 4 tasks writing 0.02x to 0.25x of the shuffle output;
    /// - compute per task: 30 ms plus the bytes it reads and writes at 32 MiB/s.
    ///
    /// Stages differ by up to two orders of magnitude within a job, and jobs by about
    /// 20x between each other, the property Jiffy's and Pocket's analyses build on.
    pub fn standard(jobs: usize) -> Self {
        Self {
            jobs,
            mean_interarrival_ms: 600.0,
            map_bytes_median: 40.0 * MIB,
            map_bytes_sigma: 0.7,
            map_bytes_range: (8.0 * MIB, 160.0 * MIB),
            map_tasks: (4, 8),
            shuffle_tasks: (2, 8),
            reduce_tasks: (1, 4),
            shuffle_ratio: (0.2, 1.2),
            reduce_ratio: (0.02, 0.25),
            compute_base_ms: 30.0,
            compute_bytes_per_sec: 32.0 * MIB,
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Draws a workload from `params` with `seed`.
pub fn generate(params: &GeneratorParams, seed: u64) -> Result<Workload, ExperimentError> {
    if params.jobs == 0 || params.jobs > 1000 {
        return Err(ExperimentError::Config(format!(
            "a generated workload has 1 to 1000 jobs (--jobs), not {}",
            params.jobs
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut jobs = Vec::with_capacity(params.jobs);
    let mut arrival = 0.0f64;
    for j in 0..params.jobs {
        if j > 0 {
            // Exponential inter-arrival time by inversion; 1 - u lies in (0, 1].
            let u: f64 = rng.gen();
            arrival += -(1.0 - u).ln() * params.mean_interarrival_ms;
        }
        let map_total = lognormal(&mut rng, params.map_bytes_median, params.map_bytes_sigma)
            .clamp(params.map_bytes_range.0, params.map_bytes_range.1);
        let shuffle_total = map_total * uniform(&mut rng, params.shuffle_ratio);
        let reduce_total = shuffle_total * uniform(&mut rng, params.reduce_ratio);
        let tasks = [
            rng.gen_range(params.map_tasks.0..=params.map_tasks.1.max(params.map_tasks.0)),
            rng.gen_range(
                params.shuffle_tasks.0..=params.shuffle_tasks.1.max(params.shuffle_tasks.0),
            ),
            rng.gen_range(params.reduce_tasks.0..=params.reduce_tasks.1.max(params.reduce_tasks.0)),
        ];
        let totals = [map_total, shuffle_total, reduce_total];
        let names = ["map", "shuffle", "reduce"];
        let mut stages = Vec::with_capacity(3);
        let mut prev_total = 0.0;
        for s in 0..3 {
            let n = tasks[s].max(1);
            // Whole KiB per task, at least 1 KiB.
            let per_task = ((totals[s] / f64::from(n) / 1024.0).round().max(1.0) as u64) * 1024;
            let read = prev_total / f64::from(n);
            let compute = params.compute_base_ms
                + (read + per_task as f64) / params.compute_bytes_per_sec * 1000.0;
            stages.push(StageSpec {
                name: names[s].into(),
                tasks: n,
                bytes_per_task: per_task,
                compute_ms: compute.round() as u64,
            });
            prev_total = (per_task * u64::from(n)) as f64;
        }
        jobs.push(JobSpec {
            id: format!("j{j:02}"),
            arrival_ms: arrival.round() as u64,
            stages,
        });
    }
    for j in &jobs {
        validate_job(j).map_err(|what| ExperimentError::Trace {
            source_name: "generated".into(),
            line: 0,
            what,
        })?;
    }
    Workload { jobs }.finish("generated")
}

fn uniform(rng: &mut impl Rng, (lo, hi): (f64, f64)) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// A log-normal draw with the given median and sigma (Box-Muller for the normal).
fn lognormal(rng: &mut impl Rng, median: f64, sigma: f64) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    median * (sigma * z).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiment_generated_workload_is_seeded_and_round_trips() {
        let p = GeneratorParams::standard(6);
        let a = generate(&p, 7).unwrap();
        let b = generate(&p, 7).unwrap();
        let c = generate(&p, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let text = a.to_trace().unwrap();
        assert_eq!(Workload::parse_trace(&text, "t").unwrap(), a);
    }

    #[test]
    fn experiment_trace_errors_name_the_line() {
        let text = "# header\n{\"job\":\"a\",\"arrival_ms\":0,\"stages\":[]}\n";
        let e = Workload::parse_trace(text, "t").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let late = r#"{"job":"a","arrival_ms":18446744073709551615,"stages":[{"name":"m","tasks":1,"bytes_per_task":1,"compute_ms":0}]}"#;
        let e = Workload::parse_trace(late, "t").unwrap_err().to_string();
        assert!(e.contains("one hour"), "{e}");
        let e = Workload::parse_trace("not json\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn experiment_demand_rounds_to_blocks() {
        let job = JobSpec {
            id: "a".into(),
            arrival_ms: 0,
            stages: vec![
                StageSpec {
                    name: "map".into(),
                    tasks: 2,
                    bytes_per_task: 100,
                    compute_ms: 0,
                },
                StageSpec {
                    name: "reduce".into(),
                    tasks: 1,
                    bytes_per_task: 300,
                    compute_ms: 0,
                },
            ],
        };
        assert_eq!(job.stage_demand(0, 256), 512);
        assert_eq!(job.stage_demand(1, 256), 512 + 512);
        assert_eq!(job.stage_demand(2, 256), 512);
        assert_eq!(job.peak_demand(256), 1024);
        assert_eq!(
            job.average_demand(256, &[1.0, 2.0, 1.0]),
            (512 + 2048 + 512) / 4
        );
    }
}
