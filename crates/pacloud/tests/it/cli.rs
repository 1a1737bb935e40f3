//! The `pacloud` binary itself: `key` offline, `get` against a live server
//! (download and sha256 check), `status`, exit codes, and `serve` surviving
//! a SIGKILL with nothing lost.

use crate::helpers::*;
use pacloud_domain::ports::{JobQueue, MetadataStore};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn pacloud() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pacloud"));
    c.env_remove("PACLOUD_CONFIG").env_remove("PACLOUD_SERVER").env_remove("PACLOUD_TOKEN").kill_on_drop(true);
    c
}

async fn run(args: &[&str]) -> (i32, String, String) {
    let out = pacloud().args(args).output().await.expect("run pacloud");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn key_is_computed_offline_and_matches_the_server() {
    let app = spawn_app().await;
    let (_, body) = app.post_build(&hello(&["foo", "-bar"])).await;
    let (code, out, err) = run(&["key", "app-misc/hello-2.12-r1", "--use", "-bar foo +foo"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), body["key"].as_str().unwrap());
}

#[tokio::test]
async fn bad_arguments_exit_2_with_one_line() {
    for args in [
        vec!["key", "app-misc/hello"],
        vec!["key", "app-misc/hello-1.0", "--use", "a;b"],
        vec!["key", "app-misc/hello-1.0", "--target", "nope"],
        vec!["key", "../etc/passwd-1"],
        vec!["get", "hello-1.0"],
        vec!["get", "app-misc/hello-1.0", "--use", "$(reboot)"],
        vec!["status", "not-a-key"],
        vec!["frobnicate"],
    ] {
        let (code, _, err) = run(&args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.trim().is_empty(), "{args:?}: says why");
        if args[0] != "frobnicate" {
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        }
    }
}

/// An AWS worker that should sign but has no key refuses to start (exit 2,
/// before any AWS call) rather than publish unsigned packages; configured
/// unsigned, it gets past that check (and fails later on the closed port).
#[tokio::test]
async fn aws_worker_without_a_signing_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let aws_worker = |sign: Option<&str>| {
        let mut c = pacloud();
        c.args(["worker", "--backend", "aws", "--data-dir"])
            .arg(dir.path())
            .env_remove("PACLOUD_AWS_SIGNING_KEY_ID")
            .env_remove("PACLOUD_SIGN_PACKAGES")
            .env("PACLOUD_AWS_TABLE", "builds")
            .env("PACLOUD_AWS_QUEUE_URL", "http://127.0.0.1:9/q")
            .env("PACLOUD_AWS_BUCKET", "b")
            .env("PACLOUD_AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env("PACLOUD_AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        if let Some(v) = sign {
            c.env("PACLOUD_SIGN_PACKAGES", v);
        }
        c
    };
    let out = aws_worker(None).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("PACLOUD_AWS_SIGNING_KEY_ID") && err.contains("PACLOUD_SIGN_PACKAGES=false"),
        "names both ways out: {err}"
    );
    let out = tokio::time::timeout(Duration::from_secs(60), aws_worker(Some("false")).output()).await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("PACLOUD_AWS_SIGNING_KEY_ID"), "unsigned on purpose passes the check: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_waits_downloads_and_verifies() {
    let app = std::sync::Arc::new(spawn_app().await);
    let worker_app = app.clone();
    let worker = tokio::spawn(async move {
        // Plays the worker: takes the job from the real queue, completes it.
        let d = loop {
            let got = worker_app.app.queue.receive(1, Duration::from_secs(60), Duration::from_secs(5)).await.unwrap();
            if let Some(d) = got.into_iter().next() {
                break d;
            }
        };
        let job = pacloud_domain::ports::Job::decode(&d.body).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let bytes = worker_app.complete_as_worker(job.key.as_str()).await;
        worker_app.app.queue.ack(&d.receipt).await.unwrap();
        bytes
    });
    let out_dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(&[
        "get",
        "app-misc/hello-2.12-r1",
        "--use",
        "foo",
        "--server",
        &app.base,
        "-o",
        out_dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let bytes = worker.await.unwrap();
    let path = std::path::PathBuf::from(out.trim());
    assert_eq!(path.file_name().unwrap(), "hello-2.12-r1-1.gpkg.tar");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "downloaded file is the artifact");
    assert!(err.contains("pacloud: queued"), "plain progress lines when not a terminal: {err}");
    // status by key
    let (_, body) = app.post_build(&hello(&["foo"])).await;
    let (code, out, _) = run(&["status", body["key"].as_str().unwrap(), "--server", &app.base]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("ready\nsha256 "), "{out}");
    let (code, _, err) = run(&["status", &"0".repeat(64), "--server", &app.base]).await;
    assert_eq!(code, 2, "unknown key: {err}");
}

#[tokio::test]
async fn get_reports_a_failed_build_and_exits_1() {
    let app = spawn_app().await;
    let (_, body) = app.post_build(&hello(&["broken"])).await;
    app.fail_as_worker(body["key"].as_str().unwrap(), Duration::from_secs(600)).await;
    let out_dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&[
        "get",
        "app-misc/hello-2.12-r1",
        "--use",
        "broken",
        "--server",
        &app.base,
        "-o",
        out_dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("emerge exited with status 1") && err.contains("build log: http"), "{err}");
    let (code, _, err) = run(&[
        "get",
        "app-misc/hello-2.12-r1",
        "--server",
        "http://127.0.0.1:9",
        "-o",
        out_dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1, "unreachable server is a failure, not a usage error: {err}");
}

/// `pacloud serve` as a process: POST, SIGKILL, then the SQLite file still
/// holds the record and its queue message, and a restarted server serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_survives_sigkill_with_nothing_lost() {
    pacloud::client::init_tls();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = || async {
        let mut child = pacloud()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()])
            .env("HOME", dir.path())
            .env("RUST_LOG", "info")
            // Durability, not builds: no worker may claim the job (and no
            // first-run portage venv is created).
            .env("PACLOUD_BUILD_BACKEND", "none")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut saw_warning = false;
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .unwrap()
                .unwrap()
                .expect("serve log");
            saw_warning |= line.contains("no tokens configured");
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        assert!(saw_warning, "says at startup that no tokens are configured");
        (child, format!("http://{addr}"))
    };
    let (mut child, base) = start().await;
    let http = reqwest::Client::new();
    let (status, body) =
        decode(http.post(format!("{base}/v1/builds")).json(&hello(&["kill"])).send().await.unwrap()).await;
    assert_eq!(status, 202);
    let key: pacloud_domain::BuildKey = body["key"].as_str().unwrap().parse().unwrap();
    let pid = child.id().unwrap();
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    child.wait().await.unwrap();

    let db = pacloud_local::Db::open(&data.join("pacloud.db")).unwrap();
    let store = pacloud_local::SqliteStore::new(db.clone());
    let rec = store.get(&key).await.unwrap().expect("record survived SIGKILL");
    assert_eq!(rec.status, pacloud_domain::Status::Queued);
    let queue = pacloud_local::SqliteQueue::new(db, std::sync::Arc::new(pacloud_domain::SystemClock), 5);
    assert_eq!(queue.depth().await.unwrap().visible, 1, "its message survived too");

    let (mut child, base) = start().await;
    let (status, again) = decode(http.get(format!("{base}/v1/builds/{key}")).send().await.unwrap()).await;
    assert_eq!((status, again["status"].as_str()), (202, Some("queued")));
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_says_in_one_line_when_no_worker_is_running() {
    let app = spawn_app().await; // no workers
    let (_, body) = app.post_build(&hello(&["foo"])).await;
    let key = body["key"].as_str().unwrap();
    let (status, pending) = app.get_build(key).await;
    assert_eq!((status, pending["workers"].as_u64()), (202, Some(0)), "{pending}");
    let out_dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&[
        "get",
        "app-misc/hello-2.12-r1",
        "--use",
        "foo",
        "--server",
        &app.base,
        "--timeout",
        "3",
        "-o",
        out_dir.path().to_str().unwrap(),
    ])
    .await;
    assert_ne!(code, 0, "{err}");
    assert_eq!(err.matches("no build worker is running").count(), 1, "said once, in one line: {err}");

    // A worker's liveness beat (what `Worker::run` writes every 10 s) counts.
    use pacloud_domain::ports::{ArtifactPath, ArtifactStore};
    let now = pacloud_domain::Clock::now(&*app.clock).0;
    let beat = ArtifactPath::parse("workers/w1-1").unwrap();
    app.app.artifacts.put_bytes(&beat, now.to_string().into_bytes(), "text/plain").await.unwrap();
    let stale = ArtifactPath::parse("workers/w2-1").unwrap();
    app.app.artifacts.put_bytes(&stale, (now - 61_000).to_string().into_bytes(), "text/plain").await.unwrap();
    let (_, pending) = app.get_build(key).await;
    assert_eq!(pending["workers"].as_u64(), Some(1), "one live, one stale: {pending}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_build_carries_eta_s_once_the_service_can_estimate_it() {
    use pacloud_domain::ports::{ArtifactPath, ArtifactStore};
    let app = spawn_app().await; // no workers
    // No live worker and no finished build yet: no estimate.
    let (status, first) = app.post_build(&hello(&["foo"])).await;
    assert_eq!(status, 202, "{first}");
    assert!(first.get("eta_s").is_none(), "{first}");

    // A finished build this service has read, and a live worker.
    let k1 = first["key"].as_str().unwrap().to_owned();
    app.complete_as_worker(&k1).await;
    let (status, done) = app.get_build(&k1).await;
    assert_eq!(status, 200, "{done}");
    let took = done["build_seconds"].as_f64().unwrap();
    app.drain_queue().await;
    let (_, no_worker) = app.post_build(&hello(&["bar"])).await;
    assert!(no_worker.get("eta_s").is_none(), "no live worker: {no_worker}");
    app.drain_queue().await;
    let now = pacloud_domain::Clock::now(&*app.clock).0;
    let beat = ArtifactPath::parse("workers/w1-1").unwrap();
    app.app.artifacts.put_bytes(&beat, now.to_string().into_bytes(), "text/plain").await.unwrap();

    // Alone in the queue: the atom's median build time (once the 5 s the
    // service reuses the worker count for have passed).
    app.clock.advance(std::time::Duration::from_secs(6));
    let (status, b) = app.post_build(&hello(&["baz"])).await;
    assert_eq!(status, 202);
    assert_eq!(b["eta_s"].as_u64(), Some((took.round() as u64).max(1)), "{b}");
    // One build ahead on one worker: a round of the median, then its own
    // (after the 5 s the service reuses the queue depth for).
    app.clock.advance(std::time::Duration::from_secs(6));
    let (_, c) = app.post_build(&hello(&["qux"])).await;
    assert_eq!(c["eta_s"].as_u64(), Some(((2.0 * took).round() as u64).max(1)), "{c}");
    // GET of a queued build carries it too.
    let (status, again) = app.get_build(c["key"].as_str().unwrap()).await;
    assert_eq!((status, again["status"].as_str()), (202, Some("queued")));
    assert!(again["eta_s"].as_u64().is_some_and(|e| e >= 1), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_service_estimates_from_the_workers_build_history() {
    use pacloud_domain::ports::{ArtifactPath, ArtifactStore};
    use pacloud_domain::stats::{self, BuildTimes};
    let app = spawn_app().await; // no workers, no finished record read
    let now = pacloud_domain::Clock::now(&*app.clock).0;
    let beat = ArtifactPath::parse("workers/w1-1").unwrap();
    app.app.artifacts.put_bytes(&beat, now.to_string().into_bytes(), "text/plain").await.unwrap();
    // No history anywhere yet: no estimate (and no error).
    let (status, first) = app.post_build(&hello(&["foo"])).await;
    assert_eq!(status, 202, "{first}");
    assert!(first.get("eta_s").is_none(), "{first}");
    app.drain_queue().await;
    // What workers leave behind: 300 s over all atoms, 40 s for this one.
    let times = |xs: &[f64]| {
        let mut t = BuildTimes::default();
        for x in xs {
            t.push(*x, 16);
        }
        t.encode()
    };
    app.app.artifacts.put_bytes(&stats::all_path(), times(&[300.0, 300.0, 40.0]), "application/json").await.unwrap();
    let atom = stats::atom_path(&"app-misc/hello".parse().unwrap()).unwrap();
    app.app.artifacts.put_bytes(&atom, times(&[40.0]), "application/json").await.unwrap();
    // Once the 60 s the service reuses a history read for have passed:
    // alone in the queue, the atom's median.
    app.clock.advance(std::time::Duration::from_secs(61));
    let now = pacloud_domain::Clock::now(&*app.clock).0;
    app.app.artifacts.put_bytes(&beat, now.to_string().into_bytes(), "text/plain").await.unwrap();
    let (status, b) = app.post_build(&hello(&["bar"])).await;
    assert_eq!(status, 202, "{b}");
    assert_eq!(b["eta_s"].as_u64(), Some(40), "{b}");
}

/// The README's start command on a fresh machine: no configuration file, a
/// fresh data directory, no portage on PATH (the test venv is not visible):
/// `serve` writes the bundled demo repository, creates its pinned portage
/// venv under the data directory, and `pacloud get` returns a verified binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_from_a_fresh_data_dir_builds_with_no_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_pacloud"))
        .args(["serve", "--data-dir", data.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &home)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let server_url = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    loop {
        // Logged once the backend is chosen and the listener serves.
        if std::fs::read_to_string(&log_path).unwrap_or_default().contains("pacloud serving") {
            break;
        }
        if let Ok(Some(status)) = server.try_wait() {
            panic!("serve exited {status}: {}", std::fs::read_to_string(&log_path).unwrap());
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not listening after 10 min: {}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let startup = std::fs::read_to_string(&log_path).unwrap();
    assert!(startup.contains("bundled demo repository"), "says which repository: {startup}");
    assert!(startup.contains("installed portage==3.0.83"), "{startup}");
    assert!(data.join("portage-venv/bin/emerge").is_file());
    assert!(startup.contains("build backend: bwrap sandbox"), "{startup}");
    let out_dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(&[
        "get",
        "app-misc/hello-2.12-r1",
        "--use",
        "foo -bar",
        "--server",
        &server_url,
        "--timeout",
        "300",
        "-o",
        out_dir.path().to_str().unwrap(),
    ])
    .await;
    let server_log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(code, 0, "{err}\n{server_log}");
    let path = std::path::PathBuf::from(out.trim());
    assert_eq!(path.file_name().unwrap(), "hello-2.12-r1-1.gpkg.tar");
    assert!(data.join("artifacts/demo/app-misc/hello/hello-2.12-r1-1.gpkg.tar").is_file());
    let _ = server.start_kill();
    let _ = server.wait().await;
}
