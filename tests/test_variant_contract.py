"""The variant contract: a variant registered at run time (one VARIANTS entry plus its oracle line, no other file
edited) trains, evaluates through eval_length, decodes with a KV cache, and runs through every backend that
claims it, exactly. Three shapes of variant: a head- and position-dependent bias, an unnormalised weight, and a
learnable per-head parameter."""

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

import kernels
from eval_length import evaluate
from model import GPT, VARIANTS, AttnSpec, GPTConfig, Variant, causal_attention, inv_sqrt_d
from runs import model_from_checkpoint, save_checkpoint
from tests.test_attention import ORACLE, make_qkv, oracle


def recency(i, j, h, H):
    return -(h + 1) / 8 * (i - j)  # a head-dependent linear recency bias (ALiBi-like slopes 1/8, 2/8, ...)


def temp_scale(n, d, params):
    return params["temp"].view(-1, 1, 1) / math.sqrt(d)


NEW = {  # name: (registry entry, oracle line)
    "recency": (Variant("exp(q.k / sqrt(d) - (h + 1) (i - j) / 8), l1-normalised", False, inv_sqrt_d, None, True,
                        bias=recency),
                (lambda q, k, d, i, j, h, prm, N=None: q @ k.transpose(-1, -2) / math.sqrt(d) - (h + 1) / 8 * (i - j),
                 lambda s, N: torch.exp(s), True)),
    "expn": (Variant("exp(q.k / sqrt(d)) / N_i, unnormalised", False, inv_sqrt_d, lambda s, n: s - torch.log(n), False),
             (lambda q, k, d, i, j, h, prm, N=None: q @ k.transpose(-1, -2) / math.sqrt(d),
              lambda s, N: torch.exp(s) / N, False)),
    "tempered": (Variant("exp(t_h q.k / sqrt(d)), t_h learnable per head, l1-normalised", False, temp_scale, None, True,
                         params={"temp": lambda n_head, block_size: torch.linspace(0.5, 1.5, n_head)}),
                 None),  # its oracle line needs the parameter's value: made in the tests
}


@pytest.fixture(params=list(NEW))
def name(request, monkeypatch):
    entry, line = NEW[request.param]
    monkeypatch.setitem(VARIANTS, request.param, entry)
    if line is not None:
        monkeypatch.setitem(ORACLE, request.param, line)
    return request.param


def set_temp_oracle(monkeypatch, temp):
    t = temp.double().view(-1, 1, 1)
    monkeypatch.setitem(ORACLE, "tempered", (lambda q, k, d, i, j, h, prm, N=None: t * (q @ k.transpose(-1, -2)) / math.sqrt(d),
                                             lambda s, N: torch.exp(s), True))


def claiming(spec, q, needs_grad):
    return ["reference"] + [b for b in kernels.BACKENDS[1:] if kernels.why_not(b, spec, q, needs_grad) is None]


@pytest.mark.parametrize("p", [0.0, 15.0], ids=["p0", "p15"])
def test_every_claiming_backend_matches_the_oracle(name, p, monkeypatch):
    if p and not VARIANTS[name].normalise:
        with pytest.raises(ValueError, match="unnormalised"):
            AttnSpec.of(name, p)
        return
    spec = AttnSpec.of(name, p)
    q, k, v = make_qkv(2, 3, 7, 40, 16, seed=1, scale=2.0)
    params = {}
    if name == "tempered":
        params = {"temp": torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)}
        set_temp_oracle(monkeypatch, params["temp"].detach())
    want = oracle(q, k, v, name, p, pos_offset=20)
    go = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    (oracle(qg, kg, vg, name, p, pos_offset=20) * go).sum().backward()
    gw = [x.grad for x in (qg, kg, vg)]
    for grad in (False, True):
        backends = claiming(spec, q, grad)
        assert "math" in backends and ("sdpa" in backends) == (name == "tempered" and p == 0)
        for b in backends:
            dtype = torch.float32 if b == "flex" else torch.float64  # compiled CPU flex: fp32 only
            xs = [x.detach().to(dtype).clone().requires_grad_(grad) for x in (q, k, v)]
            got = causal_attention(*xs, spec, pos_offset=20, backend=b, params=params, chunk=3)
            tol = 1e-5 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=f"{name} {b} grad={grad}")
            if grad:
                (got.double() * go).sum().backward()
                for x, w in zip(xs, gw, strict=True):
                    torch.testing.assert_close(x.grad.double(), w, rtol=tol, atol=tol, msg=f"{name} {b} grads")


def tiny_gpt(name, pos="rope"):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=13, n_layer=2, n_head=2, n_embd=16, attn=name, pos=pos, attn_chunk=5))


def test_it_trains_decodes_and_evaluates(name, tmp_path):
    model = tiny_gpt(name)
    data = np.tile(np.arange(13), 60).astype(np.uint16)  # a sequence a model can learn: 0 1 2 ... 12 0 1 ...
    x = torch.from_numpy(data[:16 * 8].astype(np.int64)).view(8, 16)
    y = torch.from_numpy(data[1:16 * 8 + 1].astype(np.int64)).view(8, 16)
    opt = model.configure_optimizers(0.0, 3e-2, (0.9, 0.99), "cpu")
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    if name == "tempered":  # the per-head parameter is part of the model and trains
        temp = model.transformer.h[0].attn.attn_params["temp"]
        assert not torch.allclose(temp, torch.linspace(0.5, 1.5, 2))
    model.eval()
    with torch.no_grad():  # KV-cache decoding = the full forward
        idx = torch.from_numpy(data[:20].astype(np.int64))[None]
        full, _ = model(idx)
        cache = model.new_cache()
        steps = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # a checkpoint as train.py writes it, evaluated by eval_length at 1x and 4x
    ddir, out = tmp_path / "data", tmp_path / "run"
    ddir.mkdir()
    out.mkdir()
    data[:500].tofile(ddir / "val.bin")
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "iter_num": 30, "best_val_loss": 0.0,
                     "config": {"dataset": "tiny", "data_dir": str(ddir)}}, str(out / "ckpt.pt"))
    res = evaluate([(str(out), {})], multipliers="1,4", batch_tokens=64)
    (run,) = res["runs"]
    assert run["attn"] == name and [r["length"] for r in run["results"]] == [16, 64]
    rebuilt = model_from_checkpoint(torch.load(out / "ckpt.pt", weights_only=False)).eval()
    xs = torch.from_numpy(data[:run["budget"]].astype(np.int64)).view(-1, 16)
    ys = torch.from_numpy(data[1:run["budget"] + 1].astype(np.int64)).view(-1, 16)
    with torch.no_grad():
        _, direct = rebuilt(xs, ys)
    assert run["results"][0]["loss"] == pytest.approx(direct.item(), rel=1e-6)
    assert run["results"][0]["loss"] < 0.5 * losses[0]
