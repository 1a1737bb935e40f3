//! The worker AMI's files (worker-image/), for real: shellcheck on the
//! scripts; the IMDS guard's DOCKER-USER rule applied in network namespaces
//! this test makes (a container side, a docker0 host side, a metadata host at
//! 169.254.169.254 — no packet leaves them) and shown to drop container
//! traffic to the metadata address only; and provision.sh run in a local
//! stand-in container (worker-image/test/standin-image.sh), where
//! `systemd-analyze verify` checks the installed units and the unit's own
//! start command refuses a missing queue, table, bucket or builder image.
//! The namespace test needs root, iproute2, iptables and ping; the container
//! test needs a Docker engine (scripts/test.sh runs it where one answers).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn run(argv: &[&str]) -> Output {
    Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
}

fn ok(argv: &[&str]) -> String {
    let out = run(argv);
    assert!(
        out.status.success(),
        "{argv:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn worker_image_scripts_pass_shellcheck() {
    let root = repo();
    let mut scripts: Vec<PathBuf> = Vec::new();
    for dir in ["worker-image", "worker-image/test"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "sh") {
                scripts.push(p);
            }
        }
    }
    scripts.sort();
    let names: Vec<_> = scripts.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["provision.sh", "imds-guard.sh", "bundle.sh", "standin-image.sh", "in-container.sh"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    let mut argv = vec!["shellcheck", "--severity=style"];
    let paths: Vec<String> = scripts.iter().map(|p| p.display().to_string()).collect();
    argv.extend(paths.iter().map(String::as_str));
    ok(&argv);
    // The checker is not vacuous: an unquoted expansion is reported.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "#!/bin/bash\nrm -rf $1/x\n").unwrap();
    assert!(!run(&["shellcheck", &bad.path().display().to_string()]).status.success());
}

/// Network namespaces made by this test, deleted (with their veths) on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

fn in_ns(ns: &str, argv: &[&str]) -> Output {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(argv);
    run(&full)
}

fn ping(ns: &str, addr: &str) -> bool {
    in_ns(ns, &["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", addr]).status.success()
}

fn drop_counter(ns: &str, iface: &str) -> u64 {
    let out = in_ns(ns, &["iptables", "-w", "-n", "-v", "-x", "-L", "DOCKER-USER"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("DROP") && l.contains(iface) && l.contains("169.254.169.254"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no DROP rule for {iface} in:\n{text}"))
}

#[test]
fn imds_guard_drops_container_traffic_to_the_metadata_address() {
    let id = std::process::id() % 100_000;
    let (ctr, ctr2, host, imds) =
        (format!("pci-ctr-{id}"), format!("pci-ctr2-{id}"), format!("pci-host-{id}"), format!("pci-imds-{id}"));
    let _cleanup = Namespaces(vec![ctr.clone(), ctr2.clone(), host.clone(), imds.clone()]);
    for ns in [&ctr, &ctr2, &host, &imds] {
        ok(&["ip", "netns", "add", ns]);
        ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    // container eth0 <-> host docker0 (the default bridge's name), a second
    // container eth0 <-> host br-pacloud (a user-defined network's), host
    // eth0 <-> metadata host eth0.
    let (a, b, c, d) = (format!("pca{id}"), format!("pcb{id}"), format!("pcc{id}"), format!("pcd{id}"));
    let (e, f) = (format!("pce{id}"), format!("pcf{id}"));
    ok(&["ip", "link", "add", &a, "netns", &ctr, "type", "veth", "peer", "name", &b, "netns", &host]);
    ok(&["ip", "link", "add", &c, "netns", &host, "type", "veth", "peer", "name", &d, "netns", &imds]);
    ok(&["ip", "link", "add", &e, "netns", &ctr2, "type", "veth", "peer", "name", &f, "netns", &host]);
    for (ns, from, to, addr) in [
        (&ctr, &a, "eth0", "10.213.0.2/24"),
        (&host, &b, "docker0", "10.213.0.1/24"),
        (&host, &c, "eth0", "10.213.1.1/24"),
        (&imds, &d, "eth0", "10.213.1.2/24"),
        (&ctr2, &e, "eth0", "10.213.2.2/24"),
        (&host, &f, "br-pacloud", "10.213.2.1/24"),
    ] {
        ok(&["ip", "-n", ns, "link", "set", from, "name", to]);
        ok(&["ip", "-n", ns, "addr", "add", addr, "dev", to]);
        ok(&["ip", "-n", ns, "link", "set", to, "up"]);
    }
    ok(&["ip", "-n", &imds, "addr", "add", "169.254.169.254/32", "dev", "eth0"]);
    ok(&["ip", "-n", &ctr, "route", "add", "default", "via", "10.213.0.1"]);
    ok(&["ip", "-n", &ctr2, "route", "add", "default", "via", "10.213.2.1"]);
    ok(&["ip", "-n", &imds, "route", "add", "10.213.0.0/16", "via", "10.213.1.1"]);
    ok(&["ip", "-n", &host, "route", "add", "169.254.169.254/32", "via", "10.213.1.2"]);
    assert!(in_ns(&host, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]).status.success());

    // Without the guard the container reaches the metadata address: the path is real.
    assert!(ping(&ctr, "169.254.169.254"), "before the guard, the container side must reach 169.254.169.254");
    assert!(ping(&ctr2, "169.254.169.254"), "before the guard, the user-defined network reaches it too");

    let guard = repo().join("worker-image/imds-guard.sh");
    let guard = guard.to_str().unwrap();
    let out = in_ns(&host, &[guard]);
    assert!(out.status.success(), "imds-guard failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(in_ns(&host, &[guard]).status.success(), "the guard is idempotent");
    let rules = String::from_utf8_lossy(&in_ns(&host, &["iptables", "-w", "-S", "DOCKER-USER"]).stdout).into_owned();
    let drops: Vec<_> = rules.lines().filter(|l| l.contains("169.254.169.254")).collect();
    assert_eq!(drops.len(), 2, "one rule each for docker+ and br-+, even after two runs:\n{rules}");
    let forward = String::from_utf8_lossy(&in_ns(&host, &["iptables", "-w", "-S", "FORWARD"]).stdout).into_owned();
    assert_eq!(forward.matches("-j DOCKER-USER").count(), 1, "FORWARD jumps to DOCKER-USER once:\n{forward}");

    assert!(!ping(&ctr, "169.254.169.254"), "the container side must not reach 169.254.169.254");
    assert!(drop_counter(&host, "docker+") >= 2, "the docker+ DROP rule counted the container's packets");
    assert!(ping(&ctr, "10.213.1.2"), "other traffic from the container side still passes");
    assert!(!ping(&ctr2, "169.254.169.254"), "a user-defined network (br-*) must not reach 169.254.169.254");
    assert!(drop_counter(&host, "br-+") >= 2, "the br-+ DROP rule counted that network's packets");
    assert!(ping(&ctr2, "10.213.1.2"), "other traffic from the user-defined network still passes");
    assert!(ping(&host, "169.254.169.254"), "the host itself (the worker) still reaches the metadata service");
}

/// Removes a test image from the engine on drop.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = run(&["docker", "rmi", "--force", &self.0]);
    }
}

/// The local stand-in image, built (cached) by worker-image/test/standin-image.sh.
fn standin_image() -> String {
    let out = ok(&[repo().join("worker-image/test/standin-image.sh").to_str().unwrap()]);
    out.lines().last().expect("standin-image.sh prints the image").trim().to_owned()
}

#[test]
fn provision_installs_a_worker_host_that_refuses_missing_configuration() {
    let image = standin_image();
    let bundle = tempfile::tempdir().unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_pacloud"), bundle.path().join("pacloud")).unwrap();
    // A tiny "builder image" (an empty rootfs imported here, no registry),
    // saved the way worker-image/bundle.sh saves the real one.
    let empty = bundle.path().join("empty.tar");
    ok(&["tar", "-cf", empty.to_str().unwrap(), "-T", "/dev/null"]);
    let tag = format!("pacloud-test-builder:{}", std::process::id());
    let id = ok(&["docker", "import", empty.to_str().unwrap(), &tag]).trim().to_owned();
    let saved = bundle.path().join("builder-image.tar");
    ok(&["docker", "save", "-o", saved.to_str().unwrap(), &tag]);
    let _ = run(&["docker", "rmi", &tag]);
    ok(&["gzip", saved.to_str().unwrap()]);
    std::fs::remove_file(&empty).unwrap();
    let _remove = RemoveImage(id.clone());
    assert!(id.starts_with("sha256:"), "docker import prints the image id: {id}");
    // What bundle.sh records: the image ID, which survives save/load.
    std::fs::write(bundle.path().join("builder-image.ref"), format!("{id}\n")).unwrap();
    let reference = format!("pacloud-test-builder@{id}");
    let root = repo();
    let docker_cli = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("docker"))
        .find(|p| p.is_file())
        .expect("a docker CLI on PATH")
        .display()
        .to_string();
    let mounts = [
        format!("{}:/src/worker-image:ro", root.join("worker-image").display()),
        format!("{}:/bundle:ro", bundle.path().display()),
        format!("{docker_cli}:/usr/bin/docker:ro"),
        "/var/run/docker.sock:/var/run/docker.sock".to_owned(),
    ];
    let mut argv = vec!["docker", "run", "--rm", "--network", "none"];
    for m in &mounts {
        argv.extend(["-v", m.as_str()]);
    }
    argv.extend([image.as_str(), "/src/worker-image/test/in-container.sh"]);
    let out = run(&argv);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let get = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in:\n{stdout}\n{stderr}"))
            .to_owned()
    };
    assert_eq!(get("provision"), "0", "{stderr}");
    assert_eq!(get("provision_again"), "0", "provision.sh is idempotent");
    assert_eq!(get("image_step_other_root"), "2", "the image step refuses a --root other than /");
    assert_eq!(get("image_step"), "0", "the loaded archive's image ID resolves");
    assert_eq!(get("config_image"), format!("\"{id}\""), "the worker's build.image is the loaded image ID");
    assert_eq!(
        get("image_step_digest"),
        "2",
        "a digest reference that does not resolve after docker load fails the step"
    );
    assert!(get("image_step_message").contains(&reference), "the failure names the reference");
    assert_eq!(get("unknown_step"), "2", "an unknown step is a usage error");
    assert_eq!(get("verify"), "0", "systemd-analyze verify of the installed units:\n{stderr}");
    assert_ne!(get("verify_broken"), "0", "systemd-analyze verify rejects a unit whose binary is missing");
    assert_eq!(get("enabled_multi-user"), "/etc/systemd/system/pacloud-worker.service");
    assert_eq!(get("enabled_docker"), "/etc/systemd/system/pacloud-imds-guard.service");
    assert_eq!(get("guard_mode"), "755");
    assert!(get("binary_version").starts_with("pacloud "));
    assert_eq!(get("config_backend"), "\"docker\"");
    for (case, status, names) in [
        ("none", "2", "PACLOUD_AWS_TABLE"),
        ("table_only", "2", "PACLOUD_AWS_QUEUE_URL"),
        ("no_bucket", "2", "PACLOUD_AWS_BUCKET"),
        ("no_signing_key", "2", "PACLOUD_AWS_SIGNING_KEY_ID"),
        ("no_portage", "1", "has no usable portage"),
        ("no_image", "1", "build.image"),
    ] {
        assert_eq!(get(&format!("{case}_status")), status, "{case}: exit status\n{stdout}");
        let message = get(&format!("{case}_message"));
        assert!(message.starts_with("pacloud: ") && message.contains(names), "{case}: {message:?} should name {names}");
    }
}

#[test]
fn the_worker_unit_restarts_at_most_once_a_minute() {
    let unit = std::fs::read_to_string(repo().join("worker-image/pacloud-worker.service")).unwrap();
    let value = |k: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k}= missing from pacloud-worker.service"))
            .trim()
            .to_owned()
    };
    let secs = |v: &str| -> u64 {
        match v.strip_suffix("min") {
            Some(m) => m.parse::<u64>().unwrap() * 60,
            None => v.trim_end_matches('s').parse().unwrap(),
        }
    };
    assert_eq!(value("Restart"), "on-failure");
    assert!(secs(&value("RestartSec")) >= 60, "automatic restarts at least a minute apart");
    let (interval, burst) = (secs(&value("StartLimitIntervalSec")), value("StartLimitBurst").parse::<u64>().unwrap());
    assert!(interval >= 60 * burst, "at most one start a minute on average: {burst} starts in {interval} s");
    assert_eq!(value("ExecStart"), "/usr/local/bin/pacloud worker --backend aws");
    assert_eq!(
        value("EnvironmentFile"),
        "-/etc/pacloud/worker.env",
        "a missing file is reported by the binary, naming the setting"
    );
}

#[test]
fn bundle_and_provision_refuse_bad_arguments_naming_them() {
    let bundle = repo().join("worker-image/bundle.sh");
    let provision = repo().join("worker-image/provision.sh");
    let (bundle, provision) = (bundle.to_str().unwrap(), provision.to_str().unwrap());
    let exe = env!("CARGO_BIN_EXE_pacloud");
    let digest = "0".repeat(64);
    let pinned = format!("pacloud/builder@sha256:{digest}");
    for (argv, names) in [
        (vec![bundle], "usage: bundle.sh"),
        (vec![bundle, "/nonexistent/pacloud", &pinned, "/tmp/x.tar.gz"], "'/nonexistent/pacloud' is not an executable"),
        (vec![bundle, exe, "pacloud/builder:latest", "/tmp/x.tar.gz"], "'pacloud/builder:latest' is not name@sha256"),
        (
            vec![bundle, exe, &pinned, "/tmp/x.tar.gz", "/nonexistent/targets.toml"],
            "'/nonexistent/targets.toml' does not exist",
        ),
        (vec![provision], "no step given"),
        (vec![provision, "--bundle"], "--bundle needs a directory"),
        (vec![provision, "--root", "/tmp", "reboot"], "unknown argument 'reboot'"),
        (vec![provision, "--root", "/tmp", "packages"], "step 'packages' changes the running system"),
        (vec![provision, "--root", "/tmp", "binary"], "step 'binary' needs --bundle DIR"),
    ] {
        let out = run(&argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {stderr}");
        assert!(stderr.contains(names), "{argv:?}: {stderr:?} should say {names:?}");
    }
}
