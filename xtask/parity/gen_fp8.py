"""The fp8 fixture of lumina2-weights (`crates/lumina2-weights/tests/fixtures/fp8.safetensors`),
written by torch: every byte pattern as float8_e4m3fn and as float8_e5m2, a
small "linear weight" in ComfyUI's scaled-fp8 layout (`w.weight` in
float8_e4m3fn, `w.scale_weight` a float32 scalar, and the `scaled_fp8`
marker key, as comfy/model_detection.py looks for it), and torch's
`.to(torch.float32)` of each as the reference (`expected.*`).

    target/parity-venv/bin/python xtask/parity/gen_fp8.py crates/lumina2-weights/tests/fixtures/fp8.safetensors
"""

import sys

import torch
from safetensors.torch import save_file


def main(out):
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    e4m3 = every.view(torch.float8_e4m3fn)
    e5m2 = every.clone().view(torch.float8_e5m2)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(8, 32, generator=g) * 3.0).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.0123, dtype=torch.float32)
    tensors = {
        "e4m3.weight": e4m3,
        "e5m2.weight": e5m2,
        "w.weight": w,
        "w.scale_weight": scale,
        "w.bias": torch.randn(8, generator=g),
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "expected.e4m3": e4m3.to(torch.float32),
        "expected.e5m2": e5m2.to(torch.float32),
        # ComfyUI's scaled_fp8 ops: weight.to(dtype) * scale_weight.to(dtype), here in f32.
        "expected.w": w.to(torch.float32) * scale,
    }
    save_file(tensors, out, metadata={"torch": torch.__version__})


if __name__ == "__main__":
    main(sys.argv[1])
