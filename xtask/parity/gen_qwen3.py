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


def generate(out_dir, only_tiny=False):
    torch.manual_seed(0)
    gen_qwen3(out_dir, only_tiny)
