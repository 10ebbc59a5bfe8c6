//! The three allocation policies compared, and job-level admission.
//!
//! - `job-peak`: at arrival a job reserves its peak demand (Pocket's safe choice). The
//!   reservation is allocated from the pool in one request and held until the job
//!   ends; a job whose reservation does not fit waits, first come first served.
//! - `job-avg`: the same with the job's average demand (the pool memory it held,
//!   time-weighted, when profiled alone); whatever the job's data needs beyond the
//!   reservation spills to the persistent tier.
//! - `task`: no reservation. Every task allocates as it writes, through an elastic
//!   [`crate::ds::File`] that grows block by block, under the job's lease; a stage's
//!   outputs are freed as soon as their consumers are done. When the pool is full a
//!   task's further output spills.

use crate::client::{BlockHandle, Client, ClientError, Task};
use crate::proto::ControlError;
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use std::time::Duration;

use super::ExperimentError;

/// An allocation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Policy {
    /// Job-level reservation of the peak demand.
    #[serde(rename = "job-peak")]
    JobPeak,
    /// Job-level reservation of the average demand; overflow spills.
    #[serde(rename = "job-avg")]
    JobAvg,
    /// farpool's task-level allocation with elastic structures and leases.
    #[serde(rename = "task")]
    Task,
}

impl Policy {
    /// All policies, in report order.
    pub const ALL: [Policy; 3] = [Policy::JobPeak, Policy::JobAvg, Policy::Task];

    /// The policy's name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Policy::JobPeak => "job-peak",
            Policy::JobAvg => "job-avg",
            Policy::Task => "task",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `e` says the pool had no free blocks for an allocation.
pub(crate) fn is_no_capacity(e: &ClientError) -> bool {
    matches!(e, ClientError::Control(ControlError::NoCapacity { .. }))
}

/// A job's reservation: blocks allocated at `/job/reserve` for the job's lifetime,
/// handed to its tasks one block per chunk and taken back when consumers are done.
pub(crate) struct Reservation {
    task: Mutex<Option<Task>>,
    free: Mutex<Vec<BlockHandle>>,
    bytes: u64,
}

impl Reservation {
    /// Bytes reserved.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A free reserved block, if any is left.
    pub(crate) fn take(&self) -> Option<BlockHandle> {
        self.free.lock().pop()
    }

    /// Returns blocks to the reservation.
    pub(crate) fn give_back(&self, blocks: impl IntoIterator<Item = BlockHandle>) {
        self.free.lock().extend(blocks);
    }

    /// Frees the reservation's blocks in the pool.
    pub(crate) fn release(&self) -> Result<(), ExperimentError> {
        self.free.lock().clear();
        if let Some(t) = self.task.lock().take() {
            let path = t.path().to_string();
            t.close()
                .map_err(|e| ExperimentError::client(format!("free reservation {path}"), e))?;
        }
        Ok(())
    }
}

/// First-come-first-served admission of job-level reservations: only the job at the
/// head of the queue tries to allocate; it waits until enough memory is freed.
#[derive(Default)]
pub(crate) struct Admission {
    state: Mutex<(u64, u64)>, // (next ticket, ticket being served)
    cv: Condvar,
}

impl Admission {
    /// Reserves `bytes` for the job at `job_path` (for example `/j03`), waiting in line
    /// until the pool can hold it.
    pub(crate) fn reserve(
        &self,
        client: &Client,
        job_path: &str,
        bytes: u64,
    ) -> Result<Reservation, ExperimentError> {
        let ticket = {
            let mut st = self.state.lock();
            let t = st.0;
            st.0 += 1;
            t
        };
        let path = format!("{job_path}/reserve");
        let result = self.reserve_in_turn(ticket, client, &path, bytes);
        // Whatever happened, the next job in line gets its turn.
        {
            let mut st = self.state.lock();
            st.1 = st.1.max(ticket + 1);
        }
        self.cv.notify_all();
        result
    }

    fn reserve_in_turn(
        &self,
        ticket: u64,
        client: &Client,
        path: &str,
        bytes: u64,
    ) -> Result<Reservation, ExperimentError> {
        {
            let mut st = self.state.lock();
            while st.1 != ticket {
                self.cv.wait(&mut st);
            }
        }
        let task = client
            .task(path)
            .map_err(|e| ExperimentError::client(format!("open {path}"), e))?;
        loop {
            match task.alloc(bytes) {
                Ok(blocks) => {
                    return Ok(Reservation {
                        task: Mutex::new(Some(task)),
                        free: Mutex::new(blocks),
                        bytes,
                    })
                }
                Err(e) if is_no_capacity(&e) => {
                    // Wait for a release (or poll: frees by lease expiry notify no one).
                    let mut st = self.state.lock();
                    self.cv.wait_for(&mut st, Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(ExperimentError::client(
                        format!("reserve {bytes} bytes at {path}"),
                        e,
                    ))
                }
            }
        }
    }

    /// Tells waiting jobs that memory was freed.
    pub(crate) fn released(&self) {
        self.cv.notify_all();
    }
}
