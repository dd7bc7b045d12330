"""SSD (Mamba2's chunked selective scan) in Triton: forward, backward and the one-token decode step.

    from kernels.ssd import ssd_scan, ssd_step
    y, h_last = ssd_scan(x, dt, A, B, C, chunk_size=128, D=D, dt_bias=dt_bias, dt_softplus=True,
                         seq_idx=seg, return_final_states=True)
    y_t = ssd_step(state, x_t, dt_t, A, B_t, C_t, D=D, dt_bias=dt_bias, dt_softplus=True)  # state updated

Arguments follow mamba_ssm's `mamba_chunk_scan_combined` (and `ssd_scan_torch`, the pure-PyTorch
scan below that the kernels are tested against): x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n)
with head i reading group i // (h // g), D (h,) or (h, p), dt_bias (h,), initial_states (b, h, p, n),
seq_idx (b, l) ints. Returns y (b, l, h, p) in x's dtype [, final states (b, h, p, n) fp32].

The maths (Dao & Gu 2024), per head, with Δ_t = clamp(softplus?(dt_t + dt_bias), *dt_limit):

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T          h: (p, n), fp32 everywhere
    y_t = h_t C_t + D x_t

Packed documents: the state resets to zero wherever seq_idx[:, t] != seq_idx[:, t-1]; initial_states
seed only the first document; the final state is the last document's. Inside the kernels documents are
segment numbers s_t (0, 0, 1, 1, ...; made on the host), and "same segment" is what masks a pair.

The sequence is cut into chunks of Q = chunk_size steps (c = cdiv(l, Q); the tail chunk is masked,
Δ = 0 there). With a_t = Δ_t A and a^_i the cumulative sum of a inside the chunk (a^_end its last),
each chunk is a quadratic form plus a carried state H (the state entering the chunk):

    y_i = exp(a^_i) [s_i = s_in] C_i H^T
          + sum_{j<=i, s_j = s_i} (C_i . B_j) exp(a^_i - a^_j) Δ_j x_j  + D x_i
    S   = sum_j [s_j = s_end] exp(a^_end - a^_j) Δ_j x_j B_j^T          (the chunk's own contribution)
    H'  = ρ H + S,   ρ = exp(a^_end) [s_end = s_in]                         (state entering the next chunk)

Every exponent is masked to -inf *before* exp (pairs i < j or across documents), so no exp ever sees a
positive exponent from a masked lane and nothing computes inf * 0.

Kernels (grids; all accumulate in fp32; fp32 tl.dot, IEEE in the interpreter and TF32 on the GPU):
  forward
    _dt_kernel          (b*c, cdiv(h, BH))            Δ (b, h, c, Q) and a^ (b, h, c, Q) in fp32
    _chunk_state_kernel (p-blk*n-blk, b*c, h)         S (b, c, h, p, n); also, with MODE=1, the backward's
                                                      G = sum_i exp(a^_i)[s_i = s_in] dy_i C_i^T
    _state_pass_kernel  (cdiv(p*n, BS), b*h)          sequential over chunks: H (b, c, h, p, n), final state
    _chunk_scan_kernel  (i-blk*p-blk, b*c, h)         y: inter-chunk term + causal loop over j blocks
  backward (the forward's Δ, a^ and H are recomputed, not saved: only the inputs are kept)
    _chunk_state_kernel MODE=1                        G (b, c, h, p, n)
    _state_pass_bwd_kernel (cdiv(p*n, BS), b*h)       reverse over chunks: dS_c = dH_{c+1},
                                                      dH_c = G_c + ρ_c dH_{c+1}, d initial state,
                                                      ρ_c <dH_{c+1}, H_c> partials (per block)
    _scan_bwd_dx_kernel (j-blk, b*c, h)               dx, the direct dΔ, and da^: column sums of
                                                      T_ij = (C_i . B_j) exp(a^_i - a^_j) Δ_j (dy_i . x_j) in
                                                      the program, row sums as per-program partials
    _scan_bwd_dbdc_kernel (blk, b*c, g)               dB, dC, looping over the h/g heads of the group
    _dt_bwd_kernel      (b*c, cdiv(h, BH))            da = reverse cumsum of da^; dΔ = dΔ_direct + A da;
                                                      through clamp/softplus to d dt; dA partials
  Cross-program reductions (row-sum partials, ρ terms, dA, d dt_bias, dD) are written per program and
  summed with torch on the host: no atomics, the backward is deterministic.
  decode
    _step_kernel        (b*h, cdiv(p, BP))            h <- exp(Δ A) h + Δ x B^T in place; y = h C + D x

Dispatch (`use_triton`): the kernels run on CUDA tensors; on CPU only when TRITON_INTERPRET=1 was set
before this module was imported AND PRISM_SSD=triton (tests). PRISM_SSD=torch forces the plain PyTorch
path. On the torch path `ssd_scan` runs `ssd_scan_torch`, the chunked PyTorch scan (autograd, the same
maths in the same chunks; mamba.py re-exports it as `mamba.ssd_scan`); `ssd_step` runs `_step_torch`.
"""

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only installs: the PyTorch path still works
    triton = None

    class tl:  # placeholder so that the kernel definitions below still parse
        constexpr = None

    def _jit(fn):
        return fn


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INF = float("inf")
POISON = False  # tests: fill every kernel output with NaN before the kernel writes it
MAX_BLOCK = 64  # largest tile side (chunk rows, p, n); tests lower it to reach the multi-tile paths
WHERE = "kernels/ssd.py"


def _empty(*shape, like, dtype=None):
    out = torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if POISON else out


# ----------------------------------------------------------------------------------------------
# argument checks, dispatch, the PyTorch path
# ----------------------------------------------------------------------------------------------

def _check_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_states, seq_idx):
    f = f"{WHERE}: ssd_scan"
    if x.dim() != 4:
        raise ValueError(f"{f}: x must be (batch, seqlen, heads, head_dim), got {tuple(x.shape)}")
    b, l, h, p = x.shape
    want = {"dt": (dt, (b, l, h)), "A": (A, (h,))}
    if seq_idx is not None:
        want["seq_idx"] = (seq_idx, (b, l))
    if initial_states is not None:
        want["initial_states"] = (initial_states, (b, h, p, B.shape[-1] if B.dim() == 4 else -1))
    if dt_bias is not None:
        want["dt_bias"] = (dt_bias, (h,))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{f}: {name} must be {shape}, got {tuple(t.shape)}")
    if B.dim() != 4 or tuple(B.shape[:2]) != (b, l) or B.shape != C.shape:
        raise ValueError(f"{f}: B and C must both be ({b}, {l}, groups, state), got {tuple(B.shape)} and "
                         f"{tuple(C.shape)}")
    if h % B.shape[2]:
        raise ValueError(f"{f}: heads ({h}) of x must be a multiple of the groups ({B.shape[2]}) of B and C")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{f}: chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"{f}: D must be ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"{f}: dt_limit must be (low, high) with low <= high, got {dt_limit!r}")
    if seq_idx is not None and (seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool):
        raise ValueError(f"{f}: seq_idx must be an integer tensor, got {seq_idx.dtype}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("dt_bias", dt_bias),
                    ("initial_states", initial_states), ("seq_idx", seq_idx)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{f}: {name} is on {t.device} but x is on {x.device}")


def use_triton(x):
    """Which path `ssd_scan` / `ssd_step` take for this tensor (see the module docstring)."""
    mode = os.environ.get("PRISM_SSD", "auto")
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"{WHERE}: PRISM_SSD must be auto, triton or torch; got {mode!r}")
    if mode == "torch" or triton is None:
        if mode == "triton":
            raise RuntimeError(f"{WHERE}: PRISM_SSD=triton but triton is not installed")
        return False
    if x.is_cuda:
        return True
    if mode == "triton":
        if not INTERPRET:
            raise RuntimeError(f"{WHERE}: PRISM_SSD=triton on CPU tensors needs TRITON_INTERPRET=1 set "
                               f"before kernels.ssd is imported")
        return True
    return False


def _delta(dt, dt_bias, dt_softplus, dt_limit):
    """Δ = clamp(softplus?(dt + dt_bias), *dt_limit) in fp32 (threshold 20 softplus, like mamba_ssm)."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def _segments(seq_idx):
    """(b, l) document ids -> (b, l) int32 segment numbers: +1 wherever the id changes."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)  # (b, l-1)
    return F.pad(change.cumsum(-1, dtype=torch.int32), (1, 0))


def _step_torch(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit):
    """One recurrence step in PyTorch; state (b, h, p, n) updated in place; returns y (b, h, p) fp32."""
    b, h, p = x.shape
    r = h // B.shape[1]
    d = _delta(dt, dt_bias, dt_softplus, dt_limit)  # (b, h)
    Bh = B.float().repeat_interleave(r, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(r, dim=1)  # (b, h, n)
    new = torch.exp(d * A.float())[..., None, None] * state.float() \
        + (d[..., None] * x.float())[..., None] * Bh[:, :, None, :]  # (b, h, p, n)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + D.float().view(h, -1) * x.float()
    state.copy_(new)
    return y


def ssd_scan_torch(x, dt, A, B, C, *, chunk_size, D=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, INF), initial_states=None, seq_idx=None, return_final_states=False):
    """Chunked SSD scan in plain PyTorch (quadratic inside a chunk, a recurrence across chunks), fp32 inside,
    differentiable by autograd (nothing is updated in place): the path when the kernels cannot run, and the
    reference they are tested against. mamba.py re-exports it as `mamba.ssd_scan`.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,) or (h, p), dt_bias (h,).
    Δ = clamp(softplus?(dt + dt_bias), *dt_limit). initial_states (b, h, p, n) seed the segment that holds
    position 0. seq_idx (b, l) ints: the state resets wherever seq_idx[:, t] != seq_idx[:, t-1] (packed
    documents). Any l (the last chunk is zero-padded inside: Δ = 0 there, so the state is untouched).
    Returns y (b, l, h, p) in x's dtype [, final states (b, h, p, n) in fp32].
    """
    _check_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_states, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, Q = h // g, chunk_size  # heads per group, chunk length
    out_dtype = x.dtype

    dt = _delta(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h) Δ
    x, B, C, A = x.float(), B.float(), C.float(), A.float()
    seg = _segments(seq_idx) if seq_idx is not None else None  # (b, l)
    pad = (-l) % Q
    if pad:  # zero Δ, x, B, C on the padded tail; the tail stays in the last segment
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
    c = (l + pad) // Q

    x = x.view(b, c, Q, g, r, p)
    B = B.view(b, c, Q, g, n)
    C = C.view(b, c, Q, g, n)
    dt = dt.view(b, c, Q, g, r)
    x_dt = x * dt[..., None]  # (b, c, Q, g, r, p) Δ_t x_t
    a = (dt * A.view(g, r)).permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q) log-decay Δ_t A per step, <= 0
    a_cum = a.cumsum(-1)  # (b, c, g, r, Q) log-decay from the chunk start through step i

    # Which (i, j) pairs interact inside a chunk: j <= i and, with documents, the same segment.
    keep = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()  # (Q_i, Q_j)
    if seg is not None:
        seg = seg.view(b, c, Q)
        keep = keep & (seg[..., :, None] == seg[..., None, :])  # (b, c, Q, Q)
        keep = keep[:, :, None, None]  # (b, c, 1, 1, Q, Q)

    # 1. Diagonal blocks: y_i += sum_{j <= i} (C_i . B_j) exp(a_cum_i - a_cum_j) Δ_j x_j.
    # The segment sum a_cum_i - a_cum_j is masked to -inf *before* exp, so the upper triangle never overflows.
    L = torch.exp((a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~keep, -INF))  # (b, c, g, r, Q, Q)
    CB = torch.einsum("bcign,bcjgn->bcgij", C, B)  # (b, c, g, Q, Q)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", CB[:, :, :, None] * L, x_dt)  # (b, c, Q, g, r, p)

    # 2. State each chunk builds by its end, starting from zero:
    # S_c = sum_j exp(a_cum_end - a_cum_j) Δ_j x_j B_j^T.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, c, g, r, Q)
    if seg is not None:  # only the segment still open at the chunk's end survives
        decay_to_end = decay_to_end * (seg == seg[..., -1:])[:, :, None, None, :]
    S = torch.einsum("bcjgn,bcgrj,bcjgrp->bcgrpn", B, decay_to_end, x_dt)  # (b, c, g, r, p, n)

    # 3. Across chunks: the state entering chunk k is sum_{z <= k} exp(sum of chunk decays z..k-1) S_{z-1},
    # with S_{-1} the initial state; with documents, only terms from the same segment survive.
    h0 = (
        initial_states.float().view(b, 1, g, r, p, n)
        if initial_states is not None
        else x.new_zeros(b, 1, g, r, p, n)
    )
    S = torch.cat([h0, S], dim=1)  # (b, c+1, g, r, p, n): index z = state at the end of chunk z-1
    a_chunk = F.pad(a_cum[..., -1].cumsum(1), (0, 0, 0, 0, 1, 0))  # (b, c+1, g, r) log-decay up to chunk k
    keep = torch.ones(c + 1, c + 1, dtype=torch.bool, device=x.device).tril()  # (k, z)
    if seg is not None:
        # (b, c+1): segment at the end of chunk k-1 (0 for the initial state)
        seg_end = F.pad(seg[..., -1], (1, 0))
        keep = keep & (seg_end[:, :, None] == seg_end[:, None, :])  # (b, k, z)
    keep = keep[..., None, None]  # (..., k, z, 1, 1)
    decay_chunks = torch.exp(
        (a_chunk[:, :, None] - a_chunk[:, None, :]).masked_fill(~keep, -INF)
    )  # (b, k, z, g, r)
    H = torch.einsum("bkzgr,bzgrpn->bkgrpn", decay_chunks, S)  # (b, c+1, g, r, p, n)
    H_in, h_final = H[:, :-1], H[:, -1]  # (b, c, g, r, p, n) entering each chunk, (b, g, r, p, n) final

    # 4. Off-diagonal blocks: y_i += exp(a_cum_i) C_i . h_in (only where i continues the carried segment).
    decay_in = torch.exp(a_cum)  # (b, c, g, r, Q)
    if seg is not None:
        decay_in = decay_in * (seg == seg_end[:, :-1, None])[:, :, None, None, :]
    y = y + torch.einsum("bcign,bcgrpn,bcgri->bcigrp", C, H_in, decay_in)

    if D is not None:  # skip connection D x_t
        y = y + x * D.float().view(g, r, -1)
    y = y.reshape(b, c * Q, h, p)[:, :l].to(out_dtype)  # (b, l, h, p)
    if return_final_states:
        return y, h_final.reshape(b, h, p, n)
    return y


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@_jit
def _softplus(v):
    # softplus with threshold 20 (torch's, mamba_ssm's); exp(v) only of v <= 20 so nothing overflows
    small = tl.where(v < -15.0, v, 0.0)
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(small),
                                          tl.log(1.0 + tl.exp(tl.minimum(v, 20.0)))))


@_jit
def _dt_kernel(DT, DT_BIAS, A, DELTA, ACUM, L, H, NC, Q, s_b, s_l, s_h, lo, hi,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q_PAD: tl.constexpr, BH: tl.constexpr):
    """Δ and its chunk-local cumulative log-decay a^ = cumsum(Δ A), both (b, h, c, Q) fp32."""
    pid = tl.program_id(0)
    bi, ci = pid // NC, pid % NC
    t = tl.arange(0, Q_PAD)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    pos = ci * Q + t
    valid = ((t < Q) & (pos < L))[:, None] & (hh < H)[None, :]  # (Q_PAD, BH)
    v = tl.load(DT + bi * s_b + pos[:, None] * s_l + hh[None, :] * s_h, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(DT_BIAS + hh, mask=hh < H, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = _softplus(v)
    d = tl.where(valid, tl.minimum(tl.maximum(v, lo), hi), 0.0)  # Δ, 0 past the end
    a = d * tl.load(A + hh, mask=hh < H, other=0.0).to(tl.float32)[None, :]
    acum = tl.cumsum(a, axis=0)
    off = ((bi * H + hh[None, :]) * NC + ci) * Q + t[:, None]
    st = (t < Q)[:, None] & (hh < H)[None, :]
    tl.store(DELTA + off, d, mask=st)
    tl.store(ACUM + off, acum, mask=st)


@_jit
def _seg_bounds(SEG, bi, ci, L, Q):
    """Segment carried into chunk ci (0 for the first chunk: the initial state's) and open at its end."""
    s_in = tl.load(SEG + bi * L + tl.maximum(ci * Q - 1, 0))
    s_in = tl.where(ci > 0, s_in, 0)
    s_end = tl.load(SEG + bi * L + tl.minimum(ci * Q + Q - 1, L - 1))
    return s_in, s_end


@_jit
def _chunk_state_kernel(X, BC, DELTA, ACUM, SEG, OUT, L, H, NC, Q, R, P, N,
                        sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n,
                        MODE: tl.constexpr, HAS_SEQ: tl.constexpr, BK: tl.constexpr,
                        BP: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """MODE 0: S = sum_j [s_j = s_end] exp(a^_end - a^_j) Δ_j x_j B_j^T   (X = x, BC = B)
    MODE 1: G = sum_i [s_i = s_in] exp(a^_i) dy_i C_i^T                (X = dy, BC = C)
    One (p-block, n-block) tile of one chunk of one head; OUT (b, c, h, p, n) fp32."""
    npb = tl.cdiv(P, BP)
    pb, nb = tl.program_id(0) % npb, tl.program_id(0) // npb
    bi, ci = tl.program_id(1) // NC, tl.program_id(1) % NC
    hi = tl.program_id(2)
    gi = hi // R
    pp = pb * BP + tl.arange(0, BP)
    nn = nb * BN + tl.arange(0, BN)
    row = ((bi * H + hi) * NC + ci) * Q  # start of this chunk in the (b, h, c, Q) buffers
    a_end = tl.load(ACUM + row + Q - 1)
    if HAS_SEQ:
        s_in, s_end = _seg_bounds(SEG, bi, ci, L, Q)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for k0 in range(0, Q, BK):
        t = k0 + tl.arange(0, BK)
        pos = ci * Q + t
        ok = (t < Q) & (pos < L)
        a = tl.load(ACUM + row + t, mask=t < Q, other=0.0)
        if HAS_SEQ:
            s = tl.load(SEG + bi * L + pos, mask=ok, other=-1)
        if MODE == 0:
            keep = ok
            if HAS_SEQ:
                keep = keep & (s == s_end)
            w = (tl.exp(tl.where(keep, a_end - a, -float("inf")))
                 * tl.load(DELTA + row + t, mask=t < Q, other=0.0))
        else:
            keep = ok
            if HAS_SEQ:
                keep = keep & (s == s_in)
            w = tl.exp(tl.where(keep, a, -float("inf")))
        xv = tl.load(X + bi * sx_b + pos[:, None] * sx_l + hi * sx_h + pp[None, :] * sx_p,
                     mask=ok[:, None] & (pp < P)[None, :], other=0.0).to(tl.float32)  # (BK, BP)
        bv = tl.load(BC + bi * sb_b + pos[:, None] * sb_l + gi * sb_g + nn[None, :] * sb_n,
                     mask=ok[:, None] & (nn < N)[None, :], other=0.0).to(tl.float32)  # (BK, BN)
        acc += tl.dot(tl.trans(xv * w[:, None]), bv, input_precision=DOT_PREC)
    off = (((bi * NC + ci) * H + hi) * P + pp[:, None]) * N + nn[None, :]
    tl.store(OUT + off, acc, mask=(pp < P)[:, None] & (nn < N)[None, :])


@_jit
def _chunk_rho(ACUM, SEG, bi, hi, ci, L, H, NC, Q, HAS_SEQ: tl.constexpr):
    """ρ_c = exp(a^_end) [the segment carried in is still open at the chunk's end]."""
    rho = tl.exp(tl.load(ACUM + ((bi * H + hi) * NC + ci) * Q + Q - 1))
    if HAS_SEQ:
        s_in, s_end = _seg_bounds(SEG, bi, ci, L, Q)
        rho = tl.where(s_in == s_end, rho, 0.0)
    return rho


@_jit
def _state_pass_kernel(S, H0, ACUM, SEG, HIN, FINAL, L, H, NC, Q, PN,
                       HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BS: tl.constexpr):
    """H_0 = initial state (or 0); H_{c+1} = ρ_c H_c + S_c. Stores H_c entering each chunk and the final."""
    e = tl.program_id(0) * BS + tl.arange(0, BS)
    bi, hi = tl.program_id(1) // H, tl.program_id(1) % H
    mask = e < PN
    if HAS_INIT:
        run = tl.load(H0 + (bi * H + hi) * PN + e, mask=mask, other=0.0).to(tl.float32)
    else:
        run = tl.zeros((BS,), dtype=tl.float32)
    for ci in range(0, NC):
        off = ((bi * NC + ci) * H + hi) * PN + e
        tl.store(HIN + off, run, mask=mask)
        rho = _chunk_rho(ACUM, SEG, bi, hi, ci, L, H, NC, Q, HAS_SEQ)
        run = rho * run + tl.load(S + off, mask=mask, other=0.0)
    tl.store(FINAL + (bi * H + hi) * PN + e, run, mask=mask)


@_jit
def _chunk_scan_kernel(X, BM_, CM, DELTA, ACUM, SEG, HIN, DV, Y, L, H, NC, Q, R, P, N,
                       sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sy_b, sy_l, sy_h, sy_p, sd_h, sd_p,
                       HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr,
                       N_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """y for one (i-block, p-block) tile of one chunk of one head (BM_ = B, CM = C)."""
    npb = tl.cdiv(P, BP)
    mb, pb = tl.program_id(0) // npb, tl.program_id(0) % npb
    bi, ci = tl.program_id(1) // NC, tl.program_id(1) % NC
    hi = tl.program_id(2)
    gi = hi // R
    i = mb * BLK + tl.arange(0, BLK)
    pp = pb * BP + tl.arange(0, BP)
    nn = tl.arange(0, N_PAD)
    row = ((bi * H + hi) * NC + ci) * Q
    pos_i = ci * Q + i
    ok_i = (i < Q) & (pos_i < L)
    a_i = tl.load(ACUM + row + i, mask=i < Q, other=0.0)
    c_i = tl.load(CM + bi * sb_b + pos_i[:, None] * sb_l + gi * sb_g + nn[None, :] * sb_n,
                  mask=ok_i[:, None] & (nn < N)[None, :], other=0.0).to(tl.float32)  # (BLK, N_PAD)
    keep_in = ok_i
    if HAS_SEQ:
        s_in, s_end = _seg_bounds(SEG, bi, ci, L, Q)
        s_i = tl.load(SEG + bi * L + pos_i, mask=ok_i, other=-1)
        keep_in = keep_in & (s_i == s_in)
    # inter-chunk: exp(a^_i) C_i H^T
    hin = tl.load(HIN + (((bi * NC + ci) * H + hi) * P + pp[:, None]) * N + nn[None, :],
                  mask=(pp < P)[:, None] & (nn < N)[None, :], other=0.0)  # (BP, N_PAD)
    acc = tl.dot(c_i, tl.trans(hin), input_precision=DOT_PREC)  # (BLK, BP)
    acc = acc * tl.exp(tl.where(keep_in, a_i, -float("inf")))[:, None]
    # intra-chunk, causal: j blocks up to and including the diagonal one
    for j0 in range(0, (mb + 1) * BLK, BLK):
        j = j0 + tl.arange(0, BLK)
        pos_j = ci * Q + j
        ok_j = (j < Q) & (pos_j < L)
        a_j = tl.load(ACUM + row + j, mask=j < Q, other=0.0)
        d_j = tl.load(DELTA + row + j, mask=j < Q, other=0.0)
        b_j = tl.load(BM_ + bi * sb_b + pos_j[:, None] * sb_l + gi * sb_g + nn[None, :] * sb_n,
                      mask=ok_j[:, None] & (nn < N)[None, :], other=0.0).to(tl.float32)  # (BLK, N_PAD)
        x_j = tl.load(X + bi * sx_b + pos_j[:, None] * sx_l + hi * sx_h + pp[None, :] * sx_p,
                      mask=ok_j[:, None] & (pp < P)[None, :], other=0.0).to(tl.float32)  # (BLK, BP)
        keep = (j[None, :] <= i[:, None]) & ok_j[None, :] & ok_i[:, None]
        if HAS_SEQ:
            s_j = tl.load(SEG + bi * L + pos_j, mask=ok_j, other=-2)
            keep = keep & (s_i[:, None] == s_j[None, :])
        decay = tl.exp(tl.where(keep, a_i[:, None] - a_j[None, :], -float("inf")))  # (BLK, BLK)
        cb = tl.dot(c_i, tl.trans(b_j), input_precision=DOT_PREC)  # (BLK, BLK) C_i . B_j
        acc += tl.dot(cb * decay * d_j[None, :], x_j, input_precision=DOT_PREC)
    if HAS_D:
        x_i = tl.load(X + bi * sx_b + pos_i[:, None] * sx_l + hi * sx_h + pp[None, :] * sx_p,
                      mask=ok_i[:, None] & (pp < P)[None, :], other=0.0).to(tl.float32)
        acc += x_i * tl.load(DV + hi * sd_h + pp * sd_p, mask=pp < P, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + bi * sy_b + pos_i[:, None] * sy_l + hi * sy_h + pp[None, :] * sy_p,
             acc.to(Y.dtype.element_ty), mask=ok_i[:, None] & (pp < P)[None, :])


@_jit
def _state_pass_bwd_kernel(G, HIN, DFINAL, ACUM, SEG, DS, DH0, DRHO, L, H, NC, Q, PN,
                           HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, BS: tl.constexpr):
    """Reverse over chunks: dS_c = dH_{c+1}; dH_c = G_c + ρ_c dH_{c+1}; dH_0 is d initial_states.
    DRHO (b, h, c, nblk): ρ_c <dH_{c+1}, H_c> over this program's elements (d a^_end, summed on the host)."""
    blk = tl.program_id(0)
    e = blk * BS + tl.arange(0, BS)
    bi, hi = tl.program_id(1) // H, tl.program_id(1) % H
    nblk = tl.num_programs(0)
    mask = e < PN
    if HAS_DFINAL:
        run = tl.load(DFINAL + (bi * H + hi) * PN + e, mask=mask, other=0.0).to(tl.float32)
    else:
        run = tl.zeros((BS,), dtype=tl.float32)
    for k in range(0, NC):
        ci = NC - 1 - k
        off = ((bi * NC + ci) * H + hi) * PN + e
        tl.store(DS + off, run, mask=mask)
        rho = _chunk_rho(ACUM, SEG, bi, hi, ci, L, H, NC, Q, HAS_SEQ)
        hin = tl.load(HIN + off, mask=mask, other=0.0)
        tl.store(DRHO + ((bi * H + hi) * NC + ci) * nblk + blk, rho * tl.sum(run * hin, axis=0))
        run = tl.load(G + off, mask=mask, other=0.0) + rho * run
    tl.store(DH0 + (bi * H + hi) * PN + e, run, mask=mask)


@_jit
def _scan_bwd_dx_kernel(X, BM_, CM, DY, DELTA, ACUM, SEG, HIN, DS, DV, DX, DDT, DACUM, DAROW, U,
                        L, H, NC, Q, R, P, N,
                        sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sy_b, sy_l, sy_h, sy_p, sd_h, sd_p,
                        HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, BLK: tl.constexpr, P_PAD: tl.constexpr,
                        N_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """For the rows j of one block of one chunk of one head:
    dx_j = Δ_j dxΔ_j + D dy_j,
    dxΔ_j = [s_j = s_end] exp(a^_end - a^_j) dS B_j + sum_{i>=j} L_ij (C_i . B_j) dy_i
    DDT_j = x_j . dxΔ_j (the direct part of dΔ); DACUM_j = <dy_j, y_inter_j> - U_j - sum_i T_ij (T: see the
    module docstring); DAROW (b, h, c, nblk, Q): sum_j T_ij of this block, for the rows i (host sums);
    U_j = Δ_j x_j . (dS part of dxΔ_j), whose sum also goes to a^_end (host)."""
    jb = tl.program_id(0)
    nblk = tl.num_programs(0)
    bi, ci = tl.program_id(1) // NC, tl.program_id(1) % NC
    hi = tl.program_id(2)
    gi = hi // R
    j = jb * BLK + tl.arange(0, BLK)
    pp = tl.arange(0, P_PAD)
    nn = tl.arange(0, N_PAD)
    pmask, nmask = pp < P, nn < N
    row = ((bi * H + hi) * NC + ci) * Q
    pos_j = ci * Q + j
    ok_j = (j < Q) & (pos_j < L)
    a_j = tl.load(ACUM + row + j, mask=j < Q, other=0.0)
    d_j = tl.load(DELTA + row + j, mask=j < Q, other=0.0)
    a_end = tl.load(ACUM + row + Q - 1)
    xo = bi * sx_b + hi * sx_h + pp[None, :] * sx_p
    yo = bi * sy_b + hi * sy_h + pp[None, :] * sy_p
    bo = bi * sb_b + gi * sb_g + nn[None, :] * sb_n
    x_j = tl.load(X + xo + pos_j[:, None] * sx_l, mask=ok_j[:, None] & pmask[None, :],
                  other=0.0).to(tl.float32)
    dy_j = tl.load(DY + yo + pos_j[:, None] * sy_l, mask=ok_j[:, None] & pmask[None, :],
                   other=0.0).to(tl.float32)
    b_j = tl.load(BM_ + bo + pos_j[:, None] * sb_l, mask=ok_j[:, None] & nmask[None, :],
                  other=0.0).to(tl.float32)
    c_j = tl.load(CM + bo + pos_j[:, None] * sb_l, mask=ok_j[:, None] & nmask[None, :],
                  other=0.0).to(tl.float32)
    so = (((bi * NC + ci) * H + hi) * P + pp[:, None]) * N + nn[None, :]
    smask = pmask[:, None] & nmask[None, :]
    ds = tl.load(DS + so, mask=smask, other=0.0)  # (P_PAD, N_PAD)
    hin = tl.load(HIN + so, mask=smask, other=0.0)
    keep_end, keep_in = ok_j, ok_j
    if HAS_SEQ:
        s_in, s_end = _seg_bounds(SEG, bi, ci, L, Q)
        s_j = tl.load(SEG + bi * L + pos_j, mask=ok_j, other=-1)
        keep_end = keep_end & (s_j == s_end)
        keep_in = keep_in & (s_j == s_in)
    # state term: S depends on x_j, Δ_j, B_j, a^_j, a^_end
    w_j = tl.exp(tl.where(keep_end, a_end - a_j, -float("inf")))
    dxdt = tl.dot(b_j, tl.trans(ds), input_precision=DOT_PREC) * w_j[:, None]  # (BLK, P_PAD)
    u_j = d_j * tl.sum(x_j * dxdt, axis=1)
    # inter-chunk output term, rows j read as outputs: d a^_j += dy_j . y_inter_j
    y_in = (tl.dot(c_j, tl.trans(hin), input_precision=DOT_PREC)
            * tl.exp(tl.where(keep_in, a_j, -float("inf")))[:, None])
    dacum = tl.sum(dy_j * y_in, axis=1) - u_j
    # intra-chunk: output rows i >= j
    for i0 in range(jb * BLK, Q, BLK):
        i = i0 + tl.arange(0, BLK)
        pos_i = ci * Q + i
        ok_i = (i < Q) & (pos_i < L)
        a_i = tl.load(ACUM + row + i, mask=i < Q, other=0.0)
        dy_i = tl.load(DY + yo + pos_i[:, None] * sy_l, mask=ok_i[:, None] & pmask[None, :],
                       other=0.0).to(tl.float32)
        c_i = tl.load(CM + bo + pos_i[:, None] * sb_l, mask=ok_i[:, None] & nmask[None, :],
                      other=0.0).to(tl.float32)
        keep = (i[None, :] >= j[:, None]) & ok_i[None, :] & ok_j[:, None]  # (BLK_j, BLK_i)
        if HAS_SEQ:
            s_i = tl.load(SEG + bi * L + pos_i, mask=ok_i, other=-2)
            keep = keep & (s_i[None, :] == s_j[:, None])
        decay = tl.exp(tl.where(keep, a_i[None, :] - a_j[:, None], -float("inf")))  # L_ij, transposed
        pt = tl.dot(b_j, tl.trans(c_i), input_precision=DOT_PREC) * decay  # (BLK_j, BLK_i)
        dxdt += tl.dot(pt, dy_i, input_precision=DOT_PREC)
        t_ji = pt * tl.dot(x_j, tl.trans(dy_i), input_precision=DOT_PREC) * d_j[:, None]  # T_ij, transposed
        dacum -= tl.sum(t_ji, axis=1)
        tl.store(DAROW + (((bi * H + hi) * NC + ci) * nblk + jb) * Q + i, tl.sum(t_ji, axis=0), mask=i < Q)
    dx = dxdt * d_j[:, None]
    if HAS_D:
        dx += dy_j * tl.load(DV + hi * sd_h + pp * sd_p, mask=pmask, other=0.0).to(tl.float32)[None, :]
    tl.store(DX + xo + pos_j[:, None] * sx_l, dx.to(DX.dtype.element_ty), mask=ok_j[:, None] & pmask[None, :])
    tl.store(DDT + row + j, tl.sum(x_j * dxdt, axis=1), mask=j < Q)
    tl.store(DACUM + row + j, dacum, mask=j < Q)
    tl.store(U + row + j, u_j, mask=j < Q)


@_jit
def _scan_bwd_dbdc_kernel(X, BM_, CM, DY, DELTA, ACUM, SEG, HIN, DS, DB, DC, L, H, NC, Q, R, P, N,
                          sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sy_b, sy_l, sy_h, sy_p,
                          HAS_SEQ: tl.constexpr, BLK: tl.constexpr, P_PAD: tl.constexpr, N_PAD: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """dB and dC of one block of rows k of one chunk of one group, summed over the group's R heads:
    dC_k = sum_heads exp(a^_k)[s_k = s_in] dy_k H + sum_{j<=k} L_kj Δ_j (dy_k . x_j) B_j
    dB_k = sum_heads [s_k = s_end] exp(a^_end - a^_k) Δ_k x_k dS + sum_{i>=k} L_ik Δ_k (dy_i . x_k) C_i"""
    kb = tl.program_id(0)
    bi, ci = tl.program_id(1) // NC, tl.program_id(1) % NC
    gi = tl.program_id(2)
    k = kb * BLK + tl.arange(0, BLK)
    pp = tl.arange(0, P_PAD)
    nn = tl.arange(0, N_PAD)
    pmask, nmask = pp < P, nn < N
    pos_k = ci * Q + k
    ok_k = (k < Q) & (pos_k < L)
    bo = bi * sb_b + gi * sb_g + nn[None, :] * sb_n
    bkmask = ok_k[:, None] & nmask[None, :]
    keep_end, keep_in = ok_k, ok_k
    if HAS_SEQ:
        s_in, s_end = _seg_bounds(SEG, bi, ci, L, Q)
        s_k = tl.load(SEG + bi * L + pos_k, mask=ok_k, other=-1)
        keep_end = keep_end & (s_k == s_end)
        keep_in = keep_in & (s_k == s_in)
    db = tl.zeros((BLK, N_PAD), dtype=tl.float32)
    dc = tl.zeros((BLK, N_PAD), dtype=tl.float32)
    for r in range(0, R):
        hi = gi * R + r
        row = ((bi * H + hi) * NC + ci) * Q
        xo = bi * sx_b + hi * sx_h + pp[None, :] * sx_p
        yo = bi * sy_b + hi * sy_h + pp[None, :] * sy_p
        a_k = tl.load(ACUM + row + k, mask=k < Q, other=0.0)
        d_k = tl.load(DELTA + row + k, mask=k < Q, other=0.0)
        a_end = tl.load(ACUM + row + Q - 1)
        x_k = tl.load(X + xo + pos_k[:, None] * sx_l, mask=ok_k[:, None] & pmask[None, :],
                      other=0.0).to(tl.float32)
        dy_k = tl.load(DY + yo + pos_k[:, None] * sy_l, mask=ok_k[:, None] & pmask[None, :],
                       other=0.0).to(tl.float32)
        so = (((bi * NC + ci) * H + hi) * P + pp[:, None]) * N + nn[None, :]
        smask = pmask[:, None] & nmask[None, :]
        hin = tl.load(HIN + so, mask=smask, other=0.0)  # (P_PAD, N_PAD)
        ds = tl.load(DS + so, mask=smask, other=0.0)
        v_k = tl.exp(tl.where(keep_in, a_k, -float("inf")))
        dc += tl.dot(dy_k, hin, input_precision=DOT_PREC) * v_k[:, None]
        w_k = tl.exp(tl.where(keep_end, a_end - a_k, -float("inf"))) * d_k
        db += tl.dot(x_k, ds, input_precision=DOT_PREC) * w_k[:, None]
        for j0 in range(0, (kb + 1) * BLK, BLK):  # rows k as outputs i, inputs j <= k
            j = j0 + tl.arange(0, BLK)
            pos_j = ci * Q + j
            ok_j = (j < Q) & (pos_j < L)
            a_j = tl.load(ACUM + row + j, mask=j < Q, other=0.0)
            d_j = tl.load(DELTA + row + j, mask=j < Q, other=0.0)
            x_j = tl.load(X + xo + pos_j[:, None] * sx_l, mask=ok_j[:, None] & pmask[None, :],
                          other=0.0).to(tl.float32)
            b_j = tl.load(BM_ + bo + pos_j[:, None] * sb_l, mask=ok_j[:, None] & nmask[None, :],
                          other=0.0).to(tl.float32)
            keep = (j[None, :] <= k[:, None]) & ok_j[None, :] & ok_k[:, None]
            if HAS_SEQ:
                s_j = tl.load(SEG + bi * L + pos_j, mask=ok_j, other=-2)
                keep = keep & (s_j[None, :] == s_k[:, None])
            decay = tl.exp(tl.where(keep, a_k[:, None] - a_j[None, :], -float("inf")))  # (BLK_k, BLK_j)
            m = tl.dot(dy_k, tl.trans(x_j), input_precision=DOT_PREC)  # dy_k . x_j
            dc += tl.dot(decay * m * d_j[None, :], b_j, input_precision=DOT_PREC)
        for i0 in range(kb * BLK, Q, BLK):  # rows k as inputs j, outputs i >= k
            i = i0 + tl.arange(0, BLK)
            pos_i = ci * Q + i
            ok_i = (i < Q) & (pos_i < L)
            a_i = tl.load(ACUM + row + i, mask=i < Q, other=0.0)
            dy_i = tl.load(DY + yo + pos_i[:, None] * sy_l, mask=ok_i[:, None] & pmask[None, :],
                          other=0.0).to(tl.float32)
            c_i = tl.load(CM + bo + pos_i[:, None] * sb_l, mask=ok_i[:, None] & nmask[None, :],
                          other=0.0).to(tl.float32)
            keep = (i[None, :] >= k[:, None]) & ok_i[None, :] & ok_k[:, None]
            if HAS_SEQ:
                s_i = tl.load(SEG + bi * L + pos_i, mask=ok_i, other=-2)
                keep = keep & (s_i[None, :] == s_k[:, None])
            decay = tl.exp(tl.where(keep, a_i[None, :] - a_k[:, None], -float("inf")))  # (BLK_k, BLK_i)
            m = tl.dot(x_k, tl.trans(dy_i), input_precision=DOT_PREC)  # x_k . dy_i
            db += tl.dot(decay * m * d_k[:, None], c_i, input_precision=DOT_PREC)
    tl.store(DB + bo + pos_k[:, None] * sb_l, db.to(DB.dtype.element_ty), mask=bkmask)
    tl.store(DC + bo + pos_k[:, None] * sb_l, dc.to(DC.dtype.element_ty), mask=bkmask)


@_jit
def _dt_bwd_kernel(DT, DT_BIAS, A, DELTA, DACUM, DDT_DIRECT, DDT, DA_PART, L, H, NC, Q, s_b, s_l, s_h, lo, hi,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q_PAD: tl.constexpr, BH: tl.constexpr):
    """da_k = sum_{i>=k} da^_i (reverse cumsum in the chunk); dΔ = dΔ_direct + A da; through the clamp
    (gradient passes where lo <= v <= hi, like torch.clamp) and softplus to d dt (fp32, (b, l, h)).
    DA_PART (b*c, h): sum_k Δ_k da_k of this chunk (dA, summed on the host)."""
    pid = tl.program_id(0)
    bi, ci = pid // NC, pid % NC
    t = tl.arange(0, Q_PAD)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    pos = ci * Q + t
    hmask = hh < H
    valid = ((t < Q) & (pos < L))[:, None] & hmask[None, :]
    inq = (t < Q)[:, None] & hmask[None, :]
    off = ((bi * H + hh[None, :]) * NC + ci) * Q + t[:, None]
    dacum = tl.load(DACUM + off, mask=inq, other=0.0)
    da = tl.sum(dacum, axis=0)[None, :] - tl.cumsum(dacum, axis=0) + dacum  # (Q_PAD, BH)
    av = tl.load(A + hh, mask=hmask, other=0.0).to(tl.float32)
    d = tl.load(DELTA + off, mask=inq, other=0.0)
    g = tl.load(DDT_DIRECT + off, mask=inq, other=0.0) + av[None, :] * da
    tl.store(DA_PART + pid * H + hh, tl.sum(tl.where(valid, d * da, 0.0), axis=0), mask=hmask)
    v = tl.load(DT + bi * s_b + pos[:, None] * s_l + hh[None, :] * s_h, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(DT_BIAS + hh, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        sp = _softplus(v)
        g = tl.where((sp >= lo) & (sp <= hi), g, 0.0)
        g = tl.where(v > 20.0, g, g / (1.0 + tl.exp(-tl.maximum(v, -80.0))))  # * sigmoid(v)
    else:
        g = tl.where((v >= lo) & (v <= hi), g, 0.0)
    tl.store(DDT + bi * L * H + pos[:, None] * H + hh[None, :], g, mask=valid)


@_jit
def _step_kernel(STATE, X, DT, DT_BIAS, A, BM_, CM, DV, Y, H, R, P, N,
                 ss_b, ss_h, ss_p, ss_n, sx_b, sx_h, sx_p, sdt_b, sdt_h, sb_b, sb_g, sb_n, sy_b, sy_h, sy_p,
                 sd_h, sd_p, lo, hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                 BP: tl.constexpr, N_PAD: tl.constexpr):
    """One token: h <- exp(Δ A) h + Δ x B^T (in place, fp32 maths); y = h C + D x."""
    bi, hi_ = tl.program_id(0) // H, tl.program_id(0) % H
    gi = hi_ // R
    pp = tl.program_id(1) * BP + tl.arange(0, BP)
    nn = tl.arange(0, N_PAD)
    pmask, nmask = pp < P, nn < N
    v = tl.load(DT + bi * sdt_b + hi_ * sdt_h).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(DT_BIAS + hi_).to(tl.float32)
    if SOFTPLUS:
        v = _softplus(v)
    d = tl.minimum(tl.maximum(v, lo), hi)
    decay = tl.exp(d * tl.load(A + hi_).to(tl.float32))
    x = tl.load(X + bi * sx_b + hi_ * sx_h + pp * sx_p, mask=pmask, other=0.0).to(tl.float32)  # (BP,)
    b = tl.load(BM_ + bi * sb_b + gi * sb_g + nn * sb_n, mask=nmask, other=0.0).to(tl.float32)  # (N_PAD,)
    c = tl.load(CM + bi * sb_b + gi * sb_g + nn * sb_n, mask=nmask, other=0.0).to(tl.float32)
    so = STATE + bi * ss_b + hi_ * ss_h + pp[:, None] * ss_p + nn[None, :] * ss_n
    smask = pmask[:, None] & nmask[None, :]
    st = tl.load(so, mask=smask, other=0.0).to(tl.float32)  # (BP, N_PAD)
    st = decay * st + (d * x)[:, None] * b[None, :]
    tl.store(so, st.to(STATE.dtype.element_ty), mask=smask)
    y = tl.sum(st * c[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(DV + hi_ * sd_h + pp * sd_p, mask=pmask, other=0.0).to(tl.float32)
    tl.store(Y + bi * sy_b + hi_ * sy_h + pp * sy_p, y.to(Y.dtype.element_ty), mask=pmask)


# ----------------------------------------------------------------------------------------------
# launch: block sizes, the autograd Function, the public functions
# ----------------------------------------------------------------------------------------------

def _pow2(v, lo=16):
    return max(lo, triton.next_power_of_2(v))


def _dot_precision(is_cuda):
    """Exact fp32 dots in the interpreter; TF32 on the GPU (the inputs are bf16/fp16 there anyway)."""
    return "tf32" if is_cuda else "ieee"


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


class _Ctx:
    """Sizes and launch parameters shared by the forward and backward launches of one call."""

    def __init__(self, x, B, chunk_size):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2], B.shape[3]
        self.r, self.Q = self.h // self.g, chunk_size
        self.nc = triton.cdiv(self.l, self.Q)
        self.q_pad = _pow2(self.Q, 1)
        self.blk = min(MAX_BLOCK, _pow2(self.Q))  # chunk rows per tile
        self.p_pad, self.n_pad = _pow2(self.p), _pow2(self.n)
        self.bp = min(MAX_BLOCK, self.p_pad)
        self.bn = min(MAX_BLOCK, self.n_pad)
        self.pn = self.p * self.n
        self.bs = min(16 * MAX_BLOCK, _pow2(self.pn))  # state elements per program in the passes
        self.bh = min(16, _pow2(self.h, 1))
        self.prec = _dot_precision(x.is_cuda)
        # big fp32 tiles: spread them
        self.warps = 8 if x.is_cuda and self.blk * self.n_pad >= 64 * 128 else 4


def _forward_states(k, x, dt, A, B, dt_bias, softplus, lo, hi, h0, seg):
    """Δ, a^ (b, h, c, Q), H entering each chunk (b, c, h, p, n) and the final state (b, h, p, n)."""
    f32 = torch.float32
    delta = _empty(k.b, k.h, k.nc, k.Q, like=x, dtype=f32)
    acum = _empty(k.b, k.h, k.nc, k.Q, like=x, dtype=f32)
    _dt_kernel[(k.b * k.nc, triton.cdiv(k.h, k.bh))](
        dt, dt_bias if dt_bias is not None else dt, A, delta, acum, k.l, k.h, k.nc, k.Q,
        dt.stride(0), dt.stride(1), dt.stride(2), lo, hi,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, Q_PAD=k.q_pad, BH=k.bh)
    seg_arg = seg if seg is not None else delta
    S = _empty(k.b, k.nc, k.h, k.p, k.n, like=x, dtype=f32)
    grid = (triton.cdiv(k.p, k.bp) * triton.cdiv(k.n, k.bn), k.b * k.nc, k.h)
    _chunk_state_kernel[grid](
        x, B, delta, acum, seg_arg, S, k.l, k.h, k.nc, k.Q, k.r, k.p, k.n, *_strides4(x), *_strides4(B),
        MODE=0, HAS_SEQ=seg is not None, BK=k.blk, BP=k.bp, BN=k.bn, DOT_PREC=k.prec)
    hin = _empty(k.b, k.nc, k.h, k.p, k.n, like=x, dtype=f32)
    final = _empty(k.b, k.h, k.p, k.n, like=x, dtype=f32)
    _state_pass_kernel[(triton.cdiv(k.pn, k.bs), k.b * k.h)](
        S, h0 if h0 is not None else S, acum, seg_arg, hin, final, k.l, k.h, k.nc, k.Q, k.pn,
        HAS_INIT=h0 is not None, HAS_SEQ=seg is not None, BS=k.bs)
    return delta, acum, hin, final


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, h0, seg, chunk_size, softplus, lo, hi):
        k = _Ctx(x, B, chunk_size)
        delta, acum, hin, final = _forward_states(k, x, dt, A, B, dt_bias, softplus, lo, hi, h0, seg)
        y = _empty(x.shape, like=x)  # (b, l, h, p)
        Dv = D.view(k.h, -1).expand(k.h, k.p) if D is not None else None  # (h, p), stride 0 over p for D (h,)
        grid = (triton.cdiv(k.Q, k.blk) * triton.cdiv(k.p, k.bp), k.b * k.nc, k.h)
        _chunk_scan_kernel[grid](
            x, B, C, delta, acum, seg if seg is not None else delta, hin, Dv if D is not None else x, y,
            k.l, k.h, k.nc, k.Q, k.r, k.p, k.n, *_strides4(x), *_strides4(B), *_strides4(y),
            *(Dv.stride() if D is not None else (0, 0)),
            HAS_D=D is not None, HAS_SEQ=seg is not None, BLK=k.blk, BP=k.bp, N_PAD=k.n_pad, DOT_PREC=k.prec,
            num_warps=k.warps)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, h0, seg)
        ctx.args = (chunk_size, softplus, lo, hi)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, h0, seg = ctx.saved_tensors
        chunk_size, softplus, lo, hi = ctx.args
        k = _Ctx(x, B, chunk_size)
        f32 = torch.float32
        if dy is None:
            dy = torch.zeros_like(x)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        delta, acum, hin, _ = _forward_states(k, x, dt, A, B, dt_bias, softplus, lo, hi, h0, seg)
        seg_arg = seg if seg is not None else delta
        has_seq = seg is not None
        # G: what each chunk's outputs ask of the state entering it
        G = _empty(k.b, k.nc, k.h, k.p, k.n, like=x, dtype=f32)
        grid = (triton.cdiv(k.p, k.bp) * triton.cdiv(k.n, k.bn), k.b * k.nc, k.h)
        _chunk_state_kernel[grid](
            dy, C, delta, acum, seg_arg, G, k.l, k.h, k.nc, k.Q, k.r, k.p, k.n, *_strides4(dy), *_strides4(C),
            MODE=1, HAS_SEQ=has_seq, BK=k.blk, BP=k.bp, BN=k.bn, DOT_PREC=k.prec)
        # reverse state passing
        nsb = triton.cdiv(k.pn, k.bs)
        dS = _empty(k.b, k.nc, k.h, k.p, k.n, like=x, dtype=f32)
        dh0 = _empty(k.b, k.h, k.p, k.n, like=x, dtype=f32)
        drho = _empty(k.b, k.h, k.nc, nsb, like=x, dtype=f32)
        if dfinal is not None:
            dfinal = dfinal.float().contiguous()
        _state_pass_bwd_kernel[(nsb, k.b * k.h)](
            G, hin, dfinal if dfinal is not None else G, acum, seg_arg, dS, dh0, drho,
            k.l, k.h, k.nc, k.Q, k.pn,
            HAS_DFINAL=dfinal is not None, HAS_SEQ=has_seq, BS=k.bs)
        # dx, direct dΔ, da^
        nblk = triton.cdiv(k.Q, k.blk)
        Dv = D.view(k.h, -1).expand(k.h, k.p) if D is not None else None
        dx = _empty(x.shape, like=x)
        ddt_direct = _empty(k.b, k.h, k.nc, k.Q, like=x, dtype=f32)
        dacum = _empty(k.b, k.h, k.nc, k.Q, like=x, dtype=f32)
        u = _empty(k.b, k.h, k.nc, k.Q, like=x, dtype=f32)
        # row-sum partials: a block writes only rows at or after its own, so the rest must read as zero
        darow = torch.zeros(k.b, k.h, k.nc, nblk, k.Q, device=x.device, dtype=f32)
        _scan_bwd_dx_kernel[(nblk, k.b * k.nc, k.h)](
            x, B, C, dy, delta, acum, seg_arg, hin, dS, Dv if D is not None else x,
            dx, ddt_direct, dacum, darow, u,
            k.l, k.h, k.nc, k.Q, k.r, k.p, k.n, *_strides4(x), *_strides4(B), *_strides4(dy),
            *(Dv.stride() if D is not None else (0, 0)),
            HAS_D=D is not None, HAS_SEQ=has_seq, BLK=k.blk, P_PAD=k.p_pad, N_PAD=k.n_pad, DOT_PREC=k.prec,
            num_warps=k.warps)
        dB, dC = _empty(B.shape, like=B), _empty(C.shape, like=C)
        _scan_bwd_dbdc_kernel[(nblk, k.b * k.nc, k.g)](
            x, B, C, dy, delta, acum, seg_arg, hin, dS, dB, dC, k.l, k.h, k.nc, k.Q, k.r, k.p, k.n,
            *_strides4(x), *_strides4(B), *_strides4(dy),
            HAS_SEQ=has_seq, BLK=k.blk, P_PAD=k.p_pad, N_PAD=k.n_pad, DOT_PREC=k.prec, num_warps=k.warps)
        # host reductions of the partials: d a^ = own + row sums; a^_end also gets the S and ρ terms
        dacum = dacum + darow.sum(3)
        dacum[..., -1] += u.sum(-1) + drho.sum(-1)
        ddt32 = _empty(k.b, k.l, k.h, like=x, dtype=f32)
        da_part = _empty(k.b * k.nc, k.h, like=x, dtype=f32)
        _dt_bwd_kernel[(k.b * k.nc, triton.cdiv(k.h, k.bh))](
            dt, dt_bias if dt_bias is not None else dt, A, delta, dacum.contiguous(), ddt_direct,
            ddt32, da_part,
            k.l, k.h, k.nc, k.Q, dt.stride(0), dt.stride(1), dt.stride(2), lo, hi,
            HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, Q_PAD=k.q_pad, BH=k.bh)
        dA = da_part.sum(0).to(A.dtype) if ctx.needs_input_grad[2] else None
        dD = None
        if D is not None and ctx.needs_input_grad[5]:
            prod = (dy.float() * x.float()).sum((0, 1))  # (h, p)
            dD = (prod.sum(-1) if D.dim() == 1 else prod).to(D.dtype)
        ddt_bias = (ddt32.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None and ctx.needs_input_grad[6]
                    else None)
        dh0_out = dh0.to(h0.dtype) if h0 is not None and ctx.needs_input_grad[7] else None
        return (dx, ddt32.to(dt.dtype), dA, dB, dC, dD, ddt_bias, dh0_out,
                None, None, None, None, None)


def ssd_scan(x, dt, A, B, C, *, chunk_size, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF),
             initial_states=None, seq_idx=None, return_final_states=False):
    """Chunked SSD scan; mamba_chunk_scan_combined's arguments (see the module docstring).
    Returns y (b, l, h, p) in x's dtype [, final states (b, h, p, n) fp32]."""
    if not use_triton(x):  # the chunked PyTorch scan (checks its arguments itself)
        return ssd_scan_torch(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias,
                              dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
                              seq_idx=seq_idx, return_final_states=return_final_states)
    _check_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_states, seq_idx)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if x.shape[1] == 0:
        raise ValueError(f"{WHERE}: ssd_scan: x has no positions (seqlen 0)")
    if max(x.shape[-1], B.shape[-1]) > 256:
        raise ValueError(f"{WHERE}: ssd_scan: head_dim and state size must be at most 256 for the Triton "
                         f"kernels, got {x.shape[-1]} and {B.shape[-1]}")
    seg = _segments(seq_idx).contiguous() if seq_idx is not None else None
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()  # dx, dB, dC are written with these strides
    h0 = initial_states.contiguous() if initial_states is not None else None
    y, final = _SSDScan.apply(x, dt, A.contiguous(), B, C, D.contiguous() if D is not None else None,
                              dt_bias.contiguous() if dt_bias is not None else None, h0, seg,
                              chunk_size, bool(dt_softplus), lo, hi)
    return (y, final) if return_final_states else y


def ssd_step(state, x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF)):
    """One decode step for one token per sequence: state (b, h, p, n) is updated in place,
    x (b, h, p), dt (b, h), A (h,), B and C (b, g, n), D (h,) or (h, p), dt_bias (h,).
    Returns y (b, h, p) in x's dtype. No autograd (decode)."""
    f = f"{WHERE}: ssd_step"
    if x.dim() != 3:
        raise ValueError(f"{f}: x must be (batch, heads, head_dim), got {tuple(x.shape)}")
    b, h, p = x.shape
    if B.dim() != 3 or B.shape[0] != b or B.shape != C.shape or h % B.shape[1]:
        raise ValueError(f"{f}: B and C must both be ({b}, groups, state) with groups dividing {h}, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[1], B.shape[2]
    for name, t, shape in (("state", state, (b, h, p, n)), ("dt", dt, (b, h)), ("A", A, (h,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{f}: {name} must be {shape}, got {tuple(t.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (h,):
        raise ValueError(f"{f}: dt_bias must be ({h},), got {tuple(dt_bias.shape)}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"{f}: D must be ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if not use_triton(x):
        with torch.no_grad():
            return _step_torch(state, x, dt, A, B, C, D, dt_bias, dt_softplus, (lo, hi)).to(x.dtype)
    y = _empty(b, h, p, like=x)
    Dv = D.view(h, -1).expand(h, p) if D is not None else None
    bp = min(MAX_BLOCK, _pow2(p))
    _step_kernel[(b * h, triton.cdiv(p, bp))](
        state, x, dt, dt_bias if dt_bias is not None else dt, A, B, C, Dv if D is not None else x, y,
        h, h // g, p, n, *_strides4(state), x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1), y.stride(2),
        *(Dv.stride() if D is not None else (0, 0)), lo, hi,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_D=D is not None, BP=bp, N_PAD=_pow2(n))
    return y
