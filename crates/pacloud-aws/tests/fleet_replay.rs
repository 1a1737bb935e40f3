//! ModifyFleet is not implemented by moto, so these are SDK replay tests:
//! the EC2 client runs over `aws-smithy-http-client`'s `StaticReplayClient`
//! (test-util), which answers recorded HTTP responses and keeps the requests
//! the SDK really sent. They check the wire request of `set_target`, the
//! parsing of the answer, and the bounded retry on throttling.

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
        .credentials_provider(creds)
        .http_client(StaticReplayClient::new(vec![]))
        .build();
    FleetClient { ec2: aws_sdk_ec2::Client::from_conf(ec2), sqs: aws_sdk_sqs::Client::from_conf(sqs) }
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
