"""Time model.py's hybrid (Mamba2 + attention) decoder against transformers on the same config and hardware.

    python -m bench hybrid                    # a ~22M-parameter Nemotron-H-style model, CPU, float32
    python -m bench hybrid --device cuda --dtype bfloat16 --contexts 256 1024 4096 16384

Prefill: one forward over a `prompt_len`-token prompt that fills the decode cache (the last position's
logits only, as in generation). Decode: greedy one-token steps after that prompt, `new_tokens` of them,
tokens/s over all rows. transformers runs its own forward with its default dynamic cache.
Context sweep: model.py's decode tokens/s after prompts of each length, for three layer patterns of the
same widths: the hybrid, the same with every attention layer turned Mamba, and attention only. A Mamba
layer's step costs the same at any context (a fixed-size state); an attention layer's grows with it.
Prints markdown tables; ratio > 1 means model.py is faster.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import model as M


def nemotron_h_config(pattern: str, vocab: int):
    import transformers
    return transformers.NemotronHConfig(
        vocab_size=vocab, hidden_size=512, hybrid_override_pattern=pattern, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=2048, mamba_num_heads=16, mamba_head_dim=64,
        ssm_state_size=64, n_groups=2, conv_kernel=4, chunk_size=128, max_position_embeddings=65536)


def build(pattern: str, args, folder: str, with_hf: bool):
    """(transformers model or None, our model) with the same random weights, via a saved HF folder."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_config(nemotron_h_config(pattern, args.vocab), dtype=dtype)
    hf.save_pretrained(folder)
    ours = M.load_model(folder, dtype=dtype, device=args.device)
    if not with_hf:
        return None, ours
    return hf.to(args.device).eval(), ours


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(setup, fn, repeats: int, device: str, warm_up: bool = True) -> float:
    """Median wall time of fn(setup()) over `repeats` runs (after one warm-up run); setup is not timed."""
    if warm_up:
        fn(setup())
    times = []
    for _ in range(repeats):
        state = setup()
        sync(device)
        t = time.perf_counter()
        fn(state)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- model.py: prefill fills a cache allocated once; decode is one-token steps through it

@torch.no_grad()
def ours_prefill(model, ids, extra: int, chunk: int | None = None):
    """Prefill, in pieces of `chunk` tokens if given (each continues the cache: bounded attention memory)."""
    cache = model.allocate_cache(ids.shape[0], ids.shape[1] + extra)
    for piece in ids.split(chunk or ids.shape[1], dim=1):
        hidden = model.hidden_states(piece, torch.zeros_like(piece), cache)
    return cache, model.logits(hidden[:, -1]).argmax(-1, keepdim=True)  # (B, 1) next token


@torch.no_grad()
def ours_decode(model, state, n: int):
    cache, token = state
    one_doc = torch.zeros_like(token)
    for _ in range(n):
        token = model.logits(model.hidden_states(token, one_doc, cache)[:, -1]).argmax(-1, keepdim=True)
    return token


# ---- transformers: its forward with its own cache, the way its generate calls it

@torch.no_grad()
def hf_prefill(hf, ids):
    out = hf(ids, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def hf_decode(hf, state, n: int):
    cache, token = state
    for _ in range(n):
        out = hf(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    return token


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--pattern", default="M-M*M-M-", help="hybrid_override_pattern of the benchmark model")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--prompt-len", type=int, default=512,
                   help="prompt length of the model.py vs transformers rows")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096],
                   help="context sweep prompt lengths")
    p.add_argument("--sweep-batch", type=int, default=8,
                   help="context sweep batch size (KV caches grow with it, the weights read per step do not)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="context sweep: prefill in pieces of this many tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="folder for metrics.jsonl (optional)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, new = args.device, args.new_tokens
    records = []

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(args.pattern, args, str(Path(tmp) / "hybrid"), with_hf=True)
        n_params = sum(t.numel() for t in ours.parameters())
        label = f"Nemotron-H-style `{args.pattern}` ({n_params / 1e6:.0f}M)"
        rows = []
        for batch in args.batches:
            ids = torch.randint(0, args.vocab, (batch, args.prompt_len), device=dev)
            t_hf = median_time(lambda: None, lambda _: hf_prefill(hf, ids), args.repeats, dev)
            t_ours = median_time(lambda: None, lambda _: ours_prefill(ours, ids, new), args.repeats, dev)
            rows.append((f"prefill b={batch}, {args.prompt_len} tokens", batch * args.prompt_len / t_hf,
                         batch * args.prompt_len / t_ours))
            t_hf = median_time(lambda: hf_prefill(hf, ids), lambda s: hf_decode(hf, s, new),
                               args.repeats, dev)
            t_ours = median_time(lambda: ours_prefill(ours, ids, new), lambda s: ours_decode(ours, s, new),
                                 args.repeats, dev)
            rows.append((f"decode b={batch}, after {args.prompt_len}", batch * new / t_hf,
                         batch * new / t_ours))
        del hf

        # context sweep: decode tokens/s after prompts of each length, three layer patterns
        patterns = {"hybrid": args.pattern, "Mamba only": args.pattern.replace("*", "M"),
                    "attention only": args.pattern.replace("M", "*")}
        sweep = {}
        for name, pattern in patterns.items():
            model = ours if pattern == args.pattern else build(pattern, args, str(Path(tmp) / name), False)[1]
            warm = torch.randint(0, args.vocab, (args.sweep_batch, 64), device=dev)
            ours_decode(model, ours_prefill(model, warm, 4), 4)
            for ctx in args.contexts:
                ids = torch.randint(0, args.vocab, (args.sweep_batch, ctx), device=dev)
                t = median_time(lambda: ours_prefill(model, ids, new, args.prefill_chunk),
                                lambda s: ours_decode(model, s, new), args.repeats, dev, warm_up=False)
                sweep[name, ctx] = args.sweep_batch * new / t
            del model

    cpu = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    hardware = torch.cuda.get_device_name() if dev == "cuda" else cpu
    print(f"\n{label}, {hardware}, {args.dtype}, torch {torch.__version__}, {date.today()}\n")
    print("| workload | transformers tok/s | model.py tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for workload, hf_tps, ours_tps in rows:
        print(f"| {workload} | {hf_tps:,.0f} | {ours_tps:,.0f} | {ours_tps / hf_tps:.2f} |")
        records.append(dict(workload=workload, transformers_tok_s=hf_tps, model_py_tok_s=ours_tps))
    print(f"\nmodel.py decode tok/s (batch {args.sweep_batch}, {new} steps) after a prompt of each length:\n")
    print("| context | " + " | ".join(f"{n} `{p}`" for n, p in patterns.items()) + " |")
    print("|---:|" + "---:|" * len(patterns))
    for ctx in args.contexts:
        print(f"| {ctx} | " + " | ".join(f"{sweep[n, ctx]:,.0f}" for n in patterns) + " |")
        records.append(dict(context=ctx, **{f"decode_tok_s_{n}": sweep[n, ctx] for n in patterns}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
