//! `pacloud worker --backend aws`: the worker library on SQS, DynamoDB and
//! S3, with the spot interruption watcher. A `terminate` or `stop` notice
//! aborts running builds and releases their messages (visibility 0) and
//! leases at once; a resume after hibernation makes running jobs re-check
//! their leases before publishing; SIGTERM drains within the grace period.
//! With `aws.signing_key_id` every package is signed by that KMS key, and
//! the key's certificate is published for the API at startup
//! (`keys/binhost-signing-key.json` in the bucket).
//!
//! Architecture invariant: an AWS worker that should sign (`sign_packages`,
//! the default) does not start without a signing key: it never publishes
//! unsigned packages unless configured to (`sign_packages = false`).

use anyhow::Context;
use pacloud_aws::AwsConfig;
use pacloud_domain::SystemClock;
use pacloud_worker::spot::{DEFAULT_ENDPOINT, SpotConfig, SpotEvent, SpotWatcher, react};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::build::{Detected, detect, start_signing_workers_on};
use crate::settings::Settings;

/// The AWS client settings from `[aws]` / `PACLOUD_AWS_*`.
pub fn aws_config(settings: &Settings) -> anyhow::Result<AwsConfig> {
    let a = &settings.aws;
    // The worker AMI's IMDS rule filters bridged container traffic only.
    anyhow::ensure!(
        settings.build.docker_network != pacloud_worker::sandbox::docker::NetworkMode::Host,
        "build.docker_network = \"host\" is refused on AWS workers: a host-network container would reach the \
         instance metadata service (docs/fleet.md)"
    );
    Ok(AwsConfig {
        table: a.table.clone().context("aws.table (PACLOUD_AWS_TABLE) is required")?,
        queue_url: a.queue_url.clone().context("aws.queue_url (PACLOUD_AWS_QUEUE_URL) is required")?,
        dlq_url: a.dlq_url.clone(),
        bucket: a.bucket.clone().context("aws.bucket (PACLOUD_AWS_BUCKET) is required")?,
        endpoint_url: a.endpoint_url.clone(),
        region: a.region.clone(),
        static_credentials: None,
        force_path_style: a.force_path_style,
        url_ttl: settings.url_ttl,
        scaler_events_url: a.scaler_events_url.clone(),
    })
}

/// Refuses a configuration that would publish unsigned packages without
/// saying so: `sign_packages` (the default) needs `aws.signing_key_id`.
pub fn check_signing(settings: &Settings) -> anyhow::Result<()> {
    if settings.sign_packages && settings.aws.signing_key_id.is_none() {
        anyhow::bail!(
            "no binhost signing key: set aws.signing_key_id (PACLOUD_AWS_SIGNING_KEY_ID) to the KMS key, or \
             sign_packages = false (PACLOUD_SIGN_PACKAGES=false) to publish unsigned packages, which portage \
             refuses by default"
        );
    }
    Ok(())
}

/// Runs workers on AWS until `shutdown` or a terminate/stop notice.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    check_signing(settings)?;
    let config = aws_config(settings)?;
    let ports = pacloud_aws::connect(&config).await;
    // The last attempt is the one before the queue's redrive moves the
    // message: take the limit from the queue itself so the two agree.
    let mut settings = settings.clone();
    match ports.queue.max_receive_count().await {
        Ok(Some(n)) => {
            if n != settings.max_receives {
                tracing::info!(max_receives = n, "using the queue's redrive maxReceiveCount as the attempt limit");
            }
            settings.max_receives = n;
        }
        Ok(None) => {
            tracing::warn!("the queue has no redrive policy: failed messages will never reach a dead-letter queue")
        }
        Err(e) => tracing::warn!(error = &e as &dyn std::error::Error, "cannot read the queue's redrive policy"),
    }
    // Packages come from S3: a worker-local cache saves repeated GETs.
    settings.build.package_cache_bytes.get_or_insert(10 << 30);
    let settings = &settings;
    let mut backend = match detect(settings).await {
        Detected::Ready(b) => b,
        Detected::Unavailable(why) => anyhow::bail!("no build backend: {why}"),
    };
    // Sources are shared by every worker through the bucket (`distfiles/`);
    // the local directory is this worker's cache in front of it.
    if let Some(d) = backend.env.distfiles.as_mut() {
        d.shared = true;
    }
    tracing::info!(queue = %config.queue_url, table = %config.table, bucket = %config.bucket, "pacloud worker on AWS: {}", backend.description);
    let signer = match &settings.aws.signing_key_id {
        Some(key_id) if settings.sign_packages => {
            let signer = kms_signer(&config, key_id).await?;
            tracing::info!(fingerprint = %signer.fingerprint(), "binhost signing key: {}", signer.source());
            let published = pacloud_worker::sign::publish_signing_key(&ports.artifacts, &signer)
                .await
                .context("publishing the binhost signing key's certificate")?;
            tracing::info!(?published, path = pacloud_domain::published_key::PUBLISHED_KEY_PATH, "binhost certificate");
            Some(signer)
        }
        // check_signing above refused "sign without a key".
        _ => {
            tracing::warn!("sign_packages = false: packages are published unsigned; portage refuses them by default");
            None
        }
    };
    let workers = start_signing_workers_on(
        (Arc::new(ports.store), Arc::new(ports.queue)),
        Arc::new(ports.artifacts),
        backend,
        settings,
        Arc::new(SystemClock),
        signer,
    );
    let spot = SpotConfig {
        endpoint: settings.aws.imds_endpoint.clone().unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
        poll_interval: settings.aws.spot_poll_ms.map(Duration::from_millis).unwrap_or(Duration::from_secs(5)),
        ..SpotConfig::default()
    };
    let watcher_stop = CancellationToken::new();
    start_activity_tags(&config, &spot, workers.activity.clone(), watcher_stop.clone());
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(SpotWatcher::new(spot).run(tx, watcher_stop.clone()));
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                tracing::warn!(?event, "spot notice");
                react(&event, &workers.stop, &workers.abort, &workers.recheck);
                if matches!(event, SpotEvent::Terminate { .. } | SpotEvent::Stop { .. }) {
                    break;
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
    watcher_stop.cancel();
    workers.shutdown(settings.build.shutdown_grace).await;
    Ok(())
}

/// The fleet scaler's view of this worker: the instance id from IMDS, then
/// the `pacloud:activity` / `pacloud:lease` tags kept in step with the job
/// loops, with the expected end of the builds when their atoms have build
/// history (`pacloud_aws::fleet::run_activity_tagger`: at most one CreateTags
/// per 5 s, failures logged and retried, never fatal). Not on EC2 (IMDS
/// unreachable): no tags, logged once; the scaler then never terminates
/// this machine as idle.
fn start_activity_tags(
    config: &AwsConfig,
    spot: &SpotConfig,
    activity: tokio::sync::watch::Receiver<pacloud_worker::worker::Activity>,
    stop: CancellationToken,
) {
    let (config, spot) = (config.clone(), spot.clone());
    tokio::spawn(async move {
        let id = match pacloud_worker::spot::instance_id(&spot).await {
            Ok(id) => id,
            Err(e) => {
                tracing::info!(
                    error = &e as &dyn std::error::Error,
                    "no EC2 instance id from IMDS: no fleet activity tags"
                );
                return;
            }
        };
        tracing::info!(instance = id, "reporting activity in this instance's tags for the fleet scaler");
        let secs = |a: &pacloud_worker::worker::Activity| pacloud_aws::fleet::WorkerState {
            busy: a.busy > 0,
            since: u64::try_from(a.since.0 / 1000).unwrap_or(0),
            expected_end: a.expected_end.and_then(|e| u64::try_from(e.0 / 1000).ok()),
        };
        let (tx, rx) = tokio::sync::watch::channel(secs(&activity.borrow()));
        let client = pacloud_aws::fleet::FleetClient::connect(&config).await;
        // Idle past the policy's idle timeout: nudge the scaler to terminate
        // this instance now rather than at its next scheduled tick.
        let nudger = config.scaler_events_url.clone().map(|url| {
            tokio::spawn(pacloud_aws::nudge::run_idle_nudger(
                pacloud_aws::nudge::Nudger::new(client.sqs.clone(), url),
                id.clone(),
                tx.subscribe(),
                pacloud_aws::nudge::IDLE_AFTER,
                stop.clone(),
            ))
        });
        let tagger =
            tokio::spawn(pacloud_aws::fleet::run_activity_tagger(client, id, rx, Duration::from_secs(5), stop.clone()));
        let mut activity = activity;
        loop {
            tokio::select! {
                changed = activity.changed() => {
                    if changed.is_err() { break }
                    let s = secs(&activity.borrow_and_update());
                    tx.send_if_modified(|old| std::mem::replace(old, s) != s);
                }
                _ = stop.cancelled() => break,
            }
        }
        drop(tx);
        let _ = tagger.await;
        if let Some(n) = nudger {
            let _ = n.await;
        }
    });
}

/// The binhost signer over the KMS key `key_id`: the certificate is built
/// (and self-signed through KMS) once at startup; every signature is a KMS
/// `Sign` of a SHA-512 digest, checked against the public key before use.
pub async fn kms_signer(config: &AwsConfig, key_id: &str) -> anyhow::Result<Arc<pacloud_sign::Signer>> {
    let clients = pacloud_aws::clients(config).await;
    let public = pacloud_aws::kms::public_key(&clients.kms, key_id).await?;
    let sign =
        pacloud_aws::kms::digest_signer(clients.kms.clone(), key_id.to_owned(), tokio::runtime::Handle::current());
    let key_id = key_id.to_owned();
    let signer = tokio::task::spawn_blocking(move || {
        let remote = pacloud_sign::RemoteRsaKey::new(&public.spki_der, public.created_secs, sign)?;
        pacloud_sign::Signer::remote(
            remote,
            pacloud_sign::key::DEFAULT_USER_ID,
            pacloud_sign::KeySource::Remote(format!("KMS key {key_id}")),
        )
    })
    .await
    .context("the KMS signer setup task failed")?
    .context("building the binhost certificate with KMS")?;
    Ok(Arc::new(signer))
}
