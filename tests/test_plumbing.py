"""cli.py: the plumbing that every script shares: flags from a config dataclass (bools bare or with a value),
progress that writes whole lines into a log, the runner counting only the problems a run asks for, the one
reader of data files; and the project's import layers (imports go one way, `import model` stays light)."""
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
    monkeypatch.setattr(E, "prepare_generation", lambda model: model)
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


def test_one_reader_of_data_files_names_the_file(tmp_path):
    """cli.read_records is the one reader of a user's data files (evaluate, retention, train_rl and analyze
    go through it): rows with their file and number, and a DataError naming the file for what it cannot
    read."""
    import analyze as A
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n\n{"text": "b", "n": 2}\n')
    assert cli.read_records(good) == [(good, 1, {"text": "a"}), (good, 2, {"text": "b", "n": 2})]
    assert E.read_records is cli.read_records
    cases = {"cut.jsonl": ('{"text": "a"}\n{"text": \n', "cut.jsonl: line 2 is not JSON"),
             "bad.json": ('[{"text": "a"},', r"bad.json: not valid JSON \(.*line 1\)"),
             "list.jsonl": ('["a"]\n', "list.jsonl: record 1 is not an object"),
             "notes.txt": ("a\n", "notes.txt: unsupported file type")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(cli.DataError, match=message):
            cli.read_records(tmp_path / name)
    (tmp_path / "mixed.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(cli.DataError, match=r"mixed.jsonl: record 2: field 'text' should be a string"):
        A.read_jsonl(tmp_path / "mixed.jsonl", ("text",))
    with pytest.raises(cli.DataError, match=r"good.jsonl: record 1: field 'question' is missing"):
        A.read_jsonl(good, ("text", "question"))
    with pytest.raises(cli.DataError, match=r"cut.jsonl: line 2 is not JSON"):
        A.read_jsonl(tmp_path / "cut.jsonl", ("text",))
    assert [r["text"] for r in A.read_jsonl(good, ("text",))] == ["a", "b"]


def test_process_group_is_left_after_a_finished_run_and_after_an_error(monkeypatch):
    """cli.process_group (train_mid.train, train_rl.train and its filter): the group is gone when the block
    ends, also when it raised, and the error reaches the caller."""
    import torch.distributed as dist
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)  # setup_distributed sets them: undone after the test
    with cli.process_group("cpu") as d:
        assert dist.is_initialized() and (d.rank, d.world, d.own_group) == (0, 1, True)
    assert not dist.is_initialized()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(cli.DataError, match="bad data"):
        with cli.process_group("cpu"):
            raise cli.DataError("bad data")
    assert not dist.is_initialized()


# The layers of the project, lowest first: a file imports (at module level) only files of lower layers, so a
# user copying one file takes only what is below it. kernels/, cli.py and tokenizer.py import nothing of it.
LAYERS = {"kernels": 0, "cli": 0, "tokenizer": 0, "graders": 1, "gguf_convert": 1, "mamba": 1, "model": 2,
          "generate": 3, "train_mid": 4, "evaluate": 4, "retention": 5, "train_rl": 5, "analyze": 5,
          "study": 6}
# the imports made inside a function, each with its reason
LAZY_UPWARD = {("model", "generate"): "model.generate and `python model.py` are generate.py's, loaded on use"}


def _project_imports(path: Path) -> list:
    """(imported project file, at module level?) for each import of a project file in `path`."""
    import ast
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [(n.split(".")[0], node.col_offset == 0) for n in names if n.split(".")[0] in LAYERS]
    return found


def test_imports_go_one_way():
    files = {p.stem: p for p in ROOT.glob("*.py")} | {"kernels": ROOT / "kernels"}
    assert set(LAYERS) <= set(files)
    for name, layer in LAYERS.items():
        paths = [files[name]] if files[name].is_file() else sorted(files[name].glob("*.py"))
        for path in paths:
            for dep, top in _project_imports(path):
                if dep == name:
                    continue
                assert LAYERS[dep] < layer or (not top and (name, dep) in LAZY_UPWARD), \
                    f"{path.name} imports {dep} (layer {LAYERS[dep]} >= {layer})"


def test_importing_model_leaves_tokenizer_and_gguf_unloaded():
    """`import model` costs the model's own code: the tokenizer (tiktoken), the GGUF conversion and
    generate.py load when first used."""
    code = ("import sys, model\n"
            "print(sorted(m for m in ('tiktoken', 'gguf', 'tokenizer', 'gguf_convert', 'generate', 'graders')"
            " if m in sys.modules))\n"
            "model.load_tokenizer\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
