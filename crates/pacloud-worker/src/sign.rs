//! Signing a finished build's new packages (GLEP 78) in its PKGDIR, in the
//! worker and outside the build sandbox, before anything is published: each
//! package the build's `Packages` lists (and that was not seeded from the
//! binhost) is rewritten signed, and its `Packages` entry gets the `SIZE`,
//! `MD5`, `SHA1` and `MTIME` of the signed file, which is what portage's
//! binhost client checks after download.
//!
//! Architecture invariant: when a signer is configured, an unsigned package
//! is never published: a signing failure fails the attempt as an
//! infrastructure failure (retried), and publishing only runs after every
//! new package was signed.

use pacloud_domain::ports::{ArtifactError, ArtifactStore};
use pacloud_domain::published_key::{BadPublishedKey, PUBLISHED_KEY_PATH, PublishedKey};
use pacloud_sign::{SignError, Signer};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::pkgindex::{self, IndexError};

/// Why signing a build's packages failed (an infrastructure failure).
#[derive(Debug, thiserror::Error)]
pub enum SignPackagesError {
    #[error("signing {path} failed")]
    Sign {
        path: PathBuf,
        #[source]
        source: SignError,
    },
    #[error("the build's Packages index is unreadable")]
    Index(#[from] IndexError),
    #[error("the build's index lists an unacceptable package path {0:?}")]
    BadPath(String),
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the signing task was lost: {0}")]
    Join(String),
}

/// Hash keys an index entry may carry that this module cannot recompute;
/// they are dropped rather than left stale.
const OTHER_HASHES: [&str; 4] = ["SHA256", "SHA512", "BLAKE2B", "RMD160"];

/// Signs every new package of `pkgdir` (those its `Packages` lists and
/// `seeded` does not) and rewrites `Packages`. Returns how many were signed.
pub async fn sign_new_packages(
    signer: Arc<Signer>,
    pkgdir: &Path,
    seeded: &HashSet<String>,
) -> Result<usize, SignPackagesError> {
    let pkgdir = pkgdir.to_owned();
    let seeded = seeded.clone();
    tokio::task::spawn_blocking(move || sign_blocking(&signer, &pkgdir, &seeded))
        .await
        .map_err(|e| SignPackagesError::Join(e.to_string()))?
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SignPackagesError + '_ {
    move |source| SignPackagesError::Io { path: path.to_owned(), source }
}

/// A `PATH` from the (untrusted) index: `<category>/<pn>/<file>.gpkg.tar`.
fn checked(rel: &str) -> Result<(), SignPackagesError> {
    let parts: Vec<&str> = rel.split('/').collect();
    let ok = parts.len() == 3
        && parts.iter().all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.starts_with('.'))
        && rel.ends_with(".gpkg.tar");
    if ok { Ok(()) } else { Err(SignPackagesError::BadPath(rel.to_owned())) }
}

fn sign_blocking(signer: &Signer, pkgdir: &Path, seeded: &HashSet<String>) -> Result<usize, SignPackagesError> {
    let index_path = pkgdir.join("Packages");
    let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
    let mut index = pkgindex::parse(&text)?;
    let mut signed = 0;
    for entry in &mut index.packages {
        let Some(rel) = entry.path().map(str::to_owned) else { continue };
        if seeded.contains(&rel) {
            continue;
        }
        checked(&rel)?;
        let file = pkgdir.join(&rel);
        let meta = std::fs::symlink_metadata(&file).map_err(io(&file))?;
        if !meta.file_type().is_file() {
            return Err(SignPackagesError::BadPath(rel));
        }
        let digests = pacloud_sign::sign_gpkg_in_place(signer, &file)
            .map_err(|source| SignPackagesError::Sign { path: file.clone(), source })?;
        let mtime = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .map_err(io(&file))?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        entry.fields.insert("SIZE".into(), digests.size.to_string());
        entry.fields.insert("MD5".into(), digests.md5);
        entry.fields.insert("SHA1".into(), digests.sha1);
        entry.fields.insert("MTIME".into(), mtime.to_string());
        for k in OTHER_HASHES {
            entry.fields.remove(k);
        }
        signed += 1;
    }
    if signed > 0 {
        let tmp = pkgdir.join(".Packages.signing");
        std::fs::write(&tmp, index.render()?).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &index_path).map_err(io(&index_path))?;
        // A Packages.gz portage wrote describes the unsigned files.
        let gz = pkgdir.join("Packages.gz");
        match std::fs::remove_file(&gz) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SignPackagesError::Io { path: gz, source: e }),
        }
    }
    Ok(signed)
}

/// Why the signing key's certificate could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishKeyError {
    #[error("exporting the certificate failed")]
    Export(#[source] SignError),
    #[error("the artifact store failed while publishing the signing key")]
    Store(#[from] ArtifactError),
    #[error(transparent)]
    Bad(#[from] BadPublishedKey),
    #[error(
        "{PUBLISHED_KEY_PATH} publishes key {published} but this worker signs with {ours}: clients would refuse \
         its packages (to change keys, delete that object first)"
    )]
    OtherKey { published: String, ours: String },
    #[error("{PUBLISHED_KEY_PATH} kept changing while publishing it")]
    Contended,
}

/// Whether [`publish_signing_key`] stored the certificate or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPublication {
    /// This call stored it.
    Stored,
    /// It was already there (the same key).
    AlreadyPublished,
}

/// Publishes the signer's certificate at [`PUBLISHED_KEY_PATH`] for the API
/// to serve (create-if-absent, so the first worker's copy stays). A
/// certificate of another key there is an error: this worker's packages
/// would not verify against what clients import.
pub async fn publish_signing_key(
    store: &dyn ArtifactStore,
    signer: &Signer,
) -> Result<KeyPublication, PublishKeyError> {
    let ours = signer.fingerprint();
    let path = PublishedKey::path();
    for _ in 0..3 {
        if let Some((bytes, _)) = store.get_versioned(&path).await? {
            let published = PublishedKey::decode(&bytes)?;
            if published.fingerprint != ours {
                return Err(PublishKeyError::OtherKey { published: published.fingerprint, ours });
            }
            return Ok(KeyPublication::AlreadyPublished);
        }
        let key = PublishedKey {
            armored: signer.public_key_armored().map_err(PublishKeyError::Export)?,
            fingerprint: ours.clone(),
        };
        if store.put_bytes_if(&path, key.encode(), "application/json", None).await?.is_some() {
            return Ok(KeyPublication::Stored);
        }
        // Another worker stored one meanwhile: check it is ours.
    }
    Err(PublishKeyError::Contended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_layout_are_refused() {
        for bad in
            ["../x/y.gpkg.tar", "a/b/../c.gpkg.tar", "a/b.gpkg.tar", "a/b/c.tbz2", "a/.b/c.gpkg.tar", "/a/b/c.gpkg.tar"]
        {
            assert!(checked(bad).is_err(), "{bad}");
        }
        checked("app-misc/hello/hello-2.12-r1-1.gpkg.tar").unwrap();
    }

    #[tokio::test]
    async fn new_packages_are_signed_and_their_entries_rewritten_seeded_ones_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pkgdir = dir.path();
        let mk = |rel: &str| {
            let p = pkgdir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
            for (name, data) in [("gpkg-1", &b""[..]), ("metadata.tar.zst", b"m"), ("image.tar.zst", b"i")] {
                let mut h = tar::Header::new_ustar();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, format!("x-1-1/{name}"), data).unwrap();
            }
            b.finish().unwrap();
            std::fs::metadata(&p).unwrap().len()
        };
        let new_size = mk("app-misc/x/x-1-1.gpkg.tar");
        let old_size = mk("app-misc/y/y-1-1.gpkg.tar");
        let index = format!(
            "TIMESTAMP: 1\nVERSION: 0\n\nCPV: app-misc/x-1\nMD5: 0\nPATH: app-misc/x/x-1-1.gpkg.tar\nSHA1: 0\nSHA256: 0\nSIZE: {new_size}\n\n\
             CPV: app-misc/y-1\nMD5: 0\nPATH: app-misc/y/y-1-1.gpkg.tar\nSHA1: 0\nSIZE: {old_size}\n\n"
        );
        std::fs::write(pkgdir.join("Packages"), index).unwrap();
        std::fs::write(pkgdir.join("Packages.gz"), b"stale").unwrap();
        let signer = Arc::new(Signer::ephemeral("t").unwrap());
        let seeded: HashSet<String> = ["app-misc/y/y-1-1.gpkg.tar".to_owned()].into();
        assert_eq!(sign_new_packages(signer, pkgdir, &seeded).await.unwrap(), 1);
        let index = pkgindex::parse(&std::fs::read_to_string(pkgdir.join("Packages")).unwrap()).unwrap();
        let x = &index.packages[0];
        let bytes = std::fs::read(pkgdir.join("app-misc/x/x-1-1.gpkg.tar")).unwrap();
        assert_eq!(x.size(), Some(bytes.len() as u64));
        use sha2::Digest;
        assert_eq!(x.get("MD5").unwrap(), hex::encode(md5::Md5::digest(&bytes)));
        assert_eq!(x.get("SHA1").unwrap(), hex::encode(sha1::Sha1::digest(&bytes)));
        assert_eq!(x.get("SHA256"), None, "a hash we cannot recompute is dropped, not left stale");
        assert!(bytes.windows(20).any(|w| w == b"image.tar.zst.sig\0\0\0"), "signed");
        let y = &index.packages[1];
        assert_eq!((y.get("MD5"), y.size()), (Some("0"), Some(old_size)), "seeded entry untouched");
        assert!(!pkgdir.join("Packages.gz").exists());
    }

    #[tokio::test]
    async fn a_package_that_cannot_be_signed_fails_and_leaves_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let pkgdir = dir.path();
        std::fs::create_dir_all(pkgdir.join("a/b")).unwrap();
        std::fs::write(pkgdir.join("a/b/b-1-1.gpkg.tar"), b"garbage").unwrap();
        let index = "TIMESTAMP: 1\nVERSION: 0\n\nCPV: a/b-1\nPATH: a/b/b-1-1.gpkg.tar\nSIZE: 7\n\n";
        std::fs::write(pkgdir.join("Packages"), index).unwrap();
        let signer = Arc::new(Signer::ephemeral("t").unwrap());
        let err = sign_new_packages(signer, pkgdir, &HashSet::new()).await.unwrap_err();
        assert!(matches!(err, SignPackagesError::Sign { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(pkgdir.join("Packages")).unwrap(), index);
    }

    #[tokio::test]
    async fn the_certificate_is_published_once_and_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = pacloud_local::DirArtifactStore::new(
            dir.path().join("store"),
            "http://127.0.0.1:1",
            pacloud_local::SigningKey::new(&[1; 32]),
            Arc::new(pacloud_domain::SystemClock),
        )
        .unwrap();
        let signer = Signer::ephemeral("a").unwrap();
        assert_eq!(publish_signing_key(&store, &signer).await.unwrap(), KeyPublication::Stored);
        let stored = store.get(&PublishedKey::path()).await.unwrap();
        let key = PublishedKey::decode(&stored).unwrap();
        assert_eq!(key.fingerprint, signer.fingerprint());
        assert_eq!(key.armored, signer.public_key_armored().unwrap());
        // A second worker with the same key leaves the first copy.
        assert_eq!(publish_signing_key(&store, &signer).await.unwrap(), KeyPublication::AlreadyPublished);
        assert_eq!(store.get(&PublishedKey::path()).await.unwrap(), stored);
        // A worker with another key refuses, naming both fingerprints.
        let other = Signer::ephemeral("b").unwrap();
        let err = publish_signing_key(&store, &other).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&signer.fingerprint()) && text.contains(&other.fingerprint()), "{text}");
        assert_eq!(store.get(&PublishedKey::path()).await.unwrap(), stored);
    }
}
