"""Multiple-choice items per second: retention.py's shared-context scoring (one prefill per context, its cache
copied to every choice) against lm-evaluation-harness-style per-choice scoring (context + choice as one row
per choice, no sharing), same model, same items, side by side in one run.

    python -m bench retention                                   # SmolLM2, 16 items each of 3 BIG-bench tasks
    python -m bench retention --tasks bigbench:logical_deduction --items 64 --device cuda --dtype bfloat16

Items come from the BIG-bench archive (retention.download_bigbench()) or any
task retention.py loads (--data task=path). The two sides alternate run by run; the table reports the median
of --repeats runs and the largest difference of a choice's log-prob between the two (a correctness check).
"""
import argparse
import os
import platform
import statistics
import time
from datetime import date

import torch

import model as M
import retention as R


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=M.DEFAULT_MODEL, help="model folder, hub id or the built-in default")
    p.add_argument("--tasks",
                   default="bigbench:emoji_movie,bigbench:logical_deduction,bigbench:hindu_knowledge",
                   help="comma list of multiple-choice tasks (retention.py names)")
    p.add_argument("--data", default="", help="local files: task=path[,task=path]")
    p.add_argument("--items", type=int, default=16, help="items per task (the first N)")
    p.add_argument("--num-fewshot", type=int, default=-1, help="shots; < 0 = the task's default")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward batch, both sides")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU; 0 = torch's default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = M.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    tok = M.load_tokenizer(args.model)
    local = dict(x.split("=", 1) for x in args.data.split(",") if x)
    cfg = R.Config(num_fewshot=args.num_fewshot)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        items = R.load_mc_task(task, cfg, local.get(task))[0][:args.items]
        reqs = [R.mc_requests(tok, it) for it in items]
        n_choices = sum(len(r) for r in reqs) / len(reqs)
        ctx_tokens = sum(len(r[0][0]) for r in reqs) / len(reqs)
        cont_tokens = sum(len(c) for r in reqs for _, c in r) / sum(len(r) for r in reqs)
        times = {True: [], False: []}
        scores = {}
        R.score_mc_items(model, tok, items[:2], batch_tokens=args.batch_tokens)  # warm-up
        for _ in range(args.repeats):
            for shared in (False, True):
                sync()
                t0 = time.perf_counter()
                scores[shared] = R.score_mc_items(model, tok, items, batch_tokens=args.batch_tokens,
                                                  shared=shared)
                sync()
                times[shared].append(time.perf_counter() - t0)
        diff = max(abs(a - b) for x, y in zip(scores[True], scores[False]) for a, b in zip(x, y))
        acc = sum(R.mc_outcome(it, s)["correct"] for it, s in zip(items, scores[True])) / len(items)
        per, sh = (len(items) / statistics.median(times[s]) for s in (False, True))
        rows.append((task, len(items), n_choices, ctx_tokens, cont_tokens, per, sh, diff, acc))
        print(f"{task}: per-choice {per:.2f} items/s, shared {sh:.2f} items/s ({sh / per:.2f}x), "
              f"max |dlogprob| {diff:.1e}")

    threads = torch.get_num_threads() if args.device == "cpu" else None
    where = (f"CPU: {cpu_name()}, {os.cpu_count()} cores, {threads} torch threads" if args.device == "cpu"
             else f"GPU: {torch.cuda.get_device_name()}")
    print(f"\n{where}, torch {torch.__version__}, {args.dtype}, {args.model}, {date.today().isoformat()}; "
          f"median of {args.repeats}, the two sides alternating.\n")
    print("| task | items | choices / item | context tokens | choice tokens | per-choice items/s "
          "| shared-context items/s | ratio | max abs Δ log-prob | acc (shared) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task, n, nc, ct, cc, per, sh, diff, acc in rows:
        print(f"| {task} | {n} | {nc:.1f} | {ct:.0f} | {cc:.1f} | {per:.2f} | {sh:.2f} | {sh / per:.2f}x "
              f"| {diff:.1e} | {100 * acc:.0f}% |")


if __name__ == "__main__":
    main()
