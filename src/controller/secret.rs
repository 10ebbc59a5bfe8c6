//! The cluster secret in the controller's data directory.
//!
//! The secret keys every block capability ([`crate::proto::derive_key`]). Keeping it in
//! `data_dir/secret` (16 raw bytes, mode 0600) lets a restarted controller derive the
//! same keys its memory nodes expect.

use super::ControllerError;
use crate::proto::Secret;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

/// File name of the secret inside the data directory.
pub(crate) const SECRET_FILE: &str = "secret";

/// Creates `dir` if needed and loads the secret from it, creating a fresh one on first
/// use.
pub(crate) fn load_or_create(dir: &Path) -> Result<Secret, ControllerError> {
    let dir_err = |source: io::Error| ControllerError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(dir_err)?;
    let path = dir.join(SECRET_FILE);
    let secret_err = |reason: String| ControllerError::Secret {
        path: path.clone(),
        reason,
    };
    match create_new(&path) {
        Ok(mut file) => {
            let secret = Secret::random();
            file.write_all(&secret.0)
                .and_then(|()| file.sync_all())
                .map_err(|e| secret_err(format!("cannot write it: {e}")))?;
            tracing::info!(path = %path.display(), "created a new cluster secret");
            Ok(secret)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let mut buf = Vec::with_capacity(17);
            fs::File::open(&path)
                .and_then(|f| f.take(17).read_to_end(&mut buf))
                .map_err(|e| secret_err(format!("cannot read it: {e}")))?;
            let bytes: [u8; 16] = buf.as_slice().try_into().map_err(|_| {
                secret_err(format!(
                    "it holds {} bytes instead of 16; delete it to create a new secret (memory nodes must then re-register)",
                    buf.len()
                ))
            })?;
            Ok(Secret(bytes))
        }
        Err(e) => Err(secret_err(format!("cannot create it: {e}"))),
    }
}

#[cfg(unix)]
fn create_new(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_new(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_persists_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("ctl");
        let a = load_or_create(&sub).unwrap();
        let b = load_or_create(&sub).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(sub.join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(sub.join(SECRET_FILE), b"short").unwrap();
        let err = load_or_create(&sub).unwrap_err();
        assert!(err.to_string().contains("delete it"), "{err}");
    }
}
