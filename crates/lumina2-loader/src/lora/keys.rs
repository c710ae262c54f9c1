//! LoRA key names: which factor of which module a tensor is, and which linear
//! weights of the model (in diffusers' names) that module changes.
//!
//! Lumina2 LoRAs come with three naming schemes:
//! - diffusers / PEFT: `transformer.layers.0.attn.to_q.lora_A.weight`;
//! - original / ComfyUI: `diffusion_model.layers.0.attention.qkv.lora_A.weight`,
//!   original module names, with a fused `qkv`;
//! - kohya (sd-scripts, also read by ComfyUI):
//!   `lora_unet_layers_0_attention_qkv.lora_down.weight`, the module name with
//!   every `.` turned into `_`.
//!
//! Original names go through the same mapping as original checkpoints
//! ([`original_key_to_diffusers`]), so both always agree.

use std::collections::HashMap;

use lumina2_transformer::{weight_shapes, Config};

use crate::original::original_key_to_diffusers;

/// Which factor of a module a LoRA tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// `A` (`lora_A` / `lora_down`), `[rank, in]`.
    Down,
    /// `B` (`lora_B` / `lora_up`), `[out, rank]`.
    Up,
    /// The scalar `alpha`: the update is scaled by `alpha / rank`.
    Alpha,
}

/// Splits a LoRA key into its module name and factor; `None` for keys of no
/// LoRA convention we know (DoRA magnitudes, LoHa/LoKr factors, biases, ...).
pub(crate) fn split_key(key: &str) -> Option<(&str, Part)> {
    const SUFFIXES: [(&str, Part); 5] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    SUFFIXES
        .iter()
        .find_map(|(s, p)| key.strip_suffix(s).map(|m| (m, *p)))
        .filter(|(m, _)| !m.is_empty())
}

/// Prefixes that say nothing about the naming scheme: what follows is tried as
/// a diffusers name, then as an original one.
const PREFIXES: [&str; 4] = [
    "transformer.",
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
];

/// kohya's prefix: the rest is a module name with `_` for `.`.
const KOHYA_PREFIX: &str = "lora_unet_";

/// kohya names with more underscores than this are not searched (each
/// underscore doubles the candidate module names).
const MAX_KOHYA_UNDERSCORES: usize = 14;

/// The PEFT module name of a LoRA module (its name inside the transformer):
/// the file's name without the `transformer.` or `base_model.model.` prefix.
pub(crate) fn peft_module_name(module: &str) -> &str {
    ["transformer.", "base_model.model."]
        .iter()
        .find_map(|p| module.strip_prefix(p))
        .unwrap_or(module)
}

/// The linear weights (diffusers keys) a LoRA module changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// One linear weight, such as `layers.0.attn.to_out.0.weight`.
    Single(String),
    /// An original fused `qkv`: `A` is shared, the rows of `B` split over the
    /// `to_q`, `to_k` and `to_v` weights (in that order).
    Qkv([String; 3]),
}

/// Maps LoRA module names onto the model's linear weights for one config.
pub(crate) struct Resolver {
    /// `[out, in]` of every linear (2-D) weight of the model, by diffusers key.
    linear: HashMap<String, [usize; 2]>,
}

impl Resolver {
    /// The linear weights of the model `cfg` describes.
    pub(crate) fn new(cfg: &Config) -> Self {
        let linear = weight_shapes(cfg)
            .into_iter()
            .filter_map(|(k, s)| match s[..] {
                [o, i] => Some((k, [o, i])),
                _ => None,
            })
            .collect();
        Self { linear }
    }

    /// `[out, in]` of the whole target (for a fused `qkv`: the rows of q, k and v together).
    pub(crate) fn dims(&self, target: &Target) -> Option<[usize; 2]> {
        match target {
            Target::Single(k) => self.linear.get(k).copied(),
            Target::Qkv(keys) => {
                let mut out = 0;
                let mut inp = None;
                for k in keys {
                    let [o, i] = *self.linear.get(k)?;
                    if inp.is_some_and(|x| x != i) {
                        return None;
                    }
                    inp = Some(i);
                    out += o;
                }
                Some([out, inp?])
            }
        }
    }

    /// `[out, in]` of one linear weight.
    pub(crate) fn weight_dims(&self, key: &str) -> Option<[usize; 2]> {
        self.linear.get(key).copied()
    }

    /// The target of a LoRA module name (as in the file, prefix included).
    /// `Err` carries why a kohya name is ambiguous; `Ok(None)`: no weight of
    /// the model.
    pub(crate) fn resolve(&self, module: &str) -> Result<Option<Target>, String> {
        if let Some(rest) = module.strip_prefix(KOHYA_PREFIX) {
            return self.resolve_kohya(rest);
        }
        let name = PREFIXES
            .iter()
            .find_map(|p| module.strip_prefix(p))
            .unwrap_or(module);
        Ok(self.resolve_dotted(name))
    }

    /// A dotted module name, diffusers' first, else original.
    fn resolve_dotted(&self, name: &str) -> Option<Target> {
        let key = format!("{name}.weight");
        if self.linear.contains_key(&key) {
            return Some(Target::Single(key));
        }
        let d = original_key_to_diffusers(&key);
        if d.contains("qkv") {
            let parts = ["to_q", "to_k", "to_v"].map(|p| d.replace("qkv", p));
            return parts
                .iter()
                .all(|k| self.linear.contains_key(k))
                .then_some(Target::Qkv(parts));
        }
        self.linear.contains_key(&d).then_some(Target::Single(d))
    }

    /// A kohya name: every `_` may stand for a `.`; the one reading that names
    /// a weight of the model is it.
    fn resolve_kohya(&self, rest: &str) -> Result<Option<Target>, String> {
        let underscores: Vec<usize> = rest.match_indices('_').map(|(i, _)| i).collect();
        if underscores.len() > MAX_KOHYA_UNDERSCORES {
            return Ok(None);
        }
        let mut found: Vec<(String, Target)> = Vec::new();
        for mask in 0u32..(1u32 << underscores.len()) {
            let mut name = rest.as_bytes().to_vec();
            for (bit, &pos) in underscores.iter().enumerate() {
                if mask & (1 << bit) != 0 {
                    if let Some(b) = name.get_mut(pos) {
                        *b = b'.';
                    }
                }
            }
            let name = String::from_utf8_lossy(&name).into_owned();
            if let Some(t) = self.resolve_dotted(&name) {
                if !found.iter().any(|(_, f)| *f == t) {
                    found.push((name, t));
                }
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|(_, t)| t)),
            _ => Err(format!(
                "ambiguous kohya name: it reads as {}",
                found
                    .iter()
                    .map(|(n, _)| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )),
        }
    }
}
