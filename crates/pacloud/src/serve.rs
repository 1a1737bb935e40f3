//! `pacloud serve`: wires the embedded adapters (SQLite store and queue in
//! `<data>/pacloud.db`, artifacts under `<data>/artifacts`, the URL signing
//! key in `<data>/signing.key`, the binhost's OpenPGP key in
//! `<data>/binhost-signing-key.asc` unless configured) to the API Router and
//! serves it. The server
//! takes its listener and a shutdown future, so tests bind port 0.

use anyhow::Context;
use axum::Router;
use pacloud_api::{ApiState, Tokens};
use pacloud_domain::service::{BuildService, ServiceConfig};
use pacloud_domain::{Clock, SystemClock};
use pacloud_local::{Db, DirArtifactStore, SigningKey, SqliteQueue, SqliteStore, artifact_router, binhost_router};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

use crate::settings::Settings;

/// Everything a running local deployment is made of.
pub struct App {
    pub router: Router,
    pub clock: Arc<dyn Clock>,
    pub service: Arc<BuildService>,
    pub store: Arc<SqliteStore>,
    pub queue: Arc<SqliteQueue>,
    pub artifacts: Arc<DirArtifactStore>,
    /// The binhost signing key (when `sign_packages`).
    pub signer: Option<Arc<pacloud_sign::Signer>>,
}

/// Builds the local deployment. `public_url` is the base of every URL handed
/// out (the settings' `public_url`, or the address actually bound).
pub fn build_app(settings: &Settings, public_url: &str) -> anyhow::Result<App> {
    build_app_with_clock(settings, public_url, Arc::new(SystemClock))
}

/// [`build_app`] with an explicit clock (tests move time forward).
pub fn build_app_with_clock(settings: &Settings, public_url: &str, clock: Arc<dyn Clock>) -> anyhow::Result<App> {
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    let db = Db::open(&dir.join("pacloud.db")).context("opening the metadata database")?;
    let key = SigningKey::load_or_create(&dir.join("signing.key")).context("loading the URL signing key")?;
    let signer = if settings.sign_packages {
        let path = settings.binhost_key_path();
        let signer = pacloud_sign::Signer::load_or_generate(&path, pacloud_sign::key::DEFAULT_USER_ID)
            .with_context(|| format!("loading the binhost signing key {}", path.display()))?;
        tracing::info!(fingerprint = %signer.fingerprint(), "binhost signing key {}", signer.source());
        Some(Arc::new(signer))
    } else {
        tracing::warn!("sign_packages = false: packages are published unsigned; portage refuses them by default");
        None
    };
    let binhost_key = match &signer {
        Some(s) => pacloud_api::BinhostKey::Fixed(pacloud_api::PublicKeyInfo {
            armored: s.public_key_armored().context("exporting the binhost public key")?,
            fingerprint: s.fingerprint(),
        }),
        None => pacloud_api::BinhostKey::Unsigned,
    };
    let store = Arc::new(SqliteStore::new(db.clone()));
    let queue = Arc::new(SqliteQueue::new(db, clock.clone(), settings.max_receives));
    let artifacts = Arc::new(
        DirArtifactStore::new(dir.join("artifacts"), public_url, key, clock.clone())
            .with_context(|| format!("creating artifact directory under {}", dir.display()))?,
    );
    let config = ServiceConfig {
        url_ttl: settings.url_ttl,
        requeue_after: settings.requeue_after,
        poll_after: settings.poll_after,
        max_attempts: settings.max_receives,
        ..ServiceConfig::default()
    };
    let service = Arc::new(BuildService::new(
        store.clone(),
        queue.clone(),
        artifacts.clone(),
        Arc::new(settings.targets.clone()),
        clock.clone(),
        config,
    ));
    let state = Arc::new(ApiState {
        service: service.clone(),
        tokens: Tokens::new(&settings.tokens),
        base_path: String::new(),
        binhost_key,
    });
    let router =
        pacloud_api::router(state).merge(artifact_router(artifacts.clone())).merge(binhost_router(artifacts.clone()));
    Ok(App { router, clock, service, store, queue, artifacts, signer })
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// The public URL for a bound address when none is configured.
pub fn public_url(settings: &Settings, bound: std::net::SocketAddr) -> String {
    settings.public_url.clone().unwrap_or_else(|| format!("http://{bound}"))
}
