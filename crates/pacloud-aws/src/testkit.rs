//! Test support: starts moto's server (PyPI `moto[server]`, from the test
//! venv) on a free loopback port, provisions pacloud's resources in it, and
//! stops it when dropped. Used by this crate's contract tests and by the
//! Lambda and worker tests. Not used in production.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::provision::{Names, provision};
use crate::{AwsConfig, clients};

/// A running `moto_server`.
pub struct Moto {
    pub endpoint: String,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test venv's `moto_server` (PACLOUD_MOTO_SERVER overrides).
pub fn moto_server_bin() -> PathBuf {
    std::env::var_os("PACLOUD_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/moto_server")))
}

impl Moto {
    /// Starts moto on a free port and waits until it answers.
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let bin = moto_server_bin();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (scripts/test.sh installs it): {e}", bin.display()));
        let moto = Moto { endpoint: format!("http://127.0.0.1:{port}"), child };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// Client settings for this server (static test credentials).
    pub fn base_config(&self) -> AwsConfig {
        AwsConfig {
            table: String::new(),
            queue_url: String::new(),
            dlq_url: None,
            bucket: String::new(),
            endpoint_url: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            static_credentials: Some(("testing".into(), "testing".into())),
            force_path_style: true,
            url_ttl: Duration::from_secs(900),
            scaler_events_url: None,
        }
    }

    /// Creates a table, queue + DLQ and bucket named after `prefix`.
    pub async fn provision(&self, prefix: &str, max_receives: u32) -> AwsConfig {
        let base = self.base_config();
        let c = clients(&base).await;
        let names = Names {
            table: format!("{prefix}-builds"),
            queue: format!("{prefix}-jobs"),
            dlq: format!("{prefix}-jobs-dlq"),
            bucket: format!("{prefix}-artifacts"),
            max_receives,
        };
        provision(&c, &names, &base).await.unwrap_or_else(|e| panic!("provisioning in moto failed: {e:?}"))
    }
}

/// Receives (and deletes) every message on the queue `url` now, short polls
/// until one comes back empty: their bodies as JSON (e.g. the nudges on the
/// fleet scaler's events queue).
pub async fn drain_json(sqs: &aws_sdk_sqs::Client, url: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    loop {
        let r = sqs.receive_message().queue_url(url).max_number_of_messages(10).send().await.expect("receive");
        let msgs = r.messages.unwrap_or_default();
        if msgs.is_empty() {
            return out;
        }
        for m in msgs {
            out.push(serde_json::from_str(m.body().unwrap_or_default()).expect("a JSON body"));
            let handle = m.receipt_handle().unwrap_or_default();
            sqs.delete_message().queue_url(url).receipt_handle(handle).send().await.expect("delete");
        }
    }
}

/// Worker fleets and instances in moto, for the scaler's tests (moto's
/// CreateFleet launches its own instances untagged; tagged workers are
/// started with RunInstances so that each test decides their activity).
pub mod fleet {
    use aws_sdk_ec2::types::{
        FleetLaunchTemplateConfigRequest, FleetLaunchTemplateSpecificationRequest, FleetType,
        RequestLaunchTemplateData, ResourceType, SpotAllocationStrategy, SpotInstanceInterruptionBehavior,
        SpotOptionsRequest, Tag, TagSpecification, TargetCapacitySpecificationRequest,
    };

    use crate::fleet::{FleetClient, TAG_ACTIVITY, TAG_FAMILY, TAG_LEASE, TAG_ROLE};

    fn tags(resource: ResourceType, pairs: &[(&str, &str)]) -> TagSpecification {
        TagSpecification::builder()
            .resource_type(resource)
            .set_tags(Some(pairs.iter().map(|(k, v)| Tag::builder().key(*k).value(*v).build()).collect()))
            .build()
    }

    /// A `maintain` fleet tagged as the worker fleet of `family`, with `total` spot capacity.
    pub async fn create_worker_fleet(c: &FleetClient, family: &str, total: i32) -> String {
        let lt = c
            .ec2
            .create_launch_template()
            .launch_template_name(format!("workers-{family}"))
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id("ami-12c6146b")
                    .instance_type(aws_sdk_ec2::types::InstanceType::C6iXlarge)
                    .build(),
            )
            .send()
            .await
            .expect("CreateLaunchTemplate in moto");
        let lt_id = lt.launch_template().and_then(|l| l.launch_template_id()).expect("a template id").to_owned();
        let out = c
            .ec2
            .create_fleet()
            .r#type(FleetType::Maintain)
            .launch_template_configs(
                FleetLaunchTemplateConfigRequest::builder()
                    .launch_template_specification(
                        FleetLaunchTemplateSpecificationRequest::builder()
                            .launch_template_id(lt_id)
                            .version("$Latest")
                            .build(),
                    )
                    .build(),
            )
            .target_capacity_specification(
                TargetCapacitySpecificationRequest::builder()
                    .total_target_capacity(total)
                    .on_demand_target_capacity(0)
                    .spot_target_capacity(total)
                    .default_target_capacity_type(aws_sdk_ec2::types::DefaultTargetCapacityType::Spot)
                    .build(),
            )
            .spot_options(
                SpotOptionsRequest::builder()
                    .allocation_strategy(SpotAllocationStrategy::PriceCapacityOptimized)
                    .instance_interruption_behavior(SpotInstanceInterruptionBehavior::Hibernate)
                    .build(),
            )
            .tag_specifications(tags(ResourceType::Fleet, &[(TAG_ROLE, "worker"), (TAG_FAMILY, family)]))
            .send()
            .await
            .expect("CreateFleet in moto");
        out.fleet_id().expect("a fleet id").to_owned()
    }

    /// A running spot worker instance of `family` whose `pacloud:activity` tag is
    /// `activity` (None: no tag) and lease tag `lease`.
    pub async fn run_worker(c: &FleetClient, family: &str, activity: Option<&str>, lease: bool) -> String {
        let mut pairs = vec![(TAG_ROLE, "worker"), (TAG_FAMILY, family)];
        if let Some(a) = activity {
            pairs.push((TAG_ACTIVITY, a));
        }
        if lease {
            pairs.push((TAG_LEASE, "1"));
        }
        let out = c
            .ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .instance_type(aws_sdk_ec2::types::InstanceType::C6iXlarge)
            .min_count(1)
            .max_count(1)
            .instance_market_options(
                aws_sdk_ec2::types::InstanceMarketOptionsRequest::builder()
                    .market_type(aws_sdk_ec2::types::MarketType::Spot)
                    .build(),
            )
            .tag_specifications(tags(ResourceType::Instance, &pairs))
            .send()
            .await
            .expect("RunInstances in moto");
        out.instances()[0].instance_id().expect("an instance id").to_owned()
    }

    /// The EC2 state name of an instance (`running`, `terminated`, ...).
    pub async fn state_of(c: &FleetClient, id: &str) -> String {
        let out = c.ec2.describe_instances().instance_ids(id).send().await.expect("DescribeInstances in moto");
        out.reservations()[0].instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default()
    }

    /// A fresh queue holding `visible` messages, and `in_flight` more received (invisible for 10 min).
    pub async fn queue_with(c: &FleetClient, name: &str, visible: usize, in_flight: usize) -> String {
        let url =
            c.sqs.create_queue().queue_name(name).send().await.expect("CreateQueue").queue_url().unwrap().to_owned();
        for n in 0..in_flight + visible {
            c.sqs.send_message().queue_url(&url).message_body(format!("job {n}")).send().await.expect("SendMessage");
        }
        let mut got = 0;
        while got < in_flight {
            let out = c
                .sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages((in_flight - got).min(10) as i32)
                .visibility_timeout(600)
                .send()
                .await
                .expect("ReceiveMessage");
            got += out.messages().len();
        }
        url
    }
}
