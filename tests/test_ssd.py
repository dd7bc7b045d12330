"""kernels/ssd.py: the Triton SSD scan (forward, every gradient), the decode step and the mixer's dispatch,
against mamba.ssd_scan (chunked PyTorch) and mamba.ssd_scan_naive (the per-step recurrence).

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with PRISM_SSD=triton; every kernel
output is poisoned with NaN first, so an element a kernel forgets to write fails. Shapes are tiny: each
interpreter launch is slow. bf16 is checked on the GPU by bench/bench_kernels.py (the interpreter's bf16 is
wrong).
"""
import pytest
import torch

import mamba
from kernels import ssd as K

INF = float("inf")
pytestmark = pytest.mark.skipif(K.triton is None or not (K.INTERPRET or torch.cuda.is_available()),
                                reason="needs triton, and TRITON_INTERPRET=1 set before import on CPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-4, 3e-4), torch.float16: (3e-3, 1e-2)}  # relative (outputs, gradients)
if DEV == "cuda":  # the kernels' fp32 dots are TF32 on the GPU
    TOL[torch.float32] = (2e-3, 5e-3)
NAMES = ("y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dh0")


@pytest.fixture(autouse=True)
def triton_path(monkeypatch, one_thread):
    monkeypatch.setenv("PRISM_SSD", "triton")
    monkeypatch.setattr(K, "POISON", True)


def inputs(b, l, h, p, g, n, *, D="h", seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    v = dict(x=r(b, l, h, p), dt=r(b, l, h) * 0.7, A=-torch.exp(r(h)), B=r(b, l, g, n), C=r(b, l, g, n),
             D={"h": r(h), "hp": r(h, p), None: None}[D], dt_bias=r(h) * 0.5, h0=r(b, h, p, n),
             dy=r(b, l, h, p), dfinal=r(b, h, p, n))
    out = {}
    for k, t in v.items():
        if t is not None:  # A stays fp32, as mamba_ssm keeps it
            t = t.to(DEV) if k == "A" else t.to(DEV, dtype)
        out[k] = t
    return out


def docs(b, l, cuts):
    """(b, l) document ids with new documents starting at `cuts` (row r shifted by r), ids not sorted."""
    rows = []
    for r in range(b):
        ids, cur = [], 7
        for t in range(l):
            if t in {c + r for c in cuts}:
                cur = (cur * 5 + 3) % 11  # ids change but are not 0, 1, 2...
            ids.append(cur)
        rows.append(ids)
    return torch.tensor(rows, device=DEV)


def run(fn, v, *, use_dt_bias, use_h0, final_grad=True, **kw):
    """Forward and backward of fn; returns [y, final, dx, ddt, dA, dB, dC, dD, ddt_bias, dh0] (None if
    unused)."""
    leaves = dict(x=v["x"], dt=v["dt"], A=v["A"], B=v["B"], C=v["C"], D=v["D"],
                  dt_bias=v["dt_bias"] if use_dt_bias else None, h0=v["h0"] if use_h0 else None)
    leaves = {k: (t.detach().clone().requires_grad_() if t is not None else None) for k, t in leaves.items()}
    y, final = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                  dt_bias=leaves["dt_bias"], initial_states=leaves["h0"], return_final_states=True, **kw)
    loss = (y.float() * v["dy"].float()).sum()
    if final_grad:
        loss = loss + (final * v["dfinal"].float()).sum()
    used = [t for t in leaves.values() if t is not None]
    grads = iter(torch.autograd.grad(loss, used))
    return [y.detach(), final.detach()] + [next(grads) if t is not None else None for t in leaves.values()]


def compare(got, ref, dtype, what):
    for name, a, b in zip(NAMES, got, ref):
        if b is None:
            assert a is None, f"{what} {name}"
            continue
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{what} {name}: NaN/inf (an unwritten or poisoned element)"
        tol = TOL[dtype][0 if name in ("y", "final") else 1]
        err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-6)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


CASES = {  # name: (b, l, h, p, g, n, chunk, D kind, scan kwargs, dt_bias, h0, doc cuts or None, dtype)
    "g2_Dh_softplus_limit_h0": (1, 21, 4, 3, 2, 5, 8, "h", dict(dt_softplus=True, dt_limit=(0.2, 0.9)),
                                True, True, None, torch.float32),
    "g1_Dhp_bias_docs_h0": (2, 19, 2, 4, 1, 3, 8, "hp", dict(dt_softplus=True), True, True, (5, 8, 16),
                            torch.float32),
    "g2_noD_raw_dt_clamped_docs": (1, 23, 2, 3, 2, 4, 6, None, dict(dt_limit=(0.0, 0.8)), False, False,
                                   (1, 11, 12), torch.float32),
    "g2_Dh_fp16_docs_h0": (1, 22, 4, 4, 2, 6, 8, "h", dict(dt_softplus=True), True, True, (9,),
                           torch.float16),
    "g1_Dhp_fp16_nodocs": (1, 13, 2, 5, 1, 4, 5, "hp", dict(dt_softplus=True, dt_limit=(0.05, INF)), True,
                           False, None, torch.float16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scan_matches_references(case):
    b, l, h, p, g, n, Q, D, kw, use_bias, use_h0, cuts, dtype = CASES[case]
    v = inputs(b, l, h, p, g, n, D=D, seed=list(CASES).index(case), dtype=dtype)
    kw = dict(kw, seq_idx=docs(b, l, cuts) if cuts else None)
    common = dict(use_dt_bias=use_bias, use_h0=use_h0, **kw)
    kernel = run(K.ssd_scan, v, chunk_size=Q, **common)
    v32 = {k: (t.float() if t is not None else None) for k, t in v.items()}
    chunked = run(mamba.ssd_scan, v32, chunk_size=Q, **common)
    naive = run(mamba.ssd_scan_naive, {k: (t.double() if t is not None else None) for k, t in v.items()},
                **common)
    assert kernel[0].dtype == dtype and kernel[1].dtype == torch.float32
    compare(kernel, naive, dtype, "kernel vs recurrence")
    compare(kernel, chunked, dtype, "kernel vs mamba.ssd_scan")


def test_multi_tile_paths_and_determinism(monkeypatch):
    """Tiles of 16: chunk 20 spans two row blocks (the second one partial), p and n two tiles each, the
    state passes two programs; no final-state gradient; the backward gives the same bits twice."""
    monkeypatch.setattr(K, "MAX_BLOCK", 16)
    v = inputs(1, 45, 2, 20, 1, 18, D="hp", seed=11)
    kw = dict(chunk_size=20, dt_softplus=True, seq_idx=docs(1, 45, (13, 30)), use_dt_bias=True, use_h0=True,
              final_grad=False)
    kernel = run(K.ssd_scan, v, **kw)
    compare(kernel, run(mamba.ssd_scan_naive,
                        {k: (t.double() if t is not None else None) for k, t in v.items()},
                        **kw), torch.float32, "tiles of 16 vs recurrence")
    again = run(K.ssd_scan, v, **kw)
    for name, a, b in zip(NAMES, kernel, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_final_state_and_prefill_then_decode():
    """Prefill a prefix with the scan kernel, decode the rest with ssd_step: equals the full recurrence,
    and each final state equals the recurrence's state there."""
    b, l, h, p, g, n, split = 2, 14, 4, 3, 2, 5, 9
    v = inputs(b, l, h, p, g, n, D="hp", seed=5)
    kw = dict(D=v["D"], dt_bias=v["dt_bias"], dt_softplus=True, dt_limit=(0.1, 1.5))
    y_ref, h_ref = mamba.ssd_scan_naive(v["x"], v["dt"], v["A"], v["B"], v["C"], initial_states=v["h0"],
                                        return_final_states=True, **kw)
    _, h_mid = mamba.ssd_scan_naive(v["x"][:, :split], v["dt"][:, :split], v["A"], v["B"][:, :split],
                                    v["C"][:, :split], initial_states=v["h0"], return_final_states=True, **kw)
    y_pre, state = K.ssd_scan(v["x"][:, :split], v["dt"][:, :split], v["A"], v["B"][:, :split],
                              v["C"][:, :split], chunk_size=4, initial_states=v["h0"],
                              return_final_states=True, **kw)
    assert (state - h_mid).abs().max() < TOL[torch.float32][0] * h_mid.abs().max()
    ys = [y_pre]
    for t in range(split, l):
        ys.append(K.ssd_step(state, v["x"][:, t], v["dt"][:, t], v["A"], v["B"][:, t], v["C"][:, t],
                             **kw)[:, None])
    y = torch.cat(ys, dim=1)
    assert torch.isfinite(y).all()
    assert (y - y_ref).abs().max() < TOL[torch.float32][0] * y_ref.abs().max()
    assert (state - h_ref).abs().max() < TOL[torch.float32][0] * h_ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_matches_recurrence(dtype):
    """Three decode steps (g > 1, D (h,), dt bias/softplus/limit) vs the recurrence from the same state;
    the state stays fp32 and is updated in place."""
    b, h, p, g, n = 2, 6, 5, 3, 7
    v = inputs(b, 3, h, p, g, n, D="h", seed=9, dtype=dtype)
    kw = dict(D=v["D"], dt_bias=v["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.7))
    y_ref, h_ref = mamba.ssd_scan_naive(*(v[k].float() for k in ("x", "dt", "A", "B", "C")),
                                        return_final_states=True, initial_states=v["h0"].float(),
                                        **{k: t.float() if torch.is_tensor(t) else t for k, t in kw.items()})
    state = v["h0"].float().clone()
    ptr = state.data_ptr()
    for t in range(3):
        y = K.ssd_step(state, v["x"][:, t], v["dt"][:, t], v["A"], v["B"][:, t], v["C"][:, t], **kw)
        assert y.dtype == dtype and y.shape == (b, h, p)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert (y.float() - y_ref[:, t]).abs().max() <= tol * y_ref.abs().max()
    assert state.data_ptr() == ptr and state.dtype == torch.float32
    assert (state - h_ref).abs().max() <= 1e-4 * h_ref.abs().max()


def _mixer_run(mixer, hidden, doc_ids, mode, monkeypatch):
    monkeypatch.setenv("PRISM_SSD", mode)
    mixer.zero_grad()
    hs = hidden.clone().requires_grad_()
    out = mixer(hs, doc_ids=doc_ids)
    (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
    grads = {k: p.grad.clone() for k, p in mixer.named_parameters()}
    # prefill + one decode step through a cache
    cache = mixer.allocate_cache(hidden.shape[0])
    with torch.no_grad():
        pre = mixer(hidden[:, :-1], cache=cache)
        step = mixer(hidden[:, -1:], cache=cache)
    return out.detach(), hs.grad, grads, torch.cat([pre, step], 1), cache.ssm_state.clone()


def test_mixer_kernel_path_equals_torch_path(monkeypatch):
    torch.manual_seed(0)
    mixer = mamba.Mamba2Mixer(hidden_size=16, num_heads=4, head_dim=4, state_size=8, n_groups=2, chunk_size=8,
                              time_step_limit=(0.0, 2.0)).to(DEV)
    with torch.no_grad():
        mixer.D.normal_()
        mixer.dt_bias.normal_()
    hidden = torch.randn(2, 19, 16, device=DEV)
    doc_ids = torch.tensor([[-1, -1] + [3] * 9 + [4] * 8, [0] * 12 + [1] * 5 + [-1] * 2], device=DEV)
    got = _mixer_run(mixer, hidden, doc_ids, "triton", monkeypatch)
    ref = _mixer_run(mixer, hidden, doc_ids, "torch", monkeypatch)
    for name, a, b in zip(("out", "d hidden", None, "prefill+decode", "ssm_state"), got, ref):
        if name is None:
            for k in b:
                assert ((a[k] - b[k]).abs().max()
                        <= (3e-4 if DEV == "cpu" else 5e-3) * b[k].abs().max()), f"grad {k}"
            continue
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max() <= (2e-4 if DEV == "cpu" else 3e-3) * b.abs().max(), name


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_backward_through_ssd_scan_both_paths(monkeypatch, mode):
    """autograd through kernels.ssd.ssd_scan on either path, initial and final states included, against the
    per-step recurrence (float64)."""
    monkeypatch.setenv("PRISM_SSD", mode)
    v = inputs(1, 6, 2, 3, 1, 4, D="h", seed=4)
    kw = dict(dt_softplus=True, seq_idx=docs(1, 6, (3,)), return_final_states=True)
    names = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")
    grads = []
    for fn, dtype in ((K.ssd_scan, torch.float32), (mamba.ssd_scan_naive, torch.float64)):
        t = {k: v[k].detach().to(dtype).clone().requires_grad_() for k in names}
        y, fin = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=4, D=t["D"], dt_bias=t["dt_bias"],
                    initial_states=t["h0"], **kw)
        ((y * v["dy"].to(dtype)).sum() + (fin * v["dfinal"].to(dtype)).sum()).backward()
        grads.append({k: t[k].grad for k in names})
    for k in names:
        ref = grads[1][k].float()
        assert (grads[0][k] - ref).abs().max() <= 3e-4 * (1 + ref.abs().max()), k


def test_torch_path_and_errors(monkeypatch):
    v = inputs(1, 6, 2, 3, 1, 4, D="h", seed=3)
    kw = dict(D=v["D"], dt_softplus=True, seq_idx=docs(1, 6, (3,)), initial_states=v["h0"],
              return_final_states=True)
    monkeypatch.setenv("PRISM_SSD", "torch")
    y, fin = K.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=4, **kw)
    y_ref, fin_ref = mamba.ssd_scan_naive(v["x"], v["dt"], v["A"], v["B"], v["C"], **kw)
    assert (y - y_ref).abs().max() < 1e-5 and (fin - fin_ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="dt must be"):
        K.ssd_scan(v["x"], v["dt"][:, :-1], v["A"], v["B"], v["C"], chunk_size=4)
    with pytest.raises(ValueError, match="multiple of the groups"):
        K.ssd_scan(v["x"], v["dt"], v["A"], v["B"].repeat(1, 1, 3, 1), v["C"].repeat(1, 1, 3, 1),
                   chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        K.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=0)
    with pytest.raises(ValueError, match="initial_states must be"):
        K.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=4, initial_states=v["h0"][..., :2])
    with pytest.raises(ValueError, match="state must be"):
        K.ssd_step(v["h0"][..., :2], v["x"][:, 0], v["dt"][:, 0], v["A"], v["B"][:, 0], v["C"][:, 0])
    monkeypatch.setenv("PRISM_SSD", "cuda")
    with pytest.raises(ValueError, match="PRISM_SSD"):
        K.use_triton(v["x"])
