//! Build records and their state machine.
//!
//! `queued -> building -> ready | failed`, with `building -> queued` when an
//! infrastructure failure releases a job, `failed -> queued` on a retry, and
//! `queued -> failed` when a job is dead-lettered. `ready` is final. Every
//! transition is a pure function from one record to the next; stores apply
//! it with a conditional write on `revision` (see [`crate::ports`]).

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::key::BuildKey;
use crate::request::BuildSpec;
use crate::time::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Building,
    Ready,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Building => "building",
            Status::Ready => "ready",
            Status::Failed => "failed",
        }
    }

    /// The legal edges of the state machine.
    pub fn can_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Queued, Building)
                | (Building, Building)
                | (Building, Ready)
                | (Building, Failed)
                | (Building, Queued)
                | (Queued, Queued)
                | (Queued, Failed)
                | (Failed, Queued)
        )
    }
}

/// A worker's claim on a key while it builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub expires_at: Millis,
}

/// What a successful build produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// Path in the artifact store, PKGDIR-shaped:
    /// `<target>/<category>/<pn>/<pf>-<build_id>.gpkg.tar`.
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub build_id: u64,
    /// USE as portage recorded it in the package.
    #[serde(rename = "use")]
    pub use_recorded: Vec<String>,
    pub build_seconds: f64,
    pub log_path: Option<String>,
    /// Where the build ran and what that costs (absent: not reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<ComputeInfo>,
}

/// The machine a build ran on, for its cost (issue: fleet economics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeInfo {
    /// EC2 instance type (`c6i.xlarge`), or `local`.
    pub instance_type: String,
    /// `spot`, `on-demand` or `local`.
    pub capacity_type: String,
    /// What the machine costs per hour, USD (spot: the price when the build started).
    pub usd_per_hour: f64,
}

impl ArtifactInfo {
    /// The build's compute cost in USD: price per hour × build seconds
    /// (None without a reported machine or with a nonsensical figure).
    pub fn cost_usd(&self) -> Option<f64> {
        let c = self.compute.as_ref()?;
        let cost = c.usd_per_hour * self.build_seconds / 3600.0;
        (c.usd_per_hour.is_finite() && c.usd_per_hour >= 0.0 && cost.is_finite() && cost >= 0.0).then_some(cost)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    /// emerge failed: the package does not build this way.
    Build,
    /// The wall-clock limit ended the build.
    Timeout,
    /// Sandbox, storage or interruption failures, retried until dead-lettered.
    Infrastructure,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureInfo {
    pub class: FailureClass,
    pub reason: String,
    pub log_path: Option<String>,
    /// The last lines of the build log.
    pub log_tail: Option<String>,
    /// Until then the failure is served from cache; after it a request
    /// queues a new attempt.
    pub cached_until: Millis,
}

/// Everything known about one build key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub key: BuildKey,
    pub spec: BuildSpec,
    pub status: Status,
    /// Increases by one on every write; stores write only if it is what the
    /// writer read (optimistic concurrency).
    pub revision: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// When a queue message for this key was last sent.
    pub enqueued_at: Millis,
    /// How many times a worker claimed this key.
    pub attempts: u32,
    pub lease: Option<Lease>,
    pub artifact: Option<ArtifactInfo>,
    pub failure: Option<FailureInfo>,
}

/// A transition that the current record does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("build {key} is {from:?}; cannot become {to:?}")]
    Illegal { key: String, from: Status, to: Status },
    #[error("build {key} is leased by {holder} until {until:?}")]
    Leased { key: String, holder: String, until: Millis },
    #[error("build {key}: the lease is not held by {worker}")]
    NotLeaseHolder { key: String, worker: String },
    #[error("build {key} was queued again recently; nothing to do")]
    NotStale { key: String },
}

impl BuildRecord {
    /// A fresh `queued` record; its message is about to be sent.
    pub fn new_queued(spec: BuildSpec, now: Millis) -> Self {
        BuildRecord {
            key: spec.key(),
            spec,
            status: Status::Queued,
            revision: 1,
            created_at: now,
            updated_at: now,
            enqueued_at: now,
            attempts: 0,
            lease: None,
            artifact: None,
            failure: None,
        }
    }

    /// A `ready` record for a package that was built as a side effect
    /// (a dependency, with its default USE) of another build.
    pub fn new_ready(spec: BuildSpec, artifact: ArtifactInfo, now: Millis) -> Self {
        let mut r = Self::new_queued(spec, now);
        r.status = Status::Ready;
        r.artifact = Some(artifact);
        r
    }

    fn next(&self, to: Status, now: Millis) -> Result<BuildRecord, TransitionError> {
        if !self.status.can_become(to) {
            return Err(TransitionError::Illegal { key: self.key.to_string(), from: self.status, to });
        }
        let mut r = self.clone();
        r.status = to;
        r.revision += 1;
        r.updated_at = now;
        Ok(r)
    }

    fn check_holder(&self, worker: &str) -> Result<(), TransitionError> {
        match &self.lease {
            Some(l) if l.owner == worker && self.status == Status::Building => Ok(()),
            _ => Err(TransitionError::NotLeaseHolder { key: self.key.to_string(), worker: worker.to_owned() }),
        }
    }

    /// Takes the lease: allowed when `queued`, or `building` under an
    /// expired lease (the previous worker is presumed dead). A live lease is
    /// never taken, not even by its own holder: a duplicate message must not
    /// start a second build.
    pub fn claim(&self, worker: &str, now: Millis, lease_for: Duration) -> Result<BuildRecord, TransitionError> {
        if let (Status::Building, Some(l)) = (self.status, &self.lease)
            && l.expires_at > now
        {
            return Err(TransitionError::Leased {
                key: self.key.to_string(),
                holder: l.owner.clone(),
                until: l.expires_at,
            });
        }
        let mut r = self.next(Status::Building, now)?;
        r.lease = Some(Lease { owner: worker.to_owned(), expires_at: now.plus(lease_for) });
        r.attempts += 1;
        r.failure = None;
        Ok(r)
    }

    /// Extends the holder's lease.
    pub fn heartbeat(&self, worker: &str, now: Millis, lease_for: Duration) -> Result<BuildRecord, TransitionError> {
        self.check_holder(worker)?;
        let mut r = self.next(Status::Building, now)?;
        r.lease = Some(Lease { owner: worker.to_owned(), expires_at: now.plus(lease_for) });
        Ok(r)
    }

    /// Publishes the artifact; only the lease holder may.
    pub fn complete(&self, worker: &str, artifact: ArtifactInfo, now: Millis) -> Result<BuildRecord, TransitionError> {
        self.check_holder(worker)?;
        let mut r = self.next(Status::Ready, now)?;
        r.lease = None;
        r.artifact = Some(artifact);
        r.failure = None;
        Ok(r)
    }

    /// Records a failure. With a worker, only the lease holder may; without
    /// one (dead-lettering), only a record nobody holds a live lease on.
    pub fn fail(
        &self,
        worker: Option<&str>,
        failure: FailureInfo,
        now: Millis,
    ) -> Result<BuildRecord, TransitionError> {
        match worker {
            Some(w) => self.check_holder(w)?,
            None => {
                if let (Status::Building, Some(l)) = (self.status, &self.lease)
                    && l.expires_at > now
                {
                    return Err(TransitionError::Leased {
                        key: self.key.to_string(),
                        holder: l.owner.clone(),
                        until: l.expires_at,
                    });
                }
            }
        }
        let mut r = self.next(Status::Failed, now)?;
        r.lease = None;
        r.failure = Some(failure);
        Ok(r)
    }

    /// Gives the job back (infrastructure failure, shutdown, interruption).
    pub fn release(&self, worker: &str, now: Millis) -> Result<BuildRecord, TransitionError> {
        self.check_holder(worker)?;
        let mut r = self.next(Status::Queued, now)?;
        r.lease = None;
        Ok(r)
    }

    /// A new attempt at a failed build; its message is about to be sent.
    pub fn retry(&self, now: Millis) -> Result<BuildRecord, TransitionError> {
        if self.status != Status::Failed {
            return Err(TransitionError::Illegal { key: self.key.to_string(), from: self.status, to: Status::Queued });
        }
        let mut r = self.next(Status::Queued, now)?;
        r.enqueued_at = now;
        Ok(r)
    }

    /// Whether a `queued` record's message may have been lost: it was last
    /// sent more than `stale_after` ago.
    pub fn is_stale(&self, now: Millis, stale_after: Duration) -> bool {
        self.status == Status::Queued && self.enqueued_at.plus(stale_after) <= now
    }

    /// Marks a stale `queued` record as sent again; the caller sends the
    /// message only if its conditional write of this record wins.
    pub fn reenqueue(&self, now: Millis, stale_after: Duration) -> Result<BuildRecord, TransitionError> {
        if self.status != Status::Queued {
            return Err(TransitionError::Illegal { key: self.key.to_string(), from: self.status, to: Status::Queued });
        }
        if !self.is_stale(now, stale_after) {
            return Err(TransitionError::NotStale { key: self.key.to_string() });
        }
        let mut r = self.next(Status::Queued, now)?;
        r.enqueued_at = now;
        Ok(r)
    }

    /// Whether a `building` record was abandoned: its lease expired more
    /// than `grace` ago and nobody took it over (the worker died and its
    /// message may be gone, e.g. dead-lettered after repeated crashes).
    pub fn is_abandoned(&self, now: Millis, grace: Duration) -> bool {
        self.status == Status::Building && self.lease.as_ref().is_some_and(|l| l.expires_at.plus(grace) <= now)
    }

    /// Puts an abandoned `building` record back to `queued`; the caller
    /// sends a new message only if its conditional write of this wins.
    pub fn reclaim_abandoned(&self, now: Millis, grace: Duration) -> Result<BuildRecord, TransitionError> {
        if !self.is_abandoned(now, grace) {
            return Err(TransitionError::NotStale { key: self.key.to_string() });
        }
        let mut r = self.next(Status::Queued, now)?;
        r.lease = None;
        r.enqueued_at = now;
        Ok(r)
    }

    /// Marks the message of a `queued` record as never sent, so the next
    /// request re-enqueues it at once.
    pub fn mark_unsent(&self, now: Millis) -> Result<BuildRecord, TransitionError> {
        let mut r = self.next(Status::Queued, now)?;
        r.enqueued_at = Millis(0);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::BuildRequest;
    use crate::target::TargetSet;

    const MIN: Duration = Duration::from_secs(60);

    fn rec() -> BuildRecord {
        let spec = BuildRequest { atom: "app-misc/hello".into(), version: "1.0".into(), ..Default::default() }
            .validate(&TargetSet::builtin())
            .unwrap();
        BuildRecord::new_queued(spec, Millis(1_000))
    }

    fn artifact() -> ArtifactInfo {
        ArtifactInfo {
            path: "default/app-misc/hello/hello-1.0-1.gpkg.tar".into(),
            sha256: "0".repeat(64),
            size: 1,
            build_id: 1,
            use_recorded: vec![],
            build_seconds: 1.0,
            log_path: None,
            compute: None,
        }
    }

    fn failure() -> FailureInfo {
        FailureInfo {
            class: FailureClass::Build,
            reason: "x".into(),
            log_path: None,
            log_tail: None,
            cached_until: Millis(0),
        }
    }

    #[test]
    fn edges_table() {
        use Status::*;
        let all = [Queued, Building, Ready, Failed];
        let legal: Vec<_> =
            all.iter().flat_map(|a| all.iter().map(move |b| (*a, *b))).filter(|(a, b)| a.can_become(*b)).collect();
        assert_eq!(legal.len(), 8);
        for s in all {
            assert!(!Ready.can_become(s), "ready is final");
        }
        assert!(!Queued.can_become(Ready));
        assert!(!Failed.can_become(Building));
    }

    #[test]
    fn happy_path_bumps_revision_and_clears_lease() {
        let r = rec();
        let b = r.claim("w1", Millis(2_000), MIN).unwrap();
        assert_eq!((b.status, b.revision, b.attempts), (Status::Building, 2, 1));
        let h = b.heartbeat("w1", Millis(3_000), MIN).unwrap();
        assert_eq!(h.lease.as_ref().unwrap().expires_at, Millis(63_000));
        let done = h.complete("w1", artifact(), Millis(4_000)).unwrap();
        assert_eq!((done.status, done.revision), (Status::Ready, 4));
        assert!(done.lease.is_none());
        assert!(done.claim("w2", Millis(5_000), MIN).is_err(), "ready is final");
        assert!(done.retry(Millis(5_000)).is_err());
    }

    #[test]
    fn lease_is_exclusive_until_it_expires() {
        let b = rec().claim("w1", Millis(2_000), MIN).unwrap();
        assert!(matches!(b.claim("w2", Millis(30_000), MIN), Err(TransitionError::Leased { .. })));
        assert!(matches!(b.complete("w2", artifact(), Millis(30_000)), Err(TransitionError::NotLeaseHolder { .. })));
        assert!(matches!(b.heartbeat("w2", Millis(30_000), MIN), Err(TransitionError::NotLeaseHolder { .. })));
        let taken = b.claim("w2", Millis(62_000), MIN).unwrap();
        assert_eq!(taken.lease.as_ref().unwrap().owner, "w2");
        assert_eq!(taken.attempts, 2);
        assert!(taken.complete("w1", artifact(), Millis(63_000)).is_err(), "old holder lost the lease");
    }

    #[test]
    fn failure_retry_release_and_dead_letter() {
        let b = rec().claim("w1", Millis(2_000), MIN).unwrap();
        let released = b.release("w1", Millis(3_000)).unwrap();
        assert_eq!((released.status, released.lease.clone()), (Status::Queued, None));
        let f = released.claim("w2", Millis(4_000), MIN).unwrap().fail(Some("w2"), failure(), Millis(5_000)).unwrap();
        assert_eq!(f.status, Status::Failed);
        let again = f.retry(Millis(6_000)).unwrap();
        assert_eq!((again.status, again.enqueued_at), (Status::Queued, Millis(6_000)));
        // dead-letter: no worker, queued record
        assert_eq!(again.fail(None, failure(), Millis(7_000)).unwrap().status, Status::Failed);
        // dead-letter refused under a live lease
        let live = again.claim("w3", Millis(7_000), MIN).unwrap();
        assert!(live.fail(None, failure(), Millis(8_000)).is_err());
        assert!(live.fail(None, failure(), Millis(68_000)).is_ok());
    }

    #[test]
    fn abandoned_builds_are_reclaimed() {
        let b = rec().claim("w1", Millis(2_000), MIN).unwrap();
        assert!(!b.is_abandoned(Millis(62_000 + 59_999), MIN), "lease + grace not over yet");
        assert!(matches!(b.reclaim_abandoned(Millis(70_000), MIN), Err(TransitionError::NotStale { .. })));
        let back = b.reclaim_abandoned(Millis(122_000), MIN).unwrap();
        assert_eq!((back.status, back.lease.clone(), back.enqueued_at), (Status::Queued, None, Millis(122_000)));
        assert_eq!(back.attempts, 1, "attempts are kept: they count towards the limit");
        assert!(back.complete("w1", artifact(), Millis(123_000)).is_err(), "the old worker cannot publish");
    }

    #[test]
    fn staleness() {
        let r = rec();
        assert!(!r.is_stale(Millis(1_000 + 59_999), MIN));
        assert!(matches!(r.reenqueue(Millis(2_000), MIN), Err(TransitionError::NotStale { .. })));
        let again = r.reenqueue(Millis(61_000), MIN).unwrap();
        assert_eq!(again.enqueued_at, Millis(61_000));
        assert!(r.mark_unsent(Millis(1_500)).unwrap().is_stale(Millis(60_000), MIN), "unsent is stale at once");
        let b = r.claim("w", Millis(2_000), MIN).unwrap();
        assert!(!b.is_stale(Millis(1_000_000), MIN), "only queued records go stale");
    }

    #[test]
    fn cost_is_price_times_build_time_when_the_machine_is_known() {
        let mut a = artifact();
        a.build_seconds = 1800.0;
        assert_eq!(a.cost_usd(), None);
        a.compute = Some(crate::ComputeInfo {
            instance_type: "c6i.xlarge".into(),
            capacity_type: "spot".into(),
            usd_per_hour: 0.068,
        });
        assert!((a.cost_usd().unwrap() - 0.034).abs() < 1e-12);
        a.compute.as_mut().unwrap().usd_per_hour = f64::NAN;
        assert_eq!(a.cost_usd(), None);
        let json = serde_json::to_value(artifact()).unwrap();
        assert!(json.get("compute").is_none(), "absent, not null: old records stay as they were");
    }
}
