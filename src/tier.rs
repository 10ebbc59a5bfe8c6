//! The persistent tier: where data structures are synced, dumped and loaded (Jiffy's
//! `sync`/`dump`/`load`), through the `object_store` crate.
//!
//! A tier is named by a URL:
//! - a plain path or `file:///abs/dir`: a local directory (created if missing), the
//!   default;
//! - `memory:`: an in-process store, for tests;
//! - `s3://bucket/prefix`: an S3-compatible store, configured from the usual `AWS_*`
//!   environment variables (needs the `s3` cargo feature).
//!
//! Calls block the calling thread; each tier runs its I/O on a small runtime of its
//! own, so plain threads (tasks, the data structures) can use it.

use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a persistent-tier call failed.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The URL names no store this build can open.
    #[error("cannot open persistent tier '{url}': {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it, and what to use instead.
        why: String,
    },
    /// No object under the key.
    #[error("no object '{key}' in persistent tier '{url}'; check the name it was synced or dumped under")]
    NotFound {
        /// The tier's URL.
        url: String,
        /// The key looked up.
        key: String,
    },
    /// The store refused or failed an operation.
    #[error("persistent tier '{url}': {op} '{key}' failed: {source}")]
    Store {
        /// The tier's URL.
        url: String,
        /// What was being done.
        op: &'static str,
        /// The object's key.
        key: String,
        /// The store's error (boxed: it is large, and errors travel by value).
        #[source]
        source: Box<object_store::Error>,
    },
    /// The tier's I/O runtime could not start.
    #[error("cannot start the persistent tier's I/O runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// An open persistent tier.
pub struct Tier {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    rt: tokio::runtime::Runtime,
}

impl Tier {
    /// Opens the tier named by `url` (see the module documentation).
    pub fn open(url: &str) -> Result<Tier, TierError> {
        let bad = |why: String| TierError::BadUrl {
            url: url.to_string(),
            why,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) = if url == "memory:" {
            (
                Arc::new(object_store::memory::InMemory::new()),
                ObjectPath::default(),
            )
        } else if let Some(rest) = url.strip_prefix("s3://") {
            s3_store(url, rest).map_err(bad)?
        } else if url.contains("://") && !url.starts_with("file://") {
            return Err(bad(
                "unknown scheme; use a directory path, file:///dir, memory: or s3://bucket/prefix"
                    .into(),
            ));
        } else {
            let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            if dir.as_os_str().is_empty() {
                return Err(bad("empty directory path".into()));
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| bad(format!("cannot create directory {}: {e}", dir.display())))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad(e.to_string()))?;
            (Arc::new(fs), ObjectPath::default())
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("farpool-tier")
            .enable_all()
            .build()
            .map_err(TierError::Runtime)?;
        Ok(Tier {
            url: url.to_string(),
            store,
            prefix,
            rt,
        })
    }

    /// The URL the tier was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjectPath {
        let key = key.trim_start_matches('/');
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn store_err(&self, op: &'static str, key: &str, source: object_store::Error) -> TierError {
        match source {
            object_store::Error::NotFound { .. } => TierError::NotFound {
                url: self.url.clone(),
                key: key.to_string(),
            },
            source => TierError::Store {
                url: self.url.clone(),
                op,
                key: key.to_string(),
                source: Box::new(source),
            },
        }
    }

    /// Runs `fut` on the tier's runtime, from any thread (also from inside another
    /// tokio runtime, where `block_on` would panic).
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, object_store::Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.rt.block_on(fut);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(object_store::Error::Generic {
                store: "farpool tier",
                source: "the tier's runtime stopped during the call".into(),
            })
        })
    }

    /// Stores `data` under `key` (replacing any object there).
    pub fn put(&self, key: &str, data: Vec<u8>) -> Result<(), TierError> {
        let (store, path) = (self.store.clone(), self.path(key));
        self.run(async move { store.put(&path, data.into()).await.map(|_| ()) })
            .map_err(|e| self.store_err("put", key, e))
    }

    /// The object under `key`.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, TierError> {
        let (store, path) = (self.store.clone(), self.path(key));
        self.run(async move {
            let got = store.get(&path).await?;
            got.bytes().await.map(|b| b.to_vec())
        })
        .map_err(|e| self.store_err("get", key, e))
    }

    /// Removes the object under `key` (no error when there is none).
    pub fn delete(&self, key: &str) -> Result<(), TierError> {
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(async move { store.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err("delete", key, e)),
        }
    }

    /// Whether an object exists under `key`.
    pub fn exists(&self, key: &str) -> Result<bool, TierError> {
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(async move { store.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.store_err("head", key, e)),
        }
    }
}

#[cfg(feature = "s3")]
fn s3_store(url: &str, _rest: &str) -> Result<(Arc<dyn ObjectStore>, ObjectPath), String> {
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let (store, prefix) = object_store::parse_url(&parsed).map_err(|e| e.to_string())?;
    Ok((Arc::from(store), prefix))
}

#[cfg(not(feature = "s3"))]
fn s3_store(_url: &str, _rest: &str) -> Result<(Arc<dyn ObjectStore>, ObjectPath), String> {
    Err("this farpool was built without S3 support; rebuild with `--features s3`, or use a local directory".into())
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier").field("url", &self.url).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_memory_tiers_store_and_report_missing_objects() {
        let dir = tempfile::tempdir().unwrap();
        for url in [dir.path().to_str().unwrap().to_string(), "memory:".into()] {
            let tier = Tier::open(&url).unwrap();
            tier.put("/job/a/obj", b"hello".to_vec()).unwrap();
            assert!(tier.exists("/job/a/obj").unwrap());
            assert_eq!(tier.get("/job/a/obj").unwrap(), b"hello");
            tier.delete("/job/a/obj").unwrap();
            tier.delete("/job/a/obj").unwrap();
            assert!(matches!(
                tier.get("/job/a/obj"),
                Err(TierError::NotFound { .. })
            ));
        }
        let file_url = format!("file://{}", dir.path().join("sub").display());
        Tier::open(&file_url).unwrap().put("x", vec![1]).unwrap();
        assert!(dir.path().join("sub/x").exists());
    }

    #[test]
    fn unknown_schemes_and_s3_without_the_feature_say_what_to_do() {
        let e = Tier::open("ftp://host/x").unwrap_err().to_string();
        assert!(e.contains("unknown scheme"), "{e}");
        if cfg!(not(feature = "s3")) {
            let e = Tier::open("s3://bucket/p").unwrap_err().to_string();
            assert!(e.contains("--features s3"), "{e}");
        }
    }

    #[test]
    fn works_from_inside_a_tokio_runtime() {
        let tier = Tier::open("memory:").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            tier.put("k", vec![7]).unwrap();
            assert_eq!(tier.get("k").unwrap(), vec![7]);
        });
    }
}
