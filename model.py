"""Every model family of the project, in one file: config, layers, decoder, loading, saving, generation.

Dense families (Llama, Mistral, Granite, Qwen2, Qwen3) are configured straight from a Hugging Face
`config.json`; parameter names equal transformers' so a checkpoint's keys map one to one.

    model = load_model("smollm2-135m-instruct")          # a local folder, a hub id, or the built-in default
    tok = load_tokenizer("smollm2-135m-instruct")
    logits = model(input_ids, doc_ids)                    # (B, T) -> (B, T, V); doc_ids optional
    samples = generate(model, [tok.encode("Hi")], max_new_tokens=32)

Packed sequences: `doc_ids` (B, T) gives each token a document id. Positions restart at every new
id, attention never crosses ids, and a negative id is padding (left padding in generation batches).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "smollm2-135m-instruct"  # the built-in default: SmolLM2-135M-Instruct (see resolve_model_path)
DENSE_MODEL_TYPES = ("llama", "mistral", "granite", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # rope_type and its parameters; None for plain RoPE
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (qwen2; llama's attention_bias)
    o_bias: bool  # bias on o_proj (llama/qwen3 attention_bias; not qwen2)
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE (qwen3)
    sliding_windows: list  # per layer: window size in tokens, or None for full attention
    embedding_multiplier: float = 1.0  # granite: embeddings are scaled by this
    attention_scale: float | None = None  # granite attention_multiplier; None means head_dim ** -0.5
    residual_multiplier: float = 1.0  # granite: each block's output is scaled by this before the residual add
    logits_scaling: float = 1.0  # granite: logits are divided by this
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    hf: dict = field(default_factory=dict)  # the config.json as read: save_model writes it back


def _get(raw: dict, name: str, source: str, kind=int, default=..., minimum=None):
    """Read one field of a config.json with a clear error naming the file and the field."""
    if name not in raw or raw[name] is None:
        if default is ...:
            raise ValueError(f"{source}: required field '{name}' is missing")
        return default
    value = raw[name]
    ok = isinstance(value, bool) if kind is bool else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind is int and ok and float(value) != int(value):
        ok = False
    if not ok:
        raise ValueError(f"{source}: field '{name}' should be {kind.__name__}, got {value!r}")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{source}: field '{name}' = {value} is out of range (must be >= {minimum})")
    return value


def _rope_settings(raw: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and the scaling dict, from transformers 5's `rope_parameters` or the older fields."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")
    if rope_type == "default":
        return float(theta), None
    required = {"linear": ["factor"], "dynamic": ["factor"],
                "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}
    if rope_type not in required:
        raise ValueError(f"{source}: field 'rope_scaling' has rope_type '{rope_type}', which is not supported "
                         f"(supported: default, {', '.join(required)})")
    for key in required[rope_type]:
        if not isinstance(merged.get(key), (int, float)):
            raise ValueError(f"{source}: field 'rope_scaling.{key}' is required for rope_type '{rope_type}'")
    merged["rope_type"] = rope_type
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return float(theta), merged


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict, checking every field it uses."""
    model_type = raw.get("model_type")
    if model_type not in DENSE_MODEL_TYPES:
        raise ValueError(f"{source}: field 'model_type' is {model_type!r}; supported: {', '.join(DENSE_MODEL_TYPES)}")
    hidden = _get(raw, "hidden_size", source, minimum=1)
    layers = _get(raw, "num_hidden_layers", source, minimum=1)
    heads = _get(raw, "num_attention_heads", source, minimum=1)
    kv_heads = _get(raw, "num_key_value_heads", source, default=heads, minimum=1)
    if heads % kv_heads:
        raise ValueError(f"{source}: field 'num_attention_heads' ({heads}) must be a multiple of "
                         f"'num_key_value_heads' ({kv_heads})")
    if raw.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{source}: field 'hidden_size' ({hidden}) is not divisible by 'num_attention_heads' "
                         f"({heads}) and no 'head_dim' is given")
    head_dim = _get(raw, "head_dim", source, default=hidden // heads, minimum=2)
    if head_dim % 2:
        raise ValueError(f"{source}: field 'head_dim' ({head_dim}) must be even for RoPE")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported for {model_type}")
    theta, scaling = _rope_settings(raw, source)
    max_pos = _get(raw, "max_position_embeddings", source, default=4096, minimum=1)

    # Sliding windows: transformers 5 writes `layer_types`; older Mistral configs set `sliding_window` for
    # every layer; Qwen2/3 use it only when `use_sliding_window` is set, from layer `max_window_layers` on.
    window = _get(raw, "sliding_window", source, default=None, minimum=1)
    layer_types = raw.get("layer_types")
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        window = None
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise ValueError(f"{source}: field 'layer_types' must be a list of {layers} entries")
        for t in layer_types:
            if t not in ("full_attention", "sliding_attention"):
                raise ValueError(f"{source}: field 'layer_types' has unknown entry {t!r}")
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    elif model_type in ("qwen2", "qwen3"):
        first = _get(raw, "max_window_layers", source, default=layers, minimum=0)
        windows = [window if i >= first else None for i in range(layers)]
    elif model_type == "mistral":
        windows = [window] * layers
    else:
        windows = [None] * layers

    attention_bias = _get(raw, "attention_bias", source, kind=bool, default=False)
    granite = model_type == "granite"
    eos = raw.get("eos_token_id")
    return ModelConfig(
        model_type=model_type,
        vocab_size=_get(raw, "vocab_size", source, minimum=1),
        hidden_size=hidden,
        intermediate_size=_get(raw, "intermediate_size", source, minimum=1),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_get(raw, "rms_norm_eps", source, kind=float, default=1e-6, minimum=0.0),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_get(raw, "tie_word_embeddings", source, kind=bool, default=False),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=_get(raw, "mlp_bias", source, kind=bool, default=False),
        qk_norm=model_type == "qwen3",
        sliding_windows=windows,
        embedding_multiplier=_get(raw, "embedding_multiplier", source, kind=float, default=1.0) if granite else 1.0,
        attention_scale=_get(raw, "attention_multiplier", source, kind=float, default=None) if granite else None,
        residual_multiplier=_get(raw, "residual_multiplier", source, kind=float, default=1.0) if granite else 1.0,
        logits_scaling=_get(raw, "logits_scaling", source, kind=float, default=1.0) if granite else 1.0,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        hf=raw,
    )


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse RoPE frequencies (head_dim / 2,), with llama3 / linear / dynamic-NTK scaling applied."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    base = cfg.rope_theta
    if kind == "dynamic":  # NTK: a larger base once the sequence outgrows the trained length
        factor, max_pos = scaling["factor"], cfg.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # long wavelengths divided by factor, short ones kept, a smooth blend between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos, sin (B, T, D)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention(q, k, v, *, scale: float, window: int | None = None, doc_ids=None) -> torch.Tensor:
    """Causal self-attention over one block of tokens: the single place a kernel can replace.

    q (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv; doc_ids (B, T) or None.
    Query i attends key j when j <= i, both are in the same document, and i - j < window.
    Padding (negative ids) only attends padding with the same id, so no row is empty (no NaNs).
    """
    if doc_ids is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    T = q.shape[2]
    idx = torch.arange(T, device=q.device)
    allowed = idx[None, :] <= idx[:, None]  # (T, T)
    if window is not None:
        allowed = allowed & (idx[:, None] - idx[None, :] < window)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
        allowed = allowed[:, None]  # (B, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


def cached_attention(q, k, v, allowed, *, scale: float) -> torch.Tensor:
    """Attention of new queries against a KV cache. q (B, Hq, T, D); k, v (B, Hkv, S, D); allowed (B, T, S)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if T == 1:  # decode: fold the query heads of each KV group into the query axis, no K/V repeat
        q = q.view(B, Hkv, Hq // Hkv, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
        return out.view(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=True)


@dataclass
class KVCache:
    k: torch.Tensor  # (B, Hkv, S_max, D)
    v: torch.Tensor  # (B, Hkv, S_max, D)

    def keep(self, rows: torch.Tensor):
        self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else self.head_dim ** -0.5
        self.window = cfg.sliding_windows[layer]
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def allocate_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, ctx: "Context", cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), ctx.cos, ctx.sin)  # (B, Hq, T, D)
        k = apply_rope(k.transpose(1, 2), ctx.cos, ctx.sin)  # (B, Hkv, T, D)
        if cache is None or ctx.cache_start == 0:  # training, or prefill of an empty cache
            out = attention(q, k, v, scale=self.scale, window=self.window, doc_ids=ctx.doc_ids)
            if cache is not None:
                cache.k[:, :, :T] = k
                cache.v[:, :, :T] = v
        else:
            end = ctx.cache_start + T
            cache.k[:, :, ctx.cache_start:end] = k
            cache.v[:, :, ctx.cache_start:end] = v
            allowed = ctx.cached_mask(self.window)
            out = cached_attention(q, cache.k[:, :, :end], cache.v[:, :, :end], allowed, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, each added to the residual stream."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.residual_multiplier = cfg.residual_multiplier

    def allocate_cache(self, batch: int, max_len: int, device, dtype):
        return self.self_attn.allocate_cache(batch, max_len, device, dtype)

    def forward(self, x: torch.Tensor, ctx: "Context", cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache) * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


# ----------------------------------------------------------------------------------------------
# Decoder


class DecodeCache:
    """Everything generation keeps between steps: one cache per layer plus each slot's document id.

    Slots are shared by the batch: with left padding, slot s of every row holds that row's s-th token
    (or padding, document id -1). `length` is the number of filled slots.
    """

    def __init__(self, model: "CausalLM", batch: int, max_len: int, device, dtype):
        self.layers = [layer.allocate_cache(batch, max_len, device, dtype) for layer in model.model.layers]
        self.doc_ids = torch.full((batch, max_len), -1, dtype=torch.long, device=device)  # (B, S_max)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) RoPE position of next token
        self.length = 0
        self.max_len = max_len

    def keep(self, rows: torch.Tensor):
        """Drop every batch row not in `rows` (finished sequences stop costing work)."""
        for layer_cache in self.layers:
            if layer_cache is not None:
                layer_cache.keep(rows)
        self.doc_ids, self.next_position = self.doc_ids[rows], self.next_position[rows]


class Context:
    """What every layer needs for one forward call: RoPE tables, document ids, cache masks."""

    def __init__(self, cos, sin, doc_ids, cache: DecodeCache | None):
        self.cos, self.sin, self.doc_ids = cos, sin, doc_ids  # (B, T, D), (B, T, D), (B, T) or None
        self.cache = cache
        self.cache_start = 0 if cache is None else cache.length
        self._masks = {}

    def cached_mask(self, window: int | None) -> torch.Tensor:
        """(B, T, S) bool: new token i (slot start + i) may see slot j of the same document, j <= its slot."""
        if window not in self._masks:
            T = self.doc_ids.shape[1]
            end = self.cache_start + T
            q_slot = torch.arange(self.cache_start, end, device=self.doc_ids.device)
            k_slot = torch.arange(end, device=self.doc_ids.device)
            allowed = (k_slot[None, :] <= q_slot[:, None])[None] & (
                self.cache.doc_ids[:, None, :end] == self.doc_ids[:, :, None])
            if window is not None:
                allowed = allowed & (q_slot[:, None] - k_slot[None, :] < window)
            self._masks[window] = allowed
        return self._masks[window]


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) positions that restart at 0 where the id changes."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_buffers(self):
        """Recompute non-persistent buffers (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.model.embed_tokens.weight.device)

    def allocate_cache(self, batch: int, max_len: int) -> DecodeCache:
        w = self.model.embed_tokens.weight
        return DecodeCache(self, batch, max_len, w.device, w.dtype)

    def hidden_states(self, input_ids, doc_ids=None, cache: DecodeCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden) after the final norm."""
        B, T = input_ids.shape
        if cache is not None:
            if doc_ids is None:
                doc_ids = torch.zeros_like(input_ids)
            if cache.length + T > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} tokens; {cache.length} used, {T} more given")
            if cache.length == 0:
                positions = positions_from_doc_ids(doc_ids)
            else:
                positions = cache.next_position[:, None] + torch.arange(T, device=input_ids.device)
        elif doc_ids is not None:
            positions = positions_from_doc_ids(doc_ids)
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)

        inv_freq = self.inv_freq
        if (self.config.rope_scaling or {}).get("rope_type") == "dynamic":
            inv_freq = rope_inv_freq(self.config, int(positions.max()) + 1).to(inv_freq.device)
        freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.model.embed_tokens(input_ids) * self.config.embedding_multiplier  # (B, T, hidden)
        ctx = Context(emb.cos().to(x.dtype), emb.sin().to(x.dtype), doc_ids, cache)
        if cache is not None:
            cache.doc_ids[:, cache.length:cache.length + T] = doc_ids
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += T
            cache.next_position = positions[:, -1] + 1
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.config.logits_scaling

    def forward(self, input_ids, doc_ids=None, cache: DecodeCache | None = None) -> torch.Tensor:
        """(B, T) token ids [, (B, T) document ids] -> (B, T, vocab) logits."""
        return self.logits(self.hidden_states(input_ids, doc_ids, cache))


# ----------------------------------------------------------------------------------------------
# Loading and saving Hugging Face checkpoints

WEIGHT_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json",
                   "special_tokens_map.json", "generation_config.json")
IGNORED_CHECKPOINT_KEYS = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; we recompute it


def resolve_model_path(name_or_path: str) -> Path:
    """A local folder, the built-in default, or a hub id (downloads only config, weights, tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path == DEFAULT_MODEL:
        return Path(smollm2_path()) if _has_smollm2_package() else _download(SMOLLM2_HUB_ID)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such model folder (expected a folder with config.json, "
                                f"a hub id like 'org/name', or '{DEFAULT_MODEL}')")
    return _download(name_or_path)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every model folder needs a config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(raw, str(path))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or model.safetensors."""
    index = folder / WEIGHT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: field 'weight_map' is missing or not an object")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors and no {WEIGHT_INDEX}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (listed in {index})")
    return files


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor):
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor


def load_model(name_or_path: str, *, device="cpu", dtype=torch.bfloat16) -> CausalLM:
    """Build the model on the meta device and load each checkpoint tensor straight into place.

    Peak memory is about one copy of the weights: tensors are read one at a time from the
    (memory-mapped) safetensors files and moved to `device` in `dtype`.
    """
    from safetensors import safe_open
    folder = resolve_model_path(name_or_path)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    seen = set()
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith(IGNORED_CHECKPOINT_KEYS) or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                    continue
                if key not in expected:
                    raise ValueError(f"{file}: unexpected tensor '{key}' for model_type '{cfg.model_type}'")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[key]):
                    raise ValueError(f"{file}: tensor '{key}' has shape {shape}, config.json implies "
                                     f"{tuple(expected[key])}")
                _set_tensor(model, key, f.get_tensor(key).to(device=device, dtype=dtype))
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers()
    return model.eval()


def save_model(model: CausalLM, out_dir, tokenizer_from=None, *, state_dict: dict | None = None,
               max_shard_bytes: int = 5 * 1024 ** 3):
    """Write a Hugging Face folder: config.json, safetensors shards (<= max_shard_bytes) with an index,
    and the tokenizer files of `tokenizer_from`. Written to a temporary folder, then renamed.
    `state_dict` overrides the model's (e.g. one gathered from FSDP shards)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config
    tensors = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    dtype = next(iter(tensors.values())).dtype

    shards, current, current_bytes = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[key] = t
        current_bytes += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / WEIGHT_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))
    hf = dict(cfg.hf)
    hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")  # transformers 5 reads dtype, older torch_dtype
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer_from is not None:
        source = resolve_model_path(str(tokenizer_from))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class Sample:
    tokens: list  # new token ids, ending at (and including) a stop token if one came
    logprobs: list  # log-probability of each new token under the distribution it was drawn from


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple:
    """(B, V) logits -> (B,) tokens and their (B,) log-probs, without a host sync.

    Greedy (temperature 0) reports log-probs under the model's unscaled distribution; sampling reports
    them under the temperature-scaled, top-p-truncated distribution the token was drawn from.
    """
    logits = logits.float()
    if temperature == 0:
        token = logits.argmax(dim=-1)
        return token, torch.log_softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest prefix of the sorted distribution whose mass reaches top_p
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
        drop = torch.zeros_like(logprobs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, -math.inf), dim=-1)
    # Gumbel-max with exponential noise: argmax(p / E), E ~ Exp(1), samples from p
    noise = torch.empty_like(logprobs).exponential_(generator=generator)
    token = (logprobs - noise.log()).argmax(dim=-1)
    return token, logprobs.gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def generate(model: CausalLM, prompts: list, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids=(), seed: int = 0, compile: bool = False,
             progress: bool = False) -> list:
    """Batched generation for prompts of any lengths: left padding, a cache allocated once, prefill,
    then one-token decode steps. Rows that hit a stop token leave the batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    device = model.lm_head.weight.device
    B, T0 = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.zeros(B, T0, dtype=torch.long)
    doc_ids = torch.full((B, T0), -1, dtype=torch.long)  # left padding: id -1
    for i, p in enumerate(prompts):
        input_ids[i, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        doc_ids[i, T0 - len(p):] = 0
    input_ids, doc_ids = input_ids.to(device), doc_ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)

    cache = model.allocate_cache(B, T0 + max_new_tokens)
    step = _decode_step_compiled if compile else _decode_step
    logits = model.logits(model.hidden_states(input_ids, doc_ids, cache)[:, -1])  # (B, V): last slot is real
    out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(B, max_new_tokens, device=device)
    n_new = torch.full((B,), max_new_tokens, dtype=torch.long)  # per original row, filled when it stops
    rows = torch.arange(B, device=device)  # original index of each live row
    one_doc = torch.zeros(B, 1, dtype=torch.long, device=device)
    bar = _progress(max_new_tokens, progress)
    for t in range(max_new_tokens):
        token, logprob = sample_next(logits, temperature, top_p, generator)
        out_tokens[rows, t], out_logprobs[rows, t] = token, logprob
        bar.update(1)
        if t == max_new_tokens - 1:
            break
        finished = torch.isin(token, stop)
        if finished.any():  # one host sync per step: finished rows leave the batch
            n_new[rows[finished].cpu()] = t + 1
            live = (~finished).nonzero()[:, 0]
            if live.numel() == 0:
                break
            rows, token = rows[live], token[live]
            cache.keep(live)
            one_doc = one_doc[: live.numel()]
        logits = step(model, token[:, None], one_doc, cache)
    bar.close()
    tokens, logprobs = out_tokens.cpu(), out_logprobs.cpu()
    return [Sample(tokens[i, :n_new[i]].tolist(), logprobs[i, :n_new[i]].tolist()) for i in range(B)]


def _decode_step(model: CausalLM, token: torch.Tensor, doc_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    return model.logits(model.hidden_states(token, doc_ids, cache)[:, -1])  # (B, V)


_decode_step_compiled = torch.compile(_decode_step, dynamic=True)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="tok", disable=not enabled)
