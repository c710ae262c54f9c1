"""Original-mode cases: the Alpha-VLLM Lumina-Image 2.0 sampler
(github.com/Alpha-VLLM/Lumina-Image-2.0, commit 4a4d6f8), transcribed on the
tiny pipeline of gen_pipeline.py, for `--guidance-mode original --sampler
midpoint`:

- the time grid: `transport/integrators.py` `ode.__init__` lines 99-101,
  `th.linspace(t0, t1, num_steps)` (float32, `num_steps` grid points, so
  `steps + 1` for our `steps` intervals) then
  `t / (t + time_shifting_factor - time_shifting_factor * t)` (float32;
  `sample.py` passes `t_shift` = 6, the scheduler's `shift`);
- the integrator: torchdiffeq's fixed-grid `midpoint` (`odeint` in
  `ode.sample`, line 121): `dt = t1 - t0`, `y_mid = y0 + f(t0, y0) * (0.5 *
  dt)`, `y1 = y0 + dt * f(t0 + 0.5 * dt, y_mid)`;
- the model: `models/model.py` `forward_with_cfg` (lines 781-822): guidance
  while `t[0] < cfg_trunc` (float32 comparison), at any `cfg_scale`, then the
  guided norm clamped to `renorm_cfg` times the conditional one when
  `renorm_cfg > 0`. The conditional and unconditional passes run one after the
  other with their own masks, as diffusers runs them (the original batches
  them; with the masks the result is the same).

The transformer, text encoder and VAE are diffusers 0.42.1's; the
transformer's output is the original's velocity `dx/dt` (diffusers negates it
for its sigma-time scheduler). Prompts are encoded with diffusers'
`encode_prompt`, a non-empty negative prompt behind the system prompt as the
original templates it. The cases are `pipeline` cases with
`args.guidance_mode = "original"`, `args.solver = "midpoint"` and
`args.renorm_cfg`."""

import os
import shutil

import numpy as np
import torch

import gen_pipeline
import gen_teacache
from common import link_tree, versions, write_case

CASES = [
    # A scale below 1 still combines the two predictions (diffusers would not guide).
    ("scale_below_one", dict(prompt=["a red fox in the snow"], negative_prompt=None, height=32, width=48,
                             num_inference_steps=5, guidance_scale=0.6, cfg_trunc_ratio=1.0,
                             cfg_normalization=True, renorm_cfg=1.0, system_prompt=None,
                             max_sequence_length=32, num_images_per_prompt=1, seed=3)),
    # 1/7 is the float32 grid point t[2] of 4 steps: the original's `t < cfg_trunc`
    # is false there, while 1 - sigma from diffusers' sigmas lies just below it.
    ("trunc_on_grid_point", dict(prompt=["a castle on a hill"], negative_prompt=None, height=32, width=32,
                                 num_inference_steps=4, guidance_scale=4.0, cfg_trunc_ratio=1.0 / 7.0,
                                 cfg_normalization=True, renorm_cfg=1.0, system_prompt=None,
                                 max_sequence_length=24, num_images_per_prompt=1, seed=5)),
    ("renorm_half", dict(prompt=["two cats asleep on a sofa"], negative_prompt=None, height=32, width=32,
                         num_inference_steps=4, guidance_scale=5.0, cfg_trunc_ratio=1.0,
                         cfg_normalization=True, renorm_cfg=0.5, system_prompt=None,
                         max_sequence_length=24, num_images_per_prompt=1, seed=11)),
    ("renorm_off_batch", dict(prompt=["an empty road at night", "a lighthouse at dawn"],
                              negative_prompt=["blurry", "low quality, watermark"], height=32, width=32,
                              num_inference_steps=3, guidance_scale=3.0, cfg_trunc_ratio=0.5,
                              cfg_normalization=True, renorm_cfg=0.0, system_prompt="You draw pictures.",
                              max_sequence_length=24, num_images_per_prompt=1, seed=7)),
]

TOLERANCE = gen_pipeline.TOLERANCE


def time_grid(steps, shift):
    """integrators.py lines 99-101 (float32)."""
    t = torch.linspace(0, 1, steps + 1)
    return t / (t + shift - shift * t)


def forward_with_cfg(transformer, x, t, cond, uncond, cfg_scale, cfg_trunc, renorm_cfg, guided):
    """model.py lines 781-822, with diffusers' transformer; `t` is the
    [B] float32 time. Records in `guided` whether guidance ran."""
    pe, pm = cond
    if t[0] < cfg_trunc:
        guided.append(True)
        cond_eps = transformer(x, t, pe, pm, return_dict=False)[0]
        uncond_eps = transformer(x, t, uncond[0], uncond[1], return_dict=False)[0]
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if float(renorm_cfg) > 0.0:
            # The original's `if` on a one-image batch (sample.py draws one
            # image at a time), image by image.
            out = []
            for c, h in zip(cond_eps, half_eps):
                c, h = c[None], h[None]
                ori_pos_norm = torch.linalg.vector_norm(c, dim=tuple(range(1, len(c.shape))), keepdim=True)
                max_new_norm = ori_pos_norm * float(renorm_cfg)
                new_pos_norm = torch.linalg.vector_norm(h, dim=tuple(range(1, len(h.shape))), keepdim=True)
                if new_pos_norm >= max_new_norm:
                    h = h * (max_new_norm / new_pos_norm)
                out.append(h)
            half_eps = torch.cat(out, dim=0)
        return half_eps
    guided.append(False)
    return transformer(x, t, pe, pm, return_dict=False)[0]


def run(pipe, args):
    n = args["num_images_per_prompt"]
    negatives = args["negative_prompt"]
    system_prompt = args["system_prompt"]
    if negatives is not None:
        # The original templates the negative prompt like the positive one.
        sp = system_prompt if system_prompt is not None else pipe.system_prompt
        negatives = [f"{sp} <Prompt Start> {p}" if p else p for p in negatives]
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(args["prompt"], do_classifier_free_guidance=True,
                                            negative_prompt=negatives, num_images_per_prompt=n,
                                            device=torch.device("cpu"), system_prompt=system_prompt,
                                            max_sequence_length=args["max_sequence_length"])
        batch = len(args["prompt"]) * n
        latents = pipe.prepare_latents(batch, pipe.transformer.config.in_channels, args["height"], args["width"],
                                       torch.float32, torch.device("cpu"),
                                       torch.Generator("cpu").manual_seed(args["seed"]))
        initial = latents.clone()
        shift = pipe.scheduler.config.shift
        t = time_grid(args["num_inference_steps"], shift)
        guided = []

        def f(tt, x):
            tt = torch.ones(x.size(0)) * tt
            return forward_with_cfg(pipe.transformer, x, tt, (pe, pm), (ne, nm), args["guidance_scale"],
                                    args["cfg_trunc_ratio"], args["renorm_cfg"], guided).float()

        x = latents.float()
        for t0, t1 in zip(t[:-1], t[1:]):
            dt = t1 - t0
            half_dt = 0.5 * dt
            y_mid = x + f(t0, x) * half_dt
            x = x + dt * f(t0 + half_dt, y_mid)
        vae = pipe.vae
        z = x / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="np")
    expected = {"image": torch.from_numpy(np.asarray(image, dtype=np.float32)), "latents": x,
                "initial_latents": initial}
    return expected, f"guidance at {sum(guided)} of {len(guided)} evaluations"


def generate(out_dir, only_tiny=False, only_committed=False):
    base = os.path.join(out_dir, "original")
    src = os.path.join(base, ".tiny_src")
    pipe = gen_teacache.build(src, gen_pipeline.TRANSFORMER, gen_pipeline.TEXT, gen_pipeline.VAE)
    for name, args in CASES:
        case_dir = os.path.join(base, name)
        link_tree(os.path.join(src, "pipeline"), os.path.join(case_dir, "pipeline"))
        expected, note = run(pipe, args)
        args = dict(args, guidance_mode="original", solver="midpoint")
        prov = {"generator": "xtask/parity/gen_original.py",
                "reference": "Alpha-VLLM/Lumina-Image-2.0@4a4d6f8 transport/integrators.py, models/model.py "
                             "forward_with_cfg; torchdiffeq fixed-grid midpoint", **versions()}
        write_case(case_dir, "pipeline", "pipeline", None, expected, TOLERANCE, dtype="f32", args=args,
                   provenance=prov)
        print(f"original/{name}: written ({note})")
    shutil.rmtree(src)
