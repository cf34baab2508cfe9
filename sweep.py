"""
The repo's main job in one command: train every attention variant of the CPU demo (identical except the
attention: same model, seed and data order), then evaluate them all at 1x..16x the training context into one
table and two plots.

    python sweep.py                                  # prepare data if missing, train what is missing, evaluate
    python sweep.py --retrain=True                   # retrain even where a finished checkpoint exists
    python sweep.py --variants=softmax,lssar --max_iters=300 --results=results/quick/sweep

A run whose checkpoint is finished is skipped; an interrupted one is resumed from its checkpoint.
Writes <results>.json/.csv/.md and <results>.png, <results>_detail.png.
"""

import os
import subprocess
import sys

from tqdm import tqdm

from common import ROOT, data_dir_for, load_checkpoint, parse_list
from configurator import configure
from eval_length import table, write_results
from model import attn_names, demo_runs

# -----------------------------------------------------------------------------
variants = ",".join(demo_runs())  # every attention of model.py's registry that is in the CPU demo
eval_reweight = "lssa"   # also evaluate these variants with re-weighting p=15 switched on at evaluation only
eval_p = 15.0
retrain = False
max_iters = 0            # 0 = the config's; > 0 overrides it for every variant (quick runs)
train_args = ""          # extra --key=value overrides for train.py, space separated
out_root = "."           # checkpoints go to <out_root>/out-shakespeare-char-<variant>
input = ""               # a local copy of Tiny Shakespeare's input.txt (else $TINYSHAKESPEARE_PATH, else download)
data_dir = ""            # default: data/shakespeare_char
multipliers = "1,2,4,8,16"
eval_tokens = 32768      # validation tokens per length (the same at every length); 0 = all that fit
device = "auto"
results = "results/shakespeare_char/sweep"
# -----------------------------------------------------------------------------


def ensure_data():
    d = data_dir_for("shakespeare_char", data_dir)
    if os.path.exists(os.path.join(d, "train.bin")) and os.path.exists(os.path.join(d, "val.bin")):
        return
    print(f"preparing Tiny Shakespeare (char-level) in {d}")
    from data.shakespeare_char.prepare import prepare
    prepare(input or None, d)


def finished(out_dir):
    """The checkpoint's iteration, and whether it reached the target (the config's or --max_iters)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None, False
    ck = load_checkpoint(path)
    target = max_iters or ck["config"]["max_iters"]
    return ck["iter_num"], ck["iter_num"] >= target


def train(variant, out_dir, resume):
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--attn={variant}", f"--out_dir={out_dir}",
           f"--device={device}", *([f"--data_dir={data_dir}"] if data_dir else []),
           *([f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}"] if max_iters else []),
           *(["--init_from=resume"] if resume else []), *(["--overwrite=True"] if retrain else []),
           *train_args.split()]
    log_path = os.path.join(out_dir, "train_stdout.txt")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log, tqdm(desc=f"train {variant}", unit="it", file=sys.stderr) as bar:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("iter "):  # "iter 50/1000: loss ..." drives the bar
                done, total = line.split(":")[0].split()[1].split("/")
                bar.total = int(total)
                bar.n = int(done)
                bar.set_postfix_str(line.split(",")[0].split(": ")[1])
            elif line.startswith("step "):
                bar.write(f"  {variant} {line.strip()}")
        if proc.wait() != 0:
            raise SystemExit(f"training {variant} failed (exit {proc.returncode}); see {log_path}")


def main():
    configure(globals())
    ensure_data()
    names = parse_list(variants)
    bad = [v for v in names if v not in attn_names()]
    if bad:
        raise SystemExit(f"sweep error: unknown variants {', '.join(bad)}; choose from {', '.join(attn_names())}")
    specs = []
    for v in tqdm(names, desc="sweep: train", unit="variant", file=sys.stderr):
        out_dir = os.path.join(out_root, f"out-shakespeare-char-{v}")
        it, done = finished(out_dir)
        if done and not retrain:
            tqdm.write(f"{v}: finished checkpoint at iter {it} in {out_dir}, skipped (--retrain=True to redo)")
        else:
            train(v, out_dir, resume=(it is not None and not retrain))
        specs.append((out_dir, "ckpt"))
        if v in parse_list(eval_reweight):
            specs.append((out_dir, eval_p))
    from eval_length import evaluate
    res = evaluate(specs, multipliers=multipliers, tokens=eval_tokens, device=device)
    for r in res["runs"]:
        r["label"] = r["label"].removeprefix("shakespeare-char-")
    print(table(res))
    paths = write_results(res, results, "python " + " ".join(sys.argv))
    with open(results + ".md", "w") as f:
        f.write(markdown(res))
    for p in [*paths, results + ".md"]:
        print(f"wrote {p}")


def markdown(res):
    """The measured table as markdown, for the README."""
    mults = [x["multiplier"] for x in res["runs"][0]["results"]]
    head = "| attention | p (train -> eval) | " + " | ".join(f"{m:g}x" for m in mults) + " | last / 1x |"
    rows = [head, "|" + "---|" * (len(mults) + 3)]
    for r in res["runs"]:
        losses = [x["loss"] for x in r["results"]]
        p = f"{r['trained_reweight_p']:g}" + (f" -> {r['reweight_p']:g}" if r["reweight_p"] != r["trained_reweight_p"] else "")
        rows.append(f"| {r['label']} | {p} | " + " | ".join(f"{x:.3f}" for x in losses) + f" | {losses[-1] / losses[0]:.2f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
