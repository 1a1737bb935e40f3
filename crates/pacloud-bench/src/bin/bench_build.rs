//! bench-build: figures for the build path with real portage and
//! bubblewrap on the fixture repository, printed (no assertions).
//!
//! 1. worker overhead per build: request-to-ready time minus the time the
//!    sandboxed emerge ran, over several builds of the leaf package;
//! 2. enqueue -> emerge-start latency: from the POST to the sandbox process
//!    being spawned;
//! 3. the 5-package chain (chain-e <- ... <- chain-a) requested leaf first
//!    from the service (published dependencies reused, builds starting from
//!    a kept ROOT), from a service that keeps no ROOTs (every binary
//!    dependency merged), and by the seed's approach (each request in a
//!    fresh service and sandbox, every dependency compiled from source
//!    again): compiles and wall time, as ratios.
//!
//! 4. one leaf build with 0 and with N (default 2,000) x 1 MB packages
//!    already in the target's store, and the ratio (seeding is O(graph));
//! 5. publishing one 1 MB package into an index of 10, 1,000 and 10,000
//!    entries (compare-and-swap on the index, no fragment re-read).
//!
//! The real bwrap sandbox is wrapped by a timing decorator; nothing else is
//! changed. Usage: bench-build [--repeat N] [--store-packages N] [--only store|publish|chain|leaf]
//! (scripts/bench-build.sh)

use anyhow::{Context, bail};
use async_trait::async_trait;
use pacloud::serve::{App, build_app};
use pacloud::settings::Settings;
use pacloud_domain::BuildRequest;
use pacloud_domain::service::Outcome;
use pacloud_worker::publish;
use pacloud_worker::sandbox::{BuildPlan, Sandbox, SandboxError, SandboxOutcome};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Records when each sandboxed build started and how long it ran.
struct Timing {
    inner: Arc<dyn Sandbox>,
    runs: Mutex<Vec<(Instant, Duration)>>,
}

#[async_trait]
impl Sandbox for Timing {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn run(&self, plan: &BuildPlan, cancel: CancellationToken) -> Result<SandboxOutcome, SandboxError> {
        let start = Instant::now();
        let out = self.inner.run(plan, cancel).await;
        if let Ok(mut runs) = self.runs.lock() {
            runs.push((start, start.elapsed()));
        }
        out
    }
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn settings(dir: &Path) -> anyhow::Result<Settings> {
    let ws = workspace().canonicalize()?;
    let fixtures = std::fs::read_to_string(ws.join("tests/fixtures/pacloud.toml"))?
        .replace("@WORKSPACE@", &ws.display().to_string());
    let toml = format!(
        "{fixtures}\n[build]\nbackend = \"bwrap\"\nworkers = 1\nportage_venv = \"{}\"\n",
        // Canonical: a symlinked venv cannot be a bwrap mount point.
        ws.join(".venv").canonicalize()?.display()
    );
    let file = dir.join("bench.toml");
    std::fs::write(&file, toml)?;
    let mut s = Settings::load(Some(&file), |_| None)?;
    s.data_dir = dir.join("data");
    s.build.poll_wait = Duration::from_secs(20);
    Ok(s)
}

struct Service {
    app: App,
    timing: Arc<Timing>,
    _workers: pacloud::build::Workers,
    _dir: tempfile::TempDir,
}

async fn service() -> anyhow::Result<Service> {
    service_with(|_| {}).await
}

async fn service_with(f: impl FnOnce(&mut Settings)) -> anyhow::Result<Service> {
    let dir = tempfile::tempdir()?;
    #[cfg(unix)]
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut s = settings(dir.path())?;
    f(&mut s);
    let app = build_app(&s, "http://127.0.0.1:0")?;
    let mut backend = match pacloud::build::detect(&s).await {
        pacloud::build::Detected::Ready(b) => b,
        pacloud::build::Detected::Unavailable(why) => bail!("no build backend: {why}"),
    };
    let timing = Arc::new(Timing { inner: backend.sandbox.clone(), runs: Mutex::new(Vec::new()) });
    backend.sandbox = timing.clone();
    let workers = pacloud::build::start_workers(&app, backend, &s, app.clock.clone());
    Ok(Service { app, timing, _workers: workers, _dir: dir })
}

/// Requests a build through the service and waits until it is ready.
async fn build(
    svc: &Service,
    atom: &str,
    version: &str,
    use_flags: &[&str],
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let req = BuildRequest {
        atom: atom.into(),
        version: version.into(),
        use_flags: use_flags.iter().map(|s| s.to_string()).collect(),
        target: None,
    };
    let runs_before = svc.timing.runs.lock().map(|r| r.len()).unwrap_or(0);
    let t0 = Instant::now();
    let mut outcome = svc.app.service.request(&req, true).await?;
    let key = outcome.record().key.clone();
    loop {
        match outcome {
            Outcome::Ready { .. } => break,
            Outcome::Failed { record, .. } => bail!("{atom} failed: {:?}", record.failure),
            Outcome::Pending { .. } => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                outcome = svc.app.service.status(&key).await?;
            }
        }
    }
    let total = t0.elapsed();
    let runs = svc.timing.runs.lock().map(|r| r.clone()).unwrap_or_default();
    // Each build is two sandbox runs: the fetch step and the build step.
    let Some((start, _)) = runs.get(runs_before).copied() else { bail!("no sandbox run recorded") };
    let ran = runs[runs_before..].iter().map(|r| r.1).sum();
    Ok((total, start.duration_since(t0), ran))
}

/// The text of every build log a service stored.
fn build_logs(svc: &Service) -> Vec<String> {
    let logs = svc._dir.path().join("data/artifacts/logs");
    let keys = std::fs::read_dir(logs).into_iter().flatten().flatten();
    keys.flat_map(|key| std::fs::read_dir(key.path()).into_iter().flatten().flatten())
        .map(|log| std::fs::read_to_string(log.path()).unwrap_or_default())
        .collect()
}

fn compiles(svc: &Service) -> usize {
    build_logs(svc).iter().map(|t| t.lines().filter(|l| l.starts_with(">>> Emerging (")).count()).sum()
}

fn stats(xs: &mut [f64]) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    (mean, xs[xs.len() / 2], xs[xs.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut repeat = 7usize;
    let mut store_packages = 2000usize;
    let mut only: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeat" => repeat = args.next().context("--repeat N")?.parse()?,
            "--store-packages" => store_packages = args.next().context("--store-packages N")?.parse()?,
            "--only" => only = Some(args.next().context("--only store|publish|chain|leaf")?),
            other => bail!(
                "unknown argument {other:?}; usage: bench-build [--repeat N] [--store-packages N] [--only store|publish|chain|leaf]"
            ),
        }
    }
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("publish") {
        publish_bench().await?;
    }
    if run("store") {
        store_size_bench(store_packages).await?;
    }
    if run("leaf") {
        leaf_bench(repeat).await?;
    }
    if run("chain") {
        chain_bench().await?;
    }
    Ok(())
}

/// Puts `n` synthetic packages of `size` bytes into the service's store
/// (files straight into its directory, entries into its index).
async fn fill_store(svc: &Service, n: usize, size: usize) -> anyhow::Result<()> {
    let root = svc._dir.path().join("data/artifacts/fixtures");
    let entries = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<_>> {
        (0..n).map(|i| pacloud_worker::testkit::package(&root, &format!("filler{i}"), 1, size)).collect()
    })
    .await??;
    publish::update_index(&*svc.app.artifacts, "fixtures", &pacloud_worker::testkit::header(), entries, 1_800_000_000)
        .await?;
    Ok(())
}

async fn store_size_bench(n: usize) -> anyhow::Result<()> {
    let flags = [&["foo"][..], &["bar"], &["-foo"], &["foo", "bar"], &["-bar"]];
    let mut medians = Vec::new();
    for packages in [0, n] {
        let svc = service().await?;
        let t = Instant::now();
        fill_store(&svc, packages, 1 << 20).await?;
        let filled = t.elapsed();
        let mut times = Vec::new();
        for f in flags {
            let (total, _, _) = build(&svc, "app-misc/hello", "2.12-r1", f).await?;
            times.push(total.as_secs_f64() * 1000.0);
        }
        let (mean, p50, max) = stats(&mut times);
        println!(
            "one leaf build with {packages} x 1 MB packages in the target's store (filled in {:.1} s): request -> ready mean {mean:.0} ms, p50 {p50:.0} ms, max {max:.0} ms ({} builds)",
            filled.as_secs_f64(),
            flags.len()
        );
        medians.push(p50);
    }
    println!("  ratio (p50 with {n} / p50 with 0): {:.2} (target <= 1.10)", medians[1] / medians[0]);
    Ok(())
}

async fn publish_bench() -> anyhow::Result<()> {
    use pacloud_domain::ports::ArtifactStore;
    let mut p50s = Vec::new();
    for n in [10usize, 1000, 10000] {
        let dir = tempfile::tempdir()?;
        let store = pacloud_local::DirArtifactStore::new(
            dir.path().join("store"),
            "http://127.0.0.1:1",
            pacloud_local::SigningKey::new(&[3; 32]),
            Arc::new(pacloud_domain::SystemClock),
        )?;
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch)?;
        // The index: n entries (their package files are not needed to publish another).
        let entries: Vec<_> = (0..n)
            .map(|i| pacloud_worker::testkit::package(&scratch, &format!("e{i}"), 1, 16))
            .collect::<Result<_, _>>()?;
        publish::update_index(&store, "t", &pacloud_worker::testkit::header(), entries, 1_800_000_000).await?;
        let mut times = Vec::new();
        for round in 0..7 {
            let pkgdir = dir.path().join(format!("build{round}"));
            std::fs::create_dir_all(&pkgdir)?;
            let e = pacloud_worker::testkit::package(&pkgdir, &format!("new{round}"), 1, 1 << 20)?;
            pacloud_worker::testkit::write_index(&pkgdir, vec![e])?;
            let t = Instant::now();
            let out = publish::publish(&store, "t", &pkgdir, &Default::default(), None, 1_800_000_100).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(out.len() == 1, "published {}", out.len());
        }
        let index = store.get(&pacloud_domain::ports::ArtifactPath::parse("t/Packages")?).await?;
        let (mean, p50, max) = stats(&mut times);
        println!(
            "publish one 1 MB package into an index of {n} entries ({} KiB): mean {mean:.1} ms, p50 {p50:.1} ms, max {max:.1} ms (7 publishes)",
            index.len() / 1024
        );
        p50s.push(p50);
    }
    println!("  ratio p50 10,000 / 10 entries: {:.2} (target: flat within 2x)", p50s[2] / p50s[0]);
    Ok(())
}

async fn leaf_bench(repeat: usize) -> anyhow::Result<()> {
    // 1 + 2: overhead and enqueue -> start, over `repeat` distinct leaf builds.
    let svc = service().await?;
    let flags = [&["foo"][..], &["bar"], &["-foo"], &["foo", "bar"], &["-bar"], &["-foo", "-bar"], &["+foo", "-bar"]];
    let (mut over, mut start, mut emerge, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for f in flags.iter().take(repeat.clamp(1, flags.len())) {
        let (t, s, e) = build(&svc, "app-misc/hello", "2.12-r1", f).await?;
        over.push((t - e).as_secs_f64() * 1000.0);
        start.push(s.as_secs_f64() * 1000.0);
        emerge.push(e.as_secs_f64() * 1000.0);
        total.push(t.as_secs_f64() * 1000.0);
    }
    let n = over.len();
    let (om, op50, omax) = stats(&mut over);
    let (sm, sp50, smax) = stats(&mut start);
    let (em, _, _) = stats(&mut emerge);
    let (tm, _, _) = stats(&mut total);
    println!("leaf builds (app-misc/hello, {n} distinct USE sets, 1 worker):");
    println!("  request -> ready: mean {tm:.0} ms; sandboxed emerge: mean {em:.0} ms");
    println!(
        "  worker overhead (request->ready minus sandboxed emerge): mean {om:.0} ms, p50 {op50:.0} ms, max {omax:.0} ms"
    );
    println!("  enqueue -> emerge start: mean {sm:.1} ms, p50 {sp50:.1} ms, max {smax:.1} ms");
    Ok(())
}

async fn chain_bench() -> anyhow::Result<()> {
    // 3: the chain, leaf first. Each link is requested from one long-lived
    // service (published dependencies reused, builds starting from a kept
    // ROOT), from one long-lived service that keeps no ROOTs (every binary
    // dependency merged: the approach before dependency roots) and right
    // after from a fresh service (the seed's approach: nothing reused,
    // everything from source), so all sides meet the same machine load (run
    // one after the other, a shared machine moved the ratio by ±30 %).
    // Times are request -> ready; a fresh service's start-up is not counted.
    let chain = ["chain-e", "chain-d", "chain-c", "chain-b", "chain-a"];
    let svc = service().await?;
    let merging = service_with(|s| s.build.dependency_roots = 0).await?;
    let (mut ours, mut merged, mut seed, mut seed_compiles) = (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
    let mut links = Vec::new();
    for p in chain {
        let atom = format!("app-misc/{p}");
        let (a, _, _) = build(&svc, &atom, "1.0", &[]).await?;
        let (m, _, _) = build(&merging, &atom, "1.0", &[]).await?;
        let fresh = service().await?;
        let (b, _, _) = build(&fresh, &atom, "1.0", &[]).await?;
        seed_compiles += compiles(&fresh);
        ours += a;
        merged += m;
        seed += b;
        links.push(format!("{p} {:.1}/{:.1}/{:.1}", a.as_secs_f64(), m.as_secs_f64(), b.as_secs_f64()));
    }
    let our_compiles = compiles(&svc);
    let reused = reused_roots(&svc);
    println!("chain of 5 (chain-e, then d, c, b, a; each link by every side in turn):");
    println!("  per link, service/without kept ROOTs/seed (s): {}", links.join(", "));
    println!(
        "  service (published dependencies reused, {reused} of 5 builds from a kept ROOT): {our_compiles} compiles, {:.1} s",
        ours.as_secs_f64()
    );
    println!(
        "  service without kept ROOTs (dependency_roots = 0: binaries merged): {} compiles, {:.1} s",
        compiles(&merging),
        merged.as_secs_f64()
    );
    println!(
        "  seed's approach (fresh sandbox, all dependencies from source): {seed_compiles} compiles, {:.1} s",
        seed.as_secs_f64()
    );
    println!(
        "  ratio: {:.2}x fewer compiles, {:.2}x less wall time ({:.2}x without kept ROOTs)",
        seed_compiles as f64 / our_compiles.max(1) as f64,
        seed.as_secs_f64() / ours.as_secs_f64(),
        seed.as_secs_f64() / merged.as_secs_f64()
    );
    Ok(())
}

/// How many of a service's builds started from a kept ROOT (their logs say so).
fn reused_roots(svc: &Service) -> usize {
    build_logs(svc).iter().filter(|t| t.contains("ROOT starts as a copy of a kept ROOT")).count()
}
