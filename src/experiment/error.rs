//! Errors of `farpool experiment`.

use std::path::PathBuf;

/// Why an experiment could not run or its results could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// The trace file could not be read.
    #[error("cannot read trace file {path}: {source}; check the path given to --trace")]
    TraceRead {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of the trace file is not a valid job.
    #[error("trace {source_name}, line {line}: {what}; see docs/BENCHMARKS.md (issue 7) for the trace format")]
    Trace {
        /// File name (or `generated`).
        source_name: String,
        /// 1-based line number (0 for the workload as a whole).
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// The experiment's settings are inconsistent.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The embedded pool did not start.
    #[error(
        "cannot start the embedded pool: {0}; is /dev/shm writable and are loopback ports free?"
    )]
    Pool(#[from] crate::embedded::EmbeddedError),
    /// A pool operation failed.
    #[error("pool operation failed ({context}): {source}")]
    Client {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: crate::client::ClientError,
    },
    /// A data-structure operation failed.
    #[error("data structure operation failed ({context}): {source}")]
    Ds {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: crate::ds::DsError,
    },
    /// The spill tier failed.
    #[error("spill tier ({context}): {source}; check that the spill directory is on a writable local disk with free space (--spill-dir)")]
    Spill {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// A local file or directory operation failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Data read back differs from what was written: a bug in the pool, a data structure,
    /// the spill tier or the experiment.
    #[error("data read back differs from what was written: job {job}, stage {stage}, producer task {task}, byte {offset}; this is a bug, please report it with the seed or trace")]
    Verify {
        /// Job id.
        job: String,
        /// Stage index of the producer.
        stage: usize,
        /// Producer task index.
        task: usize,
        /// Byte offset in the producer's output.
        offset: u64,
    },
    /// A worker thread panicked.
    #[error("a worker thread of the experiment panicked ({0}); this is a bug, please report it")]
    Panicked(String),
    /// A plot could not be drawn.
    #[error("cannot draw plot {path}: {what}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// Writing the results failed.
    #[error("cannot write results: {0}")]
    Output(#[source] std::io::Error),
}

impl ExperimentError {
    pub(crate) fn client(context: impl Into<String>, source: crate::client::ClientError) -> Self {
        ExperimentError::Client {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn ds(context: impl Into<String>, source: crate::ds::DsError) -> Self {
        ExperimentError::Ds {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn spill(context: impl Into<String>, source: object_store::Error) -> Self {
        ExperimentError::Spill {
            context: context.into(),
            source,
        }
    }
}
