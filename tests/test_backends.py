"""Backends (math with its memory-lean backward, flex, sdpa) and `auto`, against the float64 oracle of
test_attention.py: forward and gradients, fp32 within 1e-5 relative, bf16 within 2e-2, T = 1, 3, 127, 129,
1000 and Tq < Tk with pos_offset. Plus bench.py --quick runs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
import kernels.chunked
import kernels.flex
from model import VARIANTS, AttnSpec
from tests.conftest import ROOT, run
from tests.test_attention import CASE_IDS, CASES, attention, make_qkv, oracle

NORMALISED = [(a, p) for a, p in CASES if AttnSpec.of(a).variant.normalise]


def _rel(got, want, ref=None):
    """Largest error relative to the largest magnitude of the reference `ref` (default: want itself). Gradients
    are compared relative to the largest of out, dq, dk, dv: a gradient that is exactly 0 (dq of a one-token
    row) is computed from O(1) terms that cancel, so only its absolute rounding error is meaningful."""
    ref = want if ref is None else ref
    return ((got.double() - want).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _rel_all(got, want):
    ref = torch.stack([w.abs().max() for w in want])
    return [_rel(g, w, ref) for g, w in zip(got, want, strict=True)]


def _grads(fn, q, k, v, go):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(go.to(out.dtype))
    # (a gradient that does not reach an input is 0: stick-breaking's one-token row does not depend on q, k)
    return out, *(torch.zeros_like(x) if x.grad is None else x.grad for x in (q, k, v))


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "recompute"])
@pytest.mark.parametrize("T", [1, 3, 127, 129, 1000])
@pytest.mark.parametrize("attn,p", CASES, ids=CASE_IDS)
def test_math_forward_and_grads_fp32(attn, p, T, keep, monkeypatch):
    """The custom backward (hand-written stage 2; chunks kept from the forward or recomputed) against autograd
    through the oracle."""
    if not keep:
        monkeypatch.setattr(kernels.chunked, "KEEP_ELEMENTS", 0)
    B, H = (1, 1) if T == 1000 else (2, 2)
    q, k, v = make_qkv(B, H, T, T, 32, seed=T, scale=2.0)
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _grads(lambda a, b, c: oracle(a, b, c, attn, p), q, k, v, go)
    # chunk=50: chunk borders inside every length > 50, and the last chunk is a partial one
    got = _grads(lambda a, b, c: attention(a, b, c, attn, p, backend="math", chunk=50), q.float(), k.float(),
                 v.float(), go)
    # 1e-5; with re-weighting 5e-5: the p-th power amplifies fp32 score rounding ~p-fold (softmax + p=15 at
    # T=1000: dq 1.46e-5 here, and 1.30e-5 with plain autograd through the previous log-space implementation)
    tol = 1e-5 if p == 0 and attn != "lssar" else 5e-5
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, _rel_all(got, want), strict=True):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert e < tol, (name, e)


@pytest.mark.parametrize("attn,p", CASES, ids=CASE_IDS)
def test_math_grads_with_pos_offset(attn, p):
    """Tq < Tk (queries are positions off .. off+Tq-1), float64: exact to 1e-10."""
    q, k, v = make_qkv(2, 2, 9, 40, 16, seed=3, scale=2.0)
    go = torch.randn(2, 2, 9, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for off in (0, 5, 31):
        want = _grads(lambda a, b, c, off=off: oracle(a, b, c, attn, p, pos_offset=off), q, k, v, go)
        got = _grads(lambda a, b, c, off=off: attention(a, b, c, attn, p, pos_offset=off, backend="math",
                                                                chunk=4), q, k, v, go)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attn,p", CASES, ids=CASE_IDS)
def test_bf16_autocast_forward_and_grads(attn, p):
    # the oracle sees the same bf16-rounded inputs: this measures the computation, not the input rounding
    q, k, v = (x.bfloat16().double() for x in make_qkv(1, 2, 129, 129, 32, seed=5, scale=2.0))
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = _grads(lambda a, b, c: oracle(a, b, c, attn, p), q, k, v, go)

    def fn(a, b, c):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return attention(a, b, c, attn, p)

    got = _grads(fn, *(x.bfloat16() for x in (q, k, v)), go)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, _rel_all(got, want), strict=True):
        assert torch.isfinite(g).all(), name
        assert e < 2e-2, (name, e)


def test_math_backward_saves_no_score_matrix(monkeypatch):
    """Memory-lean training: past KEEP_ELEMENTS, what autograd keeps for the backward is O(T), not O(T^2): no
    saved tensor has a T x T (or rows x T) score-shaped block, and the total is a few copies of q, k, v. Below
    it, the forward's chunk tensors are kept, at most KEEP_ELEMENTS more."""
    T, d = 512, 16
    q, k, v = (x.float().requires_grad_() for x in make_qkv(1, 2, T, T, d, seed=6))

    def saved_by(attn, p):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = attention(q, k, v, attn, p, backend="math")
        return out, saved

    for keep in (0, 2 * 2 * T * T):  # B*H = 2: the second is enough for s, phi (p = 0), not for p > 0
        monkeypatch.setattr(kernels.chunked, "KEEP_ELEMENTS", keep)
        for attn, p in (("lssa", 0.0), ("lssar", 0.0), ("sigmoid", 0.0), ("softmax", 15.0)):
            out, saved = saved_by(attn, p)
            total = sum(t.numel() for t in saved)
            kept = out.grad_fn.kept
            assert (kept is not None) == bool(keep and p == 0 and attn != "lssar"), (keep, attn)
            if kept is None:
                assert total <= 12 * q.numel(), (attn, total)  # q, k, v, out, QK-norm's inputs and norms
                assert all(t.shape[-1] != T for t in saved), [tuple(t.shape) for t in saved]
            else:
                assert keep and p == 0 and attn != "lssar"
                assert total <= 12 * q.numel() + keep
            out.sum().backward()  # the kept chunks are used once and dropped
            assert out.grad_fn.kept is None


def test_direct_weights_equal_exp_of_log_weights():
    """The math backend's fast path (Variant.weight, e.g. softplus) computes exactly exp(logw)."""
    s = torch.linspace(-60, 60, 2001, dtype=torch.float64).view(1, -1)
    n = torch.tensor([[1.0], [7.0], [5000.0]], dtype=torch.float64)
    for name, var in VARIANTS.items():
        if var.weight is None:
            continue
        want = torch.exp(var.logw(s, n))
        torch.testing.assert_close(var.weight(s, n), want, rtol=1e-12, atol=1e-300, msg=name)


def test_lssa_log_space_fallback_is_exact(monkeypatch):
    """When QK-norm no longer bounds the scores away from softplus underflow, math falls back to
    exp(logw - row max); force that path and compare with the oracle."""
    monkeypatch.setattr(kernels.chunked, "direct_ok", lambda *a: False)
    q, k, v = make_qkv(2, 2, 60, 60, 16, seed=9, scale=3.0)
    for attn, p in (("lssa", 0.0), ("lssar", 0.0)):
        go = torch.randn(v.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        want = _grads(lambda a, b, c, attn=attn, p=p: oracle(a, b, c, attn, p), q, k, v, go)
        got = _grads(lambda a, b, c, attn=attn, p=p: attention(a, b, c, attn, p, backend="math", chunk=16),
                     q, k, v, go)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# flex (CPU: forward only in this torch)
# ----------------------------------------------------------------------------------------------------
flex_ok = kernels.flex.flex_attention() is not None


@pytest.mark.skipif(not flex_ok, reason="no flex_attention in this torch")
def test_flex_when_sizes_coincide():
    """T = head size = 8, batch 8: compiled with dynamic shapes, flex gave errors ~1 or NaN here (duck sizing)."""
    for B, T, d in ((8, 8, 8), (16, 8, 8), (2, 16, 16)):
        q, k, v = make_qkv(B, 2, T, T, d, seed=B)
        with torch.no_grad():
            for attn in ("softmax", "lssa"):
                got = attention(q.float(), k.float(), v.float(), attn, backend="flex")
                assert _rel(got, oracle(q, k, v, attn)) < 1e-5, (B, T, d, attn)


@pytest.mark.skipif(not flex_ok, reason="no flex_attention in this torch")
@pytest.mark.parametrize("T", [1, 3, 127, 129])
@pytest.mark.parametrize("attn,p", [("softmax", 0.0), ("lssa", 0.0), ("lssar", 0.0)], ids=["softmax", "lssa", "lssar"])
def test_flex_forward_fp32(attn, p, T):
    q, k, v = make_qkv(1, 2, T, T, 16, seed=10 + T, scale=2.0)
    with torch.no_grad():
        got = attention(q.float(), k.float(), v.float(), attn, p, backend="flex")
    assert got.dtype == torch.float32 and got.shape == v.shape
    assert _rel(got, oracle(q, k, v, attn, p)) < 1e-5


@pytest.mark.skipif(not flex_ok, reason="no flex_attention in this torch")
@pytest.mark.parametrize("attn,p", NORMALISED, ids=[f"{a}-p{p:g}" for a, p in NORMALISED])
def test_flex_forward_every_normalised_kind_with_pos_offset(attn, p):
    q, k, v = make_qkv(1, 2, 7, 131, 16, seed=11, scale=2.0)
    with torch.no_grad():
        for off in (None, 60):  # None: the queries are the last 7 positions
            got = attention(q.float(), k.float(), v.float(), attn, p, pos_offset=off, backend="flex")
            assert _rel(got, oracle(q, k, v, attn, p, pos_offset=off)) < 1e-5, off


@pytest.mark.skipif(not flex_ok, reason="no flex_attention in this torch")
def test_flex_errors_name_the_fix():
    q, k, v = (x.float() for x in make_qkv(1, 1, 8, 8, 16, seed=12))
    with pytest.raises(NotImplementedError, match="unnormalised.*use backend 'math' or 'auto'"):
        attention(q, k, v, "relu", backend="flex")
    if not torch.cuda.is_available():
        qg = q.clone().requires_grad_()
        with pytest.raises(NotImplementedError, match="no backward on cpu"):
            attention(qg, k, v, "lssa", backend="flex")
    with pytest.raises(NotImplementedError, match="softmax-type"):
        attention(q, k, v, "lssa", backend="sdpa")
    with pytest.raises(ValueError, match="choose one of reference, auto, math, sdpa, flex, triton"):
        attention(q, k, v, "lssa", backend="flash")


def test_auto_picks_an_exact_backend(monkeypatch):
    """auto on CPU: sdpa for softmax/ssmax, math for the rest."""
    picks, real = [], kernels.backend_module

    class Spy:
        def __init__(self, name):
            self.m, self.name = real(name), name

        def supports(self, *a):
            return self.m.supports(*a)

        def attend(self, *a, **kw):
            picks.append(self.name)
            return self.m.attend(*a, **kw)

    monkeypatch.setattr(kernels, "backend_module", Spy)
    q, k, v = (x.float() for x in make_qkv(1, 1, 8, 8, 16, seed=13))
    for attn in ("softmax", "ssmax", "lssa", "lssar", "sigmoid", "relu"):
        attention(q, k, v, attn)
    assert picks == ["sdpa", "sdpa"] + ["math"] * 4


@pytest.mark.parametrize("triton_ok", [True, False], ids=["triton", "no-triton"])
def test_pick_backend_cuda_rules(monkeypatch, triton_ok):
    """auto on CUDA: sdpa where exact; the Triton kernels for the kinds they cover; else flex in full passes
    except LSSAR-type training; math otherwise (decoding steps, unnormalised kinds)."""
    class FakeQ:
        dtype = torch.float32

        class device:
            type = "cuda"

    def why_not(backend, spec, q, needs_grad):
        if backend == "triton":
            return None if triton_ok and spec.kind == "lssa" else "not covered"
        if backend == "flex":
            return None if spec.variant.normalise else "unnormalised"
        return kernels.backend_module(backend).supports(spec, q, needs_grad)

    monkeypatch.setattr(kernels, "why_not", why_not)
    lssa, lssar, soft, relu = (AttnSpec.of(a) for a in ("lssa", "lssar", "softmax", "relu"))
    assert kernels.pick(soft, FakeQ, needs_grad=True) == "sdpa"
    fused = "triton" if triton_ok else "flex"
    assert kernels.pick(lssa, FakeQ, needs_grad=True) == fused
    assert kernels.pick(lssar, FakeQ, needs_grad=False) == fused
    assert kernels.pick(lssar, FakeQ, needs_grad=True) == ("triton" if triton_ok else "math")
    assert kernels.pick(AttnSpec.of("ssmax", 15.0), FakeQ, needs_grad=True) == "math"
    assert kernels.pick(relu, FakeQ, needs_grad=False) == "math"
    assert kernels.pick(lssa, FakeQ, needs_grad=False, full=False) == ("triton" if triton_ok else "math")  # decoding


# ----------------------------------------------------------------------------------------------------
# bench.py
# ----------------------------------------------------------------------------------------------------
def test_bench_quick(tmp_path):
    out = tmp_path / "bench"
    r = run("bench.py", "--quick", "--lengths=16", "--kinds=softmax,lssar,relu", "--backends=sdpa,math,triton",
            "--repeats=1", "--train_len=16", "--train_batch=2", "--train_kinds=softmax,lssar", "--memory=true",
            "--decode_lengths=8", "--decode_kinds=softmax", f"--out={out}", timeout=600)
    res = json.loads((out.with_suffix(".json")).read_text())
    assert res["meta"]["device"] == "cpu"
    cases = res["results"]
    timed = [c for c in cases if "seconds" in c]
    # attn: {fwd, fwd+bwd} x (softmax sdpa+math, lssar math, relu math); train: 2 kinds; decode: 1
    assert len(timed) == 2 * 4 + 2 + 1
    assert all(c["seconds"] > 0 and math.isfinite(c["time_vs_softmax_sdpa"]) for c in timed)
    assert all(c["peak_bytes"] > 0 for c in timed if c["what"] == "train")
    assert [c["cache_bytes"] for c in timed if c["what"] == "decode"] == [4 * 8 * 2 * 128 * 4]  # 4 layers, k and v
    sk = [c for c in cases if "skipped" in c]
    # lssar / relu through sdpa are refused, not faked; triton on a CPU would only be the interpreter
    assert {c["skipped"] for c in sk if c["backend"] == "triton"} == {"interpreter, not timed"}
    assert sk and all("sdpa" in c["skipped"] for c in sk if c["backend"] == "sdpa")
    ref = [c for c in timed if c["kind"] == "softmax" and c.get("backend") in ("sdpa", "auto")]
    assert all(c["time_vs_softmax_sdpa"] == 1.0 for c in ref)
    assert "| attn fwd | 16 | lssar | math |" in r.stdout
    assert "| attn fwd | 16 | lssar | triton | n/a: interpreter, not timed" in r.stdout
    assert (tmp_path / "bench.md").exists()
    bad = run("bench.py", "--kinds=softmax,lsar", f"--out={tmp_path / 'bad'}", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("bench error: unknown kinds lsar")
    assert not (tmp_path / "bad.json").exists()


def test_every_bench_kind_runs(monkeypatch):
    """Every kind bench.py knows (the registry's names, and each with the forget gate) runs through `build`
    forward and backward, with its learnable per-head parameters and its gate: none fails (ssmax_learn's s_h once
    raised KeyError here)."""
    import bench

    monkeypatch.setattr(bench, "repeats", 1)
    monkeypatch.setattr(bench, "attn_heads", 2)
    monkeypatch.setattr(bench, "head_dim", 16)
    kinds = bench.bench_kinds()
    assert {"ssmax_learn", "softmax+forget", "lssar+forget", "stickbreak"} <= set(kinds)
    assert "stickbreak+forget" not in kinds
    cases = [dict(what="attn", kind=k, backend="math", T=24, grad=g) for k in kinds for g in (False, True)]
    bench.time_cases(cases, "cpu", "float32", "[1/1]")
    assert [c["kind"] for c in cases if "seconds" not in c] == []


def test_bench_decoding_memory_of_a_windowed_stack_is_bounded(monkeypatch):
    """bench.py's decode cases: the KV cache of a uniform stack grows with every token; a SWAN-style stack's windowed
    layers keep their last window - 1 keys, so only its global layer grows (a cache that kept too many keys would
    show here)."""
    import bench

    monkeypatch.setattr(bench, "repeats", 1)
    monkeypatch.setattr(bench, "DEMO", dict(n_layer=4, n_head=2, n_embd=16, vocab_size=13))
    swan = "[3*softmax:window=8,softmax:pos=none:temp=logn]"
    assert bench.split_kinds(f"softmax,{swan}") == ["softmax", swan]
    cases = [dict(what="decode", model="demo", kind=k, T=T, batch=1) for k in ("softmax", swan) for T in (32, 64)]
    bench.time_cases(cases, "cpu", "float32", "[1/1]")
    per_key = 2 * 16 * 4  # k and v of one position of one layer, fp32
    got = {(c["kind"], c["T"]): c["cache_bytes"] // per_key for c in cases}
    assert got == {("softmax", 32): 4 * 32, ("softmax", 64): 4 * 64, (swan, 32): 3 * 7 + 32, (swan, 64): 3 * 7 + 64}
    with pytest.raises(SystemExit, match="decode_kinds: \\[2\\*softmax"):
        bench.split_kinds("[2*softmax:window=8,lssa:pos=learned]")


def test_bench_compare_puts_estimates_next_to_measurements(tmp_path):
    """--compare: a GPU bench's Triton times relative to Triton's softmax and to SDPA, next to the static estimate
    (kernels/sass.py's report) of the same passes."""
    import bench
    rows = [dict(arch=90, dtype="bf16", D=64, kind=kd, p=p, gate=False, pass_=ps, estimate_per_score=e)
            for kd, p, e in (("exp", 0.0, 1.0), ("softplus", 15.0, 3.0)) for ps in ("fwd", "dq", "dkdv")]
    (tmp_path / "sass.json").write_text(json.dumps({"kernels": rows}))
    cases = [dict(what="attn", kind=k, backend=b, T=1024, grad=False, seconds=s)
             for k, b, s in (("softmax", "triton", 2.0), ("lssar", "triton", 5.0), ("softmax", "sdpa", 1.0))]
    (tmp_path / "bench.json").write_text(json.dumps({"results": cases}))
    bench.compare_with_estimates(str(tmp_path / "bench.json"), str(tmp_path / "sass.json"))
    table = (tmp_path / "estimate_vs_measured.md").read_text()
    assert "| lssar | 1024 | fwd | 2.50 | 3.00 | 5.00 |" in table
    assert "| softmax | 1024 | fwd | 1.00 | 1.00 | 2.00 |" in table


def test_bench_reports_a_failing_case_and_goes_on(monkeypatch):
    """A case whose computation raises (e.g. a Triton kernel failing on a GPU under SOFTPLUS_ATTN_STRICT=1) is
    reported as failed with its error; the other cases of the group are still timed."""
    import bench

    real = bench.build

    def build(c, dev, dt):
        if c["kind"] == "lssa":
            raise RuntimeError("PassManager::run failed\n  (sm_90)")
        return real(c, dev, dt)

    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "repeats", 1)
    cases = [dict(what="attn", kind=k, backend="math", T=16, grad=False) for k in ("softmax", "lssa")]
    bench.time_cases(cases, "cpu", "float32", "[1/1]")
    assert cases[0]["seconds"] > 0 and "seconds" not in cases[1]
    assert cases[1]["skipped"] == "failed: RuntimeError: PassManager::run failed (sm_90)"


def test_bench_sigterm_stops_the_memory_child(tmp_path):
    """SIGTERM to bench.py ends it and the memory-measurement subprocess it is waiting for, keeping what it saved."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, "bench.py", "--lengths=4096", "--kinds=lssar", "--backends=math",
                          "--grad_max_len=0", "--train_kinds=", "--eval_lengths=", "--repeats=1", "--memory=true",
                          f"--out={tmp_path / 'b'}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child = None
    for _ in range(600):  # wait for the memory child of the first case
        time.sleep(0.1)
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        if kids:
            child = int(kids[0])
            break
    assert child is not None, p.stdout.read() if p.poll() is not None else "no memory subprocess started"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    for _ in range(50):
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the memory subprocess {child} is still running")


@pytest.mark.skipif(not flex_ok, reason="no flex_attention in this torch")
def test_flex_stays_compiled_across_kinds_and_lengths():
    """Every normalised kind at several length classes in one process: more compiles than dynamo's default limit
    of 8, after which flex would silently fall back to an unfused implementation that materialises T x T scores."""
    import warnings

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for T in (5, 100, 300):
            for attn in ("softmax", "ssmax", "lssa", "lssar"):
                q, k, v = (x.float() for x in make_qkv(1, 2, T, T, 16, seed=T))
                attention(q, k, v, attn, backend="flex")
                attention(q[:, :, -1:], k, v, attn, backend="flex")  # Tq = 1 against Tk keys
    assert not [w for w in caught if "without torch.compile" in str(w.message)]


@pytest.mark.skipif(not flex_ok, reason="no flex_attention in this torch")
def test_flex_lssar_in_a_fresh_process(tmp_path):
    """LSSAR through flex as the first compile of a process (an empty inductor cache): with dynamic shapes the
    re-weighting pass hit an inductor C++ compile error at T = 256 that a warm process hid."""
    script = (
        "import torch\n"
        "from tests.test_attention import attention\n"
        "from tests.test_attention import make_qkv, oracle\n"
        "q, k, v = make_qkv(1, 2, 256, 256, 16, seed=1)\n"
        "with torch.no_grad():\n"
        "    got = attention(q.float(), k.float(), v.float(), 'lssar', backend='flex')\n"
        "want = oracle(q, k, v, 'lssar')\n"
        "print(((got.double() - want).abs().max() / want.abs().max()).item())\n"
    )
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


# ----------------------------------------------------------------------------------------------------
# GPU: every backend against the float64 oracle (computed on the GPU by query chunks), fp32 and bf16
# autocast, forward and backward, up to 16K tokens. Run with `python -m pytest -m cuda` (.ci/gpu_acceptance).
# ----------------------------------------------------------------------------------------------------
def chunked_oracle(q, k, v, attn, p, go, rows=1024):
    """out, dq, dk, dv of the oracle by query chunks (a chunk is its rows at pos_offset = first row; rows are
    independent given q, k, v): memory O(rows x T)."""
    q, k, v = (x.detach().double().clone().requires_grad_() for x in (q, k, v))
    outs = []
    for c0 in range(0, q.shape[2], rows):
        c1 = min(c0 + rows, q.shape[2])
        out = oracle(q[:, :, c0:c1], k[:, :, :c1], v[:, :, :c1], attn, p, pos_offset=c0)
        out.backward(go[:, :, c0:c1].double())
        outs.append(out.detach())
    return [torch.cat(outs, dim=2), q.grad, k.grad, v.grad]


GPU_CASES = [(b, a, p, T, dt, grad) for b, a, p, T in
             [("triton", "lssa", 0.0, 1024), ("triton", "lssar", 0.0, 1024), ("triton", "softmax", 15.0, 1024),
              ("triton", "lssa", 0.0, 16384), ("triton", "lssar", 0.0, 16384),
              ("math", "lssa", 0.0, 1024), ("math", "lssar", 0.0, 1024), ("math", "lssar", 0.0, 16384),
              ("sdpa", "softmax", 0.0, 1024), ("sdpa", "softmax", 0.0, 16384), ("sdpa", "ssmax", 0.0, 4096),
              ("flex", "lssa", 0.0, 4096), ("flex", "lssar", 0.0, 4096), ("flex", "softmax", 0.0, 4096)]
             for dt in ("float32", "bfloat16") for grad in (True, False) if grad or T == 16384]


@pytest.mark.cuda
@pytest.mark.parametrize("backend,attn,p,T,dtype,grad", GPU_CASES,
                         ids=[f"{b}-{a}-p{p:g}-{T}-{dt}-{'bwd' if g else 'fwd'}" for b, a, p, T, dt, g in GPU_CASES])
def test_gpu_backends_match_the_oracle(backend, attn, p, T, dtype, grad):
    q, k, v = (x.cuda() for x in make_qkv(1, 2, T, T, 64, seed=T, scale=2.0))
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).cuda()
    bf16 = dtype == "bfloat16"
    if bf16:  # the oracle sees the same bf16-rounded inputs: this measures the computation
        q, k, v = (x.bfloat16().double() for x in (q, k, v))
    want = chunked_oracle(q, k, v, attn, p, go)
    xs = [x.to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(grad) for x in (q, k, v)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(grad):
        out = attention(*xs, attn, p, backend=backend)
    got = [out]
    if grad:
        got += list(torch.autograd.grad(out, xs, go.to(out.dtype)))
    tol = 2e-2 if bf16 else (1e-5 if p == 0 and attn != "lssar" else 5e-5)
    errs = _rel_all(got, want[:len(got)])
    assert max(errs) < tol, errs


def test_flex_uniform_rows_are_zero():
    """An exactly uniform row has no weight above the average: with re-weighting its flex second pass scores every
    key -inf, and the row must come out 0 (as math's and the oracle's), not NaN."""
    B, H, T, d = 1, 2, 16, 8
    g = torch.Generator().manual_seed(17)
    q, k = torch.zeros(B, H, T, d), torch.zeros(B, H, T, d)
    q[..., : d // 2] = torch.randn(B, H, T, d // 2, generator=g)  # q . k = 0 exactly: softplus(0) everywhere
    k[..., d // 2:] = torch.randn(B, H, T, d // 2, generator=g)
    v = torch.randn(B, H, T, d, generator=g) + 3.0
    with torch.no_grad():
        out = attention(q, k, v, "lssar", backend="flex")
    assert not torch.isnan(out).any()
    for i in (3, 7, 15):  # N_i a power of two: the row sums are exact, every N_i A_ij - 1 is exactly 0
        assert torch.equal(out[:, :, i], torch.zeros_like(out[:, :, i]))
    torch.testing.assert_close(out[:, :, 1], v[:, :, :2].mean(dim=2), rtol=1e-6, atol=1e-6)  # O = 0 rows survive


def test_kernels_never_import_model():
    """The layout: kernels/ depends on the spec it is handed, never on model.py (model.py imports kernels)."""
    import ast
    import glob
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        tree = ast.parse(open(path).read())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [n for n in names if n == "model" or n.startswith("model.")], path
