"""analyze.py: weight-change statistics on synthetic checkpoints with known answers, update cosine, linear CKA
properties, bad input, and tiny Llama + Nemotron-H pairs through every subcommand via main([...])."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import analyze as A
import model as M

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 260  # 256 byte tokens + 2 specials fit


pytestmark = pytest.mark.usefixtures("one_thread")


def llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    bos_token_id=256, eos_token_id=257, pad_token_id=0, **kw)


def synthetic(folder, tensors: dict, dtype=torch.float32):
    """An HF-style folder: a llama config.json and one safetensors file holding `tensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config().to_dict()))
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


# --- weight change with known answers ----------------------------------------------------------

def test_five_percent_perturbed_by_ten_percent(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = (1 + torch.rand(40, 50, generator=g)) * torch.sign(torch.randn(40, 50, generator=g))  # |w| in [1, 2)
    idx = torch.randperm(w.numel(), generator=g)[: w.numel() // 20]  # exactly 5%
    w_new = w.clone().reshape(-1)
    w_new[idx] *= 1.10
    w_new = w_new.reshape(w.shape)
    a = synthetic(tmp_path / "a", {"model.layers.0.self_attn.q_proj.weight": w})
    b = synthetic(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": w_new})
    r = A.weight_change(a, b, thresholds=(1e-3, 1e-2, 0.099, 0.101, 0.2))
    assert r["total"]["unchanged"] == {1e-3: 0.95, 1e-2: 0.95, 0.099: 0.95, 0.101: 1.0, 0.2: 1.0}
    hand = math.sqrt(float(((w_new.double() - w.double()) ** 2).sum()) / float((w.double() ** 2).sum()))
    assert r["total"]["rel_change"] == pytest.approx(hand, rel=1e-7)
    assert (r["tensors"]["model.layers.0.self_attn.q_proj.weight"]["rel_change"]
            == pytest.approx(hand, rel=1e-7))
    assert r["components"]["q"]["unchanged"][1e-2] == 0.95
    assert r["layers"][0]["q"]["numel"] == 2000


def test_groups_pool_sums_and_zero_rule(tmp_path):
    q = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    q_new = torch.tensor([[1.0, 2.5], [3.0, 0.0]])  # 1 of 4 changed (25%); the zero did not move
    v = torch.tensor([0.0, 0.0, 4.0, 5.0])
    v_new = torch.tensor([1e-6, 0.0, 4.0, 5.0])  # w = 0 moved a tiny bit: changed at every threshold
    emb = torch.ones(3, 2)
    a = synthetic(tmp_path / "a", {"model.layers.0.self_attn.q_proj.weight": q,
                                   "model.layers.1.self_attn.v_proj.weight": v,
                                   "model.embed_tokens.weight": emb})
    b = synthetic(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": q_new,
                                   "model.layers.1.self_attn.v_proj.weight": v_new,
                                   "model.embed_tokens.weight": emb})
    r = A.weight_change(a, b)
    assert (r["tensors"]["model.layers.0.self_attn.q_proj.weight"]["unchanged"]
            == {1e-3: 0.75, 1e-2: 0.75, 1e-1: 0.75})
    assert (r["tensors"]["model.layers.1.self_attn.v_proj.weight"]["unchanged"]
            == {1e-3: 0.75, 1e-2: 0.75, 1e-1: 0.75})
    assert r["tensors"]["model.layers.1.self_attn.v_proj.weight"]["zeros"] == 2
    assert r["total"]["unchanged"][1e-2] == pytest.approx(12 / 14)  # element-count weighted
    total = math.sqrt((0.5 ** 2 + 1e-12) / (1 + 4 + 9 + 16 + 25 + 6))
    assert r["total"]["rel_change"] == pytest.approx(total, rel=1e-6)
    assert r["components"]["embed"]["rel_change"] == 0.0
    assert set(r["components"]) == {"q", "v", "embed"}
    # an all-zero tensor that moved: infinite relative change, never a finite made-up number
    c = synthetic(tmp_path / "c", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})
    d = synthetic(tmp_path / "d", {"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)})
    assert A.weight_change(c, d)["total"]["rel_change"] == math.inf


def test_streams_large_tensor_in_blocks_and_mixed_dtypes(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "BLOCK", 64)  # force row blocks
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 10, generator=g)
    w_new = w + 0.01 * torch.randn(37, 10, generator=g)
    a = synthetic(tmp_path / "a", {"model.layers.0.mlp.down_proj.weight": w})
    b = synthetic(tmp_path / "b", {"model.layers.0.mlp.down_proj.weight": w_new}, dtype=torch.bfloat16)
    r = A.weight_change(a, b)
    wb = w_new.bfloat16().double()
    hand = math.sqrt(float(((wb - w.double()) ** 2).sum()) / float((w.double() ** 2).sum()))
    assert r["total"]["rel_change"] == pytest.approx(hand, rel=1e-6)
    assert r["dtype_mismatch"] == ["model.layers.0.mlp.down_proj.weight"]


def test_update_cosine(tmp_path):
    g = torch.Generator().manual_seed(2)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    base = {n: torch.randn(8, 6, generator=g) for n in names}
    d = {n: torch.randn(8, 6, generator=g) for n in names}
    p0 = synthetic(tmp_path / "base", base)
    p1 = synthetic(tmp_path / "plus", {n: base[n] + d[n] for n in names})
    p2 = synthetic(tmp_path / "minus", {n: base[n] - d[n] for n in names})
    assert A.update_similarity(p0, p1, p1)["total"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    r = A.update_similarity(p0, p1, p2)
    assert r["total"]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert r["components"]["up"]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert A.update_similarity(p0, p0, p1)["total"]["cosine"] is None  # no update, no direction


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        A.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(c in text for c in A.COMMANDS) and "--bootstrap-size" in text and "--alpha" in text


def test_component_names():
    c = A.component
    assert c("model.layers.3.self_attn.o_proj.weight") == (3, "o")
    assert c("model.layers.3.self_attn.q_proj.bias") == (3, "q")
    assert c("model.layers.0.post_attention_layernorm.weight") == (0, "post_norm")
    assert c("model.layers.1.mixer.A_log") == (1, "A_log")
    assert c("model.layers.1.mixer.dt_bias") == (1, "dt_bias")
    assert c("model.layers.1.mixer.D") == (1, "D")
    assert c("model.layers.1.mixer.conv1d.weight") == (1, "conv1d")
    assert c("model.layers.1.mixer.norm.weight") == (1, "mamba_norm")
    assert c("model.layers.1.norm.weight") == (1, "input_norm")
    assert c("model.layers.2.mamba.in_proj.weight") == (2, "in_proj")
    assert c("model.layers.2.shared_mlp.input_linear.weight") == (2, "gate_up")
    assert c("model.layers.2.mixer.experts.4.up_proj.weight") == (2, "expert_up")
    assert c("model.layers.2.mixer.gate.weight") == (2, "router")
    assert c("model.embed_tokens.weight") == (None, "embed")
    assert c("model.norm.weight") == (None, "final_norm")
    assert c("lm_head.weight") == (None, "lm_head")


def test_merge_sharded_streamed(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "BLOCK", 16)  # row blocks
    g = torch.Generator().manual_seed(4)
    ta = {"model.layers.0.self_attn.q_proj.weight": torch.randn(9, 5, generator=g),
          "model.embed_tokens.weight": torch.randn(7, 4, generator=g)}
    tb = {k: torch.randn(v.shape, generator=g) for k, v in ta.items()}
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text(json.dumps(llama_config().to_dict()))
    (a / "tokenizer_config.json").write_text("{}")
    names = list(ta)
    for i, k in enumerate(names):
        save_file({k: ta[k]}, str(a / f"model-0000{i + 1}-of-00002.safetensors"))
    (a / M.WEIGHT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"model-0000{i + 1}-of-00002.safetensors" for i, k in enumerate(names)}}))
    b = synthetic(tmp_path / "b", tb, dtype=torch.bfloat16)
    out = A.merge(a, b, 0.15, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in a.iterdir())
    for i, k in enumerate(names):
        got = load_file(str(out / f"model-0000{i + 1}-of-00002.safetensors"))[k]
        assert got.dtype == torch.float32  # A's dtype
        torch.testing.assert_close(got, 0.15 * ta[k] + 0.85 * tb[k].bfloat16().float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(A.AnalyzeError, match="is an input checkpoint"):
        A.merge(a, b, 0.5, a)


# --- bad input --------------------------------------------------------------------------------

def test_bad_input_is_named(tmp_path):
    ok = {"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4),
          "model.layers.0.self_attn.k_proj.weight": torch.ones(2, 4)}
    a = synthetic(tmp_path / "a", ok)
    b = synthetic(tmp_path / "b", {**ok, "model.layers.0.self_attn.k_proj.weight": torch.ones(3, 4)})
    with pytest.raises(A.AnalyzeError, match=r"k_proj.weight' has shape \(3, 4\)"):
        A.weight_change(a, b)
    c = synthetic(tmp_path / "c", {"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)})
    with pytest.raises(A.AnalyzeError, match="k_proj.weight' has no counterpart"):
        A.weight_change(a, c)
    nan = synthetic(tmp_path / "nan",
                    {**ok, "model.layers.0.self_attn.q_proj.weight": torch.full((4, 4), math.nan)})
    with pytest.raises(A.AnalyzeError, match="q_proj.weight' holds NaN"):
        A.weight_change(a, nan)
    shard = tmp_path / "sharded"
    shard.mkdir()
    shutil.copy(a / "config.json", shard)
    save_file(ok, str(shard / "model-00001-of-00002.safetensors"))
    (shard / M.WEIGHT_INDEX).write_text(json.dumps({"weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.self_attn.k_proj.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(A.AnalyzeError, match="model-00002-of-00002.safetensors: missing"):
        A.weight_change(a, shard)
    with pytest.raises(SystemExit):  # main() reports it without a traceback
        A.main(["weights", str(a), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                "--progress", "0"])


# --- linear CKA ---------------------------------------------------------------------------------

def direct_cka(X, Y):
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    return float(torch.linalg.norm(Y.T @ X) ** 2 / (torch.linalg.norm(X.T @ X) * torch.linalg.norm(Y.T @ Y)))


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(60, 20, generator=g)
    assert A.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert A.linear_cka(X, X.double() @ Q * 3.7 + 5.0) == pytest.approx(1.0, abs=1e-10)
    Y = X @ torch.randn(20, 30, generator=g) + 0.5 * torch.randn(60, 30, generator=g)
    assert A.linear_cka(X, Y) == pytest.approx(direct_cka(X, Y), abs=1e-12)
    assert A.linear_cka(X, Y) == pytest.approx(A.linear_cka(X.double() @ Q, 2 * Y), abs=1e-10)
    wide_x, wide_y = torch.randn(10, 40, generator=g), torch.randn(10, 50, generator=g)  # n < d: Gram path
    assert A.linear_cka(wide_x, wide_y) == pytest.approx(direct_cka(wide_x, wide_y), abs=1e-12)
    big_x, big_y = torch.randn(2000, 5, generator=g), torch.randn(2000, 5, generator=g)
    assert A.linear_cka(big_x, big_y) < 0.02  # independent features
    with pytest.raises(ValueError):
        A.linear_cka(torch.ones(5, 3), X[:5])


# --- tiny real models through every subcommand -------------------------------------------------

def write_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))


def nemotron_config():
    return transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=6, n_groups=2, chunk_size=8,
        layer_norm_epsilon=1e-5, time_step_min=0.01, bos_token_id=256, eos_token_id=257, pad_token_id=0,
        layers_block_type=["linear_attention", "full_attention", "mlp"])


def perturbed(src, dst, scale, seed, frac=1.0):
    """A copy of checkpoint folder src with a fraction `frac` of elements multiplied by
    1 + scale * N(0, 1)."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(dst / "model.safetensors"))
    for k, v in sd.items():
        mask = (torch.rand(v.shape, generator=g) < frac).float()
        sd[k] = v * (1 + mask * scale * torch.randn(v.shape, generator=g))
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=["llama", "nemotron_h"])
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = llama_config() if request.param == "llama" else nemotron_config()
    root = tmp_path_factory.mktemp(request.param)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    base = root / "base"
    hf.save_pretrained(base)
    write_tokenizer(base)
    mid = perturbed(base, root / "mid", 0.05, 1)
    rl_20 = perturbed(mid, root / "step_20", 0.1, 2, frac=0.02)
    rl_40 = perturbed(rl_20, root / "step_40", 0.1, 3, frac=0.02)
    return request.param, root, base, mid, rl_20, rl_40


def run_main(*argv):
    return A.main([*map(str, argv), "--progress", "0"])


def test_every_subcommand(family, capsys):
    kind, root, base, mid, rl_20, rl_40 = family
    out = root / "out"
    r = run_main("weights", base, mid, "--out", out / "w")
    assert 0.03 < r["total"]["rel_change"] < 0.08
    assert r["total"]["unchanged"][1e-3] < 0.05  # (nearly) every element moved
    assert (out / "w" / "weights_rel_change.png").stat().st_size > 1000
    assert (out / "w" / "weights_changed.png").is_file()
    lines = (out / "w" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "total"
    expected = {"q", "k", "v", "o", "embed", "final_norm"}
    expected |= ({"gate", "up", "down", "input_norm", "post_norm", "lm_head"} if kind == "llama" else
                 {"A_log", "dt_bias", "D", "conv1d", "in_proj", "out_proj", "mamba_norm", "input_norm", "up",
                  "down"})
    assert expected <= set(r["components"]), set(r["components"])
    printed = capsys.readouterr().out
    assert "TOTAL" in printed
    # where the files went
    assert f"wrote {out / 'w' / 'weights.json'}, {out / 'w' / 'metrics.jsonl'}, " in printed
    assert str(out / "w" / "weights_changed.png") in printed

    s = run_main("similarity", base, mid, mid, "--out", out / "s")
    assert s["total"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert (out / "s" / "similarity.png").is_file()

    t = run_main("trajectory", mid, rl_40, rl_20, "--out", out / "t")
    steps = [row["step"] for row in t["checkpoints"]]
    changed = [1 - row["unchanged"][1e-2] for row in t["checkpoints"]]
    assert steps == [20, 40] and 0.01 < changed[0] < changed[1] < 0.06
    assert (out / "t" / "trajectory.png").is_file()

    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": f"prompt number {i}: " + "abc " * i}) + "\n"
                            for i in range(6)))
    c = run_main("cka", mid, rl_40, "--data", data, "--bootstrap", 3, "--bootstrap-size", 4,
                 "--out", out / "c")
    n_layers = M.read_config(base).num_hidden_layers
    assert len(c["layers"]) == n_layers
    assert 0.5 < c["summary"]["min_cka"] <= 1.0 + 1e-9
    assert (out / "c" / "features_a.pt").is_file() and (out / "c" / "cka.png").is_file()
    stamp = (out / "c" / "features_b.pt").stat().st_mtime_ns
    again = run_main("cka", mid, rl_40, "--data", data, "--bootstrap", 3, "--bootstrap-size", 4,
                     "--out", out / "c")
    assert (again["layers"] == c["layers"]
            and (out / "c" / "features_b.pt").stat().st_mtime_ns == stamp)  # cached
    c_self = run_main("cka", mid, mid, "--data", data, "--bootstrap", 2, "--bootstrap-size", 4,
                      "--out", out / "c2")
    assert c_self["summary"]["min_cka"] == pytest.approx(1.0, abs=1e-9)

    merged = out / "merged"
    run_main("merge", base, mid, "--alpha", 0.25, "--out", merged)
    m = M.load_model(str(merged), dtype=torch.float32)
    a_model, b_model = (M.load_model(str(base), dtype=torch.float32),
                        M.load_model(str(mid), dtype=torch.float32))
    for (name, w), wa, wb in zip(m.state_dict().items(), a_model.state_dict().values(),
                                 b_model.state_dict().values()):
        torch.testing.assert_close(w, 0.25 * wa + 0.75 * wb, rtol=1e-6, atol=1e-6, msg=name)
    assert (merged / "tokenizer.json").is_file()
    assert M.load_tokenizer(str(merged)).vocab_size == 258


# one family is enough for the (slower) generation
@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_landscape(family):
    pytest.importorskip("evaluate")
    kind, root, base, mid, rl_20, rl_40 = family
    data = root / "problems.jsonl"
    data.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"problem": "What is 2 + 2?", "answer": "4"}) + "\n")
    out = root / "out" / "land"
    r = run_main("landscape", base, mid, rl_40, "--data", data, "--grid", 2, "--max-new-tokens", 3,
                 "--out", out)
    assert r["a"] == [0.0, 1.0] and len(r["pass_rate"]) == 2 and len(r["points"]) == 4
    assert all(0.0 <= p["pass_rate"] <= 1.0 for p in r["points"])
    assert (out / "landscape.png").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_landscape_weights_and_loss_follow_the_definition(family, monkeypatch):
    """At every grid point the model holds W(a, b) = W_base + a (W_mid - W_base) + b (W_rl - W_mid) (PAPER.md;
    dW_mid = MID - BASE, dW_RL = RL - MID): weights and logits/loss against transformers given W(a, b) built
    here from the safetensors files. generate() is replaced by a probe that records them and answers
    '\\boxed{2}'."""
    pytest.importorskip("evaluate")
    from types import SimpleNamespace
    kind, root, base, mid, rl_20, rl_40 = family
    data = root / "problems_probe.jsonl"
    data.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"problem": "What is 2 + 2?", "answer": "4"}) + "\n")
    tok = M.load_tokenizer(str(base))
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 64]])
    seen = []

    def probe(model, prompts, **kw):  # record the weights in the model and its logits on `ids`
        with torch.no_grad():
            seen.append(({n: p.detach().clone() for n, p in model.named_parameters()}, model(ids).float()))
        return [SimpleNamespace(tokens=tok.encode("so \\boxed{2}"), logprobs=[]) for _ in prompts]

    monkeypatch.setattr(A, "generate", probe)
    r = run_main("landscape", base, mid, rl_40, "--data", data, "--grid", 3, "--a-min", -0.5, "--a-max", 1.0,
                 "--b-min", 0.0, "--b-max", 1.0, "--batch-size", 2, "--out", root / "out" / "land_probe")
    a_axis, b_axis = [-0.5, 0.25, 1.0], [0.0, 0.5, 1.0]
    assert r["a"] == pytest.approx(a_axis) and r["b"] == pytest.approx(b_axis)
    assert [(p["a"], p["b"]) for p in r["points"]] == [(a, b) for a in a_axis for b in b_axis]
    assert r["pass_rate"] == [[0.5] * 3] * 3  # '\\boxed{2}' answers the first problem, not the second
    w_base, w_mid, w_rl = (load_file(str(p / "model.safetensors")) for p in (base, mid, rl_40))
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(base),
                                                        dtype=torch.float32).eval()
    labels = ids[0, 1:]
    assert len(seen) == 9
    for (a, b), (weights, logits) in zip([(a, b) for a in a_axis for b in b_axis], seen):
        w = {k: w_base[k] + a * (w_mid[k] - w_base[k]) + b * (w_rl[k] - w_mid[k]) for k in w_base}
        for k, v in w.items():  # llama: the checkpoint's names are the model's
            torch.testing.assert_close(weights[k], v, rtol=1e-6, atol=1e-6, msg=f"{k} at a={a}, b={b}")
        hf.load_state_dict(w)
        with torch.no_grad():
            ref = hf(ids).logits.float()
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4, msg=f"logits at a={a}, b={b}")
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels)
        assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(ref[0, :-1], labels)),
                                            abs=1e-5)


@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_cka_pooling_leaves_out_special_tokens(family, capsys, monkeypatch):
    """BOS's hidden state is the same in every prompt (a constant component of the mean): the default pooling
    leaves it out, --cka-keep-special true keeps it. Expected values: transformers' layer outputs, pooled and
    compared (direct_cka) here."""
    kind, root, base, mid, rl_20, rl_40 = family
    texts = ["x", "hi", "a b c", "one two", "7 + 8 = 15", "short and long"]  # BOS weighs 1 / T of each mean
    data = root / "cka_pool.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bos = 256  # config.json's bos_token_id; the tokenizer's <s>
    token_lists = [[bos] + M.load_tokenizer(str(base)).encode(t) for t in texts]

    def features(folder):  # (L, n, H) pooled without BOS, (L, n, H) with it, (L, n, H) BOS's own state
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        outs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in hf.model.layers]
        without, with_bos, at_bos = [], [], []
        for ids in token_lists:
            outs.clear()
            with torch.no_grad():
                hf(torch.tensor([ids]))
            without.append(torch.stack([o[0, 1:].double().mean(0) for o in outs]))
            with_bos.append(torch.stack([o[0].double().mean(0) for o in outs]))
            at_bos.append(torch.stack([o[0, 0].double() for o in outs]))
        for h in hooks:
            h.remove()
        return (torch.stack(x, 1) for x in (without, with_bos, at_bos))

    far = root / "far"  # a model far from base, so that CKA is well below 1 and BOS's share shows
    if not far.exists():
        perturbed(base, far, 1.0, 5)
    (a_ex, a_in, a_bos), (b_ex, b_in, _) = features(base), features(far)
    assert torch.allclose(a_bos, a_bos[:, :1].expand_as(a_bos), atol=1e-5)  # the same in every prompt
    want_ex = [direct_cka(x, y) for x, y in zip(a_ex, b_ex)]
    want_in = [direct_cka(x, y) for x, y in zip(a_in, b_in)]
    assert max(abs(x - y) for x, y in zip(want_ex, want_in)) > 1e-2  # the choice matters in this case

    out = root / "out"
    figures = plotted(monkeypatch)
    r = run_main("cka", base, far, "--data", data, "--bootstrap", 0, "--out", out / "pool_default")
    title = figures[-1].axes[0].get_title()
    assert "base vs far" in title and "special tokens excluded" in title, title
    assert [row["cka"] for row in r["layers"]] == pytest.approx(want_ex, abs=1e-5)
    assert r["summary"]["special_tokens"] == "excluded" and r["pooling"]["excluded_positions"] == len(texts)
    assert bos in r["pooling"]["excluded_ids"]
    printed = capsys.readouterr().out
    assert "special tokens excluded: 6 positions" in printed and "base vs far" in printed
    assert (json.loads((out / "pool_default" / "cka.json").read_text())["summary"]["special_tokens"]
            == "excluded")
    r = run_main("cka", base, far, "--data", data, "--bootstrap", 0, "--cka-keep-special", "true",
                 "--out", out / "pool_default")  # same folder: the cached features must not be reused
    assert [row["cka"] for row in r["layers"]] == pytest.approx(want_in, abs=1e-5)
    assert r["summary"]["special_tokens"] == "kept" and "special tokens kept" in capsys.readouterr().out
    only_bos = root / "only_bos.jsonl"
    only_bos.write_text(json.dumps({"text": "<s>"}) + "\n" + json.dumps({"text": "a"}) + "\n")
    with pytest.raises(A.AnalyzeError,
                       match=r"only_bos.jsonl: record 1.*only special tokens.*--cka-keep-special"):
        A.cka_compare(A.Config(data=str(only_bos), out=str(out / "pool_bad"), progress=False), base, mid)


def plotted(monkeypatch) -> list:
    """The figures analyze.py closes from now on (it closes each one after saving it)."""
    plt = A._plt()
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    return figures


def test_run_names():
    assert A.run_name("out/mid/hf") == "mid" and A.run_name("out/rl/hf/") == "rl"  # not both "hf"
    assert A.run_name("out/rl/hf-step20") == "rl step20"
    assert (A.run_name("out/rl/step_40") == "step_40"
            and A.run_name("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M")
    cfg = A.Config()
    assert A.checkpoint_labels(cfg, ["out/mid/hf", "out/rl/hf"]) == ["mid", "rl"]
    assert A.checkpoint_labels(cfg, ["a/step_20", "b/step_20"]) == ["a/step_20", "b/step_20"]  # told apart
    assert A.checkpoint_labels(cfg, ["out/mid/hf", "out/mid/hf"]) == ["mid", "mid"]
    assert A.checkpoint_labels(A.Config(labels="MC, MCS"), ["x/hf", "y/hf"]) == ["MC", "MCS"]
    with pytest.raises(A.AnalyzeError, match="--labels 'MC': expected 2"):
        A.checkpoint_labels(A.Config(labels="MC"), ["x/hf", "y/hf"])


def test_weights_plots_name_the_runs(tmp_path, monkeypatch, capsys):
    """out/mid/hf -> out/rl/hf: titles say 'mid -> rl'; axes and colourbars are labelled; files are
    printed."""
    g = torch.Generator().manual_seed(5)
    w = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
         "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4, generator=g)}
    a = synthetic(tmp_path / "out" / "mid" / "hf", w)
    b = synthetic(tmp_path / "out" / "rl" / "hf", {k: 1.1 * v for k, v in w.items()})
    figures = plotted(monkeypatch)
    r = run_main("weights", a, b, "--out", tmp_path / "w")
    assert r["labels"] == ["mid", "rl"]
    assert [f.axes[0].get_title() for f in figures] == ["relative change: mid -> rl",
                                                        "elements changed by >= 1%: mid -> rl"]
    for f in figures:
        assert f.axes[0].get_xlabel() == "component" and f.axes[0].get_ylabel() == "layer"
        assert f.axes[1].get_ylabel()  # the colourbar says what its colours mean
    printed = capsys.readouterr().out
    assert all(str(tmp_path / "w" / n) in printed for n in ("weights.json", "weights_rel_change.png"))
    s = run_main("similarity", a, b, b, "--out", tmp_path / "s", "--labels", "base,MC,MCS")
    assert s["labels"] == ["base", "MC", "MCS"]
    assert figures[-1].axes[0].get_title() == "cosine of the updates MC - base and MCS - base"
