//! The spill tier: data that does not fit the pool goes to an object store on local
//! disk (`object_store::local::LocalFileSystem`), the interface farpool's persistent
//! tier is meant to use, so the same code could spill to S3 or another store.

use super::ExperimentError;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A spill tier over a directory. Calls block the calling thread on a small tokio
/// runtime of its own, so plain threads (the experiment's tasks) can use it.
pub struct SpillTier {
    store: LocalFileSystem,
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
    remove_dir: bool,
    sync: bool,
    written: AtomicU64,
    read: AtomicU64,
}

impl SpillTier {
    /// Opens a spill tier in `dir` (created if needed). With `remove_dir` the directory
    /// is removed when the tier is dropped. With `sync`, every object is flushed to
    /// disk (`fsync`) before [`SpillTier::put`] returns, as a persistent tier that
    /// acknowledges only durable writes must (object_store's local store does not).
    pub fn open(dir: &Path, remove_dir: bool, sync: bool) -> Result<SpillTier, ExperimentError> {
        std::fs::create_dir_all(dir).map_err(|source| ExperimentError::Io {
            context: "cannot create spill directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| ExperimentError::spill(format!("open {}", dir.display()), e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(16)
            .thread_name("spill-tier")
            .enable_all()
            .build()
            .map_err(|source| ExperimentError::Io {
                context: "cannot start the spill tier's runtime for",
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(SpillTier {
            store,
            rt,
            dir: dir.to_path_buf(),
            remove_dir,
            sync,
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
        })
    }

    /// A fresh directory under the system's temporary directory, for [`SpillTier::open`].
    pub fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!(
            "farpool-spill-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    /// The directory holding the objects.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `data` as object `key` (a `/`-separated name).
    pub fn put(&self, key: &str, data: Vec<u8>) -> Result<(), ExperimentError> {
        let len = data.len() as u64;
        let path = ObjectPath::from(key);
        self.rt
            .block_on(self.store.put(&path, data.into()))
            .map_err(|e| ExperimentError::spill(format!("put {key}"), e))?;
        if self.sync {
            let file = self.dir.join(key);
            std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|source| ExperimentError::Io {
                    context: "cannot flush spilled object",
                    path: file,
                    source,
                })?;
        }
        self.written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Reads bytes `[start, start + buf.len())` of object `key` into `buf`.
    pub fn read(&self, key: &str, start: u64, buf: &mut [u8]) -> Result<(), ExperimentError> {
        let path = ObjectPath::from(key);
        let end = start + buf.len() as u64;
        let bytes = self
            .rt
            .block_on(self.store.get_range(&path, start..end))
            .map_err(|e| ExperimentError::spill(format!("read {key} [{start}, {end})"), e))?;
        if bytes.len() != buf.len() {
            return Err(ExperimentError::Config(format!(
                "spilled object {key} returned {} bytes for a range of {}; the spill directory was changed under the experiment",
                bytes.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&bytes);
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes object `key`.
    pub fn delete(&self, key: &str) -> Result<(), ExperimentError> {
        let path = ObjectPath::from(key);
        self.rt
            .block_on(self.store.delete(&path))
            .map_err(|e| ExperimentError::spill(format!("delete {key}"), e))
    }

    /// Bytes written to the tier so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Bytes read back from the tier so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl Drop for SpillTier {
    fn drop(&mut self) {
        if self.remove_dir {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the spill directory");
            }
        }
    }
}

impl std::fmt::Debug for SpillTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillTier").field("dir", &self.dir).finish()
    }
}
