"""The Mamba2 mixer alone: in_proj -> causal conv1d -> SSD scan -> gated RMSNorm -> out_proj.

Symbols follow the Mamba2 / SSD paper (Dao & Gu, 2024): per head the selective state space model is

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t^T        h: (p, n) state, A < 0 a scalar per head
    y_t = h_t C_t + D x_t                           x, y: (p,), B, C: (n,), Δ_t > 0 the time step

Shape letters: b batch, l sequence, h heads, p head dim, g groups (heads share B and C within a group,
head i uses group i // (h // g)), n state size, c chunks, Q chunk length, K conv kernel.

Public:
  ssd_scan(x, dt, A, B, C, *, chunk_size, ...)   chunked SSD scan, the argument conventions of mamba_ssm's
                                                  `mamba_chunk_scan_combined` (pure PyTorch reference)
  ssd_scan_naive(...)                            the same maths as a per-step recurrence (test reference)
  Mamba2Cache                                    per-layer decode state: conv_state, ssm_state; keep(rows)
  Mamba2Mixer(hidden_size=..., ...)              parameter names match Hugging Face's Mamba2 / Nemotron-H /
                                                  GraniteMoeHybrid mixers, so state dicts load 1:1

On CUDA, `kernels/ssd.py` (Triton) is meant to replace `ssd_scan` behind the same signature; the mixer
looks the function up at call time (`mamba.ssd_scan`), so assigning it swaps the implementation.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INF = float("inf")


# ----------------------------------------------------------------------------------------------------
# SSD scan


def _check_scan_args(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx):
    """Shape checks for ssd_scan / ssd_scan_naive; ValueError naming the argument."""
    if x.dim() != 4:
        raise ValueError(f"mamba.py ssd_scan: x must be (batch, seqlen, heads, head_dim), got {tuple(x.shape)}")
    b, l, h, p = x.shape
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"mamba.py ssd_scan: dt must be {(b, l, h)} (batch, seqlen, heads), got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"mamba.py ssd_scan: A must be ({h},) (one per head), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(
            f"mamba.py ssd_scan: B and C must both be ({b}, {l}, groups, state), got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"mamba.py ssd_scan: heads ({h}) of x must be a multiple of the groups ({g}) of B and C")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"mamba.py ssd_scan: chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"mamba.py ssd_scan: D must be ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (h,):
        raise ValueError(f"mamba.py ssd_scan: dt_bias must be ({h},), got {tuple(dt_bias.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (b, h, p, n):
        raise ValueError(
            f"mamba.py ssd_scan: initial_states must be {(b, h, p, n)} (batch, heads, head_dim, state), "
            f"got {tuple(initial_states.shape)}"
        )
    if seq_idx is not None and tuple(seq_idx.shape) != (b, l):
        raise ValueError(f"mamba.py ssd_scan: seq_idx must be {(b, l)} (batch, seqlen), got {tuple(seq_idx.shape)}")


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit):
    """Δ = clamp(softplus(dt + dt_bias)) in fp32, as mamba_ssm does (it clamps even at the default limits)."""
    dt = dt.float()  # (b, l, h)
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20 like mamba_ssm
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def _segment_ids(seq_idx):
    """(b, l) document ids -> (b, l) int64 segment numbers 0, 0, 1, 1, ...: +1 wherever the id changes."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()  # (b, l-1)
    return F.pad(change.cumsum(-1), (1, 0))  # (b, l), position 0 is always segment 0


def ssd_scan(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size,
    D=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, INF),
    initial_states=None,
    seq_idx=None,
    return_final_states=False,
):
    """Chunked SSD scan (quadratic inside a chunk, a recurrence across chunks), pure PyTorch, fp32 inside.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,) or (h, p), dt_bias (h,).
    Δ = clamp(softplus?(dt + dt_bias), *dt_limit). initial_states (b, h, p, n) seed the segment that holds
    position 0. seq_idx (b, l) ints: the state resets wherever seq_idx[:, t] != seq_idx[:, t-1] (packed
    documents). Any l (the last chunk is zero-padded inside: Δ = 0 there, so the state is untouched).
    Returns y (b, l, h, p) in x's dtype [, final states (b, h, p, n) in fp32].
    """
    _check_scan_args(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, Q = h // g, chunk_size  # heads per group, chunk length
    out_dtype = x.dtype

    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h) Δ
    x, B, C, A = x.float(), B.float(), C.float(), A.float()
    seg = _segment_ids(seq_idx) if seq_idx is not None else None  # (b, l)
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

    # 2. State each chunk builds by its end, starting from zero: S_c = sum_j exp(a_cum_end - a_cum_j) Δ_j x_j B_j^T.
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
        seg_end = F.pad(seg[..., -1], (1, 0))  # (b, c+1): segment at the end of chunk k-1 (0 for the initial state)
        keep = keep & (seg_end[:, :, None] == seg_end[:, None, :])  # (b, k, z)
    keep = keep[..., None, None]  # (..., k, z, 1, 1)
    decay_chunks = torch.exp((a_chunk[:, :, None] - a_chunk[:, None, :]).masked_fill(~keep, -INF))  # (b, k, z, g, r)
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


def ssd_scan_naive(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=None,
    D=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, INF),
    initial_states=None,
    seq_idx=None,
    return_final_states=False,
):
    """The SSM as its per-step recurrence, one step at a time; ssd_scan's signature (chunk_size unused).

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T;  y_t = h_t C_t + D x_t;  h reset to 0 where seq_idx changes.
    """
    _check_scan_args(x, dt, A, B, C, chunk_size or 1, D, dt_bias, initial_states, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h) Δ
    x, A = x.float(), A.float()
    B = B.float().repeat_interleave(h // g, dim=2)  # (b, l, h, n): head i reads group i // (h // g)
    C = C.float().repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    if D is not None:
        D = D.float().view(h, -1)  # (h, 1) or (h, p)
    state = initial_states.float() if initial_states is not None else x.new_zeros(b, h, p, n)  # (b, h, p, n)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:  # a new document starts from a zero state
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).view(b, 1, 1, 1)
        dA = torch.exp(dt[:, t] * A)  # (b, h)
        state = dA[..., None, None] * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        y_t = torch.einsum("bhpn,bhn->bhp", state, C[:, t])  # (b, h, p)
        if D is not None:
            y_t = y_t + D * x[:, t]
        ys.append(y_t)
    y = torch.stack(ys, dim=1).to(out_dtype)  # (b, l, h, p)
    return (y, state) if return_final_states else y
