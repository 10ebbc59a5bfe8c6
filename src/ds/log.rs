//! `Log`: a shared, append-only log of entries tagged with streams.

use super::file::File;
use super::{is_stale, DsError};
use crate::client::{Client, ClientError, Task};
use crate::proto::PoolPath;
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"FPSLOG01");
/// Meta word: entries before this position are trimmed.
const TRIM: u64 = 32;
/// Entry header: payload length u32, stream count u32, checksum u64.
const HEADER: usize = 16;
/// Most streams one entry may carry.
pub const MAX_STREAMS: usize = 256;
/// Bytes read ahead per round trip while scanning.
const SCAN_CHUNK: u64 = 256 << 10;

/// One log entry as returned by [`Log::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its position (what [`Log::append`] returned).
    pub position: u64,
    /// The streams it was appended to.
    pub streams: Vec<u32>,
    /// The payload.
    pub data: Vec<u8>,
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Matching entries, in log order.
    pub entries: Vec<LogEntry>,
    /// Where the scan stopped: `end`, or the first entry not completely written yet
    /// (an appender is still writing it); scan again from here later.
    pub next: u64,
}

/// A shared log in the pool: any number of clients append entries, each tagged with
/// a set of stream ids, and read them back by position, optionally filtered by
/// stream.
///
/// Appends reserve their place with one fetch-and-add, so concurrent appends never
/// overlap and each gets a distinct position; positions are byte offsets (8-aligned)
/// and grow with append order. Each entry carries a checksum keyed by its position, so
/// a scan never returns an entry that is still being written or was read torn: it
/// stops there and reports where to continue.
pub struct Log {
    file: File,
}

impl Log {
    /// Creates the log `name` under the task's path (or opens it if it exists).
    pub fn create(task: &Task, name: &str) -> Result<Log, DsError> {
        Self::create_at(task.client(), task.path().join(name)?.as_str())
    }

    /// Creates the log at the absolute `path` (or opens it if it exists).
    pub fn create_at(client: &Client, path: &str) -> Result<Log, DsError> {
        Ok(Log {
            file: File::create_kind(client, path, "log", MAGIC)?,
        })
    }

    /// Opens the log at `path`.
    pub fn open(client: &Client, path: &str) -> Result<Log, DsError> {
        Ok(Log {
            file: File::open_kind(client, path, "log", MAGIC)?,
        })
    }

    /// Creates (or opens) a log that publishes no notifications: the event log of a
    /// listened-to object.
    pub(crate) fn create_quiet(client: &Client, path: &str) -> Result<Log, DsError> {
        Ok(Log {
            file: File::create_kind(client, path, "log", MAGIC)?.quiet(),
        })
    }

    /// Opens a log that publishes no notifications.
    pub(crate) fn open_quiet(client: &Client, path: &str) -> Result<Log, DsError> {
        Ok(Log {
            file: File::open_kind(client, path, "log", MAGIC)?.quiet(),
        })
    }

    /// How often this handle re-reads whether anyone listens to the log (default
    /// [`super::DEFAULT_REFRESH`]); listeners must be configured with at least the
    /// longest interval of any writer ([`super::ListenerConfig::writer_refresh`]).
    pub fn set_notify_refresh(&self, refresh: std::time::Duration) {
        self.file.set_notify_refresh(refresh);
    }

    /// The log's path.
    pub fn path(&self) -> &PoolPath {
        self.file.path()
    }

    /// Appends `data` to `streams`; returns its position.
    pub fn append(&self, data: &[u8], streams: &[u32]) -> Result<u64, DsError> {
        if streams.len() > MAX_STREAMS {
            return Err(DsError::Config(format!(
                "an entry may carry at most {MAX_STREAMS} streams, not {}",
                streams.len()
            )));
        }
        let len = u32::try_from(data.len()).map_err(|_| DsError::ItemTooLarge {
            len: data.len(),
            max: u32::MAX as usize,
        })?;
        let size = entry_size(streams.len(), data.len());
        // Reserve first: the checksum is keyed by the position.
        let pos = self.file.reserve(size as u64)?;
        let mut e = Vec::with_capacity(size);
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&(streams.len() as u32).to_le_bytes());
        e.extend_from_slice(&checksum(pos, streams, data).to_le_bytes());
        for s in streams {
            e.extend_from_slice(&s.to_le_bytes());
        }
        e.extend_from_slice(data);
        e.resize(size, 0);
        self.file.commit_reserved(pos, &e)?;
        self.file.publish_append(data, pos)?;
        Ok(pos)
    }

    /// Entries at positions in `[start, end)` on any of `streams` (all entries when
    /// `streams` is empty). Stops early at an entry still being written (see
    /// [`Scan::next`]). Fails with [`DsError::Trimmed`] when `start` was trimmed.
    pub fn scan(&self, start: u64, end: u64, streams: &[u32]) -> Result<Scan, DsError> {
        match self.scan_once(start, end, streams) {
            Err(DsError::Client(e)) if is_stale(&e) => {
                // A block was freed under us: it can only have been trimmed.
                self.file.forget_blocks();
                self.check_trim(start)?;
                self.scan_once(start, end, streams)
            }
            other => other,
        }
    }

    fn scan_once(&self, start: u64, end: u64, streams: &[u32]) -> Result<Scan, DsError> {
        self.check_trim(start)?;
        let end = end.min(self.file.len()?);
        let mut entries = Vec::new();
        let mut pos = start;
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = start;
        while pos < end {
            // Make sure the header is buffered, then the whole entry.
            let Some(header) = self.window(&mut buf, &mut buf_at, pos, HEADER, end)? else {
                break;
            };
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or([0; 4])) as usize;
            let n = u32::from_le_bytes(header[4..8].try_into().unwrap_or([0; 4])) as usize;
            let sum = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            let size = entry_size(n, len);
            if sum == 0 || n > MAX_STREAMS || pos.saturating_add(size as u64) > end {
                break; // not written yet (or torn): stop here
            }
            let Some(body) = self.window(&mut buf, &mut buf_at, pos, size, end)? else {
                break;
            };
            let ids: Vec<u32> = body[HEADER..HEADER + 4 * n]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let data = &body[HEADER + 4 * n..HEADER + 4 * n + len];
            if checksum(pos, &ids, data) != sum {
                break;
            }
            if streams.is_empty() || ids.iter().any(|s| streams.contains(s)) {
                entries.push(LogEntry {
                    position: pos,
                    streams: ids,
                    data: data.to_vec(),
                });
            }
            pos += size as u64;
        }
        // Zeroed or freed memory read while trimming looks like an unwritten entry.
        self.check_trim(start)?;
        Ok(Scan { entries, next: pos })
    }

    /// `want` bytes at `pos` from the read-ahead buffer, refilling it as needed;
    /// `None` when they lie past `end`.
    fn window<'b>(
        &self,
        buf: &'b mut Vec<u8>,
        buf_at: &mut u64,
        pos: u64,
        want: usize,
        end: u64,
    ) -> Result<Option<&'b [u8]>, DsError> {
        if pos.saturating_add(want as u64) > end {
            return Ok(None);
        }
        let have = pos >= *buf_at && pos + want as u64 <= *buf_at + buf.len() as u64;
        if !have {
            let n = (end - pos).min(SCAN_CHUNK.max(want as u64)) as usize;
            buf.resize(n, 0);
            let got = self.file.read_at(pos, buf)?;
            buf.truncate(got);
            *buf_at = pos;
            if got < want {
                return Ok(None);
            }
        }
        let off = (pos - *buf_at) as usize;
        Ok(buf.get(off..off + want))
    }

    /// The position the next append will get (the end of the log).
    pub fn end(&self) -> Result<u64, DsError> {
        self.file.len()
    }

    /// The first position not trimmed.
    pub fn start(&self) -> Result<u64, DsError> {
        Ok(self.file.object().word(TRIM)?)
    }

    /// Discards every entry before position `upto` (a position returned by `append`
    /// or a scan's `next`, at most [`Log::end`]) and frees the blocks that held only
    /// such entries. Scans from before it then fail with [`DsError::Trimmed`].
    pub fn trim(&self, upto: u64) -> Result<(), DsError> {
        let end = self.end()?;
        if upto > end {
            return Err(DsError::Config(format!(
                "cannot trim to {upto}: the log ends at {end}"
            )));
        }
        let before = self.start()?;
        self.file.object().raise(TRIM, upto)?;
        let chunk = self.file.chunk_size();
        for k in before / chunk..upto / chunk {
            self.file.retire_block(k)?;
        }
        Ok(())
    }

    /// The first untrimmed position and the log's bytes from there to the end of its
    /// last complete entry (entries still being written, and all after them, are left
    /// out).
    pub(crate) fn raw(&self) -> Result<(u64, Vec<u8>), DsError> {
        let start = self.start()?;
        let next = self.scan(start, self.end()?, &[])?.next;
        let mut bytes = vec![
            0u8;
            usize::try_from(next - start).map_err(|_| {
                DsError::Config("the log is larger than this machine's address space".into())
            })?
        ];
        let n = self.file.read_at(start, &mut bytes)?;
        bytes.truncate(n);
        Ok((start, bytes))
    }

    /// Fills an empty log with `bytes` (from [`Log::raw`]) at `start`, trimming
    /// everything before.
    pub(crate) fn restore(&self, start: u64, bytes: &[u8]) -> Result<(), DsError> {
        self.file.write_at(start, bytes)?;
        self.file.object().raise(TRIM, start)?;
        Ok(())
    }

    /// Removes the log and frees its blocks. Other clients' handles stop working.
    pub fn destroy(self) -> Result<(), DsError> {
        self.file.destroy()
    }

    fn check_trim(&self, start: u64) -> Result<(), DsError> {
        let trimmed = self
            .file
            .object()
            .word(TRIM)
            .map_err(|e: ClientError| DsError::from(e))?;
        if start < trimmed {
            return Err(DsError::Trimmed {
                path: self.path().clone(),
                position: start,
                start: trimmed,
            });
        }
        Ok(())
    }
}

/// Bytes an entry takes: header, stream ids, payload, padded to 8.
fn entry_size(streams: usize, len: usize) -> usize {
    (HEADER + 4 * streams + len).next_multiple_of(8)
}

/// Checksum of an entry at `pos` (never 0, so zeroed memory never validates).
fn checksum(pos: u64, streams: &[u32], data: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(pos, 0x6c6f_675f_7375_6d21);
    h.write_u64(data.len() as u64);
    h.write_u64(streams.len() as u64);
    for s in streams {
        h.write_u32(*s);
    }
    h.write(data);
    h.finish().max(1)
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("path", self.path()).finish()
    }
}
