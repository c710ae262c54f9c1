"""`zimage_img2img` cases: diffusers 0.42.1 `ZImageImg2ImgPipeline` and
`ZImageInpaintPipeline` end to end on the tiny Z-Image pipeline of
gen_zimage_pipeline.py (its tiny tokenizer). Cases use the `zimage_pipeline`
kind with `args.image`, `args.mask_image` and `args.strength`
(docs/parity-cases.md); `height` and `width` are null where the pipeline takes
them from the image (its size rounded down to a multiple of
`vae_scale_factor * 2`, 4 for the tiny VAE).

Expected: `latents` (output_type="latent"), `image` (output_type="np") and,
recorded from the pipeline's first `scheduler.scale_noise` call
(`prepare_latents`): `image_latents` (the scaled posterior sample, repeated to
the batch), `initial_latents` (the noise) and `noised_latents` (the result).

`--fixture` writes the committed cases into
crates/lumina2-pipeline/tests/fixtures/zimage/, run on (and with a copy of)
the pipeline folder of the committed `tiny_tokenizer_cfg` case."""

import os
import shutil
import sys

import numpy as np
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline
from diffusers.utils import load_image

import gen_img2img
import gen_zimage_pipeline
from common import link_tree, versions, write_case

TOLERANCE = gen_zimage_pipeline.TOLERANCE
FIXTURE_DIR = gen_zimage_pipeline.FIXTURE_DIR

BASE = dict(negative_prompt=None, height=None, width=None, guidance_scale=3.0, cfg_normalization=False,
            cfg_truncation=1.0, max_sequence_length=48, num_images_per_prompt=1)

# name, args, image (w, h, mode), mask (w, h, mode) or None, committed as a test fixture
CASES = [
    # 5 steps, strength 0.6: steps 2 to 4 run (begin index 2).
    ("img2img_strength_0_6", dict(BASE, prompt=["a red fox in the snow"], negative_prompt=["blurry"],
                                  num_inference_steps=5, strength=0.6, seed=42), (24, 16, "RGB"), None, True),
    # A 27x18 image resized to 24x16 (both axes), 4 steps at strength 0.3
    # (int(4 - 1.2) = 2: 2 run), two prompts, cfg_normalization and truncation.
    ("img2img_resize_strength_0_3", dict(BASE, prompt=["a castle on a hill at dawn, oil painting", "two cats asleep"],
                                         guidance_scale=4.0, cfg_normalization=True, cfg_truncation=0.3,
                                         num_inference_steps=4, strength=0.3, seed=7),
     (27, 18, "RGB"), None, False),
    # Turbo-style (no guidance), strength 1, two images per prompt, the size given.
    ("img2img_turbo_full", dict(BASE, prompt=["a lighthouse"], height=16, width=16, guidance_scale=0.0,
                                num_inference_steps=3, strength=1.0, num_images_per_prompt=2, seed=2 ** 40 + 3),
     (16, 16, "RGB"), None, False),
    # A mask with a soft, coloured edge (grey, binarised at 0.5, nearest to the latents).
    ("inpaint_soft_mask", dict(BASE, prompt=["a red fox in the snow"], num_inference_steps=5, strength=0.8,
                               seed=11), (24, 16, "RGB"), (24, 16, "RGB"), True),
    # A palette 27x21 image and a grey mask, both resized to 24x20, the
    # reference's default strength 1, two images per prompt, no guidance.
    ("inpaint_resize_full", dict(BASE, prompt=["an orange cat"], guidance_scale=0.0, num_inference_steps=4,
                                 strength=1.0, num_images_per_prompt=2, seed=3),
     (27, 21, "P"), (27, 21, "L"), False),
    # A mask of another size and aspect than the image (the mask processor
    # resizes it to the output size whatever its own): a portrait 13x30 mask
    # on a landscape 24x16 image.
    ("inpaint_mask_other_size", dict(BASE, prompt=["a red fox in the snow"], num_inference_steps=5, strength=0.9,
                                     seed=17), (24, 16, "RGB"), (13, 30, "RGB"), True),
    # A 27x21 image resized to 24x20 and a larger, wider 50x33 grey mask
    # resized to it too.
    ("inpaint_mask_larger_resized", dict(BASE, prompt=["an orange cat"], guidance_scale=0.0, num_inference_steps=4,
                                         strength=1.0, seed=19), (27, 21, "RGB"), (50, 33, "L"), False),
]


def run(pipe, args, image_path, mask_path):
    """Both output types of the reference pipeline, and what its first
    `scale_noise` call (in `prepare_latents`) was given and returned."""
    kw = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
              transformer=pipe.transformer, scheduler=pipe.scheduler)
    i2i = ZImageInpaintPipeline(**kw) if mask_path else ZImageImg2ImgPipeline(**kw)
    image = load_image(image_path)
    extra = {"mask_image": load_image(mask_path)} if mask_path else {}
    sched = i2i.scheduler
    original = type(sched).scale_noise
    out, seen = {}, []

    def record(sample, timestep, noise=None):
        r = original(sched, sample, timestep, noise)
        if not seen:
            seen.append((sample.clone(), noise.clone(), r.clone()))
        return r

    sched.scale_noise = record
    copy = lambda p: list(p) if isinstance(p, list) else p  # noqa: E731 (`_encode_prompt` rewrites the list)
    try:
        for kind in ["latent", "np"]:
            seen.clear()
            with torch.no_grad():
                r = i2i(prompt=copy(args["prompt"]), negative_prompt=copy(args["negative_prompt"]), image=image,
                        strength=args["strength"], height=args["height"], width=args["width"],
                        num_inference_steps=args["num_inference_steps"], guidance_scale=args["guidance_scale"],
                        cfg_normalization=args["cfg_normalization"], cfg_truncation=args["cfg_truncation"],
                        max_sequence_length=args["max_sequence_length"],
                        num_images_per_prompt=args["num_images_per_prompt"],
                        generator=torch.Generator("cpu").manual_seed(args["seed"]), output_type=kind, **extra)
            if kind == "latent":
                out["latents"] = r.images.float()
                sample, noise, noised = seen[0]
            else:
                out["image"] = torch.from_numpy(np.asarray(r.images, dtype=np.float32))
    finally:
        del sched.scale_noise
    out["image_latents"], out["initial_latents"], out["noised_latents"] = sample, noise, noised
    return out


def write_cases(base, pipe, pipe_dir, only_committed, link=True):
    for name, args, image, mask, committed in CASES:
        if only_committed and not committed:
            continue
        case_dir = os.path.join(base, name)
        if link:
            link_tree(pipe_dir, os.path.join(case_dir, "pipeline"))
        else:
            shutil.copytree(pipe_dir, os.path.join(case_dir, "pipeline"))
        gen_img2img.make_image(*image[:2], seed=len(name), mode=image[2]).save(os.path.join(case_dir, "image.png"))
        args = dict(args, image="image.png")
        mask_path = None
        if mask is not None:
            gen_img2img.make_mask(*mask).save(os.path.join(case_dir, "mask.png"))
            args["mask_image"] = "mask.png"
            mask_path = os.path.join(case_dir, "mask.png")
        expected = run(pipe, args, os.path.join(case_dir, "image.png"), mask_path)
        prov = {"generator": "xtask/parity/gen_zimage_img2img.py", **versions()}
        write_case(case_dir, "zimage_pipeline", "pipeline", None, expected, TOLERANCE, dtype="f32", args=args,
                   provenance=prov)
        print(f"zimage_img2img/{name}: written")


def generate(out_dir, only_tiny=False, only_committed=False):
    base = os.path.join(out_dir, "zimage_img2img")
    src = os.path.join(base, ".pipeline_src")
    tok_dir = gen_zimage_pipeline.build_tiny_tokenizer(os.path.join(src, "tiny_tok"))
    dst = os.path.join(src, "tiny")
    pipe = gen_zimage_pipeline.build_pipeline(tok_dir, dst)
    write_cases(base, pipe, dst, only_committed)
    shutil.rmtree(src)


def write_fixture():
    """The committed cases, on the committed tiny_tokenizer_cfg pipeline folder
    (each case holds a copy of it: the same bytes, which git stores once)."""
    src = os.path.join(FIXTURE_DIR, "tiny_tokenizer_cfg", "pipeline")
    pipe = ZImagePipeline.from_pretrained(src, torch_dtype=torch.float32)
    for name, *_rest, committed in CASES:
        if committed:
            shutil.rmtree(os.path.join(FIXTURE_DIR, name), ignore_errors=True)
    write_cases(FIXTURE_DIR, pipe, src, only_committed=True, link=False)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fixture"]:
        write_fixture()
    else:
        generate(sys.argv[1])
