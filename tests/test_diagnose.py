"""Attention diagnostics: model.attention_weights gives exactly the weights of causal_attention (checked
against the float64 oracle), the row statistics are right on hand-made rows, and diagnose.py runs end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch
from test_attention import CASE_IDS, CASES, attention, make_qkv, oracle_weights, params_for
from test_eval_length import make_run

from conftest import ROOT
from diagnose import diagnose, row_stats
from model import GPT, AttentionProbe, AttnSpec, GPTConfig, apply_rope, attention_weights, rope_cos_sin


@pytest.mark.parametrize("attn,p", CASES, ids=CASE_IDS)
def test_attention_weights_are_the_forward_weights(attn, p):
    q, k, v = make_qkv(2, 3, 40, 50, 8, seed=5)
    chunks = list(attention_weights(q, k, AttnSpec.of(attn, p), pos_offset=10, chunk=7, params=params_for(attn, 3)))
    assert [first for first, _ in chunks] == list(range(10, 50, 7))  # absolute positions of each chunk's first row
    w = torch.zeros(2, 3, 40, 50, dtype=torch.float64)
    for first, wc in chunks:
        w[:, :, first - 10:first - 10 + wc.shape[2], :wc.shape[3]] = wc
    torch.testing.assert_close(w, oracle_weights(q, k, attn, p, pos_offset=10), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w @ v, attention(q, k, v, attn, p, pos_offset=10), rtol=1e-10, atol=1e-12)


def test_row_stats_by_hand():
    w = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    w[0, 0, 0, :3] = 1 / 3  # head 0, row at position 2 (sees keys 0..2): uniform
    w[0, 0, 1, :] = 0.25   # row at position 3: uniform over 4
    w[0, 1, 0, 0] = 1.0    # head 1: all on the first token, then all on the last
    w[0, 1, 1, 3] = 1.0
    s = row_stats(w, first=2, window=2)  # near: keys at distance 0 or 1 (2, 1 for row 2; 3, 2 for row 3)
    torch.testing.assert_close(s["entropy"], torch.tensor([math.log(3) + math.log(4), 0.0], dtype=torch.float64))
    torch.testing.assert_close(s["sink"], torch.tensor([1 / 3 + 1 / 4, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s["zeros"], torch.tensor([0.0, 2 + 3], dtype=torch.float64))  # of 3 + 4 visible
    torch.testing.assert_close(s["near"], torch.tensor([2 / 3 + 2 / 4, 0.0 + 1.0], dtype=torch.float64))
    assert s["visible"] == 7 and s["rows"] == 2


def test_diagnose_end_to_end(tmp_path):
    lssar, _ = make_run(tmp_path, name="lssar", attn="lssar")
    soft, _ = make_run(tmp_path, name="soft", attn="softmax")
    res = diagnose([lssar, soft], multipliers="1,4", n_windows=2)
    r_lssar, r_soft = res["runs"]
    assert r_lssar["label"] == "lssar" and r_soft["label"] == "soft" and r_lssar["reweight_p"] == 15
    for r in res["runs"]:
        assert [x["length"] for x in r["lengths"]] == [8, 32]
        for x in r["lengths"]:
            assert len(x["layers"]) == 2 and all(len(layer["entropy"]) == 2 for layer in x["layers"])
            for layer in x["layers"]:
                assert all(0 <= e <= math.log(x["length"]) + 1e-9 for e in layer["entropy"])
                assert all(0 < m <= 1 for m in layer["max"])
                assert all(0 < n <= 1 + 1e-9 for n in layer["near"])
    assert all(z == 0 for x in r_soft["lengths"] for layer in x["layers"] for z in layer["zeros"])
    assert any(z > 0 for x in r_lssar["lengths"] for layer in x["layers"] for z in layer["zeros"])
    learned, _ = make_run(tmp_path, name="learned", pos="learned")
    with pytest.raises(SystemExit, match="learned position embeddings"):
        diagnose([learned], multipliers="1,2")


def test_cli(tmp_path):
    d, _ = make_run(tmp_path, name="run", attn="lssa")
    out = tmp_path / "res" / "diag"
    r = subprocess.run([sys.executable, "diagnose.py", f"--ckpts={d}", "--multipliers=1,2", "--windows=2",
                        f"--out={out}", "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res" / "diag.json").read_text())
    assert res["command"].startswith("python diagnose.py") and len(res["runs"]) == 1
    assert (tmp_path / "res" / "diag.png").read_bytes()[:4] == b"\x89PNG"
    assert "entropy" in r.stdout


def test_probe_sees_the_weights_of_selected_layers_and_rows():
    """model.AttentionProbe: the weights of the chosen layers' last rows, equal to the oracle's on that layer's q, k."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=3, n_head=2, n_embd=16, attn="lssar")).double().eval()
    idx = torch.randint(0, 11, (2, 20))
    seen, qk = [], {}
    for i, block in enumerate(gpt.transformer.h):  # the layer's q, k after RoPE, for the oracle
        block.attn.c_attn.register_forward_hook(lambda m, a, out, i=i: qk.__setitem__(i, out))
    probe = AttentionProbe(lambda layer, first, w: seen.append((layer, first, w)), layers=(1,), last_rows=5)
    logits, _ = gpt(idx, probe=probe)
    torch.testing.assert_close(logits, gpt(idx)[0], rtol=0, atol=0)  # probing changes nothing
    assert [(layer, first) for layer, first, _ in seen] == [(1, 15)]
    q, k, _ = qk[1].view(2, 20, 3, 2, 8).permute(2, 0, 3, 1, 4)
    cos, sin = rope_cos_sin(20, 8, gpt.config.rope_base, "cpu")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(seen[0][2], oracle_weights(q[:, :, -5:], k, "lssar"), rtol=1e-10, atol=1e-12)
