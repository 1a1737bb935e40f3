//! The build history kept in the artifact store, shared by every worker and
//! read by the fleet scaler: two kinds of small JSON objects, each the newest
//! build seconds of successful builds, oldest first.
//!
//! - `stats/atoms/<category>/<name>.json`: the newest [`PER_ATOM`] builds of
//!   one atom (all versions and USE). A worker starting a build of the atom
//!   reads it and reports `start + median` as the build's expected end.
//! - `stats/all.json`: the newest [`ALL_ATOMS`] builds over all atoms. The
//!   scaler reads it for `median_build_s` (only from [`MIN_FLEET_BUILDS`]
//!   builds on, like the simulator).
//!
//! The bounds and the median are [`crate::eta`]'s (the API's in-process
//! [`crate::eta::BuildHistory`] keeps the same shape). This module is the
//! pure part: the format, the bounded append, the median, the paths. The
//! worker writes the objects by compare-and-swap through the
//! [`crate::ports::ArtifactStore`] port (`get_versioned` / `put_bytes_if`).
//! A stored object that cannot be decoded is treated as empty (and replaced
//! by the next append): a corrupt statistic must never stop a build.
//!
//! Format (version 1): `{"v":1,"seconds":[312.5,290.0,...]}`.

use serde::{Deserialize, Serialize};

use crate::Atom;
use crate::eta::{self, ALL_ATOMS, PER_ATOM};
use crate::ports::{ArtifactPath, BadArtifactPath};

/// The history over all atoms.
pub const ALL_PATH: &str = "stats/all.json";
/// Where the per-atom histories live (`<prefix><category>/<name>.json`).
pub const ATOMS_PREFIX: &str = "stats/atoms/";
/// The format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Builds over all atoms before their median sizes the fleet (the
/// simulator's `median_done` waits for as many).
pub const MIN_FLEET_BUILDS: usize = 5;

/// The path of the history over all atoms.
pub fn all_path() -> ArtifactPath {
    ArtifactPath::parse(ALL_PATH).expect("a valid constant path")
}

/// The path of `atom`'s history: `stats/atoms/<category>/<name>.json`.
pub fn atom_path(atom: &Atom) -> Result<ArtifactPath, BadArtifactPath> {
    ArtifactPath::parse(&format!("{ATOMS_PREFIX}{}/{}.json", atom.category(), atom.package()))
}

/// Which history a path holds, and so how many builds it keeps.
pub fn cap_for(path: &ArtifactPath) -> usize {
    if path.as_str() == ALL_PATH { ALL_ATOMS } else { PER_ATOM }
}

/// A stored object that is not a version-1 history.
#[derive(Debug, thiserror::Error)]
pub enum StatsDecodeError {
    #[error("not a build history in JSON")]
    Json(#[from] serde_json::Error),
    #[error("build history format version {0}; this code reads {FORMAT_VERSION}")]
    Version(u32),
}

/// One stored history: build seconds, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildTimes {
    pub v: u32,
    pub seconds: Vec<f64>,
}

impl Default for BuildTimes {
    fn default() -> Self {
        BuildTimes { v: FORMAT_VERSION, seconds: Vec::new() }
    }
}

fn valid(seconds: f64) -> bool {
    seconds.is_finite() && seconds > 0.0
}

impl BuildTimes {
    /// Reads a stored object. Values that are not a positive number of
    /// seconds are dropped (they would only skew the median).
    pub fn decode(bytes: &[u8]) -> Result<BuildTimes, StatsDecodeError> {
        #[derive(Deserialize)]
        struct Raw {
            v: u32,
            seconds: Vec<serde_json::Value>,
        }
        let raw: Raw = serde_json::from_slice(bytes)?;
        if raw.v != FORMAT_VERSION {
            return Err(StatsDecodeError::Version(raw.v));
        }
        let seconds = raw.seconds.iter().filter_map(serde_json::Value::as_f64).filter(|s| valid(*s)).collect();
        Ok(BuildTimes { v: FORMAT_VERSION, seconds })
    }

    /// Reads a stored object, or an empty history when there is none or it
    /// cannot be decoded (the error is returned for a warning).
    pub fn decode_or_empty(bytes: Option<&[u8]>) -> (BuildTimes, Option<StatsDecodeError>) {
        match bytes.map(BuildTimes::decode) {
            None => (BuildTimes::default(), None),
            Some(Ok(t)) => (t, None),
            Some(Err(e)) => (BuildTimes::default(), Some(e)),
        }
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("numbers serialize")
    }

    /// Appends one build of `seconds` (rounded to milliseconds) and keeps
    /// the newest `cap`. Returns false (and changes nothing) unless
    /// `seconds` is finite and positive.
    pub fn push(&mut self, seconds: f64, cap: usize) -> bool {
        if !valid(seconds) {
            return false;
        }
        self.seconds.push(((seconds * 1000.0).round() / 1000.0).max(0.001));
        let over = self.seconds.len().saturating_sub(cap);
        self.seconds.drain(..over);
        true
    }

    /// The builds recorded.
    pub fn len(&self) -> usize {
        self.seconds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seconds.is_empty()
    }

    /// The median build seconds, if any build is recorded.
    pub fn median(&self) -> Option<f64> {
        eta::median(self.seconds.iter().copied())
    }

    /// The fleet policy's `median_build_s`: the median in whole seconds
    /// (at least 1), only from [`MIN_FLEET_BUILDS`] builds on.
    pub fn fleet_median_s(&self) -> Option<u64> {
        if self.len() < MIN_FLEET_BUILDS {
            return None;
        }
        self.median().map(|m| m.round().max(1.0) as u64)
    }
}

/// One append of the compare-and-swap loop: the object's next content from
/// its current one (`None`: absent) plus a build of `seconds`, keeping the
/// newest `cap`. A current object that cannot be decoded counts as empty;
/// its error is returned for the caller's warning.
pub fn appended(current: Option<&[u8]>, seconds: f64, cap: usize) -> (Vec<u8>, Option<StatsDecodeError>) {
    let (mut times, error) = BuildTimes::decode_or_empty(current);
    times.push(seconds, cap);
    (times.encode(), error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_atom_and_the_caps_follow_them() {
        let atom: Atom = "app-misc/hello".parse().unwrap();
        let p = atom_path(&atom).unwrap();
        assert_eq!(p.as_str(), "stats/atoms/app-misc/hello.json");
        assert_eq!(cap_for(&p), PER_ATOM);
        assert_eq!(all_path().as_str(), "stats/all.json");
        assert_eq!(cap_for(&all_path()), ALL_ATOMS);
        let odd: Atom = "dev-cpp/libxml++_x".parse().unwrap();
        assert_eq!(atom_path(&odd).unwrap().as_str(), "stats/atoms/dev-cpp/libxml++_x.json");
    }

    #[test]
    fn append_is_bounded_and_keeps_the_newest() {
        let mut t = BuildTimes::default();
        for s in 1..=20 {
            assert!(t.push(f64::from(s), PER_ATOM));
        }
        assert_eq!(t.len(), PER_ATOM);
        assert_eq!(t.seconds.first(), Some(&5.0), "the four oldest dropped");
        assert_eq!(t.seconds.last(), Some(&20.0));
        for bad in [0.0, -3.0, f64::NAN, f64::INFINITY] {
            assert!(!t.push(bad, PER_ATOM), "{bad}");
        }
        assert_eq!(t.len(), PER_ATOM);
        let mut all = BuildTimes::default();
        for s in 0..(ALL_ATOMS + 100) {
            all.push(1.0 + s as f64, ALL_ATOMS);
        }
        assert_eq!(all.len(), ALL_ATOMS);
        assert_eq!(all.seconds[0], 101.0);
        // Rounded to milliseconds: the object stays small.
        let mut r = BuildTimes::default();
        r.push(12.345_678, 4);
        assert_eq!(r.seconds, vec![12.346]);
        assert_eq!(String::from_utf8(r.encode()).unwrap(), r#"{"v":1,"seconds":[12.346]}"#);
    }

    #[test]
    fn medians_and_the_fleet_threshold() {
        let mut t = BuildTimes::default();
        assert_eq!((t.median(), t.fleet_median_s()), (None, None));
        for s in [100.0, 300.0, 200.0, 1000.0] {
            t.push(s, PER_ATOM);
        }
        assert_eq!(t.median(), Some(250.0), "the mean of the middle two of 100, 200, 300, 1000");
        assert_eq!(t.fleet_median_s(), None, "four builds: not yet for the fleet");
        t.push(50.0, PER_ATOM);
        assert_eq!(t.median(), Some(200.0));
        assert_eq!(t.fleet_median_s(), Some(200));
        let tiny = BuildTimes { v: 1, seconds: vec![0.2; 5] };
        assert_eq!(tiny.fleet_median_s(), Some(1), "never zero");
    }

    #[test]
    fn corrupt_objects_read_as_empty_and_are_replaced() {
        for bad in [&b""[..], b"not json", b"{\"v\":1}", b"{\"v\":1,\"seconds\":{}}", b"[1,2,3]", b"\xff\xfe"] {
            let (t, e) = BuildTimes::decode_or_empty(Some(bad));
            assert!(t.is_empty() && matches!(e, Some(StatsDecodeError::Json(_))), "{bad:?}");
            let (next, e) = appended(Some(bad), 42.0, PER_ATOM);
            assert!(e.is_some());
            assert_eq!(BuildTimes::decode(&next).unwrap().seconds, vec![42.0], "{bad:?} replaced");
        }
        let (_, e) = appended(Some(br#"{"v":2,"seconds":[1]}"#), 42.0, PER_ATOM);
        assert!(matches!(e, Some(StatsDecodeError::Version(2))));
        // Junk values inside a readable object are dropped, the rest kept.
        let t = BuildTimes::decode(br#"{"v":1,"seconds":[10,"x",-1,0,null,30.5],"extra":true}"#).unwrap();
        assert_eq!(t.seconds, vec![10.0, 30.5]);
        // Absent: empty, no error.
        let (next, e) = appended(None, 7.0, PER_ATOM);
        assert!(e.is_none());
        assert_eq!(BuildTimes::decode(&next).unwrap().seconds, vec![7.0]);
        // An existing history grows by one.
        let (next, _) = appended(Some(&next), 9.0, PER_ATOM);
        assert_eq!(BuildTimes::decode(&next).unwrap().seconds, vec![7.0, 9.0]);
    }
}
