//! `lumina2 generate --from-file`: one request per line of a JSON Lines
//! file, all on one pipeline loaded once and kept resident.
//!
//! Each line is a JSON object whose fields override the command line's
//! options for that line (OpenAI's images API names and diffusers' names);
//! the line is then checked and rendered exactly as `lumina2 generate` with
//! those options, so its PNG is the one `generate` writes. A bad line is
//! reported and the others go on; `--shard I/N` keeps the lines whose index
//! is I modulo N, so N workers cover a file once; `--manifest` records each
//! image as it is written; `--skip-existing` resumes a killed run.
//!
//! The same runner serves every pipeline ([`BatchPipeline`]): a Z-Image
//! folder's lines are Z-Image requests, checked and rendered as
//! `lumina2 generate --model <Z-Image folder>` does.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use lumina2_pipeline::{LoraSpec, StageTimings};
use serde_json::{json, Map, Value};

use crate::generate::{
    self, options_named, parse_loras, prepare_output, random_seed, set_threads, usage,
    GenerateArgs, GuidanceArg, Model, Rendered, SamplerArg,
};
use crate::signals;

/// The largest prompts file: a million short requests.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The longest line: room for a prompt, a negative prompt and a system
/// prompt at their limit of 1 MiB each, with JSON escapes.
const MAX_LINE_BYTES: usize = 4 << 20;

/// The fields a line may hold.
const FIELDS: &str = "prompt, n, size, negative_prompt, seed, num_inference_steps, \
guidance_scale, cfg_trunc_ratio, cfg_normalization, renorm_cfg, cache_threshold, system_prompt, sampler, \
guidance_mode, output";

/// Options of a batch run (with `lumina2 generate`'s other options as the
/// defaults of every line).
#[derive(Args, Clone)]
pub struct BatchArgs {
    /// Generate the requests of a JSON Lines file, one object per line
    /// (fields: prompt, n, size, negative_prompt, seed, num_inference_steps,
    /// guidance_scale, cfg_trunc_ratio, cfg_normalization, renorm_cfg,
    /// cache_threshold, system_prompt, sampler, guidance_mode, output); the
    /// other options are each line's
    /// defaults, and `-o` names the images, `{line}` the line's index (else
    /// `_{line}` goes before the extension).
    #[arg(long, value_name = "FILE")]
    pub(crate) from_file: Option<PathBuf>,
    /// Only the lines whose 0-based index is I modulo N (worker I of N).
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    pub(crate) shard: Option<Shard>,
    /// Append one JSON line per image (line, output, seed, timings in
    /// seconds, and with TeaCache the calls it skipped) or per failed line
    /// (its error) to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) manifest: Option<PathBuf>,
    /// Skip the lines whose images all exist already (to resume a run).
    #[arg(long)]
    pub(crate) skip_existing: bool,
}

impl BatchArgs {
    /// Refuses the batch options without `--from-file` (which they qualify).
    pub(crate) fn check_need_file(&self) -> Result<()> {
        if self.from_file.is_none()
            && (self.shard.is_some() || self.manifest.is_some() || self.skip_existing)
        {
            bail!("--shard, --manifest and --skip-existing go with --from-file");
        }
        Ok(())
    }
}

/// Worker `index` of `count`: the lines whose index is `index` modulo `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    fn takes(self, line: usize) -> bool {
        line % self.count == self.index
    }
}

fn parse_shard(s: &str) -> std::result::Result<Shard, String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not I/N (e.g. 0/4)"))?;
    let number = |t: &str, what: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}`: {what} `{t}` is not a whole number"))
    };
    let (index, count) = (number(i, "I")?, number(n, "N")?);
    if count == 0 {
        return Err(format!("`{s}`: N must be at least 1"));
    }
    if index >= count {
        return Err(format!(
            "`{s}`: I must be less than N (shards are numbered 0 to {})",
            count - 1
        ));
    }
    Ok(Shard { index, count })
}

/// `pattern` with `{line}` replaced by the line's index; without `{line}`,
/// `_{line}` goes before the extension, so lines never share a name.
fn line_pattern(pattern: &str, line: usize) -> String {
    if pattern.contains("{line}") {
        return pattern.replace("{line}", &line.to_string());
    }
    let path = Path::new(pattern);
    let (Some(name), Some(stem)) = (path.file_name(), path.file_stem()) else {
        return format!("{pattern}_{line}");
    };
    let name = name.to_string_lossy();
    let stem = stem.to_string_lossy();
    let ext = &name[stem.len()..];
    path.with_file_name(format!("{stem}_{line}{ext}"))
        .to_string_lossy()
        .into_owned()
}

fn text<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| anyhow!("`{key}` must be a string, not {}", kind(v)))
}

fn whole(key: &str, v: &Value) -> Result<u64> {
    v.as_u64().ok_or_else(|| {
        anyhow!(
            "`{key}` must be a whole number from 0 to {}, not {v}",
            u64::MAX
        )
    })
}

pub(crate) fn count(key: &str, v: &Value) -> Result<usize> {
    let n = whole(key, v)?;
    usize::try_from(n).map_err(|_| anyhow!("`{key}`: {n} is too large"))
}

fn number(key: &str, v: &Value) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| anyhow!("`{key}` must be a number, not {}", kind(v)))
}

fn boolean(key: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| anyhow!("`{key}` must be true or false, not {}", kind(v)))
}

fn choice<T: ValueEnum>(key: &str, v: &Value) -> Result<T> {
    let s = text(key, v)?;
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|c| c.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        anyhow!("`{key}`: unknown value `{s}` ({})", names.join(", "))
    })
}

/// `"WIDTHxHEIGHT"`.
fn size(v: &Value) -> Result<(usize, usize)> {
    let s = text("size", v)?;
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| anyhow!("`size` must be \"WIDTHxHEIGHT\", not \"{s}\""))?;
    let side = |t: &str| {
        t.parse::<usize>()
            .map_err(|_| anyhow!("`size` must be \"WIDTHxHEIGHT\", not \"{s}\""))
    };
    Ok((side(w)?, side(h)?))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Puts a request field into the options; false for a field it does not know.
type ApplyField = fn(&mut GenerateArgs, &str, &Value) -> Result<bool>;

/// [`line_args_with`] with Lumina2's fields.
#[cfg(test)]
fn line_args(raw: &[u8], line: usize, defaults: &GenerateArgs) -> Result<GenerateArgs> {
    line_args_with(raw, line, defaults, apply_field)
}

/// The options of one line: `defaults` (the command line) with the line's
/// fields put in by `apply` (the pipeline's). A `null` field is an absent one.
fn line_args_with(
    raw: &[u8],
    line: usize,
    defaults: &GenerateArgs,
    apply: ApplyField,
) -> Result<GenerateArgs> {
    if raw.len() > MAX_LINE_BYTES {
        bail!(
            "{} bytes, more than the {} MiB a line may hold",
            raw.len(),
            MAX_LINE_BYTES >> 20
        );
    }
    let s = std::str::from_utf8(raw).map_err(|e| anyhow!("not UTF-8 text: {e}"))?;
    let value: Value = serde_json::from_str(s).map_err(|e| anyhow!("not JSON: {e}"))?;
    let Value::Object(fields) = value else {
        bail!("a line must be a JSON object, not {}", kind(&value));
    };
    let mut a = defaults.clone();
    let mut output = line_pattern(&defaults.output, line);
    let mut prompt = false;
    for (key, v) in fields.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "output" => output = text(key, v)?.replace("{line}", &line.to_string()),
            // A server job's field: a batch line has no one watching it.
            "preview_every" => bail!(
                "`preview_every` is a field of `lumina2 serve` jobs, not of batch lines \
                 (previews are watched live; for one run use `lumina2 generate --preview`)"
            ),
            other => {
                if !apply(&mut a, other, v)? {
                    bail!("unknown field `{other}` (the fields are {FIELDS})");
                }
                prompt |= other == "prompt";
            }
        }
    }
    if !prompt {
        bail!("no `prompt` (a string)");
    }
    a.output = output;
    Ok(a)
}

/// Puts the request field `key` (OpenAI's images API names and diffusers'
/// names) into `a`; false for a field it does not know.
pub(crate) fn apply_field(a: &mut GenerateArgs, key: &str, v: &Value) -> Result<bool> {
    match key {
        "prompt" => a.prompt = vec![text(key, v)?.to_string()],
        "n" => a.num_images_per_prompt = count(key, v)?,
        "size" => (a.width, a.height) = size(v).map(|(w, h)| (Some(w), Some(h)))?,
        "negative_prompt" => a.negative_prompt = vec![text(key, v)?.to_string()],
        "seed" => a.seed = Some(whole(key, v)?),
        "num_inference_steps" => a.num_inference_steps = Some(count(key, v)?),
        "guidance_scale" => a.guidance_scale = Some(number(key, v)?),
        "cfg_trunc_ratio" => a.cfg_trunc_ratio = number(key, v)?,
        "cfg_normalization" => a.no_cfg_normalization = !boolean(key, v)?,
        "renorm_cfg" => a.renorm_cfg = number(key, v)?,
        "cache_threshold" => a.cache_threshold = Some(number(key, v)?),
        "system_prompt" => {
            a.system_prompt = Some(text(key, v)?.to_string());
            a.system_preset = None;
        }
        "sampler" => a.sampler = choice::<SamplerArg>(key, v)?,
        "guidance_mode" => a.guidance_mode = choice::<GuidanceArg>(key, v)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// The line's field for an option of the library; the options a line
/// cannot set are the command line's.
pub(crate) fn field_name(option: &str) -> String {
    match option {
        "width" | "height" => format!("`size` ({option})"),
        "num_images_per_prompt" => "`n`".to_string(),
        "num_inference_steps"
        | "guidance_scale"
        | "cfg_trunc_ratio"
        | "system_prompt"
        | "negative_prompt"
        | "cache_threshold"
        | "preview_every"
        | "cfg_normalization"
        | "cfg_truncation"
        | "prompt" => format!("`{option}`"),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// What a batch needs of a pipeline: a request's options from the command
/// line (and a line), its images' seeds and paths, the model loaded once
/// and kept resident, and one request rendered and written.
pub(crate) trait BatchPipeline {
    /// The options of one request.
    type Options;
    /// The loaded pipeline.
    type Model;
    /// Puts a line's field into the options (false for a field it does not
    /// know): the shared [`apply_field`] unless the pipeline reads a field
    /// its own way.
    fn apply_field(a: &mut GenerateArgs, key: &str, v: &Value) -> Result<bool> {
        apply_field(a, key, v)
    }
    /// The request of `args`, each image `i` on seed `seed + i`; `name`
    /// spells the library's option names in errors.
    fn options(args: &GenerateArgs, seed: u64, name: fn(&str) -> String) -> Result<Self::Options>;
    /// The seed of each image.
    fn seeds(opts: &Self::Options) -> &[u64];
    /// The image files of a request: `pattern` (`-o`) expanded for each image.
    fn output_paths(pattern: &str, opts: &Self::Options) -> Vec<PathBuf>;
    /// Loads the pipeline, every component kept resident.
    fn load(args: &GenerateArgs, loras: Vec<LoraSpec>, quiet: bool) -> Result<Self::Model>;
    /// Renders one request and writes its images.
    fn render(
        model: &mut Self::Model,
        args: &GenerateArgs,
        opts: &Self::Options,
        outputs: &[PathBuf],
        quiet: bool,
    ) -> Result<Rendered>;
}

/// Lumina2 (`Lumina2Pipeline`).
struct Lumina2;

impl BatchPipeline for Lumina2 {
    type Options = lumina2_pipeline::GenerateOptions;
    type Model = Model;
    fn options(args: &GenerateArgs, seed: u64, name: fn(&str) -> String) -> Result<Self::Options> {
        options_named(args, seed, name)
    }
    fn seeds(opts: &Self::Options) -> &[u64] {
        noise_seeds(&opts.noise)
    }
    fn output_paths(pattern: &str, opts: &Self::Options) -> Vec<PathBuf> {
        generate::output_paths(pattern, opts)
    }
    fn load(args: &GenerateArgs, loras: Vec<LoraSpec>, quiet: bool) -> Result<Self::Model> {
        generate::load(args, loras, true, quiet)
    }
    fn render(
        model: &mut Self::Model,
        args: &GenerateArgs,
        opts: &Self::Options,
        outputs: &[PathBuf],
        quiet: bool,
    ) -> Result<Rendered> {
        generate::render(model, args, opts, outputs, quiet)
    }
}

/// Z-Image (`ZImagePipeline`).
struct ZImage;

impl BatchPipeline for ZImage {
    type Options = lumina2_pipeline::ZImageOptions;
    type Model = crate::zimage::ZModel;
    /// diffusers' `ZImagePipeline` fields: `cfg_normalization` true or
    /// false (1 or 0), or the factor; `cfg_truncation`. The others are shared.
    fn apply_field(a: &mut GenerateArgs, key: &str, v: &Value) -> Result<bool> {
        match key {
            "cfg_normalization" => {
                a.cfg_normalization = Some(match v {
                    Value::Bool(b) => f64::from(u8::from(*b)),
                    _ => number(key, v)?,
                })
            }
            "cfg_truncation" => a.cfg_truncation = Some(number(key, v)?),
            _ => return apply_field(a, key, v),
        }
        Ok(true)
    }
    fn options(args: &GenerateArgs, seed: u64, name: fn(&str) -> String) -> Result<Self::Options> {
        crate::zimage::options_named(args, seed, name)
    }
    fn seeds(opts: &Self::Options) -> &[u64] {
        noise_seeds(&opts.noise)
    }
    fn output_paths(pattern: &str, opts: &Self::Options) -> Vec<PathBuf> {
        crate::zimage::output_paths(pattern, opts)
    }
    fn load(args: &GenerateArgs, loras: Vec<LoraSpec>, quiet: bool) -> Result<Self::Model> {
        crate::zimage::load(args, loras, true, quiet)
    }
    fn render(
        model: &mut Self::Model,
        args: &GenerateArgs,
        opts: &Self::Options,
        outputs: &[PathBuf],
        quiet: bool,
    ) -> Result<Rendered> {
        crate::zimage::render(model, args, opts, outputs, quiet)
    }
}

/// The per-image seeds the options hold.
fn noise_seeds(noise: &lumina2_pipeline::Noise) -> &[u64] {
    match noise {
        lumina2_pipeline::Noise::Seeds(s) => s,
        _ => &[],
    }
}

/// An option of the library as the command line spells it.
fn flag_name(option: &str) -> String {
    format!("--{}", option.replace('_', "-"))
}

/// One line, checked: its options, the seed of its first image, its images' paths.
struct Job<O> {
    args: GenerateArgs,
    opts: O,
    outputs: Vec<PathBuf>,
}

fn job<P: BatchPipeline>(
    raw: &[u8],
    line: usize,
    defaults: &GenerateArgs,
) -> Result<Job<P::Options>> {
    let args = line_args_with(raw, line, defaults, P::apply_field)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    let opts = P::options(&args, seed, field_name)?;
    let outputs = P::output_paths(&args.output, &opts);
    Ok(Job {
        args,
        opts,
        outputs,
    })
}

/// The file's non-blank lines with their indices (a trailing `\r` and a
/// leading byte order mark removed).
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(line, raw)| {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            // A byte order mark some editors put first is not part of the JSON.
            let raw = match line {
                0 => raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw),
                _ => raw,
            };
            (line, raw)
        })
        .filter(|(_, raw)| !raw.iter().all(u8::is_ascii_whitespace))
}

/// The first line (in file order, every shard's lines included) that writes
/// each output path. Every shard computes the same map, so two lines naming
/// one file are caught whichever shards they fall in: the later line fails
/// and the earlier one is rendered once. A line without a seed draws a
/// random one: its paths that hold the seed cannot be known in advance and
/// are left out (those that do not, are kept).
fn first_claims<P: BatchPipeline>(
    bytes: &[u8],
    defaults: &GenerateArgs,
) -> HashMap<PathBuf, usize> {
    let paths = |args: &GenerateArgs, seed: u64| {
        P::options(args, seed, field_name)
            .map(|opts| P::output_paths(&args.output, &opts))
            .unwrap_or_default()
    };
    let mut first = HashMap::new();
    for (line, raw) in lines(bytes) {
        let Ok(args) = line_args_with(raw, line, defaults, P::apply_field) else {
            continue;
        };
        let known = match args.seed {
            Some(seed) => paths(&args, seed),
            None => {
                let other = paths(&args, 1);
                let mut v = paths(&args, 0);
                v.retain(|p| other.contains(p));
                v
            }
        };
        for p in known {
            first.entry(p).or_insert(line);
        }
    }
    first
}

/// The manifest: JSON lines appended and flushed one by one.
struct Manifest {
    file: File,
    path: PathBuf,
}

impl Manifest {
    fn open(path: &Path) -> Result<Self> {
        // The rule of the outputs: a new path or a regular file.
        crate::output::check_writable(path).context("--manifest")?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--manifest: cannot open {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    fn record(&mut self, entry: Value) -> Result<()> {
        let mut line = entry.to_string();
        line.push('\n');
        // One write per entry: shards sharing a manifest do not interleave.
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing the manifest {}", self.path.display()))
    }
}

fn record(manifest: &mut Option<Manifest>, entry: Value) -> Result<()> {
    match manifest {
        Some(m) => m.record(entry),
        None => Ok(()),
    }
}

/// Stage times in seconds, and their total.
fn timings_json(t: &StageTimings) -> Value {
    let mut m = Map::new();
    for (stage, d) in &t.stages {
        m.insert(stage.name().replace(' ', "_"), json!(d.as_secs_f64()));
    }
    m.insert("total".into(), json!(t.total().as_secs_f64()));
    Value::Object(m)
}

/// One manifest entry per image of `job`.
fn image_entries<P: BatchPipeline>(job: &Job<P::Options>, line: usize, status: &str) -> Vec<Value> {
    let seeds = P::seeds(&job.opts);
    job.outputs
        .iter()
        .zip(seeds)
        .map(|(p, s)| {
            json!({
                "line": line,
                "status": status,
                "output": p.to_string_lossy(),
                "seed": s,
            })
        })
        .collect()
}

/// `lumina2 generate --from-file` on a Lumina2 model.
pub fn run(args: GenerateArgs, quiet: bool) -> Result<()> {
    run_with::<Lumina2>(args, quiet)
}

/// `lumina2 generate --from-file` on a Z-Image pipeline folder.
pub(crate) fn run_zimage(args: GenerateArgs, quiet: bool) -> Result<()> {
    run_with::<ZImage>(args, quiet)
}

fn run_with<P: BatchPipeline>(args: GenerateArgs, quiet: bool) -> Result<()> {
    let batch = args.batch.clone();
    let Some(file) = batch.from_file.as_deref() else {
        bail!("--from-file is missing");
    };
    let shard = batch.shard.unwrap_or(Shard { index: 0, count: 1 });
    // The command line's options are every line's defaults: checked before
    // anything is read or loaded, as `generate` checks them.
    let mut probe = args.clone();
    probe.prompt = vec![String::new()];
    usage(P::options(&probe, args.seed.unwrap_or(0), flag_name))?;
    let loras = usage(parse_loras(&args))?;
    usage(set_threads(args.threads))?;
    // The device too: a build or machine without it fails now, not at the
    // first line.
    usage(generate::parse_device(&args.device))?;
    let bytes = lumina2_weights::fs::read_bounded(file, MAX_FILE_BYTES)
        .with_context(|| format!("--from-file {}", file.display()))?;
    let mut manifest = batch.manifest.as_deref().map(Manifest::open).transpose()?;

    let claimed = first_claims::<P>(&bytes, &args);
    let mut model: Option<P::Model> = None;
    let (mut done, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    for (line, raw) in lines(&bytes) {
        if !shard.takes(line) {
            continue;
        }
        signals::check(|| format!(" before line {line}"))?;
        let place = format!("line {line} ({}:{})", file.display(), line + 1);
        let result = (|| -> Result<Option<StageTimings>> {
            let job = job::<P>(raw, line, &args)?;
            if batch.skip_existing && job.outputs.iter().all(|p| p.is_file()) {
                for e in image_entries::<P>(&job, line, "skipped") {
                    record(&mut manifest, e)?;
                }
                return Ok(None);
            }
            for p in &job.outputs {
                match claimed.get(p) {
                    Some(&first) if first != line => {
                        bail!("output {} is also line {first}'s", p.display())
                    }
                    _ => prepare_output(p)?,
                }
            }
            let m = match &mut model {
                Some(m) => m,
                // A load failure ends the run: no line could be rendered.
                None => model.insert(load_model::<P>(&args, &loras, quiet).map_err(Fatal)?),
            };
            let r = P::render(m, &job.args, &job.opts, &job.outputs, quiet)?;
            let times = timings_json(&r.timings);
            for mut e in image_entries::<P>(&job, line, "ok") {
                e["timings"] = times.clone();
                if let Some((skipped, calls)) = r.cache {
                    // The run's (all its images are one batch).
                    e["cache"] = json!({"skipped": skipped, "calls": calls});
                }
                record(&mut manifest, e)?;
            }
            Ok(Some(r.timings))
        })();
        match result {
            Ok(Some(_)) => done += 1,
            Ok(None) => skipped += 1,
            Err(e) => {
                let e = match e.downcast::<Fatal>() {
                    Ok(Fatal(e)) => return Err(e),
                    Err(e) => e,
                };
                let interrupted = e.downcast_ref::<signals::Interrupted>().is_some();
                let msg = crate::error_chain(&e);
                record(
                    &mut manifest,
                    json!({
                        "line": line,
                        "status": if interrupted { "interrupted" } else { "error" },
                        "error": msg,
                    }),
                )?;
                if interrupted {
                    return Err(e);
                }
                eprintln!("lumina2: {place}: error: {msg}");
                failed += 1;
            }
        }
    }
    if !quiet {
        eprintln!(
            "{}: {done} line(s) generated, {failed} failed, {skipped} skipped (images exist)",
            file.display()
        );
    }
    if failed > 0 {
        bail!("{failed} line(s) of {} failed", file.display());
    }
    Ok(())
}

/// An error that ends the whole run rather than one line.
#[derive(Debug)]
struct Fatal(anyhow::Error);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", crate::error_chain(&self.0))
    }
}

impl std::error::Error for Fatal {}

fn load_model<P: BatchPipeline>(
    args: &GenerateArgs,
    loras: &[LoraSpec],
    quiet: bool,
) -> Result<P::Model> {
    // The signals of `lumina2 generate` (see `signals`).
    signals::install()?;
    P::load(args, loras.to_vec(), quiet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn defaults(extra: &[&str]) -> GenerateArgs {
        let mut argv = vec!["lumina2", "--from-file", "p.jsonl"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    #[test]
    fn shards_are_i_of_n() {
        assert_eq!(parse_shard("2/3"), Ok(Shard { index: 2, count: 3 }));
        assert_eq!(parse_shard("0/1"), Ok(Shard { index: 0, count: 1 }));
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2", "1/", "/2", "1/2/3"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
        let s = Shard { index: 1, count: 3 };
        let taken: Vec<usize> = (0..8).filter(|&l| s.takes(l)).collect();
        assert_eq!(taken, vec![1, 4, 7]);
    }

    #[test]
    fn the_line_goes_into_the_output_name() {
        assert_eq!(line_pattern("out/x_{line}.png", 7), "out/x_7.png");
        assert_eq!(line_pattern("out/x.png", 7), "out/x_7.png");
        assert_eq!(
            line_pattern("lumina2_{seed}.png", 3),
            "lumina2_{seed}_3.png"
        );
        assert_eq!(line_pattern("out/x", 2), "out/x_2");
        assert_eq!(line_pattern("out/a.b.png", 2), "out/a.b_2.png");
    }

    #[test]
    fn fields_override_the_command_line() {
        let d = defaults(&["--steps", "4", "--seed", "5", "--system-preset", "real"]);
        let a = line_args(
            br#"{"prompt": "p", "n": 2, "size": "64x32", "negative_prompt": "n", "num_inference_steps": 9, "guidance_scale": 2.5, "cfg_trunc_ratio": 0.25, "cfg_normalization": false, "system_prompt": "s", "sampler": "midpoint", "guidance_mode": "original", "output": "o{line}.png"}"#,
            3,
            &d,
        )
        .unwrap();
        assert_eq!(a.prompt, vec!["p"]);
        assert_eq!(a.num_images_per_prompt, 2);
        assert_eq!((a.width, a.height), (Some(64), Some(32)));
        assert_eq!(a.negative_prompt, vec!["n"]);
        assert_eq!(a.num_inference_steps, Some(9));
        assert_eq!(a.guidance_scale, Some(2.5));
        assert_eq!(a.cfg_trunc_ratio, 0.25);
        assert!(a.no_cfg_normalization);
        assert_eq!(a.system_prompt.as_deref(), Some("s"));
        assert_eq!(a.system_preset, None);
        assert!(matches!(a.sampler, SamplerArg::Midpoint));
        assert!(matches!(a.guidance_mode, GuidanceArg::Original));
        assert_eq!(a.output, "o3.png");
        assert_eq!(a.seed, Some(5));

        // Absent and null fields keep the command line's values.
        let a = line_args(br#"{"prompt": "p", "seed": null}"#, 0, &d).unwrap();
        assert_eq!(a.num_inference_steps, Some(4));
        assert_eq!(a.seed, Some(5));
        assert_eq!(a.system_preset.as_deref(), Some("real"));
        assert_eq!(a.output, "lumina2_{seed}_0.png");
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let d = defaults(&[]);
        for (line, needle) in [
            (
                &br#"{"prompt": 1}"#[..],
                "`prompt` must be a string, not a number",
            ),
            (br#"{"prompt": "p", "n": -1}"#, "`n` must be a whole number"),
            (
                br#"{"prompt": "p", "n": 1.5}"#,
                "`n` must be a whole number",
            ),
            (br#"{"prompt": "p", "size": "64"}"#, "WIDTHxHEIGHT"),
            (br#"{"prompt": "p", "size": "axb"}"#, "WIDTHxHEIGHT"),
            (
                br#"{"prompt": "p", "guidance_scale": "4"}"#,
                "must be a number",
            ),
            (
                br#"{"prompt": "p", "cfg_normalization": 1}"#,
                "true or false",
            ),
            (
                br#"{"prompt": "p", "guidance_mode": "x"}"#,
                "diffusers, original",
            ),
            (br#"{"prompt": "p", "steps": 3}"#, "unknown field `steps`"),
            (br#"{"prompt": null}"#, "no `prompt`"),
            (br#""p""#, "not a string"),
            (b"{\"prompt\": \"\xff\"}", "not UTF-8"),
            (br#"{"prompt": "p""#, "not JSON"),
        ] {
            let e = line_args(line, 0, &d).err().unwrap().to_string();
            assert!(e.contains(needle), "{}: {e}", String::from_utf8_lossy(line));
        }
        let long = vec![b' '; MAX_LINE_BYTES + 1];
        let e = line_args(&long, 0, &d).err().unwrap().to_string();
        assert!(e.contains("more than the 4 MiB"), "{e}");
    }
}
