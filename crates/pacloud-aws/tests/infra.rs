//! infra/template.yaml, for real: cfn-lint lints it, aws-sam-translator
//! turns it into plain CloudFormation offline, moto's CloudFormation creates
//! the stack (infra/deploy_check.py), and pacloud's adapters then work on the
//! table, queue and bucket the stack created.

use pacloud_aws::testkit::Moto;
use pacloud_domain::ports::JobQueue;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_lints_deploys_and_its_resources_work() {
    let moto = Moto::start();
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/deploy_check.py");
    let out = std::process::Command::new(&python).arg(&script).arg(&moto.endpoint).output().expect("python runs");
    assert!(out.status.success(), "deploy_check failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let outputs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stack outputs as JSON");
    let field = |k: &str| outputs[k].as_str().unwrap_or_else(|| panic!("output {k}: {outputs}")).to_owned();
    let cfg = pacloud_aws::AwsConfig {
        table: field("TableName"),
        queue_url: field("QueueUrl"),
        dlq_url: Some(field("DeadLetterQueueUrl")),
        bucket: field("BucketName"),
        ..moto.base_config()
    };
    assert!(field("WorkerInstanceProfileArn").starts_with("arn:aws:iam::"));
    // The stack created the binhost signing key (moto's CloudFormation makes
    // every AWS::KMS::Key symmetric and its DescribeKey then fails on the
    // template's key policy, so the key's RSA use is tested in tests/kms.rs).
    let key_arn = field("BinhostSigningKeyArn");
    assert!(key_arn.starts_with("arn:aws:kms:us-east-1:"), "{key_arn}");
    let ports = pacloud_aws::connect(&cfg).await;
    assert_eq!(ports.queue.max_receive_count().await.unwrap(), Some(5), "the redrive policy is in place");
    pacloud_contract::metadata_store(Arc::new(ports.store)).await;
    pacloud_contract::artifact_store(Arc::new(ports.artifacts)).await;
    ports.queue.send("smoke", Duration::ZERO).await.unwrap();
    let got = ports.queue.receive(1, Duration::from_secs(30), Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.first().map(|d| d.body.as_str()), Some("smoke"));
    ports.queue.ack(&got[0].receipt).await.unwrap();
}
