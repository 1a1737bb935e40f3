//! First run: what `pacloud serve` does on a fresh machine so that it can
//! build without any configuration.
//!
//! - **Repository and target.** Unconfigured (the built-in `default` target
//!   on the `gentoo` repository): on a Gentoo machine the host's tree
//!   (`/var/db/repos/gentoo`) and profile (`/etc/portage/make.profile`) are
//!   used; elsewhere the bundled demo repository (the project's fixture
//!   repository, compiled into the binary) is written to
//!   `<data>/demo-repo` and a `demo` target on it becomes the default.
//! - **Portage.** `build.portage_venv`, else `emerge` on PATH, else the venv
//!   `<data>/portage-venv`, created on first run with portage
//!   [`PORTAGE_PIN`] from the Python package index.
//! - **Tools.** bubblewrap and zstd must be installed; when one is missing
//!   the exact install command is printed, and startup fails if builds were
//!   asked for (`build.backend = "bwrap"`), else the server runs without
//!   builds.
//!
//! Every decision is reported as a startup line.

use std::path::{Path, PathBuf};

use crate::settings::{BackendChoice, Settings};
use pacloud_domain::target::TargetSpec;
use pacloud_domain::{Target, TargetSet};

/// The portage version installed into a first-run venv.
pub const PORTAGE_PIN: &str = "portage==3.0.83";

/// The bundled demo repository: `(relative path, contents)`.
pub const DEMO_REPO: &[(&str, &str)] = &[
    (
        "app-misc/chain-a/chain-a-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/chain-a/chain-a-1.0.ebuild"),
    ),
    (
        "app-misc/chain-b/chain-b-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/chain-b/chain-b-1.0.ebuild"),
    ),
    (
        "app-misc/chain-c/chain-c-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/chain-c/chain-c-1.0.ebuild"),
    ),
    (
        "app-misc/chain-d/chain-d-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/chain-d/chain-d-1.0.ebuild"),
    ),
    (
        "app-misc/chain-e/chain-e-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/chain-e/chain-e-1.0.ebuild"),
    ),
    ("app-misc/dies/dies-1.0.ebuild", include_str!("../../../tests/fixtures/repo/app-misc/dies/dies-1.0.ebuild")),
    (
        "app-misc/escape/escape-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/escape/escape-1.0.ebuild"),
    ),
    ("app-misc/fetches-src/Manifest", include_str!("../../../tests/fixtures/repo/app-misc/fetches-src/Manifest")),
    (
        "app-misc/fetches-src/fetches-src-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/fetches-src/fetches-src-1.0.ebuild"),
    ),
    (
        "app-misc/hello/hello-2.12-r1.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/hello/hello-2.12-r1.ebuild"),
    ),
    (
        "app-misc/leakcheck/leakcheck-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/leakcheck/leakcheck-1.0.ebuild"),
    ),
    ("app-misc/net/net-1.0.ebuild", include_str!("../../../tests/fixtures/repo/app-misc/net/net-1.0.ebuild")),
    ("app-misc/slow/slow-1.0.ebuild", include_str!("../../../tests/fixtures/repo/app-misc/slow/slow-1.0.ebuild")),
    ("app-misc/unlisted-src/Manifest", include_str!("../../../tests/fixtures/repo/app-misc/unlisted-src/Manifest")),
    (
        "app-misc/unlisted-src/unlisted-src-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/unlisted-src/unlisted-src-1.0.ebuild"),
    ),
    (
        "app-misc/uses-libfoo/uses-libfoo-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/app-misc/uses-libfoo/uses-libfoo-1.0.ebuild"),
    ),
    (
        "dev-libs/libfoo/libfoo-1.0.ebuild",
        include_str!("../../../tests/fixtures/repo/dev-libs/libfoo/libfoo-1.0.ebuild"),
    ),
    ("licenses/public-domain", include_str!("../../../tests/fixtures/repo/licenses/public-domain")),
    ("metadata/layout.conf", include_str!("../../../tests/fixtures/repo/metadata/layout.conf")),
    ("profiles/arch.list", include_str!("../../../tests/fixtures/repo/profiles/arch.list")),
    ("profiles/categories", include_str!("../../../tests/fixtures/repo/profiles/categories")),
    ("profiles/default/eapi", include_str!("../../../tests/fixtures/repo/profiles/default/eapi")),
    ("profiles/default/make.defaults", include_str!("../../../tests/fixtures/repo/profiles/default/make.defaults")),
    ("profiles/default/packages", include_str!("../../../tests/fixtures/repo/profiles/default/packages")),
    ("profiles/profiles.desc", include_str!("../../../tests/fixtures/repo/profiles/profiles.desc")),
    ("profiles/repo_name", include_str!("../../../tests/fixtures/repo/profiles/repo_name")),
];

/// Why the first-run setup cannot give this server builds.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{what} is missing; install it with: {command}")]
    Missing { what: String, command: String },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the portage venv {venv} failed ({step}): {detail}")]
    Venv { venv: PathBuf, step: &'static str, detail: String },
}

/// What the setup decided (startup lines) and whether builds can run.
#[derive(Debug, Default)]
pub struct Setup {
    pub notes: Vec<String>,
    /// A missing tool: builds cannot run (the error says how to fix it).
    pub missing: Option<SetupError>,
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Whether the targets are the built-in ones (no `[targets]` configured).
fn unconfigured(settings: &Settings) -> bool {
    let builtin = TargetSet::builtin();
    settings.targets.iter().count() == 1
        && settings.targets.default_name() == builtin.default_name()
        && settings.targets.iter().next().map(|t| t.hash()) == builtin.iter().next().map(|t| t.hash())
}

/// Writes the demo repository under `dir` (replacing older copies).
pub fn write_demo_repo(dir: &Path) -> Result<(), SetupError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SetupError::Io { path, source }
    };
    for (rel, text) in DEMO_REPO {
        let file = dir.join(rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&file, text).map_err(io(&file))?;
    }
    Ok(())
}

/// The host's profile relative to `<repo>/profiles`, on a Gentoo machine.
fn host_profile(repo: &Path) -> Option<String> {
    let link = std::fs::canonicalize("/etc/portage/make.profile").ok()?;
    let profiles = std::fs::canonicalize(repo.join("profiles")).ok()?;
    Some(link.strip_prefix(profiles).ok()?.to_string_lossy().into_owned())
}

/// Chooses the repository and target of an unconfigured server.
pub fn choose_repository(settings: &mut Settings) -> Result<Vec<String>, SetupError> {
    if !unconfigured(settings) || settings.build.repositories.contains_key("gentoo") {
        return Ok(Vec::new());
    }
    let gentoo = PathBuf::from("/var/db/repos/gentoo");
    if gentoo.join("profiles").is_dir() {
        let mut notes = vec![format!("Gentoo machine: building from the host's tree {}", gentoo.display())];
        if let Some(profile) = host_profile(&gentoo) {
            let mut spec = Target::builtin_default().spec;
            spec.profile = profile.clone();
            if let Ok(t) = Target::new("default".parse().map_err(|_| unreachable_name())?, spec)
                && let Ok(set) = TargetSet::new(t.name.clone(), [t])
            {
                settings.targets = set;
                notes.push(format!("target `default` uses the host's profile {profile}"));
            }
        }
        return Ok(notes);
    }
    let dir = settings.data_dir.join("demo-repo");
    write_demo_repo(&dir)?;
    settings.build.repositories.insert("pacloud-fixtures".into(), dir.clone());
    let spec = TargetSpec {
        profile: "default".into(),
        chost: "x86_64-pc-linux-gnu".into(),
        cflags: "-O2 -pipe".into(),
        cxxflags: "-O2 -pipe".into(),
        ldflags: "-Wl,-O1 -Wl,--as-needed".into(),
        repository: "pacloud-fixtures".into(),
        snapshot: "1".into(),
        builder: "host".into(),
        env: Default::default(),
        tree_index: false,
    };
    if let Ok(demo) = Target::new("demo".parse().map_err(|_| unreachable_name())?, spec) {
        let mut all: Vec<Target> = settings.targets.iter().cloned().collect();
        all.push(demo.clone());
        if let Ok(set) = TargetSet::new(demo.name.clone(), all) {
            settings.targets = set;
        }
    }
    Ok(vec![format!(
        "not a Gentoo machine: building the bundled demo repository {} (default target `demo`; e.g. app-misc/hello-2.12-r1)",
        dir.display()
    )])
}

fn unreachable_name() -> SetupError {
    SetupError::Missing { what: "a valid target name".into(), command: "none".into() }
}

/// Finds portage or creates the pinned venv under the data directory.
pub async fn ensure_portage(settings: &mut Settings) -> Result<Vec<String>, SetupError> {
    if settings.build.portage_venv.is_some() || on_path("emerge").is_some() {
        return Ok(Vec::new());
    }
    let venv = settings.data_dir.join("portage-venv");
    if venv.join("bin/emerge").is_file() {
        settings.build.portage_venv = Some(venv.clone());
        return Ok(vec![format!("portage from {}", venv.display())]);
    }
    let python = PathBuf::from("/usr/bin/python3");
    if !python.is_file() {
        return Err(SetupError::Missing {
            what: "python3 (for portage)".into(),
            command: "sudo apt-get install -y python3 python3-venv".into(),
        });
    }
    tracing::info!(venv = %venv.display(), "first run: installing {PORTAGE_PIN} into a venv (about a minute)");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let create = vec![s(&python), "-m".into(), "venv".into(), s(&venv)];
    pacloud_worker::runner::run_checked(&create).await.map_err(|e| {
        let _ = std::fs::remove_dir_all(&venv);
        SetupError::Venv {
            venv: venv.clone(),
            step: "python3 -m venv",
            detail: format!("{e}; on Debian/Ubuntu: sudo apt-get install -y python3-venv"),
        }
    })?;
    let install = vec![
        s(&venv.join("bin/python")),
        "-m".into(),
        "pip".into(),
        "install".into(),
        "--disable-pip-version-check".into(),
        "-q".into(),
        PORTAGE_PIN.into(),
    ];
    if let Err(e) = pacloud_worker::runner::run_checked(&install).await {
        let _ = std::fs::remove_dir_all(&venv);
        return Err(SetupError::Venv { venv, step: "pip install", detail: e.to_string() });
    }
    settings.build.portage_venv = Some(venv.clone());
    Ok(vec![format!("installed {PORTAGE_PIN} into {}", venv.display())])
}

/// The Debian packages builds need that are not installed.
pub fn missing_tools() -> Option<SetupError> {
    let missing: Vec<&str> = [("bwrap", "bubblewrap"), ("zstd", "zstd"), ("setpriv", "util-linux")]
        .into_iter()
        .filter(|(bin, _)| on_path(bin).is_none() && !Path::new("/usr/bin").join(bin).is_file())
        .map(|(_, pkg)| pkg)
        .collect();
    (!missing.is_empty()).then(|| SetupError::Missing {
        what: missing.join(", "),
        command: format!("sudo apt-get install -y {}", missing.join(" ")),
    })
}

/// The whole first-run setup of `serve` and `worker`. `Err` only when
/// builds were asked for (`build.backend = "bwrap"`) and cannot run.
pub async fn prepare(settings: &mut Settings) -> Result<Setup, SetupError> {
    let mut setup = Setup::default();
    if settings.build.workers == 0 || matches!(settings.build.backend, BackendChoice::None | BackendChoice::Docker) {
        return Ok(setup);
    }
    let asked = settings.build.backend == BackendChoice::Bwrap;
    setup.notes.extend(choose_repository(settings)?);
    if let Some(missing) = missing_tools() {
        if asked {
            return Err(missing);
        }
        setup.missing = Some(missing);
        return Ok(setup);
    }
    match ensure_portage(settings).await {
        Ok(notes) => setup.notes.extend(notes),
        Err(e) if asked => return Err(e),
        Err(e) => setup.missing = Some(e),
    }
    Ok(setup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_demo_repository_is_the_fixture_repository() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/repo");
        let mut on_disk = Vec::new();
        let mut stack = vec![repo.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    on_disk.push(e.path().strip_prefix(&repo).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut bundled: Vec<String> = DEMO_REPO.iter().map(|(p, _)| p.to_string()).collect();
        bundled.sort();
        assert_eq!(bundled, on_disk, "crates/pacloud/src/setup.rs DEMO_REPO must list every fixture file");
        let dir = tempfile::tempdir().unwrap();
        write_demo_repo(dir.path()).unwrap();
        for (rel, text) in DEMO_REPO {
            assert_eq!(std::fs::read_to_string(repo.join(rel)).unwrap(), *text, "{rel}");
            assert_eq!(std::fs::read_to_string(dir.path().join(rel)).unwrap(), *text);
        }
    }

    #[test]
    fn an_unconfigured_server_off_gentoo_gets_the_demo_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings { data_dir: dir.path().to_owned(), ..Settings::default() };
        let notes = choose_repository(&mut s).unwrap();
        if Path::new("/var/db/repos/gentoo/profiles").is_dir() {
            assert!(notes[0].contains("Gentoo machine"), "{notes:?}");
            return;
        }
        assert!(notes[0].contains("bundled demo repository"), "{notes:?}");
        assert_eq!(s.targets.default_name().as_str(), "demo");
        assert!(dir.path().join("demo-repo/app-misc/hello/hello-2.12-r1.ebuild").is_file());
        // A configured server is left alone.
        let mut again = s.clone();
        assert!(choose_repository(&mut again).unwrap().is_empty());
    }
}
