//! Key version 2 and answers checked against the target's tree, on real
//! portage: the tree index of `../shared/gentoo-subset` (real Gentoo ebuilds,
//! the real 23.0 profile) against `host-config/effective_use.py`; the API's
//! 503/404/400 answers and one key per configuration on that tree; and a
//! real chain build on the fixture repository whose dependency is then a
//! cache hit for its own default-configuration request.

use crate::helpers::*;
use pacloud_domain::ports::ArtifactStore;
use pacloud_domain::target::{Target, TargetSpec};
use pacloud_domain::tree::{TreeIndex, TreeIndexDoc};
use pacloud_domain::{TargetName, TargetSet};
use pacloud_worker::sandbox::PortageInstall;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The real Gentoo subset shared by the tests (never copied into the repo).
fn subset() -> PathBuf {
    workspace().join("../shared/gentoo-subset")
}

fn subset_target() -> Target {
    let spec = TargetSpec {
        profile: "default/linux/amd64/23.0".into(),
        chost: "x86_64-pc-linux-gnu".into(),
        cflags: "-O2 -pipe".into(),
        cxxflags: "-O2 -pipe".into(),
        ldflags: String::new(),
        repository: "gentoo".into(),
        snapshot: "gentoo-subset".into(),
        builder: "host".into(),
        env: BTreeMap::new(),
        tree_index: true,
        mirrors: Vec::new(),
        build_root: None,
    };
    Target::new("subset".parse().unwrap(), spec).unwrap()
}

fn venv() -> PathBuf {
    workspace().join(".venv")
}

/// The subset's tree index, computed by the worker's generator with real
/// portage.
async fn subset_index(work: &Path) -> Vec<u8> {
    let t = subset_target();
    pacloud_worker::tree_index::generate(&PortageInstall::Venv(venv()), &subset().join("repo"), &t, work)
        .await
        .expect("tree index of the gentoo subset")
}

/// `effective_use.py`'s report for each cpv: (slot, iuse, enabled ∩ IUSE,
/// use.mask ∩ IUSE, use.force ∩ IUSE).
type Oracle = BTreeMap<String, (String, Vec<String>, Vec<String>, Vec<String>, Vec<String>)>;

fn py_list(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|w| w.trim().trim_matches('\'').to_owned())
        .filter(|w| !w.is_empty())
        .collect();
    v.sort();
    v
}

fn effective_use_py(cpvs: &[String], dir: &Path) -> Oracle {
    let cfg = dir.join("oracle-config");
    let portage = cfg.join("etc/portage");
    std::fs::create_dir_all(portage.join("repos.conf")).unwrap();
    std::fs::create_dir_all(dir.join("oracle-root")).unwrap();
    let repo = subset().join("repo");
    std::fs::write(
        portage.join("repos.conf/gentoo.conf"),
        format!("[DEFAULT]\nmain-repo = gentoo\n\n[gentoo]\nlocation = {}\n", repo.display()),
    )
    .unwrap();
    std::fs::write(portage.join("make.conf"), "CHOST=\"x86_64-pc-linux-gnu\"\n").unwrap();
    std::os::unix::fs::symlink(repo.join("profiles/default/linux/amd64/23.0"), portage.join("make.profile")).unwrap();
    let out = std::process::Command::new(venv().join("bin/python"))
        .arg(subset().join("host-config/effective_use.py"))
        .arg(&cfg)
        .arg(dir.join("oracle-root"))
        .args(cpvs.iter().map(|c| format!("={c}")))
        .env("EPREFIX", "")
        .output()
        .expect("effective_use.py runs");
    assert!(out.status.success(), "effective_use.py: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut result = Oracle::new();
    let mut cur: Option<(String, String)> = None;
    let mut fields: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut flush = |cur: &mut Option<(String, String)>, fields: &mut BTreeMap<&str, Vec<String>>| {
        if let Some((cpv, slot)) = cur.take() {
            let f = |k: &str| fields.get(k).cloned().unwrap_or_default();
            result.insert(cpv, (slot, f("iuse"), f("on"), f("mask"), f("force")));
            fields.clear();
        }
    };
    for line in text.lines() {
        if !line.starts_with(' ') {
            flush(&mut cur, &mut fields);
            let mut words = line.split_whitespace();
            let cpv = words.next().unwrap().to_owned();
            let slot = words.next().unwrap().strip_prefix("SLOT=").unwrap().to_owned();
            cur = Some((cpv, slot));
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim();
            let key = match k {
                "IUSE" => "iuse",
                "enabled in IUSE" => "on",
                "use.mask  ∩ IUSE" => "mask",
                "use.force ∩ IUSE" => "force",
                _ => continue,
            };
            let list = if key == "iuse" {
                let mut v: Vec<String> =
                    v.split_whitespace().map(|w| w.trim_start_matches(['+', '-']).to_owned()).collect();
                v.sort();
                v.dedup();
                v
            } else {
                py_list(v)
            };
            fields.insert(key, list);
        }
    }
    flush(&mut cur, &mut fields);
    result
}

#[tokio::test]
async fn tree_index_matches_effective_use_py_for_every_subset_ebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = subset_index(&tmp.path().join("gen")).await;
    let index = TreeIndex::parse(&bytes, &subset_target()).expect("a valid index for the subset target");
    let doc: &TreeIndexDoc = index.doc();
    let cpvs: Vec<String> =
        doc.packages.iter().flat_map(|(cp, vs)| vs.keys().map(move |v| format!("{cp}-{v}"))).collect();
    let ebuilds = walkdir_ebuilds(&subset().join("repo"));
    assert_eq!(cpvs.len(), ebuilds, "one entry per ebuild of the subset");
    assert_eq!(doc.ebuilds as usize, ebuilds);
    assert!(doc.use_expand.iter().any(|e| e == "python_targets"), "USE_EXPAND names: {:?}", doc.use_expand);
    let oracle = effective_use_py(&cpvs, tmp.path());
    assert_eq!(oracle.len(), cpvs.len(), "the oracle reported every cpv: {oracle:?}");
    for (cp, versions) in &doc.packages {
        for (v, pkg) in versions {
            let cpv = format!("{cp}-{v}");
            let (slot, iuse, on, mask, force) = &oracle[&cpv];
            assert_eq!(&pkg.slot, slot, "SLOT of {cpv}");
            assert_eq!(&pkg.iuse, iuse, "IUSE of {cpv}");
            assert_eq!(&pkg.on, on, "default-enabled IUSE flags of {cpv}");
            assert_eq!(&pkg.masked, mask, "masked IUSE flags of {cpv}");
            let forced: Vec<String> = force.iter().filter(|f| !mask.contains(f)).cloned().collect();
            assert_eq!(pkg.forced, forced, "forced IUSE flags of {cpv}");
        }
    }
    // The index entries docs/key.md's version 2 vectors use are the real ones.
    let key_md = std::fs::read_to_string(workspace().join("docs/key.md")).unwrap();
    let mut checked = 0;
    for block in key_md.split("```vector-v2\n").skip(1) {
        let line = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).unwrap().to_owned();
        let request: Value = serde_json::from_str(&line("request: ")).unwrap();
        let (atom, version) = (request["atom"].as_str().unwrap(), request["version"].as_str().unwrap());
        if let Some(entry) = doc.packages.get(atom).and_then(|vs| vs.get(version)) {
            let documented: pacloud_domain::tree::PackageUse = serde_json::from_str(&line("index: ")).unwrap();
            assert_eq!(&documented, entry, "docs/key.md's index entry of {atom}-{version}");
            checked += 1;
        }
    }
    assert!(checked >= 5, "docs/key.md vectors checked against the subset: {checked}");
    // The issue's example: the 23.0 profile turns nls on for hello, whose
    // IUSE has no +nls.
    let hello = &doc.packages["app-misc/hello"]["2.10-r1"];
    assert_eq!((hello.iuse.clone(), hello.on.clone()), (vec!["nls".to_owned()], vec!["nls".to_owned()]));
}

fn walkdir_ebuilds(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += walkdir_ebuilds(&p);
        } else if p.extension().is_some_and(|x| x == "ebuild") {
            n += 1;
        }
    }
    n
}

fn req(atom: &str, version: &str, use_flags: &[&str]) -> Value {
    json!({"atom": atom, "version": version, "use": use_flags})
}

#[tokio::test]
async fn subset_answers_are_checked_against_the_tree() {
    let target = subset_target();
    let app = spawn_app_with(|s| {
        s.targets = TargetSet::new("subset".parse::<TargetName>().unwrap(), [subset_target()]).unwrap();
    })
    .await;
    // No index stored yet: 503 with Retry-After, never a key.
    let resp = app.http.post(app.url("/v1/builds")).json(&req("app-misc/hello", "2.10-r1", &[])).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "30");
    let (_, body) = decode(resp).await;
    assert_eq!(body["error"], "tree_index_pending", "{body}");
    assert!(body.get("key").is_none());
    assert_eq!(app.depth().await.visible, 0, "nothing queued");

    let tmp = tempfile::tempdir().unwrap();
    let bytes = subset_index(&tmp.path().join("gen")).await;
    app.app.artifacts.put_bytes(&TreeIndex::path(&target).unwrap(), bytes.clone(), "application/json").await.unwrap();
    let index_file = tmp.path().join("index.json");
    std::fs::write(&index_file, &bytes).unwrap();

    // hello: nls is on by the profile; [], ["nls"], ["+nls"] are one key.
    let (s1, a) = app.post_build(&req("app-misc/hello", "2.10-r1", &[])).await;
    assert_eq!(s1, 202, "{a}");
    for same in [&["nls"][..], &["+nls"], &["-nls nls"]] {
        let (s, b) = app.post_build(&req("app-misc/hello", "2.10-r1", same)).await;
        assert_eq!((s, &b["key"]), (202, &a["key"]), "{same:?}: {b}");
    }
    let (_, off) = app.post_build(&req("app-misc/hello", "2.10-r1", &["-nls"])).await;
    assert_ne!(off["key"], a["key"]);
    let jobs = app.drain_queue().await;
    assert_eq!(jobs.len(), 2, "one job per configuration: {jobs:?}");
    let job: Value = serde_json::from_str(&jobs[0]).unwrap();
    assert_eq!(job["spec"]["use"], json!(["nls"]), "the job carries the effective USE");
    assert_eq!(job["spec"]["key_version"], 2);
    // The key is the documented version 2 encoding.
    let enc =
        "pacloud-key-v2\ntarget:".to_owned() + target.hash() + "\natom:app-misc/hello\nversion:2.10-r1\nuse:+nls\n";
    assert_eq!(a["key"], sha256(enc.as_bytes()));

    // Offline, from the stored index: `pacloud key --index` and the Python
    // reference give the server's key.
    let config = tmp.path().join("targets.toml");
    std::fs::write(
        &config,
        "default_target = \"subset\"\n[targets.subset]\nprofile = \"default/linux/amd64/23.0\"\nchost = \"x86_64-pc-linux-gnu\"\n\
         cflags = \"-O2 -pipe\"\ncxxflags = \"-O2 -pipe\"\nrepository = \"gentoo\"\nsnapshot = \"gentoo-subset\"\n\
         builder = \"host\"\ntree_index = true\n",
    )
    .unwrap();
    let cli = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pacloud"))
            .args(["key", "app-misc/hello-2.10-r1", "--use", "+nls", "--config"])
            .arg(&config)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, key, _) = cli(&["--index", index_file.to_str().unwrap()]);
    assert_eq!((code, key.as_str()), (Some(0), a["key"].as_str().unwrap()));
    let (code, _, err) = cli(&[]);
    assert_eq!(code, Some(2), "a version 2 target needs --index: {err}");
    let out = std::process::Command::new("python3")
        .arg(workspace().join("scripts/pacloud_key.py"))
        .args(["--index", index_file.to_str().unwrap(), "app-misc/hello", "2.10-r1"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a["key"].as_str().unwrap(), "pacloud_key.py --index");

    // Unknown package and version: 404 naming the cpv.
    let (s, b) = app.post_build(&req("app-misc/nope", "1.0", &[])).await;
    assert_eq!((s, b["error"].as_str(), b["field"].as_str()), (404, Some("not_found"), Some("atom")), "{b}");
    assert!(b["message"].as_str().unwrap().contains("app-misc/nope"), "{b}");
    let (s, b) = app.post_build(&req("app-misc/hello", "2.12", &[])).await;
    assert_eq!((s, b["field"].as_str()), (404, Some("version")), "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("app-misc/hello-2.12")
            && b["message"].as_str().unwrap().contains("2.10-r1"),
        "{b}"
    );
    // A flag outside IUSE: 400 naming it.
    let (s, b) = app.post_build(&req("app-misc/hello", "2.10-r1", &["nls", "gtk"])).await;
    assert_eq!(
        (s, b["flag"].as_str(), b["rule"].as_str(), b["field"].as_str()),
        (400, Some("gtk"), Some("iuse"), Some("use")),
        "{b}"
    );
    // Masked by the real profile (sed: selinux) and forced (bzip2: abi_x86_64).
    let (s, b) = app.post_build(&req("sys-apps/sed", "4.9-r1", &["selinux"])).await;
    assert_eq!((s, b["flag"].as_str(), b["rule"].as_str()), (400, Some("selinux"), Some("use.mask")), "{b}");
    let (s, b) = app.post_build(&req("app-arch/bzip2", "1.0.8-r5", &["-abi_x86_64"])).await;
    assert_eq!((s, b["flag"].as_str(), b["rule"].as_str()), (400, Some("abi_x86_64"), Some("use.force")), "{b}");
    // A USE_EXPAND flag in its expanded form is an IUSE flag.
    let (s, b) = app.post_build(&req("app-arch/bzip2", "1.0.8-r5", &["abi_x86_32"])).await;
    assert_eq!(s, 202, "{b}");
    // Masking the already-masked and forcing the forced is no change.
    let (_, plain) = app.post_build(&req("sys-apps/sed", "4.9-r1", &[])).await;
    let (_, same) = app.post_build(&req("sys-apps/sed", "4.9-r1", &["-selinux", "acl", "nls"])).await;
    assert_eq!(plain["key"], same["key"]);
    // The original client's endpoint is checked the same way.
    let (s, b) = app.get_json("/package?package=app-misc/hello&version=2.10-r1&useflag=gtk").await;
    assert_eq!((s, b["status"].as_str()), (400, Some("FAILED")), "{b}");
}

/// The fixture target with a tree index (same repository and profile).
fn fixtures_v2(s: &mut pacloud::settings::Settings) {
    let f = s.targets.get(&"fixtures".parse().unwrap()).unwrap().clone();
    let mut spec = f.spec.clone();
    spec.tree_index = true;
    let t = Target::new("fixtures".parse().unwrap(), spec).unwrap();
    s.targets = TargetSet::new("fixtures".parse().unwrap(), [t]).unwrap();
}

/// POSTs until the target's index is there (the workers build it at start).
async fn post_when_indexed(app: &TestApp, body: &Value) -> (u16, Value) {
    let start = std::time::Instant::now();
    loop {
        let (s, b) = app.post_build(body).await;
        if s != 503 {
            return (s, b);
        }
        assert_eq!(b["error"], "tree_index_pending", "{b}");
        assert!(start.elapsed() < Duration::from_secs(90), "tree index not built after 90 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_dependency_is_a_cache_hit_for_its_default_configuration() {
    let app = spawn_builder_with(fixtures_v2).await;
    let tmp = tempfile::tempdir().unwrap();
    // usekey-app's defaults: nls (profile package.use), ssl (forced).
    let (s, first) = post_when_indexed(&app, &req("app-misc/usekey-app", "1.0", &["gui"])).await;
    assert_eq!(s, 202, "{first}");
    let key = first["key"].as_str().unwrap().to_owned();
    // Written differently, same configuration: same key, no second job.
    let (_, again) = app.post_build(&req("app-misc/usekey-app", "1.0", &["+gui", "nls", "ssl", "-selinux"])).await;
    assert_eq!(again["key"], key.as_str());
    let (status, ready) = app.wait_done(&key, Duration::from_secs(120)).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")), "{ready}");
    assert_eq!(app.logs(&key).len(), 1, "built once");
    let bytes = app.http.get(ready["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    let pkg = tmp.path().join("app.gpkg.tar");
    std::fs::write(&pkg, &bytes).unwrap();
    let image = tar_member(&pkg, "usekey-app-1.0-1/image.tar.zst");
    let use_file = zstd_tar_member(&image, "image/usr/share/usekey-app/use", tmp.path());
    assert_eq!(use_file.split_whitespace().collect::<Vec<_>>(), ["gui", "nls", "ssl"], "installed USE");

    // usekey-lib was built as its dependency with its defaults (+cli): its
    // default configuration, however written, is a cache hit now.
    let mut lib_key = None;
    for written in [&[][..], &["cli"], &["+cli", "-doc"]] {
        let (s, b) = app.post_build(&req("app-misc/usekey-lib", "1.0", written)).await;
        assert_eq!((s, b["status"].as_str()), (200, Some("ready")), "{written:?}: {b}");
        assert!(b["use"].as_array().unwrap().contains(&json!("cli")), "{b}");
        lib_key.get_or_insert(b["key"].clone());
        assert_eq!(Some(&b["key"]), lib_key.as_ref());
    }
    let depth = app.depth().await;
    assert_eq!((depth.visible, depth.in_flight), (0, 0), "nothing queued for the dependency");
    // Another configuration of it is a different key and a new build.
    let (s, b) = app.post_build(&req("app-misc/usekey-lib", "1.0", &["doc"])).await;
    assert_eq!(s, 202, "{b}");
    assert_ne!(Some(&b["key"]), lib_key.as_ref());
    // 400 for the profile's mask and force on a real build target.
    let (s, b) = app.post_build(&req("app-misc/usekey-app", "1.0", &["selinux"])).await;
    assert_eq!((s, b["rule"].as_str()), (400, Some("use.mask")), "{b}");
    let (s, b) = app.post_build(&req("app-misc/usekey-app", "1.0", &["-ssl"])).await;
    assert_eq!((s, b["rule"].as_str()), (400, Some("use.force")), "{b}");
}

/// A Gentoo user's portage for `pacloud emerge`: a venv of its own whose
/// python imports the test venv's portage (so its EPREFIX, the "host"
/// configuration portage reads when ROOT is not /, is this scratch venv and
/// not the shared one), plus a config root and a scratch ROOT.
struct UserPortage {
    venv: PathBuf,
    config: PathBuf,
    root: PathBuf,
}

fn user_portage(dir: &Path, package_use: &str) -> UserPortage {
    let shared = venv();
    let uv = dir.join("user-venv");
    let ok = std::process::Command::new(shared.join("bin/python"))
        .args(["-m", "venv", "--without-pip"])
        .arg(&uv)
        .status()
        .expect("python -m venv");
    assert!(ok.success());
    let site = std::fs::read_dir(shared.join("lib"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("python3"))
        .expect("lib/python3.*")
        .join("site-packages");
    let py = site.parent().unwrap().file_name().unwrap().to_owned();
    std::fs::write(uv.join("lib").join(&py).join("site-packages/pacloud-portage.pth"), format!("{}\n", site.display()))
        .unwrap();
    std::os::unix::fs::symlink(shared.join("lib/portage"), uv.join("lib/portage")).unwrap();
    std::fs::create_dir_all(uv.join("share")).unwrap();
    std::os::unix::fs::symlink(shared.join("share/portage"), uv.join("share/portage")).unwrap();
    let emerge = std::fs::read_to_string(shared.join("bin/emerge")).unwrap();
    let body = emerge.split_once('\n').unwrap().1;
    std::fs::write(uv.join("bin/emerge"), format!("#!{}\n{body}", uv.join("bin/python").display())).unwrap();
    std::fs::set_permissions(uv.join("bin/emerge"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let repo = workspace().join("tests/fixtures/repo");
    let profile = repo.join("profiles/default");
    let repos_conf =
        format!("[DEFAULT]\nmain-repo = pacloud-fixtures\n\n[pacloud-fixtures]\nlocation = {}\n", repo.display());
    let make_conf = |w: &Path| {
        for d in ["pkgdir", "tmp", "distfiles", "logs"] {
            std::fs::create_dir_all(w.join(d)).unwrap();
        }
        format!(
            "FEATURES=\"-sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox -network-sandbox -pid-sandbox -news -strict -merge-sync\"\n\
             PORTAGE_USERNAME=\"root\"\nPORTAGE_GRPNAME=\"root\"\nPKGDIR=\"{w}/pkgdir\"\nPORTAGE_TMPDIR=\"{w}/tmp\"\n\
             DISTDIR=\"{w}/distfiles\"\nPORTAGE_LOGDIR=\"{w}/logs\"\nBINPKG_FORMAT=\"gpkg\"\nACCEPT_LICENSE=\"*\"\n\
             EMERGE_WARNING_DELAY=\"0\"\nCLEAN_DELAY=\"0\"\n\
             BINPKG_GPG_VERIFY_GPG_HOME=\"{gnupg}\"\nPORTAGE_TRUST_HELPER=\"true\"\n",
            w = w.display(),
            gnupg = dir.join("gnupg").display()
        )
    };
    for (etc, w, pu) in [
        (uv.join("etc/portage"), dir.join("host-work"), None),
        (dir.join("config/etc/portage"), dir.join("user-work"), Some(package_use)),
    ] {
        std::fs::create_dir_all(etc.join("repos.conf")).unwrap();
        std::fs::write(etc.join("make.conf"), make_conf(&w)).unwrap();
        std::fs::write(etc.join("repos.conf/pacloud-fixtures.conf"), &repos_conf).unwrap();
        std::os::unix::fs::symlink(&profile, etc.join("make.profile")).unwrap();
        if let Some(pu) = pu {
            std::fs::write(etc.join("package.use"), pu).unwrap();
        }
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    UserPortage { venv: uv, config: dir.join("config"), root }
}

impl UserPortage {
    /// Runs the `pacloud` binary with this user's environment.
    async fn pacloud(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pacloud"));
        cmd.args(args)
            .env_clear()
            .env("PATH", format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", self.venv.join("bin").display()))
            .env("HOME", "/tmp")
            .env("LANG", "C.UTF-8")
            .env("PORTAGE_CONFIGROOT", &self.config)
            .env("ROOT", &self.root)
            .env("SYSROOT", &self.root)
            .env("EPREFIX", "")
            .kill_on_drop(true);
        // pacloud emerge gives up on builds by itself (--timeout) well before
        // this; the whole suite runs builds in parallel on 2 cores.
        tokio::time::timeout(Duration::from_secs(1200), cmd.output())
            .await
            .expect("pacloud emerge finishes within 1200 s")
            .expect("pacloud runs")
    }
}

// The user's portage verifies signatures (portage's default): its keyring
// trusts the key the server publishes, the way the README tells users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacloud_emerge_builds_the_merge_list_and_portage_installs_it() {
    let app = spawn_builder_with(fixtures_v2).await;
    let tmp = tempfile::tempdir().unwrap();
    // The user's configuration: package.use for both packages of the chain.
    let user = user_portage(tmp.path(), "app-misc/usekey-app gui\napp-misc/usekey-lib doc\n");
    let key = app.http.get(app.url("/v1/signing-key.asc")).send().await.unwrap().text().await.unwrap();
    let (_, targets) = decode(app.http.get(app.url("/v1/targets")).send().await.unwrap()).await;
    let fingerprint = targets["signing_key"]["fingerprint"].as_str().expect("the server signs").to_owned();
    trust_key(&tmp.path().join("gnupg"), &key, &fingerprint);
    // Wait until the target's tree index is there (a refused request: no job).
    let (s, b) = post_when_indexed(&app, &req("app-misc/usekey-lib", "1.0", &["no-such-flag"])).await;
    assert_eq!(s, 400, "{b}");

    // emerge rejects the arguments: its own message and status, nothing requested.
    let out = user.pacloud(&["emerge", "--server", &app.base, "--", "--bogus-option", "app-misc/usekey-app"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unrecognized arguments: --bogus-option"), "{stderr}");
    let out = user.pacloud(&["emerge", "--server", &app.base, "--", "app-misc/no-such-package"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("there are no ebuilds to satisfy"), "{out:?}");
    assert_eq!(app.depth().await.visible, 0, "nothing requested");

    // --pretend shows what it would request, with each package's USE.
    let out = user.pacloud(&["emerge", "--server", &app.base, "--pretend", "--", "app-misc/usekey-app"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("would request app-misc/usekey-lib-1.0 USE=\"cli doc\""), "{stdout}");
    assert!(stdout.contains("would request app-misc/usekey-app-1.0 USE=\"gui nls ssl -selinux\""), "{stdout}");
    assert_eq!(app.depth().await.visible, 0, "--pretend requests nothing");

    // The real thing: builds on the server, then portage installs binaries.
    let out = user
        .pacloud(&[
            "emerge",
            "--server",
            &app.base,
            "--target",
            "fixtures",
            "--timeout",
            "900",
            "--",
            "app-misc/usekey-app",
        ])
        .await;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let (_, lib) = app.post_build(&req("app-misc/usekey-lib", "1.0", &["doc"])).await;
        let (_, appb) = app.post_build(&req("app-misc/usekey-app", "1.0", &["gui"])).await;
        let depth = app.depth().await;
        panic!("pacloud emerge failed:\n{stdout}\n{stderr}\nserver: lib {lib}\napp {appb}\nqueue {depth:?}");
    }
    assert!(stderr.contains("app-misc/usekey-app-1.0") && stderr.contains("ready"), "progress lines: {stderr}");
    let read =
        |p: &str| std::fs::read_to_string(user.root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}\n{stdout}\n{stderr}"));
    assert_eq!(read("usr/share/usekey-app/use").split_whitespace().collect::<Vec<_>>(), ["gui", "nls", "ssl"]);
    assert_eq!(read("usr/share/usekey-lib/use").split_whitespace().collect::<Vec<_>>(), ["cli", "doc"]);
    // Installed from the server's binaries, not built locally.
    for pkg in ["usekey-app-1.0", "usekey-lib-1.0"] {
        let vdb = user.root.join("var/db/pkg/app-misc").join(pkg);
        assert!(vdb.join("BUILD_ID").is_file(), "{pkg} was installed from a binary package ({})", vdb.display());
    }
    assert!(stdout.contains("Emerging binary") || stdout.contains("binary"), "{stdout}");
    // Each configuration was built once on the server, under its key.
    let (s, lib) = app.post_build(&req("app-misc/usekey-lib", "1.0", &["cli", "doc"])).await;
    assert_eq!((s, lib["status"].as_str()), (200, Some("ready")), "{lib}");
    let (s, appb) = app.post_build(&req("app-misc/usekey-app", "1.0", &["gui"])).await;
    assert_eq!((s, appb["status"].as_str()), (200, Some("ready")), "{appb}");
    assert_eq!(app.logs(appb["key"].as_str().unwrap()).len(), 1);
}
