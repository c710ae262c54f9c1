"""Text encoder cases: transformers' Gemma2Model (hidden_states[-2]) on random
weights, and diffusers' Lumina2Pipeline.encode_prompt on a tiny pipeline folder
(a Gemma-like tokenizer.json built here and a tiny Gemma2Model)."""

import copy
import json
import os

import torch
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Gemma2Model

from common import link_tree, randomize_, versions, write_case

# GQA 4/2, head_dim 16 != hidden/heads, a query_pre_attn_scalar that is no power
# of two, a sliding window (4) smaller than the sequence, strong soft-capping
# (5: the tanh is far from linear), default layer_types (sliding, full, ...).
TINY = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
    attn_logit_softcapping=5.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=64,
)

# Other corners: explicit layer_types, no soft-capping, no GQA, attention biases,
# transformers 5 `rope_parameters`, exact GELU, a Gemma2ForCausalLM checkpoint
# (keys with the `model.` prefix), sharded files.
TINY_VARIANT = dict(
    vocab_size=100, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12, sliding_window=3,
    layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    attn_logit_softcapping=None, attention_bias=True, hidden_activation="gelu",
    rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-5,
    max_position_embeddings=32,
)

# The prompt pipeline's encoder: small (committed), f32 storage, GQA 2/1.
PROMPT_MODEL = dict(
    vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=6,
    attn_logit_softcapping=5.0, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
)

# The real Gemma-2-2B dimensions, three layers (two are run), a small vocabulary.
REAL = dict(
    vocab_size=512, hidden_size=2304, intermediate_size=9216, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=8192,
)

# Tolerances, measured (crate README "Parity"): see TOLERANCES below.
DTYPES = [("f32", torch.float32), ("bf16", torch.bfloat16)]


def make_config(spec):
    return Gemma2Config(**spec, attn_implementation="eager")


def make_model(spec, seed, storage_dtype, causal_lm=False):
    cls = Gemma2ForCausalLM if causal_lm else Gemma2Model
    model = cls(make_config(spec))
    randomize_(model, seed, storage_dtype)
    # Gemma's norms scale by (1 + w): norm weights ~ N(0, 0.1) (randomize_ gives
    # 1 + N(0, 0.1); subtracting 1 is exact in any storage dtype).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(1.0)
    return model.eval()


def encoder_of(model):
    return model.model if isinstance(model, Gemma2ForCausalLM) else model


def make_inputs(vocab, lengths, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), seq_len), generator=g)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0  # the pad token, as the tokenizer pads
    return {"input_ids": ids, "attention_mask": mask}


def hidden_states_m2(model, inputs, dtype):
    # A copy: casting back and forth would round the weights of `model` itself.
    enc = copy.deepcopy(encoder_of(model)).to(dtype)
    with torch.no_grad():
        out = enc(inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    h = out.hidden_states[-2]
    return h if dtype == torch.float64 else h.float()


def f64_error(model, inputs, ref32):
    """Max |error| of the f32 reference against float64 where the float64
    result is finite (in float64 a padded row whose keys are all masked comes
    out NaN, and through 0 * NaN in the value sum so can later rows; the f32
    model gives those rows a uniform softmax instead)."""
    r64 = hidden_states_m2(model, inputs, torch.float64)
    d = (ref32.double() - r64).abs()
    d = d[torch.isfinite(d)]
    return d.max().item() if d.numel() else 0.0


def save_model(model, model_dir, storage, shard=None):
    kwargs = {}
    if shard:
        kwargs["max_shard_size"] = shard
    copy.deepcopy(model).to(storage).save_pretrained(model_dir, **kwargs)


def gen_text_encoder(out_dir, only_tiny):
    specs = [
        # name, spec, seed, storage dtype, causal-lm checkpoint, lengths, L, shard
        ("tiny", TINY, 11, torch.float16, False, [12, 7, 3], 12, None),
        ("tiny_variant", TINY_VARIANT, 12, torch.bfloat16, True, [9, 2], 9, "20KB"),
    ]
    if not only_tiny:
        specs.append(("real_dims", REAL, 13, torch.bfloat16, False, [32, 19], 32, "200MB"))
    for name, spec, seed, storage, causal_lm, lengths, L, shard in specs:
        model = make_model(spec, seed, storage, causal_lm)
        inputs = make_inputs(spec["vocab_size"], lengths, L, seed + 100)
        first_model_dir = None
        ref32 = hidden_states_m2(model, inputs, torch.float32)
        for dtype_name, dtype in DTYPES:
            case_dir = os.path.join(out_dir, "text_encoder", f"{name}_{dtype_name}")
            model_dir = os.path.join(case_dir, "model")
            if first_model_dir is None:
                save_model(model, model_dir, storage, shard)
                first_model_dir = model_dir
            else:
                link_tree(first_model_dir, model_dir)
            out = ref32 if dtype == torch.float32 else hidden_states_m2(model, inputs, dtype)
            prov = {"generator": "xtask/parity/gen_text_encoder.py", "storage": str(storage), **versions()}
            tol = dict(TOLERANCES[(name.startswith("real"), dtype_name)])
            if dtype != torch.float32:
                prov["torch_bf16_vs_f32_max_abs"] = (out - ref32).abs().max().item()
            else:
                # The f32 reference is itself off the exact result by summation
                # order; at the real widths that error (about 1e-5 on values up
                # to 10) exceeds the 1e-5 floor, so the floor is three times it.
                ref_err = f64_error(model, inputs, ref32)
                prov["torch_f32_vs_f64_max_abs"] = ref_err
                tol["atol"] = max(tol["atol"], 3 * ref_err)
            write_case(case_dir, "text_encoder", "model", inputs, {"hidden_states": out},
                       tol, dtype=dtype_name, provenance=prov)
        print(f"text_encoder/{name}: written")


# ---------------------------------------------------------------- prompts

TRAINING_TEXT = """
You are an assistant designed to generate superior images with the superior degree of image-text
alignment based on textual prompts or user prompts. You are an assistant designed to generate
high-quality images based on user prompts. <Prompt Start>
A red cat sits on a blue mat in the morning sun. Two dogs run in the snow near a small wooden house.
A photograph of a mountain lake at sunset, with reflections of the trees on the calm water.
An astronaut riding a horse on the moon, digital art, highly detailed, sharp focus.
blurry, low quality, ugly, distorted, watermark, text, the and of to in a on with at by
"""

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def build_tokenizer(dir_):
    """A Gemma-shaped tokenizer.json: BPE with byte fallback, the `" " -> "▁"`
    normalizer, no pre-tokenizer, `<bos> $A` post-processor, Gemma's decoder,
    ids 0..3 = <pad> <eos> <bos> <unk>, the 256 `<0xNN>` byte tokens in the vocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Training only: words as units, so that merges form word pieces.
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False)
    lines = [" ".join(l.split()) for l in TRAINING_TEXT.strip().splitlines()]
    tok.train_from_iterator([" " + l for l in lines], trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    nxt = max(vocab.values()) + 1
    for b in range(256):
        name = f"<0x{b:02X}>"
        if name not in vocab:
            vocab[name] = nxt
            nxt += 1
    j["pre_tokenizer"] = None
    j["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [vocab["<bos>"]], "tokens": ["<bos>"]}},
    }
    j["decoder"] = json.loads(decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]).__getstate__())
    tok = Tokenizer.from_str(json.dumps(j))
    assert [tok.token_to_id(t) for t in SPECIAL[:4]] == [0, 1, 2, 3]
    os.makedirs(dir_, exist_ok=True)
    tok.save(os.path.join(dir_, "tokenizer.json"))
    with open(os.path.join(dir_, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "mask_token": "<mask>", "padding_side": "right", "model_max_length": 8192}, f, indent=2)
        f.write("\n")
    return tok.get_vocab_size()


def reference_encode(pipe_dir, model, args, dtype):
    from diffusers import Lumina2Pipeline

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(pipe_dir, "tokenizer"))
    pipe = Lumina2Pipeline(transformer=None, scheduler=None, vae=None,
                           text_encoder=copy.deepcopy(model).to(dtype), tokenizer=tokenizer)
    neg = args["negative_prompt"]
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(
            prompt=args["prompt"], do_classifier_free_guidance=args["do_classifier_free_guidance"],
            negative_prompt=neg, num_images_per_prompt=args["num_images_per_prompt"], device="cpu",
            system_prompt=args["system_prompt"], max_sequence_length=args["max_sequence_length"])
    out = {"prompt_embeds": pe.float(), "prompt_attention_mask": pm}
    if args["do_classifier_free_guidance"]:
        out["negative_prompt_embeds"] = ne.float()
        out["negative_prompt_attention_mask"] = nm
    return out, type(tokenizer).__name__


def gen_prompt_encoding(out_dir, only_tiny):
    base = os.path.join(out_dir, "prompt_encoding")
    os.makedirs(base, exist_ok=True)
    shared = os.path.join(base, ".pipeline_src")
    vocab = build_tokenizer(os.path.join(shared, "tokenizer"))
    spec = dict(PROMPT_MODEL, vocab_size=max(vocab, PROMPT_MODEL["vocab_size"]))
    model = make_model(spec, 21, torch.float32)
    save_model(model, os.path.join(shared, "text_encoder"), torch.float32)
    cases = [
        # name, args
        ("two_prompts", dict(prompt=["A red cat sits on a blue mat.", "Two dogs run in the snow ☃ near a café"],
                             negative_prompt=None, system_prompt=None, max_sequence_length=64,
                             do_classifier_free_guidance=True, num_images_per_prompt=1)),
        ("truncated", dict(prompt=["An astronaut riding a horse on the moon, digital art, highly detailed, sharp focus"],
                           negative_prompt=["blurry, low quality"], system_prompt=None, max_sequence_length=34,
                           do_classifier_free_guidance=True, num_images_per_prompt=1)),
        ("repeat_custom_system", dict(prompt=["a mountain lake at sunset"], negative_prompt=["ugly, watermark"],
                                      system_prompt="You are an assistant designed to generate high-quality images based on user prompts.",
                                      max_sequence_length=32, do_classifier_free_guidance=True,
                                      num_images_per_prompt=2)),
        ("no_guidance", dict(prompt=["the calm water", "a small wooden house with trees"], negative_prompt=None,
                             system_prompt="", max_sequence_length=16, do_classifier_free_guidance=False,
                             num_images_per_prompt=1)),
    ]
    for name, args in cases:
        ref32 = None
        for dtype_name, dtype in DTYPES:
            if dtype_name == "bf16" and name not in ("two_prompts", "truncated"):
                continue
            case_dir = os.path.join(base, f"{name}_{dtype_name}")
            for sub in ("tokenizer", "text_encoder"):
                link_tree(os.path.join(shared, sub), os.path.join(case_dir, "pipeline", sub))
            expected, tok_class = reference_encode(os.path.join(case_dir, "pipeline"), model, args, dtype)
            prov = {"generator": "xtask/parity/gen_text_encoder.py", "tokenizer_class": tok_class, **versions()}
            if dtype == torch.float32:
                ref32 = expected
            else:
                prov["torch_bf16_vs_f32_max_abs"] = max(
                    (expected[k] - ref32[k]).abs().max().item() for k in expected if k.endswith("embeds"))
            write_case(case_dir, "prompt_encoding", "pipeline", None, expected,
                       TOLERANCES[(False, dtype_name)], dtype=dtype_name, args=args, provenance=prov)
        print(f"prompt_encoding/{name}: written")
    import shutil
    shutil.rmtree(shared)


def generate(out_dir, only_tiny=False):
    torch.manual_seed(0)
    gen_text_encoder(out_dir, only_tiny)
    gen_prompt_encoding(out_dir, only_tiny)


# Tolerances, measured (crate README "Parity"). f32 differs from PyTorch only by
# summation order (max |error| 1.5e-5 on values up to 10). PyTorch's own f32
# result is off the float64 one by as much (9.5e-6 on the real-width case; 7.6e-6
# between its 1- and 2-thread runs), so each f32 case's atol is at least three
# times that measured error (the tiny cases keep 1e-5). In bf16 the reference
# is only as good as bf16: on the tiny cases PyTorch bf16 deviates from its own
# f32 result by up to 0.19 (mean 0.01-0.025) on values up to 10, ours by as much
# (up to 0.19, mean 0.01-0.025), and the two bf16 results differ by up to 0.19
# (mean <= 0.022): independent rounding. The bf16 tolerance is the one under
# which PyTorch's own bf16 result passes against its f32 result.
TOLERANCES = {
    (False, "f32"): {"atol": 1e-5, "rtol": 1e-4},
    (True, "f32"): {"atol": 1e-5, "rtol": 1e-4},
    (False, "bf16"): {"atol": 0.2, "rtol": 0.05},
    (True, "bf16"): {"atol": 0.2, "rtol": 0.05},
}
