"""Gemma-2 text encoders as llama.cpp GGUF files (component `text_encoder`,
`model` = the .gguf file).

The file is written as llama.cpp's `convert_hf_to_gguf.py` writes Gemma-2:
architecture `gemma2`, its `gemma2.*` metadata, llama.cpp tensor names, norm
weights stored as `weight + 1` (llama.cpp's RMS norm multiplies by the stored
weight, Gemma's by `1 + weight`), 1-D tensors in F32, matrices quantised by
gguf-py's `gguf.quants.quantize`.

The reference is transformers: the file is read back by transformers' own GGUF
loader (`load_gguf_checkpoint`: gguf-py dequantisation, llama.cpp -> transformers
names, the `- 1` on norms), the tensors are loaded into a `Gemma2Model` with the
config the file describes, and `hidden_states[-2]` is taken, as for the
safetensors cases. `query_pre_attn_scalar` is not stored in GGUF: llama.cpp uses
the head width (Gemma-2-2B: 256), so the models here are built with that.
"""

import copy
import os

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize
from transformers import Gemma2Config, Gemma2Model
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from common import versions, write_case
from gen_text_encoder import REAL, f64_error, hidden_states_m2, make_inputs, make_model

# Every matrix dimension that is an input width is a multiple of 32 (the
# quantisation block); GQA 4/2; a sliding window shorter than the inputs.
TINY = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
    attn_logit_softcapping=5.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=64,
)

# REAL: gen_text_encoder's (Gemma-2-2B widths, three layers, a small vocabulary).

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def llama_cpp_name(key):
    if key == "embed_tokens.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    _, bid, rest = key.split(".", 2)
    stem = rest[: -len(".weight")]
    return f"blk.{bid}.{LAYER_NAMES[stem]}.weight"


def write_gguf(model, spec, path, embd_type, linear_type):
    w = GGUFWriter(path, "gemma2")
    w.add_name("lumina2-rs gemma2 parity fixture")
    w.add_context_length(spec["max_position_embeddings"])
    w.add_embedding_length(spec["hidden_size"])
    w.add_block_count(spec["num_hidden_layers"])
    w.add_feed_forward_length(spec["intermediate_size"])
    w.add_head_count(spec["num_attention_heads"])
    w.add_head_count_kv(spec["num_key_value_heads"])
    w.add_layer_norm_rms_eps(spec["rms_norm_eps"])
    w.add_key_length(spec["head_dim"])
    w.add_value_length(spec["head_dim"])
    w.add_attn_logit_softcapping(spec["attn_logit_softcapping"])
    w.add_final_logit_softcapping(spec["final_logit_softcapping"])
    w.add_sliding_window(spec["sliding_window"])
    for key, t in model.state_dict().items():
        data = t.float().numpy()
        name = llama_cpp_name(key)
        if key.endswith("norm.weight"):
            # convert_hf_to_gguf.py (Gemma2Model.modify_tensors): `data + 1`.
            w.add_tensor(name, (data + np.float32(1.0)).astype(np.float32))
            continue
        qtype = embd_type if key == "embed_tokens.weight" else linear_type
        q = quantize(np.ascontiguousarray(data), qtype)
        w.add_tensor(name, q, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_model(spec, path):
    """transformers' reading of the file, in a model with the file's config."""
    cfg = load_gguf_checkpoint(path)["config"]
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "sliding_window"):
        assert cfg[k] == spec[k], (k, cfg[k], spec[k])
    model = Gemma2Model(Gemma2Config(**spec, attn_implementation="eager")).eval()
    ckpt = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    state = {k.removeprefix("model."): torch.from_numpy(np.asarray(v)).float()
             for k, v in ckpt["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def generate(out_dir, only_tiny=False):
    specs = [
        # name, spec, seed, embedding type, linear type, lengths, L
        ("tiny_q4_0", TINY, 21, T.Q8_0, T.Q4_0, [12, 7, 3], 12),
        ("tiny_q8_0_f16", TINY, 22, T.F16, T.Q8_0, [10, 4], 10),
    ]
    if not only_tiny:
        specs.append(("real_dims_q4_0", REAL, 23, T.Q4_0, T.Q4_0, [32, 19], 32))
    for name, spec, seed, embd_type, linear_type, lengths, L in specs:
        src = make_model(spec, seed, torch.float32)
        case_dir = os.path.join(out_dir, "text_encoder_gguf", name)
        os.makedirs(case_dir, exist_ok=True)
        path = os.path.join(case_dir, "model.gguf")
        write_gguf(src, spec, path, embd_type, linear_type)
        model = reference_model(spec, path)
        inputs = make_inputs(spec["vocab_size"], lengths, L, seed + 100)
        out = hidden_states_m2(copy.deepcopy(model), inputs, torch.float32)
        # As in gen_text_encoder: atol at least three times PyTorch's own f32
        # error against float64.
        ref_err = f64_error(model, inputs, out)
        prov = {"generator": "xtask/parity/gen_text_encoder_gguf.py", "embedding": embd_type.name,
                "linears": linear_type.name, "torch_f32_vs_f64_max_abs": ref_err, **versions()}
        write_case(case_dir, "text_encoder", "model.gguf", inputs, {"hidden_states": out},
                   {"atol": max(1e-5, 3 * ref_err), "rtol": 1e-4}, dtype="f32", provenance=prov)
        print(f"text_encoder_gguf/{name}: written")


def convert_folder(model_dir, out_path, qtype):
    """A transformers Gemma-2 folder -> a llama.cpp-style GGUF (matrices in
    `qtype`). Used for the pipeline crate's CLI fixture:

        python xtask/parity/gen_text_encoder_gguf.py \\
            crates/lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline/text_encoder \\
            crates/lumina2-pipeline/tests/fixtures/text_encoder.gguf F16
    """
    model = Gemma2Model.from_pretrained(model_dir, dtype=torch.float32)
    c = model.config
    spec = dict(max_position_embeddings=c.max_position_embeddings, hidden_size=c.hidden_size,
                num_hidden_layers=c.num_hidden_layers, intermediate_size=c.intermediate_size,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                rms_norm_eps=c.rms_norm_eps, head_dim=c.head_dim,
                attn_logit_softcapping=c.attn_logit_softcapping,
                final_logit_softcapping=c.final_logit_softcapping, sliding_window=c.sliding_window)
    assert c.query_pre_attn_scalar == c.head_dim, "GGUF cannot say query_pre_attn_scalar"
    write_gguf(model, spec, out_path, getattr(T, qtype), getattr(T, qtype))


if __name__ == "__main__":
    import sys

    convert_folder(sys.argv[1], sys.argv[2], sys.argv[3])
