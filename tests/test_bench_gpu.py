"""`python -m bench gpu --dry-run` runs every part of the GPU session script end to end on CPU (tiny shapes,
fp32, interpreted kernels), so the script is known to work before a GPU session spends its minutes on it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_dry_run(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in --dry-run, before the kernels load
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu", "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| part ")]
    for part in ("correctness", "attention", "ssd", "train", "decode", "rl"):
        assert any(r.startswith(f"| {part} |") for r in rows), f"no {part} row in:\n{table}"
    assert "ERROR" not in table and "**NO**" not in table, table
