//! bench-api: figures for the request path, printed (no assertions).
//!
//! 1. cache-hit handler time in-process: the Router answering a POST for a
//!    ready build (SQLite store, signed URL, JSON), called through
//!    `tower::ServiceExt::oneshot` with no socket;
//! 2. local server cache-hit throughput and p50/p99 latency at concurrency
//!    64: the real `pacloud serve` binary (a child process) on loopback,
//!    64 keep-alive HTTP/1.1 connections for a fixed time;
//! 3. dedup storm: 1,000 concurrent identical misses on fresh connections,
//!    their p99 latency, and how many queue messages and records they made.
//!
//! Usage: bench-api [--pacloud PATH] [--seconds N]   (scripts/bench-api.sh)

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use pacloud::serve::build_app;
use pacloud::settings::Settings;
use pacloud_domain::ports::{JobQueue, MetadataStore};
use pacloud_domain::{BuildRecord, BuildRequest, Clock, SystemClock};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tower::ServiceExt;

const HIT_BODY: &str = r#"{"atom":"app-misc/hello","version":"2.12-r1","use":["foo","-bar"]}"#;
const MISS_BODY: &str = r#"{"atom":"app-misc/storm","version":"1.0","use":["x"]}"#;

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Puts a ready build for HIT_BODY into the data dir, as a worker would.
async fn seed_ready(settings: &Settings) -> anyhow::Result<()> {
    let app = build_app(settings, "http://127.0.0.1:0")?;
    let req: BuildRequest = BuildRequest {
        atom: "app-misc/hello".into(),
        version: "2.12-r1".into(),
        use_flags: vec!["foo".into(), "-bar".into()],
        target: None,
    };
    let spec = req.validate(&settings.targets)?;
    let now = SystemClock.now();
    let rec = BuildRecord::new_queued(spec, now);
    app.store.create(&rec).await?;
    let scratch = tempfile::tempdir()?;
    pacloud_contract::complete_as_worker(
        &*app.store,
        &*app.artifacts,
        &rec.key,
        now,
        scratch.path(),
        &[42u8; 64 * 1024],
    )
    .await;
    Ok(())
}

fn post(body: &'static str) -> http::Request<axum::body::Body> {
    http::Request::post("/v1/builds")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap_or_default()
}

async fn bench_handler(settings: &Settings) -> anyhow::Result<()> {
    let app = build_app(settings, "http://127.0.0.1:8080")?;
    let router = app.router;
    // warm up (fills the ready cache)
    for _ in 0..1000 {
        let resp = router.clone().oneshot(post(HIT_BODY)).await?;
        if resp.status() != 200 {
            bail!("expected a cache hit, got {}", resp.status());
        }
        resp.into_body().collect().await?;
    }
    let n = 200_000;
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let resp = router.clone().oneshot(post(HIT_BODY)).await?;
        resp.into_body().collect().await?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let total = start.elapsed();
    lat.sort_unstable();
    println!(
        "cache-hit handler (in-process Router, {n} calls): mean {:.2} us, p50 {:.2} us, p99 {:.2} us",
        total.as_nanos() as f64 / n as f64 / 1000.0,
        pct(&lat, 0.50) as f64 / 1000.0,
        pct(&lat, 0.99) as f64 / 1000.0
    );
    Ok(())
}

async fn connect(addr: &str) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

fn hyper_post(addr: &str, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{addr}/v1/builds"))
        .header("host", addr)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default()
}

/// Starts `pacloud serve`; with `pin`, on CPU 0 with one runtime thread.
async fn start_server(bin: &Path, data: &Path, pin: bool) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut cmd = if pin {
        let mut c = tokio::process::Command::new("taskset");
        c.args(["-c", "0"]).arg(bin).env("TOKIO_WORKER_THREADS", "1");
        c
    } else {
        tokio::process::Command::new(bin)
    };
    let mut child = cmd
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let addr = loop {
        let line = lines.next_line().await?.context("server exited before listening")?;
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().context("address")?.to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// wrk (one thread, 64 connections, on CPU 1) against a server on CPU 0.
async fn bench_server_wrk(bin: &Path, data: &Path, seconds: u64) -> anyhow::Result<()> {
    let (_child, addr) = start_server(bin, data, true).await?;
    let script = data.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{HIT_BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )?;
    let run = |secs: u64| {
        let (script, addr) = (script.clone(), addr.clone());
        async move {
            let out = tokio::process::Command::new("taskset")
                .args(["-c", "1", "wrk", "-t1", "-c64", &format!("-d{secs}s"), "--latency", "-s"])
                .arg(&script)
                .arg(format!("http://{addr}/v1/builds"))
                .output()
                .await
                .context("running wrk")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() || text.contains("Non-2xx") {
                bail!("wrk failed or saw errors:\n{text}{}", String::from_utf8_lossy(&out.stderr));
            }
            let field = |prefix: &str| {
                text.lines()
                    .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
                    .unwrap_or_default()
            };
            Ok::<_, anyhow::Error>((field("Requests/sec:"), field("50%"), field("99%")))
        }
    };
    run(1).await?; // warm-up: connections, the ready cache, page cache
    println!(
        "local server cache hits (pacloud serve pinned to CPU 0 with 1 runtime thread; wrk -t1 -c64 on CPU 1; 3 runs of {seconds} s):"
    );
    for i in 1..=3 {
        let (rps, p50, p99) = run(seconds).await?;
        println!("  run {i}: {rps} req/s, p50 {p50}, p99 {p99}");
    }
    Ok(())
}

/// The in-binary client: 64 keep-alive connections, same cores as the server.
async fn bench_server(bin: &Path, data: &Path, seconds: u64) -> anyhow::Result<()> {
    let (_child, addr) = start_server(bin, data, false).await?;
    let conc = 64;
    let warmup = Duration::from_secs(1);
    let run = Duration::from_secs(seconds);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await?;
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                let resp = sender.send_request(hyper_post(&addr, HIT_BODY)).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                if status != 200 {
                    bail!("expected 200, got {status}");
                }
                let now = t0.elapsed();
                if now > warmup {
                    lat.push(t.elapsed().as_micros() as u64);
                }
                if now > warmup + run {
                    return Ok::<_, anyhow::Error>(lat);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_unstable();
    println!(
        "local server cache hits (unpinned: server and this client share both CPUs; concurrency {conc}, {seconds} s): {:.0} req/s, p50 {} us, p99 {} us ({} requests)",
        all.len() as f64 / run.as_secs_f64(),
        pct(&all, 0.50),
        pct(&all, 0.99),
        all.len()
    );
    Ok(())
}

async fn bench_storm(bin: &Path, data: &Path) -> anyhow::Result<()> {
    let (_child, addr) = start_server(bin, data, false).await?;
    let n = 1000;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (addr, barrier) = (addr.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await?;
            barrier.wait().await;
            let t = Instant::now();
            let resp = sender.send_request(hyper_post(&addr, MISS_BODY)).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if status != 202 {
                bail!("expected 202, got {status}");
            }
            Ok::<_, anyhow::Error>(t.elapsed().as_micros() as u64)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await??);
    }
    lat.sort_unstable();
    let db = pacloud_local::Db::open(&data.join("pacloud.db"))?;
    let queue = pacloud_local::SqliteQueue::new(db.clone(), Arc::new(SystemClock), 5);
    let depth = queue.depth().await?;
    let records: i64 = db
        .run(|c| Ok(c.query_row("SELECT count(*) FROM builds WHERE record LIKE '%storm%'", [], |r| r.get(0))?))
        .await?;
    println!(
        "dedup storm ({n} concurrent identical misses): p50 {} us, p99 {} us, max {} us; jobs queued {}, records {}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
        depth.visible + depth.in_flight + depth.delayed,
        records
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut bin = PathBuf::from("target/release/pacloud");
    let mut seconds = 5;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pacloud" => bin = args.next().context("--pacloud PATH")?.into(),
            "--seconds" => seconds = args.next().context("--seconds N")?.parse()?,
            other => {
                bail!("unknown argument {other:?}; usage: bench-api [--pacloud PATH] [--seconds N]")
            }
        }
    }
    // BENCH_SEED_ONLY=DIR: only put the ready build into DIR (for driving a
    // `pacloud serve --data-dir DIR` with another load generator by hand).
    if let Ok(d) = std::env::var("BENCH_SEED_ONLY") {
        let settings = Settings { data_dir: PathBuf::from(d), ..Settings::default() };
        return seed_ready(&settings).await;
    }
    let dir = tempfile::tempdir()?;
    let settings = Settings { data_dir: dir.path().join("data"), ..Settings::default() };
    seed_ready(&settings).await?;
    bench_handler(&settings).await?;
    if have("wrk") && have("taskset") {
        bench_server_wrk(&bin, &settings.data_dir, seconds).await?;
    } else {
        println!("local server cache hits, pinned: not measured (install wrk and util-linux's taskset)");
    }
    bench_server(&bin, &settings.data_dir, seconds).await?;
    let storm_dir = dir.path().join("storm");
    bench_storm(&bin, &storm_dir).await?;
    Ok(())
}
