//! The estimated wait of a queued build (`eta_s` on a 202): a pure function
//! of the queue position, the live workers and the build times of finished
//! records, plus [`BuildHistory`], the bounded record of those build times
//! that [`crate::service::BuildService`] keeps from the finished records it
//! reads. [`crate::stats`] persists the same bounded history in the
//! artifact store for the fleet scaler and the workers.
//!
//! The estimate: the builds ahead are served `workers` at a time, each round
//! taking the median build time of all atoms; then this build takes its
//! atom's median (the median of all atoms when the atom has no history).
//! No estimate without a live worker (the fleet may be scaled to zero: when
//! one starts is the scaler's decision, not a queue figure) or without any
//! history.

use std::collections::{HashMap, VecDeque};

/// Build times kept per atom (the newest).
pub const PER_ATOM: usize = 16;
/// Build times kept over all atoms (the newest).
pub const ALL_ATOMS: usize = 512;
/// Atoms tracked at most; beyond it the per-atom history starts over.
pub const MAX_ATOMS: usize = 20_000;

/// Recent build seconds of finished builds, per atom and over all atoms.
#[derive(Debug, Clone, Default)]
pub struct BuildHistory {
    per_atom: HashMap<String, VecDeque<f64>>,
    all: VecDeque<f64>,
}

impl BuildHistory {
    /// Adds one finished build of `atom` that took `seconds` (ignored unless finite and > 0).
    pub fn record(&mut self, atom: &str, seconds: f64) {
        if !(seconds.is_finite() && seconds > 0.0) {
            return;
        }
        if self.per_atom.len() >= MAX_ATOMS && !self.per_atom.contains_key(atom) {
            self.per_atom.clear();
        }
        let q = self.per_atom.entry(atom.to_owned()).or_default();
        push_bounded(q, seconds, PER_ATOM);
        push_bounded(&mut self.all, seconds, ALL_ATOMS);
    }

    /// Median build seconds of `atom`, if it has history.
    pub fn atom_median(&self, atom: &str) -> Option<f64> {
        self.per_atom.get(atom).and_then(|q| median(q.iter().copied()))
    }

    /// Median build seconds over all atoms, if any build finished.
    pub fn all_median(&self) -> Option<f64> {
        median(self.all.iter().copied())
    }
}

fn push_bounded(q: &mut VecDeque<f64>, v: f64, cap: usize) {
    if q.len() >= cap {
        q.pop_front();
    }
    q.push_back(v);
}

/// The median of `values` (the mean of the two middle ones for an even
/// count); None when there are none.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Seconds until a queued build is expected to be done: `ahead` builds
/// queued before it, `workers` live workers (one build each), the median
/// build time of all atoms and of this build's atom. None when it cannot be
/// estimated (no live worker, or no history at all).
pub fn estimate_eta_s(ahead: u64, workers: u64, all_median_s: Option<f64>, atom_median_s: Option<f64>) -> Option<u64> {
    if workers == 0 {
        return None;
    }
    let all = all_median_s?;
    let own = atom_median_s.unwrap_or(all);
    let rounds = ahead.div_ceil(workers);
    let eta = rounds as f64 * all + own;
    eta.is_finite().then(|| eta.round().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_are_per_atom_and_over_all_and_bounded() {
        let mut h = BuildHistory::default();
        assert_eq!((h.atom_median("a/b"), h.all_median()), (None, None));
        for s in [100.0, 300.0, 200.0] {
            h.record("a/b", s);
        }
        h.record("c/d", 1000.0);
        h.record("c/d", f64::NAN);
        h.record("c/d", -1.0);
        assert_eq!(h.atom_median("a/b"), Some(200.0));
        assert_eq!(h.atom_median("c/d"), Some(1000.0));
        assert_eq!(h.all_median(), Some(250.0), "median of 100, 200, 300, 1000");
        for _ in 0..PER_ATOM {
            h.record("a/b", 50.0);
        }
        assert_eq!(h.atom_median("a/b"), Some(50.0), "only the newest {PER_ATOM} count");
        assert!(h.all.len() <= ALL_ATOMS);
    }

    #[test]
    fn eta_counts_rounds_of_the_queue_then_the_own_build() {
        // Alone in the queue, one worker: its own atom's median.
        assert_eq!(estimate_eta_s(0, 1, Some(300.0), Some(60.0)), Some(60));
        // 5 ahead on 2 workers: 3 rounds of the overall median, then its own.
        assert_eq!(estimate_eta_s(5, 2, Some(300.0), Some(60.0)), Some(960));
        // No history of this atom: the overall median stands in.
        assert_eq!(estimate_eta_s(2, 2, Some(300.0), None), Some(600));
        // Cannot estimate: no worker, or no history at all.
        assert_eq!(estimate_eta_s(0, 0, Some(300.0), Some(60.0)), None);
        assert_eq!(estimate_eta_s(0, 3, None, None), None);
    }
}
