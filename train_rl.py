"""GRPO from scratch: rollouts on the current weights, verifiable rewards, group advantages, a clipped
policy-gradient loss with a KL penalty to a soft-updated reference, FSDP2 -- the paper's RL stage (sec. 9.1).

    python train_rl.py                                    # the demo: SmolLM2-135M-Instruct on generated sums
    torchrun --standalone --nproc_per_node=8 train_rl.py --config configs/rl_paper.toml \\
        --model out/mid/hf --prompts rl_filtered.jsonl --out runs/rl
    python train_rl.py filter --model out/mid/hf --prompts hub:deepscaler --filter-out rl_filtered.jsonl
    python train_rl.py --out runs/rl --resume             # continue from the latest complete checkpoint

One step, top to bottom:
  1. Prompts: `prompts_per_step` problems {prompt, answer | choices | tests, domain} (math, science, code),
     rendered as the tokenizer's chat template + a "<think>\\n" prefill (evaluate.py's `think` format).
  2. Rollouts: G = `group_size` responses per prompt from model.generate on the current weights (gathered
     from the FSDP shards), temperature / top-p, at most `max_new_tokens`; the sampler's log-probs are kept.
  3. Rewards (graders.py): correct answer + format bonus, 0 unless the response has the
     `<think> ... </think> answer` form; minus penalties for a missing stop token and repeated n-grams.
  4. Advantages: A_i = (r_i - mean(r)) / (std(r) + eta) within each group, population std
     (Dr.GRPO: r_i - mean(r)); groups whose graded reward (correct + format) is all equal carry no signal and
     are dropped (counted).
  5. Loss (per response token t of response o_i, ratio rho = pi_theta / pi_old):
        w    = min(pi_old / pi_gen, C)                                  truncated importance weight
        L_pg = -w * min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)   decoupled clip
        L_kl = beta * (pi_ref / pi_theta - log(pi_ref / pi_theta) - 1)  k3 estimator of KL(pi_theta || pi_ref)
        L    = sum_{i, t} (L_pg + L_kl) / sum_j |o_j|     (token-level over the minibatch on all ranks;
               --loss-norm group: 1 / sum_{j in g} |o_j| per group, mean over groups;
               Dr.GRPO: 1 / (#groups G max_new_tokens))
        (the k3 log-ratio is clamped to +-40; top-p < 1 is refused with C > 0: pi_gen would be the nucleus')
     in `minibatches` optimizer steps, `ppo_epochs` times over the rollout batch; pi_old is recomputed by the
     trainer at the start of the step; log-probs are chunked through the lm_head (model.forward(labels=...)).
  6. The reference policy is soft-updated every `ref_update_every` steps:
     ref <- alpha * theta + (1 - alpha) * ref.
Checkpoints (DCP), HF export, metrics and plots come from train_mid.py. One process in fp32 (the CPU demo)
trains plain modules: FSDP would shard and cast nothing there, only add copies of the weights and gradients.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import cli
import evaluate as E
import graders
import model as M
from generate import generate
import train_mid as T


@dataclass
class Config:
    model: str = ""  # initial policy: folder or hub id; "" = out/mid/hf if present, else model.DEFAULT_MODEL
    prompts: str = ""  # comma list of .jsonl/.json/.parquet files or hub:deepscaler etc.; "" = demo sums
    eval_prompts: str = ""  # held-out prompts scored before/after training; "" = demo held-out sums if any
    out: str = "out/rl"  # run folder: metrics.jsonl, checkpoints/, hf/, rl.png
    steps: int = 6  # RL steps (rollout batch + updates). Paper: 1000
    group_size: int = 8  # G: responses per prompt. Paper: 16
    prompts_per_step: int = 4  # prompts per step, over all ranks. Paper: 64
    max_new_tokens: int = 24  # response length limit. Paper: up to 16k (packing length 16,384)
    temperature: float = 1.0  # rollout sampling temperature. Paper: 1.0
    top_p: float = 1.0  # rollout nucleus mass. Paper: 1.0
    lr: float = 2e-5  # peak learning rate. Paper: 5e-7 (the demo's few steps need more)
    warmup: int = 0  # linear warmup steps
    min_lr_ratio: float = 0.0  # lr decays linearly to this fraction of the peak at the last step
    weight_decay: float = 0.0  # AdamW weight decay (not on 1-D tensors)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    minibatches: int = 1  # optimizer steps per rollout batch (whole groups per minibatch)
    ppo_epochs: int = 1  # passes over the rollout batch
    eps_low: float = 0.2  # clip: rho >= 1 - eps_low for negative advantages
    eps_high: float = 0.28  # clip: rho <= 1 + eps_high for positive advantages (clip-higher)
    beta: float = 0.05  # KL penalty coefficient; 0 = no reference model
    ref_alpha: float = 0.6  # policy's Polyak weight in a reference update: ref <- alpha*theta + (1-alpha)*ref
    ref_update_every: int = 0  # steps between reference updates; 0 = the reference stays the initial policy
    is_cap: float = 2.0  # C: truncated importance weight min(pi_old / pi_gen, C); 0 = no correction
    eta: float = 1e-6  # eta in A = (r - mean) / (std + eta)
    std_ddof: int = 0  # ddof of std(r) in A: 0 = population std (open-instruct), 1 = unbiased (TRL)
    loss_norm: str = "batch"  # loss / trained tokens: batch = minibatch on all ranks (open-instruct) | group
    dr_grpo: bool = False  # Dr.GRPO: A = r - mean, fixed normaliser G*max_new_tokens (overrides --loss-norm)
    drop_zero_variance: bool = True  # drop groups whose graded reward (correct + format) is all equal (DAPO)
    format_bonus: float = 0.2  # reward for the <think> ... </think> answer form (paper: 0, format only gates)
    stop_penalty: float = 0.1  # subtracted when a response ends without a stop token
    repetition_penalty: float = 0.5  # subtracted x the fraction of repeated n-grams in a response
    repetition_ngram: int = 4  # n of the repetition measure (token n-grams)
    overlong: str = "penalty"  # cut responses (max_new_tokens): penalty (stop_penalty) | mask (no loss, DAPO)
    math_fallback: bool = True  # math: accept the last number of the answer's last line when nothing is boxed
    system_prompt: str = ("Think inside <think> </think>, "  # system message; "" = the template's own
                          "then write the answer.")
    example_user: str = "What is 2 + 3?"  # a worked example shown as a first chat turn (the demo); "" = none
    example_answer: str = "<think> 2 + 3 = 5 </think> 5"  # the assistant's reply in that example turn
    think_instruction: bool = False  # add evaluate.py's THINK_INSTRUCTION to each user message (paper setup)
    demo_max: int = 10  # demo: operands of the generated sums are 1..demo_max
    demo_eval: int = 32  # demo: held-out sums (never trained on)
    eval_samples: int = 2  # responses per held-out prompt
    eval_temperature: float = -1.0  # held-out sampling temperature; < 0 = --temperature
    gen_batch: int = 64  # sequences per generate() call
    # CPU: attention with a dense document mask costs more than padding
    pack_tokens: int = 0  # sequences packed into training rows of up to this many tokens; 0 = one per row
    micro_rows: int = 8  # rows per forward/backward (gradient accumulation over the rest; activations scale)
    logprob_chunk: int = 1024  # tokens per chunk through lm_head (no (tokens x vocab) fp32 tensor at once)
    filter_k: int = 16  # filter: samples per prompt for the pass rate
    filter_math: str = "1-1"  # filter: kept correct-sample counts (lo-hi) for math. Paper: exactly 1 of 16
    filter_other: str = "1-16"  # filter: kept correct-sample counts (lo-hi) for code and science. Paper: >= 1
    filter_out: str = ""  # filter: output JSONL; "" = OUT/prompts.filtered.jsonl
    code_timeout_s: float = 6.0  # code rewards: wall-clock limit per program run
    code_workers: int = 4  # code rewards: programs graded in parallel
    seed: int = 0  # prompt order and sampling
    save_every: int = 0  # steps between DCP checkpoints; 0 = only at the end
    keep_checkpoints: int = 1  # complete checkpoints kept (0 = all)
    resume: bool = False  # continue from the latest complete checkpoint in OUT/checkpoints
    mesh: str = ""  # "" = FSDP over all ranks; "RxS" = HSDP
    activation_checkpointing: str = "block"  # off | block (recomputed in backward, less memory) | selective
    compile: bool = False  # torch.compile each decoder block
    device: str = "auto"  # cpu, cuda, or auto
    param_dtype: str = "auto"  # compute dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float32
    progress: bool = False  # tqdm bars for generation


DataError = cli.DataError  # a prompts file in the wrong schema, a bad setting: one line and exit code 2


DOMAINS = ("math", "science", "code")
THINK_PREFILL = "<think>\n"  # the response starts inside the think block, as evaluate.py's think format


# ----------------------------------------------------------------------------------------------
# Prompts: {prompt, answer | choices | tests, domain}


def to_problem(rec: dict, where: str) -> dict:
    """One record in our schema, DeepScaleR's {problem, answer} or Skywork-OR1's verl schema
    {prompt: [messages], reward_model: {ground_truth}, ability} -> {id, prompt, domain, answer, choices,
    tests}. Raises DataError naming `where` (file and line) and the field."""
    if "reward_model" in rec:  # Skywork-OR1 (verl): ground_truth is a JSON string
        msgs = rec.get("prompt")
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
            raise DataError(f"{where}: field 'prompt' should be a list of chat messages (Skywork-OR1 schema)")
        prompt = msgs[-1].get("content", "")
        domain = ("code" if str(rec.get("ability", rec.get("data_source", ""))).lower().startswith("code")
                  else "math")
        gt = (rec["reward_model"] or {}).get("ground_truth")
        try:
            gt = json.loads(gt) if isinstance(gt, str) else gt
        except json.JSONDecodeError:
            pass  # a bare answer string
        rec = {"prompt": prompt, "domain": domain}
        if domain == "code":
            if (not isinstance(gt, dict) or not isinstance(gt.get("inputs"), list)
                    or not isinstance(gt.get("outputs"), list)):
                raise DataError(f"{where}: reward_model.ground_truth should hold "
                                f"{{inputs: [...], outputs: [...]}}")
            fn = gt.get("fn_name")
            tests = []
            for x, y in zip(gt["inputs"], gt["outputs"]):
                # call-based: one JSON argument per line, as evaluate.py's functional harness reads them
                if fn:
                    x = "\n".join(json.dumps(a) for a in (x if isinstance(x, list) else [x]))
                    y = json.dumps(y[0] if isinstance(y, list) and len(y) == 1 else y)
                tests.append({"input": x if isinstance(x, str) else json.dumps(x),
                              "output": y if isinstance(y, str) else json.dumps(y),
                              **({"fn_name": fn} if fn else {})})
            rec["tests"] = tests
        else:
            rec["answer"] = gt[0] if isinstance(gt, list) and gt else gt
    elif "problem" in rec and "prompt" not in rec:  # DeepScaleR-Preview: {problem, answer, solution}
        rec = {"prompt": rec["problem"], "answer": rec.get("answer"), "domain": "math"}
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string")
    answer, choices, tests = rec.get("answer"), rec.get("choices"), rec.get("tests")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        answer = None
    domain = rec.get("domain") or ("code" if tests else "science" if choices else "math")
    if domain not in DOMAINS:
        raise DataError(f"{where}: field 'domain' is {domain!r}, expected one of {', '.join(DOMAINS)}")
    if domain == "code":
        if not tests:
            raise DataError(f"{where}: a code prompt needs 'tests' (a string of asserts or a list of "
                            f"{{input, output}})")
    elif choices is not None:
        if not isinstance(choices, dict) or not answer or not re.fullmatch(r"[A-Z]", answer.strip()):
            raise DataError(f"{where}: a multiple-choice prompt needs 'choices' {{letter: text}} and "
                            f"'answer' a letter")
    elif answer is None:
        raise DataError(f"{where}: no 'answer' (or 'choices' / 'tests') to grade against")
    return {"id": rec.get("id", where), "prompt": prompt, "domain": domain, "answer": answer,
            "choices": choices, "tests": tests}


HUB_SETS = {  # name -> (dataset repo, file patterns)
    "deepscaler": ("agentica-org/DeepScaleR-Preview-Dataset", ["*.json", "*.jsonl", "*.parquet"]),
    "skywork-or1-math": ("Skywork/Skywork-OR1-RL-Data", ["*math*.parquet"]),
    "skywork-or1-code": ("Skywork/Skywork-OR1-RL-Data", ["*code*.parquet"]),
}


def _hub_files(name: str) -> list:
    if name not in HUB_SETS:
        raise DataError(f"--prompts hub:{name}: unknown set; expected one of "
                        f"{', '.join('hub:' + k for k in HUB_SETS)}")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not E.hub_reachable():
        raise DataError(f"--prompts hub:{name}: the hub is not reachable; download {HUB_SETS[name][0]} and "
                        "pass its files with --prompts PATH")
    from huggingface_hub import snapshot_download
    repo, patterns = HUB_SETS[name]
    folder = Path(snapshot_download(repo, repo_type="dataset", allow_patterns=patterns))
    files = sorted(p for pat in patterns for p in folder.rglob(pat))
    if not files:
        raise DataError(f"hub:{name}: {repo} has no files matching {patterns}")
    return files


def load_prompts(spec: str, *, log=print) -> list:
    """Problems from a comma list of files / hub sets. Bad records are skipped and counted (with the first
    reasons); no valid record at all is an error."""
    problems, skipped, reasons = [], 0, []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        files = _hub_files(item[4:]) if item.startswith("hub:") else [Path(item)]
        for f in files:
            if not f.exists():
                raise DataError(f"--prompts: {f} does not exist")
            records = cli.read_records(f)
            for path, row, rec in records:
                try:
                    problems.append(to_problem(rec, f"{path}: record {row}"))
                except DataError as e:
                    skipped += 1
                    if len(reasons) < 3:
                        reasons.append(str(e))
    if skipped:
        log(f"[train_rl] skipped {skipped} prompt records without a usable answer, e.g. "
            + "; ".join(reasons))
    if not problems:
        raise DataError(f"--prompts {spec}: no usable prompt records"
                        + (f" ({reasons[0]})" if reasons else ""))
    return problems


def arithmetic_problems(max_operand: int, n_eval: int, seed: int) -> tuple:
    """The demo task: "What is a + b?" for 1 <= a, b <= max_operand; (train, held-out), disjoint."""
    pairs = [(a, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    probs = [{"id": f"sum/{a}+{b}", "prompt": f"What is {a} + {b}?", "domain": "math", "answer": str(a + b),
              "choices": None, "tests": None} for a, b in pairs]
    if len(probs) <= n_eval:
        raise DataError(f"--demo-max {max_operand}: {len(probs)} sums, need more than --demo-eval {n_eval}")
    return probs[n_eval:], probs[:n_eval]


def prompt_text(problem: dict, tok, cfg: Config) -> str:
    """Chat template (system message, an optional worked example turn, the user turn) + the "<think>\\n"
    prefill."""
    user = problem["prompt"]
    if problem["domain"] == "science" and problem.get("choices"):
        user += "\n\n" + "\n".join(f"{k}) {v}" for k, v in problem["choices"].items())
    if cfg.think_instruction:
        user += "\n\n" + E.THINK_INSTRUCTION
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if cfg.example_user:  # one-shot: a small model copies a worked turn far more readily than an instruction
        msgs += [{"role": "user", "content": cfg.example_user},
                 {"role": "assistant", "content": cfg.example_answer}]
    return tok.apply_chat_template(msgs + [{"role": "user", "content": user}]) + THINK_PREFILL


# ----------------------------------------------------------------------------------------------
# Rewards


def repetition_fraction(tokens: list, n: int) -> float:
    """Share of a response's token n-grams that repeat an earlier one (0 = none, -> 1 = a loop)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def score_responses(problems: list, texts: list, stopped: list, tokens: list, cfg: Config) -> list:
    """Per response: {reward, correct, format, stop, repetition, grader_error, empty}. The reward parts sum to
    the reward: correct (1 if the grader accepts the answer) and format (the bonus) only count when the
    response has the `<think> ... </think> answer` form; stop and repetition are penalties (<= 0)."""
    out, code_jobs = [], []
    for i, (p, text, st, toks) in enumerate(zip(problems, texts, stopped, tokens)):
        answer = graders.strip_think(text)
        fmt = answer is not None and answer.strip() != ""
        r = {"correct": 0.0, "format": cfg.format_bonus if fmt else 0.0,
             "stop": 0.0 if st else -cfg.stop_penalty,
             "repetition": -cfg.repetition_penalty * repetition_fraction(toks, cfg.repetition_ngram),
             "is_correct": False, "is_format": fmt, "grader_error": False, "empty": not text.strip()}
        if fmt:
            try:
                if p["domain"] == "code":
                    program = graders.extract_code(answer)
                    if program and program.strip():
                        code_jobs.append((i, program))
                elif p.get("choices"):
                    r["is_correct"] = graders.grade_choice(answer, p["answer"], choices=p["choices"])[0]
                else:
                    r["is_correct"] = graders.grade_math(answer, p["answer"], fallback=cfg.math_fallback)[0]
            except Exception:  # noqa: BLE001 - a grader bug or a bad gold must not stop training:
                r["grader_error"] = True  # no credit, counted
        out.append(r)
    if code_jobs:
        verdicts = graders.run_many([(prog, problems[i]["tests"]) for i, prog in code_jobs],
                                    workers=cfg.code_workers, timeout_s=cfg.code_timeout_s)
        for (i, _), (ok, reason) in zip(code_jobs, verdicts):
            out[i]["is_correct"] = bool(ok)
            out[i]["grader_error"] = reason.startswith("sandbox error")
    for r in out:
        r["correct"] = float(r["is_correct"])
        r["reward"] = r["correct"] + r["format"] + r["stop"] + r["repetition"]
    return out


# ----------------------------------------------------------------------------------------------
# Rollouts


def rollouts(model, tok, problems: list, cfg: Config, *, n: int, temperature: float, seed: int) -> list:
    """n responses per problem from model.generate on the current weights (FSDP shards gathered).
    Returns one dict per response, problem-major: {problem, prompt, tokens, logprobs, text, stopped}."""
    prompts = [tok.encode(prompt_text(p, tok, cfg)) for p in problems]
    jobs = [(p, ids) for p, ids in zip(problems, prompts) for _ in range(n)]
    out = []
    # a policy in training generates as it is: prepare_generation's fused projections would copy its weights
    fuse = False if any(p.requires_grad for p in model.parameters()) else None
    with T.full_params(model):  # gathered once, kept across the per-token forwards
        for start in range(0, len(jobs), cfg.gen_batch):
            batch = jobs[start:start + cfg.gen_batch]
            samples = generate(model, [ids for _, ids in batch], max_new_tokens=cfg.max_new_tokens,
                                 temperature=temperature, top_p=cfg.top_p, stop_ids=tok.eos_ids,
                                 seed=seed * 7919 + start, progress=cfg.progress, fuse=fuse)
            for (p, ids), s in zip(batch, samples):
                stopped = bool(s.tokens) and s.tokens[-1] in tok.eos_ids
                body = s.tokens[:-1] if stopped else s.tokens
                out.append({"problem": p, "prompt": ids, "tokens": s.tokens, "logprobs": s.logprobs,
                            "text": tok.decode(body), "stopped": stopped})
    return out


# ----------------------------------------------------------------------------------------------
# GRPO maths


def group_advantages(rewards: torch.Tensor, *, eta: float, scale: bool = True, ddof: int = 0,
                     verifiable: torch.Tensor | None = None) -> tuple:
    """rewards (P, G) -> advantages (P, G) and a (P,) mask of groups with signal.

    A_i = (r_i - mean(r)) / (std(r) + eta) per group, std with `ddof` (0: population, as open-instruct;
    1: unbiased, as TRL); Dr.GRPO (scale=False): r_i - mean(r). The mask tests max - min of `verifiable`
    (P, G) (the graded part of the reward; default the reward itself): DAPO's dynamic sampling keeps a group
    only if its answers differ, since a continuous penalty alone makes almost every group "varied"."""
    mean = rewards.mean(dim=1, keepdim=True)  # (P, 1)
    G = rewards.shape[1]
    std = rewards.std(dim=1, correction=ddof, keepdim=True) if G > ddof else torch.zeros_like(mean)  # (P, 1)
    adv = rewards - mean
    if scale:
        adv = adv / (std + eta)
    v = rewards if verifiable is None else verifiable
    varied = (v.max(dim=1).values - v.min(dim=1).values) > 0  # (P,)
    return adv, varied


def sequence_weights(lengths: list, groups: list, *, norm: str, n_groups: float = 1.0, n_tokens: float = 0.0,
                     group_size: int = 0, max_len: int = 0) -> list:
    """The loss weight of each token of each response; lengths: |o_i| of each kept response (0 = masked),
    groups: its group index. norm:
      batch   1 / n_tokens, n_tokens = sum |o_j| over the whole minibatch on all ranks (open-instruct;
              TRL dapo)
      group   1 / (n_groups * sum_{j in g} |o_j|): token-level inside each group, then the mean over groups
      dr_grpo 1 / (n_groups * G * max_len): Dr.GRPO's constant normaliser; dropped responses change nothing
    n_groups: trained groups of the minibatch on all ranks."""
    if norm == "dr_grpo":
        return [1.0 / (n_groups * group_size * max_len) if L else 0.0 for L in lengths]
    if norm == "batch":
        return [1.0 / n_tokens if L else 0.0 for L in lengths]
    total = {}
    for L, g in zip(lengths, groups):
        total[g] = total.get(g, 0) + L
    return [1.0 / (n_groups * total[g]) if L and total[g] else 0.0 for L, g in zip(lengths, groups)]


# |log pi_ref - log pi_theta| bound in k3: exp(> ~88) is inf in fp32 (open-instruct: 40)
LOG_RATIO_CLAMP = 40.0


def grpo_token_loss(logp, logp_old, logp_gen, logp_ref, adv, *, eps_low: float, eps_high: float, beta: float,
                    is_cap: float) -> tuple:
    """Per-token GRPO loss; every argument (N,) (or any equal shape). Returns (loss per token, diagnostics).

    rho    = pi_theta / pi_old                             (exp of a log-prob difference)
    w      = min(pi_old / pi_gen, C)                       truncated importance weight (sampler/trainer gap),
                                                           no grad
    L_pg   = -w * min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    L_kl   = beta * (exp(q) - q - 1),  q = clamp(log pi_ref - log pi_theta, +-40)   (k3, unbiased, >= 0)"""
    rho = torch.exp(logp - logp_old)
    w = torch.exp(logp_old - logp_gen).clamp(max=is_cap) if is_cap > 0 else torch.ones_like(rho)
    pg = -w * torch.minimum(rho * adv, rho.clamp(1 - eps_low, 1 + eps_high) * adv)
    if beta > 0:
        q_raw = logp_ref - logp
        q = q_raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(q) - q - 1
        kl_clamped = (q_raw.abs() > LOG_RATIO_CLAMP).detach()
    else:
        kl = torch.zeros_like(logp)
        kl_clamped = torch.zeros_like(logp, dtype=torch.bool)
    loss = pg + beta * kl
    diag = {"kl": kl.detach(), "is_weight": w.detach(), "kl_clamped": kl_clamped,
            "clip_low": ((rho < 1 - eps_low) & (adv < 0)).detach(),
            "clip_high": ((rho > 1 + eps_high) & (adv > 0)).detach()}
    return loss, diag


def grpo_loss(logp, logp_old, logp_gen, logp_ref, adv, weight, **kw) -> tuple:
    """sum over tokens of weight * per-token loss (weights from sequence_weights; 0 = not trained)."""
    per_token, diag = grpo_token_loss(logp, logp_old, logp_gen, logp_ref, adv, **kw)
    return torch.where(weight > 0, per_token * weight, 0.0).sum(), diag


@torch.no_grad()
def polyak_update(ref, policy, alpha: float):
    """ref <- alpha * theta + (1 - alpha) * ref (TR-DPO / open-instruct soft update); shards update
    locally."""
    for r, p in zip(ref.parameters(), policy.parameters()):
        r.mul_(1 - alpha).add_(p.detach().to(r.dtype), alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Training batches: responses packed into rows, per-token fields at the label positions


@dataclass
class Sequence:
    prompt: list  # prompt token ids
    response: list  # response token ids (with the stop token if one came)
    gen_logprobs: list  # log pi_gen of each response token, from the sampler
    advantage: float  # A of its group
    weight: float  # loss weight of each of its tokens (0 = not trained)
    group: int  # group index in the step


def pack_rows(seqs: list, row_tokens: int) -> dict:
    """Sequences -> rows (R, L) of up to row_tokens tokens each (at least one sequence per row): input_ids,
    doc_ids (-1 = padding), labels (-100 except where the next token is a response token), and per-token adv,
    gen (log pi_gen), weight, seq (sequence index; -1 elsewhere)."""
    rows, cur, used = [], [], 0
    for i, s in enumerate(seqs):
        n = len(s.prompt) + len(s.response)
        if cur and used + n > row_tokens:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    L = max(sum(len(seqs[i].prompt) + len(seqs[i].response) for i in r) for r in rows) if rows else 1
    R = max(1, len(rows))
    t = {"input_ids": torch.zeros(R, L, dtype=torch.long),
         "doc_ids": torch.full((R, L), -1, dtype=torch.long),
         "labels": torch.full((R, L), -100, dtype=torch.long), "adv": torch.zeros(R, L),
         "gen": torch.zeros(R, L), "weight": torch.zeros(R, L),
         "seq": torch.full((R, L), -1, dtype=torch.long)}
    for r, members in enumerate(rows):
        off = 0
        for d, i in enumerate(members):
            s = seqs[i]
            ids = s.prompt + s.response
            n, P, O = len(ids), len(s.prompt), len(s.response)
            t["input_ids"][r, off:off + n] = torch.tensor(ids)
            t["doc_ids"][r, off:off + n] = d
            lab = slice(off + P - 1, off + P - 1 + O)  # position t predicts token t + 1
            t["labels"][r, lab] = torch.tensor(s.response)
            t["adv"][r, lab] = s.advantage
            t["gen"][r, lab] = torch.tensor(s.gen_logprobs, dtype=torch.float32)
            t["weight"][r, lab] = s.weight
            t["seq"][r, lab] = i
            off += n
    return t


def dummy_rows() -> dict:
    """One padding row: a rank with nothing to train still joins FSDP's collectives."""
    return pack_rows([], 1)


def micro_batches(rows: dict | None, micro_rows: int, n: int) -> list:
    """Split packed rows into exactly n micro-batches (the ranks agree on n); missing ones are padding
    rows."""
    R = 0 if rows is None else rows["input_ids"].shape[0]
    out = [{k: v[i:i + micro_rows] for k, v in rows.items()} for i in range(0, R, micro_rows)]
    return out + [dummy_rows() for _ in range(n - len(out))]


def token_logprobs(model, mb: dict, device, *, temperature: float, chunk: int, entropy: bool = False):
    """(R, L) log pi(label) at temperature (0 where no label) [, entropy], chunked through the lm_head by
    model.forward(labels=...): no (R x L x vocab) fp32 tensor is ever held."""
    return model(mb["input_ids"].to(device), mb["doc_ids"].to(device), labels=mb["labels"].to(device),
                 temperature=temperature, return_entropy=entropy, chunk_tokens=chunk)


@torch.no_grad()
def _old_and_ref(model, ref, mb: dict, d, cfg: Config, *, old: bool) -> int:
    """Fill mb["old"] (pi_old: the trainer's log-probs before any update of this step, unless the single
    forward of the update provides them) and mb["ref"]; responses with a non-finite value are taken out of the
    loss. Returns how many were."""
    lp = lambda m: token_logprobs(m, mb, d.device, temperature=cfg.temperature,
                                  chunk=cfg.logprob_chunk).float().cpu()
    if old:
        mb["old"] = lp(model)
    mb["ref"] = lp(ref) if ref is not None else torch.zeros_like(mb["gen"])
    finite = torch.isfinite(mb["ref"]) & torch.isfinite(mb.get("old", mb["ref"])) & torch.isfinite(mb["gen"])
    bad = mb["seq"][~finite & (mb["seq"] >= 0)].unique()
    if bad.numel():
        drop = torch.isin(mb["seq"], bad)
        mb["weight"][drop] = 0.0
        for key in ("old", "ref", "gen"):
            if key in mb:
                mb[key] = torch.where(drop, 0.0, mb[key])
    return int(bad.numel())


class TokenStats:
    """Sums over the trained tokens of a step (weight > 0): KL, entropy, clip fractions, importance
    weights."""

    def __init__(self):
        # tokens, kl, entropy, clip_low, clip_high, is_w, is_truncated, kl_clamped
        self.sums = torch.zeros(8, dtype=torch.float64)
        self.lo, self.hi = math.inf, -math.inf

    def add(self, on, diag, entropy, raw_is, cap):
        if not on.any():
            return
        w = diag["is_weight"][on]
        self.sums += torch.tensor([float(on.sum()), float(diag["kl"][on].sum()), float(entropy[on].sum()),
                                   float(diag["clip_low"][on].sum()), float(diag["clip_high"][on].sum()),
                                   float(w.sum()), float((raw_is[on] > cap).sum()) if cap > 0 else 0.0,
                                   float(diag["kl_clamped"][on].sum())],
                                  dtype=torch.float64)
        self.lo, self.hi = min(self.lo, float(w.min())), max(self.hi, float(w.max()))

    def reduce(self, d, *, has_ref: bool) -> dict:
        s = _allreduce(self.sums.tolist(), d)
        lo = _allreduce([self.lo], d, dist.ReduceOp.MIN)[0]
        hi = _allreduce([self.hi], d, dist.ReduceOp.MAX)[0]
        n = max(s[0], 1.0)
        return {"tokens": s[0], "kl": s[1] / n if has_ref else None, "entropy": s[2] / n,
                "clip_frac": (s[3] + s[4]) / n, "clip_low_frac": s[3] / n, "clip_high_frac": s[4] / n,
                "is_weight_mean": s[5] / n, "is_truncated_frac": s[6] / n, "kl_clamped": int(s[7]),
                "is_weight_min": lo if s[0] else None, "is_weight_max": hi if s[0] else None}


# ----------------------------------------------------------------------------------------------
# Held-out evaluation and the pass-rate filter


def evaluate_policy(model, tok, problems: list, cfg: Config, *, seed: int) -> dict:
    """Mean reward, accuracy and format rate on held-out problems (fixed seed, so runs compare)."""
    temperature = cfg.temperature if cfg.eval_temperature < 0 else cfg.eval_temperature
    if dist.is_initialized():  # each rank scores its share; the sums are reduced below
        problems = problems[dist.get_rank()::dist.get_world_size()]
    outs = rollouts(model, tok, problems, cfg, n=cfg.eval_samples, temperature=temperature, seed=seed)
    scores = score_responses([o["problem"] for o in outs], [o["text"] for o in outs],
                             [o["stopped"] for o in outs], [o["tokens"] for o in outs], cfg)
    local = torch.tensor([[s["reward"], s["correct"], float(s["is_format"]), float(len(o["tokens"])), 1.0]
                          for s, o in zip(scores, outs)] or [[0.0] * 5], dtype=torch.float64).sum(0)
    if dist.is_initialized():
        dist.all_reduce(local)
    n = float(local[4])
    n = max(n, 1.0)
    return {"reward": float(local[0]) / n, "accuracy": float(local[1]) / n, "format": float(local[2]) / n,
            "response_len": float(local[3]) / n, "n": int(local[4]),
            "examples": [o["text"] for o in outs[:2]] or [""]}


def _band(text: str, k: int, flag: str) -> tuple:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise DataError(f"--{flag} {text!r}: expected LO-HI correct samples out of --filter-k, "
                        f"e.g. 1-1") from None
    if not 0 <= lo <= min(hi, k):
        raise DataError(f"--{flag} {text!r}: need 0 <= LO <= HI and LO <= --filter-k {k}")
    return lo, min(hi, k)


def pass_rate_filter(cfg: Config) -> Path:
    """Sample filter_k answers per prompt with the model and keep the prompts whose number of correct samples
    is in the domain's band (paper: math exactly 1/16, code and science >= 1/16); writes them with their pass
    rate."""
    with cli.process_group(cfg.device) as d:
        return _filter(cfg, d)


def _filter(cfg: Config, d) -> Path:
    log = print if d.main else (lambda *a, **k: None)
    bands = {"math": _band(cfg.filter_math, cfg.filter_k, "filter-math"),
             "other": _band(cfg.filter_other, cfg.filter_k, "filter-other")}
    base = resolve_policy(cfg.model)
    model = M.load_model(str(base), device=d.device, dtype=T.resolve_param_dtype(cfg.param_dtype, d.device))
    model.requires_grad_(False)  # sampling only: rollouts may fuse a generation copy of its weights
    tok = M.load_tokenizer(str(base))
    problems = (load_prompts(cfg.prompts, log=log) if cfg.prompts
                else arithmetic_problems(cfg.demo_max, cfg.demo_eval, cfg.seed)[0])
    mine = problems[d.rank::d.world]
    kept = []
    for start in range(0, len(mine), max(1, cfg.gen_batch // cfg.filter_k)):
        chunk = mine[start:start + max(1, cfg.gen_batch // cfg.filter_k)]
        outs = rollouts(model, tok, chunk, cfg, n=cfg.filter_k, temperature=cfg.temperature,
                        seed=cfg.seed + start)
        scores = score_responses([o["problem"] for o in outs], [o["text"] for o in outs],
                                 [o["stopped"] for o in outs], [o["tokens"] for o in outs], cfg)
        for j, p in enumerate(chunk):
            c = sum(s["is_correct"] for s in scores[j * cfg.filter_k:(j + 1) * cfg.filter_k])
            lo, hi = bands["math" if p["domain"] == "math" else "other"]
            if lo <= c <= hi:
                kept.append({k: v for k, v in p.items() if v is not None} | {"pass_rate": c / cfg.filter_k})
        log(f"[train_rl] filter: {min(start + len(chunk), len(mine))}/{len(mine)} prompts scored, "
            f"{len(kept)} kept")
    gathered = [None] * d.world
    dist.all_gather_object(gathered, kept)
    out = Path(cfg.filter_out or Path(cfg.out) / "prompts.filtered.jsonl")
    if d.main:
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [r for part in gathered for r in part]
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out)
        log(f"[train_rl] filter: kept {len(rows)} of {len(problems)} prompts -> {out}")
    dist.barrier()
    return out


# ----------------------------------------------------------------------------------------------
# Training


def resolve_policy(name: str) -> Path:
    """--model, or the mid-training demo's output when it exists, or the built-in default."""
    if not name:
        name = "out/mid/hf" if (Path("out/mid/hf") / "config.json").is_file() else M.DEFAULT_MODEL
    return M.resolve_model_path(name)


@torch.no_grad()
def _root_forward(model, d):
    """One tiny forward through the root module: FSDP2 initialises itself lazily from the root's first
    forward, and generation (under full_params) calls the blocks directly, which would otherwise initialise
    them alone."""
    model(torch.zeros(1, 1, dtype=torch.long, device=d.device))
    T.reshard(model)


def check_config(cfg: Config):
    """Every flag's range, before any prompt is read or a model loaded (a DataError names the flag)."""
    T.check_ranges(cfg, ints={"steps": 1, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 1,
                              "warmup": 0, "minibatches": 1, "ppo_epochs": 1, "ref_update_every": 0,
                              "repetition_ngram": 1, "demo_max": 1, "demo_eval": 1, "eval_samples": 1,
                              "gen_batch": 1, "pack_tokens": 0, "micro_rows": 1, "logprob_chunk": 1,
                              "filter_k": 1, "code_workers": 1, "save_every": 0, "keep_checkpoints": 0},
                   floats={"temperature": (0, None), "top_p": (0, 1), "lr": (0, None), "min_lr_ratio": (0, 1),
                           "weight_decay": (0, None), "grad_clip": (0, None), "eps_low": (0, 1),
                           "eps_high": (0, None), "beta": (0, None), "ref_alpha": (0, 1), "is_cap": (0, None),
                           "eta": (0, None), "code_timeout_s": (0, None)},
                   choices={"overlong": ("penalty", "mask"), "loss_norm": ("batch", "group"),
                            "activation_checkpointing": ("off", "block", "selective"),
                            "param_dtype": ("auto", "bfloat16", "float32"),
                            "device": ("auto", "cpu", "cuda")})
    if cfg.temperature <= 0 or cfg.top_p <= 0:
        raise DataError(f"--temperature {cfg.temperature:g} / --top-p {cfg.top_p:g}: GRPO samples; "
                        f"expected > 0")
    _band(cfg.filter_math, cfg.filter_k, "filter-math")
    _band(cfg.filter_other, cfg.filter_k, "filter-other")
    _check(cfg, int(os.environ.get("WORLD_SIZE", 1)))


# --resume: settings whose change would mix two different runs (the rest, such as --steps, only warn)
RESUME_ALTERING = ("model", "prompts", "group_size", "prompts_per_step", "max_new_tokens", "temperature",
                   "top_p", "lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "minibatches",
                   "ppo_epochs", "eps_low", "eps_high", "beta", "ref_alpha", "ref_update_every", "is_cap",
                   "eta", "std_ddof", "loss_norm", "dr_grpo", "drop_zero_variance", "format_bonus",
                   "stop_penalty", "repetition_penalty", "repetition_ngram", "overlong", "math_fallback",
                   "system_prompt", "example_user", "example_answer", "think_instruction", "demo_max",
                   "demo_eval", "seed", "param_dtype")


def _check(cfg: Config, world: int):
    if cfg.prompts_per_step % world:
        raise DataError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {world} ranks")
    if cfg.group_size < 2:
        raise DataError(f"--group-size {cfg.group_size}: GRPO needs at least 2 responses per prompt")
    if cfg.overlong not in ("penalty", "mask"):
        raise DataError(f"--overlong {cfg.overlong!r}: expected penalty or mask")
    if cfg.minibatches < 1 or cfg.ppo_epochs < 1 or cfg.steps < 1:
        raise DataError("--minibatches, --ppo-epochs and --steps must be >= 1")
    if not 0 < cfg.ref_alpha <= 1:
        raise DataError(f"--ref-alpha {cfg.ref_alpha}: expected 0 < alpha <= 1")
    if cfg.loss_norm not in ("batch", "group"):
        raise DataError(f"--loss-norm {cfg.loss_norm!r}: expected batch or group")
    if cfg.std_ddof not in (0, 1):
        raise DataError(f"--std-ddof {cfg.std_ddof}: expected 0 (population) or 1 (unbiased)")
    if cfg.top_p < 1 and cfg.is_cap > 0:  # the sampler reports log-probs of the renormalised nucleus,
        # pi_old is the full softmax: pi_old / pi_gen would be biased low on every token
        raise DataError(f"--top-p {cfg.top_p}: truncated importance sampling (--is-cap {cfg.is_cap}) needs "
                        "the full-distribution sampler log-probs; use --top-p 1 or --is-cap 0")


def _prompt_order(n: int, seed: int, epoch: int) -> list:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_problems(problems: list, step: int, per_step: int, seed: int) -> list:
    """The prompts of RL step `step` (1-based), from per-epoch shuffles: a function of the step alone, so a
    resumed run (at any world size) sees exactly the prompts an uninterrupted one would have."""
    out = []
    for k in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(k, len(problems))
        out.append(problems[_prompt_order(len(problems), seed, epoch)[pos]])
    return out


def _allreduce(values: list, d, op=dist.ReduceOp.SUM) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def train(cfg: Config) -> dict:
    """Run GRPO as configured; returns a summary (rewards per step, held-out before/after, export path)."""
    with cli.process_group(cfg.device) as d:
        return _train(cfg, d)


@dataclass
class Run:
    """What every phase of a step reads, built once by _setup."""
    cfg: Config
    d: object  # train_mid's distributed context (rank, world, device, main)
    log: object
    out: Path
    base: Path  # the starting policy's folder
    tok: object
    model: object  # pi_theta, FSDP-sharded (a plain module for one fp32 process)
    ref: object  # pi_ref (None when beta = 0)
    optimizer: object
    ckpt: object
    ref_dir: Path  # the soft-updated reference's checkpoints, step by step with the policy's
    metrics: object
    problems: list
    heldout: list
    start_step: int


def _train(cfg: Config, d) -> dict:
    """The GRPO loop: rollout -> score -> advantages -> update (+ reference) -> log, one step at a time."""
    run = _setup(cfg, d)
    summary = {"rewards": [], "export": str(run.out / "hf")}
    if run.heldout and run.start_step == 0:
        summary["heldout_before"] = heldout_eval(run, "before")
    step = run.start_step
    for step in range(run.start_step + 1, cfg.steps + 1):
        t_step = time.perf_counter()
        lr = set_lr(run, step)
        outs, gen = rollout_phase(run, step)  # 1-2. G responses per prompt on the current weights
        scores, rewards, graded = score_phase(run, outs)  # 3. verifiable rewards
        batch = advantage_phase(run, outs, scores, rewards, graded)  # 4. A, dropped groups, packed rows
        t1 = time.perf_counter()
        upd = update_phase(run, step, batch)  # 5. clipped policy gradient + KL, minibatch optimizer steps
        reference_phase(run, step)  # 6. Polyak reference update, on its schedule
        train_s = time.perf_counter() - t1
        record = log_phase(run, step, lr, outs, scores, batch, upd, gen, train_s, t_step)  # 7. metrics
        summary["rewards"].append(record["reward"])
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _save(run.ckpt, run.ref_dir, step, run.model, run.ref, run.optimizer, cfg, d)
    return _finish(run, summary, step)


def _setup(cfg: Config, d) -> Run:
    """Prompts, tokenizer, the sharded policy and reference, optimizer; resumes from the latest checkpoint."""
    _check(cfg, d.world)
    log = print if d.main else (lambda *a, **k: None)
    T.check_resumed_config(cfg, RESUME_ALTERING, log, "train_rl")  # before any work
    tune_malloc(d)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)

    if cfg.prompts:
        problems = load_prompts(cfg.prompts, log=log)
        heldout = load_prompts(cfg.eval_prompts, log=log) if cfg.eval_prompts else []
        task = cfg.prompts
    else:
        problems, heldout = arithmetic_problems(cfg.demo_max, cfg.demo_eval, cfg.seed)
        heldout = load_prompts(cfg.eval_prompts, log=log) if cfg.eval_prompts else heldout
        task = f"demo sums 1..{cfg.demo_max}"
    base = resolve_policy(cfg.model)
    tok = M.load_tokenizer(str(base))
    if not tok.eos_ids:
        raise DataError(f"{base}: the tokenizer has no EOS / stop token; responses could never stop")
    param_dtype = T.resolve_param_dtype(cfg.param_dtype, d.device)
    mesh = T.build_mesh(d, cfg.mesh)
    if d.world == 1 and param_dtype == torch.float32:  # FSDP would shard and cast nothing, yet it gathers a
        # second copy of the weights for generation and keeps unsharded gradients across micro-batches
        mesh = None  # plain modules (shard_model still checkpoints activations); numerically the same
    model = M.load_model(str(base), device="cpu", dtype=torch.float32)  # fp32 master weights, sharded below
    T.shard_model(model, mesh, param_dtype=param_dtype, activation_checkpointing=cfg.activation_checkpointing,
                  compile=cfg.compile)
    model.init_buffers()
    _root_forward(model, d)
    ref = None
    if cfg.beta > 0:  # the reference policy: a frozen (or soft-updated) copy, sharded alike
        ref = M.load_model(str(base), device="cpu", dtype=torch.float32).requires_grad_(False)
        T.shard_model(ref, mesh, param_dtype=param_dtype)
        ref.init_buffers()
        _root_forward(ref, d)
    optimizer = T.build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)

    ckpt = T.Checkpointer(out, d, keep=cfg.keep_checkpoints)
    ref_dir = out / "reference"
    start_step = 0
    latest = ckpt.latest() if cfg.resume else None
    if cfg.resume and latest is None:
        log(f"[train_rl] --resume: no complete checkpoint in {ckpt.dir}; starting from {base}")
    if latest is not None:
        extra = ckpt.load(latest, model, optimizer)
        start_step = int(extra["step"])
        if ref is not None and cfg.ref_update_every and start_step >= cfg.ref_update_every:
            load_reference(ref, ref_dir / latest.name)
        log(f"[train_rl] resumed from {latest} at step {start_step}")
    metrics = T.MetricsLog(out / "metrics.jsonl", d, resume_step=start_step if latest is not None else None)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"[train_rl] {cli.run_name(base)}: {n_params / 1e6:.1f}M parameters, {d.world} rank(s) on "
        f"{d.device.type}; task {task}: {len(problems)} prompts, {len(heldout)} held out; {cfg.steps} steps "
        f"x {cfg.prompts_per_step} prompts x {cfg.group_size} responses, <= {cfg.max_new_tokens} new tokens, "
        f"lr {cfg.lr:g}, beta {cfg.beta:g}")
    return Run(cfg, d, log, out, base, tok, model, ref, optimizer, ckpt, ref_dir, metrics, problems, heldout,
               start_step)


def set_lr(run: Run, step: int) -> float:
    """Linear decay (transformers' linear schedule with warmup): step 1 is the peak without warmup."""
    cfg = run.cfg
    lr = T.lr_at(step - 1, peak=cfg.lr, warmup=cfg.warmup, total=cfg.steps, schedule="linear",
                 min_ratio=cfg.min_lr_ratio)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    return lr


def rollout_phase(run: Run, step: int) -> tuple:
    """This rank's prompts of the step, G responses each; returns (outs, (gen seconds, gen tokens))."""
    cfg, d = run.cfg, run.d
    per_rank = cfg.prompts_per_step // d.world
    mine = step_problems(run.problems, step, cfg.prompts_per_step, cfg.seed)
    mine = mine[d.rank * per_rank:(d.rank + 1) * per_rank]
    run.model.eval()
    t0 = time.perf_counter()
    outs = rollouts(run.model, run.tok, mine, cfg, n=cfg.group_size, temperature=cfg.temperature,
                    seed=cfg.seed * 1_000_003 + step * 1009 + d.rank)
    trim_heap(d)  # the KV cache and per-token activations
    return outs, (time.perf_counter() - t0, sum(len(o["tokens"]) for o in outs))


def score_phase(run: Run, outs: list) -> tuple:
    """Per response scores; rewards r (P, G) and the graded part correct + format (P, G)."""
    G = run.cfg.group_size
    scores = score_responses([o["problem"] for o in outs], [o["text"] for o in outs],
                             [o["stopped"] for o in outs], [o["tokens"] for o in outs], run.cfg)
    rewards = torch.tensor([s["reward"] for s in scores]).view(-1, G)  # (P, G)
    graded = torch.tensor([s["correct"] + s["format"] for s in scores]).view(-1, G)  # (P, G)
    return scores, rewards, graded


def advantage_phase(run: Run, outs: list, scores: list, rewards, graded) -> dict:
    """A per group (groups whose graded reward does not vary dropped), the responses kept for the loss with
    their token weights (normalisers all-reduced), packed into micro-batches every rank runs alike."""
    cfg, d = run.cfg, run.d
    adv, varied = group_advantages(rewards, eta=cfg.eta, scale=not cfg.dr_grpo, ddof=cfg.std_ddof,
                                   verifiable=graded)  # (P, G), (P,)
    varied_total = group_advantages(rewards, eta=cfg.eta)[1]  # (P,) logged: any reward spread at all
    keep_group = varied if cfg.drop_zero_variance else torch.ones_like(varied)
    seqs, n_overlong_masked, n_nan = [], 0, 0
    for i, o in enumerate(outs):
        g = i // cfg.group_size
        if not keep_group[g] or not o["tokens"]:
            continue
        if not all(math.isfinite(x) for x in o["logprobs"]):
            n_nan += 1
            continue
        if cfg.overlong == "mask" and not o["stopped"]:
            n_overlong_masked += 1
            continue
        seqs.append(Sequence(o["prompt"], o["tokens"], o["logprobs"], float(adv[g, i % cfg.group_size]),
                             0.0, g))
    mb_groups = [sorted({s.group for s in seqs})[k::cfg.minibatches] for k in range(cfg.minibatches)]
    mb_seqs = [[s for s in seqs if s.group in set(gs)] for gs in mb_groups]
    # per minibatch, over ranks: trained groups and tokens (the normalisers)
    counts = _allreduce([float(len(gs)) for gs in mb_groups]
                        + [float(sum(len(s.response) for s in ss)) for ss in mb_seqs], d)
    n_groups_global, n_tokens_global = counts[:cfg.minibatches], counts[cfg.minibatches:]
    norm = "dr_grpo" if cfg.dr_grpo else cfg.loss_norm
    for k, ss in enumerate(mb_seqs):
        ws = sequence_weights([len(s.response) for s in ss], [s.group for s in ss], norm=norm,
                              n_groups=max(1.0, n_groups_global[k]), n_tokens=max(1.0, n_tokens_global[k]),
                              group_size=cfg.group_size, max_len=cfg.max_new_tokens)
        for s, w in zip(ss, ws):
            s.weight = w
    rows = [pack_rows(ss, cfg.pack_tokens) if ss else None for ss in mb_seqs]
    n_micro = [math.ceil(r["input_ids"].shape[0] / cfg.micro_rows) if r is not None else 0 for r in rows]
    n_micro = [int(x) for x in _allreduce(n_micro, d, dist.ReduceOp.MAX)]  # every rank runs as many passes
    micro = [micro_batches(r, cfg.micro_rows, n) for r, n in zip(rows, n_micro)]
    return {"micro": micro, "varied": varied, "varied_total": varied_total, "n_nan": n_nan,
            "n_overlong_masked": n_overlong_masked,
            "train_tokens": sum(int((mb["doc_ids"] >= 0).sum()) for mbs in micro for mb in mbs),
            "trained": sum(n_micro) > 0}  # some rank has a group with signal


def update_phase(run: Run, step: int, batch: dict) -> dict:
    """pi_old (the trainer's recompute) and pi_ref, then `ppo_epochs` x `minibatches` optimizer steps."""
    cfg, d, model = run.cfg, run.d, run.model
    res = {"acc": TokenStats(), "losses": [], "grad_norms": [], "skipped": 0, "n_nan": 0}
    if not batch["trained"]:
        run.log(f"[train_rl] step {step}: no group with reward variance on any rank; no update (counted)")
        return res
    model.train()
    same_forward = cfg.minibatches == 1 and cfg.ppo_epochs == 1  # pi_old = pi_theta: no extra pass
    with torch.no_grad():
        for mbs in batch["micro"]:
            for mb in mbs:
                res["n_nan"] += _old_and_ref(model, run.ref, mb, d, cfg, old=not same_forward)
    trim_heap(d)
    for _ in range(cfg.ppo_epochs):
        for mbs in batch["micro"]:
            mb_loss = 0.0
            for i, mb in enumerate(mbs):
                if hasattr(model, "set_requires_gradient_sync"):  # reduce-scatter once, after the last
                    model.set_requires_gradient_sync(i == len(mbs) - 1)
                mb_loss += _micro_step(run, mb, same_forward, res["acc"])
                trim_heap(d)  # this backward's activations and (tokens x vocab) tensors: the step's peak
            gn = T.clip_grad_norm(model, cfg.grad_clip)
            mb_loss = _allreduce([mb_loss], d)[0]
            if math.isfinite(gn) and math.isfinite(mb_loss):
                run.optimizer.step()
            else:  # a non-finite loss or gradient: no update, counted (never a silent zero step)
                res["skipped"] += 1
                run.log(f"[train_rl] step {step}: non-finite loss {mb_loss} / grad norm {gn}; update skipped")
            run.optimizer.zero_grad(set_to_none=True)
            trim_heap(d)
            res["grad_norms"].append(gn)
            res["losses"].append(mb_loss)
    return res


def _micro_step(run: Run, mb: dict, same_forward: bool, acc: TokenStats) -> float:
    """Forward + backward of one micro-batch; returns its (already normalised) loss."""
    cfg, d = run.cfg, run.d
    logp, ent = token_logprobs(run.model, mb, d.device, temperature=cfg.temperature, chunk=cfg.logprob_chunk,
                               entropy=True)  # (R, L) each
    logp, ent = logp.float(), ent.detach().float()  # entropy is only logged: its graph goes before backward
    dev = logp.device
    old, gen = (logp.detach() if same_forward else mb["old"].to(dev)), mb["gen"].to(dev)  # (R, L)
    loss, diag = grpo_loss(logp, old, gen, mb["ref"].to(dev), mb["adv"].to(dev), mb["weight"].to(dev),
                           eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, is_cap=cfg.is_cap)
    (loss * d.world).backward()  # FSDP averages over ranks; the weights are global already
    acc.add(mb["weight"].to(dev) > 0, diag, ent, torch.exp(old - gen), cfg.is_cap)
    return float(loss.detach())


def reference_phase(run: Run, step: int):
    """ref <- alpha theta + (1 - alpha) ref every `ref_update_every` steps, whether this step trained or
    not."""
    if run.ref is not None and run.cfg.ref_update_every and step % run.cfg.ref_update_every == 0:
        T.reshard(run.ref)
        T.reshard(run.model)
        polyak_update(run.ref, run.model, run.cfg.ref_alpha)


def log_phase(run: Run, step: int, lr: float, outs: list, scores: list, batch: dict, upd: dict, gen: tuple,
              train_s: float, t_step: float) -> dict:
    """One metrics record, gathered over ranks, written to metrics.jsonl, and the step's log line."""
    cfg, d = run.cfg, run.d
    varied, trained = batch["varied"], batch["trained"]
    per_seq = [(o["problem"]["domain"], s, len(o["tokens"]), o["stopped"]) for o, s in zip(outs, scores)]
    gathered = [None] * d.world
    dist.all_gather_object(gathered, (per_seq, int(varied.sum()), len(varied), batch["n_nan"] + upd["n_nan"],
                                      batch["n_overlong_masked"], gen[1], gen[0], batch["train_tokens"],
                                      train_s, int(batch["varied_total"].sum())))
    ts = upd["acc"].reduce(d, has_ref=run.ref is not None)
    all_seq = [x for g in gathered for x in g[0]]
    record = {"step": step, "lr": lr, "trained": trained,
              "reward": _mean(s["reward"] for _, s, _, _ in all_seq),
              "accuracy": _mean(s["correct"] for _, s, _, _ in all_seq),
              "format_rate": _mean(float(s["is_format"]) for _, s, _, _ in all_seq)}
    for part in ("correct", "format", "stop", "repetition"):
        record[f"reward/{part}"] = _mean(s[part] for _, s, _, _ in all_seq)
    for dom in DOMAINS:
        mine_dom = [s for dm, s, _, _ in all_seq if dm == dom]
        if mine_dom:
            record[f"reward/{dom}"] = _mean(s["reward"] for s in mine_dom)
            record[f"accuracy/{dom}"] = _mean(s["correct"] for s in mine_dom)
    lengths = [n for _, _, n, _ in all_seq]
    losses, grad_norms = upd["losses"], upd["grad_norms"]
    record.update({
        "response_len": _mean(lengths), "response_len_max": max(lengths),
        "clipped_frac": _mean(float(not st_) for _, _, _, st_ in all_seq),
        "groups": sum(g[2] for g in gathered), "groups_zero_variance": sum(g[2] - g[9] for g in gathered),
        "groups_zero_variance_graded": sum(g[2] - g[1] for g in gathered),
        "groups_dropped": sum(g[2] - g[1] for g in gathered) if cfg.drop_zero_variance else 0,
        "responses_nan": sum(g[3] for g in gathered),
        "responses_overlong_masked": sum(g[4] for g in gathered),
        "grader_errors": sum(s["grader_error"] for _, s, _, _ in all_seq),
        "empty_responses": sum(s["empty"] for _, s, _, _ in all_seq),
        "trained_tokens": int(ts["tokens"]), "loss": _mean(losses) if losses else None,
        **{k: (v if trained else None) for k, v in ts.items() if k != "tokens"},
        "grad_norm": max(grad_norms) if grad_norms else None, "skipped_updates": upd["skipped"],
        "gen_s": max(g[6] for g in gathered), "gen_tokens": sum(g[5] for g in gathered),
        "train_s": max(g[8] for g in gathered), "train_tokens": sum(g[7] for g in gathered),
    })
    record["gen_tok_s"] = record["gen_tokens"] / max(record["gen_s"], 1e-9)
    record["train_tok_s"] = record["train_tokens"] / max(record["train_s"], 1e-9)
    record["step_s"] = time.perf_counter() - t_step
    record["memory_gb"] = peak_memory_gb(d)
    run.metrics.write(record)
    kl = f"{record['kl']:.4f}" if record["kl"] is not None else "-"
    run.log(f"[train_rl] step {step}/{cfg.steps} reward {record['reward']:.3f} (correct "
            f"{record['reward/correct']:.2f} format {record['reward/format']:.2f} "
            f"stop {record['reward/stop']:.2f} rep {record['reward/repetition']:.2f}) "
            f"acc {record['accuracy']:.2f} len {record['response_len']:.1f} "
            f"kl {kl} groups {record['groups'] - record['groups_dropped']}/{record['groups']} | gen "
            f"{record['gen_s']:.1f}s {record['gen_tok_s']:.0f} tok/s | train {record['train_s']:.1f}s "
            f"{record['train_tok_s']:.0f} tok/s | mem {record['memory_gb']:.2f}GB")
    return record


_LIBC = []  # [glibc handle or None], looked up once


def _glibc():
    if not _LIBC:
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None)
        except OSError:  # not glibc (macOS, musl): nothing to tune
            _LIBC.append(None)
    return _LIBC[0]


def tune_malloc(d):
    """CPU, glibc: blocks of 8 MB and more always get their own mmap, so they go back to the OS when freed.
    glibc's default threshold rises to 32 MB after big frees, and then the 10-40 MB (tokens x vocab) log-prob
    tensors land in the heap, where the holes they leave stay resident (~0.1 GB of the demo's peak)."""
    libc = _glibc() if d.device.type == "cpu" else None
    if libc is not None:
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD (fixing it also stops glibc raising it)


def trim_heap(d):
    """CPU, glibc: hand the heap's free pages back to the OS (malloc_trim, ~10 ms). Generation, the log-prob
    passes and each backward free hundreds of MB of small blocks between the weights, gradients and AdamW
    state; trimmed after each phase they no longer count toward the peak (~0.2 GB on the demo)."""
    libc = _glibc() if d.device.type == "cpu" else None
    if libc is not None:
        libc.malloc_trim(0)


def peak_memory_gb(d) -> float:
    """The peak memory so far, largest over ranks: max_memory_allocated on CUDA, peak RSS (ru_maxrss) on
    CPU."""
    import resource
    if d.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(d.device) / 1e9
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return _allreduce([peak], d, dist.ReduceOp.MAX)[0]



def heldout_eval(run: Run, when: str) -> dict:
    """Held-out reward / accuracy / format before or after training (written to heldout_WHEN.json)."""
    run.model.eval()
    res = evaluate_policy(run.model, run.tok, run.heldout, run.cfg, seed=run.cfg.seed + 99991)
    trim_heap(run.d)
    run.log(f"[train_rl] held-out {when}: reward {res['reward']:.3f} accuracy {res['accuracy']:.3f} format "
            f"{res['format']:.3f} length {res['response_len']:.1f} ({res['n']} responses); e.g. "
            f"{res['examples'][0]!r}")
    if run.d.main:
        cli.write_json(run.out / f"heldout_{when}.json", res)
    return res


def _finish(run: Run, summary: dict, step: int) -> dict:
    """The last checkpoint, held-out after, the HF export and the plot."""
    d, out = run.d, run.out
    if step > run.start_step:
        _save(run.ckpt, run.ref_dir, step, run.model, run.ref, run.optimizer, run.cfg, d)
    if run.heldout:
        after = summary["heldout_after"] = heldout_eval(run, "after")
        before = summary.get("heldout_before") or (cli.read_json(out / "heldout_before.json")
                                                    if (out / "heldout_before.json").is_file() else None)
        if before:
            summary["heldout_before"] = before
            run.log(f"[train_rl] held-out reward {before['reward']:.3f} -> {after['reward']:.3f}, accuracy "
                    f"{before['accuracy']:.3f} -> {after['accuracy']:.3f}, format {before['format']:.3f} -> "
                    f"{after['format']:.3f}")
    T.export_hf(run.model, out / "hf", d, run.base)
    if d.main:
        png = T.plot_metrics(out / "metrics.jsonl", out / "rl.png",
                             ["reward", "accuracy", "response_len", "kl", "entropy", "clip_frac",
                              "grad_norm"],
                             f"GRPO {cli.run_name(run.base)}")
        run.log(f"[train_rl] wrote {out / 'hf'}, {out / 'metrics.jsonl'}" + (f", {png}" if png else ""))
    return summary


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _save(ckpt, ref_dir, step, model, ref, optimizer, cfg, d):
    """The soft-updated reference first, then the policy (whose complete checkpoint marks the step done)."""
    extra = {"step": step, "world": d.world, "config": {k: v for k, v in vars(cfg).items()}}
    T.reshard(model)
    if ref is not None and cfg.ref_update_every and step >= cfg.ref_update_every:
        save_reference(ref, ref_dir / f"step_{step:08d}", d, keep=cfg.keep_checkpoints)
    ckpt.save(step, model, optimizer, extra)


def save_reference(ref, path: Path, d, *, keep: int):
    """DCP shards of the reference's weights (no optimizer), written to PATH.tmp and renamed when complete."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    T.reshard(ref)
    tmp = path.with_name(path.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(ref)}, checkpoint_id=str(tmp))
    dist.barrier()
    if d.main:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        done = sorted(p for p in path.parent.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_reference(ref, path: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    if not path.is_dir():
        raise DataError(f"{path}: the soft-updated reference of this checkpoint is missing")
    state = {"model": get_model_state_dict(ref)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(ref, state["model"])


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="GRPO on verifiable rewards (see the module docstring for "
                                                 "torchrun commands and the paper's settings).")
    parser.add_argument("command", nargs="?", default="train", choices=["train", "filter"],
                        help="train (default) or filter: keep the prompts in a pass-rate band (--filter-*)")
    cfg, args = cli.parse_config(Config, argv, parser=parser)

    def run():
        check_config(cfg)
        if args.command == "filter":
            return pass_rate_filter(cfg)
        return train(cfg)

    return cli.run_main(run, "train_rl.py", out=cfg.out)


if __name__ == "__main__":
    main()
