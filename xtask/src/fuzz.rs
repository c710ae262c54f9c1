//! `cargo xtask fuzz`: every parser that reads user files, fed mutated files
//! for a given time each, in this process.
//!
//! The seeds are the committed fixtures (GGUF, safetensors, `.pth`, LoRA,
//! configs, tokenizer, SentencePiece model) and the small hand-made files under `xtask/fuzz/seeds`;
//! the mutations are those of the classic byte fuzzers (bit flips,
//! interesting integers over length and offset fields, truncation at any
//! point, inserted, deleted and duplicated ranges, splices of two seeds). It
//! is not coverage-guided: it is a property test with a time budget, run on
//! stable Rust in CI. A finding is a panic (caught, the input saved under
//! `target/fuzz/findings/`), an input that took longer than the hang limit,
//! or a single allocation larger than the allocation limit (the binary's
//! allocator records the largest one).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod pth_mutate;

/// The largest single allocation made since the last reset, recorded by
/// [`CountingAlloc`] when it is the global allocator (the xtask binary) and
/// [`COUNTING`] is on.
pub static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

/// Whether [`CountingAlloc`] records (only during `cargo xtask fuzz`, so that
/// the benchmarks run on the plain system allocator path).
pub static COUNTING: AtomicBool = AtomicBool::new(false);

fn record(size: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        LARGEST_ALLOCATION.fetch_max(size, Ordering::Relaxed);
    }
}

/// The system allocator, recording the largest single allocation.
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller upholds `alloc_zeroed`'s contract.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        record(new);
        // SAFETY: the caller upholds `realloc`'s contract.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

/// A parser under test: its name, the file name it is handed (some parsers
/// dispatch on the extension), which seed files it starts from, and the call.
pub struct Target {
    /// Name on the command line and in the report.
    pub name: &'static str,
    /// File name the input is written to.
    pub file_name: &'static str,
    /// Seed file extensions / names (matched against the end of the path).
    pub seeds: &'static [&'static str],
    /// Parses the file; errors are fine, panics are findings.
    pub run: fn(&Path),
}

fn gguf(path: &Path) {
    let Ok(f) = lumina2_loader::gguf::GgufFile::open(path) else {
        return;
    };
    for t in f.tensor_infos().to_vec() {
        let _ = f.dequantize(&t.name);
        let _ = f.qtensor(&t.name, &candle_core::Device::Cpu);
    }
    if let Ok(g) = lumina2_loader::Gemma2Gguf::new(f) {
        let _ = g.config();
        let _ = g.penultimate_encoder(candle_core::DType::F32, &candle_core::Device::Cpu);
    }
    if let Ok(f) = lumina2_loader::gguf::GgufFile::open(path) {
        if let Ok(q) = lumina2_loader::Qwen3Gguf::new(f) {
            let _ = q.config();
            let _ = q.penultimate_encoder(candle_core::DType::F32, &candle_core::Device::Cpu);
        }
    }
}

fn safetensors(path: &Path) {
    use lumina2_weights::WeightSource;
    let Ok(s) = lumina2_weights::SafetensorsSource::open(&[path]) else {
        return;
    };
    for k in s.keys() {
        let _ = s.tensor(&k);
    }
}

fn pth(path: &Path) {
    let Ok(f) = lumina2_loader::PthFile::open(path) else {
        return;
    };
    for k in f.keys() {
        let _ = f.tensor(&k);
    }
}

fn lora(path: &Path) {
    // Opening reads the header only; applying reads the matched factors.
    if let Ok(l) = lumina2_loader::LoraFile::open(path) {
        apply_to_tiny_model(l.clone());
        // The same file read as a Z-Image LoRA.
        let base: std::sync::Arc<dyn lumina2_weights::WeightSource> =
            std::sync::Arc::new(std::collections::HashMap::<String, candle_core::Tensor>::new());
        let _ = lumina2_loader::LoraSource::new(base, tiny_zimage(), &[(l, 1.0)]);
    }
}

/// The config of the committed Z-Image file fixtures (`zimage_files`).
fn tiny_zimage() -> &'static lumina2_transformer::zimage::ZImageConfig {
    use std::sync::OnceLock;
    static CFG: OnceLock<lumina2_transformer::zimage::ZImageConfig> = OnceLock::new();
    CFG.get_or_init(|| lumina2_transformer::zimage::ZImageConfig {
        all_patch_size: vec![2],
        all_f_patch_size: vec![1],
        in_channels: 4,
        dim: 32,
        n_layers: 1,
        n_refiner_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        cap_feat_dim: 32,
        axes_dims: vec![4, 4, 8],
        axes_lens: vec![128, 32, 32],
        ..Default::default()
    })
}

/// A Z-Image transformer file (GGUF or safetensors, any layout): opened
/// for the tiny config, its config inferred, every weight read.
fn zimage_file(path: &Path) {
    if let Ok(g) = lumina2_loader::gguf::GgufFile::open(path) {
        let _ = lumina2_loader::infer_zimage_config(&g, path);
    }
    let Ok(src) = lumina2_loader::open_zimage_transformer_file(path, tiny_zimage()) else {
        return;
    };
    for k in src.keys() {
        let _ = src.linear(&k);
        let _ = src.tensor(&k);
    }
}

fn shard_index(path: &Path) {
    if let Ok(bytes) = std::fs::read(path) {
        let _ = lumina2_weights::ShardIndex::parse(path, &bytes);
    }
}

fn configs(path: &Path) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
    let _ = lumina2_transformer::Config::from_json_str(&text);
    let _ = lumina2_text_encoder::Gemma2Config::from_json(&text);
    let _ = lumina2_text_encoder::Qwen3Config::from_json(&text);
    let _ = lumina2_transformer::ZImageConfig::from_json_str(&text);
    let _ = lumina2_vae::AutoencoderKLConfig::from_json(&text);
    let _ = lumina2_scheduler::SchedulerConfig::from_json_str(&text);
}

fn model_index(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = lumina2_loader::PipelineFolder::open(dir);
    }
}

fn tokenizer(path: &Path) {
    if let Ok(t) = lumina2_text_encoder::GemmaTokenizer::from_file(path) {
        let _ = t.encode_padded(&["a red fox <0x41> \u{0}\u{feff}".to_string()], 16);
    }
}

/// `chat_template`: a Jinja chat template (a tokenizer folder's
/// `chat_template.jinja`), compiled and rendered for one user message as
/// Z-Image's prompt encoding does; the engine's own limits (instructions,
/// nesting, output size) must stop hostile templates.
fn chat_template(path: &Path) {
    let Ok(bytes) = lumina2_weights::fs::read_bounded(path, 1 << 20) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
    if let Ok(t) = lumina2_text_encoder::ChatTemplate::new(&text, "fuzz") {
        let vars = std::collections::BTreeMap::from([(
            "enable_thinking".to_string(),
            serde_json::Value::Bool(true),
        )]);
        let messages = [lumina2_text_encoder::ChatMessage::user(
            "a red fox </think>",
        )];
        let _ = t.render(&messages, true, &vars);
    }
}

/// `sentencepiece`: a SentencePiece `tokenizer.model` (protobuf reader and
/// merge generation), then an encode with the tokenizer built from it.
fn sentencepiece(path: &Path) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    if let Ok(t) = lumina2_text_encoder::GemmaTokenizer::from_sentencepiece(&bytes, "fuzz") {
        let _ = t.encode_padded(&["a red fox <0x41> \u{0}\u{feff}<bos>".to_string()], 16);
    }
}

/// `kohya_names`: LoRA module names, one per line of the input, each also in
/// variants (its kohya spelling, `_`/`.` flipped at places the input picks,
/// repeated into a long name), resolved for a tiny and the 2B config; then
/// the names as the keys of a LoRA file whose factor shapes the input picks
/// (huge ones included, their data a sparse hole), applied to the tiny model.
/// Checks, besides no panic and (the hang limit) linear time per name: a
/// dotted name and its kohya spelling reach the same weights.
fn kohya_names(path: &Path) {
    use lumina2_loader::lora::LoraFile;
    let models = lora_models();
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
    // The variants' choices, from the input (FNV-1a as it goes).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut names: Vec<String> = Vec::new();
    let mut adapted = std::collections::HashSet::new();
    for line in text.lines().take(256) {
        for b in line.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let plain = [
            "transformer.",
            "base_model.model.",
            "model.diffusion_model.",
            "diffusion_model.",
            "lora_unet_",
        ]
        .iter()
        .find_map(|p| line.strip_prefix(p))
        .unwrap_or(line);
        let kohya = format!("lora_unet_{}", plain.replace('.', "_"));
        let flipped: String = kohya
            .chars()
            .enumerate()
            .map(|(i, c)| match c {
                '_' if (h >> (i % 64)) & 1 == 1 => '.',
                '.' if (h >> (i % 64)) & 1 == 1 => '_',
                c => c,
            })
            .collect();
        let long = format!("{kohya}{}", "_".repeat(1 + (h % 4096) as usize));
        for (_, m) in models {
            let dotted = m.resolve(line);
            let spelt = m.resolve(&kohya);
            let _ = m.resolve(&flipped);
            let _ = m.resolve(&long);
            // (An ambiguous spelling is an error, never another weight.)
            if let (Ok(keys), Ok(spelt)) = (&dotted, &spelt) {
                if !keys.is_empty() && !line.starts_with("lora_unet_") {
                    assert_eq!(
                        spelt, keys,
                        "`{line}` and its kohya spelling `{kohya}` reach different weights"
                    );
                }
            }
        }
        // One name per weight in the file (two on one weight are refused
        // before anything is read), unknown names all kept.
        for n in [line.to_string(), kohya, flipped] {
            let keys = models[0].1.resolve(&n).unwrap_or_default();
            if keys.iter().all(|k| !adapted.contains(k)) {
                adapted.extend(keys);
                names.push(n);
            }
        }
    }
    // The names as a LoRA file: shapes from the input, data never written
    // (a sparse file of at most 1 TiB).
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (i, n) in names.iter().enumerate() {
        if header.contains_key(&format!("{n}.alpha")) {
            continue;
        }
        h = h.rotate_left(7) ^ i as u64;
        let mut dims = [1usize, 2, 16, 24, 32, 64, 128, 256, 1 << 30][(h % 9) as usize];
        let mut rank = [1usize, 2, 4, 1 << 24][((h >> 8) % 4) as usize];
        if offset + 8 * (dims * rank) as u64 > 1 << 40 {
            (dims, rank) = (1, 1);
        }
        for (suffix, shape) in [
            (".lora_down.weight", vec![rank, dims]),
            (".lora_up.weight", vec![dims, rank]),
            (".alpha", vec![]),
        ] {
            let len = 4 * shape.iter().product::<usize>() as u64;
            header.insert(
                format!("{n}{suffix}"),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
    }
    let Ok(header) = serde_json::to_vec(&header) else {
        return;
    };
    let file = path.with_extension("safetensors");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    let written = std::fs::write(&file, &out)
        .and_then(|()| std::fs::OpenOptions::new().write(true).open(&file))
        .and_then(|f| f.set_len(out.len() as u64 + offset));
    if written.is_err() {
        return;
    }
    if let Ok(lora) = LoraFile::open(&file) {
        apply_to_tiny_model(lora);
    }
}

/// The fixtures' tiny model and `Alpha-VLLM/Lumina-Image-2.0`'s
/// transformer/config.json, with their module names.
fn lora_models() -> &'static [(
    lumina2_transformer::Config,
    lumina2_loader::lora::ModuleNames,
)] {
    use lumina2_loader::lora::ModuleNames;
    use lumina2_transformer::Config;
    use std::sync::OnceLock;
    const CONFIGS: [&str; 2] = [
        r#"{"axes_dim_rope": [2, 2, 4], "axes_lens": [32, 16, 16], "cap_feat_dim": 24,
            "hidden_size": 32, "in_channels": 4, "multiple_of": 16, "num_attention_heads": 4,
            "num_kv_heads": 2, "num_layers": 2, "num_refiner_layers": 1, "sample_size": 8}"#,
        r#"{"axes_dim_rope": [32, 32, 32], "axes_lens": [300, 512, 512], "cap_feat_dim": 2304,
            "ffn_dim_multiplier": null, "hidden_size": 2304, "in_channels": 16, "multiple_of": 256,
            "norm_eps": 1e-05, "num_attention_heads": 24, "num_kv_heads": 8, "num_layers": 26,
            "num_refiner_layers": 2, "out_channels": null, "patch_size": 2, "sample_size": 128,
            "scaling_factor": 1.0}"#,
    ];
    static MODELS: OnceLock<Vec<(Config, ModuleNames)>> = OnceLock::new();
    let models = MODELS.get_or_init(|| {
        CONFIGS
            .iter()
            .filter_map(|j| Config::from_json_str(j).ok())
            .map(|c| {
                let names = ModuleNames::new(&c);
                (c, names)
            })
            .collect()
    });
    assert_eq!(models.len(), 2, "the LoRA fuzz configs do not parse");
    models
}

/// Applies a LoRA to the tiny model (no base weights: only the LoRA is read).
fn apply_to_tiny_model(lora: lumina2_loader::LoraFile) {
    if let Some((cfg, _)) = lora_models().first() {
        let base: std::sync::Arc<dyn lumina2_weights::WeightSource> =
            std::sync::Arc::new(std::collections::HashMap::<String, candle_core::Tensor>::new());
        let _ = lumina2_loader::LoraSource::new(base, cfg, &[(lora, 1.0)]);
    }
}

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "gguf",
            file_name: "f.gguf",
            seeds: &[".gguf"],
            run: gguf,
        },
        Target {
            name: "safetensors",
            file_name: "f.safetensors",
            seeds: &[".safetensors"],
            run: safetensors,
        },
        Target {
            name: "pth",
            file_name: "f.pth",
            seeds: &[".pth"],
            run: pth,
        },
        Target {
            name: "zimage_file",
            file_name: "f.gguf",
            seeds: &["z_image-q4_0.gguf"],
            run: zimage_file,
        },
        Target {
            name: "lora",
            file_name: "f.safetensors",
            seeds: &[
                "lora.safetensors",
                "lora_comfyui.safetensors",
                "lora_kohya.safetensors",
            ],
            run: lora,
        },
        Target {
            name: "shard_index",
            file_name: "model.safetensors.index.json",
            seeds: &[".index.json"],
            run: shard_index,
        },
        Target {
            name: "configs",
            file_name: "config.json",
            seeds: &["config.json"],
            run: configs,
        },
        Target {
            name: "model_index",
            file_name: "model_index.json",
            seeds: &["model_index.json"],
            run: model_index,
        },
        Target {
            name: "tokenizer",
            file_name: "tokenizer.json",
            seeds: &["tokenizer.json"],
            run: tokenizer,
        },
        Target {
            name: "sentencepiece",
            file_name: "tokenizer.model",
            seeds: &[".model"],
            run: sentencepiece,
        },
        Target {
            name: "chat_template",
            file_name: "chat_template.jinja",
            seeds: &[".jinja"],
            run: chat_template,
        },
        Target {
            name: "config_numbers",
            file_name: "config.json",
            seeds: &["config.json"],
            run: crate::fuzz_configs::config_numbers,
        },
        // `.pth`: the pickle interpreter and the zip archive, with
        // structure-aware mutations (pth_mutate.rs).
        Target {
            name: "pickle",
            file_name: "data.pkl",
            seeds: &[".pkl"],
            run: pth_mutate::pickle,
        },
        Target {
            name: "pth_zip",
            file_name: "f.pth",
            seeds: &[".pth"],
            run: pth_mutate::pth_zip,
        },
        Target {
            name: "kohya_names",
            file_name: "names.txt",
            seeds: &["kohya_names.txt"],
            run: kohya_names,
        },
    ]
}

/// A xorshift generator: reproducible runs from `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    7,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    u64::MAX - 7,
];

/// One to four stacked mutations of `input` (another seed for splices).
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][rng.below(7)];
            }
            2 if len >= 8 => {
                // An integer field: little-endian, 1 to 8 bytes wide.
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(len - w + 1);
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                v[i..i + w].copy_from_slice(&x[..w]);
            }
            3 => v.truncate(rng.below(len + 1)),
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            5 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, fill);
            }
            6 if len > 0 => {
                // Duplicate a range (repeated keys, overlapping entries).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            7 if !other.is_empty() => {
                // Splice: our head, the other seed's tail.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            8 if len > 0 => {
                // A digit string grown into a huge number (JSON sizes).
                let i = rng.below(len);
                v.splice(i..i, b"99999999999999999999".iter().copied());
            }
            _ => {}
        }
    }
    v
}

/// Seed files of a target: the committed fixtures and `xtask/fuzz/seeds`.
fn seed_files(root: &Path, target: &Target) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("crates"), root.join("xtask").join("fuzz")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd {
            let p = e?.path();
            if p.is_dir() {
                if !p.ends_with("src") && !p.ends_with("target") {
                    stack.push(p);
                }
                continue;
            }
            let name = p.to_string_lossy();
            let in_fixtures = name.contains("fixtures") || name.contains("fuzz");
            let small = p.metadata().map(|m| m.len() <= 4 << 20).unwrap_or(false);
            if in_fixtures && small && target.seeds.iter().any(|s| name.ends_with(s)) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What one target's run found.
#[derive(Debug)]
pub struct Report {
    /// Target name.
    pub target: &'static str,
    /// Seed files.
    pub seeds: usize,
    /// Inputs run.
    pub execs: u64,
    /// Panics (inputs saved).
    pub panics: usize,
    /// Inputs slower than the hang limit (saved).
    pub slow: usize,
    /// The slowest input, seconds.
    pub slowest_s: f64,
    /// The largest single allocation, bytes.
    pub largest_alloc: usize,
    /// Allocations over the limit (inputs saved).
    pub big_allocs: usize,
}

/// Limits of a run.
#[derive(Debug, Clone)]
pub struct FuzzOptions {
    /// Time per target.
    pub per_target: Duration,
    /// Only these targets (all when empty).
    pub only: Vec<String>,
    /// RNG seed.
    pub seed: u64,
    /// An input slower than this is a finding.
    pub hang_limit: Duration,
    /// A single allocation larger than this is a finding (bytes).
    pub alloc_limit: usize,
}

/// Runs every target for its time; returns the reports.
pub fn fuzz(root: &Path, opts: &FuzzOptions) -> Result<Vec<Report>> {
    let work = root.join("target").join("fuzz");
    let findings = work.join("findings");
    std::fs::create_dir_all(&findings)?;
    // Quiet panics: they are counted and their inputs saved.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    COUNTING.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for target in targets() {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == target.name) {
            continue;
        }
        let seeds: Vec<Vec<u8>> = seed_files(root, &target)?
            .iter()
            .map(std::fs::read)
            .collect::<std::io::Result<_>>()?;
        if seeds.is_empty() {
            COUNTING.store(false, Ordering::Relaxed);
            std::panic::set_hook(hook);
            bail!("fuzz target `{}` has no seed files", target.name);
        }
        let dir = work.join(target.name);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(target.file_name);
        let mut rng =
            Rng(opts.seed ^ (target.name.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut r = Report {
            target: target.name,
            seeds: seeds.len(),
            execs: 0,
            panics: 0,
            slow: 0,
            slowest_s: 0.0,
            largest_alloc: 0,
            big_allocs: 0,
        };
        let start = Instant::now();
        while start.elapsed() < opts.per_target {
            let k = r.execs as usize;
            // Each seed as it is first, then mutations.
            let input = if k < seeds.len() {
                seeds[k].clone()
            } else {
                let a = &seeds[rng.below(seeds.len())];
                let b = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, a, b)
            };
            std::fs::write(&path, &input).with_context(|| format!("{}", path.display()))?;
            LARGEST_ALLOCATION.store(0, Ordering::Relaxed);
            let t0 = Instant::now();
            let ok = std::panic::catch_unwind(|| (target.run)(&path)).is_ok();
            let dt = t0.elapsed();
            let alloc = LARGEST_ALLOCATION.load(Ordering::Relaxed);
            r.execs += 1;
            r.slowest_s = r.slowest_s.max(dt.as_secs_f64());
            r.largest_alloc = r.largest_alloc.max(alloc);
            let mut found = Vec::new();
            if !ok {
                r.panics += 1;
                found.push("panic");
            }
            if dt > opts.hang_limit {
                r.slow += 1;
                found.push("slow");
            }
            if alloc > opts.alloc_limit {
                r.big_allocs += 1;
                found.push("alloc");
            }
            for kind in found {
                let f = findings.join(format!("{}-{kind}-{}.bin", target.name, r.execs));
                std::fs::write(&f, &input)?;
                eprintln!(
                    "fuzz: {}: {kind}: input saved to {}",
                    target.name,
                    f.display()
                );
            }
        }
        eprintln!("fuzz: {} done: {} execs", target.name, r.execs);
        reports.push(r);
    }
    COUNTING.store(false, Ordering::Relaxed);
    std::panic::set_hook(hook);
    Ok(reports)
}

/// The report table.
pub fn format_reports(reports: &[Report]) -> String {
    let mut s = String::from(
        "| target | seeds | execs | panics | slow inputs | slowest (s) | largest allocation (MiB) | allocations over the limit |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.1} | {} |\n",
            r.target,
            r.seeds,
            r.execs,
            r.panics,
            r.slow,
            r.slowest_s,
            r.largest_alloc as f64 / (1 << 20) as f64,
            r.big_allocs
        ));
    }
    s
}
