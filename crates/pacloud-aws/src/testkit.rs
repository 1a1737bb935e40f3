//! Test support: starts moto's server (PyPI `moto[server]`, from the test
//! venv) on a free loopback port, provisions pacloud's resources in it, and
//! stops it when dropped. Used by this crate's contract tests and by the
//! Lambda and worker tests. Not used in production.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::provision::{Names, provision};
use crate::{AwsConfig, clients};

/// A running `moto_server`.
pub struct Moto {
    pub endpoint: String,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test venv's `moto_server` (PACLOUD_MOTO_SERVER overrides).
pub fn moto_server_bin() -> PathBuf {
    std::env::var_os("PACLOUD_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/moto_server")))
}

impl Moto {
    /// Starts moto on a free port and waits until it answers.
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let bin = moto_server_bin();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (scripts/test.sh installs it): {e}", bin.display()));
        let moto = Moto { endpoint: format!("http://127.0.0.1:{port}"), child };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// Client settings for this server (static test credentials).
    pub fn base_config(&self) -> AwsConfig {
        AwsConfig {
            table: String::new(),
            queue_url: String::new(),
            dlq_url: None,
            bucket: String::new(),
            endpoint_url: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            static_credentials: Some(("testing".into(), "testing".into())),
            force_path_style: true,
            url_ttl: Duration::from_secs(900),
        }
    }

    /// Creates a table, queue + DLQ and bucket named after `prefix`.
    pub async fn provision(&self, prefix: &str, max_receives: u32) -> AwsConfig {
        let base = self.base_config();
        let c = clients(&base).await;
        let names = Names {
            table: format!("{prefix}-builds"),
            queue: format!("{prefix}-jobs"),
            dlq: format!("{prefix}-jobs-dlq"),
            bucket: format!("{prefix}-artifacts"),
            max_receives,
        };
        provision(&c, &names, &base).await.unwrap_or_else(|e| panic!("provisioning in moto failed: {e:?}"))
    }
}
