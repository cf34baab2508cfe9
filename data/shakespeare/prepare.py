"""
Prepare Tiny Shakespeare with the GPT-2 BPE tokenizer (tiktoken).
Writes train.bin / val.bin (uint16 token ids) and meta.pkl into out_dir.

    python data/shakespeare/prepare.py [--input PATH] [--out_dir DIR] [--encoding gpt2]

The text comes from the same places as data/shakespeare_char/prepare.py
(--input, then $TINYSHAKESPEARE_PATH, then out_dir/input.txt, then a download).
tiktoken fetches its BPE files on first use; offline, point TIKTOKEN_CACHE_DIR
at a folder that already holds them. --encoding picks another tiktoken encoding (any name tiktoken or
one of its tiktoken_ext plugins knows); meta.pkl records it, and sampling decodes with it.
"""
import argparse
import os
import sys

import tiktoken

try:
    from data.shakespeare_char.prepare import check_splits, get_text, one_line, write_split
except ImportError:
    # run as a script, only this folder is on sys.path; the text-source logic lives beside it, under the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from data.shakespeare_char.prepare import check_splits, get_text, one_line, write_split
from options import writable_dir  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

def get_encoder(encoding='gpt2'):
    try:
        return tiktoken.get_encoding(encoding)
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; a corrupt download or unknown name a ValueError
        reason = f"{type(e).__name__}: {one_line(e)}"[:160]  # requests' messages run to several hundred chars
        raise SystemExit(f"could not load the {encoding!r} BPE files for tiktoken ({reason}); "
                         f"set TIKTOKEN_CACHE_DIR to a folder holding them") from None

def prepare(input_path=None, out_dir=None, encoding='gpt2'):
    out_dir = out_dir or HERE
    writable_dir(out_dir, 'out_dir', 'prepare error')  # before the text is read or downloaded
    enc = get_encoder(encoding)  # before the text, so an offline machine fails fast and downloads nothing
    data = get_text(input_path, out_dir)

    # split by characters (first 90% train) and encode each part on its own, as nanoGPT does;
    # encode_ordinary because the text has no special tokens and should never be read as one
    n = len(data)
    train_ids = enc.encode_ordinary(data[:int(n * 0.9)])
    val_ids = enc.encode_ordinary(data[int(n * 0.9):])
    check_splits(len(train_ids), len(val_ids), f"a text of {n:,} characters")
    assert enc.n_vocab < 2**16, "ids are stored as uint16"

    # 'tokenizer' tells sampling code to decode with this tiktoken encoding rather than an itos table
    write_split(out_dir, train_ids, val_ids, {'vocab_size': enc.n_vocab, 'tokenizer': encoding})
    print(f"{n:,} chars, vocab size {enc.n_vocab}, train {len(train_ids):,} tokens, "
          f"val {len(val_ids):,} tokens -> {out_dir}")
    return {'chars': n, 'vocab_size': enc.n_vocab, 'train_tokens': len(train_ids), 'val_tokens': len(val_ids)}

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', default=None, help="local copy of input.txt (else $TINYSHAKESPEARE_PATH, else download)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin/meta.pkl (default: this folder)")
    parser.add_argument('--encoding', default='gpt2', help="tiktoken encoding name (default gpt2)")
    args = parser.parse_args()
    prepare(args.input, args.out_dir, args.encoding)
