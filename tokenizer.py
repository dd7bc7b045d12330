"""The tokenizer of a Hugging Face model folder, run by tiktoken (or sentencepiece), and its chat template.

    tok = load_tokenizer("path/to/model")   # model.load_tokenizer also takes hub ids and the built-in name
    ids = tok.encode("Hello", bos=True); text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Why tiktoken: it is the fastest BPE encoder in Python and is exact for byte-level BPE, which covers Llama 3,
Qwen, Granite, Nemotron-H, SmolLM2 and Mistral's Tekken; the ranks are derived from a tokenizer.json's merges
(its ids need not follow merge order). SentencePiece models (Mistral-7B-v0.1, Llama 2) go to the
`sentencepiece` library: tiktoken cannot express SentencePiece BPE exactly.

A leaf: this file imports nothing of the project, so it can be copied alone.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import unicodedata

import tiktoken


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------
# Tokenizer: what a Hugging Face model folder holds, run by tiktoken (or sentencepiece).
#
#   load_tokenizer(folder) -> Tokenizer   .encode(text, bos=False) / .decode(ids) / .bos_id /
#                                         .eos_id / .eos_ids / .vocab_size / .backend
#
# Which file is used, first match wins:
#   1. tokenizer.model holding a sentencepiece protobuf (Mistral-7B-v0.1, Llama 2) -> the
#      `sentencepiece` library: tiktoken cannot express SentencePiece BPE (it starts from characters
#      and falls back to bytes), and HF's conversion to tokenizer.json is not exact for Mistral v1.
#   2. tekken.json (Mistral Tekken) -> tiktoken; ids 0..num_special-1 are the special tokens.
#   3. tokenizer.json with a byte-level BPE model (Llama 3, Qwen2/3, Granite, Nemotron-H, SmolLM2)
#      -> tiktoken, with ranks derived from the merges and mapped to the file's ids.
#   4. tokenizer.model in tiktoken's text format (Llama 3 `original/tokenizer.model`) -> tiktoken.
# Special tokens written in the text (e.g. "<|im_start|>") become their one id, as HF does by default.
# ----------------------------------------------------------------------------------------------




# GPT-2's pre-tokenizer regex (HF `ByteLevel` with `use_regex: true`).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's pre-tokenizer regex (tiktoken-format tokenizer.model carries no pattern).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.1's 256 special tokens, ids len(ranks) + i (Meta's llama-models naming; the Llama 3.2
# vision code in llama-models 0.3 puts "<|image|>" at index 11 and shifts the reserved names by one).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - 9)]
# Tekken files of versions v1..v7 carry no "special_tokens" list: these are ranks 0..19, the rest
# up to num_special_tokens are "<SPECIAL_{rank}>" fillers (as mistral_common fills them).
TEKKEN_DEFAULT_SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map used to spell byte-level BPE tokens as strings:
    printable Latin-1 bytes stand for themselves, the other 68 bytes map to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


class Tokenizer:
    """encode(text, bos=False) -> ids, decode(ids) -> text. Built by `load_tokenizer`."""

    def __init__(self, *, backend, source, vocab_size, special_tokens, id_bytes=None, encoding=None,
                 to_id=None, normalize_nfc=False, holes=None, pattern=None, unk_id=None,
                 fuse_unk=False, sp=None):
        self.backend = backend                # "tiktoken" or "sentencepiece"
        self.source = source                  # the file it was built from
        self.vocab_size = vocab_size          # number of ids = max id + 1
        self.special_tokens = special_tokens  # text -> id of every special/added token
        self.bos_id = self.eos_id = None      # set by load_tokenizer
        self.eos_ids = []
        self.chat_template = None             # tokenizer_config.json's Jinja chat template, if any
        self._id_bytes = id_bytes             # id -> bytes (tiktoken backend), None = no token
        self._enc = encoding                  # tiktoken.Encoding, works in "internal" ids
        self._to_id = to_id                   # internal id -> file id (None: identical)
        self._nfc = normalize_nfc             # tokenizer.json normalizer NFC
        self._holes = holes or set()          # internal ids of bytes the vocab lacks
        self._pattern = pattern               # the pre-tokenizer regex (for the holes path)
        self._unk_id, self._fuse_unk = unk_id, fuse_unk
        self._sp = sp                         # sentencepiece.SentencePieceProcessor
        self._bytes_to_id = None
        if sp is not None:  # text of the special ids; split text on them (longest first)
            self._sp_special_ids = set(special_tokens.values())
            self._sp_id_text = {i: t for t, i in special_tokens.items()}
            alts = sorted(special_tokens, key=len, reverse=True)
            self._sp_split = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None

    def encode(self, text: str, bos: bool = False) -> list:
        if bos and self.bos_id is None:
            raise ValueError(f"{self.source}: this tokenizer has no BOS token, so encode(bos=True) "
                             "cannot add one")
        head = [self.bos_id] if bos else []
        if self._sp is not None:
            ids = []
            for i, part in enumerate(self._sp_split.split(text) if self._sp_split else [text]):
                if i % 2:  # a special token's text
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self._sp.encode(part))
            return head + ids
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        ids = self._enc.encode(text, allowed_special="all")
        if self._holes and not self._holes.isdisjoint(ids):
            return head + self._encode_with_holes(text)
        if self._to_id is not None:
            ids = list(map(self._to_id.__getitem__, ids))
        return head + ids

    def _encode_with_holes(self, text):
        # The text holds a byte that the byte-level vocab has no token for. HF's BPE drops such a
        # byte (or writes unk_token) before merging, so the bytes around it may still merge within
        # their pre-token; tiktoken cannot do that, so redo those pre-tokens one by one here.
        import regex  # tiktoken's own dependency; only this rare path needs it
        ids = []
        specials = sorted(self.special_tokens, key=len, reverse=True)
        split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        for i, part in enumerate(split.split(text) if split else [text]):
            if i % 2:
                ids.append(self.special_tokens[part])
                continue
            for piece in regex.findall(self._pattern, part):
                runs, cur = [], bytearray()  # the piece cut at its hole bytes (rank == byte here)
                for b in piece.encode("utf-8"):
                    if b in self._holes:
                        runs.append(bytes(cur))
                        cur = bytearray()
                        if self._unk_id is not None:
                            runs.append(None)
                    else:
                        cur.append(b)
                runs.append(bytes(cur))
                if self._unk_id is None:  # dropped bytes: the rest merges as one piece
                    runs = [b"".join(runs)]
                piece_ids = []
                for run in runs:
                    if run is None:  # one unk per missing byte, fused within the piece
                        if not (self._fuse_unk and piece_ids and piece_ids[-1] == self._unk_id):
                            piece_ids.append(self._unk_id)
                    elif run:
                        piece_ids.extend(map(self._to_id.__getitem__, self._enc._encode_single_piece(run)))
                ids.extend(piece_ids)
        return ids

    def decode(self, ids) -> str:
        if self._sp is not None:  # runs of ordinary ids through sentencepiece, specials as text
            out, run = [], []
            for i in ids:
                i = int(i)
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"{self.source}: id {i} is outside the vocabulary "
                                     f"(0..{self.vocab_size - 1})")
                if i in self._sp_special_ids:
                    out.append(self._sp.decode(run))
                    out.append(self._sp_id_text[i])
                    run = []
                else:
                    run.append(i)
            out.append(self._sp.decode(run))
            return "".join(out)
        table = self._id_bytes
        try:
            chunks = [table[i] for i in ids]
            if None in chunks or (chunks and min(ids) < 0):
                raise IndexError
        except IndexError:
            bad = next(i for i in ids if not (0 <= i < len(table)) or table[i] is None)
            raise ValueError(f"{self.source}: id {bad} is not a token of this tokenizer") from None
        return b"".join(chunks).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        """Render [{"role": ..., "content": ...}, ...] with the folder's Jinja chat template (as
        transformers does); without a template, the paper's plain "User:" / "Assistant:" format."""
        if self.chat_template is None:
            turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            return "\n".join(turns + (["Assistant:"] if add_generation_prompt else []))
        import jinja2.sandbox
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise ValueError(f"{self.source}: chat template: {message}")

        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               raise_exception=raise_exception,
                               bos_token=self._token_text(self.bos_id),
                               eos_token=self._token_text(self.eos_id))

    def _token_text(self, i) -> str:
        return "" if i is None else self.decode([i])

    def token_to_id(self, token: str):
        """The id of one token given by its text (a special token, a sentencepiece piece, or the
        bytes of one vocabulary entry), None if there is none."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if self._sp is not None:
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        if self._bytes_to_id is None:
            self._bytes_to_id = {b: i for i, b in enumerate(self._id_bytes) if b is not None}
        return self._bytes_to_id.get(token.encode("utf-8"))


def _json_field(d, path, field, kind, default=KeyError):
    """d[a][b]... for field "a.b", checked against `kind`; errors name the file and the field."""
    value = d
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            if default is not KeyError:
                return default
            raise ValueError(f"{path}: field '{field}' is missing")
        value = value[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{path}: field '{field}' should be {getattr(kind, '__name__', kind)}, "
                         f"got {type(value).__name__}")
    return value


def _tiktoken_tokenizer(path, pattern, ranks, specials, to_id, id_bytes, vocab_size, **kw):
    """specials: text -> file id. tiktoken gets them as ids after every rank; `to_id` maps back."""
    first = max(max(ranks.values()) + 1, len(to_id or ()))
    internal = {t: first + k for k, t in enumerate(specials)}
    if to_id is not None:
        to_id = list(to_id) + [-1] * (first - len(to_id)) + list(specials.values())
    elif any(internal[t] != i for t, i in specials.items()):
        raise AssertionError("identity id mapping with special ids out of order")
    # tiktoken matches special tokens leftmost-first, HF leftmost-longest: the same unless one is
    # a prefix of another (then it is a prefix of the next one in sorted order).
    names = sorted(specials)
    for t, u in zip(names, names[1:]):
        if u.startswith(t):
            raise ValueError(f"{path}: special token {t!r} is a prefix of {u!r}, which is not "
                             "supported")
    try:
        enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=internal)
    except Exception as e:  # e.g. a pattern tiktoken's regex engine rejects
        raise ValueError(f"{path}: tiktoken cannot use this tokenizer ({e})") from None
    return Tokenizer(backend="tiktoken", source=path, vocab_size=vocab_size,
                     special_tokens=dict(specials), id_bytes=id_bytes, encoding=enc, to_id=to_id,
                     pattern=pattern, **kw)


def _load_sentencepiece(path):
    try:
        import sentencepiece
    except ImportError:
        raise ImportError(f"{path} is a SentencePiece model; reading it needs the sentencepiece "
                          "library: pip install sentencepiece") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(path)
    except Exception as e:
        raise ValueError(f"{path}: sentencepiece cannot read it ({e})") from None
    n = sp.get_piece_size()
    # <unk>, <s>, </s> and other control pieces: HF matches them in text as special tokens.
    specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    tok = Tokenizer(backend="sentencepiece", source=path, vocab_size=n, special_tokens=specials,
                    sp=sp)
    defaults = (sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id() if sp.eos_id() >= 0 else None)
    return tok, defaults


def _load_tekken(path):
    d = _read_json(path)
    vocab = _json_field(d, path, "vocab", list)
    pattern = _json_field(d, path, "config.pattern", str)
    vocab_size = _json_field(d, path, "config.default_vocab_size", int)
    num_special = _json_field(d, path, "config.default_num_special_tokens", int)
    inner = vocab_size - num_special
    if not 256 <= inner <= len(vocab):
        raise ValueError(f"{path}: config.default_vocab_size {vocab_size} minus "
                         f"default_num_special_tokens {num_special} should be between 256 and the "
                         f"{len(vocab)} entries of 'vocab'")
    ranks = {}
    for r, entry in enumerate(vocab[:inner]):
        if not isinstance(entry, dict) or entry.get("rank") != r or "token_bytes" not in entry:
            raise ValueError(f"{path}: vocab[{r}] should be {{'rank': {r}, 'token_bytes': ...}}")
        try:
            b = binascii.a2b_base64(entry["token_bytes"])
        except (TypeError, binascii.Error):
            raise ValueError(f"{path}: vocab[{r}] token_bytes is not base64") from None
        if (r < 256 and b != bytes([r])) or b in ranks:
            raise ValueError(f"{path}: vocab[{r}] token_bytes {b!r} is a duplicate or out of order")
        ranks[b] = r
    listed = d.get("special_tokens")
    if listed is None:
        version = _json_field(d, path, "config.version", str, None)
        if version not in ("v1", "v2", "v3", "v7"):
            raise ValueError(f"{path}: field 'special_tokens' is missing (only tekken versions up "
                             f"to v7 may omit it; config.version is {version!r})")
        listed = [{"rank": i, "token_str": t} for i, t in enumerate(TEKKEN_DEFAULT_SPECIAL_TOKENS)]
    names = {}
    for k, entry in enumerate(listed):
        if not (isinstance(entry, dict) and isinstance(entry.get("rank"), int)
                and isinstance(entry.get("token_str"), str)):
            raise ValueError(f"{path}: special_tokens[{k}] should have an int 'rank' and a "
                             "str 'token_str'")
        if not 0 <= entry["rank"] < num_special or entry["rank"] in names:
            raise ValueError(f"{path}: special_tokens[{k}] rank {entry['rank']} is a duplicate or "
                             f"not below default_num_special_tokens {num_special}")
        names[entry["rank"]] = entry["token_str"]
    specials = {names.get(i, f"<SPECIAL_{i}>"): i for i in range(num_special)}
    if len(specials) != num_special:
        raise ValueError(f"{path}: special_tokens has duplicate token_str values")
    id_bytes = [t.encode("utf-8") for t in specials] + sorted(ranks, key=ranks.get)
    to_id = list(range(num_special, vocab_size))
    tok = _tiktoken_tokenizer(path, pattern, ranks, specials, to_id, id_bytes, vocab_size)
    return tok, (specials.get("<s>"), specials.get("</s>"))


def _load_tiktoken_file(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}: line {n} should be '<base64 token> <rank>' (tiktoken "
                                 "format)") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks
                                                               for b in range(256)):
        raise ValueError(f"{path}: ranks should be 0..{len(ranks) - 1}, once each, and include "
                         "all 256 single bytes")
    n = len(ranks)
    specials = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    id_bytes = sorted(ranks, key=ranks.get) + [t.encode("utf-8") for t in specials]
    tok = _tiktoken_tokenizer(path, LLAMA3_PATTERN, ranks, specials, None, id_bytes, n + len(specials))
    return tok, (specials["<|begin_of_text|>"], specials["<|end_of_text|>"])


def _pre_tokenizer_pattern(path, pre):
    """The one regex that splits text as the tokenizer.json pre_tokenizer does."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ValueError(f"{path}: field 'pre_tokenizer' should be a pre-tokenizer object")
    types = [s.get("type") for s in steps]
    for t in types:
        if t not in ("Split", "ByteLevel", "Digits"):
            raise ValueError(f"{path}: pre_tokenizer type {t!r} is not supported (byte-level BPE "
                             "with Split / Digits / ByteLevel only)")
    byte_level = steps[-1]
    if types[-1] != "ByteLevel" or types.count("ByteLevel") != 1:
        raise ValueError(f"{path}: pre_tokenizer should end with one ByteLevel step, got {types}")
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{path}: pre_tokenizer ByteLevel add_prefix_space true is not supported")
    use_regex = byte_level.get("use_regex", True)
    if types == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if types == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        pattern = split.get("pattern")
        if not (isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str)):
            raise ValueError(f"{path}: pre_tokenizer Split pattern should be {{'Regex': ...}}")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"{path}: pre_tokenizer Split behavior {split.get('behavior')!r} / "
                             f"invert {split.get('invert')!r} is not supported (Isolated only)")
        p = pattern["Regex"]
        # HF keeps the text between two matches as a piece too; tiktoken would drop it, so a
        # last alternative matches such a gap (it never fires for patterns that cover all text).
        return f"(?:{p})|(?:(?!(?:{p}))[\\s\\S])+"
    if types == ["Digits", "ByteLevel"] and use_regex:
        # Digits first, then GPT-2's regex inside each non-digit run, folded into one regex: a
        # digit (or run of digits) is its own piece, so " ?\p{N}+" loses its space, and the
        # whitespace lookahead "(?!\S)" also succeeds before a digit (the end of the run).
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|""" + digits +
                r"""| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""")
    raise ValueError(f"{path}: pre_tokenizer {types} with ByteLevel use_regex {use_regex} is not "
                     "supported")


def _unreachable(ranks):
    """The tokens that byte-pair merging (lowest rank first) does not build from their own bytes."""
    in_merged = set().union(*(t for t in ranks if len(t) > 1))
    free = [b for b in range(256) if b not in in_merged]
    if free:  # BPE(t + a free byte) = BPE(t) + [that byte]: tiktoken without its whole-piece shortcut
        enc = tiktoken.Encoding(name="reachability", pat_str=r"[\s\S]+", mergeable_ranks=ranks,
                                special_tokens={})
        end = bytes(free[:1])
        return [t for t, r in ranks.items()
                if len(t) > 1 and enc._encode_single_piece(t + end)[:-1] != [r]]
    unreachable = []  # every byte is part of some token: merge in Python (slow, and rare)
    for t, r in ranks.items():
        parts = [t[i:i + 1] for i in range(len(t))]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], 1 << 62), i)
                          for i in range(len(parts) - 1))
            if rank == 1 << 62:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(t) > 1 and parts != [t]:
            unreachable.append(t)
    return unreachable


def _load_hf_bpe(path):
    d = _read_json(path)
    model = _json_field(d, path, "model", dict)
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported (BPE only)")
    for field, ok in (("byte_fallback", (False, None)), ("dropout", (None, 0, 0.0)),
                      ("continuing_subword_prefix", ("", None)), ("end_of_word_suffix", ("", None))):
        if model.get(field) not in ok:
            raise ValueError(f"{path}: model.{field} {model.get(field)!r} is not supported")
    kind = lambda part: part.get("type") if isinstance(part, dict) else part  # noqa: E731
    normalizer = d.get("normalizer")
    if normalizer is not None and kind(normalizer) != "NFC":
        raise ValueError(f"{path}: normalizer type {kind(normalizer)!r} is not supported "
                         "(none or NFC)")
    if d.get("pre_tokenizer") is None:
        raise ValueError(f"{path}: field 'pre_tokenizer' is missing (byte-level BPE needs one)")
    pattern = _pre_tokenizer_pattern(path, d["pre_tokenizer"])
    if d.get("decoder") is not None and kind(d["decoder"]) != "ByteLevel":
        raise ValueError(f"{path}: decoder type {kind(d['decoder'])!r} is not supported "
                         "(ByteLevel)")
    # (post_processor is ignored: encode(bos=...) decides about BOS, as for every backend)
    vocab = _json_field(d, path, "model.vocab", dict)
    merges = _json_field(d, path, "model.merges", list)
    added = _json_field(d, path, "added_tokens", list, [])

    specials = {}
    for k, a in enumerate(added):
        if not (isinstance(a, dict) and isinstance(a.get("id"), int) and a["id"] >= 0
                and isinstance(a.get("content"), str) and a["content"]):
            raise ValueError(f"{path}: added_tokens[{k}] should have an int 'id' and a 'content'")
        for flag in ("lstrip", "rstrip", "single_word"):
            if a.get(flag):
                raise ValueError(f"{path}: added_tokens[{k}] {a['content']!r} sets {flag}, which "
                                 "is not supported")
        specials[a["content"]] = a["id"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise ValueError(f"{path}: model.vocab values should be ids >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{path}: model.vocab gives one id to two tokens")

    # A byte-level token string -> its bytes: each character stands for one byte (bytes_to_unicode);
    # any other character (kept as itself, or 0..255 sent to U+FFFF) fails the latin-1 encode.
    spell = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}
    table = {**{c: "\uffff" for c in range(256)}, **spell}
    token_bytes = {}
    for t in vocab:
        try:
            token_bytes[t] = t.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            if t not in specials:
                raise ValueError(f"{path}: model.vocab token {t!r} is not written in the byte-level "
                                 "alphabet and is not an added token") from None
    size = 1 + max([*vocab.values(), *specials.values()], default=-1)
    id_bytes = [None] * size  # id -> bytes, for decode
    for t, b in token_bytes.items():
        id_bytes[vocab[t]] = b
    for t, i in specials.items():
        id_bytes[i] = t.encode("utf-8")

    # tiktoken ranks are merge priorities: single bytes 0..255, then each merge's result in merge
    # order (the first merge giving a string wins); to_id maps each rank to the file's id.
    # tiktoken merges any two neighbours whose bytes join into a token, HF only the listed pairs:
    # the same for merges made from tiktoken ranks (every split listed: Llama 3, Qwen2) and for
    # merges learnt by BPE training (SmolLM2: checked on megabytes of text in the tests' reference).
    byte_token = bytes_to_unicode()
    ranks = {bytes([b]): b for b in range(256)}
    to_id = [vocab.get(byte_token[b], -1) for b in range(256)]
    holes = {b for b in range(256) if to_id[b] < 0}  # bytes the vocab has no token for
    for k, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else m
        try:
            a, b = parts
            merged = a + b
            result = token_bytes[merged]
            if a not in vocab or b not in vocab:
                raise KeyError
        except (ValueError, TypeError):
            raise ValueError(f"{path}: model.merges[{k}] should be 'a b' or ['a', 'b'], "
                             f"got {m!r}") from None
        except KeyError:
            raise ValueError(f"{path}: model.merges[{k}] {m!r}: a part or the result is not a "
                             "byte-level token of model.vocab") from None
        if result not in ranks:
            ranks[result] = len(to_id)
            to_id.append(vocab[merged])
    if not model.get("ignore_merges"):
        # tiktoken takes any pre-token found in its ranks as one token; HF does that only with
        # ignore_merges. Without it, a token that BPE never builds from its own bytes (Llama 3's
        # vocab has 588) must not be in the ranks: no merge sequence ever reaches it anyway.
        for t in _unreachable(ranks):
            del ranks[t]
    else:
        # HF takes a whole pre-token found in the vocab as one token, which tiktoken does for
        # everything in its ranks; a vocab entry no merge produces would be missed.
        missing = [t for t, b in token_bytes.items() if t not in specials and b not in ranks]
        if missing:
            raise ValueError(f"{path}: model.ignore_merges is true but no merge produces "
                             f"model.vocab token {missing[0]!r} ({len(missing)} such tokens); "
                             "not supported")
    unk = model.get("unk_token")
    unk_id = vocab.get(unk, specials.get(unk)) if unk is not None else None
    tok = _tiktoken_tokenizer(path, pattern, ranks, specials, to_id, id_bytes, size,
                              normalize_nfc=normalizer is not None, holes=holes, unk_id=unk_id,
                              fuse_unk=bool(model.get("fuse_unk")))
    return tok, (None, None)


def _is_sentencepiece(path):
    # A sentencepiece model is a protobuf whose first field (pieces) starts with byte 0x0A; the
    # tiktoken format starts with a base64 token.
    with open(path, "rb") as f:
        return f.read(1) == b"\n"


def _special_id(tok, path, field, value, as_list=False):
    """A config's token id (int, or list of ints for eos) or tokenizer_config's token string."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        i = tok.token_to_id(value)
        if i is None:
            raise ValueError(f"{path}: field '{field}' names {value!r}, which is not a token of "
                             f"{tok.source}")
        return [i]
    ids = value if isinstance(value, list) and value else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tok.vocab_size
               for i in ids) or (len(ids) > 1 and not as_list):
        raise ValueError(f"{path}: field '{field}' should be a token id below {tok.vocab_size}, "
                         f"got {value!r}")
    return ids


def load_tokenizer(folder) -> Tokenizer:
    """The tokenizer of a model folder (backend order: see the top)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such model folder")
    files = {n: os.path.join(folder, n) for n in ("tokenizer.model", "tekken.json", "tokenizer.json")}
    has = {n: os.path.isfile(p) for n, p in files.items()}
    if has["tokenizer.model"] and _is_sentencepiece(files["tokenizer.model"]):
        tok, defaults = _load_sentencepiece(files["tokenizer.model"])
    elif has["tekken.json"]:
        tok, defaults = _load_tekken(files["tekken.json"])
    elif has["tokenizer.json"]:
        tok, defaults = _load_hf_bpe(files["tokenizer.json"])
    elif has["tokenizer.model"]:
        tok, defaults = _load_tiktoken_file(files["tokenizer.model"])
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.model, tekken.json or tokenizer.json")

    # BOS/EOS: config.json, then generation_config.json, then tokenizer_config.json's token
    # strings, then the tokenizer file's own defaults.
    configs = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            configs[name] = (p, _read_json(p))
            if not isinstance(configs[name][1], dict):
                raise ValueError(f"{p}: should hold a JSON object")
    for which in ("bos", "eos"):
        ids = None
        for name, field in (("config.json", f"{which}_token_id"),
                            ("generation_config.json", f"{which}_token_id"),
                            ("tokenizer_config.json", f"{which}_token")):
            if name in configs and configs[name][1].get(field) is not None:
                p, cfg = configs[name]
                ids = _special_id(tok, p, field, cfg[field], as_list=which == "eos")
                break
        if ids is None:
            default = defaults[0 if which == "bos" else 1]
            ids = [default] if default is not None else []
        if which == "bos":
            tok.bos_id = ids[0] if ids else None
        else:
            tok.eos_id, tok.eos_ids = (ids[0] if ids else None), list(ids)

    if "tokenizer_config.json" in configs:
        p, cfg = configs["tokenizer_config.json"]
        template = cfg.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{p}: field 'chat_template' should be a string "
                             "(named templates are not supported)")
        tok.chat_template = template
    if "config.json" in configs:
        p, cfg = configs["config.json"]
        n = cfg.get("vocab_size")
        if n is not None:
            if not isinstance(n, int):
                raise ValueError(f"{p}: field 'vocab_size' should be an int, got {n!r}")
            if tok.vocab_size > n:
                raise ValueError(f"{tok.source} has {tok.vocab_size} token ids but {p} says "
                                 f"vocab_size {n}: the model has no embedding for the rest")
    return tok
