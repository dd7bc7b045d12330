"""study.py end to end at --scale tiny (a random 2-layer model, 1-2 steps per stage): every stage's outputs,
finite metrics, the report; a second run skips every stage; a changed setting re-runs only what it affects."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import study as S

ROOT = Path(__file__).resolve().parent.parent


def run_study(*args, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    p = subprocess.run([sys.executable, str(ROOT / "study.py"), *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    if check and p.returncode != 0:
        raise AssertionError(f"study.py {' '.join(map(str, args))} failed ({p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def stage_lines(stdout: str) -> dict:
    """stage -> 'skipped' / 'ran' from the study's progress lines."""
    out = {}
    for line in stdout.splitlines():
        for name in S.STAGES:
            if f" {name}: complete, skipped" in line:
                out[name] = "skipped"
            elif f" {name}: starting" in line or f" {name}: resuming" in line:
                out[name] = "ran"
    return out


def numbers(x, where=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{where}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield where, x


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    first = run_study("--scale", "tiny", "--out", out)
    return out, first


def test_tiny_study_outputs(tiny):
    out, first = tiny
    assert (set(stage_lines(first.stdout).values()) == {"ran"}
            and len(stage_lines(first.stdout)) == len(S.STAGES))
    for name in S.STAGES:
        assert (out / name / "stage.json").is_file(), name
    for name in ("mid_math", "mid_mc", "rl_base", "rl_math", "rl_mc", "merge"):
        assert (out / name / "hf" / "config.json").is_file(), name
    assert list((out / "mid_mc").glob("hf-step*")), "no mid-training checkpoints along the way"
    steps = json.loads((out / "rl_mc" / "stage.json").read_text())["result"]["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    res = json.loads((out / "results.json").read_text())
    for where, v in numbers(res):
        assert math.isfinite(v), f"results.json{where} = {v}"
    rows = {r["task"]: r for r in res["retention_rows"]}
    for task in ("rl_task", "gsm8k", "bigbench:strategyqa", "ppl:math", "ppl:code", "ruler_niah_single@256"):
        assert task in rows, sorted(rows)
        assert all("score" in v and math.isfinite(v["score"]) for v in rows[task]["values"]), rows[task]
    w = res["analysis"]["weights"]
    assert w["base->mid_mc"]["fp32"]["total"]["changed"]["0.001"] > 0  # mid-training moved the weights
    # the tiny base stops at random, so GRPO's stop penalty varies and RL really trains
    assert w["mid_mc->rl_mc"]["fp32"]["total"]["rel_change"] > 0
    # the last RL checkpoint, exported by study.py from DCP, is the policy train_rl exported itself
    last = json.loads((out / "analysis" / "trajectory" / "rl_mc"
                       / "trajectory.json").read_text())["checkpoints"][-1]
    final = json.loads((out / "analysis" / "weights" / "mid_mc_to_rl_mc"
                        / "weights.json").read_text())["total"]
    assert last["rel_change"] == pytest.approx(final["rel_change"], rel=1e-6)
    verdicts = [f["verdict"] for f in res["findings"]]
    assert len(verdicts) == 7 and set(verdicts) <= {S.HOLDS, S.FAILS, S.UNMEASURABLE}
    report = (out / "REPORT.md").read_text()
    assert "| finding | paper | ours | verdict |" in report and report.count("\n| ") >= 7 + 7
    assert "cores" in report and "Date:" in report
    for png in ("headline.png", "weights.png", "trajectory.png", "retention.png"):
        assert (out / png).stat().st_size > 1000, png


def test_second_run_skips_and_a_change_reruns_only_what_it_affects(tiny):
    out, _ = tiny
    stamps = {n: (out / n / "stage.json").stat().st_mtime_ns for n in S.STAGES}
    again = run_study("--scale", "tiny", "--out", out)
    assert set(stage_lines(again.stdout).values()) == {"skipped"}, again.stdout
    assert stamps == {n: (out / n / "stage.json").stat().st_mtime_ns for n in S.STAGES}
    changed = run_study("--scale", "tiny", "--out", out, "--cka-bootstrap", 2)
    ran = {n for n, v in stage_lines(changed.stdout).items() if v == "ran"}
    assert ran == {"analysis", "report"}, changed.stdout


def test_which_stages_a_setting_invalidates():
    """Changing the RL steps invalidates RL, evaluation, analysis and the report, never mid-training."""
    a = S.parse_args(["--scale", "tiny"])
    b = dataclasses.replace(a, rl_steps=a.rl_steps + 1)
    stale = {n for n in S.STAGES if S.stage_settings(n, a) != S.stage_settings(n, b)}
    assert stale == {"rl_base", "rl_math", "rl_mc", "eval", "analysis", "report"}
    c = dataclasses.replace(a, mid_steps=a.mid_steps + 1)
    stale = {n for n in S.STAGES if S.stage_settings(n, a) != S.stage_settings(n, c)}
    assert stale == {"mid_math", "mid_mc", "rl_math", "rl_mc", "merge", "eval", "analysis", "report"}
    assert S.parse_args(["--scale", "tiny", "--rl-steps", "5"]).rl_steps == 5  # a flag wins over the scale


@pytest.mark.parametrize("args", [["--scale", "huge"], ["--model", "/no/such/model"]])
def test_bad_input_one_line_exit_2(args, tmp_path):
    p = run_study(*args, "--out", tmp_path / "s", check=False)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("study.py: error:"), p.stderr
