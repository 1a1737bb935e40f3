//! `spawn_app()` and named request helpers. The server is the real Router
//! on a real loopback socket, on embedded parts in a temporary directory,
//! with a clock the test can move forward.

#![allow(dead_code)]

use pacloud::serve::{App, build_app_with_clock};
use pacloud::settings::Settings;
use pacloud_domain::ports::{ArtifactPath, ArtifactStore, JobQueue};
use pacloud_domain::{BuildKey, Clock, FailureClass, FailureInfo, Millis, SystemClock};
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
    pub workers: Option<pacloud::build::Workers>,
    pub settings: Settings,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(w) = &self.workers {
            w.abort_now();
        }
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
    // Traversable by the unprivileged build user (builds run as nobody when they can).
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let mut settings =
        Settings { data_dir: dir.path().join("data"), poll_after: Duration::from_secs(1), ..Settings::default() };
    settings.build.workers = 0; // API tests run no builds; spawn_builder turns them on.
    f(&mut settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let clock = Arc::new(TestClock(AtomicI64::new(SystemClock.now().0)));
    let base = format!("http://{addr}");
    let app = build_app_with_clock(&settings, &base, clock.clone()).expect("build app");
    let workers = if settings.build.workers > 0 {
        match pacloud::build::detect(&settings).await {
            pacloud::build::Detected::Ready(b) => {
                Some(pacloud::build::start_workers(&app, b, &settings, clock.clone()))
            }
            pacloud::build::Detected::Unavailable(why) => panic!("no build backend for the test: {why}"),
        }
    } else {
        None
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = app.router.clone();
    tokio::spawn(async move {
        pacloud::serve::serve(listener, router, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    TestApp { base, app, clock, http: reqwest::Client::new(), dir, workers, settings, shutdown: Some(tx) }
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
    /// ports, since the API tests run no builds. Returns the bytes.
    pub async fn complete_as_worker(&self, key: &str) -> Vec<u8> {
        let key: BuildKey = key.parse().unwrap();
        let bytes: Vec<u8> = format!("gpkg for {key}").into_bytes().repeat(100);
        pacloud_contract::complete_as_worker(
            &*self.app.store,
            &*self.app.artifacts,
            &key,
            self.clock.now(),
            self.dir.path(),
            &bytes,
        )
        .await;
        bytes
    }

    /// Records a build failure with a stored log, as a worker would.
    pub async fn fail_as_worker(&self, key: &str, cached_for: Duration) {
        let key: BuildKey = key.parse().unwrap();
        let store = &*self.app.store;
        let now = self.clock.now();
        pacloud_domain::ports::apply(store, &key, |r| r.claim("test-worker", now, Duration::from_secs(60)))
            .await
            .unwrap();
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
        pacloud_domain::ports::apply(store, &key, |r| r.fail(Some("test-worker"), failure.clone(), now)).await.unwrap();
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

/// The workspace root.
pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// tests/fixtures/pacloud.toml for this checkout: the fixture target and
/// its repository (shared with the benchmarks and the Lambda tests).
pub fn fixture_config_toml() -> String {
    let ws = workspace();
    std::fs::read_to_string(ws.join("tests/fixtures/pacloud.toml"))
        .expect("tests/fixtures/pacloud.toml")
        .replace("@WORKSPACE@", &ws.display().to_string())
}

/// Applies the fixture target, real portage from the test venv and the
/// bubblewrap backend to `s`.
pub fn use_fixtures(s: &mut Settings) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fixtures.toml");
    std::fs::write(&file, fixture_config_toml()).expect("write config");
    let f = Settings::load(Some(&file), |_| None).expect("fixture settings");
    s.targets = f.targets;
    s.build.repositories = f.build.repositories;
    // Canonical: a symlinked venv cannot be a bwrap mount point.
    let venv = workspace().join(".venv");
    s.build.portage_venv = Some(venv.canonicalize().unwrap_or(venv));
    s.build.backend = pacloud::settings::BackendChoice::Bwrap;
    s.build.workers = 2;
    s.build.poll_wait = Duration::from_millis(500);
    s.build.wall_clock = Duration::from_secs(120);
}

/// A server with real builds: fixture repository, portage, bubblewrap.
pub async fn spawn_builder() -> TestApp {
    spawn_builder_with(|_| {}).await
}

pub async fn spawn_builder_with(f: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(|s| {
        use_fixtures(s);
        f(s);
    })
    .await
}

impl TestApp {
    /// Polls a key until it is no longer queued/building (at most `limit`).
    pub async fn wait_done(&self, key: &str, limit: Duration) -> (u16, Value) {
        let start = std::time::Instant::now();
        loop {
            let (status, body) = self.get_build(key).await;
            if status != 202 {
                return (status, body);
            }
            assert!(start.elapsed() < limit, "build {key} not done after {limit:?}: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// POSTs a request and waits for its outcome.
    pub async fn build(&self, body: &Value) -> (String, Value) {
        let (status, first) = self.post_build(body).await;
        assert!(status == 202 || status == 200, "{status}: {first}");
        let key = first["key"].as_str().expect("key").to_owned();
        let (status, done) = self.wait_done(&key, Duration::from_secs(120)).await;
        assert_eq!(status, 200, "{done}");
        (key, done)
    }

    /// The ROOTs this app's workers kept for later builds: the installed
    /// (cpv, BUILD_TIME) of each (`pacloud_worker::deproot`).
    pub fn kept_roots(&self) -> Vec<Vec<(String, String)>> {
        let dir = self.dir.path().join("data/builds/.deproots");
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read_to_string(e.path().join("meta.json")) else { continue };
            let meta: Value = serde_json::from_str(&text).unwrap();
            let pkgs = meta["packages"].as_array().unwrap();
            out.push(
                pkgs.iter()
                    .map(|p| (p["cpv"].as_str().unwrap().to_owned(), p["build_time"].as_str().unwrap_or("").to_owned()))
                    .collect(),
            );
        }
        out.sort();
        out
    }

    /// Waits until a kept ROOT has `cpv` installed: a worker keeps a ROOT
    /// after recording the build ready, so a request made at once could
    /// otherwise be picked up by another slot before it is kept.
    pub async fn wait_kept_root(&self, cpv: &str) {
        let start = std::time::Instant::now();
        while !self.kept_roots().iter().flatten().any(|(c, _)| c == cpv) {
            assert!(start.elapsed() < Duration::from_secs(30), "no kept ROOT with {cpv}: {:?}", self.kept_roots());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no worker slot is busy (a job's processing, keeping its
    /// ROOT included, is over).
    pub async fn wait_idle(&self) {
        let workers = self.workers.as_ref().expect("builder workers");
        let start = std::time::Instant::now();
        while workers.activity.borrow().busy > 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "workers still busy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The build logs stored for a key.
    pub fn logs(&self, key: &str) -> Vec<String> {
        let dir = self.dir.path().join("data/artifacts/logs").join(key);
        let mut out: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }
}

/// Reads one member of a tar archive (argv, no shell).
pub fn tar_member(archive: &std::path::Path, member: &str) -> Vec<u8> {
    let out = std::process::Command::new("tar").arg("-xOf").arg(archive).arg(member).output().expect("tar runs");
    assert!(out.status.success(), "tar -xOf {} {member}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Lists a tar archive given as bytes compressed with zstd.
pub fn zstd_tar_list(bytes: &[u8], dir: &std::path::Path) -> Vec<String> {
    let file = dir.join("member.tar.zst");
    std::fs::write(&file, bytes).expect("write");
    let out = std::process::Command::new("tar").arg("--zstd").arg("-tf").arg(&file).output().expect("tar runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// Reads one member of a zstd-compressed tar given as bytes.
pub fn zstd_tar_member(bytes: &[u8], member: &str, dir: &std::path::Path) -> String {
    let file = dir.join("member2.tar.zst");
    std::fs::write(&file, bytes).expect("write");
    let out =
        std::process::Command::new("tar").arg("--zstd").arg("-xOf").arg(&file).arg(member).output().expect("tar runs");
    assert!(out.status.success(), "{member}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A portage client keyring the getuto way: `key_asc` imported into
/// `gnupg`, trusted ultimately, readable by nobody (portage runs gpg as
/// nobody). Point `BINPKG_GPG_VERIFY_GPG_HOME` at it.
pub fn trust_key(gnupg: &std::path::Path, key_asc: &str, fingerprint: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    std::fs::create_dir_all(gnupg).unwrap();
    let asc = gnupg.with_extension("asc");
    std::fs::write(&asc, key_asc).unwrap();
    let gpg = |args: &[&str], input: &str| {
        let mut c = Command::new("gpg")
            .arg("--homedir")
            .arg(gnupg)
            .args(["--batch", "--no-tty"])
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gpg (Debian gnupg) runs");
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "gpg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    gpg(&["--import", asc.to_str().unwrap()], "");
    gpg(&["--import-ownertrust"], &format!("{fingerprint}:6:\n"));
    gpg(&["--check-trustdb"], "");
    let _ = Command::new("gpgconf").arg("--homedir").arg(gnupg).args(["--kill", "all"]).status();
    assert!(Command::new("chmod").args(["-R", "a+rX"]).arg(gnupg).status().unwrap().success());
}

/// A loopback source mirror in the `GENTOO_MIRRORS` layout
/// (`<url>/distfiles/<name>`), standing in for upstream sites in the
/// fetch-step tests: files added in memory ([`Mirror::serve`]) and, when
/// started with a directory, that directory's files (read at each request,
/// so a test may change one). Counts the GETs of each name, served or not.
/// An axum router on 127.0.0.1:0.
pub struct Mirror {
    pub url: String,
    files: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>>,
    hits: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>,
}

#[derive(Clone)]
struct MirrorState {
    dir: Option<std::path::PathBuf>,
    files: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>>,
    hits: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>,
}

async fn mirror_get(
    axum::extract::State(st): axum::extract::State<MirrorState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Vec<u8>, axum::http::StatusCode> {
    *st.hits.lock().unwrap().entry(name.clone()).or_default() += 1;
    if let Some(bytes) = st.files.lock().unwrap().get(&name) {
        return Ok(bytes.clone());
    }
    let plain = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
    match &st.dir {
        Some(dir) if plain => tokio::fs::read(dir.join(&name)).await.map_err(|_| axum::http::StatusCode::NOT_FOUND),
        _ => Err(axum::http::StatusCode::NOT_FOUND),
    }
}

impl Mirror {
    /// A mirror serving only what [`Mirror::serve`] adds.
    pub async fn start() -> Mirror {
        Self::start_with(None).await
    }

    /// A mirror serving the files of `dir` (and whatever is added).
    pub async fn of_dir(dir: std::path::PathBuf) -> Mirror {
        Self::start_with(Some(dir)).await
    }

    async fn start_with(dir: Option<std::path::PathBuf>) -> Mirror {
        let st = MirrorState { dir, files: Arc::default(), hits: Arc::default() };
        let (files, hits) = (st.files.clone(), st.hits.clone());
        let router = axum::Router::new().route("/distfiles/{name}", axum::routing::get(mirror_get)).with_state(st);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Mirror { url, files, hits }
    }

    pub fn serve(&self, name: &str, bytes: &[u8]) {
        self.files.lock().unwrap().insert(name.to_owned(), bytes.to_vec());
    }

    /// How many times `/distfiles/<name>` was asked for.
    pub fn hits(&self, name: &str) -> usize {
        self.hits.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// A portage binhost client in bubblewrap: the test venv's
/// `emerge --getbinpkgonly --binpkg-respect-use=y <opts> <atoms>` with the
/// client directory `client` writable (config root `client/config`, ROOT
/// `client/root`), `repo` (repository `repo_name`) read-only, and
/// `host_config` as the venv prefix's own `etc/portage` (portage's host
/// configuration for ROOT != /). Returns (success, combined output).
pub fn client_emerge(
    client: &std::path::Path,
    host_config: &std::path::Path,
    (repo_name, repo): (&str, &std::path::Path),
    opts: &[&str],
    atoms: &[&str],
) -> (bool, String) {
    // Its real path: bwrap cannot lay a tmpfs on a symbolic link.
    let venv = workspace().join(".venv").canonicalize().expect("the test venv (.venv)");
    let (v, c, r) = (venv.display().to_string(), client.display().to_string(), repo.display().to_string());
    let mut args: Vec<String> = Vec::new();
    let mut add = |parts: &[&str]| args.extend(parts.iter().map(|s| s.to_string()));
    add(&["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
    add(&["--tmpfs", "/var/tmp", "--tmpfs", "/var/cache", "--tmpfs", "/var/lib", "--tmpfs", &v]);
    for sub in ["bin", "lib", "include", "share", "pyvenv.cfg"] {
        add(&["--ro-bind", &format!("{v}/{sub}"), &format!("{v}/{sub}")]);
    }
    add(&["--symlink", "lib", &format!("{v}/lib64")]);
    add(&["--bind", &c, &c, "--ro-bind", &r, &r]);
    add(&["--ro-bind", &host_config.display().to_string(), &format!("{v}/etc/portage")]);
    add(&["--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session", "--clearenv"]);
    let path = format!("{v}/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let repos = format!("[DEFAULT]\nmain-repo = {repo_name}\n\n[{repo_name}]\nlocation = {r}\n");
    let (config, root) = (format!("{c}/config"), format!("{c}/root"));
    for (k, val) in [
        ("PATH", path.as_str()),
        ("HOME", "/var/tmp"),
        ("LANG", "C.UTF-8"),
        ("PORTAGE_CONFIGROOT", config.as_str()),
        ("ROOT", root.as_str()),
        ("EPREFIX", ""),
        ("PORTAGE_REPOSITORIES", repos.as_str()),
    ] {
        add(&["--setenv", k, val]);
    }
    add(&["--", &format!("{v}/bin/emerge"), "--getbinpkgonly", "--binpkg-respect-use=y", "--oneshot"]);
    args.extend(opts.iter().chain(atoms).map(|a| a.to_string()));
    let out = std::process::Command::new("bwrap").args(&args).output().expect("bwrap runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}
