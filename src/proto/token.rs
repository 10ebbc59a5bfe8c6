//! Client tokens: who may act on which paths, signed with the cluster key.
//!
//! A token is printable text, `fpt1.<payload hex>.<mac hex>`. The payload is
//! `version (u8 = 1) | flags (u8, bit 0 = admin) | expiry (u64 LE, seconds since the
//! Unix epoch) | job length (u16 LE) | job (UTF-8)`; the MAC is
//! [`ClusterKey::token_mac`] of the payload bytes (16 bytes). An admin token may act on
//! every path; a job token only on `/JOB` and below.
//!
//! [`Token::decode`] only parses (it is what a controller runs on untrusted input, and
//! what the `token` fuzz target exercises); [`Token::verify`] checks the MAC and the
//! expiry.

use super::key::{decode_hex, encode_hex, macs_equal, ClusterKey};

/// The text every token starts with.
pub const TOKEN_PREFIX: &str = "fpt1.";
/// Environment variable a client reads its token from.
pub const TOKEN_ENV: &str = "FARPOOL_TOKEN";
/// Longest token text accepted (a job name of at most 255 bytes fits easily).
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest job name.
pub const MAX_JOB_LEN: usize = 255;

const VERSION: u8 = 1;
const FLAG_ADMIN: u8 = 1;
const FIXED: usize = 1 + 1 + 8 + 2;

/// What a token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every path.
    Admin,
    /// `/JOB` and everything below it.
    Job(String),
}

/// A parsed (not yet verified) token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// What it allows.
    pub scope: Scope,
    /// Seconds since the Unix epoch after which it is refused.
    pub expiry: u64,
    payload: Vec<u8>,
    mac: [u8; 16],
}

/// Why a token is refused. Each variant says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token at all (wrong prefix, bad hex, bad layout).
    #[error("malformed client token: {0}; pass the exact text `farpool token` printed")]
    Malformed(String),
    /// The MAC does not match: forged, altered, or issued under another cluster key.
    #[error("client token rejected: its MAC does not match; it was altered or issued with a different cluster key, issue a new one with `farpool token --job NAME` using the controller's key")]
    BadMac,
    /// The token's lifetime is over.
    #[error("client token expired at {expiry} (now {now}, seconds since the Unix epoch); issue a new one with `farpool token --job NAME --ttl ...`")]
    Expired {
        /// The token's expiry.
        expiry: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// A job name that cannot be a path component.
    #[error("job name {0:?} is not valid: it must be one path component (1-255 bytes, no '/', not '.' or '..')")]
    BadJob(String),
}

/// Whether `job` can name a top-level path component.
fn valid_job(job: &str) -> bool {
    !job.is_empty()
        && job.len() <= MAX_JOB_LEN
        && !job.contains('/')
        && job != "."
        && job != ".."
        && !job.chars().any(char::is_control)
}

impl Token {
    /// Issues a token for `scope` expiring at `expiry` (seconds since the Unix epoch),
    /// signed with `key`; returns its text.
    pub fn issue(key: &ClusterKey, scope: &Scope, expiry: u64) -> Result<String, TokenError> {
        let (flags, job) = match scope {
            Scope::Admin => (FLAG_ADMIN, ""),
            Scope::Job(j) => {
                if !valid_job(j) {
                    return Err(TokenError::BadJob(j.clone()));
                }
                (0, j.as_str())
            }
        };
        let mut payload = Vec::with_capacity(FIXED + job.len());
        payload.push(VERSION);
        payload.push(flags);
        payload.extend_from_slice(&expiry.to_le_bytes());
        payload.extend_from_slice(&(job.len() as u16).to_le_bytes());
        payload.extend_from_slice(job.as_bytes());
        let mac = key.token_mac(&payload);
        Ok(format!(
            "{TOKEN_PREFIX}{}.{}",
            encode_hex(&payload),
            encode_hex(&mac)
        ))
    }

    /// Parses token text (surrounding whitespace ignored). Checks only the layout.
    pub fn decode(text: &str) -> Result<Token, TokenError> {
        let bad = |m: &str| TokenError::Malformed(m.to_string());
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(bad("longer than any token"));
        }
        let rest = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| bad("it does not start with 'fpt1.'"))?;
        let (payload_hex, mac_hex) = rest
            .split_once('.')
            .ok_or_else(|| bad("no '.' between payload and MAC"))?;
        let payload = decode_hex(payload_hex).map_err(|e| TokenError::Malformed(e.clone()))?;
        let mac: [u8; 16] = decode_hex(mac_hex)
            .map_err(TokenError::Malformed)?
            .as_slice()
            .try_into()
            .map_err(|_| bad("the MAC is not 16 bytes"))?;
        let fixed = payload
            .get(..FIXED)
            .ok_or_else(|| bad("payload too short"))?;
        if fixed[0] != VERSION {
            return Err(bad("unknown token version"));
        }
        let flags = fixed[1];
        if flags & !FLAG_ADMIN != 0 {
            return Err(bad("unknown flags"));
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&fixed[2..10]);
        let expiry = u64::from_le_bytes(exp);
        let job_len = usize::from(u16::from_le_bytes([fixed[10], fixed[11]]));
        let job = payload
            .get(FIXED..)
            .filter(|j| j.len() == job_len)
            .ok_or_else(|| bad("job length does not match the payload"))?;
        let job = std::str::from_utf8(job).map_err(|_| bad("job name is not UTF-8"))?;
        let scope = if flags & FLAG_ADMIN != 0 {
            if !job.is_empty() {
                return Err(bad("an admin token names no job"));
            }
            Scope::Admin
        } else {
            if !valid_job(job) {
                return Err(TokenError::BadJob(job.to_string()));
            }
            Scope::Job(job.to_string())
        };
        Ok(Token {
            scope,
            expiry,
            payload,
            mac,
        })
    }

    /// Checks the MAC under `key`, then the expiry against `now` (seconds since the
    /// Unix epoch); returns the scope.
    pub fn verify(&self, key: &ClusterKey, now: u64) -> Result<Scope, TokenError> {
        if !macs_equal(&key.token_mac(&self.payload), &self.mac) {
            return Err(TokenError::BadMac);
        }
        if now >= self.expiry {
            return Err(TokenError::Expired {
                expiry: self.expiry,
                now,
            });
        }
        Ok(self.scope.clone())
    }
}

/// Seconds since the Unix epoch (0 before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> ClusterKey {
        ClusterKey::from_bytes([9; 16])
    }

    #[test]
    fn issued_tokens_verify_until_they_expire() {
        let t = Token::issue(&key(), &Scope::Job("wc".into()), 1_000).unwrap();
        assert!(t.starts_with(TOKEN_PREFIX));
        let d = Token::decode(&t).unwrap();
        assert_eq!(d.verify(&key(), 999), Ok(Scope::Job("wc".into())));
        assert_eq!(
            d.verify(&key(), 1_000),
            Err(TokenError::Expired {
                expiry: 1_000,
                now: 1_000
            })
        );
        let a = Token::issue(&key(), &Scope::Admin, 1_000).unwrap();
        assert_eq!(
            Token::decode(&a).unwrap().verify(&key(), 5),
            Ok(Scope::Admin)
        );
        // Another cluster key: bad MAC.
        let other = ClusterKey::from_bytes([8; 16]);
        assert_eq!(d.verify(&other, 5), Err(TokenError::BadMac));
    }

    #[test]
    fn altered_tokens_fail_the_mac() {
        let t = Token::issue(&key(), &Scope::Job("aa".into()), 1_000).unwrap();
        // Rename the job (a -> b in the payload hex: 0x61 -> 0x62) or extend the expiry.
        let renamed = t.replacen("6161.", "6162.", 1);
        assert_ne!(renamed, t);
        let d = Token::decode(&renamed).unwrap();
        assert_eq!(d.scope, Scope::Job("ab".into()));
        assert_eq!(d.verify(&key(), 5), Err(TokenError::BadMac));
        let longer = t.replacen("e803", "e903", 1);
        assert_ne!(longer, t);
        assert_eq!(
            Token::decode(&longer).unwrap().verify(&key(), 5),
            Err(TokenError::BadMac)
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "fpt1.",
            "fpt2.00.00",
            "fpt1.zz.00",
            "fpt1.0100.00000000000000000000000000000000",
            &"fpt1.".repeat(300),
        ] {
            assert!(Token::decode(bad).is_err(), "{bad}");
        }
        for job in ["", "a/b", "..", "."] {
            assert_eq!(
                Token::issue(&key(), &Scope::Job(job.into()), 1),
                Err(TokenError::BadJob(job.into()))
            );
        }
    }

    /// The committed fuzz seeds (fuzz/corpus/token) are tokens this build issues.
    /// `FARPOOL_WRITE_CORPUS=1 cargo test -p farpool token::` regenerates them.
    #[test]
    fn seed_corpus_is_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/token");
        let key = ClusterKey::from_bytes([0x5a; 16]);
        let seeds = [
            (
                "job",
                Token::issue(&key, &Scope::Job("wordcount".into()), 4_000_000_000),
            ),
            ("admin", Token::issue(&key, &Scope::Admin, 4_000_000_000)),
        ];
        for (name, text) in seeds {
            let text = text.unwrap();
            if std::env::var_os("FARPOOL_WRITE_CORPUS").is_some() {
                std::fs::write(dir.join(name), &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(dir.join(name)).unwrap();
            assert_eq!(on_disk, text, "seed {name} is stale; regenerate the corpus");
            assert!(Token::decode(&on_disk).unwrap().verify(&key, 0).is_ok());
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_round_trips(
            s in "\\PC{0,80}",
            job in "[a-z0-9_-]{1,40}",
            expiry in any::<u64>(),
            admin in any::<bool>(),
        ) {
            let _ = Token::decode(&s);
            let scope = if admin { Scope::Admin } else { Scope::Job(job) };
            let t = Token::issue(&key(), &scope, expiry).unwrap();
            let d = Token::decode(&t).unwrap();
            prop_assert_eq!(&d.scope, &scope);
            prop_assert_eq!(d.expiry, expiry);
            prop_assert_eq!(d.verify(&key(), 0).is_ok(), expiry > 0);
        }
    }
}
