"""The attentions that extrapolate without a position code, against the float64 oracle of test_attention.py
(written from the equations, sharing no code with model.py): the forget gate (FoX; on softmax, lssa, lssar, ssmax,
sigmoid_l1) with gradients for q, k, v AND the gate, and stick-breaking; every backend that claims them (reference,
math with its chunks, flex's forward, the Triton kernels through the interpreter); queries after a KV cache; long
rows; the model's gate (its init, its cache); bad settings as one clear line."""

import os

import pytest
import torch
import torch.nn.functional as F

from model import GPT, AttnSpec, GPTConfig, causal_attention
from tests.conftest import run
from tests.test_attention import attention, make_qkv, oracle

GATED = ["softmax", "lssa", "lssar", "ssmax", "sigmoid_l1"]


def make_logf(B, H, T, seed, bias=2.0):
    """Log forget gates as the model makes them: logsigmoid of a logit (bias 2: f ~ 0.88, so distant keys still
    count and the gradients are not all zero)."""
    g = torch.Generator().manual_seed(seed)
    return F.logsigmoid(torch.randn(B, H, T, generator=g, dtype=torch.float64) + bias)


def grads(fn, *xs, seed=1):
    """fn(*xs) and the gradients of a random projection of it w.r.t. every x (float64)."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [out.double(), *(g.double() for g in torch.autograd.grad(out, xs, go.to(out.dtype)))]


def rel(got, want):
    ref = max(w.abs().max().item() for w in want)
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) / ref


@pytest.mark.parametrize("attn", GATED)
@pytest.mark.parametrize("Tq,Tk,off", [(37, 37, 0), (7, 40, 33), (7, 40, 10)])
def test_forget_gate_matches_the_oracle(attn, Tq, Tk, off):
    """Forward and gradients (q, k, v and the log forget gates) of reference and math (chunks crossing the exempt
    rows) against the oracle, also for queries after a cache (Tq < Tk, pos_offset)."""
    q = make_qkv(2, 3, Tq, Tk, 16, seed=Tq + off, scale=2.0)[0]
    _, k, v = make_qkv(2, 3, Tk, Tk, 16, seed=Tk + 7, scale=2.0)
    logf = make_logf(2, 3, Tk, seed=off)
    want = grads(lambda a, b, c, lf: oracle(a, b, c, attn, pos_offset=off, logf=lf), q, k, v, logf)
    for backend, chunk in (("reference", 256), ("math", 5), ("math", 256)):
        got = grads(lambda a, b, c, lf, be=backend, ch=chunk: attention(a, b, c, attn, pos_offset=off, logf=lf,
                                                                        backend=be, chunk=ch), q, k, v, logf)
        assert rel(got, want) < 1e-10, (backend, chunk)


def test_forget_gate_is_a_learned_alibi():
    """With every log f_l = -m the gate's term is -m (i - j): the oracle's ALiBi-style bias, exactly."""
    q, k, v = make_qkv(1, 1, 20, 20, 8, seed=3)
    logf = torch.full((1, 1, 20), -0.3, dtype=torch.float64)
    pos = torch.arange(20, dtype=torch.float64)
    s = q @ k.transpose(-1, -2) / 8 ** 0.5 - 0.3 * (pos[:, None] - pos[None, :])
    want = torch.softmax(s.masked_fill(torch.ones(20, 20).triu(1).bool(), float("-inf")), dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, "softmax", logf=logf), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attn", ["stickbreak", "stickbreak_self"])
def test_stickbreak_rows_sum_to_one_and_favour_the_nearest(attn):
    """Every row's weights (remainder included) sum to 1; with equal scores the nearest key weighs the most."""
    from model import reference_weights
    q = torch.zeros(1, 1, 30, 8, dtype=torch.float64)
    k = torch.zeros(1, 1, 30, 8, dtype=torch.float64)
    w = reference_weights(q, k, AttnSpec.of(attn), 0)[0, 0]
    torch.testing.assert_close(w.sum(-1), torch.ones(30, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    row = w[20, :20] if attn == "stickbreak" else w[20, :21]
    assert (row[1:] > row[:-1]).all()  # beta = 1/2: each nearer key takes half of what is left


@pytest.mark.parametrize("attn,p", [("softmax", 0.0), ("lssar", 0.0), ("stickbreak", 0.0)])
def test_long_row_is_finite_and_exact(attn, p):
    """T = 2048 through the math backend (fp32, its default chunks): finite and at the fp32 tolerances of the
    oracle (float64), gradients of q, k, v and the gate included."""
    T = 2048
    q, k, v = make_qkv(1, 1, T, T, 16, seed=5, scale=2.0)
    logf = None if attn == "stickbreak" else make_logf(1, 1, T, seed=6)
    xs = (q, k, v) if logf is None else (q, k, v, logf)
    want = grads(lambda *a: oracle(*a[:3], attn, p, logf=a[3] if len(a) > 3 else None), *xs)
    got = grads(lambda *a: attention(*(x.float() for x in a[:3]), attn, p, backend="math",
                                     logf=a[3].float() if len(a) > 3 else None), *xs)
    for g in got:
        assert torch.isfinite(g).all()
    assert rel(got, want) < (5e-5 if attn == "lssar" else 1e-5)


@pytest.mark.parametrize("attn", ["softmax", "lssar", "sigmoid_l1"])
def test_flex_forward_with_the_gate(attn):
    """flex (CPU: forward only; the gate as a score_mod term, padded rows included) against the oracle."""
    from kernels import why_not
    q, k, v = make_qkv(1, 2, 21, 50, 16, seed=8, scale=2.0)
    if why_not("flex", AttnSpec.of(attn, gate=True), q.float(), False):
        pytest.fail(f"flex should serve a gated forward: {why_not('flex', AttnSpec.of(attn, gate=True), q.float(), False)}")
    logf = make_logf(1, 2, 50, seed=9)
    with torch.no_grad():
        got = attention(q.float(), k.float(), v.float(), attn, pos_offset=29, logf=logf.float(), backend="flex")
    want = oracle(q, k, v, attn, pos_offset=29, logf=logf)
    assert (got.double() - want).abs().max().item() / want.abs().max().item() < (5e-5 if attn == "lssar" else 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("attn", ["softmax", "lssa", "lssar", "ssmax"])
@pytest.mark.parametrize("Tq,Tk,off", [(37, 37, 0), (7, 40, 33), (20, 50, 5)])
def test_triton_forget_gate(attn, Tq, Tk, off):
    """The Triton kernels with the gate (interpreter on a CPU, fp32): forward and the gradients of q, k, v and
    the gate (the dq kernel's row sums at the queries' positions minus the dk / dv kernel's column sums)."""
    q = make_qkv(1, 2, Tq, Tk, 16, seed=Tq + off, scale=2.0)[0]
    _, k, v = make_qkv(1, 2, Tk, Tk, 16, seed=Tk, scale=2.0)
    logf = make_logf(1, 2, Tk, seed=Tk + off)
    want = grads(lambda a, b, c, lf: oracle(a, b, c, attn, pos_offset=off, logf=lf), q, k, v, logf)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = grads(lambda a, b, c, lf: attention(*(x.float().to(dev) for x in (a, b, c)), attn, pos_offset=off,
                                              logf=lf.float().to(dev), backend="triton").cpu(), q, k, v, logf)
    assert rel(got, want) < (5e-5 if attn == "lssar" else 1e-5)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["softmax", "lssar"])
def test_triton_forget_gate_cuda_long(attn):
    """The compiled gate kernels at 4097 tokens (uneven blocks), fp32, against the oracle by query chunks."""
    T = 4097
    q, k, v = make_qkv(1, 1, T, T, 64, seed=T, scale=2.0)
    logf = make_logf(1, 1, T, seed=1)
    rows, parts = 1024, []
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, logf)]
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for c0 in range(0, T, rows):  # the oracle by query chunks (memory O(rows x T)), its pos_offset placing each
        c1 = min(c0 + rows, T)
        out = oracle(xs[0][:, :, c0:c1], xs[1][:, :, :c1], xs[2][:, :, :c1], attn, pos_offset=c0, logf=xs[3][..., :c1])
        out.backward(go[:, :, c0:c1])
        parts.append(out.detach())
    want = [torch.cat(parts, dim=2), *(x.grad for x in xs)]
    got = grads(lambda a, b, c, lf: attention(*(x.float().cuda() for x in (a, b, c)), attn, logf=lf.float().cuda(),
                                              backend="triton").cpu(), q, k, v, logf, seed=2)
    assert rel(got, want) < (5e-5 if attn == "lssar" else 1e-5)


def test_auto_backends_for_the_families():
    """auto: math for stick-breaking and for gated training on a CPU; SDPA never takes a gate."""
    from kernels import pick, why_not
    q = torch.zeros(1, 1, 8, 16)
    assert pick(AttnSpec.of("stickbreak"), q, True) == "math"
    assert pick(AttnSpec.of("softmax", gate=True), q, True) == "math"
    assert "forget gate" in why_not("sdpa", AttnSpec.of("softmax", gate=True), q, False)
    assert why_not("flex", AttnSpec.of("stickbreak"), q, False)


# ----------------------------------------------------------------------------------------------------
# the model: the gate's parameters and cache, stick-breaking decoding
# ----------------------------------------------------------------------------------------------------
def small(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16, pos="none", **kw)).eval()


def test_model_forget_gate_init_and_gradient():
    """One Linear(n_embd, n_head) per layer on the block's normalised input, weights N(0, 0.02), bias 0 (f ~ 1/2),
    in the optimizer's no-decay group for its bias; it gets gradients."""
    m = small(gate="forget")
    g = m.transformer.h[0].attn.fgate
    assert g.weight.shape == (2, 32) and torch.equal(g.bias, torch.zeros(2))
    assert 0.01 < g.weight.std().item() < 0.03
    idx = torch.randint(0, 50, (2, 24))
    _, loss = m(idx, idx)
    loss.backward()
    assert g.weight.grad.abs().sum() > 0 and g.bias.grad.abs().sum() > 0


def test_gate_bias_sets_the_gates_initial_retention():
    """gate_bias=b starts every forget gate at f = sigmoid(b) (0 is the default, f = 1/2): each layer's bias is b,
    a hybrid's gated layers included, the weights drawn as before (the same draw), and the gate's term at init is
    about (i - j) log sigmoid(b); the label says so; without a gated layer, or not finite, it is refused."""
    m0, m4 = small(gate="forget"), small(gate="forget", gate_bias=4.0)
    for a, b in zip(m0.transformer.h, m4.transformer.h, strict=True):
        assert torch.equal(a.attn.fgate.weight, b.attn.fgate.weight)
        assert torch.equal(b.attn.fgate.bias, torch.full((2,), 4.0)) and torch.equal(a.attn.fgate.bias, torch.zeros(2))
    x = m4.transformer.wte(torch.randint(0, 50, (1, 24)))
    with torch.no_grad():
        c = m4.transformer.h[0].attn.forget_gate(m4.transformer.h[0].ln_1(x), None)  # (1, H, 24)
    per_step = torch.nn.functional.logsigmoid(torch.tensor(4.0)).item()  # -0.018: e^-1 at 55 steps back
    assert torch.allclose(c[0, :, -1] - c[0, :, 0], torch.full((2,), 23 * per_step), rtol=0.15)
    assert m4.config.describe() == "softmax pos=none gate=forget gate_bias=4" and "gate_bias" not in m0.config.describe()
    hyb = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16, gate_bias=2.0,
                    layers="softmax:window=4,softmax:gate=forget:pos=none")
    assert hyb.describe().endswith(" gate_bias=2")
    assert torch.equal(GPT(hyb).transformer.h[1].attn.fgate.bias, torch.full((2,), 2.0))
    for kw, why in ((dict(gate_bias=4.0), "no layer of this model has one: add gate=forget"),
                    (dict(gate="forget", gate_bias=float("nan")), "is a finite number")):
        with pytest.raises(ValueError, match=why):
            GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, block_size=16, **kw)


@pytest.mark.parametrize("kw", [dict(gate="forget"), dict(gate="forget", attn="lssar"), dict(attn="stickbreak"),
                                dict(attn="stickbreak_self")], ids=["fox", "lssar-gate", "sb", "sb-self"])
def test_kv_cache_logits_equal_a_full_forward(kw):
    """Decoding a token at a time from a prompt: the gate's c continues from the cache (absolute positions), the
    stick-breaking rows see all their cached keys; logits equal one full forward past block_size."""
    m = small(**kw)
    idx = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        full, _ = m(idx)
        cache = m.new_cache()
        steps = [m(idx[:, :9], cache=cache)[0]]
        steps += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_model_backends_agree_with_the_gate():
    """A gated model's loss and gradients through the reference and the math backend, in float64: the two sum in
    different orders (one T x T matrix, chunks), and in fp32 LSSAR's p = 15 amplifies that rounding about p-fold,
    beyond any fixed fp32 tolerance on some CPUs (1.7e-6 on 1 of 1,600 gradient elements has been seen); in
    float64 they agree to 1e-10."""
    out = []
    for backend in ("reference", "math"):
        m = small(gate="forget", attn="lssar", attn_backend=backend).double()
        idx = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
        _, loss = m(idx, idx)
        loss.backward()
        out.append([loss.detach(), *(p.grad.clone() for p in m.parameters())])
    for a, b in zip(*out, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_settings_are_one_line(tmp_path, char_data):
    with pytest.raises(ValueError, match="stickbreak weighs a key by the scores of all nearer keys"):
        GPTConfig(attn="stickbreak", gate="forget")
    with pytest.raises(ValueError, match="reweight_p > 0 needs l1-normalised weights"):
        GPTConfig(attn="stickbreak", reweight_p=15)
    with pytest.raises(ValueError, match="unknown gate='forgot'"):
        GPTConfig(gate="forgot")
    q, k, v = make_qkv(1, 1, 4, 4, 8, seed=2)
    with pytest.raises(ValueError, match="spec.gate=True needs gate"):
        causal_attention(q, k, v, AttnSpec.of("softmax", gate=True))
    r = run("train.py", "config/train_shakespeare_char.py", "--attn=stickbreak", "--gate=forget",
            f"--out_dir={tmp_path / 'x'}", f"--data_dir={char_data}", "--device=cpu", check=False)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "stickbreak" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("args", [["--attn=softmax", "--gate=forget"], ["--attn=stickbreak"]], ids=["fox", "stickbreak"])
def test_scripts_train_resume_sample_and_evaluate(args, char_data, tmp_path):
    """Through every script as a user runs them: train, resume (the gate and the variant come back from the
    checkpoint), sample with the KV cache, evaluate past the training length, diagnose."""
    import json
    out = tmp_path / "run"
    base = ["train.py", "config/train_shakespeare_char.py", *args, "--pos=none", f"--data_dir={char_data}",
            f"--out_dir={out}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--eval_iters=2", "--eval_interval=3", "--log_interval=1", "--warmup_iters=2", "--device=cpu"]
    run(*base, "--max_iters=3")
    run(*base, "--max_iters=5", "--init_from=resume")
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 5
    assert (ck["model_args"]["gate"], ck["model_args"]["attn"]) == (("forget", "softmax") if "--gate=forget" in args
                                                                    else ("none", "stickbreak"))
    assert ("transformer.h.0.attn.fgate.weight" in ck["model"]) == ("--gate=forget" in args)
    r = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=40", "--device=cpu")
    assert len(r.stdout.split("---------------")[0].split("ROMEO:", 1)[1]) >= 40
    res = tmp_path / "ev"
    run("eval_length.py", f"--ckpts={out}", "--multipliers=1,4", "--tokens=512", f"--out={res}", "--device=cpu")
    got = json.loads(res.with_suffix(".json").read_text())["runs"][0]["results"]
    assert [x["length"] for x in got] == [32, 128] and all(torch.isfinite(torch.tensor(x["loss"])) for x in got)
    run("diagnose.py", f"--ckpts={out}", "--multipliers=1,4", f"--out={tmp_path / 'dg'}", "--device=cpu")
