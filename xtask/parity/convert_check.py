"""Checks that diffusers loads the files `lumina2 convert` writes, with the
same weights our loader reads (run by hand or in CI; needs the `lumina2`
binary):

    target/parity-venv/bin/python xtask/parity/convert_check.py --lumina2 PATH/TO/lumina2 --work DIR

A real-width transformer (hidden 2304, as diffusers' single-file converter
hard-codes the 2B model's qkv split 2304/768/768) with one layer and one
refiner layer, random bf16 weights, is saved as a diffusers folder; then
`lumina2 convert` writes the original single file, an unquantised GGUF, and
Q8_0 / Q4_K GGUF files, and a diffusers folder back from the GGUF file.
diffusers loads each (`Lumina2Transformer2DModel.from_single_file`, with
`GGUFQuantizationConfig` for GGUF; `from_pretrained` for the folder) and
its weights must equal the source's exactly (unquantised); quantised, the
blocks diffusers holds must be the bytes we wrote, and its Q8_0 weights
gguf-py's `dequantize` of them rounded to f16 (diffusers dequantises in the
blocks' f16 scale type); the round-trip error against the dense weights is
printed."""

import argparse
import os
import subprocess

import numpy as np
import torch

import gguf
from diffusers import GGUFQuantizationConfig, Lumina2Transformer2DModel


def dense(model):
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "quant_type"):
            from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
            v = dequantize_gguf_tensor(v)
        out[k] = v.detach().to(torch.float32)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lumina2", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    torch.manual_seed(0)
    src = os.path.join(a.work, "transformer")
    m = Lumina2Transformer2DModel(num_layers=1, num_refiner_layers=1).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    m.save_pretrained(src)
    ref = dense(m)

    def convert(dst, *extra):
        subprocess.run([a.lumina2, "-q", "convert", "--from", src, "--to", dst, *extra], check=True)
        return dst

    failures = 0
    def check(name, got, want, exact=True):
        nonlocal failures
        assert set(got) == set(want), (name, set(got) ^ set(want))
        worst = 0.0
        for k in want:
            d = (got[k] - want[k]).abs().max().item()
            worst = max(worst, d)
            if exact and d != 0:
                failures += 1
                print(f"FAIL {name} {k}: max diff {d}")
        print(f"{name}: {len(want)} tensors, max |diff| {worst:.3g}")

    orig = convert(os.path.join(a.work, "original.safetensors"))
    check("original.safetensors", dense(Lumina2Transformer2DModel.from_single_file(orig, config=src, torch_dtype=torch.float32)), ref)
    f = convert(os.path.join(a.work, "bf16.gguf"))
    q = GGUFQuantizationConfig(compute_dtype=torch.float32)
    check("bf16.gguf", dense(Lumina2Transformer2DModel.from_single_file(f, config=src, quantization_config=q)), ref)
    back = convert(os.path.join(a.work, "back"), "--format", "diffusers")
    check("folder", dense(Lumina2Transformer2DModel.from_pretrained(back, torch_dtype=torch.float32)), ref)
    for qt in ["Q8_0", "Q4_K"]:
        path = convert(os.path.join(a.work, f"{qt}.gguf"), "--quantize", qt)
        model = Lumina2Transformer2DModel.from_single_file(path, config=src, quantization_config=q)
        got = dense(model)
        num = sum((got[k] - ref[k]).pow(2).sum().item() for k in ref)
        den = sum(ref[k].pow(2).sum().item() for k in ref)
        # diffusers keeps the blocks as they are in the file (it splits the
        # fused qkv by rows of whole blocks): the bytes it holds must be ours.
        reader = gguf.GGUFReader(path)
        qkv = next(t for t in reader.tensors if t.name == "layers.0.attention.qkv.weight")
        raw = np.asarray(qkv.data)
        held = torch.cat([model.state_dict()[f"layers.0.attn.to_{p}.weight"].as_tensor().view(torch.uint8)
                          for p in "qkv"]).numpy()
        same_blocks = np.array_equal(raw.reshape(held.shape), held)
        # Values: gguf-py dequantises in f32. diffusers' `dequantize_gguf_tensor`
        # calls its block functions with dtype=None, so they compute in the
        # blocks' f16 scale type: its weights are f16-rounded. For Q8_0 that is
        # one rounding of an exact product, so it must equal gguf-py's values
        # rounded to f16; Q4_K rounds at every step, so only the gap is shown.
        ours = torch.cat([got[f"layers.0.attn.to_{p}.weight"] for p in "qkv"]).numpy()
        deq = gguf.quants.dequantize(raw, qkv.tensor_type).reshape(ours.shape)
        gap = float(np.abs(deq - ours).max())
        f16_equal = np.array_equal(deq.astype(np.float16).astype(np.float32), ours)
        failures += 0 if same_blocks else 1
        if qt == "Q8_0" and not f16_equal:
            failures += 1
        print(f"{qt}.gguf: diffusers holds our blocks unchanged: {same_blocks}; "
              f"its f16 dequantisation vs gguf-py's f32: max |diff| {gap:.3g}"
              f"{' (= gguf-py rounded to f16)' if f16_equal else ''}; "
              f"relative rms error against the dense weights {np.sqrt(num / den):.4f}")
    print("ok" if failures == 0 else f"{failures} failures")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
