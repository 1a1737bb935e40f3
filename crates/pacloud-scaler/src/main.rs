//! The scaler Lambda's bootstrap: `lambda_runtime` directly (the payload is
//! an EventBridge schedule or an SQS batch of EC2 events, never HTTP).
//! Settings come from the environment; the SDK clients are built once.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use lambda_runtime::{LambdaEvent, service_fn};
use pacloud_aws::fleet::FleetClient;
use pacloud_scaler::{Settings, handle};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    tracing_subscriber::fmt().json().with_current_span(false).without_time().init();
    let settings = Settings::from_lookup(|k| std::env::var(k).ok()).context("scaler settings")?;
    let config = pacloud_aws::AwsConfig {
        table: String::new(),
        queue_url: settings.queue_url.clone(),
        dlq_url: None,
        bucket: String::new(),
        endpoint_url: std::env::var("PACLOUD_AWS_ENDPOINT").ok(),
        region: None,
        static_credentials: None,
        force_path_style: false,
        url_ttl: std::time::Duration::from_secs(900),
        scaler_events_url: None,
    };
    let client = FleetClient::connect(&config).await;
    let (client, settings) = (&client, &settings);
    lambda_runtime::run(service_fn(move |ev: LambdaEvent<Value>| async move {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok::<Value, lambda_runtime::Error>(handle(client, settings, &ev.payload, now).await)
    }))
    .await
}
