//! `cargo xtask bench --what e2e`: the whole generation a user runs, loading
//! included, on a random-weight pipeline of the real model's size and layout.
//!
//! Each run is a fresh process on each side: our `lumina2 generate` (release
//! build) and diffusers' `Lumina2Pipeline` (`xtask/parity/bench_e2e.py run`).
//! Both are started, timed and their peak RSS read by the same launcher
//! (`bench_e2e.py measure`), and the sides alternate (ours, PyTorch, ours,
//! ...) so that a noisy neighbour hits both. A row's ratio is the median of
//! the per-pair ratios, with their range.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{pyenv, server};

/// Options of the end-to-end benchmark.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// Gemma-2 layers (the real model: 26).
    pub text_layers: usize,
    /// Joint transformer blocks (the real model: 26).
    pub layers: usize,
    /// Blocks per refiner (the real model: 2).
    pub refiner_layers: usize,
    /// Square image sizes in pixels.
    pub sizes: Vec<usize>,
    /// `f32` and/or `bf16`.
    pub dtypes: Vec<String>,
    /// Pairs of runs (ours, PyTorch) per size and dtype.
    pub runs: usize,
    /// Denoising steps (guidance 4, so two transformer passes per step).
    pub steps: usize,
    /// Only our side.
    pub skip_torch: bool,
}

/// One process's run, split into stages.
#[derive(Debug, Clone, Serialize)]
pub struct E2eRun {
    /// Seconds per stage: `load`, `encode`, `denoise`, `decode`, `other`
    /// (process start-up, PNG writing, exit).
    pub stages: Vec<(String, f64)>,
    /// Mean seconds per denoising step.
    pub step_s: f64,
    /// Wall time of the process.
    pub total_s: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mb: f64,
}

/// The runs of one size and dtype.
#[derive(Debug, Clone, Serialize)]
pub struct E2eRow {
    /// Image side in pixels.
    pub size: usize,
    /// Compute dtype.
    pub dtype: String,
    /// How diffusers ran (`whole pipeline` or `component by component`).
    pub torch_mode: String,
    /// Our runs, in order.
    pub ours: Vec<E2eRun>,
    /// PyTorch's runs, paired with ours by index.
    pub torch: Vec<E2eRun>,
}

/// The stages reported, in table order.
const STAGES: [&str; 5] = ["load", "encode", "denoise", "decode", "other"];

#[derive(Deserialize)]
struct Measured {
    wall_s: f64,
    rc: i32,
    peak_rss_mb: f64,
    stdout: String,
    stderr: String,
}

#[derive(Serialize)]
struct RunSpec<'a> {
    prompt: &'a str,
    size: usize,
    steps: usize,
    guidance_scale: f64,
    seed: u64,
    max_sequence_length: usize,
}

const PROMPT: &str = "A photograph of a mountain lake at sunset, with reflections of the trees";

/// Runs the benchmark and returns its rows.
pub fn bench_e2e(opts: &E2eOptions) -> Result<Vec<E2eRow>> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let python = pyenv::ensure_venv()?;
    let script = pyenv::scripts_dir().join("bench_e2e.py");
    let dir = pyenv::workspace_root()
        .join("target")
        .join("bench")
        .join(format!(
            "e2e-t{}-l{}-r{}",
            opts.text_layers, opts.layers, opts.refiner_layers
        ));
    let model = dir.join("pipeline");
    if !model.join("model_index.json").exists() {
        eprintln!(
            "bench: writing a random-weight pipeline of the real layout to {} (once)",
            model.display()
        );
        pyenv::run(
            Command::new(&python)
                .arg(&script)
                .arg("setup")
                .arg("--out")
                .arg(&model)
                .args(["--text-layers", &opts.text_layers.to_string()])
                .args(["--layers", &opts.layers.to_string()])
                .args(["--refiner-layers", &opts.refiner_layers.to_string()]),
        )?;
    }
    let bin = server::lumina2_binary(None)?;
    let mut rows = Vec::new();
    for &size in &opts.sizes {
        let inputs = dir.join(format!("run_{size}_{}.json", opts.steps));
        std::fs::write(
            &inputs,
            serde_json::to_string_pretty(&RunSpec {
                prompt: PROMPT,
                size,
                steps: opts.steps,
                guidance_scale: 4.0,
                seed: 0,
                max_sequence_length: 256,
            })?,
        )?;
        for dtype in &opts.dtypes {
            if dtype != "f32" && dtype != "bf16" {
                bail!("e2e: unknown dtype `{dtype}` (f32, bf16)");
            }
            // diffusers' whole f32 pipeline holds 21 GB of weights: on a
            // 24 GiB machine it runs component by component, as ours does.
            let staged = dtype == "f32";
            let mut row = E2eRow {
                size,
                dtype: dtype.clone(),
                torch_mode: if staged {
                    "component by component".into()
                } else {
                    "whole pipeline".into()
                },
                ours: Vec::new(),
                torch: Vec::new(),
            };
            for k in 0..opts.runs {
                let out = dir.join(format!("ours_{size}_{dtype}.png"));
                eprintln!("bench: e2e {size}x{size} {dtype} run {}: ours", k + 1);
                let mut cmd = vec![
                    bin.display().to_string(),
                    "generate".into(),
                    "--model".into(),
                    model.display().to_string(),
                    "--prompt".into(),
                    PROMPT.into(),
                    "--width".into(),
                    size.to_string(),
                    "--height".into(),
                    size.to_string(),
                    "--steps".into(),
                    opts.steps.to_string(),
                    "--guidance-scale".into(),
                    "4".into(),
                    "--seed".into(),
                    "0".into(),
                    "--dtype".into(),
                    dtype.clone(),
                    "--output".into(),
                    out.display().to_string(),
                ];
                let m = launch(&python, &script, &cmd)?;
                row.ours.push(ours_run(&m)?);
                eprintln!("{}", one_line("ours", row.ours.last()));
                if opts.skip_torch {
                    continue;
                }
                eprintln!("bench: e2e {size}x{size} {dtype} run {}: PyTorch", k + 1);
                cmd = vec![
                    python.display().to_string(),
                    script.display().to_string(),
                    "run".into(),
                    "--model".into(),
                    model.display().to_string(),
                    "--inputs".into(),
                    inputs.display().to_string(),
                    "--dtype".into(),
                    dtype.clone(),
                    "--out".into(),
                    dir.join(format!("torch_{size}_{dtype}.png"))
                        .display()
                        .to_string(),
                ];
                if staged {
                    cmd.push("--staged".into());
                }
                let m = launch(&python, &script, &cmd)?;
                row.torch.push(torch_run(&m)?);
                eprintln!("{}", one_line("PyTorch", row.torch.last()));
            }
            eprintln!("{}", format_e2e(std::slice::from_ref(&row)));
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Runs `cmd` under the launcher and checks that it succeeded.
fn launch(python: &Path, script: &Path, cmd: &[String]) -> Result<Measured> {
    let out = Command::new(python)
        .arg(script)
        .args(["measure", "--"])
        .args(cmd)
        .output()
        .context("starting the bench launcher")?;
    if !out.status.success() {
        bail!(
            "the bench launcher failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let m: Measured = serde_json::from_str(
        line.lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or_else(|| anyhow!("the bench launcher printed no JSON"))?,
    )?;
    if m.rc != 0 {
        bail!(
            "{} exited with {}:\n{}",
            cmd.first().map_or("?", String::as_str),
            m.rc,
            m.stderr
        );
    }
    Ok(m)
}

/// Our stages from `lumina2 generate`'s stderr (`timings: load text
/// encoder 1.23 s, encode 2.00 s, ... (total ...)` and `denoising: N steps,
/// S s/step`).
fn ours_run(m: &Measured) -> Result<E2eRun> {
    let line = m
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("timings: "))
        .ok_or_else(|| anyhow!("lumina2 printed no timings:\n{}", m.stderr))?;
    let list = line.rsplit_once(" (total").map_or(line, |(a, _)| a);
    let mut named = Vec::new();
    for part in list.split(", ") {
        let (name, secs) = part
            .rsplit_once(' ')
            .and_then(|(a, unit)| (unit == "s").then_some(a))
            .and_then(|a| a.rsplit_once(' '))
            .ok_or_else(|| anyhow!("unexpected timing `{part}`"))?;
        let v: f64 = secs.parse().with_context(|| format!("timing `{part}`"))?;
        let stage = if name.starts_with("load") {
            "load"
        } else {
            name
        };
        named.push((stage.to_string(), v));
    }
    let step_s = m
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("denoising: "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.strip_suffix(" s/step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("lumina2 printed no step time:\n{}", m.stderr))?;
    Ok(split(named, step_s, m))
}

#[derive(Deserialize)]
struct TorchReport {
    stages: Vec<(String, f64)>,
    steps: Vec<f64>,
}

/// PyTorch's stages from the worker's JSON line.
fn torch_run(m: &Measured) -> Result<E2eRun> {
    let line = m
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow!("the PyTorch worker printed no JSON:\n{}", m.stderr))?;
    let r: TorchReport = serde_json::from_str(line)?;
    let step_s = if r.steps.is_empty() {
        f64::NAN
    } else {
        r.steps.iter().sum::<f64>() / r.steps.len() as f64
    };
    Ok(split(r.stages, step_s, m))
}

/// Sums the named stages into the table's stages; `other` is the rest of the
/// process's wall time.
fn split(named: Vec<(String, f64)>, step_s: f64, m: &Measured) -> E2eRun {
    let mut stages: Vec<(String, f64)> = STAGES.iter().map(|s| (s.to_string(), 0.0)).collect();
    for (name, v) in named {
        if let Some(slot) = stages[..4].iter_mut().find(|(s, _)| *s == name) {
            slot.1 += v;
        }
    }
    let counted: f64 = stages[..4].iter().map(|(_, v)| v).sum();
    stages[4].1 = (m.wall_s - counted).max(0.0);
    E2eRun {
        stages,
        step_s,
        total_s: m.wall_s,
        peak_rss_mb: m.peak_rss_mb,
    }
}

fn one_line(side: &str, run: Option<&E2eRun>) -> String {
    let Some(r) = run else { return String::new() };
    let parts: Vec<String> = r
        .stages
        .iter()
        .map(|(n, v)| format!("{n} {v:.2} s"))
        .collect();
    format!(
        "  {side}: {}, {:.2} s/step, total {:.2} s, peak RSS {:.0} MiB",
        parts.join(", "),
        r.step_s,
        r.total_s,
        r.peak_rss_mb
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median and range of the per-pair ratios `ours / torch` of one quantity.
fn ratio(row: &E2eRow, f: impl Fn(&E2eRun) -> f64) -> String {
    let r: Vec<f64> = row
        .ours
        .iter()
        .zip(&row.torch)
        .map(|(o, t)| f(o) / f(t))
        .filter(|x| x.is_finite())
        .collect();
    if r.is_empty() {
        return "-".into();
    }
    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if r.len() == 1 {
        format!("{:.2}", r[0])
    } else {
        format!("{:.2} ({lo:.2}-{hi:.2})", median(r))
    }
}

fn med(runs: &[E2eRun], f: impl Fn(&E2eRun) -> f64) -> String {
    if runs.is_empty() {
        return "-".into();
    }
    format!("{:.2}", median(runs.iter().map(f).collect()))
}

/// One markdown table per row: the stages, per step, total and peak RSS,
/// medians of each side and the median (range) of the per-pair ratios.
pub fn format_e2e(rows: &[E2eRow]) -> String {
    let mut s = String::new();
    for row in rows {
        s.push_str(&format!(
            "{0}x{0} {1}, {2} pair(s) of runs (diffusers: {3})\n\n",
            row.size,
            row.dtype,
            row.ours.len(),
            row.torch_mode
        ));
        s.push_str("| stage | ours (s) | PyTorch (s) | ours / PyTorch |\n|---|---|---|---|\n");
        for (i, name) in STAGES.iter().enumerate() {
            let f = |r: &E2eRun| r.stages[i].1;
            s.push_str(&format!(
                "| {name} | {} | {} | {} |\n",
                med(&row.ours, f),
                med(&row.torch, f),
                ratio(row, f)
            ));
        }
        let per_step = |r: &E2eRun| r.step_s;
        let total = |r: &E2eRun| r.total_s;
        let rss = |r: &E2eRun| r.peak_rss_mb / 1024.0;
        for (name, f) in [
            ("denoise, per step", &per_step as &dyn Fn(&E2eRun) -> f64),
            ("**total**", &total),
            ("peak RSS (GiB)", &rss),
        ] {
            s.push_str(&format!(
                "| {name} | {} | {} | {} |\n",
                med(&row.ours, f),
                med(&row.torch, f),
                ratio(row, f)
            ));
        }
        s.push('\n');
    }
    s
}

/// Writes the rows as JSON.
pub fn write_json(rows: &[E2eRow], path: &PathBuf) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(rows)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(stderr: &str, wall: f64) -> Measured {
        Measured {
            wall_s: wall,
            rc: 0,
            peak_rss_mb: 2048.0,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn our_timings_line_is_split_into_the_table_stages() {
        let m = measured(
            "wrote x.png\ntimings: load text encoder 1.50 s, encode 2.00 s, load transformer 3.00 s, \
             denoise 10.00 s, load vae 0.25 s, decode 1.25 s (total 18.00 s)\n\
             denoising: 2 steps, 5.000 s/step\n",
            20.0,
        );
        let r = ours_run(&m).unwrap();
        let v: Vec<f64> = r.stages.iter().map(|(_, v)| *v).collect();
        assert_eq!(v, vec![4.75, 2.0, 10.0, 1.25, 2.0]);
        assert_eq!(r.step_s, 5.0);
        assert_eq!(r.total_s, 20.0);
    }

    #[test]
    fn missing_timings_are_an_error() {
        assert!(ours_run(&measured("wrote x.png\n", 1.0)).is_err());
    }

    #[test]
    fn ratios_are_the_median_of_pairs_with_their_range() {
        let run = |t: f64| E2eRun {
            stages: STAGES.iter().map(|s| (s.to_string(), t)).collect(),
            step_s: t,
            total_s: t,
            peak_rss_mb: 1024.0,
        };
        let row = E2eRow {
            size: 512,
            dtype: "f32".into(),
            torch_mode: "whole pipeline".into(),
            ours: vec![run(1.0), run(3.0), run(2.0)],
            torch: vec![run(2.0), run(2.0), run(2.0)],
        };
        assert_eq!(ratio(&row, |r| r.total_s), "1.00 (0.50-1.50)");
        assert!(format_e2e(&[row]).contains("| **total** | 2.00 | 2.00 | 1.00 (0.50-1.50) |"));
    }
}
