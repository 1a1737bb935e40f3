//! The route handlers: parse and check the HTTP request, call the
//! [`BuildService`], render its outcome.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use pacloud_domain::BuildKey;
use pacloud_domain::request::BuildRequest;
use pacloud_domain::service::Outcome;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use crate::auth::Credentials;
use crate::error::ApiError;
use crate::{ApiState, KeyLookupError, MAX_BODY_BYTES, OPENAPI_JSON};

fn rfc3339(ms: pacloud_domain::Millis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms.0).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn parse_key(raw: &str) -> Result<BuildKey, ApiError> {
    raw.parse().map_err(|e: pacloud_domain::key::BadKey| ApiError::invalid("key", e.to_string()))
}

/// The may-build decision for a request; a wrong token is refused outright.
fn may_build(state: &ApiState, headers: &HeaderMap) -> Result<bool, ApiError> {
    match state.tokens.check(headers) {
        Credentials::MayBuild => Ok(true),
        Credentials::Anonymous => Ok(false),
        Credentials::Invalid => Err(ApiError::BadToken),
    }
}

/// The 200 body for a ready build (serialised directly: the hot path).
#[derive(serde::Serialize)]
struct ReadyBody<'a> {
    key: &'a str,
    status: &'static str,
    url: &'a str,
    sha256: &'a str,
    size: u64,
    expires_at: String,
    build_id: u64,
    #[serde(rename = "use")]
    use_recorded: &'a [String],
    atom: &'a pacloud_domain::Atom,
    version: &'a pacloud_domain::Version,
    target: &'a pacloud_domain::TargetName,
    build_seconds: f64,
    /// Compute cost of the build, when the worker reported its machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<f64>,
}

/// Renders an outcome as the v1 API's response.
/// `workers`: build workers alive now, when known (`GET /v1/builds/{key}`);
/// `eta_s`: the estimated seconds until a queued build is done, when known.
fn render(state: &ApiState, outcome: Outcome, workers: Option<u64>, eta_s: Option<u64>) -> Response {
    let record = outcome.record();
    let key = record.key.as_str();
    match &outcome {
        Outcome::Ready { record, url } => {
            let Some(a) = record.artifact.as_ref() else {
                return ApiError::Internal(pacloud_domain::service::ServiceError::Inconsistent {
                    key: key.to_owned(),
                    source: "ready record without artifact".into(),
                })
                .into_response();
            };
            let body = ReadyBody {
                key,
                status: "ready",
                url: &url.url,
                sha256: &a.sha256,
                size: a.size,
                expires_at: rfc3339(url.expires_at),
                build_id: a.build_id,
                use_recorded: &a.use_recorded,
                atom: &record.spec.atom,
                version: &record.spec.version,
                target: &record.spec.target,
                build_seconds: a.build_seconds,
                cost_usd: a.cost_usd(),
            };
            (StatusCode::OK, Json(body)).into_response()
        }
        Outcome::Pending { record } => {
            let secs = state.service.config().poll_after.as_secs().max(1);
            let poll = format!("{}/v1/builds/{key}", state.base_path);
            let mut body = json!({
                "key": key,
                "status": record.status.as_str(),
                "poll": poll,
                "retry_after": secs,
            });
            if let (Some(n), Some(map)) = (workers, body.as_object_mut()) {
                map.insert("workers".into(), json!(n));
            }
            if let (Some(eta), Some(map)) = (eta_s, body.as_object_mut()) {
                map.insert("eta_s".into(), json!(eta));
            }
            let mut resp = (StatusCode::ACCEPTED, Json(body)).into_response();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if let Ok(v) = HeaderValue::from_str(&poll) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Outcome::Failed { record, log_url } => {
            let f = record.failure.as_ref();
            let body = json!({
                "key": key,
                "status": "failed",
                "class": f.map(|f| f.class),
                "reason": f.map(|f| f.reason.as_str()).unwrap_or("unknown"),
                "log_url": log_url.as_ref().map(|u| u.url.as_str()),
                "log_tail": f.and_then(|f| f.log_tail.as_deref()),
                "retry": format!("{}/v1/builds/{key}/retry", state.base_path),
                "cached_until": f.map(|f| rfc3339(f.cached_until)),
            });
            (StatusCode::OK, Json(body)).into_response()
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a JSON object body, enforcing content type and size.
async fn json_object(headers: &HeaderMap, body: Body) -> Result<Map<String, Value>, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES });
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large { ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES } } else { ApiError::BodyRead(e) }
    })?;
    match serde_json::from_slice::<Value>(&bytes).map_err(ApiError::MalformedJson)? {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid("body", "the body must be a JSON object")),
    }
}

/// Turns the POST body's fields into a raw request, naming any field that
/// is missing, of the wrong type, or unknown.
fn build_request(mut m: Map<String, Value>) -> Result<BuildRequest, ApiError> {
    let string = |m: &mut Map<String, Value>, field: &str, required: bool| -> Result<Option<String>, ApiError> {
        match m.remove(field) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(ApiError::invalid(field, format!("{field} is required"))),
            Some(_) => Err(ApiError::invalid(field, format!("{field} must be a string"))),
        }
    };
    let atom = string(&mut m, "atom", true)?.unwrap_or_default();
    let version = string(&mut m, "version", true)?.unwrap_or_default();
    let target = string(&mut m, "target", false)?;
    let use_flags = match m.remove("use") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid("use", format!("use[{i}] must be a string"))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid("use", "use must be an array of strings or one space-separated string"));
        }
    };
    if let Some(unknown) = m.keys().next() {
        let shown: String = unknown.chars().take(64).flat_map(char::escape_default).collect();
        return Err(ApiError::invalid(
            shown.clone(),
            format!("unknown field \"{shown}\"; allowed: atom, version, use, target"),
        ));
    }
    Ok(BuildRequest { atom, version, use_flags, target })
}

/// `POST /v1/builds`
pub async fn create_build(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let may = may_build(&state, &headers)?;
    let req = build_request(json_object(&headers, body).await?)?;
    let outcome = state.service.request(&req, may).await?;
    // Only a queued build, with build history, costs the extra reads (never the cache-hit path).
    let eta = match &outcome {
        Outcome::Pending { record } => eta_of(&state, record, None).await,
        _ => None,
    };
    Ok(render(&state, outcome, None, eta))
}

/// Live workers, or None (logged) when they cannot be counted.
async fn live_workers(state: &ApiState) -> Option<u64> {
    match state.service.workers_alive().await {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = &e as &dyn std::error::Error, "cannot count live workers");
            None
        }
    }
}

/// The eta of a queued build, or None (an error is logged: the answer goes out without it).
async fn eta_of(state: &ApiState, record: &pacloud_domain::BuildRecord, workers: Option<u64>) -> Option<u64> {
    match state.service.eta_s(record, workers).await {
        Ok(eta) => eta,
        Err(e) => {
            tracing::warn!(error = &e as &dyn std::error::Error, "cannot estimate the wait: no eta_s");
            None
        }
    }
}

/// `GET /v1/builds/{key}`
pub async fn get_build(State(state): State<Arc<ApiState>>, Path(key): Path<String>) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    let outcome = state.service.status(&key).await?;
    let workers = match &outcome {
        Outcome::Pending { .. } => live_workers(&state).await,
        _ => None,
    };
    let eta = match (&outcome, workers) {
        (Outcome::Pending { record }, Some(n)) => eta_of(&state, record, Some(n)).await,
        _ => None,
    };
    Ok(render(&state, outcome, workers, eta))
}

/// `POST /v1/builds/{key}/retry`
pub async fn retry_build(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    if !may_build(&state, &headers)? {
        return Err(ApiError::Unauthorized);
    }
    Ok(render(&state, state.service.retry(&key).await?, None, None))
}

/// `GET /v1/builds/{key}/log`: redirects to a signed URL of the build log.
pub async fn build_log(State(state): State<Arc<ApiState>>, Path(key): Path<String>) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    match state.service.log_url(&key).await? {
        Some(u) => Ok(Redirect::temporary(&u.url).into_response()),
        None => Err(ApiError::NotFound(format!("build {key} has no log yet"))),
    }
}

/// `GET /v1/targets`
pub async fn targets(State(state): State<Arc<ApiState>>) -> Response {
    let set = state.service.targets();
    let list: Vec<Value> = set
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "hash": t.hash(),
                "default": &t.name == set.default_name(),
                "profile": t.spec.profile,
                "chost": t.spec.chost,
                "cflags": t.spec.cflags,
                "cxxflags": t.spec.cxxflags,
                "ldflags": t.spec.ldflags,
                "repository": t.spec.repository,
                "snapshot": t.spec.snapshot,
                "builder": t.spec.builder,
                "tree_index": t.spec.tree_index,
                "env": t.spec.env,
            })
        })
        .collect();
    let signing_key = match state.binhost_key.get().await {
        Ok(k) => Some(json!({"fingerprint": k.fingerprint, "url": format!("{}/v1/signing-key.asc", state.base_path)})),
        Err(KeyLookupError::Unsigned | KeyLookupError::NotYetPublished) => None,
        Err(e) => {
            // The targets are still worth answering; the key route says why.
            tracing::warn!(error = &e as &dyn std::error::Error, "binhost signing key unavailable");
            None
        }
    };
    Json(json!({"default": set.default_name(), "targets": list, "signing_key": signing_key})).into_response()
}

/// `GET /v1/signing-key.asc`: the armored public key binhost packages are
/// signed with (`application/pgp-keys`).
pub async fn signing_key(State(state): State<Arc<ApiState>>) -> Response {
    match state.binhost_key.get().await {
        Ok(k) => ([(header::CONTENT_TYPE, "application/pgp-keys")], k.armored).into_response(),
        Err(e @ (KeyLookupError::Unsigned | KeyLookupError::NotYetPublished)) => {
            ApiError::NotFound(e.to_string()).into_response()
        }
        Err(e) => {
            tracing::error!(error = &e as &dyn std::error::Error, "binhost signing key unavailable");
            ApiError::KeyUnavailable(e).into_response()
        }
    }
}

/// `GET /healthz`
pub async fn health() -> Response {
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `GET /openapi.json`
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// `GET /package?package=<cat/pkg>&version=<v>&useflag=<flags>`: the
/// original pacloud client's endpoint, on the default target.
pub async fn compat_package(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    match compat_inner(&state, &headers, query.as_deref().unwrap_or("")).await {
        Ok(outcome) => {
            let body = match outcome {
                Outcome::Ready { url, .. } => json!({"status": "SUCCESS", "linkS3": url.url}),
                Outcome::Pending { .. } => json!({"status": "WAIT"}),
                Outcome::Failed { record, .. } => json!({
                    "status": "FAILED",
                    "errorMessage": record.failure.as_ref().map(|f| f.reason.as_str()).unwrap_or("build failed"),
                }),
            };
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => {
            let status = e.status();
            let mut body = e.body();
            if let Value::Object(m) = &mut body {
                m.insert("status".into(), json!("FAILED"));
                m.insert("errorMessage".into(), m.get("message").cloned().unwrap_or(Value::Null));
            }
            let mut resp = e.into_response();
            *resp.body_mut() = Body::from(body.to_string());
            *resp.status_mut() = status;
            resp
        }
    }
}

async fn compat_inner(state: &ApiState, headers: &HeaderMap, query: &str) -> Result<Outcome, ApiError> {
    let may = may_build(state, headers)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|_| ApiError::invalid("query", "the query string is not valid URL encoding"))?;
    let mut package = None;
    let mut version = None;
    let mut useflag = None;
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "package" => &mut package,
            "version" => &mut version,
            "useflag" => &mut useflag,
            _ => continue,
        };
        if slot.replace(v).is_some() {
            return Err(ApiError::invalid(k.clone(), format!("{k} is given more than once")));
        }
    }
    let req = BuildRequest {
        atom: package.ok_or_else(|| ApiError::invalid("package", "package is required (category/package)"))?,
        version: version.ok_or_else(|| ApiError::invalid("version", "version is required"))?,
        use_flags: useflag.into_iter().collect(),
        target: None,
    };
    state.service.request(&req, may).await.map_err(|e| match ApiError::from(e) {
        ApiError::Invalid { field, message } => {
            let field = match field.as_str() {
                "atom" => "package".to_owned(),
                "use" => "useflag".to_owned(),
                _ => field,
            };
            ApiError::Invalid { field, message }
        }
        other => other,
    })
}
