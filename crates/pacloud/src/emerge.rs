//! `pacloud emerge`: a Gentoo user's whole merge list, built by the service.
//!
//! 1. Runs the user's own `emerge --pretend --verbose <args>` (their
//!    PORTAGE_CONFIGROOT, ROOT, EPREFIX and the rest of the environment are
//!    inherited) and reads the merge list: every `[ebuild ...]` entry with
//!    the USE portage will build it with (`USE="..."` and the USE_EXPAND
//!    variables, e.g. `PYTHON_TARGETS="python3_12"`).
//! 2. Requests each distinct one at once (`POST /v1/builds`, every flag of
//!    the entry written out, so on a key-version-2 target the key is the
//!    same as for the package's default configuration whenever the user's
//!    configuration is the default), and follows them all on one screen: a
//!    line per package with its state and elapsed time (redrawn on a
//!    terminal, plain lines on state changes otherwise).
//! 3. If any build fails: a summary (package, reason, log URL), exit 1.
//! 4. Otherwise runs `emerge --getbinpkg --binpkg-respect-use=y <args>`
//!    attached to the terminal with `PORTAGE_BINHOST` set to the target's
//!    binhost, so portage installs the binaries (verifying signatures when
//!    the binhost signs and portage is configured to check them).
//!
//! The parsing of the merge list is a pure function ([`parse_merge_list`]).

use pacloud_domain::grammar::parse_versioned_atom;
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::client::{BuildState, Client, ClientError, GetRequest};

/// One package portage would build from source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MergeItem {
    pub atom: String,
    pub version: String,
    /// Every flag portage showed, signed: `foo`, `-bar`, USE_EXPAND ones
    /// expanded (`python_targets_python3_12`).
    pub use_flags: Vec<String>,
}

impl MergeItem {
    pub fn cpv(&self) -> String {
        format!("{}-{}", self.atom, self.version)
    }
}

/// Splits `KEY="a b" other` into words, keeping quoted values together.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A flag as `emerge --verbose` shows it (`(ssl)`, `(-selinux)`, `doc*`,
/// `{test}`, `-nls%`) reduced to its sign and name.
fn clean_flag(shown: &str) -> Option<(bool, String)> {
    let f = shown.trim_matches(|c| matches!(c, '(' | ')' | '{' | '}')).trim_end_matches(['*', '%']);
    let f = f.trim_matches(|c| matches!(c, '(' | ')' | '{' | '}'));
    let (on, name) = match f.strip_prefix('-') {
        Some(n) => (false, n),
        None => (true, f.strip_prefix('+').unwrap_or(f)),
    };
    (!name.is_empty()).then(|| (on, name.to_owned()))
}

/// The `[ebuild ...]` entries of `emerge --pretend --verbose` output, in
/// order, without duplicates. Binary, blocker and uninstall lines are not
/// build requests and are skipped.
pub fn parse_merge_list(stdout: &str) -> Vec<MergeItem> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("[ebuild") else { continue };
        let Some((_, rest)) = rest.split_once(']') else { continue };
        let mut ws = words(rest).into_iter();
        let Some(cpv) = ws.next() else { continue };
        // `cat/pkg-ver`, then `:slot` and `::repo` when shown.
        let cpv = cpv.split(':').next().unwrap_or(&cpv).to_owned();
        let Ok((atom, version)) = parse_versioned_atom(&cpv) else { continue };
        let mut flags = Vec::new();
        for w in ws {
            let Some((var, value)) = w.split_once('=') else { continue };
            let Some(value) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else { continue };
            if var.is_empty() || !var.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
                continue;
            }
            let prefix = if var == "USE" { String::new() } else { format!("{}_", var.to_ascii_lowercase()) };
            for shown in value.split_whitespace() {
                if let Some((on, name)) = clean_flag(shown) {
                    flags.push(format!("{}{prefix}{name}", if on { "" } else { "-" }));
                }
            }
        }
        let item = MergeItem { atom: atom.to_string(), version: version.to_string(), use_flags: flags };
        if seen.insert(item.clone()) {
            out.push(item);
        }
    }
    out
}

/// How `pacloud emerge` was invoked.
#[derive(Debug, Clone)]
pub struct EmergeOptions {
    pub server: String,
    pub token: Option<String>,
    pub target: Option<String>,
    /// Only show what would be requested.
    pub pretend: bool,
    /// The user's emerge arguments.
    pub args: Vec<String>,
    /// The `emerge` program (from PATH by default).
    pub emerge: String,
    /// Give up waiting for builds after this long.
    pub timeout: Duration,
}

/// Why `pacloud emerge` stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmergeError {
    #[error("emerge rejected the arguments (exit status {status})")]
    Rejected { status: i32 },
    #[error("cannot run emerge")]
    Run(#[from] pacloud_worker::runner::CommandError),
    #[error("{failed} of {total} builds failed")]
    BuildsFailed { failed: usize, total: usize },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("emerge --getbinpkg exited with status {0}")]
    Install(i32),
}

impl EmergeError {
    /// Process exit status: emerge's own for its rejections.
    pub fn exit_code(&self) -> i32 {
        match self {
            EmergeError::Rejected { status } | EmergeError::Install(status) => *status,
            EmergeError::Client(c) => c.exit_code(),
            _ => 1,
        }
    }
}

/// One line of the progress board.
struct Row {
    cpv: String,
    state: String,
    detail: String,
    started: Instant,
    done: Option<Duration>,
}

/// The progress board: a line per package, redrawn in place on a terminal,
/// plain lines on state changes otherwise.
struct Board {
    rows: Vec<Row>,
    tty: bool,
    drawn: usize,
}

impl Board {
    fn line(r: &Row) -> String {
        let secs = r.done.unwrap_or_else(|| r.started.elapsed()).as_secs();
        let extra = if r.detail.is_empty() { String::new() } else { format!("  {}", r.detail) };
        format!("{:<48} {:<9} {:>4}s{extra}", r.cpv, r.state, secs)
    }

    fn set(&mut self, i: usize, state: &str, detail: String, done: bool) {
        let r = &mut self.rows[i];
        let changed = r.state != state;
        r.state = state.to_owned();
        r.detail = detail;
        if done && r.done.is_none() {
            r.done = Some(r.started.elapsed());
        }
        if changed && !self.tty {
            eprintln!("pacloud: {}", Self::line(r));
        }
    }

    fn draw(&mut self) {
        if !self.tty {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.drawn > 0 {
            let _ = write!(err, "\x1b[{}A", self.drawn);
        }
        for r in &self.rows {
            let _ = writeln!(err, "\x1b[2K{}", Self::line(r));
        }
        self.drawn = self.rows.len();
        let _ = err.flush();
    }
}

/// What happened to one request.
enum Done {
    Ready,
    Failed { reason: String, log_url: Option<String> },
    Error(ClientError),
}

/// Runs `pacloud emerge` (see the module doc).
pub async fn run(opts: &EmergeOptions) -> Result<(), EmergeError> {
    let mut argv = vec![opts.emerge.clone(), "--pretend".into(), "--verbose".into(), "--color=n".into()];
    argv.push("--nospinner".into());
    argv.extend(opts.args.iter().cloned());
    let pretend = pacloud_worker::runner::run_capture(&argv).await?;
    if !pretend.status.success() {
        // Portage's own message, and its status: nothing is requested.
        print!("{}", pretend.stdout);
        eprint!("{}", pretend.stderr);
        return Err(EmergeError::Rejected { status: pretend.status.code().unwrap_or(1) });
    }
    let items = parse_merge_list(&pretend.stdout);
    if items.is_empty() {
        eprintln!("pacloud: nothing to build from source; running emerge");
    }
    if opts.pretend {
        for it in &items {
            println!("would request {} USE=\"{}\"", it.cpv(), it.use_flags.join(" "));
        }
        println!("{} package(s) would be requested", items.len());
        return Ok(());
    }
    let client = std::sync::Arc::new(Client::new(&opts.server, opts.token.clone())?);
    let now = Instant::now();
    let mut board = Board {
        rows: items
            .iter()
            .map(|it| Row {
                cpv: it.cpv(),
                state: "requesting".into(),
                detail: String::new(),
                started: now,
                done: None,
            })
            .collect(),
        tty: std::io::stderr().is_terminal(),
        drawn: 0,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Result<BuildState, ClientError>)>();
    for (i, it) in items.iter().enumerate() {
        let (client, tx) = (client.clone(), tx.clone());
        let req = GetRequest {
            atom: it.atom.clone(),
            version: it.version.clone(),
            use_flags: it.use_flags.clone(),
            target: opts.target.clone(),
        };
        let deadline = now + opts.timeout;
        tokio::spawn(async move {
            let mut state = client.request(&req).await;
            loop {
                let next = match &state {
                    Ok(
                        BuildState::Queued { poll, retry_after, .. } | BuildState::Building { poll, retry_after, .. },
                    ) => Some((poll.clone(), retry_after.unwrap_or(2).clamp(1, 10))),
                    _ => None,
                };
                let _ = tx.send((i, state));
                let Some((poll, secs)) = next else { return };
                if Instant::now() > deadline {
                    let _ = tx.send((i, Err(ClientError::Timeout(deadline - now))));
                    return;
                }
                tokio::time::sleep(Duration::from_secs(secs)).await;
                state = client.poll(&poll).await;
            }
        });
    }
    drop(tx);
    let mut outcome: Vec<Option<Done>> = items.iter().map(|_| None).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                None => break,
                Some((i, Ok(st))) => match st {
                    BuildState::Ready { .. } => { board.set(i, "ready", String::new(), true); outcome[i] = Some(Done::Ready); }
                    BuildState::Queued { .. } => board.set(i, "queued", String::new(), false),
                    BuildState::Building { .. } => board.set(i, "building", String::new(), false),
                    BuildState::Failed { reason, log_url, .. } => {
                        board.set(i, "failed", reason.clone(), true);
                        outcome[i] = Some(Done::Failed { reason, log_url });
                    }
                },
                Some((i, Err(e))) => { board.set(i, "error", e.to_string(), true); outcome[i] = Some(Done::Error(e)); }
            },
            _ = tick.tick() => board.draw(),
        }
    }
    board.draw();
    let failed: Vec<(usize, &Done)> = outcome
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().filter(|d| !matches!(d, Done::Ready)).map(|d| (i, d)))
        .collect();
    if !failed.is_empty() {
        eprintln!("pacloud: these builds did not succeed; nothing was installed:");
        for (i, d) in &failed {
            match d {
                Done::Failed { reason, log_url } => eprintln!(
                    "  {}: {reason}{}",
                    items[*i].cpv(),
                    log_url.as_deref().map(|u| format!("\n    log: {u}")).unwrap_or_default()
                ),
                Done::Error(e) => eprintln!("  {}: {e}", items[*i].cpv()),
                Done::Ready => {}
            }
        }
        return Err(EmergeError::BuildsFailed { failed: failed.len(), total: items.len() });
    }
    let target = match &opts.target {
        Some(t) => t.clone(),
        None => client.default_target().await?,
    };
    let binhost = format!("{}/binhost/{target}", opts.server.trim_end_matches('/'));
    let mut argv = vec![opts.emerge.clone(), "--getbinpkg".into(), "--binpkg-respect-use=y".into()];
    argv.extend(opts.args.iter().cloned());
    eprintln!("pacloud: every package is built; running {} (PORTAGE_BINHOST={binhost})", argv.join(" "));
    let status = pacloud_worker::runner::run_attached(&argv, &[("PORTAGE_BINHOST".into(), binhost)]).await?;
    if !status.success() {
        return Err(EmergeError::Install(status.code().unwrap_or(1)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of `emerge --pretend --verbose --color=n` (portage
    /// 3.0.83, the fixture repository, ROOT set, package.use for both).
    const REAL: &str = r#"
These are the packages that would be merged, in order:

Calculating dependencies ... done!
Dependency resolution took 0.11 s (backtrack: 0/20).

[ebuild  N     ] app-misc/usekey-lib-1.0::pacloud-fixtures to /tmp/uk/uroot/ USE="cli doc" 0 KiB
[ebuild  N     ] app-misc/usekey-lib-1.0::pacloud-fixtures  USE="cli -doc" 0 KiB
[ebuild  N     ] app-misc/usekey-app-1.0::pacloud-fixtures to /tmp/uk/uroot/ USE="gui nls (ssl) (-selinux)" 0 KiB
[binary   R    ] app-misc/hello-2.12-r1-1::pacloud-fixtures  USE="foo -bar" 0 KiB
[ebuild   R    ] dev-lang/python-3.12.7_p1:3.12::gentoo  USE="ssl* -tk% {-test}" PYTHON_TARGETS="python3_12 -python3_11" 0 KiB

Total: 3 packages (3 new), Size of downloads: 0 KiB
"#;

    #[test]
    fn merge_list_with_effective_use() {
        let items = parse_merge_list(REAL);
        let got: Vec<(String, Vec<String>)> = items.iter().map(|i| (i.cpv(), i.use_flags.clone())).collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                ("app-misc/usekey-lib-1.0".into(), s(&["cli", "doc"])),
                ("app-misc/usekey-lib-1.0".into(), s(&["cli", "-doc"])),
                ("app-misc/usekey-app-1.0".into(), s(&["gui", "nls", "ssl", "-selinux"])),
                (
                    "dev-lang/python-3.12.7_p1".into(),
                    s(&["ssl", "-tk", "-test", "python_targets_python3_12", "-python_targets_python3_11"])
                ),
            ]
        );
        assert!(parse_merge_list("emerge: there are no ebuilds to satisfy \"x\"").is_empty());
    }
}
