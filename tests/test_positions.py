"""Position methods and evaluation-time extensions against independent float64 implementations: ALiBi (every
attention kind, every backend that claims it, queries after a KV cache), log-length scaling and YaRN's
temperature in the scores, RoPE's position interpolation / NTK-aware / YaRN frequencies, and KV-cache decoding
equal to the full forward pass for each."""

import math

import pytest
import torch

import kernels
from model import GPT, AttentionProbe, GPTConfig, alibi_slopes, apply_rope, rope_cos_sin, rope_inv_freq, yarn_temperature
from tests.test_attention import CASE_IDS, CASES, alibi_slopes_oracle, attention, make_qkv, oracle, oracle_weights


@pytest.mark.parametrize("H", [1, 2, 3, 4, 5, 6, 8, 12, 16])
def test_alibi_slopes(H):
    got = alibi_slopes(torch.arange(H), H).double()
    torch.testing.assert_close(got, torch.tensor(alibi_slopes_oracle(H), dtype=torch.float64), rtol=1e-6, atol=0)


def _backends(attn, p, q, grad, **spec):
    from model import AttnSpec
    s = AttnSpec.of(attn, p, **spec)
    return ["reference"] + [b for b in kernels.BACKENDS[1:] if kernels.why_not(b, s, q, grad) is None]


SPECS = {"alibi": dict(alibi=True), "logn": dict(logn_len=16), "temperature": dict(temperature=1.3),
         "all": dict(alibi=True, logn_len=16, temperature=0.8)}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("attn,p", CASES, ids=CASE_IDS)
def test_scores_against_the_oracle(attn, p, spec):
    """Every backend that claims the spec, full passes (T = 300) and queries after a KV cache (pos_offset)."""
    kw = SPECS[spec]
    for Tq, Tk, off in ((300, 300, None), (9, 120, 100), (5, 40, 7)):
        q, k, v = make_qkv(1, 3, Tq, Tk, 16, seed=Tq, scale=2.0)
        want = oracle(q, k, v, attn, p, pos_offset=off, **kw)
        for b in _backends(attn, p, q, False, **kw):
            dtype = torch.float32 if b == "flex" else torch.float64  # compiled CPU flex: fp32 only
            got = attention(*(x.to(dtype) for x in (q, k, v)), attn, p, off, backend=b, chunk=64, **kw)
            tol = 2e-5 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=f"{b} {Tq}/{Tk}/{off}")


@pytest.mark.parametrize("attn,p", [("lssar", 0.0), ("softmax", 0.0), ("sigmoid", 0.0), ("ssmax_learn", 0.0)])
def test_alibi_gradients(attn, p):
    q, k, v = make_qkv(2, 3, 9, 40, 16, seed=3, scale=2.0)
    go = torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def grads(fn):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        (fn(*xs) * go).sum().backward()
        return [x.grad for x in xs]

    want = grads(lambda a, b, c: oracle(a, b, c, attn, p, pos_offset=20, alibi=True, logn_len=8))
    for b in ("reference", "math"):
        got = grads(lambda x, y, z, b=b: attention(x, y, z, attn, p, 20, backend=b, chunk=4, alibi=True, logn_len=8))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def _rope_oracle(d, base, scaling, s, L):
    """The frequencies from the methods' definitions, in float64."""
    i = torch.arange(0, d, 2, dtype=torch.float64)
    theta = base ** (-i / d)
    if s <= 1 or scaling == "none":
        return theta
    if scaling == "pi":  # Chen et al.: positions m -> m / s
        return theta / s
    if scaling == "ntk":  # base' = base * s^(d / (d - 2)), so that the lowest frequency is divided by s
        return (base * s ** (d / (d - 2))) ** (-i / d)
    r = L / (2 * math.pi / theta)  # yarn: r = L / wavelength; ramp 0 below 1 turn, 1 above 32 turns
    gamma = torch.clamp((r - 1) / (32 - 1), 0, 1)
    return (1 - gamma) * theta / s + gamma * theta


@pytest.mark.parametrize("scaling", ["none", "pi", "ntk", "yarn"])
@pytest.mark.parametrize("s", [1.0, 2.0, 16.0])
def test_rope_frequencies(scaling, s):
    for d, L in ((32, 64), (64, 1024)):
        got = rope_inv_freq(d, 10000.0, scaling, s, L).double()
        torch.testing.assert_close(got, _rope_oracle(d, 10000.0, scaling, s, L), rtol=1e-5, atol=0)
    if scaling == "ntk" and s > 1:  # the defining property: the slowest frequency is interpolated by s
        theta = rope_inv_freq(64, 10000.0)
        assert rope_inv_freq(64, 10000.0, "ntk", s)[-1].item() == pytest.approx(theta[-1].item() / s, rel=1e-5)
    assert yarn_temperature(s) == pytest.approx((0.1 * math.log(s) + 1) ** 2 if s > 1 else 1.0)


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=23, n_layer=2, n_head=3, n_embd=24, attn_chunk=5) | kw
    return GPT(GPTConfig(**args)).double().eval()


def _cached(model, idx, rope_len=None):
    cache = model.new_cache()
    steps = [model(idx[:, :5], cache=cache, rope_len=rope_len)[0]]
    steps += [model(idx[:, t:t + 1], cache=cache, rope_len=rope_len)[0] for t in range(5, idx.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("kw", [dict(pos="alibi"), dict(pos="alibi", attn="lssar"), dict(pos="alibi", attn="sigmoid"),
                                dict(logn_scale=True), dict(logn_scale=True, attn="lssar"),
                                dict(rope_scaling="pi", rope_factor=4.0), dict(rope_scaling="ntk", rope_factor=4.0),
                                dict(rope_scaling="yarn", rope_factor=4.0, attn="ssmax"),
                                dict(rope_scaling="yarn", attn="lssar")],
                         ids=["alibi", "alibi-lssar", "alibi-sigmoid", "logn", "logn-lssar", "pi", "ntk", "yarn-ssmax",
                              "yarn-per-length-lssar"])
def test_kv_cache_matches_full_forward(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 23, (2, 40), generator=torch.Generator().manual_seed(1))
    # a per-length factor follows the length of the forward: decode with the full length's factor
    full, _ = model(idx)
    torch.testing.assert_close(_cached(model, idx, rope_len=40), full, rtol=1e-10, atol=1e-10)
    out = model.generate(idx[:, :30], 10, temperature=0)
    ref = idx[:, :30]
    for _ in range(10):  # greedy with a full recompute at the generation's final length
        logits, _ = model(ref, rope_len=40)
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_scalings_change_only_past_the_training_length():
    """Per-length RoPE scaling and log-length scaling are the identity up to block_size, and act beyond it."""
    base = tiny()
    idx = torch.randint(0, 23, (1, 64), generator=torch.Generator().manual_seed(2))
    for kw in (dict(rope_scaling="pi"), dict(rope_scaling="ntk"), dict(rope_scaling="yarn"), dict(logn_scale=True)):
        other = tiny(**kw)
        torch.testing.assert_close(other(idx[:, :16])[0], base(idx[:, :16])[0], rtol=0, atol=0)
        assert not torch.allclose(other(idx)[0][:, -1], base(idx)[0][:, -1])


@pytest.mark.parametrize("attn", ["softmax", "lssar"])
def test_yarn_rotates_and_tempers_the_scores(attn):
    """Inside the model, YaRN is both parts: q, k rotated with the YaRN frequencies, and the scores multiplied by
    its temperature (the weights the layer uses = the oracle's on those q, k with that temperature)."""
    model = tiny(rope_scaling="yarn", rope_factor=4.0, attn=attn)
    idx = torch.randint(0, 23, (1, 48), generator=torch.Generator().manual_seed(3))
    seen, qkv = [], {}
    model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, a, out: qkv.setdefault("x", out))
    full = torch.zeros(1, 3, 48, 48, dtype=torch.float64)

    def put(layer, first, w):  # chunk by chunk: rows first.., the keys they see
        full[:, :, first:first + w.shape[2], :w.shape[3]] = w
        seen.append(first)

    model(idx, probe=AttentionProbe(put, layers=(0,)))
    q, k, _ = qkv["x"].view(1, 48, 3, 3, 8).permute(2, 0, 3, 1, 4)
    cos, sin = rope_cos_sin(48, 8, 10000.0, "cpu", 0, rope_inv_freq(8, 10000.0, "yarn", 4.0, 16))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    want = oracle_weights(q, k, attn, temperature=yarn_temperature(4.0))
    assert seen[0] == 0
    torch.testing.assert_close(full, want, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(want, oracle_weights(q, k, attn))  # the temperature matters on this input


def test_eval_length_settings(tmp_path):
    """eval_length: the product of the eval-time lists, each run labelled and recorded; a RoPE extension on a model
    without RoPE is skipped with the reason; the settings reach the model (a per-length factor is identity at 1x)."""
    from eval_length import eval_settings, evaluate
    from tests.test_eval_length import make_run

    assert eval_settings(reweight_p="ckpt,15", rope_scaling="ckpt,yarn", logn_scale="ckpt") == [
        {}, {"rope_scaling": "yarn", "rope_factor": 0.0}, {"reweight_p": 15.0},
        {"reweight_p": 15.0, "rope_scaling": "yarn", "rope_factor": 0.0}]
    assert eval_settings(logn_scale="TRUE,false") == [{"logn_scale": True}, {"logn_scale": False}]
    with pytest.raises(SystemExit, match="unknown 'linear'"):
        eval_settings(rope_scaling="linear")
    rope, _ = make_run(tmp_path, name="rope", attn="softmax")
    nope, _ = make_run(tmp_path, name="nope", attn="softmax", pos="none")
    specs = [(d, o) for d in (rope, nope) for o in eval_settings(rope_scaling="ckpt,pi,yarn", logn_scale="ckpt,true")]
    res = evaluate(specs, multipliers="1,4")
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["rope", "rope (logn)", "rope (rope=pi)", "rope (rope=pi, logn)", "rope (rope=yarn)",
                      "rope (rope=yarn, logn)", "nope", "nope (logn)"]
    assert [s["eval"] for s in res["skipped"]] == [{"rope_scaling": r, "rope_factor": 0.0} | ({"logn_scale": True} if lg else {})
                                                   for r in ("pi", "yarn") for lg in (False, True)]
    loss = {r["label"]: [x["loss"] for x in r["results"]] for r in res["runs"]}
    for name in labels[1:6]:  # identity at the training length, a change at 4x
        assert loss[name][0] == pytest.approx(loss["rope"][0], rel=1e-9) and abs(loss[name][1] - loss["rope"][1]) > 1e-9
    assert res["runs"][4]["rope_scaling"] == "yarn" and res["runs"][1]["logn_scale"] is True
