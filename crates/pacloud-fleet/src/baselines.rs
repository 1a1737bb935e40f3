//! The seeds' policies as written, behind the same [`Policy`] trait, so the
//! simulator compares them with [`crate::PacloudPolicy`] on the same trace.
//!
//! - [`WatchPending`]: Mozilla's aws_watch_pending.
//! - [`PerJob`]: buildbot's EC2 latent workers, one instance per build.
//! - [`Fixed`]: a fixed fleet of N (the original pacloud's static workers).
//!
//! The on-demand-only baseline is [`crate::PacloudPolicy`] with `spot: false`.

use crate::policy::{Config, market};
use crate::snapshot::*;
use crate::{Action, FallbackReason, Policy, TerminateReason};

/// Mozilla aws_watch_pending, as written: per instance type, the pending
/// count minus one for every instance started in the last 20 minutes and
/// 10 % of the older ones (rounded up), whether busy or not; spot first,
/// on-demand when spot requests fail; a per-type limit. Idle instances are
/// stopped by its companion script after `idle_timeout_s`. It knows nothing
/// of hibernation, prices or build history. It runs from a cron (the
/// simulator calls it once a minute).
#[derive(Debug, Clone)]
pub struct WatchPending {
    /// Limits, fresh delay, old fraction (its own rules' numbers).
    pub config: Config,
    /// Idle time before the companion script stops an instance. Default 120 s,
    /// what every comparison in docs/fleet.md has given it (not read from
    /// Mozilla's script); docs/fleet.md also shows it with pacloud's 10 s.
    pub idle_timeout_s: u64,
}

impl Default for WatchPending {
    fn default() -> Self {
        WatchPending { config: Config::default(), idle_timeout_s: 120 }
    }
}

impl Policy for WatchPending {
    fn name(&self) -> &str {
        "watch-pending"
    }

    fn decide(&self, s: &Snapshot) -> Vec<Action> {
        let c = &self.config;
        let mut out = Vec::new();
        for f in &s.families {
            let live: Vec<&Instance> = f
                .instances
                .iter()
                .filter(|i| matches!(i.state, InstanceState::Pending | InstanceState::Running))
                .collect();
            let fresh = live.iter().filter(|i| s.now.saturating_sub(i.launched_at) < c.fresh_instance_delay_s).count();
            let old = live.len() - fresh;
            let delta = fresh as u32 + (old as f64 * c.old_instance_fraction).ceil() as u32;
            let to_start = f.queue.visible.saturating_sub(delta);
            let kill = idle_past(f, s.now, self.idle_timeout_s, f.queue.visible);
            let fleet_count = f.instances.iter().filter(|i| i.state != InstanceState::Stopping).count() as u32;
            let kept = fleet_count - kill.len() as u32;
            push_terminate(&mut out, f, kill, TerminateReason::Idle);
            let total = (kept + to_start).min(c.max_instances);
            let od_live = f
                .instances
                .iter()
                .filter(|i| i.capacity == CapacityType::OnDemand && i.state != InstanceState::Stopping)
                .count() as u32;
            let spot_gone =
                market(f, s.now, &Config { max_price_multiplier: f64::MAX, ..c.clone() }).spot_types.is_empty();
            let od_new = if spot_gone { total.saturating_sub(kept) } else { 0 };
            if od_new > 0 {
                out.push(Action::OnDemandFallback {
                    family: f.family,
                    count: od_new,
                    reason: FallbackReason::SpotCapacityErrors,
                });
            }
            push_target(&mut out, f, total, (od_live + od_new).min(total));
        }
        out
    }
}

/// buildbot EC2 latent workers: a worker (instance) is started for each build
/// that no idle worker takes, at a spot price capped at `price_multiplier ×`
/// the 24-hour average, and shut down after `build_wait_timeout` (600 s, its
/// default) without a build. Spot only: there is no on-demand fallback.
#[derive(Debug, Clone)]
pub struct PerJob {
    pub config: Config,
    pub build_wait_timeout_s: u64,
}

impl Default for PerJob {
    fn default() -> Self {
        PerJob { config: Config::default(), build_wait_timeout_s: 600 }
    }
}

impl Policy for PerJob {
    fn name(&self) -> &str {
        "per-job"
    }

    fn decide(&self, s: &Snapshot) -> Vec<Action> {
        let c = &self.config;
        let mut out = Vec::new();
        for f in &s.families {
            let waiting_for = f
                .instances
                .iter()
                .filter(|i| {
                    i.state == InstanceState::Pending
                        || (i.state == InstanceState::Running && i.idle_since().is_some())
                        || (i.state == InstanceState::Running && i.activity == Activity::Unknown)
                })
                .count() as u32;
            let to_start = f.queue.visible.saturating_sub(waiting_for);
            let kill = idle_past(f, s.now, self.build_wait_timeout_s, f.queue.visible);
            let fleet_count = f.instances.iter().filter(|i| i.state != InstanceState::Stopping).count() as u32;
            let kept = fleet_count - kill.len() as u32;
            push_terminate(&mut out, f, kill, TerminateReason::Idle);
            push_target(&mut out, f, (kept + to_start).min(c.max_instances), 0);
        }
        out
    }
}

/// A fixed fleet of `n` instances per family, never scaled, never terminated.
#[derive(Debug, Clone)]
pub struct Fixed {
    pub n: u32,
}

impl Policy for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }

    fn decide(&self, s: &Snapshot) -> Vec<Action> {
        let mut out = Vec::new();
        for f in &s.families {
            push_target(&mut out, f, self.n, 0);
        }
        out
    }
}

/// Idle running instances past `timeout` beyond the `visible` builds that could use them.
fn idle_past(f: &FamilySnapshot, now: Secs, timeout: u64, visible: u32) -> Vec<&Instance> {
    let mut idle: Vec<&Instance> = f
        .instances
        .iter()
        .filter(|i| {
            i.state == InstanceState::Running
                && !i.may_hold_work()
                && i.idle_since().is_some_and(|s| now.saturating_sub(s) >= timeout)
        })
        .collect();
    idle.sort_by_key(|i| (i.idle_since(), i.id.clone()));
    let keep = visible as usize;
    if idle.len() > keep { idle.split_off(keep) } else { Vec::new() }
}

fn push_terminate(out: &mut Vec<Action>, f: &FamilySnapshot, kill: Vec<&Instance>, reason: TerminateReason) {
    if !kill.is_empty() {
        out.push(Action::Terminate {
            family: f.family,
            instance_ids: kill.into_iter().map(|i| i.id.clone()).collect(),
            reason,
        });
    }
}

fn push_target(out: &mut Vec<Action>, f: &FamilySnapshot, total: u32, on_demand: u32) {
    if (total, on_demand) != (f.fleet.total, f.fleet.on_demand) {
        out.push(Action::SetTargetCapacity { family: f.family, total, on_demand });
    }
}
