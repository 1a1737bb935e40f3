//! Build targets: a named build configuration fixing everything that decides
//! binary compatibility (profile, CHOST, compiler flags, the ebuild
//! repository snapshot, the builder image). A target's identity is the
//! SHA-256 of a canonical encoding of its content, so editing a target moves
//! it to new build keys instead of serving binaries built the old way.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::grammar::GrammarError;

/// A target's name: `[a-z0-9][a-z0-9._-]{0,63}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetName(String);

impl TargetName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TargetName {
    type Err = GrammarError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(GrammarError::Empty);
        }
        let len = s.chars().count();
        if len > 64 {
            return Err(GrammarError::TooLong { len, max: 64 });
        }
        for (pos, c) in s.chars().enumerate() {
            let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || (pos > 0 && matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(GrammarError::BadChar {
                    found: c.escape_default().collect(),
                    pos,
                    allowed: if pos == 0 { "a-z 0-9" } else { "a-z 0-9 . _ -" },
                });
            }
        }
        Ok(TargetName(s.to_owned()))
    }
}

impl fmt::Display for TargetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for TargetName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TargetName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// What a target fixes. Every field but `tree_index` takes part in the
/// target's hash (`tree_index` decides the key version, which is itself the
/// first line of every key, so the two kinds of keys never meet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Portage profile, e.g. `default/linux/amd64/23.0`.
    pub profile: String,
    /// CHOST, e.g. `x86_64-pc-linux-gnu`.
    pub chost: String,
    pub cflags: String,
    #[serde(default)]
    pub cxxflags: String,
    #[serde(default)]
    pub ldflags: String,
    /// Name of the ebuild repository (e.g. `gentoo`).
    pub repository: String,
    /// Identity of the repository snapshot (a date, a commit, a hash).
    pub snapshot: String,
    /// The builder image (stage3 digest, or `host` for the host's tools).
    pub builder: String,
    /// Further make.conf variables that change the binary, by name.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Whether requests are checked against the target's tree index and
    /// keyed by effective USE (key version 2). Such a target answers 503
    /// until a worker has stored its index. Off: flags as written (key
    /// version 1), nothing checked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tree_index: bool,
    /// Source mirrors of this target's fetch step (`GENTOO_MIRRORS`), tried
    /// before the worker's own; not hashed (where sources come from never
    /// changes a binary: the Manifest pins their digests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    /// Set for a real Gentoo tree built on a host that is not Gentoo: what the
    /// build root needs (see [`BuildRootSpec`]). Hashed through its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_root: Option<BuildRootSpec>,
}

/// The build-root preparation of a real-tree target on a non-Gentoo host
/// (docs/real-gentoo.md): the host configuration's `package.provided`, the
/// target root's, installed-package records for `has_version`, the host tools
/// Gentoo's eclasses call, and links to where the host keeps what they look
/// for. The paths are this machine's; only `digest` (of their contents,
/// computed when the settings are loaded) enters the target's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRootSpec {
    /// `package.provided` of the host configuration (build-time dependencies).
    pub package_provided_host: std::path::PathBuf,
    /// `package.provided` of the target root.
    #[serde(default)]
    pub package_provided_target: Option<std::path::PathBuf>,
    /// Installed-package records for the host's package database, each
    /// `category/name-version:slot` (`has_version` ignores package.provided).
    #[serde(default)]
    pub vdb: Vec<String>,
    /// A directory laid out like the build root's prefix, copied into it
    /// (`@BROOT@` in its text files becomes the build root's path).
    #[serde(default)]
    pub host_tools: Option<std::path::PathBuf>,
    /// Symbolic links to create: path relative to the build root -> target.
    #[serde(default)]
    pub links: BTreeMap<String, String>,
    /// SHA-256 of the contents of the above (filled in by the loader).
    #[serde(default)]
    pub digest: String,
}

impl TargetSpec {
    /// The single-valued fields, in canonical-encoding order.
    pub fn fields(&self) -> [(&'static str, &str); 8] {
        [
            ("profile", &self.profile),
            ("chost", &self.chost),
            ("cflags", &self.cflags),
            ("cxxflags", &self.cxxflags),
            ("ldflags", &self.ldflags),
            ("repository", &self.repository),
            ("snapshot", &self.snapshot),
            ("builder", &self.builder),
        ]
    }
}

/// Why a target's content is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("target {target}: field {field} must be one line of printable ASCII")]
    BadValue { target: String, field: String },
    #[error("target {target}: env variable name {name:?} must match [A-Z_][A-Z0-9_]*")]
    BadEnvName { target: String, name: String },
    #[error("default target {0:?} is not defined")]
    MissingDefault(String),
}

/// A named target and its content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: TargetName,
    pub spec: TargetSpec,
    hash: String,
}

impl Target {
    pub fn new(name: TargetName, spec: TargetSpec) -> Result<Self, TargetError> {
        let bad = |field: &str| TargetError::BadValue { target: name.to_string(), field: field.to_owned() };
        let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
        for (field, v) in spec.fields() {
            if !printable(v) {
                return Err(bad(field));
            }
        }
        for (k, v) in &spec.env {
            let mut bytes = k.bytes();
            let ok = bytes.next().is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
                && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(TargetError::BadEnvName { target: name.to_string(), name: k.clone() });
            }
            if !printable(v) {
                return Err(bad(&format!("env.{k}")));
            }
        }
        for m in &spec.mirrors {
            if !printable(m) || m.contains(' ') {
                return Err(bad("mirrors"));
            }
        }
        if let Some(b) = &spec.build_root {
            let hex64 =
                b.digest.len() == 64 && b.digest.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
            if !hex64 {
                return Err(bad("build_root.digest"));
            }
        }
        let hash = hex::encode(Sha256::digest(Self::canonical_encoding(&spec)));
        Ok(Target { name, spec, hash })
    }

    /// The bytes hashed to give the target's identity (see docs/key.md).
    pub fn canonical_encoding(spec: &TargetSpec) -> Vec<u8> {
        let mut s = String::from("pacloud-target-v1\n");
        for (k, v) in spec.fields() {
            s.push_str(k);
            s.push(':');
            s.push_str(v);
            s.push('\n');
        }
        for (k, v) in &spec.env {
            s.push_str("env:");
            s.push_str(k);
            s.push('=');
            s.push_str(v);
            s.push('\n');
        }
        if let Some(b) = &spec.build_root {
            s.push_str("build_root:");
            s.push_str(&b.digest);
            s.push('\n');
        }
        s.into_bytes()
    }

    /// Lowercase hex SHA-256 of the canonical encoding.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The target every fresh installation starts with: amd64, the 23.0
    /// profile, x86-64-v2, the host's tools.
    pub fn builtin_default() -> Target {
        let spec = TargetSpec {
            profile: "default/linux/amd64/23.0".into(),
            chost: "x86_64-pc-linux-gnu".into(),
            cflags: "-O2 -pipe -march=x86-64-v2".into(),
            cxxflags: "-O2 -pipe -march=x86-64-v2".into(),
            ldflags: "-Wl,-O1 -Wl,--as-needed".into(),
            repository: "gentoo".into(),
            snapshot: "latest".into(),
            builder: "host".into(),
            env: BTreeMap::new(),
            tree_index: false,
            mirrors: Vec::new(),
            build_root: None,
        };
        #[allow(clippy::expect_used)]
        Target::new(TargetName("default".into()), spec).expect("built-in target is valid")
    }
}

/// The targets a deployment offers, with one default.
#[derive(Debug, Clone)]
pub struct TargetSet {
    default: TargetName,
    targets: BTreeMap<TargetName, Target>,
}

impl TargetSet {
    pub fn new(default: TargetName, targets: impl IntoIterator<Item = Target>) -> Result<Self, TargetError> {
        let targets: BTreeMap<_, _> = targets.into_iter().map(|t| (t.name.clone(), t)).collect();
        if !targets.contains_key(&default) {
            return Err(TargetError::MissingDefault(default.to_string()));
        }
        Ok(TargetSet { default, targets })
    }
    pub fn builtin() -> Self {
        let t = Target::builtin_default();
        TargetSet { default: t.name.clone(), targets: BTreeMap::from([(t.name.clone(), t)]) }
    }
    pub fn default_name(&self) -> &TargetName {
        &self.default
    }
    pub fn get(&self, name: &TargetName) -> Option<&Target> {
        self.targets.get(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_follows_content_not_name() {
        let a = Target::builtin_default();
        let b = Target::new("other".parse().unwrap(), a.spec.clone()).unwrap();
        assert_eq!(a.hash(), b.hash());
        let mut spec = a.spec.clone();
        spec.cflags.push_str(" -g");
        let c = Target::new("default".parse().unwrap(), spec).unwrap();
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.hash().len(), 64);
    }

    #[test]
    fn tree_index_is_configured_but_not_hashed() {
        let a = Target::builtin_default();
        let mut v = serde_json::to_value(&a.spec).unwrap();
        assert!(v.get("tree_index").is_none(), "off is not written");
        v["tree_index"] = true.into();
        let spec: TargetSpec = serde_json::from_value(v).unwrap();
        assert!(spec.tree_index);
        let b = Target::new("default".parse().unwrap(), spec).unwrap();
        assert_eq!(a.hash(), b.hash(), "the key version line separates the two kinds of keys");
    }

    #[test]
    fn build_root_digest_is_hashed_mirrors_are_not() {
        let a = Target::builtin_default();
        let mut spec = a.spec.clone();
        spec.mirrors = vec!["http://127.0.0.1:1/".into()];
        assert_eq!(Target::new("default".parse().unwrap(), spec.clone()).unwrap().hash(), a.hash());
        let root = BuildRootSpec {
            package_provided_host: "/a".into(),
            package_provided_target: None,
            vdb: vec![],
            host_tools: None,
            links: BTreeMap::new(),
            digest: String::new(),
        };
        spec.build_root = Some(root.clone());
        assert!(Target::new("x".parse().unwrap(), spec.clone()).is_err(), "a build root needs its digest");
        spec.build_root = Some(BuildRootSpec { digest: "1".repeat(64), ..root.clone() });
        let b = Target::new("x".parse().unwrap(), spec.clone()).unwrap();
        spec.build_root = Some(BuildRootSpec { digest: "2".repeat(64), package_provided_host: "/b".into(), ..root });
        let c = Target::new("x".parse().unwrap(), spec).unwrap();
        assert_ne!(b.hash(), a.hash());
        assert_ne!(b.hash(), c.hash(), "the preparation's inputs move the target");
    }

    #[test]
    fn rejects_newlines_and_bad_env() {
        let mut spec = Target::builtin_default().spec;
        spec.cflags = "-O2\nprofile:evil".into();
        assert!(Target::new("x".parse().unwrap(), spec.clone()).is_err());
        spec.cflags = "-O2".into();
        spec.env.insert("lower".into(), "1".into());
        assert!(matches!(Target::new("x".parse().unwrap(), spec), Err(TargetError::BadEnvName { .. })));
    }

    #[test]
    fn target_names() {
        assert!("amd64-v3".parse::<TargetName>().is_ok());
        for bad in ["", "Default", "-x", "a/b", "a b", "é"] {
            assert!(bad.parse::<TargetName>().is_err(), "{bad}");
        }
    }
}
