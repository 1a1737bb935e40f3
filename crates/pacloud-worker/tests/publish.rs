//! Seeding and index publishing on the real directory store: many
//! concurrent publishers all end up in the index; seeding downloads no
//! package; materializing fetches only the graph's packages, verified.

use async_trait::async_trait;
use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore, ObjectVersion, SignedUrl, StoredObject};
use pacloud_domain::{Millis, SystemClock};
use pacloud_local::{DirArtifactStore, SigningKey};
use pacloud_worker::pkgcache::PackageCache;
use pacloud_worker::{pkgindex, publish, testkit};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn store(dir: &Path) -> DirArtifactStore {
    DirArtifactStore::new(dir.join("store"), "http://127.0.0.1:1", SigningKey::new(&[1; 32]), Arc::new(SystemClock))
        .unwrap()
}

/// Counts GETs of package files (a decorator over the real store).
struct Counting {
    inner: DirArtifactStore,
    package_gets: AtomicUsize,
}

#[async_trait]
impl ArtifactStore for Counting {
    async fn put_file(&self, p: &ArtifactPath, f: &Path, s: &str) -> Result<StoredObject, ArtifactError> {
        self.inner.put_file(p, f, s).await
    }
    async fn put_file_if_absent(
        &self,
        p: &ArtifactPath,
        f: &Path,
        s: &str,
    ) -> Result<Option<StoredObject>, ArtifactError> {
        self.inner.put_file_if_absent(p, f, s).await
    }
    async fn put_bytes(&self, p: &ArtifactPath, b: Vec<u8>, c: &str) -> Result<StoredObject, ArtifactError> {
        self.inner.put_bytes(p, b, c).await
    }
    async fn get_versioned(&self, p: &ArtifactPath) -> Result<Option<(Vec<u8>, ObjectVersion)>, ArtifactError> {
        self.inner.get_versioned(p).await
    }
    async fn put_bytes_if(
        &self,
        p: &ArtifactPath,
        b: Vec<u8>,
        c: &str,
        v: Option<&ObjectVersion>,
    ) -> Result<Option<ObjectVersion>, ArtifactError> {
        self.inner.put_bytes_if(p, b, c, v).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactPath>, ArtifactError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, p: &ArtifactPath) -> Result<(), ArtifactError> {
        self.inner.delete(p).await
    }
    async fn head(&self, p: &ArtifactPath) -> Result<Option<StoredObject>, ArtifactError> {
        self.inner.head(p).await
    }
    async fn get(&self, p: &ArtifactPath) -> Result<Vec<u8>, ArtifactError> {
        if p.as_str().ends_with(".gpkg.tar") {
            self.package_gets.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(p).await
    }
    async fn signed_url(&self, p: &ArtifactPath, now: Millis, ttl: Duration) -> Result<SignedUrl, ArtifactError> {
        self.inner.signed_url(p, now, ttl).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_publishers_all_end_up_in_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(store(dir.path()));
    let publishers = 40;
    let mut tasks = Vec::new();
    for i in 0..publishers {
        let pkgdir = dir.path().join(format!("build-{i}"));
        std::fs::create_dir_all(&pkgdir).unwrap();
        let entry = testkit::package(&pkgdir, &format!("p{i}"), 1, 2048).unwrap();
        testkit::write_index(&pkgdir, vec![entry]).unwrap();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            publish::publish(&*store, "t", &pkgdir, &HashSet::new(), None, 1_800_000_000).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().len(), 1);
    }
    let text = String::from_utf8(store.get(&ArtifactPath::parse("t/Packages").unwrap()).await.unwrap()).unwrap();
    let index = pkgindex::parse(&text).unwrap();
    let cpvs: HashSet<&str> = index.packages.iter().filter_map(|e| e.cpv()).collect();
    for i in 0..publishers {
        assert!(cpvs.contains(format!("app-misc/p{i}-1.0").as_str()), "p{i} lost from the index");
    }
    assert_eq!(index.packages.len(), publishers);
    let stamp: u64 = index.header["TIMESTAMP"].parse().unwrap();
    assert!(stamp >= 1_800_000_000 + publishers as u64 - 1, "TIMESTAMP rises with every update: {stamp}");
    // The fragments can rebuild the same index (repair path).
    std::fs::remove_file(dir.path().join("store/t/Packages")).unwrap();
    assert_eq!(publish::rebuild_index(&*store, "t", 1_900_000_000).await.unwrap(), publishers);
    let rebuilt = store.get(&ArtifactPath::parse("t/Packages").unwrap()).await.unwrap();
    assert_eq!(pkgindex::parse(&String::from_utf8(rebuilt).unwrap()).unwrap().packages.len(), publishers);
}

#[tokio::test]
async fn a_dependency_published_meanwhile_is_kept_and_the_main_package_still_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    // Build A published dependency `dep` as BUILD_ID 1.
    let a = dir.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    let theirs = testkit::package(&a, "dep", 1, 100).unwrap();
    testkit::write_index(&a, vec![theirs]).unwrap();
    publish::publish(&store, "t", &a, &HashSet::new(), Some("app-misc/dep-1.0"), 1_800_000_000).await.unwrap();
    let dep = ArtifactPath::parse("t/app-misc/dep/dep-1.0-1.gpkg.tar").unwrap();
    let before = store.get(&dep).await.unwrap();
    // Build B, racing, built the same dependency as BUILD_ID 1 (other bytes) and its main package.
    let b = dir.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    let ours = testkit::package(&b, "dep", 1, 200).unwrap();
    let main = testkit::package(&b, "main", 1, 50).unwrap();
    testkit::write_index(&b, vec![ours, main]).unwrap();
    let out =
        publish::publish(&store, "t", &b, &HashSet::new(), Some("app-misc/main-1.0"), 1_800_000_001).await.unwrap();
    assert_eq!(out.iter().map(|p| p.cpv.as_str()).collect::<Vec<_>>(), ["app-misc/main-1.0"]);
    assert_eq!(store.get(&dep).await.unwrap(), before, "the first build's dependency is never overwritten");
    let index = store.get(&ArtifactPath::parse("t/Packages").unwrap()).await.unwrap();
    let index = pkgindex::parse(&String::from_utf8(index).unwrap()).unwrap();
    let dep_entry = index.packages.iter().find(|e| e.cpv() == Some("app-misc/dep-1.0")).unwrap();
    assert_eq!(dep_entry.get("SIZE"), Some("100"), "the index describes the stored dependency");
    // The requested package itself colliding is still an error (retried with a fresh BUILD_ID).
    let c = dir.path().join("c");
    std::fs::create_dir_all(&c).unwrap();
    testkit::write_index(&c, vec![testkit::package(&c, "main", 1, 60).unwrap()]).unwrap();
    let err = publish::publish(&store, "t", &c, &HashSet::new(), Some("app-misc/main-1.0"), 1_800_000_002).await;
    assert!(matches!(err, Err(publish::PublishError::Collision(_))), "{err:?}");
}

/// Publishes `n` synthetic packages of `size` bytes to target `t`.
async fn fill(store: &dyn ArtifactStore, dir: &Path, n: usize, size: usize) {
    let pkgdir = dir.join("fill");
    std::fs::create_dir_all(&pkgdir).unwrap();
    let entries: Vec<_> = (0..n).map(|i| testkit::package(&pkgdir, &format!("q{i}"), 1, size).unwrap()).collect();
    testkit::write_index(&pkgdir, entries).unwrap();
    publish::publish(store, "t", &pkgdir, &HashSet::new(), None, 1_800_000_000).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_downloads_no_package_and_materializes_only_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let store = Counting { inner: store(dir.path()), package_gets: AtomicUsize::new(0) };
    fill(&store, dir.path(), 30, 4096).await;
    let pkgdir = dir.path().join("build");
    std::fs::create_dir_all(&pkgdir).unwrap();
    let seeded = publish::seed(&store, "t", &pkgdir).await.unwrap();
    assert_eq!(store.package_gets.load(Ordering::SeqCst), 0, "seeding GETs no package");
    assert_eq!(seeded.paths.len(), 30);
    let placeholder = pkgdir.join("app-misc/q3/q3-1.0-1.gpkg.tar");
    let meta = std::fs::metadata(&placeholder).unwrap();
    assert_eq!(meta.len(), 4096, "placeholder has the index's SIZE");
    assert_eq!(meta.modified().unwrap(), std::time::UNIX_EPOCH + Duration::from_secs(testkit::MTIME));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.blocks(), 0, "placeholders are sparse");

    let cache = PackageCache::new(dir.path().join("cache"), 1 << 20);
    let graph = vec![("app-misc/q3-1.0".to_owned(), Some(1)), ("app-misc/q7-1.0".to_owned(), Some(1))];
    let bytes = publish::materialize(&store, &cache, "t", &pkgdir, &seeded, &graph).await.unwrap();
    assert_eq!(bytes, 2 * 4096);
    assert_eq!(store.package_gets.load(Ordering::SeqCst), 2, "only the graph's packages are fetched");
    let real = std::fs::read(&placeholder).unwrap();
    assert_eq!(real, std::fs::read(dir.path().join("store/t/app-misc/q3/q3-1.0-1.gpkg.tar")).unwrap());
    // A second build on this worker: from the local cache, no GET.
    let pkgdir2 = dir.path().join("build2");
    std::fs::create_dir_all(&pkgdir2).unwrap();
    let seeded2 = publish::seed(&store, "t", &pkgdir2).await.unwrap();
    publish::materialize(&store, &cache, "t", &pkgdir2, &seeded2, &graph).await.unwrap();
    assert_eq!(store.package_gets.load(Ordering::SeqCst), 2, "the worker-local cache served them");
    assert_eq!(cache.bytes_in_use().unwrap(), 2 * 4096);
    // A new cache over the same directory counts what is on disk; one too
    // small for both keeps the newest only.
    assert_eq!(PackageCache::new(dir.path().join("cache"), 1 << 20).bytes_in_use().unwrap(), 2 * 4096);
    let small = PackageCache::new(dir.path().join("small"), 6000);
    publish::materialize(&store, &small, "t", &pkgdir2, &seeded2, &graph).await.unwrap();
    assert_eq!(small.bytes_in_use().unwrap(), 4096, "bounded: the least recently used package was evicted");
    let on_disk: u64 = walk(&dir.path().join("small")).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert_eq!(on_disk, 4096);

    // Only the selected names: the build's index and placeholders hold them
    // alone; the whole index is still what this build must not publish again.
    let pkgdir3 = dir.path().join("build3");
    std::fs::create_dir_all(&pkgdir3).unwrap();
    let names = std::collections::BTreeSet::from(["app-misc/q3".to_owned(), "app-misc/q11".to_owned()]);
    let seeded3 = publish::seed_selected(&store, "t", &pkgdir3, |_| Some(names)).await.unwrap();
    let visible = pacloud_worker::pkgindex::parse(&std::fs::read_to_string(pkgdir3.join("Packages")).unwrap()).unwrap();
    let cpvs: Vec<_> = visible.packages.iter().filter_map(|e| e.cpv()).collect();
    assert_eq!(cpvs, ["app-misc/q11-1.0", "app-misc/q3-1.0"]);
    assert_eq!((seeded3.visible, seeded3.paths.len(), seeded3.index.packages.len()), (2, 30, 30));
    assert!(pkgdir3.join("app-misc/q3/q3-1.0-1.gpkg.tar").exists());
    assert!(!pkgdir3.join("app-misc/q4").exists(), "no placeholder for a name not selected");
    assert_eq!(store.package_gets.load(Ordering::SeqCst), 4, "seeding GETs no package");

    // A stored package that does not match the index is refused.
    std::fs::write(dir.path().join("store/t/app-misc/q9/q9-1.0-1.gpkg.tar"), vec![0u8; 4096]).unwrap();
    let bad = vec![("app-misc/q9-1.0".to_owned(), Some(1))];
    let e = publish::materialize(&store, &cache, "t", &pkgdir, &seeded, &bad).await.unwrap_err();
    assert!(e.to_string().contains("q9") && e.to_string().contains("SHA1"), "{e}");
    let missing = vec![("app-misc/nope-1.0".to_owned(), Some(1))];
    assert!(matches!(
        publish::materialize(&store, &cache, "t", &pkgdir, &seeded, &missing).await,
        Err(publish::PublishError::NotInIndex(_))
    ));
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_stopped_worker_beats_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let now = pacloud_domain::Millis(10_000_000);
    for (name, beat) in [("fresh", 9_990_000i64), ("stopped", 0), ("old", 10_000_000 - 3_600_001)] {
        let p = ArtifactPath::parse(&format!("workers/{name}")).unwrap();
        store.put_bytes(&p, beat.to_string().into_bytes(), "text/plain").await.unwrap();
    }
    let removed = pacloud_worker::worker::prune_beats(&store, now, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(removed, 2);
    let left: Vec<_> = store.list("workers/").await.unwrap().iter().map(|p| p.to_string()).collect();
    assert_eq!(left, ["workers/fresh"]);
}
