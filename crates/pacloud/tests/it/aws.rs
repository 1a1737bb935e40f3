//! The AWS deployment over the real AWS wire protocol, on moto's server:
//! the API Router (the one the Lambda serves) on DynamoDB/SQS/S3 adapters,
//! `pacloud worker --backend aws` as a process building with real emerge in
//! bubblewrap, spot interruption through a FAKE of the instance metadata
//! service (IMDS cannot run here), poison messages, and a resume after
//! hibernation that finds its lease taken.

use crate::helpers::*;
use axum::routing::{get, put};
use pacloud_api::{ApiState, Tokens};
use pacloud_aws::testkit::Moto;
use pacloud_aws::{AwsConfig, AwsPorts};
use pacloud_domain::ports::{ArtifactStore, JobQueue, MetadataStore};
use pacloud_domain::service::{BuildService, ServiceConfig};
use pacloud_domain::{Status, SystemClock};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct AwsApp {
    _moto: Moto,
    cfg: AwsConfig,
    ports: Arc<AwsPorts>,
    base: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    settings: pacloud::settings::Settings,
}

/// moto + provisioned resources + the API Router on AWS adapters on port 0.
async fn spawn_aws(prefix: &str, max_receives: u32) -> AwsApp {
    pacloud::client::init_tls();
    let moto = Moto::start();
    let mut cfg = moto.provision(prefix, max_receives).await;
    // The fleet scaler's events queue, as the template wires it: the API
    // and the workers nudge the scaler there.
    let sqs = pacloud_aws::clients(&cfg).await.sqs;
    cfg.scaler_events_url =
        sqs.create_queue().queue_name(format!("{prefix}-fleet-events")).send().await.unwrap().queue_url;
    let ports = Arc::new(pacloud_aws::connect(&cfg).await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut settings = pacloud::settings::Settings { data_dir: dir.path().join("data"), ..Default::default() };
    use_fixtures(&mut settings);
    let service = Arc::new(BuildService::new(
        Arc::new(ports.store.clone()),
        Arc::new(ports.queue.clone()),
        Arc::new(ports.artifacts.clone()),
        Arc::new(settings.targets.clone()),
        Arc::new(SystemClock),
        ServiceConfig { poll_after: Duration::from_secs(1), ..ServiceConfig::default() },
    ));
    let router = pacloud_api::router(Arc::new(ApiState {
        service,
        tokens: Tokens::default(),
        base_path: String::new(),
        binhost_key: pacloud_api::BinhostKey::published(Arc::new(ports.artifacts.clone())),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    AwsApp { _moto: moto, cfg, ports, base, http: reqwest::Client::new(), dir, settings }
}

impl AwsApp {
    async fn post(&self, body: &Value) -> (u16, Value) {
        decode(self.http.post(format!("{}/v1/builds", self.base)).json(body).send().await.unwrap()).await
    }
    async fn get(&self, key: &str) -> (u16, Value) {
        decode(self.http.get(format!("{}/v1/builds/{key}", self.base)).send().await.unwrap()).await
    }
    async fn wait_done(&self, key: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (status, body) = self.get(key).await;
            if status != 202 {
                return body;
            }
            assert!(start.elapsed() < limit, "not done after {limit:?}: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    async fn status(&self, key: &str) -> Option<pacloud_domain::BuildRecord> {
        self.ports.store.get(&key.parse().unwrap()).await.unwrap()
    }

    /// `pacloud worker --backend aws` against this moto, IMDS at `imds`.
    fn worker(&self, imds: &str, extra_build: &str) -> std::process::Child {
        let config = self.dir.path().join(format!("aws-worker-{}.toml", rand_suffix()));
        let toml = format!(
            "{}\n[build]\nbackend = \"bwrap\"\nworkers = 1\nlease_secs = 6\nportage_venv = \"{}\"\n{extra_build}\n",
            fixture_config_toml(),
            workspace().join(".venv").display()
        );
        std::fs::write(&config, toml).unwrap();
        let c = &self.cfg;
        std::process::Command::new(env!("CARGO_BIN_EXE_pacloud"))
            .args(["worker", "--backend", "aws", "--data-dir"])
            .arg(self.dir.path().join(format!("worker-{}", rand_suffix())))
            .arg("--config")
            .arg(&config)
            .env_remove("PACLOUD_CONFIG")
            .env("PACLOUD_AWS_TABLE", &c.table)
            .env("PACLOUD_AWS_QUEUE_URL", &c.queue_url)
            .env("PACLOUD_AWS_DLQ_URL", c.dlq_url.clone().unwrap_or_default())
            .env("PACLOUD_AWS_BUCKET", &c.bucket)
            .env("PACLOUD_AWS_ENDPOINT_URL", c.endpoint_url.clone().unwrap_or_default())
            .env("PACLOUD_AWS_REGION", "us-east-1")
            .env("PACLOUD_AWS_FORCE_PATH_STYLE", "1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("PACLOUD_AWS_SCALER_EVENTS_URL", c.scaler_events_url.clone().unwrap_or_default())
            .env("PACLOUD_IMDS_ENDPOINT", imds)
            .env("PACLOUD_SPOT_POLL_MS", "100")
            // moto's KMS cannot sign digests (docs/aws.md): these workers publish unsigned.
            .env("PACLOUD_SIGN_PACKAGES", "false")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pacloud worker --backend aws")
    }
}

fn rand_suffix() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 1000 + u64::from(std::process::id())
}

/// A FAKE of the EC2 instance metadata service (IMDSv2): a token endpoint
/// and a spot instance-action the test switches at run time.
async fn fake_imds() -> (String, Arc<Mutex<Option<String>>>) {
    fake_imds_of(None).await
}

/// [`fake_imds`] that also answers `instance-id` (the worker then reports
/// its activity in tags and nudges the scaler when idle).
async fn fake_imds_of(instance_id: Option<&'static str>) -> (String, Arc<Mutex<Option<String>>>) {
    let action: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let a = action.clone();
    let mut router = axum::Router::new().route("/latest/api/token", put(|| async { "fake-imds-token" }));
    if let Some(id) = instance_id {
        router = router.route("/latest/meta-data/instance-id", get(move || async move { id }));
    }
    let router = router.route(
        "/latest/meta-data/spot/instance-action",
        get(move |headers: axum::http::HeaderMap| {
            let a = a.clone();
            async move {
                if headers.get("x-aws-ec2-metadata-token").is_none() {
                    return (axum::http::StatusCode::UNAUTHORIZED, String::new());
                }
                match a.lock().unwrap().clone() {
                    Some(act) => {
                        (axum::http::StatusCode::OK, json!({"action": act, "time": "2026-11-23T03:00:00Z"}).to_string())
                    }
                    None => (axum::http::StatusCode::NOT_FOUND, String::new()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, action)
}

fn hello() -> Value {
    json!({"atom": "app-misc/hello", "version": "2.12-r1", "use": ["foo"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_over_aws_protocols() {
    let app = spawn_aws("e2e", 5).await;
    let (imds, _) = fake_imds_of(Some("i-0fake0e2e0worker")).await;
    let (status, first) = app.post(&hello()).await;
    assert_eq!(status, 202, "{first}");
    let key = first["key"].as_str().unwrap().to_owned();
    assert_eq!(app.ports.queue.depth().await.unwrap().visible, 1, "one SQS message");
    let mut w = app.worker(&imds, "");
    let ready = app.wait_done(&key, Duration::from_secs(120)).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let record = app.status(&key).await.unwrap();
    assert_eq!(record.status, Status::Ready, "the DynamoDB record is ready");
    let artifact = record.artifact.unwrap();
    let head =
        app.ports.artifacts.head(&pacloud_domain::ports::ArtifactPath::parse(&artifact.path).unwrap()).await.unwrap();
    assert_eq!(head.map(|h| h.size), Some(artifact.size), "the artifact is in S3");
    // The same POST: 200 with a presigned URL whose bytes match the record.
    let (status, hit) = app.post(&hello()).await;
    assert_eq!(status, 200, "{hit}");
    let url = hit["url"].as_str().unwrap();
    assert!(url.contains("X-Amz-Signature="), "a presigned S3 URL: {url}");
    let bytes = app.http.get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&bytes), artifact.sha256, "downloaded bytes match the recorded sha256");
    // The message was deleted.
    let start = Instant::now();
    loop {
        let d = app.ports.queue.depth().await.unwrap();
        if d.visible + d.in_flight == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "message not deleted: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The binhost index is kept in S3 too.
    let index = app
        .ports
        .artifacts
        .get(&pacloud_domain::ports::ArtifactPath::parse("fixtures/Packages").unwrap())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&index).contains("CPV: app-misc/hello-2.12-r1"));
    // The fleet scaler was nudged: by the API for the job, and by the worker
    // once it had been idle past the idle timeout (10 s) after the build.
    let events = app.cfg.scaler_events_url.clone().unwrap();
    let sqs = pacloud_aws::clients(&app.cfg).await.sqs;
    let mut kinds = Vec::new();
    let start = Instant::now();
    while !kinds.iter().any(|(k, _): &(String, String)| k == "Worker Idle") {
        assert!(start.elapsed() < Duration::from_secs(40), "no idle nudge from the worker: {kinds:?}");
        for v in pacloud_aws::testkit::drain_json(&sqs, &events).await {
            kinds.push((
                v["detail-type"].as_str().unwrap_or_default().to_owned(),
                v["detail"]["instance-id"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(kinds.iter().filter(|(k, _)| k == "Build Enqueued").count(), 1, "{kinds:?}");
    assert!(kinds.contains(&("Worker Idle".to_owned(), "i-0fake0e2e0worker".to_owned())), "{kinds:?}");
    w.kill().unwrap();
    w.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_terminate_releases_the_job_at_once_and_another_worker_completes_it() {
    let app = spawn_aws("spot", 5).await;
    let (imds, action) = fake_imds().await;
    let (_, first) = app.post(&json!({"atom": "app-misc/slow", "version": "1.0"})).await;
    let key = first["key"].as_str().unwrap().to_owned();
    let mut a = app.worker(&imds, "");
    let start = Instant::now();
    while app.status(&key).await.map(|r| r.status) != Some(Status::Building) {
        assert!(start.elapsed() < Duration::from_secs(60), "worker A never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    *action.lock().unwrap() = Some("terminate".into());
    let noticed = Instant::now();
    loop {
        if app.ports.queue.depth().await.unwrap().visible == 1 {
            break;
        }
        assert!(noticed.elapsed() < Duration::from_secs(3), "message not visible again soon after the notice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let visible_after = noticed.elapsed();
    assert!(a.wait().unwrap().success(), "worker A exits cleanly after the notice");
    let record = app.status(&key).await.unwrap();
    assert_eq!((record.status, record.lease.clone()), (Status::Queued, None), "lease given up");
    println!("message visible again {visible_after:?} after the terminate notice (IMDS polled every 100 ms)");
    assert!(visible_after < Duration::from_millis(1500), "within about a second: {visible_after:?}");
    *action.lock().unwrap() = None;
    let mut b = app.worker(&imds, "");
    let ready = app.wait_done(&key, Duration::from_secs(120)).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let record = app.status(&key).await.unwrap();
    assert_eq!(record.attempts, 2, "the second worker built it");
    let slow = app.ports.artifacts.list("fixtures/app-misc/slow/").await.unwrap();
    assert_eq!(slow.len(), 1, "one artifact: {slow:?}");
    b.kill().unwrap();
    b.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_dead_letters_and_the_record_says_failed() {
    let app = spawn_aws("poison", 2).await;
    let (imds, _) = fake_imds().await;
    // The `broken` target names a repository no worker has: every attempt
    // is an infrastructure failure.
    let mut w = app.worker(&imds, "retry_backoff_secs = 0\n");
    let (_, first) = app.post(&json!({"atom": "app-misc/hello", "version": "2.12-r1", "target": "broken"})).await;
    let key = first["key"].as_str().unwrap().to_owned();
    let failed = app.wait_done(&key, Duration::from_secs(90)).await;
    assert_eq!(
        (failed["status"].as_str(), failed["class"].as_str()),
        (Some("failed"), Some("infrastructure")),
        "{failed}"
    );
    let start = Instant::now();
    loop {
        let d = app.ports.queue.depth().await.unwrap();
        if d.dead == 1 && d.visible + d.in_flight == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "not dead-lettered: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.kill().unwrap();
    w.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_finds_the_lease_taken_publishes_nothing() {
    let app = spawn_aws("resume", 5).await;
    let mut settings = app.settings.clone();
    settings.build.workers = 1;
    settings.build.lease = Duration::from_secs(60);
    let backend = match pacloud::build::detect(&settings).await {
        pacloud::build::Detected::Ready(b) => b,
        pacloud::build::Detected::Unavailable(why) => panic!("{why}"),
    };
    let workers = pacloud::build::start_workers_on(
        Arc::new(app.ports.store.clone()),
        Arc::new(app.ports.queue.clone()),
        Arc::new(app.ports.artifacts.clone()),
        backend,
        &settings,
        Arc::new(SystemClock),
    );
    let (_, first) = app.post(&json!({"atom": "app-misc/slow", "version": "1.0"})).await;
    let key: pacloud_domain::BuildKey = first["key"].as_str().unwrap().parse().unwrap();
    let start = Instant::now();
    while app.status(key.as_str()).await.map(|r| r.status) != Some(Status::Building) {
        assert!(start.elapsed() < Duration::from_secs(60), "never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // "While hibernated" the lease ran out and another worker took the key.
    let later = pacloud_domain::Clock::now(&SystemClock).plus(Duration::from_secs(600));
    pacloud_domain::ports::apply(&app.ports.store, &key, |r| r.claim("other-worker", later, Duration::from_secs(3600)))
        .await
        .expect("takeover");
    // The resume is noticed: running jobs re-check their lease now.
    workers.recheck.notify_waiters();
    tokio::time::sleep(Duration::from_secs(12)).await; // past the 8 s build
    let record = app.status(key.as_str()).await.unwrap();
    assert_eq!(record.status, Status::Building);
    assert_eq!(record.lease.unwrap().owner, "other-worker", "the result was not published over the new holder");
    assert!(app.ports.artifacts.list("fixtures/app-misc/slow/").await.unwrap().is_empty(), "nothing published");
    workers.abort_now();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distfiles_shared_tier_in_s3_is_verified_before_upload_and_after_download() {
    use pacloud_domain::ports::ArtifactPath;
    use pacloud_worker::fetch::{DistEntry, DistfilesCache};
    use std::collections::BTreeMap;
    let app = spawn_aws("dist", 5).await;
    let store = &app.ports.artifacts;
    let entry = |bytes: &[u8]| {
        use sha2::Digest;
        let sha512 = hex::encode(sha2::Sha512::digest(bytes));
        (
            "app-misc/src".to_owned(),
            DistEntry { size: bytes.len() as u64, hashes: BTreeMap::from([("SHA512".into(), sha512)]) },
        )
    };
    let wanted =
        BTreeMap::from([("src-1.0.txt".to_owned(), entry(b"hello\n")), ("bad-1.0.txt".to_owned(), entry(b"hello\n"))]);
    let cache = |name: &str| {
        let mut c = DistfilesCache::new(app.dir.path().join(name), Duration::from_secs(3600), 1 << 20).unwrap();
        c.shared = true;
        c
    };
    // Worker A admitted src-1.0.txt: it goes to S3 under distfiles/.
    let a = cache("a");
    std::fs::write(a.dir.join("src-1.0.txt"), b"hello\n").unwrap();
    assert_eq!(a.push(store, &["src-1.0.txt".to_owned()], &wanted).await.unwrap(), 1);
    let key = ArtifactPath::parse("distfiles/src-1.0.txt").unwrap();
    assert_eq!(store.get(&key).await.unwrap(), b"hello\n", "in the bucket");
    // A file that does not match its Manifest entry is never uploaded.
    std::fs::write(a.dir.join("bad-1.0.txt"), b"hellO\n").unwrap();
    let e = a.push(store, &["bad-1.0.txt".to_owned()], &wanted).await.unwrap_err().to_string();
    assert!(e.contains("bad-1.0.txt") && e.contains("SHA512"), "{e}");
    assert!(store.head(&ArtifactPath::parse("distfiles/bad-1.0.txt").unwrap()).await.unwrap().is_none());
    // Worker B pulls the good one (verified); a corrupt object in the bucket is ignored.
    store
        .put_bytes(&ArtifactPath::parse("distfiles/bad-1.0.txt").unwrap(), b"hellO\n".to_vec(), "text/plain")
        .await
        .unwrap();
    let b = cache("b");
    assert_eq!(b.pull(store, &wanted).await.unwrap(), vec!["src-1.0.txt"]);
    assert_eq!(std::fs::read(b.dir.join("src-1.0.txt")).unwrap(), b"hello\n");
    assert!(!b.dir.join("bad-1.0.txt").exists(), "the local cache keeps no corrupt file");
    assert_eq!(std::fs::read_dir(&b.dir).unwrap().count(), 1, "no temporary file left");
    // Already cached locally: no second pull.
    assert!(b.pull(store, &wanted).await.unwrap().is_empty());
}
