//! Artifacts in a directory laid out like a portage PKGDIR, and the signed
//! URLs that let a client download them from the local server.
//!
//! A URL is `<base>/v1/artifacts/<path>?expires=<unix seconds>&sig=<hex>`,
//! where `sig` is HMAC-SHA256 over `GET\n<path>\n<expires>` with the
//! server's signing key. [`artifact_router`] serves a file only when the
//! signature verifies (in constant time) and the expiry has not passed.
//!
//! Files are served by tower-http's `ServeFile` (Range requests,
//! conditional requests, precompressed `Packages.gz`), with an `ETag` and
//! `Cache-Control` added here; [`binhost_router`] serves only the binhost
//! layout (`Packages`, `Packages.gz`, `<cat>/<pn>/<file>.gpkg.tar`).

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac};
use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore, ObjectVersion, SignedUrl, StoredObject};
use pacloud_domain::{Clock, Millis};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt as _;
use tower_http::services::ServeFile;

type HmacSha256 = Hmac<Sha256>;

/// The secret that signs download URLs.
#[derive(Clone)]
pub struct SigningKey(Arc<HmacSha256>);

impl SigningKey {
    pub fn new(bytes: &[u8]) -> Self {
        // HMAC takes keys of any length; the keyed state is computed once.
        SigningKey(Arc::new(<HmacSha256 as Mac>::new_from_slice(bytes).unwrap_or_else(|_| unreachable!())))
    }

    /// Reads the key at `path`, creating a random one (mode 0600) if absent.
    pub fn load_or_create(path: &Path) -> std::io::Result<SigningKey> {
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() >= 32 => return Ok(SigningKey::new(&bytes)),
            Ok(_) => {
                return Err(std::io::Error::other(format!("signing key {} is shorter than 32 bytes", path.display())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            #[cfg(unix)]
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(SigningKey::new(&bytes))
    }

    fn mac(&self, path: &str, expires: i64) -> HmacSha256 {
        let mut mac = (*self.0).clone();
        mac.update(b"GET\n");
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    pub fn sign(&self, path: &str, expires: i64) -> String {
        hex::encode(self.mac(path, expires).finalize().into_bytes())
    }

    /// Checks a signature in constant time.
    pub fn verify(&self, path: &str, expires: i64, sig_hex: &str) -> bool {
        match hex::decode(sig_hex) {
            Ok(sig) => self.mac(path, expires).verify_slice(&sig).is_ok(),
            Err(_) => false,
        }
    }
}

/// The outcome of checking a signed URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlCheck {
    Valid,
    Expired,
    BadSignature,
}

/// The artifact store port on a local directory.
#[derive(Clone)]
pub struct DirArtifactStore {
    root: PathBuf,
    base_url: String,
    key: SigningKey,
    clock: Arc<dyn Clock>,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A file's version for compare-and-swap: every replacement is a rename of
/// a new file, so inode, change time and size identify what a reader saw.
fn file_version(m: &std::fs::Metadata) -> ObjectVersion {
    use std::os::unix::fs::MetadataExt;
    ObjectVersion(format!("{}-{}.{}-{}", m.ino(), m.ctime(), m.ctime_nsec(), m.len()))
}

fn unavailable(e: std::io::Error) -> ArtifactError {
    ArtifactError::Unavailable(Box::new(e))
}

impl DirArtifactStore {
    /// `base_url` is where the server answers, e.g. `http://127.0.0.1:8080`.
    pub fn new(root: PathBuf, base_url: &str, key: SigningKey, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join(".tmp"))?;
        Ok(DirArtifactStore { root, base_url: base_url.trim_end_matches('/').to_owned(), key, clock })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an artifact lives on disk.
    pub fn file_path(&self, path: &ArtifactPath) -> PathBuf {
        self.root.join(path.as_str())
    }

    /// Checks a URL's expiry and signature.
    pub fn check(&self, path: &str, expires: i64, sig: &str) -> UrlCheck {
        if !self.key.verify(path, expires, sig) {
            UrlCheck::BadSignature
        } else if expires <= self.clock.now().as_secs() {
            UrlCheck::Expired
        } else {
            UrlCheck::Valid
        }
    }

    fn tmp_path(&self) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.root.join(".tmp").join(format!("{}-{n}", std::process::id()))
    }

    /// Copies `file` to a temporary file, verifying its SHA-256.
    async fn stage(&self, path: &ArtifactPath, file: &Path, sha256: &str) -> Result<(PathBuf, u64), ArtifactError> {
        let tmp = self.tmp_path();
        let result = async {
            let mut src = tokio::fs::File::open(file).await.map_err(unavailable)?;
            let mut dst = tokio::fs::File::create(&tmp).await.map_err(unavailable)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut size = 0u64;
            loop {
                let n = src.read(&mut buf).await.map_err(unavailable)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                dst.write_all(&buf[..n]).await.map_err(unavailable)?;
                size += n as u64;
            }
            if hex::encode(hasher.finalize()) != sha256 {
                return Err(ArtifactError::ChecksumMismatch { path: path.to_string(), expected: sha256.to_owned() });
            }
            dst.sync_all().await.map_err(unavailable)?;
            Ok(size)
        }
        .await;
        match result {
            Ok(size) => Ok((tmp, size)),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Moves a finished temporary file into place atomically.
    async fn commit(&self, tmp: &Path, path: &ArtifactPath) -> Result<(), ArtifactError> {
        let dest = self.file_path(path);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(unavailable)?;
        }
        tokio::fs::rename(tmp, &dest).await.map_err(unavailable)
    }
}

#[async_trait]
impl ArtifactStore for DirArtifactStore {
    async fn put_file(&self, path: &ArtifactPath, file: &Path, sha256: &str) -> Result<StoredObject, ArtifactError> {
        let (tmp, size) = self.stage(path, file, sha256).await?;
        if let Err(e) = self.commit(&tmp, path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        Ok(StoredObject { size, sha256: Some(sha256.to_owned()) })
    }

    async fn put_file_if_absent(
        &self,
        path: &ArtifactPath,
        file: &Path,
        sha256: &str,
    ) -> Result<Option<StoredObject>, ArtifactError> {
        let (tmp, size) = self.stage(path, file, sha256).await?;
        let dest = self.file_path(path);
        let result = async {
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(unavailable)?;
            }
            // link(2) fails if the destination exists: an atomic create-if-absent.
            match tokio::fs::hard_link(&tmp, &dest).await {
                Ok(()) => Ok(Some(StoredObject { size, sha256: Some(sha256.to_owned()) })),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    async fn put_bytes(
        &self,
        path: &ArtifactPath,
        bytes: Vec<u8>,
        _content_type: &str,
    ) -> Result<StoredObject, ArtifactError> {
        let tmp = self.tmp_path();
        let sha = hex::encode(Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        let result = async {
            let mut f = tokio::fs::File::create(&tmp).await.map_err(unavailable)?;
            f.write_all(&bytes).await.map_err(unavailable)?;
            f.sync_all().await.map_err(unavailable)?;
            self.commit(&tmp, path).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map(|_| StoredObject { size, sha256: Some(sha) })
    }

    async fn get_versioned(&self, path: &ArtifactPath) -> Result<Option<(Vec<u8>, ObjectVersion)>, ArtifactError> {
        let file = self.file_path(path);
        tokio::task::spawn_blocking(move || -> std::io::Result<Option<(Vec<u8>, ObjectVersion)>> {
            let mut f = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            // The version of the file this handle reads (replacement is by rename).
            let version = file_version(&f.metadata()?);
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut bytes)?;
            Ok(Some((bytes, version)))
        })
        .await
        .map_err(|e| ArtifactError::Unavailable(Box::new(e)))?
        .map_err(unavailable)
    }

    async fn put_bytes_if(
        &self,
        path: &ArtifactPath,
        bytes: Vec<u8>,
        _content_type: &str,
        expected: Option<&ObjectVersion>,
    ) -> Result<Option<ObjectVersion>, ArtifactError> {
        // Compare-and-swap under an exclusive lock on a per-path lock file
        // (flock: also excludes `pacloud worker` processes on the same data
        // directory); the swap itself is write-to-temporary + rename.
        let locks = self.root.join(".locks");
        let lock_path = locks.join(format!("{}.lock", path.as_str().replace('/', "%")));
        let dest = self.file_path(path);
        let tmp = self.tmp_path();
        let expected = expected.cloned();
        tokio::task::spawn_blocking(move || -> std::io::Result<Option<ObjectVersion>> {
            std::fs::create_dir_all(&locks)?;
            let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
            lock.lock()?;
            let current = match std::fs::metadata(&dest) {
                Ok(m) => Some(file_version(&m)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            if current != expected {
                return Ok(None);
            }
            let written = (|| {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::rename(&tmp, &dest)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written?;
            Ok(Some(file_version(&std::fs::metadata(&dest)?)))
        })
        .await
        .map_err(|e| ArtifactError::Unavailable(Box::new(e)))?
        .map_err(unavailable)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactPath>, ArtifactError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for e in entries {
                    let e = e?;
                    let path = e.path();
                    let Ok(rel) = path.strip_prefix(&root) else { continue };
                    let rel = rel.to_string_lossy().into_owned();
                    let ty = e.file_type()?;
                    if ty.is_dir()
                        && rel != ".tmp"
                        && rel != ".locks"
                        && (prefix.starts_with(&format!("{rel}/")) || rel.starts_with(&prefix))
                    {
                        stack.push(path);
                    } else if ty.is_file()
                        && rel.starts_with(&prefix)
                        && let Ok(p) = ArtifactPath::parse(&rel)
                    {
                        out.push(p);
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| ArtifactError::Unavailable(Box::new(e)))?
        .map_err(unavailable)
    }

    async fn head(&self, path: &ArtifactPath) -> Result<Option<StoredObject>, ArtifactError> {
        match tokio::fs::metadata(self.file_path(path)).await {
            Ok(m) if m.is_file() => Ok(Some(StoredObject { size: m.len(), sha256: None })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete(&self, path: &ArtifactPath) -> Result<(), ArtifactError> {
        match tokio::fs::remove_file(self.file_path(path)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn get(&self, path: &ArtifactPath) -> Result<Vec<u8>, ArtifactError> {
        match tokio::fs::read(self.file_path(path)).await {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ArtifactError::NotFound(path.to_string())),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn signed_url(&self, path: &ArtifactPath, now: Millis, ttl: Duration) -> Result<SignedUrl, ArtifactError> {
        // Round the expiry up to whole seconds so the URL is never shorter-lived than asked.
        let expires = now.plus(ttl).0.div_euclid(1000) + 1;
        let sig = self.key.sign(path.as_str(), expires);
        Ok(SignedUrl {
            url: format!("{}/v1/artifacts/{}?expires={expires}&sig={sig}", self.base_url, path),
            expires_at: Millis(expires * 1000),
        })
    }
}

#[derive(Deserialize)]
struct SignedQuery {
    expires: Option<String>,
    sig: Option<String>,
}

fn refuse(status: StatusCode, error: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": error, "message": message });
    (status, axum::Json(body)).into_response()
}

async fn serve_artifact(
    State(store): State<Arc<DirArtifactStore>>,
    UrlPath(path): UrlPath<String>,
    query: Result<Query<SignedQuery>, axum::extract::rejection::QueryRejection>,
    req: Request<Body>,
) -> Response {
    let Ok(Query(q)) = query else {
        return refuse(StatusCode::FORBIDDEN, "forbidden", "malformed signature parameters");
    };
    let (Some(expires), Some(sig)) = (q.expires, q.sig) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the URL carries no signature (expires and sig are required)",
        );
    };
    let Ok(expires) = expires.parse::<i64>() else {
        return refuse(StatusCode::FORBIDDEN, "forbidden", "expires must be a Unix time in seconds");
    };
    match store.check(&path, expires, &sig) {
        UrlCheck::BadSignature => {
            return refuse(StatusCode::FORBIDDEN, "forbidden", "the URL's signature does not match");
        }
        UrlCheck::Expired => {
            return refuse(StatusCode::FORBIDDEN, "expired", "the URL has expired; ask for the build again");
        }
        UrlCheck::Valid => {}
    }
    // A valid signature was made by us for a path we validated; parse anyway.
    let Ok(apath) = ArtifactPath::parse(&path) else {
        return refuse(StatusCode::NOT_FOUND, "not_found", "no such artifact");
    };
    let kind = if path.ends_with(".log") || path.ends_with("/Packages") || path == "Packages" {
        Kind::Text
    } else {
        Kind::Binary
    };
    serve_stored(store.file_path(&apath), kind, "private, max-age=60", req).await
}

/// How a stored file is served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `Packages`: text, also offered gzip-compressed from `Packages.gz`.
    Index,
    /// Logs: text.
    Text,
    /// Packages and anything else: bytes (type from the extension).
    Binary,
}

/// Read size of large files (fewer, larger reads stream faster).
const CHUNK: usize = 1 << 20;

/// `"<size>-<mtime ns>"` in hex: changes whenever the file is replaced
/// (stores write through a temporary file and rename).
fn etag(meta: &std::fs::Metadata, suffix: &str) -> String {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    format!("\"{:x}-{:x}{suffix}\"", meta.len(), mtime.map(|d| d.as_nanos()).unwrap_or(0))
}

fn none_match(req: &Request<Body>, tags: &[&str]) -> Option<usize> {
    let value = req.headers().get(header::IF_NONE_MATCH)?.to_str().ok()?;
    let given: Vec<&str> = value.split(',').map(|t| t.trim().trim_start_matches("W/")).collect();
    tags.iter().position(|t| given.iter().any(|g| g == t || *g == "*"))
}

/// Files up to this size are kept in memory between changes.
const SMALL: u64 = 64 * 1024;

type SmallCache = std::sync::Mutex<std::collections::HashMap<PathBuf, (u64, std::time::SystemTime, bytes::Bytes)>>;

static SMALL_FILES: std::sync::LazyLock<SmallCache> = std::sync::LazyLock::new(Default::default);

/// A plain `GET` of a small file (the index, small packages) answered from
/// memory: the file is read again only when its size or mtime changed (a
/// publish replaces it by rename). Range, `If-Modified-Since` and gzip
/// requests go to `ServeFile`.
fn small_from_memory(
    file: &Path,
    meta: &std::fs::Metadata,
    kind: Kind,
    req: &Request<Body>,
    etag: &str,
    cache: &'static str,
) -> Option<Response> {
    let h = req.headers();
    let gzip = kind == Kind::Index
        && h.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("gzip"));
    if meta.len() > SMALL || gzip || h.contains_key(header::RANGE) || h.contains_key(header::IF_MODIFIED_SINCE) {
        return None;
    }
    let mtime = meta.modified().ok()?;
    let bytes = {
        let mut map = SMALL_FILES.lock().ok()?;
        match map.get(file) {
            Some((len, t, b)) if *len == meta.len() && *t == mtime => b.clone(),
            _ => {
                let b = bytes::Bytes::from(std::fs::read(file).ok()?);
                if b.len() as u64 != meta.len() {
                    return None; // replaced while reading: let ServeFile answer
                }
                if map.len() >= 4096 {
                    map.clear();
                }
                map.insert(file.to_owned(), (meta.len(), mtime, b.clone()));
                b
            }
        }
    };
    let content_type = match kind {
        Kind::Index | Kind::Text => "text/plain; charset=utf-8",
        Kind::Binary if file.extension().is_some_and(|e| e == "tar") => "application/x-tar",
        Kind::Binary if file.extension().is_some_and(|e| e == "gz") => "application/gzip",
        Kind::Binary => "application/octet-stream",
    };
    let mut resp = Body::from(bytes).into_response();
    let out = resp.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(etag) {
        out.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(mtime)) {
        out.insert(header::LAST_MODIFIED, v);
    }
    if kind == Kind::Index {
        out.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    Some(resp)
}

/// Serves one stored file with tower-http's `ServeFile` (Range requests,
/// `Last-Modified` / `If-Modified-Since`, precompressed `Packages.gz`),
/// adding an `ETag` with `304` on `If-None-Match` and `Cache-Control`.
/// Refuses anything but a regular file (no symlinks) with a 404.
async fn serve_stored(file: PathBuf, kind: Kind, cache: &'static str, req: Request<Body>) -> Response {
    // A stat of a local file: cheaper inline than on the blocking pool.
    let meta = match std::fs::symlink_metadata(&file) {
        Ok(m) if m.file_type().is_file() => m,
        _ => return refuse(StatusCode::NOT_FOUND, "not_found", "no such file"),
    };
    let tags = [etag(&meta, ""), etag(&meta, "-gz")];
    let tag_refs = [tags[0].as_str(), tags[1].as_str()];
    let vary = kind == Kind::Index;
    if let Some(i) = none_match(&req, &tag_refs) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        let h = resp.headers_mut();
        h.insert(header::ETAG, HeaderValue::from_str(&tags[i]).unwrap_or(HeaderValue::from_static("\"0\"")));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
        if vary {
            h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        return resp;
    }
    if let Some(resp) = small_from_memory(&file, &meta, kind, &req, &tags[0], cache) {
        return resp;
    }
    let mut svc = ServeFile::new(&file).with_buf_chunk_size(CHUNK);
    if kind == Kind::Index {
        svc = svc.precompressed_gzip();
    }
    let Ok(resp) = svc.oneshot(req).await;
    let mut resp = resp.map(Body::new);
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return refuse(StatusCode::NOT_FOUND, "not_found", "no such file");
    }
    let h = resp.headers_mut();
    if status.is_success() || status == StatusCode::NOT_MODIFIED {
        let gz = h.get(header::CONTENT_ENCODING).is_some_and(|v| v == "gzip");
        let tag = if gz { &tags[1] } else { &tags[0] };
        if let Ok(v) = HeaderValue::from_str(tag) {
            h.insert(header::ETAG, v);
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
        if vary {
            h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
    }
    if matches!(kind, Kind::Index | Kind::Text) && status.is_success() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    resp
}

/// `GET /binhost/{target}/Packages` and `/binhost/{target}/<cat>/<pn>/<file>.gpkg.tar`:
/// the per-target PKGDIR-shaped tree, readable by portage as a binhost
/// (`binrepos.conf` `sync-uri = <server>/binhost/<target>`). Cache reads are
/// open (DESIGN §6); only the index and binary packages are served.
async fn serve_binhost(
    State(store): State<Arc<DirArtifactStore>>,
    UrlPath((target, rest)): UrlPath<(String, String)>,
    req: Request<Body>,
) -> Response {
    match binhost_kind(&target, &rest) {
        Some(kind) => match ArtifactPath::parse(&format!("{target}/{rest}")) {
            // The index changes with every publish; packages never do
            // (create-if-absent), so clients may keep them.
            Ok(apath) => {
                let cache = if kind == Kind::Index { "public, max-age=60" } else { "public, max-age=86400" };
                serve_stored(store.file_path(&apath), kind, cache, req).await
            }
            Err(_) => refuse(StatusCode::NOT_FOUND, "not_found", "no such file in the binhost"),
        },
        None => refuse(StatusCode::NOT_FOUND, "not_found", "no such file in the binhost"),
    }
}

/// What `rest` under `/binhost/<target>/` may be: `Packages`,
/// `Packages.gz`, or `<category>/<pn>/<file>.gpkg.tar`; nothing else (no
/// fragments, logs, dot files) is part of a binhost.
fn binhost_kind(target: &str, rest: &str) -> Option<Kind> {
    if target.starts_with('.') || target == "logs" || rest.split('/').any(|seg| seg.starts_with('.')) {
        return None;
    }
    match rest {
        "Packages" => Some(Kind::Index),
        "Packages.gz" => Some(Kind::Binary),
        _ if rest.ends_with(".gpkg.tar") && rest.split('/').count() == 3 => Some(Kind::Binary),
        _ => None,
    }
}

/// The binhost routes over `store`.
pub fn binhost_router(store: Arc<DirArtifactStore>) -> Router {
    Router::new().route("/binhost/{target}/{*rest}", get(serve_binhost)).with_state(store)
}

/// `GET /v1/artifacts/{*path}`: serves files of `store` behind signed URLs.
pub fn artifact_router(store: Arc<DirArtifactStore>) -> Router {
    Router::new().route("/v1/artifacts/{*path}", get(serve_artifact)).with_state(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let k = SigningKey::new(b"0123456789abcdef0123456789abcdef");
        let sig = k.sign("a/b", 100);
        assert!(k.verify("a/b", 100, &sig));
        assert!(!k.verify("a/c", 100, &sig));
        assert!(!k.verify("a/b", 101, &sig));
        assert!(!k.verify("a/b", 100, "zz"));
        assert!(!SigningKey::new(b"another key entirely, 32 bytes!!").verify("a/b", 100, &sig));
    }
}
