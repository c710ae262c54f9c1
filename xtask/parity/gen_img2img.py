"""Image-to-image and inpainting cases: diffusers 0.42.1 has no Lumina2 img2img
or inpaint pipeline, so this is `Lumina2Pipeline.__call__` with the image
handling of `FluxImg2ImgPipeline` / `FluxInpaintPipeline` transplanted, written
from their code (cited by file and line of diffusers 0.42.1 below), on the tiny
pipeline of gen_pipeline.py. Cases use the `pipeline` component with
`args.image`, `args.mask_image` and `args.strength` (docs/parity-cases.md).

Files cited:
  L = diffusers/pipelines/lumina2/pipeline_lumina2.py
  F = diffusers/pipelines/flux/pipeline_flux_inpaint.py (its img2img parts are
      those of pipeline_flux_img2img.py, same code)
  I = diffusers/image_processor.py, U = diffusers/utils/loading_utils.py"""

import os

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_inpaint import retrieve_latents, retrieve_timesteps
from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift
from diffusers.utils import load_image

import gen_pipeline
from common import link_tree, versions, write_case

# The same measured tolerance as the text-to-image cases (gen_pipeline.py):
# noise, posterior sample and start step are bit-exact; the images differ by
# float summation order in the VAE encoder, transformer and decoder only.
TOLERANCE = gen_pipeline.TOLERANCE


def make_image(w, h, seed, mode="RGB"):
    """A smooth picture with some texture (what a VAE sees in a photo), saved
    as PNG in `mode`."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([128 + 100 * np.sin(x / 5 + seed), 128 + 100 * np.cos(y / 7), 255 * x / max(w - 1, 1)], -1)
    rgb = np.clip(rgb + g.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    im = PIL.Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        a = (255 * (0.3 + 0.7 * y / max(h - 1, 1))).astype(np.uint8)
        im = PIL.Image.fromarray(np.concatenate([rgb, a[..., None]], -1), "RGBA")
    elif mode == "P":
        im = im.quantize(32)
    return im


def make_mask(w, h, mode="RGB"):
    """White (repaint) ellipse with a soft, coloured edge on black."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    d = ((x - w * 0.55) / (w * 0.3)) ** 2 + ((y - h * 0.45) / (h * 0.35)) ** 2
    v = np.clip(255 * (1.6 - d), 0, 255)
    rgb = np.stack([v, np.clip(v * 1.1, 0, 255), v * 0.8], -1).astype(np.uint8)
    im = PIL.Image.fromarray(rgb, "RGB")
    return im.convert(mode) if mode != "RGB" else im


def call(pipe, args, image_path, mask_path):
    """L.__call__ (lines 472-742) with F's image steps."""
    prompt, negative_prompt = args["prompt"], args["negative_prompt"]
    height, width, strength = args["height"], args["width"], args["strength"]
    num_inference_steps, guidance_scale = args["num_inference_steps"], args["guidance_scale"]
    cfg_trunc_ratio, cfg_normalization = args["cfg_trunc_ratio"], args["cfg_normalization"]
    num_images_per_prompt = args["num_images_per_prompt"]
    generator = torch.Generator("cpu").manual_seed(args["seed"])
    device = torch.device("cpu")
    # U.load_image: exif_transpose, then convert("RGB") (what a user passes).
    image = load_image(image_path)
    mask_image = load_image(mask_path) if mask_path else None
    # F lines 226-235: the image and mask processors (vae_scale_factor 8 * 2).
    vae_scale_factor = pipe.vae_scale_factor
    latent_channels = pipe.vae.config.latent_channels
    image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2, vae_latent_channels=latent_channels)
    mask_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2, vae_latent_channels=latent_channels,
                                       do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    # F line 979: preprocess (I.preprocess: Lanczos resize, /255, 2x - 1), then float32.
    init_image = image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    batch_size = len(prompt)
    do_cfg = guidance_scale > 1
    # L lines 598-612: encode_prompt.
    (prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
     negative_prompt_attention_mask) = pipe.encode_prompt(
        prompt, do_cfg, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
        device=device, max_sequence_length=args["max_sequence_length"], system_prompt=args["system_prompt"])
    # L lines 641-663: sigmas linspace(1, 1/N, N), mu from latents.shape[1]
    # (the channel count, as Lumina2 computes it), retrieve_timesteps.
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(latent_channels, pipe.scheduler.config.get("base_image_seq_len", 256),
                         pipe.scheduler.config.get("max_image_seq_len", 4096),
                         pipe.scheduler.config.get("base_shift", 0.5), pipe.scheduler.config.get("max_shift", 1.15))
    timesteps, num_inference_steps = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas,
                                                        mu=mu)
    # F lines 483-492 get_timesteps (called at F line 1052), float64 arithmetic.
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    timesteps = pipe.scheduler.timesteps[t_start * pipe.scheduler.order:]
    pipe.scheduler.set_begin_index(t_start * pipe.scheduler.order)
    num_inference_steps = num_inference_steps - t_start
    assert num_inference_steps >= 1  # F lines 1054-1058
    # F line 1059.
    latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)
    # F lines 633-686 prepare_latents (packing left out: Lumina2 latents are not packed).
    b = batch_size * num_images_per_prompt
    dtype = prompt_embeds.dtype
    lh, lw = 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))
    shape = (b, latent_channels, lh, lw)
    img = init_image.to(device=device, dtype=dtype)
    # F lines 468-480 _encode_vae_image: the posterior *sample* with the generator.
    image_latents = retrieve_latents(pipe.vae.encode(img), generator=generator)
    image_latents = (image_latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    if b > image_latents.shape[0] and b % image_latents.shape[0] == 0:
        image_latents = torch.cat([image_latents] * (b // image_latents.shape[0]), dim=0)
    # F lines 676-678: the noise from the same generator, after the sample.
    from diffusers.utils.torch_utils import randn_tensor
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    latents = pipe.scheduler.scale_noise(image_latents, latent_timestep, noise)
    noised_latents = latents.clone()
    mask = None
    if mask_image is not None:
        # F line 1078: mask preprocess (Lanczos resize in RGB, convert("L"), /255, binarise).
        mask_condition = mask_processor.preprocess(mask_image, height=height, width=width)
        # F lines 688-732 prepare_mask_latents: nearest interpolation to the latent grid,
        # repeated to the batch. (The masked image's VAE sample it also draws comes after
        # every draw that matters and is unused by the non-Fill pipeline: left out.)
        mask = torch.nn.functional.interpolate(mask_condition, size=(lh, lw)).to(device=device, dtype=dtype)
        if mask.shape[0] < b:
            mask = mask.repeat(b // mask.shape[0], 1, 1, 1)
    # L lines 667-727, the loop, from the begin index; num_inference_steps is the
    # number of steps that run (F line 1052), so the truncation counts only those.
    for i, t in enumerate(timesteps):
        do_classifier_free_truncation = (i + 1) / num_inference_steps > cfg_trunc_ratio  # L 671
        current_timestep = 1 - t / pipe.scheduler.config.num_train_timesteps  # L 673
        current_timestep = current_timestep.expand(latents.shape[0])
        noise_pred_cond = pipe.transformer(hidden_states=latents, timestep=current_timestep,
                                           encoder_hidden_states=prompt_embeds,
                                           encoder_attention_mask=prompt_attention_mask, return_dict=False)[0]
        if do_cfg and not do_classifier_free_truncation:
            noise_pred_uncond = pipe.transformer(hidden_states=latents, timestep=current_timestep,
                                                 encoder_hidden_states=negative_prompt_embeds,
                                                 encoder_attention_mask=negative_prompt_attention_mask,
                                                 return_dict=False)[0]
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)  # L 696
            if cfg_normalization:
                cond_norm = torch.norm(noise_pred_cond, dim=-1, keepdim=True)
                noise_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                noise_pred = noise_pred * (cond_norm / noise_norm)
        else:
            noise_pred = noise_pred_cond
        noise_pred = -noise_pred  # L 707
        latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]  # L 708
        if mask is not None:
            # F lines 1180-1191: the known region back, noised to the next timestep.
            init_latents_proper = image_latents
            if i < len(timesteps) - 1:
                noise_timestep = timesteps[i + 1]
                init_latents_proper = pipe.scheduler.scale_noise(init_latents_proper,
                                                                 torch.tensor([noise_timestep]), noise)
            latents = (1 - mask) * init_latents_proper + mask * latents
    # L lines 731-734: decode, postprocess (output_type="np"); no paste-back.
    latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
    out = pipe.vae.decode(latents, return_dict=False)[0]
    out = pipe.image_processor.postprocess(out, output_type="np")
    return {"image": torch.from_numpy(np.asarray(out, dtype=np.float32)), "initial_latents": noise,
            "image_latents": image_latents, "noised_latents": noised_latents}


BASE = dict(negative_prompt=None, guidance_scale=4.0, cfg_trunc_ratio=1.0, cfg_normalization=True,
            system_prompt=None, max_sequence_length=32, num_images_per_prompt=1)

# name, args, image (w, h, mode), mask (w, h, mode) or None, committed as a test fixture
CASES = [
    ("img2img_strength_0_6", dict(BASE, prompt=["a red fox in the snow"], height=32, width=48,
                                  num_inference_steps=5, strength=0.6, seed=42), (48, 32, "RGB"), None, True),
    ("img2img_prompts_trunc", dict(BASE, prompt=["a castle on a hill", "two cats asleep on a sofa"],
                                   negative_prompt=["blurry", "low quality"], height=32, width=32,
                                   num_inference_steps=10, strength=0.7, guidance_scale=3.0, cfg_trunc_ratio=0.5,
                                   cfg_normalization=False, seed=7), (32, 32, "RGB"), None, True),
    ("img2img_per_prompt_full", dict(BASE, prompt=["a lighthouse"], height=32, width=32, num_inference_steps=3,
                                     strength=1.0, num_images_per_prompt=2, seed=2 ** 40 + 3),
     (32, 32, "RGB"), None, False),
    ("img2img_resize_rgba", dict(BASE, prompt=["a boat"], height=32, width=48, num_inference_steps=4,
                                 strength=0.3, seed=5), (48, 41, "RGBA"), None, True),
    # Both axes resized (PIL's Lanczos, its two passes in Pillow's order:
    # src/libImaging/Resample.c ImagingResampleInner runs the vertical pass
    # first when the height shrinks by more than twice the width's shrink):
    # 45x37 -> 48x32 vertical pass first.
    ("img2img_resize_both_axes", dict(BASE, prompt=["a boat"], height=32, width=48, num_inference_steps=4,
                                      strength=0.3, seed=5), (45, 37, "RGB"), None, True),
    ("inpaint", dict(BASE, prompt=["a red fox in the snow"], height=32, width=48, num_inference_steps=5,
                     strength=0.8, seed=11), (48, 32, "RGB"), (48, 32, "RGB"), True),
    ("inpaint_resize_palette", dict(BASE, prompt=["an orange cat"], height=48, width=32, num_inference_steps=4,
                                    strength=1.0, num_images_per_prompt=2, seed=3),
     (37, 50, "P"), (37, 50, "L"), False),
    # Image and mask 40x44 -> 48x32 vertical pass first (the palette case
    # above: 37x50 -> 32x48 horizontal pass first).
    ("inpaint_resize_both_axes", dict(BASE, prompt=["a red fox in the snow"], height=32, width=48,
                                      num_inference_steps=4, strength=0.9, seed=13),
     (40, 44, "RGB"), (40, 44, "RGB"), False),
    # A mask of another size and aspect than the image (the mask processor
    # resizes it to the output size whatever its own): a portrait 20x36
    # mask on a landscape 48x32 image.
    ("inpaint_mask_other_size", dict(BASE, prompt=["a red fox in the snow"], height=32, width=48,
                                     num_inference_steps=5, strength=0.9, seed=17),
     (48, 32, "RGB"), (20, 36, "RGB"), False),
    # Image 40x44 and a larger, wider 90x50 grey mask, both resized to 48x32.
    ("inpaint_mask_larger_resized", dict(BASE, prompt=["an orange cat"], height=32, width=48,
                                         num_inference_steps=4, strength=1.0, seed=19),
     (40, 44, "RGB"), (90, 50, "L"), False),
]


def generate(out_dir, only_tiny=False, only_committed=False):
    base = os.path.join(out_dir, "img2img")
    src = os.path.join(base, ".pipeline_src")
    pipe = gen_pipeline.build_pipeline(src)
    for name, args, image, mask, committed in CASES:
        if only_committed and not committed:
            continue
        case_dir = os.path.join(base, name)
        link_tree(os.path.join(src, "pipeline"), os.path.join(case_dir, "pipeline"))
        make_image(*image[:2], seed=len(name), mode=image[2]).save(os.path.join(case_dir, "image.png"))
        args = dict(args, image="image.png")
        mask_path = None
        if mask is not None:
            make_mask(*mask).save(os.path.join(case_dir, "mask.png"))
            args["mask_image"] = "mask.png"
            mask_path = os.path.join(case_dir, "mask.png")
        assert not (len(args["prompt"]) > 1 and args["num_images_per_prompt"] > 1)
        with torch.no_grad():
            expected = call(pipe, args, os.path.join(case_dir, "image.png"), mask_path)
        prov = {"generator": "xtask/parity/gen_img2img.py", **versions()}
        write_case(case_dir, "pipeline", "pipeline", None, expected, TOLERANCE, dtype="f32", args=args,
                   provenance=prov)
        print(f"img2img/{name}: written")
    import shutil
    shutil.rmtree(src)
