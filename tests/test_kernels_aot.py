"""Ahead-of-time compile of every Triton kernel for sm_80 (A100) and sm_90 (H100/H200), no GPU needed.

What a GPU would refuse or run slowly, caught on a CPU: compile errors, shared memory over the target's
per-block limit, register spills reported by ptxas (none allowed in forward kernels; backward spills are
printed). The launch arguments are not restated here: the real wrappers (`_flash_forward`,
`_flash_backward`, `_SSDScan`, `ssd_step`) run on CPU tensors that claim to be CUDA tensors, with every
kernel replaced by a recorder; each recorded launch is bound and specialised by triton's own binder for
the target (the same signature, constexprs, divisibility hints and options a real launch compiles), so
the test cannot drift from the launch code. Compiles run in a subprocess without TRITON_INTERPRET (the
conftest sets it), in parallel processes, with a fresh cache.

    python tests/test_kernels_aot.py [--only attention|ssd] [--jobs N]   # the table, without pytest
"""
import contextlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {80: 166912, 90: 232448}  # compute capability -> max dynamic shared memory per block (A100, H100)
# inference (+ the tiny delta): no spills
FORWARD = {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_dt_kernel", "_chunk_state_kernel",
           "_state_pass_kernel", "_chunk_scan_kernel", "_step_kernel"}
# Forward spills known and bounded (bytes of spill stores), to be timed on a GPU (python -m bench gpu, the
# "docs + window" rows): with documents the forward inlines up to nine copies of its block step and ptxas
# spills a few words on sm_80 (at d 80/96 also on the causal + documents training path; d 64/128 there do
# not), and at d 64 with a window on sm_90. Key: (kernel, sm, D_PAD, HAS_WINDOW and HAS_DOCS). Anything more,
# or anywhere else, fails. The --full sweep (bf16) also finds 4-100 bytes on sm_80 for non-causal documents
# and d 80/96 with a window, and 4 bytes on sm_90 d 64 window without documents: not in this table yet.
KNOWN_FORWARD_SPILLS = {("_attn_fwd_kernel", 80, 64, True): 32, ("_attn_fwd_kernel", 80, 128, True): 48,
                        ("_attn_fwd_kernel", 80, 128, False): 48, ("_attn_fwd_kernel", 90, 64, True): 16}
HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = ("float16", "bfloat16", "float32")


# ----------------------------------------------------------------------------------------------
# recording the launches (runs in the worker process, no TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------

def _fake_cuda_class():
    import torch

    class FakeCuda(torch.Tensor):
        """A CPU tensor that answers is_cuda=True, so the wrappers pick their GPU configuration."""
        is_cuda = property(lambda self: True)

    return FakeCuda


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn, calls, label):
        self.fn, self.calls, self.label = fn, calls, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs, self.label[0]))
        return launch


_BINDERS = {}


def _bind(fn, args, kwargs, target):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run would compile for `target`."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if (fn, target) not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", target, 32))
        _BINDERS[fn, target] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[fn, target]
    plain = [a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in args]
    bound, spec, options = binder(*plain, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options.__dict__


def attention_cases(full=False):
    """Every choice `attention` dispatches on: head dim, causal, window, documents, dtype. CI compiles the
    cover set: each padded head dim's tile config (64, 128, 256) in bf16 with the heaviest code (causal +
    window + documents) and the training path (causal + documents, also at 80: padded to 128); 96 in fp16
    without masks; fp32 at 128. `full` compiles the whole product (~1 hour on 2 cores, minutes on 16)."""
    if not full:
        return ([dict(d=d, causal=True, window=32, docs=True, dtype="bfloat16") for d in (64, 128, 256)]
                + [dict(d=d, causal=True, window=None, docs=True, dtype="bfloat16")
                   for d in (64, 80, 128, 256)]
                + [dict(d=96, causal=False, window=None, docs=False, dtype="float16")]
                + [dict(d=128, causal=True, window=None, docs=False, dtype="float32")])
    return [dict(d=d, causal=c, window=w, docs=doc, dtype=dt) for d, c, w, doc, dt in
            itertools.product(HEAD_DIMS, (True, False), (None, 32), (False, True), DTYPES)]


def ssd_cases(full=False):
    """Nemotron-H / Mamba2 shapes (p 64, n 128; chunk 128 and 256) and a small-state one (n 64, p 32,
    chunk 64); with and without seq_idx, initial states, D (h,) / (h, p) / none, dt_bias + softplus,
    in every input dtype; the decode step with its own flags. CI: the Nemotron-H shape, every flag on."""
    if not full:
        return ([dict(p=64, n=128, chunk=256, seq=True, init=True, D="hp", bias=True, dtype="bfloat16"),
                 dict(p=32, n=64, chunk=64, seq=False, init=False, D="h", bias=False, dtype="float16")],
                [dict(p=64, n=128, D="hp", bias=True, dtype="bfloat16"),
                 dict(p=32, n=64, D=None, bias=False, dtype="float16")])
    shapes = [dict(p=64, n=128, chunk=128), dict(p=64, n=128, chunk=256), dict(p=32, n=64, chunk=64)]
    scan = [dict(shape, seq=s, init=i, D=D, bias=b, dtype=dt) for shape in shapes
            for s, i, D, b, dt in itertools.product((False, True), (False, True), (None, "h", "hp"),
                                                    (False, True), DTYPES)]
    step = [dict(p=p, n=n, D=D, bias=b, dtype=dt) for (p, n) in ((64, 128), (32, 64))
            for D, b, dt in itertools.product((None, "h", "hp"), (False, True), DTYPES)]
    return scan, step


def record(only=None, full=False):
    """Run the wrappers on fake-CUDA CPU tensors; return the recorded launches (fn, args, kwargs, label)."""
    import torch
    from kernels import attention as A
    from kernels import ssd as S

    FakeCuda = _fake_cuda_class()
    calls, label = [], [""]

    def fake(*shape, dtype):
        return torch.randn(*shape, dtype=torch.float32).to(dtype).as_subclass(FakeCuda)

    patched = []
    for mod in (A, S):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and hasattr(obj, "arg_names"):
                patched.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, calls, label))
    try:
        if only in (None, "attention"):
            for c in attention_cases(full):
                dt = getattr(torch, c["dtype"])
                b, hq, hkv, t = 2, 4, 2, 64  # GQA; the sizes do not change the constexprs
                q = fake(b, hq, t, c["d"], dtype=dt)
                k, v = fake(b, hkv, t, c["d"], dtype=dt), fake(b, hkv, t, c["d"], dtype=dt)
                kdoc = (torch.arange(t).div(20, rounding_mode="floor").expand(b, t).to(torch.int32)
                        .contiguous().as_subclass(FakeCuda)) if c["docs"] else None
                label[0] = "attention " + " ".join(f"{k}={v}" for k, v in c.items())
                o, lse = A._flash_forward(q, k, v, c["causal"], c["d"] ** -0.5, c["window"], kdoc)
                A._flash_backward(fake(*q.shape, dtype=dt), q, k, v, o.as_subclass(FakeCuda), lse,
                                  c["causal"], c["d"] ** -0.5, c["window"], kdoc)
        if only in (None, "ssd"):
            scan, step = ssd_cases(full)
            b, l, h, g = 1, 300, 4, 2
            for c in scan:
                dt = getattr(torch, c["dtype"])
                p, n = c["p"], c["n"]
                x, dtv = fake(b, l, h, p, dtype=dt), fake(b, l, h, dtype=dt)
                A_, B, C = (fake(h, dtype=torch.float32), fake(b, l, g, n, dtype=dt),
                            fake(b, l, g, n, dtype=dt))
                D = {None: None, "h": fake(h, dtype=torch.float32),
                     "hp": fake(h, p, dtype=torch.float32)}[c["D"]]
                bias = fake(h, dtype=torch.float32) if c["bias"] else None
                h0 = fake(b, h, p, n, dtype=torch.float32) if c["init"] else None
                docs = torch.arange(l).div(100, rounding_mode="floor").expand(b, l)  # 3 documents
                seg = S._segments(docs).as_subclass(FakeCuda) if c["seq"] else None
                label[0] = "ssd " + " ".join(f"{k}={v}" for k, v in c.items())
                ctx = _Ctx()
                y, final = S._SSDScan.forward(ctx, x, dtv, A_, B, C, D, bias, h0, seg, c["chunk"], c["bias"],
                                              0.0, math.inf)
                S._SSDScan.backward(ctx, fake(*x.shape, dtype=dt), fake(*final.shape, dtype=torch.float32))
            for c in step:
                dt = getattr(torch, c["dtype"])
                p, n, h, g = c["p"], c["n"], 8, 2
                D = {None: None, "h": fake(h, dtype=torch.float32),
                     "hp": fake(h, p, dtype=torch.float32)}[c["D"]]
                label[0] = "ssd_step " + " ".join(f"{k}={v}" for k, v in c.items())
                S.ssd_step(fake(2, h, p, n, dtype=torch.float32), fake(2, h, p, dtype=dt),
                           fake(2, h, dtype=dt), fake(h, dtype=torch.float32), fake(2, g, n, dtype=dt),
                           fake(2, g, n, dtype=dt), D=D,
                           dt_bias=fake(h, dtype=torch.float32) if c["bias"] else None, dt_softplus=c["bias"])
    finally:
        for mod, name, obj in patched:
            setattr(mod, name, obj)
    return calls


class _Ctx:
    """The parts of an autograd ctx that _SSDScan uses."""

    def save_for_backward(self, *t):
        self.saved_tensors = t

    def set_materialize_grads(self, value):
        pass

    needs_input_grad = (True,) * 13


# ----------------------------------------------------------------------------------------------
# compiling
# ----------------------------------------------------------------------------------------------

def jobs(only=None, full=False):
    """Unique (kernel, target) compiles, each with the labels of the cases that launch it."""
    out = {}
    for fn, args, kwargs, lab in record(only, full):
        for target in TARGETS:
            signature, constexprs, attrs, options = _bind(fn, args, kwargs, target)
            key = (fn.__name__, target, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), options["num_warps"], options["num_stages"])
            if key not in out:
                out[key] = dict(module=fn.__module__, name=fn.__name__, target=target, signature=signature,
                                constexprs=constexprs, attrs=attrs,
                                options=dict(num_warps=options["num_warps"],
                                             num_stages=options["num_stages"]),
                                labels=[])
            out[key]["labels"].append(lab)
    return list(out.values())


def compile_one(job):
    """Compile one job; return its shared memory, registers, spills (from ptxas -v) or the error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["name"])
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed: registers and spills
    log = io.StringIO()
    t0 = time.time()
    res = dict(name=job["name"], target=job["target"], labels=job["labels"], options=job["options"],
               constexprs={fn.arg_names[k[0]]: v for k, v in job["constexprs"].items()})
    try:
        with contextlib.redirect_stdout(log):
            c = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                               target=GPUTarget("cuda", job["target"], 32), options=job["options"])
        text = log.getvalue()
        stores = [int(v) for v in re.findall(r"(\d+) bytes spill stores", text)]
        loads = [int(v) for v in re.findall(r"(\d+) bytes spill loads", text)]
        regs = [int(v) for v in re.findall(r"Used (\d+) registers", text)]
        res.update(shared=c.metadata.shared, spill_stores=sum(stores), spill_loads=sum(loads),
                   registers=max(regs) if regs else None, error=None)
    except Exception as e:  # a compile error is a finding, not a crash of the whole run
        res.update(shared=None, spill_stores=None, spill_loads=None, registers=None,
                   error=f"{type(e).__name__}: {str(e)[-1500:]}")
    res["seconds"] = round(time.time() - t0, 2)
    return res


def main(argv):
    import argparse
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("attention", "ssd"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--full", action="store_true", help="every combination, not the CI cover set")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    t0 = time.time()
    todo = jobs(args.only, args.full)
    # longest first (attention backward), so the pool does not end on one long compile
    todo.sort(key=lambda j: (not j["name"].startswith("_attn_bwd_d"), j["name"]))
    print(f"{len(todo)} compiles ({time.time() - t0:.1f}s to record and bind)", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_one, todo, chunksize=1))
    for r in results:
        r["limit"] = TARGETS[r["target"]]
    print(f"compiled in {time.time() - t0:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    for r in sorted(results, key=lambda r: (r["name"], r["target"], -(r["shared"] or 0))):
        flag = "ERROR" if r["error"] else ("SMEM!" if r["shared"] > r["limit"] else "")
        print(f"sm_{r['target']} {r['name']:24s} smem {r['shared'] or 0:6d} regs {r['registers']} "
              f"spill {r['spill_stores']}/{r['spill_loads']} {r['seconds']:5.1f}s {flag} "
              f"warps={r['options']['num_warps']} stages={r['options']['num_stages']} {r['labels'][0]}")
        if r["error"]:
            print("   ", r["error"].replace("\n", "\n    "))
    return results


def findings(results):
    """What fails the test: compile errors, shared memory over the limit, unknown forward spills (fp16/bf16).
    Other spills are printed."""
    problems = []
    for r in results:
        where = f"sm_{r['target']} {r['name']} ({r['labels'][0]}; {len(r['labels'])} launch(es))"
        c = r["constexprs"]
        known = KNOWN_FORWARD_SPILLS.get((r["name"], r["target"], c.get("D_PAD"),
                                          bool(c.get("HAS_WINDOW") and c.get("HAS_DOCS"))), 0)
        fp32 = "dtype=float32" in r["labels"][0]
        if r["error"]:
            problems.append(f"{where}: does not compile: {r['error'][-600:]}")
        elif r["shared"] > r["limit"]:
            problems.append(f"{where}: {r['shared']} bytes of shared memory > {r['limit']} per block")
        elif r["spill_stores"] and r["name"] in FORWARD and not fp32 and r["spill_stores"] > known:
            problems.append(f"{where}: forward kernel spills {r['spill_stores']} bytes of registers"
                            + (f" (known: {known})" if known else ""))
        elif r["spill_stores"]:  # backward, fp32 (a GPU debugging path: TF32 dots), or known and bounded
            print(f"note: {where}: spills {r['spill_stores']} bytes (slower, not wrong)"
                  + (f"; known, bound {known}" if known else ""))
    return problems


def test_kernels_compile_for_a100_and_h100(tmp_path):
    """Compile errors, shared memory over the per-block limit, forward spills: fail. Backward spills:
    printed (slower, not wrong)."""
    import pytest

    pytest.importorskip("triton")  # CPU-only installs without triton: nothing to compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # nothing cached between runs
    cmd = [sys.executable, os.path.abspath(__file__), "--json", str(tmp_path / "aot.json")]
    if os.environ.get("PRISM_AOT_FULL") == "1":
        cmd.append("--full")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.load(open(tmp_path / "aot.json"))
    problems = findings(results)
    assert results and not problems, "\n".join(problems)


if __name__ == "__main__":
    main(sys.argv[1:])
