//! The closed-loop load generator shared by every system under test.
//!
//! Each client is one OS thread with its own connection. It repeatedly picks `depth`
//! distinct random slots, runs them as one batch (one flush / one doorbell), waits for
//! every completion, and records the batch's latency once per operation. The same loop
//! drives farpool, Redis and memcached, so only the server side differs.

use super::args::Plan;
use super::error::BenchError;
use super::progress::Progress;
use super::stats::Tally;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// How long every operation may keep failing before the run is abandoned.
const GIVE_UP_AFTER: Duration = Duration::from_secs(2);

/// How often the main thread refreshes the progress display.
const TICK: Duration = Duration::from_millis(100);

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct BatchOutcome {
    /// Operations of the batch that failed (the rest succeeded).
    pub failed: u64,
    /// A message describing the first failure, when there was one.
    pub error: Option<String>,
    /// The latency to record instead of the batch's wall time (for example only the
    /// allocation of an alloc + free pair).
    pub latency: Option<Duration>,
}

impl BatchOutcome {
    /// Counts one failed operation, keeping the first failure's message.
    pub fn fail(&mut self, msg: impl FnOnce() -> String) {
        self.failed += 1;
        self.error.get_or_insert_with(msg);
    }
}

/// One client's connection to the system under test.
pub(crate) trait Connection {
    /// Runs one batch on `slots`: distinct indices below [`Plan::slots`], as many as the
    /// pipeline depth. An `Err` means the connection is unusable and ends the run.
    fn run_batch(&mut self, slots: &[usize]) -> Result<BatchOutcome, BenchError>;

    /// Releases what the connection holds on the server (best effort, after the run).
    fn finish(self) -> Result<(), BenchError>;
}

/// How to label and display one run.
pub(crate) struct RunSpec<'a> {
    /// The validated workload.
    pub plan: &'a Plan,
    /// Name of the system under test, for messages.
    pub system: &'a str,
    /// Label of the progress display.
    pub label: String,
    /// Whether to draw the progress display.
    pub progress: bool,
}

/// Runs `plan.clients` threads, each with a connection from `connect(client_index)`.
///
/// `while_connected` runs on the calling thread after every client finished its measured
/// window but before any connection is closed (used to sample the memory node's memory
/// with all clients connected). Returns the merged tally and its result.
pub(crate) fn run_load<C, F, M, T>(
    spec: &RunSpec<'_>,
    connect: F,
    while_connected: M,
) -> Result<(Tally, T), BenchError>
where
    C: Connection,
    F: Fn(usize) -> Result<C, BenchError> + Sync,
    M: FnOnce() -> Result<T, BenchError>,
{
    let plan = spec.plan;
    let parties = plan.clients + 1;
    let start = Barrier::new(parties);
    let end = Barrier::new(parties);
    let release = Barrier::new(parties);
    let live = AtomicU64::new(0);
    let abort = AtomicBool::new(false);

    std::thread::scope(|s| {
        let handles: Vec<_> = (0..plan.clients)
            .map(|i| {
                let (connect, start, end, release, live, abort) =
                    (&connect, &start, &end, &release, &live, &abort);
                s.spawn(move || {
                    let conn = catch_unwind(AssertUnwindSafe(|| connect(i)))
                        .unwrap_or(Err(BenchError::WorkerPanicked));
                    if conn.is_err() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    start.wait();
                    let (conn, result) = match conn {
                        Ok(mut c) => {
                            let r = catch_unwind(AssertUnwindSafe(|| {
                                drive(&mut c, plan, spec.system, live, abort)
                            }))
                            .unwrap_or(Err(BenchError::WorkerPanicked));
                            if r.is_err() {
                                abort.store(true, Ordering::Relaxed);
                            }
                            (Some(c), r)
                        }
                        Err(e) => (None, Err(e)),
                    };
                    end.wait();
                    release.wait();
                    if let Some(c) = conn {
                        if let Err(e) = c.finish() {
                            tracing::warn!("client {i}: cleanup after the run failed: {e}");
                        }
                    }
                    result
                })
            })
            .collect();

        start.wait();
        let t0 = Instant::now();
        let total = plan.warmup + plan.duration;
        {
            let mut progress = Progress::new(spec.progress, spec.label.clone(), plan.warmup, total);
            loop {
                let elapsed = t0.elapsed();
                progress.tick(elapsed, live.load(Ordering::Relaxed));
                if elapsed >= total || abort.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(TICK.min(total - elapsed));
            }
        }
        end.wait();
        let sampled = if abort.load(Ordering::Relaxed) {
            None
        } else {
            Some(while_connected())
        };
        release.wait();

        let mut tally = Tally::default();
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(t)) => tally.merge(&t),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(BenchError::WorkerPanicked);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        match sampled {
            Some(r) => Ok((tally, r?)),
            // Abort is only set by a failing client, whose error was returned above.
            None => Err(BenchError::WorkerPanicked),
        }
    })
}

/// One client's loop: warm up, then measure for `plan.duration`.
fn drive<C: Connection>(
    conn: &mut C,
    plan: &Plan,
    system: &str,
    live: &AtomicU64,
    abort: &AtomicBool,
) -> Result<Tally, BenchError> {
    let mut rng = rand::thread_rng();
    let slot_count = usize::try_from(plan.slots).unwrap_or(usize::MAX);
    let depth = plan.depth.min(slot_count);
    let t0 = Instant::now();
    let warm_end = t0 + plan.warmup;
    let end = warm_end + plan.duration;
    let mut tally = Tally::default();
    let mut last_done = warm_end;
    let mut failing_since: Option<Instant> = None;
    let mut slots = Vec::with_capacity(depth);
    loop {
        let started = Instant::now();
        if started >= end || abort.load(Ordering::Relaxed) {
            break;
        }
        slots.clear();
        slots.extend(rand::seq::index::sample(&mut rng, slot_count, depth).iter());
        let outcome = conn.run_batch(&slots)?;
        let done = Instant::now();
        let failed = outcome.failed.min(depth as u64);
        let ok = depth as u64 - failed;
        if ok == 0 {
            let since = *failing_since.get_or_insert(done);
            if done.duration_since(since) >= GIVE_UP_AFTER {
                return Err(BenchError::AllFailing {
                    system: system.to_string(),
                    secs: GIVE_UP_AFTER.as_secs(),
                    last: outcome.error.unwrap_or_else(|| "no message".to_string()),
                });
            }
        } else {
            failing_since = None;
        }
        if started >= warm_end {
            tally
                .latency
                .record(outcome.latency.unwrap_or(done - started), ok);
            tally.ops += ok;
            tally.errors += failed;
            if tally.first_error.is_none() && failed > 0 {
                tally.first_error = outcome.error;
            }
            live.fetch_add(ok, Ordering::Relaxed);
            last_done = done;
        }
    }
    tally.elapsed = last_done.saturating_duration_since(warm_end);
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::BenchOp;
    use std::collections::HashSet;
    use std::sync::Mutex;

    /// An in-memory connection that checks the loop's promises.
    struct Fake {
        slots: u64,
        fail_every: u64,
        batches: u64,
        finished: &'static AtomicU64,
    }

    impl Connection for Fake {
        fn run_batch(&mut self, slots: &[usize]) -> Result<BatchOutcome, BenchError> {
            let distinct: HashSet<_> = slots.iter().collect();
            assert_eq!(distinct.len(), slots.len(), "slots of a batch are distinct");
            assert!(slots.iter().all(|&s| (s as u64) < self.slots));
            self.batches += 1;
            std::thread::sleep(Duration::from_millis(1));
            Ok(
                if self.fail_every > 0 && self.batches % self.fail_every == 0 {
                    BatchOutcome {
                        failed: 1,
                        error: Some("injected".into()),
                        latency: None,
                    }
                } else {
                    BatchOutcome::default()
                },
            )
        }
        fn finish(self) -> Result<(), BenchError> {
            self.finished.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn plan(clients: usize, depth: usize) -> Plan {
        Plan {
            workload: crate::bench::args::Workload::Raw,
            op: BenchOp::Read,
            size: 64,
            clients,
            depth,
            duration: Duration::from_millis(100),
            warmup: Duration::from_millis(20),
            slots: 16,
        }
    }

    #[test]
    fn counts_ops_and_errors_and_samples_while_connected() {
        static FINISHED: AtomicU64 = AtomicU64::new(0);
        let plan = plan(3, 4);
        let spec = RunSpec {
            plan: &plan,
            system: "fake",
            label: "fake".into(),
            progress: false,
        };
        let sampled_with = Mutex::new(None);
        let (tally, sample) = run_load(
            &spec,
            |_| {
                Ok(Fake {
                    slots: 16,
                    fail_every: 5,
                    batches: 0,
                    finished: &FINISHED,
                })
            },
            || {
                *sampled_with.lock().unwrap() = Some(FINISHED.load(Ordering::Relaxed));
                Ok(42)
            },
        )
        .unwrap();
        assert_eq!(sample, 42);
        assert_eq!(
            *sampled_with.lock().unwrap(),
            Some(0),
            "sampled before cleanup"
        );
        assert_eq!(FINISHED.load(Ordering::Relaxed), 3);
        assert!(tally.ops > 0);
        assert!(tally.errors > 0);
        assert_eq!(tally.latency.count(), tally.ops);
        assert_eq!(tally.first_error.as_deref(), Some("injected"));
        assert!(tally.elapsed > Duration::ZERO);
    }

    #[test]
    fn a_failing_connect_aborts_the_run() {
        static FINISHED: AtomicU64 = AtomicU64::new(0);
        let plan = Plan {
            duration: Duration::from_secs(30),
            ..plan(2, 1)
        };
        let spec = RunSpec {
            plan: &plan,
            system: "fake",
            label: "fake".into(),
            progress: false,
        };
        let r = run_load(
            &spec,
            |i| {
                if i == 1 {
                    Err(BenchError::Args("refused".into()))
                } else {
                    Ok(Fake {
                        slots: 16,
                        fail_every: 0,
                        batches: 0,
                        finished: &FINISHED,
                    })
                }
            },
            || Ok(()),
        );
        assert!(matches!(r, Err(BenchError::Args(_))));
        assert_eq!(FINISHED.load(Ordering::Relaxed), 1);
    }
}
