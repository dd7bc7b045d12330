"""The PRISM study on one machine, end to end: base -> mid-training (two mixtures) -> GRPO -> evaluation ->
analysis -> REPORT.md, by driving the project's own scripts as a user would.

    python study.py                              # default: SmolLM2-135M-Instruct, ~1 hour on a 2-core CPU
    python study.py --scale tiny --out out/tiny  # a random 2-layer model, every stage in ~2 minutes (CI)
    python study.py --scale gpu --torchrun 8 --model HuggingFaceTB/SmolLM2-1.7B-Instruct   # an 8-GPU node
    python study.py --rl-steps 12                # a changed setting re-runs only the stages it affects

Stages (each a folder under --out with a stage.json of its settings, written last):
  base      the model as given, or (--base-shrink L,H) a random model of L layers and hidden size H made from
            its config, with its tokenizer (the tiny scale)
  data      the demo's real offline text (train_mid.demo_mixture: champ-dataset worked solutions,
            reasoning-gym programs, the standard library) as two mixtures, Math and Math+Code, prepared into
            token shards (their held-out shards are the perplexity sets); the RL task's held-out sums
            (train_rl's demo task); the CKA prompts and the landscape problems
  mid_math, mid_mc     `train_mid.py` on each mixture, the same token budget, HF exports along the way
  rl_base, rl_math, rl_mc   `train_rl.py` (the demo's generated sums) from the base and from each mid model,
            DCP checkpoints every --rl-save-every steps, exported to HF folders for the trajectory
  merge     `analyze.merge`: 0.15 base + 0.85 mid (Math+Code), the paper's repair
  eval      base, mid, RL-from-base, RL-from-mid, merge: the RL task's held-out reward and accuracy
            (`train_rl.evaluate_policy`), then `retention.py --models ...`: BIG-bench multiple choice (a fixed
            list), held-out bits per byte per source, GSM8K (a fixed subset), a short RULER needle task
  analysis  `analyze.run`: weight change and unchanged fractions (fp32 and both checkpoints cast to bf16),
            update cosines, the RL trajectories, linear CKA (mid vs RL, base vs mid), the (a, b) landscape
  report    REPORT.md, results.json and PNGs: one row per finding of the paper with its number, ours and a
            verdict computed from ours
A stage is complete when its stage.json matches the current settings (its own and those of the stages it
depends on); a changed setting re-runs that stage and everything downstream. A killed training stage resumes
from its last checkpoint (its folder keeps stage.pending.json with the settings it was started with).
With --torchrun N the training and evaluation scripts run under `torchrun --standalone --nproc_per_node N`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cli
import model as M

HERE = Path(__file__).resolve().parent


@dataclass
class Config:
    out: str = "out/study"  # study folder: one subfolder per stage, REPORT.md, results.json, PNGs
    scale: str = "default"  # tiny (CI, ~2 min) | default (~1 h, 2 CPUs) | gpu (8 GPUs); presets unset fields
    model: str = M.DEFAULT_MODEL  # base model: folder, hub id, or the built-in SmolLM2-135M-Instruct
    base_shrink: str = ""  # "L,H": random L-layer width-H net, likely EOS, base cfg+tokenizer (tiny); ""=off
    torchrun: int = 0  # N > 0: training and eval scripts run under torchrun --standalone --nproc_per_node N
    device: str = "auto"  # in-process stages (RL-task evaluation, analysis): cpu, cuda, or auto
    mid_steps: int = 20  # mid-training optimizer steps per mixture (the same token budget for both)
    mid_seq_len: int = 256  # mid-training tokens per sequence
    mid_batch_size: int = 2  # mid-training sequences per rank per step
    mid_lr: float = 1e-4  # mid-training peak learning rate
    mid_warmup: int = 4  # mid-training warmup steps
    mid_export_every: int = 10  # steps between mid-training HF exports (interim checkpoints); 0 = end only
    mid_args: str = ""  # extra train_mid.py flags, e.g. "--param-dtype bfloat16"
    rl_steps: int = 6  # GRPO steps per run
    rl_save_every: int = 2  # steps between RL checkpoints (the trajectory)
    rl_group_size: int = 8  # GRPO responses per prompt
    rl_prompts_per_step: int = 4  # GRPO prompts per step
    rl_max_new_tokens: int = 24  # GRPO response length limit
    rl_lr: float = 2e-5  # GRPO learning rate
    rl_args: str = ""  # extra train_rl.py flags, e.g. "--beta 0.0"
    merge_alpha: float = 0.15  # merge: alpha x base + (1 - alpha) x mid (paper: 0.15)
    eval_bigbench: str = "code_line_description,conceptual_combinations,strategyqa,winowhy"  # BIG-bench tasks
    eval_mc_limit: int = 40  # items per BIG-bench task
    eval_gsm8k: int = 10  # GSM8K problems (the first N of the test set)
    eval_max_new_tokens: int = 160  # GSM8K new tokens per answer
    eval_ruler_items: int = 6  # RULER single-needle items
    eval_ruler_length: int = 1024  # RULER context length in tokens
    eval_ppl_tokens: int = 8192  # held-out tokens per perplexity source
    eval_rl_samples: int = 2  # responses per held-out RL prompt
    cka_prompts: int = 48  # CKA prompts (math, code and RL-task text)
    cka_max_tokens: int = 128  # CKA tokens per prompt
    cka_bootstrap: int = 20  # CKA bootstrap resamples
    landscape_grid: int = 3  # landscape points per axis
    landscape_problems: int = 16  # landscape problems (held-out sums)
    landscape_max_new_tokens: int = 32  # landscape new tokens per answer
    keep_checkpoints: bool = False  # keep the DCP checkpoints and bf16 copies after their stage is complete


SCALES = {  # what each --scale sets (fields given on the command line win)
    "default": {},
    "tiny": dict(base_shrink="2,64", mid_steps=2, mid_seq_len=64, mid_batch_size=2, mid_warmup=0,
                 mid_export_every=1, rl_steps=2, rl_save_every=1, rl_group_size=4, rl_prompts_per_step=2,
                 rl_max_new_tokens=8, rl_lr=1e-3,
                 # a random model never answers nor writes the format, so its graded reward never varies:
                 # keep every group (the stop penalty varies) so the RL stages really update
                 rl_args="--demo-eval 4 --drop-zero-variance false",
                 eval_bigbench="strategyqa", eval_mc_limit=4, eval_gsm8k=2, eval_max_new_tokens=8,
                 eval_ruler_items=1, eval_ruler_length=256, eval_ppl_tokens=512, eval_rl_samples=1,
                 cka_prompts=6, cka_max_tokens=16, cka_bootstrap=3, landscape_grid=2, landscape_problems=2,
                 landscape_max_new_tokens=4),
    # the paper's recipe scaled to a 1B-3B model on one 8-GPU node (use with --torchrun 8 --model ...)
    "gpu": dict(mid_steps=2000, mid_seq_len=4096, mid_batch_size=4, mid_lr=5e-5, mid_warmup=100,
                mid_export_every=500, mid_args="--grad-accum 4 --activation-checkpointing block",
                rl_steps=200, rl_save_every=20, rl_group_size=16, rl_prompts_per_step=64,
                rl_max_new_tokens=512, rl_lr=1e-6, rl_args="--demo-max 200 --demo-eval 256",
                eval_bigbench=",".join(
                    ["code_line_description", "conceptual_combinations", "strategyqa", "winowhy",
                     "logical_deduction", "known_unknowns", "novel_concepts", "vitaminc_fact_verification"]),
                eval_mc_limit=500, eval_gsm8k=500, eval_max_new_tokens=1024, eval_ruler_items=50,
                eval_ruler_length=16384, eval_ppl_tokens=262144, eval_rl_samples=8, cka_prompts=600,
                cka_max_tokens=256, landscape_grid=5, landscape_problems=200, landscape_max_new_tokens=512),
}

# stage -> (the stages it reads, the Config fields that shape it, a rough share of the default's time)
STAGES = {
    "base": ((), ("model", "base_shrink"), 0.01),
    "data": (("base",), ("rl_args", "cka_prompts", "landscape_problems"), 0.02),
    "mid_math": (("base", "data"), ("mid_steps", "mid_seq_len", "mid_batch_size", "mid_lr", "mid_warmup",
                                    "mid_export_every", "mid_args"), 0.09),
    "mid_mc": (("base", "data"), ("mid_steps", "mid_seq_len", "mid_batch_size", "mid_lr", "mid_warmup",
                                  "mid_export_every", "mid_args"), 0.09),
    "rl_base": (("base",), RL_FIELDS := ("rl_steps", "rl_save_every", "rl_group_size", "rl_prompts_per_step",
                                         "rl_max_new_tokens", "rl_lr", "rl_args"), 0.16),
    "rl_math": (("mid_math",), RL_FIELDS, 0.16),
    "rl_mc": (("mid_mc",), RL_FIELDS, 0.16),
    "merge": (("base", "mid_mc"), ("merge_alpha",), 0.01),
    "eval": (("data", "base", "mid_mc", "rl_base", "rl_mc", "merge"),
             ("eval_bigbench", "eval_mc_limit", "eval_gsm8k", "eval_max_new_tokens", "eval_ruler_items",
              "eval_ruler_length", "eval_ppl_tokens", "eval_rl_samples", "rl_max_new_tokens",
              "rl_args"), 0.22),
    "analysis": (("data", "base", "mid_math", "mid_mc", "rl_base", "rl_math", "rl_mc"),
                 ("cka_prompts", "cka_max_tokens", "cka_bootstrap", "landscape_grid", "landscape_problems",
                  "landscape_max_new_tokens"), 0.08),
    "report": (("eval", "analysis"), (), 0.0),
}


class StudyError(RuntimeError):
    """A stage failed: its own error is printed above; the message says how to resume."""


def log(msg: str):
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping: settings, completeness, staleness


def stage_settings(name: str, cfg: Config) -> dict:
    """A stage's own settings and, recursively, those of the stages it reads
    (so a change upstream is seen)."""
    deps, fields, _ = STAGES[name]
    own = {f: getattr(cfg, f) for f in fields}
    return json.loads(json.dumps({"stage": name, "settings": own,
                                  "inputs": {d: stage_settings(d, cfg) for d in deps}}, sort_keys=True))


def dependents(name: str) -> list:
    """Every stage downstream of `name`."""
    out = []
    for s, (deps, _, _) in STAGES.items():
        if name in deps:
            out += [s] + [x for x in dependents(s) if x not in out]
    return list(dict.fromkeys(out))


def stage_done(out: Path, name: str, cfg: Config) -> dict | None:
    f = out / name / "stage.json"
    if not f.is_file():
        return None
    rec = cli.read_json(f)
    return rec if rec.get("settings") == stage_settings(name, cfg) else None


def resume_command(argv: list) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, str(HERE / "study.py"), *argv])


def run_script(script: str, args: list, cfg: Config, logfile: Path, *, distributed: bool = True):
    """A project script as a user runs it (under torchrun when asked); its output goes to logfile. On failure
    the log's last lines are printed and StudyError raised."""
    prefix = ([shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={cfg.torchrun}"]
              if cfg.torchrun > 0 and distributed else [sys.executable])
    cmd = prefix + [str(HERE / script)] + [str(a) for a in args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # a fresh process group
        env.pop(k, None)
    with open(logfile, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=HERE, env=env)
    if rc != 0:
        tail = logfile.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise StudyError(f"{script} exited with code {rc} (full log: {logfile})")


# ----------------------------------------------------------------------------------------------
# Stages: each takes (cfg, its folder, whether to resume, the results of earlier stages) -> a small result


def stage_base(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
    src = M.resolve_model_path(cfg.model)
    if not cfg.base_shrink:
        return {"path": str(src)}
    import torch
    try:
        layers, hidden = (int(x) for x in cfg.base_shrink.split(","))
    except ValueError:
        raise cli.DataError(f"--base-shrink {cfg.base_shrink!r}: "
                            "expected L,H (layers, hidden size)") from None
    raw = cli.read_json(src / "config.json")
    heads = max(1, hidden // 16)
    raw.update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=16,
               max_position_embeddings=1024)
    torch.manual_seed(0)
    net = M.CausalLM(M.config_from_hf(raw))
    for p in net.parameters():  # small random weights: the model is random, but its logits are tame
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    # a long EOS embedding (tied to the head) makes stopping likely at some positions and not others, so
    # GRPO's stop penalty varies within a group and RL makes real updates even though nothing is ever correct
    emb = net.model.embed_tokens.weight
    with torch.no_grad():
        for i in M.load_tokenizer(src).eos_ids:
            v = torch.randn(emb.shape[1])
            emb[i] = 7.0 * v / v.norm()
    M.save_model(net.float(), folder / "hf", tokenizer_from=src)
    return {"path": str(folder / "hf"), "shrunk_from": str(src)}


def stage_data(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
    import train_mid as T
    import train_rl as R
    demo = T.demo_mixture(folder / "demo")  # math.jsonl, code.jsonl, stdlib/*.py and their mixture
    mixes = {"math": '[sources.math]\npath = "demo/math.jsonl"\nformat = "qa"\nweight = 1.0\n',
             "mc": '[sources.math]\npath = "demo/math.jsonl"\nformat = "qa"\nweight = 0.6\n'
                   '[sources.code]\npath = "demo/code.jsonl"\nweight = 0.25\n'
                   '[sources.stdlib]\npath = "demo/stdlib/*.py"\nweight = 0.15\n'}
    for k, text in mixes.items():
        (folder / f"{k}.toml").write_text(text, encoding="utf-8")
    base = res["base"]["path"]
    sources, prepared = T.prepare(T.Config(model=base, data=str(folder / "mc.toml"), out=str(folder),
                                           progress=False))
    ppl = {s.name: str(p / "heldout.bin") for s, p in zip(sources, prepared) if (p / "heldout.bin").is_file()}
    rcfg = rl_config(cfg)
    _, heldout = R.arithmetic_problems(rcfg.demo_max, rcfg.demo_eval, rcfg.seed)
    with open(folder / "landscape.jsonl", "w", encoding="utf-8") as fh:
        for p in heldout[:cfg.landscape_problems]:
            fh.write(json.dumps({"problem": p["prompt"], "answer": p["answer"]}) + "\n")
    math_q = [r["question"] for r in cli.read_jsonl(demo.parent / "math.jsonl")]
    code = [r["text"] for r in cli.read_jsonl(demo.parent / "code.jsonl")]
    texts = [t for trio in zip(math_q, code, [p["prompt"] for p in heldout * 4])
             for t in trio][:cfg.cka_prompts]
    with open(folder / "cka.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return {"mixtures": {k: str(folder / f"{k}.toml") for k in mixes}, "ppl": ppl,
            "landscape": str(folder / "landscape.jsonl"), "cka": str(folder / "cka.jsonl"),
            "rl_heldout": len(heldout), "demo": str(demo.parent)}


def _stage_mid(mixture: str):
    def run(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
        args = ["--model", res["base"]["path"], "--data", res["data"]["mixtures"][mixture], "--out", folder,
                "--steps", cfg.mid_steps, "--seq-len", cfg.mid_seq_len, "--batch-size", cfg.mid_batch_size,
                "--lr", cfg.mid_lr, "--warmup", cfg.mid_warmup, "--export-every", cfg.mid_export_every,
                "--save-every", cfg.mid_export_every, "--eval-every", cfg.mid_export_every or cfg.mid_steps,
                "--progress", "false", "--resume", "true" if resume else "false", *shlex.split(cfg.mid_args)]
        run_script("train_mid.py", args, cfg, folder / "log.txt")
        if not cfg.keep_checkpoints:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        evals = cli.read_jsonl(folder / "eval.jsonl") if (folder / "eval.jsonl").is_file() else []
        return {"path": str(folder / "hf"), "exports": sorted(str(p) for p in folder.glob("hf-step*")),
                "heldout_first": evals[0] if evals else None, "heldout_last": evals[-1] if evals else None}
    return run


def rl_config(cfg: Config, **over):
    """train_rl's Config as the study runs it (its own defaults + the study's flags), for in-process use."""
    import train_rl as R
    flags = ["--steps", cfg.rl_steps, "--group-size", cfg.rl_group_size, "--prompts-per-step",
             cfg.rl_prompts_per_step, "--max-new-tokens", cfg.rl_max_new_tokens, "--lr", cfg.rl_lr,
             *shlex.split(cfg.rl_args)]
    rcfg, _ = cli.parse_config(R.Config, [str(x) for x in flags])
    return dataclasses.replace(rcfg, **over)


def export_dcp(ckpt: Path, start: str, out: Path):
    """A train_rl DCP checkpoint's policy weights -> an HF folder (the start model's config and tokenizer)."""
    import torch
    import torch.distributed.checkpoint as dcp
    net = M.load_model(start, device="cpu", dtype=torch.float32)
    state = {"model": net.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))  # no process group: DCP reads every shard into the full tensors
    net.load_state_dict(state["model"])
    M.save_model(net, out, tokenizer_from=start)


def _stage_rl(start_stage: str):
    def run(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
        start = res[start_stage]["path"]
        args = ["--model", start, "--out", folder, "--steps", cfg.rl_steps, "--save-every", cfg.rl_save_every,
                "--keep-checkpoints", cfg.rl_steps + 1, "--group-size", cfg.rl_group_size,
                "--prompts-per-step", cfg.rl_prompts_per_step, "--max-new-tokens", cfg.rl_max_new_tokens,
                "--lr", cfg.rl_lr, "--resume", "true" if resume else "false", *shlex.split(cfg.rl_args)]
        run_script("train_rl.py", args, cfg, folder / "log.txt")
        steps = []
        for ck in sorted((folder / "checkpoints").glob("step_*")):
            if ck.name.endswith(".tmp") or not (ck / "extra.json").is_file():
                continue
            step = int(cli.read_json(ck / "extra.json")["step"])
            dest = folder / "steps" / f"step_{step:06d}"
            if not (dest / "config.json").is_file():
                export_dcp(ck, start, dest)
            steps.append({"step": step, "path": str(dest)})
        if not cfg.keep_checkpoints:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        metrics = cli.read_jsonl(folder / "metrics.jsonl")
        return {"path": str(folder / "hf"), "start": start, "steps": steps,
                "train_reward": [m["reward"] for m in metrics], "trained": [m["trained"] for m in metrics]}
    return run


def stage_merge(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
    import analyze as A
    path = A.merge(res["base"]["path"], res["mid_mc"]["path"], cfg.merge_alpha, folder / "hf")
    return {"path": str(path)}


EVAL_MODELS = (("base", "base"), ("mid", "mid_mc"), ("rl_base", "rl_base"), ("rl_mid", "rl_mc"),
               ("merge", "merge"))  # (label in the table, the stage that made it)


def stage_eval(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
    import torch
    import train_rl as R
    models = [(label, res[stage]["path"]) for label, stage in EVAL_MODELS]
    rcfg = rl_config(cfg, eval_samples=cfg.eval_rl_samples, progress=False)
    _, heldout = R.arithmetic_problems(rcfg.demo_max, rcfg.demo_eval, rcfg.seed)
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if cfg.device == "auto" else cfg.device)
    rl_task = {}
    # the RL task's held-out prompts, the seed train_rl uses for its own before/after
    for label, path in models:
        net = M.load_model(path, device=device, dtype=torch.float32)
        r = R.evaluate_policy(net, M.load_tokenizer(path), heldout, rcfg, seed=rcfg.seed + 99991)
        n = max(r["n"], 1)
        rl_task[label] = {k: r[k] for k in ("reward", "accuracy", "format", "response_len", "n")}
        rl_task[label]["accuracy_se"] = math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n)
        log(f"  eval {label}: RL-task held-out reward {r['reward']:.3f} accuracy {r['accuracy']:.3f}")
        del net
    cli.write_json(folder / "rl_task.json", rl_task)
    spec = ",".join(f"{lab}={p}" for lab, p in models)
    general = ["--models", spec,
               "--tasks", ",".join(f"bigbench:{t}" for t in cfg.eval_bigbench.split(",") if t),
               "--ppl", ",".join(f"{k}={v}" for k, v in res["data"]["ppl"].items()),
               "--limit", cfg.eval_mc_limit,
               "--ppl-max-tokens", cfg.eval_ppl_tokens, "--progress", "false", "--out", folder / "general"]
    run_script("retention.py", general, cfg, folder / "log.txt")
    reasoning = ["--models", spec, "--tasks", "gsm8k,ruler_niah_single", "--limit", cfg.eval_gsm8k,
                 "--ruler-samples", cfg.eval_ruler_items, "--max-length", cfg.eval_ruler_length,
                 "--max-new-tokens", cfg.eval_max_new_tokens, "--offline", "true", "--progress", "false",
                 "--out", folder / "reasoning"]
    run_script("retention.py", reasoning, cfg, folder / "log.txt")
    return {"models": dict(models), "rl_task": rl_task,
            "retention": [str(folder / sub / "retention.json") for sub in ("general", "reasoning")]}


def stage_analysis(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
    import analyze as A
    P = {s: res[s]["path"] for s in ("base", "mid_math", "mid_mc", "rl_base", "rl_math", "rl_mc")}
    acfg = A.Config(progress=False, device=cfg.device)

    def run(command, paths, sub, **over):
        return A.run(dataclasses.replace(acfg, out=str(folder / sub), **over), command,
                     [str(p) for p in paths])

    tmp = folder / "tmp"
    bf16 = {}  # every checkpoint cast to bf16 by analyze's own merge (alpha 1: A itself, in --merge-dtype)
    for s, p in P.items():
        bf16[s] = A.merge(p, p, 1.0, tmp / f"{s}_bf16", dtype="bfloat16")
    pairs = {"base->mid_mc": ("base", "mid_mc"), "mid_mc->rl_mc": ("mid_mc", "rl_mc"),
             "base->rl_base": ("base", "rl_base"), "base->mid_math": ("base", "mid_math"),
             "mid_math->rl_math": ("mid_math", "rl_math")}
    weights = {}
    for key, (a, b) in pairs.items():
        sub = key.replace("->", "_to_")
        weights[key] = {"fp32": _change_summary(run("weights", [P[a], P[b]], f"weights/{sub}")),
                        "bf16": _change_summary(run("weights", [bf16[a], bf16[b]], f"weights/{sub}_bf16"))}
    sim_mid = run("similarity", [P["base"], P["mid_math"], P["mid_mc"]], "similarity/mid_math_vs_mid_mc")
    # RL-from-base vs RL-from-mid updates start from different weights; halfway merges put both on one base:
    # (rl_base + mid)/2 - (base + mid)/2 = (rl_base - base)/2,
    # (base + rl_mc)/2 - (base + mid)/2 = (rl_mc - mid)/2
    h0 = A.merge(P["base"], P["mid_mc"], 0.5, tmp / "half_base_mid")
    h1 = A.merge(P["rl_base"], P["mid_mc"], 0.5, tmp / "half_rlbase_mid")
    h2 = A.merge(P["base"], P["rl_mc"], 0.5, tmp / "half_base_rlmc")
    sim_rl = run("similarity", [h0, h1, h2], "similarity/rl_base_vs_rl_mc",
                 labels="base+mid,rl_base+mid,base+rl_mc")
    traj = {}
    for rl, start in (("rl_mc", "mid_mc"), ("rl_base", "base"), ("rl_math", "mid_math")):
        steps = res[rl]["steps"]
        if steps:
            t = run("trajectory", [P[start]] + [s["path"] for s in steps], f"trajectory/{rl}",
                    steps=",".join(str(s["step"]) for s in steps))
            traj[rl] = [{"step": r["step"], "rel_change": r["rel_change"],
                         "changed": {str(k): 1 - v for k, v in r["unchanged"].items()}}
                        for r in t["checkpoints"]]
    n_cka = len(cli.read_jsonl(res["data"]["cka"]))
    cka_over = dict(data=res["data"]["cka"], max_tokens=cfg.cka_max_tokens, bootstrap=cfg.cka_bootstrap,
                    bootstrap_size=min(100, n_cka))
    cka = {"mid_vs_rl": run("cka", [P["mid_mc"], P["rl_mc"]], "cka/mid_vs_rl", **cka_over)["summary"],
           "base_vs_mid": run("cka", [P["base"], P["mid_mc"]], "cka/base_vs_mid", **cka_over)["summary"]}
    land = run("landscape", [P["base"], P["mid_mc"], P["rl_mc"]], "landscape", data=res["data"]["landscape"],
               grid=cfg.landscape_grid, max_new_tokens=cfg.landscape_max_new_tokens, batch_size=16)
    if not cfg.keep_checkpoints:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"weights": weights,
              "similarity": {"mid_math_vs_mid_mc": _sim_summary(sim_mid),
                             "rl_base_vs_rl_mc": _sim_summary(sim_rl)},
              "trajectory": traj, "cka": cka,
              "landscape": {"a": land["a"], "b": land["b"], "pass_rate": land["pass_rate"]}}
    cli.write_json(folder / "analysis.json", result)
    return {"summary": str(folder / "analysis.json")}


def _change_summary(res: dict) -> dict:
    """The headline numbers of analyze.weight_change: total and per component (changed = 1 - unchanged)."""
    def one(s):
        return {"rel_change": s["rel_change"], "changed": {str(t): 1 - u for t, u in s["unchanged"].items()},
                "numel": s["numel"]}
    return {"total": one(res["total"]), "components": {c: one(s) for c, s in res["components"].items()}}


def _sim_summary(res: dict) -> dict:
    return {"total": res["total"]["cosine"],
            "components": {c: s["cosine"] for c, s in res["components"].items()}}


# ----------------------------------------------------------------------------------------------
# The report: the paper's findings against ours, verdicts computed from the numbers

LINEAR = ("q", "k", "v", "o", "gate", "up", "down")  # the components whose ranking the paper reports
HOLDS, FAILS, UNMEASURABLE = "holds", "does not hold", "not measurable at this scale"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    gpu = (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "")
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def _value(rows: list, task: str, k: int):
    """(score, se) of model k on a task row, or None."""
    for r in rows:
        if r["task"] == task and "score" in r["values"][k]:
            return r["values"][k]["score"], r["values"][k]["se"]
    return None


def _mean_rows(rows: list, tasks: list, k: int):
    vals = [_value(rows, t, k) for t in tasks]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return sum(v[0] for v in vals) / len(vals), math.sqrt(sum(v[1] ** 2 for v in vals)) / len(vals)


def _delta(a, b):
    """b - a and its standard error (independent errors: conservative for the paired items used here)."""
    return (b[0] - a[0], math.sqrt(a[1] ** 2 + b[1] ** 2)) if a and b else None


def _sig(d, z=2.0) -> int:
    """+1 / -1 when a difference is more than z standard errors from 0, else 0."""
    if d is None:
        return 0
    return (d[0] > z * d[1]) - (d[0] < -z * d[1]) if d[1] > 0 else (d[0] > 0) - (d[0] < 0)


def _pct(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def findings(ev: dict, an: dict, rows: list, labels: list, cfg: Config) -> list:
    """One record per finding of the paper: paper's number, ours, verdict, note."""
    ix = {lab: i for i, lab in enumerate(labels)}
    acc = {lab: (100 * v["accuracy"], 100 * v["accuracy_se"]) for lab, v in ev["rl_task"].items()}
    bb_tasks = [f"bigbench:{t}" for t in cfg.eval_bigbench.split(",") if t]
    out = []

    gsm = [_value(rows, "gsm8k", ix[l]) for l in ("base", "mid")]
    bb = [_mean_rows(rows, bb_tasks, ix[l]) for l in ("base", "mid")]
    mbpb = [_value(rows, "ppl:math", ix[l]) for l in ("base", "mid")]
    d_gsm, d_bb, d_bpb = _delta(*gsm), _delta(*bb), _delta(*mbpb)
    lift, kept = _sig(d_gsm), _sig(d_bb)
    verdict = HOLDS if lift > 0 and kept >= 0 else FAILS if lift < 0 or kept < 0 else UNMEASURABLE
    ours = (f"GSM8K {_fmt2(gsm[0])} -> {_fmt2(gsm[1])} ({_fmtd(d_gsm)}); BIG-bench mean {_fmt2(bb[0])} -> "
            f"{_fmt2(bb[1])} ({_fmtd(d_bb)}); "
            f"math held-out bits/byte {_fmt2(mbpb[0], 3)} -> {_fmt2(mbpb[1], 3)}")
    out.append({"finding": "Mid-training lifts reasoning while keeping general ability",
                "paper": "+15..+40 points math, +5..+12 code, +6..+13 science; general ability kept",
                "ours": ours, "verdict": verdict,
                "note": "GSM8K is the reasoning score (2 SE rule); "
                        "math bits/byte shows the mixture was learned"
                        + ("" if _sig(d_bpb) < 0 else "; note: math bits/byte did not fall significantly")})

    g_base, g_mid = _delta(acc["base"], acc["rl_base"]), _delta(acc["mid"], acc["rl_mid"])
    final = _delta(acc["rl_base"], acc["rl_mid"])
    s = _sig(final)
    out.append({"finding": "RL from the base moves little; RL after mid-training moves more",
                "paper": "base -> RL: AIME ~0; base -> mid -> RL: AVG 29-42 (from < 12)",
                "ours": (f"RL-task held-out accuracy: base {_fmt2(acc['base'])} "
                         f"-> RL {_fmt2(acc['rl_base'])} "
                         f"({_fmtd(g_base)}); mid {_fmt2(acc['mid'])} -> RL {_fmt2(acc['rl_mid'])} "
                         f"({_fmtd(g_mid)})"),
                "verdict": HOLDS if s > 0 else FAILS if s < 0 else UNMEASURABLE,
                "note": "verdict on the final accuracies RL-from-mid vs RL-from-base (2 SE)"})

    w = an["weights"]
    mid_c = w["base->mid_mc"]["fp32"]["total"]["changed"].get("0.01")
    rl_c = w["mid_mc->rl_mc"]["fp32"]["total"]["changed"].get("0.01")
    mid_b = w["base->mid_mc"]["bf16"]["total"]["changed"].get("0.01")
    rl_b = w["mid_mc->rl_mc"]["bf16"]["total"]["changed"].get("0.01")
    holds = mid_c is not None and rl_c is not None and mid_c >= 0.5 and rl_c <= 0.2
    out.append({"finding": "Mid-training rewrites most weights, RL changes few",
                "paper": "changed by >= 1%: base -> mid 90.7%, mid -> RL 4.1% (Granite-3.3)",
                "ours": f"changed by >= 1%: base -> mid {_pct(mid_c)}, mid -> RL {_pct(rl_c)} (fp32); "
                        f"{_pct(mid_b)} and {_pct(rl_b)} after casting both checkpoints to bf16",
                "verdict": HOLDS if holds else FAILS,
                "note": "holds = mid >= 50% and RL <= 20% changed in fp32; "
                        "RL here is a few steps at a larger lr"})

    traj = an["trajectory"].get("rl_mc") or []
    front = None
    if len(traj) >= 2 and traj[-1]["changed"].get("0.01"):
        early = [t for t in traj if t["step"] <= 0.4 * traj[-1]["step"]] or traj[:1]
        front = early[-1]["changed"]["0.01"] / traj[-1]["changed"]["0.01"]
    out.append({"finding": "RL's changes are front-loaded",
                "paper": "changed set 1.5% at step 20 -> 5-6% at step 960, mostly in the first 200-400 steps",
                "ours": ("changed by >= 1% along RL-from-mid: " + ", ".join(
                    f"step {t['step']} {_pct(t['changed'].get('0.01'))}" for t in traj)
                    + (f"; by {early[-1]['step']}/{traj[-1]['step']} steps "
                       f"{100 * front:.0f}% of the final set"
                       if front is not None else "")),
                "verdict": UNMEASURABLE if front is None else HOLDS if front >= 0.5 else FAILS,
                "note": "holds = at least half the final changed set within the first 40% of the steps"})

    comps = w["mid_mc->rl_mc"]["fp32"]["components"]
    ranked = sorted((c for c in LINEAR if c in comps and comps[c]["rel_change"] is not None),
                    key=lambda c: -comps[c]["rel_change"])
    top = ranked[:2]
    out.append({"finding": "In RL, the V and O projections move most",
                "paper": "V and O move most (Mamba A and dt barely)",
                "ours": "relative change mid -> RL by component: " + ", ".join(
                    f"{c} {comps[c]['rel_change']:.2e}" for c in ranked),
                "verdict": UNMEASURABLE if not ranked or comps[ranked[0]]["rel_change"] == 0 else
                HOLDS if set(top) == {"v", "o"} else FAILS,
                "note": "holds = v and o are the two largest relative changes among q k v o gate up down"})

    ck = an["cka"]
    m = ck["mid_vs_rl"]["min_cka"]
    out.append({"finding": "Representations barely move in RL: CKA mid vs RL near 1",
                "paper": "min over layers >= 0.9993 (> 0.998 everywhere)",
                "ours": f"min over layers mid vs RL {m:.5f} (layer {ck['mid_vs_rl']['min_layer']}); "
                        f"base vs mid {ck['base_vs_mid']['min_cka']:.5f}",
                "verdict": (UNMEASURABLE if m is None or not math.isfinite(m)
                            else HOLDS if m >= 0.998 else FAILS),
                "note": f"{ck['mid_vs_rl']['prompts']} prompts (math, code, RL task), mean-pooled; "
                        "holds = >= 0.998"})

    general = [r["task"] for r in rows if r["group"] in ("General", "Long context")]
    costs, repairs = [], []
    for t in general:
        b, mi, me = (_value(rows, t, ix[l]) for l in ("base", "mid", "merge"))
        d = _delta(b, mi)
        if d and _sig(d) < 0:  # mid-training cost something significant here
            costs.append(t)
            repairs.append((me[0] - mi[0]) / (b[0] - mi[0]) if me else 0.0)
    rep = sum(repairs) / len(repairs) if repairs else None
    out.append({"finding": "The 0.15 base / 0.85 mid merge repairs what mid-training cost",
                "paper": "RULER@128k 59 -> 6 after mid-training; "
                         "repaired by the merge (or long-context steps)",
                "ours": (f"significant costs of mid-training: {', '.join(costs)}; the merge recovers "
                         f"{100 * rep:.0f}% of them on average" if costs else
                         "mid-training cost nothing significant on " + ", ".join(general)),
                "verdict": UNMEASURABLE if rep is None else HOLDS if rep >= 0.5 else FAILS,
                "note": "costs = General and Long-context rows where mid < base by > 2 SE; "
                        "holds = >= 50% recovered"})
    return out


def _fmt2(v, digits=1) -> str:
    return "n/a" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _fmtd(d) -> str:
    return "n/a" if d is None else f"{d[0]:+.1f} ± {d[1]:.1f}"


def _save(fig, titled, what: str, stamp: str, path: Path) -> str:
    """Title `titled` (the figure, or its one axes) with the machine and date, lay out, write, close."""
    import matplotlib.pyplot as plt
    (titled.suptitle if hasattr(titled, "suptitle") else titled.set_title)(f"{what}\n{stamp}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(out: Path, labels: list, rows: list, an: dict, cfg: Config, stamp: str) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no figures")
        return []
    written = []
    bb_tasks = [f"bigbench:{t}" for t in cfg.eval_bigbench.split(",") if t]
    panels = [("RL task accuracy (%)", lambda k: _value(rows, "rl_task", k)),
              ("GSM8K (%)", lambda k: _value(rows, "gsm8k", k)),
              ("BIG-bench mean (%)", lambda k: _mean_rows(rows, bb_tasks, k)),
              ("RULER needle (%)", lambda k: _value(rows, next((r["task"] for r in rows
                                                                if r["task"].startswith("ruler_")), ""), k))]
    ppl = [r["task"] for r in rows if r["task"].startswith("ppl:")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(16, 3.8))
    for ax, (name, get) in zip(axes, panels):
        vals = [get(k) for k in range(len(labels))]
        ax.bar(labels, [v[0] if v else float("nan") for v in vals], yerr=[v[1] if v else 0 for v in vals],
               capsize=3)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax, width = axes[-1], 0.8 / max(1, len(ppl))
    for j, t in enumerate(ppl):
        vals = [_value(rows, t, k) for k in range(len(labels))]
        ax.bar([i + (j - (len(ppl) - 1) / 2) * width for i in range(len(labels))],
               [v[0] if v else float("nan") for v in vals], width, label=t[4:])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, fontsize=7)
    ax.set_title("held-out bits/byte (lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    written.append(_save(fig, fig, "PRISM study: retention (mean ± SE)", stamp, out / "headline.png"))

    pairs = [p for p in ("base->mid_mc", "mid_mc->rl_mc", "base->rl_base") if p in an["weights"]]
    comps = [c for c in LINEAR + ("embed", "input_norm", "post_norm", "final_norm")
             if c in an["weights"][pairs[0]]["fp32"]["components"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), sharey=True)
    for ax, dt in zip(axes, ("fp32", "bf16")):
        width = 0.8 / len(pairs)
        for j, p in enumerate(pairs):
            cs = an["weights"][p][dt]["components"]
            ax.bar([i + (j - (len(pairs) - 1) / 2) * width for i in range(len(comps))],
                   [cs[c]["changed"].get("0.01", float("nan")) for c in comps], width, label=p)
        ax.set_xticks(range(len(comps)))
        ax.set_xticklabels(comps, rotation=30, fontsize=7)
        ax.set_title(f"share of elements changed by >= 1% ({dt} weights)", fontsize=9)
        ax.legend(fontsize=7)
    written.append(_save(fig, fig, "PRISM study: weight change by component", stamp, out / "weights.png"))

    if an["trajectory"]:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for rl, traj in an["trajectory"].items():
            for t, style in (("0.01", "-o"), ("0.001", "--x")):
                ax.plot([r["step"] for r in traj], [r["changed"].get(t) for r in traj], style,
                        label=f"{rl}: >= {100 * float(t):g}%")
        ax.set_xlabel("RL step")
        ax.set_ylabel("share of elements changed (fp32)")
        ax.legend(fontsize=7)
        written.append(_save(fig, ax, "PRISM study: RL trajectory of the changed fraction", stamp,
                             out / "trajectory.png"))
    return written


def stage_report(cfg: Config, folder: Path, resume: bool, res: dict) -> dict:
    import analyze as A
    import retention as R
    out = Path(cfg.out)
    ev, an = res["eval"], cli.read_json(res["analysis"]["summary"])
    labels = [lab for lab, _ in EVAL_MODELS]
    per = {lab: {} for lab in labels}
    for f in ev["retention"]:
        for lab, r in cli.read_json(f)["results"].items():
            per[lab].update(r)
    # the RL task as one more row of the table, in percent like the others
    for lab, v in ev["rl_task"].items():
        per[lab]["rl_task"] = {"score": 100 * v["accuracy"], "se": 100 * v["accuracy_se"], "n": v["n"],
                               "metric": "accuracy (held-out sums)"}
    rows = R.retention_rows(labels, [per[lab] for lab in labels])
    rows = [r for r in rows if r["task"] == "rl_task"] + [r for r in rows if r["task"] != "rl_task"]
    for r in rows:
        if r["task"] == "rl_task":
            r["group"] = "Reasoning"
    now = datetime.datetime.now()
    hw = machine()
    stamp = f"{hw}; {now:%Y-%m-%d}; --scale {cfg.scale}"
    fs = findings(ev, an, rows, labels, cfg)
    figs = plots(out, labels, rows, an, cfg, stamp)
    R.retention_plot(out / "retention.png", labels, rows)
    seconds = {s: cli.read_json(out / s / "stage.json")["seconds"] for s in STAGES
               if s != "report" and (out / s / "stage.json").is_file()}
    A.write_json(out / "results.json", {
        "machine": hw, "date": now.isoformat(timespec="seconds"), "config": asdict(cfg),
        "stage_seconds": seconds, "findings": fs, "rl_task": ev["rl_task"], "retention_rows": rows,
        "analysis": an, "models": ev["models"]})

    w = an["weights"]
    lines = [f"# The PRISM study at `--scale {cfg.scale}`", "",
             f"Machine: {hw}. Date: {now:%Y-%m-%d %H:%M}. Base model: `{cfg.model}`"
             + (f" shrunk to a random {cfg.base_shrink} (layers, hidden) model" if cfg.base_shrink else "")
             + f". Stage time in all: {_hms(sum(seconds.values()))} ("
             + ", ".join(f"{s} {_hms(t)}" for s, t in seconds.items()) + ").", "",
             f"Command: `python study.py --scale {cfg.scale}` (settings in `results.json`). Mid-training: "
             f"{cfg.mid_steps} steps x {cfg.mid_batch_size} x {cfg.mid_seq_len} tokens per mixture (Math; "
             f"Math+Code = 0.6 math, 0.25 code, 0.15 stdlib). GRPO: {cfg.rl_steps} steps x "
             f"{cfg.rl_prompts_per_step} prompts x {cfg.rl_group_size} responses on generated sums "
             f"(train_rl's demo task), from the base, Math and Math+Code models. `mid` below is Math+Code.",
             "",
             "## The paper's findings here", "",
             "| finding | paper | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {f['finding']} | {f['paper']} | {f['ours']} | **{f['verdict']}** ({f['note']}) |"
              for f in fs]
    tokens = cfg.mid_steps * cfg.mid_batch_size * cfg.mid_seq_len * max(1, cfg.torchrun)
    lines += ["", f"Caveats: a small model (the paper: 3B-24B), {tokens:,} mid-training tokens per mixture "
              f"(the paper: ~27B) and {cfg.rl_steps} GRPO steps at lr {cfg.rl_lr:g} "
              "(the paper: 1,000 steps at 5e-7); small evaluation sets, so the standard errors are wide "
              "and a verdict needs a difference beyond 2 SE (deltas use independent-error SEs, conservative "
              "for these paired items). A verdict is computed from the numbers by the rule in its row, not "
              "written by hand.", "",
              "## Retention table (mean ± standard error; Δ against base)", "",
              R.retention_markdown(labels, rows), "",
              "## Weight change (share of elements changed by >= 0.1 / 1 / 10 %, "
              "relative Frobenius change)", "",
              "| update | weights | >= 0.1% | >= 1% | >= 10% | ‖ΔW‖/‖W‖ |",
              "|---|---|---:|---:|---:|---:|"]
    for key, v in w.items():
        for dt in ("fp32", "bf16"):
            t = v[dt]["total"]
            lines.append(f"| {key} | {dt} | {_pct(t['changed'].get('0.001'))} | "
                         f"{_pct(t['changed'].get('0.01'))} | "
                         f"{_pct(t['changed'].get('0.1'))} | {t['rel_change']:.3e} |")
    lines += ["", "bf16: both checkpoints cast to bf16 (round to nearest) before comparing; a bf16 element "
              "moves in steps of ~0.4%, so small fp32 updates either vanish or jump past the 0.1% "
              "threshold.", "",
              "Per component (mid -> RL, changed by >= 1%, fp32 / bf16): " + ", ".join(
                  f"{c} {_pct(w['mid_mc->rl_mc']['fp32']['components'][c]['changed'].get('0.01'))} / "
                  f"{_pct(w['mid_mc->rl_mc']['bf16']['components'][c]['changed'].get('0.01'))}"
                  for c in LINEAR if c in w["mid_mc->rl_mc"]["fp32"]["components"]) + ".", ""]
    sim = an["similarity"]
    lines += ["## Other measurements", "",
              f"- Cosine of the two mixtures' updates (Math vs Math+Code, from base): "
              f"{_num(sim['mid_math_vs_mid_mc']['total'])} "
              "(paper, MC vs MCS: 0.52 Granite, 0.62 Nemotron-H).",
              f"- Cosine of RL-from-base and RL-from-mid updates (each against its own start): "
              f"{_num(sim['rl_base_vs_rl_mc']['total'])}.",
              f"- Linear CKA, minimum over layers: mid vs RL {_num(an['cka']['mid_vs_rl']['min_cka'], 5)}, "
              f"base vs mid {_num(an['cka']['base_vs_mid']['min_cka'], 5)} (bootstrap: "
              f"`analysis/cka/*/cka.json`).",
              "- Landscape W = W_base + a ΔW_mid + b ΔW_RL, pass rate on held-out sums "
              "(rows a, columns b = "
              + ", ".join(f"{b:g}" for b in an["landscape"]["b"]) + "): " + "; ".join(
                  f"a={a:g}: " + " ".join(_pct(x) for x in r)
                  for a, r in zip(an["landscape"]["a"], an["landscape"]["pass_rate"])) + ".",
              "", "## Figures", ""] + [f"![{f}]({f})" for f in figs + ["retention.png"]] + [""]
    (out / "REPORT.md").write_text("\n".join(lines), encoding="utf-8")
    return {"report": str(out / "REPORT.md"), "verdicts": {f["finding"]: f["verdict"] for f in fs}}


def _num(x, digits=3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


RUNNERS = {"base": stage_base, "data": stage_data, "mid_math": _stage_mid("math"), "mid_mc": _stage_mid("mc"),
           "rl_base": _stage_rl("base"), "rl_math": _stage_rl("mid_math"), "rl_mc": _stage_rl("mid_mc"),
           "merge": stage_merge, "eval": stage_eval, "analysis": stage_analysis, "report": stage_report}


# ----------------------------------------------------------------------------------------------
# The driver


def study(cfg: Config, argv: list | None = None) -> dict:
    """Run every stage that is not complete; returns {stage: result}."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    res, t_start, measured, budget_done = {}, time.time(), 0.0, 0.0
    names = list(STAGES)
    todo = [n for n in names if stage_done(out, n, cfg) is None]
    for k, name in enumerate(names):
        folder = out / name
        done = stage_done(out, name, cfg)
        if done is not None:
            res[name] = done["result"]
            log(f"stage {k + 1}/{len(names)} {name}: complete, skipped")
            continue
        settings = stage_settings(name, cfg)
        pending = folder / "stage.pending.json"
        resume = pending.is_file() and cli.read_json(pending) == settings
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        for d in dependents(name):  # whatever read this stage's old outputs is stale now
            (out / d / "stage.json").unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        cli.write_json(pending, settings)
        left = sum(STAGES[n][2] for n in todo if n not in res and n != name)
        log(f"stage {k + 1}/{len(names)} {name}: {'resuming' if resume else 'starting'}; elapsed "
            f"{_hms(time.time() - t_start)}, {_eta(cfg, measured, budget_done, STAGES[name][2] + left)}")
        t0 = time.time()
        try:
            result = RUNNERS[name](cfg, folder, resume, res)
        except (StudyError, cli.DataError) as e:
            raise StudyError(f"stage {name} failed: {e}\nresume with: {resume_command(argv or [])}") from None
        seconds = time.time() - t0
        cli.write_json(folder / "stage.json",
                       {"settings": settings, "result": result, "seconds": seconds,
                        "finished": datetime.datetime.now().isoformat(timespec="seconds")})
        pending.unlink(missing_ok=True)
        res[name] = result
        measured += seconds
        budget_done += STAGES[name][2]
        log(f"stage {k + 1}/{len(names)} {name}: done in {_hms(seconds)}; "
            f"{_eta(cfg, measured, budget_done, left)}")
    log(f"study complete in {_hms(time.time() - t_start)}: {out / 'REPORT.md'}")
    return res


DEFAULT_MINUTES = {"tiny": 2, "default": 60, "gpu": 600}  # planned wall time of a whole study, per scale


def _eta(cfg: Config, measured: float, budget_done: float, budget_left: float) -> str:
    """Time left: the planned per-stage shares, rescaled by how long the finished stages took against plan."""
    plan = 60 * DEFAULT_MINUTES.get(cfg.scale, 60)  # seconds per unit of share, before anything is measured
    per_share = measured / budget_done if budget_done >= 0.15 else plan  # a few short stages say little
    return f"about {_hms(per_share * budget_left)} left"


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def parse_args(argv=None) -> Config:
    import argparse
    parser = argparse.ArgumentParser(description="The PRISM study end to end: base -> mid-training "
                                                 "-> GRPO -> evaluation -> analysis -> REPORT.md "
                                                 "(see the module docstring).")
    cfg, args = cli.parse_config(Config, argv, parser=parser)
    if cfg.scale not in SCALES:  # one line and exit code 2, like every bad input
        print(f"study.py: error: --scale {cfg.scale!r}: expected one of {', '.join(SCALES)}", file=sys.stderr)
        sys.exit(2)
    given = {k for k, v in vars(args).items() if v is not None}
    return dataclasses.replace(cfg, **{k: v for k, v in SCALES[cfg.scale].items() if k not in given})


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    try:
        M.resolve_model_path(cfg.model)
    except Exception as e:  # noqa: BLE001 - a missing folder, an unknown hub id, no network: one line
        print(f"study.py: error: --model {cfg.model}: "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        sys.exit(2)
    try:
        study(cfg, argv)
    except StudyError as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
