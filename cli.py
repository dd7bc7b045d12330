"""What every script of the project shares around its work (train_mid, train_rl, evaluate, retention,
analyze, generate, study): one error type for user mistakes, JSON files, progress, the process group, and
flags from a config dataclass.

A user mistake (a missing model folder, a flag out of range, a bad data file) is a `DataError`; `run_main`
turns it into one line, `script.py: error: ...`, and exit code 2, under torchrun too, before any work is
lost. Anything else is a bug and keeps its traceback. Every script keeps its settings in one @dataclass;
`parse_config` makes one flag per field, with the field's comment as its help.

Imports nothing of the project; the standard library only (torch and tqdm when a function needs them).
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DataError(ValueError):
    """A user mistake (bad file, field, flag value): scripts print it as one line and exit with code 2."""


class ModelNotFound(DataError, FileNotFoundError):
    """A model name that is neither a folder nor a model on the hub
    (`except FileNotFoundError` still catches it)."""


def run_main(fn, script: str, out=None):
    """Run a script's main body `fn()`. A user mistake (DataError, a missing file) ends in one line,
    `script: error: message` on stderr, and exit code 2; under torchrun only rank 0 prints it (the other ranks
    exit 2 quietly, so the log is not one traceback per rank). Anything else is a bug and keeps its traceback.
    `out`: the run's output folder; a failed run that created it and wrote nothing there removes it."""
    import sys
    made = out is not None and not Path(out).exists()
    try:
        return fn()
    except (DataError, FileNotFoundError) as e:
        text = str(e) if isinstance(e, DataError) or not e.filename else f"{e.filename}: {e.strerror}"
        if (made and os.environ.get("RANK", "0") == "0" and Path(out).is_dir()
                and not any(Path(out).iterdir())):
            Path(out).rmdir()
        if os.environ.get("RANK", "0") == "0":
            print(f"{script}: error: {text}", file=sys.stderr)
        sys.exit(2)


def read_json(path):
    """The JSON value in `path`; a ValueError naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_jsonl(path) -> list:
    """The complete lines of a (possibly partial) JSONL file; a line cut off by a crash is dropped."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def read_records(path) -> list:
    """Rows of a user's data file (.jsonl(.gz) / .json / .csv / .parquet), as (file, row number, dict);
    a DataError naming the file (and line) for anything it cannot read."""
    import csv
    import gzip
    path = Path(path)
    name = path.name.lower()
    rows = []
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}: line {i} is not JSON ({e.msg})") from None
        elif name.endswith(".json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
            rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        elif name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
            rows = pq.read_table(path).to_pylist()
        else:
            raise DataError(f"{path}: unsupported file type "
                            "(expected .jsonl, .jsonl.gz, .json, .csv or .parquet)")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i + 1} is not an object")
    return [(path, i + 1, r) for i, r in enumerate(rows)]


def package_dir(name: str) -> Path | None:
    """The folder of an installed package without importing it (some asset packages fail to import)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that fails to import; a half-imported module
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def run_name(path) -> str:
    """A checkpoint's name: its folder's last part, or the run's folder above it when that part is `hf` (the
    training scripts export to RUN/hf, so out/mid/hf and out/rl/hf are "mid" and "rl", not both "hf");
    RUN/hf-stepN (extra exports) is "RUN stepN". A hub id keeps its last part."""
    p = Path(str(path))
    if p.name in ("", ".", "..") or (p.name.startswith("hf") and p.parent.name in ("", ".", "..")):
        p = p.resolve()  # "." or a bare "hf" inside the run folder: the real folder names
    m = re.fullmatch(r"hf(?:-(step\d+))?", p.name)
    if m and p.parent.name:
        return p.parent.name + (f" {m.group(1)}" if m.group(1) else "")
    return p.name or str(path)


class _LineStream:
    """tqdm's output as whole lines: in a log file or pipe a carriage-return update would pile up."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, *, total=None, desc="", unit="it", enabled=True, leave=True, unit_scale=False):
    """A tqdm bar on a terminal; on a file or pipe (CI, nohup) a plain line every 30 s and at the end.
    unit_scale: counts as 3.15M rather than 3145728 (bytes of a download)."""
    import sys
    from tqdm import tqdm
    shared = dict(total=total, desc=desc, unit=unit, unit_scale=unit_scale)
    if not enabled or sys.stderr.isatty():
        return tqdm(iterable, disable=not enabled, leave=leave, **shared)  # in a log every line stays
    return tqdm(iterable, file=_LineStream(sys.stderr), mininterval=30, ascii=True, dynamic_ncols=False,
                ncols=100, **shared)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    own_group: bool = False  # this process made the group (and destroys it when done)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", *, group_of_one: bool = True) -> Dist:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU). Without torchrun, a one-process group
    (`group_of_one`, so a plain `python train_mid.py` runs the same FSDP/DCP code path) or none at all."""
    import torch
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if "RANK" not in os.environ:  # not under torchrun
        if not group_of_one:
            return Dist(0, 1, 0, dev)
        import socket
        with socket.socket() as s:  # a free local port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, own_group=True)


@contextmanager
def process_group(device: str = "auto"):
    """`with process_group(device) as d:` setup_distributed(device), and the group destroyed at the end.
    After a finished run a barrier comes first: a rank that tears gloo down while another is still in its
    last collective can abort the other at exit ("terminate called without an active exception"). After an
    error, no barrier: it would wait forever for a rank that died."""
    import torch.distributed as dist
    d = setup_distributed(device)
    try:
        yield d
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


# Flags: every script keeps its settings in one @dataclass whose fields become flags.


def parse_config(cls, argv=None, *, parser=None):
    """Flags from the dataclass `cls` (one per field, `--max-new-tokens`; help from the field's comment),
    plus `--config file.toml` whose fields the flags override. Returns (cls(...), argparse namespace);
    pass your own `parser` to add positional arguments first. A bool flag alone is true (`--resume`),
    or takes a value (`--resume false`)."""
    import argparse
    import inspect
    import tomllib
    from dataclasses import fields
    p = parser or argparse.ArgumentParser(description=(cls.__doc__ or "").strip() or None)
    p.add_argument("--config", help=f"a TOML file of {cls.__name__} fields (flags override it)")
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):  # a subclass's comment wins over its base's
        try:
            block = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update({m.group(1): m.group(2).strip()
                         for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", block, re.M)})
    names = set()
    for f in fields(cls):
        names.add(f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        convert = {"bool": _bool_flag, "int": int, "float": float}.get(kind, str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=convert, default=None,
                       metavar="BOOL" if kind == "bool" else None,
                       nargs="?" if kind == "bool" else None, const=True if kind == "bool" else None,
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
            p.error(f"--config {args.config}: unknown fields {sorted(unknown)}; "
                    f"expected some of {sorted(names)}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return cls(**values), args


def _bool_flag(text: str) -> bool:
    import argparse
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
