"""sweep.py end to end on a tiny budget: prepares its data, trains each variant, skips finished runs, resumes
an unfinished one, and evaluates everything (plus re-weighting switched on at evaluation) into one table."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import INPUT, ROOT


def sweep(tmp_path, *extra):
    cmd = [sys.executable, "sweep.py", "--variants=softmax,lssa", f"--out_root={tmp_path}",
           f"--data_dir={tmp_path / 'data'}", f"--input={INPUT}", "--eval_tokens=512", "--multipliers=1,4",
           f"--results={tmp_path / 'res' / 'sweep'}", "--device=cpu",
           "--train_args=--n_layer=1 --n_embd=32 --batch_size=4 --eval_iters=1 --eval_interval=2 --log_interval=1",
           *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_sweep(tmp_path):
    if not os.path.exists(INPUT):
        pytest.skip(f"{INPUT} not found")
    r = sweep(tmp_path, "--max_iters=3")
    assert (tmp_path / "data" / "train.bin").exists()  # prepared on the way
    res = json.loads((tmp_path / "res" / "sweep.json").read_text())
    assert [x["label"] for x in res["runs"]] == ["softmax", "lssa", "lssa (eval p=15)"]
    assert all(len(x["results"]) == 2 and x["iter_num"] == 3 for x in res["runs"])
    md = (tmp_path / "res" / "sweep.md").read_text()
    assert "| lssa (eval p=15) | 0 -> 15 |" in md and "| softmax | 0 |" in md
    for f in ("sweep.csv", "sweep.png", "sweep_detail.png"):
        assert (tmp_path / "res" / f).stat().st_size > 0
    ckpt = tmp_path / "out-shakespeare-char-softmax" / "ckpt.pt"
    mtime = ckpt.stat().st_mtime_ns

    # finished runs are skipped
    r = sweep(tmp_path, "--max_iters=3")
    assert "finished checkpoint at iter 3" in r.stdout and ckpt.stat().st_mtime_ns == mtime

    # an unfinished run (target raised) resumes from its checkpoint instead of starting over
    sweep(tmp_path, "--max_iters=5", "--variants=softmax")
    assert torch.load(ckpt, weights_only=False)["iter_num"] == 5
    with open(ckpt.parent / "log.csv") as f:
        iters = [int(row["iter"]) for row in csv.DictReader(f) if row["kind"] == "train"]
    assert iters == [1, 2, 3, 4, 5]
