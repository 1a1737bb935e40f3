//! The port contract suite. Each adapter's test calls these functions with
//! a fresh, empty instance; together they pin the semantics the domain
//! relies on: conditional create and replace, leases through conditional
//! writes, at-least-once delivery with visibility deadlines, extension,
//! release with delay, redrive to a dead-letter queue, long polling, and
//! atomic, checksummed artifacts.
//!
//! Durations are whole seconds because SQS counts visibility in seconds.
//! Failing checks panic with a message naming the broken rule.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pacloud_domain::Clock;
use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore, Created, JobQueue, MetadataStore, StoreError};
use pacloud_domain::{BuildRecord, BuildRequest, Millis, SystemClock, TargetSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// A queued record for a unique package name.
pub fn record(name: &str) -> BuildRecord {
    let spec = BuildRequest { atom: format!("app-misc/{name}"), version: "1.0".into(), ..Default::default() }
        .validate(&TargetSet::builtin())
        .expect("valid request");
    BuildRecord::new_queued(spec, SystemClock.now())
}

/// Applies a transition through the store (the domain's conditional write).
pub async fn apply(
    store: &dyn MetadataStore,
    key: &pacloud_domain::BuildKey,
    f: impl Fn(&BuildRecord) -> Result<BuildRecord, pacloud_domain::TransitionError>,
) -> Result<BuildRecord, String> {
    pacloud_domain::ports::apply(store, key, f).await.map_err(|e| e.to_string())
}

/// Metadata store: create-if-absent, conditional replace, races, leases.
pub async fn metadata_store(store: Arc<dyn MetadataStore>) {
    let r = record("contract-store");
    assert!(store.get(&r.key).await.unwrap().is_none(), "absent key reads as None");
    assert_eq!(store.create(&r).await.unwrap(), Created::New, "first create wins");
    match store.create(&record("contract-store")).await.unwrap() {
        Created::Existing(existing) => assert_eq!(*existing, r, "second create returns the stored record unchanged"),
        Created::New => panic!("create-if-absent created twice"),
    }
    assert_eq!(store.get(&r.key).await.unwrap().as_ref(), Some(&r), "get returns what was created");

    // Conditional replace.
    let claimed = r.claim("w1", SystemClock.now(), 60 * SEC).unwrap();
    assert!(
        matches!(store.replace(&claimed, r.revision + 5).await, Err(StoreError::Conflict)),
        "wrong revision conflicts"
    );
    store.replace(&claimed, r.revision).await.expect("right revision replaces");
    assert!(matches!(store.replace(&claimed, r.revision).await, Err(StoreError::Conflict)), "stale revision conflicts");
    assert_eq!(store.get(&r.key).await.unwrap().unwrap(), claimed);
    let ghost = record("contract-ghost");
    assert!(
        matches!(store.replace(&ghost, ghost.revision).await, Err(StoreError::Conflict)),
        "replace of absent key conflicts"
    );

    // Racing creates: exactly one wins.
    let racer = record("contract-race");
    let wins = futures::future::join_all((0..32).map(|_| {
        let store = store.clone();
        let racer = racer.clone();
        async move { matches!(store.create(&racer).await.unwrap(), Created::New) }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "exactly one of 32 racing creates wins");

    // Racing claims of one revision: exactly one lease.
    let wins = futures::future::join_all((0..16).map(|i| {
        let store = store.clone();
        let racer = racer.clone();
        async move {
            let next = racer.claim(&format!("w{i}"), SystemClock.now(), 60 * SEC).unwrap();
            store.replace(&next, racer.revision).await.is_ok()
        }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "exactly one of 16 racing claims wins");

    // Lease expiry and takeover through the store.
    let l = record("contract-lease");
    store.create(&l).await.unwrap();
    apply(&*store, &l.key, |c| c.claim("w1", SystemClock.now(), SEC)).await.expect("w1 claims");
    let refused = apply(&*store, &l.key, |c| c.claim("w2", SystemClock.now(), 60 * SEC)).await;
    assert!(refused.is_err(), "a live lease is not taken over");
    tokio::time::sleep(SEC + Duration::from_millis(100)).await;
    apply(&*store, &l.key, |c| c.claim("w2", SystemClock.now(), 60 * SEC)).await.expect("expired lease is taken over");
    let artifact = pacloud_domain::ArtifactInfo {
        path: "default/app-misc/x/x-1.0-1.gpkg.tar".into(),
        sha256: "0".repeat(64),
        size: 1,
        build_id: 1,
        use_recorded: vec![],
        build_seconds: 0.1,
        log_path: None,
        compute: None,
    };
    let late = apply(&*store, &l.key, |c| c.complete("w1", artifact.clone(), SystemClock.now())).await;
    assert!(late.is_err(), "the old holder cannot publish after losing its lease");
    let done = apply(&*store, &l.key, |c| c.complete("w2", artifact.clone(), SystemClock.now())).await.unwrap();
    assert_eq!(store.get(&l.key).await.unwrap().unwrap(), done, "the new holder publishes");
}

/// Job queue. `queue` must have been made with `max_receives == 2`.
pub async fn job_queue(queue: Arc<dyn JobQueue>) {
    let none = Duration::ZERO;
    // Delivery and invisibility.
    queue.send("m1", none).await.unwrap();
    let got = queue.receive(10, 30 * SEC, none).await.unwrap();
    assert_eq!(got.len(), 1, "a sent message is received");
    assert_eq!((got[0].body.as_str(), got[0].receive_count), ("m1", 1));
    assert!(queue.receive(10, 30 * SEC, none).await.unwrap().is_empty(), "a received message is invisible");
    queue.ack(&got[0].receipt).await.unwrap();
    queue.ack(&got[0].receipt).await.expect("acking a deleted message is not an error");

    // Visibility timeout, then redelivery with a new receipt.
    queue.send("m2", none).await.unwrap();
    let first = queue.receive(1, SEC, none).await.unwrap().pop().expect("m2");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = queue
        .receive(1, 30 * SEC, none)
        .await
        .unwrap()
        .pop()
        .expect("m2 is delivered again after its visibility timeout");
    assert_eq!((again.body.as_str(), again.receive_count), ("m2", 2));
    assert_ne!(again.receipt, first.receipt, "each delivery has its own receipt");
    queue.ack(&again.receipt).await.unwrap();

    // Extend keeps it invisible past the first deadline.
    queue.send("m3", none).await.unwrap();
    let d = queue.receive(1, SEC, none).await.unwrap().pop().expect("m3");
    queue.extend(&d.receipt, 4 * SEC).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(queue.receive(1, 30 * SEC, none).await.unwrap().is_empty(), "an extended message stays invisible");

    // Release with delay 0 makes it visible at once.
    queue.release(&d.receipt, none).await.unwrap();
    let d = queue.receive(1, 30 * SEC, none).await.unwrap().pop().expect("a released message is visible at once");
    assert_eq!((d.body.as_str(), d.receive_count), ("m3", 2));
    queue.ack(&d.receipt).await.unwrap();

    // Release with a delay hides it for that long.
    queue.send("m5", none).await.unwrap();
    let d = queue.receive(1, 30 * SEC, none).await.unwrap().pop().expect("m5");
    queue.release(&d.receipt, 2 * SEC).await.unwrap();
    assert!(queue.receive(1, 30 * SEC, none).await.unwrap().is_empty(), "released with delay: not yet visible");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let d = queue.receive(1, 30 * SEC, none).await.unwrap().pop().expect("visible after the delay");
    assert_eq!(d.body, "m5");
    queue.ack(&d.receipt).await.unwrap();

    // Delay on send.
    queue.send("m4", SEC).await.unwrap();
    assert!(queue.receive(1, 30 * SEC, none).await.unwrap().is_empty(), "a delayed message is not visible at once");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let d = queue.receive(1, 30 * SEC, none).await.unwrap().pop().expect("visible after its delay");
    queue.ack(&d.receipt).await.unwrap();

    // Redrive: received max_receives (2) times, the next receive moves it.
    let before = queue.depth().await.unwrap().dead;
    queue.send("poison", none).await.unwrap();
    for n in 1..=2 {
        let d = queue.receive(1, 30 * SEC, none).await.unwrap().pop().expect("poison delivered");
        assert_eq!(d.receive_count, n);
        queue.release(&d.receipt, none).await.unwrap();
    }
    assert!(queue.receive(1, 30 * SEC, SEC).await.unwrap().is_empty(), "past max_receives it is not delivered");
    assert_eq!(queue.depth().await.unwrap().dead, before + 1, "it is in the dead-letter queue");

    // Long poll returns as soon as a message arrives.
    let q2 = queue.clone();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        q2.send("late", Duration::ZERO).await.unwrap();
    });
    let t = Instant::now();
    let got = queue.receive(1, 30 * SEC, 5 * SEC).await.unwrap();
    sender.await.unwrap();
    assert_eq!(got.len(), 1, "a long poll receives a message sent while it waits");
    assert!(
        t.elapsed() < Duration::from_millis(4500),
        "a long poll returns when the message arrives, not at its deadline"
    );
    queue.ack(&got[0].receipt).await.unwrap();
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (0, 0), "everything acknowledged: {depth:?}");
}

/// Artifact store: whole-object writes, checksums, absence, signed URLs.
pub async fn artifact_store(store: Arc<dyn ArtifactStore>) {
    let p = ArtifactPath::parse("contract/app-misc/x/x-1.0-1.gpkg.tar").unwrap();
    assert!(store.head(&p).await.unwrap().is_none(), "absent object heads as None");
    assert!(matches!(store.get(&p).await, Err(ArtifactError::NotFound(_))), "absent object gets NotFound");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let wrong = "0".repeat(64);
    assert!(
        matches!(store.put_file(&p, &file, &wrong).await, Err(ArtifactError::ChecksumMismatch { .. })),
        "a file that does not match its checksum is refused"
    );
    assert!(store.head(&p).await.unwrap().is_none(), "a refused upload leaves nothing behind");
    let sha = sha256_hex(&bytes);
    let stored = store.put_file(&p, &file, &sha).await.unwrap();
    assert_eq!(stored.size, bytes.len() as u64);
    assert_eq!(store.head(&p).await.unwrap().map(|o| o.size), Some(bytes.len() as u64));
    assert_eq!(store.get(&p).await.unwrap(), bytes, "get returns the bytes put");
    // Idempotent re-upload of the same path.
    store.put_file(&p, &file, &sha).await.expect("uploading the same object again is fine");

    // Create-if-absent never overwrites.
    let q = ArtifactPath::parse("contract/app-misc/x/x-1.0-2.gpkg.tar").unwrap();
    assert!(store.put_file_if_absent(&q, &file, &sha).await.unwrap().is_some(), "absent: stored");
    let other = dir.path().join("other");
    std::fs::write(&other, b"other bytes").unwrap();
    let other_sha = sha256_hex(b"other bytes");
    assert!(store.put_file_if_absent(&q, &other, &other_sha).await.unwrap().is_none(), "present: refused");
    assert_eq!(store.get(&q).await.unwrap(), bytes, "the first object is kept");
    let y = ArtifactPath::parse("contract/y").unwrap();
    assert!(
        matches!(store.put_file_if_absent(&y, &other, &wrong).await, Err(ArtifactError::ChecksumMismatch { .. })),
        "create-if-absent verifies the checksum too"
    );

    let idx = ArtifactPath::parse("contract/Packages").unwrap();
    store.put_bytes(&idx, b"one".to_vec(), "text/plain").await.unwrap();
    store.put_bytes(&idx, b"two".to_vec(), "text/plain").await.unwrap();
    assert_eq!(store.get(&idx).await.unwrap(), b"two", "put_bytes replaces");

    // Conditional replacement (the index's compare-and-swap).
    let cas = ArtifactPath::parse("contract/cas/Packages").unwrap();
    assert!(store.get_versioned(&cas).await.unwrap().is_none(), "absent: no version");
    let v1 = store.put_bytes_if(&cas, b"v1".to_vec(), "text/plain", None).await.unwrap().expect("absent: created");
    assert!(
        store.put_bytes_if(&cas, b"other".to_vec(), "text/plain", None).await.unwrap().is_none(),
        "create-if-absent refuses an existing object"
    );
    let (bytes, seen) = store.get_versioned(&cas).await.unwrap().expect("present");
    assert_eq!((bytes.as_slice(), &seen), (&b"v1"[..], &v1), "get_versioned returns the version put_bytes_if gave");
    let v2 = store.put_bytes_if(&cas, b"v2".to_vec(), "text/plain", Some(&v1)).await.unwrap().expect("at v1: replaced");
    assert_ne!(v1, v2);
    assert!(
        store.put_bytes_if(&cas, b"lost".to_vec(), "text/plain", Some(&v1)).await.unwrap().is_none(),
        "a writer holding a stale version is refused"
    );
    assert_eq!(store.get(&cas).await.unwrap(), b"v2", "the refused write left nothing");
    // Listing by prefix.
    let listed: Vec<String> = store.list("contract/app-misc/").await.unwrap().iter().map(|p| p.to_string()).collect();
    assert_eq!(listed, vec!["contract/app-misc/x/x-1.0-1.gpkg.tar", "contract/app-misc/x/x-1.0-2.gpkg.tar"]);
    assert!(store.list("nothing-here/").await.unwrap().is_empty());
    assert_eq!(store.list("contract/").await.unwrap().len(), 4, "Packages, the CAS object and both packages");

    let now = Millis(1_900_000_000_000);
    let url = store.signed_url(&p, now, 600 * SEC).await.unwrap();
    assert!(url.expires_at >= now.plus(600 * SEC), "URL lives at least as long as asked");
    assert!(url.expires_at <= now.plus(602 * SEC), "URL does not live much longer than asked");
    assert!(url.url.contains("x-1.0-1.gpkg.tar"), "URL names the object: {}", url.url);
}

/// Many read-modify-write loops on one object at once through
/// `get_versioned` + `put_bytes_if`: no update is lost. Needs an atomic
/// compare-and-swap; moto 5.2.5 checks `If-Match` and then writes without a
/// lock, so only adapters with a real atomic primitive run this.
pub async fn artifact_cas_race(store: Arc<dyn ArtifactStore>) {
    let cas = ArtifactPath::parse("race/Packages").unwrap();
    assert!(store.put_bytes_if(&cas, b"start".to_vec(), "text/plain", None).await.unwrap().is_some());
    let writers = 12usize;
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            let store = store.clone();
            let cas = cas.clone();
            tokio::spawn(async move {
                loop {
                    let (mut bytes, v) = store.get_versioned(&cas).await.unwrap().expect("present");
                    bytes.extend_from_slice(format!(" w{i}").as_bytes());
                    if store.put_bytes_if(&cas, bytes, "text/plain", Some(&v)).await.unwrap().is_some() {
                        return;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let text = String::from_utf8(store.get(&cas).await.unwrap()).unwrap();
    for i in 0..writers {
        assert!(text.split(' ').any(|w| w == format!("w{i}")), "update of writer {i} lost: {text}");
    }
    assert_eq!(text.split(' ').count(), writers + 1, "each update applied once: {text}");
}

/// Lowercase hex SHA-256 (the suite has no other hashing dependency).
fn sha256_hex(bytes: &[u8]) -> String {
    pacloud_domain::key::sha256_hex(bytes)
}

/// Plays a worker through the real ports, for tests and benchmarks of the
/// request path that run no builds: claims `key`, stores `bytes` as its
/// package under the PKGDIR layout (via a file in `scratch`), and completes
/// the record. Returns what the record now points at.
pub async fn complete_as_worker(
    store: &dyn MetadataStore,
    artifacts: &dyn ArtifactStore,
    key: &pacloud_domain::BuildKey,
    now: Millis,
    scratch: &std::path::Path,
    bytes: &[u8],
) -> pacloud_domain::ArtifactInfo {
    let worker = "test-worker";
    let claimed = pacloud_domain::ports::apply(store, key, |r| r.claim(worker, now, 60 * SEC)).await.expect("claim");
    let spec = &claimed.spec;
    let path = format!("{}/{}/{}-{}-1.gpkg.tar", spec.target, spec.atom, spec.atom.package(), spec.version);
    let file = scratch.join(format!("{key}.gpkg.tar"));
    std::fs::write(&file, bytes).expect("write scratch package");
    let sha256 = sha256_hex(bytes);
    artifacts.put_file(&ArtifactPath::parse(&path).expect("package path"), &file, &sha256).await.expect("upload");
    let artifact = pacloud_domain::ArtifactInfo {
        path,
        sha256,
        size: bytes.len() as u64,
        build_id: 1,
        use_recorded: spec.use_flags.enabled().map(str::to_owned).collect(),
        build_seconds: 1.0,
        log_path: None,
        // A spot c6i.xlarge at $0.072/h: the record's cost is 0.072 / 3600 USD.
        compute: Some(pacloud_domain::ComputeInfo {
            instance_type: "c6i.xlarge".into(),
            capacity_type: "spot".into(),
            usd_per_hour: 0.072,
        }),
    };
    pacloud_domain::ports::apply(store, key, |r| r.complete(worker, artifact.clone(), now)).await.expect("complete");
    artifact
}
