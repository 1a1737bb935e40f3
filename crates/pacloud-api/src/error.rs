//! API errors: every variant decides its status code and JSON body. Client
//! mistakes are 4xx with `{"error","field","message"}`; a backend failure is
//! a 503 the client may retry. Source errors are kept as sources and logged,
//! never sent to clients.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pacloud_domain::request::SpecError;
use pacloud_domain::service::ServiceError;
use pacloud_domain::tree::{NotInTree, UseRefusal};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("body is not valid JSON")]
    MalformedJson(#[source] serde_json::Error),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("could not read the request body")]
    BodyRead(#[source] axum::Error),
    #[error("a valid bearer token is required to start a build")]
    Unauthorized,
    #[error("the bearer token is not valid")]
    BadToken,
    #[error("unknown target {0:?}")]
    UnknownTarget(String),
    #[error("{0}")]
    NotFound(String),
    /// The target's tree has no such package or version.
    #[error(transparent)]
    NotInTree(NotInTree),
    /// A flag outside IUSE, or against the profile's masks and forces.
    #[error(transparent)]
    UseRefused(UseRefusal),
    /// The target's tree index is not stored yet.
    #[error("the tree index of target {0} is not built yet; retry later")]
    TreeIndexPending(String),
    #[error("{0}")]
    Conflict(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("a backend is unavailable; try again shortly")]
    Unavailable(#[source] ServiceError),
    /// The published binhost signing key cannot be read (the artifact
    /// store failed, or the stored object is unusable).
    #[error("the binhost signing key is unavailable; try again shortly")]
    KeyUnavailable(#[source] crate::KeyLookupError),
    #[error("internal error")]
    Internal(#[source] ServiceError),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid { field: field.into(), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::MalformedJson(_) | ApiError::BodyRead(_) | ApiError::UseRefused(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized | ApiError::BadToken => StatusCode::UNAUTHORIZED,
            ApiError::UnknownTarget(_) | ApiError::NotFound(_) | ApiError::NotInTree(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) | ApiError::TreeIndexPending(_) | ApiError::KeyUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: `error` code, the `field` when one is at fault, and a
    /// message for people.
    pub fn body(&self) -> serde_json::Value {
        match self {
            ApiError::Invalid { field, message } => {
                json!({"error": "invalid_request", "field": field, "message": message})
            }
            ApiError::MalformedJson(e) => {
                json!({"error": "invalid_request", "field": "body", "message": format!("body is not valid JSON: {e}")})
            }
            ApiError::BodyRead(_) => {
                json!({"error": "invalid_request", "field": "body", "message": self.to_string()})
            }
            ApiError::UnsupportedMediaType => {
                json!({"error": "unsupported_media_type", "message": self.to_string()})
            }
            ApiError::PayloadTooLarge { .. } => {
                json!({"error": "payload_too_large", "message": self.to_string()})
            }
            ApiError::Unauthorized | ApiError::BadToken => {
                json!({"error": "unauthorized", "message": self.to_string()})
            }
            ApiError::UnknownTarget(_) => {
                json!({"error": "unknown_target", "field": "target", "message": self.to_string()})
            }
            ApiError::NotFound(_) => json!({"error": "not_found", "message": self.to_string()}),
            ApiError::NotInTree(e) => {
                let field = match e {
                    NotInTree::Package { .. } => "atom",
                    NotInTree::Version { .. } => "version",
                };
                json!({"error": "not_found", "field": field, "message": self.to_string()})
            }
            ApiError::UseRefused(e) => {
                let rule = match e {
                    UseRefusal::NotInIuse { .. } => "iuse",
                    UseRefusal::Masked { .. } => "use.mask",
                    UseRefusal::Forced { .. } => "use.force",
                };
                json!({"error": "invalid_request", "field": "use", "flag": e.flag(), "rule": rule, "message": self.to_string()})
            }
            ApiError::TreeIndexPending(t) => {
                json!({"error": "tree_index_pending", "target": t, "message": self.to_string()})
            }
            ApiError::Conflict(_) => json!({"error": "conflict", "message": self.to_string()}),
            ApiError::MethodNotAllowed => {
                json!({"error": "method_not_allowed", "message": self.to_string()})
            }
            ApiError::Unavailable(_) | ApiError::KeyUnavailable(_) => {
                json!({"error": "unavailable", "message": self.to_string()})
            }
            ApiError::Internal(_) => json!({"error": "internal", "message": self.to_string()}),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Spec(SpecError::Invalid(v)) => ApiError::Invalid { field: v.field, message: v.message },
            ServiceError::Spec(SpecError::UnknownTarget(t)) => ApiError::UnknownTarget(t),
            ServiceError::AuthRequired => ApiError::Unauthorized,
            ServiceError::NotInTree(e) => ApiError::NotInTree(e),
            ServiceError::Use(e) => ApiError::UseRefused(e),
            ServiceError::TreeIndexPending { target } => ApiError::TreeIndexPending(target),
            e @ ServiceError::TreeIndexBroken { .. } => ApiError::Unavailable(e),
            ServiceError::UnknownKey(k) => ApiError::NotFound(format!("no build with key {k}")),
            e @ ServiceError::NotRetryable(_) => ApiError::Conflict(e.to_string()),
            ServiceError::Store(_) | ServiceError::Queue(_) | ServiceError::Artifact(_) => ApiError::Unavailable(e),
            ServiceError::Inconsistent { .. } => ApiError::Internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = &self as &dyn std::error::Error, "request failed");
        }
        let mut resp = (status, Json(self.body())).into_response();
        match self {
            ApiError::Unauthorized | ApiError::BadToken => {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Unavailable(_) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::TreeIndexPending(_) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            }
            _ => {}
        }
        resp
    }
}
