"""
Small helpers shared by train.py, sample.py and eval_length.py: device and precision, datasets,
checkpoints (written atomically, read back into a model with its full config) and tokenizers.
"""

import glob
import math
import os
import pickle
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
PREPARE_HINT = {  # how to make each dataset, for error messages
    "shakespeare_char": "python data/shakespeare_char/prepare.py",
    "shakespeare": "python data/shakespeare/prepare.py",
    "fineweb": "python data/fineweb/prepare.py",
    "openwebtext": "python data/openwebtext/prepare.py",
}


def pick_device(device="auto"):
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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
    with open(path, "rb") as f:
        return pickle.load(f)


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
    enc = tiktoken.get_encoding((meta or {}).get("tokenizer", "gpt2"))
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash mid-write never
    replaces the previous checkpoint with a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed or was interrupted: drop the partial file
            os.remove(tmp)


def load_checkpoint(out_dir_or_file, device="cpu"):
    path = out_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"checkpoint not found: {path}; train one with `python train.py ... --out_dir=DIR` "
                         "or pass the out_dir of an existing run")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise SystemExit(f"checkpoint unreadable: {path} ({type(e).__name__}: {str(e)[:120]}); "
                         "it may be truncated: use another checkpoint or retrain") from None


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    """Rebuild the GPT a checkpoint was trained as (attention, p, positions, sizes: its model_args, read through
    GPTConfig, which also resolves checkpoints stored before the canonical form, e.g. ('lssar', 0.0) -> ('lssa',
    15.0)); keyword overrides change eval-time fields such as reweight_p or attn_backend without retraining."""
    model = GPT(replace(GPTConfig(**ckpt["model_args"]), **overrides))
    state = ckpt["model"]
    prefix = "_orig_mod."  # torch.compile'd models save their weights under this prefix
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(device)


def parse_list(s, cast=str):
    """'a,b,c' -> [cast(a), cast(b), cast(c)], blanks dropped."""
    return [cast(x.strip()) for x in str(s).split(",") if x.strip()]


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
