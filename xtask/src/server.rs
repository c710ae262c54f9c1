//! The `lumina2` binary and a `lumina2 serve` process on the committed tiny
//! pipeline, shared by `cargo xtask openai` and `cargo xtask load`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::pyenv::workspace_root;

/// How long the server may take to print its address.
const STARTUP_PATIENCE: Duration = Duration::from_secs(120);

/// The committed tiny pipeline (the `seed_cfg` fixture of lumina2-pipeline).
pub fn tiny_pipeline() -> PathBuf {
    workspace_root().join("crates/lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline")
}

/// The option every run on the tiny pipeline needs: its text encoder takes
/// short prompts only.
pub const TINY_OPTIONS: [&str; 2] = ["--max-sequence-length", "32"];

/// The `lumina2` binary: `bin` when given, else a release build of
/// `lumina2-cli` (built now; cargo says where it put it).
pub fn lumina2_binary(bin: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(b) = bin {
        return Ok(b);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo build --release -p lumina2-cli");
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "lumina2-cli",
            "--bin",
            "lumina2",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo build")?;
    if !out.status.success() {
        bail!(
            "cargo build --release -p lumina2-cli failed with {}",
            out.status
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "lumina2")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo build did not report the lumina2 executable")
}

/// A `lumina2 serve --port 0` process, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://ADDR`, as the server announced it.
    pub base: String,
}

impl Server {
    /// Starts the server on the tiny pipeline with `extra` options and waits
    /// for its `listening on http://ADDR` line.
    pub fn start(bin: &Path, extra: &[&str]) -> Result<Server> {
        let mut child = Command::new(bin)
            .args(["serve", "--model"])
            .arg(tiny_pipeline())
            .args(["--port", "0", "--steps", "4", "-q"])
            .args(TINY_OPTIONS)
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("LUMINA2_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // Owned from here on, so that an early return kills the process.
        let mut server = Server {
            child,
            base: String::new(),
        };
        let line = rx
            .recv_timeout(STARTUP_PATIENCE)
            .context("lumina2 serve printed no `listening on` line")?;
        server.base = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line of lumina2 serve: {line:?}"))?
            .to_string();
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The value of the unlabelled metric `name` in `/metrics`.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = ureq::get(&self.url("/metrics"))
            .timeout(Duration::from_secs(30))
            .call()
            .context("GET /metrics")?
            .into_string()?;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .with_context(|| format!("no metric {name} in /metrics"))?
            .trim()
            .parse()
            .with_context(|| format!("metric {name}"))
    }

    /// The resident set size of the process, MiB (VmRSS of /proc/PID/status).
    pub fn rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context("reading the server's /proc status")?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in the server's /proc status")?;
        Ok(kib / 1024.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `lumina2 generate` on the tiny pipeline, writing `out`.
pub fn generate(bin: &Path, args: &[&str], out: &Path) -> Result<()> {
    let status = Command::new(bin)
        .args(["generate", "--model"])
        .arg(tiny_pipeline())
        .args(TINY_OPTIONS)
        .args(args)
        .args(["-q", "-o"])
        .arg(out)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .with_context(|| format!("starting {} generate", bin.display()))?;
    if !status.success() {
        bail!("lumina2 generate {args:?} failed with {status}");
    }
    Ok(())
}
