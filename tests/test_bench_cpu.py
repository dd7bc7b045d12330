"""Every CPU benchmark (`python -m bench NAME`) runs end to end at its smallest settings and prints its table,
so a change to the code a benchmark drives cannot leave the benchmark broken until someone next measures
(bench rl once called train_rl.sequence_weights with arguments it had dropped). Speeds are not checked here."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALLEST = {
    "model": ["--only", "smollm2", "--gen-only", "--gen-batches", "1", "--prompt-len", "4", "--new-tokens", "2",
              "--chat-new-tokens", "2", "--repeats", "1", "--compile", "off"],
    "evaluate": ["--problems", "2", "--batch-size", "2", "--max-new-tokens", "4"],
    "retention": ["--items", "2", "--repeats", "1"],
    "hybrid": ["--prompt-len", "8", "--new-tokens", "2", "--batches", "1", "--contexts", "16", "--repeats", "1"],
    "train_mid": ["--seq-len", "32", "--batch-size", "1", "--repeats", "1"],
    "rl": ["--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "4", "--repeats", "1"],
}


@pytest.mark.parametrize("name", list(SMALLEST))
def test_cpu_benchmark_runs_and_prints_its_table(name, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "bench", name, *SMALLEST[name]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|") and "---" not in line]
    assert len(rows) >= 2, proc.stdout[-4000:]  # a header and at least one measured row
