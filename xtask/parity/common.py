"""Helpers shared by the case generators: writing cases in the format of
docs/parity-cases.md and deterministic random weights."""

import json
import os

import torch
from safetensors.torch import save_file


def write_case(case_dir, component, model, inputs, expected, tolerance, dtype="f32", args=None,
               model_config=None, provenance=None):
    os.makedirs(case_dir, exist_ok=True)
    case = {"component": component, "model": model, "dtype": dtype, "tolerance": tolerance}
    if model_config is not None:
        case["model_config"] = model_config
    if args:
        case["args"] = args
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(case, f, indent=2)
        f.write("\n")
    if inputs:
        save_file({k: _store(v) for k, v in inputs.items()}, os.path.join(case_dir, "inputs.safetensors"))
    save_file({k: _store(v) for k, v in expected.items()}, os.path.join(case_dir, "expected.safetensors"))
    if provenance is not None:
        with open(os.path.join(case_dir, "provenance.json"), "w") as f:
            json.dump(provenance, f, indent=2)
            f.write("\n")


def _store(t):
    """Integers as int64, everything else as float32 (the case format)."""
    t = t.detach().cpu()
    if t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool):
        return t.to(torch.int64).contiguous()
    return t.to(torch.float32).contiguous()


def randomize_(module, seed, storage_dtype=None):
    """Gives every parameter a reproducible random value with a sane scale:
    matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.02).
    With `storage_dtype`, values are rounded to it so that a checkpoint saved in
    that dtype holds exactly the values the reference computes with."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=g) / fan_in ** 0.5
            elif name.endswith("bias"):
                v = torch.randn(p.shape, generator=g) * 0.02
            else:
                v = 1.0 + torch.randn(p.shape, generator=g) * 0.1
            if storage_dtype is not None:
                v = v.to(storage_dtype).to(torch.float32)
            p.copy_(v)


def versions():
    import diffusers
    import transformers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def link_tree(src, dst):
    """Gives `dst` the files of `src`, sub-folders included (hard links where
    possible: each case holds its model, as the format asks, without doubling
    the disk use)."""
    import shutil
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            link_tree(s, d)
            continue
        if os.path.exists(d):
            os.remove(d)
        try:
            os.link(s, d)
        except OSError:
            shutil.copyfile(s, d)
