//! bench-real: figures for real Gentoo packages (issue 9) with real portage
//! and bubblewrap on `../shared/gentoo-subset`, served with
//! `tests/fixtures/gentoo-subset.toml`, sources from a loopback mirror over
//! the subset's `distfiles/`. Printed, no assertions.
//!
//! 1. the whole set (app-arch/lzop with dev-libs/lzo, app-misc/hello with and
//!    without nls, sys-apps/acl with sys-apps/attr, sys-apps/sed) from an
//!    empty store, one worker, requested one after another: wall time, and
//!    per package the request -> ready time, the sandboxed emerge time (fetch
//!    step + build step) and the worker overhead (the difference);
//! 2. the same requests again with everything published (cache hits);
//! 3. the two real chains (lzo <- lzop, attr <- acl), dependency first,
//!    through one service versus the seed's approach (each request in a
//!    fresh service and sandbox, so every dependency is compiled again):
//!    compiles and wall time, as ratios.
//!
//! Usage: bench-real [--only set|chain] (scripts/bench-real.sh); with
//! PACLOUD_DEPENDENCY_ROOTS=0 the services keep no ROOTs.

use anyhow::{Context, bail};
use async_trait::async_trait;
use pacloud::serve::{App, build_app};
use pacloud::settings::Settings;
use pacloud_domain::BuildRequest;
use pacloud_domain::service::Outcome;
use pacloud_worker::sandbox::{BuildPlan, Sandbox, SandboxError, SandboxOutcome};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Records how long each sandboxed run took.
struct Timing {
    inner: Arc<dyn Sandbox>,
    runs: Mutex<Vec<Duration>>,
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
            runs.push(start.elapsed());
        }
        out
    }
}

fn workspace() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize()?)
}

/// A loopback mirror: `/distfiles/<name>` from `dir` (HTTP/1.0, one file per
/// connection).
async fn mirror(dir: PathBuf) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let dir = dir.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let name = path.strip_prefix("/distfiles/").unwrap_or("");
                let ok = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
                let body = if ok { tokio::fs::read(dir.join(name)).await.ok() } else { None };
                let resp = match body {
                    Some(b) => {
                        let mut r =
                            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())
                                .into_bytes();
                        r.extend(b);
                        r
                    }
                    None => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                };
                let _ = sock.write_all(&resp).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(url)
}

fn settings(dir: &Path, mirror: &str) -> anyhow::Result<Settings> {
    let ws = workspace()?;
    let subset = ws.join("../shared/gentoo-subset").canonicalize().context("../shared/gentoo-subset")?;
    let toml = std::fs::read_to_string(ws.join("tests/fixtures/gentoo-subset.toml"))?
        .replace("@SUBSET@", &subset.display().to_string())
        .replace("@MIRROR@", mirror);
    let file = dir.join("bench.toml");
    std::fs::write(&file, toml)?;
    let mut s = Settings::load(Some(&file), |_| None)?;
    s.data_dir = dir.join("data");
    s.build.workers = 1;
    s.build.portage_venv = Some(ws.join(".venv"));
    s.build.poll_wait = Duration::from_secs(20);
    // PACLOUD_DEPENDENCY_ROOTS=0: the services keep no ROOTs (every binary
    // dependency merged), to compare with the default.
    if let Ok(v) = std::env::var("PACLOUD_DEPENDENCY_ROOTS") {
        s.build.dependency_roots = v.parse().context("PACLOUD_DEPENDENCY_ROOTS: a whole number")?;
    }
    Ok(s)
}

struct Service {
    app: App,
    timing: Arc<Timing>,
    _workers: pacloud::build::Workers,
    dir: tempfile::TempDir,
}

async fn service(mirror: &str) -> anyhow::Result<Service> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let s = settings(dir.path(), mirror)?;
    let app = build_app(&s, "http://127.0.0.1:0")?;
    let mut backend = match pacloud::build::detect(&s).await {
        pacloud::build::Detected::Ready(b) => b,
        pacloud::build::Detected::Unavailable(why) => bail!("no build backend: {why}"),
    };
    let timing = Arc::new(Timing { inner: backend.sandbox.clone(), runs: Mutex::new(Vec::new()) });
    backend.sandbox = timing.clone();
    let workers = pacloud::build::start_workers(&app, backend, &s, app.clock.clone());
    Ok(Service { app, timing, _workers: workers, dir })
}

/// Requests a build and waits until it is ready: (request -> ready, sandbox time).
async fn build(svc: &Service, atom: &str, version: &str, use_flags: &[&str]) -> anyhow::Result<(Duration, Duration)> {
    let req = BuildRequest {
        atom: atom.into(),
        version: version.into(),
        use_flags: use_flags.iter().map(|s| s.to_string()).collect(),
        target: None,
    };
    let before = svc.timing.runs.lock().map(|r| r.len()).unwrap_or(0);
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
    let ran = svc.timing.runs.lock().map(|r| r[before..].iter().sum()).unwrap_or_default();
    Ok((total, ran))
}

/// Packages emerge compiled in this service (`>>> Emerging (` lines of ebuilds).
fn compiles(svc: &Service) -> usize {
    let logs = svc.dir.path().join("data/artifacts/logs");
    let mut n = 0;
    for key in std::fs::read_dir(logs).into_iter().flatten().flatten() {
        for log in std::fs::read_dir(key.path()).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            n += text.lines().filter(|l| l.starts_with(">>> Emerging (")).count();
        }
    }
    n
}

const SET: [(&str, &str, &[&str]); 5] = [
    ("app-arch/lzop", "1.04-r1", &[]),
    ("app-misc/hello", "2.10-r1", &["nls"]),
    ("app-misc/hello", "2.10-r1", &["-nls"]),
    ("sys-apps/acl", "2.3.1-r2", &[]),
    ("sys-apps/sed", "4.9-r1", &[]),
];

async fn set_bench(mirror: &str) -> anyhow::Result<()> {
    let svc = service(mirror).await?;
    println!("the real set from an empty store (1 worker, one request after another):");
    let t = Instant::now();
    let mut overheads = Vec::new();
    for (atom, version, flags) in SET {
        let (total, ran) = build(&svc, atom, version, flags).await?;
        let over = total.saturating_sub(ran);
        overheads.push(over.as_secs_f64());
        println!(
            "  {atom}-{version} {flags:?}: request -> ready {:.1} s, sandboxed emerge (fetch + build step) {:.1} s, worker overhead {:.2} s",
            total.as_secs_f64(),
            ran.as_secs_f64(),
            over.as_secs_f64()
        );
    }
    let whole = t.elapsed();
    let mean = overheads.iter().sum::<f64>() / overheads.len() as f64;
    println!(
        "  whole set: {:.1} s, {} compiles; mean worker overhead {mean:.2} s per request",
        whole.as_secs_f64(),
        compiles(&svc)
    );
    let t = Instant::now();
    for (atom, version, flags) in SET {
        build(&svc, atom, version, flags).await?;
    }
    println!("  the same 5 requests again (all published): {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}

async fn chain_bench(mirror: &str) -> anyhow::Result<()> {
    let chains = [
        [("dev-libs/lzo", "2.10"), ("app-arch/lzop", "1.04-r1")],
        [("sys-apps/attr", "2.5.1-r2"), ("sys-apps/acl", "2.3.1-r2")],
    ];
    let svc = service(mirror).await?;
    let t = Instant::now();
    for chain in chains {
        for (atom, version) in chain {
            build(&svc, atom, version, &[]).await?;
        }
    }
    let ours = t.elapsed();
    let our_compiles = compiles(&svc);
    let t = Instant::now();
    let mut seed_compiles = 0;
    for chain in chains {
        for (atom, version) in chain {
            let fresh = service(mirror).await?;
            build(&fresh, atom, version, &[]).await?;
            seed_compiles += compiles(&fresh);
        }
    }
    let seed = t.elapsed();
    println!("real chains (lzo then lzop, attr then acl):");
    println!("  service (published dependencies reused): {our_compiles} compiles, {:.1} s", ours.as_secs_f64());
    println!(
        "  seed's approach (fresh sandbox, all dependencies from source): {seed_compiles} compiles, {:.1} s",
        seed.as_secs_f64()
    );
    println!(
        "  ratio: {:.2}x fewer compiles, {:.2}x less wall time",
        seed_compiles as f64 / our_compiles.max(1) as f64,
        seed.as_secs_f64() / ours.as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut only: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--only" => only = Some(args.next().context("--only set|chain")?),
            other => bail!("unknown argument {other:?}; usage: bench-real [--only set|chain]"),
        }
    }
    let distfiles = workspace()?.join("../shared/gentoo-subset/distfiles").canonicalize()?;
    let url = mirror(distfiles).await?;
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("set") {
        set_bench(&url).await?;
    }
    if run("chain") {
        chain_bench(&url).await?;
    }
    Ok(())
}
