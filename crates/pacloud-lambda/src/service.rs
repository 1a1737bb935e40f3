//! The function's service stack, outermost first:
//!
//! 1. [`EventGuard`] answers the API Gateway events that `lambda_http`
//!    cannot turn into an HTTP request with a 400 instead of a function
//!    error: a body flagged `isBase64Encoded` that is not base64
//!    (`aws_lambda_events` decodes it with `expect`, a panic the runtime
//!    would report to `/invocation/{id}/error`), and, as a last resort, any
//!    other panic while converting the event (e.g. a `Host` header that is
//!    not a URL authority).
//! 2. `lambda_http::Adapter` (what `lambda_http::run` wraps a service in):
//!    API Gateway HTTP API payload v2 event -> `http::Request`, and the
//!    response back.
//! 3. [`HttpApi`]: strips `PACLOUD_BASE_PATH` (an API Gateway stage such as
//!    `/prod`, which HTTP APIs keep in `rawPath` for named stages) from the
//!    request path, then calls the same `pacloud_api::router` that
//!    `pacloud serve` serves.

use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderValue, Uri, header};
use base64::Engine;
use lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpResponse;
use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, LambdaEvent, Service};
use pacloud_api::ApiError;
use serde::Serialize;

/// The API Router behind the base-path strip; a `Service` over
/// `lambda_http`'s requests.
#[derive(Clone)]
pub struct HttpApi {
    router: Router,
    base_path: Arc<str>,
}

impl HttpApi {
    /// `base_path` is `""` or `/stage` (see `LambdaConfig::base_path`).
    pub fn new(router: Router, base_path: &str) -> Self {
        HttpApi { router, base_path: base_path.into() }
    }
}

impl Service<lambda_http::Request> for HttpApi {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = axum::routing::future::RouteFuture<Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<lambda_http::Request>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut req: lambda_http::Request) -> Self::Future {
        strip_base_path(&self.base_path, req.uri_mut());
        self.router.call(req)
    }
}

/// `/prod/v1/builds?x` -> `/v1/builds?x` when `base` is `/prod`; paths
/// outside the base are left alone (the Router answers them, usually 404).
pub fn strip_base_path(base: &str, uri: &mut Uri) {
    if base.is_empty() {
        return;
    }
    let rest = match uri.path().strip_prefix(base) {
        Some("") => "/",
        Some(r) if r.starts_with('/') => r,
        _ => return,
    };
    let pq = match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let Ok(pq) = PathAndQuery::try_from(pq) else { return };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq);
    if let Ok(stripped) = Uri::from_parts(parts) {
        *uri = stripped;
    }
}

/// What the function returns: `lambda_http`'s response, or a refusal made
/// here for an event it cannot convert. Serialised untagged, so both are
/// plain API Gateway v2 responses.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Reply<R> {
    Http(R),
    Refused(Box<ApiGatewayV2httpResponse>),
}

impl<R> Reply<R> {
    /// The status code of a refusal (None for a converted request).
    pub fn refused_status(&self) -> Option<i64> {
        match self {
            Reply::Http(_) => None,
            Reply::Refused(r) => Some(r.status_code),
        }
    }
}

/// Guards `lambda_http`'s event conversion; see the module docs.
#[derive(Clone)]
pub struct EventGuard<S> {
    inner: S,
}

impl<S> EventGuard<S> {
    pub fn new(inner: S) -> Self {
        EventGuard { inner }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<LambdaEvent<LambdaRequest>> for EventGuard<S>
where
    S: Service<LambdaEvent<LambdaRequest>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Reply<S::Response>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, event: LambdaEvent<LambdaRequest>) -> Self::Future {
        if let Some(refusal) = refuse(&event.payload) {
            tracing::info!(status = refusal.status_code, "refused an event lambda_http cannot convert");
            return Box::pin(std::future::ready(Ok(Reply::Refused(Box::new(refusal)))));
        }
        // The conversion runs synchronously inside `call`; a panic there is
        // a malformed event, not a failure of the function.
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(event))) {
            Ok(fut) => Box::pin(async move { fut.await.map(Reply::Http) }),
            Err(_) => {
                tracing::warn!("refused an event whose conversion to an HTTP request failed");
                let e = ApiError::invalid("request", "the request could not be interpreted");
                Box::pin(std::future::ready(Ok(Reply::Refused(Box::new(error_response(&e))))))
            }
        }
    }
}

/// A 4xx for events `lambda_http` would panic on, None for all others.
fn refuse(payload: &LambdaRequest) -> Option<ApiGatewayV2httpResponse> {
    let LambdaRequest::ApiGatewayV2(ag) = payload else {
        return None;
    };
    let body = ag.body.as_deref().filter(|_| ag.is_base64_encoded)?;
    // The same engine `Body::from_maybe_encoded` decodes with.
    match base64::engine::general_purpose::STANDARD.decode(body) {
        Ok(_) => None,
        Err(_) => Some(error_response(&ApiError::invalid(
            "body",
            "the body is marked base64-encoded but is not valid base64",
        ))),
    }
}

/// The API's own error body and status, as an API Gateway v2 response.
fn error_response(e: &ApiError) -> ApiGatewayV2httpResponse {
    let mut r = ApiGatewayV2httpResponse::default();
    r.status_code = i64::from(e.status().as_u16());
    r.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.body = Some(lambda_http::Body::Text(e.body().to_string()));
    r.is_base64_encoded = false;
    r
}

/// The whole handler the runtime calls.
pub type Handler = EventGuard<Adapter<'static, axum::response::Response, HttpApi>>;

/// Builds the handler over `router`.
pub fn handler(router: Router, base_path: &str) -> Handler {
    EventGuard::new(Adapter::from(HttpApi::new(router, base_path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_base_path() {
        let cases = [
            ("/prod", "https://h/prod/v1/builds", "https://h/v1/builds"),
            ("/prod", "https://h/prod/package?package=a%2Fb&version=1", "https://h/package?package=a%2Fb&version=1"),
            ("/prod", "https://h/prod", "https://h/"),
            ("/prod", "https://h/prod/", "https://h/"),
            ("/prod", "https://h/v1/builds", "https://h/v1/builds"),
            ("/prod", "https://h/production/x", "https://h/production/x"),
            ("", "https://h/prod/v1/builds", "https://h/prod/v1/builds"),
            ("/a/b", "/a/b/healthz", "/healthz"),
        ];
        for (base, from, want) in cases {
            let mut uri: Uri = from.parse().unwrap();
            strip_base_path(base, &mut uri);
            assert_eq!(uri.to_string(), want, "{base} {from}");
        }
    }
}
