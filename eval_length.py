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
Evaluation-time settings, each a comma list whose product is evaluated per checkpoint (ckpt = as trained) and
recorded in the results: --reweight_p (the re-weighting power), --rope_scaling (pi | ntk | yarn: RoPE extended
past the training length, by --rope_factor, or 0 = by length / block_size at each length), --length_temp (none |
logn | irope: the length temperature of every global layer; logn = scores x max(1, log N_i / log block_size), also
spelled --logn_scale=true).
Document-aware mode (--doc_sep=eot for BPE shards, or a text separator such as "\n\n"): windows only inside
single documents of at least L + 1 tokens, from the first such document on (--tokens per length, 0 = all);
each length reports the tokens and documents it used and warns below --min_docs documents.
Data identity: each checkpoint records a fingerprint of its dataset, and the validation data it is evaluated
on must match it (re-prepared or replaced data is refused in one line); --allow_other_data=True evaluates on
other data of the same vocabulary, and each run's results then record the data they used ("data"). A
non-finite loss is an error naming the run and length, never a number in the results.
Writes <out>.json, <out>.csv and two plots: <out>.png (loss vs length) and <out>_detail.png (loss at the
largest length / loss at 1x, and loss by position inside the longest window).
"""

import csv
import itertools
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from configurator import configure
from dataset import compare_data, dataset_fingerprint, get_tokenizer, load_meta, load_stream
from kernels import BACKENDS, DOTS
from model import LENGTH_TEMPS, GPTConfig
from options import (
    autocast_ctx,
    check_range,
    parse_names,
    parse_numbers,
    parse_reweight_list,
    pick_device,
    read_results,
    writable_prefix,
)
from runs import checked_config, load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
ckpts = ""               # comma-separated out_dirs (or ckpt.pt files)
multipliers = "1,2,4,8,16"  # x the training block_size of each checkpoint
lengths = ""             # explicit context lengths instead of multipliers, e.g. "64,256,1024"
tokens = 0               # validation-token budget per length; 0 = as many as fit whole windows of the largest length
stride = 0               # 0: non-overlapping windows; S > 0: sliding windows scoring the last S tokens each
reweight_p = "ckpt"      # comma list of eval-time re-weighting powers: ckpt = as trained, 0 = off, 15 = LSSAR
rope_scaling = "ckpt"    # comma list of RoPE extensions (RoPE models): ckpt = as trained, none, pi, ntk, yarn
rope_factor = 0.0        # their factor; 0 = per evaluated length (length / block_size)
logn_scale = "ckpt"      # comma list: ckpt, true (scores x max(1, log N_i / log block_size)), false
length_temp = "ckpt"     # comma list: ckpt, none, logn, irope: the length temperature of every global layer
attn_dots = "ckpt"       # comma list: ckpt, auto, fp32, bf16, fp16: the q . k dots' precision (bf16 / fp16 emulated
                         # exactly off the GPU: q, k rounded after the attention's prepare step)
doc_sep = ""             # "" = windows over the whole stream; eot = inside documents split by the end-of-text token;
                         # or a text separator (escapes allowed, e.g. "\n\n")
min_docs = 8             # document-aware mode: warn when a length finds fewer long-enough documents than this
attn_backend = ""        # override the attention backend (auto | reference | math | sdpa | flex | triton); "" = the checkpoint's
allow_other_data = False  # evaluate on validation data other than the checkpoint's (same vocabulary), recorded
batch_tokens = 16384     # at most this many tokens per forward pass (bounds memory)
position_buckets = 32    # loss-by-position buckets per length
out = "results/eval_length"
device = "auto"
dtype = "auto"
plot = True
replot = ""              # path to a results .json: redraw its plots without evaluating anything
# -----------------------------------------------------------------------------


def length_spec(lengths="", multipliers="1,2,4,8,16"):
    """('lengths', ints) from --lengths, else ('multipliers', numbers): parsed and checked (non-empty, > 0, no
    repeats) before any checkpoint is loaded."""
    if lengths:
        return "lengths", parse_numbers(lengths, "lengths", int, prefix="eval error", example="64,256,1024")
    return "multipliers", parse_numbers(multipliers, "multipliers", float, prefix="eval error", example="1,2,4")


def eval_lengths(block_size, *, lengths="", multipliers="1,2,4,8,16"):
    """The lengths to evaluate, sorted: --lengths, or --multipliers x block_size rounded, which must give distinct
    lengths >= 1 (one-line errors otherwise)."""
    key, values = length_spec(lengths, multipliers)
    if key == "lengths":
        return sorted(values)
    exact = [block_size * m for m in values]
    if not all(math.isfinite(x) for x in exact):
        raise SystemExit(f"eval error: multipliers={multipliers!r} x block_size={block_size} overflows; lower the "
                         "largest multiplier")
    lens = [int(round(x)) for x in exact]
    if min(lens) < 1:
        raise SystemExit(f"eval error: multipliers={multipliers!r} x block_size={block_size} give a length below 1 "
                         f"({lens}); raise the smallest multiplier or pass --lengths")
    if len(set(lens)) < len(lens):
        raise SystemExit(f"eval error: multipliers={multipliers!r} x block_size={block_size} give the lengths {lens}, "
                         "some twice; use multipliers that give distinct lengths or pass --lengths")
    return sorted(lens)


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
    the budget to be a whole number of windows of every length; it then ends 1 token early for the targets.
    A --tokens or --stride that does not fit the lengths is a one-line error naming the fix."""
    check_range({"tokens": requested, "stride": stride}, 0, prefix="eval error")
    if stride > min(lens):  # sliding windows that advance by more than their length would skip tokens
        raise SystemExit(f"eval error: stride={stride} is longer than the shortest length {min(lens)}, so windows "
                         f"would skip tokens; use --stride <= {min(lens)} (or 0 for non-overlapping windows)")
    avail = n_val - 1
    if requested:
        if requested > avail:
            raise SystemExit(f"eval error: tokens={requested} but the validation split has only {avail} "
                             "predictable tokens; lower --tokens")
        if requested < max(lens):
            raise SystemExit(f"eval error: tokens={requested} is shorter than the longest length {max(lens)}, so no "
                             f"window fits; raise --tokens to at least {max(lens)} (or 0: as many as fit)")
        budget = requested
    else:
        budget = avail
    if not stride:
        # a whole number of windows of every length; if the lengths' lcm does not fit, of the largest one
        # (shorter lengths that do not divide it then drop the last partial window: recorded as their tokens)
        lcm = math.lcm(*lens)
        budget = budget // lcm * lcm if budget >= lcm else budget // max(lens) * max(lens)
        if budget < max(lens):
            raise SystemExit(f"eval error: length {max(lens)} needs at least {max(lens) + 1} validation tokens but "
                             f"{n_val} are available; evaluate shorter lengths (--lengths or --multipliers)")
    elif budget < max(lens):
        raise SystemExit(f"eval error: length {max(lens)} is longer than the {budget} validation tokens available; "
                         "evaluate shorter lengths (--lengths or --multipliers)")
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
def loss_at_length(model, data, L, *, budget=0, stride=0, plan=None, ctx=None, device="cpu", buckets=32,
                   batch_tokens=16384, pbar=None):
    """Sum and count of the scored token losses at context length L over the first `budget` tokens of data (or
    over the windows of `plan`, [(start, first scored position)]), and the loss by position (`buckets`
    log-spaced buckets); at most batch_tokens tokens per forward pass."""
    plan = window_plan(budget, L, stride) if plan is None else plan
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


ROPE_CHOICES = ("ckpt", "none", "pi", "ntk", "yarn")


def eval_settings(*, reweight_p="ckpt", rope_scaling="ckpt", rope_factor=0.0, logn_scale="ckpt", attn_dots="ckpt",
                  length_temp="ckpt", prefix="eval error"):
    """The eval-time overrides to evaluate each checkpoint with: the product of the comma lists, each value
    'ckpt' (as trained) or a setting; returns [{GPTConfig field: value}] ({} = as trained). Values may be given
    as text (sweep.py's --eval_extra); anything else is a one-line error starting with prefix. length_temp (none,
    logn, irope) is the rule of every global layer; logn_scale true / false is its older spelling of logn / none."""
    ps = parse_reweight_list(reweight_p, prefix=prefix)
    dots = parse_names(attn_dots, "attn_dots", prefix, "ckpt,bf16")
    if any(d not in ("ckpt", *DOTS) for d in dots):
        raise SystemExit(f"{prefix}: attn_dots takes ckpt, {', '.join(DOTS)} (the q . k dots' precision), got {attn_dots!r}")
    ropes, logns = parse_names(rope_scaling, "rope_scaling", prefix, "ckpt,yarn"), parse_names(
        str(logn_scale).lower(), "logn_scale", prefix, "ckpt,true")
    temps = parse_names(length_temp, "length_temp", prefix, "ckpt,irope")
    bad = [r for r in ropes if r not in ROPE_CHOICES] + [x for x in logns if x not in ("ckpt", "true", "false")] + \
        [t for t in temps if t not in ("ckpt", *LENGTH_TEMPS)]
    if bad:
        raise SystemExit(f"{prefix}: unknown {bad[0]!r}; rope_scaling takes {', '.join(ROPE_CHOICES)}, logn_scale "
                         f"ckpt, true, false and length_temp ckpt, {', '.join(LENGTH_TEMPS)}")
    if logns != ["ckpt"] and temps != ["ckpt"]:
        raise SystemExit(f"{prefix}: logn_scale is length_temp=logn's older spelling: give length_temp only")
    try:
        rope_factor = float(rope_factor)
    except ValueError:
        raise SystemExit(f"{prefix}: rope_factor must be a number >= 0 (0 = length / block_size), got "
                         f"{rope_factor!r}") from None
    check_range({"rope_factor": rope_factor}, 0, prefix=prefix)
    out = []
    for p, r, lg, tp, dt in itertools.product(ps, ropes, logns, temps, dots):
        o = {} if p == "ckpt" else {"reweight_p": p}
        if dt != "ckpt":
            o["attn_dots"] = dt
        if r != "ckpt":
            o |= {"rope_scaling": r, "rope_factor": float(rope_factor) if r != "none" else 0.0}
        if lg != "ckpt":
            o["logn_scale"] = lg == "true"
        if tp != "ckpt":
            o["length_temp"] = tp
        out.append(o)
    return out


def eval_time(ckpt_dir, margs, overrides):
    """A checkpoint evaluated with eval-time overrides ({} = as trained): (the effective GPTConfig, the trained
    one, the run label); a setting it refuses is a one-line error."""
    try:
        trained = GPTConfig(**margs)  # canonical: ('lssar', 0.0) in an older checkpoint reads as ('lssa', 15.0)
        eff = trained.with_overrides(**overrides)
    except ValueError as e:
        raise SystemExit(f"eval error: {ckpt_dir}: {e}") from None
    rule = overrides.get("length_temp", {True: "logn", False: "none"}.get(overrides.get("logn_scale")))
    notes = [f"eval p={eff.reweight_p:g}" if "reweight_p" in overrides else "",
             f"rope={eff.rope_scaling}" + (f" x{eff.rope_factor:g}" if eff.rope_factor else "")
             if "rope_scaling" in overrides else "",
             "" if rule is None else {"logn": "logn", "none": "no logn" if "logn_scale" in overrides else "no temp"}.get(
                 rule, f"temp={rule}"),
             f"dots={eff.attn_dots}" if "attn_dots" in overrides else ""]
    label = os.path.basename(os.path.normpath(ckpt_dir)).removeprefix("out-")
    notes = [n for n in notes if n]
    return eff, trained, label + (f" ({', '.join(notes)})" if notes else "")


def applies(margs, overrides):
    """Whether eval-time overrides make sense for a checkpoint (a RoPE extension needs a layer with RoPE)."""
    return overrides.get("rope_scaling", "none") == "none" or any(sp.rope for sp in GPTConfig(**margs).layer_specs)


def doc_separator(meta, doc_sep):
    """The token ids that separate documents: the tokenizer's end-of-text token for doc_sep='eot' (GPT-2's
    50256 for shards without a meta.pkl), else the text doc_sep (backslash escapes read) encoded."""
    if doc_sep == "eot":
        if meta is None:
            return [50256]  # data/fineweb and data/openwebtext shards: GPT-2 BPE, an end-of-text before every document
        if "stoi" in meta:
            raise SystemExit("eval error: char-level data has no end-of-text token; pass a text separator, e.g. "
                             "--doc_sep='\\n\\n' (blank lines)")
        if "eot_token" in meta:
            return [int(meta["eot_token"])]
        import tiktoken
        return [tiktoken.get_encoding(meta.get("tokenizer", "gpt2")).eot_token]
    sep = get_tokenizer(meta)[0](doc_sep.encode().decode("unicode_escape"))
    if not sep:
        raise SystemExit(f"eval error: doc_sep={doc_sep!r} encodes to no tokens; pass eot or a non-empty separator")
    return sep


def documents(data, sep):
    """(start, end) of the documents of a token stream split by the token sequence sep (separators excluded)."""
    data, n = np.asarray(data), len(sep)
    hits = np.ones(len(data) - n + 1, dtype=bool) if len(data) >= n else np.zeros(0, dtype=bool)
    for i, tok in enumerate(sep):
        hits &= data[i:len(data) - n + 1 + i] == tok
    cuts, last = [], -n
    for c in np.flatnonzero(hits):  # non-overlapping occurrences, left to right
        if c >= last + n:
            cuts.append(int(c))
            last = c
    starts, ends = [0] + [c + n for c in cuts], cuts + [len(data)]
    return [(s, e) for s, e in zip(starts, ends, strict=True) if e > s]


def doc_window_plan(docs, L, budget=0):
    """Non-overlapping windows of L tokens (and their L next-token targets) inside single documents of at least
    L + 1 tokens, from the first such document on, until `budget` scored tokens (0 = all). Returns the plan
    [(start, 0)], the documents it used and the documents long enough."""
    plan, used, long_enough = [], 0, 0
    for s, e in docs:
        n = (e - s - 1) // L
        if n == 0:
            continue
        long_enough += 1
        if budget and len(plan) * L >= budget:
            continue
        take = n if not budget else min(n, -(-(budget - len(plan) * L) // L))
        plan += [(s + i * L, 0) for i in range(take)]
        used += 1
    return plan, used, long_enough


def evaluate(specs, *, multipliers="1,2,4,8,16", lengths="", tokens=0, stride=0, backend="", device="auto",
             dtype="auto", buckets=32, batch_tokens=16384, doc_sep="", min_docs=8, allow_other_data=False,
             empty_ok=False):
    """Evaluate each (checkpoint dir, eval-time overrides: {} = as trained, see eval_settings) at every length;
    returns the results dict that write_results() saves. Fails before evaluating anything when a checkpoint or
    a length cannot work; skips (and records) overrides that do not apply to a checkpoint. The keywords mean
    what the script's keys of the same names mean. empty_ok: return no runs, not an error, when no spec is
    left to evaluate (none given, or every one skipped: the sweep's rest of an evaluation it partly reuses)."""
    dev = pick_device(device)
    ctx, dt = autocast_ctx(dev, dtype)
    jobs, loaded, skipped = [], {}, []
    for d, ov in specs:
        if d not in loaded:
            loaded[d] = load_checkpoint(d, dev)
        if not applies(loaded[d]["model_args"], ov):
            skipped.append({"ckpt": d, "eval": ov, "why": f"pos={loaded[d]['model_args'].get('pos')!r} has no RoPE to extend"})
            print(f"skipped {d} with {ov}: {skipped[-1]['why']}", file=sys.stderr)
            continue
        jobs.append(plan_job(d, loaded[d], ov, dev, lengths=lengths, multipliers=multipliers, tokens=tokens,
                             stride=stride, backend=backend, doc_sep=doc_sep, allow_other_data=allow_other_data))
    if not jobs and not empty_ok:
        raise SystemExit("eval error: no checkpoint takes the eval-time settings asked for; see the lines above")
    total_tokens = sum(j["budget"] * len(j["lens"]) if j["plans"] is None else
                       sum(len(plan) * L for L, (plan, _, _) in j["plans"].items()) for j in jobs)
    runs = []
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="eval_length", file=sys.stderr) as pbar:
        for j in jobs:
            model = model_from_checkpoint(j["ckpt_data"], dev, **j["overrides"]).eval()
            results = [loss_record(model, j, L, stride=stride, ctx=ctx, device=dev, buckets=buckets,
                                   batch_tokens=batch_tokens, min_docs=min_docs, pbar=pbar) for L in j["lens"]]
            runs.append({k: j[k] for k in ("label", "ckpt", "attn", "reweight_p", "trained_reweight_p", "eval", "pos",
                                           "rope_scaling", "rope_factor", "logn_scale", "length_temp", "layers",
                                           "describe", "block_size", "dataset", "iter_num", "overrides", "budget",
                                           "data")} | {"results": results})
            del model
    protocol = {
        "windows": f"sliding, stride {stride}" if stride else "non-overlapping",
        "loss": "mean cross-entropy (nats) over every scored token",
        "data": ("the first tokens of each checkpoint's val.bin, the same at every length" if not doc_sep else
                 f"windows inside single documents (separator {doc_sep!r}) of at least length + 1 tokens, from the "
                 f"first such document on, {tokens or 'all'} tokens per length"),
        "device": dev, "dtype": dt, "batch_tokens": batch_tokens, "attn_backend": backend or "checkpoint's",
    }
    return {"protocol": protocol, "runs": runs} | ({"skipped": skipped} if skipped else {})


def plan_job(d, ck, ov, dev, *, lengths, multipliers, tokens, stride, backend, doc_sep, allow_other_data=False):
    """Everything about evaluating checkpoint d (loaded: ck) with eval-time overrides ov that can be checked before
    any evaluation: lengths, data (the checkpoint's, by its fingerprint), token budget (or each length's windows
    inside documents), vocabulary, backend."""
    cfg, margs = ck["config"], ck["model_args"]
    lens = checkpoint_lengths(d, margs, lengths=lengths, multipliers=multipliers)
    data = data_record(ck, d, "eval error", allow_other_data)
    val = load_stream(cfg["dataset"], "val", cfg.get("data_dir", ""))
    plans = None  # document-aware mode: each length's windows, documents used, documents long enough
    if doc_sep:
        docs = documents(val, doc_separator(load_meta(cfg["dataset"], cfg.get("data_dir", "")), doc_sep))
        plans = {L: doc_window_plan(docs, L, tokens) for L in lens}
    budget = token_budget(len(val), lens, requested=tokens, stride=stride) if plans is None else tokens
    top = int(val[:budget + 1].max() if plans is None else val.max())
    if top >= margs["vocab_size"]:
        raise SystemExit(f"eval error: vocab mismatch: {d} has {margs['vocab_size']} tokens but its validation "
                         f"data holds token id {top}; evaluate it on the dataset it was trained on")
    eff, trained, label = eval_time(d, margs, ov)
    overrides = dict(ov) | ({"attn_backend": backend} if backend else {})
    checked_config(margs, dev, **overrides)  # a backend that cannot compute this model fails now, not mid-run
    return dict(ckpt=d, ckpt_data=ck, val=val, plans=plans, lens=lens, budget=budget, overrides=overrides, label=label, data=data,
                **attention_record(eff, trained), eval=ov, block_size=margs["block_size"], dataset=cfg["dataset"],
                iter_num=ck["iter_num"])


def attention_record(eff, trained):
    """What a results row records of the attention it evaluated (eff: with the eval-time settings), read from the
    checkpoint's config: a stack with a spec per layer records its pattern as attn (and pos 'layers')."""
    return dict(attn=eff.attn if not eff.layers else eff.describe(), reweight_p=eff.reweight_p,
                trained_reweight_p=trained.reweight_p, pos=eff.pos if not eff.layers else "layers",
                rope_scaling=eff.rope_scaling, rope_factor=eff.rope_factor, logn_scale=eff.length_temp == "logn",
                length_temp=eff.length_temp, layers=eff.layers, describe=eff.describe())


def data_record(ck, d, prefix, allow_other_data=False):
    """The validation data a checkpoint's config names, compared with the fingerprint of the data it was trained
    on (one-line errors: compare_data), as the results record it: where it is, its hash, and whether it is the
    training data ('same'), other data allowed by --allow_other_data ('other'), or unknown (an older checkpoint)."""
    cfg = ck["config"]
    now = dataset_fingerprint(cfg["dataset"], cfg.get("data_dir", ""))
    status = compare_data(ck.get("data"), now, d, prefix, allow_other_data)
    return {"dir": now["dir"], "vocab": now["vocab"], "val": now["val"], "trained_on": status}


def loss_record(model, j, L, *, stride, ctx, device, buckets, batch_tokens, min_docs, pbar):
    """One length's result of a job: its loss, tokens, loss by position (and, inside documents, what it used)."""
    t0, extra, plan = time.time(), {}, None
    if j["plans"] is not None:
        plan, used, long_enough = j["plans"][L]
        extra = {"documents": used, "documents_long_enough": long_enough}
        if used < min_docs:
            extra["warning"] = f"only {used} document(s) of >= {L + 1} tokens" + ("" if used else ": no loss at this length")
            tqdm.write(f"{j['label']} @ {L}: {extra['warning']} (min_docs={min_docs})", file=sys.stderr)
        if not plan:
            return {"length": L, "multiplier": L / j["block_size"], "loss": None, "tokens": 0, **extra}
    pbar.set_postfix_str(f"{j['label']} @ {L}")
    total, count, bks = loss_at_length(model, j["val"], L, budget=j["budget"], stride=stride, plan=plan, ctx=ctx,
                                       device=device, buckets=buckets, batch_tokens=batch_tokens, pbar=pbar)
    if not math.isfinite(total / count):  # a diverged checkpoint (or an eval-time setting that overflows it)
        raise SystemExit(f"eval error: {j['label']} ({j['ckpt']}) at length {L}: the loss is {total / count}; nothing "
                         "was written: evaluate a checkpoint that did not diverge (see its log.csv), or drop the "
                         "eval-time setting")
    return {"length": L, "multiplier": L / j["block_size"], "loss": total / count, "tokens": count, **extra,
            "seconds": round(time.time() - t0, 2), "position_buckets": bks}


def save_json(res, out_prefix, command):
    """<out_prefix>.json with the command that made it (the folder is created); returns what was written. Written
    to a temporary file and renamed: a kill mid-write leaves the previous file whole (a rerun reads it)."""
    res = dict(res, command=command)
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    path = out_prefix + ".json"
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return res


def write_all(out_prefix, suffixes, make):
    """The files <out_prefix><suffix>, all or none: make(prefix) writes them under a temporary prefix, and they are
    renamed into place only once every one exists, so a failure midway (an odd number in a plot, a full disk) leaves
    the previous files as they were and no partial set. Returns the paths."""
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    try:
        make(tmp)
        for suf in suffixes:
            os.replace(tmp + suf, out_prefix + suf)
    finally:
        for suf in suffixes:
            if os.path.exists(tmp + suf):
                os.remove(tmp + suf)
    return [out_prefix + suf for suf in suffixes]


def write_results(res, out_prefix, command, make_plot=True):
    """<out>.json, <out>.csv and (make_plot) the two plots, all or none (write_all)."""
    def make(prefix):
        if make_plot:  # first: what can fail on odd numbers
            plot_results(res, prefix)
        _write_tables(res, prefix, command)
    return write_all(out_prefix, [".json", ".csv"] + ([".png", "_detail.png"] if make_plot else []), make)


def _write_tables(res, out_prefix, command):
    res = save_json(res, out_prefix, command)
    with open(out_prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "ckpt", "attn", "reweight_p", "trained_reweight_p", "pos", "rope_scaling", "rope_factor",
                    "logn_scale", "block_size", "length", "multiplier", "loss", "tokens", "documents"])
        for r in res["runs"]:
            for x in r["results"]:
                w.writerow([r["label"], r["ckpt"], r["attn"], r["reweight_p"], r["trained_reweight_p"], r.get("pos", ""),
                            r.get("rope_scaling", ""), r.get("rope_factor", ""), r.get("logn_scale", ""), r["block_size"],
                            x["length"], x["multiplier"], "" if x["loss"] is None else f"{x['loss']:.5f}", x["tokens"],
                            x.get("documents", "")])
    return res


def table(res):
    """The protocol and a loss table (rows: runs, columns: lengths) as text."""
    proto = "protocol: " + "; ".join(f"{k}: {v}" for k, v in res["protocol"].items())
    docs = any("documents" in x for r in res["runs"] for x in r["results"])
    if not docs:
        proto += "; tokens per length: " + ", ".join(sorted({str(r["budget"]) for r in res["runs"]}))
    lens = sorted({x["length"] for r in res["runs"] for x in r["results"]})
    w = max(len(r["label"]) for r in res["runs"]) + 2
    lines = [proto, "attention".ljust(w) + "".join(f"{L:>9}" for L in lens)]
    for r in res["runs"]:
        by = {x["length"]: x["loss"] for x in r["results"]}
        lines.append(r["label"].ljust(w) + "".join(" " * 9 if L not in by else "      n/a" if by[L] is None else
                                                   f"{by[L]:9.4f}" for L in lens))
    if docs:  # each length's own windows: say what it rests on
        r0 = res["runs"][0]["results"]
        lines.append("tokens (documents)".ljust(w) + "".join(f"{x['tokens']:>6}({x['documents']})"[-9:].rjust(9) for x in r0))
    return "\n".join(lines)


def colour(i, n):
    """The colour of line / bar i of n: tab10 up to 10, tab20 beyond (cycling past 20), so rows stay apart."""
    import matplotlib

    return f"C{i % 10}" if n <= 10 else matplotlib.colormaps["tab20"](i % 20)


def _curves(ax, res, xy, xlabel, ylabel, title, fontsize=8):
    """One line per run (same colour in every plot; dashed when reweight_p was changed at evaluation), the
    training length marked, log2 x-axis."""
    for i, r in enumerate(res["runs"]):
        xs, ys = xy(r)
        ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, color=colour(i, len(res["runs"])), label=r["label"],
                linestyle="--" if r["reweight_p"] != r["trained_reweight_p"] else "-")
    for bs in sorted({r["block_size"] for r in res["runs"]}):
        ax.axvline(bs, color="gray", linestyle=":", linewidth=1)
        ax.annotate(" training length", (bs, 0.01), xycoords=("data", "axes fraction"), color="gray", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize)


def scored(run):
    """A run's results that have a loss (in the document-aware mode a length may find no document)."""
    return [x for x in run["results"] if x["loss"] is not None]


def plot_results(res, out_prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, res, lambda r: ([x["length"] for x in scored(r)], [x["loss"] for x in scored(r)]),
            "evaluation context length (tokens)", "validation loss (nats / token)", "Loss vs context length")
    fig.tight_layout()
    fig.savefig(out_prefix + ".png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["label"] for r in res["runs"]]
    ratios = [scored(r)[-1]["loss"] / scored(r)[0]["loss"] if scored(r)[0]["loss"] else math.nan for r in res["runs"]]
    bars = a1.bar(range(len(labels)), ratios, color=[colour(i, len(labels)) for i in range(len(labels))])
    a1.bar_label(bars, fmt="%.2f", fontsize=8)
    a1.axhline(1.0, color="gray", linewidth=1)
    a1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    mults = {round(scored(r)[-1]["multiplier"], 2) for r in res["runs"]}
    a1.set_ylabel(f"loss at {'/'.join(f'{m:g}' for m in sorted(mults))}x / loss at 1x (first length)")
    a1.set_title("Extrapolation penalty (1.0 = flat)")
    _curves(a2, res, lambda r: ([(b["start"] + b["end"]) / 2 for b in scored(r)[-1]["position_buckets"]],
                                [b["loss"] for b in scored(r)[-1]["position_buckets"]]),
            "position inside the longest window", "validation loss (bucket mean)", "Loss by position at the largest length",
            fontsize=7)
    fig.tight_layout()
    fig.savefig(out_prefix + "_detail.png", dpi=120)
    plt.close(fig)
    return [out_prefix + ".png", out_prefix + "_detail.png"]


def check_options(o):
    """Every option of the command line (o: the configured keys) parsed and range-checked, before any checkpoint is
    read or anything is written: one line naming the fix (SystemExit) otherwise. Returns the eval-time settings."""
    if o["replot"]:
        return []
    if not o["ckpts"]:
        raise SystemExit("eval error: pass --ckpts=DIR[,DIR...] (out_dirs of trained runs)")
    parse_names(o["ckpts"], "ckpts", "eval error")
    check_range({"tokens": o["tokens"], "stride": o["stride"]}, 0, prefix="eval error")
    check_range({"batch_tokens": o["batch_tokens"], "position_buckets": o["position_buckets"], "min_docs": o["min_docs"]},
                1, prefix="eval error")
    check_range({"batch_tokens": o["batch_tokens"]}, 1, 2**30, prefix="eval error")
    length_spec(o["lengths"], o["multipliers"])
    settings = eval_settings(reweight_p=o["reweight_p"], rope_scaling=o["rope_scaling"], rope_factor=o["rope_factor"],
                             attn_dots=o["attn_dots"], logn_scale=o["logn_scale"], length_temp=o["length_temp"])
    if o["doc_sep"] and o["stride"]:
        raise SystemExit("eval error: the document-aware mode (--doc_sep) uses non-overlapping windows; drop --stride")
    if o["attn_backend"] and o["attn_backend"] not in ("reference", *BACKENDS):
        raise SystemExit(f"eval error: unknown attn_backend={o['attn_backend']!r}; choose one of "
                         f"{', '.join(('reference', *BACKENDS))} (or leave it out: the checkpoint's)")
    autocast_ctx(pick_device(o["device"]), o["dtype"])
    if not os.path.basename(o["out"]):  # '' or a folder: the files would be named .json, .csv, ...
        raise SystemExit(f"eval error: out names the result files without their extension, e.g. --out=results/eval_length; "
                         f"got {o['out']!r}")
    writable_prefix(o["out"], "out", "eval error", (".json", ".csv", ".png", "_detail.png"))
    return settings


def main():
    o = configure(globals())
    if replot:
        res = read_results(replot, "eval", "eval_length.py", need=("length", "loss"),
                           what="eval_length results (runs with lengths and losses)")
        for p in plot_results(res, replot.removesuffix(".json")):
            print(f"wrote {p}")
        return
    settings = check_options(o)
    specs = [(d, ov) for d in parse_names(ckpts, "ckpts", "eval error") for ov in settings]
    res = evaluate(specs, multipliers=multipliers, lengths=lengths, tokens=tokens, stride=stride, backend=attn_backend,
                   device=device, dtype=dtype, buckets=position_buckets, batch_tokens=batch_tokens, doc_sep=doc_sep,
                   min_docs=min_docs, allow_other_data=allow_other_data)
    print(table(res))
    command = "python " + " ".join(sys.argv)
    for p in write_results(res, out, command, plot):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
