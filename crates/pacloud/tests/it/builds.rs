//! The build path on real parts: `pacloud serve`'s router with in-process
//! workers, real `emerge` (portage from PyPI in the test venv) on the
//! fixture repository, in bubblewrap. Requests go over a real socket.

use crate::helpers::*;
use pacloud_domain::ports::{JobQueue, MetadataStore};
use serde_json::{Value, json};
use std::time::Duration;

fn req(atom: &str, version: &str, use_flags: &[&str]) -> Value {
    json!({"atom": atom, "version": version, "use": use_flags})
}

/// Downloads a ready build and returns the file.
async fn download(app: &TestApp, ready: &Value, dir: &std::path::Path) -> std::path::PathBuf {
    let bytes = app.http.get(ready["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&bytes), ready["sha256"].as_str().unwrap(), "downloaded bytes match the record");
    let name = ready["url"].as_str().unwrap().split('?').next().unwrap().rsplit('/').next().unwrap().to_owned();
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_builds_a_real_gpkg_with_the_requested_use() {
    let app = spawn_builder().await;
    let tmp = tempfile::tempdir().unwrap();
    let (status, first) = app.post_build(&req("app-misc/hello", "2.12-r1", &["foo", "-bar"])).await;
    assert_eq!(status, 202, "{first}");
    let key = first["key"].as_str().unwrap().to_owned();
    let (_, ready) = app.wait_done(&key, Duration::from_secs(120)).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert!(ready["use"].as_array().unwrap().contains(&json!("foo")), "{ready}");
    assert!(!ready["use"].as_array().unwrap().contains(&json!("bar")), "{ready}");
    let pkg = download(&app, &ready, tmp.path()).await;
    assert_eq!(pkg.file_name().unwrap(), "hello-2.12-r1-1.gpkg.tar");
    // A valid GPKG whose metadata records USE=foo and whose image has the
    // file only USE=foo installs.
    let metadata = tar_member(&pkg, "hello-2.12-r1-1/metadata.tar.zst");
    let recorded_use = zstd_tar_member(&metadata, "metadata/USE", tmp.path());
    assert!(recorded_use.split_whitespace().any(|f| f == "foo"), "metadata/USE = {recorded_use:?}");
    assert!(!recorded_use.split_whitespace().any(|f| f == "bar"), "metadata/USE = {recorded_use:?}");
    let image = zstd_tar_list(&tar_member(&pkg, "hello-2.12-r1-1/image.tar.zst"), tmp.path());
    assert!(image.iter().any(|f| f == "image/usr/share/hello/foo-enabled"), "{image:?}");

    // The same request again: 200 at once, no new build.
    let (status, again) = app.post_build(&req("app-misc/hello", "2.12-r1", &["-bar", "foo"])).await;
    assert_eq!((status, again["sha256"].clone()), (200, ready["sha256"].clone()));
    assert_eq!(app.logs(&key).len(), 1, "built once");
    let depth = app.depth().await;
    assert_eq!((depth.visible, depth.in_flight), (0, 0), "nothing queued");

    // Different USE: a different key and a different binary.
    let (key2, other) = app.build(&req("app-misc/hello", "2.12-r1", &["-foo"])).await;
    assert_ne!(key2, key);
    assert_eq!(other["status"], "ready");
    assert_ne!(other["sha256"], ready["sha256"]);
    let pkg2 = download(&app, &other, tmp.path()).await;
    let image2 = zstd_tar_list(&tar_member(&pkg2, "hello-2.12-r1-2/image.tar.zst"), tmp.path());
    assert!(!image2.iter().any(|f| f.ends_with("foo-enabled")), "{image2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_package_is_failed_with_its_log() {
    let app = spawn_builder().await;
    let (key, failed) = app.build(&req("app-misc/dies", "1.0", &[])).await;
    assert_eq!((failed["status"].as_str(), failed["class"].as_str()), (Some("failed"), Some("build")), "{failed}");
    assert!(
        failed["log_tail"].as_str().unwrap().contains("pacloud-fixture: intentional failure in src_compile"),
        "{failed}"
    );
    let log = app.http.get(app.url(&format!("/v1/builds/{key}/log"))).send().await.unwrap().text().await.unwrap();
    assert!(log.contains("pacloud-fixture: intentional failure in src_compile"), "{log}");
    assert!(!app.dir.path().join("data/artifacts/fixtures/app-misc/dies").exists(), "no artifact for a failed build");
    // Cached: asking again does not build again.
    let (status, again) = app.post_build(&req("app-misc/dies", "1.0", &[])).await;
    assert_eq!((status, again["status"].as_str()), (200, Some("failed")));
    // Retry on request builds again (and fails again).
    let resp = app.http.post(app.url(&format!("/v1/builds/{key}/retry"))).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let (_, failed2) = app.wait_done(&key, Duration::from_secs(120)).await;
    assert_eq!(failed2["status"], "failed");
    assert_eq!(app.logs(&key).len(), 2, "the retry ran a second build");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_are_isolated_from_each_other_and_the_host() {
    for marker in ["/tmp/pacloud-escape-marker", "/pacloud-escape-marker", "/var/tmp/pacloud-escape-marker"] {
        let _ = std::fs::remove_file(marker);
    }
    let app = spawn_builder_with(|s| {
        s.build.workers = 1;
        s.build.memory_bytes = Some(4 << 30); // exercises the prlimit address-space limit
    })
    .await;
    let (_, escaped) = app.build(&req("app-misc/escape", "1.0", &[])).await;
    assert_eq!(escaped["status"], "ready", "{escaped}");
    for marker in ["/tmp/pacloud-escape-marker", "/pacloud-escape-marker", "/var/tmp/pacloud-escape-marker"] {
        assert!(!std::path::Path::new(marker).exists(), "the build wrote {marker} on the host");
    }
    // Build 2 sees nothing build 1 wrote outside its PKGDIR.
    let (_, clean) = app.build(&req("app-misc/leakcheck", "1.0", &[])).await;
    assert_eq!(clean["status"], "ready", "{clean}");
    // No network inside the sandbox.
    let (_, net) = app.build(&req("app-misc/net", "1.0", &[])).await;
    assert_eq!((net["status"].as_str(), net["class"].as_str()), (Some("failed"), Some("build")), "{net}");
    assert!(net["log_tail"].as_str().unwrap().contains("pacloud-fixture: network unreachable"), "{net}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_dependencies_are_reused_not_rebuilt() {
    // Dependencies merged from their binaries (no kept ROOT to start from).
    let app = spawn_builder_with(|s| s.build.dependency_roots = 0).await;
    let (dep_key, dep) = app.build(&req("dev-libs/libfoo", "1.0", &[])).await;
    assert_eq!(dep["status"], "ready");
    // Three packages no graph here can reach: the next build's index leaves them out.
    let root = app.dir.path().join("data/artifacts/fixtures");
    let fillers: Vec<_> =
        (0..3).map(|i| pacloud_worker::testkit::package(&root, &format!("filler{i}"), 1, 4096).unwrap()).collect();
    let header = pacloud_worker::testkit::header();
    pacloud_worker::publish::update_index(&*app.app.artifacts, "fixtures", &header, fillers, 1_800_000_000)
        .await
        .unwrap();
    let (key, built) = app.build(&req("app-misc/uses-libfoo", "1.0", &[])).await;
    assert_eq!(built["status"], "ready", "{built}");
    let log = app.logs(&key).concat();
    assert!(log.contains("the build sees 1 of the 4 entries of the target's index"), "{log}");
    assert!(log.contains("no fetch step") && log.contains("1 binary package(s)"), "{log}");
    assert!(log.contains(">>> Emerging binary (1 of 2) dev-libs/libfoo-1.0"), "libfoo came from the cache:\n{log}");
    assert!(!log.contains(">>> Emerging (1 of 2) dev-libs/libfoo-1.0"), "libfoo was compiled again:\n{log}");
    assert_eq!(log.matches(">>> Compiling source").count(), 1, "exactly one compile (uses-libfoo itself)");
    assert_eq!(app.logs(&dep_key).len(), 1);

    // A dependency built as a side effect is itself a cache hit afterwards.
    let fresh = spawn_builder().await;
    let (_, built) = fresh.build(&req("app-misc/uses-libfoo", "1.0", &[])).await;
    assert_eq!(built["status"], "ready");
    let (status, dep) = fresh.post_build(&req("dev-libs/libfoo", "1.0", &[])).await;
    assert_eq!((status, dep["status"].as_str()), (200, Some("ready")), "{dep}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portage_reads_the_binhost_index() {
    let app = spawn_builder().await;
    app.build(&req("app-misc/hello", "2.12-r1", &["foo"])).await;
    app.build(&req("app-misc/uses-libfoo", "1.0", &[])).await;
    let out = std::process::Command::new(venv_python())
        .arg(workspace().join("tests/oracle/binhost_client.py"))
        .arg(app.url("/binhost/fixtures"))
        .arg(workspace().join("tests/fixtures/repo"))
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let cpvs: Vec<&str> = seen.iter().map(|v| v["cpv"].as_str().unwrap()).collect();
    assert_eq!(cpvs, vec!["app-misc/hello-2.12-r1", "app-misc/uses-libfoo-1.0", "dev-libs/libfoo-1.0"], "{seen:?}");
    assert!(seen[0]["use"].as_str().unwrap().split_whitespace().any(|f| f == "foo"));
    // Every PATH portage will fetch is served.
    for v in &seen {
        let url = app.url(&format!("/binhost/fixtures/{}", v["path"].as_str().unwrap()));
        assert_eq!(app.http.get(&url).send().await.unwrap().status(), 200, "{url}");
    }
    for hidden in ["/binhost/fixtures/.pkgindex/app-misc/hello/hello-2.12-r1-1.gpkg.tar.entry", "/binhost/logs/x/y"] {
        assert_eq!(app.http.get(app.url(hidden)).send().await.unwrap().status(), 404, "{hidden}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_clock_limit_fails_a_build_as_timeout() {
    let app = spawn_builder_with(|s| s.build.wall_clock = Duration::from_secs(2)).await;
    let (_, failed) = app.build(&req("app-misc/slow", "1.0", &[])).await;
    assert_eq!((failed["status"].as_str(), failed["class"].as_str()), (Some("failed"), Some("timeout")), "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_infrastructure_failures_dead_letter_and_fail() {
    // A target whose repository this worker does not have: every attempt is
    // an infrastructure failure (the sandbox never starts).
    let app = spawn_builder_with(|s| {
        s.max_receives = 2;
        s.build.retry_backoff = Duration::ZERO;
        s.build.repositories.clear();
    })
    .await;
    let (status, first) = app.post_build(&req("app-misc/hello", "2.12-r1", &[])).await;
    assert_eq!(status, 202);
    let key = first["key"].as_str().unwrap().to_owned();
    let (_, failed) = app.wait_done(&key, Duration::from_secs(60)).await;
    assert_eq!(
        (failed["status"].as_str(), failed["class"].as_str()),
        (Some("failed"), Some("infrastructure")),
        "{failed}"
    );
    assert!(failed["reason"].as_str().unwrap().contains("after 2 attempts"), "{failed}");
    // The message reaches the dead-letter queue (on the next receive).
    let start = std::time::Instant::now();
    loop {
        if app.app.queue.dead_letters().await.unwrap().len() == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "message not dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.app.queue.depth().await.unwrap().visible, 0);
    let record = app.app.store.get(&key.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(record.attempts, 2);
}

/// Starts `pacloud worker` as a process on `app`'s data directory.
fn worker_process(app: &TestApp, extra: &str) -> std::process::Child {
    let config = app.dir.path().join(format!("worker-{}.toml", std::process::id()));
    let toml = format!(
        "{}\n[build]\nbackend = \"bwrap\"\nworkers = 1\nlease_secs = 4\nportage_venv = \"{}\"\n{extra}\n",
        fixture_config_toml(),
        workspace().join(".venv").display()
    );
    std::fs::write(&config, toml).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_pacloud"))
        .args(["worker", "--data-dir"])
        .arg(app.dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .env_remove("PACLOUD_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pacloud worker")
}

async fn wait_status(app: &TestApp, key: &str, status: pacloud_domain::Status) {
    let key: pacloud_domain::BuildKey = key.parse().unwrap();
    let start = std::time::Instant::now();
    while app.app.store.get(&key).await.unwrap().map(|r| r.status) != Some(status) {
        assert!(start.elapsed() < Duration::from_secs(60), "never reached {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_build_is_replaced_and_the_build_completes_once() {
    let app = spawn_builder_with(|s| s.build.workers = 0).await;
    let (status, first) = app.post_build(&req("app-misc/slow", "1.0", &[])).await;
    assert_eq!(status, 202);
    let key = first["key"].as_str().unwrap().to_owned();
    let mut a = worker_process(&app, "");
    wait_status(&app, &key, pacloud_domain::Status::Building).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // well inside the 8 s compile
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    let mut b = worker_process(&app, "");
    let (_, ready) = app.wait_done(&key, Duration::from_secs(90)).await;
    b.kill().unwrap();
    b.wait().unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    let record = app.app.store.get(&key.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(record.attempts, 2, "delivered again and claimed by the second worker");
    let published: Vec<_> = std::fs::read_dir(app.dir.path().join("data/artifacts/fixtures/app-misc/slow"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(published, vec!["slow-1.0-1.gpkg.tar"], "exactly one artifact");
    let tmp: Vec<_> = std::fs::read_dir(app.dir.path().join("data/artifacts/.tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no partial artifact left behind");
    let depth = app.depth().await;
    assert_eq!((depth.visible, depth.in_flight), (0, 0), "the message was deleted");
    let index = std::fs::read_to_string(app.dir.path().join("data/artifacts/fixtures/Packages")).unwrap();
    assert_eq!(index.matches("CPV: app-misc/slow-1.0").count(), 1, "{index}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_releases_the_job_at_once() {
    let app = spawn_builder_with(|s| s.build.workers = 0).await;
    let (_, first) = app.post_build(&req("app-misc/slow", "1.0", &[])).await;
    let key = first["key"].as_str().unwrap().to_owned();
    let mut w = worker_process(&app, "shutdown_grace_secs = 1");
    wait_status(&app, &key, pacloud_domain::Status::Building).await;
    let started = std::time::Instant::now();
    std::process::Command::new("kill").args(["-TERM", &w.id().to_string()]).status().unwrap();
    let status = w.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(7), "did not wait for the 8 s build: {:?}", started.elapsed());
    let record = app.app.store.get(&key.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!((record.status, record.lease.clone()), (pacloud_domain::Status::Queued, None), "lease given up");
    // The worker process stamps times with the system clock (the test app's clock is frozen).
    let db = pacloud_local::Db::open(&app.dir.path().join("data/pacloud.db")).unwrap();
    let queue = pacloud_local::SqliteQueue::new(db, std::sync::Arc::new(pacloud_domain::SystemClock), 5);
    assert_eq!(queue.depth().await.unwrap().visible, 1, "the message is visible again at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacloud_get_downloads_and_verifies_a_real_build() {
    let app = spawn_builder().await;
    let out = tempfile::tempdir().unwrap();
    let result = tokio::process::Command::new(env!("CARGO_BIN_EXE_pacloud"))
        .args(["get", "dev-libs/libfoo-1.0", "--use", "foo", "--server", &app.base, "-o"])
        .arg(out.path())
        .output()
        .await
        .unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&result.stdout).trim());
    assert_eq!(path.file_name().unwrap(), "libfoo-1.0-1.gpkg.tar");
    let image = zstd_tar_list(&tar_member(&path, "libfoo-1.0-1/image.tar.zst"), out.path());
    assert!(image.iter().any(|f| f == "image/usr/lib/libfoo-foo.txt"), "{image:?}");
}

/// What the AWS worker reports in its instance tags for the fleet scaler:
/// busy while a delivery is processed, idle again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_activity_turns_busy_for_a_build_and_idle_after_it() {
    let app = spawn_builder().await;
    let mut rx = app.workers.as_ref().expect("builder workers").activity.clone();
    let start = *rx.borrow_and_update();
    assert_eq!(start.busy, 0, "idle before any job");
    let seen = tokio::spawn(async move {
        let mut max_busy = 0;
        while rx.changed().await.is_ok() {
            let a = *rx.borrow_and_update();
            max_busy = max_busy.max(a.busy);
            if max_busy > 0 && a.busy == 0 {
                return (max_busy, a);
            }
        }
        panic!("the worker's activity stopped changing");
    });
    let (_, failed) = app.build(&req("app-misc/dies", "1.0", &["activity"])).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let (max_busy, end) = tokio::time::timeout(Duration::from_secs(30), seen).await.expect("idle again").unwrap();
    assert_eq!(max_busy, 1, "one delivery at a time per job");
    assert!(end.since >= start.since, "{end:?} vs {start:?}");
}

/// The build history (`pacloud_worker::stats`): every successful build
/// appends its seconds to its atom's object and to `stats/all.json` in the
/// artifact store, and a build of an atom with history publishes its
/// expected end (start + the atom's median) in the worker's activity, which
/// the AWS worker writes into its `pacloud:activity` tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_leave_history_and_an_atom_with_history_reports_its_expected_end() {
    let app = spawn_builder().await;
    let artifacts = app.dir.path().join("data/artifacts");
    let history = |rel: &str| -> Vec<f64> {
        let bytes = std::fs::read(artifacts.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        pacloud_domain::stats::BuildTimes::decode(&bytes).unwrap().seconds
    };
    // Every busy state the worker publishes until it is idle again.
    let watch = |mut rx: tokio::sync::watch::Receiver<pacloud_worker::worker::Activity>| {
        rx.borrow_and_update();
        tokio::spawn(async move {
            let mut busy = Vec::new();
            while rx.changed().await.is_ok() {
                let a = *rx.borrow_and_update();
                if a.busy > 0 {
                    busy.push(a);
                } else if !busy.is_empty() {
                    return busy;
                }
            }
            panic!("the worker's activity stopped changing");
        })
    };
    let activity = || app.workers.as_ref().expect("builder workers").activity.clone();

    let seen = watch(activity());
    let (_, first) = app.build(&req("app-misc/hello", "2.12-r1", &["foo"])).await;
    assert_eq!(first["status"], "ready", "{first}");
    let seen = tokio::time::timeout(Duration::from_secs(30), seen).await.expect("idle again").unwrap();
    assert!(seen.iter().all(|a| a.expected_end.is_none()), "no history yet, no expected end: {seen:?}");
    let after_one = history("stats/atoms/app-misc/hello.json");
    assert_eq!(after_one.len(), 1, "{after_one:?}");
    assert!(after_one[0] > 0.0);
    assert!((after_one[0] - first["build_seconds"].as_f64().unwrap()).abs() < 0.01, "{first}");
    assert_eq!(history("stats/all.json"), after_one);

    // The same atom again (other USE, another key): its expected end is the start plus the median.
    let seen = watch(activity());
    let (_, second) = app.build(&req("app-misc/hello", "2.12-r1", &["-foo"])).await;
    assert_eq!(second["status"], "ready", "{second}");
    let seen = tokio::time::timeout(Duration::from_secs(30), seen).await.expect("idle again").unwrap();
    let with_end = seen.iter().find(|a| a.expected_end.is_some()).unwrap_or_else(|| panic!("{seen:?}"));
    let ahead_ms = with_end.expected_end.unwrap().0 - with_end.since.0;
    let median_ms = (after_one[0] * 1000.0) as i64;
    assert!(
        ahead_ms >= median_ms - 1 && ahead_ms <= median_ms + 10_000,
        "expected end {ahead_ms} ms after busy, median {median_ms} ms: {with_end:?}"
    );
    let after_two = history("stats/atoms/app-misc/hello.json");
    assert_eq!(after_two.len(), 2, "{after_two:?}");
    assert_eq!(after_two[0], after_one[0]);
    assert_eq!(history("stats/all.json"), after_two);
}

/// A ready build's image and metadata archives (zstd tar bytes).
async fn gpkg_parts(app: &TestApp, ready: &Value, dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let pkg = download(app, ready, dir).await;
    let name = pkg.file_name().unwrap().to_string_lossy().trim_end_matches(".gpkg.tar").to_owned();
    (tar_member(&pkg, &format!("{name}/image.tar.zst")), tar_member(&pkg, &format!("{name}/metadata.tar.zst")))
}

/// The files of a ready build's image and its recorded dependencies.
async fn image_and_deps(app: &TestApp, ready: &Value, dir: &std::path::Path) -> (Vec<String>, String) {
    let (image, metadata) = gpkg_parts(app, ready, dir).await;
    let mut image = zstd_tar_list(&image, dir);
    image.sort();
    let deps = ["DEPEND", "RDEPEND"].map(|f| zstd_tar_member(&metadata, &format!("metadata/{f}"), dir)).join(" | ");
    (image, deps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_root_spares_merging_the_dependencies_and_gives_the_same_package() {
    // Why a ROOT was not kept goes to the test's output.
    let _ = tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).with_test_writer().try_init();
    let app = spawn_builder().await;
    let tmp = tempfile::tempdir().unwrap();
    app.build(&req("app-misc/chain-e", "1.0", &[])).await;
    app.wait_kept_root("app-misc/chain-e-1.0").await;
    app.build(&req("app-misc/chain-d", "1.0", &[])).await;
    app.wait_kept_root("app-misc/chain-d-1.0").await;
    let (key, c) = app.build(&req("app-misc/chain-c", "1.0", &[])).await;
    assert_eq!(c["status"], "ready", "{c}");
    let log = app.logs(&key).concat();
    assert!(
        log.contains("ROOT starts as a copy of a kept ROOT with 2 package(s) installed: app-misc/chain-d-1.0 app-misc/chain-e-1.0"),
        "{log}"
    );
    assert!(!log.contains(">>> Emerging binary"), "no dependency merged again:\n{log}");
    assert!(log.contains("0 binary package(s) of reachable names materialised"), "installed ones not copied:\n{log}");
    assert_eq!(log.matches(">>> Emerging (").count(), 1, "only chain-c itself:\n{log}");
    app.wait_kept_root("app-misc/chain-c-1.0").await;
    let kept = app.kept_roots();
    assert!(kept.iter().any(|r| r.len() == 3), "chain-c's ROOT is kept in turn: {kept:?}");

    // The same package as a build that merged its dependencies itself.
    let fresh = spawn_builder_with(|s| s.build.dependency_roots = 0).await;
    fresh.build(&req("app-misc/chain-d", "1.0", &[])).await;
    let (fkey, fc) = fresh.build(&req("app-misc/chain-c", "1.0", &[])).await;
    let flog = fresh.logs(&fkey).concat();
    assert!(flog.contains(">>> Emerging binary") && !flog.contains("kept ROOT"), "{flog}");
    assert!(fresh.kept_roots().is_empty(), "dependency_roots = 0 keeps nothing");
    let ours = image_and_deps(&app, &c, tmp.path()).await;
    let theirs = image_and_deps(&fresh, &fc, tmp.path()).await;
    assert_eq!(ours, theirs);
    assert!(ours.0.iter().any(|f| f == "image/usr/share/chain-c/data.txt"), "{ours:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_root_is_brought_to_what_an_empty_root_would_install_or_not_used() {
    let app = spawn_builder().await;
    let tmp = tempfile::tempdir().unwrap();
    // libfoo with USE=foo: its ROOT holds the foo variant.
    app.build(&req("dev-libs/libfoo", "1.0", &["foo"])).await;
    app.wait_kept_root("dev-libs/libfoo-1.0").await;
    let (key, built) = app.build(&req("app-misc/uses-libfoo", "1.0", &[])).await;
    assert_eq!(built["status"], "ready", "{built}");
    let log = app.logs(&key).concat();
    assert!(
        log.contains("ROOT starts as a copy of a kept ROOT with 1 package(s) installed: dev-libs/libfoo-1.0"),
        "{log}"
    );
    // --newuse: the default-USE libfoo replaces the foo variant, as an
    // empty ROOT would have it (built here: no default-USE binary yet).
    assert_eq!(log.matches(">>> Emerging (").count(), 2, "libfoo (default USE) and uses-libfoo:\n{log}");
    let (status, dep) = app.post_build(&req("dev-libs/libfoo", "1.0", &[])).await;
    assert_eq!((status, dep["status"].as_str()), (200, Some("ready")), "{dep}");
    let image = zstd_tar_list(&gpkg_parts(&app, &dep, tmp.path()).await.0, tmp.path());
    assert!(!image.iter().any(|f| f.ends_with("libfoo-foo.txt")), "the default variant: {image:?}");
    app.wait_kept_root("app-misc/uses-libfoo-1.0").await;
    let kept = app.kept_roots();
    let with_user: Vec<_> = kept.iter().filter(|r| r.iter().any(|(cpv, _)| cpv.contains("uses-libfoo"))).collect();
    assert_eq!(with_user.len(), 1, "{kept:?}");

    // A textual scan reaches chain-e (USE=bar), the graph does not: the ROOT
    // with chain-e is tried, found to hold an extra package, and the build
    // runs again in an empty ROOT (optdep's build would otherwise find it).
    app.build(&req("app-misc/chain-e", "1.0", &[])).await;
    app.wait_kept_root("app-misc/chain-e-1.0").await;
    let (key, opt) = app.build(&req("app-misc/optdep", "1.0", &[])).await;
    assert_eq!(opt["status"], "ready", "{opt}");
    let log = app.logs(&key).concat();
    assert!(
        log.contains(
            "built again in an empty ROOT: the reused ROOT held package(s) the graph of app-misc/optdep does not need: app-misc/chain-e-1.0"
        ),
        "{log}"
    );
    assert!(!log.contains("ROOT starts as a copy"), "the published build ran in an empty ROOT:\n{log}");
    let (image, _) = gpkg_parts(&app, &opt, tmp.path()).await;
    let found = zstd_tar_member(&image, "image/usr/share/optdep/found.txt", tmp.path());
    assert_eq!(found.trim(), "chain-e absent");
    assert!(
        !app.kept_roots().iter().any(|r| r.len() == 1 && r[0].0 == "app-misc/chain-e-1.0"),
        "the misleading ROOT is forgotten"
    );

    // A pkg_postinst that writes into ROOT: that ROOT is not kept.
    let (_, pw) = app.build(&req("app-misc/postinst-writes", "1.0", &[])).await;
    assert_eq!(pw["status"], "ready", "{pw}");
    app.wait_idle().await;
    let kept = app.kept_roots();
    assert!(!kept.iter().flatten().any(|(cpv, _)| cpv.contains("postinst-writes")), "{kept:?}");
}
