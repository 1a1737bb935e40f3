//! pacloud's AWS adapters: the three ports on DynamoDB, SQS and S3.
//!
//! Architecture invariant: this is the only crate that depends on an AWS
//! SDK. One TLS stack is compiled (rustls with ring, through
//! aws-smithy-http-client); the SDKs' default features are off.
//!
//! - [`DynamoStore`]: one table keyed by `key`; create-if-absent and
//!   replace-if-revision are conditional puts; reads are strongly
//!   consistent; failed records carry a TTL attribute (docs/aws.md).
//! - [`SqsQueue`]: versioned JSON bodies, long polls, visibility changes for
//!   heartbeats and releases, ApproximateReceiveCount, and the queue's
//!   redrive policy for dead letters.
//! - [`S3ArtifactStore`]: PutObject with a SHA-256 checksum, conditional
//!   create (`If-None-Match: *`), presigned GET URLs, HeadObject, listing.
//! - [`nudge`]: the nudges that make the fleet scaler tick at once (a job
//!   made visible, a worker idle past the idle timeout).
//! - [`fleet::FleetClient`]: what the scaler Lambda reads and does on EC2
//!   and SQS (worker fleets and instances by tag, spot prices, fleet
//!   history, ModifyFleet, TerminateInstances), with bounded backoff.

mod dynamo;
pub mod fleet;
pub mod kms;
pub mod nudge;
pub mod provision;
mod s3;
mod sqs;
pub mod testkit;

pub use dynamo::DynamoStore;
pub use s3::S3ArtifactStore;
pub use sqs::SqsQueue;

use std::time::Duration;

/// Where the AWS resources are and how to reach them.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub table: String,
    pub queue_url: String,
    /// The dead-letter queue (for depth figures; redrive is the queue's).
    pub dlq_url: Option<String>,
    pub bucket: String,
    /// Overrides the service endpoints (moto in tests, a VPC endpoint).
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    /// Static credentials instead of the default chain (tests).
    pub static_credentials: Option<(String, String)>,
    /// Path-style S3 addressing (moto, S3-compatible stores).
    pub force_path_style: bool,
    /// Presigned URL lifetime, capped at one hour.
    pub url_ttl: Duration,
    /// The fleet scaler's events queue: when set, the job queue nudges the
    /// scaler after each job it makes visible, and an AWS worker when it is
    /// idle past the idle timeout ([`nudge`]).
    pub scaler_events_url: Option<String>,
}

/// Failure to configure the AWS clients.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("{name} is required")]
    Missing { name: &'static str },
    #[error("{name}={value:?} is not valid: {expected}")]
    Invalid { name: &'static str, value: String, expected: &'static str },
}

/// The three SDK clients, built once.
#[derive(Clone, Debug)]
pub struct Clients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
    pub kms: aws_sdk_kms::Client,
}

/// Builds the SDK clients from `config` (one HTTPS client, rustls + ring).
pub async fn clients(config: &AwsConfig) -> Clients {
    let sdk = sdk_config(config, None).await;
    let s3_config = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(config.force_path_style).build();
    Clients {
        dynamodb: aws_sdk_dynamodb::Client::new(&sdk),
        sqs: aws_sdk_sqs::Client::new(&sdk),
        s3: aws_sdk_s3::Client::from_conf(s3_config),
        kms: aws_sdk_kms::Client::new(&sdk),
    }
}

/// The shared SDK configuration: one HTTPS client (rustls + ring), endpoint,
/// region and credentials from `config`, and an optional retry policy.
pub(crate) async fn sdk_config(
    config: &AwsConfig,
    retry: Option<aws_config::retry::RetryConfig>,
) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if let Some(ep) = &config.endpoint_url {
        loader = loader.endpoint_url(ep);
    }
    if let Some(r) = &config.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some((ak, sk)) = &config.static_credentials {
        loader =
            loader.credentials_provider(aws_sdk_s3::config::Credentials::new(ak, sk, None, None, "pacloud-static"));
    }
    if let Some(r) = retry {
        loader = loader.retry_config(r);
    }
    loader.load().await
}

/// The three ports on AWS.
pub struct AwsPorts {
    pub store: DynamoStore,
    pub queue: SqsQueue,
    pub artifacts: S3ArtifactStore,
}

/// Builds the clients and the three adapters.
pub async fn connect(config: &AwsConfig) -> AwsPorts {
    let c = clients(config).await;
    AwsPorts {
        store: DynamoStore::new(c.dynamodb.clone(), config.table.clone()),
        queue: SqsQueue::new(c.sqs.clone(), config.queue_url.clone(), config.dlq_url.clone())
            .with_nudger(config.scaler_events_url.clone().map(|url| nudge::Nudger::new(c.sqs.clone(), url))),
        artifacts: S3ArtifactStore::new(c.s3.clone(), config.bucket.clone(), config.url_ttl),
    }
}

/// Boxes an SDK error with its service detail (the display of a raw
/// `SdkError` is only "service error").
pub(crate) fn boxed_sdk<E, R>(e: aws_sdk_kms::error::SdkError<E, R>) -> Box<dyn std::error::Error + Send + Sync>
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    Box::new(std::io::Error::other(aws_sdk_kms::error::DisplayErrorContext(e).to_string()))
}

/// Boxes an SDK error as a port error's source.
pub(crate) fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}
