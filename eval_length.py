"""
Validation loss at 1x..16x the training context: which attention keeps its loss flat past its training length.

    python eval_length.py --ckpts=out-shakespeare-char-softmax,out-shakespeare-char-lssar
    python eval_length.py --ckpts=out-shakespeare-char-lssa --reweight_p=ckpt,15   # re-weighting at eval only
    python eval_length.py --ckpts=... --lengths=64,512,2048 --stride=32 --out=results/my_eval
    python eval_length.py --replot=results/my_eval.json   # redraw the plots of saved results

Protocol (printed and saved with the results): the same validation tokens at every length (the first
`tokens` tokens of val.bin, cut into non-overlapping windows of the evaluated length; by default as many as
fit a whole number of windows of the largest length), loss = mean over every predicted token (not a mean
of per-batch means), deterministic, batches of at most `batch_tokens` tokens. With --stride=S each window
of length L advances by S tokens and only its last S predictions are scored (the first window scores all),
so every token is scored once with up to L-1 tokens of context.
Writes <out>.json, <out>.csv and two plots: <out>.png (loss vs length) and <out>_detail.png (loss at the
largest length / loss at 1x, and loss by position inside the longest window).
"""

import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from common import (
    autocast_ctx,
    load_checkpoint,
    load_stream,
    model_from_checkpoint,
    parse_list,
    parse_reweight_p,
    pick_device,
)
from configurator import configure
from model import GPTConfig

# -----------------------------------------------------------------------------
ckpts = ""               # comma-separated out_dirs (or ckpt.pt files)
multipliers = "1,2,4,8,16"  # x the training block_size of each checkpoint
lengths = ""             # explicit context lengths instead of multipliers, e.g. "64,256,1024"
tokens = 0               # validation-token budget per length; 0 = as many as fit whole windows of the largest length
stride = 0               # 0: non-overlapping windows; S > 0: sliding windows scoring the last S tokens each
reweight_p = "ckpt"      # comma list of eval-time re-weighting powers: ckpt = as trained, 0 = off, 15 = LSSAR
attn_backend = ""        # override the attention backend (auto | reference | math | sdpa | flex | triton); "" = the checkpoint's
batch_tokens = 16384     # at most this many tokens per forward pass (bounds memory)
position_buckets = 32    # loss-by-position buckets per length
out = "results/eval_length"
device = "auto"
dtype = "auto"
plot = True
replot = ""              # path to a results .json: redraw its plots without evaluating anything
# -----------------------------------------------------------------------------


def eval_lengths(block_size, *, lengths="", multipliers="1,2,4,8,16"):
    if lengths:
        return sorted(set(parse_list(lengths, int)))
    return sorted({int(round(block_size * m)) for m in parse_list(multipliers, float)})


def checkpoint_lengths(ckpt_dir, margs, *, lengths="", multipliers="1,2,4,8,16"):
    """The lengths to evaluate a checkpoint at; a learned-position model asked to go past its block_size is a
    one-line error (shared by eval_length.py, diagnose.py and eval_passkey.py)."""
    lens = eval_lengths(margs["block_size"], lengths=lengths, multipliers=multipliers)
    if margs.get("pos") == "learned" and max(lens) > margs["block_size"]:
        raise SystemExit(f"eval error: {ckpt_dir} uses learned position embeddings, which stop at block_size="
                         f"{margs['block_size']}; evaluate it with --lengths up to {margs['block_size']} "
                         "or train with pos='rope'")
    return lens


def token_budget(n_val, lens, *, requested=0, stride=0):
    """Tokens scored at every length: the same prefix of val.bin at each one. Non-overlapping windows need
    the budget to be a whole number of windows of every length; it then ends 1 token early for the targets."""
    avail = n_val - 1
    if requested:
        if requested > avail:
            raise SystemExit(f"eval error: tokens={requested} but the validation split has only {avail} "
                             "predictable tokens; lower --tokens")
        budget = requested
    else:
        budget = avail
    if not stride:
        # a whole number of windows of every length; if the lengths' lcm does not fit, of the largest one
        # (shorter lengths that do not divide it then drop the last partial window: recorded as their tokens)
        lcm = math.lcm(*lens)
        budget = budget // lcm * lcm if budget >= lcm else budget // max(lens) * max(lens)
        if budget == 0:
            raise SystemExit(f"eval error: length {max(lens)} needs at least {max(lens) + 1} validation tokens but "
                             f"{n_val} are available; evaluate shorter lengths (--lengths or --multipliers)")
    elif budget < max(lens):
        raise SystemExit(f"eval error: length {max(lens)} is longer than the {budget} validation tokens available")
    return budget


def window_plan(budget, L, stride=0):
    """(start, first scored position) of each window; scored positions run to the window's end."""
    if not stride:
        return [(s, 0) for s in range(0, budget - L + 1, L)]
    plan, s = [(0, 0)], 0
    while s + L < budget:
        nxt = min(s + stride, budget - L)  # the last window ends exactly at the budget
        plan.append((nxt, L - (nxt - s)))
        s = nxt
    return plan


@torch.no_grad()
def loss_at_length(model, data, L, *, budget, stride=0, ctx=None, device="cpu", buckets=32, batch_tokens=16384, pbar=None):
    """Sum and count of the scored token losses at context length L over the first `budget` tokens of data, and
    the loss by position (`buckets` log-spaced buckets); at most batch_tokens tokens per forward pass."""
    plan = window_plan(budget, L, stride)
    ctx = ctx or nullcontext()  # autocast, or nothing
    B = max(1, batch_tokens // L)
    pos_sum, pos_cnt = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    for i in range(0, len(plan), B):
        chunk = plan[i:i + B]
        x = torch.stack([torch.from_numpy(data[s:s + L].astype(np.int64)) for s, _ in chunk]).to(device)
        y = torch.stack([torch.from_numpy(data[s + 1:s + 1 + L].astype(np.int64)) for s, _ in chunk]).to(device)
        with ctx:
            _, loss = model(x, y, reduction="none")
        loss = loss.view(len(chunk), L).double().cpu()
        keep = torch.stack([torch.arange(L) >= first for _, first in chunk]).double()
        pos_sum += (loss * keep).sum(0)
        pos_cnt += keep.sum(0)
        if pbar is not None:
            pbar.update(int(keep.sum()))
    total, count = pos_sum.sum().item(), int(pos_cnt.sum().item())
    # log-spaced buckets: fine near the start of the window, where the training length sits on a log axis
    edges = np.unique(np.concatenate([[0], np.geomspace(1, L, buckets).round().astype(int)]))
    by_position = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        c = pos_cnt[a:b].sum().item()
        if c:
            by_position.append({"start": int(a), "end": int(b), "loss": pos_sum[a:b].sum().item() / c, "tokens": int(c)})
    return total, count, by_position


def eval_time_p(ckpt_dir, margs, p):
    """What evaluating a checkpoint at eval-time re-weighting power p ("ckpt" = as trained, or a number) means:
    (model_from_checkpoint overrides, attention variant, p in effect, trained p, run label)."""
    try:
        trained = GPTConfig(**margs)  # canonical: ('lssar', 0.0) in an older checkpoint reads as ('lssa', 15.0)
        overrides = {} if p == "ckpt" else {"reweight_p": parse_reweight_p(p)}
        eff = replace(trained, **overrides)
    except ValueError as e:
        raise SystemExit(f"eval error: {ckpt_dir}: {e}") from None
    label = os.path.basename(os.path.normpath(ckpt_dir)).removeprefix("out-")
    label += "" if p == "ckpt" else f" (eval p={eff.reweight_p:g})"
    return overrides, trained.attn, eff.reweight_p, trained.reweight_p, label


def evaluate(specs, *, multipliers="1,2,4,8,16", lengths="", tokens=0, stride=0, backend="", device="auto",
             dtype="auto", buckets=32, batch_tokens=16384):
    """Evaluate each (checkpoint dir, eval-time reweight_p: "ckpt" = as trained, or a number) at every length;
    returns the results dict that write_results() saves. Fails before evaluating anything when a checkpoint or
    a length cannot work. The keywords mean what the script's keys of the same names mean."""
    dev = pick_device(device)
    ctx, dt = autocast_ctx(dev, dtype)
    jobs, loaded = [], {}
    for d, p in specs:
        if d not in loaded:
            loaded[d] = load_checkpoint(d, dev)
        ck = loaded[d]
        cfg, margs = ck["config"], ck["model_args"]
        lens = checkpoint_lengths(d, margs, lengths=lengths, multipliers=multipliers)
        val = load_stream(cfg["dataset"], "val", cfg.get("data_dir", ""))
        budget = token_budget(len(val), lens, requested=tokens, stride=stride)
        top = int(val[:budget + 1].max())
        if top >= margs["vocab_size"]:
            raise SystemExit(f"eval error: vocab mismatch: {d} has {margs['vocab_size']} tokens but its validation "
                             f"data holds token id {top}; evaluate it on the dataset it was trained on")
        overrides, name, eff_p, trained_p, label = eval_time_p(d, margs, p)
        if backend:
            overrides["attn_backend"] = backend
        jobs.append(dict(ckpt=d, ckpt_data=ck, val=val, lens=lens, budget=budget, overrides=overrides, label=label,
                         attn=name, reweight_p=eff_p, trained_reweight_p=trained_p, block_size=margs["block_size"],
                         dataset=cfg["dataset"], iter_num=ck["iter_num"]))
    total_tokens = sum(j["budget"] * len(j["lens"]) for j in jobs)
    runs = []
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="eval_length", file=sys.stderr) as pbar:
        for j in jobs:
            model = model_from_checkpoint(j["ckpt_data"], dev, **j["overrides"]).eval()
            results = []
            for L in j["lens"]:
                pbar.set_postfix_str(f"{j['label']} @ {L}")
                t0 = time.time()
                total, count, bks = loss_at_length(model, j["val"], L, budget=j["budget"], stride=stride, ctx=ctx, device=dev,
                                                   buckets=buckets, batch_tokens=batch_tokens, pbar=pbar)
                results.append({"length": L, "multiplier": L / j["block_size"], "loss": total / count,
                                "tokens": count, "seconds": round(time.time() - t0, 2), "position_buckets": bks})
            runs.append({k: j[k] for k in ("label", "ckpt", "attn", "reweight_p", "trained_reweight_p", "block_size",
                                           "dataset", "iter_num", "overrides", "budget")} | {"results": results})
            del model
    protocol = {
        "windows": f"sliding, stride {stride}" if stride else "non-overlapping",
        "loss": "mean cross-entropy (nats) over every scored token",
        "data": "the first tokens of each checkpoint's val.bin, the same at every length",
        "device": dev, "dtype": dt, "batch_tokens": batch_tokens, "attn_backend": backend or "checkpoint's",
    }
    return {"protocol": protocol, "runs": runs}


def save_json(res, out_prefix, command):
    """<out_prefix>.json with the command that made it (the folder is created); returns what was written."""
    res = dict(res, command=command)
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
        json.dump(res, f, indent=1)
    return res


def write_results(res, out_prefix, command, make_plot=True):
    res = save_json(res, out_prefix, command)
    with open(out_prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "ckpt", "attn", "reweight_p", "trained_reweight_p", "block_size", "length", "multiplier",
                    "loss", "tokens"])
        for r in res["runs"]:
            for x in r["results"]:
                w.writerow([r["label"], r["ckpt"], r["attn"], r["reweight_p"], r["trained_reweight_p"], r["block_size"],
                            x["length"], x["multiplier"], f"{x['loss']:.5f}", x["tokens"]])
    paths = [out_prefix + ".json", out_prefix + ".csv"]
    if make_plot:
        paths += plot_results(res, out_prefix)
    return paths


def table(res):
    """The protocol and a loss table (rows: runs, columns: lengths) as text."""
    proto = "protocol: " + "; ".join(f"{k}: {v}" for k, v in res["protocol"].items())
    proto += "; tokens per length: " + ", ".join(sorted({str(r["budget"]) for r in res["runs"]}))
    lens = sorted({x["length"] for r in res["runs"] for x in r["results"]})
    w = max(len(r["label"]) for r in res["runs"]) + 2
    lines = [proto, "attention".ljust(w) + "".join(f"{L:>9}" for L in lens)]
    for r in res["runs"]:
        by = {x["length"]: x["loss"] for x in r["results"]}
        lines.append(r["label"].ljust(w) + "".join(f"{by[L]:9.4f}" if L in by else " " * 9 for L in lens))
    return "\n".join(lines)


def _curves(ax, res, xy, xlabel, ylabel, title, fontsize=8):
    """One line per run (same colour in every plot; dashed when reweight_p was changed at evaluation), the
    training length marked, log2 x-axis."""
    for i, r in enumerate(res["runs"]):
        xs, ys = xy(r)
        ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, color=f"C{i}", label=r["label"],
                linestyle="--" if r["reweight_p"] != r["trained_reweight_p"] else "-")
    for bs in sorted({r["block_size"] for r in res["runs"]}):
        ax.axvline(bs, color="gray", linestyle=":", linewidth=1)
        ax.annotate(" training length", (bs, 0.01), xycoords=("data", "axes fraction"), color="gray", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize)


def plot_results(res, out_prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, res, lambda r: ([x["length"] for x in r["results"]], [x["loss"] for x in r["results"]]),
            "evaluation context length (tokens)", "validation loss (nats / token)", "Loss vs context length")
    fig.tight_layout()
    fig.savefig(out_prefix + ".png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["label"] for r in res["runs"]]
    ratios = [r["results"][-1]["loss"] / r["results"][0]["loss"] for r in res["runs"]]
    bars = a1.bar(range(len(labels)), ratios, color=[f"C{i}" for i in range(len(labels))])
    a1.bar_label(bars, fmt="%.2f", fontsize=8)
    a1.axhline(1.0, color="gray", linewidth=1)
    a1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    mults = {round(r["results"][-1]["multiplier"], 2) for r in res["runs"]}
    a1.set_ylabel(f"loss at {'/'.join(f'{m:g}' for m in sorted(mults))}x / loss at 1x (first length)")
    a1.set_title("Extrapolation penalty (1.0 = flat)")
    _curves(a2, res, lambda r: ([(b["start"] + b["end"]) / 2 for b in r["results"][-1]["position_buckets"]],
                                [b["loss"] for b in r["results"][-1]["position_buckets"]]),
            "position inside the longest window", "validation loss (bucket mean)", "Loss by position at the largest length",
            fontsize=7)
    fig.tight_layout()
    fig.savefig(out_prefix + "_detail.png", dpi=120)
    plt.close(fig)
    return [out_prefix + ".png", out_prefix + "_detail.png"]


def main():
    configure(globals())
    if replot:
        with open(replot) as f:
            res = json.load(f)
        for p in plot_results(res, replot.removesuffix(".json")):
            print(f"wrote {p}")
        return
    if not ckpts:
        raise SystemExit("eval error: pass --ckpts=DIR[,DIR...] (out_dirs of trained runs)")
    specs = [(d, parse_reweight_p(p, prefix="eval error")) for d in parse_list(ckpts) for p in parse_list(reweight_p)]
    res = evaluate(specs, multipliers=multipliers, lengths=lengths, tokens=tokens, stride=stride, backend=attn_backend,
                   device=device, dtype=dtype, buckets=position_buckets, batch_tokens=batch_tokens)
    print(table(res))
    command = "python " + " ".join(sys.argv)
    for p in write_results(res, out, command, plot):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
