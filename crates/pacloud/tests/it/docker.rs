//! The build path in a real container engine: the same server, workers and
//! fixture builds as `builds.rs`, but with `[build] backend = "docker"` on
//! the stand-in builder image (scripts/builder-image.sh; scripts/test.sh
//! builds it and exports PACLOUD_BUILDER_IMAGE). Every test needs a Docker
//! engine and fails (never skips) without one.
//!
//! A worker's startup removes every `pacloud.managed=1` container of the
//! engine, so these tests hold one lock for their whole run (they never
//! overlap) and remove the containers they leave when they end.

use crate::helpers::*;
use pacloud::settings::{BackendChoice, Settings};
use pacloud_domain::ports::MetadataStore;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Serialises the docker tests of this binary.
static ENGINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole docker test: the lock, and on drop (pass or panic) the
/// removal of every container a test worker started.
pub(crate) struct EngineGuard {
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for EngineGuard {
    fn drop(&mut self) {
        for id in managed_containers() {
            let _ = Command::new("docker").args(["rm", "-f", &id]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

pub(crate) async fn engine() -> EngineGuard {
    let lock = ENGINE.lock().await;
    let out = Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("the docker tests need a Docker engine: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("the docker tests need the docker CLI: {e}"),
    }
    EngineGuard { _lock: lock }
}

/// `docker ps -a -q --filter label=pacloud.managed=1`: every pacloud
/// container of the engine, running or stopped.
fn managed_containers() -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "-q", "--no-trunc", "--filter", "label=pacloud.managed=1"])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

/// Waits (up to 30 s: `--rm` removal is the daemon's, after the client
/// returned) until no pacloud container is left.
pub(crate) async fn wait_no_containers() {
    let start = Instant::now();
    while !managed_containers().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "left behind: {:?}", managed_containers());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The stand-in builder image: PACLOUD_BUILDER_IMAGE, else the newest local
/// image labelled `org.pacloud.builder=standin`.
pub(crate) fn builder_image() -> String {
    if let Some(image) = std::env::var("PACLOUD_BUILDER_IMAGE").ok().filter(|i| !i.is_empty()) {
        return image;
    }
    let out = Command::new("docker")
        .args(["image", "ls", "-q", "--no-trunc", "--filter", "label=org.pacloud.builder=standin"])
        .output()
        .expect("docker image ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
        .expect("no stand-in builder image: run scripts/builder-image.sh (or set PACLOUD_BUILDER_IMAGE)")
}

/// The fixture settings with the docker backend on the stand-in image.
fn use_docker(s: &mut Settings) {
    use_fixtures(s);
    s.build.backend = BackendChoice::Docker;
    s.build.image = Some(builder_image());
    s.build.portage_venv = None;
}

async fn spawn_docker_builder_with(f: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(|s| {
        use_docker(s);
        f(s);
    })
    .await
}

fn req(atom: &str, version: &str, use_flags: &[&str]) -> Value {
    json!({"atom": atom, "version": version, "use": use_flags})
}

/// The host's global IPv4 addresses (`ip -4 -o addr show scope global`):
/// docker0's (the host as a bridged container sees it) and the machine's own.
fn host_addresses() -> Vec<String> {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]).output().expect("ip addr");
    let addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "inet")?;
            Some(w.next()?.split('/').next()?.to_owned())
        })
        .collect();
    assert!(!addrs.is_empty(), "the host has a global IPv4 address");
    addrs
}

/// PACLOUD_DIAL for app-misc/dialhost: every host address on `port`.
fn dial_list(port: u16, loopback: bool) -> String {
    let mut addrs = host_addresses();
    if loopback {
        addrs.push("127.0.0.1".into());
    }
    addrs.iter().map(|a| format!("{a}/{port}")).collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_builds_a_chain_reusing_cached_dependencies() {
    let _engine = engine().await;
    // Dependencies merged from their binaries (no kept ROOT to start from).
    let app = spawn_docker_builder_with(|s| s.build.dependency_roots = 0).await;
    let (dep_key, dep) = app.build(&req("dev-libs/libfoo", "1.0", &[])).await;
    assert_eq!(dep["status"], "ready", "{dep}");
    let (key, built) = app.build(&req("app-misc/uses-libfoo", "1.0", &[])).await;
    assert_eq!(built["status"], "ready", "{built}");
    let log = app.logs(&key).concat();
    assert!(log.contains(">>> Emerging binary (1 of 2) dev-libs/libfoo-1.0"), "libfoo came from the cache:\n{log}");
    assert_eq!(log.matches(">>> Compiling source").count(), 1, "exactly one compile (uses-libfoo itself):\n{log}");
    assert_eq!(app.logs(&dep_key).len(), 1);
    // The binary is a real GPKG built in the container, against the cached libfoo.
    let tmp = tempfile::tempdir().unwrap();
    let bytes = app.http.get(built["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&bytes), built["sha256"].as_str().unwrap());
    let pkg = tmp.path().join("uses-libfoo.gpkg.tar");
    std::fs::write(&pkg, &bytes).unwrap();
    let image = zstd_tar_list(&tar_member(&pkg, "uses-libfoo-1.0-1/image.tar.zst"), tmp.path());
    assert!(image.iter().any(|f| f == "image/usr/share/uses-libfoo/built-against.txt"), "{image:?}");
    // The requested USE reaches the package built in the container.
    let (_, hello) = app.build(&req("app-misc/hello", "2.12-r1", &["foo", "-bar"])).await;
    assert_eq!(hello["status"], "ready", "{hello}");
    let bytes = app.http.get(hello["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    let pkg = tmp.path().join("hello.gpkg.tar");
    std::fs::write(&pkg, &bytes).unwrap();
    let metadata = tar_member(&pkg, "hello-2.12-r1-1/metadata.tar.zst");
    let recorded = zstd_tar_member(&metadata, "metadata/USE", tmp.path());
    let flags: Vec<&str> = recorded.split_whitespace().collect();
    assert!(flags.contains(&"foo") && !flags.contains(&"bar"), "metadata/USE = {recorded:?}");
    wait_no_containers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_a_failing_package_is_failed_with_its_log() {
    let _engine = engine().await;
    let app = spawn_docker_builder_with(|_| {}).await;
    let (key, failed) = app.build(&req("app-misc/dies", "1.0", &[])).await;
    assert_eq!((failed["status"].as_str(), failed["class"].as_str()), (Some("failed"), Some("build")), "{failed}");
    let log = app.http.get(app.url(&format!("/v1/builds/{key}/log"))).send().await.unwrap().text().await.unwrap();
    assert!(log.contains("pacloud-fixture: intentional failure in src_compile"), "{log}");
    assert!(!app.dir.path().join("data/artifacts/fixtures/app-misc/dies").exists(), "no artifact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_builds_are_isolated_from_each_other_and_the_host() {
    let _engine = engine().await;
    let markers = ["/tmp/pacloud-escape-marker", "/pacloud-escape-marker", "/var/tmp/pacloud-escape-marker"];
    for marker in markers {
        let _ = std::fs::remove_file(marker);
    }
    // A host port the builds try to dial, on every address of the host.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dial = dial_list(port, true);
    let app = spawn_docker_builder_with(|s| {
        s.build.workers = 1;
        add_dial_target(s, &dial);
    })
    .await;
    let (key, escaped) = app.build(&req("app-misc/escape", "1.0", &[])).await;
    assert_eq!(escaped["status"], "ready", "{escaped}");
    for marker in markers {
        assert!(!Path::new(marker).exists(), "the build wrote {marker} on the host");
    }
    let log = app.logs(&key).concat();
    assert!(!log.contains("escape: remounted / read-write"), "remount must fail without CAP_SYS_ADMIN:\n{log}");
    // Build 2 sees nothing build 1 wrote outside its PKGDIR.
    let (_, clean) = app.build(&req("app-misc/leakcheck", "1.0", &[])).await;
    assert_eq!(clean["status"], "ready", "{clean}");
    // No network: neither the internet nor a port of the host.
    let (_, net) = app.build(&req("app-misc/net", "1.0", &[])).await;
    assert_eq!((net["status"].as_str(), net["class"].as_str()), (Some("failed"), Some("build")), "{net}");
    assert!(net["log_tail"].as_str().unwrap().contains("pacloud-fixture: network unreachable"), "{net}");
    let (_, dialed) = app.build(&json!({"atom": "app-misc/dialhost", "version": "1.0", "target": "dial"})).await;
    assert_eq!(dialed["status"], "failed", "{dialed}");
    assert!(dialed["log_tail"].as_str().unwrap().contains("no host port reachable"), "{dialed}");
    assert!(listener.accept().is_err(), "the host port saw no connection");
}

/// A target `dial` whose builds get PACLOUD_DIAL (app-misc/dialhost).
fn add_dial_target(s: &mut Settings, dial: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dial.toml");
    let toml = format!(
        "{}\n[targets.dial]\nprofile = \"default\"\nchost = \"x86_64-pc-linux-gnu\"\ncflags = \"-O2 -pipe\"\n\
         repository = \"pacloud-fixtures\"\nsnapshot = \"1\"\nbuilder = \"host\"\nenv = {{ PACLOUD_DIAL = \"{dial}\" }}\n",
        fixture_config_toml()
    );
    std::fs::write(&file, toml).unwrap();
    s.targets = Settings::load(Some(&file), |_| None).expect("dial target").targets;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_network_is_none_unless_the_worker_allows_it() {
    let _engine = engine().await;
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dial = dial_list(port, false);
    let accept = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::Read::read_to_string(&mut conn, &mut line).unwrap();
        line
    });
    // The positive control of the isolation test: with build.network = true
    // the container is on the bridge and reaches the same host port.
    let app = spawn_docker_builder_with(|s| {
        s.build.workers = 1;
        s.build.network = true;
        add_dial_target(s, &dial);
    })
    .await;
    let (_, dialed) = app.build(&json!({"atom": "app-misc/dialhost", "version": "1.0", "target": "dial"})).await;
    assert_eq!(dialed["status"], "ready", "{dialed}");
    assert_eq!(accept.join().unwrap().trim(), "pacloud-dialhost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_memory_and_time_limits_are_enforced() {
    let _engine = engine().await;
    // 768 MiB touched under a 384 MiB limit (no swap on top): killed.
    let app = spawn_docker_builder_with(|s| {
        s.build.workers = 1;
        s.build.memory_bytes = Some(384 << 20);
    })
    .await;
    let (_, hog) = app.build(&req("app-misc/memhog", "1.0", &[])).await;
    assert_eq!((hog["status"].as_str(), hog["class"].as_str()), (Some("failed"), Some("build")), "{hog}");
    assert!(hog["log_tail"].as_str().unwrap().contains("memhog was killed"), "{hog}");
    drop(app);
    // The control: the same build under a 2 GiB limit succeeds.
    let roomy = spawn_docker_builder_with(|s| {
        s.build.workers = 1;
        s.build.memory_bytes = Some(2 << 30);
    })
    .await;
    let (_, fed) = roomy.build(&req("app-misc/memhog", "1.0", &[])).await;
    assert_eq!(fed["status"], "ready", "{fed}");
    drop(roomy);

    // The wall clock: an 8 s build under a 3 s limit is killed, classed
    // timeout, and its container removed.
    let timed = spawn_docker_builder_with(|s| {
        s.build.workers = 1;
        s.build.wall_clock = Duration::from_secs(3);
    })
    .await;
    let started = Instant::now();
    let (_, slow) = timed.build(&req("app-misc/slow", "1.0", &[])).await;
    assert_eq!((slow["status"].as_str(), slow["class"].as_str()), (Some("failed"), Some("timeout")), "{slow}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    wait_no_containers().await;
}

/// Starts `pacloud worker` with the docker backend on `app`'s data directory.
fn docker_worker_process(app: &TestApp, build_toml: &str, envs: &[(&str, &str)], stderr: Stdio) -> std::process::Child {
    let config = app.dir.path().join(format!("docker-worker-{}.toml", std::process::id()));
    let toml = format!(
        "{}\n[build]\nbackend = \"docker\"\nworkers = 1\nlease_secs = 4\n{build_toml}\n",
        fixture_config_toml()
    );
    std::fs::write(&config, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pacloud"));
    cmd.args(["worker", "--data-dir"])
        .arg(app.dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .env_remove("PACLOUD_CONFIG")
        .env_remove("PACLOUD_BUILD_IMAGE")
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start pacloud worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sigkill_of_the_worker_leaves_no_container_behind() {
    let _engine = engine().await;
    let app = spawn_docker_builder_with(|s| s.build.workers = 0).await;
    let (status, first) = app.post_build(&req("app-misc/slow", "1.0", &[])).await;
    assert_eq!(status, 202);
    let key: pacloud_domain::BuildKey = first["key"].as_str().unwrap().parse().unwrap();
    let image = format!("image = \"{}\"", builder_image());
    let mut a = docker_worker_process(&app, &image, &[], Stdio::null());
    let start = Instant::now();
    while app.app.store.get(&key).await.unwrap().map(|r| r.status) != Some(pacloud_domain::Status::Building) {
        assert!(start.elapsed() < Duration::from_secs(60), "never started building");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // inside the 8 s compile
    a.kill().unwrap(); // SIGKILL: no chance to clean up
    a.wait().unwrap();
    let orphans = managed_containers();
    assert_eq!(orphans.len(), 1, "the killed worker's container outlives it until recovery: {orphans:?}");

    let mut b = docker_worker_process(&app, &image, &[], Stdio::null());
    let (_, ready) = app.wait_done(key.as_str(), Duration::from_secs(120)).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    // The new worker removed the orphan at startup, and its own build's container went with --rm.
    wait_no_containers().await;
    b.kill().unwrap();
    b.wait().unwrap();
    let record = app.app.store.get(&key).await.unwrap().unwrap();
    assert_eq!(record.attempts, 2, "delivered again and claimed by the second worker");
    let published: Vec<_> = std::fs::read_dir(app.dir.path().join("data/artifacts/fixtures/app-misc/slow"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(published, vec!["slow-1.0-1.gpkg.tar"], "exactly one artifact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sigterm_past_the_grace_period_kills_the_container() {
    let _engine = engine().await;
    let app = spawn_docker_builder_with(|s| s.build.workers = 0).await;
    let (_, first) = app.post_build(&req("app-misc/slow", "1.0", &[])).await;
    let key: pacloud_domain::BuildKey = first["key"].as_str().unwrap().parse().unwrap();
    let config = format!("image = \"{}\"\nshutdown_grace_secs = 1", builder_image());
    let mut w = docker_worker_process(&app, &config, &[], Stdio::null());
    // Building (so past the preflight, whose container is labelled too) and the build's container is up.
    let start = Instant::now();
    while managed_containers().is_empty()
        || app.app.store.get(&key).await.unwrap().map(|r| r.status) != Some(pacloud_domain::Status::Building)
    {
        assert!(start.elapsed() < Duration::from_secs(60), "the build container never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    Command::new("kill").args(["-TERM", &w.id().to_string()]).status().unwrap();
    let status = w.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(7), "did not wait for the 8 s build: {:?}", started.elapsed());
    // The worker itself killed and removed its container (no later worker cleaned up).
    assert!(managed_containers().is_empty(), "left behind: {:?}", managed_containers());
    let record = app.app.store.get(&key).await.unwrap().unwrap();
    assert_eq!((record.status, record.lease.clone()), (pacloud_domain::Status::Queued, None), "lease given up");
}

/// Runs `pacloud worker` expecting it to refuse to start; returns its stderr.
async fn refused(app: &TestApp, build_toml: &str, envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let child = docker_worker_process(app, build_toml, envs, Stdio::piped());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_worker_refuses_to_start_naming_what_is_missing() {
    let _engine = engine().await;
    let app = spawn_app().await;
    let missing = format!("sha256:{}", "0".repeat(64));

    let (code, err) = refused(&app, "", &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("build.image is not set"), "{err}");

    let (code, err) = refused(&app, "image = \"pacloud-builder-standin:latest\"", &[]).await;
    assert_eq!(code, Some(2), "a tag is a usage mistake: {err}");
    assert!(err.contains("pacloud-builder-standin:latest") && err.contains("pinned by digest"), "{err}");

    let (code, err) = refused(&app, &format!("image = \"{missing}\""), &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&missing) && err.contains("is not in the local Docker engine"), "{err}");

    let image = format!("image = \"{}\"", builder_image());
    let (code, err) = refused(&app, &format!("{image}\nunprivileged = \"always\""), &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unprivileged = always is not supported"), "{err}");

    let (code, err) = refused(&app, &image, &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no Docker engine answers"), "{err}");

    // An image without portage: one file, no emerge.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("README"), "no portage here\n").unwrap();
    let tar = tmp.path().join("rootfs.tar");
    let ok = Command::new("tar").arg("-C").arg(tmp.path()).arg("-cf").arg(&tar).arg("README").status().unwrap();
    assert!(ok.success());
    let out = Command::new("docker").arg("import").arg(&tar).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bare = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (code, err) = refused(&app, &format!("image = \"{bare}\""), &[]).await;
    let _ = Command::new("docker").args(["rmi", "-f", &bare]).output();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&bare) && err.contains("has no usable portage"), "{err}");
    wait_no_containers().await;
}

/// The evidence for `pacloud::build::DOCKER_READ_ONLY_ROOT = false`: with
/// `--read-only`, portage cannot even lock the builder's own package
/// database (`/var/db/pkg`, BROOT's vardb, locked on every emerge), so every
/// build fails, even a package without dependencies; and a package with a
/// build-time dependency (BDEPEND) needs it merged into BROOT = `/` of the
/// container anyway. With the writable root (the container's own layer,
/// discarded by `--rm`) both build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_read_only_root_breaks_builds() {
    use pacloud_worker::sandbox::Sandbox;
    use pacloud_worker::sandbox::docker::DockerSandbox;
    let _engine = engine().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut s = Settings { data_dir: dir.path().join("data"), ..Settings::default() };
    use_docker(&mut s);
    let backend = match pacloud::build::detect(&s).await {
        pacloud::build::Detected::Ready(b) => b,
        pacloud::build::Detected::Unavailable(why) => panic!("{why}"),
    };
    let run = async |atom: &str, version: &str, read_only: bool| {
        let spec = pacloud_domain::BuildRequest { atom: atom.into(), version: version.into(), ..Default::default() }
            .validate(&s.targets)
            .unwrap();
        let target = s.targets.get(&spec.target).unwrap().clone();
        let job_id = format!("ro-{read_only}-{}-{}", atom.replace('/', "_"), std::process::id());
        let plan =
            pacloud_worker::plan::prepare(&backend.env, &pacloud_domain::ports::Job::new(spec), &target, &job_id)
                .unwrap();
        let docker = DockerSandbox::default().with_read_only_root(read_only);
        let out = docker.run(&plan, tokio_util::sync::CancellationToken::new()).await.unwrap();
        (out.exit_code, std::fs::read_to_string(&out.log).unwrap())
    };
    for atom in ["app-misc/hello", "app-misc/uses-tool"] {
        let version = if atom == "app-misc/hello" { "2.12-r1" } else { "1.0" };
        let (code, log) = run(atom, version, true).await;
        assert_eq!(code, Some(1), "read-only root: {atom} fails\n{log}");
        assert!(log.contains("Read-only file system: '/var/db/.pkg.portage_lockfile'"), "{log}");
    }
    let (code, log) = run("app-misc/uses-tool", "1.0", false).await;
    assert_eq!(code, Some(0), "writable root: builds\n{log}");
    assert!(log.contains(">>> Emerging (1 of 2) dev-libs/libfoo-1.0"), "BDEPEND merged into BROOT:\n{log}");
    wait_no_containers().await;
}

/// The production Dockerfile (worker-image/builder/Dockerfile, `FROM` a
/// stage3 by digest) cannot be built here: no registry. Built `FROM` the
/// stand-in image instead (the only base reachable), it must build and pass
/// the worker's preflight; without a base it must refuse to build. Its
/// layers are kept under a tag so later runs hit docker's build cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_production_dockerfile_builds_on_the_stand_in_base() {
    let _engine = engine().await;
    let context = workspace().join("worker-image/builder");
    let build = |args: &[&str]| {
        Command::new("docker")
            .args(["build", "--quiet", "--force-rm", "--tag", "pacloud-builder-prodcheck:latest"])
            .args(args)
            .arg(&context)
            .output()
            .expect("docker build")
    };
    let unpinned = build(&[]);
    assert!(!unpinned.status.success(), "no STAGE3, no image");
    assert!(String::from_utf8_lossy(&unpinned.stderr).contains("STAGE3"), "{unpinned:?}");
    let base = format!("STAGE3={}", builder_image());
    let out = build(&["--build-arg", &base]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let found = pacloud_worker::sandbox::docker::DockerSandbox::default().preflight(&id).await.expect("preflight");
    assert!(found.portage.starts_with("Portage "), "{found:?}");
    assert_eq!(found.image_id, id);
    wait_no_containers().await;
}
