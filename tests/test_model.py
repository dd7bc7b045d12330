"""Dense families against transformers on tiny random configs (fp32): logits, packing, generation, round
trips."""
import json

import pytest
import torch

import generate as GEN
import model as M

transformers = pytest.importorskip("transformers")

VOCAB = 97


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "llama_linear":
        return transformers.LlamaConfig(**{**common, "tie_word_embeddings": True}, attention_bias=True,
                                        mlp_bias=True, rope_parameters={"rope_type": "linear",
                                                                        "rope_theta": 10000.0, "factor": 2.0})
    if family == "llama_dynamic":
        return transformers.LlamaConfig(**common, rope_parameters={"rope_type": "dynamic",
                                                                   "rope_theta": 10000.0, "factor": 2.0})
    if family == "mistral":  # a window shorter than the test sequences, and an explicit head_dim
        return transformers.MistralConfig(**common, head_dim=24, sliding_window=5, rope_theta=1e6)
    if family == "granite":
        return transformers.GraniteConfig(**{**common, "tie_word_embeddings": True},
                                          embedding_multiplier=12.0, attention_multiplier=0.1,
                                          residual_multiplier=0.22, logits_scaling=8.0)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    raise KeyError(family)


FAMILIES = ["llama", "llama_linear", "llama_dynamic", "mistral", "granite", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(transformers model, our model) with identical random weights, via a saved HF folder."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config(request.param), dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a missing one cannot hide
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = M.load_model(str(folder), dtype=torch.float32)
    return request.param, hf, ours, folder


def test_logits_match_transformers(pair):
    _, hf, ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("pair", ["granite"], indirect=True)  # one family suffices (granite: logits scaling)
def test_label_logprobs_chunked_equal_full_vocab(pair):
    """forward(labels=) in small chunks equals log_softmax of the full logits: values, entropy, gradients."""
    name, _, ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 23))
    labels = torch.randint(0, VOCAB, (2, 23))
    labels[0, :5] = -100
    ours.zero_grad()
    logp, ent = ours(ids, labels=labels, temperature=0.7, return_entropy=True, chunk_tokens=10)
    (logp.sum() + 0.1 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    full = torch.log_softmax(ours(ids).float() / 0.7, -1)
    ref = full.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels < 0, 0)
    ref_ent = -(full.exp() * full).sum(-1)
    (ref.sum() + 0.1 * ref_ent.masked_fill(labels < 0, 0).sum()).backward()
    ref_ent = ref_ent.masked_fill(labels < 0, 0)  # ignored positions are not projected at all
    assert (logp - ref).abs().max() < 1e-5 and (ent - ref_ent).abs().max() < 1e-5
    assert logp[0, :5].eq(0).all() and ent[0, :5].eq(0).all()
    for n, p in ours.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n
    ours.zero_grad()


@pytest.mark.parametrize("pair", ["llama_dynamic", "llama"], indirect=True)  # the RoPE-scaling families
def test_long_sequence_dynamic_rope(pair):
    """Beyond max_position_embeddings dynamic NTK rescales; llama3/linear are checked at any length."""
    name, hf, ours, _ = pair
    ids = torch.randint(3, VOCAB, (1, 300))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_packed_documents_equal_separate_runs(pair):
    _, hf, ours, _ = pair
    lengths = [7, 12, 9]
    docs = [torch.randint(3, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    # a second row: one document then padding (negative ids), which must change nothing
    row2 = torch.cat([docs[1], torch.full((1, 16), 5)], dim=1)
    ids2 = torch.cat([row2], dim=1)
    doc2 = torch.cat([torch.zeros(1, 12, dtype=torch.long), torch.full((1, 16), -1)], dim=1)
    with torch.no_grad():
        got = ours(torch.cat([packed, ids2]), torch.cat([doc_ids, doc2]))
        start = 0
        for d in docs:
            ref = hf(d).logits[0]
            assert (got[0, start:start + d.shape[1]] - ref).abs().max() < 1e-4
            start += d.shape[1]
        assert (got[1, :12] - hf(docs[1]).logits[0]).abs().max() < 1e-4


def test_greedy_generation_matches_transformers(pair):
    _, hf, ours, _ = pair
    torch.manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,)).tolist() for n in (5, 11, 8)]
    samples = GEN.generate(ours, prompts, max_new_tokens=32)
    # one prompt at a time: transformers' own reference, no padding involved
    for p, s in zip(prompts, samples):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=32)[0, len(p):].tolist()
        assert s.tokens == ref
        assert len(s.logprobs) == 32 and all(lp <= 0 for lp in s.logprobs)


def test_decode_logits_match_full_forward(pair):
    """Prefill + one-token steps through the cache give the logits of one full forward."""
    _, _, ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 20))
    doc_ids = torch.zeros_like(ids)
    doc_ids[1, :6] = -1  # row 1 left-padded
    with torch.no_grad():
        full = ours(ids, doc_ids)
        cache = ours.allocate_cache(2, 20)
        steps = [ours(ids[:, :12], doc_ids[:, :12], cache)]
        for t in range(12, 20):
            steps.append(ours(ids[:, t:t + 1], doc_ids[:, t:t + 1], cache))
    assert (torch.cat(steps, dim=1)[:, 6:] - full[:, 6:]).abs().max() < 1e-4


def test_save_then_transformers_load(pair, tmp_path):
    _, hf, ours, folder = pair
    out = M.save_model(ours, tmp_path / "saved", tokenizer_from=None)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
    assert M.load_model(str(out), dtype=torch.float32)(ids).sub(ours(ids)).abs().max() == 0


def test_sharded_checkpoint_loads(pair, tmp_path):
    """save_model shards at a small size; both load_model and transformers read the shards."""
    _, hf, ours, _ = pair
    out = M.save_model(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        assert (M.load_model(str(out), dtype=torch.float32)(ids) - hf(ids).logits).abs().max() < 1e-5
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert (reloaded(ids).logits - hf(ids).logits).abs().max() < 1e-5


def test_sampling_is_seeded_and_logprobs_are_consistent(pair):
    _, _, ours, _ = pair
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    a = GEN.generate(ours, prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    b = GEN.generate(ours, prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    # the first token's log-prob equals the temperature-scaled, top-p-renormalised distribution's
    with torch.no_grad():
        logits = ours(torch.tensor([prompts[0]]))[0, -1].float() / 0.8
    lp = torch.log_softmax(logits, -1)
    sorted_lp, order = lp.sort(descending=True)
    keep = order[(sorted_lp.exp().cumsum(0) - sorted_lp.exp()) < 0.9]
    assert a[0].tokens[0] in keep.tolist()
    expected = lp[a[0].tokens[0]] - torch.logsumexp(lp[keep], 0)
    assert abs(a[0].logprobs[0] - expected.item()) < 1e-4


def test_stop_tokens_end_rows_independently(pair):
    _, _, ours, _ = pair
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    free = GEN.generate(ours, prompts, max_new_tokens=16)
    stop = free[1].tokens[3]  # a token row 1 produces at step 4
    stopped = GEN.generate(ours, prompts, max_new_tokens=16, stop_ids=[stop])
    for f, s in zip(free, stopped):
        cut = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
        assert s.tokens == f.tokens[:cut]
        assert s.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-5)


# ---- bad input: one clear error naming the file and the field

def _write_config(folder, **overrides):
    cfg = tiny_config("llama").to_dict()
    cfg.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        M.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("overrides,match", [
    ({"model_type": "gpt_neox"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_config_fields(tmp_path, overrides, match):
    folder = _write_config(tmp_path / "m", **overrides)
    with pytest.raises(ValueError, match=match) as err:
        M.load_model(str(folder))
    assert "config.json" in str(err.value)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)  # one family is enough for file errors
def test_wrong_shape_and_missing_tensors(pair, tmp_path):
    from safetensors.torch import load_file, save_file
    name, _, _, folder = pair
    weights = load_file(str(folder / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    key = "model.layers.1.self_attn.k_proj.weight"
    save_file({**weights, key: weights[key][:-1]}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=f"model.safetensors.*{key}.*shape"):
        M.load_model(str(bad))
    save_file({k: v for k, v in weights.items() if "layers.2.mlp" not in k}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 3 tensors.*layers\.2\.mlp"):
        M.load_model(str(bad))
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        M.load_model(str(bad))
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load_model(str(bad))
