//! The `docker` sandbox backend, the production default on the worker AMI:
//! one throw-away container per build (`docker run --rm`), started through
//! the docker CLI from an argv list (no shell, no API client library).
//!
//! The container runs the builder image (pinned by digest) with the image's
//! own portage ([`PortageInstall::System`]); all capabilities are dropped
//! except the few portage needs as root, the root filesystem is the
//! container's own writable layer (discarded with the container; a
//! read-only root breaks every emerge, see [`DockerSandbox::with_read_only_root`]),
//! and the work directory's parts are bind-mounted at the same paths as on
//! the host (the config root and the repositories read-only, the five
//! writable directories read-write).
//!
//! Instance credentials: with `--network none` (the default, `plan.network
//! == false`) the container has only a loopback interface and cannot reach
//! IMDS at 169.254.169.254. When a plan allows the network the container is
//! on the default docker bridge; the worker AMI blocks IMDS from that bridge
//! with an iptables rule (`DOCKER-USER` chain, the worker-image issue). This
//! backend does not, and cannot, enforce that itself.

use super::{BuildPlan, PortageInstall, Sandbox, SandboxError, SandboxOutcome};
use crate::runner::{CommandError, run_checked};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Label on every container this backend starts (what `cleanup_stale` removes).
pub const MANAGED_LABEL: &str = "pacloud.managed=1";
/// Label key carrying the job id.
pub const JOB_LABEL: &str = "pacloud.job";

/// Capabilities kept after `--cap-drop ALL`. Portage runs as uid 0 in the
/// container (unless `plan.run_as` is set, in which case docker gives the
/// non-root user no effective capabilities at all) and needs exactly these
/// to build and merge packages into `ROOT`:
/// - `CHOWN`: `chown` of the installed image (files owned by other users and
///   groups, e.g. `root:portage`, `games:games`) and of portage's own dirs.
/// - `DAC_OVERRIDE`: root reading/writing files whose mode denies it (the
///   build dirs owned by the `portage` user, read-only files in `${D}`).
/// - `FOWNER`: `chmod`/`utime`/`touch -r` on files root does not own, and
///   keeping mtimes while merging.
/// - `FSETID`: keeping setuid/setgid bits across `chown`/writes in `${D}`
///   (e.g. setuid helpers packaged with their mode).
/// - `SETUID`, `SETGID`: portage dropping to the `portage` user for phases
///   (`FEATURES=userpriv` when a target enables it) and `install -o/-g`.
/// - `KILL`: portage signalling its own children after they dropped to
///   another uid (cleanup on failure); without it root cannot signal them.
///
/// Deliberately NOT kept: `SYS_ADMIN` (mount/unshare: portage's
/// `*-sandbox` FEATURES are off in make.conf; an escape attempt like
/// `mount -o remount,rw /` must fail), `MKNOD`, `NET_RAW`, `NET_BIND_SERVICE`,
/// `SYS_CHROOT`, `AUDIT_WRITE`, `SETFCAP` (fcaps.eclass falls back to
/// setuid modes when `setcap` fails).
pub const KEPT_CAPABILITIES: [&str; 7] = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETGID", "SETUID", "KILL"];

/// Default `--pids-limit`: generous for `make -jN` with compilers and
/// linkers, small enough to stop a fork bomb.
pub const DEFAULT_PIDS_LIMIT: u32 = 4096;

/// How long `docker kill` may take to end the `docker run` client before it
/// is killed itself and the container removed with `docker rm -f`.
const KILL_GRACE: Duration = Duration::from_secs(30);
/// Bound on one control command (`kill`, `rm`, `ps`, `version`).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// `docker run` exits 125 when docker itself failed (bad flag, image not
/// found, daemon error, name conflict) rather than the command inside.
const DOCKER_RUN_FAILED: i32 = 125;
/// Longest job-id part of a container name.
const MAX_NAME_PART: usize = 100;

/// Mount options of the `/var/tmp` tmpfs: docker's defaults but `exec`.
const VAR_TMP_OPTIONS: &str = "rw,exec,nosuid,nodev,mode=1777";

/// The PATH builds get with the image's own portage (plan.rs) and that
/// [`DockerSandbox::preflight`] checks `emerge` on.
const BUILD_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// What [`DockerSandbox::preflight`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// The engine's server version.
    pub engine: String,
    /// The image's content-addressed ID (`sha256:...`).
    pub image_id: String,
    /// The first line of `emerge --version` in the image.
    pub portage: String,
}

/// The docker network of containers whose plan allows the network (the
/// fetch step, and every build when the worker allows builds the network).
/// Builds without network always get `--network=none`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// docker's default bridge (production): the worker AMI blocks IMDS
    /// from it (module docs).
    #[default]
    Bridge,
    /// `--network=host`: the host's own network namespace, so a mirror on
    /// the host's loopback (tests, a local mirror on a single-user machine)
    /// is reachable. The AMI's IMDS rule (`DOCKER-USER`) does not apply to
    /// it: not for workers holding instance credentials.
    Host,
}

impl NetworkMode {
    /// The `--network` value.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
        }
    }
}

/// The docker backend. `docker` is the CLI (a path, or a bare name looked up
/// on `PATH`); it talks to whatever engine the worker's environment points it
/// at (`DOCKER_HOST`), which must be local: bind-mount sources are host paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerSandbox {
    docker: PathBuf,
    pids_limit: u32,
    read_only_root: bool,
    network: NetworkMode,
}

impl Default for DockerSandbox {
    fn default() -> Self {
        Self::new("docker")
    }
}

impl DockerSandbox {
    pub fn new(docker: impl Into<PathBuf>) -> Self {
        Self {
            docker: docker.into(),
            pids_limit: DEFAULT_PIDS_LIMIT,
            read_only_root: false,
            network: NetworkMode::Bridge,
        }
    }

    /// Sets `--pids-limit`.
    pub fn with_pids_limit(mut self, pids_limit: u32) -> Self {
        self.pids_limit = pids_limit;
        self
    }

    /// Whether the container's root filesystem is `--read-only` (default:
    /// no).
    ///
    /// Measured (tests/it/docker.rs, `docker_read_only_root_breaks_builds`):
    /// with `--read-only` every emerge fails at once, because portage locks
    /// the builder's own package database (`/var/db/pkg` of BROOT = `/`)
    /// even for a package without dependencies; and BDEPEND packages are
    /// merged into BROOT (tests/fixtures/VERIFIED.md §5: nothing moves them
    /// into ROOT), i.e. into `/usr` of the container. The writable root is
    /// the container's own layer, removed with `--rm`, so nothing persists to
    /// the next build or reaches the host either way.
    pub fn with_read_only_root(mut self, read_only_root: bool) -> Self {
        self.read_only_root = read_only_root;
        self
    }

    /// The network of containers whose plan allows it (default:
    /// [`NetworkMode::Bridge`]).
    pub fn with_network(mut self, network: NetworkMode) -> Self {
        self.network = network;
        self
    }

    /// The CLI this backend runs.
    pub fn docker(&self) -> &Path {
        &self.docker
    }

    /// The complete `docker run` argv for `plan` (argv[0] is the CLI).
    /// Pure: validates the plan and builds the list, runs nothing.
    ///
    /// Every option is one `--flag=value` element so no value can be read as
    /// a flag. No `--` is needed or accepted by `docker run`: option parsing
    /// stops at the image (`docker run [OPTIONS] IMAGE [COMMAND] [ARG...]`),
    /// and the image is checked to start with an alphanumeric character, so
    /// the build's argv after it is passed through verbatim.
    pub fn run_argv(&self, plan: &BuildPlan) -> Result<Vec<String>, SandboxError> {
        let image = pinned_image(plan.image.as_deref())?;
        if plan.portage != PortageInstall::System {
            return Err(SandboxError::Unavailable(format!(
                "the docker backend runs the builder image's own portage (PortageInstall::System), \
                 not {:?}; a host venv is for the bwrap backend",
                plan.portage
            )));
        }
        if plan.argv.first().is_none_or(|a| a.is_empty()) {
            return Err(SandboxError::Unavailable("the build plan has an empty command".into()));
        }
        let docker = utf8(&self.docker, "the docker CLI path")?;

        let mut a: Vec<String> = vec![docker.to_owned(), "run".into(), "--rm".into()];
        a.push(format!("--name={}", container_name(&plan.job_id)));
        a.push(format!("--label={JOB_LABEL}={}", plan.job_id));
        a.push(format!("--label={MANAGED_LABEL}"));
        // A tiny init as PID 1 reaps orphaned build processes and forwards signals.
        a.push("--init".into());
        // The build log is streamed to `plan.log_path()` by the attached
        // client; the daemon keeps no second copy.
        a.push("--log-driver=none".into());
        if !plan.network {
            a.push("--network=none".into());
        } else if self.network == NetworkMode::Host {
            a.push("--network=host".into());
        }
        // else: default bridge; IMDS is blocked from it by the AMI (module docs).
        if let Some(bytes) = plan.limits.memory_bytes {
            a.push(format!("--memory={bytes}"));
            // Equal to --memory: no swap on top of the limit.
            a.push(format!("--memory-swap={bytes}"));
        }
        a.push(format!("--pids-limit={}", self.pids_limit));
        a.push("--cap-drop=ALL".into());
        a.extend(KEPT_CAPABILITIES.iter().map(|c| format!("--cap-add={c}")));
        a.push("--security-opt=no-new-privileges".into());
        if self.read_only_root {
            a.push("--read-only".into());
        }
        // docker's defaults for --tmpfs: rw,nosuid,nodev,noexec, mode 1777.
        a.push("--tmpfs=/tmp".into());
        // /var/tmp is the PORTAGE_TMPDIR of the builder's own configuration
        // (BDEPEND merged into BROOT = /, worker-image/builder/make.conf), and
        // portage refuses a noexec one ("Can not execute files in /var/tmp").
        a.push(format!("--tmpfs=/var/tmp:{VAR_TMP_OPTIONS}"));
        a.push(bind(&plan.config_root(), true)?);
        for dir in plan.writable_dirs() {
            a.push(bind(&dir, false)?);
        }
        for (_, repo) in &plan.repos {
            a.push(bind(repo, true)?);
        }
        if let Some((uid, gid)) = plan.run_as {
            a.push(format!("--user={uid}:{gid}"));
        }
        // Only these reach the build: docker passes nothing from the
        // client's environment unless asked (`--env NAME` without a value,
        // `--env-file`), and every entry here has a value. The image's own
        // ENV lines and docker's HOSTNAME still apply under these.
        for (k, v) in &plan.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(SandboxError::Unavailable(format!("invalid environment entry {k:?} in the build plan")));
            }
            a.push(format!("--env={k}={v}"));
        }
        a.push(format!("--workdir={}", abs_utf8(&plan.work_dir, "the work directory")?));
        a.push(image.to_owned());
        a.extend(plan.argv.iter().cloned());
        Ok(a)
    }

    /// The engine's version (`docker version --format {{.Server.Version}}`),
    /// or [`SandboxError::Unavailable`] saying why no engine answers.
    pub async fn available(&self) -> Result<String, SandboxError> {
        let argv = self.cli(&["version", "--format", "{{.Server.Version}}"]);
        let unavailable = |why: String| {
            SandboxError::Unavailable(format!(
                "no Docker engine answers `{} version` ({why}); start dockerd or point DOCKER_HOST at a local engine",
                self.docker.display()
            ))
        };
        let out = match tokio::time::timeout(CONTROL_TIMEOUT, run_checked(&argv)).await {
            Err(_) => return Err(unavailable(format!("no answer within {CONTROL_TIMEOUT:?}"))),
            Ok(Err(CommandError::Spawn { source, .. })) => {
                return Err(unavailable(format!("cannot start the docker CLI: {source}")));
            }
            Ok(Err(CommandError::Failed { status, stderr_tail, .. })) => {
                return Err(unavailable(format!("{status}: {}", stderr_tail.trim())));
            }
            Ok(Ok(out)) => out,
        };
        let version = out.stdout.trim();
        if version.is_empty() {
            return Err(unavailable("it printed no server version".into()));
        }
        Ok(version.to_owned())
    }

    /// The checks a worker makes before it takes any job, in order: an
    /// engine answers, `image` is pinned, the engine has it locally (nothing
    /// is ever pulled by a build), and it runs `emerge --version` with the
    /// PATH builds get. Each failure is [`SandboxError::Unavailable`] naming
    /// what is missing, so a worker refuses to start instead of failing
    /// every build later.
    pub async fn preflight(&self, image: &str) -> Result<Preflight, SandboxError> {
        let engine = self.available().await?;
        let image = pinned_image(Some(image))?;
        let inspect = self.cli(&["image", "inspect", "--format", "{{.Id}}", image]);
        let image_id = match self.control(&inspect).await {
            Ok(out) => out.stdout.trim().to_owned(),
            Err(SandboxError::Command(CommandError::Failed { stderr_tail, .. })) => {
                return Err(SandboxError::Unavailable(format!(
                    "builder image {image} is not in the local Docker engine ({}): build or load it first \
                     (scripts/builder-image.sh builds the stand-in; worker-image/builder/README.md the stage3 image)",
                    stderr_tail.trim()
                )));
            }
            Err(e) => return Err(e),
        };
        let name = format!("pacloud-preflight-{}", std::process::id());
        let mut argv = self.cli(&["run", "--rm", "--network=none", "--cap-drop=ALL"]);
        argv.push(format!("--name={name}"));
        argv.push(format!("--label={MANAGED_LABEL}"));
        argv.push(format!("--env=PATH={BUILD_PATH}"));
        argv.extend([image.to_owned(), "emerge".into(), "--version".into()]);
        let portage = match self.control(&argv).await {
            Ok(out) if out.stdout.trim_start().starts_with("Portage ") => {
                out.stdout.lines().next().unwrap_or_default().trim().to_owned()
            }
            Ok(out) => {
                return Err(SandboxError::Unavailable(format!(
                    "builder image {image} has no usable portage: `emerge --version` printed {:?}",
                    crate::runner::tail_lines(&out.stdout, 3)
                )));
            }
            Err(SandboxError::Command(CommandError::Failed { status, stderr_tail, .. })) => {
                let _ = self.control(&self.cli(&["rm", "-f", &name])).await;
                return Err(SandboxError::Unavailable(format!(
                    "builder image {image} has no usable portage: `emerge --version` on PATH={BUILD_PATH} failed \
                     ({status}: {})",
                    stderr_tail.trim()
                )));
            }
            Err(e) => {
                let _ = self.control(&self.cli(&["rm", "-f", &name])).await;
                return Err(e);
            }
        };
        Ok(Preflight { engine, image_id, portage })
    }

    /// Removes every container labelled `pacloud.managed=1` (left over by a
    /// crashed or killed worker) and returns how many were removed. Call it
    /// at worker start, before any build runs: it removes ALL pacloud
    /// containers of the engine, so one engine must not be shared by
    /// independent worker processes.
    pub async fn cleanup_stale(&self) -> Result<usize, SandboxError> {
        let before = self.managed_containers().await?;
        if before.is_empty() {
            return Ok(0);
        }
        let mut argv = self.cli(&["rm", "-f"]);
        argv.extend(before.iter().cloned());
        // `rm -f` fails as a whole if one container vanished meanwhile (its
        // own `--rm`): judge by what is left, not by the exit status.
        let removed = self.control(&argv).await;
        let left = self.managed_containers().await?;
        let still_there = before.iter().filter(|id| left.contains(id)).count();
        if still_there > 0 {
            return Err(match removed {
                Err(e) => e,
                Ok(_) => {
                    SandboxError::Unavailable(format!("{still_there} stale pacloud containers could not be removed"))
                }
            });
        }
        Ok(before.len())
    }

    async fn managed_containers(&self) -> Result<Vec<String>, SandboxError> {
        let filter = format!("label={MANAGED_LABEL}");
        let out = self.control(&self.cli(&["ps", "-aq", "--no-trunc", "--filter", &filter])).await?;
        Ok(out.stdout.split_whitespace().map(str::to_owned).collect())
    }

    fn cli(&self, args: &[&str]) -> Vec<String> {
        let mut argv = vec![self.docker.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|s| (*s).to_owned()));
        argv
    }

    /// A docker control command, bounded by [`CONTROL_TIMEOUT`] (the
    /// runner kills the CLI when its future is dropped).
    async fn control(&self, argv: &[String]) -> Result<crate::runner::Output, SandboxError> {
        match tokio::time::timeout(CONTROL_TIMEOUT, run_checked(argv)).await {
            Ok(r) => r.map_err(SandboxError::Command),
            Err(_) => Err(SandboxError::Unavailable(format!(
                "`{}` did not finish within {CONTROL_TIMEOUT:?}",
                argv.join(" ")
            ))),
        }
    }

    /// Ends a container whose `docker run` client is `child`: `docker kill`
    /// (repeated, since the container may not exist yet while the client is
    /// still creating it), wait for the client, and if it does not exit within
    /// [`KILL_GRACE`] kill the client; finally `docker rm -f` so no container
    /// outlives this call. Returns the client's exit status if it exited.
    async fn stop(&self, name: &str, child: &mut Child) -> Option<ExitStatus> {
        let give_up = Instant::now() + KILL_GRACE;
        let status = loop {
            // Fails when the container does not exist (yet, or any more):
            // the wait below decides.
            if let Err(e) = self.control(&self.cli(&["kill", name])).await {
                tracing::debug!(container = name, error = %e, "docker kill");
            }
            match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(status) => break status.ok(),
                Err(_) if Instant::now() >= give_up => {
                    tracing::warn!(container = name, "docker run did not end after docker kill; killing the client");
                    let _ = child.kill().await;
                    break None;
                }
                Err(_) => {}
            }
        };
        // Usually already gone through --rm ("No such container" is fine).
        if let Err(e) = self.control(&self.cli(&["rm", "-f", name])).await {
            tracing::debug!(container = name, error = %e, "docker rm -f");
        }
        status
    }
}

#[async_trait]
impl Sandbox for DockerSandbox {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn run(&self, plan: &BuildPlan, cancel: CancellationToken) -> Result<SandboxOutcome, SandboxError> {
        let argv = self.run_argv(plan)?;
        // `--user` gets no capabilities: the writable directories must be its own.
        super::bwrap::BwrapSandbox::chown_for(plan)?;
        let name = container_name(&plan.job_id);
        let log = plan.log_path();
        let io = |source| SandboxError::Io { path: log.clone(), source };
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        if cancel.is_cancelled() {
            return Err(SandboxError::Cancelled);
        }
        let started = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SandboxError::Spawn { program: argv[0].clone(), source })?;
        tracing::info!(container = %name, job = %plan.job_id, "docker build started");
        // If this future is dropped mid-build, killing the client alone would
        // leave the container running: the guard removes it.
        let mut guard = RemoveOnDrop { docker: self.docker.clone(), name: Some(name.clone()) };

        let timed_out = tokio::select! {
            status = child.wait() => {
                guard.disarm();
                let status = status.map_err(io)?;
                return finish(plan, status, started.elapsed());
            }
            () = tokio::time::sleep(plan.limits.wall_clock) => true,
            () = cancel.cancelled() => false,
        };
        let status = self.stop(&name, &mut child).await;
        guard.disarm();
        let duration = started.elapsed();
        if !timed_out {
            append_note(&log, "pacloud: build cancelled; container killed");
            return Err(SandboxError::Cancelled);
        }
        append_note(
            &log,
            &format!("pacloud: wall-clock limit of {:?} reached; container killed", plan.limits.wall_clock),
        );
        Ok(SandboxOutcome { exit_code: status.and_then(|s| s.code()), timed_out: true, duration, log })
    }
}

/// The outcome of a `docker run` that ended by itself.
///
/// Exit status 125 is docker's own failure (image missing, bad option, name
/// conflict, daemon error): an infrastructure error, not a build failure
/// (emerge exits 0 or 1). Deaths by signal inside the container show up as
/// 128+N (docker's convention); only a signal to the client itself gives
/// `exit_code: None`.
fn finish(plan: &BuildPlan, status: ExitStatus, duration: Duration) -> Result<SandboxOutcome, SandboxError> {
    if status.code() == Some(DOCKER_RUN_FAILED) {
        return Err(SandboxError::Command(CommandError::Failed {
            program: "docker run".into(),
            status,
            stderr_tail: crate::runner::tail_lines(&log_tail(&plan.log_path()), 20),
        }));
    }
    Ok(SandboxOutcome { exit_code: status.code(), timed_out: false, duration, log: plan.log_path() })
}

/// The last 16 KiB of the log (best effort).
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_default()
}

fn append_note(path: &Path, note: &str) {
    let r = std::fs::OpenOptions::new().append(true).open(path).and_then(|mut f| writeln!(f, "\n{note}"));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "cannot append to the build log");
    }
}

/// Removes the named container when dropped armed (the build future was
/// dropped while the container ran). Fire and forget: tokio reaps the child.
struct RemoveOnDrop {
    docker: PathBuf,
    name: Option<String>,
}

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.name = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let spawned = Command::new(&self.docker)
            .args(["rm", "-f", &name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            tracing::warn!(container = %name, error = %e, "cannot remove an abandoned build container");
        }
    }
}

/// `pacloud-<job id>`, restricted to the characters docker allows in names
/// (`[A-Za-z0-9_.-]`, others become `_`). When anything had to change (odd
/// characters, or a job id longer than 100 characters), a short hash of the
/// original job id is appended so distinct jobs keep distinct names.
pub fn container_name(job_id: &str) -> String {
    let clean: String = job_id
        .chars()
        .take(MAX_NAME_PART)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' })
        .collect();
    if !job_id.is_empty() && clean == job_id {
        return format!("pacloud-{clean}");
    }
    let hash = hex::encode(Sha256::digest(job_id.as_bytes()));
    format!("pacloud-{clean}-{}", &hash[..12])
}

/// A builder image reference pinned to its content: either
/// `name[:tag]@sha256:<64 hex>` (a registry digest, production) or the
/// content-addressed image ID `sha256:<64 hex>` that a local build prints
/// (the stand-in of scripts/builder-image.sh; `docker run` accepts it, and it
/// names exactly one image configuration). A bare tag is refused: it can
/// move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef(String);

impl ImageRef {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an image reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "builder image {0:?} is not pinned by digest: the docker backend only runs `name@sha256:<64 lowercase hex>` \
     or a local image ID `sha256:<64 lowercase hex>` (scripts/builder-image.sh prints one)"
)]
pub struct UnpinnedImage(pub String);

impl std::str::FromStr for ImageRef {
    type Err = UnpinnedImage;

    fn from_str(image: &str) -> Result<Self, Self::Err> {
        let bad = || UnpinnedImage(image.to_owned());
        let is_digest = |d: &str| {
            d.strip_prefix("sha256:")
                .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        };
        if is_digest(image) {
            return Ok(ImageRef(image.to_owned()));
        }
        let (name, digest) = image.rsplit_once('@').ok_or_else(bad)?;
        let name_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'))
            && !name.ends_with(['/', ':'])
            && !name.contains("//");
        if is_digest(digest) && name_ok { Ok(ImageRef(image.to_owned())) } else { Err(bad()) }
    }
}

/// Checks that the plan's image is pinned ([`ImageRef`]).
fn pinned_image(image: Option<&str>) -> Result<&str, SandboxError> {
    let Some(image) = image else {
        return Err(SandboxError::Unavailable(
            "the docker backend needs a builder image pinned by digest (name@sha256:<64 hex> or a local image ID \
             sha256:<64 hex>); the plan has none"
                .into(),
        ));
    };
    match image.parse::<ImageRef>() {
        Ok(_) => Ok(image),
        Err(e) => Err(SandboxError::Unavailable(e.to_string())),
    }
}

fn utf8<'a>(path: &'a Path, what: &str) -> Result<&'a str, SandboxError> {
    path.to_str().ok_or_else(|| SandboxError::Unavailable(format!("{what} {} is not valid UTF-8", path.display())))
}

fn abs_utf8<'a>(path: &'a Path, what: &str) -> Result<&'a str, SandboxError> {
    let s = utf8(path, what)?;
    if !path.is_absolute() {
        return Err(SandboxError::Unavailable(format!("{what} {s} is not an absolute path")));
    }
    Ok(s)
}

/// A `--mount` bind of `path` at the same path inside. `--mount` (unlike
/// `-v`) fails when the source is missing instead of creating it, and has no
/// `:` ambiguity; its value is CSV, so paths with `,` `"` or line breaks are
/// refused rather than quoted.
fn bind(path: &Path, read_only: bool) -> Result<String, SandboxError> {
    let p = abs_utf8(path, "mount source")?;
    if p.contains([',', '"', '\n', '\r', '\0']) {
        return Err(SandboxError::Unavailable(format!(
            "mount source {p:?} contains a character docker's --mount syntax cannot take (, \" or a line break)"
        )));
    }
    let ro = if read_only { ",readonly" } else { "" };
    Ok(format!("--mount=type=bind,source={p},target={p}{ro}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Limits;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn plan() -> BuildPlan {
        BuildPlan {
            job_id: "job-1".into(),
            work_dir: "/var/lib/pacloud/builds/job-1".into(),
            repos: vec![("gentoo".into(), "/var/db/repos/gentoo".into())],
            portage: PortageInstall::System,
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("PORTAGE_REPOSITORIES".into(), "[gentoo]\nlocation = /x".into()),
            ],
            argv: vec!["emerge".into(), "--buildpkg".into(), "=app-misc/hello-2.12-r1".into()],
            network: false,
            limits: Limits { wall_clock: Duration::from_secs(3600), memory_bytes: None },
            image: Some(format!("docker.io/gentoo/stage3@sha256:{DIGEST}")),
            run_as: None,
            build_root: None,
        }
    }

    fn argv(plan: &BuildPlan) -> Vec<String> {
        DockerSandbox::new("/usr/bin/docker").run_argv(plan).unwrap()
    }

    fn unavailable(plan: &BuildPlan) -> String {
        match DockerSandbox::default().run_argv(plan) {
            Err(SandboxError::Unavailable(msg)) => msg,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn docker_argv_shape() {
        let p = plan();
        let a = argv(&p);
        assert_eq!(a[..3], ["/usr/bin/docker", "run", "--rm"]);
        let image = p.image.clone().unwrap();
        let at = a.iter().position(|x| *x == image).expect("image in argv");
        // The image, then exactly the build's argv; every option before it.
        assert_eq!(a[at + 1..], p.argv[..]);
        assert!(a[1..at].iter().skip(1).all(|x| x.starts_with("--")), "{a:?}");
        for want in [
            "--name=pacloud-job-1",
            "--label=pacloud.job=job-1",
            "--label=pacloud.managed=1",
            "--pids-limit=4096",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--tmpfs=/tmp",
            "--tmpfs=/var/tmp:rw,exec,nosuid,nodev,mode=1777",
            "--workdir=/var/lib/pacloud/builds/job-1",
        ] {
            assert!(a.iter().any(|x| x == want), "missing {want} in {a:?}");
        }
        let caps: Vec<&str> = a.iter().filter_map(|x| x.strip_prefix("--cap-add=")).collect();
        assert_eq!(caps, KEPT_CAPABILITIES);
        assert!(!caps.contains(&"SYS_ADMIN") && !caps.contains(&"ALL"));
        assert!(!a.iter().any(|x| x.starts_with("--memory")), "no memory flag without a limit");
        assert!(!a.iter().any(|x| x.starts_with("--user")), "no --user without run_as");
    }

    #[test]
    fn docker_no_shell_no_privileged() {
        let mut p = plan();
        p.network = true;
        p.run_as = Some((1, 1));
        p.limits.memory_bytes = Some(1 << 30);
        for a in [argv(&p), argv(&plan())] {
            for x in &a {
                assert!(!x.starts_with("--privileged"), "{a:?}");
                assert!(!x.starts_with("--cap-add=ALL") && !x.starts_with("--cap-add=SYS_ADMIN"), "{a:?}");
                assert!(!x.contains("seccomp=unconfined") && !x.contains("apparmor=unconfined"), "{a:?}");
                assert!(!x.starts_with("--env-file") && !x.starts_with("-v") && x != "-e", "{a:?}");
                assert!(!matches!(x.as_str(), "sh" | "/bin/sh" | "bash" | "/bin/bash" | "-c"), "{a:?}");
            }
        }
    }

    #[test]
    fn docker_image_must_be_pinned_by_digest() {
        let mut p = plan();
        for good in [
            format!("sha256:{DIGEST}"),
            format!("gentoo/stage3@sha256:{DIGEST}"),
            format!("registry.example:5000/pacloud/builder:2026@sha256:{DIGEST}"),
        ] {
            p.image = Some(good.clone());
            assert!(argv(&p).contains(&good));
        }
        for bad in [
            "gentoo/stage3".to_owned(),
            "gentoo/stage3:latest".to_owned(),
            format!("gentoo/stage3@sha256:{}", &DIGEST[..63]),
            format!("gentoo/stage3@sha256:{}", DIGEST.to_uppercase()),
            format!("gentoo/stage3@sha512:{DIGEST}"),
            format!("gentoo/stage3@sha256:{DIGEST}0"),
            format!("@sha256:{DIGEST}"),
            format!("--privileged@sha256:{DIGEST}"),
            format!("gentoo stage3@sha256:{DIGEST}"),
            format!("sha256:{}", &DIGEST[..12]),
            format!("sha256:{DIGEST}:latest"),
            format!("sha512:{DIGEST}"),
            "pacloud-builder-standin:0123456789ab".to_owned(),
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
            p.image = Some(bad.clone());
            let msg = unavailable(&p);
            assert!(msg.contains("pinned by digest"), "{bad}: {msg}");
        }
        p.image = None;
        assert!(unavailable(&p).contains("pinned by digest"));
    }

    #[test]
    fn docker_network_none_unless_allowed() {
        let mut p = plan();
        assert!(argv(&p).iter().any(|x| x == "--network=none"));
        p.network = true;
        assert!(!argv(&p).iter().any(|x| x.starts_with("--network") || x.starts_with("--net=")));
        // Host mode (a mirror on the host's loopback) only where the plan has network.
        let host = DockerSandbox::new("/usr/bin/docker").with_network(NetworkMode::Host);
        let networks = |p: &BuildPlan| -> Vec<String> {
            host.run_argv(p).unwrap().into_iter().filter(|x| x.starts_with("--network")).collect()
        };
        assert_eq!(networks(&p), ["--network=host"]);
        p.network = false;
        assert_eq!(networks(&p), ["--network=none"]);
    }

    #[test]
    fn docker_memory_and_user() {
        let mut p = plan();
        p.limits.memory_bytes = Some(2_147_483_648);
        p.run_as = Some((65534, 65533));
        let a = argv(&p);
        assert!(a.iter().any(|x| x == "--memory=2147483648"));
        assert!(a.iter().any(|x| x == "--memory-swap=2147483648"));
        assert!(a.iter().any(|x| x == "--user=65534:65533"));
    }

    #[test]
    fn docker_mounts_same_paths_ro_and_rw() {
        let mut p = plan();
        p.repos.push(("extra".into(), "/srv/repos/extra".into()));
        let a = argv(&p);
        let mounts: Vec<&str> = a.iter().filter_map(|x| x.strip_prefix("--mount=")).collect();
        let w = "/var/lib/pacloud/builds/job-1";
        let mut want = vec![format!("type=bind,source={w}/config,target={w}/config,readonly")];
        for d in ["root", "pkgdir", "tmp", "distfiles", "logs"] {
            want.push(format!("type=bind,source={w}/{d},target={w}/{d}"));
        }
        want.push("type=bind,source=/var/db/repos/gentoo,target=/var/db/repos/gentoo,readonly".into());
        want.push("type=bind,source=/srv/repos/extra,target=/srv/repos/extra,readonly".into());
        assert_eq!(mounts, want);
        assert!(!a.iter().any(|x| x == "-v" || x.starts_with("--volume")));

        p.repos.push(("bad".into(), "/srv/a,b".into()));
        assert!(unavailable(&p).contains("--mount"));
        p.repos.pop();
        p.repos.push(("rel".into(), "repos/x".into()));
        assert!(unavailable(&p).contains("absolute"));
    }

    #[test]
    fn docker_env_exactly_the_plan() {
        let mut p = plan();
        let a = argv(&p);
        let env: Vec<&str> = a.iter().filter_map(|x| x.strip_prefix("--env=")).collect();
        assert_eq!(env, ["PATH=/usr/bin:/bin", "PORTAGE_REPOSITORIES=[gentoo]\nlocation = /x"]);
        // Every entry has a value: `--env NAME` alone would inherit from the client.
        p.env.push((String::new(), "x".into()));
        assert!(unavailable(&p).contains("environment"));
        p.env.pop();
        p.env.push(("A=B".into(), "x".into()));
        assert!(unavailable(&p).contains("environment"));
    }

    #[test]
    fn docker_rejects_venv_and_empty_command() {
        let mut p = plan();
        p.portage = PortageInstall::Venv("/opt/venv".into());
        assert!(unavailable(&p).contains("System"));
        let mut p = plan();
        p.argv.clear();
        assert!(unavailable(&p).contains("empty command"));
    }

    #[test]
    fn docker_writable_root_knob() {
        assert!(!argv(&plan()).iter().any(|x| x == "--read-only"), "writable by default");
        let a = DockerSandbox::default().with_read_only_root(true).with_pids_limit(77).run_argv(&plan()).unwrap();
        assert!(a.iter().any(|x| x == "--read-only"));
        assert!(a.iter().any(|x| x == "--pids-limit=77"));
        assert_eq!(a[0], "docker");
    }

    #[test]
    fn docker_container_names_are_sanitized() {
        assert_eq!(container_name("job-1_a.b"), "pacloud-job-1_a.b");
        let odd = container_name("app-misc/hello:2.12 $(x)\n");
        assert!(odd.starts_with("pacloud-app-misc_hello_2.12___x__-"), "{odd}");
        let ok = |n: &str| n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        assert!(ok(&odd));
        // Distinct ids that sanitize alike keep distinct names.
        assert_ne!(container_name("a/b"), container_name("a:b"));
        assert_ne!(container_name("a/b"), container_name("a_b"));
        let long = "x".repeat(500);
        assert!(container_name(&long).len() < 130);
        assert_ne!(container_name(&long), container_name(&"x".repeat(501)));
        assert!(ok(&container_name("")) && ok(&container_name("ü")));
        // The raw job id is still on the label.
        let mut p = plan();
        p.job_id = "a/b c".into();
        let a = argv(&p);
        assert!(a.iter().any(|x| x == "--label=pacloud.job=a/b c"));
        assert!(a.iter().any(|x| *x == format!("--name={}", container_name("a/b c"))));
    }

    /// A real container on the stand-in builder image (scripts/test.sh
    /// builds it; PACLOUD_BUILDER_IMAGE names it, else the newest local image
    /// labelled `org.pacloud.builder=standin`). Fails, never skips, when no
    /// engine answers or no such image exists.
    #[tokio::test]
    async fn docker_runs_a_real_container() {
        let docker = DockerSandbox::default();
        if let Err(e) = docker.available().await {
            panic!("this test needs a Docker engine and none answers: {e}");
        }
        let image = standin_image().await;
        let pre = docker.preflight(&image).await.expect("the stand-in image passes the preflight");
        assert!(pre.portage.starts_with("Portage 3.0.83"), "{pre:?}");
        assert!(pre.image_id.starts_with("sha256:"), "{pre:?}");
        assert!(docker.cleanup_stale().await.is_ok());

        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("w");
        let repo = dir.path().join("repo");
        for d in ["config", "root", "pkgdir", "tmp", "distfiles", "logs"] {
            std::fs::create_dir_all(work.join(d)).unwrap();
        }
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("marker"), "repo").unwrap();
        let mut p = BuildPlan {
            job_id: format!("test/{}", std::process::id()),
            work_dir: work.clone(),
            repos: vec![("r".into(), repo.clone())],
            portage: PortageInstall::System,
            env: vec![("PATH".into(), "/usr/bin:/bin".into()), ("FOO".into(), "bar baz".into())],
            argv: vec![],
            network: false,
            limits: Limits { wall_clock: Duration::from_secs(120), memory_bytes: Some(256 << 20) },
            image: Some(image),
            run_as: None,
            build_root: None,
        };
        let pkgdir = p.pkgdir().display().to_string();
        let script = format!(
            r#"echo "to-log FOO=$FOO"; echo "$FOO" > {pkgdir}/out; cat {repo}/marker;
               touch /pacloud-unit-escape 2>/dev/null && echo root-layer-writable;
               touch {cfg}/x 2>/dev/null && echo CONFIG-WRITABLE;
               touch {repo}/x 2>/dev/null && echo REPO-WRITABLE;
               ls /sys/class/net; exit 3"#,
            repo = repo.display(),
            cfg = p.config_root().display(),
        );
        p.argv = vec!["sh".into(), "-c".into(), script];
        let out = docker.run(&p, CancellationToken::new()).await.expect("docker run");
        let log = std::fs::read_to_string(&out.log).unwrap();
        assert_eq!(out.exit_code, Some(3), "{log}");
        assert!(!out.timed_out);
        assert!(log.contains("to-log FOO=bar baz") && log.contains("repo"), "{log}");
        assert_eq!(std::fs::read_to_string(work.join("pkgdir/out")).unwrap(), "bar baz\n");
        assert!(!log.contains("WRITABLE"), "{log}");
        // The root is the container's own layer: writable inside, gone after.
        assert!(log.contains("root-layer-writable"), "{log}");
        assert!(!Path::new("/pacloud-unit-escape").exists(), "the container wrote to the host's /");
        assert!(!log.contains("eth0"), "network none: only lo\n{log}");

        // The wall clock: killed, classed timed out, container gone.
        p.job_id = format!("test-timeout-{}", std::process::id());
        p.limits.wall_clock = Duration::from_secs(2);
        p.argv = vec!["sleep".into(), "60".into()];
        let out = docker.run(&p, CancellationToken::new()).await.expect("docker run");
        assert!(out.timed_out && out.duration < Duration::from_secs(40), "{out:?}");
        assert!(!container_exists(&docker, &container_name(&p.job_id)).await);

        // Cancellation.
        p.job_id = format!("test-cancel-{}", std::process::id());
        p.limits.wall_clock = Duration::from_secs(120);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            c.cancel();
        });
        assert!(matches!(docker.run(&p, cancel).await, Err(SandboxError::Cancelled)));
        assert!(!container_exists(&docker, &container_name(&p.job_id)).await);
    }

    async fn container_exists(docker: &DockerSandbox, name: &str) -> bool {
        let filter = format!("name=^{name}$");
        let out = run_checked(&docker.cli(&["ps", "-aq", "--filter", &filter])).await.unwrap();
        !out.stdout.trim().is_empty()
    }

    async fn standin_image() -> String {
        if let Some(image) = std::env::var("PACLOUD_BUILDER_IMAGE").ok().filter(|i| !i.is_empty()) {
            return image;
        }
        let argv = DockerSandbox::default().cli(&[
            "image",
            "ls",
            "-q",
            "--no-trunc",
            "--filter",
            "label=org.pacloud.builder=standin",
        ]);
        let out = run_checked(&argv).await.expect("docker image ls");
        out.stdout.lines().next().map(str::to_owned).unwrap_or_else(|| {
            panic!("no stand-in builder image: run scripts/builder-image.sh (or set PACLOUD_BUILDER_IMAGE)")
        })
    }
}
