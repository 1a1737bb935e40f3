//! One test per heuristic of the policy (and of the baselines where they differ).

use super::*;
use crate::baselines::{Fixed, PerJob, WatchPending};

const NOW: Secs = 1_000_000;

fn fam() -> FamilySnapshot {
    let mut f = empty_family(CpuFamily::X86_64);
    f.instance_types = vec!["c6i.xlarge".into(), "c6a.xlarge".into()];
    f
}

fn inst(id: &str, state: InstanceState, age: u64, activity: Activity) -> Instance {
    Instance {
        id: id.into(),
        instance_type: "c6i.xlarge".into(),
        zone: "us-east-1a".into(),
        capacity: CapacityType::Spot,
        state,
        launched_at: NOW - age,
        activity,
        holds_lease: matches!(activity, Activity::Busy { .. }),
    }
}

fn busy(id: &str, age: u64) -> Instance {
    inst(id, InstanceState::Running, age, Activity::Busy { since: NOW - 10, expected_done_at: None })
}

fn idle(id: &str, age: u64, idle_for: u64) -> Instance {
    inst(id, InstanceState::Running, age, Activity::Idle { since: NOW - idle_for })
}

fn decide(p: &dyn Policy, f: FamilySnapshot) -> Vec<Action> {
    p.decide(&Snapshot { now: NOW, families: vec![f] })
}

fn target(actions: &[Action]) -> Option<(u32, u32)> {
    actions.iter().find_map(|a| match a {
        Action::SetTargetCapacity { total, on_demand, .. } => Some((*total, *on_demand)),
        _ => None,
    })
}

fn terminated(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .flat_map(|a| match a {
            Action::Terminate { instance_ids, .. } => instance_ids.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn pacloud() -> PacloudPolicy {
    PacloudPolicy::new(Config::default()).unwrap()
}

#[test]
fn every_queued_build_gets_an_instance_without_history() {
    let mut f = fam();
    f.queue.visible = 7;
    assert_eq!(target(&decide(&pacloud(), f)), Some((7, 0)));
}

#[test]
fn fresh_subtraction_counts_booting_and_unreported_instances_once() {
    let mut f = fam();
    f.queue.visible = 5;
    f.instances = vec![
        inst("booting", InstanceState::Pending, 30, Activity::Unknown),
        inst("unreported", InstanceState::Running, 100, Activity::Unknown),
        // Fresh but busy: pacloud knows it will not take a queued build.
        busy("fresh-busy", 200),
    ];
    f.fleet.total = 3;
    // 5 queued - 2 fresh not busy = 3 more; 3 live + 3.
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((6, 0)));
    // Mozilla as written subtracts every fresh instance, busy or not: 5 - 3 = 2.
    assert_eq!(target(&decide(&WatchPending::default(), f)), Some((5, 0)));
}

#[test]
fn unreported_instance_past_the_fresh_delay_is_not_a_free_slot() {
    let mut f = fam();
    f.queue.visible = 1;
    f.instances = vec![inst("silent", InstanceState::Running, 5000, Activity::Unknown)];
    assert_eq!(target(&decide(&pacloud(), f)), Some((2, 0)));
}

#[test]
fn ten_percent_of_old_busy_instances_are_assumed_to_free_up() {
    let mut f = fam();
    f.queue.visible = 5;
    f.instances = (0..20).map(|i| busy(&format!("old{i}"), 7200)).collect();
    // ceil(0.1 * 20) = 2 freeing: 5 - 2 = 3 more.
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((23, 0)));
    let none = PacloudPolicy::new(Config { old_instance_fraction: 0.0, ..Config::default() }).unwrap();
    assert_eq!(target(&decide(&none, f.clone())), Some((25, 0)));
    // Mozilla: 10 % of old ones (all old here) as well.
    assert_eq!(target(&decide(&WatchPending::default(), f)), Some((23, 0)));
}

#[test]
fn expected_build_end_from_history_replaces_the_ten_percent_guess() {
    let mut f = fam();
    f.queue.visible = 3;
    let ends = [NOW + 10, NOW + 25, NOW + 45, NOW + 3600, NOW + 7200];
    f.instances = ends
        .iter()
        .enumerate()
        .map(|(n, end)| {
            let mut i = busy(&format!("b{n}"), 7200);
            i.activity = Activity::Busy { since: NOW - 600, expected_done_at: Some(*end) };
            i
        })
        .collect();
    // Two end within the freeing window (30 s), the one at +45 s does not: 3 - 2 = 1 more.
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((6, 0)));
    // A build past its expected end is late, and a late heavy-tailed build is
    // not about to end: not counted as freeing (3 - 1 = 2 more).
    f.instances[0].activity = Activity::Busy { since: NOW - 600, expected_done_at: Some(NOW - 1) };
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((7, 0)));
    f.instances[0].activity = Activity::Busy { since: NOW - 600, expected_done_at: Some(NOW + 30) };

    // Atoms never built before: with history (a median exists) nothing is assumed to
    // free up (heavy tails: the median dates no single build), and the 10 % rule, meant
    // for a fleet without any history, is not applied: 3 more.
    f.median_build_s = Some(600);
    for i in &mut f.instances {
        i.activity = Activity::Busy { since: NOW - 590, expected_done_at: None };
    }
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((8, 0)));
    // Without any history: Mozilla's ceil(10 % of 5 old busy) = 1 frees up: 2 more.
    f.median_build_s = None;
    assert_eq!(target(&decide(&pacloud(), f)), Some((7, 0)));
}

#[test]
fn backlog_per_instance_uses_the_median_build_time() {
    let mut f = fam();
    f.queue.visible = 30;
    f.median_build_s = Some(60);
    // target wait 180 s / 60 s = 3 builds per new instance: 10 instances.
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((10, 0)));
    // Long builds: one instance each.
    f.median_build_s = Some(1800);
    assert_eq!(target(&decide(&pacloud(), f)), Some((30, 0)));
}

#[test]
fn hibernated_instance_without_lease_counts_as_capacity_that_will_resume() {
    let mut f = fam();
    f.queue.visible = 2;
    let mut h = inst("hib", InstanceState::Hibernated, 3000, Activity::Idle { since: NOW - 100 });
    h.holds_lease = false;
    let mut hl =
        inst("hib-lease", InstanceState::Hibernated, 3000, Activity::Busy { since: NOW - 900, expected_done_at: None });
    hl.holds_lease = true;
    f.instances = vec![h, hl];
    // Both count as fleet capacity (not replaced); one takes a queued build: 2 + (2 - 1).
    assert_eq!(target(&decide(&pacloud(), f)), Some((3, 0)));
}

#[test]
fn price_cap_is_a_multiple_of_the_24_hour_average_and_never_above_on_demand() {
    let mut f = fam();
    for h in 0..24 {
        f.spot_prices.push(PricePoint {
            instance_type: "c6i.xlarge".into(),
            zone: "us-east-1a".into(),
            usd_per_hour: 0.05,
            at: NOW - 3600 * 24 + h * 3600 + 1,
        });
    }
    // Older than 24 h: not part of the average.
    f.spot_prices.push(PricePoint {
        instance_type: "c6i.xlarge".into(),
        zone: "us-east-1a".into(),
        usd_per_hour: 9.0,
        at: NOW - 90_000,
    });
    let caps = price_caps(&f, NOW, 1.2);
    assert_eq!(caps.len(), 1);
    assert!((caps[0].average_24h - 0.05).abs() < 1e-9);
    assert!((caps[0].cap - 0.06).abs() < 1e-9);
    f.on_demand_prices.push(OnDemandPrice { instance_type: "c6i.xlarge".into(), usd_per_hour: 0.055 });
    assert!((price_caps(&f, NOW, 1.2)[0].cap - 0.055).abs() < 1e-9);

    // The current price (latest point) above the cap marks the type unavailable.
    f.spot_prices.push(PricePoint {
        instance_type: "c6i.xlarge".into(),
        zone: "us-east-1a".into(),
        usd_per_hour: 0.2,
        at: NOW,
    });
    f.queue.visible = 1;
    let a = decide(&pacloud(), f.clone());
    assert!(a.iter().any(|a| matches!(a, Action::MarkUnavailable { instance_type, reason: UnavailableReason::PriceAboveCap { .. }, .. } if instance_type == "c6i.xlarge")));
    // c6a has no price history: still a spot candidate, no fallback.
    assert_eq!(target(&a), Some((1, 0)));
    // Only c6i as candidate: every type over its cap -> on-demand.
    f.instance_types = vec!["c6i.xlarge".into()];
    let a = decide(&pacloud(), f);
    assert!(a.contains(&Action::OnDemandFallback {
        family: CpuFamily::X86_64,
        count: 1,
        reason: FallbackReason::SpotPriceAboveCap
    }));
    assert_eq!(target(&a), Some((1, 1)));
}

#[test]
fn price_cap_is_enforced_as_the_fleets_spot_max_price_with_a_tolerance() {
    let mut f = fam();
    let point = |t: &str, usd: f64, at: Secs| PricePoint {
        instance_type: t.into(),
        zone: "us-east-1a".into(),
        usd_per_hour: usd,
        at,
    };
    for h in 0..24 {
        f.spot_prices.push(point("c6i.xlarge", 0.05, NOW - 3600 * 24 + h * 3600 + 1));
    }
    let max_prices = |a: &[Action]| {
        a.iter().find_map(|a| match a {
            Action::SetSpotMaxPrices { prices, .. } => Some(prices.clone()),
            _ => None,
        })
    };
    // The fleet has no max price: set c6i's to its cap (1.2 × 0.05); c6a has
    // no price history and keeps the fleet's default (on-demand).
    let want = vec![TypePrice { instance_type: "c6i.xlarge".into(), usd_per_hour: 0.06 }];
    assert_eq!(max_prices(&decide(&pacloud(), f.clone())), Some(want.clone()));
    // Within 5 % of the cap: nothing to do (no ModifyFleet every tick).
    f.spot_max_prices = vec![TypePrice { instance_type: "c6i.xlarge".into(), usd_per_hour: 0.0590 }];
    assert_eq!(max_prices(&decide(&pacloud(), f.clone())), None);
    // Drifted beyond 5 %, or another type set: reset.
    f.spot_max_prices[0].usd_per_hour = 0.07;
    assert_eq!(max_prices(&decide(&pacloud(), f.clone())), Some(want.clone()));
    f.spot_max_prices = vec![want[0].clone(), TypePrice { instance_type: "m5.xlarge".into(), usd_per_hour: 0.1 }];
    assert_eq!(max_prices(&decide(&pacloud(), f.clone())), Some(want));
    // The on-demand-only policy sets no spot price.
    f.spot_max_prices.clear();
    let od = PacloudPolicy::new(Config { spot: false, ..Config::default() }).unwrap();
    assert_eq!(max_prices(&decide(&od, f)), None);
}

fn capacity_error(t: &str, age: u64) -> CapacityError {
    CapacityError { instance_type: t.into(), zone: "us-east-1a".into(), capacity: CapacityType::Spot, at: NOW - age }
}

#[test]
fn on_demand_fallback_after_spot_capacity_errors_on_every_type() {
    let mut f = fam();
    f.queue.visible = 4;
    f.instances = vec![busy("b", 7200)];
    f.capacity_errors = vec![capacity_error("c6i.xlarge", 30), capacity_error("c6a.xlarge", 60)];
    let a = decide(&pacloud(), f.clone());
    // 4 - ceil(0.1) = 3 new, all on-demand.
    assert!(a.contains(&Action::OnDemandFallback {
        family: CpuFamily::X86_64,
        count: 3,
        reason: FallbackReason::SpotCapacityErrors
    }));
    assert_eq!(target(&a), Some((4, 3)));
    let marks = a.iter().filter(|a| matches!(a, Action::MarkUnavailable { until, .. } if *until > NOW)).count();
    assert_eq!(marks, 2);

    // One type still has spot capacity: no fallback.
    f.capacity_errors.pop();
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((4, 0)));
    // Errors older than the unavailable window (180 s) are forgotten.
    f.capacity_errors = vec![capacity_error("c6i.xlarge", 400), capacity_error("c6a.xlarge", 400)];
    let a = decide(&pacloud(), f.clone());
    assert!(!a.iter().any(|a| matches!(a, Action::OnDemandFallback { .. } | Action::MarkUnavailable { .. })));
    // Fallback switched off: stays spot even when spot has no capacity.
    f.capacity_errors = vec![capacity_error("c6i.xlarge", 1), capacity_error("c6a.xlarge", 1)];
    let off = PacloudPolicy::new(Config { on_demand_fallback: false, ..Config::default() }).unwrap();
    assert_eq!(target(&decide(&off, f)), Some((4, 0)));
}

#[test]
fn existing_on_demand_instances_stay_counted_and_go_first_when_idle() {
    let mut f = fam();
    let mut od = idle("od", 3000, 1000);
    od.capacity = CapacityType::OnDemand;
    f.instances = vec![idle("spot", 3000, 2000), od, busy("b", 100)];
    f.fleet = FleetTarget { total: 3, on_demand: 1 };
    f.queue.visible = 1;
    let a = decide(&pacloud(), f);
    // One surplus idle instance: the on-demand one, though the spot one idled longer.
    assert_eq!(terminated(&a), vec!["od".to_string()]);
    assert_eq!(target(&a), Some((2, 0)));
}

#[test]
fn never_terminates_busy_unreported_or_lease_holding_instances() {
    let mut f = fam();
    let mut hib_lease = inst("hib-lease", InstanceState::Hibernated, 9000, Activity::Idle { since: NOW - 9000 });
    hib_lease.holds_lease = true;
    let hib_idle = inst("hib-idle", InstanceState::Hibernated, 9000, Activity::Idle { since: NOW - 9000 });
    let mut idle_lease = idle("idle-but-lease", 9000, 9000);
    idle_lease.holds_lease = true;
    f.instances = vec![
        busy("busy", 9000),
        inst("unknown", InstanceState::Running, 9000, Activity::Unknown),
        hib_lease,
        hib_idle,
        idle_lease,
        idle("idle-long", 9000, 9000),
        idle("idle-short", 9000, 5),
    ];
    f.fleet.total = 7;
    for p in [&pacloud() as &dyn Policy, &WatchPending::default(), &PerJob::default(), &Fixed { n: 0 }] {
        let killed = terminated(&decide(p, f.clone()));
        assert!(killed.iter().all(|id| id == "idle-long"), "{}: {killed:?}", p.name());
    }
    assert_eq!(terminated(&decide(&pacloud(), f)), vec!["idle-long".to_string()]);
}

#[test]
fn idle_instances_the_queue_needs_are_kept() {
    let mut f = fam();
    f.instances = vec![idle("a", 9000, 9000), idle("b", 9000, 9000)];
    f.fleet.total = 2;
    f.queue.visible = 2;
    let a = decide(&pacloud(), f);
    assert!(terminated(&a).is_empty());
    assert_eq!(target(&a), None, "nothing changes, nothing is sent");
}

#[test]
fn limits_bound_the_target_and_the_minimum_survives_idleness() {
    let mut f = fam();
    f.queue.visible = 500;
    assert_eq!(target(&decide(&pacloud(), f.clone())), Some((64, 0)));
    let small = PacloudPolicy::new(Config { max_instances: 8, ..Config::default() }).unwrap();
    assert_eq!(target(&decide(&small, f.clone())), Some((8, 0)));
    assert_eq!(
        target(&decide(&WatchPending { config: small.config.clone(), ..WatchPending::default() }, f.clone())),
        Some((8, 0))
    );

    f.queue.visible = 0;
    f.instances = vec![idle("a", 9000, 9000), idle("b", 9000, 9000), idle("c", 9000, 9000)];
    f.fleet.total = 3;
    let min2 = PacloudPolicy::new(Config { min_instances: 2, ..Config::default() }).unwrap();
    let a = decide(&min2, f);
    assert_eq!(terminated(&a).len(), 1);
    assert_eq!(target(&a), Some((2, 0)));
}

#[test]
fn boot_timeout_terminates_instances_that_never_showed_up() {
    let mut f = fam();
    f.queue.visible = 1;
    f.instances = vec![inst("ghost", InstanceState::Pending, 700, Activity::Unknown)];
    f.fleet.total = 1;
    let a = decide(&pacloud(), f);
    assert!(a.contains(&Action::Terminate {
        family: CpuFamily::X86_64,
        instance_ids: vec!["ghost".into()],
        reason: TerminateReason::BootTimeout
    }));
    // The ghost is not counted: the target stays 1, so the maintain fleet replaces it.
    assert_eq!(target(&a), None);
}

#[test]
fn on_demand_only_baseline_asks_for_on_demand_only() {
    let od = PacloudPolicy::new(Config { spot: false, ..Config::default() }).unwrap();
    assert_eq!(od.name(), "on-demand");
    let mut f = fam();
    f.queue.visible = 3;
    assert_eq!(target(&decide(&od, f)), Some((3, 3)));
}

#[test]
fn per_job_starts_one_instance_per_unserved_build_and_waits_600_s() {
    let mut f = fam();
    f.queue.visible = 3;
    f.instances = vec![idle("i", 100, 500), busy("b", 100)];
    f.fleet.total = 2;
    assert_eq!(target(&decide(&PerJob::default(), f.clone())), Some((4, 0)));
    f.queue.visible = 0;
    assert!(terminated(&decide(&PerJob::default(), f.clone())).is_empty(), "idle 500 s < 600 s");
    f.instances[0] = idle("i", 1000, 601);
    assert_eq!(terminated(&decide(&PerJob::default(), f)), vec!["i".to_string()]);
}

#[test]
fn fixed_fleet_holds_n() {
    let mut f = fam();
    f.queue.visible = 100;
    assert_eq!(target(&decide(&Fixed { n: 4 }, f)), Some((4, 0)));
}

#[test]
fn decisions_are_deterministic_and_round_trip_as_json() {
    let mut f = fam();
    f.queue.visible = 3;
    f.capacity_errors = vec![capacity_error("c6i.xlarge", 30), capacity_error("c6a.xlarge", 60)];
    let s = Snapshot { now: NOW, families: vec![f] };
    let a = pacloud().decide(&s);
    assert_eq!(a, pacloud().decide(&s));
    let json = serde_json::to_string(&a).unwrap();
    let back: Vec<Action> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
    let snap: Snapshot = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(snap, s);
}

#[test]
fn bad_configurations_are_named() {
    let e = PacloudPolicy::new(Config { min_instances: 5, max_instances: 2, ..Config::default() }).unwrap_err();
    assert_eq!(e, ConfigError::MinAboveMax { min: 5, max: 2 });
    let e = PacloudPolicy::new(Config { max_price_multiplier: 0.5, ..Config::default() }).unwrap_err();
    assert!(e.to_string().contains("max_price_multiplier"));
    let e = PacloudPolicy::new(Config { old_instance_fraction: 1.5, ..Config::default() }).unwrap_err();
    assert!(e.to_string().contains("old_instance_fraction"));
}
