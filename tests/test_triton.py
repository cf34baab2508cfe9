"""kernels/triton_attn.py against the float64 oracle of test_attention.py: forward and gradients (dq, dk, dv w.r.t.
the raw q, k, v, through a float64 QK-norm + row-scale step written here), LSSA and LSSAR (p = 3, 15), the exp kind
(SSMax, softmax), stick-breaking (both conventions, long rows whose stick is used up), ALiBi, sliding windows, Tq <
Tk with pos_offset, exactly uniform rows, fp16, torch.compile. Without CUDA the kernels run through Triton's
interpreter (TRITON_INTERPRET=1, set by the module) with 16 x 16 blocks, so every length here crosses block edges;
tests marked `cuda` need a GPU (bf16, long T)."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # before anything imports triton (pytest imports every test module before running any test): triton reads
    # the flag when its own @jit functions are defined, at import (kernels/triton_attn.py sets it too, but only
    # helps if it is the first to import triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    from kernels import triton_attn as ta  # (sets TRITON_INTERPRET=1 on a machine without CUDA)
except ImportError:  # no triton here (e.g. not Linux): conftest.py deselects this file's tests, marked `triton`
    ta = None
pytestmark = pytest.mark.triton
from model import REWEIGHT_EXEMPT_ROWS  # noqa: E402
from tests.test_attention import alibi_slopes_oracle, make_qkv, oracle  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


KIND = {"lssa": "softplus", "softmax": "exp", "ssmax": "exp", "stickbreak": "stickbreak",
        "stickbreak_self": "stickbreak_self"}
STICKS = ["stickbreak", "stickbreak_self"]


def prepare(q, k, kind, off, window=0):
    """What the model does before the kernel, in float64: LSSA / SSMax (QK-norm, q scaled by log(d) log(N_t), N_t
    the keys row t sees: min(P_t + 1, window) under a window) or softmax and stick-breaking (q / sqrt(d));
    differentiable, so the gradients reach the raw q, k."""
    if kind in ("softmax", *STICKS):
        return q / math.sqrt(q.shape[-1]), k
    n = torch.arange(off + 1, off + q.shape[2] + 1, dtype=torch.float64, device=q.device).view(-1, 1)
    n = n.clamp_max(window) if window else n
    qn = q / q.norm(dim=-1, keepdim=True) * (math.log(q.shape[-1]) * torch.log(n))
    return qn, k / k.norm(dim=-1, keepdim=True)


def kernel(q, k, v, p, off, attn="lssa", dtype=torch.float32, v_dtype=None, alibi=False, window=0):
    """triton_attention on raw float64 CPU q, k, v: prepared in float64, cast to `dtype` (v to v_dtype), run on
    DEV; the output comes back to the CPU (all differentiably). alibi: ALiBi with the oracle's slopes."""
    q, k, v = (x.to(DEV) for x in (q, k, v))
    qp, kp = prepare(q, k, attn, off, window)
    slopes = torch.tensor(alibi_slopes_oracle(q.shape[1]), dtype=torch.float32, device=DEV) if alibi else None
    return ta.triton_attention(qp.to(dtype), kp.to(dtype), v.to(v_dtype or dtype), off, p, KIND[attn], alibi=slopes,
                               window=window).cpu()


def grads(fn, q, k, v, go):
    """fn(q, k, v) and its gradients for the output gradient go, as float64 (CPU tensors in and out)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go.to(out.dtype))
    return [t.double() for t in (out, dq, dk, dv)]


def rel_errors(got, want):
    """Largest error of each of out, dq, dk, dv relative to the largest magnitude among them (as
    tests/test_backends.py: a gradient that is exactly 0, e.g. dq of a one-key row, only has absolute rounding)."""
    ref = max(w.abs().max().item() for w in want)
    for g in got:
        assert torch.isfinite(g).all()
    return [(g - w).abs().max().item() / max(ref, 1e-30) for g, w in zip(got, want, strict=True)]


def check(q, k, v, p, off, attn="lssa", tol=None, go=None, alibi=False, window=0, **kw):
    go = torch.randn(v.shape[:2] + q.shape[2:], generator=torch.Generator().manual_seed(1), dtype=torch.float64) \
        if go is None else go
    want = grads(lambda a, b, c: oracle(a, b, c, attn, p, pos_offset=off, alibi=alibi, window=window), q, k, v, go)
    got = grads(lambda a, b, c: kernel(a, b, c, p, off, attn, alibi=alibi, window=window, **kw), q, k, v, go)
    errs = rel_errors(got, want)
    tol = tol or (1e-5 if p == 0 else 5e-5)  # as the math backend (test_backends.py)
    assert max(errs) <= tol, dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))
    return got


# ----------------------------------------------------------------------------------------------------
# LSSA / LSSAR, fp32, against the oracle
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 3.0, 15.0], ids=["p0", "p3", "p15"])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("T", [1, 3, 17, 64, 130, 257])
def test_matches_oracle_fp32(T, D, p):
    B, H = (2, 2) if T <= 17 else (1, 1)  # several batch x head programs where it is cheap
    q, k, v = make_qkv(B, H, T, T, D, seed=T + D, scale=2.0)
    check(q, k, v, p, 0)


@pytest.mark.parametrize("p", [0.0, 15.0], ids=["p0", "p15"])
@pytest.mark.parametrize("Tq,Tk,off", [(7, 131, 124), (7, 131, 60), (7, 131, 0), (1, 40, 39), (20, 50, 5)])
def test_pos_offset(Tq, Tk, off, p):
    """Tq < Tk (KV cache): query t at position off + t. off = Tk - Tq is the default placement, off = 0 puts the
    re-weighting's exempt rows in the block, (20, 50, 5) has query and key blocks misaligned."""
    q, k, v = make_qkv(1, 2, Tq, Tk, 16, seed=Tq + off, scale=2.0)
    _, _, dk, dv = check(q, k, v, p, off)
    # keys after the last query's position are invisible: no gradient, and changing them changes nothing
    assert not dk[:, :, off + Tq:].any() and not dv[:, :, off + Tq:].any()
    k2, v2 = k.clone(), v.clone()
    k2[:, :, off + Tq:], v2[:, :, off + Tq:] = 100.0, -100.0
    with torch.no_grad():
        assert torch.equal(kernel(q, k, v, p, off), kernel(q, k2, v2, p, off))


def test_causality():
    T = 40
    q, k, v = make_qkv(1, 2, T, T, 16, seed=3, scale=2.0)
    with torch.no_grad():
        base = kernel(q, k, v, 15.0, 0)
        for t in (0, 2, 15, 16, 31):  # block edges at 16, 32
            k2, v2 = k.clone(), v.clone()
            k2[:, :, t + 1:] *= -3.0
            v2[:, :, t + 1:] += 5.0
            out = kernel(q, k2, v2, 15.0, 0)
            assert torch.equal(out[:, :, :t + 1], base[:, :, :t + 1]), f"future keys leaked into rows <= {t}"
            assert not torch.equal(out[:, :, t + 1:], base[:, :, t + 1:])


def test_exempt_rows_come_from_the_spec(monkeypatch):
    """The kernel's O_t = 0 rows are the spec's exempt rows (model.REWEIGHT_EXEMPT_ROWS; rows 1, 2 keep
    below-average weights), handed to the kernels by the backend."""
    from tests.test_attention import attention
    seen = []
    forward = ta.forward
    monkeypatch.setattr(ta, "forward", lambda *a: seen.append(a[6]) or forward(*a))  # (q, k, v, off, p, kind, exempt, c)
    q, k, v = make_qkv(1, 2, 6, 6, 16, seed=19)
    attention(q.float(), k.float(), v.float(), "lssar", 0.0, backend="triton")
    assert seen == [REWEIGHT_EXEMPT_ROWS]
    assert ta.constants(15.0, "softplus", seen[0], torch.float32)["EXEMPT"] == REWEIGHT_EXEMPT_ROWS
    check(q, k, v, 3.0, 0)


# ----------------------------------------------------------------------------------------------------
# uniform rows: the re-weighting's all-zero rows
# ----------------------------------------------------------------------------------------------------
def orthogonal_qkv(B, H, T, d, seed, every=1):
    """Queries orthogonal to every key (disjoint supports: each product in q.k is exactly 0), so every score is
    exactly 0 and each row's weights are exactly uniform. every=2: only odd rows; even rows get random queries."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k = torch.zeros(B, H, T, d, dtype=torch.float64)
    k[..., d // 2:] = torch.randn(B, H, T, d // 2, generator=g, dtype=torch.float64)
    q[:, :, every - 1::every, d // 2:] = 0.0
    v = torch.randn(B, H, T, d, generator=g, dtype=torch.float64) + 3.0  # clearly non-zero means
    return q, k, v


POW2_ROWS = [n - 1 for n in (4, 8, 16, 32, 64, 128)]  # N_t a power of two: N identical weights sum exactly


@pytest.mark.parametrize("p", [0.0, 3.0, 15.0], ids=["p0", "p3", "p15"])
def test_uniform_rows(p):
    """Every score 0, so A_tj = 1 / N_t exactly. Rows 0-2 (O = 0), and every row without re-weighting, output the
    mean of the visible v; with re-weighting, rows >= 3 have N A - 1 = 0, R = 0: output exactly 0 where N_t is a
    power of two (elsewhere the row sum may round and the row legitimately survives, see test_attention.py).
    Gradients are finite everywhere (0 through the all-zero rows)."""
    T = 130
    q, k, v = orthogonal_qkv(1, 2, T, 16, seed=17)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = kernel(qg, kg, vg, p, 0)
    mean = v.cumsum(dim=2) / torch.arange(1, T + 1, dtype=torch.float64).view(T, 1)
    rows = range(T) if p == 0 else range(REWEIGHT_EXEMPT_ROWS)
    for t in rows:
        torch.testing.assert_close(out[:, :, t].double(), mean[:, :, t], rtol=1e-5, atol=1e-5)
    if p > 0:
        for t in POW2_ROWS:
            assert torch.equal(out[:, :, t], torch.zeros_like(out[:, :, t])), f"row {t} should be exactly 0"
    out.sum().backward()
    for x in (qg, kg, vg):
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("p", [3.0, 15.0], ids=["p3", "p15"])
def test_zero_rows_among_others(p):
    """Exactly uniform (all-zero after re-weighting) rows interleaved with ordinary rows: the ordinary rows, the
    zero rows and all gradients match the oracle. Uniform rows at N_t other than powers of two are left out (of
    the comparison and, through dout = 0, of the gradients): whether they survive depends on how the row sum
    rounds, in fp32 here and in fp64 in the oracle."""
    T = 130
    q, k, v = orthogonal_qkv(1, 2, T, 16, seed=21, every=2)
    uniform = torch.zeros(T, dtype=torch.bool)
    uniform[1::2] = True  # rows 1 (O = 0: the mean), 3 (N = 4: exactly 0), 5, 7, ...
    keep = ~uniform | torch.isin(torch.arange(T), torch.tensor(POW2_ROWS + [1]))
    go = torch.randn(1, 2, T, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    go[:, :, ~keep] = 0.0
    want = grads(lambda a, b, c: oracle(a, b, c, "lssa", p, pos_offset=0), q, k, v, go)
    got = grads(lambda a, b, c: kernel(a, b, c, p, 0), q, k, v, go)
    want[0], got[0] = want[0][:, :, keep], got[0][:, :, keep]
    errs = rel_errors(got, want)
    assert max(errs) <= 5e-5, errs
    for t in POW2_ROWS:  # all odd: uniform, and exactly 0 in both
        i = keep[:t].sum()  # row t among the kept rows
        assert not want[0][:, :, i].any() and not got[0][:, :, i].any()


# ----------------------------------------------------------------------------------------------------
# the exp kind (SSMax, softmax) through the same kernels
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn,p,scale", [("ssmax", 0.0, 2.0), ("ssmax", 15.0, 2.0), ("softmax", 0.0, 4.0),
                                          ("softmax", 3.0, 4.0)])
def test_exp_kind(attn, p, scale):
    """softmax at scale 4 has scores of +-30 and more: exercises the online row max and its rescaling."""
    q, k, v = make_qkv(1, 2, 70, 70, 16, seed=5, scale=scale)
    check(q, k, v, p, 0, attn=attn)


# ----------------------------------------------------------------------------------------------------
# stick-breaking: both conventions, nearest first, the remainder to the row's own key
# ----------------------------------------------------------------------------------------------------
STICK_CASES = [("stickbreak", 1, 1, 0), ("stickbreak", 40, 40, 0), ("stickbreak", 7, 131, 124),
               ("stickbreak_self", 17, 17, 0), ("stickbreak_self", 70, 70, 0), ("stickbreak_self", 20, 50, 5),
               ("stickbreak_self", 9, 40, 31)]  # (a query block that starts at a key block's last key)


@pytest.mark.parametrize("attn,Tq,Tk,off", STICK_CASES)
def test_stickbreak_matches_oracle(attn, Tq, Tk, off):
    """Forward and gradients against the oracle's product form (tests/test_attention.py _stick), rows crossing
    several key blocks (16 x 16 under the interpreter), queries after a cache whose blocks do not line up."""
    B, H = (2, 2) if Tk <= 40 else (1, 2)
    q = make_qkv(B, H, Tq, Tk, 16, seed=Tq + off, scale=2.0)[0]
    _, k, v = make_qkv(B, H, Tk, Tk, 16, seed=Tk, scale=2.0)
    check(q, k, v, 0.0, off, attn)


def long_stick_qkv(T, Tq, seed=0):
    """Four batch elements of rows of T keys: scores q . k / sqrt(16) of +1e4 (every key would take the whole stick:
    only the nearest counts), -1e4 (none takes any: all goes to the remainder), either at random, each with 1e-2
    noise; and ordinary random q, k (scale 2). Random v; the last Tq queries."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(4, 1, T, 16, dtype=torch.float64)
    k = torch.zeros(4, 1, T, 16, dtype=torch.float64)
    q[:3, ..., 0] = 200.0  # q . k / 4 = 200^2 / 4 = 1e4
    k[0, ..., 0], k[1, ..., 0] = 200.0, -200.0
    k[2, ..., 0] = 200.0 * torch.randn(T, generator=g, dtype=torch.float64).sign()
    k[:3] += 1e-2 * torch.randn(k[:3].shape, generator=g, dtype=torch.float64)
    q[3], k[3] = make_qkv(1, 1, T, T, 16, seed=seed + 1, scale=2.0)[:2]
    v = torch.randn(4, 1, T, 16, generator=g, dtype=torch.float64)
    return q[:, :, T - Tq:], k, v


@pytest.mark.parametrize("attn", STICKS)
def test_stickbreak_long_rows(attn, monkeypatch):
    """Rows of 1040 keys (65 key blocks, the running sums carried across all of them). Where the scores are +-1e4
    the stick is used up at the first key (or never touched) and the sums of softplus reach 1e7 in log space:
    output and every gradient finite, the output the oracle's. Ordinary scores: forward and gradients against the
    oracle (and dv, where the remainder is ~1, everywhere). The queries start at a key block's last key (the
    remainder's key on the dk / dv kernel's diagonal). The dq tolerance is 5e-5, not 1e-5: the nearest-first
    backward gets each key's sum over the farther keys as delta minus the nearer keys' sum, exact to fp32 rounding
    of delta, and the far keys add that rounding up: dq's error grows with the row (4e-6 at 260 keys to 2e-5 at 1040
    here, against 2e-7 for the math backend, which holds whole rows). Key blocks of 64 here (17 of them), for the
    interpreter's speed."""
    monkeypatch.setattr(ta, "_config", lambda *a, **kw: (16, 64, 1, 1))
    T, Tq = 1040, 17
    q, k, v = long_stick_qkv(T, Tq)
    go = torch.randn(4, 1, Tq, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = grads(lambda a, b, c: kernel(a, b, c, 0.0, T - Tq, attn), q, k, v, go)
    for t in got:
        assert torch.isfinite(t).all()
    want = grads(lambda a, b, c: oracle(a, b, c, attn, pos_offset=T - Tq), q, k, v, go)
    for i in (0, 3):  # out and dv
        assert (got[i] - want[i]).abs().max().item() <= 1e-5 * want[i].abs().max().item()
    errs = rel_errors([t[3:] for t in got], [t[3:] for t in want])
    assert max(errs) <= 5e-5, dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))


def test_stickbreak_dkdv_blocks_wider_than_dq(monkeypatch):
    """The dk / dv kernel's key blocks may be a multiple of the dq kernel's (the GPU tiles of head size 128): the dq
    kernel then stores its running sums only where a dk / dv block ends (here 32 keys against 16)."""
    real, seen = ta._config, []

    def config(kernel, D, elt_size, p, arch, gate=False, kind="softplus", *a):
        if kernel == "dkdv" and kind in ta.STICK:
            seen.append(kind)
            return 16, 32, 1, 1
        return real(kernel, D, elt_size, p, arch, gate, kind, *a)
    monkeypatch.setattr(ta, "_config", config)
    for attn, (Tq, Tk, off) in zip(STICKS, [(7, 131, 124), (40, 40, 0)], strict=True):
        q = make_qkv(1, 2, Tq, Tk, 16, seed=Tq, scale=2.0)[0]
        _, k, v = make_qkv(1, 2, Tk, Tk, 16, seed=Tk, scale=2.0)
        check(q, k, v, 0.0, off, attn)
    assert set(seen) == set(STICKS)


def test_in_tile_sums_split_fp32_into_two_tf32_dots():
    """_nearer's GPU path for fp32 operands (tf32x3: the high 10 mantissa bits and the rest as two dots, exact for a
    matrix of +-1): run under the interpreter, whose dots are exact, it must give the plain dot's sums."""
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 3.0
    out = torch.empty(2, 16, 16, dtype=torch.float32)
    _nearer_probe[(1,)](x, out)
    want = torch.tensor(x.double().flip(-1).cumsum(-1).flip(-1) - x.double(), dtype=torch.float32)
    torch.testing.assert_close(out[0], want, rtol=0, atol=2e-5)  # plain
    torch.testing.assert_close(out[1], want, rtol=0, atol=2e-5)  # split


if ta is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _nearer_probe(X, Out):
        i = tl.arange(0, 16)
        x = tl.load(X + i[:, None] * 16 + i[None, :])
        U = ta._tri(16, tl.float32, 1.0, False)
        tl.store(Out + i[:, None] * 16 + i[None, :], ta._nearer(x, U, tl.zeros_like(x), "ieee", False))
        tl.store(Out + 256 + i[:, None] * 16 + i[None, :], ta._nearer(x, U, tl.zeros_like(x), "tf32x3", False))


# ----------------------------------------------------------------------------------------------------
# ALiBi and sliding windows in the softplus and exp kernels
# ----------------------------------------------------------------------------------------------------
ALIBI_CASES = [("softmax", 0.0, 40, 40, 0), ("lssa", 0.0, 40, 40, 0), ("lssa", 15.0, 40, 40, 0),
               ("ssmax", 15.0, 40, 40, 0), ("softmax", 0.0, 20, 50, 5), ("lssa", 15.0, 20, 50, 5)]


@pytest.mark.parametrize("attn,p,Tq,Tk,off", ALIBI_CASES, ids=[f"{a}-p{p:g}-{Tq}-{Tk}" for a, p, Tq, Tk, _ in ALIBI_CASES])
def test_alibi_matches_oracle(attn, p, Tq, Tk, off):
    """ALiBi's -m_h (i - j) per tile, 3 heads (slopes of a head count that is not a power of two), with and without
    the re-weighting, forward and gradients."""
    q = make_qkv(1, 3, Tq, Tk, 16, seed=Tq + off, scale=2.0)[0]
    _, k, v = make_qkv(1, 3, Tk, Tk, 16, seed=Tk, scale=2.0)
    check(q, k, v, p, off, attn, alibi=True)


WINDOW_CASES = [("lssa", 15.0, 1), ("softmax", 0.0, 1), ("ssmax", 15.0, 5), ("lssa", 0.0, 5), ("softmax", 0.0, 16),
                ("lssa", 15.0, 16), ("lssa", 0.0, 33), ("ssmax", 15.0, 33)]


@pytest.mark.parametrize("attn,p,window", WINDOW_CASES, ids=[f"{a}-p{p:g}-w{w}" for a, p, w in WINDOW_CASES])
def test_window_matches_oracle(attn, p, window):
    """Query P sees keys P - W < j <= P, N = min(P + 1, W) (in LSSA's scale and the re-weighting): 70 rows over 5
    key blocks, so blocks before the window are skipped and its lower edge crosses blocks."""
    q, k, v = make_qkv(1, 2, 70, 70, 16, seed=window, scale=2.0)
    check(q, k, v, p, 0, attn, window=window)


@pytest.mark.parametrize("attn,p,window", [("softmax", 0.0, 33), ("lssa", 15.0, 5)], ids=["softmax-w33", "lssar-w5"])
def test_window_with_alibi_and_gate(attn, p, window):
    """A window with ALiBi and with the forget gate (gradient of the gate too), queries after a cache."""
    from tests.test_attention import attention
    from tests.test_families import grads as grads_all
    from tests.test_families import make_logf
    Tq, Tk, off = 20, 70, 50
    q = make_qkv(1, 3, Tq, Tk, 16, seed=window, scale=2.0)[0]
    _, k, v = make_qkv(1, 3, Tk, Tk, 16, seed=7, scale=2.0)
    logf = make_logf(1, 3, Tk, seed=window)
    for alibi, gated in ((True, False), (False, True), (True, True)):
        xs = (q, k, v, logf) if gated else (q, k, v)
        want = grads_all(lambda *a, al=alibi: oracle(*a[:3], attn, p, pos_offset=off, alibi=al, window=window,
                                                     logf=a[3] if len(a) > 3 else None), *xs)
        got = grads_all(lambda *a, al=alibi: attention(*(x.float() for x in a[:3]), attn, p, off, alibi=al,
                                                       window=window, logf=a[3].float() if len(a) > 3 else None,
                                                       backend="triton"), *xs)
        assert max(rel_errors(got, want)) <= 5e-5, (alibi, gated)


def test_window_hides_the_keys_before_it():
    """Keys at or before P - W neither change row P nor get its gradient: a window edge off by one fails here."""
    T, W = 50, 16
    q, k, v = make_qkv(1, 2, T, T, 16, seed=11, scale=2.0)
    for attn, p in (("lssa", 15.0), ("softmax", 0.0)):
        with torch.no_grad():
            base = kernel(q, k, v, p, 0, attn, window=W)
            for j in (0, 15, 16, 30):  # key j is visible to rows j .. j + W - 1 only
                k2, v2 = k.clone(), v.clone()
                k2[:, :, j] *= -3.0
                v2[:, :, j] += 5.0
                out = kernel(q, k2, v2, p, 0, attn, window=W)
                assert torch.equal(out[:, :, j + W:], base[:, :, j + W:]), (attn, j)
                assert not torch.equal(out[:, :, j + W - 1], base[:, :, j + W - 1]), (attn, j)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    kernel(qg, kg, vg, 0.0, 0, "softmax", window=W)[:, :, 40:].sum().backward()  # rows 40.. see keys 25..
    assert not kg.grad[:, :, :25].any() and not vg.grad[:, :, :25].any() and vg.grad[:, :, 25].abs().min() > 0


# ----------------------------------------------------------------------------------------------------
# dtypes, layouts, interface
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 15.0], ids=["p0", "p15"])
@pytest.mark.parametrize("qk_dtype", [torch.float16, torch.float32], ids=["qk16", "qk32"])
def test_fp16(qk_dtype, p):
    """fp16 v (and the probabilities cast to it for P @ V), with fp16 or fp32 q, k; output in v's dtype. An fp16
    q.k is off by ~5e-4 x the score scale (~10 here), and the p-th power amplifies score errors ~p-fold: 2e-2 then
    (measured 8e-3 on dq at p = 15); model.py keeps q, k in fp32 for this reason."""
    q, k, v = make_qkv(1, 2, 40, 40, 16, seed=6, scale=2.0)
    tol = 2e-2 if p > 0 and qk_dtype == torch.float16 else 1e-2
    check(q, k, v, p, 0, tol=tol, dtype=qk_dtype, v_dtype=torch.float16)
    assert kernel(q, k, v, p, 0, dtype=qk_dtype, v_dtype=torch.float16).dtype == torch.float16


def test_non_contiguous_and_head_size_not_power_of_two():
    B, H, T, d = 2, 3, 21, 24  # d = 24: padded to 32 inside the kernel
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    check(q, k, v, 15.0, 0)


def test_supports():
    q = torch.zeros(1, 2, 5, 16, device=DEV)
    assert ta.supports(q, q, q, "softplus", 15.0) is None
    assert ta.supports(q, q, q, "exp", 0.0) is None
    assert "kind" in ta.supports(q, q, q, "relu", 0.0)
    big = torch.zeros(1, 2, 5, 256, device=DEV)
    assert "head size" in ta.supports(big, big, big, "softplus", 0.0)
    assert "dtype" in ta.supports(q.double(), q.double(), q.double(), "softplus", 0.0)
    assert ta.supports(q, q[:, :1], q[:, :1], "softplus", 0.0) is not None
    assert ta.supports(q, q, q, "stickbreak", 0.0) is None and ta.supports(q, q, q, "exp", 0.0, True, True, 7) is None
    for bad in (dict(p=3.0), dict(gate=True), dict(alibi=True), dict(window=4)):  # stick-breaking takes none of them
        assert "stickbreak" in ta.supports(q, q, q, **dict(dict(kind="stickbreak", p=0.0), **bad))
    with pytest.raises(ValueError, match="slopes"):
        ta.forward(q, q, q, 0, 0.0, "exp", slopes=torch.ones(3, device=DEV))
    if DEV == "cpu":
        assert "bfloat16" in ta.supports(q, q, q.bfloat16(), "softplus", 0.0)  # the interpreter gets bf16 wrong
    with pytest.raises(ValueError, match="pos_offset"):
        ta.forward(q, q, q, 3, 0.0)
    empty = q[:, :, :0]  # no query rows: empty output, zero gradients, nothing launched
    out, S, M, Z = ta.forward(empty, q, q, 5, 15.0)
    assert out.shape == (1, 2, 0, 16) and S.shape == (1, 2, 0)
    dq, dk, dv, dc = ta.backward(out, empty, q, q, out, S, M, Z, 5, 15.0)
    assert dq.shape == empty.shape and not dk.any() and not dv.any() and dc is None


def test_torch_compile_no_graph_breaks():
    """The custom ops are opaque to dynamo: no graph break, and the compiled function (forward and backward)
    gives the eager result."""
    q, k, v = make_qkv(1, 2, 20, 20, 16, seed=9, scale=2.0)

    def fn(q, k, v):
        return ta.triton_attention(q * 1.5, k, v, 0, 15.0).square().sum()

    args = [x.float().to(DEV).requires_grad_() for x in (q, k, v)]
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    want = fn(*args)
    want_grads = torch.autograd.grad(want, args)
    for backend in ("aot_eager", "inductor"):  # aot_eager: the fake / autograd registrations; inductor: the default
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for a, b in zip(torch.autograd.grad(got, args), want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_torch_compile_new_op_arguments():
    """The op's ALiBi slopes and window, and stick-breaking's fp32 output (the fake implementation's dtype), through
    aot_eager with fullgraph: the compiled function gives the eager result and gradients."""
    q, k, v = make_qkv(1, 2, 20, 20, 16, seed=9, scale=2.0)
    slopes = torch.tensor(alibi_slopes_oracle(2), dtype=torch.float32, device=DEV)
    fns = [lambda q, k, v: ta.triton_attention(q, k, v.half(), 0, 0.0, "stickbreak").float().square().sum(),
           lambda q, k, v: ta.triton_attention(q, k, v, 0, 3.0, "exp", alibi=slopes, window=7).square().sum()]
    args = [x.float().to(DEV).requires_grad_() for x in (q, k, v)]
    for fn in fns:
        want = fn(*args)
        want_grads = torch.autograd.grad(want, args)
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for a, b in zip(torch.autograd.grad(got, args), want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("qk_dtype,p", [(torch.bfloat16, 0.0), (torch.float32, 0.0), (torch.float32, 15.0)],
                         ids=["qk16-p0", "qk32-p0", "qk32-p15"])
def test_bf16_cuda(qk_dtype, p):
    """bf16 v; bf16 q, k only without re-weighting (a bf16 cosine is off by ~4e-3, ~0.1 in a score scaled by
    log(d) log(N), which the p-th power amplifies: model.py keeps q, k in fp32)."""
    q, k, v = make_qkv(2, 3, 300, 300, 64, seed=10, scale=2.0)
    check(q, k, v, p, 0, tol=2e-2, dtype=qk_dtype, v_dtype=torch.bfloat16)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dots", ["bf16", "fp16"])
@pytest.mark.parametrize("attn,p,gate,kw", [("lssa", 0.0, False, {}), ("lssar", 0.0, False, {}), ("softmax", 0.0, True, {}),
                                            ("lssar", 0.0, True, {}), ("stickbreak", 0.0, False, {}),
                                            ("stickbreak_self", 0.0, False, {}), ("softmax", 0.0, False, dict(alibi=True)),
                                            ("lssar", 0.0, True, dict(alibi=True, window=200))],
                         ids=["lssa", "lssar", "fox", "lssar-gate", "stickbreak", "stickbreak_self", "alibi",
                              "lssar-gate-alibi-window"])
def test_bf16_dots_cuda(attn, p, gate, kw, dots):
    """16-bit dots (the default under autocast) against the same arithmetic emulated by the math backend: q, k
    rounded after prepare exactly as the kernels round them, products and sums in fp32 (attn_dots=bf16 / fp16 on
    the math backend). What differs is the kernels' 16-bit P @ V dot and their fast polynomials: ~2^-9 relative
    (and stick-breaking's in-tile sums, fp16 and bf16 operands of fp32 sums)."""
    from tests.test_attention import attention
    q, k, v = make_qkv(2, 3, 600, 600, 64, seed=12, scale=2.0)
    logf = torch.nn.functional.logsigmoid(torch.randn(2, 3, 600, generator=torch.Generator().manual_seed(3),
                                                      dtype=torch.float64) + 2.0) if gate else None
    go = torch.randn(2, 3, 600, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    vdt = torch.bfloat16 if dots == "bf16" else torch.float16

    def run(backend):
        def fn(a, b, c, *lf):
            return attention(a.float().cuda(), b.float().cuda(), c.to(vdt).cuda(), attn, p, logf=lf[0].float().cuda()
                             if lf else None, backend=backend, dots=dots, **kw).cpu()
        return grads(fn, q, k, v, go) if logf is None else grads4(fn, q, k, v, logf, go)
    errs = rel_errors(run("triton"), run("math"))
    assert max(errs) < (2e-2 if attn == "lssar" else 1e-2), errs


def grads4(fn, q, k, v, logf, go):
    """grads() with the log forget gates as a fourth input."""
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, logf)]
    out = fn(*xs)
    return [t.double() for t in (out, *torch.autograd.grad(out, xs, go.to(out.dtype)))]


def chunked_oracle_grads(q, k, v, p, go, rows=512, attn="lssa", **kw):
    """out, dq, dk, dv of the float64 oracle, by query chunks (the oracle's pos_offset places a chunk; rows are
    independent given q, k, v): memory O(rows x T) instead of the full T x T matrix."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    outs = []
    for c0 in range(0, q.shape[2], rows):
        c1 = min(c0 + rows, q.shape[2])
        out = oracle(q[:, :, c0:c1], k[:, :, :c1], v[:, :, :c1], attn, p, pos_offset=c0, **kw)
        out.backward(go[:, :, c0:c1])
        outs.append(out.detach())
    return [torch.cat(outs, dim=2), q.grad, k.grad, v.grad]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("T", [1000, 4097, 16384])
@pytest.mark.parametrize("p", [0.0, 15.0], ids=["p0", "p15"])
def test_long_cuda(T, p):
    """Long rows (the oracle by chunks, on the CPU), fp32."""
    q, k, v = make_qkv(1, 1, T, T, 64, seed=T, scale=2.0)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = chunked_oracle_grads(q, k, v, p, go)
    got = grads(lambda a, b, c: kernel(a, b, c, p, 0), q, k, v, go)
    errs = rel_errors(got, want)
    assert max(errs) <= (1e-5 if p == 0 else 5e-5), errs


LONG_FAMILIES = [("stickbreak", {}, 4097), ("stickbreak_self", {}, 1000), ("softmax", dict(alibi=True), 4097),
                 ("lssa", dict(alibi=True), 1000), ("softmax", dict(window=1024), 4097),
                 ("lssa", dict(window=1024, alibi=True), 4097)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("attn,kw,T", LONG_FAMILIES, ids=[f"{a}-{T}" + "".join(f"-{k}" for k in kw)
                                                          for a, kw, T in LONG_FAMILIES])
def test_long_families_cuda(attn, kw, T):
    """Stick-breaking, ALiBi and windows compiled for the GPU, long rows (the oracle by chunks, on the CPU), fp32.
    Stick-breaking's dq carries the rounding of its far keys' delta - Q, which grows with the row
    (test_stickbreak_long_rows): 2e-4 at 4,097 keys."""
    q, k, v = make_qkv(1, 2, T, T, 64, seed=T, scale=2.0)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = chunked_oracle_grads(q, k, v, 0.0, go, attn=attn, **kw)
    got = grads(lambda a, b, c: kernel(a, b, c, 0.0, 0, attn, **kw), q, k, v, go)
    errs = rel_errors(got, want)
    assert max(errs) <= (2e-4 if attn in STICKS else 1e-5), dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))


# ----------------------------------------------------------------------------------------------------
# the backend: dispatch from a spec, and the fallback when a kernel fails
# ----------------------------------------------------------------------------------------------------
TRITON_CASES = [("lssa", 0.0, {}), ("lssar", 0.0, {}), ("lssa", 3.0, {}), ("softmax", 15.0, {}), ("ssmax", 0.0, {}),
                ("ssmax", 15.0, {}), ("ssmax_learn", 0.0, {}), ("ssmax_learn", 15.0, {}), ("stickbreak", 0.0, {}),
                ("stickbreak_self", 0.0, {}), ("lssar", 0.0, dict(alibi=True)),
                ("ssmax_learn", 15.0, dict(window=9, alibi=True))]


@pytest.mark.parametrize("attn,p,kw", TRITON_CASES,
                         ids=[f"{a}-p{p:g}" + "".join(f"-{k}" for k in kw) for a, p, kw in TRITON_CASES])
def test_backend_matches_the_oracle(attn, p, kw):
    """causal_attention(..., backend='triton'): the spec's prepare step (QK-norm, scales with the window's N,
    learned per-head s) then the kernels (ALiBi's slopes from the spec), forward and gradients, queries after a KV
    cache."""
    from tests.test_attention import attention
    q, k, v = make_qkv(2, 3, 21, 50, 16, seed=5, scale=2.0)
    go = torch.randn(2, 3, 21, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = grads(lambda a, b, c: oracle(a, b, c, attn, p, pos_offset=29, **kw), q, k, v, go)
    got = grads(lambda a, b, c: attention(a.float(), b.float(), c.float(), attn, p, 29, backend="triton", **kw), q, k,
                v, go)
    assert max(rel_errors(got, want)) < (1e-5 if p == 0 and attn != "lssar" else 5e-5)


def test_spec_to_kernels():
    """kernels.fused maps a spec to the kernels exactly where they are exact: the stick's conventions, ALiBi,
    windows; a forget gate, ALiBi or a window on stick-breaking, and other variants, are refused with a reason."""
    from kernels import fused
    from model import AttnSpec
    q = torch.zeros(1, 2, 5, 16, device=DEV)
    for attn, kw in (("stickbreak", {}), ("stickbreak_self", {}), ("softmax", dict(alibi=True, gate=True, window=4)),
                     ("lssar", dict(window=3))):
        assert fused.supports(AttnSpec.of(attn, **kw), q, True) is None, (attn, kw)
    assert "without ALiBi" in fused.supports(AttnSpec.of("stickbreak", alibi=True), q, True)
    assert "computes" in fused.supports(AttnSpec.of("sigmoid"), q, True)


FALLBACK_CASES = [("lssa", 15.0, {}), ("stickbreak", 0.0, {}), ("stickbreak_self", 0.0, {}),
                  ("softmax", 3.0, dict(alibi=True, window=6))]


@pytest.mark.parametrize("attn,p,kw", FALLBACK_CASES, ids=["lssar", "stickbreak", "stickbreak_self", "alibi-window"])
def test_a_failing_kernel_falls_back_to_math(monkeypatch, attn, p, kw):
    """A compile or launch failure warns once (kind, shape, error) and the call is computed by the math backend with
    the same spec (the kind, p, ALiBi, the window), forward and backward; a training run goes on."""
    monkeypatch.delenv(ta.STRICT_ENV, raising=False)  # (conftest.py makes the triton tests strict)
    def broken(*a, **k):
        raise RuntimeError("out of resources: shared memory")

    q, k, v = make_qkv(1, 2, 20, 20, 16, seed=7, scale=2.0)
    go = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    want = grads(lambda a, b, c: oracle(a, b, c, attn, p, **kw), q, k, v, go)
    for name in ("forward", "backward"):
        monkeypatch.setattr(ta, "_WARNED", set())
        with monkeypatch.context() as m:
            m.setattr(ta, name, broken)
            with pytest.warns(UserWarning, match=f"triton {name} kernel failed for kind={KIND[attn]} p={p:g}.*out of "
                                                 "resources"):
                got = grads(lambda a, b, c: kernel(a, b, c, p, 0, attn, **kw), q, k, v, go)
        assert max(rel_errors(got, want)) < 5e-5


def test_strict_mode_raises_instead_of_falling_back(monkeypatch):
    """SOFTPLUS_ATTN_STRICT=1 (set for the `cuda` tests and by .ci/gpu_acceptance): a failing kernel raises, so a
    GPU check cannot pass on the math fallback."""
    def broken(*a, **k):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setenv(ta.STRICT_ENV, "1")
    q, k, v = make_qkv(1, 2, 20, 20, 16, seed=7, scale=2.0)
    go = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for name in ("forward", "backward"):
        with monkeypatch.context() as m:
            m.setattr(ta, name, broken)
            with pytest.raises(RuntimeError, match="out of resources"):
                grads(lambda a, b, c: kernel(a, b, c, 15.0, 0), q, k, v, go)
