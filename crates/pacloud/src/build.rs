//! Choosing and wiring the build backend: finds portage and the sandbox,
//! decides whether builds can run unprivileged, and starts the in-process
//! workers of `pacloud serve` (or the standalone `pacloud worker`).

use pacloud_domain::ports::{ArtifactStore, JobQueue, MetadataStore};
use pacloud_domain::{Clock, TargetSet};
use pacloud_worker::fetch::DistfilesCache;
use pacloud_worker::pkgcache::PackageCache;
use pacloud_worker::plan::BuildEnv;
use pacloud_worker::sandbox::bwrap::BwrapSandbox;
use pacloud_worker::sandbox::docker::DockerSandbox;
use pacloud_worker::sandbox::{Limits, PortageInstall, Sandbox};
use pacloud_worker::worker::{Worker, WorkerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::serve::App;
use crate::settings::{BackendChoice, Settings, Unprivileged};

/// Whether docker builds get a read-only container root (`--read-only`).
/// No, measured: portage locks the builder's own package database
/// (`/var/db/pkg` of BROOT = `/`) on every emerge and merges BDEPEND
/// packages into BROOT, so every build fails read-only; the writable layer is
/// the container's own and goes with `--rm`, so nothing persists to the next
/// build or the host either way (docs/sandboxes.md, "Read-only root").
pub const DOCKER_READ_ONLY_ROOT: bool = false;

/// A usable build backend.
pub struct Backend {
    pub sandbox: Arc<dyn Sandbox>,
    pub env: BuildEnv,
    /// One line for the startup log.
    pub description: String,
}

/// The outcome of looking for a backend.
// Made once per process; boxing would only add noise at every caller.
#[allow(clippy::large_enum_variant)]
pub enum Detected {
    Ready(Backend),
    /// No builds in this process, and why.
    Unavailable(String),
}

/// Finds portage: the configured venv, else `emerge` on PATH (inside a venv
/// or the system's own).
fn find_portage(configured: Option<&Path>) -> Result<PortageInstall, String> {
    if let Some(v) = configured {
        return if v.join("bin/emerge").is_file() {
            // Its real path: the sandbox lays a tmpfs over it, which a
            // symbolic link (e.g. a worktree's `.venv`) cannot take.
            Ok(PortageInstall::Venv(v.canonicalize().unwrap_or_else(|_| v.to_owned())))
        } else {
            Err(format!("portage venv {} has no bin/emerge", v.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("emerge").is_file() {
            if let Some(venv) = dir.parent().filter(|v| v.join("pyvenv.cfg").is_file()) {
                return Ok(PortageInstall::Venv(venv.to_owned()));
            }
            return Ok(PortageInstall::System);
        }
    }
    Err("portage (emerge) was not found: set build.portage_venv or PACLOUD_PORTAGE_VENV".into())
}

/// Whether uid 65534 can run portage and read everything a build reads,
/// checked the way builds run: through setpriv and bubblewrap.
async fn nobody_can_build(portage: &PortageInstall, paths: &[&Path]) -> bool {
    let mut argv: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--cap-drop",
        "ALL",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match portage {
        PortageInstall::Venv(v) => argv.push(v.join("bin/python").to_string_lossy().into_owned()),
        PortageInstall::System => argv.push("python3".into()),
    }
    argv.push("-c".into());
    argv.push(
        "import os, sys, portage; sys.exit(0 if all(os.access(p, os.R_OK | os.X_OK) for p in sys.argv[1:]) else 1)"
            .into(),
    );
    argv.extend(paths.iter().map(|p| p.to_string_lossy().into_owned()));
    pacloud_worker::runner::run_checked(&argv).await.is_ok()
}

/// Looks for the backend the settings ask for.
pub async fn detect(settings: &Settings) -> Detected {
    let b = &settings.build;
    if b.backend == BackendChoice::None || b.workers == 0 {
        return Detected::Unavailable("builds are turned off here (build.backend = none or build.workers = 0)".into());
    }
    let work_root = settings.data_dir.join("builds");
    if let Err(e) = std::fs::create_dir_all(&work_root) {
        return Detected::Unavailable(format!("cannot create {}: {e}", work_root.display()));
    }
    let mut repos = b.repositories.clone();
    if !repos.contains_key("gentoo") && Path::new("/var/db/repos/gentoo/profiles").is_dir() {
        repos.insert("gentoo".into(), PathBuf::from("/var/db/repos/gentoo"));
    }
    let limits = Limits { wall_clock: b.wall_clock, memory_bytes: b.memory_bytes };
    let (sandbox, portage): (Arc<dyn Sandbox>, PortageInstall) = match b.backend {
        BackendChoice::Docker => {
            let Some(image) = b.image.as_deref() else {
                return Detected::Unavailable(
                    "docker backend: build.image is not set (a builder image pinned by digest, or the local image ID \
                     scripts/builder-image.sh prints)"
                        .into(),
                );
            };
            if b.unprivileged == Unprivileged::Always {
                return Detected::Unavailable(
                    "docker backend: build.unprivileged = always is not supported: portage in the container must \
                     write the builder's own root (it locks /var/db/pkg and merges build-time dependencies into /), \
                     so builds run as the container's root with 7 capabilities (docs/sandboxes.md)"
                        .into(),
                );
            }
            let docker =
                DockerSandbox::default().with_read_only_root(DOCKER_READ_ONLY_ROOT).with_network(b.docker_network);
            let found = match docker.preflight(image).await {
                Ok(found) => found,
                Err(e) => return Detected::Unavailable(format!("docker backend: {e}")),
            };
            tracing::info!(engine = %found.engine, image = %found.image_id, portage = %found.portage, "docker backend ready");
            match docker.cleanup_stale().await {
                Ok(n) if n > 0 => tracing::info!(removed = n, "removed stale build containers"),
                Ok(_) => {}
                Err(e) => return Detected::Unavailable(format!("docker backend: cannot remove stale containers: {e}")),
            }
            (Arc::new(docker), PortageInstall::System)
        }
        _ => {
            let portage = match find_portage(b.portage_venv.as_deref()) {
                Ok(p) => p,
                Err(why) => return Detected::Unavailable(why),
            };
            match BwrapSandbox::detect().await {
                Ok(s) => (Arc::new(s), portage),
                Err(e) => return Detected::Unavailable(e.to_string()),
            }
        }
    };
    // Work directories must be traversable by the build user.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&work_root, std::fs::Permissions::from_mode(0o755));
    }
    let mut paths: Vec<&Path> = vec![&work_root];
    paths.extend(repos.values().map(PathBuf::as_path));
    let docker = b.backend == BackendChoice::Docker;
    let run_as = match b.unprivileged {
        Unprivileged::Never => None,
        Unprivileged::Always => Some((65534, 65534)), // never with docker (refused above)
        // In a container, portage merges build-time dependencies into the
        // container's own root (BROOT = /), which needs root there.
        Unprivileged::Auto if docker => None,
        Unprivileged::Auto => nobody_can_build(&portage, &paths).await.then_some((65534, 65534)),
    };
    let who = match run_as {
        Some(_) => "as nobody (uid 65534)".to_owned(),
        None if docker => "as root in the container with 7 capabilities kept (docs/sandboxes.md)".to_owned(),
        None => {
            "as root with every capability dropped (nobody cannot read the venv, repositories or data dir)".to_owned()
        }
    };
    let what = match &portage {
        PortageInstall::Venv(v) => format!("portage from {}", v.display()),
        PortageInstall::System if docker => format!("portage of image {}", b.image.as_deref().unwrap_or_default()),
        PortageInstall::System => "the system's portage".to_owned(),
    };
    let description = format!(
        "{} sandbox, {what}, {} worker(s), builds run {who}, repositories: {}",
        sandbox.name(),
        b.workers,
        if repos.is_empty() { "none".to_owned() } else { repos.keys().cloned().collect::<Vec<_>>().join(", ") }
    );
    for t in settings.targets.iter() {
        if !repos.contains_key(&t.spec.repository) {
            tracing::warn!(
                target = %t.name,
                repository = %t.spec.repository,
                "this worker has no such repository (set [repositories]); builds for this target will fail as infrastructure failures"
            );
        }
    }
    let distfiles_dir = settings.data_dir.join("distfiles");
    let distfiles = match DistfilesCache::new(distfiles_dir.clone(), b.distfiles_max_age, b.distfiles_max_bytes) {
        Ok(c) => c,
        Err(e) => return Detected::Unavailable(format!("cannot create {}: {e}", distfiles_dir.display())),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&distfiles_dir, std::fs::Permissions::from_mode(0o755));
    }
    // Off by default locally: the store is a directory on this disk already.
    let package_cache = PackageCache::new(settings.data_dir.join("package-cache"), b.package_cache_bytes.unwrap_or(0));
    let dep_roots = (b.dependency_roots > 0).then(|| {
        pacloud_worker::deproot::DepRoots::new(
            work_root.join(pacloud_worker::deproot::DEP_ROOTS_DIR),
            b.dependency_roots,
            b.dependency_roots_max_bytes,
        )
    });
    let env = BuildEnv {
        work_root,
        portage,
        repos,
        limits,
        network: b.network,
        run_as,
        image: b.image.clone(),
        distfiles: Some(distfiles),
        mirrors: b.mirrors.clone(),
        package_cache,
        dep_roots,
    };
    Detected::Ready(Backend { sandbox, env, description })
}

/// Running workers, and how to stop them.
pub struct Workers {
    /// Cancelled: take no new jobs.
    pub stop: CancellationToken,
    /// Cancelled: kill running builds, release their messages and leases.
    pub abort: CancellationToken,
    /// Notified: running jobs re-check their leases (after a resume).
    pub recheck: Arc<tokio::sync::Notify>,
    /// Busy or idle, and since when (the AWS worker's fleet tags).
    pub activity: tokio::sync::watch::Receiver<pacloud_worker::worker::Activity>,
    join: tokio::task::JoinHandle<()>,
}

impl Workers {
    /// Stops taking jobs and kills running builds at once (no waiting).
    pub fn abort_now(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }

    /// Stops taking jobs, lets running builds finish within `grace`, then
    /// aborts the rest (their messages and leases are released at once).
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        let mut join = self.join;
        if tokio::time::timeout(grace, &mut join).await.is_err() {
            tracing::warn!("builds still running after the grace period; aborting them");
            self.abort.cancel();
            let _ = join.await;
        }
    }
}

/// Starts `settings.build.workers` workers over the local app's ports.
pub fn start_workers(app: &App, backend: Backend, settings: &Settings, clock: Arc<dyn Clock>) -> Workers {
    let ports = (app.store.clone() as Arc<dyn MetadataStore>, app.queue.clone() as Arc<dyn JobQueue>);
    start_signing_workers_on(ports, app.artifacts.clone(), backend, settings, clock, app.signer.clone())
}

/// Starts `settings.build.workers` workers over any three ports.
pub fn start_workers_on(
    store: Arc<dyn MetadataStore>,
    queue: Arc<dyn JobQueue>,
    artifacts: Arc<dyn ArtifactStore>,
    backend: Backend,
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Workers {
    start_signing_workers_on((store, queue), artifacts, backend, settings, clock, None)
}

/// [`start_workers_on`] with a binhost signing key: every new package is
/// signed before it is published.
pub fn start_signing_workers_on(
    (store, queue): (Arc<dyn MetadataStore>, Arc<dyn JobQueue>),
    artifacts: Arc<dyn ArtifactStore>,
    backend: Backend,
    settings: &Settings,
    clock: Arc<dyn Clock>,
    signer: Option<Arc<pacloud_sign::Signer>>,
) -> Workers {
    let b = &settings.build;
    let config = WorkerConfig {
        concurrency: b.workers.max(1),
        lease: b.lease,
        poll_wait: b.poll_wait,
        max_attempts: settings.max_receives,
        failure_ttl: b.failure_ttl,
        retry_backoff: b.retry_backoff,
        compute: compute_from(|k| std::env::var(k).ok()),
    };
    let targets = Arc::new(TargetSet::clone(&settings.targets));
    tokio::spawn(pacloud_worker::tree_index::ensure_all(artifacts.clone(), backend.env.clone(), targets));
    let worker = Arc::new(
        Worker::new(
            store,
            queue,
            artifacts,
            Arc::new(TargetSet::clone(&settings.targets)),
            clock,
            backend.sandbox,
            backend.env,
            config,
            format!("w{}", std::process::id()),
        )
        .with_signer(signer),
    );
    let recheck = worker.recheck.clone();
    let activity = worker.activity();
    let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
    let join = tokio::spawn(worker.run(stop.clone(), abort.clone()));
    Workers { stop, abort, recheck, activity, join }
}

/// The worker machine's type and price for per-build cost, from
/// `PACLOUD_INSTANCE_TYPE`, `PACLOUD_CAPACITY_TYPE` (`spot`, `on-demand`,
/// `local`) and `PACLOUD_PRICE_USD_PER_HOUR` (set by the worker's launch
/// environment). All three or nothing; a wrong value is logged and ignored
/// (the cost is then not reported, the builds still run).
pub fn compute_from(get: impl Fn(&str) -> Option<String>) -> Option<pacloud_domain::ComputeInfo> {
    let (t, c, p) = (get("PACLOUD_INSTANCE_TYPE")?, get("PACLOUD_CAPACITY_TYPE")?, get("PACLOUD_PRICE_USD_PER_HOUR")?);
    let price = match p.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => v,
        _ => {
            tracing::warn!(
                value = p,
                "PACLOUD_PRICE_USD_PER_HOUR is not a price in USD (>= 0): build cost not recorded"
            );
            return None;
        }
    };
    if !matches!(c.as_str(), "spot" | "on-demand" | "local") {
        tracing::warn!(value = c, "PACLOUD_CAPACITY_TYPE must be spot, on-demand or local: build cost not recorded");
        return None;
    }
    Some(pacloud_domain::ComputeInfo { instance_type: t, capacity_type: c, usd_per_hour: price })
}

#[cfg(test)]
mod compute_tests {
    use super::compute_from;

    fn env(pairs: Vec<(&'static str, &'static str)>) -> impl Fn(&str) -> Option<String> {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn compute_needs_all_three_and_a_valid_price() {
        let t = ("PACLOUD_INSTANCE_TYPE", "c6i.xlarge");
        let c = ("PACLOUD_CAPACITY_TYPE", "spot");
        let p = ("PACLOUD_PRICE_USD_PER_HOUR", "0.068");
        let got = compute_from(env(vec![t, c, p])).unwrap();
        assert_eq!(
            (got.instance_type.as_str(), got.capacity_type.as_str(), got.usd_per_hour),
            ("c6i.xlarge", "spot", 0.068)
        );
        assert!(compute_from(env(vec![t, c])).is_none());
        assert!(compute_from(env(vec![t, c, ("PACLOUD_PRICE_USD_PER_HOUR", "-1")])).is_none());
        assert!(compute_from(env(vec![t, ("PACLOUD_CAPACITY_TYPE", "reserved"), p])).is_none());
    }
}
