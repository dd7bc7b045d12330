"""Everything a GPU session owes, in one run on one H100/H200 (under 8 minutes): one markdown table.

    python -m bench gpu                          # writes bench_gpu.md (after each part) and prints it
    python -m bench gpu --parts train,decode     # some of the parts
    python -m bench gpu --dry-run                # every part end to end on CPU, tiny shapes (a test runs it)

Parts, run in the order correctness, decode, train, attention, ssd, rl (the most wanted first, for a run cut
short by a time limit), each in its own try block (a failure is a row of the table; the others still run):
  correctness  bf16 Triton attention and SSD, forward and every gradient, on odd shapes vs fp64 / fp32
               references (bench_kernels' checks: kernel error <= 2 x torch's own bf16 error + floor)
  attention    fwd / bwd TFLOP/s vs torch SDPA flash and cuDNN: causal GQA, d 64 / 128, 2k..16k
               (bench_kernels.timing), then packed documents and a sliding window at 8k (the same FLOPs
               as dense causal are counted, so skipped blocks show as a higher rate)
  ssd          fwd and fwd+bwd ms at Nemotron-H-8B's Mamba2 shapes vs mamba.ssd_scan eager and compiled,
               and mamba_ssm when it imports (bench_kernels.ssd_timing)
  train        train_mid's FSDP step (fully_shard, bf16 params, fp32 reduce, AdamW, clipping) on randomly
               initialised models: a 1B Llama and a Nemotron-H-shaped hybrid, 20 steps; tokens/s, MFU (vs
               train_mid.PEAK_BF16_TFLOPS) and peak memory
  decode       model.generate on the 1B Llama at batch 1 and 64, eager and compiled, vs transformers' generate
               on the same weights and the HBM limit
               (batch x bandwidth / bytes of weights read per step)
  rl           one train_rl.py step on SmolLM2 (its own entry point): rollout and update time by phase
Exit status 1 when a correctness check fails (or a part errors in --dry-run).
"""
import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

DRY = "--dry-run" in sys.argv
if DRY:  # the kernels pick the interpreter when they are defined: before anything imports them
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import model as M  # noqa: E402
from generate import generate, prepare_generation  # noqa: E402
import train_mid as T  # noqa: E402
from bench import bench_kernels as BK  # noqa: E402

PARTS = ("correctness", "decode", "train", "attention", "ssd", "rl")  # most wanted first
# HBM bandwidth (bytes/s) by card name; the first key found in the name wins (GH200 before H200, etc.)
HBM_BYTES_S = {"GH200": 4.0e12, "H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "B200": 8.0e12,
               "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12}


@dataclass
class Config:
    out: str = "bench_gpu.md"  # the markdown file written (also printed)
    parts: str = ",".join(PARTS)  # comma-separated parts to run
    dry_run: bool = False  # CPU, tiny shapes, fp32, kernels interpreted; no timing claims
    seqlens: str = "2048,4096,8192,16384"  # attention sequence lengths (tokens per batch fixed)
    tokens: int = 16384  # attention tokens per batch
    ssd_tokens: str = "32768"  # SSD tokens per batch (seqlen 8192)
    train_steps: int = 20  # steps per model (the first 3 are warm-up, not timed)
    train_seq: int = 4096  # tokens per sequence
    train_batch: int = 4  # sequences per step
    decode_batches: str = "1,64"  # comma-separated decode batch sizes
    decode_new: int = 128  # new tokens per decode run
    decode_prompt: int = 128  # prompt tokens
    rl_prompts: int = 8  # GRPO prompts per step
    rl_group: int = 8  # responses per prompt
    rl_new: int = 128  # response length limit


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in Config.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        if field.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=f"default {field.default}")
        else:
            kind = {"int": int, "str": str}.get(str(field.type), field.type)
            p.add_argument(flag, type=kind, default=field.default, help=f"default {field.default}")
    cfg = Config(**vars(p.parse_args(argv)))
    unknown = set(cfg.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    if cfg.dry_run:  # tiny everything
        cfg.seqlens, cfg.tokens, cfg.ssd_tokens = "64", 128, "96"
        cfg.train_steps, cfg.train_seq, cfg.train_batch, cfg.decode_batches = 2, 64, 2, "1,4"
        cfg.decode_new, cfg.decode_prompt, cfg.rl_prompts, cfg.rl_group, cfg.rl_new = 4, 8, 2, 2, 8
    return cfg


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wall_ms(fn):
    """The dry run's stand-in for triton.testing.do_bench (which needs CUDA): one warm call, one timed."""
    fn()
    t = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - t) * 1e3


def _captured(fn, *args):
    """(result, the markdown rows fn printed as [cells]): bench_kernels prints its tables."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn(*args)
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in buf.getvalue().splitlines()
             if line.startswith("|") and not line.startswith("|---")]
    return out, cells[1:]  # without the header


def kernel_cfg(cfg):
    """bench_kernels' Config for this run."""
    return BK.Config(seqlens=cfg.seqlens, tokens=cfg.tokens, head_dims="128,64", ssd_tokens=cfg.ssd_tokens,
                     ssd_seqlen=8192 if not cfg.dry_run else 48, group=8 if not cfg.dry_run else 2,
                     q_heads_x_dim=2048 if not cfg.dry_run else 32)


def llama_1b(dry: bool) -> dict:
    """config.json of a Llama-3.2-1B-shaped model (tiny in the dry run)."""
    raw = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
               intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    if dry:
        raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
    return raw


def nemotron_h(dry: bool) -> dict:
    """config.json of a Nemotron-H-8B-shaped hybrid at ~1.5B: the 8B's Mamba2 heads (64 x 64 here, 8 groups,
    state 128, chunk 128), attention every ~8 layers (GQA 4:1, head dim 128), squared-ReLU MLPs."""
    raw = dict(model_type="nemotron_h", architectures=["NemotronHForCausalLM"], hidden_size=2048,
               hybrid_override_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M-", num_hidden_layers=26,
               num_attention_heads=16, num_key_value_heads=4, head_dim=128, intermediate_size=8192,
               mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4,
               chunk_size=128, mlp_hidden_act="relu2", vocab_size=131072, max_position_embeddings=131072,
               tie_word_embeddings=False, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2)
    if dry:
        raw.update(hidden_size=64, hybrid_override_pattern="M*-M", num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=4,
                   mamba_head_dim=32, n_groups=2, ssm_state_size=16, chunk_size=32, vocab_size=512)
    return raw


def random_model(raw: dict, device, dtype=torch.float32):
    """model.py's CausalLM for a config.json dict, randomly initialised on `device` (no checkpoint)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = M.CausalLM(M.config_from_hf(raw, "bench_gpu"))
    for p in model.parameters():  # GPT-2-style scale: default init gives tied logits in the hundreds
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    model.init_buffers()
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------
# the parts: each returns rows (case, result, baseline, ok) and may raise
# ----------------------------------------------------------------------------------------------

def part_correctness(cfg):
    rows = []
    failed, cells = _captured(BK.correctness, kernel_cfg(cfg))
    rows += [(f"attention {c[0]}: max err o, dq, dk, dv", " / ".join(x.split(" (")[0] for x in c[1:5]),
              "torch " + " / ".join(x.split("(")[1].rstrip(")") for x in c[1:5]), c[-1] == "yes")
             for c in cells]
    failed_ssd, cells = _captured(BK.ssd_correctness, kernel_cfg(cfg))
    rows += [(f"ssd {c[0]}: rel err", c[1].replace(" (", " [torch ").replace(")", "]"), "", c[-1] == "yes")
             for c in cells]
    return rows


def part_attention(cfg):
    from kernels import attention as A

    kc = kernel_cfg(cfg)
    rows = []
    for d, s, b, hq, hkv, ours, fl, cu in BK.timing(kc):
        f = BK.fmt
        rows.append((f"causal d{d} s{s} b{b} GQA {hq}/{hkv}: TFLOP/s fwd / bwd",
                     f"{f(ours[0])} / {f(ours[1])}",
                     f"flash {f(fl[0])} / {f(fl[1])}, cuDNN {f(cu[0])} / {f(cu[1])}", None))
    # packed documents and a window: block skipping, counted at dense-causal FLOPs
    s = max(int(x) for x in cfg.seqlens.split(",")) if cfg.dry_run else 8192
    d, b = 128 if not cfg.dry_run else 16, max(1, kc.tokens // s)
    hq = max(kc.group, kc.q_heads_x_dim // d)
    hkv = hq // kc.group
    g = torch.Generator(device=BK.DEVICE).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=BK.DEVICE, dtype=BK.DTYPE, generator=g, requires_grad=True)
               for h in (hq, hkv, hkv))
    do = torch.randn_like(q)
    flops = 4 * b * s * s * hq * d / 2
    docs = BK.packed_docs(b, [s // 8] * 4 + [s // 4] * 2, 0, BK.DEVICE)  # 6 documents
    for name, kw in ((f"6 packed docs d{d} s{s}", dict(doc_ids=docs)),
                     (f"window {s // 8} d{d} s{s}", dict(window=s // 8)),
                     (f"docs + window d{d} s{s}", dict(doc_ids=docs, window=s // 8))):
        ours = BK.bench_one(lambda q_, k_, v_: A.attention(q_, k_, v_, causal=True, **kw), q, k, v, do, flops)
        rows.append((f"{name}: dense-causal TFLOP/s fwd / bwd",
                     f"{BK.fmt(ours[0])} / {BK.fmt(ours[1])}", "", None))
    return rows


def part_ssd(cfg):
    rows = []
    for tokens, b, name, t_f, t_b, gf, gb, tf, tb in BK.ssd_timing(kernel_cfg(cfg)):
        f = lambda x, n=2: "n/a" if x is None else f"{x:.{n}f}"  # noqa: E731
        rows.append((f"{tokens} tokens (b{b}) {name}: ms fwd / fwd+bwd", f"{f(t_f)} / {f(t_b)}",
                     f"{f(tf, 1)} / {f(tb, 1)} TFLOP/s", None))
    return rows


def train_steps(model, d, cfg, label):
    """train_mid's step (as in bench_train_mid) for cfg.train_steps steps on random packed tokens."""
    param_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    T.shard_model(model, T.build_mesh(d), param_dtype=param_dtype)
    model.init_buffers()
    opt = T.build_optimizer(model, lr=1e-4)
    B, L, V = cfg.train_batch, cfg.train_seq, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, L + 1), generator=g)
    doc_ids = torch.cumsum(torch.rand(B, L, generator=g) < 4 / L, 1).to(d.device)  # ~4 documents per row
    x, y = ids[:, :-1].to(d.device), ids[:, 1:].to(d.device)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(cfg.train_steps):
        t = time.perf_counter()
        logp = model(x, doc_ids, labels=y)
        loss = -logp.mean()
        loss.backward()
        loss = loss.item()
        T.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[min(3, len(times) - 1):])
    tps = B * L / dt
    peak = T.peak_flops(d.device)
    mfu = tps * T.model_flops_per_token(model, L) / peak if peak else None
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if d.device.type == "cuda" else None
    n = sum(p.numel() for p in model.parameters())
    ok = math.isfinite(loss)
    return (f"{label} ({n / 1e9:.2f}B params) {B}x{L}, {cfg.train_steps} steps: tok/s, MFU, peak mem",
            f"{tps:,.0f} tok/s, MFU {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}, "
            f"{'n/a' if mem is None else f'{mem:.1f} GiB'}", f"loss {loss:.3f}", ok)


def part_train(cfg):
    d = T.setup_distributed("cuda" if torch.cuda.is_available() and not cfg.dry_run else "cpu")
    rows = []
    try:
        for label, raw in (("Llama 1B", llama_1b(cfg.dry_run)),
                           ("Nemotron-H-shaped hybrid", nemotron_h(cfg.dry_run))):
            try:
                rows.append(train_steps(random_model(raw, d.device), d, cfg, label))
            except Exception as e:  # noqa: BLE001  (the other model still runs)
                rows.append((f"train {label}", "ERROR", _short(e), False))
            torch.cuda.empty_cache()
    finally:
        torch.distributed.destroy_process_group()
    return rows


def part_decode(cfg):
    import transformers
    dev = "cuda" if torch.cuda.is_available() and not cfg.dry_run else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = random_model(llama_1b(cfg.dry_run), dev, dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied table counted once
    name = torch.cuda.get_device_name() if dev == "cuda" else ""
    bw = next((v for k, v in HBM_BYTES_S.items() if k in name), None)
    with tempfile.TemporaryDirectory() as tmp:  # transformers gets the same weights, through a saved folder
        M.save_model(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(dev).eval()
    copy = prepare_generation(model)  # once, as evaluate.py per task: its compiled graph and cache are reused
    rows = []
    for batch in [int(b) for b in cfg.decode_batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, model.config.vocab_size, (batch, cfg.decode_prompt), generator=g)
        limit = f"HBM limit {batch * bw / weight_bytes:,.0f} tok/s" if bw else "HBM limit n/a"

        def hf_run():  # transformers' generate: greedy, its default dynamic cache, every row to the end
            with torch.no_grad():
                out = hf.generate(prompts.to(dev), attention_mask=torch.ones_like(prompts).to(dev),
                                  max_new_tokens=cfg.decode_new, min_new_tokens=cfg.decode_new,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            return [row[cfg.decode_prompt:] for row in out.tolist()]
        sides = [("transformers generate", hf_run)]
        for compiled in ((False, True) if not cfg.dry_run else (False,)):  # CPU compile: a minute, skipped
            sides.append(("compiled" if compiled else "eager",
                          lambda compiled=compiled: [s.tokens for s in generate(
                              copy, prompts.tolist(), max_new_tokens=cfg.decode_new, compile=compiled)]))
        hf_rate = None
        for side, run in sides:
            run()  # warm-up (and compile)
            _sync()
            t = time.perf_counter()
            out = run()
            _sync()
            dt = time.perf_counter() - t
            rate = sum(len(r) for r in out) / dt
            hf_rate = hf_rate or rate
            vs = "" if side.startswith("transformers") else f", {rate / hf_rate:.2f}x transformers"
            rows.append((f"1B decode batch {batch}, {cfg.decode_prompt}+{cfg.decode_new} tokens, {side}",
                         f"{rate:,.0f} tok/s", limit + vs, all(len(r) == cfg.decode_new for r in out)))
    return rows


def part_rl(cfg):
    import train_rl as R

    with tempfile.TemporaryDirectory() as tmp:
        rc = R.Config(out=tmp, steps=1, prompts_per_step=cfg.rl_prompts, group_size=cfg.rl_group,
                      max_new_tokens=cfg.rl_new, demo_eval=2 if cfg.dry_run else 8, eval_samples=1,
                      device="cuda" if torch.cuda.is_available() and not cfg.dry_run else "cpu")
        R.train(rc)
        rec = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl")) if line.strip()][-1]
    return [(f"GRPO step, SmolLM2-135M, {cfg.rl_prompts} prompts x {cfg.rl_group}, <= {cfg.rl_new} new: "
             f"rollout s / update s / step s",
             f"{rec['gen_s']:.2f} / {rec['train_s']:.2f} / {rec['step_s']:.2f}",
             f"{rec['gen_tok_s']:,.0f} gen tok/s, {rec['train_tok_s']:,.0f} train tok/s", None)]


@contextlib.contextmanager
def _kernels_in_models(on: bool):
    """Dry run: attention timing and the tiny models of train and decode run the interpreted Triton kernels
    (on CPU `attention` and model.py use SDPA and the PyTorch scan unless asked)."""
    saved = {k: os.environ.get(k) for k in ("PRISM_ATTENTION", "PRISM_SSD")}
    if on:
        os.environ.update(PRISM_ATTENTION="triton", PRISM_SSD="triton")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".replace("|", "/")


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.dry_run:
        # CPU: interpreted kernels at tiny shapes in fp32, wall-clock timing instead of CUDA events
        BK.DEVICE, BK.DTYPE, BK.COMPILE_BASELINE, BK._time = "cpu", torch.float32, False, _wall_ms
        BK.CHECKS = [("dry causal d32 gqa2", 1, 4, 2, 40, 40, 32, dict(causal=True)),
                     ("dry docs+window d16", 1, 2, 1, 40, 40, 16,
                      dict(causal=True, window=9, doc_ids=((20, 15), 5)))]
        BK.SSD_CHECKS = [("dry docs + h0", 1, 40, 2, 16, 1, 8, 16, "hp", (9, 30), True)]
        BK.SSD_SHAPE = dict(h=2, p=16, g=1, n=8, chunk=16)
    elif not torch.cuda.is_available():
        sys.exit("python -m bench gpu: needs a CUDA GPU (or --dry-run)")
    import triton

    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not cfg.dry_run else \
        f"{platform.machine()} CPU (dry run: tiny shapes, fp32, interpreted kernels; no timing claims)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows, failed = [], []

    def table() -> str:
        lines = [f"# python -m bench gpu: {card}, {now}, torch {torch.__version__}, "
                 f"triton {triton.__version__}", "",
                 "| part | case | result | baseline / limit | ok |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        if failed:
            lines += ["", "**FAILED:** " + "; ".join(failed)]
        return "\n".join(lines) + "\n"

    for part in cfg.parts.split(","):
        t = time.perf_counter()
        try:
            with _kernels_in_models(cfg.dry_run and part in ("attention", "train", "decode")):
                got = globals()[f"part_{part}"](cfg)
        except Exception as e:  # noqa: BLE001  (one part's failure must not lose the others)
            traceback.print_exc()
            got = [("(part failed)", "ERROR", _short(e), False)]
        for case, result, base, ok in got:
            rows.append((part, case, result, base, {True: "yes", False: "**NO**", None: ""}[ok]))
            if ok is False and (part == "correctness" or cfg.dry_run):
                failed.append(f"{part}: {case}")
        print(f"[bench gpu] {part}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        with open(cfg.out, "w") as f:  # after every part: a run stopped early keeps what it measured
            f.write(table())
    print(table())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
