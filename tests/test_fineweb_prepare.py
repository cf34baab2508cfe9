"""
Tests for data/fineweb/prepare.py (and the thin data/openwebtext/prepare.py): small local parquet, jsonl and
txt files made in tmp_path, tokenised into tiny shards with conftest.py's test encoding (GPT-2's own too where
its files are cached: TIKTOKEN_CACHE_DIR). Nothing reaches the network: the hub is only ever a monkeypatched failure.
"""
import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import dataset
from conftest import ROOT, TEST_ENCODING, run

SHARD, VAL = 500, 300
ENC = tiktoken.get_encoding(TEST_ENCODING)


def load_script(rel, name):
    # data/fineweb is a folder of scripts, not a package. The dotted name lets worker processes started by
    # spawn or forkserver import the module again to find tokenize().
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


fw = load_script("data/fineweb/prepare.py", "data.fineweb.prepare")


def make_docs():
    # varied lengths (several run across shard boundaries), unicode, an empty document, and one holding the
    # separator's own text, which must stay ordinary text
    docs = []
    for i in range(50):
        words = ["the", "naïve", "café", "日本語", "emoji 🚀", "Ω≈ç√", "tab\there", "new\nline", "x" * 40]
        docs.append(" ".join(words[(i + j) % len(words)] for j in range((i * 7) % 23)) + f" doc {i}.")
    docs[3] = ""
    docs[10] = "ends with <|endoftext|> in the text"
    docs[20] = "long " * 400  # ~400 tokens: spans a whole shard boundary
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def files(tmp_path_factory, docs):
    d = tmp_path_factory.mktemp("local")
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), d / "docs.parquet", row_group_size=16)
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": i, "content": t}) + "\n")
    lines = [" ".join(t.split()) for t in docs if t.strip()]  # the text builder: one document per line
    (d / "docs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"parquet": d / "docs.parquet", "jsonl": d / "docs.jsonl", "txt": d / "docs.txt", "lines": lines}


def prep(local, out, **kw):
    kw = {"shard_tokens": SHARD, "val_tokens": VAL, "workers": 1, "encoding": TEST_ENCODING, **kw}
    return fw.prepare(local=[str(local)], out_dir=str(out), **kw)


def read_all(out, prefix="fineweb"):
    val = dataset.list_shards(str(out), "val")
    train = dataset.list_shards(str(out), "train")
    assert [os.path.basename(p) for p in val] == [f"{prefix}_val_000000.bin"]
    assert [os.path.basename(p) for p in train] == [f"{prefix}_train_{i:06d}.bin" for i in range(len(train))]
    return dataset.read_shard(val[0]), [dataset.read_shard(p) for p in train]


def expected(docs):
    return "".join("<|endoftext|>" + t for t in docs)


@pytest.mark.parametrize("encoding", [TEST_ENCODING, pytest.param("gpt2", marks=pytest.mark.gpt2_files)])
@pytest.mark.parametrize("kind,field", [("parquet", "text"), ("jsonl", "content")])
def test_round_trip_and_shard_sizes(files, docs, tmp_path, kind, field, encoding):
    stats = prep(files[kind], tmp_path, text_field=field, encoding=encoding)
    val, train = read_all(tmp_path)
    enc = tiktoken.get_encoding(encoding)
    stream = np.concatenate([val, *train])
    assert enc.decode(stream.tolist()) == expected(docs)
    assert len(val) == VAL and val[0] == enc.eot_token
    assert all(len(s) == SHARD for s in train[:-1]) and 0 < len(train[-1]) <= SHARD
    assert stats["documents"] == len(docs) and stats["val_tokens"] == VAL
    assert stats["train_tokens"] == len(stream) - VAL and stats["train_shards"] == len(train) >= 3
    with open(tmp_path / "meta.pkl", "rb") as f:
        assert pickle.load(f) == {"vocab_size": enc.n_vocab, "tokenizer": encoding}
    if encoding == "gpt2":
        assert enc.n_vocab == 50257 and val[0] == 50256


def test_txt_is_one_document_per_line(files, tmp_path):
    prep(files["txt"], tmp_path, val_tokens=100)
    val, train = read_all(tmp_path)
    assert ENC.decode(np.concatenate([val, *train]).tolist()) == expected(files["lines"])


def test_workers_do_not_change_the_shards(files, tmp_path, monkeypatch):
    # small tasks and batches of 8 documents (7 batches, several in flight), so order really has to be kept
    monkeypatch.setattr(fw, "BATCH_TASKS", 2)
    prep(files["parquet"], tmp_path / "one", workers=1)
    prep(files["parquet"], tmp_path / "two", workers=2, chunksize=2)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.bin"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.bin")) and len(names) >= 4
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()


def test_resume_skips_finished_shards(files, tmp_path, capsys):
    first = prep(files["parquet"], tmp_path)
    shards = sorted(tmp_path.glob("fineweb_*.bin"))
    before = {p.name: p.read_bytes() for p in shards}
    last = tmp_path / f"fineweb_train_{first['train_shards'] - 1:06d}.bin"
    last.unlink()
    (tmp_path / "fineweb_train_000000.bin.tmp4242").write_bytes(b"half a shard")  # as a killed run leaves it
    capsys.readouterr()
    again = prep(files["parquet"], tmp_path)
    assert f"skipping {len(shards) - 1} finished shards" in capsys.readouterr().out
    assert again["skipped"] == len(shards) - 1
    assert {p.name: p.read_bytes() for p in tmp_path.glob("fineweb_*.bin")} == before
    assert not list(tmp_path.glob("*tmp*"))
    for k in ("documents", "train_tokens", "val_tokens", "train_shards"):
        assert again[k] == first[k]

    # other arguments into the same folder would mix two streams: one line naming the fix
    with pytest.raises(SystemExit) as e:
        prep(files["parquet"], tmp_path, shard_tokens=400)
    msg = str(e.value)
    assert "\n" not in msg and "shard_tokens 500 -> 400" in msg and "--out_dir" in msg
    with pytest.raises(SystemExit) as e:
        prep(files["jsonl"], tmp_path, text_field="content")
    assert "\n" not in str(e.value) and "local" in str(e.value)


def test_max_tokens_stops_early_and_a_longer_run_extends_it(files, docs, tmp_path):
    stats = prep(files["parquet"], tmp_path, max_tokens=700)
    _, train = read_all(tmp_path)
    assert stats["train_tokens"] == 700 and [len(s) for s in train] == [SHARD, 200]
    assert stats["documents"] < len(docs)
    prep(files["parquet"], tmp_path)  # the same stream, to the end: the short shard is rewritten in full
    val, train = read_all(tmp_path)
    assert len(train[1]) == SHARD
    assert ENC.decode(np.concatenate([val, *train]).tolist()) == expected(docs)


def test_hub_failure_is_one_line(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        fw.prepare(out_dir=str(tmp_path), shard_tokens=SHARD, workers=1, encoding=TEST_ENCODING)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("could not reach HuggingFaceFW/fineweb on the Hugging Face hub")
    assert "--local" in msg
    assert not list(tmp_path.glob("*.bin"))


def test_bad_local_input_is_one_line(files, tmp_path):
    for local, kw, words in [(tmp_path / "missing*.parquet", {}, "no file matches"),
                             (files["jsonl"], {}, "no field 'text'"),
                             (files["parquet"], {"shard_tokens": 0}, "--shard_tokens must be >= 1")]:
        with pytest.raises(SystemExit) as e:
            prep(local, tmp_path / "out", **kw)
        assert "\n" not in str(e.value) and words in str(e.value)


def test_cli(files, docs, tmp_path):
    out = tmp_path / "fw"
    # the test encoding reaches the script and its worker processes as a tiktoken plugin (conftest.py)
    r = run("data/fineweb/prepare.py", "--local", str(files["jsonl"]), "--text_field=content", f"--out_dir={out}",
            "--shard_tokens=500", "--val_tokens=300", "--workers=2", f"--encoding={TEST_ENCODING}", timeout=120)
    assert "50 documents" in r.stdout
    val, train = read_all(out)
    assert len(val) == VAL and len(train) >= 3
    assert ENC.decode(np.concatenate([val, *train]).tolist()) == expected(docs)
    with open(out / "meta.pkl", "rb") as f:
        assert pickle.load(f) == {"vocab_size": ENC.n_vocab, "tokenizer": TEST_ENCODING}
    out = tmp_path / "owt"
    r = run("data/openwebtext/prepare.py", "--local", str(files["parquet"]), f"--out_dir={out}",
            "--shard_tokens=500", "--val_tokens=300", "--workers=1", f"--encoding={TEST_ENCODING}", timeout=120)
    assert "50 documents" in r.stdout
    read_all(out, prefix="openwebtext")
    # the thin script's CLI is the shared one less --sample (OpenWebText has no configs)
    assert "--sample" in fw.build_parser("").format_usage()
    assert "--sample" not in fw.build_parser("", sample=None).format_usage()
