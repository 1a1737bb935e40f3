//! The build key: lowercase hex SHA-256 of a versioned, line-oriented
//! canonical encoding of (key version, target hash, atom, version,
//! normalised USE). Version 1 hashes the flags as written (normalised);
//! version 2, used by targets with a tree index, hashes the effective USE
//! restricted to IUSE (`tree::PackageUse::effective`). docs/key.md documents
//! both byte for byte with test vectors, so any client can compute a key
//! offline.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

use crate::grammar::{Atom, UseSet, Version};

/// The first line of a version 1 key (flags as written, normalised).
pub const KEY_VERSION: &str = "pacloud-key-v1";
/// The first line of a version 2 key (effective USE restricted to IUSE).
pub const KEY_VERSION_2: &str = "pacloud-key-v2";

/// Which key encoding a spec uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub enum KeyVersion {
    /// Flags as written: targets without a tree index, and records made
    /// before key version 2.
    #[default]
    V1,
    /// The effective USE over the whole IUSE of the ebuild.
    V2,
}

impl KeyVersion {
    pub fn line(self) -> &'static str {
        match self {
            KeyVersion::V1 => KEY_VERSION,
            KeyVersion::V2 => KEY_VERSION_2,
        }
    }
    pub fn is_v1(&self) -> bool {
        *self == KeyVersion::V1
    }
}

impl From<KeyVersion> for u32 {
    fn from(v: KeyVersion) -> u32 {
        match v {
            KeyVersion::V1 => 1,
            KeyVersion::V2 => 2,
        }
    }
}

impl TryFrom<u32> for KeyVersion {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        match v {
            1 => Ok(KeyVersion::V1),
            2 => Ok(KeyVersion::V2),
            n => Err(format!("unknown key version {n}")),
        }
    }
}

/// A build key: exactly 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BuildKey(String);

/// Why a string is not a build key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be 64 lowercase hexadecimal digits (a SHA-256 build key)")]
pub struct BadKey;

impl BuildKey {
    /// The canonical bytes a version 1 key is the hash of.
    pub fn canonical_encoding(target_hash: &str, atom: &Atom, version: &Version, use_flags: &UseSet) -> Vec<u8> {
        Self::canonical_encoding_of(KeyVersion::V1, target_hash, atom, version, use_flags)
    }

    /// The canonical bytes of a key of version `kv`. Both versions have the
    /// same five lines; version 2's `use` line holds every IUSE flag of the
    /// ebuild with its effective state.
    pub fn canonical_encoding_of(
        kv: KeyVersion,
        target_hash: &str,
        atom: &Atom,
        version: &Version,
        use_flags: &UseSet,
    ) -> Vec<u8> {
        format!("{}\ntarget:{target_hash}\natom:{atom}\nversion:{version}\nuse:{}\n", kv.line(), use_flags.canonical())
            .into_bytes()
    }

    pub fn compute(target_hash: &str, atom: &Atom, version: &Version, use_flags: &UseSet) -> BuildKey {
        Self::compute_of(KeyVersion::V1, target_hash, atom, version, use_flags)
    }

    pub fn compute_of(
        kv: KeyVersion,
        target_hash: &str,
        atom: &Atom,
        version: &Version,
        use_flags: &UseSet,
    ) -> BuildKey {
        BuildKey(hex::encode(Sha256::digest(Self::canonical_encoding_of(kv, target_hash, atom, version, use_flags))))
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
