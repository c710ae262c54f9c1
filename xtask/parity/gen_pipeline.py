"""Pipeline cases: diffusers' Lumina2Pipeline end to end (prompts -> image) on a
tiny random pipeline folder written by `save_pretrained` (model_index.json,
tokenizer, Gemma-2 text encoder, transformer, VAE, scheduler)."""

import os

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from diffusers.utils import logging as _dlogging
from transformers import AutoTokenizer

import gen_text_encoder
from common import link_tree, randomize_, versions, write_case

_dlogging.set_verbosity_error()

# Caption features = the text encoder's hidden size (16); latent channels = the
# VAE's (4); four VAE levels so that the image is 8x the latents, as the
# pipeline assumes; axes_lens[0] covers caption + image positions.
TRANSFORMER = dict(
    sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
    num_attention_heads=4, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
    axes_dim_rope=(2, 2, 4), axes_lens=(128, 32, 32), cap_feat_dim=16,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, norm_num_groups=4, act_fn="silu", sample_size=32,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    scaling_factor=0.3611, shift_factor=0.1159,
)
TEXT = gen_text_encoder.PROMPT_MODEL
# The same pipeline with the real model's 16 latent channels (the Flux VAE's),
# for which the live preview's latent-to-RGB matrix is made.
TRANSFORMER_16 = dict(TRANSFORMER, in_channels=16)
VAE_16 = dict(VAE, latent_channels=16)
VARIANTS = {"latent4": (TRANSFORMER, VAE), "latent16": (TRANSFORMER_16, VAE_16)}

# name, args, given latents (shape or None), committed as a test fixture,
# pipeline variant
CASES = [
    ("seed_cfg", dict(prompt=["a red fox in the snow"], negative_prompt=None, height=32, width=48,
                      num_inference_steps=4, guidance_scale=4.0, cfg_trunc_ratio=1.0, cfg_normalization=True,
                      system_prompt=None, max_sequence_length=32, num_images_per_prompt=1, seed=42), None, True, "latent4"),
    ("batch_negative_trunc", dict(prompt=["a castle on a hill", "two cats asleep on a sofa"],
                                  negative_prompt=["blurry", "low quality, watermark"], height=32, width=32,
                                  num_inference_steps=4, guidance_scale=3.0, cfg_trunc_ratio=0.5,
                                  cfg_normalization=False, system_prompt=None, max_sequence_length=24,
                                  num_images_per_prompt=1, seed=7), None, True, "latent4"),
    ("latents_no_cfg", dict(prompt=["an empty road at night"], negative_prompt=None, height=32, width=32,
                            num_inference_steps=3, guidance_scale=1.0, cfg_trunc_ratio=1.0,
                            cfg_normalization=True, system_prompt="", max_sequence_length=16,
                            num_images_per_prompt=2, seed=0), (2, 4, 4, 4), False, "latent4"),
    ("images_per_prompt_big_seed", dict(prompt=["a lighthouse"], negative_prompt=["dark"], height=48, width=32,
                                        num_inference_steps=2, guidance_scale=5.5, cfg_trunc_ratio=1.0,
                                        cfg_normalization=True,
                                        system_prompt="You are an assistant designed to generate high-quality images.",
                                        max_sequence_length=32, num_images_per_prompt=2, seed=2 ** 40 + 3),
     None, False, "latent4"),
    ("latent16_preview", dict(prompt=["a red fox in the snow"], negative_prompt=None, height=32, width=48,
                              num_inference_steps=4, guidance_scale=4.0, cfg_trunc_ratio=1.0,
                              cfg_normalization=True, system_prompt=None, max_sequence_length=32,
                              num_images_per_prompt=1, seed=42), None, True, "latent16"),
]

# Tolerances, measured on these cases (max |error| of our f32 pipeline against
# diffusers' f32, see the parity report): initial_latents are bit-exact (torch's
# CPU generator reproduced); images differ by float summation order in the
# transformer and VAE only.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def build_pipeline(src, variant="latent4"):
    transformer_cfg, vae_cfg = VARIANTS[variant]
    vocab = gen_text_encoder.build_tokenizer(os.path.join(src, "tokenizer"))
    spec = dict(TEXT, vocab_size=max(vocab, TEXT["vocab_size"]))
    # Weights rounded to float16 and stored so (half the size of the committed
    # fixtures); both sides compute in float32 from the same values.
    text_encoder = gen_text_encoder.make_model(spec, 31, torch.float16)
    transformer = Lumina2Transformer2DModel(**transformer_cfg)
    randomize_(transformer, 32, torch.float16)
    vae = AutoencoderKL(**vae_cfg)
    randomize_(vae, 33, torch.float16)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    pipe = Lumina2Pipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
                           text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.to(torch.float16).save_pretrained(os.path.join(src, "pipeline"))
    # Reload: exactly what the files hold, with the tokenizer class a user gets.
    return Lumina2Pipeline.from_pretrained(os.path.join(src, "pipeline"), torch_dtype=torch.float32)


def run(pipe, args, latents):
    gen = None if latents is not None else torch.Generator("cpu").manual_seed(args["seed"])
    initial = None
    if latents is None:
        # What prepare_latents draws with this generator (a fresh one, same seed).
        b = len(args["prompt"]) * args["num_images_per_prompt"]
        shape = (b, pipe.transformer.config.in_channels, 2 * (args["height"] // 16), 2 * (args["width"] // 16))
        initial = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(args["seed"]))
    with torch.no_grad():
        out = pipe(prompt=args["prompt"], negative_prompt=args["negative_prompt"], height=args["height"],
                   width=args["width"], num_inference_steps=args["num_inference_steps"],
                   guidance_scale=args["guidance_scale"], cfg_trunc_ratio=args["cfg_trunc_ratio"],
                   cfg_normalization=args["cfg_normalization"], system_prompt=args["system_prompt"],
                   max_sequence_length=args["max_sequence_length"],
                   num_images_per_prompt=args["num_images_per_prompt"], generator=gen, latents=latents,
                   output_type="np")
    expected = {"image": torch.from_numpy(np.asarray(out.images, dtype=np.float32))}
    if initial is not None:
        expected["initial_latents"] = initial
    return expected


def generate(out_dir, only_tiny=False, only_committed=False):
    import shutil
    base = os.path.join(out_dir, "pipeline")
    for variant in VARIANTS:
        cases = [c for c in CASES if c[4] == variant and (c[3] or not only_committed)]
        if not cases:
            continue
        src = os.path.join(base, f".pipeline_src_{variant}")
        pipe = build_pipeline(src, variant)
        for name, args, latent_shape, _, _ in cases:
            case_dir = os.path.join(base, name)
            link_tree(os.path.join(src, "pipeline"), os.path.join(case_dir, "pipeline"))
            inputs = None
            latents = None
            if latent_shape is not None:
                latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(99))
                inputs = {"latents": latents}
            expected = run(pipe, args, latents)
            # Multiple prompts with num_images_per_prompt > 1 hit diffusers' misordered
            # masks (parity-cases.md): no case combines them.
            assert not (len(args["prompt"]) > 1 and args["num_images_per_prompt"] > 1)
            prov = {"generator": "xtask/parity/gen_pipeline.py", **versions()}
            write_case(case_dir, "pipeline", "pipeline", inputs, expected, TOLERANCE, dtype="f32", args=args,
                       provenance=prov)
            print(f"pipeline/{name}: written")
        shutil.rmtree(src)
