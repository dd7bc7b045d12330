"""Time train_mid.py's training step against a plain transformers model wrapped the same way, side by side.

    python -m bench train_mid                                   # CPU: SmolLM2-135M, fp32
    python -m bench train_mid --device cuda --model llama-1b    # GPU: a ~1B Llama config, bf16 FSDP params
    torchrun --nproc_per_node=8 -m bench train_mid --device cuda --model FOLDER --seq-len 8192

Both models get the same treatment from train_mid.py: fully_shard per block and root (one-process group when
not under torchrun), the same mixed-precision policy, the same AdamW and gradient clipping, the same batch.
One step = forward + loss + backward + clip + optimizer step. model.py scores the packed batch with its
document ids (what train_mid does) and chunked log-probs; transformers gets the same tokens as plain causal
sequences and its own `labels=` loss (it cannot mask documents without flash-attn's varlen path).
MFU = tokens/s x FLOPs per token (train_mid.model_flops_per_token) / (ranks x the card's bf16 peak).
Ratio > 1 means train_mid.py is faster.
"""
import argparse
import platform
import tempfile
from datetime import date

import torch

import model as M
import train_mid as T
from bench.bench_model import timed_pair


def llama_1b_folder(tmp: str) -> str:
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, tie_word_embeddings=True,
                                   rope_theta=500000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
    return tmp


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=M.DEFAULT_MODEL,
                   help="folder, hub id, smollm2-135m-instruct or llama-1b")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--activation-checkpointing", default="off", help="off, block or selective")
    args = p.parse_args()

    import transformers
    d = T.setup_distributed(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = llama_1b_folder(tmp) if args.model == "llama-1b" else str(M.resolve_model_path(args.model))
        param_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        ours = M.load_model(folder, dtype=torch.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="sdpa")
        mesh = T.build_mesh(d)
        for m in (ours, hf):
            T.shard_model(m, mesh, param_dtype=param_dtype,
                          activation_checkpointing=args.activation_checkpointing)
        ours.init_buffers()
        opts = [T.build_optimizer(m, lr=1e-5) for m in (ours, hf)]

        V, B, L = ours.config.vocab_size, args.batch_size, args.seq_len
        g = torch.Generator().manual_seed(d.rank)
        ids = torch.randint(3, V, (B, L + 1), generator=g)
        doc_ids = torch.cumsum(torch.rand(B, L, generator=g) < 4 / L, 1)  # ~4 documents per sequence
        x, y = ids[:, :-1].to(d.device), ids[:, 1:].to(d.device)
        doc_ids = doc_ids.to(d.device)

        def step_ours():
            logp = ours(x, doc_ids, labels=y)
            (-logp.mean()).backward()
            T.clip_grad_norm(ours, 1.0)
            opts[0].step()
            opts[0].zero_grad(set_to_none=True)

        def step_hf():
            hf(input_ids=x, labels=x).loss.backward()  # HF shifts labels itself: the same next-token targets
            T.clip_grad_norm(hf, 1.0)
            opts[1].step()
            opts[1].zero_grad(set_to_none=True)

        t_ours, t_hf = timed_pair(step_ours, step_hf, args.repeats, d.device.type)
        tokens = B * L * d.world
        flops = T.model_flops_per_token(ours, L)
        peak = T.peak_flops(d.device)
        if d.main:
            device = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else \
                f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
            n = sum(p.numel() for p in ours.parameters())
            print(f"\n{date.today()} | {device} | {d.world} rank(s) | torch {torch.__version__} | "
                  f"transformers {transformers.__version__} | "
                  f"params {str(param_dtype).removeprefix('torch.')} | "
                  f"AC {args.activation_checkpointing}\n")
            print("| model | batch x seq | train_mid tok/s | transformers tok/s | ratio | train_mid MFU "
                  "| transformers MFU |")
            print("|---|---|---|---|---|---|---|")
            mfu = ((lambda t: f"{tokens / t * flops / (peak * d.world) * 100:.1f}%") if peak
                   else (lambda t: "n/a"))
            print(f"| {args.model} ({n / 1e6:.0f}M) | {B} x {L} | {tokens / t_ours:,.0f} | "
                  f"{tokens / t_hf:,.0f} | {t_hf / t_ours:.2f}x | {mfu(t_ours)} | {mfu(t_hf)} |")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
