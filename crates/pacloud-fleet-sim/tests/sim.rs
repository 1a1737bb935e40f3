//! The simulator as a user runs it: determinism, the JSON contract, bad
//! flags (exit 2 naming the flag and its range), and invariants of the
//! simulated world under every policy.

use std::process::Command;

use pacloud_fleet_sim::{POLICIES, Params, simulate, trace};

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pacloud-fleet-sim")).args(args).output().expect("run the simulator")
}

#[test]
fn same_seed_same_output_other_seed_other_output() {
    let a = sim(&["--seed", "7", "--hours", "6", "--json"]);
    let b = sim(&["--seed", "7", "--hours", "6", "--json"]);
    let c = sim(&["--seed", "8", "--hours", "6", "--json"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert_ne!(a.stdout, c.stdout);
}

#[test]
fn json_has_one_object_per_policy_with_the_required_fields() {
    let out = sim(&["--hours", "4", "--json", "--arrival-rate", "20"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = lines.iter().map(|v| v["policy"].as_str().unwrap()).collect();
    assert_eq!(names, POLICIES);
    for v in &lines {
        for k in [
            "builds",
            "cost_per_build_usd",
            "wait_p50_s",
            "wait_p95_s",
            "instance_hours",
            "interrupted_builds",
            "lost_build_hours",
        ] {
            assert!(v[k].is_number(), "{k} missing in {v}");
        }
        assert!(v["builds"].as_u64().unwrap() > 0);
        assert!(v["cost_per_build_usd"].as_f64().unwrap() > 0.0);
    }
    let one = sim(&["--hours", "4", "--json", "--arrival-rate", "20", "--policy", "per-job"]);
    let one = String::from_utf8(one.stdout).unwrap();
    assert_eq!(one.lines().count(), 1);
    assert_eq!(one.trim(), text.lines().nth(2).unwrap(), "a policy alone gives the same result as within all");
}

#[test]
fn bad_flag_values_exit_2_naming_the_flag_and_its_range() {
    for (args, needle) in [
        (vec!["--hours", "0"], "--hours must be a number in (0, 168]"),
        (vec!["--hours", "200"], "--hours must be a number in (0, 168]"),
        (vec!["--arrival-rate", "fast"], "--arrival-rate must be a number in (0, 10000]"),
        (vec!["--interruption-rate", "1.5"], "--interruption-rate must be a number in [0, 1]"),
        (vec!["--interruption-rate", "NaN"], "--interruption-rate must be a number in [0, 1]"),
        (vec!["--capacity-error-rate=-1"], "--capacity-error-rate must be a number in [0, 10]"),
        (vec!["--fixed-size", "0"], "--fixed-size"),
        (vec!["--policy", "cheapest"], "--policy"),
        (vec!["--seed=-3"], "--seed must be an integer in [0, 2^64)"),
    ] {
        let out = sim(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn every_policy_finishes_every_build_and_never_terminates_working_instances() {
    for p in [
        Params { hours: 8.0, ..Params::default() },
        Params { hours: 8.0, seed: 5, interruption_rate: 0.05, capacity_error_rate: 0.5, ..Params::default() },
    ] {
        let jobs = trace(&p);
        assert!(jobs.len() > 100);
        for name in POLICIES {
            let o = simulate(&p, &jobs, name).unwrap();
            assert_eq!(o.builds, jobs.len() as u64, "{name}");
            assert_eq!(o.unsafe_terminations, 0, "{name}");
            assert!(o.wait_p50_s <= o.wait_p95_s && o.wait_p95_s <= o.wait_max_s, "{name}");
            if name == "on-demand" {
                assert_eq!(o.interrupted_builds, 0);
                assert!((o.on_demand_hours - o.instance_hours).abs() < 1e-9);
            }
            if name == "fixed" {
                assert!(o.instance_hours >= f64::from(p.fixed_n()) * p.hours * 0.95, "{}", o.instance_hours);
            }
        }
    }
}

#[test]
fn a_stormy_market_interrupts_builds_and_hibernation_keeps_work_only_under_a_long_lease() {
    // pacloud's rule: a hibernated worker's job is visible again after the lease; with
    // the template's 60 s lease another worker restarts it long before EC2 resumes the
    // instance (mean 15 min), so hibernation saves little. With a lease longer than the
    // resume time, the resumed worker finds its lease and goes on.
    let short = Params { hours: 12.0, seed: 3, interruption_rate: 0.1, ..Params::default() };
    let long = Params { lease_s: 6 * 3600, ..short.clone() };
    let jobs = trace(&short);
    let seed = simulate(&short, &jobs, "watch-pending").unwrap();
    let ours_short = simulate(&short, &jobs, "pacloud").unwrap();
    let ours_long = simulate(&long, &jobs, "pacloud").unwrap();
    assert!(seed.interrupted_builds > 0 && ours_short.interrupted_builds > 0 && ours_long.interrupted_builds > 0);
    let per = |o: &pacloud_fleet_sim::Outcome| o.lost_build_hours / o.interrupted_builds as f64;
    assert!(per(&ours_long) < per(&seed), "pacloud (long lease) {} vs watch-pending {}", per(&ours_long), per(&seed));
    assert!(per(&ours_long) < per(&ours_short), "long lease {} vs short {}", per(&ours_long), per(&ours_short));
}

#[test]
fn trace_follows_the_requested_rate() {
    let p = Params { hours: 24.0, arrival_rate: 100.0, bursts_per_day: 0.0, ..Params::default() };
    let n = trace(&p).len() as f64;
    assert!((n - 2400.0).abs() < 150.0, "{n}");
    let durations: Vec<u64> = trace(&p).iter().map(|j| j.duration).collect();
    assert!(durations.iter().all(|&d| (10..=6 * 3600).contains(&d)));
    assert!(durations.iter().any(|&d| d > 3600), "a few builds take hours");
}

#[test]
fn a_nudge_on_enqueue_starts_a_cold_build_after_one_boot_not_after_the_next_tick() {
    use pacloud_fleet::{Config, PacloudPolicy};
    use pacloud_fleet_sim::{Interruption, Job, MaxPrice, Setup, Triggers, run};
    // One build arriving 10 s after a tick on an empty fleet.
    let p = Params { hours: 1.0, interruption_rate: 0.0, capacity_error_rate: 0.0, ..Params::default() };
    let jobs = vec![Job { arrival: 10, atom: 0, duration: 300 }];
    let policy = PacloudPolicy::new(Config::default()).unwrap();
    let setup =
        |triggers| Setup { interruption: Interruption::Hibernate, max_price: MaxPrice::Multiplier(1.2), triggers };
    let cron = run(&p, &jobs, &policy, setup(Triggers::periodic(60)));
    let nudged = run(&p, &jobs, &policy, setup(Triggers { on_enqueue: true, ..Triggers::periodic(60) }));
    // The cron launches at the next tick (t = 60) and the worker polls a boot later.
    assert_eq!(cron.wait_max_s, 60 - 10 + p.boot_s);
    // The nudge launches `nudge_s` after the enqueue.
    assert_eq!(nudged.wait_max_s, p.nudge_s + p.boot_s);
    assert_eq!(nudged.builds, 1);
    assert!(nudged.decisions > cron.decisions, "the nudge is one more decision");
    // The faster start costs nothing more: both bill the boot and the build,
    // plus an idle tail until a decision finds the instance idle past the timeout.
    for o in [&cron, &nudged] {
        let secs = o.instance_hours * 3600.0;
        assert!((360.0 - 1e-6..=360.0 + 60.0 + 10.0 + 1e-6).contains(&secs), "{secs}");
    }
}

#[test]
fn busy_hours_are_the_builds_and_the_rest_is_boot_and_idle() {
    let p = Params { hours: 6.0, interruption_rate: 0.0, ..Params::default() };
    let jobs = trace(&p);
    let work: u64 = jobs.iter().map(|j| j.duration).sum();
    for name in POLICIES {
        let o = simulate(&p, &jobs, name).unwrap();
        assert!((o.busy_hours - work as f64 / 3600.0).abs() < 1e-6, "{name}: {} vs {}", o.busy_hours, work);
        assert!(o.instance_hours > o.busy_hours, "{name}");
    }
}
