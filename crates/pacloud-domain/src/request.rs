//! A build request as a client sends it, validated into a [`BuildSpec`]:
//! the atom, version, normalised USE and the resolved target. Validation
//! errors name the field and the rule they broke.

use serde::{Deserialize, Serialize};

use crate::grammar::{Atom, AtomError, GrammarError, UseSet, Version};
use crate::key::{BuildKey, KeyVersion};
use crate::target::{TargetName, TargetSet};

/// A client mistake: which field, and what rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError { field: field.into(), message: message.into() }
    }
}

/// Raw request fields, before validation.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    pub atom: String,
    pub version: String,
    /// Flag strings; each may hold several whitespace-separated flags.
    pub use_flags: Vec<String>,
    pub target: Option<String>,
}

/// A validated request: everything a build needs to know, and its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub atom: Atom,
    pub version: Version,
    #[serde(rename = "use")]
    pub use_flags: UseSet,
    pub target: TargetName,
    pub target_hash: String,
    /// The key encoding; version 2 specs hold the effective USE (every IUSE
    /// flag with its state). Absent in records and jobs made before it: 1.
    #[serde(default, skip_serializing_if = "KeyVersion::is_v1")]
    pub key_version: KeyVersion,
}

impl BuildSpec {
    pub fn key(&self) -> BuildKey {
        BuildKey::compute_of(self.key_version, &self.target_hash, &self.atom, &self.version, &self.use_flags)
    }
    /// `=category/package-version`, the atom portage is asked to build.
    pub fn portage_atom(&self) -> String {
        format!("={}-{}", self.atom, self.version)
    }
}

/// Why a request cannot become a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("unknown target {0:?}")]
    UnknownTarget(String),
}

fn describe(e: &GrammarError, what: &str, value: &str) -> String {
    let shown: String = value.chars().take(80).flat_map(char::escape_default).collect();
    format!("{what} \"{shown}\" {e}")
}

impl BuildRequest {
    /// Validates every field and resolves the target.
    pub fn validate(&self, targets: &TargetSet) -> Result<BuildSpec, SpecError> {
        let atom: Atom = self.atom.parse().map_err(|e: AtomError| {
            let (what, part) = match &e {
                AtomError::Form(g) => ("atom", g),
                AtomError::Category(g) => ("category of", g),
                AtomError::Package(g) => ("package name of", g),
            };
            ValidationError::new("atom", describe(part, what, &self.atom))
        })?;
        let version: Version = self
            .version
            .parse()
            .map_err(|e| ValidationError::new("version", describe(&e, "version", &self.version)))?;
        let use_flags = UseSet::parse_list(&self.use_flags).map_err(|(i, e)| {
            let item = self.use_flags.get(i).map(String::as_str).unwrap_or("");
            ValidationError::new("use", describe(&e, &format!("use[{i}]"), item))
        })?;
        let target = match &self.target {
            None => targets.default_name().clone(),
            Some(t) => {
                t.parse::<TargetName>().map_err(|e| ValidationError::new("target", describe(&e, "target", t)))?
            }
        };
        let t = targets.get(&target).ok_or_else(|| SpecError::UnknownTarget(target.to_string()))?;
        Ok(BuildSpec {
            atom,
            version,
            use_flags,
            target,
            target_hash: t.hash().to_owned(),
            key_version: KeyVersion::V1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(atom: &str, version: &str, use_flags: &[&str], target: Option<&str>) -> BuildRequest {
        BuildRequest {
            atom: atom.into(),
            version: version.into(),
            use_flags: use_flags.iter().map(|s| s.to_string()).collect(),
            target: target.map(Into::into),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let t = TargetSet::builtin();
        let field = |r: BuildRequest| match r.validate(&t) {
            Err(SpecError::Invalid(v)) => v.field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(req("bad", "1", &[], None)), "atom");
        assert_eq!(field(req("a/b", "x", &[], None)), "version");
        assert_eq!(field(req("a/b", "1", &["ok", "b;ad"], None)), "use");
        assert_eq!(field(req("a/b", "1", &[], Some("Bad"))), "target");
        assert_eq!(req("a/b", "1", &[], Some("nope")).validate(&t), Err(SpecError::UnknownTarget("nope".into())));
        let msg = req("a/b", "1", &["ok", "b;ad"], None).validate(&t).unwrap_err().to_string();
        assert!(msg.contains("use[1]") && msg.contains("';'"), "{msg}");
    }

    #[test]
    fn default_target_applies() {
        let t = TargetSet::builtin();
        let s = req("app-misc/hello", "2.12-r1", &["foo -bar"], None).validate(&t).unwrap();
        assert_eq!(s.target.as_str(), "default");
        assert_eq!(s.portage_atom(), "=app-misc/hello-2.12-r1");
        assert_eq!(s, req("app-misc/hello", "2.12-r1", &["-bar", "foo"], Some("default")).validate(&t).unwrap());
    }
}
