"""sweep.py end to end on a tiny budget: prepares its data, trains each run (x seeds x grid settings), skips
finished runs, resumes an unfinished one, evaluates everything (plus evaluation-time rows) into one table with
mean +- std over seeds, and refuses bad run specs in one line."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT


def sweep(tmp_path, corpus_file, *extra, check=True):
    cmd = [sys.executable, "sweep.py", "--runs=softmax,lssa", f"--out_root={tmp_path}",
           f"--data_dir={tmp_path / 'data'}", f"--input={corpus_file}", "--eval_tokens=512", "--multipliers=1,4",
           f"--results={tmp_path / 'res' / 'sweep'}", "--device=cpu",
           "--train_args=--n_layer=1 --n_embd=32 --batch_size=4 --eval_iters=1 --eval_interval=2 --log_interval=1",
           *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_sweep(tmp_path, corpus_file):
    r = sweep(tmp_path, corpus_file, "--max_iters=3")
    assert (tmp_path / "data" / "train.bin").exists()  # prepared on the way
    res = json.loads((tmp_path / "res" / "sweep.json").read_text())
    assert [x["label"] for x in res["runs"]] == ["softmax", "lssa", "lssa (eval reweight_p=15)"]  # the default eval row
    assert all(len(x["results"]) == 2 and x["iter_num"] == 3 for x in res["runs"])
    assert [x["n"] for x in res["rows"]] == [1, 1, 1]
    md = (tmp_path / "res" / "sweep.md").read_text()
    assert "| lssa (eval reweight_p=15) | 0 -> 15 | 1 |" in md and "| softmax | 0 | 1 |" in md
    for f in ("sweep.csv", "sweep.png", "sweep_detail.png"):
        assert (tmp_path / "res" / f).stat().st_size > 0
    ckpt = tmp_path / "out-shakespeare-char-softmax" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=False)["config"]["warmup_iters"] == 1  # a short sweep leaves warmup
    # every run trains with --threads (default 2) whatever the environment says, and the table says so
    assert torch.load(ckpt, weights_only=False)["env"]["cpu_threads"] == 2
    assert "Runs trained here with 2 CPU threads each (--threads)" in md
    mtime = ckpt.stat().st_mtime_ns

    # finished runs are skipped
    r = sweep(tmp_path, corpus_file, "--max_iters=3")
    assert "finished checkpoint at iter 3" in r.stdout + r.stderr and ckpt.stat().st_mtime_ns == mtime

    # a row is named from its checkpoint: one whose stored config differs from the run (here: edited) is refused
    ck_data = torch.load(ckpt, weights_only=False)
    ck_data["config"]["pos"] = "none"
    torch.save(ck_data, ckpt)
    r = sweep(tmp_path, corpus_file, "--max_iters=3", check=False)
    assert r.returncode == 1 and "holds a checkpoint trained with pos='none', but run 'softmax' seed 1337 asks for " \
        "pos='rope'" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    ck_data["config"]["pos"] = "rope"
    torch.save(ck_data, ckpt)
    mtime = ckpt.stat().st_mtime_ns

    # an unfinished run (target raised) resumes from its checkpoint instead of starting over
    sweep(tmp_path, corpus_file, "--max_iters=5", "--runs=softmax")
    assert torch.load(ckpt, weights_only=False)["iter_num"] == 5
    with open(ckpt.parent / "log.csv") as f:
        iters = [int(row["iter"]) for row in csv.DictReader(f) if row["kind"] == "train"]
    assert iters == [1, 2, 3, 4, 5]


def test_grid_with_seeds(tmp_path, corpus_file):
    """Runs x grid settings x seeds; rows aggregate the seeds (mean, sample std, n) of each run; eval-time rows that
    do not apply (RoPE scaling on a NoPE run) are left out."""
    sweep(tmp_path, corpus_file, "--max_iters=2", "--runs=lssar,softmax:pos=none", "--grid=reweight_p=3,15",
          "--seeds=1337,7", "--eval_extra=softmax:pos=none+rope_scaling=yarn,lssar+logn_scale=true")
    res = json.loads((tmp_path / "res" / "sweep.json").read_text())
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["lssar reweight_p=3", "lssar reweight_p=15", "softmax pos=none reweight_p=3",
                      "softmax pos=none reweight_p=15", "lssar reweight_p=3 (eval logn_scale=true)",
                      "lssar reweight_p=15 (eval logn_scale=true)"]  # no RoPE to scale in the pos=none runs
    assert (tmp_path / "out-shakespeare-char-lssar-reweight_p3-seed7" / "ckpt.pt").exists()
    by = {r["label"]: r for r in res["rows"]}
    row = by["lssar reweight_p=3"]
    assert row["n"] == 2 and row["seeds"] == [1337, 7] and row["reweight_p"] == 3
    losses = np.array([[x["loss"] for x in r["results"]] for r in res["runs"] if r["label"] == "lssar reweight_p=3"])
    np.testing.assert_allclose(row["loss_mean"], losses.mean(0))
    np.testing.assert_allclose(row["loss_std"], losses.std(0, ddof=1))
    assert losses[0, 0] != losses[1, 0]  # the seeds really differ
    assert by["lssar reweight_p=3 (eval logn_scale=true)"]["eval"] == {"logn_scale": True}
    assert "±" in (tmp_path / "res" / "sweep.md").read_text()

    # --replot redraws both plots from the JSON alone (no training, no evaluation)
    pngs = [tmp_path / "res" / f for f in ("sweep.png", "sweep_detail.png")]
    for png in pngs:
        png.unlink()
    r = subprocess.run([sys.executable, "sweep.py", f"--replot={tmp_path / 'res' / 'sweep.json'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(png.stat().st_size > 0 for png in pngs) and "eval_length" not in r.stderr


LADDER_ARGS = "--train_args=--n_layer=1 --n_embd=32 --eval_iters=1 --eval_interval=2 --log_interval=1"  # (no batch_size)


@pytest.mark.parametrize("args,msg", [
    (["--runs=softmax,flash"], "unknown attention 'flash'"),
    (["--runs=softmax,softmax"], "without repeats"),
    (["--runs=lssar:pos"], "name:key=value"),
    (["--seeds=1,1"], "'1' is repeated"),
    (["--grid=reweight_p"], "key=v1,v2"),
    (["--eval_extra=lssa+n_layer=2"], "write run+key=value"),
    (["--eval_extra=lssa+reweight_p=abc"], "reweight_p must be >= 0"),  # checked before any training
    (["--eval_extra=lssa+reweight_p=-3"], "reweight_p must be >= 0"),
    (["--eval_extra=softmax+rope_scaling=yarn+rope_factor=x"], "rope_factor must be a number"),
    (["--eval_extra=softmax+rope_scaling=long"], "unknown 'long'"),
    (["--replot=missing.json"], "cannot read results 'missing.json'"),
    # what the sweep sets itself: refused wherever else it is set (the row would be named for one, trained with another)
    (["--runs=softmax", "--train_args=--n_layer=1 --attn=lssa"], "--train_args sets attn, but the sweep sets it"),
    (["--runs=softmax:attn=lssa"], "sets attn, which the sweep sets for every run"),
    (["--runs=softmax", "--grid=seed=1,2"], "--grid sets seed"),
    (["--runs=lssar:pos=none", "--train_args=--n_layer=1 --pos=rope"], "which run 'lssar pos=none' sets itself"),
    (["--ladder=16,32", "--ladder_tokens=64", "--train_args=--n_layer=1 --block_size=32"],
     "--train_args sets block_size, but the ladder's rungs set it"),
    ([LADDER_ARGS, "--ladder=16,32", "--ladder_tokens=64", "--grid=block_size=16,32"], "sets block_size, which every rung"),
    (["--max_iters=3", "--train_args=--n_layer=1 --warmup_iters=5"], "--train_args sets warmup_iters, but --max_iters"),
    # seeds and extra seeds
    (["--seeds=1,,2"], "an empty item"),
    (["--seeds=1,x"], "'x' is not an integer"),
    (["--seeds=1.5"], "'1.5' is not an integer"),
    (["--seeds=-3"], "seeds must be whole numbers >= 0"),
    (["--extra_seeds=softmax@32=2"], "--extra_seeds adds a seed to one run at one rung of a ladder"),
    ([LADDER_ARGS, "--ladder=16,32", "--ladder_tokens=64", "--extra_seeds=softmax@32=2,softmax@32=2"], "repeats seed 2"),
    ([LADDER_ARGS, "--ladder=16,32", "--ladder_tokens=64", "--seeds=1337,2", "--extra_seeds=softmax@32=2"], "repeats seed 2"),
    ([LADDER_ARGS, "--ladder=32", "--ladder_tokens=64", "--extra_seeds=softmax@32=--5"], "'--5' is not an integer"),
    (["--ladder=32", "--ladder_tokens=-1"], "ladder_tokens=-1 is out of range; set --ladder_tokens to a number >= 1"),
    (["--ladder=32", "--ladder_tokens=0"], "set --ladder_tokens to a number >= 1"),
    # stacks, the evaluator, the results path
    (["--runs=[softmax"], "write a stack as [layers pattern]"),
    (["--runs=[3*softmax:window=4,lssar]"], "does not divide n_layer=1"),
    (["--evaluator=loss"], "evaluator='loss'"),
    (["--evaluator=retrieval", "--retrieval_bins=4,2"], "bins must be at least two increasing edges"),
    (["--results=/proc/x/res"], "cannot be created: /proc takes no new folder /proc/x"),
])
def test_bad_specs(tmp_path, corpus_file, args, msg):
    r = sweep(tmp_path, corpus_file, *args, check=False)
    assert r.returncode != 0 and msg in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
    assert not (tmp_path / "res").exists() and not list(tmp_path.glob("out-*"))


def test_ladder(tmp_path, corpus_file):
    """--ladder: every run at each training context T with ladder_tokens tokens per step (batch = tokens / T), each
    rung evaluated at its own multipliers x T; --extra_seeds adds a seed to one run at one rung; the summary pairs
    each run with softmax by seed at the first length; files and plots, --replot; bad items are one line before
    anything trains."""
    common = ["--runs=softmax,lssar", "--ladder=16,32", "--ladder_tokens=64", "--seeds=1337,1", "--max_iters=2",
              "--eval_extra=", "--extra_seeds=lssar@32=2", LADDER_ARGS]
    sweep(tmp_path, corpus_file, *common, f"--results={tmp_path / 'res' / 'ladder'}")
    res = json.loads((tmp_path / "res" / "ladder.json").read_text())
    assert [r["T"] for r in res["rungs"]] == [16, 32]
    assert res["rungs"][1]["rows"][0]["lengths"] == [32, 128]  # 1x and 4x of the rung's own T
    cells = {(x["T"], x["label"]): x for x in res["summary"]}
    assert set(cells) == {(16, "softmax"), (16, "lssar"), (32, "softmax"), (32, "lssar")}
    assert cells[(32, "lssar")]["n"] == 3 and cells[(16, "lssar")]["n"] == 2
    assert set(cells[(32, "lssar")]["diff_softmax_seeds"]) == {"1337", "1"}  # paired: the seeds softmax has too
    x = cells[(16, "lssar")]
    runs = {(r["label"], r["seed"]): r for r in res["rungs"][0]["runs"]}
    d = [runs[("lssar", s)]["results"][0]["loss"] - runs[("softmax", s)]["results"][0]["loss"] for s in (1337, 1)]
    assert x["diff_softmax"] == pytest.approx(np.mean(d)) and x["diff_softmax_std"] == pytest.approx(np.std(d, ddof=1))
    # the 1x loss by position range, cut at the rungs: the ranges, weighted by width, give the 1x loss back
    for (T, _), c in cells.items():
        assert [(p["start"], p["end"]) for p in c["by_position"]] == [(0, 16), (16, 32)][:T // 16]
        assert sum(p["loss"] * (p["end"] - p["start"]) for p in c["by_position"]) / T == pytest.approx(c["first"])
    assert len({p["loss"] for p in cells[(32, "softmax")]["by_position"]}) == 2  # two ranges, two numbers
    ck = torch.load(tmp_path / "out-shakespeare-char-softmax-block_size32-batch_size2" / "ckpt.pt", weights_only=False)
    assert (ck["config"]["block_size"], ck["config"]["batch_size"]) == (32, 2)
    md = (tmp_path / "res" / "ladder.md").read_text()
    assert "T = 16" in md and "| lssar |" in md and "(3)" in md and "16-32: " in md
    for f in ("ladder.csv", "ladder.png", "ladder_curves.png"):
        assert (tmp_path / "res" / f).stat().st_size > 0
    (tmp_path / "res" / "ladder.png").unlink()
    r = subprocess.run([sys.executable, "sweep.py", f"--replot={tmp_path / 'res' / 'ladder.json'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "res" / "ladder.png").exists(), r.stderr
    for bad, msg in (("--extra_seeds=lssa@32=2", "--extra_seeds item 'lssa@32=2'"),
                     ("--extra_seeds=lssar@64=2", "--extra_seeds item 'lssar@64=2'"),
                     ("--ladder_tokens=48", "ladder_tokens=48 is not a whole number of windows of T=32")):
        r = sweep(tmp_path / "bad", corpus_file, *common, bad, check=False)
        assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("sweep error:") and msg in r.stderr
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").glob("out-*"))



def test_an_interrupted_ladder_keeps_its_rungs_and_continues(tmp_path, corpus_file):
    """The ladder writes its files after every rung (marked partial); killed while training the next rung (the whole
    process group, as a terminal's Ctrl-C or a job scheduler would), the same command continues it: the finished
    rung's evaluation is reused, not redone, unless one of its checkpoints changed since (then only that checkpoint
    is evaluated again); a seed added at one rung is the only evaluation done there."""
    import fcntl
    import signal
    import time
    cmd = [sys.executable, "sweep.py", "--runs=softmax,lssar", f"--out_root={tmp_path}", f"--data_dir={tmp_path / 'data'}",
           f"--input={corpus_file}", "--eval_tokens=256", "--multipliers=1,2", f"--results={tmp_path / 'res' / 'ladder'}",
           "--device=cpu", "--ladder=16,32", "--ladder_tokens=64", "--seeds=1337", "--max_iters=2", "--eval_extra=",
           "--train_args=--n_layer=1 --n_embd=32 --eval_iters=1 --eval_interval=2 --log_interval=1"]
    res_json = tmp_path / "res" / "ladder.json"
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not res_json.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGTERM)  # rung 16 written: now inside rung 32's first training (seconds of work left)
    p.wait(timeout=120)
    part = json.loads(res_json.read_text())
    assert part["partial"] == {"done": [16], "planned": [16, 32]} and [r["T"] for r in part["rungs"]] == [16]
    assert "**Partial**: the rungs T = 16 of 16, 32" in (tmp_path / "res" / "ladder.md").read_text()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "rung T=16: the same checkpoints and settings" in out and "rung T=32: the same" not in out, out[-3000:]
    full = json.loads(res_json.read_text())
    assert full["partial"] is None and full["rungs"][0] == part["rungs"][0] and [x["T"] for x in full["rungs"]] == [16, 32]
    assert "Partial" not in (tmp_path / "res" / "ladder.md").read_text()
    ck = tmp_path / "out-shakespeare-char-lssar-block_size16-batch_size4" / "ckpt.pt"
    os.utime(ck, ns=(ck.stat().st_atime_ns, ck.stat().st_mtime_ns + 10**9))  # as if rewritten since
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "rung T=16: the same" not in out and "rung T=32: the same checkpoints and settings" in out, out[-3000:]
    assert "sweep: 1 of 2 evaluations reused" in out, out[-3000:]  # softmax's; only the rewritten lssar is redone
    again = json.loads(res_json.read_text())["rungs"][0]["runs"]
    assert again[0] == full["rungs"][0]["runs"][0] and again[1]["ckpt"] == full["rungs"][0]["runs"][1]["ckpt"]
    # a third seed at one rung: trains that run and evaluates only its checkpoint
    r = subprocess.run(cmd + ["--extra_seeds=lssar@32=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "rung T=16: the same checkpoints and settings" in out and "sweep: 2 of 3 evaluations reused" in out, out[-3000:]
    rung = json.loads(res_json.read_text())["rungs"][1]
    assert [(x["label"], x["seed"]) for x in rung["runs"]] == [("softmax", 1337), ("lssar", 1337), ("lssar", 2)]
    assert rung["runs"][:2] == full["rungs"][1]["runs"] and [x["n"] for x in rung["rows"]] == [1, 2]
    # seeds at both rungs; the second rung's new run is locked by another training, so the rerun stops after rung
    # 16 was evaluated again: the files still carry rung 32's evaluations, and the next rerun evaluates only its new run
    more = cmd + ["--extra_seeds=lssar@32=2,lssar@16=2,softmax@32=2"]
    held = tmp_path / "out-shakespeare-char-softmax-block_size32-batch_size2-seed2"
    held.mkdir()
    with open(held / "train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run(more, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "is in use by another training" in r.stderr, r.stderr[-3000:]
    stopped = json.loads(res_json.read_text())
    assert stopped["partial"]["done"] == [16] and [x["T"] for x in stopped["earlier_rungs"]] == [32]
    assert len(stopped["earlier_rungs"][0]["runs"]) == 3 and len(stopped["rungs"][0]["runs"]) == 3
    r = subprocess.run(more, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "rung T=16: the same checkpoints and settings" in out and "sweep: 3 of 4 evaluations reused" in out, out[-3000:]
    last = json.loads(res_json.read_text())
    assert last["partial"] is None and "earlier_rungs" not in last and len(last["rungs"][1]["runs"]) == 4


def test_finished_reads_each_checkpoint_once(tmp_path, monkeypatch):
    """The ladder asks finished() about every checkpoint twice per rung (skip or train, then the evaluation key):
    the file is read once, and again only when it was rewritten (a new size or modification time)."""
    import sweep

    reads = []

    def load(path):
        reads.append(path)
        return {"iter_num": 1000 if len(reads) == 1 else 2000, "config": {"max_iters": 2000}}

    monkeypatch.setattr(sweep, "load_checkpoint", load)
    monkeypatch.setattr(sweep, "max_iters", 0)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"x")
    assert sweep.finished(str(tmp_path)) == (1000, False)
    assert sweep.finished(str(tmp_path)) == (1000, False) and len(reads) == 1
    ckpt.write_bytes(b"xy")  # rewritten: read again
    os.utime(ckpt, ns=(1, 1))
    assert sweep.finished(str(tmp_path)) == (2000, True) and len(reads) == 2
    assert sweep.finished(str(tmp_path / "none")) == (None, False)


def test_a_results_json_is_replaced_whole(tmp_path, monkeypatch):
    """save_json (every results .json, the ladder's too) writes a temporary file and renames it: a write that dies
    midway leaves the previous file as it was and no temporary file behind."""
    import eval_length

    eval_length.save_json({"a": 1}, str(tmp_path / "res"), "cmd 1")
    before = (tmp_path / "res.json").read_text()

    def dies(obj, f, **kw):
        f.write('{"half": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_length.json, "dump", dies)
    with pytest.raises(KeyboardInterrupt):
        eval_length.save_json({"a": 2}, str(tmp_path / "res"), "cmd 2")
    assert (tmp_path / "res.json").read_text() == before and json.loads(before)["command"] == "cmd 1"
    assert [p.name for p in tmp_path.iterdir()] == ["res.json"]


def test_every_rung_panel_has_its_own_legend(tmp_path, monkeypatch):
    """The curves plot names each row with its n on every rung's panel: n can differ between rungs (third seeds)."""
    import matplotlib.figure

    import sweep

    def row(label, n):
        return {"label": label, "n": n, "lengths": [8, 16], "multipliers": [1, 2], "loss_mean": [2.0, 2.5],
                "loss_std": [0.1, 0.1]}
    out = {"rungs": [{"T": 8, "rows": [row("softmax", 3), row("lssar", 3)]},
                     {"T": 16, "rows": [row("softmax", 2), row("lssar", 2)]}],
           "summary": [{"label": lab, "T": T, "ratio": 1.2, "ratio_std": 0.0, "diff_softmax": 0.01,
                        "diff_softmax_std": 0.0} for T in (8, 16) for lab in ("softmax", "lssar")]}
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figs.append(fig))
    sweep.plot_ladder(out, str(tmp_path / "ladder"))
    panels = figs[1].axes
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in panels] == \
        [["softmax (n=3)", "lssar (n=3)"], ["softmax (n=2)", "lssar (n=2)"]]


def test_a_new_row_that_applies_to_no_checkpoint_keeps_the_reused_ones(tmp_path, monkeypatch):
    """A rerun whose only new evaluations are skipped (a RoPE setting on a run without RoPE) reuses the rest and
    records the skip, instead of stopping at "no checkpoint takes the eval-time settings"."""
    from test_eval_length import make_run

    import sweep

    d, _ = make_run(tmp_path, attn="softmax", pos="none")
    monkeypatch.setattr(sweep, "out_dir_for", lambda name, kv, seed: d)
    monkeypatch.setattr(sweep, "finished", lambda out_dir: (0, True))  # a random model, no training wanted
    monkeypatch.setattr(sweep, "verify_checkpoint", lambda *a: None)  # (make_run's config is not train.py's)
    monkeypatch.setattr(sweep, "multipliers", "1,2")
    monkeypatch.setattr(sweep, "eval_tokens", 0)
    monkeypatch.setattr(sweep, "device", "cpu")
    trained, seeds_of = [("softmax", {"pos": "none"}, "softmax:pos=none")], [[1337]]
    rows = [(0, {}, "softmax pos=none")]
    first = sweep.train_and_evaluate(trained, seeds_of, rows)
    more = rows + [(0, {"rope_scaling": "yarn"}, "softmax pos=none rope_scaling=yarn")]
    again = sweep.train_and_evaluate(trained, seeds_of, more, reuse=json.loads(json.dumps(first)))
    assert again["runs"] == json.loads(json.dumps(first["runs"])) and [r["label"] for r in again["rows"]] == [rows[0][2]]
    assert [(x["ckpt"], x["eval"]) for x in again["skipped"]] == [(d, {"rope_scaling": "yarn"})]


def test_range_loss_counts_a_straddling_bucket_by_its_overlap():
    """Positions 0-3 at loss 1, 3-6 at loss 2 (2 windows: 2 tokens per position): positions 0-4 are three at 1 and
    one at 2, so 1.25."""
    import sweep as sweep_mod

    buckets = [{"start": 0, "end": 3, "loss": 1.0, "tokens": 6}, {"start": 3, "end": 6, "loss": 2.0, "tokens": 6}]
    assert sweep_mod.range_loss(buckets, 0, 4) == pytest.approx(1.25)
    assert sweep_mod.range_loss(buckets, 4, 6) == pytest.approx(2.0)
    assert sweep_mod.range_loss(buckets, 0, 6) == pytest.approx(1.5)
    assert sweep_mod.range_loss(buckets, 6, 8) is None  # no position there


def test_position_ranges_are_cut_at_the_rungs_in_increasing_order():
    """--ladder=8,2 keeps its order, the ranges do not: T = 8 gets 0-2 and 2-8 (position i has loss i)."""
    import sweep as sweep_mod

    def rung(T):
        buckets = [{"start": i, "end": i + 1, "loss": float(i), "tokens": 2} for i in range(T)]
        row = {"label": "softmax", "n": 1, "seeds": [1], "loss_mean": [0.0], "loss_std": [0.0], "ratio_mean": 1.0,
               "ratio_std": 0.0}
        return {"T": T, "rows": [row], "runs": [{"label": "softmax", "seed": 1,
                                                 "results": [{"loss": (T - 1) / 2, "position_buckets": buckets}]}]}

    got = {x["T"]: [(p["start"], p["end"], p["loss"]) for p in x["by_position"]]
           for x in sweep_mod.ladder_summary([rung(8), rung(2)])}
    assert got == {8: [(0, 2, 0.5), (2, 8, 4.5)], 2: [(0, 2, 0.5)]}


def test_markdown_names_a_stacks_p_by_its_layers():
    """A stack's rows carry the config's top-level reweight_p (0), not what its layers compute: the table must not
    print it as the row's p."""
    import sweep
    row = {"label": "[3*softmax:window=16,lssar:pos=none]", "n": 1, "multipliers": [1, 2], "loss_mean": [1.8, 1.9],
           "loss_std": [0.0, 0.0], "ratio_mean": 1.05, "ratio_std": 0.0, "reweight_p": 0.0, "trained_reweight_p": 0.0,
           "pos": "layers"}
    plain = dict(row, label="lssar", pos="rope", reweight_p=15.0, trained_reweight_p=15.0)
    lines = sweep.markdown({"rows": [row, plain]}).splitlines()
    assert lines[2].startswith("| [3*softmax:window=16,lssar:pos=none] | per layer | 1 |"), lines[2]
    assert lines[3].startswith("| lssar | 15 | 1 |"), lines[3]
