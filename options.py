"""
What the user typed, parsed and checked before any work: comma lists and numbers in range, the device and
precision, output folders and prefixes that can be written, results files to replot, and train.py's options
(which of them a resume may change).
"""

import importlib.util
import math
import os
import tempfile
from contextlib import nullcontext

import torch

from model import GPTConfig


def _mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def one_line(x):
    """An exception or any text as one line: a SystemExit message stays a single line whatever it quotes."""
    return " ".join(str(x).split())


def writable_dir(path, key, prefix="config error", value=None):
    """Stop with one line unless `path` is a folder this process can write to, or one it can create: checked by
    creating and removing a file in it (or in its nearest existing parent), so that nothing is left behind and a
    read-only disk is caught even for root, for whom os.access always says yes. value: what the user passed as
    key (default: path)."""
    path = os.path.abspath(path or ".")
    value = path if value is None else value
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is a file" if probe == os.path.abspath(value) else f"cannot be created: {probe} is a file"
        raise SystemExit(f"{prefix}: {key}={value!r} {what}; pass a folder (or a new path) you can write to")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write_test_")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        why = e.strerror or one_line(e)
        if probe != path:  # the folder is to be made: say which one cannot be, and where
            missing = path
            while os.path.dirname(missing) != probe:
                missing = os.path.dirname(missing)
            raise SystemExit(f"{prefix}: {key}={value!r} cannot be created: {probe} takes no new folder {missing} "
                             f"({why}); pass a folder you can write to") from None
        raise SystemExit(f"{prefix}: {key}={value!r} is not writable ({why}: {probe}); pass a folder you can write "
                         "to") from None
    return path


def writable_prefix(out, key="out", prefix="config error", exts=(".json",)):
    """An output prefix (results/eval -> results/eval.json, ...): its folder writable or creatable and no file
    it names an existing folder; checked before any work, so that nothing is computed to be lost at the end."""
    writable_dir(os.path.dirname(os.path.abspath(out)), key, prefix, value=out)
    for ext in exts:
        if os.path.isdir(out + ext):
            raise SystemExit(f"{prefix}: {key}={out!r} would write {out + ext}, which is a folder; pass another --{key}")
    return out


def read_results(path, who, script, need=(), what=""):
    """A results .json for --replot, or a one-line error ('<who> error: ...') naming what to pass instead. With
    `need` (keys), it must hold runs whose every result has those keys (`what` describes them in the error);
    otherwise the caller checks its own kind of results."""
    import json

    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON
        raise SystemExit(f"{who} error: cannot read results {path!r} ({one_line(e)}); pass a .json that {script} "
                         "wrote") from None
    runs = res.get("runs") if isinstance(res, dict) else None
    if need and not (runs and all(isinstance(r, dict) and r.get("results") and
                                  all(isinstance(x, dict) and set(need) <= set(x) for x in r["results"]) for r in runs)):
        raise SystemExit(f"{who} error: {path!r} holds no {what}; pass a .json that {script} wrote")
    return res


def pick_device(device="auto"):
    """auto -> cuda, mps or cpu, whichever this machine has; an explicit device it does not have is a one-line
    error (torch would fail later, with a traceback, after files were written)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"config error: unknown device {device!r}; use --device=auto, cpu, cuda, cuda:N or mps")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and not n_gpus:
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
        raise SystemExit(f"config error: device={device!r} but this torch {why}; use --device=cpu (or auto)")
    if dev.type == "cuda" and (dev.index or 0) >= n_gpus:
        raise SystemExit(f"config error: device={device!r} but this machine has {n_gpus} GPU(s); use "
                         f"--device=cuda:0 .. cuda:{n_gpus - 1} (or cpu)")
    if dev.type == "mps" and not _mps_available():
        raise SystemExit(f"config error: device={device!r} but MPS is not available here; use --device=cpu (or auto)")
    return device


def autocast_ctx(device, dtype="auto"):
    """bf16 autocast on GPUs that support it, plain fp32 elsewhere (dtype: auto | float32 | bfloat16 | float16)."""
    device_type = "cuda" if "cuda" in device else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"config error: dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.amp.autocast(device_type=device_type, dtype=getattr(torch, dtype)), dtype


def parse_list(s, cast=str):
    """'a,b,c' -> [cast(a), cast(b), cast(c)], blanks dropped."""
    return [cast(x.strip()) for x in str(s).split(",") if x.strip()]


def split_top(text, sep=","):
    """text split at `sep` outside square brackets (a stack's layers pattern keeps its commas and colons)."""
    parts, depth, cur = [], 0, ""
    for ch in str(text):
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def parse_reweight_p(value, key="reweight_p", prefix="config error"):
    """An eval-time or fine-tuning re-weighting power: 'ckpt' (as the checkpoint was trained) or a number >= 0
    (0 = off, 15 = LSSAR's); anything else stops with one line naming the choices."""
    text = str(value).strip()
    if text == "ckpt":
        return "ckpt"
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    if not (p >= 0 and math.isfinite(p)):
        raise SystemExit(f"{prefix}: {key} must be >= 0 (a number: 0 = off, 15 = LSSAR's) or 'ckpt' (as trained), "
                         f"got {value!r}")
    return p


def parse_reweight_list(value, key="reweight_p", prefix="config error"):
    """'ckpt,0,15' -> ['ckpt', 0.0, 15.0]: a non-empty comma list of distinct parse_reweight_p values."""
    ps = [parse_reweight_p(x, key, prefix) for x in parse_list(value)]
    if not ps or len(set(ps)) < len(ps):
        raise SystemExit(f"{prefix}: {key} must be a comma list of distinct values (ckpt = as trained, or numbers "
                         f">= 0), e.g. --{key}=ckpt,15; got {str(value)!r}")
    return ps


def parse_names(value, key, prefix="config error", example="DIR1,DIR2"):
    """'a,b' -> ['a', 'b']: a non-empty comma list (blanks dropped) without repeats, else one line naming key."""
    names = parse_list(value)
    if not names or len(set(names)) < len(names):
        raise SystemExit(f"{prefix}: {key} must be a comma list without repeats, e.g. --{key}={example}; "
                         f"got {str(value)!r}")
    return names


def parse_numbers(value, key, cast=int, *, prefix="config error", example="1,2,4", ok=lambda x: x > 0, what=None):
    """'1,2,4' -> [1, 2, 4] in the order given: a non-empty comma list (blanks dropped) of distinct finite numbers
    (integers when cast is int) that all pass `ok`, described by `what` (default: integers / numbers > 0).
    Anything else (no items, an empty item, a word, 0 or a negative number by default, a repeat, nan) stops with one
    line naming the key, the problem and the fix."""
    what = what or f"{'integers' if cast is int else 'numbers'} > 0"

    def fail(why):
        return SystemExit(f"{prefix}: {key} must be {what}, as a comma list without repeats, e.g. --{key}={example}; "
                          f"got {str(value)!r} ({why})")

    out = []
    items = [x.strip() for x in str(value).split(",")]
    if len(items) > 1 and "" in items:
        raise fail("an empty item")
    for text in filter(None, items):
        try:
            x = cast(text)
        except ValueError:
            raise fail(f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
        if isinstance(x, float) and not math.isfinite(x):  # (ints are finite; math.isfinite overflows on huge ones)
            raise fail(f"{text!r} is not finite")
        if not ok(x):
            raise fail(f"{text!r} is out of range")
        if x in out:
            raise fail(f"{text!r} is repeated")
        out.append(x)
    if not out:
        raise fail("no values")
    return out


def check_range(values, low, high=None, *, open_low=False, open_high=False, prefix="config error"):
    """values: {key: number}. The first one that is not a finite number in [low, high] (open_low / open_high:
    the bound itself excluded; high None: no upper bound) stops with one line naming the key and the range."""
    for key, v in values.items():
        ok = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)
        ok = ok and (v > low if open_low else v >= low) and (high is None or (v < high if open_high else v <= high))
        if not ok:
            if high is None:
                rng = f"{'>' if open_low else '>='} {low}"
            else:
                rng = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            raise SystemExit(f"{prefix}: {key}={v!r} is out of range; set --{key} to a number {rng}")


# What a resume may change (train.py): these keys say how far, how often or where a run goes, not what it computes
# (data_dir: where the data lies; the data itself is checked by its fingerprint); warmup_iters may also change once
# the run is past both warmups. The INVOCATION keys say what one command does and are never restored.
RESUME_FREE = ("max_iters", "lr_decay_iters", "eval_interval", "log_interval", "always_save_checkpoint", "compile",
               "device", "attn_backend", "attn_chunk", "attn_dots", "data_dir", "wandb_log", "wandb_project",
               "wandb_run_name")
INVOCATION = ("out_dir", "init_from", "eval_only", "overwrite")


def check_train_options(o):
    """train.py's options (o: its configured keys) parsed and range-checked before anything is read or written:
    numbers in range (0 would divide by zero or train nothing), the attention a model of these settings would have
    (from scratch: a resume or fine-tune takes it from the checkpoint), device and dtype, the invocation's keys."""
    if o["eval_only"] and o["init_from"] not in ("scratch", "resume"):
        raise SystemExit(f"config error: eval_only evaluates the checkpoint in out_dir; pass --out_dir={o['init_from']} "
                         "instead of --init_from")
    if not o["init_from"]:
        raise SystemExit("config error: init_from is scratch, resume, or the out_dir (or checkpoint) of a run to "
                         "fine-tune; got ''")
    check_range({k: o[k] for k in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "max_iters",
                                   "eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                                   "window_align", "attn_chunk")}, 1)
    check_range({k: o[k] for k in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_iters",
                                   "gradient_accumulation_steps", "window_align", "attn_chunk")}, 1, 2**24)
    check_range({k: o[k] for k in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters",
                                   "lr_decay_iters")}, 0)
    check_range({k: o[k] for k in ("dropout", "beta1", "beta2")}, 0, 1, open_high=True)
    check_range({"rope_base": o["rope_base"]}, 0, open_low=True)
    check_range({"reweight_start": o["reweight_start"]}, 0, 2**40)
    if o["data_order"] not in ("random", "sequential"):
        raise SystemExit(f"config error: data_order is random or sequential; got {o['data_order']!r}")
    if o["wandb_log"] and importlib.util.find_spec("wandb") is None:
        raise SystemExit("config error: wandb_log=True needs the wandb package; pip install wandb, or drop --wandb_log")
    p = parse_reweight_p(o["finetune_reweight_p"], "finetune_reweight_p")
    if p != "ckpt" and o["init_from"] == "scratch":
        raise SystemExit("config error: finetune_reweight_p applies when fine-tuning (--init_from=DIR of another run); "
                         "from scratch set --reweight_p instead")
    if o["init_from"] == "scratch":
        model_keys = [f for f in GPTConfig.__dataclass_fields__ if f != "vocab_size"]
        try:
            cfg = GPTConfig(**{k: o[k] for k in model_keys}, vocab_size=256)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"config error: {one_line(e)}") from None
        if o["reweight_start"] and not any(sp.reweight_p for sp in cfg.layer_specs):
            raise SystemExit(f"config error: reweight_start={o['reweight_start']} delays a re-weighting this model does "
                             "not have (reweight_p = 0 in every layer); drop it, or train with --attn=lssar")
        if o["reweight_start"] >= o["max_iters"]:
            raise SystemExit(f"config error: reweight_start={o['reweight_start']} >= max_iters={o['max_iters']}: the "
                             "re-weighting would never be trained; lower --reweight_start")
    autocast_ctx(pick_device(o["device"]), o["dtype"])
    if not o["eval_only"]:
        writable_dir(o["out_dir"], "out_dir")
