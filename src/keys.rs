//! `farpool keygen` and `farpool token`: creating a cluster key and issuing client
//! tokens with it (see docs/OPERATIONS.md, "Keys and tokens").

use crate::proto::{ClusterKey, KeyError, Scope, Token, TokenError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `farpool keygen`: write a fresh random cluster key.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// File to create (mode 0600; an existing file is never overwritten). Without it
    /// the key is printed on stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `farpool token`: issue a client token signed with the cluster key.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The job the token is for: it may act only under `/JOB`.
    #[arg(long, required_unless_present = "admin", conflicts_with = "admin")]
    pub job: Option<String>,
    /// An admin token: may act on every path and set quotas.
    #[arg(long)]
    pub admin: bool,
    /// Lifetime: seconds, or with a unit (`90s`, `30m`, `24h`, `7d`).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// The cluster key file (else `FARPOOL_CLUSTER_KEY`).
    #[arg(long, value_name = "PATH", env = "FARPOOL_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
}

/// Why `keygen` or `token` failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The cluster key could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// No cluster key was given.
    #[error("no cluster key: pass --cluster-key-file PATH or set FARPOOL_CLUSTER_KEY (create one with `farpool keygen --out PATH`)")]
    NoKey,
    /// The token could not be issued.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The key file could not be written.
    #[error("cannot create key file '{}': {source}; pick a path that does not exist yet in a writable directory", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Parses a token lifetime: plain seconds or a number with `s`, `m`, `h` or `d`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a lifetime; write e.g. 3600, 30m, 24h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit '{other}' in '{s}'; use s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|&secs| secs > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("lifetime '{s}' must be positive and at most a few centuries"))
}

/// Runs `farpool keygen`.
pub fn keygen(a: &KeygenArgs) -> Result<(), KeysError> {
    let key = ClusterKey::random();
    match &a.out {
        Some(path) => write_key_file(path, &key),
        None => {
            println!("{}", key.to_hex());
            Ok(())
        }
    }
}

/// Creates `path` (mode 0600, never overwriting) holding `key` as hex.
pub fn write_key_file(path: &Path, key: &ClusterKey) -> Result<(), KeysError> {
    let err = |source| KeysError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    writeln!(f, "{}", key.to_hex()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Issues the token `a` describes; returns its text.
pub fn issue(a: &TokenArgs) -> Result<String, KeysError> {
    let key = ClusterKey::configured(a.cluster_key_file.as_deref())?.ok_or(KeysError::NoKey)?;
    let scope = match &a.job {
        Some(job) if !a.admin => Scope::Job(job.clone()),
        _ => Scope::Admin,
    };
    let expiry = crate::proto::token::unix_now().saturating_add(a.ttl.as_secs());
    Ok(Token::issue(&key, &scope, expiry)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "0", "5w", "h", "-1", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keygen_files_are_private_and_tokens_verify_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        keygen(&KeygenArgs {
            out: Some(path.clone()),
        })
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Never overwritten.
        assert!(matches!(
            keygen(&KeygenArgs {
                out: Some(path.clone())
            }),
            Err(KeysError::Write { .. })
        ));
        let text = issue(&TokenArgs {
            job: Some("wc".into()),
            admin: false,
            ttl: Duration::from_secs(60),
            cluster_key_file: Some(path.clone()),
        })
        .unwrap();
        let key = ClusterKey::load(&path).unwrap();
        let now = crate::proto::token::unix_now();
        assert_eq!(
            Token::decode(&text).unwrap().verify(&key, now),
            Ok(Scope::Job("wc".into()))
        );
    }
}
