"""Transformer cases: diffusers' Lumina2Transformer2DModel on random weights."""

import os

import torch
from diffusers import Lumina2Transformer2DModel

from common import link_tree, randomize_, versions, write_case

TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
    num_attention_heads=4, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
    axes_dim_rope=(2, 2, 4), axes_lens=(32, 16, 16), cap_feat_dim=24,
)

# Another configuration corner: no GQA, a feed-forward multiplier, out_channels != in_channels,
# patch size 1, a different norm_eps.
TINY_VARIANT = dict(
    sample_size=8, patch_size=1, in_channels=4, out_channels=6, hidden_size=48, num_layers=1,
    num_refiner_layers=2, num_attention_heads=2, num_kv_heads=2, multiple_of=32,
    ffn_dim_multiplier=1.3, norm_eps=1e-6, axes_dim_rope=(8, 8, 8), axes_lens=(24, 12, 12),
    cap_feat_dim=40,
)

# The real 2B dimensions (Alpha-VLLM/Lumina-Image-2.0 transformer/config.json), few layers.
REAL = dict(
    sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=1, num_refiner_layers=1,
    num_attention_heads=24, num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
    axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512), cap_feat_dim=2304,
)


def make_model(config, seed, storage_dtype):
    model = Lumina2Transformer2DModel(**config)
    randomize_(model, seed, storage_dtype)
    return model.eval()


def make_inputs(config, batch, cap_lens, cap_len, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], height, width, generator=g)
    t = torch.rand(batch, generator=g)
    cap = torch.randn(batch, cap_len, config["cap_feat_dim"], generator=g)
    mask = torch.zeros(batch, cap_len, dtype=torch.int64)
    for i, n in enumerate(cap_lens):
        mask[i, :n] = 1
    return {"hidden_states": x, "timestep": t, "encoder_hidden_states": cap, "encoder_attention_mask": mask}


def run(model, inputs, dtype):
    m = model.to(dtype)
    with torch.no_grad():
        out = m(
            hidden_states=inputs["hidden_states"].to(dtype),
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
            encoder_attention_mask=inputs["encoder_attention_mask"],
            return_dict=False,
        )[0]
    model.to(torch.float32)
    return out.float()


def generate(out_dir, only_tiny=False):
    torch.manual_seed(0)
    specs = [
        # name, config, seed, storage dtype, batch, caption lengths, L, H, W, shard size
        ("tiny", TINY, 1, torch.float32, 2, [5, 9], 12, 8, 12, None),
        ("tiny_variant", TINY_VARIANT, 2, torch.float16, 3, [3, 7, 7], 8, 6, 5, None),
        ("tiny_single", TINY, 3, torch.float32, 1, [6], 10, 10, 6, None),
    ]
    if not only_tiny:
        specs.append(("real_dims", REAL, 4, torch.bfloat16, 2, [17, 29], 32, 16, 24, "300MB"))
    for name, config, seed, storage, batch, lens, L, H, W, shard in specs:
        model = make_model(config, seed, storage)
        inputs = make_inputs(config, batch, lens, L, H, W, seed + 100)
        first_model_dir = None
        dtypes = [("f32", torch.float32), ("bf16", torch.bfloat16)]
        if not name.startswith("real"):
            dtypes.append(("f16", torch.float16))
        for dtype_name, dtype in dtypes:
            case_dir = os.path.join(out_dir, "transformer", f"{name}_{dtype_name}")
            model_dir = os.path.join(case_dir, "model")
            if first_model_dir is None:
                save_kwargs = {"safe_serialization": True}
                if shard:
                    save_kwargs["max_shard_size"] = shard
                model.to(storage).save_pretrained(model_dir, **save_kwargs)
                model.to(torch.float32)
                first_model_dir = model_dir
            else:
                link_tree(first_model_dir, model_dir)
            expected = {"sample": run(model, inputs, dtype)}
            tol = TOLERANCES[(name.startswith("real"), dtype_name)]
            write_case(case_dir, "transformer", "model", inputs, expected, tol, dtype=dtype_name,
                       provenance={"generator": "xtask/parity/gen_transformer.py", "storage": str(storage),
                                   **versions()})
        print(f"transformer/{name}: written")


# Tolerances, measured (README "Parity"). f32 differs from PyTorch only by
# summation order: max |error| 1e-6 (tiny) to 4e-6 (real dimensions). In bf16
# the reference itself is only as good as bf16: PyTorch bf16 deviates from its
# own f32 result by up to 0.045 on these cases, ours by up to 0.062, and the
# two bf16 results differ by up to 0.039 (mean 0.006, as much as either's
# deviation from f32: independent rounding, no systematic error).
TOLERANCES = {
    (False, "f32"): {"atol": 1e-5, "rtol": 1e-4},
    (True, "f32"): {"atol": 1e-5, "rtol": 1e-4},
    (False, "bf16"): {"atol": 5e-2, "rtol": 2e-2},
    (True, "bf16"): {"atol": 5e-2, "rtol": 2e-2},
    # PyTorch's CPU f16 result deviates from its f32 result by up to 0.016
    # (mean 0.003) on the tiny cases; ours by up to 0.0045 (mean 0.0009): the
    # comparison is bounded by the reference's own f16 error.
    (False, "f16"): {"atol": 2.5e-2, "rtol": 1e-2},
}
