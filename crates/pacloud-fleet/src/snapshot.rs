//! The policy's input: what the scaler (or the simulator) sees at one instant.

use crate::families::CpuFamily;

/// Seconds since the Unix epoch (the simulator uses seconds since its start).
pub type Secs = u64;

/// Everything a decision depends on.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub now: Secs,
    pub families: Vec<FamilySnapshot>,
}

/// One CPU family: its queue, its fleet, its market.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FamilySnapshot {
    pub family: CpuFamily,
    pub queue: QueueDepth,
    /// The fleet's live instances (terminated ones are left out).
    pub instances: Vec<Instance>,
    /// The fleet's current target capacity.
    pub fleet: FleetTarget,
    /// Candidate instance types (normally [`CpuFamily::instance_types`]).
    pub instance_types: Vec<String>,
    /// Spot price history (24 hours; the last point per type and zone is the current price).
    pub spot_prices: Vec<PricePoint>,
    /// On-demand price per type (USD per hour); a type without one has no price ceiling but its cap.
    pub on_demand_prices: Vec<OnDemandPrice>,
    /// Capacity errors seen recently (e.g. the last 15 minutes of fleet history).
    pub capacity_errors: Vec<CapacityError>,
    /// Median build time of the queued work, from build history (None: no history).
    pub median_build_s: Option<u64>,
    /// The spot max price per type the fleet's launch configuration holds
    /// now (its overrides' `MaxPrice`); empty when none is set.
    #[serde(default)]
    pub spot_max_prices: Vec<TypePrice>,
}

/// A price for one instance type (USD per hour).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TypePrice {
    pub instance_type: String,
    pub usd_per_hour: f64,
}

/// Queue depth (SQS `ApproximateNumberOfMessages`, `...NotVisible`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueDepth {
    /// Waiting for a worker.
    pub visible: u32,
    /// Received by a worker and not yet deleted.
    pub in_flight: u32,
}

/// The fleet's `TargetCapacitySpecification`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetTarget {
    pub total: u32,
    pub on_demand: u32,
}

/// Spot or on-demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    Spot,
    OnDemand,
}

/// An instance's EC2 state as far as capacity goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Launched, booting; not yet polling the queue.
    Pending,
    Running,
    /// Stopped by a spot hibernation; EC2 resumes it when capacity returns.
    Hibernated,
    /// Stopping or shutting down: neither capacity nor a candidate for anything.
    Stopping,
}

/// What the worker on an instance is doing (from its `pacloud:activity` tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Activity {
    /// Polling the queue since `since`.
    Idle { since: Secs },
    /// Building since `since`; `expected_done_at` from the atom's median build time, when known.
    Busy { since: Secs, expected_done_at: Option<Secs> },
    /// Not reported (no tag yet): treated as busy, never terminated as idle.
    Unknown,
}

/// One instance of a fleet.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity: CapacityType,
    pub state: InstanceState,
    pub launched_at: Secs,
    pub activity: Activity,
    /// The worker holds a build lease (a hibernated one resumes its build).
    pub holds_lease: bool,
}

impl Instance {
    /// Idle since when, if idle and running.
    pub fn idle_since(&self) -> Option<Secs> {
        match (self.state, self.activity) {
            (InstanceState::Running, Activity::Idle { since }) if !self.holds_lease => Some(since),
            _ => None,
        }
    }

    /// Whether terminating this instance could lose work: busy, unknown, or holding a lease.
    pub fn may_hold_work(&self) -> bool {
        self.holds_lease || !matches!(self.activity, Activity::Idle { .. })
    }
}

/// One spot price observation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PricePoint {
    pub instance_type: String,
    pub zone: String,
    pub usd_per_hour: f64,
    pub at: Secs,
}

/// An on-demand list price.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OnDemandPrice {
    pub instance_type: String,
    pub usd_per_hour: f64,
}

/// A launch that failed for lack of capacity.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CapacityError {
    pub instance_type: String,
    pub zone: String,
    pub capacity: CapacityType,
    pub at: Secs,
}
