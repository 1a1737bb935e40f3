//! Portage's binary package index, the `Packages` file at the top of a
//! PKGDIR: parsing it and writing it back the way portage does.
//!
//! The format is what `portage.getbinpkg.PackageIndex` reads and writes
//! (checked against portage 3.0.83, `portage/getbinpkg.py` and
//! `portage/dbapi/bintree.py`):
//!
//! - a header block of `KEY: value` lines, then a blank line, then one
//!   block per package, each followed by a blank line;
//! - keys are sorted by portage's *internal* name, and three keys are renamed
//!   on disk: `DESCRIPTION` is written `DESC`, `_mtime_` `MTIME` and
//!   `repository` `REPO`. That is why `MTIME` and `REPO` come last in every
//!   package block (`_` and lower case sort after upper case);
//! - keys with an empty value are not written;
//! - in package blocks, `CHOST` and `REPO` are omitted when equal to the
//!   header's value ("inherited keys": a reader fills them in from the
//!   header, and a missing header `CHOST` means the *reader's own* CHOST), and
//!   `EAPI: 0` / `SLOT: 0` are omitted because they are the defaults;
//! - package blocks are sorted by CPV (plain string order);
//! - the reader stops at the first empty block, so two blank lines in a row
//!   end the index for portage;
//! - `VERSION` must be present and `<= 0` or portage ignores the whole index,
//!   and a binhost client rejects an index without `TIMESTAMP`.
//!
//! [`PackageIndex`] keeps keys under their on-disk names (`REPO`, `MTIME`,
//! `DESC`) and values verbatim, so entries copied from a build's PKGDIR into
//! another index are written back exactly as portage wrote them. Parsing
//! fills inherited keys and non-empty defaults into each entry, so a
//! [`PackageEntry`] is self-contained and can be moved between indexes with
//! different headers; [`PackageIndex::render`] strips them again.
//!
//! Portage (`FEATURES=compress-index`, the default) also writes
//! `Packages.gz`, and binhost clients fetch `Packages.gz` *before*
//! `Packages`: whoever replaces `Packages` must remove or rewrite a stale
//! `Packages.gz` next to it. This module only produces the plain text.
//!
//! The index in a build's PKGDIR is written inside the build sandbox, so it
//! is untrusted input: parsing is strict, and callers must still validate
//! values such as `PATH` before using them as file names.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// Keys that a package block inherits from the header when it lacks them
/// (portage's `_pkgindex_inherited_keys`, on-disk names).
const INHERITED_KEYS: [&str; 2] = ["CHOST", "REPO"];

/// Non-empty defaults of portage's `_pkgindex_default_pkg_data`: a package
/// block without these keys has these values. (The other defaults are empty
/// strings, which are never written anyway.)
const NON_EMPTY_DEFAULTS: [(&str, &str); 2] = [("EAPI", "0"), ("SLOT", "0")];

/// The index format version this module writes when the header has none
/// (portage's `_pkgindex_version`).
const INDEX_VERSION: &str = "0";

/// Errors from parsing or rendering a `Packages` index. Line numbers are
/// 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// A line is not of the form `KEY: value` (or `KEY:` for an empty value).
    #[error("Packages line {line}: expected `KEY: value`, found {text:?}")]
    MalformedLine {
        /// Line number.
        line: usize,
        /// The offending line (possibly shortened).
        text: String,
    },
    /// A carriage return: portage writes LF line endings only.
    #[error("Packages line {line}: carriage return found; portage writes LF line endings only")]
    CarriageReturn {
        /// Line number.
        line: usize,
    },
    /// The same key appears twice in one block.
    #[error("Packages line {line}: key {key:?} repeated in the same block")]
    DuplicateKey {
        /// Line number of the second occurrence.
        line: usize,
        /// The repeated key.
        key: String,
    },
    /// A package block has no (or an empty) `CPV`.
    #[error("Packages line {line}: package block has no CPV")]
    MissingCpv {
        /// First line of the block.
        line: usize,
    },
    /// More than one blank line between blocks: portage stops reading at the
    /// first empty block, so everything after it would be silently ignored.
    #[error("Packages line {line}: extra blank line between blocks (portage would ignore the rest of the index)")]
    ExtraBlankLine {
        /// Line number of the extra blank line.
        line: usize,
    },
    /// A key or value that cannot be written in this format (empty key, key
    /// with `:` or whitespace, newline in a value).
    #[error("cannot write Packages entry for key {key:?}: {reason}")]
    Unrenderable {
        /// The key (or the key whose value is bad).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The header has no `TIMESTAMP`; binhost clients reject such an index.
    #[error("cannot write Packages: header has no TIMESTAMP (see PackageIndex::set_timestamp)")]
    MissingTimestamp,
}

/// One package block of a `Packages` index.
///
/// Keys are the on-disk names (`CPV`, `BUILD_ID`, `PATH`, `USE`, `MD5`,
/// `SHA1`, `MTIME`, `REPO`, ...); values are verbatim. Cloning an entry
/// from one index and [merging](PackageIndex::merge) it into another copies
/// it without rewriting anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageEntry {
    /// All fields of the block, including inherited `CHOST`/`REPO` and the
    /// `EAPI`/`SLOT` defaults filled in by [`parse`].
    pub fields: BTreeMap<String, String>,
}

impl PackageEntry {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The package's `CPV` (`category/name-version`), if present and
    /// non-empty. Always present in entries produced by [`parse`].
    pub fn cpv(&self) -> Option<&str> {
        self.get("CPV").filter(|v| !v.is_empty())
    }

    /// `BUILD_ID` (binpkg-multi-instance), if present and a valid integer.
    pub fn build_id(&self) -> Option<u64> {
        self.get("BUILD_ID")?.parse().ok()
    }

    /// `PATH` relative to the PKGDIR, if present and non-empty. Untrusted:
    /// validate before joining it to a directory.
    pub fn path(&self) -> Option<&str> {
        self.get("PATH").filter(|v| !v.is_empty())
    }

    /// The USE flags portage recorded as enabled for this build (`USE`
    /// split on whitespace; empty when absent).
    pub fn use_flags(&self) -> Vec<String> {
        self.get("USE").map(|v| v.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
    }

    /// `SIZE` of the binary package in bytes, if present and valid.
    pub fn size(&self) -> Option<u64> {
        self.get("SIZE")?.parse().ok()
    }

    /// The identity used by [`PackageIndex::merge`]: `CPV` and raw `BUILD_ID`.
    fn identity(&self) -> (Option<&str>, Option<&str>) {
        (self.get("CPV"), self.get("BUILD_ID"))
    }
}

/// A parsed `Packages` index: header and package blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageIndex {
    /// Header fields (`ARCH`, `CHOST`, `USE`, `PROFILE`, `TIMESTAMP`,
    /// `VERSION`, ...). `PACKAGES` is recomputed by [`Self::render`].
    pub header: BTreeMap<String, String>,
    /// Package entries, in file order (rendering sorts them).
    pub packages: Vec<PackageEntry>,
}

impl PackageIndex {
    /// Sets the `TIMESTAMP` header (seconds since the epoch). Binhost clients
    /// only re-read the body when it is newer than their cached copy, so
    /// bump it whenever the index changes.
    pub fn set_timestamp(&mut self, unix_secs: u64) {
        self.header.insert("TIMESTAMP".to_owned(), unix_secs.to_string());
    }

    /// Adds entries, replacing any existing entry with the same `CPV` and
    /// `BUILD_ID`. Entries are taken as they are (cloned fields, nothing
    /// rewritten).
    pub fn merge(&mut self, entries: impl IntoIterator<Item = PackageEntry>) {
        let mut position: HashMap<(Option<String>, Option<String>), usize> = self
            .packages
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (cpv, id) = e.identity();
                ((cpv.map(str::to_owned), id.map(str::to_owned)), i)
            })
            .collect();
        for entry in entries {
            let (cpv, id) = entry.identity();
            let key = (cpv.map(str::to_owned), id.map(str::to_owned));
            match position.get(&key) {
                Some(&i) => self.packages[i] = entry,
                None => {
                    position.insert(key, self.packages.len());
                    self.packages.push(entry);
                }
            }
        }
    }

    /// Writes the index the way portage's `PackageIndex.write` does:
    /// header keys sorted (by portage's internal names), `PACKAGES` set to
    /// the number of entries, `VERSION: 0` added if missing, empty values
    /// dropped; package blocks sorted by CPV then `BUILD_ID`, without the
    /// keys inherited from the header or equal to portage's defaults.
    ///
    /// `TIMESTAMP` is the caller's (see [`Self::set_timestamp`]); an index
    /// without one is refused.
    pub fn render(&self) -> Result<String, IndexError> {
        if self.header.get("TIMESTAMP").is_none_or(|t| t.is_empty()) {
            return Err(IndexError::MissingTimestamp);
        }
        let mut header = self.header.clone();
        header.insert("PACKAGES".to_owned(), self.packages.len().to_string());
        header.entry("VERSION".to_owned()).or_insert_with(|| INDEX_VERSION.to_owned());

        let mut out = String::new();
        write_block(&mut out, header.iter())?;

        let mut packages: Vec<&PackageEntry> = self.packages.iter().collect();
        // Portage sorts by CPV only (stable); BUILD_ID makes ties deterministic.
        packages.sort_by(|a, b| {
            (a.get("CPV").unwrap_or(""), a.build_id()).cmp(&(b.get("CPV").unwrap_or(""), b.build_id()))
        });
        for entry in packages {
            let fields = entry.fields.iter().filter(|(k, v)| {
                let k = k.as_str();
                let inherited =
                    INHERITED_KEYS.contains(&k) && header.get(k).is_some_and(|h| !h.is_empty() && h == v.as_str());
                let default = NON_EMPTY_DEFAULTS.iter().any(|(dk, dv)| *dk == k && *dv == v.as_str());
                !inherited && !default
            });
            write_block(&mut out, fields)?;
        }
        Ok(out)
    }
}

/// Portage's internal name of an on-disk key: the sort key of both the
/// header and package blocks.
fn internal_name(key: &str) -> &str {
    match key {
        "DESC" => "DESCRIPTION",
        "MTIME" => "_mtime_",
        "REPO" => "repository",
        other => other,
    }
}

/// Appends one block (sorted by internal name, empty values skipped) and its
/// terminating blank line.
fn write_block<'a>(out: &mut String, fields: impl Iterator<Item = (&'a String, &'a String)>) -> Result<(), IndexError> {
    let mut fields: Vec<(&String, &String)> = fields.filter(|(_, v)| !v.is_empty()).collect();
    fields.sort_by(|(a, _), (b, _)| (internal_name(a), a).cmp(&(internal_name(b), b)));
    for (key, value) in fields {
        check_renderable(key, value)?;
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{key}: {value}");
    }
    out.push('\n');
    Ok(())
}

fn check_renderable(key: &str, value: &str) -> Result<(), IndexError> {
    let bad = |reason| Err(IndexError::Unrenderable { key: key.to_owned(), reason });
    if key.is_empty() {
        return bad("empty key");
    }
    if key.contains(':') || key.chars().any(char::is_whitespace) {
        return bad("key contains ':' or whitespace");
    }
    if value.contains(['\n', '\r']) {
        return bad("value contains a line break");
    }
    Ok(())
}

/// Parses the text of a `Packages` file.
///
/// Strict: every non-blank line must be `KEY: value` (or `KEY:`), no
/// carriage returns, no repeated key within a block, every package block
/// has a `CPV`, and blocks are separated by exactly one blank line. The
/// final newline and trailing blank lines are optional. Unknown keys are
/// kept. An empty text is an empty index.
pub fn parse(text: &str) -> Result<PackageIndex, IndexError> {
    let mut index = PackageIndex::default();
    // Block being read: fields and its first line number.
    let mut block: BTreeMap<String, String> = BTreeMap::new();
    let mut block_start = 0;
    let mut in_header = true;
    // Line number of a blank line that followed another separator, if any.
    let mut extra_blank: Option<usize> = None;
    let mut previous_blank = false;

    let body = text.strip_suffix('\n').unwrap_or(text);
    let lines = if text.is_empty() { Vec::new() } else { body.split('\n').collect() };

    for (i, line) in lines.into_iter().enumerate() {
        let lineno = i + 1;
        if line.contains('\r') {
            return Err(IndexError::CarriageReturn { line: lineno });
        }
        if line.is_empty() {
            if in_header {
                in_header = false;
                index.header = std::mem::take(&mut block);
            } else if previous_blank {
                extra_blank.get_or_insert(lineno);
            } else {
                finish_package(&mut index, std::mem::take(&mut block), block_start)?;
            }
            previous_blank = true;
            continue;
        }
        if let Some(line) = extra_blank {
            return Err(IndexError::ExtraBlankLine { line });
        }
        if block.is_empty() {
            block_start = lineno;
        }
        previous_blank = false;
        let (key, value) = split_line(line)
            .ok_or_else(|| IndexError::MalformedLine { line: lineno, text: line.chars().take(120).collect() })?;
        if block.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(IndexError::DuplicateKey { line: lineno, key: key.to_owned() });
        }
    }
    if in_header {
        index.header = block;
    } else if !block.is_empty() {
        finish_package(&mut index, block, block_start)?;
    }

    // Make every entry self-contained: inherited header keys and the
    // non-empty defaults, exactly as portage's reader fills them in.
    for entry in &mut index.packages {
        for key in INHERITED_KEYS {
            if let Some(v) = index.header.get(key).filter(|v| !v.is_empty()) {
                entry.fields.entry(key.to_owned()).or_insert_with(|| v.clone());
            }
        }
        for (key, value) in NON_EMPTY_DEFAULTS {
            entry.fields.entry(key.to_owned()).or_insert_with(|| value.to_owned());
        }
    }
    Ok(index)
}

/// `KEY: value` or `KEY:` -> (key, value); None if malformed.
fn split_line(line: &str) -> Option<(&str, &str)> {
    let (key, rest) = line.split_once(':')?;
    if key.is_empty() || key.chars().any(char::is_whitespace) {
        return None;
    }
    let value = if rest.is_empty() { rest } else { rest.strip_prefix(' ')? };
    Some((key, value))
}

fn finish_package(index: &mut PackageIndex, fields: BTreeMap<String, String>, start: usize) -> Result<(), IndexError> {
    if fields.get("CPV").is_none_or(|c| c.is_empty()) {
        return Err(IndexError::MissingCpv { line: start });
    }
    index.packages.push(PackageEntry { fields });
    Ok(())
}

/// The `TIMESTAMP` of an index text's header, if any (reads the header only).
pub fn header_timestamp(text: &str) -> Option<u64> {
    text.split("\n\n").next()?.lines().find_map(|l| l.strip_prefix("TIMESTAMP: ")).and_then(|t| t.trim().parse().ok())
}

/// Merges `entries` into the text of an index the way
/// [`PackageIndex::merge`] + [`PackageIndex::render`] would, but without
/// parsing the existing blocks into maps: existing blocks are kept as text
/// (found by their `CPV` and `BUILD_ID` lines), an existing block with the
/// same identity as a new entry is replaced, new blocks are inserted in
/// sorted position, and the header gets `PACKAGES` and `timestamp`. Cost is
/// one pass over the bytes, so publishing stays cheap at 10,000 entries.
pub fn merge_text(text: &str, entries: &[PackageEntry], timestamp: u64) -> Result<String, IndexError> {
    let mut blocks = text.split("\n\n").filter(|b| !b.trim().is_empty());
    let header_text = blocks.next().unwrap_or("");
    let mut header: BTreeMap<String, String> = BTreeMap::new();
    for (i, line) in header_text.lines().enumerate() {
        let (k, v) = split_line(line)
            .ok_or_else(|| IndexError::MalformedLine { line: i + 1, text: line.chars().take(120).collect() })?;
        header.insert(k.to_owned(), v.to_owned());
    }
    let identity = |block: &str| -> (String, Option<u64>) {
        let mut cpv = String::new();
        let mut id = None;
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("CPV: ") {
                cpv = v.to_owned();
            } else if let Some(v) = line.strip_prefix("BUILD_ID: ") {
                id = v.parse().ok();
            }
        }
        (cpv, id)
    };
    let new_ids: Vec<(String, Option<u64>)> =
        entries.iter().map(|e| (e.get("CPV").unwrap_or("").to_owned(), e.build_id())).collect();
    let mut kept: Vec<((String, Option<u64>), String)> = Vec::new();
    for block in blocks {
        let id = identity(block);
        if !new_ids.contains(&id) {
            kept.push((id, format!("{block}\n\n")));
        }
    }
    header.insert("TIMESTAMP".to_owned(), timestamp.to_string());
    let scratch = PackageIndex { header: header.clone(), packages: entries.to_vec() };
    for (entry, id) in entries.iter().zip(new_ids) {
        let mut one = scratch.clone();
        one.packages = vec![entry.clone()];
        let rendered = one.render()?;
        let block = rendered.split_once("\n\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        let at = kept.partition_point(|(k, _)| (k.0.as_str(), k.1) <= (id.0.as_str(), id.1));
        kept.insert(at, (id, block));
    }
    header.insert("PACKAGES".to_owned(), kept.len().to_string());
    header.insert("VERSION".to_owned(), INDEX_VERSION.to_owned());
    header.insert("TTL".to_owned(), BINHOST_TTL_SECS.to_string());
    let mut out = String::with_capacity(text.len() + 1024);
    write_block(&mut out, header.iter())?;
    for (_, block) in kept {
        out.push_str(&block);
    }
    Ok(out)
}

/// How long (seconds) a binhost client may use its copy of the index
/// without asking again (the `TTL` header; portage skips the refresh while
/// `DOWNLOAD_TIMESTAMP + TTL` is in the future).
pub const BINHOST_TTL_SECS: u64 = 60;

/// The `TIMESTAMP` of the next published index: the clock, but always
/// greater than the previous one. Portage parses a remote index only when
/// its TIMESTAMP is greater than the copy it has, so two publishes within
/// one second (or a worker whose clock is behind) must still increase it.
pub fn next_timestamp(previous: Option<u64>, now_secs: u64) -> u64 {
    match previous {
        Some(p) if p >= now_secs => p + 1,
        _ => now_secs,
    }
}

impl PackageIndex {
    /// Sets the header a binhost serves: a monotonic `TIMESTAMP` (see
    /// [`next_timestamp`]), `VERSION: 0` (whatever the build wrote; portage
    /// ignores an index whose VERSION is above what it supports) and `TTL`.
    pub fn prepare_for_binhost(&mut self, previous: Option<u64>, now_secs: u64, ttl_secs: u64) {
        self.set_timestamp(next_timestamp(previous, now_secs));
        self.header.insert("VERSION".to_owned(), INDEX_VERSION.to_owned());
        self.header.insert("TTL".to_owned(), ttl_secs.to_string());
    }
}

/// `Packages.gz`: the rendered index, gzip-compressed (portage >= 3.0.69
/// fetches it before `Packages`). Deterministic: no name, mtime 0.
pub fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(text.as_bytes());
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn binhost_header_timestamp_is_monotonic_version_zero_with_ttl() {
        assert_eq!(next_timestamp(None, 100), 100);
        assert_eq!(next_timestamp(Some(99), 100), 100);
        assert_eq!(next_timestamp(Some(100), 100), 101, "same second: still increases");
        assert_eq!(next_timestamp(Some(500), 100), 501, "clock behind: still increases");
        let mut idx = parse("TIMESTAMP: 5\nVERSION: 7\n\nCPV: a/b-1\n\n").unwrap();
        idx.prepare_for_binhost(Some(200), 100, 60);
        let text = idx.render().unwrap();
        assert!(text.starts_with("PACKAGES: 1\nTIMESTAMP: 201\nTTL: 60\nVERSION: 0\n\n"), "{text}");
        assert_eq!(header_timestamp(&text), Some(201));
        assert_eq!(header_timestamp("VERSION: 0\n\nTIMESTAMP: 9\n"), None, "only the header counts");
        let gz = gzip(&text);
        let mut out = String::new();
        use std::io::Read;
        flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut out).unwrap();
        assert_eq!(out, text);
        assert_eq!(gz, gzip(&text), "deterministic");
    }

    use super::*;

    #[test]
    fn merge_text_equals_parse_merge_render() {
        let entry = |cpv: &str, id: u64, extra: &str| {
            let mut e = PackageEntry::default();
            for (k, v) in [
                ("CPV", cpv.to_owned()),
                ("BUILD_ID", id.to_string()),
                ("PATH", format!("{cpv}-{id}.gpkg.tar")),
                ("CHOST", "x86_64-pc-linux-gnu".into()),
                ("SLOT", "0".into()),
                ("USE", extra.into()),
                ("MTIME", "1".into()),
            ] {
                e.fields.insert(k.to_owned(), v);
            }
            e
        };
        let mut index = PackageIndex::default();
        index.header.insert("CHOST".into(), "x86_64-pc-linux-gnu".into());
        index.header.insert("ARCH".into(), "amd64".into());
        index.set_timestamp(100);
        index.packages = vec![entry("a/x-1", 1, "a"), entry("a/z-1", 1, "b"), entry("b/y-2", 3, "")];
        let text = index.render().unwrap();
        let new = vec![entry("a/y-1", 1, "n"), entry("a/z-1", 1, "replaced"), entry("c/c-1", 2, "")];
        let merged = merge_text(&text, &new, 200).unwrap();
        let mut expected = parse(&text).unwrap();
        expected.merge(new.clone());
        // What a binhost serves: merge_text also sets VERSION 0 and the TTL.
        expected.prepare_for_binhost(Some(199), 200, BINHOST_TTL_SECS);
        assert_eq!(merged, expected.render().unwrap());
        assert_eq!(header_timestamp(&merged), Some(200));
        assert_eq!(parse(&merged).unwrap().packages.len(), 5);
    }

    const SMALL: &str = "\
ACCEPT_KEYWORDS: amd64
ARCH: amd64
CHOST: x86_64-pc-linux-gnu
PACKAGES: 2
TIMESTAMP: 1700000000
USE: amd64 elibc_glibc
VERSION: 0

BUILD_ID: 2
BUILD_TIME: 1700000000
CPV: app-misc/hello-2.12-r1
DEFINED_PHASES: compile install
EAPI: 8
IUSE: foo bar
KEYWORDS: amd64
MD5: 26bd47f641f08fafff9c96aa524e2e5e
PATH: app-misc/hello/hello-2.12-r1-2.gpkg.tar
SHA1: 27c86714eb344966c84ea58d1763d46d745e9bb6
SIZE: 10240
USE: amd64 elibc_glibc foo
X_UNKNOWN: kept: as is
MTIME: 1700000000
REPO: pacloud-fixtures

BUILD_ID: 1
CPV: dev-libs/libfoo-1.0
DESC: a library
PATH: dev-libs/libfoo/libfoo-1.0-1.gpkg.tar
SLOT: 1
MTIME: 1699999999
REPO: pacloud-fixtures

";

    #[test]
    fn parses_small_index() {
        let index = parse(SMALL).expect("parse");
        assert_eq!(index.header.get("ARCH").map(String::as_str), Some("amd64"));
        assert_eq!(index.packages.len(), 2);
        let hello = &index.packages[0];
        assert_eq!(hello.cpv(), Some("app-misc/hello-2.12-r1"));
        assert_eq!(hello.build_id(), Some(2));
        assert_eq!(hello.path(), Some("app-misc/hello/hello-2.12-r1-2.gpkg.tar"));
        assert_eq!(hello.size(), Some(10240));
        assert_eq!(hello.use_flags(), ["amd64", "elibc_glibc", "foo"]);
        assert_eq!(hello.get("X_UNKNOWN"), Some("kept: as is"));
        // Inherited from the header, and the SLOT default.
        assert_eq!(hello.get("CHOST"), Some("x86_64-pc-linux-gnu"));
        assert_eq!(hello.get("SLOT"), Some("0"));
        let libfoo = &index.packages[1];
        assert_eq!(libfoo.get("EAPI"), Some("0"));
        assert_eq!(libfoo.get("SLOT"), Some("1"));
        assert_eq!(libfoo.use_flags(), Vec::<String>::new());
        assert_eq!(libfoo.size(), None);
    }

    #[test]
    fn render_round_trips_byte_for_byte() {
        let index = parse(SMALL).expect("parse");
        assert_eq!(index.render().expect("render"), SMALL);
    }

    #[test]
    fn render_sorts_like_portage() {
        let mut index = parse(SMALL).expect("parse");
        index.packages.reverse();
        let mut extra = index.packages[0].clone(); // dev-libs/libfoo-1.0, BUILD_ID 1
        extra.fields.insert("BUILD_ID".into(), "10".into());
        let mut nine = extra.clone();
        nine.fields.insert("BUILD_ID".into(), "9".into());
        index.merge([extra, nine]);
        let text = index.render().expect("render");
        let order: Vec<&str> = text.lines().filter(|l| l.starts_with("CPV: ") || l.starts_with("BUILD_ID: ")).collect();
        assert_eq!(
            order,
            [
                "BUILD_ID: 2",
                "CPV: app-misc/hello-2.12-r1",
                "BUILD_ID: 1",
                "CPV: dev-libs/libfoo-1.0",
                "BUILD_ID: 9",
                "CPV: dev-libs/libfoo-1.0",
                "BUILD_ID: 10",
                "CPV: dev-libs/libfoo-1.0",
            ]
        );
        assert!(text.contains("PACKAGES: 4\n"));
        // DESC sorts as DESCRIPTION, MTIME and REPO come last.
        let libfoo_block = text.split("\n\n").nth(2).expect("block");
        assert_eq!(
            libfoo_block,
            "BUILD_ID: 1\nCPV: dev-libs/libfoo-1.0\nDESC: a library\n\
             PATH: dev-libs/libfoo/libfoo-1.0-1.gpkg.tar\nSLOT: 1\n\
             MTIME: 1699999999\nREPO: pacloud-fixtures"
        );
    }

    #[test]
    fn merge_replaces_by_cpv_and_build_id() {
        let mut index = parse(SMALL).expect("parse");
        let mut replacement = index.packages[0].clone();
        replacement.fields.insert("USE".into(), "bar".into());
        let mut other_build = index.packages[0].clone();
        other_build.fields.insert("BUILD_ID".into(), "3".into());
        index.merge([replacement, other_build]);
        assert_eq!(index.packages.len(), 3);
        assert_eq!(index.packages[0].use_flags(), ["bar"]);
        assert_eq!(index.packages[2].build_id(), Some(3));
    }

    #[test]
    fn inherited_keys_written_when_header_differs() {
        let mut index = parse(SMALL).expect("parse");
        index.header.remove("CHOST");
        index.header.insert("REPO".into(), "pacloud-fixtures".into());
        let text = index.render().expect("render");
        // CHOST is no longer in the header, so each entry carries it...
        assert_eq!(text.matches("CHOST: x86_64-pc-linux-gnu\n").count(), 2);
        // ...and REPO moved to the header (written last: sorts as `repository`).
        assert_eq!(text.matches("REPO: pacloud-fixtures\n").count(), 1);
        assert!(text.contains("VERSION: 0\nREPO: pacloud-fixtures\n\n"));
        let again = parse(&text).expect("reparse");
        assert_eq!(again.packages, index.packages);
    }

    #[test]
    fn missing_final_blank_line_and_newline() {
        let trimmed = SMALL.trim_end_matches('\n');
        let index = parse(trimmed).expect("parse");
        assert_eq!(index, parse(SMALL).expect("parse"));
        let index = parse(&format!("{trimmed}\n")).expect("parse");
        assert_eq!(index.packages.len(), 2);
        // Trailing blank lines are harmless.
        let index = parse(&format!("{SMALL}\n\n")).expect("parse");
        assert_eq!(index.packages.len(), 2);
    }

    #[test]
    fn empty_and_header_only() {
        assert_eq!(parse("").expect("parse"), PackageIndex::default());
        assert_eq!(parse("\n").expect("parse"), PackageIndex::default());
        let index = parse("TIMESTAMP: 5\nVERSION: 0\n").expect("parse");
        assert!(index.packages.is_empty());
        assert_eq!(index.header.len(), 2);
        assert_eq!(index.render().expect("render"), "PACKAGES: 0\nTIMESTAMP: 5\nVERSION: 0\n\n");
    }

    #[test]
    fn empty_value_is_allowed_and_not_written() {
        let index = parse("TIMESTAMP: 5\nURI:\n\nCPV: a/b-1\nIUSE:\n").expect("parse");
        assert_eq!(index.header.get("URI").map(String::as_str), Some(""));
        assert_eq!(index.packages[0].get("IUSE"), Some(""));
        assert_eq!(index.render().expect("render"), "PACKAGES: 1\nTIMESTAMP: 5\nVERSION: 0\n\nCPV: a/b-1\n\n");
    }

    #[test]
    fn errors_name_the_line() {
        let bad = SMALL.replacen("\nKEYWORDS: amd64\n", "\nKEYWORDS amd64\n", 1);
        let err = parse(&bad).expect_err("malformed");
        assert_eq!(err, IndexError::MalformedLine { line: 15, text: "KEYWORDS amd64".into() });
        assert!(err.to_string().contains("line 15"), "{err}");

        assert_eq!(
            parse("A: 1\n\nCPV:x\n").expect_err("no space"),
            IndexError::MalformedLine { line: 3, text: "CPV:x".into() }
        );
        assert!(matches!(parse(" A: 1\n").expect_err("leading space"), IndexError::MalformedLine { line: 1, .. }));
        assert_eq!(parse("A: 1\r\n").expect_err("crlf"), IndexError::CarriageReturn { line: 1 });
        assert_eq!(
            parse("A: 1\n\nCPV: a/b-1\nUSE: x\nUSE: y\n").expect_err("dup"),
            IndexError::DuplicateKey { line: 5, key: "USE".into() }
        );
        assert_eq!(
            parse("A: 1\n\nCPV: a/b-1\n\nPATH: x\nUSE: y\n").expect_err("no cpv"),
            IndexError::MissingCpv { line: 5 }
        );
        assert_eq!(
            parse("A: 1\n\nCPV: a/b-1\n\n\nCPV: a/c-1\n").expect_err("blank"),
            IndexError::ExtraBlankLine { line: 5 }
        );
        assert_eq!(
            parse("A: 1\n\n\nCPV: a/c-1\n").expect_err("blank after header"),
            IndexError::ExtraBlankLine { line: 3 }
        );
    }

    #[test]
    fn render_refuses_what_it_cannot_write() {
        let mut index = parse(SMALL).expect("parse");
        index.packages[0].fields.insert("USE".into(), "foo\nPATH: ../../etc/passwd".into());
        assert!(matches!(
            index.render(),
            Err(IndexError::Unrenderable { ref key, .. }) if key == "USE"
        ));
        let mut index = parse(SMALL).expect("parse");
        index.header.insert("BAD KEY".into(), "x".into());
        assert!(matches!(index.render(), Err(IndexError::Unrenderable { .. })));
        let mut index = parse(SMALL).expect("parse");
        index.header.remove("TIMESTAMP");
        assert_eq!(index.render(), Err(IndexError::MissingTimestamp));
        index.set_timestamp(42);
        assert!(index.render().expect("render").contains("TIMESTAMP: 42\n"));
    }

    /// Real portage: builds packages with `emerge` in bubblewrap
    /// (tests/fixtures/VERIFIED.md section 3a), parses portage's `Packages`,
    /// renders it back, and has portage's own reader (`PackageIndex.read`
    /// as used by `binarytree`, and a `file://` binhost client via
    /// `binarytree.populate(getbinpkgs=True)`) read our file.
    ///
    /// Fails (does not skip) when `.venv` or `bwrap` is missing:
    /// `scripts/test.sh` installs them.
    #[test]
    fn real_portage_round_trip() {
        real::run();
    }

    mod real {
        use super::super::*;
        use std::path::{Path, PathBuf};
        use std::process::Command;

        const FIXTURE_REPO_CONF: &str = "[DEFAULT]\nmain-repo = pacloud-fixtures\n\n[pacloud-fixtures]\nlocation = ";

        struct Env {
            venv: PathBuf,
            repo: PathBuf,
            w: PathBuf,
        }

        impl Env {
            fn repos_conf(&self) -> String {
                format!("{FIXTURE_REPO_CONF}{}", self.repo.display())
            }

            fn make_conf(&self, pkgdir: &Path, tmpdir: &Path) -> String {
                let w = self.w.display();
                format!(
                    "FEATURES=\"-sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox -network-sandbox -pid-sandbox -news -strict -merge-sync binpkg-multi-instance\"\n\
                     PORTAGE_USERNAME=\"root\"\nPORTAGE_GRPNAME=\"root\"\n\
                     PKGDIR=\"{}\"\nPORTAGE_TMPDIR=\"{}\"\nDISTDIR=\"{w}/distfiles\"\n\
                     BINPKG_FORMAT=\"gpkg\"\nBINPKG_COMPRESS=\"zstd\"\nACCEPT_LICENSE=\"*\"\n\
                     EMERGE_WARNING_DELAY=\"0\"\nCLEAN_DELAY=\"0\"\nPORTAGE_LOGDIR=\"{w}/logs\"\n",
                    pkgdir.display(),
                    tmpdir.display()
                )
            }

            fn setup(&self) {
                let w = &self.w;
                let portage = w.join("config/etc/portage");
                for d in ["root", "pkgdir", "tmp", "distfiles", "logs", "hostconf"] {
                    std::fs::create_dir_all(w.join(d)).expect("mkdir");
                }
                std::fs::create_dir_all(portage.join("repos.conf")).expect("mkdir");
                std::fs::write(portage.join("make.conf"), self.make_conf(&w.join("pkgdir"), &w.join("tmp")))
                    .expect("make.conf");
                std::fs::write(
                    w.join("hostconf/make.conf"),
                    self.make_conf(&self.venv.join("var/cache/binpkgs"), &self.venv.join("var/tmp")),
                )
                .expect("host make.conf");
                std::os::unix::fs::symlink(self.repo.join("profiles/default"), portage.join("make.profile"))
                    .expect("make.profile");
                std::fs::write(portage.join("repos.conf/pacloud-fixtures.conf"), format!("{}\n", self.repos_conf()))
                    .expect("repos.conf");
            }

            /// `emerge` for `=<cpv>` in bubblewrap, argv of VERIFIED.md 3a.
            fn emerge(&self, cat_pn: &str, cpv: &str, use_flags: Option<&str>) {
                let package_use = self.w.join("config/etc/portage/package.use");
                match use_flags {
                    Some(flags) => std::fs::write(&package_use, format!("={cpv} {flags}\n")).expect("package.use"),
                    None => {
                        let _ = std::fs::remove_file(&package_use);
                    }
                }
                let (v, r, w) =
                    (self.venv.display().to_string(), self.repo.display().to_string(), self.w.display().to_string());
                let mut args: Vec<String> = Vec::new();
                let mut add = |parts: &[&str]| args.extend(parts.iter().map(|s| s.to_string()));
                add(&["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
                add(&["--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", &v]);
                for sub in ["bin", "lib"] {
                    add(&["--ro-bind", &format!("{v}/{sub}"), &format!("{v}/{sub}")]);
                }
                add(&["--symlink", "lib", &format!("{v}/lib64")]);
                for sub in ["include", "share", "pyvenv.cfg"] {
                    add(&["--ro-bind", &format!("{v}/{sub}"), &format!("{v}/{sub}")]);
                }
                add(&["--dir", &format!("{v}/etc/portage")]);
                add(&["--symlink", &format!("{r}/profiles/default"), &format!("{v}/etc/portage/make.profile")]);
                add(&["--ro-bind", &format!("{w}/hostconf/make.conf"), &format!("{v}/etc/portage/make.conf")]);
                add(&["--ro-bind", &format!("{w}/config"), &format!("{w}/config")]);
                // The repository may live under /tmp (hidden by the tmpfs above).
                add(&["--ro-bind", &r, &r]);
                for sub in ["root", "pkgdir", "tmp", "distfiles", "logs"] {
                    add(&["--bind", &format!("{w}/{sub}"), &format!("{w}/{sub}")]);
                }
                add(&[
                    "--unshare-net",
                    "--unshare-ipc",
                    "--unshare-pid",
                    "--unshare-uts",
                    "--die-with-parent",
                    "--new-session",
                    "--cap-drop",
                    "ALL",
                    "--clearenv",
                ]);
                let path = format!("{v}/bin:/usr/sbin:/usr/bin:/sbin:/bin");
                let config_root = format!("{w}/config");
                let root = format!("{w}/root");
                let repos = self.repos_conf();
                for (k, val) in [
                    ("PATH", path.as_str()),
                    ("HOME", "/tmp"),
                    ("LANG", "C.UTF-8"),
                    ("PORTAGE_CONFIGROOT", config_root.as_str()),
                    ("ROOT", root.as_str()),
                    ("SYSROOT", root.as_str()),
                    ("EPREFIX", ""),
                    ("PORTAGE_REPOSITORIES", repos.as_str()),
                ] {
                    add(&["--setenv", k, val]);
                }
                add(&[
                    "--",
                    &format!("{v}/bin/emerge"),
                    "--buildpkg",
                    "--usepkg",
                    "--with-bdeps=y",
                    "--oneshot",
                    "--usepkg-exclude",
                    cat_pn,
                    &format!("={cpv}"),
                ]);
                let out = Command::new("bwrap")
                    .args(&args)
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run bwrap ({e}); install bubblewrap (scripts/test.sh)"));
                assert!(
                    out.status.success(),
                    "emerge ={cpv} failed: {}\n--- stdout\n{}\n--- stderr\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }

        /// Hard-links every binary package of `from` into `to` (keeping the
        /// mtime portage recorded), leaving out `Packages` and `Packages.gz`.
        fn link_packages(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).expect("mkdir");
            for entry in std::fs::read_dir(from).expect("read_dir") {
                let entry = entry.expect("dir entry");
                let name = entry.file_name();
                let (src, dst) = (entry.path(), to.join(&name));
                if entry.file_type().expect("file type").is_dir() {
                    link_packages(&src, &dst);
                } else if name != "Packages" && name != "Packages.gz" {
                    std::fs::hard_link(&src, &dst).expect("hard link");
                }
            }
        }

        /// Reads `orig` and `ours` with portage's `PackageIndex` (configured
        /// exactly as `binarytree` configures it), checks that portage sees
        /// the same header (but TIMESTAMP) and the same package dicts, then
        /// lists what a binhost client sees at `file://<binhost>`.
        const PY_CHECK: &str = r#"
import json, os, sys
import portage
from portage.dbapi.bintree import binarytree
cfg, root, pkgdir, orig, binhost = sys.argv[1:6]
settings = portage.config(config_root=cfg, target_root=root, eprefix="",
    env={"PORTAGE_BINHOST": "file://" + binhost,
         "PORTAGE_REPOSITORIES": os.environ["PORTAGE_REPOSITORIES"]})
bt = binarytree(pkgdir=pkgdir, settings=settings)
def load(path):
    idx = bt._new_pkgindex()
    with open(path, encoding="utf-8") as f:
        idx.read(f)
    return idx
a, b = load(orig), load(os.path.join(binhost, "Packages"))
assert bt._pkgindex_version_supported(b), b.header
ha = {k: v for k, v in a.header.items() if k != "TIMESTAMP"}
hb = {k: v for k, v in b.header.items() if k != "TIMESTAMP"}
assert ha == hb, (ha, hb)
key = lambda d: (d["CPV"], d.get("BUILD_ID"))
assert sorted(a.packages, key=key) == sorted(b.packages, key=key), (a.packages, b.packages)
bt.populate(getbinpkgs=True, getbinpkg_refresh=True)
out = []
for cpv in sorted(bt.dbapi.cpv_all(), key=str):
    d = bt._remotepkgs[bt.dbapi._instance_key(cpv)]
    out.append([str(cpv), cpv.build_id, d.get("USE"), d.get("PATH"), b.header["TIMESTAMP"]])
print(json.dumps(out))
"#;

        pub(super) fn run() {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let workspace = workspace.canonicalize().expect("workspace root");
            // Canonical: bwrap mounts over it (a worktree's `.venv` may be a symlink).
            let venv = workspace.join(".venv").canonicalize().unwrap_or_else(|_| workspace.join(".venv"));
            assert!(
                venv.join("bin/emerge").is_file() && venv.join("bin/python").is_file(),
                "{} has no portage (bin/emerge, bin/python); run scripts/test.sh to install it",
                venv.display()
            );
            let tmp = tempfile::tempdir().expect("tempdir");
            let env = Env { venv: venv.clone(), repo: workspace.join("tests/fixtures/repo"), w: tmp.path().join("w") };
            env.setup();
            env.emerge("app-misc/hello", "app-misc/hello-2.12-r1", Some("foo"));
            env.emerge("app-misc/uses-libfoo", "app-misc/uses-libfoo-1.0", None);

            let pkgdir = env.w.join("pkgdir");
            let original = std::fs::read_to_string(pkgdir.join("Packages")).expect("Packages");
            let index = parse(&original).expect("parse portage's Packages");
            let expect = [
                ("app-misc/hello-2.12-r1", "app-misc/hello/hello-2.12-r1-1.gpkg.tar"),
                ("app-misc/uses-libfoo-1.0", "app-misc/uses-libfoo/uses-libfoo-1.0-1.gpkg.tar"),
                ("dev-libs/libfoo-1.0", "dev-libs/libfoo/libfoo-1.0-1.gpkg.tar"),
            ];
            assert_eq!(index.packages.len(), expect.len(), "{original}");
            for (entry, (cpv, path)) in index.packages.iter().zip(expect) {
                assert_eq!(entry.cpv(), Some(cpv), "{original}");
                assert_eq!(entry.build_id(), Some(1));
                assert_eq!(entry.path(), Some(path));
                let on_disk = std::fs::metadata(pkgdir.join(path)).expect("binpkg").len();
                assert_eq!(entry.size(), Some(on_disk));
                for key in ["BUILD_TIME", "MD5", "SHA1", "MTIME", "USE", "DEFINED_PHASES"] {
                    assert!(entry.get(key).is_some_and(|v| !v.is_empty()), "{key} in {entry:?}");
                }
                assert_eq!(entry.get("REPO"), Some("pacloud-fixtures"));
                assert_eq!(entry.get("EAPI"), Some("8"));
                assert_eq!(entry.get("SLOT"), Some("0"));
                assert_eq!(entry.get("CHOST"), Some("x86_64-pc-linux-gnu"));
            }
            let hello = &index.packages[0];
            assert!(hello.use_flags().iter().any(|f| f == "foo"), "{hello:?}");
            assert!(!hello.use_flags().iter().any(|f| f == "bar"), "{hello:?}");
            assert_eq!(hello.get("IUSE"), Some("foo bar"));
            assert_eq!(index.packages[1].get("RDEPEND"), Some("dev-libs/libfoo"));

            // Rendering portage's own index reproduces it byte for byte.
            assert_eq!(index.render().expect("render"), original);

            // A service-side index assembled from the build's entries, in
            // another order, with a duplicate replaced and a new TIMESTAMP.
            let mut service = PackageIndex { header: index.header.clone(), packages: Vec::new() };
            let old_ts: u64 = index.header["TIMESTAMP"].parse().expect("TIMESTAMP");
            service.set_timestamp(old_ts + 1);
            let mut stale = index.packages[0].clone();
            stale.fields.insert("USE".into(), "stale".into());
            service.merge([stale]);
            service.merge(index.packages.iter().rev().cloned());
            assert_eq!(service.packages.len(), 3);
            let rendered = service.render().expect("render");
            assert_ne!(rendered, original);

            let binhost = tmp.path().join("binhost");
            link_packages(&pkgdir, &binhost);
            std::fs::write(binhost.join("Packages"), &rendered).expect("write Packages");

            // A client configuration for portage's reader.
            let client = tmp.path().join("client");
            let client_portage = client.join("config/etc/portage");
            std::fs::create_dir_all(&client_portage).expect("mkdir");
            std::fs::create_dir_all(client.join("root")).expect("mkdir");
            std::fs::create_dir_all(client.join("pkgdir")).expect("mkdir");
            std::os::unix::fs::symlink(env.repo.join("profiles/default"), client_portage.join("make.profile"))
                .expect("make.profile");
            std::fs::write(
                client_portage.join("make.conf"),
                format!("PKGDIR=\"{}\"\nFEATURES=\"binpkg-multi-instance\"\n", client.join("pkgdir").display()),
            )
            .expect("make.conf");

            let out = Command::new(venv.join("bin/python"))
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("HOME", tmp.path())
                .env("LANG", "C.UTF-8")
                .env("PORTAGE_REPOSITORIES", env.repos_conf())
                .arg("-c")
                .arg(PY_CHECK)
                .arg(client.join("config"))
                .arg(client.join("root"))
                .arg(client.join("pkgdir"))
                .arg(pkgdir.join("Packages"))
                .arg(&binhost)
                .output()
                .expect("run python");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "portage rejected our Packages: {}\n--- stdout\n{stdout}\n--- stderr\n{}\n--- ours\n{rendered}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let seen: Vec<(String, u64, String, String, String)> =
                serde_json::from_str(stdout.trim()).expect("python output");
            let ts = (old_ts + 1).to_string();
            let want: Vec<(String, u64, String, String, String)> = index
                .packages
                .iter()
                .map(|e| {
                    (
                        e.cpv().unwrap_or_default().to_owned(),
                        e.build_id().unwrap_or_default(),
                        e.get("USE").unwrap_or_default().to_owned(),
                        e.path().unwrap_or_default().to_owned(),
                        ts.clone(),
                    )
                })
                .collect();
            assert_eq!(seen, want);
        }
    }
}
