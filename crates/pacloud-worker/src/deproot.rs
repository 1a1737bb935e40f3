//! Dependency roots: the ROOT of a finished build, kept by the worker and
//! copied under a later build's ROOT, so that build does not merge again
//! the binary packages it shares with the earlier one.
//!
//! Why: portage merges a binary dependency through about ten bash phase
//! processes whatever FEATURES say (docs/benchmarks.md, "Where a binary
//! dependency's time goes"); a build whose dependencies are already
//! installed costs what a leaf costs.
//!
//! Correctness rests on four checks, each conservative (a failed check
//! costs speed, never a wrong binary):
//!
//! 1. **Kept only when clean** ([`verify`]): after a successful build every
//!    file, symlink and directory under ROOT must be recorded in the
//!    `CONTENTS` of an installed package (regular files by MD5 and mtime,
//!    symlinks by target), or be one of the few files portage itself
//!    regenerates from the installed packages (env-update's outputs, its
//!    counter and locks). Portage's own sandbox is off inside ours, so a
//!    source build could have written anywhere in ROOT; a `pkg_postinst`
//!    that created files also makes the ROOT unclean. Such ROOTs are not kept.
//! 2. **Picked only when it can be part of the graph** ([`DepRoots::pick`]):
//!    same target (hash), every installed name reachable from the request
//!    ([`crate::closure::reach`]), the requested name itself not installed,
//!    and every installed instance (cpv and BUILD_TIME) still published in
//!    the target's index.
//! 3. **Resolved as a fresh ROOT would be**: the build runs with `--update
//!    --deep --newuse --rebuilt-binaries`, so an installed dependency that is
//!    not the instance portage would pick now (a newer version, other USE, a
//!    rebuilt binary) is replaced by that instance, as in an empty ROOT.
//! 4. **No extra packages** ([`extras`]): after the build, every installed
//!    package must be reachable from the requested one through the installed
//!    packages' recorded (USE-reduced) dependencies. An extra package could
//!    change the build (a configure script that finds it); then the result
//!    is dropped and the build runs again in an empty ROOT.
//!
//! Architecture invariant: a ROOT is reused only after [`verify`] found
//! nothing in it that portage did not record, and a build in a reused ROOT
//! is published only after [`extras`] found nothing its graph did not need.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::pkgindex::PackageIndex;

/// Where under the work root the kept roots live.
pub const DEP_ROOTS_DIR: &str = ".deproots";

/// The emerge options of a build in a reused ROOT (check 3 above).
pub const REUSE_OPTIONS: [&str; 4] = ["--update", "--deep", "--newuse", "--rebuilt-binaries"];

/// Files portage writes into ROOT itself on every merge, derived from the
/// installed packages or bookkeeping, allowed in a kept ROOT: env-update's
/// outputs (portage/util/env_update.py: from `etc/env.d`, `ldconfig -r`),
/// the GNU info index (portage/util/_info_files.py: `install-info` over the
/// installed info pages; `dir` and compressed variants), vdb's counter.
const PORTAGE_FILES: [&str; 12] = [
    "etc/ld.so.conf",
    "usr/etc/ld.so.conf",
    "etc/profile.env",
    "etc/csh.env",
    "etc/environment.d/10-gentoo-env.conf",
    "etc/ld.so.cache",
    "usr/share/info/dir",
    "usr/share/info/dir.gz",
    "usr/share/info/dir.bz2",
    "usr/share/info/dir.xz",
    "usr/share/info/dir.zst",
    "var/cache/edb/counter",
];

/// Directories portage creates in every ROOT (`config._init_dirs`, env-update); their
/// content is checked like the rest.
const PORTAGE_EMPTY_DIRS: [&str; 3] = ["tmp", "var/tmp", "etc/env.d"];

/// Directories whose whole content is portage's bookkeeping.
const PORTAGE_DIRS: [&str; 3] = ["var/db/pkg", "var/cache/edb", "var/lib/portage"];

/// Why a ROOT is not kept.
#[derive(Debug, thiserror::Error)]
pub enum Unclean {
    #[error("{0} is not recorded in any installed package's CONTENTS")]
    Unrecorded(String),
    #[error("{path} differs from its CONTENTS record ({what})")]
    Modified { path: String, what: &'static str },
    #[error("{0} is recorded in CONTENTS but missing")]
    Missing(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A package installed in a ROOT (its vdb entry).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Installed {
    /// `category/pn`.
    pub name: String,
    /// `category/pf` (e.g. `app-misc/chain-e-1.0`).
    pub cpv: String,
    /// The build's BUILD_TIME (identifies the binary it came from).
    pub build_time: Option<String>,
    /// Recorded dependencies (USE-reduced), all `*DEPEND` fields joined.
    #[serde(skip)]
    pub deps: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Unclean + '_ {
    move |source| Unclean::Io { path: path.to_owned(), source }
}

fn read_opt(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

/// The packages installed in `root` (`root/var/db/pkg/<category>/<pf>`).
pub fn installed(root: &Path) -> std::io::Result<Vec<Installed>> {
    let vdb = root.join("var/db/pkg");
    let mut out = Vec::new();
    let cats = match std::fs::read_dir(&vdb) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for cat in cats {
        let cat = cat?;
        if !cat.file_type()?.is_dir() {
            continue;
        }
        for pkg in std::fs::read_dir(cat.path())? {
            let pkg = pkg?;
            let dir = pkg.path();
            if !pkg.file_type()?.is_dir() || pkg.file_name().to_string_lossy().starts_with('-') {
                continue;
            }
            let category = cat.file_name().to_string_lossy().into_owned();
            let pf = pkg.file_name().to_string_lossy().into_owned();
            let cpv = format!("{category}/{pf}");
            let name = match pacloud_domain::grammar::parse_versioned_atom(&cpv) {
                Ok((atom, _)) => atom.to_string(),
                Err(_) => continue,
            };
            let deps = ["BDEPEND", "DEPEND", "IDEPEND", "PDEPEND", "RDEPEND"]
                .iter()
                .filter_map(|f| read_opt(&dir.join(f)))
                .collect::<Vec<_>>()
                .join(" ");
            out.push(Installed { name, cpv, build_time: read_opt(&dir.join("BUILD_TIME")), deps });
        }
    }
    out.sort_by(|a, b| a.cpv.cmp(&b.cpv));
    Ok(out)
}

/// The names a (USE-reduced) dependency string needs; blockers excluded.
fn needed_names(deps: &str) -> BTreeSet<String> {
    let kept: Vec<&str> = deps.split_whitespace().filter(|t| !t.starts_with('!')).collect();
    let mut out = BTreeSet::new();
    crate::closure::atom_names(&kept.join(" "), &mut out);
    out
}

/// Installed packages that nothing reachable from `requested` (`category/pn`)
/// depends on (check 4): an empty list when the ROOT holds only its graph.
pub fn extras(packages: &[Installed], requested: &str) -> Vec<String> {
    let by_name: HashMap<&str, &Installed> = packages.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut queue = vec![requested.to_owned()];
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(p) = by_name.get(name.as_str()) {
            queue.extend(needed_names(&p.deps).into_iter().filter(|n| !seen.contains(n)));
        }
    }
    packages.iter().filter(|p| !seen.contains(&p.name)).map(|p| p.cpv.clone()).collect()
}

/// One `CONTENTS` record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Dir,
    Obj { md5: String, mtime: i64 },
    Sym { target: String },
    Other,
}

/// Parses a `CONTENTS` file into `path (relative to ROOT) -> record`.
fn parse_contents(text: &str, out: &mut BTreeMap<String, Record>) {
    for line in text.lines() {
        let Some((kind, rest)) = line.split_once(' ') else { continue };
        match kind {
            "dir" => {
                out.insert(rest.trim_start_matches('/').to_owned(), Record::Dir);
            }
            "obj" => {
                // obj <path> <md5> <mtime>; the path may contain spaces.
                let mut parts = rest.rsplitn(3, ' ');
                let (Some(mtime), Some(md5), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let Ok(mtime) = mtime.parse() else { continue };
                out.insert(path.trim_start_matches('/').to_owned(), Record::Obj { md5: md5.to_owned(), mtime });
            }
            "sym" => {
                // sym <path> -> <target> <mtime> (the target is what is checked)
                let Some((path, rest)) = rest.split_once(" -> ") else { continue };
                let Some((target, _mtime)) = rest.rsplit_once(' ') else { continue };
                out.insert(path.trim_start_matches('/').to_owned(), Record::Sym { target: target.to_owned() });
            }
            _ => {
                out.insert(rest.trim_start_matches('/').to_owned(), Record::Other);
            }
        }
    }
}

fn md5_file(p: &Path) -> std::io::Result<String> {
    let mut h = <md5::Md5 as md5::Digest>::new();
    std::io::copy(&mut std::fs::File::open(p)?, &mut h)?;
    Ok(hex::encode(md5::Digest::finalize(h)))
}

fn mtime_secs(m: &std::fs::Metadata) -> i64 {
    std::os::unix::fs::MetadataExt::mtime(m)
}

/// A clean ROOT's installed packages and the bytes of its files.
#[derive(Debug, Clone)]
pub struct Verified {
    pub packages: Vec<Installed>,
    pub bytes: u64,
}

/// Check 1: everything under `root` is recorded by an installed package or
/// is portage's own bookkeeping.
pub fn verify(root: &Path) -> Result<Verified, Unclean> {
    let packages = installed(root).map_err(io(root))?;
    let mut records = BTreeMap::new();
    for p in &packages {
        let file = root.join("var/db/pkg").join(&p.cpv).join("CONTENTS");
        let text = std::fs::read_to_string(&file).map_err(io(&file))?;
        parse_contents(&text, &mut records);
    }
    // Directories that hold something recorded (or portage's files).
    let mut parents: BTreeSet<String> = BTreeSet::new();
    parents.extend(PORTAGE_EMPTY_DIRS.map(String::from));
    for path in records.keys().map(String::as_str).chain(PORTAGE_FILES).chain(PORTAGE_DIRS).chain(PORTAGE_EMPTY_DIRS) {
        let mut p = Path::new(path);
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            parents.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    let mut seen = BTreeSet::new();
    let mut bytes = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for ent in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let ent = ent.map_err(io(&dir))?;
            let rel = rel.join(ent.file_name());
            let key = rel.to_string_lossy().into_owned();
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            if PORTAGE_DIRS.contains(&key.as_str()) {
                continue;
            }
            if meta.is_dir() {
                if !matches!(records.get(&key), Some(Record::Dir)) && !parents.contains(&key) {
                    return Err(Unclean::Unrecorded(format!("/{key}/")));
                }
                stack.push(rel);
                continue;
            }
            if meta.is_file() {
                bytes += meta.len();
            }
            if PORTAGE_FILES.contains(&key.as_str()) || is_portage_lock(&key) {
                continue;
            }
            match records.get(&key) {
                Some(Record::Obj { md5, mtime }) if meta.is_file() => {
                    if mtime_secs(&meta) != *mtime {
                        return Err(Unclean::Modified { path: format!("/{key}"), what: "mtime" });
                    }
                    if md5_file(&path).map_err(io(&path))? != *md5 {
                        return Err(Unclean::Modified { path: format!("/{key}"), what: "MD5" });
                    }
                }
                Some(Record::Sym { target }) if meta.file_type().is_symlink() => {
                    let t = std::fs::read_link(&path).map_err(io(&path))?;
                    if t.to_string_lossy() != *target {
                        return Err(Unclean::Modified { path: format!("/{key}"), what: "symlink target" });
                    }
                }
                Some(Record::Other) => {}
                Some(_) => return Err(Unclean::Modified { path: format!("/{key}"), what: "file type" }),
                None => return Err(Unclean::Unrecorded(format!("/{key}"))),
            }
            seen.insert(key);
        }
    }
    for (path, r) in &records {
        if matches!(r, Record::Obj { .. } | Record::Sym { .. }) && !seen.contains(path) {
            return Err(Unclean::Missing(format!("/{path}")));
        }
    }
    Ok(Verified { packages, bytes })
}

/// Portage's lock files (`.<name>.portage_lockfile`) next to what it locks.
fn is_portage_lock(rel: &str) -> bool {
    Path::new(rel).file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n.starts_with('.') && n.ends_with(".portage_lockfile")
    })
}

/// What is recorded next to a kept ROOT.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// The target's hash: a ROOT is only ever reused for the same target.
    pub target: String,
    pub packages: Vec<Installed>,
    /// Bytes of its files (the size budget counts them).
    #[serde(default)]
    pub bytes: u64,
}

/// A kept ROOT chosen for a build.
#[derive(Debug, Clone)]
pub struct Picked {
    pub id: String,
    pub root: PathBuf,
    pub meta: Meta,
}

impl Picked {
    /// Copies the kept ROOT into a build's (empty) ROOT; reflinks where the
    /// filesystem can.
    pub async fn restore(&self, dest: &Path) -> Result<(), RestoreError> {
        let argv = [
            "cp".to_owned(),
            "-a".to_owned(),
            "--reflink=auto".to_owned(),
            "--".to_owned(),
            format!("{}/.", self.root.display()),
            format!("{}/", dest.display()),
        ];
        crate::runner::run_checked(&argv).await?;
        Ok(())
    }
}

/// Why a kept ROOT could not be laid under a build's ROOT.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("copying the kept ROOT failed: {0}")]
    Copy(#[from] crate::runner::CommandError),
}

/// The worker's kept ROOTs: `<dir>/<id>/{meta.json,root/}`, at most
/// `max_entries` and `max_bytes` in all, least recently used pruned first.
#[derive(Debug, Clone)]
pub struct DepRoots {
    pub dir: PathBuf,
    pub max_entries: usize,
    pub max_bytes: u64,
}

fn set_id(target: &str, packages: &[Installed]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(target.as_bytes());
    for p in packages {
        h.update(b"\0");
        h.update(p.cpv.as_bytes());
        h.update(b"\0");
        h.update(p.build_time.as_deref().unwrap_or("").as_bytes());
    }
    hex::encode(&h.finalize()[..12])
}

impl DepRoots {
    pub fn new(dir: PathBuf, max_entries: usize, max_bytes: u64) -> DepRoots {
        DepRoots { dir, max_entries, max_bytes }
    }

    fn entries(&self) -> Vec<(String, Meta, SystemTime)> {
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let id = ent.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            let meta_path = ent.path().join("meta.json");
            let Ok(bytes) = std::fs::read(&meta_path) else { continue };
            let Ok(meta) = serde_json::from_slice::<Meta>(&bytes) else { continue };
            let used = std::fs::metadata(&meta_path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((id, meta, used));
        }
        out
    }

    /// Check 2: the kept ROOT with the most packages that can all be part
    /// of the graph of `requested` (`category/pn`), or none.
    pub fn pick(
        &self,
        target: &str,
        requested: &str,
        reach: &BTreeSet<String>,
        index: &PackageIndex,
    ) -> Option<Picked> {
        let published: BTreeSet<(&str, Option<&str>)> =
            index.packages.iter().filter_map(|e| Some((e.cpv()?, e.get("BUILD_TIME")))).collect();
        let mut best: Option<(String, Meta, SystemTime)> = None;
        for (id, meta, used) in self.entries() {
            let usable = meta.target == target
                && !meta.packages.is_empty()
                && meta.packages.iter().all(|p| {
                    p.name != requested
                        && reach.contains(&p.name)
                        && published.contains(&(p.cpv.as_str(), p.build_time.as_deref()))
                });
            let better = best.as_ref().is_none_or(|(_, m, u)| (meta.packages.len(), used) > (m.packages.len(), *u));
            if usable && better {
                best = Some((id, meta, used));
            }
        }
        let (id, meta, _) = best?;
        let dir = self.dir.join(&id);
        // Mark it used (least recently used is pruned first).
        let _ = std::fs::File::options()
            .append(true)
            .open(dir.join("meta.json"))
            .and_then(|f| f.set_modified(SystemTime::now()));
        Some(Picked { id, root: dir.join("root"), meta })
    }

    /// Forgets a kept ROOT (it misled a build).
    pub fn forget(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.dir.join(id));
    }

    /// Check 1, then keeps the finished build's `root` (moved, not copied:
    /// the build's work directory is discarded anyway). Returns the kept
    /// id, or why not.
    pub fn keep(&self, target: &str, root: &Path) -> Result<Option<String>, Unclean> {
        let Verified { packages, bytes } = verify(root)?;
        if packages.is_empty() {
            return Ok(None);
        }
        let id = set_id(target, &packages);
        let final_dir = self.dir.join(&id);
        if final_dir.is_dir() {
            return Ok(None);
        }
        let staging = self.dir.join(format!(".{id}.{}", std::process::id()));
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        std::fs::rename(root, staging.join("root")).map_err(io(root))?;
        let meta = Meta { target: target.to_owned(), packages, bytes };
        let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        std::fs::write(staging.join("meta.json"), json).map_err(io(&staging))?;
        if std::fs::rename(&staging, &final_dir).is_err() {
            // Another slot kept the same set first.
            let _ = std::fs::remove_dir_all(&staging);
            return Ok(None);
        }
        self.prune();
        Ok(Some(id))
    }

    /// Keeps the most recently used ROOTs within `max_entries` and
    /// `max_bytes` (a ROOT larger than the budget is not kept at all).
    pub fn prune(&self) {
        let mut entries = self.entries();
        entries.sort_by_key(|e| std::cmp::Reverse(e.2));
        let (mut count, mut total) = (0usize, 0u64);
        for (id, meta, _) in entries {
            if count < self.max_entries && total.saturating_add(meta.bytes) <= self.max_bytes {
                count += 1;
                total += meta.bytes;
            } else {
                self.forget(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pkgindex::PackageEntry;

    /// Writes a vdb entry and installs its files (as portage would).
    fn install(root: &Path, cpv: &str, deps: &str, files: &[(&str, &str)]) {
        let vdb = root.join("var/db/pkg").join(cpv);
        std::fs::create_dir_all(&vdb).unwrap();
        std::fs::write(vdb.join("RDEPEND"), format!("{deps}\n")).unwrap();
        std::fs::write(vdb.join("BUILD_TIME"), "1700000000\n").unwrap();
        let mut contents = String::new();
        for (path, text) in files {
            let p = root.join(path.trim_start_matches('/'));
            let parent = p.parent().unwrap();
            std::fs::create_dir_all(parent).unwrap();
            let rel_parent = Path::new(path).parent().unwrap();
            contents.push_str(&format!("dir {}\n", rel_parent.display()));
            std::fs::write(&p, text).unwrap();
            use md5::Digest;
            let md5 = hex::encode(md5::Md5::digest(text.as_bytes()));
            let mtime = mtime_secs(&std::fs::metadata(&p).unwrap());
            contents.push_str(&format!("obj {path} {md5} {mtime}\n"));
        }
        std::fs::write(vdb.join("CONTENTS"), contents).unwrap();
    }

    #[test]
    fn verify_accepts_recorded_files_and_portage_bookkeeping_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        install(root, "app-misc/e-1.0", "", &[("/usr/share/e/data file.txt", "e")]);
        install(root, "app-misc/d-1.0", "app-misc/e", &[("/usr/share/d/data.txt", "d")]);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/profile.env"), "export X=1\n").unwrap();
        std::fs::create_dir_all(root.join("var/cache/edb")).unwrap();
        std::fs::write(root.join("var/cache/edb/counter"), "2").unwrap();
        std::fs::write(root.join("var/db/pkg/.pkg.portage_lockfile"), "").unwrap();
        let Verified { packages, bytes } = verify(root).expect("clean");
        assert_eq!(bytes, 2 + 11, "the two installed files and profile.env (var/db/pkg, var/cache/edb not walked)");
        assert_eq!(packages.iter().map(|p| p.cpv.as_str()).collect::<Vec<_>>(), ["app-misc/d-1.0", "app-misc/e-1.0"]);
        assert_eq!(packages[0].name, "app-misc/d");
        assert_eq!(packages[0].build_time.as_deref(), Some("1700000000"));

        // A stray file (a source build writing into ROOT).
        std::fs::write(root.join("usr/share/d/stray"), "x").unwrap();
        assert!(matches!(verify(root), Err(Unclean::Unrecorded(p)) if p == "/usr/share/d/stray"));
        std::fs::remove_file(root.join("usr/share/d/stray")).unwrap();
        // A stray directory.
        std::fs::create_dir_all(root.join("opt/x")).unwrap();
        assert!(matches!(verify(root), Err(Unclean::Unrecorded(p)) if p == "/opt/"));
        std::fs::remove_dir_all(root.join("opt")).unwrap();
        // An installed file changed in place (same mtime, other content).
        let f = root.join("usr/share/e/data file.txt");
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, "E").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        assert!(matches!(verify(root), Err(Unclean::Modified { what: "MD5", .. })));
        std::fs::write(&f, "e").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        verify(root).expect("clean again");
        // A recorded file removed.
        std::fs::remove_file(root.join("usr/share/d/data.txt")).unwrap();
        assert!(matches!(verify(root), Err(Unclean::Missing(p)) if p == "/usr/share/d/data.txt"));
    }

    #[test]
    fn extras_are_installed_packages_the_request_does_not_reach() {
        let p = |cpv: &str, deps: &str| Installed {
            name: pacloud_domain::grammar::parse_versioned_atom(cpv).unwrap().0.to_string(),
            cpv: cpv.into(),
            build_time: None,
            deps: deps.into(),
        };
        let pkgs = vec![
            p("app-misc/a-1.0", ">=app-misc/b-1:0= !app-misc/blocked"),
            p("app-misc/b-1.0", "app-misc/c"),
            p("app-misc/c-2", ""),
            p("app-misc/blocked-1", ""),
            p("app-misc/stale-1", "app-misc/c"),
        ];
        assert_eq!(extras(&pkgs, "app-misc/a"), ["app-misc/blocked-1", "app-misc/stale-1"]);
        assert_eq!(extras(&pkgs[..3], "app-misc/a"), Vec::<String>::new());
    }

    #[test]
    fn pick_prefers_the_largest_usable_root_of_the_same_target() {
        let dir = tempfile::tempdir().unwrap();
        let roots = DepRoots::new(dir.path().join("kept"), 2, 1 << 20);
        let build = |cpvs: &[(&str, &str)]| {
            let root = dir.path().join(format!("root-{}", cpvs.len()));
            for (cpv, deps) in cpvs {
                install(&root, cpv, deps, &[]);
            }
            root
        };
        let e = roots.keep("t1", &build(&[("app-misc/e-1.0", "")])).unwrap().expect("kept");
        let de = roots.keep("t1", &build(&[("app-misc/d-1.0", "app-misc/e"), ("app-misc/e-1.0", "")])).unwrap();
        assert!(de.is_some());
        let entry = |cpv: &str| {
            let mut x = PackageEntry::default();
            x.fields.insert("CPV".into(), cpv.into());
            x.fields.insert("BUILD_TIME".into(), "1700000000".into());
            x
        };
        let index = PackageIndex {
            header: Default::default(),
            packages: vec![entry("app-misc/e-1.0"), entry("app-misc/d-1.0")],
        };
        let reach: BTreeSet<String> = ["app-misc/c", "app-misc/d", "app-misc/e"].map(String::from).into();
        let picked = roots.pick("t1", "app-misc/c", &reach, &index).expect("a root");
        assert_eq!(Some(picked.id.clone()), de);
        assert_eq!(picked.meta.packages.len(), 2);
        // Another target, the requested name installed, an unreachable or
        // unpublished package: the smaller root or none.
        assert!(roots.pick("t2", "app-misc/c", &reach, &index).is_none());
        assert_eq!(roots.pick("t1", "app-misc/d", &reach, &index).map(|p| p.id), Some(e.clone()));
        let only_e: BTreeSet<String> = ["app-misc/c", "app-misc/e"].map(String::from).into();
        assert_eq!(roots.pick("t1", "app-misc/c", &only_e, &index).map(|p| p.id), Some(e.clone()));
        let index_e = PackageIndex { header: Default::default(), packages: vec![entry("app-misc/e-1.0")] };
        assert_eq!(roots.pick("t1", "app-misc/c", &reach, &index_e).map(|p| p.id), Some(e.clone()));
        // The same set twice is kept once; a third set prunes the least
        // recently used (d+e: e was picked since).
        let again = build(&[("app-misc/d-1.0", "app-misc/e"), ("app-misc/e-1.0", "")]);
        assert_eq!(roots.keep("t1", &again).unwrap(), None);
        roots.keep("t2", &build(&[("app-misc/x-1", ""), ("app-misc/y-1", ""), ("app-misc/z-1", "")])).unwrap();
        let left: BTreeSet<String> = roots.entries().into_iter().map(|(id, _, _)| id).collect();
        assert_eq!(left.len(), 2);
        assert!(left.contains(&e) && !left.contains(de.as_ref().unwrap()), "{left:?}");
        // A byte budget smaller than a ROOT keeps none of that size.
        let tight = DepRoots::new(dir.path().join("tight"), 8, 3);
        let big = dir.path().join("big");
        install(&big, "app-misc/big-1", "", &[("/usr/share/big/f", "four")]);
        assert!(tight.keep("t1", &big).unwrap().is_some());
        assert!(tight.entries().is_empty(), "4 bytes over a 3-byte budget");
    }
}
