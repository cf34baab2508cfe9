"""Interruption and bad input are boring: atomic checkpoints, exact resume after SIGKILL, SIGINT/SIGTERM save
and exit, best + latest checkpoints, no silent overwrite, and one-line errors that leave files untouched."""

import csv
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import runs
from conftest import ROOT, run

# dropout > 0 so that exact resume also needs the RNG state, not only the weights and the data position
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=1",
        "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=20", "--dropout=0.1", "--device=cpu",
        "--attn=lssar"]


def train_losses(out):
    with open(out / "log.csv") as f:
        return [(int(r["iter"]), r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start(*args):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_iter(out, it, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "log.csv").exists() and any(i >= it for i, _ in train_losses(out)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"training did not reach iteration {it}")


def test_sigkill_and_resume_gives_the_same_losses(char_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common_args = [f"--data_dir={char_data}", *TINY, "--eval_interval=4"]
    run("train.py", f"--out_dir={a}", *common_args, "--max_iters=20")
    proc = start(f"--out_dir={b}", *common_args, "--max_iters=100000")  # would run for a long time
    wait_for_iter(b, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = torch.load(b / "ckpt.pt", weights_only=False)["iter_num"]
    assert 4 <= killed_at < 20
    run("train.py", f"--out_dir={b}", *common_args, "--max_iters=20", "--init_from=resume")
    la, lb = train_losses(a), train_losses(b)
    assert [i for i, _ in lb] == list(range(1, 21))  # the killed run's steps after its checkpoint are dropped
    assert la == lb  # step by step, to the last printed digit


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_exits(char_data, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--eval_interval=1000", "--max_iters=100000")
    wait_for_iter(out, 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] >= 3 and f"saved checkpoint at iteration {ck['iter_num']}" in stdout
    assert "--init_from=resume" in stdout
    assert train_losses(out)[-1][0] == ck["iter_num"]  # nothing trained after the save


def test_best_and_latest(char_data, tmp_path):
    out = tmp_path / "run"
    run("train.py", f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--eval_interval=2", "--max_iters=6")
    latest, best = (torch.load(out / f, weights_only=False) for f in ("ckpt.pt", "best.pt"))
    assert latest["iter_num"] == 6
    with open(out / "log.csv") as f:
        evals = {int(r["iter"]): float(r["val_loss"]) for r in csv.DictReader(f) if r["kind"] == "eval"}
    best_iter = min((i for i in evals if i > 0), key=lambda i: evals[i])
    assert best["iter_num"] == best_iter and best["best_val_loss"] == pytest.approx(evals[best_iter], abs=1e-6)


def test_refuses_to_overwrite_another_run(char_data, tmp_path):
    out = tmp_path / "run"
    args = [f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--eval_interval=2", "--max_iters=2"]
    run("train.py", *args)
    before = {f: digest(out / f) for f in ("ckpt.pt", "log.csv")}
    r = run("train.py", *args, check=False)
    assert r.returncode != 0 and "already holds a checkpoint" in r.stderr and "--init_from=resume" in r.stderr
    assert before == {f: digest(out / f) for f in before}
    run("train.py", *args, "--overwrite=True")  # said explicitly: allowed


def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    runs.save_checkpoint({"iter_num": 1}, str(path))
    good = digest(path)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint({"iter_num": 2}, str(path))
    assert digest(path) == good and os.listdir(tmp_path) == ["ckpt.pt"]  # old one intact, no temp file left


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    run("train.py", f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--eval_interval=2", "--max_iters=2")
    return out


def check_fails(args, message, untouched):
    before = {p: digest(p) for p in untouched}
    r = run(*args, check=False)
    assert r.returncode != 0, r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in r.stderr, r.stderr
    assert before == {p: digest(p) for p in untouched}


def test_bad_input_errors(char_data, trained, tmp_path):
    ck, log = trained / "ckpt.pt", trained / "log.csv"
    keep = [ck, log]
    resume = ["train.py", f"--out_dir={trained}", f"--data_dir={char_data}", *TINY, "--init_from=resume",
              "--max_iters=4"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.bin").write_bytes(b"")
    (empty / "val.bin").write_bytes(b"")
    check_fails(["train.py", f"--data_dir={empty}", f"--out_dir={tmp_path / 'x'}"], "dataset is empty", [])
    check_fails(["train.py", f"--data_dir={tmp_path / 'none'}"], "python data/shakespeare_char/prepare.py", [])
    check_fails(["train.py", "--batch_size=big"], "batch_size expects int", [])
    check_fails(["train.py", "--atn=lssa"], "unknown key 'atn'", [])
    check_fails([*resume, "--attn_backend=cuda-magic"], "unknown attn_backend", keep)
    check_fails(["train.py", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'y'}", *TINY, "--attn=flash"],
                "unknown attn='flash'", [])
    check_fails(["train.py", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'y'}", *TINY, "--reweight_p=-1"],
                "reweight_p must be >= 0", [])
    # a vocabulary that does not match the checkpoint's
    other = tmp_path / "bpe"
    other.mkdir()
    for f in ("train.bin", "val.bin"):
        (other / f).write_bytes((char_data / f).read_bytes())
    with open(other / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 50257, "tokenizer": "gpt2"}, f)
    check_fails(["train.py", f"--out_dir={trained}", f"--data_dir={other}", *TINY, "--init_from=resume",
                 "--max_iters=4"], "vocab mismatch", keep)
    # a truncated checkpoint: every script says so in one line and leaves it alone
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ckpt.pt").write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    for args in (["train.py", f"--out_dir={broken}", f"--data_dir={char_data}", "--init_from=resume"],
                 ["sample.py", f"--out_dir={broken}"], ["eval_length.py", f"--ckpts={broken}"]):
        check_fails(args, "checkpoint unreadable", [broken / "ckpt.pt"])
    check_fails(["sample.py", f"--out_dir={tmp_path / 'nothing'}"], "checkpoint not found", [])
    check_fails(["sample.py", f"--out_dir={trained}", "--start=\u00e9t\u00e9"], "not in this model's vocabulary", keep)
    check_fails(["eval_length.py", f"--ckpts={trained}", "--lengths=200000"], "validation tokens", keep)
    learned = tmp_path / "learned"
    run("train.py", f"--out_dir={learned}", f"--data_dir={char_data}", *TINY, "--pos=learned", "--max_iters=1",
        "--eval_interval=1")
    check_fails(["eval_length.py", f"--ckpts={learned}", "--multipliers=1,2"], "learned position embeddings",
                [learned / "ckpt.pt"])
    check_fails(["sample.py", f"--out_dir={learned}", "--reweight_p=-3"], "reweight_p must be >= 0",
                [learned / "ckpt.pt"])


def test_eval_rejects_tokens_outside_the_vocab(trained, tmp_path):
    ck = torch.load(trained / "ckpt.pt", weights_only=False)
    data = tmp_path / "data"
    data.mkdir()
    np.full(5000, ck["model_args"]["vocab_size"] + 5, dtype=np.uint16).tofile(data / "val.bin")  # past its vocabulary
    ck["config"]["data_dir"] = str(data)
    (tmp_path / "run").mkdir()
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    check_fails(["eval_length.py", f"--ckpts={tmp_path / 'run'}", "--multipliers=1"], "vocab", [])


def test_non_finite_loss_stops_and_keeps_checkpoint(char_data, tmp_path):
    # a schedule that climbs from 0 (step 1: a good checkpoint) to 5e29 (step 2: the weights blow up)
    out = tmp_path / "run"
    args = [f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--max_iters=50", "--eval_interval=1",
            "--learning_rate=1e-4", "--min_lr=1e30", "--warmup_iters=0", "--lr_decay_iters=2", "--grad_clip=0"]
    r = run("train.py", *args, check=False)
    assert r.returncode != 0 and "non-finite" in r.stderr and "step 2" in r.stderr, r.stdout + r.stderr
    assert runs.load_checkpoint(str(out))["iter_num"] == 1  # the last good one
    with open(out / "log.csv") as f:
        assert "nan" not in f.read()  # never a number in the log


@pytest.mark.parametrize("attn", ["softmax", "lssa", "lssar", "sigmoid", "relu", "ssmax"])
def test_bf16_training_has_no_nan(char_data, tmp_path, attn):
    out = tmp_path / attn
    run("train.py", f"--out_dir={out}", f"--data_dir={char_data}", *TINY, f"--attn={attn}", "--dtype=bfloat16",
        "--max_iters=4", "--eval_interval=4")
    losses = [float(x) for _, x in train_losses(out)]
    assert len(losses) == 4 and np.isfinite(losses).all()
