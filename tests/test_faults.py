"""The fault matrix: no run is lost, mixed or silently changed. Two trainings racing for one out_dir, kill -9 at
any point of a save, SIGINT on an evaluation step, an --overwrite=True that fails or is killed, a resume with a
changed setting or without its config, data re-prepared with a vocabulary of the same size, a NaN loss, a full
disk, and paths and numbers that cannot work: each ends in one line (or works), and the previous checkpoint
always loads. Faults inside train.py are injected by DRIVER (train.py run with torch.save, os.fsync, os.replace
or the batch sampler patched to kill, interrupt or fail at a chosen point), so every case is deterministic."""

import csv
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import dataset
import options
import runs
from conftest import ROOT, run
from eval_length import evaluate

# dropout > 0: an exact resume also needs the RNG state
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=1",
        "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=20", "--dropout=0.1", "--device=cpu", "--attn=lssar",
        "--eval_interval=2", "--max_iters=8"]

DRIVER = r'''
import errno, io, os, random, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import dataset, torch

fault, at = os.environ["FAULT"], int(os.environ["FAULT_AT"])
real_save, real_fsync, real_replace, real_windows = torch.save, os.fsync, os.replace, dataset.random_windows
saves = 0  # ckpt.pt saves of this process


class Full:  # a disk that fills up after 1000 bytes
    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, b):
        self.n += len(b)
        if self.n > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def save(obj, f, *a, **k):
    global saves
    saves += os.path.basename(f.name).startswith("ckpt.pt")
    if saves == at and fault == "write":  # killed at a random byte of the temporary file
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:random.randrange(len(buf.getvalue()))])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, Full(f) if saves == at and fault == "enospc" else f, *a, **k)


def fsync(fd):
    if saves == at and fault == "fsync":  # written, not yet synced or renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)


def replace(src, dst):
    real_replace(src, dst)
    if saves == at and fault == "replace" and dst.endswith("ckpt.pt"):  # renamed, best.pt not yet written
        os.kill(os.getpid(), signal.SIGKILL)


def windows(parts, n, T, seed, it, *a):
    if it == at and fault in ("sigint", "sigkill"):  # during the step that makes iteration at + 1
        os.kill(os.getpid(), getattr(signal, fault.upper()))
    return real_windows(parts, n, T, seed, it, *a)


torch.save, os.fsync, os.replace, dataset.random_windows = save, fsync, replace, windows
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
'''


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "faulty_train.py"
    path.write_text(DRIVER)
    return path


def faulty(driver, fault, at, *args):
    """train.py with a fault injected (see DRIVER), as a finished process."""
    env = dict(os.environ, FAULT=fault, FAULT_AT=str(at))
    return subprocess.run([sys.executable, str(driver), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def rows(out):
    """log.csv without its timing column."""
    with open(out / "log.csv", newline="") as f:
        return [r[:5] for r in csv.reader(f)]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder):
    return {p.relative_to(folder): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(r):
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def fails_with(r, message):
    assert r.returncode not in (0, None), r.stdout[-2000:] + r.stderr[-2000:]
    assert message in last_line(r) and "Traceback" not in r.stderr, r.stderr[-3000:]


def run_all(cases):
    """{name: finished process} of {name: argv} run at once (as a user would, from the repo root)."""
    def one(item):
        name, argv = item
        try:
            return name, subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            return name, subprocess.CompletedProcess(e.cmd, None, "", f"timed out after {e.timeout} s")
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, cases.items()))


def same_weights(a, b):
    wa, wb = (torch.load(p / "ckpt.pt", weights_only=False)["model"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def ref(char_data, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal: 8 steps, evaluated and saved every 2."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run("train.py", f"--out_dir={out}", f"--data_dir={char_data}", *TINY)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Interruptions: kill -9 inside a save, SIGINT on an evaluation step, then a resume without any of the run's settings


def test_kills_inside_saves_and_sigint_on_an_eval_step_resume_exactly(driver, char_data, ref, tmp_path):
    out = tmp_path / "run"
    args = [f"--out_dir={out}", f"--data_dir={char_data}", *TINY]
    resume = [*args, "--init_from=resume"]
    # killed at a random byte of its second save (iteration 4): the first (iteration 2) loads, the partial file stays
    r = faulty(driver, "write", 2, *args)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert runs.load_checkpoint(str(out))["iter_num"] == 2
    (partial,) = out.glob("ckpt.pt.tmp*")
    # resumed, killed after writing the next save, before its fsync: the start removed the last partial file and took
    # over the lock the killed process left behind
    r = faulty(driver, "fsync", 1, *resume)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "removed 1 temporary file(s) of interrupted saves" in r.stdout and not partial.exists()
    assert "taking over the lock file of a training that is no longer running" in r.stdout
    assert runs.load_checkpoint(str(out))["iter_num"] == 2
    # killed right after ckpt.pt was renamed into place (best.pt not yet written): the new one loads
    r = faulty(driver, "replace", 1, *resume)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert runs.load_checkpoint(str(out))["iter_num"] == 4
    # SIGINT during the step that makes iteration 6, an evaluation step: saved before that evaluation, exit 130
    r = faulty(driver, "sigint", 5, *resume)
    assert r.returncode == 128 + signal.SIGINT and "saved checkpoint at iteration 6" in r.stdout, r.stderr
    # the resume names nothing but the folder: data, model, batch, schedule and seed come from the checkpoint, the
    # evaluation at iteration 6 is redone, and the run ends as the uninterrupted one did, row by row and bit by bit
    r = run("train.py", f"--out_dir={out}", "--init_from=resume")
    assert "resume: from the checkpoint's config:" in r.stdout
    assert rows(out) == rows(ref) and same_weights(out, ref)
    assert not list(out.glob("*.tmp*")) and not (out / runs.LOCK_FILE).exists()


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(driver, char_data, tmp_path):
    out = tmp_path / "run"
    r = faulty(driver, "enospc", 2, f"--out_dir={out}", f"--data_dir={char_data}", *TINY)
    fails_with(r, "No space left on device")
    assert "the previous ckpt.pt is kept" in last_line(r) and "--init_from=resume" in last_line(r)
    assert runs.load_checkpoint(str(out))["iter_num"] == 2 and not list(out.glob("*.tmp*"))


def test_save_checkpoint_disk_full_in_process(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    runs.save_checkpoint({"iter_num": 1}, str(path))
    good = digest(path)
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, b):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def fileno(self):
            return self.f.fileno()

    monkeypatch.setattr(runs, "open", lambda p, mode="r": Full(real_open(p, mode)), raising=False)
    with pytest.raises(SystemExit, match="No space left on device.*previous ckpt.pt is kept") as e:
        runs.save_checkpoint({"iter_num": 2, "w": torch.zeros(1000)}, str(path))
    assert "\n" not in str(e.value.code)
    assert digest(path) == good and os.listdir(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------------------------------------------
# Ownership: a lock on out_dir; --overwrite=True keeps the old run until the new one has a checkpoint


def test_two_trainings_race_for_one_out_dir(char_data, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "train.py", f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--max_iters=100000",
            "--eval_interval=100000"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        t0 = time.time()
        while all(p.poll() is None for p in procs) and time.time() - t0 < 40:
            time.sleep(0.05)
        loser = next((p for p in procs if p.poll() is not None), None)
        assert loser is not None, "both trainings ran on in the same out_dir"
        winner = procs[1 - procs.index(loser)]
        while winner.poll() is None and not ((out / "log.csv").exists() and ["3", "train"] in [r[:2] for r in rows(out)]):
            time.sleep(0.05)
        winner.send_signal(signal.SIGTERM)
        _, lost = loser.communicate(timeout=60)
        _, won = winner.communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    line = lost.strip().splitlines()[-1]
    assert loser.returncode == 1 and "is in use by another training" in line and f"PID {winner.pid} " in line, lost
    assert winner.returncode == 128 + signal.SIGTERM, won
    iters = [int(r[0]) for r in rows(out)[1:] if r[1] == "train"]
    assert iters == list(range(1, len(iters) + 1)) and iters  # one run's log, not two interleaved
    assert runs.load_checkpoint(str(out))["iter_num"] == iters[-1] and not (out / runs.LOCK_FILE).exists()


def test_overwrite_that_fails_or_is_killed_keeps_the_old_run(driver, char_data, ref, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    before = snapshot(out)
    args = [f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--overwrite=True"]
    # the new run diverges at step 2, before its first checkpoint: the old run is back, as it was
    r = run("train.py", *args, "--learning_rate=1e30", "--grad_clip=0", "--decay_lr=False", "--eval_interval=100",
            check=False)
    fails_with(r, "non-finite training loss at step 2")
    assert snapshot(out) == before
    # killed (kill -9) during its second step, before its first checkpoint: the next start puts the old run back
    r = faulty(driver, "sigkill", 1, *args)
    assert r.returncode == -signal.SIGKILL and (out / runs.ASIDE / "ckpt.pt").exists(), r.stderr
    r = run("train.py", f"--out_dir={out}", "--init_from=resume")
    assert "restored the run that an interrupted --overwrite=True had moved" in r.stdout
    assert rows(out) == rows(ref) and same_weights(out, ref) and not (out / runs.ASIDE).exists()
    # a replacement that saves a checkpoint: the old run is gone, only the new one is there
    run("train.py", *args, "--max_iters=2")
    assert runs.load_checkpoint(str(out))["iter_num"] == 2 and not (out / runs.ASIDE).exists()
    assert [r[0] for r in rows(out)[1:]] == ["0", "1", "2", "2"]


def test_eval_only_reads_the_run_and_writes_nothing(ref, char_data, tmp_path):
    before = snapshot(ref)
    res = run_all({"run": ["train.py", f"--out_dir={ref}", f"--data_dir={char_data}", *TINY, "--eval_only=True"],
                   "nothing": ["train.py", f"--out_dir={tmp_path / 'none'}", "--eval_only=True"],
                   "fine-tune": ["train.py", f"--out_dir={tmp_path / 'x'}", "--eval_only=True", f"--init_from={ref}"]})
    assert res["run"].returncode == 0, res["run"].stderr
    (line,) = [x for x in res["run"].stdout.splitlines() if x.startswith("step ")]
    logged = float([r for r in rows(ref) if r[1] == "eval"][-1][3])
    assert line.startswith("step 8: ") and abs(float(line.split("val loss ")[1]) - logged) < 1e-4  # the run's model
    assert snapshot(ref) == before  # its log, checkpoints and folder untouched, no lock file left
    fails_with(res["nothing"], "checkpoint not found")
    fails_with(res["fine-tune"], f"pass --out_dir={ref} instead of --init_from")
    assert not (tmp_path / "none").exists() and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# Resume is the checkpoint's run


def test_resume_refuses_a_changed_setting_and_takes_the_safe_ones(ref, char_data, tmp_path):
    cases = {"batch_size": ["--batch_size=4"], "seed": ["--seed=1"], "learning_rate": ["--learning_rate=0.01"],
             "config file": ["config/train_shakespeare_char.py"],  # the demo's settings, not this run's
             "safe": ["--max_iters=8", "--eval_interval=4", "--log_interval=3", "--device=cpu", "--compile=False",
                      "--attn_chunk=128", "--attn_backend=math", "--always_save_checkpoint=False"]}
    out = {name: tmp_path / name.replace(" ", "_") for name in cases}  # one copy each: a resume locks its run
    for d in out.values():
        shutil.copytree(ref, d)
    before = snapshot(ref)
    res = run_all({name: ["train.py", *[a for a in args if a.endswith(".py")], *TINY, *[a for a in args if a[:2] == "--"],
                          f"--out_dir={out[name]}", f"--data_dir={char_data}", "--init_from=resume"]
                   for name, args in cases.items()})
    fails_with(res["batch_size"], f"batch_size=4 was given but the run in {out['batch_size']} was trained with batch_size=8")
    fails_with(res["seed"], "seed=1 was given but the run in")
    fails_with(res["learning_rate"], "learning_rate=0.01 was given but the run in")
    fails_with(res["config file"], "learning_rate=0.002 was given but the run in")
    assert res["safe"].returncode == 0 and "already at iteration 8" in res["safe"].stdout, res["safe"].stderr
    assert all(snapshot(d) == before for d in out.values())


# ----------------------------------------------------------------------------------------------------------------
# Data identity


def copy_run(src, dst, data_dir):
    """A copy of run src whose checkpoint names data_dir as its data (as if it had been trained there)."""
    shutil.copytree(src, dst)
    ck = torch.load(dst / "ckpt.pt", weights_only=False)
    ck["config"]["data_dir"] = str(data_dir)
    torch.save(ck, dst / "ckpt.pt")
    return dst


def test_data_swapped_for_a_same_size_vocabulary(ref, char_data, corpus_file, tmp_path):
    from data.shakespeare_char.prepare import prepare
    from diagnose import diagnose

    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    run_dir = copy_run(ref, tmp_path / "run", data)
    evaluate([(str(run_dir), {})], lengths="32", tokens=640, device="cpu")  # its data, as it was: evaluated
    # re-prepared from another text with the same characters and length: same vocabulary, same sizes, other tokens
    reversed_text = tmp_path / "reversed.txt"
    reversed_text.write_text(corpus_file.read_text()[::-1])
    prepare(str(reversed_text), str(data))
    with open(data / "meta.pkl", "rb") as f, open(char_data / "meta.pkl", "rb") as g:
        assert pickle.load(f) == pickle.load(g)
    assert (data / "val.bin").stat().st_size == (char_data / "val.bin").stat().st_size
    with pytest.raises(SystemExit, match="data mismatch: the val split.*--allow_other_data=True"):
        evaluate([(str(run_dir), {})], lengths="32", tokens=640, device="cpu")
    with pytest.raises(SystemExit, match="diagnose error: data mismatch"):
        diagnose([str(run_dir)], lengths="32", n_windows=1, device="cpu")
    # evaluating on it on purpose: allowed, and the results say which data they are of
    res = evaluate([(str(run_dir), {})], lengths="32", tokens=640, device="cpu", allow_other_data=True)
    rec = res["runs"][0]["data"]
    assert rec["trained_on"] == "other" and rec["dir"] == str(data) and rec["val"] == dataset.split_id(
        dataset.load_split("x", "val", str(data)))
    # the same size but other characters: refused everywhere, even with --allow_other_data
    other = tmp_path / "other_vocab"
    shutil.copytree(char_data, other)
    with open(other / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    a, b = meta["itos"][10], meta["itos"][11]
    meta["itos"][10], meta["itos"][11], meta["stoi"][a], meta["stoi"][b] = b, a, 11, 10
    with open(other / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    swapped = copy_run(ref, tmp_path / "swapped", other)
    with pytest.raises(SystemExit, match="vocab mismatch: .* the same size but other tokens"):
        evaluate([(str(swapped), {})], lengths="32", tokens=640, device="cpu", allow_other_data=True)
    before = snapshot(run_dir)
    res = run_all({"resume": ["train.py", f"--out_dir={run_dir}", "--init_from=resume", "--max_iters=10"],
                   "sample": ["sample.py", f"--out_dir={swapped}", "--max_new_tokens=5", "--num_samples=1"]})
    fails_with(res["resume"], "resume error: data mismatch: the train and val split(s)")
    fails_with(res["sample"], "sample error: vocab mismatch")
    assert snapshot(run_dir) == before
    res = evaluate([(str(ref), {})], lengths="32", tokens=640, device="cpu")  # its own data: recorded as such
    assert res["runs"][0]["data"]["trained_on"] == "same" and res["runs"][0]["data"]["dir"] == str(char_data)


# ----------------------------------------------------------------------------------------------------------------
# One line before any work: paths, encodings, token ids, counts, NaN losses, sweeps


@pytest.fixture(scope="module")
def cases(char_data, ref, corpus_file, tmp_path_factory):
    """Every one-line case, run at once: {name: (finished process, what its last stderr line must say)}."""
    tmp = tmp_path_factory.mktemp("faults")
    file = tmp / "a_file"
    file.write_text("not a folder\n")
    # two train shards; the second holds an id past the vocabulary, beyond any prefix of the first
    shards = tmp / "shards"
    shards.mkdir()
    dataset.write_shard(shards / "toy_train_000000.bin", np.arange(5000) % 50)
    dataset.write_shard(shards / "toy_train_000001.bin", np.r_[np.arange(3000) % 50, 77, np.arange(500) % 50])
    dataset.write_shard(shards / "toy_val_000000.bin", np.arange(2000) % 50)
    with open(shards / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 50}, f)
    # a run whose weights are NaN
    nan_run = tmp / "nan_run"
    shutil.copytree(ref, nan_run)
    ck = torch.load(nan_run / "ckpt.pt", weights_only=False)
    ck["model"]["lm_head.weight" if "lm_head.weight" in ck["model"] else next(iter(ck["model"]))].fill_(float("nan"))
    torch.save(ck, nan_run / "ckpt.pt")
    sweep = lambda root: ["sweep.py", f"--out_root={root}", f"--data_dir={root}_data", f"--input={corpus_file}",
                          f"--results={root}/res", "--device=cpu", "--max_iters=2", "--eval_tokens=256",
                          "--multipliers=1", "--train_args=--n_layer=1 --n_embd=16 --batch_size=2 --eval_iters=1"]
    train = ["train.py", f"--data_dir={char_data}", *TINY]
    spec = {
        "train out_dir is a file": ([*train, f"--out_dir={file}"], "is a file; pass a folder"),
        "train out_dir under a file": ([*train, f"--out_dir={file}/run"], f"cannot be created: {file} is a file"),
        "eval_length out under a file": (["eval_length.py", f"--ckpts={ref}", f"--out={file}/res/ev"],
                                         "cannot be created"),
        "diagnose out under a file": (["diagnose.py", f"--ckpts={ref}", f"--out={file}/diag"], "cannot be created"),
        "eval_passkey out under a file": (["eval_passkey.py", f"--ckpts={ref}", f"--out={file}/pk"], "cannot be created"),
        "bench out under a file": (["bench.py", "--quick", f"--out={file}/bench"], "cannot be created"),
        "bench repeats 0": (["bench.py", "--quick", "--repeats=0", f"--out={tmp}/b0"],
                            "repeats=0 is out of range; set --repeats to a number in [1, 100]"),
        "bench lengths 0": (["bench.py", "--lengths=0", f"--out={tmp}/b1"], "lengths must be integers in [1, 1048576]"),
        "sample unbounded": (["sample.py", f"--out_dir={ref}", "--max_new_tokens=1000000000"],
                             "set --max_new_tokens to a number in [1, 100000]"),
        "token id past the vocabulary in the second shard": (
            ["train.py", "--dataset=toy", f"--data_dir={shards}", f"--out_dir={tmp}/toy", *TINY],
            "holds token id 77 (part 2 of 2, token 3,000) but its vocabulary has 50 tokens"),
        "NaN loss": (["eval_length.py", f"--ckpts={nan_run}", "--lengths=32", f"--out={tmp}/nan/ev"],
                     "nan_run (" + str(nan_run) + ") at length 32: the loss is nan"),
        "sweep typo in the second run": ([*sweep(tmp / "sweep"), "--runs=softmax,lssa:n_layr=2"],
                                         "run 'lssa n_layr=2' seed 1337: config error: unknown key 'n_layr'"),
        "sweep run that fails": ([*sweep(tmp / "sweep2"), "--runs=softmax", "--train_args=--block_size=100000 --n_layer=1"],
                                 "too few for windows of block_size+1=100001; lower --block_size"),
    }
    watch = {name: tmp / sub for name, sub in (("bench repeats 0", "b0.json"), ("NaN loss", "nan"),
                                               ("token id past the vocabulary in the second shard", "toy"))}
    done = run_all({name: argv for name, (argv, _) in spec.items()})
    return {name: (done[name], message, watch.get(name)) for name, (_, message) in spec.items()}, tmp


CASE_NAMES = ["train out_dir is a file", "train out_dir under a file", "eval_length out under a file",
              "diagnose out under a file", "eval_passkey out under a file", "bench out under a file", "bench repeats 0",
              "bench lengths 0", "sample unbounded", "token id past the vocabulary in the second shard", "NaN loss",
              "sweep typo in the second run", "sweep run that fails"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_line(cases, name):
    results, tmp = cases
    r, message, nothing_there = results[name]
    fails_with(r, message)
    assert nothing_there is None or not nothing_there.exists()  # no results, data or run folder written
    if name.endswith("out under a file"):
        assert "eval_length" not in r.stderr and "diagnose:" not in r.stderr  # refused before any progress bar
    if name == "sweep typo in the second run":
        assert not (tmp / "sweep").exists() and not (tmp / "sweep_data").exists()  # nothing trained, nothing prepared


def test_run_folder_obstacles_are_one_line(char_data, ref, tmp_path):
    """Folders where a run keeps its files (log.csv, a save's temporary file) stop a fresh run and a resume in one
    line naming the folder, before anything is changed; readers name what a folder holds instead of a checkpoint (the
    previous run an interrupted --overwrite left aside, or only best.pt)."""
    fresh = tmp_path / "fresh"
    (fresh / "log.csv").mkdir(parents=True)
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "log.csv").unlink()
    (resumed / "log.csv").mkdir()
    tmpdir = tmp_path / "tmpdir"
    shutil.copytree(ref, tmpdir)
    (tmpdir / "ckpt.pt.tmp123").mkdir()
    aside = tmp_path / "aside"  # what a kill -9 between --overwrite's move and the new run's first save leaves
    (aside / runs.ASIDE).mkdir(parents=True)
    shutil.copy(ref / "ckpt.pt", aside / runs.ASIDE / "ckpt.pt")
    best = tmp_path / "best"
    best.mkdir()
    shutil.copy(ref / "best.pt", best / "best.pt")
    before = {d: snapshot(d) for d in (fresh, resumed, tmpdir, aside, best)}
    train = ["train.py", f"--data_dir={char_data}", *TINY]
    res = run_all({"fresh": [*train, f"--out_dir={fresh}"],
                   "resume": [*train, f"--out_dir={resumed}", "--init_from=resume"],
                   "tmp dir": [*train, f"--out_dir={tmpdir}", "--init_from=resume"],
                   "aside": ["eval_length.py", f"--ckpts={aside}", f"--out={tmp_path / 'r1' / 'ev'}"],
                   "best": ["eval_length.py", f"--ckpts={best}", f"--out={tmp_path / 'r2' / 'ev'}"]})
    fails_with(res["fresh"], f"{fresh / 'log.csv'} is a folder where the run keeps its log.csv file")
    fails_with(res["resume"], f"{resumed / 'log.csv'} is a folder where the run keeps its log.csv file")
    fails_with(res["tmp dir"], "ckpt.pt.tmp123 is a folder named like the temporary file of an interrupted save")
    fails_with(res["aside"], f"an interrupted --overwrite=True left the previous run in {aside / runs.ASIDE}")
    fails_with(res["best"], f"holds best.pt (the best evaluation's weights): pass {best / 'best.pt'}")
    assert {d: snapshot(d) for d in before} == before  # nothing changed, nothing left (no log.csv.tmp, no lock)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_prepare_scripts_check_their_input_and_output_first(char_data, corpus_file, tmp_path):
    """What the prepare scripts' command lines call (their one-line errors are what the user sees)."""
    from data.fineweb.prepare import prepare as fineweb
    from data.passkey_char.prepare import prepare as passkey
    from data.shakespeare.prepare import prepare as bpe
    from data.shakespeare_char.prepare import prepare as char

    file = tmp_path / "a_file"
    file.write_text("not a folder\n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\u00e9 au lait, na\u00efve.\n".encode("latin-1") * 50)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("abc\n")
    cases = [
        (lambda: char(str(corpus_file), f"{file}/data"), f"out_dir='{file}/data' cannot be created: {file} is a file"),
        (lambda: bpe(str(corpus_file), f"{file}/data", "tiny_bpe"), "cannot be created"),
        (lambda: fineweb(local=[str(corpus_file)], out_dir=f"{file}/data"), "cannot be created"),
        (lambda: passkey(str(char_data), f"{tmp_path}/pk", n_train=0), "n_train=0 is out of range"),
        (lambda: char(str(latin), f"{tmp_path}/l1"), "is not UTF-8 text (byte 0xe9 at offset 3"),
        (lambda: char(str(tmp_path / "empty.txt"), f"{tmp_path}/e"), "is empty: there is nothing to prepare"),
        (lambda: char(str(tmp_path / "short.txt"), f"{tmp_path}/s"), "gives 3 train and 1 val tokens"),
    ]
    for call, message in cases:
        with pytest.raises(SystemExit) as e:
            call()
        assert message in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    assert sorted(os.listdir(tmp_path)) == ["a_file", "empty.txt", "latin1.txt", "short.txt"]  # nothing written


def test_diagnose_vocab_mismatch_is_one_line(tmp_path):
    from test_eval_length import make_run

    from diagnose import diagnose

    d, val = make_run(tmp_path)  # a checkpoint of 23 tokens, its val.bin rewritten with ids past them
    np.full(len(val), 40, dtype=np.uint16).tofile(tmp_path / "data" / "val.bin")
    with pytest.raises(SystemExit, match="diagnose error: vocab mismatch: .* has 23 tokens but its validation data "
                                         "holds token id 40") as e:
        diagnose([d], multipliers="1", n_windows=1, device="cpu")
    assert "\n" not in str(e.value.code)


def test_configure_collects_the_keys_it_was_given(tmp_path):
    from configurator import configure, script_defaults

    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 12\nseed = batch_size + 1\n")  # batch_size as the default: given all the same
    g, given = dict(script_defaults(os.path.join(ROOT, "train.py"))), set()
    configure(g, [str(cfg), "--max_iters=7"], given=given)
    assert given == {"batch_size", "seed", "max_iters"} and g["seed"] == 13 and g["max_iters"] == 7


def test_writable_dir(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    assert options.writable_dir(str(tmp_path / "new" / "deeper"), "out_dir") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["f"]  # checked, nothing left behind
    for path, message in ((file, "is a file"), (file / "sub", f"cannot be created: {file} is a file")):
        with pytest.raises(SystemExit, match=message):
            options.writable_dir(str(path), "out_dir")
    (tmp_path / "res.json").mkdir()
    with pytest.raises(SystemExit, match="which is a folder"):
        options.writable_prefix(str(tmp_path / "res"), "out")
