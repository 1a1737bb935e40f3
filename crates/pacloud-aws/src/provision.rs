//! Creates the AWS resources pacloud needs, as the CloudFormation template
//! does: the builds table (with its TTL attribute), the job queue with a
//! dead-letter queue and redrive policy, and the private bucket. Used by the
//! tests against moto's server and by `pacloud-aws` users without CFN.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::{AwsConfig, Clients, boxed};

/// The names to create.
#[derive(Debug, Clone)]
pub struct Names {
    pub table: String,
    pub queue: String,
    pub dlq: String,
    pub bucket: String,
    /// Receives after which a message moves to the dead-letter queue.
    pub max_receives: u32,
}

/// Failure to create a resource.
#[derive(Debug, thiserror::Error)]
#[error("cannot create {what}")]
pub struct ProvisionError {
    pub what: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn err<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> ProvisionError {
    move |e| ProvisionError { what, source: boxed(e) }
}

/// Creates everything and returns the configuration that points at it
/// (endpoint, region and credentials copied from `base`).
pub async fn provision(clients: &Clients, names: &Names, base: &AwsConfig) -> Result<AwsConfig, ProvisionError> {
    clients
        .dynamodb
        .create_table()
        .table_name(&names.table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("key")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(err("the table's attribute definition"))?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("key")
                .key_type(KeyType::Hash)
                .build()
                .map_err(err("the table's key schema"))?,
        )
        .send()
        .await
        .map_err(err("the DynamoDB table"))?;
    clients
        .dynamodb
        .update_time_to_live()
        .table_name(&names.table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name("expires_at")
                .build()
                .map_err(err("the TTL specification"))?,
        )
        .send()
        .await
        .map_err(err("the table's TTL"))?;
    let dlq = clients.sqs.create_queue().queue_name(&names.dlq).send().await.map_err(err("the dead-letter queue"))?;
    let dlq_url = dlq.queue_url.unwrap_or_default();
    let dlq_arn = clients
        .sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(err("the dead-letter queue's ARN"))?
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let redrive =
        serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": names.max_receives}).to_string();
    let queue = clients
        .sqs
        .create_queue()
        .queue_name(&names.queue)
        .attributes(QueueAttributeName::RedrivePolicy, redrive)
        .attributes(QueueAttributeName::VisibilityTimeout, "60")
        .send()
        .await
        .map_err(err("the job queue"))?;
    clients.s3.create_bucket().bucket(&names.bucket).send().await.map_err(err("the bucket"))?;
    Ok(AwsConfig {
        table: names.table.clone(),
        queue_url: queue.queue_url.unwrap_or_default(),
        dlq_url: Some(dlq_url),
        bucket: names.bucket.clone(),
        ..base.clone()
    })
}
