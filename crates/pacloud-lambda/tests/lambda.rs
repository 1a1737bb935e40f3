//! The Lambda function end to end: the real `pacloud-lambda` binary (its
//! lambda_runtime client polling a FAKE Lambda Runtime API), API Gateway
//! HTTP API v2 events from `tests/events/`, and the real AWS wire protocol
//! on moto's server.

mod support;

use pacloud_domain::ports::{ArtifactPath, ArtifactStore, Job, JobQueue, MetadataStore};
use pacloud_domain::{BuildKey, Clock, SystemClock};
use serde_json::{Value, json};
use std::time::Duration;
use support::fake_runtime::FakeRuntimeApi;
use support::*;

fn hello_body(flags: &[&str]) -> String {
    json!({"atom": "app-misc/hello", "version": "2.12-r1", "use": flags}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_event_queues_exactly_one_job() {
    let d = Deployment::start("post", 1, &[]).await;

    let r = d.call(&event("post-build")).await;
    assert_eq!(r.status, 202, "{:?}", r.raw);
    assert_eq!(r.body["status"], "queued");
    let key = r.body["key"].as_str().unwrap().to_owned();
    assert_eq!(r.body["poll"], format!("/v1/builds/{key}"));
    assert_eq!(r.headers["location"], format!("/v1/builds/{key}"));
    assert_eq!(r.headers["content-type"], "application/json");

    let messages = d.drain_queue().await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let job = Job::decode(&messages[0]).unwrap();
    assert_eq!(job.key.as_str(), key);
    assert_eq!(d.scan_table().await, 1);

    // The same request again is the same pending build: no second job.
    let again = d.call(&event("post-build")).await;
    assert_eq!((again.status, again.body["key"].as_str()), (202, Some(key.as_str())));
    // A base64-encoded body (as API Gateway sends binary payloads) is the same request.
    let b64 = d.call(&event("post-build-base64")).await;
    assert_eq!((b64.status, b64.body["key"].as_str()), (202, Some(key.as_str())));
    assert!(d.drain_queue().await.is_empty());
    // One job, one nudge to the fleet scaler.
    let nudges = d.drain_nudges().await;
    assert_eq!(nudges.len(), 1, "{nudges:?}");
    assert_eq!(nudges[0]["detail-type"], "Build Enqueued");

    d.assert_no_function_errors();
    // Logs are JSON lines on stdout; the open-build warning is logged once.
    let out = d.lambdas[0].stdout();
    let lines: Vec<Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    assert!(lines.iter().any(|l| l["message"] == "pacloud-lambda ready"), "{out}");
    let warnings = lines.iter().filter(|l| l["message"].as_str().is_some_and(|m| m.contains("PACLOUD_TOKENS"))).count();
    assert_eq!(warnings, 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_identical_posts_make_one_record_and_one_message() {
    const INSTANCES: usize = 8;
    const REQUESTS: usize = 200;
    let d = Deployment::start("storm", INSTANCES, &[]).await;

    let body = hello_body(&["nls", "-doc"]);
    let ids: Vec<String> = (0..REQUESTS).map(|_| d.runtime.invoke(&with_body(event("post-build"), &body))).collect();
    let mut keys = std::collections::BTreeSet::new();
    for id in &ids {
        let (outcome, _) = d.runtime.wait(id, Duration::from_secs(120)).await;
        let r = http(outcome);
        assert_eq!(r.status, 202, "{:?}", r.raw);
        keys.insert(r.body["key"].as_str().unwrap().to_owned());
    }
    assert_eq!(keys.len(), 1);
    assert!(
        d.runtime.max_in_flight() >= 2,
        "invocations did not overlap (max in flight {})",
        d.runtime.max_in_flight()
    );
    eprintln!("max invocations in flight at once: {}", d.runtime.max_in_flight());

    assert_eq!(d.scan_table().await, 1, "exactly one DynamoDB record");
    let messages = d.drain_queue().await;
    assert_eq!(messages.len(), 1, "exactly one SQS message: {messages:?}");
    assert_eq!(Job::decode(&messages[0]).unwrap().key.as_str(), keys.first().unwrap());
    assert_eq!(d.drain_nudges().await.len(), 1, "one job, one nudge to the fleet scaler");
    d.assert_no_function_errors();
}

/// Takes the job message, then claims, uploads and completes `key` through
/// the AWS adapters as a worker would; returns the artifact's bytes.
async fn complete_as_worker(d: &Deployment, key: &str) -> Vec<u8> {
    let key: BuildKey = key.parse().unwrap();
    let deliveries = d.ports.queue.receive(1, Duration::from_secs(600), Duration::from_secs(1)).await.unwrap();
    assert_eq!(deliveries.len(), 1);
    let bytes: Vec<u8> = format!("gpkg for {key}\n").into_bytes().repeat(500);
    pacloud_contract::complete_as_worker(
        &d.ports.store,
        &d.ports.artifacts,
        &key,
        SystemClock.now(),
        d.dir.path(),
        &bytes,
    )
    .await;
    d.ports.queue.ack(&deliveries[0].receipt).await.unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_build_answers_200_with_a_presigned_url_to_the_bytes() {
    let d = Deployment::start("ready", 1, &[("PACLOUD_URL_TTL_SECS", "600")]).await;
    let pending = d.call(&event("post-build")).await;
    assert_eq!(pending.status, 202);
    let key = pending.body["key"].as_str().unwrap().to_owned();

    let bytes = complete_as_worker(&d, &key).await;
    let sha = pacloud_domain::key::sha256_hex(&bytes);

    let r = d.call(&event("post-build")).await;
    assert_eq!(r.status, 200, "{:?}", r.raw);
    assert_eq!(r.body["status"], "ready");
    assert_eq!(r.body["key"], key);
    assert_eq!(r.body["sha256"], sha, "the recorded sha256");
    assert_eq!(r.body["size"], bytes.len());
    let url = r.body["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/{}/", d.moto.endpoint, d.cfg.bucket)), "path-style URL into moto: {url}");
    assert!(url.contains("X-Amz-Signature="), "presigned: {url}");
    assert!(url.contains("X-Amz-Expires=600"), "PACLOUD_URL_TTL_SECS: {url}");
    let (status, got) = http_get(url).await;
    assert_eq!(status, 200);
    assert_eq!(pacloud_domain::key::sha256_hex(&got), sha, "the presigned URL serves the recorded bytes");

    // Polling by key and the original client's query agree.
    let by_key = d.call(&with_key(event("get-build"), &key)).await;
    assert_eq!((by_key.status, by_key.body["status"].as_str()), (200, Some("ready")));
    assert_eq!(by_key.body["sha256"], sha);
    let compat = d.call(&event("get-package")).await;
    assert_eq!(compat.status, 200);
    assert_eq!(compat.body["status"], "SUCCESS", "{:?}", compat.body);
    let (status, got) = http_get(compat.body["linkS3"].as_str().unwrap()).await;
    assert_eq!((status, pacloud_domain::key::sha256_hex(&got)), (200, sha));

    assert!(d.drain_queue().await.is_empty(), "a cache hit queues nothing");
    d.assert_no_function_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_events_are_4xx_json_never_function_errors() {
    let d = Deployment::start("bad", 2, &[]).await;
    let oversized = with_body(
        event("bad-oversized"),
        &json!({"atom": "app-misc/hello", "version": "2.12-r1", "pad": "x".repeat(pacloud_api::MAX_BODY_BYTES)})
            .to_string(),
    );
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("malformed JSON body", event("bad-malformed-json"), 400, "invalid_request"),
        ("wrong content-type", event("bad-content-type"), 415, "unsupported_media_type"),
        ("base64 flag on a non-base64 body", event("bad-base64-body"), 400, "invalid_request"),
        ("unknown route", event("bad-unknown-route"), 404, "not_found"),
        ("bad key in path", event("bad-key"), 400, "invalid_request"),
        ("oversized body", oversized, 413, "payload_too_large"),
        ("missing fields", event("bad-missing-fields"), 400, "invalid_request"),
        ("Host header that is not a host", event("bad-host"), 400, "invalid_request"),
        (
            "bad atom",
            with_body(event("post-build"), &json!({"atom": "bad atom", "version": "1"}).to_string()),
            400,
            "invalid_request",
        ),
        (
            "wrong method",
            with_method_path(event("bad-unknown-route"), "DELETE", "/v1/builds"),
            405,
            "method_not_allowed",
        ),
    ];
    for (what, ev, status, error) in cases {
        let r = d.call(&ev).await;
        assert_eq!(r.status, status, "{what}: {:?}", r.raw);
        assert_eq!(r.body["error"], error, "{what}: {:?}", r.body);
        assert!(r.body["message"].is_string(), "{what}: {:?}", r.body);
        assert_eq!(r.headers["content-type"], "application/json", "{what}");
        eprintln!("{what}: {status} {}", r.body);
    }
    for (name, field) in [("bad-missing-fields", "version"), ("bad-base64-body", "body"), ("bad-key", "key")] {
        assert_eq!(d.call(&event(name)).await.body["field"], field, "{name}");
    }

    assert!(d.drain_queue().await.is_empty(), "no bad request queued anything");
    assert_eq!(d.scan_table().await, 0);
    let errors = d.runtime.function_errors();
    assert!(errors.is_empty(), "function errors: {errors:?}");
    // The one event lambda_http panics on was caught, answered 400 and logged.
    let panics: usize = d.lambdas.iter().map(|l| l.panics()).sum();
    assert_eq!(panics, 1, "only the Host-header event panics inside lambda_http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_stage_is_stripped_and_prefixed_to_links_and_tokens_guard_builds() {
    let d = Deployment::start("stage", 1, &[("PACLOUD_BASE_PATH", "/prod"), ("PACLOUD_TOKENS", "s3cret, other")]).await;

    // No credentials: a miss may not start a build.
    let r = d.call(&event("post-build-stage")).await;
    assert_eq!((r.status, r.body["error"].as_str()), (401, Some("unauthorized")), "{:?}", r.raw);
    let r = d.call(&with_header(event("post-build-stage"), "authorization", "Bearer wrong")).await;
    assert_eq!(r.status, 401);

    let r = d.call(&with_header(event("post-build-stage"), "authorization", "Bearer s3cret")).await;
    assert_eq!(r.status, 202, "{:?}", r.raw);
    let key = r.body["key"].as_str().unwrap().to_owned();
    assert_eq!(r.body["poll"], format!("/prod/v1/builds/{key}"), "links carry the stage");
    let poll = d.call(&with_key(event("get-build-stage"), &key)).await;
    assert_eq!((poll.status, poll.body["status"].as_str()), (202, Some("queued")), "{:?}", poll.raw);
    // The same Router answers without the stage too ($default stage, custom domain).
    let poll = d.call(&with_key(event("get-build"), &key)).await;
    assert_eq!(poll.status, 202);
    assert_eq!(d.drain_queue().await.len(), 1);
    d.assert_no_function_errors();
    assert!(!d.lambdas[0].stdout().contains("every caller may start builds"));
}

/// (what, the function's variables, the variable the error must name)
type ConfigCase = (&'static str, &'static [(&'static str, &'static str)], &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_are_reported_as_init_errors_and_exit_non_zero() {
    let cases: [ConfigCase; 3] = [
        ("PACLOUD_TABLE unset", &[("PACLOUD_QUEUE_URL", "http://q"), ("PACLOUD_BUCKET", "b")], "PACLOUD_TABLE"),
        (
            "URL lifetime over an hour",
            &[
                ("PACLOUD_TABLE", "t"),
                ("PACLOUD_QUEUE_URL", "http://q"),
                ("PACLOUD_BUCKET", "b"),
                ("PACLOUD_URL_TTL_SECS", "7200"),
            ],
            "PACLOUD_URL_TTL_SECS",
        ),
        (
            "targets not JSON",
            &[
                ("PACLOUD_TABLE", "t"),
                ("PACLOUD_QUEUE_URL", "http://q"),
                ("PACLOUD_BUCKET", "b"),
                ("PACLOUD_TARGETS", "{oops"),
            ],
            "PACLOUD_TARGETS",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, vars, names)) in cases.into_iter().enumerate() {
        let runtime = FakeRuntimeApi::start().await;
        let mut env = lambda_env(&runtime.runtime_api());
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut l = spawn_lambda(BIN, &env, dir.path(), &format!("bad-config-{i}"));
        let status = tokio::time::timeout(Duration::from_secs(30), l.child.wait()).await.expect("exits").unwrap();
        assert_eq!(status.code(), Some(1), "{what}: exit status {status:?}");
        let report = runtime.init_errors();
        assert_eq!(report.len(), 1, "{what}: one init error");
        assert_eq!(report[0].error_type.as_deref(), Some("Runtime.ConfigInvalid"), "{what}");
        let msg = report[0].body["errorMessage"].as_str().unwrap_or_default();
        assert!(msg.contains(names), "{what}: {msg}");
        assert_eq!(report[0].body["errorType"], "Runtime.ConfigInvalid");
        assert!(runtime.next_calls().is_empty(), "{what}: never polled for events");
        let (out, err) = (l.stdout(), l.stderr());
        assert_eq!(l.panics(), 0, "{what}: {out}");
        assert!(err.is_empty() && !out.contains("panicked"), "{what}: {out}{err}");
        let logged = out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|v| {
            v["level"] == "ERROR"
                && v["message"] == "init failed"
                && v["error"].as_str().is_some_and(|e| e.contains(names))
        });
        assert!(logged, "{what}: the error is logged as JSON: {out}");
        eprintln!("{what}: init error {msg:?}");
    }
}

/// The whole AWS path: a POST event through the Lambda binary queues one
/// job; the worker library that `pacloud worker --backend aws` runs (real
/// emerge in bubblewrap on the fixture repository) consumes it, stores the
/// package in S3 and marks the DynamoDB record ready, and deletes the
/// message; the same POST event then answers 200 with a presigned URL whose
/// bytes match the recorded sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_event_then_worker_then_the_same_event_is_a_cache_hit() {
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap();
    let fixtures = json!({"profile": "default", "chost": "x86_64-pc-linux-gnu", "cflags": "-O2 -pipe",
        "repository": "pacloud-fixtures", "snapshot": "1", "builder": "host"});
    let targets = json!({"default": "fixtures", "targets": {"fixtures": fixtures}}).to_string();
    let d = Deployment::start("e2e", 1, &[("PACLOUD_TARGETS", &targets)]).await;
    let post = with_body(event("post-build"), &hello_body(&["foo"]));
    let pending = d.call(&post).await;
    assert_eq!(pending.status, 202, "{:?}", pending.raw);
    let key: BuildKey = pending.body["key"].as_str().unwrap().parse().unwrap();
    assert_eq!(d.ports.queue.depth().await.unwrap().visible, 1, "one SQS message");

    // The worker, on the same AWS resources.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let file = dir.path().join("worker.toml");
    let fixtures = std::fs::read_to_string(ws.join("tests/fixtures/pacloud.toml"))
        .unwrap()
        .replace("@WORKSPACE@", &ws.display().to_string());
    let build =
        format!("\n[build]\nbackend = \"bwrap\"\nworkers = 1\nportage_venv = \"{}\"\n", ws.join(".venv").display());
    std::fs::write(&file, fixtures + &build).unwrap();
    let mut settings = pacloud::settings::Settings::load(Some(&file), |_| None).unwrap();
    settings.data_dir = dir.path().join("data");
    settings.build.poll_wait = Duration::from_secs(1);
    let backend = match pacloud::build::detect(&settings).await {
        pacloud::build::Detected::Ready(b) => b,
        pacloud::build::Detected::Unavailable(why) => panic!("no build backend: {why}"),
    };
    let ports = pacloud_aws::connect(&d.cfg).await;
    let workers = pacloud::build::start_workers_on(
        std::sync::Arc::new(ports.store),
        std::sync::Arc::new(ports.queue),
        std::sync::Arc::new(ports.artifacts),
        backend,
        &settings,
        std::sync::Arc::new(SystemClock),
    );
    let start = std::time::Instant::now();
    let record = loop {
        let r = d.ports.store.get(&key).await.unwrap().unwrap();
        if r.status == pacloud_domain::Status::Ready {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "not ready: {:?}", r.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let artifact = record.artifact.unwrap();
    let stored = d.ports.artifacts.head(&ArtifactPath::parse(&artifact.path).unwrap()).await.unwrap();
    assert_eq!(stored.map(|o| o.size), Some(artifact.size), "the package is in S3");
    let depth = d.ports.queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (0, 0), "the message was deleted");

    let hit = d.call(&post).await;
    assert_eq!(hit.status, 200, "{:?}", hit.raw);
    assert_eq!(hit.body["sha256"], artifact.sha256.as_str());
    let (status, bytes) = http_get(hit.body["url"].as_str().unwrap()).await;
    assert_eq!((status, pacloud_domain::key::sha256_hex(&bytes)), (200, artifact.sha256.clone()));
    workers.abort_now();
    d.assert_no_function_errors();
}

/// The binhost signing key on AWS: the worker publishes the certificate of
/// its KMS key in the bucket at startup (`publish_signing_key`, the call
/// `pacloud worker --backend aws` makes) and the function serves it. An
/// Ed25519 key stands in for the KMS key here: moto's KMS cannot sign
/// digests (docs/aws.md), and the certificate's origin does not matter to
/// the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_key_published_by_a_worker_is_served_with_its_fingerprint() {
    let d = Deployment::start("key", 1, &[]).await;
    let key_event = || with_method_path(event("get-build"), "GET", "/v1/signing-key.asc");
    let targets_event = || with_method_path(event("get-build"), "GET", "/v1/targets");

    // Before any worker started: a JSON 404 saying so, and no key in targets.
    let r = d.call(&key_event()).await;
    assert_eq!(r.status, 404, "{:?}", r.raw);
    assert!(r.body["message"].as_str().unwrap().contains("no worker has published"), "{:?}", r.body);
    let t = d.call(&targets_event()).await;
    assert_eq!((t.status, &t.body["signing_key"]), (200, &Value::Null), "{:?}", t.body);

    let signer = pacloud_sign::Signer::ephemeral(pacloud_sign::key::DEFAULT_USER_ID).unwrap();
    let published = pacloud_worker::sign::publish_signing_key(&d.ports.artifacts, &signer).await.unwrap();
    assert_eq!(published, pacloud_worker::sign::KeyPublication::Stored);

    let raw = match d.runtime.invoke_and_wait(&key_event()).await {
        fake_runtime::Outcome::Response(v) => v,
        other => panic!("function error: {other:?}"),
    };
    assert_eq!(raw["statusCode"], 200, "{raw}");
    assert_eq!(raw["headers"]["content-type"], "application/pgp-keys", "{raw}");
    // lambda_http base64-encodes a body of a non-text type; API Gateway
    // decodes it for the client.
    let body = raw["body"].as_str().unwrap();
    let body = if raw["isBase64Encoded"] == true {
        use base64::Engine;
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(body).unwrap()).unwrap()
    } else {
        body.to_owned()
    };
    assert_eq!(body, signer.public_key_armored().unwrap());
    let t = d.call(&targets_event()).await;
    assert_eq!(t.body["signing_key"]["fingerprint"], signer.fingerprint(), "{:?}", t.body);
    assert_eq!(t.body["signing_key"]["url"], "/v1/signing-key.asc");

    // A second worker with the same key finds it; one with another key is
    // refused (its packages would not verify) and the published key stays.
    let again = pacloud_worker::sign::publish_signing_key(&d.ports.artifacts, &signer).await.unwrap();
    assert_eq!(again, pacloud_worker::sign::KeyPublication::AlreadyPublished);
    let other = pacloud_sign::Signer::ephemeral("other").unwrap();
    let err = pacloud_worker::sign::publish_signing_key(&d.ports.artifacts, &other).await.unwrap_err();
    assert!(err.to_string().contains(&other.fingerprint()), "{err}");
    let t = d.call(&targets_event()).await;
    assert_eq!(t.body["signing_key"]["fingerprint"], signer.fingerprint());
    d.assert_no_function_errors();
}
