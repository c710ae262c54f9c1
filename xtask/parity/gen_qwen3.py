"""Qwen3 text encoder cases: transformers' Qwen3Model `hidden_states[-2]` on
random weights, as diffusers' ZImagePipeline._encode_prompt takes it (the
output of the second-to-last decoder layer, no final norm; the pipeline then
keeps the rows of the real tokens)."""

import copy
import os

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from common import link_tree, randomize_, versions, write_case
from gen_text_encoder import DTYPES, TOLERANCES

# GQA 4/2, head_dim 16 != hidden/heads, Qwen3-4B's rope_theta and tied
# embeddings; a Qwen3ForCausalLM checkpoint (keys with `model.`), sharded.
TINY = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=64, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
    use_sliding_window=False,
)

# Other corners: a bare Qwen3Model checkpoint (no prefix), no GQA, attention
# biases, transformers 5 `rope_parameters`, rms_norm_eps 1e-5, a sliding window
# (3, on layers from max_window_layers = 1 on), padded on the left so that
# padded query rows have every key masked.
TINY_VARIANT = dict(
    vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    max_position_embeddings=32, hidden_act="silu", attention_bias=True,
    use_sliding_window=True, sliding_window=3, max_window_layers=1,
)

# Qwen3-4B's widths (Z-Image-Turbo's text encoder), two layers (one is run),
# a small vocabulary.
REAL = dict(
    vocab_size=1000, hidden_size=2560, intermediate_size=9728, num_hidden_layers=2, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=40960, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
    use_sliding_window=False,
)


def make_model(spec, seed, storage_dtype, causal_lm):
    cfg = Qwen3Config(**spec, attn_implementation="eager")
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg)
    # Qwen3's norms scale by w: randomize_ gives norm weights 1 + N(0, 0.1).
    randomize_(model, seed, storage_dtype)
    return model.eval()


def encoder_of(model):
    return model.model if isinstance(model, Qwen3ForCausalLM) else model


def make_inputs(vocab, lengths, seq_len, seed, side):
    """Token ids padded to `seq_len` with a pad id (the tokenizer's
    `<|endoftext|>` here is the last id) on `side`, as the pipeline's
    `tokenizer(..., padding="max_length")` pads (Qwen2Tokenizer: right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (len(lengths), seq_len), generator=g)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.int64)
    for i, n in enumerate(lengths):
        real = slice(0, n) if side == "right" else slice(seq_len - n, seq_len)
        pad = slice(n, seq_len) if side == "right" else slice(0, seq_len - n)
        mask[i, real] = 1
        ids[i, pad] = vocab - 1
    return {"input_ids": ids, "attention_mask": mask}


def hidden_states_m2(model, inputs, dtype, attn="eager"):
    # A copy: casting back and forth would round the weights of `model` itself.
    enc = copy.deepcopy(encoder_of(model)).to(dtype)
    enc.config._attn_implementation = attn
    with torch.no_grad():
        # The pipeline passes the mask as bool.
        out = enc(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"].bool(),
                  output_hidden_states=True)
    h = out.hidden_states[-2]
    return h if dtype == torch.float64 else h.float()


def real_rows(h, mask):
    """The pipeline's `prompt_embeds[i][prompt_masks[i]]`, concatenated."""
    return torch.cat([h[i][mask[i].bool()] for i in range(h.shape[0])])


def gen_qwen3(out_dir, only_tiny):
    specs = [
        # name, spec, seed, storage dtype, causal-lm checkpoint, lengths, L, padding side, shard
        ("tiny", TINY, 31, torch.bfloat16, True, [12, 7, 3], 12, "right", "20KB"),
        ("tiny_variant", TINY_VARIANT, 32, torch.float16, False, [9, 4], 9, "left", None),
    ]
    if not only_tiny:
        specs.append(("real_dims", REAL, 33, torch.bfloat16, True, [32, 19], 32, "right", "200MB"))
    for name, spec, seed, storage, causal_lm, lengths, L, side, shard in specs:
        model = make_model(spec, seed, storage, causal_lm)
        inputs = make_inputs(spec["vocab_size"], lengths, L, seed + 100, side)
        ref32 = hidden_states_m2(model, inputs, torch.float32)
        first_model_dir = None
        for dtype_name, dtype in DTYPES:
            case_dir = os.path.join(out_dir, "qwen3", f"{name}_{dtype_name}")
            model_dir = os.path.join(case_dir, "model")
            if first_model_dir is None:
                kwargs = {"max_shard_size": shard} if shard else {}
                copy.deepcopy(model).to(storage).save_pretrained(model_dir, **kwargs)
                first_model_dir = model_dir
            else:
                link_tree(first_model_dir, model_dir)
            out = ref32 if dtype == torch.float32 else hidden_states_m2(model, inputs, dtype)
            mask = inputs["attention_mask"]
            # What the pipeline runs by default (SDPA) on the real tokens, for
            # the record: it differs from eager by rounding only.
            sdpa = hidden_states_m2(model, inputs, dtype, attn="sdpa")
            prov = {"generator": "xtask/parity/gen_qwen3.py", "storage": str(storage), "padding_side": side,
                    "sdpa_vs_eager_real_tokens_max_abs":
                        (real_rows(sdpa, mask) - real_rows(out, mask)).abs().max().item(),
                    **versions()}
            tol = dict(TOLERANCES[(name.startswith("real"), dtype_name)])
            if dtype != torch.float32:
                prov["torch_bf16_vs_f32_max_abs"] = (out - ref32).abs().max().item()
            else:
                # The f32 reference is itself off the exact result by summation
                # order; the f32 floor is three times that error (the policy of
                # the Gemma-2 cases, gen_text_encoder.py).
                r64 = hidden_states_m2(model, inputs, torch.float64)
                d = (ref32.double() - r64).abs()
                d = d[torch.isfinite(d)]
                ref_err = d.max().item() if d.numel() else 0.0
                prov["torch_f32_vs_f64_max_abs"] = ref_err
                tol["atol"] = max(tol["atol"], 3 * ref_err)
            write_case(case_dir, "qwen3_text_encoder", "model", inputs, {"hidden_states": out},
                       tol, dtype=dtype_name, provenance=prov)
        print(f"qwen3/{name}: written")


# ---------------------------------------------------------------- GGUF

# Every input width a multiple of 32 (the quantisation block); GQA 4/2,
# head_dim 16 != hidden/heads (so the file must say `key_length`).
TINY_GGUF = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=64, hidden_act="silu", attention_bias=False, use_sliding_window=False,
)

GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(key):
    if key == "embed_tokens.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    _, bid, rest = key.split(".", 2)
    stem, kind = rest.rsplit(".", 1)
    return f"blk.{bid}.{GGUF_LAYER_NAMES[stem]}.{kind}"


def write_gguf(model, spec, path, embd_type, linear_type):
    """As llama.cpp's convert_hf_to_gguf.py writes Qwen3: architecture `qwen3`,
    its metadata, llama.cpp names, norms as they are (Qwen3 multiplies by the
    weight, as llama.cpp does), no q/k permutation (NEOX rotary), 1-D tensors
    in F32, matrices quantised by gguf-py."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf.quants import quantize

    w = GGUFWriter(path, "qwen3")
    w.add_name("lumina2-rs qwen3 parity fixture")
    w.add_context_length(spec["max_position_embeddings"])
    w.add_embedding_length(spec["hidden_size"])
    w.add_block_count(spec["num_hidden_layers"])
    w.add_feed_forward_length(spec["intermediate_size"])
    w.add_head_count(spec["num_attention_heads"])
    w.add_head_count_kv(spec["num_key_value_heads"])
    w.add_key_length(spec["head_dim"])
    w.add_value_length(spec["head_dim"])
    w.add_rope_freq_base(spec["rope_theta"])
    w.add_layer_norm_rms_eps(spec["rms_norm_eps"])
    for key, t in model.state_dict().items():
        data = t.float().numpy()
        name = gguf_name(key)
        if data.ndim == 1:
            w.add_tensor(name, data.astype("float32"))
            continue
        qtype = embd_type if key == "embed_tokens.weight" else linear_type
        q = quantize(data.copy(order="C"), qtype)
        w.add_tensor(name, q, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_reference_model(spec, path):
    """transformers' reading of the file (gguf-py dequantisation, llama.cpp ->
    transformers names) in a Qwen3Model of the spec (transformers does not read
    `qwen3.attention.key_length`, so the config comes from the spec; the other
    dimensions are checked against the file's)."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(path)["config"]
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rope_theta", "rms_norm_eps"):
        got = cfg.get(k, cfg.get("rope_parameters", {}).get(k))
        assert got is None or abs(float(got) - float(spec[k])) <= 1e-6 * abs(float(spec[k])), (k, got, spec[k])
    model = Qwen3Model(Qwen3Config(**spec, attn_implementation="eager")).eval()
    ckpt = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    state = {k.removeprefix("model."): torch.from_numpy(np.asarray(v)).float()
             for k, v in ckpt["tensors"].items()}
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def gen_qwen3_gguf(out_dir, only_tiny):
    from gguf import GGMLQuantizationType as T

    specs = [
        # name, spec, seed, embedding type, linear type, lengths, L
        ("tiny_q4_0", TINY_GGUF, 41, T.Q8_0, T.Q4_0, [12, 7, 3], 12),
        ("tiny_q8_0_f16", TINY_GGUF, 42, T.F16, T.Q8_0, [10, 4], 10),
    ]
    if not only_tiny:
        specs.append(("real_dims_q4_0", REAL, 43, T.Q4_0, T.Q4_0, [32, 19], 32))
    for name, spec, seed, embd_type, linear_type, lengths, L in specs:
        src = make_model(spec, seed, torch.float32, causal_lm=False)
        case_dir = os.path.join(out_dir, "qwen3_gguf", name)
        os.makedirs(case_dir, exist_ok=True)
        path = os.path.join(case_dir, "model.gguf")
        write_gguf(src, spec, path, embd_type, linear_type)
        model = gguf_reference_model(spec, path)
        inputs = make_inputs(spec["vocab_size"], lengths, L, seed + 100, "right")
        out = hidden_states_m2(model, inputs, torch.float32)
        r64 = hidden_states_m2(model, inputs, torch.float64)
        ref_err = (out.double() - r64).abs().max().item()
        prov = {"generator": "xtask/parity/gen_qwen3.py", "embedding": embd_type.name,
                "linears": linear_type.name, "torch_f32_vs_f64_max_abs": ref_err, **versions()}
        # As the Gemma-2 GGUF cases: f32, atol at least three times PyTorch's
        # own f32 error against float64.
        write_case(case_dir, "qwen3_text_encoder", "model.gguf", inputs, {"hidden_states": out},
                   {"atol": max(1e-5, 3 * ref_err), "rtol": 1e-4}, dtype="f32", provenance=prov)
        print(f"qwen3_gguf/{name}: written")


def generate(out_dir, only_tiny=False):
    torch.manual_seed(0)
    gen_qwen3(out_dir, only_tiny)
    gen_qwen3_gguf(out_dir, only_tiny)
