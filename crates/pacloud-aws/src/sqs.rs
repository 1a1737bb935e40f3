//! The job queue on SQS. Visibility and delays are whole seconds (rounded
//! up); a long poll waits at most 20 s (SQS's limit); the receive count is
//! SQS's ApproximateReceiveCount; dead-lettering is the queue's redrive
//! policy, so this adapter never moves messages itself. With a nudger, a
//! job sent without delay is followed by a nudge to the fleet scaler.

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use pacloud_domain::ports::{Delivery, JobQueue, MAX_JOB_BYTES, QueueDepth, QueueError, Receipt};
use std::time::Duration;

use crate::boxed;

/// The job queue port on SQS.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
    dlq_url: Option<String>,
    nudger: Option<crate::nudge::Nudger>,
}

/// Whole seconds, rounded up, within SQS's limits.
fn secs(d: Duration, max: i32) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(max).min(max)
}

impl SqsQueue {
    pub fn new(client: aws_sdk_sqs::Client, url: String, dlq_url: Option<String>) -> Self {
        SqsQueue { client, url, dlq_url, nudger: None }
    }

    /// Nudges the fleet scaler after every job sent without a delay (a
    /// delayed one is a backoff: the schedule finds it when it is visible).
    pub fn with_nudger(mut self, nudger: Option<crate::nudge::Nudger>) -> Self {
        self.nudger = nudger;
        self
    }

    /// The queue's redrive `maxReceiveCount`, if it has a redrive policy.
    pub async fn max_receive_count(&self) -> Result<Option<u32>, QueueError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| QueueError::Unavailable(boxed(e)))?;
        let policy = out.attributes.unwrap_or_default().get(&QueueAttributeName::RedrivePolicy).cloned();
        Ok(policy
            .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
            .and_then(|v| match &v["maxReceiveCount"] {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => s.parse().ok(),
                _ => None,
            })
            .and_then(|n| u32::try_from(n).ok()))
    }

    async fn counts(&self, url: &str) -> Result<(u64, u64, u64), QueueError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| QueueError::Unavailable(boxed(e)))?;
        let attrs = out.attributes.unwrap_or_default();
        let n = |k: QueueAttributeName| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok((
            n(QueueAttributeName::ApproximateNumberOfMessages),
            n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            n(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        ))
    }

    async fn change_visibility(&self, receipt: &Receipt, d: Duration) -> Result<(), QueueError> {
        let r = self
            .client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(&receipt.0)
            .visibility_timeout(secs(d, 43_200))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_receipt_handle_is_invalid() || s.is_message_not_inflight()) =>
            {
                Err(QueueError::StaleReceipt)
            }
            Err(e) => Err(QueueError::Unavailable(boxed(e))),
        }
    }
}

#[async_trait]
impl JobQueue for SqsQueue {
    async fn send(&self, body: &str, delay: Duration) -> Result<String, QueueError> {
        if body.len() > MAX_JOB_BYTES {
            return Err(QueueError::TooLarge(body.len()));
        }
        let out = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .delay_seconds(secs(delay, 900))
            .send()
            .await
            .map_err(|e| QueueError::Unavailable(boxed(e)))?;
        if let Some(n) = self.nudger.as_ref().filter(|_| delay.is_zero()) {
            n.send_or_log(crate::nudge::NudgeKind::Enqueued, None).await;
        }
        Ok(out.message_id.unwrap_or_default())
    }

    async fn receive(&self, max: u32, visibility: Duration, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(1))
            .visibility_timeout(secs(visibility, 43_200))
            .wait_time_seconds(secs(wait, 20))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| QueueError::Unavailable(boxed(e)))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let count = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                Some(Delivery {
                    message_id: m.message_id.unwrap_or_default(),
                    receipt: Receipt(m.receipt_handle?),
                    receive_count: count,
                    body: m.body.unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> Result<(), QueueError> {
        self.change_visibility(receipt, visibility).await
    }

    async fn ack(&self, receipt: &Receipt) -> Result<(), QueueError> {
        let r = self.client.delete_message().queue_url(&self.url).receipt_handle(&receipt.0).send().await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_receipt_handle_is_invalid()) => {
                Err(QueueError::StaleReceipt)
            }
            Err(e) => Err(QueueError::Unavailable(boxed(e))),
        }
    }

    async fn release(&self, receipt: &Receipt, delay: Duration) -> Result<(), QueueError> {
        self.change_visibility(receipt, delay).await
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let (visible, in_flight, delayed) = self.counts(&self.url).await?;
        let dead = match &self.dlq_url {
            Some(u) => {
                let (v, f, d) = self.counts(u).await?;
                v + f + d
            }
            None => 0,
        };
        Ok(QueueDepth { visible, in_flight, delayed, dead })
    }
}
