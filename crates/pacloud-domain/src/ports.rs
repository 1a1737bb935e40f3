//! The three ports every deployment implements: a metadata store for build
//! records, a job queue, and an artifact store. Their contracts are written
//! so that DynamoDB/SQS/S3 and SQLite/a directory give the same semantics;
//! one contract test suite runs against every adapter.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::key::BuildKey;
use crate::record::BuildRecord;
use crate::request::BuildSpec;
use crate::time::Millis;

/// A failure of an adapter's backing service.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

// ---------------------------------------------------------------- metadata

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conditional write lost: the record changed (or appeared) since it
    /// was read. Re-read and decide again.
    #[error("the record changed since it was read")]
    Conflict,
    /// The backing store failed; retrying later may succeed.
    #[error("metadata store unavailable")]
    Unavailable(#[source] BoxError),
    /// A stored record could not be decoded.
    #[error("stored record for {key} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: BoxError,
    },
}

/// The result of a create-if-absent.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// This call created the record.
    New,
    /// A record existed already; here it is.
    Existing(Box<BuildRecord>),
}

/// Build records by key. Reads are strongly consistent; writes are
/// conditional: `create` only if absent, `replace` only if the stored
/// revision is the one the caller read.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    async fn get(&self, key: &BuildKey) -> Result<Option<BuildRecord>, StoreError>;
    /// Stores `record` if no record has its key.
    async fn create(&self, record: &BuildRecord) -> Result<Created, StoreError>;
    /// Stores `record` if the stored one has revision `expected_revision`;
    /// otherwise [`StoreError::Conflict`].
    async fn replace(&self, record: &BuildRecord, expected_revision: u64) -> Result<(), StoreError>;
}

/// Why [`apply`] did not write.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no record for this key")]
    Missing,
    #[error(transparent)]
    Refused(#[from] crate::record::TransitionError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Applies a transition with a conditional write: reads the record, computes
/// the next one with `f`, writes it only if nobody wrote in between, and
/// re-reads and decides again when somebody did.
pub async fn apply(
    store: &dyn MetadataStore,
    key: &BuildKey,
    f: impl Fn(&BuildRecord) -> Result<BuildRecord, crate::record::TransitionError>,
) -> Result<BuildRecord, ApplyError> {
    for _ in 0..8 {
        let cur = store.get(key).await?.ok_or(ApplyError::Missing)?;
        let next = f(&cur)?;
        match store.replace(&next, cur.revision).await {
            Ok(()) => return Ok(next),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict.into())
}

// ------------------------------------------------------------------- queue

/// The body of a queue message: versioned JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Message format version, currently 1.
    pub v: u32,
    pub key: BuildKey,
    pub spec: BuildSpec,
}

/// Largest accepted message body (SQS allows 256 KiB; ours stay far below).
pub const MAX_JOB_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JobDecodeError {
    #[error("job message is {0} bytes; at most {MAX_JOB_BYTES} are accepted")]
    TooLarge(usize),
    #[error("job message is not valid JSON for format v1")]
    Json(#[from] serde_json::Error),
    #[error("job message has format version {0}; this worker reads 1")]
    Version(u32),
    #[error("job message key does not match its spec")]
    KeyMismatch,
}

impl Job {
    pub fn new(spec: BuildSpec) -> Job {
        Job { v: 1, key: spec.key(), spec }
    }
    pub fn encode(&self) -> String {
        // A Job is plain data; serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
    pub fn decode(body: &str) -> Result<Job, JobDecodeError> {
        if body.len() > MAX_JOB_BYTES {
            return Err(JobDecodeError::TooLarge(body.len()));
        }
        let job: Job = serde_json::from_str(body)?;
        if job.v != 1 {
            return Err(JobDecodeError::Version(job.v));
        }
        if job.spec.key() != job.key {
            return Err(JobDecodeError::KeyMismatch);
        }
        Ok(job)
    }
}

/// Opaque handle for one delivery of a message (changes on every receive).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receipt(pub String);

/// One received message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    pub receipt: Receipt,
    /// How many times this message has been received, this time included.
    pub receive_count: u32,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueDepth {
    /// Ready to be received now.
    pub visible: u64,
    /// Received and not yet acknowledged or visible again.
    pub in_flight: u64,
    /// Sent with a delay that has not passed.
    pub delayed: u64,
    /// In the dead-letter queue.
    pub dead: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The receipt belongs to an older delivery (the message became visible
    /// again and was received since) or the message is gone.
    #[error("the receipt is no longer valid")]
    StaleReceipt,
    #[error("message is {0} bytes, over the queue's limit")]
    TooLarge(usize),
    #[error("job queue unavailable")]
    Unavailable(#[source] BoxError),
}

/// An at-least-once job queue with visibility timeouts and a dead-letter
/// queue: a received message is invisible until its visibility deadline,
/// then delivered again; once it has been received `max_receives` times, the
/// next attempt to receive it moves it to the dead-letter queue instead
/// (SQS redrive semantics).
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    async fn send(&self, body: &str, delay: Duration) -> Result<String, QueueError>;
    /// Waits up to `wait` for at least one message; returns at most `max`.
    async fn receive(&self, max: u32, visibility: Duration, wait: Duration) -> Result<Vec<Delivery>, QueueError>;
    /// Sets the message's visibility deadline to now + `visibility`.
    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> Result<(), QueueError>;
    /// Deletes the message. Deleting a message already deleted is not an error.
    async fn ack(&self, receipt: &Receipt) -> Result<(), QueueError>;
    /// Makes the message visible again after `delay`.
    async fn release(&self, receipt: &Receipt, delay: Duration) -> Result<(), QueueError>;
    async fn depth(&self) -> Result<QueueDepth, QueueError>;
}

// --------------------------------------------------------------- artifacts

/// A relative path in the artifact store: `/`-separated segments of
/// `[A-Za-z0-9._+-]`, none empty, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactPath(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid artifact path {0:?}")]
pub struct BadArtifactPath(pub String);

impl ArtifactPath {
    pub fn parse(s: &str) -> Result<Self, BadArtifactPath> {
        let ok = !s.is_empty()
            && s.len() <= 512
            && s.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
            });
        if ok { Ok(ArtifactPath(s.to_owned())) } else { Err(BadArtifactPath(s.to_owned())) }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ArtifactPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub size: u64,
    /// Lowercase hex SHA-256 when the store knows it.
    pub sha256: Option<String>,
}

/// The version of a stored object, for conditional replacement: the ETag
/// on S3, a digest of the content in a directory. Opaque to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl {
    pub url: String,
    pub expires_at: Millis,
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("no artifact at {0}")]
    NotFound(String),
    #[error("artifact {path}: content does not match sha256 {expected}")]
    ChecksumMismatch { path: String, expected: String },
    #[error("artifact store unavailable")]
    Unavailable(#[source] BoxError),
}

/// Binary packages, logs and indexes. Writes are whole-object and atomic: a
/// reader sees the old object, the new one, or none, never a part.
#[async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Stores a local file, verifying it against `sha256` (lowercase hex).
    async fn put_file(&self, path: &ArtifactPath, file: &Path, sha256: &str) -> Result<StoredObject, ArtifactError>;
    /// Like `put_file`, but only if nothing is stored at `path` yet; returns
    /// `None` (and stores nothing) if something is. Used for binary packages,
    /// whose paths must never be overwritten.
    async fn put_file_if_absent(
        &self,
        path: &ArtifactPath,
        file: &Path,
        sha256: &str,
    ) -> Result<Option<StoredObject>, ArtifactError>;
    async fn put_bytes(
        &self,
        path: &ArtifactPath,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<StoredObject, ArtifactError>;
    /// Every stored path that starts with `prefix` (a directory-like prefix
    /// ending in `/`), in lexical order.
    /// Reads an object with its current version; `None` when absent.
    async fn get_versioned(&self, path: &ArtifactPath) -> Result<Option<(Vec<u8>, ObjectVersion)>, ArtifactError>;
    /// Replaces the object only if it is still at `expected` (`None`: only
    /// if absent) and returns the new version; `Ok(None)` (and nothing
    /// written) when another writer changed it first. The primitive that
    /// keeps concurrent index publishers from losing each other's updates.
    async fn put_bytes_if(
        &self,
        path: &ArtifactPath,
        bytes: Vec<u8>,
        content_type: &str,
        expected: Option<&ObjectVersion>,
    ) -> Result<Option<ObjectVersion>, ArtifactError>;
    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactPath>, ArtifactError>;
    async fn head(&self, path: &ArtifactPath) -> Result<Option<StoredObject>, ArtifactError>;
    async fn get(&self, path: &ArtifactPath) -> Result<Vec<u8>, ArtifactError>;
    /// Removes the object; an absent object is not an error. Only for
    /// objects that are not packages (e.g. old worker liveness beats).
    async fn delete(&self, path: &ArtifactPath) -> Result<(), ArtifactError>;
    /// A URL that lets anyone holding it GET the object until `expires_at`.
    async fn signed_url(&self, path: &ArtifactPath, now: Millis, ttl: Duration) -> Result<SignedUrl, ArtifactError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_paths() {
        assert!(ArtifactPath::parse("default/app-misc/hello/hello-1.0-1.gpkg.tar").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "..", ".", "a/./b", "a b", "a\\b", "é", "a/"] {
            assert!(ArtifactPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_roundtrip_and_checks() {
        let spec = crate::BuildRequest { atom: "a/b".into(), version: "1".into(), ..Default::default() }
            .validate(&crate::TargetSet::builtin())
            .unwrap();
        let job = Job::new(spec);
        assert_eq!(Job::decode(&job.encode()).unwrap(), job);
        let mut v2 = job.clone();
        v2.v = 2;
        assert!(matches!(Job::decode(&v2.encode()), Err(JobDecodeError::Version(2))));
        let tampered = job.encode().replace("\"version\":\"1\"", "\"version\":\"2\"");
        assert!(matches!(Job::decode(&tampered), Err(JobDecodeError::KeyMismatch)));
        assert!(matches!(Job::decode("{"), Err(JobDecodeError::Json(_))));
        assert!(matches!(Job::decode(&"x".repeat(MAX_JOB_BYTES + 1)), Err(JobDecodeError::TooLarge(_))));
    }
}
