"""Z-Image transformer cases on the files people download, written from a
diffusers model's weights:

- `orig_*`: ComfyUI's / Tongyi's single file (`diffusion_models/
  z_image_turbo_bf16.safetensors`: original keys, fused `attention.qkv`,
  `attention.out`, `q_norm`/`k_norm`, `x_embedder`, `final_layer`, plus the
  unused `norm_final.weight`); the reference is diffusers 0.42.1's
  `ZImageTransformer2DModel.from_single_file` of that file (its
  `convert_z_image_transformer_checkpoint_to_diffusers`), checked to give back
  the model's weights bit for bit;
- `comfy_checkpoint_f32`: the same under ComfyUI's `model.diffusion_model.`
  prefix, again through `from_single_file`;
- `gguf_q4_0_f32`: the community GGUF layout (ComfyUI-GGUF's
  `tools/convert.py`: original keys, `general.architecture` = `lumina2`),
  written by gguf-py with 2-D weights whose rows are whole Q4_0 blocks
  quantised, the rest F32; the reference is diffusers' model on gguf-py's
  dequantised weights, mapped by diffusers' converter;
- `gguf_q4_0_lora_f32`: that GGUF with a kohya LoRA (`lora_unet_*`,
  `lora_down`/`lora_up`, `.alpha`; strength 0.8) and a diffusers/PEFT one
  (`transformer.*.lora_A/lora_B`; strength -0.6);
- `orig_lora_f32`: the original file with an ai-toolkit / ComfyUI LoRA
  (`diffusion_model.*` diffusers module names, `lora_A`/`lora_B`, `.alpha`).

LoRA references: the non-diffusers files go through diffusers'
`_convert_non_diffusers_z_image_lora_to_diffusers` (what
`ZImagePipeline.lora_state_dict` does: alpha folded into the factors), then
every update is fused in float32, `W + scale * B @ A`, as PEFT's `fuse_lora`."""

import os

import numpy as np
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from common import link_tree, versions, write_case
from gen_transformer import TOLERANCES
from gen_zimage_transformer import make_inputs, make_model, run

# One patch size (the original layout has one `x_embedder`), a width whose
# rows are whole Q4_0 blocks (so that the fused qkv is cut while quantised).
SMALL = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
    n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
    rope_theta=256.0, t_scale=1000.0, axes_dims=(4, 4, 8), axes_lens=(128, 32, 32),
)

TOL = TOLERANCES[(False, "f32")]


def to_original(sd):
    """diffusers state dict -> the original / ComfyUI keys (the inverse of
    `convert_z_image_transformer_checkpoint_to_diffusers`)."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            base = k.replace(".attention.to_q.weight", "")
            out[base + ".attention.qkv.weight"] = torch.cat(
                [sd[base + ".attention.to_q.weight"], sd[base + ".attention.to_k.weight"],
                 sd[base + ".attention.to_v.weight"]], 0)
            continue
        o = k.replace("all_final_layer.2-1.", "final_layer.").replace("all_x_embedder.2-1.", "x_embedder.")
        for a, b in [(".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                     (".attention.norm_k.", ".attention.k_norm.")]:
            o = o.replace(a, b)
        out[o] = v
    # Lumina's unused final norm, present in original checkpoints.
    out["norm_final.weight"] = torch.ones(sd["cap_embedder.1.bias"].shape, dtype=sd["cap_embedder.1.bias"].dtype)
    return out


def write_gguf(path, original):
    """As the community files: original keys, architecture `lumina2` (what
    ComfyUI-GGUF's convert.py detects for Z-Image), 2-D weights with whole
    Q4_0 rows quantised by gguf-py, the rest F32."""
    import gguf

    w = gguf.GGUFWriter(path, "lumina2")
    for k, v in original.items():
        a = v.float().numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0 and a.shape[0] > 1:
            w.add_tensor(k, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(k, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantized_model(config, gguf_path):
    import gguf

    r = gguf.GGUFReader(gguf_path)
    sd = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
          .reshape([int(d) for d in reversed(t.shape)]) for t in r.tensors}
    conv = convert_z_image_transformer_checkpoint_to_diffusers(sd)
    ref = ZImageTransformer2DModel(**config)
    ref.load_state_dict(conv, strict=True)
    return ref.eval()


def linear_modules(model):
    return sorted(n[: -len(".weight")] for n, p in model.named_parameters()
                  if p.ndim == 2 and n.endswith(".weight"))


def factors(model, modules, rank, g):
    params = dict(model.named_parameters())
    out = {}
    for m in modules:
        o, i = params[m + ".weight"].shape
        out[m] = (torch.randn(rank, i, generator=g) / i ** 0.5, torch.randn(o, rank, generator=g) * 0.5)
    return out


def fuse(model, diffusers_lora, scale):
    """W + scale * B @ A for every `transformer.<module>.lora_A/B` pair (alpha
    already folded in by diffusers' converter, or rank = alpha)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, a in diffusers_lora.items():
            if not k.endswith(".lora_A.weight"):
                continue
            m = k[len("transformer."): -len(".lora_A.weight")]
            b = diffusers_lora[k.replace(".lora_A.", ".lora_B.")]
            params[m + ".weight"] += scale * (b.float() @ a.float())


def kohya_lora(model, modules, rank, alpha, g):
    sd = {}
    for m, (a, b) in factors(model, modules, rank, g).items():
        name = "lora_unet_" + m.replace(".", "_")
        sd[name + ".lora_down.weight"] = a
        sd[name + ".lora_up.weight"] = b
        sd[name + ".alpha"] = torch.tensor(float(alpha))
    return sd


def ai_toolkit_lora(model, modules, rank, alpha, g):
    sd = {}
    for m, (a, b) in factors(model, modules, rank, g).items():
        sd[f"diffusion_model.{m}.lora_A.weight"] = a
        sd[f"diffusion_model.{m}.lora_B.weight"] = b
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(float(alpha))
    return sd


def peft_lora(model, modules, rank, g):
    sd = {}
    for m, (a, b) in factors(model, modules, rank, g).items():
        sd[f"transformer.{m}.lora_A.weight"] = a
        sd[f"transformer.{m}.lora_B.weight"] = b
    return sd


def with_loras(base, loras):
    """A copy of `base` with the LoRAs fused: (state dict, scale); each
    non-diffusers file through diffusers' Z-Image converter."""
    import copy

    m = copy.deepcopy(base)
    for sd, scale in loras:
        if any(not k.startswith("transformer.") for k in sd):
            sd = _convert_non_diffusers_z_image_lora_to_diffusers(dict(sd))
        fuse(m, sd, scale)
    return m.eval()


def link_model(src_case, dst_case, file):
    """Gives `dst_case` the model file and config of `src_case` (hard links),
    nothing else: its own case.json and tensors are written afterwards."""
    os.makedirs(dst_case, exist_ok=True)
    link_tree(os.path.join(src_case, "config"), os.path.join(dst_case, "config"))
    d = os.path.join(dst_case, file)
    if os.path.exists(d):
        os.remove(d)
    os.link(os.path.join(src_case, file), d)


def check_visible(base, ref, inputs):
    d = (run(ref, inputs, torch.float32, 2) - run(base, inputs, torch.float32, 2)).abs().max().item()
    assert d > 100 * TOL["atol"], f"the LoRAs change the output by only {d}"
    return d


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), set(sa) ^ set(sb)
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def generate(out_dir, only_tiny=False, only_committed=False):
    model = make_model(SMALL, 41, torch.bfloat16)
    sd16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    original = to_original(sd16)
    inputs = make_inputs(SMALL, [5, 40], 8, 12, 141)
    root = os.path.join(out_dir, "zimage_files")
    prov = {"generator": "xtask/parity/gen_zimage_files.py", **versions()}
    modules = linear_modules(model)
    blocks = [m for m in modules if m.split(".")[0] in ("layers", "noise_refiner", "context_refiner")]
    g = torch.Generator().manual_seed(42)

    def config_dir(case_dir):
        d = os.path.join(case_dir, "config")
        os.makedirs(d, exist_ok=True)
        model.save_config(d)
        return d

    # The community GGUF, alone and with two LoRAs.
    gguf_dir = os.path.join(root, "gguf_q4_0_f32")
    os.makedirs(gguf_dir, exist_ok=True)
    gguf_path = os.path.join(gguf_dir, "z_image-q4_0.gguf")
    write_gguf(gguf_path, original)
    config_dir(gguf_dir)
    base = dequantized_model(SMALL, gguf_path)
    write_case(gguf_dir, "zimage_transformer", "z_image-q4_0.gguf", inputs,
               {"sample": run(base, inputs, torch.float32, 2)}, TOL, model_config="config",
               args={"patch_size": 2},
               provenance={**prov, "reference": "diffusers model on gguf-py's dequantised weights "
                                                "(convert_z_image_transformer_checkpoint_to_diffusers)"})
    print("zimage_files/gguf_q4_0_f32: written")

    case_dir = os.path.join(root, "gguf_q4_0_lora_f32")
    link_model(gguf_dir, case_dir, "z_image-q4_0.gguf")
    kohya = kohya_lora(model, blocks + ["all_x_embedder.2-1", "cap_embedder.1"], 4, 2.0, g)
    peft = peft_lora(model, [m for m in blocks if m.startswith("layers.")], 2, g)
    save_file(kohya, os.path.join(case_dir, "kohya.safetensors"))
    save_file(peft, os.path.join(case_dir, "peft.safetensors"))
    ref = with_loras(base, [(kohya, 0.8), (peft, -0.6)])
    moved = check_visible(base, ref, inputs)
    write_case(case_dir, "zimage_transformer", "z_image-q4_0.gguf", inputs,
               {"sample": run(ref, inputs, torch.float32, 2)}, TOL, model_config="config",
               args={"patch_size": 2, "lora": [{"path": "kohya.safetensors", "scale": 0.8},
                                               {"path": "peft.safetensors", "scale": -0.6}]},
               provenance={**prov, "reference": "dequantised GGUF, LoRAs through "
                                                "_convert_non_diffusers_z_image_lora_to_diffusers, fused in f32",
                           "lora_moves_output_by": moved})
    print(f"zimage_files/gguf_q4_0_lora_f32: written (the LoRAs move the output by {moved:.3g})")
    if only_committed:
        return

    # ComfyUI's single file, bare and under the checkpoint prefix.
    for name, prefix in [("orig", ""), ("comfy_checkpoint", "model.diffusion_model.")]:
        dtypes = [("f32", torch.float32), ("bf16", torch.bfloat16)] if name == "orig" else [("f32", torch.float32)]
        first = None
        for dtype_name, dtype in dtypes:
            case_dir = os.path.join(root, f"{name}_{dtype_name}")
            file = "z_image_turbo_bf16.safetensors"
            if first is None:
                os.makedirs(case_dir, exist_ok=True)
                save_file({prefix + k: v.contiguous() for k, v in original.items()}, os.path.join(case_dir, file))
                cfg = config_dir(case_dir)
                ref = ZImageTransformer2DModel.from_single_file(
                    os.path.join(case_dir, file), config=cfg, torch_dtype=torch.float32).eval()
                same_weights(ref, model)
                first = case_dir
            else:
                link_model(first, case_dir, file)
            write_case(case_dir, "zimage_transformer", file, inputs,
                       {"sample": run(ref, inputs, dtype, 2)}, TOLERANCES[(False, dtype_name)],
                       dtype=dtype_name, model_config="config", args={"patch_size": 2},
                       provenance={**prov, "reference": "ZImageTransformer2DModel.from_single_file"})
            print(f"zimage_files/{name}_{dtype_name}: written")

    # The original file with an ai-toolkit / ComfyUI LoRA.
    case_dir = os.path.join(root, "orig_lora_f32")
    link_model(os.path.join(root, "orig_f32"), case_dir, "z_image_turbo_bf16.safetensors")
    lora = ai_toolkit_lora(model, modules, 3, 1.5, g)
    save_file(lora, os.path.join(case_dir, "comfy_lora.safetensors"))
    base = ZImageTransformer2DModel.from_single_file(
        os.path.join(case_dir, "z_image_turbo_bf16.safetensors"), config=os.path.join(case_dir, "config"),
        torch_dtype=torch.float32).eval()
    ref = with_loras(base, [(lora, 1.0)])
    moved = check_visible(base, ref, inputs)
    write_case(case_dir, "zimage_transformer", "z_image_turbo_bf16.safetensors", inputs,
               {"sample": run(ref, inputs, torch.float32, 2)}, TOL, model_config="config",
               args={"patch_size": 2, "lora": [{"path": "comfy_lora.safetensors", "scale": 1.0}]},
               provenance={**prov, "reference": "from_single_file, LoRA through "
                                                "_convert_non_diffusers_z_image_lora_to_diffusers, fused in f32",
                           "lora_moves_output_by": moved})
    print(f"zimage_files/orig_lora_f32: written (the LoRA moves the output by {moved:.3g})")
