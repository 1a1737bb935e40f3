//! Portage's own verifier (`gpkg._verify_binpkg`, portage 3.0.83 from the
//! test venv) and real gpg (Debian `gnupg`) on packages signed by this
//! crate: a package portage wrote with `gpkg.compress` is signed, then
//! accepted with a keyring that trusts only our key (ultimately, the way
//! getuto trusts its local key); a changed byte, another key and no
//! signature at all are refused.

use pacloud_sign::{Signer, sign_gpkg};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn python() -> PathBuf {
    let p = workspace().join(".venv/bin/python");
    assert!(p.is_file(), "{} missing: run scripts/test.sh to create the test venv", p.display());
    p
}

fn oracle(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(workspace().join("tests/oracle/gpkg_oracle.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "gpkg_oracle {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A client keyring as `/etc/portage/gnupg`: our key imported, trusted
/// ultimately, readable by `nobody` (portage runs gpg as nobody).
fn keyring(dir: &Path, signer: &Signer) -> PathBuf {
    let home = dir.join("gnupg");
    std::fs::create_dir_all(&home).unwrap();
    let asc = dir.join("key.asc");
    std::fs::write(&asc, signer.public_key_armored().unwrap()).unwrap();
    let gpg = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new("gpg")
            .arg("--homedir")
            .arg(&home)
            .args(["--batch", "--no-tty"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gpg runs (Debian gnupg; scripts/test.sh installs it)");
        child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "gpg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    gpg(&["--import", asc.to_str().unwrap()], None);
    gpg(&["--import-ownertrust"], Some(&format!("{}:6:\n", signer.fingerprint())));
    gpg(&["--check-trustdb"], None);
    let _ = Command::new("gpgconf").arg("--homedir").arg(&home).args(["--kill", "all"]).status();
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status();
    home
}

#[test]
fn portage_accepts_our_signature_and_refuses_tampered_foreign_and_unsigned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = workspace().join("tests/fixtures/repo");
    let repo = repo.to_str().unwrap();
    let unsigned = dir.join("unsigned.gpkg.tar");
    assert_eq!(oracle(&["make", repo, unsigned.to_str().unwrap()]), "OK");

    let ours = Signer::ephemeral("pacloud test key").unwrap();
    let home = keyring(dir, &ours);
    let home = home.to_str().unwrap();
    let verify = |p: &Path| oracle(&["verify", repo, home, p.to_str().unwrap()]);

    let signed = dir.join("signed.gpkg.tar");
    let digests = sign_gpkg(&ours, &unsigned, &signed).unwrap();
    assert_eq!(digests.size, std::fs::metadata(&signed).unwrap().len());
    assert_eq!(verify(&signed), "OK");

    // No signature: portage's default (request-signature) refuses.
    let v = verify(&unsigned);
    assert!(v.starts_with("REFUSED InvalidSignature"), "unsigned accepted: {v}");

    // Another key (not in the keyring).
    let foreign = dir.join("foreign.gpkg.tar");
    sign_gpkg(&Signer::ephemeral("someone else").unwrap(), &unsigned, &foreign).unwrap();
    let v = verify(&foreign);
    assert!(v.starts_with("REFUSED InvalidSignature"), "foreign key accepted: {v}");

    // One byte changed inside the image archive (found by its zstd magic
    // after the metadata signature).
    let mut bytes = std::fs::read(&signed).unwrap();
    let image_at = find(&bytes, b"image.tar.zst\0").expect("image member header");
    let data_at = image_at + 512;
    bytes[data_at + 10] ^= 0x01;
    let tampered = dir.join("tampered.gpkg.tar");
    std::fs::write(&tampered, &bytes).unwrap();
    let v = verify(&tampered);
    assert!(v.starts_with("REFUSED InvalidSignature"), "tampered accepted: {v}");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // The member header starts 512-aligned; the name is at its start after
    // the top directory.
    hay.windows(needle.len()).position(|w| w == needle).map(|p| p / 512 * 512)
}
