"""The training numerics, pinned: each demo attention (and each family) trained for a few steps from a fixed seed
on the test corpus, through train.py as a user runs it; its per-step training losses are compared with the values
committed in tests/numerics_pin.json (tests/test_numerics_pin.py). A change to model.py, kernels/, train.py or the
data path that alters what training computes fails there, and has to update the pins on purpose:

    python tests/pin_numerics.py            # rewrite tests/numerics_pin.json from today's code
    python tests/pin_numerics.py --check    # compare, printing the largest difference per run

TOLERANCE is what the same code moves between 1 and 2 threads (measured by `--threads`, which trains every run
with OMP_NUM_THREADS=1 and =2 and prints the largest difference), times a margin for other CPUs' kernels."""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PIN_FILE = os.path.join(ROOT, "tests", "numerics_pin.json")
# every attention of the demo grid, as train.py arguments (the quick start's and the families')
RUNS = {
    "softmax": ["--attn=softmax"], "lssa": ["--attn=lssa"], "lssar": ["--attn=lssar"], "ssmax": ["--attn=ssmax"],
    "sigmoid": ["--attn=sigmoid"], "relu": ["--attn=relu"], "ssmax_learn": ["--attn=ssmax_learn"],
    "sigmoid_l1": ["--attn=sigmoid_l1"], "alibi": ["--attn=softmax", "--pos=alibi"],
    "fox": ["--attn=softmax", "--gate=forget", "--pos=none"], "stickbreak": ["--attn=stickbreak", "--pos=none"],
    "lssar_gate": ["--attn=lssar", "--gate=forget"],
}
STEPS = 8
# a small model with the demo's shape of training (AdamW, warmup, cosine decay) and the demo's lr: 8 steps take
# about 2 s each run on 2 cores
ARGS = ["config/train_shakespeare_char.py", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", f"--max_iters={STEPS}", f"--lr_decay_iters={STEPS}", "--warmup_iters=2",
        f"--eval_interval={STEPS}", "--eval_iters=1", "--log_interval=100", "--device=cpu", "--seed=7"]
# largest |difference| of a training loss allowed: 1 vs 2 threads moved them by up to 1.4e-6 (`--threads`, 2 cores,
# 2026-12-04: LSSAR with the gate; 0 to 7e-7 for the others), x35 for other CPUs' vector kernels. A change in what is
# computed moves them by far more: reweight_p 14 instead of 15 by 5e-3, a window that hides key 0 from the last row
# only by 1e-3 (tests/test_numerics_pin.py checks the first).
TOLERANCE = 5e-5


def corpus_data(d):
    """The test corpus (tests/conftest.py's make_corpus), prepared char-level into d."""
    from tests.conftest import make_corpus
    os.makedirs(d, exist_ok=True)
    text = os.path.join(d, "input.txt")
    with open(text, "w", encoding="utf-8", newline="\n") as f:
        f.write(make_corpus())
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py", "--input", text, "--out_dir", d], cwd=ROOT,
                   check=True, capture_output=True)
    return d


def train_losses(name, data_dir, work, threads=None):
    """The STEPS training losses of one run, as train.py writes them to log.csv (repr of the float)."""
    out = os.path.join(work, name + (f"-t{threads}" if threads else ""))
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    r = subprocess.run([sys.executable, "train.py", *ARGS, *RUNS[name], f"--data_dir={data_dir}", f"--out_dir={out}"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{name}: train.py failed: {r.stderr[-2000:]}")
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return [float(row[2]) for row in csv.reader(f) if row[1] == "train"]


def all_losses(names=RUNS, threads=None):
    with tempfile.TemporaryDirectory() as work:
        data = corpus_data(os.path.join(work, "data"))
        return {n: train_losses(n, data, work, threads) for n in names}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the pins instead of rewriting them")
    ap.add_argument("--threads", action="store_true", help="measure what 1 vs 2 threads move")
    a = ap.parse_args()
    if a.threads:
        one, two = all_losses(threads=1), all_losses(threads=2)
        diff = {n: max(abs(x - y) for x, y in zip(one[n], two[n], strict=True)) for n in RUNS}
        print(json.dumps(diff, indent=1), "\nlargest:", max(diff.values()))
        return
    got = all_losses()
    if a.check:
        with open(PIN_FILE) as f:
            pins = json.load(f)["losses"]
        for n in RUNS:
            print(f"{n:12s} {max(abs(x - y) for x, y in zip(got[n], pins[n], strict=True)):.3g}")
        return
    with open(PIN_FILE, "w") as f:
        json.dump({"command": "python tests/pin_numerics.py", "steps": STEPS, "args": ARGS, "runs": RUNS,
                   "losses": got}, f, indent=1)
    print(f"wrote {PIN_FILE}")


if __name__ == "__main__":
    main()
