//! Build records in DynamoDB: one item per key with `key` (S, partition
//! key), `revision` (N), `status` (S), `record` (S, the JSON record) and,
//! on failed records, `expires_at` (N, the table's TTL attribute) so
//! negative results disappear. Writes are conditional puts; reads are
//! strongly consistent.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use pacloud_domain::ports::{Created, MetadataStore, StoreError};
use pacloud_domain::{BuildKey, BuildRecord, Status};
use std::collections::HashMap;

use crate::boxed;

/// How long after a failure's cache time its record is kept (for its log link).
const FAILED_RECORD_GRACE_SECS: i64 = 24 * 3600;

/// The metadata store port on DynamoDB.
#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

fn item(record: &BuildRecord) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let json = serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt { key: record.key.to_string(), source: Box::new(e) })?;
    let mut m = HashMap::from([
        ("key".to_owned(), AttributeValue::S(record.key.to_string())),
        ("revision".to_owned(), AttributeValue::N(record.revision.to_string())),
        ("status".to_owned(), AttributeValue::S(record.status.as_str().to_owned())),
        ("record".to_owned(), AttributeValue::S(json)),
    ]);
    if let (Status::Failed, Some(f)) = (record.status, &record.failure) {
        let ttl = f.cached_until.as_secs() + FAILED_RECORD_GRACE_SECS;
        m.insert("expires_at".to_owned(), AttributeValue::N(ttl.to_string()));
    }
    Ok(m)
}

fn decode(key: &str, item: &HashMap<String, AttributeValue>) -> Result<BuildRecord, StoreError> {
    let json = item
        .get("record")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::Corrupt { key: key.to_owned(), source: "item has no record attribute".into() })?;
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt { key: key.to_owned(), source: Box::new(e) })
}

impl DynamoStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: String) -> Self {
        DynamoStore { client, table }
    }
}

#[async_trait]
impl MetadataStore for DynamoStore {
    async fn get(&self, key: &BuildKey) -> Result<Option<BuildRecord>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("key", AttributeValue::S(key.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(boxed(e)))?;
        out.item.as_ref().map(|i| decode(key.as_str(), i)).transpose()
    }

    async fn create(&self, record: &BuildRecord) -> Result<Created, StoreError> {
        for _ in 0..3 {
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item(record)?))
                .condition_expression("attribute_not_exists(#k)")
                .expression_attribute_names("#k", "key")
                .send()
                .await;
            match put {
                Ok(_) => return Ok(Created::New),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => {
                    // Lost the race: return what won (it may have expired in between).
                    if let Some(existing) = self.get(&record.key).await? {
                        return Ok(Created::Existing(Box::new(existing)));
                    }
                }
                Err(e) => return Err(StoreError::Unavailable(boxed(e))),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn replace(&self, record: &BuildRecord, expected_revision: u64) -> Result<(), StoreError> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item(record)?))
            .condition_expression("#r = :expected")
            .expression_attribute_names("#r", "revision")
            .expression_attribute_values(":expected", AttributeValue::N(expected_revision.to_string()))
            .send()
            .await;
        match put {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => {
                Err(StoreError::Conflict)
            }
            Err(e) => Err(StoreError::Unavailable(boxed(e))),
        }
    }
}
