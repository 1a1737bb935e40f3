//! pacloud's fleet policy: how many hibernating spot workers each CPU family
//! needs, of which instance types, at what price.
//!
//! Karpenter style: a decision is a pure function of a [`Snapshot`] (queue
//! depth, the fleet's instances, spot price history, recent capacity errors)
//! and a [`Config`]; it returns [`Action`]s. No I/O, no SDK, no clock: the
//! snapshot carries `now`. The scaler Lambda (`pacloud-scaler`) builds the
//! snapshot from AWS and applies the actions; the simulator
//! (`pacloud-fleet-sim`) builds it from its simulated world and applies them
//! there. Both call the same [`Policy::decide`].
//!
//! - [`snapshot`]: the input types.
//! - [`policy`]: [`PacloudPolicy`], the project's policy, with every seed
//!   heuristic named in its doc comments.
//! - [`baselines`]: the seeds' policies as written (Mozilla watch_pending,
//!   buildbot latent workers = one instance per job, a fixed fleet), for the
//!   simulator's comparison.
//! - [`families`]: CPU family → instance types (AWS-EB's mapping).

pub mod baselines;
pub mod families;
pub mod policy;
pub mod snapshot;

pub use families::CpuFamily;
pub use policy::{Config, ConfigError, PacloudPolicy};
pub use snapshot::*;

/// What a policy asks the world to do. Every action is idempotent: applying
/// it twice leaves the fleet as applying it once.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Set the family's EC2 Fleet target capacity (`ModifyFleet`):
    /// `total` instances, of which `on_demand` on-demand. Emitted only when it
    /// differs from the fleet's current target.
    SetTargetCapacity { family: CpuFamily, total: u32, on_demand: u32 },
    /// Spot could not supply `count` instances (capacity errors on every
    /// candidate type, or every price above its cap): they are asked for
    /// on-demand. The same numbers are in the accompanying
    /// [`Action::SetTargetCapacity`]; this action records why.
    OnDemandFallback { family: CpuFamily, count: u32, reason: FallbackReason },
    /// Terminate these instances. Never a busy one, never a hibernated one
    /// holding a lease (the policy checks; `policy::tests` prove it).
    Terminate { family: CpuFamily, instance_ids: Vec<String>, reason: TerminateReason },
    /// Enforce the price cap in the fleet: set each type's spot max price
    /// (the launch-template overrides' `MaxPrice`, so EC2 launches no spot
    /// instance above it) to its cap. Emitted when the fleet's current max
    /// prices differ from the caps by more than
    /// [`policy::MAX_PRICE_TOLERANCE`] (or name other types).
    SetSpotMaxPrices { family: CpuFamily, prices: Vec<TypePrice> },
    /// Do not launch `instance_type` in `zone` with `capacity` until `until`.
    MarkUnavailable {
        family: CpuFamily,
        instance_type: String,
        zone: String,
        capacity: CapacityType,
        until: Secs,
        reason: UnavailableReason,
    },
}

/// Why spot was bypassed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    /// Every candidate type had a spot capacity error recently.
    SpotCapacityErrors,
    /// Every candidate type's spot price is above its cap.
    SpotPriceAboveCap,
    /// The configuration disables spot.
    SpotDisabled,
}

/// Why instances are terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminateReason {
    /// Idle longer than the idle timeout, and not needed by the queue.
    Idle,
    /// Pending longer than the boot timeout: never showed up (buildbot).
    BootTimeout,
}

/// Why a type is marked unavailable.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnavailableReason {
    /// A capacity error (InsufficientInstanceCapacity and friends).
    CapacityError,
    /// The current spot price is above `multiplier × 24-hour average`.
    PriceAboveCap { price: f64, cap: f64 },
}

/// A policy: a pure function of a snapshot.
pub trait Policy {
    /// The name the simulator prints (`pacloud`, `watch-pending`, ...).
    fn name(&self) -> &str;
    /// The actions for this snapshot, family by family.
    fn decide(&self, snapshot: &Snapshot) -> Vec<Action>;
}
