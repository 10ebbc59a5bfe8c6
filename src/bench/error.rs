//! Errors of the benchmark harness.

use std::io;
use std::path::PathBuf;

/// Why a benchmark could not run or could not finish.
///
/// Every message says what went wrong and what to try next.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The command-line options contradict each other or are out of range.
    #[error("invalid benchmark options: {0}")]
    Args(String),

    /// A child process (controller or memory node) could not be started.
    #[error("cannot start {what} ({program}): {source}; pass --farpool-bin with the path of the farpool binary")]
    Spawn {
        /// Which process (`controller`, `memory node`).
        what: &'static str,
        /// The program that was executed.
        program: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A child process did not report `listening <addr>` in time.
    #[error(
        "{what} did not print `listening <addr>` within {secs} s; its stderr ended with:\n{stderr}"
    )]
    StartTimeout {
        /// Which process.
        what: &'static str,
        /// How long the harness waited.
        secs: u64,
        /// The last lines the child wrote to stderr.
        stderr: String,
    },

    /// A child process exited (or closed its stdout) before it was ready.
    #[error("{what} exited before it was ready; its stderr ended with:\n{stderr}")]
    ChildExited {
        /// Which process.
        what: &'static str,
        /// The last lines the child wrote to stderr.
        stderr: String,
    },

    /// The self-started memory node is running but never registered with the controller.
    #[error("the memory node did not register with the controller within {secs} s; its stderr ended with:\n{stderr}")]
    NotRegistered {
        /// How long the harness waited.
        secs: u64,
        /// The last lines the memory node wrote to stderr.
        stderr: String,
    },

    /// A child process printed something other than `listening <addr>` first.
    #[error("{what} printed {line:?} instead of `listening <addr>`; is --farpool-bin a farpool binary of the same version?")]
    BadReadyLine {
        /// Which process.
        what: &'static str,
        /// The line it printed.
        line: String,
    },

    /// The farpool client failed.
    #[error("farpool client failed while {during}: {source}")]
    Client {
        /// What the harness was doing.
        during: String,
        /// The underlying error.
        #[source]
        source: crate::client::ClientError,
    },

    /// A peer server (Redis, memcached) could not be reached.
    #[error("cannot connect to {system} at {addr}: {source}; is it running? (scripts/bench-peers.sh starts redis-server and memcached)")]
    PeerConnect {
        /// `redis` or `memcached`.
        system: &'static str,
        /// The address dialled.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The connection to a peer server failed mid-run.
    #[error("{system} connection failed: {source}")]
    PeerIo {
        /// `redis` or `memcached`.
        system: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A peer server sent a reply the harness cannot parse; the connection cannot be
    /// resynchronised.
    #[error("{system} sent a malformed reply: {detail}; is {addr} really a {system} server?")]
    PeerProtocol {
        /// `redis` or `memcached`.
        system: &'static str,
        /// The server address.
        addr: String,
        /// What was wrong.
        detail: String,
    },

    /// A peer server refused to store the benchmark's keys before the run.
    #[error("{system} refused to pre-populate key {key:?}: {reply}; check its memory limit (maxmemory / -m) and item size limit (-I)")]
    PeerPopulate {
        /// `redis` or `memcached`.
        system: &'static str,
        /// The key.
        key: String,
        /// The server's reply.
        reply: String,
    },

    /// Every operation kept failing, so the measurement is meaningless.
    #[error("{system}: every operation failed for {secs} s (last error: {last}); fix the cause and run again")]
    AllFailing {
        /// The system under test.
        system: String,
        /// How long operations kept failing.
        secs: u64,
        /// The last error message.
        last: String,
    },

    /// A benchmark thread panicked (a bug in the harness).
    #[error("a benchmark thread panicked; this is a bug in the harness, please report it")]
    WorkerPanicked,

    /// A data-structure operation needed to set up or tear down a benchmark failed.
    #[error("farpool data structure failed while {during}: {source}")]
    Structure {
        /// What the harness was doing.
        during: String,
        /// The underlying error.
        #[source]
        source: crate::ds::DsError,
    },

    /// `--verify` found acknowledged writes lost, duplicated or reordered.
    #[error("verification failed: lost={lost} duplicated={duplicated} reordered={reordered}; this is a bug in the data structure, please report it with the command line")]
    VerifyFailed {
        /// Acknowledged writes missing afterwards.
        lost: u64,
        /// Items delivered twice, or removed keys that came back.
        duplicated: u64,
        /// Items out of per-producer order, or values older than the last acknowledged.
        reordered: u64,
    },

    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A line of a results file is not a benchmark record.
    #[error("{path} line {line}: not a benchmark record: {detail}; the file should hold the output of `farpool bench --json`")]
    BadRecord {
        /// The file (or `<input>`).
        path: String,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        detail: String,
    },

    /// The memory node's memory use could not be measured.
    #[error("cannot measure the memory node's memory: {0}")]
    NodeMemory(String),

    /// Writing the results failed (for example stdout was closed).
    #[error("cannot write results: {0}")]
    Output(#[source] io::Error),

    /// A DAG benchmark run failed (`farpool bench dag`).
    #[error("DAG workload {workload} with the {scheduler} scheduler failed: {source}")]
    Dag {
        /// The workload.
        workload: &'static str,
        /// The scheduler.
        scheduler: &'static str,
        /// Cause.
        #[source]
        source: crate::dag::DagError,
    },
}

impl BenchError {
    /// Wraps a client error with what the harness was doing.
    pub(crate) fn client(during: impl Into<String>, source: crate::client::ClientError) -> Self {
        Self::Client {
            during: during.into(),
            source,
        }
    }
}
