//! Hierarchical pool paths: `/job/stage/task/object`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Deepest path accepted, in components.
pub const MAX_DEPTH: usize = 32;

/// Why a path string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PathError {
    /// Paths are absolute.
    #[error("path '{0}' must start with '/' (for example /job/stage/task)")]
    NotAbsolute(String),
    /// A component is empty, `.` or `..`, or has a forbidden character.
    #[error("path '{path}' has an invalid component '{component}': components are non-empty, not '.' or '..', and use letters, digits and -_.:=+@")]
    BadComponent {
        /// The whole path.
        path: String,
        /// The offending component.
        component: String,
    },
    /// Too long or too deep.
    #[error(
        "path is too long or too deep (at most {MAX_PATH_LEN} bytes and {MAX_DEPTH} components)"
    )]
    TooLong,
    /// The root itself cannot own data.
    #[error("the root path '/' cannot be used here; use a job path such as /job")]
    Root,
}

/// A validated absolute path in the pool namespace. `/` is the root.
///
/// Deserialization validates too, so a path that arrives over the wire is as checked as
/// one parsed locally.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PoolPath(String);

impl TryFrom<String> for PoolPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<PoolPath> for String {
    fn from(p: PoolPath) -> String {
        p.0
    }
}

impl PoolPath {
    /// Parses and validates `s`. A trailing `/` is ignored.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        if !s.starts_with('/') {
            return Err(PathError::NotAbsolute(s.to_string()));
        }
        let trimmed = s.trim_end_matches('/');
        if trimmed.is_empty() {
            return Ok(Self("/".into()));
        }
        let mut depth = 0;
        for c in trimmed[1..].split('/') {
            depth += 1;
            let ok = !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.:=+@".contains(ch));
            if !ok {
                return Err(PathError::BadComponent {
                    path: s.to_string(),
                    component: c.to_string(),
                });
            }
        }
        if depth > MAX_DEPTH {
            return Err(PathError::TooLong);
        }
        Ok(Self(trimmed.to_string()))
    }

    /// The root path `/`.
    pub fn root() -> Self {
        Self("/".into())
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, root first excluded.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// The first component (the job), if any.
    pub fn job(&self) -> Option<&str> {
        self.components().next()
    }

    /// `self` joined with a relative `child` (which may contain several components).
    pub fn join(&self, child: &str) -> Result<Self, PathError> {
        if self.is_root() {
            Self::parse(&format!("/{child}"))
        } else {
            Self::parse(&format!("{}/{}", self.0, child))
        }
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &PoolPath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }
}

impl fmt::Display for PoolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for PoolPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        assert_eq!(PoolPath::parse("/a/b/").unwrap().as_str(), "/a/b");
        assert!(PoolPath::parse("/").unwrap().is_root());
        assert_eq!(PoolPath::parse("/wc/map/m-1").unwrap().job(), Some("wc"));
    }

    #[test]
    fn rejects_bad_paths() {
        assert!(matches!(
            PoolPath::parse("a/b"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(PoolPath::parse("/a//b").is_err());
        assert!(PoolPath::parse("/a/../b").is_err());
        assert!(PoolPath::parse("/a/b c").is_err());
        assert!(PoolPath::parse(&"/a".repeat(40)).is_err());
    }

    #[test]
    fn wire_paths_are_validated() {
        let ok: PoolPath = serde_json::from_str("\"/a/b\"").unwrap();
        assert_eq!(ok.as_str(), "/a/b");
        assert!(serde_json::from_str::<PoolPath>("\"/a//b\"").is_err());
        assert!(serde_json::from_str::<PoolPath>("\"/a/../b\"").is_err());
    }

    #[test]
    fn prefix_matching_respects_components() {
        let p = PoolPath::parse("/job/stage").unwrap();
        assert!(p.starts_with(&PoolPath::parse("/job").unwrap()));
        assert!(!p.starts_with(&PoolPath::parse("/jo").unwrap()));
        assert!(p.starts_with(&PoolPath::root()));
        assert_eq!(p.join("t/o").unwrap().as_str(), "/job/stage/t/o");
    }
}
