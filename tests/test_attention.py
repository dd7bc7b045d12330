"""kernels/attention.py on CPU: the Triton kernels under TRITON_INTERPRET=1 (fp32 and fp16; bf16 is
wrong in the interpreter and is checked on the GPU by bench/bench_kernels.py) against a naive fp64 softmax
attention and against torch SDPA in the same dtype.

Acceptance: max|kernel - fp64| <= 2 * max|torch same dtype - fp64| + floor, for O, dQ, dK, dV.
"""

import os
import sys

# the interpreter is chosen when triton's functions are defined: triton must not be imported yet
_TRITON_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if _TRITON_EARLY:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (another test module imported "
                "it first); run tests/test_attention.py on its own or first", allow_module_level=True)

import kernels.attention as A  # noqa: E402

assert A.INTERPRET

FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3}  # absolute floor of the 2x rule
SANE = {torch.float32: 1e-4, torch.float16: 2e-2}  # the torch reference must itself be this close


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("PRISM_ATTENTION", "triton")
    monkeypatch.setattr(A, "POISON", True)  # every output starts as NaN: unwritten elements show


def naive(q, k, v, *, causal, scale, window, doc_ids):
    """Softmax attention written out, independent of the module's mask code (any dtype)."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    i = torch.arange(t)[:, None] + (s - t)  # absolute query positions
    j = torch.arange(s)[None, :]
    ok = torch.ones(b, 1, t, s, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= (i - j < window) if causal else ((i - j).abs() < window)
    if doc_ids is not None:
        ok &= (doc_ids[:, s - t:, None] == doc_ids[:, None, :])[:, None]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~ok, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def packed_docs(b, s, lengths, pad):
    """(b, s) ids: documents of the given lengths then `pad` padding positions (-1), shifted per row."""
    rows = []
    for r in range(b):
        ids = [doc for doc, n in enumerate(lengths) for _ in range(n)] + [-1] * pad
        assert len(ids) == s
        rows.append(torch.tensor(ids[r:] + ids[:r]) if r else torch.tensor(ids))  # rows differ
    return torch.stack(rows)


def run(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return [o.detach(), dq, dk, dv]


def check(b, hq, hkv, t, s, d, dtype, *, causal, window=None, docs=None, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    do = torch.randn(b, hq, t, d, generator=g)
    scale = 0.9 * d ** -0.5  # a custom scale
    kw = dict(causal=causal, scale=scale, window=window, doc_ids=docs)
    exact = run(naive, *(x.double() for x in (q, k, v, do)), **kw)
    qx, kx, vx, dox = (x.to(dtype) for x in (q, k, v, do))
    torch_same = run(A.attention_reference, qx, kx, vx, dox, **kw)
    if transposed:  # the (B, T, H, D) layout a model produces, seen through a transpose
        qx, kx, vx, dox = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (qx, kx, vx, dox))
    kernel = run(A.attention, qx, kx, vx, dox, **kw)
    report = []
    for name, ker, ref, ex in zip(("o", "dq", "dk", "dv"), kernel, torch_same, exact):
        assert ker.dtype == dtype and ker.shape == ex.shape, name
        assert torch.isfinite(ker).all(), f"{name}: NaN/inf (unwritten or poisoned elements)"
        err = (ker.double() - ex).abs().max().item()
        err_torch = (ref.double() - ex).abs().max().item()
        assert err_torch <= SANE[dtype], f"{name}: attention_reference itself is off ({err_torch:.3e})"
        bound = 2 * err_torch + FLOOR[dtype]
        report.append(f"{name} {err:.2e} (torch {err_torch:.2e})")
        assert err <= bound, f"{name}: kernel error {err:.3e} > 2 x torch {err_torch:.3e} + floor"
    print(" | ".join(report))
    return kernel


CASES = [  # b, hq, hkv, t, s, d, dtype, kwargs
    pytest.param(1, 2, 2, 45, 45, 64, torch.float32, dict(causal=True), id="causal-gqa1-d64-fp32"),
    pytest.param(1, 4, 2, 37, 37, 80, torch.float32, dict(causal=False), id="full-gqa2-d80-fp32"),
    pytest.param(1, 4, 1, 50, 50, 64, torch.float16, dict(causal=True, window=7), id="window-gqa4-d64-fp16"),
    pytest.param(1, 2, 1, 41, 41, 96, torch.float32, dict(causal=False, window=9),
                 id="window-sym-gqa2-d96-fp32"),
    pytest.param(2, 2, 1, 60, 60, 64, torch.float32,
                 dict(causal=True, docs=packed_docs(2, 60, (21, 17, 15), 7)), id="docs3-pad-gqa2-d64-fp32"),
    pytest.param(1, 4, 2, 60, 60, 80, torch.float16,
                 dict(causal=True, window=11, docs=packed_docs(1, 60, (30, 22), 8)),
                 id="docs2-window-d80-fp16"),
    pytest.param(1, 2, 2, 48, 48, 64, torch.float16,
                 dict(causal=False, docs=packed_docs(1, 48, (19, 25), 4)), id="docs-noncausal-d64-fp16"),
    pytest.param(1, 4, 2, 19, 53, 64, torch.float32,
                 dict(causal=True, docs=packed_docs(1, 53, (20, 26), 7)), id="prefill-t19-s53-docs-fp32"),
    pytest.param(1, 4, 1, 23, 70, 96, torch.float16, dict(causal=True, window=30),
                 id="prefill-window-d96-fp16"),
    pytest.param(1, 2, 1, 1, 33, 64, torch.float32, dict(causal=True), id="decode-t1-fp32"),
    pytest.param(1, 2, 1, 33, 33, 64, torch.float16, dict(causal=True, transposed=True),
                 id="transposed-fp16"),
    pytest.param(1, 1, 1, 20, 20, 128, torch.float32, dict(causal=True), id="d128-fp32"),
    pytest.param(1, 1, 1, 20, 20, 256, torch.float32, dict(causal=False), id="d256-fp32"),
]


@pytest.mark.parametrize("b,hq,hkv,t,s,d,dtype,kw", CASES)
def test_matches_fp64_within_2x_torch(b, hq, hkv, t, s, d, dtype, kw):
    check(b, hq, hkv, t, s, d, dtype, **kw)


def test_backward_deterministic():
    g = torch.Generator().manual_seed(1)
    q, do = torch.randn(1, 4, 40, 64, generator=g), torch.randn(1, 4, 40, 64, generator=g)
    k, v = torch.randn(1, 1, 40, 64, generator=g), torch.randn(1, 1, 40, 64, generator=g)
    first = run(A.attention, q, k, v, do, causal=True)
    second = run(A.attention, q, k, v, do, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _poisoned_run(q, k, v, do, **kw):
    """Kernel outputs and gradients; the inputs may hold NaNs where no block should ever be read."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = A.attention(q, k, v, **kw)
    return [o.detach(), *torch.autograd.grad(o, (q, k, v), do)]


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the NaN rows of the other documents
def test_skipped_blocks_are_never_read_docs():
    """Three documents on block boundaries (interpreter tiles: fwd 32x16, bwd 16x32). NaN in the K/V
    (and Q/dO) of documents 0 and 2 must not reach document 1: reading a single one of their blocks,
    even fully masked, would give NaN (0 * NaN in P @ V)."""
    fwd_bm, fwd_bn = A.block_config(64, False)["fwd"]
    bwd_bm, bwd_bn = A.block_config(64, False)["bwd"]
    n = 32
    assert n % fwd_bm == n % fwd_bn == n % bwd_bm == n % bwd_bn == 0
    t = 3 * n
    docs = torch.arange(t)[None] // n  # (1, t): 0..0 1..1 2..2
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, 2, t, 64, generator=g) for _ in range(4))
    clean = run(A.attention_reference, q, k, v, do, causal=False, doc_ids=docs)
    other = (docs[0] != 1)
    for x in (q, k, v, do):
        x[:, :, other] = float("nan")
    o, dq, dk, dv = _poisoned_run(q, k, v, do, causal=False, doc_ids=docs)
    mine = slice(n, 2 * n)
    for name, got, ref in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), clean):
        assert torch.isfinite(got[:, :, mine]).all(), f"{name}: a block of another document was read"
        torch.testing.assert_close(got[:, :, mine], ref[:, :, mine], atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_skipped_blocks_are_never_read_window():
    """Causal window 20 over 96 positions: queries 64.. never need keys < 32, and keys < 32 never need
    queries >= 64; NaN there must stay out. The causal bound is checked the same way (future keys
    and past queries are NaN)."""
    t, w = 96, 20
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, t, 64, generator=g) for _ in range(4))
    clean = run(A.attention_reference, q, k, v, do, causal=True, window=w)
    # queries 64..95 against NaN keys 0..31
    k1, v1 = k.clone(), v.clone()
    k1[:, :, :32] = float("nan")
    v1[:, :, :32] = float("nan")
    o, dq, _, _ = _poisoned_run(q, k1, v1, do, causal=True, window=w)
    for name, got, ref in (("o", o, clean[0]), ("dq", dq, clean[1])):
        assert torch.isfinite(got[:, :, 64:]).all(), f"{name}: a key block outside the window was read"
        torch.testing.assert_close(got[:, :, 64:], ref[:, :, 64:], atol=2e-5, rtol=1e-4)
    # keys 0..31 against NaN queries 64..95 (window) ; keys 64..95 against NaN queries 0..31 (causal)
    q2, do2 = q.clone(), do.clone()
    q2[:, :, 64:] = float("nan")
    do2[:, :, 64:] = float("nan")
    _, _, dk, dv = _poisoned_run(q2, k, v, do2, causal=True, window=w)
    for name, got, ref in (("dk", dk, clean[2]), ("dv", dv, clean[3])):
        assert torch.isfinite(got[:, :, :32]).all(), f"{name}: a query block outside the window was read"
        torch.testing.assert_close(got[:, :, :32], ref[:, :, :32], atol=2e-5, rtol=1e-4)
    q3, do3 = q.clone(), do.clone()
    q3[:, :, :32] = float("nan")
    do3[:, :, :32] = float("nan")
    _, _, dk, dv = _poisoned_run(q3, k, v, do3, causal=True)
    assert torch.isfinite(dk[:, :, 32:]).all() and torch.isfinite(dv[:, :, 32:]).all(), \
        "dk/dv: a query block before the key block was read (causal bound)"
    k4, v4 = k.clone(), v.clone()
    k4[:, :, 32:] = float("nan")
    v4[:, :, 32:] = float("nan")
    o, dq, _, _ = _poisoned_run(q, k4, v4, do, causal=True)
    assert torch.isfinite(o[:, :, :32]).all() and torch.isfinite(dq[:, :, :32]).all(), \
        "o/dq: a key block after the query block was read (causal bound)"


def test_dispatch_and_errors(monkeypatch):
    q = torch.randn(1, 2, 8, 64)
    k = v = torch.randn(1, 1, 8, 64)
    monkeypatch.setenv("PRISM_ATTENTION", "sdpa")
    assert not A.use_triton(q)
    torch.testing.assert_close(A.attention(q, k, v), A.attention_reference(q, k, v, causal=True))
    monkeypatch.setenv("PRISM_ATTENTION", "auto")
    assert not A.use_triton(q)  # CPU tensors take SDPA unless asked
    monkeypatch.setenv("PRISM_ATTENTION", "triton")
    assert A.use_triton(q)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        A.attention(torch.randn(1, 3, 8, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64))
    with pytest.raises(ValueError, match="doc_ids must be"):
        A.attention(q, k, v, doc_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        A.attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="more positions"):
        A.attention(torch.randn(1, 2, 9, 64), k, v)


def test_model_forward_and_backward_through_the_kernel(monkeypatch):
    """model.py's attention goes through kernels/attention.py: a Mistral-style model (GQA, window 5)
    on a packed batch with padding gives the same logits and gradients via the Triton kernel as via SDPA."""
    transformers = pytest.importorskip("transformers")
    import model as M
    cfg = transformers.MistralConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     sliding_window=5)
    torch.manual_seed(0)
    net = M.CausalLM(M.config_from_hf(cfg.to_dict()))
    ids = torch.randint(0, 61, (2, 23))
    doc_ids = torch.tensor([[0] * 9 + [1] * 14, [-1] * 4 + [0] * 19])

    def run(mode):
        monkeypatch.setenv("PRISM_ATTENTION", mode)
        net.zero_grad()
        logits = net(ids, doc_ids)
        logits[doc_ids >= 0].logsumexp(-1).sum().backward()
        return logits.detach(), [p.grad.clone() for p in net.parameters()]

    calls = []
    apply = A._FlashAttention.apply
    monkeypatch.setattr(A._FlashAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    ref_logits, ref_grads = run("sdpa")
    assert not calls
    got_logits, got_grads = run("triton")
    assert len(calls) == 2  # one kernel call per layer
    real = doc_ids >= 0
    assert (got_logits[real] - ref_logits[real]).abs().max() < 1e-4
    for g, r in zip(got_grads, ref_grads):
        assert (g - r).abs().max() < 1e-4
