//! The binhost as a Gentoo client uses it, end to end on real parts: pacloud
//! builds (real emerge in bubblewrap) and signs a chain and two USE variants
//! of one version; a real portage 3.0.83 client (`emerge --getbinpkgonly
//! --binpkg-respect-use=y`, the default `verify-signature = true`, a
//! keyring that trusts only the key from `GET /v1/signing-key.asc`)
//! installs them into a scratch ROOT, picking the instance whose USE
//! matches; a tampered package, one signed by another key and an unsigned
//! one (with the index rewritten to match, as a hostile mirror would) are
//! refused by portage.
//!
//! The client runs in bubblewrap only to keep portage from writing into the
//! host and the test venv; it keeps root's capabilities (portage drops to
//! nobody to run gpg) and the host network (the server is on loopback).

use crate::helpers::*;
use pacloud_worker::pkgindex;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Client {
    dir: PathBuf,
}

impl Client {
    /// A client configuration root: make.conf, one binrepos.conf file,
    /// package.use, and `gnupg` holding the imported, ultimately trusted key.
    fn new(base: &Path, name: &str, binhost: &str, key_asc: &str, fingerprint: &str) -> Client {
        let dir = base.join(name);
        let portage = dir.join("config/etc/portage");
        for d in ["root", "pkgdir", "tmp", "distfiles", "gnupg"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::create_dir_all(portage.join("binrepos.conf")).unwrap();
        std::os::unix::fs::symlink(
            workspace().join("tests/fixtures/repo/profiles/default"),
            portage.join("make.profile"),
        )
        .unwrap();
        let d = dir.display();
        std::fs::write(
            portage.join("make.conf"),
            format!(
                "FEATURES=\"-sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox -network-sandbox -pid-sandbox -news -merge-sync binpkg-multi-instance\"\n\
                 PORTAGE_USERNAME=\"root\"\nPORTAGE_GRPNAME=\"root\"\nPKGDIR=\"{d}/pkgdir\"\nPORTAGE_TMPDIR=\"{d}/tmp\"\n\
                 DISTDIR=\"{d}/distfiles\"\nACCEPT_LICENSE=\"*\"\nEMERGE_WARNING_DELAY=\"0\"\nCLEAN_DELAY=\"0\"\n\
                 BINPKG_GPG_VERIFY_GPG_HOME=\"{d}/gnupg\"\nPORTAGE_TRUST_HELPER=\"true\"\n"
            ),
        )
        .unwrap();
        // What the README tells users to write (verify-signature stays at
        // portage's default, true).
        std::fs::write(portage.join("binrepos.conf/pacloud.conf"), format!("[pacloud]\nsync-uri = {binhost}\n"))
            .unwrap();
        std::fs::write(portage.join("package.use"), "app-misc/hello foo -bar\n").unwrap();
        // The getuto way: import, trust ultimately, readable by nobody.
        trust_key(&dir.join("gnupg"), key_asc, fingerprint);
        assert!(Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status().unwrap().success());
        Client { dir }
    }

    /// `emerge --getbinpkgonly --binpkg-respect-use=y <atoms>` into the
    /// scratch ROOT; returns (success, combined output).
    fn emerge(&self, atoms: &[&str]) -> (bool, String) {
        // Portage's host configuration (the venv prefix): the same client configuration.
        let config = self.dir.join("config/etc/portage");
        let repo = workspace().join("tests/fixtures/repo");
        client_emerge(&self.dir, &config, ("pacloud-fixtures", &repo), &["--quiet-build"], atoms)
    }
}

/// Replaces the published `rel` with `bytes` and rewrites its `Packages`
/// entry to match (what a hostile mirror serves).
fn replace_published(app: &TestApp, rel: &str, bytes: &[u8]) {
    let root = app.dir.path().join("data/artifacts/fixtures");
    std::fs::write(root.join(rel), bytes).unwrap();
    let index_path = root.join("Packages");
    let mut index = pkgindex::parse(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    use sha2::Digest;
    for e in index.packages.iter_mut().filter(|e| e.path() == Some(rel)) {
        e.fields.insert("SIZE".into(), bytes.len().to_string());
        e.fields.insert("MD5".into(), hex::encode(md5::Md5::digest(bytes)));
        e.fields.insert("SHA1".into(), hex::encode(sha1::Sha1::digest(bytes)));
    }
    std::fs::write(&index_path, index.render().unwrap()).unwrap();
    let _ = std::fs::remove_file(root.join("Packages.gz"));
}

fn installed(client: &Client, rel: &str) -> bool {
    client.dir.join("root").join(rel).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portage_installs_signed_packages_and_refuses_tampered_foreign_and_unsigned() {
    let app = spawn_builder().await;
    // Two USE variants of one version (the -foo one is newer) and a chain.
    let (_, with_foo) = app.build(&json!({"atom": "app-misc/hello", "version": "2.12-r1", "use": ["foo"]})).await;
    assert_eq!(with_foo["status"], "ready", "{with_foo}");
    let (_, without) = app.build(&json!({"atom": "app-misc/hello", "version": "2.12-r1", "use": ["-foo"]})).await;
    assert_eq!(without["status"], "ready", "{without}");
    let (_, chain) = app.build(&json!({"atom": "app-misc/uses-libfoo", "version": "1.0", "use": []})).await;
    assert_eq!(chain["status"], "ready", "{chain}");

    // The published key, and its fingerprint in /v1/targets.
    let resp = app.http.get(app.url("/v1/signing-key.asc")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/pgp-keys");
    let key_asc = resp.text().await.unwrap();
    assert!(key_asc.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"), "{key_asc}");
    let targets: serde_json::Value = app.http.get(app.url("/v1/targets")).send().await.unwrap().json().await.unwrap();
    let fingerprint = targets["signing_key"]["fingerprint"].as_str().expect("fingerprint").to_owned();
    assert_eq!(fingerprint, app.app.signer.as_ref().unwrap().fingerprint());
    assert_eq!(targets["signing_key"]["url"], "/v1/signing-key.asc");

    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let binhost = app.url("/binhost/fixtures");

    let good = Client::new(tmp.path(), "good", &binhost, &key_asc, &fingerprint);
    let (ok, out) = good.emerge(&["=app-misc/hello-2.12-r1", "app-misc/uses-libfoo"]);
    assert!(ok, "the signed chain did not install:\n{out}");
    assert!(out.contains(">>> Emerging binary"), "{out}");
    assert!(installed(&good, "usr/share/hello/foo-enabled"), "the USE=foo instance was not picked:\n{out}");
    assert!(installed(&good, "var/db/pkg/dev-libs/libfoo-1.0"), "{out}");
    assert!(installed(&good, "var/db/pkg/app-misc/uses-libfoo-1.0"), "{out}");

    // A hostile mirror: each case serves libfoo with a matching index entry.
    let rel = "dev-libs/libfoo/libfoo-1.0-1.gpkg.tar";
    let path = app.dir.path().join("data/artifacts/fixtures").join(rel);
    let original = std::fs::read(&path).unwrap();

    // 1. One byte changed inside the image archive.
    let mut tampered = original.clone();
    let image = tampered.windows(14).position(|w| w == b"image.tar.zst\0").unwrap() / 512 * 512 + 512;
    tampered[image + 20] ^= 0x01;
    // 2. Signed by another key.
    let foreign_signer = pacloud_sign::Signer::ephemeral("mallory").unwrap();
    let foreign_path = tmp.path().join("foreign.gpkg.tar");
    pacloud_sign::sign_gpkg(&foreign_signer, &path, &foreign_path).unwrap();
    let foreign = std::fs::read(&foreign_path).unwrap();
    // 3. Unsigned: the same package built by a pacloud with signing off.
    let unsigned_app = spawn_builder_with(|s| s.sign_packages = false).await;
    let (_, dep) = unsigned_app.build(&json!({"atom": "dev-libs/libfoo", "version": "1.0", "use": []})).await;
    assert_eq!(dep["status"], "ready", "{dep}");
    let unsigned = std::fs::read(unsigned_app.dir.path().join("data/artifacts/fixtures").join(rel)).unwrap();
    assert!(!unsigned.windows(4).any(|w| w == b".sig"), "signing off publishes unsigned packages");
    let resp = unsigned_app.http.get(unsigned_app.url("/v1/signing-key.asc")).send().await.unwrap();
    assert_eq!(resp.status(), 404);

    for (name, bytes) in [("tampered", &tampered), ("foreign", &foreign), ("unsigned", &unsigned)] {
        replace_published(&app, rel, bytes);
        let client = Client::new(tmp.path(), name, &binhost, &key_asc, &fingerprint);
        let (ok, out) = client.emerge(&["dev-libs/libfoo"]);
        assert!(!ok, "portage installed the {name} package:\n{out}");
        assert!(out.contains("verification failed"), "{name}: refused for another reason:\n{out}");
        assert!(!installed(&client, "var/db/pkg/dev-libs/libfoo-1.0"), "{name} installed:\n{out}");
    }
    // And the genuine package installs again from the same binhost.
    replace_published(&app, rel, &original);
    let client = Client::new(tmp.path(), "again", &binhost, &key_asc, &fingerprint);
    let (ok, out) = client.emerge(&["dev-libs/libfoo"]);
    assert!(ok, "{out}");
}
