//! The client side of `pacloud get` / `pacloud status`: request a build,
//! follow it while it is queued or building (a spinner on a terminal, plain
//! lines otherwise), download the package and verify its SHA-256.

use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// What can go wrong on the client side; [`ClientError::exit_code`] maps it
/// to the process exit status (2 for a mistake in what was asked).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("the server refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the server needs a token to start this build: pass --token or set PACLOUD_TOKEN")]
    Unauthorized,
    #[error("no build with key {0}")]
    UnknownKey(String),
    #[error("the server failed ({status}): {message}")]
    Server { status: u16, message: String },
    #[error("cannot reach {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the server's answer is not what this client understands")]
    Protocol(#[source] serde_json::Error),
    #[error("build {key} failed ({class}): {reason}")]
    BuildFailed { key: String, class: String, reason: String, log_url: Option<String> },
    #[error("downloaded file has sha256 {actual}, the server recorded {expected}; removed it")]
    Checksum { expected: String, actual: String },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gave up after waiting {0:?} for the build")]
    Timeout(Duration),
}

impl ClientError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Invalid { .. }
            | ClientError::Refused { .. }
            | ClientError::Unauthorized
            | ClientError::UnknownKey(_) => 2,
            _ => 1,
        }
    }
}

/// A build's state as the API reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum BuildState {
    Ready {
        key: String,
        url: String,
        sha256: String,
        size: u64,
        expires_at: String,
    },
    Queued {
        key: String,
        poll: String,
        retry_after: Option<u64>,
        /// Build workers alive now (`GET /v1/builds/{key}` only).
        #[serde(default)]
        workers: Option<u64>,
    },
    Building {
        key: String,
        poll: String,
        retry_after: Option<u64>,
        #[serde(default)]
        workers: Option<u64>,
    },
    Failed {
        key: String,
        class: Option<String>,
        reason: String,
        log_url: Option<String>,
    },
}

impl BuildState {
    pub fn key(&self) -> &str {
        match self {
            BuildState::Ready { key, .. }
            | BuildState::Queued { key, .. }
            | BuildState::Building { key, .. }
            | BuildState::Failed { key, .. } => key,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            BuildState::Ready { .. } => "ready",
            BuildState::Queued { .. } => "queued",
            BuildState::Building { .. } => "building",
            BuildState::Failed { .. } => "failed",
        }
    }
}

/// Installs the TLS crypto provider (ring) once per process.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A pacloud server.
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

/// Receives progress while a build is pending.
pub trait Progress {
    fn update(&mut self, state: &str, elapsed: Duration);
    fn finish(&mut self);
    /// A one-line explanation for the user (on stderr by default).
    fn note(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

/// The line `pacloud get` prints when the server reports no live worker.
pub const NO_WORKERS: &str = "pacloud: no build worker is running on the server (none alive in the last minute); \
the build stays queued until one starts (`pacloud serve` with builds available, or `pacloud worker`)";

/// Plain lines, one per state change (for logs and pipes).
pub struct LineProgress {
    last: Option<String>,
}

impl LineProgress {
    pub fn new() -> Self {
        LineProgress { last: None }
    }
}

impl Default for LineProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for LineProgress {
    fn update(&mut self, state: &str, elapsed: Duration) {
        if self.last.as_deref() != Some(state) {
            eprintln!("pacloud: {state} ({}s)", elapsed.as_secs());
            self.last = Some(state.to_owned());
        }
    }
    fn finish(&mut self) {}
}

/// A spinner with the state and elapsed time (for terminals).
pub struct SpinnerProgress(indicatif::ProgressBar);

impl SpinnerProgress {
    pub fn new() -> Self {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        SpinnerProgress(bar)
    }
}

impl Default for SpinnerProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for SpinnerProgress {
    fn update(&mut self, state: &str, elapsed: Duration) {
        self.0.set_message(format!("{state} {}s", elapsed.as_secs()));
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
    fn note(&mut self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }
}

/// What to ask for.
#[derive(Debug, Clone)]
pub struct GetRequest {
    pub atom: String,
    pub version: String,
    pub use_flags: Vec<String>,
    pub target: Option<String>,
}

impl Client {
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        init_tls();
        let http = reqwest::Client::builder()
            .user_agent(concat!("pacloud/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|source| ClientError::Http { url: server.to_owned(), source })?;
        Ok(Client { http, server: server.trim_end_matches('/').to_owned(), token })
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.server)
        }
    }

    async fn decode(&self, url: &str, resp: reqwest::Response) -> Result<BuildState, ClientError> {
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http { url: url.to_owned(), source })?;
        if status == 200 || status == 202 {
            return serde_json::from_slice(&bytes).map_err(ClientError::Protocol);
        }
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let message = body.get("message").and_then(|m| m.as_str()).unwrap_or("no message").to_owned();
        Err(match (status, body.get("field").and_then(|f| f.as_str())) {
            (400, Some(field)) => ClientError::Invalid { field: field.to_owned(), message },
            (401, _) => ClientError::Unauthorized,
            (404, Some(field)) => ClientError::Invalid { field: field.to_owned(), message },
            (s, _) if s >= 500 => ClientError::Server { status: s, message },
            (s, _) => ClientError::Refused { status: s, message },
        })
    }

    /// `POST /v1/builds`.
    pub async fn request(&self, req: &GetRequest) -> Result<BuildState, ClientError> {
        let url = self.url("/v1/builds");
        let mut body = serde_json::json!({"atom": req.atom, "version": req.version, "use": req.use_flags});
        if let Some(t) = &req.target {
            body["target"] = serde_json::json!(t);
        }
        let mut rb = self.http.post(&url).json(&body);
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb.send().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
        self.decode(&url, resp).await
    }

    /// The server's default target (`GET /v1/targets`).
    pub async fn default_target(&self) -> Result<String, ClientError> {
        let url = self.url("/v1/targets");
        let resp = self.http.get(&url).send().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(ClientError::Protocol)?;
        v["default"].as_str().map(str::to_owned).ok_or_else(|| ClientError::Server {
            status: 200,
            message: "GET /v1/targets names no default target".into(),
        })
    }

    /// `GET /v1/builds/{key}` (or a `poll` link).
    pub async fn poll(&self, path: &str) -> Result<BuildState, ClientError> {
        let url = self.url(path);
        let resp = self.http.get(&url).send().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if body.get("field").is_none() {
                return Err(ClientError::UnknownKey(path.rsplit('/').next().unwrap_or(path).to_owned()));
            }
            return Err(ClientError::Refused {
                status: 404,
                message: body["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        self.decode(&url, resp).await
    }

    /// Requests a build, waits for it, downloads and verifies it into `dir`.
    pub async fn get(
        &self,
        req: &GetRequest,
        dir: &Path,
        progress: &mut dyn Progress,
        timeout: Duration,
    ) -> Result<PathBuf, ClientError> {
        let started = Instant::now();
        let mut state = self.request(req).await?;
        let mut told = false;
        loop {
            match state {
                BuildState::Ready { url, sha256, .. } => {
                    progress.finish();
                    return self.download(&url, &sha256, dir).await;
                }
                BuildState::Failed { key, class, reason, log_url } => {
                    progress.finish();
                    return Err(ClientError::BuildFailed { key, class: class.unwrap_or_default(), reason, log_url });
                }
                BuildState::Queued { ref poll, retry_after, workers, .. }
                | BuildState::Building { ref poll, retry_after, workers, .. } => {
                    if workers == Some(0) && !told {
                        progress.note(NO_WORKERS);
                        told = true;
                    }
                    progress.update(state.name(), started.elapsed());
                    if started.elapsed() >= timeout {
                        progress.finish();
                        return Err(ClientError::Timeout(timeout));
                    }
                    let wait = Duration::from_secs(retry_after.unwrap_or(5).clamp(1, 30));
                    let step = Duration::from_millis(250);
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        tokio::time::sleep(step).await;
                        progress.update(state.name(), started.elapsed());
                    }
                    let poll = poll.clone();
                    state = self.poll(&poll).await?;
                }
            }
        }
    }

    /// Downloads `url` into `dir` (file name from the URL's path), verifying
    /// the SHA-256 while writing; the file appears only once verified.
    pub async fn download(&self, url: &str, sha256: &str, dir: &Path) -> Result<PathBuf, ClientError> {
        let name = url
            .split('?')
            .next()
            .and_then(|p| p.rsplit('/').next())
            .filter(|n| !n.is_empty() && *n != "." && *n != ".." && !n.contains('\\'))
            .unwrap_or("package.gpkg.tar")
            .to_owned();
        let dest = dir.join(&name);
        let tmp = dir.join(format!(".{name}.part"));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ClientError::Io { path, source }
        };
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        let resp =
            self.http.get(url).send().await.map_err(|source| ClientError::Http { url: url.to_owned(), source })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let message = resp.text().await.unwrap_or_default();
            return Err(ClientError::Server { status, message });
        }
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        let mut hasher = Sha256::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ClientError::Http { url: url.to_owned(), source })?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io(&tmp))?;
        }
        file.sync_all().await.map_err(io(&tmp))?;
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ClientError::Checksum { expected: sha256.to_owned(), actual });
        }
        tokio::fs::rename(&tmp, &dest).await.map_err(io(&dest))?;
        Ok(dest)
    }
}
