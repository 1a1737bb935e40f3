//! The Lambda test harness: moto (real AWS wire protocol) with pacloud's
//! resources provisioned, the FAKE Lambda Runtime API, and real
//! `pacloud-lambda` processes polling it, configured only through their
//! environment, as Lambda starts them.

#![allow(dead_code)]

pub mod fake_runtime;

use fake_runtime::{FakeRuntimeApi, Outcome};
use pacloud_aws::AwsConfig;
use pacloud_aws::testkit::Moto;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_pacloud-lambda");

/// A fixture event from `tests/events/`, with a fresh API Gateway request id.
pub fn event(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/events").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    v["requestContext"]["requestId"] = format!("req-{n:08}").into();
    v
}

/// Replaces the body (and its Content-Length).
pub fn with_body(mut v: Value, body: &str) -> Value {
    v["body"] = body.into();
    v["headers"]["content-length"] = body.len().to_string().into();
    v
}

/// Replaces the `KEY` placeholder of a path fixture.
pub fn with_key(mut v: Value, key: &str) -> Value {
    let path = v["rawPath"].as_str().unwrap().replace("KEY", key);
    v["rawPath"] = path.clone().into();
    v["requestContext"]["http"]["path"] = path.into();
    v
}

/// Replaces the method and path.
pub fn with_method_path(mut v: Value, method: &str, path: &str) -> Value {
    v["rawPath"] = path.into();
    v["requestContext"]["http"]["path"] = path.into();
    v["requestContext"]["http"]["method"] = method.into();
    v
}

/// Adds a request header.
pub fn with_header(mut v: Value, name: &str, value: &str) -> Value {
    v["headers"][name] = value.into();
    v
}

/// The HTTP answer inside a function response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Value,
    pub body: Value,
    pub raw: Value,
}

/// Unwraps an API Gateway v2 response; panics on a function error.
pub fn http(outcome: Outcome) -> HttpReply {
    let raw = match outcome {
        Outcome::Response(v) => v,
        Outcome::Error { error_type, body } => panic!("function error {error_type:?}: {body}"),
    };
    let status = raw["statusCode"].as_u64().unwrap_or_else(|| panic!("no statusCode in {raw}")) as u16;
    assert_eq!(raw["isBase64Encoded"], false, "JSON answers are text: {raw}");
    let text = raw["body"].as_str().unwrap_or("");
    let body = serde_json::from_str(text).unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    HttpReply { status, headers: raw["headers"].clone(), body, raw }
}

/// One running function process.
pub struct Lambda {
    pub child: tokio::process::Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Lambda {
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    /// Panics logged (as JSON lines with message "panic").
    pub fn panics(&self) -> usize {
        self.stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "panic")
            .count()
    }
}

/// The variables Lambda sets for every function, pointing at `runtime_api`.
pub fn lambda_env(runtime_api: &str) -> Vec<(String, String)> {
    [
        ("AWS_LAMBDA_RUNTIME_API", runtime_api),
        ("AWS_LAMBDA_FUNCTION_NAME", "pacloud-api"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/23/[$LATEST]0123456789abcdef"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/pacloud-api"),
        ("AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH", "true"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("LAMBDA_TASK_ROOT", "/var/task"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The function's own variables for resources in moto: the AWS endpoint
/// and credentials through the standard `AWS_*` variables only.
pub fn pacloud_env(cfg: &AwsConfig, moto_endpoint: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", moto_endpoint),
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
    .collect();
    if let Some(dlq) = &cfg.dlq_url {
        v.push(("PACLOUD_DLQ_URL".into(), dlq.clone()));
    }
    if let Some(events) = &cfg.scaler_events_url {
        v.push(("PACLOUD_SCALER_EVENTS_URL".into(), events.clone()));
    }
    v
}

/// Starts `pacloud-lambda` with exactly `env` (nothing inherited but PATH),
/// logs to files under `dir`.
pub fn spawn_lambda(bin: &str, env: &[(String, String)], dir: &Path, name: &str) -> Lambda {
    let stdout = dir.join(format!("{name}.stdout"));
    let stderr = dir.join(format!("{name}.stderr"));
    let child = tokio::process::Command::new(bin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    Lambda { child, stdout, stderr }
}

/// moto + provisioned resources + the fake Runtime API + N function processes.
pub struct Deployment {
    pub moto: Moto,
    pub cfg: AwsConfig,
    pub ports: pacloud_aws::AwsPorts,
    pub runtime: FakeRuntimeApi,
    pub lambdas: Vec<Lambda>,
    pub dir: tempfile::TempDir,
}

impl Deployment {
    /// `extra` adds or overrides function variables.
    pub async fn start(prefix: &str, instances: usize, extra: &[(&str, &str)]) -> Deployment {
        let moto = Moto::start();
        let mut cfg = moto.provision(prefix, 3).await;
        // The fleet scaler's events queue, as the template wires it.
        let sqs = pacloud_aws::clients(&cfg).await.sqs;
        let events = sqs.create_queue().queue_name(format!("{prefix}-fleet-events")).send().await.unwrap();
        cfg.scaler_events_url = events.queue_url;
        let ports = pacloud_aws::connect(&AwsConfig { scaler_events_url: None, ..cfg.clone() }).await;
        let runtime = FakeRuntimeApi::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut env = lambda_env(&runtime.runtime_api());
        env.extend(pacloud_env(&cfg, &moto.endpoint));
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        let start = std::time::Instant::now();
        let lambdas: Vec<Lambda> =
            (0..instances).map(|i| spawn_lambda(BIN, &env, dir.path(), &format!("lambda-{i}"))).collect();
        // Init is over when every instance polls for its first event.
        while runtime.next_calls().len() < instances {
            assert!(start.elapsed() < Duration::from_secs(30), "the functions did not finish init");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Deployment { moto, cfg, ports, runtime, lambdas, dir }
    }

    pub async fn call(&self, event: &Value) -> HttpReply {
        http(self.runtime.invoke_and_wait(event).await)
    }

    /// Receives (and deletes) every message on the fleet scaler's events
    /// queue: the nudges the function sent.
    pub async fn drain_nudges(&self) -> Vec<Value> {
        let sqs = pacloud_aws::clients(&self.cfg).await.sqs;
        pacloud_aws::testkit::drain_json(&sqs, self.cfg.scaler_events_url.as_deref().expect("an events queue")).await
    }

    /// Receives (and deletes) every message on the job queue.
    pub async fn drain_queue(&self) -> Vec<String> {
        use pacloud_domain::ports::JobQueue;
        let mut out = Vec::new();
        loop {
            let got = self.ports.queue.receive(10, Duration::from_secs(600), Duration::from_secs(1)).await.unwrap();
            if got.is_empty() {
                return out;
            }
            for d in got {
                self.ports.queue.ack(&d.receipt).await.unwrap();
                out.push(d.body);
            }
        }
    }

    /// Every item in the builds table.
    pub async fn scan_table(&self) -> usize {
        let c = pacloud_aws::clients(&self.cfg).await;
        let mut n = 0;
        let mut start = None;
        loop {
            let out = c
                .dynamodb
                .scan()
                .table_name(&self.cfg.table)
                .set_exclusive_start_key(start)
                .consistent_read(true)
                .send()
                .await
                .unwrap();
            n += out.items().len();
            start = out.last_evaluated_key;
            if start.is_none() {
                return n;
            }
        }
    }

    /// No function errors and no init errors were reported.
    pub fn assert_no_function_errors(&self) {
        let errors = self.runtime.function_errors();
        assert!(errors.is_empty(), "function errors: {errors:?}");
        assert!(self.runtime.init_errors().is_empty(), "init errors: {:?}", self.runtime.init_errors());
        for l in &self.lambdas {
            assert_eq!(l.panics(), 0, "a function panicked: {}", l.stdout());
            assert!(l.stderr().is_empty(), "nothing but JSON logs on stdout: {}", l.stderr());
        }
    }
}

/// GET over plain HTTP (presigned URLs from moto); returns status and bytes.
pub async fn http_get(url: &str) -> (u16, Vec<u8>) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, body)
}
