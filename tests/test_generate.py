"""model.generate's static decode path on every dense and hybrid family (tiny random configs of
test_model / test_hybrid, fp32): greedy tokens and log-probs against a full forward per new token (ours and
transformers'), ragged prompts with rows stopping at different steps, seeded sampling independent of which
rows are still live, the sampler's rates against the truncated distribution, the compiled step without
recompiles, and the generation-only copy (fusion, bf16, int8)."""
import pytest
import torch

import generate as GEN
import model as M
import test_hybrid as hybrid
import test_model as dense

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = [("dense", f) for f in dense.FAMILIES] + [("hybrid", v) for v in hybrid.VARIANTS]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22, 23, 24, 25, 26, 27, 28],
           [29, 30, 31]]
NEW = 12


def build(kind, name, tmp_path_factory):
    torch.manual_seed(0)
    if kind == "dense":
        hf = transformers.AutoModelForCausalLM.from_config(dense.tiny_config(name),
                                                           dtype=torch.float32).eval()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if pname.endswith("norm.weight") or pname.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
    else:
        cfg, _ = hybrid.tiny_config(name)
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        hybrid.randomize(hf, seed=hybrid.VARIANTS.index(name))
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return hf, M.load_model(str(folder), dtype=torch.float32)


@pytest.fixture(scope="module", params=FAMILIES, ids=[n for _, n in FAMILIES])
def pair(request, tmp_path_factory):
    return build(*request.param, tmp_path_factory)


def full_forward_greedy(forward, prompt, n, stop=()):
    """Greedy decoding by a full forward over the whole sequence for every new token (no cache):
    (tokens, log-probs), ending at a stop token."""
    ids, tokens, logprobs = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(forward(ids)[0, -1].float(), dim=-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            logprobs.append(lp[tok].item())
            if tok in stop:
                break
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return tokens, logprobs


def stop_at_different_steps(samples):
    """A stop token that ends the rows at different steps (some rows may never meet it)."""
    for s in samples:
        for tok in s.tokens[1:-2]:
            firsts = {r.tokens.index(tok) for r in samples if tok in r.tokens}
            if len(firsts) >= 2 or sum(tok in r.tokens for r in samples) < len(samples):
                return tok
    return samples[0].tokens[2]


def test_greedy_equals_full_forward_with_rows_stopping(pair):
    hf, ours = pair
    free = GEN.generate(ours, PROMPTS, max_new_tokens=NEW)
    for p, s in zip(PROMPTS, free):
        assert s.tokens == full_forward_greedy(lambda x: hf(x).logits, p, NEW)[0]  # transformers
    stop = stop_at_different_steps(free)
    for kwargs in ({}, {"fuse": False}):
        stopped = GEN.generate(ours, PROMPTS, max_new_tokens=NEW, stop_ids=[stop], **kwargs)
        assert len({len(s.tokens) for s in stopped}) >= 2  # rows finished at different steps
        for p, s in zip(PROMPTS, stopped):
            tokens, logprobs = full_forward_greedy(ours, p, NEW, stop=(stop,))  # our eager forward
            assert s.tokens == tokens
            assert s.logprobs == pytest.approx(logprobs, abs=1e-5)


def test_rows_done_reported_as_they_finish(pair):
    """on_rows_done counts each row once, when its stop token comes (on CPU: the step it finishes), the rest
    at the end: a progress bar over samples moves per sample and ends at the batch size."""
    _, ours = pair
    free = GEN.generate(ours, PROMPTS, max_new_tokens=NEW)
    stop = stop_at_different_steps(free)
    calls = []
    stopped = GEN.generate(ours, PROMPTS, max_new_tokens=NEW, stop_ids=[stop], on_rows_done=calls.append)
    assert sum(calls) == len(PROMPTS) and all(c > 0 for c in calls)
    ends = sorted(len(s.tokens) for s in stopped if s.tokens[-1] == stop)  # steps at which rows stopped
    assert len(calls) >= len(set(ends))  # one call per distinct finishing step at least
    assert calls[:len(set(ends))] == [ends.count(e) for e in sorted(set(ends))]


def test_sampling_seeded_and_independent_of_live_rows(pair):
    """The same seed gives the same samples; a row's samples do not change when other rows stop
    (and the eager batch is compacted)."""
    _, ours = pair
    kw = dict(max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=5)
    a, b = GEN.generate(ours, PROMPTS, **kw), GEN.generate(ours, PROMPTS, **kw)
    assert ([s.tokens for s in a] == [s.tokens for s in b]
            and [s.logprobs for s in a] == [s.logprobs for s in b])
    stop = stop_at_different_steps(a)
    stopped = GEN.generate(ours, PROMPTS, stop_ids=[stop], **kw)
    for f, s in zip(a, stopped):
        cut = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
        assert s.tokens == f.tokens[:cut]
        assert s.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8), (1.3, 0.5)])
def test_sampled_tokens_follow_the_truncated_distribution(temperature, top_p):
    """sample_next draws each token at the rate of the temperature-scaled, top-p-truncated distribution
    (built here in fp64 by walking the tokens from the most likely down), never a token outside the nucleus,
    and reports that distribution's log-prob; 60,000 draws of one 40-token row, each rate within 5 standard
    deviations of its probability."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, generator=gen, dtype=torch.float64) * 2  # one row: (V,)
    p = torch.softmax(logits / temperature, dim=0)
    expected, mass = torch.zeros_like(p), 0.0
    for i in sorted(range(40), key=lambda i: -p[i].item()):  # the smallest prefix whose mass reaches top_p
        if mass >= top_p:
            break
        expected[i], mass = p[i], mass + p[i].item()
    expected /= expected.sum()
    n, rows = 60_000, 2_000  # draws, in calls of `rows` rows
    draws = [GEN.sample_next(logits.float().expand(rows, 40), temperature, top_p,
                             torch.rand(rows, generator=gen, dtype=torch.float64)) for _ in range(n // rows)]
    tokens, logprobs = torch.cat([t for t, _ in draws]), torch.cat([lp for _, lp in draws])  # (n,), (n,)
    rate = torch.bincount(tokens, minlength=40).double() / n
    assert (rate[expected == 0] == 0).all()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((rate - expected).abs() <= 5 * sigma + 1e-9).all(), (rate - expected).abs().max()
    assert torch.allclose(logprobs.double(), expected[tokens].log(), atol=1e-5)


def test_nucleus_by_radix_select_equals_the_sorted_prefix():
    """in_nucleus's two ways (radix select on CPU, the sort on GPUs) keep the same tokens on rows without
    ties, peaked or flat, over a 49k vocabulary; with ties at the edge the radix select keeps all of them,
    the sort as many as reach top_p."""
    gen = torch.Generator().manual_seed(2)
    for spread, top_p in ((1.0, 0.95), (3.0, 0.9), (8.0, 0.5), (8.0, 0.999)):
        p = torch.softmax(torch.randn(6, 49152, generator=gen) * spread, dim=-1)
        by_sort = GEN.in_nucleus(p, top_p, by_sort=True)
        assert torch.equal(GEN.in_nucleus(p, top_p, by_sort=False), by_sort)
        assert (by_sort.sum(-1) >= 1).all() and (by_sort.sum(-1) < 49152).all()
    p = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]])  # the edge at 0.5 falls inside the tied 0.2s
    assert GEN.in_nucleus(p, 0.5, by_sort=False).tolist() == [[True, True, True, False, False]]
    assert GEN.in_nucleus(p, 0.5, by_sort=True).sum().item() == 2


def test_int8_weights_within_half_a_step_of_the_stored_scale():
    """Int8Linear: every weight within half a quantisation step of the scale as stored (bf16 on CPU), the
    largest |w| of each row at +-127 or +-126, for odd sizes and rows spanning several orders of magnitude."""
    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(50, 37, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 50, generator=g) * torch.logspace(-4, 1, 37)[:, None])
    q = GEN.Int8Linear(lin)
    step = q.scales.float()[:, None]  # (out, 1) what the kernel multiplies by
    assert q.scales.dtype == torch.bfloat16 and q.weight.dtype == torch.int8
    assert ((step * q.weight.float() - lin.weight).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (q.weight.abs().amax(dim=1) >= 126).all()


def test_generation_copy_shares_weights_and_keeps_names(pair):
    """prepare_generation leaves the model, its parameter names and what save_model writes unchanged; the
    fp32 copy gives the model's logits, bf16 and int8 copies stay close to them on average (random hybrids
    blow a few logits up chaotically: over 16 prompts the largest int8 error of 6 of the 8 reached 0.8-4.9, so
    the bound is on the mean; a quantiser with a wrong scale is off by about the logits' own size)."""
    _, ours = pair
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        ref = ours(ids)
        assert (GEN.prepare_generation(ours)(ids) - ref).abs().max() <= 1e-5
        for quantize in ("bf16", "int8"):
            got = GEN.prepare_generation(ours, quantize=quantize)(ids).float()
            assert (got - ref).abs().mean() <= 0.1 * ref.abs().mean(), quantize
    after = ours.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == ptrs[k] and torch.equal(after[k], before[k]) for k in after)
    assert all(getattr(m, "qkv_proj", None) is None and getattr(m, "gate_up_proj", None) is None
               for m in ours.modules())


@pytest.mark.parametrize("family",
                         [("dense", "llama"), ("hybrid", "mamba2"), ("hybrid", "granite_dense_rope")],
                         ids=["llama", "mamba2", "granite_dense_rope"])
def test_compiled_step_matches_eager_without_recompiles(family, tmp_path_factory):
    """compile=True: the same tokens and log-probs as the eager step, and no new graph while rows finish
    (counted by dynamo), neither within a call nor in a second call with other rows stopping."""
    from torch._dynamo.utils import counters
    _, ours = build(*family, tmp_path_factory)
    free = GEN.generate(ours, PROMPTS, max_new_tokens=NEW)
    stop = stop_at_different_steps(free)
    torch._dynamo.reset()
    counters.clear()
    first = GEN.generate(ours, PROMPTS, max_new_tokens=NEW, stop_ids=[stop], compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["recompiles"]
    eager = GEN.generate(ours, PROMPTS, max_new_tokens=NEW, stop_ids=[stop], compile=False)
    for c, e in zip(first, eager):
        assert c.tokens == e.tokens
        assert c.logprobs == pytest.approx(e.logprobs, abs=1e-5)
    other = stop_at_different_steps(list(reversed(free)))
    GEN.generate(ours, PROMPTS, max_new_tokens=NEW, stop_ids=[stop, other], compile=True, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]


@pytest.mark.parametrize("family", [("dense", "llama"), ("hybrid", "mamba2")], ids=["llama", "mamba2"])
def test_compiled_step_shared_by_calls_of_other_batches_and_lengths(family, tmp_path_factory):
    """Calls whose batch (padded to a power of two) and cache length (rounded up by _bucket) fall in the same
    buckets run the graph the first call compiled, on the same cache tensors, emptied in between; each gives
    the eager path's tokens and log-probs, greedy and sampled (padding rows take no draws of their own). The
    log-probs agree to 1e-5 relative: fp32 rounding of the Mamba recurrence compiled and eager puts one of them
    1.5e-5 apart (-3.18339 against -3.18338), with sampling in the graph or outside it."""
    from torch._dynamo.utils import counters
    _, ours = build(*family, tmp_path_factory)
    copy = GEN.prepare_generation(ours)
    torch._dynamo.reset()
    counters.clear()
    calls = [PROMPTS, PROMPTS[:3], [p + [40, 41, 42] for p in reversed(PROMPTS)]]  # 4 rows, 3, 4 longer
    for i, prompts in enumerate(calls):
        for kwargs in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
            done = []  # no stop token: every row finishes with the last step, and padding rows never count
            compiled = GEN.generate(copy, prompts, max_new_tokens=NEW, compile=True, on_rows_done=done.append,
                                    **kwargs)
            eager = GEN.generate(copy, prompts, max_new_tokens=NEW, compile=False, **kwargs)
            assert len(compiled) == len(prompts) and done == [len(prompts)]
            for c, e in zip(compiled, eager):
                assert c.tokens == e.tokens
                assert c.logprobs == pytest.approx(e.logprobs, rel=1e-5, abs=1e-5)
        if i == 0:  # one graph per sampling setting (temperature and top_p are constants of the graph)
            graphs, cache = counters["stats"]["unique_graphs"], copy.kept_decode_cache[1]
            recompiles = dict(counters["recompiles"])
    assert counters["stats"]["unique_graphs"] == graphs == 2 and counters["recompiles"] == recompiles
    assert copy.kept_decode_cache[1] is cache
    assert [GEN._bucket(n) for n in (1, 64, 65, 300, 33000)] == [64, 64, 72, 320, 36864]
