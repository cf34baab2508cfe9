"""Sliding windows, length temperatures and stacks with a spec per layer, against the float64 oracle of
test_attention.py (which masks keys j <= i - W and counts N_i over the visible keys, sharing no code with
model.py): every score-based variant with a window, forward and gradients, through the reference and the math
backend (chunks that start inside and outside the window), SDPA's mask, flex's block mask; iRoPE's temperature;
per-layer stacks in the model (each layer its own spec, KV-cache decoding equal to the full pass, a windowed
layer's cache bounded); the layers pattern and its errors."""

import pytest
import torch

from model import GPT, VARIANTS, AttnSpec, GPTConfig, cache_bytes, causal_attention
from tests.test_attention import CASES, attention, make_qkv, oracle
from tests.test_families import grads, make_logf


def rel(got, want):
    """Largest error relative to the largest reference magnitude (absolute where everything is 0: a window of one
    key gives LSSAR exactly uniform rows, hence exactly zero outputs)."""
    ref = max(w.abs().max().item() for w in want)
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) / max(ref, 1e-12)

WINDOWED = [(a, p) for a, p in CASES if VARIANTS[AttnSpec.of(a, p).kind].row is None]


@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("attn,p", WINDOWED, ids=[f"{a}-p{p:g}" for a, p in WINDOWED])
def test_window_matches_the_oracle(attn, p, window):
    """Forward and gradients of every score-based variant under a window, queries after a cache (Tq < Tk) whose
    first rows are exempt from the re-weighting or not, chunks of 5 rows (their first keys move with the window)."""
    for Tq, Tk, off in ((37, 37, 0), (7, 40, 33), (9, 40, 1)):
        q = make_qkv(2, 3, Tq, Tk, 16, seed=Tq + off + window, scale=2.0)[0]
        _, k, v = make_qkv(2, 3, Tk, Tk, 16, seed=Tk + 7, scale=2.0)
        want = grads(lambda a, b, c, o=off: oracle(a, b, c, attn, p, pos_offset=o, window=window), q, k, v)
        for backend, chunk in (("reference", 256), ("math", 5), ("math", 256)):
            got = grads(lambda a, b, c, be=backend, ch=chunk, o=off: attention(a, b, c, attn, p, pos_offset=o, window=window,
                                                                               backend=be, chunk=ch), q, k, v)
            assert rel(got, want) < 1e-10, (backend, chunk, Tq, off)


def test_the_oracle_tells_windows_apart():
    """An off-by-one window (W keys vs W + 1, or N_i counted over all keys) changes the output: the check above
    would catch a backend that made either mistake."""
    q, k, v = make_qkv(1, 2, 30, 30, 8, seed=5, scale=2.0)
    w8 = oracle(q, k, v, "lssar", window=8)
    assert (w8 - oracle(q, k, v, "lssar", window=9)).abs().max() > 1e-3
    assert (w8 - oracle(q, k, v, "lssar", window=30)).abs().max() > 1e-3
    out = attention(q, k, v, "lssar", window=8, backend="math", chunk=4)
    torch.testing.assert_close(out, w8, rtol=1e-10, atol=1e-10)
    # keys outside a row's window get no weight and no gradient
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :10], v2[:, :, :10] = 50.0, -50.0  # hidden from every row at position >= 17
    out2 = attention(q, k2, v2, "lssar", window=8, backend="math", chunk=4)
    assert torch.equal(out[:, :, 17:], out2[:, :, 17:])


@pytest.mark.parametrize("attn", ["softmax", "lssar", "ssmax"])
def test_window_with_the_gate_and_alibi(attn):
    """The forget gate's c_i - c_j and ALiBi's bias inside a window: forward and gradients (the gate's too)."""
    Tq, Tk, off = 9, 40, 31
    q = make_qkv(2, 4, Tq, Tk, 16, seed=3, scale=2.0)[0]
    _, k, v = make_qkv(2, 4, Tk, Tk, 16, seed=4, scale=2.0)
    logf = make_logf(2, 4, Tk, seed=6)
    want = grads(lambda a, b, c, lf: oracle(a, b, c, attn, pos_offset=off, window=6, logf=lf), q, k, v, logf)
    for backend, chunk in (("reference", 256), ("math", 4)):
        got = grads(lambda a, b, c, lf, be=backend, ch=chunk: attention(a, b, c, attn, pos_offset=off, window=6, logf=lf,
                                                                        backend=be, chunk=ch), q, k, v, logf)
        assert rel(got, want) < 1e-10, backend
    want = grads(lambda a, b, c: oracle(a, b, c, attn, pos_offset=off, window=6, alibi=True), q, k, v)
    got = grads(lambda a, b, c: attention(a, b, c, attn, pos_offset=off, window=6, alibi=True, backend="math", chunk=4),
                q, k, v)
    assert rel(got, want) < 1e-10


def test_sdpa_takes_the_window_as_a_mask():
    q, k, v = make_qkv(2, 3, 50, 50, 16, seed=9, dtype=torch.float32)
    for Tq in (50, 5):
        spec = AttnSpec.of("softmax", window=7)
        got = causal_attention(q[:, :, -Tq:], k, v, spec, backend="sdpa")
        want = oracle(q[:, :, -Tq:], k, v, "softmax", window=7)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_flex_block_mask_with_a_window():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = make_qkv(1, 2, 40, 40, 16, seed=10, dtype=torch.float32)
    for attn, p in (("lssar", 0.0), ("softmax", 0.0)):
        got = attention(q, k, v, attn, p, window=9, backend="flex")
        torch.testing.assert_close(got.double(), oracle(q, k, v, attn, p, window=9), rtol=2e-5, atol=2e-5)


def test_irope_temperature_matches_the_oracle():
    """iRoPE's q x (log(floor((i + 1) / floor_scale) + 1) * attn_scale + 1), here with floor_scale 8 so that the
    factor steps up inside the test's rows; with LSSAR (its N_i-scaled scores) and softmax."""
    q, k, v = make_qkv(2, 2, 60, 60, 16, seed=12, scale=2.0)
    for attn in ("softmax", "lssar"):
        want = grads(lambda a, b, c, at=attn: oracle(a, b, c, at, irope=(8, 0.1)), q, k, v)
        got = grads(lambda a, b, c, at=attn: attention(a, b, c, at, irope=(8, 0.1), backend="math", chunk=7), q, k, v)
        assert rel(got, want) < 1e-10
        assert (want[0] - oracle(q, k, v, attn)).abs().max() > 1e-3  # the temperature did something


# ----------------------------------------------------------------------------------------------------
# stacks: a spec per layer
# ----------------------------------------------------------------------------------------------------
def tiny(layers="", **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=2, n_embd=32, vocab_size=40, block_size=16, layers=layers, **kw)
    return GPT(cfg).double().eval()


HYBRIDS = ["3*softmax:window=4,softmax:pos=none:temp=logn", "softmax:gate=forget:pos=none:window=5,lssar:pos=none",
           "softmax:window=3:pos=alibi,stickbreak:pos=none", "3*softmax:window=4,lssar:pos=none:temp=irope"]


@pytest.mark.parametrize("layers", HYBRIDS)
def test_each_layer_computes_its_own_spec(layers):
    """A stack's layers each see their own spec: the model's attention calls, intercepted, receive the pattern's
    specs in order (a layer given another layer's spec fails here), and the pattern round-trips through its
    canonical text."""
    m = tiny(layers)
    seen = []
    import model as M
    real = M.causal_attention

    def spy(q, k, v, spec, *a, **kw):
        seen.append(spec)
        return real(q, k, v, spec, *a, **kw)

    M.causal_attention = spy
    try:
        m(torch.randint(0, 40, (1, 20)))
    finally:
        M.causal_attention = real
    assert seen == list(m.config.layer_specs)
    assert len(set(seen)) > 1
    assert GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=16, layers=m.config.layers).layer_specs == \
        m.config.layer_specs


def decode_and_compare(m, n=45):
    """Token by token (and a prompt, then tokens) with the KV cache: the logits must be the full pass's, and a
    windowed layer's cache must hold at most max(window - 1, 3) keys."""
    idx = torch.randint(0, 40, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = m(idx)
        for prompt in (1, 13):
            cache = m.new_cache()
            outs = [m(idx[:, :prompt], cache=cache)[0]]
            for t in range(prompt, idx.shape[1]):
                outs.append(m(idx[:, t:t + 1], cache=cache)[0])
                for spec, c in zip(m.config.layer_specs, cache, strict=True):
                    assert c["k"].shape[2] == (min(t + 1, max(spec.window - 1, 3)) if spec.window else t + 1)
            torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
    return cache


@pytest.mark.parametrize("layers", HYBRIDS)
def test_decoding_with_the_cache_equals_the_full_pass(layers):
    """Past the training length (16) and every window; the cache's bytes grow with the global layers only."""
    m = tiny(layers)
    short, long = cache_bytes(decode_and_compare(m, 20)), cache_bytes(decode_and_compare(m))
    grows = [sp for sp in m.config.layer_specs if not sp.window]  # 25 more keys in each global layer...
    per_key = 2 * 2 * 16 * 8  # ...of batch 2 x heads 2 x head size 16, float64, for k and for v
    assert long - short == 25 * sum(2 * per_key + (2 * 2 * 8 if sp.gate else 0) for sp in grows)  # (+ the gate's c)


def test_a_cache_that_keeps_too_many_keys_fails_the_check(monkeypatch):
    """A cache that kept every key still decodes correctly (the window hides the old keys), so only the kept
    counts show it: the check above fails on it."""
    import model as M
    monkeypatch.setattr(M, "cache_keep", lambda spec, n: n)
    with pytest.raises(AssertionError):
        decode_and_compare(tiny(HYBRIDS[0]))


def test_uniform_stacks_are_unchanged():
    """A pattern that names the same attention for every layer builds the same specs as the model-level keys,
    and a model without layers= keeps its single spec (checkpoints of uniform stacks load as before)."""
    a = GPTConfig(n_layer=4, attn="lssar", pos="none", window=8)
    b = GPTConfig(n_layer=4, layers="lssar:pos=none:window=8")
    assert a.layer_specs == b.layer_specs and a.spec == b.spec
    assert a.describe() == "lssar pos=none window=8"
    assert b.describe() == "layers=lssar:pos=none:window=8"
    with pytest.raises(ValueError, match="read layer_specs"):
        GPTConfig(n_layer=2, layers="softmax,lssar").spec  # noqa: B018


@pytest.mark.parametrize("kw,match", [
    (dict(layers="3*softmax"), "does not divide n_layer=4"),
    (dict(layers="softmax:window=-1"), "window must be a whole number"),
    (dict(layers="softmax:window=2.5"), "is not a whole number"),
    (dict(layers="softmax:windw=2"), "settings are key=value with keys"),
    (dict(layers="sofmax"), "unknown attention 'sofmax'"),
    (dict(layers="x*softmax"), "a repeat count is a whole number"),
    (dict(layers="softmax:pos=learned"), "unknown pos='learned' for a layer"),
    (dict(layers="softmax", pos="learned"), "pos='learned' adds one embedding"),
    (dict(layers="softmax:window=4:temp=logn"), "a length temperature"),
    (dict(layers="softmax:window=4", length_temp="irope"), "every layer of"),
    (dict(layers="stickbreak:window=4:pos=none"), "cuts a row short"),
    (dict(layers="softmax", attn="lssar"), "describe a uniform stack"),
    (dict(layers="softmax:pos=none", rope_scaling="yarn"), "no layer of this model has pos='rope'"),
    (dict(window=4, length_temp="logn"), "a length temperature"),
    (dict(length_temp="irop"), "unknown length_temp='irop'"),
    (dict(logn_scale=True, length_temp="irope"), "keep one of them"),
])
def test_bad_patterns_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(n_layer=4, **kw)


def test_logn_scale_is_length_temp_logn():
    a, b = GPTConfig(logn_scale=True), GPTConfig(length_temp="logn")
    assert a == b and a.layer_specs == b.layer_specs and a.spec.logn_len == a.block_size
