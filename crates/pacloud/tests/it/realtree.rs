//! Real Gentoo packages end to end (issue 9), bubblewrap backend: the real
//! tree, 23.0 profile, eclasses and upstream tarballs of
//! `../shared/gentoo-subset`, served and built with
//! `tests/fixtures/gentoo-subset.toml` (the build root prepared by pacloud
//! over the venv prefix), sources fetched by the fetch step from a loopback
//! mirror serving the subset's `distfiles/`, real emerge in bubblewrap; each
//! result installed by a real portage client from the signed binhost into a
//! scratch ROOT, where the installed program runs.
//!
//! Reusable by the docker test: [`subset`], [`Mirror`] (helpers),
//! [`subset_settings_toml`], [`use_subset`], [`wait_long`], [`SubsetClient`].

use crate::helpers::*;
use pacloud::settings::Settings;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `../shared/gentoo-subset` (relative to the workspace root).
pub fn subset() -> PathBuf {
    workspace().join("../shared/gentoo-subset").canonicalize().expect("../shared/gentoo-subset")
}

/// tests/fixtures/gentoo-subset.toml with `@SUBSET@` and `@MIRROR@` replaced.
pub fn subset_settings_toml(subset: &Path, mirror: &str) -> String {
    std::fs::read_to_string(workspace().join("tests/fixtures/gentoo-subset.toml"))
        .expect("tests/fixtures/gentoo-subset.toml")
        .replace("@SUBSET@", &subset.display().to_string())
        .replace("@MIRROR@", mirror)
}

/// Applies the subset settings file (with `extra` TOML appended) to `s`,
/// with portage from the test venv.
pub fn use_subset(s: &mut Settings, subset: &Path, mirror: &str, extra: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("gentoo-subset.toml");
    std::fs::write(&file, subset_settings_toml(subset, mirror) + extra).expect("write config");
    let f = Settings::load(Some(&file), |_| None).expect("gentoo-subset.toml loads");
    s.targets = f.targets;
    s.build.repositories = f.build.repositories;
    s.build.backend = f.build.backend;
    s.build.wall_clock = f.build.wall_clock;
    s.build.portage_venv = Some(workspace().join(".venv"));
    s.build.workers = 2;
    s.build.poll_wait = Duration::from_millis(500);
    // The test clock stands still: an infrastructure failure is final at
    // once (with its reason) instead of waiting for a retry that never comes.
    s.max_receives = 1;
}

pub fn req(atom: &str, version: &str, use_flags: &[&str]) -> Value {
    json!({"atom": atom, "version": version, "use": use_flags})
}

/// POSTs a request and waits (up to `limit`) for its outcome.
pub async fn wait_long(app: &TestApp, body: &Value, limit: Duration) -> (String, Value) {
    let (status, first) = app.post_build(body).await;
    assert!(status == 202 || status == 200, "{status}: {first}");
    let key = first["key"].as_str().expect("key").to_owned();
    let (status, done) = app.wait_done(&key, limit).await;
    assert_eq!(status, 200, "{done}");
    (key, done)
}

/// A Gentoo user's portage installing from the binhost into a scratch ROOT:
/// the subset's tree and profile, the target root's package.provided (what
/// the host system provides), the host configuration (the venv prefix,
/// bound in bubblewrap) with the host's, and a keyring trusting only the
/// server's published key.
pub struct SubsetClient {
    pub dir: PathBuf,
}

impl SubsetClient {
    pub fn new(base: &Path, binhost: &str, key_asc: &str, fingerprint: &str) -> SubsetClient {
        let dir = base.join("client");
        let sub = subset();
        for d in ["root", "pkgdir", "tmp", "distfiles", "gnupg"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let d = dir.display();
        let make_conf = format!(
            "FEATURES=\"-sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox -network-sandbox -pid-sandbox -news -merge-sync binpkg-multi-instance\"\n\
             PORTAGE_USERNAME=\"root\"\nPORTAGE_GRPNAME=\"root\"\nPKGDIR=\"{d}/pkgdir\"\nPORTAGE_TMPDIR=\"{d}/tmp\"\n\
             DISTDIR=\"{d}/distfiles\"\nACCEPT_LICENSE=\"*\"\nACCEPT_KEYWORDS=\"amd64 ~amd64\"\nEMERGE_WARNING_DELAY=\"0\"\nCLEAN_DELAY=\"0\"\n\
             BINPKG_GPG_VERIFY_GPG_HOME=\"{d}/gnupg\"\nPORTAGE_TRUST_HELPER=\"true\"\n"
        );
        for (conf, provided) in [("config", "package.provided.target"), ("hostconfig", "package.provided.host")] {
            let portage = dir.join(conf).join("etc/portage");
            std::fs::create_dir_all(portage.join("binrepos.conf")).unwrap();
            std::fs::create_dir_all(portage.join("profile")).unwrap();
            std::os::unix::fs::symlink(
                sub.join("repo/profiles/default/linux/amd64/23.0"),
                portage.join("make.profile"),
            )
            .unwrap();
            std::fs::write(portage.join("make.conf"), &make_conf).unwrap();
            std::fs::write(portage.join("binrepos.conf/pacloud.conf"), format!("[pacloud]\nsync-uri = {binhost}\n"))
                .unwrap();
            std::fs::copy(sub.join("host-config").join(provided), portage.join("profile/package.provided")).unwrap();
        }
        trust_key(&dir.join("gnupg"), key_asc, fingerprint);
        assert!(Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status().unwrap().success());
        SubsetClient { dir }
    }

    /// `emerge --getbinpkgonly --binpkg-respect-use=y <atoms>` into the
    /// scratch ROOT (portage kept off the host by bubblewrap).
    pub fn emerge(&self, atoms: &[&str]) -> (bool, String) {
        let host = self.dir.join("hostconfig/etc/portage");
        client_emerge(&self.dir, &host, ("gentoo", &subset().join("repo")), &["--color=n"], atoms)
    }

    /// Runs a program installed in the scratch ROOT, with its libraries.
    pub fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let root = self.dir.join("root");
        let libs = ["usr/lib64", "lib64"].map(|l| root.join(l).display().to_string()).join(":");
        // 23.0 profiles: some packages install to /bin, others to /usr/bin.
        let path = [root.join(program), root.join(program.trim_start_matches("usr/"))]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{program} is not installed in the ROOT"));
        let out = Command::new(path)
            .args(args)
            .env_clear()
            .env("LD_LIBRARY_PATH", libs)
            .env("LANG", "C")
            .output()
            .unwrap_or_else(|e| panic!("{program} cannot start: {e}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

async fn subset_builder(mirror: &str, extra: &str) -> TestApp {
    let (sub, mirror, extra) = (subset(), mirror.to_owned(), extra.to_owned());
    spawn_app_with(move |s| use_subset(s, &sub, &mirror, &extra)).await
}

fn ready(done: &Value) {
    assert_eq!(done["status"], "ready", "{done}");
}

// Real compiles on 2 cores: lzo + lzop, hello twice, attr + acl, sed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_packages_build_publish_and_install_and_their_programs_run() {
    let started = Instant::now();
    let mirror = Mirror::of_dir(subset().join("distfiles")).await;
    let app = subset_builder(&mirror.url, "").await;
    let limit = Duration::from_secs(1500);
    // lzop first (builds and publishes dev-libs/lzo in the same graph), the
    // rest concurrently on the two worker slots.
    let (lzop_req, nls_req) = (req("app-arch/lzop", "1.04-r1", &[]), req("app-misc/hello", "2.10-r1", &["nls"]));
    let lzop = wait_long(&app, &lzop_req, limit);
    let hello_nls = wait_long(&app, &nls_req, limit);
    let (lzop, hello_nls) = tokio::join!(lzop, hello_nls);
    ready(&lzop.1);
    ready(&hello_nls.1);
    let log = app.logs(&lzop.0).join("\n");
    assert!(log.contains("dev-libs/lzo-2.10"), "lzo is in lzop's graph:\n{log}");
    assert_eq!(mirror.hits("lzo-2.10.tar.gz"), 1, "lzo's source fetched once, from the mirror");
    // lzo was published as a dependency: a request for it is a hit, no build.
    let (s, lzo) = app.post_build(&req("dev-libs/lzo", "2.10", &[])).await;
    assert_eq!((s, lzo["status"].as_str()), (200, Some("ready")), "{lzo}");
    let (plain_req, acl_req) = (req("app-misc/hello", "2.10-r1", &["-nls"]), req("sys-apps/acl", "2.3.1-r2", &[]));
    let hello_plain = wait_long(&app, &plain_req, limit);
    let acl = wait_long(&app, &acl_req, limit);
    let (hello_plain, acl) = tokio::join!(hello_plain, acl);
    ready(&hello_plain.1);
    ready(&acl.1);
    app.wait_kept_root("sys-apps/acl-2.3.1-r2").await;
    assert_ne!(hello_plain.0, hello_nls.0, "two USE variants, two keys");
    let (s, attr) = app.post_build(&req("sys-apps/attr", "2.5.1-r2", &[])).await;
    assert_eq!((s, attr["status"].as_str()), (200, Some("ready")), "attr published with acl: {attr}");
    let (sed_key, sed) = wait_long(&app, &req("sys-apps/sed", "4.9-r1", &[]), limit).await;
    ready(&sed);
    let built = started.elapsed();
    // sed (USE=acl) starts from acl's kept ROOT: acl and attr are not merged again.
    let sed_log = app.logs(&sed_key).concat();
    let reused = sed_log.lines().find(|l| l.contains("ROOT starts as a copy of a kept ROOT")).unwrap_or_default();
    assert!(reused.contains("sys-apps/acl-2.3.1-r2") && reused.contains("sys-apps/attr-2.5.1-r2"), "{sed_log}");
    let merged = |cpv: &str| sed_log.lines().any(|l| l.starts_with(">>> Emerging") && l.contains(cpv));
    assert!(!merged("sys-apps/acl-") && !merged("sys-apps/attr-") && merged("sys-apps/sed-4.9-r1"), "{sed_log}");

    // A rebuild of everything is a cache hit.
    for (atom, v, u) in [
        ("app-arch/lzop", "1.04-r1", &[][..]),
        ("app-misc/hello", "2.10-r1", &["nls"]),
        ("app-misc/hello", "2.10-r1", &["-nls"]),
        ("sys-apps/acl", "2.3.1-r2", &[]),
        ("sys-apps/sed", "4.9-r1", &[]),
    ] {
        let (s, b) = app.post_build(&req(atom, v, u)).await;
        assert_eq!((s, b["status"].as_str()), (200, Some("ready")), "{atom}: {b}");
    }

    // A real portage client installs each from the signed binhost.
    let key_asc = app.http.get(app.url("/v1/signing-key.asc")).send().await.unwrap().text().await.unwrap();
    let fingerprint = app.app.signer.as_ref().unwrap().fingerprint().to_owned();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let client = SubsetClient::new(tmp.path(), &app.url("/binhost/gentoo-subset"), &key_asc, &fingerprint);
    let (ok, out) = client.emerge(&["app-arch/lzop", "sys-apps/acl", "sys-apps/sed", "app-misc/hello"]);
    assert!(ok, "the client did not install the set:\n{out}");
    for cpv in ["dev-libs/lzo-2.10", "app-arch/lzop-1.04-r1", "sys-apps/attr-2.5.1-r2", "sys-apps/acl-2.3.1-r2"] {
        assert!(out.contains(&format!("Emerging binary ({cpv}")) || out.contains(cpv), "{cpv} not installed:\n{out}");
    }
    for (program, args, expect) in [
        ("usr/bin/lzop", &["--version"][..], "lzop 1.04"),
        ("bin/sed", &["--version"], "sed (GNU sed) 4.9"),
        ("usr/bin/hello", &[], "Hello, world!"),
        ("usr/bin/getfacl", &["--version"], "getfacl 2.3.1"),
        ("usr/bin/getfattr", &["--version"], "getfattr 2.5.1"),
    ] {
        let (ok, text) = client.run(program, args);
        assert!(ok && text.contains(expect), "{program} {args:?}: {text}");
    }
    eprintln!("real set built in {built:?}; whole test {:?}", started.elapsed());
}

/// `dir` holding a symbolic link to every entry of `from`, except `but`.
fn link_all(from: &Path, dir: &Path, but: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if !but.contains(&e.file_name().to_string_lossy().as_ref()) {
            std::os::unix::fs::symlink(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
}

// Bad input on the real tree (no compile; about 1 min): a package whose
// ebuild inherits an eclass the tree lacks fails as a build failure with
// portage's own message in its log; a source with a wrong digest is refused
// by the Manifest check, an infrastructure failure naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbuildable_package_is_a_build_failure_and_a_bad_source_is_refused() {
    let started = Instant::now();
    let sub = subset();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The subset's tree (linked, not copied) plus one ebuild needing the
    // Python eclasses the subset does not carry.
    let repo = tmp.path().join("repo");
    link_all(&sub.join("repo"), &repo, &["app-misc"]);
    link_all(&sub.join("repo/app-misc"), &repo.join("app-misc"), &[]);
    let ebuild_dir = repo.join("app-misc/needs-python");
    std::fs::create_dir_all(&ebuild_dir).unwrap();
    std::fs::write(
        ebuild_dir.join("needs-python-1.ebuild"),
        "EAPI=8\nPYTHON_COMPAT=( python3_11 )\ninherit python-single-r1\nDESCRIPTION=\"needs python\"\n\
         HOMEPAGE=\"https://example.org\"\nSLOT=\"0\"\nLICENSE=\"MIT\"\nKEYWORDS=\"amd64\"\n",
    )
    .unwrap();
    // A mirror whose pv tarball is one byte off.
    let mirror_dir = tmp.path().join("distfiles");
    link_all(&sub.join("distfiles"), &mirror_dir, &["pv-1.6.20.tar.bz2"]);
    let mut pv = std::fs::read(sub.join("distfiles/pv-1.6.20.tar.bz2")).unwrap();
    let mid = pv.len() / 2;
    pv[mid] ^= 1;
    std::fs::write(mirror_dir.join("pv-1.6.20.tar.bz2"), &pv).unwrap();
    let mirror = Mirror::of_dir(mirror_dir).await;
    let repo_s = repo.display().to_string();
    let app = spawn_app_with(move |s| {
        use_subset(s, &sub, &mirror.url, "");
        s.build.repositories.insert("gentoo".into(), repo_s.into());
    })
    .await;
    let limit = Duration::from_secs(300);

    let (key, failed) = wait_long(&app, &req("app-misc/needs-python", "1", &[]), limit).await;
    assert_eq!((failed["status"].as_str(), failed["class"].as_str()), (Some("failed"), Some("build")), "{failed}");
    let log = app.logs(&key).join("\n");
    assert!(log.contains("python-single-r1"), "portage names the missing eclass:\n{log}");
    assert!(log.contains("masked by: corruption") || log.contains("could not be found"), "{log}");

    let (_, refused) = wait_long(&app, &req("sys-apps/pv", "1.6.20", &[]), limit).await;
    assert_eq!(
        (refused["status"].as_str(), refused["class"].as_str()),
        (Some("failed"), Some("infrastructure")),
        "{refused}"
    );
    let reason = refused["reason"].as_str().unwrap();
    assert!(reason.contains("pv-1.6.20.tar.bz2"), "the failure names the file: {reason}");
    assert!(!app.dir.path().join("data/distfiles/pv-1.6.20.tar.bz2").exists(), "a bad file is not cached");
    eprintln!("bad input checks took {:?}", started.elapsed());
}
