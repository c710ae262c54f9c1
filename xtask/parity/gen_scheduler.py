"""Scheduler cases: diffusers' FlowMatchEulerDiscreteScheduler, driven as
Lumina2Pipeline drives it (retrieve_timesteps, set_begin_index(0), one step per
timestep).

Tolerances: schedules built from +, -, *, / only are IEEE-exact everywhere, so
those cases ask for bit equality (atol = rtol = 0). Schedules that go through
libm (exp for dynamic exponential shifting, pow for Karras, log/exp for
exponential sigmas, scipy's beta.ppf for beta sigmas) are computed in float64
and rounded to float32; a last-bit difference of another libm (or of our
incomplete-beta inversion against scipy's Boost) can flip that rounding by one
float32 ulp, so those cases allow 2 float32 ulps relative (rtol 2.4e-7) and, for
the sample, the effect of one such ulp of dt on each step (atol 1e-6).

The beta case needs scipy (diffusers' beta sigmas call scipy.stats.beta.ppf); it
is skipped with a note when scipy is not importable."""

import json
import os

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift, retrieve_timesteps

from common import versions, write_case

EXACT = {"atol": 0.0, "rtol": 0.0}
LIBM = {"atol": 1e-6, "rtol": 2.4e-7}

# Alpha-VLLM/Lumina-Image-2.0 scheduler/scheduler_config.json, as published.
LUMINA = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.32.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 6.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def lumina_sigmas(n):
    return np.linspace(1.0, 1 / n, n).tolist()


def cases():
    """(name, config, num_inference_steps, sigmas or None, mu or None, dtype, tolerance)."""
    mu_1024 = calculate_shift(4096)  # 1024x1024 image: 128x128 latent, patch 2
    return [
        ("lumina_default", LUMINA, 30, lumina_sigmas(30), mu_1024, "f32", EXACT),
        ("lumina_default_bf16", LUMINA, 18, lumina_sigmas(18), mu_1024, "bf16", EXACT),
        ("lumina_single_step", LUMINA, 1, lumina_sigmas(1), None, "f32", EXACT),
        ("lumina_no_sigmas", LUMINA, 25, None, None, "f32", EXACT),
        ("defaults_no_sigmas", {}, 20, None, None, "f32", EXACT),
        ("odd_shift_sigmas", {"shift": 3.1}, 17, lumina_sigmas(17), None, "f32", EXACT),
        ("dynamic_exponential", {"use_dynamic_shifting": True}, 20, lumina_sigmas(20), 1.1, "f32", LIBM),
        ("dynamic_exponential_no_sigmas", {"use_dynamic_shifting": True}, 16, None, 0.73, "f32", LIBM),
        ("dynamic_linear", {"use_dynamic_shifting": True, "time_shift_type": "linear"}, 20,
         lumina_sigmas(20), 1.7, "f32", EXACT),
        ("dynamic_linear_no_sigmas", {"use_dynamic_shifting": True, "time_shift_type": "linear"}, 13,
         None, 2.3, "f32", EXACT),
        ("shift_terminal", {"use_dynamic_shifting": True, "shift_terminal": 0.1}, 24, lumina_sigmas(24),
         0.95, "f32", LIBM),
        ("shift_terminal_static", {"shift": 6.0, "shift_terminal": 0.05}, 15, lumina_sigmas(15), None,
         "f32", EXACT),
        ("shift_terminal_no_sigmas", {"shift": 2.0, "shift_terminal": 0.2}, 11, None, None, "f32", EXACT),
        ("karras", dict(LUMINA, use_karras_sigmas=True), 12, lumina_sigmas(12), None, "f32", LIBM),
        ("karras_no_sigmas", {"shift": 3.0, "use_karras_sigmas": True}, 9, None, None, "f32", LIBM),
        ("exponential", dict(LUMINA, use_exponential_sigmas=True), 14, lumina_sigmas(14), None, "f32", LIBM),
        ("exponential_no_sigmas", {"shift": 1.0, "use_exponential_sigmas": True}, 10, None, None, "f32",
         LIBM),
        ("beta", dict(LUMINA, use_beta_sigmas=True), 16, lumina_sigmas(16), None, "f32", LIBM),
        ("beta_no_sigmas", {"shift": 3.0, "use_beta_sigmas": True}, 21, None, None, "f32", LIBM),
        ("invert_sigmas", dict(LUMINA, invert_sigmas=True), 10, lumina_sigmas(10), None, "f32", EXACT),
    ]


def has_scipy():
    try:
        import scipy.stats  # noqa: F401
        return True
    except ImportError:
        return False


def generate(out_dir, only_tiny=False):
    # Every case is tiny: only_tiny changes nothing.
    del only_tiny
    scipy_ok = has_scipy()
    root = os.path.join(out_dir, "scheduler")
    for idx, (name, config, n, sigmas, mu, dtype, tol) in enumerate(cases()):
        if config.get("use_beta_sigmas") and not scipy_ok:
            print(f"scheduler/{name}: skipped (scipy is not installed; diffusers' beta sigmas need it)")
            continue
        case_dir = os.path.join(root, name)
        model_dir = os.path.join(case_dir, "scheduler")
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "scheduler_config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir)
        if sigmas is not None:
            sigmas = json.loads(json.dumps(sigmas))  # exactly what case.json holds
        kwargs = {} if mu is None else {"mu": mu}
        timesteps, steps = retrieve_timesteps(
            sched, None if sigmas is not None else n, "cpu", sigmas=sigmas, **kwargs)
        assert steps == n
        tdtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
        g = torch.Generator().manual_seed(1000 + idx)
        sample = torch.randn(1, 4, 6, 5, generator=g)
        model_outputs = torch.randn(n, 1, 4, 6, 5, generator=g) * 1.5
        sched.set_begin_index(0)
        latents = sample.to(tdtype)
        for i, t in enumerate(timesteps):
            latents = sched.step(model_outputs[i].to(tdtype), t, latents, return_dict=False)[0]
        args = {"num_inference_steps": n}
        if sigmas is not None:
            args["sigmas"] = sigmas
        if mu is not None:
            args["mu"] = mu
        write_case(
            case_dir, "scheduler", "scheduler",
            inputs={"sample": sample, "model_outputs": model_outputs},
            expected={"timesteps": timesteps, "sigmas": sched.sigmas, "final_sample": latents},
            tolerance=tol, dtype=dtype, args=args,
            provenance=dict(versions(), numpy=np.__version__, scipy=_scipy_version(),
                            note="FlowMatchEulerDiscreteScheduler via retrieve_timesteps, "
                                 "set_begin_index(0), step i fed model_outputs[i]"),
        )


def _scipy_version():
    try:
        import scipy
        return scipy.__version__
    except ImportError:
        return None
