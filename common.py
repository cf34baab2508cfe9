"""
Small helpers shared by train.py, sample.py and eval_length.py: device and precision, datasets and their
fingerprints, checkpoints (written atomically, read back into a model with its full config), the run folder
(its lock, an overwritten run kept aside), output paths checked before any work, and tokenizers.
"""

import atexit
import errno
import glob
import hashlib
import importlib.util
import math
import os
import pickle
import shutil
import socket
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

import kernels
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
PREPARE_HINT = {  # how to make each dataset, for error messages
    "shakespeare_char": "python data/shakespeare_char/prepare.py",
    "shakespeare": "python data/shakespeare/prepare.py",
    "fineweb": "python data/fineweb/prepare.py",
    "openwebtext": "python data/openwebtext/prepare.py",
}


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


def data_dir_for(dataset, data_dir=""):
    return data_dir or os.path.join(ROOT, "data", dataset)


# Token shards for large datasets (FineWeb, OpenWebText): a header of 256 int32 (magic, version, token count,
# then zeros) followed by the tokens as uint16. Named <name>_<split>_<index:06d>.bin; written atomically, so a
# file with a valid header is always complete.
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20261129, 1, 256


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("shard tokens must fit in uint16 (GPT-2 BPE does)")
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_shard(path):
    """The tokens of a shard as a read-only uint16 memmap; a bad header or size is a one-line error."""
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header.size < 3 or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise SystemExit(f"not a token shard (bad header): {path}; re-run the dataset's prepare.py")
    n = int(header[2])
    if os.path.getsize(path) != SHARD_HEADER_INTS * 4 + 2 * n:
        raise SystemExit(f"token shard {path} is truncated: header says {n} tokens; re-run the dataset's prepare.py")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,))


def list_shards(d, split):
    return sorted(glob.glob(os.path.join(d, f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin")))


def load_split(dataset, split, data_dir=""):
    """The token parts of a split, each a read-only uint16 memmap: the shards <name>_<split>_NNNNNN.bin in order
    (FineWeb, OpenWebText), or the single <split>.bin (Shakespeare). Missing or empty data is a one-line error."""
    d = data_dir_for(dataset, data_dir)
    hint = PREPARE_HINT.get(dataset, f"python data/{dataset}/prepare.py")
    shards = list_shards(d, split)
    if shards:
        parts = [read_shard(p) for p in shards]
    else:
        path = os.path.join(d, f"{split}.bin")
        if not os.path.exists(path):
            raise SystemExit(f"dataset not found: no {split}.bin or *_{split}_000000.bin shards in {d}; run `{hint}` first")
        if os.path.getsize(path) % 2:  # np.memmap would raise a ValueError deep inside
            raise SystemExit(f"{path} has an odd number of bytes: not uint16 tokens (another dtype, or truncated); "
                             f"re-run `{hint}`")
        parts = [np.memmap(path, dtype=np.uint16, mode="r")] if os.path.getsize(path) >= 2 else []
    if sum(len(p) for p in parts) < 2:
        raise SystemExit(f"dataset is empty: the {split} split in {d} has no tokens; re-run `{hint}`")
    return parts


def _counts(parts, T, align):
    # window starts per part: offsets 0, align, 2*align, ... with room for T + 1 tokens (T inputs, T targets)
    return np.array([(len(p) - T - 1) // align + 1 if len(p) > T else 0 for p in parts])


def _locate(parts, flat, T, align=1):
    """Map indices into the concatenated window starts of all parts to (part, offset); a window never crosses
    a part's end."""
    counts = _counts(parts, T, align)
    ends = np.cumsum(counts)
    which = np.searchsorted(ends, flat, side="right")
    return [(int(w), int(f - (ends[w] - counts[w])) * align) for w, f in zip(which, flat, strict=True)]


def n_windows(parts, T, align=1):
    return int(_counts(parts, T, align).sum())


def random_windows(parts, n, T, seed, it, micro, align=1):
    """n random windows for one micro-batch: a pure function of (seed, iteration, micro-step), so the data order
    is deterministic, a resumed run reads exactly the batches of the uninterrupted one, and DDP ranks that take
    different micro-steps read disjoint batches. (The draw excludes the very last window, as earlier versions
    did, so that results made with them reproduce.)"""
    g = torch.Generator().manual_seed(hash((seed, it, micro)) & 0x7FFFFFFFFFFFFFFF)
    return _locate(parts, torch.randint(n_windows(parts, T, align) - 1, (n,), generator=g).numpy(), T, align)


def even_windows(parts, n, T, align=1):
    """n windows spread evenly over all the parts (a fixed evaluation set)."""
    return _locate(parts, np.linspace(0, n_windows(parts, T, align) - 1, n).astype(np.int64), T, align)


def get_batch(parts, locs, T, device):
    """Input/target pairs (B, T) for the windows at locs [(part, offset), ...]."""
    x = torch.stack([torch.from_numpy(parts[w][o:o + T].astype(np.int64)) for w, o in locs])
    y = torch.stack([torch.from_numpy(parts[w][o + 1:o + 1 + T].astype(np.int64)) for w, o in locs])
    if "cuda" in device:
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def load_stream(dataset, split, data_dir=""):
    """A split as one contiguous token array (for evaluation: windows may then span shard borders)."""
    parts = load_split(dataset, split, data_dir)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def model_vocab_size(meta):
    """The embedding size for a dataset: the char vocabulary as it is; BPE padded to a multiple of 64 (50257 ->
    50304, faster matmuls); GPT-2's padded size when there is no meta.pkl."""
    if meta is None:
        return 50304
    v = meta["vocab_size"]
    return -(-v // 64) * 64 if meta.get("tokenizer") else v


def load_meta(dataset, data_dir=""):
    path = os.path.join(data_dir_for(dataset, data_dir), "meta.pkl")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        meta = e  # truncated, not a pickle, or a pickle of classes that do not exist here
    if not (isinstance(meta, dict) and isinstance(meta.get("vocab_size"), (int, np.integer)) and meta["vocab_size"] > 0):
        why = f" ({type(meta).__name__}: {one_line(meta)[:120]})" if isinstance(meta, Exception) else ""
        raise SystemExit(f"dataset error: {path} is not a dataset meta.pkl (a dict with vocab_size){why}; "
                         f"re-run `{PREPARE_HINT.get(dataset, f'python data/{dataset}/prepare.py')}`")
    return meta


def check_token_ids(parts, vocab_size, where, hint):
    """Every token id of every part below vocab_size: a vectorised max over each memmap in chunks (a few seconds
    for billions of tokens), so that data of another tokenizer or dtype stops here in one line, not as an index
    error at whichever step first draws the bad window."""
    chunk = 1 << 24
    for i, p in enumerate(parts):
        for s in range(0, len(p), chunk):
            block = p[s:s + chunk]
            top = int(block.max())
            if top >= vocab_size:
                at = s + int(np.argmax(block >= vocab_size))  # the first bad id's position in its part
                raise SystemExit(f"dataset error: {where} holds token id {int(p[at])} (part {i + 1} of {len(parts)}, "
                                 f"token {at:,}) but its vocabulary has {vocab_size} tokens; the .bin is of another dtype "
                                 f"or tokenizer than meta.pkl: re-run `{hint}`")


# A dataset's fingerprint, recorded in every checkpoint and compared wherever a checkpoint meets data again: what
# the ids mean (the char table, or the BPE encoding), and per split the size of every part and a hash of its
# tokens (all of them for parts up to FULL_HASH_TOKENS, else FINGERPRINT_BLOCKS evenly spaced blocks of
# BLOCK_TOKENS plus the last one): milliseconds even for 10B tokens of FineWeb.
FULL_HASH_TOKENS, FINGERPRINT_BLOCKS, BLOCK_TOKENS = 1 << 22, 32, 4096


def vocab_id(meta):
    """A short hash of what the token ids mean: the char table, or the BPE encoding's name and size."""
    if meta is None:
        what = "tiktoken gpt2 (no meta.pkl)"
    elif "stoi" in meta:
        what = repr(sorted((int(i), c) for i, c in meta["itos"].items()))
    else:
        what = f"tiktoken {meta.get('tokenizer', 'gpt2')} {meta['vocab_size']}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def split_id(parts):
    """A short hash of a split: the size of every part and its tokens (a sample of them for large parts)."""
    h = hashlib.sha256()
    for p in parts:
        n = len(p)
        h.update(np.int64(n).tobytes())
        if n <= FULL_HASH_TOKENS:
            h.update(np.ascontiguousarray(p).tobytes())
            continue
        for s in np.linspace(0, n - BLOCK_TOKENS, FINGERPRINT_BLOCKS + 1).astype(np.int64):
            h.update(np.ascontiguousarray(p[s:s + BLOCK_TOKENS]).tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(meta, data_dir, **splits):
    """{'dir', 'vocab', 'vocab_size', <split>: hash} of a dataset; splits: name=parts (load_split's)."""
    return {"dir": os.path.abspath(data_dir), "vocab": vocab_id(meta),
            "vocab_size": meta["vocab_size"] if meta else 50257, **{k: split_id(v) for k, v in splits.items()}}


def dataset_fingerprint(dataset, data_dir="", splits=("val",)):
    """data_fingerprint of the data a checkpoint's config names (its meta and the given splits)."""
    return data_fingerprint(load_meta(dataset, data_dir), data_dir_for(dataset, data_dir),
                            **{k: load_split(dataset, k, data_dir) for k in splits})


def compare_data(trained, now, who, prefix, allow_other=False,
                 other_fix="or pass --allow_other_data=True to evaluate on this data"):
    """Whether the data `now` (data_fingerprint) is what the checkpoint `who` was trained on (`trained`, its
    'data'; None for checkpoints older than fingerprints): 'same', 'unknown', or with allow_other 'other' (the
    same vocabulary, other tokens). Another vocabulary, or other tokens without allow_other, stop with one line
    (ending with other_fix, the way to go on with other data where there is one)."""
    if not trained:
        return "unknown"
    if trained["vocab"] != now["vocab"]:
        raise SystemExit(f"{prefix}: vocab mismatch: {who} was trained with another vocabulary than the one in "
                         f"{now['dir']} ({trained['vocab_size']} vs {now['vocab_size']} tokens"
                         f"{', the same size but other tokens' if trained['vocab_size'] == now['vocab_size'] else ''}); "
                         f"use the data it was trained on (prepared in {trained['dir']})")
    changed = [k for k in now if k not in ("dir", "vocab", "vocab_size") and k in trained and trained[k] != now[k]]
    if not changed:
        return "same"
    if allow_other:
        return "other"
    raise SystemExit(f"{prefix}: data mismatch: the {' and '.join(changed)} split(s) in {now['dir']} are not the data "
                     f"{who} was trained on (re-prepared from another text, or replaced); use the run's data (prepared "
                     f"in {trained['dir']})" + (f", {other_fix}" if other_fix else ""))


def get_tokenizer(meta):
    """(encode, decode) for a dataset's meta.pkl: char-level (stoi/itos) or tiktoken BPE (GPT-2 by default)."""
    if meta is not None and "stoi" in meta:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(s):
            missing = sorted(set(c for c in s if c not in stoi))
            if missing:
                raise SystemExit(f"prompt error: characters {''.join(missing)!r} are not in this model's vocabulary "
                                 "(char-level dataset); remove them from the prompt")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    import tiktoken
    name = (meta or {}).get("tokenizer", "gpt2")
    try:
        enc = tiktoken.get_encoding(name)
    except (OSError, ValueError) as e:  # offline (requests' errors are OSErrors), a corrupt download, an unknown name
        raise SystemExit(f"could not load the {name!r} BPE files for tiktoken ({type(e).__name__}: "
                         f"{one_line(e)[:120]}); set TIKTOKEN_CACHE_DIR to a folder holding them") from None
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash mid-write never
    replaces the previous checkpoint with a half-written one (a kill -9 leaves the temporary <path>.tmp<pid>,
    which tidy_run_dir removes at the next start). A write that fails (a full disk) is a one-line error."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError whose context is the OSError
        err = e if isinstance(e, OSError) else e.__context__
        if not isinstance(err, OSError):
            raise
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        raise SystemExit(f"checkpoint error: could not write {path} ({err.strerror or one_line(err)}); the previous "
                         f"{os.path.basename(path)} is kept; {'free disk space' if full else 'fix the folder'} and "
                         "resume with --init_from=resume") from None
    finally:
        if os.path.exists(tmp):  # the write failed or was interrupted: drop the partial file
            os.remove(tmp)


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


# The run folder. train.py holds LOCK_FILE for as long as it writes the folder (lock_out_dir); --overwrite=True
# moves the previous run's RUN_FILES into ASIDE and deletes them only once the new run has saved a checkpoint.
LOCK_FILE, ASIDE, RUN_FILES = "train.lock", "previous-run", ("ckpt.pt", "best.pt", "log.csv", "wandb")


def lock_out_dir(out_dir, prefix="train error"):
    """Hold out_dir/train.lock until this process exits: an exclusive fcntl lock, which the kernel drops when
    the process ends however it ends, on a file naming the holder. Another holder is a one-line error naming
    it; a file left by a killed process (its lock gone with it) is taken over. Returns the locked file."""
    import fcntl

    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            break
        except OSError as e:  # a file system without locks: say so, and go on as before locks existed
            f.close()
            print(f"{out_dir}: cannot lock {LOCK_FILE} ({e.strerror or one_line(e)}); nothing stops a second training "
                  "from writing this folder")
            return None
        if os.path.exists(path) and os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
            return _take(f, path, out_dir)
        f.close()  # its holder removed the file between our open and our lock: lock the one there now
    holder = ""
    for _ in range(10):  # a holder that has just locked writes its PID within microseconds
        f.seek(0)
        holder = one_line(f.read())
        if holder:
            break
        time.sleep(0.05)
    f.close()
    raise SystemExit(f"{prefix}: {out_dir} is in use by another training ({holder or 'one that is just starting'}); "
                     "wait for it to end or stop it, or choose another --out_dir")


def _take(f, path, out_dir):
    """The lock is ours: name this process in its file (a name already there is a killed holder's)."""
    f.seek(0)
    stale = one_line(f.read())
    if stale:
        print(f"{out_dir}: taking over the lock file of a training that is no longer running ({stale})")
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    atexit.register(_unlock, f, path)
    return f


def _unlock(f, path):
    try:
        os.remove(path)  # while still locked: nobody else can hold this file now
    except OSError:
        pass
    f.close()


def set_aside(out_dir):
    """--overwrite=True: move the previous run's files into out_dir/previous-run (restore_aside puts them back,
    drop_aside deletes them). Returns the names moved."""
    aside = os.path.join(out_dir, ASIDE)
    os.makedirs(aside)
    moved = [f for f in RUN_FILES if os.path.lexists(os.path.join(out_dir, f))]
    for f in moved:
        os.replace(os.path.join(out_dir, f), os.path.join(aside, f))
    return moved


def restore_aside(out_dir):
    """Put a run set aside back in place of a replacement that never saved a checkpoint (whose files go)."""
    aside = os.path.join(out_dir, ASIDE)
    if not os.path.isdir(aside):
        return False
    for f in RUN_FILES:
        new, old = os.path.join(out_dir, f), os.path.join(aside, f)
        if os.path.isdir(new) and not os.path.islink(new):
            shutil.rmtree(new)
        elif os.path.lexists(new):
            os.remove(new)
        if os.path.lexists(old):
            os.replace(old, new)
    shutil.rmtree(aside)
    return True


def drop_aside(out_dir):
    shutil.rmtree(os.path.join(out_dir, ASIDE), ignore_errors=True)


def tidy_run_dir(out_dir):
    """At the start of a training that holds the lock: what an earlier process killed mid-way left behind. The
    temporary files of interrupted saves go; a run set aside by an --overwrite=True whose replacement never
    saved a checkpoint comes back (one that did: the set-aside run goes). Returns what it did, as lines."""
    done = []
    tmps = [p for p in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*"))
            if os.path.basename(p).split(".tmp")[0] in RUN_FILES]
    for p in tmps:  # (before anything is removed: a folder in the way is the user's, and stops the run)
        if os.path.isdir(p) and not os.path.islink(p):
            raise SystemExit(f"train error: {p} is a folder named like the temporary file of an interrupted save, "
                             f"which train.py removes at the start of a run; move it out of {out_dir}")
    for name in RUN_FILES[:-1]:  # the run's own files (wandb/ is a folder)
        p = os.path.join(out_dir, name)
        if os.path.isdir(p) and not os.path.islink(p):
            raise SystemExit(f"train error: {p} is a folder where the run keeps its {name} file; move it out of "
                             f"{out_dir} (or train into another --out_dir)")
    for p in tmps:
        os.remove(p)
    if tmps:
        done.append(f"removed {len(tmps)} temporary file(s) of interrupted saves ({', '.join(map(os.path.basename, tmps))})")
    if os.path.isdir(os.path.join(out_dir, ASIDE)):
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            drop_aside(out_dir)
            done.append(f"removed {ASIDE}/, the run an --overwrite=True replaced (its replacement saved a checkpoint)")
        else:
            restore_aside(out_dir)
            done.append(f"restored the run that an interrupted --overwrite=True had moved to {ASIDE}/ (its "
                        "replacement saved no checkpoint)")
    return done


def load_checkpoint(out_dir_or_file, device="cpu"):
    path = out_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        folder = os.path.dirname(path)
        if os.path.exists(os.path.join(folder, ASIDE, "ckpt.pt")):
            raise SystemExit(f"checkpoint not found: {path}; an interrupted --overwrite=True left the previous run in "
                             f"{os.path.join(folder, ASIDE)}: the next train.py into {folder} restores it, or read it "
                             f"there ({os.path.join(folder, ASIDE, 'ckpt.pt')})")
        if os.path.basename(path) == "ckpt.pt" and os.path.exists(os.path.join(folder, "best.pt")):
            raise SystemExit(f"checkpoint not found: {path}; {folder} holds best.pt (the best evaluation's weights): pass "
                             f"{os.path.join(folder, 'best.pt')}")
        raise SystemExit(f"checkpoint not found: {path}; train one with `python train.py ... --out_dir=DIR` "
                         "or pass the out_dir of an existing run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise SystemExit(f"checkpoint unreadable: {path} ({type(e).__name__}: {one_line(e)[:120]}); "
                         "it may be truncated: use another checkpoint or retrain") from None
    # a torch file of another project: say so here, not with a KeyError wherever a field is first read
    why = None
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "model_args", "config"))):
        why = "no model, model_args and config dicts"
    elif "dataset" not in ckpt["config"] or "iter_num" not in ckpt:
        why = "no dataset in its config, or no iter_num"
    else:
        try:
            GPTConfig(**ckpt["model_args"])
        except (TypeError, ValueError) as e:  # fields this GPTConfig does not have, or values it refuses
            why = f"its model_args do not describe a model of this repo: {one_line(e)[:160]}"
    if why:
        raise SystemExit(f"checkpoint error: {path} is not a checkpoint of this repo's train.py ({why}); "
                         "pass the out_dir of a run trained with train.py")
    return ckpt


def checked_config(model_args, device="cpu", needs_grad=False, **overrides):
    """The GPTConfig of model_args with keyword overrides (reweight_p, attn_backend, ...), checked before anything
    runs: an override it refuses, or a backend that cannot compute its attention on device (the backends would
    raise only when first called, mid-run), is a one-line error naming the fix."""
    try:
        cfg = GPTConfig(**model_args).with_overrides(**overrides)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    if cfg.attn_backend not in ("auto", "reference"):
        q = torch.zeros(1, 1, 1, cfg.n_embd // cfg.n_head, device=device)  # what the backends look at: device, size
        for spec in dict.fromkeys(cfg.layer_specs):  # every layer's attention, each once
            why = kernels.why_not(cfg.attn_backend, spec, q, needs_grad)
            if why:
                what = f"attn={cfg.describe()}" if not cfg.layers else \
                    f"the layers {cfg.layers} ({spec.kind}, window {spec.window})"
                raise SystemExit(f"config error: attn_backend={cfg.attn_backend!r} cannot run {what} here: {why}; use "
                                 "--attn_backend=auto (or math)")
    return cfg


def model_from_checkpoint(ckpt, device="cpu", reader=True, **overrides):
    """Rebuild the GPT a checkpoint was trained as (attention, p, positions, sizes: its model_args, read through
    GPTConfig, which also resolves checkpoints stored before the canonical form, e.g. ('lssar', 0.0) -> ('lssa',
    15.0)); keyword overrides change eval-time fields such as reweight_p or attn_backend without retraining.
    reader (every script but train.py): a checkpoint saved before its curriculum switched the re-weighting on
    (train.py's reweight_start) is refused, since it would be evaluated as what it is not yet."""
    start = ckpt.get("config", {}).get("reweight_start", 0)
    if reader and ckpt["iter_num"] < start:
        raise SystemExit(f"checkpoint error: this checkpoint is at iteration {ckpt['iter_num']}, before its "
                         f"reweight_start={start}: its re-weighting is not on yet; evaluate it once it has trained "
                         f"past step {start} (or pass --reweight_p=0 to a copy trained without it)")
    model = GPT(checked_config(ckpt["model_args"], device, **overrides))
    state = ckpt["model"]
    prefix = "_orig_mod."  # torch.compile'd models save their weights under this prefix
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights: another project's, or edited
        raise SystemExit(f"checkpoint error: its weights do not fit the model its model_args describe "
                         f"({one_line(e)[:200]}); use a checkpoint written by this repo's train.py") from None
    return model.to(device)


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
