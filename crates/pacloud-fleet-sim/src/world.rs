//! The discrete-event world: jobs, instances, a spot market, an EC2 Fleet
//! `maintain`, and pacloud's lease/requeue rules. One [`run`] simulates one
//! policy on the trace of a seed.
//!
//! Rules the world applies (the project's real ones):
//! - A worker takes a visible job as soon as it is idle (long poll).
//! - A spot interruption of a fleet with `hibernate` hibernates the
//!   instance; its build keeps its memory. After the lease (60 s) the job is
//!   visible again: if another worker starts it first, it restarts from
//!   scratch and the hibernated copy is lost when its instance resumes; if
//!   the instance resumes while the job still waits, it re-takes the job and
//!   goes on (the worker re-checks its lease on resume).
//! - With `terminate` behaviour (the seeds), the worker releases its job on
//!   the notice: it restarts from scratch.
//! - The fleet is `maintain` with `no-termination` on a lower target: it
//!   launches up to the target (on-demand part first), spot types cheapest
//!   first among those the policy has not marked unavailable and whose price
//!   is under its max price (the one the policy set with `SetSpotMaxPrices`,
//!   else the policy's fixed rule); a type in a capacity outage fails with
//!   a capacity error. Hibernated instances count toward the target.
//! - Billing: per second with a 60-second minimum per start, at the spot
//!   price of the moment (or on-demand), from launch to stop; nothing while
//!   hibernated (EBS storage is ignored for every policy alike).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use pacloud_domain::eta::{self, BuildHistory};
use pacloud_domain::stats::BuildTimes;
use pacloud_fleet::policy::price_caps;
use pacloud_fleet::{
    Action, Activity, CapacityError, CapacityType, CpuFamily, FamilySnapshot, FleetTarget, Instance, InstanceState,
    OnDemandPrice, Policy, PricePoint, QueueDepth, Snapshot, TypePrice,
};

use crate::params::{Params, TYPES};
use crate::rng::Rng;

/// What a spot interruption does to an instance of this policy's fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    Hibernate,
    Terminate,
}

/// How the fleet caps spot prices for this policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxPrice {
    /// The on-demand price (the EC2 default).
    OnDemand,
    /// `multiplier × the 24-hour average` (buildbot), capped at on-demand.
    Multiplier(f64),
}

/// When a policy decides: its period, and the events that call it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Triggers {
    /// Seconds between periodic decisions (a cron or a schedule every minute).
    pub period_s: u64,
    /// A decision `Params::nudge_s` after a build is enqueued. pacloud's API
    /// sends a nudge to the scaler's events queue for every new job;
    /// buildbot substantiates a latent worker when a build request arrives.
    pub on_enqueue: bool,
    /// A decision `Params::nudge_s` after a worker has been idle this long.
    /// pacloud's worker nudges the scaler when idle past the idle timeout;
    /// buildbot's latent worker shuts down on its own `build_wait_timeout`
    /// timer.
    pub on_idle_after_s: Option<u64>,
}

impl Triggers {
    /// A cron: the period only.
    pub fn periodic(period_s: u64) -> Triggers {
        Triggers { period_s, on_enqueue: false, on_idle_after_s: None }
    }
}

/// How one policy's fleet behaves in the world.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setup {
    pub interruption: Interruption,
    pub max_price: MaxPrice,
    /// The market moves every `Params::tick_s` whatever the policy's
    /// triggers, so every policy of a seed meets the same prices and outages.
    pub triggers: Triggers,
}

/// A job of the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub arrival: u64,
    pub atom: u32,
    pub duration: u64,
}

/// The same arrivals and build times for every policy of a seed.
pub fn trace(p: &Params) -> Vec<Job> {
    let mut r = Rng::stream(p.seed, 1);
    let mut atom_median = Vec::with_capacity(p.atoms as usize);
    for _ in 0..p.atoms {
        atom_median.push(r.lognormal(p.build_median_s, p.build_sigma).clamp(10.0, p.build_max_s));
    }
    let end = p.hours * 3600.0;
    let max_rate = p.arrival_rate * (1.0 + p.diurnal_amplitude) / 3600.0;
    let mut times = Vec::new();
    let mut t = 0.0;
    if max_rate > 0.0 {
        loop {
            t += r.exponential(1.0 / max_rate);
            if t >= end {
                break;
            }
            let h = t / 3600.0;
            let phase = 2.0 * std::f64::consts::PI * (h - p.peak_hour + 6.0) / 24.0;
            let rate = p.arrival_rate * (1.0 + p.diurnal_amplitude * phase.sin()) / 3600.0;
            if r.chance(rate / max_rate) {
                times.push(t);
            }
        }
    }
    let bursts = (p.bursts_per_day * p.hours / 24.0).round() as u32;
    let size = (p.arrival_rate / 2.0).max(10.0).round() as u32;
    for _ in 0..bursts {
        let at = r.uniform() * end;
        for _ in 0..size {
            times.push((at + r.uniform() * 120.0).min(end - 1.0));
        }
    }
    times.sort_by(f64::total_cmp);
    times
        .into_iter()
        .map(|t| {
            // Popular atoms are rebuilt more often (a quadratic skew).
            let u = r.uniform();
            let atom = ((u * u) * f64::from(p.atoms)) as u32;
            let d = (atom_median[atom as usize] * r.lognormal(1.0, 0.25)).clamp(10.0, p.build_max_s);
            Job { arrival: t as u64, atom, duration: d.round() as u64 }
        })
        .collect()
}

/// Totals of one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub policy: String,
    pub builds: u64,
    pub cost_usd: f64,
    pub cost_per_build_usd: f64,
    pub wait_p50_s: u64,
    pub wait_p95_s: u64,
    pub wait_max_s: u64,
    pub instance_hours: f64,
    /// Hours instances spent building (finished builds and lost attempts):
    /// `instance_hours - busy_hours` is boot and idle time.
    pub busy_hours: f64,
    /// Decisions taken (periodic ticks plus enqueue nudges).
    pub decisions: u64,
    pub on_demand_hours: f64,
    pub interrupted_builds: u64,
    pub lost_build_hours: f64,
    pub launches: u64,
    pub capacity_errors: u64,
    pub peak_instances: u32,
    /// Terminations the world refused (busy, hibernated or leased instances): must be 0.
    pub unsafe_terminations: u64,
    /// Per tick: (hours, visible queue, live instances, cumulative cost USD).
    #[serde(skip)]
    pub series: Vec<(f64, u32, u32, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Pending,
    Running,
    Hibernated,
    Gone,
}

#[derive(Debug, Clone)]
struct Inst {
    ty: usize,
    cap: CapacityType,
    st: St,
    launched_at: u64,
    epoch: u32,
    job: Option<usize>,
    idle_since: u64,
    max_price: f64,
    /// Start of the current billed segment, and its accrued cost.
    seg_start: u64,
    seg_billed_to: u64,
    seg_cost: f64,
}

#[derive(Debug, Clone, Default)]
struct JobSt {
    started: Option<u64>,
    owner: Option<usize>,
    attempt_start: u64,
    progress: u64,
    done: bool,
    epoch: u32,
    /// The atom's median build time when this attempt started (what the
    /// worker tags as its expected end); None without history.
    expected_s: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Tick,
    Arrival(usize),
    Ready(usize, u32),
    Done(usize, u32),
    LeaseExpired(usize, u32),
    Resume(usize, u32),
    Decide,
    Nudge,
    /// Instance, epoch, idle since: still idle then, its worker nudges.
    IdleCheck(usize, u32, u64),
}

struct World<'a> {
    p: &'a Params,
    jobs: &'a [Job],
    js: Vec<JobSt>,
    inst: Vec<Inst>,
    queue: VecDeque<usize>,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    now: u64,
    /// Interruptions and resumes (their draws depend on the policy's fleet).
    rng: Rng,
    /// The market (prices and outages) is the same for every policy of a seed.
    market_rng: Rng,
    price: Vec<f64>,
    history: Vec<PricePoint>,
    outage_until: Vec<u64>,
    unavailable: BTreeMap<usize, u64>,
    errors: Vec<CapacityError>,
    fleet: FleetTarget,
    /// The newest finished build times over all atoms, kept and read as the
    /// workers' `stats/all.json` is (the scaler's `fleet_median_s`).
    durations_done: BuildTimes,
    /// Per atom, the newest finished build times (at most `eta::PER_ATOM`),
    /// as the workers' `stats/atoms/<atom>.json` keeps them: a worker
    /// starting a build tags its expected end with that median.
    builds: BuildHistory,
    o: Outcome,
    cost_closed: f64,
    behaviour: Interruption,
    max_price: MaxPrice,
    triggers: Triggers,
    nudge_pending: bool,
    /// The fleet's spot max price per type, as the policy set it
    /// (`SetSpotMaxPrices`); a type without one launches up to `max_price`.
    fleet_max_prices: Vec<Option<f64>>,
}

/// Simulates `policy` on `jobs` (from [`trace`] of the same `p`).
pub fn run(p: &Params, jobs: &[Job], policy: &dyn Policy, setup: Setup) -> Outcome {
    let mut w = World {
        p,
        jobs,
        js: vec![JobSt::default(); jobs.len()],
        inst: Vec::new(),
        queue: VecDeque::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        now: 0,
        rng: Rng::stream(p.seed, 2),
        market_rng: Rng::stream(p.seed, 3),
        price: TYPES.iter().map(|t| t.on_demand * t.spot_fraction).collect(),
        history: Vec::new(),
        outage_until: vec![0; TYPES.len()],
        unavailable: BTreeMap::new(),
        errors: Vec::new(),
        fleet: FleetTarget::default(),
        durations_done: BuildTimes::default(),
        builds: BuildHistory::default(),
        o: Outcome {
            policy: policy.name().to_owned(),
            builds: 0,
            cost_usd: 0.0,
            cost_per_build_usd: 0.0,
            wait_p50_s: 0,
            wait_p95_s: 0,
            wait_max_s: 0,
            instance_hours: 0.0,
            busy_hours: 0.0,
            decisions: 0,
            on_demand_hours: 0.0,
            interrupted_builds: 0,
            lost_build_hours: 0.0,
            launches: 0,
            capacity_errors: 0,
            peak_instances: 0,
            unsafe_terminations: 0,
            series: Vec::new(),
        },
        cost_closed: 0.0,
        behaviour: setup.interruption,
        max_price: setup.max_price,
        triggers: Triggers { period_s: setup.triggers.period_s.max(1), ..setup.triggers },
        nudge_pending: false,
        fleet_max_prices: vec![None; TYPES.len()],
    };
    // A day of price history before the start, so the 24-hour average exists at t = 0.
    w.warm_up_prices();
    for (i, j) in jobs.iter().enumerate() {
        w.push(T0 + j.arrival, Ev::Arrival(i));
    }
    w.push(T0, Ev::Tick);
    w.push(T0, Ev::Decide);
    let arrivals_end = T0 + (p.hours * 3600.0) as u64;
    let hard_end = arrivals_end + 48 * 3600;
    let mut last_done = 0;
    while let Some(Reverse((t, _, ev))) = w.heap.pop() {
        if t > hard_end {
            break;
        }
        w.now = t;
        match ev {
            Ev::Arrival(j) => {
                w.queue.push_back(j);
                w.dispatch();
                if w.triggers.on_enqueue {
                    w.nudge();
                }
            }
            Ev::Nudge => {
                w.nudge_pending = false;
                w.accrue();
                w.scale(policy);
            }
            Ev::Ready(i, e) if w.inst[i].epoch == e && w.inst[i].st == St::Pending => {
                w.inst[i].st = St::Running;
                w.went_idle(i);
                w.dispatch();
            }
            Ev::Done(i, e) if w.inst[i].epoch == e && w.inst[i].st == St::Running => {
                let j = w.inst[i].job.take().expect("a running build");
                w.o.busy_hours += t.saturating_sub(w.js[j].attempt_start) as f64 / 3600.0;
                w.js[j].done = true;
                w.js[j].owner = None;
                w.o.builds += 1;
                w.durations_done.push(w.jobs[j].duration as f64, eta::ALL_ATOMS);
                w.builds.record(&w.jobs[j].atom.to_string(), w.jobs[j].duration as f64);
                w.went_idle(i);
                last_done = t;
                w.dispatch();
            }
            Ev::LeaseExpired(j, e) if w.js[j].epoch == e && !w.js[j].done => {
                if let Some(i) = w.js[j].owner
                    && w.inst[i].st == St::Hibernated
                {
                    w.js[j].owner = None;
                    w.queue.push_front(j);
                    w.dispatch();
                }
            }
            Ev::Resume(i, e) if w.inst[i].epoch == e && w.inst[i].st == St::Hibernated => w.resume(i),
            Ev::Tick => {
                let all_done = t >= arrivals_end && w.js.iter().all(|j| j.done);
                if all_done {
                    break;
                }
                w.tick();
                w.push(t + p.tick_s, Ev::Tick);
            }
            Ev::Decide => {
                w.accrue();
                w.scale(policy);
                w.push(t + w.triggers.period_s, Ev::Decide);
            }
            Ev::IdleCheck(i, e, since) => {
                let x = &w.inst[i];
                if x.epoch == e && x.st == St::Running && x.job.is_none() && x.idle_since == since {
                    w.nudge();
                }
            }
            _ => {}
        }
    }
    let end = arrivals_end.max(last_done);
    w.now = end;
    for i in 0..w.inst.len() {
        if matches!(w.inst[i].st, St::Pending | St::Running) {
            w.stop_billing(i);
        }
    }
    w.finish(end)
}

/// The simulated clock starts one day in, so that a day of spot price
/// history precedes the first decision.
pub const T0: u64 = 24 * 3600;

impl World<'_> {
    /// A decision `nudge_s` from now, unless one is already coming.
    fn nudge(&mut self) {
        if !self.nudge_pending {
            self.nudge_pending = true;
            self.push(self.now + self.p.nudge_s, Ev::Nudge);
        }
    }

    /// Instance `i` has no build from now on (it may take one at once).
    fn went_idle(&mut self, i: usize) {
        self.inst[i].idle_since = self.now;
        if let Some(after) = self.triggers.on_idle_after_s {
            let e = self.inst[i].epoch;
            self.push(self.now + after, Ev::IdleCheck(i, e, self.now));
        }
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    fn warm_up_prices(&mut self) {
        let steps = 24 * 3600 / 600;
        for s in 0..steps {
            let at = s * 600;
            self.walk_prices(600.0);
            for (k, t) in TYPES.iter().enumerate() {
                self.history.push(PricePoint {
                    instance_type: t.name.into(),
                    zone: "a".into(),
                    usd_per_hour: self.price[k],
                    at,
                });
            }
        }
    }

    fn walk_prices(&mut self, dt: f64) {
        let theta: f64 = 1.0 / (6.0 * 3600.0);
        for (k, t) in TYPES.iter().enumerate() {
            let mean = t.on_demand * t.spot_fraction;
            let sd = self.p.price_sd * mean;
            let sigma = sd * (2.0 * theta).sqrt();
            let x = self.price[k] + theta * (mean - self.price[k]) * dt + sigma * dt.sqrt() * self.market_rng.normal();
            self.price[k] = x.clamp(0.2 * mean, t.on_demand);
        }
    }

    fn spot_price(&self, k: usize) -> f64 {
        self.price[k]
    }

    fn hourly(&self, i: usize) -> f64 {
        let x = &self.inst[i];
        match x.cap {
            CapacityType::Spot => self.spot_price(x.ty),
            CapacityType::OnDemand => TYPES[x.ty].on_demand,
        }
    }

    /// Accrues cost of running instances up to `now` at the current price.
    fn accrue(&mut self) {
        for i in 0..self.inst.len() {
            if matches!(self.inst[i].st, St::Pending | St::Running) {
                let h = self.hourly(i);
                let x = &mut self.inst[i];
                x.seg_cost += h * self.now.saturating_sub(x.seg_billed_to) as f64 / 3600.0;
                x.seg_billed_to = self.now;
            }
        }
    }

    fn stop_billing(&mut self, i: usize) {
        let h = self.hourly(i);
        let x = &mut self.inst[i];
        x.seg_cost += h * self.now.saturating_sub(x.seg_billed_to) as f64 / 3600.0;
        let secs = self.now.saturating_sub(x.seg_start).max(60);
        if self.now.saturating_sub(x.seg_start) < 60 {
            x.seg_cost = h * 60.0 / 3600.0;
        }
        self.o.instance_hours += secs as f64 / 3600.0;
        if x.cap == CapacityType::OnDemand {
            self.o.on_demand_hours += secs as f64 / 3600.0;
        }
        self.cost_closed += x.seg_cost;
        x.seg_cost = 0.0;
        x.seg_start = self.now;
        x.seg_billed_to = self.now;
    }

    fn start_billing(&mut self, i: usize) {
        let x = &mut self.inst[i];
        x.seg_start = self.now;
        x.seg_billed_to = self.now;
        x.seg_cost = 0.0;
    }

    fn live(&self) -> u32 {
        self.inst.iter().filter(|x| x.st != St::Gone).count() as u32
    }

    /// Idle running workers take visible jobs.
    fn dispatch(&mut self) {
        while let Some(&j) = self.queue.front() {
            let Some(i) = self.inst.iter().position(|x| x.st == St::Running && x.job.is_none()) else { break };
            self.queue.pop_front();
            self.start(i, j, true);
        }
    }

    fn start(&mut self, i: usize, j: usize, from_scratch: bool) {
        let now = self.now;
        let js = &mut self.js[j];
        if from_scratch {
            self.o.lost_build_hours += js.progress as f64 / 3600.0;
            js.progress = 0;
        }
        js.started.get_or_insert(now);
        js.owner = Some(i);
        js.attempt_start = now;
        js.epoch += 1;
        js.expected_s = self.builds.atom_median(&self.jobs[j].atom.to_string()).map(|m| m.round() as u64);
        let remaining = self.jobs[j].duration.saturating_sub(js.progress).max(1);
        self.inst[i].job = Some(j);
        let e = self.inst[i].epoch;
        self.push(now + remaining, Ev::Done(i, e));
    }

    fn resume(&mut self, i: usize) {
        self.inst[i].st = St::Running;
        self.inst[i].epoch += 1;
        self.start_billing(i);
        self.went_idle(i);
        if let Some(j) = self.inst[i].job.take() {
            let mine = self.js[j].owner == Some(i);
            let waiting = !self.js[j].done && self.js[j].owner.is_none() && self.queue.contains(&j);
            if mine || waiting {
                // The lease re-check succeeds: nobody else took the build.
                self.queue.retain(|&q| q != j);
                self.start(i, j, false);
            }
        }
        self.dispatch();
    }

    fn interrupt(&mut self, i: usize) {
        self.accrue();
        self.stop_billing(i);
        self.inst[i].epoch += 1;
        let job = self.inst[i].job;
        if let Some(j) = job {
            self.o.interrupted_builds += 1;
            let done = self.now - self.js[j].attempt_start;
            self.o.busy_hours += done as f64 / 3600.0;
            self.js[j].progress += done;
        }
        let hibernate = self.behaviour == Interruption::Hibernate && self.inst[i].st == St::Running;
        if hibernate {
            self.inst[i].st = St::Hibernated;
            if let Some(j) = job {
                let e = self.js[j].epoch;
                self.push(self.now + self.p.lease_s, Ev::LeaseExpired(j, e));
            }
            let back = self.rng.exponential(self.p.resume_mean_s) as u64 + 1;
            let e = self.inst[i].epoch;
            self.push(self.now + back, Ev::Resume(i, e));
        } else {
            self.inst[i].st = St::Gone;
            if let Some(j) = self.inst[i].job.take() {
                self.js[j].owner = None;
                self.queue.push_front(j);
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let now = self.now;
        let instances = self
            .inst
            .iter()
            .enumerate()
            .filter(|(_, x)| x.st != St::Gone)
            .map(|(i, x)| {
                let (state, activity, holds_lease) = match (x.st, x.job) {
                    (St::Pending, _) => (InstanceState::Pending, Activity::Unknown, false),
                    (st, Some(j)) => {
                        let js = &self.js[j];
                        let expected = js.expected_s.map(|d| js.attempt_start + d.saturating_sub(js.progress));
                        let state = if st == St::Running { InstanceState::Running } else { InstanceState::Hibernated };
                        (
                            state,
                            Activity::Busy { since: js.attempt_start, expected_done_at: expected },
                            js.owner == Some(i),
                        )
                    }
                    (St::Running, None) => (InstanceState::Running, Activity::Idle { since: x.idle_since }, false),
                    (_, None) => (InstanceState::Hibernated, Activity::Idle { since: x.idle_since }, false),
                };
                Instance {
                    id: format!("i{i}"),
                    instance_type: TYPES[x.ty].name.into(),
                    zone: "a".into(),
                    capacity: x.cap,
                    state,
                    launched_at: x.launched_at,
                    activity,
                    holds_lease,
                }
            })
            .collect();
        let fam = FamilySnapshot {
            family: CpuFamily::X86_64,
            queue: QueueDepth {
                visible: self.queue.len() as u32,
                in_flight: self.js.iter().filter(|j| j.owner.is_some()).count() as u32,
            },
            instances,
            fleet: self.fleet,
            instance_types: TYPES.iter().map(|t| t.name.to_string()).collect(),
            spot_prices: self.history.iter().filter(|h| h.at + 24 * 3600 >= now).cloned().collect(),
            on_demand_prices: TYPES
                .iter()
                .map(|t| OnDemandPrice { instance_type: t.name.into(), usd_per_hour: t.on_demand })
                .collect(),
            capacity_errors: self.errors.iter().filter(|e| e.at + 900 >= now).cloned().collect(),
            median_build_s: self.durations_done.fleet_median_s(),
            spot_max_prices: TYPES
                .iter()
                .zip(&self.fleet_max_prices)
                .filter_map(|(t, p)| p.map(|usd| TypePrice { instance_type: t.name.into(), usd_per_hour: usd }))
                .collect(),
        };
        Snapshot { now, families: vec![fam] }
    }

    fn caps(&self) -> Vec<f64> {
        let by_policy = self.fleet_max_prices.clone();
        let default = self.default_caps();
        by_policy.into_iter().zip(default).map(|(p, d)| p.unwrap_or(d)).collect()
    }

    fn default_caps(&self) -> Vec<f64> {
        match self.max_price {
            MaxPrice::OnDemand => TYPES.iter().map(|t| t.on_demand).collect(),
            MaxPrice::Multiplier(m) => {
                let snap = self.snapshot();
                let caps = price_caps(&snap.families[0], self.now, m);
                TYPES
                    .iter()
                    .map(|t| caps.iter().find(|c| c.instance_type == t.name).map_or(t.on_demand, |c| c.cap))
                    .collect()
            }
        }
    }

    /// The market's minute: prices, outages, interruptions.
    fn tick(&mut self) {
        let dt = self.p.tick_s as f64;
        self.accrue();
        self.walk_prices(dt);
        if self.now.is_multiple_of(600) {
            for (k, t) in TYPES.iter().enumerate() {
                self.history.push(PricePoint {
                    instance_type: t.name.into(),
                    zone: "a".into(),
                    usd_per_hour: self.price[k],
                    at: self.now,
                });
            }
            let keep_from = self.now.saturating_sub(24 * 3600);
            self.history.retain(|h| h.at >= keep_from);
        }
        for k in 0..TYPES.len() {
            let starts = self.market_rng.chance(self.p.capacity_error_rate * dt / 3600.0);
            let length = self.market_rng.exponential(self.p.outage_mean_s) as u64;
            if starts && self.outage_until[k] <= self.now {
                self.outage_until[k] = self.now + length;
            }
        }
        // Interruptions: the rate per instance-hour, and a price above the instance's max price.
        for i in 0..self.inst.len() {
            let x = &self.inst[i];
            if x.cap == CapacityType::Spot && matches!(x.st, St::Pending | St::Running) {
                let over = self.spot_price(x.ty) > x.max_price;
                if over || self.rng.chance(self.p.interruption_rate * dt / 3600.0) {
                    self.interrupt(i);
                }
            }
        }
        self.dispatch();
        let live = self.live();
        let running_cost: f64 = self.inst.iter().map(|x| x.seg_cost).sum();
        self.o.series.push((
            (self.now - T0) as f64 / 3600.0,
            self.queue.len() as u32,
            live,
            self.cost_closed + running_cost,
        ));
    }

    /// One decision of the policy, applied: the snapshot, the actions, the
    /// fleet's `maintain`, and idle workers taking what is visible.
    fn scale(&mut self, policy: &dyn Policy) {
        self.o.decisions += 1;
        let snap = self.snapshot();
        for a in policy.decide(&snap) {
            match a {
                Action::SetTargetCapacity { total, on_demand, .. } => self.fleet = FleetTarget { total, on_demand },
                Action::Terminate { instance_ids, .. } => {
                    for id in instance_ids {
                        let Some(i) = id.strip_prefix('i').and_then(|n| n.parse::<usize>().ok()) else { continue };
                        let x = &self.inst[i];
                        if x.st == St::Hibernated || x.job.is_some() {
                            self.o.unsafe_terminations += 1;
                            continue;
                        }
                        if x.st != St::Gone {
                            self.stop_billing(i);
                            self.inst[i].st = St::Gone;
                            self.inst[i].epoch += 1;
                        }
                    }
                }
                Action::SetSpotMaxPrices { prices, .. } => {
                    self.fleet_max_prices = vec![None; TYPES.len()];
                    for p in prices {
                        if let Some(k) = TYPES.iter().position(|t| t.name == p.instance_type) {
                            self.fleet_max_prices[k] = Some(p.usd_per_hour);
                        }
                    }
                }
                Action::MarkUnavailable { instance_type, capacity: CapacityType::Spot, until, .. } => {
                    if let Some(k) = TYPES.iter().position(|t| t.name == instance_type) {
                        let u = self.unavailable.entry(k).or_insert(0);
                        *u = (*u).max(until);
                    }
                }
                _ => {}
            }
        }
        self.maintain();
        self.dispatch();
        self.o.peak_instances = self.o.peak_instances.max(self.live());
    }

    /// EC2 Fleet `maintain`: launch up to the target.
    fn maintain(&mut self) {
        let mut live = self.live();
        let mut od = self.inst.iter().filter(|x| x.st != St::Gone && x.cap == CapacityType::OnDemand).count() as u32;
        while live < self.fleet.total && od < self.fleet.on_demand {
            let k = (0..TYPES.len()).min_by(|&a, &b| TYPES[a].on_demand.total_cmp(&TYPES[b].on_demand)).unwrap_or(0);
            self.launch(k, CapacityType::OnDemand, TYPES[k].on_demand);
            live += 1;
            od += 1;
        }
        if live >= self.fleet.total {
            return;
        }
        let caps = self.caps();
        let mut order: Vec<usize> = (0..TYPES.len())
            .filter(|&k| self.unavailable.get(&k).is_none_or(|&u| u <= self.now))
            .filter(|&k| self.spot_price(k) <= caps[k])
            .collect();
        order.sort_by(|&a, &b| self.spot_price(a).total_cmp(&self.spot_price(b)));
        let mut failed = vec![false; TYPES.len()];
        while live < self.fleet.total {
            let Some(&k) = order.iter().find(|&&k| !failed[k]) else { break };
            if self.outage_until[k] > self.now {
                failed[k] = true;
                self.o.capacity_errors += 1;
                self.errors.push(CapacityError {
                    instance_type: TYPES[k].name.into(),
                    zone: "a".into(),
                    capacity: CapacityType::Spot,
                    at: self.now,
                });
                continue;
            }
            self.launch(k, CapacityType::Spot, caps[k]);
            live += 1;
        }
        let keep_from = self.now.saturating_sub(3600);
        self.errors.retain(|e| e.at >= keep_from);
    }

    fn launch(&mut self, k: usize, cap: CapacityType, max_price: f64) {
        let i = self.inst.len();
        self.inst.push(Inst {
            ty: k,
            cap,
            st: St::Pending,
            launched_at: self.now,
            epoch: 0,
            job: None,
            idle_since: self.now,
            max_price,
            seg_start: self.now,
            seg_billed_to: self.now,
            seg_cost: 0.0,
        });
        self.start_billing(i);
        self.o.launches += 1;
        self.push(self.now + self.p.boot_s, Ev::Ready(i, 0));
    }

    fn finish(mut self, end: u64) -> Outcome {
        let mut waits: Vec<u64> = self
            .jobs
            .iter()
            .zip(&self.js)
            .map(|(j, s)| s.started.unwrap_or(end.max(T0 + j.arrival)).saturating_sub(T0 + j.arrival))
            .collect();
        waits.sort_unstable();
        let pct = |q: f64| -> u64 {
            if waits.is_empty() { 0 } else { waits[((waits.len() - 1) as f64 * q).round() as usize] }
        };
        self.o.wait_p50_s = pct(0.5);
        self.o.wait_p95_s = pct(0.95);
        self.o.wait_max_s = waits.last().copied().unwrap_or(0);
        self.o.cost_usd = self.cost_closed;
        self.o.cost_per_build_usd = if self.o.builds == 0 { 0.0 } else { self.cost_closed / self.o.builds as f64 };
        self.o
    }
}
