//! Rewriting a GPKG container into a signed one (GLEP 78 as portage 3.0.83
//! verifies it in `gpkg._verify_binpkg` and `gpkg.get_metadata_url`).
//!
//! The output holds, under the package's one top directory and in this
//! order: `gpkg-1`, `metadata.tar.<c>`, `metadata.tar.<c>.sig`,
//! `image.tar.<c>`, `image.tar.<c>.sig`, `Manifest`. The order matters:
//! portage fetches only the head of a remote package and checks the
//! metadata signature only when it directly follows the metadata archive.
//! Existing `.sig` members and `Manifest` are dropped and made anew (so
//! re-signing with another key works); any other member is refused.
//!
//! Archives are copied byte for byte from the input; signatures and
//! digests are computed while streaming (a 500 MB image is never held in
//! memory).

use blake2::Blake2b512;
use sha2::{Digest, Sha512};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::{SignError, Signer, io_err};

/// What a `Packages` entry records about the signed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageDigests {
    /// `SIZE`
    pub size: u64,
    /// `MD5`, lower-case hex.
    pub md5: String,
    /// `SHA1`, lower-case hex.
    pub sha1: String,
    /// SHA-256, lower-case hex (the artifact store's checksum).
    pub sha256: String,
}

struct Member {
    /// The name under the top directory (`gpkg-1`, `metadata.tar.zst`, ...).
    base: String,
    header: tar::Header,
    pos: u64,
    size: u64,
}

/// One Manifest line's digests.
struct Digests {
    size: u64,
    blake2b: String,
    sha512: String,
}

impl Digests {
    fn of(bytes: &[u8]) -> Digests {
        Digests {
            size: bytes.len() as u64,
            blake2b: hex::encode(Blake2b512::digest(bytes)),
            sha512: hex::encode(Sha512::digest(bytes)),
        }
    }
}

/// A reader that hashes what passes through it.
struct Tee<R> {
    inner: R,
    blake2b: Blake2b512,
    sha512: Sha512,
    n: u64,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.blake2b.update(&buf[..n]);
        self.sha512.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

/// A writer that hashes what passes through it (the digests of the whole
/// output file, for the `Packages` entry).
struct HashingWriter<W> {
    inner: W,
    md5: md5::Md5,
    sha1: sha1::Sha1,
    sha256: sha2::Sha256,
    n: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.md5.update(&buf[..n]);
        self.sha1.update(&buf[..n]);
        self.sha256.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn format_err(msg: impl Into<String>) -> SignError {
    SignError::Format(msg.into())
}

/// Lists the container's members; checks the one-directory layout.
fn read_members(src: &Path) -> Result<(String, Vec<Member>), SignError> {
    let file = File::open(src).map_err(io_err(src))?;
    let mut archive = tar::Archive::new(file);
    let mut prefix: Option<String> = None;
    let mut members = Vec::new();
    for entry in archive.entries_with_seek().map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let name = entry.path().map_err(io_err(src))?.to_string_lossy().into_owned();
        let (dir, base) =
            name.split_once('/').ok_or_else(|| format_err(format!("member {name:?} is not in a directory")))?;
        if dir.is_empty() || base.is_empty() || base.contains('/') {
            return Err(format_err(format!("member {name:?} is not at depth one")));
        }
        match &prefix {
            None => prefix = Some(dir.to_owned()),
            Some(p) if p != dir => return Err(format_err(format!("members in two directories: {p:?} and {dir:?}"))),
            Some(_) => {}
        }
        if !entry.header().entry_type().is_file() {
            return Err(format_err(format!("member {name:?} is not a regular file")));
        }
        if members.iter().any(|m: &Member| m.base == base) {
            return Err(format_err(format!("duplicate member {name:?}")));
        }
        members.push(Member {
            base: base.to_owned(),
            header: entry.header().clone(),
            pos: entry.raw_file_position(),
            size: entry.size(),
        });
    }
    let prefix = prefix.ok_or_else(|| format_err("empty container"))?;
    Ok((prefix, members))
}

fn region(src: &Path, m: &Member) -> Result<impl Read, SignError> {
    let mut f = File::open(src).map_err(io_err(src))?;
    f.seek(SeekFrom::Start(m.pos)).map_err(io_err(src))?;
    Ok(std::io::BufReader::with_capacity(256 * 1024, f.take(m.size)))
}

fn manifest_line(name: &str, d: &Digests) -> String {
    format!("DATA {name} {} BLAKE2B {} SHA512 {}\n", d.size, d.blake2b, d.sha512)
}

/// Writes a signed copy of the GPKG `src` to `dst` (which must not be
/// `src`) and returns the digests of `dst`.
pub fn sign_gpkg(signer: &Signer, src: &Path, dst: &Path) -> Result<PackageDigests, SignError> {
    let (prefix, members) = read_members(src)?;
    let find = |pred: &dyn Fn(&str) -> bool, what: &str| -> Result<&Member, SignError> {
        let mut it = members.iter().filter(|m| pred(&m.base));
        let first = it.next().ok_or_else(|| format_err(format!("no {what} member")))?;
        if it.next().is_some() {
            return Err(format_err(format!("more than one {what} member")));
        }
        Ok(first)
    };
    let is_archive = |kind: &str, b: &str| b.starts_with(&format!("{kind}.tar")) && !b.ends_with(".sig");
    let version = find(&|b| b == "gpkg-1", "gpkg-1")?;
    let metadata = find(&|b| is_archive("metadata", b), "metadata.tar")?;
    let image = find(&|b| is_archive("image", b), "image.tar")?;
    for m in &members {
        let known = [&version.base, &metadata.base, &image.base].contains(&&m.base);
        if !known && m.base != "Manifest" && !m.base.ends_with(".sig") {
            return Err(format_err(format!("unexpected member {prefix}/{}", m.base)));
        }
    }

    // Sign and hash each archive in one pass over it.
    let mut manifest = String::new();
    let mut sigs = Vec::new();
    let mut version_bytes = Vec::new();
    region(src, version)?.read_to_end(&mut version_bytes).map_err(io_err(src))?;
    manifest.push_str(&manifest_line("gpkg-1", &Digests::of(&version_bytes)));
    for m in [metadata, image] {
        let mut tee = Tee { inner: region(src, m)?, blake2b: Blake2b512::new(), sha512: Sha512::new(), n: 0 };
        let sig = signer.detached(&mut tee)?;
        if tee.n != m.size {
            return Err(format_err(format!("{} is truncated", m.base)));
        }
        let d = Digests {
            size: m.size,
            blake2b: hex::encode(tee.blake2b.finalize()),
            sha512: hex::encode(tee.sha512.finalize()),
        };
        manifest.push_str(&manifest_line(&m.base, &d));
        manifest.push_str(&manifest_line(&format!("{}.sig", m.base), &Digests::of(sig.as_bytes())));
        sigs.push(sig);
    }
    let signed_manifest = signer.clearsign(&manifest)?;

    // Write the new container.
    let out = File::create(dst).map_err(io_err(dst))?;
    let writer = HashingWriter {
        inner: BufWriter::with_capacity(256 * 1024, out),
        md5: md5::Md5::new(),
        sha1: sha1::Sha1::new(),
        sha256: sha2::Sha256::new(),
        n: 0,
    };
    let mut builder = tar::Builder::new(writer);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let new_header = |template: &tar::Header, size: u64| {
        let mut h = template.clone();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(now);
        h
    };
    let w = |e: std::io::Error| SignError::Io { path: dst.to_owned(), source: e };
    let path_of = |base: &str| format!("{prefix}/{base}");
    builder.append_data(&mut version.header.clone(), path_of("gpkg-1"), &version_bytes[..]).map_err(w)?;
    for (m, sig) in [metadata, image].into_iter().zip(&sigs) {
        builder.append_data(&mut m.header.clone(), path_of(&m.base), region(src, m)?).map_err(w)?;
        let mut h = new_header(&m.header, sig.len() as u64);
        builder.append_data(&mut h, path_of(&format!("{}.sig", m.base)), sig.as_bytes()).map_err(w)?;
    }
    let mut h = new_header(&metadata.header, signed_manifest.len() as u64);
    builder.append_data(&mut h, path_of("Manifest"), signed_manifest.as_bytes()).map_err(w)?;
    let mut writer = builder.into_inner().map_err(w)?;
    writer.flush().map_err(w)?;
    writer.inner.get_ref().sync_all().map_err(w)?;
    Ok(PackageDigests {
        size: writer.n,
        md5: hex::encode(writer.md5.finalize()),
        sha1: hex::encode(writer.sha1.finalize()),
        sha256: hex::encode(writer.sha256.finalize()),
    })
}

/// Signs the GPKG at `path` in place: a signed copy next to it, then a
/// rename over it. On error `path` is left as it was.
pub fn sign_gpkg_in_place(signer: &Signer, path: &Path) -> Result<PackageDigests, SignError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.signing"));
    match sign_gpkg(signer, path, &tmp) {
        Ok(d) => {
            std::fs::rename(&tmp, path).map_err(io_err(path))?;
            Ok(d)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GPKG as portage writes one (unsigned, with its Manifest).
    pub(crate) fn unsigned_gpkg(path: &Path, image_len: usize) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, format!("hello-1.0-1/{name}"), data).unwrap();
        };
        add("gpkg-1", b"");
        add("metadata.tar.zst", b"metadata bytes");
        let image: Vec<u8> = (0..image_len).map(|i| (i % 251) as u8).collect();
        add("image.tar.zst", &image);
        add("Manifest", b"DATA gpkg-1 0 BLAKE2B x SHA512 y\n");
        b.finish().unwrap();
    }

    fn members(path: &Path) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(File::open(path).unwrap());
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn signed_container_has_signatures_in_portage_order_and_a_signed_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.gpkg.tar");
        unsigned_gpkg(&src, 300_000);
        let signer = Signer::ephemeral("t").unwrap();
        let dst = dir.path().join("out.gpkg.tar");
        let d = sign_gpkg(&signer, &src, &dst).unwrap();
        let bytes = std::fs::read(&dst).unwrap();
        assert_eq!(d.size, bytes.len() as u64);
        assert_eq!(d.md5, hex::encode(md5::Md5::digest(&bytes)));
        assert_eq!(d.sha1, hex::encode(sha1::Sha1::digest(&bytes)));
        let m = members(&dst);
        let names: Vec<&str> = m.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "hello-1.0-1/gpkg-1",
                "hello-1.0-1/metadata.tar.zst",
                "hello-1.0-1/metadata.tar.zst.sig",
                "hello-1.0-1/image.tar.zst",
                "hello-1.0-1/image.tar.zst.sig",
                "hello-1.0-1/Manifest"
            ]
        );
        // Archives are copied unchanged and their signatures verify.
        assert_eq!(m[1].1, b"metadata bytes");
        signer.verify_detached(std::str::from_utf8(&m[2].1).unwrap(), &m[1].1).unwrap();
        signer.verify_detached(std::str::from_utf8(&m[4].1).unwrap(), &m[3].1).unwrap();
        let manifest = std::str::from_utf8(&m[5].1).unwrap();
        assert!(manifest.starts_with("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n"), "{manifest}");
        // One line per other member, with the digests of what is stored.
        for (name, data) in &m[..5] {
            let base = name.rsplit('/').next().unwrap();
            let line = format!(
                "DATA {base} {} BLAKE2B {} SHA512 {}",
                data.len(),
                hex::encode(Blake2b512::digest(data)),
                hex::encode(Sha512::digest(data))
            );
            assert!(manifest.contains(&line), "{line} not in\n{manifest}");
        }
        // Signing the signed package again (another key) replaces everything.
        let other = Signer::ephemeral("o").unwrap();
        let again = dir.path().join("again.gpkg.tar");
        sign_gpkg(&other, &dst, &again).unwrap();
        let m2 = members(&again);
        assert_eq!(m2.len(), 6);
        other.verify_detached(std::str::from_utf8(&m2[2].1).unwrap(), &m2[1].1).unwrap();
        assert!(signer.verify_detached(std::str::from_utf8(&m2[2].1).unwrap(), &m2[1].1).is_err());
    }

    #[test]
    fn malformed_containers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::ephemeral("t").unwrap();
        let bad = dir.path().join("bad.tar");
        let mut b = tar::Builder::new(File::create(&bad).unwrap());
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        b.append_data(&mut h, "p/gpkg-1", &b"x"[..]).unwrap();
        b.append_data(&mut h, "p/evil", &b"x"[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        let err = sign_gpkg(&signer, &bad, &dir.path().join("o")).unwrap_err();
        assert!(matches!(err, SignError::Format(_)), "{err}");
        std::fs::write(&bad, b"not a tar at all, not even close").unwrap();
        assert!(sign_gpkg_in_place(&signer, &bad).is_err());
        assert_eq!(std::fs::read(&bad).unwrap(), b"not a tar at all, not even close", "left untouched");
    }
}
