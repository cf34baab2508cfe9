"""eval_length's document-aware mode on generated token shards with known document lengths: windows only inside
single documents long enough for them, the tokens and documents each length used, a warning when a length
has too few documents, and the same losses as a direct computation over those windows."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from dataset import write_shard
from eval_length import doc_separator, doc_window_plan, documents, evaluate
from model import GPT, GPTConfig
from runs import model_from_checkpoint, save_checkpoint

EOT, V = 22, 23  # a small BPE-like vocabulary whose last id ends each document
DOC_LENS = [5, 40, 7, 100, 33, 70, 12, 65]


def doc_stream(lens, seed=0):
    """EOT doc EOT doc ...: each document a repeating motif (so that context helps), never containing EOT."""
    rng, out, spans = np.random.default_rng(seed), [], []
    for n in lens:
        out.append(EOT)
        spans.append((len(out), len(out) + n))
        motif = rng.integers(0, EOT, 5)
        out += [int(motif[i % 5]) if rng.random() < 0.8 else int(rng.integers(0, EOT)) for i in range(n)]
    return np.array(out, dtype=np.uint16), spans


def make_sharded_run(tmp_path, lens=DOC_LENS):
    data = tmp_path / "docs"
    data.mkdir()
    stream, spans = doc_stream(lens)
    cut = spans[3][0] - 1  # two val shards, split at a document border (on the EOT)
    write_shard(data / f"docs_val_{0:06d}.bin", stream[:cut])
    write_shard(data / f"docs_val_{1:06d}.bin", stream[cut:])
    write_shard(data / f"docs_train_{0:06d}.bin", stream)
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": V, "tokenizer": "test", "eot_token": EOT}, f)
    args = dict(block_size=8, vocab_size=V, n_layer=2, n_head=2, n_embd=16, attn="lssar", pos="rope")
    torch.manual_seed(0)
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "iter_num": 0, "best_val_loss": 0.0,
                     "config": {"dataset": "docs", "data_dir": str(data)}}, str(out / "ckpt.pt"))
    return str(out), stream, spans


def test_documents_and_windows():
    stream, spans = doc_stream(DOC_LENS)
    assert documents(stream, [EOT]) == spans
    assert documents(np.array([1, 2, 9, 9, 3, 9, 9, 9, 4]), [9, 9]) == [(0, 2), (4, 5), (7, 9)]  # a 2-token separator
    for L in (8, 32, 64):
        plan, used, long_enough = doc_window_plan(spans, L)
        assert long_enough == used == sum(n >= L + 1 for n in DOC_LENS)
        assert len(plan) == sum((n - 1) // L for n in DOC_LENS)
        for s, _ in plan:  # inputs and targets inside one document: no end-of-text among them
            assert any(a <= s and s + L + 1 <= b for a, b in spans) and EOT not in stream[s:s + L + 1]
    plan, used, _ = doc_window_plan(spans, 32, budget=64)  # 2 windows: 40 (1 window), then 100 (the second)
    assert len(plan) == 2 and used == 2


def test_evaluate_inside_documents(tmp_path, capsys):
    d, stream, spans = make_sharded_run(tmp_path)
    res = evaluate([(d, {})], lengths="8,32,64", doc_sep="eot", min_docs=4, batch_tokens=64)
    (run,) = res["runs"]
    by = {x["length"]: x for x in run["results"]}
    assert by[8]["documents"] == 6 and by[8]["tokens"] == 8 * sum((n - 1) // 8 for n in DOC_LENS)
    # 65 tokens is just enough for one window of 64 (64 inputs, 64 next-token targets)
    assert by[64]["documents"] == by[64]["documents_long_enough"] == 3 and "only 3 document" in by[64]["warning"]
    assert "warning" not in by[32] and "@ 64: only 3 document(s)" in capsys.readouterr().err
    assert "inside single documents" in res["protocol"]["data"]
    model = model_from_checkpoint(torch.load(f"{d}/ckpt.pt", weights_only=False)).eval()
    plan, _, _ = doc_window_plan(spans, 32)
    x = torch.stack([torch.from_numpy(stream[s:s + 32].astype(np.int64)) for s, _ in plan])
    y = torch.stack([torch.from_numpy(stream[s + 1:s + 33].astype(np.int64)) for s, _ in plan])
    with torch.no_grad():
        _, direct = model(x, y)
    assert by[32]["loss"] == pytest.approx(direct.item(), rel=1e-6)
    # a length no document reaches: no loss, said so
    res = evaluate([(d, {})], lengths="8,128", doc_sep="eot", min_docs=1)
    last = res["runs"][0]["results"][-1]
    assert last["loss"] is None and last["tokens"] == 0 and "no loss at this length" in last["warning"]


def test_text_separator_and_errors(tmp_path):
    meta = {"stoi": {c: i for i, c in enumerate("ab\n")}, "itos": dict(enumerate("ab\n")), "vocab_size": 3}
    assert doc_separator(meta, "\\n\\n") == [2, 2]  # escapes read: a blank line
    with pytest.raises(SystemExit, match="char-level data has no end-of-text token"):
        doc_separator(meta, "eot")
    assert doc_separator(None, "eot") == [50256]  # GPT-2 shards without a meta.pkl


def test_cli(tmp_path):
    d, _, _ = make_sharded_run(tmp_path)
    out = tmp_path / "res" / "docs"
    r = subprocess.run([sys.executable, "eval_length.py", f"--ckpts={d}", "--lengths=8,64", "--doc_sep=eot",
                        f"--out={out}", "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res" / "docs.json").read_text())
    assert [x["documents"] for x in res["runs"][0]["results"]] == [6, 3]
    assert "only 3 document(s)" in r.stderr  # below the default min_docs=8
    bad = subprocess.run([sys.executable, "eval_length.py", f"--ckpts={d}", "--doc_sep=eot", "--stride=4",
                          f"--out={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "drop --stride" in bad.stderr.strip().splitlines()[-1]
