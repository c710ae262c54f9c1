"""PyTorch side of `cargo xtask bench`.

    bench_worker.py setup-transformer --out DIR --layers N --refiner-layers R --sizes 512,1024
    bench_worker.py transformer --model DIR --inputs FILE --dtype f32|bf16 --runs K
    bench_worker.py setup-text-encoder --out DIR --layers N
    bench_worker.py text_encoder --model DIR --inputs FILE --dtype f32|bf16 --runs K
    bench_worker.py setup-vae --out DIR --sizes 512,1024
    bench_worker.py vae_decode|vae_decode_tiled|vae_decode_tile<PX> --model DIR --inputs FILE --dtype f32 --runs K

`setup-transformer` writes a random-weight model at the real dimensions (few
layers) and one input file per image size; both sides load the same files.
The timing commands print one JSON line: load time, run times (after one
warm-up), median, and the process's peak RSS."""

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from common import randomize_  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(load_s, runs, call):
    """Times `runs` calls after one warm-up and prints the JSON line."""
    times = []
    with torch.inference_mode():
        for k in range(runs + 1):
            t0 = time.perf_counter()
            call()
            if k > 0:
                times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"load_s": load_s, "times": times, "median_s": times[len(times) // 2],
                      "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))


def setup_transformer(a):
    from diffusers import Lumina2Transformer2DModel

    from gen_transformer import REAL

    cfg = dict(REAL, num_layers=a.layers, num_refiner_layers=a.refiner_layers)
    model = Lumina2Transformer2DModel(**cfg)
    randomize_(model, 7)
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    g = torch.Generator().manual_seed(11)
    for size in [int(s) for s in a.sizes.split(",")]:
        lat = size // 8
        inputs = {
            "hidden_states": torch.randn(1, cfg["in_channels"], lat, lat, generator=g),
            "timestep": torch.tensor([0.4]),
            "encoder_hidden_states": torch.randn(1, a.caption_len, cfg["cap_feat_dim"], generator=g),
            "encoder_attention_mask": torch.ones(1, a.caption_len, dtype=torch.int64),
        }
        save_file(inputs, os.path.join(a.out, f"inputs_{size}.safetensors"))


def time_transformer(a):
    from diffusers import Lumina2Transformer2DModel

    dtype = DTYPES[a.dtype]
    t0 = time.perf_counter()
    model = Lumina2Transformer2DModel.from_pretrained(a.model, torch_dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    i = load_file(a.inputs)
    args = dict(
        hidden_states=i["hidden_states"].to(dtype),
        timestep=i["timestep"],
        encoder_hidden_states=i["encoder_hidden_states"].to(dtype),
        encoder_attention_mask=i["encoder_attention_mask"],
        return_dict=False,
    )
    report(load_s, a.runs, lambda: model(**args))


def setup_text_encoder(a):
    from transformers import Gemma2Config, Gemma2Model

    from gen_text_encoder import REAL

    cfg = Gemma2Config(**dict(REAL, num_hidden_layers=a.layers), attn_implementation="eager")
    model = Gemma2Model(cfg)
    randomize_(model, 8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # Gemma norms multiply by (1 + w): keep w near 0
                p.sub_(1.0)
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, cfg.vocab_size, (1, a.caption_len), generator=g)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, os.path.join(a.out, "inputs.safetensors"))


def time_text_encoder(a):
    from transformers import Gemma2Model

    dtype = DTYPES[a.dtype]
    t0 = time.perf_counter()
    model = Gemma2Model.from_pretrained(a.model, torch_dtype=dtype, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0
    i = load_file(a.inputs)
    report(load_s, a.runs, lambda: model(input_ids=i["input_ids"], attention_mask=i["attention_mask"],
                                         output_hidden_states=True))


def setup_vae(a):
    from diffusers import AutoencoderKL

    from gen_vae import FLUX

    model = AutoencoderKL(**FLUX)
    randomize_(model, 9)
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    g = torch.Generator().manual_seed(13)
    for size in [int(s) for s in a.sizes.split(",")]:
        z = torch.randn(1, FLUX["latent_channels"], size // 8, size // 8, generator=g)
        save_file({"latents": z}, os.path.join(a.out, f"inputs_{size}.safetensors"))


def time_vae(a, tiles):
    """`tiles`: None (untiled), "defaults" (`enable_tiling()`), or a sample tile
    size in pixels forced on `enable_tiling()` (latent tile = size / 8, overlap 0.25)."""
    from diffusers import AutoencoderKL

    dtype = DTYPES[a.dtype]
    t0 = time.perf_counter()
    model = AutoencoderKL.from_pretrained(a.model, torch_dtype=dtype).eval()
    if tiles is not None:
        model.enable_tiling()
    if isinstance(tiles, int):
        model.tile_sample_min_size = tiles
        model.tile_latent_min_size = tiles // 2 ** (len(model.config.block_out_channels) - 1)
        model.tile_overlap_factor = 0.25
    load_s = time.perf_counter() - t0
    z = load_file(a.inputs)["latents"].to(dtype)
    report(load_s, a.runs, lambda: model.decode(z))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what")
    ap.add_argument("--out")
    ap.add_argument("--model")
    ap.add_argument("--inputs")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--refiner-layers", type=int, default=2)
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--caption-len", type=int, default=256)
    a = ap.parse_args()
    if a.what.startswith("vae_decode_tile") and a.what[len("vae_decode_tile"):].isdigit():
        return time_vae(a, int(a.what[len("vae_decode_tile"):]))
    {"setup-transformer": setup_transformer, "transformer": time_transformer,
     "setup-text-encoder": setup_text_encoder, "text_encoder": time_text_encoder,
     "setup-vae": setup_vae, "vae_decode": lambda a: time_vae(a, None),
     "vae_decode_tiled": lambda a: time_vae(a, "defaults")}[a.what](a)


if __name__ == "__main__":
    main()
