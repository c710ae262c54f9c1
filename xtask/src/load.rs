//! `cargo xtask load`: many concurrent clients against one `lumina2 serve`.
//!
//! Each client sends requests one after another, waiting as `Retry-After`
//! says (at most 2 s) after a 429; a 429 is an answer, not retried.
//!
//! Checks what the server promises under load: every request is answered
//! 200 (with the right image) or 429 (with `Retry-After`), none is lost or
//! answered twice, the server stays up and its memory does not grow; and
//! measures throughput, latency, and the cost of the API against running
//! `lumina2 generate` once per image.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::server::{generate, Server};

/// How long one request may take before the client gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The distinct seeds the load cycles through: few enough that each image is
/// rendered beforehand as a reference, so that a reply carrying another
/// request's image shows.
const SEEDS: u64 = 4;

/// The longest a client waits after a 429, whatever `Retry-After` says.
const MAX_BACKOFF_S: f64 = 2.0;

/// Allowed growth of the server's RSS over the run: the larger of this and a
/// quarter of the RSS before (allocator caches, the finished-job store).
const RSS_SLACK_MIB: f64 = 64.0;

pub struct LoadOptions {
    pub clients: usize,
    pub requests: usize,
    pub max_queue: usize,
    /// `WIDTHxHEIGHT` of every request.
    pub size: String,
    pub steps: usize,
    /// Requests timed one after another against as many `lumina2 generate` runs.
    pub sequential: usize,
}

/// What the load run measured.
pub struct LoadReport {
    pub opts_line: String,
    pub ok: usize,
    pub rejected: usize,
    pub wall_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub api_seq_s: f64,
    pub cli_seq_s: f64,
    pub render_ms: f64,
    pub sequential: usize,
}

/// One request's answer.
struct Answer {
    index: usize,
    status: u16,
    retry_after: Option<String>,
    latency: Duration,
    images: Vec<Vec<u8>>,
}

fn body(opts: &LoadOptions, seed: u64) -> Value {
    json!({
        "prompt": "a red fox in the snow",
        "size": opts.size,
        "n": 1,
        "seed": seed,
        "num_inference_steps": opts.steps,
        "response_format": "b64_json",
    })
}

/// POSTs one request to /v1/images/generations.
fn post(agent: &ureq::Agent, url: &str, body: &Value, index: usize) -> Result<Answer> {
    let start = Instant::now();
    let resp = match agent
        .post(url)
        .timeout(REQUEST_TIMEOUT)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => bail!("request {index}: {e}"),
    };
    let status = resp.status();
    let retry_after = resp.header("Retry-After").map(str::to_string);
    let text = resp.into_string()?;
    let latency = start.elapsed();
    let mut images = Vec::new();
    if status == 200 {
        let v: Value = serde_json::from_str(&text).with_context(|| format!("request {index}"))?;
        for d in v["data"].as_array().into_iter().flatten() {
            let b64 = d["b64_json"].as_str().context("no b64_json")?;
            images.push(base64::engine::general_purpose::STANDARD.decode(b64)?);
        }
    }
    Ok(Answer {
        index,
        status,
        retry_after,
        latency,
        images,
    })
}

/// Runs the load test with the `lumina2` binary `bin`. Fails on any broken
/// promise; else the measurements.
pub fn load(bin: &Path, opts: &LoadOptions) -> Result<LoadReport> {
    let (width, height) = opts
        .size
        .split_once('x')
        .context("--size is WIDTHxHEIGHT")?;
    let max_queue = opts.max_queue.to_string();
    let mut server = Server::start(bin, &["--max-queue", &max_queue, "--preload"])?;
    let url = server.url("/v1/images/generations");
    let agent = ureq::Agent::new();

    // The reference image of each seed; this also warms the server up, so
    // that the RSS before counts the loaded models.
    let mut reference = Vec::new();
    for seed in 0..SEEDS {
        let a = post(&agent, &url, &body(opts, seed), 0)?;
        if a.status != 200 || a.images.len() != 1 {
            bail!("warm-up request (seed {seed}) answered {}", a.status);
        }
        reference.push(a.images[0].clone());
    }
    let rss_before = server.rss_mib()?;
    let completed_before = server.metric("lumina2_jobs_completed_total")?;
    let rejected_before = server.metric("lumina2_requests_rejected_total")?;

    // The load: `clients` threads take request numbers until `requests` are sent.
    let next = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::with_capacity(opts.requests));
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..opts.clients)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let agent = ureq::Agent::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= opts.requests {
                            return Ok(());
                        }
                        let a = post(&agent, &url, &body(opts, index as u64 % SEEDS), index)?;
                        // A polite client waits as told before its next request.
                        let wait = a
                            .retry_after
                            .as_deref()
                            .filter(|_| a.status == 429)
                            .and_then(|s| s.parse::<f64>().ok())
                            .map_or(0.0, |s| s.min(MAX_BACKOFF_S));
                        std::thread::sleep(Duration::from_secs_f64(wait));
                        answers
                            .lock()
                            .map_err(|_| anyhow::anyhow!("a client panicked"))?
                            .push(a);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        }
        Ok(())
    })?;
    let wall_s = start.elapsed().as_secs_f64();
    let answers = answers
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a client panicked"))?;

    // Every request answered once, with a 200 and its own image or a 429.
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut latencies = Vec::new();
    let mut rejected = 0;
    for a in &answers {
        *seen.entry(a.index).or_default() += 1;
        match a.status {
            200 => {
                if a.images.len() != 1 {
                    bail!("request {}: {} images for n=1", a.index, a.images.len());
                }
                if a.images[0] != reference[a.index % SEEDS as usize] {
                    bail!(
                        "request {}: the image is not the one of its seed {}",
                        a.index,
                        a.index as u64 % SEEDS
                    );
                }
                latencies.push(a.latency.as_secs_f64());
            }
            429 => {
                if a.retry_after.is_none() {
                    bail!("request {}: 429 without Retry-After", a.index);
                }
                rejected += 1;
            }
            s => bail!("request {}: status {s}", a.index),
        }
    }
    if answers.len() != opts.requests || seen.len() != opts.requests {
        bail!(
            "{} requests sent, {} answers for {} distinct requests",
            opts.requests,
            answers.len(),
            seen.len()
        );
    }
    let ok = latencies.len();
    // The server's own count agrees: each 200 one completed job, each 429 one
    // rejection (a job answered twice or lost would show here).
    let completed = server.metric("lumina2_jobs_completed_total")? - completed_before;
    let rejected_server = server.metric("lumina2_requests_rejected_total")? - rejected_before;
    if completed != ok as f64 || rejected_server != rejected as f64 {
        bail!(
            "the clients saw {ok} images and {rejected} rejections; the server counted \
             {completed} completed jobs and {rejected_server} rejections"
        );
    }
    let health = ureq::get(&server.url("/health"))
        .timeout(Duration::from_secs(30))
        .call()
        .context("GET /health after the load")?
        .status();
    if health != 200 || server.exited() {
        bail!("the server is not healthy after the load (/health {health})");
    }
    let rss_after = server.rss_mib()?;
    if rss_after > rss_before + RSS_SLACK_MIB.max(rss_before / 4.0) {
        bail!("the server's RSS grew from {rss_before:.0} MiB to {rss_after:.0} MiB");
    }

    // The same request one after another, through the API and through the CLI.
    let seq_body = body(opts, 0);
    let sum_before = server.metric("lumina2_request_duration_seconds_sum")?;
    let count_before = server.metric("lumina2_request_duration_seconds_count")?;
    let t = Instant::now();
    for i in 0..opts.sequential {
        let a = post(&agent, &url, &seq_body, i)?;
        if a.status != 200 || a.images.first() != Some(&reference[0]) {
            bail!("sequential request {i} answered {}", a.status);
        }
    }
    let api_seq_s = t.elapsed().as_secs_f64();
    let render_s = (server.metric("lumina2_request_duration_seconds_sum")? - sum_before)
        / (server.metric("lumina2_request_duration_seconds_count")? - count_before).max(1.0);
    drop(server);

    let dir = std::env::temp_dir().join(format!("lumina2-xtask-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let png = dir.join("cli.png");
    let t = Instant::now();
    for _ in 0..opts.sequential {
        generate(
            bin,
            &[
                "--prompt",
                "a red fox in the snow",
                "--width",
                width,
                "--height",
                height,
                "--steps",
                &opts.steps.to_string(),
                "--seed",
                "0",
            ],
            &png,
        )?;
    }
    let cli_seq_s = t.elapsed().as_secs_f64();
    let same = std::fs::read(&png)? == reference[0];
    let _ = std::fs::remove_dir_all(&dir);
    if !same {
        bail!("lumina2 generate's PNG differs from the server's for the same request");
    }

    latencies.sort_by(f64::total_cmp);
    Ok(LoadReport {
        opts_line: format!(
            "{} clients, {} requests, --max-queue {}, {} at {} steps",
            opts.clients, opts.requests, opts.max_queue, opts.size, opts.steps
        ),
        ok,
        rejected,
        wall_s,
        p50_ms: percentile(&latencies, 0.50) * 1e3,
        p99_ms: percentile(&latencies, 0.99) * 1e3,
        rss_before_mib: rss_before,
        rss_after_mib: rss_after,
        api_seq_s,
        cli_seq_s,
        render_ms: render_s * 1e3,
        sequential: opts.sequential,
    })
}

/// The `q` quantile of sorted values (nearest rank); 0 when there are none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The report as a markdown table.
pub fn format_report(r: &LoadReport) -> String {
    let k = r.sequential.max(1) as f64;
    let rows = [
        ("load", r.opts_line.clone()),
        ("answered 200 / 429", format!("{} / {}", r.ok, r.rejected)),
        ("wall time", format!("{:.2} s", r.wall_s)),
        (
            "throughput",
            format!("{:.2} images/s", r.ok as f64 / r.wall_s.max(1e-9)),
        ),
        (
            "latency of the 200s, p50 / p99",
            format!("{:.0} / {:.0} ms", r.p50_ms, r.p99_ms),
        ),
        (
            "server RSS before / after",
            format!("{:.0} / {:.0} MiB", r.rss_before_mib, r.rss_after_mib),
        ),
        (
            "sequential API requests",
            format!(
                "{} in {:.2} s ({:.0} ms per image)",
                r.sequential,
                r.api_seq_s,
                r.api_seq_s / k * 1e3
            ),
        ),
        (
            "server time per image (/metrics)",
            format!("{:.0} ms", r.render_ms),
        ),
        (
            "sequential `lumina2 generate` runs",
            format!(
                "{} in {:.2} s ({:.0} ms per image)",
                r.sequential,
                r.cli_seq_s,
                r.cli_seq_s / k * 1e3
            ),
        ),
    ];
    let mut out = String::from("| measure | value |\n|---|---|\n");
    for (m, v) in rows {
        out.push_str(&format!("| {m} | {v} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
