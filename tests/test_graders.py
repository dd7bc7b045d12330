"""graders.py: the math and multiple-choice graders on a table of cases (and against Math-Verify, a
test-only reference), every symbolic comparison bounded in time, and the code sandbox under hostile
programs."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import graders as GR

DATA = Path(__file__).parent / "data"

# ----------------------------------------------------------------------------------------------
# Math grader: (response, gold, verdict)

MATH_CASES = [
    # extraction: boxed / fbox / nested braces / last one wins
    ("The answer is \\boxed{42}.", "42", True),
    ("\\boxed{42}", "42", True),
    ("so \\fbox{17}", "17", True),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{{5}}", "5", True),
    ("First \\boxed{5}, but wait, recheck: \\boxed{7}", "5", False),
    ("First \\boxed{5}, but wait, recheck: \\boxed{7}", "7", True),
    ("We get \\boxed{5} at first. Hmm, that is wrong. The answer is 7.", "5", False),
    ("We get \\boxed{5} at first. Hmm, that is wrong. The answer is 7.", "7", True),
    ("The answer is 3. Actually \\boxed{4}", "4", True),
    ("$\\boxed{ 12 }$", "12", True),
    ("\\boxed 9", "9", True),
    ("\\boxed{2^{10}}", "1024", True),
    ("\\boxed{x^{2}+1}", "x^2+1", True),
    ("\\boxed{}", "0", False),
    ("\\boxed{5", "5", False),
    ("no answer at all", "5", False),
    ("", "5", False),
    ("I think 5", "5", False),  # no fallback by default
    # #### and "the answer is"
    ("16 - 3 - 4 = 9, 9 * 2 = 18\n#### 18", "18", True),
    ("#### 1,234", "1234", True),
    ("#### 18\n#### 19", "18", False),
    ("The answer is 18.", "18", True),
    ("The final answer is $18$.", "18", True),
    ("Final answer: 18", "18", True),
    ("the answer is: 2.5.", "5/2", True),
    ("The answer is 18 dollars.", "18", True),
    ("So the answer is 1/2", "12", False),
    ("So the answer is 12", "1/2", False),
    # integers with commas or spaces
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1{,}000}", "1000", True),  # LaTeX's {,} thousands separator (Math-Verify agrees)
    ("\\boxed{1\\,000}", "1000", True),
    ("\\boxed{1 000 000}", "1000000", True),
    ("\\boxed{12,345.5}", "12345.5", True),
    ("\\boxed{1000}", "1,000", True),
    ("\\boxed{100}", "1,000", False),
    # decimals
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{.5}", "0.5", True),
    ("\\boxed{0.5}", "5", False),
    ("\\boxed{5}", "0.5", False),
    ("\\boxed{2.50}", "2.5", True),
    ("\\boxed{3.0}", "3", True),
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    ("\\boxed{0.05}", "0.5", False),
    ("\\boxed{-0.25}", "-\\frac14", True),
    # fractions
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{\\tfrac34}", "0.75", True),
    ("\\boxed{3/4}", "\\frac{3}{4}", True),
    ("\\boxed{6/8}", "\\frac{3}{4}", True),
    ("\\boxed{1/2}", "12", False),
    ("\\boxed{12}", "1/2", False),
    ("\\boxed{\\frac{1}{2}}", "\\frac{2}{1}", False),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", True),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", False),
    ("\\boxed{\\frac{10}{4}}", "\\frac52", True),
    ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}", True),
    # percentages, degrees, units, money
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{50}", "50\\%", True),
    ("\\boxed{50\\%}", "5", False),
    ("\\boxed{336}", "336^\\circ", True),
    ("\\boxed{336^\\circ}", "336^\\circ", True),
    ("\\boxed{336^{\\circ}}", "336", True),
    ("\\boxed{33}", "336^\\circ", False),
    ("\\boxed{36}", "336^\\circ", False),
    ("\\boxed{3360}", "336^\\circ", False),
    ("\\boxed{90°}", "90", True),
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{5 \\text{cm}^2}", "5", True),
    ("\\boxed{5\\mbox{ inches}}", "5", True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{\\$18.00}", "18", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{\\textbf{12}}", "12", True),
    # leading x =, negative signs
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{x=3}", "x = 3", True),
    ("\\boxed{k=-2}", "-2", True),
    ("\\boxed{-2}", "2", False),
    ("\\boxed{2}", "-2", False),
    ("\\boxed{−7}", "-7", True),
    ("\\boxed{+7}", "7", True),
    ("\\boxed{- 7}", "-7", True),
    ("\\boxed{y = 2x + 3}", "2x+3", True),
    ("\\boxed{y = 3 + 2x}", "2x+3", True),
    ("\\boxed{y=2x+4}", "2x+3", False),
    # \left( \right), tuples, intervals, sets
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
    ("\\boxed{(1,2)}", "(2,1)", False),
    ("\\boxed{(3, -1)}", "(3,-1)", True),
    ("\\boxed{(\\frac12, 3)}", "(0.5,3)", True),
    ("\\boxed{[1, 2)}", "[1,2)", True),
    ("\\boxed{(1, 2]}", "[1,2)", False),
    ("\\boxed{[1,2]}", "(1,2)", False),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", True),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3)", False),
    ("\\boxed{(-\\infty,1)\\cup(2,\\infty)}", "(-\\infty, 1) \\cup (2, \\infty)", True),
    ("\\boxed{(-\\infty,1)\\cup(3,\\infty)}", "(-\\infty, 1) \\cup (2, \\infty)", False),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", True),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", False),
    ("\\boxed{2, -3}", "-3, 2", True),
    ("\\boxed{2, 3}", "2, -3", False),
    ("\\boxed{(1,2,3)}", "(1,2)", False),
    ("\\boxed{1,2}", "(1,2)", True),  # the pair without its parentheses, in order (as Math-Verify)
    # sqrt, pi, symbolic
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt2", True),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\boxed{\\sqrt[3]{8}}", "2", True),
    ("\\boxed{2\\pi}", "2 \\pi", True),
    ("\\boxed{\\pi}", "3.14", False),
    ("\\boxed{6.28}", "2\\pi", False),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac12\\pi", True),
    ("\\boxed{\\pi r^2}", "r^2\\pi", True),
    ("\\boxed{4\\pi}", "2\\pi", False),
    ("\\boxed{2π}", "2\\pi", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{(x+1)^2}", "x^2+1", False),
    ("\\boxed{x^2 - 1}", "(x-1)(x+1)", True),
    ("\\boxed{\\frac{x}{2}}", "0.5x", True),
    ("\\boxed{2^{10}+1}", "1025", True),
    ("\\boxed{3 \\cdot 4}", "12", True),
    ("\\boxed{3 \\times 5}", "12", False),
    ("\\boxed{10^{100000}}", "1", False),  # a huge power is refused quickly
    ("\\boxed{2^{2^{2^{2^{2}}}}}", "0", False),
    ("\\boxed{a+b}", "b+a", True),
    ("\\boxed{a-b}", "b-a", False),
    ("\\boxed{xy}", "yx", True),
    ("\\boxed{\\infty}", "\\infty", True),
    ("\\boxed{\\text{no solution}}", "\\text{No solution}", True),
    ("\\boxed{__import__('os')}", "0", False),
    # GSM8K-style plain with words
    ("She makes 9 * 2 = $18 every day.\nThe answer is $18.", "18", True),
    ("The answer is 18 apples.", "18", True),
    ("The answer is 180.", "18", False),
    ("The answer is 1.8", "18", False),
    ("The answer is 3. Then we check that 4 works too.", "3", True),
    ("The answer is 3.5. Done.", "3.5", True),
    ("The answer is $\\frac{1}{2}$.", "0.5", True),
    ("\\boxed{5x}", "5", False),
    ("\\boxed{5 \\text{ or } 6}", "5", False),
    ("\\boxed{5, 6}", "5", False),
    # AIME-style integers with leading zeros
    ("\\boxed{070}", "70", True),
    ("\\boxed{007}", "7", True),
    ("\\boxed{70}", "7", False),
    # gold parsed with the same care
    ("\\boxed{18}", "Janet sells 9 eggs. 9 * 2 = 18\n#### 18", True),
    ("\\boxed{18}", "so $\\boxed{18}$", True),
    ("\\boxed{17}", "#### 18", False),
]

THINK_CASES = [
    ("<think>it is 5</think> The answer is \\boxed{5}.", "5", True),
    ("<think>\\boxed{5}</think> so \\boxed{6}", "5", False),
    ("<think>\\boxed{5}</think> so \\boxed{6}", "6", True),
    ("<think>thinking... \\boxed{5}", "5", False),  # never closed: no credit
    ("\\boxed{5}", "5", False),  # no think block at all
    ("reasoning (the <think> tag was in the prompt) </think> \\boxed{5}", "5", True),
    ("<think>a</think> b <think> \\boxed{5}", "5", False),  # reopened after closing
    ("<think>a</think><think>b</think>\\boxed{5}", "5", True),
    ("<think>the answer is 5</think>", "5", False),  # nothing after the think block
]

CHOICES = {"A": "Nitrogen", "B": "Oxygen", "C": "Argon", "D": "Carbon dioxide"}
CHOICE_CASES = [
    ("The answer is (B).", "B", True),
    ("(B)", "B", True),
    ("B)", "B", True),
    ("I pick B) Oxygen", "B", True),
    ("Answer: B", "B", True),
    ("Answer: B", "C", False),
    ("answer: **C**", "C", True),
    ("Answer: (D)", "D", True),
    ("\\boxed{B}", "B", True),
    ("\\boxed{(B)}", "B", True),
    ("\\boxed{\\text{B}}", "B", True),
    ("$\\boxed{A}$", "B", False),
    ("Option (A) is tempting but (C) is right. Answer: C", "C", True),
    ("Option (A) is tempting but (C) is right. Answer: C", "A", False),
    ("(A) looks wrong; (B) too; so (D)", "D", True),
    ("\\boxed{A} hmm, no. \\boxed{C}", "C", True),
    ("\\boxed{A} hmm, no. \\boxed{C}", "A", False),
    ("The final answer is C.", "C", True),
    ("C", "C", True),
    ("C.", "C", True),
    ("Some reasoning.\n**B**", "B", True),
    ("A", "B", False),
    ("A or B, hard to say", "A", False),
    ("A good question. It is hard.", "A", False),  # "A" as an article is not a choice
    ("", "A", False),
    ("The gas is mostly nitrogen.\nNitrogen", "A", True),  # the choice text itself
    ("Answer: Oxygen", "B", True),
    ("\\boxed{Argon}", "C", True),
    ("Answer: Helium", "A", False),
    ("The answer is E", "A", False),
    ("The answer is a bit unclear, but (B) fits.", "B", True),
    ("The answer: Both A and C are wrong, so D)", "D", True),
    ("ANSWER: C", "C", True),
]
THINK_CHOICE_CASES = [
    ("<think>maybe (A)</think> Answer: B", "B", True),
    ("<think>Answer: B", "B", False),
    ("<think>Answer: B</think> hmm", "B", False),
]


@pytest.fixture(scope="module")
def sympy_helper_started():
    """The first symbolic comparison starts the helper process (imports sympy: seconds on a busy machine);
    the time bound below is about each comparison, not that start-up."""
    assert GR.check_math("\\boxed{x+1}", "1+x")


@pytest.mark.parametrize("response,gold,verdict", MATH_CASES)
def test_check_math(response, gold, verdict, sympy_helper_started):
    t0 = time.perf_counter()
    assert GR.check_math(response, gold) is verdict
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("response,gold,verdict", THINK_CASES)
def test_check_math_think(response, gold, verdict):
    assert GR.check_math(response, gold, think=True) is verdict


@pytest.mark.parametrize("response,gold,verdict", CHOICE_CASES)
def test_check_choice(response, gold, verdict):
    choices = CHOICES if any(w in response for w in ("itrogen", "Oxygen", "Argon", "Helium")) else None
    assert GR.check_choice(response, gold, choices=choices) is verdict


@pytest.mark.parametrize("response,gold,verdict", THINK_CHOICE_CASES)
def test_check_choice_think(response, gold, verdict):
    assert GR.check_choice(response, gold, think=True) is verdict


def test_case_count():
    n = len(MATH_CASES) + len(THINK_CASES) + len(CHOICE_CASES) + len(THINK_CHOICE_CASES)
    assert n >= 150, n


def test_fallback_only_when_allowed():
    assert not GR.check_math("so we get 18\nin all 18", "18")
    assert GR.check_math("so we get 3\nin all 18 eggs", "18", fallback=True)
    assert not GR.check_math("so we get 18\nthen 19", "18", fallback=True)


@pytest.mark.parametrize("gold", ["", "   ", "\\boxed{}", "#### ", None, [1], "$$"])
def test_unparsable_gold_is_an_error(gold):
    with pytest.raises(GR.DataError):
        GR.check_math("\\boxed{5}", gold)


@pytest.mark.parametrize("gold", ["", "AB", "b", "5", None])
def test_bad_gold_letter_is_an_error(gold):
    with pytest.raises(GR.DataError):
        GR.check_choice("Answer: A", gold)


def test_graders_in_threads():  # the RL reward calls them from worker threads (no SIGALRM there)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: GR.check_math(c[0], c[1]) is c[2], MATH_CASES))
    assert all(got)


# ----------------------------------------------------------------------------------------------
# Sandbox

TIMEOUT = 2.0


def _run(program, tests="pass", timeout=TIMEOUT, memory_mb=512):
    t0 = time.perf_counter()
    ok, reason = GR.run_tests_detailed(program, tests, timeout, memory_mb=memory_mb)
    return ok, reason, time.perf_counter() - t0


def test_sandbox_passes_and_fails():
    assert GR.run_tests("def f(x):\n    return x + 1\n", "assert f(1) == 2")
    assert not GR.run_tests("def f(x):\n    return x\n", "assert f(1) == 2")
    assert GR.run_tests("print(int(input()) * 2)",
                        [{"input": "3\n", "output": "6\n"}, {"input": "-1", "output": "-2"}])
    ok, reason, _ = _run("print(int(input()) * 2)",
                         [{"input": "3\n", "output": "6"}, {"input": "4", "output": "9"}])
    assert not ok and "test 2/2" in reason and "wrong output" in reason
    assert GR.run_tests("print(0.30000000000000004)", [{"input": "", "output": "0.3"}])
    assert not GR.run_tests("print(0.31)", [{"input": "", "output": "0.3"}])
    assert not GR.run_tests("", "pass") and not GR.run_tests("pass", [])
    assert not GR.run_tests("syntax error here", "pass")
    assert GR.run_tests("class Solution:\n    def add(self, a, b):\n        return a + b\n",
                       [{"input": "1\n2", "output": "3", "fn_name": "add"}])


@pytest.mark.parametrize("name,program,expect", [
    ("infinite loop", "while True:\n    pass\n", "limit"),
    ("sleep", "import time\ntime.sleep(60)\n", "time limit"),
    ("50 GB", "x = bytearray(50 * 10**9)\n", "memory limit"),
    ("print 1 GB", "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)\n", "output limit"),
    ("write 1 GB file", "with open('big', 'w') as f:\n    while True:\n"
                        "        f.write('x' * 10**6)\n", "exit"),
    ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                  "        pass\n", "limit"),
    ("detached child", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n"
                       "    time.sleep(60)\n", "time limit"),
])
def test_sandbox_hostile_programs(name, program, expect):
    ok, reason, dt = _run(program)
    assert not ok and expect in reason, (name, reason)
    assert dt < TIMEOUT + 3, (name, dt)


def test_sandbox_leaves_the_outside_alone(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for program in (f"import os\nos.remove({str(keep)!r})\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                    f"open({str(keep)!r}, 'w').write('gone')\n",
                    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                    "os.killpg(0, signal.SIGKILL)\n"):
        ok, reason, _ = _run(program, "assert False")
        assert not ok
    assert keep.read_text() == "precious"
    before = set(os.listdir(GR.tempfile.gettempdir()))
    _run("open('scratch', 'w').write('x')\n")
    assert not {f for f in set(os.listdir(GR.tempfile.gettempdir())) - before
                if f.startswith("eval_sandbox_")}


def test_sandbox_keeps_its_files_to_itself(tmp_path):
    # /tmp, /var/tmp and /dev/shm are world-writable and shared with the host: `nobody` alone does not
    # stop a program leaving files there. Every place a program could reach must stay clean.
    out_dir = tmp_path / "eval_out"  # stands for the evaluator's own --out folder
    out_dir.mkdir()
    out_dir.chmod(0o777)  # even a folder the program may write on the host
    mark = f"leak_{os.getpid()}_{time.time_ns()}"
    host_home = Path(os.path.expanduser("~"))
    places = ["/tmp", "/var/tmp", "/dev/shm", str(host_home), str(out_dir)]
    program = (f"import os\nplaces = {places!r} + [os.environ.get('HOME', '.'), "
               "os.path.dirname(os.getcwd())]\n"
               f"for d in places:\n    try:\n        open(os.path.join(d, {mark!r}), 'w').write('x')\n"
               "    except OSError:\n        pass\n"
               # its own work dir works
               "open('scratch', 'w').write('ok')\nassert open('scratch').read() == 'ok'\n"
               # and a private /tmp
               "import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'ok')\n")
    ok, reason, _ = _run(program, "pass")
    assert ok, reason
    parent = Path(GR.tempfile.gettempdir())  # the work dir's parent on the host
    left = sorted({str(Path(d) / mark) for d in places + [str(parent)] if (Path(d) / mark).exists()})
    for f in left:
        os.remove(f)
    if not _mount_namespaces_work() and os.environ.get("CI") != "true":
        pytest.skip(f"no mount namespace on this machine: the program's /tmp is the host's (leaked: {left})")
    assert not left, f"the program left files on the host: {left}"
    assert GR.SANDBOX.get("private_mounts"), GR.SANDBOX


def test_sandbox_runs_an_interpreter_that_lives_in_tmp(monkeypatch):
    """CI's venv is /tmp/prism-ci-venv: the fresh /tmp of the sandbox must not hide the interpreter."""
    venv = Path(tempfile.mkdtemp(prefix="sandbox_venv_", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        monkeypatch.setattr(GR.sys, "executable", str(venv / "bin" / "python"))
        monkeypatch.setattr(GR.sys, "prefix", str(venv))
        monkeypatch.setattr(GR.sys, "exec_prefix", str(venv))
        ok, reason, _ = _run("print(6 * 7)", "pass")
        assert ok, reason
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def _mount_namespaces_work() -> bool:  # asked of the OS directly, not of the code under test
    for extra in ([], ["--user", "--map-root-user"]):
        try:
            cmd = ["unshare", *extra, "--mount", "--pid", "--fork", "sh", "-c", "mount -t tmpfs tmpfs /tmp"]
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    return False


def test_sandbox_network():
    ok, reason, _ = _run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n")
    if GR.SANDBOX.get("unshare"):
        assert not ok, reason  # a new network namespace has no route anywhere
    else:
        pytest.skip("unshare is not available here: the network is not isolated")


def test_run_many_in_parallel():
    jobs = [("while True:\n    pass\n", "pass")] * 2 + [("x = 1\n", "assert x == 1")] * 4
    t0 = time.perf_counter()
    got = GR.run_many(jobs, workers=6, timeout_s=1.5, memory_mb=512)
    assert [ok for ok, _ in got] == [False, False, True, True, True, True]
    assert time.perf_counter() - t0 < 8


# ----------------------------------------------------------------------------------------------
# Every symbolic comparison is bounded in time, from any thread


@pytest.mark.parametrize("in_thread", [False, True])
def test_pathological_answer_is_bounded(in_thread):
    # 9^{9^{9}} makes sympy build a 370-million-digit integer in C: SIGALRM cannot stop it, nor reach a thread
    from concurrent.futures import ThreadPoolExecutor
    GR.check_math("\\boxed{2}", "\\sqrt{4}")  # a helper started outside the timing
    job = lambda: GR.check_math("\\boxed{9^{9^{9}}}", "\\sqrt{5}", timeout_s=1.0)  # noqa: E731
    t0 = time.perf_counter()
    if in_thread:
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(job).result(timeout=30)
    else:
        got = job()
    assert got is False and time.perf_counter() - t0 < 1.0 + 1.5
    assert GR.check_math("\\boxed{2}", "\\sqrt{4}")  # and the grader still works afterwards


# ----------------------------------------------------------------------------------------------
# Agreement with Math-Verify (the grader behind open-r1 / lighteval), a test-only reference

# Deliberate differences (see graders.py's module docstring): only the last \boxed counts (Math-Verify
# joins all of them into a set); \log_b x is not parsed.
MV_KNOWN = {"special-273"}


def test_check_math_agrees_with_math_verify():
    try:
        from math_verify import parse, verify
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("math-verify is missing under CI (pip install -r requirements-test.txt)")
        pytest.skip("math-verify is not installed")
    rows = [json.loads(line) for line in (DATA / "math_verify_cases.jsonl").read_text().splitlines() if line]
    assert (len(rows) >= 150
            and {True, False} <= {bool(verify(parse("$" + r["gold"] + "$"), parse(r["response"])))
                                  for r in rows[:40]})
    differ = []
    for r in rows:
        ref = bool(verify(parse("$" + r["gold"] + "$"), parse(r["response"])))
        if GR.check_math(r["response"], r["gold"]) != ref:
            differ.append(f"{r['id']}: math-verify {ref}, gold {r['gold']!r}, "
                          f"response ...{r['response'][-50:]!r}")
    print(f"{len(rows) - len(differ)}/{len(rows)} agree; differ:\n" + "\n".join(differ))
    assert len(differ) <= 0.05 * len(rows), "\n".join(differ)
