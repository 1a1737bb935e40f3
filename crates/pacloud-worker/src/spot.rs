//! Spot interruption watcher: turns EC2 spot instance-action notices and
//! resumes after hibernation into [`SpotEvent`]s, and [`react`] applies the
//! worker's policy to them.
//!
//! Sources:
//! - IMDSv2 is polled every `poll_interval` (default 5 s; AWS gives a
//!   two-minute notice): `PUT /latest/api/token` for a session token (reused
//!   until shortly before its TTL runs out, replaced at once when IMDS
//!   answers 401), then `GET /latest/meta-data/spot/instance-action`.
//!   404 means no action; 200 carries `{"action": ..., "time": ...}` with
//!   action `terminate`, `stop` or `hibernate`. Each distinct notice is sent
//!   once, not on every poll. Garbage or unknown actions are ignored with a
//!   warning (once per distinct answer). An unreachable IMDS (not on EC2) is
//!   logged once at warn level and then only at debug; polling goes on.
//! - A resume after hibernation is seen as a wall-clock jump: on every tick
//!   the advance of the wall clock ([`SystemTime`]) is compared with the
//!   advance of the monotonic clock ([`Instant`]), which stands still while
//!   the machine is hibernated. A difference above `resume_threshold`
//!   (default 30 s) is reported as [`SpotEvent::Resumed`]. The session token
//!   is dropped then, because it may have expired meanwhile.
//!
//! Policy (DESIGN.md section 3, "Spot interruption"), encoded by [`react`]:
//! - `terminate` / `stop`: memory is lost. Take no new jobs (`stop`) and kill
//!   running builds (`abort`); the worker then gives their leases back and
//!   releases their messages with visibility 0, so another worker picks them
//!   up at once instead of after the lease runs out.
//! - `hibernate`: nothing; memory (and so the running builds) is kept.
//! - resumed: leases and message visibility may have expired while the
//!   machine slept and another worker may have taken over, so `recheck` is
//!   notified: running jobs re-check their lease at once (the same check as
//!   a heartbeat, which cancels the build when the lease is lost) before
//!   anything is published. Publishing is conditional on the lease anyway;
//!   the recheck only stops a build that can no longer be published early.

use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// The link-local address of the EC2 instance metadata service.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

const TOKEN_PATH: &str = "/latest/api/token";
const ACTION_PATH: &str = "/latest/meta-data/spot/instance-action";
const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// The longest session token IMDS hands out.
const MAX_TOKEN_TTL_SECS: u64 = 21_600;
/// IMDS answers here are tiny; anything bigger is not IMDS.
const MAX_RESPONSE: usize = 64 * 1024;

/// Tunables of the [`SpotWatcher`].
#[derive(Debug, Clone)]
pub struct SpotConfig {
    /// `http://host[:port]` of IMDS.
    pub endpoint: String,
    /// Time between two polls (and two clock-jump checks).
    pub poll_interval: Duration,
    /// Requested lifetime of the IMDSv2 session token (whole seconds,
    /// 1 s to 6 h); it is replaced shortly before it runs out.
    pub token_ttl: Duration,
    /// How far the wall clock must outrun the monotonic clock between two
    /// ticks to count as a resume after hibernation.
    pub resume_threshold: Duration,
    /// Limit of one HTTP exchange with IMDS (connect, send, receive).
    pub request_timeout: Duration,
}

impl Default for SpotConfig {
    fn default() -> Self {
        SpotConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            poll_interval: Duration::from_secs(5),
            token_ttl: Duration::from_secs(MAX_TOKEN_TTL_SECS),
            resume_threshold: Duration::from_secs(30),
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// What the watcher reports. `at` is the notice's `time` as IMDS gave it
/// (RFC 3339, UTC), when it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpotEvent {
    Terminate {
        at: Option<String>,
    },
    Stop {
        at: Option<String>,
    },
    Hibernate {
        at: Option<String>,
    },
    /// The machine was hibernated and has resumed; `jumped` is how far the
    /// wall clock moved beyond the monotonic clock.
    Resumed {
        jumped: Duration,
    },
}

/// Why talking to IMDS failed.
#[derive(Debug, thiserror::Error)]
pub enum SpotError {
    #[error("invalid IMDS endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: &'static str },
    #[error("cannot connect to IMDS at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("IMDS connection failed")]
    Io(#[from] std::io::Error),
    #[error("IMDS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed HTTP response from IMDS: {0}")]
    BadResponse(&'static str),
    #[error("IMDS answered HTTP {status} to the {what} request")]
    Status { what: &'static str, status: u16 },
    #[error("IMDS returned an unusable session token")]
    BadToken,
    #[error("unusable spot instance-action notice ({reason}): {body:?}")]
    BadNotice { reason: String, body: String },
}

/// The two clocks compared to detect a resume; injectable for tests.
pub trait SpotClock: Send + Sync {
    /// Wall-clock time; jumps forward over a hibernation.
    fn wall(&self) -> SystemTime;
    /// Monotonic time; stands still while the machine is hibernated.
    fn monotonic(&self) -> Instant;
}

/// The real clocks: [`SystemTime::now`] and [`Instant::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemSpotClock;

impl SpotClock for SystemSpotClock {
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

/// Watches for spot interruption notices and resumes; see the module doc.
pub struct SpotWatcher {
    config: SpotConfig,
    clock: Arc<dyn SpotClock>,
}

impl SpotWatcher {
    pub fn new(config: SpotConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemSpotClock))
    }

    /// A watcher reading time from `clock` (tests simulate jumps with it).
    pub fn with_clock(config: SpotConfig, clock: Arc<dyn SpotClock>) -> Self {
        SpotWatcher { config, clock }
    }

    /// Polls until `shutdown` is cancelled or `events` is closed. Never
    /// gives up on IMDS errors: they are logged (quietly after the first)
    /// and the next tick tries again. An invalid endpoint disables polling
    /// but the resume detection keeps running.
    pub async fn run(self, events: mpsc::Sender<SpotEvent>, shutdown: CancellationToken) {
        let mut imds = match Endpoint::parse(&self.config.endpoint) {
            Ok(endpoint) => Some(Imds::new(endpoint, &self.config, self.clock.clone())),
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "spot watcher: not polling IMDS; only resumes are detected"
                );
                None
            }
        };
        let mut jumps = JumpDetector::new(self.clock.clone(), self.config.resume_threshold);
        let mut last_notice: Option<SpotEvent> = None;
        let mut last_bad: Option<String> = None;
        let mut failing = false;
        let mut ticker = tokio::time::interval(self.config.poll_interval.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }

            if let Some(jumped) = jumps.check() {
                // A token from before the sleep may have expired, and a new
                // hibernate notice must be reported again.
                if let Some(imds) = imds.as_mut() {
                    imds.forget_token();
                }
                last_notice = None;
                if !emit(&events, &shutdown, SpotEvent::Resumed { jumped }).await {
                    return;
                }
            }

            let Some(client) = imds.as_mut() else { continue };
            let polled = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = client.instance_action() => r,
            };
            match polled {
                Ok(notice) => {
                    if failing {
                        tracing::info!("IMDS is reachable again; watching for spot interruption notices");
                        failing = false;
                    }
                    last_bad = None;
                    let Some(notice) = notice else { continue };
                    if last_notice.as_ref() == Some(&notice) {
                        continue;
                    }
                    last_notice = Some(notice.clone());
                    if !emit(&events, &shutdown, notice).await {
                        return;
                    }
                }
                Err(SpotError::BadNotice { reason, body }) => {
                    failing = false;
                    if last_bad.as_deref() != Some(body.as_str()) {
                        tracing::warn!(%reason, %body, "ignoring an unusable spot instance-action notice");
                        last_bad = Some(body);
                    }
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(error = &e as &dyn std::error::Error, "IMDS still unavailable");
                    } else {
                        tracing::warn!(
                            error = &e as &dyn std::error::Error,
                            "IMDS unavailable (not on EC2?); spot interruption notices cannot be seen; \
                             polling on quietly"
                        );
                        failing = true;
                    }
                }
            }
        }
    }
}

/// Sends one event; false when the watcher should end (receiver gone or
/// shutdown).
async fn emit(events: &mpsc::Sender<SpotEvent>, shutdown: &CancellationToken, event: SpotEvent) -> bool {
    tracing::info!(?event, "spot event");
    tokio::select! {
        r = events.send(event) => {
            if r.is_err() {
                tracing::debug!("nobody listens to spot events any more; watcher ends");
            }
            r.is_ok()
        }
        _ = shutdown.cancelled() => false,
    }
}

/// Applies the policy of the module doc to one event: terminate/stop cancel
/// `stop` (no new jobs) and `abort` (kill running builds, release their
/// messages with visibility 0 and their leases); hibernate does nothing;
/// resumed wakes every task waiting on `recheck` (`notify_waiters`) so
/// running jobs re-check their lease at once.
pub fn react(event: &SpotEvent, stop: &CancellationToken, abort: &CancellationToken, recheck: &Notify) {
    match event {
        SpotEvent::Terminate { at } | SpotEvent::Stop { at } => {
            tracing::warn!(
                ?event,
                at = at.as_deref().unwrap_or("unknown"),
                "spot interruption: taking no new jobs, stopping running builds and releasing their messages"
            );
            stop.cancel();
            abort.cancel();
        }
        SpotEvent::Hibernate { at } => {
            tracing::info!(
                at = at.as_deref().unwrap_or("unknown"),
                "spot hibernation notice: memory is kept, builds go on"
            );
        }
        SpotEvent::Resumed { jumped } => {
            tracing::info!(?jumped, "resumed after hibernation: running jobs re-check their leases");
            recheck.notify_waiters();
        }
    }
}

/// Detects a wall clock outrunning the monotonic clock between two checks.
struct JumpDetector {
    clock: Arc<dyn SpotClock>,
    threshold: Duration,
    wall: SystemTime,
    mono: Instant,
}

impl JumpDetector {
    fn new(clock: Arc<dyn SpotClock>, threshold: Duration) -> Self {
        let (wall, mono) = (clock.wall(), clock.monotonic());
        JumpDetector { clock, threshold, wall, mono }
    }

    /// The jump since the last check, if it is over the threshold. A wall
    /// clock stepped backwards (NTP) is not a resume.
    fn check(&mut self) -> Option<Duration> {
        let (wall, mono) = (self.clock.wall(), self.clock.monotonic());
        let mono_advance = mono.saturating_duration_since(self.mono);
        let wall_advance = wall.duration_since(self.wall).ok();
        self.wall = wall;
        self.mono = mono;
        let jumped = wall_advance?.checked_sub(mono_advance)?;
        (jumped > self.threshold).then_some(jumped)
    }
}

#[derive(Deserialize)]
struct RawNotice {
    action: String,
    #[serde(default)]
    time: Option<String>,
}

/// Reads a 200 answer of `spot/instance-action`.
fn parse_notice(body: &[u8]) -> Result<SpotEvent, SpotError> {
    let shown = || {
        let text = String::from_utf8_lossy(body);
        text.chars().take(200).collect::<String>()
    };
    let raw: RawNotice = serde_json::from_slice(body)
        .map_err(|e| SpotError::BadNotice { reason: format!("not a notice: {e}"), body: shown() })?;
    let at = raw.time;
    match raw.action.to_ascii_lowercase().as_str() {
        "terminate" => Ok(SpotEvent::Terminate { at }),
        "stop" => Ok(SpotEvent::Stop { at }),
        "hibernate" => Ok(SpotEvent::Hibernate { at }),
        other => Err(SpotError::BadNotice { reason: format!("unknown action {other:?}"), body: shown() }),
    }
}

/// This EC2 instance's id from IMDSv2 (`GET /latest/meta-data/instance-id`
/// with a session token), or why it could not be read (not on EC2: a
/// connect error or a timeout).
pub async fn instance_id(config: &SpotConfig) -> Result<String, SpotError> {
    let endpoint = Endpoint::parse(&config.endpoint)?;
    Imds::new(endpoint, config, Arc::new(SystemSpotClock)).instance_id().await
}

/// The IMDSv2 session: token cache and the instance-action query.
struct Imds {
    http: Http,
    clock: Arc<dyn SpotClock>,
    ttl_secs: u64,
    refresh_after: Duration,
    token: Option<(String, Instant)>,
}

impl Imds {
    fn new(endpoint: Endpoint, config: &SpotConfig, clock: Arc<dyn SpotClock>) -> Self {
        let ttl_secs = config.token_ttl.as_secs().clamp(1, MAX_TOKEN_TTL_SECS);
        let ttl = Duration::from_secs(ttl_secs);
        let refresh_after = ttl - (ttl / 10).min(Duration::from_secs(60));
        Imds { http: Http { endpoint, timeout: config.request_timeout }, clock, ttl_secs, refresh_after, token: None }
    }

    fn forget_token(&mut self) {
        self.token = None;
    }

    async fn token(&mut self) -> Result<String, SpotError> {
        if let Some((token, fetched)) = &self.token
            && self.clock.monotonic().saturating_duration_since(*fetched) < self.refresh_after
        {
            return Ok(token.clone());
        }
        self.token = None;
        // Age counted from before the request: never older on our side
        // than on IMDS's.
        let started = self.clock.monotonic();
        let ttl = self.ttl_secs.to_string();
        let resp = self.http.request("PUT", TOKEN_PATH, (TTL_HEADER, &ttl)).await?;
        if resp.status != 200 {
            return Err(SpotError::Status { what: "token", status: resp.status });
        }
        let token = std::str::from_utf8(&resp.body).map_err(|_| SpotError::BadToken)?.trim();
        // It goes into a header line: visible ASCII only.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SpotError::BadToken);
        }
        self.token = Some((token.to_string(), started));
        Ok(token.to_string())
    }

    /// This instance's id (`i-...`), for the fleet tags the worker sets.
    async fn instance_id(&mut self) -> Result<String, SpotError> {
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let resp = self.http.request("GET", INSTANCE_ID_PATH, (TOKEN_HEADER, &token)).await?;
            match resp.status {
                200 => {
                    let id = String::from_utf8_lossy(&resp.body).trim().to_owned();
                    let well_formed = id.len() <= 32
                        && id
                            .strip_prefix("i-")
                            .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric()));
                    if !well_formed {
                        let shown: String = id.chars().take(64).collect();
                        return Err(SpotError::BadNotice { reason: "not an instance id".into(), body: shown });
                    }
                    return Ok(id);
                }
                401 if !retried => {
                    self.token = None;
                    retried = true;
                }
                status => return Err(SpotError::Status { what: "instance-id", status }),
            }
        }
    }

    /// `Ok(None)` when there is no pending action.
    async fn instance_action(&mut self) -> Result<Option<SpotEvent>, SpotError> {
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let resp = self.http.request("GET", ACTION_PATH, (TOKEN_HEADER, &token)).await?;
            match resp.status {
                200 => return parse_notice(&resp.body).map(Some),
                404 => return Ok(None),
                401 if !retried => {
                    tracing::debug!("IMDS refused the session token; fetching a new one");
                    self.token = None;
                    retried = true;
                }
                status => return Err(SpotError::Status { what: "instance-action", status }),
            }
        }
    }
}

/// `http://host[:port]` split for connecting and for the Host header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// `host:port` (IPv6 in brackets), what `TcpStream::connect` takes.
    authority: String,
    host_header: String,
}

impl Endpoint {
    fn parse(endpoint: &str) -> Result<Self, SpotError> {
        let bad = |reason| SpotError::InvalidEndpoint { endpoint: endpoint.to_string(), reason };
        let rest = endpoint.strip_prefix("http://").ok_or_else(|| bad("only http:// is supported"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.chars().any(|c| c.is_whitespace()) {
            return Err(bad("expected http://host[:port]"));
        }
        let (host, port) = if rest.starts_with('[') {
            let close = rest.find(']').ok_or_else(|| bad("unclosed '[' in IPv6 address"))?;
            let (host, after) = rest.split_at(close + 1);
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(|| bad("junk after IPv6 address"))?)),
            }
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("empty host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("invalid port"))?,
        };
        let authority = format!("{host}:{port}");
        let host_header = if port == 80 { host.to_string() } else { authority.clone() };
        Ok(Endpoint { authority, host_header })
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// A minimal HTTP/1.1 client: one request per connection, no body sent,
/// `Connection: close`, the whole exchange under one timeout.
struct Http {
    endpoint: Endpoint,
    timeout: Duration,
}

impl Http {
    async fn request(&self, method: &str, path: &str, header: (&str, &str)) -> Result<Response, SpotError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, header)).await {
            Ok(r) => r,
            Err(_) => Err(SpotError::Timeout(self.timeout)),
        }
    }

    async fn exchange(&self, method: &str, path: &str, (name, value): (&str, &str)) -> Result<Response, SpotError> {
        let addr = &self.endpoint.authority;
        let mut stream = TcpStream::connect(addr.as_str())
            .await
            .map_err(|source| SpotError::Connect { addr: addr.clone(), source })?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: */*\r\nConnection: close\r\n{name}: {value}\r\n",
            self.endpoint.host_header
        );
        if method != "GET" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;

        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            let eof = n == 0;
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE {
                return Err(SpotError::BadResponse("response too large"));
            }
            if let Some(resp) = parse_response(&buf, eof)? {
                return Ok(resp);
            }
            if eof {
                return Err(SpotError::BadResponse("connection closed early"));
            }
        }
    }
}

/// Parses a response read so far; `Ok(None)` means more bytes are needed.
/// With `eof` (nothing more will come) it never returns `Ok(None)`.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, SpotError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if eof { Err(SpotError::BadResponse("connection closed inside the headers")) } else { Ok(None) };
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| SpotError::BadResponse("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(SpotError::BadResponse("not an HTTP/1.x status line"));
    }
    let code = parts.next().unwrap_or_default();
    let status = match code.parse::<u16>() {
        Ok(s) if code.len() == 3 && (100..=599).contains(&s) => s,
        _ => return Err(SpotError::BadResponse("invalid status code")),
    };
    let mut content_length: Option<usize> = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(SpotError::BadResponse("malformed header line"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let n = value.parse::<usize>().map_err(|_| SpotError::BadResponse("invalid Content-Length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(SpotError::BadResponse("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && !value.eq_ignore_ascii_case("identity") {
            return Err(SpotError::BadResponse("unsupported Transfer-Encoding"));
        }
    }
    let rest = &buf[head_end + 4..];
    if status < 200 || status == 204 || status == 304 {
        return Ok(Some(Response { status, body: Vec::new() }));
    }
    match content_length {
        Some(n) if rest.len() >= n => Ok(Some(Response { status, body: rest[..n].to_vec() })),
        Some(_) if eof => Err(SpotError::BadResponse("body shorter than Content-Length")),
        Some(_) => Ok(None),
        None if eof => Ok(Some(Response { status, body: rest.to_vec() })),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    // ---- A FAKE of the EC2 instance metadata service (IMDSv2) ----------
    //
    // Just enough of IMDS for the watcher: `PUT /latest/api/token` issues
    // tokens with the requested TTL (400 without it), `GET
    // /latest/meta-data/spot/instance-action` requires a live token (401
    // otherwise) and answers 404 or the configured body. It counts requests
    // and its answer can be switched while the watcher runs.

    #[derive(Default)]
    struct FakeImdsState {
        /// `None` → 404 (no action); `Some(body)` → 200 with that body.
        action: Option<String>,
        puts: usize,
        gets: usize,
        unauthorized: usize,
        issued: u64,
        tokens: HashMap<String, Instant>,
    }

    struct FakeImds {
        base: String,
        state: Arc<Mutex<FakeImdsState>>,
        task: JoinHandle<()>,
    }

    impl Drop for FakeImds {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FakeImds {
        async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let state = Arc::new(Mutex::new(FakeImdsState::default()));
            let shared = state.clone();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(fake_imds_serve(stream, shared.clone()));
                }
            });
            FakeImds { base, state, task }
        }
        fn set_action(&self, body: Option<&str>) {
            self.state.lock().unwrap().action = body.map(str::to_string);
        }
        fn puts(&self) -> usize {
            self.state.lock().unwrap().puts
        }
        fn gets(&self) -> usize {
            self.state.lock().unwrap().gets
        }
        fn unauthorized(&self) -> usize {
            self.state.lock().unwrap().unauthorized
        }
        /// Invalidates every issued token (as IMDS does after a restart).
        fn revoke_tokens(&self) {
            self.state.lock().unwrap().tokens.clear();
        }
    }

    async fn fake_imds_serve(mut stream: TcpStream, state: Arc<Mutex<FakeImdsState>>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 16 * 1024 {
                return;
            }
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let (method, path) = (request_line.next().unwrap_or_default(), request_line.next().unwrap_or_default());
        let header = |wanted: &str| {
            head.split("\r\n")
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case(wanted))
                .map(|(_, v)| v.trim().to_string())
        };
        let (status, body) = {
            let mut st = state.lock().unwrap();
            match (method, path) {
                ("PUT", TOKEN_PATH) => {
                    st.puts += 1;
                    match header(TTL_HEADER).and_then(|v| v.parse::<u64>().ok()) {
                        Some(ttl) if (1..=MAX_TOKEN_TTL_SECS).contains(&ttl) => {
                            st.issued += 1;
                            let token = format!("fake-imds-token-{}", st.issued);
                            st.tokens.insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
                            (200, token)
                        }
                        _ => (400, String::new()),
                    }
                }
                ("GET", INSTANCE_ID_PATH) => {
                    let live = header(TOKEN_HEADER).is_some_and(|t| st.tokens.contains_key(&t));
                    if live { (200, "i-0fake1234567890".to_string()) } else { (401, String::new()) }
                }
                ("GET", ACTION_PATH) => {
                    st.gets += 1;
                    let live = header(TOKEN_HEADER)
                        .and_then(|t| st.tokens.get(&t).copied())
                        .is_some_and(|expires| expires > Instant::now());
                    if !live {
                        st.unauthorized += 1;
                        (401, String::new())
                    } else {
                        match &st.action {
                            Some(body) => (200, body.clone()),
                            None => (404, "Not Found".to_string()),
                        }
                    }
                }
                _ => (404, String::new()),
            }
        };
        let resp = format!(
            "HTTP/1.1 {status} Fake\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    // ---- helpers ---------------------------------------------------------

    const POLL: Duration = Duration::from_millis(100);

    fn test_config(endpoint: &str) -> SpotConfig {
        SpotConfig {
            endpoint: endpoint.to_string(),
            poll_interval: POLL,
            request_timeout: Duration::from_secs(1),
            ..SpotConfig::default()
        }
    }

    struct Running {
        events: mpsc::Receiver<SpotEvent>,
        shutdown: CancellationToken,
        task: JoinHandle<()>,
    }

    fn start(watcher: SpotWatcher) -> Running {
        let (tx, events) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watcher.run(tx, shutdown.clone()));
        Running { events, shutdown, task }
    }

    impl Running {
        /// The next event, waiting at most `within`.
        async fn next(&mut self, within: Duration) -> Option<SpotEvent> {
            tokio::time::timeout(within, self.events.recv()).await.ok().flatten()
        }
        /// Asserts that no event arrives for `quiet`.
        async fn assert_quiet(&mut self, quiet: Duration) {
            if let Some(ev) = self.next(quiet).await {
                panic!("unexpected spot event {ev:?}");
            }
        }
        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(2), self.task)
                .await
                .expect("watcher ends on shutdown")
                .expect("watcher did not panic");
        }
    }

    /// A clock that only moves when told to.
    struct FakeClock {
        base_wall: SystemTime,
        base_mono: Instant,
        /// (wall offset, monotonic offset)
        offsets: Mutex<(Duration, Duration)>,
    }

    impl FakeClock {
        fn new() -> Arc<Self> {
            Arc::new(FakeClock {
                base_wall: SystemTime::now(),
                base_mono: Instant::now(),
                offsets: Mutex::new((Duration::ZERO, Duration::ZERO)),
            })
        }
        /// Both clocks advance: normal running.
        fn advance(&self, d: Duration) {
            let mut o = self.offsets.lock().unwrap();
            o.0 += d;
            o.1 += d;
        }
        /// Only the wall clock advances: the machine slept for `d`.
        fn hibernate_for(&self, d: Duration) {
            self.offsets.lock().unwrap().0 += d;
        }
        /// The wall clock is stepped back (an NTP correction).
        fn step_wall_back(&self, d: Duration) {
            let mut o = self.offsets.lock().unwrap();
            o.0 = o.0.saturating_sub(d);
        }
    }

    impl SpotClock for FakeClock {
        fn wall(&self) -> SystemTime {
            self.base_wall + self.offsets.lock().unwrap().0
        }
        fn monotonic(&self) -> Instant {
            self.base_mono + self.offsets.lock().unwrap().1
        }
    }

    const TERMINATE: &str = r#"{"action": "terminate", "time": "2026-11-23T02:10:00Z"}"#;

    // ---- watcher against the fake IMDS ----------------------------------

    #[tokio::test]
    async fn fake_imds_no_action_then_terminate_is_sent_once() {
        let imds = FakeImds::start().await;
        let mut w = start(SpotWatcher::new(test_config(&imds.base)));
        w.assert_quiet(POLL * 5).await;
        assert!(imds.gets() >= 2, "the watcher polls");

        imds.set_action(Some(TERMINATE));
        // Seen on the next poll; the bound is generous for loaded machines.
        let ev = w.next(POLL * 2 + Duration::from_secs(1)).await;
        assert_eq!(ev, Some(SpotEvent::Terminate { at: Some("2026-11-23T02:10:00Z".into()) }));
        // Still answered on every poll, but reported only once.
        w.assert_quiet(POLL * 5).await;
        assert_eq!(imds.unauthorized(), 0);
        w.stop().await;
    }

    #[tokio::test]
    async fn fake_imds_distinct_notices_are_each_sent() {
        let imds = FakeImds::start().await;
        imds.set_action(Some(r#"{"action":"hibernate","time":"2026-11-23T02:10:00Z"}"#));
        let mut w = start(SpotWatcher::new(test_config(&imds.base)));
        let ev = w.next(Duration::from_secs(2)).await;
        assert_eq!(ev, Some(SpotEvent::Hibernate { at: Some("2026-11-23T02:10:00Z".into()) }));
        imds.set_action(Some(r#"{"action":"stop"}"#));
        assert_eq!(w.next(Duration::from_secs(2)).await, Some(SpotEvent::Stop { at: None }));
        w.assert_quiet(POLL * 3).await;
        w.stop().await;
    }

    #[tokio::test]
    async fn fake_imds_token_is_reused_across_polls() {
        let imds = FakeImds::start().await;
        let mut w = start(SpotWatcher::new(test_config(&imds.base)));
        w.assert_quiet(POLL * 8).await;
        assert!(imds.gets() >= 4, "gets: {}", imds.gets());
        assert_eq!(imds.puts(), 1, "one token for all polls");
        assert_eq!(imds.unauthorized(), 0);
        w.stop().await;
    }

    #[tokio::test]
    async fn fake_imds_token_is_refreshed_before_expiry() {
        let imds = FakeImds::start().await;
        let config = SpotConfig { token_ttl: Duration::from_secs(1), ..test_config(&imds.base) };
        let mut w = start(SpotWatcher::new(config));
        w.assert_quiet(Duration::from_millis(2500)).await;
        let (puts, gets) = (imds.puts(), imds.gets());
        // Tokens at about 0, 0.9 and 1.8 s; not one per poll.
        assert!((2..=6).contains(&puts), "puts: {puts}, gets: {gets}");
        assert!(gets >= 2 * puts, "puts: {puts}, gets: {gets}");
        // Notices still come through with refreshed tokens.
        imds.set_action(Some(TERMINATE));
        assert!(matches!(w.next(Duration::from_secs(2)).await, Some(SpotEvent::Terminate { .. })));
        w.stop().await;
    }

    #[tokio::test]
    async fn fake_imds_rejected_token_is_replaced_at_once() {
        let imds = FakeImds::start().await;
        let mut w = start(SpotWatcher::new(test_config(&imds.base)));
        w.assert_quiet(POLL * 3).await;
        assert_eq!(imds.puts(), 1);
        imds.revoke_tokens();
        imds.set_action(Some(TERMINATE));
        assert!(matches!(w.next(Duration::from_secs(2)).await, Some(SpotEvent::Terminate { .. })));
        assert!(imds.unauthorized() >= 1);
        assert_eq!(imds.puts(), 2);
        w.stop().await;
    }

    #[tokio::test]
    async fn fake_imds_garbage_and_unknown_actions_are_ignored() {
        let imds = FakeImds::start().await;
        imds.set_action(Some("<html>not json</html>"));
        let mut w = start(SpotWatcher::new(test_config(&imds.base)));
        w.assert_quiet(POLL * 4).await;
        imds.set_action(Some(r#"{"action":"explode","time":"2026-11-23T02:10:00Z"}"#));
        w.assert_quiet(POLL * 4).await;
        imds.set_action(Some(r#"{"time":"2026-11-23T02:10:00Z"}"#));
        w.assert_quiet(POLL * 4).await;
        imds.set_action(Some(r#"{"action":42}"#));
        w.assert_quiet(POLL * 4).await;
        assert!(!w.task.is_finished(), "the watcher survives garbage");
        // And it still reports a real notice afterwards.
        imds.set_action(Some(r#"{"action":"hibernate"}"#));
        assert_eq!(w.next(Duration::from_secs(2)).await, Some(SpotEvent::Hibernate { at: None }));
        w.stop().await;
    }

    #[tokio::test]
    async fn unreachable_imds_keeps_running_and_stops_on_shutdown() {
        // A port that was just free: nothing listens there.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let mut w = start(SpotWatcher::new(test_config(&format!("http://{closed}"))));
        w.assert_quiet(POLL * 6).await;
        assert!(!w.task.is_finished(), "the watcher keeps polling");
        w.stop().await;
    }

    #[tokio::test]
    async fn invalid_endpoint_still_detects_resume() {
        let clock = FakeClock::new();
        let mut w = start(SpotWatcher::with_clock(test_config("https://169.254.169.254"), clock.clone()));
        w.assert_quiet(POLL * 3).await;
        clock.hibernate_for(Duration::from_secs(120));
        assert!(matches!(w.next(Duration::from_secs(2)).await, Some(SpotEvent::Resumed { .. })));
        w.stop().await;
    }

    #[tokio::test]
    async fn fake_imds_simulated_clock_jump_sends_one_resumed() {
        let imds = FakeImds::start().await;
        let clock = FakeClock::new();
        let mut w = start(SpotWatcher::with_clock(test_config(&imds.base), clock.clone()));
        w.assert_quiet(POLL * 3).await;
        clock.hibernate_for(Duration::from_secs(600));
        let ev = w.next(Duration::from_secs(2)).await;
        assert_eq!(ev, Some(SpotEvent::Resumed { jumped: Duration::from_secs(600) }));
        w.assert_quiet(POLL * 4).await;
        // The token from before the sleep is not trusted any more.
        assert_eq!(imds.puts(), 2);
        w.stop().await;
    }

    #[tokio::test]
    async fn fake_imds_instance_id_is_read_with_a_token() {
        let imds = FakeImds::start().await;
        assert_eq!(instance_id(&test_config(&imds.base)).await.unwrap(), "i-0fake1234567890");
        assert_eq!(imds.puts(), 1, "a session token was fetched first");
        // Not on EC2: a clear error, not a hang.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        assert!(instance_id(&test_config(&closed)).await.is_err());
    }

    #[test]
    fn jump_detector_thresholds() {
        let clock = FakeClock::new();
        let mut d = JumpDetector::new(clock.clone(), Duration::from_secs(30));
        assert_eq!(d.check(), None);
        clock.advance(Duration::from_secs(3600));
        assert_eq!(d.check(), None, "both clocks advancing is normal");
        clock.hibernate_for(Duration::from_secs(20));
        assert_eq!(d.check(), None, "below the threshold");
        clock.step_wall_back(Duration::from_secs(300));
        assert_eq!(d.check(), None, "a backward step is not a resume");
        clock.advance(Duration::from_secs(5));
        clock.hibernate_for(Duration::from_secs(31));
        assert_eq!(d.check(), Some(Duration::from_secs(31)));
        assert_eq!(d.check(), None, "reported once");
    }

    // ---- policy -------------------------------------------------------

    fn tokens() -> (CancellationToken, CancellationToken, Notify) {
        (CancellationToken::new(), CancellationToken::new(), Notify::new())
    }

    #[tokio::test]
    async fn react_terminate_and_stop_cancel_stop_and_abort() {
        for ev in [SpotEvent::Terminate { at: Some("2026-11-23T02:10:00Z".into()) }, SpotEvent::Stop { at: None }] {
            let (stop, abort, recheck) = tokens();
            react(&ev, &stop, &abort, &recheck);
            assert!(stop.is_cancelled(), "{ev:?}");
            assert!(abort.is_cancelled(), "{ev:?}");
        }
    }

    #[tokio::test]
    async fn react_hibernate_does_nothing() {
        let (stop, abort, recheck) = tokens();
        let notified = recheck.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        react(&SpotEvent::Hibernate { at: None }, &stop, &abort, &recheck);
        assert!(!stop.is_cancelled());
        assert!(!abort.is_cancelled());
        assert!(tokio::time::timeout(Duration::from_millis(50), notified).await.is_err());
    }

    #[tokio::test]
    async fn react_resumed_wakes_every_lease_recheck() {
        let (stop, abort, recheck) = tokens();
        let first = recheck.notified();
        let second = recheck.notified();
        tokio::pin!(first, second);
        first.as_mut().enable();
        second.as_mut().enable();
        react(&SpotEvent::Resumed { jumped: Duration::from_secs(90) }, &stop, &abort, &recheck);
        assert!(!stop.is_cancelled());
        assert!(!abort.is_cancelled());
        tokio::time::timeout(Duration::from_secs(1), first).await.expect("first job rechecks");
        tokio::time::timeout(Duration::from_secs(1), second).await.expect("second job rechecks");
    }

    // ---- parsing ------------------------------------------------------

    #[test]
    fn notices_parse() {
        assert_eq!(
            parse_notice(TERMINATE.as_bytes()).unwrap(),
            SpotEvent::Terminate { at: Some("2026-11-23T02:10:00Z".into()) }
        );
        assert_eq!(parse_notice(br#"{"action":"Stop"}"#).unwrap(), SpotEvent::Stop { at: None });
        assert!(matches!(parse_notice(b"garbage"), Err(SpotError::BadNotice { .. })));
        assert!(matches!(parse_notice(br#"{"action":"reboot"}"#), Err(SpotError::BadNotice { .. })));
        assert!(matches!(parse_notice(&[0xff, 0xfe]), Err(SpotError::BadNotice { .. })));
    }

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse(DEFAULT_ENDPOINT).unwrap();
        assert_eq!((e.authority.as_str(), e.host_header.as_str()), ("169.254.169.254:80", "169.254.169.254"));
        let e = Endpoint::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!((e.authority.as_str(), e.host_header.as_str()), ("127.0.0.1:8080", "127.0.0.1:8080"));
        let e = Endpoint::parse("http://[fd00:ec2::254]").unwrap();
        assert_eq!(e.authority, "[fd00:ec2::254]:80");
        for bad in
            ["https://x", "x", "http://", "http://h:0", "http://h:x", "http://h/p", "http://fd00::1", "http://[::1"]
        {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_parse() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_response(ok, false).unwrap(), Some(Response { status: 200, body: b"hello".to_vec() }));
        // Incomplete: more is needed, or it is an error at EOF.
        assert_eq!(parse_response(&ok[..ok.len() - 2], false).unwrap(), None);
        assert!(parse_response(&ok[..ok.len() - 2], true).is_err());
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", false).unwrap(), None);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", true).is_err());
        // Without Content-Length the body runs to EOF.
        let close = b"HTTP/1.0 404 Not Found\r\n\r\nnope";
        assert_eq!(parse_response(close, false).unwrap(), None);
        assert_eq!(parse_response(close, true).unwrap(), Some(Response { status: 404, body: b"nope".to_vec() }));
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(parse_response(bad, true).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
