//! The worker's side of the build history in the artifact store
//! ([`pacloud_domain::stats`]): after a successful build its seconds are
//! appended to the atom's object and to `stats/all.json` by compare-and-swap
//! (`get_versioned`, merge, `put_bytes_if` at that version, a few retries),
//! and when a build starts the atom's object is read once for the median
//! that dates the build's expected end (reported in [`crate::worker::Activity`]
//! and, on AWS, in the instance's `pacloud:activity` tag).
//!
//! None of this may fail or slow a build: the worker logs these errors and
//! goes on. A stored object that cannot be decoded reads as empty (logged)
//! and is replaced by the next append.

use std::time::Duration;

use pacloud_domain::Atom;
use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore};
use pacloud_domain::stats::{self, BuildTimes};

/// Attempts of one append before giving up (each failed attempt means
/// another worker's append went in first).
pub const APPEND_ATTEMPTS: u32 = 5;

/// A failed read or append of a build history.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("build history {path}: the artifact store failed")]
    Store {
        path: String,
        #[source]
        source: ArtifactError,
    },
    #[error("build history {path} kept changing under {attempts} attempts to append to it")]
    Contended { path: String, attempts: u32 },
    #[error("no build history path for atom {0}")]
    BadAtom(String),
}

fn store_err(path: &ArtifactPath) -> impl FnOnce(ArtifactError) -> StatsError + '_ {
    move |source| StatsError::Store { path: path.to_string(), source }
}

/// The paths one build of `atom` is appended to: the atom's, then all atoms'.
pub fn paths(atom: &Atom) -> Result<[ArtifactPath; 2], StatsError> {
    let own = stats::atom_path(atom).map_err(|_| StatsError::BadAtom(atom.to_string()))?;
    Ok([own, stats::all_path()])
}

/// Appends one build of `seconds` to the history at `path` (keeping the
/// newest [`stats::cap_for`] `path`) by compare-and-swap, at most
/// `attempts` times; returns the attempts it took. An object that cannot be
/// decoded is replaced (logged). An append that returns `Ok` is in the
/// object: a concurrent append either went in before it (and is merged) or
/// retries after it.
pub async fn append(
    store: &dyn ArtifactStore,
    path: &ArtifactPath,
    seconds: f64,
    attempts: u32,
) -> Result<u32, StatsError> {
    let cap = stats::cap_for(path);
    for attempt in 1..=attempts {
        let (current, version) = match store.get_versioned(path).await.map_err(store_err(path))? {
            Some((bytes, v)) => (Some(bytes), Some(v)),
            None => (None, None),
        };
        let (next, unreadable) = stats::appended(current.as_deref(), seconds, cap);
        if let Some(e) = unreadable {
            tracing::warn!(%path, error = &e as &dyn std::error::Error, "unreadable build history; replacing it");
        }
        if store
            .put_bytes_if(path, next, "application/json", version.as_ref())
            .await
            .map_err(store_err(path))?
            .is_some()
        {
            return Ok(attempt);
        }
        tokio::time::sleep(crate::publish::jitter(attempt) * 4).await;
    }
    Err(StatsError::Contended { path: path.to_string(), attempts })
}

/// Appends a successful build of `atom` that took `seconds` to both
/// histories ([`APPEND_ATTEMPTS`] each). Every failure is returned (the
/// worker logs them; the build stays a success); one history failing does
/// not keep the other from being written.
pub async fn record_build(store: &dyn ArtifactStore, atom: &Atom, seconds: f64) -> Vec<StatsError> {
    let paths = match paths(atom) {
        Ok(p) => p,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    for path in &paths {
        if let Err(e) = append(store, path, seconds, APPEND_ATTEMPTS).await {
            errors.push(e);
        }
    }
    errors
}

/// The median build seconds of `atom` from its history (one GET); `None`
/// when it has none. An object that cannot be decoded counts as no history
/// (logged).
pub async fn atom_median(store: &dyn ArtifactStore, atom: &Atom) -> Result<Option<f64>, StatsError> {
    let [path, _] = paths(atom)?;
    let Some((bytes, _)) = store.get_versioned(&path).await.map_err(store_err(&path))? else { return Ok(None) };
    match BuildTimes::decode(&bytes) {
        Ok(t) => Ok(t.median()),
        Err(e) => {
            tracing::warn!(%path, error = &e as &dyn std::error::Error, "unreadable build history; no expected end");
            Ok(None)
        }
    }
}

/// How long a build start waits for its atom's history at most.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
