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
printed.

The pipeline part: the committed tiny pipeline is written as ComfyUI's
all-in-one checkpoint (`--format comfy`, the SentencePiece tokenizer taken
from the committed checkpoint's `spiece_model`, the tiny vocabulary), then
back to a whole pipeline folder (`lumina2 convert --from lumina_2.safetensors
--to DIR`, the tiny configs given since its sizes are not the real model's).
diffusers' `Lumina2Pipeline.from_pretrained` loads that folder: every
component's weights must equal the original folder's, `AutoTokenizer` must
give the same ids, and a seeded generation the same image, exactly.
Then the configs derived from the tensors: a split Gemma-2 file (Gemma-2-2B's
settings at small sizes, the real head width 256, random weights, the tiny
`spiece_model`) is converted with no text encoder config; transformers'
`Gemma2Model.from_pretrained` must load the written config (its types are
checked) and give the source model's `hidden_states[-2]` exactly.

    ... convert_check.py --lumina2 PATH --work DIR [--part transformer|pipeline]"""

import argparse
import os
import subprocess
import sys

import numpy as np
import torch

import gguf
from diffusers import GGUFQuantizationConfig, Lumina2Pipeline, Lumina2Transformer2DModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
TINY = os.path.join(ROOT, "crates/lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline")
TINY_CKPT = os.path.join(ROOT, "crates/lumina2-pipeline/tests/fixtures/comfy/lumina_2.safetensors")


def dense(model):
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "quant_type"):
            from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
            v = dequantize_gguf_tensor(v)
        out[k] = v.detach().to(torch.float32)
    return out


def check_pipeline(a):
    """ComfyUI all-in-one -> diffusers pipeline folder, loaded by diffusers."""
    from transformers import AutoTokenizer

    work = os.path.join(a.work, "pipeline")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, "lumina_2.safetensors")
    out = os.path.join(work, "converted")
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    run = lambda *args: subprocess.run([a.lumina2, "-q", "convert", *args], check=True)
    run("--from", TINY, "--to", ckpt, "--format", "comfy", "--tokenizer", TINY_CKPT)
    run("--from", ckpt, "--to", out,
        "--config", os.path.join(TINY, "transformer/config.json"),
        "--text-encoder-config", os.path.join(TINY, "text_encoder"),
        "--vae-config", os.path.join(TINY, "vae"))
    failures = 0
    ref = Lumina2Pipeline.from_pretrained(TINY, torch_dtype=torch.float32)
    got = Lumina2Pipeline.from_pretrained(out, torch_dtype=torch.float32)
    for name in ["transformer", "text_encoder", "vae"]:
        want = getattr(ref, name).state_dict()
        have = getattr(got, name).state_dict()
        same = set(want) == set(have) and all(torch.equal(want[k], have[k]) for k in want)
        failures += 0 if same else 1
        print(f"pipeline {name}: {len(want)} tensors, identical: {same}")
    for name in ["scheduler", "vae", "transformer"]:
        # `_name_or_path` is where each was loaded from.
        cfg = lambda m: {k: v for k, v in dict(m.config).items() if k != "_name_or_path"}
        same = cfg(getattr(ref, name)) == cfg(getattr(got, name))
        failures += 0 if same else 1
        print(f"pipeline {name} config equal: {same}")
    te_cfg = lambda m: {k: v for k, v in m.text_encoder.config.to_dict().items() if k != "_name_or_path"}
    same = te_cfg(ref) == te_cfg(got)
    failures += 0 if same else 1
    print(f"pipeline text_encoder config equal: {same}")
    print(f"pipeline tokenizer class: {type(got.tokenizer).__name__}")
    texts = ["a red fox in the snow", "  two  spaces\tand a tab\nnew line",
             "ünïcödé, 日本語, emoji 🦊 <bos> <pad>", ""]
    tok_ref = AutoTokenizer.from_pretrained(os.path.join(TINY, "tokenizer"))
    tok_got = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    same_ids = all(tok_ref(t).input_ids == tok_got(t).input_ids for t in texts)
    failures += 0 if same_ids else 1
    print(f"pipeline tokenizer: same ids on {len(texts)} texts: {same_ids}")

    def image(pipe):
        return pipe("a red fox in the snow", width=48, height=32, num_inference_steps=4,
                    max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(42),
                    output_type="pt").images
    a_img, b_img = image(ref), image(got)
    same_img = torch.equal(a_img, b_img)
    failures += 0 if same_img else 1
    print(f"pipeline image (seed 42, 48x32, 4 steps): identical: {same_img} "
          f"(max |diff| {(a_img - b_img).abs().max().item():.3g}, "
          f"image std {a_img.std().item():.3g})")
    return failures + check_derived_text_encoder(a, work)


def check_derived_text_encoder(a, work):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=256)
    m = Gemma2Model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    sd = {f"model.{k}": v.contiguous() for k, v in m.state_dict().items()}
    with safe_open(TINY_CKPT, "pt") as f:
        sd["spiece_model"] = f.get_tensor("text_encoders.spiece_model")
    te = os.path.join(work, "gemma_2_small.safetensors")
    save_file(sd, te)
    out = os.path.join(work, "derived")
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    subprocess.run([a.lumina2, "-q", "convert", "--from", os.path.join(TINY, "transformer"),
                    "--text-encoder", te, "--vae", os.path.join(TINY, "vae"), "--to", out,
                    "--format", "diffusers-pipeline"], check=True)
    got = Gemma2Model.from_pretrained(os.path.join(out, "text_encoder")).eval()
    ids = torch.tensor([[2, 5, 17, 300, 42, 7, 1]])
    with torch.no_grad():
        want = m(ids, output_hidden_states=True).hidden_states[-2]
        have = got(ids, output_hidden_states=True).hidden_states[-2]
    same = torch.equal(want, have)
    print(f"pipeline derived text encoder config: Gemma2Model loads it, hidden_states[-2] identical: {same}")
    return 0 if same else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lumina2", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--part", choices=["all", "transformer", "pipeline"], default="all")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    pipeline_failures = check_pipeline(a) if a.part in ("all", "pipeline") else 0
    if a.part == "pipeline":
        print("ok" if pipeline_failures == 0 else f"{pipeline_failures} failures")
        sys.exit(1 if pipeline_failures else 0)
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

    failures = pipeline_failures
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
