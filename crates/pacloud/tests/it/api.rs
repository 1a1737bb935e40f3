//! The HTTP API over a real socket: every status, every error, auth on and
//! off, the compatibility endpoint, signed URLs, dedup and re-enqueueing.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn miss_queues_one_job_and_polls_as_pending() {
    let app = spawn_app().await;
    let (status, body) = app.post_build(&hello(&["foo", "-bar"])).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    let key = body["key"].as_str().unwrap().to_owned();
    assert_eq!(body["poll"], format!("/v1/builds/{key}"));
    let resp = app.http.post(app.url("/v1/builds")).json(&hello(&["-bar", "foo", "foo"])).send().await.unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["location"].to_str().unwrap(), format!("/v1/builds/{key}"));
    let (status, again) = decode(resp).await;
    assert_eq!((status, again["key"].as_str()), (202, Some(key.as_str())), "same request in another order: same key");
    let (status, got) = app.get_build(&key).await;
    assert_eq!((status, got["status"].as_str()), (202, Some("queued")));
    let bodies = app.drain_queue().await;
    assert_eq!(bodies.len(), 1, "exactly one queue message");
    let job: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(job["key"], key.as_str());
    assert_eq!(job["spec"]["use"], json!(["-bar", "foo"]));
}

#[tokio::test]
async fn ready_build_gives_a_signed_url_whose_bytes_match() {
    let app = spawn_app().await;
    let (_, body) = app.post_build(&hello(&["foo"])).await;
    let key = body["key"].as_str().unwrap();
    let bytes = app.complete_as_worker(key).await;
    let (status, ready) = app.post_build(&hello(&["foo"])).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["sha256"], sha256(&bytes));
    assert_eq!(ready["size"], bytes.len());
    assert!(ready["expires_at"].as_str().unwrap().ends_with('Z'));
    let url = ready["url"].as_str().unwrap();
    assert!(url.starts_with(&app.base), "{url}");
    let resp = app.http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.unwrap();
    assert_eq!(sha256(&got), ready["sha256"].as_str().unwrap(), "downloaded bytes match the recorded sha256");
    let (status, polled) = app.get_build(key).await;
    assert_eq!((status, polled["status"].as_str()), (200, Some("ready")));
    // The worker reported its machine: price per hour × build seconds.
    assert_eq!(polled["build_seconds"], 1.0);
    let cost = polled["cost_usd"].as_f64().expect("cost_usd on a finished build");
    assert!((cost - 0.072 / 3600.0).abs() < 1e-12, "{polled}");
    assert_eq!(app.drain_queue().await.len(), 1, "the hit enqueued nothing");
}

#[tokio::test]
async fn signed_urls_refuse_tampering_and_expiry() {
    let app = spawn_app().await;
    let (_, body) = app.post_build(&hello(&[])).await;
    app.complete_as_worker(body["key"].as_str().unwrap()).await;
    let (_, ready) = app.post_build(&hello(&[])).await;
    let url = ready["url"].as_str().unwrap().to_owned();
    let get = |u: String| {
        let http = app.http.clone();
        async move { decode(http.get(u).send().await.unwrap()).await }
    };
    let (head, query) = url.split_once('?').unwrap();
    let sig_pos = query.find("sig=").unwrap() + 4;
    let mut flipped = query.to_owned();
    let c = if &flipped[sig_pos..sig_pos + 1] == "0" { "1" } else { "0" };
    flipped.replace_range(sig_pos..sig_pos + 1, c);
    let cases = [
        format!("{head}?{flipped}"),
        format!("{}?{query}", head.replace("hello-2.12-r1-1", "hello-2.12-r1-2")),
        format!("{head}?{}", query.replace("expires=", "expires=9")),
        head.to_owned(),
        format!("{head}?expires=x&sig=00"),
    ];
    for bad in cases {
        let (status, body) = get(bad.clone()).await;
        assert_eq!(status, 403, "{bad}: {body}");
        assert_eq!(body["error"], "forbidden");
    }
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 200, "the untouched URL works");
    app.clock.advance(Duration::from_secs(16 * 60));
    let (status, body) = get(url).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("expired")), "{body}");
}

#[tokio::test]
async fn failed_builds_are_cached_then_retried() {
    let app = spawn_app().await;
    let (_, body) = app.post_build(&hello(&["bar"])).await;
    let key = body["key"].as_str().unwrap().to_owned();
    app.drain_queue().await;
    app.fail_as_worker(&key, Duration::from_secs(600)).await;
    let (status, failed) = app.post_build(&hello(&["bar"])).await;
    assert_eq!((status, failed["status"].as_str()), (200, Some("failed")), "{failed}");
    assert_eq!(failed["reason"], "emerge exited with status 1");
    assert_eq!(failed["class"], "build");
    let log = app.http.get(failed["log_url"].as_str().unwrap()).send().await.unwrap().text().await.unwrap();
    assert!(log.contains("compile phase"), "{log}");
    // The log endpoint redirects to the same log.
    let log2 = app.http.get(app.url(&format!("/v1/builds/{key}/log"))).send().await.unwrap();
    assert_eq!(log2.status(), 200, "redirect followed");
    assert!(log2.text().await.unwrap().contains("compile phase"));
    assert!(app.drain_queue().await.is_empty(), "a cached failure enqueues nothing");
    // Explicit retry.
    let resp = app.http.post(app.url(&format!("/v1/builds/{key}/retry"))).send().await.unwrap();
    let (status, retried) = decode(resp).await;
    assert_eq!((status, retried["status"].as_str()), (202, Some("queued")), "{retried}");
    assert_eq!(app.drain_queue().await.len(), 1, "retry enqueues one job");
    // After the cache time a plain request queues a new attempt.
    app.fail_as_worker(&key, Duration::from_secs(60)).await;
    app.clock.advance(Duration::from_secs(61));
    let (status, again) = app.post_build(&hello(&["bar"])).await;
    assert_eq!((status, again["status"].as_str()), (202, Some("queued")), "{again}");
    assert_eq!(app.drain_queue().await.len(), 1);
}

#[tokio::test]
async fn retry_errors() {
    let app = spawn_app_with(|s| s.tokens = vec!["sekrit".into()]).await;
    let (_, body) = app.post_build_with(&hello(&[]), Some("sekrit")).await;
    let key = body["key"].as_str().unwrap().to_owned();
    let retry = |token: Option<&'static str>, key: String| {
        let (http, url) = (app.http.clone(), app.url(&format!("/v1/builds/{key}/retry")));
        async move {
            let mut rb = http.post(url);
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            decode(rb.send().await.unwrap()).await
        }
    };
    assert_eq!(retry(None, key.clone()).await.0, 401, "retry needs a token");
    assert_eq!(retry(Some("sekrit"), "f".repeat(64)).await.0, 404, "unknown key");
    assert_eq!(retry(Some("sekrit"), "nope".into()).await.0, 400, "malformed key");
    let (status, pending) = retry(Some("sekrit"), key.clone()).await;
    assert_eq!((status, pending["status"].as_str()), (202, Some("queued")), "retry of a pending build just reports it");
    app.complete_as_worker(&key).await;
    let (status, body) = retry(Some("sekrit"), key).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")));
}

async fn assert_invalid(app: &TestApp, body: Value, field: &str) {
    let (status, resp) = app.post_build(&body).await;
    assert_eq!(status, 400, "{body} -> {resp}");
    assert_eq!(resp["error"], "invalid_request", "{resp}");
    assert_eq!(resp["field"], field, "{body} -> {resp}");
    assert!(resp["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn bad_bodies_are_400_naming_the_field() {
    let app = spawn_app().await;
    let long = "a".repeat(300);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"version": "1"}), "atom"),
        (json!({"atom": "app-misc/hello"}), "version"),
        (json!({"atom": 5, "version": "1"}), "atom"),
        (json!({"atom": "hello", "version": "1"}), "atom"),
        (json!({"atom": "app-misc/hello-1.0", "version": "1"}), "atom"),
        (json!({"atom": "app-misc/hello;rm -rf /", "version": "1"}), "atom"),
        (json!({"atom": "app-misc/$(id)", "version": "1"}), "atom"),
        (json!({"atom": "../../etc/passwd", "version": "1"}), "atom"),
        (json!({"atom": "app-misc/..", "version": "1"}), "atom"),
        (json!({"atom": "app-misc/a\u{0}b", "version": "1"}), "atom"),
        (json!({"atom": "app-misc/héllo", "version": "1"}), "atom"),
        (json!({"atom": format!("app-misc/{long}"), "version": "1"}), "atom"),
        (json!({"atom": "app-misc/hello", "version": "1.0; reboot"}), "version"),
        (json!({"atom": "app-misc/hello", "version": "../1"}), "version"),
        (json!({"atom": "app-misc/hello", "version": "1.0_gamma"}), "version"),
        (json!({"atom": "app-misc/hello", "version": long}), "version"),
        (json!({"atom": "app-misc/hello", "version": ["1"]}), "version"),
        (json!({"atom": "app-misc/hello", "version": "1", "use": ["ok", "b`ad`"]}), "use"),
        (json!({"atom": "app-misc/hello", "version": "1", "use": "a|b"}), "use"),
        (json!({"atom": "app-misc/hello", "version": "1", "use": [1]}), "use"),
        (json!({"atom": "app-misc/hello", "version": "1", "use": {"a": true}}), "use"),
        (json!({"atom": "app-misc/hello", "version": "1", "use": ["_x"]}), "use"),
        (json!({"atom": "app-misc/hello", "version": "1", "use": ["ü"]}), "use"),
        (
            json!({"atom": "app-misc/hello", "version": "1", "use": (0..300).map(|i| format!("f{i}")).collect::<Vec<_>>()}),
            "use",
        ),
        (json!({"atom": "app-misc/hello", "version": "1", "target": "../x"}), "target"),
        (json!({"atom": "app-misc/hello", "version": "1", "target": 3}), "target"),
        (json!({"atom": "app-misc/hello", "version": "1", "colour": "red"}), "colour"),
    ];
    for (body, field) in cases {
        assert_invalid(&app, body, field).await;
    }
    let (status, resp) = app.post_raw(Some("application/json"), b"{\"atom\":".to_vec()).await;
    assert_eq!((status, resp["field"].as_str()), (400, Some("body")), "{resp}");
    let (status, resp) = app.post_raw(Some("application/json"), b"[1,2]".to_vec()).await;
    assert_eq!((status, resp["field"].as_str()), (400, Some("body")), "{resp}");
    let (status, resp) = app.post_raw(Some("application/json"), vec![0xff, 0xfe]).await;
    assert_eq!((status, resp["field"].as_str()), (400, Some("body")), "{resp}");
    assert!(app.drain_queue().await.is_empty(), "nothing was queued by bad requests");
}

#[tokio::test]
async fn content_type_size_target_key_route_method() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&hello(&[])).unwrap();
    for ct in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let (status, resp) = app.post_raw(ct, body.clone()).await;
        assert_eq!((status, resp["error"].as_str()), (415, Some("unsupported_media_type")), "{ct:?}");
    }
    let (status, _) = app.post_raw(Some("application/json; charset=utf-8"), body).await;
    assert_eq!(status, 202, "a charset parameter is fine");
    let big = format!("{{\"atom\":\"app-misc/hello\",\"version\":\"1\",\"pad\":\"{}\"}}", "x".repeat(20_000));
    let (status, resp) = app.post_raw(Some("application/json"), big.into_bytes()).await;
    assert_eq!((status, resp["error"].as_str()), (413, Some("payload_too_large")));
    let (status, resp) = app.post_build(&json!({"atom": "app-misc/hello", "version": "1", "target": "riscv"})).await;
    assert_eq!((status, resp["error"].as_str(), resp["field"].as_str()), (404, Some("unknown_target"), Some("target")));
    let (status, resp) = app.get_build(&"0".repeat(64)).await;
    assert_eq!((status, resp["error"].as_str()), (404, Some("not_found")));
    for bad in ["xyz", "ABCDEF", "0".repeat(63).as_str(), "0".repeat(65).as_str()] {
        let (status, resp) = app.get_build(bad).await;
        assert_eq!((status, resp["field"].as_str()), (400, Some("key")), "{bad}");
    }
    let (status, resp) = app.get_json("/v2/nothing").await;
    assert_eq!((status, resp["error"].as_str()), (404, Some("not_found")));
    let (status, resp) = decode(app.http.delete(app.url("/v1/builds")).send().await.unwrap()).await;
    assert_eq!((status, resp["error"].as_str()), (405, Some("method_not_allowed")));
}

#[tokio::test]
async fn tokens_guard_builds_but_not_reads() {
    let app = spawn_app_with(|s| s.tokens = vec!["t0k3n".into()]).await;
    let resp = app.http.post(app.url("/v1/builds")).json(&hello(&["foo"])).send().await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, body) = decode(resp).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));
    assert!(app.drain_queue().await.is_empty(), "nothing queued without a token");
    assert_eq!(app.post_build_with(&hello(&["foo"]), Some("wrong")).await.0, 401);
    let (status, body) = app.post_build_with(&hello(&["foo"]), Some("t0k3n")).await;
    assert_eq!(status, 202, "{body}");
    let key = body["key"].as_str().unwrap().to_owned();
    assert_eq!(app.post_build(&hello(&["foo"])).await.0, 202, "a build under way needs no token");
    app.complete_as_worker(&key).await;
    assert_eq!(app.post_build(&hello(&["foo"])).await.0, 200, "a cache hit needs no token");
    assert_eq!(app.get_build(&key).await.0, 200);
    let (status, _) = decode(
        app.http.get(app.url("/package?package=app-misc/hello&version=2.12-r1&useflag=bar")).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 401, "the compat endpoint needs a token to start a build too");
    let (status, _) = decode(
        app.http
            .get(app.url("/package?package=app-misc/hello&version=2.12-r1&useflag=bar"))
            .bearer_auth("t0k3n")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn compat_endpoint_speaks_the_original_protocol() {
    let app = spawn_app().await;
    let path = "/package?package=app-misc/hello&version=2.12-r1&useflag=foo%20-bar";
    let (status, body) = app.get_json(path).await;
    assert_eq!((status, body), (200, json!({"status": "WAIT"})));
    let (_, v1) = app.post_build(&hello(&["foo", "-bar"])).await;
    assert_eq!(v1["status"], "queued", "compat and v1 share the key");
    let bytes = app.complete_as_worker(v1["key"].as_str().unwrap()).await;
    let (status, body) = app.get_json(path).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("SUCCESS")));
    let got = app.http.get(body["linkS3"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], &bytes[..]);
    // FAILED
    let (_, v1) = app.post_build(&hello(&["zzz"])).await;
    app.fail_as_worker(v1["key"].as_str().unwrap(), Duration::from_secs(600)).await;
    let (status, body) = app.get_json("/package?package=app-misc/hello&version=2.12-r1&useflag=zzz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("FAILED")));
    assert_eq!(body["errorMessage"], "emerge exited with status 1");
    // Bad input: 400 in both vocabularies.
    for (q, field) in [
        ("package=app-misc/hel%3Blo&version=1", "package"),
        ("version=1", "package"),
        ("package=app-misc/hello", "version"),
        ("package=app-misc/hello&version=1&useflag=a%24b", "useflag"),
        ("package=app-misc/hello&version=1&version=2", "version"),
    ] {
        let (status, body) = app.get_json(&format!("/package?{q}")).await;
        assert_eq!(status, 400, "{q}");
        assert_eq!((body["status"].as_str(), body["field"].as_str()), (Some("FAILED"), Some(field)), "{q}: {body}");
        assert!(body["errorMessage"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn stale_queued_records_are_enqueued_again_once() {
    let app = spawn_app().await;
    let (_, body) = app.post_build(&hello(&["lost"])).await;
    let key = body["key"].as_str().unwrap().to_owned();
    assert_eq!(app.drain_queue().await.len(), 1, "the message is consumed and lost (simulated crash)");
    assert_eq!(app.get_build(&key).await.0, 202);
    assert!(app.drain_queue().await.is_empty(), "not yet stale: nothing re-sent");
    app.clock.advance(Duration::from_secs(15 * 60 + 1));
    let polls = futures::future::join_all((0..20).map(|_| app.get_build(&key))).await;
    assert!(polls.iter().all(|(s, _)| *s == 202));
    assert_eq!(app.post_build(&hello(&["lost"])).await.0, 202);
    assert_eq!(app.drain_queue().await.len(), 1, "21 racing requests re-send exactly one message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_identical_posts_make_one_job() {
    let app = spawn_app().await;
    let body = hello(&["storm"]);
    let results = futures::future::join_all((0..500).map(|_| app.post_build(&body))).await;
    assert!(results.iter().all(|(s, _)| *s == 202), "all pending");
    let keys: std::collections::HashSet<_> =
        results.iter().map(|(_, b)| b["key"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys.len(), 1);
    let depth = app.depth().await;
    assert_eq!((depth.visible, depth.in_flight, depth.delayed), (1, 0, 0), "exactly one queue message");
    let db = rusqlite_count(&app).await;
    assert_eq!(db, 1, "exactly one record");
}

async fn rusqlite_count(app: &TestApp) -> i64 {
    let db = pacloud_local::Db::open(&app.dir.path().join("data/pacloud.db")).unwrap();
    db.run(|c| Ok(c.query_row("SELECT count(*) FROM builds", [], |r| r.get(0))?)).await.unwrap()
}

#[tokio::test]
async fn targets_health_and_openapi() {
    let app = spawn_app().await;
    let (status, t) = app.get_json("/v1/targets").await;
    assert_eq!(status, 200);
    assert_eq!(t["default"], "default");
    let first = &t["targets"][0];
    assert_eq!(first["name"], "default");
    assert_eq!(first["hash"].as_str().unwrap().len(), 64);
    let (status, h) = app.get_json("/healthz").await;
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")));
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/builds",
        "/v1/builds/{key}",
        "/v1/builds/{key}/retry",
        "/v1/builds/{key}/log",
        "/v1/targets",
        "/healthz",
        "/openapi.json",
        "/v1/signing-key.asc",
        "/package",
        "/v1/artifacts/{path}",
        "/binhost/{target}/{rest}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI documents {path}");
    }
}

/// The OpenAPI document is valid according to openapi-spec-validator
/// (installed in the test venv by scripts/test.sh).
#[test]
fn openapi_document_validates() {
    let python = crate::helpers::venv_python();
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../pacloud-api/openapi.json");
    let out = std::process::Command::new(&python)
        .args(["-c", "import json,sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')"])
        .arg(doc)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python:?} (run scripts/test.sh to create the venv): {e}"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "valid");
}

#[tokio::test]
async fn abandoned_builds_are_queued_again_then_failed_after_the_attempt_limit() {
    use pacloud_domain::ports::MetadataStore;
    let app = spawn_app_with(|s| s.max_receives = 2).await;
    let (_, body) = app.post_build(&hello(&["abandoned"])).await;
    let key: pacloud_domain::BuildKey = body["key"].as_str().unwrap().parse().unwrap();
    for attempt in 1..=2u32 {
        assert_eq!(app.drain_queue().await.len(), 1, "attempt {attempt}: one message");
        // A worker claims it and dies without a trace (its message is gone too).
        let now = pacloud_domain::Clock::now(&*app.clock);
        pacloud_domain::ports::apply(&*app.app.store, &key, |r| r.claim("dead-worker", now, Duration::from_secs(60)))
            .await
            .unwrap();
        let (status, polled) = app.get_build(key.as_str()).await;
        assert_eq!((status, polled["status"].as_str()), (202, Some("building")), "a live lease is left alone");
        app.clock.advance(Duration::from_secs(60 + 15 * 60 + 1));
        let (status, polled) = app.get_build(key.as_str()).await;
        if attempt == 1 {
            assert_eq!((status, polled["status"].as_str()), (202, Some("queued")), "abandoned: queued again");
        } else {
            assert_eq!(
                (status, polled["status"].as_str(), polled["class"].as_str()),
                (200, Some("failed"), Some("infrastructure")),
                "{polled}"
            );
            assert!(app.drain_queue().await.is_empty(), "no new message once failed");
        }
    }
    let record = app.app.store.get(&key).await.unwrap().unwrap();
    assert_eq!(record.attempts, 2);
}
