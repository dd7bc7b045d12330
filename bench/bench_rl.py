"""One GRPO step's two halves, train_rl.py against a TRL-like plain transformers loop on the same model and
batch, side by side in one run:

    python -m bench rl                    # SmolLM2-135M, 4 prompts x 8 responses, <= 24 new tokens, CPU fp32

rollout   train_rl.rollouts (model.generate: cache allocated once, finished rows leave the batch) against
          transformers' generate(do_sample=True) on the same left-padded prompts (finished rows stay in the
          batch, as in TRL's GRPOTrainer). tokens/s = new tokens up to the stop token / wall time.
training  the same sequences (train_rl's rollout) on both sides: reference log-probs (no grad) + policy
          forward/backward of the GRPO loss. train_rl: packed rows, log-probs chunked through the lm_head
          (model.forward(labels=...)); TRL-like: right-padded batch, full (B, T, vocab) fp32 logits,
          log_softmax, gather. tokens/s = real (non-padding) tokens / wall time.
The sides alternate, median of --repeats; no FSDP on either side (one process).
"""
import argparse
import platform
import statistics
import time
from datetime import date

import torch

import model as M
import train_rl as R
from bench.bench_evaluate import hf_generate_batch


def hf_rollout(hf, prompts, *, max_new_tokens, stop_ids, seed):
    """transformers generate, sampled at temperature 1; each row's new tokens up to and including a stop."""
    torch.manual_seed(seed)
    return hf_generate_batch(hf, prompts, max_new_tokens, stop_ids, hf.device, do_sample=True,
                             temperature=1.0, top_p=1.0, top_k=0)


def hf_grpo_step(hf, ref, seqs, cfg):
    """TRL-like: right-padded (B, T) batch, full-vocab logits, the same GRPO loss and weights."""
    B, T = len(seqs), max(len(s.prompt) + len(s.response) for s in seqs)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T - 1, dtype=torch.bool)  # which next-token positions are response tokens
    gen, adv, w = torch.zeros(B, T - 1), torch.zeros(B, T - 1), torch.zeros(B, T - 1)
    for i, s in enumerate(seqs):
        n, P = len(s.prompt) + len(s.response), len(s.prompt)
        ids[i, :n] = torch.tensor(s.prompt + s.response)
        mask[i, :n] = 1
        resp[i, P - 1:n - 1] = True
        gen[i, P - 1:n - 1] = torch.tensor(s.gen_logprobs)
        adv[i, P - 1:n - 1] = s.advantage
        w[i, P - 1:n - 1] = s.weight

    def logprobs(m):
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V) at once
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    with torch.no_grad():
        ref_lp = logprobs(ref)
    lp = logprobs(hf)
    loss, _ = R.grpo_loss(lp, lp.detach(), gen, ref_lp, adv, w * resp, eps_low=cfg.eps_low,
                          eps_high=cfg.eps_high, beta=cfg.beta, is_cap=cfg.is_cap)
    loss.backward()
    hf.zero_grad(set_to_none=True)
    return int(mask.sum())


def ours_grpo_step(model, ref, seqs, cfg):
    rows = R.pack_rows(seqs, cfg.pack_tokens)
    with torch.no_grad():
        ref_lp = R.token_logprobs(ref, rows, "cpu", temperature=1.0, chunk=cfg.logprob_chunk)
    lp = R.token_logprobs(model, rows, "cpu", temperature=1.0, chunk=cfg.logprob_chunk)
    loss, _ = R.grpo_loss(lp, lp.detach(), rows["gen"], ref_lp, rows["adv"], rows["weight"],
                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, is_cap=cfg.is_cap)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return int((rows["doc_ids"] >= 0).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=M.DEFAULT_MODEL, help="model folder, hub id or the built-in default")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts (demo sums)")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24, help="response length limit")
    p.add_argument("--repeats", type=int, default=2, help="runs per side (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = p.parse_args()
    import transformers
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = R.Config(max_new_tokens=args.max_new_tokens, group_size=args.group_size, gen_batch=10 ** 6)
    tok = M.load_tokenizer(args.model)
    folder = M.resolve_model_path(args.model)
    ours = M.load_model(args.model, dtype=torch.float32)
    ours_ref = M.load_model(args.model, dtype=torch.float32).requires_grad_(False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf_ref = (transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
              .requires_grad_(False))
    problems = R.arithmetic_problems(cfg.demo_max, cfg.demo_eval, 0)[0][:args.prompts_per_step]
    prompts = [tok.encode(R.prompt_text(q, tok, cfg)) for q in problems for _ in range(args.group_size)]

    times = {k: [] for k in ("gen_ours", "gen_hf", "train_ours", "train_hf")}
    counts = {}
    seqs = None
    for rep in range(args.repeats):
        t = time.perf_counter()
        outs = R.rollouts(ours, tok, problems, cfg, n=args.group_size, temperature=1.0, seed=rep)
        times["gen_ours"].append(time.perf_counter() - t)
        counts.setdefault("gen_ours", []).append(sum(len(o["tokens"]) for o in outs))
        t = time.perf_counter()
        rows = hf_rollout(hf, prompts, max_new_tokens=args.max_new_tokens, stop_ids=tok.eos_ids, seed=rep)
        times["gen_hf"].append(time.perf_counter() - t)
        counts.setdefault("gen_hf", []).append(sum(len(r) for r in rows))
        # one fixed training batch for both sides: the first rollout, with made-up advantages
        if seqs is None:
            seqs = [R.Sequence(o["prompt"], o["tokens"], o["logprobs"], 1.0 if i % 2 else -1.0, 0.0,
                               i // args.group_size)
                    for i, o in enumerate(outs) if o["tokens"]]
            ws = R.sequence_weights([len(s.response) for s in seqs], [s.group for s in seqs], norm=cfg.loss_norm,
                                    n_groups=args.prompts_per_step, n_tokens=sum(len(s.response) for s in seqs),
                                    group_size=args.group_size, max_len=args.max_new_tokens)
            for s, w in zip(seqs, ws):
                s.weight = w
        for side, fn, m, r in (("train_ours", ours_grpo_step, ours, ours_ref),
                               ("train_hf", hf_grpo_step, hf, hf_ref)):
            t = time.perf_counter()
            counts[side] = fn(m, r, seqs, cfg)
            times[side].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    gen = {k: statistics.median(c / t for c, t in zip(counts[k], times[k])) for k in ("gen_ours", "gen_hf")}
    trn = {k: counts[k] / med[k] for k in ("train_ours", "train_hf")}
    B = len(seqs)
    L = max(len(s.prompt) + len(s.response) for s in seqs)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, float32, {date.today()}; "
          f"{folder.name}; {args.prompts_per_step} prompts x {args.group_size} responses, "
          f"<= {args.max_new_tokens} new tokens; median of {args.repeats}")
    print()
    print("| workload | TRL-like transformers tok/s | train_rl tok/s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| rollout, {B} sequences sampled at T=1 "
          f"(new tokens: {statistics.median(counts['gen_hf']):.0f} vs "
          f"{statistics.median(counts['gen_ours']):.0f}) | {gen['gen_hf']:.1f} | {gen['gen_ours']:.1f} | "
          f"{gen['gen_ours'] / gen['gen_hf']:.2f}x |")
    print(f"| GRPO update: ref log-probs + policy fwd/bwd, {B} sequences ({counts['train_ours']} tokens; "
          f"padded {B}x{L}) | {trn['train_hf']:.1f} | {trn['train_ours']:.1f} | "
          f"{trn['train_ours'] / trn['train_hf']:.2f}x |")
    print(f"\nfull-vocab logits the TRL-like side holds at once: {B} x {L - 1} x {ours.config.vocab_size} "
          f"fp32 = {B * (L - 1) * ours.config.vocab_size * 4 / 1e6:.0f} MB "
          f"(train_rl: chunks of {cfg.logprob_chunk} tokens "
          f"= {cfg.logprob_chunk * ours.config.vocab_size * 4 / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
