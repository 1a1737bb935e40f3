//! The scaler against moto's EC2 and SQS (everything moto implements:
//! DescribeFleets, DescribeInstances by tag, DescribeSpotPriceHistory,
//! TerminateInstances, GetQueueAttributes). moto does not implement
//! ModifyFleet or DescribeFleetHistory: the first is covered by the SDK
//! replay test in `pacloud-aws/tests/fleet_replay.rs`; here their absence is
//! the "API error" case — the scaler must then take no irreversible action.
//! The worker side of the tag contract (`run_activity_tagger`, CreateTags)
//! runs against moto too: the scaler scales down what the tagger reports idle.

use pacloud_aws::fleet::FleetClient;
use pacloud_aws::testkit::Moto;
use pacloud_aws::testkit::fleet::{create_worker_fleet, queue_with, run_worker, state_of};
use pacloud_fleet::{Action, Activity, CpuFamily, FleetTarget, PacloudPolicy, TerminateReason};
use pacloud_scaler::{Settings, handle, tick};
use serde_json::json;

const NOW: u64 = 2_000_000_000;

async fn setup(moto: &Moto) -> FleetClient {
    FleetClient::connect(&moto.base_config()).await
}

fn settings(queue_url: &str) -> Settings {
    Settings {
        queue_url: queue_url.into(),
        family_queues: Default::default(),
        policy: PacloudPolicy::default(),
        bucket: None,
    }
}

fn idle_for(secs: u64) -> String {
    format!("idle:{}", NOW - secs)
}

#[tokio::test]
async fn snapshot_reads_queue_fleet_and_tagged_instances() {
    let moto = Moto::start();
    let c = setup(&moto).await;
    let q = queue_with(&c, "jobs", 2, 1).await;
    let fleet_id = create_worker_fleet(&c, "x86-64", 2).await;
    let idle = run_worker(&c, "x86-64", Some(&idle_for(50)), false).await;
    let busy = run_worker(&c, "x86-64", Some(&format!("busy:{}:{}", NOW - 10, NOW + 600)), true).await;
    let silent = run_worker(&c, "x86-64", None, false).await;
    let _other_family = run_worker(&c, "arm64", Some("idle:1"), false).await;

    let fleets = c.worker_fleets().await.unwrap();
    assert_eq!(fleets.len(), 1);
    assert_eq!(fleets[0].fleet_id, fleet_id);
    assert_eq!(fleets[0].family, CpuFamily::X86_64);
    assert_eq!(fleets[0].target, FleetTarget { total: 2, on_demand: 0 });

    let s = settings(&q);
    let history = pacloud_scaler::read_build_history(&c, &s).await;
    let (snap, warnings) = pacloud_scaler::family_snapshot(&c, &s, &fleets[0], &history, NOW).await.unwrap();
    assert_eq!((snap.queue.visible, snap.queue.in_flight), (2, 1));
    // moto's own fleet instances are untagged: only the three x86-64 workers.
    let mut ids: Vec<&str> = snap.instances.iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    let mut want = vec![idle.as_str(), busy.as_str(), silent.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let by = |id: &str| snap.instances.iter().find(|i| i.id == id).unwrap().clone();
    assert_eq!(by(&idle).activity, Activity::Idle { since: NOW - 50 });
    assert_eq!(by(&busy).activity, Activity::Busy { since: NOW - 10, expected_done_at: Some(NOW + 600) });
    assert!(by(&busy).holds_lease);
    assert_eq!(by(&silent).activity, Activity::Unknown);
    // DescribeFleetHistory is not in moto: reported, not fatal.
    assert!(warnings.iter().any(|w| w.contains("fleet history")), "{warnings:?}");
}

#[tokio::test]
async fn tick_terminates_only_the_long_idle_instance() {
    let moto = Moto::start();
    let c = setup(&moto).await;
    let q = queue_with(&c, "jobs", 0, 0).await;
    // Three workers, one surplus: the policy wants 2 = the fleet's target, so no ModifyFleet is needed.
    create_worker_fleet(&c, "x86-64", 2).await;
    let long = run_worker(&c, "x86-64", Some(&idle_for(3600)), false).await;
    // Idle for less than the idle timeout (10 s).
    let short = run_worker(&c, "x86-64", Some(&idle_for(5)), false).await;
    let busy = run_worker(&c, "x86-64", Some(&format!("busy:{}", NOW - 3600)), true).await;

    let report = tick(&c, &settings(&q), NOW).await.unwrap();
    assert_eq!(report.families.len(), 1);
    let f = &report.families[0];
    assert!(
        f.actions.contains(&Action::Terminate {
            family: CpuFamily::X86_64,
            instance_ids: vec![long.clone()],
            reason: TerminateReason::Idle
        }),
        "{:?}",
        f.actions
    );
    assert!(!f.actions.iter().any(|a| matches!(a, Action::SetTargetCapacity { .. })), "{:?}", f.actions);
    assert_eq!(f.terminated, vec![long.clone()]);
    assert_eq!(state_of(&c, &long).await, "terminated");
    assert_eq!(state_of(&c, &short).await, "running");
    assert_eq!(state_of(&c, &busy).await, "running");

    // Idempotent: a tick right after (a nudge) has nothing left to do.
    let again = tick(&c, &settings(&q), NOW + 2).await.unwrap();
    assert!(again.families[0].terminated.is_empty());
}

#[tokio::test]
async fn a_failing_modify_fleet_means_no_termination() {
    let moto = Moto::start();
    let c = setup(&moto).await;
    let q = queue_with(&c, "jobs", 0, 0).await;
    // The fleet says 5; the policy wants 0 after terminating both idle workers: ModifyFleet
    // (not implemented by moto: an API error) must succeed before anything is terminated.
    create_worker_fleet(&c, "x86-64", 5).await;
    let a = run_worker(&c, "x86-64", Some(&idle_for(3600)), false).await;
    let b = run_worker(&c, "x86-64", Some(&idle_for(3600)), false).await;

    let report = tick(&c, &settings(&q), NOW).await.unwrap();
    let f = &report.families[0];
    assert!(f.actions.iter().any(|x| matches!(x, Action::SetTargetCapacity { total: 0, .. })), "{:?}", f.actions);
    assert!(f.actions.iter().any(|x| matches!(x, Action::Terminate { .. })));
    assert!(f.terminated.is_empty());
    assert!(f.errors.iter().any(|e| e.contains("ModifyFleet")), "{:?}", f.errors);
    assert_eq!(state_of(&c, &a).await, "running");
    assert_eq!(state_of(&c, &b).await, "running");
}

#[tokio::test]
async fn missing_fleet_and_bad_events_take_no_action() {
    let moto = Moto::start();
    let c = setup(&moto).await;
    let q = queue_with(&c, "jobs", 3, 0).await;
    let idle = run_worker(&c, "x86-64", Some(&idle_for(3600)), false).await;
    let mut s = settings(&q);
    s.family_queues.insert(CpuFamily::X86_64, q.clone());

    let out = handle(&c, &s, &json!({"source": "aws.events", "detail-type": "Scheduled Event"}), NOW).await;
    assert_eq!(out["families"][0]["errors"][0], "no worker fleet", "{out}");
    assert_eq!(state_of(&c, &idle).await, "running");

    let out = handle(&c, &s, &json!({"hello": "world"}), NOW).await;
    assert!(out["ignored"].as_str().unwrap().contains("unrecognised event"), "{out}");

    let batch = json!({"Records": [{"eventSource": "aws:sqs", "messageId": "m", "body": "not json"}]});
    let out = handle(&c, &s, &batch, NOW).await;
    assert_eq!(out["batchItemFailures"], json!([]));
    assert_eq!(state_of(&c, &idle).await, "running");
}

/// Waits until moto shows `id` with `activity` and `lease` (the tagger works in the background).
async fn wait_for_tags(c: &FleetClient, id: &str, activity: Activity, lease: bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let all = c.worker_instances(CpuFamily::X86_64).await.unwrap();
        let i = all.iter().find(|i| i.id == id).expect("the worker instance");
        if i.activity == activity && i.holds_lease == lease {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "tags of {id} never became {activity:?} / lease {lease}: {i:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tags_set_by_the_worker_tagger_let_the_scaler_scale_down_idle_never_busy_or_leased() {
    use pacloud_aws::fleet::{WorkerState, run_activity_tagger};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    let moto = Moto::start();
    let c = setup(&moto).await;
    let q = queue_with(&c, "jobs", 0, 0).await;
    // After terminating the one idle worker, two remain = the fleet's target: no ModifyFleet.
    create_worker_fleet(&c, "x86-64", 2).await;
    let idle = run_worker(&c, "x86-64", None, false).await;
    let busy = run_worker(&c, "x86-64", None, false).await;
    // Hibernated-with-a-lease style: reported idle, but the lease tag is set.
    let leased = run_worker(&c, "x86-64", Some(&idle_for(3600)), true).await;

    let stop = CancellationToken::new();
    let state = |busy, since| WorkerState { busy, since, expected_end: None };
    let (idle_tx, idle_rx) = tokio::sync::watch::channel(state(false, NOW - 3600));
    let (busy_tx, busy_rx) = tokio::sync::watch::channel(state(false, NOW - 3600));
    let every = Duration::from_millis(50);
    let t1 = tokio::spawn(run_activity_tagger(c.clone(), idle.clone(), idle_rx, every, stop.clone()));
    let t2 = tokio::spawn(run_activity_tagger(c.clone(), busy.clone(), busy_rx, every, stop.clone()));
    wait_for_tags(&c, &idle, Activity::Idle { since: NOW - 3600 }, false).await;
    wait_for_tags(&c, &busy, Activity::Idle { since: NOW - 3600 }, false).await;
    // The second worker takes a build: the change reaches its tags.
    busy_tx.send_replace(state(true, NOW - 5));
    wait_for_tags(&c, &busy, Activity::Busy { since: NOW - 5, expected_done_at: None }, true).await;
    // DescribeInstances shows the raw tags the scaler reads.
    let raw = c.ec2.describe_instances().instance_ids(&busy).send().await.unwrap();
    let tags: Vec<(String, String)> = raw.reservations()[0].instances()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap_or_default().to_owned(), t.value().unwrap_or_default().to_owned()))
        .collect();
    assert!(tags.contains(&("pacloud:activity".into(), format!("busy:{}", NOW - 5))), "{tags:?}");
    assert!(tags.contains(&("pacloud:lease".into(), "1".into())), "{tags:?}");
    // Its atom has build history: the expected end reaches the tag and the scaler's snapshot.
    busy_tx.send_replace(WorkerState { busy: true, since: NOW - 5, expected_end: Some(NOW + 40) });
    wait_for_tags(&c, &busy, Activity::Busy { since: NOW - 5, expected_done_at: Some(NOW + 40) }, true).await;

    let report = tick(&c, &settings(&q), NOW).await.unwrap();
    let f = &report.families[0];
    assert_eq!(f.terminated, vec![idle.clone()], "{:?}", f.actions);
    assert_eq!(state_of(&c, &idle).await, "terminated");
    assert_eq!(state_of(&c, &busy).await, "running");
    assert_eq!(state_of(&c, &leased).await, "running");
    // Idle, but not for the idle timeout (120 s): kept.
    busy_tx.send_replace(state(false, NOW - 30));
    wait_for_tags(&c, &busy, Activity::Idle { since: NOW - 30 }, false).await;
    let again = tick(&c, &settings(&q), NOW).await.unwrap();
    assert!(again.families[0].terminated.is_empty(), "{:?}", again.families[0]);

    stop.cancel();
    drop(idle_tx);
    let (r1, r2) =
        tokio::time::timeout(Duration::from_secs(5), async { (t1.await, t2.await) }).await.expect("taggers stop");
    r1.unwrap();
    r2.unwrap();
}

#[tokio::test]
async fn a_tagger_whose_create_tags_fails_keeps_running_and_stops_on_cancel() {
    use pacloud_aws::fleet::{WorkerState, run_activity_tagger};
    use std::time::Duration;

    let moto = Moto::start();
    // EC2 unreachable (a closed port): CreateTags fails on every attempt;
    // the tagger logs, retries with backoff, and is never fatal.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = moto.base_config();
    config.endpoint_url = Some(format!("http://{}", closed.local_addr().unwrap()));
    drop(closed);
    let c = FleetClient::connect(&config).await;
    let e = c
        .set_worker_tags("i-0123456789abcdef0", WorkerState { busy: true, since: NOW, expected_end: None })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CreateTags"), "{e}");
    let stop = tokio_util::sync::CancellationToken::new();
    let (_tx, rx) = tokio::sync::watch::channel(WorkerState { busy: true, since: NOW, expected_end: None });
    let t = tokio::spawn(run_activity_tagger(
        c.clone(),
        "i-0123456789abcdef0".into(),
        rx,
        Duration::from_millis(20),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!t.is_finished(), "a failing CreateTags must not end the tagger");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), t).await.expect("stops on cancel").unwrap();
}

/// The workers' build history in the bucket (`stats/all.json`) gives the
/// snapshot's `median_build_s` from five builds on; no object, fewer builds
/// or no bucket setting: none; an unreadable object: none and a warning.
#[tokio::test]
async fn the_build_history_in_the_bucket_gives_the_median_build_time() {
    use pacloud_domain::stats::{ALL_PATH, BuildTimes};

    let moto = Moto::start();
    let c = setup(&moto).await;
    let q = queue_with(&c, "jobs", 0, 0).await;
    create_worker_fleet(&c, "x86-64", 0).await;
    c.s3.create_bucket().bucket("artifacts").send().await.unwrap();
    let fleets = c.worker_fleets().await.unwrap();
    let with_bucket = Settings { bucket: Some("artifacts".into()), ..settings(&q) };
    let snapshot = |s: Settings| {
        let (c, fleet) = (c.clone(), fleets[0].clone());
        async move {
            let history = pacloud_scaler::read_build_history(&c, &s).await;
            pacloud_scaler::family_snapshot(&c, &s, &fleet, &history, NOW).await.unwrap()
        }
    };
    let put = |body: Vec<u8>| {
        let c = c.clone();
        async move {
            c.s3.put_object().bucket("artifacts").key(ALL_PATH).body(body.into()).send().await.unwrap();
        }
    };
    let history = |seconds: &[f64]| BuildTimes { v: 1, seconds: seconds.to_vec() }.encode();

    // No object yet (no build finished): no median, nothing to warn about.
    let (snap, warnings) = snapshot(with_bucket.clone()).await;
    assert_eq!(snap.median_build_s, None);
    assert!(!warnings.iter().any(|w| w.contains("build history")), "{warnings:?}");

    put(history(&[100.0, 400.0, 300.0, 200.0])).await;
    let (snap, _) = snapshot(with_bucket.clone()).await;
    assert_eq!(snap.median_build_s, None, "four builds are not enough");

    put(history(&[100.0, 400.0, 300.0, 200.0, 1000.0])).await;
    let (snap, warnings) = snapshot(with_bucket.clone()).await;
    assert_eq!(snap.median_build_s, Some(300));
    assert!(!warnings.iter().any(|w| w.contains("build history")), "{warnings:?}");
    let (snap_without, _) = snapshot(settings(&q)).await;
    assert_eq!(snap_without.median_build_s, None, "without PACLOUD_BUCKET the history is not read");

    // Corrupt: a warning, no median, the snapshot still made.
    put(b"{not json".to_vec()).await;
    let (snap, warnings) = snapshot(with_bucket.clone()).await;
    assert_eq!(snap.median_build_s, None);
    assert!(warnings.iter().any(|w| w.contains("build history") && w.contains(ALL_PATH)), "{warnings:?}");

    // A bucket that does not exist: a warning, not an error.
    let (snap, warnings) = snapshot(Settings { bucket: Some("no-such-bucket".into()), ..settings(&q) }).await;
    assert_eq!(snap.median_build_s, None);
    assert!(warnings.iter().any(|w| w.contains("build history") && w.contains("GetObject")), "{warnings:?}");
    // And the tick still runs.
    let report = tick(&c, &with_bucket, NOW).await.unwrap();
    assert_eq!(report.families.len(), 1);
}
