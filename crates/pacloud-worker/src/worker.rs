//! The worker loop over the ports: receive (long poll), claim the key's
//! lease, heartbeat (lease and message visibility) while building, build in
//! a fresh sandbox, publish, mark ready only while holding the lease, and
//! acknowledge only after the outcome is recorded.
//!
//! Failure classes: emerge failing is `build` (recorded, cached, retryable
//! on request); the wall-clock limit is `timeout`; sandbox, storage and
//! interruption failures are `infrastructure`: released with backoff and
//! retried, and after `max_attempts` recorded as failed and left to the
//! queue's redrive into the dead-letter queue.

use pacloud_domain::grammar::parse_versioned_atom;
use pacloud_domain::ports::{ArtifactPath, ArtifactStore, Delivery, Job, JobQueue, MetadataStore, Receipt};
use pacloud_domain::request::BuildSpec;
use pacloud_domain::{
    ArtifactInfo, BuildKey, BuildRecord, Clock, FailureClass, FailureInfo, TargetSet, TransitionError, UseSet,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::closure;
use crate::deproot;
use crate::fetch;
use crate::plan::{self, BuildEnv};
use crate::publish;
use crate::runner::tail_lines;
use crate::sandbox::{Sandbox, SandboxError};

/// Tunables of the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Builds run at once by this worker.
    pub concurrency: usize,
    /// Lease on the key and visibility of the message; both are extended
    /// every third of it while a build runs.
    pub lease: Duration,
    /// Long-poll wait of one receive.
    pub poll_wait: Duration,
    /// Deliveries after which an infrastructure failure is final (equal to
    /// the queue's maxReceiveCount, so the message then dead-letters).
    pub max_attempts: u32,
    /// How long a build failure is served from cache.
    pub failure_ttl: Duration,
    /// First retry delay after an infrastructure failure (doubles).
    pub retry_backoff: Duration,
    /// The machine this worker runs on and its price, recorded with every
    /// build for its cost (`GET /v1/builds/{key}` shows `cost_usd`). None: not reported.
    pub compute: Option<pacloud_domain::ComputeInfo>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 1,
            lease: Duration::from_secs(60),
            poll_wait: Duration::from_secs(20),
            max_attempts: 5,
            failure_ttl: Duration::from_secs(3600),
            retry_backoff: Duration::from_secs(10),
            compute: None,
        }
    }
}

/// What happened to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Ready,
    Failed(FailureClass),
    /// Given back to the queue (infrastructure failure or shutdown).
    Released,
    /// Acknowledged without building (already ready, leased, failed, gone).
    Dropped(&'static str),
    /// Another worker holds the lease now; our result was not published.
    LeaseLost,
    /// The message could not be read; left to the queue's redrive.
    Unreadable,
}

/// What the worker's job loops are doing: how many deliveries are being
/// processed (each holds, or is about to claim, a build lease), since when
/// the worker has been busy (`busy > 0`) or idle, and when its builds are
/// expected to be done. The AWS worker turns it into the `pacloud:activity`
/// / `pacloud:lease` tags the fleet scaler reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub busy: usize,
    pub since: pacloud_domain::Millis,
    /// When every running build is expected to be done: the latest of
    /// their starts plus their atom's median build time (the build history,
    /// [`crate::stats`]). `None` while idle or while any build in progress
    /// has no expectation (no history of its atom, history unreadable, or
    /// not yet claimed).
    pub expected_end: Option<pacloud_domain::Millis>,
}

/// The ports and parts a worker uses.
pub struct Worker {
    pub store: Arc<dyn MetadataStore>,
    pub queue: Arc<dyn JobQueue>,
    pub artifacts: Arc<dyn ArtifactStore>,
    pub targets: Arc<TargetSet>,
    pub clock: Arc<dyn Clock>,
    pub sandbox: Arc<dyn Sandbox>,
    pub env: BuildEnv,
    pub config: WorkerConfig,
    /// Prefix of lease owner names, unique per process.
    pub name: String,
    /// Notified after a resume from hibernation: every running job re-checks
    /// its lease at once (see [`crate::spot`]).
    pub recheck: Arc<tokio::sync::Notify>,
    /// Signs new packages (GLEP 78) before they are published; `None`
    /// publishes them unsigned. Set with [`Worker::with_signer`].
    pub signer: Option<Arc<pacloud_sign::Signer>>,
    /// Busy or idle, and since when ([`Worker::activity`] to watch it).
    activity: tokio::sync::watch::Sender<Activity>,
    /// The expected end of each claimed build in progress, by lease owner
    /// (`None`: no expectation); [`Activity::expected_end`] is made of them.
    expected_ends: std::sync::Mutex<HashMap<String, Option<pacloud_domain::Millis>>>,
    seq: AtomicU64,
}

use pacloud_domain::ports::ApplyError as Apply;

/// A claimed build's entry in [`Worker::expected_ends`], removed on drop.
struct ExpectedEnd<'a> {
    worker: &'a Worker,
    owner: String,
}

impl Drop for ExpectedEnd<'_> {
    fn drop(&mut self) {
        if let Ok(mut ends) = self.worker.expected_ends.lock() {
            ends.remove(&self.owner);
        }
        self.worker.mark_busy(0);
    }
}

/// Why an attempt ended without a package outcome.
#[derive(Debug, thiserror::Error)]
enum Infra {
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
    #[error(transparent)]
    Artifact(#[from] pacloud_domain::ports::ArtifactError),
    #[error("{0} is not in the artifact store after upload")]
    NotStored(String),
    #[error("{0}")]
    Fetch(String),
    #[error(transparent)]
    Distfiles(#[from] fetch::DistfileError),
    #[error(transparent)]
    Sign(#[from] crate::sign::SignPackagesError),
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn MetadataStore>,
        queue: Arc<dyn JobQueue>,
        artifacts: Arc<dyn ArtifactStore>,
        targets: Arc<TargetSet>,
        clock: Arc<dyn Clock>,
        sandbox: Arc<dyn Sandbox>,
        env: BuildEnv,
        config: WorkerConfig,
        name: String,
    ) -> Self {
        let activity = tokio::sync::watch::Sender::new(Activity { busy: 0, since: clock.now(), expected_end: None });
        Worker {
            activity,
            expected_ends: std::sync::Mutex::new(HashMap::new()),
            store,
            queue,
            artifacts,
            targets,
            clock,
            sandbox,
            env,
            config,
            name,
            recheck: Arc::new(tokio::sync::Notify::new()),
            signer: None,
            seq: AtomicU64::new(0),
        }
    }

    /// Watches what the job loops do (busy count, since when, expected end).
    pub fn activity(&self) -> tokio::sync::watch::Receiver<Activity> {
        self.activity.subscribe()
    }

    /// One more (`+1`) or one fewer (`-1`) delivery in progress (`0`: only
    /// the expected ends changed); `since` moves only when the worker turns
    /// from idle to busy or back.
    fn mark_busy(&self, delta: isize) {
        let now = self.clock.now();
        self.activity.send_if_modified(|a| {
            let busy = a.busy.saturating_add_signed(delta);
            let mut next = *a;
            if (busy == 0) != (a.busy == 0) {
                next.since = now;
            }
            next.busy = busy;
            // Read under the watch's lock, so concurrent updates cannot publish a stale set.
            next.expected_end = match self.expected_ends.lock() {
                Ok(ends) if busy > 0 && ends.len() == busy => {
                    ends.values().copied().collect::<Option<Vec<_>>>().and_then(|v| v.into_iter().max())
                }
                _ => None,
            };
            let changed = next != *a;
            *a = next;
            changed
        });
    }

    /// Registers the build of `owner` (claimed now) with its expected end:
    /// now + the median build time of `atom` from the build history (one
    /// GET, at most [`crate::stats::READ_TIMEOUT`]; no history or any error:
    /// no expectation). The guard unregisters it.
    async fn expect_end(&self, owner: &str, atom: &pacloud_domain::Atom) -> ExpectedEnd<'_> {
        let start = self.clock.now();
        let median = match tokio::time::timeout(
            crate::stats::READ_TIMEOUT,
            crate::stats::atom_median(&*self.artifacts, atom),
        )
        .await
        {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(%atom, error = &e as &dyn std::error::Error, "cannot read the build history: no expected end");
                None
            }
            Err(_) => {
                tracing::warn!(%atom, "the build history did not answer in time: no expected end");
                None
            }
        };
        let end = median.and_then(|m| Duration::try_from_secs_f64(m).ok()).map(|d| start.plus(d));
        if let Ok(mut ends) = self.expected_ends.lock() {
            ends.insert(owner.to_owned(), end);
        }
        self.mark_busy(0);
        ExpectedEnd { worker: self, owner: owner.to_owned() }
    }

    /// Appends a successful build to the build history; failures are logged.
    async fn record_history(&self, key: &BuildKey, atom: &pacloud_domain::Atom, seconds: f64) {
        for e in crate::stats::record_build(&*self.artifacts, atom, seconds).await {
            tracing::warn!(%key, %atom, seconds, error = &e as &dyn std::error::Error, "cannot record the build in the build history");
        }
    }

    /// Signs every new package with `signer` before publishing it.
    pub fn with_signer(mut self, signer: Option<Arc<pacloud_sign::Signer>>) -> Self {
        self.signer = signer;
        self
    }

    /// Runs `config.concurrency` job loops until `stop` (no new jobs) and
    /// returns when they are done. `abort` kills running builds, whose
    /// messages and leases are then released at once.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, abort: CancellationToken) {
        let beat = tokio::spawn(self.clone().beat(stop.clone()));
        let mut slots = Vec::new();
        for slot in 0..self.config.concurrency.max(1) {
            let (me, stop, abort) = (self.clone(), stop.clone(), abort.clone());
            slots.push(tokio::spawn(async move { me.slot(slot, stop, abort).await }));
        }
        for s in slots {
            let _ = s.await;
        }
        let _ = beat.await;
    }

    /// Writes this worker's liveness beat (`workers/<name>`: unix ms) until
    /// `stop`, then marks it stopped (`0`), so the API can tell clients
    /// when no worker is running (`workers` in `GET /v1/builds/{key}`).
    async fn beat(self: Arc<Self>, stop: CancellationToken) {
        use pacloud_domain::service::{WORKER_BEAT_EVERY, WORKER_BEATS_PREFIX};
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() % 1_000_000_000)
            .unwrap_or(0);
        let Ok(path) = ArtifactPath::parse(&format!("{WORKER_BEATS_PREFIX}{}-{started}", self.name)) else { return };
        let mut beats = 0u64;
        loop {
            // At start and about hourly: remove beats of stopped or long-gone workers.
            if beats.is_multiple_of(360)
                && let Err(e) = prune_beats(&*self.artifacts, self.clock.now(), BEAT_RETENTION).await
            {
                tracing::warn!(error = &e as &dyn std::error::Error, "cannot prune old worker liveness beats");
            }
            beats += 1;
            let now = self.clock.now().0.to_string().into_bytes();
            if let Err(e) = self.artifacts.put_bytes(&path, now, "text/plain").await {
                tracing::warn!(error = &e as &dyn std::error::Error, "cannot write the worker's liveness beat");
            }
            tokio::select! {
                _ = tokio::time::sleep(WORKER_BEAT_EVERY) => {}
                _ = stop.cancelled() => break,
            }
        }
        let _ = self.artifacts.put_bytes(&path, b"0".to_vec(), "text/plain").await;
    }

    async fn slot(&self, slot: usize, stop: CancellationToken, abort: CancellationToken) {
        while !stop.is_cancelled() {
            let got = tokio::select! {
                r = self.queue.receive(1, self.config.lease, self.config.poll_wait) => r,
                _ = stop.cancelled() => break,
            };
            match got {
                Ok(deliveries) => {
                    for d in deliveries {
                        self.mark_busy(1);
                        let outcome = self.process(d, &abort).await;
                        self.mark_busy(-1);
                        tracing::info!(slot, ?outcome, "job done");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
        }
    }

    async fn apply(
        &self,
        key: &BuildKey,
        f: impl Fn(&BuildRecord) -> Result<BuildRecord, TransitionError>,
    ) -> Result<BuildRecord, Apply> {
        pacloud_domain::ports::apply(&*self.store, key, f).await
    }

    fn backoff(&self, receive_count: u32) -> Duration {
        let exp = receive_count.saturating_sub(1).min(10);
        (self.config.retry_backoff * 2u32.pow(exp)).min(Duration::from_secs(900))
    }

    /// Handles one delivery from start to acknowledgement.
    pub async fn process(&self, d: Delivery, abort: &CancellationToken) -> JobOutcome {
        let owner = format!("{}-{}", self.name, self.seq.fetch_add(1, Ordering::Relaxed));
        let job = match Job::decode(&d.body) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(message = %d.message_id, error = &e as &dyn std::error::Error, "unreadable job message");
                let _ = self.queue.release(&d.receipt, self.backoff(d.receive_count)).await;
                return JobOutcome::Unreadable;
            }
        };
        let key = job.key.clone();
        let target = match self.targets.get(&job.spec.target) {
            Some(t) if t.hash() == job.spec.target_hash => t.clone(),
            _ => {
                tracing::warn!(%key, target = %job.spec.target, "this worker does not have the job's target");
                let _ = self.queue.release(&d.receipt, self.backoff(d.receive_count)).await;
                return JobOutcome::Released;
            }
        };
        let lease = self.config.lease;
        let claimed = self.apply(&key, |r| r.claim(&owner, self.clock.now(), lease)).await;
        match claimed {
            Ok(_) => {}
            Err(Apply::Missing) => return self.drop_message(&d.receipt, "no record for this key").await,
            Err(Apply::Refused(e)) => {
                tracing::info!(%key, reason = %e, "dropping message");
                return self.drop_message(&d.receipt, "already ready, failed or leased").await;
            }
            Err(Apply::Store(e)) => {
                tracing::warn!(%key, error = &e as &dyn std::error::Error, "cannot claim; releasing");
                let _ = self.queue.release(&d.receipt, self.backoff(d.receive_count)).await;
                return JobOutcome::Released;
            }
        }
        tracing::info!(%key, %owner, atom = %job.spec.portage_atom(), attempt = d.receive_count, "building");
        let _expected = self.expect_end(&owner, &job.spec.atom).await;

        // Heartbeat: extend the lease and the message's visibility.
        let lost = abort.child_token();
        let heartbeat = {
            let recheck = self.recheck.clone();
            let (store, queue, clock, receipt, key, owner, lost) = (
                self.store.clone(),
                self.queue.clone(),
                self.clock.clone(),
                d.receipt.clone(),
                key.clone(),
                owner.clone(),
                lost.clone(),
            );
            tokio::spawn(async move {
                let every = lease / 3;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = recheck.notified() => tracing::info!(%key, "re-checking the lease after a resume"),
                        _ = lost.cancelled() => return,
                    }
                    if let Err(e) = queue.extend(&receipt, lease).await {
                        tracing::warn!(%key, error = &e as &dyn std::error::Error, "cannot extend message visibility");
                    }
                    let Ok(Some(cur)) = store.get(&key).await else { continue };
                    match cur.heartbeat(&owner, clock.now(), lease) {
                        Ok(next) => {
                            if let Err(e) = store.replace(&next, cur.revision).await {
                                tracing::warn!(%key, error = &e as &dyn std::error::Error, "heartbeat write failed");
                            }
                        }
                        Err(_) => {
                            tracing::warn!(%key, %owner, "lease lost; stopping the build");
                            lost.cancel();
                            return;
                        }
                    }
                }
            })
        };

        let result = self.build(&job, &target, &owner, &lost).await;
        let lease_lost = lost.is_cancelled() && !abort.is_cancelled();
        lost.cancel();
        let _ = heartbeat.await;

        let outcome = match result {
            Ok(BuildResult::Built { artifact, deps }) => {
                let done = self.apply(&key, |r| r.complete(&owner, artifact.clone(), self.clock.now())).await;
                match done {
                    Ok(_) => {
                        self.record_dependencies(&job.spec, deps).await;
                        let _ = self.queue.ack(&d.receipt).await;
                        self.record_history(&key, &job.spec.atom, artifact.build_seconds).await;
                        JobOutcome::Ready
                    }
                    Err(Apply::Refused(_)) | Err(Apply::Missing) => {
                        tracing::warn!(%key, %owner, "lost the lease before publishing; result dropped");
                        JobOutcome::LeaseLost
                    }
                    Err(Apply::Store(e)) => {
                        self.infra(&d, &key, &owner, &format!("recording the result failed: {e}")).await
                    }
                }
            }
            Ok(BuildResult::LeaseLost) => {
                tracing::warn!(%key, %owner, "lease lost before publishing; result dropped");
                JobOutcome::LeaseLost
            }
            Ok(BuildResult::Failed { class, reason, log_path, log_tail }) => {
                let failure = FailureInfo {
                    class,
                    reason,
                    log_path,
                    log_tail: Some(log_tail),
                    cached_until: self.clock.now().plus(self.config.failure_ttl),
                };
                match self.apply(&key, |r| r.fail(Some(&owner), failure.clone(), self.clock.now())).await {
                    Ok(_) => {
                        let _ = self.queue.ack(&d.receipt).await;
                        JobOutcome::Failed(class)
                    }
                    Err(Apply::Store(e)) => {
                        self.infra(&d, &key, &owner, &format!("recording the failure failed: {e}")).await
                    }
                    Err(_) => JobOutcome::LeaseLost,
                }
            }
            Err(Infra::Sandbox(SandboxError::Cancelled)) if lease_lost => JobOutcome::LeaseLost,
            Err(Infra::Sandbox(SandboxError::Cancelled)) => {
                // Shutdown or interruption: give everything back at once.
                let _ = self.apply(&key, |r| r.release(&owner, self.clock.now())).await;
                let _ = self.queue.release(&d.receipt, Duration::ZERO).await;
                JobOutcome::Released
            }
            Err(e) => {
                tracing::warn!(%key, error = &e as &dyn std::error::Error, "infrastructure failure");
                self.infra(&d, &key, &owner, &e.to_string()).await
            }
        };
        // After the outcome is recorded (off the request's path): a clean
        // ROOT is kept for later builds ([`crate::deproot`]).
        let work_dir = self.env.work_root.join(&owner);
        if matches!(outcome, JobOutcome::Ready)
            && let Some(roots) = self.env.dep_roots.clone()
        {
            let (root, target_hash) = (work_dir.join("root"), job.spec.target_hash.to_string());
            match tokio::task::spawn_blocking(move || roots.keep(&target_hash, &root)).await {
                Ok(Ok(Some(id))) => tracing::debug!(%key, root = %id, "ROOT kept for later builds"),
                Ok(Ok(None)) => {}
                Ok(Err(why)) => tracing::info!(%key, reason = %why, "ROOT not kept for later builds"),
                Err(e) => tracing::warn!(%key, error = %e, "keeping the ROOT panicked"),
            }
        }
        if std::env::var_os("PACLOUD_KEEP_BUILD_DIRS").is_none() {
            let _ = tokio::fs::remove_dir_all(&work_dir).await;
        }
        outcome
    }

    async fn drop_message(&self, receipt: &Receipt, why: &'static str) -> JobOutcome {
        let _ = self.queue.ack(receipt).await;
        JobOutcome::Dropped(why)
    }

    /// An infrastructure failure: retry with backoff, or after the last
    /// attempt record `failed` and let the queue dead-letter the message.
    async fn infra(&self, d: &Delivery, key: &BuildKey, owner: &str, reason: &str) -> JobOutcome {
        if d.receive_count >= self.config.max_attempts {
            let failure = FailureInfo {
                class: FailureClass::Infrastructure,
                reason: format!("infrastructure failure after {} attempts: {reason}", d.receive_count),
                log_path: None,
                log_tail: None,
                cached_until: self.clock.now().plus(self.config.failure_ttl),
            };
            let _ = self.apply(key, |r| r.fail(Some(owner), failure.clone(), self.clock.now())).await;
            // Visible again: its next receive moves it to the dead-letter queue.
            let _ = self.queue.release(&d.receipt, Duration::ZERO).await;
            return JobOutcome::Failed(FailureClass::Infrastructure);
        }
        let _ = self.apply(key, |r| r.release(owner, self.clock.now())).await;
        let _ = self.queue.release(&d.receipt, self.backoff(d.receive_count)).await;
        JobOutcome::Released
    }

    /// Plans, seeds, runs and publishes one build.
    async fn build(
        &self,
        job: &Job,
        target: &pacloud_domain::Target,
        owner: &str,
        cancel: &CancellationToken,
    ) -> Result<BuildResult, Infra> {
        let mut first_attempt = None;
        if let Some(roots) = &self.env.dep_roots {
            match self.build_once(job, target, owner, cancel, Some(roots), None).await? {
                Attempt::Done(result) => return Ok(result),
                Attempt::Fresh(why) => {
                    // The reused ROOT may have changed the build: again, in
                    // an empty ROOT, with nothing of the first attempt.
                    tracing::info!(key = %job.key, %owner, reason = %why, "building again in an empty ROOT");
                    let _ = tokio::fs::remove_dir_all(self.env.work_root.join(owner)).await;
                    first_attempt = Some(why);
                }
            }
        }
        match self.build_once(job, target, owner, cancel, None, first_attempt).await? {
            Attempt::Done(result) => Ok(result),
            // Only an attempt in a kept ROOT asks for another.
            Attempt::Fresh(why) => Err(Infra::Fetch(why)),
        }
    }

    /// One build attempt; with `roots`, in a copy of a kept ROOT
    /// ([`crate::deproot`]) when one fits, and then [`Attempt::Fresh`] when
    /// that ROOT failed the build or left packages the graph does not need.
    async fn build_once(
        &self,
        job: &Job,
        target: &pacloud_domain::Target,
        owner: &str,
        cancel: &CancellationToken,
        roots: Option<&deproot::DepRoots>,
        first_attempt: Option<String>,
    ) -> Result<Attempt, Infra> {
        let mut plan = plan::prepare(&self.env, job, target, owner)?;
        let target_name = target.name.as_str();
        // Seeding: the target's index (one GET), of which the build sees only
        // the entries (and sparse placeholders) of the names its graph can reach.
        let repo = self.env.repos.get(&target.spec.repository).cloned().unwrap_or_default();
        let requested = job.spec.atom.to_string();
        let cache_dir = self.env.distfiles.as_ref().map(|c| c.dir.clone());
        let mut reach = closure::Reach::default();
        let seeded = publish::seed_selected(&*self.artifacts, target_name, &plan.pkgdir(), |index| {
            let cached = |f: &str| !f.contains('/') && cache_dir.as_ref().is_some_and(|d| d.join(f).is_file());
            reach = closure::reach(&repo, index, &requested, &cached);
            Some(reach.names.clone())
        })
        .await?;
        // Sources another worker fetched: from the shared tier, verified.
        if let Some(cache) = self.env.distfiles.as_ref().filter(|c| c.shared && reach.needs_fetch) {
            let wanted = fetch::name_manifests(&repo, &reach.names);
            let pulled = cache.pull(&*self.artifacts, &wanted).await?;
            if !pulled.is_empty() {
                tracing::info!(files = ?pulled, "distfiles pulled from the shared tier");
                let cached = |f: &str| !f.contains('/') && cache.dir.join(f).is_file();
                reach.needs_fetch = closure::reach(&repo, &seeded.index, &requested, &cached).needs_fetch;
            }
        }
        let distdir = plan.work_dir.join("distfiles");
        if let Some(cache) = &self.env.distfiles {
            cache.link_into(&distdir)?;
        }
        let mut prelude = String::new();
        if let Some(why) = &first_attempt {
            prelude.push_str(&format!(">>> pacloud: built again in an empty ROOT: {why}\n"));
        }
        // Dependencies a kept ROOT has installed already are not merged again.
        let root_dir = plan.work_dir.join("root");
        let target_hash = job.spec.target_hash.to_string();
        let reused = match roots {
            Some(roots) => reuse_root(roots, &target_hash, &requested, &reach, &seeded.index, &root_dir).await,
            None => None,
        };
        if let Some(picked) = &reused {
            let at = plan.argv.len().saturating_sub(1);
            plan.argv.splice(at..at, deproot::REUSE_OPTIONS.map(String::from));
            let names: Vec<&str> = picked.meta.packages.iter().map(|p| p.cpv.as_str()).collect();
            prelude.push_str(&format!(
                ">>> pacloud: ROOT starts as a copy of a kept ROOT with {} package(s) installed: {}\n",
                names.len(),
                names.join(" ")
            ));
        }
        // Nothing to download: no fetch step; every binary of a reached name
        // is materialised instead of the fetch step's exact list (bounded).
        // Instances the kept ROOT has installed already stay placeholders:
        // portage does not install an instance that is installed.
        let installed: std::collections::BTreeSet<(&str, Option<&str>)> = reused
            .iter()
            .flat_map(|p| p.meta.packages.iter().map(|i| (i.cpv.as_str(), i.build_time.as_deref())))
            .collect();
        let fast = if reach.needs_fetch {
            None
        } else {
            let binaries: Vec<(String, Option<u64>)> = seeded
                .index
                .packages
                .iter()
                .filter_map(|e| {
                    let cpv = e.cpv()?;
                    let (atom, _) = parse_versioned_atom(cpv).ok()?;
                    let name = atom.to_string();
                    let wanted = name != requested
                        && reach.names.contains(&name)
                        && !installed.contains(&(cpv, e.get("BUILD_TIME")));
                    wanted.then(|| (cpv.to_owned(), e.build_id()))
                })
                .collect();
            (binaries.len() <= FAST_PATH_MAX_BINARIES).then_some(binaries)
        };
        let mut log_text = format!(
            "{prelude}>>> pacloud: the build sees {} of the {} entries of the target's index ({} reachable names)\n",
            seeded.visible,
            seeded.index.packages.len(),
            reach.names.len()
        )
        .into_bytes();
        let binaries = match fast {
            Some(binaries) => {
                log_text.extend(
                    format!(
                        ">>> pacloud: no fetch step (every source the graph can need is cached); \
                         {} binary package(s) of reachable names materialised\n",
                        binaries.len()
                    )
                    .into_bytes(),
                );
                binaries
            }
            None => match self.fetch_step(job, &plan, owner, &repo, &distdir, cancel).await {
                Ok((log, binaries)) => {
                    log_text.extend(log);
                    binaries
                }
                Err(FetchStep::Failed(_)) if reused.is_some() => {
                    return Ok(Attempt::Fresh("the fetch step failed in a reused ROOT".into()));
                }
                Err(FetchStep::Failed(result)) => return Ok(Attempt::Done(result)),
                Err(FetchStep::Infra(e)) => return Err(e),
            },
        };
        // Only the binaries the graph uses are fetched (verified) over their placeholders.
        publish::materialize(
            &*self.artifacts,
            &self.env.package_cache,
            target_name,
            &plan.pkgdir(),
            &seeded,
            &binaries,
        )
        .await?;
        let outcome = self.sandbox.run(&plan, cancel.clone()).await?;
        if let (Some(picked), Some(roots)) = (&reused, roots) {
            if !outcome.timed_out && !outcome.succeeded() {
                let code = outcome.status();
                return Ok(Attempt::Fresh(format!("emerge exited with status {code} in a reused ROOT")));
            }
            if outcome.succeeded() {
                let installed = deproot::installed(&root_dir)
                    .map_err(|source| Infra::Sandbox(SandboxError::Io { path: root_dir.clone(), source }))?;
                let extra = deproot::extras(&installed, &requested);
                if !extra.is_empty() {
                    roots.forget(&picked.id);
                    return Ok(Attempt::Fresh(format!(
                        "the reused ROOT held package(s) the graph of {requested} does not need: {}",
                        extra.join(", ")
                    )));
                }
            }
        }
        log_text.extend_from_slice(b"\n>>> pacloud: build step\n");
        log_text.extend(tokio::fs::read(&outcome.log).await.unwrap_or_default());
        let log_path = ArtifactPath::parse(&format!("logs/{}/{owner}.log", job.key))
            .map_err(|_| Infra::Sandbox(SandboxError::Unavailable("bad log path".into())))?;
        self.artifacts.put_bytes(&log_path, log_text.clone(), "text/plain").await?;
        let log_tail = tail_lines(&String::from_utf8_lossy(&log_text), 30);
        let log_path = Some(log_path.to_string());
        if outcome.timed_out {
            let reason = format!("the build exceeded its wall-clock limit of {:?}", self.env.limits.wall_clock);
            return Ok(Attempt::Done(BuildResult::Failed { class: FailureClass::Timeout, reason, log_path, log_tail }));
        }
        if !outcome.succeeded() {
            let code = outcome.status();
            let reason = format!("emerge {} exited with status {code}", job.spec.portage_atom());
            return Ok(Attempt::Done(BuildResult::Failed { class: FailureClass::Build, reason, log_path, log_tail }));
        }
        // Publish only while still holding the lease (a resume after
        // hibernation may find that another worker took the key over).
        let holds = matches!(
            self.store.get(&job.key).await,
            Ok(Some(r)) if r.status == pacloud_domain::Status::Building
                && r.lease.as_ref().is_some_and(|l| l.owner == owner)
        );
        if !holds {
            return Ok(Attempt::Done(BuildResult::LeaseLost));
        }
        if let Some(signer) = &self.signer {
            crate::sign::sign_new_packages(signer.clone(), &plan.pkgdir(), &seeded.paths).await?;
        }
        let now_secs = u64::try_from(self.clock.now().as_secs()).unwrap_or(0);
        let cpv = job.spec.portage_atom().trim_start_matches('=').to_owned();
        let published =
            publish::publish(&*self.artifacts, target_name, &plan.pkgdir(), &seeded.paths, Some(&cpv), now_secs)
                .await?;
        if let Some(cache) = &self.env.distfiles
            && let Err(e) = cache.prune(std::time::SystemTime::now())
        {
            tracing::warn!(error = &e as &dyn std::error::Error, "cannot prune the distfiles cache");
        }
        let Some(main) = published.iter().find(|p| p.cpv == cpv) else {
            let reason = format!("emerge succeeded but published no package for ={cpv}");
            return Ok(Attempt::Done(BuildResult::Failed { class: FailureClass::Build, reason, log_path, log_tail }));
        };
        // The record may point at the artifact only once it is really stored.
        match self.artifacts.head(&main.path).await? {
            Some(o) if o.size == main.size => {}
            _ => {
                return Err(Infra::NotStored(main.path.to_string()));
            }
        }
        let artifact = ArtifactInfo {
            path: main.path.to_string(),
            sha256: main.sha256.clone(),
            size: main.size,
            build_id: main.build_id,
            use_recorded: main.use_flags.clone(),
            build_seconds: outcome.duration.as_secs_f64(),
            log_path,
            compute: self.config.compute.clone(),
        };
        let deps = published.into_iter().filter(|p| p.cpv != cpv).collect();
        Ok(Attempt::Done(BuildResult::Built { artifact, deps }))
    }

    /// The fetch step: network on, sources downloaded into the build's
    /// DISTDIR and admitted to the shared cache only when they match the
    /// graph's Manifests, nothing built. Returns its log and the binaries
    /// its merge list uses.
    async fn fetch_step(
        &self,
        job: &Job,
        plan: &crate::sandbox::BuildPlan,
        owner: &str,
        repo: &std::path::Path,
        distdir: &std::path::Path,
        cancel: &CancellationToken,
    ) -> Result<(Vec<u8>, Vec<(String, Option<u64>)>), FetchStep> {
        // The fetch step: network on, sources downloaded, nothing built; its
        // merge list names the binaries the graph uses.
        let fetch = plan::fetch_plan(plan);
        let fetched = self.sandbox.run(&fetch, cancel.clone()).await?;
        let mut log_text = tokio::fs::read(&fetched.log).await.unwrap_or_default();
        let fetch_log = String::from_utf8_lossy(&log_text).into_owned();
        if fetched.timed_out {
            let reason = format!("the fetch step exceeded the wall-clock limit of {:?}", self.env.limits.wall_clock);
            return Err(FetchStep::Failed(
                self.failed_early(job, owner, FailureClass::Timeout, reason, log_text).await?,
            ));
        }
        let graph = fetch::parse_merge_list(&fetch_log);
        let expected = fetch::graph_manifests(repo, &graph.ebuilds);
        // Whatever the step did, the cache only takes verified files.
        let admitted = match &self.env.distfiles {
            Some(cache) => cache.admit(distdir, &expected),
            None => Ok(Vec::new()),
        };
        if !fetched.succeeded() {
            let code = fetched.status();
            if let Some(why) = fetch::fetch_failure_reason(&fetch_log, &graph) {
                return Err(FetchStep::Infra(Infra::Fetch(format!(
                    "fetching sources failed (emerge --fetchonly exited {code}): {why}"
                ))));
            }
            if graph.ebuilds.is_empty() && graph.binaries.is_empty() {
                // Not even a merge list: the graph does not resolve.
                let reason = format!("emerge --fetchonly {} exited with status {code}", job.spec.portage_atom());
                return Err(FetchStep::Failed(
                    self.failed_early(job, owner, FailureClass::Build, reason, log_text).await?,
                ));
            }
            log_text.extend_from_slice(
                b"\n>>> pacloud: binary packages are placeholders during the fetch step; \
                  their digest messages above are expected (the real files are verified next)\n",
            );
        }
        let admitted = admitted.map_err(|e| Infra::Fetch(format!("fetched sources refused: {e}")))?;
        if let Some(cache) = &self.env.distfiles {
            cache.touch(&expected.keys().cloned().collect::<Vec<_>>());
            if !admitted.is_empty() {
                tracing::info!(files = ?admitted, "distfiles verified and cached");
                if cache.shared {
                    cache.push(&*self.artifacts, &admitted, &expected).await?;
                }
            }
        }
        Ok((log_text, graph.binaries))
    }

    /// A failure before the build step: stores the log so far.
    async fn failed_early(
        &self,
        job: &Job,
        owner: &str,
        class: FailureClass,
        reason: String,
        log_text: Vec<u8>,
    ) -> Result<BuildResult, Infra> {
        let log_path = ArtifactPath::parse(&format!("logs/{}/{owner}.log", job.key))
            .map_err(|_| Infra::Sandbox(SandboxError::Unavailable("bad log path".into())))?;
        let log_tail = tail_lines(&String::from_utf8_lossy(&log_text), 30);
        self.artifacts.put_bytes(&log_path, log_text, "text/plain").await?;
        Ok(BuildResult::Failed { class, reason, log_path: Some(log_path.to_string()), log_tail })
    }

    /// Dependencies were built with their default USE: record them as ready
    /// for the request that names no USE, unless a record exists already.
    async fn record_dependencies(&self, spec: &BuildSpec, deps: Vec<publish::PublishedPackage>) {
        // A target with a tree index keys its dependencies by effective USE
        // (key version 2): what portage recorded, restricted to the IUSE the
        // index has for that cpv. Without an index: version 1, no flags.
        let index = match self.targets.get(&spec.target).filter(|t| t.spec.tree_index) {
            None => None,
            Some(t) => {
                let loaded = match pacloud_domain::tree::TreeIndex::path(t) {
                    Ok(p) => match self.artifacts.get(&p).await {
                        Ok(bytes) => pacloud_domain::tree::TreeIndex::parse(&bytes, t).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                match loaded {
                    Ok(i) => Some(i),
                    Err(e) => {
                        tracing::warn!(target = %t.name, error = %e, "no tree index: dependencies are not recorded");
                        return;
                    }
                }
            }
        };
        for dep in deps {
            let Ok((atom, version)) = parse_versioned_atom(&dep.cpv) else { continue };
            let (use_flags, key_version) = match &index {
                None => (UseSet::default(), pacloud_domain::KeyVersion::V1),
                Some(idx) => match idx.get(&atom, &version) {
                    Ok(pkg) => (pkg.from_recorded(&dep.use_flags), pacloud_domain::KeyVersion::V2),
                    Err(e) => {
                        tracing::warn!(cpv = %dep.cpv, error = %e, "dependency not in the tree index; not recorded");
                        continue;
                    }
                },
            };
            let dep_spec = BuildSpec {
                atom,
                version,
                use_flags,
                target: spec.target.clone(),
                target_hash: spec.target_hash.clone(),
                key_version,
            };
            let artifact = ArtifactInfo {
                path: dep.path.to_string(),
                sha256: dep.sha256,
                size: dep.size,
                build_id: dep.build_id,
                use_recorded: dep.use_flags,
                build_seconds: 0.0,
                log_path: None,
                compute: None,
            };
            let record = BuildRecord::new_ready(dep_spec, artifact, self.clock.now());
            if let Err(e) = self.store.create(&record).await {
                tracing::warn!(error = &e as &dyn std::error::Error, cpv = %dep.cpv, "cannot record dependency");
            }
        }
    }
}

/// Picks a kept ROOT for a build and copies it into the build's ROOT.
async fn reuse_root(
    roots: &deproot::DepRoots,
    target_hash: &str,
    requested: &str,
    reach: &closure::Reach,
    index: &crate::pkgindex::PackageIndex,
    root_dir: &std::path::Path,
) -> Option<deproot::Picked> {
    let picked = roots.pick(target_hash, requested, &reach.names, index)?;
    match picked.restore(root_dir).await {
        Ok(()) => Some(picked),
        Err(e) => {
            tracing::warn!(error = &e as &dyn std::error::Error, "cannot copy a kept ROOT; building in an empty one");
            let _ = tokio::fs::remove_dir_all(root_dir).await;
            let _ = tokio::fs::create_dir_all(root_dir).await;
            None
        }
    }
}

/// How one build attempt ended.
enum Attempt {
    Done(BuildResult),
    /// Build again in an empty ROOT, for this reason.
    Fresh(String),
}

/// How the fetch step ended a build early.
enum FetchStep {
    Failed(BuildResult),
    Infra(Infra),
}

impl From<Infra> for FetchStep {
    fn from(e: Infra) -> Self {
        FetchStep::Infra(e)
    }
}

impl From<fetch::DistfileError> for FetchStep {
    fn from(e: fetch::DistfileError) -> Self {
        FetchStep::Infra(e.into())
    }
}

impl From<SandboxError> for FetchStep {
    fn from(e: SandboxError) -> Self {
        FetchStep::Infra(e.into())
    }
}

/// Binaries the no-fetch path materialises at most; beyond, the fetch
/// step's merge list names exactly the ones the graph uses.
const FAST_PATH_MAX_BINARIES: usize = 64;

/// Beats older than this (or of stopped workers) are deleted.
pub const BEAT_RETENTION: Duration = Duration::from_secs(3600);

/// Deletes the liveness beats (`workers/<name>`) of stopped workers (`0`)
/// and those older than `keep`; returns how many. Unreadable beats are left.
pub async fn prune_beats(
    artifacts: &dyn ArtifactStore,
    now: pacloud_domain::Millis,
    keep: Duration,
) -> Result<usize, pacloud_domain::ports::ArtifactError> {
    let mut removed = 0;
    for p in artifacts.list(pacloud_domain::service::WORKER_BEATS_PREFIX).await? {
        let Ok(bytes) = artifacts.get(&p).await else { continue };
        let Ok(beat) = String::from_utf8_lossy(&bytes).trim().parse::<i64>() else { continue };
        if beat <= 0 || now.0.saturating_sub(beat) > keep.as_millis() as i64 {
            artifacts.delete(&p).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

enum BuildResult {
    Built {
        artifact: ArtifactInfo,
        deps: Vec<publish::PublishedPackage>,
    },
    /// Another worker holds the key now: nothing was published.
    LeaseLost,
    Failed {
        class: FailureClass,
        reason: String,
        log_path: Option<String>,
        log_tail: String,
    },
}
