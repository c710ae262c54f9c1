"""TeaCache cases: diffusers' Lumina2Pipeline with the transformer's forward
replaced by TeaCache4Lumina2's (ali-vilab/TeaCache, commit 7c10efc,
TeaCache4Lumina2/teacache_lumina2.py, `teacache_forward_working`), on the tiny
pipeline of gen_pipeline.py and on a pipeline whose transformer and text
encoder have the real 2B dimensions with few layers.

The cases are `pipeline` cases with `args.cache_threshold`; besides the image
they expect `latents` (the final latents, before the VAE) and
`cache_computed` (one entry per transformer call, 1 where the joint layers
ran, 0 where the cached residual was reused), so that a case shows that the
same calls are skipped."""

import os
import shutil
import time
import types

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from transformers import AutoTokenizer

import gen_pipeline
import gen_text_encoder
import gen_transformer
from common import link_tree, randomize_, versions, write_case

# teacache_lumina2.py line 72 ("v1").
COEFFICIENTS = [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344]


def teacache_forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                     attention_kwargs=None, return_dict=True):
    """teacache_forward_working (lines 12-146) without the LoRA scaling (no
    LoRA here) and with each call's decision recorded in `self.computed`."""
    batch_size, _, height, width = hidden_states.shape
    # Lines 30-51: the diffusers 0.42.1 forward up to the joint layers.
    temb, encoder_hidden_states_processed = self.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
    (image_patch_embeddings, context_rotary_emb, noise_rotary_emb, joint_rotary_emb,
     encoder_seq_lengths, seq_lengths) = self.rope_embedder(hidden_states, encoder_attention_mask)
    image_patch_embeddings = self.x_embedder(image_patch_embeddings)
    for layer in self.context_refiner:
        encoder_hidden_states_processed = layer(encoder_hidden_states_processed, encoder_attention_mask,
                                                context_rotary_emb)
    for layer in self.noise_refiner:
        image_patch_embeddings = layer(image_patch_embeddings, None, noise_rotary_emb, temb)
    max_seq_len = max(seq_lengths)
    x = image_patch_embeddings.new_zeros(batch_size, max_seq_len, self.config.hidden_size)
    for i, (enc_len, seq_len_val) in enumerate(zip(encoder_seq_lengths, seq_lengths)):
        x[i, :enc_len] = encoder_hidden_states_processed[i, :enc_len]
        x[i, enc_len:seq_len_val] = image_patch_embeddings[i]
    mask = None
    if len(set(seq_lengths)) > 1:
        mask = x.new_zeros(batch_size, max_seq_len, dtype=torch.bool)
        for i, seq_len_val in enumerate(seq_lengths):
            mask[i, :seq_len_val] = True

    # Lines 53-100: the decision, per sequence length.
    should_calc = True
    cache = self.cache.setdefault(max_seq_len, {"accumulated_rel_l1_distance": 0.0,
                                                "previous_modulated_input": None, "previous_residual": None})
    modulated_inp, _, _, _ = self.layers[0].norm1(x, temb)
    if self.cnt == 0 or self.cnt == self.num_steps - 1:
        cache["accumulated_rel_l1_distance"] = 0.0
    elif cache["previous_modulated_input"] is not None:
        rescale_func = np.poly1d(COEFFICIENTS)
        prev = cache["previous_modulated_input"]
        prev_mean = prev.abs().mean()
        if prev_mean.item() > 1e-9:
            rel_l1_change = ((modulated_inp - prev).abs().mean() / prev_mean).cpu().item()
        else:
            rel_l1_change = 0.0 if modulated_inp.abs().mean().item() < 1e-9 else float("inf")
        cache["accumulated_rel_l1_distance"] += rescale_func(rel_l1_change)
        if cache["accumulated_rel_l1_distance"] < self.rel_l1_thresh:
            should_calc = False
        else:
            cache["accumulated_rel_l1_distance"] = 0.0
    else:
        cache["accumulated_rel_l1_distance"] = 0.0
    cache["previous_modulated_input"] = modulated_inp.clone()
    if self.uncond_seq_len is None:
        self.uncond_seq_len = max_seq_len
    if max_seq_len != self.uncond_seq_len:
        self.cnt += 1
        if self.cnt >= self.num_steps:
            self.cnt = 0

    # Lines 102-124: reuse the residual, or run the joint layers and keep theirs.
    if not should_calc and cache["previous_residual"] is not None:
        out = x + cache["previous_residual"]
    else:
        should_calc = True
        out = x
        for layer in self.layers:
            out = layer(out, mask, joint_rotary_emb, temb)
        cache["previous_residual"] = out - x
    self.computed.append(1.0 if should_calc else 0.0)

    # Lines 126-138: output norm and unpatchify, as diffusers.
    out = self.norm_out(out, temb)
    p = self.config.patch_size
    images = []
    for i, (enc_len, seq_len_val) in enumerate(zip(encoder_seq_lengths, seq_lengths)):
        images.append(out[i][enc_len:seq_len_val].view(height // p, width // p, p, p, self.out_channels)
                      .permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
    return (torch.stack(images, dim=0),)


def enable_teacache(transformer, threshold, num_steps):
    """The reference's setup (lines 167-172), on the instance: fresh state per run."""
    transformer.forward = types.MethodType(teacache_forward, transformer)
    transformer.cnt = 0
    transformer.num_steps = num_steps
    transformer.rel_l1_thresh = threshold
    transformer.cache = {}
    transformer.uncond_seq_len = None
    transformer.computed = []


# The tiny pipeline's cases: name, args (gen_pipeline.py's), committed.
TINY_CASES = [
    ("tiny_cfg_t0.3", dict(prompt=["a red fox in the snow"], negative_prompt=None, height=32, width=48,
                           num_inference_steps=12, guidance_scale=4.0, cfg_trunc_ratio=1.0,
                           cfg_normalization=True, system_prompt=None, max_sequence_length=32,
                           num_images_per_prompt=1, seed=42, cache_threshold=0.3), True),
    ("tiny_batch_trunc_t0.5", dict(prompt=["a castle on a hill", "two cats asleep on a sofa"],
                                   negative_prompt=["blurry", "low quality, watermark"], height=32, width=32,
                                   num_inference_steps=10, guidance_scale=3.0, cfg_trunc_ratio=0.7,
                                   cfg_normalization=False, system_prompt=None, max_sequence_length=24,
                                   num_images_per_prompt=1, seed=7, cache_threshold=0.5), True),
    # Without guidance the reference's counter never moves: every call computes.
    ("tiny_no_cfg_t0.5", dict(prompt=["an empty road at night"], negative_prompt=None, height=32, width=32,
                              num_inference_steps=8, guidance_scale=1.0, cfg_trunc_ratio=1.0,
                              cfg_normalization=True, system_prompt="", max_sequence_length=16,
                              num_images_per_prompt=1, seed=0, cache_threshold=0.5), False),
]

# Real 2B transformer and Gemma-2-2B dimensions, two joint layers, one refiner
# each; a tiny VAE with 16 latent channels. The thresholds the reference
# suggests (README: 0.2 to 0.5) and none, for the timing comparison.
REAL_TRANSFORMER = dict(gen_transformer.REAL, num_layers=2, sample_size=16)
REAL_VAE = dict(gen_pipeline.VAE, latent_channels=16)
REAL_THRESHOLDS = [None, 0.2, 0.3, 0.4, 0.5]
REAL_ARGS = dict(prompt=["a lighthouse on a cliff at dawn, oil painting"], negative_prompt=None, height=128,
                 width=128, num_inference_steps=10, guidance_scale=4.0, cfg_trunc_ratio=1.0,
                 cfg_normalization=True, system_prompt=None, max_sequence_length=48, num_images_per_prompt=1,
                 seed=1024)

# gen_pipeline.py's tolerances: f32 on both sides, same weights.
TOLERANCE = gen_pipeline.TOLERANCE


def build(src, transformer_spec, text_spec, vae_spec):
    """gen_pipeline.build_pipeline with other dimensions."""
    vocab = gen_text_encoder.build_tokenizer(os.path.join(src, "tokenizer"))
    spec = dict(text_spec, vocab_size=max(vocab, text_spec["vocab_size"]))
    text_encoder = gen_text_encoder.make_model(spec, 31, torch.float16)
    transformer = Lumina2Transformer2DModel(**transformer_spec)
    randomize_(transformer, 32, torch.float16)
    vae = AutoencoderKL(**vae_spec)
    randomize_(vae, 33, torch.float16)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    pipe = Lumina2Pipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
                           text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.to(torch.float16).save_pretrained(os.path.join(src, "pipeline"))
    return Lumina2Pipeline.from_pretrained(os.path.join(src, "pipeline"), torch_dtype=torch.float32)


def run(pipe, args):
    """diffusers' pipeline with TeaCache's forward; returns the expected tensors."""
    threshold = args.get("cache_threshold")
    transformer = pipe.transformer
    if threshold is not None:
        enable_teacache(transformer, threshold, args["num_inference_steps"])
    final = {}

    def keep_latents(_pipe, i, _t, kw):
        final["latents"] = kw["latents"].clone()
        return kw

    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(prompt=args["prompt"], negative_prompt=args["negative_prompt"], height=args["height"],
                   width=args["width"], num_inference_steps=args["num_inference_steps"],
                   guidance_scale=args["guidance_scale"], cfg_trunc_ratio=args["cfg_trunc_ratio"],
                   cfg_normalization=args["cfg_normalization"], system_prompt=args["system_prompt"],
                   max_sequence_length=args["max_sequence_length"],
                   num_images_per_prompt=args["num_images_per_prompt"],
                   generator=torch.Generator("cpu").manual_seed(args["seed"]), output_type="np",
                   callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"])
    seconds = time.perf_counter() - start
    expected = {"image": torch.from_numpy(np.asarray(out.images, dtype=np.float32)),
                "latents": final["latents"]}
    note = ""
    if threshold is not None:
        computed = transformer.computed
        expected["cache_computed"] = torch.tensor(computed, dtype=torch.float32)
        note = f", {int(len(computed) - sum(computed))} of {len(computed)} calls skipped"
        # Back to diffusers' own forward.
        del transformer.forward
    return expected, f"{seconds:.1f} s{note}"


def write(base, src, pipe, cases):
    for name, args, _ in cases:
        case_dir = os.path.join(base, name)
        link_tree(os.path.join(src, "pipeline"), os.path.join(case_dir, "pipeline"))
        expected, note = run(pipe, args)
        prov = {"generator": "xtask/parity/gen_teacache.py",
                "reference": "ali-vilab/TeaCache@7c10efc TeaCache4Lumina2/teacache_lumina2.py", **versions()}
        write_case(case_dir, "pipeline", "pipeline", None, expected, TOLERANCE, dtype="f32", args=args,
                   provenance=prov)
        print(f"teacache/{name}: written (reference {note})")


def generate(out_dir, only_tiny=False, only_committed=False):
    base = os.path.join(out_dir, "teacache")
    src = os.path.join(base, ".tiny_src")
    pipe = build(src, gen_pipeline.TRANSFORMER, gen_pipeline.TEXT, gen_pipeline.VAE)
    write(base, src, pipe, [c for c in TINY_CASES if c[2] or not only_committed])
    shutil.rmtree(src)
    if only_tiny or only_committed:
        return
    src = os.path.join(base, ".real_src")
    pipe = build(src, REAL_TRANSFORMER, gen_text_encoder.REAL, REAL_VAE)
    cases = []
    for t in REAL_THRESHOLDS:
        label = "off" if t is None else f"t{t}"
        args = dict(REAL_ARGS)
        if t is not None:
            args["cache_threshold"] = t
        cases.append((f"real_dims_{label}", args, False))
    write(base, src, pipe, cases)
    shutil.rmtree(src)
