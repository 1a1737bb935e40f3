//! Prints the Lambda function's figures (docs/benchmarks.md, run by
//! scripts/bench-lambda.sh):
//!
//! - init time: process start -> its first `GET /runtime/invocation/next`
//!   at the FAKE Runtime API, median over cold starts (fresh processes);
//! - warm invoke latency of one instance against moto: event queued at the
//!   Runtime API -> response posted back, p50/p99 over sequential invokes,
//!   for a ready key served from the instance's cache, a ready key with the
//!   cache off (GetItem + presign), and a pending key (GetItem);
//! - the size of the deployment zip, if given.
//!
//! Usage: bench-lambda --bin target/release/pacloud-lambda [--cold-starts N]
//! [--invokes N] [--zip PATH --zip-arch ARCH]

#[path = "../../tests/support/fake_runtime.rs"]
mod fake_runtime;

use fake_runtime::{FakeRuntimeApi, Outcome};
use pacloud_aws::testkit::Moto;
use pacloud_domain::ports::{ArtifactPath, ArtifactStore, JobQueue, MetadataStore};
use pacloud_domain::{ArtifactInfo, BuildKey, Clock, SystemClock};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const POST_EVENT: &str = include_str!("../../tests/events/post-build.json");

struct Args {
    bin: String,
    cold_starts: usize,
    invokes: usize,
    zip: Option<String>,
    zip_arch: String,
}

fn args() -> Args {
    let mut a = Args { bin: String::new(), cold_starts: 10, invokes: 300, zip: None, zip_arch: "arm64".into() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--bin" => a.bin = val(),
            "--cold-starts" => a.cold_starts = val().parse().expect("--cold-starts N"),
            "--invokes" => a.invokes = val().parse().expect("--invokes N"),
            "--zip" => a.zip = Some(val()),
            "--zip-arch" => a.zip_arch = val(),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!a.bin.is_empty(), "--bin PATH (the release pacloud-lambda) is required");
    a
}

fn function_env(runtime_api: &str, moto: &Moto, cfg: &pacloud_aws::AwsConfig) -> Vec<(String, String)> {
    [
        ("AWS_LAMBDA_RUNTIME_API", runtime_api),
        ("AWS_LAMBDA_FUNCTION_NAME", "pacloud-api"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "bench"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/pacloud-api"),
        ("AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH", "true"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_ENDPOINT_URL", &moto.endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("PACLOUD_TABLE", &cfg.table),
        ("PACLOUD_QUEUE_URL", &cfg.queue_url),
        ("PACLOUD_BUCKET", &cfg.bucket),
        ("PACLOUD_S3_FORCE_PATH_STYLE", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn spawn(bin: &str, env: &[(String, String)], home: &std::path::Path) -> Child {
    Command::new(bin)
        .env_clear()
        .env("HOME", home)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn post_event(flags: &[&str]) -> Value {
    let mut v: Value = serde_json::from_str(POST_EVENT).expect("fixture");
    let body = json!({"atom": "app-misc/hello", "version": "2.12-r1", "use": flags}).to_string();
    v["headers"]["content-length"] = body.len().to_string().into();
    v["body"] = body.into();
    v
}

fn status(o: &Outcome) -> u64 {
    match o {
        Outcome::Response(v) => v["statusCode"].as_u64().unwrap_or(0),
        Outcome::Error { body, .. } => panic!("function error: {body}"),
    }
}

fn body(o: &Outcome) -> Value {
    match o {
        Outcome::Response(v) => serde_json::from_str(v["body"].as_str().unwrap_or("null")).unwrap_or(Value::Null),
        Outcome::Error { body, .. } => panic!("function error: {body}"),
    }
}

/// Sequential invokes of `event`; returns sorted latencies.
async fn invoke_many(rt: &FakeRuntimeApi, event: &Value, n: usize, want: u64) -> Vec<Duration> {
    for _ in 0..10 {
        let id = rt.invoke(event);
        let (o, _) = rt.wait(&id, Duration::from_secs(30)).await;
        assert_eq!(status(&o), want, "warm-up: {:?}", body(&o));
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let id = rt.invoke(event);
        let (o, d) = rt.wait(&id, Duration::from_secs(30)).await;
        assert_eq!(status(&o), want);
        lat.push(d);
    }
    lat.sort();
    lat
}

fn report(what: &str, lat: &[Duration]) {
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "  {what:<44} p50 {:6.2} ms  p99 {:6.2} ms  mean {:6.2} ms  (n={})",
        ms(pct(lat, 0.5)),
        ms(pct(lat, 0.99)),
        ms(mean),
        lat.len()
    );
}

/// Claims, uploads and completes `key` through the AWS adapters.
async fn complete_as_worker(ports: &pacloud_aws::AwsPorts, key: &str, dir: &std::path::Path) {
    let key: BuildKey = key.parse().expect("key");
    let d = ports.queue.receive(1, Duration::from_secs(600), Duration::from_secs(1)).await.expect("receive");
    let now = SystemClock.now();
    let rec = ports.store.get(&key).await.expect("get").expect("record");
    let claimed = rec.claim("bench-worker", now, Duration::from_secs(60)).expect("claim");
    ports.store.replace(&claimed, rec.revision).await.expect("claim write");
    let bytes = vec![7u8; 64 * 1024];
    let file = dir.join("artifact.gpkg.tar");
    std::fs::write(&file, &bytes).expect("write");
    let sha = pacloud_domain::key::sha256_hex(&bytes);
    let path =
        format!("{}/{}/{}-{}-1.gpkg.tar", rec.spec.target, rec.spec.atom, rec.spec.atom.package(), rec.spec.version);
    ports.artifacts.put_file(&ArtifactPath::parse(&path).expect("path"), &file, &sha).await.expect("put");
    let artifact = ArtifactInfo {
        path,
        sha256: sha,
        size: bytes.len() as u64,
        build_id: 1,
        use_recorded: vec![],
        build_seconds: 1.0,
        log_path: None,
        compute: None,
    };
    let done = claimed.complete("bench-worker", artifact, SystemClock.now()).expect("complete");
    ports.store.replace(&done, claimed.revision).await.expect("complete write");
    for m in d {
        ports.queue.ack(&m.receipt).await.expect("ack");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let home = std::env::temp_dir().join(format!("bench-lambda-{}", std::process::id()));
    std::fs::create_dir_all(&home).expect("temp dir");
    let moto = Moto::start();
    let cfg = moto.provision("bench", 3).await;
    let ports = pacloud_aws::connect(&cfg).await;

    // Cold starts: a fresh process each time, against its own fake Runtime API.
    let mut inits = Vec::new();
    for _ in 0..a.cold_starts {
        let rt = FakeRuntimeApi::start().await;
        let env = function_env(&rt.runtime_api(), &moto, &cfg);
        let t0 = Instant::now();
        let mut child = spawn(&a.bin, &env, &home);
        let t1 = rt.wait_next_call_after(t0, Duration::from_secs(30)).await.expect("the function never polled");
        inits.push(t1 - t0);
        let _ = child.kill();
        let _ = child.wait();
    }
    inits.sort();
    println!(
        "Lambda init (process start -> first /runtime/invocation/next), {} cold starts: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        inits.len(),
        ms(pct(&inits, 0.5)),
        ms(inits[0]),
        ms(inits[inits.len() - 1])
    );

    // Warm invokes: one instance, sequential invocations, as Lambda runs them.
    let rt = FakeRuntimeApi::start().await;
    let mut child = spawn(&a.bin, &function_env(&rt.runtime_api(), &moto, &cfg), &home);
    let ready_event = post_event(&["nls"]);
    let first = rt.invoke_and_wait(&ready_event).await;
    assert_eq!(status(&first), 202);
    complete_as_worker(&ports, body(&first)["key"].as_str().expect("key"), &home).await;
    let rt_nocache = FakeRuntimeApi::start().await;
    let mut env = function_env(&rt_nocache.runtime_api(), &moto, &cfg);
    env.push(("PACLOUD_READY_CACHE_ENTRIES".into(), "0".into()));
    let mut child_nocache = spawn(&a.bin, &env, &home);

    println!("warm invoke latency, one instance, moto backend (event queued -> response posted at the Runtime API):");
    let hit = invoke_many(&rt, &ready_event, a.invokes, 200).await;
    report("POST, ready key (cached: presign only) -> 200", &hit);
    let pending_event = post_event(&["-nls"]);
    let pending = invoke_many(&rt, &pending_event, a.invokes, 202).await;
    report("POST, pending key (GetItem) -> 202", &pending);
    let uncached = invoke_many(&rt_nocache, &ready_event, a.invokes, 200).await;
    report("POST, ready key, cache off (GetItem+presign)", &uncached);
    let _ = child.kill();
    let _ = child.wait();
    let _ = child_nocache.kill();
    let _ = child_nocache.wait();

    if let Some(zip) = &a.zip {
        let size = std::fs::metadata(zip).unwrap_or_else(|e| panic!("{zip}: {e}")).len();
        println!("deployment zip ({}): {zip}: {size} bytes ({:.2} MB)", a.zip_arch, size as f64 / 1e6);
    }
    let _ = std::fs::remove_dir_all(&home);
}
