"""Answer graders and the code sandbox: is this response right? The evaluation's scores (evaluate.py) and
GRPO's rewards (train_rl.py) both come from here. The standard library and cli.py's DataError only (sympy
runs in a helper process): the file copies with cli.py alone.

Graders:
    check_math(response, gold) -> bool          last \\boxed{} / "####" / "The answer is", then equivalence
    check_choice(response, gold_letter) -> bool  "(B)", "B)", "Answer: B", "\\boxed{B}", the choice text
    run_tests(program, tests, timeout_s) -> bool  sandboxed subprocess; run_tests_detailed -> (passed, reason)
With the paper's `<think> ... </think> answer` format only the text after `</think>` is graded
(`strip_think`); a response whose think block never closes gets no credit.
check_math agrees with Math-Verify (open-r1 / lighteval's grader) on 98.6% of
tests/data/math_verify_cases.jsonl; `--grader math-verify` uses Math-Verify itself (if installed). Deliberate
differences, against reward hacking or for plain correctness: only the last \\boxed counts (Math-Verify joins
several into a set); no answer is taken from unmarked prose (Math-Verify takes the last number); an unparsable
gold never rewards; "x > 2" and "(2, \\infty)" agree either way round (Math-Verify: only with the interval as
gold); a decimal with >= 4 places counts when it is the exact gold rounded to those places (Math-Verify: 6);
\\log_b x is not parsed. Every sympy step runs in a helper process killed after timeout_s (from any thread, C
code included).

Sandbox (run_tests): a fresh temp dir (removed afterwards), a new session killed as a whole, new mount,
network and PID namespaces via `unshare` where the OS allows it (all processes die with it; in the mount
namespace the file system is read-only but for the temp dir, and /tmp, /var/tmp, /dev/shm are fresh
private tmpfs, so nothing a program writes outlives it), setrlimit on address space, CPU time, file size
(caps the output, which goes to files) and processes, and, when the evaluator runs as root, the program
runs as `nobody`. Without a mount namespace (a RuntimeWarning says so) the network + PID namespaces and
`nobody` remain, but /tmp, /var/tmp and /dev/shm are the host's. `SANDBOX` says which are active here.
"""
from __future__ import annotations

import json
import math
import os
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
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

from cli import DataError


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
        # Minerva: "Final Answer: The final answer is $5$."
        while (inner := _ANSWER_IS.match(re.sub(r"^the\s+(?=final)", "", ans, flags=re.I))) is not None:
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
    s = (s.replace("\n", " ").replace("\\$", "").replace("$", "").replace("π", "\\pi").replace("−", "-")
         .replace("°", ""))
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
    for cmd in ("text", "textbf", "mathrm", "mathbf", "textrm", "mbox", "textnormal", "operatorname",
                "mathit"):
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


def to_number(s: str):
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
    # this file imports the standard library only, so the helper starts in well under a second
    code = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); " \
           "import graders; graders._sympy_serve()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
    ready, _, _ = select.select([proc.stdout], [], [], HELPER_START_S)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("graders: the sympy helper process did not start")
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
        return len(pa) == len(pb) and oa == ob and all(math_equal(x, y, timeout_s=timeout_s)
                                                       for x, y in zip(pa, pb))
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
    na, nb = to_number(a), to_number(b)
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
        raise RuntimeError("--grader math-verify needs the math-verify package: "
                           "pip install math-verify") from e
    main = threading.current_thread() is threading.main_thread()  # its time limits use SIGALRM
    limits = {} if main else {"parsing_timeout": None}
    gold_parsed = parse("$" + parse_gold(gold) + "$", **limits)
    return bool(verify(gold_parsed, parse(response, **limits), **({} if main else {"timeout_seconds": None})))


def check_math(response: str, gold, *, think: bool = False, fallback: bool = False,
               timeout_s: float = 2.0) -> bool:
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
                strong += [(m.start(), k) for k, v in choices.items()
                           if _choice_text_norm(v) == _choice_text_norm(got[0])]
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


def check_choice(response: str, gold_letter: str, *, choices: dict | None = None,
                 think: bool = False) -> bool:
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
                args = ([exe] + extra + (["--mount"] if mounts else [])
                        + ["--net", "--pid", "--fork", "--kill-child"])
                args += ["--mount-proc"] if mounts else []
                try:
                    if mounts:
                        works = sh is not None and _mount_wrapper_works(args, sh)
                    else:
                        works = subprocess.run(args + ["true"], capture_output=True,
                                               timeout=10).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    works = False
                if works:
                    info.update(unshare=True, private_mounts=mounts, unshare_args=args, sh=sh)
                    break
            if info["unshare"]:
                break
    if not info["private_mounts"]:
        import warnings
        warnings.warn("graders.run_tests: no private mount namespace here (unshare --mount failed); programs "
                      "share /tmp, /var/tmp and /dev/shm with this machine", RuntimeWarning, stacklevel=3)
    info["prlimit"] = shutil.which("prlimit") if sys.platform.startswith("linux") else None
    info["run_as_nobody"] = (hasattr(os, "geteuid") and os.geteuid() == 0
                             and shutil.which("setpriv") is not None)
    return info


SANDBOX = {}  # filled on first use: {"unshare": network + PID namespace, "private_mounts": mount namespace
#   (read-only file system, private /tmp /var/tmp /dev/shm), "run_as_nobody": ..., "prlimit": path}
_SANDBOX_LOCK = threading.Lock()
NOBODY = 65534
OUTPUT_CAP = 16 << 20  # bytes of stdout / stderr / any file a program may write


def sandbox_info() -> dict:
    with _SANDBOX_LOCK:
        if not SANDBOX:
            SANDBOX.update(_probe_sandbox())
    return SANDBOX


# The command: `unshare` (new mount + network + PID namespaces) -> `sh _MOUNT_SCRIPT` (private mounts)
# -> `prlimit` (CPU, address space, file size, core, processes) -> `setpriv` (as root: become nobody)
# -> python. Without prlimit the same limits are set in a preexec_fn (not fork-safe with threads in
# theory, hence prlimit first).
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
    info = sandbox_info()
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
    with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
            open(paths["stderr"], "wb") as ferr:
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
        if (rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
                or rc == -signal.SIGKILL and "MemoryError" not in err):
            reason = ("CPU time limit" if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
                      else f"killed (exit {rc})")
        elif rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or os.path.getsize(paths["stdout"]) >= OUTPUT_CAP:
            reason = f"output limit ({OUTPUT_CAP >> 20} MB)"
        elif "MemoryError" in err:
            reason = f"memory limit ({memory_mb} MB)"
        else:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            reason = f"exit code {rc}" + (f": {last[:200]}" if last else "")
    return rc, out, err, reason


def _outputs_match(got: str, expected: str) -> bool:
    """Line/token comparison: trailing whitespace ignored, numbers equal within 1e-6
    (relative or absolute)."""
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
        if sandbox_info()["run_as_nobody"]:
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
    """[(program, tests), ...] -> [(passed, reason), ...], many programs at once
    (threads over subprocesses)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda j: run_tests_detailed(j[0], j[1], timeout_s, memory_mb=memory_mb), jobs))


def extract_code(response: str):
    """The last ```python ...``` (or ``` ... ```) block; the whole text if it has no fence but
    looks like code."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", response, re.DOTALL | re.IGNORECASE)
    if blocks:
        return blocks[-1]
    m = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)$", response, re.DOTALL | re.IGNORECASE)
    if m:  # an unclosed fence (cut off): take what is there
        return m.group(1)
    return response if re.search(r"^\s*(def |import |from |class |print\()", response, re.M) else None
