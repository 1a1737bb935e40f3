//! Nudges to the fleet scaler over the real SQS wire protocol, on moto's
//! server: the job queue nudges after a job it makes visible (not after a
//! delayed one), a worker nudges once per idle period that outlasts the idle
//! timeout (the scaler's unit tests parse these bodies).

use std::time::Duration;

use pacloud_aws::fleet::WorkerState;
use pacloud_aws::nudge::{Nudger, run_idle_nudger};
use pacloud_aws::testkit::{Moto, drain_json as drain};
use pacloud_domain::ports::JobQueue;

async fn events_queue(moto: &Moto, name: &str) -> (aws_sdk_sqs::Client, String) {
    let sqs = pacloud_aws::clients(&moto.base_config()).await.sqs;
    let url = sqs.create_queue().queue_name(name).send().await.expect("create queue").queue_url.expect("url");
    (sqs, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visible_job_nudges_the_scaler_and_a_delayed_one_does_not() {
    let moto = Moto::start();
    let (sqs, events) = events_queue(&moto, "fleet-events").await;
    let mut cfg = moto.provision("nudge", 3).await;
    cfg.scaler_events_url = Some(events.clone());
    let ports = pacloud_aws::connect(&cfg).await;

    ports.queue.send("{\"job\":1}", Duration::ZERO).await.expect("send");
    let got = drain(&sqs, &events).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["source"], "pacloud");
    assert_eq!(got[0]["detail-type"], "Build Enqueued");

    // A backoff (delayed job): the schedule finds it when it is visible.
    ports.queue.send("{\"job\":2}", Duration::from_secs(3)).await.expect("send");
    assert!(drain(&sqs, &events).await.is_empty());

    // A nudge that fails (no such queue) is not the sender's failure.
    cfg.scaler_events_url = Some(format!("{}/000000000000/no-such-queue", moto.endpoint));
    let ports = pacloud_aws::connect(&cfg).await;
    ports.queue.send("{\"job\":4}", Duration::ZERO).await.expect("a failed nudge does not fail the send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_nudges_once_per_idle_period_that_outlasts_the_timeout() {
    let moto = Moto::start();
    let (sqs, events) = events_queue(&moto, "fleet-events-idle").await;
    let nudger = Nudger::new(sqs.clone(), events.clone());
    let (tx, rx) = tokio::sync::watch::channel(WorkerState { busy: true, since: 100, expected_end: None });
    let stop = tokio_util::sync::CancellationToken::new();
    let idle_after = Duration::from_millis(400);
    let task = tokio::spawn(run_idle_nudger(nudger, "i-0abc".into(), rx, idle_after, stop.clone()));

    // Busy: nothing.
    tokio::time::sleep(idle_after * 2).await;
    assert!(drain(&sqs, &events).await.is_empty());
    // Idle, and a job arrives before the timeout: nothing.
    tx.send(WorkerState { busy: false, since: 110, expected_end: None }).unwrap();
    tokio::time::sleep(idle_after / 4).await;
    tx.send(WorkerState { busy: true, since: 111, expected_end: None }).unwrap();
    tokio::time::sleep(idle_after * 2).await;
    assert!(drain(&sqs, &events).await.is_empty());
    // Idle past the timeout: one nudge naming the instance, and only one.
    tx.send(WorkerState { busy: false, since: 120, expected_end: None }).unwrap();
    tokio::time::sleep(idle_after * 3).await;
    let got = drain(&sqs, &events).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["detail-type"], "Worker Idle");
    assert_eq!(got[0]["detail"]["instance-id"], "i-0abc");
    // A new idle period after a build: one more.
    tx.send(WorkerState { busy: true, since: 130, expected_end: None }).unwrap();
    tx.send(WorkerState { busy: false, since: 140, expected_end: None }).unwrap();
    tokio::time::sleep(idle_after * 3).await;
    assert_eq!(drain(&sqs, &events).await.len(), 1);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops when cancelled").unwrap();
}
