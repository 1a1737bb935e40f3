//! infra/template.yaml, for real: cfn-lint lints it, aws-sam-translator
//! turns it into plain CloudFormation offline, moto's CloudFormation creates
//! the stack (infra/deploy_check.py), and pacloud's adapters then work on the
//! table, queue and bucket the stack created. The worker fleet part is
//! checked on the same kind of stack by infra/fleet_check.py (launch
//! templates, network, EventBridge delivery, IAM, fleets through the EC2 API,
//! parameter constraints), and checkov (in its own venv, `.venv-checkov`,
//! made by scripts/test.sh) must report no failed check.

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

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_fleet_part_deploys_into_moto_and_checks_out() {
    let moto = Moto::start();
    let python = repo().join(".venv/bin/python");
    // With the default egress (NAT) and without any route out.
    for egress in ["nat", "none"] {
        let out = std::process::Command::new(&python)
            .arg(repo().join("infra/deploy_check.py"))
            .arg(&moto.endpoint)
            .arg(format!("fleet-{egress}"))
            .arg(format!("EgressMode={egress}"))
            .output()
            .expect("python runs");
        assert!(out.status.success(), "deploy_check ({egress}) failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let outputs = String::from_utf8(out.stdout).unwrap();
        let check = std::process::Command::new(&python)
            .arg(repo().join("infra/fleet_check.py"))
            .arg(&moto.endpoint)
            .arg(outputs.trim())
            .arg(egress)
            .output()
            .expect("python runs");
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success(),
            "fleet_check ({egress}) failed:\n{stdout}{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let passed: usize = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("fleet_check: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
        assert_eq!(passed, stdout.lines().filter(|l| l.starts_with("ok: ")).count());
        assert!(passed >= 100, "only {passed} fleet checks ran ({egress})");
    }
}

#[test]
fn checkov_reports_no_failed_check() {
    let checkov = repo().join(".venv-checkov/bin/checkov");
    assert!(checkov.exists(), "{} missing: scripts/test.sh installs checkov", checkov.display());
    let out = std::process::Command::new(&checkov)
        .current_dir(repo())
        .args(["-d", "infra", "--framework", "cloudformation", "--skip-download", "--compact", "-o", "json"])
        .output()
        .expect("checkov runs");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("checkov JSON ({e}):\n{}", String::from_utf8_lossy(&out.stderr)));
    let summary = &report["summary"];
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .map(|a| a.iter().map(|c| format!("{} {}", c["check_id"], c["resource"])).collect())
        .unwrap_or_default();
    assert_eq!(summary["failed"], 0, "checkov failed checks: {failed:?}");
    assert!(summary["passed"].as_u64().unwrap() >= 40, "checkov ran too few checks: {summary}");
    // Every skip is a deliberate one in the template, with its reason.
    let template = std::fs::read_to_string(repo().join("infra/template.yaml")).unwrap();
    let declared = template.matches("          - id: CKV_").count();
    assert_eq!(summary["skipped"].as_u64().unwrap() as usize, declared, "skips reported vs declared: {summary}");
    let reasons = template.lines().filter(|l| l.trim_start().starts_with("comment: ")).count();
    assert_eq!(reasons, declared, "every checkov skip has a one-line reason");
    assert!(out.status.success(), "checkov exit status {}", out.status);
}
