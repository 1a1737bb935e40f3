//! The one checked runner for external commands: argv only (no shell), and
//! an error that carries the program, its exit status and its stderr tail.

use std::process::Stdio;
use tokio::process::Command;

/// An external command that could not run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} exited with {status}: {stderr_tail}")]
    Failed { program: String, status: std::process::ExitStatus, stderr_tail: String },
}

/// What a successful command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// The last `n` lines of `s`.
pub fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `argv` to completion; fails unless it exits 0.
pub async fn run_checked(argv: &[String]) -> Result<Output, CommandError> {
    let program = argv.first().cloned().unwrap_or_default();
    let out = Command::new(&program)
        .args(&argv[1..])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| CommandError::Spawn { program: program.clone(), source })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(CommandError::Failed { program, status: out.status, stderr_tail: tail_lines(&stderr, 20) });
    }
    Ok(Output { stdout, stderr })
}

/// What a command printed and how it exited, whatever the status.
#[derive(Debug, Clone)]
pub struct Completed {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` to completion and returns its output and status; fails only
/// if it cannot start (for commands whose own failure the caller reports,
/// e.g. `emerge --pretend` rejecting the user's arguments).
pub async fn run_capture(argv: &[String]) -> Result<Completed, CommandError> {
    let program = argv.first().cloned().unwrap_or_default();
    let out = Command::new(&program)
        .args(argv.get(1..).unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| CommandError::Spawn { program: program.clone(), source })?;
    Ok(Completed {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `argv` attached to this process's terminal (stdin, stdout and
/// stderr inherited), with `env` added to the inherited environment;
/// returns its exit status.
pub async fn run_attached(argv: &[String], env: &[(String, String)]) -> Result<std::process::ExitStatus, CommandError> {
    let program = argv.first().cloned().unwrap_or_default();
    Command::new(&program)
        .args(argv.get(1..).unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|source| CommandError::Spawn { program, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_status_and_stderr() {
        let ok = run_checked(&["sh".into(), "-c".into(), "echo hi".into()]).await.unwrap();
        assert_eq!(ok.stdout, "hi\n");
        let err = run_checked(&["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()]).await.unwrap_err();
        match err {
            CommandError::Failed { status, stderr_tail, .. } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr_tail, "boom");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(run_checked(&["/nonexistent/prog".into()]).await, Err(CommandError::Spawn { .. })));
    }

    #[tokio::test]
    async fn capture_and_attached_report_any_status() {
        let c = run_capture(&["sh".into(), "-c".into(), "echo out; echo err >&2; exit 4".into()]).await.unwrap();
        assert_eq!((c.status.code(), c.stdout.as_str(), c.stderr.as_str()), (Some(4), "out\n", "err\n"));
        let env = [("PACLOUD_RUNNER_T".to_owned(), "7".to_owned())];
        let st = run_attached(&["sh".into(), "-c".into(), "exit $PACLOUD_RUNNER_T".into()], &env).await.unwrap();
        assert_eq!(st.code(), Some(7));
        assert!(matches!(run_capture(&["/nonexistent/prog".into()]).await, Err(CommandError::Spawn { .. })));
    }
}
