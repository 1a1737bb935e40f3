//! The request grammar: validated newtypes for a package atom
//! (`category/package`), a PMS version, and USE flags with their sign.
//!
//! Every type is built only through `parse`/`FromStr`, which accepts exactly
//! the grammar in DESIGN.md section 2 (ASCII only, with length limits) and
//! rejects everything else with a [`GrammarError`] naming the rule. Shell
//! metacharacters, path separators, `..`, NUL and non-ASCII are rejected
//! because they are not in the grammar, not because they are on a list.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Longest accepted category name.
pub const MAX_CATEGORY_LEN: usize = 64;
/// Longest accepted package name.
pub const MAX_PACKAGE_LEN: usize = 100;
/// Longest accepted version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Longest accepted USE flag name (without its sign).
pub const MAX_USE_FLAG_LEN: usize = 64;
/// Most USE flags accepted in one request.
pub const MAX_USE_FLAGS: usize = 256;

/// Why a value does not match the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} characters long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("contains '{found}' at position {pos}; allowed: {allowed}")]
    BadChar { found: String, pos: usize, allowed: &'static str },
    #[error("starts with '{found}'; it must start with {allowed}")]
    BadStart { found: String, allowed: &'static str },
    #[error("must have the form category/package with exactly one '/'")]
    AtomForm,
    #[error("must not end in '-' followed by a version (ends in '-{suffix}'); give the version separately")]
    EndsInVersion { suffix: String },
    #[error("is not a PMS version ({why}); expected e.g. 1.2.3, 2.12-r1, 1.0_rc2, 3.1a_p20240101")]
    Version { why: &'static str },
    #[error("has {count} USE flags; at most {max} are allowed")]
    TooManyFlags { count: usize, max: usize },
    #[error("must have the form category/package-version, e.g. app-misc/hello-2.12-r1")]
    VersionedAtomForm,
}

fn escape(c: char) -> String {
    c.escape_default().collect()
}

/// Checks `s` against "first char in `first`, then chars in `rest`".
fn check_chars(
    s: &str,
    max: usize,
    first: fn(u8) -> bool,
    first_desc: &'static str,
    rest: fn(u8) -> bool,
    rest_desc: &'static str,
) -> Result<(), GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    let len = s.chars().count();
    if len > max {
        return Err(GrammarError::TooLong { len, max });
    }
    for (pos, c) in s.chars().enumerate() {
        let ok = c.is_ascii() && if pos == 0 { first(c as u8) } else { rest(c as u8) };
        if !ok {
            if pos == 0 && c.is_ascii() && rest(c as u8) {
                return Err(GrammarError::BadStart { found: escape(c), allowed: first_desc });
            }
            return Err(GrammarError::BadChar {
                found: escape(c),
                pos,
                allowed: if pos == 0 { first_desc } else { rest_desc },
            });
        }
    }
    Ok(())
}

fn alnum_us(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A category name such as `app-misc`: `[A-Za-z0-9_][A-Za-z0-9+_.-]*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Category(String);
string_newtype!(Category);

impl FromStr for Category {
    type Err = GrammarError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_chars(
            s,
            MAX_CATEGORY_LEN,
            alnum_us,
            "A-Z a-z 0-9 _",
            |b| alnum_us(b) || matches!(b, b'+' | b'.' | b'-'),
            "A-Z a-z 0-9 + _ . -",
        )?;
        Ok(Category(s.to_owned()))
    }
}

/// A package name such as `hello`: `[A-Za-z0-9_][A-Za-z0-9+_-]*`, not ending
/// in `-` followed by a valid version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackageName(String);
string_newtype!(PackageName);

impl FromStr for PackageName {
    type Err = GrammarError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_chars(
            s,
            MAX_PACKAGE_LEN,
            alnum_us,
            "A-Z a-z 0-9 _",
            |b| alnum_us(b) || matches!(b, b'+' | b'-'),
            "A-Z a-z 0-9 + _ -",
        )?;
        for (i, _) in s.match_indices('-') {
            let suffix = &s[i + 1..];
            if check_version(suffix).is_ok() {
                return Err(GrammarError::EndsInVersion { suffix: suffix.to_owned() });
            }
        }
        Ok(PackageName(s.to_owned()))
    }
}

/// `category/package`, without version or operator.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Atom {
    category: Category,
    package: PackageName,
}

impl Atom {
    pub fn new(category: Category, package: PackageName) -> Self {
        Atom { category, package }
    }
    pub fn category(&self) -> &Category {
        &self.category
    }
    pub fn package(&self) -> &PackageName {
        &self.package
    }
}

/// Which part of an atom was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtomError {
    #[error("{0}")]
    Form(GrammarError),
    #[error("category {0}")]
    Category(GrammarError),
    #[error("package name {0}")]
    Package(GrammarError),
}

impl FromStr for Atom {
    type Err = AtomError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(AtomError::Form(GrammarError::Empty));
        }
        let max = MAX_CATEGORY_LEN + 1 + MAX_PACKAGE_LEN;
        let len = s.chars().count();
        if len > max {
            return Err(AtomError::Form(GrammarError::TooLong { len, max }));
        }
        let (cat, pkg) = s.split_once('/').ok_or(AtomError::Form(GrammarError::AtomForm))?;
        if pkg.contains('/') {
            return Err(AtomError::Form(GrammarError::AtomForm));
        }
        Ok(Atom {
            category: cat.parse().map_err(AtomError::Category)?,
            package: pkg.parse().map_err(AtomError::Package)?,
        })
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.category, self.package)
    }
}

impl Serialize for Atom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Atom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A version in PMS syntax:
/// `[0-9]+(\.[0-9]+)*[a-z]?((_alpha|_beta|_pre|_rc|_p)[0-9]*)*(-r[0-9]+)?`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(String);
string_newtype!(Version);

fn check_version(s: &str) -> Result<(), GrammarError> {
    let v = |why| Err(GrammarError::Version { why });
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    let len = s.chars().count();
    if len > MAX_VERSION_LEN {
        return Err(GrammarError::TooLong { len, max: MAX_VERSION_LEN });
    }
    if let Some((pos, c)) = s.char_indices().find(|(_, c)| !c.is_ascii()) {
        return Err(GrammarError::BadChar { found: escape(c), pos, allowed: "0-9 a-z . _ -" });
    }
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return v("it must start with a digit");
    }
    while i < b.len() && b[i] == b'.' {
        i += 1;
        if !digits(&mut i) {
            return v("a '.' must be followed by digits");
        }
    }
    if i < b.len() && b[i].is_ascii_lowercase() {
        i += 1;
    }
    while i < b.len() && b[i] == b'_' {
        i += 1;
        let rest = &s[i..];
        let Some(word) = ["alpha", "beta", "pre", "rc", "p"].into_iter().find(|w| rest.starts_with(w)) else {
            return v("a '_' must be followed by alpha, beta, pre, rc or p");
        };
        i += word.len();
        digits(&mut i);
    }
    if i < b.len() && b[i] == b'-' {
        if s[i..].starts_with("-r") {
            i += 2;
            if !digits(&mut i) {
                return v("'-r' must be followed by digits");
            }
        } else {
            return v("a '-' may only start a revision such as -r1");
        }
    }
    if i != b.len() {
        return v("unexpected characters after the version");
    }
    Ok(())
}

impl FromStr for Version {
    type Err = GrammarError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_version(s)?;
        Ok(Version(s.to_owned()))
    }
}

/// One USE flag with its sign: `foo` or `+foo` turns it on, `-foo` off.
/// The name matches `[A-Za-z0-9][A-Za-z0-9+_@-]*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UseFlag {
    name: String,
    enabled: bool,
}

impl UseFlag {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

impl FromStr for UseFlag {
    type Err = GrammarError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (enabled, name) = match s.as_bytes().first() {
            Some(b'-') => (false, &s[1..]),
            Some(b'+') => (true, &s[1..]),
            _ => (true, s),
        };
        check_chars(
            name,
            MAX_USE_FLAG_LEN,
            |b| b.is_ascii_alphanumeric(),
            "A-Z a-z 0-9 (after an optional + or - sign)",
            |b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'_' | b'@' | b'-'),
            "A-Z a-z 0-9 + _ @ -",
        )?;
        Ok(UseFlag { name: name.to_owned(), enabled })
    }
}

impl fmt::Display for UseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.enabled { write!(f, "{}", self.name) } else { write!(f, "-{}", self.name) }
    }
}

/// A normalised set of USE flags: one entry per name (the last sign given
/// wins), ordered by name (bytewise). Order, duplicates, `+` prefixes and
/// whitespace in the input never change it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct UseSet(BTreeMap<String, bool>);

impl UseSet {
    /// Normalises parsed flags: last sign wins.
    pub fn from_flags<I: IntoIterator<Item = UseFlag>>(flags: I) -> Self {
        let mut m = BTreeMap::new();
        for f in flags {
            m.insert(f.name, f.enabled);
        }
        UseSet(m)
    }

    /// Parses a list of flag strings. Each element may itself hold several
    /// flags separated by ASCII whitespace. On error returns the index of
    /// the offending element.
    pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<Self, (usize, GrammarError)> {
        Self::parse_list_max(items, MAX_USE_FLAGS)
    }

    fn parse_list_max<S: AsRef<str>>(items: &[S], max: usize) -> Result<Self, (usize, GrammarError)> {
        let mut flags = Vec::new();
        for (i, item) in items.iter().enumerate() {
            for word in item.as_ref().split(|c: char| c.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
                flags.push(word.parse::<UseFlag>().map_err(|e| (i, e))?);
                if flags.len() > max {
                    return Err((i, GrammarError::TooManyFlags { count: flags.len(), max }));
                }
            }
        }
        Ok(Self::from_flags(flags))
    }

    /// Parses one space-separated string such as `"foo -bar +baz"`.
    pub fn parse_str(s: &str) -> Result<Self, GrammarError> {
        Self::parse_list(&[s]).map_err(|(_, e)| e)
    }

    /// A set from names and states that are already known to be flags
    /// (IUSE names of a tree index).
    pub(crate) fn from_states<I: IntoIterator<Item = (String, bool)>>(states: I) -> Self {
        UseSet(states.into_iter().collect())
    }

    /// The requested state of `name`, if the set names it.
    pub fn get(&self, name: &str) -> Option<bool> {
        self.0.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, bool)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The flags turned on, by name.
    pub fn enabled(&self) -> impl Iterator<Item = &str> {
        self.iter().filter(|(_, on)| *on).map(|(n, _)| n)
    }
    /// Canonical form: every flag with an explicit sign (`+foo -bar`), by name.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        for (i, (name, on)) in self.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push(if on { '+' } else { '-' });
            out.push_str(name);
        }
        out
    }
    /// Portage form for `package.use`: `foo -bar`.
    pub fn portage(&self) -> String {
        self.iter().map(|(n, on)| if on { n.to_owned() } else { format!("-{n}") }).collect::<Vec<_>>().join(" ")
    }
}

impl Serialize for UseSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (n, on) in self.iter() {
            if on { seq.serialize_element(n)? } else { seq.serialize_element(&format!("-{n}"))? }
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for UseSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Stored specs of key version 2 hold every IUSE flag of the ebuild,
        // which may be more than a request may name; jobs and records are
        // bounded by their own size limits instead.
        let v = Vec::<String>::deserialize(d)?;
        UseSet::parse_list_max(&v, usize::MAX).map_err(|(_, e)| serde::de::Error::custom(e))
    }
}

/// Splits `category/package-version` (optionally with a leading `=`) into
/// an atom and a version, the way portage reads `=cat/pkg-ver`: the version
/// starts at the first `-` whose remainder is a valid version.
pub fn parse_versioned_atom(s: &str) -> Result<(Atom, Version), GrammarError> {
    let s = s.strip_prefix('=').unwrap_or(s);
    let (cat, rest) = s.split_once('/').ok_or(GrammarError::VersionedAtomForm)?;
    for (i, _) in rest.match_indices('-') {
        if let Ok(version) = rest[i + 1..].parse::<Version>() {
            let atom: Atom = format!("{cat}/{}", &rest[..i]).parse().map_err(|e| match e {
                AtomError::Form(g) | AtomError::Category(g) | AtomError::Package(g) => g,
            })?;
            return Ok((atom, version));
        }
    }
    Err(GrammarError::VersionedAtomForm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories() {
        for ok in ["app-misc", "dev-libs", "x11-libs", "_x", "a+b.c-d", "A", "0"] {
            assert!(ok.parse::<Category>().is_ok(), "{ok}");
        }
        for bad in
            ["", "-app", ".app", "+app", "app misc", "app/misc", "..", "a;b", "a$b", "é", "a\0b", &"a".repeat(65)]
        {
            assert!(bad.parse::<Category>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn packages() {
        for ok in ["hello", "gtk+", "foo-bar", "foo-x1", "foo-bar2", "_x", "libfoo-2-x", "foo-1a-b"] {
            assert!(ok.parse::<PackageName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-foo",
            "+foo",
            "foo.bar",
            "foo-1",
            "foo-1.0",
            "foo-1.0-r1",
            "foo-1a",
            "foo-1x",
            "foo-2_p3",
            "a b",
            "a/b",
            "..",
            "a`b`",
            "ü",
        ] {
            assert!(bad.parse::<PackageName>().is_err(), "{bad:?}");
        }
        assert_eq!("foo-1a".parse::<PackageName>(), Err(GrammarError::EndsInVersion { suffix: "1a".into() }));
    }

    #[test]
    fn versions() {
        for ok in [
            "1",
            "1.0",
            "2.12-r1",
            "1.0a",
            "1.0_alpha",
            "1.0_alpha1_beta2_pre_rc3_p4-r5",
            "0.0.0.1",
            "20240101",
            "1.0-r0",
            "1.0-r01",
            "1_p",
            "01.002",
        ] {
            assert!(ok.parse::<Version>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a",
            "1.",
            ".1",
            "1..2",
            "1.0A",
            "1.0ab",
            "1.0_gamma",
            "1.0-r",
            "1.0-rc1",
            "1.0-",
            "1.0_",
            "v1",
            "1.0 ",
            "1,0",
            "1.0-r1-r2",
            "１",
            "1.0\n",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn use_flags() {
        for ok in ["foo", "-foo", "+foo", "python_targets_python3_12", "l10n_en-GB", "a@b", "c++", "0"] {
            assert!(ok.parse::<UseFlag>().is_ok(), "{ok}");
        }
        for bad in
            ["", "-", "+", "--foo", "-+foo", "_foo", "@foo", "foo bar", "foo;bar", "foo/bar", "föö", &"f".repeat(65)]
        {
            assert!(bad.parse::<UseFlag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn use_normalisation() {
        let a = UseSet::parse_list(&["foo", "-bar", "+baz", "bar"]).unwrap();
        let b = UseSet::parse_list(&["  bar baz\tfoo "]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.canonical(), "+bar +baz +foo");
        let c = UseSet::parse_str("foo -foo").unwrap();
        assert_eq!(c.canonical(), "-foo");
        assert_eq!(UseSet::parse_str("").unwrap().canonical(), "");
        assert_eq!(UseSet::parse_str("-b a").unwrap().portage(), "a -b");
        let many: Vec<String> = (0..=MAX_USE_FLAGS).map(|i| format!("f{i}")).collect();
        assert!(matches!(UseSet::parse_list(&many), Err((256, GrammarError::TooManyFlags { .. }))));
        // A stored spec (key version 2: every IUSE flag) may hold more.
        let stored: UseSet = serde_json::from_value(serde_json::json!(many)).unwrap();
        assert_eq!(stored.len(), MAX_USE_FLAGS + 1);
    }

    #[test]
    fn atoms() {
        let a: Atom = "app-misc/hello".parse().unwrap();
        assert_eq!(a.category().as_str(), "app-misc");
        assert_eq!(a.package().as_str(), "hello");
        for bad in [
            "hello",
            "app-misc/",
            "/hello",
            "a/b/c",
            "app-misc/hello-1.0",
            "../etc/passwd",
            "app-misc/..",
            "app-misc/$(id)",
        ] {
            assert!(bad.parse::<Atom>().is_err(), "{bad}");
        }
    }

    #[test]
    fn versioned_atoms() {
        let (a, v) = parse_versioned_atom("app-misc/hello-2.12-r1").unwrap();
        assert_eq!((a.to_string().as_str(), v.as_str()), ("app-misc/hello", "2.12-r1"));
        let (a, v) = parse_versioned_atom("=dev-libs/foo-bar-1.0_rc1").unwrap();
        assert_eq!((a.to_string().as_str(), v.as_str()), ("dev-libs/foo-bar", "1.0_rc1"));
        let (a, v) = parse_versioned_atom("x/libfoo-2-x-3").unwrap();
        assert_eq!((a.to_string().as_str(), v.as_str()), ("x/libfoo-2-x", "3"));
        assert!(parse_versioned_atom("app-misc/hello").is_err());
        assert!(parse_versioned_atom("hello-1.0").is_err());
    }
}
