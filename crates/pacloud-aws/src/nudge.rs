//! Nudges to the fleet scaler: a small message on the fleet events queue
//! (the scaler Lambda's SQS event source, beside the EC2 events) that makes
//! the scaler run one tick now instead of at the next minute.
//!
//! Two senders: the job queue adapter ([`crate::SqsQueue`] with a nudger)
//! after it made a job visible, so a cold build waits one boot and not a
//! tick plus a boot; and the AWS worker when it has been idle past the idle
//! timeout ([`run_idle_nudger`]), so an idle instance is terminated within
//! seconds instead of up to a minute later. A nudge carries no decision:
//! the tick reads the real state (queue, instances, tags) as on the
//! schedule. A failed nudge is logged and dropped: the schedule catches up
//! within a minute.

use std::time::Duration;

use serde_json::json;

use crate::fleet::WorkerState;

/// The `source` of a nudge's body (EC2 events have `aws.ec2`).
pub const SOURCE: &str = "pacloud";

/// Why the scaler is nudged (the body's `detail-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NudgeKind {
    /// A job became visible in the job queue.
    Enqueued,
    /// A worker has been idle past the idle timeout.
    WorkerIdle,
}

impl NudgeKind {
    /// The body's `detail-type`.
    pub fn detail_type(self) -> &'static str {
        match self {
            NudgeKind::Enqueued => "Build Enqueued",
            NudgeKind::WorkerIdle => "Worker Idle",
        }
    }

    /// The kind named by a `detail-type`, if it is one.
    pub fn from_detail_type(s: &str) -> Option<NudgeKind> {
        [NudgeKind::Enqueued, NudgeKind::WorkerIdle].into_iter().find(|k| k.detail_type() == s)
    }
}

/// The message body of a nudge (EventBridge-shaped, like the EC2 events on
/// the same queue): `{"source":"pacloud","detail-type":…,"detail":{…}}`.
pub fn body(kind: NudgeKind, instance_id: Option<&str>) -> String {
    let detail = match instance_id {
        Some(id) => json!({ "instance-id": id }),
        None => json!({}),
    };
    json!({ "source": SOURCE, "detail-type": kind.detail_type(), "detail": detail }).to_string()
}

/// A nudge could not be sent.
#[derive(Debug, thiserror::Error)]
#[error("nudge to {url}: {source}")]
pub struct NudgeError {
    url: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Sends nudges to the fleet events queue.
#[derive(Debug, Clone)]
pub struct Nudger {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl Nudger {
    pub fn new(client: aws_sdk_sqs::Client, url: String) -> Self {
        Nudger { client, url }
    }

    /// One nudge.
    pub async fn send(&self, kind: NudgeKind, instance_id: Option<&str>) -> Result<(), NudgeError> {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body(kind, instance_id))
            .send()
            .await
            .map_err(|e| NudgeError { url: self.url.clone(), source: crate::boxed_sdk(e) })?;
        Ok(())
    }

    /// One nudge; a failure is logged and dropped (the schedule catches up).
    pub async fn send_or_log(&self, kind: NudgeKind, instance_id: Option<&str>) {
        match self.send(kind, instance_id).await {
            Ok(()) => tracing::debug!(?kind, "scaler nudged"),
            Err(e) => tracing::warn!(error = %e, ?kind, "scaler not nudged; its schedule catches up within a minute"),
        }
    }
}

/// How long a worker is idle before it nudges the scaler: the fleet policy's
/// default idle timeout (`pacloud_fleet::Config::idle_timeout_s`, 10 s; the
/// scaler's tests check the two agree), which is twice the tagger's 5 s
/// coalescing, so the scaler reads the idle tag when the nudge arrives.
pub const IDLE_AFTER: Duration = Duration::from_secs(10);

/// Whether `state` is an idle period that deserves a nudge once it has
/// lasted `idle_after` (pure; the loop below waits for it).
pub fn idle_period(state: WorkerState) -> Option<u64> {
    (!state.busy).then_some(state.since)
}

/// Nudges the scaler once per idle period of this worker, when the period
/// has lasted `idle_after` (the policy's idle timeout: the scaler then finds
/// the instance idle past it and, unless the queue needs it, terminates it).
/// A period that ends before (a job arrived) sends nothing. Returns when
/// `stop` is cancelled or the sender is gone.
pub async fn run_idle_nudger(
    nudger: Nudger,
    instance_id: String,
    mut state: tokio::sync::watch::Receiver<WorkerState>,
    idle_after: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut nudged: Option<u64> = None;
    loop {
        let current = *state.borrow_and_update();
        if let Some(since) = idle_period(current).filter(|s| nudged != Some(*s)) {
            tokio::select! {
                _ = tokio::time::sleep(idle_after) => {
                    if idle_period(*state.borrow()) == Some(since) {
                        nudger.send_or_log(NudgeKind::WorkerIdle, Some(&instance_id)).await;
                        nudged = Some(since);
                    }
                    continue;
                }
                changed = state.changed() => if changed.is_err() { return } else { continue },
                _ = stop.cancelled() => return,
            }
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_name_the_source_and_the_kind() {
        let v: serde_json::Value = serde_json::from_str(&body(NudgeKind::WorkerIdle, Some("i-0abc"))).unwrap();
        assert_eq!(v["source"], SOURCE);
        assert_eq!(v["detail-type"], "Worker Idle");
        assert_eq!(v["detail"]["instance-id"], "i-0abc");
        let v: serde_json::Value = serde_json::from_str(&body(NudgeKind::Enqueued, None)).unwrap();
        assert_eq!(NudgeKind::from_detail_type(v["detail-type"].as_str().unwrap()), Some(NudgeKind::Enqueued));
        assert_eq!(NudgeKind::from_detail_type("EC2 Instance Rebalance Recommendation"), None);
    }

    #[test]
    fn only_idle_states_open_a_period() {
        assert_eq!(idle_period(WorkerState { busy: false, since: 7, expected_end: None }), Some(7));
        assert_eq!(idle_period(WorkerState { busy: true, since: 7, expected_end: None }), None);
    }
}
