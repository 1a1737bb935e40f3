//! Build-root preparation of a real-tree target on a host that is not Gentoo
//! (docs/real-gentoo.md; the recipe of ../shared/gentoo-subset/README.md,
//! done here in Rust): the host configuration's `package.provided`, the
//! target root's, minimal installed-package records so `has_version` sees
//! the host's tools, the host tools Gentoo's eclasses call (with `@BROOT@`
//! replaced) and the links eclasses expect.
//!
//! [`digest`] hashes the *contents* of these inputs (never their paths); the
//! settings loader puts it into the target's hashed spec, so editing
//! `package.provided` moves the target to new keys. [`prepare`] builds the
//! tree once per worker, build root and digest, atomically (a temporary
//! directory renamed into place), and reuses it afterwards.
//!
//! Layout of a prepared directory `D`:
//! - `D/prefix/…`: laid over the build root (the venv prefix for bwrap):
//!   host tools and links (`lib/gentoo`, `usr/share/elt-patches`, …);
//! - `D/host-profile/package.provided`: the host configuration's
//!   `etc/portage/profile`;
//! - `D/vdb/<cat>/<pf>/…`: the host's `var/db/pkg`;
//! - `D/target-package.provided`: the target root's `package.provided`.

use pacloud_domain::target::BuildRootSpec;
use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};

/// Why a build root cannot be hashed or prepared.
#[derive(Debug, thiserror::Error)]
pub enum BuildRootError {
    #[error("build root input {path} cannot be read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the build root at {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("build_root.vdb entry {0:?} must be category/name-version:slot")]
    BadVdb(String),
    #[error("build_root.links key {0:?} must be a relative path without ..")]
    BadLink(String),
}

fn read(path: &Path) -> Result<Vec<u8>, BuildRootError> {
    std::fs::read(path).map_err(|source| BuildRootError::Read { path: path.to_owned(), source })
}

/// One entry of a host-tools tree, in sorted order.
enum Entry {
    Dir(String),
    File(String, PathBuf, bool),
    Link(String, PathBuf),
}

fn walk(root: &Path) -> Result<Vec<Entry>, BuildRootError> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> Result<(), BuildRootError> {
        let rd = |source| BuildRootError::Read { path: dir.to_owned(), source };
        let mut names: Vec<_> = std::fs::read_dir(dir).map_err(rd)?.collect::<Result<_, _>>().map_err(rd)?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|source| BuildRootError::Read { path: path.clone(), source })?;
            if meta.file_type().is_symlink() {
                let target =
                    std::fs::read_link(&path).map_err(|source| BuildRootError::Read { path: path.clone(), source })?;
                out.push(Entry::Link(rel, target));
            } else if meta.is_dir() {
                out.push(Entry::Dir(rel));
                go(root, &path, out)?;
            } else {
                use std::os::unix::fs::PermissionsExt;
                out.push(Entry::File(rel, path, meta.permissions().mode() & 0o111 != 0));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(root, root, &mut out)?;
    Ok(out)
}

/// A checked `cat/pf:slot`.
fn vdb_entry(spec: &str) -> Result<(&str, &str, &str), BuildRootError> {
    let bad = || BuildRootError::BadVdb(spec.to_owned());
    let (cpf, slot) = spec.split_once(':').ok_or_else(bad)?;
    let (cat, pf) = cpf.split_once('/').ok_or_else(bad)?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
    };
    if !(ok(cat) && ok(pf) && ok(slot.replace('/', "_").as_str())) {
        return Err(bad());
    }
    Ok((cat, pf, slot))
}

fn link_path(rel: &str) -> Result<PathBuf, BuildRootError> {
    let p = PathBuf::from(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(BuildRootError::BadLink(rel.to_owned()));
    }
    Ok(p)
}

/// SHA-256 (hex) of the contents of a build root's inputs: the target's
/// hash covers it, so changing any of them moves the target to new keys.
pub fn digest(spec: &BuildRootSpec) -> Result<String, BuildRootError> {
    let mut h = Sha256::new();
    let blob = |h: &mut Sha256, tag: &str, bytes: &[u8]| {
        h.update(format!("{tag} {}\n", bytes.len()).as_bytes());
        h.update(bytes);
        h.update(b"\n");
    };
    h.update(b"pacloud-build-root-v1\n");
    blob(&mut h, "provided-host", &read(&spec.package_provided_host)?);
    if let Some(p) = &spec.package_provided_target {
        blob(&mut h, "provided-target", &read(p)?);
    }
    for v in &spec.vdb {
        vdb_entry(v)?;
        blob(&mut h, "vdb", v.as_bytes());
    }
    if let Some(tools) = &spec.host_tools {
        for e in walk(tools)? {
            match e {
                Entry::Dir(rel) => blob(&mut h, "dir", rel.as_bytes()),
                Entry::File(rel, path, exec) => {
                    blob(&mut h, if exec { "exec" } else { "file" }, rel.as_bytes());
                    blob(&mut h, "content", &read(&path)?);
                }
                Entry::Link(rel, target) => {
                    blob(&mut h, "symlink", rel.as_bytes());
                    blob(&mut h, "to", target.to_string_lossy().as_bytes());
                }
            }
        }
    }
    for (k, v) in &spec.links {
        link_path(k)?;
        blob(&mut h, "link", k.as_bytes());
        blob(&mut h, "to", v.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// The directory [`prepare`] makes under `parent` for this spec and build root.
pub fn prepared_dir(spec: &BuildRootSpec, broot: &Path, parent: &Path) -> PathBuf {
    let mut h = Sha256::new();
    h.update(spec.digest.as_bytes());
    h.update(b"\n");
    h.update(broot.as_os_str().as_encoded_bytes());
    parent.join(&hex::encode(h.finalize())[..32])
}

/// Prepares (or reuses) the build root of `spec` for the build root path
/// `broot` (what `@BROOT@` becomes) under `parent`; returns its directory.
pub fn prepare(spec: &BuildRootSpec, broot: &Path, parent: &Path) -> Result<PathBuf, BuildRootError> {
    let dest = prepared_dir(spec, broot, parent);
    if dest.is_dir() {
        return Ok(dest);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = parent.join(format!(".tmp-{}-{nanos}", std::process::id()));
    let result = fill(spec, broot, &tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(source) = std::fs::rename(&tmp, &dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another worker slot won the race: its tree is the same.
        if !dest.is_dir() {
            return Err(BuildRootError::Write { path: dest, source });
        }
    }
    Ok(dest)
}

fn fill(spec: &BuildRootSpec, broot: &Path, d: &Path) -> Result<(), BuildRootError> {
    let w = |path: &Path| {
        let path = path.to_owned();
        move |source| BuildRootError::Write { path, source }
    };
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(w(p));
    let write = |p: &Path, bytes: &[u8]| std::fs::write(p, bytes).map_err(w(p));
    for sub in ["prefix", "host-profile", "vdb"] {
        mkdir(&d.join(sub))?;
    }
    write(&d.join("host-profile/package.provided"), &read(&spec.package_provided_host)?)?;
    let target = match &spec.package_provided_target {
        Some(p) => read(p)?,
        None => Vec::new(),
    };
    write(&d.join("target-package.provided"), &target)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    for (i, v) in spec.vdb.iter().enumerate() {
        // What host-config/inject-vdb.py writes: enough for has_version,
        // best_version and the depgraph.
        let (cat, pf, slot) = vdb_entry(v)?;
        let dir = d.join("vdb").join(cat).join(pf);
        mkdir(&dir)?;
        let counter = (i + 1).to_string();
        let files: [(&str, &str); 20] = [
            ("CATEGORY", cat),
            ("PF", pf),
            ("SLOT", slot),
            ("EAPI", "8"),
            ("COUNTER", &counter),
            ("CONTENTS", ""),
            ("repository", "host"),
            ("USE", ""),
            ("IUSE", ""),
            ("KEYWORDS", "amd64"),
            ("BUILD_TIME", &now),
            ("DEFINED_PHASES", ""),
            ("RDEPEND", ""),
            ("DEPEND", ""),
            ("BDEPEND", ""),
            ("PDEPEND", ""),
            ("IDEPEND", ""),
            ("LICENSE", ""),
            ("CHOST", "x86_64-pc-linux-gnu"),
            ("SIZE", "0"),
        ];
        for (k, v) in files {
            let text = if v.is_empty() { String::new() } else { format!("{v}\n") };
            write(&dir.join(k), text.as_bytes())?;
        }
    }
    let prefix = d.join("prefix");
    if let Some(tools) = &spec.host_tools {
        let broot_s = broot.to_string_lossy();
        for e in walk(tools)? {
            match e {
                Entry::Dir(rel) => mkdir(&prefix.join(rel))?,
                Entry::File(rel, path, exec) => {
                    let bytes = read(&path)?;
                    let bytes = match std::str::from_utf8(&bytes) {
                        Ok(text) if text.contains("@BROOT@") => text.replace("@BROOT@", &broot_s).into_bytes(),
                        _ => bytes,
                    };
                    let out = prefix.join(rel);
                    write(&out, &bytes)?;
                    if exec {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).map_err(w(&out))?;
                    }
                }
                Entry::Link(rel, target) => {
                    let out = prefix.join(rel);
                    std::os::unix::fs::symlink(&target, &out).map_err(w(&out))?;
                }
            }
        }
    }
    for (k, v) in &spec.links {
        let out = prefix.join(link_path(k)?);
        if let Some(parent) = out.parent() {
            mkdir(parent)?;
        }
        let _ = std::fs::remove_file(&out);
        std::os::unix::fs::symlink(v, &out).map_err(w(&out))?;
    }
    // Readable by an unprivileged build uid.
    chmod_readable(d).map_err(w(d))?;
    Ok(())
}

fn chmod_readable(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(p)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    let want = if meta.is_dir() { mode | 0o755 } else { mode | 0o444 };
    if want != mode {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(want))?;
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(p)? {
            chmod_readable(&e?.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec(dir: &Path) -> BuildRootSpec {
        std::fs::write(dir.join("host"), "sys-devel/gcc-12.2.0\n").unwrap();
        std::fs::write(dir.join("target"), "sys-libs/glibc-2.36\n").unwrap();
        std::fs::create_dir_all(dir.join("tools/usr/bin")).unwrap();
        std::fs::write(dir.join("tools/usr/bin/eltpatch"), "#!/bin/sh\n. @BROOT@/lib/x\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("tools/usr/bin/eltpatch"), std::fs::Permissions::from_mode(0o755)).unwrap();
        BuildRootSpec {
            package_provided_host: dir.join("host"),
            package_provided_target: Some(dir.join("target")),
            vdb: vec!["dev-build/automake-1.18.1:1.18".into()],
            host_tools: Some(dir.join("tools")),
            links: BTreeMap::from([("usr/bin/gtar".to_owned(), "/bin/tar".to_owned())]),
            digest: String::new(),
        }
    }

    #[test]
    fn digest_follows_contents_and_prepare_lays_out_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        let d1 = digest(&s).unwrap();
        std::fs::write(dir.path().join("host"), "sys-devel/gcc-13.2.0\n").unwrap();
        let d2 = digest(&s).unwrap();
        assert_ne!(d1, d2, "package.provided is hashed");
        std::fs::write(dir.path().join("tools/usr/bin/eltpatch"), "#!/bin/sh\n").unwrap();
        assert_ne!(digest(&s).unwrap(), d2, "host tools are hashed");
        let mut moved = s.clone();
        std::fs::copy(dir.path().join("host"), dir.path().join("host2")).unwrap();
        moved.package_provided_host = dir.path().join("host2");
        assert_eq!(digest(&moved).unwrap(), digest(&s).unwrap(), "paths are not hashed");
        std::fs::write(dir.path().join("tools/usr/bin/eltpatch"), "#!/bin/sh\n. @BROOT@/lib/x\n").unwrap();
        s.digest = digest(&s).unwrap();
        let parent = dir.path().join("roots");
        std::fs::create_dir_all(&parent).unwrap();
        let d = prepare(&s, Path::new("/opt/venv"), &parent).unwrap();
        assert_eq!(prepare(&s, Path::new("/opt/venv"), &parent).unwrap(), d, "prepared once, reused");
        assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 1, "no temporary left");
        let elt = std::fs::read_to_string(d.join("prefix/usr/bin/eltpatch")).unwrap();
        assert!(elt.contains(". /opt/venv/lib/x"), "{elt}");
        assert_eq!(std::fs::read_link(d.join("prefix/usr/bin/gtar")).unwrap(), Path::new("/bin/tar"));
        assert_eq!(std::fs::read_to_string(d.join("host-profile/package.provided")).unwrap(), "sys-devel/gcc-13.2.0\n");
        assert_eq!(std::fs::read_to_string(d.join("target-package.provided")).unwrap(), "sys-libs/glibc-2.36\n");
        assert_eq!(std::fs::read_to_string(d.join("vdb/dev-build/automake-1.18.1/SLOT")).unwrap(), "1.18\n");
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.vdb = vec!["../../etc:1".into()];
        assert!(matches!(digest(&s), Err(BuildRootError::BadVdb(_))));
        s.vdb.clear();
        s.links = BTreeMap::from([("../x".to_owned(), "/".to_owned())]);
        assert!(matches!(digest(&s), Err(BuildRootError::BadLink(_))));
        s.links.clear();
        s.package_provided_host = dir.path().join("missing");
        let e = digest(&s).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
