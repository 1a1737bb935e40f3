//! bench-binhost: the local binhost against nginx, side by side in one run,
//! on the same files (printed, no assertions).
//!
//! Files: a `Packages` index of about 4.5 KB (and its `Packages.gz`), a
//! 10 KB package and a 500 MB package, in one data directory. Servers: the
//! real `pacloud serve` binary (pinned to CPU 0, one runtime thread) and
//! Debian's nginx (pinned to CPU 0, one worker process, `sendfile on`,
//! access log off) serving that same directory. Load: `wrk` pinned to CPU 1
//! (`-t1`, 64 connections for the small files, 4 for the large one),
//! pacloud and nginx alternately, one warm-up second each, then `--seconds`.
//! Prints req/s, p50/p99, MB/s and the ratio pacloud / nginx.
//!
//! Usage: bench-binhost [--pacloud PATH] [--seconds N] [--big-mb N]
//! (scripts/bench-binhost.sh)

use anyhow::{Context, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TARGET: &str = "bench";

/// A server process, stopped on drop: `pacloud` is killed; nginx is told to
/// stop (`nginx -s stop`, so its worker process exits with the master).
struct Guard(Child, Option<PathBuf>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(conf) = &self.1 {
            let _ = Command::new("nginx").arg("-c").arg(conf).args(["-s", "stop"]).status();
            for _ in 0..50 {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Packages index of `n` entries, as the publisher writes it.
fn index_text(n: usize) -> String {
    let mut s = String::from(
        "ARCH: amd64\nCHOST: x86_64-pc-linux-gnu\nPACKAGES: 0\nREPO: gentoo\nTIMESTAMP: 1763900000\nTTL: 60\nVERSION: 0\n\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "BUILD_ID: {b}\nBUILD_TIME: 1763900000\nCPV: app-misc/pkg{i}-1.0\nDEFINED_PHASES: compile install\nEAPI: 8\n\
             IUSE: foo bar\nMD5: 0123456789abcdef0123456789abcdef\nPATH: app-misc/pkg{i}/pkg{i}-1.0-{b}.gpkg.tar\n\
             SHA1: 0123456789abcdef0123456789abcdef01234567\nSIZE: 10240\nUSE: abi_x86_64 amd64 foo\nMTIME: 1763900000\n\n",
            b = i + 1
        ));
    }
    s
}

fn write_files(artifacts: &Path, big_mb: u64) -> anyhow::Result<()> {
    let root = artifacts.join(TARGET);
    std::fs::create_dir_all(root.join("app-misc/small"))?;
    std::fs::create_dir_all(root.join("app-misc/big"))?;
    let index = index_text(11);
    std::fs::write(root.join("Packages"), &index)?;
    std::fs::write(root.join("Packages.gz"), pacloud_worker::pkgindex::gzip(&index))?;
    let small: Vec<u8> = (0..10_240u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("app-misc/small/small-1.0-1.gpkg.tar"), small)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(root.join("app-misc/big/big-1.0-1.gpkg.tar"))?);
    let block: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for _ in 0..big_mb {
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

fn start_pacloud(bin: &Path, data: &Path) -> anyhow::Result<(Guard, String)> {
    use std::io::BufRead;
    let mut child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("TOKIO_WORKER_THREADS", "1")
        .env("PACLOUD_BUILD_BACKEND", "none")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let guard = Guard(child, None);
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().context("pacloud exited before listening")??;
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().context("address")?.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((guard, addr))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_nginx(dir: &Path, artifacts: &Path) -> anyhow::Result<(Guard, String)> {
    let port = free_port()?;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
               uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               types {{ application/x-tar tar; application/gzip gz; }}\n  default_type text/plain;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location /binhost/ {{ alias {}/; gzip_static on; }}\n  }}\n}}\n",
            artifacts.display()
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", "0", "nginx", "-c"])
        .arg(&conf)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting nginx (Debian package nginx)")?;
    let guard = Guard(child, Some(conf));
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Ok((guard, addr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nginx did not listen on {addr}; see {d}/nginx-error.log")
}

struct Figures {
    rps: f64,
    mb_s: f64,
    p50: String,
    p99: String,
}

fn parse_rate(v: &str) -> f64 {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("GB") {
        (n, 1024.0)
    } else if let Some(n) = v.strip_suffix("MB") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("KB") {
        (n, 1.0 / 1024.0)
    } else if let Some(n) = v.strip_suffix('B') {
        (n, 1.0 / 1024.0 / 1024.0)
    } else {
        (v, 1.0)
    };
    num.trim().parse::<f64>().unwrap_or(0.0) * mult
}

fn wrk(url: &str, conns: u32, secs: u64) -> anyhow::Result<Figures> {
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--timeout", "60s", "--latency"])
        .arg(url)
        .output()
        .context("running wrk (Debian package wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk {url} failed or saw errors:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned())).unwrap_or_default()
    };
    Ok(Figures {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        mb_s: parse_rate(&field("Transfer/sec:")),
        p50: field("50%"),
        p99: field("99%"),
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut bin, mut seconds, mut big_mb) = (PathBuf::from("target/release/pacloud"), 5u64, 500u64);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pacloud" => bin = args.next().context("--pacloud PATH")?.into(),
            "--seconds" => seconds = args.next().context("--seconds N")?.parse().context("--seconds N")?,
            "--big-mb" => big_mb = args.next().context("--big-mb N")?.parse().context("--big-mb N")?,
            other => {
                bail!("unknown argument {other:?}; usage: bench-binhost [--pacloud PATH] [--seconds N] [--big-mb N]")
            }
        }
    }
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let artifacts = data.join("artifacts");
    write_files(&artifacts, big_mb)?;
    let (_p, paddr) = start_pacloud(&bin, &data)?;
    let (_n, naddr) = start_nginx(tmp.path(), &artifacts)?;
    let index_len = std::fs::metadata(artifacts.join(TARGET).join("Packages"))?.len();
    println!(
        "binhost serving, pacloud serve vs nginx {} on the same files; servers pinned to CPU 0 (pacloud: 1 runtime thread; nginx: 1 worker), wrk -t1 pinned to CPU 1, {seconds} s per figure",
        nginx_version()
    );
    let cases = [
        (format!("index GET /binhost/{TARGET}/Packages ({index_len} B), 64 conns"), "Packages".to_owned(), 64, false),
        ("package 10 KB, 64 conns".to_owned(), "app-misc/small/small-1.0-1.gpkg.tar".to_owned(), 64, false),
        (format!("package {big_mb} MB, 4 conns"), "app-misc/big/big-1.0-1.gpkg.tar".to_owned(), 4, true),
    ];
    println!("{:<52} {:>14} {:>14} {:>8}", "", "pacloud", "nginx", "ratio");
    for (label, rel, conns, throughput) in cases {
        let mut figs = Vec::new();
        for addr in [&paddr, &naddr] {
            let url = format!("http://{addr}/binhost/{TARGET}/{rel}");
            wrk(&url, conns, 1)?; // warm-up: connections, page cache
            figs.push(wrk(&url, conns, seconds)?);
        }
        let (p, n) = (&figs[0], &figs[1]);
        if throughput {
            println!("{label:<52} {:>9.0} MB/s {:>9.0} MB/s {:>8.2}", p.mb_s, n.mb_s, p.mb_s / n.mb_s);
        } else {
            println!("{label:<52} {:>8.0} req/s {:>8.0} req/s {:>8.2}", p.rps, n.rps, p.rps / n.rps);
            println!(
                "{:<52} {:>14} {:>14}",
                "  latency p50 / p99",
                format!("{} / {}", p.p50, p.p99),
                format!("{} / {}", n.p50, n.p99)
            );
        }
    }
    Ok(())
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stderr).split('/').nth(1).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}
