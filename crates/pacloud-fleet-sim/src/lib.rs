//! A deterministic, discrete-event simulator of pacloud's worker fleet.
//!
//! [`trace`] draws one day of builds for a seed (Poisson arrivals with a
//! diurnal profile and bursts, heavy-tailed build times); [`run`] plays it
//! against one policy in a world with a spot market, capacity outages,
//! interruptions, hibernation and pacloud's lease/requeue rules
//! ([`world`] documents them). Every policy — the project's
//! [`pacloud_fleet::PacloudPolicy`], the very code the scaler Lambda runs,
//! and the seeds' baselines — sees the same trace and the same market.
//! [`params`] holds the defaults and their sources; [`plot`] draws SVG.

pub mod params;
pub mod plot;
pub mod rng;
pub mod world;

use pacloud_fleet::baselines::{Fixed, PerJob, WatchPending};
use pacloud_fleet::{Config, PacloudPolicy};

pub use params::Params;
pub use world::{Interruption, Job, MaxPrice, Outcome, Setup, Triggers, run, trace};

/// The policies, in the order they are printed.
pub const POLICIES: [&str; 5] = ["pacloud", "watch-pending", "per-job", "fixed", "on-demand"];

/// Simulates the named policy (one of [`POLICIES`]) on `jobs`; None for an unknown name.
pub fn simulate(p: &Params, jobs: &[Job], name: &str) -> Option<Outcome> {
    simulate_with(p, jobs, name, &Config::default())
}

/// [`simulate`] with a policy configuration (shared by pacloud and the baselines that use its fields).
pub fn simulate_with(p: &Params, jobs: &[Job], name: &str, c: &Config) -> Option<Outcome> {
    let c = c.clone();
    let setup = |interruption, max_price, triggers| Setup { interruption, max_price, triggers };
    let cron = Triggers::periodic(p.tick_s);
    // pacloud's scaler: the schedule, a nudge from the API per new job, and
    // one from a worker idle past the idle timeout.
    let nudged = Triggers { period_s: p.tick_s, on_enqueue: true, on_idle_after_s: Some(c.idle_timeout_s) };
    let o = match name {
        // The project's: hibernate on interruption, buildbot's price cap in the fleet.
        "pacloud" => run(
            p,
            jobs,
            &PacloudPolicy::new(c.clone()).ok()?,
            setup(Interruption::Hibernate, MaxPrice::Multiplier(c.max_price_multiplier), nudged),
        ),
        // Mozilla: a cron; spot requests terminated on interruption, bid up to on-demand.
        "watch-pending" => run(
            p,
            jobs,
            &WatchPending { config: c, idle_timeout_s: p.watch_pending_idle_s },
            setup(Interruption::Terminate, MaxPrice::OnDemand, cron),
        ),
        // buildbot latent workers: one instance per build, substantiated when
        // the build request arrives and shut down by its own idle timer;
        // price multiplier cap.
        "per-job" => {
            let pj = PerJob { config: c, build_wait_timeout_s: 600 };
            let m = pj.config.max_price_multiplier;
            let timers = Triggers { on_enqueue: true, on_idle_after_s: Some(pj.build_wait_timeout_s), ..cron };
            run(p, jobs, &pj, setup(Interruption::Terminate, MaxPrice::Multiplier(m), timers))
        }
        // The original static workers: N spot instances, replaced when interrupted.
        "fixed" => run(p, jobs, &Fixed { n: p.fixed_n() }, setup(Interruption::Terminate, MaxPrice::OnDemand, cron)),
        // pacloud's sizing and triggers on on-demand capacity.
        "on-demand" => run(
            p,
            jobs,
            &PacloudPolicy::new(Config { spot: false, ..c }).ok()?,
            setup(Interruption::Terminate, MaxPrice::OnDemand, nudged),
        ),
        _ => return None,
    };
    Some(o)
}
