//! DAG errors.

use crate::client::ClientError;
use crate::ds::DsError;

/// An error a task function returns; any error type converts into it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TaskError(pub String);

impl TaskError {
    /// A task error with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        TaskError(message.into())
    }
}

impl From<DagError> for TaskError {
    fn from(e: DagError) -> Self {
        TaskError(e.to_string())
    }
}

impl From<bincode::Error> for TaskError {
    fn from(e: bincode::Error) -> Self {
        TaskError(format!("serialization: {e}"))
    }
}

/// Why a graph could not be built, validated or run.
#[derive(Debug, thiserror::Error)]
pub enum DagError {
    /// Two tasks share a name.
    #[error("task '{0}' is defined twice; task names must be unique within a graph")]
    DuplicateTask(String),
    /// A task name is not usable as a pool path component.
    #[error("task name '{0}' is not a valid pool path component; use ASCII letters, digits and -_.:=+@, not starting with '@'")]
    BadTaskName(String),
    /// A task names a function that is not registered.
    #[error("task '{task}' uses function '{function}', which is not registered; call Registry::register first")]
    UnknownFunction {
        /// The task.
        task: String,
        /// The function name.
        function: String,
    },
    /// An input names a task that is not in the graph.
    #[error("input '{input}' of task '{task}' reads task '{missing}', which is not in the graph; add it or fix the name")]
    MissingInput {
        /// The reading task.
        task: String,
        /// The input name.
        input: String,
        /// The missing task.
        missing: String,
    },
    /// The graph has a cycle.
    #[error("the graph has a cycle through task '{0}'; a DAG must not depend on itself")]
    Cycle(String),
    /// The graph has no tasks.
    #[error("the graph is empty; add at least one task")]
    Empty,
    /// A fan-in is wider than one pool block can count.
    #[error("task '{task}' has {parents} inputs from tasks, more than one block of {block_len} bytes can track; use a larger block size or reduce in stages")]
    FanInTooWide {
        /// The task.
        task: String,
        /// Its task inputs.
        parents: usize,
        /// The pool's block length.
        block_len: u64,
    },
    /// A task function failed or panicked.
    #[error("task '{task}' failed: {message}")]
    TaskFailed {
        /// The task.
        task: String,
        /// What it reported.
        message: String,
    },
    /// A value could not be (de)serialized.
    #[error("serialization of {what}: {source}; check that writer and reader use the same type")]
    Codec {
        /// What was being (de)serialized.
        what: String,
        /// Cause.
        #[source]
        source: bincode::Error,
    },
    /// A task asked for an input it does not have.
    #[error("no input named '{0}'; check the graph's input names")]
    NoSuchInput(String),
    /// The job produced no output for a sink that was asked for.
    #[error("no sink output named '{0}'; only tasks no other task reads are returned")]
    NoSuchOutput(String),
    /// A pool call failed.
    #[error("pool: {0}")]
    Client(#[from] ClientError),
    /// A pool data-structure call failed.
    #[error("pool object: {0}")]
    Ds(#[from] DsError),
    /// Every executor ended without producing a sink: a fan-in was lost.
    #[error("every executor ended but sink '{0}' never ran; a fan-in arrival was lost (see docs/DAG.md, fan-in protocol)")]
    Stalled(String),
    /// An executor died while running a task (an injected crash); the invoker retries
    /// it a few times before giving up with this error.
    #[error("the executor running task '{task}' died and its retries died too; check the worker processes and their logs")]
    ExecutorKilled {
        /// The task it was running.
        task: String,
    },
    /// A worker process failed or could not be started or reached.
    #[error("worker process: {0}")]
    Worker(String),
    /// The executor pool has shut down or a worker vanished.
    #[error("the executor pool stopped before the job finished; create a new DagRuntime")]
    ExecutorsGone,
    /// The runtime settings are invalid.
    #[error("invalid runtime configuration: {0}")]
    Config(String),
    /// Fan-in state in the pool contradicts the plan.
    #[error(
        "fan-in state of job '{job}' is inconsistent: {what}; the counter block was overwritten"
    )]
    Corrupt {
        /// The job path.
        job: String,
        /// What is wrong.
        what: String,
    },
}
