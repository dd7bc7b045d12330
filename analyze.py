"""Weight-change statistics, update similarity, RL trajectories, linear CKA, loss landscape and merges of
Hugging Face checkpoints (PRISM sec. 10, app. G-I), in one file.

    python analyze.py weights BASE MID --out out/weights                # base -> mid-training change
    python analyze.py similarity BASE MID_MC MID_MCS --out out/sim      # cosine of the two updates
    python analyze.py trajectory MID rl/step_20 rl/step_40 ... --out out/traj
    python analyze.py cka MID RL --data prompts.jsonl --out out/cka     # linear CKA per layer, bootstrap
    python analyze.py landscape BASE MID RL --data math.jsonl --grid 5 --limit 200 --out out/land
    python analyze.py merge BASE MID --alpha 0.15 --out merged/         # 0.15 base + 0.85 mid (the repair)

Conventions
- Checkpoints are HF folders (config.json + safetensors, sharded or not) or hub ids. Tensors are matched by
  name after mapping each family's checkpoint names to the project's (model.from_checkpoint_key), so a
  folder written by transformers and one written by model.save_model compare. `weights`, `similarity`,
  `trajectory` and `merge` stream: one tensor at a time (large tensors in row blocks of BLOCK elements),
  read from the memory-mapped files and compared in float32, so two 8B checkpoints need a few hundred MB.
- Direction: `weights A B` measures dW = B - A relative to A (A is the older model).
- Relative change of a tensor (or a group): ||dW||_F / ||W||_F, with the sums of squares pooled over
  the group (so a group's number is weighted by element count). `rel_change_mean` is the
  element-count-weighted mean of the per-tensor relative changes. ||W|| = 0 with dW != 0 gives inf.
- "Unchanged" fraction at threshold t: the share of elements with |dw| < t * |w|. Zero-weight rule: an
  element that did not move at all (dw == 0) counts as unchanged whatever w is; an element with w == 0
  that moved (dw != 0) counts as changed at every threshold (its relative change is infinite). The
  number of w == 0 elements is reported as `zeros`. Note: bf16 weights can only move in steps of about
  2^-8 relative, so a changed bf16 element always shows >= ~0.4% relative change.
- Components (per layer): the module that owns the tensor, mapped through COMPONENTS: q, k, v, o,
  gate, up, down, gate_up (fused, Granite), input_norm (the pre-mixer / pre-attention norm), post_norm,
  q_norm, k_norm; Mamba2: in_proj, conv1d, A_log, dt_bias, D, mamba_norm (the gated norm inside the
  mixer), out_proj; MoE: router, expert_<name>, shared_<name>. Outside the layers: embed, final_norm,
  lm_head. A bias belongs to its module's component. Unknown modules keep their own name.
- Bad input is refused with the file and tensor named: different model_type, different tensor sets or
  shapes (the first differing tensor), missing shards, NaN/inf. Different dtypes are compared in fp32.

Benchmark (not a test; CPU, 2 shared cores at load ~5, safetensors 0.8): two 1.07 GB bf16 checkpoints
(32 tensors of 4096 x 4096, 5% of elements moved 2%): `weights` 38-48 s wall, peak RSS 0.71 GB of which
0.43 GB is the Python + torch import; `merge` 35 s, peak RSS 1.8 GB (one output shard is held while it is
written: add ~one shard, <= 5 GB, for real checkpoints). `similarity` reads three checkpoints, same blocks.

- merge: result = alpha * A + (1 - alpha) * B per tensor, in A's dtype (or --merge-dtype), A's file layout,
  tensor names and other files (config, tokenizer); the paper's repair is `merge BASE MID --alpha 0.15`.
- cka: each layer's output (the residual stream after the layer; the last one before the final norm),
  mean-pooled over the prompt's tokens, one prompt at a time (batch 1, as in the paper), A's tokenizer for
  both models. The pooling leaves out special tokens (BOS, EOS and every special/added token of the
  tokenizer): the model sees BOS, but BOS's hidden state is the same for every prompt, a component with
  a 1/T weight that says nothing about the prompt and moves CKA (up or down);
  --cka-keep-special true keeps them (cka.json, the log and cka.png say which).
  Features go to --out/features_{a,b}.pt (reused while model files, tokens, pooling, dtype and device
  match), so only one model is in memory. Bootstrap: --bootstrap resamples of --bootstrap-size prompts with
  replacement; the minimum over layers is reported for the full set and for the bootstrap mean.
- landscape: one model in memory; for each grid point every tensor is rebuilt from the three checkpoints
  (W = W_base + a (W_mid - W_base) + b (W_rl - W_mid)); greedy decoding, graded by graders.check_math.

Names: plots and logs call a checkpoint by its run's name: the folder's last part, or the folder above when
that part is `hf` (the training scripts export to RUN/hf, so out/mid/hf is "mid"); --labels overrides.

Outputs in --out: metrics.jsonl (appended; one JSON object per record, tagged with its command),
<command>.json (everything; inf/NaN written as null), PNG plots.
Python API: weight_change(dir_a, dir_b, thresholds) -> dict, update_similarity(base, a, b) -> dict,
linear_cka(X, Y) -> float, layer_outputs(model, input_ids) -> list of tensors, merge(a, b, alpha, out).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cli
import model as M
from generate import generate

COMMANDS = {  # command -> (number of checkpoints (None = 2 or more), what they are)
    "weights": (2, "A B: relative change and unchanged fractions of B - A, per tensor, layer and component"),
    "similarity": (3, "BASE A B: cosine similarity of the updates A - BASE and B - BASE"),
    "trajectory": (None, "BASE CKPT...: change of each checkpoint (e.g. RL steps) against BASE"),
    "cka": (2, "A B: linear CKA of mean-pooled hidden states per layer over --data (text JSONL)"),
    "landscape": (3, "BASE MID RL: pass rate of W_base + a dW_mid + b dW_RL on --data "
                     "({problem, answer} JSONL)"),
    "merge": (2, "A B: write alpha * A + (1 - alpha) * B as a new HF folder into --out"),
}


@dataclass
class Config:
    out: str = "out/analyze"  # folder for metrics.jsonl, <command>.json and plots (merge: the merged model)
    thresholds: str = "0.001,0.01,0.1"  # relative-change thresholds t for the unchanged fraction |dw| < t|w|
    alpha: float = 0.15  # merge: alpha * A + (1 - alpha) * B (paper's repair: merge BASE MID --alpha 0.15)
    merge_dtype: str = ""  # merge: output dtype (float32, bfloat16, float16); "" = each tensor's dtype in A
    steps: str = ""  # trajectory: comma list of checkpoint step numbers; "" = folder names' trailing digits
    data: str = ""  # cka: JSONL of prompts; landscape: JSONL of {"problem", "answer"}
    field: str = "text"  # cka: the JSONL field holding the prompt text
    limit: int = 0  # cka / landscape: use the first N records; 0 = all
    max_tokens: int = 256  # cka: tokens kept per prompt (the first N)
    bootstrap: int = 20  # cka: bootstrap resamples
    bootstrap_size: int = 100  # cka: prompts per resample (drawn with replacement)
    grid: int = 5  # landscape: grid points per axis
    a_min: float = 0.0  # landscape: smallest a (coefficient of dW_mid = MID - BASE)
    a_max: float = 1.0  # landscape: largest a
    b_min: float = 0.0  # landscape: smallest b (coefficient of dW_RL = RL - MID)
    b_max: float = 1.0  # landscape: largest b
    max_new_tokens: int = 512  # landscape: tokens generated per problem (greedy)
    batch_size: int = 8  # landscape: prompts per generate() call
    chat: bool = True  # landscape: wrap problems in the tokenizer's chat template (when it has one)
    device: str = "auto"  # cka / landscape: cpu, cuda, or auto
    dtype: str = "float32"  # cka / landscape: model dtype (float32, bfloat16)
    seed: int = 0  # bootstrap seed
    cka_keep_special: bool = False  # cka: pool over special tokens too (BOS, EOS, added ones); default: not
    labels: str = ""  # comma list of names for the checkpoints (plots, logs); "" = run names from the paths
    plots: bool = True  # write PNG plots
    progress: bool = True  # tqdm bars


# a user mistake (bad checkpoint, data or flag): one line from main(), exit code 2
AnalyzeError = cli.DataError


# ----------------------------------------------------------------------------------------------
# Streaming checkpoint access

BLOCK = 1 << 22  # elements per streamed block (16 MB in fp32)


class Checkpoint:
    """A checkpoint's tensors by the project's parameter name, read lazily from its safetensors files."""

    def __init__(self, path):
        try:
            self.folder = M.resolve_model_path(str(path))
            self.cfg = M.read_config(self.folder)
            files = M.weight_files(self.folder)
        except (FileNotFoundError, ValueError) as e:
            raise AnalyzeError(str(e)) from None
        self.where = {}  # name -> (file, key, shape, dtype)
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith(M.IGNORED_CHECKPOINT_KEYS):
                        continue
                    name = M.from_checkpoint_key(self.cfg, key)
                    if self.cfg.tie_word_embeddings and name == "lm_head.weight":
                        continue  # a copy of the embedding
                    if name in self.where:
                        raise AnalyzeError(f"{file}: tensor '{key}' appears twice in the checkpoint "
                                           f"(also in {self.where[name][0]})")
                    sl = f.get_slice(key)
                    self.where[name] = (file, key, tuple(sl.get_shape()), sl.get_dtype())
        index = self.folder / M.WEIGHT_INDEX
        if index.is_file():
            listed = json.loads(index.read_text()).get("weight_map", {})
            found = {v[1] for v in self.where.values()}
            lost = [k for k in listed if k not in found and not k.endswith(M.IGNORED_CHECKPOINT_KEYS)
                    and not (self.cfg.tie_word_embeddings
                             and M.from_checkpoint_key(self.cfg, k) == "lm_head.weight")]
            if lost:
                raise AnalyzeError(f"{index}: lists tensor '{lost[0]}' in {listed[lost[0]]}, "
                                   "which does not hold it")

    def __str__(self):
        return str(self.folder)

    def blocks(self, name):
        """Yield float32 row blocks of tensor `name` (the whole tensor when it is small); checks NaN/inf."""
        file, key, shape, _ = self.where[name]
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if len(shape) == 0 or math.prod(shape) <= BLOCK:
                parts = [f.get_tensor(key)]
            else:
                rows = max(1, BLOCK // math.prod(shape[1:]))
                sl = f.get_slice(key)
                parts = (sl[i:i + rows] for i in range(0, shape[0], rows))
            for t in parts:  # fresh tensors (safetensors copies out of the map): callers may modify them
                t = t.float()
                if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():  # the cheap test first
                    raise AnalyzeError(f"{file}: tensor '{key}' holds NaN or inf values")
                yield t

    def tensor(self, name):
        """The whole tensor in float32."""
        return torch.cat([b.reshape(-1) for b in self.blocks(name)]).reshape(self.where[name][2])


def check_compatible(ckpts: list) -> list:
    """Same model_type, same tensor names and shapes; returns the names in checkpoint order of the first."""
    first = ckpts[0]
    for other in ckpts[1:]:
        if first.cfg.model_type != other.cfg.model_type:
            raise AnalyzeError(f"{other.folder / 'config.json'}: field 'model_type' is "
                               f"{other.cfg.model_type!r}, "
                               f"but {first.folder / 'config.json'} says {first.cfg.model_type!r}")
        for a, b in ((first, other), (other, first)):
            extra = [n for n in a.where if n not in b.where]
            if extra:
                file, key = a.where[extra[0]][:2]
                raise AnalyzeError(f"{file}: tensor '{key}' has no counterpart in {b} "
                                   f"({len(extra)} such tensors): different architectures")
        for n, (file, key, shape, _) in first.where.items():
            o_file, o_key, o_shape, _ = other.where[n]
            if shape != o_shape:
                raise AnalyzeError(f"{o_file}: tensor '{o_key}' has shape {o_shape}, but {file} has {shape}: "
                                   f"different architectures")
    return list(first.where)


def paired_blocks(ckpts: list, name: str):
    """Yield tuples of aligned float32 blocks of `name` from each checkpoint."""
    return zip(*(c.blocks(name) for c in ckpts))


# ----------------------------------------------------------------------------------------------
# Checkpoint names in plots and logs

run_name = cli.run_name  # a checkpoint's name: out/mid/hf is "mid" (model.py, shared with the trainers)


def checkpoint_labels(cfg, paths: list) -> list:
    """--labels (one per checkpoint), else run_name() of each path (one name for two paths: the paths)."""
    if cfg.labels:
        labels = [x.strip() for x in cfg.labels.split(",")]
        if len(labels) != len(paths) or not all(labels):
            raise AnalyzeError(f"--labels {cfg.labels!r}: expected {len(paths)} non-empty comma-separated "
                               f"names, one per checkpoint, got {len(labels)}")
        return labels
    names = [run_name(p) for p in paths]
    # one name for different paths (two runs' step_20): the paths themselves tell them apart
    return [str(p) if any(n == o and str(p) != str(q) for q, o in zip(paths, names)) else n
            for p, n in zip(paths, names)]


# ----------------------------------------------------------------------------------------------
# Component naming

COMPONENTS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
              "up_proj": "up", "down_proj": "down", "input_linear": "gate_up", "output_linear": "down",
              "input_layernorm": "input_norm", "post_attention_layernorm": "post_norm", "q_norm": "q_norm",
              "k_norm": "k_norm", "in_proj": "in_proj", "out_proj": "out_proj", "conv1d": "conv1d",
              "router": "router"}
MAMBA_PARAMS = ("A_log", "dt_bias", "D")


def component(name: str) -> tuple:
    """A parameter name (ours) -> (layer index or None, component name); see the module docstring."""
    if name.startswith("model.embed_tokens."):
        return None, "embed"
    if name.startswith("model.norm."):
        return None, "final_norm"
    if name.startswith("lm_head."):
        return None, "lm_head"
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if not m:
        return None, name.rsplit(".", 1)[0]
    layer, rest = int(m.group(1)), m.group(2).split(".")
    modules, param = rest[:-1], rest[-1]
    if param in MAMBA_PARAMS:
        return layer, param
    if modules == ["norm"]:  # Nemotron-H / Mamba2: the norm before the mixer
        return layer, "input_norm"
    if modules and modules[-1] == "norm" and modules[0] in ("mixer", "mamba"):
        return layer, "mamba_norm"  # the gated RMSNorm inside a Mamba2 mixer
    if len(modules) >= 2 and modules[-2:] == ["router", "layer"]:
        return layer, "router"  # Granite MoE router
    if modules[:2] == ["mixer", "gate"]:
        return layer, "router"  # Nemotron-H MoE router (weight, e_score_correction_bias)
    last = modules[-1] if modules else param
    last = re.sub(r"\.\d+$", "", last)
    comp = COMPONENTS.get(last, last)
    if "shared_experts" in modules:
        return layer, "shared_" + comp
    if "experts" in modules or "block_sparse_moe" in modules:
        return layer, "expert_" + comp
    return layer, comp


# ----------------------------------------------------------------------------------------------
# Weight change

def parse_thresholds(text) -> tuple:
    try:
        ts = tuple(float(x) for x in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise AnalyzeError(f"--thresholds: expected a comma list of numbers, got {text!r}") from None
    if not ts or any(not 0 < t for t in ts):
        raise AnalyzeError(f"--thresholds: expected positive numbers, got {text!r}")
    return ts


class ChangeStats:
    """Running sums for one tensor or group: ||W||^2, ||dW||^2, element counts per threshold."""

    def __init__(self, thresholds):
        self.thresholds = thresholds
        self.numel = self.zeros = 0
        self.w2 = self.d2 = self.rel_weighted = 0.0  # rel_weighted: sum over tensors of numel * rel_change
        self.unchanged = [0] * len(thresholds)

    def add_block(self, w, w_new):
        """Add a float32 block pair; both are overwritten (this runs over every element of two checkpoints,
        so it is written for few passes and no large temporaries)."""
        self.numel += w.numel()
        self.w2 += _dot(w, w)
        d = w_new.sub_(w)  # dW = W_new - W
        self.d2 += _dot(d, d)
        self.zeros += int(torch.count_nonzero(w == 0))
        r = d.abs_().div_(w.abs_())  # |dw| / |w|: inf where w = 0 moved, NaN where w = 0 did not move
        for i, t in enumerate(self.thresholds):  # NaN >= t is False: 0/0 counts as unchanged, inf as changed
            self.unchanged[i] += w.numel() - int(torch.count_nonzero(r >= t))

    def merge(self, other):
        self.numel += other.numel
        self.zeros += other.zeros
        self.w2 += other.w2
        self.d2 += other.d2
        self.rel_weighted += other.numel * _ratio(other.d2, other.w2) if other.d2 else 0.0
        self.unchanged = [a + b for a, b in zip(self.unchanged, other.unchanged)]

    def result(self, mean=False) -> dict:
        r = {"rel_change": _ratio(self.d2, self.w2),
             "unchanged": {t: u / self.numel for t, u in zip(self.thresholds, self.unchanged)},
             "numel": self.numel, "zeros": self.zeros}
        if mean:
            r["rel_change_mean"] = self.rel_weighted / self.numel
        return r


DOT_CHUNK = 1 << 20  # elements per float32 dot product; the partial sums are added in float64


def _dot(x, y) -> float:
    """sum(x * y) of two float32 tensors: BLAS dot products over 1M-element chunks, summed in float64.
    A non-finite result means NaN/inf in the data (checked) or float32 overflow (redone in float64)."""
    x, y = x.reshape(-1), y.reshape(-1)
    total = sum(float(torch.dot(x[i:i + DOT_CHUNK], y[i:i + DOT_CHUNK]))
                for i in range(0, x.numel(), DOT_CHUNK))
    if not math.isfinite(total):
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise AnalyzeError("non-finite values (NaN or inf) in a compared tensor")
        total = float(torch.sum(x.double() * y.double()))
    return total


def _ratio(d2, w2):
    if w2 == 0:
        return 0.0 if d2 == 0 else math.inf
    return math.sqrt(d2 / w2)


def _progress(items, desc, enabled):
    return cli.progress(items, desc=desc, unit="tensor", enabled=enabled, leave=False)


def weight_change(dir_a, dir_b, thresholds=(1e-3, 1e-2, 1e-1), *, progress=False) -> dict:
    """Change from checkpoint A to checkpoint B (dW = B - A, relative to A), streamed tensor by tensor.

    Returns {"total": S, "tensors": {name: S}, "components": {component: S},
    "layers": {layer: {component: S}}, "dtype_mismatch": [names]} where
    S = {"rel_change": float, "unchanged": {threshold: fraction}, "numel", "zeros"} (total and
    components also carry "rel_change_mean", the numel-weighted mean of per-tensor values).
    """
    thresholds = parse_thresholds(thresholds)
    a, b = Checkpoint(dir_a), Checkpoint(dir_b)
    names = check_compatible([a, b])
    total, comps, layers, tensors, mismatch = ChangeStats(thresholds), {}, {}, {}, []
    for name in _progress(names, "weights", progress):
        if a.where[name][3] != b.where[name][3]:
            mismatch.append(name)
        s = ChangeStats(thresholds)
        for wa, wb in paired_blocks([a, b], name):
            s.add_block(wa, wb)
        tensors[name] = s.result()
        layer, comp = component(name)
        total.merge(s)
        comps.setdefault(comp, ChangeStats(thresholds)).merge(s)
        if layer is not None:
            layers.setdefault(layer, {}).setdefault(comp, ChangeStats(thresholds)).merge(s)
    return {"total": total.result(mean=True), "tensors": tensors,
            "components": {c: s.result(mean=True) for c, s in comps.items()},
            "layers": {i: {c: s.result() for c, s in d.items()} for i, d in sorted(layers.items())},
            "dtype_mismatch": mismatch}


# ----------------------------------------------------------------------------------------------
# Update similarity

class DotStats:
    def __init__(self):
        self.dot = self.n1 = self.n2 = 0.0
        self.numel = 0

    def add(self, d1, d2):
        self.numel += d1.numel()
        self.dot += _dot(d1, d2)
        self.n1 += _dot(d1, d1)
        self.n2 += _dot(d2, d2)

    def merge(self, o):
        self.dot, self.n1, self.n2, self.numel = (self.dot + o.dot, self.n1 + o.n1, self.n2 + o.n2,
                                                  self.numel + o.numel)

    def result(self):
        # an update of norm 0 has no direction: cosine None rather than a made-up number
        cos = self.dot / math.sqrt(self.n1 * self.n2) if self.n1 > 0 and self.n2 > 0 else None
        return {"cosine": cos, "norm_a": math.sqrt(self.n1), "norm_b": math.sqrt(self.n2),
                "numel": self.numel}


def update_similarity(base, dir_a, dir_b, *, progress=False) -> dict:
    """Cosine similarity of dA = A - BASE and dB = B - BASE: overall, per component, per layer, per tensor."""
    ck = [Checkpoint(p) for p in (base, dir_a, dir_b)]
    names = check_compatible(ck)
    total, comps, layers, tensors = DotStats(), {}, {}, {}
    for name in _progress(names, "similarity", progress):
        s = DotStats()
        for w0, w1, w2 in paired_blocks(ck, name):
            s.add(w1.sub_(w0), w2.sub_(w0))
        tensors[name] = s.result()
        layer, comp = component(name)
        total.merge(s)
        comps.setdefault(comp, DotStats()).merge(s)
        if layer is not None:
            layers.setdefault(layer, {}).setdefault(comp, DotStats()).merge(s)
    return {"total": total.result(), "components": {c: s.result() for c, s in comps.items()},
            "layers": {i: {c: s.result() for c, s in d.items()} for i, d in sorted(layers.items())},
            "tensors": tensors}


# ----------------------------------------------------------------------------------------------
# Merge

def merge(dir_a, dir_b, alpha: float, out_dir, *, dtype: str = "", progress=False) -> Path:
    """Write alpha * A + (1 - alpha) * B into out_dir (A's file layout, names and non-weight files).

    One shard of A is in memory at a time (plus one tensor of B); written to out_dir.tmp, then renamed."""
    a, b = Checkpoint(dir_a), Checkpoint(dir_b)
    check_compatible([a, b])
    out_dir = Path(out_dir)
    out_dtype = None
    if dtype:
        out_dtype = getattr(torch, dtype, None)
        if not isinstance(out_dtype, torch.dtype):
            raise AnalyzeError(f"--merge-dtype: unknown dtype {dtype!r} (float32, bfloat16, float16)")
    for c in (a, b):
        if out_dir.resolve() == c.folder.resolve():
            raise AnalyzeError(f"--out {out_dir}: is an input checkpoint; write the merge to a new folder")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_file = {}
    for name, (file, key, _, _) in a.where.items():
        by_file.setdefault(file, []).append((name, key))
    total_bytes = 0
    for file, items in by_file.items():
        tensors = {}
        for name, key in _progress(items, f"merge {file.name}", progress):
            shape, src_dtype = a.where[name][2:]
            t = torch.empty(shape, dtype=out_dtype or _st_dtype(src_dtype))
            flat, at = t.view(-1), 0
            for ta, tb in paired_blocks([a, b], name):  # row blocks, in order
                flat[at:at + ta.numel()] = ta.mul_(alpha).add_(tb, alpha=1.0 - alpha).reshape(-1)
                at += ta.numel()
            tensors[key] = t
            total_bytes += t.numel() * t.element_size()
        save_file(tensors, str(tmp / file.name), metadata={"format": "pt"})
        del tensors
    index = a.folder / M.WEIGHT_INDEX
    if index.is_file():
        raw = json.loads(index.read_text())
        raw.setdefault("metadata", {})["total_size"] = total_bytes
        (tmp / M.WEIGHT_INDEX).write_text(json.dumps(raw, indent=2))
    for p in a.folder.iterdir():
        if (p.is_file() and not p.name.endswith(".safetensors")
                and p.name not in (M.WEIGHT_INDEX, "metrics.jsonl")):
            shutil.copy2(p, tmp / p.name)
    if out_dtype is not None:
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = cfg["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _st_dtype(code: str):
    if code not in _ST_DTYPES:
        raise AnalyzeError(f"merge: cannot interpolate tensors of safetensors dtype {code}")
    return _ST_DTYPES[code]


# ----------------------------------------------------------------------------------------------
# Linear CKA

def linear_cka(X, Y) -> float:
    """Linear CKA of (n, d1) and (n, d2) features (rows = examples): columns centred here, float64.

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); computed through the n x n Gram matrices when
    n is smaller than the feature widths (the same value: ||Y^T X||_F^2 = <X X^T, Y Y^T>_F)."""
    X, Y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(Y, dtype=torch.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError("linear_cka: need (n, d1) and (n, d2) matrices, "
                         f"got {tuple(X.shape)} and {tuple(Y.shape)}")
    X, Y = X - X.mean(0, keepdim=True), Y - Y.mean(0, keepdim=True)
    n = X.shape[0]
    if n < max(X.shape[1], Y.shape[1]):
        K, L = X @ X.T, Y @ Y.T  # (n, n)
        hsic, nx, ny = (K * L).sum(), torch.linalg.norm(K), torch.linalg.norm(L)
    else:
        hsic = torch.linalg.norm(Y.T @ X) ** 2
        nx, ny = torch.linalg.norm(X.T @ X), torch.linalg.norm(Y.T @ Y)
    if nx == 0 or ny == 0:
        raise ValueError("linear_cka: a feature matrix is constant across examples (CKA undefined)")
    return float(hsic / (nx * ny))


@torch.no_grad()
def layer_outputs(model, input_ids, doc_ids=None) -> list:
    """Every decoder layer's output (B, T, hidden), before the final norm, via forward hooks (one forward)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out))
             for layer in model.model.layers]
    try:
        model.hidden_states(input_ids, doc_ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def read_jsonl(path, required: tuple) -> list:
    """The records of --data (JSONL, or any file cli.read_records reads), each with the `required` fields,
    the first of them a string."""
    path = Path(path)
    if not str(path) or not path.is_file():
        raise AnalyzeError(f"--data {path}: no such file (expected a JSONL file)")
    records = []
    for file, i, rec in cli.read_records(path):
        for f in required:
            if f not in rec:
                raise AnalyzeError(f"{file}: record {i}: field '{f}' is missing "
                                  f"(expected {{{', '.join(required)}}})")
        if not isinstance(rec[required[0]], str):
            raise AnalyzeError(f"{file}: record {i}: field '{required[0]}' should be a string")
        records.append(rec)
    if not records:
        raise AnalyzeError(f"{path}: no records")
    return records


def _device_dtype(cfg: Config):
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise AnalyzeError(f"--dtype: unknown dtype {cfg.dtype!r} (float32, bfloat16)")
    return device, dtype


def _files_stamp(ck: Checkpoint) -> list:
    return sorted([str(f), os.path.getsize(f), os.path.getmtime(f)]
                  for f in {v[0] for v in ck.where.values()})


def special_ids(tok) -> set:
    """The ids CKA pooling leaves out by default: BOS, EOS and every special/added token of the tokenizer.
    A pad token is among them when the tokenizer has one; a config's bare pad_token_id is not used (it can
    name an ordinary token), and prompts are never padded here (batch 1)."""
    ids = set(getattr(tok, "special_tokens", {}).values())
    ids |= {i for i in (tok.bos_id, tok.eos_id, *(getattr(tok, "eos_ids", None) or [])) if i is not None}
    return ids


def mean_pool(hidden, ids, exclude=frozenset()) -> torch.Tensor:
    """hidden (T, H) of one prompt with token ids `ids` (T,) -> (H,) mean over positions whose id is not in
    `exclude`, in float32."""
    keep = torch.tensor([int(i) not in exclude for i in ids], device=hidden.device)  # (T,)
    if not keep.any():
        raise ValueError("every token of the prompt is excluded from the pooling")
    return hidden[keep].float().mean(0)


@torch.no_grad()
def cka_features(path, token_lists, cfg: Config, cache_file: Path, meta: dict, exclude=frozenset(),
                 label=None) -> torch.Tensor:
    """(L, n, hidden) layer outputs of one model mean-pooled over each prompt's tokens except the ids in
    `exclude`, one prompt at a time; cached in cache_file (meta must name everything that changes them)."""
    if cache_file.is_file():
        saved = torch.load(cache_file, weights_only=True)
        if saved.get("meta") == json.dumps(meta, sort_keys=True):
            return saved["features"]
    device, dtype = _device_dtype(cfg)
    model = M.load_model(str(path), device=device, dtype=dtype)
    vocab = model.config.vocab_size
    feats = []
    desc = f"cka {label or run_name(path)}"
    for ids in cli.progress(token_lists, desc=desc, enabled=cfg.progress, leave=False):
        if max(ids) >= vocab:
            raise AnalyzeError(f"{path}: token id {max(ids)} >= the model's vocab_size {vocab}")
        x = torch.tensor([ids], device=device)
        pooled = [mean_pool(o[0], ids, exclude) for o in layer_outputs(model, x)]
        feats.append(torch.stack(pooled).cpu())  # (L, hidden)
    del model
    gc.collect()
    features = torch.stack(feats, dim=1)  # (L, n, hidden)
    tmp = cache_file.with_suffix(".tmp")
    torch.save({"meta": json.dumps(meta, sort_keys=True), "features": features}, tmp)
    os.replace(tmp, cache_file)
    return features


def cka_compare(cfg: Config, dir_a, dir_b, labels=None) -> dict:
    """Linear CKA per layer between two models over the prompts of cfg.data, with a bootstrap."""
    records = read_jsonl(cfg.data, (cfg.field,))
    if cfg.limit:
        records = records[:cfg.limit]
    if len(records) < 2:
        raise AnalyzeError(f"{cfg.data}: CKA needs at least 2 prompts, got {len(records)}")
    ck = [Checkpoint(p) for p in (dir_a, dir_b)]
    if ck[0].cfg.num_hidden_layers != ck[1].cfg.num_hidden_layers:
        raise AnalyzeError(f"{ck[1].folder / 'config.json'}: {ck[1].cfg.num_hidden_layers} layers, but "
                           f"{ck[0].folder / 'config.json'} has {ck[0].cfg.num_hidden_layers}")
    tok = M.load_tokenizer(str(ck[0].folder))  # one tokenizer (A's) gives both models the same token ids
    exclude = frozenset() if cfg.cka_keep_special else frozenset(special_ids(tok))
    token_lists, pooled, dropped = [], 0, 0
    for i, r in enumerate(records):
        ids = tok.encode(r[cfg.field], bos=tok.bos_id is not None)[:cfg.max_tokens]
        if not ids:
            raise AnalyzeError(f"{cfg.data}: record {i + 1} has an empty '{cfg.field}'")
        kept = sum(t not in exclude for t in ids)
        if not kept:
            raise AnalyzeError(f"{cfg.data}: record {i + 1}'s '{cfg.field}' holds only special tokens, which "
                               f"the pooling leaves out (--cka-keep-special true keeps them)")
        token_lists.append(ids)
        pooled, dropped = pooled + kept, dropped + len(ids) - kept
    data_hash = hashlib.sha256(json.dumps(token_lists).encode()).hexdigest()
    out = Path(cfg.out)
    labels = labels or [run_name(c.folder) for c in ck]
    feats = []
    for tag, c, label in zip("ab", ck, labels):
        meta = {"model": str(c.folder.resolve()), "files": _files_stamp(c), "tokens": data_hash,
                "dtype": cfg.dtype, "device": _device_dtype(cfg)[0], "excluded_ids": sorted(exclude)}
        feats.append(cka_features(c.folder, token_lists, cfg, out / f"features_{tag}.pt", meta, exclude,
                                  label))
    fa, fb = feats
    n, L = fa.shape[1], fa.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.bootstrap and cfg.bootstrap_size < 2:
        raise AnalyzeError(f"--bootstrap-size: expected >= 2, got {cfg.bootstrap_size}")
    samples = []
    while len(samples) < cfg.bootstrap:
        idx = torch.randint(n, (cfg.bootstrap_size,), generator=gen)
        if idx.unique().numel() > 1:  # one prompt drawn every time has no variance: draw again
            samples.append(idx)
    layers = []
    for l in range(L):
        try:
            full = linear_cka(fa[l], fb[l])
            boots = torch.tensor([linear_cka(fa[l][idx], fb[l][idx]) for idx in samples], dtype=torch.float64)
        except ValueError as e:
            raise AnalyzeError(f"layer {l}: {e} (too few distinct prompts in {cfg.data}?)") from None
        row = {"layer": l, "cka": full}
        if cfg.bootstrap:
            row.update(boot_mean=float(boots.mean()),
                       boot_std=float(boots.std()) if cfg.bootstrap > 1 else 0.0,
                       boot_min=float(boots.min()), boot_p2_5=float(boots.quantile(0.025)),
                       boot_p97_5=float(boots.quantile(0.975)))
        layers.append(row)
    worst = min(layers, key=lambda r: r["cka"])
    summary = {"min_cka": worst["cka"], "min_layer": worst["layer"], "prompts": n, "layers_n": L,
               "special_tokens": "kept" if cfg.cka_keep_special else "excluded"}
    if cfg.bootstrap:
        worst_b = min(layers, key=lambda r: r["boot_mean"])
        summary.update(min_boot_mean=worst_b["boot_mean"], min_boot_layer=worst_b["layer"],
                       min_boot_p2_5=min(r["boot_p2_5"] for r in layers))
    pooling = {"special_tokens": summary["special_tokens"], "excluded_ids": sorted(exclude),
               "pooled_positions": pooled, "excluded_positions": dropped}
    return {"summary": summary, "pooling": pooling, "layers": layers}


# ----------------------------------------------------------------------------------------------
# Landscape

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@torch.no_grad()
def landscape(cfg: Config, base, mid, rl) -> dict:
    """Pass rate of W(a, b) = W_base + a (W_mid - W_base) + b (W_rl - W_mid) on a grid (greedy decoding)."""
    import graders  # lazily: only this command needs them
    records = read_jsonl(cfg.data, ("problem", "answer"))
    if cfg.limit:
        records = records[:cfg.limit]
    if cfg.grid < 1:
        raise AnalyzeError(f"--grid: expected >= 1, got {cfg.grid}")
    ck = [Checkpoint(p) for p in (base, mid, rl)]
    names = check_compatible(ck)
    device, dtype = _device_dtype(cfg)
    model = M.load_model(str(ck[0].folder), device=device, dtype=dtype)
    tok = M.load_tokenizer(str(ck[0].folder))
    prompts = []
    for r in records:
        text = f"{r['problem']}\n\n{MATH_INSTRUCTION}"
        if cfg.chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}])
        prompts.append(tok.encode(text, bos=tok.bos_id is not None and not (cfg.chat and tok.chat_template)))
    stops = list(getattr(tok, "eos_ids", None) or ([tok.eos_id] if tok.eos_id is not None else []))
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))

    def axis(lo, hi):
        return [lo] if cfg.grid == 1 else [lo + (hi - lo) * i / (cfg.grid - 1) for i in range(cfg.grid)]

    A, B = axis(cfg.a_min, cfg.a_max), axis(cfg.b_min, cfg.b_max)
    rate = [[None] * len(B) for _ in A]
    points = []
    for i, a in enumerate(A):
        for j, b in enumerate(B):
            for name in names:  # W = (1 - a) W_base + (a - b) W_mid + b W_rl, one tensor at a time
                w0, w1, w2 = (c.tensor(name) for c in ck)
                if name not in params:
                    raise AnalyzeError(f"{ck[0].where[name][0]}: tensor '{ck[0].where[name][1]}' "
                                       "is not in the model")
                params[name].data.copy_(((1 - a) * w0 + (a - b) * w1 + b * w2).to(params[name].dtype))
            correct, example = 0, None
            for s in range(0, len(prompts), cfg.batch_size):
                outs = generate(model, prompts[s:s + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                                  temperature=0.0, stop_ids=stops)
                for out, r in zip(outs, records[s:s + cfg.batch_size]):
                    text = tok.decode(out.tokens)
                    example = text[:500] if example is None else example
                    correct += bool(graders.check_math(text, r["answer"]))
            rate[i][j] = correct / len(records)
            points.append({"a": a, "b": b, "pass_rate": rate[i][j], "problems": len(records),
                           "first_response": example})
            print(f"landscape a={a:.3f} b={b:.3f} pass_rate={rate[i][j]:.4f}", flush=True)
    return {"a": A, "b": B, "pass_rate": rate, "points": points}


# ----------------------------------------------------------------------------------------------
# Output: tables, JSON, plots

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None  # inf (change of an all-zero tensor) / nan: JSON null, never a number
    return x


def write_json(path: Path, obj):
    cli.write_json(path, _jsonable(obj))


def write_metrics(out: Path, records: list, command: str):
    """Append records to out/metrics.jsonl, each tagged with its command
    (runs sharing a folder stay apart)."""
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_jsonable({"command": command, **r})) + "\n")


def _fmt(x, pct=False):
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.2f}%"
    return f"{x:.4g}"


def change_table(result: dict) -> str:
    ts = list(result["total"]["unchanged"])
    head = (f"{'component':<16}{'elements':>14}{'rel_change':>12}"
            + "".join(f"{'<' + format(100 * t, 'g') + '%':>10}" for t in ts))
    lines = [head + "   (unchanged fraction)", "-" * len(head)]
    rows = sorted(result["components"].items()) + [("TOTAL", result["total"])]
    for c, s in rows:
        lines.append(f"{c:<16}{s['numel']:>14,}{_fmt(s['rel_change']):>12}"
                     + "".join(f"{_fmt(s['unchanged'][t], True):>10}" for t in ts))
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def heatmap(path: Path, layers: dict, key, title: str, cbar_label: str, cmap="viridis", vmin=None, vmax=None):
    """layers: {layer: {component: stats}} -> PNG of layer (rows) x component (columns); blank = absent."""
    plt = _plt()
    comps = sorted({c for d in layers.values() for c in d})
    idx = sorted(layers)
    grid = [[(key(layers[i][c]) if c in layers[i] else None) for c in comps] for i in idx]
    data = torch.tensor([[math.nan if v is None or not math.isfinite(v) else v for v in row] for row in grid])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.6 * len(comps)),
                                    2.0 + 0.25 * len(idx)))  # room for the title
    im = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(comps)), comps, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(idx)), [str(i) for i in idx], fontsize=7)
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar_label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cka(path: Path, layers: list, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = [r["layer"] for r in layers]
    ax.plot(x, [r["cka"] for r in layers], "o-", label="all prompts")
    if "boot_p2_5" in layers[0]:
        ax.fill_between(x, [r["boot_p2_5"] for r in layers], [r["boot_p97_5"] for r in layers], alpha=0.3,
                        label="bootstrap 95%")
    ax.set_xlabel("layer")
    ax.set_ylabel("linear CKA")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectory(path: Path, rows: list, title: str):
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.0))
    fig.suptitle(title, fontsize=9)
    steps = [r["step"] for r in rows]
    for t in rows[0]["unchanged"]:
        ax1.plot(steps, [100 * (1 - r["unchanged"][t]) for r in rows], "o-",
                 label=f"|dw| >= {100 * t:g}% |w|")
    ax1.set_xlabel("step")
    ax1.set_ylabel("changed elements (%)")
    ax1.legend(fontsize=8)
    ax2.plot(steps, [r["rel_change"] for r in rows], "o-")
    ax2.set_xlabel("step")
    ax2.set_ylabel("||dW|| / ||W||")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_landscape(path: Path, res: dict, labels=("base", "mid", "RL")):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    data = torch.tensor(res["pass_rate"], dtype=torch.float64).T.numpy()  # rows b, columns a
    A, B = res["a"], res["b"]
    extent = None
    if len(A) > 1 and len(B) > 1:
        da, db = (A[-1] - A[0]) / (len(A) - 1) / 2, (B[-1] - B[0]) / (len(B) - 1) / 2
        extent = (A[0] - da, A[-1] + da, B[0] - db, B[-1] + db)
    im = ax.imshow(data, origin="lower", extent=extent, aspect="auto", cmap="magma", vmin=0.0,
                   vmax=max(float(data.max()), 1e-3))
    for i, a in enumerate(A):
        for j, b in enumerate(B):
            ax.text(a if extent else i, b if extent else j, f"{data[j, i]:.2f}", ha="center", va="center",
                    color="gray", fontsize=7)
    for (x, y), label in zip(((0, 0), (1, 0), (1, 1)), labels):
        if extent is None or not (extent[0] <= x <= extent[1] and extent[2] <= y <= extent[3]):
            continue
        ax.annotate(label, (x, y), xytext=(0, 8), textcoords="offset points", color="cyan", ha="center",
                    fontsize=9)
    ax.set_xlabel("a (dW_mid)")
    ax.set_ylabel("b (dW_RL)")
    ax.set_title(f"W_base + a dW_mid + b dW_RL\nbase={labels[0]}, mid={labels[1]}, RL={labels[2]}",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="pass rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Commands

def _steps(cfg: Config, paths: list) -> list:
    if cfg.steps:
        try:
            steps = [float(s) for s in cfg.steps.split(",")]
        except ValueError:
            raise AnalyzeError(f"--steps: expected a comma list of numbers, got {cfg.steps!r}") from None
        if len(steps) != len(paths):
            raise AnalyzeError(f"--steps: {len(steps)} numbers for {len(paths)} checkpoints")
        return [int(s) if s.is_integer() else s for s in steps]
    out = []
    for i, p in enumerate(paths):
        m = re.search(r"(\d+)$", Path(p).name)
        out.append(int(m.group(1)) if m else i + 1)
    return out


def _wrote(out: Path, names: list):
    """Say where the results went (only files that exist: plots are optional)."""
    files = [out / n for n in names if (out / n).is_file()]
    print("wrote " + ", ".join(str(f) for f in files))


def run(cfg: Config, command: str, paths: list) -> dict:
    out = Path(cfg.out)
    t0 = time.time()
    labels = checkpoint_labels(cfg, paths)
    if command == "merge":
        if not 0.0 <= cfg.alpha <= 1.0:
            print(f"analyze.py: note: --alpha {cfg.alpha} is outside [0, 1] (extrapolation)", file=sys.stderr)
        folder = merge(paths[0], paths[1], cfg.alpha, out, dtype=cfg.merge_dtype, progress=cfg.progress)
        rec = {"a": paths[0], "b": paths[1], "alpha": cfg.alpha,
               "rule": "alpha * A + (1 - alpha) * B", "out": str(folder), "seconds": time.time() - t0}
        write_metrics(out, [rec], command)
        print(f"merged {cfg.alpha} x {paths[0]} + {1 - cfg.alpha:g} x {paths[1]} -> {folder}")
        return rec
    out.mkdir(parents=True, exist_ok=True)
    if command == "weights":
        res = weight_change(paths[0], paths[1], parse_thresholds(cfg.thresholds), progress=cfg.progress)
        res["a"], res["b"] = paths
        res["labels"] = labels
        write_metrics(out, [{"kind": "tensor", "name": n, "component": component(n)[1],
                             "layer": component(n)[0], **s} for n, s in res["tensors"].items()]
                      + [{"kind": "total", **res["total"]}], command)
        write_json(out / "weights.json", res)
        if res["dtype_mismatch"]:
            print(f"note: {len(res['dtype_mismatch'])} tensors differ in dtype (compared in float32), "
                  f"e.g. {res['dtype_mismatch'][0]}")
        print(change_table(res))
        if cfg.plots and res["layers"]:
            heatmap(out / "weights_rel_change.png", res["layers"], lambda s: s["rel_change"],
                    f"relative change: {labels[0]} -> {labels[1]}", "||dW||_F / ||W||_F")
            ts = parse_thresholds(cfg.thresholds)
            t = 0.01 if 0.01 in ts else ts[len(ts) // 2]
            heatmap(out / "weights_changed.png", res["layers"], lambda s: 1 - s["unchanged"][t],
                    f"elements changed by >= {100 * t:g}%: {labels[0]} -> {labels[1]}",
                    f"fraction with |dw| >= {100 * t:g}% |w|", vmin=0, vmax=1)
        _wrote(out, ["weights.json", "metrics.jsonl", "weights_rel_change.png", "weights_changed.png"])
        return res
    if command == "similarity":
        res = update_similarity(*paths, progress=cfg.progress)
        res["base"], res["a"], res["b"] = paths
        res["labels"] = labels
        write_metrics(out, [{"kind": "component", "component": c, **s} for c, s in res["components"].items()]
                      + [{"kind": "total", **res["total"]}], command)
        write_json(out / "similarity.json", res)
        print(f"{'component':<16}{'cosine':>10}{'|dA|':>12}{'|dB|':>12}")
        for c, s in sorted(res["components"].items()) + [("TOTAL", res["total"])]:
            print(f"{c:<16}{_fmt(s['cosine']):>10}{_fmt(s['norm_a']):>12}{_fmt(s['norm_b']):>12}")
        if cfg.plots and res["layers"]:
            heatmap(out / "similarity.png", res["layers"], lambda s: s["cosine"],
                    f"cosine of the updates {labels[1]} - {labels[0]} and {labels[2]} - {labels[0]}",
                    "cosine similarity", cmap="coolwarm", vmin=-1, vmax=1)
        _wrote(out, ["similarity.json", "metrics.jsonl", "similarity.png"])
        return res
    if command == "trajectory":
        steps = _steps(cfg, paths[1:])
        rows = []
        for step, p, label in zip(steps, paths[1:], labels[1:]):
            r = weight_change(paths[0], p, parse_thresholds(cfg.thresholds), progress=cfg.progress)
            row = {"step": step, "checkpoint": p, "label": label, **r["total"],
                   "components": {c: {"rel_change": s["rel_change"], "unchanged": s["unchanged"]}
                                  for c, s in r["components"].items()}}
            rows.append(row)
            write_metrics(out, [row], command)
            print(f"step {step}: rel_change {_fmt(row['rel_change'])}, changed "
                  + ", ".join(f">={100 * t:g}%: {_fmt(1 - u, True)}" for t, u in row["unchanged"].items()))
        order = sorted(range(len(rows)), key=lambda i: rows[i]["step"])
        rows = [rows[i] for i in order]
        res = {"base": paths[0], "base_label": labels[0], "checkpoints": rows}
        write_json(out / "trajectory.json", res)
        if cfg.plots:
            plot_trajectory(out / "trajectory.png", rows, f"change against {labels[0]}")
        _wrote(out, ["trajectory.json", "metrics.jsonl", "trajectory.png"])
        return res
    if command == "cka":
        res = cka_compare(cfg, *paths, labels=labels)
        res["a"], res["b"] = paths
        res["labels"] = labels
        write_metrics(out, [{"kind": "layer", **r} for r in res["layers"]]
                      + [{"kind": "summary", **res["summary"]}], command)
        write_json(out / "cka.json", res)
        for r in res["layers"]:
            extra = f"  bootstrap mean {r['boot_mean']:.6f} [{r['boot_p2_5']:.6f}, {r['boot_p97_5']:.6f}]" \
                if "boot_mean" in r else ""
            print(f"layer {r['layer']:>3}: CKA {r['cka']:.6f}{extra}")
        s = res["summary"]
        print(f"minimum over layers: {s['min_cka']:.6f} (layer {s['min_layer']})")
        pool = res["pooling"]
        how = ("special tokens kept (--cka-keep-special true)" if cfg.cka_keep_special else
               f"special tokens excluded: {pool['excluded_positions']} positions "
               f"(--cka-keep-special true keeps them)")
        print(f"{labels[0]} vs {labels[1]}: hidden states mean-pooled over {pool['pooled_positions']} token "
              f"positions, {how}")
        if cfg.plots:
            plot_cka(out / "cka.png", res["layers"], f"linear CKA per layer: {labels[0]} vs {labels[1]}\n"
                     f"({s['prompts']} prompts, mean over tokens, special tokens {s['special_tokens']})")
        _wrote(out, ["cka.json", "metrics.jsonl", "cka.png", "features_a.pt", "features_b.pt"])
        return res
    if command == "landscape":
        res = landscape(cfg, *paths)
        res["base"], res["mid"], res["rl"] = paths
        res["labels"] = labels
        write_metrics(out, res["points"], command)
        write_json(out / "landscape.json", res)
        if cfg.plots:
            plot_landscape(out / "landscape.png", res, labels)
        _wrote(out, ["landscape.json", "metrics.jsonl", "landscape.png"])
        return res
    raise AnalyzeError(f"unknown command {command!r}")


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None) -> tuple:
    p = argparse.ArgumentParser(
        description="Weight-change statistics, update similarity, CKA, landscape and merges "
                    "of HF checkpoints.",
        epilog="commands:\n" + "\n".join(f"  {c:<11} {d}" for c, (_, d) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(COMMANDS), help="what to compute (see below)")
    p.add_argument("checkpoints", nargs="+", help="model folders or hub ids, as the command needs")
    cfg, args = cli.parse_config(Config, argv, parser=p)
    need = COMMANDS[args.command][0]
    n = len(args.checkpoints)
    if (need is None and n < 2) or (need is not None and n != need):
        p.error(f"{args.command} takes {COMMANDS[args.command][1].split(':')[0]} "
                f"({'2 or more' if need is None else need} checkpoints), got {n}")
    if args.command in ("cka", "landscape") and not cfg.data:
        p.error(f"{args.command} needs --data")
    return cfg, args.command, args.checkpoints


def main(argv=None):
    cfg, command, paths = cli.run_main(lambda: parse_args(argv), "analyze.py")
    return cli.run_main(lambda: run(cfg, command, paths), "analyze.py", out=getattr(cfg, "out", None))


if __name__ == "__main__":
    main()
