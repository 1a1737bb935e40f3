//! The AWS adapters against the port contract suite, over the real AWS wire
//! protocol, on moto's server (started per test on a loopback port).

use pacloud_aws::testkit::Moto;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_store_contract() {
    let moto = Moto::start();
    let cfg = moto.provision("store", 2).await;
    let ports = pacloud_aws::connect(&cfg).await;
    pacloud_contract::metadata_store(Arc::new(ports.store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_queue_contract() {
    let moto = Moto::start();
    let cfg = moto.provision("queue", 2).await;
    let ports = pacloud_aws::connect(&cfg).await;
    pacloud_contract::job_queue(Arc::new(ports.queue)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_artifact_contract() {
    let moto = Moto::start();
    let cfg = moto.provision("artifacts", 2).await;
    let ports = pacloud_aws::connect(&cfg).await;
    pacloud_contract::artifact_store(Arc::new(ports.artifacts)).await;
}
