"""
Small helpers shared by train.py, sample.py and eval_length.py: device and precision, datasets,
checkpoints (written atomically, read back into a model with its full config) and tokenizers.
"""

import glob
import os
import pickle
from contextlib import nullcontext

import numpy as np
import torch

from model import GPT, GPTConfig, resolve_attn

ROOT = os.path.dirname(os.path.abspath(__file__))
PREPARE_HINT = {
    "shakespeare_char": "python data/shakespeare_char/prepare.py",
    "shakespeare": "python data/shakespeare/prepare.py",
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
    """The uint16 token file of a split as a read-only memmap; a missing or empty one is a one-line error."""
    d = data_dir_for(dataset, data_dir)
    path = os.path.join(d, f"{split}.bin")
    hint = PREPARE_HINT.get(dataset, f"the prepare script in data/{dataset}/")
    if not os.path.exists(path):
        raise SystemExit(f"dataset not found: {path} is missing; run `{hint}` first")
    if os.path.getsize(path) < 4:
        raise SystemExit(f"dataset is empty: {path} has no tokens; re-run `{hint}`")
    return np.memmap(path, dtype=np.uint16, mode="r")


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
    """Rebuild the GPT a checkpoint was trained as (attention kind, p, positions, ...); keyword overrides
    change eval-time fields such as reweight_p or attn_backend without retraining."""
    args = dict(ckpt["model_args"])
    if "reweight_p" in overrides:  # an override replaces the trained p, also the 15 that attn='lssar' implies
        args["attn"], args["reweight_p"] = resolve_attn(args["attn"], args.get("reweight_p", 0.0))
    args.update(overrides)
    model = GPT(GPTConfig(**args))
    state = ckpt["model"]
    prefix = "_orig_mod."  # torch.compile'd models save their weights under this prefix
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(device)
