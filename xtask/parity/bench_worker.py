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


def report(load_s, runs, call, extra=None):
    """Times `runs` calls after one warm-up and prints the JSON line (with the
    fields `extra()` returns, when given)."""
    times = []
    with torch.inference_mode():
        for k in range(runs + 1):
            t0 = time.perf_counter()
            call()
            if k > 0:
                times.append(time.perf_counter() - t0)
    times.sort()
    out = {"load_s": load_s, "times": times, "median_s": times[len(times) // 2],
           "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if extra is not None:
        out.update(extra())
    print(json.dumps(out))


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


def time_transformer_forward(a, model, dtype, load_s):
    """Times the forward of a loaded transformer on the `--inputs` file."""
    i = load_file(a.inputs)
    args = dict(
        hidden_states=i["hidden_states"].to(dtype),
        timestep=i["timestep"],
        encoder_hidden_states=i["encoder_hidden_states"].to(dtype),
        encoder_attention_mask=i["encoder_attention_mask"],
        return_dict=False,
    )
    report(load_s, a.runs, lambda: model(**args))


def time_transformer(a):
    from diffusers import Lumina2Transformer2DModel

    dtype = DTYPES[a.dtype]
    t0 = time.perf_counter()
    model = Lumina2Transformer2DModel.from_pretrained(a.model, torch_dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    time_transformer_forward(a, model, dtype, load_s)


def setup_gguf(a):
    """The benchmark transformer as a Q4_0 GGUF with the original keys (as the
    community `lumina2-q4_0.gguf`), written by gen_transformer_single."""
    from safetensors.torch import load_file as load_st

    from gen_transformer_single import to_original, write_gguf

    sd = {}
    for f in sorted(os.listdir(a.model)):
        if f.endswith(".safetensors"):
            sd.update(load_st(os.path.join(a.model, f)))
    write_gguf(a.out, to_original(sd))


def time_transformer_gguf(a):
    """diffusers' GGUF path: `from_single_file` with `GGUFQuantizationConfig`
    (weights kept quantised, dequantised by diffusers when used)."""
    from diffusers import GGUFQuantizationConfig, Lumina2Transformer2DModel

    dtype = DTYPES[a.dtype]
    config_dir = os.path.join(os.path.dirname(a.model), "model")
    t0 = time.perf_counter()
    model = Lumina2Transformer2DModel.from_single_file(
        a.model, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        config=config_dir, torch_dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    time_transformer_forward(a, model, dtype, load_s)


def setup_pipeline(a):
    """A pipeline folder of real-dimension components with few layers: the
    transformer (`--layers` joint blocks, `--refiner-layers` per refiner),
    Gemma-2-2B widths with `--text-layers` layers and the parity tokenizer's
    small vocabulary, the Flux VAE; stored in bf16 as the real checkpoint."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline,
                           Lumina2Transformer2DModel)
    from transformers import AutoTokenizer

    import gen_text_encoder
    from gen_transformer import REAL
    from gen_vae import FLUX

    tok_dir = os.path.join(a.out, "tokenizer-src")
    vocab = gen_text_encoder.build_tokenizer(tok_dir)
    te_spec = dict(gen_text_encoder.REAL, num_hidden_layers=a.text_layers,
                   vocab_size=max(vocab, gen_text_encoder.REAL["vocab_size"]))
    text_encoder = gen_text_encoder.make_model(te_spec, 8, torch.float32)
    transformer = Lumina2Transformer2DModel(**dict(REAL, num_layers=a.layers,
                                                   num_refiner_layers=a.refiner_layers))
    randomize_(transformer, 7)
    vae = AutoencoderKL(**FLUX)
    randomize_(vae, 9)
    pipe = Lumina2Pipeline(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                           tokenizer=AutoTokenizer.from_pretrained(tok_dir),
                           scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0))
    pipe.to(torch.bfloat16).save_pretrained(os.path.join(a.out, "pipeline"))


def time_pipeline(a):
    """diffusers' Lumina2Pipeline.__call__ (components resident, as diffusers
    keeps them), with encode_prompt and vae.decode timed inside the call."""
    from diffusers import Lumina2Pipeline

    dtype = DTYPES[a.dtype]
    with open(a.inputs) as f:
        run = json.load(f)
    t0 = time.perf_counter()
    pipe = Lumina2Pipeline.from_pretrained(a.model, torch_dtype=dtype)
    load_s = time.perf_counter() - t0
    stages = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    pipe.encode_prompt = timed("encode", pipe.encode_prompt)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    per_run = []

    def call():
        stages.clear()
        t = time.perf_counter()
        pipe(prompt=run["prompt"], height=run["size"], width=run["size"],
             num_inference_steps=run["steps"], guidance_scale=run["guidance_scale"],
             max_sequence_length=run["max_sequence_length"],
             generator=torch.Generator("cpu").manual_seed(run["seed"]), output_type="np")
        total = time.perf_counter() - t
        denoise = total - stages.get("encode", 0.0) - stages.get("decode", 0.0)
        per_run.append((total, [["encode", stages.get("encode", 0.0)], ["denoise + rest", denoise],
                                ["decode", stages.get("decode", 0.0)]]))

    report(load_s, a.runs, call, extra=lambda: {"stages": sorted(per_run[1:])[len(per_run[1:]) // 2][1]})


DEQUANT_SHAPE = (4096, 4096)  # 16 Mi values per type


def setup_dequant(a):
    """One GGUF with a 4096x4096 tensor of every type gguf-py can
    dequantize, written by gen_gguf's helpers (quantized random values; for
    the K-quants, random blocks with sane scales)."""
    import gguf
    import numpy as np

    from gen_gguf import K_SCALE_OFFSETS, QUANTIZABLE, _tensor_bytes

    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(a.out, "dequant-bench")
    for qtype in QUANTIZABLE + list(K_SCALE_OFFSETS):
        arr, raw_dtype = _tensor_bytes(rng, qtype, DEQUANT_SHAPE)
        w.add_tensor(qtype.name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def time_dequant(a, type_name):
    """gguf-py's `gguf.quants.dequantize` of one tensor (the numpy reference)."""
    import gguf
    import numpy as np

    t0 = time.perf_counter()
    r = gguf.GGUFReader(a.model)
    t = next(t for t in r.tensors if t.name == type_name)
    data = np.asarray(t.data)
    load_s = time.perf_counter() - t0
    report(load_s, a.runs, lambda: gguf.quants.dequantize(data, t.tensor_type))


def setup_text_encoder(a):
    from gen_text_encoder import REAL, make_model

    spec = dict(REAL, num_hidden_layers=a.layers)
    model = make_model(spec, 8, torch.float32)
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, spec["vocab_size"], (1, a.caption_len), generator=g)
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
    ap.add_argument("--text-layers", type=int, default=2)
    a = ap.parse_args()
    if a.what.startswith("dequant:"):
        return time_dequant(a, a.what[len("dequant:"):])
    if a.what.startswith("vae_decode_tile") and a.what[len("vae_decode_tile"):].isdigit():
        return time_vae(a, int(a.what[len("vae_decode_tile"):]))
    {"setup-transformer": setup_transformer, "transformer": time_transformer,
     "setup-gguf": setup_gguf, "transformer_gguf": time_transformer_gguf,
     "setup-pipeline": setup_pipeline, "pipeline": time_pipeline, "setup-dequant": setup_dequant,
     "setup-text-encoder": setup_text_encoder, "text_encoder": time_text_encoder,
     "setup-vae": setup_vae, "vae_decode": lambda a: time_vae(a, None),
     "vae_decode_tiled": lambda a: time_vae(a, "defaults")}[a.what](a)


if __name__ == "__main__":
    main()
