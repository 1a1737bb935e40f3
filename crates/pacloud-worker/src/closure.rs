//! The names a build's dependency graph can reach, found without portage.
//!
//! Portage loads the whole `Packages` index of a build's PKGDIR and stats
//! the file of every entry, so a build that sees the whole store pays for
//! the store's size. [`reach`] computes a superset of the package names
//! (`category/pn`) the graph of one request can contain: starting from the
//! requested name, every atom written in the ebuilds of a reached name
//! (all versions, with the eclasses they inherit, every `*DEPEND` whatever
//! its USE conditional) and in the `*DEPEND` fields of the index entries of
//! a reached name (a binary's recorded dependencies) is reached too, to a
//! fixpoint. The build then sees only the index entries of those names, so
//! its cost follows its dependencies, not the store.
//!
//! It is a textual over-approximation on purpose: a name that is reached
//! but not used only costs one index entry and a placeholder; a name the
//! scan missed would make portage build that dependency from source
//! instead of using its binary (slower, never wrong: the build step is the
//! same, and publishing keeps another build's file on a BUILD_ID clash).
//! Scanning reads O(reached packages) files, never the whole repository.
//!
//! [`Reach::needs_fetch`] says whether the fetch step can contribute
//! anything: the worker only admits distfiles listed in a reached
//! package's Manifest, so when every such file is already in the shared
//! cache (and no reached ebuild sets `SRC_URI` without any Manifest entry,
//! which the fetch step reports clearly), there is nothing to download.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;

use crate::pkgindex::{PackageEntry, PackageIndex};

/// Index fields holding a binary package's dependencies.
const DEP_FIELDS: [&str; 5] = ["BDEPEND", "DEPEND", "IDEPEND", "PDEPEND", "RDEPEND"];

/// What [`reach`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    /// `category/pn` of every package the graph can contain.
    pub names: BTreeSet<String>,
    /// Some reached package may have a source to download.
    pub needs_fetch: bool,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')
}

fn plain_name(cat: &str, pn: &str) -> bool {
    !cat.is_empty()
        && !pn.is_empty()
        && cat.chars().all(is_name_char)
        && pn.chars().all(is_name_char)
        && !cat.starts_with(['-', '.'])
        && !pn.starts_with(['-', '.'])
}

/// The package names (`category/pn`) written in `text`: dependency strings
/// or whole ebuilds. Operators, blockers, versions, slots and USE
/// dependencies are stripped; tokens that cannot be a name are skipped.
pub fn atom_names(text: &str, out: &mut BTreeSet<String>) {
    let tokens = text.split(|c: char| !(is_name_char(c) || matches!(c, '/' | '<' | '>' | '=' | '~' | '!' | '*')));
    for token in tokens {
        let t = token.trim_start_matches('!');
        let versioned = t.starts_with(['<', '>', '=', '~']);
        let t = t.trim_start_matches(['<', '>', '=', '~']).trim_end_matches('*');
        let Some((cat, rest)) = t.split_once('/') else { continue };
        if rest.contains('/') {
            continue;
        }
        if let Ok((atom, _)) = pacloud_domain::grammar::parse_versioned_atom(t) {
            out.insert(atom.to_string());
            if versioned {
                continue;
            }
        }
        if plain_name(cat, rest) {
            out.insert(format!("{cat}/{rest}"));
        }
    }
}

/// The eclasses named on `inherit` lines of `text`.
fn inherits(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("inherit ") {
            for w in rest.split_whitespace() {
                if w.starts_with('#') {
                    break;
                }
                if w.chars().all(is_name_char) {
                    out.push(w.to_owned());
                }
            }
        }
    }
    out
}

/// The names reachable from `start` (`category/pn`) in `repo` and `index`;
/// `cached(file)` says whether a distfile is in the shared cache already.
pub fn reach(repo: &Path, index: &PackageIndex, start: &str, cached: &dyn Fn(&str) -> bool) -> Reach {
    let mut by_name: HashMap<String, Vec<&PackageEntry>> = HashMap::new();
    for e in &index.packages {
        if let Some(cpv) = e.cpv()
            && let Ok((atom, _)) = pacloud_domain::grammar::parse_versioned_atom(cpv)
        {
            by_name.entry(atom.to_string()).or_default().push(e);
        }
    }
    let mut eclasses: BTreeMap<String, (BTreeSet<String>, bool)> = BTreeMap::new();
    let mut out = Reach::default();
    let mut queue = VecDeque::from([start.to_owned()]);
    while let Some(name) = queue.pop_front() {
        if !out.names.insert(name.clone()) {
            continue;
        }
        let mut found = BTreeSet::new();
        for e in by_name.get(&name).into_iter().flatten() {
            for f in DEP_FIELDS {
                if let Some(v) = e.get(f) {
                    atom_names(v, &mut found);
                }
            }
        }
        let dir = repo.join(&name);
        let mut sets_src = false;
        for ent in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = ent.path();
            if p.extension().is_none_or(|x| x != "ebuild") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&p) else { continue };
            atom_names(&text, &mut found);
            sets_src |= text.contains("SRC_URI=");
            for ec in inherits(&text) {
                let (names, src) = eclass(repo, &ec, &mut eclasses);
                found.extend(names);
                sets_src |= src;
            }
        }
        let dist: Vec<String> = std::fs::read_to_string(dir.join("Manifest"))
            .map(|t| crate::fetch::parse_manifest(&t).into_keys().collect())
            .unwrap_or_default();
        if (sets_src && dist.is_empty()) || dist.iter().any(|f| !cached(f)) {
            out.needs_fetch = true;
        }
        queue.extend(found.into_iter().filter(|n| !out.names.contains(n)));
    }
    out
}

/// The names an eclass (and the eclasses it inherits) writes, and whether
/// it sets `SRC_URI`; memoised in `seen` (which also stops inherit cycles).
fn eclass(repo: &Path, name: &str, seen: &mut BTreeMap<String, (BTreeSet<String>, bool)>) -> (BTreeSet<String>, bool) {
    if let Some(v) = seen.get(name) {
        return v.clone();
    }
    seen.insert(name.to_owned(), (BTreeSet::new(), false));
    let text = std::fs::read_to_string(repo.join("eclass").join(format!("{name}.eclass"))).unwrap_or_default();
    let mut names = BTreeSet::new();
    atom_names(&text, &mut names);
    let mut src = text.contains("SRC_URI=");
    for ec in inherits(&text) {
        let (n, s) = eclass(repo, &ec, seen);
        names.extend(n);
        src |= s;
    }
    seen.insert(name.to_owned(), (names.clone(), src));
    (names, src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_dependency_strings() {
        let mut out = BTreeSet::new();
        atom_names(
            "DEPEND=\">=dev-libs/foo-1.2-r1:0=[bar,-baz] !!app-misc/old ssl? ( dev-libs/openssl:= ) \
             ~sys-apps/x-2* virtual/pkgconfig\"\ninsinto /usr/share/${PN}",
            &mut out,
        );
        let want: BTreeSet<String> =
            ["app-misc/old", "dev-libs/foo", "dev-libs/openssl", "sys-apps/x", "virtual/pkgconfig"]
                .map(String::from)
                .into();
        assert_eq!(out, want);
    }

    #[test]
    fn reach_follows_ebuilds_eclasses_and_binaries_only() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        let ebuild = |cp: &str, body: &str| {
            let d = repo.join(cp);
            std::fs::create_dir_all(&d).unwrap();
            let pn = cp.split('/').nth(1).unwrap();
            std::fs::write(d.join(format!("{pn}-1.0.ebuild")), format!("EAPI=8\n{body}\n")).unwrap();
        };
        ebuild("app-misc/a", "inherit e1\nDEPEND=\"foo? ( app-misc/b )\"");
        ebuild("app-misc/b", "RDEPEND=\">=app-misc/c-2\"");
        ebuild("app-misc/c", "");
        ebuild("app-misc/unrelated", "DEPEND=\"app-misc/a\"");
        ebuild("app-misc/src", "SRC_URI=\"https://example.invalid/s.txt\"");
        std::fs::create_dir_all(repo.join("eclass")).unwrap();
        std::fs::write(repo.join("eclass/e1.eclass"), "inherit e2\n").unwrap();
        std::fs::write(repo.join("eclass/e2.eclass"), "inherit e1\nBDEPEND=\"dev-util/tool\"\n").unwrap();
        // A binary of c records a dependency its ebuild no longer has.
        let mut bin = PackageEntry::default();
        bin.fields.insert("CPV".into(), "app-misc/c-1.0".into());
        bin.fields.insert("RDEPEND".into(), "dev-libs/old-dep".into());
        let index = PackageIndex { header: Default::default(), packages: vec![bin] };
        let r = reach(repo, &index, "app-misc/a", &|_| false);
        let want: BTreeSet<String> =
            ["app-misc/a", "app-misc/b", "app-misc/c", "dev-libs/old-dep", "dev-util/tool"].map(String::from).into();
        assert_eq!(r.names, want);
        assert!(!r.needs_fetch, "nothing reached has a source");

        // A source in the Manifest: fetch unless cached.
        ebuild("app-misc/b", "RDEPEND=\"app-misc/src\"");
        std::fs::write(repo.join("app-misc/src/Manifest"), "DIST s.txt 6 SHA512 00\n").unwrap();
        assert!(reach(repo, &index, "app-misc/a", &|_| false).needs_fetch);
        assert!(!reach(repo, &index, "app-misc/a", &|f| f == "s.txt").needs_fetch);
        // SRC_URI without any Manifest entry: the fetch step reports it.
        std::fs::write(repo.join("app-misc/src/Manifest"), "").unwrap();
        assert!(reach(repo, &index, "app-misc/a", &|_| true).needs_fetch);
    }
}
