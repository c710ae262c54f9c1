"""Z-Image transformer cases: diffusers' ZImageTransformer2DModel (basic mode)
on random weights."""

import os

import torch
from diffusers import ZImageTransformer2DModel

from common import link_tree, randomize_, versions, write_case
from gen_transformer import TOLERANCES

# Small enough for a committed fixture. Two patch sizes (two x embedders and
# final layers); n_kv_heads != n_heads, which diffusers ignores; a
# feed-forward width int(16 / 3 * 8) = 42 that Python truncates.
TINY = dict(
    all_patch_size=(2, 1), all_f_patch_size=(1, 1), in_channels=4, dim=16, n_layers=1,
    n_refiner_layers=1, n_heads=2, n_kv_heads=1, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24,
    rope_theta=256.0, t_scale=1000.0, axes_dims=(2, 2, 4), axes_lens=(128, 32, 32),
)

# The timestep MLP's hidden width is 1024 whatever the config (diffusers'
# `mid_size=1024`): in the tiny model only this many of its units are live
# (the others' weights and bias zero, silu(0) = 0), so that the committed
# fixture stays small; the real-dimension cases have them all.
TINY_LIVE_TEMB_UNITS = 16

# The real dimensions (Tongyi-MAI/Z-Image-Turbo transformer/config.json), few layers.
REAL = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=1,
    n_refiner_layers=1, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
    rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512),
)


def make_model(config, seed, storage_dtype):
    model = ZImageTransformer2DModel(**config)
    randomize_(model, seed, storage_dtype)
    if config is TINY:
        n = TINY_LIVE_TEMB_UNITS
        with torch.no_grad():
            model.t_embedder.mlp[0].weight[n:] = 0
            model.t_embedder.mlp[0].bias[n:] = 0
            model.t_embedder.mlp[2].weight[:, n:] = 0
    return model.eval()


def make_inputs(config, cap_lens, height, width, seed):
    """Captions of different lengths, stored zero-padded in one tensor with
    their lengths (`caption_lens`)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(cap_lens)
    x = torch.randn(batch, config["in_channels"], height, width, generator=g)
    t = torch.rand(batch, generator=g)
    caps = torch.zeros(batch, max(cap_lens), config["cap_feat_dim"])
    for i, n in enumerate(cap_lens):
        caps[i, :n] = torch.randn(n, config["cap_feat_dim"], generator=g)
    return {"hidden_states": x, "timestep": t, "encoder_hidden_states": caps,
            "caption_lens": torch.tensor(cap_lens, dtype=torch.int64)}


def run(model, inputs, dtype, patch_size):
    m = model.to(dtype)
    x = [xi.unsqueeze(1).to(dtype) for xi in inputs["hidden_states"]]  # [C, F=1, H, W]
    caps = [c[:n].to(dtype) for c, n in zip(inputs["encoder_hidden_states"], inputs["caption_lens"].tolist())]
    with torch.no_grad():
        out = m(x, inputs["timestep"], caps, patch_size=patch_size, f_patch_size=1, return_dict=False)[0]
    model.to(torch.float32)
    return torch.stack([o.squeeze(1) for o in out]).float()


def generate(out_dir, only_tiny=False):
    torch.manual_seed(0)
    specs = [
        # name, config, seed, storage dtype, caption lengths, H, W, patch size, shard size
        # 3 items: caption lengths below, at and above a multiple of 32;
        # 4x6 = 24 image tokens (padded to 32).
        ("tiny", TINY, 1, torch.bfloat16, [5, 32, 41], 8, 12, 2, None),
        # Patch 1: 4x8 = 32 image tokens (no image padding); equal padded
        # caption lengths (no masks).
        ("tiny_patch1", TINY, 1, torch.bfloat16, [3, 17], 4, 8, 1, None),
        # Patch 1: 5x7 = 35 image tokens (padded to 64); one item.
        ("tiny_single", TINY, 1, torch.bfloat16, [64], 5, 7, 1, None),
    ]
    if not only_tiny:
        # 512x512 image (64x64 latent, 1024 tokens), captions padded to 32 and 64.
        specs.append(("real_dims", REAL, 4, torch.bfloat16, [17, 40], 64, 64, 2, "300MB"))
    models = {}
    for name, config, seed, storage, lens, H, W, patch, shard in specs:
        key = (id(config), seed)
        if key not in models:
            models[key] = (make_model(config, seed, storage), None)
        model, first_model_dir = models[key]
        inputs = make_inputs(config, lens, H, W, seed + 100 + len(lens))
        for dtype_name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
            case_dir = os.path.join(out_dir, "zimage_transformer", f"{name}_{dtype_name}")
            model_dir = os.path.join(case_dir, "model")
            if first_model_dir is None:
                save_kwargs = {"safe_serialization": True}
                if shard:
                    save_kwargs["max_shard_size"] = shard
                model.to(storage).save_pretrained(model_dir, **save_kwargs)
                model.to(torch.float32)
                first_model_dir = model_dir
                models[key] = (model, first_model_dir)
            else:
                link_tree(first_model_dir, model_dir)
            expected = {"sample": run(model, inputs, dtype, patch)}
            tol = TOLERANCES[(name.startswith("real"), dtype_name)]
            write_case(case_dir, "zimage_transformer", "model", inputs, expected, tol, dtype=dtype_name,
                       args={"patch_size": patch},
                       provenance={"generator": "xtask/parity/gen_zimage_transformer.py",
                                   "storage": str(storage), **versions()})
        print(f"zimage_transformer/{name}: written")
