//! pacloud's HTTP API: one axum [`Router`] over the domain's
//! [`BuildService`]. `pacloud serve` serves it with `axum::serve`; the Lambda
//! serves the very same Router with `lambda_http::run`.
//!
//! Architecture invariant: handlers only translate HTTP to domain calls and
//! back; every decision about builds is made in `pacloud_domain::service`.

mod auth;
mod error;
mod handlers;

use axum::Router;
use axum::routing::{get, post};
use pacloud_domain::service::BuildService;
use std::sync::Arc;

pub use auth::Tokens;
pub use error::ApiError;

/// The OpenAPI document of every route below.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the Router needs.
pub struct ApiState {
    pub service: Arc<BuildService>,
    pub tokens: Tokens,
    /// Prefix of every link the API returns (e.g. an API Gateway stage
    /// `/prod`); empty when the API is served at the root.
    pub base_path: String,
    /// The binhost signing key clients import (`GET /v1/signing-key.asc`);
    /// `None` when packages are published unsigned.
    pub binhost_key: Option<PublicKeyInfo>,
}

/// The public half of the binhost signing key.
#[derive(Debug, Clone)]
pub struct PublicKeyInfo {
    /// The armored certificate (`-----BEGIN PGP PUBLIC KEY BLOCK-----`).
    pub armored: String,
    /// Its OpenPGP fingerprint, upper-case hex.
    pub fingerprint: String,
}

/// The whole HTTP API.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/builds", post(handlers::create_build))
        .route("/v1/builds/{key}", get(handlers::get_build))
        .route("/v1/builds/{key}/retry", post(handlers::retry_build))
        .route("/v1/builds/{key}/log", get(handlers::build_log))
        .route("/v1/targets", get(handlers::targets))
        .route("/v1/signing-key.asc", get(handlers::signing_key))
        .route("/healthz", get(handlers::health))
        .route("/openapi.json", get(handlers::openapi))
        .route("/package", get(handlers::compat_package))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}
