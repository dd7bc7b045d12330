"""Problems per second of a small GSM8K evaluation: model.generate against a plain transformers
`generate` loop with the same prompts, batches and settings, side by side in one run.

    python -m bench evaluate                          # 16 GSM8K problems, SmolLM2, greedy, 192 new tokens

Both sides get the same token ids (the project's tokenizer), left padding, the same stop tokens, and
are graded by evaluate.check_math; times include generation and grading, not loading (nor building
model.py's generation copy, which evaluate.py does once per task: ~0.7 s for SmolLM2 on CPU).
"""
import argparse
import os
import platform
import time
from datetime import date

import torch

import evaluate as E
import model as M
from generate import generate, prepare_generation


def hf_generate_batch(hf, prompts, max_new_tokens, stop_ids, device, **sampling):
    """transformers' generate on left-padded token ids (greedy unless `sampling` says otherwise, e.g.
    do_sample=True, temperature=1.0); returns each row's new tokens up to and including a stop."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                          eos_token_id=list(stop_ids), pad_token_id=stop_ids[0],
                          **{"do_sample": False, **sampling})
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=M.DEFAULT_MODEL, help="model folder, hub id or the built-in default")
    p.add_argument("--problems", type=int, default=16, help="GSM8K problems (the first N)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=192, help="new tokens per response at most")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="model.generate's compile")
    p.add_argument("--quantize", choices=["none", "bf16", "int8"], default="none", help="generation weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    problems, source = E.load_task("gsm8k", E.Config(offline=True))
    problems = problems[:args.problems]
    tok = M.load_tokenizer(args.model)
    dtype = getattr(torch, args.dtype)
    ours = M.load_model(args.model, device=args.device, dtype=dtype)
    folder = M.resolve_model_path(args.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user",
                                                    "content": E.build_prompt("gsm8k", q, "plain")}]))
               for q in problems]
    stop = tok.eos_ids

    def run(generate_batch):
        t = time.perf_counter()
        correct, responses = 0, []
        for start in range(0, len(prompts), args.batch_size):
            rows = generate_batch(prompts[start:start + args.batch_size])
            for q, new in zip(problems[start:start + args.batch_size], rows):
                correct += E.check_math(tok.decode([t for t in new if t not in stop]), q["gold"])
            responses += rows
        return time.perf_counter() - t, correct, responses

    compile = {"auto": None, "on": True, "off": False}[args.compile]
    quantize = None if args.quantize == "none" else args.quantize
    gm = prepare_generation(ours, quantize=quantize)  # once, as evaluate.py's runner builds it per task
    ours_batch = lambda batch: [s.tokens for s in generate(gm, batch, max_new_tokens=args.max_new_tokens,
                                                             stop_ids=stop, compile=compile)]
    hf_batch = lambda batch: hf_generate_batch(hf, batch, args.max_new_tokens, stop, args.device)
    run(lambda batch: ours_batch(batch[:1])), run(lambda batch: hf_batch(batch[:1]))  # warm-up
    t_hf, c_hf, hf_rows = run(hf_batch)
    t_ours, c_ours, ours_rows = run(ours_batch)
    same = sum(a == b for a, b in zip(hf_rows, ours_rows))
    tokens = sum(len(r) for r in ours_rows)

    hardware = (torch.cuda.get_device_name() if args.device == "cuda"
                else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\nGSM8K ({source}), {len(problems)} problems, batch {args.batch_size}, greedy, "
          f"<= {args.max_new_tokens} new tokens; {hardware}, {args.dtype}, "
          f"compile {args.compile}, weights {args.quantize}, "
          f"load average {os.getloadavg()[0]:.1f}, {date.today()}\n")
    print("| side | problems/s | correct | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| transformers generate loop | {len(problems) / t_hf:.3f} | {c_hf}/{len(problems)} | 1.00x |")
    print(f"| evaluate.py (model.generate) | {len(problems) / t_ours:.3f} | {c_ours}/{len(problems)} | "
          f"{t_hf / t_ours:.2f}x |")
    print(f"\n{same}/{len(problems)} responses token for token the same as transformers'; model.py generated "
          f"{tokens} tokens ({tokens / len(problems):.0f} per problem, {tokens / t_ours:.1f} tok/s)")


if __name__ == "__main__":
    main()
