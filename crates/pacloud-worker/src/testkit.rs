//! Synthetic PKGDIRs for tests and benchmarks of seeding and publishing:
//! package files of a given size and a portage-format `Packages` index
//! listing them (SIZE, SHA1, MTIME, PATH, BUILD_ID) — what a build leaves
//! behind, without running portage.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::pkgindex::{PackageEntry, PackageIndex};

/// The fixed MTIME of synthetic packages.
pub const MTIME: u64 = 1_700_000_000;

/// One synthetic package entry (and its file under `pkgdir`), named
/// `app-misc/<name>-1.0-<build_id>.gpkg.tar`, `size` bytes derived from the name.
pub fn package(pkgdir: &Path, name: &str, build_id: u64, size: usize) -> std::io::Result<PackageEntry> {
    use sha1::Digest;
    let rel = format!("app-misc/{name}/{name}-1.0-{build_id}.gpkg.tar");
    let seed = name.bytes().fold(build_id as u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let bytes: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
    let file = pkgdir.join(&rel);
    std::fs::create_dir_all(file.parent().unwrap_or(pkgdir))?;
    std::fs::write(&file, &bytes)?;
    std::fs::File::options()
        .write(true)
        .open(&file)?
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(MTIME))?;
    let mut e = PackageEntry::default();
    for (k, v) in [
        ("CPV", format!("app-misc/{name}-1.0")),
        ("BUILD_ID", build_id.to_string()),
        ("PATH", rel),
        ("SIZE", size.to_string()),
        ("SHA1", hex::encode(sha1::Sha1::digest(&bytes))),
        ("MTIME", MTIME.to_string()),
        ("EAPI", "8".into()),
        ("SLOT", "0".into()),
        ("REPO", "pacloud-fixtures".into()),
        ("USE", "amd64".into()),
    ] {
        e.fields.insert(k.to_owned(), v);
    }
    Ok(e)
}

/// The header of synthetic indexes.
pub fn header() -> std::collections::BTreeMap<String, String> {
    [("ARCH", "amd64"), ("CHOST", "x86_64-pc-linux-gnu"), ("REPO", "pacloud-fixtures"), ("VERSION", "0")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Writes `pkgdir/Packages` listing `entries`.
pub fn write_index(pkgdir: &Path, entries: Vec<PackageEntry>) -> std::io::Result<()> {
    let mut index = PackageIndex { header: header(), packages: entries };
    index.set_timestamp(MTIME);
    let text = index.render().map_err(std::io::Error::other)?;
    std::fs::write(pkgdir.join("Packages"), text)
}
