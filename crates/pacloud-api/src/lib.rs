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
use pacloud_domain::ports::ArtifactStore;
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
    /// The binhost signing key clients import (`GET /v1/signing-key.asc`).
    pub binhost_key: BinhostKey,
}

/// Where the API finds the binhost signing key's certificate.
pub enum BinhostKey {
    /// Packages are published unsigned: no key.
    Unsigned,
    /// Known at startup (local mode: the key in the data directory).
    Fixed(PublicKeyInfo),
    /// Published in the artifact store by the workers
    /// ([`pacloud_domain::published_key`]; AWS, where the key is in KMS):
    /// read on first use, then kept for the life of the process. Until a
    /// worker has published it, the key route answers 404.
    Published { store: Arc<dyn ArtifactStore>, cached: std::sync::OnceLock<PublicKeyInfo> },
}

/// Why the published key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    #[error("this service publishes unsigned packages: no signing key")]
    Unsigned,
    #[error("no worker has published the signing key yet ({})", pacloud_domain::published_key::PUBLISHED_KEY_PATH)]
    NotYetPublished,
    #[error(transparent)]
    Bad(#[from] pacloud_domain::published_key::BadPublishedKey),
    #[error("the artifact store is unavailable")]
    Store(#[from] pacloud_domain::ports::ArtifactError),
}

impl BinhostKey {
    /// Reads from `store` (see [`BinhostKey::Published`]).
    pub fn published(store: Arc<dyn ArtifactStore>) -> BinhostKey {
        BinhostKey::Published { store, cached: std::sync::OnceLock::new() }
    }

    /// The certificate, or why there is none.
    pub async fn get(&self) -> Result<PublicKeyInfo, KeyLookupError> {
        match self {
            BinhostKey::Unsigned => Err(KeyLookupError::Unsigned),
            BinhostKey::Fixed(k) => Ok(k.clone()),
            BinhostKey::Published { store, cached } => {
                if let Some(k) = cached.get() {
                    return Ok(k.clone());
                }
                let path = pacloud_domain::published_key::PublishedKey::path();
                let Some((bytes, _)) = store.get_versioned(&path).await? else {
                    return Err(KeyLookupError::NotYetPublished);
                };
                let k = pacloud_domain::published_key::PublishedKey::decode(&bytes)?;
                let info = PublicKeyInfo { armored: k.armored, fingerprint: k.fingerprint };
                Ok(cached.get_or_init(|| info).clone())
            }
        }
    }
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
