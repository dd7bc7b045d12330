"""The Mamba2 mixer alone: in_proj -> causal conv1d -> SSD scan -> gated RMSNorm -> out_proj.

Symbols follow the Mamba2 / SSD paper (Dao & Gu, 2024): per head the selective state space model is

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t^T        h: (p, n) state, A < 0 a scalar per head
    y_t = h_t C_t + D x_t                           x, y: (p,), B, C: (n,), Δ_t > 0 the time step

Shape letters: b batch, l sequence, h heads, p head dim, g groups (heads share B and C within a group,
head i uses group i // (h // g)), n state size, c chunks, Q chunk length, K conv kernel.

Public:
  ssd_scan(x, dt, A, B, C, *, chunk_size, ...)   chunked SSD scan, the argument conventions of mamba_ssm's
                                                  `mamba_chunk_scan_combined` (pure PyTorch; kernels/ssd.py's
                                                  `ssd_scan_torch`, re-exported: one implementation)
  ssd_scan_naive(...)                            the same maths as a per-step recurrence (test reference)
  Mamba2Cache                                    per-layer decode state: conv_state, ssm_state; keep(rows)
  Mamba2Mixer(hidden_size=..., ...)              parameter names match Hugging Face's Mamba2 / Nemotron-H /
                                                  GraniteMoeHybrid mixers, so state dicts load 1:1

The mixer runs `kernels/ssd.py`'s Triton scan and decode step when `kernels.ssd.use_triton` says so (CUDA
tensors; PRISM_SSD=auto|triton|torch forces a path) and this module's `ssd_scan` otherwise; the latter is
looked up at call time (`mamba.ssd_scan`), so assigning it swaps the PyTorch implementation the mixer uses
(kernels.ssd.ssd_scan's own fallback always runs kernels.ssd.ssd_scan_torch).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ssd as ssd_kernels  # Triton SSD; imports without triton (then the PyTorch path runs)

INF = float("inf")


# ----------------------------------------------------------------------------------------------------
# SSD scan


# The chunked scan lives in kernels/ssd.py (its fallback path, one implementation); re-exported here. The
# mixer looks `ssd_scan` up in this module at call time, so assigning mamba.ssd_scan still swaps the
# PyTorch path.
ssd_scan = ssd_kernels.ssd_scan_torch


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
    ssd_kernels._check_scan(x, dt, A, B, C, chunk_size or 1, D, dt_bias, dt_limit, initial_states, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    dt = ssd_kernels._delta(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h) Δ
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
        state = (dA[..., None, None] * state
                 + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :])
        y_t = torch.einsum("bhpn,bhn->bhp", state, C[:, t])  # (b, h, p)
        if D is not None:
            y_t = y_t + D * x[:, t]
        ys.append(y_t)
    y = torch.stack(ys, dim=1).to(out_dtype)  # (b, l, h, p)
    return (y, state) if return_final_states else y


# ----------------------------------------------------------------------------------------------------
# Mixer


@dataclass
class Mamba2Cache:
    """Decode state of one Mamba2 layer (static shapes: allocate once, update in place).

    conv_state (B, conv_dim, K-1): the last K-1 inputs of the causal conv (xBC before the conv), oldest
        first. K-1 rather than HF's K slots: a step appends the new input to make the K-wide window.
    ssm_state (B, h, p, n): the SSM state h after the last token; fp32 unless allocated otherwise.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def keep(self, rows):
        """Keep only these batch rows (an index tensor, list or bool mask), e.g. when generation drops
        finished rows. Replaces the tensors (new shapes); returns self."""
        self.conv_state = self.conv_state[rows]
        self.ssm_state = self.ssm_state[rows]
        return self

    def reset(self):
        """Zero both states in place (reuse a static cache for a new batch)."""
        self.conv_state.zero_()
        self.ssm_state.zero_()
        return self


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of d_inner // n_groups channels, gated by silu(z); fp32 inside, fp32 out.

    norm_before_gate=False: weight * rmsnorm(y * silu(z))   (HF Mamba2, Nemotron-H, GraniteMoeHybrid;
                                                              mamba_ssm's Mamba2 default)
    norm_before_gate=True:  weight * rmsnorm(y) * silu(z)
    """

    def __init__(self, d_inner, n_groups, eps, norm_before_gate):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_inner))
        self.n_groups, self.eps, self.norm_before_gate = n_groups, eps, norm_before_gate

    def forward(self, y, z):  # y, z: (..., d_inner)
        y, gate = y.float(), F.silu(z.float())
        if not self.norm_before_gate:
            y = y * gate
        y = y.unflatten(-1, (self.n_groups, -1))  # (..., g, d_inner // g)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.flatten(-2) * self.weight.float()  # (..., d_inner)
        if self.norm_before_gate:
            y = y * gate
        return y


def _doc_segments(doc_ids):
    """(B, T) document ids, negative = padding -> (B, T) int64 segment numbers starting at 0.

    A segment starts at each real token whose id differs from the previous *real* token's id; padding is
    transparent (it joins the segment of the real token before it, or segment 0 at the start), so left
    padding keeps the first document in segment 0, the one an initial / cached state continues.
    """
    real = doc_ids >= 0  # (B, T)
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    last_real = torch.where(real, pos, -1).cummax(dim=1).values  # (B, T) last real index <= t, -1 if none
    prev_real = F.pad(last_real[:, :-1], (1, 0), value=-1)  # (B, T) last real index < t
    prev_id = doc_ids.gather(1, prev_real.clamp(min=0))  # (B, T)
    start = real & (prev_real >= 0) & (doc_ids != prev_id)  # (B, T) first token of a new document
    return start.long().cumsum(dim=1)


class Mamba2Mixer(nn.Module):
    """Mamba2 mixer: in_proj -> (z, xBC, dt); causal depthwise conv + silu on xBC -> (x, B, C);
    SSD scan with Δ = clamp(softplus(dt + dt_bias), time_step_limit), A = -exp(A_log), skip D;
    gated grouped RMSNorm with z; out_proj.

    Parameter names and shapes equal Hugging Face's Mamba2Mixer / NemotronHMamba2Mixer /
    GraniteMoeHybridMambaLayer: in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj.

    forward(hidden_states (B, T, hidden), doc_ids=None, cache=None) -> (B, T, hidden)
      doc_ids (B, T) ints: an id differing from the previous real token's starts a new document (the state
        resets and the conv window does not reach across it); negative ids are padding: its conv input, x
        and Δ are zeroed, so the SSM state passes through it untouched. Padding is exact before the first
        real token of a row (left padding; with a cache that already holds state, the conv window of the
        first new tokens then reads the padding's zeros, not the cached inputs), after the last one, and
        between documents; inside a document it still takes one conv slot (as a zero input).
      cache (Mamba2Cache from allocate_cache): T > 1 continues from the cache (fresh: zero state) and
        leaves the state after the last token in it (prefill; rows must be left-padded); T == 1 is the
        O(1) recurrent step. A step with a negative doc id leaves that row's cache unchanged. A new
        document id inside a step is not detected: a cache row holds one running document.
    """

    def __init__(
        self,
        *,
        hidden_size,
        num_heads,
        head_dim,
        state_size,
        n_groups=1,
        conv_kernel=4,
        chunk_size=256,
        time_step_limit=(0.0, INF),
        use_conv_bias=True,
        use_bias=False,
        norm_eps=1e-5,
        norm_before_gate=False,
        intermediate_size=None,
        activation="silu",
    ):
        super().__init__()
        for name, value in [
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("state_size", state_size),
            ("n_groups", n_groups),
            ("conv_kernel", conv_kernel),
            ("chunk_size", chunk_size),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"mamba.py Mamba2Mixer: {name} must be a positive int, got {value!r}")
        if num_heads % n_groups:
            raise ValueError(
                f"mamba.py Mamba2Mixer: num_heads ({num_heads}) must be a multiple of n_groups ({n_groups})"
            )
        if intermediate_size is not None and intermediate_size != num_heads * head_dim:
            raise ValueError(
                f"mamba.py Mamba2Mixer: intermediate_size ({intermediate_size}) must equal "
                f"num_heads * head_dim ({num_heads} * {head_dim} = {num_heads * head_dim})"
            )
        if time_step_limit is None:
            time_step_limit = (0.0, INF)
        if len(time_step_limit) != 2 or not 0.0 <= time_step_limit[0] <= time_step_limit[1]:
            raise ValueError(
                "mamba.py Mamba2Mixer: time_step_limit must be (low, high) with 0 <= low <= high, "
                f"got {time_step_limit!r}"
            )
        if activation != "silu":
            raise ValueError(
                f"mamba.py Mamba2Mixer: activation must be 'silu' (all supported families), "
                f"got {activation!r}"
            )

        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.state_size, self.n_groups, self.conv_kernel = state_size, n_groups, conv_kernel
        self.chunk_size = chunk_size
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.d_inner = num_heads * head_dim  # x and z width
        self.conv_dim = self.d_inner + 2 * n_groups * state_size  # xBC width

        # in_proj output order: z (d_inner), xBC (conv_dim), dt (h)
        self.in_proj = nn.Linear(hidden_size, self.d_inner + self.conv_dim + num_heads, bias=use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, padding=conv_kernel - 1,
            bias=use_conv_bias
        )  # weight (conv_dim, 1, K); padding is only for state-dict / HF parity: forward pads itself
        self.dt_bias = nn.Parameter(torch.empty(num_heads))  # (h,)
        self.A_log = nn.Parameter(torch.empty(num_heads))  # (h,) A = -exp(A_log)
        self.D = nn.Parameter(torch.empty(num_heads))  # (h,)
        self.norm = GatedRMSNorm(self.d_inner, n_groups, norm_eps, norm_before_gate)
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=use_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
        """The Mamba2 initialisation of A_log, D, dt_bias (the linear / conv layers are left as they are;
        after meta-device construction and to_empty() the caller initialises those)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))  # A = -1..-h
        self.D.fill_(1.0)
        log_dt = torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_floor)  # Δ log-uniform in [dt_min, dt_max]
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus: softplus(dt_bias) = dt

    def allocate_cache(self, batch_size, device=None, dtype=None, ssm_dtype=torch.float32):
        """A zeroed Mamba2Cache: conv_state (B, conv_dim, K-1) in `dtype` (default: the weights'),
        ssm_state (B, h, p, n) in `ssm_dtype` (fp32 by default, like Nemotron-H's mamba_ssm_cache_dtype)."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        return Mamba2Cache(
            conv_state=torch.zeros(
                batch_size, self.conv_dim, self.conv_kernel - 1, device=device, dtype=dtype
            ),
            ssm_state=torch.zeros(
                batch_size, self.num_heads, self.head_dim, self.state_size, device=device, dtype=ssm_dtype
            ),
        )

    def _delta(self, dt, real):
        """Δ = clamp(softplus(dt + dt_bias), time_step_limit) in fp32; zero on padding.
        dt (..., h), real (...)."""
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
        return dt if real is None else dt * real.unsqueeze(-1)

    def forward(self, hidden_states, doc_ids=None, cache=None):
        Bsz, T, _ = hidden_states.shape
        if doc_ids is not None and tuple(doc_ids.shape) != (Bsz, T):
            raise ValueError(
                f"mamba.py Mamba2Mixer: doc_ids must be {(Bsz, T)} like hidden_states, "
                f"got {tuple(doc_ids.shape)}"
            )
        zxbcdt = self.in_proj(hidden_states)  # (B, T, d_inner + conv_dim + h)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        real = doc_ids >= 0 if doc_ids is not None else None  # (B, T) False on padding
        if cache is not None and T == 1:
            y = self._step(xBC[:, 0], dt[:, 0], cache, None if real is None else real[:, 0])[:, None]
        else:
            y = self._chunked(xBC, dt, doc_ids, real, cache)  # (B, T, d_inner)
        y = self.norm(y, z)  # (B, T, d_inner) fp32
        return self.out_proj(y.to(hidden_states.dtype))  # (B, T, hidden)

    def _conv(self, xBC_ext, seg, T):
        """Causal depthwise conv of xBC_ext (B, K-1+T, conv_dim), whose first K-1 rows are the history.
        With seg (B, T) the window only reads taps of the same segment (the history is segment 0)."""
        K, w, bias = self.conv_kernel, self.conv1d.weight, self.conv1d.bias  # w (conv_dim, 1, K)
        if seg is None:
            out = F.conv1d(xBC_ext.transpose(1, 2), w, bias, groups=self.conv_dim)  # (B, conv_dim, T)
            return out.transpose(1, 2)
        seg_ext = F.pad(seg, (K - 1, 0))  # (B, K-1+T)
        w = w[:, 0].float()  # (conv_dim, K)
        out = xBC_ext[:, K - 1 :].float() * w[:, K - 1]  # (B, T, conv_dim) tap reading x_t
        for k in range(K - 1):  # tap k reads x_{t-(K-1-k)}
            same = (seg_ext[:, k : k + T] == seg).unsqueeze(-1)  # (B, T, 1)
            out = out + xBC_ext[:, k : k + T].float() * w[:, k] * same
        if bias is not None:
            out = out + bias.float()
        return out.to(xBC_ext.dtype)

    def _chunked(self, xBC, dt, doc_ids, real, cache):
        """Whole-sequence path (training, prefill).
        xBC (B, T, conv_dim), dt (B, T, h) -> y (B, T, d_inner)."""
        Bsz, T, _ = xBC.shape
        K, h, p, g, n = self.conv_kernel, self.num_heads, self.head_dim, self.n_groups, self.state_size
        seg = None
        if doc_ids is not None:
            xBC = xBC * real.unsqueeze(-1)  # padding feeds nothing into the conv
            seg = _doc_segments(doc_ids)  # (B, T)
        if cache is not None:
            history = cache.conv_state.transpose(1, 2).to(xBC.dtype)  # (B, K-1, conv_dim)
        else:
            history = xBC.new_zeros(Bsz, K - 1, self.conv_dim)
        xBC_ext = torch.cat([history, xBC], dim=1)  # (B, K-1+T, conv_dim)
        xBC_act = F.silu(self._conv(xBC_ext, seg, T))  # (B, T, conv_dim)
        x, B, C = xBC_act.split([self.d_inner, g * n, g * n], dim=-1)
        dt = self._delta(dt, real)  # (B, T, h) Δ, zero on padding
        A = -torch.exp(self.A_log.float())  # (h,)
        scan = ssd_kernels.ssd_scan if ssd_kernels.use_triton(xBC) else ssd_scan  # ssd_scan: looked up now
        out = scan(
            x.reshape(Bsz, T, h, p),
            dt,
            A,
            B.reshape(Bsz, T, g, n),
            C.reshape(Bsz, T, g, n),
            chunk_size=self.chunk_size,
            D=self.D,
            initial_states=None if cache is None else cache.ssm_state,
            seq_idx=seg,
            return_final_states=cache is not None,
        )
        if cache is None:
            return out.reshape(Bsz, T, self.d_inner)
        y, h_final = out  # (B, T, h, p), (B, h, p, n)
        cache.ssm_state.copy_(h_final)
        if K > 1:
            last = xBC_ext[:, T:]  # (B, K-1, conv_dim) the last K-1 conv inputs
            if seg is not None:  # inputs from before the last document started are not its history
                last = last * (F.pad(seg, (K - 1, 0))[:, T:] == seg[:, -1:]).unsqueeze(-1)
            cache.conv_state.copy_(last.transpose(1, 2))
        return y.reshape(Bsz, T, self.d_inner)

    def _step(self, xBC, dt, cache, real):
        """One token, O(1): xBC (B, conv_dim), dt (B, h), real (B,) or None -> y (B, d_inner);
        updates cache."""
        Bsz = xBC.shape[0]
        h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.state_size
        r = h // g
        window = torch.cat([cache.conv_state, xBC.unsqueeze(-1).to(cache.conv_state.dtype)],
                           dim=-1)  # (B, conv_dim, K)
        conv = (window.float() * self.conv1d.weight[:, 0].float()).sum(-1)  # (B, conv_dim)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias.float()
        xBC_act = F.silu(conv.to(xBC.dtype))
        x, B, C = xBC_act.float().split([self.d_inner, g * n, g * n], dim=-1)
        x = x.view(Bsz, g, r, p)
        B = B.view(Bsz, g, 1, 1, n)
        C = C.view(Bsz, g, n)
        dt = self._delta(dt, real).view(Bsz, g, r, 1, 1)  # Δ, zero on padding: the state passes unchanged
        A = -torch.exp(self.A_log.float()).view(g, r, 1, 1)
        if ssd_kernels.use_triton(xBC):  # the same update by the Triton step kernel, in place on the state
            y = ssd_kernels.ssd_step(cache.ssm_state, x.view(Bsz, h, p), dt.view(Bsz, h), A.view(h),
                                     B.view(Bsz, g, n), C, D=self.D)  # (B, h, p)
        else:
            h_prev = cache.ssm_state.float().view(Bsz, g, r, p, n)
            h_new = torch.exp(dt * A) * h_prev + dt * x.unsqueeze(-1) * B  # (B, g, r, p, n)
            y = torch.einsum("bgrpn,bgn->bgrp", h_new, C) + self.D.float().view(g, r, 1) * x  # (B, g, r, p)
            cache.ssm_state.copy_(h_new.view(Bsz, h, p, n))
        new_conv = window[..., 1:]  # (B, conv_dim, K-1)
        if real is not None:
            new_conv = torch.where(real.view(Bsz, 1, 1), new_conv, cache.conv_state)
        cache.conv_state.copy_(new_conv)
        return y.reshape(Bsz, self.d_inner).to(xBC.dtype)
