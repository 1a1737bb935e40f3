//! `spawn_app()` and named request helpers. The server is the real Router
//! on a real loopback socket, on embedded parts in a temporary directory,
//! with a clock the test can move forward.

#![allow(dead_code)]

use pacloud::serve::{App, build_app_with_clock};
use pacloud::settings::Settings;
use pacloud_domain::ports::{ArtifactPath, ArtifactStore, JobQueue, MetadataStore};
use pacloud_domain::{ArtifactInfo, BuildKey, Clock, FailureClass, FailureInfo, Millis, SystemClock};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A clock that starts at the real time and moves only when told.
pub struct TestClock(AtomicI64);

impl TestClock {
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Millis {
        Millis(self.0.load(Ordering::SeqCst))
    }
}

pub struct TestApp {
    pub base: String,
    pub app: App,
    pub clock: Arc<TestClock>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the local server on 127.0.0.1:0 with settings adjusted by `f`.
pub async fn spawn_app_with(f: impl FnOnce(&mut Settings)) -> TestApp {
    pacloud::client::init_tls();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings =
        Settings { data_dir: dir.path().join("data"), poll_after: Duration::from_secs(1), ..Settings::default() };
    f(&mut settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let clock = Arc::new(TestClock(AtomicI64::new(SystemClock.now().0)));
    let base = format!("http://{addr}");
    let app = build_app_with_clock(&settings, &base, clock.clone()).expect("build app");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = app.router.clone();
    tokio::spawn(async move {
        pacloud::serve::serve(listener, router, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    TestApp { base, app, clock, http: reqwest::Client::new(), dir, shutdown: Some(tx) }
}

pub fn hello(use_flags: &[&str]) -> Value {
    json!({"atom": "app-misc/hello", "version": "2.12-r1", "use": use_flags})
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_build(&self, body: &Value) -> (u16, Value) {
        self.post_build_with(body, None).await
    }

    pub async fn post_build_with(&self, body: &Value, token: Option<&str>) -> (u16, Value) {
        let mut rb = self.http.post(self.url("/v1/builds")).json(body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb.send().await.expect("POST /v1/builds");
        decode(resp).await
    }

    pub async fn post_raw(&self, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut rb = self.http.post(self.url("/v1/builds")).body(body);
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        decode(rb.send().await.expect("POST raw")).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        decode(self.http.get(self.url(path)).send().await.expect("GET")).await
    }

    pub async fn get_build(&self, key: &str) -> (u16, Value) {
        self.get_json(&format!("/v1/builds/{key}")).await
    }

    pub async fn depth(&self) -> pacloud_domain::ports::QueueDepth {
        self.app.queue.depth().await.expect("depth")
    }

    /// Acts as a worker would (claim, upload, complete) through the real
    /// ports, since issue-2's server runs no builds. Returns the bytes.
    pub async fn complete_as_worker(&self, key: &str) -> Vec<u8> {
        let key: BuildKey = key.parse().unwrap();
        let store = &self.app.store;
        let rec = store.get(&key).await.unwrap().expect("record");
        let now = self.clock.now();
        let claimed = rec.claim("test-worker", now, Duration::from_secs(60)).unwrap();
        store.replace(&claimed, rec.revision).await.unwrap();
        let bytes: Vec<u8> = format!("gpkg for {key}").into_bytes().repeat(100);
        let path = format!(
            "{}/{}/{}-{}-1.gpkg.tar",
            rec.spec.target,
            rec.spec.atom,
            rec.spec.atom.package(),
            rec.spec.version
        );
        let file = self.dir.path().join(format!("{key}.bin"));
        std::fs::write(&file, &bytes).unwrap();
        let sha = pacloud_domain::key::sha256_hex(&bytes);
        self.app.artifacts.put_file(&ArtifactPath::parse(&path).unwrap(), &file, &sha).await.unwrap();
        let artifact = ArtifactInfo {
            path,
            sha256: sha,
            size: bytes.len() as u64,
            build_id: 1,
            use_recorded: rec.spec.use_flags.enabled().map(str::to_owned).collect(),
            build_seconds: 1.0,
            log_path: None,
        };
        let done = claimed.complete("test-worker", artifact, now).unwrap();
        store.replace(&done, claimed.revision).await.unwrap();
        bytes
    }

    /// Records a build failure with a stored log, as a worker would.
    pub async fn fail_as_worker(&self, key: &str, cached_for: Duration) {
        let key: BuildKey = key.parse().unwrap();
        let store = &self.app.store;
        let rec = store.get(&key).await.unwrap().expect("record");
        let now = self.clock.now();
        let claimed = rec.claim("test-worker", now, Duration::from_secs(60)).unwrap();
        store.replace(&claimed, rec.revision).await.unwrap();
        let log = format!("logs/{key}.log");
        self.app
            .artifacts
            .put_bytes(
                &ArtifactPath::parse(&log).unwrap(),
                b"* ERROR: app-misc/hello failed (compile phase)\n".to_vec(),
                "text/plain",
            )
            .await
            .unwrap();
        let failure = FailureInfo {
            class: FailureClass::Build,
            reason: "emerge exited with status 1".into(),
            log_path: Some(log),
            log_tail: Some("* ERROR: app-misc/hello failed (compile phase)".into()),
            cached_until: now.plus(cached_for),
        };
        let failed = claimed.fail(Some("test-worker"), failure, now).unwrap();
        store.replace(&failed, claimed.revision).await.unwrap();
    }

    /// Receives and deletes every visible message; returns their bodies.
    pub async fn drain_queue(&self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let got = self.app.queue.receive(10, Duration::from_secs(600), Duration::ZERO).await.unwrap();
            if got.is_empty() {
                return out;
            }
            for d in got {
                self.app.queue.ack(&d.receipt).await.unwrap();
                out.push(d.body);
            }
        }
    }
}

pub async fn decode(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    (status, v)
}

pub fn sha256(bytes: &[u8]) -> String {
    pacloud_domain::key::sha256_hex(bytes)
}

/// The test venv's python (created by scripts/test.sh; override with
/// PACLOUD_TEST_PYTHON).
pub fn venv_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PACLOUD_TEST_PYTHON") {
        return p.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
}
