//! [`PacloudPolicy`]: the project's fleet policy, and the market helpers the
//! baselines, the scaler and the simulator share.
//!
//! Per CPU family, every tick:
//! 1. **Unavailable types** (Karpenter): a capacity error on (type, zone,
//!    capacity type) marks it unavailable for `unavailable_for_s` (3 min).
//! 2. **Price cap** (buildbot EC2 latent workers): a type's spot price is
//!    capped at `max_price_multiplier × its 24-hour average` (and never above
//!    its on-demand price); a type whose current price is above its cap is
//!    marked unavailable like a capacity error. The caps are enforced in
//!    the fleet itself: [`Action::SetSpotMaxPrices`] sets each type's spot
//!    max price to its cap whenever the fleet's drifts more than 5 % from it.
//! 3. **Boot timeout** (buildbot `missing_timeout`): an instance pending longer
//!    than `boot_timeout_s` never showed up; it is terminated and not counted.
//! 4. **Free slots**: idle running instances, plus the **fresh subtraction**
//!    (Mozilla aws_watch_pending: each instance started in the last 20
//!    minutes counts as one job served; pacloud knows when a worker is
//!    busy, so only the fresh ones not yet busy count), plus hibernated
//!    instances without a lease (pacloud: capacity that will resume).
//! 5. **Freeing soon**: busy instances whose build's expected end (the atom's
//!    median from history, pacloud) is still ahead and within one boot (a
//!    build already past its expected end is not counted: build times are
//!    heavy-tailed, so the remaining time of a late build grows);
//!    with no history at all, **10 % of the old busy ones** (Mozilla), rounded up.
//! 6. **Backlog per instance** (AWS's SQS scaling rule, with pacloud's build
//!    history): with a median build time m and an acceptable wait w, one new
//!    instance serves w/m queued builds; without history every queued build
//!    gets its own instance (LKFT: every build in parallel).
//! 7. **Limits** (Mozilla, terraform runners): `min_instances ≤ target ≤
//!    max_instances`.
//! 8. **Spot first, on-demand fallback** (Mozilla; terraform-aws-github-runner
//!    retries the missing count on-demand after `InsufficientInstanceCapacity`):
//!    when no candidate type can supply spot, the new instances are asked
//!    for on-demand.
//! 9. **Idle timeout**: idle instances beyond what the queue needs, idle for
//!    `idle_timeout_s` (10 s: with the scaler nudged on every enqueue a
//!    relaunch costs one boot, so idling does not pay), are terminated, on-demand first, never below the
//!    minimum; never a busy, unreported or lease-holding instance, never a
//!    hibernated one (EC2 bills per second after the first minute, so there
//!    is no "end of the billed hour" rule to keep).

use std::collections::BTreeMap;

use crate::families::CpuFamily;
use crate::snapshot::*;
use crate::{Action, FallbackReason, Policy, TerminateReason, UnavailableReason};

/// The policy's settings. Defaults and where each comes from are on the fields.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Instances kept per family even with an empty queue. Default 0: an idle
    /// service costs nothing (the LKFT goal: pay per build).
    pub min_instances: u32,
    /// Instances per family at most. Default 64: a money limit, not a
    /// throughput one (LKFT runs every build in parallel; Mozilla had per-type limits).
    pub max_instances: u32,
    /// Spot price cap = this × the 24-hour average price of the type.
    /// Default 1.2, buildbot's `price_multiplier` default.
    pub max_price_multiplier: f64,
    /// Instances launched this recently count as serving one job. Default
    /// 1200 s, Mozilla aws_watch_pending's 20 minutes.
    pub fresh_instance_delay_s: u64,
    /// Share of old busy instances assumed to free up soon. Default 0.1,
    /// Mozilla aws_watch_pending's 10 %.
    pub old_instance_fraction: f64,
    /// An idle instance is terminated after this long when the queue does not
    /// need it. Default 10 s: twice the worker's tag coalescing (5 s), so a
    /// worker that has just taken a job is never seen idle by a terminate
    /// decision. Keeping idle instances longer does not pay once the scaler
    /// reacts to each enqueue within seconds (the API's nudge): an idle
    /// instance saves at most one billed boot (≈ 60 s) on the next arrival
    /// and costs that much per minute it waits, so it only pays when builds
    /// arrive faster than one per boot, and then the p95 wait is a boot
    /// anyway. In the simulator 120 s costs 6–8 % more for the same p95
    /// (docs/fleet.md, "Results").
    pub idle_timeout_s: u64,
    /// Ask for on-demand when spot cannot supply. Default on.
    pub on_demand_fallback: bool,
    /// Use spot at all (off = the on-demand-only baseline). Default on.
    pub spot: bool,
    /// How long a capacity error or an over-cap price keeps a type out.
    /// Default 180 s, Karpenter's unavailable-offerings cache TTL.
    pub unavailable_for_s: u64,
    /// Pending longer than this = never showed up. Default 600 s (buildbot's
    /// `missing_timeout` is 1200 s for slower boots; EC2 boots in about 60 s).
    pub boot_timeout_s: u64,
    /// "Freeing soon" window: a busy instance whose build is expected to end
    /// within this many seconds counts as a free slot, so a queued build waits
    /// for it instead of a launch. Default 30 s, half a boot: the expected end
    /// is the atom's median build time, and one build of an atom varies about
    /// ±25 % around it, so a late build must still leave the wait under the
    /// ≈ 65 s a launch takes (nudge + boot). 60–90 s cost p95 (late builds
    /// make queued ones wait a launch on top) for under 0.3 % of cost.
    pub expected_boot_s: u64,
    /// Acceptable wait-to-start for the backlog-per-instance rule. Default
    /// 180 s, the project's p95 target.
    pub target_wait_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_instances: 0,
            max_instances: 64,
            max_price_multiplier: 1.2,
            fresh_instance_delay_s: 1200,
            old_instance_fraction: 0.1,
            idle_timeout_s: 10,
            on_demand_fallback: true,
            spot: true,
            unavailable_for_s: 180,
            boot_timeout_s: 600,
            expected_boot_s: 30,
            target_wait_s: 180,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("min_instances ({min}) is above max_instances ({max})")]
    MinAboveMax { min: u32, max: u32 },
    #[error("{name} = {value} is out of range ({range})")]
    OutOfRange { name: &'static str, value: f64, range: &'static str },
}

impl Config {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_instances > self.max_instances {
            return Err(ConfigError::MinAboveMax { min: self.min_instances, max: self.max_instances });
        }
        if !(self.max_price_multiplier.is_finite() && self.max_price_multiplier >= 1.0) {
            return Err(ConfigError::OutOfRange {
                name: "max_price_multiplier",
                value: self.max_price_multiplier,
                range: ">= 1.0",
            });
        }
        if !(0.0..=1.0).contains(&self.old_instance_fraction) {
            return Err(ConfigError::OutOfRange {
                name: "old_instance_fraction",
                value: self.old_instance_fraction,
                range: "0.0..=1.0",
            });
        }
        if self.target_wait_s == 0 {
            return Err(ConfigError::OutOfRange { name: "target_wait_s", value: 0.0, range: ">= 1" });
        }
        Ok(())
    }
}

/// One (type, zone)'s current spot price and its cap.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceCap {
    pub instance_type: String,
    pub zone: String,
    pub current: f64,
    pub average_24h: f64,
    pub cap: f64,
}

/// buildbot's price cap: per (type, zone), the mean of the last 24 hours'
/// observations times `multiplier`, and never above the on-demand price.
pub fn price_caps(f: &FamilySnapshot, now: Secs, multiplier: f64) -> Vec<PriceCap> {
    let since = now.saturating_sub(24 * 3600);
    let mut by: BTreeMap<(&str, &str), (f64, usize, Secs, f64)> = BTreeMap::new();
    for p in f.spot_prices.iter().filter(|p| p.at >= since && p.at <= now && p.usd_per_hour.is_finite()) {
        let e = by.entry((&p.instance_type, &p.zone)).or_insert((0.0, 0, 0, p.usd_per_hour));
        e.0 += p.usd_per_hour;
        e.1 += 1;
        if p.at >= e.2 {
            e.2 = p.at;
            e.3 = p.usd_per_hour;
        }
    }
    by.into_iter()
        .map(|((t, z), (sum, n, _, current))| {
            let average_24h = sum / n as f64;
            let mut cap = average_24h * multiplier;
            if let Some(od) = f.on_demand_prices.iter().find(|o| o.instance_type == t) {
                cap = cap.min(od.usd_per_hour);
            }
            PriceCap { instance_type: t.to_owned(), zone: z.to_owned(), current, average_24h, cap }
        })
        .collect()
}

/// How far (relative) the fleet's spot max price of a type may drift from
/// its cap before [`Action::SetSpotMaxPrices`] resets it (the 24-hour
/// average moves a little every tick; a ModifyFleet per tick is not needed).
pub const MAX_PRICE_TOLERANCE: f64 = 0.05;

/// The spot max price per candidate type: its cap (the highest over its
/// zones), rounded to 1/10000 USD as EC2 prices are; types without price
/// history are left out (the fleet's default, the on-demand price, applies).
pub fn spot_max_prices(f: &FamilySnapshot, now: Secs, multiplier: f64) -> Vec<TypePrice> {
    let caps = price_caps(f, now, multiplier);
    f.instance_types
        .iter()
        .filter_map(|t| {
            let cap = caps.iter().filter(|c| &c.instance_type == t).map(|c| c.cap).reduce(f64::max)?;
            Some(TypePrice { instance_type: t.clone(), usd_per_hour: (cap * 10_000.0).round() / 10_000.0 })
        })
        .collect()
}

/// Whether the fleet's max prices `current` must be replaced by `wanted`.
pub fn max_prices_drifted(current: &[TypePrice], wanted: &[TypePrice]) -> bool {
    current.len() != wanted.len()
        || wanted.iter().any(|w| {
            current.iter().find(|c| c.instance_type == w.instance_type).is_none_or(|c| {
                (c.usd_per_hour - w.usd_per_hour).abs() > MAX_PRICE_TOLERANCE * w.usd_per_hour.max(f64::MIN_POSITIVE)
            })
        })
}

/// The market seen by one family: what is unavailable, and which types spot can use.
#[derive(Debug, Clone, PartialEq)]
pub struct Market {
    /// (type, zone, capacity, until, reason), deduplicated, latest `until` kept.
    pub unavailable: Vec<(String, String, CapacityType, Secs, UnavailableReason)>,
    /// Candidate types spot may launch now, with their cap (None: no price history).
    pub spot_types: Vec<(String, Option<f64>)>,
    /// Whether every type was excluded by price (rather than by capacity).
    pub all_over_cap: bool,
}

/// Karpenter's unavailable offerings plus buildbot's price cap, for `f` at `now`.
pub fn market(f: &FamilySnapshot, now: Secs, c: &Config) -> Market {
    let mut unavailable: BTreeMap<(String, String, bool), (Secs, UnavailableReason)> = BTreeMap::new();
    for e in &f.capacity_errors {
        let until = e.at.saturating_add(c.unavailable_for_s);
        if e.at <= now && until > now {
            let k = (e.instance_type.clone(), e.zone.clone(), e.capacity == CapacityType::Spot);
            let slot = unavailable.entry(k).or_insert((until, UnavailableReason::CapacityError));
            slot.0 = slot.0.max(until);
        }
    }
    let caps = price_caps(f, now, c.max_price_multiplier);
    for p in caps.iter().filter(|p| p.current > p.cap) {
        let k = (p.instance_type.clone(), p.zone.clone(), true);
        unavailable
            .entry(k)
            .or_insert((now + c.unavailable_for_s, UnavailableReason::PriceAboveCap { price: p.current, cap: p.cap }));
    }
    let spot_blocked = |t: &str, z: &str| unavailable.contains_key(&(t.to_owned(), z.to_owned(), true));
    let type_errors = |t: &str| {
        unavailable
            .iter()
            .any(|((ty, _, spot), (_, r))| *spot && ty == t && matches!(r, UnavailableReason::CapacityError))
    };
    let mut spot_types = Vec::new();
    let mut over_cap_only = true;
    for t in &f.instance_types {
        let zones: Vec<&PriceCap> = caps.iter().filter(|p| &p.instance_type == t).collect();
        if zones.is_empty() {
            // No price history: the fleet's own max price (on-demand) applies.
            if !type_errors(t) {
                spot_types.push((t.clone(), None));
            } else {
                over_cap_only = false;
            }
            continue;
        }
        let ok: Vec<&&PriceCap> = zones.iter().filter(|p| !spot_blocked(t, &p.zone)).collect();
        if let Some(best) = ok.iter().map(|p| p.cap).reduce(f64::max) {
            spot_types.push((t.clone(), Some(best)));
        } else if type_errors(t) {
            over_cap_only = false;
        }
    }
    let unavailable = unavailable.into_iter().map(|((t, z, spot), (u, r))| (t, z, cap_type(spot), u, r)).collect();
    Market { unavailable, spot_types: spot_types.clone(), all_over_cap: spot_types.is_empty() && over_cap_only }
}

fn cap_type(spot: bool) -> CapacityType {
    if spot { CapacityType::Spot } else { CapacityType::OnDemand }
}

/// How the queue and the instances add up, before the limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Live instances the fleet counts (not stopping, not timed out).
    pub live: u32,
    /// Live on-demand instances.
    pub on_demand: u32,
    /// Slots that will take a queued build without a launch.
    pub free: u32,
    /// Busy instances expected to free up within one boot.
    pub freeing: u32,
}

/// The project's policy. See the module documentation for the heuristics.
#[derive(Debug, Clone, Default)]
pub struct PacloudPolicy {
    pub config: Config,
}

impl PacloudPolicy {
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(PacloudPolicy { config })
    }

    /// Counts slots for `f` (steps 3–5 of the module documentation).
    pub fn count(&self, f: &FamilySnapshot, now: Secs, timed_out: &[&str]) -> Count {
        let c = &self.config;
        let mut n = Count::default();
        let mut old_busy_unknown_end = 0u32;
        for i in f.instances.iter().filter(|i| i.state != InstanceState::Stopping) {
            if timed_out.contains(&i.id.as_str()) {
                continue;
            }
            n.live += 1;
            if i.capacity == CapacityType::OnDemand {
                n.on_demand += 1;
            }
            let fresh = now.saturating_sub(i.launched_at) < c.fresh_instance_delay_s;
            match (i.state, i.activity) {
                // Fresh subtraction: booting, or up but not yet reporting.
                (InstanceState::Pending, _) => n.free += 1,
                (InstanceState::Running, Activity::Unknown) if fresh => n.free += 1,
                (InstanceState::Running, Activity::Idle { .. }) if !i.holds_lease => n.free += 1,
                // Hibernated without a lease: resumes and takes a build.
                (InstanceState::Hibernated, Activity::Idle { .. }) if !i.holds_lease => n.free += 1,
                (InstanceState::Running, Activity::Busy { expected_done_at: Some(end), .. })
                    if end > now && end <= now + c.expected_boot_s =>
                {
                    n.freeing += 1
                }
                (InstanceState::Running, Activity::Busy { expected_done_at: Some(_), .. }) => {}
                // No expectation for this atom: with history, assume nothing (build times are
                // heavy-tailed, the median of all builds dates no single build); without any
                // history, Mozilla's share of the old ones.
                (InstanceState::Running, Activity::Busy { expected_done_at: None, .. })
                    if !fresh && f.median_build_s.is_none() =>
                {
                    old_busy_unknown_end += 1
                }
                _ => {}
            }
        }
        n.freeing += (f64::from(old_busy_unknown_end) * c.old_instance_fraction).ceil() as u32;
        n
    }

    fn decide_family(&self, now: Secs, f: &FamilySnapshot) -> Vec<Action> {
        let c = &self.config;
        let family = f.family;
        let mut actions = Vec::new();
        let market = market(f, now, c);
        for (t, z, cap, until, reason) in &market.unavailable {
            actions.push(Action::MarkUnavailable {
                family,
                instance_type: t.clone(),
                zone: z.clone(),
                capacity: *cap,
                until: *until,
                reason: *reason,
            });
        }

        // Price cap (buildbot), enforced by the fleet's spot max prices.
        if c.spot {
            let prices = spot_max_prices(f, now, c.max_price_multiplier);
            if !prices.is_empty() && max_prices_drifted(&f.spot_max_prices, &prices) {
                actions.push(Action::SetSpotMaxPrices { family, prices });
            }
        }

        // Boot timeout (buildbot): pending too long, never showed up.
        let timed_out: Vec<&str> = f
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Pending && now.saturating_sub(i.launched_at) > c.boot_timeout_s)
            .map(|i| i.id.as_str())
            .collect();
        if !timed_out.is_empty() {
            actions.push(Action::Terminate {
                family,
                instance_ids: timed_out.iter().map(|s| s.to_string()).collect(),
                reason: TerminateReason::BootTimeout,
            });
        }

        let n = self.count(f, now, &timed_out);
        let visible = f.queue.visible;
        let backlog = visible.saturating_sub(n.free + n.freeing);
        let need = match (backlog, f.median_build_s) {
            (0, _) => 0,
            // Backlog per instance: one instance serves target_wait/median builds in time.
            (b, Some(m)) => {
                let per_instance = (c.target_wait_s as f64 / m.max(1) as f64).max(1.0);
                ((f64::from(b) / per_instance).ceil() as u32).clamp(1, b)
            }
            // Every build in parallel.
            (b, None) => b,
        };

        // Idle timeout: surplus idle instances, on-demand first, longest idle first.
        let surplus = n.free.saturating_sub(visible);
        let mut idle: Vec<&Instance> = f
            .instances
            .iter()
            .filter(|i| {
                i.state == InstanceState::Running
                    && !i.may_hold_work()
                    && i.idle_since().is_some_and(|s| now.saturating_sub(s) >= c.idle_timeout_s)
            })
            .collect();
        idle.sort_by_key(|i| (i.capacity == CapacityType::Spot, i.idle_since(), i.id.clone()));
        let removable = n.live.saturating_sub(c.min_instances);
        let kill: Vec<&Instance> = idle.into_iter().take(surplus.min(removable) as usize).collect();
        let killed_od = kill.iter().filter(|i| i.capacity == CapacityType::OnDemand).count() as u32;
        if !kill.is_empty() {
            actions.push(Action::Terminate {
                family,
                instance_ids: kill.iter().map(|i| i.id.clone()).collect(),
                reason: TerminateReason::Idle,
            });
        }

        let live = n.live - kill.len() as u32;
        let total = (live + need).clamp(c.min_instances, c.max_instances.max(c.min_instances));
        let launches = total.saturating_sub(live);
        let od_live = n.on_demand - killed_od;
        let fallback = if !c.spot {
            Some(FallbackReason::SpotDisabled)
        } else if !c.on_demand_fallback || !market.spot_types.is_empty() {
            None
        } else if market.all_over_cap {
            Some(FallbackReason::SpotPriceAboveCap)
        } else {
            Some(FallbackReason::SpotCapacityErrors)
        };
        let od_new = if fallback.is_some() { launches } else { 0 };
        let on_demand = (od_live + od_new).min(total);
        if let (Some(reason), true) = (fallback, od_new > 0) {
            actions.push(Action::OnDemandFallback { family, count: od_new, reason });
        }
        if (total, on_demand) != (f.fleet.total, f.fleet.on_demand) {
            actions.push(Action::SetTargetCapacity { family, total, on_demand });
        }
        actions
    }
}

impl Policy for PacloudPolicy {
    fn name(&self) -> &str {
        if self.config.spot { "pacloud" } else { "on-demand" }
    }

    fn decide(&self, s: &Snapshot) -> Vec<Action> {
        s.families.iter().flat_map(|f| self.decide_family(s.now, f)).collect()
    }
}

/// A family snapshot with nothing in it (tests, simulator).
pub fn empty_family(family: CpuFamily) -> FamilySnapshot {
    FamilySnapshot {
        family,
        queue: QueueDepth::default(),
        instances: Vec::new(),
        fleet: FleetTarget::default(),
        instance_types: family.instance_types().iter().map(|s| s.to_string()).collect(),
        spot_prices: Vec::new(),
        on_demand_prices: Vec::new(),
        capacity_errors: Vec::new(),
        median_build_s: None,
        spot_max_prices: Vec::new(),
    }
}

#[cfg(test)]
mod tests;
