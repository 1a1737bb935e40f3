//! Real Gentoo packages through the service in the DOCKER backend (issue 9,
//! item 4): the real-tree target of tests/fixtures/gentoo-subset.toml
//! (../shared/gentoo-subset: real 23.0 profile, real eclasses, real
//! upstream tarballs) built by real portage in the stand-in builder image,
//! which carries the subset's build-root preparation
//! (worker-image/builder/standin/Dockerfile). Sources come through the fetch
//! step from a loopback mirror this test serves: the fetch container runs
//! with `build.docker_network = "host"` to reach it, the build container has
//! `--network=none`. Each result is installed from the signed binhost by a
//! real portage client (the test venv's, in bubblewrap) into a scratch ROOT,
//! and the installed program runs.
//!
//! Runs under the docker tests' engine lock (`crate::docker::engine`).
//! Measured 463 s on the 2 shared cores (load average ~11 from other builds;
//! 432 s of it the seven compiles: lzo, lzop, hello twice, attr, acl, sed).

use crate::docker::{builder_image, engine, wait_no_containers};
use crate::helpers::*;
use crate::realtree::subset;
use pacloud::settings::{BackendChoice, Settings};
use pacloud_worker::sandbox::docker::NetworkMode;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// tests/fixtures/gentoo-subset.toml with @SUBSET@ and @MIRROR@ replaced,
/// switched to the docker backend on the stand-in image.
fn use_subset_on_docker(s: &mut Settings, mirror: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gentoo-subset.toml");
    let toml = std::fs::read_to_string(workspace().join("tests/fixtures/gentoo-subset.toml"))
        .expect("tests/fixtures/gentoo-subset.toml")
        .replace("@SUBSET@", &subset().display().to_string())
        .replace("@MIRROR@", mirror);
    std::fs::write(&file, toml).unwrap();
    let f = Settings::load(Some(&file), |_| None).expect("gentoo-subset settings");
    s.targets = f.targets;
    s.build.repositories = f.build.repositories;
    s.build.wall_clock = f.build.wall_clock;
    s.build.backend = BackendChoice::Docker;
    s.build.image = Some(builder_image());
    s.build.portage_venv = None;
    s.build.docker_network = NetworkMode::Host;
    s.build.workers = 2;
    s.build.poll_wait = Duration::from_millis(500);
    // Two builds of one cpv (hello with and without nls) may collide on
    // BUILD_ID at publish; the loser retries at once (the test clock stands).
    s.build.retry_backoff = Duration::ZERO;
}

fn req(atom: &str, version: &str, use_flags: &[&str]) -> Value {
    json!({"atom": atom, "version": version, "use": use_flags, "target": "gentoo-subset"})
}

/// Posts a request (no waiting).
async fn submit(app: &TestApp, body: &Value) -> String {
    let (status, first) = app.post_build(body).await;
    assert!(status == 202 || status == 200, "{status}: {first}");
    first["key"].as_str().expect("key").to_owned()
}

/// Waits for a build and asserts it is ready.
async fn ready(app: &TestApp, key: &str, what: &str) -> Value {
    let (status, done) = app.wait_done(key, Duration::from_secs(1200)).await;
    assert_eq!(status, 200, "{what}: {done}");
    assert_eq!(done["status"], "ready", "{what}: {done}\n{}", app.logs(key).concat());
    done
}

/// A real portage client (the test venv's PyPI portage in bubblewrap) whose
/// configuration uses the subset's profile and the pacloud binhost.
struct Client {
    dir: PathBuf,
}

impl Client {
    fn new(base: &Path, binhost: &str, key_asc: &str, fingerprint: &str) -> Client {
        let dir = base.join("client");
        let portage = dir.join("config/etc/portage");
        for d in ["root", "pkgdir", "tmp", "distfiles", "gnupg"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for d in ["binrepos.conf", "profile"] {
            std::fs::create_dir_all(portage.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(
            subset().join("repo/profiles/default/linux/amd64/23.0"),
            portage.join("make.profile"),
        )
        .unwrap();
        let d = dir.display();
        std::fs::write(
            portage.join("make.conf"),
            format!(
                "FEATURES=\"-sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox -network-sandbox -pid-sandbox -news -merge-sync binpkg-multi-instance\"\n\
                 PORTAGE_USERNAME=\"root\"\nPORTAGE_GRPNAME=\"root\"\nPKGDIR=\"{d}/pkgdir\"\nPORTAGE_TMPDIR=\"{d}/tmp\"\n\
                 DISTDIR=\"{d}/distfiles\"\nACCEPT_LICENSE=\"*\"\nACCEPT_KEYWORDS=\"amd64 ~amd64\"\nEMERGE_WARNING_DELAY=\"0\"\n\
                 CLEAN_DELAY=\"0\"\nBINPKG_GPG_VERIFY_GPG_HOME=\"{d}/gnupg\"\nPORTAGE_TRUST_HELPER=\"true\"\n"
            ),
        )
        .unwrap();
        std::fs::write(portage.join("binrepos.conf/pacloud.conf"), format!("[pacloud]\nsync-uri = {binhost}\n"))
            .unwrap();
        // What Debian provides under the installed programs (glibc, ...).
        std::fs::copy(subset().join("host-config/package.provided.target"), portage.join("profile/package.provided"))
            .unwrap();
        std::fs::write(portage.join("package.use"), "app-misc/hello nls\n").unwrap();
        trust_key(&dir.join("gnupg"), key_asc, fingerprint);
        Client { dir }
    }

    /// `emerge --getbinpkgonly --binpkg-respect-use=y <atoms>` into the
    /// scratch ROOT; returns (success, combined output).
    fn emerge(&self, atoms: &[&str]) -> (bool, String) {
        // Portage's host configuration (the venv prefix): the same client configuration.
        let config = self.dir.join("config/etc/portage");
        client_emerge(&self.dir, &config, ("gentoo", &subset().join("repo")), &["--quiet-build"], atoms)
    }

    /// Runs an installed program of the scratch ROOT (its libraries from
    /// the same ROOT) and returns its stdout.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let root = self.dir.join("root");
        let out = Command::new(root.join(program))
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LD_LIBRARY_PATH", root.join("usr/lib64"))
            .output()
            .unwrap_or_else(|e| panic!("{program} is installed and runs: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{program} {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }
}

/// The files of a published package's image (`<pf>-1/image.tar.zst`).
async fn image_files(app: &TestApp, built: &Value, pf: &str, dir: &Path) -> Vec<String> {
    let bytes = app.http.get(built["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&bytes), built["sha256"].as_str().unwrap());
    let pkg = dir.join(format!("{pf}-{}.gpkg.tar", &built["sha256"].as_str().unwrap()[..8]));
    std::fs::write(&pkg, &bytes).unwrap();
    let id = Command::new("tar").arg("-tf").arg(&pkg).output().unwrap();
    let member = String::from_utf8_lossy(&id.stdout)
        .lines()
        .find(|l| l.ends_with("/image.tar.zst"))
        .unwrap_or_else(|| panic!("{pf}: no image in the package"))
        .to_owned();
    zstd_tar_list(&tar_member(&pkg, &member), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_builds_real_gentoo_packages_that_a_portage_client_installs_and_runs() {
    let _engine = engine().await;
    // The workers' reasons for retries go to the test's output.
    let _ = tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).with_test_writer().try_init();
    let started = Instant::now();
    let mirror = Mirror::of_dir(subset().join("distfiles")).await;
    let app = spawn_app_with(|s| use_subset_on_docker(s, &mirror.url)).await;

    // lzop pulls dev-libs/lzo, built and published first in the same build;
    // hello with and without nls; acl pulls sys-apps/attr.
    let lzop = submit(&app, &req("app-arch/lzop", "1.04-r1", &[])).await;
    let hello_nls = submit(&app, &req("app-misc/hello", "2.10-r1", &["nls"])).await;
    let hello_plain = submit(&app, &req("app-misc/hello", "2.10-r1", &["-nls"])).await;
    let acl = submit(&app, &req("sys-apps/acl", "2.3.1-r2", &[])).await;
    let lzop_done = ready(&app, &lzop, "app-arch/lzop").await;
    let nls_done = ready(&app, &hello_nls, "app-misc/hello[nls]").await;
    let plain_done = ready(&app, &hello_plain, "app-misc/hello[-nls]").await;
    ready(&app, &acl, "sys-apps/acl").await;
    app.wait_kept_root("sys-apps/acl-2.3.1-r2").await;
    // sed (USE=acl by default) reuses the published acl and attr.
    let sed = submit(&app, &req("sys-apps/sed", "4.9-r1", &[])).await;
    ready(&app, &sed, "sys-apps/sed").await;
    let built_in = started.elapsed();

    let lzop_log = app.logs(&lzop).concat();
    assert!(lzop_log.contains(">>> Emerging (1 of 2) dev-libs/lzo-2.10::gentoo"), "lzo built first:\n{lzop_log}");
    assert_eq!(lzop_log.matches(">>> Compiling source").count(), 2, "lzo and lzop compiled:\n{lzop_log}");
    let sed_log = app.logs(&sed).concat();
    // sed starts from acl's kept ROOT (crate pacloud_worker::deproot): acl
    // and attr are installed already, neither merged again nor rebuilt.
    let kept = sed_log.lines().find(|l| l.contains("ROOT starts as a copy of a kept ROOT")).unwrap_or_default();
    for reused in ["sys-apps/attr-2.5.1-r2", "sys-apps/acl-2.3.1-r2"] {
        let emerged = |kind: &str| sed_log.lines().any(|l| l.starts_with(kind) && l.contains(reused));
        assert!(kept.contains(reused), "{reused} came with the kept ROOT:\n{sed_log}");
        assert!(!emerged(">>> Emerging binary (") && !emerged(">>> Emerging ("), "{reused} merged again:\n{sed_log}");
    }
    assert_eq!(sed_log.matches(">>> Compiling source").count(), 1, "only sed compiled:\n{sed_log}");
    // Sources came from the loopback mirror through the fetch step, once
    // each (then from the verified cache); the two hello builds may have
    // fetched at the same time.
    for file in ["lzo-2.10.tar.gz", "lzop-1.04.tar.gz", "attr-2.5.1.tar.xz", "acl-2.3.1.tar.xz", "sed-4.9.tar.xz"] {
        assert_eq!(mirror.hits(file), 1, "{file} downloaded once from the mirror");
    }
    assert!((1..=2).contains(&mirror.hits("hello-2.10.tar.gz")), "hello's tarball from the mirror");

    // The nls variant carries the translations, the other does not.
    let tmp = tempfile::tempdir().unwrap();
    let with = image_files(&app, &nls_done, "hello-nls", tmp.path()).await;
    let without = image_files(&app, &plain_done, "hello-plain", tmp.path()).await;
    let mo = |files: &[String]| files.iter().filter(|f| f.ends_with("/hello.mo")).count();
    assert!(mo(&with) > 10, "USE=nls installs hello.mo files: {}", mo(&with));
    assert_eq!(mo(&without), 0, "USE=-nls installs none");
    let lzop_files = image_files(&app, &lzop_done, "lzop", tmp.path()).await;
    assert!(lzop_files.iter().any(|f| f == "image/usr/bin/lzop"), "{lzop_files:?}");

    // A real portage client installs everything from the signed binhost.
    let key_asc = app.http.get(app.url("/v1/signing-key.asc")).send().await.unwrap().text().await.unwrap();
    let targets: Value = app.http.get(app.url("/v1/targets")).send().await.unwrap().json().await.unwrap();
    let fingerprint = targets["signing_key"]["fingerprint"].as_str().expect("fingerprint").to_owned();
    let client = Client::new(tmp.path(), &app.url("/binhost/gentoo-subset"), &key_asc, &fingerprint);
    let (ok, out) = client.emerge(&["app-arch/lzop", "app-misc/hello", "sys-apps/acl", "sys-apps/sed"]);
    assert!(ok, "the client installs the published packages:\n{out}");
    assert!(out.contains("dev-libs/lzo-2.10") && out.contains("sys-apps/attr-2.5.1-r2"), "{out}");
    assert!(client.run("usr/bin/lzop", &["--version"]).contains("lzop 1.04"));
    assert_eq!(client.run("usr/bin/hello", &[]).trim(), "Hello, world!");
    assert!(client.dir.join("root/usr/share/locale/de/LC_MESSAGES/hello.mo").is_file(), "the nls variant");
    assert!(client.run("bin/getfacl", &["--version"]).contains("getfacl 2.3.1"));
    assert!(client.run("bin/sed", &["--version"]).contains("(GNU sed) 4.9"));
    wait_no_containers().await;
    eprintln!("real packages in docker: built in {built_in:?}, whole test {:?}", started.elapsed());
}

/// The host network is for a loopback mirror on a local machine: an AWS
/// worker (instance credentials, an IMDS rule that only filters bridged
/// traffic) refuses to start with it, exit code 2, naming the setting.
#[test]
fn an_aws_worker_refuses_the_host_network() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pacloud.toml");
    std::fs::write(
        &config,
        "[build]\ndocker_network = \"host\"\n\n[aws]\ntable = \"t\"\nqueue_url = \"http://127.0.0.1:1/q\"\nbucket = \"b\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pacloud"))
        .args(["worker", "--backend", "aws", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("PACLOUD_AWS_TABLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("build.docker_network = \"host\" is refused on AWS workers"), "{stderr}");
}
