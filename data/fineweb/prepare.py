"""
Prepare FineWeb (default: the sample-10BT config), FineWeb-Edu or local text files as GPT-2 BPE token shards.
Writes <name>_val_000000.bin (the first --val_tokens tokens of the stream), <name>_train_000000.bin, ...
(--shard_tokens tokens each, the last one may be shorter; format in dataset.py), meta.pkl and
prepare_state.json into out_dir.

    python data/fineweb/prepare.py                                    # fineweb sample-10BT, streamed
    python data/fineweb/prepare.py --sample=sample-100BT
    python data/fineweb/prepare.py --dataset=HuggingFaceFW/fineweb-edu
    python data/fineweb/prepare.py --local 'dl/*.parquet' --out_dir=DIR   # parquet / jsonl / json / txt files

Every document becomes <|endoftext|> followed by its GPT-2 BPE tokens (--encoding: another tiktoken encoding
with an <|endoftext|> token; meta.pkl records it); the token stream is continuous, so
documents run across shard boundaries. Output does not depend on --workers. A re-run with the same
arguments resumes: it re-tokenises the stream but keeps the shards already written. .txt files are read
by the datasets 'text' builder: one document per line. tiktoken fetches its BPE files on first use; offline,
point TIKTOKEN_CACHE_DIR at a folder that already holds them.

data/openwebtext/prepare.py reuses this pipeline (prepare, main) with its own dataset name.
"""
import argparse
import glob
import json
import os
import pickle
import sys
import time
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

# run as a script only this folder is on sys.path; dataset.py, options.py and the shakespeare helpers live under the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from data.shakespeare.prepare import get_encoder  # noqa: E402
from data.shakespeare_char.prepare import one_line, write_atomic  # noqa: E402
from dataset import list_shards, read_shard, write_shard  # noqa: E402
from options import writable_dir  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATASET, SAMPLE, SHARD_TOKENS = 'HuggingFaceFW/fineweb', 'sample-10BT', 100_000_000
STATE_FILE = 'prepare_state.json'
# the datasets builder that reads each kind of local file (compressed variants such as .jsonl.gz included)
BUILDERS = {'.parquet': 'parquet', '.jsonl': 'json', '.json': 'json', '.txt': 'text'}
COMPRESSION = ('.gz', '.bz2', '.xz', '.zst')
BATCH_TASKS = 16  # worker tasks per batch of documents read from the stream (see tokenized)

_enc = None  # the tokenizer of this process (the parent loads it first, so an offline machine fails fast)


def _init_worker(encoding):
    # a spawned worker (macOS, Windows) starts without the parent's tokenizer: load the same one by name
    global _enc
    if _enc is None:
        _enc = get_encoder(encoding)


def default_workers():
    return max(1, (os.cpu_count() or 2) - 1)


def shard_prefix(dataset):
    # HuggingFaceFW/fineweb -> fineweb, HuggingFaceFW/fineweb-edu -> fineweb_edu, Skylion007/openwebtext -> openwebtext
    return dataset.rstrip('/').split('/')[-1].lower().replace('-', '_')


def tokenize(text):
    """<|endoftext|> then the document's tokens, as uint16. Runs in the worker processes (see _init_worker)."""
    # encode_ordinary: text that happens to contain '<|endoftext|>' stays text, never a separator
    ids = [_enc.eot_token]
    ids.extend(_enc.encode_ordinary(text))
    return np.array(ids, dtype=np.uint16)


def tokenized(texts, workers, chunksize, encoding='gpt2'):
    """Token arrays of the documents, in stream order. Pool.imap keeps order, so the shards are the same
    for any number of workers. imap on its own would read the whole (possibly 10B-token) stream into
    its task queue, so the stream goes in batches: the next batch is read and queued while the workers
    still tokenise the previous one, which keeps them busy and at most two batches in memory."""
    if workers == 1:
        yield from map(tokenize, texts)
        return
    batch_docs = workers * chunksize * BATCH_TASKS
    with Pool(workers, initializer=_init_worker, initargs=(encoding,)) as pool:
        pending, batch = None, []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_docs:
                queued = pool.imap(tokenize, batch, chunksize)
                if pending is not None:
                    yield from pending
                pending, batch = queued, []
        queued = pool.imap(tokenize, batch, chunksize) if batch else None
        for results in (pending, queued):
            if results is not None:
                yield from results


def resolve_local(patterns):
    """(datasets builder, sorted absolute paths) for --local files and globs; every file of one kind."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise SystemExit(f"--local: no file matches {pattern}")
        files.extend(os.path.abspath(m) for m in matches if os.path.isfile(m))
    if not files:
        raise SystemExit(f"--local: no files among {' '.join(patterns)}")
    kinds = set()
    for f in files:
        base = f.lower()
        for c in COMPRESSION:  # dl/part.jsonl.gz is a jsonl file; datasets decompresses it
            base = base.removesuffix(c)
        ext = os.path.splitext(base)[1]
        if ext not in BUILDERS:
            raise SystemExit(f"--local: cannot read {f}: expected .parquet, .jsonl, .json or .txt files")
        kinds.add(BUILDERS[ext])
    if len(kinds) > 1:
        raise SystemExit(f"--local: mixed file kinds ({', '.join(sorted(kinds))}); prepare one kind per run")
    return kinds.pop(), files


def open_stream(dataset, sample=None, local_files=None, builder=None):
    """The records (dicts) of the dataset, streamed in a fixed order: local files through the datasets
    builder for their kind, else the dataset's train split on the Hugging Face hub."""
    import datasets  # slow to import: only when there is something to stream

    if local_files:
        return datasets.load_dataset(builder, data_files=local_files, split='train', streaming=True)
    try:
        ds = datasets.load_dataset(dataset, name=sample, split='train', streaming=True)
    except OSError as e:  # offline or hub unreachable: ConnectionError, requests' and the hub client's errors
        reason = f"{type(e).__name__}: {one_line(e)}"[:160]
        raise SystemExit(f"could not reach {dataset} on the Hugging Face hub ({reason}); run with --local FILE "
                         "[FILE ...] (parquet/jsonl/txt) to prepare local files instead") from None
    except Exception as e:  # reached the hub, but e.g. an unknown --sample config or a script-only dataset
        reason = f"{type(e).__name__}: {one_line(e)}"[:200]
        what = f"{dataset} (config {sample})" if sample else dataset
        raise SystemExit(f"could not load {what} from the Hugging Face hub ({reason}); check --dataset/--sample, "
                         "or run with --local FILE [FILE ...] (parquet/jsonl/txt) to prepare local files instead") from None

    def records():
        try:
            yield from ds
        except OSError as e:  # the connection dropped mid-stream (after the datasets library's own retries)
            raise SystemExit(f"lost the stream of {dataset} ({type(e).__name__}: {one_line(e)[:160]}); re-run the "
                             "same command to resume (finished shards are kept)") from None
    return records()


def texts_of(records, text_field):
    for i, rec in enumerate(records):
        if text_field not in rec:
            raise SystemExit(f"record {i} has no field {text_field!r} (fields: {', '.join(map(str, rec))}); "
                             "pass --text_field NAME")
        yield rec[text_field] or ''  # a null text is an empty document


def finished_shards(out_dir, prefix):
    """{path: token count} of this prefix's shards that are already complete (writes are atomic, so a file
    with a valid header is a whole shard). A bad one is left out, and rewritten when its turn comes."""
    done = {}
    for split in ('val', 'train'):
        for path in list_shards(out_dir, split):
            if os.path.basename(path).startswith(f'{prefix}_{split}_'):
                try:
                    done[path] = len(read_shard(path))
                except (SystemExit, ValueError, OSError):
                    pass
    return done


def check_state(out_dir, state):
    """Refuse to mix shards made with different arguments in one folder: they would not form one stream."""
    path = os.path.join(out_dir, STATE_FILE)
    has_shards = bool(list_shards(out_dir, 'train') or list_shards(out_dir, 'val'))
    if not has_shards:
        return  # nothing to protect (a run that failed before its first shard may have left a state file)
    if not os.path.exists(path):
        raise SystemExit(f"{out_dir} already holds token shards that this script did not make (no {STATE_FILE}); "
                         "use another --out_dir or delete those shards")
    with open(path) as f:
        old = json.load(f)
    old.setdefault('encoding', 'gpt2')  # state files from before the tokenizer was recorded were all GPT-2
    changed = [f"{k} {old.get(k)!r} -> {state[k]!r}" for k in state if old.get(k) != state[k]]
    if changed:
        raise SystemExit(one_line(f"{out_dir} holds shards prepared with other arguments ({'; '.join(changed)}); "
                                  f"use another --out_dir, or delete {out_dir} to start over"))


def prepare(dataset=DATASET, sample=SAMPLE, local=None, text_field='text', out_dir=None, shard_tokens=SHARD_TOKENS,
            val_tokens=None, max_tokens=0, workers=None, chunksize=16, name=None, encoding='gpt2'):
    """Tokenise the dataset (or the local files) into out_dir; returns the summary printed at the end.
    name: the shard file prefix, by default from the dataset (fineweb, fineweb_edu, openwebtext);
    encoding: the tiktoken encoding (it needs an <|endoftext|> token, the document separator)."""
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    workers = workers or default_workers()
    name = name or shard_prefix(dataset)
    out_dir = out_dir or os.path.join(os.path.dirname(HERE), name)  # data/fineweb, data/fineweb_edu: --dataset=<name>
    for flag, v, low in (('shard_tokens', shard_tokens, 1), ('val_tokens', val_tokens, 1),
                         ('max_tokens', max_tokens, 0), ('workers', workers, 1), ('chunksize', chunksize, 1)):
        if v < low:
            raise SystemExit(f"--{flag} must be >= {low}, got {v}")

    writable_dir(out_dir, 'out_dir', 'prepare error')  # before any download or tokenising

    global _enc
    _enc = get_encoder(encoding)  # before the stream, so an offline machine fails fast and downloads nothing
    assert _enc.n_vocab < 2**16, "tokens are stored as uint16"
    if '<|endoftext|>' not in _enc.special_tokens_set:
        raise SystemExit(f"--encoding {encoding} has no <|endoftext|> token to separate documents; use one that has")
    builder, files = resolve_local(local) if local else (None, None)
    # what decides the token stream and how it is cut; max_tokens is left out, so a longer run can extend a short one
    state = {'name': name, 'dataset': None if files else dataset, 'sample': None if files else sample,
             'local': files, 'text_field': text_field, 'shard_tokens': shard_tokens, 'val_tokens': val_tokens,
             'encoding': encoding}
    os.makedirs(out_dir, exist_ok=True)
    check_state(out_dir, state)
    records = open_stream(dataset, sample, files, builder)
    write_atomic(os.path.join(out_dir, STATE_FILE), lambda f: f.write(json.dumps(state, indent=1).encode()))
    write_atomic(os.path.join(out_dir, 'meta.pkl'),
                 lambda f: pickle.dump({'vocab_size': _enc.n_vocab, 'tokenizer': encoding}, f))
    for tmp in glob.glob(os.path.join(out_dir, f'{name}_*.bin.tmp*')):
        os.remove(tmp)  # left by a run that was killed mid-write (write_shard cleans up otherwise)

    done = finished_shards(out_dir, name)
    if done:
        print(f"skipping {len(done)} finished shards in {out_dir} (re-tokenising the stream to find where they end)")
    source = ' '.join(files) if files else f"{dataset}" + (f" ({sample})" if sample else '')
    print(f"tokenising {source} with {workers} worker(s) -> {out_dir}/{name}_{{val,train}}_*.bin")

    t0 = time.time()
    budget = max_tokens or float('inf')  # train tokens still to go
    buf = np.empty(max(shard_tokens, val_tokens), dtype=np.uint16)
    stats = {'documents': 0, 'train_tokens': 0, 'val_tokens': 0, 'train_shards': 0, 'val_shards': 0, 'skipped': 0}
    split, index, fill, cap, bar = 'val', 0, 0, val_tokens, None

    def flush(cut):
        """Write the buffered shard, unless an identical one is already there. cut: --max_tokens ended it
        early, and a longer shard from an earlier, longer run holds these tokens and more: keep that one."""
        path = os.path.join(out_dir, f'{name}_{split}_{index:06d}.bin')
        have = done.get(path)
        if have == fill or (cut and have is not None and have > fill):
            stats['skipped'] += 1
        else:
            write_shard(path, buf[:fill])
        stats[f'{split}_tokens'] += fill
        stats[f'{split}_shards'] += 1
        if bar.total != fill:  # the stream (or --max_tokens) ended this shard early: show it as done
            bar.total = fill
            bar.refresh()
        bar.close()

    def new_bar():
        total = cap if split == 'val' else min(cap, budget)
        return tqdm(total=total, unit='tok', unit_scale=True, desc=f'{name}_{split}_{index:06d}', dynamic_ncols=True)

    stop = False
    bar = new_bar()
    docs = tokenized(texts_of(records, text_field), workers, chunksize, encoding)
    try:
        for toks in docs:
            stats['documents'] += 1
            pos = 0
            while pos < len(toks):
                take = min(cap - fill, len(toks) - pos)
                if split == 'train':
                    take = min(take, budget)
                buf[fill:fill + take] = toks[pos:pos + take]
                fill, pos = fill + take, pos + take
                bar.update(take)
                if split == 'train':
                    budget -= take
                if fill == cap or (split == 'train' and budget == 0):
                    flush(cut=fill < cap)
                    split, index, fill, cap = ('train', 0 if split == 'val' else index + 1, 0, shard_tokens)
                    if budget == 0:
                        stop = True
                        break
                    bar = new_bar()
            if stop:
                break
    finally:
        docs.close()  # stops the worker pool now: at the end, at --max_tokens, or on an error or Ctrl-C
    if not stop:
        if fill:
            flush(cut=False)
        else:
            bar.close()

    stats['seconds'] = round(time.time() - t0, 1)
    print(f"{stats['documents']:,} documents, train {stats['train_tokens']:,} tokens in {stats['train_shards']} shards, "
          f"val {stats['val_tokens']:,} tokens in {stats['val_shards']} shard, {stats['skipped']} kept from an earlier run, "
          f"{stats['seconds']}s -> {out_dir}")
    if not stats['train_tokens']:
        raise SystemExit(f"the stream has only {stats['val_tokens']:,} tokens, all in the val shard; "
                         "lower --val_tokens (or add data) to get train shards")
    return stats


def build_parser(description, dataset=DATASET, sample=SAMPLE, out_dir=None):
    """The CLI; sample=None leaves out --sample (datasets without configs, like OpenWebText)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default=dataset, help=f"dataset on the Hugging Face hub (default {dataset})")
    if sample is not None:
        p.add_argument('--sample', default=sample,
                       help=f"the dataset's config name, e.g. sample-100BT (default {sample}; use 'default' for all of it)")
    p.add_argument('--local', nargs='+', metavar='PATH', default=None,
                   help="local parquet / jsonl / json / txt files or globs (quote them) instead of the hub")
    p.add_argument('--text_field', default='text', help="the field that holds each document's text (default text)")
    where = os.path.relpath(out_dir) if out_dir else "data/<name>, e.g. data/fineweb, data/fineweb_edu"
    p.add_argument('--out_dir', default=out_dir, help=f"where to write the shards (default {where})")
    p.add_argument('--shard_tokens', type=int, default=SHARD_TOKENS, help="tokens per train shard (default 100M)")
    p.add_argument('--val_tokens', type=int, default=None, help="tokens in the val shard (default: --shard_tokens)")
    p.add_argument('--max_tokens', type=int, default=0, help="stop after this many train tokens (default 0: all)")
    p.add_argument('--workers', type=int, default=default_workers(), help="tokeniser processes (default: CPUs - 1)")
    p.add_argument('--chunksize', type=int, default=16, help="documents per worker task (default 16)")
    p.add_argument('--encoding', default='gpt2', help="tiktoken encoding name, recorded in meta.pkl (default gpt2)")
    return p


def main(argv=None, description=__doc__, dataset=DATASET, sample=SAMPLE, out_dir=None):
    args = build_parser(description, dataset, sample, out_dir).parse_args(argv)
    return prepare(dataset=args.dataset, sample=getattr(args, 'sample', None), local=args.local,
                   text_field=args.text_field, out_dir=args.out_dir, shard_tokens=args.shard_tokens,
                   val_tokens=args.val_tokens, max_tokens=args.max_tokens, workers=args.workers,
                   chunksize=args.chunksize, encoding=args.encoding)


if __name__ == '__main__':
    main()
