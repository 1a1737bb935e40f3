//! The worker-local package cache: binary packages this worker fetched
//! from the artifact store for its builds' dependency graphs, kept under
//! their store paths so later builds on this worker do not GET them again
//! (on AWS: no repeated S3 GETs). Every use is verified against the
//! target's index (`SIZE`, `SHA1`); a file that does not match is dropped
//! and fetched again. Bounded: the bytes in use are counted (one scan of the
//! directory when the cache is first used, then kept up to date on every
//! insertion); when an insertion takes the count over `max_bytes`, the
//! directory is scanned again (the truth on disk, whatever else removed or
//! replaced files meanwhile) and the least recently used files are removed
//! until it fits. The count never exceeds what the last scan found plus what
//! was written since, so it is bounded by what is really on disk.
//!
//! Builds never see the cache: packages are *copied* into a build's PKGDIR
//! (never hard-linked, so a build cannot change a cached file).

use pacloud_domain::ports::{ArtifactPath, ArtifactStore};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::publish::{Expected, PublishError};

/// A bounded, digest-verified package cache (or none).
#[derive(Debug, Clone, Default)]
pub struct PackageCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
    /// Bytes in use, once counted (shared by the clones of one cache).
    used: Arc<Mutex<Option<u64>>>,
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
        PackageCache { dir: Some(dir), max_bytes, used: Arc::default() }
    }

    /// Bytes the cache holds (counted on first use, then kept up to date).
    pub fn bytes_in_use(&self) -> Result<u64, PublishError> {
        let Some(dir) = &self.dir else { return Ok(0) };
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = *used {
            return Ok(n);
        }
        let n = scan(dir)?.iter().map(|f| f.1).sum();
        *used = Some(n);
        Ok(n)
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
            self.bytes_in_use()?;
            write_atomic(c, &bytes)?;
            let over = {
                let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
                let n = used.unwrap_or(0).saturating_add(bytes.len() as u64);
                *used = Some(n);
                n > self.max_bytes
            };
            if over {
                self.evict()?;
            }
        }
        write_atomic(dest, &bytes)
    }

    /// Scans the directory, removes least recently used files until the
    /// cache fits and records the bytes left.
    fn evict(&self) -> Result<(), PublishError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut files = scan(dir)?;
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
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) = Some(total);
        Ok(())
    }
}

/// Every file under `dir`: modification time, length, path.
fn scan(dir: &Path) -> Result<Vec<(SystemTime, u64, PathBuf)>, PublishError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(PublishError::Io { path: d, source: e }),
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                files.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), e.path()));
            }
        }
    }
    Ok(files)
}
