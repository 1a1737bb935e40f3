//! Publishing: seed a build's PKGDIR with the target's published packages
//! (so `--usepkg` reuses them and portage allocates fresh BUILD_IDs), then
//! locate every new package through the build's `Packages` index (never by
//! guessing file names), upload each under the PKGDIR-shaped layout
//! `<target>/<category>/<pn>/<pf>-<build_id>.gpkg.tar` without ever
//! overwriting, and keep `<target>/Packages` current.
//!
//! The index is derived data: each published package also gets a one-entry
//! fragment at `<target>/.pkgindex/<PATH>.entry`, and `Packages` is rebuilt
//! from the fragments. A rebuild re-lists after writing and writes again if
//! the set changed meanwhile, so concurrent publishers converge on an index
//! with every package in it.

use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

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
    #[error("the build's Packages index is unreadable")]
    Index(#[from] IndexError),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the build's index lists an unacceptable package path {0:?}")]
    BadPath(String),
    #[error("{0} is already published with other content (BUILD_ID collision); retrying allocates a new id")]
    Collision(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io { path: path.to_owned(), source }
}

const FRAGMENTS: &str = ".pkgindex";

/// Copies the target's published packages into `pkgdir`; returns their
/// paths relative to it (the `PATH`s the build must not re-publish).
pub async fn seed(store: &dyn ArtifactStore, target: &str, pkgdir: &Path) -> Result<HashSet<String>, PublishError> {
    let prefix = format!("{target}/");
    let mut seeded = HashSet::new();
    for p in store.list(&prefix).await? {
        let Some(rel) = p.as_str().strip_prefix(&prefix) else { continue };
        if rel.starts_with(&format!("{FRAGMENTS}/")) || !rel.ends_with(".gpkg.tar") {
            continue;
        }
        let dest = pkgdir.join(rel);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io(parent))?;
        }
        let bytes = store.get(&p).await?;
        tokio::fs::write(&dest, bytes).await.map_err(io(&dest))?;
        seeded.insert(rel.to_owned());
    }
    // Portage finds binary packages through the index, not by scanning.
    if !seeded.is_empty() {
        let index =
            ArtifactPath::parse(&format!("{target}/Packages")).map_err(|_| PublishError::BadPath(target.into()))?;
        match store.get(&index).await {
            Ok(bytes) => {
                let dest = pkgdir.join("Packages");
                tokio::fs::write(&dest, bytes).await.map_err(io(&dest))?;
            }
            Err(ArtifactError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(seeded)
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
/// fragment, then rebuilds `<target>/Packages`.
pub async fn publish(
    store: &dyn ArtifactStore,
    target: &str,
    pkgdir: &Path,
    seeded: &HashSet<String>,
    now_secs: u64,
) -> Result<Vec<PublishedPackage>, PublishError> {
    let index_path = pkgdir.join("Packages");
    let text = tokio::fs::read_to_string(&index_path).await.map_err(io(&index_path))?;
    let index = pkgindex::parse(&text)?;
    let mut out = Vec::new();
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
            return Err(PublishError::Collision(path.to_string()));
        }
        let mut fragment = PackageIndex { header: index.header.clone(), packages: vec![entry.clone()] };
        fragment.set_timestamp(now_secs);
        let frag_path = ArtifactPath::parse(&format!("{target}/{FRAGMENTS}/{rel}.entry"))
            .map_err(|_| PublishError::BadPath(rel.to_owned()))?;
        store.put_bytes(&frag_path, fragment.render()?.into_bytes(), "text/plain").await?;
        out.push(PublishedPackage {
            cpv: entry.cpv().unwrap_or_default().to_owned(),
            path,
            sha256,
            size,
            build_id: entry.build_id().unwrap_or(0),
            use_flags: entry.use_flags(),
        });
    }
    if !out.is_empty() {
        rebuild_index(store, target, now_secs).await?;
    }
    Ok(out)
}

/// Rebuilds `<target>/Packages` from the fragments, until a re-list after
/// writing shows no fragment was added meanwhile.
pub async fn rebuild_index(store: &dyn ArtifactStore, target: &str, now_secs: u64) -> Result<usize, PublishError> {
    let prefix = format!("{target}/{FRAGMENTS}/");
    let mut written: Option<BTreeSet<ArtifactPath>> = None;
    for _ in 0..8 {
        let listed: BTreeSet<ArtifactPath> = store.list(&prefix).await?.into_iter().collect();
        if written.as_ref() == Some(&listed) {
            break;
        }
        let mut index = PackageIndex::default();
        let mut entries: Vec<PackageEntry> = Vec::new();
        for p in &listed {
            let text = String::from_utf8_lossy(&store.get(p).await?).into_owned();
            let fragment = pkgindex::parse(&text)?;
            if index.header.is_empty() {
                index.header = fragment.header.clone();
            }
            entries.extend(fragment.packages);
        }
        index.merge(entries);
        let path =
            ArtifactPath::parse(&format!("{target}/Packages")).map_err(|_| PublishError::BadPath(target.into()))?;
        let previous = match store.get(&path).await {
            Ok(bytes) => pkgindex::header_timestamp(&bytes),
            Err(ArtifactError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        index.prepare_for_binhost(previous, now_secs, pkgindex::BINHOST_TTL_SECS);
        let text = index.render()?;
        let gz_path =
            ArtifactPath::parse(&format!("{target}/Packages.gz")).map_err(|_| PublishError::BadPath(target.into()))?;
        store.put_bytes(&gz_path, pkgindex::gzip(&text), "application/gzip").await?;
        store.put_bytes(&path, text.into_bytes(), "text/plain").await?;
        written = Some(listed);
    }
    Ok(written.map(|w| w.len()).unwrap_or(0))
}
