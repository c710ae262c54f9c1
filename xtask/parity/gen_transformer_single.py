"""Single-file transformer cases: the original Alpha-VLLM layout as a `.pth`
(bf16, as `consolidated.00-of-01.pth` ships) and as ComfyUI-prefixed
`.safetensors`, each with `model_config` pointing at the diffusers config.

At the real dimensions the reference is diffusers' `from_single_file` of the
`.pth` (its converter hard-codes the 2B model's qkv split); the tiny fixtures
use sizes that converter cannot split, so their reference is the diffusers
model the file was made from.

diffusers 0.42.1's `from_single_file` fails on ComfyUI-prefixed Lumina2 files
(`convert_lumina2_to_diffusers` renames the prefixed keys, then pops them by
their old names: KeyError). The ComfyUI case holds the same tensors as the
`.pth` case, so its reference is the same `from_single_file` output."""

import os

import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
from safetensors.torch import save_file

from common import versions, write_case
from gen_transformer import REAL, TINY, make_inputs, make_model, run

TOL = {"atol": 1e-5, "rtol": 1e-4}


def to_original(sd):
    """diffusers state dict -> original Alpha-VLLM keys (fused qkv, norm_final)."""
    out = {}
    for k, v in sd.items():
        if ".attn.to_k." in k or ".attn.to_v." in k:
            continue
        o = k
        if ".attn.to_q." in k:
            base = k.replace(".attn.to_q.weight", "")
            out[base + ".attention.qkv.weight"] = torch.cat(
                [sd[base + ".attn.to_q.weight"], sd[base + ".attn.to_k.weight"], sd[base + ".attn.to_v.weight"]], 0)
            continue
        for a, b in [
            ("time_caption_embed.caption_embedder", "cap_embedder"),
            ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
            ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
            ("norm_out.linear_1", "final_layer.adaLN_modulation.1"),
            ("norm_out.linear_2", "final_layer.linear"),
            (".attn.to_out.0.", ".attention.out."),
            (".attn.norm_q.", ".attention.q_norm."),
            (".attn.norm_k.", ".attention.k_norm."),
            (".feed_forward.linear_1.", ".feed_forward.w1."),
            (".feed_forward.linear_2.", ".feed_forward.w2."),
            (".feed_forward.linear_3.", ".feed_forward.w3."),
            (".norm1.linear.", ".adaLN_modulation.1."),
            (".norm1.norm.", ".attention_norm1."),
            (".norm1.weight", ".attention_norm1.weight"),
            (".norm2.", ".attention_norm2."),
        ]:
            o = o.replace(a, b)
        out[o] = v
    # Present in the original checkpoint, unused by the model.
    out["norm_final.weight"] = torch.ones(sd["x_embedder.bias"].shape[0], dtype=sd["x_embedder.bias"].dtype)
    return out


def write_gguf(path, original):
    """Original keys, like the community `lumina2-q4_0.gguf`: 2-D weights whose
    rows are whole Q4_0 blocks quantised by gguf-py, everything else F32."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "lumina2")
    for k, v in original.items():
        a = v.float().numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0)
            w.add_tensor(k, q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(k, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantized_model(model, gguf_path):
    """The diffusers model with the GGUF's weights as gguf-py dequantises them."""
    import gguf
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    r = gguf.GGUFReader(gguf_path)
    sd = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
          .reshape([int(d) for d in reversed(t.shape)]) for t in r.tensors}
    try:
        conv = convert_lumina2_to_diffusers(dict(sd))  # it pops from its argument
    except Exception:  # sizes diffusers' converter cannot split: split by the config
        conv = None
    if conv is None or set(conv) != set(model.state_dict()):
        h = model.config.hidden_size
        kv = model.config.num_kv_heads * (h // model.config.num_attention_heads)
        conv = {}
        for k, v in sd.items():
            if k == "norm_final.weight":
                continue
            from_orig = _orig_to_diffusers(k)
            if "qkv" in from_orig:
                for n, part in zip(["to_q", "to_k", "to_v"], torch.split(v, [h, kv, kv])):
                    conv[from_orig.replace("qkv", n)] = part
            else:
                conv[from_orig] = v
    ref = Lumina2Transformer2DModel.from_config(model.config)
    ref.load_state_dict(conv, strict=True)
    return ref.eval()


def _orig_to_diffusers(k):
    import re
    k = re.sub(r"^context_refiner\.(\d+)\.attention_norm1", r"context_refiner.\1.norm1", k)
    k = re.sub(r"^context_refiner\.(\d+)\.attention_norm2", r"context_refiner.\1.norm2", k)
    for a, b in [("final_layer.adaLN_modulation.1", "norm_out.linear_1"), ("final_layer.linear", "norm_out.linear_2"),
                 ("attention_norm1", "norm1.norm"), ("attention_norm2", "norm2"),
                 ("cap_embedder", "time_caption_embed.caption_embedder"),
                 ("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
                 ("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2"),
                 ("attention", "attn"), (".out.", ".to_out.0."), ("k_norm", "norm_k"), ("q_norm", "norm_q"),
                 ("w1", "linear_1"), ("w2", "linear_2"), ("w3", "linear_3"), ("adaLN_modulation.1", "norm1.linear")]:
        k = k.replace(a, b)
    return k


def generate(out_dir, only_tiny=False):
    specs = [("tiny", TINY, 21, 2, [4, 10], 12, 6, 8)]
    if not only_tiny:
        specs.append(("real_dims", REAL, 22, 1, [23], 24, 16, 16))
    for name, config, seed, batch, lens, L, H, W in specs:
        model = make_model(config, seed, torch.bfloat16)
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        original = to_original(sd)
        # diffusers' own converter must map the file back (for sizes it can split).
        if name == "real_dims":
            back = convert_lumina2_to_diffusers(dict(original))
            assert set(back) == set(sd), set(back) ^ set(sd)
        inputs = make_inputs(config, batch, lens, L, H, W, seed + 100)
        expected = None
        for kind in ["pth", "comfyui"]:
            case_dir = os.path.join(out_dir, "transformer", f"{name}_{kind}_f32")
            cfg_dir = os.path.join(case_dir, "config")
            os.makedirs(cfg_dir, exist_ok=True)
            model.save_config(cfg_dir)
            if kind == "pth":
                file = "consolidated.00-of-01.pth"
                torch.save(original, os.path.join(case_dir, file))
            else:
                file = "lumina2_comfyui.safetensors"
                save_file({"model.diffusion_model." + k: v for k, v in original.items()},
                          os.path.join(case_dir, file))
            if expected is None:
                if name == "real_dims":
                    ref = Lumina2Transformer2DModel.from_single_file(
                        os.path.join(case_dir, file), config=cfg_dir, torch_dtype=torch.float32).eval()
                else:
                    ref = model
                expected = {"sample": run(ref, inputs, torch.float32)}
            write_case(case_dir, "transformer", file, inputs, expected, TOL, dtype="f32", model_config="config",
                       provenance={"generator": "xtask/parity/gen_transformer_single.py",
                                   "reference": "from_single_file" if name == "real_dims" else "diffusers model",
                                   **versions()})
        # Q4_0 GGUF with original keys. The reference is PyTorch on the weights
        # gguf-py dequantises; at the real dimensions, diffusers' own GGUF path.
        case_dir = os.path.join(out_dir, "transformer", f"{name}_gguf_q4_0_f32")
        cfg_dir = os.path.join(case_dir, "config")
        os.makedirs(cfg_dir, exist_ok=True)
        model.save_config(cfg_dir)
        gguf_path = os.path.join(case_dir, "lumina2-q4_0.gguf")
        write_gguf(gguf_path, original)
        ref = dequantized_model(model, gguf_path)
        expected = {"sample": run(ref, inputs, torch.float32)}
        reference = "diffusers model on gguf-py dequantised weights"
        extra = {}
        if name == "real_dims":
            # diffusers' own GGUF path (weights kept quantised, dequantised by
            # diffusers when used) is the reference; it must agree with the
            # dequantised model.
            from diffusers import GGUFQuantizationConfig

            q = Lumina2Transformer2DModel.from_single_file(
                gguf_path, config=cfg_dir, torch_dtype=torch.float32,
                quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()
            with torch.no_grad():  # a quantised model cannot be cast: no `run`
                via_diffusers = q(hidden_states=inputs["hidden_states"], timestep=inputs["timestep"],
                                  encoder_hidden_states=inputs["encoder_hidden_states"],
                                  encoder_attention_mask=inputs["encoder_attention_mask"],
                                  return_dict=False)[0].float()
            diff = (via_diffusers - expected["sample"]).abs().max().item()
            assert diff < 1e-4, diff
            expected = {"sample": via_diffusers}
            reference = "diffusers from_single_file with GGUFQuantizationConfig(compute_dtype=float32)"
            extra["max_abs_vs_gguf_py_dequantised_model"] = diff
        write_case(case_dir, "transformer", "lumina2-q4_0.gguf", inputs, expected, TOL, dtype="f32",
                   model_config="config",
                   provenance={"generator": "xtask/parity/gen_transformer_single.py",
                               "reference": reference, **extra, **versions()})
        print(f"transformer single-file/{name}: written")
