"""
Attention diagnostics vs context length: how sharp each head's rows are, how much weight goes to the first
token (the attention sink), and how many weights are exactly zero (LSSAR's ReLU makes rows sparse).

    python diagnose.py --ckpts=out-shakespeare-char-softmax,out-shakespeare-char-lssa,out-shakespeare-char-lssar

For each checkpoint and length L (1x..16x its block_size), a few validation windows of L tokens go through the
model; in every layer the attention weights of the LAST block_size query rows (the rows that sit at ~L tokens
of context) are handed to a model.AttentionProbe chunk by chunk during the forward pass (the math backend's
code; never a full T x T matrix) and summarised per layer and head:
  entropy  - mean over rows of -sum_j w_ij log w_ij (nats); log(N) would be uniform over N keys
  sink     - mean weight on key 0
  zeros    - fraction of the visible weights that are exactly 0
  max      - mean of each row's largest weight
  near     - mean weight on the keys within the training context of the query (distance < block_size): how
             much of a row stays local at 16x (forget gates and stick-breaking put almost all of it there)
Unnormalised kinds (sigmoid, relu) are summarised on their rows divided by the row sum (entropy, sink, max).
The validation data must be the data each checkpoint was trained on (its fingerprint); --allow_other_data=True
takes other data of the same vocabulary, recorded in the results.
Writes <out>.json (per layer and head) and <out>.png (means over layers and heads vs length).
"""

import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from configurator import configure
from dataset import load_stream
from eval_length import checkpoint_lengths, colour, data_record, length_spec
from model import AttentionProbe
from options import check_range, parse_names, pick_device, writable_prefix
from runs import checked_config, load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
ckpts = ""
multipliers = "1,2,4,8,16"
lengths = ""
windows = 4              # validation windows per length
rows = 0                 # query rows summarised at the end of each window; 0 = the checkpoint's block_size
out = "results/diagnostics"
allow_other_data = False  # summarise on validation data other than the checkpoint's (same vocabulary), recorded
device = "auto"
# -----------------------------------------------------------------------------
STATS = ("entropy", "sink", "zeros", "max", "near")


def row_stats(w, first, window):
    """Sums over rows of each statistic, per head: w (B, H, rows, keys) of the query rows at absolute positions
    first, first + 1, ...; window: the training context (keys nearer than it count as near)."""
    n_rows = w.shape[2]
    dist = torch.arange(n_rows).view(-1, 1) + first - torch.arange(w.shape[3]).view(1, -1)  # (rows, keys): i - j
    visible = dist >= 0
    total = w.sum(-1, keepdim=True)
    a = w / total.clamp_min(torch.finfo(w.dtype).tiny)  # rows as distributions (a no-op for normalised kinds)
    ent = -(a * torch.log(a.clamp_min(torch.finfo(w.dtype).tiny))).sum(-1)
    zeros = ((w == 0) & visible).sum(-1).to(w.dtype)
    return {
        "entropy": ent.sum((0, 2)), "sink": a[..., 0].sum((0, 2)), "max": a.amax(-1).sum((0, 2)),
        "near": (a * (visible & (dist < window))).sum(-1).sum((0, 2)),
        "zeros": zeros.sum((0, 2)), "visible": visible.sum().to(w.dtype) * w.shape[0], "rows": w.shape[0] * n_rows,
    }


@torch.no_grad()
def stats_at_length(model, val, L, n_windows, n_rows, dev, pbar=None):
    """Per layer and head, the statistics of the last n_rows query rows of n_windows windows of L tokens."""
    acc = [None] * model.config.n_layer

    def summarise(layer, first, w):  # the probe: each layer's weights, chunk by chunk, during the forward
        s = row_stats(w.double().cpu(), first, model.config.block_size)
        acc[layer] = s if acc[layer] is None else {key: acc[layer][key] + s[key] for key in s}

    probe = AttentionProbe(summarise, last_rows=n_rows)
    for wi in range(n_windows):
        model(torch.from_numpy(val[wi * L:(wi + 1) * L].astype(np.int64))[None].to(dev), probe=probe)
        if pbar is not None:
            pbar.update(L)
    return [{key: (a[key] / (a["visible"] if key == "zeros" else a["rows"])).tolist() for key in STATS} for a in acc]


def diagnose_checkpoint(ck, lens, n_windows, n_rows, dev, pbar=None):
    model = model_from_checkpoint(ck, dev).eval()
    val = load_stream(ck["config"]["dataset"], "val", ck["config"].get("data_dir", ""))
    out = {}
    for L in lens:
        if L * n_windows + 1 > len(val):
            raise SystemExit(f"diagnose error: {n_windows} windows of {L} tokens need {L * n_windows + 1} validation "
                             f"tokens, the split has {len(val)}; lower --windows or the lengths")
        out[L] = stats_at_length(model, val, L, n_windows, n_rows, dev, pbar)
    return out, model.config


def diagnose(ckpt_dirs, *, multipliers="1,2,4,8,16", lengths="", n_windows=4, n_rows=0, device="auto",
             allow_other_data=False):
    dev = pick_device(device)
    loaded = {d: load_checkpoint(d, dev) for d in ckpt_dirs}
    plans, data = {}, {}
    for d, ck in loaded.items():  # everything that can fail, before any work
        plans[d] = checkpoint_lengths(d, ck["model_args"], lengths=lengths, multipliers=multipliers)
        checked_config(ck["model_args"], dev)  # e.g. a stored backend this device cannot run
        data[d] = data_record(ck, d, "diagnose error", allow_other_data)
        val, need = load_stream(ck["config"]["dataset"], "val", ck["config"].get("data_dir", "")), max(plans[d]) * n_windows + 1
        if need > len(val):
            raise SystemExit(f"diagnose error: {n_windows} windows of {max(plans[d])} tokens need {need} validation "
                             f"tokens, the split of {d} has {len(val)}; lower --windows or the lengths")
        top, vocab = int(val[:need].max()), ck["model_args"]["vocab_size"]
        if top >= vocab:
            raise SystemExit(f"diagnose error: vocab mismatch: {d} has {vocab} tokens but its validation data holds "
                             f"token id {top}; diagnose it on the dataset it was trained on")
    labels = [os.path.basename(os.path.normpath(d)).removeprefix("out-") for d in ckpt_dirs]
    common_prefix = os.path.commonprefix(labels) if len(labels) > 1 else ""
    common_prefix = common_prefix[:common_prefix.rfind("-") + 1]  # out-shakespeare-char-lssa -> lssa
    runs = []
    total = sum(sum(lens) * n_windows for lens in plans.values())
    with tqdm(total=total, unit="tok", unit_scale=True, desc="diagnose", file=sys.stderr) as pbar:
        for d, ck in loaded.items():
            margs = ck["model_args"]
            res, cfg = diagnose_checkpoint(ck, plans[d], n_windows, n_rows or margs["block_size"], dev, pbar)
            runs.append({"label": labels[len(runs)].removeprefix(common_prefix), "ckpt": d, "attn": cfg.attn,
                         "reweight_p": cfg.reweight_p, "block_size": margs["block_size"], "data": data[d],
                         "lengths": [{"length": L, "multiplier": L / margs["block_size"], "layers": res[L]}
                                     for L in plans[d]]})
    protocol = {"windows": n_windows, "rows": n_rows or "block_size", "data": "the first windows of val.bin",
                "stats": "per layer and head, averaged over the last `rows` query rows of each window"}
    return {"protocol": protocol, "runs": runs}


def mean_stat(length_entry, key):
    return float(np.mean([np.mean(layer[key]) for layer in length_entry["layers"]]))


def plot(res, out_prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"entropy": "row entropy (nats)", "sink": "weight on the first token", "zeros": "fraction of exact zeros",
              "max": "largest weight in a row", "near": "weight within the training context (i - j < T)"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    axes.flat[-1].axis("off")
    for ax, key in zip(axes.flat[:len(STATS)], STATS, strict=True):
        for i, r in enumerate(res["runs"]):
            xs = [x["length"] for x in r["lengths"]]
            ax.plot(xs, [mean_stat(x, key) for x in r["lengths"]], marker="o", color=colour(i, len(res["runs"])),
                    label=r["label"])
        if key == "entropy":
            xs = sorted({x["length"] for r in res["runs"] for x in r["lengths"]})
            ax.plot(xs, np.log(xs), color="gray", linestyle="--", linewidth=1, label="uniform over all keys (log N)")
        for bs in sorted({r["block_size"] for r in res["runs"]}):
            ax.axvline(bs, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length (tokens)", title=titles[key])
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Attention at the end of windows of growing length (means over layers and heads)")
    fig.tight_layout()
    fig.savefig(out_prefix + ".png", dpi=110)
    plt.close(fig)
    return out_prefix + ".png"


def table(res):
    lines = []
    for key in STATS:
        lens = sorted({x["length"] for r in res["runs"] for x in r["lengths"]})
        lines.append(f"{key:<28}" + "".join(f"{L:>9}" for L in lens))
        for r in res["runs"]:
            by = {x["length"]: mean_stat(x, key) for x in r["lengths"]}
            lines.append(f"  {r['label']:<26}" + "".join(f"{by[L]:9.4f}" if L in by else " " * 9 for L in lens))
    return "\n".join(lines)


def check_options(o):
    """Every option parsed and range-checked before any checkpoint is read or anything written."""
    if not o["ckpts"]:
        raise SystemExit("diagnose error: pass --ckpts=DIR[,DIR...] (out_dirs of trained runs)")
    parse_names(o["ckpts"], "ckpts", "diagnose error")
    check_range({"windows": o["windows"]}, 1, 10_000, prefix="diagnose error")
    check_range({"rows": o["rows"]}, 0, prefix="diagnose error")
    length_spec(o["lengths"], o["multipliers"])
    pick_device(o["device"])
    if not os.path.basename(o["out"]):  # '' or a folder: the files would be named .json, .csv, ...
        raise SystemExit(f"diagnose error: out names the result files without their extension, e.g. --out=results/diagnostics; "
                         f"got {o['out']!r}")
    writable_prefix(o["out"], "out", "diagnose error", (".json", ".png"))


def main():
    check_options(configure(globals()))
    ckpt_dirs = parse_names(ckpts, "ckpts", "diagnose error")
    res = diagnose(ckpt_dirs, multipliers=multipliers, lengths=lengths, n_windows=windows, n_rows=rows, device=device,
                   allow_other_data=allow_other_data)
    res["command"] = "python " + " ".join(sys.argv)
    print(table(res))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}.json\nwrote {plot(res, out)}")


if __name__ == "__main__":
    main()
