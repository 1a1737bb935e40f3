//! The bubblewrap backend: a fresh throw-away root per build. The host (or
//! an unpacked stage3) is mounted read-only, with fresh writable PKGDIR,
//! PORTAGE_TMPDIR, ROOT, DISTDIR and log directories of this build only, a
//! private /tmp and /var/tmp, no network unless allowed, all capabilities
//! dropped, a new PID/IPC/UTS namespace, optionally an unprivileged uid
//! (through `setpriv`) and an address-space limit (through `prlimit`), and a
//! wall-clock limit enforced here. Argv: tests/fixtures/VERIFIED.md §3a/3b.

use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::{BuildPlan, PortageInstall, Sandbox, SandboxError, SandboxOutcome};

/// The bubblewrap backend.
#[derive(Debug, Clone)]
pub struct BwrapSandbox {
    bwrap: PathBuf,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl BwrapSandbox {
    pub fn new(bwrap: PathBuf) -> Self {
        BwrapSandbox { bwrap }
    }

    /// Finds `bwrap` on PATH and checks that it can make a sandbox here.
    pub async fn detect() -> Result<BwrapSandbox, SandboxError> {
        let argv =
            ["bwrap", "--ro-bind", "/", "/", "--unshare-net", "--cap-drop", "ALL", "--", "true"].map(String::from);
        crate::runner::run_checked(&argv).await.map_err(|e| match e {
            crate::runner::CommandError::Spawn { .. } => {
                SandboxError::Unavailable("bubblewrap (bwrap) is not installed".into())
            }
            other => SandboxError::Unavailable(format!("bubblewrap cannot create a sandbox here: {other}")),
        })?;
        Ok(BwrapSandbox::new("bwrap".into()))
    }

    /// The full argv of a build (pure apart from listing the venv).
    pub fn argv(&self, plan: &BuildPlan) -> Result<Vec<String>, SandboxError> {
        let mut a: Vec<String> = Vec::new();
        if let Some((uid, gid)) = plan.run_as {
            a.extend(["setpriv".into(), format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into()]);
        }
        if let Some(bytes) = plan.limits.memory_bytes {
            a.extend(["prlimit".into(), format!("--as={bytes}"), "--".into()]);
        }
        a.push(s(&self.bwrap));
        let mut push = |items: &[&str]| a.extend(items.iter().map(|x| x.to_string()));
        push(&["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
        push(&["--perms", "1777", "--tmpfs", "/var/tmp"]);
        let w = &plan.work_dir;
        if let PortageInstall::Venv(venv) = &plan.portage {
            // A throw-away, writable host prefix over the venv (portage writes
            // var/, usr/, etc/ there for ROOT != /), with the venv's own parts
            // bound back read-only.
            let v = s(venv);
            a.extend(["--perms".into(), "0755".into(), "--tmpfs".into(), v.clone()]);
            let prefix = plan.build_root.as_ref().map(|d| d.join("prefix"));
            a.extend(overlay_args(Some(venv), prefix.as_deref(), venv, &["etc", "var", "usr", "tmp"])?);
            let etc = venv.join("etc/portage");
            a.extend(["--dir".into(), s(&etc)]);
            let profile = std::fs::read_link(plan.config_root().join("etc/portage/make.profile"))
                .map_err(|source| SandboxError::Io { path: plan.config_root(), source })?;
            a.extend(["--symlink".into(), s(&profile), s(&etc.join("make.profile"))]);
            a.extend(["--ro-bind".into(), s(&w.join("hostconf/make.conf")), s(&etc.join("make.conf"))]);
            if let Some(d) = &plan.build_root {
                // The host configuration of a real tree: what the host
                // provides, and the records has_version looks for.
                a.extend(["--ro-bind".into(), s(&d.join("host-profile")), s(&etc.join("profile"))]);
                a.extend(["--ro-bind".into(), s(&d.join("vdb")), s(&venv.join("var/db/pkg"))]);
            }
        }
        let config = plan.config_root();
        a.extend(["--ro-bind".into(), s(&config), s(&config)]);
        for (_, repo) in &plan.repos {
            a.extend(["--ro-bind".into(), s(repo), s(repo)]);
        }
        for d in plan.writable_dirs() {
            a.extend(["--bind".into(), s(&d), s(&d)]);
        }
        if !plan.network {
            a.push("--unshare-net".into());
        }
        for x in ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--die-with-parent", "--new-session"] {
            a.push(x.into());
        }
        a.extend(["--cap-drop".into(), "ALL".into(), "--clearenv".into()]);
        for (k, v) in &plan.env {
            a.extend(["--setenv".into(), k.clone(), v.clone()]);
        }
        a.extend(["--chdir".into(), s(&w.join("tmp")), "--".into()]);
        a.extend(plan.argv.iter().cloned());
        Ok(a)
    }

    /// Hands the build's writable directories to the unprivileged uid.
    pub(crate) fn chown_for(plan: &BuildPlan) -> Result<(), SandboxError> {
        let Some((uid, gid)) = plan.run_as else { return Ok(()) };
        fn walk(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
            if p.is_dir() && !p.is_symlink() {
                for e in std::fs::read_dir(p)? {
                    walk(&e?.path(), uid, gid)?;
                }
            }
            Ok(())
        }
        for d in plan.writable_dirs() {
            walk(&d, uid, gid).map_err(|source| SandboxError::Io { path: d.clone(), source })?;
        }
        Ok(())
    }
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, SandboxError> {
    let rd = std::fs::read_dir(dir).map_err(|source| SandboxError::Io { path: dir.to_owned(), source })?;
    Ok(rd.filter_map(|e| e.ok()).map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())).collect())
}

fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// bwrap arguments that show at `dest` (a fresh tmpfs or `--dir`) the
/// entries of `base` (the venv) with those of `over` (a prepared build
/// root's prefix) laid over them: a directory both have is merged, anything
/// else is bound read-only (symlinks recreated). `skip` names top-level
/// entries of `base` left out (the writable host prefix parts).
pub fn overlay_args(
    base: Option<&Path>,
    over: Option<&Path>,
    dest: &Path,
    skip: &[&str],
) -> Result<Vec<String>, SandboxError> {
    let mut names: std::collections::BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = Default::default();
    if let Some(b) = base {
        for (n, p) in entries(b)? {
            if !skip.contains(&n.as_str()) {
                names.entry(n).or_default().0 = Some(p);
            }
        }
    }
    if let Some(o) = over {
        for (n, p) in entries(o)? {
            names.entry(n).or_default().1 = Some(p);
        }
    }
    let mut a = Vec::new();
    for (name, (b, o)) in names {
        let to = dest.join(&name);
        match (b, o) {
            (Some(b), Some(o)) if is_real_dir(&b) && is_real_dir(&o) => {
                a.extend(["--dir".into(), s(&to)]);
                a.extend(overlay_args(Some(&b), Some(&o), &to, &[])?);
            }
            (_, Some(p)) | (Some(p), None) => match std::fs::read_link(&p) {
                Ok(target) => a.extend(["--symlink".into(), s(&target), s(&to)]),
                Err(_) => a.extend(["--ro-bind".into(), s(&p), s(&to)]),
            },
            (None, None) => {}
        }
    }
    Ok(a)
}

#[async_trait]
impl Sandbox for BwrapSandbox {
    fn name(&self) -> &'static str {
        "bwrap"
    }

    async fn run(&self, plan: &BuildPlan, cancel: CancellationToken) -> Result<SandboxOutcome, SandboxError> {
        let argv = self.argv(plan)?;
        Self::chown_for(plan)?;
        let log_path = plan.log_path();
        let log =
            std::fs::File::create(&log_path).map_err(|source| SandboxError::Io { path: log_path.clone(), source })?;
        let log2 = log.try_clone().map_err(|source| SandboxError::Io { path: log_path.clone(), source })?;
        let started = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SandboxError::Spawn { program: argv[0].clone(), source })?;
        let pgid = child.id();
        // Kills the whole process group (bwrap and everything under it).
        let kill_all = |pgid: Option<u32>| {
            if let Some(pid) = pgid {
                let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
            }
        };
        let timed_out;
        let status = tokio::select! {
            st = child.wait() => { timed_out = false; st }
            _ = tokio::time::sleep(plan.limits.wall_clock) => {
                timed_out = true;
                kill_all(pgid);
                child.wait().await
            }
            _ = cancel.cancelled() => {
                kill_all(pgid);
                let _ = child.wait().await;
                return Err(SandboxError::Cancelled);
            }
        }
        .map_err(|source| SandboxError::Io { path: log_path.clone(), source })?;
        let exit_code = status.code();
        if !timed_out && exit_code.is_none() {
            // Killed by a signal that did not come from us: the machine, not the package.
            return Err(SandboxError::Unavailable(format!("the sandbox was killed ({status})")));
        }
        if !timed_out
            && exit_code == Some(1)
            && let Some(why) = setup_failure(&log_path)
        {
            // bubblewrap itself failed (a mount, a namespace, the exec of the
            // build command): the machine's failure, retried with backoff,
            // never recorded as the package's.
            return Err(SandboxError::Unavailable(format!("bubblewrap could not start the build: {why}")));
        }
        Ok(SandboxOutcome { exit_code, timed_out, duration: started.elapsed(), log: log_path })
    }
}

/// The error bubblewrap printed if it failed before the build command ran:
/// then the whole log is bubblewrap's one `bwrap: …` line (exit status 1).
/// emerge always prints more than one line, starting with its own output,
/// so a build that ran is never taken for this; a command that printed
/// exactly one line beginning `bwrap: ` and exited 1 would be.
fn setup_failure(log: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(log).ok()?.take(4096).read_to_end(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines().map(str::trim_end).filter(|l| !l.is_empty());
    let first = lines.next()?;
    (first.starts_with("bwrap: ") && lines.next().is_none()).then(|| first.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Limits;
    use std::time::Duration;

    fn plan(dir: &Path) -> BuildPlan {
        let w = dir.join("w");
        std::fs::create_dir_all(w.join("config/etc/portage")).unwrap();
        std::os::unix::fs::symlink("/repo/profiles/default", w.join("config/etc/portage/make.profile")).unwrap();
        let venv = dir.join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::create_dir_all(venv.join("lib")).unwrap();
        std::fs::create_dir_all(venv.join("var")).unwrap();
        std::os::unix::fs::symlink("lib", venv.join("lib64")).unwrap();
        BuildPlan {
            job_id: "j".into(),
            work_dir: w,
            repos: vec![("r".into(), "/repo".into())],
            portage: PortageInstall::Venv(venv),
            env: vec![("ROOT".into(), "/x".into())],
            argv: vec!["emerge".into(), "=a/b-1".into()],
            network: false,
            limits: Limits { wall_clock: Duration::from_secs(5), memory_bytes: Some(1 << 30) },
            image: None,
            run_as: Some((65534, 65534)),
            build_root: None,
        }
    }

    /// A plan whose every mount source exists, running `argv` as root.
    fn runnable(dir: &Path, argv: &[&str]) -> BuildPlan {
        let mut p = plan(dir);
        p.run_as = None;
        p.repos = vec![("r".into(), dir.join("repo"))];
        p.argv = argv.iter().map(|a| a.to_string()).collect();
        std::fs::create_dir_all(dir.join("repo")).unwrap();
        std::fs::create_dir_all(p.work_dir.join("hostconf")).unwrap();
        std::fs::write(p.work_dir.join("hostconf/make.conf"), "").unwrap();
        for d in p.writable_dirs() {
            std::fs::create_dir_all(d).unwrap();
        }
        p
    }

    #[tokio::test]
    async fn a_sandbox_that_cannot_start_is_the_machines_failure_and_a_failing_command_is_the_packages() {
        let bwrap = BwrapSandbox::new("bwrap".into());
        let cancel = CancellationToken::new;
        // The positive control: the sandbox starts and the command fails: an outcome.
        let dir = tempfile::tempdir().unwrap();
        let ok = runnable(dir.path(), &["/bin/sh", "-c", "echo bwrap: not really; echo more output; exit 1"]);
        let out = bwrap.run(&ok, cancel()).await.expect("the sandbox started");
        assert_eq!(out.exit_code, Some(1));
        // A mount source that is gone: bubblewrap fails before the command.
        let dir = tempfile::tempdir().unwrap();
        let mut p = runnable(dir.path(), &["/bin/true"]);
        p.repos = vec![("r".into(), dir.path().join("no-such-repo"))];
        match bwrap.run(&p, cancel()).await {
            Err(SandboxError::Unavailable(why)) => assert!(why.contains("no-such-repo"), "{why}"),
            other => panic!("expected the sandbox to be unavailable: {other:?}"),
        }
        // A build command that does not exist: bubblewrap's exec fails.
        let dir = tempfile::tempdir().unwrap();
        let p = runnable(dir.path(), &["/nonexistent/emerge"]);
        match bwrap.run(&p, cancel()).await {
            Err(SandboxError::Unavailable(why)) => assert!(why.contains("/nonexistent/emerge"), "{why}"),
            other => panic!("expected the sandbox to be unavailable: {other:?}"),
        }
    }

    #[test]
    fn argv_isolates_the_build() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path());
        let a = BwrapSandbox::new("bwrap".into()).argv(&p).unwrap();
        let joined = a.join(" ");
        assert_eq!(&a[..4], &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]);
        assert!(joined.contains("prlimit --as=1073741824 -- bwrap"));
        for must in
            ["--unshare-net", "--cap-drop ALL", "--clearenv", "--die-with-parent", "--unshare-pid", "--ro-bind / /"]
        {
            assert!(joined.contains(must), "{must}");
        }
        let venv = s(&dir.path().join("venv"));
        assert!(joined.contains(&format!("--symlink lib {venv}/lib64")), "{joined}");
        assert!(!joined.contains(&format!("{venv}/var")), "the venv's var is not exposed");
        assert!(joined.contains("--ro-bind /repo /repo"));
        assert!(joined.contains(&format!("--bind {} ", s(&p.pkgdir()))));
        assert!(joined.ends_with("-- emerge =a/b-1"));
        assert!(!a.iter().any(|x| x == "sh" || x == "bash" || x == "-c"), "no shell");
        let mut open = p.clone();
        open.network = true;
        open.run_as = None;
        let a = BwrapSandbox::new("bwrap".into()).argv(&open).unwrap();
        assert!(!a.iter().any(|x| x == "--unshare-net"));
        assert_eq!(a[0], "prlimit");
    }

    #[test]
    fn a_prepared_build_root_is_laid_over_the_venv() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = plan(dir.path());
        let venv = dir.path().join("venv");
        std::fs::create_dir_all(venv.join("lib/python3.11")).unwrap();
        let d = dir.path().join("prepared");
        for sub in ["prefix/lib/gentoo", "prefix/usr/bin", "host-profile", "vdb"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink("/bin/tar", d.join("prefix/usr/bin/gtar")).unwrap();
        p.build_root = Some(d.clone());
        let joined = BwrapSandbox::new("bwrap".into()).argv(&p).unwrap().join(" ");
        let (v, d) = (s(&venv), s(&d));
        for must in [
            format!(
                "--dir {v}/lib --ro-bind {d}/prefix/lib/gentoo {v}/lib/gentoo --ro-bind {v}/lib/python3.11 {v}/lib/python3.11"
            ),
            format!("--ro-bind {d}/prefix/usr {v}/usr"),
            format!("--ro-bind {d}/host-profile {v}/etc/portage/profile"),
            format!("--ro-bind {d}/vdb {v}/var/db/pkg"),
        ] {
            assert!(joined.contains(&must), "{must} in {joined}");
        }
        assert!(!joined.contains(&format!("--ro-bind {v}/lib {v}/lib")), "lib is merged, not hidden");
    }
}
