//! `pacloud-fleet-sim`: simulates one day of pacloud's worker fleet under
//! each policy and prints a table (or one JSON object per policy per line
//! with `--json`). A bad flag value exits 2 naming the flag and its range.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pacloud_fleet::Config;
use pacloud_fleet_sim::plot::{Line, chart};
use pacloud_fleet_sim::{Outcome, POLICIES, Params, simulate_with, trace};

/// Simulates a day of the worker fleet under pacloud's policy and the seeds' baselines.
#[derive(Debug, Parser)]
#[command(name = "pacloud-fleet-sim", version)]
struct Args {
    /// Seed of the trace and the market (same seed, same output).
    #[arg(long, default_value_t = 1, value_parser = |s: &str| s.trim().parse::<u64>().map_err(|_| "--seed must be an integer in [0, 2^64)".to_string()))]
    seed: u64,
    /// Hours of arrivals to simulate, in (0, 168]; the queue is then drained.
    #[arg(long, default_value_t = 24.0, value_parser = range("--hours", 0.0, false, 168.0))]
    hours: f64,
    /// Mean builds per hour (Poisson, diurnal), in (0, 10000].
    #[arg(long, default_value_t = 30.0, value_parser = range("--arrival-rate", 0.0, false, 10_000.0))]
    arrival_rate: f64,
    /// Spot interruptions per spot instance-hour, in [0, 1].
    #[arg(long, default_value_t = 0.0003, value_parser = range("--interruption-rate", 0.0, true, 1.0))]
    interruption_rate: f64,
    /// Spot capacity outages per instance type-hour, in [0, 10].
    #[arg(long, default_value_t = 0.02, value_parser = range("--capacity-error-rate", 0.0, true, 10.0))]
    capacity_error_rate: f64,
    /// Size of the `fixed` fleet, in [1, 1000] (default: 1.5 × mean busy instances).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    fixed_size: Option<u32>,
    /// Idle seconds before watch-pending stops an instance, in [0, 86400] (default 120).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    watch_pending_idle_s: u64,
    /// pacloud, watch-pending, per-job, fixed, on-demand, or all.
    #[arg(long, default_value = "all", value_parser = clap::builder::PossibleValuesParser::new(["all", "pacloud", "watch-pending", "per-job", "fixed", "on-demand"]))]
    policy: String,
    /// The policy configuration as a JSON file (fields of `pacloud_fleet::Config`; missing = default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// One JSON object per policy per line.
    #[arg(long, conflicts_with = "markdown")]
    json: bool,
    /// A Markdown table (for docs/fleet.md).
    #[arg(long)]
    markdown: bool,
    /// Write queue/instances/cost SVG charts of pacloud vs the cheapest baseline here.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
}

/// A value parser for an f64 in a range; the error names the flag and the range.
fn range(flag: &'static str, lo: f64, lo_closed: bool, hi: f64) -> impl Fn(&str) -> Result<f64, String> + Clone {
    move |s: &str| {
        let open = if lo_closed { '[' } else { '(' };
        let msg = || format!("{flag} must be a number in {open}{lo}, {hi}]");
        let v: f64 = s.trim().parse().map_err(|_| msg())?;
        let ok = v.is_finite() && (v > lo || (lo_closed && v == lo)) && v <= hi;
        if ok { Ok(v) } else { Err(msg()) }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pacloud-fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> anyhow::Result<()> {
    let p = Params {
        seed: a.seed,
        hours: a.hours,
        arrival_rate: a.arrival_rate,
        interruption_rate: a.interruption_rate,
        capacity_error_rate: a.capacity_error_rate,
        fixed_size: a.fixed_size,
        watch_pending_idle_s: a.watch_pending_idle_s,
        ..Params::default()
    };
    let config: Config = match &a.config {
        None => Config::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("--config {}: not a policy configuration", path.display()))?
        }
    };
    config.validate().context("--config")?;
    let jobs = trace(&p);
    let names: Vec<&str> = if a.policy == "all" { POLICIES.to_vec() } else { vec![a.policy.as_str()] };
    let mut outcomes = Vec::new();
    for n in names {
        outcomes.push(simulate_with(&p, &jobs, n, &config).with_context(|| format!("unknown policy {n}"))?);
    }
    if a.json {
        for o in &outcomes {
            println!("{}", serde_json::to_string(o)?);
        }
    } else if a.markdown {
        println!(
            "| policy | builds | $/build | wait p50 | wait p95 | instance-h | on-demand h | interrupted | lost build-h | peak |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for o in &outcomes {
            println!(
                "| {} | {} | {:.4} | {} s | {} s | {:.1} | {:.1} | {} | {:.2} | {} |",
                o.policy,
                o.builds,
                o.cost_per_build_usd,
                o.wait_p50_s,
                o.wait_p95_s,
                o.instance_hours,
                o.on_demand_hours,
                o.interrupted_builds,
                o.lost_build_hours,
                o.peak_instances
            );
        }
    } else {
        println!(
            "seed {} | {} h | {} builds/h (+{} bursts/day) | interruptions {}/instance-h | capacity outages {}/type-h | fixed N = {}",
            p.seed,
            p.hours,
            p.arrival_rate,
            p.bursts_per_day,
            p.interruption_rate,
            p.capacity_error_rate,
            p.fixed_n()
        );
        println!(
            "{:<14} {:>6} {:>9} {:>10} {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>6}",
            "policy",
            "builds",
            "cost $",
            "$/build",
            "wait p50",
            "wait p95",
            "inst-h",
            "od-h",
            "interr.",
            "lost h",
            "peak"
        );
        for o in &outcomes {
            println!(
                "{:<14} {:>6} {:>9.2} {:>10.4} {:>7}s {:>7}s {:>9.1} {:>8.1} {:>9} {:>9.2} {:>6}",
                o.policy,
                o.builds,
                o.cost_usd,
                o.cost_per_build_usd,
                o.wait_p50_s,
                o.wait_p95_s,
                o.instance_hours,
                o.on_demand_hours,
                o.interrupted_builds,
                o.lost_build_hours,
                o.peak_instances
            );
        }
    }
    if let Some(dir) = a.plot_dir {
        plots(&dir, &outcomes)?;
    }
    Ok(())
}

fn plots(dir: &std::path::Path, outcomes: &[Outcome]) -> anyhow::Result<()> {
    let ours = outcomes.iter().find(|o| o.policy == "pacloud").context("--plot-dir needs the pacloud policy")?;
    let best = outcomes
        .iter()
        .filter(|o| o.policy != "pacloud")
        .min_by(|a, b| a.cost_per_build_usd.total_cmp(&b.cost_per_build_usd))
        .context("--plot-dir needs a baseline (use --policy all)")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    type Pick = fn(&(f64, u32, u32, f64)) -> f64;
    let charts: [(&str, &str, &str, Pick); 3] = [
        ("fleet-queue.svg", "Visible queue depth", "builds waiting", |s| f64::from(s.1)),
        ("fleet-instances.svg", "Live instances (running, booting, hibernated)", "instances", |s| f64::from(s.2)),
        ("fleet-cost.svg", "Cumulative cost", "USD", |s| s.3),
    ];
    for (file, title, y, pick) in charts {
        fn line<'a>(o: &'a Outcome, color: &'a str, pick: Pick) -> Line<'a> {
            Line { label: o.policy.as_str(), color, points: o.series.iter().map(|s| (s.0, pick(s))).collect() }
        }
        let svg = chart(
            &format!("{title}: pacloud vs {} (cheapest baseline)", best.policy),
            y,
            &[line(ours, "#1f77b4", pick), line(best, "#d62728", pick)],
        );
        let path = dir.join(file);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
