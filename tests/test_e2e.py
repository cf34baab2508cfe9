"""End to end, as a user runs it: prepare (the generated corpus of conftest.py) -> train -> checkpoint -> resume
-> sample."""

import csv
import pickle

import torch

from conftest import run
from model import AttnSpec, demo_runs

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--eval_interval=3", "--log_interval=1", "--warmup_iters=2", "--device=cpu"]


def read_log(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def test_train_resume_sample(char_data, tmp_path):
    out = tmp_path / "run"
    base = ["train.py", "config/train_shakespeare_char.py", "--attn=lssar", f"--data_dir={char_data}", f"--out_dir={out}", *TINY]
    r = run(*base, "--max_iters=6")
    assert "attention lssar backend=" in r.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 6
    # everything needed to rebuild the model travels with the checkpoint
    # in canonical form: the shorthand resolved, so what it means never depends on the code that reads it
    assert (ckpt["model_args"]["attn"], ckpt["model_args"]["reweight_p"]) == ("lssa", 15.0)
    assert ckpt["model_args"]["pos"] == "rope" and ckpt["config"]["attn"] == "lssar"  # config: as the user wrote it
    with open(char_data / "meta.pkl", "rb") as f:
        vocab = pickle.load(f)["vocab_size"]
    assert ckpt["model_args"]["vocab_size"] == vocab and ckpt["config"]["block_size"] == 32
    losses = [float(row["loss"]) for row in read_log(out) if row["kind"] == "train"]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))

    # resume continues the checkpoint's run: a setting that would change it is refused in one line, naming both values
    r = run(*base, "--max_iters=9", "--init_from=resume", "--attn=softmax", check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "attn='softmax' was given" in last and "trained with attn='lssar'" in last
    r = run(*base, "--max_iters=9", "--init_from=resume")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 9 and ckpt["model_args"]["attn"] == "lssa"
    assert [int(row["iter"]) for row in read_log(out) if row["kind"] == "train"] == list(range(1, 10))

    r = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40", "--device=cpu")
    samples = [s for s in r.stdout.split("---------------") if "ROMEO:" in s]
    assert len(samples) == 2 and all(len(s.strip()) >= len("ROMEO:") + 40 for s in samples)

    # evaluation-time settings, as eval_length.py has them: recorded in the first line, applied to the generation
    r = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=80", "--device=cpu",
            "--rope_scaling=yarn", "--logn_scale=true", "--reweight_p=3")
    assert "attention lssa reweight_p=3 temp=logn rope_scaling=yarn (factor per length)," in r.stdout
    assert len(r.stdout.split("---------------")[0].split("ROMEO:", 1)[1]) >= 80
    r = run("sample.py", f"--out_dir={out}", "--rope_scaling=pi,yarn", "--device=cpu", check=False)
    assert r.returncode != 0 and "one value each" in r.stderr.strip().splitlines()[-1]

    # a prompt with characters the char vocabulary lacks: one clear line, non-zero exit
    r = run("sample.py", f"--out_dir={out}", "--start=caf\u00e9", "--device=cpu", check=False)
    assert r.returncode != 0 and "not in this model's vocabulary" in r.stderr


def test_every_variant_trains(char_data, tmp_path):
    # each attention of the demo sweep trains a couple of steps as sweep.py runs it and writes a finite loss
    for attn in demo_runs():
        out = tmp_path / attn
        run("train.py", "config/train_shakespeare_char.py", f"--attn={attn}", f"--data_dir={char_data}",
            f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2")
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)
        spec = AttnSpec.of(attn)
        assert (ckpt["model_args"]["attn"], ckpt["model_args"]["reweight_p"]) == (spec.kind, spec.reweight_p)
        assert torch.isfinite(torch.tensor(ckpt["best_val_loss"]))


def test_clear_errors(tmp_path):
    r = run("train.py", f"--data_dir={tmp_path / 'nothing'}", "--device=cpu", check=False)
    assert r.returncode != 0 and "dataset not found" in r.stderr and "prepare.py" in r.stderr
    r = run("train.py", "--atn=lssa", check=False)
    assert r.returncode != 0 and "unknown key 'atn'" in r.stderr and "attn" in r.stderr
    r = run("sample.py", f"--out_dir={tmp_path / 'no-run'}", check=False)
    assert r.returncode != 0 and "checkpoint not found" in r.stderr


def test_bad_model_config_is_one_line(char_data, tmp_path):
    r = run("train.py", f"--data_dir={char_data}", f"--out_dir={tmp_path}", *TINY, "--attn=flash", check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("config error: unknown attn='flash'")
    r = run("train.py", f"--data_dir={char_data}", f"--out_dir={tmp_path}", *TINY, "--reweight_p=-2", check=False)
    assert r.returncode != 0 and "reweight_p must be >= 0" in r.stderr


def test_wandb_offline_writes_a_run(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    run("train.py", f"--data_dir={char_data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--wandb_log=True")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_reweight_start_trains_without_the_reweighting_first(char_data, tmp_path):
    """--reweight_start=K: the first K steps compute with p = 0 (the same losses as LSSA itself, same seed and data),
    then with the model's p; a reader refuses a checkpoint saved before the switch; a model without re-weighting
    refuses the key."""
    def losses(out, *args):
        run("train.py", "config/train_shakespeare_char.py", f"--data_dir={char_data}", f"--out_dir={out}", *TINY,
            "--max_iters=6", *args)
        return [float(r["loss"]) for r in read_log(out) if r["kind"] == "train"]
    lssa = losses(tmp_path / "lssa", "--attn=lssa")
    lssar = losses(tmp_path / "lssar", "--attn=lssar")
    curr = losses(tmp_path / "curr", "--attn=lssar", "--reweight_start=3", "--eval_interval=2")
    assert curr[:3] == lssa[:3] and curr[3] != lssa[3] and curr[3] != lssar[3]
    ckpt = torch.load(tmp_path / "curr" / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["reweight_start"] == 3 and ckpt["model_args"]["reweight_p"] == 15.0
    (tmp_path / "early").mkdir()  # the checkpoint as an interrupted run would have left it at step 2
    torch.save(dict(ckpt, iter_num=2), tmp_path / "early" / "ckpt.pt")
    r = run("eval_length.py", f"--ckpts={tmp_path / 'early'}", f"--out={tmp_path / 'res'}", "--device=cpu", check=False)
    assert r.returncode == 1 and "before its reweight_start=3" in r.stderr.strip().splitlines()[-1]
    r = run("eval_length.py", f"--ckpts={tmp_path / 'curr'}", f"--out={tmp_path / 'res'}", "--device=cpu", check=False)
    assert r.returncode == 0
    r = run("train.py", "config/train_shakespeare_char.py", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'x'}",
            *TINY, "--attn=softmax", "--reweight_start=3", check=False)
    assert r.returncode == 1 and "delays a re-weighting this model does not have" in r.stderr
