"""cli.py: the plumbing that every script shares: flags from a config dataclass (bools bare or with a value),
progress that writes whole lines into a log, and the runner counting only the problems a run asks for."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import cli
import evaluate as E
import generate as GEN

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Flags:
    resume: bool = False  # continue from the latest checkpoint
    steps: int = 3  # steps
    out: str = "out/x"  # output folder


@pytest.mark.parametrize("argv, resume", [
    (["--out", "runs/x", "--resume"], True),  # bare, as train_mid.py's docstring writes it
    (["--resume", "--out", "runs/x"], True),  # bare, followed by another flag
    (["--resume", "true", "--out", "runs/x"], True),
    (["--resume", "false"], False),
    (["--resume", "no"], False),
    ([], False),
])
def test_bool_flags_bare_or_with_a_value(argv, resume):
    cfg, _ = cli.parse_config(Flags, argv)
    assert cfg.resume is resume and cfg.steps == 3


def test_bool_flag_bad_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_config(Flags, ["--resume", "maybe"])
    assert e.value.code == 2 and "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_train_mid_resume_flag_bare_in_its_own_command_line():
    import train_mid as T
    cfg, _ = cli.parse_config(T.Config, ["--out", "runs/x", "--resume"])
    assert cfg.resume is True and cfg.out == "runs/x"


def test_progress_in_a_pipe_writes_lines_not_carriage_returns(tmp_path):
    """A log file or pipe (CI, nohup) gets whole lines, not a carriage-return update per step."""
    code = ("import cli, time\n"
            "bar = cli.progress(total=50, desc='work')\n"
            "for _ in range(50):\n    bar.update(1)\n"
            "bar.close()\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # bytes: text mode would turn \r into \n
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "\r" not in err
    lines = [x for x in err.split("\n") if x.startswith("work")]
    assert 1 <= len(lines) <= 3, err  # the first and the last state, not one per update
    assert "50/50" in lines[-1]


class _Tok:
    eos_ids = [0]

    def encode(self, text, bos=False):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()

    def apply_chat_template(self, messages):
        return messages[0]["content"]


def test_limit_counts_only_the_requested_problems(tmp_path, monkeypatch):
    """A run with --limit 1 into the folder of an earlier run over every problem scores one problem."""
    def fake_generate(model, prompts, *, max_new_tokens, temperature, top_p, stop_ids, seed, progress,
                      on_rows_done=None):
        return [GEN.Sample(list(b"\\boxed{7}") + [0], [0.0] * 10) for _ in prompts]
    monkeypatch.setattr(E, "generate", fake_generate)
    data = Path(__file__).parent / "data" / "gsm8k.jsonl"
    n_all = sum(1 for line in data.read_text().splitlines() if line.strip())
    assert n_all >= 2
    common = dict(tasks="gsm8k", data=f"gsm8k={data}", samples=1, max_new_tokens=16, out=str(tmp_path),
                  progress=False)
    full = E.evaluate(E.Config(**common), model=object(), tokenizer=_Tok())
    assert full["gsm8k"]["n"] == n_all
    one = E.evaluate(E.Config(limit=1, **common), model=object(), tokenizer=_Tok())
    assert one["gsm8k"]["n"] == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["gsm8k"]["n"] == 1
