"""
Prepare Tiny Shakespeare for character-level language modelling.
Writes train.bin / val.bin (uint16 token ids) and meta.pkl (the vocab) into out_dir.

    python data/shakespeare_char/prepare.py [--input PATH] [--out_dir DIR]

Where the text comes from, first match wins:
  1. --input PATH (or prepare(input_path=...))
  2. the TINYSHAKESPEARE_PATH environment variable
  3. an input.txt already in out_dir
  4. a download of the char-rnn copy into out_dir/input.txt
"""
import argparse
import glob
import http.client
import os
import pickle
import sys
import urllib.error
import urllib.request

import numpy as np

# run as a script only this folder is on sys.path; options.py lives under the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from options import writable_dir  # noqa: E402

DATA_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
ENV_VAR = 'TINYSHAKESPEARE_PATH'
HERE = os.path.dirname(os.path.abspath(__file__))

def one_line(x):
    # SystemExit messages should be a single readable line, whatever the exception text looks like
    return ' '.join(str(x).split())

def write_atomic(path, write):
    # write to a temp file beside path and rename it into place: a crash or Ctrl-C midway
    # never leaves a truncated file that the next run (or train.py) would trust
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

def download(path):
    try:
        # read it all before touching the disk, so a dropped connection leaves nothing behind
        with urllib.request.urlopen(DATA_URL, timeout=30) as r:
            data = r.read()
    except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        reason = one_line(getattr(e, 'reason', None) or e)
        raise SystemExit(f"could not download Tiny Shakespeare ({reason}); "
                         f"pass a local copy with --input PATH or set {ENV_VAR}=PATH") from None
    write_atomic(path, lambda f: f.write(data))

def get_text(input_path=None, out_dir=None):
    """Return the Tiny Shakespeare text, from the first source that applies (see the module docstring)."""
    out_dir = out_dir or HERE
    if input_path:
        if not os.path.isfile(input_path):
            raise SystemExit(f"--input file not found: {input_path}")
        path = input_path
    elif os.environ.get(ENV_VAR):
        path = os.environ[ENV_VAR]
        if not os.path.isfile(path):
            raise SystemExit(f"{ENV_VAR} file not found: {path}")
    else:
        path = os.path.join(out_dir, 'input.txt')
        if not os.path.exists(path):
            os.makedirs(out_dir, exist_ok=True)
            print(f"downloading {DATA_URL}")
            download(path)
    print(f"reading {path}")
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:  # latin-1, UTF-16, a binary file: say where, not a traceback
        raise SystemExit(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start:,}: {e.reason}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > input_utf8.txt") from None
    except OSError as e:  # a folder, no permission
        raise SystemExit(f"cannot read {path} ({e.strerror or one_line(e)}); pass a readable text file") from None
    if not text:
        raise SystemExit(f"{path} is empty: there is nothing to prepare (the vocabulary would have 0 characters); "
                         "pass a text file that holds text")
    return text

def check_vocab(chars):
    # one symbol is nothing to learn: every loss would be exactly 0 and every ratio of losses undefined
    if len(chars) < 2:
        raise SystemExit(f"prepare error: the text has {len(chars)} distinct character(s) ({''.join(chars)!r}); a "
                         "language model needs at least 2: pass a text with more than one symbol")

def check_splits(n_train, n_val, what):
    # training needs at least 2 tokens in each split (an input and its target)
    if min(n_train, n_val) < 2:
        raise SystemExit(f"{what} gives {n_train} train and {n_val} val tokens, too few for any training window "
                         "(each split needs at least 2); pass a longer text")

def write_split(out_dir, train_ids, val_ids, meta):
    os.makedirs(out_dir, exist_ok=True)
    for name in ('train.bin', 'val.bin', 'meta.pkl'):  # left by a run killed mid-write (write_atomic's temporaries)
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), f'{name}.tmp.*')):
            os.remove(tmp)
    for name, ids in (('train.bin', train_ids), ('val.bin', val_ids)):
        arr = np.array(ids, dtype=np.uint16)
        write_atomic(os.path.join(out_dir, name), arr.tofile)
    write_atomic(os.path.join(out_dir, 'meta.pkl'), lambda f: pickle.dump(meta, f))

def prepare(input_path=None, out_dir=None):
    out_dir = out_dir or HERE
    writable_dir(out_dir, 'out_dir', 'prepare error')  # before the text is read or downloaded
    data = get_text(input_path, out_dir)

    # the vocab is every character that occurs in the text, sorted so ids are stable across runs
    chars = sorted(set(data))
    vocab_size = len(chars)
    assert vocab_size < 2**16, "ids are stored as uint16"
    check_vocab(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    # first 90% train, last 10% val
    n = len(data)
    train_ids = [stoi[c] for c in data[:int(n * 0.9)]]
    val_ids = [stoi[c] for c in data[int(n * 0.9):]]
    check_splits(len(train_ids), len(val_ids), f"a text of {n:,} characters")

    write_split(out_dir, train_ids, val_ids, {'vocab_size': vocab_size, 'itos': itos, 'stoi': stoi})
    print(f"{n:,} chars, vocab size {vocab_size}, train {len(train_ids):,} tokens, "
          f"val {len(val_ids):,} tokens -> {out_dir}")
    return {'chars': n, 'vocab_size': vocab_size, 'train_tokens': len(train_ids), 'val_tokens': len(val_ids)}

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', default=None, help=f"local copy of input.txt (else ${ENV_VAR}, else download)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin/meta.pkl (default: this folder)")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)
