//! The parity runner: finds cases in the format of `docs/parity-cases.md`
//! (read by `lumina2-parity`), runs our implementation on each and compares
//! with the PyTorch outputs.

mod gguf;
mod pipeline;
mod scheduler;
mod text_encoder;
mod tokenizer;
mod transformer;
mod vae;
mod zimage;
mod zimage_pipeline;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Result};
use candle_core::Tensor;

pub use lumina2_parity::{
    compare, find_cases, format_report, format_row, input, Case, Comparison, Row,
};

/// A case loaded and ready to run (model loading is not timed).
pub trait Prepared {
    /// Runs our computation, returning outputs by their `expected.safetensors` names.
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>>;
}

/// Loads a case's model and inputs for its component.
///
/// With `int8`, the transformer's linear layers are quantised to int8
/// (`Weights::with_int8_linears`); other components ignore it.
pub fn prepare(case: &Case, int8: bool) -> Result<Box<dyn Prepared>> {
    match case.component.as_str() {
        "transformer" => transformer::prepare(case, int8),
        "gguf_dequant" => gguf::prepare(case),
        "gguf_quantize" => gguf::prepare_quantize(case),
        "scheduler" => scheduler::prepare(case),
        "vae_decode" | "vae_encode" => vae::prepare(case),
        "text_encoder" => text_encoder::prepare_text_encoder(case),
        "qwen3_text_encoder" => text_encoder::prepare_qwen3(case),
        "prompt_encoding" => text_encoder::prepare_prompt_encoding(case),
        "tokenizer_ids" => tokenizer::prepare(case),
        "chat_tokenizer" => tokenizer::prepare_chat(case),
        "pipeline" => pipeline::prepare(case),
        "zimage_transformer" => zimage::prepare(case),
        "zimage_pipeline" => zimage_pipeline::prepare(case),
        other => Err(anyhow!("unknown component `{other}`")),
    }
}

/// Outcome of one case: its rows and, with timing, the median run time.
pub struct CaseResult {
    /// Report rows.
    pub rows: Vec<Row>,
    /// Median seconds of our computation, when timed.
    pub seconds: Option<f64>,
}

/// Runs one case; never fails: a case that cannot run is a failed row.
pub fn run_case(case: &Case, rel: &str, opts: &RunOptions) -> CaseResult {
    match run_case_inner(case, rel, opts) {
        Ok(r) => r,
        Err(e) => CaseResult {
            rows: vec![Row::failed(
                rel,
                &case.component,
                "-",
                "-".into(),
                format!("{e:#}"),
            )],
            seconds: None,
        },
    }
}

fn run_case_inner(case: &Case, rel: &str, opts: &RunOptions) -> Result<CaseResult> {
    let time_runs = opts.time_runs;
    let expected = case.expected()?;
    let mut prepared = prepare(case, opts.int8)?;
    let mut outputs = prepared.run()?;
    let mut seconds = None;
    if time_runs > 0 {
        let mut times = Vec::with_capacity(time_runs);
        for _ in 0..time_runs {
            let t0 = Instant::now();
            outputs = prepared.run()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        seconds = Some(times[times.len() / 2]);
    }
    if let Some(dump) = &opts.dump {
        let dir = dump.join(rel);
        std::fs::create_dir_all(&dir)?;
        candle_core::safetensors::save(
            &outputs.clone().into_iter().collect(),
            dir.join("ours.safetensors"),
        )?;
    }
    let mut rows = Vec::new();
    for (name, exp) in &expected {
        let row = match outputs.get(name) {
            None => Row::failed(
                rel,
                &case.component,
                name,
                format!("{:?}", exp.dims()),
                "our implementation produced no such output".into(),
            ),
            Some(ours) => match compare(ours, exp, case.tolerance.atol, case.tolerance.rtol) {
                Ok(c) => {
                    let mut row = Row::compared(rel, &case.component, name, exp.dims(), &c);
                    // int8 outputs are reported, not judged against the
                    // case's (f32 / bf16) tolerance; they must be finite.
                    if opts.int8 {
                        row.pass = c.rel_rms.is_finite();
                    }
                    row
                }
                Err(e) => Row::failed(
                    rel,
                    &case.component,
                    name,
                    format!("{:?}", exp.dims()),
                    format!("{e:#}"),
                ),
            },
        };
        rows.push(row);
    }
    Ok(CaseResult { rows, seconds })
}

/// Options of a parity run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Number of timed runs per case (0: no timing).
    pub time_runs: usize,
    /// Only cases whose relative path contains this.
    pub filter: Option<String>,
    /// Write our outputs to `<dump>/<case path>/ours.safetensors`.
    pub dump: Option<PathBuf>,
    /// Run only the transformer cases, with int8 linear layers, and report
    /// their error instead of judging it (a row fails only when the output
    /// is not finite or the case cannot run).
    pub int8: bool,
}

/// Runs every case under `dir` and prints the report. Returns (passed, failed).
pub fn run_dir(dir: &Path, opts: &RunOptions) -> Result<(usize, usize)> {
    let cases = find_cases(dir)?;
    if cases.is_empty() {
        return Err(anyhow!(
            "no case (a folder with case.json) under {}",
            dir.display()
        ));
    }
    let mut rows = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    for path in &cases {
        let rel = rel_path(dir, path);
        if let Some(f) = &opts.filter {
            if !rel.contains(f.as_str()) {
                continue;
            }
        }
        let result = match Case::load(path) {
            Ok(case) if opts.int8 && case.component != "transformer" => continue,
            Ok(case) => run_case(&case, &rel, opts),
            Err(e) => CaseResult {
                rows: vec![Row::failed(&rel, "?", "-", "-".into(), format!("{e:#}"))],
                seconds: None,
            },
        };
        if result.rows.iter().all(|r| r.pass) {
            passed += 1;
        } else {
            failed += 1;
        }
        for r in &result.rows {
            eprintln!("{}", format_row(r));
        }
        if let Some(s) = result.seconds {
            println!("time: {rel} {s:.6}");
        }
        rows.extend(result.rows);
    }
    if opts.int8 {
        println!(
            "int8 linear layers ({} kernel): errors against the PyTorch reference of each case's dtype",
            lumina2_kernels::gemm::int8::kernel_name()
        );
    }
    println!("{}", format_report(&rows));
    println!("{passed} passed, {failed} failed");
    Ok((passed, failed))
}

fn rel_path(root: &Path, p: &Path) -> String {
    let rel: PathBuf = p
        .strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf());
    let s = rel.display().to_string();
    if s.is_empty() {
        ".".into()
    } else {
        s
    }
}
