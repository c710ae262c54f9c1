"""PyTorch side of `cargo xtask bench --what e2e`: one whole generation per
process, as a user runs it, loading included.

    bench_e2e.py setup --out DIR [--text-layers N --layers N --refiner-layers N]
    bench_e2e.py run --model DIR --inputs RUN.json --dtype f32|bf16 [--staged] --out IMAGE.png
    bench_e2e.py measure -- COMMAND...

`setup` writes a random-weight pipeline folder in the layout of the real
Alpha-VLLM/Lumina-Image-2.0 repository (model_index.json; transformer/,
text_encoder/ with the real configs, bf16 safetensors sharded at 5 GB as the
real files; the Flux VAE; FlowMatchEuler with shift 6). The tokenizer is the
parity harness's small Gemma-shaped one; the embedding table keeps Gemma-2-2B's
256000 rows, so the weights, the load and the compute are the real model's.

`run` prints one JSON line: the seconds of each stage (`startup`: the Python
imports; `load`; `encode`; `denoise`; `decode`; `save`), the seconds of each
denoising step, the total from process start, and the peak RSS. Without
`--staged`, diffusers' `Lumina2Pipeline.from_pretrained` loads every component
and one pipeline call generates, as diffusers' documentation shows. With
`--staged`, each component is loaded just before its stage and freed after it
(the only way the f32 pipeline fits a 24 GiB machine beside the other side)."""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}

# The real Gemma-2-2B configuration (google/gemma-2-2b config.json, as
# Alpha-VLLM/Lumina-Image-2.0's text_encoder/config.json holds it).
GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
    hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1,
)

# The real transformer configuration (transformer/config.json of the repository).
LUMINA2 = dict(
    sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26,
    num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
    ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(32, 32, 32),
    axes_lens=(300, 512, 512), cap_feat_dim=2304,
)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup(a):
    """Each component is built, randomised and saved on its own (in bf16, the
    dtype of the released files), so that setup peaks at one component."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    import gen_text_encoder
    from common import randomize_
    from gen_vae import FLUX

    out = a.out
    os.makedirs(out, exist_ok=True)
    torch.set_default_dtype(torch.bfloat16)
    try:
        te = Gemma2Model(Gemma2Config(**dict(GEMMA2_2B, num_hidden_layers=a.text_layers)))
        randomize_(te, 8)
        with torch.no_grad():  # Gemma's norms scale by (1 + w), as gen_text_encoder does
            for name, p in te.named_parameters():
                if name.endswith("norm.weight"):
                    p.sub_(1.0)
        te.save_pretrained(os.path.join(out, "text_encoder"), max_shard_size="5GB")
        del te
        gc.collect()
        tr = Lumina2Transformer2DModel(**dict(LUMINA2, num_layers=a.layers, num_refiner_layers=a.refiner_layers))
        randomize_(tr, 7)
        tr.save_pretrained(os.path.join(out, "transformer"), max_shard_size="5GB")
        del tr
        gc.collect()
        vae = AutoencoderKL(**FLUX)
        randomize_(vae, 9)
        vae.save_pretrained(os.path.join(out, "vae"))
        del vae
    finally:
        torch.set_default_dtype(torch.float32)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0).save_pretrained(
        os.path.join(out, "scheduler"))
    gen_text_encoder.build_tokenizer(os.path.join(out, "tokenizer"))
    import diffusers
    import transformers
    index = {
        "_class_name": "Lumina2Pipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "GemmaTokenizerFast"],
        "transformer": ["diffusers", "Lumina2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out, "provenance.json"), "w") as f:
        json.dump({"generator": "xtask/parity/bench_e2e.py", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                   "text_layers": a.text_layers, "layers": a.layers, "refiner_layers": a.refiner_layers},
                  f, indent=2)


class Clock:
    """Named stage durations, summed per name in the order first seen."""

    def __init__(self):
        self.stages = {}

    def add(self, name, seconds):
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def timed(self, name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(name, time.perf_counter() - t)
            return out
        return wrapper


def step_recorder(steps):
    """A `callback_on_step_end` that records each step's duration."""
    last = [None]

    def callback(pipe, i, t, kwargs):
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now
        return {}

    def start():
        last[0] = time.perf_counter()

    return callback, start


def run(a):
    from diffusers import AutoencoderKL, Lumina2Pipeline
    from diffusers.image_processor import VaeImageProcessor

    clock = Clock()
    clock.add("startup", time.perf_counter() - T_START)
    dtype = DTYPES[a.dtype]
    with open(a.inputs) as f:
        r = json.load(f)
    steps = []
    callback, start_steps = step_recorder(steps)
    common = dict(height=r["size"], width=r["size"], num_inference_steps=r["steps"],
                  guidance_scale=r["guidance_scale"], max_sequence_length=r["max_sequence_length"],
                  generator=torch.Generator("cpu").manual_seed(r["seed"]),
                  callback_on_step_end=callback)
    with torch.inference_mode():
        if not a.staged:
            t = time.perf_counter()
            pipe = Lumina2Pipeline.from_pretrained(a.model, torch_dtype=dtype)
            clock.add("load", time.perf_counter() - t)
            pipe.encode_prompt = clock.timed("encode", pipe.encode_prompt)
            pipe.vae.decode = clock.timed("decode", pipe.vae.decode)
            # The loop starts when encode_prompt returns (latents and timesteps
            # are prepared in microseconds).
            encode = pipe.encode_prompt

            def encode_then_start(*args, **kwargs):
                out = encode(*args, **kwargs)
                start_steps()
                return out
            pipe.encode_prompt = encode_then_start
            t = time.perf_counter()
            image = pipe(prompt=r["prompt"], **common).images[0]
            call = time.perf_counter() - t
            clock.add("denoise", call - clock.stages["encode"] - clock.stages["decode"])
        else:
            t = time.perf_counter()
            pipe = Lumina2Pipeline.from_pretrained(a.model, transformer=None, vae=None, torch_dtype=dtype)
            clock.add("load", time.perf_counter() - t)
            t = time.perf_counter()
            pe, pm, ne, nm = pipe.encode_prompt(r["prompt"], True, max_sequence_length=r["max_sequence_length"])
            clock.add("encode", time.perf_counter() - t)
            del pipe
            gc.collect()
            t = time.perf_counter()
            pipe = Lumina2Pipeline.from_pretrained(a.model, text_encoder=None, tokenizer=None, vae=None,
                                                   torch_dtype=dtype)
            clock.add("load", time.perf_counter() - t)
            t = time.perf_counter()
            start_steps()
            latents = pipe(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                           negative_prompt_attention_mask=nm, output_type="latent", **common).images
            clock.add("denoise", time.perf_counter() - t)
            del pipe
            gc.collect()
            t = time.perf_counter()
            vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=dtype)
            clock.add("load", time.perf_counter() - t)
            t = time.perf_counter()
            # Lumina2Pipeline.__call__'s decode (pipeline_lumina2.py, after the loop).
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
            decoded = vae.decode(latents, return_dict=False)[0]
            image = VaeImageProcessor(vae_scale_factor=16).postprocess(decoded, output_type="pil")[0]
            clock.add("decode", time.perf_counter() - t)
    t = time.perf_counter()
    image.save(a.out)
    clock.add("save", time.perf_counter() - t)
    print(json.dumps({"stages": list(clock.stages.items()), "steps": steps,
                      "total_s": time.perf_counter() - T_START, "peak_rss_mb": peak_rss_mb(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


def measure(cmd):
    """Runs one side's command as a child and prints its wall time, exit
    status, output and peak RSS (`RUSAGE_CHILDREN` of this launcher: its only
    child), so that both sides are measured by the same code."""
    import subprocess
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "rc": p.returncode,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
                      "stdout": p.stdout[-20000:], "stderr": p.stderr[-20000:]}))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "measure" and sys.argv[2] == "--":
        return measure(sys.argv[3:])
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["setup", "run"])
    ap.add_argument("--out")
    ap.add_argument("--model")
    ap.add_argument("--inputs")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--staged", action="store_true")
    ap.add_argument("--text-layers", type=int, default=26)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--refiner-layers", type=int, default=2)
    a = ap.parse_args()
    {"setup": setup, "run": run}[a.what](a)


if __name__ == "__main__":
    main()
