"""Batched generation for every model family of model.py, and a command line that answers one prompt.

    python generate.py "Explain RoPE in one sentence." --max-new-tokens 80
    samples = generate(model, [tok.encode("Hi")], max_new_tokens=32)   # -> [Sample(tokens, logprobs)]

Evaluation and GRPO rollouts spend most of their time here. A decode step of a small model is bound by its
matmuls' memory traffic and per-op overhead, so generation works from a copy of the model built for it
(`prepare_generation`: q/k/v and gate/up fused into one matmul each, fp32 and bf16 weights in oneDNN's
blocked layout on CPU, optional bf16 or weight-only int8 weights, as gpt-fast does) and runs decode steps of
fixed shapes: the KV cache and the Mamba conv/SSM states are allocated once at the batch's maximum length,
so the step can be compiled once (CUDA graphs on CUDA) and never recompiles within a call. Eager steps drop
finished rows as they finish and attend over the filled slots only.

Log-probs are those of the distribution each token was drawn from (what GRPO's importance weights need);
sampling inverts each row's cumulative distribution at one uniform draw per original row and step, so a
row's tokens depend on the seed alone, not on which other rows are still in the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from model import (NEMOTRON_FP32_KEYS, MLP, Attention, CausalLM, DecodeCache, GraniteMoE, KVCache,
                   NemotronHMoE, rope_inv_freq, DEFAULT_MODEL, load_model, load_tokenizer)


@dataclass
class Sample:
    tokens: list  # new token ids, ending at (and including) a stop token if one came
    logprobs: list  # log-probability of each new token under the distribution it was drawn from


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, uniform=None) -> tuple:
    """(B, V) logits -> (B,) tokens and their (B,) log-probs, without a host sync or a generator of its own
    (so that it compiles into the decode step): `uniform` (B,) holds one fp64 U[0, 1) draw per row (sampling only).

    Greedy (temperature 0) reports log-probs under the model's unscaled distribution; sampling reports
    them under the temperature-scaled, top-p-truncated distribution the token was drawn from. A token is
    drawn by inverting the cumulative distribution at its row's draw: one random number per row, where
    Gumbel-max needs one per vocabulary entry (drawing those took ~25 ms of a ~170 ms SmolLM2 step at 32 rows
    on this project's CPU, against ~5 ms for the inverse). The cumulative sum and the draws are fp64: in
    fp32 the sum near 1 has a spacing of 6e-8, wider than most tokens' probabilities in a 49k vocabulary,
    which would then be drawn at the wrong rates.
    """
    logits = logits.float()
    if temperature == 0:  # max's index, not argmax: the same first maximum, ~3x faster on CPU (torch 2.13)
        token = logits.max(dim=-1).indices
        return token, torch.log_softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    if uniform is None:
        raise ValueError("sample_next: sampling (temperature > 0) needs `uniform`, one U[0, 1) draw per row")
    logprobs = torch.log_softmax(logits / temperature, dim=-1)  # (B, V)
    probs = logprobs.exp()
    if top_p < 1.0:  # tokens outside the nucleus get probability 0
        probs = probs.masked_fill(~in_nucleus(probs, top_p, by_sort=probs.device.type != "cpu"), 0.0)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (B, V); dropped tokens add no width
    total = cdf[:, -1:]  # (B, 1): the kept mass (1 up to rounding without top-p)
    # the first token whose cumulative mass exceeds u * total, kept below total so that rounding cannot step
    # past the last token of nonzero probability
    target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    token = torch.searchsorted(cdf, target, right=True)[:, 0]  # (B,)
    return token, logprobs.gather(-1, token[:, None])[:, 0] - total[:, 0].log().float()


def in_nucleus(probs: torch.Tensor, top_p: float, by_sort: bool) -> torch.Tensor:
    """(B, V) probabilities -> (B, V) bool, True on top-p's nucleus: the smallest set of most likely tokens whose
    mass reaches top_p. by_sort: the prefix of the sorted row (deterministic on a GPU, where sorting is
    cheap); otherwise the tokens at or above a threshold found by radix select (_nucleus_threshold: on this
    project's CPU ~5 ms against ~23 for the sort at 8 x 49k, ~27 against ~104 at 32 rows), which also keeps
    every token tied with the last one (the sort keeps as many of them as reach top_p)."""
    if by_sort:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
    return probs >= _nucleus_threshold(probs, top_p)


def _nucleus_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) probabilities -> (B, 1) the largest probability p* with mass(probs >= p*) >= top_p: radix
    select on the fp32 bits (non-negative floats order as their int32 bits do), 9 + 11 + 11 bits in three
    passes; each pass adds the probabilities into buckets of the next bits (among tokens whose higher bits
    equal p*'s, found so far) and walks the buckets down from the top until the mass reaches top_p. The
    buckets are filled by scatter_add, whose order is fixed on CPU (on a GPU it is atomic: use the sort)."""
    bits = probs.view(torch.int32)  # (B, V)
    above = torch.zeros_like(probs[:, :1])  # (B, 1): mass of the tokens above p*'s bucket so far
    prefix = torch.zeros_like(bits[:, :1])  # (B, 1): p*'s bits found so far
    for shift, width in ((22, 9), (11, 11), (0, 11)):
        n = 1 << width
        bucket = (bits >> shift) & (n - 1)  # (B, V)
        mass = probs if shift == 22 else probs * ((bits >> (shift + width)) == (prefix >> (shift + width)))
        hist = probs.new_zeros(probs.shape[0], n).scatter_add_(1, bucket.long(), mass)  # (B, n)
        from_top = hist.flip(-1).cumsum(dim=-1) + above  # (B, n): mass down to and including each bucket
        k = (from_top < top_p).sum(dim=-1, keepdim=True).clamp(max=n - 1)  # buckets above p*'s (top first)
        above = from_top.gather(1, k) - hist.gather(1, n - 1 - k)
        prefix = prefix | ((n - 1 - k).int() << shift)
    return prefix.view(torch.float32)


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer for generation (gpt-fast's): W ≈ scales[:, None] * W_int8, one scale per
    output channel (max |w| / 127). Inputs and outputs in `compute_dtype`; on CPU the matmul runs ATen's
    int8-weight kernel on bf16 activations (its fp32 variant is several times slower than an fp32 matmul)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        stored = torch.bfloat16 if w.device.type == "cpu" else w.dtype  # the CPU kernel takes bf16 scales
        exact = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        # quantised with the scale as stored, rounded up where storing rounded it down (|w| / scale <= 127):
        # quantising with the exact scale and storing it in bf16 afterwards adds a per-channel error of up to
        # 2^-9 to every weight (greedy agreement with fp32 on SmolLM2's chat questions: 0.43, against 0.52)
        scales = exact.to(stored)
        up = torch.nextafter(scales, torch.full_like(scales, math.inf))
        scales = torch.where(scales.float() < exact, up, scales)
        w_int8 = torch.round(w.float() / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("weight", w_int8)
        self.compute_dtype = w.dtype
        self.register_buffer("scales", scales)  # (out,)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        N, K = self.weight.shape
        if x.device.type == "cpu" and K % 64 == 0 and N % 16 == 0:  # ATen's int8-weight kernel (it crashed on
            # some odd shapes in torch 2.13, e.g. K = 50): no dequantised copy of W
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)
            y = y.to(x.dtype)
        else:  # inductor fuses the conversion into the matmul's prologue when compiled
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1)


def _onednn_pack(weight: torch.Tensor):
    """The (out, in) weight reordered into oneDNN's blocked layout (an mkldnn tensor), or None where this
    build or device has no oneDNN. Measured on this project's Xeon, 1 thread: an fp32 (8, 576) x (576, 49152)
    lm_head takes ~10 ms from this layout against ~19 ms for MKL from (in, out) and ~24 ms for F.linear
    (MKL's sgemm is far from the bandwidth limit at a few rows), and bf16 runs on AMX (~2x F.linear)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:  # the batch-size hint (8) does not change the layout: any number of rows runs from it
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
    except (RuntimeError, AttributeError):
        return None


class TransposedLinear(nn.Module):
    """y = x @ W^T + b for CPU generation copies, from the layout fastest at the call's number of rows.
    fp32: one row from W^T stored contiguous (in, out) (~20% faster than oneDNN's blocked layout and than
    F.linear's (out, in)), several rows from oneDNN's blocked copy (`packed`, see _onednn_pack); bf16: the
    blocked copy at every size. Inside torch.compile it runs plain matmuls (inductor cannot take mkldnn
    tensors)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.compute_dtype = w.dtype
        self.bias = linear.bias
        self.packed = _onednn_pack(w)  # a plain attribute: no state_dict entry, no .to()
        if w.dtype == torch.float32 or self.packed is None:
            self.weight_t = nn.Parameter(w.t().contiguous(), requires_grad=False)  # (in, out)
        else:
            self.weight_t = None
            self.weight = linear.weight  # shared, for the compiled path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and (self.weight_t is None or x.numel() > x.shape[-1]) \
                and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = x @ self.weight_t if self.weight_t is not None else F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor; replacing a submodule or a
    parameter of the copy leaves the original untouched."""
    import copy
    clone = copy.copy(module)
    clone._parameters, clone._buffers = dict(module._parameters), dict(module._buffers)
    clone._modules = {k: None if m is None else _shallow_clone(m) for k, m in module._modules.items()}
    return clone


def _fused_linear(linears: list) -> nn.Linear:
    """One nn.Linear whose output is the outputs of `linears` concatenated (a new weight, rows stacked)."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return fused


PACKED = (torch.float32, torch.bfloat16)  # weights TransposedLinear takes
# kept fp32 in a "bf16" copy
GENERATION_FP32 = ("A_log", "D", "dt_bias", "e_score_correction_bias") + NEMOTRON_FP32_KEYS


def prepare_generation(model: CausalLM, *, fuse: bool = True, quantize: str | None = None) -> CausalLM:
    """A generation-only copy of `model` that shares its weights (the model, its parameter names and what
    save_model writes are unchanged): q/k/v and gate/up projections fused into one matmul each (new tensors,
    built from the current weights) and, on CPU, every fp32 or bf16 linear weight also stored in oneDNN's
    blocked layout and fp32 ones transposed (TransposedLinear: up to two more copies of the weights for the
    copy's lifetime), and optionally the weights in bf16 (`quantize="bf16"`) or weight-only int8 with
    per-channel scales (`quantize="int8"`, every nn.Linear including lm_head; the embedding and the small
    mixer tensors stay as they are). Build it again after the weights change. An FSDP-wrapped model is
    returned as it is (its parameters are gathered per call; fusing would copy them): no fusion there, and
    quantize raises."""
    if quantize not in (None, "bf16", "int8"):
        raise ValueError(f"prepare_generation: quantize must be None, 'bf16' or 'int8', got {quantize!r}")
    if getattr(model, "generation_copy", False):
        return model
    if _is_fsdp(model):
        if quantize is not None:
            raise ValueError("prepare_generation: quantize is not supported on an FSDP-wrapped model")
        return model
    gm = _shallow_clone(model)
    gm.generation_copy = True
    if quantize == "bf16":
        done = {}
        for name, m in gm.named_modules():
            for pname, p in list(m._parameters.items()):
                keep_fp32 = f"{name}.{pname}".endswith(GENERATION_FP32)
                if p is not None and p.dtype == torch.float32 and not keep_fp32:
                    if id(p) not in done:  # tied weights stay tied
                        done[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                    m._parameters[pname] = done[id(p)]
    for m in list(gm.modules()):
        if fuse and isinstance(m, Attention):
            m.qkv_proj = _fused_linear([m.q_proj, m.k_proj, m.v_proj])
            del m.q_proj, m.k_proj, m.v_proj
        elif fuse and isinstance(m, MLP):
            m.gate_up_proj = _fused_linear([m.gate_proj, m.up_proj])
            del m.gate_proj, m.up_proj
    if quantize == "int8":
        replace = Int8Linear
    elif fuse and model.model.embed_tokens.weight.device.type == "cpu":
        replace = lambda lin: TransposedLinear(lin) if lin.weight.dtype in PACKED else lin  # noqa: E731
    else:
        return gm
    for m in list(gm.modules()):
        for cname, child in list(m._modules.items()):
            if type(child) is nn.Linear:
                m._modules[cname] = replace(child)
        for attr in ("qkv_proj", "gate_up_proj"):
            if type(getattr(m, attr, None)) is nn.Linear:
                setattr(m, attr, replace(getattr(m, attr)))
    return gm


def _has_moe(model: CausalLM) -> bool:
    return any(isinstance(m, (GraniteMoE, NemotronHMoE)) for m in model.modules())


def _use_compile(compile, model: CausalLM, device) -> bool:
    """compile=None (auto): on CUDA only. On CPU it does not pay (measured on this project's 2-core Xeon,
    SmolLM2-135M fp32, b=8, 1 thread): each new (batch, cache length) compiles for ~25 s, and the compiled
    step ran at 98 ms against eager's 80 (72 ms with inductor's weight freezing, which then bakes the
    weights in), while the matmuls, at the memory limit already, are ~53 ms of either. Never in auto for MoE
    (routing syncs with the host: graph breaks) or FSDP-wrapped models (their blocks may be compiled)."""
    if compile is not None:
        return bool(compile)
    return torch.device(device).type == "cuda" and not _has_moe(model) and not _is_fsdp(model)


@torch.no_grad()
def generate(model: CausalLM, prompts: list, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids=(), seed: int = 0, compile: bool | None = None,
             progress: bool = False, fuse: bool | None = None, quantize: str | None = None,
             on_rows_done=None) -> list:
    """Batched generation for prompts of any lengths: left padding, a cache allocated once at the batch's
    maximum length, an eager prefill, then one-token decode steps of fixed shapes (CausalLM.static_step).

    compile: torch.compile the decode step (inductor; CUDA graphs on CUDA). None = auto: on CUDA unless the
        model has MoE layers or is FSDP-wrapped; off on CPU (see _use_compile). A compiled step never
        recompiles within a call (finished rows stay in the batch, masked), nor across calls whose shapes
        fall in the same buckets: the batch is padded to a power of two (copies of the first prompt, finished
        from the start) and the cache length rounded up by _bucket; a generation copy keeps that cache for
        its next call of the same shape (_decode_cache).
        Eager steps instead drop finished rows as they finish and attend over the filled cache slots only.
    fuse: q/k/v and gate/up in one matmul each (prepare_generation); None = on unless FSDP-wrapped.
    quantize: None, "bf16" or "int8" weights for this generation only (prepare_generation).
    on_rows_done: called with the number of rows that finished since its last call, as they finish (at most
        one call per host sync) and for the rest at the end: the counts add up to len(prompts), so a caller's
        progress bar can move per row, not per batch.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    if fuse or quantize is not None or (fuse is None and not _is_fsdp(model)):
        model = prepare_generation(model, fuse=fuse is not False, quantize=quantize)
    device = model.model.embed_tokens.weight.device
    compiled = _use_compile(compile, model, device)
    n_prompts = len(prompts)
    if compiled:  # a graph is compiled per shape: a few batch sizes for all calls
        prompts = list(prompts) + [prompts[0]] * ((1 << (n_prompts - 1).bit_length()) - n_prompts)
    B, T0 = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.zeros(B, T0, dtype=torch.long)
    doc_ids = torch.full((B, T0), -1, dtype=torch.long)  # left padding: id -1
    for i, p in enumerate(prompts):
        input_ids[i, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        doc_ids[i, T0 - len(p):] = 0
    input_ids, doc_ids = input_ids.to(device), doc_ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)

    step = _compiled_step(device) if compiled else _decode_step
    cache = (_decode_cache(model, B, _bucket(T0 + max_new_tokens)) if compiled
             else model.allocate_cache(B, T0 + max_new_tokens))
    logits = model.logits(model.hidden_states(input_ids, doc_ids, cache)[:, -1])  # (B, V): last slot is real
    slot = torch.tensor([T0], device=device)  # the cache slot of the next token
    dynamic_rope = (model.config.rope_scaling or {}).get("rope_type") == "dynamic"
    out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(B, max_new_tokens, device=device)
    n_new = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)  # per original row
    rows = torch.arange(B, device=device)  # original index of each cache row
    done = torch.arange(B, device=device) >= n_prompts  # per cache row: a stop token came (padding: done)
    draw_rows = rows.clamp(max=n_prompts - 1)  # the prompt whose draw each row takes (padding: the last's)

    def uniforms():  # (rows,) fp64: one draw per prompt and step, whatever rows remain; None when greedy
        if temperature == 0:
            return None
        return torch.rand(n_prompts, generator=generator, device=device, dtype=torch.float64)[draw_rows]

    token, logprob = sample_next(logits, temperature, top_p, uniforms())
    del logits
    one_doc = torch.zeros(B, 1, dtype=torch.long, device=device)
    sync_every = 1 if torch.device(device).type == "cpu" else 8  # host syncs to stop early / compact
    bar = _progress(max_new_tokens, progress)
    reported = 0  # rows passed to on_rows_done so far
    for t in range(max_new_tokens):
        out_tokens[rows, t], out_logprobs[rows, t] = token, logprob
        bar.update(1)
        if t == max_new_tokens - 1:
            break
        hit = torch.isin(token, stop) & ~done
        n_new[rows] = torch.where(hit, t + 1, n_new[rows])
        done = done | hit
        if t % sync_every == sync_every - 1:
            live = int((~done).sum())  # live rows are always in the cache: n_prompts - live have finished
            if on_rows_done is not None and n_prompts - live > reported:
                on_rows_done(n_prompts - live - reported)
                reported = n_prompts - live
            if live == 0:
                break
            if not compiled and live < len(rows):  # drop finished rows: one copy of the cache (~1/4 of a
                # b=8 step of SmolLM2 at 400 slots) against every later step's work on them
                keep = (~done).nonzero()[:, 0]
                rows, token, done, one_doc = rows[keep], token[keep], done[keep], one_doc[:live]
                draw_rows = rows
                cache.keep(keep)
        inv_freq = model.inv_freq
        if dynamic_rope:  # NTK base grows with the longest sequence (one host sync per step)
            inv_freq = rope_inv_freq(model.config, int(cache.next_position.max()) + 1).to(device)
        if compiled:  # clones: a CUDA graph's outputs are overwritten by its next replay
            token, logprob = (x.clone() for x in step(model, token[:, None], one_doc, cache, slot, inv_freq,
                                                      temperature, top_p, uniforms()))
        else:  # eager: attention over the filled slots only (T0 + t + 1 of them)
            token, logprob = step(model, token[:, None], one_doc, cache, slot, inv_freq, temperature, top_p,
                                  uniforms(), T0 + t + 1)
        slot += 1
    bar.close()
    if on_rows_done is not None and n_prompts > reported:
        on_rows_done(n_prompts - reported)
    tokens, logprobs, n_new = out_tokens.cpu(), out_logprobs.cpu(), n_new.cpu()
    return [Sample(tokens[i, :n_new[i]].tolist(), logprobs[i, :n_new[i]].tolist()) for i in range(n_prompts)]


def _bucket(length: int, steps_per_octave: int = 8, smallest: int = 64) -> int:
    """`length` rounded up to one of `steps_per_octave` sizes per power of two (at most 1/8 more slots for
    the compiled step to read), so calls whose prompts differ in length share one compiled graph."""
    if length <= smallest:
        return smallest
    step = max(1, (1 << (length.bit_length() - 1)) // steps_per_octave)
    return -(-length // step) * step


def _decode_cache(model: CausalLM, batch: int, max_len: int) -> DecodeCache:
    """The compiled step's cache. A generation copy keeps its last one and hands it, emptied, to its next
    call of the same shape: the compiled step (a CUDA graph on CUDA, which replays on fixed addresses) then
    sees the same tensors call after call. It lives as long as the copy (evaluate.py keeps one per task)."""
    keeps = getattr(model, "generation_copy", False)
    kept = getattr(model, "kept_decode_cache", None) if keeps else None
    if kept is not None and kept[0] == (batch, max_len):
        cache = kept[1]
        for t in _cache_tensors(cache):
            t.zero_()
        cache.doc_ids.fill_(-1)
        cache.length = 0
    else:
        if kept is not None:
            model.kept_decode_cache = None  # freed before the new one is allocated
        cache = model.allocate_cache(batch, max_len)
        if keeps:
            model.kept_decode_cache = ((batch, max_len), cache)
    if model.model.embed_tokens.weight.device.type == "cuda":  # CUDA graphs replay on fixed addresses
        for t in _cache_tensors(cache):
            torch._dynamo.mark_static_address(t)
    return cache


def _cache_tensors(cache: DecodeCache) -> list:
    out = [cache.doc_ids, cache.next_position]
    for c in cache.layers:
        if isinstance(c, KVCache):
            out += [c.k, c.v]
        elif c is not None:
            out += [c.conv_state, c.ssm_state]
    return out


def _decode_step(model: CausalLM, token, doc_ids, cache: DecodeCache, slot, inv_freq, temperature: float,
                 top_p: float, uniform, length=None) -> tuple:
    """One decode step and the sampling of its tokens, compiled as one graph (gpt-fast's decode_one_token):
    on a GPU each op left outside is one more kernel launch per token. -> (B,) tokens, (B,) log-probs."""
    logits = model.static_step(token, doc_ids, cache, slot, inv_freq, length)  # (B, V)
    return sample_next(logits, temperature, top_p, uniform)


_COMPILED_STEPS = {}


def _compiled_step(device):
    """The decode step under torch.compile, built once per device type: inductor with fixed shapes;
    mode reduce-overhead (CUDA graphs) on CUDA. One graph per batch bucket, cache bucket and sampling
    setting (temperature and top_p are constants of the graph)."""
    kind = torch.device(device).type
    if kind not in _COMPILED_STEPS:
        mode = "reduce-overhead" if kind == "cuda" else None
        _COMPILED_STEPS[kind] = torch.compile(_decode_step, mode=mode, dynamic=False)
    return _COMPILED_STEPS[kind]


def _progress(total: int, enabled: bool):  # generate's `progress` argument hides cli.progress's name there
    return cli.progress(total=total, desc="generate", unit="tok", enabled=enabled)


def main(argv=None):
    import argparse
    import time
    p = argparse.ArgumentParser(description="Generate a reply with a Hugging Face model folder, hub id or "
                                            "the built-in default (SmolLM2-135M-Instruct).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="*", default=["What is the capital of France?"], help="the user message")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder, hub id, or the built-in default")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as plain text, without the chat template")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   help="weights dtype: float32 or bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--quantize", choices=["none", "bf16", "int8"], default="none",
                   help="weights for this generation only: bf16, or weight-only int8 with per-channel scales")
    args = p.parse_args(argv)

    def check():  # every flag before the model loads
        if args.max_new_tokens < 1:
            raise cli.DataError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
        if args.temperature < 0:
            raise cli.DataError(f"--temperature {args.temperature}: expected >= 0 (0 is greedy)")
        if not 0 < args.top_p <= 1:
            raise cli.DataError(f"--top-p {args.top_p}: expected 0 < top-p <= 1")
        if args.dtype not in ("float32", "bfloat16", "float16"):
            raise cli.DataError(f"--dtype {args.dtype!r}: expected float32, bfloat16 or float16")
        if args.device.split(":")[0] not in ("cpu", "cuda"):
            raise cli.DataError(f"--device {args.device!r}: expected cpu or cuda")

    def run():
        check()
        t0 = time.perf_counter()
        model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        tok = load_tokenizer(args.model)
        text = " ".join(args.prompt)
        if not args.raw:
            text = tok.apply_chat_template([{"role": "user", "content": text}])
        prompt = tok.encode(text)
        t1 = time.perf_counter()
        [sample] = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, stop_ids=tok.eos_ids, seed=args.seed, compile=args.compile,
                            quantize=None if args.quantize == "none" else args.quantize)
        t2 = time.perf_counter()
        print(tok.decode([t for t in sample.tokens if t not in tok.eos_ids]))
        weights = "" if args.quantize == "none" else f", {args.quantize} weights"
        print(f"[{len(prompt)} prompt tokens, {len(sample.tokens)} new tokens in {t2 - t1:.2f} s "
              f"({len(sample.tokens) / (t2 - t1):.1f} tok/s); load {t1 - t0:.1f} s; "
              f"{args.device} {args.dtype}{weights}]")

    cli.run_main(run, "generate.py")


if __name__ == "__main__":
    main()
