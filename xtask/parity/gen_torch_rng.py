"""Fixtures for lumina2-pipeline's `torch_rng`: what
`torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed), dtype=D)`
returns, for both of torch's CPU Box-Muller kernels.

torch picks the kernel once per process from ATEN_CPU_CAPABILITY and the CPU, so
this script runs itself twice: with ATEN_CPU_CAPABILITY=avx2 (the AVX2 kernel,
which AVX-512 machines also run) and with ATEN_CPU_CAPABILITY=default (the scalar
kernel). The AVX2 run needs an x86 CPU with AVX2 and FMA.

    target/parity-venv/bin/python xtask/parity/gen_torch_rng.py
        writes crates/lumina2-pipeline/tests/fixtures/torch_rng/{avx2,scalar}.safetensors
    target/parity-venv/bin/python xtask/parity/gen_torch_rng.py --bulk DIR
        writes the large check's raw little-endian files into DIR (about 90 MB), for
        TORCH_RNG_BULK_DIR=DIR cargo test -p lumina2-pipeline --test torch_rng_bulk -- --ignored
    target/parity-venv/bin/python xtask/parity/gen_torch_rng.py --avx-mathfun DIR
        compiles torch's own ATen/native/cpu/avx_mathfun.h (from the installed
        headers) with g++ -O2 -mavx2 -mfma, as torch's AVX2 build does, and writes
        log256_ps(1 - u) and sincos256_ps(2 pi u) for all 2^24 float uniforms u
        into DIR (192 MB), for the exhaustive check of our emulation:
        TORCH_RNG_AVX_MATHFUN_DIR=DIR cargo test -p lumina2-pipeline --lib avx_mathfun -- --ignored

Keys of the fixture files (all tensors 1-D):
    {dtype}.seed{seed}.n{n}            the whole tensor, dtype f32 | bf16 | f16
    {dtype}.seed{seed}.n{n}.checksum   int64[1]: sum of bits[i] * (2 i + 1) mod 2^64
                                       over the value bit patterns (u32 or u16)
    {dtype}.seed{seed}.n{n}.every{k}   values 0, k, 2k, ... of the tensor
    seq{seed}.{i}.{dtype}.n{n}         call i of a run of calls on one generator
"""

import argparse
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
BITS = {"f32": torch.int32, "bf16": torch.int16, "f16": torch.int16}
KERNELS = {"avx2": "avx2", "scalar": "default"}  # our name -> ATEN_CPU_CAPABILITY

SEEDS = [0, 42, 2**63 + 5]
FULL_NUMELS = [1, 15, 16, 17, 31, 1000]
# 16 * 64 * 64 (a 512x512 latent) and 16 * 128 * 128 (1024x1024).
LARGE_NUMELS = {16 * 64 * 64: 64, 16 * 128 * 128: 256}
# Runs of calls on one generator: the cached double-precision normal carries over
# between calls of fewer than 16 values, and dtypes may change between calls.
SEQUENCES = {
    7: [("f32", 1), ("f32", 3), ("f32", 16), ("f32", 17), ("f32", 5), ("f32", 1000), ("f32", 2), ("f32", 15)],
    11: [("f32", 3), ("bf16", 20), ("f16", 1), ("f32", 33), ("bf16", 7), ("f16", 40), ("bf16", 1), ("f16", 9)],
}

BULK_SEEDS = [0, 1, 2, 3, 5, 7, 42, 99, 1234, 2024, 31337, 123456789, 2**32 - 1, 2**32, 2**63 + 5,
              2**64 - 1, 8, 9, 10, 11]
BULK_NUMEL = 16 * 128 * 128
BULK_SMALL = list(range(1, 41))  # one call each, in this order, on one generator


def randn(seed, n, dtype):
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(n, generator=g, dtype=DTYPES[dtype])


def bits(t, dtype):
    return t.view(BITS[dtype]).numpy()


def checksum(t, dtype):
    unsigned = bits(t, dtype).view(np.uint32 if dtype == "f32" else np.uint16).astype(np.uint64)
    weights = 2 * np.arange(unsigned.size, dtype=np.uint64) + 1
    total = np.sum(unsigned * weights, dtype=np.uint64)  # wraps modulo 2^64
    return torch.tensor([total.view(np.int64)], dtype=torch.int64)


def fixture_tensors():
    out = {}
    for dtype in DTYPES:
        for seed in SEEDS:
            for n in FULL_NUMELS:
                out[f"{dtype}.seed{seed}.n{n}"] = randn(seed, n, dtype)
            for n, every in LARGE_NUMELS.items():
                t = randn(seed, n, dtype)
                out[f"{dtype}.seed{seed}.n{n}.checksum"] = checksum(t, dtype)
                out[f"{dtype}.seed{seed}.n{n}.every{every}"] = t[::every].clone()
    for seed, calls in SEQUENCES.items():
        g = torch.Generator("cpu").manual_seed(seed)
        for i, (dtype, n) in enumerate(calls):
            out[f"seq{seed}.{i}.{dtype}.n{n}"] = torch.randn(n, generator=g, dtype=DTYPES[dtype])
    return out


def write_bulk(directory, kernel):
    os.makedirs(directory, exist_ok=True)
    for seed in BULK_SEEDS:
        for dtype in DTYPES:
            t = randn(seed, BULK_NUMEL, dtype)
            bits(t, dtype).tofile(os.path.join(directory, f"{kernel}_{dtype}_seed{seed}.bin"))
        g = torch.Generator("cpu").manual_seed(seed)
        small = torch.cat([torch.randn(n, generator=g) for n in BULK_SMALL])
        bits(small, "f32").tofile(os.path.join(directory, f"{kernel}_small_seed{seed}.bin"))


AVX_MATHFUN_HARNESS = r"""
// Evaluates torch's AVX2 log and sincos on every float uniform u = k / 2^24, with
// the arguments torch's AVX2 NormalFill16 gives them: 1 - u and (float)(2 pi) * u.
#include <cstdio>
#include <vector>
#include <immintrin.h>
#define CPU_CAPABILITY_AVX2 1
#include <ATen/native/cpu/avx_mathfun.h>

int main() {
  const int n = 1 << 24;
  std::vector<float> lg(n), sn(n), cs(n);
  const __m256 two_pi = _mm256_set1_ps(2.0f * 3.14159265358979323846);
  for (int k = 0; k < n; k += 8) {
    float u[8];
    for (int i = 0; i < 8; i++) u[i] = (float)(k + i) * (1.0f / 16777216.0f);
    const __m256 uv = _mm256_loadu_ps(u);
    _mm256_storeu_ps(&lg[k], log256_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), uv)));
    __m256 s, c;
    sincos256_ps(_mm256_mul_ps(two_pi, uv), &s, &c);
    _mm256_storeu_ps(&sn[k], s);
    _mm256_storeu_ps(&cs[k], c);
  }
  const char* names[3] = {"log.bin", "sin.bin", "cos.bin"};
  const std::vector<float>* data[3] = {&lg, &sn, &cs};
  for (int i = 0; i < 3; i++) {
    FILE* f = std::fopen(names[i], "wb");
    if (!f || std::fwrite(data[i]->data(), 4, n, f) != (size_t)n) return 1;
    std::fclose(f);
  }
  return 0;
}
"""


def write_avx_mathfun(directory):
    os.makedirs(directory, exist_ok=True)
    source = os.path.join(directory, "avx_mathfun_table.cpp")
    with open(source, "w") as f:
        f.write(AVX_MATHFUN_HARNESS)
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    binary = os.path.join(directory, "avx_mathfun_table")
    subprocess.run(["g++", "-O2", "-mavx2", "-mfma", "-std=c++17", "-I", include, source, "-o", binary], check=True)
    subprocess.run([binary], cwd=directory, check=True)


def child(kernel, target):
    capability = torch.backends.cpu.get_cpu_capability()
    expected = "DEFAULT" if kernel == "scalar" else "AVX2"
    if capability != expected:
        sys.exit(f"ATEN_CPU_CAPABILITY={KERNELS[kernel]} gave capability {capability}, expected {expected}")
    if target.endswith(".safetensors"):
        # One key: safetensors writes metadata keys in hash order, and a stable file
        # keeps regeneration free of spurious diffs.
        metadata = {
            "provenance": f"torch {torch.__version__}, cpu capability {capability}, "
            "xtask/parity/gen_torch_rng.py"
        }
        save_file(fixture_tensors(), target, metadata=metadata)
    else:
        write_bulk(target, kernel)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", metavar="DIR", help="write the large check's raw files into DIR instead")
    parser.add_argument("--avx-mathfun", metavar="DIR", help="write the exhaustive avx_mathfun tables into DIR")
    parser.add_argument("--child", nargs=2, metavar=("KERNEL", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.avx_mathfun:
        write_avx_mathfun(args.avx_mathfun)
        print(f"wrote {args.avx_mathfun}/{{log,sin,cos}}.bin")
        return
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    fixtures = os.path.join(root, "crates", "lumina2-pipeline", "tests", "fixtures", "torch_rng")
    os.makedirs(fixtures, exist_ok=True)
    for kernel, capability in KERNELS.items():
        target = args.bulk or os.path.join(fixtures, f"{kernel}.safetensors")
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kernel, target], env=env, check=True)
        print(f"{kernel}: wrote {target}")


if __name__ == "__main__":
    main()
