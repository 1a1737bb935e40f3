//! A FAKE of the AWS Lambda Runtime API: the one part of the Lambda
//! environment that cannot run here. Everything else in these tests is real
//! (the `pacloud-lambda` binary with lambda_runtime's own client, moto's
//! AWS wire protocol). It speaks the documented endpoints on 127.0.0.1:0:
//!
//! - `GET  /2018-06-01/runtime/invocation/next` hands out queued events
//!   (long-polls while none is queued) with the `Lambda-Runtime-*` headers;
//! - `POST /2018-06-01/runtime/invocation/{id}/response` and `.../{id}/error`
//!   record the invocation's outcome;
//! - `POST /2018-06-01/runtime/init/error` records init failures.
//!
//! Several function processes may poll one fake at once; each event goes to
//! exactly one of them, as Lambda does across instances.
//! Shared by the tests and the bench binary (`#[path]`-included).

#![allow(dead_code)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, mpsc};

/// What the function reported for one invocation.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// `POST .../response`: the function's result (for lambda_http, the API
    /// Gateway response JSON).
    Response(Value),
    /// `POST .../error`: a function error.
    Error { error_type: Option<String>, body: Value },
}

/// A `POST /runtime/init/error`.
#[derive(Debug, Clone)]
pub struct InitErrorReport {
    pub error_type: Option<String>,
    pub body: Value,
    pub at: Instant,
}

struct Queued {
    id: String,
    event: Bytes,
    sent: Instant,
}

struct Shared {
    tx: mpsc::UnboundedSender<Queued>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>,
    /// id -> (handed out at, reported at, outcome)
    outcomes: Mutex<HashMap<String, (Duration, Outcome)>>,
    handed_out: Mutex<HashMap<String, Instant>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    init_errors: Mutex<Vec<InitErrorReport>>,
    next_calls: Mutex<Vec<Instant>>,
    changed: Notify,
    seq: AtomicU64,
}

/// The running fake; stops serving when dropped.
pub struct FakeRuntimeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeRuntimeApi {
    pub async fn start() -> FakeRuntimeApi {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            outcomes: Mutex::new(HashMap::new()),
            handed_out: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            init_errors: Mutex::new(Vec::new()),
            next_calls: Mutex::new(Vec::new()),
            changed: Notify::new(),
            seq: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route("/2018-06-01/runtime/invocation/{id}/response", post(response))
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake runtime API");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeRuntimeApi { addr, shared, server }
    }

    /// The value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn runtime_api(&self) -> String {
        self.addr.to_string()
    }

    /// Queues an event; returns its request id.
    pub fn invoke(&self, event: &Value) -> String {
        let n = self.shared.seq.fetch_add(1, Ordering::SeqCst);
        let id = format!("8476a536-e9f4-11e8-9739-{n:012x}");
        let q = Queued { id: id.clone(), event: Bytes::from(event.to_string()), sent: Instant::now() };
        self.shared.tx.send(q).expect("queue event");
        id
    }

    /// Waits for the outcome of `id`; also returns the time from queueing
    /// the event to its outcome.
    pub async fn wait(&self, id: &str, timeout: Duration) -> (Outcome, Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if let Some(o) = self.shared.outcomes.lock().unwrap().get(id) {
                return (o.1.clone(), o.0);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no outcome for invocation {id} within {timeout:?}");
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Queues an event and waits for its outcome.
    pub async fn invoke_and_wait(&self, event: &Value) -> Outcome {
        let id = self.invoke(event);
        self.wait(&id, Duration::from_secs(60)).await.0
    }

    /// Every `.../error` report so far: (request id, outcome).
    pub fn function_errors(&self) -> Vec<(String, Outcome)> {
        let m = self.shared.outcomes.lock().unwrap();
        m.iter()
            .filter(|(_, (_, o))| matches!(o, Outcome::Error { .. }))
            .map(|(k, (_, o))| (k.clone(), o.clone()))
            .collect()
    }

    pub fn init_errors(&self) -> Vec<InitErrorReport> {
        self.shared.init_errors.lock().unwrap().clone()
    }

    /// Waits until an init error is reported.
    pub async fn wait_init_error(&self, timeout: Duration) -> Option<InitErrorReport> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if let Some(e) = self.shared.init_errors.lock().unwrap().first() {
                return Some(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Arrival times of `/invocation/next` requests.
    pub fn next_calls(&self) -> Vec<Instant> {
        self.shared.next_calls.lock().unwrap().clone()
    }

    /// Waits for the first `/invocation/next` request that arrives after
    /// `since` and returns its arrival time.
    pub async fn wait_next_call_after(&self, since: Instant, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if let Some(t) = self.shared.next_calls.lock().unwrap().iter().find(|t| **t >= since) {
                return Some(*t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Most invocations handed out and not yet answered at one time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn next(State(s): State<Arc<Shared>>) -> Response {
    s.next_calls.lock().unwrap().push(Instant::now());
    s.changed.notify_waiters();
    let q = {
        let mut rx = s.rx.lock().await;
        rx.recv().await
    };
    let Some(q) = q else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    s.handed_out.lock().unwrap().insert(q.id.clone(), q.sent);
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let deadline_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() + 30_000;
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("lambda-runtime-aws-request-id", q.id.clone()),
        ("lambda-runtime-deadline-ms", deadline_ms.to_string()),
        ("lambda-runtime-invoked-function-arn", "arn:aws:lambda:us-east-1:123456789012:function:pacloud-api".into()),
        ("lambda-runtime-trace-id", format!("Root=1-5759e988-bd862e3fe1be46a994272793;Parent={:016x};Sampled=0", 7)),
    ];
    let mut resp = (StatusCode::OK, q.event).into_response();
    for (k, v) in headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

fn record(s: &Shared, id: String, outcome: Outcome) -> StatusCode {
    let Some(sent) = s.handed_out.lock().unwrap().remove(&id) else {
        return StatusCode::BAD_REQUEST; // not an id this fake handed out
    };
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    s.outcomes.lock().unwrap().insert(id, (sent.elapsed(), outcome));
    s.changed.notify_waiters();
    StatusCode::ACCEPTED
}

fn json_or_text(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn error_type(h: &HeaderMap) -> Option<String> {
    h.get("lambda-runtime-function-error-type").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

async fn response(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    record(&s, id, Outcome::Response(json_or_text(&body)))
}

async fn error(State(s): State<Arc<Shared>>, Path(id): Path<String>, h: HeaderMap, body: Bytes) -> StatusCode {
    record(&s, id, Outcome::Error { error_type: error_type(&h), body: json_or_text(&body) })
}

async fn init_error(State(s): State<Arc<Shared>>, h: HeaderMap, body: Bytes) -> StatusCode {
    let report = InitErrorReport { error_type: error_type(&h), body: json_or_text(&body), at: Instant::now() };
    s.init_errors.lock().unwrap().push(report);
    s.changed.notify_waiters();
    StatusCode::ACCEPTED
}
