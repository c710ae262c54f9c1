//! `cargo xtask bench --what e2e`: the whole generation a user runs, loading
//! included, on a random-weight pipeline of the real model's size and layout.
//!
//! Each run is a fresh process on each side: our `lumina2 generate` (release
//! build) and diffusers' `Lumina2Pipeline` or `ZImagePipeline`
//! (`xtask/parity/bench_e2e.py run`).
//! Both are started, timed and their peak RSS read by the same launcher
//! (`bench_e2e.py measure`), and the sides alternate (ours, PyTorch, ours,
//! ...) so that a noisy neighbour hits both. A row's ratio is the median of
//! the per-pair ratios, with their range. Each pair's images (same seed) are
//! compared first, so that a row reports whether both sides did the same work.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{pyenv, server};

/// Which model's pipeline the benchmark writes and runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E2eModel {
    /// Alpha-VLLM/Lumina-Image-2.0 (`Lumina2Pipeline`).
    Lumina2,
    /// Tongyi-MAI/Z-Image-Turbo (`ZImagePipeline`).
    ZImage,
}

impl E2eModel {
    /// The name `--model` takes.
    pub fn name(self) -> &'static str {
        match self {
            E2eModel::Lumina2 => "lumina2",
            E2eModel::ZImage => "zimage",
        }
    }

    /// Parses `--model`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lumina2" => Ok(E2eModel::Lumina2),
            "zimage" => Ok(E2eModel::ZImage),
            _ => bail!("e2e: unknown model `{s}` (lumina2, zimage)"),
        }
    }

    /// The real model's depth: text encoder layers, transformer layers,
    /// blocks per refiner.
    pub fn real_depth(self) -> (usize, usize, usize) {
        match self {
            E2eModel::Lumina2 => (26, 26, 2),
            E2eModel::ZImage => (36, 30, 2),
        }
    }

    /// The depth the benchmark uses unless told: Lumina2's real model
    /// (11 GB of bf16 weights); for Z-Image (20 GB at full depth) 12 of
    /// Qwen3-4B's 36 layers and 8 of the transformer's 30 with both real
    /// refiners, about 7.7 GB, so that either side's peak RSS stays under
    /// about 14 GB in f32 too (diffusers' f32 transformer stage holds the
    /// widened weights beside the mapped bf16 file: at 10 layers it peaked
    /// at 15.1 GiB).
    pub fn default_depth(self) -> (usize, usize, usize) {
        match self {
            E2eModel::Lumina2 => (26, 26, 2),
            E2eModel::ZImage => (12, 8, 2),
        }
    }

    /// The usual settings: steps, guidance scale, max_sequence_length.
    /// Lumina2: 2 steps (of its 50) at guidance 4 (two transformer passes
    /// per step), 256 caption tokens. Z-Image-Turbo: diffusers 0.42's
    /// example (`pipeline_z_image.py`), 8 steps (8 transformer passes; the
    /// model card's 9 predates diffusers' Z-Image sigmas, with which 8 steps
    /// make the model's 8 evaluations), guidance 0, 512 tokens.
    fn settings(self) -> (usize, f64, usize) {
        match self {
            E2eModel::Lumina2 => (2, 4.0, 256),
            E2eModel::ZImage => (8, 0.0, 512),
        }
    }
}

/// A value of `--dtypes`: what both sides compute in, and how the
/// transformer's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E2eDtype {
    /// f32 throughout (diffusers component by component).
    F32,
    /// bf16 throughout (diffusers' whole pipeline).
    Bf16,
    /// bf16 compute with the transformer read from a GGUF whose linear
    /// weights stay quantised (Q4_0; the community files' rules, see
    /// `bench_e2e.py setup-gguf`): ours `--transformer FILE.gguf --dtype
    /// bf16`, diffusers `from_single_file` with `GGUFQuantizationConfig`.
    /// Z-Image only.
    Q4_0,
}

impl E2eDtype {
    /// Parses one `--dtypes` value for `model`.
    pub fn parse(s: &str, model: E2eModel) -> Result<Self> {
        match s {
            "f32" => Ok(E2eDtype::F32),
            "bf16" => Ok(E2eDtype::Bf16),
            "q4_0" if model == E2eModel::ZImage => Ok(E2eDtype::Q4_0),
            "q4_0" => bail!(
                "e2e: dtype q4_0 (a GGUF Q4_0 transformer) is implemented for --model zimage only"
            ),
            _ => bail!("e2e: unknown dtype `{s}` (f32, bf16, q4_0)"),
        }
    }

    /// The name in `--dtypes`, the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            E2eDtype::F32 => "f32",
            E2eDtype::Bf16 => "bf16",
            E2eDtype::Q4_0 => "q4_0",
        }
    }

    /// The compute dtype `lumina2 generate --dtype` takes.
    fn compute(self) -> &'static str {
        match self {
            E2eDtype::F32 => "f32",
            E2eDtype::Bf16 | E2eDtype::Q4_0 => "bf16",
        }
    }

    /// diffusers' whole f32 pipeline holds twice the bf16 weights (21 GB
    /// for Lumina2's): on a 24 GiB machine it runs component by component,
    /// as ours does.
    fn staged(self) -> bool {
        self == E2eDtype::F32
    }

    /// How diffusers runs, for the table.
    fn torch_mode(self) -> &'static str {
        match self {
            E2eDtype::F32 => "component by component",
            E2eDtype::Bf16 => "whole pipeline",
            E2eDtype::Q4_0 => {
                "whole pipeline, transformer from the GGUF with GGUFQuantizationConfig(bf16)"
            }
        }
    }
}

/// Parses `--dtypes` for `model`, all of them before anything is written.
pub fn parse_dtypes(dtypes: &[String], model: E2eModel) -> Result<Vec<E2eDtype>> {
    dtypes.iter().map(|d| E2eDtype::parse(d, model)).collect()
}

/// The GGUF Q4_0 transformer of `--dtypes q4_0`, next to the pipeline it is
/// made from (written once, as the pipeline).
fn gguf_path(dir: &Path) -> PathBuf {
    dir.join("transformer-q4_0.gguf")
}

/// Options of the end-to-end benchmark.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// The model whose pipeline runs.
    pub model: E2eModel,
    /// Text encoder layers (Gemma-2 of Lumina2: 26; Qwen3-4B of Z-Image: 36).
    pub text_layers: usize,
    /// Main transformer blocks (Lumina2: 26; Z-Image: 30).
    pub layers: usize,
    /// Blocks per refiner (both: 2).
    pub refiner_layers: usize,
    /// Square image sizes in pixels.
    pub sizes: Vec<usize>,
    /// `f32`, `bf16` and/or `q4_0` ([`E2eDtype`]).
    pub dtypes: Vec<String>,
    /// Pairs of runs (ours, PyTorch) per size and dtype.
    pub runs: usize,
    /// Denoising steps (`None`: the model's usual, [`E2eModel`]).
    pub steps: Option<usize>,
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

/// How far our image is from diffusers' (same seed, same settings), in
/// 8-bit RGB values.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PixelDiff {
    /// The largest absolute difference.
    pub max_abs: u32,
    /// The mean absolute difference.
    pub mean_abs: f64,
}

/// The runs of one size and dtype.
#[derive(Debug, Clone, Serialize)]
pub struct E2eRow {
    /// `lumina2` or `zimage`.
    pub model: String,
    /// Denoising steps.
    pub steps: usize,
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
    /// Each pair's image difference, in order.
    pub pixel_diff: Vec<PixelDiff>,
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
    let (usual_steps, guidance, max_sequence_length) = opts.model.settings();
    let steps = opts.steps.unwrap_or(usual_steps);
    let dtypes = parse_dtypes(&opts.dtypes, opts.model)?;
    let python = pyenv::ensure_venv()?;
    let script = pyenv::scripts_dir().join("bench_e2e.py");
    let dir = pyenv::workspace_root()
        .join("target")
        .join("bench")
        .join(folder_name(opts));
    let model = dir.join("pipeline");
    if !model.join("model_index.json").exists() {
        let (text, layers, refiners) = opts.model.real_depth();
        eprintln!(
            "bench: writing a random-weight {} pipeline of the real layout to {} (once): \
             text encoder {} of {text} layers, transformer {} of {layers}, refiners {} of {refiners}",
            opts.model.name(),
            model.display(),
            opts.text_layers,
            opts.layers,
            opts.refiner_layers
        );
        pyenv::run(
            Command::new(&python)
                .arg(&script)
                .arg("setup")
                .args(["--kind", opts.model.name()])
                .arg("--out")
                .arg(&model)
                .args(["--text-layers", &opts.text_layers.to_string()])
                .args(["--layers", &opts.layers.to_string()])
                .args(["--refiner-layers", &opts.refiner_layers.to_string()]),
        )?;
    }
    let gguf = gguf_path(&dir);
    if dtypes.contains(&E2eDtype::Q4_0) && !gguf.exists() {
        eprintln!(
            "bench: writing the transformer as a GGUF Q4_0 file to {} (once)",
            gguf.display()
        );
        pyenv::run(
            Command::new(&python)
                .arg(&script)
                .arg("setup-gguf")
                .arg("--model")
                .arg(&model)
                .arg("--out")
                .arg(&gguf),
        )?;
    }
    let bin = server::lumina2_binary(None)?;
    let guidance_arg = format!("{guidance}");
    let mut rows = Vec::new();
    for &size in &opts.sizes {
        let inputs = dir.join(format!("run_{size}_{steps}.json"));
        std::fs::write(
            &inputs,
            serde_json::to_string_pretty(&RunSpec {
                prompt: PROMPT,
                size,
                steps,
                guidance_scale: guidance,
                seed: 0,
                max_sequence_length,
            })?,
        )?;
        for &dt in &dtypes {
            let dtype = dt.name();
            let mut row = E2eRow {
                model: opts.model.name().into(),
                steps,
                size,
                dtype: dtype.into(),
                torch_mode: dt.torch_mode().into(),
                ours: Vec::new(),
                torch: Vec::new(),
                pixel_diff: Vec::new(),
            };
            let ours_png = dir.join(format!("ours_{size}_{dtype}.png"));
            let torch_png = dir.join(format!("torch_{size}_{dtype}.png"));
            for k in 0..opts.runs {
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
                    steps.to_string(),
                    "--guidance-scale".into(),
                    guidance_arg.clone(),
                    "--max-sequence-length".into(),
                    max_sequence_length.to_string(),
                    "--seed".into(),
                    "0".into(),
                    "--dtype".into(),
                    dt.compute().into(),
                    "--output".into(),
                    ours_png.display().to_string(),
                ];
                if dt == E2eDtype::Q4_0 {
                    cmd.extend(["--transformer".into(), gguf.display().to_string()]);
                }
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
                    dtype.into(),
                    "--out".into(),
                    torch_png.display().to_string(),
                ];
                if dt.staged() {
                    cmd.push("--staged".into());
                }
                if dt == E2eDtype::Q4_0 {
                    cmd.extend(["--transformer".into(), gguf.display().to_string()]);
                }
                let m = launch(&python, &script, &cmd)?;
                row.torch.push(torch_run(&m)?);
                eprintln!("{}", one_line("PyTorch", row.torch.last()));
                let d = compare(&python, &script, &ours_png, &torch_png)?;
                eprintln!(
                    "  images: max abs difference {} of 255, mean {:.3}",
                    d.max_abs, d.mean_abs
                );
                row.pixel_diff.push(d);
            }
            eprintln!("{}", format_e2e(std::slice::from_ref(&row)));
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The folder of the written pipeline under `target/bench/`: the model and
/// its depth (`e2e-t26-l26-r2` for Lumina2, as before Z-Image was added;
/// `e2e-zimage-t12-l8-r2`).
fn folder_name(opts: &E2eOptions) -> String {
    let depth = format!(
        "t{}-l{}-r{}",
        opts.text_layers, opts.layers, opts.refiner_layers
    );
    match opts.model {
        E2eModel::Lumina2 => format!("e2e-{depth}"),
        E2eModel::ZImage => format!("e2e-zimage-{depth}"),
    }
}

/// Our image against diffusers' (`bench_e2e.py compare`).
fn compare(python: &Path, script: &Path, ours: &Path, torch: &Path) -> Result<PixelDiff> {
    let out = Command::new(python)
        .arg(script)
        .arg("compare")
        .arg(ours)
        .arg(torch)
        .output()
        .context("starting the image comparison")?;
    if !out.status.success() {
        bail!(
            "comparing {} with {} failed: {}",
            ours.display(),
            torch.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow!("the image comparison printed no JSON"))?;
    Ok(serde_json::from_str(line)?)
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
            "{0} {1}x{1} {2}, {3} steps, {4} pair(s) of runs (diffusers: {5})\n\n",
            row.model,
            row.size,
            row.dtype,
            row.steps,
            row.ours.len(),
            row.torch_mode
        ));
        if let Some(max) = row.pixel_diff.iter().map(|d| d.max_abs).max() {
            let mean = row
                .pixel_diff
                .iter()
                .map(|d| d.mean_abs)
                .fold(0.0, f64::max);
            s.push_str(&format!(
                "Our image against diffusers' (same seed): max abs difference {max} of 255, \
                 mean {mean:.3} (the largest of the pairs)\n\n"
            ));
        }
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
            model: "lumina2".into(),
            steps: 2,
            size: 512,
            dtype: "f32".into(),
            torch_mode: "whole pipeline".into(),
            ours: vec![run(1.0), run(3.0), run(2.0)],
            torch: vec![run(2.0), run(2.0), run(2.0)],
            pixel_diff: vec![
                PixelDiff {
                    max_abs: 3,
                    mean_abs: 0.25,
                },
                PixelDiff {
                    max_abs: 5,
                    mean_abs: 0.5,
                },
            ],
        };
        assert_eq!(ratio(&row, |r| r.total_s), "1.00 (0.50-1.50)");
        let table = format_e2e(&[row]);
        assert!(table.contains("| **total** | 2.00 | 2.00 | 1.00 (0.50-1.50) |"));
        assert!(table.contains("lumina2 512x512 f32, 2 steps, 3 pair(s)"));
        assert!(table.contains("max abs difference 5 of 255, mean 0.500"));
    }

    #[test]
    fn the_folder_name_encodes_the_model_and_its_depth() {
        let opts = |model| E2eOptions {
            model,
            text_layers: 12,
            layers: 10,
            refiner_layers: 2,
            sizes: vec![512],
            dtypes: vec!["bf16".into()],
            runs: 1,
            steps: None,
            skip_torch: false,
        };
        assert_eq!(folder_name(&opts(E2eModel::Lumina2)), "e2e-t12-l10-r2");
        assert_eq!(
            folder_name(&opts(E2eModel::ZImage)),
            "e2e-zimage-t12-l10-r2"
        );
        assert!(E2eModel::parse("flux").is_err());
        assert_eq!(
            gguf_path(Path::new("target/bench/e2e-zimage-t12-l8-r2")),
            Path::new("target/bench/e2e-zimage-t12-l8-r2/transformer-q4_0.gguf")
        );
        assert_eq!(E2eModel::parse("zimage").unwrap(), E2eModel::ZImage);
    }

    #[test]
    fn dtypes_parse_to_what_each_side_runs() {
        let zimage = |d: &[&str]| {
            parse_dtypes(
                &d.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                E2eModel::ZImage,
            )
        };
        let all = zimage(&["q4_0", "f32", "bf16"]).unwrap();
        assert_eq!(all, vec![E2eDtype::Q4_0, E2eDtype::F32, E2eDtype::Bf16]);
        let names: Vec<_> = all.iter().map(|d| d.name()).collect();
        assert_eq!(names, vec!["q4_0", "f32", "bf16"]);
        // q4_0 computes in bf16, with diffusers' whole pipeline.
        assert_eq!(E2eDtype::Q4_0.compute(), "bf16");
        assert!(!E2eDtype::Q4_0.staged());
        assert!(E2eDtype::Q4_0.torch_mode().contains("GGUF"));
        assert_eq!(E2eDtype::F32.compute(), "f32");
        assert!(E2eDtype::F32.staged());
        assert!(!E2eDtype::Bf16.staged());
        // One bad value fails the whole list, naming it.
        let err = zimage(&["bf16", "q8_0"]).unwrap_err().to_string();
        assert!(err.contains("`q8_0`"), "{err}");
        // The GGUF transformer is written for Z-Image only.
        let err = E2eDtype::parse("q4_0", E2eModel::Lumina2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--model zimage"), "{err}");
        assert_eq!(
            E2eDtype::parse("f32", E2eModel::Lumina2).unwrap(),
            E2eDtype::F32
        );
    }

    #[test]
    fn a_q4_0_row_is_labelled_q4_0() {
        let run = E2eRun {
            stages: STAGES.iter().map(|s| (s.to_string(), 1.0)).collect(),
            step_s: 1.0,
            total_s: 5.0,
            peak_rss_mb: 1024.0,
        };
        let row = E2eRow {
            model: "zimage".into(),
            steps: 8,
            size: 512,
            dtype: E2eDtype::Q4_0.name().into(),
            torch_mode: E2eDtype::Q4_0.torch_mode().into(),
            ours: vec![run.clone()],
            torch: vec![run],
            pixel_diff: Vec::new(),
        };
        let table = format_e2e(std::slice::from_ref(&row));
        assert!(
            table.starts_with("zimage 512x512 q4_0, 8 steps, 1 pair(s) of runs (diffusers: whole pipeline, transformer from the GGUF"),
            "{table}"
        );
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["dtype"], "q4_0");
    }
}
