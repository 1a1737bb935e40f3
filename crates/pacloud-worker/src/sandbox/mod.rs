//! The sandbox trait: one build plan in, an exit status, a log and a
//! filled PKGDIR out. Backends: [`bwrap`] (bubblewrap, tested for real) and
//! [`docker`] (the production default on the worker AMI).

pub mod bwrap;
pub mod docker;

use async_trait::async_trait;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where portage comes from inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortageInstall {
    /// A Python venv with portage from PyPI (local mode on Debian); its
    /// path is the same inside and outside the sandbox.
    Venv(PathBuf),
    /// The image's own portage (a Gentoo stage3): `emerge` on PATH.
    System,
}

/// Resource limits of one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The build is killed after this long and classed `timeout`.
    pub wall_clock: Duration,
    /// Address-space / memory limit in bytes, where the backend can apply it.
    pub memory_bytes: Option<u64>,
}

/// Everything a backend needs to run one build; backend-independent.
///
/// The work directory `work_dir` (on the host) holds `config/` (the
/// PORTAGE_CONFIGROOT, read-only in the sandbox), `hostconf/make.conf`, and
/// the writable `root/`, `pkgdir/`, `tmp/`, `distfiles/` and `logs/`. Paths
/// inside the sandbox are the same as on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// A label unique to this build attempt (containers are labelled with it).
    pub job_id: String,
    pub work_dir: PathBuf,
    /// Ebuild repositories, mounted read-only at their host paths.
    pub repos: Vec<(String, PathBuf)>,
    pub portage: PortageInstall,
    /// The whole environment of the build (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// The command, e.g. `emerge --buildpkg ...`; argv, never a shell line.
    pub argv: Vec<String>,
    /// Whether the build may reach the network (fetching sources).
    pub network: bool,
    pub limits: Limits,
    /// The builder image, pinned by digest (docker backend).
    pub image: Option<String>,
    /// Run the build as this uid/gid (unprivileged) where the backend can.
    pub run_as: Option<(u32, u32)>,
    /// A real-tree target's prepared build root (see [`crate::buildroot`]),
    /// laid over the venv prefix by the bwrap backend; `None` for a toy
    /// target or where the image carries it.
    pub build_root: Option<PathBuf>,
}

impl BuildPlan {
    pub fn config_root(&self) -> PathBuf {
        self.work_dir.join("config")
    }
    pub fn pkgdir(&self) -> PathBuf {
        self.work_dir.join("pkgdir")
    }
    /// The writable directories of a build (with a venv portage also the
    /// throw-away `hostpkgdir` and `hosttmp` of its host configuration).
    pub fn writable_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec!["root", "pkgdir", "tmp", "distfiles", "logs"];
        if matches!(self.portage, PortageInstall::Venv(_)) {
            dirs.extend(["hostpkgdir", "hosttmp"]);
        }
        dirs.into_iter().map(|d| self.work_dir.join(d)).collect()
    }
    /// Where the combined stdout/stderr of the build is written.
    pub fn log_path(&self) -> PathBuf {
        self.work_dir.join("build.log")
    }
}

/// How a sandboxed build ended.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxOutcome {
    /// The build command's exit code (None if killed by a signal).
    pub exit_code: Option<i32>,
    /// The wall-clock limit ended it.
    pub timed_out: bool,
    pub duration: Duration,
    /// Combined stdout/stderr of the build.
    pub log: PathBuf,
}

impl SandboxOutcome {
    pub fn succeeded(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }

    /// How the command exited, for messages: its exit code or "a signal".
    pub fn status(&self) -> String {
        self.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "a signal".into())
    }
}

/// A failure of the sandbox itself (never of the package): retried as an
/// infrastructure failure.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox I/O failed at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the build was cancelled")]
    Cancelled,
    #[error("{0} failed")]
    Command(#[source] crate::runner::CommandError),
    #[error("the sandbox backend is unusable: {0}")]
    Unavailable(String),
}

/// A way to run a build plan in isolation.
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    /// Short name for logs and startup messages, e.g. `bwrap`.
    fn name(&self) -> &'static str;
    /// Runs the plan to completion, the wall-clock limit, or `cancel`
    /// (then the build is killed and [`SandboxError::Cancelled`] returned).
    async fn run(&self, plan: &BuildPlan, cancel: CancellationToken) -> Result<SandboxOutcome, SandboxError>;
}
