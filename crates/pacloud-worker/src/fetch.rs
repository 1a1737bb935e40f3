//! The fetch step and the shared distfiles cache.
//!
//! Before a build, the worker runs a second plan through the same sandbox:
//! `emerge --fetchonly --verbose` with the network on and nothing built. It
//! prints the merge list (which binaries the graph uses, which ebuilds it
//! builds) and downloads missing sources into the build's own DISTDIR,
//! where every cached distfile is already a symlink into the shared cache
//! (mounted read-only). The worker then checks every file the step
//! downloaded against the `DIST` entries of the Manifests of the ebuilds in
//! the graph (size, BLAKE2B, SHA512), moves good ones into the cache
//! (keyed by file name) and refuses the build on anything else, so the
//! cache never keeps a corrupt or unexpected file whatever the step did.
//! The build step then runs without network and reads the distfiles
//! through those symlinks. The cache is pruned by age and total size.
//!
//! With [`DistfilesCache::shared`] (AWS workers) the local directory is
//! the worker's cache in front of a tier in the artifact store
//! (`distfiles/<name>`, the bucket on AWS) shared by every worker: before
//! the fetch step, files the graph's Manifests list that are missing
//! locally are pulled from it ([`DistfilesCache::pull`], verified against
//! the Manifest after download, a bad copy ignored), and files the fetch
//! step downloaded and the worker admitted are pushed to it
//! ([`DistfilesCache::push`], verified again just before upload,
//! create-if-absent).

use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What the fetch step's merge list says about the graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeList {
    /// Binary packages the graph uses: `category/pf` and BUILD_ID.
    pub binaries: Vec<(String, Option<u64>)>,
    /// Ebuilds the graph builds: `category/pf`.
    pub ebuilds: Vec<String>,
}

/// `cat/pf` of a merge-list or status token `cat/pf[:SLOT[/SUB]][::repo]`.
fn without_slot(token: &str) -> &str {
    let cpv = token.split("::").next().unwrap_or(token);
    cpv.split(':').next().unwrap_or(cpv)
}

/// Parses emerge's `--verbose` merge list (`[binary ...] cat/pf-BUILDID::repo`,
/// `[ebuild ...] cat/pf::repo`); other lines are ignored.
pub fn parse_merge_list(log: &str) -> MergeList {
    let mut out = MergeList::default();
    for line in log.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix('[') else { continue };
        let Some((kind_flags, after)) = rest.split_once(']') else { continue };
        let kind = kind_flags.split_whitespace().next().unwrap_or("");
        let Some(token) = after.split_whitespace().next() else { continue };
        // `cat/pf:SLOT::repo` when the slot is not 0 (real trees: dev-libs/lzo-2.10:2).
        let cpv = without_slot(token);
        if !cpv.contains('/') {
            continue;
        }
        match kind {
            "binary" => {
                // With binpkg-multi-instance portage appends `-<BUILD_ID>`.
                match cpv.rsplit_once('-') {
                    Some((base, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
                        out.binaries.push((base.to_owned(), id.parse().ok()))
                    }
                    _ => out.binaries.push((cpv.to_owned(), None)),
                }
            }
            "ebuild" => out.ebuilds.push(cpv.to_owned()),
            _ => {}
        }
    }
    out
}

/// Why the fetch step failed for the ebuilds of the graph, from its log:
/// for each `>>> Failed to emerge <cpv>` of an ebuild, the `!!!` lines
/// printed while fetching it. `None` when no ebuild failed (portage also
/// "fails" the binaries, whose files are only placeholders during this
/// step; the build step verifies the real ones).
pub fn fetch_failure_reason(log: &str, graph: &MergeList) -> Option<String> {
    let mut current: Option<String> = None;
    let mut messages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut failed = Vec::new();
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix(">>> Fetching (") {
            let cpv = rest.split_once(") ").map(|(_, r)| r).unwrap_or("");
            current = cpv.split_whitespace().next().map(|c| without_slot(c).to_owned());
        } else if let Some(rest) = line.strip_prefix(">>> Failed to emerge ") {
            let cpv = without_slot(rest.split_whitespace().next().unwrap_or("")).to_owned();
            if graph.ebuilds.contains(&cpv) && !failed.contains(&cpv) {
                failed.push(cpv);
            }
        } else if (line.starts_with("!!!") || line.contains("Couldn't download"))
            // A mirror without a layout file is normal (flat layout).
            && !line.contains(".layout.conf")
            && let Some(c) = &current
        {
            let m = messages.entry(c.clone()).or_default();
            if !m.iter().any(|x| x == line) {
                m.push(line.to_owned());
            }
        }
    }
    if failed.is_empty() {
        return None;
    }
    let parts: Vec<String> = failed
        .iter()
        .map(|cpv| {
            let m =
                messages.get(cpv).map(|m| m.iter().take(8).cloned().collect::<Vec<_>>().join(" ")).unwrap_or_default();
            format!("{cpv}: {m}")
        })
        .collect();
    Some(parts.join("; "))
}

/// One `DIST` line of a Manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEntry {
    pub size: u64,
    /// Hash name (`BLAKE2B`, `SHA512`, ...) -> lowercase hex.
    pub hashes: BTreeMap<String, String>,
}

/// The `DIST` entries of a Manifest, by file name.
pub fn parse_manifest(text: &str) -> BTreeMap<String, DistEntry> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[0] != "DIST" {
            continue;
        }
        let Ok(size) = f[2].parse() else { continue };
        let hashes =
            f[3..].chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].to_owned(), c[1].to_lowercase())).collect();
        out.insert(f[1].to_owned(), DistEntry { size, hashes });
    }
    out
}

/// The `DIST` entries of every ebuild in `ebuilds` (`category/pf`), read
/// from the repository's Manifests (trusted: outside the sandbox).
pub fn graph_manifests(repo: &Path, ebuilds: &[String]) -> BTreeMap<String, (String, DistEntry)> {
    let mut out = BTreeMap::new();
    for cpv in ebuilds {
        let Ok((atom, _)) = pacloud_domain::grammar::parse_versioned_atom(cpv) else { continue };
        let dir = repo.join(atom.category().as_str()).join(atom.package().as_str());
        let Ok(text) = std::fs::read_to_string(dir.join("Manifest")) else { continue };
        for (name, entry) in parse_manifest(&text) {
            out.insert(name, (cpv.clone(), entry));
        }
    }
    out
}

/// Checks a file against its Manifest entry; the error names the check.
pub fn verify(path: &Path, entry: &DistEntry) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut sha512 = <sha2::Sha512 as sha2::Digest>::new();
    let mut blake = <blake2::Blake2b512 as blake2::Digest>::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("cannot read it: {e}"))?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut sha512, &buf[..n]);
        blake2::Digest::update(&mut blake, &buf[..n]);
        size += n as u64;
    }
    if size != entry.size {
        return Err(format!("size check failed: Manifest says {} bytes, the file has {size}", entry.size));
    }
    let mut checked = 0;
    for (name, got) in [
        ("SHA512", hex::encode(sha2::Digest::finalize(sha512))),
        ("BLAKE2B", hex::encode(blake2::Digest::finalize(blake))),
    ] {
        if let Some(want) = entry.hashes.get(name) {
            checked += 1;
            if *want != got {
                return Err(format!("{name} check failed: Manifest says {want}, the file has {got}"));
            }
        }
    }
    if checked == 0 {
        return Err("no BLAKE2B or SHA512 digest in its Manifest entry".into());
    }
    Ok(())
}

/// Why the fetched sources were refused.
#[derive(Debug, thiserror::Error)]
pub enum DistfileError {
    #[error("distfile {file}: {reason}")]
    Rejected { file: String, reason: String },
    #[error("distfiles cache I/O failed at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DistfileError + '_ {
    move |source| DistfileError::Io { path: path.to_owned(), source }
}

/// The shared distfiles cache of this worker: a directory of verified
/// source files, keyed by file name.
#[derive(Debug, Clone)]
pub struct DistfilesCache {
    pub dir: PathBuf,
    /// Files not used for this long are removed.
    pub max_age: Duration,
    /// Least recently used files are removed beyond this total.
    pub max_bytes: u64,
    /// Backed by the shared tier in the artifact store (`distfiles/<name>`).
    pub shared: bool,
}

/// The artifact-store prefix of the shared distfiles tier.
pub const STORE_PREFIX: &str = "distfiles/";

/// The `DIST` entries of the Manifests of the packages `names`
/// (`category/pn`, all versions), by file name.
pub fn name_manifests(repo: &Path, names: &BTreeSet<String>) -> BTreeMap<String, (String, DistEntry)> {
    let mut out = BTreeMap::new();
    for name in names {
        let Ok(text) = std::fs::read_to_string(repo.join(name).join("Manifest")) else { continue };
        for (file, entry) in parse_manifest(&text) {
            out.insert(file, (name.clone(), entry));
        }
    }
    out
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name != ".."
}

impl DistfilesCache {
    pub fn new(dir: PathBuf, max_age: Duration, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(DistfilesCache { dir, max_age, max_bytes, shared: false })
    }

    /// Pulls every file of `wanted` that the local cache lacks from the
    /// shared tier, verified against its Manifest entry before it enters
    /// the local cache (a missing or bad copy is skipped: the fetch step
    /// downloads it). Returns the names pulled.
    pub async fn pull(
        &self,
        store: &dyn ArtifactStore,
        wanted: &BTreeMap<String, (String, DistEntry)>,
    ) -> Result<Vec<String>, DistfileError> {
        let mut pulled = Vec::new();
        for (name, (cpv, entry)) in wanted {
            if !is_plain_name(name) || self.dir.join(name).is_file() {
                continue;
            }
            let Ok(path) = ArtifactPath::parse(&format!("{STORE_PREFIX}{name}")) else { continue };
            let bytes = match store.get(&path).await {
                Ok(b) => b,
                Err(ArtifactError::NotFound(_)) => continue,
                Err(e) => {
                    tracing::warn!(file = %name, error = &e as &dyn std::error::Error, "cannot read the shared distfiles tier");
                    continue;
                }
            };
            let tmp = self.dir.join(format!(".{name}.{}.pull", std::process::id()));
            std::fs::write(&tmp, &bytes).map_err(io(&tmp))?;
            match verify(&tmp, entry) {
                Ok(()) => {
                    let dest = self.dir.join(name);
                    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
                    pulled.push(name.clone());
                }
                Err(reason) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::warn!(file = %name, %reason, manifest = %cpv, "shared distfile does not match the Manifest; ignored");
                }
            }
        }
        Ok(pulled)
    }

    /// Uploads the cached files `names` to the shared tier (create-if-absent),
    /// each verified against `wanted` again just before. Returns how many
    /// were uploaded.
    pub async fn push(
        &self,
        store: &dyn ArtifactStore,
        names: &[String],
        wanted: &BTreeMap<String, (String, DistEntry)>,
    ) -> Result<usize, DistfileError> {
        let mut n = 0;
        for name in names {
            let (Some((_, entry)), true) = (wanted.get(name), is_plain_name(name)) else { continue };
            let file = self.dir.join(name);
            if let Err(reason) = verify(&file, entry) {
                return Err(DistfileError::Rejected { file: name.clone(), reason });
            }
            let Ok(path) = ArtifactPath::parse(&format!("{STORE_PREFIX}{name}")) else { continue };
            let sha256 = {
                let bytes = std::fs::read(&file).map_err(io(&file))?;
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
            };
            match store.put_file_if_absent(&path, &file, &sha256).await {
                Ok(Some(_)) => n += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(file = %name, error = &e as &dyn std::error::Error, "cannot upload to the shared distfiles tier")
                }
            }
        }
        Ok(n)
    }

    /// Symlinks every cached file into a build's DISTDIR (the cache itself is
    /// mounted read-only in the sandbox at the same path).
    pub fn link_into(&self, distdir: &Path) -> Result<usize, DistfileError> {
        let mut n = 0;
        for e in std::fs::read_dir(&self.dir).map_err(io(&self.dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_plain_name(&name) || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let link = distdir.join(&name);
            std::os::unix::fs::symlink(e.path(), &link).map_err(io(&link))?;
            n += 1;
        }
        Ok(n)
    }

    /// Checks every file the fetch step left in `distdir` (regular files,
    /// not the symlinks into the cache) against `expected` (the graph's
    /// Manifest entries), moves good ones into the cache and links them
    /// back. Any other file refuses the whole build (and is deleted).
    /// Returns the names admitted.
    pub fn admit(
        &self,
        distdir: &Path,
        expected: &BTreeMap<String, (String, DistEntry)>,
    ) -> Result<Vec<String>, DistfileError> {
        let mut admitted = Vec::new();
        let mut first_error = None;
        let mut entries: Vec<_> = std::fs::read_dir(distdir).map_err(io(distdir))?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ty) = e.file_type() else { continue };
            if ty.is_symlink() || ty.is_dir() || !is_plain_name(&name) {
                continue;
            }
            let path = e.path();
            let verdict = match expected.get(&name) {
                None => Err("not listed in the Manifest of any package the build needs".to_owned()),
                Some((cpv, entry)) => verify(&path, entry).map_err(|r| format!("{r} (Manifest of {cpv})")),
            };
            match verdict {
                Ok(()) => {
                    let dest = self.dir.join(&name);
                    let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
                    std::fs::copy(&path, &tmp).map_err(io(&tmp))?;
                    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    std::os::unix::fs::symlink(&dest, &path).map_err(io(&path))?;
                    admitted.push(name);
                }
                Err(reason) => {
                    let _ = std::fs::remove_file(&path);
                    first_error.get_or_insert(DistfileError::Rejected { file: name, reason });
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(admitted),
        }
    }

    /// Marks cached files as used now (for pruning by age).
    pub fn touch(&self, names: &[String]) {
        for n in names.iter().filter(|n| is_plain_name(n)) {
            if let Ok(f) = std::fs::File::options().write(true).open(self.dir.join(n)) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
    }

    /// Removes files unused for longer than `max_age`, then the least
    /// recently used until the total fits `max_bytes`. Returns how many
    /// files were removed.
    pub fn prune(&self, now: SystemTime) -> Result<usize, DistfileError> {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io(&self.dir))?.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_file() {
                files.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), e.path()));
            }
        }
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let mut removed = 0;
        for (mtime, len, path) in files {
            let old = now.duration_since(mtime).is_ok_and(|age| age > self.max_age);
            if (old || total > self.max_bytes) && std::fs::remove_file(&path).is_ok() {
                total -= len;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_list_lines() {
        let log = "These are the packages that would be fetched, in order:\n\n\
            [binary   R    ] app-misc/chain-e-1.0-3::pacloud-fixtures  USE=\"\" 0 KiB\n\
            [ebuild  N     ] app-misc/chain-d-1.0::pacloud-fixtures  0 KiB\n\
            [binary  N     ] dev-libs/libfoo-1.2-r1::gentoo\n\
            [ebuild  N     ] dev-libs/lzo-2.10:2::gentoo  USE=\"-examples\" 0 KiB\n\
            >>> Fetching (1 of 2) app-misc/chain-d-1.0::pacloud-fixtures\n";
        let m = parse_merge_list(log);
        assert_eq!(m.ebuilds, vec!["app-misc/chain-d-1.0", "dev-libs/lzo-2.10"], "a slot is not part of the cpv");
        assert_eq!(m.binaries[0], ("app-misc/chain-e-1.0".to_owned(), Some(3)));
        assert_eq!(m.binaries[1], ("dev-libs/libfoo-1.2-r1".to_owned(), None), "a revision is not a BUILD_ID");
    }

    #[test]
    fn fetch_failures_name_the_ebuild_and_ignore_placeholders() {
        let log = "[binary  N     ] dev-libs/libfoo-1.0-1::r to /x/\n[ebuild  N     ] app-misc/src-1.0::r to /x/\n\n\
            >>> Fetching (1 of 2) dev-libs/libfoo-1.0::r for /x/\n!!! Digest verification failed:\n\
            >>> Failed to emerge dev-libs/libfoo-1.0 for /x/\n";
        let graph = parse_merge_list(log);
        assert_eq!(fetch_failure_reason(log, &graph), None, "binary placeholders are not fetch failures");
        let log = format!(
            "{log}>>> Fetching (2 of 2) app-misc/src-1.0::r for /x/\n\
             !!! Couldn't download 'src-1.0.txt'. Aborting.\n>>> Failed to emerge app-misc/src-1.0 for /x/\n"
        );
        let why = fetch_failure_reason(&log, &graph).unwrap();
        assert_eq!(why, "app-misc/src-1.0: !!! Couldn't download 'src-1.0.txt'. Aborting.");
    }

    #[test]
    fn manifest_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("src-1.0.txt");
        std::fs::write(&f, b"hello\n").unwrap();
        let sha512 = hex::encode(<sha2::Sha512 as sha2::Digest>::digest(b"hello\n"));
        let blake = hex::encode(<blake2::Blake2b512 as blake2::Digest>::digest(b"hello\n"));
        let m = parse_manifest(&format!("DIST src-1.0.txt 6 BLAKE2B {blake} SHA512 {sha512}\nEBUILD x 1 SHA512 00\n"));
        assert_eq!(m.len(), 1);
        verify(&f, &m["src-1.0.txt"]).unwrap();
        std::fs::write(&f, b"hellO\n").unwrap();
        let e = verify(&f, &m["src-1.0.txt"]).unwrap_err();
        assert!(e.starts_with("SHA512 check failed"), "{e}");
        std::fs::write(&f, b"hello!\n").unwrap();
        assert!(verify(&f, &m["src-1.0.txt"]).unwrap_err().starts_with("size check failed"));
    }

    #[test]
    fn admit_moves_good_files_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DistfilesCache::new(dir.path().join("cache"), Duration::from_secs(3600), 1 << 20).unwrap();
        let distdir = dir.path().join("dist");
        std::fs::create_dir_all(&distdir).unwrap();
        std::fs::write(distdir.join("good.txt"), b"hello\n").unwrap();
        let sha512 = hex::encode(<sha2::Sha512 as sha2::Digest>::digest(b"hello\n"));
        let mut expected = BTreeMap::new();
        expected.insert(
            "good.txt".to_owned(),
            ("a/b-1".to_owned(), DistEntry { size: 6, hashes: BTreeMap::from([("SHA512".into(), sha512)]) }),
        );
        assert_eq!(cache.admit(&distdir, &expected).unwrap(), vec!["good.txt"]);
        assert!(distdir.join("good.txt").symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(cache.dir.join("good.txt")).unwrap(), b"hello\n");
        std::fs::write(distdir.join("evil.txt"), b"x").unwrap();
        let e = cache.admit(&distdir, &expected).unwrap_err().to_string();
        assert!(e.contains("evil.txt") && e.contains("not listed in the Manifest"), "{e}");
        assert!(!cache.dir.join("evil.txt").exists(), "the cache keeps no unexpected file");
        // Pruning: by size (1 byte allowed) removes the file.
        let small = DistfilesCache { max_bytes: 1, ..cache.clone() };
        assert_eq!(small.prune(SystemTime::now()).unwrap(), 1);
        assert!(!cache.dir.join("good.txt").exists());
    }
}
