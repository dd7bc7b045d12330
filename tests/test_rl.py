"""train_rl.py: GRPO maths against hand-computed values, rewards, prompt loaders, trainer/sampler log-prob
parity, and short real runs (learning, 2-process gloo FSDP, resume, a hybrid model) on tiny random models
with a 16-token tokenizer (digits, space, newline, chat and think markers)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate as E
import graders
import generate as GEN
import model as M
import train_rl as R

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


# ----------------------------------------------------------------------------------------------
# Tiny models


def write_tiny_tokenizer(folder: Path):
    """Byte-level BPE, 16 ids: 0-9 digits, 10 space, 11 newline, 12-15 the special tokens; EOS <|im_end|>."""
    vocab = ({c: i for i, c in enumerate("0123456789")} | {"Ġ": 10, "Ċ": 11}
             | {s: 12 + i for i, s in enumerate(SPECIALS)})
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": 12 + i, "content": s, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}
                             for i, s in enumerate(SPECIALS)],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": None,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>{% endif %}"}))


def make_tiny(folder: Path, kind: str = "llama", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    common = dict(vocab_size=16, hidden_size=32, bos_token_id=None, eos_token_id=13, pad_token_id=0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, tie_word_embeddings=True)
    else:  # a Nemotron-H hybrid: Mamba2, attention and MLP layers
        cfg = transformers.NemotronHConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8,
                                           ssm_state_size=6, n_groups=2, chunk_size=8,
                                           layer_norm_epsilon=1e-5, time_step_min=0.01,
                                           layers_block_type=["linear_attention", "full_attention", "mlp"])
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The trivial task: the prompt is a digit, the answer is the same digit."""
    path = tmp_path_factory.mktemp("prompts") / "digits.jsonl"
    path.write_text("".join(json.dumps({"prompt": str(d), "answer": str(d), "domain": "math"}) + "\n"
                            for d in range(10)))
    return path


@pytest.fixture(autouse=True)
def clean_dist_env(monkeypatch):
    """setup_distributed writes RANK/WORLD_SIZE/MASTER_PORT for a one-process group; start every test
    without."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    yield
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


def tiny_cfg(model, prompts, out, **kw):
    base = dict(model=str(model), prompts=str(prompts), out=str(out), system_prompt="", example_user="",
                max_new_tokens=4, steps=2, group_size=8, prompts_per_step=4, lr=1e-2, format_bonus=0.5,
                gen_batch=64)
    return R.Config(**{**base, **kw})


def read_metrics(out) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# GRPO maths, by hand


def test_loss_by_hand():
    eps_low, eps_high, beta, C = 0.2, 0.28, 0.05, 2.0
    #               inside   high-clip  low-clip  high,A<0  IS-capped
    rho = torch.tensor([1.1, 1.5, 0.5, 1.5, 1.0])
    adv = torch.tensor([1.0, 2.0, -1.0, -1.0, 0.5])
    logp_old = torch.log(torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1]))
    logp_gen = logp_old - torch.log(torch.tensor([1.0, 1.0, 1.5, 0.8, 3.0]))  # pi_old / pi_gen
    logp = (logp_old + torch.log(rho)).requires_grad_()
    logp_ref = logp.detach() + torch.tensor([0.1, -0.2, 0.0, 0.3, -0.1])
    loss, diag = R.grpo_token_loss(logp, logp_old, logp_gen, logp_ref, adv, eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, is_cap=C)
    w = [1.0, 1.0, 1.5, 0.8, 2.0]
    pg = [-w[0] * 1.1 * 1.0,           # rho inside [0.8, 1.28]: unclipped
          -w[1] * 1.28 * 2.0,          # A > 0, rho > 1 + eps_high: clipped at 1.28
          -w[2] * 0.8 * -1.0,          # A < 0, rho < 1 - eps_low: clipped at 0.8
          -w[3] * 1.5 * -1.0,          # A < 0, rho > 1 + eps_high: min picks the unclipped (more pessimistic)
          -w[4] * 1.0 * 0.5]           # pi_old / pi_gen = 3 truncated to C = 2
    q = [0.1, -0.2, 0.0, 0.3, -0.1]
    kl = [math.exp(x) - x - 1 for x in q]
    expect = torch.tensor([p + beta * k for p, k in zip(pg, kl)])
    assert torch.allclose(loss, expect, atol=1e-5)
    assert diag["clip_high"].tolist() == [False, True, False, False, False]
    assert diag["clip_low"].tolist() == [False, False, True, False, False]
    assert torch.allclose(diag["is_weight"], torch.tensor(w), atol=1e-5)
    # gradients: d/dlogp of -w rho A is -w rho A where unclipped, 0 where clipped; of beta k3 is
    # beta (1 - e^q)
    loss.sum().backward()
    dpg = [-w[0] * 1.1 * 1.0, 0.0, 0.0, -w[3] * 1.5 * -1.0, -w[4] * 1.0 * 0.5]
    dkl = [beta * (1 - math.exp(x)) for x in q]
    assert torch.allclose(logp.grad, torch.tensor([a + b for a, b in zip(dpg, dkl)]), atol=1e-5)


def test_token_level_normalisation_and_dr_grpo():
    # two groups of G = 4: |o| = 2, 3 kept in group 0; 1, 1, 4 and a masked one (0) in group 1
    lengths, groups = [2, 3, 1, 1, 4, 0], [0, 0, 1, 1, 1, 1]
    w = R.sequence_weights(lengths, groups, norm="group", n_groups=2)
    assert w == pytest.approx([1 / (2 * 5), 1 / (2 * 5), 1 / (2 * 6), 1 / (2 * 6), 1 / (2 * 6), 0.0])
    # the loss of a group is (1 / sum_j |o_j|) sum over its tokens: a per-token loss of 1 gives 1 per group
    total = sum(L * x for L, x in zip(lengths, w))
    assert total == pytest.approx(1.0)
    # batch (open-instruct, the default): 1 / (trained tokens of the minibatch on all ranks), here 11 + 9
    # elsewhere
    assert R.Config().loss_norm == "batch"
    b = R.sequence_weights(lengths, groups, norm="batch", n_groups=2, n_tokens=20)
    assert b == pytest.approx([1 / 20] * 5 + [0.0])
    # Dr.GRPO: the constant 1 / (n_groups x G x max_new_tokens), however many responses of a group were
    # dropped
    dr = R.sequence_weights(lengths, groups, norm="dr_grpo", n_groups=2, group_size=4, max_len=8)
    assert dr == pytest.approx([1 / (2 * 4 * 8)] * 5 + [0.0])
    # grpo_loss sums weight x per-token loss; weight 0 tokens contribute nothing even if NaN
    z = torch.zeros(3)
    loss, _ = R.grpo_loss(torch.tensor([0.0, 0.0, float("nan")]), z, z, z, torch.tensor([1.0, -1.0, 1.0]),
                          torch.tensor([0.5, 0.25, 0.0]), eps_low=0.2, eps_high=0.28, beta=0.0, is_cap=2.0)
    assert float(loss) == pytest.approx(-0.5 + 0.25)


def test_k3_log_ratio_is_clamped():
    """log pi_ref - log pi_theta = 100: exp overflows fp32; k3 is taken at the clamp (40) and counted."""
    logp = torch.tensor([-100.0, -1.0, -0.5]).requires_grad_()
    ref = torch.tensor([0.0, -1.2, -90.0])  # q = 100, -0.2, -89.5
    z = torch.zeros(3)
    loss, diag = R.grpo_token_loss(logp, logp.detach(), logp.detach(), ref, z, eps_low=0.2, eps_high=0.28,
                                   beta=0.1, is_cap=2.0)
    q = [40.0, -0.2, -40.0]
    assert loss.tolist() == pytest.approx([0.1 * (math.exp(x) - x - 1) for x in q], rel=1e-5)
    assert diag["kl_clamped"].tolist() == [True, False, True]
    loss.sum().backward()
    assert (torch.isfinite(logp.grad).all()
            and logp.grad[1] == pytest.approx(0.1 * (1 - math.exp(-0.2)), rel=1e-5))


def test_top_p_with_truncated_is_is_refused():
    """The sampler's log-probs under top-p < 1 are those of the renormalised nucleus, pi_old is the full
    softmax: min(pi_old / pi_gen, C) would be biased, so the combination is refused."""
    with pytest.raises(R.DataError, match="--top-p 0.9"):
        R._check(R.Config(top_p=0.9), 1)
    R._check(R.Config(top_p=0.9, is_cap=0.0), 1)  # no IS correction: nothing to bias
    R._check(R.Config(top_p=1.0), 1)


def test_advantages_and_zero_variance_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 2.0]])
    adv, varied = R.group_advantages(r, eta=1e-6)
    # population std (ddof 0), as open-instruct
    std0 = math.sqrt(sum((x - 0.5) ** 2 for x in [1, 0, 0, 1]) / 4)
    assert adv[0].tolist() == pytest.approx([0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], rel=1e-5)
    assert adv[1].tolist() == [0.0] * 4
    std2 = math.sqrt((3 * 0.5 ** 2 + 1.5 ** 2) / 4)
    assert adv[2].tolist() == pytest.approx([-0.5 / std2] * 3 + [1.5 / std2], rel=1e-5)
    assert varied.tolist() == [True, False, True]
    unbiased, _ = R.group_advantages(r, eta=1e-6, ddof=1)
    assert unbiased[2].tolist() == pytest.approx([x * math.sqrt(3 / 4) for x in adv[2].tolist()], rel=1e-5)
    dr, _ = R.group_advantages(r, eta=1e-6, scale=False)
    assert dr[2].tolist() == pytest.approx([-0.5, -0.5, -0.5, 1.5])
    # a continuous penalty makes every group "varied"; the graded reward decides (dynamic sampling)
    penalised = torch.tensor([[-0.1, -0.3, 0.0, -0.2], [0.9, -0.1, 0.0, 0.0]])
    graded = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    _, varied = R.group_advantages(penalised, eta=1e-6, verifiable=graded)
    assert varied.tolist() == [False, True]


# ----------------------------------------------------------------------------------------------
# Rewards and prompts


def test_rewards_parts_and_bad_responses(monkeypatch):
    cfg = R.Config(format_bonus=0.2, stop_penalty=0.1, repetition_penalty=0.5, repetition_ngram=2)
    math_p = {"domain": "math", "answer": "12", "choices": None, "tests": None}
    choice_p = {"domain": "science", "answer": "B", "choices": {"A": "red", "B": "blue"}, "tests": None}
    code_p = {"domain": "code", "answer": None, "choices": None,
              "tests": [{"input": "2 3\n", "output": "5\n"}]}
    cases = [  # (problem, text, stopped)
        (math_p, "7 + 5 = 12 </think> 12", True),          # right, formatted
        (math_p, "7 + 5 = 12, so 12", True),                 # right but no </think>: 0
        (math_p, "think </think> 13", True),                 # wrong
        (math_p, "", False),                                 # empty, never stopped
        (math_p, "a </think>   ", True),                     # no answer after </think>
        (choice_p, "hmm </think> The answer is (B)", True),
        (code_p, "ok </think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```", True),
        (code_p, "ok </think>\n```python\nprint(0)\n```", True),
    ]
    toks = [[1, 2, 3]] * len(cases)
    toks[2] = [1, 2, 1, 2, 1, 2]  # repeated bigrams: 5 bigrams, 2 distinct -> 3/5 repeated
    s = R.score_responses([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases], toks, cfg)
    assert [x["is_correct"] for x in s] == [True, False, False, False, False, True, True, False]
    assert s[0]["reward"] == pytest.approx(1.2)
    assert s[1]["reward"] == pytest.approx(0.0)
    assert s[2]["reward"] == pytest.approx(0.2 - 0.5 * 3 / 5)
    assert s[3]["reward"] == pytest.approx(-0.1) and s[3]["empty"]
    assert s[4]["reward"] == pytest.approx(0.0) and not s[4]["is_format"]
    for x in s:  # the parts add up to the reward
        assert x["reward"] == pytest.approx(x["correct"] + x["format"] + x["stop"] + x["repetition"])

    def boom(*a, **k):
        raise RuntimeError("grader bug")
    monkeypatch.setattr(graders, "grade_math", boom)
    [bad] = R.score_responses([math_p], ["x </think> 12"], [True], [[1]], cfg)
    assert bad["grader_error"] and bad["correct"] == 0.0 and bad["reward"] == pytest.approx(0.2)


def test_prompt_loaders_real_schemas(tmp_path):
    ours = tmp_path / "ours.jsonl"
    ours.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "1+1?", "answer": "2", "domain": "math"},
        {"prompt": "no answer here", "domain": "math"},  # skipped and counted
        {"prompt": "Colour?", "choices": {"A": "red", "B": "blue"}, "answer": "B"},
        {"prompt": "Add", "tests": "assert add(1, 2) == 3", "domain": "code"}]) + "\n")
    deepscaler = tmp_path / "deepscaler.json"  # agentica-org/DeepScaleR-Preview-Dataset: a JSON list
    deepscaler.write_text(json.dumps([{"problem": "What is $2^3$?", "answer": "8", "solution": "..."}]))
    skywork = tmp_path / "skywork.jsonl"  # Skywork-OR1-RL-Data (verl schema), as JSON lines
    skywork.write_text("\n".join(json.dumps(r) for r in [
        {"data_source": "train-math-deepscaler", "prompt": [{"role": "user", "content": "Find x."}],
         "ability": "math", "reward_model": {"ground_truth": json.dumps(["\\frac{1}{2}"]), "style": "rule"},
         "extra_info": {"index": 0}},
        {"data_source": "LeetCode", "prompt": [{"role": "user", "content": "Write add."}], "ability": "code",
         "reward_model": {"ground_truth": json.dumps({"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}),
                          "style": "rule"}},
        {"data_source": "codeforces", "prompt": [{"role": "user", "content": "Sum."}], "ability": "code",
         "reward_model": {"ground_truth": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]}),
                          "style": "rule"}},
    ]) + "\n")
    logs = []
    probs = R.load_prompts(f"{ours},{deepscaler},{skywork}", log=logs.append)
    assert [p["domain"] for p in probs] == ["math", "science", "code", "math", "math", "code", "code"]
    assert "skipped 1 prompt records" in logs[0] and "no 'answer'" in logs[0]
    assert probs[3]["answer"] == "8" and probs[4]["answer"] == "\\frac{1}{2}"
    assert probs[5]["tests"] == [{"input": "1\n2", "output": "3", "fn_name": "add"}]
    assert E.run_tests("def add(a, b):\n    return a + b\n", probs[5]["tests"])
    assert probs[6]["tests"] == [{"input": "1 2\n", "output": "3\n"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "domain": "poetry", "answer": "1"}) + "\n")
    with pytest.raises(R.DataError, match=r"bad.jsonl: record 1: field 'domain'"):
        R.load_prompts(str(bad))
    with pytest.raises(R.DataError, match="not reachable"):  # tests run with HF_HUB_OFFLINE=1
        R.load_prompts("hub:deepscaler")


def test_demo_task_and_template(tiny):
    train, held = R.arithmetic_problems(20, 48, seed=0)
    assert len(train) == 352 and len(held) == 48 and not {p["id"] for p in train} & {p["id"] for p in held}
    tok = M.load_tokenizer(str(tiny))
    text = R.prompt_text({"prompt": "7", "domain": "math"}, tok, R.Config(system_prompt="", example_user=""))
    assert text == "<|im_start|>7<|im_end|><|im_start|><think>\n"
    text = R.prompt_text({"prompt": "7", "domain": "math"}, tok,
                         R.Config(system_prompt="", example_user="1", example_answer="<think> 1 </think> 1"))
    assert text == ("<|im_start|>1<|im_end|><|im_start|><think> 1 </think> 1<|im_end|><|im_start|>7<|im_end|>"
                    "<|im_start|><think>\n")
    # the prompts of a step are a function of the step: resume sees the same ones
    a = R.step_problems(train, 3, 4, seed=1)
    assert a == R.step_problems(train, 3, 4, seed=1) and a != R.step_problems(train, 4, 4, seed=1)


# ----------------------------------------------------------------------------------------------
# Log-probs: trainer vs sampler, chunked vs full


def test_trainer_logprobs_equal_sampler(tiny):
    model = M.load_model(str(tiny), dtype=torch.float32)
    prompts = [[12, 3, 13, 12, 14, 11], [12, 7, 7, 13, 12, 14, 11], [12, 1, 13]]
    for temperature in (1.0, 0.7):
        samples = GEN.generate(model, prompts, max_new_tokens=6, temperature=temperature, seed=3)
        seqs = [R.Sequence(p, s.tokens, s.logprobs, 1.0, 1.0, i)
                for i, (p, s) in enumerate(zip(prompts, samples))]
        rows = R.pack_rows(seqs, row_tokens=64)  # all three packed into one row
        assert rows["input_ids"].shape[0] == 1
        with torch.no_grad():
            logp = R.token_logprobs(model, rows, "cpu", temperature=temperature, chunk=5)
        on = rows["labels"] >= 0
        assert int(on.sum()) == sum(len(s.tokens) for s in samples)
        assert torch.allclose(logp[on], rows["gen"][on], atol=1e-4), (logp[on], rows["gen"][on])


def test_nan_logprobs_take_responses_out_of_the_loss():
    class Stub(torch.nn.Module):  # log-probs NaN at every label of the second sequence
        def forward(self, ids, doc_ids, labels, temperature, return_entropy, chunk_tokens):
            out = torch.zeros(labels.shape)
            out[rows["seq"] == 1] = float("nan")
            return out
    seqs = [R.Sequence([1, 2], [3, 4], [-0.1, -0.2], 1.0, 0.5, 0),
            R.Sequence([1], [5, 6], [-0.3, -0.4], -1.0, 0.5, 0)]
    rows = R.pack_rows(seqs, 64)
    d = type("D", (), {"device": torch.device("cpu")})()
    n = R._old_and_ref(Stub(), Stub(), rows, d, R.Config(), old=True)
    assert n == 1
    assert rows["weight"][rows["seq"] == 1].eq(0).all() and rows["weight"][rows["seq"] == 0].eq(0.5).all()
    assert torch.isfinite(rows["ref"]).all() and torch.isfinite(rows["old"]).all()


def test_pack_rows_layout():
    seqs = [R.Sequence([1, 2, 3], [4, 5], [-1.0, -2.0], 0.5, 0.1, 0),
            R.Sequence([6], [7], [-3.0], -0.5, 0.2, 1)]
    t = R.pack_rows(seqs, row_tokens=5)  # 5 + 2 tokens: two rows
    assert t["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert t["doc_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, -1, -1, -1]]
    assert t["labels"].tolist() == [[-100, -100, 4, 5, -100], [7, -100, -100, -100, -100]]
    assert (t["gen"][0, 2:4].tolist() == [-1.0, -2.0] and t["adv"][1, 0] == -0.5
            and t["weight"][1, 0] == pytest.approx(0.2))
    t2 = R.pack_rows(seqs, row_tokens=64)
    assert t2["doc_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1]] and t2["labels"][0, 5] == 7


# ----------------------------------------------------------------------------------------------
# Real runs


def test_tiny_model_learns_trivial_task(tiny, digits, tmp_path):
    """Reward = 1 for '</think> d' (d the prompt's digit) + 0.5 for the form; the random model rarely writes
    </think>. A short run must raise the held-out reward."""
    cfg = tiny_cfg(tiny, digits, tmp_path / "learn", eval_prompts=str(digits), steps=12, eval_samples=8,
                   beta=0.0, lr=3e-2)
    summary = R.train(cfg)
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert after["reward"] > before["reward"] + 0.1, (before, after, summary["rewards"])
    assert after["format"] > before["format"] + 0.2, (before, after)
    recs = read_metrics(tmp_path / "learn")
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("reward", "response_len", "kl", "entropy", "clip_frac", "is_weight_mean", "grad_norm",
                "gen_tok_s", "train_tok_s", "reward/format", "reward/stop", "accuracy/math", "groups_dropped",
                "memory_gb"):
        assert key in recs[0], key
    assert all(0 < r["memory_gb"] < 1e3 for r in recs)  # peak RSS on CPU, finite
    assert ((tmp_path / "learn" / "hf" / "model.safetensors").is_file()
            and (tmp_path / "learn" / "rl.png").is_file())
    M.load_model(str(tmp_path / "learn" / "hf"), dtype=torch.float32)


def test_one_process_keeps_one_copy_of_the_weights(tiny, digits, tmp_path, monkeypatch):
    """One process in fp32: policy and reference are plain modules (FSDP would shard and cast nothing, yet
    gather a second copy of the weights to generate and hold unsharded gradients across micro-batches), and
    rollouts sample from the very tensors AdamW updates (no fused generation copy): ~1 GB of the demo's
    peak RSS."""
    from torch.distributed.fsdp import FSDPModule
    seen, real_generate = [], R.generate

    def spy(model, prompts, **kw):
        seen.append((kw.get("fuse"), {p.data_ptr() for p in model.parameters()}))
        return real_generate(model, prompts, **kw)
    runs, real_setup = [], R._setup
    monkeypatch.setattr(R, "generate", spy)
    monkeypatch.setattr(R, "_setup", lambda cfg, d: runs.append(real_setup(cfg, d)) or runs[-1])
    R.train(tiny_cfg(tiny, digits, tmp_path / "one", steps=1, eval_prompts=str(digits), eval_samples=2))
    run = runs[0]
    assert not any(isinstance(m, FSDPModule) for net in (run.model, run.ref) for m in net.modules())
    trained = {p.data_ptr() for g in run.optimizer.param_groups for p in g["params"]}
    assert len(seen) == 3  # held-out before, the step's rollouts, held-out after
    assert all(fuse is False and ptrs == trained for fuse, ptrs in seen)
    assert not {p.data_ptr() for p in run.ref.parameters()} & trained  # the reference must not move with it


@pytest.mark.skipif(R._glibc() is None, reason="glibc's malloc only")
def test_trim_heap_gives_back_freed_blocks():
    """Blocks under the 8 MB mmap threshold live in the heap; freed between live ones they stay resident until
    trim_heap, which update_phase calls after each backward (the demo's peak: ~0.2 GB less)."""
    d = type("D", (), {"device": torch.device("cpu")})()
    R.tune_malloc(d)
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page  # noqa: E731
    blocks = [torch.ones(1 << 18) for _ in range(400)]  # 400 x 1 MB
    del blocks[::2]  # 200 MB of holes between live blocks
    before = rss()
    R.trim_heap(d)
    assert before - rss() > 100e6, (before, rss())


def test_all_equal_rewards_are_not_a_silent_update(tiny, digits, tmp_path):
    """Rewards that cannot differ (no bonus, no penalties, an unreachable answer): every group is dropped, the
    step says trained: false, and the weights do not move."""
    bad = tmp_path / "never.jsonl"
    bad.write_text(json.dumps({"prompt": "1", "answer": "123456789", "domain": "math"}) + "\n")
    cfg = tiny_cfg(tiny, bad, tmp_path / "flat", format_bonus=0.0, stop_penalty=0.0, repetition_penalty=0.0,
                   steps=1)
    R.train(cfg)
    [rec] = read_metrics(tmp_path / "flat")
    assert rec["trained"] is False and rec["groups_dropped"] == 4 and rec["kl"] is None
    a = M.load_model(str(tiny), dtype=torch.float32).state_dict()
    b = M.load_model(str(tmp_path / "flat" / "hf"), dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_graded_reward_decides_the_filter(tiny, tmp_path):
    """Unreachable answer, no format bonus, a stop penalty: total rewards differ (stopped or not) but no
    answer is ever right, so every group is dropped (DAPO keeps a group only when its answers' grades
    differ)."""
    bad = tmp_path / "never.jsonl"
    bad.write_text(json.dumps({"prompt": "1", "answer": "123456789", "domain": "math"}) + "\n")
    R.train(tiny_cfg(tiny, bad, tmp_path / "pen", format_bonus=0.0, stop_penalty=0.3, repetition_penalty=0.0,
                     steps=1))
    [rec] = read_metrics(tmp_path / "pen")
    assert rec["trained"] is False and rec["groups_dropped"] == 4, rec
    assert rec["groups_zero_variance"] < 4, rec  # the penalty varies in some group (the test's premise)
    assert rec["groups_zero_variance_graded"] == 4


def test_reference_update_and_lr_follow_their_schedule(tiny, tmp_path, monkeypatch):
    """No group is ever trainable; the soft reference update still runs every step, and the lr is the linear
    schedule of transformers' get_linear_schedule_with_warmup: step k (0-based) gets peak x
    (1 - k / steps)."""
    bad = tmp_path / "never.jsonl"
    bad.write_text(json.dumps({"prompt": "1", "answer": "123456789", "domain": "math"}) + "\n")
    calls, real = [], R.polyak_update
    monkeypatch.setattr(R, "polyak_update", lambda ref, pol, a: (calls.append(a), real(ref, pol, a)))
    R.train(tiny_cfg(tiny, bad, tmp_path / "sched", format_bonus=0.0, stop_penalty=0.0,
                     repetition_penalty=0.0, steps=3, ref_update_every=1, ref_alpha=0.6, lr=1e-2))
    recs = read_metrics(tmp_path / "sched")
    assert [r["trained"] for r in recs] == [False] * 3 and calls == [0.6] * 3
    assert [r["lr"] for r in recs] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])  # first = peak, last > 0


def test_resume_continues_exactly(tiny, digits, tmp_path, monkeypatch):
    kw = dict(steps=4, save_every=2, ref_update_every=1, minibatches=2, ppo_epochs=2, pack_tokens=40,
              micro_rows=2)
    R.train(tiny_cfg(tiny, digits, tmp_path / "full", **kw))
    real, calls = R.score_responses, []

    def crash_in_step_3(*a, **k):  # the run dies during step 3, after the step-2 checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(R, "score_responses", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        R.train(tiny_cfg(tiny, digits, tmp_path / "part", **kw))
    monkeypatch.setattr(R, "score_responses", real)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    assert (tmp_path / "part" / "reference" / "step_00000002").is_dir()
    R.train(tiny_cfg(tiny, digits, tmp_path / "part", **kw, resume=True))
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    for a, b in zip(full, part):
        assert a["reward"] == pytest.approx(b["reward"]) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)


def test_hybrid_model_runs_the_loop(digits, tmp_path):
    folder = make_tiny(tmp_path / "nemotron", "nemotron_h")
    assert M.read_config(folder).model_type == "nemotron_h"
    R.train(tiny_cfg(folder, digits, tmp_path / "hyb", steps=2, drop_zero_variance=False))
    recs = read_metrics(tmp_path / "hyb")
    assert len(recs) == 2 and recs[-1]["trained"] and math.isfinite(recs[-1]["kl"])
    M.load_model(str(tmp_path / "hyb" / "hf"), dtype=torch.float32)


def test_pass_rate_filter(tiny, digits, tmp_path):
    out = tmp_path / "kept.jsonl"
    R.pass_rate_filter(tiny_cfg(tiny, digits, tmp_path / "f", filter_k=4, filter_math="0-4",
                                filter_out=str(out)))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 10 and all(0 <= r["pass_rate"] <= 1 for r in rows)
    R.pass_rate_filter(tiny_cfg(tiny, digits, tmp_path / "f", filter_k=4, filter_math="4-4",
                                filter_out=str(out)))
    assert out.read_text() == ""  # the random model never gets all four right
    with pytest.raises(R.DataError, match="filter-math"):
        R._band("3", 4, "filter-math")


FAKE_ROLLOUTS = """
import sys
import train_rl as R

def fake_rollouts(model, tok, problems, cfg, *, n, temperature, seed):
    # deterministic responses: j // 2 = 0 right, else wrong; lengths vary with j; pi_gen = e^-2 per token
    out = []
    for p in problems:
        ids = tok.encode(R.prompt_text(p, tok, cfg))
        for j in range(n):
            text = " " * (j % 3) + "</think> " + str((int(p["answer"]) + j // 2) % 10)
            toks = tok.encode(text) + [13]
            out.append({"problem": p, "prompt": ids, "tokens": toks, "logprobs": [-2.0] * len(toks),
                        "text": text, "stopped": True})
    return out

R.rollouts = fake_rollouts
R.main(sys.argv[1:])
"""


def test_two_process_gloo_fsdp(tiny, digits, tmp_path):
    """The same rollouts (deterministic stand-ins for sampling) through 2 gloo ranks and through 1 process:
    the losses, gradient norms and final weights must agree (the loss normaliser counts tokens over both
    ranks, FSDP's gradient average is undone), and step 1's loss must be the GRPO formula on the tiny model's
    log-probs."""
    script = tmp_path / "fake_rl.py"
    script.write_text(FAKE_ROLLOUTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["--model", str(tiny), "--prompts", str(digits), "--system-prompt", "", "--example-user", "",
            "--max-new-tokens", "4", "--steps", "2", "--group-size", "4", "--prompts-per-step", "4",
            "--lr", "1e-2", "--ref-update-every", "1", "--save-every", "1", "--micro-rows", "3",
            "--eval-prompts", str(digits), "--eval-samples", "3", "--format-bonus", "0",
            "--repetition-penalty", "0"]
    runs = {}
    for name, launcher in (("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"]), ("one", [sys.executable])):
        res = subprocess.run(launcher + [str(script), *args, "--out", str(tmp_path / name)], env=env,
                             capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs[name] = read_metrics(tmp_path / name)
    two, one = runs["two"], runs["one"]
    assert [r["step"] for r in two] == [1, 2] and two[0]["groups"] == 4  # 2 prompts per rank, gathered
    assert json.loads((tmp_path / "two" / "heldout_after.json").read_text())["n"] == 30  # 10 x 3, split
    # step 1 by hand: pi_old = pi_theta (rho = 1), pi_ref = pi_theta (k3 = 0), rewards [1, 1, 0, 0] per group
    # -> A = +-0.5 / (0.5 + eta); L = sum_{i,t} -min(pi_old / pi_gen, 2) A_i / (all response tokens)
    model, tok = M.load_model(str(tiny), dtype=torch.float32), M.load_tokenizer(str(tiny))
    cfg = R.Config(system_prompt="", example_user="")
    problems = R.step_problems(R.load_prompts(str(digits)), 1, 4, seed=0)
    num, tokens = 0.0, 0
    for p in problems:
        ids = tok.encode(R.prompt_text(p, tok, cfg))
        for j in range(4):
            resp = tok.encode(" " * (j % 3) + "</think> " + str((int(p["answer"]) + j // 2) % 10)) + [13]
            logits = model(torch.tensor([ids + resp]))[0, len(ids) - 1:-1]  # (|o|, V)
            lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]  # (|o|,)
            adv = (1.0 if j < 2 else -1.0) * 0.5 / (0.5 + 1e-6)
            rho = (lp - lp.detach()).exp()  # 1, with the gradient of pi_theta
            num = num + (-(lp.detach() + 2.0).exp().clamp(max=2.0) * rho * adv).sum()
            tokens += len(resp)
    loss = num / tokens
    loss.backward()
    grad_norm = math.sqrt(sum(float(q.grad.pow(2).sum()) for q in model.parameters() if q.grad is not None))
    assert two[0]["loss"] == pytest.approx(float(loss), rel=1e-4)
    assert two[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-3)
    assert two[0]["trained_tokens"] == tokens
    for a, b in zip(two, one):
        assert a["trained"] and b["trained"]
        for key in ("loss", "grad_norm", "kl", "trained_tokens", "is_weight_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (key, a[key], b[key])
    wa = M.load_model(str(tmp_path / "two" / "hf"), dtype=torch.float32).state_dict()
    wb = M.load_model(str(tmp_path / "one" / "hf"), dtype=torch.float32).state_dict()
    w0 = M.load_model(str(tiny), dtype=torch.float32).state_dict()
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_help_lists_flags():
    res = subprocess.run([sys.executable, str(ROOT / "train_rl.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0
    for flag in ("--model", "--prompts", "--out", "--steps", "--group-size", "--prompts-per-step",
                 "--max-new-tokens", "--lr", "--beta", "--seed", "--resume"):
        assert flag in res.stdout
