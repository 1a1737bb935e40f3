//! bench-sandbox: per-build startup overhead of the two sandbox backends,
//! side by side in one run, on the same machine and the same plans:
//!
//! 1. a no-op build: the plan of a real fixture build (fresh work directory,
//!    binds, limits, environment) whose command is `true`, so the time is
//!    the sandbox's own start and teardown;
//! 2. a tiny real build: `emerge` of app-misc/hello from the fixture
//!    repository (bwrap: the test venv's portage; docker: the builder image's).
//!
//! A bare `true` spawned without any sandbox is printed as the floor. Each
//! figure is the median (and p90) of N runs after one warm-up run.
//! Usage: bench-sandbox --image <pinned ref> [--repeat N]   (scripts/bench-sandbox.sh)

use anyhow::{Context, bail};
use pacloud::build::{Backend, Detected};
use pacloud::settings::{BackendChoice, Settings};
use pacloud_domain::BuildRequest;
use pacloud_domain::ports::Job;
use pacloud_worker::plan;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn workspace() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize()?)
}

/// The fixture settings with one backend.
fn settings(dir: &Path, backend: BackendChoice, image: &str) -> anyhow::Result<Settings> {
    let ws = workspace()?;
    let fixtures = std::fs::read_to_string(ws.join("tests/fixtures/pacloud.toml"))?
        .replace("@WORKSPACE@", &ws.display().to_string());
    let build = match backend {
        BackendChoice::Docker => format!("backend = \"docker\"\nimage = \"{image}\""),
        _ => format!("backend = \"bwrap\"\nportage_venv = \"{}\"", ws.join(".venv").display()),
    };
    let file = dir.join(format!("bench-{}.toml", if backend == BackendChoice::Docker { "docker" } else { "bwrap" }));
    std::fs::write(&file, format!("{fixtures}\n[build]\nworkers = 1\n{build}\n"))?;
    let mut s = Settings::load(Some(&file), |_| None)?;
    s.data_dir = dir.join("data");
    Ok(s)
}

/// Runs one plan of `atom` in `backend`, with `argv` replacing emerge when
/// given; returns the wall time of `Sandbox::run` and checks it succeeded.
async fn one(backend: &Backend, s: &Settings, atom: &str, version: &str, noop: bool, n: usize) -> anyhow::Result<f64> {
    let spec = BuildRequest { atom: atom.into(), version: version.into(), ..Default::default() }
        .validate(&s.targets)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = s.targets.get(&spec.target).context("target")?.clone();
    let job_id = format!("bench-{}-{n}-{}", backend.sandbox.name(), std::process::id());
    let mut p = plan::prepare(&backend.env, &Job::new(spec), &target, &job_id)?;
    if noop {
        p.argv = vec!["true".into()];
    }
    let start = Instant::now();
    let out = backend.sandbox.run(&p, CancellationToken::new()).await?;
    let took = start.elapsed().as_secs_f64();
    if !out.succeeded() {
        let log = std::fs::read_to_string(&out.log).unwrap_or_default();
        bail!("{} run of {atom} failed ({out:?}):\n{log}", backend.sandbox.name());
    }
    let _ = std::fs::remove_dir_all(&p.work_dir);
    Ok(took)
}

fn stats(xs: &mut [f64]) -> (f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| xs[((xs.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.9))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut repeat = 10usize;
    let mut image = std::env::var("PACLOUD_BUILDER_IMAGE").unwrap_or_default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeat" => repeat = args.next().context("--repeat N")?.parse().context("--repeat N")?,
            "--image" => image = args.next().context("--image REF")?,
            other => bail!("unknown argument {other:?}; usage: bench-sandbox --image REF [--repeat N]"),
        }
    }
    if image.is_empty() {
        bail!("no builder image: pass --image (scripts/bench-sandbox.sh builds the stand-in)");
    }
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    // The floor: spawning `true` with no sandbox at all.
    let mut bare = Vec::new();
    for _ in 0..=repeat {
        let start = Instant::now();
        let st = tokio::process::Command::new("true").status().await?;
        anyhow::ensure!(st.success());
        bare.push(start.elapsed().as_secs_f64());
    }
    let (bare_p50, bare_p90) = stats(&mut bare[1..]);

    println!("bench-sandbox: {repeat} runs each after 1 warm-up; median (p90) seconds per build");
    println!("image: {image}");
    println!("{:<28} {:>16} {:>16}", "", "bwrap", "docker");
    let mut rows: Vec<(String, Vec<(f64, f64)>)> =
        vec![("no-op (`true`) in sandbox".into(), vec![]), ("emerge app-misc/hello".into(), vec![])];
    for backend in [BackendChoice::Bwrap, BackendChoice::Docker] {
        let s = settings(dir.path(), backend, &image)?;
        let b = match pacloud::build::detect(&s).await {
            Detected::Ready(b) => b,
            Detected::Unavailable(why) => bail!("{backend:?} backend unavailable: {why}"),
        };
        eprintln!("{}", b.description);
        for (row, noop) in [(0usize, true), (1, false)] {
            let mut xs = Vec::new();
            for n in 0..=repeat {
                xs.push(one(&b, &s, "app-misc/hello", "2.12-r1", noop, n + 100 * row).await?);
            }
            rows[row].1.push(stats(&mut xs[1..]));
        }
    }
    let fmt = |(p50, p90): (f64, f64)| format!("{p50:.3} ({p90:.3})");
    for (name, cols) in &rows {
        println!("{name:<28} {:>16} {:>16}", fmt(cols[0]), fmt(cols[1]));
    }
    let noop = &rows[0].1;
    let hello = &rows[1].1;
    println!("{:<28} {:>16}", "bare `true`, no sandbox", fmt((bare_p50, bare_p90)));
    println!(
        "docker - bwrap per build: no-op {:+.3} s, emerge {:+.3} s (docker/bwrap no-op x{:.1})",
        noop[1].0 - noop[0].0,
        hello[1].0 - hello[0].0,
        noop[1].0 / noop[0].0.max(Duration::from_micros(1).as_secs_f64())
    );
    Ok(())
}
