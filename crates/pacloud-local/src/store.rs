//! Build records in SQLite: the `builds` table, one JSON record per key,
//! with create-if-absent and revision-conditional replace — the same
//! semantics as the DynamoDB adapter's conditional puts.

use async_trait::async_trait;
use pacloud_domain::ports::{Created, MetadataStore, StoreError};
use pacloud_domain::{BuildKey, BuildRecord};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::db::{Db, DbError};

/// The metadata store port on SQLite.
#[derive(Clone)]
pub struct SqliteStore {
    db: Db,
}

impl SqliteStore {
    pub fn new(db: Db) -> Self {
        SqliteStore { db }
    }
}

fn unavailable(e: DbError) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn decode(key: &str, json: &str) -> Result<BuildRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt { key: key.to_owned(), source: Box::new(e) })
}

fn encode(record: &BuildRecord) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError::Corrupt { key: record.key.to_string(), source: Box::new(e) })
}

#[async_trait]
impl MetadataStore for SqliteStore {
    async fn get(&self, key: &BuildKey) -> Result<Option<BuildRecord>, StoreError> {
        let k = key.to_string();
        let json = self
            .db
            .run(move |c| {
                let mut st = c.prepare_cached("SELECT record FROM builds WHERE key = ?1")?;
                Ok(st.query_row([k], |r| r.get::<_, String>(0)).optional()?)
            })
            .await
            .map_err(unavailable)?;
        json.map(|j| decode(key.as_str(), &j)).transpose()
    }

    async fn create(&self, record: &BuildRecord) -> Result<Created, StoreError> {
        let json = encode(record)?;
        let (k, rev, status) = (record.key.to_string(), record.revision as i64, record.status.as_str());
        let existing = self
            .db
            .run(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let inserted = tx.prepare_cached(
                    "INSERT INTO builds (key, revision, status, record) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (key) DO NOTHING",
                )?
                .execute(params![k, rev, status, json])?;
                let existing = if inserted == 0 {
                    Some(tx.prepare_cached("SELECT record FROM builds WHERE key = ?1")?.query_row([&k], |r| r.get::<_, String>(0))?)
                } else {
                    None
                };
                tx.commit()?;
                Ok(existing)
            })
            .await
            .map_err(unavailable)?;
        match existing {
            None => Ok(Created::New),
            Some(j) => Ok(Created::Existing(Box::new(decode(record.key.as_str(), &j)?))),
        }
    }

    async fn replace(&self, record: &BuildRecord, expected_revision: u64) -> Result<(), StoreError> {
        let json = encode(record)?;
        let (k, rev, status) = (record.key.to_string(), record.revision as i64, record.status.as_str());
        let changed = self
            .db
            .run(move |c| {
                Ok(c.prepare_cached(
                    "UPDATE builds SET revision = ?2, status = ?3, record = ?4 WHERE key = ?1 AND revision = ?5",
                )?
                .execute(params![k, rev, status, json, expected_revision as i64])?)
            })
            .await
            .map_err(unavailable)?;
        if changed == 1 { Ok(()) } else { Err(StoreError::Conflict) }
    }
}
