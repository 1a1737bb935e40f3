//! bench-usekey: figures for key version 2 (docs/benchmarks.md), printed
//! side by side with the version 1 anchor in one run (no assertions).
//!
//! 1. the tree index of `../shared/gentoo-subset` computed by the worker's
//!    generator with real portage (the test venv): time and size;
//! 2. a full-tree-sized index (~31,000 ebuilds: the subset's real entries
//!    repeated under synthetic names, so flag counts follow the subset's):
//!    its size, and its cold load (artifact read + parse + check) and bare
//!    parse times;
//! 3. the cache-hit handler in-process (`tower::ServiceExt::oneshot` on the
//!    Router, SQLite store, signed URL, JSON): a version 1 target (anchor)
//!    and the same request on a target with the full-size tree index
//!    (lookup, IUSE checks, effective USE, version 2 key).
//!
//! Usage: bench-usekey [--venv PATH] [--subset PATH] [--ebuilds N]   (scripts/bench-usekey.sh)

use anyhow::{Context, bail};
use http_body_util::BodyExt;
use pacloud::serve::build_app;
use pacloud::settings::Settings;
use pacloud_domain::ports::{ArtifactStore, MetadataStore};
use pacloud_domain::target::{Target, TargetSpec};
use pacloud_domain::tree::{TreeIndex, TreeIndexDoc};
use pacloud_domain::{BuildRecord, BuildRequest, Clock, SystemClock, TargetSet};
use pacloud_worker::sandbox::PortageInstall;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tower::ServiceExt;

const BODY_V1: &str = r#"{"atom":"app-misc/hello","version":"2.10-r1","use":["nls"],"target":"plain"}"#;
const BODY_V2: &str = r#"{"atom":"app-misc/hello","version":"2.10-r1","use":["nls"],"target":"indexed"}"#;

fn pct(sorted: &[u64], p: f64) -> f64 {
    sorted.get(((sorted.len().max(1) as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0) as f64 / 1000.0
}

fn target(name: &str, tree_index: bool) -> anyhow::Result<Target> {
    let spec = TargetSpec {
        profile: "default/linux/amd64/23.0".into(),
        chost: "x86_64-pc-linux-gnu".into(),
        cflags: "-O2 -pipe".into(),
        cxxflags: "-O2 -pipe".into(),
        ldflags: String::new(),
        repository: "gentoo".into(),
        snapshot: "gentoo-subset".into(),
        builder: "host".into(),
        env: BTreeMap::new(),
        tree_index,
        mirrors: Vec::new(),
        build_root: None,
    };
    Ok(Target::new(name.parse()?, spec)?)
}

/// The subset's entries repeated under synthetic names up to `n` ebuilds.
fn full_size(subset: &TreeIndexDoc, n: usize, t: &Target) -> TreeIndexDoc {
    let mut doc = subset.clone();
    doc.target = t.name.to_string();
    doc.target_hash = t.hash().to_owned();
    let real: Vec<_> = subset.packages.values().flat_map(|vs| vs.values().cloned()).collect();
    let mut i = 0;
    while doc.packages.values().map(|v| v.len()).sum::<usize>() < n {
        let entry = real[i % real.len()].clone();
        let cp = format!("synth-cat{}/package-{i}", i % 170);
        doc.packages.entry(cp).or_default().insert(format!("1.{}.{}-r1", i % 7, i % 13), entry);
        i += 1;
    }
    doc.ebuilds = n as u64;
    doc
}

async fn handler(router: &axum::Router, body: &'static str, n: usize) -> anyhow::Result<(f64, f64, f64)> {
    let post = || {
        http::Request::post("/v1/builds")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap_or_default()
    };
    for _ in 0..1000 {
        let resp = router.clone().oneshot(post()).await?;
        if resp.status() != 200 {
            let status = resp.status();
            let text = resp.into_body().collect().await?.to_bytes();
            bail!("expected a cache hit, got {status}: {}", String::from_utf8_lossy(&text));
        }
        resp.into_body().collect().await?;
    }
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let resp = router.clone().oneshot(post()).await?;
        resp.into_body().collect().await?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let mean = start.elapsed().as_nanos() as f64 / n as f64 / 1000.0;
    lat.sort_unstable();
    Ok((mean, pct(&lat, 0.5), pct(&lat, 0.99)))
}

/// Seeds a ready build for the request `body` stands for.
async fn seed(app: &pacloud::serve::App, target: &str) -> anyhow::Result<()> {
    let req = BuildRequest {
        atom: "app-misc/hello".into(),
        version: "2.10-r1".into(),
        use_flags: vec!["nls".into()],
        target: Some(target.into()),
    };
    let spec = app.service.spec(&req).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = SystemClock.now();
    let rec = BuildRecord::new_queued(spec, now);
    app.store.create(&rec).await?;
    let scratch = tempfile::tempdir()?;
    pacloud_contract::complete_as_worker(&*app.store, &*app.artifacts, &rec.key, now, scratch.path(), &[42u8; 65536])
        .await;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut venv = PathBuf::from(".venv");
    let mut subset = PathBuf::from("../shared/gentoo-subset");
    let mut ebuilds = 31_000usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--venv" => venv = args.next().context("--venv PATH")?.into(),
            "--subset" => subset = args.next().context("--subset PATH")?.into(),
            "--ebuilds" => ebuilds = args.next().context("--ebuilds N")?.parse()?,
            other => {
                bail!("unknown argument {other:?}; usage: bench-usekey [--venv PATH] [--subset PATH] [--ebuilds N]")
            }
        }
    }
    let dir = tempfile::tempdir()?;
    let plain = target("plain", false)?;
    let indexed = target("indexed", true)?;

    // 1. The subset's index, by real portage.
    let t0 = Instant::now();
    let bytes = pacloud_worker::tree_index::generate(
        &PortageInstall::Venv(std::fs::canonicalize(&venv)?),
        &std::fs::canonicalize(subset.join("repo"))?,
        &indexed,
        &dir.path().join("gen"),
    )
    .await
    .context("generating the subset's tree index (scripts/test.sh creates .venv)")?;
    let gen_secs = t0.elapsed().as_secs_f64();
    let subset_doc: TreeIndexDoc = serde_json::from_slice(&bytes)?;
    println!(
        "tree index, gentoo subset ({} ebuilds, real portage {}): {} bytes, generated in {gen_secs:.2} s",
        subset_doc.ebuilds,
        subset_doc.portage,
        bytes.len()
    );

    // 2. A full-tree-sized index.
    let full = serde_json::to_vec(&full_size(&subset_doc, ebuilds, &indexed))?;
    println!(
        "tree index, full-size synthetic ({ebuilds} ebuilds, subset's entries repeated): {} bytes ({:.1} MB, {:.0} bytes/ebuild)",
        full.len(),
        full.len() as f64 / 1e6,
        full.len() as f64 / ebuilds as f64
    );
    let mut parse = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let idx = TreeIndex::parse(&full, &indexed)?;
        parse.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(idx);
    }
    parse.sort_by(f64::total_cmp);
    println!("  parse + check (TreeIndex::parse), 5 runs: median {:.1} ms, min {:.1} ms", parse[2], parse[0]);

    let settings = Settings {
        data_dir: dir.path().join("data"),
        targets: TargetSet::new("plain".parse()?, [plain.clone(), indexed.clone()])?,
        ..Settings::default()
    };
    let path = TreeIndex::path(&indexed)?;
    {
        let app = build_app(&settings, "http://127.0.0.1:8080")?;
        app.artifacts.put_bytes(&path, full.clone(), "application/json").await?;
        seed(&app, "plain").await?;
        seed(&app, "indexed").await?;
    }
    // Cold load: a fresh app (empty caches) answering its first request.
    let mut cold = Vec::new();
    for _ in 0..5 {
        let app = build_app(&settings, "http://127.0.0.1:8080")?;
        let t = Instant::now();
        let resp = app
            .router
            .clone()
            .oneshot(
                http::Request::post("/v1/builds")
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(BODY_V2))
                    .unwrap_or_default(),
            )
            .await?;
        resp.into_body().collect().await?;
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    cold.sort_by(f64::total_cmp);
    println!(
        "  cold first request on a fresh app (artifact read from the directory store + parse + lookup + SQLite get), 5 runs: median {:.1} ms, min {:.1} ms",
        cold[2], cold[0]
    );

    // 3. The cache-hit handler, anchor and with the tree check.
    let app = build_app(&settings, "http://127.0.0.1:8080")?;
    let n = 200_000;
    let (m1, p50_1, p99_1) = handler(&app.router, BODY_V1, n).await?;
    let (m2, p50_2, p99_2) = handler(&app.router, BODY_V2, n).await?;
    println!("cache-hit handler (in-process Router, {n} calls each):");
    println!(
        "  key v1, no tree check (anchor):                  mean {m1:.2} us, p50 {p50_1:.2} us, p99 {p99_1:.2} us"
    );
    println!(
        "  key v2, tree check ({ebuilds}-ebuild index in memory): mean {m2:.2} us, p50 {p50_2:.2} us, p99 {p99_2:.2} us"
    );
    Ok(())
}
