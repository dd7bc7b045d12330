"""Mid-training: continued pretraining of a Hugging Face base model on a weighted math/code/science
mixture with FSDP2, from one CPU to many 8-GPU nodes, resumable after any crash, exporting an HF folder.

    python train_mid.py                                   # built-in demo: SmolLM2-135M, a small real mixture
    torchrun --standalone --nproc_per_node=8 train_mid.py --model meta-llama/Llama-3.1-8B --data mix.toml \\
        --out runs/llama-mcs --tokens 27e9 --seq-len 8192 --batch-size 2 --grad-accum 8 --warmup 500
    torchrun --nnodes=16 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=prism \\
        train_mid.py ... --mesh 16x8                      # the paper's HSDP: 16-way replicate x 8-way shard
    python train_mid.py prepare --data mix.toml           # only tokenize the mixture's sources into shards
    python train_mid.py --out runs/x --resume             # continue from the latest complete checkpoint

The pipeline, top to bottom:
  1. Data preparation: each source of the mixture file (JSONL / JSONL.gz / Parquet / text files, or hub files
     as hf://datasets/OWNER/NAME/GLOB) is formatted (text; qa = question "\\n" answer; chat = "User:" /
     "Assistant:" turns), tokenized in parallel processes and written as uint32 token shards with EOS after
     every document, plus index.json. Every 1/heldout_frac-th document goes to a held-out shard. The folder
     name is a fingerprint of the inputs, so preparing again is a no-op; it is renamed into place only when
     complete.
  2. Mixture loader: every sequence is one window of seq_len + 1 tokens of one source; the source of each
     next sequence is the one furthest below its weight (exact token accounting: realised shares stay within
     one sequence of the weights), windows are drawn from a per-source permutation reshuffled every epoch.
     `doc_ids` mark documents inside a window so neither attention nor the Mamba state crosses them. The
     state (sequences taken per source) is global, so a resumed run, at any world size, sees exactly the data
     the uninterrupted one would have.
  3. FSDP2: `fully_shard` per decoder block then the root, on a 1-D mesh (shard) or 2-D (replicate x shard,
     HSDP); bf16 parameters with fp32 reduction on GPU; activation checkpointing and torch.compile per block.
     A run without torchrun is a one-process group, so there is one code path.
  4. AdamW (no decay on norms, biases and other 1-D tensors), warmup + cosine to 0.1x (or WSD, constant),
     gradient accumulation with the loss normalised by the step's global token count, clipping; a step with a
     non-finite loss or gradient is skipped and counted, and too many in a row stop the run.
  5. DCP checkpoints (model, optimizer, loader, RNG) every save_every steps, written to step_N.tmp and
     renamed; --resume takes the latest complete one; the HF export goes to OUT/hf.
  6. metrics.jsonl (one record per step), eval.jsonl (held-out loss per source), loss.png.

Public (train_rl.py builds on these): Dist, setup_distributed, build_mesh, shard_model, full_params, reshard,
resolve_param_dtype, build_optimizer, lr_at, clip_grad_norm, Checkpointer, export_hf, MetricsLog,
plot_metrics, model_flops_per_token, peak_flops. Per-token log-probabilities for a loss:
`model(ids, doc_ids, labels=...)` (model.py; chunked over the vocabulary, and through forward so FSDP
gathers the parameters).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import cli
import model as M


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"  # base model: folder, hub id or the built-in model.DEFAULT_MODEL
    data: str = ""  # mixture file (TOML or JSON); "" = the built-in demo mixture from installed packages
    out: str = "out/mid"  # run folder: metrics.jsonl, eval.jsonl, checkpoints/, hf/, loss.png
    steps: int = 30  # optimizer steps (ignored when tokens > 0)
    tokens: float = 0.0  # token budget; sets steps = tokens / (global batch x seq_len). Paper: 27e9
    seq_len: int = 256  # tokens per sequence. Paper: 8192
    batch_size: int = 2  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate. Paper: 5e-5 (the demo's few steps use 1e-4)
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine, linear, wsd)
    warmup: int = 4  # warmup steps. Paper: 500
    schedule: str = "cosine"  # cosine | linear | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd: fraction of the steps spent decaying
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-10  # AdamW epsilon
    weight_decay: float = 0.1  # AdamW weight decay (not on norms, biases or other 1-D tensors)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 0  # data order and initialisation of anything random
    save_every: int = 15  # steps between DCP checkpoints; 0 = only at the end
    keep_checkpoints: int = 1  # complete checkpoints kept (older removed; 0 = all). One is ~1.6 GB for 135M
    async_save: bool = False  # write checkpoints in the background (torch.distributed.checkpoint.async_save)
    export_every: int = 0  # steps between extra HF exports to OUT/hf-stepN; 0 = only the final OUT/hf
    export_dtype: str = "auto"  # HF export dtype: auto (the base checkpoint's), bfloat16, float32
    resume: bool = False  # continue from the latest complete checkpoint in OUT/checkpoints
    eval_every: int = 15  # steps between held-out evaluations (also before the first and after the last step)
    eval_tokens: int = 2048  # held-out tokens per source per evaluation
    mesh: str = ""  # "" = shard over all ranks (FSDP); "RxS" = HSDP, R replicas x S-way shard (paper: 16x8)
    activation_checkpointing: str = "off"  # off | block (recompute blocks) | selective (keep matmul outputs)
    compile: bool = False  # torch.compile each decoder block
    device: str = "auto"  # cpu, cuda, or auto
    param_dtype: str = "auto"  # compute dtype of sharded params: auto (bf16 GPU, fp32 CPU), bfloat16, float32
    heldout_frac: float = 0.05  # share of each source's documents held out for evaluation (every 1/frac-th)
    prepare_workers: int = 2  # tokenizer processes for data preparation
    data_cache: str = ""  # folder for prepared token shards; "" = $PRISM_CACHE/data or ~/.cache/prism/data
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    log_every: int = 1  # steps between log lines
    progress: bool = True  # progress bars for data preparation

    def check(self):
        """Every flag's range, before any data is prepared or a model loaded (a DataError names the flag)."""
        check_ranges(self, ints={"steps": 1 if self.tokens <= 0 else 0, "seq_len": 1, "batch_size": 1,
                                 "grad_accum": 1, "warmup": 0, "save_every": 0, "keep_checkpoints": 0,
                                 "export_every": 0, "eval_every": 0, "eval_tokens": 0, "prepare_workers": 1,
                                 "max_bad_steps": 1, "log_every": 1},
                     floats={"tokens": (0, None), "lr": (0, None), "min_lr_ratio": (0, 1),
                             "decay_frac": (0, 1), "beta1": (0, 1), "beta2": (0, 1), "eps": (0, None),
                             "weight_decay": (0, None), "grad_clip": (0, None), "heldout_frac": (0, 1)},
                     choices={"schedule": ("cosine", "linear", "wsd", "constant"),
                              "activation_checkpointing": ("off", "block", "selective"),
                              "param_dtype": ("auto", "bfloat16", "float32"),
                              "export_dtype": ("auto", "bfloat16", "float16", "float32"),
                              "device": ("auto", "cpu", "cuda")})
        if self.lr <= 0 or self.eps <= 0:
            raise DataError(f"--lr {self.lr:g} / --eps {self.eps:g}: expected numbers > 0")


def check_ranges(cfg, *, ints: dict = {}, floats: dict = {}, choices: dict = {}):
    """Flag checks shared by train_mid and train_rl: ints {field: minimum}, floats {field: (lo, hi)} inclusive
    (None = unbounded), choices {field: allowed values}; the first violation is a DataError naming the
    flag."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, lo in ints.items():
        v = getattr(cfg, name)
        if v < lo:
            raise DataError(f"{flag(name)} {v}: expected an integer >= {lo}")
    for name, (lo, hi) in floats.items():
        v = getattr(cfg, name)
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            want = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise DataError(f"{flag(name)} {v:g}: expected a number {want}")
    for name, allowed in choices.items():
        v = getattr(cfg, name)
        if v not in allowed:
            raise DataError(f"{flag(name)} {v!r}: expected one of {', '.join(allowed)}")


def check_resumed_config(cfg, altering: tuple, log, script: str):
    """--resume: compare the latest checkpoint's saved config with this run's before any work. A changed
    setting in `altering` (it would mix two runs) is a DataError naming each change; other changes (--steps
    extended, logging and save cadence, parallel layout) are named in a note."""
    latest = latest_checkpoint(Path(cfg.out) / "checkpoints") if cfg.resume else None
    if latest is None:
        return
    saved = cli.read_json(latest / "extra.json").get("config", {})
    now = asdict(cfg)
    changed = {k: (saved[k], v) for k, v in now.items()
               if k in saved and saved[k] != v and k not in ("resume", "out")}  # a moved run folder is fine
    text = lambda ks: ", ".join(f"--{k.replace('_', '-')} {changed[k][0]!r} "  # noqa: E731
                                f"-> {changed[k][1]!r}"
                                for k in ks)
    bad = [k for k in changed if k in altering]
    if bad:
        raise DataError(f"{latest}: --resume with changed settings that alter the run ({text(bad)}); "
                        f"pass the checkpoint's values or start a new run with another --out")
    if changed:
        log(f"[{script}] note: resuming {latest} with changed settings ({text(changed)})")


def latest_checkpoint(folder: Path):
    """The newest complete checkpoint (step_N with extra.json, not .tmp) in `folder`, or None."""
    done = sorted(p for p in Path(folder).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "extra.json").is_file())
    return done[-1] if done else None


# --resume: settings whose change would mix two different runs (the rest only warn)
RESUME_ALTERING = ("model", "data", "seq_len", "lr", "min_lr_ratio", "warmup", "schedule", "decay_frac",
                   "beta1", "beta2", "eps", "weight_decay", "grad_clip", "seed", "heldout_frac",
                   "param_dtype")


DataError = cli.DataError  # bad data, a bad flag value: one line and exit code 2


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row: the run stops (its last checkpoint is intact)."""


# ----------------------------------------------------------------------------------------------
# Mixture file


@dataclass
class Source:
    name: str
    path: str  # glob (relative to the mixture file), a prepared shard folder or hf://datasets/OWNER/NAME/GLOB
    weight: float
    format: str = "text"  # text | qa | chat
    text_field: str = "text"
    question_field: str = "question"
    answer_field: str = "answer"
    messages_field: str = "messages"


SOURCE_FIELDS = {"path", "weight", "format", "text_field", "question_field", "answer_field", "messages_field"}


def read_mixture(path) -> list:
    """A TOML or JSON file {sources: {name: {path, weight, [format, text_field, ...]}}} -> [Source]."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the mixture file ({e.strerror})") from None
    try:
        if path.suffix == ".json":
            spec = json.loads(raw)
        else:
            import tomllib
            spec = tomllib.loads(raw.decode("utf-8"))
    except Exception as e:
        raise DataError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), dict) or not spec["sources"]:
        raise DataError(f"{path}: expected a [sources.NAME] table (or {{\"sources\": {{NAME: ...}}}}) "
                        "with at least one source")
    unknown = set(spec) - {"sources"}
    if unknown:
        raise DataError(f"{path}: unknown top-level fields {sorted(unknown)}; expected only 'sources'")
    sources = []
    for name, s in spec["sources"].items():
        where = f"{path}: sources.{name}"
        if not isinstance(s, dict):
            raise DataError(f"{where}: expected a table with path and weight")
        bad = set(s) - SOURCE_FIELDS
        if bad:
            raise DataError(f"{where}: unknown fields {sorted(bad)}; "
                            f"expected some of {sorted(SOURCE_FIELDS)}")
        if not isinstance(s.get("path"), str) or not s["path"]:
            raise DataError(f"{where}.path: missing (a file glob, a prepared folder, or hf://datasets/...)")
        w = s.get("weight")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise DataError(f"{where}.weight: expected a number >= 0, got {w!r}")
        if s.get("format", "text") not in ("text", "qa", "chat"):
            raise DataError(f"{where}.format: expected text, qa or chat, got {s['format']!r}")
        p = s["path"]
        if not p.startswith("hf://") and not os.path.isabs(p):
            p = str(path.parent / p)
        sources.append(Source(name=name, **{**s, "path": p, "weight": float(w)}))
    if sum(s.weight for s in sources) <= 0:
        raise DataError(f"{path}: all weights are zero; at least one source needs weight > 0")
    return [s for s in sources if s.weight > 0]


# ----------------------------------------------------------------------------------------------
# Data preparation: text records -> uint32 token shards with EOS after each document


def _source_files(source: Source) -> list:
    """The source's input files (local paths); hub globs are downloaded into the HF cache first."""
    if source.path.startswith("hf://datasets/"):
        from huggingface_hub import HfApi, hf_hub_download
        import fnmatch
        owner, name, pattern = (source.path.removeprefix("hf://datasets/").split("/", 2) + ["", ""])[:3]
        repo = f"{owner}/{name}"
        names = [f for f in HfApi().list_repo_files(repo, repo_type="dataset")
                 if fnmatch.fnmatch(f, pattern or "*")]
        if not names:
            raise DataError(f"sources.{source.name}.path: no file of dataset {repo} matches {pattern!r}")
        return [hf_hub_download(repo, f, repo_type="dataset") for f in sorted(names)]
    files = sorted(f for f in glob.glob(source.path, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"sources.{source.name}.path: no file matches {source.path!r}")
    return files


def _record_text(rec, source: Source):
    """One record -> its document text, or None when the field the format needs is missing."""
    if not isinstance(rec, dict):
        return None
    if source.format == "qa":
        q, a = rec.get(source.question_field), rec.get(source.answer_field)
        return f"{q}\n{a}" if isinstance(q, str) and isinstance(a, str) else None
    if source.format == "chat":
        turns = rec.get(source.messages_field)
        if not isinstance(turns, list) or not turns:
            return None
        lines = []
        for t in turns:  # OpenAI style {role, content} or ShareGPT style {from, value}
            role = t.get("role", t.get("from")) if isinstance(t, dict) else None
            content = t.get("content", t.get("value")) if isinstance(t, dict) else None
            if not isinstance(content, str):
                return None
            prefix = {"user": "User", "human": "User", "assistant": "Assistant", "gpt": "Assistant"}.get(role)
            if prefix:  # system turns and tool calls are dropped, as the paper formats only the dialogue
                lines.append(f"{prefix}: {content}")
        return "\n".join(lines) or None
    text = rec.get(source.text_field)
    return text if isinstance(text, str) else None


def iter_documents(source: Source, files: list, problems: dict):
    """Yield document texts of every file; `problems` counts invalid lines and missing fields."""
    for file in files:
        name = file.lower()
        if name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
            for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    text = _record_text(rec, source)
                    if text is None:
                        problems["missing_field"] = problems.get("missing_field", 0) + 1
                        problems.setdefault("first", f"{file}: a record without the field")
                    else:
                        yield text
        elif name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(file, "rt", encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        problems["invalid_json"] = problems.get("invalid_json", 0) + 1
                        problems.setdefault("first", f"{file}:{lineno}: invalid JSON")
                        continue
                    text = _record_text(rec, source)
                    if text is None:
                        problems["missing_field"] = problems.get("missing_field", 0) + 1
                        problems.setdefault("first", f"{file}:{lineno}: no usable '{_needed_field(source)}'")
                    else:
                        yield text
        else:  # a plain text file is one document
            yield Path(file).read_text(encoding="utf-8", errors="replace")


def _needed_field(source: Source) -> str:
    return {"qa": f"{source.question_field}' / '{source.answer_field}", "chat": source.messages_field}.get(
        source.format, source.text_field)


_WORKER_TOKENIZER = None


def _init_tokenizer_worker(tokenizer_path):
    global _WORKER_TOKENIZER
    torch.set_num_threads(1)
    _WORKER_TOKENIZER = M.load_tokenizer(tokenizer_path)


def _encode_batch(texts):
    return [np.asarray(_WORKER_TOKENIZER.encode(t), dtype=np.uint32) for t in texts]


def _fingerprint(source: Source, files: list, tokenizer_dir: Path, heldout_frac: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in asdict(source).items() if k not in ("name", "weight", "path")},
                        sort_keys=True).encode())
    h.update(f"heldout={heldout_frac};v1".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{int(st.st_mtime)}".encode())
    for name in M.TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            h.update(hashlib.sha256((tokenizer_dir / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def prepare_source(source: Source, tokenizer_path, cache_dir, *, heldout_frac=0.05, workers=2,
                   shard_tokens=1 << 27, progress=True) -> Path:
    """Tokenize a source into `cache_dir/NAME-FINGERPRINT/` (train_*.bin, heldout.bin, index.json);
    returns it.

    A folder that already holds index.json is used as it is (a prepared source, or the same inputs again)."""
    if (Path(source.path) / "index.json").is_file():
        return Path(source.path)
    files = _source_files(source)
    tokenizer_dir = M.resolve_model_path(str(tokenizer_path))
    out = Path(cache_dir) / f"{source.name}-{_fingerprint(source, files, tokenizer_dir, heldout_frac)}"
    if (out / "index.json").is_file():
        return out
    tok = M.load_tokenizer(str(tokenizer_dir))
    eos = tok.eos_id
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    every = max(1, round(1 / heldout_frac)) if heldout_frac > 0 else 0
    problems, shards, docs = {}, [], {"train": 0, "heldout": 0}
    train_buf, train_len, heldout = [], 0, []

    def flush():
        nonlocal train_buf, train_len
        if train_len:
            name = f"train_{len(shards):05d}.bin"
            np.concatenate(train_buf).tofile(tmp / name)
            shards.append({"file": name, "tokens": int(train_len)})
            train_buf, train_len = [], 0

    def batches(n=64):
        batch = []
        for text in iter_documents(source, files, problems):
            batch.append(text)
            if len(batch) == n:
                yield batch
                batch = []
        if batch:
            yield batch

    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    bar = cli.progress(desc=f"prepare {source.name}", unit="doc", enabled=progress)
    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_tokenizer_worker, initargs=(str(tokenizer_dir),)) as pool:
        index = 0
        for encoded in pool.map(_encode_batch, batches()):
            for ids in encoded:
                doc = np.append(ids, np.uint32(eos))  # EOS after every document
                if every and index % every == every - 1:
                    heldout.append(doc)
                    docs["heldout"] += 1
                else:
                    train_buf.append(doc)
                    train_len += len(doc)
                    docs["train"] += 1
                    if train_len >= shard_tokens:
                        flush()
                index += 1
            bar.update(len(encoded))
    bar.close()
    flush()
    if not shards:
        shutil.rmtree(tmp, ignore_errors=True)
        first = f" (first: {problems['first']})" if "first" in problems else ""
        raise DataError(f"sources.{source.name}: no usable documents in {len(files)} file(s); "
                        f"{problems.get('invalid_json', 0)} invalid JSON lines, "
                        f"{problems.get('missing_field', 0)} "
                        f"records without '{_needed_field(source)}'{first}")
    heldout_tokens = 0
    if heldout:
        all_heldout = np.concatenate(heldout)
        all_heldout.tofile(tmp / "heldout.bin")
        heldout_tokens = len(all_heldout)
    if problems:
        print(f"[prepare] {source.name}: skipped {problems.get('invalid_json', 0)} invalid JSON lines and "
              f"{problems.get('missing_field', 0)} records without '{_needed_field(source)}' "
              f"(first: {problems['first']})")
    cli.write_json(tmp / "index.json", {
        "source": asdict(source), "files": files, "tokenizer": str(tokenizer_dir), "eos_id": eos,
        "dtype": "uint32", "shards": shards, "heldout": {"file": "heldout.bin", "tokens": heldout_tokens}
        if heldout_tokens else None, "documents": docs, "skipped": {k: v for k, v in problems.items()}})
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same folder first: identical content
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# Mixture loader: packed windows with document ids, deterministic and resumable at any world size


class TokenSource:
    """A prepared source's train shards as one sequence of windows of seq_len + 1 tokens."""

    def __init__(self, name: str, folder: Path, seq_len: int):
        self.name, self.folder, self.seq_len = name, Path(folder), seq_len
        index = cli.read_json(self.folder / "index.json")
        self.eos_id = int(index["eos_id"])
        self.shards, counts = [], []
        for s in index["shards"]:
            data = np.memmap(self.folder / s["file"], dtype=np.uint32, mode="r")
            self.shards.append(data)
            # windows overlap by one token (the last target)
            counts.append(max(0, (len(data) - 1) // seq_len))
        self.starts = np.cumsum([0] + counts)
        self.windows = int(self.starts[-1])
        self.tokens = sum(len(d) for d in self.shards)
        if self.windows == 0:
            raise DataError(f"{self.folder}: source '{name}' has {self.tokens} tokens, "
                            f"fewer than seq_len + 1 = {seq_len + 1}; lower --seq-len or add data")
        h = index.get("heldout")
        self.heldout = np.memmap(self.folder / h["file"], dtype=np.uint32, mode="r") if h else None

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        off = (i - int(self.starts[shard])) * self.seq_len
        return np.asarray(self.shards[shard][off:off + self.seq_len + 1], dtype=np.int64)


def pack_window(window: np.ndarray, eos_id: int) -> tuple:
    """(L + 1,) tokens -> input_ids (L,), labels (L,), doc_ids (L,).

    A document ends with its EOS; the next token starts a new document id, so positions restart and nothing
    attends across. The target after an EOS (a new document's first token) is not trained on: it cannot be
    predicted from a context the model is not allowed to see."""
    ids = torch.from_numpy(window)
    inputs, labels = ids[:-1].clone(), ids[1:].clone()
    is_eos = inputs == eos_id
    doc_ids = torch.cumsum(is_eos.long(), 0) - is_eos.long()  # EOS belongs to the document it ends
    labels[is_eos] = -100
    return inputs, labels, doc_ids


class MixtureLoader:
    """Which window of which source each sequence of each step is. All ranks compute the same global order and
    take their own rows; the state (sequences taken per source) is a few integers, saved in checkpoints."""

    def __init__(self, sources: list, weights: list, seed: int):
        self.sources, self.seed = sources, seed
        total = float(sum(weights))
        self.weights = np.array([w / total for w in weights])
        self.taken = [0] * len(sources)  # sequences drawn from each source so far (global, all ranks)
        self._perms = {}

    def _permuted(self, s: int, k: int) -> int:
        """The k-th window of source s: a fresh permutation of its windows every epoch."""
        n = self.sources[s].windows
        epoch = k // n
        if (s, epoch) not in self._perms:
            rng = np.random.default_rng([self.seed, s, epoch])
            self._perms = {key: v for key, v in self._perms.items() if key[0] != s}
            self._perms[(s, epoch)] = rng.permutation(n)
        return int(self._perms[(s, epoch)][k % n])

    def next_global(self, rows: int) -> list:
        """(source, window) for the next `rows` sequences of the whole job; advances the state."""
        out = []
        for _ in range(rows):
            n = sum(self.taken) + 1
            s = int(np.argmax(self.weights * n - np.array(self.taken)))  # furthest below its share
            out.append((s, self._permuted(s, self.taken[s])))
            self.taken[s] += 1
        return out

    def batch(self, picks: list) -> dict:
        """[(source, window)] -> tensors (B, L): input_ids, labels, doc_ids; and source (B,)."""
        rows = [pack_window(self.sources[s].window(w), self.sources[s].eos_id) for s, w in picks]
        return {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows]),
                "doc_ids": torch.stack([r[2] for r in rows]), "source": torch.tensor([s for s, _ in picks])}

    def state_dict(self) -> dict:
        return {"taken": dict(zip([s.name for s in self.sources], self.taken)), "seed": self.seed}

    def load_state_dict(self, state: dict):
        names = [s.name for s in self.sources]
        if set(state["taken"]) != set(names):
            raise DataError(f"the checkpoint's mixture has sources {sorted(state['taken'])}, this run's has "
                            f"{sorted(names)}; resume with the same mixture file")
        self.taken = [int(state["taken"][n]) for n in names]


def heldout_windows(source: TokenSource, n_tokens: int) -> list:
    """Fixed held-out windows of a source (seq_len + 1 tokens each; one shorter window for a small set)."""
    if source.heldout is None or len(source.heldout) < 2:
        return []
    L = source.seq_len
    count = max(1, min(n_tokens // L, (len(source.heldout) - 1) // L))
    return [np.asarray(source.heldout[i * L:i * L + L + 1], dtype=np.int64) for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Distributed setup and FSDP2


Dist, setup_distributed = cli.Dist, cli.setup_distributed  # model.py's; public here for train_rl.py


def build_mesh(d: Dist, mesh: str = ""):
    """1-D mesh over all ranks ("shard"), or "RxS": 2-D (replicate, shard) for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    if not mesh:
        return init_device_mesh(d.device.type, (d.world,), mesh_dim_names=("shard",))
    try:
        r, s = (int(x) for x in mesh.lower().split("x"))
    except ValueError:
        raise DataError(f"--mesh {mesh!r}: expected REPLICAxSHARD, e.g. 16x8") from None
    if r * s != d.world:
        raise DataError(f"--mesh {mesh}: {r} x {s} = {r * s} ranks, but the job has {d.world}")
    return init_device_mesh(d.device.type, (r, s), mesh_dim_names=("replicate", "shard"))


def _selective_policy(ctx, op, *args, **kwargs):
    """Selective activation checkpointing: keep matmul and attention outputs, recompute the cheap rest."""
    from torch.utils.checkpoint import CheckpointPolicy
    keep = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default)
    return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE


def shard_model(model: nn.Module, mesh, *, param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                activation_checkpointing: str = "off", compile: bool = False) -> nn.Module:
    """Activation checkpointing, then torch.compile, then fully_shard per block and the root
    (torchtitan's order). Blocks keep their names (model.layers.N) so checkpoints and exports are
    unaffected."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if activation_checkpointing not in ("off", "block", "selective"):
        raise DataError(f"--activation-checkpointing {activation_checkpointing!r}: "
                        "expected off, block or selective")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = model.model.layers
    for i, block in enumerate(layers):
        if activation_checkpointing != "off":  # torch's wrapper: state-dict helpers drop its name prefix
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            from torch.utils.checkpoint import create_selective_checkpoint_contexts
            if activation_checkpointing == "selective":
                block = checkpoint_wrapper(
                    block, context_fn=lambda: create_selective_checkpoint_contexts(_selective_policy))
            else:
                block = checkpoint_wrapper(block)
        if compile:
            block.compile()
        if mesh is not None:
            fully_shard(block, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=_reshard_after_forward(model, i))
        layers[i] = block
    if mesh is not None:
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _reshard_after_forward(model: nn.Module, i: int) -> bool:
    """shard_model's policy: blocks drop their gathered parameters after forward (backward gathers them
    again), except the last block, whose backward comes right away. The root keeps its own (FSDP's rule)."""
    return i < len(model.model.layers) - 1


@contextlib.contextmanager
def full_params(model: nn.Module):
    """Every FSDP parameter gathered and kept gathered across forwards (generation runs each block once per
    new token; resharding after each would all-gather the model per token); shard_model's policy restored
    and the parameters resharded on exit. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield model
        return
    blocks = [b for b in model.model.layers if isinstance(b, FSDPModule)]
    for m in [model, *blocks]:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for i, b in enumerate(blocks):
            b.set_reshard_after_forward(_reshard_after_forward(model, i), recurse=False)
            b.reshard()
        model.reshard()


def reshard(model: nn.Module):
    """Drop gathered parameters. FSDP2 leaves the root's (embeddings, final norm, lm_head) and the last
    block's gathered after a forward without backward (evaluation); do this before anything that reads
    parameters directly: the optimizer, a checkpoint, a soft update."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def resolve_param_dtype(name: str, device: torch.device) -> torch.dtype:
    """--param-dtype: auto = bf16 on GPU, fp32 on CPU (bf16 matmuls are slow there); or bfloat16 / float32."""
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}.get(name)
    if dtype is None:
        raise DataError(f"--param-dtype {name!r}: expected auto, bfloat16 or float32")
    return dtype


def build_optimizer(model: nn.Module, *, lr: float, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1):
    """AdamW; no weight decay on 1-D tensors (norm weights, biases, Mamba A_log/D/dt_bias)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step (CPU and CUDA)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str = "cosine",
          min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine / linear to min_ratio x
    peak, WSD (constant, then linear decay over the last decay_frac of the steps), or constant. Step k uses
    the factor transformers' get_{cosine_with_min_lr,linear}_schedule_with_warmup give step k: k / warmup in
    the warmup (so step `warmup` is the peak, the peak at step 0 without warmup), decay progress
    (k - warmup) / (total - warmup)."""
    if schedule not in ("cosine", "linear", "wsd", "constant"):
        raise DataError(f"--schedule {schedule!r}: expected cosine, linear, wsd or constant")
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    if schedule == "wsd":
        decay_steps = max(1, int(round(total * decay_frac)))
        start = total - decay_steps
        frac = 0.0 if step < start else min(1.0, (step - start) / decay_steps)
        return peak * (1 - (1 - min_ratio) * frac)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return peak * (min_ratio + (1 - min_ratio) * shape)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient norm over all shards (clipped to max_norm when > 0); inf/nan pass through."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------------------------
# Checkpoints (DCP) and Hugging Face export


class Checkpointer:
    """OUT/checkpoints/step_00000123/: DCP shards of model + optimizer (reshardable across world sizes),
    extra.json (step, loader, config), rng_rankN.pt. Written as step_N.tmp and renamed when every rank is
    done."""

    def __init__(self, out_dir, d: Dist, *, keep: int = 2, async_save: bool = False):
        self.dir, self.dist, self.keep, self.async_save = Path(out_dir) / "checkpoints", d, keep, async_save
        self._pending = None  # (future, tmp, final, extra) of an async save in flight
        # background writes run their collectives on a group of their own, never interleaved with training's
        self._async_group = dist.new_group(backend="gloo") if async_save else None

    def latest(self):
        return latest_checkpoint(self.dir)

    def save(self, step: int, model: nn.Module, optimizer, extra: dict):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        self.wait()
        final = self.dir / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        torch.save(_rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = (future, tmp, final, extra)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finish(tmp, final, extra)

    def wait(self):
        """Finish an async save in flight (called before the next save and at the end of the run)."""
        if self._pending is not None:
            future, tmp, final, extra = self._pending
            self._pending = None
            future.result()
            self._finish(tmp, final, extra)

    def _finish(self, tmp: Path, final: Path, extra: dict):
        dist.barrier()  # every rank has written its shards
        if self.dist.main:
            cli.write_json(tmp / "extra.json", extra)  # its presence marks a complete checkpoint
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            done = sorted(p for p in self.dir.glob("step_*") if not p.name.endswith(".tmp"))
            for old in done[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, path, model: nn.Module, optimizer) -> dict:
        """Load model and optimizer shards (resharded to this world size), this rank's RNG; returns extra."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        path = Path(path)
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load this checkpoint into the model "
                            f"({str(e).splitlines()[0][:300]}); "
                            "is it from a different model?") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / f"rng_rank{self.dist.rank}.pt"
        if rng.is_file():  # a rank the saving run did not have keeps its seeded RNG
            _set_rng_state(torch.load(rng, weights_only=False))
        return cli.read_json(path / "extra.json")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def export_hf(model: nn.Module, out_dir, d: Dist, tokenizer_from=None, dtype: torch.dtype | None = None):
    """Gather the full state dict to rank 0 (on CPU) and write a Hugging Face folder with model.save_model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        M.save_model(model, out_dir, tokenizer_from, state_dict=state)
    dist.barrier()


# ----------------------------------------------------------------------------------------------
# Metrics: log file, plots, FLOPs and MFU


class MetricsLog:
    """Appends one JSON object per line to a file, on rank 0 only. On resume, records after the checkpoint's
    step are dropped, so the file reads as if the run had never stopped."""

    def __init__(self, path, d: Dist, resume_step: int | None = None):
        self.path, self.enabled = Path(path), d.main
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and self.path.exists():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the crash
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line + "\n")
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def plot_metrics(metrics_path, png_path, keys: list, title: str, *, overlay_path=None,
                 overlay_title: str = ""):
    """One panel per key against step from a metrics.jsonl (keys missing from it are left out), four panels
    per row; with `overlay_path` (e.g. eval.jsonl) one more panel draws every series of that file together."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = cli.read_jsonl(metrics_path)
    panels = []
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and "step" in r]
        if pts:
            panels.append((k, {k: pts}))
    if overlay_path is not None and Path(overlay_path).is_file():
        extra = cli.read_jsonl(overlay_path)
        names = sorted({k for r in extra for k, v in r.items()
                        if k != "step" and isinstance(v, (int, float))})
        if names:
            panels.append((overlay_title, {k: [(r["step"], r[k]) for r in extra
                                               if isinstance(r.get(k), (int, float))]
                                           for k in names}))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, series) in zip(axes.flat, panels):
        for label, pts in series.items():
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None,
                    label=label if len(series) > 1 else None)
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), counted from the module itself:

        matmuls     6 * N: N = every 2-D weight but the embedding table, plus lm_head (counted even
                    when tied); routed experts count top_k / num_experts of their weights (a token visits
                    top_k of them)
        attention   12 * n_heads * head_dim * ctx per attention layer: QK^T and PV are 2 * 2 * n_heads *
                    head_dim * ctx forward; ctx = keys a query sees on average, (seq_len + 1) / 2 causal,
                    capped by a sliding window
        Mamba2 SSD  6 * h * (Q * (n + p) / 2 + 2 * n * p) per Mamba layer: inside a chunk of Q tokens the
                    scores C B^T and their weighted sum of x (causal half), across chunks the state update
                    B x^T and the readout C h"""
    cfg = model.config
    moe_share = cfg.moe["top_k"] / cfg.moe["num_experts"] if cfg.moe else 1.0
    n = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith("embed_tokens.weight") or "conv1d" in name:
            continue
        n += p.numel() * (moe_share if ".experts." in name else 1.0)
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size
    flops = 6.0 * n
    kinds = cfg.layer_types or ["attention"] * cfg.num_hidden_layers
    for i, kind in enumerate(kinds):
        if kind == "attention":
            window = cfg.sliding_windows[i] if cfg.sliding_windows else None
            ctx = min((seq_len + 1) / 2, window or seq_len)
            flops += 12.0 * cfg.num_attention_heads * cfg.head_dim * ctx
        elif kind == "mamba":
            m = cfg.mamba
            h, p, n_state = m["num_heads"], m["head_dim"], m["state_size"]
            Q = min(m.get("chunk_size", 256), seq_len)
            flops += 6.0 * h * (Q * (n_state + p) / 2 + 2 * n_state * p)
    return flops


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
                    "A6000": 155.0}  # dense, no sparsity


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak (FLOP/s) from its name; None on CPU or an unknown card
    (MFU is not shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------------------------
# The built-in demo mixture: real text that installed packages ship


def demo_mixture(folder) -> Path:
    """Write the demo's sources and mixture into `folder`: math = champ-dataset's 270 problems with worked
    solutions (question "\\n" solution), code = reasoning-gym's CodeI/O records (task + reference program) and
    Python's own standard library modules. Returns the mixture file."""
    folder = Path(folder)
    mixture = folder / "mixture.toml"
    if mixture.is_file():
        return mixture
    champ, gym = cli.package_dir("champ_dataset"), cli.package_dir("reasoning_gym")
    if champ is None or gym is None:
        raise DataError("the demo mixture reads the champ-dataset and reasoning-gym packages: "
                        "pip install --no-deps champ-dataset reasoning-gym "
                        "(or pass --data your_mixture.toml)")
    folder.mkdir(parents=True, exist_ok=True)
    problems = cli.read_json(champ / "dataset_files" / "v0.json")["problems"]
    with open(folder / "math.jsonl", "w", encoding="utf-8") as fh:
        for p in problems.values():
            steps = " ".join(s["_text"] for s in p["solution"]["steps"])
            fh.write(json.dumps({"question": p["_text"], "answer": steps}) + "\n")
    with gzip.open(gym / "data" / "codeio.jsonl.gz", "rt", encoding="utf-8") as src, \
            open(folder / "code.jsonl", "w", encoding="utf-8") as fh:
        for line in src:
            rec = json.loads(line)
            fh.write(json.dumps({"text": f"{rec['task_description']}\n\n{rec['code_sample']}"}) + "\n")
    stdlib = Path(os.__file__).parent
    (folder / "stdlib").mkdir(exist_ok=True)
    for f in sorted(stdlib.glob("*.py"))[:120]:  # a fixed slice of the standard library's own modules
        shutil.copy2(f, folder / "stdlib" / f.name)
    tmp = mixture.with_suffix(".tmp")
    tmp.write_text('# The demo mixture: real math and code text shipped by installed packages.\n'
                   '[sources.math]\npath = "math.jsonl"\nformat = "qa"\nweight = 0.6\n'
                   '[sources.code]\npath = "code.jsonl"\nweight = 0.25\n'
                   '[sources.stdlib]\npath = "stdlib/*.py"\nweight = 0.15\n', encoding="utf-8")
    os.replace(tmp, mixture)
    return mixture


# ----------------------------------------------------------------------------------------------
# Training


def _cache_dir(cfg: Config) -> Path:
    if cfg.data_cache:
        return Path(cfg.data_cache)
    return Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism")) / "data"


def prepare(cfg: Config, d: Dist | None = None) -> tuple:
    """Mixture file -> ([Source], [prepared folder]); rank 0 prepares, the others wait and reuse."""
    mixture = Path(cfg.data) if cfg.data else demo_mixture(Path(cfg.out) / "demo_data")
    sources = read_mixture(mixture)
    folders = [None] * len(sources)
    if d is None or d.main:
        for i, s in enumerate(sources):
            folders[i] = str(prepare_source(s, cfg.model, _cache_dir(cfg), heldout_frac=cfg.heldout_frac,
                                            workers=cfg.prepare_workers, progress=cfg.progress))
    if d is not None and d.world > 1:
        dist.broadcast_object_list(folders, src=0)
    return sources, [Path(f) for f in folders]


@torch.no_grad()
def evaluate_heldout(model, windows: dict, d: Dist, batch_size: int) -> dict:
    """Mean next-token loss per source over its fixed held-out windows, split across ranks."""
    model.eval()
    out = {}
    for name, (wins, eos_id) in windows.items():
        total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (sum nll, tokens)
        mine = wins[d.rank::d.world]
        steps = math.ceil(len(wins) / d.world / batch_size) if wins else 0
        for b in range(steps):  # every rank runs the same number of forwards (FSDP collectives must match)
            rows = mine[b * batch_size:(b + 1) * batch_size] or wins[:1]
            real = len(mine[b * batch_size:(b + 1) * batch_size])
            packed = [pack_window(w, eos_id) for w in rows]
            L = max(len(p[0]) for p in packed)
            pad = lambda t, v: torch.nn.functional.pad(t, (0, L - len(t)), value=v)  # noqa: E731
            ids = torch.stack([pad(p[0], 0) for p in packed]).to(d.device)
            labels = torch.stack([pad(p[1], -100) for p in packed]).to(d.device)
            doc_ids = torch.stack([pad(p[2], -1) for p in packed]).to(d.device)
            logp = model(ids, doc_ids, labels=labels)
            if real:
                total[0] -= logp[:real].sum().double()
                total[1] += (labels[:real] >= 0).sum()
        dist.all_reduce(total)
        out[name] = float(total[0] / total[1]) if total[1] > 0 else None
    reshard(model)
    model.train()
    return out


def _config_stamp(cfg: Config, model_cfg) -> dict:
    return {"model_type": model_cfg.model_type, "hidden_size": model_cfg.hidden_size,
            "num_hidden_layers": model_cfg.num_hidden_layers, "vocab_size": model_cfg.vocab_size}


def train(cfg: Config) -> dict:
    """Run mid-training as configured; returns a summary (losses, held-out loss before/after, export path)."""
    with cli.process_group(cfg.device) as d:
        return _train(cfg, d)


@dataclass
class Run:
    """What the training loop carries from phase to phase."""
    cfg: Config
    d: Dist
    out: Path
    base: Path  # the base model's folder
    sources: list  # the mixture's sources (name, weight)
    loader: "MixtureLoader"
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ckpt: "Checkpointer"
    metrics: "MetricsLog"
    evals: "MetricsLog"
    heldout: dict  # source name -> (held-out windows, eos id)
    rows_per_rank: int
    global_rows: int
    tokens_per_step: int
    total_steps: int
    flops_per_token: float  # model FLOPs of one training token (MFU)
    peak_flops: float | None  # the card's peak, None where unknown
    start_step: int = 0
    bad_in_row: int = 0
    skipped: int = 0

    def log(self, *a):
        if self.d.main:
            print(*a)


def _train(cfg: Config, d: Dist) -> dict:
    """The loop: batch -> forward/backward -> optimizer step -> log -> checkpoint, over named phases."""
    run = _start(cfg, d)
    if run.start_step == 0:
        _evaluate(run, 0)
    losses, step = [], run.start_step
    for step in range(run.start_step + 1, run.total_steps + 1):
        t0 = time.perf_counter()
        lr = _set_lr(run, step)
        loss, grad_norm = _train_step(run, step)
        if run.d.device.type == "cuda":
            torch.cuda.synchronize(run.d.device)
        record = _step_record(run, step, loss, lr, grad_norm, time.perf_counter() - t0)
        losses.append(loss)
        if step == run.total_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            record.update({f"heldout/{k}": v for k, v in (_evaluate(run, step) or {}).items()})
        run.metrics.write(record)
        _log_step(run, record)
        _save(run, step)
    return _finish(run, step, losses)


def _start(cfg: Config, d: Dist) -> Run:
    """Seeds, data, the sharded model and optimizer, and the latest checkpoint when resuming."""
    check_resumed_config(cfg, RESUME_ALTERING, print if d.main else (lambda *a: None), "train_mid")
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)

    base = M.resolve_model_path(cfg.model)
    max_positions = M.read_config(base).max_position_embeddings
    if cfg.seq_len > max_positions:
        raise DataError(f"--seq-len {cfg.seq_len} is beyond the model's positions "
                        f"({base}/config.json: max_position_embeddings = {max_positions})")
    sources, folders = prepare(cfg, d)
    token_sources = [TokenSource(s.name, f, cfg.seq_len) for s, f in zip(sources, folders)]
    loader = MixtureLoader(token_sources, [s.weight for s in sources], cfg.seed)

    model = M.load_model(str(base), device="cpu", dtype=torch.float32)  # fp32 master weights, sharded below
    param_dtype = resolve_param_dtype(cfg.param_dtype, d.device)
    mesh = build_mesh(d, cfg.mesh)
    shard_model(model, mesh, param_dtype=param_dtype, activation_checkpointing=cfg.activation_checkpointing,
                compile=cfg.compile)
    model.init_buffers()  # RoPE tables on the device fully_shard moved the model to
    model.train()
    optimizer = build_optimizer(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)

    rows_per_rank = cfg.batch_size * cfg.grad_accum
    global_rows = rows_per_rank * d.world
    tokens_per_step = global_rows * cfg.seq_len
    total_steps = int(math.ceil(cfg.tokens / tokens_per_step)) if cfg.tokens > 0 else cfg.steps
    if total_steps <= 0:
        raise DataError("--steps (or --tokens) must give at least one step")
    heldout = {s.name: (heldout_windows(s, cfg.eval_tokens), s.eos_id) for s in token_sources}
    run = Run(cfg, d, out, base, sources, loader, model, optimizer,
              Checkpointer(out, d, keep=cfg.keep_checkpoints, async_save=cfg.async_save), None, None,
              {k: v for k, v in heldout.items() if v[0]}, rows_per_rank, global_rows, tokens_per_step,
              total_steps, model_flops_per_token(model, cfg.seq_len), peak_flops(d.device))
    resumed = _resume(run)
    run.metrics = MetricsLog(out / "metrics.jsonl", d, resume_step=run.start_step if resumed else None)
    run.evals = MetricsLog(out / "eval.jsonl", d, resume_step=run.start_step if resumed else None)
    run.log(f"[train_mid] {cli.run_name(base)}: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{d.world} rank(s) on {d.device.type}, mesh {cfg.mesh or d.world}, {total_steps} steps x "
            f"{global_rows} sequences x {cfg.seq_len} tokens "
            f"= {total_steps * tokens_per_step / 1e6:.2f}M tokens; "
            f"sources " + ", ".join(f"{s.name} {s.weight:g} ({t.tokens / 1e6:.2f}M tokens)"
                                    for s, t in zip(sources, token_sources)))
    return run


def _resume(run: Run) -> bool:
    """Load the latest complete checkpoint (--resume): model, optimizer, loader position, RNG."""
    cfg, d = run.cfg, run.d
    latest = run.ckpt.latest() if cfg.resume else None
    if cfg.resume and latest is None:
        run.log(f"[train_mid] --resume: no complete checkpoint in {run.ckpt.dir}; "
                "starting from the base model")
    if latest is None:
        return False
    extra = cli.read_json(latest / "extra.json")
    stamp = _config_stamp(cfg, run.model.config)
    if extra["model"] != stamp:
        diff = {k: (extra["model"].get(k), v) for k, v in stamp.items() if extra["model"].get(k) != v}
        raise DataError(f"{latest}: checkpoint of a different model (checkpoint vs --model: {diff})")
    extra = run.ckpt.load(latest, run.model, run.optimizer)
    run.loader.load_state_dict(extra["loader"])
    run.start_step = int(extra["step"])
    if extra["world"] != d.world:
        run.log(f"[train_mid] resharding: checkpoint written by {extra['world']} ranks, "
                f"resuming on {d.world}")
    if extra["global_rows"] != run.global_rows:
        run.log(f"[train_mid] note: the checkpoint used {extra['global_rows']} sequences per step, this run "
                f"{run.global_rows}; the data order continues from the same position")
    run.log(f"[train_mid] resumed from {latest} at step {run.start_step}")
    return True


def _evaluate(run: Run, step: int) -> dict | None:
    """Held-out loss per source, logged to eval.jsonl."""
    if not run.heldout:
        return None
    losses = evaluate_heldout(run.model, run.heldout, run.d, run.cfg.batch_size)
    run.evals.write({"step": step, **{f"heldout/{k}": v for k, v in losses.items()}})
    run.log(f"[train_mid] step {step} held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return losses


def _set_lr(run: Run, step: int) -> float:
    cfg = run.cfg
    lr = lr_at(step - 1, peak=cfg.lr, warmup=cfg.warmup, total=run.total_steps, schedule=cfg.schedule,
               min_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def _train_step(run: Run, step: int) -> tuple:
    """One optimizer step over this rank's share of the global batch, in --grad-accum micro-batches;
    returns (mean loss over the global step's target tokens, gradient norm before clipping)."""
    cfg, d, model, loader = run.cfg, run.d, run.model, run.loader
    picks = loader.next_global(run.global_rows)
    mine = picks[d.rank * run.rows_per_rank:(d.rank + 1) * run.rows_per_rank]
    micro = [loader.batch(mine[i * cfg.batch_size:(i + 1) * cfg.batch_size]) for i in range(cfg.grad_accum)]
    # normalise by the whole step's target tokens, so accumulation and sharding give the exact mean
    count = torch.tensor([float(sum((b["labels"] >= 0).sum() for b in micro))], device=d.device)
    dist.all_reduce(count)
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for i, b in enumerate(micro):
        if hasattr(model, "set_requires_gradient_sync"):  # reduce-scatter once, on the last micro-step
            model.set_requires_gradient_sync(i == len(micro) - 1)
        logp = model(b["input_ids"].to(d.device), b["doc_ids"].to(d.device), labels=b["labels"].to(d.device))
        nll = -logp.sum()
        (nll * d.world / count).backward()  # FSDP averages gradients over ranks; * world undoes that
        loss_sum += nll.detach().double()
    dist.all_reduce(loss_sum)
    loss = float(loss_sum / count.double())
    grad_norm = clip_grad_norm(model, cfg.grad_clip)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.bad_in_row = 0
        return loss, grad_norm
    run.optimizer.zero_grad(set_to_none=True)  # a non-finite step changes nothing
    run.bad_in_row += 1
    run.skipped += 1
    run.log(f"[train_mid] step {step}: non-finite loss {loss} / grad norm {grad_norm}; step skipped "
            f"({run.bad_in_row} in a row)")
    if run.bad_in_row >= cfg.max_bad_steps:
        raise TrainingStopped(f"{run.bad_in_row} non-finite steps in a row (last at step {step}); "
                              f"lower --lr, check the data, or resume from {run.ckpt.latest()}")
    return loss, grad_norm


def _step_record(run: Run, step: int, loss: float, lr: float, grad_norm: float, dt: float) -> dict:
    d, loader, peak = run.d, run.loader, run.peak_flops
    tps = run.tokens_per_step / dt
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": step * run.tokens_per_step, "tokens_per_s": tps, "step_s": dt,
            "skipped_steps": run.skipped,
            "mfu": tps * run.flops_per_token / (peak * d.world) if peak else None,
            # peak; CPU: RSS
            "memory_gb": (torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9,
            **{f"mix/{s.name}": n / sum(loader.taken) for s, n in zip(run.sources, loader.taken)}}  # realised


def _log_step(run: Run, r: dict):
    step = r["step"]
    if step % run.cfg.log_every and step != run.total_steps:
        return
    mfu = f" mfu {r['mfu'] * 100:.1f}%" if r["mfu"] is not None else ""
    run.log(f"[train_mid] step {step}/{run.total_steps} loss {r['loss']:.4f} lr {r['lr']:.2e} grad_norm "
            f"{r['grad_norm']:.3f} {r['tokens_per_s']:,.0f} tok/s{mfu} mem {r['memory_gb']:.1f}GB mix "
            + " ".join(f"{s.name}={r['mix/' + s.name]:.2f}" for s in run.sources))


def _save(run: Run, step: int):
    """A DCP checkpoint every --save-every steps, an HF export every --export-every
    (the last step: _finish)."""
    cfg, mcfg = run.cfg, run.model.config
    if cfg.save_every and step % cfg.save_every == 0 and step < run.total_steps:
        run.ckpt.save(step, run.model, run.optimizer,
                      _extra(cfg, run.d, step, run.loader, mcfg, run.global_rows))
    if cfg.export_every and step % cfg.export_every == 0 and step < run.total_steps:
        export_hf(run.model, run.out / f"hf-step{step}", run.d, run.base, _export_dtype(cfg, mcfg))


def _finish(run: Run, step: int, losses: list) -> dict:
    """The final checkpoint and HF export, the held-out summary and the plot."""
    cfg, d, out, mcfg = run.cfg, run.d, run.out, run.model.config
    if step > run.start_step:  # a final checkpoint, so --resume of a finished run is a no-op
        run.ckpt.save(step, run.model, run.optimizer, _extra(cfg, d, step, run.loader, mcfg, run.global_rows))
    run.ckpt.wait()
    export_hf(run.model, out / "hf", d, run.base, _export_dtype(cfg, mcfg))
    summary = {"steps": run.total_steps, "losses": losses, "export": str(out / "hf"),
               "skipped_steps": run.skipped}
    if d.main:
        records = cli.read_jsonl(out / "eval.jsonl") if run.heldout else []
        if records:
            summary["heldout_before"], summary["heldout_after"] = records[0], records[-1]
            run.log("[train_mid] held-out loss, first -> last evaluation: " + ", ".join(
                f"{k.removeprefix('heldout/')} {records[0][k]:.4f} -> {records[-1][k]:.4f}"
                for k in records[0] if k.startswith("heldout/") and records[0][k] is not None))
        png = plot_metrics(out / "metrics.jsonl", out / "loss.png",
                           ["loss", "lr", "grad_norm", "tokens_per_s"],
                           f"mid-training {cli.run_name(run.base)} "
                           f"({d.world} x {d.device.type}, {time.strftime('%Y-%m-%d')})",
                           overlay_path=out / "eval.jsonl", overlay_title="held-out loss per source")
        run.log(f"[train_mid] wrote {out / 'hf'} (Hugging Face folder), {out / 'metrics.jsonl'}"
                + (f", {png}" if png else ""))
    return summary


def _extra(cfg, d, step, loader, mcfg, global_rows) -> dict:
    return {"step": step, "loader": loader.state_dict(), "world": d.world, "global_rows": global_rows,
            "model": _config_stamp(cfg, mcfg), "config": asdict(cfg)}


def _export_dtype(cfg: Config, mcfg):
    if cfg.export_dtype == "auto":
        name = mcfg.hf.get("torch_dtype") or mcfg.hf.get("dtype") or "float32"
        return getattr(torch, name, torch.float32)
    if cfg.export_dtype not in ("bfloat16", "float32", "float16"):
        raise DataError(f"--export-dtype {cfg.export_dtype!r}: expected auto, bfloat16, float16 or float32")
    return getattr(torch, cfg.export_dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Mid-train a Hugging Face base model on a weighted data "
                                                 "mixture with FSDP2 (see the module docstring for torchrun "
                                                 "commands).")
    parser.add_argument("command", nargs="?", default="train", choices=["train", "prepare"],
                        help="train (default) or prepare: only tokenize the mixture's sources")
    cfg, args = cli.parse_config(Config, argv, parser=parser)

    def run():
        cfg.check()
        if args.command == "prepare":
            sources, folders = prepare(cfg)
            for s, f in zip(sources, folders):
                index = cli.read_json(f / "index.json")
                print(f"{s.name}: {f} ({sum(x['tokens'] for x in index['shards']) / 1e6:.2f}M train tokens, "
                      f"{index['documents']['train']} + {index['documents']['heldout']} held-out documents)")
            return None
        try:
            return train(cfg)
        except TrainingStopped as e:
            print(f"train_mid.py: stopped: {e}", file=sys.stderr)
            sys.exit(3)

    return cli.run_main(run, "train_mid.py", out=cfg.out)


if __name__ == "__main__":
    main()
