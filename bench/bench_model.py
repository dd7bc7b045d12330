"""Time model.py against transformers on the same config and hardware, side by side in one run.

    python -m bench model                     # ~100M-parameter Llama config + the real SmolLM2-135M
    python -m bench model --only smollm2 --dtype bfloat16 --device cuda
    python -m bench model --only smollm2 --gen-only --threads 1 --quantize none bf16 int8 --compile off

Forward+backward: one training step's forward and backward (no optimizer) on a (batch, seq) batch.
Generation: greedy decoding of `new_tokens` tokens after a `prompt_len`-token prompt, tokens/s counted
over all rows, transformers' `generate` with its default dynamic cache and `eos_token_id=None`.
Prints a markdown table; ratio > 1 means model.py is faster. "of limit" puts model.py's generation rate
against this machine's limit measured in the same run: per decode step, max(bytes of weights read /
measured copy bandwidth, FLOPs / measured matmul rate) (see machine_limits); --quantize bf16/int8 read
fewer bytes, --compile on/off/auto picks model.generate's compile. "greedy agreement" is the share of
model.py's generated tokens before each row's first divergence from transformers' greedy tokens (fp32
transformers against bf16/int8 weights: the agreement of those weights with fp32); for SmolLM2 measured
on the eight chat questions (real text, up to `new_tokens` each, stop at EOS), for the random model on the
timed random prompts.
"""
import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import date

import torch

import generate as G
import model as M
from bench.bench_evaluate import hf_generate_batch


COMPILE = {"auto": None, "on": True, "off": False}


def timed_pair(fn_a, fn_b, repeats: int, device: str) -> tuple:
    """Median wall times of fn_a() and fn_b(), alternated run by run after one warm-up each,
    so that anything else loading the machine affects both alike."""
    fn_a(), fn_b()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device, repeats=5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def machine_limits(device: str, dtype) -> dict:
    """Copy bandwidth (bytes read + written per second, 256 MB buffers) and matmul rate (FLOP/s of a
    2048^3 matmul in `dtype`), best of a few runs: the two ceilings of a decode step."""
    src = torch.empty(64 * 1024 ** 2, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device)
    bandwidth = 2 * src.numel() * 4 / t
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    t = _best_time(lambda: a @ a, device)
    return {"bandwidth": bandwidth, "flops": 2 * 2048 ** 3 / t}


def step_limit(model, batch: int, limits: dict, quantize: str | None) -> float:
    """Tokens/s at the machine's limit for a decode step of `batch` rows: every matmul weight read once
    (the embedding table only when it doubles as lm_head), 2 FLOPs per weight per row."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    n_matmul = n + (model.model.embed_tokens.weight.numel() if model.config.tie_word_embeddings else 0)
    width = {"int8": 1, "bf16": 2}.get(quantize, model.model.embed_tokens.weight.element_size())
    seconds = max(n_matmul * width / limits["bandwidth"], 2 * batch * n_matmul / limits["flops"])
    return batch / seconds


def build_pair(name: str, folder: str, dtype, device):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                           attn_implementation="sdpa").to(device)
    ours = M.load_model(folder, dtype=dtype, device=device)
    n = sum(p.numel() for p in ours.parameters())
    return hf, ours, f"{name} ({n / 1e6:.0f}M)"


def random_llama_folder(tmp: str) -> str:
    """A ~100M-parameter Llama-architecture model with random weights, saved in HF layout."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                   num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
    return tmp


def bench(label, hf, ours, args, device, rows, limits, tok=None):
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def step(m, fn):
        def run():
            m.zero_grad(set_to_none=True)
            fn(m, ids).float().logsumexp(-1).mean().backward()
        return run

    if not args.gen_only:
        ours.train()
        t_hf, t_ours = timed_pair(step(hf, lambda m, x: m(x).logits), step(ours, lambda m, x: m(x)),
                                  args.repeats, device)
        tokens = args.batch * args.seq
        rows.append((label, f"fwd+bwd {args.batch}x{args.seq}", tokens / t_hf, tokens / t_ours, None, None))
        print(rows[-1], flush=True)
        ours.eval()

    new = args.new_tokens
    # a real model's agreement is measured on real text: on random-token prompts its near-ties make it noise
    chat_reference = (hf_generate_batch(hf, chat_prompts(tok), new, tok.eos_ids, device) if tok is not None
                      else None)
    for batch in args.gen_batches:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), device=device)

        generated = {}  # side -> each row's new tokens, from its last timed run

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out.shape[1] == args.prompt_len + new
            generated["hf"] = out[:, args.prompt_len:].tolist()

        for quantize in args.quantize:
            q = None if quantize == "none" else quantize
            gm = G.prepare_generation(ours, quantize=q)  # built once, as a caller generating repeatedly would

            def ours_generate():
                samples = M.generate(gm, prompts.tolist(), max_new_tokens=new, compile=COMPILE[args.compile])
                generated["ours"] = [s.tokens for s in samples]

            t_hf, t_ours = timed_pair(hf_generate, ours_generate, args.repeats, device)
            rate = batch * new / t_ours
            agree = (chat_agreement(chat_reference, gm, tok, new) if tok is not None
                     else greedy_agreement(generated["hf"], generated["ours"]))
            rows.append((label, f"greedy generate b={batch}, {args.prompt_len}+{new}, weights {quantize}, "
                                f"compile {args.compile}", batch * new / t_hf, rate,
                         rate / step_limit(ours, batch, limits, q), agree))
            print(rows[-1], flush=True)


def greedy_agreement(reference: list, rows: list) -> float:
    """The share of generated tokens before each row's first divergence from the reference's greedy tokens
    (after a divergence the two continue from different texts, so later tokens are not comparable)."""
    agreed = 0
    for ref, row in zip(reference, rows, strict=True):
        agreed += next((i for i, (a, b) in enumerate(zip(ref, row)) if a != b), min(len(ref), len(row)))
    return agreed / sum(len(ref) for ref in reference)


CHAT_QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 17 * 23?",
                  "Name three primary colors.", "Explain photosynthesis in two sentences.",
                  "Write a Python function that reverses a string.", "Who wrote Hamlet?",
                  "Give me a short tip for learning to cook."]


def chat_prompts(tok) -> list:
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in CHAT_QUESTIONS]


def chat_agreement(reference: list, gm, tok, new: int) -> float:
    """greedy_agreement of model.py's generation copy `gm` on the chat questions (each row stops at EOS) with
    transformers' tokens there, `reference` (hf_generate_batch)."""
    samples = M.generate(gm, chat_prompts(tok), max_new_tokens=new, stop_ids=tok.eos_ids)
    return greedy_agreement(reference, [s.tokens for s in samples])


def bench_chat(label, hf, ours, tok, args, device, rows):
    """The evaluation/RL shape: chat prompts of different lengths, greedy, each row stops at EOS.
    Tokens/s counts the tokens each row really produced (up to and including its stop token)."""
    prompts = chat_prompts(tok)
    stop, new = tok.eos_ids, args.chat_new_tokens
    produced = []

    def hf_generate():  # each row's tokens up to and including its stop
        produced.append(sum(len(r) for r in hf_generate_batch(hf, prompts, new, stop, device)))

    def ours_generate():
        produced.append(sum(len(s.tokens) for s in M.generate(ours, prompts, max_new_tokens=new,
                                                              stop_ids=stop, compile=COMPILE[args.compile])))

    t_hf, t_ours = timed_pair(hf_generate, ours_generate, args.repeats, device)
    hf_tokens, ours_tokens = produced[0], produced[1]
    assert hf_tokens == ours_tokens, (hf_tokens, ours_tokens)  # the same greedy answers on both sides
    rows.append((label, f"chat b={len(prompts)}, greedy, stop at EOS, <= {new} new ({ours_tokens} produced)",
                 hf_tokens / t_hf, ours_tokens / t_ours, None, None))
    print(rows[-1], flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["random100m", "smollm2"], default=None,
                   help="run one of the two models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--batch", type=int, default=4, help="forward+backward batch size")
    p.add_argument("--seq", type=int, default=256, help="forward+backward sequence length")
    p.add_argument("--prompt-len", type=int, default=32, help="generation prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per row")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    p.add_argument("--repeats", type=int, default=4, help="timed repetitions (median reported)")
    p.add_argument("--chat-new-tokens", type=int, default=256,
                   help="SmolLM2 chat workload: new tokens at most")
    p.add_argument("--compile", choices=list(COMPILE), default="auto",
                   help="model.generate's compile: auto (None), on, off")
    p.add_argument("--quantize", nargs="+", choices=["none", "bf16", "int8"], default=["none"],
                   help="generation weights (model.prepare_generation), one row each")
    p.add_argument("--gen-only", action="store_true", help="generation rows only (no fwd+bwd, no chat)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    limits = machine_limits(args.device, dtype)
    print(f"machine: copy bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s, matmul {limits['flops'] / 1e9:.0f} "
          f"GFLOP/s ({args.dtype})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "random100m"):
            hf, ours, label = build_pair("Llama random", random_llama_folder(tmp), dtype, args.device)
            bench(label, hf, ours, args, args.device, rows, limits)
            del hf, ours
        if args.only in (None, "smollm2"):
            hf, ours, label = build_pair("SmolLM2", str(M.resolve_model_path(M.DEFAULT_MODEL)), dtype,
                                         args.device)
            tok = M.load_tokenizer(M.DEFAULT_MODEL)
            bench(label, hf, ours, args, args.device, rows, limits, tok)
            if not args.gen_only:
                bench_chat(label, hf, ours, tok, args, args.device, rows)

    hardware = (torch.cuda.get_device_name() if args.device == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\n{hardware}, {args.dtype}, torch {torch.__version__}, {date.today()}\n")
    print(f"copy bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s, matmul {limits['flops'] / 1e9:.0f} GFLOP/s, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| model | workload | transformers tok/s | model.py tok/s | ratio | of limit | greedy agreement |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, work, hf_tps, ours_tps, frac, agree in rows:
        share = "" if frac is None else f"{frac:.0%}"
        agreement = "" if agree is None else f"{agree:.3f}"
        print(f"| {label} | {work} | {hf_tps:,.0f} | {ours_tps:,.0f} | {ours_tps / hf_tps:.2f}x | {share} "
              f"| {agreement} |")


if __name__ == "__main__":
    main()
