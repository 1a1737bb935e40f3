//! The simulated world's parameters, their defaults, and where each default
//! comes from. `docs/fleet.md` ("Economics") repeats this table.

/// An instance type on the simulated market.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeSpec {
    pub name: &'static str,
    /// On-demand list price, USD per hour (Linux, us-east-1, as published by
    /// AWS for these 4-vCPU types in 2024–2025).
    pub on_demand: f64,
    /// Long-run mean spot price as a fraction of on-demand (the Spot Instance
    /// Advisor shows 55–70 % savings for these families in us-east-1).
    pub spot_fraction: f64,
}

/// The x86-64 candidate types of `CpuFamily::X86_64` with their prices.
pub const TYPES: &[TypeSpec] = &[
    TypeSpec { name: "c6i.xlarge", on_demand: 0.170, spot_fraction: 0.40 },
    TypeSpec { name: "c6a.xlarge", on_demand: 0.153, spot_fraction: 0.42 },
    TypeSpec { name: "c5.xlarge", on_demand: 0.170, spot_fraction: 0.38 },
    TypeSpec { name: "c7i.xlarge", on_demand: 0.1785, spot_fraction: 0.45 },
    TypeSpec { name: "m6i.xlarge", on_demand: 0.192, spot_fraction: 0.40 },
    TypeSpec { name: "m6a.xlarge", on_demand: 0.1728, spot_fraction: 0.42 },
    TypeSpec { name: "m5.xlarge", on_demand: 0.192, spot_fraction: 0.38 },
];

/// Everything that shapes a simulated day.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub seed: u64,
    /// Simulated hours of arrivals; the run then drains the queue.
    pub hours: f64,
    /// Mean Poisson arrivals per hour over the day (bursts come on top).
    /// Default 30: a community binhost's load is unknown; 30/h is a busy
    /// hobby service (720 builds a day); quiet (5/h) and busy (150/h) days
    /// are part of scripts/fleet-sim.sh.
    pub arrival_rate: f64,
    /// Diurnal swing: rate(t) = R·(1 + A·sin(2π(h − peak + 6)/24)), A = 0.6,
    /// peak at 15:00 UTC (Europe's afternoon, America's morning).
    pub diurnal_amplitude: f64,
    pub peak_hour: f64,
    /// Bursts per day (a stabilisation or a security bump rebuilds many
    /// packages at once): each brings max(10, R/2) builds within 2 minutes.
    pub bursts_per_day: f64,
    /// Spot interruptions per spot instance-hour. Default 0.0003: the
    /// Advisor's worst band ">20 %" of instances interrupted a month,
    /// 0.2 / 730 h, rounded up (conservative for these families, which are
    /// mostly in the "<5 %" band).
    pub interruption_rate: f64,
    /// Spot capacity outages per instance type-hour (a launch of that type
    /// fails with InsufficientInstanceCapacity while it lasts). Default 0.02.
    pub capacity_error_rate: f64,
    /// Mean outage length, seconds. Default 1200.
    pub outage_mean_s: f64,
    /// Launch to worker polling. Default 60 s (EC2 boot of AL2023 + worker start).
    pub boot_s: u64,
    /// Mean time until EC2 resumes a hibernated spot instance (capacity
    /// back). Default 900 s (an assumption: AWS publishes no figure).
    pub resume_mean_s: f64,
    /// The worker lease / visibility timeout. Default 60 s (the template's
    /// LeaseSeconds); a hibernated worker's build is requeued after it.
    pub lease_s: u64,
    /// The market's step and every policy's period. Default 60 s (a cron
    /// or an EventBridge schedule every minute).
    pub tick_s: u64,
    /// Event to decision, for policies triggered by events (an enqueue, an
    /// idle worker). Default 5 s: a SendMessage to the fleet events queue,
    /// the SQS event source mapping handing the batch to the scaler
    /// (reserved concurrency 1), and the tick's reads before it acts. The
    /// same for buildbot's direct EC2 calls (AWS publishes neither figure).
    pub nudge_s: u64,
    /// Build time: an atom's median is log-normal(median, σ), each build of
    /// it log-normal around that with σ = 0.25, capped. Defaults 240 s,
    /// σ = 1.3, cap 6 h: most builds take minutes (p50 4 min, mean 9 min),
    /// 1 % over 80 min (gcc, llvm, rust, chromium on 4 vCPUs take 1–6 h).
    pub build_median_s: f64,
    pub build_sigma: f64,
    pub build_max_s: f64,
    pub atoms: u32,
    /// Spot price walk: mean-reverting (Ornstein–Uhlenbeck) around
    /// `spot_fraction × on_demand`, stationary s.d. `price_sd` of the mean,
    /// reversion time 6 h. Default s.d. 0.08.
    pub price_sd: f64,
    /// Fixed fleet size for `fixed` (None: 1.5 × the mean busy instances, R × mean build / 3600).
    pub fixed_size: Option<u32>,
    /// Idle time before watch-pending's companion script stops an instance.
    /// Default 120 s (`WatchPending::default()`); a sensitivity knob.
    pub watch_pending_idle_s: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            seed: 1,
            hours: 24.0,
            arrival_rate: 30.0,
            diurnal_amplitude: 0.6,
            peak_hour: 15.0,
            bursts_per_day: 3.0,
            interruption_rate: 0.0003,
            capacity_error_rate: 0.02,
            outage_mean_s: 1200.0,
            boot_s: 60,
            resume_mean_s: 900.0,
            lease_s: 60,
            tick_s: 60,
            nudge_s: 5,
            build_median_s: 240.0,
            build_sigma: 1.3,
            build_max_s: 6.0 * 3600.0,
            atoms: 400,
            price_sd: 0.08,
            fixed_size: None,
            watch_pending_idle_s: 120,
        }
    }
}

impl Params {
    /// Mean build time of the distribution (log-normal mean, ignoring the cap).
    pub fn mean_build_s(&self) -> f64 {
        let s2 = self.build_sigma * self.build_sigma + 0.25 * 0.25;
        self.build_median_s * (s2 / 2.0).exp()
    }

    /// The fixed fleet's size.
    pub fn fixed_n(&self) -> u32 {
        self.fixed_size
            .unwrap_or_else(|| (1.5 * self.arrival_rate * self.mean_build_s() / 3600.0).ceil().max(1.0) as u32)
    }
}
