//! Layered, typed settings for `pacloud serve`: built-in defaults, then a
//! TOML file, then `PACLOUD_*` environment variables, then command-line
//! flags. With nothing given it starts on 127.0.0.1:8080 with its data in
//! the user's data directory.

use pacloud_domain::target::{TargetError, TargetSpec};
use pacloud_domain::{Target, TargetName, TargetSet};
use pacloud_worker::sandbox::docker::NetworkMode;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("environment variable {name}={value:?} is not valid: {expected}")]
    Env { name: String, value: String, expected: &'static str },
    #[error("target {name:?} in the config: bad name")]
    TargetName {
        name: String,
        #[source]
        source: pacloud_domain::grammar::GrammarError,
    },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("target {target:?}: build_root is not usable")]
    BuildRoot {
        target: String,
        #[source]
        source: pacloud_worker::buildroot::BuildRootError,
    },
    #[error("config file: build.{key} = {value:?} is not valid: {expected}")]
    Build { key: &'static str, value: String, expected: &'static str },
}

/// The config file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub public_url: Option<String>,
    pub tokens: Option<Vec<String>>,
    pub url_ttl_secs: Option<u64>,
    pub requeue_after_secs: Option<u64>,
    pub poll_after_secs: Option<u64>,
    pub max_receives: Option<u32>,
    /// The binhost signing key (armored OpenPGP secret key); default
    /// `<data_dir>/binhost-signing-key.asc`, generated on first start.
    pub binhost_key: Option<PathBuf>,
    /// Sign published packages (GLEP 78); default true.
    pub sign_packages: Option<bool>,
    pub default_target: Option<String>,
    #[serde(default)]
    pub targets: BTreeMap<String, TargetSpec>,
    /// Ebuild repositories by name: `pacloud-fixtures = "/path/to/repo"`.
    #[serde(default)]
    pub repositories: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub build: BuildFileSettings,
    #[serde(default)]
    pub aws: AwsFileSettings,
}

/// The `[aws]` table: where `pacloud worker --backend aws` finds its queue,
/// table and bucket (also `PACLOUD_AWS_*`; credentials and region come from
/// the standard AWS chain unless set here).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsFileSettings {
    pub table: Option<String>,
    pub queue_url: Option<String>,
    pub dlq_url: Option<String>,
    pub bucket: Option<String>,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    /// The instance metadata service (spot interruption notices).
    pub imds_endpoint: Option<String>,
    /// The KMS key (id, ARN or alias) that signs binhost packages
    /// (`PACLOUD_AWS_SIGNING_KEY_ID`); docs/aws.md.
    pub signing_key_id: Option<String>,
    pub spot_poll_ms: Option<u64>,
    /// The fleet scaler's events queue (`PACLOUD_AWS_SCALER_EVENTS_URL`): the
    /// worker nudges the scaler there when idle past the idle timeout
    /// (docs/fleet.md); unset, the scaler's schedule alone finds it.
    pub scaler_events_url: Option<String>,
}

/// The `[build]` table: how `serve` (and `worker`) build packages.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildFileSettings {
    pub workers: Option<usize>,
    pub backend: Option<String>,
    pub portage_venv: Option<PathBuf>,
    pub wall_clock_secs: Option<u64>,
    pub memory_mb: Option<u64>,
    pub network: Option<bool>,
    pub lease_secs: Option<u64>,
    pub failure_ttl_secs: Option<u64>,
    pub retry_backoff_secs: Option<u64>,
    pub unprivileged: Option<String>,
    pub image: Option<String>,
    pub shutdown_grace_secs: Option<u64>,
    /// Source mirrors the fetch step tries first (GENTOO_MIRRORS).
    pub mirrors: Option<Vec<String>>,
    /// Distfiles unused for this long are pruned from the cache.
    pub distfiles_max_age_secs: Option<u64>,
    /// The distfiles cache is pruned to this total (MiB).
    pub distfiles_max_mb: Option<u64>,
    /// The worker-local binary package cache (MiB; 0 turns it off).
    pub package_cache_mb: Option<u64>,
    /// Docker backend: the network of containers that have network (the
    /// fetch step; builds with `network = true`): "bridge" or "host".
    pub docker_network: Option<String>,
    /// Kept ROOTs of finished builds reused by later builds (0 turns it off).
    pub dependency_roots: Option<usize>,
    /// Their total size at most (MiB).
    pub dependency_roots_max_mb: Option<u64>,
}

/// Which sandbox builds run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// bwrap when bubblewrap and portage are present, else none.
    Auto,
    Bwrap,
    Docker,
    /// No builds in this process (requests stay queued for other workers).
    None,
}

/// Whether builds drop to uid/gid 65534.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unprivileged {
    /// When everything a build reads is readable by nobody.
    Auto,
    Always,
    Never,
}

/// Resolved `[build]` settings.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub workers: usize,
    pub backend: BackendChoice,
    pub portage_venv: Option<PathBuf>,
    pub repositories: BTreeMap<String, PathBuf>,
    pub wall_clock: Duration,
    pub memory_bytes: Option<u64>,
    pub network: bool,
    pub lease: Duration,
    pub failure_ttl: Duration,
    pub retry_backoff: Duration,
    pub unprivileged: Unprivileged,
    pub image: Option<String>,
    pub shutdown_grace: Duration,
    pub poll_wait: Duration,
    pub mirrors: Vec<String>,
    pub distfiles_max_age: Duration,
    pub distfiles_max_bytes: u64,
    /// `None`: the backend's default (off locally, 10 GiB on AWS workers).
    pub package_cache_bytes: Option<u64>,
    /// Docker backend: the network of containers whose step has network
    /// (default bridge; host reaches a mirror on the host's loopback and is
    /// refused on AWS workers, where the IMDS rule would not apply).
    pub docker_network: NetworkMode,
    /// How many finished builds' ROOTs a worker keeps for later builds to
    /// start from (0: every build merges its dependencies into an empty ROOT).
    pub dependency_roots: usize,
    /// Their total size at most (the least recently used go first).
    pub dependency_roots_max_bytes: u64,
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            workers: 1,
            backend: BackendChoice::Auto,
            portage_venv: None,
            repositories: BTreeMap::new(),
            wall_clock: Duration::from_secs(6 * 3600),
            memory_bytes: None,
            network: false,
            lease: Duration::from_secs(60),
            failure_ttl: Duration::from_secs(3600),
            retry_backoff: Duration::from_secs(10),
            unprivileged: Unprivileged::Auto,
            image: None,
            shutdown_grace: Duration::from_secs(30),
            poll_wait: Duration::from_secs(2),
            mirrors: Vec::new(),
            distfiles_max_age: Duration::from_secs(30 * 24 * 3600),
            distfiles_max_bytes: 20 << 30,
            package_cache_bytes: None,
            docker_network: NetworkMode::Bridge,
            dependency_roots: 8,
            dependency_roots_max_bytes: 10 << 30,
        }
    }
}

fn backend_choice(v: &str) -> Option<BackendChoice> {
    match v {
        "auto" => Some(BackendChoice::Auto),
        "bwrap" => Some(BackendChoice::Bwrap),
        "docker" => Some(BackendChoice::Docker),
        "none" => Some(BackendChoice::None),
        _ => None,
    }
}

/// What `build.image` must look like (docker backend): pinned by digest.
const IMAGE_EXPECTED: &str = "an image pinned by digest: name@sha256:<64 hex>, or a local image ID sha256:<64 hex>";

/// `build.image` is pinned ([`ImageRef`](pacloud_worker::sandbox::docker::ImageRef));
/// a tag that can move is refused here, at startup.
fn checked_image(v: String) -> Result<String, (String, &'static str)> {
    match v.parse::<pacloud_worker::sandbox::docker::ImageRef>() {
        Ok(_) => Ok(v),
        Err(_) => Err((v, IMAGE_EXPECTED)),
    }
}

fn unprivileged_choice(v: &str) -> Option<Unprivileged> {
    match v {
        "auto" => Some(Unprivileged::Auto),
        "true" | "yes" | "always" => Some(Unprivileged::Always),
        "false" | "no" | "never" => Some(Unprivileged::Never),
        _ => None,
    }
}

/// Settings of the local server, fully resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Base of the URLs handed to clients; defaults to `http://<listen>`.
    pub public_url: Option<String>,
    pub tokens: Vec<String>,
    pub url_ttl: Duration,
    pub requeue_after: Duration,
    pub poll_after: Duration,
    pub max_receives: u32,
    /// A configured binhost signing key file (else the data directory's).
    pub binhost_key: Option<PathBuf>,
    /// Whether published packages are signed (GLEP 78).
    pub sign_packages: bool,
    pub targets: TargetSet,
    pub build: BuildSettings,
    pub aws: AwsFileSettings,
}

/// Where data lives when nothing says otherwise.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("pacloud");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".local/share/pacloud");
    }
    PathBuf::from("pacloud-data")
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: default_data_dir(),
            public_url: None,
            tokens: Vec::new(),
            url_ttl: Duration::from_secs(15 * 60),
            requeue_after: Duration::from_secs(15 * 60),
            poll_after: Duration::from_secs(5),
            max_receives: 5,
            binhost_key: None,
            sign_packages: true,
            targets: TargetSet::builtin(),
            build: BuildSettings::default(),
            aws: AwsFileSettings::default(),
        }
    }
}

impl Settings {
    /// The binhost signing key file in use (configured, or in the data
    /// directory).
    pub fn binhost_key_path(&self) -> PathBuf {
        self.binhost_key.clone().unwrap_or_else(|| self.data_dir.join("binhost-signing-key.asc"))
    }

    /// Defaults, overlaid by `file` (if given) and then by `env`
    /// (a lookup such as `|k| std::env::var(k).ok()`).
    pub fn load(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let mut s = Settings::default();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|source| SettingsError::Read { path: path.into(), source })?;
            let f: FileSettings =
                toml::from_str(&text).map_err(|e| SettingsError::Parse { path: path.into(), source: Box::new(e) })?;
            s.apply_file(f)?;
        }
        s.apply_env(env)?;
        Ok(s)
    }

    fn apply_file(&mut self, f: FileSettings) -> Result<(), SettingsError> {
        if let Some(v) = f.listen {
            self.listen = v;
        }
        if let Some(v) = f.data_dir {
            self.data_dir = v;
        }
        if f.public_url.is_some() {
            self.public_url = f.public_url;
        }
        if let Some(v) = f.tokens {
            self.tokens = v;
        }
        if let Some(v) = f.url_ttl_secs {
            self.url_ttl = Duration::from_secs(v);
        }
        if let Some(v) = f.requeue_after_secs {
            self.requeue_after = Duration::from_secs(v);
        }
        if let Some(v) = f.poll_after_secs {
            self.poll_after = Duration::from_secs(v);
        }
        if let Some(v) = f.max_receives {
            self.max_receives = v;
        }
        if f.binhost_key.is_some() {
            self.binhost_key = f.binhost_key;
        }
        if let Some(v) = f.sign_packages {
            self.sign_packages = v;
        }
        self.aws = f.aws;
        let b = &mut self.build;
        b.repositories.extend(f.repositories);
        let fb = f.build;
        if let Some(v) = fb.workers {
            b.workers = v;
        }
        if let Some(v) = fb.backend {
            b.backend = backend_choice(&v).ok_or(SettingsError::Build {
                key: "backend",
                value: v,
                expected: "auto, bwrap, docker or none",
            })?;
        }
        if fb.portage_venv.is_some() {
            b.portage_venv = fb.portage_venv;
        }
        if let Some(v) = fb.wall_clock_secs {
            b.wall_clock = Duration::from_secs(v);
        }
        if let Some(v) = fb.memory_mb {
            b.memory_bytes = (v > 0).then_some(v << 20);
        }
        if let Some(v) = fb.network {
            b.network = v;
        }
        if let Some(v) = fb.lease_secs {
            b.lease = Duration::from_secs(v.max(3));
        }
        if let Some(v) = fb.failure_ttl_secs {
            b.failure_ttl = Duration::from_secs(v);
        }
        if let Some(v) = fb.retry_backoff_secs {
            b.retry_backoff = Duration::from_secs(v);
        }
        if let Some(v) = fb.unprivileged {
            b.unprivileged = unprivileged_choice(&v).ok_or(SettingsError::Build {
                key: "unprivileged",
                value: v,
                expected: "auto, true or false",
            })?;
        }
        if let Some(v) = fb.image {
            b.image = Some(checked_image(v).map_err(|(value, expected)| SettingsError::Build {
                key: "image",
                value,
                expected,
            })?);
        }
        if let Some(v) = fb.shutdown_grace_secs {
            b.shutdown_grace = Duration::from_secs(v);
        }
        if let Some(v) = fb.mirrors {
            if let Some(bad) = v
                .iter()
                .find(|m| !(m.starts_with("http://") || m.starts_with("https://")) || m.contains(char::is_whitespace))
            {
                return Err(SettingsError::Build {
                    key: "mirrors",
                    value: bad.clone(),
                    expected: "http:// or https:// URLs",
                });
            }
            b.mirrors = v;
        }
        if let Some(v) = fb.distfiles_max_age_secs {
            b.distfiles_max_age = Duration::from_secs(v);
        }
        if let Some(v) = fb.distfiles_max_mb {
            b.distfiles_max_bytes = v << 20;
        }
        if let Some(v) = fb.dependency_roots {
            b.dependency_roots = v;
        }
        if let Some(v) = fb.dependency_roots_max_mb {
            b.dependency_roots_max_bytes = v << 20;
        }
        if let Some(v) = fb.package_cache_mb {
            b.package_cache_bytes = Some(v << 20);
        }
        if let Some(v) = fb.docker_network {
            b.docker_network = match v.as_str() {
                "bridge" => NetworkMode::Bridge,
                "host" => NetworkMode::Host,
                _ => return Err(SettingsError::Build { key: "docker_network", value: v, expected: "bridge or host" }),
            };
        }
        if !f.targets.is_empty() || f.default_target.is_some() {
            let mut targets: Vec<Target> = TargetSet::builtin().iter().cloned().collect();
            for (name, mut spec) in f.targets {
                let tn: TargetName =
                    name.parse().map_err(|source| SettingsError::TargetName { name: name.clone(), source })?;
                if let Some(root) = &mut spec.build_root {
                    // The contents of the preparation's inputs enter the hash.
                    root.digest = pacloud_worker::buildroot::digest(root)
                        .map_err(|source| SettingsError::BuildRoot { target: name.clone(), source })?;
                }
                targets.retain(|t| t.name != tn);
                targets.push(Target::new(tn, spec)?);
            }
            let default = f.default_target.unwrap_or_else(|| "default".into());
            let dn: TargetName =
                default.parse().map_err(|source| SettingsError::TargetName { name: default.clone(), source })?;
            self.targets = TargetSet::new(dn, targets)?;
        }
        Ok(())
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
        let bad =
            |name: &str, value: &str, expected| SettingsError::Env { name: name.into(), value: value.into(), expected };
        let secs = |name: &str| -> Result<Option<Duration>, SettingsError> {
            env(name)
                .map(|v| {
                    v.parse::<u64>().map(Duration::from_secs).map_err(|_| bad(name, &v, "a whole number of seconds"))
                })
                .transpose()
        };
        if let Some(v) = env("PACLOUD_LISTEN") {
            self.listen = v.parse().map_err(|_| bad("PACLOUD_LISTEN", &v, "an address such as 127.0.0.1:8080"))?;
        }
        if let Some(v) = env("PACLOUD_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = env("PACLOUD_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = env("PACLOUD_BINHOST_KEY") {
            self.binhost_key = Some(v.into());
        }
        if let Some(v) = env("PACLOUD_SIGN_PACKAGES") {
            self.sign_packages = match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => return Err(bad("PACLOUD_SIGN_PACKAGES", &v, "true or false")),
            };
        }
        if let Some(v) = env("PACLOUD_TOKENS") {
            self.tokens = v.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect();
        }
        if let Some(d) = secs("PACLOUD_URL_TTL_SECS")? {
            self.url_ttl = d;
        }
        if let Some(d) = secs("PACLOUD_REQUEUE_AFTER_SECS")? {
            self.requeue_after = d;
        }
        if let Some(d) = secs("PACLOUD_POLL_AFTER_SECS")? {
            self.poll_after = d;
        }
        if let Some(v) = env("PACLOUD_WORKERS") {
            self.build.workers = v.parse().map_err(|_| bad("PACLOUD_WORKERS", &v, "a whole number"))?;
        }
        if let Some(v) = env("PACLOUD_DEPENDENCY_ROOTS") {
            self.build.dependency_roots =
                v.parse().map_err(|_| bad("PACLOUD_DEPENDENCY_ROOTS", &v, "a whole number (0 turns it off)"))?;
        }
        if let Some(v) = env("PACLOUD_BUILD_BACKEND") {
            self.build.backend =
                backend_choice(&v).ok_or_else(|| bad("PACLOUD_BUILD_BACKEND", &v, "auto, bwrap, docker or none"))?;
        }
        if let Some(v) = env("PACLOUD_BUILD_IMAGE") {
            self.build.image =
                Some(checked_image(v).map_err(|(value, expected)| bad("PACLOUD_BUILD_IMAGE", &value, expected))?);
        }
        if let Some(v) = env("PACLOUD_PORTAGE_VENV") {
            self.build.portage_venv = Some(v.into());
        }
        if let Some(v) = env("PACLOUD_REPOSITORIES") {
            for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let (name, path) =
                    item.split_once('=').ok_or_else(|| bad("PACLOUD_REPOSITORIES", &v, "name=path[,name=path...]"))?;
                self.build.repositories.insert(name.to_owned(), path.into());
            }
        }
        for (name, slot) in [
            ("PACLOUD_AWS_TABLE", &mut self.aws.table),
            ("PACLOUD_AWS_QUEUE_URL", &mut self.aws.queue_url),
            ("PACLOUD_AWS_DLQ_URL", &mut self.aws.dlq_url),
            ("PACLOUD_AWS_BUCKET", &mut self.aws.bucket),
            ("PACLOUD_AWS_ENDPOINT_URL", &mut self.aws.endpoint_url),
            ("PACLOUD_AWS_REGION", &mut self.aws.region),
            ("PACLOUD_IMDS_ENDPOINT", &mut self.aws.imds_endpoint),
            ("PACLOUD_AWS_SIGNING_KEY_ID", &mut self.aws.signing_key_id),
            ("PACLOUD_AWS_SCALER_EVENTS_URL", &mut self.aws.scaler_events_url),
        ] {
            if let Some(v) = env(name) {
                *slot = Some(v);
            }
        }
        if let Some(v) = env("PACLOUD_AWS_FORCE_PATH_STYLE") {
            self.aws.force_path_style = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Some(v) = env("PACLOUD_SPOT_POLL_MS") {
            self.aws.spot_poll_ms = Some(v.parse().map_err(|_| bad("PACLOUD_SPOT_POLL_MS", &v, "milliseconds"))?);
        }
        if let Some(v) = env("PACLOUD_MAX_RECEIVES") {
            self.max_receives = v.parse().map_err(|_| bad("PACLOUD_MAX_RECEIVES", &v, "a whole number"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn layers_defaults_file_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pacloud.toml");
        std::fs::write(
            &file,
            r#"
listen = "127.0.0.1:9000"
tokens = ["a"]
url_ttl_secs = 60
default_target = "fixtures"
[targets.fixtures]
profile = "default"
chost = "x86_64-pc-linux-gnu"
cflags = "-O2"
repository = "pacloud-fixtures"
snapshot = "1"
builder = "host"
"#,
        )
        .unwrap();
        let env: HashMap<&str, &str> =
            HashMap::from([("PACLOUD_LISTEN", "127.0.0.1:9001"), ("PACLOUD_TOKENS", "x, y")]);
        let s = Settings::load(Some(&file), |k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(s.listen.port(), 9001, "env beats file");
        assert_eq!(s.tokens, vec!["x", "y"]);
        assert_eq!(s.url_ttl, Duration::from_secs(60), "file beats default");
        assert_eq!(s.targets.default_name().as_str(), "fixtures");
        assert!(s.targets.get(&"default".parse().unwrap()).is_some(), "built-in target kept");
    }

    #[test]
    fn the_builder_image_must_be_pinned() {
        let id = format!("sha256:{}", "ab".repeat(32));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pacloud.toml");
        for good in [id.clone(), format!("gentoo/stage3@{id}")] {
            std::fs::write(&file, format!("[build]\nbackend = \"docker\"\nimage = \"{good}\"\n")).unwrap();
            let s = Settings::load(Some(&file), |_| None).unwrap();
            assert_eq!((s.build.backend, s.build.image), (BackendChoice::Docker, Some(good)));
        }
        for bad in ["gentoo/stage3:latest", "pacloud-builder-standin:0123", "sha256:abc"] {
            std::fs::write(&file, format!("[build]\nimage = \"{bad}\"\n")).unwrap();
            let e = Settings::load(Some(&file), |_| None).unwrap_err();
            assert!(matches!(&e, SettingsError::Build { key: "image", .. }), "{bad}: {e}");
            assert!(e.to_string().contains(bad) && e.to_string().contains("pinned by digest"), "{e}");
            let e = Settings::load(None, |k| (k == "PACLOUD_BUILD_IMAGE").then(|| bad.to_string())).unwrap_err();
            assert!(e.to_string().contains("PACLOUD_BUILD_IMAGE"), "{e}");
        }
        let s = Settings::load(None, |k| (k == "PACLOUD_BUILD_IMAGE").then(|| id.clone())).unwrap();
        assert_eq!(s.build.image, Some(id));
    }

    #[test]
    fn docker_network_is_bridge_unless_host_is_asked_for() {
        assert_eq!(Settings::load(None, |_| None).unwrap().build.docker_network, NetworkMode::Bridge);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pacloud.toml");
        std::fs::write(&file, "[build]\ndocker_network = \"host\"\n").unwrap();
        assert_eq!(Settings::load(Some(&file), |_| None).unwrap().build.docker_network, NetworkMode::Host);
        std::fs::write(&file, "[build]\ndocker_network = \"none\"\n").unwrap();
        let e = Settings::load(Some(&file), |_| None).unwrap_err();
        assert!(matches!(&e, SettingsError::Build { key: "docker_network", .. }), "{e}");
        assert!(e.to_string().contains("bridge or host"), "{e}");
    }

    #[test]
    fn dependency_roots_from_file_and_environment() {
        let d = Settings::load(None, |_| None).unwrap().build;
        assert_eq!((d.dependency_roots, d.dependency_roots_max_bytes), (8, 10 << 30));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pacloud.toml");
        std::fs::write(&file, "[build]\ndependency_roots = 2\ndependency_roots_max_mb = 100\n").unwrap();
        let b = Settings::load(Some(&file), |_| None).unwrap().build;
        assert_eq!((b.dependency_roots, b.dependency_roots_max_bytes), (2, 100 << 20));
        let off = Settings::load(Some(&file), |k| (k == "PACLOUD_DEPENDENCY_ROOTS").then(|| "0".into())).unwrap();
        assert_eq!(off.build.dependency_roots, 0);
        let e = Settings::load(None, |k| (k == "PACLOUD_DEPENDENCY_ROOTS").then(|| "many".into())).unwrap_err();
        assert!(e.to_string().contains("PACLOUD_DEPENDENCY_ROOTS") && e.to_string().contains("many"), "{e}");
    }

    #[test]
    fn errors_name_the_culprit() {
        let e = Settings::load(None, |k| (k == "PACLOUD_URL_TTL_SECS").then(|| "soon".to_string())).unwrap_err();
        assert!(e.to_string().contains("PACLOUD_URL_TTL_SECS"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "lisen = 1\n").unwrap();
        assert!(matches!(Settings::load(Some(&file), |_| None), Err(SettingsError::Parse { .. })));
        std::fs::write(&file, "default_target = \"nope\"\n").unwrap();
        assert!(matches!(Settings::load(Some(&file), |_| None), Err(SettingsError::Target(_))));
    }
}
