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
//! The names recognised are the model's own modules, listed once per config
//! in both namings; original names go through the mapping of original
//! checkpoints ([`original_key_to_diffusers`]), so both always agree. Every
//! name is one hash lookup, a kohya name by its spelling.

use std::collections::HashMap;

use crate::model_keys::ModelKeys;

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

/// How kohya spells a module name: every `.` as `_`.
fn kohya_spelling(name: &str) -> String {
    name.replace('.', "_")
}

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
    /// Every linear module of the model, in diffusers' and in original names.
    modules: HashMap<String, Target>,
    /// The same modules by their kohya spelling: the names with that
    /// spelling, one per distinct target (several: the spelling is ambiguous).
    kohya: HashMap<String, Vec<(String, Target)>>,
}

impl Resolver {
    /// The linear modules of the model `cfg` describes.
    pub(crate) fn new<M: ModelKeys + ?Sized>(cfg: &M) -> Self {
        // Linear weights: the 2-D `.weight`s (Z-Image's `[1, dim]` pad
        // tokens are no linear layer).
        let linear: HashMap<String, [usize; 2]> = cfg
            .weight_shapes()
            .into_iter()
            .filter(|(k, _)| k.ends_with(".weight"))
            .filter_map(|(k, s)| match s[..] {
                [o, i] => Some((k, [o, i])),
                _ => None,
            })
            .collect();
        let mut modules: HashMap<String, Target> = linear
            .keys()
            .filter_map(|k| {
                Some((
                    k.strip_suffix(".weight")?.to_string(),
                    Target::Single(k.clone()),
                ))
            })
            .collect();
        // Original names through the mapping of original checkpoints, listed
        // for the config (diffusers' name wins where both name a module).
        for key in cfg.original_weight_keys() {
            let Some(name) = key.strip_suffix(".weight") else {
                continue;
            };
            let d = cfg.original_to_diffusers(&key);
            let target = if d.contains("qkv") {
                let parts = ["to_q", "to_k", "to_v"].map(|p| d.replace("qkv", p));
                parts
                    .iter()
                    .all(|k| linear.contains_key(k))
                    .then_some(Target::Qkv(parts))
            } else {
                linear.contains_key(&d).then_some(Target::Single(d))
            };
            if let Some(t) = target {
                modules.entry(name.to_string()).or_insert(t);
            }
        }
        let mut this = Self {
            linear,
            modules: HashMap::new(),
            kohya: HashMap::new(),
        };
        // kohya names are the module names of the model the LoRA was trained
        // on, diffusers' or the original ones: spelling each of them once
        // makes a kohya name one lookup, instead of a search over the
        // readings of its underscores (2^n for n underscores).
        for (name, target) in &modules {
            this.add_kohya(name.clone(), target.clone());
        }
        this.modules = modules;
        this
    }

    /// Records `name` (a dotted module name naming `target`) under its kohya spelling.
    fn add_kohya(&mut self, name: String, target: Target) {
        let readings = self.kohya.entry(kohya_spelling(&name)).or_default();
        if !readings.iter().any(|(_, t)| *t == target) {
            readings.push((name, target));
            readings.sort_by(|a, b| a.0.cmp(&b.0));
        }
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
    /// the model. One lookup, linear in the length of the name.
    pub(crate) fn resolve(&self, module: &str) -> Result<Option<Target>, String> {
        if let Some(rest) = module.strip_prefix(KOHYA_PREFIX) {
            return self.resolve_kohya(rest);
        }
        let name = PREFIXES
            .iter()
            .find_map(|p| module.strip_prefix(p))
            .unwrap_or(module);
        Ok(self.modules.get(name).cloned())
    }

    /// A kohya name: the module of the model with that spelling (a `.` in the
    /// name is read as a `_`, so that either spelling of a separator works).
    fn resolve_kohya(&self, rest: &str) -> Result<Option<Target>, String> {
        match self.kohya.get(&kohya_spelling(rest)).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([(_, t)]) => Ok(Some(t.clone())),
            Some(readings) => Err(format!(
                "ambiguous kohya name: it reads as {}",
                readings
                    .iter()
                    .map(|(n, _)| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )),
        }
    }
}

/// LoRA module names resolved for one config, as [`super::LoraSource`] does
/// it; public for the fuzzer (`cargo xtask fuzz`), not an API.
#[doc(hidden)]
pub struct ModuleNames(Resolver);

impl ModuleNames {
    /// The module names of the model `cfg` describes.
    pub fn new<M: ModelKeys + ?Sized>(cfg: &M) -> Self {
        Self(Resolver::new(cfg))
    }

    /// The diffusers keys of the weights a module name (prefix included)
    /// changes: empty for none, `Err` for an ambiguous kohya name.
    pub fn resolve(&self, module: &str) -> Result<Vec<String>, String> {
        Ok(match self.0.resolve(module)? {
            None => Vec::new(),
            Some(Target::Single(k)) => vec![k],
            Some(Target::Qkv(k)) => k.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumina2_transformer::Config;

    fn tiny() -> Config {
        Config {
            hidden_size: 32,
            num_layers: 2,
            num_refiner_layers: 1,
            num_attention_heads: 4,
            num_kv_heads: 2,
            axes_dim_rope: vec![4, 2, 2],
            ..Config::default()
        }
    }

    #[test]
    fn every_module_resolves_in_every_spelling() {
        for cfg in [tiny(), Config::default()] {
            let r = Resolver::new(&cfg);
            for (name, t) in &r.modules {
                for spelled in [
                    format!("transformer.{name}"),
                    format!("diffusion_model.{name}"),
                    format!("lora_unet_{}", kohya_spelling(name)),
                    format!("lora_unet_{name}"),
                ] {
                    assert_eq!(r.resolve(&spelled), Ok(Some(t.clone())), "{spelled}");
                }
            }
            // Both namings of every module. diffusers: 4 embedder and 2 output
            // linears, 7 per block, 1 more per modulated block. Original,
            // besides `x_embedder` (the same in both): `t_embedder.mlp.0/2`,
            // `cap_embedder.1`, `final_layer.linear/adaLN_modulation.1`;
            // `qkv`, `out`, `w1..w3` per block; `adaLN_modulation.1` per
            // modulated block.
            let blocks = cfg.num_layers + 2 * cfg.num_refiner_layers;
            let modulated = cfg.num_layers + cfg.num_refiner_layers;
            assert_eq!(r.linear.len(), 6 + 7 * blocks + modulated);
            assert_eq!(r.modules.len(), r.linear.len() + 5 + 5 * blocks + modulated);
            // Every linear weight is reached by some kohya name.
            let reached: std::collections::HashSet<String> = r
                .kohya
                .values()
                .flatten()
                .flat_map(|(_, t)| match t {
                    Target::Single(k) => vec![k.clone()],
                    Target::Qkv(ks) => ks.to_vec(),
                })
                .collect();
            assert_eq!(reached.len(), r.linear.len());
        }
    }

    #[test]
    fn two_modules_with_one_kohya_spelling_are_ambiguous() {
        let mut r = Resolver::new(&tiny());
        r.add_kohya("a.b_c".into(), Target::Single("x.weight".into()));
        r.add_kohya("a_b.c".into(), Target::Single("y.weight".into()));
        // The same target twice is one reading.
        r.add_kohya("a_b_c".into(), Target::Single("y.weight".into()));
        assert_eq!(
            r.resolve("lora_unet_a_b_c"),
            Err("ambiguous kohya name: it reads as `a.b_c` and `a_b.c`".into())
        );
    }

    #[test]
    fn names_with_many_underscores_resolve_in_one_lookup() {
        // 2^40 readings each: a search over them would never end.
        let r = Resolver::new(&Config::default());
        for i in 0..1000 {
            let name = format!("lora_unet_{i}{}", "_layers_0".repeat(20));
            assert_eq!(name.matches('_').count(), 42);
            assert_eq!(r.resolve(&name), Ok(None));
        }
        let long = format!("lora_unet_{}", "_".repeat(1 << 20));
        assert_eq!(r.resolve(&long), Ok(None));
        // A module whose name has 40 separators is found (a search over the
        // readings had to give up on such names).
        let mut r = r;
        let name = (0..41)
            .map(|i| format!("m{i}"))
            .collect::<Vec<_>>()
            .join(".");
        let target = Target::Single("layers.0.attn.to_q.weight".into());
        r.add_kohya(name.clone(), target.clone());
        let kohya = format!("lora_unet_{}", name.replace('.', "_"));
        assert_eq!(kohya.matches('_').count(), 42);
        assert_eq!(r.resolve(&kohya), Ok(Some(target)));
    }
}
