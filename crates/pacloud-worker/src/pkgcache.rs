//! The worker-local package cache: binary packages this worker fetched
//! from the artifact store for its builds' dependency graphs, kept under
//! their store paths so later builds on this worker do not GET them again
//! (on AWS: no repeated S3 GETs). Every use is verified against the
//! target's index (`SIZE`, `SHA1`); a file that does not match is dropped
//! and fetched again. Bounded: after each insertion the least recently used
//! files are removed until the cache fits `max_bytes`.
//!
//! Builds never see the cache: packages are *copied* into a build's PKGDIR
//! (never hard-linked, so a build cannot change a cached file).

use pacloud_domain::ports::{ArtifactPath, ArtifactStore};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::publish::{Expected, PublishError};

/// A bounded, digest-verified package cache (or none).
#[derive(Debug, Clone, Default)]
pub struct PackageCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io { path: path.to_owned(), source }
}

/// Writes `bytes` to `dest` through a temporary file in the same directory.
fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), PublishError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(
        ".{}.{}.tmp",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, dest).map_err(io(dest))
}

impl PackageCache {
    /// No cache: every package is fetched from the store.
    pub fn disabled() -> Self {
        PackageCache::default()
    }

    /// A cache in `dir` holding at most `max_bytes` (0 disables it).
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        if max_bytes == 0 {
            return PackageCache::disabled();
        }
        PackageCache { dir: Some(dir), max_bytes }
    }

    /// Puts the package at `path` into `dest`, from the cache when a
    /// verified copy is there, else from `store` (verified, then cached).
    pub async fn fetch_into(
        &self,
        store: &dyn ArtifactStore,
        path: &ArtifactPath,
        expect: &Expected,
        dest: &Path,
    ) -> Result<(), PublishError> {
        let cached = self.dir.as_ref().map(|d| d.join(path.as_str()));
        if let Some(c) = &cached
            && let Ok(bytes) = tokio::fs::read(c).await
        {
            if expect.check(&bytes).is_ok() {
                let f = std::fs::File::options().write(true).open(c).map_err(io(c))?;
                let _ = f.set_modified(SystemTime::now());
                return write_atomic(dest, &bytes);
            }
            tracing::warn!(path = %c.display(), "cached package does not match the index; fetching it again");
            let _ = std::fs::remove_file(c);
        }
        let bytes = store.get(path).await?;
        expect.check(&bytes).map_err(|check| PublishError::Digest { path: path.to_string(), check })?;
        if let Some(c) = &cached {
            write_atomic(c, &bytes)?;
            self.evict()?;
        }
        write_atomic(dest, &bytes)
    }

    /// Removes least recently used files until the cache fits.
    fn evict(&self) -> Result<(), PublishError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut files = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(io(&d))?.flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    stack.push(e.path());
                } else if m.is_file() {
                    files.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), e.path()));
                }
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        Ok(())
    }
}
