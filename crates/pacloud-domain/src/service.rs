//! Request handling, written once against the ports: look a key up, create
//! the record and enqueue one job on a miss, re-enqueue a record whose
//! message was lost, retry failures whose cache time ran out, and sign
//! download URLs on a hit. Requests for a target with a tree index are
//! checked against it (404 for a cpv it lacks, 400 for a flag outside IUSE
//! or against the profile) and keyed by effective USE; the index is loaded
//! lazily from the artifact store and cached per target hash. The HTTP API
//! (local server and Lambda alike) calls only this.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::key::BuildKey;
use crate::key::KeyVersion;
use crate::ports::{
    ArtifactError, ArtifactPath, ArtifactStore, Created, Job, JobQueue, MetadataStore, QueueError, SignedUrl,
    StoreError,
};
use crate::record::{BuildRecord, FailureClass, FailureInfo, Status, TransitionError};
use crate::request::{BuildRequest, BuildSpec, SpecError};
use crate::target::{Target, TargetSet};
use crate::time::Clock;
use crate::tree::{Cpv, NotInTree, TreeIndex, TreeIndexError, UseRefusal};

/// Tunables of request handling.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Lifetime of a download URL.
    pub url_ttl: Duration,
    /// A `queued` record not re-sent for this long is presumed to have lost
    /// its message and is enqueued again.
    pub requeue_after: Duration,
    /// What a pending response advises clients to wait before polling.
    pub poll_after: Duration,
    /// Claims after which an abandoned build (its worker died without a
    /// trace, repeatedly) is recorded as failed instead of queued again.
    pub max_attempts: u32,
    /// How many ready records to keep in memory (0 turns the cache off).
    /// Ready records never change, so caching them is always safe.
    pub ready_cache_entries: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            url_ttl: Duration::from_secs(15 * 60),
            requeue_after: Duration::from_secs(15 * 60),
            poll_after: Duration::from_secs(5),
            max_attempts: 5,
            ready_cache_entries: 100_000,
        }
    }
}

/// What a request resolves to.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ready { record: Arc<BuildRecord>, url: SignedUrl },
    Pending { record: BuildRecord },
    Failed { record: BuildRecord, log_url: Option<SignedUrl> },
}

impl Outcome {
    pub fn record(&self) -> &BuildRecord {
        match self {
            Outcome::Ready { record, .. } => record,
            Outcome::Pending { record } | Outcome::Failed { record, .. } => record,
        }
    }
}

/// Why a request could not be answered. The variants decide the response:
/// client mistakes, missing credentials, or a backend that may recover.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("building needs credentials")]
    AuthRequired,
    /// The target's tree has no such package or version.
    #[error(transparent)]
    NotInTree(#[from] NotInTree),
    /// A requested flag the ebuild does not have, or that the profile
    /// masks or forces against the request.
    #[error(transparent)]
    Use(#[from] UseRefusal),
    /// The target checks requests against a tree index no worker has
    /// stored yet; retry later (never answered with a wrong key).
    #[error("the tree index of target {target} is not built yet; a worker with its repository builds it")]
    TreeIndexPending { target: String },
    /// The stored tree index cannot be used.
    #[error("the tree index of target {target} is unusable")]
    TreeIndexBroken {
        target: String,
        #[source]
        source: TreeIndexError,
    },
    #[error("no build with key {0}")]
    UnknownKey(String),
    #[error("build {0} is ready; there is nothing to retry")]
    NotRetryable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("stored record for {key} is inconsistent")]
    Inconsistent {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where workers write their liveness beats in the artifact store.
pub const WORKER_BEATS_PREFIX: &str = "workers/";
/// How often a running worker writes its beat.
pub const WORKER_BEAT_EVERY: Duration = Duration::from_secs(10);
/// A worker whose last beat is older than this counts as gone.
pub const WORKER_ALIVE_WINDOW: Duration = Duration::from_secs(60);

/// The request-handling use cases over the three ports.
pub struct BuildService {
    store: Arc<dyn MetadataStore>,
    queue: Arc<dyn JobQueue>,
    artifacts: Arc<dyn ArtifactStore>,
    targets: Arc<TargetSet>,
    clock: Arc<dyn Clock>,
    config: ServiceConfig,
    ready: RwLock<HashMap<BuildKey, Arc<BuildRecord>>>,
    /// Loaded tree indexes by target hash (they change only with it).
    trees: RwLock<HashMap<String, Arc<TreeIndex>>>,
    /// Build times of the finished records this service has read (for `eta_s`).
    history: std::sync::Mutex<crate::eta::BuildHistory>,
    /// When `eta_s` last read them: live workers and visible queue depth.
    eta_inputs: std::sync::Mutex<Option<(crate::Millis, u64, u64)>>,
    /// Medians read from the workers' build history (`stats/…`), by object
    /// path, with when they were read: what `eta_s` uses while this service
    /// has read no finished record itself (a fresh process or Lambda).
    stats_medians: std::sync::Mutex<HashMap<String, (crate::Millis, Option<f64>)>>,
}

/// How long `eta_s` reuses a median read from the workers' build history.
pub const STATS_MEDIAN_TTL: Duration = Duration::from_secs(60);

/// How long `eta_s` reuses the live-worker count and the queue depth.
pub const ETA_INPUTS_TTL: Duration = Duration::from_secs(5);

/// How many times a request re-reads after losing a conditional write.
const MAX_CAS_ROUNDS: usize = 8;

impl BuildService {
    pub fn new(
        store: Arc<dyn MetadataStore>,
        queue: Arc<dyn JobQueue>,
        artifacts: Arc<dyn ArtifactStore>,
        targets: Arc<TargetSet>,
        clock: Arc<dyn Clock>,
        config: ServiceConfig,
    ) -> Self {
        BuildService {
            store,
            queue,
            artifacts,
            targets,
            clock,
            config,
            ready: RwLock::new(HashMap::new()),
            trees: RwLock::new(HashMap::new()),
            history: std::sync::Mutex::new(crate::eta::BuildHistory::default()),
            eta_inputs: std::sync::Mutex::new(None),
            stats_medians: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The estimated seconds until the queued build of `record` is done
    /// ([`crate::eta::estimate_eta_s`]): its position is the queue's visible
    /// depth (it was sent last), the live workers `workers` (counted here when
    /// None), the medians from the finished records this service has read,
    /// or, while it has read none (a fresh process or Lambda instance), from
    /// the workers' build history in the artifact store (`stats/all.json`
    /// and the atom's object, [`crate::stats`]; each reused for
    /// [`STATS_MEDIAN_TTL`]).
    /// `Ok(None)` when it cannot be estimated (not queued, no history: then
    /// without any I/O; no live worker). The worker count and queue depth
    /// are reused for [`ETA_INPUTS_TTL`], so a burst of 202s does not list
    /// worker beats and read the queue on every request. A failed read is
    /// an error the caller logs (and answers without eta).
    pub async fn eta_s(&self, record: &BuildRecord, workers: Option<u64>) -> Result<Option<u64>, ServiceError> {
        if record.status != Status::Queued {
            return Ok(None);
        }
        let medians = self
            .history
            .lock()
            .ok()
            .and_then(|h| Some((h.all_median()?, h.atom_median(&record.spec.atom.to_string()))));
        let now = self.clock.now();
        let medians = match medians {
            Some(m) => Some(m),
            // No finished record read yet: the workers' persisted history.
            None => match self.stats_median(&crate::stats::all_path(), now).await {
                Some(all) => {
                    let own = match crate::stats::atom_path(&record.spec.atom) {
                        Ok(p) => self.stats_median(&p, now).await,
                        Err(_) => None,
                    };
                    Some((all, own))
                }
                None => None,
            },
        };
        let Some((all, own)) = medians else { return Ok(None) };
        let cached = self.eta_inputs.lock().ok().and_then(|c| *c);
        let (alive, visible) = match cached {
            Some((at, alive, visible)) if now.0.saturating_sub(at.0) < ETA_INPUTS_TTL.as_millis() as i64 => {
                (workers.unwrap_or(alive), visible)
            }
            _ => {
                let alive = match workers {
                    Some(n) => n,
                    None => self.workers_alive().await?,
                };
                let visible = self.queue.depth().await?.visible;
                if let Ok(mut c) = self.eta_inputs.lock() {
                    *c = Some((now, alive, visible));
                }
                (alive, visible)
            }
        };
        Ok(crate::eta::estimate_eta_s(visible.saturating_sub(1), alive, Some(all), own))
    }

    /// The median of one build-history object (`stats/…`), reused for
    /// [`STATS_MEDIAN_TTL`]; None when it is missing, empty, unreadable or
    /// undecodable (then there is no estimate from it, never an error).
    async fn stats_median(&self, path: &ArtifactPath, now: crate::Millis) -> Option<f64> {
        let key = path.to_string();
        let cached = self.stats_medians.lock().ok().and_then(|c| c.get(&key).copied());
        if let Some((at, m)) = cached
            && now.0.saturating_sub(at.0) < STATS_MEDIAN_TTL.as_millis() as i64
        {
            return m;
        }
        let median = match self.artifacts.get(path).await {
            Ok(bytes) => crate::stats::BuildTimes::decode_or_empty(Some(&bytes)).0.median(),
            Err(_) => None,
        };
        if let Ok(mut c) = self.stats_medians.lock() {
            if c.len() >= crate::eta::MAX_ATOMS {
                c.clear();
            }
            c.insert(key, (now, median));
        }
        median
    }

    pub fn targets(&self) -> &TargetSet {
        &self.targets
    }
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }
    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }
    pub fn queue(&self) -> &Arc<dyn JobQueue> {
        &self.queue
    }
    pub fn artifacts(&self) -> &Arc<dyn ArtifactStore> {
        &self.artifacts
    }

    /// Answers a build request. `may_build` says whether the caller may
    /// cause a build (it holds credentials, or none are configured); a cache
    /// hit or a build already under way needs none.
    pub async fn request(&self, req: &BuildRequest, may_build: bool) -> Result<Outcome, ServiceError> {
        let spec = self.spec(req).await?;
        let key = spec.key();
        if let Some(hit) = self.cached_ready(&key).await? {
            return Ok(hit);
        }
        for _ in 0..MAX_CAS_ROUNDS {
            let now = self.clock.now();
            match self.store.get(&key).await? {
                None => {
                    if !may_build {
                        return Err(ServiceError::AuthRequired);
                    }
                    let record = BuildRecord::new_queued(spec.clone(), now);
                    match self.store.create(&record).await? {
                        Created::New => {
                            self.send(&record).await?;
                            return Ok(Outcome::Pending { record });
                        }
                        Created::Existing(existing) => {
                            return self.resolve(*existing, may_build).await;
                        }
                    }
                }
                Some(existing) => match self.resolve(existing, may_build).await {
                    Err(ServiceError::Store(StoreError::Conflict)) => continue,
                    other => return other,
                },
            }
        }
        Err(ServiceError::Store(StoreError::Conflict))
    }

    /// Validates a request into the spec that is built: on a target with a
    /// tree index, checked against it and holding the effective USE (key
    /// version 2); otherwise the flags as written (key version 1).
    pub async fn spec(&self, req: &BuildRequest) -> Result<BuildSpec, ServiceError> {
        let mut spec = req.validate(&self.targets)?;
        let Some(target) = self.targets.get(&spec.target).filter(|t| t.spec.tree_index) else {
            return Ok(spec);
        };
        let index = self.tree_index(target).await?;
        let pkg = index.get(&spec.atom, &spec.version)?;
        spec.use_flags = pkg.effective(&Cpv(&spec.atom, &spec.version), &spec.use_flags)?;
        spec.key_version = KeyVersion::V2;
        Ok(spec)
    }

    /// The tree index of `target`: from memory, else loaded from the
    /// artifact store (`TreeIndex::path`) and kept.
    pub async fn tree_index(&self, target: &Target) -> Result<Arc<TreeIndex>, ServiceError> {
        if let Some(hit) = self.trees.read().ok().and_then(|m| m.get(target.hash()).cloned()) {
            return Ok(hit);
        }
        let broken = |source| ServiceError::TreeIndexBroken { target: target.name.to_string(), source };
        let path = TreeIndex::path(target)
            .map_err(|e| ServiceError::Inconsistent { key: target.name.to_string(), source: Box::new(e) })?;
        let bytes = match self.artifacts.get(&path).await {
            Ok(b) => b,
            Err(ArtifactError::NotFound(_)) => {
                return Err(ServiceError::TreeIndexPending { target: target.name.to_string() });
            }
            Err(e) => return Err(e.into()),
        };
        let index = Arc::new(TreeIndex::parse(&bytes, target).map_err(broken)?);
        if let Ok(mut m) = self.trees.write() {
            m.insert(target.hash().to_owned(), index.clone());
        }
        Ok(index)
    }

    /// Answers a poll by key. Never causes a new build, but re-sends the
    /// message of a stale `queued` record (that build was already asked for).
    pub async fn status(&self, key: &BuildKey) -> Result<Outcome, ServiceError> {
        if let Some(hit) = self.cached_ready(key).await? {
            return Ok(hit);
        }
        let record = self.store.get(key).await?.ok_or_else(|| ServiceError::UnknownKey(key.to_string()))?;
        match self.resolve(record, false).await {
            Err(ServiceError::Store(StoreError::Conflict)) => {
                let record = self.store.get(key).await?.ok_or_else(|| ServiceError::UnknownKey(key.to_string()))?;
                self.outcome(record).await
            }
            other => other,
        }
    }

    /// Queues a new attempt at a failed build.
    pub async fn retry(&self, key: &BuildKey) -> Result<Outcome, ServiceError> {
        for _ in 0..MAX_CAS_ROUNDS {
            let record = self.store.get(key).await?.ok_or_else(|| ServiceError::UnknownKey(key.to_string()))?;
            match record.status {
                Status::Failed => {}
                Status::Queued | Status::Building => return self.outcome(record).await,
                Status::Ready => return Err(ServiceError::NotRetryable(key.to_string())),
            }
            match self.requeue(&record, |r, now| r.retry(now)).await {
                Err(ServiceError::Store(StoreError::Conflict)) => continue,
                other => return other,
            }
        }
        Err(ServiceError::Store(StoreError::Conflict))
    }

    /// How many build workers wrote a liveness beat (`workers/<name>`, the
    /// unix milliseconds of the beat) within [`WORKER_ALIVE_WINDOW`].
    pub async fn workers_alive(&self) -> Result<u64, ServiceError> {
        let now = self.clock.now();
        let mut alive = 0;
        for p in self.artifacts.list(WORKER_BEATS_PREFIX).await? {
            let Ok(bytes) = self.artifacts.get(&p).await else { continue };
            let beat = String::from_utf8_lossy(&bytes).trim().parse::<i64>().unwrap_or(0);
            if beat > 0 && now.0.saturating_sub(beat) <= WORKER_ALIVE_WINDOW.as_millis() as i64 {
                alive += 1;
            }
        }
        Ok(alive)
    }

    /// A signed URL of the build log of `key`, if it has one.
    pub async fn log_url(&self, key: &BuildKey) -> Result<Option<SignedUrl>, ServiceError> {
        let record = self.store.get(key).await?.ok_or_else(|| ServiceError::UnknownKey(key.to_string()))?;
        let path = record
            .failure
            .as_ref()
            .and_then(|f| f.log_path.as_deref())
            .or_else(|| record.artifact.as_ref().and_then(|a| a.log_path.as_deref()));
        match path.map(ArtifactPath::parse) {
            Some(Ok(p)) => Ok(Some(self.artifacts.signed_url(&p, self.clock.now(), self.config.url_ttl).await?)),
            _ => Ok(None),
        }
    }

    /// Decides what an existing record means for this request.
    async fn resolve(&self, record: BuildRecord, may_build: bool) -> Result<Outcome, ServiceError> {
        let now = self.clock.now();
        match record.status {
            Status::Queued if record.is_stale(now, self.config.requeue_after) => {
                let stale = self.config.requeue_after;
                self.requeue(&record, |r, now| r.reenqueue(now, stale)).await
            }
            Status::Building if record.is_abandoned(now, self.config.requeue_after) => {
                let grace = self.config.requeue_after;
                if record.attempts >= self.config.max_attempts {
                    let failure = FailureInfo {
                        class: FailureClass::Infrastructure,
                        reason: format!(
                            "abandoned: the worker holding it stopped answering after {} attempts",
                            record.attempts
                        ),
                        log_path: None,
                        log_tail: None,
                        cached_until: now.plus(self.config.requeue_after),
                    };
                    let next = match record.fail(None, failure, now) {
                        Ok(n) => n,
                        Err(_) => return self.outcome(record).await,
                    };
                    self.store.replace(&next, record.revision).await?;
                    return self.outcome(next).await;
                }
                self.requeue(&record, |r, now| r.reclaim_abandoned(now, grace)).await
            }
            Status::Failed if may_build && record.failure.as_ref().is_some_and(|f| f.cached_until <= now) => {
                self.requeue(&record, |r, now| r.retry(now)).await
            }
            _ => self.outcome(record).await,
        }
    }

    /// Applies a transition that (re)queues the record, and sends its
    /// message only if this caller's conditional write won.
    async fn requeue(
        &self,
        record: &BuildRecord,
        f: impl FnOnce(&BuildRecord, crate::Millis) -> Result<BuildRecord, TransitionError>,
    ) -> Result<Outcome, ServiceError> {
        let next = match f(record, self.clock.now()) {
            Ok(next) => next,
            Err(_) => return self.outcome(record.clone()).await,
        };
        self.store.replace(&next, record.revision).await?;
        self.send(&next).await?;
        Ok(Outcome::Pending { record: next })
    }

    /// Sends the job message for a freshly (re)queued record. If sending
    /// fails, the record is marked unsent so the next request re-sends.
    async fn send(&self, record: &BuildRecord) -> Result<(), ServiceError> {
        let job = Job::new(record.spec.clone());
        if let Err(e) = self.queue.send(&job.encode(), Duration::ZERO).await {
            if let Ok(unsent) = record.mark_unsent(self.clock.now()) {
                // Best effort: if this write fails too, the staleness bound
                // still re-sends the message later.
                let _ = self.store.replace(&unsent, record.revision).await;
            }
            return Err(e.into());
        }
        Ok(())
    }

    async fn cached_ready(&self, key: &BuildKey) -> Result<Option<Outcome>, ServiceError> {
        if self.config.ready_cache_entries == 0 {
            return Ok(None);
        }
        let hit = self.ready.read().ok().and_then(|m| m.get(key).cloned());
        match hit {
            Some(record) => Ok(Some(self.ready_outcome(record).await?)),
            None => Ok(None),
        }
    }

    async fn ready_outcome(&self, record: Arc<BuildRecord>) -> Result<Outcome, ServiceError> {
        let artifact = record.artifact.as_ref().ok_or_else(|| ServiceError::Inconsistent {
            key: record.key.to_string(),
            source: "ready record without artifact".into(),
        })?;
        let path = ArtifactPath::parse(&artifact.path)
            .map_err(|e| ServiceError::Inconsistent { key: record.key.to_string(), source: Box::new(e) })?;
        let url = self.artifacts.signed_url(&path, self.clock.now(), self.config.url_ttl).await?;
        Ok(Outcome::Ready { record, url })
    }

    /// Turns a record into the answer for a client.
    async fn outcome(&self, record: BuildRecord) -> Result<Outcome, ServiceError> {
        match record.status {
            Status::Ready => {
                let record = Arc::new(record);
                let outcome = self.ready_outcome(record.clone()).await?;
                if self.config.ready_cache_entries > 0
                    && let Ok(mut m) = self.ready.write()
                {
                    if m.len() >= self.config.ready_cache_entries {
                        m.clear();
                    }
                    // First sight of this finished build: its build time joins the history.
                    if let (None, Some(a)) = (m.insert(record.key.clone(), record.clone()), record.artifact.as_ref())
                        && let Ok(mut h) = self.history.lock()
                    {
                        h.record(&record.spec.atom.to_string(), a.build_seconds);
                    }
                }
                Ok(outcome)
            }
            Status::Queued | Status::Building => Ok(Outcome::Pending { record }),
            Status::Failed => {
                let log_url = match record.failure.as_ref().and_then(|f| f.log_path.as_deref()) {
                    Some(p) => match ArtifactPath::parse(p) {
                        Ok(path) => {
                            Some(self.artifacts.signed_url(&path, self.clock.now(), self.config.url_ttl).await?)
                        }
                        Err(_) => None,
                    },
                    None => None,
                };
                Ok(Outcome::Failed { record, log_url })
            }
        }
    }
}
