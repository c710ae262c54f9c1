//! `cargo xtask bench`: our implementation and PyTorch side by side, in one run,
//! on the same random weights and inputs. Each measurement runs in its own
//! process so that peak RSS belongs to it alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::pyenv;

/// Timing of one side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    /// Model load seconds (not part of the timed runs).
    pub load_s: f64,
    /// Seconds of each timed run, sorted.
    pub times: Vec<f64>,
    /// Median of `times`.
    pub median_s: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mb: f64,
    /// Per-stage seconds of the median run, where the measurement has stages
    /// (the pipeline: `encode`, `denoise`, `decode`, loads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<(String, f64)>,
}

/// One row of the bench table.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// What was measured.
    pub what: String,
    /// Image size in pixels (square).
    pub size: usize,
    /// Compute dtype.
    pub dtype: String,
    /// Our timing.
    pub ours: Option<Timing>,
    /// PyTorch's timing.
    pub torch: Option<Timing>,
}

impl BenchRow {
    /// ours / torch median time.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.ours.as_ref()?.median_s / self.torch.as_ref()?.median_s)
    }
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// What to measure: `transformer`, `text_encoder`, `vae`.
    pub what: Vec<String>,
    /// Gemma-2 layers of the text-encoder benchmark model (the real one has 26).
    pub text_layers: usize,
    /// Joint blocks of the benchmark model (the real model has 26).
    pub layers: usize,
    /// Blocks per refiner (the real model has 2).
    pub refiner_layers: usize,
    /// Square image sizes in pixels.
    pub sizes: Vec<usize>,
    /// Compute dtypes.
    pub dtypes: Vec<String>,
    /// Timed runs per measurement (after one warm-up).
    pub runs: usize,
    /// Denoising steps of the pipeline benchmark.
    pub steps: usize,
    /// After the timed runs, one more transformer forward of ours with the
    /// per-op-group accounting on (reported as stages).
    pub profile: bool,
    /// Skip the PyTorch side.
    pub skip_torch: bool,
    /// Write the rows as JSON here.
    pub json: Option<PathBuf>,
}

impl BenchOptions {
    /// The sizes as the Python worker's `--sizes` argument.
    fn sizes_arg(&self) -> String {
        let v: Vec<String> = self.sizes.iter().map(|s| s.to_string()).collect();
        v.join(",")
    }
}

/// Peak RSS of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "int8" => bail!("int8 applies to the transformer (and pipeline) benchmarks only"),
        _ => bail!("unknown dtype `{s}`"),
    }
}

/// The transformer's compute dtype and whether its linears are int8:
/// `int8` is bf16 with int8 attention and feed-forward layers.
fn transformer_dtype(s: &str) -> Result<(DType, bool)> {
    match s {
        "int8" => Ok((DType::BF16, true)),
        _ => Ok((parse_dtype(s)?, false)),
    }
}

/// The dtype PyTorch runs for one of ours: bf16 for our int8 (the issue's
/// yardstick: PyTorch's fastest CPU path), else the same.
fn torch_dtype(s: &str) -> &str {
    if s == "int8" {
        "bf16"
    } else {
        s
    }
}

/// Times `runs` calls of `f` after one warm-up.
fn time_runs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    for k in 0..=runs {
        let t0 = Instant::now();
        f()?;
        if k > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times)
}

fn timing(load_s: f64, times: Vec<f64>) -> Timing {
    Timing {
        load_s,
        median_s: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        times,
        peak_rss_mb: peak_rss_mb(),
        stages: Vec::new(),
    }
}

/// Appends one measured row and prints the table so far.
fn add_row(
    rows: &mut Vec<BenchRow>,
    what: String,
    size: usize,
    dtype: &str,
    (ours, torch): (Timing, Option<Timing>),
) {
    rows.push(BenchRow {
        what,
        size,
        dtype: dtype.to_string(),
        ours: Some(ours),
        torch,
    });
    eprintln!("{}", format_table(rows));
}

/// Our side of one measurement (run in a child process): `kind` is
/// `transformer` or `text_encoder`.
pub fn worker(
    kind: &str,
    model: &Path,
    inputs: &Path,
    dtype: &str,
    runs: usize,
    profile: bool,
) -> Result<Timing> {
    match kind {
        "transformer" => worker_transformer(model, inputs, dtype, runs, profile),
        "transformer_gguf" => worker_transformer_gguf(model, inputs, dtype, runs, profile),
        "pipeline" => worker_pipeline(model, inputs, dtype, runs),
        k if k.starts_with("dequant:") => worker_dequant(model, &k["dequant:".len()..], runs),
        "text_encoder" => worker_text_encoder(model, inputs, dtype, runs, profile),
        "vae_decode" => worker_vae(model, inputs, dtype, runs, VaeTiles::Off),
        "vae_decode_tiled" => worker_vae(model, inputs, dtype, runs, VaeTiles::Defaults),
        k if k.starts_with("vae_decode_tile") => {
            let tile = k["vae_decode_tile".len()..]
                .parse()
                .with_context(|| format!("tile size in `{k}`"))?;
            worker_vae(model, inputs, dtype, runs, VaeTiles::Sample(tile))
        }
        other => bail!("unknown benchmark kind `{other}`"),
    }
}

fn worker_text_encoder(
    model: &Path,
    inputs: &Path,
    dtype: &str,
    runs: usize,
    profile: bool,
) -> Result<Timing> {
    use lumina2_text_encoder::{Gemma2Config, Gemma2Encoder, Weights};
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let cfg = Gemma2Config::from_file(model.join("config.json"))?;
    let files = lumina2_loader::ComponentFolder::open(model)?;
    let w = Weights::from_safetensors(files.safetensors_files(), parse_dtype(dtype)?, &dev)?;
    // The same work as transformers: every layer (the pipeline itself skips the last).
    let enc = Gemma2Encoder::new(&cfg, &w, cfg.num_hidden_layers)?;
    drop(w);
    let load_s = t0.elapsed().as_secs_f64();
    let i = candle_core::safetensors::load(inputs, &dev)?;
    let ids = i.get("input_ids").ok_or_else(|| anyhow!("no input_ids"))?;
    let mask = i
        .get("attention_mask")
        .ok_or_else(|| anyhow!("no attention_mask"))?;
    let forward = || -> Result<()> {
        enc.forward(ids, Some(mask))?;
        Ok(())
    };
    let times = time_runs(runs, forward)?;
    let mut t = timing(load_s, times);
    if profile {
        t.stages = profile_once(forward, "other (embedding, masks, RoPE tables)")?;
    }
    Ok(t)
}

/// Tiling of a VAE benchmark (the same on both sides).
#[derive(Debug, Clone, Copy)]
enum VaeTiles {
    /// Untiled decode.
    Off,
    /// diffusers' `enable_tiling()` defaults (tiles of `sample_size`, which
    /// for the Flux VAE is 1024 px: no tiling up to 1024x1024).
    Defaults,
    /// Tiles of this many pixels (latent tiles of a 1/8 of it), overlap 0.25,
    /// forced so that tiling happens at the sizes measured.
    Sample(usize),
}

/// The VAE benchmark kinds for an image of `size` pixels: worker kind, row
/// label. The forced tiles are half the image (diffusers tiles only latents
/// larger than a tile), so that tiling happens at every size measured.
/// diffusers' default tiling (tiles of the config's `sample_size`, 1024 px for
/// the Flux VAE) is measured only above 1024 px: below it does not tile and
/// is the plain decode.
fn vae_kinds(size: usize) -> Vec<(String, String)> {
    let tile = size / 2;
    let mut kinds = vec![("vae_decode".to_string(), "Flux VAE decode".to_string())];
    if size > 1024 {
        kinds.push((
            "vae_decode_tiled".into(),
            "Flux VAE decode, tiling on (diffusers' defaults: 1024 px tiles)".into(),
        ));
    }
    kinds.push((
        format!("vae_decode_tile{tile}"),
        format!(
            "Flux VAE decode, tiles forced to {tile} px ({} latent), overlap 0.25",
            tile / 8
        ),
    ));
    kinds
}

fn worker_vae(
    model: &Path,
    inputs: &Path,
    dtype: &str,
    runs: usize,
    tiles: VaeTiles,
) -> Result<Timing> {
    use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig, Tiling, Weights};
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let cfg = AutoencoderKLConfig::from_file(model)?;
    let files = lumina2_loader::ComponentFolder::open(model)?;
    let weights = Weights::from_safetensors(files.safetensors_files(), parse_dtype(dtype)?, &dev)?;
    let mut vae = AutoencoderKL::new(&cfg, &weights)?;
    drop(weights);
    match tiles {
        VaeTiles::Off => {}
        VaeTiles::Defaults => vae.enable_tiling(),
        VaeTiles::Sample(sample_tile) => vae.set_tiling(Some(Tiling {
            sample_tile,
            latent_tile: sample_tile / cfg.downsample_factor(),
            overlap_factor: 0.25,
        })),
    }
    let load_s = t0.elapsed().as_secs_f64();
    let i = candle_core::safetensors::load(inputs, &dev)?;
    let z = i.get("latents").ok_or_else(|| anyhow!("no latents"))?;
    let times = time_runs(runs, || {
        vae.decode(z)?;
        Ok(())
    })?;
    Ok(timing(load_s, times))
}

/// Times the forward of a loaded transformer on the `inputs` file.
fn time_transformer_forward(
    net: &lumina2_transformer::Lumina2Transformer,
    inputs: &Path,
    runs: usize,
    load_s: f64,
    profile: bool,
) -> Result<Timing> {
    let i = candle_core::safetensors::load(inputs, &Device::Cpu)?;
    let get = |n: &str| -> Result<&Tensor> { i.get(n).ok_or_else(|| anyhow!("no `{n}`")) };
    let forward = || -> Result<()> {
        net.forward(
            get("hidden_states")?,
            get("timestep")?,
            get("encoder_hidden_states")?,
            get("encoder_attention_mask")?,
        )?;
        Ok(())
    };
    let times = time_runs(runs, forward)?;
    let mut t = timing(load_s, times);
    if profile {
        t.stages = profile_once(forward, "other (embedders, patchify, concatenation)")?;
    }
    Ok(t)
}

/// One more run of `forward` with the per-group accounting of
/// `lumina2_kernels::profile` on (not among the timed runs): seconds per op
/// group, the rest of the run as `other`, and the run's total.
fn profile_once(forward: impl Fn() -> Result<()>, other: &str) -> Result<Vec<(String, f64)>> {
    use lumina2_kernels::profile;
    profile::reset();
    profile::enable(true);
    let t0 = Instant::now();
    let run = forward();
    let total = t0.elapsed().as_secs_f64();
    profile::enable(false);
    run?;
    let groups = profile::report();
    let covered: f64 = groups.iter().map(|g| g.1).sum();
    Ok(groups
        .into_iter()
        .map(|(g, s, _)| (g.to_string(), s))
        .chain([
            (other.to_string(), total - covered),
            ("total of the profiled forward".into(), total),
        ])
        .collect())
}

fn worker_transformer(
    model: &Path,
    inputs: &Path,
    dtype: &str,
    runs: usize,
    profile: bool,
) -> Result<Timing> {
    use lumina2_transformer::{Config, Lumina2Transformer, Weights};
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let folder = lumina2_loader::ComponentFolder::open(model)?;
    let cfg = Config::from_file(model)?;
    let net = {
        let (dt, int8) = transformer_dtype(dtype)?;
        let w = Weights::from_safetensors(folder.safetensors_files(), dt, &dev)?
            .with_int8_linears(int8);
        Lumina2Transformer::new(&cfg, &w)?
    };
    let load_s = t0.elapsed().as_secs_f64();
    time_transformer_forward(&net, inputs, runs, load_s, profile)
}

/// The GGUF transformer: `model` is the `.gguf` file (original keys, 2-D
/// weights Q4_0), its config the `model/config.json` beside it. Linear weights
/// stay quantised and are dequantised one layer at a time when used.
fn worker_transformer_gguf(
    model: &Path,
    inputs: &Path,
    dtype: &str,
    runs: usize,
    profile: bool,
) -> Result<Timing> {
    use lumina2_transformer::{Config, Lumina2Transformer, Weights};
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let config_dir = model
        .parent()
        .map(|p| p.join("model"))
        .ok_or_else(|| anyhow!("{}: no folder", model.display()))?;
    let cfg = Config::from_file(&config_dir)?;
    let net = {
        let source = lumina2_loader::open_transformer_file(model, &cfg)?;
        let (dt, int8) = transformer_dtype(dtype)?;
        let w = Weights::new(source, dt, &dev).with_int8_linears(int8);
        Lumina2Transformer::new(&cfg, &w)?
    };
    let load_s = t0.elapsed().as_secs_f64();
    time_transformer_forward(&net, inputs, runs, load_s, profile)
}

/// Settings of the pipeline benchmark, shared with bench_worker.py's
/// `pipeline` kind through `inputs` (a JSON file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PipelineRun {
    prompt: String,
    size: usize,
    steps: usize,
    guidance_scale: f64,
    seed: u64,
    max_sequence_length: usize,
}

/// A whole generation with the components kept resident (loaded during the
/// warm-up), the same work as diffusers' pipeline call. The time is the whole
/// call; the stages of the median run are reported too.
fn worker_pipeline(model: &Path, inputs: &Path, dtype: &str, runs: usize) -> Result<Timing> {
    use lumina2_pipeline::{GenerateOptions, Lumina2Pipeline, Noise, PipelineSources};
    let run: PipelineRun = serde_json::from_str(&std::fs::read_to_string(inputs)?)?;
    let t0 = Instant::now();
    let sources = PipelineSources::from_pipeline_folder(model)?;
    let (dt, int8) = transformer_dtype(dtype)?;
    let mut pipe = Lumina2Pipeline::builder(sources)
        .dtype(dt)
        .int8_transformer(int8)
        .keep_resident(true)
        .build()?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut opts = GenerateOptions::new(run.prompt.clone());
    opts.width = Some(run.size);
    opts.height = Some(run.size);
    opts.num_inference_steps = run.steps;
    opts.guidance_scale = run.guidance_scale;
    opts.max_sequence_length = run.max_sequence_length;
    opts.noise = Noise::Seed(run.seed);
    let mut all = Vec::new();
    let times = time_runs(runs, || {
        let g = pipe.generate(&opts, &mut |_| Default::default())?;
        all.push(g.timings);
        Ok(())
    })?;
    let mut t = timing(load_s, times);
    // The stages of the run whose total is the median (warm-up excluded).
    let mut measured: Vec<_> = all.into_iter().skip(1).collect();
    measured.sort_by_key(|t| t.total());
    if let Some(mid) = measured.get(measured.len() / 2) {
        t.stages = mid
            .stages
            .iter()
            .map(|(s, d)| (s.name().to_string(), d.as_secs_f64()))
            .collect();
    }
    Ok(t)
}

/// Our dequantisation (rayon-parallel kernels) of the tensor named after its
/// type in the benchmark GGUF, into a reused f32 buffer.
fn worker_dequant(model: &Path, type_name: &str, runs: usize) -> Result<Timing> {
    use lumina2_loader::gguf::{dequantize_into, GgufFile};
    let t0 = Instant::now();
    let f = GgufFile::open(model)?;
    let info = f.tensor_info(type_name)?.clone();
    let bytes = f.tensor_data(type_name)?;
    let mut out = vec![0f32; usize::try_from(info.n_elements)?];
    let load_s = t0.elapsed().as_secs_f64();
    let times = time_runs(runs, || {
        dequantize_into(info.ggml_type, bytes, &mut out)?;
        Ok(())
    })?;
    Ok(timing(load_s, times))
}

fn run_json(cmd: &mut Command) -> Result<Timing> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("{cmd:?} printed no JSON:\n{stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

/// Runs the benchmarks and prints the table.
pub fn bench(opts: &BenchOptions) -> Result<Vec<BenchRow>> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let python = pyenv::ensure_venv()?;
    let mut rows = Vec::new();
    for what in &opts.what {
        match what.as_str() {
            "transformer" => bench_transformer(opts, &python, &mut rows)?,
            "text_encoder" => bench_text_encoder(opts, &python, &mut rows)?,
            "vae" => bench_vae(opts, &python, &mut rows)?,
            "gguf" => bench_transformer_gguf(opts, &python, &mut rows)?,
            "pipeline" => bench_pipeline(opts, &python, &mut rows)?,
            "dequant" => bench_dequant(opts, &python, &mut rows)?,
            other => bail!(
                "unknown benchmark `{other}` (transformer, text_encoder, vae, gguf, pipeline, dequant)"
            ),
        }
    }
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(rows)
}

/// One measurement pair: our worker, then PyTorch's.
fn measure(
    opts: &BenchOptions,
    python: &Path,
    kind: &str,
    model: &Path,
    inputs: &Path,
    dtype: &str,
) -> Result<(Timing, Option<Timing>)> {
    let worker_py = pyenv::scripts_dir().join("bench_worker.py");
    let runs = opts.runs.to_string();
    eprintln!("bench: {kind} {} {dtype}: ours", inputs.display());
    let ours = run_json(
        Command::new(std::env::current_exe()?)
            .args(["bench-worker", "--kind", kind])
            .arg("--model")
            .arg(model)
            .arg("--inputs")
            .arg(inputs)
            .args(["--dtype", dtype, "--runs", &runs])
            .args(opts.profile.then_some("--profile")),
    )?;
    let torch = if opts.skip_torch {
        None
    } else {
        eprintln!("bench: {kind} {} {dtype}: pytorch", inputs.display());
        Some(run_json(
            Command::new(python)
                .arg(&worker_py)
                .arg(kind)
                .arg("--model")
                .arg(model)
                .arg("--inputs")
                .arg(inputs)
                .args(["--dtype", torch_dtype(dtype), "--runs", &runs]),
        )?)
    };
    Ok((ours, torch))
}

fn bench_text_encoder(opts: &BenchOptions, python: &Path, rows: &mut Vec<BenchRow>) -> Result<()> {
    let dir = pyenv::workspace_root()
        .join("target")
        .join("bench")
        .join(format!("text-encoder-l{}", opts.text_layers));
    if !dir.join("inputs.safetensors").exists() {
        pyenv::run(
            Command::new(python)
                .arg(pyenv::scripts_dir().join("bench_worker.py"))
                .arg("setup-text-encoder")
                .arg("--out")
                .arg(&dir)
                .args(["--layers", &opts.text_layers.to_string()]),
        )?;
    }
    for dtype in opts.dtypes.iter().filter(|d| *d != "int8") {
        let (ours, torch) = measure(
            opts,
            python,
            "text_encoder",
            &dir.join("model"),
            &dir.join("inputs.safetensors"),
            dtype,
        )?;
        add_row(
            rows,
            format!("Gemma-2 encoder ({} layers), 256 tokens", opts.text_layers),
            0,
            dtype,
            (ours, torch),
        );
    }
    Ok(())
}

fn bench_vae(opts: &BenchOptions, python: &Path, rows: &mut Vec<BenchRow>) -> Result<()> {
    let dir = pyenv::workspace_root()
        .join("target")
        .join("bench")
        .join("vae");
    let sizes = opts.sizes_arg();
    let ready = opts
        .sizes
        .iter()
        .all(|s| dir.join(format!("inputs_{s}.safetensors")).exists());
    if !ready {
        pyenv::run(
            Command::new(python)
                .arg(pyenv::scripts_dir().join("bench_worker.py"))
                .arg("setup-vae")
                .arg("--out")
                .arg(&dir)
                .args(["--sizes", &sizes]),
        )?;
    }
    for &size in &opts.sizes {
        for (kind, what) in vae_kinds(size) {
            let inputs = dir.join(format!("inputs_{size}.safetensors"));
            for dtype in opts.dtypes.iter().filter(|d| *d != "int8") {
                let (ours, torch) =
                    measure(opts, python, &kind, &dir.join("model"), &inputs, dtype)?;
                add_row(rows, what.clone(), size, dtype, (ours, torch));
            }
        }
    }
    Ok(())
}

/// The GGUF Q4_0 transformer (original keys, as the community file) made from
/// the same random weights as the `transformer` benchmark: load time, forward
/// time and peak RSS, ours against diffusers' `from_single_file` with
/// `GGUFQuantizationConfig`.
fn bench_transformer_gguf(
    opts: &BenchOptions,
    python: &Path,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let dir = transformer_setup(opts, python)?;
    let gguf = dir.join("transformer-q4_0.gguf");
    if !gguf.exists() {
        pyenv::run(
            Command::new(python)
                .arg(pyenv::scripts_dir().join("bench_worker.py"))
                .arg("setup-gguf")
                .arg("--model")
                .arg(dir.join("model"))
                .arg("--out")
                .arg(&gguf),
        )?;
    }
    let what = format!(
        "transformer GGUF Q4_0 ({} layers + 2x{} refiner)",
        opts.layers, opts.refiner_layers
    );
    transformer_rows(opts, python, rows, ("transformer_gguf", &what), &gguf, &dir)
}

/// Measures `kind` on `model` with the benchmark inputs of `dir`, for every
/// size and dtype, one row each labelled `what`.
fn transformer_rows(
    opts: &BenchOptions,
    python: &Path,
    rows: &mut Vec<BenchRow>,
    (kind, what): (&str, &str),
    model: &Path,
    dir: &Path,
) -> Result<()> {
    for &size in &opts.sizes {
        for dtype in &opts.dtypes {
            let inputs = dir.join(format!("inputs_{size}.safetensors"));
            let (ours, torch) = measure(opts, python, kind, model, &inputs, dtype)?;
            add_row(rows, what.to_string(), size, dtype, (ours, torch));
        }
    }
    Ok(())
}

/// A whole generation (`--steps` steps, guidance 4, 512 px by default
/// `--sizes`) on a pipeline folder of real-dimension components with few
/// layers: `--layers` joint blocks and `--refiner-layers` per refiner,
/// `--text-layers` Gemma-2 layers (a small vocabulary and its tokenizer), the
/// Flux VAE. Both sides keep the components resident (ours loads them during
/// the warm-up run).
fn bench_pipeline(opts: &BenchOptions, python: &Path, rows: &mut Vec<BenchRow>) -> Result<()> {
    let dir = pyenv::workspace_root()
        .join("target")
        .join("bench")
        .join(format!(
            "pipeline-l{}-r{}-t{}",
            opts.layers, opts.refiner_layers, opts.text_layers
        ));
    if !dir.join("pipeline").join("model_index.json").exists() {
        eprintln!(
            "bench: writing a random-weight pipeline to {}",
            dir.display()
        );
        pyenv::run(
            Command::new(python)
                .arg(pyenv::scripts_dir().join("bench_worker.py"))
                .arg("setup-pipeline")
                .arg("--out")
                .arg(&dir)
                .args(["--layers", &opts.layers.to_string()])
                .args(["--refiner-layers", &opts.refiner_layers.to_string()])
                .args(["--text-layers", &opts.text_layers.to_string()]),
        )?;
    }
    for &size in &opts.sizes {
        let run = PipelineRun {
            prompt: "A photograph of a mountain lake at sunset, with reflections of the trees"
                .into(),
            size,
            steps: opts.steps,
            guidance_scale: 4.0,
            seed: 0,
            max_sequence_length: 256,
        };
        let inputs = dir.join(format!("run_{size}_{}.json", opts.steps));
        std::fs::write(&inputs, serde_json::to_string_pretty(&run)?)?;
        for dtype in &opts.dtypes {
            let (ours, torch) = measure(
                opts,
                python,
                "pipeline",
                &dir.join("pipeline"),
                &inputs,
                dtype,
            )?;
            add_row(rows, format!(
                    "pipeline, {} steps, guidance 4 (transformer {} layers + 2x{} refiner, Gemma-2 {} layers, Flux VAE)",
                    opts.steps, opts.layers, opts.refiner_layers, opts.text_layers
                ), size, dtype, (ours, torch));
            eprintln!("{}", format_stages(rows));
        }
    }
    Ok(())
}

/// The per-stage seconds of the rows that have stages.
pub fn format_stages(rows: &[BenchRow]) -> String {
    let mut s = String::new();
    for r in rows {
        for (side, t) in [("ours", &r.ours), ("PyTorch", &r.torch)] {
            if let Some(t) = t {
                if !t.stages.is_empty() {
                    let parts: Vec<String> = t
                        .stages
                        .iter()
                        .map(|(n, v)| format!("{n} {v:.2} s"))
                        .collect();
                    s.push_str(&format!(
                        "{} {}x{} {} {side}: {}\n",
                        r.what,
                        r.size,
                        r.size,
                        r.dtype,
                        parts.join(", ")
                    ));
                }
            }
        }
    }
    s
}

/// Dequantisation throughput per GGUF type: a 4096x4096 tensor of each type
/// gguf-py can dequantise, ours against gguf-py's numpy `dequantize`, as GB/s
/// of f32 output (in the row label; the times are per tensor).
fn bench_dequant(opts: &BenchOptions, python: &Path, rows: &mut Vec<BenchRow>) -> Result<()> {
    let dir = pyenv::workspace_root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("dequant.gguf");
    if !file.exists() {
        pyenv::run(
            Command::new(python)
                .arg(pyenv::scripts_dir().join("bench_worker.py"))
                .arg("setup-dequant")
                .arg("--out")
                .arg(&file),
        )?;
    }
    let types = [
        "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K",
    ];
    let out_gb = (4096.0 * 4096.0 * 4.0) / 1e9;
    for ty in types {
        let (ours, torch) = measure(opts, python, &format!("dequant:{ty}"), &file, &file, "f32")?;
        let gbs = |t: &Timing| out_gb / t.median_s;
        add_row(
            rows,
            format!(
                "dequantise {ty}, 4096x4096 (GB/s of f32 out: ours {:.2}, gguf-py {})",
                gbs(&ours),
                torch
                    .as_ref()
                    .map_or("-".into(), |t| format!("{:.2}", gbs(t)))
            ),
            0,
            ty,
            (ours, torch),
        );
    }
    Ok(())
}

/// Writes (once) the random-weight transformer and its inputs of the
/// transformer benchmarks; returns their folder.
fn transformer_setup(opts: &BenchOptions, python: &Path) -> Result<PathBuf> {
    let worker_py = pyenv::scripts_dir().join("bench_worker.py");
    let dir = pyenv::workspace_root()
        .join("target")
        .join("bench")
        .join(format!(
            "transformer-l{}-r{}",
            opts.layers, opts.refiner_layers
        ));
    let sizes = opts.sizes_arg();
    let ready = opts
        .sizes
        .iter()
        .all(|s| dir.join(format!("inputs_{s}.safetensors")).exists())
        && dir.join("model").join("config.json").exists();
    if !ready {
        eprintln!(
            "bench: writing random weights and inputs to {}",
            dir.display()
        );
        pyenv::run(
            Command::new(python)
                .arg(&worker_py)
                .arg("setup-transformer")
                .arg("--out")
                .arg(&dir)
                .args(["--layers", &opts.layers.to_string()])
                .args(["--refiner-layers", &opts.refiner_layers.to_string()])
                .args(["--sizes", &sizes]),
        )?;
    }
    Ok(dir)
}

fn bench_transformer(opts: &BenchOptions, python: &Path, rows: &mut Vec<BenchRow>) -> Result<()> {
    let dir = transformer_setup(opts, python)?;
    let what = format!(
        "transformer ({} layers + 2x{} refiner)",
        opts.layers, opts.refiner_layers
    );
    transformer_rows(
        opts,
        python,
        rows,
        ("transformer", &what),
        &dir.join("model"),
        &dir,
    )
}

fn secs(t: &Option<Timing>) -> String {
    t.as_ref()
        .map_or("-".into(), |t| format!("{:.3}", t.median_s))
}

fn rss(t: &Option<Timing>) -> String {
    t.as_ref()
        .map_or("-".into(), |t| format!("{:.0}", t.peak_rss_mb))
}

fn load(t: &Option<Timing>) -> String {
    t.as_ref()
        .map_or("-".into(), |t| format!("{:.1}", t.load_s))
}

/// The markdown table of the rows.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| what | size | dtype | ours (s) | PyTorch (s) | ours / PyTorch | ours peak RSS (MiB) | PyTorch peak RSS (MiB) | ours load (s) | PyTorch load (s) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let size = if r.size == 0 {
            "-".to_string()
        } else {
            format!("{}x{}", r.size, r.size)
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.what,
            size,
            r.dtype,
            secs(&r.ours),
            secs(&r.torch),
            r.ratio().map_or("-".into(), |x| format!("{x:.2}")),
            rss(&r.ours),
            rss(&r.torch),
            load(&r.ours),
            load(&r.torch),
        ));
    }
    s
}
