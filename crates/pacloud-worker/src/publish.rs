//! Seeding and publishing.
//!
//! **Seeding is O(dependencies).** A build's PKGDIR gets the target's
//! published `Packages` index (one GET) and, for every entry, a sparse
//! *placeholder* file of the entry's `SIZE` and `MTIME`: portage trusts an
//! index entry whose file matches both and never opens it, so it resolves
//! the graph exactly as if every package were there (and allocates fresh
//! BUILD_IDs). The fetch step's merge list names the binaries the graph
//! really uses; only those are fetched from the store, verified against the
//! index's `SIZE` and `SHA1`, and written over their placeholders
//! ([`materialize`]). A placeholder the build would read is never there.
//!
//! **Publishing** locates every new package through the build's `Packages`
//! index (never by guessing file names), uploads it under
//! `<target>/<category>/<pn>/<pf>-<build_id>.gpkg.tar` without ever
//! overwriting, writes a one-entry fragment at
//! `<target>/.pkgindex/<PATH>.entry` (a durable log [`rebuild_index`] can
//! repair the index from), and merges the new entries into
//! `<target>/Packages` with a compare-and-swap: read the index and its
//! version, merge, write only if it is still at that version, else retry
//! ([`update_index`]). Per-publish cost is one read and one write of the
//! index whatever the number of fragments, and no concurrent publisher's
//! entries are lost. [`write_index`] is the one place the index is written.

use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore, ObjectVersion};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::pkgcache::PackageCache;
use crate::pkgindex::{self, IndexError, PackageEntry, PackageIndex};

/// One package this build published.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedPackage {
    /// `category/pf`, e.g. `app-misc/hello-2.12-r1`.
    pub cpv: String,
    pub path: ArtifactPath,
    pub sha256: String,
    pub size: u64,
    pub build_id: u64,
    /// USE as portage recorded it.
    pub use_flags: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("artifact store failed")]
    Store(#[from] ArtifactError),
    #[error("a Packages index is unreadable")]
    Index(#[from] IndexError),
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("an index lists an unacceptable package path {0:?}")]
    BadPath(String),
    #[error("{0} is already published with other content (BUILD_ID collision); retrying allocates a new id")]
    Collision(String),
    #[error("the build needs binary package {0}, which the target's index does not list")]
    NotInIndex(String),
    #[error("published package {path} does not match the index: {check}")]
    Digest { path: String, check: String },
    #[error("the index of target {0} kept changing under {1} attempts to update it")]
    Contended(String, u32),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io { path: path.to_owned(), source }
}

const FRAGMENTS: &str = ".pkgindex";

fn index_path(target: &str) -> Result<ArtifactPath, PublishError> {
    ArtifactPath::parse(&format!("{target}/Packages")).map_err(|_| PublishError::BadPath(target.into()))
}

/// What seeding put into a build's PKGDIR.
#[derive(Debug, Clone, Default)]
pub struct Seeded {
    /// The target's index as the build saw it.
    pub index: PackageIndex,
    /// `PATH`s of its entries (never published again by this build).
    pub paths: HashSet<String>,
    /// How many of its entries the build's own index shows.
    pub visible: usize,
}

/// Writes the target's index and a sparse placeholder per entry into
/// `pkgdir` (one GET, no package downloaded).
pub async fn seed(store: &dyn ArtifactStore, target: &str, pkgdir: &Path) -> Result<Seeded, PublishError> {
    seed_selected(store, target, pkgdir, |_| None).await
}

/// [`seed`], but the build's index and placeholders hold only the entries
/// whose `category/pn` is in the set `select` returns for the target's index
/// (`None`: all), e.g. the names the graph can reach
/// ([`crate::closure::reach`]), so portage's cost follows the graph, not
/// the store. [`Seeded::index`] and [`Seeded::paths`] still describe the
/// whole index (what this build must never publish again).
pub async fn seed_selected(
    store: &dyn ArtifactStore,
    target: &str,
    pkgdir: &Path,
    select: impl FnOnce(&PackageIndex) -> Option<BTreeSet<String>>,
) -> Result<Seeded, PublishError> {
    let bytes = match store.get(&index_path(target)?).await {
        Ok(b) => b,
        Err(ArtifactError::NotFound(_)) => {
            let _ = select(&PackageIndex::default());
            return Ok(Seeded::default());
        }
        Err(e) => return Err(e.into()),
    };
    let index = pkgindex::parse(&String::from_utf8_lossy(&bytes))?;
    let dest = pkgdir.join("Packages");
    let (entries, paths_all) = match select(&index) {
        None => {
            tokio::fs::write(&dest, &bytes).await.map_err(io(&dest))?;
            (index.packages.clone(), None)
        }
        Some(names) => {
            let keep = |e: &PackageEntry| {
                e.cpv()
                    .and_then(|c| pacloud_domain::grammar::parse_versioned_atom(c).ok())
                    .is_some_and(|(atom, _)| names.contains(atom.to_string().as_str()))
            };
            let visible = PackageIndex {
                header: index.header.clone(),
                packages: index.packages.iter().filter(|e| keep(e)).cloned().collect(),
            };
            tokio::fs::write(&dest, visible.render()?).await.map_err(io(&dest))?;
            let mut all = HashSet::new();
            for e in &index.packages {
                if let Some(rel) = e.path() {
                    checked_rel_path("t", rel)?;
                    all.insert(rel.to_owned());
                }
            }
            (visible.packages, Some(all))
        }
    };
    let pkgdir = pkgdir.to_owned();
    let visible = entries.len();
    let paths = tokio::task::spawn_blocking(move || -> Result<HashSet<String>, PublishError> {
        let mut paths = HashSet::new();
        for e in &entries {
            let Some(rel) = e.path() else { continue };
            checked_rel_path("t", rel)?;
            paths.insert(rel.to_owned());
            let (Some(size), Some(mtime)) = (e.size(), e.get("MTIME").and_then(|m| m.parse::<u64>().ok())) else {
                continue;
            };
            let file = pkgdir.join(rel);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let f = std::fs::File::create(&file).map_err(io(&file))?;
            f.set_len(size).map_err(io(&file))?;
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime)).map_err(io(&file))?;
        }
        Ok(paths)
    })
    .await
    .map_err(|e| PublishError::Io { path: PathBuf::from("seed"), source: std::io::Error::other(e) })??;
    Ok(Seeded { index, paths: paths_all.unwrap_or(paths), visible })
}

/// Replaces the placeholders of the binaries the graph uses (`cpv`,
/// `BUILD_ID`) with the real packages, fetched through `cache` and verified
/// against the index. Returns how many bytes were materialized.
pub async fn materialize(
    store: &dyn ArtifactStore,
    cache: &PackageCache,
    target: &str,
    pkgdir: &Path,
    seeded: &Seeded,
    binaries: &[(String, Option<u64>)],
) -> Result<u64, PublishError> {
    let mut total = 0;
    for (cpv, build_id) in binaries {
        let entry = seeded
            .index
            .packages
            .iter()
            .find(|e| e.cpv() == Some(cpv.as_str()) && (build_id.is_none() || e.build_id() == *build_id))
            .ok_or_else(|| PublishError::NotInIndex(format!("{cpv} (BUILD_ID {build_id:?})")))?;
        let rel = entry.path().ok_or_else(|| PublishError::NotInIndex(cpv.clone()))?;
        let path = checked_rel_path(target, rel)?;
        let expect = Expected {
            size: entry.size().ok_or_else(|| PublishError::NotInIndex(format!("{cpv}: no SIZE")))?,
            sha1: entry.get("SHA1").map(str::to_owned),
        };
        let dest = pkgdir.join(rel);
        cache.fetch_into(store, &path, &expect, &dest).await?;
        if let Some(mtime) = entry.get("MTIME").and_then(|m| m.parse::<u64>().ok()) {
            let f = std::fs::File::options().write(true).open(&dest).map_err(io(&dest))?;
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime)).map_err(io(&dest))?;
        }
        total += expect.size;
    }
    Ok(total)
}

/// What a stored package must match (from the index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub size: u64,
    /// Lowercase hex SHA-1 as portage writes it in `Packages`.
    pub sha1: Option<String>,
}

impl Expected {
    /// Checks bytes; the error names the failed check.
    pub fn check(&self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() as u64 != self.size {
            return Err(format!("SIZE {} expected, {} found", self.size, bytes.len()));
        }
        if let Some(want) = &self.sha1 {
            use sha1::Digest;
            let got = hex::encode(sha1::Sha1::digest(bytes));
            if !got.eq_ignore_ascii_case(want) {
                return Err(format!("SHA1 {want} expected, {got} found"));
            }
        }
        Ok(())
    }
}

/// `PATH` from an untrusted index: `<category>/<pn>/<file>.gpkg.tar`.
fn checked_rel_path(target: &str, rel: &str) -> Result<ArtifactPath, PublishError> {
    let ok = rel.split('/').count() == 3 && rel.ends_with(".gpkg.tar") && !rel.starts_with(FRAGMENTS);
    if !ok {
        return Err(PublishError::BadPath(rel.to_owned()));
    }
    ArtifactPath::parse(&format!("{target}/{rel}")).map_err(|_| PublishError::BadPath(rel.to_owned()))
}

async fn sha256_file(path: &Path) -> Result<(String, u64), PublishError> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            n_total += n as u64;
        }
        Ok((hex::encode(h.finalize()), n_total))
    })
    .await
    .map_err(|e| PublishError::Io { path: path.to_owned(), source: std::io::Error::other(e) })?
    .map_err(io(path))
}

/// Uploads every package in `pkgdir` that was not seeded, with its index
/// fragment, then merges them into `<target>/Packages`.
///
/// A dependency whose path another build published meanwhile (two builds
/// racing on the same dependency both get its first BUILD_ID) is skipped
/// with a warning: the store keeps the other build's file, and this build
/// still succeeds. Only a collision of `main_cpv` itself (or of any package
/// when it is `None`) is an error, retried with a fresh BUILD_ID.
pub async fn publish(
    store: &dyn ArtifactStore,
    target: &str,
    pkgdir: &Path,
    seeded: &HashSet<String>,
    main_cpv: Option<&str>,
    now_secs: u64,
) -> Result<Vec<PublishedPackage>, PublishError> {
    let index_file = pkgdir.join("Packages");
    let text = tokio::fs::read_to_string(&index_file).await.map_err(io(&index_file))?;
    let index = pkgindex::parse(&text)?;
    let mut out = Vec::new();
    let mut new_entries = Vec::new();
    for entry in &index.packages {
        let Some(rel) = entry.path() else { continue };
        if seeded.contains(rel) {
            continue;
        }
        let path = checked_rel_path(target, rel)?;
        let file = pkgdir.join(rel);
        let meta = tokio::fs::symlink_metadata(&file).await.map_err(io(&file))?;
        if !meta.file_type().is_file() {
            return Err(PublishError::BadPath(rel.to_owned()));
        }
        let (sha256, size) = sha256_file(&file).await?;
        if store.put_file_if_absent(&path, &file, &sha256).await?.is_none() {
            let cpv = entry.cpv().unwrap_or_default();
            if main_cpv.is_some_and(|m| m != cpv) {
                tracing::warn!(path = %path, "dependency already published by another build; keeping theirs");
                continue;
            }
            return Err(PublishError::Collision(path.to_string()));
        }
        let mut fragment = PackageIndex { header: index.header.clone(), packages: vec![entry.clone()] };
        fragment.set_timestamp(now_secs);
        let frag_path = ArtifactPath::parse(&format!("{target}/{FRAGMENTS}/{rel}.entry"))
            .map_err(|_| PublishError::BadPath(rel.to_owned()))?;
        store.put_bytes(&frag_path, fragment.render()?.into_bytes(), "text/plain").await?;
        new_entries.push(entry.clone());
        out.push(PublishedPackage {
            cpv: entry.cpv().unwrap_or_default().to_owned(),
            path,
            sha256,
            size,
            build_id: entry.build_id().unwrap_or(0),
            use_flags: entry.use_flags(),
        });
    }
    if !new_entries.is_empty() {
        update_index(store, target, &index.header, new_entries, now_secs).await?;
    }
    Ok(out)
}

/// Attempts of one index update before giving up (each failed attempt
/// means another publisher's update went in).
const MAX_INDEX_ATTEMPTS: u32 = 200;

/// Merges `entries` into `<target>/Packages` by compare-and-swap: read with
/// version, merge, [`write_index`] at that version; on a conflict re-read
/// and retry after a short randomised pause. `header` is used when the
/// index does not exist yet. Returns the number of attempts it took.
pub async fn update_index(
    store: &dyn ArtifactStore,
    target: &str,
    header: &BTreeMap<String, String>,
    entries: Vec<PackageEntry>,
    now_secs: u64,
) -> Result<u32, PublishError> {
    let path = index_path(target)?;
    for attempt in 1..=MAX_INDEX_ATTEMPTS {
        let (text, version) = match store.get_versioned(&path).await? {
            Some((bytes, v)) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| IndexError::MalformedLine { line: 0, text: "the stored index is not UTF-8".into() })?;
                // A monotonic TIMESTAMP: binhost clients only re-read a newer index.
                let stamp = pkgindex::next_timestamp(pkgindex::header_timestamp(&text), now_secs);
                (pkgindex::merge_text(&text, &entries, stamp)?, Some(v))
            }
            None => {
                let mut index = PackageIndex { header: header.clone(), packages: Vec::new() };
                index.merge(entries.iter().cloned());
                index.prepare_for_binhost(None, now_secs, pkgindex::BINHOST_TTL_SECS);
                (index.render()?, None)
            }
        };
        if write_index(store, target, text.into_bytes(), version.as_ref()).await?.is_some() {
            return Ok(attempt);
        }
        tokio::time::sleep(jitter(attempt)).await;
    }
    Err(PublishError::Contended(target.to_owned(), MAX_INDEX_ATTEMPTS))
}

/// A pause of up to `min(attempt, 20)` ms, varied per call so that racing
/// publishers spread out.
pub(crate) fn jitter(attempt: u32) -> Duration {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let cap = u64::from(attempt.min(20)) * 1000;
    Duration::from_micros(u64::from(nanos) % cap.max(1))
}

/// The one place `<target>/Packages` is written: stores the rendered
/// index only if the stored one is still at `expected` (`None`: only if
/// there is none), then brings `<target>/Packages.gz` (which portage fetches
/// first) up to date. Returns the new version, or `None` when another writer
/// got there first.
pub async fn write_index(
    store: &dyn ArtifactStore,
    target: &str,
    bytes: Vec<u8>,
    expected: Option<&ObjectVersion>,
) -> Result<Option<ObjectVersion>, PublishError> {
    let path = index_path(target)?;
    let gz = pkgindex::gzip(&String::from_utf8_lossy(&bytes));
    let Some(version) = store.put_bytes_if(&path, bytes, "text/plain", expected).await? else {
        return Ok(None);
    };
    write_index_gz(store, target, gz, version.clone()).await?;
    Ok(Some(version))
}

/// Writes `Packages.gz` for the index at `version`, then re-reads the index:
/// when another publisher replaced it meanwhile, its text is compressed and
/// written again. Whoever writes `Packages.gz` last checks afterwards, so
/// the two objects converge on the newest index (a reader may briefly see a
/// `Packages.gz` one publish behind, never a lost package for good).
async fn write_index_gz(
    store: &dyn ArtifactStore,
    target: &str,
    mut gz: Vec<u8>,
    mut version: ObjectVersion,
) -> Result<(), PublishError> {
    let gz_path =
        ArtifactPath::parse(&format!("{target}/Packages.gz")).map_err(|_| PublishError::BadPath(target.into()))?;
    for _ in 0..MAX_INDEX_ATTEMPTS {
        store.put_bytes(&gz_path, gz, "application/gzip").await?;
        match store.get_versioned(&index_path(target)?).await? {
            Some((bytes, now)) if now != version => {
                gz = pkgindex::gzip(&String::from_utf8_lossy(&bytes));
                version = now;
            }
            _ => return Ok(()),
        }
    }
    Err(PublishError::Contended(target.to_owned(), MAX_INDEX_ATTEMPTS))
}

/// Rebuilds `<target>/Packages` from the fragments (repair after a lost
/// index; O(packages), never on the publish path). Entries already in the
/// index are kept. Returns the number of fragments read.
pub async fn rebuild_index(store: &dyn ArtifactStore, target: &str, now_secs: u64) -> Result<usize, PublishError> {
    let prefix = format!("{target}/{FRAGMENTS}/");
    let listed: BTreeSet<ArtifactPath> = store.list(&prefix).await?.into_iter().collect();
    let mut header = BTreeMap::new();
    let mut entries: Vec<PackageEntry> = Vec::new();
    for p in &listed {
        let fragment = pkgindex::parse(&String::from_utf8_lossy(&store.get(p).await?))?;
        if header.is_empty() {
            header = fragment.header.clone();
        }
        entries.extend(fragment.packages);
    }
    update_index(store, target, &header, entries, now_secs).await?;
    Ok(listed.len())
}
