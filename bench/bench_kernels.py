"""Time the Triton kernels against their baselines on one CUDA GPU; print a markdown table.

    python -m bench kernels                      # bf16 correctness checks, then the timing table
    python -m bench kernels --seqlens 1024,4096 --head-dims 128 --skip-checks

Attention: causal, GQA (8 query heads per KV head), head dims 128 and 64, sequence 1k..16k at a
constant number of tokens per batch (batch = tokens // seqlen), forward and backward, against torch
SDPA's flash and cuDNN backends in the same run. TFLOP/s counts 4*b*s^2*h*d for the forward
(halved when causal) and 2.5x that for the backward; the backward time is (forward + backward) -
forward. Before timing it runs the correctness checks of tests/test_attention.py in bf16 (the CPU
interpreter cannot check bf16): kernel error vs fp64 <= 2 x (torch SDPA bf16 error vs fp64) + floor.

SSD (kernels/ssd.py): bf16 correctness of y, the final state and every gradient (kernel error vs an fp32
mamba.ssd_scan of the same bf16 inputs <= 2 x that of mamba.ssd_scan run on the bf16 tensors + floor,
relative to the largest reference value; determinism of the backward), then forward and forward+backward
times at Nemotron-H-8B's Mamba2 shapes (128 heads x head dim 64, 8 groups, state 128, chunk 128; softplus
Δ with dt_bias, D) for 16k..64k tokens per batch at --ssd-seqlen, against mamba.ssd_scan eager and
torch.compile'd and mamba_ssm's mamba_chunk_scan_combined when it imports. GB/s counts the unavoidable
traffic (read x, dt, B, C, write y; the backward also reads dy and writes dx, ddt, dB, dC); TFLOP/s counts
the chunked algorithm's matmuls once (C.B per group, the causal half of the chunk-local product, chunk
states and state outputs: 2*T*(g*Q*n + h*Q*p/2 + 2*h*p*n)), the backward as 2x the forward.
"""

import argparse
import datetime
import os
import sys
from dataclasses import dataclass

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
    only: str = "all"  # which section: all, attention or ssd
    ssd_tokens: str = "16384,32768,65536"  # SSD: comma-separated tokens per batch
    ssd_seqlen: int = 8192  # SSD: sequence length (batch = tokens // seqlen)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
# the checked and timed dtype (bench_gpu --dry-run: fp32, the interpreter's bf16 is wrong)
DTYPE = torch.bfloat16
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
        xs = [x.to(DTYPE) for x in (q, k, v, do)]
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
            q = torch.randn(b, hq, s, d, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=True)
            k = torch.randn(b, hkv, s, d, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=True)
            v = torch.randn(b, hkv, s, d, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=True)
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


# ----------------------------------------------------------------------------------------------
# SSD: bf16 correctness, then timing at Nemotron-H-8B's Mamba2 shapes
# ----------------------------------------------------------------------------------------------

NEMOTRON_H_8B = dict(h=128, p=64, g=8, n=128, chunk=128)  # mamba_num_heads, mamba_head_dim, n_groups, state
SSD_SHAPE = NEMOTRON_H_8B  # the timed shape (bench_gpu --dry-run: a tiny one)
COMPILE_BASELINE = True  # time torch.compile'd mamba.ssd_scan too (bench_gpu --dry-run: off, ~1 min of CPU)
SSD_CHECKS = [  # name, b, l, h, p, g, n, chunk, D kind, document cut points or None, initial state
    ("nemotron 8b shapes, l not /128", 1, 1000, 128, 64, 8, 128, 128, "h", None, False),
    ("docs + h0, g=1, D (h, p)", 2, 777, 8, 64, 1, 64, 64, "hp", (100, 256, 500), True),
    ("chunk 256, p 80, n 16, no D", 1, 600, 4, 80, 2, 16, 256, None, None, True),
]


def ssd_inputs(b, l, h, p, g, n, D_kind, device, seed=0):
    """fp32 random inputs of mamba_chunk_scan_combined's conventions (dt raw, softplus'd with dt_bias)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    return dict(x=r(b, l, h, p), dt=r(b, l, h) - 2.0, A=-torch.exp(r(h)), B=r(b, l, g, n), C=r(b, l, g, n),
                D={"h": r(h), "hp": r(h, p), None: None}[D_kind], dt_bias=r(h) * 0.5, h0=r(b, h, p, n),
                dy=r(b, l, h, p), dfinal=r(b, h, p, n))


def _ssd_grads(fn, v, chunk, seq_idx, use_h0):
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"] + (["h0"] if use_h0 else [])
    leaves = {k: v[k].detach().clone().requires_grad_() for k in names if v[k] is not None}
    y, final = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=chunk,
                  D=leaves.get("D"), dt_bias=leaves["dt_bias"], dt_softplus=True,
                  initial_states=leaves.get("h0"), seq_idx=seq_idx, return_final_states=True)
    loss = (y.float() * v["dy"].float()).sum() + (final.float() * v["dfinal"].float()).sum()
    return [y.detach(), final.detach(), *torch.autograd.grad(loss, list(leaves.values()))]


def ssd_correctness(cfg):
    import mamba
    from kernels import ssd as S

    os.environ["PRISM_SSD"] = "triton"
    cols = ("y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dh0")
    print("| check | relative error, kernel (mamba.ssd_scan on bf16) | ok |")
    print("|---|---|---|")
    failed = []
    for name, b, l, h, p, g, n, chunk, D_kind, cuts, use_h0 in SSD_CHECKS:
        v = ssd_inputs(b, l, h, p, g, n, D_kind, DEVICE)
        seq_idx = None
        if cuts is not None:
            pos = torch.arange(l, device=DEVICE)
            seq_idx = sum((pos >= c).long() for c in cuts)[None].repeat(b, 1)
        bf = {k: (t.to(DTYPE) if t is not None and k not in ("A", "dt_bias") else t) for k, t in v.items()}
        exact = _ssd_grads(mamba.ssd_scan, {k: (t.float() if t is not None else None) for k, t in bf.items()},
                           chunk, seq_idx, use_h0)
        torch_bf16 = _ssd_grads(mamba.ssd_scan, bf, chunk, seq_idx, use_h0)
        kernel = _ssd_grads(S.ssd_scan, bf, chunk, seq_idx, use_h0)
        again = _ssd_grads(S.ssd_scan, bf, chunk, seq_idx, use_h0)
        cells, ok = [], all(torch.equal(a, b_) for a, b_ in zip(kernel, again))  # deterministic backward
        used = [c for c in cols if not (c == "dD" and D_kind is None) and not (c == "dh0" and not use_h0)]
        for col, ker, ref, ex in zip(used, kernel, torch_bf16, exact):
            scale = ex.double().abs().max().item() + 1e-12
            err = (ker.double() - ex.double()).abs().max().item() / scale
            err_t = (ref.double() - ex.double()).abs().max().item() / scale
            ok &= bool(torch.isfinite(ker).all()) and err <= 2 * err_t + cfg.bf16_floor
            cells.append(f"{col} {err:.1e} ({err_t:.1e})")
        print(f"| {name} | " + ", ".join(cells) + f" | {'yes' if ok else 'NO'} |")
        if not ok:
            failed.append(name)
        del exact, torch_bf16, kernel, again
        torch.cuda.empty_cache()
    os.environ.pop("PRISM_SSD")
    return failed


def _ssd_impls():
    import mamba
    from kernels import ssd as S

    impls = {"ours (Triton)": S.ssd_scan, "mamba.ssd_scan eager": mamba.ssd_scan}
    if COMPILE_BASELINE:
        impls["mamba.ssd_scan compiled"] = torch.compile(mamba.ssd_scan, dynamic=False)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        impls["mamba_ssm combined"] = mamba_chunk_scan_combined
    except ImportError as e:
        print(f"  (mamba_ssm not importable: {e})", file=sys.stderr)
    return impls


def ssd_timing(cfg):
    """Rows (tokens, batch, impl, fwd ms, fwd+bwd ms, GB/s fwd, GB/s fwd+bwd, TFLOP/s fwd,
    TFLOP/s fwd+bwd)."""
    s = SSD_SHAPE
    h, p, g, n, Q = s["h"], s["p"], s["g"], s["n"], s["chunk"]
    os.environ["PRISM_SSD"] = "triton"
    rows = []
    for tokens in [int(t) for t in cfg.ssd_tokens.split(",")]:
        L = min(cfg.ssd_seqlen, tokens)
        b = max(1, tokens // L)
        T = b * L
        v = ssd_inputs(b, L, h, p, g, n, "h", DEVICE)
        bf = {k: (t.to(DTYPE) if k not in ("A", "dt_bias") else t) for k, t in v.items()}
        leaves = [bf[k].requires_grad_() for k in ("x", "dt", "B", "C")] + [v["A"].requires_grad_()]
        flops = 2 * T * (g * Q * n + h * Q * p / 2 + 2 * h * p * n)
        io_fwd = 2 * (2 * T * h * p + T * h + 2 * T * g * n)  # bf16: x, y, dt, B, C
        io_both = io_fwd + 2 * (2 * T * h * p + T * h + 2 * T * g * n)  # + dy, dx, ddt, dB, dC
        for name, fn in _ssd_impls().items():
            def fwd():
                return fn(bf["x"], bf["dt"], v["A"], bf["B"], bf["C"], chunk_size=Q, D=v["D"],
                          dt_bias=v["dt_bias"], dt_softplus=True)

            def fwd_bwd():
                torch.autograd.grad(fwd(), leaves, bf["dy"])
            try:
                with torch.no_grad():
                    fwd()
                    t_f = _time(fwd)
                t_b = _time(fwd_bwd)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                print(f"  ({name} refused {tokens} tokens: {str(e).splitlines()[0][:100]})", file=sys.stderr)
                rows.append((tokens, b, name) + (None,) * 6)
                torch.cuda.empty_cache()
                continue
            rows.append((tokens, b, name, t_f, t_b, io_fwd / t_f / 1e6, io_both / t_b / 1e6,
                         flops / t_f / 1e9, 3 * flops / t_b / 1e9))
            print(f"tokens {tokens} {name}: fwd {t_f:.2f} ms, fwd+bwd {t_b:.2f} ms", file=sys.stderr)
            torch.cuda.empty_cache()
    os.environ.pop("PRISM_SSD")
    return rows


def ssd_section(cfg):
    s = NEMOTRON_H_8B
    print(f"## SSD scan (kernels/ssd.py) — Nemotron-H-8B shapes: {s['h']} heads x {s['p']}, "
          f"{s['g']} groups, state {s['n']}, chunk {s['chunk']}\n")
    if not cfg.skip_checks:
        print("### bf16 correctness (relative max error vs fp32 reference; torch on bf16 in parentheses)\n")
        failed = ssd_correctness(cfg)
        print()
        if failed:
            print(f"**FAILED: {', '.join(failed)}**\n")
    print(f"### bf16, seqlen {cfg.ssd_seqlen}, softplus Δ + dt_bias + D\n")
    print("| tokens | batch | impl | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | fwd TFLOP/s "
          "| fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    f = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    for tokens, b, name, t_f, t_b, gf, gb, tf, tb in ssd_timing(cfg):
        print(f"| {tokens} | {b} | {name} | {f(t_f)} | {f(t_b)} | {f(gf, 0)} | {f(gb, 0)} | {f(tf, 1)} "
              f"| {f(tb, 1)} |")


def main():
    cfg = parse_args()
    if cfg.only not in ("all", "attention", "ssd"):
        sys.exit(f"python -m bench kernels: --only must be all, attention or ssd; got {cfg.only!r}")
    if not torch.cuda.is_available():
        sys.exit("python -m bench kernels: needs a CUDA GPU (torch.cuda.is_available() is False); the CPU "
                 "checks are `python -m pytest tests/test_attention.py`")
    try:
        import triton
    except ImportError:
        sys.exit("python -m bench kernels: needs triton (pip install 'triton>=3.6,<3.10')")
    card = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    print(f"# {card}, {now}, torch {torch.__version__}, triton {triton.__version__}\n")
    if cfg.only in ("all", "ssd"):
        ssd_section(cfg)
    if cfg.only == "ssd":
        return
    print("## Flash attention\n")
    if not cfg.skip_checks:
        print("### bf16 correctness (max abs error vs fp64; torch SDPA bf16 in parentheses)\n")
        failed = correctness(cfg)
        print()
        if failed:
            print(f"**FAILED: {', '.join(failed)}**\n")
    print(f"### causal, bf16, {cfg.group} query heads per KV head, {cfg.tokens} tokens per batch; TFLOP/s "
          f"(fwd 4bs²hd/2, bwd 2.5x)\n")
    print("| d | seq | batch | hq/hkv | ours fwd | ours bwd | SDPA flash fwd | flash bwd | SDPA cuDNN fwd "
          "| cuDNN bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d, s, b, hq, hkv, ours, fl, cu in timing(cfg):
        print(f"| {d} | {s} | {b} | {hq}/{hkv} | {fmt(ours[0])} | {fmt(ours[1])} | {fmt(fl[0])} "
              f"| {fmt(fl[1])} | {fmt(cu[0])} | {fmt(cu[1])} |")


if __name__ == "__main__":
    main()
