"""VAE cases: diffusers' AutoencoderKL (decode, encode's latent distribution,
tiled decode and encode) on random weights."""

import copy
import os

import torch
from diffusers import AutoencoderKL

from diffusers.utils import logging as _dlogging

from common import link_tree, randomize_, versions, write_case

# Tiny: three levels (two downsamplings), quant convs, a GELU resnet activation.
TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=4, act_fn="gelu", sample_size=32,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
    scaling_factor=0.5, shift_factor=0.1,
)

# Tiny Flux-like: no quant convs, two layers per block, silu, small sample_size
# (16: tiles of 16 pixels / 4 latents) so that tiling triggers on small inputs.
TINY_FLUX = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2, norm_num_groups=4, act_fn="silu", sample_size=16,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    scaling_factor=0.3611, shift_factor=0.1159,
)

# The Flux VAE of Lumina-Image 2.0 (Alpha-VLLM/Lumina-Image-2.0 vae/config.json).
FLUX = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    scaling_factor=0.3611, shift_factor=0.1159,
)

_dlogging.set_verbosity_error()

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def make_model(config, seed, storage_dtype):
    model = AutoencoderKL(**config)
    randomize_(model, seed, storage_dtype)
    return model.eval()


def run(model, component, x, dtype, tiling):
    # A copy: casting `model` itself to bf16 and back would round its weights.
    m = copy.deepcopy(model).to(dtype)
    if tiling:
        m.enable_tiling()
    with torch.no_grad():
        if component == "vae_decode":
            out = {"sample": m.decode(x.to(dtype)).sample.float()}
        else:
            d = m.encode(x.to(dtype)).latent_dist
            out = {"mean": d.mean.float(), "logvar": d.logvar.float()}
    return out


def make_input(component, config, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if component == "vae_decode":
        return {"latents": torch.randn(*shape, generator=g)}
    # A smooth image plus noise, in [-1, 1].
    b, c, h, w = shape
    yy = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    phase = torch.rand(b, c, 1, 1, generator=g) * 6.28
    img = 0.6 * torch.sin(3 * xx + 2 * yy + phase) + 0.3 * (torch.rand(b, c, h, w, generator=g) * 2 - 1)
    return {"sample": img.clamp(-1, 1)}


# name, config, weight seed, storage dtype, component, input shape, tiling, real
SPECS = [
    ("tiny", TINY, 11, torch.float16, "vae_decode", (2, 4, 6, 5), False, False),
    ("tiny", TINY, 11, torch.float16, "vae_encode", (2, 3, 24, 20), False, False),
    ("tiny_odd", TINY, 11, torch.float16, "vae_encode", (1, 3, 13, 7), False, False),
    ("tiny_flux_tiled", TINY_FLUX, 12, torch.float16, "vae_decode", (1, 4, 10, 9), True, False),
    ("tiny_flux_tiled", TINY_FLUX, 12, torch.float16, "vae_encode", (1, 3, 40, 36), True, False),
    ("flux", FLUX, 13, torch.bfloat16, "vae_decode", (1, 16, 16, 16), False, True),
    ("flux", FLUX, 13, torch.bfloat16, "vae_encode", (1, 3, 128, 128), False, True),
]


def generate(out_dir, only_tiny=False):
    models = {}
    for name, config, seed, storage, component, shape, tiling, real in SPECS:
        if real and only_tiny:
            continue
        key = seed
        if key not in models:
            models[key] = (make_model(config, seed, storage), None)
        model, model_dir = models[key]
        inputs = make_input(component, config, shape, seed + 100 + len(component))
        (x,) = inputs.values()
        ref32 = run(model, component, x, torch.float32, tiling)
        for dtype_name, dtype in DTYPES.items():
            case_dir = os.path.join(out_dir, component, f"{name}_{dtype_name}")
            case_model = os.path.join(case_dir, "model")
            if model_dir is None:
                copy.deepcopy(model).to(storage).save_pretrained(case_model, safe_serialization=True)
                model_dir = case_model
                models[key] = (model, model_dir)
            else:
                link_tree(model_dir, case_model)
            expected = ref32 if dtype == torch.float32 else run(model, component, x, dtype, tiling)
            noise = {k: (expected[k] - ref32[k]).abs().max().item() for k in expected}
            tol = TOLERANCES[(real, dtype_name)]
            write_case(case_dir, component, "model", inputs, expected, tol, dtype=dtype_name,
                       args={"tiling": True} if tiling else None,
                       provenance={"generator": "xtask/parity/gen_vae.py", "storage": str(storage),
                                   "config": name, "torch_bf16_vs_f32_max_abs": noise, **versions()})
            print(f"{component}/{name}_{dtype_name}: written (max |torch {dtype_name} - torch f32| {noise})")


# Tolerances, measured (crate README "Parity"). f32 differs from PyTorch only by
# summation order: max |error| 3.3e-6 on the tiny models, 1.3e-5 on the real
# Flux config (outputs up to 3.2). In bf16 the reference is only as good as bf16:
# PyTorch bf16 deviates from its own f32 result by up to 0.049 (mean 0.006) on
# the real decode and 0.046 on the tiny ones; ours deviates from PyTorch bf16 by
# up to 0.051: two independent roundings of the same size, hence atol 0.08.
TOLERANCES = {
    (False, "f32"): {"atol": 1e-5, "rtol": 1e-5},
    (True, "f32"): {"atol": 5e-5, "rtol": 1e-4},
    (False, "bf16"): {"atol": 8e-2, "rtol": 2e-2},
    (True, "bf16"): {"atol": 8e-2, "rtol": 2e-2},
}
