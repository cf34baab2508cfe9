"""
Where a dataset lives and what it holds: its folder, its tokens (a single .bin or shards, read as memmaps), the
training and evaluation windows drawn from them, its meta.pkl (vocabulary size, tokenizer), and its fingerprint,
recorded in every checkpoint and compared wherever a checkpoint meets data again.
"""

import glob
import hashlib
import os
import pickle

import numpy as np
import torch

from options import one_line
from retrieval import CURRICULUM

ROOT = os.path.dirname(os.path.abspath(__file__))
PREPARE_HINT = {  # how to make each dataset, for error messages
    "shakespeare_char": "python data/shakespeare_char/prepare.py",
    "shakespeare": "python data/shakespeare/prepare.py",
    "fineweb": "python data/fineweb/prepare.py",
    "openwebtext": "python data/openwebtext/prepare.py",
    "retrieval_char_curriculum": "python data/retrieval_char/prepare.py --out_dir=data/retrieval_char_curriculum "
                                 f"--curriculum={CURRICULUM}",
}


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


def sequential_windows(parts, n, T, it, micro, micro_steps, align=1):
    """n consecutive windows for one micro-batch, in the order they are stored: micro-batch (it, micro) reads windows
    (it * micro_steps + micro) * n .. + n - 1, wrapping at the end. For data whose order is part of the recipe (a
    curriculum written by the prepare script); like random_windows a pure function of the step."""
    start = (it * micro_steps + micro) * n
    return _locate(parts, (start + np.arange(n)) % n_windows(parts, T, align), T, align)


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
