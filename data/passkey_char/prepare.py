"""
Build a passkey-retrieval fine-tuning dataset from a prepared char-level dataset (default: Tiny Shakespeare).
Each example is exactly block_size + 1 tokens, the template of eval_passkey.py (written there, once):

    <filler> KEY IS QZXKV. <filler> KEY? QZXKV

with the key sentence at a uniformly random depth in the filler and the key (5 random uppercase letters) as
the last tokens, so training with window_align=block_size+1 gives one whole example per window whose last
key_len targets are the key. Filler comes from the source's train.bin for train.bin and from its val.bin for
val.bin; meta.pkl is the source's (the same vocabulary, so a model trained on the source fine-tunes on this)
plus 'passkey_src', which tells eval_passkey.py to take its filler from the source.

    python data/shakespeare_char/prepare.py        # the source, first
    python data/passkey_char/prepare.py [--src DIR] [--out_dir DIR] [--block_size 64] [--n_train N] [--seed S]
    python train.py config/finetune_passkey_char.py --init_from=out-shakespeare-char-lssa --out_dir=out-passkey-char-lssa-s1
    (the whole two-stage recipe for softmax, LSSA and LSSAR: README, "Passkey retrieval")
"""
import argparse
import os
import sys

import numpy as np

# run as a script only this folder is on sys.path; the template and the data helpers live under the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from data.shakespeare_char.prepare import write_split  # noqa: E402
from dataset import PREPARE_HINT, load_meta, load_stream  # noqa: E402
from eval_passkey import draw, filler_len, passkey_example, passkey_template  # noqa: E402
from options import check_range, writable_dir  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SRC = os.path.join(ROOT, 'data', 'shakespeare_char')

def examples(tpl, data, n, block_size, key_len, rng):
    """n examples of block_size + 1 tokens each, concatenated: random filler windows, keys and depths."""
    n_filler = filler_len(tpl, block_size + 1, key_len)
    out = np.empty((n, block_size + 1), dtype=np.uint16)
    for i in range(n):
        fill, key = draw(tpl, data, n_filler, key_len, rng)
        out[i] = passkey_example(tpl, fill, key, rng.random())
    return out.reshape(-1)

def prepare(src=None, out_dir=None, block_size=64, n_train=20000, n_val=500, key_len=5, seed=1337):
    src, out_dir = src or DEFAULT_SRC, out_dir or HERE
    # counts and the output folder before any work: 0 examples would write an empty dataset
    check_range({'block_size': block_size, 'n_train': n_train, 'n_val': n_val, 'key_len': key_len}, 1,
                prefix='prepare error')
    writable_dir(out_dir, 'out_dir', 'prepare error')
    name = os.path.basename(os.path.normpath(src))
    hint = PREPARE_HINT.get(name, 'python data/shakespeare_char/prepare.py')
    for f in ('train.bin', 'val.bin', 'meta.pkl'):
        if not os.path.exists(os.path.join(src, f)):
            raise SystemExit(f"source data not found: no {f} in {src}; run `{hint}` first (or pass --src DIR)")
    meta = load_meta(name, src)
    tpl = passkey_template(meta)
    rng = np.random.default_rng(seed)
    train = examples(tpl, load_stream(name, 'train', src), n_train, block_size, key_len, rng)
    val = examples(tpl, load_stream(name, 'val', src), n_val, block_size, key_len, rng)
    # the source as a path relative to the repo root when it lies inside it, so the repo can move
    rel = os.path.relpath(os.path.abspath(src), ROOT)
    meta = dict(meta, passkey_src=os.path.abspath(src) if rel.startswith('..') else rel)
    write_split(out_dir, train, val, meta)
    print(f"{n_train:,} train and {n_val:,} val examples of {block_size + 1} tokens (filler "
          f"{block_size + 1 - tpl.fixed_len(key_len)}, key {key_len}) from {src} -> {out_dir}")
    return {'train_tokens': len(train), 'val_tokens': len(val), 'example_tokens': block_size + 1}

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', default=None, help="prepared char-level dataset (default: data/shakespeare_char)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin/meta.pkl (default: this folder)")
    parser.add_argument('--block_size', type=int, default=64, help="training context; examples are block_size + 1 tokens")
    parser.add_argument('--n_train', type=int, default=20000, help="training examples")
    parser.add_argument('--n_val', type=int, default=500, help="validation examples")
    parser.add_argument('--key_len', type=int, default=5, help="key tokens (letters)")
    parser.add_argument('--seed', type=int, default=1337)
    args = parser.parse_args()
    prepare(args.src, args.out_dir, args.block_size, args.n_train, args.n_val, args.key_len, args.seed)
