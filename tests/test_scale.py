"""Scale: the sharded loader, DDP (torchrun, gloo on CPU) against one process with the same global batch,
and the paper's GPT-2 configs."""

import csv
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from configurator import configure, script_defaults
from conftest import ROOT, run
from dataset import get_batch, load_split, random_windows, read_shard, write_shard
from model import GPT, GPTConfig

V = 50


@pytest.fixture
def sharded(tmp_path):
    """A small dataset of token shards with known contents: train shards of different sizes, one val shard."""
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    sizes = [700, 300, 1000]
    for i, n in enumerate(sizes):
        write_shard(d / f"toy_train_{i:06d}.bin", rng.integers(0, V, n))
    write_shard(d / "toy_val_000000.bin", rng.integers(0, V, 600))
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": V}, f)
    return d


def test_sharded_loader_reads_exactly_the_shards(sharded):
    parts = load_split("toy", "train", str(sharded))
    shards = sorted(sharded.glob("toy_train_*.bin"))
    assert [len(p) for p in parts] == [700, 300, 1000]
    for p, f in zip(parts, shards, strict=True):
        assert np.array_equal(p, read_shard(f))  # in file order, every token
    T = 64
    seen = set()
    for it in range(20):
        locs = random_windows(parts, 16, T, seed=1, it=it, micro=0)
        assert locs == random_windows(parts, 16, T, seed=1, it=it, micro=0)  # deterministic
        assert locs != random_windows(parts, 16, T, seed=1, it=it, micro=1)  # micro-batches (DDP ranks) differ
        x, y = get_batch(parts, locs, T, "cpu")
        for (w, o), xi, yi in zip(locs, x, y, strict=True):
            assert o + T + 1 <= len(parts[w])  # never crosses a shard's end
            assert np.array_equal(xi.numpy(), parts[w][o:o + T]) and np.array_equal(yi.numpy(), parts[w][o + 1:o + T + 1])
            seen.add(w)
    assert seen == {0, 1, 2}


def test_truncated_shard_is_a_clear_error(sharded):
    f = sharded / "toy_train_000001.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(SystemExit, match="truncated"):
        load_split("toy", "train", str(sharded))


TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--eval_interval=3", "--max_iters=6", "--log_interval=1", "--device=cpu", "--attn=lssar",
        "--gradient_accumulation_steps=2", "--dropout=0.0"]


def logged(out):
    with open(out / "log.csv") as f:
        return [(r["iter"], r["kind"], float(r["loss"]), r["val_loss"]) for r in csv.DictReader(f)]


def test_ddp_matches_one_process(sharded, tmp_path):
    # 2 processes x 1 micro-batch each == 1 process x 2 micro-batches: same data, same averaged gradients
    one, two = tmp_path / "one", tmp_path / "two"
    run("train.py", "--dataset=toy", f"--data_dir={sharded}", f"--out_dir={one}", *TINY)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    r = subprocess.run([*torchrun, "--dataset=toy", f"--data_dir={sharded}", f"--out_dir={two}", *TINY], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = logged(one), logged(two)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 9  # 6 train steps + 3 evals, logged once
    np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], rtol=1e-5)
    wa = torch.load(one / "ckpt.pt", weights_only=False)["model"]
    wb = torch.load(two / "ckpt.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    # a global micro-batch count that does not split over the processes is refused in one line
    r = subprocess.run([*torchrun, "--dataset=toy", f"--data_dir={sharded}", f"--out_dir={tmp_path / 'bad'}", *TINY,
                        "--gradient_accumulation_steps=3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode != 0 and "multiple of the number of processes" in r.stderr


@pytest.mark.parametrize("attn", ["softmax", "lssa", "lssar"])
def test_gpt2_fineweb_configs(attn):
    # train.py's own defaults (its block of settings), then the config file on top
    g = script_defaults(os.path.join(ROOT, "train.py"))
    cfg = configure(g, [os.path.join(ROOT, f"config/train_gpt2_fineweb_{attn}.py")])
    assert cfg["attn"] == attn and cfg["out_dir"] == f"out-gpt2-fineweb-{attn}" and cfg["pos"] == "rope"
    assert cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"] == 524288  # ~0.5M tokens
    assert cfg["max_iters"] == cfg["lr_decay_iters"] == 18865 and cfg["block_size"] == 1024
    assert cfg["gradient_accumulation_steps"] % 8 == 0  # splits over 8 GPUs
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "attn", "pos", "dropout")}
    with torch.device("meta"):  # the real 124M model, without allocating it
        model = GPT(GPTConfig(vocab_size=50304, **args))
    assert 123e6 < model.get_num_params() < 125e6


@pytest.mark.parametrize("name", ["eval_gpt2_fineweb", "eval_gpt2_fineweb_docs"])
def test_gpt2_fineweb_eval_configs(name):
    """eval_length.py reads both FineWeb evaluation configs; the second one evaluates inside single documents."""
    src = open(os.path.join(ROOT, "eval_length.py")).read()
    g = {}
    exec(src[src.index("# ---"):src.index("# ---", src.index("# ---") + 5)], g)  # eval_length.py's config block
    cfg = configure(g, [os.path.join(ROOT, f"config/{name}.py")])
    assert cfg["ckpts"].split(",") == [f"out-gpt2-fineweb-{a}" for a in ("softmax", "lssa", "lssar")]
    assert cfg["multipliers"] == "1,2,4,8,16" and cfg["doc_sep"] == ("eot" if name.endswith("docs") else "")
