"""
Retrieval beyond the training length: can a model trained on the retrieval mixture (data/retrieval_char, the
task of retrieval.py) still find a key's value when the key lies 1x..64x its training context back?

    python eval_retrieval.py --ckpts=out-retrieval-char-softmax,out-retrieval-char-lssar
    python eval_retrieval.py --ckpts=... --lengths=1,2,4,8,16,32,64 --prompts=50 --out=results/retrieval_char/eval
    python eval_retrieval.py --replot=results/retrieval_char/eval.json

Protocol (printed and saved with the results): for each total length L = lengths x T (T: the checkpoint's
training context) and each distance bin [a T, b T) of --bins that fits in L, `prompts` prompts of L characters
(answer included): a window of the checkpoint's validation text (text_val.bin) with the target pair at a distance
d drawn uniformly from the bin (characters from the pair's key to the query's key), `distractors` pairs of other
keys at random places, and the query `{K` at the end (retrieval.prompt). The model decodes the value greedily
(argmax, KV cache); exact-match and per-character accuracy with binomial standard errors, per (length, bin) cell
and per bin over all lengths. Prompt i of a cell is drawn from (seed, L / T, bin, i): the same prompts for every
model of the same T. Also the language-model loss of the validation text alone at the same lengths (the same
tokens at every length, eval_length's protocol). A checkpoint trained without the task is refused.
Evaluation-time settings as eval_length.py's (--reweight_p, --rope_scaling, --rope_factor, --length_temp: comma
lists, ckpt = as trained), each combination evaluated and labelled.
Writes <out>.json (protocol, command, per-cell results), <out>.csv, <out>.md, <out>.png (a heatmap per model:
distance bin x length) and <out>_distance.png (accuracy vs distance, every model).
"""

import csv
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from configurator import configure
from dataset import compare_data, data_dir_for, dataset_fingerprint, load_meta
from eval_length import (
    applies,
    attention_record,
    colour,
    eval_settings,
    eval_time,
    loss_at_length,
    save_json,
    token_budget,
    write_all,
)
from options import autocast_ctx, check_range, parse_names, parse_numbers, pick_device, read_results, writable_prefix
from retrieval import PAIR, prompt, score, task_of
from runs import checked_config, load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
ckpts = ""               # comma-separated out_dirs (or ckpt.pt files) of runs trained on a retrieval dataset
lengths = "1,2,4,8,16"   # total prompt lengths as multiples of each checkpoint's training context T
bins = "0,1,2,4,8,16"    # distance bin edges in units of T: [0, 1), [1, 2), ... (a bin needs its start < length)
prompts = 40             # prompts per (length, bin) cell
distractors = 4          # pairs of other keys in every prompt
seed = 1337
lm_tokens = 16384        # validation-text tokens for the language-model loss at each length (0: none)
batch = 8                # prompts decoded at once
# evaluation-time settings, each a comma list evaluated per checkpoint (ckpt = as trained), as eval_length.py's
reweight_p = "ckpt"
rope_scaling = "ckpt"
rope_factor = 0.0
length_temp = "ckpt"     # ckpt, none, logn, irope: the length temperature of every global layer
out = "results/retrieval"
replot = ""              # a results .json: redraw its plots (and print its table) without evaluating
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
MAX_MULTIPLE = 1024      # lengths and bins past 1024 T would take days on a CPU


def parse_options(lengths_, bins_, prompts_, distractors_, batch_, lm_tokens_, prefix="eval error"):
    """Every option that can be checked before a checkpoint is read: (lengths, bin edges) as numbers."""
    lens = parse_numbers(lengths_, "lengths", float, prefix=prefix, example="1,2,4,8,16",
                         ok=lambda x: 0 < x <= MAX_MULTIPLE, what=f"multiples of T in (0, {MAX_MULTIPLE}]")
    edges = parse_numbers(bins_, "bins", float, prefix=prefix, example="0,1,2,4,8,16",
                          ok=lambda x: 0 <= x <= MAX_MULTIPLE, what=f"bin edges in units of T, in [0, {MAX_MULTIPLE}]")
    if len(edges) < 2 or edges != sorted(edges):
        raise SystemExit(f"{prefix}: bins must be at least two increasing edges in units of T, e.g. --bins=0,1,2,4,8; "
                         f"got {bins_!r}")
    if not any(e < max(lens) for e in edges[:-1]):
        raise SystemExit(f"{prefix}: no distance bin starts below the longest length {max(lens):g} T; lower --bins or "
                         "raise --lengths")
    check_range({"prompts": prompts_, "batch": batch_}, 1, prefix=prefix)
    check_range({"distractors": distractors_, "lm_tokens": lm_tokens_}, 0, prefix=prefix)
    check_range({"prompts": prompts_}, 1, 100_000, prefix=prefix)
    return sorted(lens), edges


def cells(T, lens, edges, task):
    """The (length in characters, multiple, bin (a, b), distances) cells of a checkpoint of training context T: a bin
    is evaluated at a length when some distance of it fits (distance <= L - the query's and the answer's room)."""
    out = []
    for m in lens:
        L = int(round(m * T))
        top = L - task.value_len - task.key_len - 1  # the largest distance a prompt of L characters holds
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            lo, hi = max(int(math.ceil(a * T)), task.item_len), min(int(math.ceil(b * T)) - 1, top)
            if lo <= hi:
                out.append((L, m, (a, b), (lo, hi)))
    return out


def text_of(ids, itos):
    return "".join(itos[int(i)] for i in ids)


def job(d, ck, ov, lens, edges, dev):
    """Everything about one checkpoint with eval-time settings ov that can be checked before any evaluation: its
    task, data, cells and model config."""
    cfg, margs = ck["config"], ck["model_args"]
    meta = load_meta(cfg["dataset"], cfg.get("data_dir", ""))
    task = task_of(meta)
    if task is None:
        raise SystemExit(f"eval error: {d} was trained on {cfg['dataset']!r}, which has no retrieval task (no "
                         "meta['retrieval']); evaluate a run trained on data/retrieval_char (config/train_retrieval_char.py)")
    data_dir = data_dir_for(cfg["dataset"], cfg.get("data_dir", ""))
    compare_data(ck.get("data"), dataset_fingerprint(cfg["dataset"], cfg.get("data_dir", "")), d, "eval error")
    path = os.path.join(data_dir, meta["retrieval"]["text_val"])
    if not os.path.exists(path):
        raise SystemExit(f"eval error: {path} is missing: re-run data/retrieval_char/prepare.py (it writes the "
                         "validation text the prompts take their filler from)")
    text = np.fromfile(path, dtype=np.uint16)
    T = margs["block_size"]
    if margs.get("pos") == "learned" and max(lens) > 1:
        raise SystemExit(f"eval error: {d} uses learned position embeddings, which stop at block_size={T}; "
                         "evaluate it with --lengths=1 or train with pos='rope'")
    plan = cells(T, lens, edges, task)
    if max(L for L, *_ in plan) > len(text):
        raise SystemExit(f"eval error: a prompt of {max(L for L, *_ in plan)} characters needs that much validation "
                         f"text; {path} holds {len(text)}: lower --lengths")
    eff, trained, label = eval_time(d, margs, ov)
    checked_config(margs, dev, **ov)
    return dict(ckpt=d, ck=ck, ov=ov, task=task, meta=meta, text=text, T=T, plan=plan,
                record=attention_record(eff, trained), label=label)


def make_prompts(j, cell, n, seed_, n_distractors):
    """The n prompts of a cell (ids), their answers (strings), distances, and whether a distractor pair lies between
    the target pair and the query (crossed), each prompt from (seed, length multiple, bin, i)."""
    L, m, (a, b), (lo, hi) = cell
    itos, stoi, text, task = j["meta"]["itos"], j["meta"]["stoi"], j["text"], j["task"]
    ids, answers, dists, crossed = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed_, int(round(m * 1000)), int(round(a * 1000)), int(round(b * 1000)), i])
        d = int(rng.integers(lo, hi + 1))
        s = int(rng.integers(0, len(text) - L + 1))
        body, value, _ = prompt(text_of(text[s:s + L], itos), rng, task, L, d, n_distractors)
        ids.append([stoi[c] for c in body])
        answers.append(value)
        dists.append(d)
        crossed.append(PAIR[0] in body[len(body) - task.key_len - d:])  # after the target pair's `[`
    return torch.tensor(ids, dtype=torch.long), answers, dists, crossed


def crossed_accuracy(run):
    """Exact-match accuracy over the prompts (all cells) with a distractor pair between the target and the query:
    a model that copies the nearest pair's value, whatever its key, scores 0 here and full marks on the others.
    (accuracy, prompts); (None, 0) for evaluations made before the split was recorded, or rows aggregated over seeds:
    their own mean."""
    if "crossed_exact" in run:  # a sweep row: the mean over seeds
        return run["crossed_exact"], run.get("crossed_prompts", 0)
    cs = [c for c in run["cells"] if "crossed" in c]
    n = sum(c["crossed"] for c in cs)
    return (sum(c["crossed_right"] for c in cs) / n if n else None), n


@torch.no_grad()
def decode(model, x, n, ctx, dev, batch_size, pbar=None):
    """The n tokens the model decodes greedily after each prompt (equal-length prompts, batched)."""
    outs = []
    for i in range(0, len(x), batch_size):
        with ctx:
            y = model.generate(x[i:i + batch_size].to(dev), n, temperature=0)
        outs.append(y[:, -n:].cpu())
        if pbar is not None:
            pbar.update(len(y))
    return torch.cat(outs)


def binomial_se(k, n):
    p = k / n
    return math.sqrt(p * (1 - p) / n)


def evaluate(specs, *, lengths="1,2,4,8,16", bins="0,1,2,4,8,16", n_prompts=40, n_distractors=4, seed=1337,
             lm_tokens=16384, batch_size=8, device="auto", dtype="auto", empty_ok=False):
    """Retrieval accuracy of each (checkpoint, eval-time settings) of specs per (length, distance bin), and its
    language-model loss on the validation text at each length; the results dict write_results saves. Fails before
    evaluating anything when a checkpoint, its data or a length cannot work; skips (and records) settings that do
    not apply to a checkpoint (a RoPE extension of a model without RoPE). empty_ok: no specs left is no error."""
    lens, edges = parse_options(lengths, bins, n_prompts, n_distractors, batch_size, lm_tokens)
    dev = pick_device(device)
    ctx, dt = autocast_ctx(dev, dtype)
    jobs, loaded, skipped = [], {}, []
    for d, ov in specs:
        ck = loaded[d] = loaded.get(d) or load_checkpoint(d, dev)
        if not applies(ck["model_args"], ov):
            skipped.append({"ckpt": d, "eval": ov, "why": "no layer with RoPE to extend"})
            continue
        jobs.append(job(d, ck, ov, lens, edges, dev))
    if not jobs and not empty_ok:
        raise SystemExit("eval error: no checkpoint takes the eval-time settings asked for")
    for j in jobs:  # the language-model budget: the same tokens at every length
        longest = max(L for L, *_ in j["plan"])
        j["lm_lens"] = sorted({L for L, *_ in j["plan"]})
        j["lm_budget"] = token_budget(len(j["text"]), j["lm_lens"], requested=max(lm_tokens, longest)) if lm_tokens else 0
    total = sum(n_prompts * len(j["plan"]) for j in jobs)
    runs = []
    with tqdm(total=total, unit="prompt", desc="eval_retrieval", file=sys.stderr) as pbar:
        for j in jobs:
            model = model_from_checkpoint(j["ck"], dev, **j["ov"]).eval()
            cells_out = []
            for cell in j["plan"]:
                L, m, (a, b), (lo, hi) = cell
                pbar.set_postfix_str(f"{j['label']} L={m:g}T bin {a:g}-{b:g}T")
                t0 = time.time()
                x, truth, dists, crossed = make_prompts(j, cell, n_prompts, seed, n_distractors)
                try:
                    got = decode(model, x, j["task"].value_len, ctx, dev, batch_size, pbar)
                except ValueError as e:
                    raise SystemExit(f"eval error: {j['label']} ({j['ckpt']}) at {m:g} T: {e}; nothing was written: "
                                     "evaluate a checkpoint that did not diverge, or drop the eval-time setting") from None
                answers = [text_of(g, j["meta"]["itos"]) for g in got]
                exact, right, chars = score(answers, truth)
                wrong = [{"distance": d, "value": t, "output": o} for d, t, o in zip(dists, truth, answers, strict=True)
                         if o != t][:2]
                cells_out.append({"length": L, "multiple": m, "bin": [a, b], "distances": [lo, hi], "prompts": n_prompts,
                                  "exact": exact / n_prompts, "exact_se": binomial_se(exact, n_prompts),
                                  "chars": right / chars, "chars_se": binomial_se(right, chars),
                                  "crossed": sum(crossed), "crossed_right": sum(o == t for o, t, c in zip(
                                      answers, truth, crossed, strict=True) if c),
                                  "seconds": round(time.time() - t0, 2), "wrong_examples": wrong})
            lm = []
            if j["lm_budget"]:
                for L in j["lm_lens"]:
                    tot, cnt, _ = loss_at_length(model, j["text"], L, budget=j["lm_budget"], ctx=ctx, device=dev)
                    if not math.isfinite(tot / cnt):
                        raise SystemExit(f"eval error: {j['label']} ({j['ckpt']}) at length {L}: the text's loss is "
                                         f"{tot / cnt}; nothing was written")
                    lm.append({"length": L, "multiple": L / j["T"], "loss": tot / cnt, "tokens": cnt})
            runs.append({"label": j["label"], "ckpt": j["ckpt"], "eval": j["ov"], **j["record"], "block_size": j["T"],
                         "dataset": j["ck"]["config"]["dataset"], "iter_num": j["ck"]["iter_num"],
                         "task": j["task"].as_meta(), "cells": cells_out, "lm": lm})
            del model
    protocol = {
        "prompt": "validation text with the target pair [KVVV] at the given distance (characters from its key to "
                  "the query's key), distractor pairs of other keys at random places, the query {K at the end",
        "length": "total characters including the answer; the model reads length - value_len characters",
        "decoding": "greedy (argmax) with a KV cache; exact = every answer character right",
        "prompts": f"{n_prompts} per (length, bin) cell, prompt i drawn from (seed={seed}, length / T, bin, i)",
        "distractors": n_distractors, "bins": edges, "lengths": lens,
        "lm": f"loss of the validation text alone, the first {jobs[0]['lm_budget'] if jobs else 0} tokens at every "
              "length, non-overlapping windows",
        "device": dev, "dtype": dt, "batch": batch_size,
    }
    return {"protocol": protocol, "runs": runs} | ({"skipped": skipped} if skipped else {})


def by_bin(run):
    """Per distance bin over all lengths: (bin, exact, its error bar, prompts): the binomial s.e., or for rows that
    aggregate seeds (sweep.py) their own by_bin, whose error is the std over seeds."""
    if "by_bin" in run:
        return [(tuple(b["bin"]), b["exact"], b["exact_std"], b["prompts"]) for b in run["by_bin"]]
    out = {}
    for c in run["cells"]:
        k = tuple(c["bin"])
        e, n = out.get(k, (0.0, 0))
        out[k] = (e + c["exact"] * c["prompts"], n + c["prompts"])
    return [(k, e / n, binomial_se(e, n), n) for k, (e, n) in out.items()]


def table(res):
    """The protocol, then per run the exact-match accuracy (%) per distance bin (all lengths), and its LM loss."""
    lines = ["protocol: " + "; ".join(f"{k}: {v}" for k, v in res["protocol"].items())]
    edges = res["protocol"]["bins"]
    heads = [f"{a:g}-{b:g}T" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    w = max(max(len(r["label"]) for r in res["runs"]) + 2, 12)
    lines += ["exact-match accuracy (%) by key-query distance, all lengths; 'between': the prompts with a distractor "
              "pair between the target and the query", "run".ljust(w) + "".join(f"{h:>10}" for h in heads)
              + f"{'between':>10}   LM loss 1x, last"]
    for r in res["runs"]:
        bb = {f"{a:g}-{b:g}T": acc for (a, b), acc, _, _ in by_bin(r)}
        cx, _ = crossed_accuracy(r)
        lm = f"   {r['lm'][0]['loss']:.3f}, {r['lm'][-1]['loss']:.3f}" if r["lm"] else ""
        lines.append(r["label"].ljust(w) + "".join(f"{100 * bb[h]:10.0f}" if h in bb else " " * 10 for h in heads)
                     + (f"{100 * cx:10.0f}" if cx is not None else " " * 10) + lm)
    return "\n".join(lines)


def write_results(res, out_prefix, command):
    """<out>.json, .csv, .md and the two plots, all or none (eval_length.write_all)."""
    def make(prefix):
        plot(res, prefix)
        _write_tables(res, prefix, command)
    return write_all(out_prefix, [".json", ".csv", ".md", ".png", "_distance.png"], make)


def _write_tables(res, prefix, command):
    res = save_json(res, prefix, command)
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "ckpt", "block_size", "length", "multiple", "bin_start", "bin_end", "prompts", "exact",
                    "exact_se", "chars", "chars_se", "crossed", "crossed_right"])
        for r in res["runs"]:
            for c in r["cells"]:
                w.writerow([r["label"], r["ckpt"], r["block_size"], c["length"], f"{c['multiple']:g}", f"{c['bin'][0]:g}",
                            f"{c['bin'][1]:g}", c["prompts"], f"{c['exact']:.4f}", f"{c['exact_se']:.4f}",
                            f"{c['chars']:.4f}", f"{c['chars_se']:.4f}", c.get("crossed", ""), c.get("crossed_right", "")])
    with open(prefix + ".md", "w") as f:
        f.write(f"`{command}`\n\n```\n{table(res)}\n```\n")


def grid(run):
    """(length multiples, bins, exact matrix bin x length) of a run (NaN where a bin does not fit a length)."""
    mults = sorted({c["multiple"] for c in run["cells"]})
    bins_ = sorted({tuple(c["bin"]) for c in run["cells"]})
    acc = np.full((len(bins_), len(mults)), np.nan)
    for c in run["cells"]:
        acc[bins_.index(tuple(c["bin"])), mults.index(c["multiple"])] = c["exact"]
    return mults, bins_, acc


def plot(res, prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(res["runs"])
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 + 3.4 * cols, 0.6 + 3.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    im = None
    for ax, r in zip(axes.flat[:n], res["runs"], strict=True):
        mults, bins_, acc = grid(r)
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, k), a in np.ndenumerate(acc):
            if np.isfinite(a):
                ax.text(k, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if 0.2 < a < 0.85 else "white")
        ax.set_xticks(range(len(mults)), [f"{m:g}T" for m in mults], fontsize=7)
        ax.set_yticks(range(len(bins_)), [f"{a:g}-{b:g}T" for a, b in bins_], fontsize=7)
        ax.set_title(r["label"], fontsize=8)
        ax.set_xlabel("prompt length", fontsize=7)
    for row in axes:
        row[0].set_ylabel("key-query distance", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label="exact-match accuracy", shrink=0.8)
    fig.suptitle(f"Retrieval by distance and length ({res['runs'][0]['cells'][0]['prompts']} prompts per cell)", fontsize=9)
    fig.savefig(prefix + ".png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8 if n <= 10 else 11, 4.8))
    for i, r in enumerate(res["runs"]):
        pts = sorted(by_bin(r))
        x = [math.sqrt(max(a, 0.5) * b) for (a, b), *_ in pts]  # the bin's geometric middle (0.5 T for the first)
        ax.errorbar(x, [acc for _, acc, _, _ in pts], yerr=[se for _, _, se, _ in pts], marker="o", capsize=3,
                    color=colour(i, n), label=r["label"])
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="key-query distance (multiples of the training context T)", ylabel="exact-match accuracy",
           title="Retrieval accuracy vs distance (all lengths; +-1 binomial s.e.)", ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right" if n <= 10 else "upper left",
              **({} if n <= 10 else dict(bbox_to_anchor=(1.01, 1.0))))
    fig.tight_layout()
    fig.savefig(prefix + "_distance.png", dpi=120)
    plt.close(fig)
    return [prefix + ".png", prefix + "_distance.png"]


def check_options(o):
    """Every option parsed and range-checked before any checkpoint is read or anything written; returns the
    eval-time settings."""
    if o["replot"]:
        return []
    if not o["ckpts"]:
        raise SystemExit("eval error: pass --ckpts=DIR[,DIR...] (out_dirs of runs trained on data/retrieval_char)")
    parse_names(o["ckpts"], "ckpts", "eval error")
    parse_options(o["lengths"], o["bins"], o["prompts"], o["distractors"], o["batch"], o["lm_tokens"])
    check_range({"batch": o["batch"]}, 1, 100_000, prefix="eval error")
    check_range({"distractors": o["distractors"]}, 0, 1000, prefix="eval error")
    settings = eval_settings(reweight_p=o["reweight_p"], rope_scaling=o["rope_scaling"], rope_factor=o["rope_factor"],
                             length_temp=o["length_temp"])
    autocast_ctx(pick_device(o["device"]), o["dtype"])
    if not os.path.basename(o["out"]):
        raise SystemExit(f"eval error: out names the result files without their extension, e.g. --out=results/retrieval; "
                         f"got {o['out']!r}")
    writable_prefix(o["out"], "out", "eval error", (".json", ".csv", ".md", ".png", "_distance.png"))
    return settings


def main():
    o = configure(globals())
    if replot:
        res = read_results(replot, "eval", "eval_retrieval.py")
        if not (isinstance(res, dict) and res.get("runs") and all(isinstance(r, dict) and r.get("cells")
                                                                  for r in res["runs"])):
            raise SystemExit(f"eval error: {replot!r} holds no retrieval results; pass a .json that eval_retrieval.py wrote")
        print(table(res))
        for p in plot(res, replot.removesuffix(".json")):
            print(f"wrote {p}")
        return
    settings = check_options(o)
    specs = [(d, ov) for d in parse_names(ckpts, "ckpts", "eval error") for ov in settings]
    res = evaluate(specs, lengths=lengths, bins=bins, n_prompts=prompts, n_distractors=distractors, seed=seed,
                   lm_tokens=lm_tokens, batch_size=batch, device=device, dtype=dtype)
    print(table(res))
    for p in write_results(res, out, "python " + " ".join(sys.argv)):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
