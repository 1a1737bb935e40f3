//! The job queue in SQLite, with SQS's semantics: at-least-once delivery,
//! a visibility deadline per received message, delays, and a dead-letter
//! table that a message moves to when it would be received more than
//! `max_receives` times. Long polls wake at once for sends from this process
//! and re-check the table periodically for sends from other processes.

use async_trait::async_trait;
use pacloud_domain::Clock;
use pacloud_domain::ports::{Delivery, JobQueue, MAX_JOB_BYTES, QueueDepth, QueueError, Receipt};
use rusqlite::{TransactionBehavior, params};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

use crate::db::{Db, DbError};

/// How often a waiting receive re-checks the table when not woken.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The job queue port on SQLite.
#[derive(Clone)]
pub struct SqliteQueue {
    db: Db,
    clock: Arc<dyn Clock>,
    max_receives: u32,
    notify: Arc<Notify>,
}

/// A message that was moved to the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: String,
    pub body: String,
    pub receive_count: u32,
}

fn unavailable(e: DbError) -> QueueError {
    QueueError::Unavailable(Box::new(e))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Receipts are `<message id>:<receive count>`: each delivery gets a new one.
fn parse_receipt(r: &Receipt) -> Result<(i64, i64), QueueError> {
    let (id, n) = r.0.split_once(':').ok_or(QueueError::StaleReceipt)?;
    Ok((id.parse().map_err(|_| QueueError::StaleReceipt)?, n.parse().map_err(|_| QueueError::StaleReceipt)?))
}

impl SqliteQueue {
    /// `max_receives`: receives after which a message is dead-lettered.
    pub fn new(db: Db, clock: Arc<dyn Clock>, max_receives: u32) -> Self {
        SqliteQueue { db, clock, max_receives: max_receives.max(1), notify: Arc::new(Notify::new()) }
    }

    /// The dead-letter table's contents, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        self.db
            .run(|c| {
                let mut st = c.prepare_cached("SELECT id, body, receive_count FROM dead_jobs ORDER BY dead_at, id")?;
                let rows = st.query_map([], |r| {
                    Ok(DeadLetter {
                        message_id: r.get::<_, i64>(0)?.to_string(),
                        body: r.get(1)?,
                        receive_count: r.get(2)?,
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .map_err(unavailable)
    }

    async fn try_receive(&self, max: u32, visibility: Duration) -> Result<Vec<Delivery>, QueueError> {
        let now = self.clock.now().0;
        let visible_until = now.saturating_add(ms(visibility));
        let max_receives = i64::from(self.max_receives);
        self.db
            .run(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut out = Vec::new();
                {
                    let mut pick = tx.prepare_cached(
                        "SELECT id, body, receive_count FROM jobs WHERE visible_at <= ?1 ORDER BY visible_at, id LIMIT ?2",
                    )?;
                    let mut bury = tx.prepare_cached(
                        "INSERT INTO dead_jobs (id, body, sent_at, receive_count, dead_at) \
                         SELECT id, body, sent_at, receive_count, ?2 FROM jobs WHERE id = ?1",
                    )?;
                    let mut delete = tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?;
                    let mut take = tx.prepare_cached(
                        "UPDATE jobs SET receive_count = receive_count + 1, visible_at = ?2 WHERE id = ?1",
                    )?;
                    // Dead-lettered rows do not count against `max`: look again.
                    loop {
                        let want = i64::from(max) - out.len() as i64;
                        if want <= 0 {
                            break;
                        }
                        let rows: Vec<(i64, String, i64)> = pick
                            .query_map(params![now, want], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                            .collect::<Result<_, _>>()?;
                        if rows.is_empty() {
                            break;
                        }
                        for (id, body, count) in rows {
                            if count >= max_receives {
                                bury.execute(params![id, now])?;
                                delete.execute([id])?;
                            } else {
                                take.execute(params![id, visible_until])?;
                                let n = count + 1;
                                out.push(Delivery {
                                    message_id: id.to_string(),
                                    receipt: Receipt(format!("{id}:{n}")),
                                    receive_count: u32::try_from(n).unwrap_or(u32::MAX),
                                    body,
                                });
                            }
                        }
                    }
                }
                tx.commit()?;
                Ok(out)
            })
            .await
            .map_err(unavailable)
    }

    async fn set_visible(&self, receipt: &Receipt, after: Duration) -> Result<(), QueueError> {
        let (id, n) = parse_receipt(receipt)?;
        let at = self.clock.now().0.saturating_add(ms(after));
        let changed = self
            .db
            .run(move |c| {
                Ok(c.prepare_cached("UPDATE jobs SET visible_at = ?3 WHERE id = ?1 AND receive_count = ?2")?
                    .execute(params![id, n, at])?)
            })
            .await
            .map_err(unavailable)?;
        if changed == 1 { Ok(()) } else { Err(QueueError::StaleReceipt) }
    }
}

#[async_trait]
impl JobQueue for SqliteQueue {
    async fn send(&self, body: &str, delay: Duration) -> Result<String, QueueError> {
        if body.len() > MAX_JOB_BYTES {
            return Err(QueueError::TooLarge(body.len()));
        }
        let now = self.clock.now().0;
        let visible_at = now.saturating_add(ms(delay));
        let body = body.to_owned();
        let id = self
            .db
            .run(move |c| {
                c.prepare_cached("INSERT INTO jobs (body, sent_at, visible_at) VALUES (?1, ?2, ?3)")?
                    .execute(params![body, now, visible_at])?;
                Ok(c.last_insert_rowid())
            })
            .await
            .map_err(unavailable)?;
        self.notify.notify_waiters();
        Ok(id.to_string())
    }

    async fn receive(&self, max: u32, visibility: Duration, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let max = max.clamp(1, 10);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            let got = self.try_receive(max, visibility).await?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(got);
            }
            let nap = POLL_INTERVAL.min(deadline - now);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> Result<(), QueueError> {
        self.set_visible(receipt, visibility).await
    }

    async fn ack(&self, receipt: &Receipt) -> Result<(), QueueError> {
        let (id, n) = parse_receipt(receipt)?;
        self.db
            .run(move |c| {
                let tx = c.transaction()?;
                let deleted = tx.execute("DELETE FROM jobs WHERE id = ?1 AND receive_count = ?2", params![id, n])?;
                let still_there: i64 = tx.query_row("SELECT count(*) FROM jobs WHERE id = ?1", [id], |r| r.get(0))?;
                tx.commit()?;
                Ok(deleted == 1 || still_there == 0)
            })
            .await
            .map_err(unavailable)?
            .then_some(())
            .ok_or(QueueError::StaleReceipt)
    }

    async fn release(&self, receipt: &Receipt, delay: Duration) -> Result<(), QueueError> {
        self.set_visible(receipt, delay).await?;
        if delay.is_zero() {
            self.notify.notify_waiters();
        }
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let now = self.clock.now().0;
        self.db
            .run(move |c| {
                Ok(c.query_row(
                    "SELECT \
                       (SELECT count(*) FROM jobs WHERE visible_at <= ?1 AND receive_count = 0) + \
                       (SELECT count(*) FROM jobs WHERE visible_at <= ?1 AND receive_count > 0), \
                       (SELECT count(*) FROM jobs WHERE visible_at > ?1 AND receive_count > 0), \
                       (SELECT count(*) FROM jobs WHERE visible_at > ?1 AND receive_count = 0), \
                       (SELECT count(*) FROM dead_jobs)",
                    [now],
                    |r| {
                        Ok(QueueDepth {
                            visible: r.get::<_, i64>(0)? as u64,
                            in_flight: r.get::<_, i64>(1)? as u64,
                            delayed: r.get::<_, i64>(2)? as u64,
                            dead: r.get::<_, i64>(3)? as u64,
                        })
                    },
                )?)
            })
            .await
            .map_err(unavailable)
    }
}
