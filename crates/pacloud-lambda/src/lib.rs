//! pacloud's HTTP API as an AWS Lambda function behind an API Gateway HTTP
//! API (payload format 2.0): the same `pacloud_api::router` that
//! `pacloud serve` serves, over the AWS adapters (DynamoDB, SQS, S3),
//! configured only from environment variables ([`config`]).
//!
//! Init builds the SDK clients once (they are reused by every invocation
//! of the instance); a configuration error is logged, reported to the
//! Runtime API's `/runtime/init/error` and ends the process with status 1,
//! never a panic ([`init`]). Logs are JSON lines on stdout.
//!
//! API Gateway stages: the HTTP API's `$default` stage (what
//! infra/template.yaml deploys) puts no stage in paths or links, so
//! `PACLOUD_BASE_PATH` stays empty. A named stage (say `prod`) stays in
//! `rawPath` (`/prod/v1/builds`): set `PACLOUD_BASE_PATH=/prod`, which
//! pacloud strips from incoming paths and prefixes to the links it returns.
//! The template also sets `AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH=true`, so
//! lambda_http uses `rawPath` as it is; without it lambda_http 1.3 prepends
//! the stage to a path that lacks it (behind a custom domain mapping, say).
//! lambda_http never strips the stage itself (its `apigw_path_with_stage`;
//! aws-lambda-rust-runtime issue #919), hence the strip here.

pub mod config;
pub mod init;
pub mod service;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use pacloud_api::{ApiState, BinhostKey, Tokens};
use pacloud_domain::SystemClock;
use pacloud_domain::service::BuildService;

pub use config::{ConfigError, LambdaConfig};
pub use init::InitError;

/// Wires the AWS adapters to the API Router (the SDK clients are built
/// here, once).
pub async fn build_state(config: &LambdaConfig) -> Arc<ApiState> {
    let ports = pacloud_aws::connect(&config.aws).await;
    // The certificate of the KMS-held key, as the first worker stored it.
    let binhost_key = BinhostKey::published(Arc::new(ports.artifacts.clone()));
    let service = BuildService::new(
        Arc::new(ports.store),
        Arc::new(ports.queue),
        Arc::new(ports.artifacts),
        Arc::new(config.targets.clone()),
        Arc::new(SystemClock),
        config.service.clone(),
    );
    Arc::new(ApiState {
        service: Arc::new(service),
        tokens: Tokens::new(&config.tokens),
        base_path: config.base_path.clone(),
        binhost_key,
    })
}

/// Builds the invocation handler from a configuration.
pub async fn build_handler(config: &LambdaConfig) -> service::Handler {
    let state = build_state(config).await;
    service::handler(pacloud_api::router(state), &config.base_path)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// JSON lines on stdout (panics included); the level from `RUST_LOG`, else
/// Lambda's `AWS_LAMBDA_LOG_LEVEL`, else `info`.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = env("RUST_LOG")
        .or_else(|| env("AWS_LAMBDA_LOG_LEVEL").map(|l| l.to_ascii_lowercase()))
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
    // A panic (caught by the event guard or by lambda_runtime) is logged as
    // a JSON line too, with the invocation's request id from its span.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %payload, %location, "panic");
    }));
}

/// The binary: init, then serve invocations until the runtime stops.
pub fn main() -> ExitCode {
    let started = Instant::now();
    init_logging();
    // Lambda hands an instance one invocation at a time: one thread is enough
    // and starts faster.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(started))
}

async fn run(started: Instant) -> ExitCode {
    let Some(api) = env("AWS_LAMBDA_RUNTIME_API").as_deref().and_then(init::runtime_api_uri) else {
        let e = InitError::Runtime { name: "AWS_LAMBDA_RUNTIME_API", expected: "host:port, set by Lambda" };
        tracing::error!(error = %e, "init failed");
        return ExitCode::FAILURE;
    };
    let config = match init::check_runtime_env(env).and_then(|()| Ok(LambdaConfig::from_lookup(env)?)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, error_type = e.error_type(), "init failed");
            init::report_init_error(&api, &e).await;
            return ExitCode::FAILURE;
        }
    };
    if config.tokens.is_empty() {
        tracing::warn!("PACLOUD_TOKENS is empty: every caller may start builds");
    }
    if !config.base_path.is_empty() && env("AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH").is_none() {
        tracing::warn!(
            base_path = %config.base_path,
            "AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH is not set: lambda_http may prefix the stage to paths"
        );
    }
    let handler = build_handler(&config).await;
    tracing::info!(
        init_ms = started.elapsed().as_secs_f64() * 1e3,
        table = %config.aws.table,
        bucket = %config.aws.bucket,
        base_path = %config.base_path,
        default_target = %config.targets.default_name(),
        "pacloud-lambda ready"
    );
    match lambda_http::lambda_runtime::run(handler).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the Lambda runtime loop stopped");
            ExitCode::FAILURE
        }
    }
}
