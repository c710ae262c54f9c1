"""`gguf_dequant` cases: GGUF files written with gguf-py's GGUFWriter holding a
tensor of every type we dequantise, and gguf-py's own `gguf.quants.dequantize`
of each tensor as the reference (bit-exact: tolerance 0).

Types gguf-py can quantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are
quantized from random values with `gguf.quants.quantize`; for the K-quants, which
gguf-py 0.19 can only dequantize, the blocks are random bytes whose f16 scales
(d, dmin) are overwritten with random values in a sane range."""

import os

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from common import write_case

# Byte offsets of the f16 super-block scales in each K-quant block.
K_SCALE_OFFSETS = {
    T.Q2_K: [80, 82],   # scales[16] qs[64] d dmin
    T.Q3_K: [108],      # hmask[32] qs[64] scales[12] d
    T.Q4_K: [0, 2],     # d dmin scales[12] qs[128]
    T.Q5_K: [0, 2],     # d dmin scales[12] qh[32] qs[128]
    T.Q6_K: [208],      # ql[128] qh[64] scales[16] d
}
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def _random_k_blocks(rng, qtype, shape):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in K_SCALE_OFFSETS[qtype]:
        scale = (rng.uniform(1e-3, 5e-2, size=n_blocks) * rng.choice([-1.0, 1.0], size=n_blocks))
        blocks[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    row_bytes = shape[-1] // block_size * type_size
    return blocks.reshape(*shape[:-1], row_bytes)


def _tensor_bytes(rng, qtype, shape):
    """What to hand GGUFWriter.add_tensor: (array, raw_dtype)."""
    if qtype in K_SCALE_OFFSETS:
        return _random_k_blocks(rng, qtype, shape), qtype
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.5)
    if x.size >= 4:
        # Values that stress rounding and signs: zeros, -0.0, a large one, an
        # f16 subnormal.
        flat = x.reshape(-1)
        flat[0], flat[1], flat[2], flat[3] = 0.0, -0.0, 3.75, 3e-6
    q = quantize(x, qtype)
    if qtype in (T.F32, T.F16):
        return q, None
    return q, qtype


def _write_gguf(path, tensors, alignment=None, seed=0):
    """tensors: list of (name, qtype, pytorch shape). Returns {name: float32 reference}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch="lumina2")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_string("general.name", "lumina2-rs gguf parity fixture")
    w.add_uint32("lumina2.block_count", 2)
    w.add_int64("test.i64", -(1 << 40))
    w.add_float32("test.f32", 0.1)
    w.add_float64("test.f64", -2.5e-300)
    w.add_bool("test.bool", True)
    w.add_int8("test.i8", -7)
    w.add_uint16("test.u16", 65535)
    w.add_array("test.strings", ["a", "", "ünïcödé", "GGUF"])
    w.add_array("test.i32s", [1, -2, 3])
    w.add_array("test.f32s", [0.5, -1.5])
    w.add_array("test.nested", [[1, 2, 3], [4], [5, 6]])
    w.add_array("test.nested_strings", [["x", "yz"], ["w"]])
    raw = {}
    for name, qtype, shape in tensors:
        arr, raw_dtype = _tensor_bytes(rng, qtype, shape)
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
        raw[name] = (arr, qtype, shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    expected = {}
    for name, (arr, qtype, shape) in raw.items():
        ref = dequantize(np.ascontiguousarray(arr), qtype)
        assert ref.dtype == np.float32 and tuple(ref.shape) == tuple(shape), (name, ref.shape)
        expected[name] = ref
    # The file as gguf-py reads it back gives the same values.
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        back = dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        assert np.array_equal(back.view(np.uint32), expected[t.name].view(np.uint32)), t.name
    return expected


def _shapes(qtype):
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if block == 1:
        return [(6, 40), (33,)]
    if block == 32:
        return [(6, 64), (96,)]
    return [(3, 512), (256,)]


def _all_types():
    tensors = []
    for qtype in QUANTIZABLE + list(K_SCALE_OFFSETS):
        for i, shape in enumerate(_shapes(qtype)):
            tensors.append((f"{qtype.name.lower()}.{'weight' if len(shape) == 2 else 'bias'}{i}", qtype, shape))
    tensors.append(("q4_0.conv", T.Q4_0, (2, 3, 1, 32)))
    tensors.append(("q6_k.three_d", T.Q6_K, (2, 2, 256)))
    return tensors


def generate(out_dir, only_tiny=False):
    root = os.path.join(out_dir, "gguf_dequant")
    cases = {
        "all_types": (_all_types(), None, 1),
        "align64": ([("a.weight", T.Q8_0, (4, 32)), ("b", T.F16, (7,)),
                     ("c.weight", T.Q4_K, (2, 256)), ("d", T.F32, (3,))], 64, 2),
    }
    for case, (tensors, alignment, seed) in cases.items():
        case_dir = os.path.join(root, case)
        os.makedirs(case_dir, exist_ok=True)
        expected = _write_gguf(os.path.join(case_dir, "model.gguf"), tensors, alignment, seed)
        write_case(
            case_dir, "gguf_dequant", "model.gguf", None,
            {k: torch.from_numpy(v.copy()) for k, v in expected.items()},
            {"atol": 0.0, "rtol": 0.0},
            provenance={"gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
                        "numpy": np.__version__,
                        "tensors": [[n, q.name, list(s)] for n, q, s in tensors]},
        )
