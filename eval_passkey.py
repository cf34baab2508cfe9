"""
Passkey retrieval at 1x..16x the training context: can the model still find one fact in a long context?

    python eval_passkey.py --ckpts=out-passkey-char-softmax,out-passkey-char-lssar
    python eval_passkey.py --ckpts=... --lengths=64,96,128 --depths=0,0.5,1 --trials=50 --filler=repeat
    python eval_passkey.py --ckpts=out-passkey-char-lssa --reweight_p=ckpt,15   # re-weighting at eval only

The task (one template, used by data/passkey_char/prepare.py for fine-tuning and here for evaluation):

    <filler> KEY IS QZXKV. <filler> KEY? QZXKV
                                         ^ answer slot: the model must write the key

A prompt of total length L tokens, answer slot included: the model reads the first L - key_len tokens and
decodes key_len tokens greedily (argmax, KV cache); a trial is correct when every key token matches.
Char-level models draw keys from the 26 uppercase letters (Tiny Shakespeare's vocabulary has no digits but
'3'); GPT-2 BPE models from the digits, written space-separated (" 4 7 1 9 2") because GPT-2 merges runs of
digits into multi-digit tokens while " 7" is always one token: the key is then key_len tokens in its own
canonical tokenisation. Depth d puts the key sentence after round(d * F) of the F filler tokens (0: the very
start, 1: right before the question). Trial t at length L uses the same filler and key at every depth (drawn
from (seed, L, t)), so depths differ only in where the key sits, and every checkpoint sees the same trials.
Filler: windows of the checkpoint's validation tokens (for a passkey fine-tuning dataset, those of the
dataset it was made from), or --filler=repeat (one sentence repeated), or --filler=DIR (DIR/val.bin).
Writes <out>.json (protocol, command, per-cell results), <out>.csv and <out>.png (one accuracy heatmap per
checkpoint: context length x depth).
"""

import csv
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from configurator import configure
from dataset import ROOT, compare_data, data_dir_for, data_fingerprint, get_tokenizer, load_meta, load_stream
from eval_length import applies, checkpoint_lengths, eval_settings, eval_time, length_spec, save_json
from options import autocast_ctx, check_range, parse_names, parse_numbers, pick_device, read_results, writable_prefix
from runs import load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
ckpts = ""               # comma-separated out_dirs (or ckpt.pt files)
multipliers = "1,2,4,8,16"  # x the training block_size of each checkpoint
lengths = ""             # explicit total prompt lengths (answer slot included) instead of multipliers
depths = "0,0.25,0.5,0.75,1"  # where the key sentence sits in the filler (0 = start, 1 = just before the question)
trials = 20              # prompts per length x depth
seed = 1337
key_len = 5              # key tokens (letters for char-level models, digits for BPE)
reweight_p = "ckpt"      # comma list of eval-time re-weighting powers: ckpt = as trained, 0 = off, 15 = LSSAR
rope_scaling = "ckpt"    # comma list of RoPE extensions (RoPE models): ckpt = as trained, none, pi, ntk, yarn
rope_factor = 0.0        # their factor; 0 = per length (length / block_size)
logn_scale = "ckpt"      # comma list: ckpt, true, false (log-length scaling of the scores)
filler = "val"           # val (the checkpoint's validation data) | repeat (one sentence) | DIR (DIR/val.bin)
batch = 20               # prompts per forward pass
out = "results/passkey"
replot = ""              # path to a results .json: redraw its heatmaps (and print its table) without evaluating
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------

# The template, the one place it is written. Compact on purpose: at a char-level block_size of 64 the fixed
# part (15 + 11 characters with a 5-letter key) leaves 38 characters of filler.
KEY_SENTENCE = (" KEY IS ", ". ")  # the key sits between these, inside the filler
QUESTION = " KEY? "                # ends the prompt; the key follows it
FILLER_SENTENCE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
CHAR_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BPE_ALPHABET = "0123456789"


@dataclass(frozen=True)
class Template:
    pre: tuple       # tokens before the key in the key sentence
    post: tuple      # tokens after it
    question: tuple  # tokens before the answer slot
    alphabet: tuple  # one token per key symbol
    char_level: bool

    def fixed_len(self, n_key):
        return len(self.pre) + len(self.post) + len(self.question) + 2 * n_key


def passkey_template(meta):
    """The template's pieces as token ids for a dataset's tokenizer (meta.pkl: char-level, or BPE)."""
    encode, _ = get_tokenizer(meta)
    char_level = meta is not None and "stoi" in meta
    if char_level:
        pieces = [encode(s) for s in (KEY_SENTENCE[0], KEY_SENTENCE[1], QUESTION)]
        symbols = [encode(c) for c in CHAR_ALPHABET]
    else:  # BPE words carry their leading space: " KEY IS" + " 4" + " 7" ... + "." + " filler" ...
        pieces = [encode(s.rstrip()) for s in (KEY_SENTENCE[0], KEY_SENTENCE[1], QUESTION)]
        symbols = [encode(" " + c) for c in BPE_ALPHABET]
    assert all(len(s) == 1 for s in symbols), "every key symbol must be one token"
    return Template(*map(tuple, pieces), tuple(s[0] for s in symbols), char_level)


def passkey_example(tpl, filler_ids, key, depth):
    """filler[:cut] + key sentence + filler[cut:] + question + key, cut = round(depth * len(filler)): a list
    of len(filler) + tpl.fixed_len(len(key)) token ids whose last len(key) tokens are the answer."""
    cut = int(round(depth * len(filler_ids)))
    return [*filler_ids[:cut], *tpl.pre, *key, *tpl.post, *filler_ids[cut:], *tpl.question, *key]


def filler_len(tpl, L, n_key):
    n = L - tpl.fixed_len(n_key)
    if n < 0:
        raise SystemExit(f"passkey error: length {L} is too short for the template ({tpl.fixed_len(n_key)} tokens "
                         f"with a {n_key}-token key and no filler); use longer lengths or a shorter key_len")
    return n


def draw(tpl, data, n_filler, n_key, rng):
    """A filler window of n_filler tokens from data (a random start) and a random key, both from rng; data may
    also be a short token list to repeat (filler=repeat), which then starts at its beginning every time."""
    if isinstance(data, list):
        fill = np.resize(np.asarray(data, dtype=np.int64), n_filler)
    else:
        if len(data) < n_filler:
            raise SystemExit(f"passkey error: {n_filler} filler tokens asked for but the filler data holds only "
                             f"{len(data)}; use shorter lengths")
        s = int(rng.integers(0, len(data) - n_filler + 1))
        fill = np.asarray(data[s:s + n_filler], dtype=np.int64)
    return fill.tolist(), [int(k) for k in rng.choice(tpl.alphabet, n_key)]


def make_trials(tpl, data, L, depth_list, n_trials, n_key, seed_):
    """Prompts (len(depth_list) * n_trials, L - n_key) and keys (same rows, n_key) at total length L, depth-major.
    Trial t draws its filler and key from (seed, L, t), the same at every depth and for every checkpoint."""
    n_filler = filler_len(tpl, L, n_key)
    draws = [draw(tpl, data, n_filler, n_key, np.random.default_rng([seed_, L, t])) for t in range(n_trials)]
    rows, keys = [], []
    for d in depth_list:
        for fill, key in draws:
            ex = passkey_example(tpl, fill, key, d)
            rows.append(ex[:-n_key])
            keys.append(key)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(keys, dtype=torch.long)


@torch.no_grad()
def answer(model, prompts, n_key, ctx, dev, batch_size, pbar=None):
    """The n_key tokens each model decodes greedily after each prompt (same-length prompts, batched)."""
    outs = []
    for i in range(0, len(prompts), batch_size):
        x = prompts[i:i + batch_size].to(dev)
        with ctx:
            y = model.generate(x, n_key, temperature=0)
        outs.append(y[:, -n_key:].cpu())
        if pbar is not None:
            pbar.update(len(x))
    return torch.cat(outs)


def readable(decode, meta):
    """decode for the failure examples: a BPE model's padding ids (its embedding is padded past the tokenizer's
    vocabulary, e.g. 50304 for GPT-2's 50257) have no text; they are shown as '?'."""
    n = meta["vocab_size"] if meta is not None else 50257
    return lambda ids: "".join(decode([i]) if i < n else "?" for i in ids)


def score(model, trials_by_len, depth_list, block_size, decode, ctx, dev, batch_size, pbar=None):
    """Accuracy per length x depth of a model on make_trials() prompts ({L: (prompts, keys)}, depth-major rows).
    model: anything with generate(idx, n, temperature=0) (a GPT, or a stand-in in the tests)."""
    results = []
    for L, (prompts, keys) in trials_by_len.items():
        n_key = keys.shape[1]
        n_trials = len(keys) // len(depth_list)
        t0 = time.time()
        got = answer(model, prompts, n_key, ctx, dev, batch_size, pbar)
        secs = round(time.time() - t0, 2)
        hit = (got == keys).view(len(depth_list), n_trials, n_key)
        for i, dep in enumerate(depth_list):
            exact = hit[i].all(-1)
            rows = [i * n_trials + t for t in range(n_trials) if not exact[t]][:2]  # a few failures, to read
            results.append({"length": L, "multiplier": L / block_size, "depth": dep,
                            "accuracy": exact.float().mean().item(), "correct": int(exact.sum()), "trials": n_trials,
                            "token_accuracy": hit[i].float().mean().item(), "seconds_per_length": secs,
                            "wrong_examples": [{"key": decode(keys[r].tolist()), "output": decode(got[r].tolist())}
                                               for r in rows]})
    return results


def _show(path):
    """A data path as recorded in the results: relative to the repo root when inside it."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return os.path.abspath(path) if rel.startswith("..") else rel


def filler_source(cfg, meta, filler_arg):
    """The filler tokens (a token list to repeat, or a validation split) and where they come from. A passkey
    fine-tuning dataset records the dataset it was made from (meta['passkey_src'], relative to the repo root or
    absolute): its own val.bin holds whole examples, not filler."""
    if filler_arg == "repeat":
        return get_tokenizer(meta)[0](FILLER_SENTENCE), "repeat: " + FILLER_SENTENCE.strip()
    if filler_arg == "val":
        src = (meta or {}).get("passkey_src")
        d = os.path.join(ROOT, src) if src else data_dir_for(cfg["dataset"], cfg.get("data_dir", ""))
    else:
        d = filler_arg
    return load_stream(os.path.basename(os.path.normpath(d)), "val", d), f"val: {_show(d)}"


def parse_depths(depths):
    return parse_numbers(depths, "depths", float, prefix="passkey error", example="0,0.5,1",
                         ok=lambda d: 0 <= d <= 1, what="fractions in [0, 1]")


def evaluate(ckpt_dirs, *, multipliers="1,2,4,8,16", lengths="", depths="0,0.25,0.5,0.75,1", n_trials=20, seed=1337,
             n_key=5, filler="val", batch_size=20, device="auto", dtype="auto", reweight_p="ckpt", rope_scaling="ckpt",
             rope_factor=0.0, logn_scale="ckpt"):
    """Passkey accuracy of each checkpoint (with each combination of the eval-time settings, as eval_length.py's:
    ckpt = as trained) at every length x depth; returns the results dict write_results() saves. Fails before
    evaluating anything when a checkpoint or a length cannot work; skips settings that do not apply to a
    checkpoint (a RoPE extension of a model without RoPE). Keywords as the script's keys."""
    dev = pick_device(device)
    ctx, dt = autocast_ctx(dev, dtype)
    depth_list = parse_depths(depths)
    check_range({"trials": n_trials, "key_len": n_key, "batch": batch_size}, 1, prefix="passkey error")
    jobs, loaded = [], {}
    settings = eval_settings(reweight_p=reweight_p, rope_scaling=rope_scaling, rope_factor=rope_factor,
                             logn_scale=logn_scale)
    for d, overrides in [(d, o) for d in ckpt_dirs for o in settings]:
        ck = loaded[d] = loaded.get(d) or load_checkpoint(d, dev)
        cfg, margs = ck["config"], ck["model_args"]
        if not applies(margs, overrides):
            print(f"skipped {d} with {overrides}: pos={margs.get('pos')!r} has no RoPE to extend", file=sys.stderr)
            continue
        eff, trained, label = eval_time(d, margs, overrides)
        attn, eff_p, trained_p = eff.attn, eff.reweight_p, trained.reweight_p
        lens = checkpoint_lengths(d, margs, lengths=lengths, multipliers=multipliers)
        meta = load_meta(cfg["dataset"], cfg.get("data_dir", ""))
        # the template is encoded with this meta.pkl: it must be the vocabulary the checkpoint was trained with
        compare_data(ck.get("data"), data_fingerprint(meta, data_dir_for(cfg["dataset"], cfg.get("data_dir", ""))), d,
                     "eval error")
        tpl = passkey_template(meta)
        data, filler_desc = filler_source(cfg, meta, filler)
        trials_by_len = {L: make_trials(tpl, data, L, depth_list, n_trials, n_key, seed) for L in lens}
        top = max(int(p.max()) for p, _ in trials_by_len.values())
        if top >= margs["vocab_size"]:
            raise SystemExit(f"eval error: vocab mismatch: {d} has {margs['vocab_size']} tokens but its filler holds "
                             f"token id {top}; use the filler of the dataset it was trained on")
        jobs.append(dict(ckpt=d, ck=ck, lens=lens, trials=trials_by_len, filler=filler_desc, label=label,
                         decode=readable(get_tokenizer(meta)[1], meta), char_level=tpl.char_level, overrides=overrides,
                         attn=attn, reweight_p=eff_p, trained_reweight_p=trained_p, eval=overrides))
    if not jobs:
        raise SystemExit("eval error: no checkpoint takes the eval-time settings asked for; see the lines above")
    runs = []
    total = sum(len(p) for j in jobs for p, _ in j["trials"].values())
    with tqdm(total=total, unit="prompt", desc="eval_passkey", file=sys.stderr) as pbar:
        for j in jobs:
            ck = j.pop("ck")
            margs = ck["model_args"]
            model = model_from_checkpoint(ck, dev, **j["overrides"]).eval()
            pbar.set_postfix_str(j["label"])
            try:
                results = score(model, j.pop("trials"), depth_list, margs["block_size"], j["decode"], ctx, dev,
                                batch_size, pbar)
            except ValueError as e:
                raise SystemExit(f"eval error: {j['label']} ({j['ckpt']}): {e}; nothing was written: evaluate a "
                                 "checkpoint that did not diverge, or drop the eval-time setting") from None
            runs.append({"label": j["label"], "ckpt": j["ckpt"], "attn": j["attn"], "reweight_p": j["reweight_p"],
                         "trained_reweight_p": j["trained_reweight_p"], "eval": j["eval"], "pos": margs.get("pos", "rope"),
                         "block_size": margs["block_size"], "dataset": ck["config"]["dataset"],
                         "iter_num": ck["iter_num"], "filler": j["filler"], "results": results})
            del model
    protocol = {
        "task": f"filler +{KEY_SENTENCE[0]}<key>{KEY_SENTENCE[1]}+ filler +{QUESTION}<key>; depth = filler fraction "
                "before the key sentence",
        "key": f"{n_key} tokens, uniform with replacement from "
               + ("uppercase letters (char-level)" if all(j["char_level"] for j in jobs) else
                  "uppercase letters (char-level) / space-separated digits (BPE)"),
        "length": "total tokens including the answer slot; the model reads length - key_len tokens",
        "decoding": "greedy (argmax) with a KV cache; correct = every key token matches",
        "trials": f"{n_trials} per length x depth; trial t draws filler and key from (seed={seed}, length, t), the "
                  "same at every depth and for every checkpoint",
        "filler": filler, "device": dev, "dtype": dt, "batch": batch_size,
    }
    return {"protocol": protocol, "runs": runs}


def write_results(res, out_prefix, command):
    res = save_json(res, out_prefix, command)
    with open(out_prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ckpt", "label", "length", "multiplier", "depth", "accuracy", "trials"])
        for r in res["runs"]:
            for x in r["results"]:
                w.writerow([r["ckpt"], r["label"], x["length"], f"{x['multiplier']:g}", f"{x['depth']:g}",
                            f"{x['accuracy']:.4f}", x["trials"]])
    return [out_prefix + ".json", out_prefix + ".csv", plot_results(res, out_prefix)]


def grid(run):
    """(lengths, depths, accuracy matrix depth x length) of one run."""
    lens = sorted({x["length"] for x in run["results"]})
    deps = sorted({x["depth"] for x in run["results"]})
    acc = np.full((len(deps), len(lens)), np.nan)
    for x in run["results"]:
        acc[deps.index(x["depth"]), lens.index(x["length"])] = x["accuracy"]
    return lens, deps, acc


def table(res):
    """The protocol, mean accuracy per length (rows: runs), then each run's depth x length grid, in %."""
    lines = ["protocol: " + "; ".join(f"{k}: {v}" for k, v in res["protocol"].items())]
    lens = sorted({x["length"] for r in res["runs"] for x in r["results"]})
    w = max(max(len(r["label"]) for r in res["runs"]) + 2, 12)
    lines += ["passkey accuracy (%), mean over depths", "attention".ljust(w) + "".join(f"{L:>7}" for L in lens)]
    for r in res["runs"]:
        rl, _, acc = grid(r)
        by = dict(zip(rl, acc.mean(0), strict=True))
        lines.append(r["label"].ljust(w) + "".join(f"{100 * by[L]:7.0f}" if L in by else " " * 7 for L in lens))
    for r in res["runs"]:
        rl, deps, acc = grid(r)
        lines += ["", f"{r['label']}: accuracy (%) by depth (rows) and length (columns); trained at {r['block_size']}",
                  "depth".ljust(w) + "".join(f"{L:>7}" for L in rl)]
        lines += [f"{d:g}".ljust(w) + "".join(f"{100 * a:7.0f}" for a in row) for d, row in zip(deps, acc, strict=True)]
    return "\n".join(lines)


def plot_results(res, out_prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(res["runs"])
    cols = min(n, 3)  # rows of at most 3 heatmaps, so that a README shows them at a readable size
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 + 3.6 * cols, 0.4 + 3.5 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat[:n], res["runs"], strict=True):
        lens, deps, acc = grid(r)
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, k), a in np.ndenumerate(acc):
            ax.text(k, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if 0.2 < a < 0.85 else "white")
        bs = r["block_size"]
        ax.set_xticks(range(len(lens)), [f"{L}\n{L / bs:g}x" for L in lens], fontsize=8)
        ax.set_yticks(range(len(deps)), [f"{d:g}" for d in deps], fontsize=8)
        inside = sum(L <= bs for L in lens)  # columns within the training length sit left of the dotted line
        if 0 < inside < len(lens):
            ax.axvline(inside - 0.5, color="black", linestyle=":", linewidth=1.5)
            ax.annotate(f"trained at {bs}", (inside - 0.5, 1.0), xycoords=("data", "axes fraction"), ha="center",
                        va="bottom", fontsize=7)
        ax.set_title(r["label"], pad=12)
        ax.set_xlabel("context length (tokens)")
    for row in axes:
        row[0].set_ylabel("key depth (0 = start of context)")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="passkey accuracy", shrink=0.9)
    fig.suptitle(f"Passkey retrieval ({res['runs'][0]['results'][0]['trials']} trials per cell, % correct)", fontsize=10)
    path = out_prefix + ".png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_options(o):
    """Every option parsed and range-checked before any checkpoint is read or anything written (one line naming
    the fix otherwise)."""
    if o["replot"]:
        return
    if not o["ckpts"]:
        raise SystemExit("eval error: pass --ckpts=DIR[,DIR...] (out_dirs of trained runs)")
    parse_names(o["ckpts"], "ckpts", "eval error")
    length_spec(o["lengths"], o["multipliers"])
    parse_depths(o["depths"])
    check_range({"trials": o["trials"], "key_len": o["key_len"], "batch": o["batch"]}, 1, prefix="passkey error")
    check_range({"trials": o["trials"], "batch": o["batch"]}, 1, 100_000, prefix="passkey error")
    check_range({"key_len": o["key_len"]}, 1, 1000, prefix="passkey error")
    eval_settings(reweight_p=o["reweight_p"], rope_scaling=o["rope_scaling"], rope_factor=o["rope_factor"],
                  logn_scale=o["logn_scale"])
    autocast_ctx(pick_device(o["device"]), o["dtype"])
    if not os.path.basename(o["out"]):  # '' or a folder: the files would be named .json, .csv, ...
        raise SystemExit(f"eval error: out names the result files without their extension, e.g. --out=results/passkey; "
                         f"got {o['out']!r}")
    writable_prefix(o["out"], "out", "eval error", (".json", ".csv", ".png"))


def main():
    o = configure(globals())
    if replot:
        res = read_results(replot, "eval", "eval_passkey.py", need=("length", "depth", "accuracy", "trials"),
                           what="passkey results (runs with lengths, depths and accuracies)")
        print(table(res))
        print(f"wrote {plot_results(res, replot.removesuffix('.json'))}")
        return
    check_options(o)
    ckpt_dirs = parse_names(ckpts, "ckpts", "eval error")
    res = evaluate(ckpt_dirs, multipliers=multipliers, lengths=lengths, depths=depths, n_trials=trials, seed=seed,
                   n_key=key_len, filler=filler, batch_size=batch, device=device, dtype=dtype, reweight_p=reweight_p,
                   rope_scaling=rope_scaling, rope_factor=rope_factor, logn_scale=logn_scale)
    print(table(res))
    for p in write_results(res, out, "python " + " ".join(sys.argv)):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
