"""LoRA cases: `transformer` cases with `args.lora` (docs/parity-cases.md).

A tiny random Lumina2 transformer (diffusers folder, bf16 storage) with random
LoRAs in the formats the loader reads:

- `peft_alpha`: diffusers/PEFT keys (`transformer.<module>.lora_A.weight`) on
  every linear layer, bf16 factors, an `.alpha` per module with alpha != rank;
- `two_loras`: two PEFT LoRAs with different strengths, one saved as diffusers
  saves (its PEFT `LoraConfig` in the safetensors metadata, `lora_alpha` and an
  `alpha_pattern` entry), one with neither (alpha = rank);
- `comfyui_qkv`: original/ComfyUI keys (`diffusion_model.`, fused
  `attention.qkv`, `feed_forward.w1..w3`, `adaLN_modulation.1`), converted for
  the reference by diffusers' own `_convert_non_diffusers_lumina2_lora_to_diffusers`;
- `kohya`: `lora_unet_<original module with _>.lora_down/lora_up/alpha`
  (sd-scripts, also read by ComfyUI), embedders and the output layer included;
- `gguf_q4_0`: the same model as an original-key Q4_0 GGUF (linear weights
  stay quantised in Rust, the LoRA applied at run time) with a PEFT and a
  ComfyUI LoRA; the reference is the model on gguf-py's dequantised weights;
- `real_dims_comfyui` (not with --only-tiny): the real 2B dimensions, one block
  per stack, where diffusers' converter runs unpatched.

The reference merges every LoRA into the weights in float32 as PEFT's
`fuse_lora` does: W + scale * alpha / r * B @ A. diffusers' own loading path
(`load_lora_adapter`) needs `peft`, which the pinned environment does not
have; when `peft` can be imported, the PEFT-format references are also checked
against it (recorded in provenance.json)."""

import contextlib
import copy
import json
import os

import torch
from safetensors.torch import save_file

from common import link_tree, versions, write_case
from gen_transformer import REAL, TINY, TOLERANCES, make_inputs, make_model, run
from gen_transformer_single import _orig_to_diffusers, dequantized_model, to_original, write_gguf

TOL_F32 = TOLERANCES[(False, "f32")]


def linear_shapes(model):
    """`module name -> (out, in)` of every nn.Linear of a diffusers model."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_factors(shape, rank, g, dtype=torch.float32):
    """A ~ N(0, 1/in), B ~ N(0, 0.5^2/r): B @ A has entries of about half the
    base weights' (N(0, 1/in)), a visible change at strength ~1."""
    out, inp = shape
    a = (torch.randn(rank, inp, generator=g) / inp ** 0.5).to(dtype).float()
    b = (torch.randn(out, rank, generator=g) * 0.5 / rank ** 0.5).to(dtype).float()
    return a, b


def merged(model, loras):
    """The model with `loras` fused into its weights in float32. `loras`: list of
    (`{diffusers module: (A, B, alpha / r)}`, scale)."""
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    with torch.no_grad():
        for lora, scale in loras:
            for module, (a, b, factor) in lora.items():
                sd[module + ".weight"] += scale * factor * (b @ a)
    ref.load_state_dict(sd)
    return ref.eval()


@contextlib.contextmanager
def qkv_split(q, kv):
    """diffusers' ComfyUI-LoRA converter splits `qkv.lora_B` with the 2B model's
    [2304, 768, 768]; for other sizes it is run with the config's sizes."""
    orig = torch.split

    def split(t, sizes, dim=0):
        if isinstance(sizes, (list, tuple)) and list(sizes) == [2304, 768, 768]:
            sizes = [q, kv, kv]
        return orig(t, sizes, dim)

    torch.split = split
    try:
        yield
    finally:
        torch.split = orig


def diffusers_convert_comfyui(sd, config):
    """diffusers' conversion of an original/ComfyUI LoRA state dict; returns
    `{diffusers module: (A, B)}` and the converted state dict."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    q = config["hidden_size"]
    kv = config["num_kv_heads"] * (q // config["num_attention_heads"])
    with qkv_split(q, kv):
        conv = _convert_non_diffusers_lumina2_lora_to_diffusers(dict(sd))
    out = {}
    for k, v in conv.items():
        k = k[len("transformer."):]
        module, part = k.rsplit(".lora_", 1)
        out.setdefault(module, [None, None])[0 if part.startswith("A") else 1] = v.float()
    return {m: (a, b) for m, (a, b) in out.items()}, conv


def original_linear_modules(model):
    """`original module name -> diffusers module name` (`qkv` kept) for every
    linear weight of the model's original-layout checkpoint."""
    sd = to_original({k: v for k, v in model.state_dict().items()})
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            out[k[: -len(".weight")]] = _orig_to_diffusers(k)[: -len(".weight")]
    return out


def original_lora(model, modules, rank, g, dtype):
    """Random factors for original-named modules; returns the file's
    `{original module: (A, B)}` and the same update in diffusers terms
    `{diffusers module: (A, B)}` (a `qkv` B split by the config)."""
    shapes = linear_shapes(model)
    orig_to_d = original_linear_modules(model)
    q = model.config.hidden_size
    kv = model.config.num_kv_heads * (q // model.config.num_attention_heads)
    file, diff = {}, {}
    for om in modules:
        d = orig_to_d[om]
        if d.endswith(".qkv"):
            base = d[: -len(".qkv")]
            out = sum(shapes[f"{base}.{p}"][0] for p in ["to_q", "to_k", "to_v"])
            a, b = random_factors((out, shapes[f"{base}.to_q"][1]), rank, g, dtype)
            for p, part in zip(["to_q", "to_k", "to_v"], torch.split(b, [q, kv, kv])):
                diff[f"{base}.{p}"] = (a, part)
        else:
            a, b = random_factors(shapes[d], rank, g, dtype)
            diff[d] = (a, b)
        file[om] = (a, b)
    return file, diff


def block_modules(model, with_embedders):
    """Original names of what diffusers' ComfyUI converter handles (blocks:
    qkv, out, w1..w3, adaLN of modulated blocks); with `with_embedders` also the
    embedders and the output layer."""
    mods = []
    for om in original_linear_modules(model):
        if om.split(".")[0] in ("layers", "noise_refiner", "context_refiner"):
            mods.append(om)
        elif with_embedders:
            mods.append(om)
    return sorted(mods)


def peft_check(model, ref, inputs, files):
    """With `peft` importable: diffusers' own LoRA loading of PEFT-format
    files must give the reference's output. `files`: list of (state dict without
    alphas, LoraConfig kwargs, scale)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return "peft not installed: not checked"
    m = copy.deepcopy(model)
    names = []
    for i, (sd, meta, scale) in enumerate(files):
        # As `Lumina2Pipeline.load_lora_weights` passes it: config keys under the component's prefix.
        if meta is not None:
            meta = {f"transformer.{k}": v for k, v in meta.items()}
        m.load_lora_adapter(sd, prefix="transformer", adapter_name=f"l{i}", metadata=meta)
        names.append(f"l{i}")
    m.set_adapters(names, weights=[s for _, _, s in files])
    diff = (run(m, inputs, torch.float32) - run(ref, inputs, torch.float32)).abs().max().item()
    assert diff < 1e-5, f"diffusers+peft differs from the fused reference by {diff}"
    return f"diffusers load_lora_adapter + set_adapters: max |diff| {diff:.2e}"


def save_model_case(case_dir, model_src, model):
    model_dir = os.path.join(case_dir, "model")
    if model_src is None:
        model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
        model.to(torch.float32)
        return model_dir
    link_tree(model_src, model_dir)
    return model_src


def check_visible(model, ref, inputs, tol, margin=100):
    """The LoRAs must change the output by far more than the tolerance, or the
    case would pass without them."""
    d = (run(model, inputs, torch.float32) - run(ref, inputs, torch.float32)).abs().max().item()
    assert d > margin * tol["atol"], f"the LoRA changes the output by only {d}"
    return d


def generate(out_dir, only_tiny=False):
    config = TINY
    model = make_model(config, 31, torch.bfloat16)
    inputs = make_inputs(config, 2, [5, 9], 12, 8, 12, 131)
    shapes = linear_shapes(model)
    g = torch.Generator().manual_seed(32)
    root = os.path.join(out_dir, "lora")
    model_src = None
    prov = {"generator": "xtask/parity/gen_lora.py", **versions()}

    # peft_alpha: every linear layer, bf16 factors, alpha 8 at rank 4.
    rank, alpha, scale = 4, 8.0, 0.75
    lora_a = {m: random_factors(s, rank, g, torch.bfloat16) for m, s in sorted(shapes.items())}
    file_a = {}
    for m, (a, b) in lora_a.items():
        file_a[f"transformer.{m}.lora_A.weight"] = a.to(torch.bfloat16)
        file_a[f"transformer.{m}.lora_B.weight"] = b.to(torch.bfloat16)
        file_a[f"transformer.{m}.alpha"] = torch.tensor(alpha)
    ref = merged(model, [({m: (a, b, alpha / rank) for m, (a, b) in lora_a.items()}, scale)])
    visible = check_visible(model, ref, inputs, TOL_F32)
    sd_no_alpha = {k: v for k, v in file_a.items() if not k.endswith(".alpha")}
    meta_a = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(lora_a)}
    checked = peft_check(model, ref, inputs, [(sd_no_alpha, meta_a, scale)])
    case_dir = os.path.join(root, "peft_alpha_f32")
    model_src = save_model_case(case_dir, model_src, model)
    save_file(file_a, os.path.join(case_dir, "lora.safetensors"))
    write_case(case_dir, "transformer", "model", inputs, {"sample": run(ref, inputs, torch.float32)}, TOL_F32,
               args={"lora": [{"path": "lora.safetensors", "scale": scale}]},
               provenance={**prov, "lora_effect_max_abs": visible, "peft_check": checked})
    # In bf16 the reference is only as good as bf16 (gen_transformer's
    # TOLERANCES, measured on outputs of the plain model's range). At strength
    # 0.75 this LoRA takes the output to |5|, where PyTorch's own bf16 result
    # is off its f32 one by 0.07, more than those tolerances: the bf16 case
    # uses a common strength, 0.3, that keeps the plain model's range.
    scale16 = 0.3
    ref16 = merged(model, [({m: (a, b, alpha / rank) for m, (a, b) in lora_a.items()}, scale16)])
    visible16 = check_visible(model, ref16, inputs, TOLERANCES[(False, "bf16")], margin=20)
    expected16 = run(ref16, inputs, torch.bfloat16)
    self_error = (expected16 - run(ref16, inputs, torch.float32)).abs().max().item()
    case_dir = os.path.join(root, "peft_alpha_bf16")
    save_model_case(case_dir, model_src, model)
    save_file(file_a, os.path.join(case_dir, "lora.safetensors"))
    write_case(case_dir, "transformer", "model", inputs, {"sample": expected16}, TOLERANCES[(False, "bf16")],
               dtype="bf16", args={"lora": [{"path": "lora.safetensors", "scale": scale16}]},
               provenance={**prov, "lora_effect_max_abs": visible16,
                           "reference_bf16_vs_f32_max_abs": self_error})

    # two_loras: attention LoRA saved as diffusers does (config in the metadata),
    # feed-forward/adaLN LoRA with no alpha at all; opposite-sign strengths.
    rank_b, alpha_b, pattern_module, pattern_alpha, scale_b = 2, 3.0, "layers.1.attn.to_out.0", 6.0, 0.6
    mods_b = [m for m in shapes if ".attn." in m]
    lora_b = {m: random_factors(shapes[m], rank_b, g) for m in sorted(mods_b)}
    rank_c, scale_c = 3, -1.2
    mods_c = [m for m in shapes if ".feed_forward." in m or m.endswith("norm1.linear") or m.endswith("to_q")]
    lora_c = {m: random_factors(shapes[m], rank_c, g, torch.bfloat16) for m in sorted(mods_c)}
    meta_b = {"r": rank_b, "lora_alpha": alpha_b, "alpha_pattern": {pattern_module: pattern_alpha},
              "rank_pattern": {}, "target_modules": sorted(lora_b), "use_dora": False, "use_rslora": False}
    sd_b = {f"transformer.{m}.lora_{p}.weight": t for m, (a, b) in lora_b.items() for p, t in [("A", a), ("B", b)]}
    sd_c = {f"transformer.{m}.lora_{p}.weight": t.to(torch.bfloat16)
            for m, (a, b) in lora_c.items() for p, t in [("A", a), ("B", b)]}
    ref = merged(model, [
        ({m: (a, b, (pattern_alpha if m == pattern_module else alpha_b) / rank_b) for m, (a, b) in lora_b.items()},
         scale_b),
        ({m: (a, b, 1.0) for m, (a, b) in lora_c.items()}, scale_c),
    ])
    visible = check_visible(model, ref, inputs, TOL_F32)
    meta_c = {"r": rank_c, "lora_alpha": rank_c, "target_modules": sorted(lora_c)}
    checked = peft_check(model, ref, inputs, [(sd_b, meta_b, scale_b), (sd_c, meta_c, scale_c)])
    case_dir = os.path.join(root, "two_loras_f32")
    save_model_case(case_dir, model_src, model)
    # As `Lumina2Pipeline.save_lora_weights(..., transformer_lora_adapter_metadata=...)`
    # writes it: the config's keys under `transformer.`, as sorted, indented JSON.
    packed = {f"transformer.{k}": v for k, v in meta_b.items()}
    save_file(sd_b, os.path.join(case_dir, "attention.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True), "format": "pt"})
    save_file(sd_c, os.path.join(case_dir, "feed_forward.safetensors"))
    write_case(case_dir, "transformer", "model", inputs, {"sample": run(ref, inputs, torch.float32)}, TOL_F32,
               args={"lora": [{"path": "attention.safetensors", "scale": scale_b},
                              {"path": "feed_forward.safetensors", "scale": scale_c}]},
               provenance={**prov, "lora_effect_max_abs": visible, "peft_check": checked})

    # comfyui_qkv: original names under `diffusion_model.`, what diffusers converts.
    rank_d, scale_d = 4, 0.9
    file_d, _ = original_lora(model, block_modules(model, with_embedders=False), rank_d, g, torch.bfloat16)
    sd_d = {f"diffusion_model.{m}.lora_{p}.weight": t.to(torch.bfloat16)
            for m, (a, b) in file_d.items() for p, t in [("A", a), ("B", b)]}
    conv_d, conv_sd = diffusers_convert_comfyui(sd_d, config)
    ref = merged(model, [({m: (a, b, 1.0) for m, (a, b) in conv_d.items()}, scale_d)])
    visible = check_visible(model, ref, inputs, TOL_F32)
    checked = peft_check(model, ref, inputs, [(conv_sd, None, scale_d)])
    case_dir = os.path.join(root, "comfyui_qkv_f32")
    save_model_case(case_dir, model_src, model)
    save_file(sd_d, os.path.join(case_dir, "lora_comfyui.safetensors"))
    write_case(case_dir, "transformer", "model", inputs, {"sample": run(ref, inputs, torch.float32)}, TOL_F32,
               args={"lora": [{"path": "lora_comfyui.safetensors", "scale": scale_d}]},
               provenance={**prov, "lora_effect_max_abs": visible, "peft_check": checked,
                           "reference": "diffusers _convert_non_diffusers_lumina2_lora_to_diffusers "
                                        "(qkv split with the config's sizes), fused in float32"})

    # kohya: lora_unet_ names, lora_down/lora_up, alpha 2 at rank 4, every linear.
    rank_e, alpha_e, scale_e = 4, 2.0, 1.1
    file_e, diff_e = original_lora(model, block_modules(model, with_embedders=True), rank_e, g, torch.bfloat16)
    sd_e = {}
    for m, (a, b) in file_e.items():
        k = "lora_unet_" + m.replace(".", "_")
        sd_e[f"{k}.lora_down.weight"] = a.to(torch.bfloat16)
        sd_e[f"{k}.lora_up.weight"] = b.to(torch.bfloat16)
        sd_e[f"{k}.alpha"] = torch.tensor(alpha_e)
    ref = merged(model, [({m: (a, b, alpha_e / rank_e) for m, (a, b) in diff_e.items()}, scale_e)])
    visible = check_visible(model, ref, inputs, TOL_F32)
    case_dir = os.path.join(root, "kohya_f32")
    save_model_case(case_dir, model_src, model)
    save_file(sd_e, os.path.join(case_dir, "lora_kohya.safetensors"))
    write_case(case_dir, "transformer", "model", inputs, {"sample": run(ref, inputs, torch.float32)}, TOL_F32,
               args={"lora": [{"path": "lora_kohya.safetensors", "scale": scale_e}]},
               provenance={**prov, "lora_effect_max_abs": visible})

    # gguf_q4_0: original-key Q4_0 GGUF of the same model, a PEFT and a ComfyUI LoRA.
    case_dir = os.path.join(root, "gguf_q4_0_f32")
    cfg_dir = os.path.join(case_dir, "config")
    os.makedirs(cfg_dir, exist_ok=True)
    model.save_config(cfg_dir)
    sd16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    gguf_path = os.path.join(case_dir, "lumina2-q4_0.gguf")
    write_gguf(gguf_path, to_original(sd16))
    base = dequantized_model(model, gguf_path)
    scale_f, scale_g = 0.5, 0.9
    ref = merged(base, [({m: (a, b, alpha / rank) for m, (a, b) in lora_a.items()}, scale_f),
                        ({m: (a, b, 1.0) for m, (a, b) in conv_d.items()}, scale_g)])
    visible = check_visible(base, ref, inputs, TOL_F32)
    save_file(file_a, os.path.join(case_dir, "lora.safetensors"))
    save_file(sd_d, os.path.join(case_dir, "lora_comfyui.safetensors"))
    write_case(case_dir, "transformer", "lumina2-q4_0.gguf", inputs, {"sample": run(ref, inputs, torch.float32)},
               TOL_F32, model_config="config",
               args={"lora": [{"path": "lora.safetensors", "scale": scale_f},
                              {"path": "lora_comfyui.safetensors", "scale": scale_g}]},
               provenance={**prov, "lora_effect_max_abs": visible,
                           "reference": "diffusers model on gguf-py's dequantised weights, LoRAs fused in float32"})
    print("lora/tiny: written")

    if only_tiny:
        return
    # real_dims_comfyui: diffusers' converter as it is (its split fits the 2B model).
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers
    real = make_model(REAL, 33, torch.bfloat16)
    inputs = make_inputs(REAL, 1, [21], 24, 16, 16, 133)
    file_r, _ = original_lora(real, block_modules(real, with_embedders=False), 4, g, torch.bfloat16)
    sd_r = {f"diffusion_model.{m}.lora_{p}.weight": t.to(torch.bfloat16)
            for m, (a, b) in file_r.items() for p, t in [("A", a), ("B", b)]}
    conv = _convert_non_diffusers_lumina2_lora_to_diffusers(dict(sd_r))
    conv_r = {}
    for k, v in conv.items():
        module, part = k[len("transformer."):].rsplit(".lora_", 1)
        conv_r.setdefault(module, [None, None])[0 if part.startswith("A") else 1] = v.float()
    ref = merged(real, [({m: (a, b, 1.0) for m, (a, b) in conv_r.items()}, 0.8)])
    visible = check_visible(real, ref, inputs, TOL_F32)
    case_dir = os.path.join(root, "real_dims_comfyui_f32")
    save_model_case(case_dir, None, real)
    save_file(sd_r, os.path.join(case_dir, "lora_comfyui.safetensors"))
    write_case(case_dir, "transformer", "model", inputs, {"sample": run(ref, inputs, torch.float32)}, TOL_F32,
               args={"lora": [{"path": "lora_comfyui.safetensors", "scale": 0.8}]},
               provenance={**prov, "lora_effect_max_abs": visible,
                           "reference": "diffusers _convert_non_diffusers_lumina2_lora_to_diffusers, fused in float32"})
    print("lora/real_dims: written")
