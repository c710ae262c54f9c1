"""`gguf_quantize` cases: float32 tensors and the bytes gguf-py 0.19.0's
`gguf.quants.quantize` makes of them, for every type gguf-py can quantize
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; `quants.py` classes of those names). Our
quantisers must give the same bytes (tolerance 0).

gguf-py has no quantiser for the K-quants (Q4_K, Q5_K, Q6_K are
dequantize-only in 0.19.0); ours follow llama.cpp's reference code and are
checked by their round-trip error instead (`lumina2-loader` tests, and
`convert_check.py`, which dequantises files we write with gguf-py).

The tensors: random normal rows of the real model's widths (2304, the
hidden size, and 256), weights shaped as the model's (N(0, 1/fan_in)), norm
weights near 1, and blocks that stress the rounding: all zeros, one nonzero
value, all equal, exact ties (x / d + 0.5 on an integer), signed absmax
ties, f16 subnormal scales, huge values near f16's limit."""

import os

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from common import write_case

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def _edge_blocks(rng):
    """Rows of 32 values, one stress pattern each."""
    rows = []
    rows.append(np.zeros(32))
    one = np.zeros(32)
    one[7] = -0.3
    rows.append(one)
    rows.append(np.full(32, 0.125))
    # Ties: values that land exactly on .5 after scaling for several types.
    rows.append(np.arange(32) - 15.5)
    rows.append((np.arange(32) % 17 - 8) * 0.25)
    # Signed absmax ties: +m and -m both present (the first one wins).
    tie = rng.standard_normal(32) * 0.1
    tie[3], tie[20] = 0.5, -0.5
    rows.append(tie)
    tie2 = tie.copy()
    tie2[3], tie2[20] = -0.5, 0.5
    rows.append(tie2)
    # A scale that is an f16 subnormal, and one near f16's largest value.
    rows.append(rng.standard_normal(32) * 1e-6)
    rows.append(rng.standard_normal(32) * 2e-8)
    rows.append(rng.uniform(-1, 1, 32) * 60000.0)
    # All positive and all negative (Q4_1/Q5_1 minimum handling).
    rows.append(rng.uniform(0.5, 1.5, 32))
    rows.append(-rng.uniform(0.5, 1.5, 32))
    return np.stack(rows).astype(np.float32)


def _tensors(seed, real_width, rows):
    rng = np.random.default_rng(seed)
    t = {
        "edge": _edge_blocks(rng),
        "normal": rng.standard_normal((rows, 256)).astype(np.float32),
        "weight": (rng.standard_normal((2 * rows, real_width)) / np.sqrt(real_width)).astype(np.float32),
        "norm": (1.0 + 0.1 * rng.standard_normal((1, real_width))).astype(np.float32),
        "heavy": (rng.standard_t(2, (rows, 512)) * 0.05).astype(np.float32),
    }
    return t


def generate(out_dir, only_tiny=False):
    root = os.path.join(out_dir, "gguf_quantize")
    # The tiny case is committed (crates/lumina2-loader/tests/fixtures).
    cases = {"tiny": (1, 256, 2)}
    if not only_tiny:
        cases["real_width"] = (2, 2304, 8)
    for case, (seed, width, rows) in cases.items():
        tensors = _tensors(seed, width, rows)
        expected = {}
        for name, x in tensors.items():
            for qtype in TYPES:
                q = quantize(x, qtype)
                assert q.dtype == np.uint8
                expected[f"{name}.{qtype.name}"] = torch.from_numpy(q.reshape(-1).astype(np.int64))
        case_dir = os.path.join(root, case)
        write_case(
            case_dir, "gguf_quantize", None,
            {k: torch.from_numpy(v) for k, v in tensors.items()},
            expected,
            {"atol": 0.0, "rtol": 0.0},
            args={"types": [q.name for q in TYPES]},
            provenance={"gguf": "0.19.0", "numpy": np.__version__,
                        "source": "gguf-py gguf/quants.py quantize(); classes Q8_0, Q4_0, Q4_1, Q5_0, Q5_1",
                        "shapes": {k: list(v.shape) for k, v in tensors.items()}},
        )
