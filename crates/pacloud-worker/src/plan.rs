//! Build plans: turns a job and its target into a fresh work directory
//! (portage config root, make.conf, repos.conf, a `package.use` entry for
//! the requested atom only) and the `emerge` argv and environment.
//!
//! Verified recipe: tests/fixtures/VERIFIED.md. Requested USE goes into
//! `package.use` for `=<cpv>` only, so dependencies are built with their
//! defaults and stay reusable by every other request.

use pacloud_domain::ports::Job;
use pacloud_domain::target::Target;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fetch::DistfilesCache;
use crate::pkgcache::PackageCache;
use crate::sandbox::{BuildPlan, Limits, PortageInstall};

/// Where and how builds run on this worker.
#[derive(Debug, Clone)]
pub struct BuildEnv {
    /// Per-build work directories are created under it.
    pub work_root: PathBuf,
    pub portage: PortageInstall,
    /// Ebuild repositories by name (a target names one).
    pub repos: BTreeMap<String, PathBuf>,
    pub limits: Limits,
    /// Whether builds may use the network (to fetch sources).
    pub network: bool,
    /// Unprivileged uid/gid for builds, where the sandbox supports it.
    pub run_as: Option<(u32, u32)>,
    /// Builder image for the docker backend (pinned by digest).
    pub image: Option<String>,
    /// The shared distfiles cache, mounted read-only into both steps.
    pub distfiles: Option<DistfilesCache>,
    /// This worker's cache of binary packages fetched from the store.
    pub package_cache: PackageCache,
    /// Source mirrors tried first by the fetch step (`GENTOO_MIRRORS`).
    pub mirrors: Vec<String>,
    /// Kept ROOTs of finished builds, laid under later builds' ROOTs
    /// ([`crate::deproot`]); `None` turns reuse off.
    pub dep_roots: Option<crate::deproot::DepRoots>,
}

/// Why a plan could not be made (an infrastructure problem of this worker).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("target {target} uses repository {repo:?}, which this worker does not have")]
    UnknownRepository { target: String, repo: String },
    #[error("cannot prepare the build root of target {target}")]
    BuildRoot {
        target: String,
        #[source]
        source: crate::buildroot::BuildRootError,
    },
    #[error("cannot prepare the build directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PlanError + '_ {
    move |source| PlanError::Io { path: path.to_owned(), source }
}

/// A make.conf value in double quotes (also the tree-index generator's).
pub(crate) fn quote(v: &str) -> String {
    // make.conf values: targets only hold printable ASCII; escape what bash
    // treats specially inside double quotes.
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// FEATURES of every build (target and host config): portage's own
/// sandboxes off (the build runs in ours), no news or sync, multi-instance
/// binaries, seeded binaries checked by the worker rather than by gpg, and
/// no post-merge clean of a throw-away PORTAGE_TMPDIR (see [`make_conf`]).
pub const BUILD_FEATURES: &[&str] = &[
    "-sandbox",
    "-usersandbox",
    "-userpriv",
    "-userfetch",
    "-usersync",
    "-ipc-sandbox",
    "-network-sandbox",
    "-pid-sandbox",
    "-news",
    "-strict",
    "-merge-sync",
    "binpkg-multi-instance",
    "binpkg-ignore-signature",
    "noclean",
];

/// The make.conf of a build (`pkgdir`, `tmpdir` differ for the host config).
fn make_conf(
    w: &Path,
    target: &Target,
    pkgdir: &Path,
    tmpdir: &Path,
    user: (&str, &str),
    mirrors: &[String],
) -> String {
    // binpkg-ignore-signature: the packages seeded into PKGDIR come from our
    // own store, signed; the sandbox has no keyring to check them with.
    // noclean: skips the `clean` phase portage runs after merging each
    // package (one more bash ebuild.sh process per package, binary or built,
    // about a tenth of a binary dependency's install). It only removes that
    // package's PORTAGE_TMPDIR/portage/<cat>/<pf> (work, image, temp), and
    // the whole PORTAGE_TMPDIR of a build is discarded with its work
    // directory; the clean before each package's build or unpack still runs,
    // so nothing stale is ever reused. The cost: the build's scratch space
    // holds every merged package's build directory until the build ends,
    // not one at a time. Nothing in the packages produced changes.
    let mut lines = vec![
        format!("FEATURES={}", quote(&BUILD_FEATURES.join(" "))),
        format!("PORTAGE_USERNAME={}", quote(user.0)),
        format!("PORTAGE_GRPNAME={}", quote(user.1)),
        format!("PKGDIR={}", quote(&pkgdir.to_string_lossy())),
        format!("PORTAGE_TMPDIR={}", quote(&tmpdir.to_string_lossy())),
        format!("DISTDIR={}", quote(&w.join("distfiles").to_string_lossy())),
        format!("PORTAGE_LOGDIR={}", quote(&w.join("logs").to_string_lossy())),
        "BINPKG_FORMAT=\"gpkg\"".into(),
        "BINPKG_COMPRESS=\"zstd\"".into(),
        "ACCEPT_LICENSE=\"*\"".into(),
        "EMERGE_WARNING_DELAY=\"0\"".into(),
        "CLEAN_DELAY=\"0\"".into(),
        "NOCOLOR=\"true\"".into(),
        format!("CHOST={}", quote(&target.spec.chost)),
        format!("CFLAGS={}", quote(&target.spec.cflags)),
        format!("CXXFLAGS={}", quote(&target.spec.cxxflags)),
        format!("LDFLAGS={}", quote(&target.spec.ldflags)),
    ];
    for (k, v) in &target.spec.env {
        lines.push(format!("{k}={}", quote(v)));
    }
    // Always set: an unset GENTOO_MIRRORS means portage's built-in mirror.
    lines.push(format!("GENTOO_MIRRORS={}", quote(&mirrors.join(" "))));
    lines.join("\n") + "\n"
}

/// `bashrc` of a real-tree target's config root (sourced by every ebuild
/// phase): DEPEND is merged into SYSROOT (= ROOT, the build's scratch root),
/// which a host compiler does not search, so its headers and libraries are
/// added to the search paths (VERIFIED.md §6: without it app-arch/lzop's
/// configure finds no LZO headers). Nothing of it is recorded in the
/// binaries (no RPATH: `-rpath-link` only affects the link). A no-op where
/// SYSROOT is `/` (the bwrap backend's prepared build root).
pub const SYSROOT_BASHRC: &str = r#"# pacloud: DEPEND lives in SYSROOT (= ROOT), which the host compiler does not search.
# Once: every phase sources this again over the environment saved by the last.
if [[ -n ${ESYSROOT} && ${ESYSROOT} != / && " ${CPPFLAGS} " != *" -I${ESYSROOT%/}/usr/include "* ]]; then
	CPPFLAGS="${CPPFLAGS} -I${ESYSROOT%/}/usr/include"
	LDFLAGS="${LDFLAGS} -L${ESYSROOT%/}/usr/lib64 -Wl,-rpath-link,${ESYSROOT%/}/usr/lib64"
	export CPPFLAGS LDFLAGS
fi
"#;

/// Where under the work root prepared build roots are kept (one per
/// target digest and venv, shared by the worker's builds).
pub const BUILD_ROOTS_DIR: &str = ".buildroots";

/// The name under which the distfiles cache appears in [`BuildPlan::repos`]
/// (read-only mounts); it is not a portage repository.
pub const DISTFILES_MOUNT: &str = "distfiles-cache";

/// The fetch step of a build: the same work directory and configuration,
/// with the network on, `emerge --fetchonly --verbose` (downloads sources,
/// prints the merge list, builds nothing).
pub fn fetch_plan(build: &BuildPlan) -> BuildPlan {
    let mut plan = build.clone();
    plan.job_id = format!("{}-fetch", build.job_id);
    plan.network = true;
    // The options go just before the requested atom (the last argument):
    // the program part of the argv is one or two words (see `venv_emerge`).
    let mut argv: Vec<String> = build.argv.iter().filter(|a| *a != "--buildpkg").cloned().collect();
    let at = argv.len().saturating_sub(1);
    argv.splice(at..at, ["--fetchonly".to_owned(), "--verbose".to_owned()]);
    plan.argv = argv;
    plan
}

/// How a build runs the venv's emerge: `<venv>/bin/python
/// <venv>/lib/portage/bin/emerge`, the script the `<venv>/bin/emerge`
/// entry point would exec. That entry point imports `portage` (all of its
/// `__init__`) only to find the script and exec a second interpreter, which
/// imports it again: about 0.2 s of every build's fixed cost on the shared
/// 2-core machine. Same interpreter, same script, same arguments. A venv
/// without the script (not a pip-installed portage) keeps the entry point.
fn venv_emerge(venv: &Path) -> Vec<String> {
    let script = venv.join("lib/portage/bin/emerge");
    if script.is_file() {
        vec![venv.join("bin/python").to_string_lossy().into_owned(), script.to_string_lossy().into_owned()]
    } else {
        vec![venv.join("bin/emerge").to_string_lossy().into_owned()]
    }
}

/// Creates the work directory for one build attempt and returns its plan.
pub fn prepare(env: &BuildEnv, job: &Job, target: &Target, job_id: &str) -> Result<BuildPlan, PlanError> {
    let repo_name = &target.spec.repository;
    let repo = env
        .repos
        .get(repo_name)
        .ok_or_else(|| PlanError::UnknownRepository { target: target.name.to_string(), repo: repo_name.clone() })?;
    let w = env.work_root.join(job_id);
    let config = w.join("config/etc/portage");
    for d in [config.join("repos.conf"), w.join("hostconf")] {
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    for d in ["root", "pkgdir", "tmp", "distfiles", "logs"].map(|d| w.join(d)) {
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    let user = if env.run_as.is_some() { ("nobody", "nogroup") } else { ("root", "root") };
    let write = |path: PathBuf, text: String| std::fs::write(&path, text).map_err(io(&path));
    // The target's own mirrors first (not hashed), then the worker's.
    let mirrors: Vec<String> = target.spec.mirrors.iter().chain(&env.mirrors).cloned().collect();
    write(config.join("make.conf"), make_conf(&w, target, &w.join("pkgdir"), &w.join("tmp"), user, &mirrors))?;
    let profile = repo.join("profiles").join(&target.spec.profile);
    let link = config.join("make.profile");
    std::os::unix::fs::symlink(&profile, &link).map_err(io(&link))?;
    let repos_conf = format!("[DEFAULT]\nmain-repo = {repo_name}\n\n[{repo_name}]\nlocation = {}\n", repo.display());
    write(config.join("repos.conf").join(format!("{repo_name}.conf")), repos_conf.clone())?;
    let spec = &job.spec;
    if !spec.use_flags.is_empty() {
        write(config.join("package.use"), format!("{} {}\n", spec.portage_atom(), spec.use_flags.portage()))?;
    }
    let mut build_root = None;
    let (emerge, path) = match &env.portage {
        PortageInstall::Venv(venv) => {
            // The "host" config portage builds for ROOT != / (see VERIFIED.md §1):
            // its packages go to a throw-away directory, never the published PKGDIR.
            let hostconf = make_conf(&w, target, &w.join("hostpkgdir"), &w.join("hosttmp"), user, &mirrors);
            write(w.join("hostconf/make.conf"), hostconf)?;
            for d in ["hostpkgdir", "hosttmp"].map(|d| w.join(d)) {
                std::fs::create_dir_all(&d).map_err(io(&d))?;
            }
            if let Some(spec) = &target.spec.build_root {
                // A real tree: the venv prefix is the build root (host config).
                let parent = env.work_root.join(BUILD_ROOTS_DIR);
                std::fs::create_dir_all(&parent).map_err(io(&parent))?;
                let dir = crate::buildroot::prepare(spec, venv, &parent)
                    .map_err(|source| PlanError::BuildRoot { target: target.name.to_string(), source })?;
                let profile = config.join("profile");
                std::fs::create_dir_all(&profile).map_err(io(&profile))?;
                let provided = dir.join("target-package.provided");
                let bytes = std::fs::read(&provided).map_err(io(&provided))?;
                write(profile.join("package.provided"), String::from_utf8_lossy(&bytes).into_owned())?;
                build_root = Some(dir);
            }
            (
                venv_emerge(venv),
                format!(
                    "{}:{}:/usr/sbin:/usr/bin:/sbin:/bin",
                    venv.join("bin").display(),
                    venv.join("usr/bin").display()
                ),
            )
        }
        PortageInstall::System => {
            // The builder image carries the host side of a real tree's build
            // root (worker-image/builder/standin/Dockerfile; a stage3 needs
            // none); the target root's package.provided is the build's own.
            if let Some(provided) = target.spec.build_root.as_ref().and_then(|b| b.package_provided_target.as_ref()) {
                let profile = config.join("profile");
                std::fs::create_dir_all(&profile).map_err(io(&profile))?;
                let bytes = std::fs::read(provided).map_err(io(provided))?;
                write(profile.join("package.provided"), String::from_utf8_lossy(&bytes).into_owned())?;
            }
            (vec!["emerge".to_owned()], "/usr/sbin:/usr/bin:/sbin:/bin".to_owned())
        }
    };
    if target.spec.build_root.is_some() {
        write(config.join("bashrc"), SYSROOT_BASHRC.to_owned())?;
    }
    let root = w.join("root").to_string_lossy().into_owned();
    let env_vars = vec![
        ("PATH".to_owned(), path),
        ("HOME".to_owned(), "/tmp".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("PORTAGE_CONFIGROOT".to_owned(), w.join("config").to_string_lossy().into_owned()),
        ("ROOT".to_owned(), root.clone()),
        // A prepared build root (bwrap) provides DEPEND from the host (its
        // -dev packages, listed in the host's package.provided): SYSROOT=/.
        // In a builder image (docker) DEPEND is built into ROOT like every
        // dependency, and SYSROOT_BASHRC puts it on the compiler's paths.
        ("SYSROOT".to_owned(), if build_root.is_some() { "/".to_owned() } else { root }),
        ("EPREFIX".to_owned(), String::new()),
        ("PORTAGE_REPOSITORIES".to_owned(), repos_conf),
    ];
    let mut argv = emerge;
    argv.extend([
        "--buildpkg".into(),
        "--usepkg".into(),
        "--with-bdeps=y".into(),
        "--oneshot".into(),
        "--color=n".into(),
        "--nospinner".into(),
        "--usepkg-exclude".into(),
        spec.atom.to_string(),
        spec.portage_atom(),
    ]);
    let mut repos = vec![(repo_name.clone(), repo.clone())];
    if let Some(cache) = &env.distfiles {
        repos.push((DISTFILES_MOUNT.to_owned(), cache.dir.clone()));
    }
    Ok(BuildPlan {
        job_id: job_id.to_owned(),
        work_dir: w,
        repos,
        portage: env.portage.clone(),
        env: env_vars,
        argv,
        network: env.network,
        limits: env.limits.clone(),
        image: env.image.clone(),
        run_as: env.run_as,
        build_root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pacloud_domain::{BuildRequest, TargetSet};
    use std::time::Duration;

    #[test]
    fn package_use_is_for_the_requested_atom_only() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let env = BuildEnv {
            work_root: dir.path().join("builds"),
            portage: PortageInstall::Venv("/opt/venv".into()),
            repos: BTreeMap::from([("gentoo".to_owned(), repo.clone())]),
            limits: Limits { wall_clock: Duration::from_secs(60), memory_bytes: None },
            network: false,
            run_as: None,
            image: None,
            distfiles: Some(
                DistfilesCache::new(dir.path().join("distfiles"), Duration::from_secs(60), 1 << 30).unwrap(),
            ),
            package_cache: PackageCache::disabled(),
            mirrors: vec!["http://127.0.0.1:1".into()],
            dep_roots: None,
        };
        let targets = TargetSet::builtin();
        let spec = BuildRequest {
            atom: "app-misc/hello".into(),
            version: "2.12-r1".into(),
            use_flags: vec!["foo -bar $(reboot)".into()],
            target: None,
        }
        .validate(&targets);
        assert!(spec.is_err(), "hostile USE never reaches a plan");
        let spec = BuildRequest {
            atom: "app-misc/hello".into(),
            version: "2.12-r1".into(),
            use_flags: vec!["foo -bar".into()],
            target: None,
        }
        .validate(&targets)
        .unwrap();
        let target = targets.get(&spec.target).unwrap().clone();
        let plan = prepare(&env, &Job::new(spec), &target, "job-1").unwrap();
        let w = dir.path().join("builds/job-1");
        assert_eq!(
            std::fs::read_to_string(w.join("config/etc/portage/package.use")).unwrap(),
            "=app-misc/hello-2.12-r1 -bar foo\n"
        );
        assert_eq!(
            std::fs::read_link(w.join("config/etc/portage/make.profile")).unwrap(),
            repo.join("profiles/default/linux/amd64/23.0")
        );
        let make_conf = std::fs::read_to_string(w.join("config/etc/portage/make.conf")).unwrap();
        assert!(make_conf.contains(&format!("PKGDIR=\"{}\"", w.join("pkgdir").display())));
        assert!(make_conf.contains("CFLAGS=\"-O2 -pipe -march=x86-64-v2\""));
        let host = std::fs::read_to_string(w.join("hostconf/make.conf")).unwrap();
        assert!(host.contains("hostpkgdir"), "host packages never go to the published PKGDIR");
        assert_eq!(plan.argv.last().unwrap(), "=app-misc/hello-2.12-r1");
        assert!(plan.argv.windows(2).any(|w| w[0] == "--usepkg-exclude" && w[1] == "app-misc/hello"));
        assert!(!plan.env.iter().any(|(k, _)| k == "USE"), "USE only through package.use");
        assert!(make_conf.contains("GENTOO_MIRRORS=\"http://127.0.0.1:1\""));
        assert!(plan.repos.iter().any(|(n, p)| n == DISTFILES_MOUNT && *p == dir.path().join("distfiles")));
        let fetch = fetch_plan(&plan);
        assert!(fetch.network && !plan.network, "only the fetch step has network");
        let n = fetch.argv.len();
        assert_eq!(&fetch.argv[n - 3..n - 1], &["--fetchonly", "--verbose"]);
        assert_eq!(fetch.argv[0], "/opt/venv/bin/emerge", "no pip-installed script there: the entry point");
        assert!(!fetch.argv.iter().any(|a| a == "--buildpkg"));
        assert_eq!(fetch.argv.last(), plan.argv.last());
        let mut none = env.clone();
        none.repos.clear();
        let spec =
            BuildRequest { atom: "a/b".into(), version: "1".into(), ..Default::default() }.validate(&targets).unwrap();
        assert!(matches!(prepare(&none, &Job::new(spec), &target, "job-2"), Err(PlanError::UnknownRepository { .. })));
    }

    #[test]
    fn a_real_tree_target_in_the_image_gets_the_target_package_provided_and_the_sysroot_bashrc() {
        let dir = tempfile::tempdir().unwrap();
        let provided = dir.path().join("package.provided.target");
        std::fs::write(&provided, "sys-libs/glibc-2.36\n").unwrap();
        let env = BuildEnv {
            work_root: dir.path().join("builds"),
            portage: PortageInstall::System,
            repos: BTreeMap::from([("gentoo".to_owned(), dir.path().join("repo"))]),
            limits: Limits { wall_clock: Duration::from_secs(60), memory_bytes: None },
            network: false,
            run_as: None,
            image: Some(format!("sha256:{}", "a".repeat(64))),
            distfiles: None,
            package_cache: PackageCache::disabled(),
            mirrors: vec![],
            dep_roots: None,
        };
        let targets = TargetSet::builtin();
        let spec = BuildRequest { atom: "app-arch/lzop".into(), version: "1.04-r1".into(), ..Default::default() }
            .validate(&targets)
            .unwrap();
        let toy = targets.get(&spec.target).unwrap().clone();
        let mut real_spec = toy.spec.clone();
        real_spec.build_root = Some(pacloud_domain::target::BuildRootSpec {
            package_provided_host: "/not/read/by/the/docker/plan".into(),
            package_provided_target: Some(provided),
            vdb: vec![],
            host_tools: None,
            links: BTreeMap::new(),
            digest: "0".repeat(64),
        });
        let real = Target::new("real".parse().unwrap(), real_spec).unwrap();
        let plan = prepare(&env, &Job::new(spec.clone()), &real, "job-real").unwrap();
        let config = plan.config_root().join("etc/portage");
        assert_eq!(std::fs::read_to_string(config.join("profile/package.provided")).unwrap(), "sys-libs/glibc-2.36\n");
        assert_eq!(std::fs::read_to_string(config.join("bashrc")).unwrap(), SYSROOT_BASHRC);
        assert_eq!(plan.build_root, None, "the image carries the host side");
        assert!(!plan.work_dir.join("hostconf/make.conf").exists(), "the image's own /etc/portage is the host config");
        // A toy target gets neither.
        let plan = prepare(&env, &Job::new(spec), &toy, "job-toy").unwrap();
        let config = plan.config_root().join("etc/portage");
        assert!(!config.join("bashrc").exists() && !config.join("profile/package.provided").exists());
    }

    #[test]
    fn builds_run_the_venv_script_directly_and_skip_the_post_merge_clean() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path().join("venv");
        std::fs::create_dir_all(venv.join("lib/portage/bin")).unwrap();
        std::fs::write(venv.join("lib/portage/bin/emerge"), "").unwrap();
        let env = BuildEnv {
            work_root: dir.path().join("builds"),
            portage: PortageInstall::Venv(venv.clone()),
            repos: BTreeMap::from([("gentoo".to_owned(), dir.path().join("repo"))]),
            limits: Limits { wall_clock: Duration::from_secs(60), memory_bytes: None },
            network: false,
            run_as: None,
            image: None,
            distfiles: None,
            package_cache: PackageCache::disabled(),
            mirrors: vec![],
            dep_roots: None,
        };
        let targets = TargetSet::builtin();
        let spec = BuildRequest { atom: "app-misc/hello".into(), version: "2.12-r1".into(), ..Default::default() }
            .validate(&targets)
            .unwrap();
        let target = targets.get(&spec.target).unwrap().clone();
        let plan = prepare(&env, &Job::new(spec), &target, "job-1").unwrap();
        let python = venv.join("bin/python").display().to_string();
        let script = venv.join("lib/portage/bin/emerge").display().to_string();
        assert_eq!(&plan.argv[..3], &[python.as_str(), script.as_str(), "--buildpkg"]);
        assert_eq!(plan.argv.last().unwrap(), "=app-misc/hello-2.12-r1");
        let fetch = fetch_plan(&plan);
        assert_eq!(&fetch.argv[..2], &plan.argv[..2], "the fetch step runs the same program");
        assert!(fetch.argv.iter().any(|a| a == "--fetchonly") && !fetch.argv.iter().any(|a| a == "--buildpkg"));
        assert_eq!(fetch.argv.last(), plan.argv.last());
        // Both configs (target and host) carry every build FEATURE, noclean included.
        for conf in [plan.config_root().join("etc/portage/make.conf"), plan.work_dir.join("hostconf/make.conf")] {
            let text = std::fs::read_to_string(&conf).unwrap();
            let features = text.lines().find_map(|l| l.strip_prefix("FEATURES=")).unwrap();
            let features: Vec<&str> = features.trim_matches('"').split(' ').collect();
            assert_eq!(features, BUILD_FEATURES, "{}", conf.display());
            for must in ["noclean", "-sandbox", "-network-sandbox", "binpkg-multi-instance", "binpkg-ignore-signature"]
            {
                assert!(features.contains(&must), "{must} in {}", conf.display());
            }
        }
    }

    #[test]
    fn make_conf_values_are_quoted() {
        assert_eq!(quote(r#"a"b$c`d\e"#), r#""a\"b\$c\`d\\e""#);
    }
}
