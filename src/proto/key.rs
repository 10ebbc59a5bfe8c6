//! The cluster key: a 128-bit secret shared by the controller and its memory nodes (and
//! by whoever issues client tokens), never sent on the wire.
//!
//! Every use gets its own subkey, a keyed SipHash-128 of a fixed label under the cluster
//! key, so a MAC made for one purpose (a node's registration proof, a client token, a
//! block key) is never valid for another:
//!
//! - [`ClusterKey::block_secret`] keys the per-block access keys ([`super::derive_key`]);
//! - [`ClusterKey::node_proof`] and [`ClusterKey::controller_proof`] answer the
//!   registration challenge (each side proves it holds the key without revealing it);
//! - [`ClusterKey::token_mac`] signs client tokens ([`super::token`]).
//!
//! Sources, highest precedence first: `--cluster-key-file PATH` (config layer: flag,
//! `FARPOOL_CLUSTER_KEY_FILE`, `cluster_key_file` in the TOML file), then the
//! `FARPOOL_CLUSTER_KEY` environment variable. Both hold 32 hex digits (surrounding
//! whitespace is ignored). `farpool keygen` writes a fresh key file.

use super::grant::Secret;
use siphasher::sip128::{Hasher128, SipHasher24 as SipHasher128};
use std::hash::Hasher;
use std::path::{Path, PathBuf};

/// Environment variable holding the cluster key as hex.
pub const CLUSTER_KEY_ENV: &str = "FARPOOL_CLUSTER_KEY";

/// Bytes in a cluster key.
pub const CLUSTER_KEY_LEN: usize = 16;

/// A cluster key. Its `Debug` output hides the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; CLUSTER_KEY_LEN]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a cluster key could not be loaded. Each variant says where it looked.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read cluster key file '{}': {source}; create one with `farpool keygen --out FILE`", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key text is not 32 hex digits.
    #[error("cluster key from {origin} is not valid: {reason}; it must be 32 hex digits (16 bytes), as `farpool keygen` writes")]
    Malformed {
        /// Where it came from (file path or environment variable).
        origin: String,
        /// What is wrong.
        reason: String,
    },
}

impl ClusterKey {
    /// A key made of these bytes.
    pub fn from_bytes(bytes: [u8; CLUSTER_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh random key.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Parses 32 hex digits (surrounding whitespace ignored); `origin` names the source
    /// in errors.
    pub fn parse_hex(text: &str, origin: &str) -> Result<Self, KeyError> {
        let bad = |reason: String| KeyError::Malformed {
            origin: origin.to_string(),
            reason,
        };
        let bytes = decode_hex(text.trim()).map_err(bad)?;
        let key: [u8; CLUSTER_KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("it holds {} bytes", bytes.len())))?;
        Ok(Self(key))
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_hex(&text, &format!("file '{}'", path.display()))
    }

    /// The configured key: the file if one is named, else [`CLUSTER_KEY_ENV`], else
    /// `None` (development mode).
    pub fn configured(file: Option<&Path>) -> Result<Option<Self>, KeyError> {
        if let Some(path) = file {
            return Self::load(path).map(Some);
        }
        match std::env::var(CLUSTER_KEY_ENV) {
            Ok(v) if !v.trim().is_empty() => Self::parse_hex(&v, CLUSTER_KEY_ENV).map(Some),
            _ => Ok(None),
        }
    }

    /// The key as 32 hex digits (what key files hold).
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// A 128-bit PRF of `parts` under the subkey for `label`.
    fn mac(&self, label: &str, parts: &[&[u8]]) -> [u8; 16] {
        let mut h = SipHasher128::new_with_key(&self.0);
        h.write(label.as_bytes());
        h.write_u8(0);
        for p in parts {
            // Length-prefixed, so no two part lists hash the same bytes.
            h.write_u64(p.len() as u64);
            h.write(p);
        }
        h.finish128().as_bytes()
    }

    /// The secret the per-block access keys are derived from.
    pub fn block_secret(&self) -> Secret {
        Secret(self.mac("farpool block keys v1", &[]))
    }

    /// A memory node's answer to the controller's challenge.
    pub fn node_proof(&self, challenge: &Challenge, identity: &[u8]) -> [u8; 16] {
        self.mac(
            "farpool node proof v1",
            &[&challenge.node_nonce, &challenge.controller_nonce, identity],
        )
    }

    /// The controller's proof to a memory node that it holds the key too.
    pub fn controller_proof(&self, challenge: &Challenge, identity: &[u8]) -> [u8; 16] {
        self.mac(
            "farpool controller proof v1",
            &[&challenge.node_nonce, &challenge.controller_nonce, identity],
        )
    }

    /// The MAC of a client token's payload.
    pub fn token_mac(&self, payload: &[u8]) -> [u8; 16] {
        self.mac("farpool client token v1", &[payload])
    }
}

/// The two nonces of one registration: the node's (sent in its hello) and the
/// controller's (sent with the controller's proof).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Chosen at random by the memory node for this connection.
    pub node_nonce: [u8; 16],
    /// Chosen at random by the controller for this connection.
    pub controller_nonce: [u8; 16],
}

/// Compares two MACs in time independent of where they differ.
pub fn macs_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Bytes of a hex string (either case); the error says what is wrong.
pub fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    if text.len() % 2 != 0 {
        return Err(format!("odd number of hex digits ({})", text.len()));
    }
    let digit = |c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!(
                "'{}' is not a hex digit",
                char::from(c).escape_default()
            )),
        }
    };
    text.as_bytes()
        .chunks(2)
        .map(|p| Ok((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_bad_text_is_refused() {
        let k = ClusterKey::random();
        assert_eq!(ClusterKey::parse_hex(&k.to_hex(), "t").unwrap(), k);
        assert_eq!(
            ClusterKey::parse_hex(&format!("  {}\n", k.to_hex().to_uppercase()), "t").unwrap(),
            k
        );
        for bad in ["", "abc", "zz", &"00".repeat(15), &"00".repeat(17)] {
            let e = ClusterKey::parse_hex(bad, "test").unwrap_err();
            assert!(e.to_string().contains("32 hex digits"), "{e}");
        }
        assert_eq!(format!("{k:?}"), "ClusterKey(..)");
    }

    #[test]
    fn subkeys_differ_by_purpose_key_and_input() {
        let a = ClusterKey::from_bytes([1; 16]);
        let b = ClusterKey::from_bytes([2; 16]);
        assert_ne!(a.block_secret(), b.block_secret());
        assert_eq!(a.block_secret(), a.block_secret());
        let c = Challenge {
            node_nonce: [3; 16],
            controller_nonce: [4; 16],
        };
        assert_ne!(a.node_proof(&c, b"n"), a.controller_proof(&c, b"n"));
        assert_ne!(a.node_proof(&c, b"n"), b.node_proof(&c, b"n"));
        assert_ne!(a.node_proof(&c, b"n"), a.node_proof(&c, b"m"));
        let mut c2 = c;
        c2.controller_nonce[0] ^= 1;
        assert_ne!(a.node_proof(&c, b"n"), a.node_proof(&c2, b"n"));
        assert_ne!(a.token_mac(b"x"), a.token_mac(b"y"));
        assert!(macs_equal(&a.token_mac(b"x"), &a.token_mac(b"x")));
        assert!(!macs_equal(&a.token_mac(b"x"), &a.token_mac(b"y")));
        assert!(!macs_equal(b"ab", b"abc"));
    }

    #[test]
    fn key_files_load_and_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let k = ClusterKey::random();
        std::fs::write(&p, format!("{}\n", k.to_hex())).unwrap();
        assert_eq!(ClusterKey::configured(Some(&p)).unwrap(), Some(k));
        let missing = ClusterKey::load(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("farpool keygen"), "{missing}");
    }
}
