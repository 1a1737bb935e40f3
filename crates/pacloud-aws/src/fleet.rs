//! The scaler's AWS side: builds a [`pacloud_fleet::FamilySnapshot`] from
//! SQS and EC2, and applies the policy's actions with ModifyFleet and
//! TerminateInstances.
//!
//! Fleets and instances are found by tag, never by CloudFormation
//! reference: `pacloud:role=worker` and `pacloud:cpu-family=<family>`. The
//! worker reports what it does in two tags of its own instance (the contract
//! with the worker): `pacloud:activity` = `idle:<unix>`, `busy:<unix>` or
//! `busy:<unix>:<expected end unix>`, and `pacloud:lease` = `1` while it holds
//! a build lease (`0` otherwise). An instance without the tag is
//! `Activity::Unknown`: the policy never terminates it as idle. The worker
//! side is [`run_activity_tagger`] (the AWS worker runs it with the
//! instance id from IMDS).
//!
//! Throttling and transient errors are retried by the SDK's standard retry
//! policy with bounded exponential backoff ([`retry_policy`]: 4 attempts,
//! 200 ms initial, 5 s cap); what still fails is returned as a [`FleetError`]
//! and the scaler's next tick (one minute later) starts over.

use std::time::Duration;

use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfig, FleetLaunchTemplateConfigRequest,
    FleetLaunchTemplateOverridesRequest, FleetLaunchTemplateSpecificationRequest, InstanceLifecycleType,
    InstanceRequirements, InstanceRequirementsRequest, InstanceStateName, InstanceType, MemoryMiBRequest,
    TargetCapacitySpecificationRequest, VCpuCountRangeRequest,
};
use pacloud_fleet::{
    Activity, CapacityError, CapacityType, CpuFamily, FleetTarget, Instance, InstanceState, PricePoint, QueueDepth,
    Secs, TypePrice,
};

use crate::AwsConfig;

/// Tag keys shared with the infra template and the worker.
pub const TAG_ROLE: &str = "pacloud:role";
pub const TAG_FAMILY: &str = "pacloud:cpu-family";
pub const TAG_ACTIVITY: &str = "pacloud:activity";
pub const TAG_LEASE: &str = "pacloud:lease";

/// A call that failed after the SDK's retries.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{op} failed: {source}")]
    Api { op: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{op}: unexpected answer: {detail}")]
    Unexpected { op: &'static str, detail: String },
}

fn api<E: std::error::Error + Send + Sync + 'static>(op: &'static str) -> impl FnOnce(E) -> FleetError {
    move |e| FleetError::Api { op, source: Box::new(e) }
}

/// The scaler's retry policy: standard mode, 4 attempts, backoff from 200 ms up to 5 s.
pub fn retry_policy() -> aws_config::retry::RetryConfig {
    aws_config::retry::RetryConfig::standard()
        .with_max_attempts(4)
        .with_initial_backoff(Duration::from_millis(200))
        .with_max_backoff(Duration::from_secs(5))
}

/// A worker fleet found by its tags.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerFleet {
    pub fleet_id: String,
    pub family: CpuFamily,
    pub target: FleetTarget,
    /// Its launch template configurations as DescribeFleets returned them
    /// (the spot max prices live in their overrides).
    pub launch_configs: Vec<FleetLaunchTemplateConfig>,
}

impl WorkerFleet {
    /// The spot max price of every override that names an instance type.
    pub fn spot_max_prices(&self) -> Vec<TypePrice> {
        self.launch_configs
            .iter()
            .flat_map(|c| c.overrides())
            .filter_map(|o| {
                Some(TypePrice {
                    instance_type: o.instance_type()?.as_str().to_owned(),
                    usd_per_hour: o.max_price()?.parse().ok()?,
                })
            })
            .collect()
    }
}

/// Why the fleet's launch configuration cannot carry a price cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the fleet's launch configuration cannot be rewritten with max prices: {0}")]
pub struct NotRewritable(pub String);

/// The ModifyFleet launch template configurations that enforce `prices`
/// (spot max price per type), or `Ok(None)` when every override already
/// holds its price within `pacloud_fleet::policy::MAX_PRICE_TOLERANCE`.
/// ModifyFleet replaces the configurations whole, so each override is
/// carried over (subnet, zone, type, weight, priority, image, attribute-based
/// requirements) with its `MaxPrice` set: an override naming an instance type
/// gets that type's cap; an attribute-based one (`InstanceRequirements`, the
/// infra template's) gets the highest cap of the family's types, the one
/// price it can hold. A configuration without overrides gets one override
/// per priced type. A field this function does not carry over (placement,
/// block devices, accelerators, ...) makes it refuse ([`NotRewritable`]):
/// the price cap then stays unenforced rather than the fleet changed.
pub fn launch_configs_with_max_prices(
    configs: &[FleetLaunchTemplateConfig],
    prices: &[TypePrice],
) -> Result<Option<Vec<FleetLaunchTemplateConfigRequest>>, NotRewritable> {
    let price_of = |t: &str| prices.iter().find(|p| p.instance_type == t).map(|p| p.usd_per_hour);
    let highest = prices.iter().map(|p| p.usd_per_hour).reduce(f64::max);
    let fmt = |v: f64| format!("{v:.4}");
    let drifted = |current: Option<&str>, want: f64| {
        current
            .and_then(|c| c.parse::<f64>().ok())
            .is_none_or(|c| (c - want).abs() > pacloud_fleet::policy::MAX_PRICE_TOLERANCE * want.max(f64::MIN_POSITIVE))
    };
    let mut changed = false;
    let mut out = Vec::new();
    for c in configs {
        let spec = c.launch_template_specification().ok_or_else(|| NotRewritable("no launch template".into()))?;
        let spec = FleetLaunchTemplateSpecificationRequest::builder()
            .set_launch_template_id(spec.launch_template_id().map(str::to_owned))
            .set_launch_template_name(spec.launch_template_name().map(str::to_owned))
            .set_version(spec.version().map(str::to_owned))
            .build();
        let mut overrides = Vec::new();
        if c.overrides().is_empty() {
            for p in prices {
                changed = true;
                overrides.push(
                    FleetLaunchTemplateOverridesRequest::builder()
                        .instance_type(InstanceType::from(p.instance_type.as_str()))
                        .max_price(fmt(p.usd_per_hour))
                        .build(),
                );
            }
        }
        for o in c.overrides() {
            if o.placement().is_some() || !o.block_device_mappings().is_empty() || o.availability_zone_id().is_some() {
                return Err(NotRewritable("an override with placement, block devices or a zone id".into()));
            }
            let want = match (o.instance_type(), o.instance_requirements()) {
                (Some(t), _) => price_of(t.as_str()),
                (None, Some(_)) => highest,
                (None, None) => None,
            };
            let max_price = match want {
                Some(w) => {
                    changed |= drifted(o.max_price(), w);
                    Some(fmt(w))
                }
                None => o.max_price().map(str::to_owned),
            };
            overrides.push(
                FleetLaunchTemplateOverridesRequest::builder()
                    .set_instance_type(o.instance_type().cloned())
                    .set_max_price(max_price)
                    .set_subnet_id(o.subnet_id().map(str::to_owned))
                    .set_availability_zone(o.availability_zone().map(str::to_owned))
                    .set_weighted_capacity(o.weighted_capacity())
                    .set_priority(o.priority())
                    .set_image_id(o.image_id().map(str::to_owned))
                    .set_instance_requirements(o.instance_requirements().map(requirements_request).transpose()?)
                    .build(),
            );
        }
        out.push(
            FleetLaunchTemplateConfigRequest::builder()
                .launch_template_specification(spec)
                .set_overrides(Some(overrides))
                .build(),
        );
    }
    Ok(changed.then_some(out))
}

/// `InstanceRequirements` (DescribeFleets) as an `InstanceRequirementsRequest`
/// (ModifyFleet), for the fields the infra template and common fleets use.
fn requirements_request(r: &InstanceRequirements) -> Result<InstanceRequirementsRequest, NotRewritable> {
    let unsupported = [
        ("MemoryGiBPerVCpu", r.memory_gib_per_v_cpu().is_some()),
        ("NetworkInterfaceCount", r.network_interface_count().is_some()),
        ("TotalLocalStorageGB", r.total_local_storage_gb().is_some()),
        ("BaselineEbsBandwidthMbps", r.baseline_ebs_bandwidth_mbps().is_some()),
        ("AcceleratorTypes", !r.accelerator_types().is_empty()),
        ("AcceleratorCount", r.accelerator_count().is_some()),
        ("AcceleratorManufacturers", !r.accelerator_manufacturers().is_empty()),
        ("AcceleratorNames", !r.accelerator_names().is_empty()),
        ("AcceleratorTotalMemoryMiB", r.accelerator_total_memory_mib().is_some()),
        ("NetworkBandwidthGbps", r.network_bandwidth_gbps().is_some()),
        ("BaselinePerformanceFactors", r.baseline_performance_factors().is_some()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(NotRewritable(format!("InstanceRequirements.{name} is not carried over")));
    }
    let list = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    Ok(InstanceRequirementsRequest::builder()
        .set_v_cpu_count(
            r.v_cpu_count().map(|v| VCpuCountRangeRequest::builder().set_min(v.min()).set_max(v.max()).build()),
        )
        .set_memory_mib(r.memory_mib().map(|m| MemoryMiBRequest::builder().set_min(m.min()).set_max(m.max()).build()))
        .set_cpu_manufacturers((!r.cpu_manufacturers().is_empty()).then(|| r.cpu_manufacturers().to_vec()))
        .set_excluded_instance_types(list(r.excluded_instance_types()))
        .set_allowed_instance_types(list(r.allowed_instance_types()))
        .set_instance_generations((!r.instance_generations().is_empty()).then(|| r.instance_generations().to_vec()))
        .set_spot_max_price_percentage_over_lowest_price(r.spot_max_price_percentage_over_lowest_price())
        .set_on_demand_max_price_percentage_over_lowest_price(r.on_demand_max_price_percentage_over_lowest_price())
        .set_max_spot_price_as_percentage_of_optimal_on_demand_price(
            r.max_spot_price_as_percentage_of_optimal_on_demand_price(),
        )
        .set_bare_metal(r.bare_metal().cloned())
        .set_burstable_performance(r.burstable_performance().cloned())
        .set_require_hibernate_support(r.require_hibernate_support())
        .set_local_storage(r.local_storage().cloned())
        .set_local_storage_types((!r.local_storage_types().is_empty()).then(|| r.local_storage_types().to_vec()))
        .set_require_encryption_in_transit(r.require_encryption_in_transit())
        .build())
}

/// EC2 and SQS clients for the scaler.
#[derive(Debug, Clone)]
pub struct FleetClient {
    pub ec2: aws_sdk_ec2::Client,
    pub sqs: aws_sdk_sqs::Client,
    /// Reads the build history the workers keep in the artifact bucket
    /// ([`FleetClient::get_object`]).
    pub s3: aws_sdk_s3::Client,
}

impl FleetClient {
    /// Clients from `config` with [`retry_policy`].
    pub async fn connect(config: &AwsConfig) -> FleetClient {
        let sdk = crate::sdk_config(config, Some(retry_policy())).await;
        let s3 = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(config.force_path_style).build();
        FleetClient {
            ec2: aws_sdk_ec2::Client::new(&sdk),
            sqs: aws_sdk_sqs::Client::new(&sdk),
            s3: aws_sdk_s3::Client::from_conf(s3),
        }
    }

    /// The object `key` of `bucket` (GetObject), `None` when there is none:
    /// the scaler reads the workers' build history (`stats/all.json`) with it.
    pub async fn get_object(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, FleetError> {
        match self.s3.get_object().bucket(bucket).key(key).send().await {
            Ok(o) => Ok(Some(o.body.collect().await.map_err(api("GetObject"))?.into_bytes().to_vec())),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(api("GetObject")(e)),
        }
    }

    /// Visible and in-flight messages of a queue.
    pub async fn queue_depth(&self, queue_url: &str) -> Result<QueueDepth, FleetError> {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(api("GetQueueAttributes"))?;
        let get = |k: A| -> Result<u32, FleetError> {
            let v = out.attributes().and_then(|a| a.get(&k)).map(String::as_str).unwrap_or("0");
            v.parse().map_err(|_| FleetError::Unexpected { op: "GetQueueAttributes", detail: format!("{k:?}={v:?}") })
        };
        Ok(QueueDepth {
            visible: get(A::ApproximateNumberOfMessages)?,
            in_flight: get(A::ApproximateNumberOfMessagesNotVisible)?,
        })
    }

    /// Active `maintain` fleets tagged `pacloud:role=worker`, with their family.
    pub async fn worker_fleets(&self) -> Result<Vec<WorkerFleet>, FleetError> {
        use aws_sdk_ec2::types::FleetStateCode as S;
        let mut out = Vec::new();
        let mut pages = self.ec2.describe_fleets().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(api("DescribeFleets"))?;
            for f in page.fleets() {
                let tag = |k: &str| f.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value());
                if tag(TAG_ROLE) != Some("worker") {
                    continue;
                }
                if !matches!(f.fleet_state(), Some(S::Active | S::Modifying | S::Submitted)) {
                    continue;
                }
                let (Some(id), Some(family)) = (f.fleet_id(), tag(TAG_FAMILY).and_then(|v| v.parse().ok())) else {
                    tracing::warn!(fleet = ?f.fleet_id(), "worker fleet without a valid {TAG_FAMILY} tag: ignored");
                    continue;
                };
                let spec = f.target_capacity_specification();
                let n = |v: Option<i32>| v.unwrap_or(0).max(0) as u32;
                out.push(WorkerFleet {
                    launch_configs: f.launch_template_configs().to_vec(),
                    fleet_id: id.to_owned(),
                    family,
                    target: FleetTarget {
                        total: n(spec.and_then(|s| s.total_target_capacity())),
                        on_demand: n(spec.and_then(|s| s.on_demand_target_capacity())),
                    },
                });
            }
        }
        out.sort_by(|a, b| (a.family, &a.fleet_id).cmp(&(b.family, &b.fleet_id)));
        Ok(out)
    }

    /// The family's worker instances that are not terminated.
    pub async fn worker_instances(&self, family: CpuFamily) -> Result<Vec<Instance>, FleetError> {
        let filter = |n: &str, v: &[&str]| {
            Filter::builder().name(n).set_values(Some(v.iter().map(|s| s.to_string()).collect())).build()
        };
        let mut out = Vec::new();
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(filter(&format!("tag:{TAG_ROLE}"), &["worker"]))
            .filters(filter(&format!("tag:{TAG_FAMILY}"), &[family.as_str()]))
            .filters(filter("instance-state-name", &["pending", "running", "stopping", "stopped", "shutting-down"]))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(api("DescribeInstances"))?;
            for r in page.reservations() {
                for i in r.instances() {
                    let tags: Vec<(&str, &str)> =
                        i.tags().iter().filter_map(|t| Some((t.key()?, t.value().unwrap_or("")))).collect();
                    let state = match i.state().and_then(|s| s.name()) {
                        Some(InstanceStateName::Pending) => InstanceState::Pending,
                        Some(InstanceStateName::Running) => InstanceState::Running,
                        Some(InstanceStateName::Stopped) => InstanceState::Hibernated,
                        _ => InstanceState::Stopping,
                    };
                    let spot = i.instance_lifecycle() == Some(&InstanceLifecycleType::Spot);
                    out.push(instance_from_parts(
                        i.instance_id().unwrap_or_default(),
                        i.instance_type().map(|t| t.as_str()).unwrap_or_default(),
                        i.placement().and_then(|p| p.availability_zone()).unwrap_or_default(),
                        spot,
                        state,
                        i.launch_time().map_or(0, |t| t.secs().max(0) as u64),
                        &tags,
                    ));
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Linux spot prices of `types` since `since` (at most 24 h are used).
    pub async fn spot_prices(&self, types: &[String], since: Secs) -> Result<Vec<PricePoint>, FleetError> {
        let mut out = Vec::new();
        let mut pages = self
            .ec2
            .describe_spot_price_history()
            .set_instance_types(Some(types.iter().map(|t| InstanceType::from(t.as_str())).collect()))
            .product_descriptions("Linux/UNIX")
            .start_time(aws_smithy_types::DateTime::from_secs(since as i64))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(api("DescribeSpotPriceHistory"))?;
            for p in page.spot_price_history() {
                let (Some(t), Some(z), Some(v), Some(at)) =
                    (p.instance_type(), p.availability_zone(), p.spot_price(), p.timestamp())
                else {
                    continue;
                };
                let Ok(usd) = v.parse::<f64>() else { continue };
                out.push(PricePoint {
                    instance_type: t.as_str().to_owned(),
                    zone: z.to_owned(),
                    usd_per_hour: usd,
                    at: at.secs().max(0) as u64,
                });
            }
        }
        Ok(out)
    }

    /// Capacity errors in the fleet's history since `since` (every event type is
    /// scanned: launch failures are reported as errors or information depending on the fleet).
    pub async fn capacity_errors(
        &self,
        fleet_id: &str,
        since: Secs,
        types: &[String],
    ) -> Result<Vec<CapacityError>, FleetError> {
        let out = self
            .ec2
            .describe_fleet_history()
            .fleet_id(fleet_id)
            .start_time(aws_smithy_types::DateTime::from_secs(since as i64))
            .send()
            .await
            .map_err(api("DescribeFleetHistory"))?;
        Ok(out
            .history_records()
            .iter()
            .filter_map(|r| {
                let info = r.event_information()?;
                let text =
                    format!("{} {}", info.event_sub_type().unwrap_or(""), info.event_description().unwrap_or(""));
                capacity_error_from_text(&text, types, r.timestamp()?.secs().max(0) as u64)
            })
            .collect())
    }

    /// ModifyFleet: the target capacity, `on_demand` of it on-demand.
    pub async fn set_target(&self, fleet_id: &str, total: u32, on_demand: u32) -> Result<(), FleetError> {
        let on_demand = on_demand.min(total);
        let spec = TargetCapacitySpecificationRequest::builder()
            .total_target_capacity(total as i32)
            .on_demand_target_capacity(on_demand as i32)
            .spot_target_capacity((total - on_demand) as i32)
            .default_target_capacity_type(DefaultTargetCapacityType::Spot)
            .build();
        let out = self
            .ec2
            .modify_fleet()
            .fleet_id(fleet_id)
            .target_capacity_specification(spec)
            .send()
            .await
            .map_err(api("ModifyFleet"))?;
        if out.r#return() == Some(false) {
            return Err(FleetError::Unexpected { op: "ModifyFleet", detail: "Return=false".into() });
        }
        Ok(())
    }

    /// ModifyFleet: the launch template configurations (with the spot max
    /// prices of [`launch_configs_with_max_prices`]); the target is left as it is.
    pub async fn set_launch_configs(
        &self,
        fleet_id: &str,
        configs: Vec<FleetLaunchTemplateConfigRequest>,
    ) -> Result<(), FleetError> {
        let out = self
            .ec2
            .modify_fleet()
            .fleet_id(fleet_id)
            .set_launch_template_configs(Some(configs))
            .send()
            .await
            .map_err(api("ModifyFleet"))?;
        if out.r#return() == Some(false) {
            return Err(FleetError::Unexpected { op: "ModifyFleet", detail: "Return=false".into() });
        }
        Ok(())
    }

    /// Terminates those of `ids` that a fresh read still shows in state
    /// `want` and free of work (idle, no lease; a worker may have taken a
    /// build since the snapshot); returns the ids terminated.
    pub async fn terminate_checked(
        &self,
        family: CpuFamily,
        ids: &[String],
        want: InstanceState,
    ) -> Result<Vec<String>, FleetError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.worker_instances(family).await?;
        let still: Vec<String> = now
            .iter()
            .filter(|i| ids.contains(&i.id) && i.state == want)
            .filter(|i| want == InstanceState::Pending || !i.may_hold_work())
            .map(|i| i.id.clone())
            .collect();
        if still.is_empty() {
            return Ok(still);
        }
        self.ec2
            .terminate_instances()
            .set_instance_ids(Some(still.clone()))
            .send()
            .await
            .map_err(api("TerminateInstances"))?;
        Ok(still)
    }
}

/// What a worker reports about itself in its instance's tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerState {
    /// Processing a delivery: it holds (or is claiming) a build lease.
    pub busy: bool,
    /// Busy or idle since (unix seconds).
    pub since: Secs,
    /// While busy: when its builds are expected to be done (unix seconds;
    /// each build's start plus its atom's median build time), if known.
    pub expected_end: Option<Secs>,
}

/// The tags that report `s`: `pacloud:activity` = `busy:<since>:<expected
/// end>`, `busy:<since>` (no expected end) or `idle:<since>`,
/// `pacloud:lease` = `1` while busy, else `0` (a tag that stays while the
/// instance is hibernated, so a hibernated worker with a build keeps `1`).
/// [`parse_activity`] reads the first back.
pub fn activity_tags(s: WorkerState) -> [(&'static str, String); 2] {
    let activity = match (s.busy, s.expected_end) {
        (true, Some(end)) => format!("busy:{}:{end}", s.since),
        (true, None) => format!("busy:{}", s.since),
        (false, _) => format!("idle:{}", s.since),
    };
    [(TAG_ACTIVITY, activity), (TAG_LEASE, if s.busy { "1" } else { "0" }.to_owned())]
}

impl FleetClient {
    /// CreateTags on the worker's own instance with [`activity_tags`]
    /// (idempotent: CreateTags overwrites a key's value).
    pub async fn set_worker_tags(&self, instance_id: &str, s: WorkerState) -> Result<(), FleetError> {
        let tags = activity_tags(s)
            .into_iter()
            .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
            .collect::<Vec<_>>();
        self.ec2.create_tags().resources(instance_id).set_tags(Some(tags)).send().await.map_err(api("CreateTags"))?;
        Ok(())
    }
}

/// Keeps the worker's instance tags in step with its state: each change of
/// `state` is written with [`FleetClient::set_worker_tags`], at most one
/// call per `min_interval` (changes in between are coalesced: only the
/// newest state is written), a failure is logged and retried after a
/// backoff doubling from `min_interval` up to 60 s, never fatal. Returns when
/// `stop` is cancelled or the sender is gone.
pub async fn run_activity_tagger(
    client: FleetClient,
    instance_id: String,
    mut state: tokio::sync::watch::Receiver<WorkerState>,
    min_interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut written: Option<WorkerState> = None;
    let mut backoff = min_interval;
    loop {
        let want = *state.borrow_and_update();
        let mut wait_for_change = true;
        if written != Some(want) {
            match client.set_worker_tags(&instance_id, want).await {
                Ok(()) => {
                    tracing::debug!(instance = instance_id, ?want, "worker tags set");
                    written = Some(want);
                    backoff = min_interval;
                }
                Err(e) => {
                    tracing::warn!(instance = instance_id, error = %e, retry_in = ?backoff, "cannot set the worker's activity tags; the scaler keeps it as busy");
                    wait_for_change = false;
                }
            }
        }
        // The throttle (or the retry backoff after a failure).
        let pause = if wait_for_change { min_interval } else { backoff };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
        if !wait_for_change {
            backoff = (backoff * 2).min(Duration::from_secs(60));
            continue;
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// An [`Instance`] from DescribeInstances fields and tags (pure; tested).
pub fn instance_from_parts(
    id: &str,
    instance_type: &str,
    zone: &str,
    spot: bool,
    state: InstanceState,
    launched_at: Secs,
    tags: &[(&str, &str)],
) -> Instance {
    let tag = |k: &str| tags.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    Instance {
        id: id.to_owned(),
        instance_type: instance_type.to_owned(),
        zone: zone.to_owned(),
        capacity: if spot { CapacityType::Spot } else { CapacityType::OnDemand },
        state,
        launched_at,
        activity: tag(TAG_ACTIVITY).map_or(Activity::Unknown, parse_activity),
        holds_lease: matches!(tag(TAG_LEASE), Some("1" | "true")),
    }
}

/// `idle:<unix>`, `busy:<unix>` or `busy:<unix>:<end>`; anything else is Unknown.
pub fn parse_activity(v: &str) -> Activity {
    let mut parts = v.split(':');
    let kind = parts.next();
    let since = parts.next().and_then(|s| s.parse::<u64>().ok());
    let end = parts.next().map(|s| s.parse::<u64>().ok());
    match (kind, since, end, parts.next()) {
        (Some("idle"), Some(since), None, None) => Activity::Idle { since },
        (Some("busy"), Some(since), None, None) => Activity::Busy { since, expected_done_at: None },
        (Some("busy"), Some(since), Some(Some(end)), None) => Activity::Busy { since, expected_done_at: Some(end) },
        _ => Activity::Unknown,
    }
}

/// A capacity error from a fleet history error's text: it must name
/// insufficient capacity, and one of `types`; the zone is the first token
/// that looks like one (`us-east-1a`), or empty.
pub fn capacity_error_from_text(text: &str, types: &[String], at: Secs) -> Option<CapacityError> {
    let lower = text.to_ascii_lowercase();
    if !(lower.contains("insufficientinstancecapacity")
        || lower.contains("insufficient capacity")
        || lower.contains("no spot capacity"))
    {
        return None;
    }
    let words: Vec<&str> =
        text.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '(' | ')' | '"')).collect();
    let instance_type = types.iter().find(|t| words.contains(&t.as_str()))?.clone();
    let zone = words
        .iter()
        .find(|w| {
            let b = w.as_bytes();
            w.matches('-').count() == 2
                && b.len() >= 10
                && b[b.len() - 1].is_ascii_lowercase()
                && b[b.len() - 2].is_ascii_digit()
        })
        .map_or(String::new(), |z| z.to_string());
    let capacity = if lower.contains("on-demand") { CapacityType::OnDemand } else { CapacityType::Spot };
    Some(CapacityError { instance_type, zone, capacity, at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_tags_parse_and_anything_else_is_unknown() {
        assert_eq!(parse_activity("idle:100"), Activity::Idle { since: 100 });
        assert_eq!(parse_activity("busy:100"), Activity::Busy { since: 100, expected_done_at: None });
        assert_eq!(parse_activity("busy:100:400"), Activity::Busy { since: 100, expected_done_at: Some(400) });
        for bad in ["", "idle", "idle:x", "sleeping:1", "busy:1:x", "idle:1:2", "busy:1:2:3"] {
            assert_eq!(parse_activity(bad), Activity::Unknown, "{bad}");
        }
        // What the worker writes reads back as what it meant.
        let round_trip = |busy, since, expected_end| {
            let [(k, activity), (l, lease)] = activity_tags(WorkerState { busy, since, expected_end });
            assert_eq!((k, l), (TAG_ACTIVITY, TAG_LEASE));
            (parse_activity(&activity), lease)
        };
        assert_eq!(
            round_trip(true, 100, Some(460)),
            (Activity::Busy { since: 100, expected_done_at: Some(460) }, "1".to_owned())
        );
        assert_eq!(
            round_trip(true, 100, None),
            (Activity::Busy { since: 100, expected_done_at: None }, "1".to_owned())
        );
        assert_eq!(round_trip(false, 100, Some(460)), (Activity::Idle { since: 100 }, "0".to_owned()), "idle: no end");
        let i = instance_from_parts(
            "i-1",
            "c6i.xlarge",
            "us-east-1a",
            true,
            InstanceState::Running,
            5,
            &[(TAG_LEASE, "1")],
        );
        assert_eq!(i.activity, Activity::Unknown);
        assert!(i.holds_lease && i.may_hold_work());
    }

    #[test]
    fn capacity_errors_are_read_from_fleet_history_text() {
        let types = vec!["c6i.xlarge".to_string(), "c5.xlarge".to_string()];
        let e = capacity_error_from_text(
            "spotFleetRequestConfigurationInvalid c5.xlarge, ami-123, Linux/UNIX, us-east-1b, Spot price: 0.07 (InsufficientInstanceCapacity)",
            &types,
            42,
        )
        .unwrap();
        assert_eq!(
            (e.instance_type.as_str(), e.zone.as_str(), e.capacity, e.at),
            ("c5.xlarge", "us-east-1b", CapacityType::Spot, 42)
        );
        assert!(capacity_error_from_text("c5.xlarge: iamFleetRoleInvalid", &types, 1).is_none());
        assert!(capacity_error_from_text("InsufficientInstanceCapacity m7.metal", &types, 1).is_none());
    }
}
