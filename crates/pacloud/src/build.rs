//! Choosing and wiring the build backend: finds portage and the sandbox,
//! decides whether builds can run unprivileged, and starts the in-process
//! workers of `pacloud serve` (or the standalone `pacloud worker`).

use pacloud_domain::ports::{ArtifactStore, JobQueue, MetadataStore};
use pacloud_domain::{Clock, TargetSet};
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

/// A usable build backend.
pub struct Backend {
    pub sandbox: Arc<dyn Sandbox>,
    pub env: BuildEnv,
    /// One line for the startup log.
    pub description: String,
}

/// The outcome of looking for a backend.
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
            Ok(PortageInstall::Venv(v.to_owned()))
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
            let docker = DockerSandbox::default().with_read_only_root(false);
            if let Err(e) = docker.available().await {
                return Detected::Unavailable(format!("docker backend: {e}"));
            }
            if b.image.is_none() {
                return Detected::Unavailable(
                    "docker backend: build.image (a stage3 image pinned by digest) is not set".into(),
                );
            }
            match docker.cleanup_stale().await {
                Ok(n) if n > 0 => tracing::info!(removed = n, "removed stale build containers"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = &e as &dyn std::error::Error, "cannot clean up stale containers"),
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
    let run_as = match b.unprivileged {
        Unprivileged::Never => None,
        Unprivileged::Always => Some((65534, 65534)),
        Unprivileged::Auto => nobody_can_build(&portage, &paths).await.then_some((65534, 65534)),
    };
    let who = match run_as {
        Some(_) => "as nobody (uid 65534)".to_owned(),
        None => {
            "as root with every capability dropped (nobody cannot read the venv, repositories or data dir)".to_owned()
        }
    };
    let what = match &portage {
        PortageInstall::Venv(v) => format!("portage from {}", v.display()),
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
    let env = BuildEnv { work_root, portage, repos, limits, network: b.network, run_as, image: b.image.clone() };
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
    start_workers_on(app.store.clone(), app.queue.clone(), app.artifacts.clone(), backend, settings, clock)
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
    let worker = Arc::new(Worker::new(
        store,
        queue,
        artifacts,
        Arc::new(TargetSet::clone(&settings.targets)),
        clock,
        backend.sandbox,
        backend.env,
        config,
        format!("w{}", std::process::id()),
    ));
    let recheck = worker.recheck.clone();
    let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
    let join = tokio::spawn(worker.run(stop.clone(), abort.clone()));
    Workers { stop, abort, recheck, join }
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
