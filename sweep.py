"""
The repo's main job in one command: train attention variants of the CPU demo (identical except the attention:
same model, data order and schedule), over seeds and settings, then evaluate them all at 1x..16x the training
context into one table and two plots, with mean +- std over seeds.

    python sweep.py                                    # the quick start: the registry's demo attentions, one seed
    python sweep.py --seeds=1337,1,2 --runs=...        # a grid (README: the exact command of the committed one)
    python sweep.py --runs=softmax,lssar --grid="reweight_p=3,15" --max_iters=300 --results=results/quick/sweep
    python sweep.py --input=my.txt --data_dir=data/my_char --results=results/my/sweep   # any text, char-level
    python sweep.py --replot=results/shakespeare_char/grid.json   # redraw the plots of a committed sweep

A run is an attention name of model.py's registry, optionally with train.py overrides after colons:
`lssar:pos=none`, `softmax:reweight_p=15`. --grid crosses every run with settings ("key=v1,v2;key2=..."),
--seeds with seeds. Evaluation-time settings (--eval_extra: `run+key=value` items, e.g. `softmax+rope_scaling=yarn`,
`lssar:pos=none+logn_scale=true`: a run as written in --runs, then settings) add evaluated rows of that run (and
of its grid settings) without retraining. A run whose checkpoint is finished is skipped; an
interrupted one is resumed. Writes <results>.json/.csv/.md and <results>.png, <results>_detail.png.

    python sweep.py --ladder=64,256,1024 --runs=softmax,lssar --seeds=1337,1 --results=results/x/ladder
A ladder trains every run at each context T (block_size T, batch_size ladder_tokens / T: the same tokens and steps
at every rung) and evaluates it at --multipliers x its own T: <results>.json/.csv/.md, <results>.png (last / first
length and the difference to softmax at the first, against T) and <results>_curves.png (each rung's curves).
The files are written after every rung (marked partial until the last): an interrupted ladder keeps its finished
rungs, and the same command continues it, reusing every evaluation whose checkpoint and settings are unchanged
(a seed added with --extra_seeds=run@T=seed costs that run's training and evaluation only).
"""

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
from tqdm import tqdm

from configurator import configure, script_defaults
from dataset import ROOT, data_dir_for
from eval_length import colour, eval_settings, evaluate, save_json, write_results
from model import GPTConfig, attn_names, demo_runs
from options import INVOCATION, check_range, parse_list, parse_numbers, pick_device, read_results, split_top, writable_prefix
from runs import load_checkpoint

# -----------------------------------------------------------------------------
runs = ",".join(demo_runs())  # attentions to train: model.py registry names, optionally name:key=value:...
grid = ""                # settings crossed with every run: "key=v1,v2;key2=w1,w2" (train.py keys)
seeds = "1337"           # training seeds (comma list); the config's default seed is 1337
eval_extra = "lssa+reweight_p=15"  # extra evaluated rows: run+key=value[+key=value], run as in --runs; keys:
                                   # reweight_p, rope_scaling, rope_factor, logn_scale, attn_dots
retrain = False
max_iters = 0            # 0 = the config's; > 0 overrides it for every run (with lr decay and a 10% warmup to match)
train_args = ""          # extra --key=value overrides for train.py, space separated
config = "config/train_shakespeare_char.py"
out_root = "."           # checkpoints go to <out_root>/out-<dataset>-<run>[-seed<seed>]
dataset = "shakespeare_char"
data_dir = ""            # default: data/<dataset>
input = ""               # a text file to prepare char-level data from when data_dir holds none (Tiny Shakespeare's
                         # input.txt by default: else $TINYSHAKESPEARE_PATH, else a download)
multipliers = "1,2,4,8,16"
eval_tokens = 32768      # validation tokens per length (the same at every length); 0 = all that fit
device = "auto"
results = "results/shakespeare_char/sweep"
replot = ""              # a sweep's (or ladder's) results .json: redraw its plots without training or evaluating
ladder = ""              # training contexts, e.g. "64,256,1024": every run trained at each context T (block_size T,
                         # batch_size ladder_tokens / T, the same steps) and evaluated at multipliers x its own T
ladder_tokens = 4096     # tokens per optimiser step at every rung of the ladder
extra_seeds = ""         # ladder: run@T=seed items, one more seed for one run at one rung (e.g. ssmax@1024=2)
evaluator = "length"     # length: loss at --multipliers x T (eval_length.py); retrieval: accuracy by key-query
                         # distance and length, and the text's loss (eval_retrieval.py; a retrieval dataset)
threads = 2              # CPU threads of each training run (OMP_NUM_THREADS, MKL_NUM_THREADS; 0 = torch's default): on
                         # a CPU the numbers depend on it (the order of the matmuls' sums), so a sweep reproduces its
                         # committed table only with the threads it was made with (results/*.md say which)
retrieval_lengths = "1,2,4,8,16"  # eval_retrieval's --lengths, --bins, --prompts, --distractors
retrieval_bins = "0,1,2,4,8,16"
retrieval_prompts = 40
retrieval_distractors = 4
# -----------------------------------------------------------------------------
EVAL_KEYS = ("reweight_p", "rope_scaling", "rope_factor", "logn_scale", "length_temp", "attn_dots")
# train.py keys the sweep sets for every run (and a ladder's rungs, and --max_iters's schedule): a run, the grid or
# --train_args that set one too would silently change what the row's name says
SWEEP_KEYS = ("attn", "layers", "seed", "out_dir", "device", "dataset", "data_dir", "init_from", "overwrite",
              "eval_only")
LADDER_KEYS = ("block_size", "batch_size")
SCHEDULE_KEYS = ("max_iters", "lr_decay_iters", "warmup_iters")


def parse_run(spec):
    """'lssar:pos=none:reweight_p=3' -> ('lssar', {'pos': 'none', 'reweight_p': '3'}), checked against the registry;
    '[3*softmax:window=16,softmax:pos=none]:learning_rate=1e-3' -> ('layers', {'layers': '3*softmax:...',
    'learning_rate': '1e-3'}): a stack with a spec per layer (model.parse_layers)."""
    if spec.startswith("["):
        if "]" not in spec or split_top(spec, ":")[0] != spec[:spec.rindex("]") + 1]:
            raise SystemExit(f"sweep error: {spec!r}: write a stack as [layers pattern] or [layers pattern]:key=value "
                             "(e.g. [3*softmax:window=16,softmax:pos=none])")
        name, kv, rest = "layers", {"layers": spec[1:spec.rindex("]")]}, spec[spec.rindex("]") + 1:]
        pairs = rest.split(":")[1:]
    else:
        name, *pairs = spec.split(":")
        kv = {}
        if name not in attn_names():
            raise SystemExit(f"sweep error: unknown attention {name!r} in {spec!r}; choose from {', '.join(attn_names())}")
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key or not value:
            raise SystemExit(f"sweep error: {spec!r}: write settings as name:key=value (e.g. lssar:pos=none)")
        if key in SWEEP_KEYS:
            raise SystemExit(f"sweep error: {spec!r} sets {key}, which the sweep sets for every run; name the attention "
                             "first (lssar:pos=none), a stack in brackets, and seeds with --seeds")
        kv[key] = value
    return name, kv


def run_label(name, kv):
    """A run's row name: its attention (or [layers pattern]) and its settings."""
    if name == "layers":
        return " ".join([f"[{kv['layers']}]", *(f"{k}={v}" for k, v in kv.items() if k != "layers")])
    return " ".join([name, *(f"{k}={v}" for k, v in kv.items())])


def expand_runs():
    """The (name, overrides, run as written) to train: every run crossed with every grid setting; duplicates are
    an error."""
    settings = [{}]
    for part in filter(None, (p.strip() for p in grid.split(";"))):
        key, eq, values = part.partition("=")
        if not eq or not parse_list(values):
            raise SystemExit(f"sweep error: --grid={grid!r}: write key=v1,v2;key2=w1,w2")
        if key.strip() in SWEEP_KEYS:
            raise SystemExit(f"sweep error: --grid sets {key.strip()}, which the sweep sets for every run; give attentions "
                             "in --runs and seeds in --seeds")
        settings = [s | {key.strip(): v} for s in settings for v in parse_list(values)]
    out = [(*parse_run(spec), spec) for spec in split_top(runs)]
    out = [(name, kv | s, spec) for name, kv, spec in out for s in settings]
    labels = [run_label(name, kv) for name, kv, _ in out]
    if not out or len(set(labels)) < len(labels):
        raise SystemExit(f"sweep error: runs must be a non-empty list without repeats, got {labels}")
    return out


def train_arg_keys():
    """The keys --train_args sets (each item --key=value or a bare --flag), checked against what the sweep and its
    runs set themselves: one of those would be overridden for every run while its row kept the name."""
    keys = []
    for item in train_args.split():
        if not item.startswith("--") or len(item) < 3 or item[2] == "=":
            raise SystemExit(f"sweep error: --train_args items are train.py's --key=value overrides, got {item!r}")
        keys.append(item[2:].partition("=")[0])
    return keys


def check_train_args(trained):
    """--train_args must not set what the sweep sets (attn, seed, out_dir, ...; a ladder's block_size and batch_size;
    --max_iters's schedule) nor what a run or the grid sets: refused in one line, before any training."""
    keys = train_arg_keys()
    own = set(SWEEP_KEYS) | set(LADDER_KEYS if ladder else ()) | set(SCHEDULE_KEYS if max_iters else ())
    for k in keys:
        if k in own:
            what = ("the ladder's rungs set it" if k in LADDER_KEYS else "--max_iters sets it" if k in SCHEDULE_KEYS else
                    "the sweep sets it for every run")
            raise SystemExit(f"sweep error: --train_args sets {k}, but {what}: the rows would be named for one setting "
                             f"and trained with another; drop --{k} from --train_args")
        for name, kv, _ in trained:
            if k in kv:
                raise SystemExit(f"sweep error: --train_args sets {k}, which run {run_label(name, kv)!r} sets itself; "
                                 "set it in one place (the run, --grid, or --train_args for all)")


def out_dir_for(name, kv, seed):
    tag = "".join(f"-{k}{v}" for k, v in kv.items() if k != "layers")
    if name == "layers":  # the pattern, in characters a folder name can hold
        name = "layers-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", kv["layers"])
    tag = re.sub(r"[/ ]", "_", tag)
    return os.path.join(out_root, f"out-{dataset.replace('_', '-')}-{name}{tag}" + ("" if seed == 1337 else f"-seed{seed}"))


def ensure_data():
    d = data_dir_for(dataset, data_dir)
    if os.path.exists(os.path.join(d, "train.bin")) and os.path.exists(os.path.join(d, "val.bin")):
        return
    if dataset in ("retrieval_char", "retrieval_char_curriculum"):  # the retrieval mixture, with its default settings
        print(f"preparing the retrieval mixture in {d}")  # (data/retrieval_char/prepare.py)
        from data.retrieval_char.prepare import prepare
        from retrieval import CURRICULUM
        return prepare(input or None, d, curriculum=CURRICULUM if dataset == "retrieval_char_curriculum" else 0)
    if dataset != "shakespeare_char" and not input:
        raise SystemExit(f"sweep error: no train.bin/val.bin in {d}; prepare {dataset} first, or pass --input=TEXT to "
                         "prepare char-level data from a text file")
    print(f"preparing char-level data in {d}")
    from data.shakespeare_char.prepare import prepare
    prepare(input or None, d)


_finished_seen = {}  # (path, size, mtime_ns) -> (iteration, the config's max_iters): each checkpoint read once


def finished(out_dir):
    """The checkpoint's iteration, and whether it reached the target (the config's or --max_iters)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None, False
    st = os.stat(path)
    seen = (path, st.st_size, st.st_mtime_ns)
    if seen not in _finished_seen:  # a checkpoint rewritten since (a new size or time) is read again
        ck = load_checkpoint(path)
        _finished_seen[seen] = ck["iter_num"], ck["config"]["max_iters"]
    it, config_iters = _finished_seen[seen]
    return it, it >= (max_iters or config_iters)


def train_argv(name, kv, seed, out_dir, resume):
    """train.py's arguments for one run."""
    schedule = [f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
                f"--warmup_iters={max(1, max_iters // 10)}"] if max_iters else []
    attention = [f"--attn={name}"] if name != "layers" else []  # a stack's layers come with its kv
    return [config, *attention, *(f"--{k}={v}" for k, v in kv.items()), f"--seed={seed}", f"--out_dir={out_dir}",
            f"--device={device}", f"--dataset={dataset}", *([f"--data_dir={data_dir}"] if data_dir else []), *schedule,
            *(["--init_from=resume"] if resume else []), *(["--overwrite=True"] if retrain else []), *train_args.split()]


def train_defaults():
    return script_defaults(os.path.join(ROOT, "train.py"))


def expected_config(name, kv, seed, defaults):
    """The config train.py builds for one run (its defaults, the config file, the overrides), without running it."""
    # config files are read from the repo root, where train.py runs
    argv = [a if a.startswith("--") or os.path.isabs(a) else os.path.join(ROOT, a)
            for a in train_argv(name, kv, seed, "out", False)]
    with contextlib.redirect_stdout(io.StringIO()):  # its "Overriding ..." lines
        return configure(dict(defaults), argv)


def check_runs(jobs):
    """Every run's train.py arguments read as train.py reads them and its model settings by GPTConfig, before any
    run trains: a typo in the last run stops here, in one line."""
    defaults = train_defaults()
    model_keys = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
    for (name, kv, _), seed in jobs:
        try:
            cfg = expected_config(name, kv, seed, defaults)
            GPTConfig(**{k: cfg[k] for k in model_keys}, vocab_size=256)
        except (SystemExit, ValueError) as e:
            why = e.code if isinstance(e, SystemExit) else f"config error: {e}"
            raise SystemExit(f"sweep error: run {run_label(name, kv)!r} seed {seed}: {why}") from None


# keys that say where or how a run is computed or logged, not what it trains (and max_iters, which `finished`
# compares): a checkpoint that differs only in these still is the run its row names
NOT_THE_RUN = (*INVOCATION, "device", "compile", "attn_backend", "attn_chunk", "attn_dots", "data_dir", "wandb_log",
               "wandb_project", "wandb_run_name", "eval_interval", "log_interval", "eval_iters", "always_save_checkpoint",
               "max_iters")


def verify_checkpoint(name, kv, seed, defaults):
    """The row's name comes from the checkpoint: its stored config must be what this run asks train.py for, in every
    key that defines a run (older checkpoints without a newer key count as its default). A checkpoint reused from
    another sweep (other --train_args, or edited) stops here with one line naming the key, both values and the fix."""
    out_dir = out_dir_for(name, kv, seed)
    stored = load_checkpoint(out_dir)["config"]
    want = expected_config(name, kv, seed, defaults)
    for k, v in want.items():
        if k in NOT_THE_RUN:
            continue
        have = stored.get(k, defaults.get(k))
        if have != v and not (isinstance(v, float) and isinstance(have, (int, float)) and float(have) == v):
            raise SystemExit(f"sweep error: {out_dir} holds a checkpoint trained with {k}={have!r}, but run "
                             f"{run_label(name, kv)!r} seed {seed} asks for {k}={v!r}: its row would carry the wrong "
                             f"name; retrain it (--retrain=True) or move {out_dir} away")


def train(name, kv, seed, out_dir, resume):
    cmd = [sys.executable, "train.py", *train_argv(name, kv, seed, out_dir, resume)]
    log_path = os.path.join(out_dir, "train_stdout.txt")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    label = f"{run_label(name, kv)} seed {seed}"
    tail = ""  # the run's last non-empty line: a failed run's error
    with open(log_path, "a") as log, tqdm(desc=f"train {label}", unit="it", file=sys.stderr) as bar:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            tail = line.strip() or tail
            if line.startswith("iter "):  # "iter 50/1000: loss ..." drives the bar
                done, total = line.split(":")[0].split()[1].split("/")
                bar.total, bar.n = int(total), int(done)
                bar.set_postfix_str(line.split(",")[0].split(": ")[1])
            elif line.startswith("step "):
                bar.write(f"  {label} {line.strip()}")
        if proc.wait() != 0:
            raise SystemExit(f"sweep error: training {label} failed (exit {proc.returncode}): {tail or 'no output'}; see "
                             f"{log_path}")


def eval_rows(trained):
    """(run index, eval-time overrides, row label) of every evaluated row: each run as trained, then --eval_extra's."""
    rows = [(i, {}, run_label(name, kv)) for i, (name, kv, _) in enumerate(trained)]
    for item in split_top(eval_extra):
        base, *pairs = item.split("+")
        kv = dict(p.partition("=")[::2] for p in pairs)
        if not pairs or any(k not in EVAL_KEYS or not v for k, v in kv.items()):
            raise SystemExit(f"sweep error: --eval_extra item {item!r}: write run+key=value with keys {', '.join(EVAL_KEYS)}")
        if base not in split_top(runs):
            print(f"sweep: --eval_extra item {item!r} left out: {base!r} is not one of --runs")
            continue
        # eval_length's own reading of these settings (values checked here, before any training)
        [ov] = eval_settings(**kv, prefix=f"sweep error: --eval_extra item {item!r}")
        for i, (name, run_kv, spec) in enumerate(trained):  # that run, with each of its grid settings
            if spec == base:
                rows.append((i, ov, run_label(name, run_kv) + " (eval " + ", ".join(f"{k}={v}" for k, v in kv.items()) + ")"))
    return rows


def aggregate(res, keys, labels):
    """Mean, std and n over seeds of every row's loss per length and of its last/first-length ratio."""
    by_row = {}
    for r, key in zip(res["runs"], keys, strict=True):
        by_row.setdefault(key, []).append(r)
    rows = []
    for key, rs in by_row.items():
        losses = np.array([[x["loss"] for x in r["results"]] for r in rs])  # (seeds, lengths)
        ratios = losses[:, -1] / losses[:, 0]
        std = (lambda a: a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1:]))
        rows.append({"label": labels[key], "n": len(rs), "seeds": [r["seed"] for r in rs],
                     "lengths": [x["length"] for x in rs[0]["results"]],
                     "multipliers": [x["multiplier"] for x in rs[0]["results"]],
                     "loss_mean": losses.mean(0).tolist(), "loss_std": std(losses).tolist(),
                     "ratio_mean": float(ratios.mean()), "ratio_std": float(std(ratios[:, None])[0]),
                     "attn": rs[0]["attn"], "reweight_p": rs[0]["reweight_p"],
                     "trained_reweight_p": rs[0]["trained_reweight_p"], "eval": rs[0]["eval"], "pos": rs[0]["pos"]})
    return rows


def parse_seeds(text, key):
    """A comma list of distinct whole seeds >= 0 (no empty items): one line naming the problem otherwise."""
    return parse_numbers(text, key, int, prefix="sweep error", example="1337,1,2", ok=lambda x: x >= 0,
                         what="whole numbers >= 0")


def check_options():
    """Every option of the sweep (its module's keys, as configure set them) parsed and range-checked, and every run's
    train.py arguments read as train.py reads them, before anything is prepared, trained or written: one line
    naming the fix otherwise. Returns the plan: ('ladder', seeds, rungs, plans) or ('sweep', trained, seeds of each
    run, rows)."""
    check_range({"max_iters": max_iters, "eval_tokens": eval_tokens}, 0, prefix="sweep error")
    check_range({"ladder_tokens": ladder_tokens}, 1, prefix="sweep error")
    check_range({"threads": threads}, 0, 1024, prefix="sweep error")
    trained = expand_runs()
    check_train_args(trained)
    seed_list = parse_seeds(seeds, "seeds")
    if extra_seeds and not ladder:
        raise SystemExit("sweep error: --extra_seeds adds a seed to one run at one rung of a ladder; pass --ladder, or "
                         "add the seed to --seeds")
    if evaluator not in ("length", "retrieval"):
        raise SystemExit(f"sweep error: evaluator={evaluator!r}; choose length (loss vs context length) or retrieval")
    if evaluator == "retrieval":
        if ladder:
            raise SystemExit("sweep error: --ladder evaluates loss vs length; use --evaluator=length with it")
        from eval_retrieval import parse_options
        parse_options(retrieval_lengths, retrieval_bins, retrieval_prompts, retrieval_distractors, 1, 0,
                      prefix="sweep error")
    pick_device(device)
    if not os.path.basename(results):
        raise SystemExit(f"sweep error: results names the result files without their extension, e.g. "
                         f"--results=results/x/sweep; got {results!r}")
    writable_prefix(results, "results", "sweep error", (".json", ".csv", ".md", ".png"))
    if ladder:
        return ("ladder", seed_list, *ladder_plans(trained, seed_list))
    rows = eval_rows(trained)
    seeds_of = [seed_list] * len(trained)
    check_runs([(r, s) for r, ss in zip(trained, seeds_of, strict=True) for s in ss])
    return "sweep", trained, seeds_of, rows


def main():
    configure(globals())
    if replot:
        return redraw(replot)
    kind, *plan = check_options()
    ensure_data()
    if kind == "ladder":
        return run_ladder(*plan)
    trained, seeds_of, rows = plan
    seed_list = seeds_of[0]
    res = train_and_evaluate(trained, seeds_of, rows)
    res["settings"] = {"runs": runs, "grid": grid, "seeds": seed_list, "eval_extra": eval_extra, "config": config,
                       "max_iters": max_iters or "config's", "train_args": train_args, "dataset": dataset,
                       "threads": threads}
    command = "python " + " ".join(sys.argv)
    if evaluator == "retrieval":
        from eval_retrieval import plot as retrieval_plot
        text = retrieval_markdown(res)
        save_json(res, results, command)
        paths = [results + ".json", retrieval_csv(res, results), *retrieval_plot({"runs": res["rows"]}, results),
                 *training_curves(res, results)]
    else:
        text = markdown(res)
        paths = write_results(res, results, command, make_plot=False) + plot(res, results)
    print(text)
    with open(results + ".md", "w") as f:
        f.write(f"`{command}`\n\n{trained_with()}\n\n" + text)
    for p in [*paths, results + ".md"]:
        print(f"wrote {p}")


def retrieval_csv(res, prefix):
    """<prefix>.csv of a retrieval sweep: per row, one line per (length, distance bin) cell (exact-match accuracy,
    mean and std over seeds, and each seed's) and one per length of the text's loss (kind lm)."""
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "n", "seeds", "kind", "multiple", "length", "bin_start", "bin_end", "prompts", "mean", "std",
                    "per_seed"])
        for r in res["rows"]:
            seeds = " ".join(map(str, r["seeds"]))
            for c in r["cells"]:
                w.writerow([r["label"], r["n"], seeds, "exact", f"{c['multiple']:g}", c["length"], f"{c['bin'][0]:g}",
                            f"{c['bin'][1]:g}", c["prompts"], f"{c['exact']:.4f}", f"{c['exact_std']:.4f}",
                            " ".join(f"{x:.4f}" for x in c.get("per_seed", []))])
            for e in r.get("lm", []):
                w.writerow([r["label"], r["n"], seeds, "lm", f"{e['multiple']:g}", e["length"], "", "", "",
                            f"{e['loss']:.4f}", f"{e['loss_std']:.4f}", ""])
    return prefix + ".csv"


def training_curves(res, prefix):
    """<prefix>_training.png: each row's exact-match accuracy on the answers of the validation windows (key-query
    distances below T) at every evaluation during training, from its runs' log.csv (train.py), mean over seeds (the
    steps all of them logged): when a model learns to retrieve, and whether it does before its extrapolation counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for r in res["runs"]:
        if r.get("eval"):  # an evaluation-time row: its run's training is drawn already
            continue
        curves.setdefault(r["label"], []).append(answer_curve(r["ckpt"]))
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(8 if len(curves) <= 10 else 11, 4.8))
    for i, (label, seeds) in enumerate(curves.items()):
        steps = sorted(set.intersection(*(set(p) for p in seeds)))
        ax.plot(steps, [np.mean([p[t] for p in seeds]) for t in steps], color=colour(i, len(curves)),
                marker="o" if i >= 10 else None, markersize=3, label=f"{label} (n={len(seeds)})")
    ax.axhline(0.95, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="training step", ylabel="answers right (exact, validation windows)", ylim=(-0.03, 1.03),
           title="Learning to retrieve (distances < T), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", **({} if len(curves) <= 10 else dict(bbox_to_anchor=(1.01, 1.0))))
    fig.tight_layout()
    fig.savefig(prefix + "_training.png", dpi=120)
    plt.close(fig)
    return [prefix + "_training.png"]


def trained_with():
    """A line on what the training numbers depend on beyond the command: threads, torch."""
    import torch
    n = f"{threads} CPU thread{'s' * (threads > 1)}" if threads else "torch's default number of CPU threads"
    return (f"Runs trained here with {n} each (--threads) and torch {torch.__version__}: on a CPU a run reproduces "
            "bit for bit with the same threads, CPU and torch; finished runs are reused as they are.")


def eval_key(trained, seeds_of, rows):
    """What an evaluation of these rows depends on: the rows, the evaluation settings and each checkpoint as it is
    on disk (iteration, size, modification time): a ladder rung with the same key is not evaluated again."""
    ckpts = {}
    for r, ss in zip(trained, seeds_of, strict=True):
        for seed in ss:
            path = os.path.join(out_dir_for(*r[:2], seed), "ckpt.pt")
            st = os.stat(path)
            ckpts[path] = [finished(os.path.dirname(path))[0], st.st_size, st.st_mtime_ns]
    return {"rows": [[i, ov, label] for i, ov, label in rows], "seeds": [list(ss) for ss in seeds_of],
            "multipliers": multipliers, "eval_tokens": eval_tokens, "device": device, "ckpts": ckpts}


def spec_id(spec):
    """(checkpoint dir, eval-time overrides) as a hashable key."""
    return spec[0], json.dumps(spec[1], sort_keys=True)


def reusable_runs(reuse, key):
    """The evaluations of an earlier result (reuse) that still hold for key: the same lengths, tokens and device,
    and the run's checkpoint unchanged on disk (iteration, size, modification time). ({spec_id: run record},
    [skipped records]); a rung that gains a seed evaluates only the new checkpoint."""
    settings = [k for k in key if k not in ("rows", "seeds", "ckpts")]  # what eval_key holds besides the rung's runs
    if reuse is None or any(reuse.get("key", {}).get(k) != key[k] for k in settings):
        return {}, []
    then = reuse["key"].get("ckpts", {})

    def same(d):
        p = os.path.join(d, "ckpt.pt")
        return p in key["ckpts"] and then.get(p) == key["ckpts"][p]
    return ({spec_id((r["ckpt"], r["eval"])): r for r in reuse.get("runs", []) if same(r["ckpt"])},
            [x for x in reuse.get("skipped", []) if same(x["ckpt"])])


def train_and_evaluate(trained, seeds_of, rows, reuse=None):
    """Train every run with its seeds (finished ones skipped, interrupted ones resumed), then evaluate every row
    (run index, eval-time overrides, label) with each of its run's seeds; res with the aggregated rows and the
    evaluation's key (eval_key). reuse: an earlier result; returned as it is when its key is the same, else its
    evaluations that still hold are kept and only the rest evaluated (reusable_runs)."""
    jobs = [(r, s) for r, ss in zip(trained, seeds_of, strict=True) for s in ss]
    for (name, kv, _), seed in tqdm(jobs, desc="sweep: train", unit="run", file=sys.stderr):
        out_dir = out_dir_for(name, kv, seed)
        it, done = finished(out_dir)
        if done and not retrain:
            tqdm.write(f"{run_label(name, kv)} seed {seed}: finished checkpoint at iter {it} in {out_dir}, skipped "
                       "(--retrain=True to redo)")
        else:
            train(name, kv, seed, out_dir, resume=(it is not None and not retrain))
    defaults = train_defaults()
    for (name, kv, _), seed in jobs:
        verify_checkpoint(name, kv, seed, defaults)
    key = eval_key(trained, seeds_of, rows)
    if reuse is not None and reuse.get("key") == key:
        return reuse
    specs, meta, labels = [], [], {}
    for k, (i, ov, label) in enumerate(rows):
        labels[k] = label
        for seed in seeds_of[i]:
            specs.append((out_dir_for(*trained[i][:2], seed), ov))
            meta.append((k, seed))
    if evaluator == "retrieval":
        return retrieval_rows(specs, meta, labels, key)
    old, old_skipped = reusable_runs(reuse, key)
    known = set(old) | {spec_id((x["ckpt"], x["eval"])) for x in old_skipped}
    todo = [spec for spec in specs if spec_id(spec) not in known]
    if known:
        tqdm.write(f"sweep: {len(specs) - len(todo)} of {len(specs)} evaluations reused (the same checkpoint and "
                   f"settings as before), {len(todo)} to do")
    res = evaluate(todo, multipliers=multipliers, tokens=eval_tokens, device=device, empty_ok=bool(known))
    if old_skipped or res.get("skipped"):
        res["skipped"] = old_skipped + res.get("skipped", [])
    skipped = [(x["ckpt"], x["eval"]) for x in res.get("skipped", [])]  # settings that do not apply to a run
    new = iter(res["runs"])  # in the order of todo
    res["runs"] = [old.get(spec_id(spec)) or next(new) for spec in specs if spec not in skipped]
    meta = [m for spec, m in zip(specs, meta, strict=True) if spec not in skipped]
    for r, (k, seed) in zip(res["runs"], meta, strict=True):
        r["label"], r["seed"] = labels[k], seed
    res["rows"] = aggregate(res, [k for k, _ in meta], labels)
    res["key"] = key
    return res


# -----------------------------------------------------------------------------
# the retrieval evaluator: accuracy by distance and length (eval_retrieval.py), every evaluation kept as it is made


def retrieval_settings():
    return dict(lengths=retrieval_lengths, bins=retrieval_bins, n_prompts=retrieval_prompts,
                n_distractors=retrieval_distractors)


def retrieval_rows(specs, meta, labels, key):
    """Evaluate every (checkpoint, eval-time settings) with eval_retrieval, each saved under <results>_evals/ as soon
    as it is done (named by the checkpoint on disk and the settings: a rerun after an interruption evaluates only
    what is missing), then the rows: per row the mean and std over seeds."""
    import hashlib

    from eval_retrieval import evaluate as retrieval_evaluate
    cache = results + "_evals"
    os.makedirs(cache, exist_ok=True)
    runs, skipped, reused = [], [], 0
    for spec in tqdm(specs, desc="sweep: evaluate", unit="run", file=sys.stderr):
        d, ov = spec
        what = json.dumps([key["ckpts"][os.path.join(d, "ckpt.pt")], ov, retrieval_settings(), device], sort_keys=True)
        name = f"{os.path.basename(os.path.normpath(d))}-{hashlib.sha256(what.encode()).hexdigest()[:12]}"
        path = os.path.join(cache, name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                one = json.load(f)
            reused += 1
        else:
            one = retrieval_evaluate([spec], **retrieval_settings(), device=device, empty_ok=True)
            save_json(one, path.removesuffix(".json"), "python " + " ".join(sys.argv))
        runs += one["runs"]
        skipped += one.get("skipped", [])
    if reused:
        tqdm.write(f"sweep: {reused} of {len(specs)} evaluations reused from {cache}/ (the same checkpoint and settings)")
    done = {(x["ckpt"], json.dumps(x["eval"], sort_keys=True)) for x in skipped}
    meta = [m for spec, m in zip(specs, meta, strict=True) if (spec[0], json.dumps(spec[1], sort_keys=True)) not in done]
    for r, (k, seed) in zip(runs, meta, strict=True):
        r["label"], r["seed"] = labels[k], seed
    res = {"protocol": one["protocol"] if specs else {}, "runs": runs, "key": key,
           "rows": aggregate_retrieval(runs, [k for k, _ in meta], labels)}
    return res | ({"skipped": skipped} if skipped else {})


READS = 0.95  # the retrieval gate: a row's extrapolation counts when every seed answers this share within T


def answer_curve(run_dir):
    """{step: share of the validation windows' queries (key-query distances < T) answered exactly} at every training
    evaluation of a run (train.py's log.csv, val_answer_exact); {} without that log."""
    try:
        with open(os.path.join(run_dir, "log.csv"), newline="") as f:
            return {int(x["iter"]): float(x["val_answer_exact"]) for x in csv.DictReader(f)
                    if x["kind"] == "eval" and x.get("val_answer_exact")}
    except FileNotFoundError:
        return {}


def trained_exact(run_dir):
    """The share answered at a run's last training evaluation (answer_curve); None without one."""
    curve = answer_curve(run_dir)
    return curve[max(curve)] if curve else None


def within_T(cells, trained):
    """A row's gate: `trained`, each seed's last training evaluation (trained_exact), and the evaluation's cell of
    prompts of length T with the key less than T back, as {'trained', 'exact', 'exact_std', 'per_seed', 'reads'}; reads
    = every seed answered >= READS of its training queries (None when a seed's log has no such number). None when
    the evaluation has no such cell (--retrieval_lengths without 1 or bins not starting 0,1)."""
    c = next((c for c in cells if c["multiple"] == 1 and list(c["bin"]) == [0, 1]), None)
    if c is None:
        return None
    known = None not in trained
    return {"trained": trained, "trained_mean": float(np.mean(trained)) if known else None,
            "trained_std": float(np.std(trained, ddof=1)) if known and len(trained) > 1 else 0.0,
            "exact": c["exact"], "exact_std": c["exact_std"], "per_seed": c["per_seed"],
            "reads": all(x >= READS for x in trained) if known else None}


def aggregate_retrieval(runs, keys, labels):
    """Per row over its seeds: each (length, bin) cell's and each bin's exact-match accuracy (over all lengths) and
    the text's loss per length, mean and std (0 for one seed), in eval_retrieval's run layout (its plots draw rows)."""
    from eval_retrieval import by_bin, crossed_accuracy
    by_row = {}
    for r, k in zip(runs, keys, strict=True):
        by_row.setdefault(k, []).append(r)
    std = (lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0)
    rows = []
    for k, rs in by_row.items():
        cells = []
        for i, c in enumerate(rs[0]["cells"]):
            ex = [r["cells"][i]["exact"] for r in rs]
            cells.append({key: c[key] for key in ("length", "multiple", "bin", "distances", "prompts")} |
                         {"exact": float(np.mean(ex)), "exact_std": std(ex), "per_seed": ex})
        bins_ = [by_bin(r) for r in rs]  # [seed][bin] (bin, exact, se, prompts)
        per_bin = [{"bin": list(b), "exact": float(np.mean([x[i][1] for x in bins_])),
                    "exact_std": std([x[i][1] for x in bins_]), "prompts": n * len(rs)}
                   for i, (b, _, _, n) in enumerate(bins_[0])]
        lm = np.array([[x["loss"] for x in r["lm"]] for r in rs]) if rs[0]["lm"] else np.zeros((len(rs), 0))
        ratio = lm[:, -1] / lm[:, 0] if lm.shape[1] else np.zeros(0)
        cross = [crossed_accuracy(r) for r in rs]  # (accuracy, prompts) per seed; None where not recorded
        crossed = ({"crossed_exact": float(np.mean([a for a, _ in cross])), "crossed_std": std([a for a, _ in cross]),
                    "crossed_prompts": sum(n for _, n in cross)} if all(a is not None for a, _ in cross) else {})
        rows.append({"label": labels[k], "n": len(rs), "seeds": [r["seed"] for r in rs], "cells": cells,
                     "by_bin": per_bin, "block_size": rs[0]["block_size"], "eval": rs[0]["eval"],
                     "lm": [{"length": x["length"], "multiple": x["multiple"], "loss": float(lm[:, i].mean()),
                             "loss_std": std(lm[:, i])} for i, x in enumerate(rs[0]["lm"])],
                     "lm_ratio": float(ratio.mean()) if len(ratio) else None,
                     "lm_ratio_std": std(ratio) if len(ratio) else None, **crossed,
                     "within_T": within_T(cells, [trained_exact(r["ckpt"]) for r in rs]),
                     **{key: rs[0][key] for key in ("attn", "reweight_p", "pos", "layers", "describe")}})
    return rows


def _pm(mean, std, n, fmt):
    """'mean ± std' over n seeds; the mean alone for one seed (it has no spread)."""
    return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 else f"{mean:{fmt}}"


def retrieval_markdown(res):
    """The retrieval table: whether each row reads within its window (the gate, within_T: every seed's training
    queries answered >= READS; the evaluation's length-T, d < T cell beside it), then exact-match accuracy (%) per
    key-query distance bin over all lengths, mean ± std over seeds, on the prompts with a distractor pair between the
    target and the query ('pair between': where a copy of the nearest pair scores 0), and the text's loss at the
    first and last length with their ratio."""
    rows = res["rows"]
    heads = [f"{b['bin'][0]:g}-{b['bin'][1]:g}T" for b in rows[0]["by_bin"]]
    lm = rows[0]["lm"]
    lm_heads = [f"LM {lm[0]['multiple']:g}x", f"LM {lm[-1]['multiple']:g}x", "last / 1x"] if lm else []
    between = all("crossed_exact" in r for r in rows)  # (evaluations made before the split was recorded lack it)
    heads += ["pair between"] if between else []
    gate = all(r.get("within_T") for r in rows)  # (evaluations without a length-T, d < T cell have no gate)
    heads = ["trained", "L=T, d<T", "reads"] * gate + heads
    lines = ["| run | n | " + " | ".join(heads + lm_heads) + " |", "|---|---|" + "---|" * (len(heads) + len(lm_heads))]
    for r in rows:
        w = r.get("within_T")
        cells = ["?" if w["trained_mean"] is None else _pm(100 * w["trained_mean"], 100 * w["trained_std"], r["n"], ".0f"),
                 _pm(100 * w["exact"], 100 * w["exact_std"], r["n"], ".0f"),
                 {True: "yes", False: "no", None: "?"}[w["reads"]]] if gate else []
        cells += [_pm(100 * b["exact"], 100 * b["exact_std"], r["n"], ".0f") for b in r["by_bin"]]
        if between:
            cells.append(_pm(100 * r["crossed_exact"], 100 * r["crossed_std"], r["n"], ".0f"))
        if r["lm"]:
            cells += [_pm(r["lm"][0]["loss"], r["lm"][0]["loss_std"], r["n"], ".3f"),
                      _pm(r["lm"][-1]["loss"], r["lm"][-1]["loss_std"], r["n"], ".3f"),
                      _pm(r["lm_ratio"], r["lm_ratio_std"], r["n"], ".2f")]
        lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
    note = (f"\n'trained': the validation windows' queries (distances < T) answered at the last training evaluation; "
            f"'reads': every seed answered >= {READS:.0%} of them (the gate; '?': a run without that log). 'L=T, d<T': "
            "the evaluation's prompts of length T with the key less than T back. The distance bins of a row marked "
            "'no' measure a model that does not retrieve within its window, not how far it reads past it.\n") \
        if gate else ""
    return "\n".join(lines) + "\n" + note


# -----------------------------------------------------------------------------
# the context ladder: the same runs trained at several contexts


def ladder_extra_seeds(trained, rungs, seed_list):
    """--extra_seeds 'run@T=seed,...' -> {(run as written, T): [seeds]}; each item checked against --runs and the
    rungs."""
    out = {}
    specs = [spec for _, _, spec in trained]
    for item in split_top(extra_seeds):
        spec, at, rest = item.rpartition("@")
        T, eq, seed = rest.partition("=")
        if not at or not eq or spec not in specs or not T.isdigit() or int(T) not in rungs:
            raise SystemExit(f"sweep error: --extra_seeds item {item!r}: write run@T=seed with a run of --runs and T one "
                             f"of --ladder ({', '.join(map(str, rungs))})")
        [s] = parse_seeds(seed, f"the seed of --extra_seeds item {item!r}")
        if s in out.get((spec, int(T)), []) or s in seed_list:
            raise SystemExit(f"sweep error: --extra_seeds item {item!r} repeats seed {s} of {spec} at T={T} (in "
                             f"{'--seeds' if s in seed_list else '--extra_seeds'}); give each seed once")
        out.setdefault((spec, int(T)), []).append(s)
    return out


def ladder_plans(trained, seed_list):
    """The rungs of --ladder and each rung's (T, runs, seeds, rows), every run's arguments checked."""
    rungs = parse_numbers(ladder, "ladder", prefix="sweep error", example="64,256,1024")
    bad = [T for T in rungs if ladder_tokens % T or ladder_tokens < T]
    if bad:
        raise SystemExit(f"sweep error: ladder_tokens={ladder_tokens} is not a whole number of windows of T={bad[0]}; "
                         "choose ladder_tokens as a multiple of every rung")
    extra = ladder_extra_seeds(trained, rungs, seed_list)
    for name, kv, _ in trained:  # the rungs set these: a run or grid setting would make two rungs one
        for k in LADDER_KEYS:
            if k in kv:
                raise SystemExit(f"sweep error: run {run_label(name, kv)!r} sets {k}, which every rung of --ladder sets "
                                 f"(block_size T, batch_size ladder_tokens / T); drop it, or sweep without --ladder")
    plans = []
    for T in rungs:  # the rung's runs: the ladder's block_size and batch_size on top of each run's own settings
        rung = [(name, kv | {"block_size": str(T), "batch_size": str(ladder_tokens // T)}, spec) for name, kv, spec in trained]
        seeds_of = [seed_list + extra.get((spec, T), []) for _, _, spec in trained]
        rows = [(i, ov, label.replace(f" block_size={T} batch_size={ladder_tokens // T}", ""))
                for i, ov, label in eval_rows(rung)]
        plans.append((T, rung, seeds_of, rows))
    check_runs([(r, s) for _, rung, seeds_of, _ in plans for r, ss in zip(rung, seeds_of, strict=True) for s in ss])
    return rungs, plans


def run_ladder(seed_list, rungs, plans):
    """Every run at every rung T of --ladder, with ladder_tokens tokens per step; each rung evaluated at its own
    multipliers x T; then the ladder's table, files and plots (<results>.json/.csv/.md/.png, <results>_curves.png)."""
    earlier = earlier_rungs(results + ".json")
    settings = {"runs": runs, "ladder": rungs, "ladder_tokens": ladder_tokens, "seeds": seed_list,
                "extra_seeds": extra_seeds, "eval_extra": eval_extra, "config": config,
                "max_iters": max_iters or "config's", "train_args": train_args, "dataset": dataset,
                "multipliers": multipliers, "eval_tokens": eval_tokens}
    rung_results = []
    for T, rung, seeds_of, rows in plans:
        res = train_and_evaluate(rung, seeds_of, rows, reuse=earlier.get(T))
        if res is earlier.get(T):
            tqdm.write(f"sweep: rung T={T}: the same checkpoints and settings as in {results}.json, its evaluation "
                       "reused")
        rung_results.append({"T": T, "rows": res["rows"], "runs": res["runs"], "protocol": res.get("protocol"),
                             "key": res["key"]})
        # after every rung, the files of the rungs done so far: an interrupted ladder keeps them (and a rerun of the
        # same command reuses their evaluations)
        done = [r["T"] for r in rung_results]
        out = {"rungs": rung_results, "summary": ladder_summary(rung_results), "settings": settings,
               "partial": None if len(done) == len(rungs) else {"done": done, "planned": rungs}}
        # the earlier file's evaluations of the rungs still to come, kept for the next rerun (not in the tables): an
        # interruption before they are reached does not lose them
        ahead = [earlier[T] for T in rungs if T not in done and T in earlier]
        if ahead:
            out["earlier_rungs"] = ahead
        write_ladder(out, results, "python " + " ".join(sys.argv))


def earlier_rungs(path):
    """{T: rung} of a ladder's results file written earlier (by an interrupted or a finished ladder), {} if none; with
    the rungs an interrupted rerun carried over unchecked ("earlier_rungs")."""
    try:
        with open(path) as f:
            res = json.load(f)
        return {r["T"]: r for r in res.get("earlier_rungs", []) + res["rungs"] if "key" in r}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def range_loss(buckets, start, end):
    """Mean loss over positions [start, end) of one evaluation's position buckets; a bucket that straddles an edge
    counts by its overlap (its loss taken as even inside it). Without a stride every window adds one token per
    position, so the ranges' losses, weighted by width, give the whole loss back."""
    w = [(b, max(0, min(end, b["end"]) - max(start, b["start"])) / (b["end"] - b["start"])) for b in buckets]
    tokens = sum(b["tokens"] * f for b, f in w)
    return sum(b["loss"] * b["tokens"] * f for b, f in w) / tokens if tokens else None


def ladder_summary(rung_results):
    """Per rung and row: the first and last length's loss, last / first, and the difference to softmax at the
    first length paired by seed (mean and std over the seeds both have), with the per-seed values; and the first
    length's loss by position range, the ranges cut at the ladder's rungs (0-64, 64-256, 256-1,024 for
    64, 256, 1,024): whether a run trained at T uses the characters beyond the lower rungs' T."""
    out = []
    edges = [0] + sorted(rung["T"] for rung in rung_results)  # --ladder keeps the order it is given
    for rung in rung_results:
        by_label, by_pos = {}, {}
        ranges = [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b <= rung["T"]]
        for r in rung["runs"]:
            by_label.setdefault(r["label"], {})[r["seed"]] = [x["loss"] for x in r["results"]]
            buckets = r["results"][0].get("position_buckets")
            if buckets:
                by_pos.setdefault(r["label"], []).append([range_loss(buckets, a, b) for a, b in ranges])
        ref = by_label.get("softmax", {})
        for row in rung["rows"]:
            per_seed, pos = by_label[row["label"]], by_pos.get(row["label"])  # pos: [seed][range]
            common = sorted(set(per_seed) & set(ref))
            d = np.array([per_seed[s][0] - ref[s][0] for s in common])
            out.append({"T": rung["T"], "label": row["label"], "n": row["n"], "seeds": row["seeds"],
                        "first": row["loss_mean"][0], "first_std": row["loss_std"][0],
                        "last": row["loss_mean"][-1], "last_std": row["loss_std"][-1],
                        "ratio": row["ratio_mean"], "ratio_std": row["ratio_std"],
                        "diff_softmax": float(d.mean()) if len(d) else None,
                        "diff_softmax_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                        "diff_softmax_seeds": {str(s): float(x) for s, x in zip(common, d, strict=True)},
                        "by_position": [{"start": a, "end": b, "loss": float(m)}  # mean over the seeds
                                        for (a, b), m in zip(ranges, np.mean(pos, axis=0), strict=True)] if pos else []})
    return out


def ladder_markdown(out, command):
    rungs = [r["T"] for r in out["rungs"]]
    mults = out["rungs"][0]["rows"][0]["multipliers"]
    labels = list(dict.fromkeys(x["label"] for x in out["summary"]))
    cell = {(x["label"], x["T"]): x for x in out["summary"]}
    part = out.get("partial")
    m0 = f"{mults[0]:g}x"
    lines = [f"`{command}`", ""]
    if part:
        lines += [f"**Partial**: the rungs T = {', '.join(map(str, part['done']))} of {', '.join(map(str, part['planned']))} "
                  "are done; the same command continues the ladder (finished runs and evaluations are reused).", ""]
    lines += [f"Loss in nats per character at {m0} and {mults[-1]:g}x each rung's training "
             f"context T, their ratio, and the {m0} difference to softmax paired by seed (mean ± std over "
             "the seeds; n seeds per cell).", "",
             "| run | " + " | ".join(f"T = {T}: {m0}, {mults[-1]:g}x, ratio, {m0} - softmax (n)" for T in rungs) + " |",
             "|---|" + "---|" * len(rungs)]
    for label in labels:
        cells = []
        for T in rungs:
            x = cell.get((label, T))
            if x is None:
                cells.append("")
                continue
            diff = "" if x["diff_softmax"] is None or label == "softmax" else \
                f", {x['diff_softmax']:+.3f} ± {x['diff_softmax_std']:.3f}"
            cells.append(f"{x['first']:.3f}, {x['last']:.3f}, {x['ratio']:.2f} ± {x['ratio_std']:.2f}{diff} ({x['n']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(x.get("by_position") for x in out["summary"]):
        lines += ["", f"Loss at {m0} by position inside the window (mean over the seeds): a range no lower than the "
                  "one before it means the run does not use those characters.", "",
                  "| run | " + " | ".join(f"T = {T}" for T in rungs) + " |", "|---|" + "---|" * len(rungs)]
        for label in labels:
            cells = [", ".join(f"{p['start']}-{p['end']}: {p['loss']:.3f}" for p in cell[(label, T)]["by_position"])
                     if (label, T) in cell and cell[(label, T)].get("by_position") else "" for T in rungs]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_ladder(out, prefix, command):
    """The ladder's files; <prefix>.json last (a rerun reuses the rungs it holds): once it is there, so are the
    others for the same rungs."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    keys = ["T", "label", "n", "seeds", "first", "first_std", "last", "last_std", "ratio", "ratio_std", "diff_softmax",
            "diff_softmax_std"]
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for x in out["summary"]:
            w.writerow([" ".join(map(str, x[k])) if k == "seeds" else x[k] for k in keys])
    text = ladder_markdown(out, command)
    with open(prefix + ".md", "w") as f:
        f.write(text)
    print(text)
    plots = plot_ladder(out, prefix)
    save_json(out, prefix, command)
    for p in [prefix + ".json", prefix + ".csv", prefix + ".md", *plots]:
        print(f"wrote {p}")


def plot_ladder(out, prefix):
    """<prefix>.png: last / first length against T, and the first length's difference to softmax (paired by seed,
    +-1 std) against T, one line per run; <prefix>_curves.png: each rung's loss vs length curves, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(x["label"] for x in out["summary"]))
    rungs = [r["T"] for r in out["rungs"]]
    mults = out["rungs"][0]["rows"][0]["multipliers"]
    rows = -(-len(labels) // 4)  # legend rows under the panels
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8 + 0.25 * rows))
    for i, label in enumerate(labels):
        xs = [x for x in out["summary"] if x["label"] == label]
        T = [x["T"] for x in xs]
        axes[0].errorbar(T, [x["ratio"] for x in xs], yerr=[x["ratio_std"] for x in xs], marker="o", capsize=3,
                         color=colour(i, len(labels)), label=label)
        if label != "softmax":
            axes[1].errorbar(T, [x["diff_softmax"] for x in xs], yerr=[x["diff_softmax_std"] for x in xs], marker="o",
                             capsize=3, color=colour(i, len(labels)), label=label)
    axes[0].axhline(1.0, color="gray", linewidth=1)
    axes[1].axhline(0.0, color="gray", linewidth=1)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(rungs, [str(T) for T in rungs])
        ax.grid(alpha=0.3)
    axes[0].set(xlabel="training context T (characters)", ylabel=f"loss at {mults[-1]:g}T / loss at {mults[0]:g}T",
                title="Extrapolation penalty across the ladder (1.0 = flat)")
    axes[1].set(xlabel="training context T (characters)", ylabel=f"loss at {mults[0]:g}T minus softmax's (nats)",
                title="Cost at the training length, paired by seed (+-1 std)")
    # one legend under both panels: inside either it hides a line's end (the rows spread over the whole height)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.25 * rows / fig.get_figheight() + 0.01, 1, 1))
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(rungs), figsize=(5 * len(rungs), 4.5), sharey=True, squeeze=False)
    for ax, rung in zip(axes[0], out["rungs"], strict=True):
        for i, label in enumerate(labels):
            r = next((r for r in rung["rows"] if r["label"] == label), None)
            if r is None:
                continue
            m, sd = np.array(r["loss_mean"]), np.array(r["loss_std"])
            ax.plot(r["lengths"], m, "-o", markersize=3, color=colour(i, len(labels)), label=f"{label} (n={r['n']})")
            ax.fill_between(r["lengths"], m - sd, m + sd, color=colour(i, len(labels)), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.axvline(rung["T"], color="gray", linestyle=":", linewidth=1)
        ax.set(title=f"trained at T = {rung['T']}", xlabel="evaluation context length (characters)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")  # on every panel: a rung's n can differ from the others'
    axes[0][0].set_ylabel("validation loss (nats / character)")
    fig.tight_layout()
    fig.savefig(prefix + "_curves.png", dpi=120)
    plt.close(fig)
    return [prefix + ".png", prefix + "_curves.png"]


def markdown(res):
    """The table for the README: mean over seeds (+- std when there are several) per length, and last / 1x."""
    rows = res["rows"]
    mults = rows[0]["multipliers"]
    many = any(r["n"] > 1 for r in rows)
    head = "| attention | p (train -> eval) | n | " + " | ".join(f"{m:g}x" for m in mults) + " | last / 1x |"
    lines = [head, "|" + "---|" * (len(mults) + 4)]
    for r in rows:
        # a stack's p is its layers' (in its label's pattern); the config's own reweight_p is not what they compute
        p = ("per layer" if r.get("pos") == "layers" else f"{r['trained_reweight_p']:g}") + (
            f" -> {r['reweight_p']:g}" if r["reweight_p"] != r["trained_reweight_p"] else "")
        cells = [f"{m:.3f} ± {s:.3f}" if many else f"{m:.3f}" for m, s in zip(r["loss_mean"], r["loss_std"], strict=True)]
        ratio = f"{r['ratio_mean']:.2f} ± {r['ratio_std']:.2f}" if many else f"{r['ratio_mean']:.2f}"
        lines.append(f"| {r['label']} | {p} | {r['n']} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def redraw(path):
    """--replot: the plots of a saved sweep (.json with its aggregated rows) or ladder, next to it."""
    res = read_results(path, "sweep", "sweep.py")
    if isinstance(res, dict) and res.get("rungs") and res.get("summary"):
        for p in plot_ladder(res, path.removesuffix(".json")):
            print(f"wrote {p}")
        return
    if not isinstance(res, dict) or not res.get("rows"):
        raise SystemExit(f"sweep error: {path!r} holds no sweep rows; pass a .json written by sweep.py")
    for p in plot(res, path.removesuffix(".json")):
        print(f"wrote {p}")


def plot(res, prefix):
    """<prefix>.png: mean loss vs length with a +-1 std band over seeds; <prefix>_detail.png: last / 1x per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(8 if n <= 10 else 11, 5))
    for i, r in enumerate(rows):
        m, s = np.array(r["loss_mean"]), np.array(r["loss_std"])
        style = "--" if r["eval"] else "-"
        ax.plot(r["lengths"], m, style, marker="osD^v"[i // 10 % 5] if n > 10 else "o", color=colour(i, n),
                label=f"{r['label']} (n={r['n']})")
        if r["n"] > 1:
            ax.fill_between(r["lengths"], m - s, m + s, color=colour(i, n), alpha=0.12)
    for bs in sorted({r["lengths"][0] / r["multipliers"][0] for r in rows}):
        ax.axvline(bs, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation context length (tokens)", ylabel="validation loss (nats / token)",
           title="Loss vs context length (mean over seeds, band: +-1 std)")
    ax.grid(alpha=0.3)
    if n <= 10:
        ax.legend(fontsize=7, ncol=2)
    else:  # many rows: the legend beside the axes, in the rows' order
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(rows) + 2), 4.5))
    bars = ax.bar(range(len(rows)), [r["ratio_mean"] for r in rows], yerr=[r["ratio_std"] for r in rows],
                  color=[colour(i, len(rows)) for i in range(len(rows))], capsize=3)
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set(ylabel=f"loss at {rows[0]['multipliers'][-1]:g}x / loss at 1x", title="Extrapolation penalty (1.0 = flat)")
    fig.tight_layout()
    fig.savefig(prefix + "_detail.png", dpi=120)
    plt.close(fig)
    return [prefix + ".png", prefix + "_detail.png"]


if __name__ == "__main__":
    main()
