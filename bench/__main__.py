"""One entry point for every benchmark: `python -m bench NAME [flags]`; `python -m bench NAME --help` lists
a benchmark's flags. Each prints a markdown table naming the machine and the date, its baseline side by side.

    model       model.py vs transformers: forward+backward, fixed-length and chat-shaped generation
    hybrid      hybrid (Mamba2 + attention) decoder vs transformers: prefill and decode
    evaluate    a GSM8K evaluation: model.generate vs a transformers generate loop, problems/s
    retention   multiple-choice scoring: shared-context prefill vs per-choice rows
    train_mid   one FSDP training step vs transformers wrapped the same way
    rl          one GRPO step (rollout, update) vs a TRL-like transformers loop
    kernels     the Triton kernels vs torch SDPA / the PyTorch scan (a CUDA GPU)
    gpu         one GPU session: kernel correctness + speed, train_mid MFU, decode, an RL step
                (--dry-run: CPU)
"""
import runpy
import sys

NAMES = ("model", "hybrid", "evaluate", "retention", "train_mid", "rl", "kernels", "gpu")


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    name = sys.argv.pop(1)
    sys.argv[0] = f"python -m bench {name}"
    runpy.run_module(f"bench.bench_{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
