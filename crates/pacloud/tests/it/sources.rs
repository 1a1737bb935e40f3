//! Sources: the fetch step downloads `SRC_URI` files (network on, nothing
//! built) from a loopback mirror served by this test, into the shared
//! distfiles cache, verified against the Manifest; the build step runs
//! without network. Real portage, real bubblewrap, a real HTTP server on
//! 127.0.0.1 (`helpers::Mirror`).

use crate::helpers::*;
use serde_json::{Value, json};

fn req(atom: &str, version: &str, use_flags: &[&str]) -> Value {
    json!({"atom": atom, "version": version, "use": use_flags})
}

fn fixture_distfile(name: &str) -> Vec<u8> {
    std::fs::read(workspace().join("tests/fixtures/distfiles").join(name)).unwrap()
}

async fn builder_with_mirror(mirror: &str) -> TestApp {
    let mirror = mirror.to_owned();
    spawn_builder_with(move |s| {
        s.build.mirrors = vec![mirror];
        // An infrastructure failure is final at once (no retries to wait for).
        s.max_receives = 1;
    })
    .await
}

fn cache_dir(app: &TestApp) -> std::path::PathBuf {
    app.dir.path().join("data/distfiles")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_fetched_once_verified_cached_and_built_offline() {
    let mirror = Mirror::start().await;
    let name = "fetches-src-1.0.txt";
    let content = fixture_distfile(name);
    mirror.serve(name, &content);
    let app = builder_with_mirror(&mirror.url).await;
    let (key, ready) = app.build(&req("app-misc/fetches-src", "1.0", &[])).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(mirror.hits(name), 1, "downloaded once");
    assert_eq!(std::fs::read(cache_dir(&app).join(name)).unwrap(), content, "the verified file is cached");
    let log = app.logs(&key).concat();
    assert!(log.contains(">>> pacloud: build step"), "{log}");
    // The build step ran without network and still had the source.
    let build_step = log.split(">>> pacloud: build step").nth(1).unwrap();
    assert!(!build_step.contains("Downloading"), "nothing downloaded in the build step:\n{build_step}");

    // Another key needing the same distfile: served from the cache.
    let (_, other) = app.build(&req("app-misc/fetches-src", "1.0", &["foo"])).await;
    assert_eq!(other["status"], "ready", "{other}");
    assert_ne!(other["sha256"], ready["sha256"]);
    assert_eq!(mirror.hits(name), 1, "the second build did not download it again");
}

/// Waits for a build that must fail as an infrastructure failure; returns its reason.
async fn infra_failure(app: &TestApp, body: &Value) -> String {
    let (_, failed) = app.build(body).await;
    assert_eq!(
        (failed["status"].as_str(), failed["class"].as_str()),
        (Some("failed"), Some("infrastructure")),
        "{failed}"
    );
    let reason = failed["reason"].as_str().unwrap().to_owned();
    eprintln!("failure reason: {reason}");
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_unreachable_or_unlisted_source_fails_the_build_and_is_not_cached() {
    let mirror = Mirror::start().await;
    let name = "fetches-src-1.0.txt";
    let mut corrupt = fixture_distfile(name);
    corrupt[0] ^= 0x20; // same size, other content
    mirror.serve(name, &corrupt);
    let app = builder_with_mirror(&mirror.url).await;
    let reason = infra_failure(&app, &req("app-misc/fetches-src", "1.0", &[])).await;
    assert!(reason.contains(name), "the reason names the file: {reason}");
    assert!(
        reason.contains("BLAKE2B") || reason.contains("SHA512") || reason.contains("verif"),
        "the reason names the failed check: {reason}"
    );
    assert!(mirror.hits(name) >= 1);
    assert!(!cache_dir(&app).join(name).exists(), "the cache keeps no corrupt file");
    assert!(!app.dir.path().join("data/artifacts/fixtures/app-misc/fetches-src").exists(), "nothing published");

    // A Manifest without an entry for the file.
    mirror.serve("unlisted-src-1.0.txt", &fixture_distfile("unlisted-src-1.0.txt"));
    let reason = infra_failure(&app, &req("app-misc/unlisted-src", "1.0", &[])).await;
    assert!(reason.contains("unlisted-src-1.0.txt"), "{reason}");
    assert!(!cache_dir(&app).join("unlisted-src-1.0.txt").exists());

    // An unreachable source server.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let offline = builder_with_mirror(&format!("http://{closed}")).await;
    let reason = infra_failure(&offline, &req("app-misc/fetches-src", "1.0", &[])).await;
    assert!(reason.contains(name), "{reason}");
    assert!(reason.contains("download"), "{reason}");
    assert!(std::fs::read_dir(cache_dir(&offline)).unwrap().next().is_none(), "nothing cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_step_has_no_network_even_after_a_fetch_step() {
    // The `net` fixture dies unless it can open a TCP connection; the fetch
    // step (with network) builds nothing, so the build step must fail.
    let mirror = Mirror::start().await;
    let app = builder_with_mirror(&mirror.url).await;
    let (_, failed) = app.build(&req("app-misc/net", "1.0", &[])).await;
    assert_eq!((failed["status"].as_str(), failed["class"].as_str()), (Some("failed"), Some("build")), "{failed}");
    assert!(failed["log_tail"].as_str().unwrap().contains("network unreachable"), "{failed}");
}
