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
its weights must equal the source's exactly (unquantised) or gguf-py's
`dequantize` of our blocks (quantised; the round-trip error against the
dense weights is printed)."""

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
        got = dense(Lumina2Transformer2DModel.from_single_file(path, config=src, quantization_config=q))
        # gguf-py's reading of our blocks, mapped as diffusers maps the keys.
        reader = gguf.GGUFReader(path)
        x2 = ref["x_embedder.weight"]
        num = sum((got[k] - ref[k]).pow(2).sum().item() for k in ref)
        den = sum(ref[k].pow(2).sum().item() for k in ref)
        qkv = next(t for t in reader.tensors if t.name == "layers.0.attention.qkv.weight")
        deq = gguf.quants.dequantize(np.asarray(qkv.data), qkv.tensor_type)
        ours = torch.cat([got[f"layers.0.attn.to_{p}.weight"] for p in "qkv"]).numpy()
        same = np.array_equal(deq.reshape(ours.shape), ours)
        failures += 0 if same else 1
        print(f"{qt}.gguf: gguf-py dequantize == diffusers' weights: {same}; "
              f"relative rms error against the dense weights {np.sqrt(num / den):.4f}; x_embedder {x2.shape}")
    print("ok" if failures == 0 else f"{failures} failures")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
