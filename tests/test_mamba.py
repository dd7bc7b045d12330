"""mamba.py: chunked SSD scan vs the per-step recurrence (values, documents, gradients); Mamba2Mixer vs
transformers' Mamba2 / Nemotron-H / GraniteMoeHybrid mixers; prefill + decode and padding consistency."""
import pytest
import torch

import mamba

INF = float("inf")
TOL = 1e-4


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def scan_inputs(b=2, l=37, h=6, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(
        x=r(b, l, h, p), dt=r(b, l, h) * 0.5, A=-torch.exp(r(h)), B=r(b, l, g, n), C=r(b, l, g, n),
        D_h=r(h), D_hp=r(h, p), dt_bias=r(h) * 0.5, h0=r(b, h, p, n),
    )


# ---------------------------------------------------------------------------------------------- SSD scan

SCAN_CASES = {  # name: (l, chunk_size, g, D kind, dt options, initial state)
    "l37_c8_g2_Dh_softplus_limit_h0": (37, 8, 2, "h",
                                       dict(dt_softplus=True, dt_bias=True, dt_limit=(0.2, 0.9)), True),
    "l37_c8_g1_Dhp_softplus": (37, 8, 1, "hp", dict(dt_softplus=True, dt_bias=True), False),
    "l5_c16_g3_noD_h0": (5, 16, 3, None, dict(dt_softplus=True), True),
    "l24_c8_g2_raw_dt_clamped": (24, 8, 2, "h", dict(dt_limit=(0.0, 0.7)), True),  # raw dt < 0 clamps to 0
    "l1_c4_g6": (1, 4, 6, "hp", dict(dt_softplus=True, dt_bias=True), True),
}


def scan_kwargs(v, D_kind, dt_opts, use_h0):
    kw = dict(dt_softplus=dt_opts.get("dt_softplus", False), dt_limit=dt_opts.get("dt_limit", (0.0, INF)))
    kw["dt_bias"] = v["dt_bias"] if dt_opts.get("dt_bias") else None
    kw["D"] = {"h": v["D_h"], "hp": v["D_hp"], None: None}[D_kind]
    kw["initial_states"] = v["h0"] if use_h0 else None
    return kw


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_ssd_chunked_matches_recurrence(case):
    l, Q, g, D_kind, dt_opts, use_h0 = SCAN_CASES[case]
    v = scan_inputs(l=l, g=g, seed=list(SCAN_CASES).index(case))
    kw = scan_kwargs(v, D_kind, dt_opts, use_h0)
    y, h_last = mamba.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=Q,
                               return_final_states=True, **kw)
    y_ref, h_ref = mamba.ssd_scan_naive(v["x"], v["dt"], v["A"], v["B"], v["C"],
                                        return_final_states=True, **kw)
    assert y.shape == v["x"].shape and h_last.shape == v["h0"].shape
    assert maxdiff(y, y_ref) < TOL and maxdiff(h_last, h_ref) < TOL
    assert torch.equal(mamba.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=Q, **kw), y)


def test_ssd_chunk_size_does_not_matter_and_dtype_kept():
    v = scan_inputs(l=29)
    ys = [mamba.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=Q, D=v["D_h"], dt_softplus=True)
          for Q in (1, 4, 7, 64)]
    assert max(maxdiff(y, ys[0]) for y in ys) < TOL
    y16 = mamba.ssd_scan(v["x"].bfloat16(), v["dt"], v["A"], v["B"].bfloat16(), v["C"].bfloat16(),
                         chunk_size=8, dt_softplus=True)
    assert y16.dtype == torch.bfloat16


def test_ssd_seq_idx_packed_equals_documents_run_separately():
    lengths = [5, 11, 8, 1, 12]  # boundaries inside chunks, on a chunk boundary (24), one-token document
    v = scan_inputs(b=1, l=sum(lengths), g=2, seed=3)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]  # (1, l)
    kw = dict(D=v["D_hp"], dt_bias=v["dt_bias"], dt_softplus=True, dt_limit=(0.1, 2.0))
    y, h_last = mamba.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=8, seq_idx=seq_idx,
                               initial_states=v["h0"][:1], return_final_states=True, **kw)
    y_naive = mamba.ssd_scan_naive(v["x"], v["dt"], v["A"], v["B"], v["C"], seq_idx=seq_idx,
                                   initial_states=v["h0"][:1], **kw)
    assert maxdiff(y, y_naive) < TOL
    start = 0
    for i, n in enumerate(lengths):
        s = slice(start, start + n)
        y_doc, h_doc = mamba.ssd_scan(v["x"][:, s], v["dt"][:, s], v["A"], v["B"][:, s], v["C"][:, s],
                                      chunk_size=8, initial_states=v["h0"][:1] if i == 0 else None,
                                      return_final_states=True, **kw)
        assert maxdiff(y[:, s], y_doc) < TOL, f"document {i}"
        start += n
    assert maxdiff(h_last, h_doc) < TOL
    # a different id value with the same boundaries gives the same result (only changes matter)
    y2 = mamba.ssd_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=8, seq_idx=seq_idx * 7 + 3,
                        initial_states=v["h0"][:1], **kw)
    assert maxdiff(y, y2) == 0.0


def test_ssd_backward_matches_recurrence():
    v = scan_inputs(b=2, l=19, h=4, p=3, g=2, n=4, seed=5)
    seq_idx = torch.tensor([[0] * 7 + [1] * 12, [4] * 19])
    names = ["x", "dt", "A", "B", "C", "D_hp", "dt_bias", "h0"]
    gen = torch.Generator().manual_seed(1)
    w_y, w_h = torch.randn(2, 19, 4, 3, generator=gen), torch.randn(2, 4, 3, 4, generator=gen)
    grads = []
    for fn in (mamba.ssd_scan, mamba.ssd_scan_naive):
        t = {k: v[k].clone().requires_grad_() for k in names}
        y, h_last = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=8, D=t["D_hp"],
                       dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.05, 1.5), initial_states=t["h0"],
                       seq_idx=seq_idx, return_final_states=True)
        ((y * w_y).sum() + (h_last * w_h).sum()).backward()
        grads.append({k: t[k].grad for k in names})
    for k in names:
        assert grads[0][k] is not None and grads[0][k].abs().sum() > 0, k
        d = maxdiff(grads[0][k], grads[1][k])
        assert d < 1e-4 * (1 + grads[1][k].abs().max().item()), (k, d)


def test_kernels_ssd_scan_torch_path_backward(monkeypatch):
    """kernels.ssd.ssd_scan without the kernels (PRISM_SSD=torch) is mamba's chunked scan itself, and autograd
    goes through it, initial and final states included (the old per-step fallback wrote its state in
    place)."""
    from kernels import ssd as K
    monkeypatch.setenv("PRISM_SSD", "torch")
    assert mamba.ssd_scan is K.ssd_scan_torch  # one implementation, re-exported
    v = scan_inputs(b=2, l=11, h=4, p=3, g=2, n=4, seed=7)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [2] * 11])
    names = ["x", "dt", "A", "B", "C", "D_hp", "dt_bias", "h0"]
    gen = torch.Generator().manual_seed(2)
    w_y, w_h = torch.randn(2, 11, 4, 3, generator=gen), torch.randn(2, 4, 3, 4, generator=gen)
    grads = []
    for fn in (K.ssd_scan, mamba.ssd_scan_naive):
        t = {k: v[k].clone().requires_grad_() for k in names}
        y, h_last = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=4, D=t["D_hp"],
                       dt_bias=t["dt_bias"], dt_softplus=True, initial_states=t["h0"], seq_idx=seq_idx,
                       return_final_states=True)
        ((y * w_y).sum() + (h_last * w_h).sum()).backward()
        grads.append({k: t[k].grad for k in names})
    for k in names:
        assert grads[0][k] is not None and grads[0][k].abs().sum() > 0, k
        assert maxdiff(grads[0][k], grads[1][k]) < 1e-4 * (1 + grads[1][k].abs().max().item()), k


@pytest.mark.parametrize("bad", ["dt", "A", "B", "D", "h0", "groups", "chunk"])
def test_ssd_bad_shapes_raise(bad):
    v = scan_inputs(l=8, g=2)
    args = dict(x=v["x"], dt=v["dt"], A=v["A"], B=v["B"], C=v["C"])
    kw = dict(chunk_size=4)
    field = bad
    if bad == "dt":
        args["dt"] = v["dt"][:, :, :2]
    elif bad == "A":
        args["A"] = v["A"][:2]
    elif bad == "B":
        args["B"] = v["B"][:, :5]
        field = "B and C"
    elif bad == "D":
        kw["D"] = v["D_hp"][:, :1].T
    elif bad == "h0":
        kw["initial_states"] = v["h0"][:, :, :1]
        field = "initial_states"
    elif bad == "groups":
        args["B"], args["C"] = torch.randn(2, 8, 4, 5), torch.randn(2, 8, 4, 5)  # 6 heads, 4 groups
        field = "multiple of the groups"
    elif bad == "chunk":
        kw["chunk_size"] = 0
        field = "chunk_size"
    with pytest.raises(ValueError, match=field):
        mamba.ssd_scan(**args, **kw)


# ---------------------------------------------------------------------------------------------- mixer vs HF

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen) * 0.3)
    return module


def hf_mixer(family, use_bias, time_step_limit=(0.0, INF)):
    """(reference HF mixer, our Mixer kwargs) on a tiny config: 8 heads of 8, 2 groups, state 6, chunk 8."""
    if family == "mamba2":
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Config, Mamba2Mixer
        cfg = Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, expand=2, state_size=6, n_groups=2,
                           conv_kernel=4, chunk_size=8, use_bias=use_bias, use_conv_bias=True,
                           num_hidden_layers=1, time_step_limit=time_step_limit, layer_norm_epsilon=1e-5)
        ref = Mamba2Mixer(cfg, layer_idx=0)
        ours = dict(hidden_size=32, num_heads=8, head_dim=8, state_size=6, n_groups=2, conv_kernel=4,
                    chunk_size=8, intermediate_size=64, time_step_limit=cfg.time_step_limit,
                    use_bias=use_bias, use_conv_bias=True, norm_eps=cfg.layer_norm_epsilon)
    elif family == "nemotron_h":
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHConfig, NemotronHMamba2Mixer
        cfg = NemotronHConfig(hidden_size=32, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=6,
                              n_groups=2, conv_kernel=4, chunk_size=8, use_bias=use_bias, use_conv_bias=True,
                              layers_block_type=["linear_attention"], layer_norm_epsilon=1e-5,
                              time_step_min=0.05)
        ref = NemotronHMamba2Mixer(cfg, layer_idx=0)
        # transformers' Nemotron-H mixer clamps Δ to (config.time_step_min, inf), not config.time_step_limit
        ours = dict(hidden_size=32, num_heads=8, head_dim=8, state_size=6, n_groups=2, conv_kernel=4,
                    chunk_size=8, time_step_limit=(cfg.time_step_min, INF), use_bias=use_bias,
                    use_conv_bias=True, norm_eps=cfg.layer_norm_epsilon)
    elif family == "granitemoehybrid":
        from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
            GraniteMoeHybridConfig, GraniteMoeHybridMambaLayer)
        cfg = GraniteMoeHybridConfig(hidden_size=32, mamba_n_heads=8, mamba_d_head=8, mamba_expand=2,
                                     mamba_d_state=6, mamba_n_groups=2, mamba_d_conv=4, mamba_chunk_size=8,
                                     mamba_proj_bias=use_bias, mamba_conv_bias=False, num_hidden_layers=1,
                                     layer_types=["linear_attention"], rms_norm_eps=1e-6,
                                     time_step_limit=time_step_limit, num_attention_heads=4)
        ref = GraniteMoeHybridMambaLayer(cfg, layer_idx=0)
        ours = dict(hidden_size=32, num_heads=8, head_dim=8, state_size=6, n_groups=2, conv_kernel=4,
                    chunk_size=8, intermediate_size=64, time_step_limit=cfg.time_step_limit,
                    use_bias=use_bias, use_conv_bias=False, norm_eps=cfg.rms_norm_eps)
    else:
        raise KeyError(family)
    return ref.eval(), ours


HF_CASES = [("mamba2", False, (0.0, INF)), ("mamba2", True, (0.3, 1.2)), ("nemotron_h", False, None),
            ("nemotron_h", True, None), ("granitemoehybrid", False, (0.0, INF)),
            ("granitemoehybrid", True, (0.2, 2.0))]


@pytest.mark.parametrize("family,use_bias,limit", HF_CASES)
def test_mixer_matches_transformers(family, use_bias, limit):
    ref, kw = hf_mixer(family, use_bias, limit or (0.0, INF))
    randomize(ref, seed=11)
    ours = mamba.Mamba2Mixer(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical names and shapes
    # 21: not a multiple of chunk 8
    hidden = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        d = maxdiff(ours(hidden), ref(hidden))
    print(f"{family} bias={use_bias} limit={kw['time_step_limit']}: max|diff| {d:.2e}")
    assert d < TOL


@pytest.mark.parametrize("family", ["mamba2", "nemotron_h", "granitemoehybrid"])
def test_mixer_left_padding_matches_transformers_attention_mask(family):
    ref, kw = hf_mixer(family, use_bias=False)  # HF's masking is exact only without in_proj bias
    randomize(ref, seed=13)
    ours = mamba.Mamba2Mixer(**kw).eval()
    ours.load_state_dict(ref.state_dict())
    hidden = torch.randn(2, 14, 32, generator=torch.Generator().manual_seed(14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        y_ref = ref(hidden, attention_mask=mask)
        y = ours(hidden, doc_ids=torch.where(mask.bool(), 0, -1))
    real = mask.bool()
    d = maxdiff(y[real], y_ref[real])
    print(f"{family} left padding: max|diff| {d:.2e}")
    assert d < TOL


def test_norm_before_gate_option():
    torch.manual_seed(0)
    m = randomize(mamba.Mamba2Mixer(hidden_size=16, num_heads=4, head_dim=4, state_size=3, n_groups=2,
                                    norm_before_gate=True), seed=1)
    y, z = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    yg = y.view(2, 5, 2, 8)
    expect = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)).view(2, 5, 16)
    expect = expect * m.norm.weight * torch.nn.functional.silu(z)
    assert maxdiff(m.norm(y, z), expect) < 1e-5
    m.norm.norm_before_gate = False
    assert maxdiff(m.norm(y, z), expect) > 1e-2


# ------------------------------------------------------------------------------------------- documents, cache

def tiny_mixer(seed=21, chunk_size=4, **over):
    kw = dict(hidden_size=24, num_heads=6, head_dim=4, state_size=5, n_groups=3, conv_kernel=4,
              chunk_size=chunk_size, time_step_limit=(0.01, 3.0), use_bias=True, use_conv_bias=True)
    return randomize(mamba.Mamba2Mixer(**{**kw, **over}), seed).eval()


@torch.no_grad()
def test_mixer_packed_documents_equal_separate_runs():
    m = tiny_mixer()
    lengths = [2, 7, 1, 3, 9]  # documents shorter than the conv window too
    hidden = torch.randn(1, sum(lengths), 24)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    y = m(hidden, doc_ids=doc_ids)
    start = 0
    for i, n in enumerate(lengths):
        assert maxdiff(y[:, start:start + n], m(hidden[:, start:start + n])) < TOL, f"document {i}"
        start += n
    # without doc_ids the documents do interact (the test can fail)
    assert maxdiff(m(hidden)[:, 2:], y[:, 2:]) > 1e-3
    # padding (random hidden states) between and around documents changes nothing for the real tokens
    pad = lambda k: torch.randn(1, k, 24)  # noqa: E731
    hidden_p = torch.cat([pad(3), hidden[:, :9], pad(2), hidden[:, 9:], pad(4)], 1)
    ids_p = torch.cat([torch.full((1, 3), -1), doc_ids[:, :9], torch.full((1, 2), -1), doc_ids[:, 9:],
                       torch.full((1, 4), -1)], 1)
    y_p = m(hidden_p, doc_ids=ids_p)
    assert maxdiff(y_p[ids_p >= 0].view(1, -1, 24), y) < TOL


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward():
    m = tiny_mixer()
    T = 22
    hidden = torch.randn(2, T, 24)
    y_full = m(hidden)
    cache = m.allocate_cache(2)
    assert cache.conv_state.shape == (2, m.conv_dim, 3) and cache.ssm_state.shape == (2, 6, 4, 5)
    ys = [m(hidden[:, :11], cache=cache)]  # prefill across chunks (chunk 4)
    ys += [m(hidden[:, 11:15], cache=cache)]  # a second multi-token call continues the cache
    ys += [m(hidden[:, t:t + 1], cache=cache) for t in range(15, T)]  # O(1) steps
    d = maxdiff(torch.cat(ys, 1), y_full)
    print(f"prefill + decode vs full: max|diff| {d:.2e}")
    assert d < TOL
    # the cache after all steps equals the chunked scan's final state
    cache2 = m.allocate_cache(2)
    m(hidden, cache=cache2)
    assert (maxdiff(cache.ssm_state, cache2.ssm_state) < TOL
            and maxdiff(cache.conv_state, cache2.conv_state) < TOL)


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone_and_keep_rows():
    m = tiny_mixer(chunk_size=8)
    lengths, T, steps = [9, 2, 12], 12, 5
    rows = [torch.randn(1, n + steps, 24) for n in lengths]
    hidden = torch.randn(3, T, 24)  # random values under the padding
    doc_ids = torch.full((3, T), -1)
    for i, n in enumerate(lengths):
        hidden[i, T - n:] = rows[i][0, :n]
        doc_ids[i, T - n:] = 0
    y = m(hidden, doc_ids=doc_ids)
    for i, n in enumerate(lengths):
        assert maxdiff(y[i, T - n:], m(rows[i][:, :n])[0]) < TOL, f"row {i} full forward"
    cache = m.allocate_cache(3)
    y_pre = m(hidden, doc_ids=doc_ids, cache=cache)
    outs = [[] for _ in lengths]
    for t in range(steps):
        tok = torch.cat([rows[i][:, lengths[i] + t:lengths[i] + t + 1] for i in range(3)])  # (3, 1, 24)
        y_t = m(tok, doc_ids=torch.zeros(3, 1, dtype=torch.long), cache=cache)
        for i in range(3):
            outs[i].append(y_t[i])
    worst = 0.0
    for i, n in enumerate(lengths):
        y_alone = m(rows[i])[0]
        worst = max(worst, maxdiff(y_pre[i, T - n:], y_alone[:n]), maxdiff(torch.cat(outs[i]), y_alone[n:]))
    print(f"left-padded prefill + decode vs rows alone: max|diff| {worst:.2e}")
    assert worst < TOL
    # a padding step (negative id) leaves that row's cache untouched
    before = (cache.conv_state.clone(), cache.ssm_state.clone())
    m(torch.randn(3, 1, 24), doc_ids=torch.tensor([[0], [-1], [0]]), cache=cache)
    assert torch.equal(cache.conv_state[1], before[0][1]) and torch.equal(cache.ssm_state[1], before[1][1])
    assert maxdiff(cache.ssm_state[0], before[1][0]) > 1e-4
    # keep(rows): dropping a finished row leaves the others' decode unchanged
    c_all, c_kept = m.allocate_cache(3), m.allocate_cache(3)
    m(hidden, doc_ids=doc_ids, cache=c_all)
    m(hidden, doc_ids=doc_ids, cache=c_kept)
    c_kept.keep(torch.tensor([0, 2]))
    tok = torch.randn(3, 1, 24)
    y_all = m(tok, cache=c_all)
    y_kept = m(tok[[0, 2]], cache=c_kept)
    assert c_kept.ssm_state.shape[0] == 2 and maxdiff(y_kept, y_all[[0, 2]]) < TOL


@torch.no_grad()
def test_packed_prefill_then_decode_continues_the_last_document():
    m = tiny_mixer()
    lengths, steps = [6, 5, 2], 4  # the last document is shorter than the conv history (K-1 = 3)
    hidden = torch.randn(1, sum(lengths) + steps, 24)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    cache = m.allocate_cache(1)
    m(hidden[:, :sum(lengths)], doc_ids=doc_ids, cache=cache)
    ys = [m(hidden[:, t:t + 1], cache=cache) for t in range(sum(lengths), sum(lengths) + steps)]
    y_alone = m(hidden[:, sum(lengths[:-1]):])
    assert maxdiff(torch.cat(ys, 1), y_alone[:, lengths[-1]:]) < TOL


@torch.no_grad()
def test_left_padding_in_a_continuation_call_keeps_the_state():
    # conv_kernel=1: no conv history, so only the SSM state carries across calls; rows add 3 and 1 new tokens
    m = tiny_mixer(conv_kernel=1)
    hidden = torch.randn(2, 10, 24)
    y_full = m(hidden)
    cache = m.allocate_cache(2)
    m(hidden[:, :6], cache=cache)
    more = torch.randn(2, 3, 24)
    more[0], more[1, 2] = hidden[0, 6:9], hidden[1, 6]
    y = m(more, doc_ids=torch.tensor([[0, 0, 0], [-1, -1, 0]]), cache=cache)
    assert maxdiff(y[0], y_full[0, 6:9]) < TOL and maxdiff(y[1, 2], y_full[1, 6]) < TOL


@pytest.mark.parametrize("over,field", [
    (dict(num_heads=6, n_groups=4), "n_groups"),
    (dict(intermediate_size=30), "intermediate_size"),
    (dict(head_dim=0), "head_dim"),
    (dict(state_size=2.5), "state_size"),
    (dict(chunk_size=-1), "chunk_size"),
    (dict(time_step_limit=(1.0, 0.5)), "time_step_limit"),
    (dict(activation="gelu"), "activation"),
])
def test_mixer_bad_dimensions_raise(over, field):
    kw = dict(hidden_size=16, num_heads=4, head_dim=4, state_size=3, n_groups=2)
    with pytest.raises(ValueError, match=field):
        mamba.Mamba2Mixer(**{**kw, **over})
