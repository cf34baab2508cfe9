"""
Build the retrieval mixture: Tiny Shakespeare (or any text) for character-level language modelling, with key-value
episodes inside a share of the training windows (the task of retrieval.py, written there once). Every example is
one training window of exactly block_size + 1 characters, so training with window_align = block_size + 1 (as
config/train_retrieval_char.py does) reads one whole example per window. Writes into out_dir:
  train.bin, val.bin   the examples (uint16 ids), n_train and n_val of them, each from a random window of the
                       first 90% (train) or the last 10% (val) of the text
  text_val.bin         the last 10% of the text alone, in the same ids: eval_retrieval.py's filler and the
                       language-model loss at 1x..16x
  meta.pkl             the vocabulary (the text's characters, the task's markers and alphabets) and meta['retrieval']:
                       the task's settings, block_size and seed
Deterministic: the same text, settings and seed give the same bytes.

    python data/retrieval_char/prepare.py [--input PATH] [--out_dir DIR] [--block_size 64] [--share 1.0] [--seed 1337]

The text comes from the same places as data/shakespeare_char/prepare.py (--input, then $TINYSHAKESPEARE_PATH, then
out_dir/input.txt, then a download).
"""
import argparse
import os
import sys

import numpy as np

# run as a script only this folder is on sys.path; the task and the data helpers live under the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from data.shakespeare_char.prepare import check_splits, get_text, write_atomic, write_split  # noqa: E402
from options import check_range, writable_dir  # noqa: E402
from retrieval import KEY_ALPHABET, NEAR_KINDS, PAIR, QUERY, Task, alphabet, training_example  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def examples(text, n, length, task, rng, stoi, curriculum=0, near="adjacent", near_share=1.0):
    """n training windows of `length` characters, each from a random place in text, as one uint16 array. The first
    `curriculum` of them hold near episodes of kind `near` (retrieval.training_example's max_distance) whose longest
    key-query distance grows linearly from one pair's length to the whole window: read in order (train.py
    --data_order=sequential), the copy is learned over short distances before the long ones. near_share < 1: each of
    those windows is near with this probability, else a usual one (a mixed curriculum). near may list kinds
    ("adjacent,crossed"): the curriculum's windows in that many equal parts, each of its kind; a kind may be a mix
    ("adjacent+crossed"): each window of that part one of them at random."""
    if len(text) < length:
        raise SystemExit(f"prepare error: a split of {len(text)} characters is shorter than one window of {length}; "
                         "pass a longer text or a smaller --block_size")
    out, kinds = np.empty((n, length), dtype=np.uint16), near.split(",")
    for i in range(n):
        s = int(rng.integers(0, len(text) - length + 1))
        near_i = i < curriculum and (near_share >= 1 or rng.random() < near_share)  # (no draw at 1: same bytes)
        d = task.item_len + (length - 1 - task.item_len) * i // curriculum if near_i else None
        kind = kinds[i * len(kinds) // curriculum] if d is not None else None
        if kind is not None and "+" in kind:  # (no draw otherwise: the same bytes as before mixes existed)
            kind = kind.split("+")[int(rng.integers(kind.count("+") + 1))]
        window, _ = training_example(text[s:s + length], rng, task, length, max_distance=d, near=kind)
        out[i] = [stoi[c] for c in window]
    return out.reshape(-1)


def prepare(input_path=None, out_dir=None, block_size=64, n_train=100000, n_val=2000, share=1.0, max_pairs=4,
            max_queries=4, key_len=1, value_len=3, seed=1337, curriculum=0, near="adjacent", near_share=1.0):
    out_dir = out_dir or HERE
    check_range({'block_size': block_size, 'n_train': n_train, 'n_val': n_val, 'max_pairs': max_pairs,
                 'max_queries': max_queries, 'key_len': key_len, 'value_len': value_len}, 1, prefix='prepare error')
    check_range({'share': share}, 0, 1, prefix='prepare error')
    check_range({'curriculum': curriculum}, 0, n_train, prefix='prepare error')
    check_range({'near_share': near_share}, 0, 1, open_low=True, prefix='prepare error')
    if any(k not in NEAR_KINDS for part in near.split(',') for k in part.split('+')):
        raise SystemExit(f"prepare error: near is adjacent, span or crossed, or a comma list of them (one kind per "
                         f"equal part of the curriculum; a+b: each window a or b at random); got {near!r}")
    task = Task(key_len=key_len, value_len=value_len, max_pairs=max_pairs, max_queries=max_queries, share=share)
    if max_queries > max_pairs:
        raise SystemExit(f"prepare error: max_queries={max_queries} > max_pairs={max_pairs}: a query repeats a pair's "
                         "key; lower --max_queries")
    if task.item_len * (max_pairs + max_queries) > block_size + 1:
        raise SystemExit(f"prepare error: {max_pairs} pairs and {max_queries} queries of {task.item_len} characters do "
                         f"not fit a window of {block_size + 1}; lower --max_pairs / --max_queries or raise --block_size")
    if len(KEY_ALPHABET) ** key_len < max_pairs:
        raise SystemExit(f"prepare error: keys of {key_len} digits give fewer than max_pairs={max_pairs} distinct "
                         "keys; raise --key_len")
    writable_dir(out_dir, 'out_dir', 'prepare error')  # before the text is read or downloaded
    text = get_text(input_path, out_dir)
    markers = sorted(set(text) & set(PAIR + QUERY))
    if markers:
        raise SystemExit(f"prepare error: the text holds {''.join(markers)!r}, the task's markers (pairs [kv], "
                         "queries {kv}); pass a text without them")
    chars = alphabet(text)
    assert len(chars) < 2**16, "ids are stored as uint16"
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    train_text, val_text = text[:int(n * 0.9)], text[int(n * 0.9):]
    check_splits(len(train_text), len(val_text), f"a text of {n:,} characters")
    rng = np.random.default_rng(seed)
    train = examples(train_text, n_train, block_size + 1, task, rng, stoi, curriculum, near, near_share)
    val = examples(val_text, n_val, block_size + 1, task, rng, stoi)
    meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': stoi,
            'retrieval': task.as_meta() | {'block_size': block_size, 'seed': seed, 'text_val': 'text_val.bin'}
                               | ({'curriculum': curriculum} if curriculum else {})
                               | ({'near': near} if curriculum and near != 'adjacent' else {})
                               | ({'near_share': near_share} if curriculum and near_share < 1 else {})}
    write_split(out_dir, train, val, meta)
    ids = np.array([stoi[c] for c in val_text], dtype=np.uint16)
    write_atomic(os.path.join(out_dir, 'text_val.bin'), ids.tofile)
    print(f"{n_train:,} train and {n_val:,} val windows of {block_size + 1} characters ({share:.0%} with episodes), "
          f"vocab size {len(chars)}, {len(val_text):,} characters of validation text -> {out_dir}")
    return {'train_tokens': len(train), 'val_tokens': len(val), 'vocab_size': len(chars)}


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', default=None, help="a text file (else $TINYSHAKESPEARE_PATH, else a download)")
    parser.add_argument('--out_dir', default=None, help="where to write the dataset (default: this folder)")
    parser.add_argument('--block_size', type=int, default=64, help="training context; examples are block_size + 1")
    parser.add_argument('--n_train', type=int, default=100000, help="training windows")
    parser.add_argument('--n_val', type=int, default=2000, help="validation windows")
    parser.add_argument('--share', type=float, default=1.0, help="share of the windows that carry an episode")
    parser.add_argument('--max_pairs', type=int, default=4, help="pairs per episode: 1 .. this")
    parser.add_argument('--max_queries', type=int, default=4, help="queries per episode: 1 .. this")
    parser.add_argument('--key_len', type=int, default=1, help="digits per key")
    parser.add_argument('--value_len', type=int, default=3, help="letters per value")
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--curriculum', type=int, default=0,
                        help="the first this many training windows hold near episodes, their longest key-query distance "
                             "growing to the whole window (train with --data_order=sequential); 0 = none")
    parser.add_argument('--near', default='adjacent',
                        help="the curriculum's episodes: adjacent (each query right after its own pair), span (the "
                             "usual episode inside a span of the distance; pairs may lie between) or crossed (another "
                             "pair always between a query and its own) (retrieval.py); a comma list (adjacent,crossed) "
                             "splits the curriculum into equal parts of those kinds; adjacent+crossed picks one of "
                             "them for each window")
    parser.add_argument('--near_share', type=float, default=1.0,
                        help="the share of the curriculum's windows that are near (the others usual ones); 1 = all")
    args = parser.parse_args()
    prepare(args.input, args.out_dir, args.block_size, args.n_train, args.n_val, args.share, args.max_pairs,
            args.max_queries, args.key_len, args.value_len, args.seed, args.curriculum, args.near, args.near_share)
