//! The build history on the real directory store: appends by
//! compare-and-swap lose no acknowledged entry under concurrency, stay
//! bounded, replace a corrupt object, and the atom's median reads back.

use pacloud_domain::ports::{ArtifactPath, ArtifactStore};
use pacloud_domain::stats::{self, BuildTimes};
use pacloud_domain::{Atom, SystemClock};
use pacloud_local::{DirArtifactStore, SigningKey};
use pacloud_worker::stats::{APPEND_ATTEMPTS, StatsError, append, atom_median, record_build};
use std::path::Path;
use std::sync::Arc;

fn store(dir: &Path) -> Arc<DirArtifactStore> {
    Arc::new(
        DirArtifactStore::new(
            dir.join("store"),
            "http://127.0.0.1:1",
            SigningKey::new(&[1; 32]),
            Arc::new(SystemClock),
        )
        .unwrap(),
    )
}

async fn stored(store: &DirArtifactStore, path: &ArtifactPath) -> BuildTimes {
    BuildTimes::decode(&store.get(path).await.unwrap()).unwrap()
}

fn atom(s: &str) -> Atom {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_lose_no_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let path = ArtifactPath::parse("stats/atoms/app-misc/race.json").unwrap();
    // Enough attempts that every one of 12 racing appenders gets in: all 12 are there.
    let tasks: Vec<_> = (1..=12)
        .map(|i| {
            let (store, path) = (store.clone(), path.clone());
            tokio::spawn(async move { append(&*store, &path, f64::from(i), 200).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every append gets in");
    }
    let mut got = stored(&store, &path).await.seconds;
    got.sort_by(f64::total_cmp);
    assert_eq!(got, (1..=12).map(f64::from).collect::<Vec<_>>());

    // With the worker's bound of attempts, an append may give up under this
    // much contention, but every append that reported success is stored.
    let all = stats::all_path();
    let tasks: Vec<_> = (1..=24)
        .map(|i| {
            let (store, all) = (store.clone(), all.clone());
            tokio::spawn(async move { (i, append(&*store, &all, f64::from(i), APPEND_ATTEMPTS).await) })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (i, Ok(attempts)) => {
                assert!((1..=APPEND_ATTEMPTS).contains(&attempts));
                acknowledged.push(f64::from(i));
            }
            (_, Err(e)) => assert!(matches!(e, StatsError::Contended { attempts: APPEND_ATTEMPTS, .. }), "{e}"),
        }
    }
    assert!(!acknowledged.is_empty());
    let mut got = stored(&store, &all).await.seconds;
    got.sort_by(f64::total_cmp);
    acknowledged.sort_by(f64::total_cmp);
    assert_eq!(got, acknowledged, "exactly the acknowledged appends");
}

#[tokio::test]
async fn builds_are_recorded_per_atom_and_over_all_bounded_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let hello = atom("app-misc/hello");
    assert_eq!(atom_median(&*store, &hello).await.unwrap(), None, "no history yet");
    for s in [30.0, 10.0, 20.0] {
        assert!(record_build(&*store, &hello, s).await.is_empty());
    }
    assert!(record_build(&*store, &atom("dev-libs/libfoo"), 500.0).await.is_empty());
    let own = stats::atom_path(&hello).unwrap();
    assert_eq!(own.as_str(), "stats/atoms/app-misc/hello.json");
    assert!(dir.path().join("store/stats/atoms/app-misc/hello.json").is_file());
    assert_eq!(stored(&store, &own).await.seconds, vec![30.0, 10.0, 20.0]);
    assert_eq!(stored(&store, &stats::all_path()).await.seconds, vec![30.0, 10.0, 20.0, 500.0]);
    assert_eq!(atom_median(&*store, &hello).await.unwrap(), Some(20.0));
    assert_eq!(atom_median(&*store, &atom("dev-libs/libfoo")).await.unwrap(), Some(500.0));
    // Bounded: the newest 16 of the atom.
    for s in 1..=20 {
        record_build(&*store, &hello, f64::from(s)).await;
    }
    let kept = stored(&store, &own).await.seconds;
    assert_eq!(kept, (5..=20).map(f64::from).collect::<Vec<_>>());
    assert_eq!(stored(&store, &stats::all_path()).await.len(), 24);
}

#[tokio::test]
async fn a_corrupt_history_reads_as_none_and_is_replaced_by_the_next_build() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let hello = atom("app-misc/hello");
    let own = stats::atom_path(&hello).unwrap();
    store.put_bytes(&own, b"\x00garbage{".to_vec(), "application/json").await.unwrap();
    store.put_bytes(&stats::all_path(), br#"{"v":1,"seconds":"#.to_vec(), "application/json").await.unwrap();
    assert_eq!(atom_median(&*store, &hello).await.unwrap(), None, "unreadable: no expected end, no error");
    assert!(record_build(&*store, &hello, 42.0).await.is_empty(), "a corrupt object does not fail the append");
    assert_eq!(stored(&store, &own).await.seconds, vec![42.0]);
    assert_eq!(stored(&store, &stats::all_path()).await.seconds, vec![42.0]);
    assert_eq!(atom_median(&*store, &hello).await.unwrap(), Some(42.0));
}
