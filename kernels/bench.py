"""Time the Triton kernels against their baselines on one CUDA GPU; print a markdown table.

    python kernels/bench.py                      # bf16 correctness checks, then the timing table
    python kernels/bench.py --seqlens 1024,4096 --head-dims 128 --skip-checks

Attention: causal, GQA (8 query heads per KV head), head dims 128 and 64, sequence 1k..16k at a
constant number of tokens per batch (batch = tokens // seqlen), forward and backward, against torch
SDPA's flash and cuDNN backends in the same run. TFLOP/s counts 4*b*s^2*h*d for the forward
(halved when causal) and 2.5x that for the backward; the backward time is (forward + backward) -
forward. Before timing it runs the correctness checks of tests/test_attention.py in bf16 (the CPU
interpreter cannot check bf16): kernel error vs fp64 <= 2 x (torch SDPA bf16 error vs fp64) + floor.
"""

import argparse
import datetime
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


@dataclass
class Config:
    seqlens: str = "1024,2048,4096,8192,16384"  # comma-separated sequence lengths
    tokens: int = 16384  # tokens per batch: batch = tokens // seqlen
    head_dims: str = "128,64"  # comma-separated head dims
    q_heads_x_dim: int = 2048  # query heads * head dim (16 heads at d 128, 32 at d 64)
    group: int = 8  # query heads per KV head
    skip_checks: bool = False  # skip the bf16 correctness checks
    bf16_floor: float = 5e-3  # absolute floor of the 2x rule in bf16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in Config.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        if field.type is bool or field.type == "bool":
            parser.add_argument(flag, action="store_true", help=f"default {field.default}")
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), field.type)
            parser.add_argument(flag, type=kind, default=field.default, help=f"default {field.default}")
    return Config(**vars(parser.parse_args()))


# ----------------------------------------------------------------------------------------------
# correctness in bf16 (the interpreter cannot check bf16)
# ----------------------------------------------------------------------------------------------

def naive(q, k, v, *, causal, scale, window, doc_ids):
    """Softmax attention written out (fp64 here), independent of kernels/attention.py's masks."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    i = torch.arange(t, device=q.device)[:, None] + (s - t)
    j = torch.arange(s, device=q.device)[None, :]
    ok = torch.ones(b, 1, t, s, dtype=torch.bool, device=q.device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= (i - j < window) if causal else ((i - j).abs() < window)
    if doc_ids is not None:
        ok &= (doc_ids[:, s - t:, None] == doc_ids[:, None, :])[:, None]
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1) @ v


def packed_docs(b, lengths, pad, device):
    ids = [doc for doc, n in enumerate(lengths) for _ in range(n)] + [-1] * pad
    return torch.tensor(ids, device=device)[None].repeat(b, 1)


def _grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    return [o.detach(), *torch.autograd.grad(o, (q, k, v), do)]


DEVICE = "cuda"
CHECKS = [  # name, b, hq, hkv, t, s, d, kwargs (doc_ids as (lengths, padding))
    ("causal d128 gqa8", 2, 16, 2, 1000, 1000, 128, dict(causal=True)),
    ("full d64 gqa2", 1, 4, 2, 777, 777, 64, dict(causal=False)),
    ("window d96 gqa4", 1, 8, 2, 900, 900, 96, dict(causal=True, window=129)),
    ("window sym d80", 1, 4, 4, 500, 500, 80, dict(causal=False, window=100)),
    ("docs+pad d128", 2, 8, 1, 1100, 1100, 128, dict(causal=True, doc_ids=((300, 500, 250), 50))),
    ("docs+window d64", 1, 8, 2, 1024, 1024, 64, dict(causal=True, window=200, doc_ids=((512, 400), 112))),
    ("prefill t<s docs d128", 1, 8, 2, 300, 1300, 128, dict(causal=True, doc_ids=((700, 600), 0))),
    ("d256", 1, 4, 2, 513, 513, 256, dict(causal=True)),
]


def correctness(cfg):
    from kernels import attention as A

    dev = DEVICE
    os.environ["PRISM_ATTENTION"] = "triton"
    print("| check | " + " | ".join(f"{n} err (torch)" for n in ("o", "dq", "dk", "dv")) + " | ok |")
    print("|---|---|---|---|---|---|")
    failed = []
    for name, b, hq, hkv, t, s, d, kw in CHECKS:
        if "doc_ids" in kw:
            kw = dict(kw, doc_ids=packed_docs(b, *kw["doc_ids"], dev))
        g = torch.Generator(device=dev).manual_seed(0)
        q, do = (torch.randn(b, hq, t, d, device=dev, generator=g) for _ in range(2))
        k, v = (torch.randn(b, hkv, s, d, device=dev, generator=g) for _ in range(2))
        kw = dict(kw, scale=0.9 * d ** -0.5, window=kw.get("window"), doc_ids=kw.get("doc_ids"))
        exact = _grads(naive, *(x.double() for x in (q, k, v, do)), **kw)
        xs = [x.bfloat16() for x in (q, k, v, do)]
        torch_bf16 = _grads(A.attention_reference, *xs, **kw)
        kernel = _grads(A.attention, *xs, **kw)
        cells, ok = [], True
        for ker, ref, ex in zip(kernel, torch_bf16, exact):
            err = (ker.double() - ex).abs().max().item()
            err_t = (ref.double() - ex).abs().max().item()
            ok &= bool(torch.isfinite(ker).all()) and err <= 2 * err_t + cfg.bf16_floor
            cells.append(f"{err:.1e} ({err_t:.1e})")
        # determinism: a second backward gives the same bits
        again = _grads(A.attention, *xs, **kw)
        ok &= all(torch.equal(a, b_) for a, b_ in zip(kernel, again))
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if ok else 'NO'} |")
        if not ok:
            failed.append(name)
        del exact, torch_bf16, kernel, again
        if dev == "cuda":
            torch.cuda.empty_cache()
    os.environ.pop("PRISM_ATTENTION")
    return failed


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def _time(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)  # ms, median


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def bench_one(fn, q, k, v, do, flops_fwd):
    """(fwd TFLOP/s, bwd TFLOP/s) or (None, None) if the backend refuses the shape."""
    try:
        fn(q, k, v)
        fwd = _time(lambda: fn(q, k, v))

        def fwd_bwd():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)
        both = _time(fwd_bwd)
    except RuntimeError as e:  # e.g. a backend that does not take this head dim / dtype
        print(f"  ({getattr(fn, '__name__', fn)} refused: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None, None
    bwd = max(both - fwd, 1e-6)
    return flops_fwd / fwd / 1e9, 2.5 * flops_fwd / bwd / 1e9


def timing(cfg):
    from kernels import attention as A

    flash, cudnn = _sdpa("flash"), _sdpa("cudnn")
    rows = []
    for d in [int(x) for x in cfg.head_dims.split(",")]:
        hq = max(cfg.group, cfg.q_heads_x_dim // d)
        hkv = hq // cfg.group
        for s in [int(x) for x in cfg.seqlens.split(",")]:
            b = max(1, cfg.tokens // s)
            g = torch.Generator(device=DEVICE).manual_seed(0)
            q = torch.randn(b, hq, s, d, device=DEVICE, dtype=torch.bfloat16, generator=g, requires_grad=True)
            k = torch.randn(b, hkv, s, d, device=DEVICE, dtype=torch.bfloat16, generator=g, requires_grad=True)
            v = torch.randn(b, hkv, s, d, device=DEVICE, dtype=torch.bfloat16, generator=g, requires_grad=True)
            do = torch.randn_like(q)
            flops = 4 * b * s * s * hq * d / 2  # causal
            # SDPA baselines get K/V already expanded to every query head (outside the timing):
            # not every backend takes GQA, and this is what a model without GQA support would do
            ke = k.detach().repeat_interleave(cfg.group, 1).requires_grad_()
            ve = v.detach().repeat_interleave(cfg.group, 1).requires_grad_()
            ours = bench_one(lambda q_, k_, v_: A.attention(q_, k_, v_, causal=True), q, k, v, do, flops)
            fl = bench_one(flash, q, ke, ve, do, flops)
            cu = bench_one(cudnn, q, ke, ve, do, flops)
            rows.append((d, s, b, hq, hkv, ours, fl, cu))
            print(f"d {d} s {s}: ours {ours} flash {fl} cudnn {cu}", file=sys.stderr)
            del q, k, v, do, ke, ve
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows


def fmt(x):
    return "n/a" if x is None else f"{x:.0f}"


def main():
    cfg = parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels/bench.py: needs a CUDA GPU (torch.cuda.is_available() is False); the CPU "
                 "checks are `python -m pytest tests/test_attention.py`")
    try:
        import triton
    except ImportError:
        sys.exit("kernels/bench.py: needs triton (pip install 'triton>=3.6,<3.10')")
    card = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    print(f"## Flash attention — {card}, {now}, torch {torch.__version__}, triton {triton.__version__}\n")
    if not cfg.skip_checks:
        print("### bf16 correctness (max abs error vs fp64; torch SDPA bf16 in parentheses)\n")
        failed = correctness(cfg)
        print()
        if failed:
            print(f"**FAILED: {', '.join(failed)}**\n")
    print(f"### causal, bf16, {cfg.group} query heads per KV head, {cfg.tokens} tokens per batch; TFLOP/s "
          f"(fwd 4bs²hd/2, bwd 2.5x)\n")
    print("| d | seq | batch | hq/hkv | ours fwd | ours bwd | SDPA flash fwd | flash bwd | SDPA cuDNN fwd | cuDNN bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d, s, b, hq, hkv, ours, fl, cu in timing(cfg):
        print(f"| {d} | {s} | {b} | {hq}/{hkv} | {fmt(ours[0])} | {fmt(ours[1])} | {fmt(fl[0])} | {fmt(fl[1])} "
              f"| {fmt(cu[0])} | {fmt(cu[1])} |")


if __name__ == "__main__":
    main()
