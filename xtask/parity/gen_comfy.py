"""ComfyUI's single-file layouts written from the committed tiny pipeline
(crates/lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline), for the
`cargo test` checks that an all-in-one checkpoint, or the split files, give
the same image as the diffusers folder they were made from.

The layouts follow ComfyUI (comfyanonymous/ComfyUI):
- comfy/sd.py `save_checkpoint`: the diffusion model under
  `model.diffusion_model.`, the text encoders' state dict under
  `text_encoders.`, the VAE under `vae.` (class `Lumina2` of
  comfy/supported_models.py: `vae_key_prefix = ["vae."]`,
  `text_encoder_key_prefix = ["text_encoders."]`);
- comfy/text_encoders/lumina2.py: the Gemma-2 model is `gemma2_2b`
  (`transformer.model.*` in transformers' names, plus the wrapper's
  `logit_scale`); `Gemma2BTokenizer.state_dict` stores the tokenizer as
  `spiece_model`, the bytes of its SentencePiece model (a 1-D uint8 tensor
  once saved, comfy/text_encoders/spiece_tokenizer.py `serialize_model`);
- the split text encoder (split_files/text_encoders/gemma_2_2b_fp16.safetensors)
  is the same Gemma-2 state dict without the `text_encoders.gemma2_2b.transformer.`
  prefix, plus `spiece_model`;
- the VAE (split_files/vae/ae.safetensors, and `vae.*` in the checkpoint) is
  Black Forest Labs' Flux autoencoder naming, which diffusers 0.42.1 maps
  with `convert_ldm_vae_checkpoint` (loaders/single_file_utils.py); here that
  mapping is applied backwards, mid attention weights as [C, C, 1, 1] 1x1
  convolutions as in the original;
- the transformer keys are the original Alpha-VLLM ones
  (`gen_transformer_single.to_original`).

Storage dtypes: the released all-in-one file is bf16 and ae.safetensors f32.
Here the checkpoint and the text encoder keep the folder's f16 (bf16 would
round the weights, and the test compares pixels bit for bit); ae.safetensors
is f32 (an exact widening of the folder's f16).

The tokenizer: the tiny tokenizer's vocabulary written as a SentencePiece
BPE model (pieces in id order, score -id, `<pad> <eos> <bos> <mask>` control,
`<unk>` unknown, `<0xNN>` byte pieces, byte fallback, no dummy prefix, as
Gemma's model), encoded by hand (the protobuf package is not pinned here)
and checked by loading it with sentencepiece.

Parity cases (`generate(out_dir)`, component `vae_bfl` of generate.py): the
Flux VAE at its real dimensions, random weights, saved as a BFL-keyed f32
`ae.safetensors`; the reference is diffusers' own single-file path,
`AutoencoderKL.from_single_file(ae.safetensors, config=<Flux config folder>)`,
decoding a 16x16 latent and encoding a 64x64 image. The cases have no
`model_config`: our side infers the Flux config from the file.

Usage: python gen_comfy.py [--out DIR]   (the committed fixtures)
"""

import argparse
import json
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import versions
from gen_transformer_single import to_original

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
PIPELINE = os.path.join(ROOT, "crates/lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline")
OUT = os.path.join(ROOT, "crates/lumina2-pipeline/tests/fixtures/comfy")


def load(component, stem):
    path = os.path.join(PIPELINE, component, stem + ".safetensors")
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def vae_to_bfl(sd, levels):
    """diffusers AutoencoderKL keys -> BFL keys: convert_ldm_vae_checkpoint backwards."""
    out = {}
    for k, v in sd.items():
        side, rest = k.split(".", 1)
        o = rest
        if rest.startswith("down_blocks."):
            _, i, kind, tail = rest.split(".", 3)
            if kind == "resnets":
                o = f"down.{i}.block.{tail}"
            else:  # downsamplers.0.conv.*
                o = f"down.{i}.downsample.{tail.split('.', 1)[1]}"
        elif rest.startswith("up_blocks."):
            _, i, kind, tail = rest.split(".", 3)
            b = levels - 1 - int(i)
            if kind == "resnets":
                o = f"up.{b}.block.{tail}"
            else:  # upsamplers.0.conv.*
                o = f"up.{b}.upsample.{tail.split('.', 1)[1]}"
        elif rest.startswith("mid_block.resnets."):
            _, _, j, tail = rest.split(".", 3)
            o = f"mid.block_{int(j) + 1}.{tail}"
        elif rest.startswith("mid_block.attentions.0."):
            tail = rest[len("mid_block.attentions.0."):]
            for a, b in [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")]:
                if tail.startswith(a):
                    tail = b + tail[len(a):]
            o = f"mid.attn_1.{tail}"
            if v.ndim == 2:
                v = v[:, :, None, None]  # the original's 1x1 convolutions
        elif rest.startswith("conv_norm_out."):
            o = "norm_out." + rest[len("conv_norm_out."):]
        o = o.replace("conv_shortcut", "nin_shortcut")
        out[f"{side}.{o}"] = v.contiguous()
    return out


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num, wire, payload):
    key = _varint((num << 3) | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def spiece_model(tokenizer_json):
    """The tokenizer.json's vocabulary as a SentencePiece ModelProto (BPE)."""
    tok = json.load(open(tokenizer_json))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    proto = b""
    for piece, i in vocab:
        if piece == "<unk>":
            kind = 2  # UNKNOWN
        elif piece in special:
            kind = 3  # CONTROL
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kind = 6  # BYTE
        else:
            kind = 1  # NORMAL
        sp = (_field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", -float(i)))
              + _field(3, 0, _varint(kind)))
        proto += _field(1, 2, sp)
    ids = tok["model"]["vocab"]
    trainer = (_field(3, 0, _varint(2))  # model_type BPE
               + _field(4, 0, _varint(len(vocab)))
               + _field(35, 0, _varint(1))  # byte_fallback
               + _field(40, 0, _varint(ids["<unk>"]))
               + _field(41, 0, _varint(ids["<bos>"]))
               + _field(42, 0, _varint(ids["<eos>"]))
               + _field(43, 0, _varint(ids["<pad>"])))
    normalizer = (_field(1, 2, b"identity") + _field(3, 0, _varint(0))  # add_dummy_prefix
                  + _field(4, 0, _varint(0)) + _field(5, 0, _varint(1)))  # escape_whitespaces
    proto += _field(2, 2, trainer) + _field(3, 2, normalizer)
    try:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=proto)
        assert sp.get_piece_size() == len(vocab), "sentencepiece read a different vocabulary"
    except ImportError:
        pass
    return proto


def generate(out_dir, only_tiny=False):
    """The BFL VAE parity cases (real dimensions; none when only_tiny)."""
    if only_tiny:
        return
    import tempfile

    from diffusers import AutoencoderKL

    from common import write_case
    from gen_vae import FLUX, make_input, make_model

    model = make_model(FLUX, 14, torch.float32)
    bfl = vae_to_bfl({k: v.detach() for k, v in model.state_dict().items()}, len(FLUX["block_out_channels"]))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_config(tmp)
        ae = os.path.join(tmp, "ae.safetensors")
        save_file({k: v.float().contiguous() for k, v in bfl.items()}, ae)
        ref = AutoencoderKL.from_single_file(ae, config=tmp, torch_dtype=torch.float32).eval()
        for component, shape in [("vae_decode", (1, 16, 16, 16)), ("vae_encode", (1, 3, 64, 64))]:
            inputs = make_input(component, FLUX, shape, 114 + len(component))
            (x,) = inputs.values()
            with torch.no_grad():
                if component == "vae_decode":
                    expected = {"sample": ref.decode(x).sample.float()}
                else:
                    d = ref.encode(x).latent_dist
                    expected = {"mean": d.mean.float(), "logvar": d.logvar.float()}
            case_dir = os.path.join(out_dir, component, "flux_bfl_file_f32")
            os.makedirs(case_dir, exist_ok=True)
            dst = os.path.join(case_dir, "ae.safetensors")
            if not os.path.exists(dst):
                try:
                    os.link(ae, dst)
                except OSError:
                    import shutil
                    shutil.copyfile(ae, dst)
            # The real-dimension f32 tolerance of gen_vae.py (same model, same sizes).
            write_case(case_dir, component, "ae.safetensors", inputs, expected,
                       {"atol": 5e-5, "rtol": 1e-4},
                       provenance={"generator": "xtask/parity/gen_comfy.py",
                                   "reference": "AutoencoderKL.from_single_file (BFL keys)", **versions()})
            print(f"{component}/flux_bfl_file_f32: written")


def write_fixtures(out_dir=OUT):
    os.makedirs(out_dir, exist_ok=True)
    transformer = to_original(load("transformer", "diffusion_pytorch_model"))
    gemma = load("text_encoder", "model")
    vae_cfg = json.load(open(os.path.join(PIPELINE, "vae", "config.json")))
    vae = vae_to_bfl(load("vae", "diffusion_pytorch_model"), len(vae_cfg["block_out_channels"]))
    spiece = torch.frombuffer(bytearray(spiece_model(os.path.join(PIPELINE, "tokenizer", "tokenizer.json"))),
                              dtype=torch.uint8).clone()

    checkpoint = {}
    checkpoint.update({"model.diffusion_model." + k: v for k, v in transformer.items()})
    checkpoint.update({"text_encoders.gemma2_2b.transformer.model." + k: v for k, v in gemma.items()})
    # The CLIP-style wrapper's parameter ComfyUI saves with every text encoder (unused).
    checkpoint["text_encoders.gemma2_2b.logit_scale"] = torch.tensor(4.6055, dtype=torch.float16)
    checkpoint["text_encoders.spiece_model"] = spiece
    checkpoint.update({"vae." + k: v for k, v in vae.items()})
    save_file(checkpoint, os.path.join(out_dir, "lumina_2.safetensors"))

    text_encoder = {"model." + k: v.to(torch.float16) for k, v in gemma.items()}
    text_encoder["spiece_model"] = spiece
    save_file(text_encoder, os.path.join(out_dir, "gemma_2_2b_fp16.safetensors"))

    save_file({k: v.to(torch.float32) for k, v in vae.items()}, os.path.join(out_dir, "ae.safetensors"))

    with open(os.path.join(out_dir, "provenance.json"), "w") as f:
        json.dump({"generator": "xtask/parity/gen_comfy.py",
                   "from": "crates/lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline",
                   **versions()}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT)
    write_fixtures(ap.parse_args().out)
