//! The fleet scaler: one tick = read a snapshot per CPU family (SQS depth,
//! the family's worker instances and `maintain` fleet found by tag, 24 hours
//! of spot prices, the fleet's recent capacity errors), run
//! [`pacloud_fleet::PacloudPolicy`] — the same code the simulator runs — and
//! apply its actions (the target with ModifyFleet, the price caps as the
//! fleet overrides' spot `MaxPrice` with ModifyFleet, idle workers with
//! TerminateInstances).
//!
//! Safety rules (bad input, missing fleet, API errors): an unrecognised or
//! malformed event is logged and answered without acting; a family whose
//! snapshot cannot be read is skipped; a family without a fleet is logged;
//! terminations happen only after the family's ModifyFleet (if any)
//! succeeded, and only for instances a fresh read still shows idle (or
//! still pending, for a boot timeout). Everything the tick leaves undone,
//! the next tick (one minute later) redoes: the actions are idempotent.

use std::collections::BTreeMap;

use pacloud_aws::fleet::{FleetClient, FleetError, WorkerFleet};
use pacloud_aws::nudge::{self, NudgeKind};
use pacloud_fleet::{
    Action, CpuFamily, FamilySnapshot, InstanceState, PacloudPolicy, Policy, Secs, Snapshot, TerminateReason,
};
use serde_json::Value;

/// The scaler's settings (environment variables in the Lambda).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The job queue every family reads (PACLOUD_QUEUE_URL).
    pub queue_url: String,
    /// Per-family queues, when families have their own (PACLOUD_FLEET_QUEUES=`x86-64=url,arm64=url`).
    pub family_queues: BTreeMap<CpuFamily, String>,
    pub policy: PacloudPolicy,
    /// The artifact bucket (PACLOUD_BUCKET, optional): its `stats/all.json`,
    /// the workers' build history, gives each family's `median_build_s`.
    /// Without it the policy runs without history.
    pub bucket: Option<String>,
}

/// A setting that is missing or wrong.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{name}: {detail}")]
    Invalid { name: &'static str, detail: String },
}

impl Settings {
    /// From a variable lookup (the environment in the Lambda).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let queue_url =
            get("PACLOUD_QUEUE_URL").filter(|v| !v.is_empty()).ok_or(SettingsError::Missing("PACLOUD_QUEUE_URL"))?;
        let mut family_queues = BTreeMap::new();
        for pair in get("PACLOUD_FLEET_QUEUES").unwrap_or_default().split(',').filter(|p| !p.trim().is_empty()) {
            let (f, url) = pair.split_once('=').ok_or_else(|| SettingsError::Invalid {
                name: "PACLOUD_FLEET_QUEUES",
                detail: format!("{pair:?} is not family=url"),
            })?;
            let family: CpuFamily = f.trim().parse().map_err(|e: pacloud_fleet::families::UnknownFamily| {
                SettingsError::Invalid { name: "PACLOUD_FLEET_QUEUES", detail: e.to_string() }
            })?;
            family_queues.insert(family, url.trim().to_owned());
        }
        let config = match get("PACLOUD_FLEET_CONFIG").filter(|v| !v.trim().is_empty()) {
            None => pacloud_fleet::Config::default(),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| SettingsError::Invalid { name: "PACLOUD_FLEET_CONFIG", detail: e.to_string() })?,
        };
        let policy = PacloudPolicy::new(config)
            .map_err(|e| SettingsError::Invalid { name: "PACLOUD_FLEET_CONFIG", detail: e.to_string() })?;
        let bucket = get("PACLOUD_BUCKET").map(|b| b.trim().to_owned()).filter(|b| !b.is_empty());
        Ok(Settings { queue_url, family_queues, policy, bucket })
    }

    fn queue_for(&self, f: CpuFamily) -> &str {
        self.family_queues.get(&f).map_or(self.queue_url.as_str(), String::as_str)
    }
}

/// What invoked the scaler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The EventBridge schedule (every minute).
    Schedule,
    /// A batch from the fleet events queue: the EC2 events it held, the
    /// pacloud nudges (a job made visible, a worker idle past the idle
    /// timeout: `pacloud_aws::nudge`), and how many records were malformed
    /// (logged, dropped: the tick that follows reads the real state anyway).
    FleetEvents { events: Vec<FleetEvent>, nudges: Vec<NudgeKind>, malformed: usize },
}

/// An EC2 event from EventBridge (via the fleet events queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEvent {
    pub kind: FleetEventKind,
    pub instance_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEventKind {
    /// "EC2 Spot Instance Interruption Warning" with its `instance-action`.
    Interruption { action: String },
    /// "EC2 Instance Rebalance Recommendation".
    Rebalance,
    /// "EC2 Instance State-change Notification" with the new state.
    StateChange { state: String },
}

/// An invocation the scaler does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unrecognised event: {0}")]
pub struct EventError(pub String);

/// Classifies an invocation payload.
pub fn parse_trigger(v: &Value) -> Result<Trigger, EventError> {
    if let Some(records) = v.get("Records").and_then(Value::as_array) {
        let mut events = Vec::new();
        let mut nudges = Vec::new();
        let mut malformed = 0;
        for r in records {
            if r.get("eventSource").and_then(Value::as_str) != Some("aws:sqs") {
                return Err(EventError("a Records batch that is not from SQS".into()));
            }
            match r.get("body").and_then(Value::as_str).map(serde_json::from_str::<Value>) {
                Some(Ok(body)) if body.get("source").and_then(Value::as_str) == Some(nudge::SOURCE) => {
                    match body.get("detail-type").and_then(Value::as_str).and_then(NudgeKind::from_detail_type) {
                        Some(k) => nudges.push(k),
                        None => {
                            tracing::warn!(message_id = ?r.get("messageId"), "pacloud nudge of an unknown kind dropped");
                            malformed += 1;
                        }
                    }
                }
                Some(Ok(body)) => match parse_ec2_event(&body) {
                    Ok(e) => events.push(e),
                    Err(e) => {
                        tracing::warn!(error = %e, message_id = ?r.get("messageId"), "fleet event dropped");
                        malformed += 1;
                    }
                },
                _ => {
                    tracing::warn!(message_id = ?r.get("messageId"), "fleet event record without a JSON body: dropped");
                    malformed += 1;
                }
            }
        }
        return Ok(Trigger::FleetEvents { events, nudges, malformed });
    }
    match (v.get("source").and_then(Value::as_str), v.get("detail-type").and_then(Value::as_str)) {
        (Some("aws.events"), Some("Scheduled Event")) => Ok(Trigger::Schedule),
        (s, d) => Err(EventError(format!("source {s:?}, detail-type {d:?}"))),
    }
}

/// One EventBridge EC2 event.
pub fn parse_ec2_event(v: &Value) -> Result<FleetEvent, EventError> {
    if v.get("source").and_then(Value::as_str) != Some("aws.ec2") {
        return Err(EventError(format!("source {:?} is not aws.ec2", v.get("source"))));
    }
    let detail = v.get("detail").ok_or_else(|| EventError("no detail".into()))?;
    let id = detail
        .get("instance-id")
        .and_then(Value::as_str)
        .filter(|s| s.starts_with("i-"))
        .ok_or_else(|| EventError("detail.instance-id missing or not an instance id".into()))?
        .to_owned();
    let field = |k: &str| {
        detail
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| EventError(format!("detail.{k} missing")))
    };
    let kind = match v.get("detail-type").and_then(Value::as_str) {
        Some("EC2 Spot Instance Interruption Warning") => {
            FleetEventKind::Interruption { action: field("instance-action")? }
        }
        Some("EC2 Instance Rebalance Recommendation") => FleetEventKind::Rebalance,
        Some("EC2 Instance State-change Notification") => FleetEventKind::StateChange { state: field("state")? },
        other => return Err(EventError(format!("detail-type {other:?}"))),
    };
    Ok(FleetEvent { kind, instance_id: id })
}

/// What one tick did, per family (logged and returned by the Lambda).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TickReport {
    pub families: Vec<FamilyReport>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FamilyReport {
    pub family: String,
    pub fleet_id: Option<String>,
    pub actions: Vec<Action>,
    /// Instances actually terminated (after the re-check).
    pub terminated: Vec<String>,
    /// What could not be done, with context; the next tick retries.
    pub errors: Vec<String>,
}

/// The workers' build history as one tick reads it (once, for every family).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildHistoryRead {
    /// The median over all atoms, once there are enough builds.
    pub median_build_s: Option<u64>,
    /// Why there is no median although a bucket is set (the report's warning).
    pub warning: Option<String>,
}

/// Reads `stats/all.json` of the bucket in `settings` (nothing without one).
pub async fn read_build_history(client: &FleetClient, settings: &Settings) -> BuildHistoryRead {
    use pacloud_domain::stats::{ALL_PATH, BuildTimes};
    let Some(bucket) = &settings.bucket else { return BuildHistoryRead::default() };
    let failed = |what: &str, e: &dyn std::fmt::Display| BuildHistoryRead {
        median_build_s: None,
        warning: Some(format!("build history s3://{bucket}/{ALL_PATH} {what}, no median this tick: {e}")),
    };
    match client.get_object(bucket, ALL_PATH).await {
        Ok(Some(bytes)) => match BuildTimes::decode(&bytes) {
            Ok(t) => BuildHistoryRead { median_build_s: t.fleet_median_s(), warning: None },
            Err(e) => failed("unreadable", &e),
        },
        Ok(None) => BuildHistoryRead::default(),
        Err(e) => failed("unavailable", &e),
    }
}

/// Reads the snapshot of one family's fleet (`history` from [`read_build_history`]).
pub async fn family_snapshot(
    client: &FleetClient,
    settings: &Settings,
    fleet: &WorkerFleet,
    history: &BuildHistoryRead,
    now: Secs,
) -> Result<(FamilySnapshot, Vec<String>), FleetError> {
    let mut warnings = Vec::new();
    let mut f = pacloud_fleet::policy::empty_family(fleet.family);
    f.fleet = fleet.target;
    f.queue = client.queue_depth(settings.queue_for(fleet.family)).await?;
    f.instances = client.worker_instances(fleet.family).await?;
    f.spot_max_prices = fleet.spot_max_prices();
    match client.spot_prices(&f.instance_types, now.saturating_sub(24 * 3600)).await {
        Ok(p) => f.spot_prices = p,
        Err(e) => warnings.push(format!("spot prices unavailable, no price cap this tick: {e}")),
    }
    match client.capacity_errors(&fleet.fleet_id, now.saturating_sub(900), &f.instance_types).await {
        Ok(e) => f.capacity_errors = e,
        Err(e) => warnings.push(format!("fleet history unavailable, no capacity errors this tick: {e}")),
    }
    f.median_build_s = history.median_build_s;
    warnings.extend(history.warning.clone());
    Ok((f, warnings))
}

/// One tick over every worker fleet.
pub async fn tick(client: &FleetClient, settings: &Settings, now: Secs) -> Result<TickReport, FleetError> {
    let fleets = client.worker_fleets().await?;
    let mut report = TickReport::default();
    let mut seen = BTreeMap::new();
    let history = read_build_history(client, settings).await;
    for fleet in &fleets {
        if let Some(first) = seen.insert(fleet.family, fleet.fleet_id.clone()) {
            tracing::warn!(family = %fleet.family, first, second = fleet.fleet_id, "two worker fleets for one family: the second is left alone");
            seen.insert(fleet.family, first);
            continue;
        }
        report.families.push(scale_family(client, settings, fleet, &history, now).await);
    }
    for family in CpuFamily::ALL {
        if !seen.contains_key(&family) && settings.family_queues.contains_key(&family) {
            tracing::warn!(%family, "no worker fleet tagged {}=worker, {}={family}: nothing to scale", pacloud_aws::fleet::TAG_ROLE, pacloud_aws::fleet::TAG_FAMILY);
            report.families.push(FamilyReport {
                family: family.to_string(),
                errors: vec!["no worker fleet".into()],
                ..FamilyReport::default()
            });
        }
    }
    if fleets.is_empty() {
        tracing::warn!("no worker fleet found (tag {}=worker): nothing to scale", pacloud_aws::fleet::TAG_ROLE);
    }
    Ok(report)
}

async fn scale_family(
    client: &FleetClient,
    settings: &Settings,
    fleet: &WorkerFleet,
    history: &BuildHistoryRead,
    now: Secs,
) -> FamilyReport {
    let mut r = FamilyReport {
        family: fleet.family.to_string(),
        fleet_id: Some(fleet.fleet_id.clone()),
        ..FamilyReport::default()
    };
    let (snap, warnings) = match family_snapshot(client, settings, fleet, history, now).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(family = %fleet.family, fleet = fleet.fleet_id, error = %e, "snapshot failed: no action this tick");
            r.errors.push(format!("snapshot: {e}"));
            return r;
        }
    };
    for w in warnings {
        tracing::warn!(family = %fleet.family, "{w}");
        r.errors.push(w);
    }
    let actions = settings.policy.decide(&Snapshot { now, families: vec![snap] });
    tracing::info!(family = %fleet.family, actions = %serde_json::to_string(&actions).unwrap_or_default(), "decided");
    r.actions = actions.clone();

    // The target first: a maintain fleet replaces terminated instances while its target is higher.
    let mut target_ok = true;
    for a in &actions {
        if let Action::SetTargetCapacity { total, on_demand, .. } = a
            && let Err(e) = client.set_target(&fleet.fleet_id, *total, *on_demand).await
        {
            tracing::error!(fleet = fleet.fleet_id, error = %e, "ModifyFleet failed: no termination this tick");
            r.errors.push(format!("set target {total} ({on_demand} on-demand): {e}"));
            target_ok = false;
        }
    }
    for a in &actions {
        match a {
            Action::Terminate { instance_ids, reason, .. } if target_ok => {
                let want = match reason {
                    TerminateReason::Idle => InstanceState::Running,
                    TerminateReason::BootTimeout => InstanceState::Pending,
                };
                match client.terminate_checked(fleet.family, instance_ids, want).await {
                    Ok(done) => r.terminated.extend(done),
                    Err(e) => {
                        tracing::error!(error = %e, "terminate failed");
                        r.errors.push(format!("terminate {instance_ids:?}: {e}"));
                    }
                }
            }
            // The price cap, enforced: each override's spot MaxPrice. A failure here does not
            // block terminations (it does not touch the target); the next tick retries.
            Action::SetSpotMaxPrices { prices, .. } => {
                match pacloud_aws::fleet::launch_configs_with_max_prices(&fleet.launch_configs, prices) {
                    Ok(Some(configs)) => {
                        if let Err(e) = client.set_launch_configs(&fleet.fleet_id, configs).await {
                            tracing::error!(fleet = fleet.fleet_id, error = %e, "ModifyFleet (spot max prices) failed");
                            r.errors.push(format!("set spot max prices: {e}"));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(fleet = fleet.fleet_id, error = %e, "spot price cap not enforced");
                        r.errors.push(e.to_string());
                    }
                }
            }
            Action::OnDemandFallback { count, reason, .. } => {
                tracing::warn!(family = %fleet.family, count, ?reason, "spot cannot supply: asking on-demand")
            }
            Action::MarkUnavailable { instance_type, zone, until, reason, .. } => {
                tracing::info!(family = %fleet.family, instance_type, zone, until, ?reason, "offering unavailable")
            }
            _ => {}
        }
    }
    r
}

/// Handles one invocation: any recognised trigger runs one tick.
pub async fn handle(client: &FleetClient, settings: &Settings, event: &Value, now: Secs) -> Value {
    let trigger = match parse_trigger(event) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "ignored invocation: no action");
            return serde_json::json!({ "ignored": e.to_string() });
        }
    };
    if let Trigger::FleetEvents { events, nudges, malformed } = &trigger {
        for e in events {
            tracing::info!(instance = e.instance_id, kind = ?e.kind, "fleet event");
        }
        if !nudges.is_empty() {
            tracing::info!(?nudges, "nudged");
        }
        if *malformed > 0 {
            tracing::warn!(malformed, "malformed fleet events dropped");
        }
    }
    let report = match tick(client, settings, now).await {
        Ok(r) => serde_json::to_value(r).unwrap_or(Value::Null),
        Err(e) => {
            tracing::error!(error = %e, "tick failed: no action, the next tick retries");
            serde_json::json!({ "error": e.to_string() })
        }
    };
    match trigger {
        // Events are never retried: the next tick reads the real state anyway.
        Trigger::FleetEvents { .. } => serde_json::json!({ "batchItemFailures": [], "report": report }),
        Trigger::Schedule => report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schedule_and_fleet_events_are_recognised() {
        let s = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
        assert_eq!(parse_trigger(&s).unwrap(), Trigger::Schedule);
        let warn = json!({"source": "aws.ec2", "detail-type": "EC2 Spot Instance Interruption Warning",
            "detail": {"instance-id": "i-0abc", "instance-action": "hibernate"}});
        let state = json!({"source": "aws.ec2", "detail-type": "EC2 Instance State-change Notification",
            "detail": {"instance-id": "i-0abd", "state": "stopped"}});
        let batch = json!({"Records": [
            {"eventSource": "aws:sqs", "messageId": "1", "body": warn.to_string()},
            {"eventSource": "aws:sqs", "messageId": "2", "body": state.to_string()},
            {"eventSource": "aws:sqs", "messageId": "3", "body": "{not json"},
            {"eventSource": "aws:sqs", "messageId": "4", "body": json!({"source": "aws.ec2", "detail-type": "EC2 Spot Instance Interruption Warning", "detail": {"instance-id": "i-1"}}).to_string()},
            {"eventSource": "aws:sqs", "messageId": "5", "body": nudge::body(NudgeKind::Enqueued, None)},
            {"eventSource": "aws:sqs", "messageId": "6", "body": nudge::body(NudgeKind::WorkerIdle, Some("i-0abe"))},
            {"eventSource": "aws:sqs", "messageId": "7", "body": json!({"source": "pacloud", "detail-type": "Coffee Ready"}).to_string()},
        ]});
        let Trigger::FleetEvents { events, nudges, malformed } = parse_trigger(&batch).unwrap() else { panic!() };
        assert_eq!(malformed, 3);
        assert_eq!(nudges, vec![NudgeKind::Enqueued, NudgeKind::WorkerIdle]);
        assert_eq!(
            events,
            vec![
                FleetEvent {
                    kind: FleetEventKind::Interruption { action: "hibernate".into() },
                    instance_id: "i-0abc".into()
                },
                FleetEvent {
                    kind: FleetEventKind::StateChange { state: "stopped".into() },
                    instance_id: "i-0abd".into()
                },
            ]
        );
    }

    #[test]
    fn the_workers_idle_nudge_waits_the_policys_idle_timeout() {
        assert_eq!(nudge::IDLE_AFTER.as_secs(), pacloud_fleet::Config::default().idle_timeout_s);
    }

    #[test]
    fn unrecognised_invocations_are_named() {
        for (v, needle) in [
            (json!({}), "source None"),
            (json!({"source": "aws.s3", "detail-type": "Object Created"}), "aws.s3"),
            (json!({"Records": [{"eventSource": "aws:sns"}]}), "not from SQS"),
        ] {
            let e = parse_trigger(&v).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        let e = parse_ec2_event(&json!({"source": "aws.ec2", "detail-type": "EC2 Instance Rebalance Recommendation", "detail": {"instance-id": "x"}})).unwrap_err();
        assert!(e.to_string().contains("instance-id"));
    }

    #[test]
    fn settings_name_what_is_wrong() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert!(matches!(Settings::from_lookup(env(&[])), Err(SettingsError::Missing("PACLOUD_QUEUE_URL"))));
        let e =
            Settings::from_lookup(env(&[("PACLOUD_QUEUE_URL", "q"), ("PACLOUD_FLEET_QUEUES", "riscv=u")])).unwrap_err();
        assert!(e.to_string().contains("PACLOUD_FLEET_QUEUES") && e.to_string().contains("riscv"));
        let e = Settings::from_lookup(env(&[
            ("PACLOUD_QUEUE_URL", "q"),
            ("PACLOUD_FLEET_CONFIG", r#"{"max_price_multiplier": 0.5}"#),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("max_price_multiplier"));
        let e = Settings::from_lookup(env(&[("PACLOUD_QUEUE_URL", "q"), ("PACLOUD_FLEET_CONFIG", r#"{"idle": 1}"#)]))
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"));
        let s = Settings::from_lookup(env(&[
            ("PACLOUD_QUEUE_URL", "q"),
            ("PACLOUD_FLEET_QUEUES", "arm64=a, x86-64=b"),
            ("PACLOUD_FLEET_CONFIG", r#"{"max_instances": 8}"#),
        ]))
        .unwrap();
        assert_eq!(s.queue_for(CpuFamily::Arm64), "a");
        assert_eq!(s.queue_for(CpuFamily::X86_64V3), "q");
        assert_eq!(s.policy.config.max_instances, 8);
        assert_eq!(s.bucket, None, "no bucket: no build history");
        let s = Settings::from_lookup(env(&[("PACLOUD_QUEUE_URL", "q"), ("PACLOUD_BUCKET", "artifacts")])).unwrap();
        assert_eq!(s.bucket.as_deref(), Some("artifacts"));
        let s = Settings::from_lookup(env(&[("PACLOUD_QUEUE_URL", "q"), ("PACLOUD_BUCKET", " ")])).unwrap();
        assert_eq!(s.bucket, None);
    }
}
