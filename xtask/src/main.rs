use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::parity::{self, RunOptions};
use xtask::{bench, bench_e2e, fuzz, load, openai, pyenv, server};

// Records the largest single allocation while `cargo xtask fuzz` runs.
#[global_allocator]
static ALLOC: fuzz::CountingAlloc = fuzz::CountingAlloc;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lumina2-rs developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare our outputs with PyTorch reference cases.
    Parity {
        /// Run the cases under this directory instead of generating ours.
        #[arg(long)]
        cases: Option<PathBuf>,
        /// Print `time: <case> <seconds>` (median of `--runs` runs after a warm-up).
        #[arg(long)]
        time: bool,
        /// Timed runs per case with `--time` (at least 3).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Regenerate our cases even when they exist.
        #[arg(long)]
        regenerate: bool,
        /// Only cases whose path contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Write our outputs under this directory (one `ours.safetensors` per case).
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Run only the transformer cases, with int8 linear layers, and
        /// report their error against the reference (rel_rms column) instead
        /// of judging it against the case's tolerance.
        #[arg(long)]
        int8: bool,
    },
    /// Time our transformer and PyTorch's side by side (same weights, same inputs).
    Bench {
        /// What to measure, comma separated: transformer, text_encoder, vae, gguf (the
        /// transformer as a Q4_0 GGUF: load time, forward time, peak RSS), pipeline (a
        /// whole generation with resident components, per-stage times), dequant (GGUF
        /// dequantisation against gguf-py), e2e (the whole `lumina2 generate` run at the
        /// real size against diffusers, loading included, one process per run).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "transformer,text_encoder"
        )]
        what: Vec<String>,
        /// The model of `e2e`: lumina2 (Lumina-Image 2.0) or zimage (Z-Image-Turbo).
        #[arg(long, default_value = "lumina2")]
        model: String,
        /// Text encoder layers of the benchmark models (Gemma-2: 26; Qwen3-4B: 36)
        /// [default: 4; e2e: 26; e2e zimage: 12].
        #[arg(long)]
        text_layers: Option<usize>,
        /// Main transformer blocks of the benchmark models (Lumina2: 26; Z-Image: 30)
        /// [default: 4; e2e: 26; e2e zimage: 8].
        #[arg(long)]
        layers: Option<usize>,
        /// Blocks per refiner (both real models have 2).
        #[arg(long, default_value_t = 2)]
        refiner_layers: usize,
        /// Square image sizes in pixels, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "512,1024")]
        sizes: Vec<usize>,
        /// Compute dtypes, comma separated (f32, bf16; int8: the transformer in
        /// bf16 with int8 attention and feed-forward layers, against PyTorch bf16;
        /// e2e zimage also q4_0: bf16 with the transformer from a GGUF Q4_0 file
        /// written once beside the pipeline, loaded by both sides).
        #[arg(long, value_delimiter = ',', default_value = "f32")]
        dtypes: Vec<String>,
        /// Timed runs per measurement, after one warm-up (e2e: pairs of runs, ours then
        /// PyTorch's, each a fresh process).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Denoising steps of the `pipeline` and `e2e` benchmarks [default: 4; e2e: 2;
        /// e2e zimage: 8, guidance 0].
        #[arg(long)]
        steps: Option<usize>,
        /// Also run one transformer forward of ours with per-op-group timing
        /// (linear layers, attention core, norms, RoPE, elementwise, copies).
        #[arg(long)]
        profile: bool,
        /// Only our side.
        #[arg(long)]
        skip_torch: bool,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Feed every parser of user files mutated inputs for a given time each
    /// (seeds: the committed fixtures and xtask/fuzz/seeds); fails on a panic,
    /// a slow input or an oversized allocation (inputs saved in target/fuzz/findings).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets, comma separated (gguf, safetensors, pth, lora,
        /// shard_index, configs, model_index, tokenizer, config_numbers, pickle,
        /// pth_zip, kohya_names).
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// Random seed of the mutations.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// An input that takes longer than this many seconds is a finding.
        #[arg(long, default_value_t = 10.0)]
        hang_seconds: f64,
        /// A single allocation larger than this many MiB is a finding.
        #[arg(long, default_value_t = 512)]
        alloc_mib: usize,
    },
    /// OpenAI's Python client against `lumina2 serve`: its image must equal `lumina2 generate`'s.
    Openai {
        /// The `lumina2` binary to use (default: a release build of lumina2-cli, built now).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Concurrent clients against `lumina2 serve` on the tiny pipeline.
    Load {
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Requests in total.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// The server's `--max-queue`.
        #[arg(long, default_value_t = 4)]
        max_queue: usize,
        /// `WIDTHxHEIGHT` of every request.
        #[arg(long, default_value = "48x32")]
        size: String,
        /// Denoising steps of every request.
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Requests timed one after another against as many `lumina2 generate` runs.
        #[arg(long, default_value_t = 5)]
        sequential: usize,
        /// The `lumina2` binary to use (default: a release build of lumina2-cli, built now).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// (internal) One measurement of our side, printed as JSON.
    #[command(hide = true)]
    BenchWorker {
        #[arg(long, default_value = "transformer")]
        kind: String,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        profile: bool,
    },
}

fn main() -> ExitCode {
    // As `lumina2` does: the benchmarks measure the binary's own policy.
    lumina2_kernels::memory::keep_freed_memory();
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    match Cli::parse().cmd {
        Cmd::Parity {
            cases,
            time,
            runs,
            regenerate,
            filter,
            dump,
            int8,
        } => {
            let dir = match cases {
                Some(d) => d,
                None => generate_cases(regenerate)?,
            };
            let opts = RunOptions {
                time_runs: if time { runs.max(3) } else { 0 },
                filter,
                dump,
                int8,
            };
            let (_, failed) = parity::run_dir(&dir, &opts)?;
            Ok(failed == 0)
        }
        Cmd::Bench {
            what,
            model,
            text_layers,
            layers,
            refiner_layers,
            sizes,
            dtypes,
            runs,
            steps,
            profile,
            skip_torch,
            json,
        } => {
            let (e2e, what): (Vec<String>, Vec<String>) =
                what.into_iter().partition(|w| w == "e2e");
            if e2e.is_empty() && model != "lumina2" {
                anyhow::bail!("--model {model} is an option of --what e2e only");
            }
            if !what.is_empty() {
                let rows = bench::bench(&bench::BenchOptions {
                    what,
                    text_layers: text_layers.unwrap_or(4),
                    layers: layers.unwrap_or(4),
                    refiner_layers,
                    sizes: sizes.clone(),
                    dtypes: dtypes.clone(),
                    runs,
                    steps: steps.unwrap_or(4),
                    profile,
                    skip_torch,
                    json: json.clone(),
                })?;
                println!("{}", bench::format_table(&rows));
                print!("{}", bench::format_stages(&rows));
            }
            if !e2e.is_empty() {
                let model = bench_e2e::E2eModel::parse(&model)?;
                let (default_text, default_layers, _) = model.default_depth();
                let rows = bench_e2e::bench_e2e(&bench_e2e::E2eOptions {
                    model,
                    text_layers: text_layers.unwrap_or(default_text),
                    layers: layers.unwrap_or(default_layers),
                    refiner_layers,
                    sizes,
                    dtypes,
                    runs,
                    steps,
                    skip_torch,
                })?;
                println!("{}", bench_e2e::format_e2e(&rows));
                if let Some(path) = &json {
                    bench_e2e::write_json(&rows, &path.with_extension("e2e.json"))?;
                }
            }
            Ok(true)
        }
        Cmd::Fuzz {
            seconds,
            targets,
            seed,
            hang_seconds,
            alloc_mib,
        } => {
            let reports = fuzz::fuzz(
                &pyenv::workspace_root(),
                &fuzz::FuzzOptions {
                    per_target: std::time::Duration::from_secs(seconds),
                    only: targets,
                    seed,
                    hang_limit: std::time::Duration::from_secs_f64(hang_seconds),
                    alloc_limit: alloc_mib << 20,
                },
            )?;
            println!("{}", fuzz::format_reports(&reports));
            Ok(reports
                .iter()
                .all(|r| r.panics == 0 && r.slow == 0 && r.big_allocs == 0))
        }
        Cmd::Openai { bin } => openai::openai(&server::lumina2_binary(bin)?),
        Cmd::Load {
            clients,
            requests,
            max_queue,
            size,
            steps,
            sequential,
            bin,
        } => {
            let bin = server::lumina2_binary(bin)?;
            let report = load::load(
                &bin,
                &load::LoadOptions {
                    clients: clients.max(1),
                    requests,
                    max_queue,
                    size,
                    steps,
                    sequential,
                },
            )?;
            println!("{}", load::format_report(&report));
            Ok(true)
        }
        Cmd::BenchWorker {
            kind,
            model,
            inputs,
            dtype,
            runs,
            profile,
        } => {
            let t = bench::worker(&kind, &model, &inputs, &dtype, runs.max(1), profile)?;
            println!("{}", serde_json::to_string(&t)?);
            Ok(true)
        }
    }
}

/// Writes our cases under `target/parity-cases` with the pinned environment.
fn generate_cases(regenerate: bool) -> Result<PathBuf> {
    let root = pyenv::workspace_root();
    let out = root.join("target").join("parity-cases");
    let scripts = pyenv::scripts_dir();
    // The cases are regenerated when a generator script is newer than the stamp.
    let stamp = out.join(".generated");
    // (openai_client.py is no generator: `cargo xtask openai` runs it.)
    let newest_script = std::fs::read_dir(&scripts)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "openai_client.py")
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    let stamp_time = std::fs::metadata(&stamp).and_then(|m| m.modified()).ok();
    let fresh = matches!((stamp_time, newest_script), (Some(s), Some(n)) if s >= n);
    if regenerate || !fresh {
        let python = pyenv::ensure_venv()?;
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        std::fs::create_dir_all(&out)?;
        eprintln!("xtask: writing reference cases to {}", out.display());
        pyenv::run(
            std::process::Command::new(python)
                .arg(scripts.join("generate.py"))
                .arg("--out")
                .arg(&out),
        )?;
        std::fs::write(&stamp, "")?;
    }
    Ok(out)
}
