//! ModifyFleet is not implemented by moto, so these are SDK replay tests:
//! the EC2 client runs over `aws-smithy-http-client`'s `StaticReplayClient`
//! (test-util), which answers recorded HTTP responses and keeps the requests
//! the SDK really sent. They check the wire request of `set_target`, the
//! parsing of the answer, and the bounded retry on throttling; and the
//! launch configurations that enforce the spot price caps (`MaxPrice`).

use aws_smithy_http_client::test_util::{ReplayEvent, StaticReplayClient};
use aws_smithy_types::body::SdkBody;
use pacloud_aws::fleet::{FleetClient, FleetError, retry_policy};

const OK: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ModifyFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r-1</requestId><return>true</return></ModifyFleetResponse>"#;
const REFUSED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ModifyFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r-2</requestId><return>false</return></ModifyFleetResponse>"#;
const THROTTLED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>r-t</RequestID></Response>"#;

fn event(status: u16, body: &'static str) -> ReplayEvent {
    ReplayEvent::new(
        http::Request::builder().uri("https://ec2.us-east-1.amazonaws.com/").body(SdkBody::empty()).unwrap(),
        http::Response::builder().status(status).body(SdkBody::from(body)).unwrap(),
    )
}

fn client(replay: &StaticReplayClient) -> FleetClient {
    let creds = aws_sdk_ec2::config::Credentials::new("AKID", "SECRET", None, None, "replay");
    let ec2 = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .http_client(replay.clone())
        .retry_config(retry_policy())
        .build();
    let sqs = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .http_client(StaticReplayClient::new(vec![]))
        .build();
    let s3 = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .http_client(StaticReplayClient::new(vec![]))
        .build();
    FleetClient {
        ec2: aws_sdk_ec2::Client::from_conf(ec2),
        sqs: aws_sdk_sqs::Client::from_conf(sqs),
        s3: aws_sdk_s3::Client::from_conf(s3),
    }
}

fn body(r: &aws_smithy_runtime_api::http::Request) -> String {
    String::from_utf8(r.body().bytes().expect("a buffered body").to_vec()).unwrap()
}

#[tokio::test]
async fn modify_fleet_replay_test_sends_the_target_capacity_specification() {
    let replay = StaticReplayClient::new(vec![event(200, OK)]);
    client(&replay).set_target("fleet-0123", 5, 2).await.unwrap();
    let sent: Vec<_> = replay.actual_requests().collect();
    assert_eq!(sent.len(), 1);
    let b = body(sent[0]);
    for part in [
        "Action=ModifyFleet",
        "Version=2016-11-15",
        "FleetId=fleet-0123",
        "TargetCapacitySpecification.TotalTargetCapacity=5",
        "TargetCapacitySpecification.OnDemandTargetCapacity=2",
        "TargetCapacitySpecification.SpotTargetCapacity=3",
        "TargetCapacitySpecification.DefaultTargetCapacityType=spot",
    ] {
        assert!(b.contains(part), "{part} not in {b}");
    }
}

#[tokio::test]
async fn modify_fleet_replay_test_clamps_on_demand_and_reports_a_refusal() {
    let replay = StaticReplayClient::new(vec![event(200, REFUSED)]);
    let e = client(&replay).set_target("fleet-1", 2, 7).await.unwrap_err();
    assert!(matches!(e, FleetError::Unexpected { op: "ModifyFleet", .. }), "{e}");
    let b = body(replay.actual_requests().next().unwrap());
    assert!(b.contains("OnDemandTargetCapacity=2") && b.contains("SpotTargetCapacity=0"), "{b}");
}

#[tokio::test]
async fn modify_fleet_replay_test_retries_throttling_with_a_bound() {
    // Throttled twice, then accepted: three requests, success.
    let replay = StaticReplayClient::new(vec![event(503, THROTTLED), event(503, THROTTLED), event(200, OK)]);
    client(&replay).set_target("fleet-2", 1, 0).await.unwrap();
    assert_eq!(replay.actual_requests().count(), 3);

    // Throttled on every attempt: it gives up after the policy's 4 attempts.
    let replay = StaticReplayClient::new((0..6).map(|_| event(503, THROTTLED)).collect());
    let started = std::time::Instant::now();
    let e = client(&replay).set_target("fleet-3", 1, 0).await.unwrap_err();
    assert!(e.to_string().contains("ModifyFleet"), "{e}");
    assert_eq!(replay.actual_requests().count(), 4);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "bounded backoff");
}

fn infra_like_config() -> aws_sdk_ec2::types::FleetLaunchTemplateConfig {
    use aws_sdk_ec2::types::*;
    // As DescribeFleets returns the infra template's fleet: attribute-based, two subnets.
    let reqs = InstanceRequirements::builder()
        .v_cpu_count(VCpuCountRange::builder().min(4).max(8).build())
        .memory_mib(MemoryMiB::builder().min(8192).max(32768).build())
        .allowed_instance_types("c6i.*")
        .allowed_instance_types("m6i.*")
        .bare_metal(BareMetal::Excluded)
        .burstable_performance(BurstablePerformance::Excluded)
        .build();
    FleetLaunchTemplateConfig::builder()
        .launch_template_specification(
            FleetLaunchTemplateSpecification::builder().launch_template_id("lt-0abc").version("3").build(),
        )
        .overrides(
            FleetLaunchTemplateOverrides::builder().subnet_id("subnet-a").instance_requirements(reqs.clone()).build(),
        )
        .overrides(FleetLaunchTemplateOverrides::builder().subnet_id("subnet-b").instance_requirements(reqs).build())
        .build()
}

#[tokio::test]
async fn modify_fleet_replay_test_sets_the_spot_max_price_and_keeps_the_overrides() {
    use pacloud_aws::fleet::launch_configs_with_max_prices;
    use pacloud_fleet::TypePrice;
    let prices = vec![
        TypePrice { instance_type: "c6i.xlarge".into(), usd_per_hour: 0.0816 },
        TypePrice { instance_type: "m6i.xlarge".into(), usd_per_hour: 0.0921 },
    ];
    let configs = launch_configs_with_max_prices(&[infra_like_config()], &prices).unwrap().expect("no MaxPrice yet");
    let replay = StaticReplayClient::new(vec![event(200, OK)]);
    client(&replay).set_launch_configs("fleet-9", configs).await.unwrap();
    let b = body(replay.actual_requests().next().unwrap());
    for part in [
        "Action=ModifyFleet",
        "FleetId=fleet-9",
        "LaunchTemplateConfig.1.LaunchTemplateSpecification.LaunchTemplateId=lt-0abc",
        "LaunchTemplateConfig.1.LaunchTemplateSpecification.Version=3",
        "LaunchTemplateConfig.1.Overrides.1.SubnetId=subnet-a",
        "LaunchTemplateConfig.1.Overrides.2.SubnetId=subnet-b",
        // An attribute-based override holds one price: the highest cap.
        "LaunchTemplateConfig.1.Overrides.1.MaxPrice=0.0921",
        "LaunchTemplateConfig.1.Overrides.2.MaxPrice=0.0921",
        "LaunchTemplateConfig.1.Overrides.1.InstanceRequirements.VCpuCount.Min=4",
        "LaunchTemplateConfig.1.Overrides.1.InstanceRequirements.MemoryMiB.Max=32768",
        "LaunchTemplateConfig.1.Overrides.1.InstanceRequirements.AllowedInstanceType.2=m6i.%2A",
        "LaunchTemplateConfig.1.Overrides.1.InstanceRequirements.BareMetal=excluded",
    ] {
        assert!(b.contains(part), "{part} not in {b}");
    }
    assert!(!b.contains("TargetCapacitySpecification"), "the target is left alone: {b}");
}

#[test]
fn max_prices_are_rewritten_only_beyond_the_tolerance_and_never_over_unknown_fields() {
    use aws_sdk_ec2::types::*;
    use pacloud_aws::fleet::launch_configs_with_max_prices;
    use pacloud_fleet::TypePrice;
    let typed = |max: Option<&str>| {
        FleetLaunchTemplateConfig::builder()
            .launch_template_specification(
                FleetLaunchTemplateSpecification::builder().launch_template_name("workers").version("$Latest").build(),
            )
            .overrides(
                FleetLaunchTemplateOverrides::builder()
                    .instance_type(InstanceType::C6iXlarge)
                    .set_max_price(max.map(str::to_owned))
                    .build(),
            )
            .build()
    };
    let prices = vec![TypePrice { instance_type: "c6i.xlarge".into(), usd_per_hour: 0.08 }];
    // Within 5 %: nothing to send.
    assert_eq!(launch_configs_with_max_prices(&[typed(Some("0.0790"))], &prices).unwrap(), None);
    // Beyond it, or unset: the type's own cap.
    for current in [Some("0.0500"), None] {
        let c = launch_configs_with_max_prices(&[typed(current)], &prices).unwrap().unwrap();
        assert_eq!(c[0].overrides()[0].max_price(), Some("0.0800"));
        assert_eq!(c[0].overrides()[0].instance_type(), Some(&InstanceType::C6iXlarge));
    }
    // A field the rewrite would lose: refused, nothing sent.
    let accel = FleetLaunchTemplateConfig::builder()
        .launch_template_specification(FleetLaunchTemplateSpecification::builder().launch_template_id("lt-1").build())
        .overrides(
            FleetLaunchTemplateOverrides::builder()
                .instance_requirements(
                    InstanceRequirements::builder()
                        .accelerator_count(AcceleratorCount::builder().min(1).build())
                        .build(),
                )
                .build(),
        )
        .build();
    let e = launch_configs_with_max_prices(&[accel], &prices).unwrap_err();
    assert!(e.to_string().contains("AcceleratorCount"), "{e}");
}
