"""Flash attention (FlashAttention-2 algorithm) in Triton: forward + backward, causal, GQA, sliding
window, packed documents, prefill against a cache (t != s). Plain PyTorch fallback on CPU.

    from kernels.attention import attention
    o = attention(q, k, v, causal=True, window=None, doc_ids=None)   # q (B, Hq, T, D), k/v (B, Hkv, S, D)

Semantics (the kernel and `attention_reference` agree on all of them):
  * queries are the LAST t of the s key positions: query i has absolute position p_i = s - t + i
    (t == s for training; t < s for prefill against a KV cache).
  * causal: query i sees key j iff j <= p_i.
  * window w (int >= 1): additionally p_i - j < w; without causal the window is symmetric,
    |p_i - j| < w.
  * doc_ids (B, S) ints over the KEY positions; a query takes the id of its own position (the last
    t entries). Query i sees key j only if their ids are equal. Negative ids are padding: padding
    rows attend the padding keys of the same id, so no row is ever empty. With t == s a (B, T)
    tensor is the same thing.
  * hq must be a multiple of hkv (GQA); query head h reads KV head h // (hq // hkv). K/V are never
    expanded.
  * scale defaults to d ** -0.5.

Dispatch: the Triton kernel runs on CUDA tensors; on CPU it runs only when TRITON_INTERPRET=1 was set
before this module was imported AND PRISM_ATTENTION=triton (tests); everywhere else torch SDPA with a
boolean mask (`attention_reference`). PRISM_ATTENTION=sdpa forces SDPA everywhere.

Kernel layout (FlashAttention-2):
  forward   grid (cdiv(t, BM), b*hq): one query block, loops over key blocks, online softmax in fp32
            with exp2 and the scale folded into log2(e)*scale; stores O and the log-sum-exp (log2).
  delta     grid (cdiv(t, BM), b*hq): delta = rowsum(dO * O).
  dk/dv     grid (cdiv(s, BN), b*hkv): one key block, loops over the GROUP query heads of its KV head
            and over their query blocks; accumulates in registers, no atomics, deterministic.
  dq        grid (cdiv(t, BM), b*hq): one query block, loops over key blocks.
Block skipping and masking: the key-block loop of a query block (and the query-block loop of a key
block) is clipped to the causal / window band, so blocks outside it are never visited. The band is
split by position into three loops: partial blocks before, full blocks (every pair visible: no mask
is built, no `where`), partial blocks after (diagonal, window edge, sequence tail). With doc_ids the
host computes each block's [min, max] id range and, per block row, the first and last block whose
range meets it: the loops are clipped to that too, and inside, a block whose range does not meet
the other block's is skipped without loading anything; a position-full block is left unmasked only
when all its ids are one and the same. Without doc_ids the loops have no branches (Triton pipelines
their loads); with doc_ids the per-block branch costs that pipelining.

Tile sizes: `block_config` (fixed by padded head dim; no autotuning yet). Head dims that are not a
power of two (80, 96) are padded to the next one with masked loads and stores.
"""

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only installs: the SDPA path still works
    triton = None

    class tl:  # placeholder so that the kernel definitions below still parse
        constexpr = None

    def _jit(fn):
        return fn


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 80, 96, 128, 256)  # what the configs below were chosen for; any d <= 256 runs
POISON = False  # tests: fill every kernel output with NaN before the kernel writes it


def _empty(*shape, like, dtype=None):
    out = torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if POISON else out


# ----------------------------------------------------------------------------------------------
# plain PyTorch: the mask, the reference, and the dispatcher's fallback
# ----------------------------------------------------------------------------------------------

def attention_mask(t, s, *, causal=True, window=None, doc_ids=None, device=None):
    """Boolean mask, True = visible: (B, 1, t, s) with doc_ids, (1, 1, t, s) without, or None."""
    if not causal and window is None and doc_ids is None:
        return None
    qpos = torch.arange(s - t, s, device=device)[:, None]  # (t, 1) absolute query positions
    kpos = torch.arange(s, device=device)[None, :]  # (1, s)
    mask = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        mask &= kpos <= qpos
    if window is not None:
        mask &= (qpos - kpos) < window
        if not causal:
            mask &= (kpos - qpos) < window
    mask = mask[None, None]  # (1, 1, t, s)
    if doc_ids is not None:
        same = doc_ids[:, -t:, None] == doc_ids[:, None, :]  # (B, t, s)
        mask = mask & same[:, None]
    return mask


def attention_reference(q, k, v, *, causal=True, scale=None, window=None, doc_ids=None):
    """torch SDPA with a boolean mask; GQA through enable_gqa. Same semantics as `attention`."""
    b, hq, t, d = q.shape
    s = k.shape[2]
    gqa = hq != k.shape[1]
    if causal and window is None and doc_ids is None and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(t, s, causal=causal, window=window, doc_ids=doc_ids, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _check(q, k, v, window, doc_ids):
    where = "kernels/attention.py: attention()"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, t, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{where}: k and v must be (B={b}, Hkv, S, D={d}); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v must share dtype and device; got {q.dtype}/{q.device}, "
                         f"{k.dtype}/{k.device}, {v.dtype}/{v.device}")
    hkv, s = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{where}: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if t > s:
        raise ValueError(f"{where}: q has more positions ({t}) than k/v ({s}); queries are the last "
                         f"t of the s key positions")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"{where}: window must be an int >= 1 or None; got {window!r}")
    if doc_ids is not None:
        if doc_ids.shape != (b, s):
            raise ValueError(f"{where}: doc_ids must be (B={b}, S={s}) — ids of the key positions, "
                             f"the last t of which belong to the queries; got {tuple(doc_ids.shape)}")
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"{where}: doc_ids must be an integer tensor; got {doc_ids.dtype}")


def use_triton(q):
    """Which path `attention` takes for this tensor (see the module docstring)."""
    mode = os.environ.get("PRISM_ATTENTION", "auto")
    if mode not in ("auto", "triton", "sdpa"):
        raise ValueError(f"kernels/attention.py: PRISM_ATTENTION must be auto, triton or sdpa; got {mode!r}")
    if mode == "sdpa" or triton is None:
        if mode == "triton":
            raise RuntimeError("kernels/attention.py: PRISM_ATTENTION=triton but triton is not installed")
        return False
    if q.is_cuda:
        return True
    if mode == "triton":
        if not INTERPRET:
            raise RuntimeError("kernels/attention.py: PRISM_ATTENTION=triton on CPU tensors needs "
                               "TRITON_INTERPRET=1 set before kernels.attention is imported")
        return True
    return False


def attention(q, k, v, *, causal=True, scale=None, window=None, doc_ids=None):
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D). doc_ids (B, S) or None."""
    _check(q, k, v, window, doc_ids)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not use_triton(q):
        return attention_reference(q, k, v, causal=causal, scale=scale, window=window, doc_ids=doc_ids)
    return _FlashAttention.apply(q, k, v, bool(causal), float(scale),
                                 None if window is None else int(window), doc_ids)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@_jit
def _visible(qpos, kpos, qdoc, kdoc, S, window,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Elementwise visibility; qpos/kpos (absolute positions) and the ids broadcast to the tile."""
    ok = kpos < S
    if CAUSAL:
        ok = ok & (kpos <= qpos)
    if HAS_WINDOW:
        ok = ok & (qpos - kpos < window)
        if not CAUSAL:
            ok = ok & (kpos - qpos < window)
    if HAS_DOCS:
        ok = ok & (qdoc == kdoc)
    return ok


@_jit
def _docs_meet(qmin, qmax, kmin, kmax):
    """Some query id of the block may equal some key id (id ranges intersect)."""
    return (qmin <= kmax) & (kmin <= qmax)


@_jit
def _docs_uniform(qmin, qmax, kmin, kmax):
    """Every query and key of the block pair carries the same id: no id mask needed."""
    return (qmin == qmax) & (kmin == kmax) & (qmin == kmin)


@_jit
def _key_split(pid_m, T, S, window, lo, hi,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Split the key range [lo, hi) of a query block into [lo, b) partial, [b, c) full, [c, hi)
    partial by position alone (causal / window / key length): a full block has every (query, key)
    pair visible, a partial one needs the mask. b and c are multiples of BN (or equal hi)."""
    m0 = pid_m * BM
    q_first = m0 + (S - T)
    q_last = tl.minimum(m0 + BM, T) - 1 + (S - T)
    f_lo = lo
    f_hi = lo * 0 + S  # full blocks end by the last whole key block
    if CAUSAL:  # every key <= q_first
        f_hi = tl.minimum(f_hi, q_first + 1)
    if HAS_WINDOW:  # q_last - key < window
        f_lo = tl.maximum(f_lo, q_last - window + 1)
        if not CAUSAL:  # key - q_first < window
            f_hi = tl.minimum(f_hi, q_first + window)
    f_lo = (f_lo + BN - 1) // BN * BN  # >= lo >= 0
    b = tl.minimum(f_lo, hi)
    c = tl.minimum(tl.maximum(b, tl.maximum(f_hi, 0) // BN * BN), hi)
    return b, c


@_jit
def _query_split(pid_n, T, S, window, lo, hi,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The same split for the query rows [lo, hi) of a key block: [lo, b) partial, [b, c) full,
    [c, hi) partial. Query rows beyond T may sit in a full block: they carry zero gradient."""
    n0 = pid_n * BN
    k_last = tl.minimum(n0 + BN, S) - 1
    f_lo = lo
    f_hi = lo * 0 + T
    if n0 + BN > S:  # the tail key block is never full
        f_hi = lo * 0
    if CAUSAL:  # q_first >= k_last
        f_lo = tl.maximum(f_lo, k_last - (S - T))
    if HAS_WINDOW:  # q_last - n0 < window
        f_hi = tl.minimum(f_hi, n0 + window - (S - T))
        if not CAUSAL:  # k_last - q_first < window
            f_lo = tl.maximum(f_lo, k_last - window + 1 - (S - T))
    f_lo = (f_lo + BM - 1) // BM * BM
    b = tl.minimum(f_lo, hi)
    c = tl.minimum(tl.maximum(b, tl.maximum(f_hi, 0) // BM * BM), hi)
    return b, c


@_jit
def _key_range(pid_m, bi, T, S, window, KRANGE,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr):
    """[lo, hi) of the key positions a query block may see; lo a multiple of BN."""
    m0 = pid_m * BM
    q_first = m0 + (S - T)
    q_last = tl.minimum(m0 + BM, T) - 1 + (S - T)
    lo = q_first * 0
    hi = lo + S
    if CAUSAL:
        hi = tl.minimum(hi, q_last + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_first - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, q_last + window)
    if HAS_DOCS:
        r = KRANGE + (bi * tl.cdiv(T, BM) + pid_m) * 2
        lo = tl.maximum(lo, tl.load(r) * BN)
        hi = tl.minimum(hi, tl.load(r + 1) * BN)
    lo = (lo // BN) * BN
    return lo, hi


@_jit
def _query_range(pid_n, bi, T, S, window, QRANGE,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    """[lo, hi) of the query rows (0..T) that may see a key block; lo a multiple of BM."""
    n0 = pid_n * BN
    k_last = tl.minimum(n0 + BN, S) - 1
    lo = n0 * 0
    hi = lo + T
    if CAUSAL:  # rows with p_i >= n0
        lo = tl.maximum(lo, n0 - (S - T))
    if HAS_WINDOW:  # p_i - k_last < window
        hi = tl.minimum(hi, k_last + window - (S - T))
        if not CAUSAL:  # n0 - p_i < window
            lo = tl.maximum(lo, n0 - window + 1 - (S - T))
    if HAS_DOCS:
        r = QRANGE + (bi * tl.cdiv(S, BN) + pid_n) * 2
        lo = tl.maximum(lo, tl.load(r) * BM)
        hi = tl.minimum(hi, tl.load(r + 1) * BM)
    lo = (lo // BM) * BM
    return lo, hi


@_jit
def _fwd_step(acc, m_i, l_i, q, qpos, qdoc, k_base, v_base, sks, svs, n0, S, window, qk_scale, KDOC,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, MASK: tl.constexpr,
              D: tl.constexpr, D_PAD: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN), log2 units
    if MASK:
        kdoc = 0
        if HAS_DOCS:
            kdoc = tl.load(KDOC + offs_n, mask=offs_n < S, other=0)
            kdoc = kdoc[None, :]
        ok = _visible(qpos[:, None], offs_n[None, :], qdoc, kdoc, S, window, CAUSAL, HAS_WINDOW, HAS_DOCS)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@_jit
def _fwd_block(acc, m_i, l_i, q, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks, svs, n0, S, window,
               qk_scale, KDOC, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
               POS_FULL: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BN: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block. POS_FULL: full by position. With documents the block's id range decides on
    top: skipped when the ranges do not meet, unmasked only when all ids are one and the same."""
    if HAS_DOCS:
        kmin = tl.load(kmm_base + (n0 // BN) * 2)
        kmax = tl.load(kmm_base + (n0 // BN) * 2 + 1)
        if _docs_meet(qmin, qmax, kmin, kmax):
            if POS_FULL:
                if _docs_uniform(qmin, qmax, kmin, kmax):
                    acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, qpos, qdoc, k_base, v_base, sks, svs, n0, S,
                                              window, qk_scale, KDOC, CAUSAL, HAS_WINDOW, HAS_DOCS, False,
                                              D, D_PAD, BN, UPCAST, DOT_PREC)
                else:
                    acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, qpos, qdoc, k_base, v_base, sks, svs, n0, S,
                                              window, qk_scale, KDOC, CAUSAL, HAS_WINDOW, HAS_DOCS, True,
                                              D, D_PAD, BN, UPCAST, DOT_PREC)
            else:
                acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, qpos, qdoc, k_base, v_base, sks, svs, n0, S,
                                          window, qk_scale, KDOC, CAUSAL, HAS_WINDOW, HAS_DOCS, True,
                                          D, D_PAD, BN, UPCAST, DOT_PREC)
    elif POS_FULL:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, qpos, qdoc, k_base, v_base, sks, svs, n0, S, window,
                                  qk_scale, KDOC, CAUSAL, HAS_WINDOW, HAS_DOCS, False,
                                  D, D_PAD, BN, UPCAST, DOT_PREC)
    else:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, qpos, qdoc, k_base, v_base, sks, svs, n0, S, window,
                                  qk_scale, KDOC, CAUSAL, HAS_WINDOW, HAS_DOCS, True,
                                  D, D_PAD, BN, UPCAST, DOT_PREC)
    return acc, m_i, l_i


@_jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KDOC, QMM, KMM, KRANGE,
                     sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
                     HQ, GROUP, T, S, qk_scale, window,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                     D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q_base = Q + bi.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + bi.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + bi.to(tl.int64) * svb + hk.to(tl.int64) * svh
    qpos = offs_m + (S - T)
    qdoc = 0
    qmin = 0
    qmax = 0
    kdoc_base = KDOC
    if HAS_DOCS:
        kdoc_base = KDOC + bi.to(tl.int64) * S
        qdoc = tl.load(kdoc_base + qpos, mask=offs_m < T, other=0)
        qdoc = qdoc[:, None]
        mm = QMM + (bi * tl.cdiv(T, BM) + pid_m) * 2
        qmin = tl.load(mm)
        qmax = tl.load(mm + 1)
    lo, hi = _key_range(pid_m, bi, T, S, window, KRANGE, CAUSAL, HAS_WINDOW, HAS_DOCS, BM, BN)

    acc = tl.zeros((BM, D_PAD), dtype=tl.float32)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    kmm_base = KMM + bi * tl.cdiv(S, BN) * 2
    b, c = _key_split(pid_m, T, S, window, lo, hi, CAUSAL, HAS_WINDOW, BM, BN)
    for n0 in range(lo, b, BN):  # partial blocks (window edge)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks,
                                   svs, n0, S, window, qk_scale, kdoc_base, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                   False, D, D_PAD, BN, UPCAST, DOT_PREC)
    for n0 in range(b, c, BN):  # full blocks: no mask
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks,
                                   svs, n0, S, window, qk_scale, kdoc_base, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                   True, D, D_PAD, BN, UPCAST, DOT_PREC)
    for n0 in range(c, hi, BN):  # partial blocks (diagonal, key tail)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks,
                                   svs, n0, S, window, qk_scale, kdoc_base, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                   False, D, D_PAD, BN, UPCAST, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows beyond T can be empty; they are not stored
    o = acc / l_safe[:, None]
    o_base = O + bi.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=q_mask)
    lse = m_i + tl.math.log2(l_safe)  # log2-sum-exp2 of the scaled scores
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@_jit
def _attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, HQ, T,
                           D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + bi.to(tl.int64) * sob + h.to(tl.int64) * soh + rows * sot + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + bi.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + rows * sdot + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@_jit
def _dkdv_step(dk, dv, k, v, kpos, kdoc, q_base, do_base, sqt, sdot, lse_base, delta_base, KDOC_B,
               m0, T, S, window, qk_scale,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, MASK: tl.constexpr,
               D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PREC: tl.constexpr):
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    rows_ok = offs_m < T
    mask = rows_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_base + offs_m, mask=rows_ok, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=rows_ok, other=0.0)
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BN, BM)
    pT = tl.math.exp2(qkT - lse[None, :])
    if MASK:
        qpos = offs_m + (S - T)
        qdoc = 0
        if HAS_DOCS:
            qdoc = tl.load(KDOC_B + qpos, mask=rows_ok, other=0)
            qdoc = qdoc[None, :]
        ok = _visible(qpos[None, :], kpos[:, None], qdoc, kdoc, S, window, CAUSAL, HAS_WINDOW, HAS_DOCS)
        pT = tl.where(ok, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@_jit
def _dkdv_block(dk, dv, k, v, kpos, kdoc, kmin, kmax, qmm_base, q_base, do_base, sqt, sdot, lse_base,
                delta_base, KDOC, m0, T, S, window, qk_scale,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                POS_FULL: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """One query block for a key block; the same decisions as _fwd_block."""
    if HAS_DOCS:
        qmin = tl.load(qmm_base + (m0 // BM) * 2)
        qmax = tl.load(qmm_base + (m0 // BM) * 2 + 1)
        if _docs_meet(qmin, qmax, kmin, kmax):
            if POS_FULL:
                if _docs_uniform(qmin, qmax, kmin, kmax):
                    dk, dv = _dkdv_step(dk, dv, k, v, kpos, kdoc, q_base, do_base, sqt, sdot, lse_base,
                                        delta_base, KDOC, m0, T, S, window, qk_scale, CAUSAL, HAS_WINDOW,
                                        HAS_DOCS, False, D, D_PAD, BM, UPCAST, DOT_PREC)
                else:
                    dk, dv = _dkdv_step(dk, dv, k, v, kpos, kdoc, q_base, do_base, sqt, sdot, lse_base,
                                        delta_base, KDOC, m0, T, S, window, qk_scale, CAUSAL, HAS_WINDOW,
                                        HAS_DOCS, True, D, D_PAD, BM, UPCAST, DOT_PREC)
            else:
                dk, dv = _dkdv_step(dk, dv, k, v, kpos, kdoc, q_base, do_base, sqt, sdot, lse_base,
                                    delta_base, KDOC, m0, T, S, window, qk_scale, CAUSAL, HAS_WINDOW,
                                    HAS_DOCS, True, D, D_PAD, BM, UPCAST, DOT_PREC)
    elif POS_FULL:
        dk, dv = _dkdv_step(dk, dv, k, v, kpos, kdoc, q_base, do_base, sqt, sdot, lse_base, delta_base,
                            KDOC, m0, T, S, window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, False,
                            D, D_PAD, BM, UPCAST, DOT_PREC)
    else:
        dk, dv = _dkdv_step(dk, dv, k, v, kpos, kdoc, q_base, do_base, sqt, sdot, lse_base, delta_base,
                            KDOC, m0, T, S, window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, True,
                            D, D_PAD, BM, UPCAST, DOT_PREC)
    return dk, dv


@_jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KDOC, QMM, KMM, QRANGE,
                          sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdot,
                          sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                          HQ, HKV, GROUP, T, S, qk_scale, sm_scale, window,
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                          D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // HKV
    hk = pid_bh % HKV
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(K + bi.to(tl.int64) * skb + hk.to(tl.int64) * skh + rows * sks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + bi.to(tl.int64) * svb + hk.to(tl.int64) * svh + rows * svs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kdoc = 0
    kmin = 0
    kmax = 0
    kdoc_base = KDOC
    if HAS_DOCS:
        kdoc_base = KDOC + bi.to(tl.int64) * S
        kdoc = tl.load(kdoc_base + offs_n, mask=offs_n < S, other=0)
        kdoc = kdoc[:, None]
        mm = KMM + (bi * tl.cdiv(S, BN) + pid_n) * 2
        kmin = tl.load(mm)
        kmax = tl.load(mm + 1)
    lo, hi = _query_range(pid_n, bi, T, S, window, QRANGE, CAUSAL, HAS_WINDOW, HAS_DOCS, BM, BN)
    b, c = _query_split(pid_n, T, S, window, lo, hi, CAUSAL, HAS_WINDOW, BM, BN)
    qmm_base = QMM + bi * tl.cdiv(T, BM) * 2

    dk = tl.zeros((BN, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BN, D_PAD), dtype=tl.float32)
    for g in range(GROUP):  # the query heads of this KV head: summed here, no atomics
        h = hk * GROUP + g
        q_base = Q + bi.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + bi.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
        lse_base = LSE + (bi * HQ + h).to(tl.int64) * T
        delta_base = DELTA + (bi * HQ + h).to(tl.int64) * T
        for m0 in range(lo, b, BM):  # partial blocks (diagonal)
            dk, dv = _dkdv_block(dk, dv, k, v, offs_n, kdoc, kmin, kmax, qmm_base, q_base, do_base, sqt, sdot,
                                 lse_base, delta_base, kdoc_base, m0, T, S, window, qk_scale,
                                 CAUSAL, HAS_WINDOW, HAS_DOCS, False, D, D_PAD, BM, UPCAST, DOT_PREC)
        for m0 in range(b, c, BM):  # full blocks: no mask
            dk, dv = _dkdv_block(dk, dv, k, v, offs_n, kdoc, kmin, kmax, qmm_base, q_base, do_base, sqt, sdot,
                                 lse_base, delta_base, kdoc_base, m0, T, S, window, qk_scale,
                                 CAUSAL, HAS_WINDOW, HAS_DOCS, True, D, D_PAD, BM, UPCAST, DOT_PREC)
        for m0 in range(c, hi, BM):  # partial blocks (window edge, query tail)
            dk, dv = _dkdv_block(dk, dv, k, v, offs_n, kdoc, kmin, kmax, qmm_base, q_base, do_base, sqt, sdot,
                                 lse_base, delta_base, kdoc_base, m0, T, S, window, qk_scale,
                                 CAUSAL, HAS_WINDOW, HAS_DOCS, False, D, D_PAD, BM, UPCAST, DOT_PREC)
    dk = dk * sm_scale
    tl.store(DK + bi.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + rows * sdks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + bi.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + rows * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@_jit
def _dq_step(dq, q, do, lse, delta, qpos, qdoc, k_base, v_base, sks, svs, KDOC_B, n0, S, window, qk_scale,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, MASK: tl.constexpr,
             D: tl.constexpr, D_PAD: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN)
    p = tl.math.exp2(qk - lse[:, None])
    if MASK:
        kdoc = 0
        if HAS_DOCS:
            kdoc = tl.load(KDOC_B + offs_n, mask=offs_n < S, other=0)
            kdoc = kdoc[None, :]
        ok = _visible(qpos[:, None], offs_n[None, :], qdoc, kdoc, S, window, CAUSAL, HAS_WINDOW, HAS_DOCS)
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BM, BN)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@_jit
def _dq_block(dq, q, do, lse, delta, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks, svs, KDOC, n0, S,
              window, qk_scale, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
              POS_FULL: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BN: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block for a query block's dQ; the same decisions as _fwd_block."""
    if HAS_DOCS:
        kmin = tl.load(kmm_base + (n0 // BN) * 2)
        kmax = tl.load(kmm_base + (n0 // BN) * 2 + 1)
        if _docs_meet(qmin, qmax, kmin, kmax):
            if POS_FULL:
                if _docs_uniform(qmin, qmax, kmin, kmax):
                    dq = _dq_step(dq, q, do, lse, delta, qpos, qdoc, k_base, v_base, sks, svs, KDOC, n0, S,
                                  window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, False, D, D_PAD, BN, UPCAST,
                                  DOT_PREC)
                else:
                    dq = _dq_step(dq, q, do, lse, delta, qpos, qdoc, k_base, v_base, sks, svs, KDOC, n0, S,
                                  window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, True, D, D_PAD, BN, UPCAST,
                                  DOT_PREC)
            else:
                dq = _dq_step(dq, q, do, lse, delta, qpos, qdoc, k_base, v_base, sks, svs, KDOC, n0, S,
                              window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, True, D, D_PAD, BN, UPCAST,
                              DOT_PREC)
    elif POS_FULL:
        dq = _dq_step(dq, q, do, lse, delta, qpos, qdoc, k_base, v_base, sks, svs, KDOC, n0, S, window,
                      qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, False, D, D_PAD, BN, UPCAST, DOT_PREC)
    else:
        dq = _dq_step(dq, q, do, lse, delta, qpos, qdoc, k_base, v_base, sks, svs, KDOC, n0, S, window,
                      qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, True, D, D_PAD, BN, UPCAST, DOT_PREC)
    return dq


@_jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KDOC, QMM, KMM, KRANGE,
                        sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
                        HQ, GROUP, T, S, qk_scale, sm_scale, window,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                        D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    rows_ok = offs_m < T
    q_mask = rows_ok[:, None] & (offs_d[None, :] < D)
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + bi.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows * sqt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + bi.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + rows * sdot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=rows_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=rows_ok, other=0.0)
    k_base = K + bi.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + bi.to(tl.int64) * svb + hk.to(tl.int64) * svh
    qpos = offs_m + (S - T)
    qdoc = 0
    qmin = 0
    qmax = 0
    kdoc_base = KDOC
    if HAS_DOCS:
        kdoc_base = KDOC + bi.to(tl.int64) * S
        qdoc = tl.load(kdoc_base + qpos, mask=rows_ok, other=0)
        qdoc = qdoc[:, None]
        mm = QMM + (bi * tl.cdiv(T, BM) + pid_m) * 2
        qmin = tl.load(mm)
        qmax = tl.load(mm + 1)
    lo, hi = _key_range(pid_m, bi, T, S, window, KRANGE, CAUSAL, HAS_WINDOW, HAS_DOCS, BM, BN)

    dq = tl.zeros((BM, D_PAD), dtype=tl.float32)
    kmm_base = KMM + bi * tl.cdiv(S, BN) * 2
    b, c = _key_split(pid_m, T, S, window, lo, hi, CAUSAL, HAS_WINDOW, BM, BN)
    for n0 in range(lo, b, BN):  # partial blocks (window edge)
        dq = _dq_block(dq, q, do, lse, delta, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks, svs,
                       kdoc_base, n0, S, window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, False, D, D_PAD, BN,
                       UPCAST, DOT_PREC)
    for n0 in range(b, c, BN):  # full blocks: no mask
        dq = _dq_block(dq, q, do, lse, delta, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks, svs,
                       kdoc_base, n0, S, window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, True, D, D_PAD, BN,
                       UPCAST, DOT_PREC)
    for n0 in range(c, hi, BN):  # partial blocks (diagonal, key tail)
        dq = _dq_block(dq, q, do, lse, delta, qpos, qdoc, qmin, qmax, kmm_base, k_base, v_base, sks, svs,
                       kdoc_base, n0, S, window, qk_scale, CAUSAL, HAS_WINDOW, HAS_DOCS, False, D, D_PAD, BN,
                       UPCAST, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + bi.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + rows * sdqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# launch: block sizes, document block ranges, the autograd Function
# ----------------------------------------------------------------------------------------------

def block_config(d_pad, device_is_cuda=True):
    """Fixed tile sizes by padded head dim: (fwd BM, fwd BN, bwd BM, bwd BN, num_warps, num_stages).
    The interpreter gets small, deliberately unequal tiles (cheap, and BM != BN is exercised)."""
    if not device_is_cuda:
        return dict(fwd=(32, 16), bwd=(16, 32), warps=4, stages=1)
    if d_pad <= 64:
        return dict(fwd=(128, 64), bwd=(64, 64), warps=4, stages=3)
    if d_pad <= 128:
        return dict(fwd=(128, 64), bwd=(64, 64), warps=8, stages=2)
    return dict(fwd=(64, 32), bwd=(32, 32), warps=8, stages=1)  # d 256: shared memory bound


def _block_minmax(ids, block):
    """(B, L) int -> (B, cdiv(L, block), 2) per-block [min, max]; the tail is padded by repetition."""
    b, n = ids.shape
    pad = (-n) % block
    if pad:
        ids = torch.cat([ids, ids[:, -1:].expand(b, pad)], dim=1)
    ids = ids.view(b, -1, block)
    return torch.stack([ids.amin(-1), ids.amax(-1)], dim=-1).to(torch.int32).contiguous()


def _first_last(overlap):
    """(..., n) bool -> (..., 2) int32 [first True, last True + 1]; (0, 0) where none."""
    n = overlap.shape[-1]
    any_ = overlap.any(-1)
    first = overlap.int().argmax(-1)
    last = n - overlap.flip(-1).int().argmax(-1)
    out = torch.stack([first, last], dim=-1)
    return torch.where(any_[..., None], out, torch.zeros_like(out)).to(torch.int32).contiguous()


def doc_blocks(doc_ids, t, bm, bn):
    """Per-block id ranges for queries (block bm) and keys (block bn), and for each query block the
    [first, last+1) key blocks whose ranges meet it (and the transpose). Blocks outside are never
    visited; blocks inside whose ranges still do not meet are skipped by the kernel's check."""
    qmm = _block_minmax(doc_ids[:, -t:], bm)  # (B, nqb, 2)
    kmm = _block_minmax(doc_ids, bn)  # (B, nkb, 2)
    meet = (qmm[:, :, None, 0] <= kmm[:, None, :, 1]) & (kmm[:, None, :, 0] <= qmm[:, :, None, 1])
    return qmm, kmm, _first_last(meet), _first_last(meet.transpose(1, 2))


def _dot_precision(dtype, is_cuda):
    """fp32 inputs: exact dots in the interpreter; TF32 on the GPU (IEEE fp32 dots compile for many
    minutes and run far slower; fp32 attention on a GPU is a debugging path, not a training one)."""
    return "ieee" if dtype == torch.float32 and not is_cuda else "tf32"


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _flash_forward(q, k, v, causal, scale, window, kdoc):
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    cfg = block_config(d_pad, q.is_cuda)
    bm, bn = cfg["fwd"]
    o = _empty(q.shape, like=q)  # (B, Hq, T, D)
    lse = _empty(b, hq, t, like=q, dtype=torch.float32)  # (B, Hq, T), log2 units
    has_docs = kdoc is not None
    qmm = kmm = krange = q  # dummies, never read without docs
    if has_docs:
        qmm, kmm, krange, _ = doc_blocks(kdoc, t, bm, bn)
    grid = (triton.cdiv(t, bm), b * hq)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, kdoc if has_docs else q, qmm, kmm, krange,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        hq, hq // hkv, t, s, scale * LOG2E, window or 0,
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_DOCS=has_docs,
        D=d, D_PAD=d_pad, BM=bm, BN=bn, UPCAST=not q.is_cuda, DOT_PREC=_dot_precision(q.dtype, q.is_cuda),
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    return o, lse


def _flash_backward(do, q, k, v, o, lse, causal, scale, window, kdoc):
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    cfg = block_config(d_pad, q.is_cuda)
    bm, bn = cfg["bwd"]
    upcast, prec = not q.is_cuda, _dot_precision(q.dtype, q.is_cuda)
    delta = _empty(lse.shape, like=lse)  # (B, Hq, T)
    _attn_bwd_delta_kernel[(triton.cdiv(t, bm), b * hq)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        hq, t, D=d, D_PAD=d_pad, BM=bm)
    has_docs = kdoc is not None
    qmm = kmm = krange = qrange = q
    if has_docs:
        qmm, kmm, krange, qrange = doc_blocks(kdoc, t, bm, bn)
    kdoc_arg = kdoc if has_docs else q
    common = dict(CAUSAL=causal, HAS_WINDOW=window is not None, HAS_DOCS=has_docs, D=d, D_PAD=d_pad,
                  BM=bm, BN=bn, UPCAST=upcast, DOT_PREC=prec, num_warps=cfg["warps"],
                  num_stages=cfg["stages"])
    dq, dk, dv = _empty(q.shape, like=q), _empty(k.shape, like=k), _empty(v.shape, like=v)
    _attn_bwd_dkdv_kernel[(triton.cdiv(s, bn), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, kdoc_arg, qmm, kmm, qrange,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        hq, hkv, hq // hkv, t, s, scale * LOG2E, scale, window or 0, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(t, bm), b * hq)](
        q, k, v, do, lse, delta, dq, kdoc_arg, qmm, kmm, krange,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        hq, hq // hkv, t, s, scale * LOG2E, scale, window or 0, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, doc_ids):
        if q.shape[-1] > 256:
            raise ValueError(f"kernels/attention.py: head dim {q.shape[-1]} is not supported by the "
                             f"Triton kernel (at most 256)")
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        kdoc = None if doc_ids is None else doc_ids.to(device=q.device, dtype=torch.int32).contiguous()
        o, lse = _flash_forward(q, k, v, causal, scale, window, kdoc)
        ctx.save_for_backward(q, k, v, o, lse, kdoc)
        ctx.args = (causal, scale, window)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kdoc = ctx.saved_tensors
        causal, scale, window = ctx.args
        dq, dk, dv = _flash_backward(_last_dim_contiguous(do), q, k, v, o, lse, causal, scale, window, kdoc)
        return dq, dk, dv, None, None, None, None
