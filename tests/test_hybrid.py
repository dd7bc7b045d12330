"""Hybrid families (Nemotron-H, GraniteMoeHybrid, Mamba2) against transformers on tiny random configs (fp32):
logits, packed documents, decode through the cache, greedy generation, save -> transformers reload, bad
configs."""
import json
import math

import pytest
import torch

import generate as GEN
import model as M

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 97
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(variant: str):
    """(transformers config, rewrite of the saved config.json or None): the rewrite gives the hub's own
    forms."""
    common = dict(vocab_size=VOCAB, hidden_size=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    nemotron = dict(common, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                    mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=6, n_groups=2, chunk_size=8,
                    layer_norm_epsilon=1e-5, time_step_min=0.01)
    granite = dict(common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=16,
                   shared_intermediate_size=24, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=6,
                   mamba_n_groups=2, mamba_chunk_size=8, mamba_expand=2, embedding_multiplier=2.0,
                   residual_multiplier=0.6, logits_scaling=1.5, attention_multiplier=0.3, rms_norm_eps=1e-6)
    mamba2 = dict(common, num_heads=8, head_dim=8, expand=2, state_size=6, n_groups=2, chunk_size=8,
                  num_hidden_layers=3)
    # the hub form: hybrid_override_pattern + num_hidden_layers; biases on
    if variant == "nemotron_h_pattern":
        def hub_form(raw):
            raw["hybrid_override_pattern"] = "".join(
                {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}[t]
                for t in raw.pop("layers_block_type"))
            raw["num_hidden_layers"] = len(raw["hybrid_override_pattern"])
        return transformers.NemotronHConfig(**nemotron, layers_block_type=[
            "linear_attention", "full_attention", "linear_attention", "mlp", "linear_attention",
            "full_attention"],
            use_bias=True, mlp_bias=True, use_conv_bias=False), hub_form
    # transformers 5's layers_block_type; grouped routing, latent experts
    if variant == "nemotron_h_moe_latent":
        return transformers.NemotronHConfig(**{**nemotron, "n_groups": 4}, layers_block_type=[
            "linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp"],
            n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=24, n_group=2, topk_group=1, moe_latent_size=16,
            routed_scaling_factor=2.5), None
    if variant == "nemotron_h_moe":  # plain MoE, unnormalised top-k weights
        return transformers.NemotronHConfig(**nemotron, layers_block_type=[
            "moe", "linear_attention", "full_attention", "moe"], n_routed_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=16, moe_shared_expert_intermediate_size=20, norm_topk_prob=False), None
    # Granite-4.0-H-Tiny-like; the old layer type names 'mamba' / 'attention'
    if variant == "granite_moe_nope":
        def old_names(raw):
            raw["layer_types"] = [{"linear_attention": "mamba", "full_attention": "attention"}[t]
                                  for t in raw["layer_types"]]
        return transformers.GraniteMoeHybridConfig(
            **granite, num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"],
            num_local_experts=4, num_experts_per_tok=2, position_embedding_type="nope", mamba_proj_bias=True,
            mamba_conv_bias=False, time_step_limit=(0.05, 2.0)), old_names
    if variant == "granite_dense_rope":  # no experts, RoPE, tied embeddings, attention biases
        return transformers.GraniteMoeHybridConfig(
            **granite, num_hidden_layers=3, layer_types=["attention", "mamba", "attention"],
            num_local_experts=0, position_embedding_type="rope",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True, attention_bias=True), None
    if variant == "granite_micro":  # Granite-4.0-Micro: only attention layers, a dense model
        return transformers.GraniteMoeHybridConfig(
            **granite, num_hidden_layers=2, layer_types=["attention", "attention"], num_local_experts=0,
            position_embedding_type="rope", rope_parameters={"rope_type": "default", "rope_theta": 1e6}), None
    if variant == "mamba2":
        return transformers.Mamba2Config(**mamba2), None
    if variant == "mamba2_tied_bias":
        return transformers.Mamba2Config(**{**mamba2, "n_groups": 4}, tie_word_embeddings=True, use_bias=True,
                                         time_step_limit=(0.01, 5.0), residual_in_fp32=False), None
    raise KeyError(variant)


VARIANTS = ["nemotron_h_pattern", "nemotron_h_moe_latent", "nemotron_h_moe", "granite_moe_nope",
            "granite_dense_rope", "granite_micro", "mamba2", "mamba2_tied_bias"]


@torch.no_grad()
def randomize(hf, seed: int):
    """Weights that make every part matter: unit-scale projections, perturbed norms, biases, A, D, Δ bias."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    for name, p in hf.named_parameters():
        if name.endswith("A_log"):  # A = -exp(A_log) in [-1, -0.1]: state that lasts a few tokens
            p.copy_(torch.log(0.1 + 0.9 * torch.rand(p.shape, generator=gen)))
        elif name.endswith((".D", "dt_bias")):
            p.copy_(0.5 * rand(*p.shape))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * rand(*p.shape))
        elif name.endswith("bias"):
            p.copy_(0.1 * rand(*p.shape))
        elif "conv1d" in name:
            p.copy_(0.5 * rand(*p.shape))
        else:  # linear, embedding and stacked expert weights: (..., out, in)
            p.copy_(rand(*p.shape) / math.sqrt(p.shape[-1]))
    for name, b in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * rand(*b.shape))


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
    """(variant, transformers model, our model, folder) with identical random weights, via a saved HF folder
    whose config.json may be rewritten into the hub's forms; transformers reads the same folder."""
    torch.manual_seed(0)
    cfg, rewrite = tiny_config(request.param)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(hf, seed=VARIANTS.index(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    if rewrite is not None:
        raw = json.loads((folder / "config.json").read_text())
        rewrite(raw)
        (folder / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = M.load_model(str(folder), dtype=torch.float32)
    return request.param, hf, ours, folder


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_config_reads_the_layer_pattern(pair):
    name, hf, ours, _ = pair
    kinds = {"mamba": 0, "attention": 0, "mlp": 0, "moe": 0}
    for k in ours.config.layer_types:
        kinds[k] += 1
    assert len(ours.config.layer_types) == len(hf.config.layer_types)
    expect = {"nemotron_h_pattern": (3, 2, 1, 0), "nemotron_h_moe_latent": (2, 1, 1, 2),
              "nemotron_h_moe": (1, 1, 0, 2), "granite_moe_nope": (3, 1, 0, 0),
              "granite_dense_rope": (1, 2, 0, 0), "granite_micro": (0, 2, 0, 0),
              "mamba2": (3, 0, 0, 0), "mamba2_tied_bias": (3, 0, 0, 0)}[name]
    assert tuple(kinds.values()) == expect


def test_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    # 37: not a multiple of chunk 8
    ids = torch.randint(3, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    d = maxdiff(got, ref)
    print(f"{name}: max|logit diff| {d:.2e} (logits up to {ref.abs().max().item():.1f})")
    assert got.shape == ref.shape and d < TOL
    assert ref.std() > 0.3  # logits of order one: a 1e-4 tolerance is meaningful


def test_packed_documents_equal_separate_runs(pair):
    _, hf, ours, _ = pair
    gen = torch.Generator().manual_seed(2)
    lengths = [7, 12, 2, 9]  # chunk boundaries inside documents, a document shorter than the conv window
    docs = [torch.randint(3, VOCAB, (1, n), generator=gen) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    # a second row: padding (random tokens, negative ids) before and after one document, 5 + 12 + 13 = 30
    ids2 = torch.cat([torch.randint(3, VOCAB, (1, 5), generator=gen), docs[1],
                      torch.randint(3, VOCAB, (1, 13), generator=gen)], dim=1)
    doc2 = torch.full((1, 30), -1)
    doc2[0, 5:17] = 0
    with torch.no_grad():
        got = ours(torch.cat([packed, ids2]), torch.cat([doc_ids, doc2]))
        start, worst = 0, 0.0
        for d in docs:
            worst = max(worst, maxdiff(got[0, start:start + d.shape[1]], hf(d).logits[0]))
            start += d.shape[1]
        worst = max(worst, maxdiff(got[1, 5:17], hf(docs[1]).logits[0]))
    assert worst < TOL


def test_decode_logits_match_full_forward(pair):
    """Prefill + one-token steps through the cache (KV for attention, conv/SSM state for Mamba) = one
    forward."""
    _, _, ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.zeros_like(ids)
    doc_ids[1, :6] = -1  # row 1 left-padded
    with torch.no_grad():
        full = ours(ids, doc_ids)
        cache = ours.allocate_cache(2, 20)
        steps = [ours(ids[:, :12], doc_ids[:, :12], cache)]
        for t in range(12, 20):
            steps.append(ours(ids[:, t:t + 1], doc_ids[:, t:t + 1], cache))
        alone = ours(ids[1:, 6:])  # the padded row equals the row run alone
    steps = torch.cat(steps, dim=1)
    assert maxdiff(steps[:, 6:], full[:, 6:]) < TOL and maxdiff(full[1, 6:], alone[0]) < TOL


def greedy_without_cache(hf, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(pair):
    name, hf, ours, _ = pair
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 11, 8)]
    samples = GEN.generate(ours, prompts, max_new_tokens=32)  # batched, left-padded
    for p, s in zip(prompts, samples):  # transformers one prompt at a time: no padding involved
        if name == "granite_moe_nope":
            # transformers' (and mamba_ssm's) one-token Mamba step ignores time_step_limit, which its prefill
            # applies: its generate disagrees with its own forward here. We clamp in both, so the reference
            # is transformers' forward, re-run on the whole sequence for every new token.
            ref = greedy_without_cache(hf, p, 32)
        else:
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0, min_new_tokens=32)[0, len(p):].tolist()
        assert s.tokens == ref
        assert len(s.logprobs) == 32 and all(lp <= 0 for lp in s.logprobs)


def test_stop_tokens_end_rows_independently(pair):
    """Rows leaving the batch (cache.keep over KV caches, Mamba states and MLP layers' None) change nothing
    else."""
    _, _, ours, _ = pair
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    free = GEN.generate(ours, prompts, max_new_tokens=10)
    stop = free[1].tokens[3]
    stopped = GEN.generate(ours, prompts, max_new_tokens=10, stop_ids=[stop])
    for f, s in zip(free, stopped):
        cut = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
        assert s.tokens == f.tokens[:cut]
        assert s.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-5)


def test_save_then_transformers_load(pair, tmp_path):
    """save_model writes the hub's names (backbone.*, mamba.*, block_sparse_moe.*), sharded here."""
    name, hf, ours, folder = pair
    out = M.save_model(ours, tmp_path / "saved", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())  # the same names transformers wrote
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
        assert maxdiff(M.load_model(str(out), dtype=torch.float32)(ids), ours(ids)) == 0


# one per family
@pytest.mark.parametrize("pair", ["nemotron_h_moe_latent", "mamba2", "granite_moe_nope"], indirect=True)
def test_bf16_load_runs(pair):
    """bf16 weights (the load_model default): runs, Nemotron-H routers stay fp32, logits close to fp32's."""
    name, _, ours, folder = pair
    low = M.load_model(str(folder))
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        ref, got = ours(ids), low(ids)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    # bf16 rounding can send a token to another expert, so compare on average
    assert (got.float() - ref).abs().mean() < 0.1 * ref.abs().mean()
    for key, t in low.state_dict().items():
        assert t.dtype == (torch.float32 if key.endswith(M.NEMOTRON_FP32_KEYS) else torch.bfloat16), key


# one family is enough for file errors
@pytest.mark.parametrize("pair", ["nemotron_h_pattern"], indirect=True)
def test_checkpoint_names_on_load(pair, tmp_path):
    """Errors name the checkpoint's own keys; Nemotron 3's multi-token-prediction tensors are skipped."""
    from safetensors.torch import load_file, save_file
    name, _, ours, folder = pair
    weights = load_file(str(folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({**weights, "mtp.layers.0.norm.weight": torch.ones(32)}, str(tmp_path / "model.safetensors"))
    assert maxdiff(M.load_model(str(tmp_path), dtype=torch.float32)(torch.tensor([[5, 6]])),
                   ours(torch.tensor([[5, 6]]))) == 0
    key = "backbone.layers.2.mixer.in_proj.weight"
    save_file({k: v for k, v in weights.items() if k != key}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"lacks 1 tensors.*{key}"):
        M.load_model(str(tmp_path))
    save_file({**weights, key: weights[key][:-1]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{key}' has shape"):
        M.load_model(str(tmp_path))


# ---- bad input: one clear error naming config.json and the field

BASE = {
    "nemotron_h": lambda: tiny_config("nemotron_h_moe_latent")[0].to_dict(),
    "granitemoehybrid": lambda: tiny_config("granite_moe_nope")[0].to_dict(),
    "mamba2": lambda: tiny_config("mamba2")[0].to_dict(),
}


def _pattern(raw, pattern, layers=None):
    raw.pop("layers_block_type")
    raw["hybrid_override_pattern"] = pattern
    raw["num_hidden_layers"] = len(pattern) if layers is None else layers


@pytest.mark.parametrize("family,change,field", [
    ("nemotron_h", lambda r: _pattern(r, "M*X-"), "hybrid_override_pattern"),
    ("nemotron_h", lambda r: _pattern(r, "M*M-", layers=6), "num_hidden_layers"),
    ("nemotron_h", lambda r: r.update(layers_block_type=["linear_attention", "conv"]), "layers_block_type"),
    ("nemotron_h", lambda r: r.update(hybrid_override_pattern="M*"), "disagree"),
    ("nemotron_h", lambda r: r.pop("layers_block_type"), "hybrid_override_pattern"),
    ("nemotron_h", lambda r: r.update(n_groups=3), "n_groups"),
    ("nemotron_h", lambda r: r.update(n_group=3), "n_group"),
    ("nemotron_h", lambda r: r.update(mlp_hidden_act="gelu"), "mlp_hidden_act"),
    ("granitemoehybrid", lambda r: r.update(layer_types=["mamba", "attention"]), "layer_types"),
    ("granitemoehybrid", lambda r: r.update(layer_types=["mamba", "mlp", "mamba", "mamba"]), "layer_types"),
    ("granitemoehybrid", lambda r: r.update(mamba_d_head=6), "mamba_d_head"),
    ("granitemoehybrid", lambda r: r.update(mamba_n_groups=3), "mamba_n_groups"),
    ("granitemoehybrid", lambda r: r.update(position_embedding_type="alibi"), "position_embedding_type"),
    ("granitemoehybrid", lambda r: r.update(num_experts_per_tok=5), "num_experts_per_tok"),
    ("granitemoehybrid", lambda r: r.update(time_step_limit=[1.0, "x"]), "time_step_limit"),
    ("mamba2", lambda r: r.update(num_heads=6), "num_heads"),
    ("mamba2", lambda r: r.update(expand=3), "expand"),
    ("mamba2", lambda r: r.update(n_groups=3), "n_groups"),
])
def test_bad_hybrid_config(tmp_path, family, change, field):
    raw = BASE[family]()
    change(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=field) as err:
        M.load_model(str(tmp_path))
    assert "config.json" in str(err.value)
