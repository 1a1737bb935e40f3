//! The `pacloud` command: parse arguments, wire, call the library.
//! Exit status: 0 success, 1 failure, 2 a mistake in what was asked.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pacloud::client::{Client, GetRequest, LineProgress, Progress, SpinnerProgress};
use pacloud::settings::Settings;
use pacloud_domain::grammar::{UseSet, parse_versioned_atom};
use pacloud_domain::request::{BuildRequest, SpecError};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "pacloud", version, about = "On-demand Gentoo binary packages: serve, request, verify")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API with the embedded store, queue and artifact directory.
    Serve {
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// TOML settings file (also PACLOUD_CONFIG).
        #[arg(long, env = "PACLOUD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run build workers only, on the same data directory as a `serve`.
    Worker {
        /// Where jobs come from: `local` (the data directory's SQLite queue)
        /// or `aws` (SQS, DynamoDB, S3 from `[aws]` / PACLOUD_AWS_*).
        #[arg(long, value_enum, default_value = "local")]
        backend: WorkerBackend,
        /// Build directories (and, for `local`, the queue and store).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, env = "PACLOUD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Request a package, wait for it, download and verify it.
    Get {
        /// category/package-version, e.g. app-misc/hello-2.12-r1
        package: String,
        /// USE flags, e.g. "foo -bar"
        #[arg(long = "use", default_value = "", allow_hyphen_values = true)]
        use_flags: String,
        #[arg(long)]
        target: Option<String>,
        #[arg(long, env = "PACLOUD_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        #[arg(long, env = "PACLOUD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Directory to write the package to.
        #[arg(short = 'o', long = "output", default_value = ".")]
        output: PathBuf,
        /// Give up after this many seconds of waiting.
        #[arg(long, default_value_t = 24 * 3600)]
        timeout: u64,
    },
    /// Show a build's state by key.
    Status {
        key: String,
        #[arg(long, env = "PACLOUD_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
    },
    /// Print the build key of a request, computed offline.
    Key {
        /// category/package-version
        package: String,
        #[arg(long = "use", default_value = "", allow_hyphen_values = true)]
        use_flags: String,
        #[arg(long)]
        target: Option<String>,
        /// Settings file defining targets (also PACLOUD_CONFIG).
        #[arg(long, env = "PACLOUD_CONFIG")]
        config: Option<PathBuf>,
        /// The target's tree index (`<target>/tree-index/<hash>.json`), for a
        /// target that keys by effective USE (key version 2).
        #[arg(long)]
        index: Option<PathBuf>,
    },
    /// Build a whole merge list on the server, then install it with emerge.
    ///
    /// Runs `emerge --pretend --verbose ARGS` with your configuration
    /// (PORTAGE_CONFIGROOT, ROOT, EPREFIX honoured), requests every package
    /// it would build, shows their progress, and runs
    /// `emerge --getbinpkg --binpkg-respect-use=y ARGS` once all are built.
    Emerge {
        #[arg(long, env = "PACLOUD_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        #[arg(long, env = "PACLOUD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// Only show what would be requested.
        #[arg(long)]
        pretend: bool,
        /// Give up waiting for the builds after this many seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        timeout: u64,
        /// The emerge arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
}

// A faster allocator for the server's many small JSON allocations
// (docs/benchmarks.md has the before/after figures).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, clap::ValueEnum)]
enum WorkerBackend {
    Local,
    Aws,
}

/// A mistake in what was asked: printed as one line, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pacloud: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<Usage>() {
                eprintln!("pacloud: {u}");
                return ExitCode::from(2);
            }
            if let Some(em) = e.downcast_ref::<pacloud::emerge::EmergeError>() {
                if !matches!(em, pacloud::emerge::EmergeError::Rejected { .. }) {
                    eprintln!("pacloud: {em}");
                }
                return ExitCode::from(em.exit_code().clamp(1, 255) as u8);
            }
            if let Some(c) = e.downcast_ref::<pacloud::client::ClientError>() {
                eprintln!("pacloud: {c}");
                if let pacloud::client::ClientError::BuildFailed { log_url: Some(u), .. } = c {
                    eprintln!("pacloud: build log: {u}");
                }
                return ExitCode::from(c.exit_code() as u8);
            }
            eprintln!("pacloud: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Splits `cat/pkg-ver` and checks the USE string, as the server would.
fn parse_package(package: &str, use_flags: &str) -> Result<(String, String, Vec<String>), Usage> {
    let (atom, version) = parse_versioned_atom(package).map_err(|e| Usage(format!("package {package:?} {e}")))?;
    UseSet::parse_str(use_flags).map_err(|e| Usage(format!("--use {use_flags:?}: {e}")))?;
    let flags = use_flags.split_ascii_whitespace().map(str::to_owned).collect();
    Ok((atom.to_string(), version.to_string(), flags))
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load_settings(
    config: Option<&std::path::Path>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<Settings> {
    let mut settings = Settings::load(config, |k| std::env::var(k).ok()).map_err(|e| Usage(format!("{e:#}")))?;
    if let Some(l) = listen {
        settings.listen = l;
    }
    if let Some(d) = data_dir {
        settings.data_dir = d;
    }
    Ok(settings)
}

/// The first-run setup (repository, portage venv, tools), reported line by line.
async fn first_run(settings: &mut Settings) -> anyhow::Result<()> {
    let setup = pacloud::setup::prepare(settings)
        .await
        .context("builds were asked for (build.backend = \"bwrap\") but cannot run here")?;
    for note in &setup.notes {
        tracing::info!("{note}");
    }
    if let Some(missing) = &setup.missing {
        tracing::warn!("builds are off: {missing}");
        eprintln!("pacloud: builds are off: {missing}");
    }
    Ok(())
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_token() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! { _ = ctrl_c => {}, _ = term => {} }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { listen, data_dir, config } => {
            init_logging();
            let mut settings = load_settings(config.as_deref(), listen, data_dir)?;
            first_run(&mut settings).await?;
            let listener = tokio::net::TcpListener::bind(settings.listen)
                .await
                .with_context(|| format!("binding {}", settings.listen))?;
            let bound = listener.local_addr().context("reading the bound address")?;
            let app = pacloud::serve::build_app(&settings, &pacloud::serve::public_url(&settings, bound))?;
            if settings.tokens.is_empty() {
                tracing::warn!(
                    "no tokens configured: every caller may start builds (set PACLOUD_TOKENS or `tokens` to require one)"
                );
            }
            let workers = match pacloud::build::detect(&settings).await {
                pacloud::build::Detected::Ready(backend) => {
                    tracing::info!("build backend: {}", backend.description);
                    Some(pacloud::build::start_workers(&app, backend, &settings, app.clock.clone()))
                }
                pacloud::build::Detected::Unavailable(why) => {
                    tracing::warn!("no build backend: {why}; requests are queued until a worker runs");
                    None
                }
            };
            tracing::info!(
                listen = %bound,
                data_dir = %settings.data_dir.display(),
                default_target = %settings.targets.default_name(),
                "pacloud serving"
            );
            let shutdown = shutdown_token();
            let stopped = shutdown.clone();
            pacloud::serve::serve(listener, app.router.clone(), async move { stopped.cancelled().await })
                .await
                .context("serving HTTP")?;
            if let Some(w) = workers {
                w.shutdown(settings.build.shutdown_grace).await;
            }
            Ok(())
        }
        Command::Worker { backend: WorkerBackend::Aws, data_dir, config } => {
            init_logging();
            let settings = load_settings(config.as_deref(), None, data_dir)?;
            pacloud::aws_worker::aws_config(&settings).map_err(|e| Usage(format!("{e:#}")))?;
            pacloud::aws_worker::check_signing(&settings).map_err(|e| Usage(format!("{e:#}")))?;
            pacloud::aws_worker::run(&settings, shutdown_token()).await
        }
        Command::Worker { backend: WorkerBackend::Local, data_dir, config } => {
            init_logging();
            let mut settings = load_settings(config.as_deref(), None, data_dir)?;
            first_run(&mut settings).await?;
            let app = pacloud::serve::build_app(&settings, "http://127.0.0.1:0")?;
            let backend = match pacloud::build::detect(&settings).await {
                pacloud::build::Detected::Ready(b) => b,
                pacloud::build::Detected::Unavailable(why) => return Err(anyhow::anyhow!("no build backend: {why}")),
            };
            tracing::info!("pacloud worker on {}: {}", settings.data_dir.display(), backend.description);
            let workers = pacloud::build::start_workers(&app, backend, &settings, app.clock.clone());
            shutdown_token().cancelled().await;
            workers.shutdown(settings.build.shutdown_grace).await;
            Ok(())
        }
        Command::Get { package, use_flags, target, server, token, output, timeout } => {
            let (atom, version, use_flags) = parse_package(&package, &use_flags)?;
            let client = Client::new(&server, token)?;
            let mut progress: Box<dyn Progress> = if std::io::stderr().is_terminal() {
                Box::new(SpinnerProgress::new())
            } else {
                Box::new(LineProgress::new())
            };
            let req = GetRequest { atom, version, use_flags, target };
            let path = client.get(&req, &output, progress.as_mut(), Duration::from_secs(timeout)).await?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Status { key, server } => {
            key.parse::<pacloud_domain::BuildKey>().map_err(|e| Usage(format!("key {key:?} {e}")))?;
            let client = Client::new(&server, None)?;
            let state = client.poll(&format!("/v1/builds/{key}")).await?;
            match &state {
                pacloud::client::BuildState::Ready { url, sha256, size, expires_at, .. } => {
                    println!("ready\nsha256 {sha256}\nsize {size}\nurl {url}\nexpires {expires_at}")
                }
                pacloud::client::BuildState::Failed { class, reason, log_url, .. } => {
                    println!("failed ({})\nreason {reason}", class.as_deref().unwrap_or("?"));
                    if let Some(u) = log_url {
                        println!("log {u}");
                    }
                }
                other => println!("{}", other.name()),
            }
            Ok(())
        }
        Command::Key { package, use_flags, target, config, index } => {
            let (atom, version, use_flags) = parse_package(&package, &use_flags)?;
            let settings =
                Settings::load(config.as_deref(), |k| std::env::var(k).ok()).map_err(|e| Usage(format!("{e:#}")))?;
            let mut spec =
                BuildRequest { atom, version, use_flags, target }.validate(&settings.targets).map_err(|e| match e {
                    SpecError::Invalid(v) => Usage(v.to_string()),
                    SpecError::UnknownTarget(t) => Usage(format!("--target: unknown target {t:?}")),
                })?;
            let t = settings.targets.get(&spec.target).context("target")?;
            match (t.spec.tree_index, index) {
                (false, _) => {}
                (true, None) => {
                    return Err(Usage(format!(
                        "target {} keys by effective USE (key version 2): pass --index <its tree index file>",
                        t.name
                    ))
                    .into());
                }
                (true, Some(file)) => {
                    use pacloud_domain::tree::{Cpv, TreeIndex};
                    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                    let idx =
                        TreeIndex::parse(&bytes, t).map_err(|e| Usage(format!("--index {}: {e}", file.display())))?;
                    let pkg = idx.get(&spec.atom, &spec.version).map_err(|e| Usage(e.to_string()))?;
                    spec.use_flags = pkg
                        .effective(&Cpv(&spec.atom, &spec.version), &spec.use_flags)
                        .map_err(|e| Usage(e.to_string()))?;
                    spec.key_version = pacloud_domain::KeyVersion::V2;
                }
            }
            println!("{}", spec.key());
            Ok(())
        }
        Command::Emerge { server, token, target, pretend, timeout, args } => {
            let opts = pacloud::emerge::EmergeOptions {
                server,
                token,
                target,
                pretend,
                args,
                emerge: "emerge".into(),
                timeout: Duration::from_secs(timeout),
            };
            pacloud::emerge::run(&opts).await?;
            Ok(())
        }
    }
}
