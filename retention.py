"""Retention: does mid-training or RL keep what the base model could do? General ability by log-likelihood,
held-out perplexity, long context, and one report of several checkpoints side by side.

    python retention.py --tasks bbl --limit 50 --out out/retention/base
    python retention.py --tasks general,bbl,ruler --limit 200 --max-length 8192 --out out/general
    python retention.py --models base=ckpt/base,mid=ckpt/mid,rl=ckpt/rl --tasks general,bbl,aime25 \
        --ppl web=data/web/val_*.bin,code=data/code/val_*.bin --out out/retention

Tasks (`--tasks`, a comma list; reasoning benchmarks of evaluate.py may be mixed in):
    general   mmlu (5-shot from dev), arc_challenge, arc_easy, hellaswag, winogrande, piqa: log-likelihood
              multiple choice as lm-evaluation-harness scores it (acc, acc_norm, standard errors);
              choices that share a context are scored from one prefill whose cache is copied to each choice
    bbl       BIG-bench Lite's 18 multiple-choice tasks (bigbench:<task> for any BIG-bench JSON task),
              read from the bigbench source archive (retention.download_bigbench(), into
              ~/.cache/prism/bigbench)
    ppl:NAME=GLOB / --ppl NAME=GLOB   held-out loss and bits per byte of .bin token shards or text files,
              strided windows at the model's context
    ruler     generated long-context tasks (needles, multi-key/value, variable tracking, common words) at
              4k, 8k, ... up to --max-length, greedy, scored by string match
    --models base=A,mid=B,rl=C   the suite on each checkpoint: retention.md / .json / .png side by side

Why log-likelihood: the paper's retention question is whether knowledge survives, and a base model that cannot
follow an answer format yet still ranks the right choice first keeps that knowledge; scoring the choices
directly (as lm-evaluation-harness does) measures it without a format confound. A task with bad data (or a
length the model cannot take) is recorded as an error in the results and the rest of the suite goes on.
Samples, resume, torchrun sharding and results.json / results.md are evaluate.py's runner.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cli
import evaluate as E
from generate import generate

DataError = cli.DataError


@dataclass
class Config(E.Config):
    tasks: str = "bbl"  # comma list: general, bbl, bigbench:NAME, ppl:NAME=PATH, ruler(_*), evaluate.py tasks
    models: str = ""  # report: run the suite on each of label=path[,label=path...] (or bare paths); compare
    num_fewshot: int = -1  # multiple choice: shots; < 0 = the task's default (MMLU 5 from dev, the others 0)
    mc_batch_tokens: int = 8192  # MC / perplexity: tokens per forward batch (caches copied per choice count)
    bigbench_archive: str = ""  # the bigbench source archive; "" = ~/.cache/prism/bigbench/bigbench-*.tar.gz
    ppl: str = ""  # held-out perplexity data: name=glob[,name=glob] of .bin token shards or .jsonl/.txt files
    ppl_window: int = 0  # perplexity window in tokens; 0 = the model's context (max_position_embeddings)
    ppl_stride: int = 0  # tokens a window advances; 0 = half the window
    ppl_max_tokens: int = 262144  # perplexity: tokens per source at most (its first documents); 0 = all
    max_length: int = 0  # long context: lengths 4k, 8k, ... up to this; 0 = the model max_position_embeddings
    ruler_samples: int = 20  # long context: generated items per task and length (--limit overrides)
    haystack: str = ""  # long context: a text file of filler; "" = Python standard-library docstrings
    out: str = "out/retention"  # folder for samples.jsonl, results.json, results.md (and the report's files)

    def check(self):
        """evaluate.py's flag checks and retention's own, before any file is read or a model loaded."""
        super().check()
        for name, lo in (("mc_batch_tokens", 1), ("ppl_window", 0), ("ppl_stride", 0), ("ppl_max_tokens", 0),
                         ("max_length", 0), ("ruler_samples", 1)):
            if getattr(self, name) < lo:
                raise DataError(f"--{name.replace('_', '-')} {getattr(self, name)}: "
                                f"expected an integer >= {lo}")


# ----------------------------------------------------------------------------------------------
# General ability: log-likelihood multiple choice, scored the way lm-evaluation-harness scores it
#
# An item is a context and one continuation per choice (Winogrande: one context per choice and a
# shared continuation). The score of a choice is sum_i log p(continuation_i | context, continuation_<i);
# acc takes the argmax, acc_norm the argmax of score / len(choice text) (lm-evaluation-harness divides by
# the choice string's length in characters, = bytes for ASCII). Choices that share a context are
# scored from ONE prefill of that context: its KV / SSM cache is copied to one row per choice
# (DecodeCache.keep with repeated rows) and all continuations run as one cached batch.

MC_TASKS = ("mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "piqa")
MC_FEWSHOT = {"mmlu": 5}  # default shots (lm-evaluation-harness: MMLU 5-shot from dev; the others 0-shot)
MC_PRIMARY = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm",
              "piqa": "acc_norm"}
# task -> (repo, {split: [files]}, revision); refs/convert/parquet is the hub's parquet copy
GENERAL_HUB_FILES = {
    "mmlu": ("cais/mmlu", {"test": ["all/test-00000-of-00001.parquet"],
                           "dev": ["all/dev-00000-of-00001.parquet"]}, None),
    "arc_challenge": ("allenai/ai2_arc", {"test": ["ARC-Challenge/test-00000-of-00001.parquet"],
                                         "dev": ["ARC-Challenge/train-00000-of-00001.parquet"]}, None),
    "arc_easy": ("allenai/ai2_arc", {"test": ["ARC-Easy/test-00000-of-00001.parquet"],
                                    "dev": ["ARC-Easy/train-00000-of-00001.parquet"]}, None),
    "hellaswag": ("Rowan/hellaswag", {"test": ["default/validation/0000.parquet"],
                                      "dev": ["default/train/0000.parquet"]}, "refs/convert/parquet"),
    "winogrande": ("allenai/winogrande", {"test": ["winogrande_xl/validation/0000.parquet"],
                                          "dev": ["winogrande_xl/train/0000.parquet"]},
                   "refs/convert/parquet"),
    "piqa": ("ybisk/piqa", {"test": ["plain_text/validation/0000.parquet"],
                            "dev": ["plain_text/train/0000.parquet"]}, "refs/convert/parquet"),
}
BBL_TASKS = (  # BIG-bench Lite v1 (bigbench/bbseqio/bigbench_lite.py), 24 tasks
    "auto_debugging", "bbq_lite_json", "code_line_description", "conceptual_combinations",
    "conlang_translation", "emoji_movie", "formal_fallacies_syllogisms_negation", "hindu_knowledge",
    "known_unknowns", "language_identification", "linguistics_puzzles", "logic_grid_puzzle",
    "logical_deduction", "misconceptions_russian", "novel_concepts", "operators",
    "parsinlu_reading_comprehension", "play_dialog_same_or_different", "repeat_copy_logic", "strange_stories",
    "strategyqa", "symbol_interpretation", "vitaminc_fact_verification", "winowhy")
# no target_scores: not multiple choice
BBL_GENERATIVE = {"auto_debugging", "conlang_translation", "linguistics_puzzles", "operators",
                  "parsinlu_reading_comprehension", "repeat_copy_logic"}
BBL_MC = tuple(t for t in BBL_TASKS if t not in BBL_GENERATIVE)  # the 18 multiple-choice BBL tasks
RULER_TASKS = ("ruler_niah_single", "ruler_niah_multivalue", "ruler_niah_multikey", "ruler_vt", "ruler_cwe")
PRESETS = {"general": MC_TASKS, "bbl": tuple(f"bigbench:{t}" for t in BBL_MC), "ruler": RULER_TASKS}


def _mc_item(iid, contexts, continuations, gold, choices, scores=None) -> dict:
    """One multiple-choice item: len(contexts) == 1 (shared) or == len(choices); likewise continuations."""
    return {"id": str(iid), "contexts": contexts, "continuations": continuations, "gold": gold,
            "choices": choices, "scores": scores or [float(i == gold) for i in range(len(choices))]}


def _check_choices(rec, field, choices):
    path, row, _ = rec
    if not isinstance(choices, list) or len(choices) < 2:
        n = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise DataError(f"{path}: record {row}: field '{field}' has {n} choice(s); "
                        "expected a list of at least 2")
    for c in choices:
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"{path}: record {row}: field '{field}' has an empty or non-text choice {c!r}")
    return choices


def _gold_index(rec, field, value, n):
    path, row, _ = rec
    try:
        g = int(value)
    except (TypeError, ValueError):
        g = -1
    if isinstance(value, bool) or not 0 <= g < n:
        raise DataError(f"{path}: record {row}: field '{field}' is {value!r}; expected an index 0..{n - 1}")
    return g


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing (WikiHow [title] / [step] markers)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _mc_parts(task: str, rec) -> tuple:
    """(question text, choice texts, gold index, shot text) of one record in the task's real schema; the
    shot text is the question followed by its answer, for few-shot prompts."""
    path, row, d = rec
    if task == "mmlu":
        q = E._field(rec, "question").strip()
        choices = _check_choices(rec, "choices", d.get("choices"))
        if len(choices) > 26:
            raise DataError(f"{path}: record {row}: field 'choices' has {len(choices)} choices; at most 26")
        gold = _gold_index(rec, "answer", d.get("answer"), len(choices))
        letters = [chr(65 + i) for i in range(len(choices))]
        text = q + "".join(f"\n{k}. {c}" for k, c in zip(letters, choices)) + "\nAnswer:"
        return text, letters, gold, f"{text} {letters[gold]}"
    if task in ("arc_challenge", "arc_easy"):
        q = d.get("question")
        if isinstance(q, dict):  # the original ARC jsonl: question{stem, choices[{text, label}]}
            stem = E._field((path, row, q), "stem")
            raw = q.get("choices")
            if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
                raise DataError(f"{path}: record {row}: field 'question.choices' "
                                f"must be a list of {{text, label}}")
            texts, labels = [c.get("text") for c in raw], [str(c.get("label")) for c in raw]
        else:  # the hub's parquet schema: question, choices{text: [...], label: [...]}
            stem = E._field(rec, "question")
            raw = E._field(rec, "choices", dict)
            texts, labels = raw.get("text"), [str(x) for x in raw.get("label") or []]
        texts = _check_choices(rec, "choices.text", texts)
        key = str(E._field(rec, "answerKey"))
        if key not in labels:
            raise DataError(f"{path}: record {row}: field 'answerKey' {key!r} "
                            f"is not among the labels {labels}")
        text = f"Question: {stem}\nAnswer:"
        gold = labels.index(key)
        return text, texts, gold, f"{text} {texts[gold]}"
    if task == "hellaswag":
        endings = _check_choices(rec, "endings", d.get("endings"))
        label = E._field(rec, "label")
        ctx = (f"{d['ctx_a']} {d['ctx_b'].capitalize()}" if d.get("ctx_a") and "ctx_b" in d
               else E._field(rec, "ctx"))
        text = _hellaswag_clean(f"{E._field(rec, 'activity_label')}: {ctx}")
        choices = [_hellaswag_clean(e) for e in endings]
        gold = _gold_index(rec, "label", label, len(choices))
        return text, choices, gold, f"{text} {choices[gold]}"
    if task == "piqa":
        goal = E._field(rec, "goal")
        choices = _check_choices(rec, "sol1/sol2", [E._field(rec, "sol1"), E._field(rec, "sol2")])
        gold = _gold_index(rec, "label", E._field(rec, "label"), 2)
        text = f"Question: {goal}\nAnswer:"
        return text, choices, gold, f"{text} {choices[gold]}"
    if task == "winogrande":
        sentence = E._field(rec, "sentence")
        if sentence.count("_") != 1:
            raise DataError(f"{path}: record {row}: field 'sentence' must hold exactly one blank '_'")
        options = _check_choices(rec, "option1/option2", [E._field(rec, "option1"), E._field(rec, "option2")])
        answer = str(E._field(rec, "answer")).strip()
        if answer not in ("1", "2"):
            raise DataError(f"{path}: record {row}: field 'answer' is {d.get('answer')!r}; "
                            "expected '1' or '2'")
        gold = int(answer) - 1
        return sentence, options, gold, sentence.replace("_", options[gold])
    raise DataError(f"unknown multiple-choice task {task!r}; expected one of {', '.join(MC_TASKS)}")


def to_mc_items(task: str, records: list, shots: int = 0, pool: list | None = None, seed: int = 0) -> list:
    """Records in the task's real schema -> items {id, contexts, continuations, gold, choices, scores}.

    Few-shot examples come from `pool` (records of a dev/train split; else the other test records): MMLU
    takes the first `shots` of the same subject, with the harness's header line; the other tasks draw
    them at random with a fixed seed per item. Shots are joined by a blank line."""
    parsed = [(rec, _mc_parts(task, rec)) for rec in records]
    pool_parsed = parsed if pool is None else [(rec, _mc_parts(task, rec)) for rec in pool]
    items = []
    for k, (rec, (text, choices, gold, _)) in enumerate(parsed):
        path, row, d = rec
        header = ""
        if task == "mmlu":
            subject = str(d.get("subject") or "")
            header = ("The following are multiple choice questions (with answers) about "
                      f"{subject.replace('_', ' ')}.\n\n" if subject else "")
            same = [p for p in pool_parsed
                    if p[0] is not rec and str(p[0][2].get("subject") or "") == subject]
            examples = [p[1][3] for p in same[:shots]]
        elif shots:
            others = [p for p in pool_parsed if p[0] is not rec]
            rng = random.Random(f"{seed}/{task}/{k}")
            examples = [p[1][3] for p in rng.sample(others, min(shots, len(others)))]
        else:
            examples = []
        prefix = header + "".join(e + "\n\n" for e in examples)
        iid = d.get("id") or f"{task}-{k}"
        if task == "winogrande":  # partial scoring: each option fills the blank; the rest is the continuation
            cut = text.index("_")
            contexts = [prefix + text[:cut] + o for o in choices]
            items.append(_mc_item(iid, contexts, [" " + text[cut + 1:].strip()], gold, choices))
        else:
            items.append(_mc_item(iid, [prefix + text], [" " + c for c in choices], gold, choices))
    return items


def _split_files(files: list) -> tuple:
    """(test files, dev files) of a local folder: names with dev/train/validation-for-shots go to the pool."""
    dev = [f for f in files if re.search(r"(^|[^a-z])(dev|train)([^a-z]|$)", Path(f).name.lower())]
    test = [f for f in files if f not in dev]
    return (test or dev), (dev if test else [])


def load_mc_task(task: str, cfg: Config, path=None) -> tuple:
    """(items, source) of a multiple-choice task: a local file/folder in the real schema (a folder's
    dev/train files are the few-shot pool), else the hub's files when online. BIG-bench tasks come from
    the bigbench source archive."""
    shots = cfg.num_fewshot if cfg.num_fewshot >= 0 else MC_FEWSHOT.get(task, 0)
    if task.startswith("bigbench:"):
        return bigbench_items(task.split(":", 1)[1], cfg, shots), f"bigbench:{bigbench_archive(cfg)}"
    if path:
        test, dev = _split_files(E._local_files(path))
        source = str(path)
    else:
        if cfg.offline or os.environ.get("HF_HUB_OFFLINE") == "1" or not E.hub_reachable():
            raise DataError(f"{task}: no local file given (--data {task}=PATH, a file or a folder "
                            "in the dataset's real schema) and the hub is not reachable or switched off")
        from huggingface_hub import hf_hub_download
        repo, splits, revision = GENERAL_HUB_FILES[task]
        try:
            test, dev = ([Path(hf_hub_download(repo, f, repo_type="dataset", revision=revision))
                          for f in splits[s]] for s in ("test", "dev"))
        except Exception as e:  # noqa: BLE001 - no network, moved files, ...
            raise DataError(f"{task}: hub files of {repo} not available "
                            f"({type(e).__name__}: {str(e)[:200]}); "
                            f"give a local copy with --data {task}=PATH") from None
        source = f"hub:{repo}"
    records = [r for f in test for r in cli.read_records(f)]
    if not records:
        raise DataError(f"{source}: no records")
    pool = [r for f in dev for r in cli.read_records(f)] if dev else None
    return to_mc_items(task, records, shots, pool, cfg.seed), source


# BIG-bench: task.json files read straight out of the bigbench source archive on PyPI

BIGBENCH_CACHE = Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism")) / "bigbench"
_BIGBENCH_TASKS = {}  # archive path -> {task name: [(member name, task dict)]}, filled by one pass


def bigbench_archive(cfg: Config | None = None) -> Path:
    """The bigbench sdist (download_bigbench() puts it in ~/.cache/prism/bigbench)."""
    given = cfg.bigbench_archive if cfg else ""
    if given:
        if not Path(given).is_file():
            raise DataError(f"--bigbench-archive {given}: no such file")
        return Path(given)
    found = sorted(BIGBENCH_CACHE.glob("bigbench-*.tar.gz")) + sorted(BIGBENCH_CACHE.glob("bigbench-*.zip"))
    if not found:
        raise DataError(f"BIG-bench: no archive in {BIGBENCH_CACHE}; fetch it once (about 350 MB) with "
                        f"python -c 'import retention; retention.download_bigbench()'")
    return found[-1]


def download_bigbench(version: str = "1.0.0") -> Path:
    """Fetch the bigbench source archive from PyPI into BIGBENCH_CACHE (sha256 checked, written atomically).
    Not `pip download`: recent pips refuse to prepare this sdist (it declares a direct-URL dependency)."""
    import hashlib
    import urllib.request
    index = urllib.request.Request("https://pypi.org/simple/bigbench/",  # PEP 691: the index as JSON
                                   headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(index, timeout=60) as r:
        files = [f for f in json.load(r)["files"] if f["filename"] == f"bigbench-{version}.tar.gz"]
    if not files:
        raise DataError(f"PyPI lists no source archive bigbench-{version}.tar.gz")
    target = BIGBENCH_CACHE / files[0]["filename"]
    if target.is_file():
        return target
    BIGBENCH_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    print(f"[retention] downloading {files[0]['url']} -> {target}")
    with urllib.request.urlopen(files[0]["url"], timeout=60) as r, open(tmp, "wb") as out:
        size = int(r.headers.get("Content-Length") or 0) or None  # ~350 MB: a bar, not silence
        with cli.progress(total=size, desc="bigbench archive", unit="B", unit_scale=True) as bar:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != files[0]["hashes"]["sha256"]:
        tmp.unlink()
        raise DataError(f"{files[0]['url']}: sha256 mismatch; try again")
    os.replace(tmp, target)
    return target


def read_bigbench(names, archive) -> dict:
    """{task name: [(member, task.json dict), ...]} for the named tasks (a task with subtasks gives one
    entry per subtask folder). One sequential pass over the .tar.gz (~15 s) reads every wanted file;
    results are kept for the process, and each task's files in a small JSON beside the archive."""
    archive = Path(archive)
    have = _BIGBENCH_TASKS.setdefault(str(archive), {})
    for name in names:
        cached = archive.parent / "tasks" / f"{name}.json"
        if name not in have and cached.exists():
            have[name] = [tuple(x) for x in json.loads(cached.read_text(encoding="utf-8"))]
    wanted = {n for n in names if n not in have}
    # every task name in the archive, from the first full pass
    index = archive.parent / "tasks" / "_names.json"
    known = set(json.loads(index.read_text(encoding="utf-8"))) if index.exists() else None
    if wanted and known is not None and wanted - known:
        missing = sorted(wanted - known)[0]
        raise DataError(f"{archive}: no BIG-bench task {missing!r} "
                        f"(bigbench/benchmark_tasks/{missing}/task.json)")
    if wanted:
        found, seen = {}, set()
        pattern = re.compile(r"bigbench/benchmark_tasks/([^/]+)/(?:[^/]+/)?task\.json$")

        def take(member_name, read):
            m = pattern.search(member_name)
            seen.update([m.group(1)] if m else [])
            if m and m.group(1) in wanted:
                try:
                    found.setdefault(m.group(1), []).append((member_name, json.loads(read())))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{archive}:{member_name}: not JSON ({e})") from None
        try:
            if archive.name.endswith(".zip"):
                import zipfile
                with zipfile.ZipFile(archive) as z:
                    for n in z.namelist():
                        take(n, lambda n=n: z.read(n).decode("utf-8"))
            else:
                import tarfile
                with tarfile.open(archive) as t:
                    for m in t:
                        if m.isfile():
                            take(m.name, lambda m=m: t.extractfile(m).read().decode("utf-8"))
        except (OSError, EOFError) as e:
            raise DataError(f"{archive}: cannot read the archive ({e})") from None
        (archive.parent / "tasks").mkdir(exist_ok=True)
        for name, files in list(found.items()) + [("_names", sorted(seen))]:
            if name != "_names":
                files.sort()
                have[name] = files
            tmp = archive.parent / "tasks" / f"{name}.json.{os.getpid()}.tmp"  # ranks may write at once
            tmp.write_text(json.dumps(files), encoding="utf-8")
            os.replace(tmp, archive.parent / "tasks" / f"{name}.json")
    missing = [n for n in names if n not in have]
    if missing:
        raise DataError(f"{archive}: no BIG-bench task {missing[0]!r} "
                        f"(bigbench/benchmark_tasks/{missing[0]}/task.json)")
    return {n: have[n] for n in names}


def bigbench_task_items(task: dict, source: str, shots: int = 0, seed: int = 42) -> list:
    """Items of one BIG-bench JSON task, formatted as bigbench/api/json_task.py formats them: task_prefix,
    example_input_prefix ("\\nQ: "), the input, the choices appended ("\\n  choice: " each, in the order of
    a RandomState(seed) permutation of the sorted choices) when append_choices_to_input, then
    example_output_prefix ("\\nA: "); shots joined by few_shot_example_separator ("\\n"). The score of a
    prediction is its target_scores value (several choices can be right)."""
    import numpy as np
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{source}: field 'examples' must be a non-empty list")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append = task.get("append_choices_to_input", True)
    sep = task.get("few_shot_example_separator", "\n")
    task_prefix = str(task.get("task_prefix", ""))
    formatted, seen = [], set()
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise DataError(f"{source}: examples[{i}]: field 'input' must be a string")
        ts = ex.get("target_scores")
        if not isinstance(ts, dict):
            raise DataError(f"{source}: examples[{i}]: no field 'target_scores' "
                            "(a generative task, not multiple choice)")
        if len(ts) < 2:
            raise DataError(f"{source}: examples[{i}]: field 'target_scores' has {len(ts)} choice(s); "
                            "expected at least 2")
        key = json.dumps(ex, sort_keys=True)
        if key in seen:  # BIG-bench drops duplicate examples
            continue
        seen.add(key)
        choices = list(ts.keys())
        scores = [float(ts[c]) for c in choices]
        text = ex["input"]
        if append:
            perm = np.random.RandomState(seed=seed).permutation(sorted(choices))
            text = text + choice_prefix + choice_prefix.join(perm)
        target = ex.get("target")
        target = ((target[0] if isinstance(target, list) and target else target)
                  or choices[scores.index(max(scores))])
        formatted.append((in_prefix + text + out_prefix, choices, scores, target))
    items = []
    rng = np.random.RandomState(seed=seed)
    for k, (text, choices, scores, _) in enumerate(formatted):
        context = text
        if shots:
            others = [f for j, f in enumerate(formatted) if j != k]
            picks = rng.choice(len(others), min(shots, len(others)), replace=False)
            context = sep.join(others[j][0] + others[j][3] for j in picks) + sep + text
        items.append(_mc_item(f"{k}", [task_prefix + context], list(choices), scores.index(max(scores)),
                              choices, scores))
    return items


def bigbench_items(name: str, cfg: Config, shots: int = 0) -> list:
    archive = bigbench_archive(cfg)
    files = read_bigbench([name], archive)[name]
    per_sub = []
    for member, task in files:
        if not task.get("examples") and len(files) > 1:
            continue  # the parent task.json of a task with subtasks
        sub = member.rsplit("/", 2)[-2]
        its = bigbench_task_items(task, f"{archive}:{member}", shots)
        for it in its:
            it["id"] = f"{sub}/{it['id']}" if len(files) > 1 else it["id"]
        per_sub.append(its)
    # subtasks interleaved, so that the first --limit items cover all of them
    return [its[k] for k in range(max(map(len, per_sub), default=0)) for its in per_sub if k < len(its)]


# Scoring

def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: all trailing whitespace of the
    context (spaces, newlines, tabs: its `context.rstrip()`) moves to the continuation, the continuation's
    ids are those of context + continuation after the context's own. An empty context is the BOS (else
    EOS) token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        prefix = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else tokenizer.eos_ids[0]
        return [prefix], tokenizer.encode(continuation)
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx):]


def _max_positions(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)


def _fit_context(ctx: list, longest: int, limit: int, what: str) -> list:
    """Left-truncate a context so that context + continuation fits the model (as the harness does)."""
    if longest >= limit:
        raise DataError(f"{what}: a continuation of {longest} tokens does not fit the model's "
                        f"{limit} positions (config.json field max_position_embeddings)")
    return ctx[-(limit - longest):] if len(ctx) + longest > limit else ctx



def _logprobs_at(model, hidden, rows, cols, targets, chunk: int = 1024):
    """log p(targets) from hidden (B, T, H) at positions (rows, cols), each (K,); logits are computed
    only there, `chunk` positions at a time (a (K, vocab) tensor at once would be large)."""
    import torch
    h = hidden[rows, cols]  # (K, H)
    out = [model.logits(h[i:i + chunk]).float().log_softmax(-1).gather(-1, targets[i:i + chunk, None])[:, 0]
           for i in range(0, h.shape[0], chunk)]
    return torch.cat(out) if out else h.new_zeros(0)


def _length_batches(costs: list, budget: int) -> list:
    """Index lists, longest first, each summing to at most `budget` (one item at least)."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches, cur, total = [], [], 0
    for i in order:
        if cur and total + costs[i] > budget:
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += costs[i]
    return batches + ([cur] if cur else [])


def score_shared(model, groups: list, *, batch_tokens: int = 8192) -> list:
    """Summed log-probs of continuations that share a context, one prefill per context.

    groups: [(context ids, [continuation ids, ...]), ...], every list non-empty. Returns, per group, one
    float per continuation. A batch of contexts is prefilled once (left padding, as generate() does); the
    cache is then copied to one row per continuation (DecodeCache.keep with repeated rows) and every
    continuation but its last token runs as one cached forward (right padding, document id -1)."""
    import torch
    device = model.lm_head.weight.device
    out = [None] * len(groups)
    costs = [len(cs) * (len(c) + max(map(len, cs))) for c, cs in groups]  # tokens held in the copied caches
    with torch.no_grad():
        for idx in _length_batches(costs, batch_tokens):
            ctxs, conts = [groups[i][0] for i in idx], [groups[i][1] for i in idx]
            B, T0 = len(idx), max(map(len, ctxs))
            ids = torch.zeros(B, T0, dtype=torch.long)
            doc = torch.full((B, T0), -1, dtype=torch.long)  # left padding: id -1
            for b, c in enumerate(ctxs):
                ids[b, T0 - len(c):], doc[b, T0 - len(c):] = torch.tensor(c), 0
            flat = [c for cs in conts for c in cs]
            rows = torch.tensor([b for b, cs in enumerate(conts) for _ in cs],
                                device=device)  # (N,) context row
            Lc = max(map(len, flat)) - 1  # continuation tokens fed after the context
            cache = model.allocate_cache(B, T0 + Lc)
            hidden = model.hidden_states(ids.to(device), doc.to(device), cache)  # (B, T0, H)
            first = torch.tensor([c[0] for c in flat], device=device)
            lp = _logprobs_at(model, hidden, rows, torch.full_like(rows, T0 - 1), first)  # (N,) first tokens
            if Lc > 0:
                N = len(flat)
                inp = torch.zeros(N, Lc, dtype=torch.long)
                tgt = torch.zeros(N, Lc, dtype=torch.long)
                doc = torch.full((N, Lc), -1, dtype=torch.long)  # right padding: id -1
                for n, c in enumerate(flat):
                    inp[n, :len(c) - 1], tgt[n, :len(c) - 1], doc[n, :len(c) - 1] = (torch.tensor(c[:-1]),
                                                                                      torch.tensor(c[1:]), 0)
                cache.keep(rows)  # (B, ...) -> (N, ...): each context's cache once per continuation
                hidden = model.hidden_states(inp.to(device), doc.to(device), cache)  # (N, Lc, H)
                r, t = (doc >= 0).nonzero(as_tuple=True)
                rest = _logprobs_at(model, hidden, r.to(device), t.to(device), tgt[r, t].to(device))  # (K,)
                lp = lp.index_add(0, r.to(device), rest)
            lp = lp.tolist()
            k = 0
            for i, cs in zip(idx, conts):
                out[i], k = lp[k:k + len(cs)], k + len(cs)
    return out


def score_unshared(model, requests: list, *, batch_tokens: int = 8192) -> list:
    """Summed log-probs of (context ids, continuation ids) requests, each its own row: the per-choice
    scoring of lm-evaluation-harness without context sharing (the baseline of bench/bench_retention.py)."""
    import torch
    device = model.lm_head.weight.device
    out = [None] * len(requests)
    with torch.no_grad():
        for idx in _length_batches([len(c) + len(x) - 1 for c, x in requests], batch_tokens):
            seqs = [(requests[i][0] + requests[i][1])[:-1] for i in idx]
            B, T = len(idx), max(map(len, seqs))
            ids = torch.zeros(B, T, dtype=torch.long)
            doc = torch.full((B, T), -1, dtype=torch.long)  # right padding: id -1
            rows, cols, tgts = [], [], []
            for b, (i, s) in enumerate(zip(idx, seqs)):
                ids[b, :len(s)], doc[b, :len(s)] = torch.tensor(s), 0
                ctx, cont = requests[i]
                start = len(ctx) - 1  # the position whose logits predict the first continuation token
                rows += [b] * len(cont)
                cols += range(start, start + len(cont))
                tgts += cont
            hidden = model.hidden_states(ids.to(device), doc.to(device))  # (B, T, H)
            lp = _logprobs_at(model, hidden, torch.tensor(rows, device=device),
                              torch.tensor(cols, device=device), torch.tensor(tgts, device=device))
            sums = torch.zeros(B, device=device).index_add_(0, torch.tensor(rows, device=device), lp).tolist()
            for b, i in enumerate(idx):
                out[i] = sums[b]
    return out


def mc_requests(tokenizer, item: dict, limit: int = 1 << 30) -> list:
    """(context ids, continuation ids) of each choice of an item (contexts left-truncated to fit `limit`)."""
    n = len(item["choices"])
    pairs = [encode_pair(tokenizer, item["contexts"][i if len(item["contexts"]) > 1 else 0],
                         item["continuations"][i if len(item["continuations"]) > 1 else 0]) for i in range(n)]
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise DataError(f"item {item['id']}: choice {i} ({item['choices'][i]!r}) encodes to no tokens")
        pairs[i] = (_fit_context(ctx, len(cont), limit, f"item {item['id']}"), cont)
    return pairs


def score_mc_items(model, tokenizer, items: list, *, batch_tokens: int = 8192, shared: bool = True) -> list:
    """Per item, the summed log-prob of each choice. shared: choices with the same context tokens form one
    group (one prefill); else every choice is its own row."""
    limit = _max_positions(model)
    reqs = [mc_requests(tokenizer, it, limit) for it in items]
    if not shared:
        flat = score_unshared(model, [p for r in reqs for p in r], batch_tokens=batch_tokens)
        out, k = [], 0
        for r in reqs:
            out.append(flat[k:k + len(r)])
            k += len(r)
        return out
    groups, where = [], []  # where[item][choice] = (group, position in the group)
    for r in reqs:
        local, pos = {}, []  # context ids -> group index, within this item
        for ctx, cont in r:
            if tuple(ctx) not in local:
                local[tuple(ctx)] = len(groups)
                groups.append((ctx, []))
            g = local[tuple(ctx)]
            groups[g][1].append(cont)
            pos.append((g, len(groups[g][1]) - 1))
        where.append(pos)
    scores = score_shared(model, groups, batch_tokens=batch_tokens)
    return [[scores[g][j] for g, j in pos] for pos in where]


def mc_outcome(item: dict, logprobs: list) -> dict:
    """acc (the gold's target score of the argmax choice) and acc_norm (argmax of log-prob / length of the
    scored continuation text, without the leading space)."""
    lengths = [max(1, len(item["continuations"][i if len(item["continuations"]) > 1 else 0].lstrip(" ")))
               for i in range(len(logprobs))]
    pred = max(range(len(logprobs)), key=lambda i: logprobs[i])
    norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / lengths[i])
    return {"pred": pred, "pred_norm": norm, "correct": item["scores"][pred],
            "correct_norm": item["scores"][norm]}


# ----------------------------------------------------------------------------------------------
# Held-out perplexity per source
#
# A source is a glob (or folder) of uint32 token shards (.bin, EOS between documents, as train_mid.py
# writes them; an index.json beside them may name the eos id) or of text files (.jsonl/.json records
# with a 'text' field; any other file, .txt or source code, is one document). Each document is scored
# from a BOS (else EOS) prefix, in windows of the model's context that advance by a stride: every token
# is scored exactly once, with at least window - stride tokens of context after the first window.
# Windows are packed into rows with document ids. Reported: loss (nats per token), bits per byte =
# sum nll / (ln 2 * UTF-8 bytes), perplexity.


def _ppl_files(spec: str) -> list:
    import glob
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
    if len(files) == 1 and files[0].is_dir():
        files = sorted(p for p in files[0].rglob("*")
                       if p.suffix in (".bin", ".jsonl", ".json", ".txt", ".gz"))
    files = [f for f in files if f.is_file() and f.name != "index.json"]
    if not files:
        raise DataError(f"{spec}: no files match "
                        "(expected .bin token shards, .jsonl/.json records or text files)")
    return files


def ppl_documents(spec: str, tokenizer, max_tokens: int = 0, max_docs: int = 0) -> list:
    """[{id, ids, bytes}] of a source, the first documents up to max_tokens / max_docs (0 = all)."""
    import numpy as np
    docs, total = [], 0

    def add(name, ids, text=None):
        nonlocal total
        if not ids:
            return
        text = tokenizer.decode(ids) if text is None else text
        docs.append({"id": f"{name}#{len(docs)}", "ids": ids, "bytes": len(text.encode("utf-8"))})
        total += len(ids)

    def full():
        return (max_tokens and total >= max_tokens) or (max_docs and len(docs) >= max_docs)
    for f in _ppl_files(spec):
        if full():
            break
        if f.suffix == ".bin":
            eos = tokenizer.eos_id
            index = f.parent / "index.json"
            if index.exists():
                try:
                    meta = json.loads(index.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{index}: not JSON ({e.msg})") from None
                eos = meta.get("eos_id", meta.get("eos_token_id", eos)) if isinstance(meta, dict) else eos
            if f.stat().st_size % 4:
                raise DataError(f"{f}: size {f.stat().st_size} is not a multiple of 4 "
                                "(expected uint32 token ids)")
            arr = np.fromfile(f, dtype=np.uint32)
            vocab = getattr(tokenizer, "vocab_size", None)
            if arr.size and vocab and int(arr.max()) >= vocab:
                raise DataError(f"{f}: token id {int(arr.max())} >= the tokenizer's vocabulary ({vocab}); "
                                "shards of another tokenizer?")
            cuts = np.flatnonzero(arr == eos)
            start = 0
            for end in list(cuts) + [arr.size]:
                if full():
                    break
                add(f.name, arr[start:end].tolist())
                start = end + 1
        else:
            if f.name.lower().endswith((".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")):
                recs = cli.read_records(f)
            else:  # any other file is one plain-text document (.txt, source code, ...)
                try:
                    recs = [(f, 1, {"text": f.read_text(encoding="utf-8")})]
                except (OSError, UnicodeDecodeError) as e:
                    raise DataError(f"{f}: not a UTF-8 text file ({e})") from None
            for rec in recs:
                if full():
                    break
                text = E._field(rec, ("text", "content"))
                add(f.name, tokenizer.encode(text), text)
    if not docs:
        raise DataError(f"{spec}: no documents")
    return docs


def ppl_windows(ids: list, prefix: int, window: int, stride: int) -> list:
    """(input ids, target ids, n scored) windows of one document: inputs are ([prefix] + ids)[begin:end],
    targets ids[begin:end]; only the last n targets are scored (the others were scored before)."""
    if window < 2 or not 0 < stride <= window:
        raise DataError(f"perplexity window {window} / stride {stride}: "
                        "need window >= 2 and 0 < stride <= window")
    s = [prefix] + ids
    out, scored = [], 0
    while scored < len(ids):
        end = min(scored + (window if scored == 0 else stride), len(ids))
        begin = max(0, end - window)
        out.append((s[begin:end], ids[begin:end], end - scored))
        scored = end
    return out


def score_ppl(model, docs: list, prefix: int, window: int, stride: int, *, batch_tokens: int = 8192) -> list:
    """Summed nll (nats) per document. Windows are packed first-fit into rows of `window` tokens."""
    import torch
    device = model.lm_head.weight.device
    pieces = [(d, w) for d, doc in enumerate(docs) for w in ppl_windows(doc["ids"], prefix, window, stride)]
    rows = []  # each: list of piece indices
    space = []
    for p, (_, (inp, _, _)) in enumerate(pieces):
        j = next((j for j, s in enumerate(space) if s >= len(inp)), None)
        if j is None:
            rows.append([])
            space.append(window)
            j = len(rows) - 1
        rows[j].append(p)
        space[j] -= len(inp)
    nll = [0.0] * len(docs)
    per_batch = max(1, batch_tokens // window)
    with torch.no_grad():
        for start in range(0, len(rows), per_batch):
            batch = rows[start:start + per_batch]
            T = max(sum(len(pieces[p][1][0]) for p in r) for r in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            doc = torch.full((len(batch), T), -1, dtype=torch.long)  # one document id per window; -1 padding
            rr, cc, tt, owner = [], [], [], []
            for b, r in enumerate(batch):
                col = 0
                for k, p in enumerate(r):
                    d, (inp, tgt, n) = pieces[p]
                    ids[b, col:col + len(inp)], doc[b, col:col + len(inp)] = torch.tensor(inp), k
                    first = col + len(inp) - n  # only the last n targets count
                    rr += [b] * n
                    cc += range(first, col + len(inp))
                    tt += tgt[len(tgt) - n:]
                    owner += [d] * n
                    col += len(inp)
            hidden = model.hidden_states(ids.to(device), doc.to(device))  # (b, T, H)
            lp = _logprobs_at(model, hidden, torch.tensor(rr, device=device), torch.tensor(cc, device=device),
                              torch.tensor(tt, device=device))
            sums = torch.zeros(len(docs), dtype=torch.float64).index_add_(0, torch.tensor(owner),
                                                                          -lp.double().cpu())
            for d in set(owner):
                nll[d] += float(sums[d])
    return nll


# ----------------------------------------------------------------------------------------------
# Long context: RULER-style synthetic tasks (Hsieh et al. 2024), no dataset needed
#
# Each item is generated from the seed at a target length in tokens (prompt + answer budget, chat
# template included when --chat): needles hidden in a haystack (any text file, default Python's own
# standard-library docstrings), found again by greedy generation and scored as RULER does: the share of
# the expected strings that appear in the response (case-insensitive).
#   ruler_niah_single      one "special magic number" for a key; asked for it
#   ruler_niah_multivalue  four numbers for the same key; asked for all four (multi needle)
#   ruler_niah_multikey    four keys with one number each; asked for one key (multi-key/value retrieval)
#   ruler_vt               variable tracking: VAR A = 12345, VAR B = VAR A, ... (4 hops); all names
#   ruler_cwe              common-word extraction: 10 words 30x, the rest 3x in a numbered list; the 10

RULER_NEW_TOKENS = {"ruler_niah_single": 32, "ruler_niah_multivalue": 64, "ruler_niah_multikey": 32,
                    "ruler_vt": 48, "ruler_cwe": 120}
HAYSTACK_MODULES = ("argparse", "asyncio", "base64", "calendar", "collections", "configparser", "contextlib",
                    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
                    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
                    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
                    "mailbox", "mimetypes", "multiprocessing", "optparse", "os", "pathlib", "pickle",
                    "pprint", "queue", "random", "re", "sched", "shlex", "shutil", "smtplib", "socket",
                    "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
                    "threading", "tkinter", "tokenize", "traceback", "turtle", "typing", "unittest",
                    "urllib.parse", "urllib.request", "uuid", "wave", "weakref", "xml.dom.minidom", "zipfile")
_HAYSTACK = {}


def haystack_words(path: str = "") -> list:
    """Words of the filler text: a file, or the docstrings of the standard library modules above (and
    their public members, in name order), which ship with every Python."""
    if path not in _HAYSTACK:
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"--haystack {path}: cannot read ({e})") from None
        else:
            import importlib
            import inspect
            parts = []
            for name in HAYSTACK_MODULES:
                try:
                    mod = importlib.import_module(name)
                except Exception:  # noqa: BLE001 - a module missing in this build (tkinter): skip it
                    continue
                parts.append(inspect.getdoc(mod) or "")
                for attr in sorted(dir(mod)):
                    obj = getattr(mod, attr, None)
                    if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                        parts.append(inspect.getdoc(obj) or "")
            text = "\n\n".join(p for p in parts if p)
        # long tokens (URLs, rules) would make lengths coarse
        words = [w for w in text.split() if len(w) <= 12]
        if len(words) < 100:
            raise DataError(f"--haystack {path or '(standard library docstrings)'}: only {len(words)} words")
        _HAYSTACK[path] = words
    return _HAYSTACK[path]


def _fit_length(render, target: int, count) -> tuple:
    """(text, tokens, n): the largest n whose render(n) has at most `target` tokens (render grows with n)."""
    base = count(render(0))
    if base > target:
        raise DataError(f"length {target}: the task's template alone has {base} tokens")
    lo, hi = 0, 16
    while count(render(hi)) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(render(mid)) <= target else (lo, mid)
    best = lo
    for n in range(lo + 1, lo + 9):  # token counts are not quite monotonic in n: look a few words further
        if count(render(n)) <= target:
            best = n
    text = render(best)
    return text, count(text), best


def _filler(words: list, n: int, offset: int) -> list:
    return [words[(offset + i) % len(words)] for i in range(n)]


def _insert(filler: list, needles: list, depths: list) -> str:
    """The filler with each needle inserted at its depth (a fraction), moved to the next sentence end."""
    cuts = []
    for d in depths:
        i = min(len(filler), round(d * len(filler)))
        j = next((k + 1 for k in range(max(0, i - 1), min(len(filler), i + 40)) if filler[k].endswith(".")),
                 i)
        cuts.append(j)
    out, last = [], 0
    for cut, needle in sorted(zip(cuts, needles), key=lambda x: x[0]):
        out += filler[last:cut] + [needle]
        last = cut
    return " ".join(out + filler[last:])


def _number(rng, text: str) -> str:
    while True:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in text:
            return v


def _word_key(rng, words: list, text: str) -> str:
    pool = [w.lower() for w in words[:20000] if w.isalpha() and 3 < len(w) < 11]
    while True:
        k = f"{rng.choice(pool)}-{rng.choice(pool)}"
        if k not in text.lower():
            return k


def _pseudo_words(rng, n: int, avoid: set) -> list:
    """n distinct pronounceable made-up words (when the haystack runs out of real ones)."""
    out, seen = [], set(avoid)
    while len(out) < n:
        w = "".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def ruler_item(task: str, length: int, index: int, tokenizer, *, seed: int = 0, haystack: str = "",
               chat: bool = True) -> dict:
    """One generated item: {id, prompt (text), answers, tokens (prompt length), max_new_tokens, needles,
    depths}. The prompt has at most length - max_new_tokens tokens, within a word or so of it."""
    if task not in RULER_TASKS:
        raise DataError(f"unknown long-context task {task!r}; expected one of {', '.join(RULER_TASKS)}")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    words = haystack_words(haystack)
    new_tokens = RULER_NEW_TOKENS[task]
    target = length - new_tokens
    offset = rng.randrange(len(words))
    sample_text = " ".join(words)  # needles' keys and values must not occur in the filler
    if task.startswith("ruler_niah"):
        n_needles = 1 if task == "ruler_niah_single" else 4
        keys = [_word_key(rng, words, sample_text)]
        if task == "ruler_niah_multikey":
            while len(keys) < n_needles:
                k = _word_key(rng, words, sample_text)
                keys += [k] if k not in keys else []
        values = []
        while len(values) < n_needles:
            v = _number(rng, sample_text)
            values += [v] if v not in values else []
        needles = [f"One of the special magic numbers for {keys[i] if len(keys) > 1 else keys[0]} "
                   f"is: {values[i]}."
                   for i in range(n_needles)]
        query = keys[0]
        answers = values if task == "ruler_niah_multivalue" else [values[0]]
        what = ("are all the special magic numbers" if task == "ruler_niah_multivalue"
                else "is the special magic number")
        head = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n")
        question = f"\nWhat {what} for {query} mentioned in the provided text?"
        answer_prefix = (f"The special magic numbers for {query} mentioned in the provided text are"
                         if len(answers) > 1
                         else f"The special magic number for {query} mentioned in the provided text is")
    elif task == "ruler_vt":
        names = []
        while len(names) < 5:
            v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            names += [v] if v not in names and v not in sample_text else []
        value = str(rng.randint(10000, 99999))
        needles = ([f"VAR {names[0]} = {value}."]
                   + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)])
        answers = names
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        answer_prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
                         f"5 variables are assigned the value {value}, they are:")
    else:  # ruler_cwe
        pool = sorted({w.lower().strip(".,;:()'\"") for w in words})
        pool = [w for w in pool if w.isalpha() and 3 < len(w) < 12]
        rng.shuffle(pool)
        freq_cw = max(4, min(30, 30 * length // 4096))  # fewer repeats below 4k tokens, as the list must fit
        common, uncommon = pool[:10], pool[10:]
        answers, needles = common, []
        head = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
        question = "\nQuestion: What are the 10 most common words in the above list?"
        answer_prefix = "Answer: The top 10 words that appear most often in the list are:"

    def wrap(body: str) -> str:
        text = head + body + question
        if chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}]) + answer_prefix
        return text + "\n" + answer_prefix

    if task == "ruler_cwe":
        def render(n):
            extra = uncommon[:n] if n <= len(uncommon) else uncommon + _pseudo_words(
                random.Random(index), n - len(uncommon), set(pool))
            seq = common * freq_cw + extra * 3
            random.Random(f"{seed}/{task}/{length}/{index}/{n}").shuffle(seq)
            return wrap(" ".join(f"{i + 1}. {w}" for i, w in enumerate(seq)))
        depths = []
    else:
        depths = [rng.random() for _ in needles]
        if task == "ruler_vt":
            depths.sort()  # the chain's statements in order

        def render(n):
            return wrap(_insert(_filler(words, n, offset), needles, depths))
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    prompt, n_tokens, _ = _fit_length(render, target, count)
    return {"id": f"{task}@{length}-{index}", "prompt": prompt, "answers": answers, "tokens": n_tokens,
            "max_new_tokens": new_tokens, "needles": needles, "depths": depths}


def ruler_score(response: str, answers: list) -> float:
    """RULER's string_match_all: the share of expected strings found in the response (case-insensitive)."""
    low = response.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def ruler_lengths(cfg: Config, model) -> list:
    """4096, 8192, ... up to --max-length (0 = the model's context); a single length below 4096."""
    limit = cfg.max_length or _max_positions(model)
    if limit < 4096:
        return [limit]
    lengths, n = [], 4096
    while n <= limit:
        lengths.append(n)
        n *= 2
    return lengths + ([limit] if lengths[-1] != limit else [])


# ----------------------------------------------------------------------------------------------
# Scores of the retention tasks (multiple choice, perplexity, long context)


def _ratio_se(xs: list, ys: list) -> float:
    """Standard error of sum(xs) / sum(ys) over units (documents), by the delta method."""
    n, sy = len(xs), sum(ys)
    if n < 2 or sy == 0:
        return 0.0
    r = sum(xs) / sy
    return math.sqrt(n / (n - 1) * sum((x - r * y) ** 2 for x, y in zip(xs, ys))) / sy


def _average(results: dict, names: list) -> dict:
    return {"score": sum(results[t]["score"] for t in names) / len(names),
            "se": math.sqrt(sum(results[t]["se"] ** 2 for t in names)) / len(names),
            "n": sum(results[t]["n"] for t in names), "metric": f"mean of {len(names)}"}


def summarize_retention(records: list) -> dict:
    """Per task: multiple choice acc and acc_norm (in %, with standard errors; `score` is the task's usual
    metric: acc_norm for ARC, HellaSwag, PIQA, else acc), perplexity loss / bits per byte / perplexity,
    long-context share of needles found; and the means General (the six harness tasks), BIG-bench and
    RULER@<length> when two or more of their tasks ran."""
    by = {}
    for r in records:
        by.setdefault(r["task"], []).append(r)
    results = {}
    for task, rs in by.items():
        kind = rs[0]["kind"]
        if kind == "mc":
            acc, acc_se = E._mean_se([float(r["correct"]) for r in rs])
            norm, norm_se = E._mean_se([float(r["correct_norm"]) for r in rs])
            metric = MC_PRIMARY.get(task, "acc")
            s, e = (norm, norm_se) if metric == "acc_norm" else (acc, acc_se)
            results[task] = {"score": 100 * s, "se": 100 * e, "n": len(rs), "metric": metric,
                             "acc": 100 * acc, "acc_se": 100 * acc_se, "acc_norm": 100 * norm,
                             "acc_norm_se": 100 * norm_se}
        elif kind == "ruler":
            m, se = E._mean_se([float(r["correct"]) for r in rs])
            results[task] = {"score": 100 * m, "se": 100 * se, "n": len(rs), "metric": "string_match_all"}
        elif kind == "ppl":
            nll, tok, byt = [r["nll"] for r in rs], [r["tokens"] for r in rs], [r["bytes"] for r in rs]
            loss = sum(nll) / sum(tok)
            results[task] = {"score": sum(nll) / (math.log(2) * sum(byt)),
                             "se": _ratio_se([x / math.log(2) for x in nll], byt), "n": len(rs),
                             "metric": "bits/byte", "lower_is_better": True, "loss": loss,
                             "loss_se": _ratio_se(nll, tok), "ppl": math.exp(loss), "tokens": sum(tok),
                             "bytes": sum(byt)}
    general = [t for t in MC_TASKS if t in results]
    if len(general) >= 2:
        results["General"] = _average(results, general)
    bb = [t for t in results if t.startswith("bigbench:")]
    if len(bb) >= 2:
        results["BIG-bench"] = _average(results, bb)
    lengths = sorted({int(t.rsplit("@", 1)[1]) for t in results if t.startswith("ruler_")})
    for L in lengths:
        at = [t for t in results if t.startswith("ruler_") and t.endswith(f"@{L}")]
        if len(at) >= 2:
            results[f"RULER@{L}"] = _average(results, at)
    return results


# ----------------------------------------------------------------------------------------------
# Runners: each shards its items by rank and writes one record per item through evaluate.py's Run
# (samples.jsonl, resumable), and returns {result name: (item ids, 1)} for E.finish_run


def expand_tasks(cfg: Config) -> list:
    """--tasks with presets expanded (general, bbl, ruler) and --ppl sources added as ppl:name=path."""
    out = []
    for t in (s.strip() for s in cfg.tasks.split(",")):
        for name in PRESETS.get(t, (t,) if t else ()):
            if name not in out:
                out.append(name)
    for item in filter(None, (s.strip() for s in cfg.ppl.split(","))):
        if "=" not in item:
            raise DataError(f"--ppl {item!r}: expected name=path-or-glob")
        out.append(f"ppl:{item}")
    for t in out:
        if not (t in E.TASKS or t in MC_TASKS or t in RULER_TASKS or t.startswith("bigbench:")
                or (t.startswith("ppl:") and "=" in t)):
            raise DataError(f"--tasks: unknown task {t!r}; "
                            f"expected some of {', '.join(E.TASKS + MC_TASKS + RULER_TASKS)}, "
                            "bigbench:<task>, ppl:<name>=<path>, or a preset: general, bbl, ruler")
    if not out:
        raise DataError("--tasks: no task given")
    return out


def run_mc_task(task: str, run: E.Run) -> dict:
    cfg, rank, world = run.cfg, run.dist.rank, run.dist.world
    items, source = load_mc_task(task, cfg, run.local.get(task))
    if cfg.limit:
        items = items[:cfg.limit]
    if len({it["id"] for it in items}) != len(items):
        raise DataError(f"{source}: item ids are not unique")
    if rank == 0:
        print(f"[retention] {task}: {len(items)} items from {source}; log-likelihood multiple choice")
    todo = [it for it in items[rank::world] if (task, it["id"], 0) not in run.done]
    bar = run.bar(len(todo), task)
    for start in range(0, len(todo), 64):  # 64 items a step: resume loses little
        batch = todo[start:start + 64]
        for it, lp in zip(batch, score_mc_items(run.model, run.tokenizer, batch,
                                                batch_tokens=cfg.mc_batch_tokens)):
            run.write({"task": task, "problem_id": it["id"], "sample": 0, "kind": "mc", "logprobs": lp,
                       "gold": it["gold"], "choices": it["choices"], **mc_outcome(it, lp)})
        run.sink.flush()
        bar.update(len(batch))
    bar.close()
    return {task: ({it["id"] for it in items}, 1)}


def run_ppl_task(task: str, run: E.Run) -> dict:
    cfg, rank, world, tokenizer = run.cfg, run.dist.rank, run.dist.world, run.tokenizer
    name, spec = task.split("=", 1)
    docs = ppl_documents(spec, tokenizer, cfg.ppl_max_tokens, cfg.limit)
    window = cfg.ppl_window or min(_max_positions(run.model), 1 << 16)
    stride = cfg.ppl_stride or max(1, window // 2)
    prefix = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else tokenizer.eos_ids[0]
    if rank == 0:
        print(f"[retention] {name}: {len(docs)} documents, {sum(len(d['ids']) for d in docs)} tokens "
              f"from {spec}; window {window}, stride {stride}")
    todo = [d for d in docs[rank::world] if (name, d["id"], 0) not in run.done]
    bar = run.bar(len(todo), name)
    for start in range(0, len(todo), 32):
        batch = todo[start:start + 32]
        for d, nll in zip(batch, score_ppl(run.model, batch, prefix, window, stride,
                                           batch_tokens=cfg.mc_batch_tokens)):
            run.write({"task": name, "problem_id": d["id"], "sample": 0, "kind": "ppl", "nll": nll,
                       "tokens": len(d["ids"]), "bytes": d["bytes"]})
        run.sink.flush()
        bar.update(len(batch))
    bar.close()
    return {name: ({d["id"] for d in docs}, 1)}


def run_ruler_task(task: str, run: E.Run, errors: dict) -> dict:
    cfg, rank, world, tokenizer = run.cfg, run.dist.rank, run.dist.world, run.tokenizer
    wanted, limit = {}, _max_positions(run.model)
    for L in ruler_lengths(cfg, run.model):
        name = f"{task}@{L}"
        n = cfg.limit or cfg.ruler_samples
        wanted[name] = ({f"{name}-{i}" for i in range(n)}, 1)
        if L > limit:
            errors[name] = (f"length {L} exceeds the model's {limit} positions (config.json field "
                            "max_position_embeddings); lower --max-length")
            print(f"[retention] {name}: skipped: {errors[name]}")
            continue
        todo = [i for i in range(n)[rank::world] if (name, f"{name}-{i}", 0) not in run.done]
        if rank == 0:
            print(f"[retention] {name}: {n} generated items, greedy")
        bar = run.bar(len(todo), name)
        per_batch = max(1, min(cfg.batch_size, (cfg.mc_batch_tokens * 8) // L))
        for start in range(0, len(todo), per_batch):
            items = [ruler_item(task, L, i, tokenizer, seed=cfg.seed, haystack=cfg.haystack, chat=cfg.chat)
                     for i in todo[start:start + per_batch]]
            samples = generate(run.generation_model(), [tokenizer.encode(it["prompt"]) for it in items],
                               max_new_tokens=items[0]["max_new_tokens"], temperature=0.0, top_p=1.0,
                               stop_ids=tokenizer.eos_ids, seed=cfg.seed, progress=False)
            for it, s in zip(items, samples):
                response = tokenizer.decode([t for t in s.tokens if t not in tokenizer.eos_ids])
                run.write({"task": name, "problem_id": it["id"], "sample": 0, "kind": "ruler",
                           "prompt_tokens": it["tokens"], "response": response, "answers": it["answers"],
                           "correct": ruler_score(response, it["answers"])})
            run.sink.flush()
            bar.update(len(items))
        bar.close()
    run.generation = None  # not held through the log-likelihood tasks that follow
    return wanted


def evaluate(cfg: Config, model=None, tokenizer=None) -> dict:
    """Run the suite of cfg.tasks (retention tasks, and reasoning ones through evaluate.py); writes
    samples.jsonl, results.json, results.md into cfg.out; returns the results (rank 0; {} elsewhere)."""
    tasks = expand_tasks(cfg)
    run = E.start_run(cfg, tasks, model, tokenizer, settings_of=task_settings)
    wanted, errors = {}, {}  # result name -> (ids, samples per problem); result name -> error message
    for task in tasks:
        if task in E.TASKS:
            wanted.update(E.run_reasoning_task(task, run))
            continue
        try:
            if task.startswith("ppl:"):
                wanted.update(run_ppl_task(task, run))
            elif task in RULER_TASKS:
                wanted.update(run_ruler_task(task, run, errors))
            else:
                wanted.update(run_mc_task(task, run))
        except DataError as e:  # bad data for this task: say so, record it, go on with the rest
            name = task.split("=", 1)[0]
            errors[name] = str(e)
            print(f"[retention] {name}: error: {e}", file=sys.stderr)
    records = E.finish_run(run, wanted)
    if records is None:
        return {}
    ks = [int(k) for k in cfg.pass_k.split(",") if k.strip()]
    results = E.summarize([r for r in records if "kind" not in r], ks)
    results.update(summarize_retention([r for r in records if "kind" in r]))
    results.update({name: {"error": msg} for name, msg in errors.items()})
    return E.write_results(run, results)


def task_settings(task: str, cfg: Config, tokenizer) -> dict:
    """What shapes a task's records (E.start_run refuses to mix records made with other values): the model and
    seed always; multiple choice: shots; perplexity: the files, window, stride, token cap; long context:
    filler and chat. --mc-batch-tokens only batches the same sums and is left out."""
    if task in E.TASKS:
        return E.reasoning_settings(task, cfg, tokenizer)
    model = Path(cfg.model).expanduser()
    out = {"model": str(model.resolve()) if model.is_dir() else cfg.model, "seed": cfg.seed}
    if task.startswith("ppl:"):
        out.update(source=task.split("=", 1)[1], ppl_window=cfg.ppl_window, ppl_stride=cfg.ppl_stride,
                   ppl_max_tokens=cfg.ppl_max_tokens)
    elif task in RULER_TASKS:
        out.update(haystack=cfg.haystack, chat=cfg.chat)
    else:
        out.update(num_fewshot=cfg.num_fewshot, data=cfg.data, bigbench_archive=cfg.bigbench_archive)
    return out


# ----------------------------------------------------------------------------------------------
# Retention report: the same suite on several checkpoints, side by side
#
#     python retention.py --models base=ckpt/base,mid=ckpt/mid,rl=ckpt/rl,merge=ckpt/merged \
#         --tasks general,bbl,ruler,aime25 --ppl web=data/web/*.bin,code=data/code/*.bin --out out/retention
#
# Each model runs into out/<label>/ (resumable as a single run is); then retention.md, retention.json
# and retention.png in out/ show every score per model with its standard error and the change from the
# first model. The merge of the paper's repair is a folder: analyze.py merge BASE MID --alpha 0.15.

REPORT_GROUPS = ("Reasoning", "General", "Perplexity", "Long context")


def parse_models(text: str) -> list:
    """[(label, path)] from "label=path,..." or bare paths (label = the folder's name, made unique)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, path = item.split("=", 1) if "=" in item else (Path(item.rstrip("/")).name or item, item)
        label, path = label.strip(), path.strip()
        if not label or not path:
            raise DataError(f"--models {item!r}: expected label=path or a path")
        base, k = label, 2
        while label in [x[0] for x in out]:
            label, k = f"{base}-{k}", k + 1
        out.append((label, path))
    if not out:
        raise DataError("--models: no model given")
    return out


def report_group(name: str) -> str:
    if name in E.TASKS or name in E.DOMAINS or name == "AVG":
        return "Reasoning"
    if name.startswith(("ruler_", "RULER@")):
        return "Long context"
    if name in MC_TASKS or name in ("General", "BIG-bench") or name.startswith("bigbench:"):
        return "General"
    return "Perplexity"


def retention_rows(labels: list, results: list) -> list:
    """One row per task present in any model: group, task, metric, per-model {score, se} (or error), and
    the change from the first model."""
    names = []
    for res in results:
        names += [k for k in res if not k.startswith("_") and k not in names]
    rows = []
    for name in names:
        vals = [res.get(name) for res in results]
        ref = vals[0] if vals[0] and "score" in vals[0] else None
        meta = next((v for v in vals if v and "score" in v), {})
        rows.append({
            "group": report_group(name), "task": name,
            "metric": meta.get("metric",
                               "score" if name in E.TASKS or name in E.DOMAINS or name == "AVG" else ""),
            "lower_is_better": bool(meta.get("lower_is_better")),
            "values": [({"score": v["score"], "se": v["se"], "n": v["n"]} if v and "score" in v else
                        {"error": (v or {}).get("error", "not run")}) for v in vals],
            "delta": [(v["score"] - ref["score"] if ref and v and "score" in v else None) for v in vals]})
    order = {g: i for i, g in enumerate(REPORT_GROUPS)}
    return sorted(rows, key=lambda r: order[r["group"]])  # stable: task order kept within a group


def retention_markdown(labels: list, rows: list) -> str:
    head = "| group | task | metric | " + " | ".join(
        f"{lab}" + (f" | Δ {lab}" if i else "") for i, lab in enumerate(labels)) + " |"
    lines = [head, "|---|---|---|" + "---:|" * (2 * len(labels) - 1)]
    for r in rows:
        cells = []
        for i, (v, d) in enumerate(zip(r["values"], r["delta"])):
            digits = 4 if r["lower_is_better"] else 2
            cells.append(f"{v['score']:.{digits}f} ± {v['se']:.{digits}f}" if "score" in v
                         else "error: " + v["error"].replace("|", "/")[:120])
            if i:
                cells.append("" if d is None else f"{d:+.{digits}f}")
        lines.append(f"| {r['group']} | {r['task']} | {r['metric']}"
                     f"{' (lower is better)' if r['lower_is_better'] else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def retention_plot(path: Path, labels: list, rows: list) -> bool:
    """One panel per group, one bar per model and task, standard errors as error bars. False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[retention] matplotlib is not installed: no retention.png (pip install matplotlib)")
        return False
    groups = [g for g in REPORT_GROUPS if any(r["group"] == g for r in rows)]
    fig, axes = plt.subplots(len(groups), 1,
                             figsize=(max(6.0, 0.9 * max(sum(r["group"] == g for r in rows) for g in groups)
                                      * len(labels) ** 0.5 + 2), 3.2 * len(groups)),
                             squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        rs = [r for r in rows if r["group"] == g]
        width = 0.8 / len(labels)
        for m, lab in enumerate(labels):
            xs = [i + (m - (len(labels) - 1) / 2) * width for i in range(len(rs))]
            ys = [r["values"][m].get("score", float("nan")) for r in rs]
            es = [r["values"][m].get("se", 0.0) for r in rs]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=lab)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["task"] for r in rs], rotation=30, ha="right", fontsize=7)
        ax.set_title(g + (" (bits per byte, lower is better)" if g == "Perplexity" else " (score, %)"),
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def retention_report(cfg: Config, load=None) -> dict:
    """Run the suite of cfg on every model of --models; write retention.{md,json,png} into cfg.out.
    `load(label, path) -> (model, tokenizer)` replaces model.load_model / load_tokenizer (tests)."""
    import gc
    from dataclasses import replace
    models = parse_models(cfg.models)
    d = cli.setup_distributed(cfg.device, group_of_one=False)  # one process group for all models
    per = []
    for label, path in models:
        if d.main:
            print(f"[retention] === {label}: {path}")
        sub = replace(cfg, model=path, models="", out=str(Path(cfg.out) / label))
        model, tok = load(label, path) if load else (None, None)
        per.append(evaluate(sub, model, tok))
        del model, tok
        gc.collect()
    if d.own_group:
        import torch.distributed as dist
        dist.destroy_process_group()
    if not d.main:
        return {}
    labels = [m[0] for m in models]
    rows = retention_rows(labels, per)
    out = Path(cfg.out)
    report = {"models": [{"label": lab, "path": p} for lab, p in models], "rows": rows,
              "results": {lab: res for lab, res in zip(labels, per)}, "config": asdict(cfg)}
    (out / "retention.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    table = retention_markdown(labels, rows)
    (out / "retention.md").write_text(table, encoding="utf-8")
    retention_plot(out / "retention.png", labels, rows)
    print(table)
    return report


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> Config:
    presets = "; ".join(f"{name} = {', '.join(t.removeprefix('bigbench:') for t in tasks)}"
                        for name, tasks in PRESETS.items())
    p = argparse.ArgumentParser(description="Retention: log-likelihood multiple choice, BIG-bench, held-out "
                                            "perplexity, long context, and a report of several checkpoints.",
                                epilog=f"--tasks presets: {presets} (BIG-bench tasks run as bigbench:NAME). "
                                       f"evaluate.py tasks: {', '.join(E.TASKS)}.")
    return cli.parse_config(Config, argv, parser=p)[0]


def main(argv=None):
    cfg = cli.run_main(lambda: parse_args(argv), "retention.py")

    def run():
        cfg.check()
        retention_report(cfg) if cfg.models else evaluate(cfg)

    cli.run_main(run, "retention.py", out=cfg.out)


if __name__ == "__main__":
    main()
