//! The tree index of a target: for every ebuild of the target's repository
//! snapshot, its SLOT, IUSE, the IUSE flags enabled by default under the
//! target's profile, and the IUSE flags the profile masks and forces —
//! computed by portage itself on a worker (pacloud-worker `tree_index`) and
//! stored as the artifact `<target>/tree-index/<target hash>.json`.
//!
//! Its one decision, [`PackageUse::effective`], turns requested flags into
//! the effective USE a build sees (docs/key.md, key version 2): requested
//! flags over the profile's defaults, masked flags off, forced flags on,
//! restricted to IUSE; a flag outside IUSE, or a request to enable a masked
//! or disable a forced flag, is refused with the flag and the rule named.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::grammar::{Atom, UseSet, Version};
use crate::ports::{ArtifactPath, BadArtifactPath};
use crate::target::Target;

/// The `format` of the documents this crate reads.
pub const TREE_INDEX_FORMAT: &str = "pacloud-tree-index-v1";

/// One ebuild's USE facts under the target's profile. Every list is sorted
/// and a subset of `iuse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageUse {
    pub slot: String,
    /// IUSE names without `+`/`-` defaults (USE_EXPAND flags expanded, e.g.
    /// `python_targets_python3_12`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iuse: Vec<String>,
    /// IUSE flags on with an empty user configuration (portage's
    /// `PORTAGE_USE` ∩ IUSE): IUSE defaults, profile make.defaults and
    /// package.use, the target's make.conf USE, masks and forces applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    /// IUSE flags the profile masks for this ebuild (always off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<String>,
    /// IUSE flags the profile forces on for this ebuild (always on), masked
    /// ones excluded (portage lets a mask win over a force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced: Vec<String>,
}

/// Why requested flags cannot be applied to an ebuild: a client mistake,
/// named precisely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UseRefusal {
    #[error("flag \"{flag}\" is not in the IUSE of {cpv} (IUSE: {iuse})")]
    NotInIuse { flag: String, cpv: String, iuse: String },
    #[error(
        "flag \"{flag}\" is masked for {cpv} by the target's profile (use.mask / package.use.mask); it cannot be enabled"
    )]
    Masked { flag: String, cpv: String },
    #[error(
        "flag \"{flag}\" is forced on for {cpv} by the target's profile (use.force / package.use.force); it cannot be disabled"
    )]
    Forced { flag: String, cpv: String },
}

impl UseRefusal {
    pub fn flag(&self) -> &str {
        match self {
            UseRefusal::NotInIuse { flag, .. } | UseRefusal::Masked { flag, .. } | UseRefusal::Forced { flag, .. } => {
                flag
            }
        }
    }
}

/// `category/package-version`, formatted only when an error needs it.
pub struct Cpv<'a>(pub &'a Atom, pub &'a Version);

impl std::fmt::Display for Cpv<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

fn has(sorted: &[String], flag: &str) -> bool {
    sorted.binary_search_by(|f| f.as_str().cmp(flag)).is_ok()
}

impl PackageUse {
    /// The effective USE for `requested` (see the module doc): every IUSE
    /// flag with its state, or the first flag that cannot be honoured.
    pub fn effective(&self, cpv: &dyn std::fmt::Display, requested: &UseSet) -> Result<UseSet, UseRefusal> {
        for (flag, on) in requested.iter() {
            if !has(&self.iuse, flag) {
                return Err(UseRefusal::NotInIuse {
                    flag: flag.to_owned(),
                    cpv: cpv.to_string(),
                    iuse: if self.iuse.is_empty() { "none".to_owned() } else { self.iuse.join(" ") },
                });
            }
            if on && has(&self.masked, flag) {
                return Err(UseRefusal::Masked { flag: flag.to_owned(), cpv: cpv.to_string() });
            }
            if !on && has(&self.forced, flag) {
                return Err(UseRefusal::Forced { flag: flag.to_owned(), cpv: cpv.to_string() });
            }
        }
        Ok(self.resolve(requested))
    }

    /// Effective USE without refusing: masks and forces win silently, flags
    /// outside IUSE are dropped. Used for what portage recorded of a build.
    pub fn resolve(&self, requested: &UseSet) -> UseSet {
        UseSet::from_states(self.iuse.iter().map(|f| {
            let on = if has(&self.masked, f) {
                false
            } else if has(&self.forced, f) {
                true
            } else {
                requested.get(f).unwrap_or_else(|| has(&self.on, f))
            };
            (f.clone(), on)
        }))
    }

    /// The effective USE of a binary package from the USE portage recorded
    /// in it (its enabled flags, implicit ones included).
    pub fn from_recorded(&self, recorded: &[String]) -> UseSet {
        UseSet::from_states(self.iuse.iter().map(|f| (f.clone(), recorded.iter().any(|r| r == f))))
    }
}

/// Why a tree index document cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TreeIndexError {
    #[error("tree index is not valid JSON of format {TREE_INDEX_FORMAT}")]
    Json(#[from] serde_json::Error),
    #[error("tree index has format {0:?}; this server reads {TREE_INDEX_FORMAT}")]
    Format(String),
    #[error("tree index is for target hash {found}, not {expected}")]
    WrongTarget { expected: String, found: String },
}

/// The stored document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeIndexDoc {
    pub format: String,
    pub target: String,
    pub target_hash: String,
    pub repository: String,
    /// Version of the portage that computed it.
    pub portage: String,
    pub ebuilds: u64,
    /// USE_EXPAND names, lower case (`python_targets`, `l10n`, ...).
    pub use_expand: Vec<String>,
    #[serde(default)]
    pub use_expand_hidden: Vec<String>,
    #[serde(default)]
    pub use_expand_unprefixed: Vec<String>,
    /// `category/package` → version → facts.
    pub packages: HashMap<String, HashMap<String, PackageUse>>,
}

/// Where a package is missing from the tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotInTree {
    #[error("{atom} is not in the tree of target {target}")]
    Package { atom: String, target: String },
    #[error("{atom}-{version} is not in the tree of target {target} (versions there: {known})")]
    Version { atom: String, version: String, target: String, known: String },
}

/// A loaded, validated tree index.
#[derive(Debug, Clone)]
pub struct TreeIndex {
    doc: TreeIndexDoc,
}

impl TreeIndex {
    /// Where a target's index is stored: `<target>/tree-index/<hash>.json`.
    pub fn path(target: &Target) -> Result<ArtifactPath, BadArtifactPath> {
        ArtifactPath::parse(&format!("{}/tree-index/{}.json", target.name, target.hash()))
    }

    /// Parses and checks a stored document for `target`.
    pub fn parse(bytes: &[u8], target: &Target) -> Result<TreeIndex, TreeIndexError> {
        let doc: TreeIndexDoc = serde_json::from_slice(bytes)?;
        TreeIndex::new(doc, target)
    }

    pub fn new(doc: TreeIndexDoc, target: &Target) -> Result<TreeIndex, TreeIndexError> {
        if doc.format != TREE_INDEX_FORMAT {
            return Err(TreeIndexError::Format(doc.format));
        }
        if doc.target_hash != target.hash() {
            return Err(TreeIndexError::WrongTarget { expected: target.hash().to_owned(), found: doc.target_hash });
        }
        Ok(TreeIndex { doc })
    }

    pub fn doc(&self) -> &TreeIndexDoc {
        &self.doc
    }

    /// The facts of `atom-version`, or where it is missing.
    pub fn get(&self, atom: &Atom, version: &Version) -> Result<&PackageUse, NotInTree> {
        let cp = atom.to_string();
        let versions = self
            .doc
            .packages
            .get(&cp)
            .ok_or_else(|| NotInTree::Package { atom: cp.clone(), target: self.doc.target.clone() })?;
        versions.get(version.as_str()).ok_or_else(|| {
            let mut known: Vec<&str> = versions.keys().map(String::as_str).collect();
            known.sort_unstable();
            NotInTree::Version {
                atom: cp.clone(),
                version: version.to_string(),
                target: self.doc.target.clone(),
                known: known.join(" "),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg() -> PackageUse {
        let v = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        PackageUse {
            slot: "0".into(),
            iuse: v("cli doc nls python_targets_python3_12 selinux ssl"),
            on: v("cli nls ssl"),
            masked: v("selinux"),
            forced: v("ssl"),
        }
    }

    fn eff(req: &str) -> Result<String, UseRefusal> {
        pkg().effective(&"app-misc/x-1", &UseSet::parse_str(req).unwrap()).map(|u| u.canonical())
    }

    #[test]
    fn same_configuration_however_written() {
        let want = "+cli -doc +nls -python_targets_python3_12 -selinux +ssl";
        for req in ["", "cli", "+cli", "cli -doc", "-selinux", "ssl nls", "doc -doc"] {
            assert_eq!(eff(req).unwrap(), want, "{req:?}");
        }
        assert_eq!(
            eff("-cli python_targets_python3_12").unwrap(),
            "-cli -doc +nls +python_targets_python3_12 -selinux +ssl"
        );
    }

    #[test]
    fn refusals_name_the_flag_and_rule() {
        let e = eff("cli nope").unwrap_err();
        assert!(matches!(&e, UseRefusal::NotInIuse { flag, .. } if flag == "nope"), "{e}");
        assert!(e.to_string().contains("IUSE: cli doc"), "{e}");
        let e = eff("selinux").unwrap_err();
        assert!(matches!(&e, UseRefusal::Masked { flag, .. } if flag == "selinux"));
        assert!(e.to_string().contains("use.mask"), "{e}");
        let e = eff("-ssl").unwrap_err();
        assert!(matches!(&e, UseRefusal::Forced { flag, .. } if flag == "ssl"));
        assert_eq!(e.flag(), "ssl");
    }

    #[test]
    fn recorded_use_restricted_to_iuse() {
        let rec: Vec<String> = ["amd64", "elibc_glibc", "cli", "ssl"].iter().map(|s| s.to_string()).collect();
        assert_eq!(pkg().from_recorded(&rec).canonical(), "+cli -doc -nls -python_targets_python3_12 -selinux +ssl");
    }

    #[test]
    fn lookup_and_checks() {
        let t = Target::builtin_default();
        let doc = serde_json::json!({
            "format": TREE_INDEX_FORMAT, "target": "default", "target_hash": t.hash(), "repository": "gentoo",
            "portage": "3.0.83", "ebuilds": 1, "use_expand": ["python_targets"],
            "packages": {"app-misc/hello": {"2.10-r1": {"slot": "0", "iuse": ["nls"], "on": ["nls"]}}}
        });
        let idx = TreeIndex::parse(doc.to_string().as_bytes(), &t).unwrap();
        let atom: Atom = "app-misc/hello".parse().unwrap();
        assert_eq!(idx.get(&atom, &"2.10-r1".parse().unwrap()).unwrap().on, vec!["nls".to_string()]);
        let e = idx.get(&atom, &"2.12".parse().unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "app-misc/hello-2.12 is not in the tree of target default (versions there: 2.10-r1)");
        assert!(matches!(
            idx.get(&"app-misc/nope".parse().unwrap(), &"1".parse().unwrap()),
            Err(NotInTree::Package { .. })
        ));
        let mut other = doc.clone();
        other["target_hash"] = "0".repeat(64).into();
        assert!(matches!(TreeIndex::parse(other.to_string().as_bytes(), &t), Err(TreeIndexError::WrongTarget { .. })));
        other["format"] = "v0".into();
        assert!(matches!(TreeIndex::parse(other.to_string().as_bytes(), &t), Err(TreeIndexError::Format(_))));
        assert_eq!(TreeIndex::path(&t).unwrap().as_str(), format!("default/tree-index/{}.json", t.hash()));
    }
}
