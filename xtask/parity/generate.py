"""Writes the project's parity cases (format: docs/parity-cases.md).

    python xtask/parity/generate.py --out DIR [--only-tiny] [--components transformer,...]

`cargo xtask parity` runs this inside its pinned virtual environment; the
committed test fixtures are the `--only-tiny` output (see each fixture folder's
README for the exact command)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import gen_comfy  # noqa: E402
import gen_gguf  # noqa: E402
import gen_gguf_quantize  # noqa: E402
import gen_img2img  # noqa: E402
import gen_lora  # noqa: E402
import gen_original  # noqa: E402
import gen_pipeline  # noqa: E402
import gen_qwen3  # noqa: E402
import gen_qwen3_tokenizer  # noqa: E402
import gen_transformer  # noqa: E402
import gen_transformer_single  # noqa: E402
import gen_text_encoder  # noqa: E402
import gen_text_encoder_gguf  # noqa: E402
import gen_scheduler  # noqa: E402
import gen_teacache  # noqa: E402
import gen_tokenizer  # noqa: E402
import gen_vae  # noqa: E402
import gen_zimage_files  # noqa: E402
import gen_zimage_img2img  # noqa: E402
import gen_zimage_pipeline  # noqa: E402
import gen_zimage_transformer  # noqa: E402

GENERATORS = {"transformer": gen_transformer.generate, "scheduler": gen_scheduler.generate}
GENERATORS["gguf_dequant"] = gen_gguf.generate
GENERATORS["gguf_quantize"] = gen_gguf_quantize.generate
GENERATORS["vae"] = gen_vae.generate
GENERATORS["vae_bfl"] = gen_comfy.generate
GENERATORS["text_encoder"] = gen_text_encoder.generate
GENERATORS["text_encoder_gguf"] = gen_text_encoder_gguf.generate
GENERATORS["qwen3"] = gen_qwen3.generate
GENERATORS["transformer_single_file"] = gen_transformer_single.generate
GENERATORS["lora"] = gen_lora.generate
GENERATORS["pipeline"] = gen_pipeline.generate
GENERATORS["teacache"] = gen_teacache.generate
GENERATORS["img2img"] = gen_img2img.generate
GENERATORS["original"] = gen_original.generate
GENERATORS["tokenizer_ids"] = gen_tokenizer.generate
GENERATORS["zimage_transformer"] = gen_zimage_transformer.generate
GENERATORS["zimage_files"] = gen_zimage_files.generate
GENERATORS["chat_tokenizer"] = gen_qwen3_tokenizer.generate
GENERATORS["zimage_pipeline"] = gen_zimage_pipeline.generate
GENERATORS["zimage_img2img"] = gen_zimage_img2img.generate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only-tiny", action="store_true")
    ap.add_argument("--components", default=",".join(GENERATORS))
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for c in a.components.split(","):
        GENERATORS[c](a.out, only_tiny=a.only_tiny)


if __name__ == "__main__":
    main()
