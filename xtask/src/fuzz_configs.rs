//! The `config_numbers` fuzz target: the numbers of real configs replaced by
//! hostile ones, then every size derived from them computed.
//!
//! The byte mutations of [`crate::fuzz`] rarely produce a valid JSON config
//! whose numbers are the interesting part (2^62 channels, 10^308 multipliers,
//! a hundred million layers). This target therefore takes its input as a
//! JSON config (a committed `config.json` or `scheduler_config.json`, or a
//! mutation of one) and uses the input's own bytes as the random stream that
//! picks which numeric fields to replace and by what, so that a finding is
//! reproduced by its saved input alone. Each config that parses is then used
//! as a loader would use it: every derived size, the memory estimate, the
//! scheduler's schedule.

use std::path::Path;

use serde_json::Value;

/// Numbers that break sizes: zero, signs, powers of two at integer widths,
/// floats at the edges of f64, and values just over our limits.
const HOSTILE: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "1025",
    "65537",
    "1048577",
    "2147483647",
    "2147483648",
    "4294967296",
    "100000000",
    "9007199254740993",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551615",
    "0.5",
    "1e-308",
    "1e308",
    "-1e308",
    "1e11",
    "5e-324",
];

/// A deterministic stream of choices drawn from the input's bytes.
struct Choices<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Choices<'_> {
    fn below(&mut self, n: usize) -> usize {
        if n == 0 || self.bytes.is_empty() {
            return 0;
        }
        let mut x = 0usize;
        for _ in 0..2 {
            x = (x << 8) | usize::from(self.bytes[self.at % self.bytes.len()]);
            self.at = self.at.wrapping_add(7919);
        }
        x % n
    }
}

/// Paths of the numeric leaves of `v` (object keys and array indexes).
fn numeric_paths(v: &Value, prefix: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    match v {
        Value::Number(_) => out.push(prefix.clone()),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                prefix.push(PathStep::Index(i));
                numeric_paths(x, prefix, out);
                prefix.pop();
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                prefix.push(PathStep::Key(k.clone()));
                numeric_paths(x, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at_path<'v>(v: &'v mut Value, path: &[PathStep]) -> Option<&'v mut Value> {
    path.iter().try_fold(v, |v, step| match step {
        PathStep::Key(k) => v.get_mut(k.as_str()),
        PathStep::Index(i) => v.get_mut(*i),
    })
}

/// The fields every config reader knows, added so that a scheduler config
/// can also receive transformer numbers and the other way round.
const FIELDS: &[&str] = &[
    "num_layers",
    "num_refiner_layers",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "ffn_dim_multiplier",
    "multiple_of",
    "in_channels",
    "out_channels",
    "cap_feat_dim",
    "patch_size",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "num_key_value_heads",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "num_train_timesteps",
    "shift",
    "base_image_seq_len",
    "max_image_seq_len",
];

/// The input with one to four numbers replaced by hostile ones; `None` when
/// the input is not a JSON object.
fn hostile_config(bytes: &[u8]) -> Option<String> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object_mut()?;
    let mut c = Choices { bytes, at: 0 };
    // Sometimes a field the file does not have.
    if c.below(3) == 0 {
        let k = FIELDS[c.below(FIELDS.len())];
        obj.insert(k.to_string(), Value::from(1u64));
    }
    let mut paths = Vec::new();
    numeric_paths(&v, &mut Vec::new(), &mut paths);
    if paths.is_empty() {
        return None;
    }
    let mut text = serde_json::to_string(&v).ok()?;
    for _ in 0..=c.below(4) {
        let path = &paths[c.below(paths.len())];
        let hostile = HOSTILE[c.below(HOSTILE.len())];
        // A marker replaced in the text: serde_json cannot hold 1e308 as an
        // integer or 2^64-1 as a float the way a file writes them.
        if let Some(slot) = at_path(&mut v, path) {
            *slot = Value::String("\u{1}HOSTILE\u{1}".into());
            text = serde_json::to_string(&v).ok()?;
            text = text.replace("\"\\u0001HOSTILE\\u0001\"", hostile);
            v = serde_json::from_str(&text).unwrap_or(v);
        }
    }
    Some(text)
}

/// Parses the hostile config with every config reader and computes what a
/// loader derives from each one that passes validation.
pub fn config_numbers(path: &Path) {
    let Ok(bytes) = lumina2_weights::fs::read_bounded(path, lumina2_weights::fs::MAX_CONFIG_BYTES)
    else {
        return;
    };
    let Some(text) = hostile_config(&bytes) else {
        return;
    };
    if let Ok(cfg) = lumina2_transformer::Config::from_json_str(&text) {
        let _ = cfg.parameter_count();
        // Bounded by the validated layer count.
        let _ = lumina2_transformer::weight_shapes(&cfg);
        let weights =
            lumina2_pipeline::memory::transformer_weight_bytes(&cfg, candle_core::DType::BF16);
        for (w, h) in [(1024, 1024), (1 << 20, 1 << 20), (usize::MAX, usize::MAX)] {
            let _ = lumina2_pipeline::memory::transformer_bytes(&cfg, weights, 4, w, h, 256);
        }
    }
    if let Ok(cfg) = lumina2_text_encoder::Gemma2Config::from_json(&text) {
        let _ = cfg.layer_types();
        let _ = cfg.rope();
        let _ = cfg.head_dim();
    }
    if let Ok(cfg) = lumina2_transformer::ZImageConfig::from_json_str(&text) {
        // Bounded by the validated layer count.
        let _ = lumina2_transformer::zimage::weight_shapes(&cfg);
    }
    if let Ok(cfg) = lumina2_text_encoder::Qwen3Config::from_json(&text) {
        let _ = cfg.layer_types();
        let _ = cfg.rope();
        let _ = cfg.effective_sliding_window();
    }
    if let Ok(cfg) = lumina2_vae::AutoencoderKLConfig::from_json(&text) {
        let _ = cfg.downsample_factor();
        let _ = lumina2_vae::Tiling::from_config(&cfg);
        let _ =
            lumina2_pipeline::memory::vae_decode_bytes(&cfg, 1 << 30, 4, 1 << 20, 1 << 20, true);
    }
    if let Ok(cfg) = lumina2_scheduler::SchedulerConfig::from_json_str(&text) {
        if let Ok(mut s) = lumina2_scheduler::FlowMatchEulerDiscreteScheduler::new(cfg) {
            for steps in [1, 30, 100_001] {
                let _ = s.set_timesteps_lumina2(steps, 4096);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_numbers_with_hostile_ones() {
        let seed = br#"{"num_layers": 26, "axes_lens": [300, 512, 512], "name": "x"}"#;
        let mut seen_change = false;
        for salt in 0..64 {
            // Leading whitespace changes the choice stream, not the JSON.
            let mut input: Vec<u8> = (0..salt).map(|i| [b' ', b'\n', b'\t'][i % 3]).collect();
            input.extend_from_slice(seed);
            let out = hostile_config(&input).expect("a JSON object");
            let v: Value = serde_json::from_str(&out).expect("still JSON");
            assert_eq!(v["name"], "x");
            seen_change |= out
                != serde_json::to_string(&serde_json::from_slice::<Value>(seed).unwrap()).unwrap();
        }
        assert!(seen_change);
        assert!(hostile_config(b"[1, 2]").is_none());
    }
}
