//! The metadata log's files in the controller's data directory (the I/O half of
//! [`super::journal`]).
//!
//! # Files
//! Metadata lives in *generations*: `snapshot.G` holds the whole state at the start of
//! generation `G` and `log.G` every change after it. A new generation is started at
//! every controller start (right after recovery) and whenever the log has grown by
//! [`super::ControllerConfig::snapshot_every`] records:
//! 1. the snapshot is written to `snapshot.G.tmp`, synced, and renamed to `snapshot.G`;
//! 2. the directory is synced, an empty `log.G` (magic only) is created and synced;
//! 3. older generations are deleted.
//!
//! Recovery reads the newest `snapshot.G` and replays `log.G` on it. A crash between
//! steps leaves either the old generation complete (no `snapshot.G` yet) or the new
//! one complete (its log may be missing, which means empty), so there is always one
//! consistent generation.
//!
//! # Durability
//! Every state operation's records are appended with one `write` before the operation
//! is answered or its revocations are sent, so a killed controller (`kill -9`) loses
//! nothing it acknowledged. With `fsync_interval` zero (the default) the log is also
//! `fdatasync`ed before answering, so a machine crash loses nothing either; with an
//! interval the log is synced at most that often (a machine crash may lose the last
//! interval of changes). Snapshots and shutdown always sync.

use super::journal::{self, DecodedLog, FormatError, Record, Snapshot, LOG_MAGIC};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SNAPSHOT_PREFIX: &str = "snapshot.";
const LOG_PREFIX: &str = "log.";
const TMP_SUFFIX: &str = ".tmp";

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read, written or synced.
    #[error("metadata file '{}': {source}; check the data directory's disk space and permissions", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file's contents are damaged.
    #[error("metadata file '{}': {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// The records do not apply to the snapshot (a damaged or foreign data directory).
    #[error("metadata in '{}' is inconsistent: {reason}; restore the data directory from a backup, or move it aside to start with empty metadata", dir.display())]
    Replay {
        /// The data directory.
        dir: PathBuf,
        /// The first problem found.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What was found in the data directory.
#[derive(Debug, Default)]
pub struct Found {
    /// Generation found (0 with no snapshot: a new data directory).
    pub generation: u64,
    /// The snapshot of that generation.
    pub snapshot: Option<Snapshot>,
    /// The log records after it.
    pub records: Vec<Record>,
    /// Bytes of torn log tail ignored.
    pub torn_bytes: u64,
}

fn generation_of(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.parse().ok()
}

fn file_name(prefix: &str, generation: u64) -> String {
    format!("{prefix}{generation:020}")
}

/// Generations of every `snapshot.G` in `dir`.
fn snapshot_generations(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut gens = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(g) = entry
            .file_name()
            .to_str()
            .and_then(|n| generation_of(n, SNAPSHOT_PREFIX))
        {
            gens.push(g);
        }
    }
    gens.sort_unstable();
    Ok(gens)
}

/// Reads the newest generation in `dir` (which must exist).
pub fn read(dir: &Path) -> Result<Found, StoreError> {
    let Some(&generation) = snapshot_generations(dir)?.last() else {
        return Ok(Found::default());
    };
    let snap_path = dir.join(file_name(SNAPSHOT_PREFIX, generation));
    let bytes = fs::read(&snap_path).map_err(io_err(&snap_path))?;
    let snapshot = journal::decode_snapshot(&bytes).map_err(|source| StoreError::Format {
        path: snap_path.clone(),
        source,
    })?;
    let log_path = dir.join(file_name(LOG_PREFIX, generation));
    let bytes = match fs::read(&log_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&log_path)(e)),
    };
    let DecodedLog {
        records,
        torn_bytes,
        ..
    } = journal::decode_log(&bytes).map_err(|source| StoreError::Format {
        path: log_path.clone(),
        source,
    })?;
    if torn_bytes > 0 {
        tracing::warn!(
            path = %log_path.display(),
            torn_bytes,
            "metadata log ends in a torn record (the controller stopped mid-write); ignoring it"
        );
    }
    Ok(Found {
        generation,
        snapshot: Some(snapshot),
        records,
        torn_bytes,
    })
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The open log of the current generation.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    generation: u64,
    log_path: PathBuf,
    log: File,
    /// Records appended in this generation.
    records: u64,
    /// Whether bytes were written since the last sync.
    dirty: bool,
    last_sync: Instant,
    fsync_interval: Duration,
}

impl Store {
    /// Starts generation `generation` in `dir` from `snapshot` (see the module docs) and
    /// deletes older generations. Syncs after every change when `fsync_interval` is
    /// zero, else at most that often.
    pub fn start(
        dir: &Path,
        generation: u64,
        snapshot: &Snapshot,
        fsync_interval: Duration,
    ) -> Result<Store, StoreError> {
        let snap_name = file_name(SNAPSHOT_PREFIX, generation);
        let tmp = dir.join(format!("{snap_name}{TMP_SUFFIX}"));
        let snap_path = dir.join(&snap_name);
        let bytes = journal::encode_snapshot(snapshot).map_err(|source| StoreError::Format {
            path: snap_path.clone(),
            source,
        })?;
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &snap_path).map_err(io_err(&snap_path))?;
        sync_dir(dir)?;
        let log_path = dir.join(file_name(LOG_PREFIX, generation));
        let mut log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        log.write_all(&LOG_MAGIC).map_err(io_err(&log_path))?;
        log.sync_all().map_err(io_err(&log_path))?;
        sync_dir(dir)?;
        // Older generations (and stray temporaries) are now superseded.
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let old = generation_of(name, SNAPSHOT_PREFIX)
                .or_else(|| generation_of(name, LOG_PREFIX))
                .is_some_and(|g| g < generation)
                || (name.starts_with(SNAPSHOT_PREFIX) && name.ends_with(TMP_SUFFIX));
            if old {
                if let Err(e) = fs::remove_file(entry.path()) {
                    tracing::warn!(file = %entry.path().display(), "cannot delete an old metadata file: {e}");
                }
            }
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            generation,
            log_path,
            log,
            records: 0,
            dirty: false,
            last_sync: Instant::now(),
            fsync_interval,
        })
    }

    /// Appends `records` with one write, then syncs if the policy says so.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            let frame = journal::encode_record(r).map_err(|source| StoreError::Format {
                path: self.log_path.clone(),
                source,
            })?;
            buf.extend(frame);
        }
        self.log.write_all(&buf).map_err(io_err(&self.log_path))?;
        self.records += records.len() as u64;
        self.dirty = true;
        if self.fsync_interval.is_zero() {
            self.sync()?;
        }
        Ok(())
    }

    /// Syncs the log if bytes were written since the last sync.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.dirty {
            self.log.sync_data().map_err(io_err(&self.log_path))?;
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Syncs if the interval since the last sync has passed.
    pub fn sync_if_due(&mut self, now: Instant) -> Result<(), StoreError> {
        if self.dirty && now.saturating_duration_since(self.last_sync) >= self.fsync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// Records appended in the current generation.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Starts the next generation from `snapshot`.
    pub fn rotate(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.sync()?;
        let next = Store::start(
            &self.dir,
            self.generation + 1,
            snapshot,
            self.fsync_interval,
        )?;
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PoolPath;

    fn rec(i: u32) -> Record {
        Record::Opened {
            path: PoolPath::parse(&format!("/p{i}")).unwrap(),
        }
    }

    #[test]
    fn generations_replace_each_other_and_torn_tails_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let found = read(dir.path()).unwrap();
        assert!(found.snapshot.is_none() && found.records.is_empty());
        let snap = Snapshot::default();
        let mut s = Store::start(dir.path(), 1, &snap, Duration::ZERO).unwrap();
        s.append(&[rec(1), rec(2)]).unwrap();
        s.append(&[rec(3)]).unwrap();
        let found = read(dir.path()).unwrap();
        assert_eq!(found.generation, 1);
        assert_eq!(found.records, vec![rec(1), rec(2), rec(3)]);

        // A torn write at the end is ignored.
        let log = dir.path().join(file_name(LOG_PREFIX, 1));
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        let frame = journal::encode_record(&rec(4)).unwrap();
        f.write_all(&frame[..frame.len() - 2]).unwrap();
        let found = read(dir.path()).unwrap();
        assert_eq!(found.records.len(), 3);
        assert_eq!(found.torn_bytes, frame.len() as u64 - 2);

        // Rotation leaves one generation, with an empty log.
        let snap2 = Snapshot {
            next_node_id: 9,
            ..Snapshot::default()
        };
        s.rotate(&snap2).unwrap();
        let found = read(dir.path()).unwrap();
        assert_eq!(found.generation, 2);
        assert_eq!(found.snapshot, Some(snap2));
        assert!(found.records.is_empty());
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // A stray temporary from a crashed snapshot does not count.
        fs::write(dir.path().join("snapshot.00000000000000000003.tmp"), b"x").unwrap();
        assert_eq!(read(dir.path()).unwrap().generation, 2);
        // A damaged snapshot is an error, not silently empty metadata.
        fs::write(
            dir.path().join(file_name(SNAPSHOT_PREFIX, 2)),
            b"FPSNAP\0\x01junk",
        )
        .unwrap();
        assert!(matches!(read(dir.path()), Err(StoreError::Format { .. })));
    }
}
