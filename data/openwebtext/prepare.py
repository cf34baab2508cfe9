"""
Prepare OpenWebText as GPT-2 BPE token shards: openwebtext_val_000000.bin (the first --val_tokens tokens),
openwebtext_train_000000.bin, ... (--shard_tokens each), meta.pkl and prepare_state.json into out_dir.

    python data/openwebtext/prepare.py                                   # Skylion007/openwebtext, streamed
    python data/openwebtext/prepare.py --local 'owt/*.parquet' --out_dir=DIR

The pipeline (streaming, parallel tokenisation, sharding, resuming) is data/fineweb/prepare.py's; see its
docstring. OpenWebText has a single config, so there is no --sample. If the hub copy cannot be streamed
with your datasets version, download its files yourself and pass them with --local.
"""
import os
import sys

try:
    from data.fineweb.prepare import main
except ImportError:
    # run as a script, only this folder is on sys.path; the shared pipeline lives beside it, under the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from data.fineweb.prepare import main

HERE = os.path.dirname(os.path.abspath(__file__))
DATASET = 'Skylion007/openwebtext'

if __name__ == '__main__':
    main(description=__doc__, dataset=DATASET, sample=None, out_dir=HERE)
