//! Init: check the variables the Lambda runtime itself needs (lambda_runtime
//! panics when they are missing), and report an init failure to the Runtime
//! API's `/runtime/init/error` as Lambda expects, so a misconfigured
//! function fails its init with a readable message instead of a panic or a
//! timeout. lambda_runtime 1.5 reports init errors only for SnapStart hooks,
//! so this is done here, with its own Runtime API client.

use std::time::Duration;

use lambda_runtime_api_client::body::Body;
use lambda_runtime_api_client::{Client, build_request};

/// A failure before the function can serve.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("configuration error: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{name} is not set or not valid ({expected}); is this running inside AWS Lambda?")]
    Runtime { name: &'static str, expected: &'static str },
}

impl InitError {
    /// The `Lambda-Runtime-Function-Error-Type` reported for it.
    pub fn error_type(&self) -> &'static str {
        match self {
            InitError::Config(_) => "Runtime.ConfigInvalid",
            InitError::Runtime { .. } => "Runtime.InitError",
        }
    }
}

/// Checks the variables lambda_runtime reads with `expect`
/// (`AWS_LAMBDA_RUNTIME_API` is checked by the caller, which needs it to
/// report).
pub fn check_runtime_env(env: impl Fn(&str) -> Option<String>) -> Result<(), InitError> {
    for name in ["AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION"] {
        if env(name).is_none() {
            return Err(InitError::Runtime { name, expected: "set by Lambda" });
        }
    }
    if env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").and_then(|v| v.parse::<i32>().ok()).is_none() {
        return Err(InitError::Runtime {
            name: "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            expected: "megabytes, set by Lambda",
        });
    }
    Ok(())
}

/// `host:port` of the Runtime API as an `http://` URI.
pub fn runtime_api_uri(api: &str) -> Option<lambda_http::http::Uri> {
    format!("http://{api}").parse().ok().filter(|u: &lambda_http::http::Uri| u.host().is_some())
}

/// Posts `error` to `/2018-06-01/runtime/init/error`. Failures to report
/// are logged; the caller exits non-zero either way.
pub async fn report_init_error(api: &lambda_http::http::Uri, error: &InitError) {
    let body = serde_json::json!({
        "errorMessage": error.to_string(),
        "errorType": error.error_type(),
        "stackTrace": [],
    });
    let req = build_request()
        .method("POST")
        .uri("/2018-06-01/runtime/init/error")
        .header("Lambda-Runtime-Function-Error-Type", error.error_type())
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()));
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the init error report");
            return;
        }
    };
    let client = match Client::builder().with_endpoint(api.clone()).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Runtime API client");
            return;
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), client.call(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() => {}
        Ok(Ok(resp)) => tracing::error!(status = resp.status().as_u16(), "the Runtime API refused the init error"),
        Ok(Err(e)) => tracing::error!(error = %e, "cannot report the init error to the Runtime API"),
        Err(_) => tracing::error!("reporting the init error to the Runtime API timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_env() {
        let full = |k: &str| match k {
            "AWS_LAMBDA_FUNCTION_NAME" | "AWS_LAMBDA_FUNCTION_VERSION" => Some("x".to_owned()),
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE" => Some("128".to_owned()),
            _ => None,
        };
        assert!(check_runtime_env(full).is_ok());
        let e = check_runtime_env(|k| if k == "AWS_LAMBDA_FUNCTION_NAME" { None } else { full(k) }).unwrap_err();
        assert!(e.to_string().contains("AWS_LAMBDA_FUNCTION_NAME"), "{e}");
        let e =
            check_runtime_env(|k| if k == "AWS_LAMBDA_FUNCTION_MEMORY_SIZE" { Some("lots".into()) } else { full(k) })
                .unwrap_err();
        assert!(e.to_string().contains("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"), "{e}");
        assert!(runtime_api_uri("127.0.0.1:9001").is_some());
        assert!(runtime_api_uri("").is_none());
        assert!(runtime_api_uri("a b").is_none());
    }
}
