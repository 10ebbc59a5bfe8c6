//! Messages between the invoker and `farpool worker` processes, and their frames.
//!
//! The same frames travel over a worker's standard input/output (a local process) and
//! over TCP (`farpool worker --listen ADDR`, a worker on another host): a 4-byte
//! little-endian length, then that many bytes of bincode (fixed-width integers, no
//! trailing bytes). [`decode_request`] and [`decode_reply`] are pure functions over a
//! byte buffer: any input yields a message, "need more bytes" or a typed error, never
//! a panic, and never an allocation larger than the frame that arrived (fuzz target
//! `dag_frame`).

use super::job::RemoteInvocation;
use super::plan::TaskId;
use super::workloads::WorkloadSpec;
use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Largest frame accepted (a 2 MiB matrix block travels inside an invocation at most).
pub const MAX_FRAME: usize = 256 << 20;

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`] bytes.
    #[error("frame of {len} bytes is larger than {max}; the peer is not a farpool worker or invoker of this version")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame's bytes are not a message of this protocol.
    #[error("undecodable frame: {0}; the peer is not a farpool worker or invoker of this version")]
    Decode(String),
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame; the peer died or closed the connection")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("worker connection: {0}")]
    Io(#[from] std::io::Error),
}

/// What a worker needs to join a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobSpec {
    pub id: u64,
    pub path: String,
    pub workload: WorkloadSpec,
    pub inline_limit: usize,
    pub cluster: bool,
    pub crash_in: Option<String>,
    /// Where in the task the injected crash happens.
    pub crash_site: super::CrashSite,
    /// Wukong jobs have fan-in counters in the pool; centralized ones do not.
    pub counters: bool,
    /// Free pool objects when their last consumer is done.
    pub free_early: bool,
}

/// One task dispatched by the centralized scheduler, with the small outputs of its
/// parents (large ones are pool objects).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskMsg {
    pub task: TaskId,
    pub inputs: Vec<(TaskId, Vec<u8>)>,
    pub attempt: u32,
}

/// Invoker to worker.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    Job(JobSpec),
    Invoke { job: u64, inv: RemoteInvocation },
    Run { job: u64, task: TaskMsg },
    EndJob(u64),
}

/// What one invocation did, as counted by the worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Delta {
    pub tasks_run: u64,
    pub invocations: u64,
    pub compute_ns: u64,
    pub ideal_bytes: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub counter_ops: u64,
    pub objects_freed: u64,
}

impl Delta {
    pub(crate) fn since(&self, before: &Delta) -> Delta {
        Delta {
            tasks_run: self.tasks_run.saturating_sub(before.tasks_run),
            invocations: self.invocations.saturating_sub(before.invocations),
            compute_ns: self.compute_ns.saturating_sub(before.compute_ns),
            ideal_bytes: self.ideal_bytes.saturating_sub(before.ideal_bytes),
            bytes_written: self.bytes_written.saturating_sub(before.bytes_written),
            bytes_read: self.bytes_read.saturating_sub(before.bytes_read),
            counter_ops: self.counter_ops.saturating_sub(before.counter_ops),
            objects_freed: self.objects_freed.saturating_sub(before.objects_freed),
        }
    }

    pub(crate) fn add(&mut self, d: &Delta) {
        self.tasks_run += d.tasks_run;
        self.invocations += d.invocations;
        self.compute_ns += d.compute_ns;
        self.ideal_bytes += d.ideal_bytes;
        self.bytes_written += d.bytes_written;
        self.bytes_read += d.bytes_read;
        self.counter_ops += d.counter_ops;
        self.objects_freed += d.objects_freed;
    }
}

/// Worker to invoker. Every request that runs something (`Invoke`, `Run`) ends with
/// exactly one `Done` or `TaskDone`; `Failed` comes before it when something went
/// wrong.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum FromWorker {
    Invoke {
        job: u64,
        inv: RemoteInvocation,
    },
    Sink {
        job: u64,
        task: TaskId,
        out: Vec<u8>,
    },
    Failed {
        job: u64,
        message: String,
    },
    Done {
        job: u64,
        delta: Delta,
    },
    /// A centrally dispatched task finished: small (or sink) outputs come along,
    /// large ones are pool objects.
    TaskDone {
        job: u64,
        task: TaskId,
        out: Option<Vec<u8>>,
        delta: Delta,
    },
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_FRAME as u64)
}

/// A message as one frame (length prefix included).
pub(crate) fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = options()
        .serialize(msg)
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Writes `msg` as one frame and flushes.
pub(crate) fn write_frame<T: Serialize>(out: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    out.write_all(&frame)?;
    out.flush()?;
    Ok(())
}

/// The length a frame prefix announces, checked against [`MAX_FRAME`].
fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    options()
        .deserialize(body)
        .map_err(|e| FrameError::Decode(e.to_string()))
}

/// Decodes the first frame of `buf`: the message and the bytes it took, or `None` if
/// `buf` does not hold a whole frame yet.
fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut p = [0u8; 4];
    p.copy_from_slice(prefix);
    let len = frame_len(p)?;
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, 4 + len)))
}

/// The next frame of a stream, or `None` at a clean end of stream (between frames).
/// The body buffer grows only as bytes arrive, so a lying length prefix cannot make
/// the reader allocate more than what the peer really sent.
pub(crate) fn read_frame<T: DeserializeOwned>(
    input: &mut impl Read,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match input.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(prefix)?;
    let mut body = Vec::new();
    input.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(FrameError::Truncated);
    }
    decode_body(&body).map(Some)
}

/// A message from the invoker to a worker, as decoded by [`decode_request`]
/// (its content is internal to farpool).
#[derive(Debug, PartialEq)]
pub struct WorkerRequest(pub(crate) ToWorker);

/// A message from a worker to the invoker, as decoded by [`decode_reply`].
#[derive(Debug, PartialEq)]
pub struct WorkerReply(pub(crate) FromWorker);

/// Decodes the first invoker-to-worker frame of `buf`: the message and the bytes it
/// took, `None` if the frame is incomplete, or why it is not a valid frame.
pub fn decode_request(buf: &[u8]) -> Result<Option<(WorkerRequest, usize)>, FrameError> {
    Ok(decode_frame(buf)?.map(|(m, n)| (WorkerRequest(m), n)))
}

/// Decodes the first worker-to-invoker frame of `buf` (see [`decode_request`]).
pub fn decode_reply(buf: &[u8]) -> Result<Option<(WorkerReply, usize)>, FrameError> {
    Ok(decode_frame(buf)?.map(|(m, n)| (WorkerReply(m), n)))
}

impl WorkerRequest {
    /// The message as one frame again.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode_frame(&self.0)
    }
}

impl WorkerReply {
    /// The message as one frame again.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode_frame(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dag::job::WireHeld;
    use crate::dag::workloads::TreeSpec;

    fn samples() -> Vec<ToWorker> {
        vec![
            ToWorker::Job(JobSpec {
                id: 3,
                path: "/dagw-1-0".into(),
                workload: WorkloadSpec::Tr(TreeSpec::default()),
                inline_limit: 4096,
                cluster: true,
                crash_in: Some("sum-1-0".into()),
                crash_site: crate::dag::CrashSite::Task,
                counters: true,
                free_early: true,
            }),
            ToWorker::Invoke {
                job: 3,
                inv: RemoteInvocation {
                    task: 7,
                    known: vec![(2, WireHeld::Bytes(vec![1, 2, 3])), (4, WireHeld::Mark(9))],
                    attempt: 1,
                },
            },
            ToWorker::Run {
                job: 3,
                task: TaskMsg {
                    task: 1,
                    inputs: vec![(0, vec![5; 10])],
                    attempt: 0,
                },
            },
            ToWorker::EndJob(3),
        ]
    }

    #[test]
    fn frames_round_trip_and_partial_frames_wait() {
        let mut stream = Vec::new();
        for m in samples() {
            stream.extend(encode_frame(&m).unwrap());
        }
        let mut at = 0;
        let mut decoded = Vec::new();
        while at < stream.len() {
            // Every strict prefix of a frame asks for more bytes.
            let (m, n) = decode_request(&stream[at..]).unwrap().unwrap();
            for cut in 0..n {
                assert!(decode_request(&stream[at..at + cut]).unwrap().is_none());
            }
            decoded.push(m.0);
            at += n;
        }
        assert_eq!(decoded, samples());
        let mut r = &stream[..];
        for m in samples() {
            assert_eq!(read_frame::<ToWorker>(&mut r).unwrap(), Some(m));
        }
        assert!(read_frame::<ToWorker>(&mut r).unwrap().is_none());
    }

    fn replies() -> Vec<FromWorker> {
        vec![
            FromWorker::Invoke {
                job: 1,
                inv: RemoteInvocation {
                    task: 3,
                    known: vec![(1, WireHeld::Mark(2 + (64 << 20 | 9)))],
                    attempt: 0,
                },
            },
            FromWorker::Sink {
                job: 1,
                task: 9,
                out: vec![8; 8],
            },
            FromWorker::Failed {
                job: 1,
                message: "task 'x' failed".into(),
            },
            FromWorker::Done {
                job: 1,
                delta: Delta {
                    tasks_run: 3,
                    ..Delta::default()
                },
            },
            FromWorker::TaskDone {
                job: 1,
                task: 4,
                out: Some(vec![1]),
                delta: Delta::default(),
            },
        ]
    }

    /// The committed seeds of fuzz target `dag_frame` are valid frames (set
    /// FARPOOL_WRITE_SEEDS=1 to regenerate them from these samples).
    #[test]
    fn fuzz_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dag_frame");
        if std::env::var_os("FARPOOL_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (i, m) in samples().iter().enumerate() {
                std::fs::write(dir.join(format!("request-{i}")), encode_frame(m).unwrap()).unwrap();
            }
            for (i, m) in replies().iter().enumerate() {
                std::fs::write(dir.join(format!("reply-{i}")), encode_frame(m).unwrap()).unwrap();
            }
        }
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("request") {
                assert!(decode_request(&bytes).unwrap().is_some(), "{name}");
            } else {
                assert!(decode_reply(&bytes).unwrap().is_some(), "{name}");
            }
            seen += 1;
        }
        assert_eq!(seen, samples().len() + replies().len());
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            decode_request(&huge),
            Err(FrameError::TooLarge { .. })
        ));
        // A variant index that does not exist.
        let mut bad = 4u32.to_le_bytes().to_vec();
        bad.extend(99u32.to_le_bytes());
        assert!(matches!(decode_request(&bad), Err(FrameError::Decode(_))));
        // A vector that claims 2^60 elements in a 12-byte body.
        let mut lying = 12u32.to_le_bytes().to_vec();
        lying.extend(1u32.to_le_bytes()); // Invoke
        lying.extend(0u64.to_le_bytes());
        assert!(decode_request(&lying).is_err());
        // A stream that ends inside a frame.
        let frame = encode_frame(&ToWorker::EndJob(1)).unwrap();
        let mut r = &frame[..frame.len() - 1];
        assert!(matches!(
            read_frame::<ToWorker>(&mut r),
            Err(FrameError::Truncated)
        ));
        // Trailing bytes inside a frame are refused.
        let mut trailing = frame.clone();
        trailing[0] += 1;
        trailing.push(0);
        assert!(matches!(
            decode_request(&trailing),
            Err(FrameError::Decode(_))
        ));
    }
}
